//! testkit: the one way convoy's harnesses run a local cluster.
//!
//! convoy's integration tests (`tests/`), its benchmark (`bench/`) and its fault-injection
//! suite (`jepsen/`) all need the same thing: a `cluster.toml` for N nodes, the cluster's TLS
//! material, and real `convoy node` processes they can start, kill, pause, restart and wipe
//! while a client talks to them. [`LocalCluster`] does that from a [`ClusterSpec`]; nothing
//! else in those crates writes a cluster file or spawns a node. (The CLI's `cluster up` is the
//! product's own launcher for the operator's cluster.toml and stays in the product.)
//!
//! Invariants:
//! - A [`LocalCluster`] only ever signals, kills and reaps the processes it spawned itself, and
//!   kills them all when dropped, so a failing test or an interrupted run leaves no node behind.
//! - Waiting is polling with a deadline ([`eventually`], [`LocalCluster::wait_ready`]); no
//!   fixed sleep stands in for synchronisation.
//! - Loopback clusters take free ports outside the kernel's ephemeral range ([`free_ports`]),
//!   each handed out once per process, so clusters of parallel tests never collide and no
//!   client socket takes a stopped node's port before it restarts.
//!
//! Left out: anything a harness measures or injects beyond process control. The bench reads
//! `/proc` itself (with [`LocalCluster::pid`]); jepsen keeps its lossy mounts, clock files and
//! firewall rules, and hands their environment to the nodes through [`ClusterSpec::node_env`].
//!
//! Errors are `anyhow` (this is test glue, not product code).

mod cluster;
mod spec;

pub use cluster::LocalCluster;
pub use spec::{Addressing, ClusterSpec, Layout, LimitTweaks, RaftTweaks, RetentionTweaks, CONNECTIONS_PER_USER_TESTS};

use std::future::Future;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

/// How often the pollers ([`eventually`], [`LocalCluster::wait_ready`]) ask again.
pub const POLL_INTERVAL_MS: u64 = 100;

/// Environment variable naming the `convoy` binary when the caller does not (see [`convoy_bin`]).
pub const CONVOY_BIN_ENV: &str = "CONVOY_BIN";
/// The user a [`LocalCluster`]'s [`LocalCluster::client`] acts as (its credential is made
/// with the cluster).
pub const TEST_USER: &str = "tester";

/// A UDP port on 127.0.0.1 that is free now (QUIC runs over UDP); see [`free_ports`].
pub fn free_port() -> Result<u16> {
    Ok(free_ports(1)?[0])
}

/// `n` distinct free UDP ports on 127.0.0.1: every socket stays bound until all are chosen.
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>> {
    reserve(n, |port| UdpSocket::bind(("127.0.0.1", port)))
}

/// `n` distinct free TCP ports on 127.0.0.1 (for the metrics endpoints): every listener stays
/// bound until all are chosen.
pub(crate) fn free_tcp_ports(n: usize) -> Result<Vec<u16>> {
    reserve(n, |port| std::net::TcpListener::bind(("127.0.0.1", port)))
}

/// Picks `n` ports that `bind` takes, holding each until all are chosen.
///
/// The ports come from outside the kernel's ephemeral range. A node binds its ports when it
/// starts, and again when it restarts after a kill: a port of the ephemeral range would be
/// free meanwhile for any socket bound to port 0 (every client endpoint, every CLI run) to
/// take, and the node would then fail with "Address already in use" (it did, in CI). Outside
/// that range only an explicit bind takes a port, and within this process each port is handed
/// out once (a counter walks the range from a start that differs between processes).
fn reserve<S>(n: usize, bind: impl Fn(u16) -> std::io::Result<S>) -> Result<Vec<u16>> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: std::sync::OnceLock<AtomicU32> = std::sync::OnceLock::new();
    let (lo, hi) = outside_ephemeral_range();
    let width = u32::from(hi - lo) + 1;
    let next = NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        AtomicU32::new(std::process::id().wrapping_mul(7919) ^ nanos)
    });
    let mut held = Vec::with_capacity(n);
    for _ in 0..width {
        if held.len() == n {
            break;
        }
        let port = lo + (next.fetch_add(1, Ordering::Relaxed) % width) as u16;
        if let Ok(socket) = bind(port) {
            held.push((port, socket));
        }
    }
    if held.len() < n {
        bail!("only {} of {n} free ports on 127.0.0.1 in {lo}-{hi}", held.len());
    }
    Ok(held.into_iter().map(|(port, _)| port).collect())
}

/// The kernel's ephemeral port range, where sockets bound to port 0 land (from
/// `/proc/sys/net/ipv4/ip_local_port_range`; Linux's default 32768-60999 if unreadable).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// The wider of the port ranges below and above [`ephemeral_range`], never below 10000.
fn outside_ephemeral_range() -> (u16, u16) {
    let (lo, hi) = ephemeral_range();
    let below = (10_000u16, lo.saturating_sub(1).max(10_000));
    let above = (hi.saturating_add(1), 65_535u16);
    if below.1 - below.0 >= above.1 - above.0 {
        below
    } else {
        above
    }
}

/// The `convoy` binary to run nodes with: `explicit` if given; else the path in
/// `$CONVOY_BIN`; else a `convoy` beside the current executable (how `target/release/` holds
/// the bench and jepsen binaries) or one directory up (test binaries live in
/// `target/release/deps/`). Fails, naming what it tried, if that file does not exist.
pub fn convoy_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("the convoy binary {} does not exist", p.display());
    }
    if let Some(p) = std::env::var_os(CONVOY_BIN_ENV) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("${CONVOY_BIN_ENV} names {}, which does not exist", p.display());
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    let beside: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|d| d.join("convoy")).collect();
    beside.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "no convoy binary at {}: build it (cargo build --release --bin convoy), or set ${CONVOY_BIN_ENV}",
            beside.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
        )
    })
}

/// Polls `f` every [`POLL_INTERVAL_MS`] until it returns `Some`, and returns that value; fails
/// with "timed out after `within` waiting for `what`" once the deadline has passed.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let ports = free_ports(6).expect("ports");
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 6, "{ports:?}");
        let port = free_port().expect("a port");
        assert_ne!(port, 0);
        assert!(!ports.contains(&port), "a port is handed out once: {port} in {ports:?}");
        UdpSocket::bind(("127.0.0.1", port)).expect("the port is free again");
        // None is one the kernel hands to a socket bound to port 0.
        let (lo, hi) = ephemeral_range();
        for p in ports.iter().chain([&port]) {
            assert!(!(lo..=hi).contains(p), "{p} is in the ephemeral range {lo}-{hi}");
        }
    }

    #[test]
    fn convoy_bin_takes_an_existing_explicit_path_and_refuses_a_missing_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("convoy");
        std::fs::write(&bin, "").expect("write");
        assert_eq!(convoy_bin(Some(&bin)).expect("exists"), bin);
        let missing = dir.path().join("nope");
        let err = convoy_bin(Some(&missing)).expect_err("missing");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[tokio::test]
    async fn eventually_returns_the_first_value_or_times_out() {
        let mut calls = 0;
        let got = eventually(Duration::from_secs(30), "the third call", || {
            calls += 1;
            let n = calls;
            async move { (n == 3).then_some(n) }
        })
        .await
        .expect("within the deadline");
        assert_eq!(got, 3);

        let started = tokio::time::Instant::now();
        let within = Duration::from_millis(250);
        let err = eventually(within, "nothing", || async { None::<()> }).await.expect_err("times out");
        assert_eq!(err.to_string(), "timed out after 250ms waiting for nothing");
        assert!(started.elapsed() >= within);
    }
}
