//! The crate's error type.
//!
//! Every error says what a caller can do about it (see [`Error::class`]):
//! - **retryable**: the operation definitely did not take effect; try again (maybe elsewhere);
//! - **ambiguous**: it may or may not have taken effect (a timeout, a dropped connection after
//!   the request left); retry with the same idempotency key, never treat as failed;
//! - **fatal**: retrying will not help (bad input, bad configuration, broken storage). A
//!   storage or local I/O failure is fatal to the node: it stops rather than guess.

use std::io;

/// What a caller should do with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Retryable,
    Ambiguous,
    Fatal,
}

/// A boxed error kept as the source of a wrapping variant.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// convoy's error. Variants that wrap a failure keep it as their `source()`, so a log line
/// or a CLI message can show the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or violates a limit; nothing was applied.
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// The command was replicated and refused by the state machine (an outcome, not a fault).
    #[error("rejected: {0}")]
    Rejected(String),
    /// The caller's identity may not do this (another user's name, not a member, not admin).
    #[error("forbidden: {0}")]
    Forbidden(String),
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
    #[error("tls: {context}")]
    Tls {
        context: String,
        #[source]
        source: BoxError,
    },
    /// RocksDB failed; the node must stop rather than continue with unknown state.
    #[error("storage: {0}")]
    Storage(#[from] rocksdb::Error),
    /// Storage holds something convoy did not write (a malformed key or value, a broken
    /// invariant); the node must stop.
    #[error("corrupt storage: {0}")]
    Corrupt(String),
    /// A Raft group failed to start or to take a command it must take; the node must stop.
    #[error("raft: {context}")]
    Raft {
        context: String,
        #[source]
        source: BoxError,
    },
    /// A blocking task that did storage work panicked or was cancelled.
    #[error("{context}: the task died")]
    Task {
        context: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The node refuses to start as what it was: it lost the state that identity needs (see
    /// `raft::formation`). The text says what to run.
    #[error("refusing to start: {0}")]
    Refused(String),
    /// A local file or disk operation failed.
    #[error("io: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// How a caller should treat this error. Every variant is named: a new one must be
    /// classified here, not fall into a default.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::NotLeader { .. } | Error::Throttled { .. } | Error::Unavailable(_) => ErrorClass::Retryable,
            Error::Ambiguous(_) => ErrorClass::Ambiguous,
            Error::InvalidInput(_)
            | Error::Rejected(_)
            | Error::Forbidden(_)
            | Error::Truncated { .. }
            | Error::Protocol(_)
            | Error::Config(_)
            | Error::Tls { .. }
            | Error::Storage(_)
            | Error::Corrupt(_)
            | Error::Raft { .. }
            | Error::Task { .. }
            | Error::Refused(_)
            | Error::Io(_) => ErrorClass::Fatal,
        }
    }

    /// A Raft failure with what was being done.
    pub fn raft(context: impl Into<String>, source: impl Into<BoxError>) -> Error {
        Error::Raft { context: context.into(), source: source.into() }
    }

    /// A blocking task's failure to finish, with what it was doing.
    pub fn task(context: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Error {
        move |source| Error::Task { context, source }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn wrapping_variants_keep_their_source_and_storage_is_fatal() {
        let io = Error::from(io::Error::other("disk gone"));
        assert_eq!(io.class(), ErrorClass::Fatal, "a local I/O error stops the node");
        assert!(io.source().is_some_and(|s| s.to_string().contains("disk gone")));
        let raft = Error::raft("starting shard 3", io::Error::other("log unreadable"));
        assert_eq!(raft.class(), ErrorClass::Fatal);
        assert_eq!(raft.to_string(), "raft: starting shard 3");
        assert_eq!(raft.source().map(ToString::to_string).as_deref(), Some("log unreadable"));
        assert_eq!(Error::Corrupt("bad key".into()).class(), ErrorClass::Fatal);
        assert_eq!(Error::Ambiguous("timeout".into()).class(), ErrorClass::Ambiguous);
        assert_eq!(Error::Throttled { retry_after_ms: 5 }.class(), ErrorClass::Retryable);
    }
}
