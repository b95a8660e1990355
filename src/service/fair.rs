//! Fair proposal scheduling on a shard's leader: deficit round robin over conversations.
//!
//! A shard's leader keeps at most `window` sends proposed to Raft and not yet answered. While
//! the window has room and nothing waits, a send is proposed at once (the usual case, with no
//! extra hop). Once the window is full, sends wait in one queue per conversation, and each
//! freed slot goes to the conversations in turn: every conversation with waiting sends gets
//! `quantum` sends per round, so a loud conversation gets its share of the log, not all of
//! it, and a quiet conversation's send waits behind at most one quantum of each loud one.
//! A conversation's queue holds at most `queue_max` sends; beyond that its sends are refused
//! (`Throttled`), so a flood is pushed back to its senders instead of queued without bound.
//!
//! [`Lanes`] is the bookkeeping only (no I/O, no locks), so its order can be tested exactly.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// A proposal waiting for its turn.
pub struct Waiting<T> {
    pub item: T,
    /// Sends it carries (its share of the window).
    pub cost: u32,
    /// When it was queued.
    pub since: Instant,
}

/// One conversation's waiting proposals.
struct Lane<T> {
    waiting: VecDeque<Waiting<T>>,
    /// Sends waiting in this lane.
    queued: u32,
    /// Sends this lane may still propose in its current turn.
    deficit: u32,
    /// Whether its current turn has been granted its quantum.
    in_turn: bool,
}

/// The window and queues of one shard's leader.
pub struct Lanes<T> {
    window: u32,
    queue_max: u32,
    quantum: u32,
    /// Sends proposed and not yet answered.
    proposed: u32,
    lanes: HashMap<Arc<str>, Lane<T>>,
    /// Conversations with waiting sends, in turn order.
    ring: VecDeque<Arc<str>>,
}

/// What [`Lanes::admit`] decided.
pub enum Admit<T> {
    /// Propose it now; it holds its share of the window.
    Now(T),
    /// It waits for its turn.
    Queued,
    /// Its conversation's queue is full: refuse it.
    Full(T),
}

impl<T> Lanes<T> {
    /// `window` and `queue_max` in sends (both at least one), `quantum` sends per turn.
    pub fn new(window: u32, queue_max: u32, quantum: u32) -> Lanes<T> {
        Lanes {
            window: window.max(1),
            queue_max: queue_max.max(1),
            quantum: quantum.max(1),
            proposed: 0,
            lanes: HashMap::new(),
            ring: VecDeque::new(),
        }
    }

    /// Whether `cost` more sends fit the window (a proposal larger than the whole window
    /// goes alone, so nothing waits for ever).
    fn fits(&self, cost: u32) -> bool {
        self.proposed == 0 || self.proposed.saturating_add(cost) <= self.window
    }

    /// Whether a proposal of `cost` sends would wait for its turn now (others wait, or the
    /// window has no room for it).
    pub fn would_queue(&self, cost: u32) -> bool {
        !(self.ring.is_empty() && self.fits(cost))
    }

    /// A new proposal of `cost` sends into `conversation`.
    pub fn admit(&mut self, conversation: &str, cost: u32, item: T, now: Instant) -> Admit<T> {
        if self.ring.is_empty() && self.fits(cost) {
            self.proposed = self.proposed.saturating_add(cost);
            return Admit::Now(item);
        }
        let waiting = Waiting { item, cost, since: now };
        if let Some(lane) = self.lanes.get_mut(conversation) {
            if lane.queued.saturating_add(cost) > self.queue_max {
                return Admit::Full(waiting.item);
            }
            lane.queued += cost;
            lane.waiting.push_back(waiting);
            return Admit::Queued;
        }
        if cost > self.queue_max {
            return Admit::Full(waiting.item);
        }
        let key: Arc<str> = Arc::from(conversation);
        self.ring.push_back(key.clone());
        let lane = Lane { waiting: VecDeque::from([waiting]), queued: cost, deficit: 0, in_turn: false };
        self.lanes.insert(key, lane);
        Admit::Queued
    }

    /// `cost` sends were answered (or dropped): their share of the window is free. Returns
    /// whether anything waits.
    pub fn finished(&mut self, cost: u32) -> bool {
        self.proposed = self.proposed.saturating_sub(cost);
        !self.ring.is_empty()
    }

    /// The next waiting proposal whose turn it is and that fits the window, now counted as
    /// proposed; `None` when nothing waits or the window is full.
    pub fn next(&mut self) -> Option<Waiting<T>> {
        loop {
            let key = self.ring.front()?.clone();
            let lane = self.lanes.get_mut(&key)?;
            let cost = lane.waiting.front().map_or(0, |w| w.cost);
            if !(self.proposed == 0 || self.proposed.saturating_add(cost) <= self.window) {
                return None;
            }
            if !lane.in_turn {
                lane.in_turn = true;
                lane.deficit = lane.deficit.saturating_add(self.quantum);
            }
            if lane.deficit >= cost {
                lane.deficit -= cost;
                lane.queued -= cost;
                let waiting = lane.waiting.pop_front();
                if lane.waiting.is_empty() {
                    self.lanes.remove(&key);
                    self.ring.pop_front();
                }
                self.proposed = self.proposed.saturating_add(cost);
                return waiting;
            }
            // Its turn is spent: the next conversation's turn.
            lane.in_turn = false;
            self.ring.rotate_left(1);
        }
    }

    /// Takes out every waiting proposal queued before `cutoff`, whatever the window: a
    /// window that never frees (a leader cut off from its quorum keeps its proposals
    /// unanswered) must not keep what waits behind it, and what that holds (the node's
    /// in-flight permits), for as long as it stays full. They held no share of the window.
    pub fn expired(&mut self, cutoff: Instant) -> Vec<Waiting<T>> {
        let mut out = Vec::new();
        for lane in self.lanes.values_mut() {
            // Each lane is in the order its proposals were queued.
            while lane.waiting.front().is_some_and(|w| w.since < cutoff) {
                let w = lane.waiting.pop_front().expect("a front proposal");
                lane.queued -= w.cost;
                out.push(w);
            }
        }
        if !out.is_empty() {
            self.lanes.retain(|_, lane| !lane.waiting.is_empty());
            let lanes = &self.lanes;
            self.ring.retain(|key| lanes.contains_key(key));
        }
        out
    }

    /// Sends waiting, over all conversations.
    pub fn queued(&self) -> u64 {
        self.lanes.values().map(|l| u64::from(l.queued)).sum()
    }

    /// Sends proposed and not yet answered.
    #[cfg(test)]
    pub fn proposed(&self) -> u32 {
        self.proposed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(window: u32, queue_max: u32, quantum: u32) -> Lanes<String> {
        Lanes::new(window, queue_max, quantum)
    }

    fn admit(l: &mut Lanes<String>, conversation: &str, cost: u32, name: &str) -> &'static str {
        match l.admit(conversation, cost, name.to_string(), Instant::now()) {
            Admit::Now(_) => "now",
            Admit::Queued => "queued",
            Admit::Full(_) => "full",
        }
    }

    /// Drains what the window allows, in order, freeing each proposal as soon as it is taken
    /// (as if answered at once).
    fn drain(l: &mut Lanes<String>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(w) = l.next() {
            l.finished(w.cost);
            out.push(w.item);
        }
        out
    }

    #[test]
    fn proposals_go_at_once_while_the_window_has_room_and_nothing_waits() {
        let mut l = lanes(4, 100, 2);
        assert!(!l.would_queue(2));
        assert_eq!(admit(&mut l, "a", 2, "a1"), "now");
        assert!(!l.would_queue(2) && l.would_queue(3));
        assert_eq!(admit(&mut l, "b", 2, "b1"), "now");
        assert_eq!(l.proposed(), 4);
        assert_eq!(admit(&mut l, "c", 1, "c1"), "queued");
        // Room again, but something waits: a newcomer queues behind it, it does not jump.
        assert!(l.finished(2));
        assert!(l.would_queue(1));
        assert_eq!(admit(&mut l, "d", 1, "d1"), "queued");
        assert_eq!(drain(&mut l), ["c1", "d1"]);
        assert_eq!((l.queued(), l.proposed()), (0, 2));
    }

    #[test]
    fn a_quiet_conversation_waits_behind_one_quantum_of_a_loud_one_not_its_backlog() {
        let mut l = lanes(1, 1000, 4);
        assert_eq!(admit(&mut l, "loud", 1, "x"), "now");
        for i in 0..100 {
            assert_eq!(admit(&mut l, "loud", 1, &format!("loud{i}")), "queued");
        }
        assert_eq!(admit(&mut l, "quiet", 1, "quiet0"), "queued");
        assert_eq!(l.queued(), 101);
        // The window is full: nothing goes until the first proposal is answered.
        assert!(l.next().is_none());
        l.finished(1);
        let order = drain(&mut l);
        let quiet_at = order.iter().position(|s| s == "quiet0").unwrap();
        assert_eq!(quiet_at, 4, "the quiet send goes after one quantum of the loud conversation: {order:?}");
        assert_eq!(order.len(), 101);
        // The loud conversation keeps its own order.
        let loud: Vec<&String> = order.iter().filter(|s| s.starts_with("loud")).collect();
        assert!(loud.windows(2).all(|w| w[0][4..].parse::<u32>().unwrap() < w[1][4..].parse::<u32>().unwrap()));
    }

    #[test]
    fn turns_share_sends_not_proposals() {
        // "big" proposes batches of 4 sends, "small" single sends; with a quantum of 4 each
        // gets 4 sends per round.
        let mut l = lanes(1, 1000, 4);
        assert_eq!(admit(&mut l, "z", 1, "z"), "now");
        for i in 0..3 {
            admit(&mut l, "big", 4, &format!("big{i}"));
        }
        for i in 0..12 {
            admit(&mut l, "small", 1, &format!("small{i}"));
        }
        l.finished(1);
        let order = drain(&mut l);
        let names: Vec<&str> = order.iter().map(|s| s.trim_end_matches(char::is_numeric)).collect();
        assert_eq!(
            names,
            [
                "big", "small", "small", "small", "small", "big", "small", "small", "small", "small", "big", "small",
                "small", "small", "small"
            ]
        );
    }

    #[test]
    fn a_full_queue_refuses_and_the_others_still_queue() {
        let mut l = lanes(1, 3, 1);
        assert_eq!(admit(&mut l, "a", 1, "a0"), "now");
        for i in 1..=3 {
            assert_eq!(admit(&mut l, "a", 1, &format!("a{i}")), "queued");
        }
        assert_eq!(admit(&mut l, "a", 1, "a4"), "full");
        assert_eq!(admit(&mut l, "b", 1, "b1"), "queued");
        assert_eq!(l.queued(), 4);
    }

    // A window that never frees (its proposals never answered) still lets what waited too
    // long go, from every conversation; what is newer keeps its place and its turn order.
    #[test]
    fn proposals_waiting_too_long_are_taken_out_while_the_window_stays_full() {
        let mut l = lanes(1, 100, 1);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        assert!(matches!(l.admit("a", 1, "a0".to_string(), at(0)), Admit::Now(_)));
        for (conversation, name, ms) in [("a", "a1", 0), ("b", "b1", 5), ("a", "a2", 10), ("c", "c1", 20)] {
            assert!(matches!(l.admit(conversation, 1, name.to_string(), at(ms)), Admit::Queued));
        }
        assert!(l.next().is_none(), "the window is full");
        let gone: Vec<String> = l.expired(at(10)).into_iter().map(|w| w.item).collect();
        let mut sorted = gone.clone();
        sorted.sort();
        assert_eq!(sorted, ["a1", "b1"], "queued before the cutoff, in any conversation");
        assert_eq!((l.queued(), l.proposed()), (2, 1), "they held no share of the window");
        assert!(l.expired(at(10)).is_empty());
        l.finished(1);
        assert_eq!(drain(&mut l), ["a2", "c1"]);
        assert_eq!(l.queued(), 0);
    }

    #[test]
    fn a_proposal_larger_than_the_window_goes_alone() {
        let mut l = lanes(2, 10, 1);
        assert_eq!(admit(&mut l, "a", 5, "big"), "now");
        assert_eq!(admit(&mut l, "b", 1, "b"), "queued");
        assert!(l.next().is_none());
        l.finished(5);
        assert_eq!(admit(&mut l, "c", 5, "big2"), "queued");
        let first = l.next().unwrap();
        assert_eq!(first.item, "b");
        // The big one waits until the window is empty, then goes alone.
        assert!(l.next().is_none());
        l.finished(first.cost);
        assert_eq!(l.next().unwrap().item, "big2");
    }
}
