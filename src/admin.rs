//! The cluster as an operator sees it: every node's status folded into one view of nodes,
//! shards, replicas, leaders and lag (`convoy admin status`).
//!
//! Each node reports only its own view of every shard ([`NodeStatus`]). A shard's leader is
//! the node that says it leads in the highest term any node reports; the shard's replica set
//! is read from that leader's view, or, with no leader known, from the view of the highest
//! term. A node that did not answer is shown `up: false` and counts no replicas or leaders.
//!
//! Placement (`crate::placement`) comes from the newest cluster map any node reports: each
//! shard's preferred leader, the nodes' states and the map's epoch, with the metadata group's
//! leader found as a shard's is, and the moves in progress with how far each new replica is.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::net::wire::{NodeStatus, ShardStatus};
use crate::placement::{ClusterMap, META_SHARD};

/// What `convoy admin status --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    /// The epoch of the newest cluster map a node reported (0: not initialized yet).
    pub epoch: u64,
    /// The node leading the metadata group, which applies every placement change.
    pub metadata_leader: Option<u64>,
    /// The metadata group as its replicas report it (`shard` is its group id), like a
    /// shard's; `None` when no node answered with one.
    pub metadata: Option<ShardView>,
    pub nodes: Vec<NodeView>,
    pub shards: Vec<ShardView>,
    /// Moves in progress, from the newest map.
    pub operations: Vec<OperationView>,
}

/// A move in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OperationView {
    pub id: u64,
    pub kind: &'static str,
    pub shard: u32,
    pub from: u64,
    pub to: u64,
    /// Its recorded step: `adding`, `catching_up`, `removing` or `cancelling`.
    pub state: &'static str,
    pub progress: Progress,
}

/// How far a move's new replica is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Entries the shard's leader has that the new replica has not matched yet (`None`
    /// before the leader replicates to it).
    pub entries_behind: Option<u64>,
    /// Whether the shard's leader is streaming a snapshot to the new replica now, and the
    /// bytes of that stream so far (or of the last one; 0 before any). Snapshots it streams
    /// to other replicas meanwhile are not counted.
    pub copying: bool,
    pub bytes_copied: Option<u64>,
    /// About the bytes the shard's messages take on the leader's disk: RocksDB's estimate of
    /// flushed, compressed data, so a snapshot streams as much or more.
    pub shard_bytes: Option<u64>,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub id: u64,
    /// Its state in the cluster map: `active`, `draining`, `removed` or `lost`.
    pub state: &'static str,
    /// Whether it answered the status request.
    pub up: bool,
    /// Shards it holds a replica of (voter or learner), in the shards' own views.
    pub replicas: usize,
    /// Shards it leads.
    pub leaders: usize,
    /// Whether it holds a replica of the metadata group (voter or learner), per the map.
    pub metadata: bool,
}

/// One shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardView {
    pub shard: u32,
    /// Nodes of its voting replicas.
    pub replicas: Vec<u64>,
    /// Nodes of its learners.
    pub learners: Vec<u64>,
    pub leader: Option<u64>,
    /// The node that should lead it, per the cluster map; leadership moves there once its
    /// replica has the whole log.
    pub preferred_leader: Option<u64>,
    pub term: u64,
    /// Each replica's lag, from what the nodes that answered report.
    pub lag: Vec<ReplicaLag>,
}

/// How far one replica of a shard is behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaLag {
    pub node: u64,
    /// Log entries the leader has that this replica has not yet matched (the leader's view;
    /// `None` without a leader that answered, or one that does not replicate to it).
    pub entries_behind: Option<u64>,
    /// Entries this replica holds but has not applied yet (its own view; `None` if it did
    /// not answer).
    pub unapplied: Option<u64>,
}

/// Folds every configured node's status (`None`: it did not answer) into one view.
pub fn cluster_view(statuses: &[(u64, Option<NodeStatus>)]) -> ClusterView {
    let map = &newest_map(statuses);
    let meta: Vec<(u64, &ShardStatus)> =
        statuses.iter().filter_map(|(node, s)| Some((*node, s.as_ref()?.meta.as_ref()?))).collect();
    let mut per_shard: BTreeMap<u32, Vec<(u64, &ShardStatus)>> = BTreeMap::new();
    for (node, status) in statuses {
        for s in status.iter().flat_map(|s| &s.shards) {
            per_shard.entry(s.shard).or_default().push((*node, s));
        }
    }
    let shards: Vec<ShardView> = per_shard.into_iter().map(|(shard, views)| group_view(map, shard, &views)).collect();
    // The metadata group's own view: the progress of a move of it.
    let meta_view = (!meta.is_empty()).then(|| group_view(map, META_SHARD, &meta));
    let metadata_leader = meta_view.as_ref().and_then(|v| v.leader);
    let nodes = statuses
        .iter()
        .map(|(id, status)| {
            let up = status.is_some();
            let holds = |s: &&ShardView| s.replicas.contains(id) || s.learners.contains(id);
            NodeView {
                id: *id,
                state: map.nodes.iter().find(|n| n.id == *id).map_or("active", |n| n.state.as_str()),
                up,
                replicas: if up { shards.iter().filter(holds).count() } else { 0 },
                leaders: shards.iter().filter(|s| s.leader == Some(*id)).count(),
                metadata: map.metadata.holds(*id),
            }
        })
        .collect();
    let operations = map
        .operations
        .iter()
        .map(|op| {
            let shard = shards.iter().chain(&meta_view).find(|s| s.shard == op.shard);
            let lag = shard.and_then(|s| s.lag.iter().find(|l| l.node == op.to));
            // Snapshots stream from the leader: its view of the shard has the copy's bytes.
            let on_leader = shard.and_then(|s| s.leader).and_then(|l| {
                let (_, status) = statuses.iter().find(|(id, _)| *id == l)?;
                let status = status.as_ref()?;
                status.shards.iter().chain(&status.meta).find(|x| x.shard == op.shard)
            });
            // The copy to the move's new replica (its latest, should the node have held
            // the shard before): a snapshot the leader streams to another replica meanwhile
            // (a voter back from downtime) is not the move's.
            let copy = on_leader
                .and_then(|s| s.snapshots.iter().filter(|c| c.node == op.to).max_by_key(|c| (c.sending, c.replica)));
            OperationView {
                id: op.id,
                kind: "move",
                shard: op.shard,
                from: op.from,
                to: op.to,
                state: op.step.as_str(),
                progress: Progress {
                    entries_behind: lag.and_then(|l| l.entries_behind),
                    copying: copy.is_some_and(|c| c.sending),
                    bytes_copied: on_leader.map(|_| copy.map_or(0, |c| c.bytes_sent)),
                    shard_bytes: on_leader.map(|s| s.data_bytes),
                },
            }
        })
        .collect();
    ClusterView { epoch: map.epoch, metadata_leader, metadata: meta_view, nodes, shards, operations }
}

/// One group's view from the nodes' views of it (at least one): its leader, replicas and
/// each replica's lag.
fn group_view(map: &ClusterMap, shard: u32, views: &[(u64, &ShardStatus)]) -> ShardView {
    let (leader, basis) = leader_of(views);
    let mut members: Vec<u64> = basis.voters.iter().chain(&basis.learners).copied().collect();
    members.sort_unstable();
    members.dedup();
    let lag = members
        .iter()
        .map(|node| {
            // The leader's replication map covers every other voter and learner.
            let entries_behind = leader.and_then(|l| {
                if *node == l {
                    Some(0)
                } else {
                    basis.followers.iter().find(|f| f.node == *node).map(|f| f.entries)
                }
            });
            let own = views.iter().find(|(n, _)| n == node).map(|(_, s)| *s);
            let unapplied =
                own.map(|s| s.last_log_index.unwrap_or(0).saturating_sub(s.last_applied_index.unwrap_or(0)));
            ReplicaLag { node: *node, entries_behind, unapplied }
        })
        .collect();
    ShardView {
        shard,
        replicas: basis.voters.clone(),
        learners: basis.learners.clone(),
        leader,
        preferred_leader: map.placement(shard).map(|p| p.preferred_leader),
        term: basis.term,
        lag,
    }
}

/// The newest cluster map the nodes report (empty if none has one). A map whose shards are
/// not listed in order (`shards[i]` is shard `i`, as every map a node builds) is not one a
/// node made: it is passed over, since the planners index shards by number.
pub fn newest_map(statuses: &[(u64, Option<NodeStatus>)]) -> ClusterMap {
    statuses
        .iter()
        .flat_map(|(_, s)| s.iter())
        .map(|s| &s.placement)
        .filter(|m| m.shards.iter().enumerate().all(|(i, p)| p.shard as usize == i))
        .max_by_key(|m| m.epoch)
        .cloned()
        .unwrap_or_default()
}

/// One step of a drain's or a rebalance's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Move `shard`'s replica on `from` to `to`.
    Move { shard: u32, from: u64, to: u64 },
    /// Make `node` the shard's preferred leader.
    Prefer { shard: u32, node: u64 },
}

/// Replicas per node of `nodes` in `map`, voters and learners alike.
fn replica_counts(map: &ClusterMap, nodes: &[u64]) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for p in &map.shards {
        for n in p.voters.iter().chain(&p.learners) {
            if let Some(c) = counts.get_mut(n) {
                *c += 1;
            }
        }
    }
    counts
}

fn active_nodes(map: &ClusterMap) -> Vec<u64> {
    map.nodes.iter().filter(|n| n.state == crate::placement::NodeState::Active).map(|n| n.id).collect()
}

/// Applies a planned move to a copy of the map, as if done.
fn simulate(map: &mut ClusterMap, shard: u32, from: u64, to: u64) {
    let p = if shard == META_SHARD { &mut map.metadata } else { &mut map.shards[shard as usize] };
    p.voters.retain(|n| *n != from);
    p.voters.push(to);
    p.voters.sort_unstable();
    if p.preferred_leader == from {
        p.preferred_leader = to;
    }
}

/// The moves that empty `node` (`convoy admin drain`): each shard it holds goes to the
/// active node not holding it with the fewest replicas, planned ones counted (ties: the
/// lower id). A shard being moved already is left to that move.
pub fn plan_drain(map: &ClusterMap, node: u64) -> Result<Vec<Action>, String> {
    let mut sim = map.clone();
    let targets: Vec<u64> = active_nodes(map).into_iter().filter(|n| *n != node).collect();
    let mut plan = Vec::new();
    for shard in 0..map.shards.len() as u32 {
        let p = &sim.shards[shard as usize];
        if !p.voters.contains(&node) || map.operation_on(shard).is_some() {
            continue;
        }
        let counts = replica_counts(&sim, &targets);
        let to = targets
            .iter()
            .filter(|t| !p.voters.contains(t) && !p.learners.contains(t))
            .min_by_key(|t| (counts[t], **t))
            .copied()
            .ok_or_else(|| format!("no active node without a replica of shard {shard} can take it from node {node}"))?;
        simulate(&mut sim, shard, node, to);
        plan.push(Action::Move { shard, from: node, to });
    }
    // The metadata group's replica goes too, when an active node without one can take it:
    // the one with the fewest replicas after the shards' moves (ties: the lower id).
    // Otherwise it stays (a cluster of three keeps it on all three), and the node cannot be
    // removed until a node is added.
    let meta = &map.metadata;
    if map.is_set() && meta.voters.contains(&node) && map.operation_on(META_SHARD).is_none() {
        let counts = replica_counts(&sim, &targets);
        if let Some(to) = targets.iter().filter(|t| !meta.holds(**t)).min_by_key(|t| (counts[t], **t)).copied() {
            plan.push(Action::Move { shard: META_SHARD, from: node, to });
        }
    }
    Ok(plan)
}

/// Whether `node` holds a replica of the metadata group that no active node can take from
/// it (every active node has one already): a drain leaves it there.
pub fn keeps_metadata(map: &ClusterMap, node: u64) -> bool {
    map.metadata.voters.contains(&node) && !active_nodes(map).iter().any(|n| *n != node && !map.metadata.holds(*n))
}

/// The moves that even out replicas over the active nodes (until the most and the least
/// loaded differ by at most one), from the most loaded to the least; shards being moved are
/// left alone, and a shard moves once per plan (the map runs one move per shard at a time):
/// `rebalance --wait` plans again once a plan's moves are done. Then, on the placement those moves reach, the preferred leaders that even out
/// leadership: each shard to the voter leading the fewest so far, keeping its preferred
/// leader on a tie. A `Prefer` for a shard a planned move changes needs that move done first.
pub fn plan_rebalance(map: &ClusterMap) -> Vec<Action> {
    let mut sim = map.clone();
    let active = active_nodes(map);
    let mut plan = Vec::new();
    let mut moved: Vec<u32> = Vec::new();
    loop {
        let counts = replica_counts(&sim, &active);
        let mut by_load: Vec<(usize, u64)> = counts.iter().map(|(n, c)| (*c, *n)).collect();
        by_load.sort_unstable_by_key(|(c, n)| (std::cmp::Reverse(*c), *n));
        // The most loaded node that can hand a shard to a node two or more below it, and the
        // least loaded such node; one move per shard (the map runs one at a time).
        let found = by_load.iter().find_map(|&(high, from)| {
            by_load.iter().rev().filter(|&&(low, _)| high > low + 1).find_map(|&(_, to)| {
                let shard = sim.shards.iter().map(|p| p.shard).find(|&s| {
                    let p = &sim.shards[s as usize];
                    p.voters.contains(&from)
                        && !p.voters.contains(&to)
                        && !p.learners.contains(&to)
                        && map.operation_on(s).is_none()
                        && !moved.contains(&s)
                })?;
                Some((shard, from, to))
            })
        });
        let Some((shard, from, to)) = found else { break };
        simulate(&mut sim, shard, from, to);
        moved.push(shard);
        plan.push(Action::Move { shard, from, to });
    }
    let mut leads: BTreeMap<u64, usize> = active.iter().map(|n| (*n, 0)).collect();
    for p in &sim.shards {
        let candidates: Vec<u64> = p.voters.iter().copied().filter(|v| leads.contains_key(v)).collect();
        let Some(&fewest) = candidates.iter().map(|v| &leads[v]).min() else { continue };
        let node = if leads.get(&p.preferred_leader) == Some(&fewest) {
            p.preferred_leader
        } else {
            *candidates.iter().find(|v| leads[v] == fewest).expect("a candidate has the fewest")
        };
        *leads.get_mut(&node).expect("an active node") += 1;
        if node != p.preferred_leader {
            plan.push(Action::Prefer { shard: p.shard, node });
        }
    }
    plan
}

/// A group's leader from the nodes' views of it (at least one): the node that says it leads
/// in the highest term any reports, and the view to read the group's replicas from (that
/// leader's, or with none, the one of the highest term).
fn leader_of<'a>(views: &[(u64, &'a ShardStatus)]) -> (Option<u64>, &'a ShardStatus) {
    let leading =
        views.iter().filter(|(node, s)| s.leader == Some(*node) && s.role == "Leader").max_by_key(|(_, s)| s.term);
    let newest = views.iter().max_by_key(|(_, s)| s.term).expect("a group has at least one view");
    match leading {
        Some((node, s)) => (Some(*node), *s),
        None => (None, newest.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::wire::FollowerLag;

    fn shard(shard: u32, node: u64, leader: Option<u64>, term: u64, followers: Vec<FollowerLag>) -> ShardStatus {
        ShardStatus {
            shard,
            leader,
            replica: node,
            term,
            role: if leader == Some(node) { "Leader" } else { "Follower" }.into(),
            last_log_index: Some(100),
            last_applied_index: Some(97),
            voters: vec![1, 2, 3],
            learners: Vec::new(),
            followers,
            ..ShardStatus::default()
        }
    }

    fn node(id: u64, shards: Vec<ShardStatus>) -> NodeStatus {
        NodeStatus { node_id: id, shards, ..NodeStatus::default() }
    }

    #[test]
    fn leaders_replicas_and_lag_come_from_the_leaders_view() {
        let lag = |node, entries| FollowerLag { node, entries, lagging: false };
        let statuses = vec![
            (
                1,
                Some(node(
                    1,
                    vec![shard(0, 1, Some(1), 4, vec![lag(2, 0), lag(3, 40)]), shard(1, 1, Some(2), 2, vec![])],
                )),
            ),
            (
                2,
                Some(node(
                    2,
                    vec![shard(0, 2, Some(1), 4, vec![]), shard(1, 2, Some(2), 2, vec![lag(1, 0), lag(3, 7)])],
                )),
            ),
            (3, None),
        ];
        let v = cluster_view(&statuses);
        assert_eq!(v.shards.len(), 2);
        assert_eq!(v.shards[0].leader, Some(1));
        assert_eq!(v.shards[1].leader, Some(2));
        assert_eq!(v.shards[0].replicas, vec![1, 2, 3]);
        let behind: Vec<Option<u64>> = v.shards[0].lag.iter().map(|l| l.entries_behind).collect();
        assert_eq!(behind, vec![Some(0), Some(0), Some(40)]);
        let unapplied: Vec<Option<u64>> = v.shards[1].lag.iter().map(|l| l.unapplied).collect();
        assert_eq!(unapplied, vec![Some(3), Some(3), None], "node 3 did not answer");
        let counts: Vec<(u64, bool, usize, usize)> =
            v.nodes.iter().map(|n| (n.id, n.up, n.replicas, n.leaders)).collect();
        assert_eq!(counts, vec![(1, true, 2, 1), (2, true, 2, 1), (3, false, 0, 0)]);
        assert!(v.operations.is_empty());
    }

    #[test]
    fn placement_comes_from_the_newest_map_and_the_metadata_leader_as_a_shards_would() {
        use crate::placement::{NodeEntry, NodeState, PlacementCommand};
        let entry =
            |id| NodeEntry { id, peer_addr: String::new(), client_addr: String::new(), state: NodeState::Active };
        let mut old = ClusterMap::default();
        old.apply(&PlacementCommand::Init { nodes: vec![entry(1), entry(2)], shards: 1 }).unwrap();
        let mut new = old.clone();
        new.apply(&PlacementCommand::SetPreferredLeader { shard: 0, node: 2 }).unwrap();
        let mut n1 = node(1, vec![shard(0, 1, Some(1), 3, vec![])]);
        n1.placement = new;
        n1.meta = Some(shard(META_SHARD, 1, Some(2), 7, vec![]));
        let mut n2 = node(2, vec![shard(0, 2, Some(1), 3, vec![])]);
        n2.placement = old;
        n2.meta = Some(shard(META_SHARD, 2, Some(2), 7, vec![]));
        let v = cluster_view(&[(1, Some(n1)), (2, Some(n2)), (3, None)]);
        assert_eq!(v.epoch, 2, "the newer map wins whichever node reports it");
        assert_eq!(v.shards[0].preferred_leader, Some(2));
        assert_eq!(v.shards[0].leader, Some(1));
        assert_eq!(v.metadata_leader, Some(2));
        assert_eq!(v.nodes.iter().map(|n| n.state).collect::<Vec<_>>(), vec!["active"; 3]);

        let none = cluster_view(&[(1, None)]);
        assert_eq!((none.epoch, none.metadata_leader), (0, None));

        // A map whose shards are out of order (no node makes one) is passed over: the
        // planners index shards by number.
        let mut odd = node(3, vec![]);
        odd.placement = map_of(&[1, 2, 3], &[1, 2, 3], 2);
        odd.placement.epoch = 99;
        odd.placement.shards[0].shard = 9000;
        let mut good = node(1, vec![shard(0, 1, Some(1), 3, vec![])]);
        good.placement = map_of(&[1, 2, 3], &[1, 2, 3], 2);
        let map = newest_map(&[(1, Some(good)), (3, Some(odd))]);
        assert!(map.epoch < 99 && map.shards.iter().map(|p| p.shard).eq([0, 1]), "{map:?}");
    }

    #[test]
    fn a_moves_progress_counts_only_the_snapshot_to_its_new_replica() {
        use crate::net::wire::SnapshotCopyStatus;
        use crate::placement::PlacementCommand;
        let mut map = map_of(&[1, 2, 3, 4], &[1, 2, 3], 1);
        map.apply(&PlacementCommand::StartMove { shard: 0, from: 3, to: 4 }).unwrap();
        let copy = |node, replica, sending, bytes_sent| SnapshotCopyStatus { node, replica, sending, bytes_sent };
        let view = |snapshots: Vec<SnapshotCopyStatus>| {
            let mut leading = shard(0, 1, Some(1), 3, vec![]);
            leading.snapshots = snapshots;
            let mut n1 = node(1, vec![leading]);
            n1.placement = map.clone();
            let v = cluster_view(&[(1, Some(n1)), (2, Some(node(2, vec![shard(0, 2, Some(1), 3, vec![])])))]);
            assert_eq!(v.operations.len(), 1);
            v.operations[0].progress.clone()
        };
        // Node 2 was down while its log was purged: the leader streams it a snapshot at full
        // speed. That is not the move's copy, which has not started.
        let p = view(vec![copy(2, 2, true, 1 << 20)]);
        assert_eq!((p.copying, p.bytes_copied), (false, Some(0)));
        // The move's copy, beside it; an earlier generation of node 4's replica sent more.
        let gen = 1u64 << 32;
        let p = view(vec![copy(2, 2, true, 1 << 20), copy(4, 4, false, 900_000), copy(4, gen | 4, true, 50_000)]);
        assert_eq!((p.copying, p.bytes_copied), (true, Some(50_000)));
        // Once it ended, its bytes stay shown.
        let p = view(vec![copy(4, 4, false, 900_000), copy(4, gen | 4, false, 80_000)]);
        assert_eq!((p.copying, p.bytes_copied), (false, Some(80_000)));
    }

    fn map_of(nodes: &[u64], holding: &[u64], shards: u32) -> ClusterMap {
        use crate::placement::{NodeEntry, NodeState, PlacementCommand};
        let entry =
            |id| NodeEntry { id, peer_addr: String::new(), client_addr: String::new(), state: NodeState::Active };
        let mut map = ClusterMap::default();
        map.apply(&PlacementCommand::Init { nodes: holding.iter().map(|&n| entry(n)).collect(), shards }).unwrap();
        for &n in nodes.iter().filter(|n| !holding.contains(n)) {
            map.apply(&PlacementCommand::Register(entry(n))).unwrap();
        }
        map
    }

    /// Applies a plan as the coordinator would, moves first.
    fn carry_out(map: &mut ClusterMap, plan: &[Action]) {
        for a in plan {
            match a {
                Action::Move { shard, from, to } => simulate(map, *shard, *from, *to),
                Action::Prefer { shard, node } => map.shards[*shard as usize].preferred_leader = *node,
            }
        }
    }

    #[test]
    fn rebalancing_onto_two_new_nodes_then_draining_one_spreads_replicas_and_leaders() {
        use crate::placement::PlacementCommand;
        // The walk-through: 3 nodes hold 8 shards; nodes 4 and 5 join.
        let mut map = map_of(&[1, 2, 3, 4, 5], &[1, 2, 3], 8);
        // In waves, as `rebalance --wait` runs them: a shard moves once per wave.
        for wave in 0.. {
            let plan = plan_rebalance(&map);
            if plan.is_empty() {
                break;
            }
            assert!(wave < 3, "a rebalance converges in a few waves: {plan:?}");
            carry_out(&mut map, &plan);
        }
        let counts = replica_counts(&map, &[1, 2, 3, 4, 5]);
        assert!(counts.values().all(|c| (4..=5).contains(c)), "24 replicas over 5 nodes: {counts:?}");
        assert!(map.shards.iter().all(|p| p.voters.len() == 3 && p.voters.contains(&p.preferred_leader)));
        let mut leads: BTreeMap<u64, usize> = BTreeMap::new();
        for p in &map.shards {
            *leads.entry(p.preferred_leader).or_default() += 1;
        }
        assert!(leads.values().all(|l| (1..=2).contains(l)) && leads.len() == 5, "{leads:?}");
        assert!(plan_rebalance(&map).is_empty(), "a balanced cluster needs nothing");

        map.apply(&PlacementCommand::Drain { node: 1 }).unwrap();
        let plan = plan_drain(&map, 1).expect("a plan");
        assert!(plan.iter().all(|a| matches!(a, Action::Move { from: 1, .. })));
        let meta_to = plan.iter().find_map(|a| match a {
            Action::Move { shard: META_SHARD, to, .. } => Some(*to),
            _ => None,
        });
        assert!(matches!(meta_to, Some(4 | 5)), "the metadata replica goes to a node without one: {plan:?}");
        assert_eq!(plan.last(), Some(&Action::Move { shard: META_SHARD, from: 1, to: meta_to.unwrap() }), "last");
        carry_out(&mut map, &plan);
        assert!(!map.holds_replicas(1) && !keeps_metadata(&map, 1));
        assert!(plan_drain(&map, 1).expect("nothing left").is_empty());
        let counts = replica_counts(&map, &[1, 2, 3, 4, 5]);
        assert_eq!(counts[&1], 0, "{counts:?}");
        assert!([2, 3, 4, 5].iter().all(|n| (5..=7).contains(&counts[n])), "24 replicas over 4 nodes: {counts:?}");
        let plan = plan_rebalance(&map);
        carry_out(&mut map, &plan);
        let mut leads: BTreeMap<u64, usize> = BTreeMap::new();
        for p in &map.shards {
            *leads.entry(p.preferred_leader).or_default() += 1;
        }
        assert_eq!(leads.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4, 5], "every node but 1 leads: {leads:?}");
    }

    #[test]
    fn a_metadata_replica_stays_where_no_active_node_can_take_it() {
        use crate::placement::PlacementCommand;
        // Node 4 holds nothing, but is draining: no active node is without a metadata replica.
        let mut map = map_of(&[1, 2, 3, 4, 5], &[1, 2, 3], 1);
        map.apply(&PlacementCommand::Drain { node: 4 }).unwrap();
        map.apply(&PlacementCommand::Drain { node: 3 }).unwrap();
        let plan = plan_drain(&map, 3).expect("a plan");
        assert_eq!(
            plan,
            vec![Action::Move { shard: 0, from: 3, to: 5 }, Action::Move { shard: META_SHARD, from: 3, to: 5 }]
        );
        assert!(!keeps_metadata(&map, 3), "node 5 can take it");
        carry_out(&mut map, &plan);
        map.apply(&PlacementCommand::Drain { node: 2 }).unwrap();
        let plan = plan_drain(&map, 2).unwrap_err();
        assert!(plan.contains("no active node without a replica of shard 0"), "{plan}");
        // Nodes 1 and 5 hold it, 4 is draining: node 2 keeps its replica.
        assert!(keeps_metadata(&map, 2));
        assert!(!keeps_metadata(&map, 4), "node 4 holds none");
    }

    #[test]
    fn a_drain_with_nowhere_to_go_says_so() {
        let map = map_of(&[1, 2, 3], &[1, 2, 3], 2);
        let err = plan_drain(&map, 1).unwrap_err();
        assert!(err.contains("no active node without a replica of shard 0"), "{err}");
    }

    #[test]
    fn a_stale_leader_claim_loses_to_a_newer_term() {
        // Node 1 still believes it leads in term 3; node 2 leads in term 5.
        let statuses = vec![
            (1, Some(node(1, vec![shard(0, 1, Some(1), 3, vec![])]))),
            (2, Some(node(2, vec![shard(0, 2, Some(2), 5, vec![])]))),
        ];
        let v = cluster_view(&statuses);
        assert_eq!(v.shards[0].leader, Some(2));
        assert_eq!(v.shards[0].term, 5);
        assert_eq!(v.nodes.iter().map(|n| n.leaders).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn without_a_leader_the_newest_view_gives_the_replicas_and_no_one_is_behind_by_a_known_amount() {
        let mut s = shard(0, 1, None, 6, vec![]);
        s.voters = vec![1, 2];
        s.learners = vec![3];
        let statuses = vec![(1, Some(node(1, vec![s]))), (2, Some(node(2, vec![shard(0, 2, None, 2, vec![])])))];
        let v = cluster_view(&statuses);
        assert_eq!(v.shards[0].leader, None);
        assert_eq!(v.shards[0].replicas, vec![1, 2]);
        assert_eq!(v.shards[0].learners, vec![3]);
        assert!(v.shards[0].lag.iter().all(|l| l.entries_behind.is_none()));
        assert_eq!(v.nodes.iter().map(|n| n.replicas).collect::<Vec<_>>(), vec![1, 1]);
    }
}
