//! convoy: a replicated, log-based message store for real-time chat.
//!
//! Map of the system, in dependency order (each layer only uses the ones above it):
//!
//! - [`chat`]: the domain and its pure, deterministic apply (offsets, dedup, cursors).
//! - [`store`]: RocksDB — the on-disk schema, group commit, shard snapshots.
//! - [`raft`]: openraft wiring — type config, log store and state machine adapters.
//! - [`net`]: QUIC — TLS, frames, the wire messages, the peer transport, the client server.
//! - [`service`]: a running node: send, subscribe, cursors, status over the groups.
//! - [`client`]: the Rust client the CLI, tests and tools use; it speaks only [`net::wire`].
//!
//! The promises (see the README): an `Ack` means committed by a quorum and fsynced there;
//! offsets are dense and the same on every replica; retries with the same
//! `(client_id, client_seq)` never append twice; a subscriber sees every message once,
//! in order, across catch-up and live push.

pub mod chat;
pub mod client;
pub mod config;
pub mod error;
pub mod net;
pub mod planted;
pub mod raft;
pub mod service;
pub mod stages;
pub mod store;

pub use error::{Error, Result};
