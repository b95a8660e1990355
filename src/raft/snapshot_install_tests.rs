//! A snapshot install interrupted by a crash at each of its steps, on a real openraft group
//! run in process: a leader and a learner over an in-memory network.
//!
//! The learner has applied, snapshotted and purged a log of its own (so its log store has a
//! purge point), is cut off while the leader moves on and purges past it, and can then only
//! catch up by a snapshot. Its install is stopped after step n (`store::snapshot::crash`);
//! the learner's Raft, state machine, log store and database are all dropped, as a crash
//! drops them; its storage is opened again and checked as openraft will read it; then its
//! Raft is started again and must catch up with the leader, entries written meanwhile
//! included, and hold exactly the leader's state.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::storage::{RaftLogStorage, RaftStateMachine};

use super::*;
use crate::chat::{Command, SendCommand};
use crate::raft::log_store::LogStore;
use crate::raft::types::{
    AppendEntriesRequest, AppendEntriesResponse, FnResponder, Member, NodeId, Raft, SnapshotResponse, Vote,
    VoteRequest, VoteResponse,
};
use crate::store::keys::installing_key;
use crate::store::snapshot::{crash, Record, SpoolWriter, Step};

const SHARD: ShardId = 7;
const TIMEOUT: Duration = Duration::from_secs(20);
const LEADER: NodeId = 1;
const LEARNER: NodeId = 2;

/// The in-memory network: every node's Raft and spool directory, and which nodes are cut off.
#[derive(Clone, Default)]
pub(super) struct Router(Arc<Mutex<RouterState>>);

#[derive(Default)]
struct RouterState {
    nodes: HashMap<NodeId, (Raft, PathBuf)>,
    cut: Vec<NodeId>,
}

impl Router {
    fn state(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn node(&self, id: NodeId) -> Result<(Raft, PathBuf), Unreachable<C>> {
        let state = self.state();
        match state.nodes.get(&id) {
            Some(node) if !state.cut.contains(&id) => Ok(node.clone()),
            _ => Err(Unreachable::from_string(format!("node {id} is down or cut off"))),
        }
    }

    pub(super) fn cut(&self, id: NodeId, cut: bool) {
        let mut state = self.state();
        state.cut.retain(|c| *c != id);
        if cut {
            state.cut.push(id);
        }
    }
}

pub(super) struct Net {
    router: Router,
    target: NodeId,
}

impl RaftNetworkFactory<C> for Router {
    type Network = Net;

    async fn new_client(&mut self, target: NodeId, _node: &Member) -> Net {
        Net { router: self.clone(), target }
    }
}

impl RaftNetworkV2<C> for Net {
    type SnapshotData = ShardSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse, RPCError<C>> {
        let (raft, _) = self.router.node(self.target)?;
        raft.append_entries(rpc).await.map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    async fn vote(&mut self, rpc: VoteRequest, _option: RPCOption) -> Result<VoteResponse, RPCError<C>> {
        let (raft, _) = self.router.node(self.target)?;
        raft.vote(rpc).await.map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    /// Streams the snapshot into a spool file of the target and installs it from there, as
    /// `network::receive_snapshot` does (and removes the spool afterwards, as it does).
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse, StreamingError<C>> {
        let (raft, spool_dir) = self.router.node(self.target)?;
        let ShardSnapshot::Local(local) = snapshot.snapshot else {
            return Err(NetworkError::from_string("a spooled snapshot cannot be sent").into());
        };
        let path = spool_dir.join(format!("shard-{SHARD}-{:016x}.snap", rand::random::<u64>()));
        let spooled = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let mut spool = SpoolWriter::create(path)?;
                local.for_each_chunk(|chunk| spool.write_chunk(&chunk))?;
                spool.finish()
            })
            .await
            .expect("spool task")
            .map_err(|e| NetworkError::from_string(e.to_string()))?
        };
        let result = raft
            .install_full_snapshot(vote, Snapshot { meta: snapshot.meta, snapshot: ShardSnapshot::Spooled(spooled) })
            .await;
        let _ = std::fs::remove_file(&path);
        result.map_err(|e| NetworkError::from_string(e.to_string()).into())
    }
}

pub(super) fn raft_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

/// One node's directories.
pub(super) struct Dirs {
    pub(super) db: PathBuf,
    spool: PathBuf,
}

impl Dirs {
    pub(super) fn under(base: &Path, id: NodeId) -> Dirs {
        let dirs = Dirs { db: base.join(format!("n{id}/db")), spool: base.join(format!("n{id}/spool")) };
        std::fs::create_dir_all(&dirs.spool).expect("spool dir");
        dirs
    }
}

/// Opens a node's store, retrying while a crashed instance's last handles are released.
pub(super) async fn open_store(db: &Path) -> Store {
    let started = Instant::now();
    loop {
        match Store::open(db) {
            Ok((store, _)) => return store,
            Err(e) if started.elapsed() < TIMEOUT => {
                tracing::debug!("store still held: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopening {}: {e}", db.display()),
        }
    }
}

pub(super) async fn start(router: &Router, id: NodeId, dirs: &Dirs, store: Store) -> Raft {
    let sm = ShardStateMachine::open(store.clone(), SHARD, Arc::new(NoEvents)).expect("open state machine");
    start_with(router, id, dirs, LogStore::open(SHARD, store).expect("open log store"), sm).await
}

async fn start_with(router: &Router, id: NodeId, dirs: &Dirs, log: LogStore, sm: ShardStateMachine) -> Raft {
    let raft = Raft::new(id, raft_config(), router.clone(), log, sm).await.expect("start raft");
    router.state().nodes.insert(id, (raft.clone(), dirs.spool.clone()));
    raft
}

/// Writes messages `from..to` on the leader, 100 to an entry, each acknowledged.
async fn write(leader: &Raft, from: u64, to: u64) {
    let mut at = from;
    while at < to {
        let end = (at + 100).min(to);
        let sends = (at..end)
            .map(|i| SendCommand {
                conversation: format!("c{}", i % 3),
                sender: "u".into(),
                client_id: 1,
                client_seq: i + 1,
                ts_ms: i,
                text: format!("{i}:{}", "x".repeat(200)),
            })
            .collect();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let responder = FnResponder::new(move |r: openraft::raft::ClientWriteResult<C>| {
            let _ = tx.send(r.is_ok());
        });
        leader.client_write_ff(Command::SendBatch(sends), Some(responder)).await.expect("propose");
        assert!(rx.await.expect("outcome"), "write {at}..{end} failed");
        at = end;
    }
}

fn last_log_index(raft: &Raft) -> Option<u64> {
    crate::raft::metrics_of(raft).last_log_index
}

/// Snapshots `raft`'s state machine once it has applied its whole log, and purges the log.
/// Returns the snapshot's (and purge point's) log id.
async fn snapshot_and_purge(raft: &Raft, what: &str) -> LogId {
    let wait = raft.wait(Some(TIMEOUT));
    let settled = |m: &openraft::RaftMetrics<C>| m.last_applied.map(|l| l.index) == m.last_log_index;
    let applied = wait.metrics(settled, format!("{what} applied")).await.expect("applied").last_applied;
    raft.trigger().snapshot().await.expect("trigger snapshot");
    let built = wait.metrics(|m| m.snapshot >= applied, format!("{what} snapshot")).await.expect("snapshot");
    let snapshot = built.snapshot.expect("a snapshot");
    raft.trigger().purge_log(snapshot.index).await.expect("trigger purge");
    wait.metrics(|m| m.purged >= Some(snapshot), format!("{what} purge")).await.expect("purge");
    snapshot
}

/// Every record of the shard's state, the applied state included.
fn dump(store: &Store) -> Vec<Record> {
    let mut out = Vec::new();
    LocalSnapshot::take(&store.db, SHARD)
        .for_each_record(|r| {
            out.push(r);
            Ok(())
        })
        .expect("dump");
    out
}

/// The scenario, with the learner's install stopped after step `stop` (none: not stopped).
/// Returns the steps the learner's installs took.
async fn crash_during_install(stop: Option<usize>) -> Vec<Step> {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Router::default();
    let (leader_dirs, learner_dirs) = (Dirs::under(dir.path(), LEADER), Dirs::under(dir.path(), LEARNER));
    let leader_store = open_store(&leader_dirs.db).await;
    let leader = start(&router, LEADER, &leader_dirs, leader_store.clone()).await;
    leader.initialize(BTreeMap::from([(LEADER, Member::default())])).await.expect("initialize");
    leader.wait(Some(TIMEOUT)).state(openraft::ServerState::Leader, "leader").await.expect("elected");
    let learner_store = open_store(&learner_dirs.db).await;
    let learner = start(&router, LEARNER, &learner_dirs, learner_store.clone()).await;
    leader.add_learner(LEARNER, Member::default(), true).await.expect("add learner");

    // The learner applies, snapshots and purges a log of its own.
    write(&leader, 0, 300).await;
    learner.wait(Some(TIMEOUT)).applied_index_at_least(last_log_index(&leader), "learner").await.expect("applied");
    let learner_purged = snapshot_and_purge(&learner, "learner").await;

    // Cut off, it falls behind a log the leader then purges: only a snapshot can help it.
    router.cut(LEARNER, true);
    write(&leader, 300, 1300).await;
    let snapshot = snapshot_and_purge(&leader, "leader").await;
    crash::arm(&learner_dirs.db, stop);
    router.cut(LEARNER, false);
    let started = Instant::now();
    match stop {
        None => {
            learner.wait(Some(TIMEOUT)).applied_index_at_least(Some(snapshot.index), "install").await.expect("install");
        }
        Some(_) => {
            while !crash::stopped(&learner_dirs.db) {
                assert!(started.elapsed() < TIMEOUT, "the install never reached step {stop:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The failed install stops the learner's Raft: storage errors are fatal.
            learner
                .wait(Some(TIMEOUT))
                .metrics(|m| m.running_state.is_err(), "learner stops")
                .await
                .expect("the learner stops");
        }
    }
    let steps = crash::disarm(&learner_dirs.db);
    let context = format!("stopped after step {stop:?} of {steps:?}");

    // The crash: nothing of the learner's process survives but its files.
    router.state().nodes.remove(&LEARNER);
    let _ = learner.shutdown().await;
    drop((learner, learner_store));

    // The group moves on meanwhile.
    write(&leader, 1300, 1500).await;

    // Restart: storage first, as openraft reads it at start-up.
    let store = open_store(&learner_dirs.db).await;
    let mut sm = ShardStateMachine::open(store.clone(), SHARD, Arc::new(NoEvents)).expect("open state machine");
    let mut log = LogStore::open(SHARD, store.clone()).expect("open log store");
    let log_state = log.get_log_state().await.expect("log state");
    let (applied, _) = sm.applied_state().await.expect("applied state");
    let current = sm.get_current_snapshot().await.expect("snapshot").map(|s| s.meta.last_log_id);
    assert!(store.get(crate::store::keys::CF_STATE, &installing_key(SHARD)).expect("read").is_none(), "{context}");
    assert!(log_state.last_purged_log_id <= applied, "{context}: purged {log_state:?} past applied {applied:?}");
    assert!(log_state.last_purged_log_id <= log_state.last_log_id, "{context}: {log_state:?}");
    assert_eq!(current, Some(applied), "{context}: the snapshot is the applied state");
    let installed = steps.contains(&Step::Started) || steps.contains(&Step::Finished);
    assert_eq!(applied, Some(if installed { snapshot } else { learner_purged }), "{context}");

    // And it catches up: Raft starts on that storage and follows the leader again.
    let learner = start_with(&router, LEARNER, &learner_dirs, log, sm).await;
    let leader_last = last_log_index(&leader);
    learner.wait(Some(TIMEOUT)).applied_index_at_least(leader_last, "catch up").await.unwrap_or_else(|e| {
        panic!("{context}: the restarted learner did not catch up: {e}; {:?}", crate::raft::metrics_of(&learner))
    });
    assert!(crate::raft::metrics_of(&learner).running_state.is_ok(), "{context}");
    let (want, got) = (dump(&leader_store), dump(&store));
    assert!(want.len() > 1500, "{context}: {} records", want.len());
    assert!(got == want, "{context}: the learner's state differs from the leader's");

    let _ = learner.shutdown().await;
    let _ = leader.shutdown().await;
    steps
}

// Issue 20, finding 4: a crash at any step of a snapshot install leaves a replica that
// restarts without a panic, with a consistent storage (purge point ≤ applied = snapshot),
// and catches up. Enumerates the steps from an install run to the end, then crashes after
// each of them in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_each_install_step_leaves_a_replica_that_restarts_and_catches_up() {
    let steps = crash_during_install(None).await;
    let mut kinds = steps.clone();
    kinds.dedup();
    assert_eq!(kinds, [Step::SpoolDurable, Step::Started, Step::Batch, Step::Finished, Step::Cleaned]);
    assert!(steps.len() >= 6, "several batches: {steps:?}");
    for stop in 0..steps.len() {
        let seen = crash_during_install(Some(stop)).await;
        assert_eq!(seen, steps[..=stop], "the install stopped after step {stop}");
    }
}
