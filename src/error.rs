//! The crate's error type.
//!
//! Every error says what a caller can do about it (see [`Error::class`]):
//! - **retryable**: the operation definitely did not take effect; try again (maybe elsewhere);
//! - **ambiguous**: it may or may not have taken effect (a timeout, a dropped connection after
//!   the request left); retry with the same idempotency key, never treat as failed;
//! - **fatal**: retrying will not help (bad input, bad configuration, broken storage).

use std::io;

/// What a caller should do with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Retryable,
    Ambiguous,
    Fatal,
}

/// convoy's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or violates a limit; nothing was applied.
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// The command was replicated and refused by the state machine (an outcome, not a fault).
    #[error("rejected: {0}")]
    Rejected(String),
    /// This node does not lead the shard; `leader` is its best guess.
    #[error("not the leader of shard {shard} (leader hint: {leader:?})")]
    NotLeader { shard: u32, leader: Option<u64> },
    /// Over a limit; nothing was applied; retry after the given delay.
    #[error("throttled: retry after {retry_after_ms} ms")]
    Throttled { retry_after_ms: u64 },
    /// The offset asked for is older than what is retained.
    #[error("offset truncated: earliest retained offset is {earliest}")]
    Truncated { earliest: u64 },
    /// Could not reach a node or a quorum; nothing was applied.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The outcome is unknown (timeout or connection lost after sending).
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
    /// The peer spoke something we do not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Certificates or keys could not be made or loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// Storage failed; the node must stop rather than continue with unknown state.
    #[error("storage: {0}")]
    Storage(String),
    #[error("io: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// How a caller should treat this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::NotLeader { .. } | Error::Throttled { .. } | Error::Unavailable(_) => ErrorClass::Retryable,
            Error::Ambiguous(_) | Error::Io(_) => ErrorClass::Ambiguous,
            Error::InvalidInput(_)
            | Error::Rejected(_)
            | Error::Truncated { .. }
            | Error::Protocol(_)
            | Error::Config(_)
            | Error::Tls(_)
            | Error::Storage(_) => ErrorClass::Fatal,
        }
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
