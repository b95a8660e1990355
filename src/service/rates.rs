//! Send rates: token buckets per user and per conversation (node-wide, on the shard
//! leaders this node runs) and per connection. A send takes one token from each bucket
//! that applies; when any has too few, nothing is taken and the answer is
//! `Throttled{retry_after_ms}`, the time until that bucket holds enough. A rate of 0 turns
//! a limit off.
//!
//! The keyed maps are bounded: past [`KEYS_MAX`] keys, the buckets that have refilled (their
//! owners went quiet) are dropped, which loses nothing, since a new bucket starts full.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::metrics::Throttle;

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

/// Buckets by key (a user, a conversation), all at one rate.
pub struct Keyed {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Keyed {
    pub fn new(rate: Rate) -> Keyed {
        Keyed { rate, buckets: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bucket>> {
        // Every holder leaves the map consistent before it could panic.
        self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    pub users: Keyed,
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
        let total: usize = per_conversation.iter().map(|(_, n)| n).sum();
        let total = total as f64;
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
        if let Some(w) = worst {
            return Err(w);
        }
        connection.take(total, self.connection);
        if let Some(b) = users.get_mut(user) {
            b.take(total, self.users.rate);
        }
        for (c, n) in per_conversation {
            if let Some(b) = conversations.get_mut(*c) {
                b.take(*n as f64, self.conversations.rate);
            }
        }
        for (map, rate) in [(&mut *users, self.users.rate), (&mut *conversations, self.conversations.rate)] {
            if map.len() > KEYS_MAX {
                map.retain(|_, b| !b.is_full(rate, now));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rates(user: u32, conversation: u32, connection: u32) -> SendRates {
        SendRates {
            users: Keyed::new(Rate::new(user, user * 2)),
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
}
