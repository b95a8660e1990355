//! Every message between clients and nodes, in one file, versioned by the frame's version
//! byte ([`super::frame::WIRE_VERSION`]).
//!
//! The client protocol: one bidirectional stream per request. The client writes one
//! [`Request`] frame and finishes its side; the server answers one [`Response`] frame
//! (unary requests) or a sequence of them (a subscription) and finishes. Sends keep their
//! stream open for the next send (a lane, see `net::lane`).
//!
//! The peer protocol (Raft RPCs between nodes) lives with Raft, in `raft::rpc`: the client
//! protocol never names a Raft type.

use serde::{Deserialize, Serialize};

use crate::chat::{Membership, Retention, ShardId, StoredMessage};
pub use crate::placement::{ClusterMap, NodeState, RoutedNode, RoutedShard, RoutingMap};
pub use crate::stages::StageSnapshot;

/// QUIC application close code: the client's certificate names no usable user.
pub const CLOSE_NO_IDENTITY: u32 = 0x10;
/// QUIC application close code: the node is at its connection limit.
pub const CLOSE_FULL: u32 = 0x11;
/// QUIC application close code: the client's certificate was revoked (`convoy user revoke`),
/// refused at its handshake: nothing sent on the connection was served.
pub const CLOSE_REVOKED: u32 = 0x12;
/// QUIC application close code: an open connection whose certificate was just revoked was
/// closed; a request it had in flight may have been served.
pub const CLOSE_REVOKED_OPEN: u32 = 0x13;
/// QUIC application close code: the client's user has `limits.connections_per_user_max`
/// connections open on the node already; nothing sent on this one was served.
pub const CLOSE_USER_FULL: u32 = 0x14;
/// QUIC stream reset code: the node dropped a subscription whose reader took a batch of
/// stored messages too slowly while other readers waited for room to read theirs
/// (`service::catch_up`); resubscribing from the last offset received loses nothing.
pub const RESET_SLOW_READER: u32 = 0x20;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Append a message; answered `Ack` only after quorum commit (fsynced) and apply.
    Send(SendRequest),
    /// Stream a conversation from `from` (1 = the beginning). With `follow`, keep pushing
    /// live messages after `CaughtUp`; without, finish after `CaughtUp`.
    Subscribe { conversation: String, from: u64, follow: bool },
    /// Move a user's read cursor forward (replicated, monotone). `user` must be the
    /// connection's user.
    SetCursor { user: String, conversation: String, offset: u64 },
    /// Read a user's cursor and the conversation's head from this replica. `user` must be
    /// the connection's user.
    GetCursor { user: String, conversation: String },
    /// This node's view of every shard (admin credentials only).
    Status,
    /// Several sends in one request (the client coalesces sends that wait at the same
    /// time), at most [`SEND_BATCH_MAX`]; answered by one `Batch` holding each send's own
    /// answer, in order, exactly as if each had been a `Send`.
    SendBatch(#[serde(deserialize_with = "crate::decode::at_most::<_, _, SEND_BATCH_MAX>")] Vec<SendRequest>),
    /// Show or change a conversation's members (members only); answered `Members`.
    Members { conversation: String, change: MemberChange },
    /// Set a conversation's retention (a member, or an admin); answered `Retention`. Unset
    /// limits take the cluster's default (`[retention]`).
    SetRetention { conversation: String, retention: Retention },
    /// Name `to` the node that should lead `shard` (admin credentials only), through the
    /// cluster map; answered `Placed` once the map holds it. Leadership follows once
    /// `to`'s replica has the whole log.
    TransferLeader { shard: ShardId, to: u64 },
    /// Move `shard`'s replica on node `from` to node `to` (admin credentials only); answered
    /// `Placed` once the move is recorded. The metadata group's leader carries it out; its
    /// progress is in every node's `Status` (the cluster map's operations).
    Move { shard: ShardId, from: u64, to: u64 },
    /// Cancel operation `id` (admin credentials only), possible until its new replica votes.
    CancelOperation { id: u64 },
    /// Mark `node` draining (admin credentials only): it is given no new replica.
    Drain { node: u64 },
    /// Take `node` out of the cluster (admin credentials only), once it holds no replica.
    RemoveNode { node: u64 },
    /// Mark `node` lost (admin credentials only): its disk is gone, it is given no new
    /// replica, and moves off it delete nothing there (`convoy admin replace-node`).
    ReplaceNode { node: u64 },
    /// Where each shard's replicas are and how to reach each node (any user); answered
    /// `ShardMap`. A client asks when it has no map or a node it cannot reach.
    ShardMap,
    /// Stop draining `node` (admin credentials only): it takes replicas again.
    Recommission { node: u64 },
    /// Read a user's cursor and the conversation's head on the shard's leader, once a quorum
    /// confirmed that it still leads: every cursor move acknowledged before is in the answer.
    /// Answered `NotLeader` by any other node. `user` must be the connection's user.
    GetCursorFromLeader { user: String, conversation: String },
}

/// What a [`Request::Members`] asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// The members and head as the serving replica has them.
    Show,
    /// A change, made by the caller, on the conversation's leader. A creation names at most
    /// [`MEMBERS_MAX`](crate::chat::MEMBERS_MAX) users, checked as the request decodes.
    Change(#[serde(deserialize_with = "bounded_membership")] Membership),
}

/// A [`Membership`] off the wire, its creation list bounded while it decodes. The log's
/// entries decode as they always did: a bound there could refuse an entry committed before it.
fn bounded_membership<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Membership, D::Error> {
    /// [`Membership`]'s encoding, variant for variant.
    #[derive(Deserialize)]
    enum Bounded {
        Create {
            #[serde(deserialize_with = "crate::decode::at_most::<_, _, { crate::chat::MEMBERS_MAX }>")]
            members: Vec<String>,
        },
        Add {
            user: String,
        },
        Remove {
            user: String,
        },
    }
    Ok(match Bounded::deserialize(d)? {
        Bounded::Create { members } => Membership::Create { members },
        Bounded::Add { user } => Membership::Add { user },
        Bounded::Remove { user } => Membership::Remove { user },
    })
}

impl Request {
    /// Whether the request's stream stays open for the next such request once answered (a
    /// lane, see `net::lane`): sends do; any other request is its stream's only one.
    pub fn keeps_stream(&self) -> bool {
        matches!(self, Request::Send(_) | Request::SendBatch(_))
    }
}

/// Sends per [`Request::SendBatch`], at most.
pub use crate::chat::limits::SEND_BATCH_MAX;

/// Payload of [`Request::Send`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    pub conversation: String,
    /// The sending user: empty, or the user the connection's certificate names (anything
    /// else is `Forbidden`). The node stores the certificate's user.
    pub sender: String,
    /// Identifies the sending client instance; with `client_seq` the idempotency key.
    pub client_id: u64,
    pub client_seq: u64,
    pub text: String,
}

/// Machine-readable class of an error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or over a limit; nothing applied; do not retry unchanged.
    InvalidInput,
    /// Replicated and refused by the state machine (e.g. sequence reused).
    Rejected,
    /// Not applied; retry (perhaps elsewhere).
    Unavailable,
    /// Outcome unknown; retry with the same idempotency key.
    Ambiguous,
    /// The peer sent something this node does not understand.
    Protocol,
    /// The caller's identity may not do this: it names another user, is not a member of the
    /// conversation, or is not an admin. Do not retry unchanged.
    Forbidden,
}

/// A server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Ack {
        conversation: String,
        offset: u64,
        ts_ms: u64,
        duplicate: bool,
    },
    /// This node does not lead `shard` (or holds no replica of it): `leader` is its best
    /// guess, and `map` the node's routing map, so a client that routed by an older one (a
    /// shard moved, a node was added) can go straight to the right node. In a `Batch` only
    /// the first `NotLeader` carries the map.
    NotLeader {
        shard: ShardId,
        leader: Option<u64>,
        map: Option<Box<RoutingMap>>,
    },
    Throttled {
        retry_after_ms: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// One message of a subscription.
    Message(StoredMessage),
    /// The subscription has delivered everything stored up to `head`; live push follows.
    CaughtUp {
        head: u64,
    },
    /// Messages from the requested offset up to `earliest` were deleted by retention: a
    /// subscription continues from `earliest` (never a silent skip).
    Truncated {
        earliest: u64,
    },
    Cursor {
        offset: u64,
        head: u64,
    },
    Status(Box<NodeStatus>),
    /// The answers to a `SendBatch`, one per send, in order. Never another `Batch`: decoding
    /// refuses one inside ([`batch_answers`]), so a node's bytes cannot nest answers until the
    /// client's decoder overflows its stack.
    Batch(#[serde(deserialize_with = "batch_answers")] Vec<Response>),
    /// A conversation's members, and the head at which they were read or changed.
    Members {
        members: Vec<String>,
        head: u64,
    },
    /// A conversation's retention as set for it (`set`), and what applies once the
    /// cluster's default fills its unset limits (`effective`).
    Retention {
        set: Retention,
        effective: Retention,
    },
    /// A cluster-map change applied: the map's epoch now, and whether the request changed
    /// it (`false`: the map already said so).
    Placed {
        epoch: u64,
        changed: bool,
    },
    /// The answer to `ShardMap`.
    ShardMap(Box<RoutingMap>),
}

/// A node's view of its shards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub shards: Vec<ShardStatus>,
    /// Group commit since start: fsyncs of the WAL, and the appends/votes they covered.
    pub fsyncs: u64,
    pub fsync_completions: u64,
    pub fsync_us_total: u64,
    /// Batching since start: sends committed through this node as leader and the Raft
    /// entries that carried them; AppendEntries RPCs it sent, the entries they carried, and
    /// how many carried none (heartbeats and commit-index updates).
    pub sends_committed: u64,
    pub entries_committed: u64,
    pub append_rpcs: u64,
    pub append_rpc_entries: u64,
    pub append_rpcs_empty: u64,
    /// AppendEntries cut to a prefix to fit the peer frame budget.
    #[serde(default)]
    pub append_rpcs_cut: u64,
    /// Frames that carried those AppendEntries (`raft.append_frames_in_flight`; 0 when each
    /// group has its own exchange).
    #[serde(default)]
    pub append_frames: u64,
    /// Sends answered `Throttled` by a rate limit (user, conversation or connection) or by a
    /// full conversation queue.
    #[serde(default)]
    pub sends_throttled: u64,
    /// Sends that waited for their conversation's turn on a full shard window.
    #[serde(default)]
    pub sends_queued: u64,
    /// Live (following) subscriptions on this node now, and the furthest any of them is
    /// behind its conversation's head, in messages.
    #[serde(default)]
    pub subscribers: u64,
    #[serde(default)]
    pub subscriber_lag_max: u64,
    /// Sends this node answered `Ack` since start (`convoy_sends_total{outcome="acked"}`).
    #[serde(default)]
    pub sends_acked: u64,
    /// Latency histograms of the send path since start (see `crate::stages`).
    pub stages: Vec<StageSnapshot>,
    /// This node's replica of the metadata group (`None`: refused here).
    #[serde(default)]
    pub meta: Option<ShardStatus>,
    /// The cluster map as this node applied it (epoch 0: not initialized yet).
    #[serde(default)]
    pub placement: ClusterMap,
}

/// One shard as seen by one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard: ShardId,
    /// The node leading the shard, as this node knows it.
    pub leader: Option<u64>,
    /// This node's replica id in the shard's group (its generation in the high 32 bits).
    #[serde(default)]
    pub replica: u64,
    pub term: u64,
    pub role: String,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    /// The nodes whose replicas vote.
    pub voters: Vec<u64>,
    /// The nodes whose replicas replicate without voting (catching up to join).
    #[serde(default)]
    pub learners: Vec<u64>,
    /// On the shard's leader: each follower's replication lag.
    #[serde(default)]
    pub followers: Vec<FollowerLag>,
    /// RocksDB's estimate of the bytes the shard's messages take on this node's disk: about
    /// what a snapshot of it streams.
    #[serde(default)]
    pub data_bytes: u64,
    /// The snapshots of the shard this replica is streaming to others now or streamed
    /// within the last hour, one per target replica.
    #[serde(default)]
    pub snapshots: Vec<SnapshotCopyStatus>,
}

/// A snapshot copy from one replica of a shard to another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCopyStatus {
    /// The target's node and replica id.
    pub node: u64,
    pub replica: u64,
    /// Whether a stream to it is going out now, and the bytes that one has sent (or the
    /// last, once it ended).
    pub sending: bool,
    pub bytes_sent: u64,
}

/// A follower's replication lag as its shard's leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowerLag {
    pub node: u64,
    /// Log entries the follower has yet to replicate.
    pub entries: u64,
    /// Whether that is `limits.follower_lag_warn` or more.
    pub lagging: bool,
}

std::thread_local! {
    /// Whether this thread is decoding a `Batch`'s answers (decoding is synchronous).
    static IN_BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Decodes a `Batch`'s answers, refusing a `Batch` among them.
fn batch_answers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Response>, D::Error> {
    use serde::de::Error as _;
    if IN_BATCH.with(|b| b.replace(true)) {
        return Err(D::Error::custom("a batch answer inside a batch answer"));
    }
    let answers = Vec::<Response>::deserialize(d);
    IN_BATCH.with(|b| b.set(false));
    answers
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    fn ack(offset: u64) -> Response {
        Response::Ack { conversation: "c".into(), offset, ts_ms: 1, duplicate: false }
    }

    #[test]
    fn a_batch_decodes_flat_and_a_batch_inside_one_is_refused() {
        use crate::net::frame::{decode_body, encode};
        // A frame's payload: its version byte and body.
        let payload = |r: &Response| encode(r)[4..].to_vec();
        let decode = |bytes: &[u8]| decode_body::<Response>(bytes).map_err(|e| e.to_string());
        let flat = Response::Batch(vec![ack(1), ack(2)]);
        assert_eq!(decode(&payload(&flat)), Ok(flat.clone()));
        let nested = Response::Batch(vec![ack(1), Response::Batch(vec![ack(2)])]);
        let err = decode(&payload(&nested)).expect_err("nested");
        assert!(err.contains("a batch answer inside a batch answer"), "{err}");
        // A hostile node's bytes nesting batches a million deep: refused at the second level,
        // with no recursion to overflow the stack, and the thread decodes a good batch after.
        let (one, single) = (payload(&Response::Batch(vec![ack(1)])), payload(&ack(1)));
        let level = &one[1..one.len() - (single.len() - 1)];
        let mut deep = vec![one[0]];
        deep.extend(level.repeat(1_000_000));
        deep.extend_from_slice(&single[1..]);
        let err = decode(&deep).expect_err("deep nesting");
        assert!(err.contains("a batch answer inside a batch answer"), "{err}");
        assert_eq!(decode(&payload(&flat)), Ok(flat));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame;

    fn round_trip(req: &Request) -> crate::error::Result<Request> {
        let framed = frame::encode(req);
        frame::decode_body(&framed[4..])
    }

    /// Every membership change decodes off the wire as it was encoded (the bounded decoding
    /// follows [`Membership`]'s encoding variant for variant), and a creation naming more
    /// than `MEMBERS_MAX` users, or a batch of more than `SEND_BATCH_MAX` sends, is refused
    /// as it decodes.
    #[test]
    fn bounded_lists_decode_as_encoded_and_are_refused_past_their_bound() {
        let name = |i: usize| format!("u{i}");
        let changes = [
            Membership::Create { members: (0..crate::chat::MEMBERS_MAX).map(name).collect() },
            Membership::Add { user: "a".into() },
            Membership::Remove { user: "b".into() },
        ];
        for change in changes {
            // A new variant must be added to the wire's bounded copy, and here.
            match &change {
                Membership::Create { .. } | Membership::Add { .. } | Membership::Remove { .. } => {}
            }
            let req = Request::Members { conversation: "c".into(), change: MemberChange::Change(change) };
            assert_eq!(round_trip(&req).expect("decodes"), req);
        }
        let crowd = (0..=crate::chat::MEMBERS_MAX).map(name).collect();
        let req = Request::Members {
            conversation: "c".into(),
            change: MemberChange::Change(Membership::Create { members: crowd }),
        };
        let e = round_trip(&req).expect_err("one member too many");
        assert!(matches!(&e, crate::error::Error::InvalidInput(m) if m.contains("more than 1024")), "{e}");

        let send = |i: u64| SendRequest {
            conversation: "c".into(),
            sender: String::new(),
            client_id: 1,
            client_seq: i,
            text: "t".into(),
        };
        let full = Request::SendBatch((0..SEND_BATCH_MAX as u64).map(send).collect());
        assert_eq!(round_trip(&full).expect("a full batch decodes"), full);
        let over = Request::SendBatch((0..=SEND_BATCH_MAX as u64).map(send).collect());
        assert!(matches!(round_trip(&over), Err(crate::error::Error::InvalidInput(_))));
    }
}
