//! Appends operations to the history with a dense index and a monotonic timestamp.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::history::{Op, Process, Type, F};

/// Shared, append-only history of a run.
#[derive(Clone)]
pub struct Recorder {
    ops: Arc<Mutex<Vec<Op>>>,
    start: Instant,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder { ops: Arc::default(), start: Instant::now() }
    }
}

impl Recorder {
    /// Records one operation; returns its index.
    pub fn record(&self, kind: Type, process: Process, f: F, value: serde_json::Value, node: Option<u64>) -> u64 {
        let mut ops = self.ops.lock().expect("history lock is never poisoned");
        let index = ops.len() as u64;
        let time = self.start.elapsed().as_nanos() as u64;
        ops.push(Op { index, time, kind, process, f, value, node });
        index
    }

    /// Nanoseconds since the start of the run.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// A copy of the history so far.
    pub fn snapshot(&self) -> Vec<Op> {
        self.ops.lock().expect("history lock is never poisoned").clone()
    }
}
