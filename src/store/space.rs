//! Free space on the filesystem of a node's data directory, watched so that a disk that
//! fills up refuses new writes with a clear answer before RocksDB runs out of room in the
//! middle of one.
//!
//! A write that fails for lack of space fails the Raft group that made it (openraft stops a
//! group whose storage fails), and a full WAL leaves RocksDB read-only. So the node keeps a
//! reserve, `limits.disk_free_min_bytes`:
//! - below it, a shard's leader refuses client writes (sends, cursors, members, retention)
//!   with `Unavailable` saying the disk is full, before proposing anything: nothing is acked,
//!   nothing is lost, and reads go on;
//! - the entries a leader proposed before it noticed, and a follower's, are still appended:
//!   the reserve is there for them. openraft awaits a log append in the group's core, so an
//!   append that waited would stop the whole group on that node, and the trims queued behind
//!   it in the log, which are what gives space back. Where every replica shares the disk
//!   (the local cluster), every group with a send in flight at the crossing would stop for
//!   good, and retention could never free space;
//! - only a Raft log append carrying client writes that would take the free space below
//!   the *floor*, half the reserve, waits for room before writing, as it would wait for a
//!   slow disk: the last line before RocksDB meets ENOSPC (a follower whose leader still has
//!   room keeps receiving sends, and something else may be filling the disk). Between two
//!   reads of the free space, each append's bytes count against the last figure.
//!
//! Apply never waits, and trims, blank and membership entries are appended even below the
//! floor: trims are what gives space back.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the free space is read.
pub const POLL: Duration = Duration::from_millis(200);

/// The free space of one filesystem, as last read.
pub struct DiskSpace {
    dir: PathBuf,
    free: AtomicU64,
    /// The reserve (0: never low).
    min: AtomicU64,
    /// Whether the free space was below the reserve at the last read (each crossing is
    /// logged).
    was_low: AtomicBool,
    /// Bytes held by snapshot receives in progress ([`DiskSpace::hold`]).
    held: AtomicU64,
}

/// What one snapshot receive holds of the free space above the reserve: its spool and its
/// copy in the store, which only exist once it is done, so that receives of several shards
/// at once (a rebuilt node's) do not each count the same free space. Released when dropped.
pub struct Held {
    space: Arc<DiskSpace>,
    /// The free space when the receive started.
    free: u64,
    bytes: u64,
}

impl Held {
    /// The bytes this receive may still take: the free space above the reserve when it
    /// started, less what every receive holds (`u64::MAX` with no reserve).
    pub fn available(&self) -> u64 {
        match self.space.min() {
            0 => u64::MAX,
            min => self.free.saturating_sub(min).saturating_sub(self.space.held.load(Relaxed)),
        }
    }

    /// Takes `n` more bytes if they are available; `false` (taking nothing) if not.
    pub fn take(&mut self, n: u64) -> bool {
        let min = self.space.min();
        if min == 0 {
            return true;
        }
        let room = self.free.saturating_sub(min);
        let taken =
            self.space.held.fetch_update(Relaxed, Relaxed, |held| held.checked_add(n).filter(|total| *total <= room));
        if taken.is_ok() {
            self.bytes += n;
        }
        taken.is_ok()
    }

    /// The bytes this receive holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.space.held.fetch_sub(self.bytes, Relaxed);
    }
}

fn statvfs(dir: &Path) -> std::io::Result<libc::statvfs> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = statvfs(dir)?;
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The size of the filesystem holding `dir`, in bytes.
pub fn total_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = statvfs(dir)?;
    Ok((st.f_blocks as u64).saturating_mul(st.f_frsize as u64))
}

/// Checks a reserve against the filesystem holding `dir`: one at least as large as the
/// whole filesystem could never be met, and the node would refuse every write for ever.
pub fn check_reserve(dir: &Path, min: u64) -> crate::error::Result<()> {
    match total_bytes(dir) {
        Ok(total) if min > 0 && min >= total => Err(crate::error::Error::Config(format!(
            "limits.disk_free_min_bytes ({min}) is at least the size of the filesystem holding {} ({total} \
             bytes): every write would be refused; set a reserve below it (0 turns the reserve off)",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

impl DiskSpace {
    /// Watches the filesystem of `dir` from a thread of its own, until the returned value is
    /// dropped.
    pub fn watch(dir: &Path) -> Arc<DiskSpace> {
        let space = Arc::new(DiskSpace {
            dir: dir.to_path_buf(),
            free: AtomicU64::new(free_bytes(dir).unwrap_or(u64::MAX)),
            min: AtomicU64::new(0),
            was_low: AtomicBool::new(false),
            held: AtomicU64::new(0),
        });
        let weak: Weak<DiskSpace> = Arc::downgrade(&space);
        let spawned = std::thread::Builder::new().name("disk-space".into()).spawn(move || loop {
            std::thread::sleep(POLL);
            let Some(space) = weak.upgrade() else { return };
            space.refresh();
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the disk space watcher; free space is read only at writes");
        }
        space
    }

    /// Starts holding space for a snapshot receive (see [`Held`]), from the free space as
    /// last read.
    pub fn hold(self: &Arc<Self>) -> Held {
        Held { space: self.clone(), free: self.free(), bytes: 0 }
    }

    /// Sets the reserve (0: off).
    pub fn set_min(&self, bytes: u64) {
        self.min.store(bytes, Relaxed);
    }

    pub fn min(&self) -> u64 {
        self.min.load(Relaxed)
    }

    /// Reads the free space now; logs when it crosses the reserve.
    pub fn refresh(&self) -> u64 {
        match free_bytes(&self.dir) {
            Ok(free) => {
                self.free.store(free, Relaxed);
                let low = self.low();
                if low != self.was_low.swap(low, Relaxed) {
                    if low {
                        tracing::error!(
                            free,
                            reserve = self.min(),
                            dir = %self.dir.display(),
                            "DISK FULL: client writes are refused until space is freed \
                             (limits.disk_free_min_bytes; below half of it, log appends carrying them wait too); \
                             reads and trims go on"
                        );
                    } else {
                        tracing::warn!(free, "disk space is back above the reserve: writes resume");
                    }
                }
                free
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the free disk space");
                self.free.load(Relaxed)
            }
        }
    }

    /// The free space as last read.
    pub fn free(&self) -> u64 {
        self.free.load(Relaxed)
    }

    /// Whether the free space is below the reserve.
    pub fn low(&self) -> bool {
        let min = self.min();
        min > 0 && self.free() < min
    }

    /// Whether writing `bytes` would take the free space below the floor, half the reserve:
    /// appends carrying client writes wait there.
    pub fn exhausted_after(&self, bytes: u64) -> bool {
        let min = self.min();
        min > 0 && self.free().saturating_sub(bytes) < min / 2
    }

    /// Counts `bytes` just written against the free space as last read, so that the writes
    /// between two reads are not all judged by the same figure.
    pub fn used(&self, bytes: u64) {
        if self.min() > 0 {
            let _ = self.free.fetch_update(Relaxed, Relaxed, |f| Some(f.saturating_sub(bytes)));
        }
    }

    /// Waits until `bytes` can be written without taking the free space below the floor (at
    /// once if they can). A Raft log append carrying client writes awaits it first.
    pub async fn room(&self, bytes: u64) {
        if !self.exhausted_after(bytes) {
            return;
        }
        tracing::error!(
            free = self.free(),
            bytes,
            floor = self.min() / 2,
            dir = %self.dir.display(),
            "DISK FULL: writing would take the free space below half the reserve: a log append carrying client \
             writes waits here (its group stops on this node) until space is freed"
        );
        while self.exhausted_after(bytes) {
            tokio::time::sleep(POLL).await;
            self.refresh();
        }
        tracing::warn!(free = self.free(), bytes, "space freed: a waiting log append goes on");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_the_whole_disk_cannot_meet_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let total = total_bytes(dir.path()).expect("statvfs");
        assert!(total >= free_bytes(dir.path()).expect("statvfs") && total > 0);
        check_reserve(dir.path(), 0).expect("no reserve");
        check_reserve(dir.path(), total - 1).expect("a reserve below the size");
        for min in [total, u64::MAX] {
            let err = check_reserve(dir.path(), min).expect_err("never met").to_string();
            assert!(err.contains("is at least the size of the filesystem"), "{err}");
        }
    }

    /// Not watched: the free space is what the test says.
    fn fixed(free: u64) -> Arc<DiskSpace> {
        Arc::new(DiskSpace {
            dir: PathBuf::from("/no/such/dir"),
            free: AtomicU64::new(free),
            min: AtomicU64::new(0),
            was_low: AtomicBool::new(false),
            held: AtomicU64::new(0),
        })
    }

    #[test]
    fn an_append_that_would_cross_the_floor_waits_and_writes_count_until_the_next_read() {
        let space = fixed(10_000);
        assert!(!space.exhausted_after(u64::MAX), "no reserve: never");
        space.set_min(16_000);
        assert!(space.low(), "below the reserve: sends are refused");
        assert!(!space.exhausted_after(2_000), "8,000 left: at the floor, written");
        assert!(space.exhausted_after(2_001), "one byte more would cross it");
        space.used(1_500);
        assert_eq!(space.free(), 8_500);
        assert!(space.exhausted_after(501), "the write counts until the next read");
        space.set_min(0);
        space.used(1_000);
        assert_eq!(space.free(), 8_500, "no reserve: nothing counted");
    }

    #[test]
    fn snapshot_receives_share_the_room_above_the_reserve() {
        let space = fixed(10_000);
        let mut none = space.hold();
        assert!(none.take(1 << 40) && none.available() == u64::MAX, "no reserve: no bound");
        drop(none);
        space.set_min(9_000);
        let (mut a, mut b) = (space.hold(), space.hold());
        assert_eq!(a.available(), 1_000);
        assert!(a.take(600));
        assert_eq!(b.available(), 400, "b sees what a holds");
        assert!(!b.take(401), "not both");
        assert_eq!(b.bytes(), 0, "a refused take holds nothing");
        assert!(b.take(400));
        drop(a);
        assert_eq!(b.available(), 600, "released when a receive ends");
        drop(b);
        assert_eq!(space.held.load(Relaxed), 0);
        // One that started before the disk filled keeps its own reading; a new one sees none.
        let mut c = space.hold();
        space.free.store(8_000, Relaxed);
        assert!(c.take(1_000));
        assert_eq!(space.hold().available(), 0);
    }

    #[tokio::test]
    async fn free_space_is_read_and_a_reserve_above_it_is_low() {
        let dir = tempfile::tempdir().expect("tempdir");
        let space = DiskSpace::watch(dir.path());
        let free = space.refresh();
        assert!(free > 0 && free < u64::MAX, "{free}");
        assert!(!space.low(), "no reserve: never low");
        space.set_min(free / 2);
        assert!(!space.low() && !space.exhausted_after(0));
        tokio::time::timeout(Duration::from_secs(1), space.room(0)).await.expect("room at once");
        // Below the reserve, above its floor: writes are refused, appends go on, unless one
        // would take the free space below the floor.
        space.set_min(free + free / 2);
        assert!(space.low() && !space.exhausted_after(0));
        tokio::time::timeout(Duration::from_secs(1), space.room(0)).await.expect("room above the floor");
        space.set_min(u64::MAX);
        assert!(space.low() && space.exhausted_after(0));
        assert!(tokio::time::timeout(POLL * 3, space.room(0)).await.is_err(), "no room: it waits");
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }
}
