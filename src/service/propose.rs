//! Proposing commands on a shard's leader, through the shard's fair scheduler ([`fair`]).
//!
//! A send (or a batch of sends) holds node-wide in-flight permits from the moment it is
//! taken until its outcome is known, and a share of its shard's window while it is proposed.
//! Cursor moves and membership changes carry no sends: they are proposed at once.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use openraft::error::ClientWriteError;
use openraft::raft::ClientWriteResult;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::fair::{Admit, Lanes, Waiting};
use super::metrics::{Metrics, Throttle};
use super::{CommitCounters, Proposed, Refusal, SEND_TIMEOUT};
use crate::chat::{Command, ShardId};
use crate::raft::types::{node_of, FnResponder, Raft, C};
use crate::stages::{Stage, Stages};

/// Sends a conversation gets per turn when its shard's window is contended.
pub const FAIR_QUANTUM_SENDS: u32 = 32;
/// A queued proposal that waited this long is answered `Throttled` instead of proposed: its
/// sender has been told the outcome is unknown by now, and retries.
const QUEUE_WAIT_MAX: Duration = SEND_TIMEOUT;
/// The wait suggested to a sender whose conversation's queue is full.
const QUEUE_FULL_RETRY_MS: u64 = 50;

/// Where a proposal's outcome goes, once.
type Done = Box<dyn FnOnce(Proposed) + Send + 'static>;

/// What a queued proposal carries until its turn.
struct Pending {
    command: Command,
    permits: Option<OwnedSemaphorePermit>,
    done: Done,
}

/// One shard's proposer on this node.
pub struct Proposer {
    shard: ShardId,
    raft: Raft,
    lanes: Mutex<Lanes<Pending>>,
    /// Whether the window is used at all (`limits.shard_window_sends > 0`).
    scheduled: bool,
    wake: Arc<Notify>,
    counters: Arc<CommitCounters>,
    metrics: Arc<Metrics>,
    stages: Arc<Stages>,
}

/// A proposal's share of the window: given back when dropped, whether the proposal was
/// answered, refused, or dropped uncalled with a stopping group.
struct Slot {
    proposer: Weak<Proposer>,
    cost: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.cost == 0 {
            return;
        }
        if let Some(p) = self.proposer.upgrade() {
            let waiting = p.lanes.lock().expect("lanes lock is never poisoned").finished(self.cost);
            if waiting {
                p.wake.notify_one();
            }
        }
    }
}

/// The sends a command carries.
pub(super) fn sends_of(command: &Command) -> u32 {
    match command {
        Command::Send(_) => 1,
        Command::SendBatch(b) => b.len() as u32,
        Command::Cursor(_)
        | Command::Members(_)
        | Command::SetRetention(_)
        | Command::Trim(_)
        | Command::TrimUnder(_)
        | Command::Place(_) => 0,
    }
}

/// The conversation a command is queued under (a batch's first send's: a batch that would
/// wait is proposed per conversation, see `Service::proposals_of`).
fn conversation_of(command: &Command) -> Option<&str> {
    match command {
        Command::Send(s) => Some(&s.conversation),
        Command::SendBatch(b) => b.first().map(|s| s.conversation.as_str()),
        Command::Cursor(_)
        | Command::Members(_)
        | Command::SetRetention(_)
        | Command::Trim(_)
        | Command::TrimUnder(_)
        | Command::Place(_) => None,
    }
}

impl Proposer {
    /// A proposer for `shard` with a window of `window` sends (0: none, every proposal goes at
    /// once) and at most `queue_max` sends queued per conversation. Its dispatcher runs until
    /// the proposer is dropped.
    pub fn start(
        shard: ShardId,
        raft: Raft,
        window: u32,
        queue_max: u32,
        counters: Arc<CommitCounters>,
        metrics: Arc<Metrics>,
        stages: Arc<Stages>,
    ) -> Arc<Proposer> {
        let proposer = Arc::new(Proposer {
            shard,
            raft,
            lanes: Mutex::new(Lanes::new(window, queue_max, FAIR_QUANTUM_SENDS)),
            scheduled: window > 0,
            wake: Arc::new(Notify::new()),
            counters,
            metrics,
            stages,
        });
        tokio::spawn(dispatch(Arc::downgrade(&proposer), proposer.wake.clone()));
        proposer
    }

    /// Whether a proposal of `cost` sends would wait for its conversation's turn now.
    pub fn would_queue(&self, cost: u32) -> bool {
        self.scheduled && self.lanes.lock().expect("lanes lock is never poisoned").would_queue(cost)
    }

    /// Proposes `command` (holding `permits`) now or in its conversation's turn. `done`
    /// receives the outcome exactly once — from the state machine's task when the entry is
    /// applied, with the answer for everything the command carried (not leader, outcome
    /// unknown, throttled after waiting too long), or from here — unless the group stops
    /// first, which drops it uncalled. An `Err` is the immediate answer (the conversation's
    /// queue is full, the group stopped); `done` is then dropped.
    pub async fn propose(
        self: &Arc<Self>,
        command: Command,
        permits: Option<OwnedSemaphorePermit>,
        done: impl FnOnce(Proposed) + Send + 'static,
    ) -> Result<(), Refusal> {
        let cost = sends_of(&command);
        let pending = Pending { command, permits, done: Box::new(done) };
        let conversation = conversation_of(&pending.command).filter(|_| self.scheduled).map(str::to_owned);
        let Some(conversation) = conversation else {
            return self.submit(pending, 0).await.map_err(|(refusal, _)| refusal);
        };
        let admitted = self.lanes.lock().expect("lanes lock is never poisoned").admit(
            &conversation,
            cost,
            pending,
            Instant::now(),
        );
        match admitted {
            Admit::Now(pending) => self.submit(pending, cost).await.map_err(|(refusal, _)| refusal),
            Admit::Queued => {
                self.counters.queued.fetch_add(u64::from(cost), Ordering::Relaxed);
                Ok(())
            }
            Admit::Full(_) => {
                self.metrics.throttled(Throttle::QueueFull, u64::from(cost));
                tracing::debug!(shard = self.shard, %conversation, "conversation's proposal queue is full");
                Err(Refusal::Throttled { retry_after_ms: QUEUE_FULL_RETRY_MS })
            }
        }
    }

    /// Hands `pending` to Raft, holding `cost` sends of the window until it is answered. A
    /// refusal (the group stopped: the command never reached it) gives `done` back, so that a
    /// queued proposal's sender learns it was not proposed rather than that its outcome is
    /// unknown.
    async fn submit(self: &Arc<Self>, pending: Pending, cost: u32) -> Result<(), (Refusal, Option<Done>)> {
        let Pending { command, permits, done } = pending;
        // Taken by whichever comes first: the responder, or the refusal below.
        let done = Arc::new(Mutex::new(Some(done)));
        let answer = done.clone();
        let slot = Slot { proposer: Arc::downgrade(self), cost };
        let (shard, counters, stages) = (self.shard, self.counters.clone(), self.stages.clone());
        let proposed = Instant::now();
        let responder = FnResponder::new(move |result: ClientWriteResult<C>| {
            drop(permits);
            drop(slot);
            let Some(done) = answer.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
            done(match result {
                Err(ClientWriteError::ForwardToLeader(f)) => {
                    Err(Refusal::NotLeader { shard, leader: f.leader_id.map(node_of) })
                }
                Err(e) => Err(Refusal::Unknown(format!("shard {shard}: {e}"))),
                Ok(resp) => {
                    if cost > 0 {
                        stages.record(Stage::Send, proposed.elapsed());
                        counters.entries.fetch_add(1, Ordering::Relaxed);
                        counters.sends.fetch_add(u64::from(cost), Ordering::Relaxed);
                    }
                    Ok(resp.data)
                }
            })
        });
        // Refused only when the group has stopped: the command never reached it.
        self.raft.client_write_ff(command, Some(responder)).await.map_err(|e| {
            let done = done.lock().unwrap_or_else(|p| p.into_inner()).take();
            (Refusal::Unavailable(format!("shard {shard}: {e}")), done)
        })
    }
}

/// Proposes queued proposals as the window frees, in turn, until the proposer is dropped.
/// It holds no strong reference while idle, so dropping the proposer ends it.
async fn dispatch(proposer: Weak<Proposer>, wake: Arc<Notify>) {
    loop {
        let woken = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
        let Some(p) = proposer.upgrade() else { return };
        if woken.is_err() && p.lanes.lock().expect("lanes lock is never poisoned").queued() == 0 {
            continue;
        }
        // What waited too long is answered whether or not the window frees: a full window
        // whose proposals are never answered (a leader cut off from its quorum) must not keep
        // the node's in-flight permits they hold.
        let cutoff = Instant::now().checked_sub(QUEUE_WAIT_MAX);
        let expired = cutoff.map(|c| p.lanes.lock().expect("lanes lock is never poisoned").expired(c));
        for Waiting { item, cost, .. } in expired.into_iter().flatten() {
            p.metrics.throttled(Throttle::QueueWait, u64::from(cost));
            (item.done)(Err(Refusal::Throttled { retry_after_ms: QUEUE_FULL_RETRY_MS }));
        }
        loop {
            let next = p.lanes.lock().expect("lanes lock is never poisoned").next();
            let Some(Waiting { item, cost, since }) = next else { break };
            if since.elapsed() > QUEUE_WAIT_MAX {
                drop(Slot { proposer: Arc::downgrade(&p), cost });
                p.metrics.throttled(Throttle::QueueWait, u64::from(cost));
                (item.done)(Err(Refusal::Throttled { retry_after_ms: QUEUE_FULL_RETRY_MS }));
                continue;
            }
            if let Err((refusal, done)) = p.submit(item, cost).await {
                tracing::debug!(shard = p.shard, ?refusal, "a queued proposal was refused");
                if let Some(done) = done {
                    done(Err(refusal));
                }
            }
        }
    }
}
