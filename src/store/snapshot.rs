//! Shard snapshots without copying a shard into memory.
//!
//! A snapshot of a shard is its key ranges in the state families (`messages`,
//! `shard_state`, `dedup`) read under one RocksDB snapshot, so it is consistent with the applied log
//! id stored in the same range. Taking one is O(1) ([`LocalSnapshot::take`]); its data is
//! produced only when it is streamed to a follower, as a sequence of [`Record`]s packed into
//! chunks of about [`CHUNK_BYTES`]. The receiver spools chunks to a file
//! ([`SpoolWriter`]) and installs from it ([`install`]): bounded memory on both sides,
//! whatever the shard's size.
//!
//! Install is crash-safe: a crash at any point leaves either the shard's old state, whole,
//! or an install that is completed at start-up ([`resume_interrupted_install`]) before
//! openraft reads the state machine. Never a cleared or half-written shard: openraft's view
//! of the replica (its purge point in the log store, the applied log id, the snapshot) must
//! stay consistent, or the replica panics at its next commit.
//!
//! - A spool no larger than one batch, or a local snapshot (openraft installs one only to
//!   restore a transient state machine, which this one is not), is installed in one synced
//!   batch: clear the shard's state ranges, write the records and the applied state.
//! - A larger spool first has every record checked, then goes through the [`Step`]s:
//!   1. the spool is renamed to the install's own name and fsynced: it is the install's
//!      now, and survives anything from here on;
//!   2. one synced batch clears the shard's ranges and writes the "installing" marker,
//!      which names the spool and the applied state to end with;
//!   3. records are written in bounded batches;
//!   4. one synced batch writes the last records and the applied state and removes the
//!      marker;
//!   5. the spool is removed.
//!
//!   A node that finds the marker at start-up runs steps 2–5 again from the spool. While
//!   the marker is there the shard's state is not a state of the shard: reads refuse it
//!   ([`Store::scan_messages`]), and a snapshot taken then has no applied state.
//!
//! The records' own applied-state value is never written: the install writes the one it is
//! given (from the snapshot's meta), last. openraft purges the log up to the snapshot after
//! the install returns; a crash before that purge leaves a log that ends below the applied
//! log id, or holds the entries the snapshot covers, both of which openraft's start-up
//! accepts (it purges the former).
//!
//! Record framing: `cf (u8) ‖ key_len (u32 BE) ‖ key ‖ value_len (u32 BE) ‖ value`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, ReadOptions, SnapshotWithThreadMode, WriteBatch, DB};

use serde::{Deserialize, Serialize};

use super::codec::{decode, encode};
use super::keys::{
    applied_key, dedup_key_from_legacy, installing_key, is_whole_dedup_key, legacy_dedup_prefix, shard_range, CF_DEDUP,
    CF_STATE, STATE_CFS,
};
use super::Store;
use crate::chat::ShardId;
use crate::error::{Error, Result};

/// Target size of one streamed chunk, in bytes.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest key or value a record may carry (far above any real one; guards corrupt input).
pub const RECORD_PART_BYTES_MAX: usize = 8 << 20;
/// Bytes written per install batch; a spool no larger than this is installed in one batch.
/// Small in tests, so that they cover the marker protocol with little data.
const INSTALL_BATCH_BYTES: usize = if cfg!(test) { 64 << 10 } else { 4 << 20 };

/// One key/value of a shard's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Index into [`STATE_CFS`].
    pub cf: u8,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl Record {
    /// Appends this record's framing to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.cf);
        out.extend_from_slice(&(self.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&(self.value.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.value);
    }

    /// Reads one record; `Ok(None)` at a clean end of input.
    pub fn read_from<R: Read>(r: &mut R) -> std::io::Result<Option<Record>> {
        let mut cf = [0u8; 1];
        match r.read(&mut cf)? {
            0 => return Ok(None),
            _ if usize::from(cf[0]) >= STATE_CFS.len() => return Err(bad("unknown column family in snapshot")),
            _ => {}
        }
        let key = read_part(r)?;
        let value = read_part(r)?;
        Ok(Some(Record { cf: cf[0], key, value }))
    }
}

fn bad(m: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string())
}

fn read_part<R: Read>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > RECORD_PART_BYTES_MAX {
        return Err(bad("snapshot record larger than the limit"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// A consistent, cheap view of one shard's state at the moment it was taken.
pub struct LocalSnapshot {
    // Field order matters: `snap` borrows `db` and must drop first (fields drop in order).
    snap: SnapshotWithThreadMode<'static, DB>,
    db: Arc<DB>,
    pub shard: ShardId,
}

impl LocalSnapshot {
    /// Takes a RocksDB snapshot of the whole database, used for `shard`'s ranges only.
    pub fn take(db: &Arc<DB>, shard: ShardId) -> LocalSnapshot {
        let db = db.clone();
        let snap = db.snapshot();
        // SAFETY: `snap` borrows the `DB` inside `db`'s allocation, which is kept alive by
        // the `Arc` stored next to it and dropped only after `snap` (declaration order).
        // The `DB` never moves: it lives in the Arc's heap allocation.
        let snap: SnapshotWithThreadMode<'static, DB> = unsafe { std::mem::transmute(snap) };
        LocalSnapshot { snap, db, shard }
    }

    /// Reads one key of the shard's state as of the snapshot.
    pub fn get_state(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let cf = self.db.cf_handle(CF_STATE).expect("schema column family exists");
        Ok(self.snap.get_cf(cf, key)?)
    }

    /// Calls `each` with every record of the shard, in family then key order.
    pub fn for_each_record(&self, mut each: impl FnMut(Record) -> Result<()>) -> Result<()> {
        let (lo, hi) = shard_range(self.shard);
        let install_marker = installing_key(self.shard);
        for (index, name) in STATE_CFS.iter().enumerate() {
            let cf = self.db.cf_handle(name).expect("schema column family exists");
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(hi.clone());
            // Across conversations: the messages family's prefix mode would keep to one.
            ro.set_total_order_seek(true);
            ro.set_snapshot(&self.snap);
            ro.fill_cache(false);
            for item in self.db.iterator_cf_opt(cf, ro, IteratorMode::From(&lo, Direction::Forward)) {
                let (k, v) = item?;
                if *name == CF_STATE && k.as_ref() == install_marker {
                    continue;
                }
                each(Record { cf: index as u8, key: k.to_vec(), value: v.to_vec() })?;
            }
        }
        Ok(())
    }

    /// Calls `each` with chunks of at most about [`CHUNK_BYTES`] of framed records.
    pub fn for_each_chunk(&self, mut each: impl FnMut(Vec<u8>) -> Result<()>) -> Result<()> {
        let mut chunk = Vec::with_capacity(CHUNK_BYTES + 4096);
        self.for_each_record(|r| {
            r.encode_into(&mut chunk);
            if chunk.len() >= CHUNK_BYTES {
                each(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_BYTES + 4096)))?;
            }
            Ok(())
        })?;
        if !chunk.is_empty() {
            each(chunk)?;
        }
        Ok(())
    }
}

/// Writes received chunks to a file, to be installed once complete.
pub struct SpoolWriter {
    path: PathBuf,
    out: BufWriter<File>,
    pub bytes: u64,
}

impl SpoolWriter {
    pub fn create(path: PathBuf) -> Result<SpoolWriter> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let out = BufWriter::new(File::create(&path)?);
        Ok(SpoolWriter { path, out, bytes: 0 })
    }

    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<()> {
        self.out.write_all(chunk)?;
        self.bytes += chunk.len() as u64;
        Ok(())
    }

    /// Flushes and returns the spooled file's path.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.out.flush()?;
        Ok(self.path)
    }
}

/// Where a shard's state comes from when installing.
pub enum Source<'a> {
    /// A snapshot of this database: installed in one batch (see the module doc).
    Local(&'a LocalSnapshot),
    /// A received spool file, which the install consumes (see the module doc).
    File(&'a Path),
}

/// The steps of an install, in order; each is done (and durable where it says so) before the
/// next begins. A crash between any two leaves a state [`resume_interrupted_install`] and
/// openraft's start-up both accept (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Large spool only: the spool file is renamed to the install's own name and fsynced,
    /// with its directory. The shard's state is untouched.
    SpoolDurable,
    /// Large spool only: the shard's state ranges are cleared and the marker, naming the
    /// spool and the applied state to end with, is written, in one synced batch.
    Started,
    /// Large spool only: one more bounded batch of records is written (unsynced).
    Batch,
    /// The (last) records, the applied state and the marker's removal are written in one
    /// synced batch: the install is complete. A small spool or a local snapshot does its
    /// whole install in this one batch.
    Finished,
    /// The spool file is removed.
    Cleaned,
}

/// What the marker of an install in progress records: enough to finish it after a crash.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// The spool file being installed, under the install's own name.
    spool: String,
    /// The value the shard's applied-state key takes when the install completes.
    applied: Vec<u8>,
}

/// Replaces `shard`'s state with the records of `source` and sets its applied-state key to
/// `applied`, so that a crash at any point leaves either the old state or an install that
/// [`resume_interrupted_install`] completes (see the module doc). A spooled source is
/// removed once installed; returns how many records were written.
pub fn install(store: &Store, shard: ShardId, source: Source<'_>, applied: &[u8]) -> Result<u64> {
    let (lo, hi) = shard_range(shard);
    let path = match source {
        Source::Local(snap) => {
            let mut batch = clear_batch(store, &lo, &hi);
            let mut records = 0u64;
            snap.for_each_record(|r| {
                records += u64::from(put_record(store, shard, &mut batch, r)?);
                Ok(())
            })?;
            finish(store, shard, batch, applied)?;
            return Ok(records);
        }
        Source::File(path) => path,
    };
    if std::fs::metadata(path)?.len() <= INSTALL_BATCH_BYTES as u64 {
        let mut batch = clear_batch(store, &lo, &hi);
        let mut records = 0u64;
        let mut input = BufReader::new(File::open(path)?);
        while let Some(r) = Record::read_from(&mut input)? {
            records += u64::from(put_record(store, shard, &mut batch, r)?);
        }
        finish(store, shard, batch, applied)?;
        remove_spool(path)?;
        step_done(store, Step::Cleaned)?;
        return Ok(records);
    }
    // Too large for one batch: check every record before the old state is touched, so bad
    // input fails here and not halfway, with a marker that could never be completed.
    check_spool(path, shard)?;
    let spool = own_spool(path, shard)?;
    step_done(store, Step::SpoolDurable)?;
    let spool =
        spool.into_os_string().into_string().map_err(|p| Error::Config(format!("spool path {p:?} is not UTF-8")))?;
    resume(store, shard, &Marker { spool, applied: applied.to_vec() })
}

/// Reads a received spool and checks every record of it for `shard`; returns how many it
/// holds. The receiver runs this before it hands the snapshot to openraft: an install that
/// failed on a bad record there would stop the replica's group.
pub fn check_spool(path: &Path, shard: ShardId) -> Result<u64> {
    let mut input = BufReader::new(File::open(path)?);
    let mut records = 0u64;
    while let Some(r) = Record::read_from(&mut input)? {
        check_record(shard, &r)?;
        records += 1;
    }
    Ok(records)
}

/// At start-up: completes an install of `shard` that a crash interrupted, from the spool
/// file its marker names. Returns how many records it wrote, `None` if there was none.
pub fn resume_interrupted_install(store: &Store, shard: ShardId) -> Result<Option<u64>> {
    let Some(value) = store.get(CF_STATE, &installing_key(shard))? else {
        return Ok(None);
    };
    let marker: Marker = decode(&value).map_err(|e| {
        Error::Corrupt(format!(
            "shard {shard}: an interrupted snapshot install left a marker that names no spool file ({e}; \
             written by an older version?): its state cannot be completed, and this replica of the shard \
             must be rebuilt"
        ))
    })?;
    if !Path::new(&marker.spool).exists() {
        return Err(Error::Corrupt(format!(
            "shard {shard}: the spool file {} of an interrupted snapshot install is gone: its state cannot be \
             completed, and this replica of the shard must be rebuilt",
            marker.spool
        )));
    }
    resume(store, shard, &marker).map(Some)
}

/// The marker protocol, from [`Step::Started`] on; safe to run again from the start after
/// a crash at any step.
fn resume(store: &Store, shard: ShardId, marker: &Marker) -> Result<u64> {
    let (lo, hi) = shard_range(shard);
    let mut start = clear_batch(store, &lo, &hi);
    start.put_cf(store.cf(CF_STATE), installing_key(shard), encode(marker));
    store.write_sync(start)?;
    step_done(store, Step::Started)?;

    let mut batch = WriteBatch::default();
    let mut records = 0u64;
    let mut input = BufReader::new(File::open(&marker.spool)?);
    while let Some(r) = Record::read_from(&mut input)? {
        records += u64::from(put_record(store, shard, &mut batch, r)?);
        if batch.size_in_bytes() >= INSTALL_BATCH_BYTES {
            store.write(std::mem::take(&mut batch))?;
            step_done(store, Step::Batch)?;
        }
    }
    batch.delete_cf(store.cf(CF_STATE), installing_key(shard));
    finish(store, shard, batch, &marker.applied)?;
    remove_spool(Path::new(&marker.spool))?;
    step_done(store, Step::Cleaned)?;
    Ok(records)
}

/// A batch that starts by clearing the shard's state ranges.
fn clear_batch(store: &Store, lo: &[u8], hi: &[u8]) -> WriteBatch {
    let mut batch = WriteBatch::default();
    for name in STATE_CFS {
        batch.delete_range_cf(store.cf(name), lo, hi);
    }
    batch
}

/// Adds the applied state to `batch` and writes it durably: the install is complete.
fn finish(store: &Store, shard: ShardId, mut batch: WriteBatch, applied: &[u8]) -> Result<()> {
    batch.put_cf(store.cf(CF_STATE), applied_key(shard), applied);
    store.write_sync(batch)?;
    // Durable in the table files too: the log is then purged up to the snapshot, and purges
    // go only as far as the table files' applied state (see `Store::write_unlogged`).
    store.flush_all()?;
    step_done(store, Step::Finished)
}

/// The family of a record of `shard`'s snapshot, or why it cannot be one.
fn check_record(shard: ShardId, r: &Record) -> Result<&'static str> {
    let (lo, hi) = shard_range(shard);
    if !(r.key.as_slice() >= lo.as_slice() && r.key.as_slice() < hi.as_slice()) {
        return Err(Error::Corrupt(format!("snapshot record outside shard {shard}")));
    }
    let name = STATE_CFS
        .get(usize::from(r.cf))
        .copied()
        .ok_or_else(|| Error::Corrupt(format!("snapshot record of an unknown column family {}", r.cf)))?;
    let legacy = name == CF_STATE && r.key.starts_with(&legacy_dedup_prefix(shard));
    if (legacy || name == CF_DEDUP) && !is_whole_dedup_key(&r.key) {
        return Err(Error::Corrupt(format!("malformed dedup key of {} bytes in snapshot", r.key.len())));
    }
    Ok(name)
}

/// Adds a record to `batch`; returns whether it did. The applied state and the marker are
/// the install's own to write, never a record's.
///
/// A dedup record of the old layout, which a node of an earlier version sends in
/// `shard_state`, goes to the `dedup` family converted (see [`dedup_key_from_legacy`]).
fn put_record(store: &Store, shard: ShardId, batch: &mut WriteBatch, r: Record) -> Result<bool> {
    let name = check_record(shard, &r)?;
    if name == CF_STATE && (r.key == applied_key(shard) || r.key == installing_key(shard)) {
        return Ok(false);
    }
    if name == CF_STATE && r.key.starts_with(&legacy_dedup_prefix(shard)) {
        let key = dedup_key_from_legacy(&r.key).ok_or_else(|| {
            Error::Corrupt(format!("malformed legacy dedup key of {} bytes in snapshot", r.key.len()))
        })?;
        batch.put_cf(store.cf(CF_DEDUP), key, &r.value);
        return Ok(true);
    }
    batch.put_cf(store.cf(name), &r.key, &r.value);
    Ok(true)
}

/// Renames a received spool to the install's own name for `shard`, in the same directory,
/// and makes file and name durable: from here on a crash cannot lose it, and the receiver
/// (which removes what it spooled once the install returns) no longer finds it.
fn own_spool(path: &Path, shard: ShardId) -> Result<PathBuf> {
    let owned = path.with_file_name(format!("shard-{shard}.installing"));
    std::fs::rename(path, &owned)?;
    File::open(&owned)?.sync_all()?;
    let dir = owned.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()?;
    Ok(owned)
}

fn remove_spool(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Marks the end of an install step: a test may stop the install here, as a crash would
/// (see the test-only `crash` module); nothing otherwise.
fn step_done(store: &Store, step: Step) -> Result<()> {
    #[cfg(test)]
    crash::reached(store.db.path(), step)?;
    #[cfg(not(test))]
    let _ = (store, step);
    Ok(())
}

/// Test-only crash injection: records the steps installs take on a database, and can stop
/// an install right after its n-th step, as a crash there would. Keyed by the database's
/// path, so tests running in parallel on their own directories do not interfere.
#[cfg(test)]
pub mod crash {
    use super::Step;
    use crate::error::{Error, Result};
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    struct Plan {
        db: PathBuf,
        stop_after: Option<usize>,
        seen: Vec<Step>,
    }

    static PLANS: Mutex<Vec<Plan>> = Mutex::new(Vec::new());

    fn plans() -> std::sync::MutexGuard<'static, Vec<Plan>> {
        PLANS.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, records every install step on the database at `db`, and stops the
    /// install after the `stop_after`-th step (counting from 0) if given.
    pub fn arm(db: &Path, stop_after: Option<usize>) {
        let mut plans = plans();
        plans.retain(|p| p.db != db);
        plans.push(Plan { db: db.to_path_buf(), stop_after, seen: Vec::new() });
    }

    /// Stops recording for `db`; returns the steps reached since [`arm`].
    pub fn disarm(db: &Path) -> Vec<Step> {
        let mut plans = plans();
        match plans.iter().position(|p| p.db == db) {
            Some(i) => plans.swap_remove(i).seen,
            None => Vec::new(),
        }
    }

    /// Whether the planned stop has happened on `db`.
    pub fn stopped(db: &Path) -> bool {
        plans().iter().any(|p| p.db == db && p.stop_after.is_some_and(|n| p.seen.len() > n))
    }

    pub(super) fn reached(db: &Path, step: Step) -> Result<()> {
        let mut plans = plans();
        let Some(plan) = plans.iter_mut().find(|p| p.db == db) else { return Ok(()) };
        if plan.stop_after.is_some_and(|n| plan.seen.len() > n) {
            return Err(Error::Unavailable("the store crashed (test) and takes no more install steps".into()));
        }
        plan.seen.push(step);
        if plan.stop_after == Some(plan.seen.len() - 1) {
            return Err(Error::Unavailable(format!("test crash after install step {step:?}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::{head_key, message_key, CF_MESSAGES};

    fn fill(store: &Store, shard: ShardId, n: u64) {
        let mut b = WriteBatch::default();
        for i in 1..=n {
            b.put_cf(store.cf(CF_MESSAGES), message_key(shard, "c", i), vec![i as u8; 300]);
        }
        b.put_cf(store.cf(CF_STATE), head_key(shard, "c"), crate::store::codec::encode(&n));
        store.write(b).expect("write");
    }

    fn dump(store: &Store, shard: ShardId) -> Vec<Record> {
        let mut out = Vec::new();
        LocalSnapshot::take(&store.db, shard)
            .for_each_record(|r| {
                out.push(r);
                Ok(())
            })
            .expect("dump");
        out
    }

    /// A shard's state: its records but the applied state, and the applied state.
    fn state(store: &Store, shard: ShardId) -> (Vec<Record>, Option<Vec<u8>>) {
        let records = dump(store, shard).into_iter().filter(|r| r.key != applied_key(shard)).collect();
        (records, store.get(CF_STATE, &applied_key(shard)).expect("read"))
    }

    /// Spools `snap` to `path` in chunks, as a receiving node does.
    fn spool(snap: &LocalSnapshot, path: &Path) -> PathBuf {
        let mut spool = SpoolWriter::create(path.to_path_buf()).expect("spool");
        snap.for_each_chunk(|c| {
            assert!(c.len() < CHUNK_BYTES + 4096);
            spool.write_chunk(&c)
        })
        .expect("chunks");
        spool.finish().expect("finish")
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    // A snapshot streamed in chunks through a spool file installs exactly the source's
    // state, with the applied state it is given, replaces what the target had, leaves
    // other shards alone, and consumes the spool.
    #[test]
    fn chunked_transfer_installs_exact_state() {
        let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        let (src, _) = Store::open(&a.path().join("db")).expect("open");
        let (dst, _) = Store::open(&b.path().join("db")).expect("open");
        fill(&src, 3, 5000);
        fill(&dst, 3, 7); // stale state that must disappear
        fill(&dst, 4, 9); // another shard that must stay
        let snap = LocalSnapshot::take(&src.db, 3);
        fill(&src, 3, 6000); // writes after the snapshot must not leak into it
        let path = spool(&snap, &b.path().join("spool").join("received"));
        assert!(std::fs::metadata(&path).expect("spooled").len() > 4 * INSTALL_BATCH_BYTES as u64);
        let n = install(&dst, 3, Source::File(&path), b"applied").expect("install");
        assert_eq!(n, 5001);
        let mut want = Vec::new();
        snap.for_each_record(|r| {
            want.push(r);
            Ok(())
        })
        .expect("records");
        assert_eq!(state(&dst, 3), (want, Some(b"applied".to_vec())));
        assert_eq!(dump(&dst, 4).len(), 10);
        assert!(files_in(&b.path().join("spool")).is_empty(), "the install consumes its spool");
        assert_eq!(resume_interrupted_install(&dst, 3).expect("check"), None);
    }

    // The enumerated crash test of the storage layer (the state machine's, with openraft,
    // is in `raft::snapshot_install_tests`): for a spool that takes the marker protocol and
    // for one that fits one batch, stop the install after each of its steps, drop the store
    // (a process crash: unsynced writes are in the WAL, in the OS), reopen it and resume.
    // Until resumed, reads of the shard are refused; after, the shard holds exactly its old
    // state (crash before the marker) or exactly the new one, no marker is left, no spool,
    // other shards are untouched, and another install works.
    #[test]
    fn a_crash_after_any_install_step_leaves_the_old_state_or_completes_on_resume() {
        for (messages, want_steps) in [
            (5000, &[Step::SpoolDurable, Step::Started, Step::Batch, Step::Finished, Step::Cleaned][..]),
            (20, &[Step::Finished, Step::Cleaned][..]),
        ] {
            let src_dir = tempfile::tempdir().expect("dir");
            let (src, _) = Store::open(src_dir.path()).expect("open");
            fill(&src, 3, messages);
            let snap = LocalSnapshot::take(&src.db, 3);
            let new = (dump(&src, 3), Some(b"new".to_vec()));

            let steps = crash_run(&snap, None, &new);
            let mut distinct = steps.clone();
            distinct.dedup();
            assert_eq!(distinct, want_steps, "{messages} messages");
            if messages > 1000 {
                assert!(steps.iter().filter(|s| **s == Step::Batch).count() >= 3, "{steps:?}");
            }
            for stop in 0..steps.len() {
                crash_run(&snap, Some(stop), &new);
            }
        }
    }

    /// One install of `snap` into shard 3 of a fresh store holding an old state, stopped
    /// after step `stop`; checks what a restart finds. Returns the steps taken.
    fn crash_run(snap: &LocalSnapshot, stop: Option<usize>, new: &(Vec<Record>, Option<Vec<u8>>)) -> Vec<Step> {
        let dir = tempfile::tempdir().expect("dir");
        let (db, spool_dir) = (dir.path().join("db"), dir.path().join("spool"));
        let (store, _) = Store::open(&db).expect("open");
        fill(&store, 3, 7);
        let mut b = WriteBatch::default();
        b.put_cf(store.cf(CF_STATE), applied_key(3), b"old");
        store.write(b).expect("old applied state");
        fill(&store, 4, 9);
        let (old, other) = (state(&store, 3), dump(&store, 4));
        let path = spool(snap, &spool_dir.join("received"));

        crash::arm(&db, stop);
        let result = install(&store, 3, Source::File(&path), b"new");
        let steps = crash::disarm(&db);
        let context = format!("stopped after step {stop:?} of {steps:?}");
        assert_eq!(result.is_err(), stop.is_some(), "{context}: {result:?}");
        drop(store);

        let (store, _) = Store::open(&db).expect("reopen");
        let marked = store.get(CF_STATE, &installing_key(3)).expect("read").is_some();
        assert_eq!(marked, steps.contains(&Step::Started) && !steps.contains(&Step::Finished), "{context}");
        if marked {
            let refused = store.scan_messages(3, "c", 1, 10, usize::MAX, |_, _| Ok(()));
            assert!(matches!(refused, Err(Error::Unavailable(_))), "{context}: {refused:?}");
            assert!(matches!(store.cursor_view(3, "u", "c"), Err(Error::Unavailable(_))), "{context}");
            assert!(matches!(store.span(3, "c"), Err(Error::Unavailable(_))), "{context}");
            assert!(
                store.scan_messages(4, "c", 1, 10, usize::MAX, |_, _| Ok(())).is_ok(),
                "other shards stay readable"
            );
        }
        let resumed = resume_interrupted_install(&store, 3).expect("resume");
        assert_eq!(resumed.is_some(), marked, "{context}");
        assert!(store.get(CF_STATE, &installing_key(3)).expect("read").is_none(), "{context}");
        let started = steps.contains(&Step::Started) || steps.contains(&Step::Finished);
        assert_eq!(&state(&store, 3), if started { new } else { &old }, "{context}");
        assert_eq!(dump(&store, 4), other, "{context}");
        // The receiver removes what it spooled, if still there; the install's own file,
        // left by a crash at the wrong moment, is replaced by the next install of the shard.
        let want_left: &[&str] = match steps.last() {
            Some(Step::SpoolDurable) => &["shard-3.installing"],
            Some(Step::Finished) if steps.contains(&Step::Started) => &["shard-3.installing"],
            Some(Step::Finished) => &["received"],
            _ => &[],
        };
        assert_eq!(files_in(&spool_dir), want_left, "{context}");
        let read = store.scan_messages(3, "c", 1, usize::MAX, usize::MAX, |_, _| Ok(())).expect("readable").visited;
        assert_eq!(read, if started { new.0.len() - 1 } else { 7 }, "{context}");

        // The replica takes the next snapshot as any other.
        let again = spool(snap, &spool_dir.join("again"));
        install(&store, 3, Source::File(&again), b"new").expect("install again");
        assert_eq!(&state(&store, 3), new, "{context}");
        steps
    }

    // An install whose input has a bad record fails before it touches the old state.
    #[test]
    fn a_bad_record_fails_a_large_install_before_it_starts() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, _) = Store::open(&dir.path().join("db")).expect("open");
        fill(&store, 3, 7);
        let old = state(&store, 3);
        let path = dir.path().join("received");
        let mut bytes = Vec::new();
        for i in 0..1000u64 {
            let key = if i == 900 { message_key(4, "c", i) } else { message_key(3, "c", i + 1) };
            Record { cf: 0, key, value: vec![0; 300] }.encode_into(&mut bytes);
        }
        std::fs::write(&path, &bytes).expect("spool");
        let err = check_spool(&path, 3).expect_err("the receiver's check finds it");
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        std::fs::write(dir.path().join("good"), &bytes[..bytes.len() / 2 + 3]).expect("spool");
        assert!(check_spool(&dir.path().join("good"), 3).is_err(), "cut inside a record");
        let whole: usize = 450 * (1 + 4 + message_key(3, "c", 1).len() + 4 + 300);
        std::fs::write(dir.path().join("good"), &bytes[..whole]).expect("spool");
        assert_eq!(check_spool(&dir.path().join("good"), 3).expect("450 good records"), 450);
        let err = install(&store, 3, Source::File(&path), b"new").expect_err("a record of another shard");
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        assert_eq!(state(&store, 3), old);
        assert!(store.get(CF_STATE, &installing_key(3)).expect("read").is_none());
        assert!(path.exists(), "left for the receiver to remove");
    }

    // A snapshot from a node of the earlier layout carries dedup records in `shard_state`
    // with their sequence numbers as is: they install into the `dedup` family, converted,
    // and a scope's highest is found; a malformed one fails the install before it starts.
    #[test]
    fn legacy_dedup_records_in_a_snapshot_install_converted() {
        use crate::chat::DedupKey;
        use crate::store::keys::{dedup_key, dedup_scope};
        let dir = tempfile::tempdir().expect("dir");
        let (store, _) = Store::open(&dir.path().join("db")).expect("open");
        let legacy = |seq: u64| {
            let mut key = dedup_scope(3, "c", "u", 7);
            key.extend_from_slice(&seq.to_be_bytes());
            key
        };
        let spool = |records: &[Record]| {
            let path = dir.path().join("received");
            let mut bytes = Vec::new();
            for r in records {
                r.encode_into(&mut bytes);
            }
            std::fs::write(&path, &bytes).expect("spool");
            path
        };
        let mut records: Vec<Record> =
            (1..=4).map(|seq| Record { cf: 1, key: legacy(seq), value: vec![seq as u8] }).collect();
        records.push(Record { cf: 0, key: message_key(3, "c", 1), value: vec![9] });
        let mut torn = legacy(5);
        torn.pop();
        for cf in [1, 2] {
            let bad = spool(&[records.clone(), vec![Record { cf, key: torn.clone(), value: vec![5] }]].concat());
            let err = install(&store, 3, Source::File(&bad), b"new").expect_err("a torn dedup key");
            assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        }
        let good = spool(&records);
        assert_eq!(install(&store, 3, Source::File(&good), b"new").expect("install"), 5);
        for seq in 1..=4u64 {
            let key = DedupKey { conversation: "c".into(), sender: "u".into(), client_id: 7, client_seq: seq };
            assert_eq!(store.get(CF_DEDUP, &dedup_key(3, &key)).expect("read"), Some(vec![seq as u8]));
            assert_eq!(store.get(CF_STATE, &legacy(seq)).expect("read"), None);
        }
        assert_eq!(store.dedup_max_seq(&dedup_scope(3, "c", "u", 7)).expect("seek"), Some(4));
    }

    // A marker that cannot be completed (an older version's, or its spool lost) is an error
    // at start-up, not a silently emptied shard.
    #[test]
    fn an_install_that_cannot_be_completed_is_an_error() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let mark = |value: Vec<u8>| {
            let mut b = WriteBatch::default();
            b.put_cf(store.cf(CF_STATE), installing_key(2), value);
            store.write(b).expect("marker");
        };
        mark(vec![1u8]);
        assert!(matches!(resume_interrupted_install(&store, 2), Err(Error::Corrupt(_))));
        let gone = dir.path().join("gone").to_string_lossy().into_owned();
        mark(encode(&Marker { spool: gone, applied: b"new".to_vec() }));
        let err = resume_interrupted_install(&store, 2).expect_err("no spool");
        assert!(err.to_string().contains("must be rebuilt"), "{err}");
    }

    // Corrupt spool input is an error, not a panic or a partial success.
    #[test]
    fn corrupt_records_are_rejected() {
        let mut bytes = Vec::new();
        Record { cf: 0, key: vec![0, 0, 0, 1, 5], value: vec![1, 2, 3] }.encode_into(&mut bytes);
        let mut truncated = &bytes[..bytes.len() - 1];
        assert!(Record::read_from(&mut truncated).is_err());
        let mut bad_cf = bytes.clone();
        bad_cf[0] = 7;
        assert!(Record::read_from(&mut bad_cf.as_slice()).is_err());
        let mut ok = bytes.as_slice();
        assert!(Record::read_from(&mut ok).expect("valid").is_some());
        assert!(Record::read_from(&mut ok).expect("end").is_none());
    }
}
