//! `cluster.toml` → a validated [`Config`].
//!
//! Relative paths in the file are resolved against the file's directory, so the CLI and
//! every node find the same data directories and TLS material wherever they are started.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::chat::limits::*;
use crate::chat::{Retention, MESSAGE_BYTES_MAX, REQUEST_BYTES_MAX};
use crate::error::{Error, Result};

/// Room a client frame needs beside the largest message text: ids, keys and framing.
const FRAME_OVERHEAD_BYTES_MIN: usize = 1024;
/// The largest node id: a replica id keeps its node in its low 32 bits.
pub const NODE_ID_MAX: u64 = u32::MAX as u64;
/// The longest Raft timing a configuration may set (`[raft]`'s heartbeats and election
/// timeouts), in milliseconds: a minute.
pub const RAFT_TIMING_MS_MAX: u64 = 60_000;

/// One node of the cluster.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u64,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Where the node serves its Prometheus metrics over HTTP (`GET /metrics`); none if
    /// unset. Meant for loopback or a monitoring network: it is not authenticated.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
}

/// Raft timing and log compaction.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    /// A leader skips the heartbeat to a follower that answered a replication sent within
    /// this many ms (it proves the same liveness): under load, heartbeats stop; idle, they
    /// resume. 0 sends every heartbeat. `heartbeat_ms` plus this plus a fifth of
    /// `heartbeat_ms` must stay below `election_timeout_ms_min`.
    pub heartbeat_min_interval_ms: u64,
    #[serde(alias = "election_timeout_min_ms")]
    pub election_timeout_ms_min: u64,
    #[serde(alias = "election_timeout_max_ms")]
    pub election_timeout_ms_max: u64,
    /// Build a (cheap, lazy) snapshot and allow purging after this many applied entries.
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind a snapshot, at most, so slightly lagging followers need no
    /// snapshot.
    #[serde(alias = "max_in_snapshot_log_to_keep")]
    pub snapshot_log_kept_max: u64,
    /// Entries per AppendEntries RPC, at most.
    #[serde(alias = "max_payload_entries")]
    pub payload_entries_max: u64,
    /// Purge the log in steps of at least this many entries.
    pub purge_batch_size: u64,
    /// Frames of AppendEntries in flight to each peer, carrying every group's requests to it
    /// (1 ..= [`APPEND_FRAMES_MAX`]); 0 gives each group its own exchange with each peer.
    /// See `raft::network`.
    pub append_frames_in_flight: usize,
    /// A group whose leader saw no new entry, every replica caught up, for this many ms
    /// stops ticking on every replica (quiesces) until an entry, a Raft message or a change
    /// in a member node's liveness wakes it (see `raft::quiesce`). 0 never quiesces. At least
    /// twice `heartbeat_ms`, so followers heard the last commit index before it stops.
    pub quiesce_after_ms: u64,
}

/// Most frames of AppendEntries in flight to one peer (`raft.append_frames_in_flight`).
pub const APPEND_FRAMES_MAX: usize = 8;

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: 100,
            heartbeat_min_interval_ms: 0,
            election_timeout_ms_min: 1000,
            election_timeout_ms_max: 2000,
            snapshot_logs_since_last: 20_000,
            snapshot_log_kept_max: 5_000,
            payload_entries_max: 256,
            purge_batch_size: 256,
            append_frames_in_flight: 2,
            quiesce_after_ms: 1000,
        }
    }
}

/// Bounds on everything a client can make the node hold. Maximums are named `*_max`, like
/// the constants they are checked against; the defaults are `chat::limits`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message text, in bytes (at most [`MESSAGE_BYTES_MAX`]).
    #[serde(alias = "max_message_bytes")]
    pub message_bytes_max: usize,
    /// Largest client frame, in bytes (at most [`REQUEST_BYTES_MAX`]).
    #[serde(alias = "max_frame_bytes")]
    pub frame_bytes_max: usize,
    /// Concurrent client connections per node; more are refused.
    #[serde(alias = "max_connections")]
    pub connections_max: usize,
    /// Concurrent client connections of one user (one credential's user name) per node;
    /// more are refused, so one credential cannot take the node's slots.
    pub connections_per_user_max: usize,
    /// Bytes of stored messages a node holds read for catch-ups and not yet handed to their
    /// connections; a catch-up read waits for room (see `service::catch_up`).
    pub catch_up_buffer_bytes: u64,
    /// Client connections catching up through a wide (1 MiB) send window at once; others
    /// catch up through their own 64 KiB one.
    pub catch_up_windows_max: usize,
    /// Sends in flight per node; more are answered `Throttled`. At least one whole batch.
    #[serde(alias = "max_inflight_sends")]
    pub inflight_sends_max: usize,
    /// Live-push buffer of one watched conversation, in messages (16..=65,536). Allocated
    /// whole when its first subscriber attaches (about 40 bytes a slot, and each slot keeps
    /// its last message), so it stays small: an idle attached client must cost little, and
    /// a subscriber further behind re-reads storage instead.
    pub push_buffer_messages: usize,
    /// Concurrent requests (streams) per client connection.
    #[serde(alias = "max_streams_per_connection")]
    pub streams_per_connection_max: u32,
    /// Sends per second of one user across the cluster (0: no limit; see `service::rates`) …
    pub user_sends_per_s: u32,
    /// … and the burst above that rate.
    pub user_sends_burst: u32,
    /// Sends per second into one conversation (0: no limit) …
    pub conversation_sends_per_s: u32,
    /// … and the burst above that rate.
    pub conversation_sends_burst: u32,
    /// Sends per second on one client connection (0: no limit) …
    pub connection_sends_per_s: u32,
    /// … and the burst above that rate.
    pub connection_sends_burst: u32,
    /// Sends a shard's leader keeps proposed and unanswered; beyond it, sends wait in one
    /// queue per conversation and are proposed in turn, deficit round robin (0: no window,
    /// every send is proposed at once, first come first served).
    pub shard_window_sends: u32,
    /// Sends that may wait per conversation on a shard's leader; more are `Throttled`.
    pub conversation_queue_sends: u32,
    /// A live subscriber this many messages behind its conversation's head is counted
    /// (`convoy_subscribers_lagging_total`) and logged (0: never).
    pub subscriber_lag_warn: u64,
    /// A follower this many log entries behind its shard's leader is flagged in `cluster
    /// status` and counted in `convoy_followers_lagging` (0: never).
    pub follower_lag_warn: u64,
    /// Client handshakes a node starts per second; more get a QUIC Retry (an unvalidated
    /// address) or a refusal, and the client backs off.
    pub handshakes_per_s: u32,
    /// Client handshakes a node runs at once; more are answered the same way.
    pub handshakes_in_flight_max: usize,
    /// Free bytes a node keeps on its data directory's filesystem: below it, client writes
    /// are refused (`Unavailable`: disk full) until space is freed, and below half of it log
    /// appends carrying client writes wait (0: no reserve; a write that then finds no space
    /// stops its shard's group on this node).
    pub disk_free_min_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            message_bytes_max: MESSAGE_BYTES_MAX,
            frame_bytes_max: FRAME_BYTES_DEFAULT,
            connections_max: CONNECTIONS_DEFAULT,
            connections_per_user_max: CONNECTIONS_PER_USER_DEFAULT,
            catch_up_buffer_bytes: CATCH_UP_BUFFER_BYTES_DEFAULT,
            catch_up_windows_max: CATCH_UP_WINDOWS_DEFAULT,
            inflight_sends_max: INFLIGHT_SENDS_DEFAULT,
            push_buffer_messages: PUSH_BUFFER_MESSAGES_DEFAULT,
            streams_per_connection_max: STREAMS_PER_CONNECTION_DEFAULT,
            user_sends_per_s: USER_SENDS_PER_S_DEFAULT,
            user_sends_burst: USER_SENDS_PER_S_DEFAULT * 2,
            conversation_sends_per_s: CONVERSATION_SENDS_PER_S_DEFAULT,
            conversation_sends_burst: CONVERSATION_SENDS_PER_S_DEFAULT * 2,
            connection_sends_per_s: CONNECTION_SENDS_PER_S_DEFAULT,
            connection_sends_burst: CONNECTION_SENDS_PER_S_DEFAULT * 2,
            shard_window_sends: SHARD_WINDOW_SENDS_DEFAULT,
            conversation_queue_sends: CONVERSATION_QUEUE_SENDS_DEFAULT,
            subscriber_lag_warn: SUBSCRIBER_LAG_WARN_DEFAULT,
            follower_lag_warn: FOLLOWER_LAG_WARN_DEFAULT,
            handshakes_per_s: HANDSHAKES_PER_S_DEFAULT,
            handshakes_in_flight_max: HANDSHAKES_IN_FLIGHT_DEFAULT,
            disk_free_min_bytes: DISK_FREE_MIN_BYTES_DEFAULT,
        }
    }
}

/// How shard moves run (`[admin]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bytes per second one snapshot stream may send (a moved replica catches up by
    /// snapshot once the log it needs is purged; so does a lagging follower). 0: no limit.
    pub move_bytes_per_s: u64,
    /// Moves copying data at once; more wait their turn at `adding`.
    pub concurrent_moves: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { move_bytes_per_s: 0, concurrent_moves: 2 }
    }
}

/// The cluster's default retention and how it is enforced (`[retention]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Keep at most this many newest messages per conversation (unset: no limit).
    pub max_messages: Option<u64>,
    /// Keep messages at most this old, e.g. "30d", "12h", "90s" (unset: no limit).
    pub max_age: Option<String>,
    /// Keep at most this many bytes per conversation, e.g. "512MiB" (unset: no limit).
    pub max_bytes: Option<String>,
    /// How often each shard's leader checks its conversations against their retention.
    pub check_interval_ms: u64,
    /// At most this many conversations of a shard are read per check; the next check goes
    /// on from there, so a shard of many conversations is gone through over several checks.
    pub conversations_per_check: usize,
    /// Give the space of trimmed messages back (flush and compact) once this many were
    /// trimmed on the node …
    pub reclaim_after_messages: u64,
    /// … or once the first of them was trimmed this long ago, in seconds.
    pub reclaim_after_s: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_messages: None,
            max_age: None,
            max_bytes: None,
            check_interval_ms: 1000,
            conversations_per_check: 1024,
            reclaim_after_messages: 100_000,
            reclaim_after_s: 60,
        }
    }
}

impl RetentionConfig {
    /// The cluster's default retention (checked by [`Config::parse`]).
    pub fn default_policy(&self) -> Result<Retention> {
        let policy = Retention {
            max_messages: self.max_messages,
            max_age_ms: self.max_age.as_deref().map(parse_duration_ms).transpose()?,
            max_bytes: self.max_bytes.as_deref().map(parse_bytes).transpose()?,
        };
        policy.validate().map_err(|m| Error::Config(format!("[retention]: {m}")))?;
        Ok(policy)
    }
}

/// Parses a duration such as `500ms`, `90s`, `15m`, `12h`, `30d` or `2w` into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || Error::Config(format!("{text:?} is not a duration like 500ms, 90s, 15m, 12h, 30d or 2w"));
    let n: u64 = number.parse().map_err(|_| bad())?;
    let per: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(per).ok_or_else(bad)
}

/// Parses a size such as `4096`, `64KiB`, `512MiB`, `2GiB` or `1GB` into bytes.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad = || Error::Config(format!("{text:?} is not a size like 4096, 64KiB, 512MiB, 2GiB or 1GB"));
    let n: u64 = number.parse().map_err(|_| bad())?;
    let per: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(per).ok_or_else(bad)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_shards")]
    shards: u32,
    #[serde(default = "default_rf")]
    replication_factor: usize,
    #[serde(default = "default_tls_dir")]
    tls_dir: PathBuf,
    /// Where the CA keys live: the operator's, never read by a node (default: `ca` beside
    /// `tls_dir`).
    #[serde(default)]
    ca_dir: Option<PathBuf>,
    #[serde(default)]
    raft: RaftConfig,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    retention: RetentionConfig,
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default)]
    worker_threads: usize,
    nodes: Vec<NodeConfig>,
}

/// The shard count when `cluster.toml` names none. Chosen from the per-message costs
/// (`docs/performance.md`, "How many shards"): each shard is a Raft group whose replication
/// rounds cost CPU whatever they carry, and 8 spread leaders over 3 or 5 nodes as evenly as 16.
pub const DEFAULT_SHARDS: u32 = 8;

fn default_shards() -> u32 {
    DEFAULT_SHARDS
}
fn default_rf() -> usize {
    3
}
fn default_tls_dir() -> PathBuf {
    PathBuf::from("data/tls")
}

/// A validated cluster description.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (for messages and for spawning nodes).
    pub path: PathBuf,
    pub shards: u32,
    pub replication_factor: usize,
    pub tls_dir: PathBuf,
    /// The CA keys (`convoy tls init`, `convoy user add`); nodes never read it.
    pub ca_dir: PathBuf,
    pub raft: RaftConfig,
    pub limits: Limits,
    pub retention: RetentionConfig,
    pub admin: AdminConfig,
    /// The cluster's default retention, parsed from `retention`.
    pub retention_default: Retention,
    /// Async worker threads of each node process; 0 = one per core. Nodes sharing one
    /// machine (the local cluster) run best with fewer: every extra worker adds cross-thread
    /// wake-ups to each message's path.
    pub worker_threads: usize,
    pub nodes: Vec<NodeConfig>,
}

impl Config {
    /// Reads and validates a cluster file.
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        // Absolute, so that paths a node records (an interrupted snapshot install's spool file)
        // still name the same file when it is started again from another directory.
        let base = std::path::absolute(&base).unwrap_or(base);
        Config::parse(&text, &base, path)
    }

    /// Parses a cluster description; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path, path: &Path) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let mut nodes = raw.nodes;
        for node in &mut nodes {
            node.data_dir = resolve(&node.data_dir);
        }
        let config = Config {
            path: path.to_path_buf(),
            shards: raw.shards,
            replication_factor: raw.replication_factor,
            tls_dir: resolve(&raw.tls_dir),
            ca_dir: match &raw.ca_dir {
                Some(dir) => resolve(dir),
                None => resolve(&raw.tls_dir).parent().unwrap_or(Path::new(".")).join("ca"),
            },
            raft: raw.raft,
            retention_default: raw.retention.default_policy()?,
            retention: raw.retention,
            admin: raw.admin,
            limits: raw.limits,
            worker_threads: raw.worker_threads,
            nodes,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Config(m));
        if self.shards == 0 || self.shards > SHARDS_MAX {
            return fail(format!("shards must be 1..={SHARDS_MAX}, got {}", self.shards));
        }
        if self.worker_threads > WORKER_THREADS_MAX {
            return fail(format!(
                "worker_threads must be 0 (one per core) ..= {WORKER_THREADS_MAX}, got {}",
                self.worker_threads
            ));
        }
        if self.nodes.is_empty() {
            return fail("at least one [[nodes]] entry is required".into());
        }
        if self.admin.concurrent_moves == 0 {
            return fail("admin.concurrent_moves must be at least 1".into());
        }
        // A new cluster forms on exactly `replication_factor` nodes (checked at formation);
        // nodes appended to the file afterwards join it holding no replica.
        if self.replication_factor == 0 || self.replication_factor > self.nodes.len() {
            return fail(format!(
                "replication_factor {} must be between 1 and the number of nodes ({})",
                self.replication_factor,
                self.nodes.len()
            ));
        }
        let ids: BTreeSet<u64> = self.nodes.iter().map(|n| n.id).collect();
        if ids.len() != self.nodes.len() || ids.contains(&0) {
            return fail("node ids must be unique and non-zero".into());
        }
        // A replica id carries its node in the low 32 bits (`raft::types::replica_id`): a
        // larger node id would share its replicas' ids with another node's.
        if let Some(id) = ids.iter().find(|&&id| id > NODE_ID_MAX) {
            return fail(format!("node id {id} is too large: node ids must be 1..={NODE_ID_MAX}"));
        }
        // QUIC (client and peer) listens on UDP and metrics on TCP: the two port spaces are
        // separate, so a metrics port may share its number with a QUIC port.
        let mut udp = BTreeSet::new();
        let mut tcp = BTreeSet::new();
        for n in &self.nodes {
            if !udp.insert(n.client_addr) || !udp.insert(n.peer_addr) {
                return fail(format!(
                    "node {}: client_addr and peer_addr (UDP) must be distinct from each other and from every other node's",
                    n.id
                ));
            }
            if n.metrics_addr.is_some_and(|m| !tcp.insert(m)) {
                return fail(format!("node {}: metrics_addr (TCP) must be distinct from every other node's", n.id));
            }
        }
        // Each node's data directory holds its store, its pid file and its log: two nodes on
        // one directory (or one inside the other) would take each other's.
        for (i, a) in self.nodes.iter().enumerate() {
            for b in &self.nodes[i + 1..] {
                if a.data_dir.starts_with(&b.data_dir) || b.data_dir.starts_with(&a.data_dir) {
                    return fail(format!(
                        "nodes {} and {}: data_dir must be separate directories, neither inside the other ({} and {})",
                        a.id,
                        b.id,
                        a.data_dir.display(),
                        b.data_dir.display()
                    ));
                }
            }
        }
        let l = &self.limits;
        if l.message_bytes_max == 0 || l.message_bytes_max > MESSAGE_BYTES_MAX {
            return fail(format!("limits.message_bytes_max must be 1..={MESSAGE_BYTES_MAX}"));
        }
        if l.frame_bytes_max < l.message_bytes_max + FRAME_OVERHEAD_BYTES_MIN {
            return fail("limits.frame_bytes_max must exceed message_bytes_max by at least 1 KiB".into());
        }
        // A client request becomes one Raft entry; replication frames hold at least one.
        if l.frame_bytes_max > REQUEST_BYTES_MAX {
            return fail(format!("limits.frame_bytes_max must be at most {REQUEST_BYTES_MAX}"));
        }
        if !(PUSH_BUFFER_MESSAGES_MIN..=PUSH_BUFFER_MESSAGES_MAX).contains(&l.push_buffer_messages) {
            return fail(format!(
                "limits.push_buffer_messages must be {PUSH_BUFFER_MESSAGES_MIN}..={PUSH_BUFFER_MESSAGES_MAX}"
            ));
        }
        if !(1..=CONNECTIONS_CEILING).contains(&l.connections_max) {
            return fail(format!("limits.connections_max must be 1..={CONNECTIONS_CEILING}"));
        }
        if !(1..=CONNECTIONS_CEILING).contains(&l.connections_per_user_max) {
            return fail(format!("limits.connections_per_user_max must be 1..={CONNECTIONS_CEILING}"));
        }
        // Below one batch's reserve no catch-up could read.
        if !(CATCH_UP_BUFFER_BYTES_MIN..=CATCH_UP_BUFFER_BYTES_CEILING).contains(&l.catch_up_buffer_bytes) {
            return fail(format!(
                "limits.catch_up_buffer_bytes must be {CATCH_UP_BUFFER_BYTES_MIN}..={CATCH_UP_BUFFER_BYTES_CEILING}"
            ));
        }
        if l.catch_up_windows_max > CONNECTIONS_CEILING {
            return fail(format!("limits.catch_up_windows_max must be at most {CONNECTIONS_CEILING}"));
        }
        // A batch takes one permit per send, all at once: fewer permits than a batch's sends
        // would throttle every full batch for ever.
        if !(SEND_BATCH_MAX..=INFLIGHT_SENDS_CEILING).contains(&l.inflight_sends_max) {
            return fail(format!("limits.inflight_sends_max must be {SEND_BATCH_MAX}..={INFLIGHT_SENDS_CEILING}"));
        }
        // A whole batch must fit the window and a conversation's queue, or it could only go
        // alone (the window) or never (the queue).
        let batch = SEND_BATCH_MAX as u32;
        let ceiling = INFLIGHT_SENDS_CEILING as u32;
        if l.shard_window_sends != 0 && !(batch..=ceiling).contains(&l.shard_window_sends) {
            return fail(format!("limits.shard_window_sends must be 0 (off) or {batch}..={ceiling}"));
        }
        if !(batch..=ceiling).contains(&l.conversation_queue_sends) {
            return fail(format!("limits.conversation_queue_sends must be {batch}..={ceiling}"));
        }
        if l.handshakes_per_s == 0
            || l.handshakes_in_flight_max == 0
            || l.handshakes_in_flight_max > CONNECTIONS_CEILING
        {
            return fail(format!(
                "limits.handshakes_per_s must be at least 1 and limits.handshakes_in_flight_max 1..={CONNECTIONS_CEILING}"
            ));
        }
        if !(STREAMS_PER_CONNECTION_FLOOR..=STREAMS_PER_CONNECTION_CEILING).contains(&l.streams_per_connection_max) {
            return fail(format!(
                "limits.streams_per_connection_max must be {STREAMS_PER_CONNECTION_FLOOR}..={STREAMS_PER_CONNECTION_CEILING} \
                 (a client keeps send requests and follows on one connection)"
            ));
        }
        let k = &self.retention;
        if k.check_interval_ms == 0 || k.reclaim_after_messages == 0 || k.conversations_per_check == 0 {
            return fail(
                "retention.check_interval_ms, retention.conversations_per_check and retention.reclaim_after_messages \
                 must be at least 1"
                    .into(),
            );
        }
        let r = &self.raft;
        // Bounded first, so that the sums below cannot overflow; a shard whose leader died
        // elects a new one an election timeout later, so a timeout of hours is a mistake.
        let timings = [
            ("heartbeat_ms", r.heartbeat_ms),
            ("heartbeat_min_interval_ms", r.heartbeat_min_interval_ms),
            ("election_timeout_ms_min", r.election_timeout_ms_min),
            ("election_timeout_ms_max", r.election_timeout_ms_max),
        ];
        if let Some((name, ms)) = timings.iter().find(|(_, ms)| *ms > RAFT_TIMING_MS_MAX) {
            return fail(format!("raft.{name} must be at most {RAFT_TIMING_MS_MAX} (ms), got {ms}"));
        }
        if r.heartbeat_ms == 0 || r.election_timeout_ms_min <= r.heartbeat_ms * 3 {
            return fail("raft.election_timeout_ms_min must exceed 3 heartbeats".into());
        }
        // A suppressed heartbeat goes out at the first tick (a fifth of the interval) after
        // both intervals: that must come before any follower's election timeout.
        let latest_heartbeat = r.heartbeat_ms + r.heartbeat_min_interval_ms + r.heartbeat_ms.div_ceil(4);
        if latest_heartbeat >= r.election_timeout_ms_min {
            return fail(
                "raft.heartbeat_ms + raft.heartbeat_min_interval_ms (+ a quarter heartbeat) must stay below \
                 raft.election_timeout_ms_min"
                    .into(),
            );
        }
        if r.election_timeout_ms_max <= r.election_timeout_ms_min {
            return fail("raft.election_timeout_ms_max must exceed the minimum".into());
        }
        if r.append_frames_in_flight > APPEND_FRAMES_MAX {
            return fail(format!(
                "raft.append_frames_in_flight must be 0 (an exchange per group) ..= {APPEND_FRAMES_MAX}, got {}",
                r.append_frames_in_flight
            ));
        }
        if r.quiesce_after_ms != 0 && r.quiesce_after_ms < 2 * r.heartbeat_ms {
            return fail(format!(
                "raft.quiesce_after_ms must be 0 (never quiesce) or at least twice raft.heartbeat_ms, got {}",
                r.quiesce_after_ms
            ));
        }
        Ok(())
    }

    /// The node with this id.
    pub fn node(&self, id: u64) -> Result<&NodeConfig> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| Error::Config(format!("node {id} is not in {}", self.path.display())))
    }

    /// Node ids in ascending order.
    pub fn node_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
shards = 8
replication_factor = 3
[[nodes]]
id = 1
client_addr = "127.0.0.1:7101"
peer_addr = "127.0.0.1:7201"
data_dir = "data/node1"
[[nodes]]
id = 2
client_addr = "127.0.0.1:7102"
peer_addr = "127.0.0.1:7202"
data_dir = "/abs/node2"
[[nodes]]
id = 3
client_addr = "127.0.0.1:7103"
peer_addr = "127.0.0.1:7203"
data_dir = "data/node3"
"#;

    #[test]
    fn resolves_relative_paths_against_the_file() {
        let c = Config::parse(SAMPLE, Path::new("/etc/convoy"), Path::new("/etc/convoy/c.toml")).expect("valid");
        assert_eq!(c.nodes[0].data_dir, PathBuf::from("/etc/convoy/data/node1"));
        assert_eq!(c.nodes[1].data_dir, PathBuf::from("/abs/node2"));
        assert_eq!(c.tls_dir, PathBuf::from("/etc/convoy/data/tls"));
        assert_eq!(c.shards, 8);
        assert_eq!(c.limits.message_bytes_max, 65536);
    }

    /// A config named by a relative path gives absolute paths: what a node records stays
    /// right whatever directory it is started from next.
    #[test]
    fn a_config_loaded_by_a_relative_path_gives_absolute_paths() {
        let dir = tempfile::tempdir_in(".").expect("a directory under the current one");
        std::fs::write(dir.path().join("c.toml"), SAMPLE).expect("write the config");
        let name = dir.path().file_name().expect("a name");
        let c = Config::load(&Path::new(name).join("c.toml")).expect("valid");
        assert!(c.nodes[0].data_dir.is_absolute() && c.tls_dir.is_absolute(), "{:?}", c.nodes[0].data_dir);
        let here = std::env::current_dir().expect("cwd");
        assert_eq!(c.nodes[0].data_dir, here.join(name).join("data/node1"));
    }

    #[test]
    fn rejects_duplicate_ids_and_bad_limits() {
        let dup = SAMPLE.replace("id = 2", "id = 1");
        assert!(Config::parse(&dup, Path::new("."), Path::new("c.toml")).is_err());
        let big = format!("{SAMPLE}\n[limits]\nmessage_bytes_max = 70000\n");
        let err = Config::parse(&big, Path::new("."), Path::new("c.toml")).expect_err("too big");
        assert!(err.to_string().contains("message_bytes_max"), "{err}");
        let frame = format!("{SAMPLE}\n[limits]\nframe_bytes_max = 33554432\n");
        let err = Config::parse(&frame, Path::new("."), Path::new("c.toml")).expect_err("too big");
        assert!(err.to_string().contains("frame_bytes_max must be at most"), "{err}");
        let huge = format!("{SAMPLE}\n[limits]\ncatch_up_buffer_bytes = {}\n", (1u64 << 40) + 1);
        let err = Config::parse(&huge, Path::new("."), Path::new("c.toml")).expect_err("too big");
        assert!(err.to_string().contains("catch_up_buffer_bytes must be 524288..="), "{err}");
        let small = format!("{SAMPLE}\n[limits]\ncatch_up_buffer_bytes = 524287\n");
        let err = Config::parse(&small, Path::new("."), Path::new("c.toml")).expect_err("too small");
        assert!(err.to_string().contains("catch_up_buffer_bytes must be 524288..="), "{err}");
        for buffer in [0, 15, 65_537] {
            let push = format!("{SAMPLE}\n[limits]\npush_buffer_messages = {buffer}\n");
            let err = Config::parse(&push, Path::new("."), Path::new("c.toml")).expect_err("out of range");
            assert!(err.to_string().contains("push_buffer_messages must be 16..=65536"), "{err}");
        }
        for (limit, value, says) in [
            ("inflight_sends_max", 255, "inflight_sends_max must be 256..="),
            ("connections_max", 0, "connections_max must be 1..="),
            ("connections_max", 1 << 21, "connections_max must be 1..="),
            ("connections_per_user_max", 0, "connections_per_user_max must be 1..="),
            ("connections_per_user_max", 1 << 21, "connections_per_user_max must be 1..="),
            ("catch_up_windows_max", 1 << 21, "catch_up_windows_max must be at most"),
            ("streams_per_connection_max", 0, "streams_per_connection_max must be 64..="),
            ("streams_per_connection_max", 63, "streams_per_connection_max must be 64..="),
            ("shard_window_sends", 255, "shard_window_sends must be 0 (off) or 256..="),
            ("conversation_queue_sends", 0, "conversation_queue_sends must be 256..="),
            ("handshakes_per_s", 0, "handshakes_per_s must be at least 1"),
            ("handshakes_in_flight_max", 0, "handshakes_in_flight_max 1..="),
        ] {
            let text = format!("{SAMPLE}\n[limits]\n{limit} = {value}\n");
            let err = Config::parse(&text, Path::new("."), Path::new("c.toml")).expect_err("out of range");
            assert!(err.to_string().contains(says), "{limit} = {value}: {err}");
        }
        let unknown = format!("bogus = 1\n{SAMPLE}");
        assert!(Config::parse(&unknown, Path::new("."), Path::new("c.toml")).is_err());
    }

    #[test]
    fn each_node_has_a_data_dir_of_its_own() {
        let parse = |text: &str| Config::parse(text, Path::new("/etc/convoy"), Path::new("c.toml"));
        for (dir, same) in [("data/node1", true), ("data/node1/sub", true), ("data", true), ("data/node10", false)] {
            let text = SAMPLE.replace("data_dir = \"data/node3\"", &format!("data_dir = \"{dir}\""));
            match (parse(&text), same) {
                (Err(e), true) => {
                    let e = e.to_string();
                    assert!(e.contains("nodes 1 and 3: data_dir must be separate directories"), "{dir}: {e}");
                }
                (Ok(c), false) => assert_eq!(c.nodes[2].data_dir, PathBuf::from("/etc/convoy").join(dir)),
                (other, _) => panic!("{dir}: {other:?}"),
            }
        }
        // The same directory spelled absolute and relative is the same directory.
        let abs = SAMPLE.replace("data_dir = \"data/node3\"", "data_dir = \"/etc/convoy/data/node1\"");
        assert!(parse(&abs).is_err());
    }

    // QUIC listens on UDP and metrics on TCP, so a metrics port may reuse a QUIC port's
    // number (the test clusters' ports are picked per protocol and can meet so); two QUIC
    // addresses, or two metrics addresses, may not be the same.
    #[test]
    fn addresses_are_distinct_per_protocol() {
        let shared = SAMPLE.replace(
            "client_addr = \"127.0.0.1:7102\"",
            "client_addr = \"127.0.0.1:7102\"\nmetrics_addr = \"127.0.0.1:7101\"",
        );
        let c = Config::parse(&shared, Path::new("."), Path::new("c.toml")).expect("UDP 7101 and TCP 7101 differ");
        assert_eq!(c.nodes[1].metrics_addr, Some("127.0.0.1:7101".parse().expect("an address")));
        let udp = SAMPLE.replace("peer_addr = \"127.0.0.1:7202\"", "peer_addr = \"127.0.0.1:7101\"");
        let err = Config::parse(&udp, Path::new("."), Path::new("c.toml")).expect_err("two QUIC listeners");
        assert!(err.to_string().contains("node 2: client_addr and peer_addr (UDP) must be distinct"), "{err}");
        let tcp = SAMPLE
            .replace(
                "client_addr = \"127.0.0.1:7102\"",
                "client_addr = \"127.0.0.1:7102\"\nmetrics_addr = \"127.0.0.1:9000\"",
            )
            .replace(
                "client_addr = \"127.0.0.1:7103\"",
                "client_addr = \"127.0.0.1:7103\"\nmetrics_addr = \"127.0.0.1:9000\"",
            );
        let err = Config::parse(&tcp, Path::new("."), Path::new("c.toml")).expect_err("two metrics listeners");
        assert!(err.to_string().contains("node 3: metrics_addr (TCP) must be distinct"), "{err}");
    }

    // Nodes added after formation make the file longer than the replication factor; a
    // factor above the node count, or zero, cannot be kept.
    #[test]
    fn the_replication_factor_is_at_most_the_node_count() {
        let two = SAMPLE.replace("replication_factor = 3", "replication_factor = 2");
        assert_eq!(
            Config::parse(&two, Path::new("."), Path::new("c.toml")).expect("2 of 3 nodes").replication_factor,
            2
        );
        for rf in [0, 4] {
            let text = SAMPLE.replace("replication_factor = 3", &format!("replication_factor = {rf}"));
            let err = Config::parse(&text, Path::new("."), Path::new("c.toml")).expect_err("cannot be kept");
            assert!(err.to_string().contains("must be between 1 and the number of nodes (3)"), "{err}");
        }
    }

    #[test]
    fn quiesce_after_is_zero_or_two_heartbeats_at_least() {
        let parse = |text: String| Config::parse(&text, Path::new("."), Path::new("c.toml"));
        assert_eq!(parse(SAMPLE.to_string()).expect("default").raft.quiesce_after_ms, 1000);
        let never = parse(format!("{SAMPLE}\n[raft]\nquiesce_after_ms = 0\n")).expect("0: never");
        assert_eq!(never.raft.quiesce_after_ms, 0);
        let err = parse(format!("{SAMPLE}\n[raft]\nquiesce_after_ms = 150\n")).expect_err("below two heartbeats");
        assert!(err.to_string().contains("quiesce_after_ms must be 0"), "{err}");
    }

    #[test]
    fn append_frames_in_flight_is_bounded() {
        let parse = |text: String| Config::parse(&text, Path::new("."), Path::new("c.toml"));
        assert_eq!(parse(SAMPLE.to_string()).expect("default").raft.append_frames_in_flight, 2);
        let lanes = parse(format!("{SAMPLE}\n[raft]\nappend_frames_in_flight = 0\n")).expect("0: a lane per group");
        assert_eq!(lanes.raft.append_frames_in_flight, 0);
        let err = parse(format!("{SAMPLE}\n[raft]\nappend_frames_in_flight = 9\n")).expect_err("above the maximum");
        assert!(err.to_string().contains("append_frames_in_flight must be 0"), "{err}");
    }

    // A suppressed heartbeat must still come before any election timeout.
    #[test]
    fn heartbeat_suppression_stays_below_the_election_timeout() {
        let ok = format!("{SAMPLE}\n[raft]\nheartbeat_min_interval_ms = 100\n");
        let c = Config::parse(&ok, Path::new("."), Path::new("c.toml")).expect("100 + 100 + 25 < 1000");
        assert_eq!(c.raft.heartbeat_min_interval_ms, 100);
        let late = format!("{SAMPLE}\n[raft]\nheartbeat_min_interval_ms = 880\n");
        let err = Config::parse(&late, Path::new("."), Path::new("c.toml")).expect_err("100 + 880 + 25 >= 1000");
        assert!(err.to_string().contains("heartbeat_min_interval_ms"), "{err}");
    }

    // Timings past a minute are refused before any arithmetic on them: sums and products of
    // values near i64::MAX (the largest TOML integer) overflow
    // (a panic in a debug build) and could pass the heartbeat check in a release
    // one, and an election timeout of hours leaves a shard leaderless that long.
    #[test]
    fn raft_timings_are_bounded_before_they_are_added() {
        let parse = |text: String| Config::parse(&text, Path::new("."), Path::new("c.toml"));
        for (name, value) in [
            ("heartbeat_min_interval_ms", "9223372036854775807"),
            ("heartbeat_ms", "9223372036854775807"),
            ("election_timeout_ms_min", "60001"),
            ("election_timeout_ms_max", "1000000000000"),
        ] {
            let err = parse(format!("{SAMPLE}\n[raft]\n{name} = {value}\n")).expect_err("too long");
            assert!(err.to_string().contains(&format!("raft.{name} must be at most 60000")), "{name}: {err}");
        }
        let longest =
            parse(format!("{SAMPLE}\n[raft]\nelection_timeout_ms_min = 30000\nelection_timeout_ms_max = 60000\n"));
        assert_eq!(longest.expect("a minute is allowed").raft.election_timeout_ms_max, 60_000);
    }

    // A replica id keeps its node in its low 32 bits: node 2^32 + 1 would be node 1's.
    #[test]
    fn node_ids_fit_in_32_bits() {
        let parse = |text: String| Config::parse(&text, Path::new("."), Path::new("c.toml"));
        let err = parse(SAMPLE.replace("id = 3", "id = 4294967297")).expect_err("too large");
        assert!(err.to_string().contains("node id 4294967297 is too large: node ids must be 1..=4294967295"), "{err}");
        let largest = parse(SAMPLE.replace("id = 3", "id = 4294967295")).expect("the largest id");
        assert_eq!(largest.node_ids(), vec![1, 2, 4294967295]);
    }

    // The file the README's set-up runs loads, with the reserve and retention it documents.
    #[test]
    fn the_shipped_cluster_toml_loads() {
        let c = Config::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/cluster.toml"))).expect("it loads");
        assert_eq!(c.node_ids(), vec![1, 2, 3]);
        assert_eq!(c.limits.disk_free_min_bytes, 128 << 20);
        assert!(c.retention_default.keeps_all(), "nothing is deleted unless a limit is set");
    }

    #[test]
    fn retention_reads_durations_and_sizes() {
        let text = format!("{SAMPLE}\n[retention]\nmax_messages = 100\nmax_age = \"30d\"\nmax_bytes = \"512MiB\"\n");
        let c = Config::parse(&text, Path::new("."), Path::new("c.toml")).expect("valid");
        let want = Retention { max_messages: Some(100), max_age_ms: Some(30 * 86_400_000), max_bytes: Some(512 << 20) };
        assert_eq!(c.retention_default, want);
        assert!(Config::parse(SAMPLE, Path::new("."), Path::new("c.toml"))
            .expect("valid")
            .retention_default
            .keeps_all());
        for (ok, ms) in [("500ms", 500), ("90s", 90_000), ("15m", 900_000), ("12h", 43_200_000), ("2w", 1_209_600_000)]
        {
            assert_eq!(parse_duration_ms(ok).expect(ok), ms);
        }
        for (ok, b) in [("4096", 4096), ("64KiB", 65_536), ("1GB", 1_000_000_000), ("2 GiB", 2 << 30)] {
            assert_eq!(parse_bytes(ok).expect(ok), b);
        }
        for bad in ["", "d", "10 parsecs", "-1s", "99999999999999999999w"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
        for bad in ["", "1.5GiB", "12 bits", "99999999999999999999TiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        for (key, value) in [("max_messages", "0"), ("max_age", "\"0s\""), ("max_bytes", "\"0\"")] {
            let text = format!("{SAMPLE}\n[retention]\n{key} = {value}\n");
            let err = Config::parse(&text, Path::new("."), Path::new("c.toml")).expect_err("zero keeps nothing");
            assert!(err.to_string().contains("at least 1"), "{key}: {err}");
        }
    }

    // Files written before the keys were renamed to `*_max` still load, to the same values.
    #[test]
    fn the_old_key_names_still_load() {
        let old = format!(
            "{SAMPLE}\n[raft]\nelection_timeout_min_ms = 900\nelection_timeout_max_ms = 1900\n\
             max_payload_entries = 64\nmax_in_snapshot_log_to_keep = 7\n[limits]\nmax_message_bytes = 1000\n\
             max_frame_bytes = 65536\nmax_connections = 10\nmax_inflight_sends = 300\nmax_streams_per_connection = 80\n"
        );
        let c = Config::parse(&old, Path::new("."), Path::new("c.toml")).expect("old names load");
        let r = &c.raft;
        assert_eq!((r.election_timeout_ms_min, r.election_timeout_ms_max), (900, 1900));
        assert_eq!((r.payload_entries_max, r.snapshot_log_kept_max), (64, 7));
        let l = &c.limits;
        assert_eq!((l.message_bytes_max, l.frame_bytes_max, l.connections_max), (1000, 65536, 10));
        assert_eq!((l.inflight_sends_max, l.streams_per_connection_max), (300, 80));
    }
}
