//! `lossyfs`: a FUSE pass-through filesystem that simulates a power failure.
//!
//! [`mount`] mirrors a backing directory at a mountpoint. A process using the mountpoint
//! (a convoy node and its RocksDB) sees an ordinary POSIX filesystem, but **file contents are
//! held in memory until the file is fsynced**. [`LossyMount::power_fail`] then throws away
//! everything that was written but not fsynced, the way a machine that loses power loses its
//! page cache.
//!
//! # The model
//!
//! * **Data is volatile until fsync.** `write` and size changes of a regular file (`truncate`,
//!   `ftruncate`, `O_TRUNC`, size-changing `fallocate`) are kept per inode in memory as
//!   *pending* state. Reads see the latest data: the backing file overlaid with the pending
//!   writes, with the pending size.
//! * **`fsync` and `fdatasync` make a file durable.** They apply the file's pending state to
//!   the backing file (truncate, `pwrite`, extend) and fsync it (`fdatasync` uses
//!   `sync_data`). An fsync through any descriptor of the file, even a read-only one, makes
//!   the whole file durable, as on Linux. `O_SYNC`/`O_DSYNC` writes work too: the kernel follows
//!   each with an fsync request.
//! * **`close` does not make anything durable**: `flush` and `release` keep the pending state.
//!   Neither do `sync_file_range` (the kernel does not forward it to FUSE) nor `sync(2)`/
//!   `syncfs(2)` (FUSE has no such request), so a program that relies on `syncfs` would lose
//!   data here that it would keep on a real disk.
//! * **Metadata is durable at once.** `create`, `mkdir`, `mknod`, `symlink`, `rename`, `unlink`,
//!   `rmdir`, `chmod`, `chown` and `utimens` are applied to the backing directory immediately and
//!   survive a power failure. Directory fsync is therefore a no-op. This is *kinder* than real
//!   hardware: a file created or renamed without an fsync of its directory may vanish on a real
//!   power failure, but never does here. What it does catch is the classic bug of
//!   write-new-file, rename-over-old, no fsync of the file: after a power failure the new name
//!   holds an empty (or short) file.
//! * **A power failure drops all pending state** of every file: [`LossyMount::power_fail`].
//!   Files keep their names and their last fsynced contents. The kernel's page cache is
//!   invalidated for the affected inodes. The mount stays up, so the usual sequence is: kill the
//!   processes that use it (the "machine" is off), `power_fail()`, restart them.
//!
//! # What is not simulated
//!
//! * Torn or partial writes: a write is either entirely pending or (after fsync) entirely
//!   durable; there is no loss of part of a page, no sector-level tearing, no garbage.
//! * Reordering or partial persistence of unsynced data: a real disk may have persisted *some*
//!   unsynced writes (e.g. written back by the kernel) before power was lost; here all of them
//!   are lost, always. So `lossyfs` tests "nothing unsynced survives", not "any subset may
//!   survive".
//! * Loss of metadata (see above), directory-fsync semantics, hard links (`link` fails with
//!   `EOPNOTSUPP`, which RocksDB treats as "not supported" and works around), extended
//!   attributes (not supported) and writable shared `mmap` beyond what the kernel turns into
//!   `write` requests.
//! * Space accounting: `fallocate` with `FALLOC_FL_KEEP_SIZE` succeeds without reserving space;
//!   pending data lives in this process's memory, without limit.
//! * Crashes of the filesystem process itself. A mount whose process died must be cleaned up by
//!   hand (`fusermount3 -u -z MOUNTPOINT` or `umount -l MOUNTPOINT`). `auto_unmount` is not
//!   used: fuser only allows it together with `allow_other`.
//!
//! Do not change the backing directory behind the mount's back while it is mounted: the inode
//! table and the pending state assume every change goes through the mount.
//!
//! File locks (`fcntl(F_SETLK)`, `flock`) are handled by the kernel on the FUSE mount itself
//! (the filesystem does not ask for remote locking), so RocksDB's `LOCK` file works between
//! processes that use the same mount.
//!
//! # Requirements
//!
//! `/dev/fuse`, and either root (mount(2) directly) or the `fusermount3` binary (Debian package
//! `fuse3`). Only the user that mounted may use the mount (no `allow_other`).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io;
use std::ops::Bound;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, MountOption, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// How long the kernel may cache attributes. Zero: sizes change behind its back on power failure.
const ATTR_TTL: Duration = Duration::ZERO;
/// How long the kernel may cache names. Every namespace change goes through this filesystem, and
/// a power failure changes no names, so a short positive value is safe.
const ENTRY_TTL: Duration = Duration::from_secs(1);
/// Block size reported by `stat`.
const BLOCK: u64 = 4096;
/// Largest write request asked of the kernel (it may cap it further, typically at 1 MiB).
const MAX_WRITE: u32 = 1 << 20;
const ROOT_INO: u64 = 1;

type Res<T> = Result<T, Errno>;

/// What [`LossyMount::power_fail`] threw away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PowerFailReport {
    /// Files that had pending (unsynced) writes or size changes.
    pub files_affected: u64,
    /// Bytes of pending writes dropped (size-only changes count zero bytes).
    pub bytes_dropped: u64,
    /// Held fsyncs (see [`LossyMount::hold_fsyncs`]) that were failed instead of performed.
    pub fsyncs_failed: u64,
}

/// Counters of a mount, see [`LossyMount::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Files that currently have pending (unsynced) state.
    pub pending_files: u64,
    /// Bytes of pending, unsynced writes currently held in memory.
    pub pending_bytes: u64,
    /// File fsync/fdatasync requests seen.
    pub fsyncs: u64,
    /// Directory fsync requests seen (no-ops: metadata is durable at once).
    pub dir_fsyncs: u64,
    /// Bytes made durable by fsyncs (and [`LossyMount::sync_all`]).
    pub synced_bytes: u64,
    /// Power failures simulated so far.
    pub power_failures: u64,
    /// Bytes dropped by all power failures so far.
    pub dropped_bytes: u64,
}

/// A mounted `lossyfs`. Dropping it unmounts (lazily if the mount is still busy) and discards
/// whatever is still pending, like a power failure at unmount; call [`LossyMount::sync_all`]
/// first for a clean shutdown.
pub struct LossyMount {
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    notifier: Notifier,
    mountpoint: PathBuf,
    backing: PathBuf,
}

impl std::fmt::Debug for LossyMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossyMount").field("backing", &self.backing).field("mountpoint", &self.mountpoint).finish()
    }
}

/// Mount a `lossyfs` mirroring `backing` (an existing directory) at `mountpoint` (created if
/// missing). Neither may contain the other. Returns once the mount is usable.
pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<LossyMount> {
    let backing = backing.canonicalize()?;
    if !backing.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", backing.display())));
    }
    fs::create_dir_all(mountpoint)?;
    let mountpoint = mountpoint.canonicalize()?;
    if mountpoint.starts_with(&backing) || backing.starts_with(&mountpoint) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "mountpoint {} and backing {} must not contain each other",
                mountpoint.display(),
                backing.display()
            ),
        ));
    }
    let state = Arc::new(Mutex::new(State::new(backing.clone())));
    let fs = LossyFs { state: Arc::clone(&state) };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("lossyfs".to_owned()),
        MountOption::Subtype("lossyfs".to_owned()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    let session = fuser::spawn_mount(fs, &mountpoint, &config)?;
    let notifier = session.notifier();
    Ok(LossyMount { state, session: Some(session), notifier, mountpoint, backing })
}

impl LossyMount {
    /// Simulate a power failure: drop every pending (unsynced) write and size change of every
    /// file. Names and fsynced contents stay. Stop the processes using the mount first; ones still
    /// running keep going on the reverted files.
    pub fn power_fail(&self) -> PowerFailReport {
        let (report, inos) = lock(&self.state).power_fail();
        // Outside the lock: the kernel may need this filesystem to answer while invalidating.
        for ino in inos {
            // ENOENT (inode not cached by the kernel) is already mapped to Ok by fuser; any
            // other failure only means a stale page cache for a file nobody reopened yet, which
            // reopening clears (we never set FOPEN_KEEP_CACHE).
            let _ = self.notifier.inval_inode(INodeNo(ino), 0, 0);
        }
        report
    }

    /// Hold back every fsync from now on: requests wait unanswered, their data pending, as on
    /// a disk whose flushes are slow. Other requests go on. Ended by
    /// [`LossyMount::release_fsyncs`] or by [`LossyMount::power_fail`], which fails them.
    /// A process waiting in a held fsync cannot finish dying: kill it, then power-fail or
    /// release, then reap it.
    pub fn hold_fsyncs(&self) {
        let mut st = lock(&self.state);
        if st.held.is_none() {
            st.held = Some(Vec::new());
        }
    }

    /// Performs and answers every held fsync and stops holding. Returns how many were held.
    pub fn release_fsyncs(&self) -> usize {
        let mut st = lock(&self.state);
        let held = st.held.take().unwrap_or_default();
        let n = held.len();
        for h in held {
            let r = st.sync_ino(h.ino, Some(h.fh), h.datasync);
            reply_empty(h.reply, r);
        }
        n
    }

    /// Make every pending write durable, as a clean shutdown (or `sync`) would. Returns the bytes
    /// written. Files unlinked while open, with no writable descriptor left, are skipped.
    pub fn sync_all(&self) -> io::Result<u64> {
        let mut st = lock(&self.state);
        let before = st.synced_bytes;
        let inos: Vec<u64> = st.pending.keys().copied().collect();
        for ino in inos {
            st.sync_ino(ino, None, false).map_err(|e| io::Error::from_raw_os_error(e.code()))?;
        }
        Ok(st.synced_bytes - before)
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let st = lock(&self.state);
        Stats {
            pending_files: st.pending.len() as u64,
            pending_bytes: st.pending.values().map(|p| p.bytes).sum(),
            fsyncs: st.fsyncs,
            dir_fsyncs: st.dir_fsyncs,
            synced_bytes: st.synced_bytes,
            power_failures: st.power_failures,
            dropped_bytes: st.dropped_bytes,
        }
    }

    /// Where the filesystem is mounted (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The backing directory (canonical path).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Unmount now, reporting errors (dropping does the same but ignores them). Pending writes
    /// are discarded.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path = CString::new(self.mountpoint.as_os_str().as_bytes())?;
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
            // The kernel aborts the connection on unmount, which ends the session thread.
            return session.join();
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EBUSY) {
            // Still in use (a process has a file or its cwd there): detach it from the namespace
            // now; the kernel ends the session when the last user is gone. Don't wait for that.
            // SAFETY: as above.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                return Err(io::Error::last_os_error());
            }
            drop(session);
            return Ok(());
        }
        // Not root: fuser unmounts through fusermount3.
        session.umount_and_join()
    }
}

impl Drop for LossyMount {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The unsynced state of one regular file.
#[derive(Debug)]
struct Pending {
    /// Size the file has for readers now.
    size: u64,
    /// Lowest size a truncate set since the last fsync: backing bytes at or past it are gone.
    shrink: Option<u64>,
    /// Written data by offset; extents are disjoint and never adjacent.
    extents: BTreeMap<u64, Vec<u8>>,
    /// Sum of the extents' lengths.
    bytes: u64,
    /// Modification time to report.
    mtime: SystemTime,
}

impl Pending {
    fn new(backing_len: u64) -> Self {
        Pending { size: backing_len, shrink: None, extents: BTreeMap::new(), bytes: 0, mtime: SystemTime::now() }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        self.mtime = SystemTime::now();
        if data.is_empty() {
            return;
        }
        let end = off + data.len() as u64;
        // Extend the extent that overlaps or touches `off` from the left, if any, in place.
        let left = self.extents.range(..=off).next_back().filter(|(s, v)| **s + v.len() as u64 >= off).map(|(s, _)| *s);
        let (start, mut buf) = match left.and_then(|s| self.extents.remove(&s).map(|v| (s, v))) {
            Some(found) => found,
            None => (off, Vec::with_capacity(data.len())),
        };
        self.bytes -= buf.len() as u64;
        let rel = (off - start) as usize;
        if buf.len() < rel + data.len() {
            buf.resize(rel + data.len(), 0);
        }
        buf[rel..rel + data.len()].copy_from_slice(data);
        // Absorb extents that start inside or right after the new data.
        let right: Vec<u64> =
            self.extents.range((Bound::Excluded(off), Bound::Included(end))).map(|(s, _)| *s).collect();
        for s in right {
            if let Some(v) = self.extents.remove(&s) {
                self.bytes -= v.len() as u64;
                let buf_end = start + buf.len() as u64;
                let v_end = s + v.len() as u64;
                if v_end > buf_end {
                    buf.extend_from_slice(&v[(buf_end - s) as usize..]);
                }
            }
        }
        self.bytes += buf.len() as u64;
        self.extents.insert(start, buf);
        self.size = self.size.max(end);
    }

    fn truncate(&mut self, len: u64) {
        self.mtime = SystemTime::now();
        if len < self.size {
            let tail = self.extents.split_off(&len);
            self.bytes -= tail.values().map(|v| v.len() as u64).sum::<u64>();
            if let Some((&s, v)) = self.extents.iter_mut().next_back() {
                if s + v.len() as u64 > len {
                    let keep = (len - s) as usize;
                    self.bytes -= (v.len() - keep) as u64;
                    v.truncate(keep);
                }
            }
            self.shrink = Some(self.shrink.map_or(len, |k| k.min(len)));
        }
        self.size = len;
    }

    /// Zero `[off, end)` (punch hole / zero range).
    fn zero(&mut self, off: u64, end: u64) {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(end.saturating_sub(off)) as usize];
        let mut at = off;
        while at < end {
            let n = CHUNK.min(end - at);
            self.write(at, &zeros[..n as usize]);
            at += n;
        }
    }

    fn read(&self, file: &File, off: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - off) as usize];
        let base_end = file.metadata()?.len().min(self.shrink.unwrap_or(u64::MAX)).min(end);
        if off < base_end {
            // A short read leaves zeros, which is what the backing file would read as anyway.
            pread(file, off, &mut out[..(base_end - off) as usize])?;
        }
        for (&s, v) in self.extents.range(..end).rev() {
            let v_end = s + v.len() as u64;
            if v_end <= off {
                break;
            }
            let from = s.max(off);
            let to = v_end.min(end);
            out[(from - off) as usize..(to - off) as usize].copy_from_slice(&v[(from - s) as usize..(to - s) as usize]);
        }
        Ok(out)
    }

    /// Write this state into the backing file (not yet fsynced). Idempotent.
    fn apply(&self, file: &File) -> io::Result<()> {
        if let Some(k) = self.shrink {
            file.set_len(k)?;
        }
        for (&s, v) in &self.extents {
            file.write_all_at(v, s)?;
        }
        if file.metadata()?.len() != self.size {
            file.set_len(self.size)?;
        }
        Ok(())
    }
}

fn pread(file: &File, off: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn sync_file(file: &File, datasync: bool) -> io::Result<()> {
    if datasync {
        file.sync_data()
    } else {
        file.sync_all()
    }
}

#[derive(Debug)]
struct Inode {
    /// Path relative to the backing root; `None` once unlinked (kept while open).
    path: Option<PathBuf>,
    /// Open file handles.
    open: u32,
}

#[derive(Debug)]
struct Handle {
    ino: u64,
    file: File,
    writable: bool,
}

type DirSnapshot = Vec<(u64, FileType, OsString)>;

#[derive(Debug)]
struct State {
    root: PathBuf,
    inodes: HashMap<u64, Inode>,
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    dirs: HashMap<u64, DirSnapshot>,
    next_fh: u64,
    pending: HashMap<u64, Pending>,
    fsyncs: u64,
    dir_fsyncs: u64,
    synced_bytes: u64,
    power_failures: u64,
    dropped_bytes: u64,
    /// While `Some`, fsyncs are held back: each request waits here, unanswered and with its
    /// data still pending, until [`LossyMount::release_fsyncs`] (which performs them) or a
    /// power failure (which fails them and drops their data).
    held: Option<Vec<HeldFsync>>,
}

/// An fsync request held back (see `State::held`).
struct HeldFsync {
    ino: u64,
    fh: u64,
    datasync: bool,
    reply: ReplyEmpty,
}

impl std::fmt::Debug for HeldFsync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldFsync").field("ino", &self.ino).field("fh", &self.fh).finish_non_exhaustive()
    }
}

fn eno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn join(root: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

fn c_path(p: &Path) -> Res<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

fn check(rc: libc::c_int) -> Res<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(eno(io::Error::last_os_error()))
    }
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    let nanos = Duration::from_nanos(u64::try_from(nsec).unwrap_or(0));
    if sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(sec.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + nanos
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    let (sec, nsec) = match t {
        None => (0, libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => (0, libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as libc::time_t, d.subsec_nanos() as libc::c_long),
            Err(_) => (0, 0),
        },
    };
    libc::timespec { tv_sec: sec, tv_nsec: nsec }
}

fn make_attr(ino: u64, md: &Metadata, pending: Option<&Pending>) -> FileAttr {
    let kind = FileType::from_std(md.file_type()).unwrap_or(FileType::RegularFile);
    let mut mtime = system_time(md.mtime(), md.mtime_nsec());
    let mut ctime = system_time(md.ctime(), md.ctime_nsec());
    let mut size = md.len();
    if let Some(p) = pending {
        size = p.size;
        mtime = p.mtime;
        ctime = ctime.max(p.mtime);
    }
    // Blocks consistent with the size, so nobody thinks there is preallocated space to trim.
    let blocks = if kind == FileType::RegularFile { size.div_ceil(BLOCK) * (BLOCK / 512) } else { md.blocks() };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks,
        atime: system_time(md.atime(), md.atime_nsec()),
        mtime,
        ctime,
        crtime: UNIX_EPOCH,
        kind,
        perm: (md.mode() & 0o7777) as u16,
        nlink: u32::try_from(md.nlink()).unwrap_or(u32::MAX),
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: BLOCK as u32,
        flags: 0,
    }
}

/// Open a backing file read-write when possible (fsync through a read-only descriptor must be
/// able to write the pending data), else with the access the caller asked for.
fn open_backing(path: &Path, flags: i32) -> io::Result<(File, bool)> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if flags & libc::O_ACCMODE == libc::O_RDONLY => match OpenOptions::new().read(true).open(path) {
            Ok(f) => Ok((f, false)),
            Err(_) => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// What a metadata change applies to: an open descriptor (works after unlink) or a path.
enum Target {
    Fd(RawFd),
    Path(CString),
}

impl State {
    fn new(root: PathBuf) -> Self {
        let mut inodes = HashMap::new();
        inodes.insert(ROOT_INO, Inode { path: Some(PathBuf::new()), open: 0 });
        let mut by_path = HashMap::new();
        by_path.insert(PathBuf::new(), ROOT_INO);
        State {
            root,
            inodes,
            by_path,
            next_ino: ROOT_INO + 1,
            handles: HashMap::new(),
            dirs: HashMap::new(),
            next_fh: 1,
            pending: HashMap::new(),
            fsyncs: 0,
            dir_fsyncs: 0,
            synced_bytes: 0,
            power_failures: 0,
            dropped_bytes: 0,
            held: None,
        }
    }

    fn rel(&self, ino: u64) -> Res<&Path> {
        self.inodes.get(&ino).and_then(|i| i.path.as_deref()).ok_or(Errno::ENOENT)
    }

    fn full(&self, rel: &Path) -> PathBuf {
        join(&self.root, rel)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Res<PathBuf> {
        if name.is_empty() || name.as_bytes().contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        Ok(self.rel(parent)?.join(name))
    }

    /// The inode of a path, allocating a number the first time it is seen.
    fn ino_for(&mut self, rel: &Path) -> u64 {
        if let Some(&ino) = self.by_path.get(rel) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.by_path.insert(rel.to_path_buf(), ino);
        self.inodes.insert(ino, Inode { path: Some(rel.to_path_buf()), open: 0 });
        ino
    }

    /// Forget the name `rel` (and, for a directory, every name below it): it was unlinked or
    /// renamed over. Open inodes live on without a name until released.
    fn detach(&mut self, rel: &Path, subtree: bool) {
        let victims: Vec<PathBuf> = if subtree {
            self.by_path.keys().filter(|p| p.starts_with(rel)).cloned().collect()
        } else {
            vec![rel.to_path_buf()]
        };
        for p in victims {
            if let Some(ino) = self.by_path.remove(&p) {
                if let Some(inode) = self.inodes.get_mut(&ino) {
                    inode.path = None;
                }
                self.gc(ino);
            }
        }
    }

    fn gc(&mut self, ino: u64) {
        if self.inodes.get(&ino).is_some_and(|i| i.path.is_none() && i.open == 0) {
            self.inodes.remove(&ino);
            self.pending.remove(&ino);
        }
    }

    fn handle_of(&self, ino: u64, fh: Option<u64>) -> Option<&Handle> {
        fh.and_then(|f| self.handles.get(&f))
            .filter(|h| h.ino == ino)
            .or_else(|| self.handles.values().find(|h| h.ino == ino))
    }

    fn metadata(&self, ino: u64, fh: Option<u64>) -> Res<Metadata> {
        if let Some(h) = fh.and_then(|f| self.handles.get(&f)).filter(|h| h.ino == ino) {
            return h.file.metadata().map_err(eno);
        }
        match self.inodes.get(&ino) {
            None => Err(Errno::ENOENT),
            Some(Inode { path: Some(rel), .. }) => fs::symlink_metadata(self.full(rel)).map_err(eno),
            Some(Inode { path: None, .. }) => match self.handle_of(ino, None) {
                Some(h) => h.file.metadata().map_err(eno),
                None => Err(Errno::ENOENT),
            },
        }
    }

    fn attr(&self, ino: u64, fh: Option<u64>) -> Res<FileAttr> {
        let md = self.metadata(ino, fh)?;
        Ok(make_attr(ino, &md, self.pending.get(&ino)))
    }

    fn target(&self, ino: u64, fh: Option<u64>) -> Res<Target> {
        if let Some(h) = fh.and_then(|f| self.handles.get(&f)).filter(|h| h.ino == ino) {
            return Ok(Target::Fd(h.file.as_raw_fd()));
        }
        match self.rel(ino) {
            Ok(rel) => Ok(Target::Path(c_path(&self.full(rel))?)),
            Err(e) => self.handle_of(ino, None).map(|h| Target::Fd(h.file.as_raw_fd())).ok_or(e),
        }
    }

    /// The pending state of a regular file, created from its backing size if there is none.
    fn pending_for(&mut self, ino: u64, fh: Option<u64>) -> Res<&mut Pending> {
        if !self.pending.contains_key(&ino) {
            let md = self.metadata(ino, fh)?;
            if md.is_dir() {
                return Err(Errno::EISDIR);
            }
            if !md.is_file() {
                return Err(Errno::EINVAL);
            }
            self.pending.insert(ino, Pending::new(md.len()));
        }
        self.pending.get_mut(&ino).ok_or(Errno::EIO)
    }

    fn logical_len(&self, ino: u64, fh: Option<u64>) -> Res<u64> {
        match self.pending.get(&ino) {
            Some(p) => Ok(p.size),
            None => Ok(self.metadata(ino, fh)?.len()),
        }
    }

    fn add_handle(&mut self, ino: u64, file: File, writable: bool) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, file, writable });
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.open += 1;
        }
        fh
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Res<FileAttr> {
        let rel = self.child(parent, name)?;
        let md = fs::symlink_metadata(self.full(&rel)).map_err(eno)?;
        let ino = self.ino_for(&rel);
        Ok(make_attr(ino, &md, self.pending.get(&ino)))
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<u64>,
    ) -> Res<FileAttr> {
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            let target = self.target(ino, fh)?;
            if let Some(mode) = mode {
                let mode = (mode & 0o7777) as libc::mode_t;
                // SAFETY: plain syscalls on a descriptor we own or a NUL-terminated path.
                check(match &target {
                    Target::Fd(fd) => unsafe { libc::fchmod(*fd, mode) },
                    Target::Path(p) => unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode, 0) },
                })?;
            }
            if uid.is_some() || gid.is_some() {
                let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
                // SAFETY: as above.
                check(match &target {
                    Target::Fd(fd) => unsafe { libc::fchown(*fd, u, g) },
                    Target::Path(p) => unsafe { libc::lchown(p.as_ptr(), u, g) },
                })?;
            }
            if atime.is_some() || mtime.is_some() {
                let times = [timespec(atime), timespec(mtime)];
                // SAFETY: as above; `times` is a two-element array as the calls require.
                check(match &target {
                    Target::Fd(fd) => unsafe { libc::futimens(*fd, times.as_ptr()) },
                    Target::Path(p) => unsafe {
                        libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                    },
                })?;
                if let (Some(p), Some(t)) = (self.pending.get_mut(&ino), mtime) {
                    p.mtime = match t {
                        TimeOrNow::Now => SystemTime::now(),
                        TimeOrNow::SpecificTime(t) => t,
                    };
                }
            }
        }
        if let Some(len) = size {
            self.set_size(ino, fh, len)?;
        }
        self.attr(ino, fh)
    }

    fn set_size(&mut self, ino: u64, fh: Option<u64>, len: u64) -> Res<()> {
        if !self.pending.contains_key(&ino) {
            let md = self.metadata(ino, fh)?;
            if md.is_file() && md.len() == len {
                return Ok(());
            }
        }
        self.pending_for(ino, fh)?.truncate(len);
        Ok(())
    }

    fn open(&mut self, ino: u64, flags: i32) -> Res<u64> {
        let full = self.full(self.rel(ino)?);
        let (file, writable) = open_backing(&full, flags).map_err(eno)?;
        Ok(self.add_handle(ino, file, writable))
    }

    fn create(&mut self, parent: u64, name: &OsStr, mode: u32, umask: u32, flags: i32) -> Res<(FileAttr, u64)> {
        let rel = self.child(parent, name)?;
        let full = self.full(&rel);
        let perm = mode & !umask & 0o7777;
        let (file, writable, fresh) =
            match OpenOptions::new().read(true).write(true).create_new(true).mode(perm).open(&full) {
                Ok(f) => (f, true, true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && flags & libc::O_EXCL == 0 => {
                    let (f, w) = open_backing(&full, flags).map_err(eno)?;
                    (f, w, false)
                }
                Err(e) => return Err(eno(e)),
            };
        if fresh {
            // The process umask must not narrow the mode the caller asked for.
            file.set_permissions(Permissions::from_mode(perm)).map_err(eno)?;
            // A name we knew but that was not in the backing directory is stale.
            self.detach(&rel, false);
        }
        let ino = self.ino_for(&rel);
        let fh = self.add_handle(ino, file, writable);
        if !fresh && flags & libc::O_TRUNC != 0 {
            self.set_size(ino, Some(fh), 0)?;
        }
        Ok((self.attr(ino, Some(fh))?, fh))
    }

    fn read(&self, ino: u64, fh: u64, off: u64, size: u32) -> Res<Vec<u8>> {
        let h = self.handle_of(ino, Some(fh)).ok_or(Errno::EBADF)?;
        match self.pending.get(&ino) {
            Some(p) => p.read(&h.file, off, u64::from(size)).map_err(eno),
            None => {
                let mut buf = vec![0u8; size as usize];
                let n = pread(&h.file, off, &mut buf).map_err(eno)?;
                buf.truncate(n);
                Ok(buf)
            }
        }
    }

    fn write(&mut self, ino: u64, fh: u64, off: u64, data: &[u8]) -> Res<u32> {
        let n = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        off.checked_add(data.len() as u64).filter(|end| i64::try_from(*end).is_ok()).ok_or(Errno::EFBIG)?;
        self.pending_for(ino, Some(fh))?.write(off, data);
        Ok(n)
    }

    fn release(&mut self, fh: u64) {
        if let Some(h) = self.handles.remove(&fh) {
            if let Some(inode) = self.inodes.get_mut(&h.ino) {
                inode.open = inode.open.saturating_sub(1);
            }
            self.gc(h.ino);
        }
    }

    /// fsync: apply the pending state of `ino` to the backing file and fsync it.
    fn sync_ino(&mut self, ino: u64, fh: Option<u64>, datasync: bool) -> Res<()> {
        let State { root, inodes, handles, pending, synced_bytes, .. } = self;
        let writable = fh
            .and_then(|f| handles.get(&f))
            .filter(|h| h.ino == ino && h.writable)
            .or_else(|| handles.values().find(|h| h.ino == ino && h.writable))
            .map(|h| &h.file);
        let opened;
        let file = match writable {
            Some(f) => f,
            None => match inodes.get(&ino).and_then(|i| i.path.as_deref()) {
                Some(rel) => {
                    opened = OpenOptions::new().write(true).open(join(root, rel)).map_err(eno)?;
                    &opened
                }
                // Unlinked and no writable descriptor: nothing of it can survive anyway.
                None => return Ok(()),
            },
        };
        let Some(p) = pending.remove(&ino) else {
            return sync_file(file, datasync).map_err(eno);
        };
        match p.apply(file).and_then(|()| sync_file(file, datasync)) {
            Ok(()) => {
                *synced_bytes += p.bytes;
                Ok(())
            }
            Err(e) => {
                // Still pending: a later fsync may succeed (applying again is idempotent).
                pending.insert(ino, p);
                Err(eno(e))
            }
        }
    }

    fn power_fail(&mut self) -> (PowerFailReport, Vec<u64>) {
        let mut report = PowerFailReport::default();
        // Held fsyncs never happened: their callers (killed by now) get an error.
        for h in self.held.take().unwrap_or_default() {
            report.fsyncs_failed += 1;
            h.reply.error(Errno::EIO);
        }
        let mut inos = Vec::with_capacity(self.pending.len());
        for (ino, p) in self.pending.drain() {
            report.files_affected += 1;
            report.bytes_dropped += p.bytes;
            inos.push(ino);
        }
        self.power_failures += 1;
        self.dropped_bytes += report.bytes_dropped;
        (report, inos)
    }

    fn opendir(&mut self, ino: u64) -> Res<u64> {
        let rel = self.rel(ino)?.to_path_buf();
        let parent = rel.parent().and_then(|p| self.by_path.get(p)).copied().unwrap_or(ROOT_INO);
        let mut entries: DirSnapshot =
            vec![(ino, FileType::Directory, OsString::from(".")), (parent, FileType::Directory, OsString::from(".."))];
        for entry in fs::read_dir(self.full(&rel)).map_err(eno)? {
            let entry = entry.map_err(eno)?;
            let name = entry.file_name();
            let kind = entry.file_type().ok().and_then(FileType::from_std).unwrap_or(FileType::RegularFile);
            let child = self.ino_for(&rel.join(&name));
            entries.push((child, kind, name));
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.dirs.insert(fh, entries);
        Ok(fh)
    }

    fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32, umask: u32) -> Res<FileAttr> {
        let rel = self.child(parent, name)?;
        let full = self.full(&rel);
        let perm = mode & !umask & 0o7777;
        fs::DirBuilder::new().mode(perm).create(&full).map_err(eno)?;
        fs::set_permissions(&full, Permissions::from_mode(perm)).map_err(eno)?;
        self.detach(&rel, true);
        self.lookup(parent, name)
    }

    fn mknod(&mut self, parent: u64, name: &OsStr, mode: u32, umask: u32, rdev: u32) -> Res<FileAttr> {
        let rel = self.child(parent, name)?;
        let path = c_path(&self.full(&rel))?;
        // SAFETY: NUL-terminated path that outlives the call.
        check(unsafe { libc::mknod(path.as_ptr(), (mode & !umask) as libc::mode_t, libc::dev_t::from(rdev)) })?;
        self.detach(&rel, false);
        self.lookup(parent, name)
    }

    fn symlink(&mut self, parent: u64, name: &OsStr, target: &Path) -> Res<FileAttr> {
        let rel = self.child(parent, name)?;
        std::os::unix::fs::symlink(target, self.full(&rel)).map_err(eno)?;
        self.detach(&rel, false);
        self.lookup(parent, name)
    }

    fn unlink(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        let rel = self.child(parent, name)?;
        fs::remove_file(self.full(&rel)).map_err(eno)?;
        self.detach(&rel, false);
        Ok(())
    }

    fn rmdir(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        let rel = self.child(parent, name)?;
        fs::remove_dir(self.full(&rel)).map_err(eno)?;
        self.detach(&rel, true);
        Ok(())
    }

    fn rename(&mut self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: RenameFlags) -> Res<()> {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return Err(Errno::EINVAL);
        }
        let src = self.child(parent, name)?;
        let dst = self.child(newparent, newname)?;
        let (src_full, dst_full) = (self.full(&src), self.full(&dst));
        let src_is_dir = fs::symlink_metadata(&src_full).map_err(eno)?.is_dir();
        if flags.is_empty() {
            fs::rename(&src_full, &dst_full).map_err(eno)?;
        } else {
            let (s, d) = (c_path(&src_full)?, c_path(&dst_full)?);
            // SAFETY: renameat2 with NUL-terminated paths that outlive the call.
            let rc = unsafe {
                libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, s.as_ptr(), libc::AT_FDCWD, d.as_ptr(), flags.bits())
            };
            if rc != 0 {
                return Err(eno(io::Error::last_os_error()));
            }
        }
        if src == dst {
            return Ok(());
        }
        self.detach(&dst, true);
        let moved: Vec<(PathBuf, u64)> = if src_is_dir {
            self.by_path.iter().filter(|(p, _)| p.starts_with(&src)).map(|(p, i)| (p.clone(), *i)).collect()
        } else {
            self.by_path.get(&src).map(|i| (src.clone(), *i)).into_iter().collect()
        };
        for (old, ino) in moved {
            self.by_path.remove(&old);
            let new = match old.strip_prefix(&src) {
                Ok(rest) if !rest.as_os_str().is_empty() => dst.join(rest),
                _ => dst.clone(),
            };
            if let Some(inode) = self.inodes.get_mut(&ino) {
                inode.path = Some(new.clone());
            }
            self.by_path.insert(new, ino);
        }
        Ok(())
    }

    fn fallocate(&mut self, ino: u64, fh: u64, off: u64, len: u64, mode: i32) -> Res<()> {
        let end = off.checked_add(len).filter(|e| i64::try_from(*e).is_ok()).ok_or(Errno::EFBIG)?;
        let size = self.logical_len(ino, Some(fh))?;
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        match mode {
            // Preallocation: only the size is visible, and only without KEEP_SIZE.
            0 => {
                if end > size {
                    self.set_size(ino, Some(fh), end)?;
                }
            }
            KEEP => {}
            PUNCH => {
                if off < size {
                    self.pending_for(ino, Some(fh))?.zero(off, end.min(size));
                }
            }
            m if m == ZERO || m == ZERO | KEEP => {
                let zero_end = if m & KEEP != 0 { end.min(size) } else { end };
                if off < zero_end {
                    self.pending_for(ino, Some(fh))?.zero(off, zero_end);
                }
            }
            _ => return Err(Errno::EOPNOTSUPP),
        }
        Ok(())
    }
}

/// The [`fuser::Filesystem`]: every request locks the shared [`State`].
struct LossyFs {
    state: Arc<Mutex<State>>,
}

impl LossyFs {
    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn reply_entry(reply: ReplyEntry, res: Res<FileAttr>) {
    match res {
        Ok(attr) => reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, res: Res<()>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl fuser::Filesystem for LossyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Ask for large writes; if the kernel wants less, its own maximum is as good.
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.st().lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.st().attr(ino.0, fh.map(|f| f.0)) {
            Ok(attr) => reply.attr(&ATTR_TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.st().setattr(ino.0, mode, uid, gid, size, atime, mtime, fh.map(|f| f.0)) {
            Ok(attr) => reply.attr(&ATTR_TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.st();
        match st.rel(ino.0).map(|rel| st.full(rel)).and_then(|p| fs::read_link(p).map_err(eno)) {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.st().mknod(parent.0, name, mode, umask, rdev));
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        reply_entry(reply, self.st().mkdir(parent.0, name, mode, umask));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.st().unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.st().rmdir(parent.0, name));
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        reply_entry(reply, self.st().symlink(parent.0, link_name, target));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.st().rename(parent.0, name, newparent.0, newname, flags));
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        // One inode, one name: hard links would need a different inode table.
        reply.error(Errno::EOPNOTSUPP);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // No FOPEN_KEEP_CACHE: every open drops the kernel's cached pages of the file.
        match self.st().open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.st().read(ino.0, fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.st().write(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() is not a durability point.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.st().release(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let mut st = self.st();
        st.fsyncs += 1;
        if let Some(held) = st.held.as_mut() {
            // Answered later, from `release_fsyncs` or `power_fail`; the session goes on
            // serving other requests meanwhile.
            held.push(HeldFsync { ino: ino.0, fh: fh.0, datasync, reply });
            return;
        }
        reply_empty(reply, st.sync_ino(ino.0, Some(fh.0), datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.st().opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let st = self.st();
        let Some(entries) = st.dirs.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.st().dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Metadata is durable at once in this model.
        self.st().dir_fsyncs += 1;
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let root = match c_path(&self.st().root) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        // SAFETY: `statvfs` is plain old data, filled in by the call before it is read.
        let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: NUL-terminated path and a valid out pointer.
        match check(unsafe { libc::statvfs(root.as_ptr(), &mut sv) }) {
            Ok(()) => reply.statfs(
                sv.f_blocks,
                sv.f_bfree,
                sv.f_bavail,
                sv.f_files,
                sv.f_ffree,
                sv.f_bsize as u32,
                sv.f_namemax as u32,
                sv.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Only asked without default_permissions; existence is what matters to the caller here.
        reply_empty(reply, self.st().metadata(ino.0, None).map(|_| ()));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.st().create(parent.0, name, mode, umask, flags) {
            Ok((attr, fh)) => reply.created(&ATTR_TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.st().fallocate(ino.0, fh.0, offset, length, mode));
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    use super::*;

    /// `Some(reason)` when FUSE cannot be mounted here; the tests then skip (with a message)
    /// instead of failing, so they run wherever root and /dev/fuse are available (CI as root).
    fn skip_reason() -> Option<String> {
        if !Path::new("/dev/fuse").exists() {
            return Some("/dev/fuse does not exist".into());
        }
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let fusermount = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("fusermount3").exists()));
        if !root && !fusermount {
            return Some("not root and no fusermount3 in PATH".into());
        }
        if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/fuse") {
            return Some(format!("cannot open /dev/fuse: {e}"));
        }
        None
    }

    macro_rules! require_fuse {
        () => {
            if let Some(reason) = skip_reason() {
                eprintln!("SKIPPED (no usable FUSE): {reason}");
                return;
            }
        };
    }

    /// A mount over a fresh temp dir. `fs` is declared first so it is dropped (unmounted)
    /// before the directories are removed.
    struct Fixture {
        fs: LossyMount,
        backing: PathBuf,
        mnt: PathBuf,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).expect("mkdir backing");
        let fs = mount(&backing, &mnt).expect("mount lossyfs");
        Fixture { fs, backing, mnt, _dir: dir }
    }

    fn read_all(p: &Path) -> Vec<u8> {
        fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }

    #[test]
    fn pending_overlay_model() {
        // Pure model test, no FUSE: the overlay must behave like a file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"0123456789").unwrap();
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut model = b"0123456789".to_vec();
        let mut p = Pending::new(10);
        let ops: &[(&str, u64, &[u8])] = &[
            ("w", 8, b"abcd"),
            ("w", 20, b"XY"),
            ("w", 12, b"hole"),
            ("t", 15, b""),
            ("w", 3, b"zzzzzzzzzzzz"),
            ("t", 2, b""),
            ("t", 6, b""),
            ("w", 4, b"q"),
            ("t", 30, b""),
            ("w", 29, b"end!"),
        ];
        for (op, off, data) in ops {
            match *op {
                "w" => {
                    p.write(*off, data);
                    let end = *off as usize + data.len();
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[*off as usize..end].copy_from_slice(data);
                }
                _ => {
                    p.truncate(*off);
                    model.resize(*off as usize, 0);
                }
            }
            assert_eq!(p.size, model.len() as u64);
            assert_eq!(p.read(&file, 0, 1000).unwrap(), model, "after {op} {off}");
            assert_eq!(p.read(&file, 5, 7).unwrap(), model[5.min(model.len())..12.min(model.len())]);
            let bytes: u64 = p.extents.values().map(|v| v.len() as u64).sum();
            assert_eq!(p.bytes, bytes);
            let mut prev_end = None;
            for (s, v) in &p.extents {
                assert!(prev_end.is_none_or(|e| e < *s), "extents disjoint and not adjacent");
                prev_end = Some(s + v.len() as u64);
            }
        }
        assert_eq!(fs::read(&path).unwrap(), b"0123456789", "nothing reaches the backing file before apply");
        p.apply(&file).unwrap();
        assert_eq!(fs::read(&path).unwrap(), model);
    }

    /// Waits until the filesystem has been asked `n` fsyncs in all (a thread's fsync reaches
    /// the daemon when the kernel passes it on, not when the thread starts).
    fn wait_for_fsyncs(fs: &LossyMount, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs.stats().fsyncs < n {
            assert!(std::time::Instant::now() < deadline, "fsync {n} never reached the filesystem");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    // A held fsync does not return and does not persist; other requests go on; a power
    // failure fails it and drops its data, and a release performs it.
    #[test]
    fn held_fsyncs_wait_and_are_failed_by_a_power_failure() {
        require_fuse!();
        let fx = fixture();
        let path = fx.mnt.join("held");
        let mut f = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(&path).unwrap();
        f.write_all(b"kept").unwrap();
        f.sync_all().unwrap();
        fx.fs.hold_fsyncs();
        f.write_all(b" lost").unwrap();
        let g = f.try_clone().unwrap();
        let arrived = fx.fs.stats().fsyncs + 1;
        let syncer = std::thread::spawn(move || g.sync_all());
        wait_for_fsyncs(&fx.fs, arrived);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!syncer.is_finished(), "a held fsync does not return");
        assert_eq!(read_all(&path), b"kept lost", "other requests are served meanwhile");
        assert_eq!(read_all(&fx.backing.join("held")), b"kept", "nothing held reached the disk");
        let report = fx.fs.power_fail();
        assert_eq!(report.fsyncs_failed, 1);
        assert!(syncer.join().unwrap().is_err(), "the held fsync fails");
        assert_eq!(read_all(&path), b"kept");

        fx.fs.hold_fsyncs();
        f.write_all_at(b"!", 4).unwrap();
        let g = f.try_clone().unwrap();
        let arrived = fx.fs.stats().fsyncs + 1;
        let syncer = std::thread::spawn(move || g.sync_all());
        wait_for_fsyncs(&fx.fs, arrived);
        assert_eq!(fx.fs.release_fsyncs(), 1);
        syncer.join().unwrap().expect("a released fsync succeeds");
        assert_eq!(read_all(&fx.backing.join("held")), b"kept!");
    }

    #[test]
    fn fsynced_data_survives_unsynced_is_lost() {
        require_fuse!();
        let fx = fixture();
        let path = fx.mnt.join("data");
        let mut f = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(&path).unwrap();
        f.write_all(b"hello ").unwrap();
        f.sync_all().unwrap();
        f.write_all(b"world").unwrap();
        assert_eq!(read_all(&path), b"hello world", "reads see unsynced data");
        assert_eq!(fs::metadata(&path).unwrap().len(), 11);
        assert_eq!(read_all(&fx.backing.join("data")), b"hello ", "backing holds only fsynced data");
        let stats = fx.fs.stats();
        assert_eq!((stats.pending_files, stats.pending_bytes), (1, 5));
        assert_eq!(stats.fsyncs, 1);
        // Overwrite in the middle, then a truncate, neither synced.
        f.write_all_at(b"HE", 0).unwrap();
        f.set_len(3).unwrap();
        assert_eq!(read_all(&path), b"HEl");
        drop(f); // close is not fsync

        // Pending now: "HE" at 0 ("world" was cut off by the truncate) and the shrink to 3.
        let report = fx.fs.power_fail();
        assert_eq!(report, PowerFailReport { files_affected: 1, bytes_dropped: 2, fsyncs_failed: 0 });
        assert_eq!(read_all(&fx.backing.join("data")), b"hello ");
        assert_eq!(read_all(&path), b"hello ", "the mount shows exactly the fsynced content");
        assert_eq!(fs::metadata(&path).unwrap().len(), 6);
        let stats = fx.fs.stats();
        assert_eq!((stats.pending_files, stats.pending_bytes, stats.power_failures), (0, 0, 1));

        // fdatasync works too, and so does fsync through a read-only descriptor.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"again").unwrap();
        f.sync_data().unwrap();
        f.write_all(b" and more").unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        f.write_all(b" lost").unwrap();
        drop(f);
        assert_eq!(fx.fs.power_fail().bytes_dropped, 5);
        assert_eq!(read_all(&path), b"hello again and more");

        // A file created and written but never fsynced: the name stays (metadata is durable),
        // the content goes.
        fs::write(fx.mnt.join("fresh"), b"never synced").unwrap();
        assert_eq!(fx.fs.power_fail(), PowerFailReport { files_affected: 1, bytes_dropped: 12, fsyncs_failed: 0 });
        assert_eq!(read_all(&fx.mnt.join("fresh")), b"");
        assert_eq!(read_all(&fx.backing.join("fresh")), b"");
    }

    #[test]
    fn open_descriptor_sees_reverted_file_after_power_fail() {
        require_fuse!();
        let fx = fixture();
        let path = fx.mnt.join("f");
        let mut f = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(&path).unwrap();
        f.write_all(&[b'a'; 10_000]).unwrap();
        f.sync_all().unwrap();
        f.write_all(&[b'b'; 10_000]).unwrap();
        let mut buf = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), 20_000);
        fx.fs.power_fail();
        // The kernel's cached pages and size were invalidated.
        assert_eq!(f.metadata().unwrap().len(), 10_000);
        buf.clear();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, vec![b'a'; 10_000]);
    }

    #[test]
    fn rename_unlink_mkdir_survive_and_keep_inodes() {
        require_fuse!();
        let fx = fixture();
        let m = &fx.mnt;
        let write_synced = |p: &Path, data: &[u8]| {
            let mut f = File::create(p).unwrap();
            f.write_all(data).unwrap();
            f.sync_all().unwrap();
        };
        write_synced(&m.join("a"), b"A");
        write_synced(&m.join("c"), b"C");
        let ino_a = fs::metadata(m.join("a")).unwrap().ino();
        fs::rename(m.join("a"), m.join("b")).unwrap();
        assert_eq!(fs::metadata(m.join("b")).unwrap().ino(), ino_a, "rename keeps the inode");
        assert!(!m.join("a").exists());
        fs::remove_file(m.join("c")).unwrap();

        fs::create_dir(m.join("d")).unwrap();
        fs::create_dir(m.join("d/sub")).unwrap();
        write_synced(&m.join("d/sub/x"), b"X");
        let ino_x = fs::metadata(m.join("d/sub/x")).unwrap().ino();
        fs::rename(m.join("b"), m.join("d/b")).unwrap();
        fs::rename(m.join("d"), m.join("e")).unwrap();
        assert_eq!(fs::metadata(m.join("e/sub/x")).unwrap().ino(), ino_x, "directory rename moves the subtree");
        assert_eq!(fs::metadata(m.join("e/b")).unwrap().ino(), ino_a);
        assert_eq!(read_all(&m.join("e/sub/x")), b"X");

        // Rename over an existing file (RocksDB's CURRENT: write temp, fsync, rename).
        write_synced(&m.join("CURRENT"), b"MANIFEST-000001\n");
        write_synced(&m.join("000002.dbtmp"), b"MANIFEST-000002\n");
        fs::rename(m.join("000002.dbtmp"), m.join("CURRENT")).unwrap();
        // The classic bug: the same without fsync of the new file.
        write_synced(&m.join("CURRENT2"), b"old\n");
        fs::write(m.join("tmp2"), b"new\n").unwrap();
        fs::rename(m.join("tmp2"), m.join("CURRENT2")).unwrap();
        assert_eq!(read_all(&m.join("CURRENT2")), b"new\n");

        // Unlink while open: the open descriptor still works.
        let mut open = OpenOptions::new().read(true).write(true).open(m.join("e/b")).unwrap();
        fs::remove_file(m.join("e/b")).unwrap();
        open.write_all(b"Z").unwrap();
        let mut s = String::new();
        open.seek(SeekFrom::Start(0)).unwrap();
        open.read_to_string(&mut s).unwrap();
        assert_eq!(s, "Z");
        drop(open);

        fs::create_dir(m.join("gone")).unwrap();
        fs::remove_dir(m.join("gone")).unwrap();

        fx.fs.power_fail();
        let mut names: Vec<String> =
            fs::read_dir(m).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["CURRENT", "CURRENT2", "e"]);
        let mut backing_names: Vec<String> =
            fs::read_dir(&fx.backing).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        backing_names.sort();
        assert_eq!(backing_names, names);
        assert_eq!(read_all(&m.join("CURRENT")), b"MANIFEST-000002\n");
        assert_eq!(read_all(&m.join("CURRENT2")), b"", "renamed but never fsynced: empty after power failure");
        assert_eq!(read_all(&m.join("e/sub/x")), b"X");
        assert!(!m.join("e/b").exists());
        assert_eq!(fs::metadata(m.join("e/sub/x")).unwrap().ino(), ino_x, "inodes stable across power failure");

        // O_EXCL create of an existing name fails; of a new one works.
        let err = OpenOptions::new().write(true).create_new(true).open(m.join("CURRENT")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        OpenOptions::new().write(true).create_new(true).open(m.join("new")).unwrap();
    }

    #[test]
    fn wal_prefix_survives() {
        require_fuse!();
        let fx = fixture();
        let path = fx.mnt.join("000001.log");
        let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
        let mut expected: Vec<u8> = Vec::new();
        let mut written: Vec<u8> = Vec::new();
        let records = 500;
        for i in 0..records {
            // Variable-length records crossing page boundaries.
            let len = 1 + (i * 37) % 300;
            let rec: Vec<u8> =
                format!("{i:08}:").bytes().chain(std::iter::repeat_n(b'a' + (i % 26) as u8, len)).collect();
            f.write_all(&rec).unwrap();
            written.extend_from_slice(&rec);
            if i % 7 == 6 {
                if i % 2 == 0 {
                    f.sync_data().unwrap();
                } else {
                    f.sync_all().unwrap();
                }
                expected.clone_from(&written);
            }
        }
        assert_ne!(expected.len(), written.len(), "the tail must be unsynced for the test to mean anything");
        assert_eq!(read_all(&path), written);
        drop(f);
        let report = fx.fs.power_fail();
        assert_eq!(report.bytes_dropped as usize, written.len() - expected.len());
        assert_eq!(read_all(&fx.backing.join("000001.log")), expected, "backing: exactly the fsynced prefix");
        assert_eq!(read_all(&path), expected, "mount: exactly the fsynced prefix");

        // Life goes on after the failure: append and sync again.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"after").unwrap();
        f.sync_all().unwrap();
        expected.extend_from_slice(b"after");
        fx.fs.power_fail();
        assert_eq!(read_all(&path), expected);
        let stats = fx.fs.stats();
        assert_eq!(stats.power_failures, 2);
        assert!(stats.fsyncs >= 72, "{stats:?}");
    }

    #[test]
    fn fcntl_locks_conflict_across_owners() {
        require_fuse!();
        let fx = fixture();
        let path = fx.mnt.join("LOCK");
        let a = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(&path).unwrap();
        let b = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let wrlck = |cmd: libc::c_int, fd: RawFd| {
            // SAFETY: flock is plain old data; fcntl gets a valid descriptor and pointer.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            // SAFETY: as above.
            let rc = unsafe { libc::fcntl(fd, cmd, &mut fl) };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // RocksDB's LOCK: a process-associated write lock on the whole file.
        wrlck(libc::F_SETLK, a.as_raw_fd()).expect("F_SETLK on a lossyfs file");
        // Another owner (an open-file-description lock stands in for another process) conflicts.
        let err = wrlck(libc::F_OFD_SETLK, b.as_raw_fd()).unwrap_err();
        assert!(matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)), "{err}");
        drop(a); // closing releases the process lock
        wrlck(libc::F_OFD_SETLK, b.as_raw_fd()).expect("lock free after close");
        // flock(2) works as well.
        // SAFETY: valid descriptor.
        assert_eq!(unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    }

    #[test]
    fn fallocate_and_truncate() {
        require_fuse!();
        let fx = fixture();
        let path = fx.mnt.join("f");
        let f = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(&path).unwrap();
        f.write_all_at(b"abcdef", 0).unwrap();
        f.sync_all().unwrap();
        let fd = f.as_raw_fd();
        // SAFETY: valid descriptor for all fallocate calls.
        let falloc = |mode, off, len| unsafe { libc::fallocate(fd, mode, off, len) };
        assert_eq!(falloc(libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20), 0, "{}", io::Error::last_os_error());
        assert_eq!(f.metadata().unwrap().len(), 6);
        assert_eq!(falloc(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 1, 2), 0);
        assert_eq!(read_all(&path), b"a\0\0def");
        assert_eq!(falloc(0, 0, 100), 0);
        assert_eq!(f.metadata().unwrap().len(), 100);
        f.set_len(4).unwrap();
        assert_eq!(read_all(&path), b"a\0\0d");
        f.set_len(8).unwrap();
        assert_eq!(read_all(&path), b"a\0\0d\0\0\0\0");
        fx.fs.power_fail();
        assert_eq!(read_all(&path), b"abcdef");
        f.set_len(2).unwrap();
        f.sync_all().unwrap();
        fx.fs.power_fail();
        assert_eq!(read_all(&path), b"ab");
        assert_eq!(read_all(&fx.backing.join("f")), b"ab");
    }

    #[test]
    fn shell_process_sees_the_model() {
        require_fuse!();
        let fx = fixture();
        let status = Command::new("sh")
            .arg("-c")
            .arg("echo unsynced > a && echo synced > b && sync b && echo more >> b && ls > listing && sync listing")
            .current_dir(&fx.mnt)
            .status()
            .expect("run sh");
        assert!(status.success());
        let report = fx.fs.power_fail();
        assert_eq!(report.files_affected, 2, "{report:?}");
        assert_eq!(read_all(&fx.mnt.join("a")), b"");
        assert_eq!(read_all(&fx.mnt.join("b")), b"synced\n");
        assert_eq!(read_all(&fx.mnt.join("listing")), b"a\nb\nlisting\n");
    }

    #[test]
    fn sync_all_and_unmount() {
        require_fuse!();
        let fx = fixture();
        fs::write(fx.mnt.join("x"), b"clean shutdown").unwrap();
        assert_eq!(fx.fs.sync_all().unwrap(), 14);
        assert_eq!(fx.fs.power_fail(), PowerFailReport::default());
        let Fixture { fs: lossy, backing, mnt, _dir } = fx;
        lossy.unmount().unwrap();
        assert_eq!(read_all(&backing.join("x")), b"clean shutdown");
        assert!(!mnt.join("x").exists(), "unmounted: the mountpoint is an empty directory again");
    }

    #[test]
    fn drop_while_busy_detaches_lazily() {
        require_fuse!();
        let fx = fixture();
        fs::write(fx.mnt.join("f"), b"x").unwrap();
        // A process that still uses the mount (its cwd) when the mount is dropped.
        let mut child = Command::new("sleep").arg("30").current_dir(&fx.mnt).spawn().expect("spawn sleep");
        let Fixture { fs: lossy, mnt, _dir, .. } = fx;
        let started = std::time::Instant::now();
        drop(lossy);
        assert!(started.elapsed() < Duration::from_secs(5), "drop must not wait for users of the mount");
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(&*mnt.to_string_lossy()), "detached from the namespace");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Real RocksDB (Debian's `rocksdb-tools`: `db_bench`, `ldb`) on the mount; skipped when the
    /// tools are not installed.
    #[test]
    fn rocksdb_tools_run_on_lossyfs() {
        require_fuse!();
        let have = |tool: &str| Command::new(tool).arg("--help").output().is_ok();
        if !have("db_bench") || !have("ldb") {
            eprintln!("SKIPPED: db_bench/ldb not installed (apt-get install rocksdb-tools)");
            return;
        }
        let fx = fixture();
        let db = fx.mnt.join("db");
        let db_arg = format!("--db={}", db.display());
        let bench = |sync: bool, num: u32| {
            let out = Command::new("db_bench")
                .args([
                    db_arg.as_str(),
                    "--benchmarks=fillseq",
                    &format!("--num={num}"),
                    "--value_size=100",
                    "--compression_type=none",
                    "--write_buffer_size=65536",
                    "--target_file_size_base=65536",
                    "--max_bytes_for_level_base=262144",
                    &format!("--sync={sync}"),
                    "--use_existing_db=0",
                    "--threads=1",
                ])
                .output()
                .expect("run db_bench");
            assert!(
                out.status.success(),
                "db_bench failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ldb = |args: &[&str]| Command::new("ldb").arg(&db_arg).args(args).output().expect("run ldb");
        let count_keys = || {
            let out = ldb(&["scan", "--hex"]);
            assert!(out.status.success(), "ldb scan failed: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(" : ")).count()
        };

        // Every write fsynced: nothing may be lost.
        bench(true, 3000);
        let report = fx.fs.power_fail();
        eprintln!("sync=1: power failure dropped {report:?}; stats {:?}", fx.fs.stats());
        assert_eq!(count_keys(), 3000);

        // No fsync of the WAL: the DB must still open after a power failure; some writes are lost.
        bench(false, 3000);
        let report = fx.fs.power_fail();
        eprintln!("sync=0: power failure dropped {report:?}");
        let n = count_keys();
        eprintln!("sync=0: {n} of 3000 keys survived");
        assert!(n <= 3000);

        // Writes after the failure work, and the LOCK file excludes a second process.
        let out = ldb(&["put", "k1", "v1"]);
        assert!(out.status.success(), "ldb put: {}", String::from_utf8_lossy(&out.stderr));
        let lock = OpenOptions::new().read(true).write(true).open(db.join("LOCK")).unwrap();
        // SAFETY: flock is plain old data; fcntl gets a valid descriptor and pointer.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fcntl(lock.as_raw_fd(), libc::F_SETLK, &mut fl) }, 0);
        let out = ldb(&["put", "k2", "v2"]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "ldb put must fail while we hold LOCK");
        assert!(stderr.contains("lock"), "unexpected failure: {stderr}");
        eprintln!("ldb while LOCK is held elsewhere: {}", stderr.trim());
        drop(lock);
        let out = ldb(&["get", "k1"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v1");
    }
}
