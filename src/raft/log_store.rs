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
//! Every append, vote and truncation also rewrites the shard's [`Watermark`] in the same
//! batch. [`LogStore::open`] compares what recovery gave back with it and refuses the shard
//! when the log or the vote came back behind it.
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
use crate::store::keys::{log_key, meta_key, watermark_key, CF_LOG, CF_META, META_PURGED, META_VOTE};
use crate::store::Store;

/// What a shard's log and vote were, as of the last write: the vote and the last log id. It
/// is made durable by the same fsync as the append or vote it describes, so after any
/// recovery the log and the vote are at least this far; if not, recovery lost something
/// that may have been acknowledged or voted on.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Watermark {
    pub vote: Option<Vote>,
    pub last: Option<LogId>,
}

/// One shard's Raft log and vote. Clones (openraft's log readers) share the entry cache.
#[derive(Clone)]
pub struct LogStore {
    pub shard: ShardId,
    pub store: Store,
    cache: Arc<Mutex<EntryCache>>,
    /// The watermark as last written; held while a batch that rewrites it is written, so
    /// the records reach the WAL in the order of the changes.
    watermark: Arc<Mutex<Watermark>>,
}

impl LogStore {
    /// Opens a shard's log, checking it against its watermark: a log or vote that came back
    /// behind the watermark is `Error::Corrupt`, and the shard must not take part in its
    /// group under this replica's identity.
    pub fn open(shard: ShardId, store: Store) -> crate::error::Result<LogStore> {
        let watermark: Watermark = match store.db.get(watermark_key(shard))? {
            Some(v) => decode(&v)?,
            None => Watermark::default(),
        };
        let vote: Option<Vote> = store.get(CF_META, &meta_key(shard, META_VOTE))?.map(|v| decode(&v)).transpose()?;
        let purged = purge_point(&store, shard)?;
        let last: Option<LogId> = store.log_last(shard)?.map(|v| decode::<Entry>(&v).map(|e| e.log_id)).transpose()?;
        let last = last.max(purged);
        let vote_behind = watermark.vote.as_ref().is_some_and(|w| !vote.as_ref().is_some_and(|v| v >= w));
        let log_behind = watermark.last.is_some() && last < watermark.last;
        let tolerate = crate::planted::active(crate::planted::Bug::TolerateWalLoss);
        if (vote_behind || log_behind) && !tolerate {
            return Err(crate::error::Error::Corrupt(format!(
                "shard {shard}: storage came back behind its watermark (vote {vote:?} < {:?} or last log id {last:?} \
                 < {:?}); this replica may have lost acknowledged entries or a vote",
                watermark.vote, watermark.last
            )));
        }
        Ok(LogStore { shard, store, cache: Arc::default(), watermark: Arc::new(Mutex::new(watermark)) })
    }

    fn watermark(&self) -> std::sync::MutexGuard<'_, Watermark> {
        self.watermark.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        // The cache holds no invariant a panic elsewhere could break halfway: each method
        // leaves it consistent before it returns.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The log id `shard`'s log is purged up to, as recorded.
pub(crate) fn purge_point(store: &Store, shard: ShardId) -> crate::error::Result<Option<LogId>> {
    Ok(store.get(CF_META, &meta_key(shard, META_PURGED))?.map(|v| decode(&v)).transpose()?)
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

/// Runs short Raft storage work (votes, log state, truncations, purges) on Raft's own
/// storage threads ([`super::io_pool`]), never behind scans or snapshot installs.
pub(crate) async fn raft_io<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> io::Result<T> {
    super::io_pool::run(f).await?.map_err(io_err)
}

/// Runs long blocking RocksDB work (a lagging follower's log range, a snapshot install) off
/// the reactor, on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| io::Error::other(format!("storage task: {e}")))?.map_err(io_err)
}

impl LogStore {
    async fn read_meta<T: serde::de::DeserializeOwned + Send + 'static>(&self, kind: u8) -> io::Result<Option<T>> {
        let (store, shard) = (self.store.clone(), self.shard);
        raft_io(move || match store.get(CF_META, &meta_key(shard, kind))? {
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
        let last = raft_io(move || match store.log_last(shard)? {
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
        let (this, vote) = (self.clone(), *vote);
        raft_io(move || {
            let mut wm = this.watermark();
            let mut b = WriteBatch::default();
            b.put_cf(this.store.cf(CF_META), meta_key(this.shard, META_VOTE), encode(&vote));
            wm.vote = Some(vote);
            b.put(watermark_key(this.shard), encode(&*wm));
            this.store.write(b)
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
        // Below the disk reserve's floor, client writes wait for space (see `store::space`);
        // trims, placement changes, blank and membership entries go on.
        let client_writes = || {
            entries.iter().any(|e| {
                use crate::chat::Command;
                matches!(&e.payload, openraft::EntryPayload::Normal(c) if !matches!(c, Command::Trim(_) | Command::TrimUnder(_) | Command::Place(_)))
            })
        };
        let values: Vec<Vec<u8>> = entries.iter().map(encode).collect();
        let bytes: u64 = values.iter().map(|v| v.len() as u64).sum();
        if store.space.exhausted_after(bytes) && client_writes() {
            store.space.room(bytes).await;
        }
        inline(|| {
            let mut wm = self.watermark();
            let mut b = WriteBatch::default();
            let mut sizes = Vec::with_capacity(entries.len());
            for (e, v) in entries.iter().zip(values) {
                sizes.push(v.len());
                b.put_cf(store.cf(CF_LOG), log_key(shard, e.log_id.index), v);
            }
            if let Some(last) = entries.last() {
                wm.last = Some(last.log_id);
                b.put(watermark_key(shard), encode(&*wm));
            }
            store.write(b)?;
            store.space.used(bytes);
            drop(wm);
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
        self.cache().truncate_after(last_log_id.as_ref().map(|l| l.index));
        let this = self.clone();
        raft_io(move || {
            let (store, shard) = (&this.store, this.shard);
            let mut wm = this.watermark();
            let mut b = WriteBatch::default();
            b.delete_range_cf(
                store.cf(CF_LOG),
                log_key(shard, from).to_vec(),
                crate::store::keys::shard_range(shard).1,
            );
            // The log legitimately goes back: so does the watermark, in the same batch.
            wm.last = last_log_id;
            b.put(watermark_key(shard), encode(&*wm));
            store.write(b)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // The state the purged entries would rebuild must survive a crash first. The
        // metadata group's apply and installs go through the WAL: durable after this sync.
        // A data shard's apply bypasses it (`Store::write_unlogged`) and is durable once a
        // flush made it so; when the table files' applied state is still behind the purge
        // point, flush now (openraft purges only what it applied).
        self.store.syncer.sync().await?;
        let (store, shard) = (self.store.clone(), self.shard);
        blocking(move || {
            if super::state_machine::durable_applied(&store, shard)? < Some(log_id) {
                store.flush_all()?;
            }
            Ok(())
        })
        .await?;
        let (store, shard) = (self.store.clone(), self.shard);
        let value = encode(&log_id);
        let upto = log_id.index;
        self.cache().purge(upto);
        raft_io(move || {
            let mut b = WriteBatch::default();
            b.put_cf(store.cf(CF_META), meta_key(shard, META_PURGED), value);
            b.delete_range_cf(store.cf(CF_LOG), log_key(shard, 0), log_key(shard, upto.saturating_add(1)));
            store.write(b)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::log_key;
    use openraft::testing::{blank_ent, log_id};

    fn put_entries(store: &Store, shard: ShardId, upto: u64) {
        let mut b = WriteBatch::default();
        for i in 1..=upto {
            b.put_cf(store.cf(CF_LOG), log_key(shard, i), encode(&blank_ent::<C>(1, 1, i)));
        }
        store.write(b).expect("write entries");
    }

    fn put_watermark(store: &Store, shard: ShardId, wm: &Watermark) {
        let mut b = WriteBatch::default();
        b.put(watermark_key(shard), encode(wm));
        store.write(b).expect("write watermark");
    }

    fn sends(n: usize) -> Vec<crate::chat::Command> {
        (1..=n as u64)
            .map(|seq| {
                crate::chat::Command::Send(crate::chat::SendCommand {
                    conversation: "c".into(),
                    sender: "u".into(),
                    client_id: 1,
                    client_seq: seq,
                    ts_ms: seq,
                    text: "t".into(),
                })
            })
            .collect()
    }

    fn first_entry(store: &Store, shard: ShardId) -> Option<u64> {
        store.log_range(shard, 0, u64::MAX).expect("range").first().map(|e| e.0)
    }

    // A purge first makes the applied state it relies on survive a crash (apply bypasses
    // the WAL): after it, a crash image holds the state at or past the purge point, and the
    // log from just after it. A state behind its log's purge point is refused at open.
    #[tokio::test]
    async fn a_purge_makes_the_state_it_relies_on_durable_first() {
        use crate::raft::state_machine::{apply_for_test, durable_applied, ShardStateMachine};
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        put_entries(&store, 1, 30);
        let mut log = LogStore::open(1, store.clone()).expect("open");
        apply_for_test(&store, 1, sends(10)).expect("apply");
        assert_eq!(durable_applied(&store, 1).expect("durable"), None, "apply alone makes nothing durable");

        log.purge(log_id::<C>(1, 1, 8)).await.expect("purge");
        assert_eq!(first_entry(&store, 1), Some(9));
        assert_eq!(durable_applied(&store, 1).expect("durable").map(|l| l.index), Some(10), "flushed first");

        apply_for_test(&store, 1, sends(5)).expect("apply");
        assert_eq!(durable_applied(&store, 1).expect("durable").map(|l| l.index), Some(10));
        log.purge(log_id::<C>(1, 1, 12)).await.expect("purge");
        assert_eq!(first_entry(&store, 1), Some(13));
        assert_eq!(purge_point(&store, 1).expect("purge point").map(|l| l.index), Some(12));

        let image = tempfile::tempdir().expect("tempdir");
        store.crash_image(image.path());
        let (crashed, _) = Store::open(image.path()).expect("open the crash image");
        let applied = durable_applied(&crashed, 1).expect("durable").map(|l| l.index);
        assert_eq!(applied, Some(15), "a crash after the purge keeps the state it relied on");
        assert_eq!(first_entry(&crashed, 1), Some(13));
        drop(crashed);

        // A state that came back behind the purge point (lost table files) is refused.
        let mut b = WriteBatch::default();
        b.put_cf(store.cf(CF_META), meta_key(2, META_PURGED), encode(&log_id::<C>(1, 1, 12)));
        store.write(b).expect("purge point");
        apply_for_test(&store, 2, sends(5)).expect("apply");
        let refused = ShardStateMachine::open(store.clone(), 2, Arc::new(super::super::state_machine::NoEvents))
            .err()
            .expect("a state behind its purge point is refused");
        assert!(matches!(refused, crate::error::Error::Corrupt(_)), "{refused}");
        ShardStateMachine::open(store, 1, Arc::new(super::super::state_machine::NoEvents))
            .expect("a state at or past its purge point opens");
    }

    // A log or vote that came back behind its watermark refuses the shard; a log at or past
    // it, or a purge point that covers it, opens.
    #[test]
    fn a_log_or_vote_behind_the_watermark_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        put_entries(&store, 1, 5);
        put_watermark(&store, 1, &Watermark { vote: None, last: Some(log_id::<C>(1, 1, 5)) });
        LogStore::open(1, store.clone()).expect("a log at its watermark opens");

        put_watermark(&store, 1, &Watermark { vote: None, last: Some(log_id::<C>(1, 1, 9)) });
        let refused = LogStore::open(1, store.clone()).err().expect("a log behind its watermark is refused");
        assert!(matches!(refused, crate::error::Error::Corrupt(_)), "{refused}");

        // A purge point past the watermark covers it (the log was compacted, not lost).
        let mut b = WriteBatch::default();
        b.put_cf(store.cf(CF_META), meta_key(1, META_PURGED), encode(&log_id::<C>(1, 1, 12)));
        store.write(b).expect("purge point");
        LogStore::open(1, store.clone()).expect("a purge point past the watermark opens");

        let vote = Vote::new(3, 2);
        put_watermark(&store, 2, &Watermark { vote: Some(vote), last: None });
        assert!(LogStore::open(2, store.clone()).is_err(), "a vote lost behind its watermark is refused");
        let mut b = WriteBatch::default();
        b.put_cf(store.cf(CF_META), meta_key(2, META_VOTE), encode(&vote));
        store.write(b).expect("vote");
        LogStore::open(2, store).expect("the vote at its watermark opens");
    }
}
