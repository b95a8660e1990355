//! Every message that crosses the network, in one file, versioned by the frame's version
//! byte ([`super::frame::WIRE_VERSION`]).
//!
//! Client protocol: one bidirectional stream per request. The client writes one
//! [`Request`] frame and finishes its side; the server answers one [`Response`] frame
//! (unary requests) or a sequence of them (a subscription) and finishes.
//!
//! Peer protocol: one bidirectional stream per Raft RPC: one [`PeerRequest`] frame, one
//! [`PeerResponse`] frame. A snapshot transfer sends [`PeerRequest::Snapshot`], then the
//! shard's state as [`PeerRequest::SnapshotChunk`] frames, then finishes; the receiver
//! answers once everything is installed.

use serde::{Deserialize, Serialize};

use crate::chat::{ShardId, StoredMessage};
use crate::raft::types::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotMeta, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, Vote, VoteRequest, VoteResponse,
};
pub use crate::stages::StageSnapshot;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Append a message; answered `Ack` only after quorum commit (fsynced) and apply.
    Send(SendRequest),
    /// Stream a conversation from `from` (1 = the beginning). With `follow`, keep pushing
    /// live messages after `CaughtUp`; without, finish after `CaughtUp`.
    Subscribe { conversation: String, from: u64, follow: bool },
    /// Move a user's read cursor forward (replicated, monotone).
    SetCursor { user: String, conversation: String, offset: u64 },
    /// Read a user's cursor and the conversation's head from this replica.
    GetCursor { user: String, conversation: String },
    /// This node's view of every shard.
    Status,
    /// Several sends in one request (the client coalesces sends that wait at the same
    /// time), at most [`SEND_BATCH_MAX`]; answered by one `Batch` holding each send's own
    /// answer, in order, exactly as if each had been a `Send`.
    SendBatch(Vec<SendRequest>),
}

impl Request {
    /// Whether the request's stream stays open for the next such request once answered (a
    /// lane, see `net::lane`): sends do; any other request is its stream's only one.
    pub fn keeps_stream(&self) -> bool {
        matches!(self, Request::Send(_) | Request::SendBatch(_))
    }
}

/// Sends per [`Request::SendBatch`], at most.
pub const SEND_BATCH_MAX: usize = 256;

/// Payload of [`Request::Send`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    pub conversation: String,
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
    NotLeader {
        shard: ShardId,
        leader: Option<u64>,
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
    /// The requested offset is older than what is retained.
    Truncated {
        earliest: u64,
    },
    Cursor {
        offset: u64,
        head: u64,
    },
    Status(Box<NodeStatus>),
    /// The answers to a `SendBatch`, one per send, in order.
    Batch(Vec<Response>),
}

/// A node's view of its shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Latency histograms of the send path since start (see `crate::stages`).
    pub stages: Vec<StageSnapshot>,
}

/// One shard as seen by one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard: ShardId,
    pub leader: Option<u64>,
    pub term: u64,
    pub role: String,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub voters: Vec<u64>,
}

/// A Raft RPC to a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    Append { shard: ShardId, rpc: AppendEntriesRequest },
    Vote { shard: ShardId, rpc: VoteRequest },
    PreVote { shard: ShardId, rpc: VoteRequest },
    TransferLeader { shard: ShardId, rpc: TransferLeaderRequest },
    Snapshot { shard: ShardId, vote: Vote, meta: SnapshotMeta },
    SnapshotChunk(Vec<u8>),
}

/// A peer's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerResponse {
    Append(AppendEntriesResponse),
    Vote(VoteResponse),
    TransferLeader(TransferLeaderResponse),
    Snapshot(SnapshotResponse),
    /// The shard is not hosted here or the Raft task failed; the caller treats the peer
    /// as unreachable for this RPC.
    Error(String),
}

/// Appends to `out` the frame of `Response::Message(m)` for a message `m` stored as
/// [`crate::store::codec`] wrote it — without decoding and re-encoding it. Both formats are
/// bincode 2 (standard config) behind one version byte, so the frame body is the wire
/// version, the bytes bincode puts before a `Message`'s payload (its variant tag), and the
/// stored bytes after their format byte. A catch-up serves thousands of messages per read,
/// and this is most of its cost. Checked against `frame::encode` by a unit test.
pub fn message_frame_from_stored(stored: &[u8], out: &mut Vec<u8>) -> crate::error::Result<()> {
    use std::sync::OnceLock;
    static TAG: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    let tag = TAG.get_or_init(|| {
        let sample = StoredMessage {
            conversation: String::new(),
            offset: 0,
            sender: String::new(),
            ts_ms: 0,
            client_id: 0,
            client_seq: 0,
            text: String::new(),
        };
        let cfg = bincode::config::standard();
        let whole = bincode::serde::encode_to_vec(Response::Message(sample.clone()), cfg).ok()?;
        let inner = bincode::serde::encode_to_vec(&sample, cfg).ok()?;
        whole.ends_with(&inner).then(|| whole[..whole.len() - inner.len()].to_vec())
    });
    let body = match stored.split_first() {
        Some((&crate::store::codec::DISK_FORMAT, body)) => body,
        _ => return Err(crate::error::Error::Storage("stored message of an unknown format".into())),
    };
    match tag {
        Some(tag) => {
            let len = 1 + tag.len() + body.len();
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.push(super::frame::WIRE_VERSION);
            out.extend_from_slice(tag);
            out.extend_from_slice(body);
        }
        // Not reachable with bincode's enum encoding; decode and encode if it ever changes.
        None => {
            let m: StoredMessage = crate::store::codec::decode(stored)?;
            out.extend_from_slice(&super::frame::encode(&Response::Message(m)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_message_frames_equal_encoded_responses() {
        for (i, text) in ["", "hi", &"é".repeat(300), &"x".repeat(70_000)].into_iter().enumerate() {
            let m = StoredMessage {
                conversation: format!("conv-{i}"),
                offset: 1 + (i as u64) * 1_000_003,
                sender: "alice".into(),
                ts_ms: 1_795_000_000_000 + i as u64,
                client_id: u64::MAX - i as u64,
                client_seq: 300 + i as u64,
                text: text.to_string(),
            };
            let mut raw = Vec::new();
            message_frame_from_stored(&crate::store::codec::encode(&m), &mut raw).expect("a stored message");
            assert_eq!(raw, super::super::frame::encode(&Response::Message(m)));
        }
        let mut out = Vec::new();
        assert!(message_frame_from_stored(&[9, 1, 2], &mut out).is_err(), "an unknown format is an error");
        assert!(message_frame_from_stored(&[], &mut out).is_err());
        assert!(out.is_empty());
    }
}
