//! Lanes: request streams kept open and reused, one exchange at a time.
//!
//! A stream per request costs both ends an open, an accept, a task and a close, on the
//! latency path of every request. Replication (per peer and shard) and client sends (per
//! node) instead reuse streams from a [`LanePool`]. A lane sits in the pool only while idle
//! (every request on it answered): it is taken out for an exchange and given back only
//! after that exchange's answer was read, so a failed, timed-out or cancelled exchange drops
//! it, and an answer can never be read for another request.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use futures::FutureExt;

/// An open bidirectional stream of one connection.
pub struct Lane {
    connection: usize,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl Lane {
    /// Opens a new stream on `conn`.
    pub async fn open(conn: &quinn::Connection) -> Result<Lane, quinn::ConnectionError> {
        let (send, recv) = conn.open_bi().await?;
        Ok(Lane { connection: conn.stable_id(), send, recv })
    }

    /// A new stream on `conn` if its peer's stream limit has room now; `None` instead of
    /// waiting for the peer to grant one.
    pub fn open_now(conn: &quinn::Connection) -> Option<Result<Lane, quinn::ConnectionError>> {
        let opened = conn.open_bi().now_or_never()?;
        Some(opened.map(|(send, recv)| Lane { connection: conn.stable_id(), send, recv }))
    }
}

/// Idle lanes by key, at most `max_idle` per key.
pub struct LanePool<K> {
    idle: Mutex<HashMap<K, Vec<Lane>>>,
    max_idle: usize,
}

impl<K: Eq + Hash> LanePool<K> {
    pub fn new(max_idle: usize) -> Self {
        LanePool { idle: Mutex::default(), max_idle }
    }

    /// An idle lane of `key` on `conn`, if any; lanes of an older connection are dropped.
    pub fn take(&self, key: K, conn: &quinn::Connection) -> Option<Lane> {
        let mut idle = self.idle.lock().expect("lane pool lock");
        let pool = idle.entry(key).or_default();
        pool.retain(|l| l.connection == conn.stable_id());
        pool.pop()
    }

    /// An idle lane of `key` on `conn`, or a new one.
    pub async fn take_or_open(&self, key: K, conn: &quinn::Connection) -> Result<Lane, quinn::ConnectionError> {
        match self.take(key, conn) {
            Some(lane) => Ok(lane),
            None => Lane::open(conn).await,
        }
    }

    /// Returns a lane whose every request was answered; dropped if `key` has enough idle.
    pub fn give_back(&self, key: K, lane: Lane) {
        let mut idle = self.idle.lock().expect("lane pool lock");
        let pool = idle.entry(key).or_default();
        if pool.len() < self.max_idle {
            pool.push(lane);
        }
    }
}

/// Writes what `stream` accepts of `bytes` without waiting; returns the rest. A failed
/// write leaves the rest too, and the handler's write of it reports the failure.
pub fn write_now(stream: &mut quinn::SendStream, mut bytes: Vec<u8>) -> Vec<u8> {
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]).now_or_never() {
            Some(Ok(n)) if n > 0 => written += n,
            _ => break,
        }
    }
    bytes.drain(..written);
    bytes
}
