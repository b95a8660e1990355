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
//! - **Batches.** A batch read first reserves [`BATCH_RESERVE_BYTES`] of its user's share
//!   (an eighth of the budget, at least one reserve: see [`CatchUpBudget::user_share_bytes`])
//!   and then of the node's `limits.catch_up_buffer_bytes`, waiting for room in each (the
//!   reader's lag shows it), and keeps what the batch takes until it is written to the
//!   connection. Readers that stall hold their batches until their writes give up (30 s
//!   without progress): the share keeps one credential's stalled readers from holding the
//!   whole budget, so other users' catch-ups go on. Eight users' stalled readers could still
//!   hold all of it, so a batch whose write stays unfinished for [`CONTENDED_WRITE_MAX`]
//!   while, at every check in that time, another read waits for room in the node's budget
//!   (not its own user's share, and not its own subscription's read ahead) is given up: its
//!   subscription is dropped (its stream reset with [`crate::net::wire::RESET_SLOW_READER`])
//!   and its room goes to the readers who wait. A following client resubscribes from the
//!   offset it reached, so it loses nothing; a one-off read (`Client::read`) is asked of
//!   the next replica from its start, and fails `Unavailable` once none served it (or its
//!   pinned node did not). The bound is per stream: under contention a stream must take a
//!   batch (256–320 KiB) within ten seconds, about 26–33 KB/s, however many streams share
//!   its connection's window.
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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
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
/// How long a batch's write may stay unfinished while other reads wait for room in the
/// node's budget: every check in that time found one waiting.
pub const CONTENDED_WRITE_MAX: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a blocked batch write looks for waiting reads.
const CONTENTION_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// The node's catch-up budget: batch bytes and wide-window leases.
pub struct CatchUpBudget {
    bytes: Arc<Semaphore>,
    units: usize,
    /// Units of one user's share.
    user_units: usize,
    leases: Arc<Semaphore>,
    /// Leases in all (those held are the rest of `leases`' permits).
    windows: usize,
    /// Catch-ups whose first batch went out through the narrow window, no lease being free.
    narrow: AtomicU64,
    /// Batch reads that waited for room in the budget.
    waits: AtomicU64,
    /// Batch reads waiting for room in the node's budget now.
    waiting: Arc<AtomicUsize>,
    /// Subscriptions dropped for a batch write blocked while others waited.
    slow_dropped: AtomicU64,
}

impl CatchUpBudget {
    /// `buffer_bytes` for batches (at least [`BATCH_RESERVE_BYTES`], or no batch could be
    /// read; `config` checks it) and `windows` wide-window leases.
    pub fn new(buffer_bytes: u64, windows: usize) -> CatchUpBudget {
        let units = usize::try_from(buffer_bytes / UNIT as u64).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        CatchUpBudget {
            bytes: Arc::new(Semaphore::new(units)),
            units,
            user_units: (units / USER_SHARE_DIVISOR).max(BATCH_RESERVE_BYTES / UNIT),
            leases: Arc::new(Semaphore::new(windows.min(Semaphore::MAX_PERMITS))),
            windows: windows.min(Semaphore::MAX_PERMITS),
            narrow: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            waiting: Arc::default(),
            slow_dropped: AtomicU64::new(0),
        }
    }

    /// A new user's share of the batch budget (one per user with a connection open).
    pub fn user_share(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.user_units))
    }

    /// What one user's batches may hold at once.
    pub fn user_share_bytes(&self) -> u64 {
        (self.user_units * UNIT) as u64
    }

    /// Room for one batch in `share` (its user's) and then in the node's budget, once there
    /// is (`None` only if either were closed, which they never are).
    pub async fn reserve(&self, share: &Arc<Semaphore>) -> Option<BatchHold> {
        self.reserve_as(share, &Arc::default()).await
    }

    /// [`CatchUpBudget::reserve`], with `mine` set while this read waits for the node's
    /// budget: a subscription's own read ahead is not contention against its own write (see
    /// [`CatchUpBudget::write_batch`]).
    pub async fn reserve_as(&self, share: &Arc<Semaphore>, mine: &Arc<AtomicBool>) -> Option<BatchHold> {
        let units = u32::try_from(BATCH_RESERVE_BYTES / UNIT).expect("a batch reserve is far below 4 TiB");
        let mut waited = false;
        let user = self.acquire(share, units, &mut waited).await?;
        let node = match self.bytes.clone().try_acquire_many_owned(units) {
            Ok(p) => p,
            Err(_) => {
                // Counted while it waits, however the wait ends (its task may be aborted).
                let _waiting = Waiting::on(&self.waiting, mine);
                self.acquire(&self.bytes, units, &mut waited).await?
            }
        };
        Some(BatchHold { user, node })
    }

    /// Writes a catch-up batch with `write`, unless it stays unfinished for
    /// [`CONTENDED_WRITE_MAX`] in a row while other reads wait for room in the node's budget
    /// (`mine`, the subscription's own read ahead, does not count): then `None`, and the
    /// caller drops the subscription (its batches with it). `write` ends on its own
    /// otherwise, done or failed.
    pub async fn write_batch<T>(&self, write: impl std::future::Future<Output = T>, mine: &AtomicBool) -> Option<T> {
        self.write_within(write, mine, CONTENDED_WRITE_MAX, CONTENTION_CHECK).await
    }

    /// [`CatchUpBudget::write_batch`], giving up after `max` of contention seen every `every`.
    async fn write_within<T>(
        &self,
        write: impl std::future::Future<Output = T>,
        mine: &AtomicBool,
        max: std::time::Duration,
        every: std::time::Duration,
    ) -> Option<T> {
        let mut write = std::pin::pin!(write);
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut contended = std::time::Duration::ZERO;
        loop {
            tokio::select! {
                done = &mut write => return Some(done),
                _ = check.tick() => {
                    contended = if self.contended(mine) { contended + every } else { std::time::Duration::ZERO };
                    if contended >= max {
                        self.slow_dropped.fetch_add(1, Relaxed);
                        return None;
                    }
                }
            }
        }
    }

    /// Whether a batch read other than `mine` waits for room in the node's budget now.
    pub fn contended(&self, mine: &AtomicBool) -> bool {
        self.waiting.load(Relaxed) > usize::from(mine.load(Relaxed))
    }

    /// Subscriptions dropped by [`CatchUpBudget::write_batch`], since start.
    pub fn slow_dropped_total(&self) -> u64 {
        self.slow_dropped.load(Relaxed)
    }

    /// `units` of `from`, at once or after a wait, which is counted once per reserve (as it
    /// starts: `waited`).
    async fn acquire(&self, from: &Arc<Semaphore>, units: u32, waited: &mut bool) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = from.clone().try_acquire_many_owned(units) {
            return Some(p);
        }
        if !std::mem::replace(waited, true) {
            self.waits.fetch_add(1, Relaxed);
        }
        from.clone().acquire_many_owned(units).await.ok()
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
        self.windows.saturating_sub(self.leases.available_permits()) as u64
    }

    /// Catch-ups that started narrow, every lease being held, since start.
    pub fn narrow_total(&self) -> u64 {
        self.narrow.load(Relaxed)
    }
}

/// One read counted in [`CatchUpBudget::contended`] while it lives, and its own flag set.
struct Waiting {
    count: Arc<AtomicUsize>,
    mine: Arc<AtomicBool>,
}

impl Waiting {
    fn on(count: &Arc<AtomicUsize>, mine: &Arc<AtomicBool>) -> Waiting {
        mine.store(true, Relaxed);
        count.fetch_add(1, Relaxed);
        Waiting { count: count.clone(), mine: mine.clone() }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Relaxed);
        self.mine.store(false, Relaxed);
    }
}

/// A user's share: at most this fraction of the node's batch budget.
const USER_SHARE_DIVISOR: usize = 8;

/// A batch's room in its user's share and in the node's budget, given back when it is
/// dropped (once written).
#[derive(Debug)]
pub struct BatchHold {
    user: OwnedSemaphorePermit,
    node: OwnedSemaphorePermit,
}

impl BatchHold {
    /// Keeps only what a batch of `bytes` takes (at least one unit), giving the rest back.
    pub fn keep(&mut self, bytes: usize) {
        let keep = bytes.div_ceil(UNIT).max(1);
        for permit in [&mut self.user, &mut self.node] {
            if let Some(rest) = permit.num_permits().checked_sub(keep).and_then(|n| permit.split(n)) {
                drop(rest);
            }
        }
    }
}

/// One client connection's part in the catch-up budget: its send window, and its user's
/// share of the batch budget.
pub struct ConnCatchUp {
    set: Box<dyn Fn(u64) + Send + Sync>,
    state: Mutex<State>,
    /// The user's share (see [`CatchUpBudget::reserve`]), the same for all its connections.
    pub share: Arc<Semaphore>,
}

#[derive(Default)]
struct State {
    /// Subscriptions of this connection reading storage now.
    catching_up: usize,
    lease: Option<OwnedSemaphorePermit>,
}

impl ConnCatchUp {
    /// `conn`'s, its window made narrow now, for a user with `share`.
    pub fn of(conn: quinn::Connection, share: Arc<Semaphore>) -> ConnCatchUp {
        ConnCatchUp::new(move |bytes| conn.set_send_window(bytes), share)
    }

    /// With a window set through `set` (narrowed at once).
    pub fn new(set: impl Fn(u64) + Send + Sync + 'static, share: Arc<Semaphore>) -> ConnCatchUp {
        set(NARROW_BYTES);
        ConnCatchUp { set: Box::new(set), state: Mutex::default(), share }
    }

    /// A subscription of this connection starts reading storage. The window widens once it
    /// has a batch to write ([`CatchingUp::widen`]), and stays wide until every such
    /// subscription is done: a lease goes to a reader with something to send, not to one
    /// still waiting for room in the batch budget.
    pub fn catching_up<'a>(&'a self, windows: &'a CatchUpBudget) -> CatchingUp<'a> {
        self.lock().catching_up += 1;
        CatchingUp { window: self, windows, counted: false }
    }

    /// Widens the window with a free lease; whether it is wide now.
    fn try_widen(&self, state: &mut State, windows: &CatchUpBudget) -> bool {
        if state.lease.is_some() {
            return true;
        }
        match windows.leases.clone().try_acquire_owned() {
            Ok(lease) => {
                state.lease = Some(lease);
                (self.set)(WIDE_BYTES);
                true
            }
            Err(_) => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A subscription reading storage on its connection; dropping it ends that.
pub struct CatchingUp<'a> {
    window: &'a ConnCatchUp,
    windows: &'a CatchUpBudget,
    /// Whether this catch-up was counted as one that started narrow.
    counted: bool,
}

impl CatchingUp<'_> {
    /// A batch is about to be written: the window widens if the connection holds a lease or
    /// one is free. A catch-up whose first batch goes out narrow is counted once.
    pub fn widen(&mut self) {
        let mut state = self.window.lock();
        if !self.window.try_widen(&mut state, self.windows) && !self.counted {
            self.windows.narrow.fetch_add(1, Relaxed);
        }
        self.counted = true;
    }
}

impl Drop for CatchingUp<'_> {
    fn drop(&mut self) {
        let mut state = self.window.lock();
        state.catching_up -= 1;
        let last = state.catching_up == 0;
        // The lease is given back once the window is narrow again.
        if let Some(_lease) = state.lease.take_if(|_| last) {
            (self.window.set)(NARROW_BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits (bounded) until `budget` shows a read waiting other than `mine`.
    async fn until_contended(budget: &CatchUpBudget, mine: &AtomicBool) {
        let seen = async {
            while !budget.contended(mine) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), seen).await.expect("a read to wait for the node's budget");
    }

    /// A batch write blocked while another read waits for room in the node's budget is
    /// given up after the contention lasted the limit; one blocked with nobody waiting, or
    /// with only its own subscription's read ahead or a read held by its own user's share
    /// waiting, or one that ends, is not. A waiting read is counted only while it waits,
    /// however its wait ends.
    #[tokio::test]
    async fn a_blocked_batch_write_is_given_up_only_while_others_wait_for_room() {
        let (max, every) = (Duration::from_millis(300), Duration::from_millis(50));
        let none = AtomicBool::new(false);
        // Room for two batches; a user's share is one.
        let budget = Arc::new(CatchUpBudget::new(2 * BATCH_RESERVE_BYTES as u64, 1));
        let alice = budget.user_share();
        let stalled = budget.reserve(&alice).await.expect("alice's share");
        let other = budget.reserve(&budget.user_share()).await.expect("the rest");
        assert!(!budget.contended(&none));
        // Another subscription's write (no read of its own waiting), bounded.
        let blocked = || {
            let budget = budget.clone();
            async move {
                let mine = AtomicBool::new(false);
                tokio::time::timeout(4 * max, budget.write_within(std::future::pending::<()>(), &mine, max, every))
                    .await
            }
        };

        // Nobody waits: a write that never ends is not given up.
        assert!(blocked().await.is_err(), "given up with nobody waiting");
        // Alice's next read waits for her share, not the node's budget: not contention.
        let alices_next = tokio::spawn({
            let (budget, alice) = (budget.clone(), alice.clone());
            async move { budget.reserve(&alice).await.map(drop) }
        });
        let waited = async {
            while budget.waits_total() == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), waited).await.expect("alice's next read to wait");
        assert!(!budget.contended(&none), "a read held by its own user's share counted");
        alices_next.abort();
        let _ = alices_next.await;
        assert_eq!(budget.slow_dropped_total(), 0);

        // Only the subscription's own read ahead waits for the node's budget: not given up.
        let mine = Arc::new(AtomicBool::new(false));
        let ahead = tokio::spawn({
            let (budget, mine) = (budget.clone(), mine.clone());
            async move { budget.reserve_as(&budget.user_share(), &mine).await.map(drop) }
        });
        until_contended(&budget, &none).await;
        assert!(mine.load(Relaxed), "the read ahead is flagged while it waits");
        assert!(!budget.contended(&mine), "its own read ahead counted against a subscription");
        let own = budget.write_within(std::future::pending::<()>(), &mine, max, every);
        assert!(tokio::time::timeout(4 * max, own).await.is_err(), "given up for its own read ahead");
        assert_eq!(budget.slow_dropped_total(), 0);

        // Another read waits for room: the blocked write is given up, whether or not its
        // own read ahead waits too.
        let other_waits = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(&budget.user_share()).await.map(drop) }
        });
        let both = async {
            while budget.waiting.load(Relaxed) < 2 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), both).await.expect("a second read to wait");
        assert!(budget.contended(&mine), "another read waiting beside its own did not count");
        let own_and_other = budget.write_within(std::future::pending::<()>(), &mine, max, every);
        assert_eq!(tokio::time::timeout(4 * max, own_and_other).await.expect("given up in time"), None);
        assert_eq!(budget.slow_dropped_total(), 1);
        other_waits.abort();
        let _ = other_waits.await;
        let started = std::time::Instant::now();
        assert_eq!(blocked().await.expect("given up in time"), None);
        assert!(started.elapsed() >= max, "given up after {:?}, under {max:?}", started.elapsed());
        assert_eq!(budget.slow_dropped_total(), 2);
        // A write that ends is answered, contention or not.
        assert_eq!(budget.write_within(async { 7 }, &none, max, every).await, Some(7));

        // A waiting read's task aborted stops counting, and its flag is cleared.
        ahead.abort();
        let _ = ahead.await;
        assert!(!budget.contended(&none), "an aborted wait still counted");
        assert!(!mine.load(Relaxed), "an aborted wait still flagged");
        // One that got its room too.
        let waiter = tokio::spawn({
            let (budget, mine) = (budget.clone(), mine.clone());
            async move { budget.reserve_as(&budget.user_share(), &mine).await.map(drop) }
        });
        until_contended(&budget, &none).await;
        drop(stalled);
        assert_eq!(waiter.await.expect("task"), Some(()));
        assert!(!budget.contended(&none), "a wait that ended still counted");
        assert!(!mine.load(Relaxed), "a wait that ended still flagged");
        drop(other);
    }

    fn window() -> (ConnCatchUp, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(0));
        let seen = now.clone();
        (ConnCatchUp::new(move |b| seen.store(b, Relaxed), Arc::new(Semaphore::new(0))), now)
    }

    #[test]
    fn a_connection_is_wide_only_while_it_catches_up_with_a_batch_and_a_lease() {
        let windows = CatchUpBudget::new(1 << 20, 2);
        let (a, a_now) = window();
        let (b, b_now) = window();
        let (c, c_now) = window();
        assert_eq!(a_now.load(Relaxed), NARROW_BYTES, "narrow from the start");

        // A catch-up widens its window once it has a batch to write.
        let mut a1 = a.catching_up(&windows);
        assert_eq!((a_now.load(Relaxed), windows.held()), (NARROW_BYTES, 0), "no batch yet");
        a1.widen();
        assert_eq!((a_now.load(Relaxed), windows.held()), (WIDE_BYTES, 1));
        // Two subscriptions of one connection share its lease.
        let mut a2 = a.catching_up(&windows);
        a2.widen();
        assert_eq!((a_now.load(Relaxed), windows.held()), (WIDE_BYTES, 1));
        let mut b1 = b.catching_up(&windows);
        b1.widen();
        assert_eq!((b_now.load(Relaxed), windows.held()), (WIDE_BYTES, 2));

        // Two leases: the third connection catches up narrow, counted once however many
        // batches it writes.
        let mut c1 = c.catching_up(&windows);
        c1.widen();
        c1.widen();
        assert_eq!((c_now.load(Relaxed), windows.held(), windows.narrow_total()), (NARROW_BYTES, 2, 1));

        // One of a's subscriptions is done: a keeps its lease for the other.
        drop(a1);
        assert_eq!((a_now.load(Relaxed), windows.held()), (WIDE_BYTES, 2));
        drop(a2);
        assert_eq!((a_now.load(Relaxed), windows.held()), (NARROW_BYTES, 1));

        // c takes the lease a gave back at its next batch.
        c1.widen();
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
        let mut a1 = a.catching_up(&windows);
        a1.widen();
        assert_eq!((a_now.load(Relaxed), windows.held(), windows.narrow_total()), (NARROW_BYTES, 0, 1));
        drop(a1);
        assert_eq!(a_now.load(Relaxed), NARROW_BYTES);
    }

    #[tokio::test]
    async fn batches_wait_for_room_and_give_back_what_they_do_not_take() {
        let budget = CatchUpBudget::new(2 * BATCH_RESERVE_BYTES as u64, 0);
        let (alice, bob) = (budget.user_share(), budget.user_share());
        let mut first = budget.reserve(&alice).await.expect("room");
        let second = budget.reserve(&bob).await.expect("room");
        assert_eq!((budget.lent_bytes(), budget.waits_total()), (2 * BATCH_RESERVE_BYTES as u64, 0));
        // The budget is lent out: a third waits.
        let carol = budget.user_share();
        let mut third = Box::pin(budget.reserve(&carol));
        assert!(futures::poll!(third.as_mut()).is_pending(), "no room for a third batch");
        assert_eq!(budget.waits_total(), 1, "counted as it starts to wait");
        // The first batch took 10,000 bytes: it keeps 10 KiB, and what it gives back goes to
        // the waiting read (tokio hands a waiter permits as they free up), still 10 KiB short.
        first.keep(10_000);
        assert_eq!(budget.lent_bytes(), 2 * BATCH_RESERVE_BYTES as u64);
        assert!(futures::poll!(third.as_mut()).is_pending(), "10 KiB short of a reserve");
        // Once the second is written, the third reads.
        drop(second);
        let third = third.await.expect("room");
        assert_eq!((budget.lent_bytes(), budget.waits_total()), ((BATCH_RESERVE_BYTES + 10 * 1024) as u64, 1));
        drop((first, third));
        assert_eq!(budget.lent_bytes(), 0, "everything given back");
    }

    #[tokio::test]
    async fn one_user_holds_at_most_its_share() {
        // Room for 16 batches, a user's share two.
        let budget = CatchUpBudget::new(16 * BATCH_RESERVE_BYTES as u64, 0);
        assert_eq!(budget.user_share_bytes(), 2 * BATCH_RESERVE_BYTES as u64);
        let (alice, bob) = (budget.user_share(), budget.user_share());
        let held = [budget.reserve(&alice).await.expect("room"), budget.reserve(&alice).await.expect("room")];
        let mut third = Box::pin(budget.reserve(&alice));
        assert!(futures::poll!(third.as_mut()).is_pending(), "alice's share is spent");
        let bobs = budget.reserve(&bob).await.expect("bob is not held up by alice");
        assert_eq!(
            budget.lent_bytes(),
            3 * BATCH_RESERVE_BYTES as u64,
            "alice's waiting read holds none of the node's"
        );
        drop(held);
        third.await.expect("room once alice's batches are written");
        drop(bobs);
    }
}
