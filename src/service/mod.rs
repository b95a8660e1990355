//! The client operations (send, subscribe, cursors, status) expressed over a node's store
//! and shard groups. It speaks the client protocol's messages (`net::wire`) but owns no
//! endpoint: `crate::server` feeds it requests and `crate::node` starts and stops it.
//!
//! - **send**: validate → this node must lead the shard (else `NotLeader{hint}`) → bounded
//!   in-flight check (else `Throttled`) → the leader stamps the time → Raft commit on a
//!   quorum, fsynced → apply assigns the offset → `Ack`, written to the client's stream by
//!   the state machine's task itself, so the answers of one apply batch leave the node
//!   together. A timeout is answered `Ambiguous`, never as a failure: the client retries
//!   with the same idempotency key.
//! - **subscribe**: served by any replica. It attaches to its conversation's live-push
//!   channel *first*, then reads storage from `from`; at the head it pushes live events.
//!   An event at the next expected offset is delivered, older ones are skipped, and a gap,
//!   a lag overflow or a snapshot reset sends it back to storage — so the seam never skips
//!   or repeats and a slow subscriber costs storage reads, not memory.

mod compaction;
mod fair;
mod frames;
pub mod metrics;
mod outsiders;
mod placement;
mod propose;
mod push;
pub use placement::serve_drops;
pub mod catch_up;
pub mod rates;
mod retention;
mod stop;
pub(crate) use stop::StopSignal;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, Notify, Semaphore};

use crate::chat::{
    self, Command, CursorCommand, Members, MembersCommand, Outcome, Retention, RetentionCommand, SendCommand, ShardId,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::net::frame;
use crate::net::tls::Identity;
use crate::net::wire::{
    ErrorCode, FollowerLag, MemberChange, NodeStatus, Request, Response, SendRequest, ShardStatus, SnapshotCopyStatus,
    SEND_BATCH_MAX,
};
use crate::placement::{ClusterMap, NodeEntry, NodeState, PlacementCommand, RoutingMap, META_SHARD};
use crate::raft::meta::{self, Placed};
use crate::raft::network::{Groups, Hosted, PeerNet, PeerStats};
use crate::raft::state_machine::{self, ShardEvents};
use crate::raft::types::{node_of, NodeId};
use crate::raft::{self as consensus, Group};
use crate::store::Store;
use metrics::{Metrics, Throttle};
use propose::Proposer;
use push::{Push, PushHub};
use rates::{Bucket, Keyed, Rate, SendRates};

/// How long a proposal may take before the answer is "outcome unknown".
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages read from storage per catch-up batch, at most …
pub const CATCH_UP_BATCH: usize = 512;
/// … and stored bytes per batch, at most (a batch is held while it is written, and a
/// subscriber that stops reading pins at most two: the one being written and the next).
pub const CATCH_UP_BATCH_BYTES: usize = 256 << 10;
/// Catch-up scans a node runs at once; more wait (asynchronously) for a slot. Raft's own
/// storage work (votes, truncations) has threads of its own (`raft::io_pool`), but the disk
/// is shared: a flood of catch-ups must queue here, not in front of the disk.
pub const CATCH_UP_SCANS_MAX: usize = 8;
/// Point reads that requests make on blocking threads at once (a cursor, a conversation's
/// members or span, an outsider's write checked against storage); more wait, first come
/// first served, for a slot. A flood of such requests then waits as the request tasks its
/// connections already bound, not as blocking threads (tokio would start up to 512) in
/// front of the disk.
pub const POINT_READS_MAX: usize = 16;
/// How long a write to a subscriber may wait for the client to read: one that stops reading
/// is dropped, releasing what it pinned, and resubscribes when it reads again.
pub const SUBSCRIBER_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a live subscription looks at whether its replica is in touch with its leader
/// (see [`Service::in_touch`]) …
pub const LEADER_CHECK: Duration = Duration::from_secs(2);
/// … and how long the replica may be out of touch before the subscription ends
/// `Unavailable`, so that the client moves to another replica: a replica cut off from the
/// rest of its group would otherwise show no new message, silently.
pub const LEADERLESS_MAX: Duration = Duration::from_secs(4);
/// Suggested back-off when throttled.
pub const THROTTLE_RETRY_MS: u64 = 50;
/// Writes that looked like outsiders' a node checks at once (see [`outsiders`]): each is a
/// read index (a heartbeat round) and a storage read, so a crowd of outsiders is answered
/// `Throttled` past it instead of queueing rounds.
pub const OUTSIDE_CHECKS_MAX: usize = 64;
/// How an `Unavailable` answer refused for lack of disk space begins.
pub const DISK_FULL: &str = "disk full";
/// How often a node hands leaderships it holds back to their preferred nodes.
pub const LEADER_BALANCE_INTERVAL: Duration = Duration::from_secs(5);

/// Hands each shard this node leads to its preferred leader once that node has the whole
/// log (like Kafka's preferred-leader election): after bootstrap or a failover, leadership
/// — and with it the proposal and fsync load — spreads back over the nodes.
///
/// The preferred leader is the cluster map's (`crate::placement`), so an operator's choice
/// (`convoy admin transfer-leader`) holds across failovers and restarts; until the metadata
/// group's first leader has initialized the map (`init_placement`), it is the file's
/// round-robin.
async fn balance_leaders(node: std::sync::Weak<Service>, mut stop: StopSignal) {
    loop {
        let Some(wake) = node.upgrade().map(|n| n.placement.clone()) else { return };
        let waited = stop.unless_stopped(async {
            tokio::select! {
                _ = tokio::time::sleep(LEADER_BALANCE_INTERVAL) => {}
                _ = wake.notified() => {}
            }
        });
        if waited.await.is_none() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let map = node.cluster_map();
        if !map.is_set() && node.meta_group().is_none() {
            // Added after formation and no map heard yet: the file's round-robin is not
            // this node's to follow.
            continue;
        }
        for group in node.groups() {
            if stop.is_set() {
                return;
            }
            if map.operation_on(group.shard).is_some() {
                // A move hands leadership where it must; the balancer waits for it to end.
                continue;
            }
            let preferred = node.preferred_leader(&map, group.shard);
            if preferred == node.id || node.is_leaving(preferred) {
                continue;
            }
            let metrics = consensus::metrics_of(&group.raft);
            // The preferred node's current replica in this group, if it votes.
            let Some(target) = metrics.membership_config.membership().voter_ids().find(|v| node_of(*v) == preferred)
            else {
                continue;
            };
            let caught_up = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&target).cloned().flatten())
                .is_some_and(|matched| Some(matched.index) == metrics.last_log_index);
            if metrics.current_leader == Some(group.replica) && caught_up {
                tracing::info!(shard = group.shard, to = preferred, "transferring leadership to the preferred node");
                if let Some(q) = node.net.quiescer() {
                    q.hold(group.shard, "handing leadership away");
                }
                let _ = stop.unless_stopped(group.raft.trigger().transfer_leader(target)).await;
            }
        }
    }
}

/// How often a node checks whether the cluster map still needs initializing.
const PLACEMENT_INIT_INTERVAL: Duration = Duration::from_millis(200);

/// Until the cluster map is initialized: whenever this node leads the metadata group, fills
/// the map from the file (see [`Service::init_placement`]).
async fn init_placement(node: std::sync::Weak<Service>, mut stop: StopSignal) {
    loop {
        if stop.unless_stopped(tokio::time::sleep(PLACEMENT_INIT_INTERVAL)).await.is_none() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        if node.meta_group().is_none() || node.cluster_map().is_set() {
            return;
        }
        // Proposing the map may be abandoned: it is proposed again until it is set.
        if stop.unless_stopped(node.init_placement()).await.is_none() {
            return;
        }
    }
}

/// How long a stopping node waits for its background loops, its sends in flight and the peer
/// requests it serves before it stops its groups anyway (see [`Service::shutdown`]).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// How long a stopping node waits for the groups it handed away to name their new leaders.
const HANDOVER_WAIT: Duration = Duration::from_secs(1);

/// Beyond the heartbeat interval, how long a stopping node waits for a heartbeat's answer.
const HEARTBEAT_ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// A batch of stored messages, framed for the wire.
struct StoredFrames {
    frames: Vec<u8>,
    /// Whether the conversation holds more after this batch (it was cut by count or bytes).
    more: bool,
    /// The offset after the last one.
    next: u64,
    /// The conversation's head when the batch was cut short (it is behind by more than a
    /// batch), or when nothing was stored at its first offset above 1.
    head: Option<u64>,
    /// Its share of the node's catch-up budget, given back once it is written.
    _hold: Option<catch_up::BatchHold>,
}

/// A batch of stored messages being read and framed on a blocking thread; dropped unread
/// (its subscription ended), the read is abandoned, and its place in the budget with it.
struct StoredRead {
    task: tokio::task::JoinHandle<Result<StoredFrames>>,
    /// Set while it waits for room in the node's catch-up budget.
    waiting: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for StoredRead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StoredRead {
    async fn finish(&mut self) -> Result<StoredFrames> {
        (&mut self.task).await.map_err(Error::task("reading stored messages"))?
    }
}

/// Reads and frames up to [`CATCH_UP_BATCH`] stored messages (and [`CATCH_UP_BATCH_BYTES`])
/// of a conversation from `from` up to offset `until`.
fn read_batch(store: &Store, shard: ShardId, conversation: &str, from: u64, until: u64) -> Result<StoredFrames> {
    let mut frames = Vec::new();
    let mut next = from.max(1);
    let want = CATCH_UP_BATCH.min(usize::try_from(until.saturating_sub(next - 1)).unwrap_or(usize::MAX));
    if want == 0 {
        return Ok(StoredFrames { frames, more: false, next, head: None, _hold: None });
    }
    let scanned = store.scan_messages(shard, conversation, next, want, CATCH_UP_BATCH_BYTES, |offset, value| {
        if offset != next {
            return Err(Error::Corrupt(format!(
                "conversation {conversation:?}: offset {offset} stored where {next} was due"
            )));
        }
        next = offset + 1;
        frames::message_frame_from_stored(value, &mut frames)
    })?;
    // The head is read when more is stored, and when nothing is at `from` (past the head?).
    let none_at_from = next == from.max(1) && next > 1;
    let head = if scanned.more || none_at_from { Some(store.head(shard, conversation)?) } else { None };
    Ok(StoredFrames { frames, more: scanned.more, next, head, _hold: None })
}

/// Runs `read` on a blocking thread once one of `slots` is free ([`POINT_READS_MAX`]). The
/// slot goes with the read: a request abandoned while its read runs holds it until the read
/// ends.
async fn point_read<T: Send + 'static>(
    slots: &Arc<Semaphore>,
    what: &'static str,
    read: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let slot = slots.clone().acquire_owned().await.map_err(|_| Error::Unavailable("the node is stopping".into()))?;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        read()
    })
    .await
    .map_err(Error::task(what))?
}

/// Writes to a subscriber's stream, giving up after [`SUBSCRIBER_WRITE_TIMEOUT`]; a failed
/// write resets the stream (see [`frame::write_or_reset`]).
async fn write_subscriber(out: &mut quinn::SendStream, bytes: &[u8]) -> Result<()> {
    frame::write_or_reset(out, bytes, SUBSCRIBER_WRITE_TIMEOUT).await.map_err(|failed| match failed {
        Some(e) => Error::Unavailable(format!("subscriber stream: {e}")),
        None => Error::Unavailable(format!(
            "the subscriber read nothing for {SUBSCRIBER_WRITE_TIMEOUT:?}; its subscription is dropped"
        )),
    })
}

/// Writes a batch of stored messages to a subscriber as [`write_subscriber`] does, unless
/// the write stays unfinished while other readers than its own read `ahead` wait for room
/// in the node's catch-up budget (see [`catch_up`]): then the stream is reset with [`crate::net::wire::RESET_SLOW_READER`]
/// and the subscription ends, giving its batches' room to them.
async fn write_stored(
    budget: &catch_up::CatchUpBudget,
    out: &mut quinn::SendStream,
    frames: &[u8],
    ahead: &StoredRead,
) -> Result<()> {
    match budget.write_batch(write_subscriber(out, frames), &ahead.waiting).await {
        Some(written) => written,
        None => {
            let _ = out.reset(crate::net::wire::RESET_SLOW_READER.into());
            Err(Error::Unavailable(format!(
                "the subscriber took a batch of stored messages for over {:?} while other readers waited for room \
                 in the node's catch-up budget; its subscription is dropped",
                catch_up::CONTENDED_WRITE_MAX
            )))
        }
    }
}

/// Detaches a subscriber from the hub when its subscription ends, however it ends.
struct Attached<'a> {
    hub: &'a PushHub,
    conversation: &'a str,
    rx: Option<broadcast::Receiver<Arc<Push>>>,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.hub.detach(self.conversation);
    }
}

/// A node's client operations over its store and groups.
pub struct Service {
    pub id: NodeId,
    pub config: Config,
    pub store: Store,
    /// The shard groups this node runs, by shard: they change as the cluster map places
    /// replicas here or moves them away (see `follow_placement`).
    groups: std::sync::RwLock<HashMap<ShardId, Group>>,
    /// This node's replica of the metadata group (see `crate::placement`); `None` on a node
    /// that holds none (added after formation, or moved off it) or whose storage was
    /// refused. A move places it here or takes it away (`placement::host`, `drop_shard`).
    meta: std::sync::RwLock<Option<Group>>,
    /// Woken when the cluster map changes, so leadership follows a new preferred leader at
    /// once rather than at the next balancing round.
    placement: Arc<Notify>,
    /// Woken with it, for the task that follows the map (`placement::follow`).
    placement_follow: Arc<Notify>,
    /// On a node without a replica of the metadata group (added after formation): the
    /// newest map its peers reported, which `placement::follow` keeps fresh.
    fetched_map: std::sync::Mutex<ClusterMap>,
    /// Starting and deleting a replica here, one at a time.
    placement_lock: tokio::sync::Mutex<()>,
    /// Set by [`Service::shutdown`] before it waits for the placement lock: a drop that waits
    /// under that lock for a state machine to stop gives up on it.
    stop_asked: tokio::sync::watch::Sender<bool>,
    net: PeerNet,
    /// Where the peer server finds the groups this node runs.
    registry: Groups,
    raft_config: Arc<openraft::Config>,
    /// Each hosted shard's proposer (its fair scheduler), by shard.
    proposers: std::sync::RwLock<HashMap<ShardId, Arc<Proposer>>>,
    push: Arc<PushHub>,
    /// Who the conversations' members are, as this node's replicas applied them: a leader
    /// tells requests from outsiders apart before they cost anything shared ([`outsiders`]).
    members: Arc<outsiders::MembersCache>,
    inflight: Arc<Semaphore>,
    /// Slots of catch-up scans ([`CATCH_UP_SCANS_MAX`]).
    scans: Arc<Semaphore>,
    /// Slots of requests' point reads ([`POINT_READS_MAX`], [`point_read`]).
    point_reads: Arc<Semaphore>,
    /// Checks of writes that looked like outsiders' (a read index and a storage read each)
    /// under way at once ([`OUTSIDE_CHECKS_MAX`]); more are answered `Throttled`.
    outside_checks: Semaphore,
    /// What catch-ups may hold: read batches and wide send windows (see [`catch_up`]).
    pub catch_up: Arc<catch_up::CatchUpBudget>,
    rates: SendRates,
    peer_stats: Arc<PeerStats>,
    counters: Arc<CommitCounters>,
    /// Event counters and live subscriptions, for the metrics endpoint.
    pub metrics: Arc<Metrics>,
    /// Set by [`Service::shutdown`]: the background loops end (see [`StopSignal`]).
    stop: tokio::sync::watch::Sender<bool>,
    /// The background loops, joined by [`Service::shutdown`] before it stops a group.
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// What the metadata group's state machine tells: a changed map, or one replaced by a
/// snapshot, wakes the leader balancing.
struct MetaEvents(Arc<Notify>, Arc<Notify>);

impl MetaEvents {
    fn changed(&self) {
        self.0.notify_one();
        self.1.notify_waiters();
    }
}

impl ShardEvents for MetaEvents {
    fn appended(&self, _: Vec<chat::StoredMessage>) {}
    fn reset(&self, _: ShardId) {
        self.changed();
    }
    fn members_changed(&self, _: Vec<String>) {}
    fn placement_changed(&self) {
        self.changed();
    }
}

/// What a data shard's state machine tells: its applied messages and membership changes
/// go to live push, and its membership changes and snapshot installs to the members cache.
struct DataEvents {
    push: Arc<PushHub>,
    members: Arc<outsiders::MembersCache>,
    shards: u32,
}

impl ShardEvents for DataEvents {
    fn appended(&self, messages: Vec<chat::StoredMessage>) {
        self.push.appended(messages);
    }
    fn reset(&self, shard: ShardId) {
        self.members.reset(shard, self.shards);
        self.push.reset(shard);
    }
    fn members_changed(&self, conversations: Vec<String>) {
        self.members.changed(&conversations);
        self.push.members_changed(conversations);
    }
}

/// Sends committed through this node as leader, and the entries that carried them.
#[derive(Debug, Default)]
struct CommitCounters {
    sends: AtomicU64,
    entries: AtomicU64,
    /// Sends that waited in a conversation's queue for their turn.
    queued: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

/// Why a request has no applied outcome: the service's own result type for everything
/// short of an outcome. It becomes a wire answer only at the edge ([`Refusal::answer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed or over a limit; nothing was proposed.
    Invalid(String),
    /// The caller's identity may not do this; nothing was proposed.
    Forbidden(String),
    /// This node does not lead the shard; `leader` is its best guess.
    NotLeader { shard: ShardId, leader: Option<NodeId> },
    /// Over the in-flight bound; nothing was proposed.
    Throttled { retry_after_ms: u64 },
    /// The command may or may not have been applied (timeout, group stopped mid-way).
    Unknown(String),
    /// The group refused the command before taking it (it has stopped).
    Unavailable(String),
    /// The state machine answered with an outcome of the wrong kind (a bug, never input).
    Unexpected(String),
}

impl Refusal {
    /// The client protocol's answer for this refusal.
    pub fn answer(self) -> Response {
        match self {
            Refusal::Invalid(m) => error(ErrorCode::InvalidInput, m),
            Refusal::Forbidden(m) => error(ErrorCode::Forbidden, m),
            Refusal::NotLeader { shard, leader } => Response::NotLeader { shard, leader, map: None },
            Refusal::Throttled { retry_after_ms } => Response::Throttled { retry_after_ms },
            Refusal::Unknown(m) => error(ErrorCode::Ambiguous, m),
            Refusal::Unavailable(m) => error(ErrorCode::Unavailable, m),
            Refusal::Unexpected(m) => error(ErrorCode::Protocol, m),
        }
    }
}

/// A command's applied outcome, or why there is none.
pub type Proposed = std::result::Result<Outcome, Refusal>;

/// A batch's valid sends by shard, with their slots in the batch.
type ByShard = BTreeMap<ShardId, (Vec<usize>, Vec<SendCommand>)>;
/// The answers of a batch's invalid sends by slot, and its valid sends by shard.
type PreparedBatch = (Vec<Option<Response>>, ByShard);
/// One proposal of a batch's sends: its shard, the sends' slots in the batch, the sends.
type BatchPart = (ShardId, Vec<usize>, Vec<SendCommand>);

/// The proposals a batch's valid sends go in: one per shard, except that the sends of a
/// shard whose proposal would wait for its turn (`queues(shard, sends)`: the window is full)
/// go in one proposal per conversation, in the batch's order. A proposal waits in its first
/// send's conversation's queue: whole, a batch would wait in one conversation's turn and be
/// charged to it for the others' sends. With the parts, whether any shard's sends were split.
fn proposals_of(by_shard: ByShard, queues: impl Fn(ShardId, u32) -> bool) -> (Vec<BatchPart>, bool) {
    let mut parts = Vec::new();
    let mut split = false;
    for (shard, (slots, commands)) in by_shard {
        let spans = commands.iter().any(|c| c.conversation != commands[0].conversation);
        if !spans || !queues(shard, commands.len() as u32) {
            parts.push((shard, slots, commands));
            continue;
        }
        split = true;
        let mut by_conversation: Vec<(Vec<usize>, Vec<SendCommand>)> = Vec::new();
        for (slot, command) in slots.into_iter().zip(commands) {
            match by_conversation.iter_mut().find(|(_, cs)| cs[0].conversation == command.conversation) {
                Some((ss, cs)) => {
                    ss.push(slot);
                    cs.push(command);
                }
                None => by_conversation.push((vec![slot], vec![command])),
            }
        }
        parts.extend(by_conversation.into_iter().map(|(ss, cs)| (shard, ss, cs)));
    }
    (parts, split)
}

/// The answer to a send whose outcome did not come within [`SEND_TIMEOUT`].
pub fn no_commit_in_time() -> Refusal {
    Refusal::Unknown(format!("no commit within {SEND_TIMEOUT:?}; outcome unknown"))
}

/// The answer to a send whose proposal was dropped without an outcome (its group stopped).
pub fn stopped_before_outcome() -> Refusal {
    Refusal::Unknown("the shard's group stopped before the outcome was known".into())
}

/// Each send's answer from the outcome of the `SendBatch` entry that carried them.
fn batch_answers(outcome: Proposed, conversations: Vec<String>) -> Vec<Response> {
    let sends = conversations.len();
    match outcome {
        Ok(Outcome::Batch(outcomes)) if outcomes.len() == sends => {
            outcomes.into_iter().zip(conversations).map(|(o, c)| send_answer(o, c)).collect()
        }
        Ok(other) => {
            vec![Refusal::Unexpected(format!("unexpected outcome of a send batch: {other:?}")).answer(); sends]
        }
        Err(refusal) => vec![refusal.answer(); sends],
    }
}

/// The answer to a command the state machine refused: `Forbidden` when it was about who
/// asked.
fn rejected(reason: &chat::Rejection) -> Response {
    let code = if reason.is_forbidden() { ErrorCode::Forbidden } else { ErrorCode::Rejected };
    error(code, reason.to_string())
}

/// The answer to a write refused because its user is not a member of the conversation: the
/// one apply gives.
fn not_a_member_answer(user: &str) -> Response {
    rejected(&chat::Rejection::NotMember { user: user.to_string() })
}

/// What apply would refuse a change for, checked first by its shard's leader (see
/// [`outsiders`]).
#[derive(Debug, Clone, Copy)]
enum Check {
    /// Its user is not a member.
    Member,
    /// The conversation exists (a creation).
    Absent,
}

/// A write that looked like one apply would refuse for who asks, as the leader checks it.
enum Outside {
    /// A send: its idempotency key and its text's digest.
    Send(chat::DedupKey, [u8; 16]),
    /// A cursor move, an addition, a removal, a retention change.
    Change(String),
    /// A creation.
    Create(String),
}

impl Outside {
    fn conversation(&self) -> &str {
        match self {
            Outside::Send(key, _) => &key.conversation,
            Outside::Change(c) | Outside::Create(c) => c,
        }
    }
}

/// The user a request names must be the connection's own.
fn must_be(who: &Identity, user: &str) -> std::result::Result<(), Refusal> {
    if user == who.user {
        Ok(())
    } else {
        Err(Refusal::Forbidden(format!("this connection is user {:?}; it cannot act as {user:?}", who.user)))
    }
}

/// Whether a user may read a conversation, by its stored members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// A member: up to the head.
    Member,
    /// No such conversation yet: nothing to read, and a subscription waits for it.
    Absent,
    /// Not (or no longer) a member: nothing after `until` (0: nothing at all).
    Ended { until: u64 },
}

fn access_of(members: Option<&Members>, user: &str) -> Access {
    match members {
        None => Access::Absent,
        Some(m) if m.contains(user) => Access::Member,
        Some(m) => Access::Ended { until: m.removed.get(user).copied().unwrap_or(0) },
    }
}

/// The answer to a reader who may not read (any more).
fn not_a_member(user: &str, conversation: &str) -> Error {
    Error::Forbidden(format!("{user:?} is not a member of conversation {conversation:?}"))
}

/// On a shard's leader, each follower's replication lag from the group's Raft metrics (none
/// elsewhere); `warn` flags the ones that far behind or more (0: none).
fn follower_lags(m: &openraft::RaftMetrics<crate::raft::types::C>, me: NodeId, warn: u64) -> Vec<FollowerLag> {
    let Some(replication) = &m.replication else { return Vec::new() };
    let last = m.last_log_index.unwrap_or(0);
    let mut lags: Vec<FollowerLag> = replication
        .iter()
        .filter(|(peer, _)| **peer != me)
        .map(|(peer, matched)| {
            let entries = last.saturating_sub(matched.as_ref().map_or(0, |l| l.index));
            FollowerLag { node: node_of(*peer), entries, lagging: warn > 0 && entries >= warn }
        })
        .collect();
    lags.sort_by_key(|f| f.node);
    lags
}

/// The answer to one send, from its applied outcome.
fn send_answer(outcome: Outcome, conversation: String) -> Response {
    match outcome {
        Outcome::Appended { offset, ts_ms, duplicate } => Response::Ack { conversation, offset, ts_ms, duplicate },
        Outcome::Rejected { reason } => rejected(&reason),
        other => Refusal::Unexpected(format!("unexpected outcome of a send: {other:?}")).answer(),
    }
}

/// What the service shares with the node's peer server: the registry of hosted groups, where
/// it finds the replica a request is for, and the users' send buckets, which the peers'
/// `UserSends` draw on (see [`rates`]).
pub struct PeerShared {
    pub registry: Groups,
    pub user_rates: Arc<Keyed>,
}

impl Service {
    /// Starts (or restarts) the shard groups of this node over `store`, each under its
    /// replica id in `replicas`, replicating through `net` and registering each in
    /// `shared.registry`, where the peer server finds it. A shard whose storage came back behind its
    /// watermark is refused: it takes no part in its group (it neither votes nor acknowledges)
    /// and this node answers its conversations as unavailable. With `bootstrap`, every group
    /// is initialized with every node as voter (a brand-new cluster, see `raft::formation`).
    pub async fn start(
        config: Config,
        id: NodeId,
        store: Store,
        net: PeerNet,
        shared: PeerShared,
        replicas: &BTreeMap<ShardId, NodeId>,
        bootstrap: bool,
    ) -> Result<Arc<Service>> {
        let PeerShared { registry, user_rates } = shared;
        let raft_config = consensus::raft_config(&config)?;
        let push = Arc::new(PushHub::new(config.shards, config.limits.push_buffer_messages));
        let members = Arc::new(outsiders::MembersCache::default());
        let placement = Arc::new(Notify::new());
        let placement_follow = Arc::new(Notify::new());
        let stop = tokio::sync::watch::channel(false).0;
        let mut groups = HashMap::new();
        let mut meta = None;
        let mut refused = Vec::new();
        for (&shard, &replica) in replicas {
            let events: Arc<dyn ShardEvents> = if shard == META_SHARD {
                Arc::new(MetaEvents(placement.clone(), placement_follow.clone()))
            } else {
                Arc::new(DataEvents { push: push.clone(), members: members.clone(), shards: config.shards })
            };
            let started =
                consensus::start_group(replica, shard, raft_config.clone(), store.clone(), net.clone(), events).await;
            let group = match started {
                Ok(g) => g,
                Err(Error::Corrupt(why)) => {
                    tracing::error!(shard, "{why}");
                    // Recorded, as a moved-in replica's id is: a node holding the shard since
                    // formation has no record, and a drop (a move away, `replace-node`) that
                    // found none would take it for a replica never started here and keep
                    // the damaged data, to be refused again at every start.
                    crate::raft::formation::record_replica(&store, shard, replica)?;
                    refused.push(shard);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let hosted = Hosted { replica, raft: group.raft.clone() };
            registry.write().expect("registry lock is never poisoned at start-up").insert(shard, hosted);
            if shard == META_SHARD {
                meta = Some(group);
            } else {
                groups.insert(shard, group);
            }
        }
        if !refused.is_empty() {
            tracing::error!(
                shards = ?refused,
                "REFUSING these shards: their storage lost what it had fsynced; this node neither votes nor \
                 acknowledges for them. Rebuild the node: stop it, move its data directory away, and run \
                 `convoy node --config {} --id {id} --rejoin`",
                config.path.display()
            );
        }
        if bootstrap {
            for group in groups.values().chain(meta.as_ref()) {
                consensus::initialize_if_pristine(group, &config).await?;
            }
            tracing::info!(shards = config.shards, "initialized every shard group");
        }
        let inflight = Arc::new(Semaphore::new(config.limits.inflight_sends_max));
        let l = &config.limits;
        let counters: Arc<CommitCounters> = Arc::default();
        let metrics: Arc<Metrics> = Arc::default();
        let rates = SendRates {
            users: user_rates,
            conversations: Keyed::new(Rate::new(l.conversation_sends_per_s, l.conversation_sends_burst)),
            connection: Rate::new(l.connection_sends_per_s, l.connection_sends_burst),
        };
        let proposers = groups
            .iter()
            .map(|(&shard, g)| {
                let p = Proposer::start(
                    shard,
                    g.raft.clone(),
                    l.shard_window_sends,
                    l.conversation_queue_sends,
                    counters.clone(),
                    metrics.clone(),
                    store.stages.clone(),
                );
                (shard, p)
            })
            .collect();
        let catch_up = Arc::new(catch_up::CatchUpBudget::new(
            config.limits.catch_up_buffer_bytes,
            config.limits.catch_up_windows_max,
        ));
        let service = Arc::new(Service {
            id,
            config,
            store,
            groups: std::sync::RwLock::new(groups),
            meta: std::sync::RwLock::new(meta),
            placement,
            placement_follow,
            fetched_map: std::sync::Mutex::default(),
            placement_lock: tokio::sync::Mutex::new(()),
            stop_asked: tokio::sync::watch::channel(false).0,
            net: net.clone(),
            registry,
            raft_config,
            proposers: std::sync::RwLock::new(proposers),
            push,
            members,
            inflight,
            scans: Arc::new(Semaphore::new(CATCH_UP_SCANS_MAX)),
            point_reads: Arc::new(Semaphore::new(POINT_READS_MAX)),
            outside_checks: Semaphore::new(OUTSIDE_CHECKS_MAX),
            catch_up,
            rates,
            peer_stats: net.stats(),
            counters,
            metrics,
            stop,
            tasks: std::sync::Mutex::default(),
        });
        let (node, stop) = (Arc::downgrade(&service), service.stop_signal());
        service.spawn_background(balance_leaders(node.clone(), stop.clone()));
        service.spawn_background(init_placement(node.clone(), stop.clone()));
        service.spawn_background(placement::follow(node.clone(), stop.clone()));
        service.spawn_background(placement::coordinate(node.clone(), stop.clone()));
        service.spawn_background(metrics::sample_lag(node.clone(), stop.clone()));
        service.spawn_background(compaction::compact(node.clone(), stop.clone()));
        service.spawn_background(retention::enforce(node.clone(), stop.clone()));
        service.spawn_background(retention::reclaim(node, stop.clone()));
        let beat = Duration::from_millis(service.config.raft.heartbeat_ms);
        service.spawn_background(rates::share(service.rates.users.clone(), net, id, beat, stop));
        Ok(service)
    }

    /// Runs a background loop of this node until it ends; [`Service::shutdown`] waits for it.
    pub(crate) fn spawn_background(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(work));
    }

    /// The signal the background loops end on.
    pub(crate) fn stop_signal(&self) -> StopSignal {
        StopSignal::of(&self.stop)
    }

    /// Whether [`Service::shutdown`] has begun.
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// The node that should lead `shard` when it is healthy: the cluster map's choice, or
    /// before the map is initialized the file's round-robin (the map starts from the same),
    /// so every node leads (and fsyncs for) its share.
    pub fn preferred_leader(&self, map: &ClusterMap, shard: ShardId) -> NodeId {
        if let Some(p) = map.shard(shard) {
            return p.preferred_leader;
        }
        let ids = self.config.node_ids();
        ids[shard as usize % ids.len()]
    }

    /// The cluster map as this node's replica of the metadata group has applied it (empty
    /// when it cannot be read, which is logged); on a node without one, the newest its peers
    /// reported.
    pub fn cluster_map(&self) -> ClusterMap {
        let local = self.meta_group().map(|_| {
            state_machine::cluster_map(&self.store).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading the cluster map");
                ClusterMap::default()
            })
        });
        // A replica a move placed here starts empty and catches up; until then the map its
        // peers reported (before the move) is the newer.
        let fetched = self.fetched_map.lock().unwrap_or_else(|p| p.into_inner());
        match local {
            Some(local) if local.epoch >= fetched.epoch => local,
            _ => fetched.clone(),
        }
    }

    /// This node's replica of the metadata group, if it holds one.
    fn meta_group(&self) -> Option<Group> {
        self.meta.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The metadata group as the peer server hosts it here.
    fn meta_hosted(&self) -> Option<Hosted> {
        self.meta_group().map(|g| Hosted { replica: g.replica, raft: g.raft.clone() })
    }

    /// Fills the cluster map from the file once: done by the metadata group's leader, as
    /// long as the map it applied is empty (a second `Init` changes nothing, so a leader
    /// that had not yet applied the first is harmless).
    async fn init_placement(&self) {
        let Some(h) = self.meta_hosted() else { return };
        let metrics = consensus::metrics_of(&h.raft);
        if self.cluster_map().is_set() || metrics.current_leader != Some(h.replica) {
            return;
        }
        // The formation members: the metadata group's voters, whatever the file has since.
        let members: Vec<NodeId> = metrics.membership_config.membership().voter_ids().map(node_of).collect();
        let nodes = self
            .config
            .nodes
            .iter()
            .filter(|n| members.contains(&n.id))
            .map(|n| NodeEntry {
                id: n.id,
                peer_addr: n.peer_addr.to_string(),
                client_addr: n.client_addr.to_string(),
                state: NodeState::Active,
            })
            .collect();
        let command = PlacementCommand::Init { nodes, shards: self.config.shards };
        match meta::propose(&h, command).await {
            crate::raft::rpc::PeerResponse::Placed { epoch, .. } => {
                tracing::info!(epoch, "initialized the cluster map from the configuration")
            }
            other => tracing::warn!(answer = ?other, "initializing the cluster map"),
        }
    }

    /// An admin's change to the cluster map (an admin only), applied by the metadata
    /// group's leader wherever it is; answered `Placed` once applied:
    /// - a preferred leader (`transfer-leader`): the node leading the shard hands leadership
    ///   over once the new one's replica has the whole log;
    /// - a move's start or cancel: the coordinator carries it out (`placement::coordinate`).
    pub async fn admin_place(&self, who: &Identity, command: PlacementCommand) -> Response {
        if !who.admin {
            return error(ErrorCode::Forbidden, format!("user {:?} is not an admin", who.user));
        }
        let allowed = matches!(
            command,
            PlacementCommand::SetPreferredLeader { .. }
                | PlacementCommand::StartMove { .. }
                | PlacementCommand::CancelMove { .. }
                | PlacementCommand::Drain { .. }
                | PlacementCommand::RemoveNode { .. }
                | PlacementCommand::MarkLost { .. }
                | PlacementCommand::Recommission { .. }
        );
        if !allowed {
            return error(ErrorCode::InvalidInput, "not a change an operator asks for");
        }
        if !self.cluster_map().is_set() && self.meta_group().is_some() {
            // Transient: the metadata group's first leader fills it within moments.
            return error(ErrorCode::Unavailable, "the cluster map is not initialized yet; retry in a moment");
        }
        let deadline = std::time::Instant::now() + meta::PLACE_TTL;
        let nodes = self.config.node_ids();
        match meta::place(&self.net, self.id, self.meta_hosted().as_ref(), &nodes, command, deadline).await {
            Ok(Placed::Applied { epoch, changed }) => {
                self.placement.notify_one();
                Response::Placed { epoch, changed }
            }
            Ok(Placed::Refused(why)) => error(ErrorCode::Rejected, why),
            Err(why) => error(ErrorCode::Unavailable, why),
        }
    }

    /// `answer` with this node's routing map on its `NotLeader` (the first one, in a batch),
    /// so the client learns where the shard is now and how to reach nodes its file does not
    /// name. Other answers pass unchanged. Applied at the edge, to every answer written.
    pub fn routed(&self, answer: Response) -> Response {
        match answer {
            Response::NotLeader { shard, leader, map: None } => {
                Response::NotLeader { shard, leader, map: self.routing_map() }
            }
            Response::Batch(mut answers) => {
                if let Some(Response::NotLeader { map: map @ None, .. }) =
                    answers.iter_mut().find(|a| matches!(a, Response::NotLeader { .. }))
                {
                    *map = self.routing_map();
                }
                Response::Batch(answers)
            }
            other => other,
        }
    }

    /// The routing part of the cluster map, once the map is set.
    pub fn routing_map(&self) -> Option<Box<RoutingMap>> {
        let map = self.cluster_map();
        map.is_set().then(|| Box::new(map.routing()))
    }

    /// The group of `conversation`'s shard here; else the answer: invalid for a bad id, and
    /// `NotLeader` naming a node that holds the shard (from the cluster map) when this node
    /// does not, so the client goes there (a shard moved away, or never placed here).
    fn hosting(&self, conversation: &str) -> std::result::Result<Group, Refusal> {
        chat::validate_id("conversation", conversation).map_err(Refusal::Invalid)?;
        let shard = chat::shard_of(conversation, self.config.shards);
        self.group(shard).map_err(|_| Refusal::NotLeader { shard, leader: self.holder_of(shard) })
    }

    /// A node other than this one that the cluster map places `shard` on: its preferred
    /// leader, else one of its voters.
    fn holder_of(&self, shard: ShardId) -> Option<NodeId> {
        let map = self.cluster_map();
        let placed = map.shard(shard);
        placed
            .map(|p| p.preferred_leader)
            .filter(|&l| l != self.id)
            .or_else(|| placed.and_then(|p| p.voters.iter().copied().find(|&v| v != self.id)))
    }

    /// `Ok` while this node runs `shard`'s group; else `NotLeader` naming a node that holds
    /// it. A subscription checks this whenever it goes back to storage: a replica that left
    /// (a move deleted its data) must send its readers elsewhere, never leave them waiting
    /// for pushes that no longer come.
    fn still_hosting(&self, shard: ShardId) -> Result<()> {
        match self.group(shard) {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::NotLeader { shard, leader: self.holder_of(shard) }),
        }
    }

    /// Whether this replica of a group is in touch with its leader: it has one, and that is
    /// this replica with a quorum's acknowledgement, or another node whose beats
    /// (`raft::quiesce`, every heartbeat interval) came, recently — within [`LEADER_CHECK`],
    /// three heartbeat intervals and the longest election timeout, whichever is longest (a
    /// quiesced leader renews its lease only every half election timeout). openraft's
    /// pre-vote keeps a cut-off follower's leader as it was, so a leader alone says nothing.
    fn in_touch(&self, group: &Group) -> bool {
        use openraft::async_runtime::WatchReceiver;
        use openraft::Instant as _;
        let r = &self.config.raft;
        let fresh = Duration::from_millis(
            (LEADER_CHECK.as_millis() as u64).max(3 * r.heartbeat_ms).max(r.election_timeout_ms_max),
        );
        let (leader, acked) = {
            let m = group.raft.metrics();
            let m = m.borrow_watched();
            (m.current_leader, m.last_quorum_acked.as_ref().map(|at| at.elapsed()))
        };
        match leader {
            None => false,
            Some(l) if l == group.replica => acked.is_none_or(|age| age < fresh),
            Some(l) => self.net.quiescer().is_none_or(|q| q.heard_within(node_of(l), fresh, std::time::Instant::now())),
        }
    }

    /// `Unavailable` while this node's replica of `shard` is rebuilding its state after its
    /// start ([`consensus::Rebuilt`]): a read here must not show less than this replica
    /// showed before. The client reads from another replica meanwhile, or waits.
    fn rebuilt(&self, shard: ShardId) -> Result<()> {
        let group = self.group(shard)?;
        group.rebuilt.check(|| consensus::metrics_of(&group.raft)).map_err(|why| {
            Error::Unavailable(format!(
                "shard {shard}'s replica here is rebuilding its state after a restart ({why}); another replica \
                 can serve this read"
            ))
        })
    }

    /// The group of `shard`, if this node runs it.
    fn group(&self, shard: ShardId) -> Result<Group> {
        let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
        groups.get(&shard).cloned().ok_or_else(|| Error::Unavailable(format!("shard {shard} is not hosted here")))
    }

    /// Every shard group this node runs now, by shard.
    pub fn groups(&self) -> Vec<Group> {
        let mut all: Vec<Group> = self.groups.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        all.sort_by_key(|g| g.shard);
        all
    }

    /// Proposes a command on the shard's leader (this node), through the shard's fair
    /// scheduler ([`propose`]). It takes one in-flight permit per send it carries (one for a
    /// cursor), held until the outcome is known. `done` receives the outcome exactly once —
    /// from the state machine's task when the entry is applied, or with the answer for
    /// everything the command carried (not leader, outcome unknown) — unless the group stops
    /// first, which drops it uncalled. An `Err` here is the immediate answer (throttled,
    /// group stopped); `done` is then dropped.
    async fn propose_then(
        &self,
        group: &Group,
        command: Command,
        done: impl FnOnce(Proposed) + Send + 'static,
    ) -> std::result::Result<(), Refusal> {
        let sends = propose::sends_of(&command);
        // Below the disk reserve nothing a client asked is proposed; trims still are: they
        // give space back.
        let space = &self.store.space;
        if space.low() && !matches!(command, Command::Trim(_) | Command::TrimUnder(_)) {
            return Err(Refusal::Unavailable(format!(
                "{DISK_FULL} on node {}: {} bytes free, below limits.disk_free_min_bytes ({}); writes resume once \
                 space is freed, reads go on",
                self.id,
                space.free(),
                space.min()
            )));
        }
        let Ok(permits) = self.inflight.clone().try_acquire_many_owned(sends.max(1)) else {
            self.metrics.throttled(Throttle::Inflight, u64::from(sends));
            return Err(Refusal::Throttled { retry_after_ms: THROTTLE_RETRY_MS });
        };
        let proposer = self.proposers.read().unwrap_or_else(|p| p.into_inner()).get(&group.shard).cloned();
        let Some(proposer) = proposer else {
            return Err(Refusal::Unavailable(format!("shard {} is not hosted here", group.shard)));
        };
        proposer.propose(command, Some(permits), done).await
    }

    /// [`Service::propose_then`], waiting for the outcome at most [`SEND_TIMEOUT`]. An `Err` is
    /// the answer for everything the command carried (throttled, not leader, unknown outcome).
    async fn propose(&self, group: &Group, command: Command) -> Proposed {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.propose_then(group, command, move |outcome| {
            let _ = tx.send(outcome);
        })
        .await?;
        match tokio::time::timeout(SEND_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(stopped_before_outcome()),
            Err(_) => Err(no_commit_in_time()),
        }
    }

    /// Validates a send and stamps it: its shard and command, or the error answer.
    fn prepare_send(&self, who: &Identity, req: SendRequest) -> std::result::Result<(ShardId, SendCommand), Refusal> {
        let shard = self.hosting(&req.conversation)?.shard;
        if !req.sender.is_empty() {
            must_be(who, &req.sender)?;
        }
        let max = self.config.limits.message_bytes_max;
        if req.text.len() > max {
            return Err(Refusal::Invalid(format!("message is {} bytes, limit {max}", req.text.len())));
        }
        Ok((
            shard,
            SendCommand {
                conversation: req.conversation,
                sender: who.user.clone(),
                client_id: req.client_id,
                client_seq: req.client_seq,
                ts_ms: now_ms(),
                text: req.text,
            },
        ))
    }

    /// Handles a send or a batch of sends (see the module doc) and hands the answer to
    /// `reply`, called at most once: `Some(answer)` is the answer known at once (invalid,
    /// throttled, or a batch that spans shards, which is awaited here), and `reply` is
    /// dropped; `None` means `reply` will be called from the state machine's task when the
    /// proposal is applied or refused — or dropped uncalled if the group stops first. The
    /// caller bounds the wait.
    pub async fn send_replying(
        &self,
        who: &Identity,
        connection: &std::sync::Mutex<Bucket>,
        request: Request,
        reply: impl FnOnce(Response) + Send + 'static,
    ) -> Option<Response> {
        let sends = match &request {
            Request::SendBatch(b) => b.len(),
            _ => 1,
        };
        let metrics = self.metrics.clone();
        let counted = move |answer: Response| {
            metrics.sends_answered(&answer, sends);
            reply(answer)
        };
        let now = self.send_replying_uncounted(who, connection, request, counted).await;
        if let Some(answer) = &now {
            self.metrics.sends_answered(answer, sends);
        }
        now
    }

    /// [`Service::send_replying`] without counting the answers.
    async fn send_replying_uncounted(
        &self,
        who: &Identity,
        connection: &std::sync::Mutex<Bucket>,
        request: Request,
        reply: impl FnOnce(Response) + Send + 'static,
    ) -> Option<Response> {
        if let Some(answer) = self.sends_led_elsewhere(&request) {
            return Some(answer);
        }
        // Sends from outside their conversation take no conversation's tokens, and are
        // answered here once the leader confirmed they are (see `outsiders`).
        let outside = self.outside_sends(who, &request);
        if let Err(refusal) = self.within_rates(who, connection, &request, &outside) {
            return Some(refusal.answer());
        }
        let mut answered = match &request {
            _ if !outside.contains(&true) => Vec::new(),
            Request::Send(r) => self.confirm_outside_sends(who, std::slice::from_ref(r), &outside).await,
            Request::SendBatch(rs) => self.confirm_outside_sends(who, rs, &outside).await,
            _ => Vec::new(),
        };
        if outside.contains(&true) {
            self.outside_sends_going_on(&request, &outside, &answered);
        }
        match request {
            Request::Send(_) if !answered.is_empty() => answered.pop().map(|(_, answer)| answer),
            Request::Send(req) => {
                let (shard, command) = match self.prepare_send(who, req) {
                    Ok(p) => p,
                    Err(refusal) => return Some(refusal.answer()),
                };
                let conversation = command.conversation.clone();
                let done = move |outcome: Proposed| {
                    reply(match outcome {
                        Ok(outcome) => send_answer(outcome, conversation),
                        Err(refusal) => refusal.answer(),
                    })
                };
                let group = match self.group(shard) {
                    Ok(g) => g,
                    Err(e) => return Some(error(ErrorCode::Unavailable, e.to_string())),
                };
                self.propose_then(&group, Command::Send(command), done).await.err().map(Refusal::answer)
            }
            Request::SendBatch(reqs) => {
                let (answers, by_shard) = match self.prepare_batch(who, reqs, answered) {
                    Ok(prepared) => prepared,
                    Err(refusal) => return Some(refusal.answer()),
                };
                let (mut parts, split) = proposals_of(by_shard, |shard, sends| self.would_queue(shard, sends));
                if split {
                    self.metrics.batches_split.fetch_add(1, Ordering::Relaxed);
                }
                // The usual batch — every send valid, one shard (the client batches per
                // shard), proposed whole — is answered from the state machine's task like a
                // single send.
                if parts.len() == 1 && answers.iter().all(Option::is_none) {
                    if let Some((shard, _, commands)) = parts.pop() {
                        let conversations: Vec<String> = commands.iter().map(|c| c.conversation.clone()).collect();
                        let done = move |outcome| reply(Response::Batch(batch_answers(outcome, conversations)));
                        let group = match self.group(shard) {
                            Ok(g) => g,
                            Err(e) => return Some(error(ErrorCode::Unavailable, e.to_string())),
                        };
                        return self
                            .propose_then(&group, Command::SendBatch(commands), done)
                            .await
                            .err()
                            .map(Refusal::answer);
                    }
                }
                Some(self.send_batch_awaited(answers, parts).await)
            }
            other => Some(error(ErrorCode::Protocol, format!("not a send: {other:?}"))),
        }
    }

    /// A fresh connection's send bucket (see [`rates`]).
    pub fn connection_bucket(&self) -> std::sync::Mutex<Bucket> {
        std::sync::Mutex::new(Bucket::full(self.rates.connection, std::time::Instant::now()))
    }

    /// Takes the send's (or batch's) tokens from the user's, the conversations' and the
    /// connection's buckets, or answers `Throttled` with the wait. The sends `outside` marks
    /// take none of their conversation's.
    fn within_rates(
        &self,
        who: &Identity,
        connection: &std::sync::Mutex<Bucket>,
        request: &Request,
        outside: &[bool],
    ) -> std::result::Result<(), Refusal> {
        let sends: &[SendRequest] = match request {
            Request::Send(r) => std::slice::from_ref(r),
            Request::SendBatch(rs) => &rs[..rs.len().min(SEND_BATCH_MAX)],
            _ => return Ok(()),
        };
        let mut counts: Vec<(&str, usize)> = Vec::new();
        // A conversation name that is not valid is refused after this check, and never keys a
        // rate bucket: the buckets would keep whatever a frame can carry (a megabyte a name).
        let inside =
            sends.iter().enumerate().filter(|(i, _)| !outside.get(*i).copied().unwrap_or(false)).map(|(_, r)| r);
        for r in inside.filter(|r| chat::validate_id("conversation", &r.conversation).is_ok()) {
            match counts.iter_mut().find(|(x, _)| *x == r.conversation) {
                Some(slot) => slot.1 += 1,
                None => counts.push((&r.conversation, 1)),
            }
        }
        let outsiders = outside.iter().filter(|&&o| o).count();
        self.take_tokens(who, &counts, outsiders, connection, sends.len() as u64)
    }

    /// Takes `counts` (sends per conversation) from the user's, the conversations' and the
    /// connection's buckets, and `outside` more from the user's and the connection's only,
    /// or answers `Throttled` with the wait; a refusal is counted as `sends` throttled sends
    /// (0 for other changes).
    fn take_tokens(
        &self,
        who: &Identity,
        counts: &[(&str, usize)],
        outside: usize,
        connection: &std::sync::Mutex<Bucket>,
        sends: u64,
    ) -> std::result::Result<(), Refusal> {
        let now = std::time::Instant::now();
        match self.rates.take_with_outside(&who.user, counts, outside, connection, now) {
            Ok(()) => Ok(()),
            Err((retry_after_ms, reason)) => {
                self.metrics.throttled(reason, sends);
                tracing::debug!(user = %who.user, reason = reason.name(), retry_after_ms, "throttled");
                Err(Refusal::Throttled { retry_after_ms })
            }
        }
    }

    /// Takes a change's tokens from the same buckets as sends, or answers `Throttled`: a
    /// cursor move, a membership or retention change is a log entry, replicated and fsynced
    /// like a send, so it counts against the user's, the conversation's and the
    /// connection's rates as one (a creation, one more per 64 names it lists). Any other
    /// request passes. A change that apply would refuse for who asks (a cursor move, an
    /// addition, a removal or a retention change by a user who is not a member, retention by
    /// an admin excepted; a creation of a conversation that exists) takes none of the
    /// conversation's tokens and is answered here once the leader confirmed it (see
    /// [`outsiders`]).
    pub async fn admit_change(
        &self,
        who: &Identity,
        connection: &std::sync::Mutex<Bucket>,
        request: &Request,
    ) -> std::result::Result<(), Response> {
        let (conversation, cost, check) = match request {
            Request::SetCursor { conversation, .. } => (conversation, 1, Some(Check::Member)),
            Request::SetRetention { conversation, .. } => (conversation, 1, (!who.admin).then_some(Check::Member)),
            Request::Members { conversation, change: MemberChange::Change(change) } => match change {
                chat::Membership::Create { members } => (conversation, 1 + members.len() / 64, Some(Check::Absent)),
                _ => (conversation, 1, Some(Check::Member)),
            },
            _ => return Ok(()),
        };
        // An invalid name is refused after this check and never keys a bucket.
        if chat::validate_id("conversation", conversation).is_err() {
            return Ok(());
        }
        // A replica that follows another node, or a node without one, answers `NotLeader`
        // before anything is charged: the leader charges.
        let shard = chat::shard_of(conversation, self.config.shards);
        if let Some(answer) = self.not_led_here(shard) {
            return Err(answer);
        }
        // Only a change valid in all else is answered as an outsider's: a malformed one gets
        // the error that names what is wrong, from the usual path.
        let valid = match request {
            Request::SetCursor { user, .. } => *user == who.user,
            Request::SetRetention { retention, .. } => retention.validate().is_ok(),
            Request::Members { change: MemberChange::Change(change), .. } => match change {
                chat::Membership::Create { members } => {
                    members.len() < chat::MEMBERS_MAX && members.iter().all(|u| chat::validate_id("user", u).is_ok())
                }
                chat::Membership::Add { user } | chat::Membership::Remove { user } => {
                    chat::validate_id("user", user).is_ok()
                }
            },
            _ => false,
        };
        let looks_refused = valid
            && match check {
                Some(Check::Member) => self.member_here(conversation, &who.user) == Some(false),
                Some(Check::Absent) => self.member_here(conversation, &who.user).is_some(),
                None => false,
            };
        if !looks_refused {
            return self.take_tokens(who, &[(conversation.as_str(), cost)], 0, connection, 0).map_err(Refusal::answer);
        }
        self.take_tokens(who, &[], cost, connection, 0).map_err(Refusal::answer)?;
        let write = match check {
            Some(Check::Absent) => Outside::Create(conversation.clone()),
            _ => Outside::Change(conversation.clone()),
        };
        if let Some(answer) = self.confirm_outside(shard, &who.user, vec![write]).await.pop().flatten() {
            return Err(answer);
        }
        // It goes on after all: it is written, so it spends the conversation's rate.
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        self.rates.conversations.debit(&[(conversation.as_str(), cost)], std::time::Instant::now());
        Ok(())
    }

    /// `NotLeader` for a write to `shard` if this node runs no replica of it, or one that
    /// follows another node (as its Raft metrics have it): answered before the write takes
    /// any tokens (see [`Service::sends_led_elsewhere`]). One look at the groups.
    fn not_led_here(&self, shard: ShardId) -> Option<Response> {
        use openraft::async_runtime::WatchReceiver;
        let leader = match self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&shard) {
            Some(group) => {
                let leader = group.raft.metrics().borrow_watched().current_leader?;
                Some(node_of((leader != group.replica).then_some(leader)?))
            }
            None => None,
        };
        let leader = leader.or_else(|| self.holder_of(shard));
        Some(Refusal::NotLeader { shard, leader }.answer())
    }

    /// `NotLeader` for a send, or a batch of sends all to one shard, that this node would
    /// not propose as the shard's leader (it runs no replica of the shard, or one that
    /// follows another node): answered before the sends take any tokens, so that a client
    /// sent on to the leader is charged once, there (the user's bucket is shared by the
    /// nodes). A batch over several shards, or over [`SEND_BATCH_MAX`], goes the usual way.
    fn sends_led_elsewhere(&self, request: &Request) -> Option<Response> {
        let sends: &[SendRequest] = match request {
            Request::Send(r) => std::slice::from_ref(r),
            Request::SendBatch(rs) if rs.len() <= SEND_BATCH_MAX => rs,
            _ => return None,
        };
        let first = &sends.first()?.conversation;
        chat::validate_id("conversation", first).ok()?;
        let shard = chat::shard_of(first, self.config.shards);
        if sends.iter().any(|r| chat::shard_of(&r.conversation, self.config.shards) != shard) {
            return None;
        }
        let answer = self.not_led_here(shard)?;
        Some(match request {
            Request::SendBatch(_) => Response::Batch(vec![answer; sends.len()]),
            _ => answer,
        })
    }

    /// Whether `user` is a member of `conversation` by the members this node applied, if a
    /// shard this node runs holds it and the conversation exists (see [`outsiders`]): a
    /// hint.
    fn member_here(&self, conversation: &str, user: &str) -> Option<bool> {
        let shard = chat::shard_of(conversation, self.config.shards);
        if !self.groups.read().unwrap_or_else(|p| p.into_inner()).contains_key(&shard) {
            return None;
        }
        self.members.member(conversation, user, || self.store.members(shard, conversation))
    }

    /// Which sends of `request` look like they come from outside their conversation
    /// ([`Service::member_here`]), by index.
    fn outside_sends(&self, who: &Identity, request: &Request) -> Vec<bool> {
        let sends: &[SendRequest] = match request {
            Request::Send(r) => std::slice::from_ref(r),
            // Refused whole by `prepare_batch`.
            Request::SendBatch(rs) if rs.len() > SEND_BATCH_MAX => return Vec::new(),
            Request::SendBatch(rs) => rs,
            _ => return Vec::new(),
        };
        // Only a send valid in all else is answered as an outsider's: a malformed one gets
        // the error that names what is wrong, from the usual path.
        let valid = |r: &SendRequest| {
            chat::validate_id("conversation", &r.conversation).is_ok()
                && (r.sender.is_empty() || r.sender == who.user)
                && r.text.len() <= self.config.limits.message_bytes_max
        };
        sends.iter().map(|r| valid(r) && self.member_here(&r.conversation, &who.user) == Some(false)).collect()
    }

    /// The sends `outside` marks that the check let go on (not in `answered`) are charged to
    /// their conversations now: they were admitted, and are written like any member's.
    fn outside_sends_going_on(&self, request: &Request, outside: &[bool], answered: &[(usize, Response)]) {
        let sends: &[SendRequest] = match request {
            Request::Send(r) => std::slice::from_ref(r),
            Request::SendBatch(rs) => rs,
            _ => return,
        };
        let going_on: Vec<usize> = (0..sends.len())
            .filter(|i| outside.get(*i).copied().unwrap_or(false) && !answered.iter().any(|(a, _)| a == i))
            .collect();
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for &i in &going_on {
            *counts.entry(sends[i].conversation.as_str()).or_default() += 1;
        }
        let counts: Vec<(&str, u32)> = counts.into_iter().collect();
        self.rates.conversations.debit(&counts, std::time::Instant::now());
    }

    /// The answers, by index into `sends`, of the sends `outside` marks that the leader
    /// answers itself ([`Service::confirm_outside`]); the others go on.
    async fn confirm_outside_sends(
        &self,
        who: &Identity,
        sends: &[SendRequest],
        outside: &[bool],
    ) -> Vec<(usize, Response)> {
        let mut by_shard: BTreeMap<ShardId, Vec<usize>> = BTreeMap::new();
        for (i, r) in sends.iter().enumerate().filter(|(i, _)| outside.get(*i).copied().unwrap_or(false)) {
            by_shard.entry(chat::shard_of(&r.conversation, self.config.shards)).or_default().push(i);
        }
        let mut answered = Vec::new();
        for (shard, slots) in by_shard {
            let writes = slots
                .iter()
                .map(|&i| {
                    let r = &sends[i];
                    let key = chat::DedupKey {
                        conversation: r.conversation.clone(),
                        sender: who.user.clone(),
                        client_id: r.client_id,
                        client_seq: r.client_seq,
                    };
                    Outside::Send(key, chat::text_digest(&r.text))
                })
                .collect();
            let answers = self.confirm_outside(shard, &who.user, writes).await;
            answered.extend(slots.into_iter().zip(answers).filter_map(|(i, a)| a.map(|a| (i, a))));
        }
        answered
    }

    /// Answers these writes by `user` to conversations of `shard`, each as apply would,
    /// where apply would refuse it for who asks, from this node's state machine once the
    /// shard's leader here confirmed a read index (a quorum still follows it, and everything
    /// committed before is applied): a write to a conversation `user` is not a member of
    /// (for a send whose idempotency key is stored, a removed member's retry of a send
    /// stored before the removal, its offset, or `SeqReused` for another text), or a
    /// creation of one that exists. `None` for a write to go on; for all of them, if the
    /// read index cannot be confirmed here (not the leader, no quorum in time) or storage
    /// cannot be read: apply decides.
    async fn confirm_outside(&self, shard: ShardId, user: &str, writes: Vec<Outside>) -> Vec<Option<Response>> {
        let none = vec![None; writes.len()];
        let Ok(_checking) = self.outside_checks.try_acquire() else {
            self.metrics.throttled(Throttle::Inflight, writes.len() as u64);
            return vec![Some(Refusal::Throttled { retry_after_ms: THROTTLE_RETRY_MS }.answer()); writes.len()];
        };
        let Ok(group) = self.group(shard) else { return none };
        let confirmed = group.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex);
        if !matches!(tokio::time::timeout(SEND_TIMEOUT, confirmed).await, Ok(Ok(_))) {
            return none;
        }
        let (store, user) = (self.store.clone(), user.to_string());
        let read = point_read(&self.point_reads, "checking an outsider's writes", move || {
            let answer = |write: &Outside| -> Result<Option<Response>> {
                let conversation = write.conversation();
                let key = match write {
                    Outside::Send(key, _) => Some(key),
                    _ => None,
                };
                let (members, head, stored) = store.writer_view(shard, conversation, key)?;
                let outsider = members.as_ref().is_some_and(|m| !m.contains(&user));
                Ok(match write {
                    Outside::Create(_) if members.is_some() || head > 0 => Some(rejected(&chat::Rejection::Exists)),
                    Outside::Create(_) => None,
                    _ if !outsider => None,
                    Outside::Change(_) => Some(not_a_member_answer(&user)),
                    Outside::Send(_, digest) => Some(match stored {
                        None => not_a_member_answer(&user),
                        Some(found) if found.digest != *digest => {
                            rejected(&chat::Rejection::SeqReused { conversation: conversation.to_string() })
                        }
                        Some(found) => send_answer(
                            Outcome::Appended { offset: found.offset, ts_ms: found.ts_ms, duplicate: true },
                            conversation.to_string(),
                        ),
                    }),
                })
            };
            writes.iter().map(answer).collect::<Result<Vec<_>>>()
        })
        .await;
        read.unwrap_or(none)
    }

    /// Validates each send of a batch on its own: the answers of the invalid ones by slot,
    /// and the valid ones grouped by shard with their slots.
    fn prepare_batch(
        &self,
        who: &Identity,
        reqs: Vec<SendRequest>,
        answered: Vec<(usize, Response)>,
    ) -> std::result::Result<PreparedBatch, Refusal> {
        if reqs.len() > SEND_BATCH_MAX {
            return Err(Refusal::Invalid(format!("{} sends in one batch, limit {SEND_BATCH_MAX}", reqs.len())));
        }
        let mut answers: Vec<Option<Response>> = vec![None; reqs.len()];
        for (i, answer) in answered {
            answers[i] = Some(answer);
        }
        let mut by_shard = ByShard::new();
        for (i, req) in reqs.into_iter().enumerate() {
            if answers[i].is_some() {
                continue;
            }
            match self.prepare_send(who, req) {
                Ok((shard, command)) => {
                    let (slots, commands) = by_shard.entry(shard).or_default();
                    slots.push(i);
                    commands.push(command);
                }
                Err(refusal) => answers[i] = Some(refusal.answer()),
            }
        }
        Ok((answers, by_shard))
    }

    /// Whether a proposal of `sends` sends to `shard` would wait for its turn here.
    fn would_queue(&self, shard: ShardId, sends: u32) -> bool {
        let proposer = self.proposers.read().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned();
        proposer.is_some_and(|p| p.would_queue(sends))
    }

    /// A batch's valid sends proposed as one `SendBatch` entry per part (concurrently), each
    /// answered as it would have been alone; `answers` holds the invalid ones' answers.
    async fn send_batch_awaited(&self, mut answers: Vec<Option<Response>>, parts: Vec<BatchPart>) -> Response {
        let proposals = parts.into_iter().map(|(shard, slots, commands)| async move {
            let conversations: Vec<String> = commands.iter().map(|c| c.conversation.clone()).collect();
            let outcome = match self.group(shard) {
                Ok(group) => self.propose(&group, Command::SendBatch(commands)).await,
                Err(e) => Err(Refusal::Unavailable(e.to_string())),
            };
            (slots, batch_answers(outcome, conversations))
        });
        for (slots, shard_answers) in futures::future::join_all(proposals).await {
            for (slot, answer) in slots.into_iter().zip(shard_answers) {
                answers[slot] = Some(answer);
            }
        }
        Response::Batch(
            answers.into_iter().map(|a| a.unwrap_or_else(|| error(ErrorCode::Protocol, "send not answered"))).collect(),
        )
    }

    /// Moves the caller's read cursor forward.
    pub async fn set_cursor(&self, who: &Identity, user: String, conversation: String, offset: u64) -> Response {
        if let Err(refusal) = must_be(who, &user) {
            return refusal.answer();
        }
        let group = match self.hosting(&conversation) {
            Ok(g) => g,
            Err(refusal) => return refusal.answer(),
        };
        let shard = group.shard;
        let (store, c) = (self.store.clone(), conversation.clone());
        let command = Command::Cursor(CursorCommand { user, conversation, offset });
        match self.propose(&group, command).await {
            Ok(Outcome::CursorAt { offset }) => {
                // Answered as a cursor read answers it: below what retention kept, the cursor
                // reads as having read everything before the earliest retained message.
                match point_read(&self.point_reads, "reading a conversation's span", move || store.span(shard, &c))
                    .await
                {
                    Ok((earliest, head)) => Response::Cursor { offset: offset.max(earliest.saturating_sub(1)), head },
                    Err(_) => Response::Cursor { offset, head: 0 },
                }
            }
            Ok(Outcome::Rejected { reason }) => rejected(&reason),
            Ok(other) => Refusal::Unexpected(format!("unexpected outcome of a cursor move: {other:?}")).answer(),
            Err(refusal) => refusal.answer(),
        }
    }

    /// Reads the caller's cursor and the head from this replica (members only).
    pub async fn get_cursor(&self, who: &Identity, user: String, conversation: String) -> Response {
        if let Err(refusal) = must_be(who, &user) {
            return refusal.answer();
        }
        match self.hosting(&conversation) {
            Ok(g) => self.read_cursor(g.shard, user, conversation).await,
            Err(refusal) => refusal.answer(),
        }
    }

    /// Reads the caller's cursor and the head on the shard's leader, once a quorum confirmed
    /// that it still leads and its state machine applied what it had committed then (a read
    /// index): a cursor move acknowledged before this read is in it. A follower, or a leader
    /// deposed without knowing it, would answer from behind.
    pub async fn get_cursor_from_leader(&self, who: &Identity, user: String, conversation: String) -> Response {
        if let Err(refusal) = must_be(who, &user) {
            return refusal.answer();
        }
        let group = match self.hosting(&conversation) {
            Ok(g) => g,
            Err(refusal) => return refusal.answer(),
        };
        let shard = group.shard;
        let confirmed = group.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex);
        match tokio::time::timeout(SEND_TIMEOUT, confirmed).await {
            Ok(Ok(_)) => self.read_cursor(shard, user, conversation).await,
            Ok(Err(openraft::error::RaftError::APIError(openraft::error::LinearizableReadError::ForwardToLeader(
                f,
            )))) => Refusal::NotLeader { shard, leader: f.leader_id.map(node_of) }.answer(),
            Ok(Err(e)) => error(ErrorCode::Unavailable, format!("shard {shard}: {e}")),
            Err(_) => error(
                ErrorCode::Unavailable,
                format!("shard {shard}: a quorum did not confirm this node's leadership within {SEND_TIMEOUT:?}"),
            ),
        }
    }

    /// The caller's cursor and the head as this replica has them, with the membership check,
    /// all from one view of its state (refused while a snapshot install replaces it).
    async fn read_cursor(&self, shard: ShardId, user: String, conversation: String) -> Response {
        if let Err(e) = self.rebuilt(shard) {
            return error(ErrorCode::Unavailable, e.to_string());
        }
        let store = self.store.clone();
        let read = point_read(&self.point_reads, "reading a cursor", move || {
            let view = store.cursor_view(shard, &user, &conversation)?;
            if let Access::Ended { .. } = access_of(view.members.as_ref(), &user) {
                return Err(not_a_member(&user, &conversation));
            }
            // A cursor below what retention kept reads as having read everything before the
            // earliest retained message: that one is the next to read.
            Ok((view.cursor.max(view.earliest.saturating_sub(1)), view.head))
        })
        .await;
        match read {
            Ok((offset, head)) => Response::Cursor { offset, head },
            Err(e @ Error::Forbidden(_)) => error(ErrorCode::Forbidden, e.to_string()),
            Err(e) => error(ErrorCode::Unavailable, e.to_string()),
        }
    }

    /// Shows (from this replica) or changes (on the leader) a conversation's members, for
    /// a member.
    pub async fn members(&self, who: &Identity, conversation: String, change: MemberChange) -> Response {
        let group = match self.hosting(&conversation) {
            Ok(g) => g,
            Err(refusal) => return refusal.answer(),
        };
        let change = match change {
            MemberChange::Show => {
                if let Err(e) = self.rebuilt(group.shard) {
                    return error(ErrorCode::Unavailable, e.to_string());
                }
                let (store, shard, user) = (self.store.clone(), group.shard, who.user.clone());
                let read = point_read(&self.point_reads, "reading a conversation's members", move || {
                    let members = store.members(shard, &conversation)?;
                    match members {
                        Some(m) if m.contains(&user) => {
                            Ok((m.users.into_iter().collect(), store.head(shard, &conversation)?))
                        }
                        _ => Err(not_a_member(&user, &conversation)),
                    }
                })
                .await;
                return match read {
                    Ok((members, head)) => Response::Members { members, head },
                    Err(e @ Error::Forbidden(_)) => error(ErrorCode::Forbidden, e.to_string()),
                    Err(e) => error(ErrorCode::Unavailable, e.to_string()),
                };
            }
            MemberChange::Change(change) => change,
        };
        let command = MembersCommand { conversation, by: who.user.clone(), change };
        // Checked before it is proposed: a bad list must not cost the log an entry, replicated
        // and decoded by every replica, before apply refuses it.
        if let chat::Membership::Create { members } = &command.change {
            // As apply counts them: the names, and the creator, each once.
            let mut users: std::collections::BTreeSet<&str> = members.iter().map(String::as_str).collect();
            users.insert(&command.by);
            if users.len() > chat::MEMBERS_MAX {
                return rejected(&chat::Rejection::TooManyMembers { max: chat::MEMBERS_MAX });
            }
        }
        if let Err(reason) = chat::check_member_ids(&command) {
            return rejected(&reason);
        }
        match self.propose(&group, Command::Members(command)).await {
            Ok(Outcome::Members { members, head }) => Response::Members { members, head },
            Ok(Outcome::Rejected { reason }) => rejected(&reason),
            Ok(other) => Refusal::Unexpected(format!("unexpected outcome of a membership change: {other:?}")).answer(),
            Err(refusal) => refusal.answer(),
        }
    }

    /// Sets a conversation's retention, for a member or an admin (see `chat`).
    pub async fn set_retention(&self, who: &Identity, conversation: String, retention: Retention) -> Response {
        let group = match self.hosting(&conversation) {
            Ok(g) => g,
            Err(refusal) => return refusal.answer(),
        };
        if let Err(m) = retention.validate() {
            return error(ErrorCode::InvalidInput, m);
        }
        let command =
            Command::SetRetention(RetentionCommand { conversation, by: who.user.clone(), admin: who.admin, retention });
        match self.propose(&group, command).await {
            Ok(Outcome::RetentionSet { retention }) => {
                Response::Retention { set: retention, effective: retention.or(self.config.retention_default) }
            }
            Ok(Outcome::Rejected { reason }) => rejected(&reason),
            Ok(other) => Refusal::Unexpected(format!("unexpected outcome of a retention change: {other:?}")).answer(),
            Err(refusal) => refusal.answer(),
        }
    }

    /// Whether `user` may read `conversation` of `shard`, by this replica's stored members
    /// (`Unavailable` while a snapshot install replaces the shard: the subscription ends, and
    /// the client reads from another replica).
    async fn access(&self, shard: ShardId, conversation: &str, user: &str) -> Result<Access> {
        let (store, c, u) = (self.store.clone(), conversation.to_string(), user.to_string());
        point_read(&self.point_reads, "reading a conversation's members", move || {
            Ok(access_of(store.members_for_reader(shard, &c)?.as_ref(), &u))
        })
        .await
    }

    /// Starts reading and framing up to [`CATCH_UP_BATCH`] stored messages from `from` up
    /// to offset `until` on a blocking thread, once `share` (the reader's user's) and the
    /// node's catch-up budget have room for the batch; the batch holds its room until it is
    /// dropped.
    fn read_stored(
        &self,
        share: &Arc<Semaphore>,
        shard: ShardId,
        conversation: &str,
        from: u64,
        until: u64,
    ) -> StoredRead {
        let (store, conversation, scans) = (self.store.clone(), conversation.to_string(), self.scans.clone());
        let (budget, share) = (self.catch_up.clone(), share.clone());
        let waiting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = waiting.clone();
        let task = tokio::spawn(async move {
            let stopping = || Error::Unavailable("the node is stopping".into());
            let mut hold = budget.reserve_as(&share, &flag).await.ok_or_else(stopping)?;
            let slot = scans.acquire_owned().await.map_err(|_| stopping())?;
            // The slot and the room go with the read: a read abandoned (its task aborted)
            // still runs to its end on the blocking thread, and holds both until then.
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                let mut batch = read_batch(&store, shard, &conversation, from, until)?;
                hold.keep(batch.frames.capacity());
                batch._hold = Some(hold);
                Ok(batch)
            })
            .await
            .map_err(Error::task("reading stored messages"))?
        });
        StoredRead { task, waiting }
    }

    /// Streams a conversation to `out` for `who`, a member; see the module doc. Returns when
    /// the client goes away, when not following and caught up, or on error. A reader who is
    /// removed gets everything up to the head at the removal, then `Forbidden`. `window` is
    /// the connection's part in the catch-up budget: its send window, wide while this reads
    /// storage if a lease is free, and its user's share of the batch budget (see
    /// [`catch_up`]).
    pub async fn subscribe(
        &self,
        who: &Identity,
        conversation: String,
        from: u64,
        follow: bool,
        out: &mut quinn::SendStream,
        window: &catch_up::ConnCatchUp,
    ) -> Result<()> {
        let shard = match self.hosting(&conversation) {
            Ok(g) => g.shard,
            Err(Refusal::Invalid(m)) => return Err(Error::InvalidInput(m)),
            Err(Refusal::NotLeader { shard, leader }) => return Err(Error::NotLeader { shard, leader }),
            Err(other) => return Err(Error::Unavailable(format!("{other:?}"))),
        };
        self.rebuilt(shard)?;
        // The last offset this reader may have: the head at its removal once removed. A
        // removed reader still gets what was sent before the removal, then `Forbidden`, as a
        // subscription open at the removal does: one that broke meanwhile resumes up to it. A
        // user who never was a member has nothing (0), and is refused before anything is
        // made for it (a push channel, a lag watch). A removal applied from here on is seen
        // after the first read from storage, or by the push channel.
        let mut until = u64::MAX;
        let mut next = from.max(1);
        if let Access::Ended { until: end } = self.access(shard, &conversation, &who.user).await? {
            if next > end {
                return Err(not_a_member(&who.user, &conversation));
            }
            until = end;
        }
        // Attach before reading storage: anything applied from now on reaches `events`.
        let (rx, head) = self.push.attach(&conversation);
        let mut attached = Attached { hub: &self.push, conversation: &conversation, rx: Some(rx) };
        let events = attached.rx.as_mut().expect("attached until dropped");
        // A following subscription is measured for lag until it ends (see `metrics`).
        let watch = follow.then(|| self.metrics.subscribed(head.clone(), from.max(1)));
        let at = |next: u64| {
            if let Some(w) = &watch {
                w.next.store(next, Ordering::Relaxed);
            }
        };
        let mut caught_up = false;
        // The conversation's head, when a read from past it found nothing: a reader who asked
        // for offsets not yet sent is told how far the conversation goes, not that it has
        // everything up to where it asked.
        let mut head_below_next = None;
        loop {
            // Catch up from storage, reading the next batch while this one is written, each
            // batch in one write: per-frame writes cost a stream (and connection) lock and a
            // wake-up each. After each read, the reader must still be a member: a removal
            // applied meanwhile bounds what it gets.
            self.still_hosting(shard)?;
            let mut catching_up = window.catching_up(&self.catch_up);
            let mut reading = self.read_stored(&window.share, shard, &conversation, next, until);
            loop {
                let mut batch = match reading.finish().await {
                    // Retention deleted what comes next: say so, then go on from what is kept.
                    Err(Error::Truncated { earliest }) if earliest > next => {
                        // Only a reader who may still read learns where the conversation
                        // starts (a removal, or a creation by others, may have come since).
                        if let Access::Ended { until: end } = self.access(shard, &conversation, &who.user).await? {
                            until = until.min(end);
                            if earliest > until {
                                return Err(not_a_member(&who.user, &conversation));
                            }
                        }
                        write_subscriber(out, &frame::encode(&Response::Truncated { earliest })).await?;
                        next = earliest;
                        at(next);
                        reading = self.read_stored(&window.share, shard, &conversation, next, until);
                        continue;
                    }
                    read => read?,
                };
                if let Access::Ended { until: end } = self.access(shard, &conversation, &who.user).await? {
                    until = until.min(end);
                    if batch.next.saturating_sub(1) > until {
                        // Given back first: a batch waiting for room must not hold any.
                        drop(batch);
                        batch = self.read_stored(&window.share, shard, &conversation, next, until).finish().await?;
                    }
                }
                let full = batch.more && batch.next <= until;
                if full {
                    reading = self.read_stored(&window.share, shard, &conversation, batch.next, until);
                }
                next = batch.next;
                if let Some(h) = batch.head {
                    head.fetch_max(h, Ordering::Relaxed);
                    head_below_next = (h < next - 1).then_some(h);
                }
                if !batch.frames.is_empty() {
                    catching_up.widen();
                    write_stored(&self.catch_up, out, &batch.frames, &reading).await?;
                }
                at(next);
                if !full {
                    break;
                }
            }
            drop(catching_up);
            if until != u64::MAX {
                return Err(not_a_member(&who.user, &conversation));
            }
            if !caught_up {
                // What was read is whole only if the data was not deleted meanwhile.
                self.still_hosting(shard)?;
                caught_up = true;
                let sent_up_to = head_below_next.unwrap_or(next - 1);
                write_subscriber(out, &frame::encode(&Response::CaughtUp { head: sent_up_to })).await?;
                if !follow {
                    return Ok(());
                }
            }
            // Live push until a gap, a lag overflow, a reset or a membership change sends us
            // back to storage, or the replica stops hosting the shard or loses its leader.
            let mut check = tokio::time::interval_at(tokio::time::Instant::now() + LEADER_CHECK, LEADER_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut leaderless_since: Option<tokio::time::Instant> = None;
            loop {
                let event = tokio::select! {
                    ev = events.recv() => ev,
                    _ = out.stopped() => return Ok(()),
                    _ = check.tick() => {
                        let group = self.group(shard).map_err(|_| Error::NotLeader { shard, leader: self.holder_of(shard) })?;
                        if self.in_touch(&group) {
                            leaderless_since = None;
                        } else if leaderless_since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= LEADERLESS_MAX {
                            return Err(Error::Unavailable(format!(
                                "this replica of shard {shard} has been out of touch with its leader for {}s (cut \
                                 off from its group?) and would show no new message: subscribe at another replica",
                                LEADERLESS_MAX.as_secs()
                            )));
                        }
                        continue;
                    }
                };
                match event.as_deref() {
                    Ok(Push::Message { offset, frame }) => {
                        if *offset < next {
                            continue;
                        }
                        if *offset > next {
                            break;
                        }
                        next += 1;
                        write_subscriber(out, frame).await?;
                        at(next);
                    }
                    Ok(Push::Members) => {
                        if let Access::Ended { until: end } = self.access(shard, &conversation, &who.user).await? {
                            until = end;
                            break;
                        }
                    }
                    Ok(Push::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.metrics.push_fallbacks.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Error::Unavailable(format!("shard {shard} stopped")));
                    }
                }
            }
        }
    }

    /// This node's view of every shard.
    pub fn status(&self) -> NodeStatus {
        let mut shards: Vec<ShardStatus> = self.groups().iter().map(|g| self.group_status(g)).collect();
        shards.sort_by_key(|s| s.shard);
        let stats = &self.store.syncer.stats;
        NodeStatus {
            node_id: self.id,
            shards,
            fsyncs: stats.rounds.load(Ordering::Relaxed),
            fsync_completions: stats.completions.load(Ordering::Relaxed),
            fsync_us_total: stats.fsync_us_total.load(Ordering::Relaxed),
            sends_committed: self.counters.sends.load(Ordering::Relaxed),
            entries_committed: self.counters.entries.load(Ordering::Relaxed),
            append_rpcs: self.peer_stats.append_rpcs.load(Ordering::Relaxed),
            append_rpc_entries: self.peer_stats.append_rpc_entries.load(Ordering::Relaxed),
            append_rpcs_empty: self.peer_stats.append_rpcs_empty.load(Ordering::Relaxed),
            append_rpcs_cut: self.peer_stats.append_rpcs_cut.load(Ordering::Relaxed),
            append_frames: self.peer_stats.append_frames.load(Ordering::Relaxed),
            sends_throttled: self.metrics.throttled_total(),
            sends_queued: self.counters.queued.load(Ordering::Relaxed),
            subscribers: self.metrics.subscribers() as u64,
            subscriber_lag_max: self.metrics.lag_max(),
            sends_acked: self.metrics.sends(metrics::SendOutcome::Acked),
            stages: self.store.stages.snapshot(),
            meta: self.meta_group().map(|g| self.group_status(&g)),
            placement: self.cluster_map(),
        }
    }

    fn group_status(&self, g: &Group) -> ShardStatus {
        let m = consensus::metrics_of(&g.raft);
        ShardStatus {
            shard: g.shard,
            leader: m.current_leader.map(node_of),
            replica: g.replica,
            term: m.current_term,
            role: format!("{:?}", m.state),
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            voters: m.membership_config.membership().voter_ids().map(node_of).collect(),
            learners: m.membership_config.membership().learner_ids().map(node_of).collect(),
            followers: follower_lags(&m, g.replica, self.config.limits.follower_lag_warn),
            data_bytes: self.store.shard_bytes(g.shard),
            snapshots: self
                .net
                .snapshot_copies(g.shard)
                .into_iter()
                .map(|(replica, c)| SnapshotCopyStatus {
                    node: node_of(replica),
                    replica,
                    sending: c.sending(),
                    bytes_sent: c.bytes_sent,
                })
                .collect(),
        }
    }

    /// Whether node `node` said it is stopping (see `raft::quiesce`): no leadership is
    /// handed to it.
    fn is_leaving(&self, node: NodeId) -> bool {
        self.net.quiescer().is_some_and(|q| q.is_leaving(node))
    }

    /// Before a node stops ([`crate::node::Node::stop`], while its clients are still
    /// connected, and again in step 3 of [`Service::shutdown`] for a group handed back
    /// meanwhile): hands each group this node leads to the voter on another node that
    /// answered within an election timeout and holds the most of its log (openraft's
    /// transfer: the target campaigns once it holds the leader's last entry), then waits at
    /// most [`HANDOVER_WAIT`] until every one of them names another leader. A group whose
    /// new leader is not known by then elects one after its followers' timeout, as after a
    /// crash. A voter on a node that said it is stopping too is no target.
    pub async fn hand_leaderships_away(&self) {
        /// How often a handover's wait looks whether its target said it stops.
        const LEAVING_POLL: Duration = Duration::from_millis(10);
        use openraft::async_runtime::WatchReceiver;
        use openraft::Instant as _;
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        // A voter whose node has not answered within an election timeout (stopped before
        // this one, say) would never take a shard: the wait would be for nothing.
        let recent = Duration::from_millis(self.config.raft.election_timeout_ms_min);
        let mut handed = Vec::new();
        for g in self.groups().into_iter().chain(self.meta_group()) {
            let m = consensus::metrics_of(&g.raft);
            if m.current_leader != Some(g.replica) {
                continue;
            }
            let matched =
                |v: &NodeId| m.replication.as_ref().and_then(|r| r.get(v).cloned().flatten()).map(|l| l.index);
            let answered = |v: &NodeId| {
                m.heartbeat.as_ref().and_then(|h| h.get(v).cloned().flatten()).is_some_and(|at| at.elapsed() < recent)
            };
            let voters = m.membership_config.membership().voter_ids().filter(|v| node_of(*v) != self.id);
            let mut voters: Vec<NodeId> =
                voters.filter(|v| !self.is_leaving(node_of(*v)) && matched(v).is_some() && answered(v)).collect();
            voters.sort_by_key(|v| std::cmp::Reverse((matched(v), *v)));
            // The most caught up whose node has not said it stops: word of that may have come
            // since the list was made, so it is looked at again, and the choice logged, under
            // the lock the word is taken under.
            let quiescer = self.net.quiescer();
            let chosen = voters.into_iter().find(|v| quiescer.is_none_or(|q| q.may_hand_to(g.shard, node_of(*v))));
            let Some(to) = chosen else { continue };
            match quiescer {
                Some(q) => q.hold(g.shard, "handing leadership away before stopping"),
                None => tracing::info!(shard = g.shard, to = node_of(to), "handing leadership away before stopping"),
            }
            if tokio::time::timeout_at(deadline, g.raft.trigger().transfer_leader(to)).await.is_ok_and(|r| r.is_ok()) {
                handed.push((g.shard, g.replica, node_of(to), g.raft.metrics()));
            }
        }
        for (shard, replica, to, mut metrics) in handed {
            // Nodes stopped together hand to each other before each hears that the others
            // stop: a target that says so meanwhile will not keep the shard, so its
            // leadership is not waited for.
            let elsewhere = async {
                while metrics.borrow_watched().current_leader.is_none_or(|l| l == replica) {
                    if self.is_leaving(to) {
                        return Some(false);
                    }
                    tokio::select! {
                        changed = metrics.changed() => if changed.is_err() { return None },
                        () = tokio::time::sleep(LEAVING_POLL) => {}
                    }
                }
                Some(true)
            };
            match tokio::time::timeout_at(deadline, elsewhere).await {
                Ok(Some(true)) => {}
                Ok(Some(false)) => tracing::info!(shard, to, "the node it was handed to stops too: not waiting for it"),
                Ok(None) | Err(_) => {
                    tracing::info!(shard, "no new leader named yet: the followers elect one after their timeout")
                }
            }
        }
    }

    /// Stops every group, quietly: nothing calls a group once it is stopping, since a
    /// stopped group answers every call with an error it logs.
    ///
    /// 1. The stop signal is set, under the placement lock, so no replica starts after it:
    ///    the background loops end at their next wait, and they are joined (a loop still busy
    ///    after [`STOP_WAIT`] is aborted where it waits).
    /// 2. Sends already proposed get up to [`STOP_WAIT`] to commit; later ones get no outcome
    ///    (their clients see the answer as unknown and retry with the same key).
    /// 3. Each group still led here is handed to the voter on another node that holds the
    ///    most of its log, and gets up to [`HANDOVER_WAIT`] to name its new leader: a leader
    ///    that just stopped would leave its shards without one for an election timeout. (A
    ///    stopping node has handed its groups away once already, before it closed its clients'
    ///    connections; this catches one handed back since.)
    /// 4. The groups start no more heartbeats or elections, and the requests they asked of
    ///    peers get up to a heartbeat interval to be answered (openraft logs an error when a
    ///    heartbeat's answer finds its group stopped).
    /// 5. The peer server stops finding groups (its requests are answered that the shard is
    ///    not hosted here), and the requests it is serving get up to [`STOP_WAIT`] to end.
    /// 6. The groups stop and release the store.
    pub async fn shutdown(&self) {
        self.stop_asked.send_replace(true);
        {
            let _no_replica_starts = self.placement_lock.lock().await;
            self.stop.send_replace(true);
        }
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::info!("a background task was still busy when the node stopped; abandoned where it waits");
                task.abort();
                let _ = task.await;
            }
        }
        let max = self.config.limits.inflight_sends_max as u32;
        let sends = tokio::time::timeout_at(deadline, self.inflight.acquire_many(max)).await;
        if sends.is_err() {
            tracing::info!(
                in_flight = max as usize - self.inflight.available_permits(),
                "sends still uncommitted when the node stopped: their clients see no outcome"
            );
        }
        self.hand_leaderships_away().await;
        // No group starts a heartbeat or an election from here on, and those in flight get
        // their answers while their groups run.
        for g in self.groups().iter().chain(self.meta_group().as_ref()) {
            g.raft.runtime_config().heartbeat(false);
            g.raft.runtime_config().elect(false);
        }
        // openraft bounds a heartbeat's wait for its answer by the heartbeat interval; other
        // requests whose answers come late (a dead peer's) find their group stopped quietly.
        let beat = Duration::from_millis(self.config.raft.heartbeat_ms) + HEARTBEAT_ANSWER_MARGIN;
        if !self.net.asking().idle_within(deadline.min(tokio::time::Instant::now() + beat)).await {
            tracing::debug!("peer requests still unanswered when the node stopped");
        }
        let hosted = std::mem::take(&mut *self.registry.write().unwrap_or_else(|p| p.into_inner()));
        if !self.net.serving().idle_within(deadline).await {
            tracing::info!("peer requests still being served when the node stopped");
        }
        drop(hosted);
        for g in self.groups().iter().chain(self.meta_group().as_ref()) {
            if let Err(e) = g.shutdown().await {
                tracing::warn!(shard = g.shard, error = %e, "a shard group did not stop cleanly");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn point_reads_run_at_most_their_slots_at_once_and_an_abandoned_one_keeps_its_slot() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let slots = Arc::new(Semaphore::new(2));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        // Reads meet two by two, so that two slots' reads do run at once.
        let pairs = Arc::new(std::sync::Barrier::new(2));
        let reads: Vec<_> = (0..8)
            .map(|i| {
                let (slots, running, most, pairs) = (slots.clone(), running.clone(), most.clone(), pairs.clone());
                tokio::spawn(async move {
                    point_read(&slots, "a test read", move || {
                        most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                        pairs.wait();
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, SeqCst);
                        Ok(i)
                    })
                    .await
                })
            })
            .collect();
        for (i, read) in reads.into_iter().enumerate() {
            assert_eq!(read.await.expect("joined").expect("read"), i, "each read's own answer");
        }
        assert_eq!(most.load(SeqCst), 2, "eight reads, two slots: two at a time");
        assert_eq!(slots.available_permits(), 2, "every slot back");

        // A request abandoned while its read runs: the read goes on and holds its slot.
        let one = Arc::new(Semaphore::new(1));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let request = tokio::spawn({
            let one = one.clone();
            async move {
                point_read(&one, "a test read", move || {
                    let _ = wait.recv();
                    Ok(())
                })
                .await
            }
        });
        while one.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        request.abort();
        assert!(request.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(one.available_permits(), 0, "the read still runs, in its slot");
        release.send(()).expect("the read waits");
        let freed = tokio::time::timeout(Duration::from_secs(10), one.acquire()).await;
        assert!(freed.is_ok_and(|p| p.is_ok()), "the slot comes back when the read ends");
    }

    fn send(conversation: &str, seq: u64) -> SendCommand {
        SendCommand {
            conversation: conversation.into(),
            sender: "u".into(),
            client_id: 1,
            client_seq: seq,
            ts_ms: 0,
            text: String::new(),
        }
    }

    /// Shard 1: a, b, a (slots 0, 2, 3); shard 2: c, c (slots 1, 4).
    fn batch() -> ByShard {
        ByShard::from([
            (1, (vec![0, 2, 3], vec![send("a", 1), send("b", 2), send("a", 3)])),
            (2, (vec![1, 4], vec![send("c", 4), send("c", 5)])),
        ])
    }

    fn shape(parts: &[BatchPart]) -> Vec<(ShardId, Vec<usize>, Vec<u64>)> {
        parts.iter().map(|(s, slots, cs)| (*s, slots.clone(), cs.iter().map(|c| c.client_seq).collect())).collect()
    }

    #[test]
    fn a_batch_is_proposed_whole_per_shard_while_nothing_would_wait() {
        let (parts, split) = proposals_of(batch(), |_, _| false);
        assert!(!split);
        assert_eq!(shape(&parts), [(1, vec![0, 2, 3], vec![1, 2, 3]), (2, vec![1, 4], vec![4, 5])]);
    }

    #[test]
    fn a_batch_that_would_wait_is_proposed_per_conversation_in_its_order() {
        let asked = std::sync::Mutex::new(Vec::new());
        let (parts, split) = proposals_of(batch(), |shard, sends| {
            asked.lock().unwrap().push((shard, sends));
            true
        });
        assert!(split);
        // Shard 2's sends are one conversation's: never split, and its window not asked.
        assert_eq!(asked.into_inner().unwrap(), [(1, 3)]);
        assert_eq!(
            shape(&parts),
            [(1, vec![0, 3], vec![1, 3]), (1, vec![2], vec![2]), (2, vec![1, 4], vec![4, 5])],
            "each part is one conversation's sends, in the batch's order, with their slots"
        );
        for (_, _, commands) in &parts {
            assert!(commands.iter().all(|c| c.conversation == commands[0].conversation));
        }
    }
}
