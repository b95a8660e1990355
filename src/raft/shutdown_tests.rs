//! A group's shutdown waits for its state machine: the applies openraft had already queued
//! to its state-machine worker are written before `Group::shutdown` returns, never after
//! (when a dropped shard's data is already deleted, or the store closed).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::snapshot_install_tests::{open_store, raft_config, Dirs, Router};
use super::*;
use crate::chat::{Command, SendCommand};
use crate::raft::log_store::LogStore;
use crate::raft::types::{Member, Raft};
use crate::raft::Group;

const SHARD: ShardId = 3;
const TIMEOUT: Duration = Duration::from_secs(20);

fn send(seq: u64) -> Command {
    Command::Send(SendCommand {
        conversation: "c".into(),
        sender: "u".into(),
        client_id: 1,
        client_seq: seq,
        ts_ms: seq,
        text: format!("message {seq}"),
    })
}

fn applied_index(store: &Store) -> Option<u64> {
    read_applied(store, SHARD).expect("read applied").last_applied.map(|l| l.index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_stops_only_once_its_queued_applies_are_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dirs = Dirs::under(dir.path(), 1);
    let store = open_store(&dirs.db).await;
    let mut sm = ShardStateMachine::open(store.clone(), SHARD, Arc::new(NoEvents)).expect("open state machine");
    let started = Arc::new(AtomicU64::new(0));
    sm.slow_apply = Some((Duration::from_millis(300), started.clone()));
    let stopped = sm.stopped();
    let log = LogStore::open(SHARD, store.clone()).expect("open log store");
    let raft = Raft::new(1, raft_config(), Router::default(), log, sm).await.expect("start raft");
    raft.initialize(BTreeMap::from([(1, Member::default())])).await.expect("initialize");
    let wait = raft.wait(Some(TIMEOUT));
    let settled = |m: &openraft::RaftMetrics<C>| {
        m.current_leader == Some(1) && m.last_applied.map(|l| l.index) == m.last_log_index
    };
    wait.metrics(settled, "leader, all applied").await.expect("settled");
    let before = started.load(Ordering::SeqCst);

    // Sends committed one by one, each applied in a batch of its own that takes 300 ms: the
    // worker's queue fills while the first is being applied.
    for seq in 1..=5 {
        raft.client_write_ff(send(seq), None).await.expect("propose");
    }
    let deadline = Instant::now() + TIMEOUT;
    while started.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "no apply started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rebuilt = Arc::new(crate::raft::Rebuilt::default());
    let group = Group { shard: SHARD, replica: 1, raft, rebuilt, stopped };
    group.shutdown().await.expect("shutdown");
    let at_return = applied_index(&store);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(applied_index(&store), at_return, "the state machine wrote after its group's shutdown returned");
    let last = crate::raft::metrics_of(&group.raft).last_log_index;
    assert!(at_return.is_some() && at_return <= last, "applied {at_return:?}, log {last:?}");
}
