//! The chat domain and its pure, deterministic apply.
//!
//! Everything here is free of I/O, clocks and randomness: the leader stamps time and the
//! client supplies its idempotency key, so every replica that applies the same command to
//! the same state produces the same offsets and the same outcome. `store::state_machine`
//! drives this module with RocksDB-backed lookups; the tests drive it with [`MemView`].
//!
//! Invariants enforced here:
//! - offsets of a conversation are dense, start at 1 and never repeat;
//! - a conversation has members; only members send, move cursors or change the members. A
//!   send to a conversation that does not exist creates it with the sender as its only
//!   member. Membership changes are commands of the conversation's shard, ordered with its
//!   messages: a removal takes effect at the head it was applied at;
//! - the idempotency key is `(sender, client_id, client_seq)` **per conversation**: it
//!   appends at most once there, and a retry answers the original offset. Another user's
//!   identical key is another key, and the same key in another conversation is another
//!   message. The dedup record keeps a digest of the text: the same key with other text is
//!   `SeqReused`, never a silent duplicate;
//! - read cursors only move forward and never past the head;
//! - retention trims a conversation's oldest messages by [`Command::Trim`], which the shard's
//!   leader proposes (it alone reads the clock and the policies), so every replica deletes
//!   the same prefix at the same log position. The earliest retained offset only grows,
//!   offsets are never reused, and the dedup records of trimmed messages go with them.
//!
//! A rejection (invalid id, message too large, not a member, cursor past head) is an
//! [`Outcome`], not an error: it is replicated and answered like any other result.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::placement::PlacementCommand;

/// Largest conversation or user id, in bytes of UTF-8.
pub const ID_BYTES_MAX: usize = 128;
/// Most members a conversation may have (its member record is read by every send).
pub const MEMBERS_MAX: usize = 1024;

/// Most removals a conversation remembers (a removed user's live subscription ends at the
/// head of its removal): beyond it the oldest removal is forgotten, and that user's
/// subscriptions end at once, as any non-member's do. Without it, adding and removing made-up
/// users would grow the member record, which every send and read decodes, without end.
pub const REMOVED_MAX: usize = MEMBERS_MAX;
/// Hard ceiling for a message body, enforced by apply on every replica. The configurable
/// limit (`limits.message_bytes_max`) may only be lower.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Hard ceiling for one client request, in bytes: a request becomes one Raft entry, and a
/// replication frame must be able to carry any entry alone. `limits.frame_bytes_max` may only
/// be lower.
pub const REQUEST_BYTES_MAX: usize = 16 << 20;

/// The defaults of `cluster.toml`'s `[limits]`, in one place (see `config::Limits`).
pub mod limits {
    /// Largest client frame, in bytes: a batch of sends fits with room to spare.
    pub const FRAME_BYTES_DEFAULT: usize = 1 << 20;
    /// Client connections per node; more are refused.
    pub const CONNECTIONS_DEFAULT: usize = 20_000;
    /// Client connections of one user per node; more are refused. A client keeps one
    /// connection per node for its requests and up to 24 follows, and one more per
    /// `streams_per_connection_max` (64) follows beyond: 256 is a user's many devices, or
    /// one client following about 16,000 conversations, while no credential can take more
    /// than 1/78 of a node's 20,000 slots.
    pub const CONNECTIONS_PER_USER_DEFAULT: usize = 256;
    /// Stored messages a node holds read for catch-ups, in bytes: 256 batches at their
    /// largest, far more of the usual small ones.
    pub const CATCH_UP_BUFFER_BYTES_DEFAULT: u64 = 128 << 20;
    /// Client connections catching up through a 1 MiB send window at once (128 MiB).
    pub const CATCH_UP_WINDOWS_DEFAULT: usize = 128;
    /// Smallest accepted `catch_up_buffer_bytes`: what one catch-up read reserves
    /// (`service::catch_up::BATCH_RESERVE_BYTES`, which checks that they agree).
    pub const CATCH_UP_BUFFER_BYTES_MIN: u64 = 512 << 10;
    /// Largest accepted `catch_up_buffer_bytes` (1 TiB: a typo, not a machine).
    pub const CATCH_UP_BUFFER_BYTES_CEILING: u64 = 1 << 40;
    /// Sends in flight per node; more are answered `Throttled`.
    pub const INFLIGHT_SENDS_DEFAULT: usize = 8192;
    /// Live-push buffer of one watched conversation, in messages.
    pub const PUSH_BUFFER_MESSAGES_DEFAULT: usize = 128;
    /// Smallest accepted live-push buffer, in messages.
    pub const PUSH_BUFFER_MESSAGES_MIN: usize = 16;
    /// Largest accepted live-push buffer, in messages.
    pub const PUSH_BUFFER_MESSAGES_MAX: usize = 65_536;
    /// Concurrent request streams per client connection.
    pub const STREAMS_PER_CONNECTION_DEFAULT: u32 = 64;
    /// Sends per second of one user, on one node's shard leaders.
    pub const USER_SENDS_PER_S_DEFAULT: u32 = 200;
    /// Sends per second into one conversation.
    pub const CONVERSATION_SENDS_PER_S_DEFAULT: u32 = 1000;
    /// Sends per second on one client connection.
    pub const CONNECTION_SENDS_PER_S_DEFAULT: u32 = 1000;
    /// Sends a shard's leader keeps proposed and unanswered before new ones wait for their
    /// conversation's turn (fair scheduling; 0 turns it off).
    pub const SHARD_WINDOW_SENDS_DEFAULT: u32 = 256;
    /// Sends that may wait for their turn per conversation on a shard's leader; more are
    /// answered `Throttled`.
    pub const CONVERSATION_QUEUE_SENDS_DEFAULT: u32 = 1024;
    /// Messages behind its conversation's head at which a live subscriber is reported.
    pub const SUBSCRIBER_LAG_WARN_DEFAULT: u64 = 10_000;
    /// Log entries behind its leader at which a follower is flagged.
    pub const FOLLOWER_LAG_WARN_DEFAULT: u64 = 1_000;
    /// Client handshakes a node starts per second (a burst of as many passes); more get a
    /// QUIC Retry or a refusal.
    pub const HANDSHAKES_PER_S_DEFAULT: u32 = 2_000;
    /// Client handshakes a node runs at once; more get a Retry or a refusal.
    pub const HANDSHAKES_IN_FLIGHT_DEFAULT: usize = 256;
    /// Free bytes a node keeps on its data directory's filesystem (see `store::space`).
    pub const DISK_FREE_MIN_BYTES_DEFAULT: u64 = 128 << 20;
    /// Sends per batch request, at most (a batch is one Raft entry).
    pub const SEND_BATCH_MAX: usize = 256;
    /// Largest accepted `connections_max`.
    pub const CONNECTIONS_CEILING: usize = 1 << 20;
    /// Largest accepted `inflight_sends_max`.
    pub const INFLIGHT_SENDS_CEILING: usize = 1 << 20;
    /// Smallest accepted `streams_per_connection_max`: a client keeps up to 32 send requests
    /// and 24 follows on one connection (`client::SEND_REQUESTS_PER_NODE`,
    /// `client::FOLLOWS_ON_REQUEST_CONNECTION`) and needs room beside them for its other
    /// requests; under a smaller limit its sends would wait for streams its follows hold.
    pub const STREAMS_PER_CONNECTION_FLOOR: u32 = 64;
    /// Largest accepted `streams_per_connection_max`.
    pub const STREAMS_PER_CONNECTION_CEILING: u32 = 4096;
    /// Largest accepted shard count.
    pub const SHARDS_MAX: u32 = crate::placement::SHARDS_MAX;
    /// Largest accepted number of async worker threads per node.
    pub const WORKER_THREADS_MAX: usize = 1024;
}

/// Identifies a shard (a Raft group).
pub type ShardId = u32;

/// Maps a conversation id to its shard with 64-bit FNV-1a over the id's UTF-8 bytes,
/// modulo the shard count. The function is specified (offset basis 0xcbf29ce484222325,
/// prime 0x100000001b3) so every node, client and future version agrees on it.
pub fn shard_of(conversation: &str, shards: u32) -> ShardId {
    debug_assert!(shards > 0, "shard count is validated to be positive");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in conversation.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(shards.max(1))) as ShardId
}

/// Checks a conversation or user id: 1..=128 bytes of UTF-8 without control characters.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > ID_BYTES_MAX {
        return Err(format!("{kind} id must be 1..={ID_BYTES_MAX} bytes, got {}", id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("{kind} id must not contain control characters"));
    }
    Ok(())
}

/// A replicated command: one Raft log entry's application payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Append one message. `ts_ms` is stamped by the leader before proposing.
    Send(SendCommand),
    /// Move a user's read cursor forward.
    Cursor(CursorCommand),
    /// Several sends in one entry (the leader coalesces concurrent sends to a shard):
    /// applied in order, each exactly as if it were its own entry, with one outcome each.
    SendBatch(Vec<SendCommand>),
    /// Create a conversation, or add or remove a member, by the member `by`.
    Members(MembersCommand),
    /// Set a conversation's retention (a member, or an admin).
    SetRetention(RetentionCommand),
    /// Delete a conversation's messages below `before` (proposed by the shard's leader to
    /// enforce retention).
    Trim(TrimCommand),
    /// A change to the cluster's placement; applied by the metadata group only (see
    /// `crate::placement`), refused by a shard's.
    Place(PlacementCommand),
    /// A [`Command::Trim`] that applies only if the conversation's own retention is still the
    /// one it was planned under: a policy changed between the leader's plan and the trim's
    /// turn in the log (a member raising a limit) is never overridden by the older one.
    /// (Appended last: logs holding the earlier variants still decode.)
    TrimUnder(TrimUnderCommand),
}

/// Most messages one [`Command::Trim`] deletes: apply reads each one's dedup key, and an
/// entry's apply must stay short. The leader proposes the next trim for the rest.
pub const TRIM_MESSAGES_MAX: u64 = 8192;

/// How much of a conversation is kept: each limit that is set trims the oldest messages
/// beyond it (the one that keeps the least wins). `None` everywhere keeps everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Keep at most this many newest messages.
    pub max_messages: Option<u64>,
    /// Keep messages stamped at most this long ago, in milliseconds (by the leader's clock).
    pub max_age_ms: Option<u64>,
    /// Keep at most this many bytes of the newest messages (as stored).
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// This policy, with each limit it leaves unset taken from `default`.
    pub fn or(self, default: Retention) -> Retention {
        Retention {
            max_messages: self.max_messages.or(default.max_messages),
            max_age_ms: self.max_age_ms.or(default.max_age_ms),
            max_bytes: self.max_bytes.or(default.max_bytes),
        }
    }

    /// Whether it keeps everything.
    pub fn keeps_all(&self) -> bool {
        self.max_messages.is_none() && self.max_age_ms.is_none() && self.max_bytes.is_none()
    }

    /// Refuses a limit of zero (it would keep nothing, not even the message just sent).
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in
            [("max_messages", self.max_messages), ("max_age", self.max_age_ms), ("max_bytes", self.max_bytes)]
        {
            if v == Some(0) {
                return Err(format!("retention {name} must be at least 1"));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.keeps_all() {
            return write!(f, "keep everything");
        }
        let mut parts = Vec::new();
        if let Some(n) = self.max_messages {
            parts.push(format!("max {n} messages"));
        }
        if let Some(ms) = self.max_age_ms {
            parts.push(format!("max age {ms} ms"));
        }
        if let Some(b) = self.max_bytes {
            parts.push(format!("max {b} bytes"));
        }
        write!(f, "{}", parts.join(", "))
    }
}

/// Payload of [`Command::SetRetention`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionCommand {
    pub conversation: String,
    /// The user asking (taken from the credential by the node) …
    pub by: String,
    /// … and whether that credential is an admin's (decided by the node, from the
    /// certificate): an admin may set any conversation's retention, a member only its own.
    pub admin: bool,
    pub retention: Retention,
}

/// Payload of [`Command::Trim`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimCommand {
    pub conversation: String,
    /// The first offset to keep. Apply never goes past the head + 1, and deletes at most
    /// [`TRIM_MESSAGES_MAX`] messages.
    pub before: u64,
}

/// Payload of [`Command::TrimUnder`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimUnderCommand {
    pub trim: TrimCommand,
    /// The conversation's own retention record the trim was planned under
    /// (`Retention::default()`: none).
    pub planned_under: Retention,
}

/// Payload of [`Command::Members`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersCommand {
    pub conversation: String,
    /// The user asking (taken from the credential by the node).
    pub by: String,
    pub change: Membership,
}

/// A membership change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Membership {
    /// Create the conversation with `by` and these members.
    Create {
        members: Vec<String>,
    },
    Add {
        user: String,
    },
    /// Remove a member: their reads and live subscriptions end at the head at removal.
    Remove {
        user: String,
    },
}

/// A conversation's members, and where each removed user's reading ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub users: BTreeSet<String>,
    /// Removed users (not re-added since) and the head at their removal.
    pub removed: BTreeMap<String, u64>,
}

impl Members {
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains(user)
    }
}

/// A stable digest of a message text, kept with its dedup record: 16 bytes of SHA-256.
pub fn text_digest(text: &str) -> [u8; 16] {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

/// Payload of [`Command::Send`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendCommand {
    pub conversation: String,
    pub sender: String,
    pub client_id: u64,
    pub client_seq: u64,
    pub ts_ms: u64,
    pub text: String,
}

/// Payload of [`Command::Cursor`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorCommand {
    pub user: String,
    pub conversation: String,
    pub offset: u64,
}

impl Command {
    /// Roughly the bytes the command takes encoded (ids and text plus a fixed allowance),
    /// for budgets of frames that carry many commands.
    pub fn approx_bytes(&self) -> usize {
        const FIXED: usize = 48;
        let send = |s: &SendCommand| FIXED + s.conversation.len() + s.sender.len() + s.text.len();
        match self {
            Command::Send(s) => send(s),
            Command::Cursor(c) => FIXED + c.user.len() + c.conversation.len(),
            Command::SendBatch(b) => FIXED + b.iter().map(send).sum::<usize>(),
            Command::Members(m) => {
                let listed = match &m.change {
                    Membership::Create { members } => members.iter().map(|u| u.len() + 8).sum(),
                    Membership::Add { user } | Membership::Remove { user } => user.len(),
                };
                FIXED + m.conversation.len() + m.by.len() + listed
            }
            Command::SetRetention(r) => FIXED + r.conversation.len() + r.by.len() + 32,
            Command::Trim(t) => FIXED + t.conversation.len(),
            Command::TrimUnder(t) => FIXED + t.trim.conversation.len() + 32,
            Command::Place(PlacementCommand::Init { nodes, .. }) => {
                FIXED + nodes.iter().map(|n| 24 + n.peer_addr.len() + n.client_addr.len()).sum::<usize>()
            }
            Command::Place(PlacementCommand::SetPreferredLeader { .. }) => FIXED,
            Command::Place(PlacementCommand::Register(n)) => FIXED + n.peer_addr.len() + n.client_addr.len(),
            Command::Place(_) => FIXED,
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Send(s) => write!(f, "send({}, {}/{})", s.conversation, s.client_id, s.client_seq),
            Command::Cursor(c) => write!(f, "cursor({}, {}, {})", c.user, c.conversation, c.offset),
            Command::SendBatch(b) => write!(f, "send-batch({} sends)", b.len()),
            Command::Members(m) => write!(f, "members({}, {:?} by {})", m.conversation, m.change, m.by),
            Command::SetRetention(r) => write!(f, "set-retention({}, {} by {})", r.conversation, r.retention, r.by),
            Command::Trim(t) => write!(f, "trim({}, before {})", t.conversation, t.before),
            Command::TrimUnder(t) => {
                write!(f, "trim({}, before {}, under {})", t.trim.conversation, t.trim.before, t.planned_under)
            }
            Command::Place(p) => write!(f, "place({p:?})"),
        }
    }
}

/// A stored message as every replica holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub conversation: String,
    pub offset: u64,
    pub sender: String,
    pub ts_ms: u64,
    pub client_id: u64,
    pub client_seq: u64,
    pub text: String,
}

/// The idempotency key of a send: within its conversation, `(sender, client_id,
/// client_seq)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub conversation: String,
    pub sender: String,
    pub client_id: u64,
    pub client_seq: u64,
}

impl DedupKey {
    /// The key a stored message was appended under.
    pub fn of_stored(m: &StoredMessage) -> DedupKey {
        DedupKey {
            conversation: m.conversation.clone(),
            sender: m.sender.clone(),
            client_id: m.client_id,
            client_seq: m.client_seq,
        }
    }

    pub fn of(send: &SendCommand) -> DedupKey {
        DedupKey {
            conversation: send.conversation.clone(),
            sender: send.sender.clone(),
            client_id: send.client_id,
            client_seq: send.client_seq,
        }
    }
}

/// What the dedup index remembers of an appended send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    pub offset: u64,
    pub ts_ms: u64,
    /// [`text_digest`] of the text that was stored.
    pub digest: [u8; 16],
}

/// The result of applying one command; replicated answers, not errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The message is stored at `offset` (possibly by an earlier attempt: `duplicate`).
    Appended { offset: u64, ts_ms: u64, duplicate: bool },
    /// The cursor now stands at `offset`.
    CursorAt { offset: u64 },
    /// The command was refused; nothing changed.
    Rejected { reason: Rejection },
    /// Applied a non-application entry (blank or membership).
    None,
    /// The outcomes of a [`Command::SendBatch`], one per send, in order.
    Batch(Vec<Outcome>),
    /// A membership change applied: the members now, and the head it took effect at.
    Members { members: Vec<String>, head: u64 },
    /// The conversation's retention now (as set for it, before the cluster default).
    RetentionSet { retention: Retention },
    /// A trim applied: the earliest retained offset now, and how many messages it deleted.
    Trimmed { earliest: u64, deleted: u64 },
    /// A placement command applied: the map's epoch now, and whether it changed it.
    Placed { epoch: u64, changed: bool },
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    InvalidId(String),
    TooLarge {
        bytes: usize,
        max: usize,
    },
    /// The idempotency key was already used in this conversation for another text.
    SeqReused {
        conversation: String,
    },
    /// A cursor beyond the conversation's head.
    CursorPastHead {
        head: u64,
    },
    /// `user` is not a member of the conversation (or it does not exist).
    NotMember {
        user: String,
    },
    /// The conversation already exists.
    Exists,
    /// The conversation would have more than [`MEMBERS_MAX`] members.
    TooManyMembers {
        max: usize,
    },
    /// A retention limit that cannot be kept (zero).
    InvalidRetention(String),
    /// A placement command that cannot apply, or one sent to a shard's group.
    Placement(String),
}

impl Rejection {
    /// Whether the rejection is about who asked (answered `Forbidden`), not what was asked.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Rejection::NotMember { .. })
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::InvalidId(m) => write!(f, "{m}"),
            Rejection::TooLarge { bytes, max } => {
                write!(f, "message is {bytes} bytes, limit {max}")
            }
            Rejection::SeqReused { conversation } => {
                write!(f, "client_seq already used in conversation {conversation:?} for another text")
            }
            Rejection::CursorPastHead { head } => write!(f, "cursor beyond head {head}"),
            Rejection::NotMember { user } => write!(f, "{user:?} is not a member of this conversation"),
            Rejection::Exists => write!(f, "the conversation already exists"),
            Rejection::TooManyMembers { max } => write!(f, "a conversation has at most {max} members"),
            Rejection::InvalidRetention(m) => write!(f, "{m}"),
            Rejection::Placement(m) => write!(f, "{m}"),
        }
    }
}

/// A state change apply asks the store to make, in order, in one atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    PutMessage(StoredMessage),
    SetHead {
        conversation: String,
        head: u64,
    },
    PutDedup {
        key: DedupKey,
        record: DedupRecord,
    },
    SetCursor {
        user: String,
        conversation: String,
        offset: u64,
    },
    SetMembers {
        conversation: String,
        members: Members,
    },
    SetRetention {
        conversation: String,
        retention: Retention,
    },
    /// Delete every message below `before` and the dedup records of those in
    /// `[from, before)` (`dedup`), and make `before` the earliest retained offset.
    Trim {
        conversation: String,
        from: u64,
        before: u64,
        dedup: Vec<DedupKey>,
    },
}

/// Read access apply needs. Implementations must reflect every effect already produced
/// in the current batch (see [`Overlay`]).
pub trait ShardView {
    type Error;
    fn head(&mut self, conversation: &str) -> Result<u64, Self::Error>;
    fn dedup(&mut self, key: &DedupKey) -> Result<Option<DedupRecord>, Self::Error>;
    fn cursor(&mut self, user: &str, conversation: &str) -> Result<u64, Self::Error>;
    /// The conversation's members; `None`: it does not exist.
    fn members(&mut self, conversation: &str) -> Result<Option<Members>, Self::Error>;
    /// Whether `user` is a member; `None`: the conversation does not exist. Asked by every
    /// send, so views answer it without copying the member set.
    fn is_member(&mut self, conversation: &str, user: &str) -> Result<Option<bool>, Self::Error>;
    /// The earliest retained offset of a conversation (1 until a trim).
    fn earliest(&mut self, conversation: &str) -> Result<u64, Self::Error>;
    /// The idempotency keys of the conversation's messages in `[from, before)`.
    fn keys_between(&mut self, conversation: &str, from: u64, before: u64) -> Result<Vec<DedupKey>, Self::Error>;
    /// The conversation's own retention record (`None`: it has none).
    fn retention(&mut self, conversation: &str) -> Result<Option<Retention>, Self::Error>;
}

/// Applies one command against `view`, returning its outcome and the effects to persist.
/// Deterministic: the same view and command always give the same result.
pub fn apply<V: ShardView>(view: &mut V, command: &Command) -> Result<(Outcome, Vec<Effect>), V::Error> {
    match command {
        Command::Send(send) => apply_send(view, send),
        Command::Cursor(cursor) => apply_cursor(view, cursor),
        Command::Members(m) => apply_members(view, m),
        Command::SetRetention(r) => apply_set_retention(view, r),
        Command::Trim(t) => apply_trim(view, t),
        Command::TrimUnder(t) => apply_trim_under(view, t),
        Command::Place(_) => {
            let reason = Rejection::Placement("placement commands belong to the metadata group, not a shard".into());
            Ok((Outcome::Rejected { reason }, Vec::new()))
        }
        Command::SendBatch(sends) => {
            // Later sends of the batch must see the effects of earlier ones (the next
            // offset, a duplicate key), exactly as separate entries would.
            let mut overlay = Overlay::new(view);
            let mut outcomes = Vec::with_capacity(sends.len());
            let mut effects = Vec::new();
            for send in sends {
                let (outcome, produced) = apply_send(&mut overlay, send)?;
                overlay.absorb(&produced);
                effects.extend(produced);
                outcomes.push(outcome);
            }
            Ok((Outcome::Batch(outcomes), effects))
        }
    }
}

fn apply_send<V: ShardView>(view: &mut V, send: &SendCommand) -> Result<(Outcome, Vec<Effect>), V::Error> {
    let reject = |reason| Ok((Outcome::Rejected { reason }, Vec::new()));
    if let Err(m) = validate_id("conversation", &send.conversation) {
        return reject(Rejection::InvalidId(m));
    }
    if let Err(m) = validate_id("user", &send.sender) {
        return reject(Rejection::InvalidId(m));
    }
    if send.text.len() > MESSAGE_BYTES_MAX {
        return reject(Rejection::TooLarge { bytes: send.text.len(), max: MESSAGE_BYTES_MAX });
    }
    let key = DedupKey::of(send);
    let digest = text_digest(&send.text);
    if let Some(found) = view.dedup(&key)? {
        if found.digest != digest {
            return reject(Rejection::SeqReused { conversation: send.conversation.clone() });
        }
        let outcome = Outcome::Appended { offset: found.offset, ts_ms: found.ts_ms, duplicate: true };
        return Ok((outcome, Vec::new()));
    }
    let member = view.is_member(&send.conversation, &send.sender)?;
    if member == Some(false) {
        return reject(Rejection::NotMember { user: send.sender.clone() });
    }
    let offset = view.head(&send.conversation)? + 1;
    let message = StoredMessage {
        conversation: send.conversation.clone(),
        offset,
        sender: send.sender.clone(),
        ts_ms: send.ts_ms,
        client_id: send.client_id,
        client_seq: send.client_seq,
        text: send.text.clone(),
    };
    let record = DedupRecord { offset, ts_ms: send.ts_ms, digest };
    let mut effects = Vec::with_capacity(4);
    if member.is_none() {
        // The first send creates the conversation, with its sender as the only member.
        let members = Members { users: BTreeSet::from([send.sender.clone()]), removed: BTreeMap::new() };
        effects.push(Effect::SetMembers { conversation: send.conversation.clone(), members });
    }
    effects.extend([
        Effect::PutMessage(message),
        Effect::SetHead { conversation: send.conversation.clone(), head: offset },
        Effect::PutDedup { key, record },
    ]);
    Ok((Outcome::Appended { offset, ts_ms: send.ts_ms, duplicate: false }, effects))
}

/// The checks of a membership change that need no state: every id it names is valid.
/// Apply makes them (a log entry is checked whatever proposed it); a leader makes them, and
/// refuses a creation list longer than [`MEMBERS_MAX`], before it proposes one, so a bad
/// request never costs the log an entry.
pub fn check_member_ids(c: &MembersCommand) -> Result<(), Rejection> {
    for (kind, id) in [("conversation", &c.conversation), ("user", &c.by)] {
        validate_id(kind, id).map_err(Rejection::InvalidId)?;
    }
    let named: &[String] = match &c.change {
        Membership::Create { members } => members,
        Membership::Add { user } | Membership::Remove { user } => std::slice::from_ref(user),
    };
    for user in named {
        validate_id("user", user).map_err(Rejection::InvalidId)?;
    }
    Ok(())
}

fn apply_members<V: ShardView>(view: &mut V, c: &MembersCommand) -> Result<(Outcome, Vec<Effect>), V::Error> {
    let reject = |reason| Ok((Outcome::Rejected { reason }, Vec::new()));
    if let Err(reason) = check_member_ids(c) {
        return reject(reason);
    }
    let head = view.head(&c.conversation)?;
    let existing = view.members(&c.conversation)?;
    let members = match (&c.change, existing) {
        (Membership::Create { .. }, Some(_)) => return reject(Rejection::Exists),
        (Membership::Create { members }, None) => {
            if head > 0 {
                return reject(Rejection::Exists);
            }
            let users: BTreeSet<String> = members.iter().cloned().chain([c.by.clone()]).collect();
            if users.len() > MEMBERS_MAX {
                return reject(Rejection::TooManyMembers { max: MEMBERS_MAX });
            }
            Members { users, removed: BTreeMap::new() }
        }
        (_, None) => return reject(Rejection::NotMember { user: c.by.clone() }),
        (_, Some(m)) if !m.contains(&c.by) => return reject(Rejection::NotMember { user: c.by.clone() }),
        (Membership::Add { user }, Some(mut m)) => {
            if m.users.insert(user.clone()) && m.users.len() > MEMBERS_MAX {
                return reject(Rejection::TooManyMembers { max: MEMBERS_MAX });
            }
            m.removed.remove(user);
            m
        }
        (Membership::Remove { user }, Some(mut m)) => {
            if m.users.remove(user) {
                m.removed.insert(user.clone(), head);
                while m.removed.len() > REMOVED_MAX {
                    // The oldest removal (the lowest head; by name among equals): the same
                    // on every replica, as apply must be.
                    let oldest = m.removed.iter().min_by_key(|(u, h)| (**h, *u)).map(|(u, _)| u.clone());
                    let Some(oldest) = oldest else { break };
                    m.removed.remove(&oldest);
                }
            }
            m
        }
    };
    let outcome = Outcome::Members { members: members.users.iter().cloned().collect(), head };
    Ok((outcome, vec![Effect::SetMembers { conversation: c.conversation.clone(), members }]))
}

fn apply_set_retention<V: ShardView>(view: &mut V, c: &RetentionCommand) -> Result<(Outcome, Vec<Effect>), V::Error> {
    let reject = |reason| Ok((Outcome::Rejected { reason }, Vec::new()));
    for (kind, id) in [("conversation", &c.conversation), ("user", &c.by)] {
        if let Err(m) = validate_id(kind, id) {
            return reject(Rejection::InvalidId(m));
        }
    }
    if let Err(m) = c.retention.validate() {
        return reject(Rejection::InvalidRetention(m));
    }
    let mut effects = Vec::with_capacity(2);
    match view.is_member(&c.conversation, &c.by)? {
        Some(true) => {}
        _ if c.admin => {}
        Some(false) => return reject(Rejection::NotMember { user: c.by.clone() }),
        // Like a first send, a member's policy for a conversation that does not exist yet
        // creates it, with its author as the only member: nobody can set the retention of a
        // conversation they will not be in.
        None => {
            let members = Members { users: BTreeSet::from([c.by.clone()]), removed: BTreeMap::new() };
            effects.push(Effect::SetMembers { conversation: c.conversation.clone(), members });
        }
    }
    effects.push(Effect::SetRetention { conversation: c.conversation.clone(), retention: c.retention });
    Ok((Outcome::RetentionSet { retention: c.retention }, effects))
}

fn apply_trim<V: ShardView>(view: &mut V, c: &TrimCommand) -> Result<(Outcome, Vec<Effect>), V::Error> {
    if let Err(m) = validate_id("conversation", &c.conversation) {
        return Ok((Outcome::Rejected { reason: Rejection::InvalidId(m) }, Vec::new()));
    }
    let from = view.earliest(&c.conversation)?;
    let head = view.head(&c.conversation)?;
    let before = c.before.min(head.saturating_add(1)).min(from.saturating_add(TRIM_MESSAGES_MAX));
    if before <= from {
        return Ok((Outcome::Trimmed { earliest: from, deleted: 0 }, Vec::new()));
    }
    let dedup = view.keys_between(&c.conversation, from, before)?;
    let effect = Effect::Trim { conversation: c.conversation.clone(), from, before, dedup };
    Ok((Outcome::Trimmed { earliest: before, deleted: before - from }, vec![effect]))
}

fn apply_trim_under<V: ShardView>(view: &mut V, c: &TrimUnderCommand) -> Result<(Outcome, Vec<Effect>), V::Error> {
    let conversation = &c.trim.conversation;
    if let Err(m) = validate_id("conversation", conversation) {
        return Ok((Outcome::Rejected { reason: Rejection::InvalidId(m) }, Vec::new()));
    }
    if view.retention(conversation)?.unwrap_or_default() != c.planned_under {
        // The policy changed after the plan: the next check plans under the new one.
        return Ok((Outcome::Trimmed { earliest: view.earliest(conversation)?, deleted: 0 }, Vec::new()));
    }
    apply_trim(view, &c.trim)
}

fn apply_cursor<V: ShardView>(view: &mut V, c: &CursorCommand) -> Result<(Outcome, Vec<Effect>), V::Error> {
    for (kind, id) in [("user", &c.user), ("conversation", &c.conversation)] {
        if let Err(m) = validate_id(kind, id) {
            return Ok((Outcome::Rejected { reason: Rejection::InvalidId(m) }, Vec::new()));
        }
    }
    if view.is_member(&c.conversation, &c.user)? == Some(false) {
        return Ok((Outcome::Rejected { reason: Rejection::NotMember { user: c.user.clone() } }, Vec::new()));
    }
    let head = view.head(&c.conversation)?;
    if c.offset > head {
        return Ok((Outcome::Rejected { reason: Rejection::CursorPastHead { head } }, Vec::new()));
    }
    let current = view.cursor(&c.user, &c.conversation)?;
    if c.offset <= current {
        return Ok((Outcome::CursorAt { offset: current }, Vec::new()));
    }
    let effect = Effect::SetCursor { user: c.user.clone(), conversation: c.conversation.clone(), offset: c.offset };
    Ok((Outcome::CursorAt { offset: c.offset }, vec![effect]))
}

/// A view that answers from the effects of the current batch first, then from `base`.
/// Lets a batch of commands be applied before any of it is written.
pub struct Overlay<'a, V> {
    pub base: &'a mut V,
    heads: HashMap<String, u64>,
    dedup: HashMap<DedupKey, DedupRecord>,
    cursors: HashMap<(String, String), u64>,
    members: HashMap<String, Members>,
    /// Earliest offsets that trims of this batch set.
    earliest: HashMap<String, u64>,
    /// Dedup records that trims of this batch deleted.
    dedup_deleted: HashSet<DedupKey>,
    /// Retention records this batch set.
    retention: HashMap<String, Retention>,
}

impl<'a, V: ShardView> Overlay<'a, V> {
    pub fn new(base: &'a mut V) -> Self {
        Overlay {
            base,
            heads: HashMap::new(),
            dedup: HashMap::new(),
            cursors: HashMap::new(),
            members: HashMap::new(),
            earliest: HashMap::new(),
            dedup_deleted: HashSet::new(),
            retention: HashMap::new(),
        }
    }

    /// The heads the batch set (each conversation's last), the dedup keys it recorded, and
    /// the member records it set.
    pub fn into_written(self) -> (HashMap<String, u64>, Vec<DedupKey>, HashMap<String, Members>) {
        (self.heads, self.dedup.into_keys().collect(), self.members)
    }

    /// Records effects so later lookups in this batch see them.
    pub fn absorb(&mut self, effects: &[Effect]) {
        for effect in effects {
            match effect {
                Effect::PutMessage(_) => {}
                Effect::SetHead { conversation, head } => {
                    self.heads.insert(conversation.clone(), *head);
                }
                Effect::PutDedup { key, record } => {
                    self.dedup.insert(key.clone(), record.clone());
                }
                Effect::SetCursor { user, conversation, offset } => {
                    self.cursors.insert((user.clone(), conversation.clone()), *offset);
                }
                Effect::SetMembers { conversation, members } => {
                    self.members.insert(conversation.clone(), members.clone());
                }
                Effect::SetRetention { conversation, retention } => {
                    self.retention.insert(conversation.clone(), *retention);
                }
                Effect::Trim { conversation, before, dedup, .. } => {
                    self.earliest.insert(conversation.clone(), *before);
                    for key in dedup {
                        self.dedup.remove(key);
                        self.dedup_deleted.insert(key.clone());
                    }
                }
            }
        }
    }
}

impl<V: ShardView> ShardView for Overlay<'_, V> {
    type Error = V::Error;
    fn head(&mut self, conversation: &str) -> Result<u64, V::Error> {
        match self.heads.get(conversation) {
            Some(h) => Ok(*h),
            None => self.base.head(conversation),
        }
    }
    fn dedup(&mut self, key: &DedupKey) -> Result<Option<DedupRecord>, V::Error> {
        match self.dedup.get(key) {
            Some(r) => Ok(Some(r.clone())),
            None if self.dedup_deleted.contains(key) => Ok(None),
            None => self.base.dedup(key),
        }
    }
    fn earliest(&mut self, conversation: &str) -> Result<u64, V::Error> {
        match self.earliest.get(conversation) {
            Some(e) => Ok(*e),
            None => self.base.earliest(conversation),
        }
    }
    fn keys_between(&mut self, conversation: &str, from: u64, before: u64) -> Result<Vec<DedupKey>, V::Error> {
        // Stored messages, then the ones this batch appended (each has a dedup record here).
        let mut keys = self.base.keys_between(conversation, from, before)?;
        keys.retain(|k| !self.dedup_deleted.contains(k));
        keys.extend(
            self.dedup
                .iter()
                .filter(|(k, r)| k.conversation == conversation && (from..before).contains(&r.offset))
                .map(|(k, _)| k.clone()),
        );
        Ok(keys)
    }
    fn retention(&mut self, conversation: &str) -> Result<Option<Retention>, V::Error> {
        match self.retention.get(conversation) {
            Some(r) => Ok(Some(*r)),
            None => self.base.retention(conversation),
        }
    }
    fn members(&mut self, conversation: &str) -> Result<Option<Members>, V::Error> {
        match self.members.get(conversation) {
            Some(m) => Ok(Some(m.clone())),
            None => self.base.members(conversation),
        }
    }
    fn is_member(&mut self, conversation: &str, user: &str) -> Result<Option<bool>, V::Error> {
        match self.members.get(conversation) {
            Some(m) => Ok(Some(m.contains(user))),
            None => self.base.is_member(conversation, user),
        }
    }
    fn cursor(&mut self, user: &str, conversation: &str) -> Result<u64, V::Error> {
        match self.cursors.get(&(user.to_string(), conversation.to_string())) {
            Some(o) => Ok(*o),
            None => self.base.cursor(user, conversation),
        }
    }
}

/// An in-memory shard state, for tests and property checks of apply.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemView {
    pub heads: HashMap<String, u64>,
    pub dedup: HashMap<DedupKey, DedupRecord>,
    pub cursors: HashMap<(String, String), u64>,
    pub members: HashMap<String, Members>,
    pub messages: Vec<StoredMessage>,
    pub earliest: HashMap<String, u64>,
    pub retention: HashMap<String, Retention>,
}

impl MemView {
    /// Applies a command and persists its effects in memory.
    pub fn apply(&mut self, command: &Command) -> Outcome {
        let (outcome, effects) = match apply(self, command) {
            Ok(r) => r,
            Err(never) => match never {},
        };
        self.persist(effects);
        outcome
    }

    /// Persists effects in memory, as a store writes them.
    pub fn persist(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::PutMessage(m) => self.messages.push(m),
                Effect::SetHead { conversation, head } => {
                    self.heads.insert(conversation, head);
                }
                Effect::PutDedup { key, record } => {
                    self.dedup.insert(key, record);
                }
                Effect::SetCursor { user, conversation, offset } => {
                    self.cursors.insert((user, conversation), offset);
                }
                Effect::SetMembers { conversation, members } => {
                    self.members.insert(conversation, members);
                }
                Effect::SetRetention { conversation, retention } => {
                    self.retention.insert(conversation, retention);
                }
                Effect::Trim { conversation, before, dedup, .. } => {
                    self.messages.retain(|m| m.conversation != conversation || m.offset >= before);
                    for key in dedup {
                        self.dedup.remove(&key);
                    }
                    self.earliest.insert(conversation, before);
                }
            }
        }
    }
}

impl ShardView for MemView {
    type Error = std::convert::Infallible;
    fn head(&mut self, conversation: &str) -> Result<u64, Self::Error> {
        Ok(self.heads.get(conversation).copied().unwrap_or(0))
    }
    fn dedup(&mut self, key: &DedupKey) -> Result<Option<DedupRecord>, Self::Error> {
        Ok(self.dedup.get(key).cloned())
    }
    fn members(&mut self, conversation: &str) -> Result<Option<Members>, Self::Error> {
        Ok(self.members.get(conversation).cloned())
    }
    fn is_member(&mut self, conversation: &str, user: &str) -> Result<Option<bool>, Self::Error> {
        Ok(self.members.get(conversation).map(|m| m.contains(user)))
    }
    fn cursor(&mut self, user: &str, conversation: &str) -> Result<u64, Self::Error> {
        Ok(self.cursors.get(&(user.to_string(), conversation.to_string())).copied().unwrap_or(0))
    }
    fn earliest(&mut self, conversation: &str) -> Result<u64, Self::Error> {
        Ok(self.earliest.get(conversation).copied().unwrap_or(1))
    }
    fn keys_between(&mut self, conversation: &str, from: u64, before: u64) -> Result<Vec<DedupKey>, Self::Error> {
        Ok(self
            .messages
            .iter()
            .filter(|m| m.conversation == conversation && (from..before).contains(&m.offset))
            .map(DedupKey::of_stored)
            .collect())
    }
    fn retention(&mut self, conversation: &str) -> Result<Option<Retention>, Self::Error> {
        Ok(self.retention.get(conversation).copied())
    }
}

#[cfg(test)]
mod tests;
