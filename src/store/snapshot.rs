//! Shard snapshots without copying a shard into memory.
//!
//! A snapshot of a shard is its key ranges in the state families (`messages`,
//! `shard_state`) read under one RocksDB snapshot, so it is consistent with the applied log
//! id stored in the same range. Taking one is O(1) ([`LocalSnapshot::take`]); its data is
//! produced only when it is streamed to a follower, as a sequence of [`Record`]s packed into
//! chunks of about [`CHUNK_BYTES`]. The receiver spools chunks to a file
//! ([`SpoolWriter`]) and installs from it ([`install`]): bounded memory on both sides,
//! whatever the shard's size.
//!
//! Install is crash-safe: it first writes an "installing" marker and clears the shard's
//! ranges, then writes records in bounded batches, then removes the marker and fsyncs.
//! A node that finds the marker at start-up clears the half-installed range
//! ([`clear_interrupted_install`]) and so looks empty: the leader sends the snapshot again.
//!
//! Record framing: `cf (u8) ‖ key_len (u32 BE) ‖ key ‖ value_len (u32 BE) ‖ value`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, ReadOptions, SnapshotWithThreadMode, WriteBatch, DB};

use super::keys::{installing_key, shard_range, CF_STATE, STATE_CFS};
use super::Store;
use crate::chat::ShardId;
use crate::error::{Error, Result};

/// Target size of one streamed chunk, in bytes.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest key or value a record may carry (far above any real one; guards corrupt input).
pub const RECORD_PART_BYTES_MAX: usize = 8 << 20;
/// Bytes written per install batch.
const INSTALL_BATCH_BYTES: usize = 4 << 20;

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
    Local(&'a LocalSnapshot),
    File(&'a Path),
}

/// Replaces `shard`'s state with the records of `source`, durably (see the module doc).
pub fn install(store: &Store, shard: ShardId, source: Source<'_>) -> Result<u64> {
    let (lo, hi) = shard_range(shard);
    let mut start = WriteBatch::default();
    for name in STATE_CFS {
        start.delete_range_cf(store.cf(name), &lo, &hi);
    }
    start.put_cf(store.cf(CF_STATE), installing_key(shard), [1u8]);
    store.write(start)?;

    let mut batch = WriteBatch::default();
    let mut records = 0u64;
    let mut put = |r: Record| -> Result<()> {
        if !(r.key.as_slice() >= lo.as_slice() && r.key.as_slice() < hi.as_slice()) {
            return Err(Error::Corrupt(format!("snapshot record outside shard {shard}")));
        }
        let name = STATE_CFS
            .get(usize::from(r.cf))
            .ok_or_else(|| Error::Corrupt(format!("snapshot record of an unknown column family {}", r.cf)))?;
        batch.put_cf(store.cf(name), &r.key, &r.value);
        records += 1;
        if batch.size_in_bytes() >= INSTALL_BATCH_BYTES {
            store.write(std::mem::take(&mut batch))?;
        }
        Ok(())
    };
    match source {
        Source::Local(snap) => snap.for_each_record(&mut put)?,
        Source::File(path) => {
            let mut input = BufReader::new(File::open(path)?);
            while let Some(r) = Record::read_from(&mut input)? {
                put(r)?;
            }
        }
    }
    batch.delete_cf(store.cf(CF_STATE), installing_key(shard));
    store.write_sync(batch)?;
    Ok(records)
}

/// At start-up: if an install of `shard` was interrupted, clear its state ranges.
/// Returns whether it did.
pub fn clear_interrupted_install(store: &Store, shard: ShardId) -> Result<bool> {
    if store.get(CF_STATE, &installing_key(shard))?.is_none() {
        return Ok(false);
    }
    let (lo, hi) = shard_range(shard);
    let mut batch = WriteBatch::default();
    for name in STATE_CFS {
        batch.delete_range_cf(store.cf(name), &lo, &hi);
    }
    store.write_sync(batch)?;
    Ok(true)
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

    // A snapshot streamed in chunks through a spool file installs exactly the source's
    // state, replaces what the target had, and leaves other shards alone.
    #[test]
    fn chunked_transfer_installs_exact_state() {
        let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        let (src, _) = Store::open(a.path()).expect("open");
        let (dst, _) = Store::open(b.path()).expect("open");
        fill(&src, 3, 5000);
        fill(&dst, 3, 7); // stale state that must disappear
        fill(&dst, 4, 9); // another shard that must stay
        let snap = LocalSnapshot::take(&src.db, 3);
        fill(&src, 3, 6000); // writes after the snapshot must not leak into it
        let spool_path = b.path().join("spool");
        let mut spool = SpoolWriter::create(spool_path.clone()).expect("spool");
        let mut chunks = 0;
        snap.for_each_chunk(|c| {
            assert!(c.len() < CHUNK_BYTES + 4096);
            chunks += 1;
            spool.write_chunk(&c)
        })
        .expect("chunks");
        assert!(chunks > 1, "5000 × 300 B must take several chunks");
        let path = spool.finish().expect("finish");
        let n = install(&dst, 3, Source::File(&path)).expect("install");
        assert_eq!(n, 5001);
        let want: Vec<Record> = {
            let mut out = Vec::new();
            snap.for_each_record(|r| {
                out.push(r);
                Ok(())
            })
            .expect("records");
            out
        };
        assert_eq!(dump(&dst, 3), want);
        assert_eq!(dump(&dst, 4).len(), 10);
        assert!(!clear_interrupted_install(&dst, 3).expect("check"));
    }

    // A half-done install is detected at start-up and cleared.
    #[test]
    fn interrupted_install_is_cleared() {
        let dir = tempfile::tempdir().expect("dir");
        let (store, _) = Store::open(dir.path()).expect("open");
        fill(&store, 2, 10);
        let mut b = WriteBatch::default();
        b.put_cf(store.cf(CF_STATE), installing_key(2), [1u8]);
        store.write(b).expect("marker");
        assert!(clear_interrupted_install(&store, 2).expect("clear"));
        assert!(dump(&store, 2).is_empty());
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
