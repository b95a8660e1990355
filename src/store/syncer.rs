//! Group commit across all shards of a node.
//!
//! Raft appends write their batch to RocksDB without sync (so the entries are readable at
//! once) and hand a completion to the one [`Syncer`] thread. Each round the thread drains
//! every completion queued so far, calls `flush_wal(true)` once — one fsync of the shared
//! WAL covers every earlier write of every shard — and only then completes what it drained.
//! A completion therefore never fires before its data is on disk.
//!
//! A failed fsync is fatal: every drained completion receives the error (openraft stops the
//! group) and the syncer stops, failing everything queued after it. Continuing after a
//! failed fsync would acknowledge data the kernel may have dropped.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use rocksdb::DB;

use crate::stages::{Stage, Stages};

/// Completions waiting for the next fsync, at most. Senders block (backpressure) beyond it.
pub const SYNC_QUEUE_MAX: usize = 65_536;
/// Completions completed per fsync round, at most.
pub const SYNC_ROUND_MAX: usize = 16_384;

/// A completion: called with the fsync result that covers the write it follows.
pub type Completion = Box<dyn FnOnce(Result<(), std::io::Error>) + Send + 'static>;

/// Counters the metrics endpoint and benchmarks read.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub rounds: std::sync::atomic::AtomicU64,
    pub completions: std::sync::atomic::AtomicU64,
    pub fsync_us_total: std::sync::atomic::AtomicU64,
}

/// Handle to the syncer thread; cloning shares the thread.
#[derive(Clone)]
pub struct Syncer {
    shared: Arc<Shared>,
    pub stats: Arc<SyncStats>,
}

/// Owned once by all handles: dropping the last handle closes the queue and joins the
/// thread, so the thread's reference to the database is gone when the handles are — the
/// database then closes deterministically instead of racing process exit.
struct Shared {
    tx: Option<SyncSender<Completion>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Syncer {
    /// Starts the syncer thread for `db`. It exits when every handle is dropped.
    pub fn start(db: Arc<DB>, stages: Arc<Stages>) -> Syncer {
        let (tx, rx) = sync_channel::<Completion>(SYNC_QUEUE_MAX);
        let stats = Arc::new(SyncStats::default());
        let thread_stats = stats.clone();
        let thread = thread::Builder::new()
            .name("convoy-syncer".into())
            .spawn(move || run(db, rx, thread_stats, stages))
            .expect("spawning the syncer thread at start-up");
        Syncer { shared: Arc::new(Shared { tx: Some(tx), thread: Some(thread) }), stats }
    }

    /// Queues `done` to run after the next fsync. Must be called after the write it covers
    /// has returned. Blocks when the queue is full (the disk is the bottleneck).
    pub fn after_sync(&self, done: Completion) {
        if crate::planted::active(crate::planted::Bug::AckBeforeFsync) {
            return done(Ok(()));
        }
        let tx = self.shared.tx.as_ref().expect("the queue is open while a handle exists");
        match tx.try_send(done) {
            Ok(()) => {}
            Err(TrySendError::Full(done)) => {
                if let Err(e) = tx.send(done) {
                    (e.0)(Err(stopped()));
                }
            }
            Err(TrySendError::Disconnected(done)) => done(Err(stopped())),
        }
    }

    /// Waits (asynchronously) until everything written so far is durable.
    pub async fn sync(&self) -> Result<(), std::io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let syncer = self.clone();
        // `after_sync` may block when the queue is full: keep that off the reactor.
        tokio::task::spawn_blocking(move || {
            syncer.after_sync(Box::new(move |r| {
                let _ = tx.send(r);
            }))
        })
        .await
        .map_err(|e| std::io::Error::other(format!("syncer task: {e}")))?;
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> std::io::Error {
    std::io::Error::other("syncer stopped after an fsync failure")
}

fn run(db: Arc<DB>, rx: Receiver<Completion>, stats: Arc<SyncStats>, stages: Arc<Stages>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut round: Vec<Completion> = Vec::with_capacity(1024);
    loop {
        match rx.recv() {
            Ok(first) => round.push(first),
            Err(_) => return,
        }
        while round.len() < SYNC_ROUND_MAX {
            match rx.try_recv() {
                Ok(next) => round.push(next),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = db.flush_wal(true);
        let took = started.elapsed();
        stages.record(Stage::Fsync, took);
        stats.fsync_us_total.fetch_add(took.as_micros() as u64, Relaxed);
        if took >= super::SLOW_IO {
            tracing::warn!(took_ms = took.as_millis() as u64, waiting = round.len(), "slow WAL fsync");
        }
        stats.rounds.fetch_add(1, Relaxed);
        stats.completions.fetch_add(round.len() as u64, Relaxed);
        match result {
            Ok(()) => round.drain(..).for_each(|done| done(Ok(()))),
            Err(e) => {
                tracing::error!(error = %e, "fsync of the WAL failed; failing all pending writes");
                let msg = e.to_string();
                round.drain(..).for_each(|done| done(Err(std::io::Error::other(msg.clone()))));
                // Fail everything still queued, then refuse new work by exiting.
                while let Ok(done) = rx.try_recv() {
                    done(Err(std::io::Error::other(msg.clone())));
                }
                return;
            }
        }
    }
}
