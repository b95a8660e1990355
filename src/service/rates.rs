//! Send rates: token buckets per user and per conversation (node-wide, on the shard
//! leaders this node runs) and per connection. A send takes one token from each bucket
//! that applies; when any has too few, nothing is taken and the answer is
//! `Throttled{retry_after_ms}`, the time until that bucket holds enough. A rate of 0 turns
//! a limit off.
//!
//! The keyed maps are bounded: past [`KEYS_MAX`] keys, the buckets that have refilled (their
//! owners went quiet) are dropped, which loses nothing, since a new bucket starts full.
//!
//! A user's rate holds across the cluster, not per node: a user's conversations are led by
//! several nodes, and each would otherwise give them the whole rate. Every node tells each
//! peer, once a heartbeat interval, how many sends it took from each user's bucket
//! ([`Keyed::unshared`], `PeerRequest::UserSends`), and a node takes what its peers took from
//! its own bucket of that user ([`Keyed::debit`]). So every bucket of a user is drawn by all
//! of the user's sends, each node's at most an interval late: over a window the cluster admits
//! about the rate, plus each node's burst, plus what the other nodes admitted in the last
//! interval before their counts arrived.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::Throttle;
use super::stop::StopSignal;
use crate::raft::network::PeerNet;
use crate::raft::rpc::{PeerRequest, PeerResponse};
use crate::raft::types::NodeId;

/// Keys one map holds before it sheds its full buckets.
pub const KEYS_MAX: usize = 100_000;
/// The shortest `retry_after` a throttled send is told: a token may come sooner, but
/// clients told "1 ms" would come back at once, and a flood of them would spend the node
/// on refusals.
pub const RETRY_AFTER_MIN_MS: u64 = 20;

/// A rate and a burst; `per_s == 0` means no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_s: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_s: u32, burst: u32) -> Rate {
        Rate { per_s: f64::from(per_s), burst: f64::from(burst.max(per_s.min(1))) }
    }

    fn off(&self) -> bool {
        self.per_s <= 0.0
    }
}

/// One token bucket.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket { tokens: rate.burst, at: now }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_s).min(rate.burst);
        self.at = now;
    }

    /// Milliseconds until `n` tokens are there; 0 if they are now.
    fn wait_ms(&mut self, n: f64, rate: Rate, now: Instant) -> u64 {
        if rate.off() {
            return 0;
        }
        self.refill(rate, now);
        if self.tokens >= n.min(rate.burst) {
            0
        } else {
            ((((n.min(rate.burst) - self.tokens) / rate.per_s) * 1000.0).ceil() as u64).max(RETRY_AFTER_MIN_MS)
        }
    }

    fn take(&mut self, n: f64, rate: Rate) {
        if !rate.off() {
            // A batch larger than the burst may pass when the bucket is full, and leaves it
            // empty: the burst bounds the debt, not the batch.
            self.tokens = (self.tokens - n).max(-rate.burst);
        }
    }

    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, now);
        b.tokens >= rate.burst
    }
}

/// Adds `n` to `key`'s count; a key new to a map of [`KEYS_MAX`] keys is not counted.
fn add_bounded(counts: &mut HashMap<String, u32>, key: &str, n: u32) {
    if let Some(t) = counts.get_mut(key) {
        *t = t.saturating_add(n);
    } else if counts.len() < KEYS_MAX {
        counts.insert(key.to_string(), n);
    }
}

/// Takes the `max` largest counts out of `counts` (all of them when there are no more); the
/// rest stay.
fn take_largest(counts: &mut HashMap<String, u32>, max: usize) -> Vec<(String, u32)> {
    let mut all: Vec<(String, u32)> = counts.drain().collect();
    if all.len() > max {
        all.sort_unstable_by_key(|e| std::cmp::Reverse(e.1));
        counts.extend(all.drain(max..));
    }
    all
}

/// Users a node tells a peer about in one `UserSends`; the rest wait for the next interval.
pub const SHARE_USERS_MAX: usize = crate::raft::rpc::USER_SENDS_MAX;

/// Buckets by key (a user, a conversation), all at one rate.
pub struct Keyed {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Tokens taken here since the peers were last told (users' buckets only; bounded by
    /// [`KEYS_MAX`] keys, past which a new key's sends go untold).
    unshared: Option<Mutex<HashMap<String, u32>>>,
}

impl Keyed {
    pub fn new(rate: Rate) -> Keyed {
        Keyed { rate, buckets: Mutex::default(), unshared: None }
    }

    /// Buckets whose takings the node shares with its peers (see the module's doc).
    pub fn shared(rate: Rate) -> Keyed {
        Keyed { unshared: Some(Mutex::default()), ..Keyed::new(rate) }
    }

    pub fn is_off(&self) -> bool {
        self.rate.off()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bucket>> {
        // Every holder leaves the map consistent before it could panic.
        self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_unshared(&self) -> Option<std::sync::MutexGuard<'_, HashMap<String, u32>>> {
        self.unshared.as_ref().map(|m| m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Notes `n` tokens taken here from `key`'s bucket, for the peers.
    fn note_taken(&self, key: &str, n: usize) {
        let Some(mut unshared) = self.lock_unshared() else { return };
        add_bounded(&mut unshared, key, u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// What was taken here since the last call, at most `max` keys of it (the largest); the
    /// rest stays for the next call.
    pub fn take_unshared(&self, max: usize) -> Vec<(String, u32)> {
        let Some(mut unshared) = self.lock_unshared() else { return Vec::new() };
        take_largest(&mut unshared, max)
    }

    /// Takes what was taken elsewhere from each key's bucket here, into debt if it has not
    /// got it (a full bucket for a key new here): what a peer took from its own, or what a
    /// write already admitted spends. A bucket already in debt by a burst goes no lower.
    pub fn debit<K: AsRef<str>>(&self, taken: &[(K, u32)], now: Instant) {
        if self.rate.off() {
            return;
        }
        let mut buckets = self.lock();
        for (key, n) in taken {
            let b = bucket(&mut buckets, key.as_ref(), self.rate, now);
            b.refill(self.rate, now);
            b.take(f64::from(*n), self.rate);
        }
        if buckets.len() > KEYS_MAX {
            buckets.retain(|_, b| !b.is_full(self.rate, now));
        }
    }
}

/// `key`'s bucket, a full one for a key seen first (the key is copied only then).
fn bucket<'m>(map: &'m mut HashMap<String, Bucket>, key: &str, rate: Rate, now: Instant) -> &'m mut Bucket {
    if !map.contains_key(key) {
        map.insert(key.to_string(), Bucket::full(rate, now));
    }
    map.get_mut(key).expect("inserted above")
}

/// The node's send limits.
pub struct SendRates {
    /// Shared with the peer server, which takes in what the peers took (`Keyed::debit`).
    pub users: Arc<Keyed>,
    pub conversations: Keyed,
    pub connection: Rate,
}

impl SendRates {
    /// Takes `per_conversation[c]` tokens from each conversation's bucket, their sum from
    /// `user`'s and from `connection` (the caller's own bucket), or nothing: then the
    /// longest wait and the limit that needs it.
    pub fn take(
        &self,
        user: &str,
        per_conversation: &[(&str, usize)],
        connection: &Mutex<Bucket>,
        now: Instant,
    ) -> Result<(), (u64, Throttle)> {
        self.take_with_outside(user, per_conversation, 0, connection, now)
    }

    /// [`SendRates::take`], with `outside` more sends that take from the user's and the
    /// connection's buckets only: sends to conversations their user is not a member of,
    /// which must not spend the conversation's rate (see `service::outsiders`).
    pub fn take_with_outside(
        &self,
        user: &str,
        per_conversation: &[(&str, usize)],
        outside: usize,
        connection: &Mutex<Bucket>,
        now: Instant,
    ) -> Result<(), (u64, Throttle)> {
        let sends: usize = per_conversation.iter().map(|(_, n)| n).sum::<usize>() + outside;
        let total = sends as f64;
        let mut connection = connection.lock().unwrap_or_else(|p| p.into_inner());
        let mut users = self.users.lock();
        let mut conversations = self.conversations.lock();
        let mut worst: Option<(u64, Throttle)> = None;
        let mut note = |ms: u64, reason: Throttle| {
            if ms > 0 && worst.is_none_or(|(w, _)| ms > w) {
                worst = Some((ms, reason));
            }
        };
        note(connection.wait_ms(total, self.connection, now), Throttle::Connection);
        if !self.users.rate.off() {
            let b = bucket(&mut users, user, self.users.rate, now);
            note(b.wait_ms(total, self.users.rate, now), Throttle::User);
        }
        if !self.conversations.rate.off() {
            for (c, n) in per_conversation {
                let b = bucket(&mut conversations, c, self.conversations.rate, now);
                note(b.wait_ms(*n as f64, self.conversations.rate, now), Throttle::Conversation);
            }
        }
        if worst.is_none() {
            connection.take(total, self.connection);
            if let Some(b) = users.get_mut(user) {
                b.take(total, self.users.rate);
                self.users.note_taken(user, sends);
            }
            for (c, n) in per_conversation {
                if let Some(b) = conversations.get_mut(*c) {
                    b.take(*n as f64, self.conversations.rate);
                }
            }
        }
        // Throttled or not: the lookups above added a full bucket for each key new here.
        for (map, rate) in [(&mut *users, self.users.rate), (&mut *conversations, self.conversations.rate)] {
            if map.len() > KEYS_MAX {
                map.retain(|_, b| !b.is_full(rate, now));
            }
        }
        worst.map_or(Ok(()), Err)
    }
}

/// Every `every`, tells each peer what this node took from its users' buckets since it last
/// told that peer, until the node stops. A peer has one request out at a time, so a dead or
/// slow one delays no other; what it was owed meanwhile goes in its next request (at most
/// [`SHARE_USERS_MAX`] users each, the largest first), and a request it did not answer is not
/// sent again: a node that comes back starts with full buckets anyway.
pub async fn share(users: Arc<Keyed>, net: PeerNet, me: NodeId, every: Duration, mut stop: StopSignal) {
    if users.is_off() {
        return;
    }
    let ttl = (every * 5).max(Duration::from_secs(1));
    let mut owed: HashMap<NodeId, HashMap<String, u32>> = HashMap::new();
    let mut sending: HashMap<NodeId, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while stop.unless_stopped(interval.tick()).await.is_some() {
        let taken = users.take_unshared(KEYS_MAX);
        let peers: Vec<NodeId> = net.peer_ids().into_iter().filter(|&p| p != me).collect();
        owed.retain(|p, _| peers.contains(p));
        sending.retain(|_, t| !t.is_finished());
        for peer in peers {
            let o = owed.entry(peer).or_default();
            for (user, n) in &taken {
                add_bounded(o, user, *n);
            }
            if o.is_empty() || sending.contains_key(&peer) {
                continue;
            }
            let batch = take_largest(o, SHARE_USERS_MAX);
            let (net, req) = (net.clone(), PeerRequest::UserSends { node: me, users: batch });
            sending.insert(
                peer,
                tokio::spawn(async move {
                    match net.control(peer, req, ttl).await {
                        Ok(PeerResponse::UserSendsTaken) => {}
                        Ok(other) => tracing::debug!(peer, answer = ?other, "unexpected answer to users' sends"),
                        Err(e) => tracing::trace!(peer, error = %e, "users' sends not told"),
                    }
                }),
            );
        }
    }
    for (_, t) in sending {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(user: u32, conversation: u32, connection: u32) -> SendRates {
        SendRates {
            users: Arc::new(Keyed::shared(Rate::new(user, user * 2))),
            conversations: Keyed::new(Rate::new(conversation, conversation * 2)),
            connection: Rate::new(connection, connection * 2),
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_and_the_wait_is_exact() {
        let r = rates(10, 0, 0);
        let t0 = Instant::now();
        let conn = Mutex::new(Bucket::full(r.connection, t0));
        for i in 0..20 {
            assert!(r.take("ann", &[("c", 1)], &conn, t0).is_ok(), "send {i} of the burst");
        }
        // Empty: one token comes every 100 ms, and no client is told to come back sooner
        // than RETRY_AFTER_MIN_MS.
        assert_eq!(r.take("ann", &[("c", 1)], &conn, t0), Err((100, Throttle::User)));
        assert_eq!(r.take("ann", &[("c", 1)], &conn, t0 + Duration::from_millis(50)), Err((50, Throttle::User)));
        let almost = t0 + Duration::from_millis(95);
        assert_eq!(r.take("ann", &[("c", 1)], &conn, almost), Err((RETRY_AFTER_MIN_MS, Throttle::User)));
        assert!(r.take("ann", &[("c", 1)], &conn, t0 + Duration::from_millis(100)).is_ok());
        // Another user is not affected.
        assert!(r.take("bob", &[("c", 1)], &conn, t0).is_ok());
    }

    #[test]
    fn a_refused_send_takes_nothing_from_any_bucket() {
        let r = rates(100, 5, 0);
        let t0 = Instant::now();
        let conn = Mutex::new(Bucket::full(r.connection, t0));
        for _ in 0..10 {
            r.take("ann", &[("loud", 1)], &conn, t0).expect("the conversation's burst");
        }
        assert_eq!(r.take("ann", &[("loud", 1)], &conn, t0).map_err(|e| e.1), Err(Throttle::Conversation));
        // The refused send did not cost ann's own bucket: 190 more pass elsewhere.
        for i in 0..190 {
            assert!(r.take("ann", &[(&format!("quiet{i}"), 1)], &conn, t0).is_ok(), "send {i}");
        }
        assert_eq!(r.take("ann", &[("other", 1)], &conn, t0).map_err(|e| e.1), Err(Throttle::User));
    }

    #[test]
    fn sends_from_outside_a_conversation_cost_their_user_not_the_conversation() {
        // rates(user, conversation, connection) per second; the bursts are twice that.
        let r = rates(10, 5, 0);
        let t0 = Instant::now();
        let conn = Mutex::new(Bucket::full(r.connection, t0));
        // 20 sends from outside: the user's whole burst, none of the conversation's.
        for i in 0..20 {
            assert!(r.take_with_outside("mallory", &[], 1, &conn, t0).is_ok(), "send {i}");
        }
        assert_eq!(r.take_with_outside("mallory", &[], 1, &conn, t0).map_err(|e| e.1), Err(Throttle::User));
        for i in 0..10 {
            assert!(
                r.take("ann", &[("c", 1)], &conn, t0).is_ok(),
                "member's send {i}: the conversation's burst is whole"
            );
        }
        assert_eq!(r.take("bob", &[("c", 1)], &conn, t0).map_err(|e| e.1), Err(Throttle::Conversation));
        // A batch with sends of both kinds: every one counts against the user.
        let later = t0 + Duration::from_secs(10);
        assert!(r.take_with_outside("eve", &[("d", 5)], 15, &conn, later).is_ok());
        assert_eq!(r.take_with_outside("eve", &[], 1, &conn, later).map_err(|e| e.1), Err(Throttle::User));
    }

    #[test]
    fn an_outsiders_write_that_goes_on_after_all_is_charged_to_the_conversation_only() {
        let r = rates(10, 5, 0);
        let t0 = Instant::now();
        let conn = Mutex::new(Bucket::full(r.connection, t0));
        // Judged an outsider's: the user's token …
        r.take_with_outside("dan", &[], 1, &conn, t0).expect("dan's token");
        // … and then written after all: charged to the conversation, never refused, into
        // debt past its burst of 10, and not to the user again.
        r.conversations.debit(&[("c", 12)], t0);
        assert_eq!(r.take("ann", &[("c", 1)], &conn, t0), Err((600, Throttle::Conversation)), "2 in debt, then 1");
        assert!(r.take("ann", &[("c", 1)], &conn, t0 + Duration::from_millis(600)).is_ok());
        // The debt is at most a burst.
        r.conversations.debit(&[("d", 1_000)], t0);
        assert_eq!(r.take("ann", &[("d", 1)], &conn, t0), Err((2_200, Throttle::Conversation)));
        // The user's bucket lost one token to dan's write, not thirteen.
        for i in 0..19 {
            assert!(r.take_with_outside("dan", &[], 1, &conn, t0).is_ok(), "dan's send {i}");
        }
        assert_eq!(r.take_with_outside("dan", &[], 1, &conn, t0).map_err(|e| e.1), Err(Throttle::User));
        let off = rates(10, 0, 0);
        off.conversations.debit(&[("c", 1_000)], t0);
        assert!(off.take("ann", &[("c", 1)], &conn, t0).is_ok(), "0 turns the limit off");
    }

    #[test]
    fn the_connection_bucket_is_the_callers_own_and_zero_means_off() {
        let r = rates(0, 0, 3);
        let t0 = Instant::now();
        let (a, b) = (Mutex::new(Bucket::full(r.connection, t0)), Mutex::new(Bucket::full(r.connection, t0)));
        assert!(r.take("ann", &[("c", 6)], &a, t0).is_ok());
        assert_eq!(r.take("ann", &[("c", 1)], &a, t0).map_err(|e| e.1), Err(Throttle::Connection));
        assert!(r.take("ann", &[("c", 1)], &b, t0).is_ok(), "another connection has its own bucket");
        let off = rates(0, 0, 0);
        let c = Mutex::new(Bucket::full(off.connection, t0));
        for _ in 0..10_000 {
            assert!(off.take("ann", &[("c", 1)], &c, t0).is_ok());
        }
    }

    /// Three nodes' limits, a user sending on all three as fast as they are let: the sends
    /// each node took are told to the other two every `share` (never, with `None`). Returns
    /// the sends admitted in the `seconds` after the first two (once the bursts are spent).
    fn admitted_on_three_nodes(rate: u32, share: Option<Duration>, seconds: u64) -> usize {
        let nodes: Vec<SendRates> = (0..3).map(|_| rates(rate, 0, 0)).collect();
        let t0 = Instant::now();
        let conns: Vec<Mutex<Bucket>> = nodes.iter().map(|n| Mutex::new(Bucket::full(n.connection, t0))).collect();
        let mut admitted = 0;
        let mut last_share = t0;
        for ms in 0..(2 + seconds) * 1000 {
            let now = t0 + Duration::from_millis(ms);
            for (node, conn) in nodes.iter().zip(&conns) {
                if node.take("ann", &[("c", 1)], conn, now).is_ok() && ms >= 2000 {
                    admitted += 1;
                }
            }
            if share.is_some_and(|every| now >= last_share + every) {
                last_share = now;
                let told: Vec<Vec<(String, u32)>> =
                    nodes.iter().map(|n| n.users.take_unshared(SHARE_USERS_MAX)).collect();
                for (from, taken) in told.iter().enumerate() {
                    for (to, node) in nodes.iter().enumerate() {
                        if to != from {
                            node.users.debit(taken, now);
                        }
                    }
                }
            }
        }
        admitted
    }

    #[test]
    fn a_users_rate_holds_across_the_nodes_that_lead_their_conversations() {
        // 50 sends a second over 10 s: 500 across the cluster, not 500 on each node.
        let alone = admitted_on_three_nodes(50, None, 10);
        assert!((1490..=1510).contains(&alone), "each node on its own admits the whole rate: {alone}");
        let shared = admitted_on_three_nodes(50, Some(Duration::from_millis(100)), 10);
        assert!((480..=520).contains(&shared), "told every 100 ms, the three admit the rate between them: {shared}");
        // Told less often, the error is what the others admit before their counts arrive.
        let slow = admitted_on_three_nodes(50, Some(Duration::from_secs(1)), 10);
        assert!((480..=560).contains(&slow), "{slow}");
    }

    #[test]
    fn takings_are_told_once_largest_first_and_a_peers_debit_is_not_told_again() {
        let r = rates(100, 0, 0);
        let t0 = Instant::now();
        let conn = Mutex::new(Bucket::full(r.connection, t0));
        r.take("ann", &[("a", 3), ("b", 2)], &conn, t0).expect("ann");
        r.take("bob", &[("a", 1)], &conn, t0).expect("bob");
        r.take("cy", &[("a", 2)], &conn, t0).expect("cy");
        let first = r.users.take_unshared(2);
        assert_eq!(first, vec![("ann".to_string(), 5), ("cy".to_string(), 2)], "the two largest");
        assert_eq!(r.users.take_unshared(2), vec![("bob".to_string(), 1)], "the rest, next time");
        assert!(r.users.take_unshared(2).is_empty(), "nothing is told twice");
        // A peer's takings draw this node's bucket (a user new here starts full), are not
        // told on, and leave the bucket at most one burst in debt.
        r.users.debit(&[("dee".to_string(), 150), ("ann".to_string(), 1000)], t0);
        assert!(r.users.take_unshared(10).is_empty());
        assert_eq!(r.take("dee", &[("a", 60)], &conn, t0).map_err(|e| e.1), Err(Throttle::User), "50 left");
        assert!(r.take("dee", &[("a", 50)], &conn, t0).is_ok());
        // ann's debt is one burst (200): two seconds of refill before one send passes.
        let wait = r.take("ann", &[("a", 1)], &conn, t0).expect_err("in debt").0;
        assert_eq!(wait, 2010, "(200 + 1) tokens at 100 a second");
        // A node with no user limit tells nothing and takes nothing in.
        let off = rates(0, 0, 0);
        off.take("ann", &[("a", 1)], &conn, t0).expect("no limit");
        assert!(off.users.take_unshared(10).is_empty());
    }

    #[test]
    fn quiet_keys_are_shed_past_the_bound() {
        let r = rates(1, 0, 0);
        let t0 = Instant::now();
        let conn = Mutex::new(Bucket::full(r.connection, t0));
        for i in 0..=KEYS_MAX {
            r.take(&format!("u{i}"), &[("c", 1)], &conn, t0).expect("a fresh user");
        }
        assert!(r.users.lock().len() <= KEYS_MAX + 1);
        // Much later every bucket has refilled: the next insert sheds them all.
        r.take("late", &[("c", 1)], &conn, t0 + Duration::from_secs(10)).expect("send");
        assert!(r.users.lock().len() <= 2, "{}", r.users.lock().len());
    }

    #[test]
    fn keys_of_throttled_sends_are_shed_past_the_bound_too() {
        // The connection's bucket is empty, so every send is throttled; each names a new
        // conversation, whose lookup adds a (full) bucket.
        let r = rates(0, 1, 1);
        let t0 = Instant::now();
        let conn = Mutex::new(Bucket::full(r.connection, t0));
        r.take("ann", &[("c", 2)], &conn, t0).expect("the connection's burst");
        for i in 0..=2 * KEYS_MAX {
            let c = format!("c{i}");
            assert_eq!(r.take("ann", &[(&c, 1)], &conn, t0).map_err(|e| e.1), Err(Throttle::Connection));
        }
        let kept = r.conversations.lock().len();
        assert!(kept <= KEYS_MAX + 1, "{kept} conversation buckets");
    }
}
