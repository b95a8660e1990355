//! The node↔node transport for every Raft group of a node.
//!
//! One QUIC endpoint per node (its `peer_addr`), mutual TLS under the node CA, one cached
//! connection per peer shared by all shards. AppendEntries travel in frames per peer: every
//! group's requests to one peer wait for the next frame, at most
//! `raft.append_frames_in_flight` frames are out at once, and the peer answers a frame when
//! its requests are done (see [`PeerNet::framed_append`]). With 0, each group has its own
//! lane per peer: a bidirectional stream kept open per (peer, shard) for one exchange at a
//! time. Every other RPC gets a stream of its own. Each request names its shard. [`PeerNet`] implements
//! `openraft_multi::GroupRouter`, so openraft sees an ordinary per-group network; [`serve`]
//! dispatches incoming RPCs to the local group of the named shard.
//!
//! Snapshots are streamed in chunks read from a RocksDB snapshot on a blocking thread
//! through a small bounded channel, and spooled to a file on the receiver: neither side
//! holds a shard in memory.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::RaftNetworkFactory;
use openraft_multi::{GroupNetworkAdapter, GroupRouter};
use tracing::Instrument;

use super::rpc::{PeerRequest, PeerResponse};
use super::state_machine::ShardSnapshot;
use super::types::*;
use crate::chat::{ShardId, REQUEST_BYTES_MAX};
use crate::error::Error;
use crate::net::frame;
use crate::net::lane::LanePool;
use crate::stages::{Stage, Stages};
use crate::store::snapshot::SpoolWriter;

/// Largest peer frame: an AppendEntries (cut to [`APPEND_PAYLOAD_BYTES`], or one entry
/// alone) or a snapshot chunk fits well below it.
pub const PEER_FRAME_BYTES_MAX: usize = 64 << 20;
/// Approximate entry bytes one AppendEntries carries, at most: openraft hands the network
/// up to `raft.payload_entries_max` entries, and an entry holds a whole client request (up to
/// `limits.frame_bytes_max`), so a lagging follower's catch-up could otherwise ask for a
/// frame far over [`PEER_FRAME_BYTES_MAX`], be refused by the follower every time, and
/// never catch up. A longer request is cut (see [`fit_payload`]).
pub const APPEND_PAYLOAD_BYTES: usize = 16 << 20;
/// The largest entry a frame must hold on its own (with `APPEND_PAYLOAD_BYTES` before it,
/// well inside `PEER_FRAME_BYTES_MAX`): one client request at most, as config validates.
pub const ENTRY_BYTES_MAX: usize = REQUEST_BYTES_MAX;
// A cut request holds at most the budget, or one entry alone: either, encoded, fits a frame.
const _: () = assert!(APPEND_PAYLOAD_BYTES + 2 * ENTRY_BYTES_MAX < PEER_FRAME_BYTES_MAX);
/// How long the requests of a frame may be done after its first: a group busy with
/// something else on this node (a snapshot install, a long apply) must not hold up every
/// other group's replication to it. A disk stall holds them all alike (they share the fsync),
/// so it does not cut them.
const FRAME_STRAGGLER_WAIT: Duration = Duration::from_millis(100);
/// Time allowed to establish a peer connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Snapshot chunks buffered between the RocksDB reader thread and the stream.
const SNAPSHOT_CHUNKS_IN_FLIGHT: usize = 4;
/// A paced snapshot stream writes at most this much at a time (`[admin] move_bytes_per_s`).
const SNAPSHOT_PACE_SLICE_BYTES: usize = 16 << 10;
/// A paced AppendEntries to a learner carries at most this much (one entry at least), so
/// each waits at most this much over `[admin] move_bytes_per_s` before it leaves.
const PACED_APPEND_BYTES: usize = 64 << 10;
/// A learner paced within this long counts as catching up by log (see
/// [`PeerNet::paced_learners`]).
const PACED_RECENTLY: Duration = Duration::from_secs(5);
/// Time allowed for a receiver to install a snapshot after the last chunk.
const SNAPSHOT_INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The local Raft groups, by shard, as the peer server and the service find them.
pub type Groups = Arc<RwLock<HashMap<ShardId, Hosted>>>;

/// A group hosted on this node: its Raft handle and the replica id it runs under.
#[derive(Clone)]
pub struct Hosted {
    pub replica: NodeId,
    pub raft: Raft,
}

/// What the peer server answers from: the hosted groups and the node's cluster record.
#[derive(Clone)]
pub struct PeerContext {
    pub groups: Groups,
    pub formation: Arc<super::formation::Formation>,
    pub spool_dir: PathBuf,
    /// The free space of the data directory's filesystem and the node's reserve: a snapshot
    /// is spooled there, then written into the store, so it needs twice its size above it.
    pub space: Arc<crate::store::space::DiskSpace>,
    /// Snapshots refused for lack of room, by shard ([`SnapshotRefusals`]).
    pub snapshot_refusals: SnapshotRefusals,
    pub stages: Arc<Stages>,
    /// Where a `Drop` goes: the service stops the shard's replica and deletes its data.
    pub drops: tokio::sync::mpsc::Sender<DropRequest>,
    /// The node's quiescing: beats go to it, and every Raft message wakes its group.
    pub quiet: Arc<super::quiesce::Quiescer>,
    /// The requests being served ([`PeerNet::serving`]).
    pub serving: Arc<InFlight>,
    /// Takes in a peer's `UserSends`: what it took from its users' send buckets, to be taken
    /// from this node's (the service's rates).
    pub user_sends: UserSendsTaker,
    /// The revoked keys (`<tls_dir>/revoked`): a peer presenting one is refused, and its
    /// connections are closed once its revocation is read.
    pub revoked: tokio::sync::watch::Receiver<crate::net::tls::Revoked>,
    /// The revoked keys a refusal was logged for.
    pub refused_keys: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// See [`PeerContext::user_sends`].
pub type UserSendsTaker = Arc<dyn Fn(&[(String, u32)]) + Send + Sync>;

/// Peer requests in flight, served here or asked of a peer: a stopping node waits for them
/// before it stops its groups (see `Service::shutdown`), so none calls a stopped group and
/// no answer reaches one.
#[derive(Default)]
pub struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One request being served; dropped when it ends.
pub struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    /// Counts a request until the guard drops. A request served is counted before it looks
    /// up its group, so a stop that took the groups away and then sees none in flight waits
    /// for none that found one.
    pub fn enter(&self) -> InFlightGuard<'_> {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlightGuard(self)
    }

    /// Waits until no request is being served, or `deadline`; whether none is.
    pub async fn idle_within(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let idle = self.idle.notified();
            if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.count.load(std::sync::atomic::Ordering::SeqCst) == 0;
            }
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A shard to stop and delete here, and where to say it is done.
pub type DropRequest = (ShardId, Vec<NodeId>, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Outgoing peer RPCs; cheap to clone.
#[derive(Clone)]
pub struct PeerNet {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    /// One slot per peer: connecting to a dead peer must never delay RPCs to live ones. The
    /// file's nodes at start; nodes added since are learned from the cluster map.
    slots: std::sync::RwLock<HashMap<NodeId, Arc<Slot>>>,
    /// The least time an AppendEntries may take (see [`PeerNet::new`]).
    append_timeout: Duration,
    stats: Arc<PeerStats>,
    stages: Arc<Stages>,
    /// Idle AppendEntries lanes by (peer, shard) (see [`PeerNet::append`]).
    lanes: LanePool<(NodeId, ShardId)>,
    /// Bytes per second a snapshot stream, or a learner's log catch-up, may send (0: no
    /// limit; `[admin] move_bytes_per_s`).
    snapshot_bytes_per_s: std::sync::atomic::AtomicU64,
    /// The last install each group's snapshot streams got answered (see
    /// [`PeerNet::snapshot_streams`]).
    snapshot_streams: std::sync::Mutex<HashMap<ShardId, SnapshotStreams>>,
    /// Snapshot copies this node sends, per (group, replica) (see [`PeerNet::snapshot_copies`]).
    snapshot_copies: std::sync::Mutex<Copies>,
    /// The groups this node runs, to tell a learner from a voter (see [`PeerNet::limit_moves`]).
    groups: std::sync::OnceLock<Groups>,
    /// The node's quiescing, for its metrics (see [`PeerNet::quiescer`]).
    quiescer: std::sync::OnceLock<Arc<super::quiesce::Quiescer>>,
    /// Per (group, learner replica): when its next paced AppendEntries may leave, and when
    /// one last did.
    paced: std::sync::Mutex<HashMap<(ShardId, NodeId), Paced>>,
    /// The replicas the moves in progress add, per group (see [`PeerNet::moves_in_progress`]).
    moving: std::sync::RwLock<std::collections::HashSet<(ShardId, NodeId)>>,
    /// Frames of AppendEntries in flight per peer (0: every group on its own lane; see
    /// [`PeerNet::framed_append`]).
    frames_in_flight: usize,
    /// Per peer: the AppendEntries waiting for a frame.
    framers: std::sync::Mutex<HashMap<NodeId, Arc<Framer>>>,
    /// The peer requests this node's server is serving.
    serving: Arc<InFlight>,
    /// The group RPCs this node's groups are asking of peers.
    asking: InFlight,
    /// The revoked keys, once set ([`PeerNet::watch_revocations`]): a peer presenting one is
    /// not dialed into, and a connection to one is closed.
    revoked: std::sync::OnceLock<tokio::sync::watch::Receiver<crate::net::tls::Revoked>>,
    /// The lane of each frame sender, by (peer, sender).
    frame_lanes: LanePool<(NodeId, usize)>,
}

impl Drop for Inner {
    /// Wakes the frame senders, so they see the node's transport is gone and end.
    fn drop(&mut self) {
        for framer in self.framers.get_mut().unwrap_or_else(|p| p.into_inner()).values() {
            framer.wake.notify_waiters();
        }
    }
}

/// The AppendEntries of every group waiting for the next frame to one peer.
#[derive(Default)]
struct Framer {
    queue: std::sync::Mutex<Vec<Waiting>>,
    wake: tokio::sync::Notify,
}

/// One group's AppendEntries waiting for a frame, and where its answer goes.
struct Waiting {
    shard: ShardId,
    rpc: AppendEntriesRequest,
    bytes: usize,
    reply: tokio::sync::oneshot::Sender<Result<PeerResponse, FrameError>>,
}

/// Why a frame got no answer: the peer could not be reached (`unreachable`), or the exchange
/// failed on the way.
#[derive(Debug, Clone)]
struct FrameError {
    unreachable: bool,
    reason: String,
}

impl FrameError {
    fn into_rpc(self) -> RPCError<C> {
        if self.unreachable {
            unreachable(self.reason)
        } else {
            network(self.reason)
        }
    }
}

/// One learner's log catch-up pacing.
#[derive(Debug, Clone, Copy)]
struct Paced {
    next: std::time::Instant,
    last: std::time::Instant,
}

/// The snapshot streams one group of this node sends: the leader holds back its next
/// snapshot (and so the log purge that follows it) while one goes out, and while the replica
/// that installed the last catches up by log (`service::compaction`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStreams {
    /// Streams going out now: from the connection's opening until the peer answered the
    /// install or the stream failed. A peer that cannot be reached never counts. (Counted
    /// per replica in [`SnapshotCopy`]; summed when asked.)
    pub sending: usize,
    /// When a peer last answered an install, and which replica that was (a failed stream
    /// changes neither).
    pub last_installed: Option<std::time::Instant>,
    pub last_target: Option<NodeId>,
}

/// One group's snapshot copy to one replica, as a move's progress shows it: whether a
/// stream to it is going out, and the bytes the stream going out (or the last) has sent.
/// Kept per replica, so that a snapshot to another (a voter recovering from downtime, or a
/// stream to a peer that died and whose connection has not timed out yet) never counts as
/// a move's copy.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotCopy {
    pub bytes_sent: u64,
    /// Streams to the replica going out now (a new one may start before a failed one ends).
    streams: usize,
    /// The newest stream's number: only its bytes count, so that a failed stream still
    /// ending never adds its bytes to the new one's.
    newest: u64,
    ended: Option<std::time::Instant>,
}

impl SnapshotCopy {
    /// Whether a stream to the replica is going out now.
    pub fn sending(&self) -> bool {
        self.streams > 0
    }
}

/// How long the bytes of a copy that ended are still shown.
const SNAPSHOT_COPY_SHOWN: Duration = Duration::from_secs(3600);

type Copies = HashMap<(ShardId, NodeId), SnapshotCopy>;

/// A stream to `key` starts: the copy's bytes start again from 0. Returns the stream's number.
fn copy_started(copies: &mut Copies, key: (ShardId, NodeId), now: std::time::Instant) -> u64 {
    copies.retain(|_, c| c.ended.is_none_or(|e| now.saturating_duration_since(e) < SNAPSHOT_COPY_SHOWN));
    let c = copies.entry(key).or_default();
    c.streams += 1;
    c.newest += 1;
    c.bytes_sent = 0;
    c.ended = None;
    c.newest
}

/// Stream `number` to `key` sent `bytes`: counted if it is the newest stream.
fn copy_sent(copies: &mut Copies, key: (ShardId, NodeId), number: u64, bytes: usize) {
    if let Some(c) = copies.get_mut(&key).filter(|c| c.newest == number) {
        c.bytes_sent += bytes as u64;
    }
}

/// A stream to `key` ended (installed, failed or dropped).
fn copy_ended(copies: &mut Copies, key: (ShardId, NodeId), now: std::time::Instant) {
    let c = copies.entry(key).or_default();
    c.streams = c.streams.saturating_sub(1);
    if c.streams == 0 {
        c.ended = Some(now);
    }
}

/// Counts one snapshot stream as going out for as long as it lives.
struct Streaming<'a> {
    inner: &'a Inner,
    shard: ShardId,
    target: NodeId,
    number: u64,
}

impl<'a> Streaming<'a> {
    fn start(inner: &'a Inner, shard: ShardId, target: NodeId) -> Self {
        let mut copies = inner.snapshot_copies.lock().unwrap_or_else(|p| p.into_inner());
        let number = copy_started(&mut copies, (shard, target), std::time::Instant::now());
        Streaming { inner, shard, target, number }
    }

    /// `target` answered the install.
    fn installed(&self, target: NodeId) {
        let mut streams = self.inner.snapshot_streams.lock().unwrap_or_else(|p| p.into_inner());
        let s = streams.entry(self.shard).or_default();
        s.last_installed = Some(std::time::Instant::now());
        s.last_target = Some(target);
    }

    fn sent(&self, bytes: usize) {
        let mut copies = self.inner.snapshot_copies.lock().unwrap_or_else(|p| p.into_inner());
        copy_sent(&mut copies, (self.shard, self.target), self.number, bytes);
    }
}

impl Drop for Streaming<'_> {
    fn drop(&mut self) {
        let mut copies = self.inner.snapshot_copies.lock().unwrap_or_else(|p| p.into_inner());
        copy_ended(&mut copies, (self.shard, self.target), std::time::Instant::now());
    }
}

/// A peer's address and its connection, once made, with the fingerprint of the key the
/// peer presented on it.
struct Slot {
    addr: SocketAddr,
    conn: tokio::sync::Mutex<Option<(quinn::Connection, String)>>,
    /// When a dial last found the peer presenting a revoked key, or the peer closed the link
    /// for this node's revoked key: the next waits [`REVOKED_PEER_REDIAL`], not a handshake
    /// per RPC.
    refused: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether this node logged that the peer refuses its own key: once per process, as a
    /// new key is read only at a restart.
    own_key_refused: std::sync::atomic::AtomicBool,
}

impl Slot {
    fn new(addr: SocketAddr) -> Arc<Slot> {
        Arc::new(Slot {
            addr,
            conn: tokio::sync::Mutex::new(None),
            refused: std::sync::Mutex::new(None),
            own_key_refused: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// QUIC application close code of a peer connection whose node presents a revoked key.
pub const CLOSE_PEER_REVOKED: u32 = 0x14;
/// The close reason of such a connection.
pub const PEER_REVOKED_REASON: &str = "this node's certificate was revoked (convoy tls revoke-node)";
/// How long after finding a peer's key revoked a node dials it again (a new certificate
/// needs the peer restarted).
const REVOKED_PEER_REDIAL: Duration = Duration::from_secs(1);

/// Idle lanes kept per (peer, shard): openraft replicates to a peer one AppendEntries at a
/// time, with heartbeats beside it.
const LANES_PER_SHARD: usize = 2;

/// Counters of outgoing replication, for `convoy cluster status`: how well entries share
/// AppendEntries RPCs (every RPC costs both nodes a round of task wake-ups and a follower
/// fsync completion, whatever it carries).
#[derive(Debug, Default)]
pub struct PeerStats {
    pub append_rpcs: AtomicU64,
    pub append_rpc_entries: AtomicU64,
    pub append_rpcs_empty: AtomicU64,
    /// AppendEntries cut to fit the frame budget (see [`fit_payload`]).
    pub append_rpcs_cut: AtomicU64,
    /// Frames that carried AppendEntries to peers (see [`PeerNet::framed_append`]).
    pub append_frames: AtomicU64,
}

fn unreachable(e: impl std::fmt::Display) -> RPCError<C> {
    RPCError::Unreachable(Unreachable::from_string(e.to_string()))
}

fn network(e: impl std::fmt::Display) -> RPCError<C> {
    RPCError::Network(NetworkError::from_string(e.to_string()))
}

impl PeerNet {
    /// `append_timeout` bounds an AppendEntries from below. openraft hands every RPC the
    /// heartbeat interval as its deadline, but a follower may legitimately take longer to
    /// answer a large batch while its disk is busy writing back a memtable flush: cancelling
    /// it then resends the same entries and adds openraft's retry back-off, which turned a
    /// 100 ms fsync stall into 300–600 ms of replication standstill in the benchmarks. A
    /// follower that is slower than the election timeout is treated as gone anyway.
    pub fn new(
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        addrs: HashMap<NodeId, SocketAddr>,
        append_timeout: Duration,
        frames_in_flight: usize,
        stages: Arc<Stages>,
    ) -> Self {
        let slots = std::sync::RwLock::new(addrs.into_iter().map(|(id, addr)| (id, Slot::new(addr))).collect());
        let stats = Arc::default();
        let lanes = LanePool::new(LANES_PER_SHARD);
        let snapshot_bytes_per_s = std::sync::atomic::AtomicU64::new(0);
        let inner = Inner {
            endpoint,
            client_config,
            slots,
            append_timeout,
            stats,
            stages,
            lanes,
            snapshot_bytes_per_s,
            snapshot_streams: std::sync::Mutex::default(),
            snapshot_copies: std::sync::Mutex::default(),
            groups: std::sync::OnceLock::new(),
            quiescer: std::sync::OnceLock::new(),
            paced: std::sync::Mutex::default(),
            moving: std::sync::RwLock::default(),
            frames_in_flight,
            framers: std::sync::Mutex::default(),
            frame_lanes: LanePool::new(1),
            serving: Arc::default(),
            asking: InFlight::default(),
            revoked: std::sync::OnceLock::new(),
        };
        PeerNet { inner: Arc::new(inner) }
    }

    /// Watches the revoked keys (once, at start): a connection this node dialed to a peer
    /// whose key becomes revoked is closed when the list is read, and no new one is made
    /// while the peer presents that key. Its replicas there then look unreachable, as a
    /// partitioned node's do. The watch ends with the network.
    pub fn watch_revocations(&self, revoked: tokio::sync::watch::Receiver<crate::net::tls::Revoked>) {
        if self.inner.revoked.set(revoked.clone()).is_err() {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let mut revoked = revoked;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = revoked.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(Duration::from_secs(1)) => {
                        if inner.strong_count() == 0 { return }
                        continue;
                    }
                }
                let list = revoked.borrow_and_update().clone();
                let Some(net) = inner.upgrade() else { return };
                let slots: Vec<(NodeId, Arc<Slot>)> =
                    net.slots.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(n, s)| (*n, s.clone())).collect();
                drop(net);
                for (node, slot) in slots {
                    let held = slot.conn.lock().await;
                    if let Some((conn, fp)) = held.as_ref().filter(|(_, fp)| list.contains(fp)) {
                        tracing::warn!(node, key = %fp, "closing the connection to a node whose certificate was revoked");
                        conn.close(CLOSE_PEER_REVOKED.into(), PEER_REVOKED_REASON.as_bytes());
                    }
                }
            }
        });
    }

    fn is_revoked(&self, fingerprint: &str) -> bool {
        self.inner.revoked.get().is_some_and(|r| r.borrow().contains(fingerprint))
    }

    /// Paces what a new replica is caught up with to `bytes_per_s` (0: no limit), so a move
    /// does not take the disk and network from the sends: a snapshot streamed to a learner
    /// or to the replica a move in progress adds, and the AppendEntries carrying entries to
    /// a learner of a group it leads (the log after the snapshot, or all of it when none was
    /// needed). A learner's requests are cut to [`PACED_APPEND_BYTES`] and each leaves when
    /// the bytes before it may have. A voter's log is never paced (its answers make the
    /// commits), nor a snapshot to a voter that is no move's (one recovering from downtime
    /// cannot count in a quorum until it has it). `groups` tells learners from voters.
    pub fn limit_moves(&self, bytes_per_s: u64, groups: Groups) {
        self.inner.snapshot_bytes_per_s.store(bytes_per_s, std::sync::atomic::Ordering::Relaxed);
        let _ = self.inner.groups.set(groups);
    }

    /// Sets the node's quiescing (once, at start).
    pub fn set_quiescer(&self, q: Arc<super::quiesce::Quiescer>) {
        let _ = self.inner.quiescer.set(q);
    }

    /// The node's quiescing, once set.
    pub fn quiescer(&self) -> Option<&Arc<super::quiesce::Quiescer>> {
        self.inner.quiescer.get()
    }

    /// Records the replicas the moves in progress add, as `(group, replica id)`, from the
    /// cluster map: their snapshots are paced even once they vote (a move is the operator's
    /// copy, whatever the replica's role in the group by then).
    pub fn moves_in_progress(&self, replicas: impl IntoIterator<Item = (ShardId, NodeId)>) {
        *self.inner.moving.write().unwrap_or_else(|p| p.into_inner()) = replicas.into_iter().collect();
    }

    /// The pace of a snapshot streamed to `target`: the limit for a learner of `shard` or the
    /// replica a move in progress adds, if moves are paced.
    fn snapshot_pace(&self, shard: ShardId, target: NodeId) -> Option<u64> {
        let moving = self.inner.moving.read().unwrap_or_else(|p| p.into_inner()).contains(&(shard, target));
        self.move_limit().filter(|_| moving || self.is_learner(shard, target))
    }

    /// The limit if `target` is a learner of `shard`'s group here and moves are paced.
    fn learner_pace(&self, shard: ShardId, target: NodeId) -> Option<u64> {
        self.move_limit().filter(|_| self.is_learner(shard, target))
    }

    /// `[admin] move_bytes_per_s`, if moves are paced.
    fn move_limit(&self) -> Option<u64> {
        Some(self.inner.snapshot_bytes_per_s.load(Ordering::Relaxed)).filter(|l| *l > 0)
    }

    /// Whether `target` is a learner of `shard`'s group on this node.
    fn is_learner(&self, shard: ShardId, target: NodeId) -> bool {
        let Some(groups) = self.inner.groups.get() else { return false };
        let Some(raft) = groups.read().unwrap_or_else(|p| p.into_inner()).get(&shard).map(|g| g.raft.clone()) else {
            return false;
        };
        let metrics = raft.metrics();
        let m = openraft::async_runtime::WatchReceiver::borrow_watched(&metrics);
        let learner = m.membership_config.membership().learner_ids().any(|l| l == target);
        learner
    }

    /// Reserves `bytes` of `target`'s pace: the instant they may leave.
    fn pace(&self, shard: ShardId, target: NodeId, bytes: usize, limit: u64) -> std::time::Instant {
        let now = std::time::Instant::now();
        let mut paced = self.inner.paced.lock().unwrap_or_else(|p| p.into_inner());
        paced.retain(|_, p| now.saturating_duration_since(p.last) < PACED_RECENTLY * 12);
        let p = paced.entry((shard, target)).or_insert(Paced { next: now, last: now });
        let due = p.next.max(now);
        p.next = due + Duration::from_secs_f64(bytes as f64 / limit as f64);
        p.last = due;
        due
    }

    /// The learners of `shard` whose log catch-up this node paced within the last few
    /// seconds: while they catch up, the leader keeps the log they need
    /// (`service::compaction`).
    pub fn paced_learners(&self, shard: ShardId) -> Vec<NodeId> {
        let now = std::time::Instant::now();
        let paced = self.inner.paced.lock().unwrap_or_else(|p| p.into_inner());
        paced
            .iter()
            .filter(|((s, _), p)| *s == shard && now.saturating_duration_since(p.last) < PACED_RECENTLY)
            .map(|((_, t), _)| *t)
            .collect()
    }

    /// The snapshot streams `shard`'s group on this node is sending, and when the last ended.
    pub fn snapshot_streams(&self, shard: ShardId) -> SnapshotStreams {
        let last = self.inner.snapshot_streams.lock().unwrap_or_else(|p| p.into_inner()).get(&shard).copied();
        let sending = self.snapshot_copies(shard).iter().map(|(_, c)| c.streams).sum();
        SnapshotStreams { sending, ..last.unwrap_or_default() }
    }

    /// The snapshot copies `shard`'s group on this node is sending or sent within the last
    /// hour, by target replica.
    pub fn snapshot_copies(&self, shard: ShardId) -> Vec<(NodeId, SnapshotCopy)> {
        let copies = self.inner.snapshot_copies.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = copies.iter().filter(|((s, _), _)| *s == shard).map(|((_, t), c)| (*t, *c)).collect();
        out.sort_unstable_by_key(|(t, _)| *t);
        out
    }

    /// Learns where `node` is (a node added to the cluster, or one whose address changed);
    /// an unchanged address keeps its connection.
    pub fn learn(&self, node: NodeId, addr: SocketAddr) {
        let mut slots = self.inner.slots.write().unwrap_or_else(|p| p.into_inner());
        if slots.get(&node).is_none_or(|s| s.addr != addr) {
            tracing::info!(node, %addr, "learned a peer's address from the cluster map");
            slots.insert(node, Slot::new(addr));
        }
    }

    /// Every node this node knows how to reach (itself included).
    pub fn peer_ids(&self) -> Vec<NodeId> {
        self.inner.slots.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }

    /// The replication counters of this node.
    pub fn stats(&self) -> Arc<PeerStats> {
        self.inner.stats.clone()
    }

    /// The peer requests this node's server is serving (see [`InFlight`]).
    pub fn serving(&self) -> Arc<InFlight> {
        self.inner.serving.clone()
    }

    /// The AppendEntries, votes and leadership transfers this node's groups are asking of
    /// peers (see [`InFlight`]).
    pub fn asking(&self) -> &InFlight {
        &self.inner.asking
    }

    async fn connection(&self, target: NodeId) -> Result<quinn::Connection, RPCError<C>> {
        let node = node_of(target);
        let known = self.inner.slots.read().unwrap_or_else(|p| p.into_inner()).get(&node).cloned();
        let known = known.ok_or_else(|| unreachable(format!("unknown node {node}")))?;
        let (addr, mut slot) = (&known.addr, known.conn.lock().await);
        if let Some((c, fp)) = slot.as_ref() {
            match c.close_reason() {
                None if !self.is_revoked(fp) => return Ok(c.clone()),
                None => c.close(CLOSE_PEER_REVOKED.into(), PEER_REVOKED_REASON.as_bytes()),
                Some(quinn::ConnectionError::ApplicationClosed(a)) if a.error_code == CLOSE_PEER_REVOKED.into() => {
                    // The peer refused this node's own key: it was revoked.
                    if !known.own_key_refused.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::error!(
                            node,
                            "node {node} refuses this node's certificate as revoked: once its files are gone \
                             (`convoy tls revoke-node` deletes them), `convoy tls init` issues a new one, which this \
                             node reads when restarted"
                        );
                    }
                    *known.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
                    *slot = None;
                }
                Some(_) => {}
            }
        }
        let refused = *known.refused.lock().unwrap_or_else(|p| p.into_inner());
        if refused.is_some_and(|at| at.elapsed() < REVOKED_PEER_REDIAL) {
            return Err(unreachable(format!("node {node}: a certificate on this link is revoked")));
        }
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.client_config.clone(), *addr, &crate::net::tls::node_name(node))
            .map_err(unreachable)?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| unreachable(format!("connect to node {target} timed out")))?
            .map_err(unreachable)?;
        // The handshake verified the certificate under the node CA, for this node's name.
        let fp = match crate::net::tls::peer_credential_of(&conn) {
            Ok((_, fp)) => fp,
            Err(e) => {
                conn.close(0x10u32.into(), b"unreadable certificate");
                return Err(unreachable(format!("node {node}: {e}")));
            }
        };
        if self.is_revoked(&fp) {
            conn.close(CLOSE_PEER_REVOKED.into(), PEER_REVOKED_REASON.as_bytes());
            let mut refused = known.refused.lock().unwrap_or_else(|p| p.into_inner());
            if refused.is_none() {
                tracing::warn!(node, key = %fp, "not dialing into a node whose certificate was revoked");
            }
            *refused = Some(std::time::Instant::now());
            return Err(unreachable(format!("node {node}: a certificate on this link is revoked")));
        }
        *known.refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *slot = Some((conn.clone(), fp));
        Ok(conn)
    }

    /// One unary RPC on its own stream, bounded by `ttl`.
    async fn call(&self, target: NodeId, req: PeerRequest, ttl: Duration) -> Result<PeerResponse, RPCError<C>> {
        let attempt = async {
            let conn = self.connection(target).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(unreachable)?;
            frame::write(&mut send, &req).await.map_err(network)?;
            send.finish().map_err(network)?;
            match frame::read::<_, PeerResponse>(&mut recv, PEER_FRAME_BYTES_MAX).await.map_err(network)? {
                Some(PeerResponse::Error(e)) => Err(unreachable(format!("node {target}: {e}"))),
                Some(resp) => Ok(resp),
                None => Err(network("peer closed the stream without answering")),
            }
        };
        match tokio::time::timeout(ttl, attempt).await {
            Ok(r) => r,
            Err(_) => Err(network(format!("rpc to node {target} timed out after {ttl:?}"))),
        }
    }

    /// A control RPC (cluster formation, joining a group) to `node`, bounded by `ttl`.
    pub async fn control(&self, node: NodeId, req: PeerRequest, ttl: Duration) -> Result<PeerResponse, String> {
        self.call(node, req, ttl).await.map_err(|e| e.to_string())
    }

    /// One AppendEntries exchange on a lane of (`target`, `shard`), bounded by `ttl`.
    ///
    /// A stream per RPC costs both nodes an open, an accept, a task spawn and a close per
    /// round; under load each of those waits its turn on a busy runtime. A lane (see
    /// [`crate::net::lane`]) is opened once and reused while it works; the follower serves it in
    /// one task (see [`handle_stream`]).
    async fn append(
        &self,
        target: NodeId,
        shard: ShardId,
        rpc: AppendEntriesRequest,
        ttl: Duration,
    ) -> Result<PeerResponse, RPCError<C>> {
        let req = PeerRequest::Append { shard, to: target, rpc };
        self.lane_exchange(&self.inner.lanes, (target, shard), target, &req, "append", ttl, Ok)
            .await
            .map_err(FrameError::into_rpc)
    }

    /// Writes `req` on a lane of `lanes` (keyed `key`) to `target` and reads its answer,
    /// which `accept` checks, all bounded by `ttl`. The lane goes back to the pool only after
    /// an exchange that ended with an accepted answer: one that failed half-way may have left
    /// part of a frame on the stream. The peer's `Error` answer, and failing to connect or to
    /// open the lane, are the peer being unreachable; the rest is a failed exchange.
    #[allow(clippy::too_many_arguments)]
    async fn lane_exchange<K: Eq + std::hash::Hash + Copy, T>(
        &self,
        lanes: &LanePool<K>,
        key: K,
        target: NodeId,
        req: &PeerRequest,
        what: &str,
        ttl: Duration,
        accept: impl FnOnce(PeerResponse) -> Result<T, FrameError>,
    ) -> Result<T, FrameError> {
        let unreachable = |e: String| FrameError { unreachable: true, reason: e };
        let failed = |e: String| FrameError { unreachable: false, reason: e };
        let attempt = async {
            let conn = self.connection(target).await.map_err(|e| unreachable(e.to_string()))?;
            let mut lane = lanes.take_or_open(key, &conn).await.map_err(|e| unreachable(e.to_string()))?;
            frame::write(&mut lane.send, req).await.map_err(|e| failed(e.to_string()))?;
            let answer = match frame::read::<_, PeerResponse>(&mut lane.recv, PEER_FRAME_BYTES_MAX)
                .await
                .map_err(|e| failed(e.to_string()))?
            {
                Some(PeerResponse::Error(e)) => return Err(unreachable(format!("node {target}: {e}"))),
                Some(resp) => accept(resp)?,
                None => return Err(failed("peer closed the lane without answering".into())),
            };
            lanes.give_back(key, lane);
            Ok(answer)
        };
        match tokio::time::timeout(ttl, attempt).await {
            Ok(r) => r,
            Err(_) => Err(failed(format!("{what} to node {target} timed out after {ttl:?}"))),
        }
    }

    /// One AppendEntries exchange in a frame shared with the other groups' to `target`.
    ///
    /// Each group replicates on its own, so their rounds to one peer are not aligned; a frame
    /// queue with room to spare carries each round nearly alone. Here at most
    /// `frames_in_flight` frames to a peer are out at once: a group's request waits for the
    /// next frame, and every group whose answer came back in the same frame goes out in the
    /// one after, together. The peer answers a frame when every request in it is done.
    async fn framed_append(
        &self,
        target: NodeId,
        shard: ShardId,
        rpc: AppendEntriesRequest,
        ttl: Duration,
    ) -> Result<PeerResponse, RPCError<C>> {
        let framer = self.framer(target);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let bytes = rpc.entries.iter().map(entry_bytes).sum();
        framer.queue.lock().unwrap_or_else(|p| p.into_inner()).push(Waiting { shard, rpc, bytes, reply });
        framer.wake.notify_one();
        match tokio::time::timeout(ttl, answer).await {
            Ok(Ok(Ok(PeerResponse::Error(e)))) => Err(unreachable(format!("node {target}: {e}"))),
            // Not the peer's fault: retried after openraft's short back-off for a network error.
            Ok(Ok(Ok(PeerResponse::Busy))) => Err(network(format!("node {target}: shard {shard} is busy there"))),
            Ok(Ok(Ok(resp))) => Ok(resp),
            Ok(Ok(Err(e))) => Err(e.into_rpc()),
            Ok(Err(_)) => Err(network("the frame to the peer was dropped")),
            Err(_) => Err(network(format!("append to node {target} timed out after {ttl:?}"))),
        }
    }

    /// The frame queue of `target`, with its senders started on first use.
    fn framer(&self, target: NodeId) -> Arc<Framer> {
        let mut framers = self.inner.framers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = framers.get(&target) {
            return f.clone();
        }
        let framer = Arc::new(Framer::default());
        framers.insert(target, framer.clone());
        for sender in 0..self.inner.frames_in_flight {
            tokio::spawn(send_frames(Arc::downgrade(&self.inner), target, sender, framer.clone()));
        }
        framer
    }

    /// Sends one frame of AppendEntries on `sender`'s lane to `target` and reads its answers.
    async fn exchange_frame(
        &self,
        target: NodeId,
        sender: usize,
        items: Vec<(ShardId, NodeId, AppendEntriesRequest)>,
        ttl: Duration,
    ) -> Result<Vec<PeerResponse>, FrameError> {
        let count = items.len();
        let accept = |resp| match resp {
            PeerResponse::Appends(answers) if answers.len() == count => Ok(answers),
            other => Err(FrameError { unreachable: false, reason: format!("unexpected answer to a frame: {other:?}") }),
        };
        let req = PeerRequest::Appends(items);
        self.lane_exchange(&self.inner.frame_lanes, (target, sender), target, &req, "frame", ttl, accept).await
    }
}

/// One of `target`'s frame senders: takes what is waiting (up to [`APPEND_PAYLOAD_BYTES`] of
/// entries, one request at least), sends it as one frame, hands out the answers, and again.
/// Ends when the node's [`PeerNet`] is gone.
async fn send_frames(net: std::sync::Weak<Inner>, target: NodeId, sender: usize, framer: Arc<Framer>) {
    loop {
        let batch = loop {
            // Let the other groups' replication tasks woken with this one queue theirs.
            tokio::task::yield_now().await;
            let wake = framer.wake.notified();
            let batch = take_frame(&mut framer.queue.lock().unwrap_or_else(|p| p.into_inner()));
            if !batch.is_empty() {
                // Another sender may take what is left.
                framer.wake.notify_one();
                break batch;
            }
            if net.strong_count() == 0 {
                return;
            }
            wake.await;
        };
        let Some(inner) = net.upgrade() else { return };
        let net_now = PeerNet { inner };
        let ttl = net_now.inner.append_timeout;
        let mut replies = Vec::with_capacity(batch.len());
        let items = batch
            .into_iter()
            .map(|w| {
                replies.push(w.reply);
                (w.shard, target, w.rpc)
            })
            .collect();
        net_now.inner.stats.append_frames.fetch_add(1, Ordering::Relaxed);
        let answers = net_now.exchange_frame(target, sender, items, ttl).await;
        drop(net_now);
        match answers {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The requests of the next frame, oldest first: up to [`APPEND_PAYLOAD_BYTES`] of entries
/// (the first whatever its size; each is already cut to that budget). Requests whose caller
/// gave up (timed out or cancelled: openraft sends them again) are dropped, not sent.
fn take_frame(queue: &mut Vec<Waiting>) -> Vec<Waiting> {
    queue.retain(|w| !w.reply.is_closed());
    let mut bytes = 0;
    let fits = queue
        .iter()
        .take_while(|w| {
            let fits = bytes == 0 || bytes + w.bytes <= APPEND_PAYLOAD_BYTES;
            bytes += w.bytes.max(1);
            fits
        })
        .count();
    queue.drain(..fits).collect()
}

/// Roughly the bytes an entry takes on the wire.
fn entry_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(command) => command.approx_bytes(),
        _ => 256,
    }
}

/// Cuts `rpc` to its longest prefix of entries within `budget` approximate bytes (at least
/// one entry). Returns the last log id it kept if it cut anything: the follower's success
/// then stands for that prefix only, and openraft sends the rest next.
fn fit_payload(rpc: &mut AppendEntriesRequest, budget: usize) -> Option<LogId> {
    let mut bytes = 0;
    let fits = rpc
        .entries
        .iter()
        .take_while(|e| {
            bytes += entry_bytes(e);
            bytes <= budget
        })
        .count()
        .max(1);
    if fits >= rpc.entries.len() {
        return None;
    }
    rpc.entries.truncate(fits);
    rpc.entries.last().map(|e| e.log_id)
}

fn unexpected(resp: PeerResponse) -> RPCError<C> {
    network(format!("unexpected peer response {resp:?}"))
}

impl GroupRouter<C, ShardId> for PeerNet {
    type SnapshotData = ShardSnapshot;

    async fn append_entries(
        &self,
        target: NodeId,
        shard: ShardId,
        mut rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse, RPCError<C>> {
        let _asking = self.inner.asking.enter();
        let ttl = option.hard_ttl().max(self.inner.append_timeout);
        let pace = if rpc.entries.is_empty() { None } else { self.learner_pace(shard, target) };
        let cut = fit_payload(&mut rpc, if pace.is_some() { PACED_APPEND_BYTES } else { APPEND_PAYLOAD_BYTES });
        if let Some(limit) = pace {
            let bytes: usize = rpc.entries.iter().map(entry_bytes).sum();
            let due = self.pace(shard, target, bytes, limit);
            tokio::time::sleep_until(due.into()).await;
        }
        let stats = &self.inner.stats;
        if cut.is_some() {
            stats.append_rpcs_cut.fetch_add(1, Ordering::Relaxed);
        }
        stats.append_rpcs.fetch_add(1, Ordering::Relaxed);
        let carries = !rpc.entries.is_empty();
        if carries {
            stats.append_rpc_entries.fetch_add(rpc.entries.len() as u64, Ordering::Relaxed);
        } else {
            stats.append_rpcs_empty.fetch_add(1, Ordering::Relaxed);
        }
        let sent = std::time::Instant::now();
        let answer = if self.inner.frames_in_flight > 0 {
            self.framed_append(target, shard, rpc, ttl).await
        } else {
            self.append(target, shard, rpc, ttl).await
        };
        if carries && answer.is_ok() {
            self.inner.stages.record(Stage::Replicate, sent.elapsed());
        }
        match (answer?, cut) {
            (PeerResponse::Append(AppendEntriesResponse::Success), Some(last)) => {
                Ok(AppendEntriesResponse::PartialSuccess(Some(last)))
            }
            (PeerResponse::Append(r), _) => Ok(r),
            (other, _) => Err(unexpected(other)),
        }
    }

    async fn vote(
        &self,
        target: NodeId,
        shard: ShardId,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RPCError<C>> {
        let _asking = self.inner.asking.enter();
        match self.call(target, PeerRequest::Vote { shard, to: target, rpc }, option.hard_ttl()).await? {
            PeerResponse::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn pre_vote(
        &self,
        target: NodeId,
        shard: ShardId,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RPCError<C>> {
        let _asking = self.inner.asking.enter();
        match self.call(target, PeerRequest::PreVote { shard, to: target, rpc }, option.hard_ttl()).await? {
            PeerResponse::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn transfer_leader(
        &self,
        target: NodeId,
        shard: ShardId,
        rpc: TransferLeaderRequest,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse, RPCError<C>> {
        let _asking = self.inner.asking.enter();
        match self.call(target, PeerRequest::TransferLeader { shard, to: target, rpc }, option.hard_ttl()).await? {
            PeerResponse::TransferLeader(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &self,
        target: NodeId,
        shard: ShardId,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse, StreamingError<C>> {
        let to_streaming = |e: RPCError<C>| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Network(n) => StreamingError::Network(n),
            other => StreamingError::Network(NetworkError::from_string(other.to_string())),
        };
        let transfer = async {
            let conn = self.connection(target).await.map_err(to_streaming)?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| to_streaming(unreachable(e)))?;
            let streaming = Streaming::start(&self.inner, shard, target);
            let meta = snapshot.meta.clone();
            frame::write(&mut send, &PeerRequest::Snapshot { shard, to: target, vote, meta })
                .await
                .map_err(|e| to_streaming(network(e)))?;
            let local = match snapshot.snapshot {
                ShardSnapshot::Local(local) => local,
                ShardSnapshot::Spooled(_) => return Err(to_streaming(network("cannot forward a spooled snapshot"))),
            };
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(SNAPSHOT_CHUNKS_IN_FLIGHT);
            let reader = tokio::task::spawn_blocking(move || {
                local.for_each_chunk(|chunk| {
                    tx.blocking_send(chunk).map_err(|_| Error::Unavailable("snapshot stream closed".into()))
                })
            });
            let mut bytes = 0usize;
            let started = std::time::Instant::now();
            // Only a move's copy is paced: a learner's, or the replica a move adds. A voter
            // that needs a snapshot (one that was down while the log it missed was purged)
            // recovers at full speed, since until it does it cannot count in a quorum.
            // Decided once, at the start: a learner promoted mid-copy keeps its pace.
            let limit = self.snapshot_pace(shard, target).unwrap_or(0);
            while let Some(chunk) = rx.recv().await {
                // Paced, a chunk leaves as frames of a slice each (the receiver appends chunks
                // as bytes, so where they split does not matter), each when the bytes before it
                // may have: the rate holds within a slice rather than a chunk of about 1 MiB,
                // the copy's progress moves as it goes, and no frame takes longer to arrive
                // than the receiver allows one (`frame::FRAME_BODY_TIMEOUT`).
                let slice = if limit > 0 { SNAPSHOT_PACE_SLICE_BYTES } else { chunk.len() };
                for piece in chunk.chunks(slice.max(1)) {
                    if limit > 0 {
                        let due = started + Duration::from_secs_f64(bytes as f64 / limit as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    frame::write(&mut send, &PeerRequest::SnapshotChunk(piece.to_vec()))
                        .await
                        .map_err(|e| to_streaming(network(e)))?;
                    bytes += piece.len();
                    streaming.sent(piece.len());
                }
            }
            reader
                .await
                .map_err(|e| to_streaming(network(e)))?
                .map_err(|e| to_streaming(network(format!("reading snapshot: {e}"))))?;
            frame::write(&mut send, &PeerRequest::SnapshotEnd { bytes: bytes as u64 })
                .await
                .map_err(|e| to_streaming(network(e)))?;
            send.finish().map_err(|e| to_streaming(network(e)))?;
            tracing::info!(shard, target, bytes, "snapshot streamed; waiting for install");
            let resp = tokio::time::timeout(
                SNAPSHOT_INSTALL_TIMEOUT,
                frame::read::<_, PeerResponse>(&mut recv, PEER_FRAME_BYTES_MAX),
            )
            .await
            .map_err(|_| to_streaming(network("snapshot install timed out")))?
            .map_err(|e| to_streaming(network(e)))?;
            match resp {
                Some(PeerResponse::Snapshot(r)) => {
                    streaming.installed(target);
                    Ok(r)
                }
                Some(other) => Err(to_streaming(unexpected(other))),
                None => Err(to_streaming(network("peer closed the snapshot stream"))),
            }
        };
        tokio::select! {
            r = transfer => r,
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

/// openraft's network factory for one shard: every client shares the node's [`PeerNet`].
#[derive(Clone)]
pub struct ShardNetworkFactory {
    pub net: PeerNet,
    pub shard: ShardId,
}

impl RaftNetworkFactory<C> for ShardNetworkFactory {
    type Network = GroupNetworkAdapter<C, ShardId, PeerNet>;

    async fn new_client(&mut self, target: NodeId, _node: &Member) -> Self::Network {
        GroupNetworkAdapter::new(self.net.clone(), target, self.shard)
    }
}

/// Serves peer RPCs until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, ctx: PeerContext) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "peer handshake failed");
                    return;
                }
            };
            // The node CA verified the certificate; it also names the one node this peer
            // may speak for.
            let (peer, fingerprint) = match crate::net::tls::peer_credential_of(&conn) {
                Ok(credential) => credential,
                Err(e) => {
                    tracing::warn!(remote = %conn.remote_address(), error = %e, "refusing a peer");
                    conn.close(0x10u32.into(), b"the certificate names no node");
                    return;
                }
            };
            let mut revoked = ctx.revoked.clone();
            if revoked.borrow_and_update().contains(&fingerprint) {
                // A revoked node redials on every RPC it tries: said once per key.
                if ctx.refused_keys.lock().unwrap_or_else(|p| p.into_inner()).insert(fingerprint.clone()) {
                    tracing::warn!(remote = %conn.remote_address(), node = peer, key = %fingerprint,
                        "refusing a node whose certificate was revoked (said once per key)");
                }
                conn.close(CLOSE_PEER_REVOKED.into(), PEER_REVOKED_REASON.as_bytes());
                return;
            }
            let span = tracing::info_span!("peer", remote = %conn.remote_address(), node = peer);
            async move {
                loop {
                    tokio::select! {
                        accepted = conn.accept_bi() => match accepted {
                            Ok((send, recv)) => {
                                tokio::spawn(handle_stream(send, recv, peer, ctx.clone()).in_current_span());
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "peer connection closed");
                                return;
                            }
                        },
                        () = crate::net::tls::revoked_later(&mut revoked, &fingerprint) => {
                            tracing::warn!(key = %fingerprint, "closing the connection of a node whose certificate was just revoked");
                            conn.close(CLOSE_PEER_REVOKED.into(), PEER_REVOKED_REASON.as_bytes());
                            return;
                        }
                    }
                }
            }
            .instrument(span)
            .await
        });
    }
}

fn hosted(groups: &Groups, shard: ShardId) -> Result<Hosted, String> {
    let map = groups.read().map_err(|_| "group registry poisoned".to_string())?;
    map.get(&shard).cloned().ok_or_else(|| format!("shard {shard} is not hosted on this node"))
}

/// The local group of `shard`, if it runs as replica `to`: a message for another replica
/// id (an older generation of this node) is refused, never handed to this one.
fn group(groups: &Groups, shard: ShardId, to: NodeId) -> Result<Raft, String> {
    let h = hosted(groups, shard)?;
    if h.replica != to {
        return Err(format!("shard {shard}: this node hosts replica {} here, not {to}", h.replica));
    }
    Ok(h.raft)
}

async fn handle_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, peer: NodeId, ctx: PeerContext) {
    // AppendEntries keep the stream for the next one (a lane, see `PeerNet::append`); any
    // other request is the stream's only one.
    loop {
        let (response, lane) = match frame::read::<_, PeerRequest>(&mut recv, PEER_FRAME_BYTES_MAX).await {
            Ok(Some(req)) => {
                let _serving = ctx.serving.enter();
                let lane = matches!(req, PeerRequest::Append { .. } | PeerRequest::Appends(_));
                match claimed_node(&req) {
                    Some(claimed) if claimed != peer => (
                        PeerResponse::Error(format!(
                            "node {peer}'s certificate cannot speak for node {claimed}; request refused"
                        )),
                        false,
                    ),
                    _ => (dispatch(req, &mut recv, &ctx).await, lane),
                }
            }
            Ok(None) => break,
            Err(e) => (PeerResponse::Error(format!("bad request: {e}")), false),
        };
        if frame::write(&mut send, &response).await.is_err() || !lane {
            break;
        }
    }
    let _ = send.finish();
}

/// The node a request claims to come from: the leader or candidate its vote names, or the
/// node that asks to join or be promoted. `None` for requests any node may make.
fn claimed_node(req: &PeerRequest) -> Option<NodeId> {
    use openraft::vote::RaftLeaderId;
    let of_vote = |v: &Vote| node_of(*v.leader_id().node_id());
    match req {
        PeerRequest::Append { rpc, .. } => Some(of_vote(&rpc.vote)),
        // A frame speaks for one node: every request in it must name the same leader.
        PeerRequest::Appends(items) => {
            let mut leaders = items.iter().map(|(_, _, rpc)| of_vote(&rpc.vote));
            let first = leaders.next()?;
            Some(if leaders.all(|n| n == first) { first } else { NodeId::MAX })
        }
        PeerRequest::Vote { rpc, .. } | PeerRequest::PreVote { rpc, .. } => Some(of_vote(&rpc.vote)),
        PeerRequest::TransferLeader { rpc, .. } => Some(of_vote(rpc.from_leader())),
        PeerRequest::Snapshot { vote, .. } => Some(of_vote(vote)),
        PeerRequest::Join { node, .. } => Some(*node),
        PeerRequest::Promote { replica, .. } => Some(node_of(*replica)),
        PeerRequest::Beat { node, .. } | PeerRequest::UserSends { node, .. } | PeerRequest::Leaving { node, .. } => {
            Some(*node)
        }
        PeerRequest::SnapshotChunk(_)
        | PeerRequest::SnapshotEnd { .. }
        | PeerRequest::Hello
        | PeerRequest::Prepare { .. }
        | PeerRequest::Place(_)
        | PeerRequest::ClusterMap
        | PeerRequest::Replace { .. }
        | PeerRequest::RemoveLearner { .. }
        | PeerRequest::Progress { .. }
        | PeerRequest::AddLearner { .. }
        | PeerRequest::Drop { .. } => None,
    }
}

async fn dispatch(req: PeerRequest, recv: &mut quinn::RecvStream, ctx: &PeerContext) -> PeerResponse {
    let err = |e: String| PeerResponse::Error(e);
    let groups = &ctx.groups;
    match req {
        PeerRequest::Append { shard, to, rpc } => append_here(ctx, shard, to, rpc).await,
        PeerRequest::Appends(items) => {
            let writes = items.iter().any(|(_, _, rpc)| !rpc.entries.is_empty());
            let calls = items
                .into_iter()
                .map(|(shard, to, rpc)| {
                    let carries = !rpc.entries.is_empty();
                    async move {
                        let answer = append_here(ctx, shard, to, rpc).await;
                        let wrote = wrote_entries(carries, &answer);
                        (answer, wrote)
                    }
                })
                .collect();
            let clock = if writes { Clock::FirstWrite } else { Clock::Arrival };
            PeerResponse::Appends(gather(calls, FRAME_STRAGGLER_WAIT, clock, || PeerResponse::Busy).await)
        }
        PeerRequest::Vote { shard, to, rpc } => match group(groups, shard, to) {
            Ok(raft) => {
                let answer = raft.vote(rpc).await.map(PeerResponse::Vote).unwrap_or_else(|e| err(e.to_string()));
                ctx.quiet.on_rpc(shard, "vote");
                answer
            }
            Err(e) => err(e),
        },
        PeerRequest::PreVote { shard, to, rpc } => match group(groups, shard, to) {
            Ok(raft) => {
                let answer = raft.pre_vote(rpc).await.map(PeerResponse::Vote).unwrap_or_else(|e| err(e.to_string()));
                ctx.quiet.on_rpc(shard, "pre-vote");
                answer
            }
            Err(e) => err(e),
        },
        PeerRequest::TransferLeader { shard, to, rpc } => match group(groups, shard, to) {
            Ok(raft) => {
                let answer = raft
                    .handle_transfer_leader(rpc)
                    .await
                    .map(PeerResponse::TransferLeader)
                    .unwrap_or_else(|e| err(e.to_string()));
                ctx.quiet.hold(shard, "transfer leader");
                answer
            }
            Err(e) => err(e),
        },
        PeerRequest::Snapshot { shard, to, vote, meta } => match group(groups, shard, to) {
            Ok(raft) => {
                ctx.quiet.on_rpc(shard, "snapshot");
                receive_snapshot(raft, shard, vote, meta, recv, ctx).await.unwrap_or_else(err)
            }
            Err(e) => err(e),
        },
        PeerRequest::Beat { node, incarnation, quiesced } => {
            ctx.quiet.on_beat(node, incarnation, &quiesced, std::time::Instant::now());
            PeerResponse::Beat
        }
        PeerRequest::Leaving { node, incarnation } => {
            ctx.quiet.on_leaving(node, incarnation, std::time::Instant::now());
            PeerResponse::Beat
        }
        PeerRequest::UserSends { users, .. } => {
            // At most USER_SENDS_MAX: a longer list does not decode.
            (ctx.user_sends)(&users);
            PeerResponse::UserSendsTaken
        }
        PeerRequest::SnapshotChunk(_) | PeerRequest::SnapshotEnd { .. } => {
            err("snapshot frame without a snapshot header".into())
        }
        PeerRequest::Hello => PeerResponse::Hello(ctx.formation.record()),
        PeerRequest::Prepare { cluster } => match ctx.formation.prepare(cluster).await {
            Ok(record) => PeerResponse::Hello(Some(record)),
            Err(e) => err(e.to_string()),
        },
        PeerRequest::Join { shard, node, member } => match hosted(groups, shard) {
            Ok(h) => super::formation::join(&h, shard, node, member).await,
            Err(e) => err(e),
        },
        PeerRequest::Promote { shard, replica, .. } => match hosted(groups, shard) {
            Ok(h) => super::formation::promote(&h, shard, replica).await,
            Err(e) => err(e),
        },
        PeerRequest::Place(command) => match hosted(groups, crate::placement::META_SHARD) {
            Ok(h) => super::meta::propose(&h, command).await,
            Err(e) => err(e),
        },
        PeerRequest::ClusterMap => match ctx.formation.cluster_map() {
            Ok(map) => PeerResponse::ClusterMap(Box::new(map)),
            Err(e) => err(e.to_string()),
        },
        PeerRequest::Replace { shard, from, replica, .. } => match hosted(groups, shard) {
            Ok(h) => {
                // It may hand this node's leadership away.
                ctx.quiet.hold(shard, "handing leadership away");
                super::formation::replace(&h, shard, from, replica).await
            }
            Err(e) => err(e),
        },
        PeerRequest::RemoveLearner { shard, node, replica } => match hosted(groups, shard) {
            Ok(h) => super::formation::remove_learner(&h, shard, node, replica).await,
            Err(e) => err(e),
        },
        PeerRequest::AddLearner { shard, node, member, from, min_generation } => match hosted(groups, shard) {
            Ok(h) => super::formation::add_learner(&h, shard, node, member, from, min_generation).await,
            Err(e) => err(e),
        },
        PeerRequest::Progress { shard, replica } => match hosted(groups, shard) {
            Ok(h) => super::formation::progress(&h, replica),
            Err(e) => err(e),
        },
        PeerRequest::Drop { shard, replicas } => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if ctx.drops.send((shard, replicas, tx)).await.is_err() {
                return err("this node is stopping".into());
            }
            match rx.await {
                Ok(Ok(())) => PeerResponse::Dropped,
                Ok(Err(e)) => err(e),
                Err(_) => err("this node stopped before dropping the shard".into()),
            }
        }
    }
}

/// Whether an answer to an AppendEntries that carried entries wrote them: only an accepted
/// append waits for its fsync. A rejection (a conflicting `prev_log_id`, a higher vote) is
/// answered at once, and must not start a frame's straggler clock ([`gather`]) for the
/// writes beside it.
fn wrote_entries(carries: bool, answer: &PeerResponse) -> bool {
    carries
        && matches!(
            answer,
            PeerResponse::Append(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_))
        )
}

/// When a frame's straggler clock starts ([`gather`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// At the first answer that wrote entries: a frame that carries entries.
    FirstWrite,
    /// When the frame arrives: a frame of heartbeats and commit updates only. Each waits
    /// only for its group's earlier writes to be flushed, which is at once unless the group
    /// is busy here (installing a snapshot keeps every append to it waiting until the
    /// install is done); with no write to start the clock, such a frame would otherwise hold
    /// one of the leader's frame slots to this node until the leader's timeout.
    Arrival,
}

/// Runs a frame's `calls` together and returns their answers in order: every one, or those
/// done within `straggle` of the clock's start (see [`Clock`]; a request whose group is busy
/// here must not hold up the others); the rest are `late()` and their calls dropped (the
/// leader sends them again). Each call answers whether it wrote entries: answers that needed
/// no write (a heartbeat, a rejection) come at once and do not start the clock of a frame
/// that carries entries, so a slow fsync, which every writing request of the frame waits for
/// alike, cuts none.
async fn gather<T, F: Future<Output = (T, bool)>>(
    calls: Vec<F>,
    straggle: Duration,
    clock: Clock,
    late: impl Fn() -> T,
) -> Vec<T> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut answers: Vec<Option<T>> = calls.iter().map(|_| None).collect();
    let mut pending: FuturesUnordered<_> =
        calls.into_iter().enumerate().map(|(i, f)| async move { (i, f.await) }).collect();
    let mut until = (clock == Clock::Arrival).then(|| tokio::time::Instant::now() + straggle);
    loop {
        let next = match until {
            None => pending.next().await,
            Some(until) => tokio::time::timeout_at(until, pending.next()).await.unwrap_or(None),
        };
        let Some((i, (answer, wrote))) = next else { break };
        answers[i] = Some(answer);
        if wrote && until.is_none() {
            until = Some(tokio::time::Instant::now() + straggle);
        }
    }
    answers.into_iter().map(|a| a.unwrap_or_else(&late)).collect()
}

/// One AppendEntries to the local replica `to` of `shard`.
async fn append_here(ctx: &PeerContext, shard: ShardId, to: NodeId, rpc: AppendEntriesRequest) -> PeerResponse {
    match group(&ctx.groups, shard, to) {
        Ok(raft) => {
            let (arrived, carries) = (std::time::Instant::now(), !rpc.entries.is_empty());
            let answer = raft.append_entries(rpc).await;
            // After the append, which renewed the leader's lease here: a tick before it
            // could start an election. A heartbeat wakes nothing: a quiesced leader sends one
            // now and then to keep its lease, and a woken one stops naming the group in its
            // beats.
            if carries {
                ctx.quiet.on_rpc(shard, "append");
            }
            if carries && answer.is_ok() {
                ctx.stages.record(Stage::FollowerAppend, arrived.elapsed());
            }
            answer.map(PeerResponse::Append).unwrap_or_else(|e| PeerResponse::Error(e.to_string()))
        }
        Err(e) => PeerResponse::Error(e),
    }
}

async fn receive_snapshot(
    raft: Raft,
    shard: ShardId,
    vote: Vote,
    meta: SnapshotMeta,
    recv: &mut quinn::RecvStream,
    ctx: &PeerContext,
) -> Result<PeerResponse, String> {
    let (spool_dir, space, refused) = (&ctx.spool_dir, &ctx.space, &ctx.snapshot_refusals);
    // The spool, then the install's copy in the store, both above the disk reserve and beside
    // what other receives hold: a write that met a full disk would stop this replica's group
    // (and leave RocksDB read-only).
    let mut held = space.hold();
    // A snapshot of this shard refused for room is refused at once until the room it needed
    // is there: the leader sends it again every few hundred milliseconds, and each attempt
    // would copy and delete as much as fits.
    let needed = refused.lock().unwrap_or_else(|p| p.into_inner()).get(&shard).copied();
    if let Some(needed) = needed.filter(|n| *n > held.available()) {
        return Err(format!(
            "disk full: shard {shard}'s snapshot needs more than {needed} bytes above limits.disk_free_min_bytes \
             here (its spool and its copy in the store), {} are free of it; nothing received, the replica lags \
             until space is freed",
            held.available()
        ));
    }
    let path = spool_dir.join(format!("shard-{shard}-{:016x}.snap", rand::random::<u64>()));
    let result = async {
        let mut spool = SpoolWriter::create(path.clone()).map_err(|e| e.to_string())?;
        if let Err(e) = spool_snapshot(recv, &mut spool, |chunk| held.take(2 * chunk)).await {
            if e.starts_with(NO_ROOM) {
                let needed = 2 * spool.bytes + 2 * crate::store::snapshot::CHUNK_BYTES as u64;
                refused.lock().unwrap_or_else(|p| p.into_inner()).insert(shard, needed);
            }
            return Err(e);
        }
        refused.lock().unwrap_or_else(|p| p.into_inner()).remove(&shard);
        tracing::info!(shard, bytes = spool.bytes, "snapshot received; installing");
        let path = spool.finish().map_err(|e| e.to_string())?;
        // Refused here, not in the state machine: openraft stops a group whose install fails.
        let checked = path.clone();
        tokio::task::spawn_blocking(move || crate::store::snapshot::check_spool(&checked, shard))
            .await
            .map_err(|e| format!("checking a received snapshot: {e}"))?
            .map_err(|e| format!("snapshot refused, nothing installed: {e}"))?;
        let snapshot = Snapshot { meta, snapshot: ShardSnapshot::Spooled(path) };
        raft.install_full_snapshot(vote, snapshot).await.map(PeerResponse::Snapshot).map_err(|e| e.to_string())
    }
    .await;
    let _ = std::fs::remove_file(&path);
    result
}

/// How a refusal for lack of room begins.
const NO_ROOM: &str = "disk full: a snapshot of more than";

/// A shard's snapshot refused for lack of room, with the room it needed at least.
pub type SnapshotRefusals = Arc<std::sync::Mutex<HashMap<ShardId, u64>>>;

/// Writes a snapshot's chunks to `spool` up to its `SnapshotEnd`, each only once `room`
/// agreed to its bytes. A stream that ends before it, or whose end counts other bytes than
/// arrived, is refused: installing a cut snapshot would fail inside the state machine, which
/// openraft treats as fatal for the replica. One that does not fit is refused before it
/// fills the disk; the leader sends it again later, and the replica lags meanwhile.
async fn spool_snapshot<R: tokio::io::AsyncRead + Unpin>(
    recv: &mut R,
    spool: &mut SpoolWriter,
    mut room: impl FnMut(u64) -> bool,
) -> Result<(), String> {
    loop {
        match frame::read::<_, PeerRequest>(recv, PEER_FRAME_BYTES_MAX).await.map_err(|e| e.to_string())? {
            Some(PeerRequest::SnapshotChunk(chunk)) => {
                if !room(chunk.len() as u64) {
                    return Err(format!(
                        "{NO_ROOM} {} bytes does not fit twice (its spool and its copy in the store) above \
                         limits.disk_free_min_bytes here, beside other snapshots being received; nothing installed, \
                         the replica lags until space is freed",
                        spool.bytes
                    ));
                }
                spool.write_chunk(&chunk).map_err(|e| e.to_string())?
            }
            Some(PeerRequest::SnapshotEnd { bytes }) if bytes == spool.bytes => return Ok(()),
            Some(PeerRequest::SnapshotEnd { bytes }) => {
                return Err(format!("snapshot ended at {} bytes but its sender counted {bytes}", spool.bytes))
            }
            Some(_) => return Err("unexpected frame inside a snapshot".to_string()),
            None => {
                return Err(format!(
                    "snapshot stream ended after {} bytes without its end: cut short by the sender, nothing installed",
                    spool.bytes
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Command, SendCommand};
    use openraft::entry::RaftEntry;

    fn entry(index: u64, text_bytes: usize) -> Entry {
        let send = SendCommand {
            conversation: "c".into(),
            sender: "u".into(),
            client_id: 1,
            client_seq: index,
            ts_ms: 0,
            text: "x".repeat(text_bytes),
        };
        Entry::new_normal(openraft::testing::log_id::<C>(1, 1, index), Command::Send(send))
    }

    fn request(sizes: &[usize]) -> AppendEntriesRequest {
        AppendEntriesRequest {
            vote: Vote::new(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: sizes.iter().enumerate().map(|(i, n)| entry(i as u64 + 1, *n)).collect(),
        }
    }

    fn indexes(rpc: &AppendEntriesRequest) -> Vec<u64> {
        rpc.entries.iter().map(|e| e.log_id.index).collect()
    }

    #[test]
    fn a_copys_bytes_are_its_newest_streams_even_while_a_failed_one_ends() {
        let mut copies = Copies::new();
        let key = (3, 7);
        let t0 = std::time::Instant::now();
        let first = copy_started(&mut copies, key, t0);
        copy_sent(&mut copies, key, first, 1_000);
        // A second stream starts before the first has ended; the first still sends a little.
        let second = copy_started(&mut copies, key, t0);
        copy_sent(&mut copies, key, first, 500);
        copy_sent(&mut copies, key, second, 200);
        assert_eq!((copies[&key].bytes_sent, copies[&key].sending()), (200, true));
        copy_ended(&mut copies, key, t0);
        assert!(copies[&key].sending(), "the second stream still goes out");
        copy_sent(&mut copies, key, second, 300);
        copy_ended(&mut copies, key, t0);
        assert_eq!((copies[&key].bytes_sent, copies[&key].sending()), (500, false));
        // Another replica's copy is its own; an ended copy is forgotten after an hour.
        copy_sent(&mut copies, (3, 8), 1, 10);
        assert!(!copies.contains_key(&(3, 8)));
        copy_started(&mut copies, (3, 8), t0 + SNAPSHOT_COPY_SHOWN);
        assert!(!copies.contains_key(&key), "shown for an hour after it ended");
    }

    #[test]
    fn a_request_within_budget_is_sent_whole() {
        let mut rpc = request(&[100, 100, 100]);
        assert_eq!(fit_payload(&mut rpc, 1_000), None);
        assert_eq!(indexes(&rpc), vec![1, 2, 3]);
        let mut empty = request(&[]);
        assert_eq!(fit_payload(&mut empty, 1_000), None);
    }

    #[test]
    fn a_request_over_budget_is_cut_to_a_prefix_and_names_its_last_entry() {
        let mut rpc = request(&[300, 300, 300, 300]);
        let last = fit_payload(&mut rpc, 800).expect("cut");
        assert_eq!(indexes(&rpc), vec![1, 2]);
        assert_eq!(last.index, 2);
    }

    #[test]
    fn an_entry_larger_than_the_budget_still_goes_alone() {
        let mut rpc = request(&[5_000, 10]);
        assert_eq!(fit_payload(&mut rpc, 1_000).map(|l| l.index), Some(1));
        assert_eq!(indexes(&rpc), vec![1]);
    }

    #[test]
    fn the_largest_allowed_request_fits_a_peer_frame() {
        let mut rpc = request(&[1 << 20; 40]);
        fit_payload(&mut rpc, APPEND_PAYLOAD_BYTES);
        let frame = frame::encode(&PeerRequest::Append { shard: 0, to: u64::MAX, rpc });
        assert!(frame.len() <= APPEND_PAYLOAD_BYTES + 1024, "{} bytes", frame.len());
    }

    /// A snapshot stream as a sender writes it: `chunks`, then (if given) its end frame.
    fn snapshot_stream(chunks: &[&[u8]], end: Option<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(frame::encode(&PeerRequest::SnapshotChunk(c.to_vec())));
        }
        if let Some(bytes) = end {
            out.extend(frame::encode(&PeerRequest::SnapshotEnd { bytes }));
        }
        out
    }

    async fn spool_within(stream: Vec<u8>, room: u64) -> (Result<(), String>, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = SpoolWriter::create(dir.path().join("s.snap")).expect("spool");
        let mut left = room;
        let take = |n: u64| match left.checked_sub(n) {
            Some(l) => {
                left = l;
                true
            }
            None => false,
        };
        let r = spool_snapshot(&mut stream.as_slice(), &mut spool, take).await;
        (r, spool.bytes)
    }

    async fn spool(stream: Vec<u8>) -> (Result<(), String>, u64) {
        spool_within(stream, u64::MAX).await
    }

    #[tokio::test]
    async fn a_snapshot_larger_than_the_room_above_the_reserve_is_refused_before_it_is_written() {
        let (r, bytes) = spool_within(snapshot_stream(&[b"abcd", b"efg"], Some(7)), 7).await;
        assert_eq!((r, bytes), (Ok(()), 7), "exactly the room");
        let (r, bytes) = spool_within(snapshot_stream(&[b"abcd", b"efg"], Some(7)), 6).await;
        let e = r.expect_err("one byte more than the room");
        assert!(e.starts_with(NO_ROOM) && e.contains("more than 4 bytes"), "{e}");
        assert_eq!(bytes, 4, "the chunk that would not fit was not written");
    }

    #[tokio::test]
    async fn a_whole_snapshot_stream_is_spooled() {
        let (r, bytes) = spool(snapshot_stream(&[b"abcd", b"efg"], Some(7))).await;
        assert_eq!(r, Ok(()));
        assert_eq!(bytes, 7);
    }

    #[tokio::test]
    async fn a_snapshot_stream_cut_before_its_end_is_refused() {
        // What a receiver saw when the sender lost leadership mid-copy: the stream finished
        // cleanly after the first chunk. Installing those 16 KiB killed the replica's group.
        let (r, bytes) = spool(snapshot_stream(&[&[7u8; 16_384]], None)).await;
        let e = r.expect_err("a cut stream must not be installed");
        assert!(e.contains("without its end"), "{e}");
        assert_eq!(bytes, 16_384);
    }

    #[tokio::test]
    async fn a_snapshot_end_counting_other_bytes_is_refused() {
        let (r, _) = spool(snapshot_stream(&[b"abcd"], Some(5))).await;
        assert!(r.expect_err("a lying end").contains("counted 5"));
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_chunk_frame_is_refused() {
        let mut stream = snapshot_stream(&[b"abcdefgh"], Some(8));
        stream.truncate(6);
        assert!(spool(stream).await.0.is_err());
    }

    type Answer = tokio::sync::oneshot::Receiver<Result<PeerResponse, FrameError>>;

    /// A request of `bytes` waiting for a frame of its own shard, and where its answer goes.
    fn waiting(shard: ShardId, bytes: usize) -> (Waiting, Answer) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        (Waiting { shard, rpc: request(&[]), bytes, reply }, answer)
    }

    fn queue(requests: impl IntoIterator<Item = (ShardId, usize)>) -> (Vec<Waiting>, Vec<Answer>) {
        requests.into_iter().map(|(shard, bytes)| waiting(shard, bytes)).unzip()
    }

    fn shards(frame: &[Waiting]) -> Vec<ShardId> {
        frame.iter().map(|w| w.shard).collect()
    }

    #[test]
    fn a_frame_takes_the_oldest_requests_within_the_budget() {
        let (mut waiting, _answers) = queue([(1, 0), (2, 1_000), (3, APPEND_PAYLOAD_BYTES), (4, 10)]);
        assert_eq!(shards(&take_frame(&mut waiting)), vec![1, 2]);
        // A request as large as the budget goes alone, and what is behind it waits.
        assert_eq!(shards(&take_frame(&mut waiting)), vec![3]);
        assert_eq!(shards(&take_frame(&mut waiting)), vec![4]);
        assert!(take_frame(&mut waiting).is_empty());
        let (mut heartbeats, _answers) = queue((0..64).map(|s| (s, 0)));
        assert_eq!(take_frame(&mut heartbeats).len(), 64, "empty requests all share one frame");
    }

    #[test]
    fn a_frame_speaks_for_one_leader_only() {
        let from = |node: u64| (1, 2, AppendEntriesRequest { vote: Vote::new(1, node), ..request(&[]) });
        assert_eq!(claimed_node(&PeerRequest::Appends(vec![from(1), from(1)])), Some(1));
        assert_eq!(claimed_node(&PeerRequest::Appends(vec![from(1), from(3)])), Some(NodeId::MAX));
        assert_eq!(claimed_node(&PeerRequest::Appends(vec![])), None);
    }

    /// A frame request's answer after `after_ms`, and whether it wrote entries.
    async fn answer(after_ms: u64, name: &'static str, wrote: bool) -> (&'static str, bool) {
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        (name, wrote)
    }

    #[tokio::test]
    async fn a_frame_is_answered_in_its_order_once_every_request_is_done() {
        let calls = vec![answer(30, "a", true), answer(10, "b", true), answer(20, "c", false)];
        assert_eq!(gather(calls, Duration::from_secs(5), Clock::FirstWrite, || "late").await, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_straggler_does_not_hold_up_the_rest_of_its_frame() {
        // The first write is done after 50 ms, another 30 ms later, within the 100 ms allowed;
        // one would take 10 s (a group busy with something else).
        let calls = vec![answer(50, "a", true), answer(10_000, "slow", true), answer(80, "c", true)];
        let started = std::time::Instant::now();
        assert_eq!(gather(calls, Duration::from_millis(100), Clock::FirstWrite, || "late").await, ["a", "late", "c"]);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(150) && took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn answers_that_wrote_nothing_do_not_start_the_straggler_clock() {
        // A heartbeat answered at once, then every write 300 ms later (a slow fsync they all
        // wait for), 50 ms apart: none of them is cut.
        let calls =
            vec![answer(1, "heartbeat", false), answer(300, "a", true), answer(350, "b", true), answer(5, "no", false)];
        assert_eq!(
            gather(calls, Duration::from_millis(100), Clock::FirstWrite, || "late").await,
            ["heartbeat", "a", "b", "no"]
        );
    }

    #[tokio::test]
    async fn a_frame_without_writes_cuts_a_stuck_heartbeat_from_its_arrival() {
        // Heartbeats of idle groups answered at once; one to a group installing a snapshot
        // here would wait for the install. No write starts the clock: the frame's arrival does.
        let calls = vec![answer(1, "idle", false), answer(10_000, "installing", false), answer(2, "idle too", false)];
        let started = std::time::Instant::now();
        let answers = gather(calls, Duration::from_millis(100), Clock::Arrival, || "late").await;
        assert_eq!(answers, ["idle", "late", "idle too"]);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(5), "{took:?}");
        // With the clock of a frame that carries entries, the same frame waits it out.
        let calls = vec![answer(1, "idle", false), answer(400, "installing", false)];
        let answers = gather(calls, Duration::from_millis(100), Clock::FirstWrite, || "late").await;
        assert_eq!(answers, ["idle", "installing"]);
    }

    #[test]
    fn only_an_accepted_append_counts_as_a_write() {
        let append = |r: AppendEntriesResponse| PeerResponse::Append(r);
        assert!(wrote_entries(true, &append(AppendEntriesResponse::Success)));
        assert!(wrote_entries(true, &append(AppendEntriesResponse::PartialSuccess(None))));
        // Answered at once, before any fsync: a conflicting probe, a stale leader.
        assert!(!wrote_entries(true, &append(AppendEntriesResponse::Conflict)));
        assert!(!wrote_entries(true, &append(AppendEntriesResponse::HigherVote(Vote::new(9, 1)))));
        assert!(!wrote_entries(true, &PeerResponse::Error("no shard 3 here".into())));
        // A heartbeat writes nothing, whatever it is answered.
        assert!(!wrote_entries(false, &append(AppendEntriesResponse::Success)));
    }

    #[test]
    fn a_request_whose_caller_gave_up_is_not_sent() {
        let (mut waiting, mut answers) = queue([(7, 0), (8, 0)]);
        drop(answers.remove(0));
        assert_eq!(shards(&take_frame(&mut waiting)), vec![8]);
        assert!(waiting.is_empty());
    }

    #[tokio::test]
    async fn a_stop_waits_for_the_requests_in_flight_and_no_longer_than_its_deadline() {
        let in_flight = Arc::new(InFlight::default());
        let soon = || tokio::time::Instant::now() + Duration::from_millis(50);
        assert!(in_flight.idle_within(soon()).await, "nothing in flight");

        let first = in_flight.enter();
        let second = in_flight.enter();
        assert!(!in_flight.idle_within(soon()).await, "two in flight: the deadline ends the wait");

        let waiter = {
            let in_flight = in_flight.clone();
            tokio::spawn(
                async move { in_flight.idle_within(tokio::time::Instant::now() + Duration::from_secs(30)).await },
            )
        };
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one still in flight");
        drop(second);
        let idle =
            tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken by the last").expect("no panic");
        assert!(idle);
    }
}
