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

openraft::declare_raft_types!(
    /// convoy's Raft types: commands in, outcomes out, u64 node ids.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = Member,
);

pub type C = TypeConfig;
pub type NodeId = u64;
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
