//! The Rust client: the CLI, the tests and the tools are all built on it.
//!
//! - Routes each request by the conversation's shard, to the cached leader of that shard,
//!   and follows `NotLeader{hint}` redirects. Each `NotLeader` carries the cluster's routing
//!   map: the client then routes by it, so it follows shard moves and reaches nodes its
//!   `cluster.toml` does not name.
//! - Retries a send — after a redirect, a throttle, a lost connection or an unknown
//!   outcome — with the **same** `(client_id, client_seq)`, so the server's dedup makes the
//!   retry safe; it gives up only at a deadline, reporting `Ambiguous` if any attempt's
//!   outcome was unknown.
//! - A [`Subscription`] resubscribes from the offset after the last one it delivered after
//!   any disconnect, so its consumer sees each offset exactly once, in order. A tool that
//!   tests the node rather than this library asks for [`Delivery::Raw`] instead: what one
//!   node sent, unchecked, and no resubscription.
//! - [`Client::read`] checks that offsets are consecutive; [`Client::read_raw`] returns what
//!   the node sent, unchecked.
//!
//! - A client is one user: the credential it connects with names the user, and every send,
//!   cursor and membership change it makes is that user's (the node takes the user from the
//!   certificate, not from the request).
//!
//! It depends only on the wire types of `crate::net`, never on storage or Raft.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::chat::limits::STREAMS_PER_CONNECTION_FLOOR;
use crate::chat::{shard_of, Membership, Retention, ShardId, StoredMessage};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::net::frame;
use crate::net::lane::{write_now, Lane, LanePool};
use crate::net::tls::{self, Credential, TlsPaths};
use crate::net::wire::{
    ErrorCode, MemberChange, NodeState, NodeStatus, Request, Response, RoutingMap, SendRequest, CLOSE_FULL,
    CLOSE_NO_IDENTITY, CLOSE_REVOKED, CLOSE_REVOKED_OPEN, CLOSE_USER_FULL, SEND_BATCH_MAX,
};

/// The environment variable that names the default user of [`Client::connect`] and the CLI.
pub const USER_ENV: &str = "CONVOY_USER";

/// Largest frame the client accepts from a server.
pub const RESPONSE_FRAME_BYTES_MAX: usize = 4 << 20;
/// Time allowed for one request attempt.
/// Time allowed for one request attempt. Longer than the server's commit timeout
/// (`service::SEND_TIMEOUT`) so a slow commit is answered, not abandoned.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2500);
/// How long a node that did not answer is tried last.
pub const SUSPECT_FOR: Duration = Duration::from_secs(3);
/// Default time a send keeps retrying before giving up.
pub const SEND_DEADLINE: Duration = Duration::from_secs(30);
/// Starting read buffer of a catch-up read (see [`frame::FrameReader`]).
const READ_BUFFER_BYTES: usize = 256 << 10;
/// Starting read buffer of a live subscription: small, as a client may hold thousands.
const FOLLOW_BUFFER_BYTES: usize = 8 << 10;
/// Messages buffered between a subscription task and its consumer.
pub const SUBSCRIPTION_BUFFER: usize = 1024;

/// A successful send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub conversation: String,
    pub offset: u64,
    pub ts_ms: u64,
    /// This send was a retry of one already stored.
    pub duplicate: bool,
}

struct Inner {
    endpoint: quinn::Endpoint,
    tls: quinn::ClientConfig,
    /// The cluster's revocation list (`<tls_dir>/revoked`): a node presenting a revoked key
    /// is not talked to (see [`Client::dial`]). A client without the file checks nothing.
    revoked: Mutex<tls::RevocationList>,
    /// The user the credential names.
    user: String,
    /// How to reach each node and where each shard's replicas are: the file's nodes at
    /// first, then the newest routing map a node gave (see [`Routes`]).
    routes: RwLock<Routes>,
    shards: u32,
    /// One slot per node: a dead node's connect timeout never delays the others.
    conns: Mutex<HashMap<u64, ConnSlot>>,
    leaders: Mutex<HashMap<ShardId, u64>>,
    /// Nodes that recently did not answer, until when: a node killed without closing its
    /// connections is only noticed by timeouts, so requests avoid it for a while.
    suspects: Mutex<HashMap<u64, Instant>>,
    client_id: u64,
    next_seq: AtomicU64,
    /// Sends waiting to go to each node (see [`Client::send_attempt`]).
    outboxes: RwLock<HashMap<u64, Arc<Mutex<Outbox>>>>,
    /// Idle send lanes per node (see [`Client::request`]).
    lanes: LanePool<u64>,
    /// Where each node's follows hold their streams (see [`Client::open_follow`]).
    follows: Mutex<HashMap<u64, Arc<Follows>>>,
    /// Send requests waiting to be written, per node (see [`Client::write_coalesced`]).
    pending: Mutex<HashMap<u64, Vec<PendingWrite>>>,
    /// Send requests the flow-control window did not take whole (see [`Client::partial_writes`]).
    partial_writes: AtomicU64,
    /// Bytes of sends per batch, at most, under the cluster's frame limit ([`batch_bytes_for`]).
    batch_bytes: usize,
}

/// A node's connection, opened on first use and again after it broke.
type ConnSlot = Arc<tokio::sync::Mutex<Option<Dialed>>>;

/// A connection, and when it was made.
struct Dialed {
    conn: quinn::Connection,
    at: Instant,
}

impl std::ops::Deref for Dialed {
    type Target = quinn::Connection;
    fn deref(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// One node's follows: a follow holds a stream for as long as it lasts, and the node admits
/// `limits.streams_per_connection_max` concurrent streams per connection.
#[derive(Default)]
struct Follows {
    /// Follows holding a stream of the node's request connection (at most
    /// [`FOLLOWS_ON_REQUEST_CONNECTION`]).
    on_requests: Arc<AtomicUsize>,
    /// Connections that carry follows only, each with its count of follows; the last follow
    /// on one to end closes it.
    own: tokio::sync::Mutex<Vec<(Dialed, Arc<AtomicUsize>)>>,
}

/// A follow's place on its connection, given back when the follow's stream ends.
struct FollowSeat {
    count: Arc<AtomicUsize>,
    /// A connection that carries follows only, closed once its last follow ends.
    closes: Option<quinn::Connection>,
    /// When the follow's connection was made.
    dialed: Instant,
}

impl Drop for FollowSeat {
    fn drop(&mut self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(conn) = &self.closes {
                conn.close(0u32.into(), b"no follows left");
            }
        }
    }
}

fn same_address(conn: &quinn::Connection, addr: SocketAddr) -> bool {
    let now = conn.remote_address();
    now.port() == addr.port() && now.ip().to_canonical() == addr.ip().to_canonical()
}

/// Whether `conn` was ended by its node (closed by the node's application or its QUIC
/// stack) or by the node's silence (idle timeout). A connection this client closed, or one
/// that a restarted node reset as unknown to it, says nothing against the node. A request
/// connection closed because the node is full does (the node serves this client nothing
/// until it has room: requests go elsewhere for a while); a follow-only one does not (see
/// [`Client::forget_broken`]).
fn ended_by_node(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(
            quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::ConnectionClosed(_)
                | quinn::ConnectionError::TimedOut
        )
    )
}

/// Whether `reason` is the node's application close with `code`.
fn is_close(reason: &quinn::ConnectionError, code: u32) -> bool {
    matches!(reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == u64::from(code))
}

/// The node's refusal of this client's credential, if that is why it closed the connection
/// (revoked, or naming no user): permanent, unlike a node that is down, so it is answered
/// `Forbidden` instead of retried. With it, whether the node closed the connection at its
/// handshake, having served nothing sent on it (else a request in flight may have been
/// served before an open connection was closed).
fn credential_refusal(node: u64, reason: &quinn::ConnectionError) -> Option<(Error, bool)> {
    let quinn::ConnectionError::ApplicationClosed(c) = reason else { return None };
    let code = c.error_code.into_inner();
    let at_handshake = [CLOSE_REVOKED, CLOSE_NO_IDENTITY].map(u64::from).contains(&code);
    if !at_handshake && code != u64::from(CLOSE_REVOKED_OPEN) {
        return None;
    }
    let refused = Error::Forbidden(format!(
        "node {node} refused this client's credential: {}",
        String::from_utf8_lossy(&c.reason)
    ));
    Some((refused, at_handshake))
}

/// What a failure `e` of a request on `conn` is, if the node closed `conn` refusing this
/// client's credential: `Forbidden` if it did so at the handshake (nothing sent on `conn`
/// was served), else `Forbidden` for a request not written yet and still `Ambiguous` (with
/// the reason) for one that was. Classified by the connection the request used, not by the
/// node's current one, which another task may have opened since.
///
/// A connection the node closed at one of its connection limits (`CLOSE_FULL`,
/// `CLOSE_USER_FULL`) was closed before the node accepted any stream on it: nothing sent on
/// it was served, so the failure is `Unavailable`, with the node's reason.
fn classify(node: u64, conn: &quinn::Connection, e: Error) -> Error {
    let Some(reason) = conn.close_reason() else { return e };
    if let quinn::ConnectionError::ApplicationClosed(c) = &reason {
        if [CLOSE_FULL, CLOSE_USER_FULL].map(u64::from).contains(&c.error_code.into_inner()) {
            let why = String::from_utf8_lossy(&c.reason);
            return Error::Unavailable(format!("node {node} refused the connection: {why}"));
        }
    }
    match credential_refusal(node, &reason) {
        Some((refused, true)) => refused,
        Some((refused, false)) => match e {
            Error::Ambiguous(m) => Error::Ambiguous(format!("{m}; then {refused}")),
            _ => refused,
        },
        None => e,
    }
}

/// Where the client sends what: the nodes it can reach and each shard's voting replicas.
///
/// It starts from the client's `cluster.toml` and takes every newer routing map a node
/// gives (each `NotLeader` answer carries one; [`Client::shard_map`] asks for it), so a
/// client follows shard moves and reaches nodes added after its file was written.
#[derive(Debug, Default)]
struct Routes {
    /// The epoch of the map these come from; 0 while only the file is known.
    epoch: u64,
    nodes: BTreeMap<u64, SocketAddr>,
    /// Each shard's voters, as the map has them; no entry before a map came.
    shards: HashMap<ShardId, Vec<u64>>,
}

impl Routes {
    /// Takes `map` if it is newer than what these come from: each node it names is reached
    /// at its address there, and a removed one not at all; a node only the file names is
    /// kept. Returns the nodes whose address changed or went away (their connections are
    /// stale), or `None` when `map` is not newer.
    fn learn(&mut self, map: &RoutingMap) -> Option<Vec<u64>> {
        if map.epoch <= self.epoch {
            return None;
        }
        let mut changed = Vec::new();
        for n in &map.nodes {
            if n.state == NodeState::Removed {
                if self.nodes.remove(&n.id).is_some() {
                    changed.push(n.id);
                }
                continue;
            }
            // An address that does not parse leaves the node as the file has it.
            if let Ok(addr) = n.client_addr.parse::<SocketAddr>() {
                if self.nodes.insert(n.id, addr).is_some_and(|old| old != addr) {
                    changed.push(n.id);
                }
            }
        }
        let nodes = &self.nodes;
        self.shards = map
            .shards
            .iter()
            .map(|s| (s.shard, s.voters.iter().copied().filter(|v| nodes.contains_key(v)).collect()))
            .collect();
        self.epoch = map.epoch;
        Some(changed)
    }

    /// The nodes to try for `shard`'s leader, in order, and where in that order to start:
    /// its voters as the map has them (the preferred leader first), or every node when the
    /// map has none (no map yet) and on every fourth attempt (the map may be stale and its
    /// voters gone: any node answers with a newer one).
    fn leader_candidates(&self, shard: ShardId, attempt: usize) -> (Vec<u64>, usize) {
        match self.shards.get(&shard).filter(|v| !v.is_empty()) {
            Some(voters) if attempt % 4 != 3 => (voters.clone(), attempt),
            _ => (self.nodes.keys().copied().collect(), shard as usize + attempt),
        }
    }

    /// `shard`'s voters as the map has them, in id order (every node before a map came).
    fn voters(&self, shard: ShardId) -> Vec<u64> {
        let mut out = match self.shards.get(&shard).filter(|v| !v.is_empty()) {
            Some(voters) => voters.clone(),
            None => self.nodes.keys().copied().collect(),
        };
        out.sort_unstable();
        out
    }

    /// The nodes to read `shard` from: its voters in id order, then every other node (the
    /// map may be stale); every node in id order before a map came.
    fn replicas(&self, shard: ShardId) -> Vec<u64> {
        let mut out: Vec<u64> = self.shards.get(&shard).cloned().unwrap_or_default();
        out.sort_unstable();
        let rest: Vec<u64> = self.nodes.keys().copied().filter(|n| !out.contains(n)).collect();
        out.extend(rest);
        out
    }
}

/// A request waiting to be written on its lane, and where the lane goes afterwards.
type PendingWrite = (Lane, Vec<u8>, tokio::sync::oneshot::Sender<std::result::Result<Lane, String>>);

/// A send waiting for a request slot, with where its answer goes.
type Waiting = (SendRequest, tokio::sync::oneshot::Sender<Result<Response>>);

/// Sends bound for one node, queued per shard (see [`Client::send_attempt`]).
#[derive(Default)]
struct Outbox {
    /// Only shards with sends waiting or requests out have an entry.
    shards: HashMap<ShardId, ShardQueue>,
    /// Requests out to this node, over all its shards.
    in_flight: usize,
}

/// One shard's sends that wait for a request slot, and its requests out.
#[derive(Default)]
struct ShardQueue {
    waiting: Vec<Waiting>,
    in_flight: usize,
}

impl Outbox {
    /// Queues a send. True if it took a free request slot: the caller then drains `shard`.
    fn push(&mut self, shard: ShardId, send: Waiting) -> bool {
        let queue = self.shards.entry(shard).or_default();
        queue.waiting.push(send);
        if queue.in_flight < SEND_REQUESTS_PER_SHARD && self.in_flight < SEND_REQUESTS_PER_NODE {
            queue.in_flight += 1;
            self.in_flight += 1;
            true
        } else {
            false
        }
    }

    /// The next batch for a request slot now held by `shard`. A shard whose sends wait with
    /// no request out (the node's slots were all taken when they came) gets the slot first,
    /// so a busy shard cannot starve the others; then `shard`'s own queue; then any shard
    /// with sends waiting below its window. `shard` is updated to where the slot went;
    /// the batch holds at most `batch_bytes` of encoded sends ([`take_batch`]).
    /// `None` releases the slot: nothing waits that it may carry.
    fn next_batch(&mut self, shard: &mut ShardId, batch_bytes: usize) -> Option<Vec<Waiting>> {
        let current = *shard;
        let waits = |q: &ShardQueue| !q.waiting.is_empty();
        let starved = self.shards.iter().find(|(s, q)| **s != current && q.in_flight == 0 && waits(q));
        let own = self.shards.get(&current).is_some_and(waits).then_some(current);
        let below_window =
            || self.shards.iter().find(|(_, q)| waits(q) && q.in_flight < SEND_REQUESTS_PER_SHARD).map(|(s, _)| *s);
        let Some(next) = starved.map(|(s, _)| *s).or(own).or_else(below_window) else {
            self.release(current);
            self.in_flight = self.in_flight.saturating_sub(1);
            return None;
        };
        if next != current {
            self.release(current);
        }
        // `next` has sends waiting, so releasing `current` left it in place.
        let queue = self.shards.get_mut(&next)?;
        if next != current {
            queue.in_flight += 1;
        }
        *shard = next;
        Some(take_batch(&mut queue.waiting, batch_bytes))
    }

    /// Gives back one request slot of `shard`, forgetting the shard once it is idle.
    fn release(&mut self, shard: ShardId) {
        if let Some(queue) = self.shards.get_mut(&shard) {
            queue.in_flight = queue.in_flight.saturating_sub(1);
            if queue.in_flight == 0 && queue.waiting.is_empty() {
                self.shards.remove(&shard);
            }
        }
    }
}

/// Send requests a client keeps in flight per shard before it coalesces further sends to
/// that shard into batches. A lone sender never waits for a batch to fill: batching happens
/// only when sends already queue behind requests in flight.
pub const SEND_REQUESTS_PER_SHARD: usize = 8;
/// Send requests a client keeps in flight to one node over all shards. Below the node's
/// streams-per-connection limit (`limits.streams_per_connection_max`, 64 by default), so
/// sends never take the streams a tail needs.
pub const SEND_REQUESTS_PER_NODE: usize = 32;
/// Follows a client keeps on a node's request connection, at most: with the send lanes,
/// they leave room for other requests under the node's streams-per-connection limit
/// (at least [`STREAMS_PER_CONNECTION_FLOOR`]). Further follows go on connections that
/// carry follows only, as many on each as the node admits. A connection holding one or a
/// few follows costs the node's pushes: with 16 here, the bench's `fan_out` (17 follows
/// per client and node) put one per client on a connection of its own, and its delivery
/// p50 rose by 13 % (p99 by 20 %).
pub const FOLLOWS_ON_REQUEST_CONNECTION: usize = 24;
const _: () =
    assert!(SEND_REQUESTS_PER_NODE + FOLLOWS_ON_REQUEST_CONNECTION + 8 <= STREAMS_PER_CONNECTION_FLOOR as usize);
/// Bytes of sends per coalesced batch, at most; less where the cluster's frame limit is
/// smaller (see [`batch_bytes_for`]).
const SEND_BATCH_BYTES_MAX: usize = 256 << 10;
/// A send's encoding beyond its three strings, at most: their length prefixes, the client
/// id and sequence (bincode varints of at most 9 bytes each), and the batch's share.
const SEND_ENCODING_BYTES_MAX: usize = 64;
/// Room left in a frame beside its sends: the version byte, the length, the request's tag.
const BATCH_FRAME_ROOM_BYTES: usize = 1024;

/// The bytes of sends one batch may hold under a node frame limit of `frame_bytes_max`: a
/// batch over it would be refused whole (`InvalidInput`), every send in it with it, though
/// each alone is accepted. A single send always goes, whatever its size: the configuration
/// keeps the frame limit above the largest message.
fn batch_bytes_for(frame_bytes_max: usize) -> usize {
    SEND_BATCH_BYTES_MAX.min(frame_bytes_max.saturating_sub(BATCH_FRAME_ROOM_BYTES))
}

/// A send's size in a batch, at most.
fn encoded_bytes(r: &SendRequest) -> usize {
    r.text.len() + r.conversation.len() + r.sender.len() + SEND_ENCODING_BYTES_MAX
}
/// Time allowed to establish a connection to a node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Leader hints a send follows without a pause; after these, each waits its back-off.
const REDIRECTS_AT_ONCE: usize = 2;
/// A send's back-off grows by this much per failed attempt …
const SEND_BACKOFF_STEP: Duration = Duration::from_millis(20);
/// … up to this much.
const SEND_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// A resubscription's back-off grows by this much per failed attempt …
const RESUBSCRIBE_BACKOFF_STEP: Duration = Duration::from_millis(50);
/// … up to this much.
const RESUBSCRIBE_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The longest `retry_after` a client honours from a throttling node.
const THROTTLE_WAIT_MAX: Duration = Duration::from_secs(5);
/// Pause before a cursor move is retried on another node.
const CURSOR_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A retry's refusal when an earlier attempt of the same send may have been stored: the
/// outcome is still unknown (the earlier attempt can commit, and a retry with the same key
/// would have answered its offset), so the refusal is reported as `Ambiguous`, with both
/// reasons. Without an earlier unknown outcome, the refusal stands.
fn after_unknown(ambiguous: &Option<String>, refusal: Error) -> Error {
    match ambiguous {
        Some(earlier) => Error::Ambiguous(format!(
            "an earlier attempt's outcome is unknown ({earlier}); a retry was refused: {refusal}"
        )),
        None => refusal,
    }
}

/// The back-off before attempt `attempt + 1`: `step × attempt`, at most `max`, then
/// jittered (see [`jitter`]).
fn backoff(step: Duration, max: Duration, attempt: usize) -> Duration {
    jitter(step.saturating_mul(u32::try_from(attempt).unwrap_or(u32::MAX)).min(max))
}

/// A random time between half of `d` and `d`: clients that lost the same node at the same
/// moment do not all come back at the same moment (a reconnect storm spreads out).
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random::<f64>().mul_add(0.5, 0.5))
}

/// How long to wait on `Throttled{retry_after_ms}`: at least what the node asked (at most
/// [`THROTTLE_WAIT_MAX`]), plus up to a quarter more, so throttled clients do not all retry in
/// the same instant.
fn throttle_wait(retry_after_ms: u64) -> Duration {
    let asked = Duration::from_millis(retry_after_ms.max(1)).min(THROTTLE_WAIT_MAX);
    asked + asked.mul_f64(rand::random::<f64>() * 0.25)
}

/// Takes the next batch off a shard's queue: up to [`SEND_BATCH_MAX`] sends and
/// `batch_bytes` of encoded sends, and always the first waiting send.
fn take_batch(waiting: &mut Vec<Waiting>, batch_bytes: usize) -> Vec<Waiting> {
    let mut bytes = 0;
    let take = waiting
        .iter()
        .take(SEND_BATCH_MAX)
        .enumerate()
        .take_while(|(i, (r, _))| {
            bytes += encoded_bytes(r);
            *i == 0 || bytes <= batch_bytes
        })
        .count();
    waiting.drain(..take).collect()
}

/// A connection to a convoy cluster; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

fn transport_err(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

impl Client {
    /// Connects as the user `CONVOY_USER` names (its credential in `<tls_dir>/users/`), with
    /// a random client id.
    pub fn connect(config: &Config) -> Result<Client> {
        match std::env::var(USER_ENV) {
            Ok(user) if !user.is_empty() => Client::connect_user(config, &user),
            _ => Err(Error::Config(format!(
                "no user chosen: set {USER_ENV} (or pass --user NAME); the operator makes a credential with \
                 `convoy user add NAME`"
            ))),
        }
    }

    /// Connects as `user`, whose credential is in `<tls_dir>/users/`, with a random client id.
    pub fn connect_user(config: &Config, user: &str) -> Result<Client> {
        Client::connect_as(config, &Credential::of_user(config, user)?, rand::random::<u64>() | 1, 1)
    }

    /// Connects with `credential` and a chosen idempotency identity: sends use `client_id`
    /// and sequence numbers from `first_seq` upward.
    pub fn connect_as(config: &Config, credential: &Credential, client_id: u64, first_seq: u64) -> Result<Client> {
        Client::build(config, credential, client_id, first_seq, Client::endpoint()?)
    }

    /// A client-side QUIC endpoint (one UDP socket) that several [`Client`]s may share via
    /// [`Client::connect_on`]: a load generator simulating thousands of clients needs
    /// thousands of connections, not thousands of sockets.
    pub fn endpoint() -> Result<quinn::Endpoint> {
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("a literal socket address");
        crate::net::udp::endpoint(bind, quinn::EndpointConfig::default(), None)
    }

    /// Like [`Client::connect_user`], with its own connections on a shared endpoint.
    pub fn connect_on(config: &Config, user: &str, endpoint: quinn::Endpoint) -> Result<Client> {
        Client::build(config, &Credential::of_user(config, user)?, rand::random::<u64>() | 1, 1, endpoint)
    }

    fn build(
        config: &Config,
        credential: &Credential,
        client_id: u64,
        first_seq: u64,
        endpoint: quinn::Endpoint,
    ) -> Result<Client> {
        let paths = TlsPaths::of(config);
        let user = credential.user()?;
        let tls = tls::user_dialer(&paths, credential)?;
        let nodes: BTreeMap<u64, SocketAddr> = config.nodes.iter().map(|n| (n.id, n.client_addr)).collect();
        // A list that does not read fails the client at once, as it fails a node's start: a
        // revocation misread would let a revoked node's key pass.
        let revoked = Mutex::new(tls::RevocationList::open(paths.revoked())?);
        let inner = Inner {
            endpoint,
            tls,
            revoked,
            user,
            routes: RwLock::new(Routes { nodes, ..Routes::default() }),
            shards: config.shards,
            conns: Mutex::default(),
            leaders: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            client_id,
            next_seq: AtomicU64::new(first_seq),
            outboxes: RwLock::default(),
            lanes: LanePool::new(SEND_REQUESTS_PER_NODE),
            follows: Mutex::default(),
            pending: Mutex::default(),
            partial_writes: AtomicU64::new(0),
            batch_bytes: batch_bytes_for(config.limits.frame_bytes_max),
        };
        Ok(Client { inner: Arc::new(inner) })
    }

    /// The user this client's credential names: every message it sends is from this user.
    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// This client's idempotency identity.
    pub fn client_id(&self) -> u64 {
        self.inner.client_id
    }

    /// The ids of the nodes this client can reach, ascending: its file's, and those the
    /// newest routing map it has adds (less the ones it says were removed).
    pub fn node_ids(&self) -> Vec<u64> {
        self.routes().nodes.keys().copied().collect()
    }

    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Routes> {
        // Every writer leaves a whole `Routes` before it could panic.
        self.inner.routes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn knows(&self, node: u64) -> bool {
        self.routes().nodes.contains_key(&node)
    }

    /// The epoch of the routing map this client routes by; 0 while it has only its file.
    pub fn routing_epoch(&self) -> u64 {
        self.routes().epoch
    }

    /// Takes `map` if it is newer than the one this client routes by: connections to nodes
    /// that changed address are dropped, and cached leaders that are no longer voters
    /// forgotten.
    fn learn(&self, map: &RoutingMap) {
        let changed = self.inner.routes.write().unwrap_or_else(|p| p.into_inner()).learn(map);
        let Some(changed) = changed else { return };
        tracing::debug!(epoch = map.epoch, ?changed, "routing by a newer map");
        let mut conns = self.inner.conns.lock().expect("conns lock");
        for id in &changed {
            conns.remove(id);
        }
        drop(conns);
        let routes = self.routes();
        self.inner
            .leaders
            .lock()
            .expect("leader cache lock")
            .retain(|shard, l| routes.shards.get(shard).is_none_or(|v| v.contains(l)));
    }

    /// Asks the nodes in turn for the cluster's routing map, routes by it if it is newer,
    /// and returns it.
    pub async fn shard_map(&self) -> Result<RoutingMap> {
        let mut last = Error::Unavailable("no node to ask".into());
        for node in self.node_ids() {
            match self.request(node, &Request::ShardMap).await {
                Ok(Response::ShardMap(map)) => {
                    self.learn(&map);
                    return Ok(*map);
                }
                Ok(Response::Error { code, message }) => last = response_error(code, message),
                Ok(other) => return Err(Error::Protocol(format!("unexpected answer to a map request: {other:?}"))),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn conn_slot(&self, node: u64) -> ConnSlot {
        self.inner.conns.lock().expect("conns lock").entry(node).or_default().clone()
    }

    fn node_address(&self, node: u64) -> Result<SocketAddr> {
        self.routes().nodes.get(&node).copied().ok_or_else(|| Error::InvalidInput(format!("unknown node {node}")))
    }

    /// The node's request connection (sends and every other request), opened if needed.
    async fn connection(&self, node: u64) -> Result<quinn::Connection> {
        Ok(self.request_connection(node).await?.0)
    }

    /// [`Client::connection`], and when it was made.
    async fn request_connection(&self, node: u64) -> Result<(quinn::Connection, Instant)> {
        let addr = self.node_address(node)?;
        let slot = self.conn_slot(node);
        let mut slot = slot.lock().await;
        // A connection made to the node's old address (a map moved it meanwhile) is not the
        // node's any more.
        if let Some(d) = slot.as_ref().filter(|c| c.close_reason().is_none() && same_address(c, addr)) {
            return Ok((d.conn.clone(), d.at));
        }
        let conn = self.dial(node, addr).await?;
        let at = Instant::now();
        *slot = Some(Dialed { conn: conn.clone(), at });
        Ok((conn, at))
    }

    async fn dial(&self, node: u64, addr: SocketAddr) -> Result<quinn::Connection> {
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.tls.clone(), addr, &tls::node_name(node))
            .map_err(transport_err)?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| Error::Unavailable(format!("connecting to node {node} timed out")))?
            .map_err(|e| {
                credential_refusal(node, &e).map_or_else(|| Error::Unavailable(format!("node {node}: {e}")), |(r, _)| r)
            })?;
        // The handshake verified the node's certificate under the node CA; a key revoked
        // since (`convoy tls revoke-node`) is refused here, and the node is suspect for a
        // while, as one that does not answer. Dials are rare: the list is read again each
        // time, so a long-lived client sees a revocation at its next dial.
        let revoked = {
            let mut list = self.inner.revoked.lock().expect("revocation list lock");
            list.refresh();
            list.keys()
        };
        if !revoked.is_empty() {
            let refused = match tls::peer_credential_of(&conn) {
                Ok((_, fp)) if revoked.contains(&fp) => Some("presents a revoked certificate"),
                Ok(_) => None,
                Err(_) => Some("presents a certificate whose key cannot be read to check it"),
            };
            if let Some(why) = refused {
                conn.close(0u32.into(), b"revoked node certificate");
                self.suspect(node);
                let list = self.inner.revoked.lock().expect("revocation list lock").path().display().to_string();
                return Err(Error::Unavailable(format!("node {node} {why} (revocation list {list})")));
            }
        }
        Ok(conn)
    }

    fn follows(&self, node: u64) -> Arc<Follows> {
        self.inner.follows.lock().expect("follows lock").entry(node).or_default().clone()
    }

    /// Writes the follow request `req` to `node` on a stream the follow may hold for as long
    /// as it lasts: one of the request connection's while fewer than
    /// [`FOLLOWS_ON_REQUEST_CONNECTION`] follows hold one there and the node grants it at
    /// once, else one of a connection that carries follows only. Sends never wait for a
    /// stream a follow holds, and a follow never waits for one the node may never grant.
    /// Returns the stream, its connection, and the seat the follow keeps while it reads.
    async fn open_follow(&self, node: u64, req: &Request) -> Result<(Lane, quinn::Connection, FollowSeat)> {
        let follows = self.follows(node);
        let (requests, dialed) = self.request_connection(node).await?;
        let mut on_requests = None;
        if follows.on_requests.fetch_add(1, Ordering::AcqRel) < FOLLOWS_ON_REQUEST_CONNECTION {
            let seat = FollowSeat { count: follows.on_requests.clone(), closes: None, dialed };
            match Lane::open_now(&requests) {
                Some(Ok(lane)) => on_requests = Some((lane, requests, seat)),
                Some(Err(e)) => {
                    self.forget_broken(node, &requests, dialed).await;
                    return Err(classify(node, &requests, Error::Unavailable(format!("node {node}: {e}"))));
                }
                None => {}
            }
        } else {
            follows.on_requests.fetch_sub(1, Ordering::AcqRel);
        }
        let (mut lane, conn, seat) = match on_requests {
            Some(opened) => opened,
            None => self.open_on_follow_connection(node, &follows).await?,
        };
        let written = match frame::write(&mut lane.send, req).await {
            Ok(()) => lane.send.finish().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            self.forget_broken(node, &conn, seat.dialed).await;
            return Err(classify(node, &conn, Error::Unavailable(format!("node {node}: subscribing failed: {e}"))));
        }
        Ok((lane, conn, seat))
    }

    /// A stream of one of `node`'s follow-only connections that has room at once, or of a
    /// new one. Dials one at a time per node, so follows started together share it.
    async fn open_on_follow_connection(
        &self,
        node: u64,
        follows: &Follows,
    ) -> Result<(Lane, quinn::Connection, FollowSeat)> {
        let addr = self.node_address(node)?;
        let mut own = follows.own.lock().await;
        own.retain(|(d, _)| d.close_reason().is_none() && same_address(d, addr));
        for (d, count) in own.iter() {
            // None left: its last follow ended and closed it.
            if count.fetch_add(1, Ordering::AcqRel) == 0 {
                count.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let seat = FollowSeat { count: count.clone(), closes: Some(d.conn.clone()), dialed: d.at };
            if let Some(Ok(lane)) = Lane::open_now(d) {
                return Ok((lane, d.conn.clone(), seat));
            }
        }
        let conn = self.dial(node, addr).await?;
        let (count, at) = (Arc::new(AtomicUsize::new(1)), Instant::now());
        own.push((Dialed { conn: conn.clone(), at }, count.clone()));
        drop(own);
        let seat = FollowSeat { count, closes: Some(conn.clone()), dialed: at };
        let lane = tokio::time::timeout(CONNECT_TIMEOUT, Lane::open(&conn))
            .await
            .map_err(|_| Error::Unavailable(format!("node {node} granted no stream on a new connection")))?
            .map_err(|e| classify(node, &conn, Error::Unavailable(format!("node {node}: {e}"))))?;
        Ok((lane, conn, seat))
    }

    /// After a follow's stream on `conn` broke: a closed connection makes the node suspect
    /// if the node ended it (not for being full: it serves the connections it has), and is
    /// forgotten if it was the request connection, as [`Client::forget`] does. A connection
    /// the node reset (it restarted) or went silent on (it died) says the same of a request
    /// connection made no later than it (`dialed`), which may not have noticed yet: that is
    /// forgotten too, so the follow does not reattach on it; one made since is the node's
    /// new one. A stream the node reset on a connection still open (it gave up on a reader
    /// too slow) leaves the connection to the requests and follows on it.
    async fn forget_broken(&self, node: u64, conn: &quinn::Connection, dialed: Instant) {
        let Some(reason) = conn.close_reason() else { return };
        if ended_by_node(conn) && !is_close(&reason, CLOSE_FULL) && !is_close(&reason, CLOSE_USER_FULL) {
            self.suspect(node);
        }
        let node_gone = matches!(reason, quinn::ConnectionError::Reset | quinn::ConnectionError::TimedOut);
        let slot = self.conn_slot(node);
        let mut held = slot.lock().await;
        if held.as_ref().is_some_and(|d| d.stable_id() == conn.stable_id() || (node_gone && d.at <= dialed)) {
            *held = None;
        }
    }

    /// Drops `node`'s connection after a request on it failed; if the node ended it (see
    /// [`ended_by_node`]), the node is suspect too.
    async fn forget(&self, node: u64) {
        let slot = self.inner.conns.lock().expect("conns lock").get(&node).cloned();
        if let Some(slot) = slot {
            let mut held = slot.lock().await;
            if held.as_ref().is_some_and(|d| ended_by_node(d)) {
                self.suspect(node);
            }
            *held = None;
        }
    }

    /// Writes `req` to `node`: on a pooled lane for sends, else on a stream of its own
    /// (finished after the request). Returns the lane to read the answer from, and the
    /// connection the request went out on (see [`classify`]).
    async fn open_on(&self, node: u64, req: &Request) -> Result<(Lane, quinn::Connection)> {
        self.open_marking(node, req, &std::sync::atomic::AtomicBool::new(false)).await
    }

    /// [`Client::open_on`], setting `sent` once the request may reach the node (it is
    /// queued or being written): an attempt cut short before then sent nothing.
    async fn open_marking(
        &self,
        node: u64,
        req: &Request,
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<(Lane, quinn::Connection)> {
        let conn = self.connection(node).await?;
        let reuse = req.keeps_stream();
        let opened = if reuse { self.inner.lanes.take_or_open(node, &conn).await } else { Lane::open(&conn).await };
        let mut lane = match opened {
            Ok(lane) => lane,
            Err(e) => {
                self.forget(node).await;
                return Err(classify(node, &conn, Error::Unavailable(format!("node {node}: {e}"))));
            }
        };
        // From here on the request may have reached the node: a failure is ambiguous.
        sent.store(true, Ordering::Release);
        let ambiguous = |e: String| {
            classify(node, &conn, Error::Ambiguous(format!("node {node}: request may have been delivered: {e}")))
        };
        if reuse {
            lane = self.write_coalesced(node, lane, frame::encode(req)).await.map_err(ambiguous)?;
        } else {
            frame::write(&mut lane.send, req).await.map_err(|e| ambiguous(e.to_string()))?;
            lane.send.finish().map_err(|e| ambiguous(e.to_string()))?;
        }
        Ok((lane, conn))
    }

    /// Writes a send request on its lane together with the other send requests to `node`
    /// queued in the same scheduler round.
    ///
    /// A write wakes the connection's driver, which tokio runs right after the writing task,
    /// so requests written one task at a time leave one datagram each. Here each request is
    /// queued and its task yields; the first task back writes every queued request in one
    /// poll, and the driver sends them together. Returns the lane once its request was
    /// handed to QUIC.
    async fn write_coalesced(&self, node: u64, lane: Lane, bytes: Vec<u8>) -> std::result::Result<Lane, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.pending.lock().expect("pending lock").entry(node).or_default().push((lane, bytes, tx));
        tokio::task::yield_now().await;
        let queued = self.inner.pending.lock().expect("pending lock").remove(&node).unwrap_or_default();
        for (mut lane, bytes, tx) in queued {
            let rest = write_now(&mut lane.send, bytes);
            if rest.is_empty() {
                let _ = tx.send(Ok(lane));
            } else {
                // The stream's flow-control window is full: finish on a task of its own.
                self.inner.partial_writes.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let written = lane.send.write_all(&rest).await.map_err(|e| e.to_string());
                    let _ = tx.send(written.map(|()| lane));
                });
            }
        }
        rx.await.map_err(|_| "the request was dropped before it was written".to_string())?
    }

    /// How many send requests the QUIC flow-control window did not take whole, so that
    /// their rest was written on a task of their own. Many of them mean the node reads
    /// requests slower than this client writes them.
    pub fn partial_writes(&self) -> u64 {
        self.inner.partial_writes.load(Ordering::Relaxed)
    }

    /// One request, one response, from one node. A transport failure after the request
    /// left is `Ambiguous`.
    ///
    /// Sends reuse request streams (lanes): a stream per send cost the client and the node
    /// an open, an accept, a task and a close each, on the latency path of every send.
    pub async fn request(&self, node: u64, req: &Request) -> Result<Response> {
        let sent = std::sync::atomic::AtomicBool::new(false);
        let attempt = async {
            let (mut lane, conn) = self.open_marking(node, req, &sent).await?;
            let answer = match frame::read::<_, Response>(&mut lane.recv, RESPONSE_FRAME_BYTES_MAX).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    let e = Error::Ambiguous(format!("node {node} closed the stream without answering"));
                    return Err(classify(node, &conn, e));
                }
                // An answer in another wire version: that node read no request of this
                // build's (it refuses the version before anything else), so nothing was done.
                Err(e) if frame::is_version_mismatch(&e) => return Err(Error::Protocol(format!("node {node}: {e}"))),
                Err(e) => return Err(classify(node, &conn, Error::Ambiguous(format!("node {node}: {e}")))),
            };
            // A whole-request error may end the stream on the node's side: do not reuse it.
            if req.keeps_stream() && !matches!(answer, Response::Error { .. }) {
                self.inner.lanes.give_back(node, lane);
            }
            Ok(answer)
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
            Ok(r) => {
                if r.is_ok() {
                    self.inner.suspects.lock().expect("suspect lock").remove(&node);
                }
                r
            }
            Err(_) => {
                self.suspect(node);
                // Cut short while connecting or waiting for a stream, the request never left:
                // the outcome is known (nothing), and the caller may say so.
                if sent.load(Ordering::Acquire) {
                    Err(Error::Ambiguous(format!("node {node} did not answer within {ATTEMPT_TIMEOUT:?}")))
                } else {
                    Err(Error::Unavailable(format!("node {node}: no connection or stream within {ATTEMPT_TIMEOUT:?}")))
                }
            }
        }
    }

    fn suspect(&self, node: u64) {
        self.inner.suspects.lock().expect("suspect lock").insert(node, Instant::now() + SUSPECT_FOR);
    }

    /// Whether requests should avoid `node` for now: it did not answer within an attempt's
    /// time lately, or it ended its connection to this client. A node that stops cleanly
    /// closes every client's connection; without this, a send whose cached leader was that
    /// node would open a new connection to it and wait out [`ATTEMPT_TIMEOUT`] on a node
    /// that is gone. The ended connection is dropped once noticed, so the node is suspect
    /// for [`SUSPECT_FOR`] from then, not for as long as its connection stays unused.
    fn is_suspect(&self, node: u64) -> bool {
        if self.inner.suspects.lock().expect("suspect lock").get(&node).is_some_and(|until| Instant::now() < *until) {
            return true;
        }
        let Some(slot) = self.inner.conns.lock().expect("conns lock").get(&node).cloned() else { return false };
        // A slot held by a connect or a forget in progress is looked at the next time.
        let Ok(mut held) = slot.try_lock() else { return false };
        if held.as_ref().is_some_and(|d| ended_by_node(d)) {
            *held = None;
            drop(held);
            self.suspect(node);
            return true;
        }
        false
    }

    /// The cached leader of `shard`, else its candidates ([`Routes::leader_candidates`]) in
    /// rotation, avoiding suspects while any other candidate is left.
    fn target_for(&self, shard: ShardId, attempt: usize) -> u64 {
        if let Some(l) = self.inner.leaders.lock().expect("leader cache lock").get(&shard).copied() {
            if !self.is_suspect(l) {
                return l;
            }
        }
        let (ids, start) = self.routes().leader_candidates(shard, attempt);
        // No node at all: node 0, which the attempt fails on as unknown.
        self.first_healthy(&ids, start).unwrap_or(0)
    }

    /// `ids` in rotation from `start`: the first that is not suspect, else the one at
    /// `start`; `None` when `ids` is empty.
    fn first_healthy(&self, ids: &[u64], start: usize) -> Option<u64> {
        let n = ids.len();
        (0..n)
            .map(|i| ids[(start + i) % n])
            .find(|id| !self.is_suspect(*id))
            .or_else(|| ids.get(start % n.max(1)).copied())
    }

    /// A `NotLeader` answer from `node`: routes by the map it carries, and caches the
    /// leader it names, if that is another node.
    fn redirected(&self, shard: ShardId, node: u64, leader: Option<u64>, map: Option<&RoutingMap>) -> Option<u64> {
        if let Some(map) = map {
            self.learn(map);
        }
        let hinted = leader.filter(|l| *l != node);
        self.set_leader(shard, hinted);
        hinted
    }

    fn set_leader(&self, shard: ShardId, leader: Option<u64>) {
        let known = leader.is_some_and(|l| self.knows(l));
        let mut cache = self.inner.leaders.lock().expect("leader cache lock");
        match leader {
            Some(l) if known => {
                cache.insert(shard, l);
            }
            _ => {
                cache.remove(&shard);
            }
        }
    }

    /// Sends `text` from this client's user with the next sequence number of this client.
    pub async fn send(&self, conversation: &str, text: &str) -> Result<Ack> {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        self.send_with(conversation, seq, text, SEND_DEADLINE).await
    }

    /// Sends with an explicit sequence number, retrying until `deadline` with the same
    /// idempotency key.
    pub async fn send_with(&self, conversation: &str, client_seq: u64, text: &str, deadline: Duration) -> Result<Ack> {
        let shard = shard_of(conversation, self.inner.shards);
        let req = SendRequest {
            conversation: conversation.to_string(),
            sender: self.inner.user.clone(),
            client_id: self.inner.client_id,
            client_seq,
            text: text.to_string(),
        };
        let started = Instant::now();
        let mut ambiguous: Option<String> = None;
        let mut last = String::from("no attempt made");
        let (mut attempt, mut redirects) = (0usize, 0usize);
        while started.elapsed() < deadline {
            let node = self.target_for(shard, attempt);
            attempt += 1;
            let backoff = backoff(SEND_BACKOFF_STEP, SEND_BACKOFF_MAX, attempt);
            match self.send_attempt(node, req.clone()).await {
                Ok(Response::Ack { conversation, offset, ts_ms, duplicate }) => {
                    self.set_leader(shard, Some(node));
                    return Ok(Ack { conversation, offset, ts_ms, duplicate });
                }
                Ok(Response::NotLeader { leader, map, .. }) => {
                    last = format!("node {node} is not the leader of shard {shard}");
                    let hinted = self.redirected(shard, node, leader, map.as_deref());
                    // A hint is followed at once, but not round and round: two nodes with
                    // stale views (during a move) can name each other until they settle.
                    redirects += 1;
                    if hinted.is_none_or(|h| self.is_suspect(h)) || redirects > REDIRECTS_AT_ONCE {
                        tokio::time::sleep(backoff).await;
                    }
                }
                Ok(Response::Throttled { retry_after_ms }) => {
                    last = format!("node {node} throttled the send");
                    tokio::time::sleep(throttle_wait(retry_after_ms)).await;
                }
                Ok(Response::Error { code, message }) => match code {
                    ErrorCode::InvalidInput | ErrorCode::Rejected | ErrorCode::Forbidden | ErrorCode::Protocol => {
                        return Err(after_unknown(&ambiguous, response_error(code, message)))
                    }
                    ErrorCode::Ambiguous | ErrorCode::Unavailable => {
                        if code == ErrorCode::Ambiguous {
                            ambiguous = Some(message.clone());
                        }
                        last = message;
                        self.set_leader(shard, None);
                        tokio::time::sleep(backoff).await;
                    }
                },
                Ok(other) => {
                    let e = Error::Protocol(format!("unexpected answer to send: {other:?}"));
                    return Err(after_unknown(&ambiguous, e));
                }
                // The node refused this client's credential (revoked: no node will take it),
                // or answered in another wire version (it decoded nothing): final.
                Err(e @ (Error::Forbidden(_) | Error::Protocol(_))) => return Err(after_unknown(&ambiguous, e)),
                Err(e) => {
                    if matches!(e, Error::Ambiguous(_)) {
                        ambiguous = Some(e.to_string());
                    }
                    last = e.to_string();
                    self.set_leader(shard, None);
                    self.forget(node).await;
                    tokio::time::sleep(backoff).await;
                }
            }
        }
        match ambiguous {
            Some(m) => {
                Err(Error::Ambiguous(format!("gave up after {deadline:?}; an attempt's outcome is unknown: {m}")))
            }
            None => Err(Error::Unavailable(format!("gave up after {deadline:?}: {last}"))),
        }
    }

    /// One attempt of one send to `node`. Sends of this client to the same shard that wait
    /// at the same time share a request: up to [`SEND_REQUESTS_PER_SHARD`] requests per shard
    /// (and [`SEND_REQUESTS_PER_NODE`] per node) go out at once, and sends arriving meanwhile
    /// leave together, as one `SendBatch`, when one of them returns. Each send still gets its
    /// own answer (the server proposes the batch as one Raft entry and answers each send as
    /// if it were alone), so retries, redirects and dedup work per send exactly as without
    /// batching.
    ///
    /// The queues are per shard, not per node, because a request is answered when its last
    /// send commits: a batch over several shards waits for the slowest of their Raft groups,
    /// and its senders with it. One shard per request also makes it one Raft entry.
    async fn send_attempt(&self, node: u64, req: SendRequest) -> Result<Response> {
        if !self.knows(node) {
            return Err(Error::InvalidInput(format!("unknown node {node}")));
        }
        let outbox = self.outbox(node);
        let shard = shard_of(&req.conversation, self.inner.shards);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = outbox.lock().expect("outbox lock").push(shard, (req, tx));
        if start {
            tokio::spawn(self.clone().drain_outbox(node, shard));
        }
        rx.await.unwrap_or_else(|_| Err(Error::Unavailable("send dropped before it was answered".into())))
    }

    fn outbox(&self, node: u64) -> Arc<Mutex<Outbox>> {
        if let Some(o) = self.inner.outboxes.read().unwrap_or_else(|p| p.into_inner()).get(&node) {
            return o.clone();
        }
        self.inner.outboxes.write().unwrap_or_else(|p| p.into_inner()).entry(node).or_default().clone()
    }

    /// Sends what waits in `node`'s queue of `shard`, batch after batch, for as long as
    /// [`Outbox::next_batch`] finds sends for this request slot (of this or another shard).
    async fn drain_outbox(self, node: u64, mut shard: ShardId) {
        let outbox = self.outbox(node);
        loop {
            let budget = self.inner.batch_bytes;
            let Some(batch) = outbox.lock().expect("outbox lock").next_batch(&mut shard, budget) else { return };
            let (reqs, replies): (Vec<SendRequest>, Vec<_>) = batch.into_iter().unzip();
            let n = reqs.len();
            let request = if n == 1 {
                Request::Send(reqs.into_iter().next().expect("one send"))
            } else {
                Request::SendBatch(reqs)
            };
            let answers: Vec<Result<Response>> = match self.request(node, &request).await {
                Ok(Response::Batch(answers)) if answers.len() == n => answers.into_iter().map(Ok).collect(),
                Ok(Response::Batch(answers)) => {
                    let m = format!("node {node} answered {} of {n} batched sends", answers.len());
                    (0..n).map(|_| Err(Error::Ambiguous(m.clone()))).collect()
                }
                Ok(single) if n == 1 => vec![Ok(single)],
                // One answer for the whole batch (e.g. an error about the request itself).
                Ok(whole) => (0..n).map(|_| Ok(whole.clone())).collect(),
                Err(e) => {
                    let m = e.to_string();
                    (0..n)
                        .map(|_| {
                            Err(match &e {
                                Error::Ambiguous(_) => Error::Ambiguous(m.clone()),
                                // The node refused this client's credential, or speaks
                                // another wire version: final.
                                Error::Forbidden(f) => Error::Forbidden(f.clone()),
                                Error::Protocol(p) => Error::Protocol(p.clone()),
                                _ => Error::Unavailable(m.clone()),
                            })
                        })
                        .collect()
                }
            };
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
    }

    /// A node's view of its shards.
    pub async fn status(&self, node: u64) -> Result<NodeStatus> {
        match self.request(node, &Request::Status).await? {
            Response::Status(s) => Ok(*s),
            Response::Error { code, message } => Err(response_error(code, message)),
            other => Err(Error::Protocol(format!("unexpected answer to status: {other:?}"))),
        }
    }

    /// Names `to` the preferred leader of `shard` in the cluster map (an admin credential),
    /// through any node that answers. Returns the map's epoch and whether this changed it.
    pub async fn transfer_leader(&self, shard: u32, to: u64) -> Result<(u64, bool)> {
        self.place(Request::TransferLeader { shard, to }).await
    }

    /// Starts moving `shard`'s replica on node `from` to node `to` (an admin credential).
    /// Returns the map's epoch once the move is recorded; its progress is in the nodes'
    /// status (see `convoy::admin`).
    pub async fn move_replica(&self, shard: u32, from: u64, to: u64) -> Result<(u64, bool)> {
        self.place(Request::Move { shard, from, to }).await
    }

    /// Cancels operation `id` (an admin credential), possible until its new replica votes.
    pub async fn cancel_operation(&self, id: u64) -> Result<(u64, bool)> {
        self.place(Request::CancelOperation { id }).await
    }

    /// Marks `node` draining (an admin credential): it is given no new replica.
    pub async fn drain(&self, node: u64) -> Result<(u64, bool)> {
        self.place(Request::Drain { node }).await
    }

    /// Stops draining `node` (an admin credential): it takes replicas again.
    pub async fn recommission(&self, node: u64) -> Result<(u64, bool)> {
        self.place(Request::Recommission { node }).await
    }

    /// Takes `node` out of the cluster (an admin credential), once it holds no replica.
    pub async fn remove_node(&self, node: u64) -> Result<(u64, bool)> {
        self.place(Request::RemoveNode { node }).await
    }

    /// Marks `node` lost (an admin credential): its replicas are to be rebuilt elsewhere.
    pub async fn mark_lost(&self, node: u64) -> Result<(u64, bool)> {
        self.place(Request::ReplaceNode { node }).await
    }

    /// A cluster-map change, through any node that answers.
    async fn place(&self, req: Request) -> Result<(u64, bool)> {
        let mut last = Error::Unavailable("no node to ask".into());
        // An attempt whose outcome is unknown may have made the change: a later node's
        // refusal ("already being moved") may be that attempt's doing, so the answer stays
        // unknown, as `to_leader`'s does. (A later "placed, no change" means the map holds
        // what was asked: that is the answer.)
        let mut unknown: Option<String> = None;
        for node in self.node_ids() {
            match self.request(node, &req).await {
                // The map holds what was asked, whoever put it there: done.
                Ok(Response::Placed { epoch, changed }) => return Ok((epoch, changed)),
                Ok(Response::Error { code, message }) => match response_error(code, message) {
                    e @ Error::Unavailable(_) => last = e,
                    e => return Err(after_unknown(&unknown, e)),
                },
                Ok(other) => return Err(Error::Protocol(format!("unexpected answer to {req:?}: {other:?}"))),
                Err(e) => {
                    if let Error::Ambiguous(m) = &e {
                        unknown = Some(m.clone());
                    }
                    last = e;
                }
            }
        }
        Err(match last {
            e @ Error::Ambiguous(_) => e,
            e => after_unknown(&unknown, e),
        })
    }

    /// The leader of every shard, if each of `nodes` answers and all of them that hold a replica
    /// of the shard agree on it.
    pub async fn agreed_leaders(&self, nodes: &[u64]) -> Result<Vec<u64>> {
        let mut views = Vec::with_capacity(nodes.len());
        for id in nodes {
            views.push(self.status(*id).await?);
        }
        let mut out = Vec::with_capacity(self.inner.shards as usize);
        for shard in 0..self.inner.shards {
            // A node that holds no replica of the shard (added after formation) has no say.
            let ls: Vec<Option<u64>> =
                views.iter().filter_map(|v| v.shards.iter().find(|s| s.shard == shard)).map(|s| s.leader).collect();
            match ls.first() {
                Some(Some(l)) if ls.iter().all(|x| *x == Some(*l)) => out.push(*l),
                _ => return Err(Error::Unavailable(format!("shard {shard}: leaders {ls:?}"))),
            }
        }
        Ok(out)
    }

    /// Moves this user's cursor forward (on the shard's leader); returns (cursor, head).
    pub async fn set_cursor(&self, conversation: &str, offset: u64) -> Result<(u64, u64)> {
        let req = Request::SetCursor { user: self.inner.user.clone(), conversation: conversation.into(), offset };
        match self.to_leader(conversation, &req).await? {
            Response::Cursor { offset, head } => Ok((offset, head)),
            other => Err(Error::Protocol(format!("unexpected answer to a cursor move: {other:?}"))),
        }
    }

    /// This user's read cursor in a conversation and its head, from the shard's leader (which
    /// applied every cursor move it acknowledged), found as sends find it: a node that does
    /// not hold the shard, or does not answer, is not the end of it.
    pub async fn cursor(&self, conversation: &str) -> Result<(u64, u64)> {
        let req = Request::GetCursorFromLeader { user: self.inner.user.clone(), conversation: conversation.into() };
        match self.to_leader(conversation, &req).await? {
            Response::Cursor { offset, head } => Ok((offset, head)),
            other => Err(Error::Protocol(format!("unexpected answer to a cursor read: {other:?}"))),
        }
    }

    /// Sends a request that only the conversation's shard leader serves, following leader
    /// hints and retrying elsewhere until [`SEND_DEADLINE`]; an error answer that retrying
    /// does not change is returned at once.
    async fn to_leader(&self, conversation: &str, req: &Request) -> Result<Response> {
        let shard = shard_of(conversation, self.inner.shards);
        let started = Instant::now();
        let mut attempt = 0;
        // An attempt whose outcome is unknown (a change may have been applied) keeps the
        // final answer unknown, whatever a later attempt is told.
        let mut unknown: Option<String> = None;
        let mut redirects = 0;
        loop {
            let node = self.target_for(shard, attempt);
            attempt += 1;
            let mut hinted = None;
            let retry = match self.request(node, req).await {
                Ok(Response::NotLeader { leader, map, .. }) => {
                    hinted = self.redirected(shard, node, leader, map.as_deref());
                    Error::Unavailable(format!("node {node} does not lead shard {shard}"))
                }
                Ok(Response::Error { code, message }) => match response_error(code, message) {
                    e @ (Error::Unavailable(_) | Error::Ambiguous(_)) => e,
                    e => return Err(after_unknown(&unknown, e)),
                },
                Ok(Response::Throttled { retry_after_ms }) => {
                    tokio::time::sleep(throttle_wait(retry_after_ms)).await;
                    Error::Throttled { retry_after_ms }
                }
                Ok(answer) => {
                    self.set_leader(shard, Some(node));
                    return Ok(answer);
                }
                // The node refused this client's credential, or answered in another wire
                // version (it decoded nothing): final.
                Err(e @ (Error::Forbidden(_) | Error::Protocol(_))) => return Err(after_unknown(&unknown, e)),
                Err(e) => e,
            };
            if let Error::Ambiguous(m) = &retry {
                unknown = Some(m.clone());
            }
            if started.elapsed() >= SEND_DEADLINE {
                return Err(match retry {
                    e @ Error::Ambiguous(_) => e,
                    e => after_unknown(&unknown, e),
                });
            }
            // A redirect that named the leader is followed at once (once in a row: nodes
            // whose views disagree do not bounce it without a pause); anything else forgets
            // the cached leader and pauses.
            redirects = if hinted.is_some() { redirects + 1 } else { 0 };
            // A throttled leader is still the leader: the retry goes back to it (elsewhere it
            // would be charged again, then redirected).
            if hinted.is_none() && !matches!(retry, Error::Throttled { .. }) {
                self.set_leader(shard, None);
            }
            if redirects != 1 {
                tokio::time::sleep(CURSOR_RETRY_PAUSE).await;
            }
        }
    }

    /// This user's cursor and the conversation's head, as one replica sees them.
    pub async fn get_cursor(&self, node: u64, conversation: &str) -> Result<(u64, u64)> {
        let req = Request::GetCursor { user: self.inner.user.clone(), conversation: conversation.into() };
        match self.request(node, &req).await? {
            Response::Cursor { offset, head } => Ok((offset, head)),
            Response::Error { code, message } => Err(response_error(code, message)),
            other => Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
        }
    }

    /// Creates a conversation with this user and `members` as its members. Creating one
    /// that exists is `Rejected`.
    pub async fn create_conversation(&self, conversation: &str, members: &[String]) -> Result<Vec<String>> {
        self.change_members(conversation, Membership::Create { members: members.to_vec() }).await
    }

    /// Adds `user` to a conversation this user is a member of.
    pub async fn add_member(&self, conversation: &str, user: &str) -> Result<Vec<String>> {
        self.change_members(conversation, Membership::Add { user: user.into() }).await
    }

    /// Removes `user` from a conversation this user is a member of; `user`'s live
    /// subscriptions end at the offset the removal was ordered at.
    pub async fn remove_member(&self, conversation: &str, user: &str) -> Result<Vec<String>> {
        self.change_members(conversation, Membership::Remove { user: user.into() }).await
    }

    async fn change_members(&self, conversation: &str, change: Membership) -> Result<Vec<String>> {
        let req = Request::Members { conversation: conversation.into(), change: MemberChange::Change(change) };
        match self.to_leader(conversation, &req).await? {
            Response::Members { members, .. } => Ok(members),
            other => Err(Error::Protocol(format!("unexpected answer to a membership change: {other:?}"))),
        }
    }

    /// A conversation's members and head as one replica sees them (members only).
    pub async fn members(&self, node: u64, conversation: &str) -> Result<(Vec<String>, u64)> {
        let req = Request::Members { conversation: conversation.into(), change: MemberChange::Show };
        match self.request(node, &req).await? {
            Response::Members { members, head } => Ok((members, head)),
            Response::Error { code, message } => Err(response_error(code, message)),
            other => Err(Error::Protocol(format!("unexpected answer: {other:?}"))),
        }
    }

    /// Sets a conversation's retention (a member, or an admin): the conversation's own
    /// limits, with those left unset taken from the cluster's default. Returns the limits set
    /// and the effective ones.
    pub async fn set_retention(&self, conversation: &str, retention: Retention) -> Result<(Retention, Retention)> {
        let req = Request::SetRetention { conversation: conversation.into(), retention };
        match self.to_leader(conversation, &req).await? {
            Response::Retention { set, effective } => Ok((set, effective)),
            other => Err(Error::Protocol(format!("unexpected answer to a retention change: {other:?}"))),
        }
    }

    /// Reads a conversation from `from` up to the head as `node` (default: any) has it. If
    /// retention deleted messages from `from` on, the read starts at the earliest kept, and
    /// says so ([`Read::truncated_before`]).
    pub async fn read(&self, conversation: &str, from: u64, node: Option<u64>) -> Result<Read> {
        let ids = match node {
            Some(n) => vec![n],
            None => self.routes().replicas(shard_of(conversation, self.inner.shards)),
        };
        let mut last = Error::Unavailable("no node to read from".into());
        for node in ids {
            match self.read_from(conversation, from, node).await {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn read_from(&self, conversation: &str, from: u64, node: u64) -> Result<Read> {
        let mut read = Read::default();
        self.read_each(conversation, from, node, |item| {
            match item {
                ReadItem::Truncated { earliest } => read.truncated_before = Some(earliest),
                ReadItem::Message(m) => read.messages.push(m),
            }
            Ok(())
        })
        .await?;
        Ok(read)
    }

    /// Reads a conversation from `from` up to the head as `node` has it, handing each
    /// message to `visit` as it arrives instead of collecting them (a reader that keeps
    /// nothing, like a subscriber that renders and moves on). Returns how many messages it
    /// visited. Offsets are checked to be consecutive, from `from` or, after a
    /// [`ReadItem::Truncated`], from the earliest kept; an error of `visit` ends the read
    /// with it.
    pub async fn read_each(
        &self,
        conversation: &str,
        from: u64,
        node: u64,
        mut visit: impl FnMut(ReadItem) -> Result<()>,
    ) -> Result<u64> {
        let mut next = from.max(1);
        let mut visited = 0;
        self.read_stream(conversation, from, node, |item| {
            match &item {
                ReadItem::Truncated { earliest } if *earliest > next => next = *earliest,
                ReadItem::Truncated { earliest } => {
                    return Err(Error::Protocol(format!("node {node} said {earliest} is the earliest at {next}")));
                }
                ReadItem::Message(m) if m.offset != next => {
                    return Err(Error::Protocol(format!("node {node} sent offset {} where {next} was due", m.offset)));
                }
                ReadItem::Message(_) => {
                    next += 1;
                    visited += 1;
                }
            }
            visit(item)
        })
        .await?;
        Ok(visited)
    }

    /// Reads a conversation from `from` up to the head as `node` has it, and returns what the
    /// node sent as it sent it: no check that offsets are consecutive, and the messages
    /// received before an error are kept. For tools that test the node (the fault-injection
    /// suite records a gap rather than an error); applications want [`Client::read`].
    pub async fn read_raw(&self, conversation: &str, from: u64, node: u64) -> RawRead {
        let (mut messages, mut truncated_before) = (Vec::new(), None);
        let end = self
            .read_stream(conversation, from, node, |item| {
                match item {
                    ReadItem::Message(m) => messages.push(m),
                    ReadItem::Truncated { earliest } => truncated_before = Some(earliest),
                }
                Ok(())
            })
            .await;
        RawRead { messages, truncated_before, end }
    }

    /// One read stream from `node`: every message (and truncation notice) to `visit`,
    /// unchecked, until the node says it is caught up (returns its head) or something ends
    /// the read.
    async fn read_stream(
        &self,
        conversation: &str,
        from: u64,
        node: u64,
        mut visit: impl FnMut(ReadItem) -> Result<()>,
    ) -> Result<u64> {
        let req = Request::Subscribe { conversation: conversation.into(), from, follow: false };
        let (lane, conn) = self.open_on(node, &req).await?;
        let mut recv = frame::FrameReader::new(lane.recv, RESPONSE_FRAME_BYTES_MAX, READ_BUFFER_BYTES);
        let read = async {
            loop {
                // A buffered frame needs no timer; only a read of the stream can stall.
                let frame = if recv.has_frame() {
                    recv.next::<Response>().await?
                } else {
                    tokio::time::timeout(ATTEMPT_TIMEOUT, recv.next::<Response>())
                        .await
                        .map_err(|_| Error::Unavailable(format!("node {node} stalled")))??
                };
                match frame {
                    Some(Response::Message(m)) => visit(ReadItem::Message(m))?,
                    Some(Response::Truncated { earliest }) => visit(ReadItem::Truncated { earliest })?,
                    Some(Response::CaughtUp { head }) => return Ok(head),
                    Some(Response::Error { code, message }) => return Err(response_error(code, message)),
                    // The node holds no replica of the shard (any more): `leader` holds one.
                    Some(Response::NotLeader { shard, leader, map }) => {
                        if let Some(map) = map {
                            self.learn(&map);
                        }
                        return Err(Error::NotLeader { shard, leader });
                    }
                    Some(other) => return Err(Error::Protocol(format!("unexpected frame {other:?}"))),
                    None => return Err(Error::Unavailable(format!("node {node} ended the read early"))),
                }
            }
        };
        read.await.map_err(|e| classify(node, &conn, e))
    }

    /// Follows a conversation from `from`, live, across disconnects, each offset exactly
    /// once ([`Delivery::ExactlyOnce`]). `node` pins the replica (it is still retried after
    /// failures) until it answers that it no longer holds the shard (a move took its replica
    /// away): the subscription then goes on from the next offset at the node it names, or
    /// another; `None` spreads over all of them.
    pub fn subscribe(&self, conversation: &str, from: u64, node: Option<u64>) -> Subscription {
        self.subscribe_with(conversation, from, node, Delivery::default())
    }

    /// Like [`Client::subscribe`], choosing how deliveries are handed on. With
    /// [`Delivery::Raw`], `node` is the one replica asked (`None`: one chosen at random).
    pub fn subscribe_with(&self, conversation: &str, from: u64, node: Option<u64>, delivery: Delivery) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let (client, conversation, from) = (self.clone(), conversation.to_string(), from.max(1));
        let task = match delivery {
            Delivery::ExactlyOnce => tokio::spawn(follow(client, conversation, from, node, tx)),
            Delivery::Raw => {
                // No node at all: node 0, which the stream fails on as unknown.
                let ids = self.node_ids();
                let node =
                    node.unwrap_or_else(|| ids.get(rand::random::<usize>() % ids.len().max(1)).copied().unwrap_or(0));
                tokio::spawn(follow_raw(client, conversation, from, node, tx))
            }
        };
        Subscription { rx, task }
    }
}

/// What a read found ([`Client::read`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Read {
    /// Set when retention had deleted messages from the offset asked: the earliest kept,
    /// where the messages start instead.
    pub truncated_before: Option<u64>,
    /// The messages, in offset order.
    pub messages: Vec<StoredMessage>,
}

/// What a read stream carries, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadItem {
    /// Messages before `earliest` were deleted by retention; the read goes on from there.
    Truncated {
        earliest: u64,
    },
    Message(StoredMessage),
}

/// What a node sent for a read ([`Client::read_raw`]), unchecked.
#[derive(Debug)]
pub struct RawRead {
    /// Every message received, in the order received.
    pub messages: Vec<StoredMessage>,
    /// The earliest retained offset, if the node said the read began below it.
    pub truncated_before: Option<u64>,
    /// How the read ended: the head the node said it had sent everything up to
    /// (`CaughtUp`), or what ended it early.
    pub end: Result<u64>,
}

/// How a [`Subscription`] hands on what the node sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Delivery {
    /// Each offset exactly once, in order (the default): a message already delivered is
    /// dropped, and a gap, an ended stream or a broken connection resubscribes from the
    /// offset after the last one delivered.
    #[default]
    ExactlyOnce,
    /// What one node sent, as it sent it, for tools that test the node rather than this
    /// library: an [`Event::Attached`] once the request is out, then every
    /// [`Event::Message`], [`Event::Truncated`] and [`Event::CaughtUp`] unchecked (repeats
    /// and gaps included), and last an [`Event::Failed`] saying why the stream ended (the
    /// node finished it, answered an error, or the connection broke). Nothing is deduplicated
    /// and nothing is retried: resubscribing is the caller's business.
    Raw,
}

fn response_error(code: ErrorCode, message: String) -> Error {
    match code {
        ErrorCode::InvalidInput => Error::InvalidInput(message),
        ErrorCode::Rejected => Error::Rejected(message),
        ErrorCode::Forbidden => Error::Forbidden(message),
        ErrorCode::Protocol => Error::Protocol(message),
        ErrorCode::Ambiguous => Error::Ambiguous(message),
        ErrorCode::Unavailable => Error::Unavailable(message),
    }
}

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The next message, in offset order, each offset once (with [`Delivery::Raw`]: the
    /// next message the node sent, unchecked).
    Message(StoredMessage),
    /// Everything stored up to `head` has been delivered (sent once per (re)attach).
    CaughtUp { head: u64 },
    /// The subscription (re)attached to `node` from `from`.
    Attached { node: u64, from: u64 },
    /// Retention deleted the messages before `earliest` that were due next; the
    /// subscription goes on from `earliest` (never a silent skip).
    Truncated { earliest: u64 },
    /// Attaching to `node` failed, or it cannot serve the tail now: it is down, stopping,
    /// cut off from its leader, rebuilding its state after a restart, or refused the
    /// connection or the reader for now (a limit). The subscription tries again in
    /// `retry_in_ms`, at `node` again if the caller pinned it: until then it lags, and this
    /// says why.
    Waiting { node: u64, error: String, retry_in_ms: u64 },
    /// A permanent error (e.g. invalid conversation id); the subscription ends. With
    /// [`Delivery::Raw`], whatever ended the stream.
    Failed(String),
}

/// A live subscription; dropping it stops the background task.
pub struct Subscription {
    pub rx: mpsc::Receiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// The next event; `None` once the subscription ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(client: Client, conversation: String, mut next: u64, pinned: Option<u64>, tx: mpsc::Sender<Event>) {
    let shard = shard_of(&conversation, client.inner.shards);
    let (mut pinned, mut hint) = (pinned, None);
    let mut attempt = 0usize;
    // Replicas that refused this reader since it last got anything: a replica behind the
    // leader may not have applied the reader's addition yet, so a refusal is final only once
    // every replica gave it (or the one the caller pinned).
    let mut refused: BTreeSet<u64> = BTreeSet::new();
    loop {
        let node = hint.take().or(pinned).unwrap_or_else(|| {
            // The shard's replicas as the newest map has them (a move changes them), in
            // rotation, the first that is not suspect (a stopped node closed this tail).
            let ids = client.routes().replicas(shard);
            client.first_healthy(&ids, attempt).unwrap_or(0)
        });
        attempt += 1;
        let req = Request::Subscribe { conversation: conversation.clone(), from: next, follow: true };
        // The seat is given back when this attachment ends, with its stream.
        let (mut recv, conn, seat) = match client.open_follow(node, &req).await {
            Ok((lane, conn, seat)) => {
                (frame::FrameReader::new(lane.recv, RESPONSE_FRAME_BYTES_MAX, FOLLOW_BUFFER_BYTES), conn, seat)
            }
            Err(e @ Error::Forbidden(_)) => {
                let _ = tx.send(Event::Failed(e.to_string())).await;
                return;
            }
            // The caller pinned a node the cluster's map no longer has (removed): no retry
            // will reach it.
            Err(e @ Error::InvalidInput(_)) if pinned == Some(node) && !client.knows(node) => {
                let _ = tx.send(Event::Failed(format!("node {node} is not in the cluster: {e}"))).await;
                return;
            }
            Err(e) => {
                tracing::debug!(node, error = %e, "subscribe failed; retrying");
                if !wait_to_resubscribe(&tx, node, Some(e.to_string()), attempt).await {
                    return;
                }
                continue;
            }
        };
        if tx.send(Event::Attached { node, from: next }).await.is_err() {
            return;
        }
        // Why the node could not serve the tail, if it said so: told as `Waiting`.
        let mut waiting = None;
        loop {
            match recv.next::<Response>().await {
                Ok(Some(Response::Message(m))) => {
                    if m.offset < next {
                        continue;
                    }
                    if m.offset > next {
                        tracing::warn!(node, expected = next, got = m.offset, "gap from server; resubscribing");
                        break;
                    }
                    next += 1;
                    attempt = 0;
                    refused.clear();
                    if tx.send(Event::Message(m)).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Response::CaughtUp { head })) => {
                    refused.clear();
                    if tx.send(Event::CaughtUp { head }).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Response::Truncated { earliest })) => {
                    if earliest > next {
                        next = earliest;
                        if tx.send(Event::Truncated { earliest }).await.is_err() {
                            return;
                        }
                    }
                }
                // This replica says the user may not read. Another that is further along may
                // say otherwise (the user was just added); once every replica refused, the
                // user may not read (any more: a removed member's subscription ends at the
                // removal, which no replica serves past).
                Ok(Some(Response::Error { code: ErrorCode::Forbidden, message })) => {
                    refused.insert(node);
                    let other = client.routes().voters(shard).into_iter().find(|n| !refused.contains(n));
                    match other.filter(|_| pinned.is_none()) {
                        Some(other) => {
                            tracing::debug!(node, other, %message, "refused by a replica; asking another");
                            hint = Some(other);
                            break;
                        }
                        None => {
                            let _ =
                                tx.send(Event::Failed(response_error(ErrorCode::Forbidden, message).to_string())).await;
                            return;
                        }
                    }
                }
                // This replica cannot serve the tail now (it lost its leader, is stopping, or is
                // rebuilding its state after a restart): the next replica, unless the caller
                // pinned this one.
                Ok(Some(Response::Error { code: ErrorCode::Unavailable, message })) => {
                    tracing::debug!(node, %message, "the replica cannot serve the tail; resubscribing at the next");
                    waiting = Some(message);
                    if pinned.is_none() {
                        let ids = client.routes().replicas(shard);
                        let at = ids.iter().position(|n| *n == node).map_or(0, |i| i + 1);
                        hint = client.first_healthy(&ids, at).filter(|n| *n != node);
                    }
                    break;
                }
                // Retrying changes nothing: the request is bad, or the node cannot read it.
                Ok(Some(Response::Error { code: code @ (ErrorCode::InvalidInput | ErrorCode::Protocol), message })) => {
                    let _ = tx.send(Event::Failed(response_error(code, message).to_string())).await;
                    return;
                }
                // Any replica serves a subscription: this node holds none of the shard (its
                // replica moved away), so no pin keeps the subscription here.
                Ok(Some(Response::NotLeader { shard, leader, map })) => {
                    tracing::debug!(node, shard, ?leader, "the node does not hold the shard; resubscribing elsewhere");
                    if pinned == Some(node) {
                        pinned = None;
                    }
                    if let Some(map) = map {
                        client.learn(&map);
                    }
                    hint = leader.filter(|l| *l != node && client.knows(*l));
                    break;
                }
                Ok(other) => {
                    tracing::debug!(node, ?other, "subscription stream ended; resubscribing");
                    break;
                }
                Err(e) => {
                    if let Some((refused, _)) = conn.close_reason().and_then(|r| credential_refusal(node, &r)) {
                        let _ = tx.send(Event::Failed(refused.to_string())).await;
                        return;
                    }
                    // The node runs another build: another replica may not (a rolling
                    // upgrade); once every one did, or the pinned one, say so rather than
                    // resubscribe forever.
                    if frame::is_version_mismatch(&e) {
                        refused.insert(node);
                        let other = client.routes().replicas(shard).into_iter().find(|n| !refused.contains(n));
                        match other.filter(|_| pinned.is_none()) {
                            Some(other) => hint = Some(other),
                            None => {
                                let _ = tx.send(Event::Failed(format!("node {node}: {e}"))).await;
                                return;
                            }
                        }
                        break;
                    }
                    tracing::debug!(node, error = %e, "subscription broke; resubscribing");
                    client.forget_broken(node, &conn, seat.dialed).await;
                    break;
                }
            }
        }
        // The stream and its seat go now, not after the wait: the node may still hold the
        // stream open, and the seat's connection may be the next attempt's.
        drop((recv, seat));
        if !wait_to_resubscribe(&tx, node, waiting, attempt).await {
            return;
        }
    }
}

/// The pause before a subscription's next attempt, told first as [`Event::Waiting`] when
/// `error` says why `node` did not serve it. False when the subscriber is gone.
async fn wait_to_resubscribe(tx: &mpsc::Sender<Event>, node: u64, error: Option<String>, attempt: usize) -> bool {
    let pause = backoff(RESUBSCRIBE_BACKOFF_STEP, RESUBSCRIBE_BACKOFF_MAX, attempt);
    if let Some(error) = error {
        let retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        if tx.send(Event::Waiting { node, error, retry_in_ms }).await.is_err() {
            return false;
        }
    }
    tokio::time::sleep(pause).await;
    true
}

/// A [`Delivery::Raw`] subscription: one stream from `node`, handed on as it comes.
async fn follow_raw(client: Client, conversation: String, from: u64, node: u64, tx: mpsc::Sender<Event>) {
    let req = Request::Subscribe { conversation, from, follow: true };
    let (mut recv, conn, seat) = match client.open_follow(node, &req).await {
        Ok((lane, conn, seat)) => {
            (frame::FrameReader::new(lane.recv, RESPONSE_FRAME_BYTES_MAX, FOLLOW_BUFFER_BYTES), conn, seat)
        }
        Err(e) => {
            let _ = tx.send(Event::Failed(format!("subscribing at node {node} failed: {e}"))).await;
            return;
        }
    };
    if tx.send(Event::Attached { node, from }).await.is_err() {
        return;
    }
    let end = loop {
        let event = match recv.next::<Response>().await {
            Ok(Some(Response::Message(m))) => Event::Message(m),
            Ok(Some(Response::CaughtUp { head })) => Event::CaughtUp { head },
            Ok(Some(Response::Error { code, message })) => break response_error(code, message).to_string(),
            Ok(Some(Response::Truncated { earliest })) => Event::Truncated { earliest },
            Ok(Some(other)) => break format!("node {node} sent an unexpected frame {other:?}"),
            Ok(None) => break format!("node {node} ended the stream"),
            Err(e) => {
                client.forget_broken(node, &conn, seat.dialed).await;
                break format!("node {node}: {e}");
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    };
    let _ = tx.send(Event::Failed(end)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::wire::{RoutedNode, RoutedShard};

    fn file_routes() -> Routes {
        let nodes = (1..=3).map(|id| (id, SocketAddr::from(([127, 0, 0, 1], 8000 + id as u16)))).collect();
        Routes { nodes, ..Routes::default() }
    }

    fn routed(id: u64, port: u16, state: NodeState) -> RoutedNode {
        RoutedNode { id, client_addr: format!("127.0.0.1:{port}"), state }
    }

    // A send whose first attempt timed out may be stored: a retry refused later (a node with
    // a smaller frame limit, a sender removed meanwhile) does not make its outcome known.
    #[test]
    fn a_refusal_after_an_unknown_outcome_is_still_unknown() {
        let earlier = Some("node 2 did not answer within 2.5s".to_string());
        match after_unknown(&earlier, Error::Forbidden("not a member of c".into())) {
            Error::Ambiguous(m) => {
                assert!(m.contains("node 2 did not answer") && m.contains("not a member of c"), "{m}")
            }
            other => panic!("a refusal after an unknown outcome must be ambiguous, got {other:?}"),
        }
        assert!(matches!(after_unknown(&None, Error::InvalidInput("too long".into())), Error::InvalidInput(_)));
    }

    #[test]
    fn routes_take_only_a_newer_map_and_keep_the_files_nodes_it_does_not_name() {
        let mut routes = file_routes();
        // Before any map: every node, rotated by shard.
        assert_eq!(routes.leader_candidates(1, 0), (vec![1, 2, 3], 1));
        assert_eq!(routes.replicas(1), vec![1, 2, 3]);
        let map = RoutingMap {
            epoch: 7,
            nodes: vec![
                routed(1, 8001, NodeState::Removed),
                routed(2, 9002, NodeState::Active),
                routed(4, 8004, NodeState::Draining),
                RoutedNode { id: 5, client_addr: "node5.example:443".into(), state: NodeState::Active },
            ],
            shards: vec![
                RoutedShard { shard: 0, voters: vec![4, 2, 3] },
                RoutedShard { shard: 1, voters: vec![2, 1, 4] },
            ],
        };
        let mut changed = routes.learn(&map).expect("a newer map is taken");
        changed.sort_unstable();
        assert_eq!(changed, vec![1, 2], "node 1 went away and node 2 changed address");
        assert_eq!(routes.nodes.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4], "5's address does not parse");
        assert_eq!(routes.nodes[&2], SocketAddr::from(([127, 0, 0, 1], 9002)));
        assert_eq!(routes.shards[&1], vec![2, 4], "a removed node is no voter to route to");
        // The voters, preferred leader first, rotated by attempt; every fourth attempt all
        // nodes, in case the map is stale.
        assert_eq!(routes.leader_candidates(0, 0), (vec![4, 2, 3], 0));
        assert_eq!(routes.leader_candidates(0, 2), (vec![4, 2, 3], 2));
        assert_eq!(routes.leader_candidates(0, 3), (vec![2, 3, 4], 3));
        // A shard the map does not have is routed as before any map.
        assert_eq!(routes.leader_candidates(9, 0), (vec![2, 3, 4], 9));
        assert_eq!(routes.replicas(0), vec![2, 3, 4]);
        assert_eq!(routes.replicas(1), vec![2, 4, 3], "its voters first, then the rest");

        // An older or equal map changes nothing.
        let stale = RoutingMap { epoch: 7, nodes: vec![routed(1, 8001, NodeState::Active)], shards: vec![] };
        assert_eq!(routes.learn(&stale), None);
        assert_eq!(routes.epoch, 7);
        assert!(!routes.nodes.contains_key(&1));
    }

    fn send(outbox: &mut Outbox, shard: ShardId, seq: u64) -> bool {
        let req = SendRequest {
            conversation: format!("c{shard}"),
            sender: "u".into(),
            client_id: 1,
            client_seq: seq,
            text: "x".into(),
        };
        let (tx, _rx) = tokio::sync::oneshot::channel();
        outbox.push(shard, (req, tx))
    }

    fn seqs(batch: &[Waiting]) -> Vec<u64> {
        batch.iter().map(|(r, _)| r.client_seq).collect()
    }

    /// Queues a send that takes a slot, and takes its batch as the spawned drain would.
    fn send_and_take(outbox: &mut Outbox, shard: ShardId, seq: u64) -> Vec<u64> {
        assert!(send(outbox, shard, seq), "send {seq} should take a free slot");
        let mut held = shard;
        let batch = seqs(&outbox.next_batch(&mut held, SEND_BATCH_BYTES_MAX).expect("its own send"));
        assert_eq!(held, shard);
        batch
    }

    fn stored(offset: u64) -> StoredMessage {
        StoredMessage {
            conversation: "c".into(),
            offset,
            sender: "u".into(),
            ts_ms: 1,
            client_id: 1,
            client_seq: offset,
            text: format!("t{offset}"),
        }
    }

    fn msg(offset: u64) -> Response {
        Response::Message(stored(offset))
    }

    // Back-offs spread over [half, whole] of their step, and a throttled client waits what
    // the node asked plus up to a quarter, capped.
    #[test]
    fn back_offs_are_jittered_within_their_bounds() {
        let waits: Vec<Duration> =
            (0..200).map(|_| backoff(Duration::from_millis(50), Duration::from_secs(1), 4)).collect();
        assert!(waits.iter().all(|w| (Duration::from_millis(100)..=Duration::from_millis(200)).contains(w)));
        assert!(waits.iter().collect::<std::collections::HashSet<_>>().len() > 10, "the waits are spread");
        let throttled: Vec<Duration> = (0..200).map(|_| throttle_wait(100)).collect();
        assert!(throttled.iter().all(|w| (Duration::from_millis(100)..=Duration::from_millis(125)).contains(w)));
        assert!(throttle_wait(60_000) <= THROTTLE_WAIT_MAX.mul_f64(1.25));
    }

    /// What a fake node received and holds until the test is done with it.
    type FakeNode = tokio::task::JoinHandle<(Vec<Request>, quinn::Connection, quinn::Endpoint)>;

    /// A fake node 1's QUIC endpoint on loopback, with its credentials, and a client of it.
    fn fake_endpoint() -> (Client, quinn::Endpoint, tempfile::TempDir) {
        let (client, node, dir, _) = fake_endpoint_and_config();
        (client, node, dir)
    }

    /// [`fake_endpoint`], and the config the client was made from.
    fn fake_endpoint_and_config() -> (Client, quinn::Endpoint, tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the fake node");
        let addr = socket.local_addr().expect("its address");
        let toml = format!(
            "shards = 4\nreplication_factor = 1\n[[nodes]]\nid = 1\nclient_addr = \"{addr}\"\n\
             peer_addr = \"127.0.0.1:1\"\ndata_dir = \"n1\"\n"
        );
        let config = Config::parse(&toml, dir.path(), &dir.path().join("convoy.toml")).expect("config");
        let paths = tls::init(&config).expect("credentials");
        let server = tls::server_config(&paths, 1, tls::Link::Client, 64).expect("server config");
        let runtime = Arc::new(quinn::TokioRuntime);
        let node = quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime)
            .expect("fake node endpoint");
        let credential = tls::ensure_user(&config, "u", false).expect("a user");
        let client = Client::connect_as(&config, &credential, 9, 1).expect("client");
        (client, node, dir, config)
    }

    /// A node whose key the list names is refused after its handshake, and suspect; a list
    /// that no longer reads keeps the last one read; a client is not made on a list that
    /// does not read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_presenting_a_revoked_key_is_refused_and_a_bad_list_keeps_the_last_one() {
        let (client, node, _dir, config) = fake_endpoint_and_config();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Some(incoming) = node.accept().await {
                if let Ok(conn) = incoming.await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move { conn.closed().await });
                }
            }
        });
        let paths = TlsPaths::of(&config);
        let fp = tls::node_key_fingerprint(&paths, 1).expect("node 1's key");
        std::fs::write(paths.revoked(), format!("{fp} node1 0\n")).expect("revoke node 1");
        let e = client.read("c", 1, Some(1)).await.expect_err("node 1 is revoked");
        assert!(matches!(e, Error::Unavailable(_)) && e.to_string().contains("revoked certificate"), "{e}");
        // The node side finishes the handshake on its own task, maybe after the refusal.
        let handshaken = tokio::time::timeout(Duration::from_secs(5), async {
            while accepted.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(handshaken.await.is_ok(), "refused after a handshake, not before");
        assert!(client.is_suspect(1), "a refused node is suspect");
        std::fs::write(paths.revoked(), "not a fingerprint\n").expect("a bad edit");
        let e = client.read("c", 1, Some(1)).await.expect_err("the last list read stays");
        assert!(e.to_string().contains("revoked certificate"), "{e}");
        let credential = tls::ensure_user(&config, "u", false).expect("a user");
        let e = Client::connect_as(&config, &credential, 10, 1).err().expect("no client on a list that does not read");
        assert!(matches!(e, Error::Config(_)) && e.to_string().contains("line 1"), "{e}");
    }

    /// A client of a fake node 1 that answers its i-th request stream with `script[i]`, then
    /// finishes that stream; the handle gives the requests it read, in order.
    fn fake_node(script: Vec<Vec<Response>>) -> (Client, FakeNode, tempfile::TempDir) {
        let (client, node, dir) = fake_endpoint();
        let handle = tokio::spawn(async move {
            let conn = node.accept().await.expect("a connection").await.expect("handshake");
            let mut got = Vec::new();
            for frames in script {
                let (mut send, mut recv) = conn.accept_bi().await.expect("a request stream");
                got.push(frame::read::<_, Request>(&mut recv, 1 << 20).await.expect("a frame").expect("a request"));
                for f in &frames {
                    frame::write(&mut send, f).await.expect("answer");
                }
                send.finish().expect("finish the stream");
            }
            (got, conn, node)
        });
        (client, handle, dir)
    }

    /// A request that never left (the node never finished the handshake) is `Unavailable`,
    /// not of unknown outcome: nothing was sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_never_left_is_unavailable_not_unknown() {
        // The endpoint is held but never accepts: the handshake goes unanswered.
        let (client, _node, _dir) = fake_endpoint();
        let e = client.request(1, &Request::ShardMap).await.expect_err("no connection");
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
    }

    /// A node of another build answers in another wire version: a request gets a definite
    /// `Protocol` error (that node decoded nothing of it), and a follow ends saying so
    /// instead of subscribing again forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_of_another_wire_version_is_a_definite_error_and_ends_a_follow() {
        let (client, node, _dir) = fake_endpoint();
        tokio::spawn(async move {
            let conn = node.accept().await.expect("a connection").await.expect("handshake");
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let _ = frame::read::<_, Request>(&mut recv, 1 << 20).await;
                let mut other = frame::encode(&Response::Error { code: ErrorCode::Protocol, message: "?".into() });
                other[4] = frame::WIRE_VERSION + 1;
                send.write_all(&other).await.expect("answer");
                send.finish().expect("finish");
            }
            drop(node);
        });
        let e = client.request(1, &Request::ShardMap).await.expect_err("another version");
        assert!(matches!(&e, Error::Protocol(m) if m.contains("unsupported wire version")), "{e}");
        let mut sub = client.subscribe("c", 1, Some(1));
        assert_eq!(next_event(&mut sub).await, Some(Event::Attached { node: 1, from: 1 }));
        match next_event(&mut sub).await {
            Some(Event::Failed(m)) => assert!(m.contains("unsupported wire version"), "{m}"),
            other => panic!("the follow must end, got {other:?}"),
        }
    }

    async fn next_event(sub: &mut Subscription) -> Option<Event> {
        tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("an event within 10 s")
    }

    fn subscribe_request(from: u64, follow: bool) -> Request {
        Request::Subscribe { conversation: "c".into(), from, follow }
    }

    /// The raw mode hands on a repeat and a gap exactly as the node sent them, then says the
    /// stream ended, and does not subscribe again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_raw_subscription_hands_on_repeats_and_gaps_and_never_resubscribes() {
        let stream = vec![msg(1), msg(2), Response::CaughtUp { head: 2 }, msg(2), msg(4)];
        let (client, node, _dir) = fake_node(vec![stream]);
        let mut sub = client.subscribe_with("c", 1, Some(1), Delivery::Raw);
        let mut events = Vec::new();
        while let Some(ev) = next_event(&mut sub).await {
            events.push(ev);
        }
        let Some(Event::Failed(why)) = events.pop() else { panic!("the last event says why: {events:?}") };
        assert!(why.contains("ended the stream"), "{why}");
        let want = vec![
            Event::Attached { node: 1, from: 1 },
            Event::Message(stored(1)),
            Event::Message(stored(2)),
            Event::CaughtUp { head: 2 },
            Event::Message(stored(2)),
            Event::Message(stored(4)),
        ];
        assert_eq!(events, want);
        // The subscription ended (its task dropped the channel): it asked once.
        let (got, _conn, _node) = node.await.expect("fake node");
        assert_eq!(got, vec![subscribe_request(1, true)]);
    }

    /// The default mode drops the repeat and resubscribes at the gap, from the offset after
    /// the last one it delivered: the same node stream as above, seen exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_default_subscription_drops_repeats_and_resubscribes_at_a_gap() {
        let first = vec![msg(1), msg(2), Response::CaughtUp { head: 2 }, msg(2), msg(4)];
        let second = vec![msg(3), msg(4), Response::CaughtUp { head: 4 }];
        let (client, node, _dir) = fake_node(vec![first, second]);
        let mut sub = client.subscribe("c", 1, Some(1));
        let mut events = Vec::new();
        while events.len() < 8 {
            events.push(next_event(&mut sub).await.expect("the subscription goes on"));
        }
        let want = vec![
            Event::Attached { node: 1, from: 1 },
            Event::Message(stored(1)),
            Event::Message(stored(2)),
            Event::CaughtUp { head: 2 },
            Event::Attached { node: 1, from: 3 },
            Event::Message(stored(3)),
            Event::Message(stored(4)),
            Event::CaughtUp { head: 4 },
        ];
        assert_eq!(events, want);
        drop(sub);
        let (got, _conn, _node) = node.await.expect("fake node");
        assert_eq!(got, vec![subscribe_request(1, true), subscribe_request(3, true)]);
    }

    /// `read_raw` returns a gap and the messages before an error as the node sent them;
    /// `read` refuses the gap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_raw_read_returns_what_the_node_sent() {
        let gap = vec![msg(1), msg(2), msg(4), Response::CaughtUp { head: 4 }];
        let broken = vec![msg(1), Response::Error { code: ErrorCode::Unavailable, message: "disk on fire".into() }];
        let (client, node, _dir) = fake_node(vec![gap.clone(), broken, gap]);
        let read = client.read_raw("c", 1, 1).await;
        let offsets: Vec<u64> = read.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [1, 2, 4]);
        assert_eq!(read.end.expect("caught up"), 4);
        let read = client.read_raw("c", 1, 1).await;
        assert_eq!(read.messages, vec![stored(1)]);
        let err = read.end.expect_err("the node answered an error");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        let refused = client.read("c", 1, Some(1)).await.expect_err("a gap is an error for applications");
        assert!(matches!(refused, Error::Protocol(_)), "{refused}");
        let (got, _conn, _node) = node.await.expect("fake node");
        assert_eq!(got, vec![subscribe_request(1, false); 3]);
    }

    /// Send requests larger than the node's stream window (256 KiB) cannot be written in
    /// one poll: the coalesced write must finish each one's rest, on its own stream and in
    /// order, so that the node reads every request whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn send_requests_larger_than_the_stream_window_arrive_whole() {
        let (client, node, _dir) = fake_endpoint();

        const REQUESTS: u64 = 6;
        const TEXT_BYTES: usize = 600_000;
        let request = |seq: u64| {
            Request::Send(SendRequest {
                conversation: "c".into(),
                sender: "u".into(),
                client_id: 9,
                client_seq: seq,
                text: char::from(b'a' + seq as u8).to_string().repeat(TEXT_BYTES),
            })
        };
        let exchange = async {
            // The fake node reads one whole request per stream.
            let reader = tokio::spawn(async move {
                let conn = node.accept().await.expect("a connection").await.expect("handshake");
                let mut reads = Vec::new();
                for _ in 0..REQUESTS {
                    let (send, mut recv) = conn.accept_bi().await.expect("a request stream");
                    reads.push(tokio::spawn(async move {
                        let req = frame::read::<_, Request>(&mut recv, 4 << 20).await.expect("a whole frame");
                        (req, send)
                    }));
                }
                let mut got = Vec::new();
                for r in reads {
                    got.push(r.await.expect("reader").0.expect("a request, not the end of the stream"));
                }
                (got, conn, node)
            });
            let writers: Vec<_> = (1..=REQUESTS)
                .map(|seq| {
                    let (client, req) = (client.clone(), request(seq));
                    tokio::spawn(async move { client.open_on(1, &req).await.map(|(lane, _)| (lane, req)) })
                })
                .collect();
            let mut lanes = Vec::new();
            for w in writers {
                lanes.push(w.await.expect("writer").expect("the request was handed to QUIC"));
            }
            (reader.await.expect("fake node"), lanes)
        };
        let ((mut got, _conn, _node), _lanes) =
            tokio::time::timeout(Duration::from_secs(30), exchange).await.expect("every request arrives within 30 s");
        got.sort_by_key(|r| match r {
            Request::Send(s) => s.client_seq,
            _ => 0,
        });
        let want: Vec<Request> = (1..=REQUESTS).map(request).collect();
        assert!(got == want, "the node must read every request exactly as it was written");
        assert!(client.partial_writes() > 0, "no write was cut by the window (else this tests nothing)");
    }

    /// A subscriber that stops reading fills its stream's window with the node's frames cut
    /// mid-frame; the node gives up on the write and answers the subscription with an error.
    /// Those bytes must never complete the cut frame: here the cut is 40 bytes before the end
    /// of a message's text and the error answer is longer, so it would. Every message the
    /// client reads is one the node sent, and the stream ends in an error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_write_given_up_mid_frame_never_completes_it_with_other_bytes() {
        let (client, node, _dir) = fake_endpoint();
        let window = crate::net::quic::CLIENT_PUSH_STREAM_WINDOW_BYTES as usize;
        let message = |offset: u64, text_bytes: usize| StoredMessage {
            text: char::from(b'a' + (offset % 26) as u8).to_string().repeat(text_bytes),
            ..stored(offset)
        };
        // Frames of 60,000-byte texts, then one sized to end 40 bytes past the window.
        let mut sent: Vec<StoredMessage> = (1..=17).map(|o| message(o, 60_000)).collect();
        let mut bytes: Vec<u8> = sent.iter().flat_map(|m| frame::encode(&Response::Message(m.clone()))).collect();
        let probe = frame::encode(&Response::Message(message(18, 10_000))).len();
        let last = message(18, 10_000 + (window + 40 - bytes.len() - probe));
        bytes.extend(frame::encode(&Response::Message(last.clone())));
        sent.push(last);
        assert_eq!(bytes.len(), window + 40, "the window cuts the last frame 40 bytes before its end");
        let answer = Response::Error {
            code: ErrorCode::Unavailable,
            message: "the subscriber read nothing for 300ms; its subscription is dropped".into(),
        };
        assert!(frame::encode(&answer).len() > 40, "the answer is long enough to complete the cut frame");

        let (gave_up, given_up) = tokio::sync::oneshot::channel();
        let fake = tokio::spawn(async move {
            let conn = node.accept().await.expect("a connection").await.expect("handshake");
            let (mut send, mut recv) = conn.accept_bi().await.expect("a request stream");
            frame::read::<_, Request>(&mut recv, 1 << 20).await.expect("a frame").expect("a request");
            // As the node writes to a subscriber (`service::write_subscriber`).
            let wrote = frame::write_or_reset(&mut send, &bytes, Duration::from_millis(300)).await;
            assert!(wrote.is_err(), "the client reads nothing, so the write gives up");
            let _ = gave_up.send(());
            // What the server does next with a subscription's error, while the client reads
            // again (a subscriber that stalled, then resumed).
            let _ = tokio::time::timeout(Duration::from_secs(5), frame::write(&mut send, &answer)).await;
            let _ = send.finish();
            (conn, node)
        });
        let (lane, _) = client.open_on(1, &subscribe_request(1, true)).await.expect("the request was written");
        tokio::time::timeout(Duration::from_secs(10), given_up).await.expect("in time").expect("the write gave up");
        let mut reader = frame::FrameReader::new(lane.recv, RESPONSE_FRAME_BYTES_MAX, FOLLOW_BUFFER_BYTES);
        let mut read = 0usize;
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(10), reader.next::<Response>()).await.expect("in time") {
                Ok(Some(Response::Message(m))) => {
                    let want = sent.iter().find(|s| s.offset == m.offset).expect("an offset the node sent");
                    assert!(m == *want, "message {} arrived with other bytes than the node sent", m.offset);
                    read += 1;
                }
                Ok(other) => break Ok(other),
                Err(e) => break Err(e),
            }
        };
        assert!(ended.is_err(), "the stream ends in an error, not in {ended:?} after {read} messages");
        assert!(read < sent.len(), "the cut message is not delivered");
        let kept = tokio::time::timeout(Duration::from_secs(10), fake).await.expect("in time").expect("fake node");
        drop(kept);
    }

    // A node with a 64 KiB frame limit refuses a larger request whole, so a batch of sends
    // that each fit must not add up past it; what a batch holds is measured by an upper bound
    // of its encoding.
    #[test]
    fn a_batch_fits_the_clusters_frame_limit() {
        let frame_max = 64 << 10;
        let send = |seq: u64, text_bytes: usize| {
            let (tx, _rx) = tokio::sync::oneshot::channel();
            let req = SendRequest {
                conversation: "c".into(),
                sender: "u".into(),
                client_id: u64::MAX,
                client_seq: seq,
                text: "x".repeat(text_bytes),
            };
            (req, tx)
        };
        let budget = batch_bytes_for(frame_max);
        let mut waiting: Vec<Waiting> = (1..=20).map(|seq| send(seq, 10_000)).collect();
        let batch = take_batch(&mut waiting, budget);
        assert_eq!(batch.len(), 6, "six sends of 10,000 bytes fit 63 KiB, seven do not");
        let request = Request::SendBatch(batch.into_iter().map(|(r, _)| r).collect());
        assert!(frame::encode(&request).len() <= frame_max, "the batch's frame fits the limit");
        // Without the cluster's limit, the batch would have taken 26 sends (256 KiB).
        assert_eq!(take_batch(&mut waiting, SEND_BATCH_BYTES_MAX).len(), 14, "the rest, under 256 KiB");

        // The bound holds for the smallest sends too, with the largest varints.
        let mut tiny: Vec<Waiting> = (u64::MAX - 300..u64::MAX).map(|seq| send(seq, 1)).collect();
        let batch = take_batch(&mut tiny, budget);
        let bound: usize = batch.iter().map(|(r, _)| encoded_bytes(r)).sum();
        let request = Request::SendBatch(batch.into_iter().map(|(r, _)| r).collect());
        assert!(frame::encode(&request).len() <= bound + BATCH_FRAME_ROOM_BYTES, "the estimate bounds the encoding");

        // A single send larger than the budget still goes, alone.
        let mut large: Vec<Waiting> = vec![send(1, 64_600), send(2, 10)];
        assert_eq!(take_batch(&mut large, budget).len(), 1);
        assert_eq!(batch_bytes_for(1 << 20), SEND_BATCH_BYTES_MAX, "the default 1 MiB limit leaves 256 KiB batches");
    }

    #[test]
    fn a_shard_gets_its_window_then_its_sends_wait_and_leave_together() {
        let mut o = Outbox::default();
        for seq in 0..SEND_REQUESTS_PER_SHARD as u64 {
            assert_eq!(send_and_take(&mut o, 7, seq), vec![seq]);
        }
        assert!(!send(&mut o, 7, 100), "the window is full: the send must wait");
        assert!(!send(&mut o, 7, 101));
        // The first request to return carries both waiting sends in one batch.
        let mut shard = 7;
        assert_eq!(seqs(&o.next_batch(&mut shard, SEND_BATCH_BYTES_MAX).expect("the waiting sends")), vec![100, 101]);
        // Nothing waits any more: every slot is released and the shard forgotten.
        for _ in 0..SEND_REQUESTS_PER_SHARD {
            assert!(o.next_batch(&mut shard, SEND_BATCH_BYTES_MAX).is_none());
        }
        assert_eq!(o.in_flight, 0);
        assert!(o.shards.is_empty());
    }

    #[test]
    fn a_batch_carries_one_shard_only() {
        let mut o = Outbox::default();
        // Both wait behind a full window of their shards' requests.
        for seq in 0..SEND_REQUESTS_PER_SHARD as u64 {
            send_and_take(&mut o, 1, seq);
            send_and_take(&mut o, 2, 1_000 + seq);
        }
        assert!(!send(&mut o, 1, 10));
        assert!(!send(&mut o, 2, 20));
        assert!(!send(&mut o, 1, 11));
        let (mut a, mut b) = (1, 2);
        assert_eq!(seqs(&o.next_batch(&mut a, SEND_BATCH_BYTES_MAX).expect("shard 1")), vec![10, 11]);
        assert_eq!(seqs(&o.next_batch(&mut b, SEND_BATCH_BYTES_MAX).expect("shard 2")), vec![20]);
        assert_eq!((a, b), (1, 2));
    }

    #[test]
    fn a_shard_held_back_by_the_node_cap_gets_the_next_free_slot() {
        const { assert!(SEND_REQUESTS_PER_NODE > SEND_REQUESTS_PER_SHARD, "the test needs several busy shards") };
        let mut o = Outbox::default();
        // Busy shards 0, 1, … take every slot of the node.
        for slot in 0..SEND_REQUESTS_PER_NODE {
            let shard = (slot / SEND_REQUESTS_PER_SHARD) as ShardId;
            send_and_take(&mut o, shard, slot as u64);
        }
        assert_eq!(o.in_flight, SEND_REQUESTS_PER_NODE);
        // Shard 0 has a backlog; a quiet shard 99 finds no free slot.
        assert!(!send(&mut o, 0, 50));
        assert!(!send(&mut o, 99, 9_900));
        // A request of shard 0 returns: its slot serves the starved shard before shard 0's backlog.
        let mut shard = 0;
        assert_eq!(seqs(&o.next_batch(&mut shard, SEND_BATCH_BYTES_MAX).expect("the starved shard")), vec![9_900]);
        assert_eq!(shard, 99);
        assert_eq!(o.in_flight, SEND_REQUESTS_PER_NODE);
        // Shard 99's request returns: nothing of its own waits, so the slot takes shard 0's backlog.
        assert_eq!(seqs(&o.next_batch(&mut shard, SEND_BATCH_BYTES_MAX).expect("shard 0's backlog")), vec![50]);
        assert_eq!(shard, 0);
        assert!(!o.shards.contains_key(&99), "an idle shard is forgotten");
        // That request returns with nothing left anywhere: the slot is released.
        assert!(o.next_batch(&mut shard, SEND_BATCH_BYTES_MAX).is_none());
        assert_eq!(o.in_flight, SEND_REQUESTS_PER_NODE - 1);
    }
}
