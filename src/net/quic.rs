//! QUIC transport settings for both links, every window, count and timeout a named bound.
//!
//! quinn's defaults leave the connection receive window unbounded and allow 100 streams;
//! convoy bounds both per link. Peer links carry Raft (large AppendEntries and snapshot
//! chunks, a keep-alive so a dead peer is noticed within the idle timeout). Client links carry
//! small requests and pushes; the server never pings a client, the client keeps the
//! connection alive, and the idle timeout is what detects a node that died without closing.

use std::time::Duration;

/// Which link an endpoint serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Node ↔ node (Raft), mutual TLS under the node CA.
    Peer,
    /// Client ↔ node, a client certificate under the client CA.
    Client,
}

/// Concurrent bidirectional streams a peer may open on one connection: one lane per
/// (peer, shard) for AppendEntries, plus votes and snapshots.
pub const PEER_STREAMS_MAX: u32 = 1024;
/// Receive window of one peer stream, in bytes: an AppendEntries cut to its payload budget
/// arrives without waiting for window updates.
pub const PEER_STREAM_WINDOW_BYTES: u32 = 16 << 20;
/// Receive window of one peer connection (all its streams), in bytes.
pub const PEER_CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Send window of one peer connection, in bytes.
pub const PEER_SEND_WINDOW_BYTES: u64 = 64 << 20;
/// How often an idle peer connection is pinged.
pub const PEER_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A peer connection silent for this long is closed (a dead or partitioned peer).
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Receive window of one client request stream on the node, in bytes (a batch of sends).
pub const CLIENT_STREAM_WINDOW_BYTES: u32 = 256 << 10;
/// Receive window of one client connection on the node, in bytes.
pub const CLIENT_CONNECTION_WINDOW_BYTES: u32 = 1 << 20;
/// Send window of one client connection on the node, in bytes (pushes beyond it wait); a
/// connection catching up from storage widens it to [`CLIENT_CATCH_UP_SEND_WINDOW_BYTES`]
/// while the node's budget allows (`service::catch_up`).
pub const CLIENT_SEND_WINDOW_BYTES: u64 = 64 << 10;
/// Send window of a client connection on the node while it catches up from storage, in bytes.
pub const CLIENT_CATCH_UP_SEND_WINDOW_BYTES: u64 = 1 << 20;
/// Send window of a client's connection to a node, in bytes (batches of sends).
pub const DIALER_SEND_WINDOW_BYTES: u64 = 1 << 20;
/// The node closes a client connection silent for this long (clients ping more often).
pub const CLIENT_IDLE_TIMEOUT_SERVER: Duration = Duration::from_secs(30);

/// Streams a client accepts from the node it dialed (nodes open none). A node dialing a peer
/// uses the peer link's [`PEER_STREAMS_MAX`] instead.
pub const DIALER_STREAMS_MAX: u32 = 64;
/// How often a client pings its node, keeping the connection and NAT bindings alive.
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(3);
/// A client gives up on a silent node after this long and resubscribes elsewhere.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client's receive window per stream, in bytes: larger than the node's, it reads pushes.
pub const CLIENT_PUSH_STREAM_WINDOW_BYTES: u32 = 1 << 20;
/// A client's receive window per connection, in bytes.
pub const CLIENT_PUSH_CONNECTION_WINDOW_BYTES: u32 = 4 << 20;

fn idle(timeout: Duration) -> quinn::IdleTimeout {
    timeout.try_into().expect("every idle timeout above is far below QUIC's 2^62 ms limit")
}

/// Transport of a node's server endpoint for `link`; `client_streams_max` bounds the
/// concurrent requests of one client connection (`limits.streams_per_connection_max`).
pub fn server_transport(link: Link, client_streams_max: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(0u32.into());
    match link {
        Link::Peer => {
            t.max_concurrent_bidi_streams(PEER_STREAMS_MAX.into());
            t.stream_receive_window(PEER_STREAM_WINDOW_BYTES.into());
            t.receive_window(PEER_CONNECTION_WINDOW_BYTES.into());
            t.send_window(PEER_SEND_WINDOW_BYTES);
            t.keep_alive_interval(Some(PEER_KEEP_ALIVE));
            t.max_idle_timeout(Some(idle(PEER_IDLE_TIMEOUT)));
        }
        Link::Client => {
            t.max_concurrent_bidi_streams(client_streams_max.into());
            t.stream_receive_window(CLIENT_STREAM_WINDOW_BYTES.into());
            t.receive_window(CLIENT_CONNECTION_WINDOW_BYTES.into());
            t.send_window(CLIENT_SEND_WINDOW_BYTES);
            t.max_idle_timeout(Some(idle(CLIENT_IDLE_TIMEOUT_SERVER)));
        }
    }
    t
}

/// Transport of a dialing endpoint: a node dialing its peers, or a client dialing a node.
pub fn dialer_transport(link: Link) -> quinn::TransportConfig {
    let mut t = server_transport(link, DIALER_STREAMS_MAX);
    if link == Link::Client {
        t.keep_alive_interval(Some(CLIENT_KEEP_ALIVE));
        t.max_idle_timeout(Some(idle(CLIENT_IDLE_TIMEOUT)));
        t.stream_receive_window(CLIENT_PUSH_STREAM_WINDOW_BYTES.into());
        t.receive_window(CLIENT_PUSH_CONNECTION_WINDOW_BYTES.into());
        t.send_window(DIALER_SEND_WINDOW_BYTES);
    }
    t
}
