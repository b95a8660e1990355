//! Test glue: real `convoy node` processes on loopback, ports from the OS, a temp
//! directory per cluster, and helpers that poll with deadlines instead of sleeping.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use convoy::client::Client;
use convoy::config::Config;

pub const BIN: &str = env!("CARGO_BIN_EXE_convoy");

/// Extra `cluster.toml` settings for a test.
#[derive(Clone)]
pub struct Tweaks {
    pub shards: u32,
    pub snapshot_logs_since_last: u64,
    pub max_in_snapshot_log_to_keep: u64,
    pub max_message_bytes: usize,
}

impl Default for Tweaks {
    fn default() -> Self {
        Tweaks {
            shards: 4,
            snapshot_logs_since_last: 20_000,
            max_in_snapshot_log_to_keep: 5_000,
            max_message_bytes: 65536,
        }
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub config: Config,
    children: Vec<(u64, Option<Child>)>,
}

fn free_port() -> u16 {
    // QUIC is UDP: ask the OS for a free UDP port on loopback.
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    s.local_addr().expect("local addr").port()
}

impl TestCluster {
    /// Writes a cluster file for three nodes and starts them; waits for leaders.
    pub fn start(t: Tweaks) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut toml = format!(
            "shards = {}\nreplication_factor = 3\ntls_dir = \"tls\"\n[raft]\nheartbeat_ms = 100\n\
             election_timeout_min_ms = 800\nelection_timeout_max_ms = 1600\nsnapshot_logs_since_last = {}\n\
             max_in_snapshot_log_to_keep = {}\npurge_batch_size = 1\n[limits]\nmax_message_bytes = {}\n",
            t.shards, t.snapshot_logs_since_last, t.max_in_snapshot_log_to_keep, t.max_message_bytes
        );
        for id in 1..=3 {
            toml.push_str(&format!(
                "[[nodes]]\nid = {id}\nclient_addr = \"127.0.0.1:{}\"\npeer_addr = \"127.0.0.1:{}\"\ndata_dir = \"node{id}\"\n",
                free_port(),
                free_port()
            ));
        }
        let config_path = dir.path().join("cluster.toml");
        std::fs::write(&config_path, toml).expect("write cluster.toml");
        let config = Config::load(&config_path).expect("valid test config");
        convoy::net::tls::ensure_material(&config).expect("tls material");
        let mut c = TestCluster { dir, config_path, config, children: Vec::new() };
        for id in 1..=3 {
            c.spawn(id);
        }
        c
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}.log"))
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.config.node(id).expect("node").data_dir.clone()
    }

    /// Starts node `id` (again).
    pub fn spawn(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(id)).expect("log");
        let child = Command::new(BIN)
            .args(["node", "--config"])
            .arg(&self.config_path)
            .args(["--id", &id.to_string()])
            .env("CONVOY_LOG", std::env::var("CONVOY_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn convoy node");
        self.children.retain(|(i, _)| *i != id);
        self.children.push((id, Some(child)));
    }

    /// `kill -9` node `id` and reap it.
    pub fn kill(&mut self, id: u64) {
        for (i, child) in &mut self.children {
            if *i == id {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }

    pub fn restart(&mut self, id: u64) {
        self.kill(id);
        self.spawn(id);
    }

    /// Deletes node `id`'s data (it must be stopped).
    pub fn wipe(&self, id: u64) {
        let d = self.data_dir(id);
        if d.exists() {
            std::fs::remove_dir_all(&d).expect("wipe data dir");
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.config).expect("client")
    }

    /// Waits until every listed node reports the same leader for every shard.
    pub async fn wait_ready(&self, nodes: &[u64], within: Duration) {
        let client = self.client();
        let deadline = Instant::now() + within;
        loop {
            match client.agreed_leaders(nodes).await {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("cluster not ready within {within:?}: {e}\n{}", self.logs_tail())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The leader of `shard`, as every listed node reports it.
    pub async fn leader_of(&self, shard: u32, nodes: &[u64], within: Duration) -> u64 {
        let client = self.client();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(ls) = client.agreed_leaders(nodes).await {
                return ls[shard as usize];
            }
            assert!(Instant::now() < deadline, "no agreed leader for shard {shard}\n{}", self.logs_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for id in 1..=3 {
            let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(15);
            out.push_str(&format!("--- node{id}.log (last lines)\n{}\n", lines[start..].join("\n")));
        }
        out
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::env::var_os("CONVOY_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test cluster directory {}", self.dir.path().display());
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            let _ = dir.keep();
        }
        for (_, child) in &mut self.children {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
