//! `convoy-bench-peers`: the workloads of `convoy-bench`, run against NATS JetStream and etcd on
//! this machine, so the three can be compared side by side (same 256-byte messages, same
//! phases, same record shape; `system` is `jetstream` or `etcd`).
//!
//! Each peer runs as a fresh three-node cluster on loopback in a temp directory: JetStream with
//! one R3 file-storage stream (subject `conv.<conversation>`), etcd with a key per message
//! (`<conversation>/<sender>-<n>`). Workloads: `send_latency`, `send_throughput` (1/16/64/256
//! in flight over 1 and 64 conversations), `send_paced` (3,000 msgs/s over 64 conversations,
//! open loop), `push_latency` (500 and 5,000 msgs/s, receiver on a server other than the
//! leader) and `catch_up` (read a long conversation from its start). Writers talk to the
//! leader directly, as convoy's client does. The send records carry the servers' CPU and
//! context switches per message, as convoy-bench's do, and etcd's WAL fsyncs.
//!
//! Every loop is bounded by a duration or a count; the servers are killed and the temp
//! directory removed when the run ends, fails or is interrupted.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{push, DeliverPolicy};
use bytes::Bytes;
use clap::Parser;
use convoy_bench::{
    closed_loop, cost_lines, latency_of, metric_value, paced_phase, paced_record, paced_sender, per_1k, record, table,
    text, witness_lines, write_records, BenchOptions, DiskWitness, Record, RunArgs, Samples, Usage, MESSAGE_BYTES,
    PACED_CONVERSATIONS, PACED_RATE, SENDERS_PER_CLIENT, WITNESS_HEADING,
};
use etcd_client::{GetOptions, KvClient, WatchOptions};
use futures::StreamExt;
use serde_json::json;

/// Concurrent writers and client connections that preload the catch-up conversation.
const PRELOAD_WRITERS: usize = 256;
const PRELOAD_CLIENTS: usize = 8;
/// Keys per range read when etcd reads the catch-up conversation back.
const ETCD_PAGE: i64 = 5_000;
const STREAM: &str = "CONVOY_BENCH";

/// What an acknowledged JetStream publish has survived, for nats-server 2.9.10's defaults
/// (server/jetstream_cluster.go, server/filestore.go and server/raft.go at tag v2.9.10): the
/// PubAck is sent once the entry is committed, i.e. a quorum has appended it to its Raft WAL
/// with a plain write() (no fsync); the WAL is fsynced every 5 minutes and the stream's message
/// blocks every 60 s (`defaultSyncInterval`); 2.9 has no `sync_interval` option (2.10 added it).
const JETSTREAM_DURABILITY: &str = "quorum written to the OS page cache (Raft WAL, no fsync); fsync of stream \
     blocks every 60 s and of the Raft WAL every 5 min (nats-server 2.9 defaults, not configurable before 2.10)";
/// etcd 3.4: a proposal is acknowledged after it is committed and applied; committing needs a
/// quorum whose members have fsynced the entry to their WAL (wal.Save syncs when raft asks).
const ETCD_DURABILITY: &str = "quorum fsync (WAL) before ack";

#[derive(Parser)]
#[command(
    name = "convoy-bench-peers",
    version,
    about = "Run convoy-bench's workloads against NATS JetStream and etcd clusters on this machine"
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    /// Parent of the run's temp directory (its disk is what is measured).
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
    /// The nats-server binary (default: from PATH, /usr/sbin or /usr/bin).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// The etcd binary (default: from PATH, /usr/bin or /usr/sbin).
    #[arg(long)]
    etcd: Option<PathBuf>,
    /// Run only these workloads (comma-separated), for both systems.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only this system: `jetstream` or `etcd`.
    #[arg(long)]
    system: Option<String>,
}

/// The workloads this binary runs, in order.
const PEER_WORKLOADS: &[&str] = &["send_latency", "send_throughput", "send_paced", "push_latency", "catch_up"];

/// Which workloads and systems a run covers.
#[derive(Clone)]
struct Selection {
    only: Vec<String>,
}

impl Selection {
    fn wants(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == workload)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Interruption drops `run`'s future, whose guards kill the servers and remove the temp dir.
    let outcome = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(cli) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow!("terminated")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let opts = BenchOptions { quick: cli.run.quick, shards: None };
    if let Some(unknown) = cli.only.iter().find(|w| !PEER_WORKLOADS.contains(&w.as_str())) {
        bail!("unknown workload {unknown:?}; known: {}", PEER_WORKLOADS.join(", "));
    }
    if let Some(system) = cli.system.as_deref().filter(|s| !["jetstream", "etcd"].contains(s)) {
        bail!("unknown system {system:?}; known: jetstream, etcd");
    }
    let sel = Selection { only: cli.only.clone() };
    let wants_system = |name: &str| cli.system.as_deref().is_none_or(|s| s == name);
    let nats_bin = find_binary(cli.nats_server, "nats-server", "nats-server", "--nats-server")?;
    let etcd_bin = find_binary(cli.etcd, "etcd", "etcd-server", "--etcd")?;
    let nats_version = version_of(&nats_bin)?;
    let etcd_version = version_of(&etcd_bin)?;
    std::fs::create_dir_all(&cli.dir).with_context(|| format!("creating {}", cli.dir.display()))?;
    let base = std::path::absolute(&cli.dir)?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let work = base.join(format!("convoy-bench-peers-{}-{stamp}", std::process::id()));
    eprintln!(
        "convoy-bench-peers: {nats_version} and {etcd_version}, fresh clusters under {}{}",
        work.display(),
        if cli.run.quick { " (quick)" } else { "" }
    );
    let _work_guard = RemoveDir(work.clone());

    let mut records = Vec::new();
    let mut progress = |r: Record, version: &str| {
        eprintln!(
            "  {} {} senders={} convs={}: {:.0} msgs/s p50 {} µs p99 {} µs",
            r.system, r.workload, r.senders, r.conversations, r.msgs_per_s, r.p50_us, r.p99_us
        );
        let mut r = r;
        r.extra.insert("server_version".into(), json!(version));
        records.push(r);
    };

    if wants_system("jetstream") {
        let mut nats = Nats::start(&nats_bin, &work.join("jetstream")).await.context("starting the NATS cluster")?;
        run_jetstream(&mut nats, opts, &sel, &mut |r| progress(r, &nats_version))
            .await
            .context("JetStream workloads")?;
    }
    if wants_system("etcd") {
        let mut etcd = Etcd::start(&etcd_bin, &work.join("etcd")).await.context("starting the etcd cluster")?;
        run_etcd(&mut etcd, opts, &sel, &mut |r| progress(r, &etcd_version)).await.context("etcd workloads")?;
    }

    print!("{}", table(&records));
    let costs = cost_lines(&records);
    if !costs.is_empty() {
        print!("\nper-message costs (servers: all three processes; load: this generator)\n{costs}");
    }
    let witness = witness_lines(&records);
    if !witness.is_empty() {
        print!("{}\n{witness}", WITNESS_HEADING);
    }
    if let Some(path) = cli.run.out {
        let chart =
            write_records(&path, &records, &cli.run.compare).with_context(|| format!("writing {}", path.display()))?;
        println!("records written to {}, chart to {}", path.display(), chart.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Processes, ports, binaries

/// Removes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Server processes of one cluster: killed (and their directory removed) when dropped.
struct Servers {
    what: &'static str,
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Servers {
    fn new(what: &'static str, dir: &Path) -> Result<Servers> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Servers { what, dir: dir.to_path_buf(), children: Vec::new() })
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} {name}", self.what))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// The server processes' pids.
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    /// An error naming the server that exited, with the end of its log.
    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("{} {name} exited ({status}); end of its log:\n{}", self.what, tail.join("\n"));
            }
        }
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` distinct free TCP ports on loopback (all held open until every one is chosen).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<_>>().context("picking ports")?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn find_binary(given: Option<PathBuf>, name: &str, package: &str, flag: &str) -> Result<PathBuf> {
    let hint = format!("install the Debian package {package} (apt-get install {package}; scripts/bench-peers does it)");
    if let Some(p) = given {
        if p.is_file() {
            return Ok(p);
        }
        bail!("{} (given with {flag}) does not exist: {hint}", p.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name} not found in PATH, /usr/sbin or /usr/bin: {hint}, or pass {flag} PATH"))
}

fn version_of(bin: &Path) -> Result<String> {
    let out = Command::new(bin).arg("--version").output().with_context(|| format!("running {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_string();
    if !out.status.success() || first.is_empty() {
        bail!("{} --version failed ({})", bin.display(), out.status);
    }
    Ok(first)
}

// ---------------------------------------------------------------------------------------------
// Measurement loops shared by both peers

/// Writes `total` messages with `PRELOAD_WRITERS` concurrent writers: `op(client, n)` for
/// n in 0..total. Returns (acknowledged, errors).
async fn preload<C, F, Fut>(clients: &[C], total: usize, op: F) -> (u64, u64)
where
    C: Clone + Send + 'static,
    F: Fn(C, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..PRELOAD_WRITERS {
        let client = clients[i % clients.len()].clone();
        let (next, ok, errors, op) = (next.clone(), ok.clone(), errors.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n as usize >= total {
                    break;
                }
                // A failed write is retried once, then counted.
                if op(client.clone(), n).await || op(client.clone(), n).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed))
}

fn push_record(system: &str, rate: u64, phase: Duration, received: u64, samples: Samples) -> Record {
    let total = (rate as f64 * phase.as_secs_f64()) as u64;
    let mut r = record("push_latency", 1, 1, received as usize, phase, samples);
    r.system = system.into();
    r.msgs_per_s = rate as f64;
    r.extra.insert("target_rate".into(), json!(rate));
    r.extra.insert("received".into(), json!(received));
    r.extra.insert("sent".into(), json!(total));
    r
}

// ---------------------------------------------------------------------------------------------
// NATS JetStream

struct Nats {
    servers: Servers,
    names: Vec<String>,
    urls: Vec<String>,
}

impl Nats {
    async fn start(bin: &Path, dir: &Path) -> Result<Nats> {
        let mut servers = Servers::new("nats-server", dir)?;
        let ports = free_ports(6)?;
        let (client_ports, route_ports) = ports.split_at(3);
        let mut names = Vec::new();
        let mut urls = Vec::new();
        for i in 0..3 {
            let name = format!("n{}", i + 1);
            let routes: Vec<String> = route_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            let store = dir.join(&name);
            let conf = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{}\n\
                 jetstream {{\n  store_dir: {:?}\n  max_file_store: 17179869184\n  max_memory_store: 1073741824\n}}\n\
                 cluster {{\n  name: convoy-bench\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                client_ports[i],
                store.display().to_string(),
                route_ports[i],
                routes.join(", ")
            );
            let conf_path = dir.join(format!("{name}.conf"));
            std::fs::write(&conf_path, conf).with_context(|| format!("writing {}", conf_path.display()))?;
            servers.spawn(&name, Command::new(bin).arg("-c").arg(&conf_path))?;
            names.push(name);
            urls.push(format!("nats://127.0.0.1:{}", client_ports[i]));
        }
        let mut nats = Nats { servers, names, urls };
        // Every server accepts clients...
        for url in nats.urls.clone() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                nats.servers.check_alive()?;
                match nats_connect(&url).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => bail!("nats-server at {url} never accepted clients: {e:#}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        Ok(nats)
    }

    /// Creates the R3 file-storage stream (which needs a JetStream meta leader: retried, bounded)
    /// and returns the index of its leader's server.
    async fn create_stream(&mut self) -> Result<usize> {
        let js = js_context(nats_connect(&self.urls[0]).await?);
        let config = jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec!["conv.*".into()],
            storage: jetstream::stream::StorageType::File,
            num_replicas: 3,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stream = loop {
            self.servers.check_alive()?;
            match js.create_stream(config.clone()).await {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    bail!("JetStream never had a meta leader (creating the stream failed for 60 s): {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leader = stream.info().await.ok().and_then(|i| i.cluster.as_ref().and_then(|c| c.leader.clone()));
            if let Some(i) = leader.and_then(|l| self.names.iter().position(|n| *n == l)) {
                return Ok(i);
            }
            if Instant::now() > deadline {
                bail!("the stream {STREAM} has no leader after 30 s");
            }
            self.servers.check_alive()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A client connection to exactly this server (no reconnecting elsewhere).
async fn nats_connect(url: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .ignore_discovered_servers()
        .retain_servers_order()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
}

fn js_context(client: async_nats::Client) -> jetstream::Context {
    jetstream::context::ContextBuilder::new().timeout(Duration::from_secs(10)).build(client)
}

async fn js_clients(url: &str, n: usize) -> Result<Vec<jetstream::Context>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(js_context(nats_connect(url).await?));
    }
    Ok(out)
}

async fn js_publish(js: &jetstream::Context, subject: String, body: Bytes) -> bool {
    match js.publish(subject, body).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

fn js_record(mut r: Record, errors: u64) -> Record {
    r.system = "jetstream".into();
    r.extra.insert("errors".into(), json!(errors));
    r.extra.insert("durability_at_ack".into(), json!(JETSTREAM_DURABILITY));
    r
}

/// The closed-loop send workloads `sel` covers (`send_latency`, then every
/// `send_throughput` shape), each run by `send(workload, senders, conversations)` and
/// followed by a check that every server is still up.
async fn closed_loop_sends<F, Fut>(
    sel: &Selection,
    servers: &mut Servers,
    progress: &mut dyn FnMut(Record),
    send: F,
) -> Result<()>
where
    F: Fn(&'static str, usize, usize) -> Fut,
    Fut: Future<Output = Result<Record>>,
{
    let mut shapes = Vec::new();
    if sel.wants("send_latency") {
        shapes.push(("send_latency", 1, 1));
    }
    if sel.wants("send_throughput") {
        for conversations in [1, 64] {
            for senders in [1, 16, 64, 256] {
                shapes.push(("send_throughput", senders, conversations));
            }
        }
    }
    for (workload, senders, conversations) in shapes {
        progress(send(workload, senders, conversations).await?);
        servers.check_alive()?;
    }
    Ok(())
}

/// JetStream's per-message costs: the servers' CPU and context switches. nats-server exposes
/// no fsync or Raft append counts, and fsyncs nothing per message (see
/// [`JETSTREAM_DURABILITY`]), so those fields are null.
fn js_costs(r: &mut Record, usage: &Usage, before: &Usage, acked: u64) {
    r.extra.extend(usage.costs_since(before, acked));
    for field in ["appends_per_1k", "appends_empty_per_1k", "fsyncs_per_1k"] {
        r.extra.insert(field.into(), serde_json::Value::Null);
    }
}

async fn run_jetstream(
    nats: &mut Nats,
    opts: BenchOptions,
    sel: &Selection,
    progress: &mut dyn FnMut(Record),
) -> Result<()> {
    let leader = nats.create_stream().await?;
    let leader_url = nats.urls[leader].clone();
    let leader_name = nats.names[leader].clone();
    let phase = opts.phase();
    let pids = nats.servers.pids();

    let send = |workload: &'static str, senders: usize, conversations: usize| {
        let (leader_url, leader_name, pids) = (leader_url.clone(), leader_name.clone(), pids.clone());
        async move {
            let clients = js_clients(&leader_url, senders.div_ceil(SENDERS_PER_CLIENT)).await?;
            let body = Bytes::from(text("load"));
            let before = Usage::now(&pids);
            let (count, errors, s, elapsed) =
                closed_loop(&clients, senders, phase, move |js: jetstream::Context, i, _n| {
                    let (subject, body) = (format!("conv.load-{}", i % conversations), body.clone());
                    async move { js_publish(&js, subject, body).await }
                })
                .await;
            let usage = Usage::now(&pids);
            let mut r = js_record(record(workload, senders, conversations, count, elapsed, s), errors);
            js_costs(&mut r, &usage, &before, count as u64);
            r.extra.insert("client_on".into(), json!(format!("stream leader ({leader_name})")));
            r.extra.insert("connections".into(), json!(clients.len()));
            Ok::<_, anyhow::Error>(r)
        }
    };
    closed_loop_sends(sel, &mut nats.servers, progress, send).await?;
    if sel.wants("send_paced") {
        let js = js_context(nats_connect(&leader_url).await?);
        let before = Usage::now(&pids);
        let (samples, failed, elapsed) = paced_phase(PACED_RATE, PACED_CONVERSATIONS, phase, move |conv, body| {
            let js = js.clone();
            async move { js_publish(&js, format!("conv.paced-{conv}"), Bytes::from(body)).await }
        })
        .await?;
        let usage = Usage::now(&pids);
        let acked = samples.len();
        let mut r = js_record(paced_record(PACED_RATE, PACED_CONVERSATIONS, elapsed, samples, failed), failed);
        js_costs(&mut r, &usage, &before, acked);
        r.extra.insert("client_on".into(), json!(format!("stream leader ({leader_name})")));
        progress(r);
        nats.servers.check_alive()?;
    }
    for rate in [500, 5_000].into_iter().filter(|_| sel.wants("push_latency")) {
        let witness = DiskWitness::start(&nats.servers.dir)?;
        let mut r = js_push_latency(nats, leader, rate, phase).await?;
        r.extra.insert("disk_witness".into(), witness.finish());
        progress(r);
        nats.servers.check_alive()?;
    }
    if sel.wants("catch_up") {
        progress(js_catch_up(nats, leader, opts.catch_up_messages()).await?);
        nats.servers.check_alive()?;
    }
    Ok(())
}

/// Send → receipt through an ordered push consumer (deliver new) whose connection is on a
/// server other than the stream leader; the publisher is on the leader.
async fn js_push_latency(nats: &Nats, leader: usize, rate: u64, phase: Duration) -> Result<Record> {
    let on = (0..nats.urls.len()).find(|i| *i != leader).unwrap_or(leader);
    let sub_client = nats_connect(&nats.urls[on]).await?;
    let sub_js = js_context(sub_client.clone());
    let subject = format!("conv.push-{rate}");
    let stream = sub_js.get_stream(STREAM).await.context("looking up the stream")?;
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: sub_client.new_inbox(),
            filter_subject: subject.clone(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .context("creating the push consumer")?;
    let mut messages = consumer.messages().await.context("subscribing to the push consumer")?;
    sub_client.flush().await.context("flushing the subscription")?;
    // Let the subscription's interest reach the other servers before anything is sent.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let publisher = js_context(nats_connect(&nats.urls[leader]).await?);
    let epoch = Instant::now();
    let sender = paced_sender(epoch, rate, phase, move |body| {
        let (js, subject) = (publisher.clone(), subject.clone());
        async move { js_publish(&js, subject, Bytes::from(body)).await }
    });
    let total = (rate as f64 * phase.as_secs_f64()) as u64;
    let mut s = Samples::default();
    let (mut received, mut errors) = (0u64, 0u64);
    let deadline = Instant::now() + phase + Duration::from_secs(15);
    while received < total && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
            Ok(Some(Ok(m))) => {
                received += 1;
                if let Some(d) = latency_of(&m.payload, epoch) {
                    s.push(d);
                }
            }
            Ok(Some(Err(_))) => errors += 1,
            _ => break,
        }
    }
    errors += sender.await.unwrap_or(0);
    let mut r = js_record(push_record("jetstream", rate, phase, received, s), errors);
    r.extra.insert("subscriber_on".into(), json!(format!("non-leader server ({})", nats.names[on])));
    r.extra.insert("consumer".into(), json!("ordered push consumer, deliver new (flow control, no acks)"));
    Ok(r)
}

/// Preloads one subject, then reads it from sequence 1 with an ordered push consumer (no acks,
/// flow controlled: JetStream's fastest way to replay) on the stream leader's server.
async fn js_catch_up(nats: &Nats, leader: usize, messages: usize) -> Result<Record> {
    let subject = "conv.catch-up".to_string();
    let writers = js_clients(&nats.urls[leader], PRELOAD_CLIENTS).await?;
    let body = Bytes::from(text("catch-up"));
    let (stored, preload_errors) = {
        let subject = subject.clone();
        preload(&writers, messages, move |js: jetstream::Context, _n| {
            let (subject, body) = (subject.clone(), body.clone());
            async move { js_publish(&js, subject, body).await }
        })
        .await
    };
    drop(writers);

    let reader = nats_connect(&nats.urls[leader]).await?;
    let js = js_context(reader.clone());
    let started = Instant::now();
    let stream = js.get_stream(STREAM).await.context("looking up the stream")?;
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: reader.new_inbox(),
            filter_subject: subject,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("creating the catch-up consumer")?;
    let mut sub = consumer.messages().await.context("subscribing to the catch-up consumer")?;
    let (mut got, mut errors) = (0u64, preload_errors);
    let deadline = Instant::now() + Duration::from_secs(300);
    while got < stored && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Ok(m))) => {
                got += 1;
                if m.payload.len() != MESSAGE_BYTES {
                    errors += 1;
                }
            }
            Ok(Some(Err(_))) => errors += 1,
            _ => break,
        }
    }
    let elapsed = started.elapsed();
    let mut r = js_record(record("catch_up", 1, 1, got as usize, elapsed, Samples::default()), errors);
    r.extra.insert("messages".into(), json!(got));
    r.extra.insert("preloaded".into(), json!(stored));
    r.extra.insert("read_from".into(), json!(format!("stream leader ({})", nats.names[leader])));
    r.extra.insert("reader".into(), json!("ordered push consumer from sequence 1"));
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// etcd

struct Etcd {
    servers: Servers,
    endpoints: Vec<String>,
}

impl Etcd {
    async fn start(bin: &Path, dir: &Path) -> Result<Etcd> {
        let mut servers = Servers::new("etcd", dir)?;
        let ports = free_ports(6)?;
        let (client_ports, peer_ports) = ports.split_at(3);
        let initial: Vec<String> =
            peer_ports.iter().enumerate().map(|(i, p)| format!("e{}=http://127.0.0.1:{p}", i + 1)).collect();
        let token = format!("convoy-bench-{}", std::process::id());
        let mut endpoints = Vec::new();
        for i in 0..3 {
            let name = format!("e{}", i + 1);
            let client_url = format!("http://127.0.0.1:{}", client_ports[i]);
            let peer_url = format!("http://127.0.0.1:{}", peer_ports[i]);
            let mut cmd = Command::new(bin);
            // Only our flags: no ETCD_* variables from the environment.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(dir.join(&name))
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token, "--logger", "zap", "--log-outputs", "stderr"]);
            servers.spawn(&name, &mut cmd)?;
            endpoints.push(client_url);
        }
        Ok(Etcd { servers, endpoints })
    }

    /// Waits until every member reports the same leader; returns the leader's index.
    async fn wait_leader(&mut self) -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.servers.check_alive()?;
            match self.leader().await {
                Ok(i) => return Ok(i),
                Err(e) if Instant::now() > deadline => bail!("the etcd cluster has no agreed leader after 60 s: {e:#}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    async fn leader(&self) -> Result<usize> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for ep in &self.endpoints {
            let mut c = etcd_connect(ep).await?;
            let status = c.status().await.with_context(|| format!("status of {ep}"))?;
            ids.push(status.header().map(|h| h.member_id()).unwrap_or(0));
            leaders.push(status.leader());
        }
        let leader = leaders[0];
        if leader == 0 || leaders.iter().any(|l| *l != leader) {
            bail!("members disagree on the leader: {leaders:?}");
        }
        ids.iter().position(|id| *id == leader).ok_or_else(|| anyhow!("leader {leader:x} is none of our members"))
    }
}

async fn etcd_connect(endpoint: &str) -> Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    etcd_client::Client::connect([endpoint], Some(options)).await.with_context(|| format!("connecting to {endpoint}"))
}

async fn etcd_clients(endpoint: &str, n: usize) -> Result<Vec<KvClient>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(etcd_connect(endpoint).await?.kv_client());
    }
    Ok(out)
}

fn etcd_record(mut r: Record, errors: u64) -> Record {
    r.system = "etcd".into();
    r.extra.insert("errors".into(), json!(errors));
    r.extra.insert("durability_at_ack".into(), json!(ETCD_DURABILITY));
    r
}

/// What etcd's members had done at one moment: their processes' usage, and from each
/// member's Prometheus endpoint (`/metrics` on its client URL) the WAL fsyncs and the bbolt
/// backend commits (each of which syncs the backend file).
struct EtcdCounters {
    usage: Usage,
    wal_fsyncs: u64,
    backend_commits: u64,
}

impl EtcdCounters {
    async fn now(pids: &[u32], endpoints: &[String]) -> Result<EtcdCounters> {
        let usage = Usage::now(pids);
        let (mut wal_fsyncs, mut backend_commits) = (0, 0);
        for ep in endpoints {
            let text = http_get_metrics(ep).await?;
            wal_fsyncs += metric_value(&text, "etcd_disk_wal_fsync_duration_seconds_count")
                .ok_or_else(|| anyhow!("{ep}/metrics has no etcd_disk_wal_fsync_duration_seconds_count"))?;
            backend_commits += metric_value(&text, "etcd_disk_backend_commit_duration_seconds_count")
                .ok_or_else(|| anyhow!("{ep}/metrics has no etcd_disk_backend_commit_duration_seconds_count"))?;
        }
        Ok(EtcdCounters { usage, wal_fsyncs, backend_commits })
    }

    /// The per-message costs since `before`: CPU and context switches, WAL fsyncs
    /// (`fsyncs_per_1k`, comparable to convoy's) and backend commits apart. etcd does not
    /// count its Raft append messages, so those fields are null.
    fn costs_since(&self, before: &EtcdCounters, acked: u64) -> BTreeMap<String, serde_json::Value> {
        let mut costs = self.usage.costs_since(&before.usage, acked);
        costs.insert("fsyncs_per_1k".into(), per_1k(self.wal_fsyncs.saturating_sub(before.wal_fsyncs) as f64, acked));
        costs.insert(
            "backend_commits_per_1k".into(),
            per_1k(self.backend_commits.saturating_sub(before.backend_commits) as f64, acked),
        );
        costs.insert("appends_per_1k".into(), serde_json::Value::Null);
        costs.insert("appends_empty_per_1k".into(), serde_json::Value::Null);
        costs
    }
}

/// `GET /metrics` from an etcd client URL (`http://host:port`), bounded by a timeout.
async fn http_get_metrics(endpoint: &str) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let addr = endpoint.strip_prefix("http://").ok_or_else(|| anyhow!("{endpoint} is not an http:// URL"))?.to_string();
    tokio::task::spawn_blocking(move || -> Result<String> {
        let sock: std::net::SocketAddr = addr.parse().with_context(|| format!("parsing {addr}"))?;
        let mut conn = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut body = String::new();
        conn.take(64 << 20).read_to_string(&mut body)?;
        let (head, text) = body.split_once("\r\n\r\n").ok_or_else(|| anyhow!("{addr}/metrics: no HTTP header end"))?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!("{addr}/metrics answered {}", head.lines().next().unwrap_or(""));
        }
        Ok(text.to_string())
    })
    .await?
}

async fn run_etcd(
    etcd: &mut Etcd,
    opts: BenchOptions,
    sel: &Selection,
    progress: &mut dyn FnMut(Record),
) -> Result<()> {
    let leader = etcd.wait_leader().await?;
    let leader_ep = etcd.endpoints[leader].clone();
    let leader_name = format!("e{}", leader + 1);
    let phase = opts.phase();
    let (pids, endpoints) = (etcd.servers.pids(), etcd.endpoints.clone());

    let send = |workload: &'static str, senders: usize, conversations: usize| {
        let (leader_ep, leader_name) = (leader_ep.clone(), leader_name.clone());
        let (pids, endpoints) = (pids.clone(), endpoints.clone());
        async move {
            let clients = etcd_clients(&leader_ep, senders.div_ceil(SENDERS_PER_CLIENT)).await?;
            let body = text("load").into_bytes();
            let before = EtcdCounters::now(&pids, &endpoints).await?;
            let (count, errors, s, elapsed) = closed_loop(&clients, senders, phase, move |mut kv: KvClient, i, n| {
                let key = format!("conv/{workload}-{senders}-{}/{i:03}-{n:09}", i % conversations);
                let body = body.clone();
                async move { kv.put(key, body, None).await.is_ok() }
            })
            .await;
            let after = EtcdCounters::now(&pids, &endpoints).await?;
            let mut r = etcd_record(record(workload, senders, conversations, count, elapsed, s), errors);
            r.extra.extend(after.costs_since(&before, count as u64));
            r.extra.insert("client_on".into(), json!(format!("leader ({leader_name})")));
            r.extra.insert("connections".into(), json!(clients.len()));
            Ok::<_, anyhow::Error>(r)
        }
    };
    closed_loop_sends(sel, &mut etcd.servers, progress, send).await?;
    if sel.wants("send_paced") {
        let kv = etcd_connect(&leader_ep).await?.kv_client();
        let before = EtcdCounters::now(&pids, &endpoints).await?;
        let seq = Arc::new(AtomicU64::new(0));
        let (samples, failed, elapsed) = paced_phase(PACED_RATE, PACED_CONVERSATIONS, phase, move |conv, body| {
            let (mut kv, n) = (kv.clone(), seq.fetch_add(1, Ordering::Relaxed));
            async move { kv.put(format!("conv/paced-{conv}/{n:09}"), body, None).await.is_ok() }
        })
        .await?;
        let after = EtcdCounters::now(&pids, &endpoints).await?;
        let acked = samples.len();
        let mut r = etcd_record(paced_record(PACED_RATE, PACED_CONVERSATIONS, elapsed, samples, failed), failed);
        r.extra.extend(after.costs_since(&before, acked));
        r.extra.insert("client_on".into(), json!(format!("leader ({leader_name})")));
        progress(r);
        etcd.servers.check_alive()?;
    }
    for rate in [500, 5_000].into_iter().filter(|_| sel.wants("push_latency")) {
        let witness = DiskWitness::start(&etcd.servers.dir)?;
        let mut r = etcd_push_latency(etcd, leader, rate, phase).await?;
        r.extra.insert("disk_witness".into(), witness.finish());
        progress(r);
        etcd.servers.check_alive()?;
    }
    if sel.wants("catch_up") {
        progress(etcd_catch_up(etcd, leader, opts.catch_up_messages()).await?);
        etcd.servers.check_alive()?;
    }
    Ok(())
}

/// Send → receipt through a watch on the conversation's prefix, from a client connected to a
/// member other than the leader; the writer is connected to the leader.
async fn etcd_push_latency(etcd: &Etcd, leader: usize, rate: u64, phase: Duration) -> Result<Record> {
    let on = (0..etcd.endpoints.len()).find(|i| *i != leader).unwrap_or(leader);
    let prefix = format!("push-{rate}/");
    let mut watcher = etcd_connect(&etcd.endpoints[on]).await?;
    let mut watch =
        watcher.watch(prefix.clone(), Some(WatchOptions::new().with_prefix())).await.context("starting the watch")?;
    match tokio::time::timeout(Duration::from_secs(10), watch.message()).await {
        Ok(Ok(Some(r))) if r.created() => {}
        other => bail!("the watch on {prefix} was not created: {other:?}"),
    }

    let writer = etcd_connect(&etcd.endpoints[leader]).await?.kv_client();
    let epoch = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let sender = paced_sender(epoch, rate, phase, move |body| {
        let mut kv = writer.clone();
        let key = format!("{prefix}{:09}", next.fetch_add(1, Ordering::Relaxed));
        async move { kv.put(key, body, None).await.is_ok() }
    });
    let total = (rate as f64 * phase.as_secs_f64()) as u64;
    let mut s = Samples::default();
    let (mut received, mut errors) = (0u64, 0u64);
    let deadline = Instant::now() + phase + Duration::from_secs(15);
    while received < total && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), watch.message()).await {
            Ok(Ok(Some(resp))) => {
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        received += 1;
                        if let Some(d) = latency_of(kv.value(), epoch) {
                            s.push(d);
                        }
                    }
                }
                if resp.canceled() {
                    errors += 1;
                    break;
                }
            }
            Ok(Err(_)) => {
                errors += 1;
                break;
            }
            _ => break,
        }
    }
    errors += sender.await.unwrap_or(0);
    let mut r = etcd_record(push_record("etcd", rate, phase, received, s), errors);
    r.extra.insert("subscriber_on".into(), json!(format!("follower (e{})", on + 1)));
    r.extra.insert("consumer".into(), json!("watch on the conversation's key prefix"));
    Ok(r)
}

/// Preloads one conversation (a key per message), then reads it back from its first key with
/// paginated range reads (linearizable, the default) from the leader.
async fn etcd_catch_up(etcd: &Etcd, leader: usize, messages: usize) -> Result<Record> {
    const PREFIX: &str = "catch-up/";
    const END: &str = "catch-up0"; // the prefix with its last byte ('/') incremented
    let writers = etcd_clients(&etcd.endpoints[leader], PRELOAD_CLIENTS).await?;
    let body = text("catch-up").into_bytes();
    let (stored, preload_errors) = preload(&writers, messages, move |mut kv: KvClient, n| {
        let body = body.clone();
        async move { kv.put(format!("{PREFIX}{n:09}"), body, None).await.is_ok() }
    })
    .await;
    drop(writers);

    let mut reader = etcd_connect(&etcd.endpoints[leader]).await?.kv_client();
    let (mut got, mut errors) = (0u64, preload_errors);
    let started = Instant::now();
    let mut from = PREFIX.as_bytes().to_vec();
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let page = reader
            .get(from.clone(), Some(GetOptions::new().with_range(END).with_limit(ETCD_PAGE)))
            .await
            .context("reading the catch-up conversation")?;
        let kvs = page.kvs();
        for kv in kvs {
            got += 1;
            if kv.value().len() != MESSAGE_BYTES {
                errors += 1;
            }
        }
        let Some(last) = kvs.last() else { break };
        if !page.more() {
            break;
        }
        from = last.key().to_vec();
        from.push(0);
    }
    let elapsed = started.elapsed();
    let mut r = etcd_record(record("catch_up", 1, 1, got as usize, elapsed, Samples::default()), errors);
    r.extra.insert("messages".into(), json!(got));
    r.extra.insert("preloaded".into(), json!(stored));
    r.extra.insert("read_from".into(), json!(format!("leader (e{})", leader + 1)));
    r.extra.insert("reader".into(), json!(format!("range reads of {ETCD_PAGE} keys, by key")));
    Ok(r)
}
