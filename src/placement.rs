//! The cluster's placement: its nodes, where each shard's replicas live and which node should
//! lead each shard. It is the state of the metadata group, a Raft group beside the shards
//! (group id [`META_SHARD`], above every shard id), so every node holds the same map and a
//! change survives any minority of failures, restarts and leader changes alike.
//!
//! This module is the map and its deterministic apply, nothing else: the state machine
//! (`raft::state_machine`) stores the map in the metadata group's state range (so snapshots
//! carry it), and the service proposes commands and acts on the map.
//!
//! - [`PlacementCommand::Init`] fills the map from `cluster.toml` once, proposed by the
//!   metadata group's first leader: every node active, every shard on every node, and shard
//!   `s` preferably led by the `s mod n`-th node. A second `Init` changes nothing.
//! - [`PlacementCommand::SetPreferredLeader`] names the node that should lead a shard; the
//!   node leading the shard hands leadership over once that replica has the whole log
//!   (`service::balance_leaders`).
//! - [`PlacementCommand::Register`] takes in a node added to the file after the cluster
//!   formed: it joins `active`, holding no replica. A node the map already has is never
//!   registered again, which is what keeps a formation member that lost its disk out (see
//!   `raft::formation`).
//!
//! Every change raises [`ClusterMap::epoch`], so of two maps the newer is the higher epoch.

use serde::{Deserialize, Serialize};

/// The most shards a cluster may have (`chat::limits::SHARDS_MAX`, which the config checks);
/// a map is never built with more.
pub const SHARDS_MAX: u32 = 4096;

/// The metadata group's id: above every shard id (a configuration has at most 4,096), and
/// the highest id the key schema gives a range to (`store::keys::SHARD_ID_MAX`).
pub const META_SHARD: u32 = u32::MAX - 1;

/// A node as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u64,
    pub peer_addr: String,
    pub client_addr: String,
    pub state: NodeState,
}

/// Whether a node takes new replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Holds replicas and may be given more.
    Active,
    /// Being emptied (`convoy admin drain`): given no new replica.
    Draining,
    /// Out of the cluster (`convoy admin remove-node`), once it held nothing; its id is
    /// never taken again.
    Removed,
    /// Its disk was lost (`convoy admin replace-node`): given no new replica, and its
    /// replicas are rebuilt on other nodes without asking it to delete anything. The ids
    /// it had in those shards are retired, so they never vote again.
    Lost,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Removed => "removed",
            NodeState::Lost => "lost",
        }
    }
}

/// Where one shard (or the metadata group) lives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlacement {
    pub shard: u32,
    /// The nodes holding its voting replicas, ascending.
    pub voters: Vec<u64>,
    /// The node that should lead it; one of `voters`.
    pub preferred_leader: u64,
    /// Nodes a move is adding, not voting yet.
    pub learners: Vec<u64>,
    /// Replica ids that left the shard (moved away, or cancelled learners): a node's next
    /// replica in the shard takes a generation above each of its own, so no id that held
    /// state is ever used again once that state was deleted.
    pub retired: Vec<u64>,
}

impl ShardPlacement {
    /// Whether `node` holds a replica here, voting or being added.
    pub fn holds(&self, node: u64) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }
}

/// How a group is named to an operator: `shard 3`, or `the metadata group`.
pub fn group_name(group: u32) -> String {
    if group == META_SHARD {
        "the metadata group".to_string()
    } else {
        format!("shard {group}")
    }
}

/// A shard move in progress: its replica on `from` is replaced by a new one on `to`. Every
/// step is recorded here before the coordinator (the metadata group's leader) acts on the
/// next, so a new coordinator resumes where the last one stopped (see `service::coordinate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: u64,
    pub shard: u32,
    pub from: u64,
    pub to: u64,
    pub step: Step,
    /// The new replica's id in the shard's group, once its leader added it as a learner.
    pub replica: Option<u64>,
    /// The replica ids of `from` it replaces (what `from` may delete once it is done).
    pub leaving: Vec<u64>,
}

/// Where a move stands. Steps only go forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Step {
    /// `to` is placed as a learner; the shard's leader is to add its replica.
    Adding,
    /// The learner follows the log (or installs a snapshot); once it has caught up, the
    /// leader hands leadership away if it is `from`, then makes the learner a voter in
    /// place of `from`'s replica (a joint-consensus membership change).
    CatchingUp,
    /// `to` votes and `from` left the group: `from` is to stop its replica and delete its
    /// data.
    Removing,
    /// Cancelled before `to` voted: the learner is to be removed and `to` to delete its copy.
    Cancelling,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Adding => "adding",
            Step::CatchingUp => "catching_up",
            Step::Removing => "removing",
            Step::Cancelling => "cancelling",
        }
    }
}

/// The metadata group's state. `epoch` 0 is the empty map of a group not yet initialized.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub epoch: u64,
    /// Ascending by id.
    pub nodes: Vec<NodeEntry>,
    /// One per shard, `shards[s].shard == s`.
    pub shards: Vec<ShardPlacement>,
    /// Where the metadata group's replicas are: the cluster's formation members at first;
    /// a move changes them like a shard's (`shard` is [`META_SHARD`]; its preferred leader is
    /// recorded but not balanced).
    pub metadata: ShardPlacement,
    /// Moves in progress, by id.
    pub operations: Vec<Operation>,
    /// The last operation id given out.
    pub last_operation: u64,
}

/// What a client needs from the map to route: how to reach each node and where each
/// shard's voting replicas are. Any node gives it (`Request::ShardMap`), and every
/// `NotLeader` answer carries it, so a client follows moves and reaches nodes added after
/// its own `cluster.toml` was written. Peer addresses and operations stay out: they are
/// the admin's business.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingMap {
    /// The cluster map's epoch: of two routing maps the higher epoch is the newer.
    pub epoch: u64,
    /// Every node the map has, removed ones included (a client stops using those).
    pub nodes: Vec<RoutedNode>,
    /// One per shard, in shard order.
    pub shards: Vec<RoutedShard>,
}

/// A node's client address and state, as the map has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedNode {
    pub id: u64,
    pub client_addr: String,
    pub state: NodeState,
}

/// Where a shard's voting replicas are, its preferred leader first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedShard {
    pub shard: u32,
    pub voters: Vec<u64>,
}

/// A change to the map, proposed to the metadata group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementCommand {
    /// Fills an empty map: these nodes, `shards` shards each on every node.
    Init { nodes: Vec<NodeEntry>, shards: u32 },
    /// Names the node that should lead `shard`.
    SetPreferredLeader { shard: u32, node: u64 },
    /// Adds a node that is not in the map yet, active and holding no replica. Its addresses
    /// are updated if it is (a node's addresses may change in the file); nothing else.
    Register(NodeEntry),
    /// Starts moving `shard`'s replica on `from` to `to`.
    StartMove { shard: u32, from: u64, to: u64 },
    /// Records that move `id` reached `step` (with the new replica's id, and the replicas
    /// of `from` it replaces, from `CatchingUp` on). `Removing` makes `to` a voter in place
    /// of `from`.
    MoveReached { id: u64, step: Step, replica: Option<u64>, leaving: Vec<u64> },
    /// Ends move `id`: done, or cancelled and cleaned up.
    MoveEnded { id: u64 },
    /// Asks to cancel move `id`; possible until `to` votes.
    CancelMove { id: u64 },
    /// Marks `node` draining: it is given no new replica (its moves off are asked apart).
    Drain { node: u64 },
    /// Takes `node` out of the cluster, once it holds no replica of any group.
    RemoveNode { node: u64 },
    /// Marks `node` lost (its disk is gone): it is given no new replica, and the moves off
    /// it (asked apart) skip deleting its data.
    MarkLost { node: u64 },
    /// `node`, which lost its disk, rebuilt every replica it holds under new ids (started
    /// empty while marked lost, or with `--rejoin`): it is active again and takes replicas.
    Rejoined { node: u64 },
    /// Stops draining `node` (`convoy admin recommission`): it takes replicas again. Moves
    /// already made stay made.
    Recommission { node: u64 },
}

impl ClusterMap {
    /// Whether the map was initialized.
    pub fn is_set(&self) -> bool {
        self.epoch > 0
    }

    /// Whether `node` holds (or is being given) a replica of any group, the metadata group's
    /// included. A node that holds none has nothing to lose and may register again after
    /// losing its disk; one that does must rejoin as new replicas.
    pub fn holds_replicas(&self, node: u64) -> bool {
        self.shards.iter().chain(std::iter::once(&self.metadata)).any(|p| p.holds(node))
    }

    /// The state of `node`, if the map has it.
    pub fn node_state(&self, node: u64) -> Option<NodeState> {
        self.nodes.iter().find(|n| n.id == node).map(|n| n.state)
    }

    /// The move of `shard` in progress, if any.
    pub fn operation_on(&self, shard: u32) -> Option<&Operation> {
        self.operations.iter().find(|o| o.shard == shard)
    }

    /// The part of the map a client routes by (see [`RoutingMap`]).
    pub fn routing(&self) -> RoutingMap {
        let nodes = self
            .nodes
            .iter()
            .map(|n| RoutedNode { id: n.id, client_addr: n.client_addr.clone(), state: n.state })
            .collect();
        let shards = self
            .shards
            .iter()
            .map(|p| {
                let mut voters = vec![p.preferred_leader];
                voters.extend(p.voters.iter().copied().filter(|v| *v != p.preferred_leader));
                voters.retain(|v| p.voters.contains(v));
                RoutedShard { shard: p.shard, voters }
            })
            .collect();
        RoutingMap { epoch: self.epoch, nodes, shards }
    }

    /// Where `shard` lives, if the map has it.
    pub fn shard(&self, shard: u32) -> Option<&ShardPlacement> {
        self.shards.get(shard as usize).filter(|p| p.shard == shard)
    }

    /// Where the replicas of group `group` are: a shard, or the metadata group
    /// ([`META_SHARD`]) once the map is set. Moves work on either.
    pub fn placement(&self, group: u32) -> Option<&ShardPlacement> {
        if group == META_SHARD {
            return self.is_set().then_some(&self.metadata);
        }
        self.shard(group)
    }

    fn placement_mut(&mut self, group: u32) -> Result<&mut ShardPlacement, String> {
        if group == META_SHARD {
            return Ok(&mut self.metadata);
        }
        let count = self.shards.len();
        self.shards
            .get_mut(group as usize)
            .ok_or_else(|| format!("no shard {group}: the cluster has shards 0 to {}", count.saturating_sub(1)))
    }

    /// Applies `command`: `Ok(true)` when the map changed (the epoch rose), `Ok(false)` when
    /// it already said so, `Err` with the reason when the command cannot apply (the map is
    /// then unchanged). Deterministic: every replica of the metadata group reaches the same map.
    pub fn apply(&mut self, command: &PlacementCommand) -> Result<bool, String> {
        match command {
            PlacementCommand::Init { nodes, shards } => {
                if self.is_set() {
                    return Ok(false);
                }
                let mut nodes = nodes.clone();
                nodes.sort_by_key(|n| n.id);
                nodes.dedup_by_key(|n| n.id);
                // The bound config checks: an entry naming more (which no convoy node
                // proposes) is refused, never a map every replica runs out of memory building.
                if nodes.is_empty() || *shards == 0 || *shards > SHARDS_MAX || *shards >= META_SHARD {
                    return Err(format!("cannot place {shards} shards on {} nodes", nodes.len()));
                }
                let ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
                self.shards = (0..*shards)
                    .map(|s| ShardPlacement {
                        shard: s,
                        voters: ids.clone(),
                        preferred_leader: ids[s as usize % ids.len()],
                        learners: Vec::new(),
                        retired: Vec::new(),
                    })
                    .collect();
                self.metadata = ShardPlacement {
                    shard: META_SHARD,
                    preferred_leader: ids[0],
                    voters: ids,
                    learners: Vec::new(),
                    retired: Vec::new(),
                };
                self.nodes = nodes;
                self.epoch = 1;
                Ok(true)
            }
            PlacementCommand::SetPreferredLeader { shard, node } => {
                if !self.is_set() {
                    return Err("the cluster map is not initialized yet".into());
                }
                let count = self.shards.len();
                let placement = self
                    .shards
                    .get_mut(*shard as usize)
                    .ok_or_else(|| format!("no shard {shard}: the cluster has shards 0 to {}", count - 1))?;
                if !placement.voters.contains(node) {
                    return Err(format!(
                        "node {node} holds no voting replica of shard {shard} (its voters are {:?})",
                        placement.voters
                    ));
                }
                if placement.preferred_leader == *node {
                    return Ok(false);
                }
                placement.preferred_leader = *node;
                self.epoch += 1;
                Ok(true)
            }
            PlacementCommand::Register(entry) => {
                if !self.is_set() {
                    return Err("the cluster map is not initialized yet".into());
                }
                match self.nodes.binary_search_by_key(&entry.id, |n| n.id) {
                    Ok(i) if self.nodes[i].state == NodeState::Removed => {
                        return Err(format!(
                            "node {} was removed from the cluster; its id is not taken again",
                            entry.id
                        ))
                    }
                    Ok(i) => {
                        // A lost node whose replicas all moved away comes back empty, which
                        // is all a new node is: it is active again.
                        let found = self.nodes[i].state == NodeState::Lost && !self.holds_replicas(entry.id);
                        let known = &mut self.nodes[i];
                        if (&known.peer_addr, &known.client_addr) == (&entry.peer_addr, &entry.client_addr) && !found {
                            return Ok(false);
                        }
                        known.peer_addr = entry.peer_addr.clone();
                        known.client_addr = entry.client_addr.clone();
                        if found {
                            known.state = NodeState::Active;
                        }
                    }
                    Err(i) => self.nodes.insert(i, NodeEntry { state: NodeState::Active, ..entry.clone() }),
                }
                self.epoch += 1;
                Ok(true)
            }
            PlacementCommand::StartMove { shard, from, to } => {
                if !self.is_set() {
                    return Err("the cluster map is not initialized yet".into());
                }
                if let Some(op) = self.operation_on(*shard) {
                    // The same move asked again (its answer was lost, so the client asked
                    // another node) is the move under way: no change, not a refusal.
                    if (op.from, op.to) == (*from, *to) && op.step != Step::Cancelling {
                        return Ok(false);
                    }
                    return Err(format!("shard {shard} is already being moved (operation {})", op.id));
                }
                if !self.nodes.iter().any(|n| n.id == *to && n.state == NodeState::Active) {
                    return Err(format!("node {to} is not an active node of the cluster"));
                }
                let placement = self.placement_mut(*shard)?;
                let what = group_name(*shard);
                if !placement.voters.contains(from) {
                    return Err(format!("node {from} holds no voting replica of {what} ({:?})", placement.voters));
                }
                if placement.holds(*to) {
                    return Err(format!("node {to} already holds a replica of {what}"));
                }
                placement.learners.push(*to);
                self.last_operation += 1;
                let op = Operation {
                    id: self.last_operation,
                    shard: *shard,
                    from: *from,
                    to: *to,
                    step: Step::Adding,
                    replica: None,
                    leaving: Vec::new(),
                };
                self.operations.push(op);
                self.epoch += 1;
                Ok(true)
            }
            PlacementCommand::MoveReached { id, step, replica, leaving } => {
                let i = self.operations.iter().position(|o| o.id == *id).ok_or_else(|| format!("no operation {id}"))?;
                let op = &mut self.operations[i];
                // A cancel that came while the promotion was already under way loses to it:
                // `Removing` records what happened in the shard. Nothing else follows a cancel.
                let promoted_anyway = op.step == Step::Cancelling && *step == Step::Removing;
                if (op.step == Step::Cancelling && !promoted_anyway) || *step == Step::Cancelling {
                    return Err(format!("operation {id} is being cancelled"));
                }
                if op.step >= *step && !promoted_anyway {
                    return Ok(false);
                }
                op.step = *step;
                if replica.is_some() {
                    op.replica = *replica;
                }
                if !leaving.is_empty() {
                    op.leaving = leaving.clone();
                }
                if *step == Step::Removing {
                    let (group, from, to, left) = (op.shard, op.from, op.to, op.leaving.clone());
                    let p = self.placement_mut(group)?;
                    p.retired.extend(left);
                    p.learners.retain(|n| *n != to);
                    p.voters.retain(|n| *n != from);
                    p.voters.push(to);
                    p.voters.sort_unstable();
                    if p.preferred_leader == from {
                        p.preferred_leader = to;
                    }
                }
                self.epoch += 1;
                Ok(true)
            }
            PlacementCommand::MoveEnded { id } => {
                let Some(i) = self.operations.iter().position(|o| o.id == *id) else { return Ok(false) };
                let op = self.operations.remove(i);
                if op.step != Step::Removing {
                    // Cancelled: the learner is gone, and its id with it.
                    let p = self.placement_mut(op.shard)?;
                    p.learners.retain(|n| *n != op.to);
                    p.retired.extend(op.replica);
                }
                self.epoch += 1;
                Ok(true)
            }
            PlacementCommand::Drain { node } => {
                let n = self.nodes.iter_mut().find(|n| n.id == *node).ok_or_else(|| format!("no node {node}"))?;
                match n.state {
                    NodeState::Draining | NodeState::Lost => Ok(false),
                    NodeState::Removed => Err(format!("node {node} was removed")),
                    NodeState::Active => {
                        n.state = NodeState::Draining;
                        self.epoch += 1;
                        Ok(true)
                    }
                }
            }
            PlacementCommand::MarkLost { node } => {
                let n = self.nodes.iter_mut().find(|n| n.id == *node).ok_or_else(|| format!("no node {node}"))?;
                match n.state {
                    NodeState::Lost => Ok(false),
                    NodeState::Removed => Err(format!("node {node} was removed")),
                    NodeState::Active | NodeState::Draining => {
                        n.state = NodeState::Lost;
                        self.epoch += 1;
                        Ok(true)
                    }
                }
            }
            PlacementCommand::Recommission { node } => {
                let n = self.nodes.iter_mut().find(|n| n.id == *node).ok_or_else(|| format!("no node {node}"))?;
                match n.state {
                    NodeState::Draining => {
                        n.state = NodeState::Active;
                        self.epoch += 1;
                        Ok(true)
                    }
                    NodeState::Active => Ok(false),
                    NodeState::Lost => Err(format!("node {node} lost its disk: `convoy admin replace-node {node}`")),
                    NodeState::Removed => Err(format!("node {node} was removed")),
                }
            }
            PlacementCommand::Rejoined { node } => {
                let n = self.nodes.iter_mut().find(|n| n.id == *node).ok_or_else(|| format!("no node {node}"))?;
                match n.state {
                    NodeState::Lost => {
                        n.state = NodeState::Active;
                        self.epoch += 1;
                        Ok(true)
                    }
                    NodeState::Active | NodeState::Draining => Ok(false),
                    NodeState::Removed => Err(format!("node {node} was removed")),
                }
            }
            PlacementCommand::RemoveNode { node } => {
                if self.holds_replicas(*node) {
                    let held: Vec<u32> = self.shards.iter().filter(|p| p.holds(*node)).map(|p| p.shard).collect();
                    let meta = if self.metadata.holds(*node) { " and the metadata group" } else { "" };
                    return Err(format!(
                        "node {node} still holds replicas of shards {held:?}{meta}: drain it first (the metadata \
                         group moves only to an active node that does not hold it)"
                    ));
                }
                // A move off the node still has to delete its old replica there (`removing`), and
                // one onto it still has to end: either would wait for ever on a removed node.
                if let Some(op) = self.operations.iter().find(|o| o.from == *node || o.to == *node) {
                    return Err(format!(
                        "node {node} is part of operation {} (shard {}, {} → {}): wait until it ends, or cancel it \
                         before it reaches `removing`; a node gone for good is first marked lost (`convoy admin \
                         replace-node {node}`), and the move then skips it",
                        op.id, op.shard, op.from, op.to
                    ));
                }
                let n = self.nodes.iter_mut().find(|n| n.id == *node).ok_or_else(|| format!("no node {node}"))?;
                if n.state == NodeState::Removed {
                    return Ok(false);
                }
                n.state = NodeState::Removed;
                self.epoch += 1;
                Ok(true)
            }
            PlacementCommand::CancelMove { id } => {
                let op =
                    self.operations.iter_mut().find(|o| o.id == *id).ok_or_else(|| format!("no operation {id}"))?;
                match op.step {
                    Step::Cancelling => Ok(false),
                    Step::Removing => Err(format!(
                        "operation {id} cannot be cancelled: node {} already votes in shard {} in place of node {}; \
                         move it back instead",
                        op.to, op.shard, op.from
                    )),
                    Step::Adding | Step::CatchingUp => {
                        op.step = Step::Cancelling;
                        self.epoch += 1;
                        Ok(true)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> NodeEntry {
        NodeEntry {
            id,
            peer_addr: format!("127.0.0.1:{}", 7000 + id),
            client_addr: format!("127.0.0.1:{}", 8000 + id),
            state: NodeState::Active,
        }
    }

    fn init(ids: &[u64], shards: u32) -> PlacementCommand {
        PlacementCommand::Init { nodes: ids.iter().map(|&i| node(i)).collect(), shards }
    }

    #[test]
    fn init_places_every_shard_on_every_node_round_robin_and_only_once() {
        let mut map = ClusterMap::default();
        assert!(!map.is_set());
        assert_eq!(map.apply(&init(&[3, 1, 2, 2], 4)), Ok(true));
        assert_eq!(map.epoch, 1);
        assert_eq!(map.nodes.iter().map(|n| n.id).collect::<Vec<_>>(), vec![1, 2, 3]);
        let preferred: Vec<u64> = map.shards.iter().map(|p| p.preferred_leader).collect();
        assert_eq!(preferred, vec![1, 2, 3, 1]);
        assert!(map.shards.iter().all(|p| p.voters == vec![1, 2, 3]));
        assert_eq!(map.metadata.voters, vec![1, 2, 3]);
        assert_eq!(map.placement(META_SHARD).map(|p| p.shard), Some(META_SHARD));
        assert_eq!(map.shard(3).map(|p| p.shard), Some(3));
        assert_eq!(map.shard(4), None);

        // A second Init (another leader's, after a failover) leaves the map as it is.
        let before = map.clone();
        assert_eq!(map.apply(&init(&[7, 8], 2)), Ok(false));
        assert_eq!(map, before);
    }

    #[test]
    fn the_routing_map_lists_each_shards_voters_preferred_leader_first_and_every_node() {
        let mut map = ClusterMap::default();
        map.apply(&init(&[1, 2, 3], 3)).unwrap();
        map.apply(&PlacementCommand::Register(node(4))).unwrap();
        map.apply(&PlacementCommand::SetPreferredLeader { shard: 0, node: 3 }).unwrap();
        let r = map.routing();
        assert_eq!(r.epoch, map.epoch);
        assert_eq!(
            r.nodes.iter().map(|n| (n.id, n.client_addr.as_str())).collect::<Vec<_>>()[3],
            (4, "127.0.0.1:8004")
        );
        let voters: Vec<Vec<u64>> = r.shards.iter().map(|s| s.voters.clone()).collect();
        assert_eq!(voters, vec![vec![3, 1, 2], vec![2, 1, 3], vec![3, 1, 2]]);
        assert!(r.shards.iter().enumerate().all(|(i, s)| s.shard == i as u32));
        // A learner being added is not a place to route to until it votes.
        map.apply(&PlacementCommand::StartMove { shard: 1, from: 1, to: 4 }).unwrap();
        assert_eq!(map.routing().shards[1].voters, vec![2, 1, 3]);
        assert!(map.routing().epoch > r.epoch);
    }

    #[test]
    fn init_refuses_an_empty_cluster_and_more_shards_than_a_config_allows() {
        let mut map = ClusterMap::default();
        assert!(map.apply(&init(&[], 4)).is_err());
        assert!(map.apply(&init(&[1], 0)).is_err());
        assert!(map.apply(&init(&[1], META_SHARD)).is_err());
        // More than a config can name is refused before anything is built (a map of four
        // billion shards would exhaust every replica's memory at every replay).
        assert!(map.apply(&init(&[1], SHARDS_MAX + 1)).is_err());
        assert_eq!(map, ClusterMap::default());
        assert!(map.apply(&init(&[1], SHARDS_MAX)).is_ok());
    }

    #[test]
    fn a_registered_node_is_active_with_no_replica_and_registering_again_changes_nothing() {
        let mut map = ClusterMap::default();
        assert!(map.apply(&PlacementCommand::Register(node(4))).unwrap_err().contains("not initialized"));
        map.apply(&init(&[1, 2, 3], 2)).unwrap();
        assert_eq!(map.apply(&PlacementCommand::Register(node(5))), Ok(true));
        assert_eq!(map.apply(&PlacementCommand::Register(node(4))), Ok(true));
        assert_eq!(map.epoch, 3);
        assert_eq!(map.nodes.iter().map(|n| n.id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5], "kept in id order");
        assert!(map.shards.iter().all(|p| p.voters == vec![1, 2, 3]), "a new node holds no replica");
        assert!(!map.holds_replicas(4) && map.holds_replicas(3));
        assert!(map.apply(&PlacementCommand::SetPreferredLeader { shard: 0, node: 4 }).is_err());

        // Again, as a restarted node does: no change. A formation member re-registering
        // changes nothing either.
        assert_eq!(map.apply(&PlacementCommand::Register(node(4))), Ok(false));
        assert_eq!(map.apply(&PlacementCommand::Register(node(2))), Ok(false));
        assert_eq!(map.epoch, 3);
        // Moved to other addresses: updated, nothing else.
        let moved = NodeEntry { client_addr: "127.0.0.2:9000".into(), ..node(4) };
        assert_eq!(map.apply(&PlacementCommand::Register(moved.clone())), Ok(true));
        assert_eq!(map.nodes[3], moved);
        assert_eq!(map.epoch, 4);
    }

    #[test]
    fn a_move_goes_forward_step_by_step_and_swaps_the_voter_only_at_removing() {
        let mut map = ClusterMap::default();
        map.apply(&init(&[1, 2, 3], 2)).unwrap();
        map.apply(&PlacementCommand::Register(node(4))).unwrap();
        let start = PlacementCommand::StartMove { shard: 0, from: 1, to: 4 };
        assert_eq!(map.apply(&start), Ok(true));
        let epoch = map.epoch;
        assert_eq!(map.apply(&start), Ok(false), "the same move asked again is the one under way");
        assert_eq!(map.epoch, epoch, "and changes nothing");
        let other = PlacementCommand::StartMove { shard: 0, from: 2, to: 4 };
        assert!(map.apply(&other).unwrap_err().contains("already being moved"), "one move per shard");
        assert_eq!(map.operations.len(), 1);
        let op = map.operation_on(0).cloned().expect("the move");
        assert_eq!((op.id, op.step, op.replica), (1, Step::Adding, None));
        assert_eq!(map.shard(0).unwrap().learners, vec![4]);
        assert!(map.holds_replicas(4));

        let caught =
            PlacementCommand::MoveReached { id: 1, step: Step::CatchingUp, replica: Some(4), leaving: vec![1] };
        assert_eq!(map.apply(&caught), Ok(true));
        assert_eq!(map.apply(&caught), Ok(false), "a step recorded twice (a coordinator that crashed) is no change");
        assert_eq!(map.shard(0).unwrap().voters, vec![1, 2, 3], "no voter changes before the promotion");
        let removing = PlacementCommand::MoveReached { id: 1, step: Step::Removing, replica: None, leaving: vec![] };
        assert_eq!(map.apply(&removing), Ok(true));
        let p = map.shard(0).unwrap();
        assert_eq!((p.voters.clone(), p.learners.clone(), p.preferred_leader), (vec![2, 3, 4], vec![], 4));
        assert_eq!(p.retired, vec![1], "node 1's replica id is retired with the data it held");
        assert_eq!(map.operation_on(0).unwrap().replica, Some(4), "the replica id is kept");
        assert!(map.apply(&PlacementCommand::CancelMove { id: 1 }).unwrap_err().contains("cannot be cancelled"));
        assert_eq!(
            map.apply(&PlacementCommand::MoveReached { id: 1, step: Step::CatchingUp, replica: None, leaving: vec![] }),
            Ok(false)
        );
        assert_eq!(map.apply(&PlacementCommand::MoveEnded { id: 1 }), Ok(true));
        assert_eq!(map.apply(&PlacementCommand::MoveEnded { id: 1 }), Ok(false));
        assert!(map.operations.is_empty());
        assert_eq!(map.shard(0).unwrap().voters, vec![2, 3, 4]);
    }

    #[test]
    fn a_move_is_refused_unless_it_can_be_made_and_a_cancel_leaves_the_shard_as_it_was() {
        let mut map = ClusterMap::default();
        map.apply(&init(&[1, 2, 3], 2)).unwrap();
        map.apply(&PlacementCommand::Register(node(4))).unwrap();
        let before = map.clone();
        for (shard, from, to, says) in [
            (5, 1, 4, "no shard 5"),
            (0, 4, 1, "node 4 holds no voting replica"),
            (0, 1, 2, "node 2 already holds a replica"),
            (0, 1, 9, "node 9 is not an active node"),
        ] {
            let err = map.apply(&PlacementCommand::StartMove { shard, from, to }).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
        assert_eq!(map, before, "refusals change nothing");

        map.apply(&PlacementCommand::StartMove { shard: 1, from: 2, to: 4 }).unwrap();
        map.apply(&PlacementCommand::MoveReached { id: 1, step: Step::CatchingUp, replica: Some(4), leaving: vec![1] })
            .unwrap();
        assert_eq!(map.apply(&PlacementCommand::CancelMove { id: 1 }), Ok(true));
        assert_eq!(map.apply(&PlacementCommand::CancelMove { id: 1 }), Ok(false));
        let again = PlacementCommand::StartMove { shard: 1, from: 2, to: 4 };
        assert!(
            map.apply(&again).unwrap_err().contains("already being moved"),
            "a move being cancelled is not resumed"
        );
        let caught =
            PlacementCommand::MoveReached { id: 1, step: Step::CatchingUp, replica: Some(4), leaving: vec![1] };
        assert!(map.apply(&caught).unwrap_err().contains("being cancelled"), "a cancelled move goes no further");
        let mut raced = map.clone();
        map.apply(&PlacementCommand::MoveEnded { id: 1 }).unwrap();
        assert_eq!(map.shard(1).unwrap().voters, before.shard(1).unwrap().voters, "the shard is as it was");
        assert_eq!(map.shard(1).unwrap().learners, Vec::<u64>::new());
        assert_eq!(map.shard(1).unwrap().retired, vec![4], "the cancelled learner's id is retired");
        assert!(map.operations.is_empty());

        // A promotion already under way when the cancel came is what happened: recorded.
        let promoted = PlacementCommand::MoveReached { id: 1, step: Step::Removing, replica: None, leaving: vec![] };
        assert_eq!(raced.apply(&promoted), Ok(true));
        assert_eq!(raced.shard(1).unwrap().voters, vec![1, 3, 4]);
        assert_eq!(raced.operation_on(1).unwrap().step, Step::Removing);
    }

    #[test]
    fn a_drained_node_takes_no_replica_and_only_an_empty_node_is_removed_for_good() {
        let mut map = ClusterMap::default();
        map.apply(&init(&[1, 2, 3], 1)).unwrap();
        map.apply(&PlacementCommand::Register(node(4))).unwrap();
        map.apply(&PlacementCommand::Register(node(5))).unwrap();
        assert_eq!(map.apply(&PlacementCommand::Drain { node: 4 }), Ok(true));
        assert_eq!(map.apply(&PlacementCommand::Drain { node: 4 }), Ok(false));
        let err = map.apply(&PlacementCommand::StartMove { shard: 0, from: 1, to: 4 }).unwrap_err();
        assert!(err.contains("not an active node"), "{err}");

        let err = map.apply(&PlacementCommand::RemoveNode { node: 3 }).unwrap_err();
        assert!(err.contains("still holds replicas of shards [0] and the metadata group"), "{err}");
        map.apply(&PlacementCommand::StartMove { shard: 0, from: 1, to: 5 }).unwrap();
        let err = map.apply(&PlacementCommand::RemoveNode { node: 5 }).unwrap_err();
        assert!(err.contains("shards [0]"), "a node being given a replica is not empty: {err}");
        assert_eq!(map.apply(&PlacementCommand::RemoveNode { node: 4 }), Ok(true));
        assert_eq!(map.nodes[3].state, NodeState::Removed);
        let err = map.apply(&PlacementCommand::Register(node(4))).unwrap_err();
        assert!(err.contains("not taken again"), "{err}");
        assert!(map.apply(&PlacementCommand::Drain { node: 4 }).is_err());
    }

    #[test]
    fn a_node_is_not_removed_while_a_move_off_it_still_has_to_delete_its_replica() {
        let mut map = ClusterMap::default();
        map.apply(&init(&[1, 2, 3], 1)).unwrap();
        map.apply(&PlacementCommand::Register(node(4))).unwrap();
        map.apply(&PlacementCommand::Register(node(5))).unwrap();
        let move_to = |map: &mut ClusterMap, from: u64, to: u64, end: bool| {
            map.apply(&PlacementCommand::StartMove { shard: 0, from, to }).unwrap();
            let id = map.operation_on(0).expect("the move").id;
            let caught =
                PlacementCommand::MoveReached { id, step: Step::CatchingUp, replica: Some(to), leaving: vec![from] };
            map.apply(&caught).unwrap();
            map.apply(&PlacementCommand::MoveReached { id, step: Step::Removing, replica: None, leaving: vec![] })
                .unwrap();
            if end {
                map.apply(&PlacementCommand::MoveEnded { id }).unwrap();
            }
            id
        };
        move_to(&mut map, 1, 4, true);
        let id = move_to(&mut map, 4, 5, false);
        assert!(!map.holds_replicas(4), "the map no longer places shard 0 on node 4");
        let err = map.apply(&PlacementCommand::RemoveNode { node: 4 }).unwrap_err();
        assert!(
            err.contains(&format!("node 4 is part of operation {id}")),
            "its old replica is still to delete: {err}"
        );
        let err = map.apply(&PlacementCommand::RemoveNode { node: 5 }).unwrap_err();
        assert!(err.contains("still holds replicas"), "{err}");
        map.apply(&PlacementCommand::MoveEnded { id }).unwrap();
        assert_eq!(map.apply(&PlacementCommand::RemoveNode { node: 4 }), Ok(true));
    }

    #[test]
    fn the_metadata_group_moves_like_a_shard_and_then_its_old_node_can_be_removed() {
        let mut map = ClusterMap::default();
        assert_eq!(map.placement(META_SHARD), None, "no placement before the map is set");
        map.apply(&init(&[1, 2, 3], 1)).unwrap();
        map.apply(&PlacementCommand::Register(node(4))).unwrap();
        assert_eq!(map.placement(META_SHARD).map(|p| p.voters.clone()), Some(vec![1, 2, 3]));
        let err = map.apply(&PlacementCommand::StartMove { shard: META_SHARD, from: 4, to: 1 }).unwrap_err();
        assert!(err.contains("node 4 holds no voting replica of the metadata group"), "{err}");
        let err = map.apply(&PlacementCommand::StartMove { shard: META_SHARD, from: 1, to: 2 }).unwrap_err();
        assert!(err.contains("node 2 already holds a replica of the metadata group"), "{err}");

        // Node 1's shard replica moves first; it still holds the metadata group's.
        map.apply(&PlacementCommand::StartMove { shard: 0, from: 1, to: 4 }).unwrap();
        map.apply(&PlacementCommand::MoveReached { id: 1, step: Step::CatchingUp, replica: Some(4), leaving: vec![1] })
            .unwrap();
        map.apply(&PlacementCommand::MoveReached { id: 1, step: Step::Removing, replica: None, leaving: vec![] })
            .unwrap();
        map.apply(&PlacementCommand::MoveEnded { id: 1 }).unwrap();
        let err = map.apply(&PlacementCommand::RemoveNode { node: 1 }).unwrap_err();
        assert!(err.contains("shards [] and the metadata group"), "{err}");

        let start = PlacementCommand::StartMove { shard: META_SHARD, from: 1, to: 4 };
        assert_eq!(map.apply(&start), Ok(true));
        assert_eq!(map.apply(&start), Ok(false));
        assert_eq!(map.metadata.learners, vec![4]);
        assert!(map.holds_replicas(4));
        let id = map.operation_on(META_SHARD).expect("the move").id;
        let caught = PlacementCommand::MoveReached { id, step: Step::CatchingUp, replica: Some(4), leaving: vec![1] };
        map.apply(&caught).unwrap();
        assert_eq!(map.metadata.voters, vec![1, 2, 3], "no voter changes before the promotion");
        map.apply(&PlacementCommand::MoveReached { id, step: Step::Removing, replica: None, leaving: vec![] }).unwrap();
        let meta = map.placement(META_SHARD).unwrap();
        assert_eq!(
            (meta.voters.clone(), meta.learners.clone(), meta.retired.clone()),
            (vec![2, 3, 4], vec![], vec![1])
        );
        assert_eq!(map.shard(0).unwrap().voters, vec![2, 3, 4], "the shards are untouched");
        assert_eq!(map.routing().shards.len(), 1, "the metadata group is not a shard clients route to");
        map.apply(&PlacementCommand::MoveEnded { id }).unwrap();
        assert!(!map.holds_replicas(1));
        assert_eq!(map.apply(&PlacementCommand::RemoveNode { node: 1 }), Ok(true));
    }

    #[test]
    fn a_lost_node_takes_no_replica_but_its_replicas_move_off_it() {
        let mut map = ClusterMap::default();
        map.apply(&init(&[1, 2, 3], 1)).unwrap();
        map.apply(&PlacementCommand::Register(node(4))).unwrap();
        assert_eq!(map.apply(&PlacementCommand::MarkLost { node: 3 }), Ok(true));
        assert_eq!(map.apply(&PlacementCommand::MarkLost { node: 3 }), Ok(false));
        assert_eq!(map.apply(&PlacementCommand::Drain { node: 3 }), Ok(false), "lost stays lost");
        assert_eq!(map.nodes[2].state, NodeState::Lost);
        assert!(map.apply(&PlacementCommand::StartMove { shard: 0, from: 1, to: 3 }).is_err());
        assert_eq!(map.apply(&PlacementCommand::StartMove { shard: 0, from: 3, to: 4 }), Ok(true));
        assert!(map.apply(&PlacementCommand::MarkLost { node: 9 }).unwrap_err().contains("no node 9"));

        // Rebuilt in place: active again, and given replicas again.
        assert_eq!(map.apply(&PlacementCommand::Rejoined { node: 3 }), Ok(true));
        assert_eq!(map.node_state(3), Some(NodeState::Active));
        assert_eq!(map.apply(&PlacementCommand::Rejoined { node: 3 }), Ok(false), "a plain --rejoin changes nothing");
        assert!(map.apply(&PlacementCommand::Rejoined { node: 9 }).is_err());
    }

    #[test]
    fn a_draining_node_is_recommissioned_and_a_lost_one_is_not() {
        let mut map = ClusterMap::default();
        map.apply(&init(&[1, 2, 3], 1)).unwrap();
        map.apply(&PlacementCommand::Register(node(4))).unwrap();
        assert_eq!(map.apply(&PlacementCommand::Recommission { node: 4 }), Ok(false), "active already");
        map.apply(&PlacementCommand::Drain { node: 4 }).unwrap();
        assert!(map.apply(&PlacementCommand::StartMove { shard: 0, from: 1, to: 4 }).is_err(), "draining takes none");
        let epoch = map.epoch;
        assert_eq!(map.apply(&PlacementCommand::Recommission { node: 4 }), Ok(true));
        assert_eq!((map.node_state(4), map.epoch), (Some(NodeState::Active), epoch + 1));
        assert_eq!(map.apply(&PlacementCommand::StartMove { shard: 0, from: 1, to: 4 }), Ok(true));
        map.apply(&PlacementCommand::MarkLost { node: 3 }).unwrap();
        assert!(map.apply(&PlacementCommand::Recommission { node: 3 }).unwrap_err().contains("replace-node"));
        assert!(map.apply(&PlacementCommand::Recommission { node: 9 }).is_err());
    }

    #[test]
    fn a_lost_node_that_holds_nothing_is_active_again_when_it_registers() {
        let mut map = ClusterMap::default();
        map.apply(&init(&[1, 2, 3], 1)).unwrap();
        map.apply(&PlacementCommand::Register(node(4))).unwrap();
        map.apply(&PlacementCommand::MarkLost { node: 4 }).unwrap();
        assert_eq!(map.apply(&PlacementCommand::Register(node(4))), Ok(true));
        assert_eq!(map.node_state(4), Some(NodeState::Active));
        // One that still holds replicas stays lost: it must rebuild them first.
        map.apply(&PlacementCommand::MarkLost { node: 3 }).unwrap();
        assert_eq!(map.apply(&PlacementCommand::Register(node(3))), Ok(false));
        assert_eq!(map.node_state(3), Some(NodeState::Lost));
    }

    #[test]
    fn the_preferred_leader_must_be_a_voter_of_a_known_shard() {
        let mut map = ClusterMap::default();
        let early = map.apply(&PlacementCommand::SetPreferredLeader { shard: 0, node: 1 });
        assert!(early.unwrap_err().contains("not initialized"));
        map.apply(&init(&[1, 2, 3], 2)).unwrap();

        let unknown_shard = map.apply(&PlacementCommand::SetPreferredLeader { shard: 2, node: 1 });
        assert!(unknown_shard.unwrap_err().contains("no shard 2"));
        let not_a_voter = map.apply(&PlacementCommand::SetPreferredLeader { shard: 1, node: 9 });
        assert!(not_a_voter.unwrap_err().contains("node 9 holds no voting replica"));
        assert_eq!(map.epoch, 1);

        assert_eq!(map.apply(&PlacementCommand::SetPreferredLeader { shard: 1, node: 3 }), Ok(true));
        assert_eq!(map.shard(1).unwrap().preferred_leader, 3);
        assert_eq!(map.epoch, 2);
        // Saying it again is no change: the epoch stays.
        assert_eq!(map.apply(&PlacementCommand::SetPreferredLeader { shard: 1, node: 3 }), Ok(false));
        assert_eq!(map.epoch, 2);
    }
}
