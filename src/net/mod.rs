//! Transport and the client protocol, and nothing above them: TLS material ([`tls`]), QUIC
//! transport limits ([`quic`]), UDP sockets sized for bursts ([`udp`]), size-checked frames ([`frame`]), reused request streams
//! ([`lane`]) and the client protocol's messages ([`wire`]). The peer protocol rides on these
//! frames and lanes but lives with Raft (`raft::rpc`, `raft::network`); the client server is
//! `crate::server`.

pub mod frame;
pub mod lane;
pub mod quic;
pub mod tls;
pub mod udp;
pub mod wire;
