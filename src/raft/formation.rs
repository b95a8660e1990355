//! Who may take part in the groups: forming a brand-new cluster once, refusing a node that
//! lost its state, and bringing such a node back as new replicas.
//!
//! Each node keeps a [`ClusterRecord`] (written with fsync) next to its data. A node without
//! one has no state. At start ([`settle`]) it asks its peers for theirs ([`PeerRequest::Hello`]):
//!
//! - **A brand-new cluster** forms in two steps. The bootstrapper (the lowest node id) waits
//!   until every peer answers with no record (or with its own cluster id, prepared), draws a
//!   cluster id, records it as `Prepared` and sends [`PeerRequest::Prepare`] to every peer,
//!   which records it too. Only when every node has it does the bootstrapper record `Formed`
//!   and initialize the groups with every node's original replica as voter; the others follow
//!   when they see a `Formed` peer. So no node without a record ever sees a `Formed` peer
//!   during a legitimate formation.
//! - **A node without state, when a peer is `Formed`**, lost its data directory (or was never
//!   part of the cluster). It must not vote as the replica it was: its empty log would vote
//!   for any candidate and could complete a quorum without an acknowledged entry. It refuses
//!   to start and says what to run, unless started with `--rejoin`.
//! - **`--rejoin`** brings it back as new replicas: for each shard it votes in it asks the
//!   leader for a new replica id ([`PeerRequest::Join`]; the generation above every one of
//!   this node's ids in the group's membership, so an id is never reused; a shard whose group
//!   holds no voter of the node is refused for good, [`PeerResponse::NotRejoined`]), starts
//!   the group under it as a
//!   learner, and once the leader sees it caught up, the leader replaces the node's old
//!   replica among the voters ([`PeerRequest::Promote`]). The record says `Rejoining` until
//!   every shard is done, so a crash halfway resumes rather than starting a shard under the
//!   node's original id.
//!
//! A node whose peers are all unreachable waits: it never decides alone that the cluster is
//! new.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};

use super::meta::Placed;
use super::network::{Hosted, PeerNet};
use super::rpc::{PeerRequest, PeerResponse};
use super::types::{generation_of, node_of, replica_id, Member, NodeId};
use crate::chat::ShardId;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::placement::{ClusterMap, NodeEntry, NodeState, PlacementCommand};
use crate::store::codec::{decode, encode};
use crate::store::keys::{left_key, replica_key, CLUSTER_KEY};
use crate::store::Store;

/// How often a starting node asks its peers again.
pub const HELLO_INTERVAL: Duration = Duration::from_millis(500);
/// Time allowed for one formation RPC.
pub const CONTROL_TTL: Duration = Duration::from_secs(5);
/// Rounds a starting node without state waits for a formed cluster's map before deciding
/// without it (a cluster formed by a build without the metadata group has none).
const MAP_WAITS_MAX: u32 = 40;
/// How long a node without state waits for a member of an existing cluster to answer when
/// its file cannot form a new one (it lists more nodes than `replication_factor`): it is
/// either a node added to a cluster whose members are down, or a new cluster's file that is
/// wrong, which the first node refuses at once.
pub const NO_CLUSTER_WAIT: Duration = Duration::from_secs(30);
/// Time allowed for a `Promote`, which waits for the new replica to catch up.
pub const PROMOTE_TTL: Duration = Duration::from_secs(300);

/// Where a node stands in its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Holds the cluster id of a formation under way; takes part in no group yet.
    Prepared,
    /// Joining every group as new replicas (see the module doc).
    Rejoining,
    /// A member: runs every group under its recorded replica ids.
    Formed,
    /// Added to the cluster after it formed (registered in the cluster map): runs no group
    /// until shards are placed on it.
    Added,
}

/// A node's durable record of its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub cluster: u64,
    pub node: NodeId,
    pub stage: Stage,
}

/// The node's record, shared by the start-up and the peer server.
pub struct Formation {
    store: Store,
    node: NodeId,
    record: Mutex<Option<ClusterRecord>>,
}

/// How a node's groups start, as [`settle`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Already a member: start every group under its replica ids.
    Member,
    /// This node formed the cluster just now: start the groups and initialize them.
    Bootstrap,
    /// Rejoin every group as a new replica.
    Rejoin,
    /// Added after formation: no group to start.
    Added,
}

impl Formation {
    /// Reads the node's record. A store that holds Raft state but no record predates
    /// records: it is a member under its original replica ids (recorded as cluster 0). A
    /// store without either has no state, however it was created (a refused start creates an
    /// empty database).
    pub fn load(store: Store, node: NodeId) -> Result<Arc<Formation>> {
        let mut record: Option<ClusterRecord> = store.db.get(CLUSTER_KEY)?.map(|v| decode(&v)).transpose()?;
        if record.is_none() && store.has_raft_state()? {
            let legacy = ClusterRecord { cluster: 0, node, stage: Stage::Formed };
            write_record(&store, &legacy)?;
            record = Some(legacy);
        }
        if let Some(r) = record {
            if r.node != node {
                return Err(Error::Config(format!(
                    "this data directory belongs to node {}, not node {node}: check --id and data_dir",
                    r.node
                )));
            }
        }
        Ok(Arc::new(Formation { store, node, record: Mutex::new(record) }))
    }

    pub fn record(&self) -> Option<ClusterRecord> {
        *self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, record: ClusterRecord) -> Result<()> {
        write_record(&self.store, &record)?;
        *self.record.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
        Ok(())
    }

    /// A `Prepare` from the bootstrapper: a node without a record takes the cluster id; one
    /// with a record answers with it unchanged (the bootstrapper sees any conflict).
    pub async fn prepare(self: &Arc<Self>, cluster: u64) -> Result<ClusterRecord> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = this.record.lock().unwrap_or_else(|p| p.into_inner());
            match *guard {
                Some(r) => Ok(r),
                None => {
                    let r = ClusterRecord { cluster, node: this.node, stage: Stage::Prepared };
                    write_record(&this.store, &r)?;
                    *guard = Some(r);
                    tracing::info!(cluster = format_args!("{cluster:016x}"), "prepared to form a new cluster");
                    Ok(r)
                }
            }
        })
        .await
        .map_err(Error::task("recording the cluster"))?
    }

    /// The cluster map as this node's replica of the metadata group applied it (empty if it
    /// has none).
    pub fn cluster_map(&self) -> Result<ClusterMap> {
        super::state_machine::cluster_map(&self.store)
    }

    /// The replica id recorded for `shard` in `store` ([`DROPPED`] once the node left it).
    pub fn recorded_replica(store: &Store, shard: ShardId) -> Result<Option<NodeId>> {
        Ok(store.db.get(replica_key(shard))?.map(|v| decode(&v)).transpose()?)
    }

    /// This node's replica id in `shard`'s group, if it has one.
    pub fn replica(&self, shard: ShardId) -> Result<Option<NodeId>> {
        Ok(self.store.db.get(replica_key(shard))?.map(|v| decode(&v)).transpose()?)
    }

    fn set_replica(&self, shard: ShardId, replica: NodeId) -> Result<()> {
        record_replica(&self.store, shard, replica)
    }
}

/// Recorded as a shard's replica id on a node that left the shard: it does not run the
/// shard's group at start (a replica id never reaches it: generations are 32 bits).
pub const DROPPED: NodeId = u64::MAX;

/// Records `replica` as this node's replica id in `shard`'s group (with fsync), before the
/// group starts under it: a restart runs it under the same id. [`DROPPED`] once it left.
pub fn record_replica(store: &Store, shard: ShardId, replica: NodeId) -> Result<()> {
    let mut b = rocksdb::WriteBatch::default();
    b.put(replica_key(shard), encode(&replica));
    store.write_sync(b)
}

/// Records `replica` as the last of `shard` this node left (deleted, or lost with its disk):
/// the node starts no replica of the shard that is not newer (`Service::host`).
pub fn record_left(store: &Store, shard: ShardId, replica: NodeId) -> Result<()> {
    let mut b = rocksdb::WriteBatch::default();
    b.put(left_key(shard), encode(&replica));
    store.write_sync(b)
}

/// [`record_left`], unless a newer replica of `shard` is recorded as left already.
fn record_left_if_newer(store: &Store, shard: ShardId, replica: NodeId) -> Result<()> {
    let left: Option<NodeId> = store.db.get(left_key(shard))?.map(|v| decode(&v)).transpose()?;
    if left.is_some_and(|l| generation_of(l) >= generation_of(replica)) {
        return Ok(());
    }
    record_left(store, shard, replica)
}

fn write_record(store: &Store, record: &ClusterRecord) -> Result<()> {
    let mut b = rocksdb::WriteBatch::default();
    b.put(CLUSTER_KEY, encode(record));
    store.write_sync(b)
}

/// What to tell the operator of a node that lost its state.
pub fn refusal_text(config_path: &std::path::Path, node: NodeId, cluster: u64) -> String {
    let config_path = config_path.display();
    format!(
        "node {node} has no state, but cluster {cluster:016x} lists it as a voter: it must not vote \
         under the replica ids it had, whose votes and log it lost. Rebuild it as new replicas: \
         run `convoy admin replace-node {node} --in-place --wait` and start it again (or start it \
         with `convoy node --config {config_path} --id {node} --rejoin`); it joins every shard it \
         votes in as a learner and replaces its old replica among the voters once caught up. A majority of \
         the other nodes must be up."
    )
}

/// Decides how this node's groups start, talking to its peers until it can (see the module
/// doc). Returns an error — the node must not start — when it has no state but the cluster
/// exists and `rejoin` is off.
pub async fn settle(formation: &Arc<Formation>, net: &PeerNet, config: &Config, rejoin: bool) -> Result<Start> {
    let me = formation.node;
    let peers: Vec<NodeId> = config.node_ids().into_iter().filter(|&n| n != me).collect();
    let bootstrapper = config.node_ids().first().copied() == Some(me);
    let mut waited = 0u32;
    let mut map_waits = 0u32;
    let started = std::time::Instant::now();
    loop {
        match formation.record() {
            Some(r) if r.stage == Stage::Formed => return Ok(Start::Member),
            Some(r) if r.stage == Stage::Rejoining => return Ok(Start::Rejoin),
            Some(r) if r.stage == Stage::Added => return Ok(Start::Added),
            _ => {}
        }
        let mut answers: BTreeMap<NodeId, Option<ClusterRecord>> = BTreeMap::new();
        for &p in &peers {
            if let Ok(PeerResponse::Hello(r)) = net.control(p, PeerRequest::Hello, CONTROL_TTL).await {
                answers.insert(p, r);
            }
        }
        let mine = formation.record();
        let formed = answers.values().flatten().find(|r| r.stage != Stage::Prepared).copied();
        if let Some(other) = formed {
            match mine {
                Some(m) if m.cluster == other.cluster => {
                    // A formation this node prepared for has completed.
                    formation.set(ClusterRecord { stage: Stage::Formed, ..m })?;
                    tracing::info!(cluster = format_args!("{:016x}", m.cluster), "joined the new cluster");
                    return Ok(Start::Member);
                }
                Some(m) => {
                    return Err(Error::Config(format!(
                        "this node prepared for cluster {:016x} but its peers formed {:016x}",
                        m.cluster, other.cluster
                    )))
                }
                None => {
                    // Not a member by record. The cluster map tells a node that holds no
                    // replica (added to the file after formation, or added before and since
                    // wiped), which registers, from a member that lost its state, which
                    // must rejoin as new replicas or not start at all.
                    let map = newest_map(net, &peers, None).await;
                    if !map.is_set() && map_waits < MAP_WAITS_MAX {
                        // Just formed: its first metadata leader is filling the map.
                        map_waits += 1;
                        tokio::time::sleep(HELLO_INTERVAL).await;
                        continue;
                    }
                    if map.is_set() && !map.holds_replicas(me) {
                        if rejoin {
                            tracing::warn!("--rejoin is for a member that lost its state; this node holds no replica");
                        }
                        if let Some(start) = register(formation, net, config, &peers, other.cluster).await? {
                            return Ok(start);
                        }
                    } else if map.node_state(me) == Some(NodeState::Lost) && map.operations.iter().any(|o| o.from == me)
                    {
                        // `replace-node` is moving its replicas elsewhere: rebuilding them here
                        // too would race those moves. Once they are done it holds nothing and
                        // registers as an empty node.
                        let shards: Vec<u32> =
                            map.operations.iter().filter(|o| o.from == me).map(|o| o.shard).collect();
                        return Err(Error::Refused(format!(
                            "node {me} is marked lost and its replicas of shards {shards:?} are being moved to \
                             other nodes (`convoy admin status`): start it again once those moves are done; it \
                             then joins as a node with no replica"
                        )));
                    } else if rejoin || map.node_state(me) == Some(NodeState::Lost) {
                        // An operator said this node's disk is gone (`--rejoin`, or `convoy
                        // admin replace-node`, which marks it lost): it comes back as new
                        // replicas, never as the ones it was.
                        formation.set(ClusterRecord { cluster: other.cluster, node: me, stage: Stage::Rejoining })?;
                        tracing::warn!(cluster = format_args!("{:016x}", other.cluster), "rejoining as new replicas");
                        return Ok(Start::Rejoin);
                    } else {
                        return Err(Error::Refused(refusal_text(&config.path, me, other.cluster)));
                    }
                }
            }
        }
        if bootstrapper && answers.len() == peers.len() && mine.is_none() {
            // Every node of the file forms the cluster and holds every shard.
            if config.replication_factor != config.nodes.len() {
                return Err(Error::Config(format!(
                    "a new cluster forms on replication_factor ({}) nodes, and the file lists {}: start it with \
                     that many, then add the others to the file",
                    config.replication_factor,
                    config.nodes.len()
                )));
            }
        }
        if bootstrapper && answers.len() == peers.len() {
            let cluster = match mine {
                Some(m) => m.cluster,
                None => {
                    let cluster = loop {
                        let c: u64 = rand::random();
                        if c != 0 {
                            break c;
                        }
                    };
                    formation.set(ClusterRecord { cluster, node: me, stage: Stage::Prepared })?;
                    cluster
                }
            };
            let mut all = true;
            for &p in &peers {
                match net.control(p, PeerRequest::Prepare { cluster }, CONTROL_TTL).await {
                    Ok(PeerResponse::Hello(Some(r))) if r.cluster == cluster => {}
                    Ok(PeerResponse::Hello(Some(r))) => {
                        return Err(Error::Config(format!(
                            "node {p} belongs to cluster {:016x}, not {cluster:016x}: its data directory is \
                             from another cluster",
                            r.cluster
                        )))
                    }
                    _ => all = false,
                }
            }
            if all {
                formation.set(ClusterRecord { cluster, node: me, stage: Stage::Formed })?;
                tracing::info!(cluster = format_args!("{cluster:016x}"), "formed a new cluster");
                return Ok(Start::Bootstrap);
            }
        }
        if !bootstrapper && mine.is_none() && formed.is_none() && config.replication_factor != config.nodes.len() {
            // No new cluster forms from this file: only members of an existing one can let
            // this node in. Told why, rather than waiting without end.
            let listed = (config.nodes.len(), config.replication_factor);
            if started.elapsed() >= NO_CLUSTER_WAIT {
                return Err(Error::Config(format!(
                    "no member of a cluster answered within {}s, and no new cluster forms from {}: it lists {} \
                     nodes and replication_factor {} (a new cluster forms on exactly replication_factor nodes). \
                     For a new cluster, start it with that many nodes and add the others to the file afterwards; \
                     for a node added to a running cluster, start it once the cluster's nodes are up",
                    NO_CLUSTER_WAIT.as_secs(),
                    config.path.display(),
                    listed.0,
                    listed.1
                )));
            }
            if waited % 20 == 0 {
                tracing::warn!(
                    nodes = listed.0,
                    replication_factor = listed.1,
                    heard = answers.len(),
                    "waiting for a member of an existing cluster: this file cannot form a new one"
                );
            }
        }
        waited += 1;
        if waited % 20 == 1 {
            tracing::info!(heard = answers.len(), peers = peers.len(), "waiting for the cluster to form");
        }
        tokio::time::sleep(HELLO_INTERVAL).await;
    }
}

/// How long answers still out are waited for once a peer has answered with a set map. A peer
/// that is down keeps its ask open until its connection attempt fails or the ask's bound
/// ([`CONTROL_TTL`]) ends it; the map the others already gave must not wait for it, while a
/// live peer that answers a little later, and may know a newer epoch, still counts.
pub const MAP_STRAGGLERS: Duration = Duration::from_millis(500);

/// The newest cluster map `peers` report (empty if none answers with one), asked of all of
/// them at once. With `stragglers`, the answers still out that long after the first set map
/// are given up (for a node that asks again, and keeps the newest it heard); without, every
/// answer is waited for, each bounded by [`CONTROL_TTL`] (for decisions taken once, at start).
pub async fn newest_map(net: &PeerNet, peers: &[NodeId], stragglers: Option<Duration>) -> ClusterMap {
    let asks = peers.iter().map(|&p| async move {
        match net.control(p, PeerRequest::ClusterMap, CONTROL_TTL).await {
            Ok(PeerResponse::ClusterMap(map)) => Some(*map),
            _ => None,
        }
    });
    newest_of(asks, stragglers).await
}

/// The newest of the maps `asks` answer with (`None`: no map), as [`newest_map`] takes it.
async fn newest_of<F: std::future::Future<Output = Option<ClusterMap>>>(
    asks: impl IntoIterator<Item = F>,
    stragglers: Option<Duration>,
) -> ClusterMap {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut out: FuturesUnordered<F> = asks.into_iter().collect();
    let mut newest = ClusterMap::default();
    let mut until = None;
    loop {
        let answer = match until {
            None => out.next().await,
            Some(at) => match tokio::time::timeout_at(at, out.next()).await {
                Ok(answer) => answer,
                Err(_) => break,
            },
        };
        let Some(answer) = answer else { break };
        let Some(map) = answer else { continue };
        if map.is_set() && until.is_none() {
            until = stragglers.map(|d| tokio::time::Instant::now() + d);
        }
        if map.epoch > newest.epoch {
            newest = map;
        }
    }
    newest
}

/// Registers this node in the cluster map (through the metadata group's leader), then
/// records it as added. `None`: no leader took it in time; the caller asks again.
async fn register(
    formation: &Formation,
    net: &PeerNet,
    config: &Config,
    peers: &[NodeId],
    cluster: u64,
) -> Result<Option<Start>> {
    let me = formation.node;
    let node = config.node(me)?;
    let entry = NodeEntry {
        id: me,
        peer_addr: node.peer_addr.to_string(),
        client_addr: node.client_addr.to_string(),
        state: NodeState::Active,
    };
    let deadline = std::time::Instant::now() + super::meta::PLACE_TTL;
    match super::meta::place(net, me, None, peers, PlacementCommand::Register(entry), deadline).await {
        Ok(Placed::Applied { epoch, .. }) => {
            formation.set(ClusterRecord { cluster, node: me, stage: Stage::Added })?;
            tracing::info!(
                cluster = format_args!("{cluster:016x}"),
                epoch,
                "registered as a new node, holding no replica"
            );
            Ok(Some(Start::Added))
        }
        Ok(Placed::Refused(why)) => Err(Error::Config(format!("registering node {me} in the cluster map: {why}"))),
        Err(why) => {
            tracing::warn!(%why, "registering in the cluster map; trying again");
            Ok(None)
        }
    }
}

/// The replica id this node runs `shard` under, asking the shard's leader for a new one when
/// rejoining (a shard that has one already was joined before a restart). `None`: the
/// leader refused the rejoin for good (the node holds no voter in the shard), recorded as
/// [`DROPPED`] so no later start asks again.
pub async fn replica_for(
    formation: &Formation,
    net: &PeerNet,
    config: &Config,
    shard: ShardId,
    start: Start,
) -> Result<Option<NodeId>> {
    let me = formation.node;
    if let Some(r) = formation.replica(shard)? {
        return Ok(Some(r));
    }
    if start != Start::Rejoin {
        return Ok(Some(replica_id(me, 0)));
    }
    let member = member_of(config, me)?;
    let joined =
        ask_leader(net, config, shard, PeerRequest::Join { shard, node: me, member }, CONTROL_TTL, |r| match r {
            PeerResponse::Joined { replica } => Some(Ok(replica)),
            PeerResponse::NotRejoined { reason, newest } => Some(Err((reason, newest))),
            _ => None,
        })
        .await;
    match joined {
        Ok(replica) => {
            formation.set_replica(shard, replica)?;
            tracing::info!(shard, replica, "joined as a learner under a new replica id");
            Ok(Some(replica))
        }
        Err((why, newest)) => {
            // A learner the node still has in the group (a move to it, under way when it lost
            // its disk) is recorded as left first: a map that names it later must not start
            // it empty, under an id the leader counts as caught up.
            if let Some(newest) = newest {
                record_left_if_newer(&formation.store, shard, newest)?;
            }
            formation.set_replica(shard, DROPPED)?;
            tracing::warn!(shard, %why, ?newest, "not rejoined: this node does not hold the shard");
            Ok(None)
        }
    }
}

/// How many times a rejoined node asks the cluster map to take it back (each up to
/// `meta::PLACE_TTL`) before its start fails; it asks again when started again.
const REJOINED_TRIES: u32 = 12;

/// After the groups of a rejoining node started: has each promoted, has the cluster map take
/// it back (`PlacementCommand::Rejoined`), then records the node as a member.
pub async fn finish_rejoin(formation: &Formation, net: &PeerNet, config: &Config) -> Result<()> {
    let me = formation.node;
    let member = member_of(config, me)?;
    for shard in super::group_ids(config) {
        let Some(replica) = formation.replica(shard)?.filter(|r| *r != DROPPED) else { continue };
        let req = PeerRequest::Promote { shard, replica, member: member.clone() };
        let answer = ask_leader(net, config, shard, req, PROMOTE_TTL, |r| match r {
            PeerResponse::Promoted => Some(None),
            PeerResponse::NotRejoined { reason, .. } => Some(Some(reason)),
            _ => None,
        })
        .await;
        match answer {
            None => tracing::info!(shard, replica, "caught up and voting"),
            // A move took the shard off this node meanwhile (its drop deletes the replica
            // here: the move counts it as leaving, see docs/admin.md). Asking again would ask
            // for ever.
            Some(why) => tracing::warn!(shard, replica, %why, "not promoted: the rejoin goes on without this shard"),
        }
    }
    // Active again in the map before the record says formed: a node that restarts in
    // between is still rejoining, and asks again (`Rejoined` changes nothing the second
    // time). The rebuild is not done until the map takes the node back.
    let peers: Vec<NodeId> = config.node_ids().into_iter().filter(|&n| n != me).collect();
    let mut tries = 0u32;
    loop {
        let deadline = std::time::Instant::now() + super::meta::PLACE_TTL;
        match super::meta::place(net, me, None, &peers, PlacementCommand::Rejoined { node: me }, deadline).await {
            Ok(Placed::Applied { epoch, changed }) => {
                tracing::info!(epoch, changed, "active in the cluster map");
                break;
            }
            Ok(Placed::Refused(why)) => {
                tracing::warn!(%why, "the cluster map refused the rejoin; recording the node as formed anyway");
                break;
            }
            Err(why) if tries < REJOINED_TRIES => {
                tries += 1;
                tracing::warn!(%why, tries, "recording the rejoin in the cluster map; trying again");
            }
            Err(why) => {
                return Err(Error::Unavailable(format!(
                    "the cluster map did not take node {me}'s rejoin ({why}); start it again to retry"
                )))
            }
        }
    }
    let record = formation.record().ok_or_else(|| Error::Config("rejoining without a cluster record".into()))?;
    formation.set(ClusterRecord { stage: Stage::Formed, ..record })?;
    tracing::info!("rejoined every shard");
    Ok(())
}

fn member_of(config: &Config, node: NodeId) -> Result<Member> {
    let n = config.node(node)?;
    Ok(Member { peer_addr: n.peer_addr.to_string(), client_addr: n.client_addr.to_string() })
}

/// How often [`ask_leader`] tells, at warning level, that the leader still refuses.
const STILL_ASKING_EVERY: Duration = Duration::from_secs(30);

/// Sends `req` to the shard's leader until it answers what `accept` takes: follows
/// `NotLeader` hints, tries the other nodes in turn, and waits between rounds.
async fn ask_leader<T>(
    net: &PeerNet,
    config: &Config,
    shard: ShardId,
    req: PeerRequest,
    ttl: Duration,
    accept: impl Fn(PeerResponse) -> Option<T>,
) -> T {
    let nodes = config.node_ids();
    let mut hint: Option<NodeId> = None;
    let mut round = 0usize;
    let started = std::time::Instant::now();
    let mut told = started;
    loop {
        let target = hint.take().unwrap_or(nodes[round % nodes.len()]);
        round += 1;
        match net.control(target, req.clone(), ttl).await {
            Ok(PeerResponse::NotLeader { leader }) => hint = leader,
            Ok(r) => {
                let text = format!("{r:?}");
                if let Some(v) = accept(r) {
                    return v;
                }
                // Asked without end: an answer that keeps refusing is told, not only logged
                // for debugging, so a start that waits on it says what it waits for.
                if told.elapsed() >= STILL_ASKING_EVERY {
                    told = std::time::Instant::now();
                    let asking = started.elapsed().as_secs();
                    tracing::warn!(shard, target, answer = %text, asking, "the shard's leader has not granted this yet");
                } else {
                    tracing::debug!(shard, target, answer = %text, "not yet");
                }
            }
            Err(e) => tracing::debug!(shard, target, error = %e, "asking for the shard's leader"),
        }
        if hint.is_none() {
            tokio::time::sleep(HELLO_INTERVAL).await;
        }
    }
}

pub(super) fn leads(h: &Hosted) -> std::result::Result<openraft::RaftMetrics<super::types::C>, PeerResponse> {
    let m = super::metrics_of(&h.raft);
    if m.current_leader != Some(h.replica) {
        return Err(PeerResponse::NotLeader { leader: m.current_leader.map(node_of) });
    }
    Ok(m)
}

/// The leader's side of `Join`: a replica id above every one `node` ever had in this group's
/// membership, added as a learner (without waiting for it); refused for good
/// (`NotRejoined`) when `node` holds no voter in the group.
pub async fn join(h: &Hosted, shard: ShardId, node: NodeId, member: Member) -> PeerResponse {
    let m = match leads(h) {
        Ok(m) => m,
        Err(answer) => return answer,
    };
    // A rejoin rebuilds a replica its node lost: with no voter of the node in the group (a
    // move took the shard off it, or it never held it, as a rejoin that no peer answered
    // with a map asks of every shard) there is none, and its `Promote` would be refused.
    // A learner added anyway would stay in the group, under a generation counted from the
    // membership alone: an id the node may have had before the move retired it. A move off
    // the node under way counts as done (its new half).
    let votes = |m: &openraft::RaftMetrics<super::types::C>| {
        let joint = m.membership_config.membership().get_joint_config();
        joint.last().is_some_and(|half| half.iter().any(|v| node_of(*v) == node))
    };
    if !votes(&m) {
        // Judged on a committed membership only: a move's change not committed yet may be
        // undone (its leader gone, the move cancelled), and the node's voter with it.
        let why = |m: &openraft::RaftMetrics<super::types::C>| {
            let committed = m.membership_config.log_id() == m.committed_membership_config.log_id();
            (committed && !votes(m))
                .then(|| format!("node {node} holds no voter in shard {shard}: there is no replica of it to rebuild"))
        };
        return confirmed_refusal(h, shard, why, node).await;
    }
    let generation = replicas_of(m.membership_config.membership(), node).map(generation_of).max().map_or(0, |g| g + 1);
    let replica = replica_id(node, generation);
    match h.raft.add_learner(replica, member, false).await {
        Ok(_) => {
            tracing::info!(shard, node, replica, "added a new replica as a learner");
            PeerResponse::Joined { replica }
        }
        Err(e) => PeerResponse::Error(format!("adding replica {replica} of shard {shard}: {e}")),
    }
}

/// The leader's side of a move's `AddLearner`: a learner of `node` (an existing one of
/// generation `min_generation` or above, which a retried step finds, else a new one above
/// every id `node` has in the membership and every id it ever had in the shard), and the
/// replicas of `from` that the move will replace (its voters, and a learner of a rejoin).
pub async fn add_learner(
    h: &Hosted,
    shard: ShardId,
    node: NodeId,
    member: Member,
    from: NodeId,
    min_generation: u32,
) -> PeerResponse {
    let m = match leads(h) {
        Ok(m) => m,
        Err(answer) => return answer,
    };
    let membership = m.membership_config.membership();
    // Every replica of `from`: its voters, and a learner it runs (a rejoin's, not promoted
    // yet), which the move removes too; `from` may delete any of them once it is done.
    let leaving: Vec<NodeId> = replicas_of(membership, from).collect();
    let existing =
        membership.learner_ids().filter(|l| node_of(*l) == node && generation_of(*l) >= min_generation).max();
    if let Some(replica) = existing {
        return PeerResponse::LearnerAdded { replica, leaving };
    }
    let generation = replicas_of(membership, node)
        .map(|id| generation_of(id) + 1)
        .chain(std::iter::once(min_generation))
        .max()
        .unwrap_or(min_generation);
    let replica = replica_id(node, generation);
    match h.raft.add_learner(replica, member, false).await {
        Ok(_) => {
            tracing::info!(shard, node, replica, "added a moved replica as a learner");
            PeerResponse::LearnerAdded { replica, leaving }
        }
        Err(e) => PeerResponse::Error(format!("adding replica {replica} of shard {shard}: {e}")),
    }
}

/// Before `replica` (a learner) is made a voter: waits until the leader sees it within
/// `replication_lag_threshold` entries of its log, and has seen it match an entry at all.
/// openraft counts a learner that never answered as matched at index 0, so on a log shorter
/// than the threshold its own wait (`add_learner` with `blocking`) would not wait for it;
/// made a voter while it is not running, and with another voter down, it would leave the
/// joint configuration without a majority and the shard without commits until it came up.
/// The wait only watches: `add_learner` would add the replica again had a cancelled move's
/// `RemoveLearner` removed it meanwhile (a coordinator that lost its leadership can still
/// send the `Replace` its old map asked for), so a replica that is no longer a member ends
/// the wait, refused. `None` when it may be promoted, else the answer that asks again later.
/// The wait is bounded by `wait`, under the asker's own time limit: an answer nobody waits
/// for any more would still go on to change the membership.
async fn catch_up(h: &Hosted, shard: ShardId, replica: NodeId, wait: Duration) -> Option<PeerResponse> {
    if crate::planted::active(crate::planted::Bug::RemoveBeforeCaughtUp) {
        return None;
    }
    let lag = h.raft.config().replication_lag_threshold;
    let caught_up = |m: &openraft::RaftMetrics<super::types::C>| {
        matched(m, replica).is_some_and(|l| m.last_log_index.unwrap_or(0).saturating_sub(l.index) <= lag)
    };
    let leading = |m: &openraft::RaftMetrics<super::types::C>| m.current_leader == Some(h.replica);
    let waited = h
        .raft
        .wait(Some(wait))
        .metrics(|m| !leading(m) || !is_member(m, replica) || caught_up(m), "a moved replica to catch up")
        .await;
    match waited {
        Ok(m) if !leading(&m) => Some(PeerResponse::NotLeader { leader: m.current_leader.map(node_of) }),
        Ok(m) if !is_member(&m, replica) => Some(not_a_member(shard, replica)),
        Ok(_) => None,
        Err(openraft::metrics::WaitError::Timeout(..)) => Some(PeerResponse::Error(format!(
            "replica {replica} of shard {shard} has not caught up within {wait:?}; not promoted yet"
        ))),
        Err(e) => Some(PeerResponse::Error(format!("waiting for replica {replica} of shard {shard}: {e}"))),
    }
}

/// The replica ids `node` has in `membership`, voters and learners.
fn replicas_of(membership: &openraft::Membership<NodeId, Member>, node: NodeId) -> impl Iterator<Item = NodeId> + '_ {
    membership.nodes().map(|(id, _)| *id).filter(move |id| node_of(*id) == node)
}

/// Whether `replica` is in the membership `m` shows (voter or learner).
fn is_member(m: &openraft::RaftMetrics<super::types::C>, replica: NodeId) -> bool {
    m.membership_config.membership().get_node(&replica).is_some()
}

/// The refusal of a promotion whose replica left the group (a cancelled move removed it).
fn not_a_member(shard: ShardId, replica: NodeId) -> PeerResponse {
    PeerResponse::Error(format!("replica {replica} is no longer a member of shard {shard}: not promoted"))
}

/// The membership the group has committed, if no change is under way (no joint
/// configuration, and nothing newer in the log): what a move may act on.
fn settled(m: &openraft::RaftMetrics<super::types::C>) -> Option<openraft::Membership<NodeId, Member>> {
    let committed = &m.committed_membership_config;
    let settled =
        m.membership_config.log_id() == committed.log_id() && committed.membership().get_joint_config().len() == 1;
    settled.then(|| committed.membership().clone())
}

/// How long a `Promote` waits for its replica to catch up: under the rejoining node's
/// [`PROMOTE_TTL`].
const PROMOTE_CATCH_UP_WAIT: Duration = Duration::from_secs(280);
/// How long a move's `Replace` waits for its replica to catch up: under the coordinator's
/// 60 s for the answer.
const REPLACE_CATCH_UP_WAIT: Duration = Duration::from_secs(50);

/// Makes `voters` the group's voters (through joint consensus), only if its membership is
/// still the one `m` read: a change committed or proposed since is not overwritten.
async fn change_voters_if_unchanged(
    h: &Hosted,
    m: &openraft::RaftMetrics<super::types::C>,
    voters: BTreeSet<NodeId>,
) -> std::result::Result<(), String> {
    let unchanged =
        openraft::Precondition::LastMembershipLogId { last_membership_log_id: *m.membership_config.log_id() };
    h.raft
        .change_membership_if(ChangeMembers::ReplaceAllVoters(voters), false, [unchanged])
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Finishes a membership change its leader left in joint consensus, if that is why the
/// group is not settled: openraft leaves a committed joint configuration as it is when the
/// leader that proposed it loses leadership (or stops) before the second, uniform entry, and
/// nothing else would finish it; every move of the shard would wait for ever, and every
/// commit would need a majority of both halves. The change is finished to its new half, as
/// its proposer meant. `None` when the group is not in that state (a change is still being
/// made), else the answer that asks again.
async fn finish_joint(h: &Hosted, shard: ShardId, m: &openraft::RaftMetrics<super::types::C>) -> Option<PeerResponse> {
    let committed = &m.committed_membership_config;
    let halves = committed.membership().get_joint_config();
    if m.membership_config.log_id() != committed.log_id() || halves.len() < 2 {
        return None;
    }
    let target: BTreeSet<NodeId> = halves.last()?.clone();
    tracing::warn!(shard, ?target, "finishing a membership change that its leader left in joint consensus");
    // Only if it is still that configuration: metrics may be a step behind the core.
    Some(match change_voters_if_unchanged(h, m, target).await {
        Ok(_) => {
            PeerResponse::Error(format!("shard {shard}: finished a membership change left half done; asking again"))
        }
        Err(e) => PeerResponse::Error(format!("shard {shard}: finishing a membership change left half done: {e}")),
    })
}

/// Why a rejoin's `replica` will never be promoted in `membership`, if it will not: it is not
/// a member (a move off its node, or a newer rejoin, removed it), or its node has no voter
/// left to vote in place of (a move took the shard off the node after it joined; or it
/// joined a shard it never held, as a rejoin does when no peer answered with a map).
/// Promoted anyway, it would add a voter the cluster map does not place there, beside the
/// move's, and undo the move.
fn no_promotion(membership: &openraft::Membership<NodeId, Member>, shard: ShardId, replica: NodeId) -> Option<String> {
    let node = node_of(replica);
    if membership.get_node(&replica).is_none() {
        return Some(format!("replica {replica} is no longer a member of shard {shard}: not promoted"));
    }
    if !membership.voter_ids().any(|v| node_of(v) == node && v != replica) {
        return Some(format!(
            "node {node} holds no other voter in shard {shard} (a move took the shard off it, or it never held \
             it): replica {replica} is not promoted"
        ));
    }
    None
}

/// How long [`confirmed_refusal`] waits for its read index.
const CONFIRM_WAIT: Duration = Duration::from_secs(3);

/// The final refusal of a rejoin's step (`NotRejoined`), only once a quorum confirmed this
/// node's leadership (a read index: everything committed before is applied here) and the
/// membership it then has still gives a reason (`why`): a deposed leader that has not heard
/// yet, with an old membership, must not turn a rejoin away for good (the node would record
/// the shard dropped, and the shard stay a replica short). Else an answer that asks again.
async fn confirmed_refusal(
    h: &Hosted,
    shard: ShardId,
    why: impl Fn(&openraft::RaftMetrics<super::types::C>) -> Option<String>,
    node: NodeId,
) -> PeerResponse {
    // Under the asker's own bound for the answer (`CONTROL_TTL`), so it hears either way.
    let confirmed = h.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex);
    let confirmed = matches!(tokio::time::timeout(CONFIRM_WAIT, confirmed).await, Ok(Ok(_)));
    let m = super::metrics_of(&h.raft);
    if m.current_leader != Some(h.replica) {
        return PeerResponse::NotLeader { leader: m.current_leader.map(node_of) };
    }
    if !confirmed {
        return PeerResponse::Error(format!("shard {shard}: leadership not confirmed; asking again"));
    }
    match why(&m) {
        Some(reason) => {
            let newest = replicas_of(m.membership_config.membership(), node).max_by_key(|id| generation_of(*id));
            PeerResponse::NotRejoined { reason, newest }
        }
        None => PeerResponse::Error(format!("shard {shard}: the membership changed; asking again")),
    }
}

/// The leader's side of `Promote`: waits until `replica` caught up, then makes it a voter in
/// place of its node's other replicas, which leave the group. Refused for good
/// (`NotRejoined`) when there is nothing to vote in place of ([`no_promotion`]).
pub async fn promote(h: &Hosted, shard: ShardId, replica: NodeId) -> PeerResponse {
    let m = match leads(h) {
        Ok(m) => m,
        Err(answer) => return answer,
    };
    let node = node_of(replica);
    let membership = m.membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if voters.contains(&replica) && !voters.iter().any(|v| node_of(*v) == node && *v != replica) {
        return PeerResponse::Promoted;
    }
    let refused = |m: &openraft::RaftMetrics<super::types::C>| match settled(m) {
        Some(membership) => no_promotion(&membership, shard, replica),
        None => None,
    };
    if no_promotion(&membership, shard, replica).is_some() {
        return confirmed_refusal(h, shard, refused, node).await;
    }
    if let Some(answer) = catch_up(h, shard, replica, PROMOTE_CATCH_UP_WAIT).await {
        return match answer {
            PeerResponse::Error(_) if !is_member(&super::metrics_of(&h.raft), replica) => {
                confirmed_refusal(h, shard, refused, node).await
            }
            answer => answer,
        };
    }
    // The voters as they are now, after the wait: a change made meanwhile (a move of this
    // shard) is built on, never undone.
    let m = super::metrics_of(&h.raft);
    let Some(membership) = settled(&m) else {
        if let Some(answer) = finish_joint(h, shard, &m).await {
            return answer;
        }
        return PeerResponse::Error(format!("shard {shard}: a membership change is under way; asking again"));
    };
    if no_promotion(&membership, shard, replica).is_some() {
        return confirmed_refusal(h, shard, refused, node).await;
    }
    let new_voters: BTreeSet<NodeId> =
        membership.voter_ids().filter(|v| node_of(*v) != node).chain(std::iter::once(replica)).collect();
    if let Err(e) = change_voters_if_unchanged(h, &m, new_voters).await {
        return PeerResponse::Error(format!("making replica {replica} of shard {shard} a voter: {e}"));
    }
    let m = super::metrics_of(&h.raft);
    let stale: BTreeSet<NodeId> =
        m.membership_config.membership().learner_ids().filter(|l| node_of(*l) == node && *l != replica).collect();
    if !stale.is_empty() {
        if let Err(e) = h.raft.change_membership(ChangeMembers::RemoveNodes(stale), false).await {
            return PeerResponse::Error(format!("removing old replicas of node {node} from shard {shard}: {e}"));
        }
    }
    tracing::info!(shard, replica, "replica caught up and replaced its node's old replica as voter");
    PeerResponse::Promoted
}

/// The leader's side of a move's promotion (`PeerRequest::Replace`): once `replica` (a
/// learner on another node) has caught up, it votes in place of every replica of node
/// `from`, in one membership change that openraft runs through joint consensus. A leader
/// that is itself `from` hands leadership to another caught-up voter first and answers an
/// error, so the coordinator asks the new leader. Repeating it after it is done answers
/// `Promoted` at once.
pub async fn replace(h: &Hosted, shard: ShardId, from: NodeId, replica: NodeId) -> PeerResponse {
    let m = match leads(h) {
        Ok(m) => m,
        Err(answer) => return answer,
    };
    let Some(membership) = settled(&m) else {
        if let Some(answer) = finish_joint(h, shard, &m).await {
            return answer;
        }
        return PeerResponse::Error(format!("shard {shard}: a membership change is under way; asking again"));
    };
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if voters.contains(&replica) && !voters.iter().any(|v| node_of(*v) == from) {
        // Done already. `from`'s learners are left alone here: a repeat of this request can
        // come late (a stale coordinator's), after a new move back onto `from` added its own.
        return PeerResponse::Promoted;
    }
    if node_of(h.replica) == from {
        let caught_up = |v: &NodeId| matched(&m, *v).is_some_and(|l| Some(l.index) == m.last_log_index);
        let Some(&to) = voters.iter().find(|v| node_of(**v) != from && caught_up(v)) else {
            return PeerResponse::Error(format!("shard {shard}: no caught-up voter to hand leadership to yet"));
        };
        tracing::info!(shard, to, "handing leadership away before this replica leaves the shard");
        let _ = h.raft.trigger().transfer_leader(to).await;
        return PeerResponse::NotLeader { leader: Some(node_of(to)) };
    }
    if let Some(answer) = catch_up(h, shard, replica, REPLACE_CATCH_UP_WAIT).await {
        return answer;
    }
    // Built on the membership as it is after the wait, and only if nothing changed it since.
    let m = super::metrics_of(&h.raft);
    let Some(membership) = settled(&m) else {
        return PeerResponse::Error(format!("shard {shard}: a membership change is under way; asking again"));
    };
    if membership.get_node(&replica).is_none() {
        return not_a_member(shard, replica);
    }
    let new_voters: BTreeSet<NodeId> =
        membership.voter_ids().filter(|v| node_of(*v) != from).chain(std::iter::once(replica)).collect();
    if let Err(e) = change_voters_if_unchanged(h, &m, new_voters).await {
        return PeerResponse::Error(format!("making replica {replica} of shard {shard} a voter: {e}"));
    }
    tracing::info!(shard, replica, from, "a moved replica votes in place of the old one");
    remove_learners_of(h, shard, from).await
}

/// The end of a move's promotion, in the call that made it: a learner `from` still has in
/// the group (a rejoin's, which joined before the move) leaves it too, so the group stops
/// replicating to it; the move's drop deletes it on `from` (it is among the move's
/// `leaving`). Should this change fail, the retried `Replace` finds the promotion done and
/// leaves the learner in the membership (the drop still deletes it on `from`).
async fn remove_learners_of(h: &Hosted, shard: ShardId, from: NodeId) -> PeerResponse {
    let m = super::metrics_of(&h.raft);
    let stale: BTreeSet<NodeId> =
        m.membership_config.membership().learner_ids().filter(|l| node_of(*l) == from).collect();
    if !stale.is_empty() {
        if let Err(e) = h.raft.change_membership(ChangeMembers::RemoveNodes(stale.clone()), false).await {
            return PeerResponse::Error(format!("removing learners {stale:?} of node {from} from shard {shard}: {e}"));
        }
        tracing::info!(shard, from, ?stale, "the moved-off node's learners left the shard");
    }
    PeerResponse::Promoted
}

/// The leader's side of a cancelled move (`PeerRequest::RemoveLearner`): every learner of
/// `node` leaves the group; a voter is never removed this way (answered an error saying it
/// votes, once that is committed).
///
/// Nor is a learner of a node that votes in the group: that is the node's rejoin (it lost
/// its data and runs a new replica that its `Promote` makes a voter in place of the old
/// one), never a move's, since a move never goes to a node that holds a replica of the
/// shard. A cancel that reaches it is a stale coordinator's, of an earlier move to the node;
/// had it removed the learner, the rejoin's `Promote` would be refused for ever ("no longer
/// a member") and the node would never finish rejoining.
pub async fn remove_learner(h: &Hosted, shard: ShardId, node: NodeId, replica: Option<NodeId>) -> PeerResponse {
    let m = match leads(h) {
        Ok(m) => m,
        Err(answer) => return answer,
    };
    let Some(membership) = settled(&m) else {
        if let Some(answer) = finish_joint(h, shard, &m).await {
            return answer;
        }
        return PeerResponse::Error(format!("shard {shard}: a membership change is under way; asking again"));
    };
    if let Some(replica) = replica.filter(|r| membership.voter_ids().any(|v| v == *r)) {
        // Committed: the promotion won the race with the cancel.
        return PeerResponse::Error(format!("replica {replica} of shard {shard} votes: it is not removed by a cancel"));
    }
    if let Some(voter) = membership.voter_ids().find(|v| node_of(*v) == node) {
        let rejoining: Vec<NodeId> = membership.learner_ids().filter(|l| node_of(*l) == node).collect();
        if !rejoining.is_empty() {
            tracing::warn!(
                shard,
                node,
                voter,
                ?rejoining,
                ?replica,
                "a cancelled move's learner removal reached a node that votes here: its learners are its rejoin, kept"
            );
        }
        return PeerResponse::Promoted;
    }
    let gone: BTreeSet<NodeId> = membership.learner_ids().filter(|l| node_of(*l) == node).collect();
    if !gone.is_empty() {
        if let Err(e) = h.raft.change_membership(ChangeMembers::RemoveNodes(gone.clone()), false).await {
            return PeerResponse::Error(format!("removing learners {gone:?} of shard {shard}: {e}"));
        }
    }
    PeerResponse::Promoted
}

/// The leader's side of `PeerRequest::Progress`: how many entries `replica` is behind, or
/// `None` while it has matched nothing.
///
/// A replica that never answered (its node has not started it yet, or cannot be reached) is
/// not "behind by the whole log": on a short log that would pass the coordinator's catch-up
/// gap, and a promotion with another voter down would then give the joint configuration a
/// majority it cannot reach, so the shard would commit nothing until the new replica came
/// up. Only a replica that has matched an entry, and so is running, counts as behind.
pub fn progress(h: &Hosted, replica: NodeId) -> PeerResponse {
    let m = match leads(h) {
        Ok(m) => m,
        Err(answer) => return answer,
    };
    PeerResponse::Behind { entries: behind(m.last_log_index, matched(&m, replica).map(|l| l.index)) }
}

/// The last entry the leader knows `replica` holds (`None`: it has matched nothing, or is
/// not replicated to from here).
fn matched(m: &openraft::RaftMetrics<super::types::C>, replica: NodeId) -> Option<super::types::LogId> {
    m.replication.as_ref().and_then(|r| r.get(&replica).cloned()).flatten()
}

/// Entries from `matched` to `last`; `None` while nothing is matched.
fn behind(last: Option<u64>, matched: Option<u64>) -> Option<u64> {
    matched.map(|at| last.unwrap_or(0).saturating_sub(at))
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::time::Duration;

    use super::{behind, newest_of, ClusterMap};

    type Ask = Pin<Box<dyn Future<Output = Option<ClusterMap>> + Send>>;

    /// A peer that answers with a map of `epoch` (0: an unset map) after `after_ms`.
    fn answers(epoch: u64, after_ms: u64) -> Ask {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            Some(ClusterMap { epoch, ..ClusterMap::default() })
        })
    }

    /// A peer that is down: its ask never ends on its own.
    fn down() -> Ask {
        Box::pin(std::future::pending())
    }

    async fn newest(asks: Vec<Ask>, stragglers: Option<Duration>) -> u64 {
        // Bounded, so a regression that waits for the peer that is down fails instead of hanging.
        tokio::time::timeout(Duration::from_secs(10), newest_of(asks, stragglers))
            .await
            .expect("the map must not wait for a peer that is down")
            .epoch
    }

    #[tokio::test]
    async fn a_peer_that_is_down_does_not_hold_up_the_map_the_others_gave() {
        let stragglers = Some(Duration::from_millis(300));
        assert_eq!(newest(vec![down(), answers(3, 0), answers(5, 50)], stragglers).await, 5);
        assert_eq!(newest(vec![answers(4, 20), down()], stragglers).await, 4);
    }

    #[tokio::test]
    async fn an_unset_map_does_not_start_the_wait_for_stragglers() {
        // A node that has not applied the map yet answers at once with an empty one; the
        // peer that knows it answers later and still counts.
        let stragglers = Some(Duration::from_millis(100));
        assert_eq!(newest(vec![answers(0, 0), answers(2, 400), down()], stragglers).await, 2);
    }

    #[tokio::test]
    async fn without_stragglers_every_answer_is_waited_for() {
        assert_eq!(newest(vec![answers(3, 0), answers(7, 400)], None).await, 7);
        // With a short wait the late answer is given up: the trade the service's loop makes,
        // since it asks again and keeps the newest map it heard.
        assert_eq!(newest(vec![answers(3, 0), answers(7, 2_000)], Some(Duration::from_millis(50))).await, 3);
        assert_eq!(newest(vec![], None).await, 0);
    }

    #[test]
    fn a_replica_that_matched_nothing_is_not_behind_by_the_log_but_unreplicated() {
        assert_eq!(behind(Some(40), None), None, "a short log must not make a silent replica look nearly caught up");
        assert_eq!(behind(Some(40), Some(0)), Some(40));
        assert_eq!(behind(Some(40), Some(38)), Some(2));
        assert_eq!(behind(None, Some(0)), Some(0));
    }
}
