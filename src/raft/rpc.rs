//! The peer protocol: every message one node's Raft groups send another's, in one file,
//! versioned by the frame's version byte (`net::frame::WIRE_VERSION`).
//!
//! One bidirectional stream per RPC: one [`PeerRequest`] frame, one [`PeerResponse`] frame;
//! AppendEntries reuse a stream per (peer, shard), one exchange at a time. A snapshot
//! transfer sends [`PeerRequest::Snapshot`], then the shard's state as
//! [`PeerRequest::SnapshotChunk`] frames, then [`PeerRequest::SnapshotEnd`] with their byte
//! count, then finishes; the receiver installs only a stream that ended with a matching
//! `SnapshotEnd`, and answers once everything is installed.

use serde::{Deserialize, Serialize};

use super::formation::ClusterRecord;
use super::types::{
    AppendEntriesRequest, AppendEntriesResponse, Member, NodeId, SnapshotMeta, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, Vote, VoteRequest, VoteResponse,
};
use crate::chat::ShardId;
use crate::placement::{ClusterMap, PlacementCommand};

/// Users one `UserSends` may name; a node tells the rest in its next one.
pub const USER_SENDS_MAX: usize = 1024;

/// A Raft RPC to a peer. Every Raft message names the replica it is for (`to`): a node
/// answers only for the replica it hosts, so a message meant for a replica that lost its
/// state never reaches the new replica that replaced it (whose empty log would grant any
/// vote).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    Append {
        shard: ShardId,
        to: NodeId,
        rpc: AppendEntriesRequest,
    },
    Vote {
        shard: ShardId,
        to: NodeId,
        rpc: VoteRequest,
    },
    PreVote {
        shard: ShardId,
        to: NodeId,
        rpc: VoteRequest,
    },
    TransferLeader {
        shard: ShardId,
        to: NodeId,
        rpc: TransferLeaderRequest,
    },
    Snapshot {
        shard: ShardId,
        to: NodeId,
        vote: Vote,
        meta: SnapshotMeta,
    },
    SnapshotChunk(Vec<u8>),
    /// Cluster formation: what is your cluster record? (see `raft::formation`)
    Hello,
    /// Cluster formation: the bootstrapper asks a pristine node to join `cluster`.
    Prepare {
        cluster: u64,
    },
    /// A node without state asks a shard's leader for a new replica id, added as a learner.
    Join {
        shard: ShardId,
        node: NodeId,
        member: Member,
    },
    /// Makes `replica` a voter in place of its node's older replicas, once it caught up.
    Promote {
        shard: ShardId,
        replica: NodeId,
        member: Member,
    },
    /// A change to the cluster map, for the metadata group's leader (see `raft::meta`).
    Place(PlacementCommand),
    /// The cluster map as the node applied it (a starting node asks before it registers).
    ClusterMap,
    /// For a shard's leader: make `replica` (a learner, once caught up) a voter in place of
    /// node `from`'s replicas (a move's promotion). Answered `Promoted`.
    Replace {
        shard: ShardId,
        from: NodeId,
        replica: NodeId,
        member: Member,
    },
    /// For a shard's leader: remove `node`'s learners (a cancelled move), refusing if its
    /// `replica` already votes.
    /// Answered `Promoted`.
    RemoveLearner {
        shard: ShardId,
        node: NodeId,
        replica: Option<NodeId>,
    },
    /// For a shard's leader, from the coordinator of a move: a learner of `node` (generation
    /// `min_generation` or above) to replace `from`'s replicas. Answered `LearnerAdded`.
    AddLearner {
        shard: ShardId,
        node: NodeId,
        member: Member,
        from: NodeId,
        min_generation: u32,
    },
    /// For a shard's leader: how far `replica` is behind. Answered `Behind`.
    Progress {
        shard: ShardId,
        replica: NodeId,
    },
    /// For a node that no longer holds `shard` (the membership change removing it is
    /// committed): stop its replica and delete its data, if its replica is one of `replicas`
    /// (a stale request never reaches a newer replica). Answered `Dropped`.
    Drop {
        shard: ShardId,
        replicas: Vec<NodeId>,
    },
    /// The last frame of a snapshot's stream: the bytes of every chunk before it. A stream
    /// that ends without it was cut short (the sender lost leadership, stopped or crashed
    /// mid-copy; QUIC finishes a dropped stream cleanly), and nothing of it is installed.
    SnapshotEnd {
        bytes: u64,
    },
    /// Several groups' AppendEntries to this node in one frame (see
    /// `PeerNet::framed_append`): each `(shard, to, rpc)` as in `Append`. Answered `Appends`,
    /// one answer per request, in order.
    Appends(Vec<(ShardId, NodeId, AppendEntriesRequest)>),
    /// Node `node` is alive (its process `incarnation`), and leads the `quiesced` groups,
    /// which stopped ticking: their followers here may stop too (see `raft::quiesce`).
    /// Sent every heartbeat interval to every peer. Answered `Beat`.
    Beat {
        node: NodeId,
        incarnation: u64,
        quiesced: Vec<super::quiesce::QuietGroup>,
    },
    /// Node `node` took these sends from its users' buckets since it last said (a user's
    /// rate holds across the cluster; see `service::rates`). Sent each heartbeat interval
    /// while there is something to tell. Answered `UserSendsTaken`.
    UserSends {
        node: NodeId,
        /// At most [`USER_SENDS_MAX`], refused as it decodes.
        #[serde(deserialize_with = "crate::decode::at_most::<_, _, USER_SENDS_MAX>")]
        users: Vec<(String, u32)>,
    },
    /// Node `node` (its process `incarnation`) is stopping: hand it no leadership until it
    /// starts again (a beat with another incarnation). Sent to every peer once, when its stop
    /// begins (see `raft::quiesce`). Answered `Beat`.
    Leaving {
        node: NodeId,
        incarnation: u64,
    },
}

/// A peer's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerResponse {
    Append(AppendEntriesResponse),
    Vote(VoteResponse),
    TransferLeader(TransferLeaderResponse),
    Snapshot(SnapshotResponse),
    /// The node's cluster record, if it has one.
    Hello(Option<ClusterRecord>),
    /// The replica id a `Join` was given.
    Joined {
        replica: NodeId,
    },
    /// `Promote` is done: the replica votes.
    Promoted,
    /// A move's learner, and the replicas it is to replace.
    LearnerAdded {
        replica: NodeId,
        leaving: Vec<NodeId>,
    },
    /// A `Place` applied: the map's epoch now, and whether it changed the map.
    Placed {
        epoch: u64,
        changed: bool,
    },
    /// The map refused a `Place`, for this reason.
    PlacementRefused(String),
    /// The cluster map as this node applied it.
    ClusterMap(Box<ClusterMap>),
    /// The shard's replica is stopped and its data deleted (or it was not here).
    Dropped,
    /// Entries the leader has that the replica has not matched (`None`: not replicated to
    /// yet).
    Behind {
        entries: Option<u64>,
    },
    /// This node does not lead the shard; `leader` is the node that does, if known.
    NotLeader {
        leader: Option<NodeId>,
    },
    /// The shard is not hosted here or the Raft task failed; the caller treats the peer
    /// as unreachable for this RPC.
    Error(String),
    /// The answers to an `Appends`, in its order (each `Append`, `Busy` or `Error`). Decoded
    /// flat ([`frame_answers`]): an answer in it is never another `Appends`, so a peer's bytes
    /// cannot nest answers until the decoder overflows its stack.
    Appends(#[serde(deserialize_with = "frame_answers")] Vec<PeerResponse>),
    /// A request of a frame not done with the rest of it: its group is busy on this node.
    Busy,
    /// A `Beat` was taken in.
    Beat,
    /// A `UserSends` was taken from this node's buckets.
    UserSendsTaken,
    /// A rejoining node's `Join` or `Promote` that will never be granted, for this reason:
    /// its node holds no (other) voter in the group (a move took the shard off it, or it
    /// never held the shard), so there is nothing to rebuild or vote in place of; or, for a
    /// `Promote`, its replica is no longer a member (a move or a newer rejoin removed it).
    /// Final: the rejoin goes on without the shard. Given only by a leader that a quorum
    /// confirmed. `newest`: the newest replica id the node still has in the group (a
    /// learner), which the node records as left, so it never runs it empty.
    NotRejoined {
        reason: String,
        newest: Option<NodeId>,
    },
}

/// `PeerResponse`'s variant indexes of the three answers a frame holds (its declaration
/// order; `frame_answers_decode_flat_and_refuse_nesting` checks them against the encoding).
const APPEND: u64 = 0;
const ERROR: u64 = 14;
const BUSY: u64 = 16;

/// Decodes a frame's answers as the three kinds a frame may hold. The bytes are
/// `PeerResponse`'s own encoding (encoding is derived: nothing changes on the wire); any other
/// variant, a nested `Appends` above all, is refused with an error instead of recursing.
fn frame_answers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PeerResponse>, D::Error> {
    Ok(Vec::<FrameAnswer>::deserialize(d)?.into_iter().map(|a| a.0).collect())
}

struct FrameAnswer(PeerResponse);

/// Which answer a frame holds: by index (bincode) or by name (self-describing formats).
struct AnswerKind(u64);

impl<'de> Deserialize<'de> for AnswerKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = AnswerKind;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an Append, Error or Busy answer")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<AnswerKind, E> {
                Ok(AnswerKind(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AnswerKind, E> {
                match v {
                    "Append" => Ok(AnswerKind(APPEND)),
                    "Error" => Ok(AnswerKind(ERROR)),
                    "Busy" => Ok(AnswerKind(BUSY)),
                    other => Err(E::custom(format_args!("a {other} answer inside a frame's answers"))),
                }
            }
        }
        d.deserialize_identifier(Visit)
    }
}

impl<'de> Deserialize<'de> for FrameAnswer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = FrameAnswer;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an Append, Error or Busy answer")
            }
            fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<FrameAnswer, A::Error> {
                use serde::de::{Error, VariantAccess};
                let (AnswerKind(kind), variant) = data.variant()?;
                let answer = match kind {
                    APPEND => PeerResponse::Append(variant.newtype_variant()?),
                    ERROR => PeerResponse::Error(variant.newtype_variant()?),
                    BUSY => {
                        variant.unit_variant()?;
                        PeerResponse::Busy
                    }
                    other => {
                        return Err(A::Error::custom(format_args!("answer variant {other} inside a frame's answers")))
                    }
                };
                Ok(FrameAnswer(answer))
            }
        }
        d.deserialize_enum("PeerResponse", &["Append", "Error", "Busy"], Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's body: the version byte, then the encoding.
    fn encode(r: &PeerResponse) -> Vec<u8> {
        crate::net::frame::encode(r)[4..].to_vec()
    }

    fn decode(body: &[u8]) -> Result<PeerResponse, String> {
        crate::net::frame::decode_body::<PeerResponse>(body).map_err(|e| e.to_string())
    }

    #[test]
    fn frame_answers_decode_flat_and_refuse_nesting() {
        let answers = PeerResponse::Appends(vec![
            PeerResponse::Append(AppendEntriesResponse::Success),
            PeerResponse::Append(AppendEntriesResponse::PartialSuccess(None)),
            PeerResponse::Append(AppendEntriesResponse::Conflict),
            PeerResponse::Error("no shard 9 here".into()),
            PeerResponse::Busy,
        ]);
        // The three kinds come back as they went, so the indexes above are the enum's.
        assert_eq!(
            format!("{:?}", decode(&encode(&answers)).expect("a flat frame answer decodes")),
            format!("{answers:?}")
        );

        // Any other answer inside a frame's answers is refused, not just nesting.
        for inner in [PeerResponse::Beat, PeerResponse::Appends(vec![PeerResponse::Busy])] {
            let err = decode(&encode(&PeerResponse::Appends(vec![inner.clone()]))).expect_err("refused");
            assert!(err.contains("inside a frame's answers"), "{inner:?}: {err}");
        }

        // A peer's bytes nesting answers a million deep: refused at the second level, with no
        // recursion to overflow the stack (the derived decoder recursed once per level).
        let one = encode(&PeerResponse::Appends(vec![PeerResponse::Busy]));
        let busy = encode(&PeerResponse::Busy);
        let level = &one[1..one.len() - (busy.len() - 1)];
        let mut deep = vec![one[0]];
        deep.extend(level.repeat(1_000_000));
        deep.extend_from_slice(&busy[1..]);
        let err = decode(&deep).expect_err("nested answers are refused");
        assert!(err.contains("inside a frame's answers"), "{err}");
    }

    /// A `UserSends` naming more users than one may is refused as it decodes.
    #[test]
    fn user_sends_are_bounded_as_they_decode() {
        let request = |n: usize| PeerRequest::UserSends { node: 2, users: vec![(String::new(), 1); n] };
        let decode =
            |r: &PeerRequest| crate::net::frame::decode_body::<PeerRequest>(&crate::net::frame::encode(r)[4..]);
        assert!(
            matches!(decode(&request(USER_SENDS_MAX)), Ok(PeerRequest::UserSends { users, .. }) if users.len() == USER_SENDS_MAX)
        );
        let err = decode(&request(USER_SENDS_MAX + 1)).expect_err("one user too many");
        assert!(err.to_string().contains("more than"), "{err}");
    }
}
