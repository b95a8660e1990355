//! [`ClusterSpec`]: what a harness wants of a local cluster, and the `cluster.toml` it becomes.
//!
//! Everything left unset is left out of the file, so the node's own defaults
//! (`convoy::config`) apply; the file is the only thing a node reads, which keeps a harness's
//! cluster exactly as reproducible as the operator's.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{ensure, Result};
use serde::Serialize;

/// The TLS directory, relative to the cluster directory.
pub(crate) const TLS_DIR: &str = "tls";

/// A local cluster to launch: its shape, its `cluster.toml` settings, where its files go and
/// how its processes are run. Start from [`ClusterSpec::default`] and set what matters.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Nodes, with ids `1..=nodes` (every shard is replicated on all of them).
    pub nodes: u64,
    /// Shards (`shards` in cluster.toml).
    pub shards: u32,
    /// `[raft]` settings; unset ones take the node's defaults.
    pub raft: RaftTweaks,
    /// `[limits]` settings; unset ones take the node's defaults.
    pub limits: LimitTweaks,
    /// `[retention]` settings; unset ones take the node's defaults.
    pub retention: RetentionTweaks,
    /// Async worker threads per node process; `None` leaves the node's default (one per core).
    pub worker_threads: Option<usize>,
    /// `[admin] move_bytes_per_s`: how fast a move copies (`None`: the node's default, no
    /// limit).
    pub move_bytes_per_s: Option<u64>,
    /// Where the nodes listen.
    pub addressing: Addressing,
    /// Where each node's data and log go inside the cluster directory.
    pub layout: Layout,
    /// The cluster directory (cluster.toml, tls/, the nodes' data and logs); `None` makes a
    /// fresh temporary one.
    pub dir: Option<PathBuf>,
    /// Remove the cluster directory when the [`crate::LocalCluster`] is dropped. A kept
    /// temporary directory is named on stderr.
    pub remove_dir_on_drop: bool,
    /// `CONVOY_LOG` for every node; `None` passes the caller's environment through (the node
    /// then logs `convoy::node::LOG_DEFAULT` unless the caller set `CONVOY_LOG`).
    pub log_filter: Option<String>,
    /// Extra environment for every node.
    pub env: Vec<(String, String)>,
    /// Extra environment for one node (after [`ClusterSpec::env`]), by node id.
    pub node_env: BTreeMap<u64, Vec<(String, String)>>,
    /// The `convoy` binary; `None` finds it with [`crate::convoy_bin`].
    pub convoy_bin: Option<PathBuf>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 3,
            shards: 16,
            raft: RaftTweaks::default(),
            limits: LimitTweaks::default(),
            retention: RetentionTweaks::default(),
            worker_threads: None,
            move_bytes_per_s: None,
            addressing: Addressing::Loopback,
            layout: Layout::Flat,
            dir: None,
            remove_dir_on_drop: true,
            log_filter: None,
            env: Vec::new(),
            node_env: BTreeMap::new(),
            convoy_bin: None,
        }
    }
}

/// `[raft]` settings of cluster.toml (see `convoy::config::RaftConfig`); `None` is "the
/// node's default".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RaftTweaks {
    /// Leader heartbeat interval, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    /// Heartbeats to a follower that answered a replication this recently are skipped, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_min_interval_ms: Option<u64>,
    /// Shortest election timeout, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election_timeout_ms_min: Option<u64>,
    /// Longest election timeout, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election_timeout_ms_max: Option<u64>,
    /// Applied entries between snapshots (and log purges).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_logs_since_last: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_log_kept_max: Option<u64>,
    /// Entries per AppendEntries RPC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_entries_max: Option<u64>,
    /// Purge the log in steps of at least this many entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purge_batch_size: Option<u64>,
    /// Frames of AppendEntries in flight per peer (0: an exchange per group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub append_frames_in_flight: Option<usize>,
    /// Idle ms before a group quiesces (0: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiesce_after_ms: Option<u64>,
}

/// A test cluster's `limits.connections_per_user_max` unless a spec sets it: the node's
/// whole default `connections_max`, since tests, jepsen and the bench (10,000 idle clients)
/// run their clients as one user. The limit itself is tested where a test sets it.
pub const CONNECTIONS_PER_USER_TESTS: usize = convoy::chat::limits::CONNECTIONS_DEFAULT;

/// `[limits]` settings of cluster.toml (see `convoy::config::Limits`); `None` is "the node's
/// default" (except `connections_per_user_max`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LimitTweaks {
    /// Largest message text, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_bytes_max: Option<usize>,
    /// Largest client frame, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_bytes_max: Option<usize>,
    /// Concurrent client connections per node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<usize>,
    /// Concurrent client connections of one user per node. Unset, a test cluster allows
    /// [`CONNECTIONS_PER_USER_TESTS`], not the node's default: tests and the bench run
    /// thousands of clients as one user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_per_user_max: Option<usize>,
    /// Stored messages held read for catch-ups, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catch_up_buffer_bytes: Option<u64>,
    /// Connections catching up through a wide send window at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catch_up_windows_max: Option<usize>,
    /// Sends in flight per node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inflight_sends_max: Option<usize>,
    /// Live-push buffer per watched conversation, in messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_buffer_messages: Option<usize>,
    /// Concurrent requests (streams) per client connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams_per_connection_max: Option<u32>,
    /// Send rates (0: no limit) and their bursts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_sends_per_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_sends_burst: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_sends_per_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_sends_burst: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_sends_per_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_sends_burst: Option<u32>,
    /// A shard leader's window of proposed sends (0: no fair scheduling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_window_sends: Option<u32>,
    /// Sends that may wait per conversation on a shard's leader.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_queue_sends: Option<u32>,
    /// Messages behind at which a live subscriber is reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber_lag_warn: Option<u64>,
    /// Log entries behind at which a follower is flagged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follower_lag_warn: Option<u64>,
    /// Client handshakes a node starts per second, and runs at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshakes_per_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshakes_in_flight_max: Option<usize>,
    /// Free bytes each node keeps on its data directory's filesystem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_free_min_bytes: Option<u64>,
}

impl LimitTweaks {
    /// Every send rate limit off: for load generators that measure the store, not its
    /// throttling.
    pub fn unthrottled() -> LimitTweaks {
        LimitTweaks {
            user_sends_per_s: Some(0),
            conversation_sends_per_s: Some(0),
            connection_sends_per_s: Some(0),
            ..LimitTweaks::default()
        }
    }
}

/// `[retention]` settings of cluster.toml (see `convoy::config::RetentionConfig`); `None` is
/// "the node's default".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionTweaks {
    /// Messages kept per conversation by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// Age kept by default, e.g. "2s".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// Bytes kept per conversation by default, e.g. "1MiB".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<String>,
    /// How often leaders check retention, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_interval_ms: Option<u64>,
    /// Trimmed messages after which a node reclaims their space.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaim_after_messages: Option<u64>,
    /// Seconds after which a node reclaims the space of any trimmed message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaim_after_s: Option<u64>,
}

/// Where the nodes listen.
#[derive(Debug, Clone)]
pub enum Addressing {
    /// 127.0.0.1, client and peer ports from the OS (see [`crate::free_port`]).
    Loopback,
    /// Node `id` listens on `ip_of(id)`, with the same two ports on every node (jepsen gives
    /// each node its own loopback address, 127.0.0.11–13, so it can firewall them apart).
    Fixed { ip_of: fn(u64) -> IpAddr, client_port: u16, peer_port: u16 },
}

/// Where node `id`'s data directory and log file go, relative to the cluster directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `node{id}/` and `node{id}.log`.
    Flat,
    /// `n{id}/data/` and `n{id}/node.log`: one directory per node (jepsen mounts a lossy
    /// filesystem on the data directory and keeps the node's clock file beside it).
    PerNodeDir,
}

impl Layout {
    /// Node `id`'s data directory, relative to the cluster directory.
    pub fn data_dir(self, id: u64) -> PathBuf {
        match self {
            Layout::Flat => PathBuf::from(format!("node{id}")),
            Layout::PerNodeDir => PathBuf::from(format!("n{id}/data")),
        }
    }

    /// Node `id`'s log file (its stdout and stderr), relative to the cluster directory.
    pub fn log_file(self, id: u64) -> PathBuf {
        match self {
            Layout::Flat => PathBuf::from(format!("node{id}.log")),
            Layout::PerNodeDir => PathBuf::from(format!("n{id}/node.log")),
        }
    }
}

/// The file a node reads, as serde writes it.
#[derive(Serialize)]
struct ClusterFile<'a> {
    shards: u32,
    replication_factor: u64,
    tls_dir: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_threads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raft: Option<&'a RaftTweaks>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<&'a LimitTweaks>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<&'a RetentionTweaks>,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin: Option<AdminSection>,
    nodes: Vec<NodeEntry>,
}

/// `[admin]` of cluster.toml, as far as tests set it.
#[derive(Serialize)]
struct AdminSection {
    move_bytes_per_s: u64,
}

#[derive(Serialize)]
pub(crate) struct NodeEntry {
    pub(crate) id: u64,
    pub(crate) client_addr: SocketAddr,
    pub(crate) peer_addr: SocketAddr,
    pub(crate) data_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) metrics_addr: Option<SocketAddr>,
}

impl ClusterSpec {
    /// Node ids, `1..=nodes`.
    pub fn node_ids(&self) -> Vec<u64> {
        (1..=self.nodes).collect()
    }

    /// Each node's (client, peer) address, by id; loopback ports are picked now.
    pub(crate) fn addresses(&self) -> Result<BTreeMap<u64, (SocketAddr, SocketAddr)>> {
        match &self.addressing {
            Addressing::Loopback => {
                let ports = crate::free_ports(2 * self.nodes as usize)?;
                let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
                Ok(self
                    .node_ids()
                    .into_iter()
                    .zip(ports.chunks_exact(2))
                    .map(|(id, p)| (id, (SocketAddr::new(ip, p[0]), SocketAddr::new(ip, p[1]))))
                    .collect())
            }
            Addressing::Fixed { ip_of, client_port, peer_port } => Ok(self
                .node_ids()
                .into_iter()
                .map(|id| (id, (SocketAddr::new(ip_of(id), *client_port), SocketAddr::new(ip_of(id), *peer_port))))
                .collect()),
        }
    }

    /// The `cluster.toml` text for these addresses.
    pub(crate) fn toml(&self, addresses: &BTreeMap<u64, (SocketAddr, SocketAddr)>) -> Result<String> {
        ensure!(self.nodes > 0, "a cluster needs at least one node");
        // Loopback clusters serve metrics on a loopback port of their own; fixed addressing
        // (jepsen's) serves none.
        let metrics_ports = match self.addressing {
            Addressing::Loopback => crate::free_tcp_ports(self.nodes as usize)?,
            Addressing::Fixed { .. } => Vec::new(),
        };
        let limits = LimitTweaks {
            connections_per_user_max: self.limits.connections_per_user_max.or(Some(CONNECTIONS_PER_USER_TESTS)),
            ..self.limits.clone()
        };
        let file = ClusterFile {
            shards: self.shards,
            replication_factor: self.nodes,
            tls_dir: TLS_DIR,
            worker_threads: self.worker_threads,
            raft: (self.raft != RaftTweaks::default()).then_some(&self.raft),
            limits: Some(&limits),
            retention: (self.retention != RetentionTweaks::default()).then_some(&self.retention),
            admin: self.move_bytes_per_s.map(|move_bytes_per_s| AdminSection { move_bytes_per_s }),
            nodes: addresses
                .iter()
                .enumerate()
                .map(|(i, (id, (client_addr, peer_addr)))| NodeEntry {
                    id: *id,
                    client_addr: *client_addr,
                    peer_addr: *peer_addr,
                    data_dir: self.layout.data_dir(*id),
                    metrics_addr: metrics_ports.get(i).map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), *p)),
                })
                .collect(),
        };
        Ok(toml::to_string(&file)?)
    }

    /// The environment node `id` runs with beyond the caller's: `CONVOY_LOG` if set, then
    /// [`ClusterSpec::env`], then the node's own [`ClusterSpec::node_env`].
    pub(crate) fn env_of(&self, id: u64) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> =
            self.log_filter.iter().map(|f| ("CONVOY_LOG".to_string(), f.clone())).collect();
        env.extend(self.env.iter().cloned());
        env.extend(self.node_env.get(&id).into_iter().flatten().cloned());
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(spec: &ClusterSpec) -> convoy::config::Config {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.toml");
        let text = spec.toml(&spec.addresses().expect("addresses")).expect("toml");
        std::fs::write(&path, &text).expect("write");
        convoy::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_default_spec_is_three_loopback_nodes_with_the_nodes_defaults() {
        let config = load(&ClusterSpec::default());
        assert_eq!(config.node_ids(), vec![1, 2, 3]);
        assert_eq!((config.shards, config.replication_factor), (16, 3));
        assert_eq!(config.raft, convoy::config::RaftConfig::default());
        let limits = convoy::config::Limits {
            connections_per_user_max: CONNECTIONS_PER_USER_TESTS,
            ..convoy::config::Limits::default()
        };
        assert_eq!(config.limits, limits, "the node's defaults but the per-user connection limit");
        assert_eq!(config.retention, convoy::config::RetentionConfig::default());
        assert_eq!(config.worker_threads, 0);
        let mut ports = std::collections::BTreeSet::new();
        for n in &config.nodes {
            assert!(n.client_addr.ip().is_loopback() && n.peer_addr.ip().is_loopback(), "{n:?}");
            ports.extend([n.client_addr.port(), n.peer_addr.port()]);
            assert!(n.data_dir.ends_with(format!("node{}", n.id)), "{n:?}");
        }
        assert_eq!(ports.len(), 6, "every port distinct");
        assert!(config.tls_dir.ends_with(TLS_DIR));
    }

    #[test]
    fn tweaks_reach_the_config_and_fixed_addresses_follow_the_node_id() {
        let spec = ClusterSpec {
            nodes: 3,
            shards: 4,
            raft: RaftTweaks {
                heartbeat_ms: Some(50),
                election_timeout_ms_min: Some(800),
                election_timeout_ms_max: Some(1600),
                snapshot_logs_since_last: Some(100),
                snapshot_log_kept_max: Some(0),
                purge_batch_size: Some(1),
                ..RaftTweaks::default()
            },
            limits: LimitTweaks { message_bytes_max: Some(1000), ..LimitTweaks::default() },
            retention: RetentionTweaks {
                max_messages: Some(500),
                max_age: Some("2s".into()),
                check_interval_ms: Some(100),
                ..RetentionTweaks::default()
            },
            worker_threads: Some(2),
            move_bytes_per_s: Some(25_000),
            addressing: Addressing::Fixed {
                ip_of: |id| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + id as u8)),
                client_port: 7101,
                peer_port: 7201,
            },
            layout: Layout::PerNodeDir,
            ..ClusterSpec::default()
        };
        let config = load(&spec);
        assert_eq!(config.shards, 4);
        assert_eq!(config.worker_threads, 2);
        let raft = &config.raft;
        assert_eq!((raft.heartbeat_ms, raft.election_timeout_ms_min, raft.election_timeout_ms_max), (50, 800, 1600));
        assert_eq!((raft.snapshot_logs_since_last, raft.snapshot_log_kept_max, raft.purge_batch_size), (100, 0, 1));
        assert_eq!(raft.payload_entries_max, convoy::config::RaftConfig::default().payload_entries_max);
        assert_eq!(config.limits.message_bytes_max, 1000);
        assert_eq!(config.limits.frame_bytes_max, convoy::config::Limits::default().frame_bytes_max);
        let kept = config.retention_default;
        assert_eq!((kept.max_messages, kept.max_age_ms, kept.max_bytes), (Some(500), Some(2000), None));
        assert_eq!(config.retention.check_interval_ms, 100);
        assert_eq!(config.admin.move_bytes_per_s, 25_000);
        let n2 = config.node(2).expect("node 2");
        assert_eq!(n2.client_addr, "127.0.0.12:7101".parse().expect("addr"));
        assert_eq!(n2.peer_addr, "127.0.0.12:7201".parse().expect("addr"));
        assert!(n2.data_dir.ends_with("n2/data"), "{n2:?}");
    }

    #[test]
    fn node_environment_layers_the_log_filter_the_shared_and_the_nodes_own() {
        let spec = ClusterSpec {
            log_filter: Some("debug".into()),
            env: vec![("A".into(), "1".into())],
            node_env: BTreeMap::from([(2, vec![("B".into(), "2".into())])]),
            ..ClusterSpec::default()
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(spec.env_of(1), vec![pair("CONVOY_LOG", "debug"), pair("A", "1")]);
        assert_eq!(spec.env_of(2), vec![pair("CONVOY_LOG", "debug"), pair("A", "1"), pair("B", "2")]);
        assert!(ClusterSpec::default().env_of(1).is_empty());
    }

    #[test]
    fn layouts_name_each_nodes_files() {
        assert_eq!(Layout::Flat.data_dir(3), PathBuf::from("node3"));
        assert_eq!(Layout::Flat.log_file(3), PathBuf::from("node3.log"));
        assert_eq!(Layout::PerNodeDir.data_dir(3), PathBuf::from("n3/data"));
        assert_eq!(Layout::PerNodeDir.log_file(3), PathBuf::from("n3/node.log"));
    }
}
