//! The peer protocol: every message one node's Raft groups send another's, in one file,
//! versioned by the frame's version byte (`net::frame::WIRE_VERSION`).
//!
//! One bidirectional stream per RPC: one [`PeerRequest`] frame, one [`PeerResponse`] frame;
//! AppendEntries reuse a stream per (peer, shard), one exchange at a time. A snapshot
//! transfer sends [`PeerRequest::Snapshot`], then the shard's state as
//! [`PeerRequest::SnapshotChunk`] frames, then finishes; the receiver answers once
//! everything is installed.

use serde::{Deserialize, Serialize};

use super::types::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotMeta, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, Vote, VoteRequest, VoteResponse,
};
use crate::chat::ShardId;

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
