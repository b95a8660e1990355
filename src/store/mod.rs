//! RocksDB storage: one database per node shared by every shard.
//!
//! - [`keys`] is the whole on-disk schema, [`codec`] the value format.
//! - [`syncer`] provides group commit: writes go in without sync, one thread fsyncs the WAL
//!   for everyone and only then completes their callbacks.
//! - [`snapshot`] reads a shard's state under a RocksDB snapshot and installs one.
//!
//! This module knows RocksDB and the chat domain, not openraft: Raft log entries are opaque
//! bytes here; `crate::raft` adapts them. Every call here blocks on disk and must run off
//! the async reactor (`tokio::task::spawn_blocking`).
//!
//! Durability contract: a write returned by [`Store::write`] with `sync = false` survives a
//! process crash (it is in the OS page cache through the WAL) but not a power loss until the
//! next [`syncer::Syncer`] round; the WAL is sequential, so a durable write implies every
//! earlier write is durable too.

pub mod codec;
pub mod keys;
pub mod snapshot;
pub mod space;
pub mod syncer;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::chat::{DedupKey, DedupRecord, Members, Retention, ShardId, StoredMessage};
use crate::error::{Error, Result};
use crate::stages::Stages;
use keys::*;

pub use syncer::Syncer;

/// A node's storage: the database and its group-commit syncer. When the last clone is
/// dropped the syncer thread is joined and the database closed (field order: `db` first,
/// then `syncer`, whose drop releases the thread's reference).
#[derive(Clone)]
pub struct Store {
    pub db: Arc<DB>,
    pub syncer: Syncer,
    /// Latency histograms of the node's send path (see `crate::stages`).
    pub stages: Arc<Stages>,
    /// Message ranges trimmed by retention whose space is yet to be reclaimed.
    pub reclaim: Arc<Reclaim>,
    /// The free space of the data directory's filesystem, and the node's reserve.
    pub space: Arc<space::DiskSpace>,
}

/// A user's view of a conversation for a cursor read (see [`Store::cursor_view`]).
#[derive(Debug)]
pub struct CursorView {
    pub members: Option<Members>,
    /// The user's cursor (0: none set).
    pub cursor: u64,
    /// The conversation's head (0: nothing sent).
    pub head: u64,
    /// The earliest retained offset (1 until a trim).
    pub earliest: u64,
}

/// A conversation trimmed by retention: its shard, its id, and the first offset kept.
pub type Trimmed = (ShardId, String, u64);

/// What retention trimmed since the last [`Store::reclaim`]: how many messages, and in which
/// conversations up to which offset.
#[derive(Default)]
pub struct Reclaim {
    pending: std::sync::Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    messages: u64,
    conversations: std::collections::BTreeMap<(ShardId, String), u64>,
    since: Option<std::time::Instant>,
}

impl Reclaim {
    /// Notes `messages` trimmed from a conversation, which now keeps offsets from `before`.
    pub fn trimmed(&self, shard: ShardId, conversation: &str, messages: u64, before: u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.messages += messages;
        p.since.get_or_insert_with(std::time::Instant::now);
        let kept_from = p.conversations.entry((shard, conversation.to_string())).or_default();
        *kept_from = (*kept_from).max(before);
    }

    /// What to reclaim now, if `after_messages` messages were trimmed or the first of them
    /// waits for `after` or longer; taken, so each is reclaimed once.
    pub fn due(&self, after_messages: u64, after: std::time::Duration) -> Option<(u64, Vec<Trimmed>)> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let waited = p.since.is_some_and(|t| t.elapsed() >= after);
        if p.messages == 0 || (p.messages < after_messages && !waited) {
            return None;
        }
        let taken = std::mem::take(&mut *p);
        Some((taken.messages, taken.conversations.into_iter().map(|((s, c), b)| (s, c, b)).collect()))
    }
}

/// A write or WAL fsync slower than this is logged: it holds up every shard of the node
/// (an unsynced write runs on a runtime worker; the fsync gates every acknowledgement).
pub const SLOW_IO: std::time::Duration = std::time::Duration::from_millis(50);

/// Memtable size of the Raft log family, in bytes: entries are short-lived.
const LOG_WRITE_BUFFER_BYTES: usize = 32 << 20;
/// Memtable size of the messages family, in bytes: the bulk of what is written.
const MESSAGES_WRITE_BUFFER_BYTES: usize = 64 << 20;
/// Memtable size of the small families (Raft metadata, shard state, dedup records), in bytes.
const SMALL_WRITE_BUFFER_BYTES: usize = 16 << 20;
/// Hash buckets of the messages family's memtable (conversations share a bucket beyond it).
const MESSAGES_MEMTABLE_BUCKETS: usize = 100_000;
/// Hash buckets of the dedup family's memtable (scopes share a bucket beyond it).
const DEDUP_MEMTABLE_BUCKETS: usize = 100_000;
/// Messages [`Store::tally_bytes`] reads per window.
#[cfg(not(test))]
const BYTES_WINDOW: u64 = 256;
#[cfg(test)]
const BYTES_WINDOW: u64 = 8;
/// What a byte limit keeps of a conversation, as [`Store::tally_bytes`] counted it: the
/// stored messages in `[from, head]`, `bytes` of stored values in all, at most the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BytesTally {
    pub head: u64,
    pub from: u64,
    pub bytes: u64,
    /// Whether the limit leaves older stored messages out (`from` is above the earliest).
    pub cut: bool,
    /// How many messages this count read.
    pub read: u64,
}

/// Bloom filter bits per key of every family's table files.
const BLOOM_BITS_PER_KEY: f64 = 10.0;

fn cf_options(name: &str) -> Options {
    let mut o = Options::default();
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
    o.set_block_based_table_factory(&table);
    o.set_compression_type(DBCompressionType::Lz4);
    match name {
        CF_LOG => {
            // Short-lived entries: cheap compression, small memtables.
            o.set_write_buffer_size(LOG_WRITE_BUFFER_BYTES);
        }
        CF_MESSAGES => {
            // A memtable hashed by conversation (its key prefix), each bucket a small
            // skiplist: an insert walks its own conversation's messages, which arrive in
            // offset order, not one skiplist of every conversation's, whose walk missed the
            // cache at every level. Reads within a conversation stay in its bucket
            // (`prefix_same_as_start`) and go forwards only: the hashed memtable cannot seek
            // backwards. The reads that cross conversations (snapshots) ask for
            // `total_order_seek`, which sorts the memtable for them.
            hash_memtable_by(
                &mut o,
                "convoy.conversation",
                keys::message_conversation_prefix,
                keys::is_message_key,
                MESSAGES_MEMTABLE_BUCKETS,
            );
            o.set_bottommost_compression_type(DBCompressionType::Zstd);
            o.set_write_buffer_size(MESSAGES_WRITE_BUFFER_BYTES);
        }
        CF_DEDUP => {
            // Hashed by scope (conversation, sender, client), like the messages by
            // conversation and for the same reason: an insert walks its own scope, whose
            // sequence numbers mostly arrive in order, not one skiplist of every scope's.
            // The one range read, a scope's highest sequence number, is a forward seek
            // (complemented sequence numbers).
            hash_memtable_by(
                &mut o,
                "convoy.dedup-scope",
                keys::dedup_key_scope,
                keys::is_dedup_key,
                DEDUP_MEMTABLE_BUCKETS,
            );
            o.set_write_buffer_size(SMALL_WRITE_BUFFER_BYTES);
        }
        _ => o.set_write_buffer_size(SMALL_WRITE_BUFFER_BYTES),
    }
    o
}

/// A family's prefix (`prefix` of the keys `in_domain` accepts, under `name`) and a memtable
/// hashed by it into `buckets` small skiplists.
fn hash_memtable_by(
    o: &mut Options,
    name: &str,
    prefix: fn(&[u8]) -> &[u8],
    in_domain: fn(&[u8]) -> bool,
    buckets: usize,
) {
    o.set_prefix_extractor(rocksdb::SliceTransform::create(name, prefix, Some(in_domain)));
    o.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
        bucket_count: buckets,
        height: 4,
        branching_factor: 4,
    });
}

/// Flushes every family at one point and waits (see [`Store::flush_all`]).
fn flush_every_family(db: &DB) -> Result<()> {
    let mut fo = rocksdb::FlushOptions::default();
    fo.set_wait(true);
    let cfs: Vec<&ColumnFamily> =
        ALL_CFS.iter().map(|name| db.cf_handle(name).expect("schema column family exists")).collect();
    db.flush_cfs_opt(&cfs, &fo)?;
    db.flush_opt(&fo)?;
    Ok(())
}

/// Legacy dedup records [`migrate_legacy_dedup`] moves per batch.
const LEGACY_DEDUP_BATCH: usize = 10_000;

/// Moves dedup records of the old layout (in `shard_state`, sequence numbers as is) to the
/// `dedup` family, converted (see [`keys::dedup_key_from_legacy`]); returns how many. Two
/// seeks per shard present when there is nothing to move. Each batch moves its records and
/// deletes the old ones at once, through the WAL, so an interrupted migration resumes at
/// the next open; every family is flushed after it, and the old records' range compacted,
/// so that their deletions are not walked again by every later open and snapshot.
fn migrate_legacy_dedup(db: &DB) -> Result<u64> {
    let state = db.cf_handle(CF_STATE).expect("schema column family exists");
    let dedup = db.cf_handle(CF_DEDUP).expect("schema column family exists");
    let mut moved = 0u64;
    let mut shards = Vec::new();
    let mut iter = db.raw_iterator_cf(state);
    iter.seek_to_first();
    while let Some(key) = iter.key() {
        let shard_bytes: [u8; 4] = key
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::Corrupt(format!("shard state key of {} bytes", key.len())))?;
        let shard = ShardId::from_be_bytes(shard_bytes);
        let prefix = keys::legacy_dedup_prefix(shard);
        let before = moved;
        iter.seek(prefix);
        let mut batch = WriteBatch::default();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if !key.starts_with(&prefix) {
                break;
            }
            let converted = keys::dedup_key_from_legacy(key)
                .ok_or_else(|| Error::Corrupt(format!("malformed legacy dedup key of {} bytes", key.len())))?;
            batch.put_cf(dedup, converted, value);
            batch.delete_cf(state, key);
            moved += 1;
            if batch.len() >= 2 * LEGACY_DEDUP_BATCH {
                db.write(std::mem::take(&mut batch))?;
            }
            iter.next();
        }
        iter.status()?;
        if !batch.is_empty() {
            db.write(batch)?;
        }
        if moved > before {
            tracing::info!(shard, records = moved - before, "moving dedup records to their own column family");
            shards.push(shard);
        }
        match shard.checked_add(1) {
            Some(next) => iter.seek(next.to_be_bytes()),
            None => break,
        }
    }
    iter.status()?;
    if moved > 0 {
        // Every family at one point, as every flush here (see `Store::write_unlogged`).
        flush_every_family(db)?;
        for shard in shards {
            let (lo, hi) = keys::legacy_dedup_range(shard);
            db.compact_range_cf(state, Some(lo), Some(hi));
        }
    }
    Ok(moved)
}

impl Store {
    /// Opens (creating if needed) the node's database under `dir`. Returns the store and
    /// whether it was created just now.
    pub fn open(dir: &Path) -> Result<(Store, bool)> {
        std::fs::create_dir_all(dir)?;
        let fresh = !dir.join("CURRENT").exists();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Keep WAL writes in the OS buffer immediately (no manual WAL flush), so a process
        // crash loses nothing written; the syncer makes them power-safe.
        opts.set_manual_wal_flush(false);
        opts.set_keep_log_file_num(4);
        // Damage is reported, never hidden: a WAL record that does not check (a bad checksum
        // or length inside the log) fails the open; point-in-time recovery would silently cut
        // the log there, taking fsynced votes and acknowledged entries with it. Only the
        // last record may be incomplete: a crash or a kill in the middle of a write leaves
        // one (a record over RocksDB's 1 MiB write buffer takes several `write(2)`s), and it
        // was never synced, so nothing acknowledged is in it. Absolute consistency refused
        // that too, and a killed node could not start again without a rebuild. WAL files are
        // never recycled, whose stale records would look like a torn tail. Synced WALs are
        // tracked in the MANIFEST, so a missing or shortened closed WAL is an error too.
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        opts.set_recycle_log_file_num(0);
        opts.set_track_and_verify_wals_in_manifest(true);
        opts.set_paranoid_checks(true);
        // Apply writes data shards' state without the WAL (see `write_unlogged`): every flush,
        // automatic or not, persists all families at one point, so the flushed messages and
        // shard state never come from different moments.
        opts.set_atomic_flush(true);
        // The hashed memtables (messages, dedup records) take one writer at a time.
        opts.set_allow_concurrent_memtable_write(false);
        if crate::planted::active(crate::planted::Bug::TolerateWalLoss) {
            tracing::error!("PLANTED BUG tolerate-wal-loss: point-in-time WAL recovery with recycling");
            opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
            opts.set_recycle_log_file_num(4);
            opts.set_track_and_verify_wals_in_manifest(false);
        }
        let cfs = ALL_CFS.iter().map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name)));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let moved = migrate_legacy_dedup(&db)?;
        if moved > 0 {
            tracing::info!(records = moved, "moved dedup records to their own column family");
        }
        let db = Arc::new(db);
        let stages = Arc::new(Stages::default());
        let syncer = Syncer::start(db.clone(), stages.clone());
        let space = space::DiskSpace::watch(dir);
        Ok((Store { db, syncer, stages, reclaim: Arc::default(), space }, fresh))
    }

    /// The handle of a column family this schema created at open.
    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("every schema column family is created at open")
    }

    /// Bytes on disk: each column family's live table files, and the WAL files (`wal`).
    pub fn disk_bytes(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = ALL_CFS
            .iter()
            .map(|name| {
                let bytes = self.db.property_int_value_cf(self.cf(name), "rocksdb.live-sst-files-size");
                (*name, bytes.ok().flatten().unwrap_or(0))
            })
            .collect();
        let wal = std::fs::read_dir(self.db.path())
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                    .sum()
            })
            .unwrap_or(0);
        out.push(("wal", wal));
        out
    }

    /// RocksDB's estimate of the bytes `shard`'s messages take in table files (flushed data
    /// only, compressed as stored): about what a snapshot of the shard streams, or less.
    pub fn shard_bytes(&self, shard: ShardId) -> u64 {
        let (start, end) = keys::shard_range(shard);
        let range = rocksdb::Range::new(&start, &end);
        self.db.get_approximate_sizes_cf(self.cf(CF_MESSAGES), &[range]).first().copied().unwrap_or(0)
    }

    /// RocksDB's estimate of the messages stored (keys of the messages family).
    pub fn estimated_messages(&self) -> u64 {
        self.db.property_int_value_cf(self.cf(CF_MESSAGES), "rocksdb.estimate-num-keys").ok().flatten().unwrap_or(0)
    }

    /// Writes a batch without fsync (see the module's durability contract).
    pub fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.write_timed(batch, &wo, "slow storage write (disk or page-cache writeback)")
    }

    /// Writes a batch with `wo`, logging `slow` if it took [`SLOW_IO`] or more.
    fn write_timed(&self, batch: WriteBatch, wo: &WriteOptions, slow: &str) -> Result<()> {
        let started = std::time::Instant::now();
        self.db.write_opt(batch, wo)?;
        let took = started.elapsed();
        if took >= SLOW_IO {
            tracing::warn!(took_ms = took.as_millis() as u64, "{slow}");
        }
        Ok(())
    }

    /// Writes a batch to the memtables only, without the WAL: for what can be rebuilt from
    /// the Raft log, which holds the same data durably (a data shard's apply batches). After
    /// a crash, the families come back as of the last flush, every one at the same point
    /// (atomic flush), and what is not there is rebuilt by applying the log again: a log is
    /// never purged past the state that flushes made durable
    /// ([`Store::durable_state`]: the log store's purge flushes first when it is behind).
    ///
    /// Why: the WAL already carries each message in its log entry; writing the applied copy
    /// there too doubles the WAL bytes every fsync covers, and the CPU to frame and write
    /// them.
    pub fn write_unlogged(&self, batch: WriteBatch) -> Result<()> {
        if crate::planted::active(crate::planted::Bug::TolerateWalLoss) {
            // That bug's recycled WAL files refuse writes without the WAL; it is the old
            // storage, which wrote apply through the WAL.
            return self.write(batch);
        }
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.write_timed(batch, &wo, "slow storage write (memtable stall)")
    }

    /// Reads a value of a state family as the table files hold it: what survives a crash of
    /// the process or the machine, once at least one write without the WAL happened (RocksDB
    /// then skips every memtable for this read tier). Before any such write, memtables are
    /// read too, and they hold only WAL writes: durable once the syncer has run after them.
    pub fn durable_state(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut ro = ReadOptions::default();
        ro.set_read_tier(rocksdb::ReadTier::Persisted);
        Ok(self.db.get_cf_opt(self.cf(CF_STATE), key, &ro)?)
    }

    /// Flushes every family at one point and waits: afterwards the table files hold every
    /// write made before the call, those without the WAL included. For the rare writes that
    /// replace a shard's state wholesale (snapshot installs, a replica's deletion): the
    /// durable state must not go on showing what they replaced.
    pub fn flush_all(&self) -> Result<()> {
        flush_every_family(&self.db)
    }

    /// Deletes everything this node holds of `shard`: its log, vote, replicated state and
    /// messages, and its watermark. For a replica that left the shard (its group stopped
    /// and its removal committed): a later replica of the shard here starts empty.
    pub fn delete_shard(&self, shard: ShardId) -> Result<()> {
        let (lo, hi) = shard_range(shard);
        let mut b = WriteBatch::default();
        for cf in ALL_CFS {
            b.delete_range_cf(self.cf(cf), &lo, &hi);
        }
        b.delete(watermark_key(shard));
        self.write_sync(b)?;
        // The table files may still hold the deleted replica's applied state, which a later
        // replica's purges would take for its own.
        self.flush_all()
    }

    /// Writes a batch and fsyncs the WAL before returning (rare writes only).
    pub fn write_sync(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// Whether any shard has Raft metadata (a vote, a purge point) here.
    pub fn has_raft_state(&self) -> Result<bool> {
        let mut iter = self.db.iterator_cf(self.cf(CF_META), IteratorMode::Start);
        Ok(iter.next().transpose()?.is_some())
    }

    // ---- Raft log (opaque entries) ----

    /// Entries with index in `[start, end)`, in order, from the first one present (the
    /// range may begin below a purged prefix), stopping at the first gap after it.
    pub fn log_range(&self, shard: ShardId, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(log_key(shard, end).to_vec());
        let from = log_key(shard, start);
        let iter = self.db.iterator_cf_opt(self.cf(CF_LOG), ro, IteratorMode::From(&from, Direction::Forward));
        let mut expect: Option<u64> = None;
        for item in iter {
            let (k, v) = item?;
            let index = log_key_index(&k).ok_or_else(|| Error::Corrupt("malformed log key".into()))?;
            if expect.is_some_and(|e| e != index) {
                break;
            }
            out.push((index, v.to_vec()));
            expect = Some(index + 1);
        }
        Ok(out)
    }

    /// The last entry of a shard's log, if any.
    pub fn log_last(&self, shard: ShardId) -> Result<Option<Vec<u8>>> {
        let (lo, hi) = shard_range(shard);
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(lo);
        let mut iter = self.db.iterator_cf_opt(self.cf(CF_LOG), ro, IteratorMode::From(&hi, Direction::Reverse));
        match iter.next() {
            Some(item) => Ok(Some(item?.1.to_vec())),
            None => Ok(None),
        }
    }

    // ---- State machine reads ----

    pub fn head(&self, shard: ShardId, conversation: &str) -> Result<u64> {
        decode_head(self.get(CF_STATE, &head_key(shard, conversation))?)
    }

    pub fn dedup(&self, shard: ShardId, key: &DedupKey) -> Result<Option<DedupRecord>> {
        match self.get(CF_DEDUP, &dedup_key(shard, key))? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The highest `client_seq` with a dedup record under `scope` (see
    /// [`keys::dedup_scope`]), if any: one seek to the scope, whose first key holds its
    /// highest sequence number (complemented, see [`keys::dedup_key`]).
    pub fn dedup_max_seq(&self, scope: &[u8]) -> Result<Option<u64>> {
        let mut ro = ReadOptions::default();
        ro.set_prefix_same_as_start(true);
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_DEDUP), ro);
        iter.seek(scope);
        let found = match iter.key().filter(|key| key.starts_with(scope)) {
            Some(key) => Some(
                keys::dedup_key_seq(key, scope)
                    .ok_or_else(|| Error::Corrupt(format!("malformed dedup key of {} bytes", key.len())))?,
            ),
            None => None,
        };
        iter.status()?;
        Ok(found)
    }

    /// A conversation's members; `None`: it does not exist.
    pub fn members(&self, shard: ShardId, conversation: &str) -> Result<Option<Members>> {
        match self.get(CF_STATE, &members_key(shard, conversation))? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// A conversation's members, for a reader's access check: `Unavailable` while a snapshot
    /// install replaces the shard here, whose cleared state would read as a conversation
    /// that does not exist (which anyone may read).
    pub fn members_for_reader(&self, shard: ShardId, conversation: &str) -> Result<Option<Members>> {
        let snap = self.db.snapshot();
        refuse_installing(&snap, self.cf(CF_STATE), shard)?;
        match snap.get_cf(self.cf(CF_STATE), members_key(shard, conversation))? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// A conversation's members, its head and, given a key, the send stored under it, all
    /// from one view of the shard (`Unavailable` while a snapshot install replaces it): what
    /// a shard leader checks a write by a non-member against (see `service::outsiders`).
    pub fn writer_view(
        &self,
        shard: ShardId,
        conversation: &str,
        key: Option<&DedupKey>,
    ) -> Result<(Option<Members>, u64, Option<DedupRecord>)> {
        let snap = self.db.snapshot();
        refuse_installing(&snap, self.cf(CF_STATE), shard)?;
        let members = match snap.get_cf(self.cf(CF_STATE), members_key(shard, conversation))? {
            Some(v) => Some(codec::decode(&v)?),
            None => None,
        };
        let head = decode_head(snap.get_cf(self.cf(CF_STATE), head_key(shard, conversation))?)?;
        let stored = match key {
            Some(key) => match snap.get_cf(self.cf(CF_DEDUP), dedup_key(shard, key))? {
                Some(v) => Some(codec::decode(&v)?),
                None => None,
            },
            None => None,
        };
        Ok((members, head, stored))
    }

    /// The earliest retained offset of a conversation (1 until a trim).
    pub fn earliest(&self, shard: ShardId, conversation: &str) -> Result<u64> {
        match self.get(CF_STATE, &earliest_key(shard, conversation))? {
            Some(v) => Ok(codec::decode::<u64>(&v)?),
            None => Ok(1),
        }
    }

    /// The retention set for a conversation, if any.
    pub fn retention(&self, shard: ShardId, conversation: &str) -> Result<Option<Retention>> {
        match self.get(CF_STATE, &retention_key(shard, conversation))? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Up to `max` conversations of a shard with their heads, in key order, from the one
    /// after `after` (from the first with `None`). A head that does not decode is `None`;
    /// see [`Store::records_page`].
    pub fn heads_page(&self, shard: ShardId, after: Option<&str>, max: usize) -> Result<Vec<(String, Option<u64>)>> {
        self.records_page(&heads_prefix(shard), after.map(|c| head_key(shard, c)), max)
    }

    /// Up to `max` conversations of a shard with a retention of their own, as
    /// [`Store::heads_page`] pages the heads.
    pub fn retentions_page(
        &self,
        shard: ShardId,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, Option<Retention>)>> {
        self.records_page(&retentions_prefix(shard), after.map(|c| retention_key(shard, c)), max)
    }

    /// Up to `max` of a shard's per-conversation records under `prefix` (heads or retention
    /// records), decoded, with their conversations, from the key after `after` (from the
    /// first with `None`). One damaged record does not stop a page: a value that does not
    /// decode is given as `None` (its conversation is still named, so a pager moves past it),
    /// and a key that names no conversation is logged and skipped. Only a failed read is an
    /// error.
    fn records_page<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &[u8],
        after: Option<Vec<u8>>,
        max: usize,
    ) -> Result<Vec<(String, Option<T>)>> {
        let mut ro = ReadOptions::default();
        let mut upper = prefix.to_vec();
        upper.push(0xff);
        ro.set_iterate_upper_bound(upper);
        let start = after.clone().unwrap_or_else(|| prefix.to_vec());
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(self.cf(CF_STATE), ro, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if after.as_deref() == Some(&k[..]) {
                continue;
            }
            if out.len() >= max {
                break;
            }
            let Some(conversation) = keys::record_conversation(&k) else {
                tracing::warn!(key_bytes = k.len(), "malformed conversation record key; passed over");
                continue;
            };
            let value = codec::decode(&v)
                .map_err(|e| tracing::warn!(conversation, error = %e, "conversation record does not decode"))
                .ok();
            out.push((conversation.to_string(), value));
        }
        Ok(out)
    }

    /// Visits a conversation's stored messages from `from` (decoded), in offset order, until
    /// `visit` answers false or `max` were visited. Returns how many were visited.
    pub fn each_message(
        &self,
        shard: ShardId,
        conversation: &str,
        from: u64,
        max: u64,
        mut visit: impl FnMut(StoredMessage) -> bool,
    ) -> Result<u64> {
        let mut upper = conversation_prefix(shard, conversation);
        upper.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(upper);
        ro.set_prefix_same_as_start(true);
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_MESSAGES), ro);
        iter.seek(message_key(shard, conversation, from));
        let mut visited = 0;
        while visited < max {
            let Some(value) = iter.value() else { break };
            visited += 1;
            if !visit(codec::decode(value)?) {
                break;
            }
            iter.next();
        }
        iter.status()?;
        Ok(visited)
    }

    /// The idempotency keys of a conversation's stored messages in `[from, before)`.
    pub fn keys_between(&self, shard: ShardId, conversation: &str, from: u64, before: u64) -> Result<Vec<DedupKey>> {
        let mut keys = Vec::new();
        self.each_message(shard, conversation, from, before.saturating_sub(from), |m| {
            let inside = m.offset < before;
            if inside {
                keys.push(DedupKey::of_stored(&m));
            }
            inside
        })?;
        Ok(keys)
    }

    /// The offset from which a conversation's newest stored messages take at most
    /// `max_bytes` (their stored values), reading back from the head; `None` if all fit.
    /// Reads at most `max_bytes` and a window of messages more.
    pub fn keep_bytes_from(&self, shard: ShardId, conversation: &str, max_bytes: u64) -> Result<Option<u64>> {
        let tally = self.tally_bytes(shard, conversation, max_bytes, None)?;
        Ok(tally.cut.then_some(tally.from))
    }

    /// What a byte limit of `max_bytes` keeps of a conversation now, counted on from `prev`
    /// (an earlier count under the same limit) when it still holds: only the messages sent
    /// since are read, and those the limit now leaves behind. Counted again from the head
    /// (as [`Store::keep_bytes_from`]) without one, or when something else (a trim by another
    /// limit) deleted messages `prev` counted.
    ///
    /// One snapshot for the head, the earliest offset and every window: a trim applied
    /// meanwhile must not look like the end of the conversation.
    pub fn tally_bytes(
        &self,
        shard: ShardId,
        conversation: &str,
        max_bytes: u64,
        prev: Option<BytesTally>,
    ) -> Result<BytesTally> {
        let snap = self.db.snapshot();
        let head = decode_head(snap.get_cf(self.cf(CF_STATE), head_key(shard, conversation))?)?;
        let earliest = match snap.get_cf(self.cf(CF_STATE), earliest_key(shard, conversation))? {
            Some(v) => codec::decode::<u64>(&v)?,
            None => 1,
        };
        let Some(mut t) = prev.filter(|p| p.from >= earliest && p.head <= head) else {
            return self.tally_from_head(&snap, shard, conversation, head, max_bytes);
        };
        t.read = 0;
        // The messages sent since, in windows.
        let mut at = t.head + 1;
        while at <= head {
            let before = at.saturating_add(BYTES_WINDOW).min(head.saturating_add(1));
            let sizes = self.message_sizes(&snap, shard, conversation, at, before)?;
            t.read += sizes.len() as u64;
            t.bytes = t.bytes.saturating_add(sizes.iter().map(|&(_, len)| len).sum::<u64>());
            at = before;
        }
        t.head = head;
        // Over the limit: the oldest counted are left behind until the rest fit.
        while t.bytes > max_bytes {
            let sizes = self.message_sizes(&snap, shard, conversation, t.from, t.from.saturating_add(BYTES_WINDOW))?;
            if sizes.first().is_none_or(|&(offset, _)| offset != t.from) {
                // The count does not match what is stored: counted again.
                return self.tally_from_head(&snap, shard, conversation, head, max_bytes);
            }
            t.read += sizes.len() as u64;
            for &(offset, len) in &sizes {
                if t.bytes <= max_bytes {
                    break;
                }
                let Some(rest) = t.bytes.checked_sub(len) else {
                    return self.tally_from_head(&snap, shard, conversation, head, max_bytes);
                };
                t.bytes = rest;
                t.from = offset + 1;
            }
        }
        t.cut = t.from > earliest;
        Ok(t)
    }

    /// [`Store::tally_bytes`] from nothing: back from the head in windows read forwards (the
    /// messages family's memtable is hashed by conversation, and its iterators cannot seek
    /// backwards), until `max_bytes` is passed or the conversation's start. The first window
    /// starts [`BYTES_WINDOW`] below the head and reads to the conversation's end. Offsets
    /// are dense above the earliest retained, so a window that does not start with its first
    /// offset reached the trimmed part.
    fn tally_from_head(
        &self,
        snap: &rocksdb::Snapshot<'_>,
        shard: ShardId,
        conversation: &str,
        head: u64,
        max_bytes: u64,
    ) -> Result<BytesTally> {
        let mut t = BytesTally { head, from: head + 1, bytes: 0, cut: false, read: 0 };
        let (mut from, mut before) = (head.saturating_sub(BYTES_WINDOW - 1).max(1), u64::MAX);
        loop {
            let sizes = self.message_sizes(snap, shard, conversation, from, before)?;
            t.read += sizes.len() as u64;
            for &(offset, len) in sizes.iter().rev() {
                if t.bytes.saturating_add(len) > max_bytes {
                    t.cut = true;
                    t.from = offset + 1;
                    return Ok(t);
                }
                t.bytes += len;
                t.from = offset;
            }
            if from == 1 || sizes.first().is_none_or(|&(offset, _)| offset != from) {
                return Ok(t);
            }
            (from, before) = (from.saturating_sub(BYTES_WINDOW).max(1), from);
        }
    }

    /// The stored sizes of a conversation's messages in `[from, before)` as `snap` holds
    /// them, by offset (`before` = `u64::MAX`: to the end).
    fn message_sizes(
        &self,
        snap: &rocksdb::Snapshot<'_>,
        shard: ShardId,
        conversation: &str,
        from: u64,
        before: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(message_key(shard, conversation, before));
        ro.set_prefix_same_as_start(true);
        ro.set_snapshot(snap);
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_MESSAGES), ro);
        iter.seek(message_key(shard, conversation, from));
        let mut sizes = Vec::new();
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            let offset = keys::message_key_offset(key)
                .ok_or_else(|| Error::Corrupt(format!("malformed message key of {} bytes", key.len())))?;
            sizes.push((offset, value.len() as u64));
            iter.next();
        }
        iter.status()?;
        Ok(sizes)
    }

    /// Flushes every family's memtable, then compacts what the trims deleted — each trimmed
    /// conversation's messages below its earliest and its dedup records — and the Raft log
    /// (purged behind snapshots, so short), so that the space of range and point deletions,
    /// and of the WAL holding them, goes back to the filesystem now, not at some later
    /// compaction.
    pub fn reclaim(&self, trimmed: &[Trimmed]) -> Result<()> {
        // A WAL file is deleted only once every family's memtable it holds is flushed. All
        // families at once: a state family flushed alone would make a point durable that the
        // messages family does not hold (see `write_unlogged`).
        self.flush_all()?;
        let mut force = rocksdb::CompactOptions::default();
        force.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for (shard, conversation, before) in trimmed {
            let (lo, hi) = messages_below(*shard, conversation, *before);
            self.db.compact_range_cf_opt(self.cf(CF_MESSAGES), Some(lo), Some(hi), &force);
            let (lo, hi) = dedup_range(*shard, conversation);
            self.db.compact_range_cf_opt(self.cf(CF_DEDUP), Some(lo), Some(hi), &force);
        }
        self.db.compact_range_cf(self.cf(CF_LOG), None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    pub fn cursor(&self, shard: ShardId, user: &str, conversation: &str) -> Result<u64> {
        match self.get(CF_STATE, &cursor_key(shard, user, conversation))? {
            Some(v) => Ok(codec::decode::<u64>(&v)?),
            None => Ok(0),
        }
    }

    /// A conversation's retained span, (earliest retained offset, head), from one view of the
    /// shard's state: what a cursor move's answer needs. Refused while a snapshot install is
    /// under way, as [`Store::cursor_view`] is.
    pub fn span(&self, shard: ShardId, conversation: &str) -> Result<(u64, u64)> {
        let snap = self.db.snapshot();
        refuse_installing(&snap, self.cf(CF_STATE), shard)?;
        let read = |key: &[u8]| -> Result<Option<u64>> {
            snap.get_cf(self.cf(CF_STATE), key)?.map(|v| codec::decode::<u64>(&v)).transpose().map_err(Into::into)
        };
        Ok((read(&earliest_key(shard, conversation))?.unwrap_or(1), read(&head_key(shard, conversation))?.unwrap_or(0)))
    }

    /// What a cursor read needs, from one view of the shard's state: the conversation's
    /// members, the user's cursor, the head and the earliest retained offset. Refused while a
    /// snapshot install is under way (see [`Store::scan_messages`]): its cleared state would
    /// read as a conversation that does not exist, which anyone may read.
    pub fn cursor_view(&self, shard: ShardId, user: &str, conversation: &str) -> Result<CursorView> {
        let snap = self.db.snapshot();
        refuse_installing(&snap, self.cf(CF_STATE), shard)?;
        let read = |key: &[u8]| -> Result<Option<u64>> {
            snap.get_cf(self.cf(CF_STATE), key)?.map(|v| codec::decode::<u64>(&v)).transpose().map_err(Into::into)
        };
        let members = match snap.get_cf(self.cf(CF_STATE), members_key(shard, conversation))? {
            Some(v) => Some(codec::decode(&v)?),
            None => None,
        };
        Ok(CursorView {
            members,
            cursor: read(&cursor_key(shard, user, conversation))?.unwrap_or(0),
            head: read(&head_key(shard, conversation))?.unwrap_or(0),
            earliest: read(&earliest_key(shard, conversation))?.unwrap_or(1),
        })
    }

    /// Visits up to `max` messages of a conversation from offset `from`, in offset order,
    /// with their offsets and their values as stored (catch-up frames them without
    /// decoding; see `service::frames::message_frame_from_stored`). The value is borrowed from
    /// the iterator, so a scan allocates nothing per message. Returns how many it visited.
    ///
    /// It stops after `max` messages, or once the values visited reach `max_bytes` (always
    /// after at least one), and says whether the conversation holds more after them.
    ///
    /// Refused (`Unavailable`) while a snapshot install of the shard is under way: the shard's
    /// state is then cleared or partly written, and would read as messages missing. The check
    /// and the scan read one RocksDB snapshot, so a scan sees a whole state or is refused.
    ///
    /// `Error::Truncated { earliest }` if `from` is below the earliest retained offset (read in
    /// the same snapshot): those messages were deleted by retention, on purpose.
    pub fn scan_messages(
        &self,
        shard: ShardId,
        conversation: &str,
        from: u64,
        max: usize,
        max_bytes: usize,
        mut visit: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<Scanned> {
        let prefix = conversation_prefix(shard, conversation);
        let mut upper = prefix.clone();
        upper.extend_from_slice(&u64::MAX.to_be_bytes());
        let snap = self.db.snapshot();
        refuse_installing(&snap, self.cf(CF_STATE), shard)?;
        if let Some(v) = snap.get_cf(self.cf(CF_STATE), earliest_key(shard, conversation))? {
            let earliest: u64 = codec::decode(&v)?;
            if from.max(1) < earliest {
                return Err(Error::Truncated { earliest });
            }
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(upper);
        ro.set_prefix_same_as_start(true);
        ro.set_snapshot(&snap);
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_MESSAGES), ro);
        iter.seek(message_key(shard, conversation, from.max(1)));
        let (mut visited, mut bytes) = (0, 0);
        while visited < max && (visited == 0 || bytes < max_bytes) {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else { break };
            let offset = keys::message_key_offset(key)
                .ok_or_else(|| Error::Corrupt(format!("malformed message key of {} bytes", key.len())))?;
            visit(offset, value)?;
            visited += 1;
            bytes += value.len();
            iter.next();
        }
        let more = iter.valid();
        iter.status()?;
        Ok(Scanned { visited, more })
    }
}

/// A conversation's head from its stored record (none: 0, nothing appended yet).
fn decode_head(value: Option<Vec<u8>>) -> Result<u64> {
    value.map_or(Ok(0), |v| Ok(codec::decode::<u64>(&v)?))
}

/// What a [`Store::scan_messages`] did: the messages it visited, and whether more follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    pub visited: usize,
    pub more: bool,
}

#[cfg(test)]
impl Store {
    /// Copies the database's files to `to` as they are on disk now: what a crash of the
    /// process at this moment would leave (the memtables are not in them). Only while
    /// nothing writes.
    pub(crate) fn crash_image(&self, to: &Path) {
        for file in std::fs::read_dir(self.db.path()).expect("read the database directory") {
            let file = file.expect("a directory entry");
            std::fs::copy(file.path(), to.join(file.file_name())).expect("copy a database file");
        }
    }

    /// Every record of `shard`'s replicated state (its ranges in the state families), in
    /// key order, with its family.
    pub(crate) fn dump_state(&self, shard: ShardId) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
        let (lo, hi) = shard_range(shard);
        let mut out = Vec::new();
        for name in STATE_CFS {
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(hi.clone());
            ro.set_total_order_seek(true);
            for item in self.db.iterator_cf_opt(self.cf(name), ro, IteratorMode::From(&lo, Direction::Forward)) {
                let (k, v) = item.expect("read the state");
                out.push((name, k.to_vec(), v.to_vec()));
            }
        }
        out
    }
}

/// `Unavailable` if `snap` shows a snapshot install of `shard` under way (see [`snapshot`]).
fn refuse_installing(
    snap: &rocksdb::SnapshotWithThreadMode<'_, DB>,
    state: &ColumnFamily,
    shard: ShardId,
) -> Result<()> {
    match snap.get_cf(state, installing_key(shard))? {
        Some(_) => Err(Error::Unavailable(format!(
            "shard {shard} is being replaced by a snapshot on this node; read from another replica or retry"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_range_stops_at_gaps_and_shards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, fresh) = Store::open(dir.path()).expect("open");
        assert!(fresh);
        let mut b = WriteBatch::default();
        for i in [1u64, 2, 3, 5] {
            b.put_cf(store.cf(CF_LOG), log_key(1, i), [i as u8]);
        }
        b.put_cf(store.cf(CF_LOG), log_key(2, 4), [42]);
        store.write(b).expect("write");
        let got: Vec<u64> = store.log_range(1, 1, 10).expect("range").into_iter().map(|e| e.0).collect();
        assert_eq!(got, vec![1, 2, 3]);
        let from_zero: Vec<u64> = store.log_range(1, 0, 3).expect("range").into_iter().map(|e| e.0).collect();
        assert_eq!(from_zero, vec![1, 2], "a range may start below the first entry");
        assert_eq!(store.log_last(1).expect("last"), Some(vec![5]));
        assert_eq!(store.log_last(2).expect("last"), Some(vec![42]));
        assert_eq!(store.log_last(3).expect("last"), None);
        assert_eq!(store.log_last(0).expect("last"), None);
    }

    /// The newest WAL file of a database directory.
    fn newest_wal(dir: &Path) -> std::path::PathBuf {
        let mut wals: Vec<_> = std::fs::read_dir(dir)
            .expect("read the database directory")
            .map(|e| e.expect("an entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        wals.sort();
        wals.pop().expect("a WAL")
    }

    /// A crash in the middle of writing a record (here one of 2 MiB, which RocksDB writes
    /// in several pieces) leaves the WAL ending inside it: that record was never synced, so
    /// the store opens without it and with everything before it. A record damaged inside the
    /// log is refused, never cut.
    #[test]
    fn a_torn_last_wal_record_is_dropped_and_damage_inside_the_log_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let log = store.cf(CF_LOG);
        for i in 1..=3u64 {
            store.db.put_cf(log, log_key(1, i), format!("synced-{i}")).expect("put");
        }
        store.db.flush_wal(true).expect("sync");
        store.db.put_cf(log, log_key(1, 4), vec![7u8; 2 << 20]).expect("put a large record");
        let torn = tempfile::tempdir().expect("tempdir");
        store.crash_image(torn.path());
        let damaged = tempfile::tempdir().expect("tempdir");
        store.crash_image(damaged.path());
        drop(store);

        let wal = newest_wal(torn.path());
        let len = std::fs::metadata(&wal).expect("WAL size").len();
        assert!(len > 2 << 20, "the large record is in the WAL");
        std::fs::OpenOptions::new().write(true).open(&wal).expect("open").set_len(len - (1 << 20)).expect("tear");
        let (reopened, _) = Store::open(torn.path()).expect("a torn last record does not refuse the store");
        let got: Vec<u64> = reopened.log_range(1, 1, 10).expect("range").into_iter().map(|e| e.0).collect();
        assert_eq!(got, vec![1, 2, 3], "what came before the torn record stays; the torn one is gone");
        drop(reopened);

        let wal = newest_wal(damaged.path());
        let bytes = std::fs::read(&wal).expect("read the WAL");
        let at = bytes.windows(8).position(|w| w == b"synced-2").expect("record 2 is in the WAL");
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&wal).expect("open");
        f.write_all_at(&[bytes[at] ^ 0x01], at as u64).expect("flip a bit");
        assert!(Store::open(damaged.path()).is_err(), "a damaged record inside the log refuses the store");
    }

    fn dedup_of(conversation: &str, sender: &str, client_id: u64, client_seq: u64) -> DedupKey {
        DedupKey { conversation: conversation.into(), sender: sender.into(), client_id, client_seq }
    }

    /// Dedup records of the old layout (in `shard_state`, sequence numbers as is), flushed
    /// or only in the WAL, move to the `dedup` family at open, values and all; other state
    /// stays. Afterwards a scope's highest sequence number is found whether its records are
    /// in table files or the memtable, and scopes that share a conversation, a sender or a
    /// client id stay apart.
    #[test]
    fn legacy_dedup_records_move_at_open_and_each_scope_finds_its_highest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let legacy = |shard: ShardId, k: &DedupKey| {
            let mut key = dedup_scope(shard, &k.conversation, &k.sender, k.client_id);
            key.extend_from_slice(&k.client_seq.to_be_bytes());
            key
        };
        let old: Vec<(ShardId, DedupKey)> = [(1, dedup_of("c", "u", 7, 1)), (1, dedup_of("c", "u", 7, 5))]
            .into_iter()
            .chain((2..=4).map(|s| (1, dedup_of("c", "u", 7, s))))
            .chain([(1, dedup_of("c", "uu", 7, 3)), (1, dedup_of("cu", "u", 7, 8)), (5, dedup_of("d", "u", 1, 2))])
            .collect();
        {
            let (store, _) = Store::open(dir.path()).expect("open");
            let mut b = WriteBatch::default();
            for (shard, k) in &old[..4] {
                b.put_cf(store.cf(CF_STATE), legacy(*shard, k), k.client_seq.to_be_bytes());
            }
            b.put_cf(store.cf(CF_STATE), head_key(1, "c"), codec::encode(&5u64));
            store.write(b).expect("write");
            store.flush_all().expect("flush");
            let mut b = WriteBatch::default();
            for (shard, k) in &old[4..] {
                b.put_cf(store.cf(CF_STATE), legacy(*shard, k), k.client_seq.to_be_bytes());
            }
            store.write(b).expect("write, WAL only");
        }
        let (store, _) = Store::open(dir.path()).expect("open again");
        for (shard, k) in &old {
            assert_eq!(
                store.get(CF_DEDUP, &dedup_key(*shard, k)).expect("read"),
                Some(k.client_seq.to_be_bytes().to_vec())
            );
            assert_eq!(store.get(CF_STATE, &legacy(*shard, k)).expect("read"), None, "{k:?} left behind");
        }
        for shard in [1, 5] {
            let mut iter = store.db.raw_iterator_cf(store.cf(CF_STATE));
            iter.seek(legacy_dedup_prefix(shard));
            assert!(iter.key().is_none_or(|k| !k.starts_with(&legacy_dedup_prefix(shard))));
        }
        assert_eq!(store.head(1, "c").expect("head"), 5, "other state stays");
        let highest = |store: &Store, shard, c: &str, u: &str, id| {
            store.dedup_max_seq(&dedup_scope(shard, c, u, id)).expect("seek")
        };
        assert_eq!(highest(&store, 1, "c", "u", 7), Some(5));
        assert_eq!(highest(&store, 1, "c", "uu", 7), Some(3));
        assert_eq!(highest(&store, 1, "cu", "u", 7), Some(8));
        assert_eq!(highest(&store, 5, "d", "u", 1), Some(2));
        for (shard, c, u, id) in
            [(1, "c", "u", 8), (1, "c", "", 7), (2, "c", "u", 7), (5, "d", "u", 0), (1, "", "u", 7)]
        {
            assert_eq!(highest(&store, shard, c, u, id), None, "{shard} {c} {u} {id}");
        }
        // New records, one in the memtable above the flushed ones and one below.
        let mut b = WriteBatch::default();
        for k in [dedup_of("c", "u", 7, 9), dedup_of("c", "uu", 7, 2)] {
            b.put_cf(store.cf(CF_DEDUP), dedup_key(1, &k), [0]);
        }
        store.write(b).expect("write");
        assert_eq!(highest(&store, 1, "c", "u", 7), Some(9));
        assert_eq!(highest(&store, 1, "c", "uu", 7), Some(3));
        // Nothing is moved twice, and a fresh store has nothing to move.
        drop(store);
        let (store, _) = Store::open(dir.path()).expect("open a third time");
        assert_eq!(migrate_legacy_dedup(&store.db).expect("migrate"), 0);
        assert_eq!(highest(&store, 1, "c", "u", 7), Some(9));
    }

    /// Reads within a conversation stay in it, memtable and table files alike, forwards
    /// (catch-up, trims) and backwards (retention by bytes), and a shard's read sees every
    /// conversation in key order. A memtable hashed by conversation would break the
    #[test]
    fn a_readers_member_check_is_refused_while_an_install_replaces_the_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        assert_eq!(store.members_for_reader(0, "c").expect("no install"), None);
        store.db.put_cf(store.cf(CF_STATE), installing_key(0), b"x").expect("mark an install");
        let err = store.members_for_reader(0, "c").expect_err("installing").to_string();
        assert!(err.contains("being replaced by a snapshot"), "{err}");
        assert_eq!(store.members_for_reader(1, "c").expect("another shard"), None);
        store.db.delete_cf(store.cf(CF_STATE), installing_key(0)).expect("install done");
        assert_eq!(store.members_for_reader(0, "c").expect("done"), None);
    }

    #[test]
    fn a_span_reads_the_earliest_and_the_head_of_its_conversation_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        assert_eq!(store.span(0, "c").expect("nothing sent"), (1, 0));
        let mut b = WriteBatch::default();
        b.put_cf(store.cf(CF_STATE), head_key(0, "c"), codec::encode(&9u64));
        b.put_cf(store.cf(CF_STATE), earliest_key(0, "c"), codec::encode(&4u64));
        b.put_cf(store.cf(CF_STATE), head_key(0, "d"), codec::encode(&2u64));
        store.write(b).expect("write");
        assert_eq!(store.span(0, "c").expect("trimmed"), (4, 9));
        assert_eq!(store.span(0, "d").expect("untrimmed"), (1, 2));
        assert_eq!(store.span(1, "c").expect("another shard"), (1, 0));
        store.db.put_cf(store.cf(CF_STATE), installing_key(0), b"x").expect("mark an install");
        assert!(matches!(store.span(0, "c"), Err(Error::Unavailable(_))));
        assert_eq!(store.span(1, "c").expect("another shard"), (1, 0));
    }

    /// backward read: its iterators cannot `SeekForPrev`.
    #[test]
    fn conversation_reads_stay_in_their_conversation_and_shard_reads_see_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let convs = ["a", "ab", "b", "a\u{0}"];
        let put = |from: u64, to: u64| {
            let mut b = WriteBatch::default();
            for shard in [1, 2] {
                for c in convs {
                    for offset in from..to {
                        let m = StoredMessage {
                            conversation: c.into(),
                            offset,
                            sender: "u".into(),
                            ts_ms: offset,
                            client_id: shard as u64,
                            client_seq: offset,
                            text: format!("{c}/{offset}"),
                        };
                        b.put_cf(store.cf(CF_MESSAGES), message_key(shard, c, offset), codec::encode(&m));
                    }
                    b.put_cf(store.cf(CF_STATE), head_key(shard, c), codec::encode(&(to - 1)));
                }
            }
            store.write_unlogged(b).expect("write");
        };
        put(1, 30);
        store.flush_all().expect("flush");
        put(30, 51);
        for c in convs {
            let mut seen = Vec::new();
            store
                .each_message(1, c, 10, u64::MAX, |m| {
                    seen.push((m.conversation, m.offset, m.client_id));
                    true
                })
                .expect("each");
            let want: Vec<_> = (10..51).map(|o| (c.to_string(), o, 1)).collect();
            assert_eq!(seen, want, "conversation {c:?} of shard 1");
            let mut offsets = Vec::new();
            let scanned = store
                .scan_messages(2, c, 25, 100, usize::MAX, |o, _| {
                    offsets.push(o);
                    Ok(())
                })
                .expect("scan");
            assert_eq!(offsets, (25..51).collect::<Vec<_>>(), "conversation {c:?} of shard 2");
            assert!(!scanned.more);
            let value_len = store.get(CF_MESSAGES, &message_key(1, c, 50)).expect("get").expect("stored").len() as u64;
            assert_eq!(store.keep_bytes_from(1, c, value_len * 3).expect("keep"), Some(48), "{c:?}");
            // Across windows (of 8 in tests), down to offsets 1–9 of shorter text.
            assert_eq!(store.keep_bytes_from(1, c, value_len * 41).expect("keep"), Some(10), "{c:?}");
            assert_eq!(store.keep_bytes_from(1, c, value_len * 41 + 9 * (value_len - 1)).expect("keep"), None);
            assert_eq!(store.keep_bytes_from(1, c, value_len * 41 + 9 * (value_len - 1) - 1).expect("keep"), Some(2));
        }
        let mut b = WriteBatch::default();
        b.delete_range_cf(store.cf(CF_MESSAGES), message_key(1, "a", 0), message_key(1, "a", 40));
        store.write_unlogged(b).expect("trim");
        let first = store.keys_between(1, "a", 0, 100).expect("keys").first().map(|k| k.client_seq);
        assert_eq!(first, Some(40), "the trimmed prefix is gone");
        assert_eq!(store.keys_between(1, "ab", 0, 100).expect("keys").len(), 50, "its neighbour is whole");
        let dumped: Vec<Vec<u8>> =
            store.dump_state(1).into_iter().filter(|(cf, ..)| *cf == CF_MESSAGES).map(|(_, k, _)| k).collect();
        let mut want: Vec<Vec<u8>> = convs
            .iter()
            .flat_map(|c| (if *c == "a" { 40 } else { 1 }..51).map(move |o| message_key(1, c, o)))
            .collect();
        want.sort();
        assert_eq!(dumped, want, "a shard read sees every conversation, in key order");
    }
}
