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
//! - only below the *floor*, half the reserve, does a Raft log append that carries client
//!   writes wait for the floor to come back before writing, as it would wait for a slow
//!   disk: the last line before RocksDB meets ENOSPC (a follower whose leader still has
//!   room keeps receiving sends, and something else may be filling the disk).
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

    /// Whether the free space is below the floor, half the reserve: appends carrying client
    /// writes wait there.
    pub fn exhausted(&self) -> bool {
        let min = self.min();
        min > 0 && self.free() < min / 2
    }

    /// Waits until the free space is at the floor again (at once if it is). A Raft log
    /// append carrying client writes awaits it first.
    pub async fn room(&self) {
        if !self.exhausted() {
            return;
        }
        tracing::error!(
            free = self.free(),
            floor = self.min() / 2,
            dir = %self.dir.display(),
            "DISK FULL: free space is below half the reserve: log appends carrying client writes wait here \
             (the group stops on this node) until space is freed"
        );
        while self.exhausted() {
            tokio::time::sleep(POLL).await;
            self.refresh();
        }
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

    #[tokio::test]
    async fn free_space_is_read_and_a_reserve_above_it_is_low() {
        let dir = tempfile::tempdir().expect("tempdir");
        let space = DiskSpace::watch(dir.path());
        let free = space.refresh();
        assert!(free > 0 && free < u64::MAX, "{free}");
        assert!(!space.low(), "no reserve: never low");
        space.set_min(free / 2);
        assert!(!space.low() && !space.exhausted());
        tokio::time::timeout(Duration::from_secs(1), space.room()).await.expect("room at once");
        // Below the reserve, above its floor: writes are refused, appends go on.
        space.set_min(free + free / 2);
        assert!(space.low() && !space.exhausted());
        tokio::time::timeout(Duration::from_secs(1), space.room()).await.expect("room above the floor");
        space.set_min(u64::MAX);
        assert!(space.low() && space.exhausted());
        assert!(tokio::time::timeout(POLL * 3, space.room()).await.is_err(), "no room: it waits");
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }
}
