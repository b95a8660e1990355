//! Idle groups stop ticking.
//!
//! openraft ticks every replica of every group (every 13/64 of `heartbeat_ms`), and a leader
//! sends a heartbeat to each follower every `heartbeat_ms`, whether the group has work or
//! not. With many shards that is most of an idle node's CPU (measured in
//! `docs/performance.md`, *How many shards*). A group quiesces instead, as CockroachDB's
//! ranges do:
//!
//! - **The leader.** Every heartbeat interval the node's [`Quiescer`] looks at each group it
//!   leads. One whose last log index has not moved for `raft.quiesce_after_ms`, with every
//!   entry committed and applied, every replica's log matched to the last entry, a settled
//!   membership and every member node alive (below), stops its ticker
//!   (`Raft::runtime_config().tick(false)`): no timers, and a heartbeat every half
//!   `raft.election_timeout_ms_min` instead of ten a second, which keeps its leader lease
//!   (openraft refuses writes on a leader whose lease lapsed) and its followers' leases (they
//!   refuse to vote while it holds). A leader no quorum answered within the lease wakes.
//!   Before this node hands a leadership away it wakes the group and keeps it awake
//!   ([`Quiescer::hold`]): the transfer's election needs the timers. Entries still replicate at
//!   once, since openraft sends them when they are appended, not on a tick; the next look
//!   sees the index moved and the ticker comes back.
//! - **Its followers.** The node-wide beat (next) names the groups the sender leads
//!   quiesced, with their term and last index. A follower here with the same leader, term and
//!   last index stops its ticker too, so it never times out waiting for heartbeats. Any Raft
//!   message for a quiesced group here but a heartbeat wakes it ([`Quiescer::on_rpc`]); a
//!   group that the next beat still names quiesces again, one it no longer names wakes.
//! - **Liveness.** Every node sends every peer a `Beat` each heartbeat interval: one small
//!   message per pair of nodes instead of one heartbeat per group. A peer not heard from for
//!   `raft.election_timeout_ms_min` is lost: the groups it leads wake here, their leases long
//!   expired, and elect a new leader as if its heartbeats had stopped. A peer that comes back,
//!   or starts again (a new `incarnation`), wakes the groups it leads here and the groups led
//!   here that it is a member of, whose heartbeats it must hear before its own election
//!   timeout ends.
//!
//! None of this touches Raft's safety, which never depends on timers: at worst a follower
//! that wakes before its leader elects a new one, as a partition would make it. A peer that
//! sends no beats (an older binary) is never alive here, so no group with a replica on it
//! quiesces.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::Instant as _;
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::network::{Groups, Hosted, PeerNet};
use super::rpc::{PeerRequest, PeerResponse};
use super::types::{node_of, NodeId, Raft};
use crate::chat::ShardId;

/// A group its leader quiesced: what a follower must match to quiesce with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietGroup {
    pub shard: ShardId,
    /// The leader's replica id.
    pub leader: NodeId,
    pub term: u64,
    pub last_index: u64,
}

/// What a [`Quiescer::scan`] found.
pub struct Scan {
    /// The groups led here that are quiesced, for the next beat.
    pub quiet: Vec<QuietGroup>,
    /// Quiesced groups led here whose leader lease needs renewing: openraft refuses writes
    /// on a leader that no quorum acknowledged within the lease (`election_timeout_ms_max`),
    /// so each gets a heartbeat every half `election_timeout_ms_min`, which the followers
    /// answer without waking.
    pub renew: Vec<Raft>,
}

/// The node's quiescing: which groups stopped ticking here, and which peers are alive.
pub struct Quiescer {
    node: NodeId,
    incarnation: u64,
    /// How long a led group stays idle before it quiesces (`None`: never).
    after: Option<Duration>,
    /// A peer not heard from for this long is lost; a quiesced leader renews its lease every
    /// half of it.
    lost_after: Duration,
    /// openraft's leader lease (`election_timeout_ms_max`).
    lease: Duration,
    groups: Groups,
    /// Groups quiesced here, led or followed: [`Quiescer::on_rpc`] takes no lock while it
    /// is 0.
    quiet: AtomicUsize,
    /// Times a quiesced group woke here.
    wakes: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Groups this node leads, by shard.
    led: HashMap<ShardId, Led>,
    /// Follower replicas quiesced here on their leader's word, by shard.
    followed: HashMap<ShardId, Followed>,
    peers: HashMap<NodeId, Peer>,
    /// Groups kept awake until then, by shard (see [`Quiescer::hold`]).
    held: HashMap<ShardId, Instant>,
}

impl State {
    fn held(&mut self, shard: ShardId, now: Instant) -> bool {
        match self.held.get(&shard) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.held.remove(&shard);
                false
            }
            None => false,
        }
    }
}

struct Led {
    replica: NodeId,
    last_index: Option<u64>,
    /// Since when the group has been idle (reset by any change).
    idle_since: Instant,
    quiesced: bool,
    /// When its leader lease was last renewed while quiesced.
    renewed: Instant,
    /// The nodes of its members, as last seen.
    members: Vec<NodeId>,
}

struct Followed {
    replica: NodeId,
    leader_node: NodeId,
}

struct Peer {
    incarnation: u64,
    seen: Instant,
    lost: bool,
    /// This incarnation said it is stopping ([`Quiescer::on_leaving`]).
    leaving: bool,
}

/// What a look at a group's Raft metrics found.
struct Look {
    leading: bool,
    following: bool,
    leader: Option<NodeId>,
    term: u64,
    last_index: Option<u64>,
    /// Everything committed and applied, every replica matched, membership settled, and a
    /// quorum heard from within the lease.
    settled: bool,
    /// The nodes of every member (voters and learners), this one included.
    members: Vec<NodeId>,
}

fn look(h: &Hosted, lease: Duration) -> Look {
    let rx = h.raft.metrics();
    let m = rx.borrow_watched();
    let last_index = m.last_log_index;
    let at_last = |l: Option<u64>| l == last_index;
    let membership = m.membership_config.membership();
    let settled = last_index.is_some()
        && at_last(m.cluster_committed.map(|l| l.index))
        && at_last(m.last_applied.map(|l| l.index))
        && m.replication.as_ref().is_some_and(|r| r.values().all(|l| at_last(l.map(|l| l.index))))
        && membership.get_joint_config().len() == 1
        && m.membership_config.log_id() == m.committed_membership_config.log_id()
        && (m.state != ServerState::Leader || m.last_quorum_acked.as_ref().is_some_and(|at| at.elapsed() < lease));
    let mut members: Vec<NodeId> = membership.nodes().map(|(id, _)| node_of(*id)).collect();
    members.sort_unstable();
    members.dedup();
    Look {
        leading: m.state == ServerState::Leader && m.current_leader == Some(h.replica),
        following: matches!(m.state, ServerState::Follower | ServerState::Learner),
        leader: m.current_leader,
        term: m.current_term,
        last_index,
        settled,
        members,
    }
}

fn tick(raft: &Raft, on: bool) {
    raft.runtime_config().tick(on);
}

impl Quiescer {
    /// `after` of `None` never quiesces a group here; beats are still taken in.
    /// `lost_after` is `election_timeout_ms_min`, `lease` `election_timeout_ms_max`.
    pub fn new(
        node: NodeId,
        after: Option<Duration>,
        lost_after: Duration,
        lease: Duration,
        groups: Groups,
    ) -> Arc<Quiescer> {
        Arc::new(Quiescer {
            node,
            incarnation: rand::random(),
            after,
            lost_after,
            lease,
            groups,
            quiet: AtomicUsize::new(0),
            wakes: AtomicU64::new(0),
            state: Mutex::default(),
        })
    }

    /// Groups quiesced on this node now (led or followed).
    pub fn quiesced(&self) -> usize {
        self.quiet.load(Relaxed)
    }

    /// Times a quiesced group woke on this node.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Relaxed)
    }

    fn hosted(&self) -> Vec<(ShardId, Hosted)> {
        let map = self.groups.read().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(s, h)| (*s, h.clone())).collect()
    }

    fn hosted_one(&self, shard: ShardId) -> Option<Hosted> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leader side, once per heartbeat interval: quiesces the groups led here that have
    /// been idle long enough, wakes those that are not, marks peers not heard from as lost
    /// (waking the groups they lead here), and returns the groups led here that are
    /// quiesced, for the next beat.
    pub fn scan(&self, now: Instant) -> Scan {
        let hosted = self.hosted();
        let mut st = self.lock();
        let lost: Vec<NodeId> = st
            .peers
            .iter_mut()
            .filter(|(_, p)| !p.lost && now.saturating_duration_since(p.seen) >= self.lost_after)
            .map(|(n, p)| {
                p.lost = true;
                *n
            })
            .collect();
        for node in lost {
            // The one line an outage of a peer logs here: openraft's failed heartbeats to it,
            // one per group every heartbeat interval, are filtered out by default
            // (`crate::node::LOG_DEFAULT`).
            tracing::warn!(peer = node, after = ?self.lost_after, "no beat from the peer: lost; waking the groups it leads here");
            self.wake_followed_of(&mut st, &hosted, node);
        }
        let (mut quiet, mut renew) = (Vec::new(), Vec::new());
        let here: std::collections::HashSet<ShardId> = hosted.iter().map(|(s, _)| *s).collect();
        for (shard, h) in &hosted {
            let l = look(h, self.lease);
            if !l.leading {
                if let Some(led) = st.led.remove(shard) {
                    if led.quiesced {
                        self.woke(&h.raft, "no longer leads");
                    }
                }
                continue;
            }
            // A follower mark left on a replica that now leads (it cannot win an election
            // untimed, but a mark must never count a group twice): the led entry owns it now.
            if st.followed.remove(shard).is_some() {
                self.quiet.fetch_sub(1, Relaxed);
                tick(&h.raft, true);
            }
            let alive = l.members.iter().all(|n| *n == self.node || st.peers.get(n).is_some_and(|p| !p.lost));
            let held = st.held(*shard, now);
            let led = st.led.entry(*shard).or_insert_with(|| Led {
                replica: h.replica,
                last_index: l.last_index,
                idle_since: now,
                quiesced: false,
                renewed: now,
                members: Vec::new(),
            });
            led.members = l.members;
            if led.replica != h.replica || led.last_index != l.last_index || !l.settled || !alive || held {
                if led.quiesced {
                    led.quiesced = false;
                    self.woke(&h.raft, "led group active");
                }
                led.replica = h.replica;
                led.last_index = l.last_index;
                led.idle_since = now;
                continue;
            }
            if !led.quiesced {
                match self.after {
                    Some(after) if now.saturating_duration_since(led.idle_since) >= after => {
                        led.quiesced = true;
                        led.renewed = now;
                        self.quiet.fetch_add(1, Relaxed);
                        tick(&h.raft, false);
                    }
                    _ => continue,
                }
            } else if now.saturating_duration_since(led.renewed) >= self.lost_after / 2 {
                led.renewed = now;
                renew.push(h.raft.clone());
            }
            if let Some(last_index) = l.last_index {
                quiet.push(QuietGroup { shard: *shard, leader: h.replica, term: l.term, last_index });
            }
        }
        // Groups no longer hosted here (stopped, moved away): nothing to wake.
        let gone: Vec<ShardId> = st.led.keys().filter(|s| !here.contains(s)).copied().collect();
        for s in gone {
            if st.led.remove(&s).is_some_and(|l| l.quiesced) {
                self.quiet.fetch_sub(1, Relaxed);
            }
        }
        // And followers whose replica is no longer the one hosted (a new replica starts
        // ticking).
        // (Read now, not from the list taken before the lock: a beat may have quiesced a
        // replica that list does not know.)
        let gone: Vec<ShardId> = st
            .followed
            .iter()
            .filter(|(s, f)| self.hosted_one(**s).is_none_or(|h| h.replica != f.replica))
            .map(|(s, _)| *s)
            .collect();
        for s in gone {
            st.followed.remove(&s);
            self.quiet.fetch_sub(1, Relaxed);
        }
        Scan { quiet, renew }
    }

    /// `from`'s process `incarnation` said it is stopping: no leadership is handed to it
    /// (see [`Quiescer::is_leaving`]) until a beat of another incarnation comes. A late word
    /// of an incarnation already replaced is ignored.
    pub fn on_leaving(&self, from: NodeId, incarnation: u64, now: Instant) {
        if from == self.node {
            return;
        }
        let mut st = self.lock();
        match st.peers.get_mut(&from) {
            Some(p) if p.incarnation != incarnation => return,
            Some(p) => p.leaving = true,
            None => {
                st.peers.insert(from, Peer { incarnation, seen: now, lost: false, leaving: true });
            }
        }
        tracing::info!(peer = from, "a peer said it is stopping: no leadership goes to it");
    }

    /// Whether a beat from `node` came within `within` before `now` (and it is not lost).
    pub fn heard_within(&self, node: NodeId, within: Duration, now: Instant) -> bool {
        self.lock().peers.get(&node).is_some_and(|p| !p.lost && now.saturating_duration_since(p.seen) < within)
    }

    /// Whether node `node` said it is stopping and has not started again since. A stopping
    /// node hands its groups away and stops within seconds, so a leadership handed to it
    /// (by a balancer or another stopping node) would cost an election timeout or a second
    /// handover.
    pub fn is_leaving(&self, node: NodeId) -> bool {
        self.lock().peers.get(&node).is_some_and(|p| p.leaving)
    }

    /// Whether `shard` may be handed to `node` by a node that stops: not if `node` said it
    /// stops too. Checked and logged under the lock [`Quiescer::on_leaving`] logs under, so
    /// the log never shows a handover decided after the word that its target stops.
    pub fn may_hand_to(&self, shard: ShardId, node: NodeId) -> bool {
        let st = self.lock();
        if st.peers.get(&node).is_some_and(|p| p.leaving) {
            return false;
        }
        tracing::info!(shard, to = node, "handing leadership away before stopping");
        true
    }

    /// A beat from `from`: it is alive, and leads the `quiesced` groups.
    pub fn on_beat(&self, from: NodeId, incarnation: u64, quiesced: &[QuietGroup], now: Instant) {
        if from == self.node {
            return;
        }
        let hosted = self.hosted();
        let mut st = self.lock();
        let (changed, leaving) = match st.peers.get(&from) {
            Some(p) => {
                if p.lost {
                    tracing::info!(peer = from, "the peer beats again");
                }
                // A stopping node beats until its stop ends; only a new process is not leaving.
                let same = p.incarnation == incarnation;
                (p.lost || !same, p.leaving && same)
            }
            None => (true, false),
        };
        st.peers.insert(from, Peer { incarnation, seen: now, lost: false, leaving });
        if changed {
            // Back, or started again: it must hear the heartbeats of the groups led here
            // before its own election timeout, and the groups it led here may have a
            // leader that no longer is.
            tracing::debug!(peer = from, "a peer is (back) alive: waking the groups shared with it");
            self.wake_followed_of(&mut st, &hosted, from);
            let shared: Vec<ShardId> =
                st.led.iter().filter(|(_, l)| l.quiesced && l.members.contains(&from)).map(|(s, _)| *s).collect();
            for shard in shared {
                if let Some(led) = st.led.get_mut(&shard) {
                    led.quiesced = false;
                    led.idle_since = now;
                }
                if let Some((_, h)) = hosted.iter().find(|(s, _)| *s == shard) {
                    self.woke(&h.raft, "peer back");
                } else {
                    self.quiet.fetch_sub(1, Relaxed);
                }
            }
        }
        if self.after.is_none() {
            return;
        }
        let named: std::collections::HashSet<ShardId> = quiesced.iter().map(|q| q.shard).collect();
        // Groups it led quiesced that it no longer names: woken there.
        let woken: Vec<ShardId> =
            st.followed.iter().filter(|(s, f)| f.leader_node == from && !named.contains(s)).map(|(s, _)| *s).collect();
        for shard in woken {
            st.followed.remove(&shard);
            match hosted.iter().find(|(s, _)| *s == shard) {
                Some((_, h)) => self.woke(&h.raft, "leader woke it"),
                None => {
                    self.quiet.fetch_sub(1, Relaxed);
                }
            }
        }
        for q in quiesced {
            if st.followed.contains_key(&q.shard) || node_of(q.leader) != from || st.held(q.shard, now) {
                continue;
            }
            let Some((_, h)) = hosted.iter().find(|(s, _)| *s == q.shard) else { continue };
            if h.replica == q.leader {
                continue;
            }
            let l = look(h, self.lease);
            if l.following && l.leader == Some(q.leader) && l.term == q.term && l.last_index == Some(q.last_index) {
                st.followed.insert(q.shard, Followed { replica: h.replica, leader_node: from });
                self.quiet.fetch_add(1, Relaxed);
                tick(&h.raft, false);
            }
        }
    }

    /// After a Raft message for `shard` was handled here: a quiesced group wakes (a follower
    /// quiesced on a beat that crossed its leader's next entry, a leader asked for a vote).
    /// Takes no lock while nothing is quiesced.
    pub fn on_rpc(&self, shard: ShardId, what: &'static str) {
        if self.quiet.load(Relaxed) == 0 {
            return;
        }
        self.wake(shard, false, what);
    }

    /// Wakes `shard`'s group here and keeps it from quiescing for two leases, whether or not
    /// anything here is quiesced: around a leadership handover, before this node hands its
    /// leadership away and when it is asked to take one. A leader that is transferring
    /// refuses writes and sends no heartbeats until a new leader is elected, which takes the
    /// election timers a quiesced group does not run, and a beat that still names the group
    /// must not quiesce the target again during its election.
    pub fn hold(&self, shard: ShardId, why: &'static str) {
        self.wake(shard, true, why);
    }

    /// Drops `shard`'s marks here (followed, or led and quiesced) and wakes its group if it
    /// had any; with `hold`, keeps it awake for two leases.
    fn wake(&self, shard: ShardId, hold: bool, why: &'static str) {
        let now = Instant::now();
        let mut st = self.lock();
        if hold {
            st.held.insert(shard, now + 2 * self.lease);
        }
        let mut marks = usize::from(st.followed.remove(&shard).is_some());
        if let Some(l) = st.led.get_mut(&shard).filter(|l| l.quiesced) {
            l.quiesced = false;
            l.idle_since = now;
            marks += 1;
        }
        drop(st);
        if marks > 0 {
            self.quiet.fetch_sub(marks - 1, Relaxed);
            match self.hosted_one(shard) {
                Some(h) => self.woke(&h.raft, why),
                None => {
                    self.quiet.fetch_sub(1, Relaxed);
                }
            }
        }
    }

    /// Wakes the followers here of groups `node` leads.
    fn wake_followed_of(&self, st: &mut State, hosted: &[(ShardId, Hosted)], node: NodeId) {
        let of: Vec<ShardId> = st.followed.iter().filter(|(_, f)| f.leader_node == node).map(|(s, _)| *s).collect();
        for shard in of {
            let f = st.followed.remove(&shard);
            match hosted.iter().find(|(s, h)| *s == shard && f.as_ref().is_some_and(|f| f.replica == h.replica)) {
                Some((_, h)) => self.woke(&h.raft, "leader lost"),
                None => {
                    self.quiet.fetch_sub(1, Relaxed);
                }
            }
        }
    }

    /// A group marked quiesced here ticks again.
    fn woke(&self, raft: &Raft, why: &'static str) {
        tracing::debug!(why, "a quiesced group wakes");
        self.quiet.fetch_sub(1, Relaxed);
        self.wakes.fetch_add(1, Relaxed);
        tick(raft, true);
    }

    /// Tells every peer that this node is stopping, and waits at most `every` for their
    /// answers: a peer that does not hear it still hands this node no leadership once it has
    /// not answered for an election timeout.
    async fn say_leaving(&self, net: &PeerNet, every: Duration) {
        let (me, incarnation) = (self.node, self.incarnation);
        let told = net.peer_ids().into_iter().filter(|p| *p != me).map(|peer| {
            let net = net.clone();
            async move {
                let said = net.control(peer, PeerRequest::Leaving { node: me, incarnation }, every).await;
                if let Err(e) = said {
                    tracing::trace!(peer, error = %e, "the peer did not hear that this node stops");
                }
            }
        });
        let _ = tokio::time::timeout(every, futures::future::join_all(told)).await;
    }

    /// Every `every`: looks at the groups led here and beats to every peer, until `stop`.
    /// Each peer has a task of its own, so a dead one delays no other; a slow one skips the
    /// beats it missed.
    pub async fn run(self: Arc<Self>, net: PeerNet, every: Duration, stop: impl std::future::Future<Output = ()>) {
        let (tx, _) = tokio::sync::watch::channel(Arc::new(Vec::<QuietGroup>::new()));
        let mut senders: HashMap<NodeId, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => {
                    self.say_leaving(&net, every).await;
                    break;
                }
                _ = interval.tick() => {}
            }
            let Scan { quiet, renew } = self.scan(Instant::now());
            tx.send_replace(Arc::new(quiet));
            if !renew.is_empty() {
                // Off this task: a group whose Raft core is slow to take the command must not
                // hold up the beats and the liveness of the others.
                tokio::spawn(async move {
                    for raft in renew {
                        if let Err(e) = raft.trigger().heartbeat().await {
                            tracing::debug!(error = %e, "a quiesced group's lease not renewed");
                        }
                    }
                });
            }
            for peer in net.peer_ids() {
                if peer == self.node || senders.get(&peer).is_some_and(|t| !t.is_finished()) {
                    continue;
                }
                let (net, mut rx, me, incarnation) = (net.clone(), tx.subscribe(), self.node, self.incarnation);
                let ttl = (every * 5).max(Duration::from_secs(1));
                senders.insert(
                    peer,
                    tokio::spawn(async move {
                        while rx.changed().await.is_ok() {
                            let quiesced = rx.borrow_and_update().as_ref().clone();
                            let beat = PeerRequest::Beat { node: me, incarnation, quiesced };
                            match net.control(peer, beat, ttl).await {
                                Ok(PeerResponse::Beat) => {}
                                Ok(other) => tracing::debug!(peer, answer = ?other, "unexpected answer to a beat"),
                                Err(e) => tracing::trace!(peer, error = %e, "beat not delivered"),
                            }
                        }
                    }),
                );
            }
        }
        drop(tx);
        for (_, t) in senders {
            t.abort();
        }
        // Stopping: every group ticks again, as it would after a restart.
        let hosted = self.hosted();
        let mut st = self.lock();
        let led: Vec<ShardId> = st.led.iter().filter(|(_, l)| l.quiesced).map(|(s, _)| *s).collect();
        let followed: Vec<ShardId> = st.followed.keys().copied().collect();
        st.led.clear();
        st.followed.clear();
        drop(st);
        for shard in led.into_iter().chain(followed) {
            match hosted.iter().find(|(s, _)| *s == shard) {
                Some((_, h)) => self.woke(&h.raft, "stopping"),
                None => {
                    self.quiet.fetch_sub(1, Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiescer() -> Arc<Quiescer> {
        let s = Duration::from_secs(1);
        Quiescer::new(1, Some(s), s, 2 * s, Groups::default())
    }

    #[test]
    fn a_stopping_peer_is_leaving_until_a_new_process_of_it_beats() {
        let q = quiescer();
        let now = Instant::now();
        q.on_beat(2, 100, &[], now);
        q.on_beat(3, 300, &[], now);
        assert!(!q.is_leaving(2), "a beating peer is not leaving");
        q.on_leaving(2, 100, now);
        assert!(q.is_leaving(2), "the peer said it stops");
        assert!(!q.is_leaving(3), "only the peer that said so");
        q.on_beat(2, 100, &[], now);
        assert!(q.is_leaving(2), "a stopping process beats until its stop ends: still leaving");
        q.on_beat(2, 101, &[], now);
        assert!(!q.is_leaving(2), "a new process of the node is not leaving");
        q.on_leaving(2, 100, now);
        assert!(!q.is_leaving(2), "a late word of the old process is ignored");
        q.on_leaving(4, 400, now);
        assert!(q.is_leaving(4), "a peer never heard before that says it stops");
        q.on_leaving(1, 1, now);
        assert!(!q.is_leaving(1), "this node's own word is not taken");
    }

    #[test]
    fn a_transfer_holds_its_group_awake_even_with_nothing_quiesced() {
        let q = quiescer();
        assert_eq!(q.quiesced(), 0);
        let now = Instant::now();
        q.hold(7, "transfer leader");
        q.on_rpc(8, "append");
        let mut st = q.lock();
        assert!(st.held(7, now), "a transfer target must be held awake for its election");
        assert!(!st.held(8, now), "an append holds nothing");
        assert!(!st.held(7, now + 3 * q.lease), "the hold lasts two leases");
    }
}
