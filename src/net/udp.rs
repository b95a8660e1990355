//! UDP sockets for QUIC endpoints, with buffers sized for bursts.
//!
//! Linux gives a UDP socket about 208 KiB of receive buffer by default. When 5,000 clients
//! of a restarted node come back at once, their handshake packets arrive faster than one
//! endpoint task drains them, and the kernel drops what does not fit: 31,566 drops in one
//! `reconnect_storm` run (`RcvbufErrors` in `/proc/net/snmp`). Each dropped handshake packet
//! costs its client a retransmission timeout, so the storm's tail waits on timers instead of
//! on CPU. Asking for [`UDP_BUFFER_BYTES`] keeps such bursts; the kernel grants at most
//! `net.core.rmem_max` / `wmem_max`, and a smaller grant is logged with the sysctl to raise.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Receive and send buffer asked for on every endpoint socket, node and client, in bytes.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Binds a UDP socket on `addr` and asks for [`UDP_BUFFER_BYTES`] of buffer each way.
pub fn bind(addr: SocketAddr) -> Result<UdpSocket> {
    let socket = UdpSocket::bind(addr).map_err(|e| Error::Config(format!("cannot bind {addr}: {e}")))?;
    size_buffers(&socket, UDP_BUFFER_BYTES);
    Ok(socket)
}

/// Asks for `bytes` of receive and send buffer on `socket`. A refusal or a smaller grant is
/// not an error (the socket works, bursts may drop); it is logged once per socket.
fn size_buffers(socket: &UdpSocket, bytes: usize) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(bytes);
    let _ = sock.set_send_buffer_size(bytes);
    // Linux reports twice what it grants (the doubled value includes its bookkeeping).
    let granted = sock.recv_buffer_size().unwrap_or(0) / 2;
    if granted < bytes {
        tracing::info!(
            asked = bytes,
            granted,
            "UDP receive buffer smaller than asked: bursts of packets (a reconnect storm) may be dropped; raise \
             net.core.rmem_max (and wmem_max) to at least {bytes}"
        );
    }
}

/// A QUIC endpoint on a socket from [`bind`].
pub fn endpoint(
    addr: SocketAddr,
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint> {
    quinn::Endpoint::new(config, server, bind(addr)?, Arc::new(quinn::TokioRuntime))
        .map_err(|e| Error::Config(format!("cannot open a QUIC endpoint on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_get_at_least_the_default_buffer_and_at_most_what_was_asked() {
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sock = socket2::SockRef::from(&socket);
        let granted = sock.recv_buffer_size().unwrap() / 2;
        let max =
            std::fs::read_to_string("/proc/sys/net/core/rmem_max").ok().and_then(|s| s.trim().parse::<usize>().ok());
        // The kernel grants min(asked, rmem_max) (root may be granted more, never less).
        if let Some(max) = max {
            assert!(granted >= UDP_BUFFER_BYTES.min(max), "granted {granted}, rmem_max {max}");
        }
        assert!(granted <= UDP_BUFFER_BYTES, "granted {granted} beyond the {UDP_BUFFER_BYTES} asked");
    }
}
