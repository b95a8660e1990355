//! openraft wiring, and nothing else: the type configuration ([`types`]), the log store
//! ([`log_store`]) and state machine ([`state_machine`]) adapters over `crate::store`, the
//! peer protocol ([`rpc`]) and its QUIC transport ([`network`], over `crate::net`'s frames
//! and lanes), and starting a shard's group ([`start_group`]). openraft is named nowhere
//! above this module but for the handles the service holds.
//!
//! Every shard is one Raft group whose voters are the cluster's nodes; so is the metadata
//! group, which holds the cluster map (`crate::placement`, proposed through [`meta`]). Group membership is
//! formed once, for a brand-new cluster only (see [`formation`]): the lowest-id node then
//! initializes every shard. A node that lost its state rejoins as new replicas.

#[cfg(test)]
mod decode_fuzz;
pub mod entry_cache;
pub mod formation;
pub mod io_pool;
pub mod log_store;
pub mod meta;
pub mod network;
pub mod quiesce;
pub mod rpc;
pub mod state_machine;
pub mod types;

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;

use crate::chat::ShardId;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::Store;
use log_store::LogStore;
use network::{PeerNet, ShardNetworkFactory};
use state_machine::{ShardEvents, ShardStateMachine};
use types::{Member, NodeId, Raft};

/// The openraft configuration derived from `cluster.toml`.
pub fn raft_config(config: &Config) -> Result<Arc<openraft::Config>> {
    let r = &config.raft;
    let mut c = openraft::Config {
        cluster_name: "convoy".into(),
        heartbeat_interval: r.heartbeat_ms,
        heartbeat_min_interval: Some(r.heartbeat_min_interval_ms),
        election_timeout_min: r.election_timeout_ms_min,
        election_timeout_max: r.election_timeout_ms_max,
        enable_pre_vote: Some(true),
        max_payload_entries: r.payload_entries_max,
        // convoy triggers snapshots itself, every `snapshot_logs_since_last` entries, except
        // that a leader holds one back while a replica catches up from the last one it sent
        // (`service::compaction`).
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: r.snapshot_log_kept_max,
        purge_batch_size: r.purge_batch_size.max(1),
        // A replica's log never goes back: one that lost state is refused at open (see
        // `log_store::Watermark`) and rejoins under a new replica id, never its old one.
        allow_log_reversion: Some(false),
        // No leader restore: apply is not fsynced and the committed index is not persisted,
        // the combination under which openraft's own documentation says a restarted leader
        // can resume with a stale state and nothing to detect it. A restarted node always
        // goes through an election and learns the commit index from whoever wins.
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    if crate::planted::active(crate::planted::Bug::LeaderRestore) {
        c.enable_leader_restore = Some(true);
    }
    if crate::planted::active(crate::planted::Bug::TolerateWalLoss) {
        c.allow_log_reversion = Some(true);
    }
    Ok(Arc::new(c.validate().map_err(|e| Error::Config(format!("raft: {e}")))?))
}

/// Every group a node of `config` runs: each shard's, then the metadata group's
/// (`crate::placement::META_SHARD`).
pub fn group_ids(config: &Config) -> impl Iterator<Item = ShardId> {
    (0..config.shards).chain(std::iter::once(crate::placement::META_SHARD))
}

/// The voters of every shard: all nodes of the cluster.
pub fn members(config: &Config) -> BTreeMap<NodeId, Member> {
    config
        .nodes
        .iter()
        .map(|n| (n.id, Member { peer_addr: n.peer_addr.to_string(), client_addr: n.client_addr.to_string() }))
        .collect()
}

/// A running shard group.
#[derive(Clone)]
pub struct Group {
    pub shard: ShardId,
    /// The replica id this node runs the group under (see `types::NodeId`).
    pub replica: NodeId,
    pub raft: Raft,
    /// Whether the replica's state is back to all it may have served before it started.
    pub rebuilt: Arc<Rebuilt>,
    /// Resolves once the group's state machine is gone (see [`Group::shutdown`]).
    stopped: state_machine::Stopped,
}

/// Whether a replica's state has come back, since it started, to everything it may have
/// served before. Apply writes a data shard's state without the WAL, and openraft applies an
/// entry once it is committed and handed to the log, before this node's own fsync of it: after
/// a crash the state is back at its last flush, and after a power failure the log's unsynced
/// tail is gone too; a node that lost its disk rejoins with empty replicas. openraft
/// applies the rest again once a leader tells it what is committed; until then the replica
/// would answer reads from an older state than the node answered before (a message
/// acknowledged, read, and then gone). Once back, it is never asked again.
pub struct Rebuilt {
    done: std::sync::atomic::AtomicBool,
    /// The first commit index a leader reported after it committed an entry of its own
    /// term ([`TARGET_UNKNOWN`] until then).
    target: std::sync::atomic::AtomicU64,
}

const TARGET_UNKNOWN: u64 = u64::MAX;

impl Default for Rebuilt {
    fn default() -> Rebuilt {
        Rebuilt {
            done: std::sync::atomic::AtomicBool::new(false),
            target: std::sync::atomic::AtomicU64::new(TARGET_UNKNOWN),
        }
    }
}

impl Rebuilt {
    /// `Ok` once the replica's state is back; until then, how far it is. `metrics` gives
    /// the replica's Raft metrics now. What the node served before this start it had
    /// applied, so it was committed then; the commit index of a leader that has committed an entry of
    /// its own term is at least every index committed before it (Raft's leader
    /// completeness). A commit index reported by a leader that has not yet (a new one's
    /// first entry is still uncommitted, or one committed by an earlier leader of the same
    /// term) can be lower, and is not used. The first such index is the target: it does not
    /// move ahead under steady writes.
    pub fn check(&self, metrics: impl FnOnce() -> openraft::RaftMetrics<types::C>) -> std::result::Result<(), String> {
        use std::sync::atomic::Ordering;
        if self.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let m = metrics();
        let mut target = self.target.load(Ordering::Acquire);
        if target == TARGET_UNKNOWN {
            match m.cluster_committed {
                Some(c) if c.leader_id.term == m.current_term && m.current_leader == Some(c.leader_id.node_id) => {
                    target = match self.target.compare_exchange(
                        TARGET_UNKNOWN,
                        c.index,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => c.index,
                        Err(set) => set,
                    };
                }
                _ => return Err("no leader has told it yet what is committed".into()),
            }
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        if applied >= target {
            self.done.store(true, Ordering::Release);
            return Ok(());
        }
        Err(format!("applied {applied} of the {target} entries committed before it started"))
    }
}

/// How long [`Group::shutdown`] waits for the state machine to finish its queued applies.
pub const STATE_MACHINE_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Group {
    /// Stops the group and waits until its state machine is gone too: `Raft::shutdown`
    /// stops the Raft core, but openraft's state-machine worker goes on with the applies
    /// already queued to it, and those would write the shard's state after the caller
    /// deleted it (a dropped shard) or closed the store. Gives up waiting after
    /// [`STATE_MACHINE_STOP_WAIT`], with an error.
    pub async fn shutdown(&self) -> Result<()> {
        let core = self.raft.shutdown().await;
        if tokio::time::timeout(STATE_MACHINE_STOP_WAIT, self.stopped.wait()).await.is_err() {
            return Err(Error::Unavailable(format!(
                "shard {}'s state machine did not stop within {STATE_MACHINE_STOP_WAIT:?}",
                self.shard
            )));
        }
        core.map_err(|e| Error::raft(format!("stopping shard {}", self.shard), e))
    }
}

impl Group {
    /// Whether the group's state machine is gone, waiting up to `wait` for it.
    pub async fn stopped_within(&self, wait: std::time::Duration) -> bool {
        tokio::time::timeout(wait, self.stopped.wait()).await.is_ok()
    }
}

/// A copy of a group's Raft metrics, taken at once: holding the watch borrow can block the
/// Raft core.
pub fn metrics_of(raft: &Raft) -> openraft::RaftMetrics<types::C> {
    raft.metrics().borrow_watched().clone()
}

/// Starts (or restarts) `shard`'s group on this node as replica `replica`. Fails with
/// `Error::Corrupt` when the shard's log or vote came back behind its watermark: the replica
/// must then take no part in the group.
pub async fn start_group(
    replica: NodeId,
    shard: ShardId,
    raft_config: Arc<openraft::Config>,
    store: Store,
    net: PeerNet,
    events: Arc<dyn ShardEvents>,
) -> Result<Group> {
    let log = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || LogStore::open(shard, store))
            .await
            .map_err(Error::task("opening a shard's log"))??
    };
    let sm = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || ShardStateMachine::open(store, shard, events))
            .await
            .map_err(Error::task("opening a shard's state machine"))??
    };
    let network = ShardNetworkFactory { net, shard };
    let stopped = sm.stopped();
    let rebuilt = Arc::new(Rebuilt::default());
    let raft = Raft::new(replica, raft_config, network, log, sm)
        .await
        .map_err(|e| Error::raft(format!("starting shard {shard}"), e))?;
    Ok(Group { shard, replica, raft, rebuilt, stopped })
}

/// Initializes `group` with every node as voter, if it has never been initialized.
pub async fn initialize_if_pristine(group: &Group, config: &Config) -> Result<()> {
    let initialized = group
        .raft
        .is_initialized()
        .await
        .map_err(|e| Error::raft(format!("reading shard {}'s state", group.shard), e))?;
    if !initialized {
        group
            .raft
            .initialize(members(config))
            .await
            .map_err(|e| Error::raft(format!("initializing shard {}", group.shard), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod rebuilt_tests {
    use openraft::impls::leader_id_adv::LeaderId;

    use super::types::{LogId, C};
    use super::Rebuilt;

    fn id(term: u64, leader: u64, index: u64) -> LogId {
        LogId::new(LeaderId { term, node_id: leader }, index)
    }

    /// Applied `applied`; the leader (replica 2) in `term`, if any, reported `committed` as
    /// committed by (term, leader).
    fn metrics(applied: u64, term: Option<u64>, committed: Option<(u64, u64, u64)>) -> openraft::RaftMetrics<C> {
        let mut m = openraft::RaftMetrics::<C>::new_initial(1);
        m.last_applied = (applied > 0).then(|| id(1, 2, applied));
        m.current_term = term.unwrap_or(1);
        m.current_leader = term.map(|_| 2);
        m.cluster_committed = committed.map(|(term, leader, index)| id(term, leader, index));
        m
    }

    #[test]
    fn a_replica_serves_once_it_applied_what_a_leader_had_committed_in_its_own_term() {
        let rebuilt = Rebuilt::default();
        // Even all of its log applied is not enough: after a power failure the log's
        // unsynced tail, which it may have applied and served, is gone (and a node that
        // lost its disk starts with none).
        assert!(rebuilt.check(|| metrics(10, None, None)).is_err(), "no leader");
        // A new leader that has not committed an entry of its own term, or an entry
        // committed by an earlier leader of the same term, may be below what was committed.
        assert!(rebuilt.check(|| metrics(12, Some(3), Some((2, 2, 6)))).is_err());
        assert!(rebuilt.check(|| metrics(12, Some(3), Some((3, 5, 11)))).is_err());
        assert!(rebuilt.check(|| metrics(7, Some(3), Some((3, 2, 14)))).is_err(), "7 of 14");
        // The target is the first such index: later commits do not move it.
        assert!(rebuilt.check(|| metrics(13, Some(3), Some((3, 2, 40)))).is_err(), "13 of 14");
        assert_eq!(rebuilt.check(|| metrics(14, Some(3), Some((3, 2, 60)))), Ok(()));
        assert_eq!(rebuilt.check(|| panic!("asked again")), Ok(()), "once rebuilt, never asked again");
    }
}
