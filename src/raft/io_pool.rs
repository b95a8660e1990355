//! Raft's own storage threads: votes, log state, truncations and purges run here, on a
//! small fixed set of threads no other work uses, so they never queue behind catch-up scans,
//! snapshot installs or long log reads (which use tokio's blocking pool, see
//! [`super::log_store::blocking`]). A lost vote write delays an election; a vote write stuck
//! behind a scan flood would delay every election of the node.
//!
//! The jobs are short (a RocksDB write batch or a point read; the fsync is the syncer's), and
//! each is awaited by the Raft task that asked for it, so the queue holds at most a few jobs
//! per hosted group.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// Threads of the pool (per process).
pub const RAFT_IO_THREADS: usize = 2;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The pool's queue; its threads start with the first job.
fn queue() -> &'static Mutex<Sender<Job>> {
    static QUEUE: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..RAFT_IO_THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("convoy-raft-io-{i}")).spawn(move || work(&rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a Raft storage thread");
            }
        }
        Mutex::new(tx)
    })
}

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // A panicking job loses only its own answer (its caller sees the error), not a thread.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
    }
}

/// Runs `f` on a Raft storage thread and waits for its result.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    queue()
        .lock()
        .map_err(|_| io::Error::other("the Raft storage queue is poisoned"))?
        .send(job)
        .map_err(|_| io::Error::other("the Raft storage threads have stopped"))?;
    rx.await.map_err(|_| io::Error::other("a Raft storage job failed without an answer (it panicked)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// With tokio's blocking pool fully taken (one thread, parked until this test says so), a
    /// Raft storage job still runs: it would wait for ever if it shared that pool.
    #[test]
    fn storage_jobs_run_while_the_blocking_pool_is_taken() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (release, parked) = std::sync::mpsc::channel::<()>();
            let hog = tokio::task::spawn_blocking(move || parked.recv_timeout(Duration::from_secs(30)).is_ok());
            let vote = tokio::time::timeout(Duration::from_secs(10), run(|| 42)).await;
            release.send(()).expect("the hog waits");
            assert_eq!(vote.expect("the job ran beside a full blocking pool").expect("job result"), 42);
            assert!(hog.await.expect("hog"), "the hog was released by the test, not by its timeout");
        });
    }

    #[test]
    fn a_panicking_job_answers_with_an_error_and_the_pool_keeps_working() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let failed = run(|| -> u32 { panic!("planted panic in a storage job") }).await;
            assert!(failed.is_err());
            for i in 0..(RAFT_IO_THREADS as u32 * 2) {
                assert_eq!(run(move || i + 1).await.expect("pool still works"), i + 1);
            }
        });
    }
}
