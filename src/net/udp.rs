//! UDP sockets for QUIC endpoints, with buffers sized for bursts.
//!
//! Linux gives a UDP socket about 208 KiB of receive buffer by default. When 5,000 clients
//! of a restarted node come back at once, their handshake packets arrive faster than one
//! endpoint task drains them, and the kernel drops what does not fit: 31,566 drops in one
//! `reconnect_storm` run (`RcvbufErrors` in `/proc/net/snmp`). Each dropped handshake packet
//! costs its client a retransmission timeout, so the storm's tail waits on timers instead of
//! on CPU. Asking for [`UDP_BUFFER_BYTES`] keeps such bursts. The kernel grants at most
//! `net.core.rmem_max` / `wmem_max` (208 KiB on many distributions) unless the process holds
//! `CAP_NET_ADMIN`, in which case the size is forced; a smaller grant is logged with the
//! sysctl to raise.

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

/// Asks for `bytes` of receive and send buffer on `socket`, beyond `rmem_max`/`wmem_max` when
/// the process may (`CAP_NET_ADMIN`, as quic-go does). A refusal or a smaller grant is not an
/// error (the socket works, bursts may drop); it is logged once per socket.
fn size_buffers(socket: &UdpSocket, bytes: usize) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(bytes);
    let _ = sock.set_send_buffer_size(bytes);
    // Linux reports twice what it grants (the doubled value includes its bookkeeping).
    let granted = |sock: &socket2::SockRef<'_>| sock.recv_buffer_size().unwrap_or(0) / 2;
    #[cfg(target_os = "linux")]
    if granted(&sock) < bytes {
        force_buffers(socket, bytes);
    }
    let granted = granted(&sock);
    if granted < bytes {
        tracing::info!(
            asked = bytes,
            granted,
            "UDP receive buffer smaller than asked: bursts of packets (a reconnect storm) may be dropped; raise \
             net.core.rmem_max (and wmem_max) to at least {bytes}"
        );
    }
}

/// `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`: the same sizes past the sysctl caps, granted only to
/// a process with `CAP_NET_ADMIN`; otherwise refused, which changes nothing.
#[cfg(target_os = "linux")]
fn force_buffers(socket: &UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let Ok(value) = libc::c_int::try_from(bytes) else { return };
    for option in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a valid socket descriptor and a pointer to a live c_int of the size given.
        let _ = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
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

    /// Whether this process holds CAP_NET_ADMIN (bit 12 of `CapEff`).
    fn may_force() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string())))
            .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
            .is_some_and(|caps| caps & (1 << 12) != 0)
    }

    #[test]
    fn sockets_get_at_least_the_default_buffer_and_at_most_what_was_asked() {
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sock = socket2::SockRef::from(&socket);
        let granted = sock.recv_buffer_size().unwrap() / 2;
        let max =
            std::fs::read_to_string("/proc/sys/net/core/rmem_max").ok().and_then(|s| s.trim().parse::<usize>().ok());
        // The kernel grants min(asked, rmem_max), and all that was asked to a process with
        // CAP_NET_ADMIN, never less.
        if let Some(max) = max {
            assert!(granted >= UDP_BUFFER_BYTES.min(max), "granted {granted}, rmem_max {max}");
        }
        if may_force() {
            assert_eq!(granted, UDP_BUFFER_BYTES, "CAP_NET_ADMIN is granted the whole buffer past rmem_max");
        }
        assert!(granted <= UDP_BUFFER_BYTES, "granted {granted} beyond the {UDP_BUFFER_BYTES} asked");
    }
}
