//! openraft's own storage test suite against convoy's RocksDB log store and state machine.

use convoy::raft::log_store::LogStore;
use std::sync::Arc;

use convoy::raft::state_machine::{NoEvents, ShardStateMachine};
use convoy::raft::types::C;
use convoy::store::Store;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct Builder;

impl StoreBuilder<C, LogStore, ShardStateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, ShardStateMachine), StorageError<C>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open store");
        let sm = ShardStateMachine::open(store.clone(), 5, Arc::new(NoEvents)).expect("open state machine");
        Ok((dir, LogStore::open(5, store).expect("open log store"), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).await.expect("openraft storage suite");
}
