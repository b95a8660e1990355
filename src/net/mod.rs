//! QUIC: TLS material and endpoint configuration ([`tls`]), size-checked frames
//! ([`frame`]), reused request streams ([`lane`]), the versioned messages ([`wire`]), the
//! peer transport used by Raft ([`peer`]) and the client-facing server ([`server`]).

pub mod frame;
pub mod lane;
pub mod peer;
pub mod server;
pub mod tls;
pub mod wire;
