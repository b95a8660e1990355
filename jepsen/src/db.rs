//! The system under test: three real `convoy node` processes on distinct loopback addresses
//! (127.0.0.11–13) inside the run's private network namespace, each optionally on a
//! [`crate::lossyfs`] mount (for power failures) and under libfaketime (for clock faults).
//!
//! The processes are testkit's [`LocalCluster`] (cluster.toml, TLS material, spawn, kill,
//! signals, readiness); what is jepsen's own stays here: the lossy mounts, the clock files,
//! and the refusal to run on an earlier run's data.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use convoy::client::Client;
use convoy::config::Config;
use testkit::{Addressing, ClusterSpec, Layout, LocalCluster, RaftTweaks, RetentionTweaks};

use crate::lossyfs::{self, LossyMount};

/// Where libfaketime lives on Debian.
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// Every node's client port (on its own address).
pub const CLIENT_PORT: u16 = 7101;
/// Every node's peer port (on its own address).
pub const PEER_PORT: u16 = 7201;
/// The nodes that form the cluster, with ids 1..=NODES.
pub const NODES: u64 = 3;
/// The node `membership` runs add after formation (the target moves need: with three
/// replicas per shard on three nodes, no shard has anywhere to go).
pub const SPARE: u64 = NODES + 1;

/// Options that shape the cluster.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub convoy_bin: PathBuf,
    pub store: PathBuf,
    pub shards: u32,
    /// Run nodes on lossy (power-failable) mounts.
    pub lossy: bool,
    /// Run nodes under libfaketime.
    pub faketime: bool,
    pub planted_bug: Option<String>,
    /// Messages kept per conversation, if any (checked every 500 ms, so trims are frequent).
    pub retention: Option<u64>,
    /// Set up for placement changes (`membership`): moves paced at [`MOVE_BYTES_PER_S`], and
    /// snapshots every [`MOVE_SNAPSHOT_EVERY`] entries, so that a move copies by a paced
    /// snapshot within the run rather than by the log alone.
    pub moves: bool,
}

/// `[admin] move_bytes_per_s` of a cluster set up for moves: a copy lasts seconds, as a real
/// one does, so faults land during it.
pub const MOVE_BYTES_PER_S: u64 = 4_000;
/// `snapshot_logs_since_last` of a cluster set up for moves (20 entries kept after one).
pub const MOVE_SNAPSHOT_EVERY: u64 = 100;

/// The running cluster.
pub struct Db {
    pub opts: DbOptions,
    /// Declared before `mounts`, so that dropping a `Db` kills the nodes before their
    /// filesystems are unmounted.
    cluster: LocalCluster,
    mounts: BTreeMap<u64, LossyMount>,
}

/// Node `id`'s address, 127.0.0.(10 + id).
pub fn node_addr(id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + id as u8))
}

/// Node `id`'s address as text (for firewall rules).
pub fn node_ip(id: u64) -> String {
    node_addr(id).to_string()
}

impl Db {
    /// Writes the cluster file, prepares data directories (and lossy mounts) and starts
    /// every node.
    pub async fn setup(opts: DbOptions) -> Result<Db> {
        let cluster = LocalCluster::create(spec(&opts))?;
        let mounts = BTreeMap::new();
        let mut db = Db { opts, cluster, mounts };
        for id in 1..=NODES {
            db.prepare(id)?;
            db.start(id)?;
        }
        Ok(db)
    }

    /// Node `id`'s data directory (on a lossy mount for power faults) and clock file.
    fn prepare(&mut self, id: u64) -> Result<()> {
        let data_dir = self.cluster.config().node(id).context("no such node")?.data_dir.clone();
        // The checker assumes every node starts empty: on an earlier run's data the same
        // seed's client ids would find their own old sends as duplicates.
        let backing = data_dir.parent().expect("data dir has a parent").join("backing");
        for dir in [&data_dir, &backing] {
            if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
                bail!(
                    "{} holds data from an earlier run; a run starts from empty nodes (remove it, or pass another --store)",
                    dir.display()
                );
            }
        }
        std::fs::create_dir_all(&data_dir)?;
        if self.opts.lossy {
            std::fs::create_dir_all(&backing)?;
            let mount = lossyfs::mount(&backing, &data_dir)
                .with_context(|| format!("mounting a lossy filesystem at {}", data_dir.display()))?;
            self.mounts.insert(id, mount);
        }
        if self.opts.faketime {
            std::fs::write(faketime_file(&self.opts.store, id), "+0\n")?;
        }
        Ok(())
    }

    /// Adds node [`SPARE`] to the cluster file, as an operator adding a node does, and
    /// starts it: it registers with the cluster and holds no replica until moves give it
    /// some.
    pub fn add_spare(&mut self) -> Result<u64> {
        let id = self.cluster.add_node()?;
        anyhow::ensure!(id == SPARE, "the spare node got id {id}, not {SPARE}");
        self.prepare(id)?;
        self.start(id)?;
        Ok(id)
    }

    /// Every node in the cluster file.
    pub fn node_ids(&self) -> Vec<u64> {
        self.cluster.node_ids()
    }

    /// A client with the admin credential.
    pub fn admin(&self) -> Result<Client> {
        self.cluster.admin()
    }

    /// The newest cluster map any node reports (see `convoy::admin::newest_map`).
    pub async fn cluster_map(&self) -> Result<convoy::placement::ClusterMap> {
        Ok(convoy::admin::newest_map(&self.statuses().await?))
    }

    /// What `convoy admin status` shows (leaders and each replica's lag), with the newest map.
    pub async fn view(&self) -> Result<(convoy::admin::ClusterView, convoy::placement::ClusterMap)> {
        let statuses = self.statuses().await?;
        Ok((convoy::admin::cluster_view(&statuses), convoy::admin::newest_map(&statuses)))
    }

    async fn statuses(&self) -> Result<Vec<(u64, Option<convoy::net::wire::NodeStatus>)>> {
        let admin = self.admin()?;
        let mut statuses = Vec::new();
        for id in self.node_ids() {
            let answer = tokio::time::timeout(Duration::from_secs(2), admin.status(id)).await;
            statuses.push((id, answer.ok().and_then(|a| a.ok())));
        }
        Ok(statuses)
    }

    /// The cluster's configuration.
    pub fn config(&self) -> &Config {
        self.cluster.config()
    }

    pub fn client(&self) -> Result<Client> {
        self.cluster.client()
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.cluster.log_path(id)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.cluster.data_dir(id)
    }

    /// Whether node `id` has a live (possibly paused) process.
    pub fn is_running(&mut self, id: u64) -> bool {
        self.cluster.is_running(id)
    }

    /// Starts node `id` if it is not running.
    pub fn start(&mut self, id: u64) -> Result<bool> {
        self.cluster.start(id)
    }

    /// Starts node `id` with `--rejoin` (a rebuild on an empty data directory).
    pub fn start_rejoin(&mut self, id: u64) -> Result<bool> {
        self.cluster.start_rejoin(id)
    }

    /// How node `id`'s process ended, if it has exited.
    pub fn exit_status(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        self.cluster.exit_status(id)
    }

    /// Sends `kill -9` to node `id` without reaping it (a process inside a held fsync can
    /// only finish dying once the fsync is answered).
    pub fn signal_kill(&mut self, id: u64) -> bool {
        self.cluster.signal(id, libc::SIGKILL)
    }

    /// Sends SIGTERM to node `id` (a clean stop) without waiting for it.
    pub fn signal_term(&mut self, id: u64) -> bool {
        self.cluster.signal(id, libc::SIGTERM)
    }

    /// Holds back node `id`'s fsyncs (see `LossyMount::hold_fsyncs`).
    pub fn hold_fsyncs(&self, id: u64) -> Result<()> {
        match self.mounts.get(&id) {
            Some(m) => {
                m.hold_fsyncs();
                Ok(())
            }
            None => bail!("node {id} is not on a lossy mount"),
        }
    }

    /// Deletes everything in node `id`'s data directory (through its mount, which stays); the
    /// node must be stopped. The cluster file and TLS material are not there.
    pub fn wipe(&mut self, id: u64) -> Result<u64> {
        if self.is_running(id) {
            bail!("node {id} is running");
        }
        let dir = self.data_dir(id);
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            removed += 1;
        }
        Ok(removed)
    }

    /// `kill -9` node `id` and reap it.
    pub fn kill(&mut self, id: u64) -> bool {
        self.cluster.kill(id)
    }

    pub fn pause(&mut self, id: u64) -> bool {
        self.cluster.pause(id)
    }

    pub fn resume(&mut self, id: u64) -> bool {
        self.cluster.resume(id)
    }

    pub fn paused(&self) -> Vec<u64> {
        self.cluster.paused()
    }

    /// Drops node `id`'s unsynced writes (it must be stopped). Returns bytes dropped.
    pub fn power_fail(&self, id: u64) -> Result<u64> {
        match self.mounts.get(&id) {
            Some(m) => Ok(m.power_fail().bytes_dropped),
            None => bail!("node {id} is not on a lossy mount"),
        }
    }

    /// Sets node `id`'s clock offset (libfaketime format, e.g. "+30s", "-5s", "+0").
    pub fn set_clock(&self, id: u64, offset: &str) -> Result<()> {
        Ok(std::fs::write(faketime_file(&self.opts.store, id), format!("{offset}\n"))?)
    }

    /// Waits until node `id` answers a status request (whatever it knows of leaders).
    pub async fn wait_answers(&self, id: u64, within: Duration) -> Result<()> {
        self.cluster.wait_answers(id, within).await
    }

    /// Waits until every node answers and all agree on a leader for every shard.
    pub async fn wait_ready(&self, within: Duration) -> Result<()> {
        self.cluster.wait_ready(&self.cluster.node_ids(), within).await.map(|_| ())
    }

    /// The leader of `shard` as any one node reports it (no waiting: a fault is injected now).
    pub async fn leader_of(&self, shard: u32) -> Option<u64> {
        self.cluster.reported_leader(shard).await
    }

    /// Stops everything (processes, then mounts).
    pub fn teardown(&mut self) {
        for id in self.cluster.node_ids() {
            self.resume(id);
            self.kill(id);
        }
        self.mounts.clear();
    }
}

/// The cluster jepsen runs: fixed addresses (the nemesis firewalls nodes apart by address),
/// one directory per node under the store (the lossy mount goes on its data directory, the
/// clock file beside it), the store kept after the run (it holds the report), and each
/// node's planted bug and libfaketime environment.
fn spec(opts: &DbOptions) -> ClusterSpec {
    let mut node_env = BTreeMap::new();
    for id in 1..=SPARE {
        let mut env = Vec::new();
        if let Some(bug) = &opts.planted_bug {
            env.push(("CONVOY_PLANTED_BUG".to_string(), bug.clone()));
        }
        if opts.faketime {
            env.extend([
                ("LD_PRELOAD".to_string(), FAKETIME_LIB.to_string()),
                ("FAKETIME_TIMESTAMP_FILE".to_string(), faketime_file(&opts.store, id).display().to_string()),
                ("FAKETIME_NO_CACHE".to_string(), "1".to_string()),
                ("FAKETIME_DONT_FAKE_MONOTONIC".to_string(), "1".to_string()),
            ]);
        }
        node_env.insert(id, env);
    }
    ClusterSpec {
        nodes: NODES,
        shards: opts.shards,
        raft: RaftTweaks {
            heartbeat_ms: Some(100),
            election_timeout_ms_min: Some(1000),
            election_timeout_ms_max: Some(2000),
            snapshot_logs_since_last: Some(if opts.moves { MOVE_SNAPSHOT_EVERY } else { 2000 }),
            snapshot_log_kept_max: Some(if opts.moves { 20 } else { 500 }),
            purge_batch_size: Some(100),
            ..RaftTweaks::default()
        },
        retention: RetentionTweaks {
            max_messages: opts.retention,
            check_interval_ms: opts.retention.map(|_| 500),
            ..RetentionTweaks::default()
        },
        addressing: Addressing::Fixed { ip_of: node_addr, client_port: CLIENT_PORT, peer_port: PEER_PORT },
        layout: Layout::PerNodeDir,
        dir: Some(opts.store.clone()),
        remove_dir_on_drop: false,
        log_filter: Some(convoy::node::LOG_DEFAULT.into()),
        node_env,
        convoy_bin: Some(opts.convoy_bin.clone()),
        move_bytes_per_s: opts.moves.then_some(MOVE_BYTES_PER_S),
        ..ClusterSpec::default()
    }
}

fn faketime_file(store: &Path, id: u64) -> PathBuf {
    store.join(format!("n{id}/faketime"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_keeps_jepsens_addresses_layout_and_environment() {
        let store = tempfile::tempdir().expect("tempdir");
        let bin = store.path().join("convoy");
        std::fs::write(&bin, "").expect("a stand-in binary");
        let opts = DbOptions {
            convoy_bin: bin,
            store: store.path().join("run"),
            shards: 4,
            lossy: false,
            faketime: true,
            planted_bug: Some("skip-dedup".into()),
            retention: Some(500),
            moves: false,
        };
        let moving = spec(&DbOptions { moves: true, ..opts.clone() });
        assert_eq!(moving.move_bytes_per_s, Some(MOVE_BYTES_PER_S));
        assert_eq!(moving.raft.snapshot_logs_since_last, Some(MOVE_SNAPSHOT_EVERY));
        assert_eq!(spec(&opts).move_bytes_per_s, None);
        let cluster = LocalCluster::create(spec(&opts)).expect("create");
        let config = cluster.config();
        assert_eq!(config.shards, 4);
        assert_eq!(config.retention_default.max_messages, Some(500));
        assert_eq!(config.retention.check_interval_ms, 500);
        assert_eq!((config.raft.election_timeout_ms_min, config.raft.purge_batch_size), (1000, 100));
        for n in &config.nodes {
            let ip = format!("127.0.0.1{}", n.id);
            assert_eq!(n.client_addr.to_string(), format!("{ip}:7101"));
            assert_eq!(n.peer_addr.to_string(), format!("{ip}:7201"));
            assert_eq!(n.data_dir, opts.store.join(format!("n{}/data", n.id)));
            assert_eq!(cluster.log_path(n.id), opts.store.join(format!("n{}/node.log", n.id)));
        }
        assert_eq!(node_ip(2), "127.0.0.12");
        let env = &spec(&opts).node_env[&3];
        assert!(env.contains(&("CONVOY_PLANTED_BUG".into(), "skip-dedup".into())), "{env:?}");
        let clock = faketime_file(&opts.store, 3).display().to_string();
        assert!(env.contains(&("FAKETIME_TIMESTAMP_FILE".into(), clock)), "{env:?}");
        drop(cluster);
        assert!(opts.store.join("cluster.toml").is_file(), "the store outlives the cluster");
    }
}
