//! openraft's log storage over the shared RocksDB.
//!
//! `append` writes the entries without sync (so they are readable on return, as openraft
//! requires) and queues the completion on the node's [`Syncer`]: the callback fires only
//! after the fsync that covers the write. Votes are made durable the same way before
//! `save_vote` returns. Truncation and purge need no sync of their own: the WAL is
//! sequential, so any later durable write makes them durable too; but purge first syncs,
//! because it may delete entries whose effects on the state machine were written without
//! sync (see `state_machine`).
//!
//! Reads of the newest entries — replication and apply, right after the append — are
//! answered from an in-memory [`EntryCache`] that follows every change of the log.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use rocksdb::WriteBatch;

use super::entry_cache::EntryCache;
use super::types::{Entry, LogId, Vote, C};
use crate::chat::ShardId;
use crate::stages::Stage;
use crate::store::codec::{decode, encode};
use crate::store::keys::{log_key, meta_key, CF_LOG, CF_META, META_PURGED, META_VOTE};
use crate::store::Store;

/// One shard's Raft log and vote. Clones (openraft's log readers) share the entry cache.
#[derive(Clone)]
pub struct LogStore {
    pub shard: ShardId,
    pub store: Store,
    cache: Arc<Mutex<EntryCache>>,
}

impl LogStore {
    pub fn new(shard: ShardId, store: Store) -> LogStore {
        LogStore { shard, store, cache: Arc::default() }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        // The cache holds no invariant a panic elsewhere could break halfway: each method
        // leaves it consistent before it returns.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn io_err(e: crate::error::Error) -> io::Error {
    match e {
        crate::error::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// Runs a short, bounded storage operation on the calling task's thread.
///
/// For the hot path only: unsynced RocksDB writes of one append or apply batch (memtable
/// insert plus a WAL `write(2)` into the page cache; the fsync is the syncer thread's) and
/// reads of entries just appended, which the memtable answers. They take microseconds;
/// sending each to the blocking pool cost two thread wake-ups, and under load the profile
/// of a node was dominated by those context switches. The price: a RocksDB write stall
/// (the memtable waiting for a flush) holds a runtime worker for its duration.
pub(crate) fn inline<T>(f: impl FnOnce() -> crate::error::Result<T>) -> io::Result<T> {
    f().map_err(io_err)
}

/// Log entries a replication read may fetch inline (see [`inline`]); longer ranges — a
/// lagging follower's catch-up — go to the blocking pool.
const INLINE_READ_ENTRIES: u64 = 512;

/// Runs blocking RocksDB work off the reactor.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| io::Error::other(format!("storage task: {e}")))?.map_err(io_err)
}

impl LogStore {
    async fn read_meta<T: serde::de::DeserializeOwned + Send + 'static>(&self, kind: u8) -> io::Result<Option<T>> {
        let (store, shard) = (self.store.clone(), self.shard);
        blocking(move || match store.get(CF_META, &meta_key(shard, kind))? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        })
        .await
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.cache().get(start, end) {
            return Ok(entries);
        }
        let (store, shard) = (self.store.clone(), self.shard);
        let read = move || {
            let raw = store.log_range(shard, start, end)?;
            raw.into_iter().map(|(_, v)| decode::<Entry>(&v).map_err(Into::into)).collect()
        };
        if end.saturating_sub(start) <= INLINE_READ_ENTRIES {
            inline(read)
        } else {
            blocking(read).await
        }
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(META_VOTE).await
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged: Option<LogId> = self.read_meta(META_PURGED).await?;
        let (store, shard) = (self.store.clone(), self.shard);
        let last = blocking(move || match store.log_last(shard)? {
            Some(v) => Ok(Some(decode::<Entry>(&v)?.log_id)),
            None => Ok(None),
        })
        .await?;
        let last_log_id = last.or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let (store, shard, value) = (self.store.clone(), self.shard, encode(vote));
        blocking(move || {
            let mut b = WriteBatch::default();
            b.put_cf(store.cf(CF_META), meta_key(shard, META_VOTE), value);
            store.write(b)
        })
        .await?;
        // Durable before returning: group-committed with every other shard's writes.
        self.store.syncer.sync().await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let shard = self.shard;
        let entries: Vec<Entry> = entries.into_iter().collect();
        let store = &self.store;
        inline(|| {
            let mut b = WriteBatch::default();
            let mut sizes = Vec::with_capacity(entries.len());
            for e in &entries {
                let v = encode(e);
                sizes.push(v.len());
                b.put_cf(store.cf(CF_LOG), log_key(shard, e.log_id.index), v);
            }
            store.write(b)?;
            self.cache().appended(entries.into_iter().zip(sizes));
            // Queued strictly after the write returned: the next fsync covers it.
            let (written, stages) = (std::time::Instant::now(), store.stages.clone());
            store.syncer.after_sync(Box::new(move |r| {
                stages.record(Stage::AppendDurable, written.elapsed());
                callback.io_completed(r)
            }));
            Ok(())
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        // Before the delete: a read in between falls back to RocksDB, as it would without
        // the cache; after it, the cache must not hold what the log no longer does.
        self.cache().truncate_after(last_log_id.map(|l| l.index));
        let (store, shard) = (self.store.clone(), self.shard);
        blocking(move || {
            let mut b = WriteBatch::default();
            b.delete_range_cf(
                store.cf(CF_LOG),
                log_key(shard, from).to_vec(),
                crate::store::keys::shard_range(shard).1,
            );
            store.write(b)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // The state machine's writes up to the purge point must be durable before the log
        // entries that could rebuild them are deleted.
        self.store.syncer.sync().await?;
        let (store, shard) = (self.store.clone(), self.shard);
        let value = encode(&log_id);
        let upto = log_id.index;
        self.cache().purge(upto);
        blocking(move || {
            let mut b = WriteBatch::default();
            b.put_cf(store.cf(CF_META), meta_key(shard, META_PURGED), value);
            b.delete_range_cf(store.cf(CF_LOG), log_key(shard, 0), log_key(shard, upto.saturating_add(1)));
            store.write(b)
        })
        .await
    }
}
