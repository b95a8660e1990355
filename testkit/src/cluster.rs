//! [`LocalCluster`]: a [`ClusterSpec`] made real — its directory, cluster.toml and TLS
//! material — and the `convoy node` processes running it.
//!
//! Process control is synchronous and immediate: a start spawns and returns, a kill is
//! `SIGKILL` followed by reaping the child (so the node's files are released and its ports
//! free when `kill` returns). Readiness is asked of the nodes over the client protocol with a
//! deadline ([`LocalCluster::wait_ready`]), never assumed after a sleep.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use convoy::client::Client;
use convoy::config::Config;

use crate::spec::{ClusterSpec, TLS_DIR};
use crate::POLL_INTERVAL_MS;
use crate::TEST_USER;

/// Log lines per node that [`LocalCluster::logs_tail`] shows.
pub const LOG_TAIL_LINES: usize = 15;

/// One node's process, if it has one.
#[derive(Default)]
struct NodeProcess {
    child: Option<Child>,
    /// Stopped with `SIGSTOP` and not continued since.
    paused: bool,
}

/// A local cluster of `convoy node` processes described by a [`ClusterSpec`]. Dropping it
/// kills (and reaps) every process it started, then removes its directory if the spec says
/// so.
pub struct LocalCluster {
    spec: ClusterSpec,
    /// The directory when the cluster made it (a temporary one); `None` when it was given.
    temp: Option<tempfile::TempDir>,
    /// The cluster directory, absolute.
    dir: PathBuf,
    config: Config,
    bin: PathBuf,
    nodes: BTreeMap<u64, NodeProcess>,
}

impl LocalCluster {
    /// Prepares the cluster without starting a node: the directory, `cluster.toml` (with
    /// ports picked now for a loopback cluster) and the TLS material. Fails if the `convoy`
    /// binary cannot be found.
    pub fn create(spec: ClusterSpec) -> Result<LocalCluster> {
        let bin = crate::convoy_bin(spec.convoy_bin.as_deref())?;
        let (temp, dir) = match &spec.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                (None, std::path::absolute(d)?)
            }
            None => {
                let t = tempfile::Builder::new().prefix("convoy-cluster-").tempdir().context("a temp directory")?;
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let path = dir.join("cluster.toml");
        let text = spec.toml(&spec.addresses()?)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        let config = Config::load(&path).with_context(|| format!("loading {}", path.display()))?;
        convoy::net::tls::init(&config)
            .with_context(|| format!("creating TLS material under {}", dir.join(TLS_DIR).display()))?;
        convoy::net::tls::ensure_user(&config, TEST_USER, false).context("the test user's credential")?;
        let nodes = spec.node_ids().into_iter().map(|id| (id, NodeProcess::default())).collect();
        Ok(LocalCluster { spec, temp, dir, config, bin, nodes })
    }

    /// Appends a node to `cluster.toml` (the next id; fresh loopback ports, or the fixed
    /// addressing's address for that id), as an operator adding a node to a running cluster
    /// does, and makes its certificate; does not start it. Returns its id.
    pub fn add_node(&mut self) -> Result<u64> {
        use std::net::SocketAddr;
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        let (client_addr, peer_addr, metrics_addr) = match self.spec.addressing {
            crate::Addressing::Loopback => {
                let ports = crate::free_ports(2)?;
                let metrics = crate::free_tcp_ports(1)?;
                let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
                (SocketAddr::new(ip, ports[0]), SocketAddr::new(ip, ports[1]), Some(SocketAddr::new(ip, metrics[0])))
            }
            crate::Addressing::Fixed { ip_of, client_port, peer_port } => {
                (SocketAddr::new(ip_of(id), client_port), SocketAddr::new(ip_of(id), peer_port), None)
            }
        };
        let entry = crate::spec::NodeEntry {
            id,
            client_addr,
            peer_addr,
            data_dir: self.spec.layout.data_dir(id),
            metrics_addr,
        };
        #[derive(serde::Serialize)]
        struct Appended<'a> {
            nodes: [&'a crate::spec::NodeEntry; 1],
        }
        let path = self.config.path.clone();
        let mut text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        text.push('\n');
        text.push_str(&toml::to_string(&Appended { nodes: [&entry] })?);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        self.config = Config::load(&path).with_context(|| format!("loading {}", path.display()))?;
        convoy::net::tls::init(&self.config).context("the new node's certificate")?;
        self.nodes.insert(id, NodeProcess::default());
        Ok(id)
    }

    /// [`LocalCluster::create`], then starts every node (without waiting for them: see
    /// [`LocalCluster::wait_ready`]).
    pub fn launch(spec: ClusterSpec) -> Result<LocalCluster> {
        let mut cluster = LocalCluster::create(spec)?;
        cluster.start_all()?;
        Ok(cluster)
    }

    /// The cluster directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loaded `cluster.toml`.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where `cluster.toml` is.
    pub fn config_path(&self) -> &Path {
        &self.config.path
    }

    /// The `convoy` binary the nodes run.
    pub fn convoy_bin(&self) -> &Path {
        &self.bin
    }

    /// Node ids, ascending.
    pub fn node_ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.join(self.spec.layout.data_dir(id))
    }

    /// Node `id`'s log file (stdout and stderr, appended across restarts).
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(self.spec.layout.log_file(id))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut NodeProcess> {
        self.nodes.get_mut(&id).ok_or_else(|| anyhow!("node {id} is not in this cluster"))
    }

    /// Starts node `id` unless it is running; true if this started it.
    pub fn start(&mut self, id: u64) -> Result<bool> {
        self.start_with(id, &[])
    }

    /// Starts node `id` with `--rejoin`, the path of a node that lost its data: it joins every
    /// shard as a new replica. True if this started it.
    pub fn start_rejoin(&mut self, id: u64) -> Result<bool> {
        self.start_with(id, &["--rejoin"])
    }

    /// How node `id`'s process ended, if it has exited (reaped here); `None` while it runs or
    /// when this cluster holds no process for it.
    pub fn exit_status(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let child = self.nodes.get_mut(&id)?.child.as_mut()?;
        child.try_wait().ok().flatten()
    }

    /// Starts node `id` with extra `convoy node` arguments unless it is running.
    pub fn start_with(&mut self, id: u64, extra: &[&str]) -> Result<bool> {
        if self.is_running(id) {
            return Ok(false);
        }
        let log_path = self.log_path(id);
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(&self.bin)
            .args(["node", "--config"])
            .arg(&self.config.path)
            .args(["--id", &id.to_string()])
            .args(extra)
            .envs(self.spec.env_of(id))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning node {id} ({})", self.bin.display()))?;
        *self.node_mut(id)? = NodeProcess { child: Some(child), paused: false };
        Ok(true)
    }

    /// Starts every node that is not running.
    pub fn start_all(&mut self) -> Result<()> {
        for id in self.node_ids() {
            self.start(id)?;
        }
        Ok(())
    }

    /// `kill -9` node `id` and reap it; true if it had a process (running, paused or exited
    /// unreaped). A paused node is killed as it is.
    pub fn kill(&mut self, id: u64) -> bool {
        let Some(node) = self.nodes.get_mut(&id) else { return false };
        node.paused = false;
        let Some(mut child) = node.child.take() else { return false };
        // An error means it has exited already; `wait` reaps it either way.
        let _ = child.kill();
        let _ = child.wait();
        true
    }

    /// Kills and starts node `id` again (on the same data).
    pub fn restart(&mut self, id: u64) -> Result<()> {
        self.kill(id);
        self.start(id)?;
        Ok(())
    }

    /// Deletes node `id`'s data directory; refuses while the node is running.
    pub fn wipe(&mut self, id: u64) -> Result<()> {
        if self.is_running(id) {
            bail!("node {id} is running: kill it before wiping its data");
        }
        let d = self.data_dir(id);
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("wiping {}", d.display()))?;
        }
        Ok(())
    }

    /// Whether node `id` has a live process (possibly paused). Reaps it if it has exited.
    pub fn is_running(&mut self, id: u64) -> bool {
        match self.nodes.get_mut(&id).and_then(|n| n.child.as_mut()) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Node `id`'s process id, while this cluster holds its process.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id)?.child.as_ref().map(Child::id)
    }

    /// Sends signal `sig` (e.g. `libc::SIGSTOP`) to node `id`'s process; true if delivered.
    /// Only a process this cluster spawned and has not reaped is ever signalled.
    pub fn signal(&mut self, id: u64, sig: i32) -> bool {
        if !self.is_running(id) {
            return false;
        }
        let Some(pid) = self.pid(id).and_then(|p| i32::try_from(p).ok()) else { return false };
        // SAFETY: kill(2) has no memory effects; `pid` is our own unreaped child, so the id
        // cannot have been reused by another process.
        unsafe { libc::kill(pid, sig) == 0 }
    }

    /// Stops node `id` with `SIGSTOP` (it keeps its sockets and state, answers nothing).
    pub fn pause(&mut self, id: u64) -> bool {
        let ok = self.signal(id, libc::SIGSTOP);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused |= ok;
        }
        ok
    }

    /// Continues node `id` with `SIGCONT`.
    pub fn resume(&mut self, id: u64) -> bool {
        let ok = self.signal(id, libc::SIGCONT);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused = false;
        }
        ok
    }

    /// Nodes paused and not resumed since.
    pub fn paused(&self) -> Vec<u64> {
        self.nodes.iter().filter(|(_, n)| n.paused).map(|(id, _)| *id).collect()
    }

    /// A client of this cluster as the user [`TEST_USER`] (a fresh client id).
    pub fn client(&self) -> Result<Client> {
        Ok(Client::connect_user(&self.config, TEST_USER)?)
    }

    /// A client as `user`, whose credential is issued first if it has none (a fresh client
    /// id).
    pub fn client_as(&self, user: &str) -> Result<Client> {
        convoy::net::tls::ensure_user(&self.config, user, false)?;
        Ok(Client::connect_user(&self.config, user)?)
    }

    /// A client with the `admin` credential, for `Status`.
    pub fn admin(&self) -> Result<Client> {
        Ok(Client::connect_user(&self.config, convoy::net::tls::ADMIN_USER)?)
    }

    /// Where node `id` serves its metrics (every loopback cluster has one per node).
    pub fn metrics_addr(&self, id: u64) -> Option<std::net::SocketAddr> {
        self.config.node(id).ok().and_then(|n| n.metrics_addr)
    }

    /// Waits until node `id` answers a status request, whatever it knows of leaders.
    pub async fn wait_answers(&self, id: u64, within: Duration) -> Result<()> {
        let client = self.admin()?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match client.status(id).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    bail!("node {id} did not answer within {within:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await,
            }
        }
    }

    /// Waits until every node in `nodes` answers and all report the same leader for every
    /// shard; returns the leaders by shard. Fails after `within` with the last error and the
    /// end of every node's log.
    pub async fn wait_ready(&self, nodes: &[u64], within: Duration) -> Result<Vec<u64>> {
        let client = self.admin()?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match client.agreed_leaders(nodes).await {
                Ok(leaders) => return Ok(leaders),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    bail!("cluster not ready within {within:?}: {e}\n{}", self.logs_tail())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await,
            }
        }
    }

    /// The leader of `shard` once every node in `nodes` reports the same one (see
    /// [`LocalCluster::wait_ready`]).
    pub async fn leader_of(&self, shard: u32, nodes: &[u64], within: Duration) -> Result<u64> {
        let leaders =
            self.wait_ready(nodes, within).await.with_context(|| format!("no agreed leader for shard {shard}"))?;
        leaders.get(shard as usize).copied().ok_or_else(|| anyhow!("shard {shard} is not one of {}", leaders.len()))
    }

    /// The leader of `shard` as the first node that names one reports it, asking each node
    /// once: for a harness that must act now (a fault on "the leader") and accepts a stale
    /// view. `None` if no node answers with a leader.
    pub async fn reported_leader(&self, shard: u32) -> Option<u64> {
        let client = self.admin().ok()?;
        for id in self.node_ids() {
            if let Ok(s) = client.status(id).await {
                if let Some(l) = s.shards.iter().find(|x| x.shard == shard).and_then(|x| x.leader) {
                    return Some(l);
                }
            }
        }
        None
    }

    /// The last [`LOG_TAIL_LINES`] lines of every node's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for id in self.node_ids() {
            let path = self.log_path(id);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            out.push_str(&format!("--- {} (last lines)\n{}\n", path.display(), lines[start..].join("\n")));
        }
        out
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for id in self.node_ids() {
            self.kill(id);
        }
        match (self.temp.take(), self.spec.remove_dir_on_drop) {
            (Some(t), false) => eprintln!("keeping local cluster directory {}", t.keep().display()),
            // Dropping a TempDir removes it.
            (Some(t), true) => drop(t),
            (None, true) => {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            (None, false) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A stand-in for `convoy`: a script that sleeps (and so stays "running") whatever its
    /// arguments, and writes its environment to its log.
    fn fake_convoy(dir: &Path) -> PathBuf {
        let bin = dir.join("convoy");
        std::fs::write(&bin, "#!/bin/sh\nenv\nexec sleep 600\n").expect("write the fake binary");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        bin
    }

    /// The state letter of a process (`/proc/<pid>/stat`): R, S, T (stopped), Z ...
    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
    }

    /// Whether `cond` holds within 5 s (asked every 10 ms).
    fn within_5s(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn spec(bin_dir: &Path) -> ClusterSpec {
        ClusterSpec {
            convoy_bin: Some(fake_convoy(bin_dir)),
            env: vec![("TESTKIT_ALL".into(), "yes".into())],
            node_env: BTreeMap::from([(2, vec![("TESTKIT_MARK".into(), "two".into())])]),
            ..ClusterSpec::default()
        }
    }

    #[test]
    fn create_writes_the_files_and_starts_nothing() {
        let bin_dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = LocalCluster::create(spec(bin_dir.path())).expect("create");
        assert!(cluster.config_path().is_file());
        assert!(cluster.dir().join(TLS_DIR).is_dir(), "TLS material is made at create");
        assert_eq!(cluster.node_ids(), vec![1, 2, 3]);
        assert!(cluster.node_ids().into_iter().all(|id| !cluster.is_running(id) && cluster.pid(id).is_none()));
        assert!(!cluster.kill(1), "nothing to kill");
        assert!(!cluster.signal(1, libc::SIGSTOP), "nothing to signal");
        let dir = cluster.dir().to_path_buf();
        drop(cluster);
        assert!(!dir.exists(), "a temp cluster directory is removed on drop");
    }

    #[test]
    fn processes_start_pause_resume_die_and_are_reaped() {
        let bin_dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = LocalCluster::launch(spec(bin_dir.path())).expect("launch");
        let pids: Vec<u32> = cluster.node_ids().iter().map(|id| cluster.pid(*id).expect("a pid")).collect();
        assert!(cluster.node_ids().into_iter().all(|id| cluster.is_running(id)));
        assert!(!cluster.start(1).expect("start"), "a running node is not started twice");
        assert_eq!(cluster.pid(1), Some(pids[0]));

        assert!(cluster.pause(2));
        assert_eq!(cluster.paused(), vec![2]);
        assert!(within_5s(|| state(pids[1]) == Some('T')), "SIGSTOP stops the process: {:?}", state(pids[1]));
        assert!(cluster.resume(2));
        assert!(cluster.paused().is_empty());

        assert!(cluster.kill(3));
        assert!(!cluster.is_running(3));
        assert_eq!(state(pids[2]), None, "killed and reaped, not a zombie");
        assert!(cluster.wipe(1).is_err(), "a running node's data is not wiped");
        std::fs::create_dir_all(cluster.data_dir(3)).expect("data dir");
        cluster.wipe(3).expect("wipe a stopped node");
        assert!(!cluster.data_dir(3).exists());

        // Each stand-in prints its environment before it sleeps (node 1 twice: it restarts).
        // The first print is waited for: a loaded machine may not have run it yet, and a
        // restart before it would leave one.
        let first_log = cluster.log_path(1);
        let printed = || std::fs::read_to_string(&first_log).unwrap_or_default().contains("TESTKIT_ALL=yes");
        assert!(within_5s(printed), "node 1 got the common environment");
        cluster.restart(1).expect("restart");
        let new_pid = cluster.pid(1).expect("a new pid");
        assert_ne!(new_pid, pids[0]);
        assert_eq!(state(pids[0]), None, "the old process is gone");

        let log = |id: u64| std::fs::read_to_string(cluster.log_path(id)).unwrap_or_default();
        assert!(within_5s(|| log(2).contains("TESTKIT_MARK=two")), "node 2 got its own environment");
        assert!(within_5s(|| log(1).matches("TESTKIT_ALL=yes").count() == 2), "node 1 started twice: {}", log(1));
        assert!(!log(1).contains("TESTKIT_MARK"), "node 1 did not get node 2's environment");
        assert!(cluster.logs_tail().contains("node2.log"));

        let live = [new_pid, pids[1]];
        drop(cluster);
        for pid in live {
            assert_eq!(state(pid), None, "drop kills and reaps pid {pid}");
        }
    }

    #[test]
    fn a_given_directory_is_kept_unless_the_spec_says_remove() {
        let bin_dir = tempfile::tempdir().expect("tempdir");
        let parent = tempfile::tempdir().expect("tempdir");
        let keep = parent.path().join("kept");
        let cluster = LocalCluster::create(ClusterSpec {
            dir: Some(keep.clone()),
            remove_dir_on_drop: false,
            layout: crate::Layout::PerNodeDir,
            ..spec(bin_dir.path())
        })
        .expect("create");
        assert_eq!(cluster.log_path(2), keep.join("n2/node.log"));
        drop(cluster);
        assert!(keep.join("cluster.toml").is_file());
        let gone = parent.path().join("gone");
        drop(LocalCluster::create(ClusterSpec { dir: Some(gone.clone()), ..spec(bin_dir.path()) }).expect("create"));
        assert!(!gone.exists());
    }
}
