//! What a node lends to readers catching up from storage, within bounds: the batches it has
//! read and not yet handed to their connections, and wide send windows.
//!
//! A subscriber catching up holds up to two batches (the one being written and the next,
//! read meanwhile), and its connection's send window fills as fast as it is read: one that
//! reads slowly (a phone on a bad link, a client that stalled) keeps both full until its write
//! times out. Per subscriber that is little, but nothing bounded the sum: 20,000 connections
//! of 64 streams each, all catching up after a restart, could hold far more than the
//! machine's memory.
//!
//! - **Batches.** A batch read first reserves [`BATCH_RESERVE_BYTES`] of the node's
//!   `limits.catch_up_buffer_bytes`, waiting for room (the reader's lag shows it), and keeps
//!   what the batch takes until it is written to the connection.
//! - **Windows.** A client connection's send window is [`NARROW_BYTES`], enough for requests
//!   and live push, and a connection with a subscription reading storage widens it to
//!   [`WIDE_BYTES`] while it holds one of the node's `limits.catch_up_windows_max` leases. A
//!   catch-up that finds none free goes on through the narrow window (slower over a long
//!   round trip, never refused), and takes a lease as one frees up. A connection holds one
//!   lease however many of its subscriptions catch up at once (they share its window), and
//!   gives it back when the last of them goes live or ends. quinn applies a narrower window
//!   by holding further writes until what it holds is acknowledged.
//!
//! What a node holds for readers is then at most `catch_up_buffer_bytes` +
//! `catch_up_windows_max` × [`WIDE_BYTES`] + `connections_max` × [`NARROW_BYTES`], besides
//! each connection's own state.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A client connection's send window while none of its subscriptions reads storage.
pub const NARROW_BYTES: u64 = crate::net::quic::CLIENT_SEND_WINDOW_BYTES;
/// Its window while one does and it holds a lease.
pub const WIDE_BYTES: u64 = crate::net::quic::CLIENT_CATCH_UP_SEND_WINDOW_BYTES;
/// What a batch read reserves before it reads: the allocation of the largest batch (up to
/// `CATCH_UP_BATCH_BYTES` and one more message, framed, in a buffer that grew by doubling).
pub const BATCH_RESERVE_BYTES: usize =
    (super::CATCH_UP_BATCH_BYTES + crate::chat::MESSAGE_BYTES_MAX + 4096).next_power_of_two();
const _: () = assert!(
    BATCH_RESERVE_BYTES as u64 == crate::chat::limits::CATCH_UP_BUFFER_BYTES_MIN,
    "the smallest budget config accepts is one batch's reserve"
);
/// The budget is counted in KiB.
const UNIT: usize = 1024;

/// The node's catch-up budget: batch bytes and wide-window leases.
pub struct CatchUpBudget {
    bytes: Arc<Semaphore>,
    units: usize,
    leases: Arc<Semaphore>,
    /// Leases held now.
    held: AtomicU64,
    /// Catch-ups that found no lease free and started through the narrow window.
    narrow: AtomicU64,
    /// Batch reads that waited for room in the budget.
    waits: AtomicU64,
}

impl CatchUpBudget {
    /// `buffer_bytes` for batches (at least [`BATCH_RESERVE_BYTES`], or no batch could be
    /// read; `config` checks it) and `windows` wide-window leases.
    pub fn new(buffer_bytes: u64, windows: usize) -> CatchUpBudget {
        let units = usize::try_from(buffer_bytes / UNIT as u64).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        CatchUpBudget {
            bytes: Arc::new(Semaphore::new(units)),
            units,
            leases: Arc::new(Semaphore::new(windows.min(Semaphore::MAX_PERMITS))),
            held: AtomicU64::new(0),
            narrow: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// Room for one batch, once there is (`None` only if the budget were closed, which it
    /// never is).
    pub async fn reserve(&self) -> Option<BatchHold> {
        let units = u32::try_from(BATCH_RESERVE_BYTES / UNIT).expect("a batch reserve is far below 4 TiB");
        if let Ok(p) = self.bytes.clone().try_acquire_many_owned(units) {
            return Some(BatchHold(p));
        }
        self.waits.fetch_add(1, Relaxed);
        self.bytes.clone().acquire_many_owned(units).await.ok().map(BatchHold)
    }

    /// Bytes lent to batches now.
    pub fn lent_bytes(&self) -> u64 {
        (self.units.saturating_sub(self.bytes.available_permits()) * UNIT) as u64
    }

    /// Batch reads that waited for room, since start.
    pub fn waits_total(&self) -> u64 {
        self.waits.load(Relaxed)
    }

    /// Wide windows held now.
    pub fn held(&self) -> u64 {
        self.held.load(Relaxed)
    }

    /// Catch-ups that started narrow, every lease being held, since start.
    pub fn narrow_total(&self) -> u64 {
        self.narrow.load(Relaxed)
    }
}

/// A batch's share of the budget, given back when it is dropped (once written).
#[derive(Debug)]
pub struct BatchHold(OwnedSemaphorePermit);

impl BatchHold {
    /// Keeps only what a batch of `bytes` takes (at least one unit), giving the rest back.
    pub fn keep(&mut self, bytes: usize) {
        let keep = bytes.div_ceil(UNIT).max(1);
        if let Some(rest) = self.0.num_permits().checked_sub(keep).and_then(|n| self.0.split(n)) {
            drop(rest);
        }
    }
}

/// One client connection's send window.
pub struct ConnWindow {
    set: Box<dyn Fn(u64) + Send + Sync>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Subscriptions of this connection reading storage now.
    catching_up: usize,
    lease: Option<OwnedSemaphorePermit>,
}

impl ConnWindow {
    /// The window of `conn`, made narrow now.
    pub fn of(conn: quinn::Connection) -> ConnWindow {
        ConnWindow::new(move |bytes| conn.set_send_window(bytes))
    }

    /// A window set through `set` (narrowed at once).
    pub fn new(set: impl Fn(u64) + Send + Sync + 'static) -> ConnWindow {
        set(NARROW_BYTES);
        ConnWindow { set: Box::new(set), state: Mutex::default() }
    }

    /// A subscription of this connection starts reading storage; the window is wide, if a
    /// lease is free or this connection holds one, until every such subscription is done.
    pub fn catching_up<'a>(&'a self, windows: &'a CatchUpBudget) -> CatchingUp<'a> {
        let mut state = self.lock();
        state.catching_up += 1;
        self.try_widen(&mut state, windows);
        CatchingUp { window: self, windows }
    }

    fn try_widen(&self, state: &mut State, windows: &CatchUpBudget) {
        if state.lease.is_some() {
            return;
        }
        match windows.leases.clone().try_acquire_owned() {
            Ok(lease) => {
                state.lease = Some(lease);
                windows.held.fetch_add(1, Relaxed);
                (self.set)(WIDE_BYTES);
            }
            Err(_) => {
                windows.narrow.fetch_add(1, Relaxed);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A subscription reading storage on its connection; dropping it ends that.
pub struct CatchingUp<'a> {
    window: &'a ConnWindow,
    windows: &'a CatchUpBudget,
}

impl CatchingUp<'_> {
    /// Between two batches: takes a lease if the connection still has none and one freed up.
    pub fn retry(&self) {
        let mut state = self.window.lock();
        if state.lease.is_none() && self.windows.leases.available_permits() > 0 {
            self.window.try_widen(&mut state, self.windows);
        }
    }
}

impl Drop for CatchingUp<'_> {
    fn drop(&mut self) {
        let mut state = self.window.lock();
        state.catching_up -= 1;
        if state.catching_up == 0 {
            if let Some(lease) = state.lease.take() {
                (self.window.set)(NARROW_BYTES);
                self.windows.held.fetch_sub(1, Relaxed);
                drop(lease);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> (ConnWindow, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(0));
        let seen = now.clone();
        (ConnWindow::new(move |b| seen.store(b, Relaxed)), now)
    }

    #[test]
    fn a_connection_is_wide_only_while_it_catches_up_and_holds_a_lease() {
        let windows = CatchUpBudget::new(1 << 20, 2);
        let (a, a_now) = window();
        let (b, b_now) = window();
        let (c, c_now) = window();
        assert_eq!(a_now.load(Relaxed), NARROW_BYTES, "narrow from the start");

        // Two subscriptions of one connection share its lease.
        let a1 = a.catching_up(&windows);
        let a2 = a.catching_up(&windows);
        assert_eq!((a_now.load(Relaxed), windows.held()), (WIDE_BYTES, 1));
        let b1 = b.catching_up(&windows);
        assert_eq!((b_now.load(Relaxed), windows.held()), (WIDE_BYTES, 2));

        // The budget holds two: the third connection catches up narrow, and is counted.
        let c1 = c.catching_up(&windows);
        assert_eq!((c_now.load(Relaxed), windows.held(), windows.narrow_total()), (NARROW_BYTES, 2, 1));
        c1.retry();
        assert_eq!(c_now.load(Relaxed), NARROW_BYTES, "no lease has freed up");

        // One of a's subscriptions is done: a keeps its lease for the other.
        drop(a1);
        assert_eq!((a_now.load(Relaxed), windows.held()), (WIDE_BYTES, 2));
        drop(a2);
        assert_eq!((a_now.load(Relaxed), windows.held()), (NARROW_BYTES, 1));

        // c takes the lease a gave back at its next batch.
        c1.retry();
        assert_eq!((c_now.load(Relaxed), windows.held(), windows.narrow_total()), (WIDE_BYTES, 2, 1));
        drop(b1);
        drop(c1);
        assert_eq!((b_now.load(Relaxed), c_now.load(Relaxed), windows.held()), (NARROW_BYTES, NARROW_BYTES, 0));
        assert_eq!(windows.leases.available_permits(), 2, "every lease is back");
    }

    #[test]
    fn no_leases_keep_every_connection_narrow() {
        let windows = CatchUpBudget::new(1 << 20, 0);
        let (a, a_now) = window();
        let a1 = a.catching_up(&windows);
        assert_eq!((a_now.load(Relaxed), windows.held(), windows.narrow_total()), (NARROW_BYTES, 0, 1));
        drop(a1);
        assert_eq!(a_now.load(Relaxed), NARROW_BYTES);
    }

    #[tokio::test]
    async fn batches_wait_for_room_and_give_back_what_they_do_not_take() {
        let budget = CatchUpBudget::new(2 * BATCH_RESERVE_BYTES as u64, 0);
        let mut first = budget.reserve().await.expect("room");
        let second = budget.reserve().await.expect("room");
        assert_eq!((budget.lent_bytes(), budget.waits_total()), (2 * BATCH_RESERVE_BYTES as u64, 0));
        // The budget is lent out: a third waits.
        let mut third = Box::pin(budget.reserve());
        assert!(futures::poll!(third.as_mut()).is_pending(), "no room for a third batch");
        assert_eq!(budget.waits_total(), 1);
        // The first batch took 10,000 bytes: it keeps 10 KiB, and what it gives back goes to
        // the waiting read (tokio hands a waiter permits as they free up), still 10 KiB short.
        first.keep(10_000);
        assert_eq!(budget.lent_bytes(), 2 * BATCH_RESERVE_BYTES as u64);
        assert!(futures::poll!(third.as_mut()).is_pending(), "10 KiB short of a reserve");
        // Once the second is written, the third reads.
        drop(second);
        let third = third.await.expect("room");
        assert_eq!(budget.lent_bytes(), (BATCH_RESERVE_BYTES + 10 * 1024) as u64);
        drop((first, third));
        assert_eq!(budget.lent_bytes(), 0, "everything given back");
    }
}
