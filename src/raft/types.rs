//! The openraft type configuration and the aliases the rest of convoy uses, so an openraft
//! version bump touches this module only.

use serde::{Deserialize, Serialize};

use crate::chat::{Command, Outcome};
use crate::raft::state_machine::ShardSnapshot;

/// What a Raft member record carries: where to reach the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub peer_addr: String,
    pub client_addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer={} client={}", self.peer_addr, self.client_addr)
    }
}

/// convoy's Raft types: commands in, outcomes out, u64 node ids, callback responders.
///
/// Written out rather than with `openraft::declare_raft_types!`, which cannot name a
/// generic responder; the other types are that macro's defaults.
#[derive(Debug, Clone, Copy, Default, Eq, PartialEq, Ord, PartialOrd)]
pub struct TypeConfig {}

impl openraft::RaftTypeConfig for TypeConfig {
    type D = Command;
    type R = Outcome;
    type NodeId = u64;
    type Node = Member;
    type Term = u64;
    type LeaderId = openraft::impls::leader_id_adv::LeaderId<Self::Term, Self::NodeId>;
    type Vote = openraft::impls::Vote<Self::LeaderId>;
    type Payload = openraft::EntryPayload<Self::D, Self::NodeId, Self::Node>;
    type Entry = openraft::Entry<<Self::LeaderId as openraft::vote::RaftLeaderId>::Committed, Self::Payload>;
    type Responder<T>
        = FnResponder<T>
    where
        T: openraft::OptionalSend + 'static;
    type Batch<T>
        = openraft::impls::InlineBatch<T>
    where
        T: openraft::OptionalSend + 'static;
    type AsyncRuntime = openraft::impls::TokioRuntime;
    type ErrorSource = openraft::impls::BoxedErrorSource;
}

/// A proposal's completion: called once with the write's result, from the state machine's
/// task when the entry is applied (or from Raft's when it refuses the proposal); dropped
/// uncalled when the group stops first. Unlike a channel, it can act on the result right
/// where it is known: the client service writes a send's answer from it, so the answers of
/// one apply batch leave together (see `crate::server`).
pub struct FnResponder<T>(Box<dyn FnOnce(T) + Send + 'static>);

impl<T> FnResponder<T> {
    pub fn new(f: impl FnOnce(T) + Send + 'static) -> Self {
        FnResponder(Box::new(f))
    }
}

impl<T: Send + 'static> openraft::raft::responder::Responder<TypeConfig, T> for FnResponder<T> {
    fn on_complete(self, result: T) {
        (self.0)(result)
    }
}

pub type C = TypeConfig;
/// A node's id (cluster.toml) or, in a Raft group, a replica's id: openraft knows only
/// replicas. A replica id holds its node's id in the low 32 bits and its generation in the
/// high 32: generation 0 is the node's original replica, and a node that lost its state
/// rejoins each group under a new generation, never under an id that voted before.
pub type NodeId = u64;

/// The node a replica id belongs to.
pub fn node_of(replica: NodeId) -> NodeId {
    replica & 0xffff_ffff
}

/// The generation of a replica id.
pub fn generation_of(replica: NodeId) -> u32 {
    (replica >> 32) as u32
}

/// The replica id of `node`'s generation `generation`.
pub fn replica_id(node: NodeId, generation: u32) -> NodeId {
    node_of(node) | ((generation as u64) << 32)
}
pub type LogId = openraft::alias::LogIdOf<C>;
pub type Vote = openraft::alias::VoteOf<C>;
pub type Entry = openraft::alias::EntryOf<C>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<C>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<C>;
pub type Snapshot = openraft::alias::SnapshotOf<C, ShardSnapshot>;
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<C>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<C>;
pub type VoteRequest = openraft::raft::VoteRequest<C>;
pub type VoteResponse = openraft::raft::VoteResponse<C>;
pub type SnapshotResponse = openraft::raft::SnapshotResponse<C>;
pub type TransferLeaderRequest = openraft::raft::TransferLeaderRequest<C>;
pub type TransferLeaderResponse = openraft::raft::TransferLeaderResponse<C>;
pub type Raft = openraft::Raft<C, crate::raft::state_machine::ShardStateMachine>;
