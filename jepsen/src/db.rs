//! The system under test: three real `convoy node` processes on distinct loopback addresses
//! (127.0.0.11–13) inside the run's private network namespace, each optionally on a
//! [`crate::lossyfs`] mount (for power failures) and under libfaketime (for clock faults).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use convoy::client::Client;
use convoy::config::Config;
use tokio::process::{Child, Command};

use crate::lossyfs::{self, LossyMount};

/// Where libfaketime lives on Debian.
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

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
}

/// One node process.
struct NodeProc {
    child: Option<Child>,
    paused: bool,
}

/// The running cluster.
pub struct Db {
    pub opts: DbOptions,
    pub config: Config,
    pub config_path: PathBuf,
    nodes: BTreeMap<u64, NodeProc>,
    mounts: BTreeMap<u64, LossyMount>,
}

pub fn node_ip(id: u64) -> String {
    format!("127.0.0.{}", 10 + id)
}

impl Db {
    /// Writes the cluster file, prepares data directories (and lossy mounts) and starts
    /// every node.
    pub async fn setup(opts: DbOptions) -> Result<Db> {
        std::fs::create_dir_all(&opts.store)?;
        let mut toml = format!(
            "shards = {}\nreplication_factor = 3\ntls_dir = \"tls\"\n[raft]\nheartbeat_ms = 100\n\
             election_timeout_min_ms = 1000\nelection_timeout_max_ms = 2000\nsnapshot_logs_since_last = 2000\n\
             max_in_snapshot_log_to_keep = 500\npurge_batch_size = 100\n",
            opts.shards
        );
        for id in 1..=3u64 {
            let ip = node_ip(id);
            toml.push_str(&format!(
                "[[nodes]]\nid = {id}\nclient_addr = \"{ip}:7101\"\npeer_addr = \"{ip}:7201\"\ndata_dir = \"n{id}/data\"\n"
            ));
        }
        let config_path = opts.store.join("cluster.toml");
        std::fs::write(&config_path, toml)?;
        let config = Config::load(&config_path)?;
        convoy::net::tls::ensure_material(&config)?;
        let mut mounts = BTreeMap::new();
        for n in &config.nodes {
            // The checker assumes every node starts empty: on an earlier run's data the same
            // seed's client ids would find their own old sends as duplicates.
            let backing = n.data_dir.parent().expect("data dir has a parent").join("backing");
            for dir in [&n.data_dir, &backing] {
                if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
                    bail!(
                        "{} holds data from an earlier run; a run starts from empty nodes (remove it, or pass another --store)",
                        dir.display()
                    );
                }
            }
            std::fs::create_dir_all(&n.data_dir)?;
            if opts.lossy {
                std::fs::create_dir_all(&backing)?;
                let mount = lossyfs::mount(&backing, &n.data_dir)
                    .with_context(|| format!("mounting a lossy filesystem at {}", n.data_dir.display()))?;
                mounts.insert(n.id, mount);
            }
            if opts.faketime {
                std::fs::write(faketime_file(&opts.store, n.id), "+0\n")?;
            }
        }
        let mut db = Db { opts, config, config_path, nodes: BTreeMap::new(), mounts };
        for id in 1..=3 {
            db.start(id)?;
        }
        Ok(db)
    }

    pub fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.config)?)
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.opts.store.join(format!("n{id}/node.log"))
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.opts.store.join(format!("n{id}/data"))
    }

    /// Whether node `id` has a live (possibly paused) process.
    pub fn is_running(&mut self, id: u64) -> bool {
        match self.nodes.get_mut(&id).and_then(|n| n.child.as_mut()) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts node `id` if it is not running.
    pub fn start(&mut self, id: u64) -> Result<bool> {
        if self.is_running(id) {
            return Ok(false);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(id))?;
        let mut cmd = Command::new(&self.opts.convoy_bin);
        cmd.args(["node", "--config"])
            .arg(&self.config_path)
            .args(["--id", &id.to_string()])
            .env("CONVOY_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(bug) = &self.opts.planted_bug {
            cmd.env("CONVOY_PLANTED_BUG", bug);
        }
        if self.opts.faketime {
            cmd.env("LD_PRELOAD", FAKETIME_LIB)
                .env("FAKETIME_TIMESTAMP_FILE", faketime_file(&self.opts.store, id))
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = cmd.spawn().with_context(|| format!("spawning node {id}"))?;
        self.nodes.insert(id, NodeProc { child: Some(child), paused: false });
        Ok(true)
    }

    fn pid(&self, id: u64) -> Option<i32> {
        self.nodes.get(&id).and_then(|n| n.child.as_ref()).and_then(|c| c.id()).map(|p| p as i32)
    }

    fn signal(&self, id: u64, sig: i32) -> bool {
        match self.pid(id) {
            // SAFETY: kill(2) on a pid of a child we spawned and have not reaped.
            Some(pid) => unsafe { libc::kill(pid, sig) == 0 },
            None => false,
        }
    }

    /// `kill -9` node `id` and reap it.
    pub async fn kill(&mut self, id: u64) -> bool {
        let Some(node) = self.nodes.get_mut(&id) else { return false };
        let Some(mut child) = node.child.take() else { return false };
        let _ = child.start_kill();
        let _ = child.wait().await;
        node.paused = false;
        true
    }

    pub fn pause(&mut self, id: u64) -> bool {
        let ok = self.signal(id, libc::SIGSTOP);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused |= ok;
        }
        ok
    }

    pub fn resume(&mut self, id: u64) -> bool {
        let ok = self.signal(id, libc::SIGCONT);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused = false;
        }
        ok
    }

    pub fn paused(&self) -> Vec<u64> {
        self.nodes.iter().filter(|(_, n)| n.paused).map(|(id, _)| *id).collect()
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

    /// Waits until every node answers and all agree on a leader for every shard.
    pub async fn wait_ready(&self, within: Duration) -> Result<()> {
        let client = self.client()?;
        let deadline = Instant::now() + within;
        loop {
            match client.agreed_leaders(&client.node_ids()).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!("cluster not ready within {within:?}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Stops everything (processes, then mounts).
    pub async fn teardown(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.resume(id);
            self.kill(id).await;
        }
        self.mounts.clear();
    }
}

fn faketime_file(store: &Path, id: u64) -> PathBuf {
    store.join(format!("n{id}/faketime"))
}

/// The leader of `shard` as any one node reports it.
pub async fn leader_of(client: &Client, shard: u32) -> Option<u64> {
    for id in client.node_ids() {
        if let Ok(s) = client.status(id).await {
            if let Some(l) = s.shards.iter().find(|x| x.shard == shard).and_then(|x| x.leader) {
                return Some(l);
            }
        }
    }
    None
}
