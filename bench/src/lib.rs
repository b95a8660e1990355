//! convoy-bench: reproducible throughput and latency figures for a fresh local cluster,
//! printed as one table and written as JSON records
//! (`system, workload, senders, conversations, msgs_per_s, p50_us, p99_us, p999_us` plus
//! workload-specific fields).
//!
//! Workloads (256-byte messages): `disk_fsync` (the data disk's fsync floor), `raw_append`
//! (one RocksDB with the same group commit, no replication: the ceiling), `send_latency`
//! (one sequential sender), `send_throughput` (1/16/64/256 concurrent senders over 1 and 64
//! conversations), `push_latency` (send → receipt by a subscriber on a follower, at a fixed
//! rate), `catch_up` (reading a long conversation from offset 1), `fan_out` (one
//! conversation, 1,000 subscribers over the replicas: deliveries/s, latency, stalls) and
//! `connections` (10,000 idle clients attached: node memory per connection, push latency).
//!
//! Every loop is bounded by a duration or a count and stops by itself.
//!
//! The cluster is testkit's [`LocalCluster`] (loopback, ports from the OS, under the bench's
//! directory); the bench reads the nodes' memory from `/proc` by the pids it reports. Latency
//! samples go into HDR histograms ([`Samples`]). The `convoy-bench` binary prints what [`run`]
//! returns; `convoy-bench-peers` runs the same loops ([`closed_loop`], [`paced_sender`])
//! against NATS JetStream and etcd.

pub mod chart;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

use convoy::client::{Client, Event, ReadItem};
use convoy::config::Config;
use convoy::stages::{Stage, StageSnapshot};
use convoy::store::keys::{log_key, CF_LOG};
use convoy::store::Store;
use testkit::{ClusterSpec, LimitTweaks, LocalCluster, RaftTweaks, TEST_USER};

/// Bytes of text per benchmark message.
pub const MESSAGE_BYTES: usize = 256;
/// Senders served by one client connection (the server allows 64 streams per connection).
pub const SENDERS_PER_CLIENT: usize = 32;

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub system: String,
    pub workload: String,
    pub senders: usize,
    pub conversations: usize,
    pub msgs_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Sizes of a run.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub quick: bool,
    /// Shards of the convoy cluster (`None`: `$CONVOY_BENCH_SHARDS`, or the default, 8, as
    /// cluster.toml's).
    pub shards: Option<u32>,
}

impl BenchOptions {
    pub fn phase(&self) -> Duration {
        if self.quick {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(10)
        }
    }
    pub fn catch_up_messages(&self) -> usize {
        if self.quick {
            20_000
        } else {
            200_000
        }
    }
}

/// Significant decimal digits the latency histograms keep: a value is known to 0.1 % (at
/// 10 ms, to 8 µs), in about 100 KiB per histogram for latencies up to seconds.
pub const SAMPLE_SIGNIFICANT_DIGITS: u8 = 3;

/// Latency samples in microseconds, as an HDR histogram (it grows to the largest sample).
#[derive(Clone)]
pub struct Samples(Histogram<u64>);

impl Default for Samples {
    fn default() -> Self {
        Samples(Histogram::new(SAMPLE_SIGNIFICANT_DIGITS).expect("3 significant digits is within 0..=5"))
    }
}

impl Samples {
    /// Records one latency.
    pub fn push(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // The histogram grows to fit; it refuses only values beyond 2^63 µs, which it clamps.
        if self.0.record(us).is_err() {
            self.0.saturating_record(us);
        }
    }
    /// Adds `other`'s samples to these.
    pub fn merge(&mut self, other: Samples) {
        // Both histograms resize themselves, so adding cannot run out of range.
        self.0.add(other.0).expect("auto-resizing histograms add");
    }
    /// How many samples there are.
    pub fn len(&self) -> u64 {
        self.0.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// How many samples took at least `us` microseconds (to the histogram's resolution:
    /// samples within 0.1 % below `us` may count too).
    pub fn at_least(&self, us: u64) -> u64 {
        // Everything from the first value that shares `us`'s bucket up.
        match self.0.lowest_equivalent(us).checked_sub(1) {
            Some(below) => self.0.len() - self.0.count_between(0, below),
            None => self.0.len(),
        }
    }
    /// The latency in µs at quantile `p` (0.5 = p50, 1.0 = the maximum); 0 with no samples.
    pub fn pct(&self, p: f64) -> u64 {
        self.0.value_at_quantile(p)
    }
}

/// A record for `system = "convoy"`; other systems overwrite `system`.
pub fn record(
    workload: &str,
    senders: usize,
    conversations: usize,
    count: usize,
    elapsed: Duration,
    s: Samples,
) -> Record {
    Record {
        system: "convoy".into(),
        workload: workload.into(),
        senders,
        conversations,
        msgs_per_s: count as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: s.pct(0.50),
        p99_us: s.pct(0.99),
        p999_us: s.pct(0.999),
        extra: BTreeMap::new(),
    }
}

/// A message body of exactly `MESSAGE_BYTES` bytes starting with `tag`.
pub fn text(tag: &str) -> String {
    let mut t = String::with_capacity(MESSAGE_BYTES);
    t.push_str(tag);
    while t.len() < MESSAGE_BYTES {
        t.push('.');
    }
    t.truncate(MESSAGE_BYTES);
    t
}

/// `senders` concurrent tasks, each repeating `op(client, sender, n)` (true = acknowledged)
/// for `phase`. Returns (acknowledged, errors, latencies, elapsed).
pub async fn closed_loop<C, F, Fut>(
    clients: &[C],
    senders: usize,
    phase: Duration,
    op: F,
) -> (usize, u64, Samples, Duration)
where
    C: Clone + Send + 'static,
    F: Fn(C, usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Samples::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..senders {
        let client = clients[(i / SENDERS_PER_CLIENT) % clients.len()].clone();
        let (stop, count, errors, samples, op) =
            (stop.clone(), count.clone(), errors.clone(), samples.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = Samples::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let t = Instant::now();
                if op(client.clone(), i, n).await {
                    local.push(t.elapsed());
                    count.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if let Ok(mut s) = samples.lock() {
                s.merge(local);
            }
        }));
    }
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    let s = samples.lock().map(|s| s.clone()).unwrap_or_default();
    (count.load(Ordering::Relaxed) as usize, errors.load(Ordering::Relaxed), s, elapsed)
}

/// Sends `rate * phase` messages at a fixed rate: `op(i, body)` with the body carrying its send
/// time (µs since `epoch`). Returns the number of failed sends.
pub fn paced_sender<F, Fut>(epoch: Instant, rate: u64, phase: Duration, op: F) -> tokio::task::JoinHandle<u64>
where
    F: Fn(String) -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let total = (rate as f64 * phase.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    tokio::spawn(async move {
        let failed = Arc::new(AtomicU64::new(0));
        let mut next = tokio::time::Instant::now();
        let mut in_flight = tokio::task::JoinSet::new();
        for i in 0..total {
            next += interval;
            tokio::time::sleep_until(next).await;
            let sent_us = epoch.elapsed().as_micros() as u64;
            let send = op(text(&format!("{sent_us}:{i}:")));
            let failed = failed.clone();
            in_flight.spawn(async move {
                if !send.await {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            });
            while in_flight.len() > 512 {
                in_flight.join_next().await;
            }
        }
        while in_flight.join_next().await.is_some() {}
        failed.load(Ordering::Relaxed)
    })
}

/// The send time embedded by `paced_sender`, as latency until now.
pub fn latency_of(body: &[u8], epoch: Instant) -> Option<Duration> {
    let end = body.iter().position(|b| *b == b':')?;
    let sent: u64 = std::str::from_utf8(&body[..end]).ok()?.parse().ok()?;
    Some(Duration::from_micros((epoch.elapsed().as_micros() as u64).saturating_sub(sent)))
}

/// A profiling aid's number from the environment; unset or unparsable is `None`.
fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// A fresh three-node cluster on loopback under `dir`: the product's default shard count
/// ([`convoy::config::DEFAULT_SHARDS`], as cluster.toml) and the nodes' defaults.
/// Profiling aids: CONVOY_BENCH_SHARDS=N runs it with N shards, CONVOY_BENCH_WORKER_THREADS=N
/// with N worker threads per node, and CONVOY_BENCH_KEEP=1 keeps the nodes' data and logs
/// for inspection. The nodes run `$CONVOY_BIN` or the `convoy` beside this executable.
fn start_cluster(dir: &Path, opts: BenchOptions) -> Result<LocalCluster> {
    LocalCluster::launch(ClusterSpec {
        shards: opts
            .shards
            .or_else(|| env_number::<u32>("CONVOY_BENCH_SHARDS"))
            .unwrap_or(convoy::config::DEFAULT_SHARDS),
        // For trials of heartbeat suppression under load (`raft.heartbeat_min_interval_ms`).
        raft: RaftTweaks {
            heartbeat_min_interval_ms: env_number::<u64>("CONVOY_BENCH_HEARTBEAT_MIN_MS"),
            // For trials of the per-peer frames (`raft.append_frames_in_flight`).
            append_frames_in_flight: env_number::<usize>("CONVOY_BENCH_APPEND_FRAMES"),
            // For A/B runs of idle-group quiescing (`raft.quiesce_after_ms`; 0: never).
            quiesce_after_ms: env_number::<u64>("CONVOY_BENCH_QUIESCE_AFTER_MS"),
            ..RaftTweaks::default()
        },
        worker_threads: env_number::<usize>("CONVOY_BENCH_WORKER_THREADS"),
        // How fast the `move` workload's copy may go (`[admin] move_bytes_per_s`; unset: no
        // limit).
        move_bytes_per_s: env_number::<u64>("CONVOY_BENCH_MOVE_BYTES_PER_S"),
        dir: Some(dir.to_path_buf()),
        remove_dir_on_drop: std::env::var_os("CONVOY_BENCH_KEEP").is_none(),
        // One bench user drives every conversation at full speed: the store is measured,
        // not its per-user throttling.
        limits: LimitTweaks {
            // For trials of the accept path's bounds (the reconnect storm).
            handshakes_per_s: env_number::<u32>("CONVOY_BENCH_HANDSHAKES_PER_S"),
            handshakes_in_flight_max: env_number::<usize>("CONVOY_BENCH_HANDSHAKES_IN_FLIGHT"),
            ..LimitTweaks::unthrottled()
        },
        ..ClusterSpec::default()
    })
}

/// Waits until every shard has the same leader on every node, and leaders are balanced (or
/// `within` has passed with agreed but unbalanced leaders).
async fn wait_balanced(cluster: &LocalCluster, within: Duration) -> Result<Vec<u64>> {
    let client = cluster.admin()?;
    let nodes = cluster.node_ids();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(leaders) = client.agreed_leaders(&nodes).await {
            let fair = leaders.len() / nodes.len();
            let balanced = nodes.iter().all(|n| leaders.iter().filter(|l| *l == n).count() >= fair);
            if balanced || Instant::now() > deadline {
                return Ok(leaders);
            }
        } else if Instant::now() > deadline {
            bail!("bench cluster never became ready\n{}", cluster.logs_tail());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// fsync floor of the disk under `dir`: 4 KiB appends, each followed by fdatasync.
fn disk_fsync(dir: &Path, opts: BenchOptions) -> Result<Record> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
    let block = vec![7u8; 4096];
    let mut s = Samples::default();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < opts.phase().min(Duration::from_secs(5)) && n < 20_000 {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        s.push(t.elapsed());
        n += 1;
    }
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&path);
    Ok(record("disk_fsync", 1, 0, n, elapsed, s))
}

/// An fsync at least this slow counts as a disk stall (the nodes log such WAL fsyncs too).
pub const STALL_US: u64 = 50_000;

/// A witness of the data disk during a workload, independent of convoy: a thread overwrites
/// one 512-byte block of a file beside the servers' data and fdatasyncs it, every 2 ms (about
/// 400 small fsyncs a second, light beside the servers' own). On this machine all three
/// replicas share one disk; a stall the witness sees while a latency tail forms is the
/// disk's, whatever the servers do.
pub struct DiskWitness {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<Samples>>>,
    path: PathBuf,
}

impl DiskWitness {
    pub fn start(dir: &Path) -> std::io::Result<DiskWitness> {
        use std::os::unix::fs::FileExt;
        let path = dir.join("disk-witness");
        let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
        let block = [7u8; 512];
        file.write_all_at(&block, 0)?;
        file.sync_all()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("disk-witness".into()).spawn(move || {
                let mut s = Samples::default();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    file.write_all_at(&block, 0)?;
                    file.sync_data()?;
                    s.push(t.elapsed());
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(s)
            })?
        };
        Ok(DiskWitness { stop, thread: Some(thread), path })
    }

    /// Stops the witness: its fsync count, p50, p99 and max in µs, and how many took
    /// [`STALL_US`] or more; or the error that stopped it.
    pub fn finish(mut self) -> serde_json::Value {
        self.stop.store(true, Ordering::Relaxed);
        let joined = self.thread.take().map(|t| t.join());
        match joined {
            Some(Ok(Ok(s))) => json!({
                "fsyncs": s.len(),
                "p50_us": s.pct(0.5),
                "p99_us": s.pct(0.99),
                "max_us": s.pct(1.0),
                "stalls": s.at_least(STALL_US),
            }),
            Some(Ok(Err(e))) => json!({ "error": e.to_string() }),
            _ => json!({ "error": "the witness thread panicked" }),
        }
    }
}

impl Drop for DiskWitness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The heading the bench binaries print above [`witness_lines`].
pub const WITNESS_HEADING: &str = "the disk meanwhile (another process's 512-byte fdatasync every 2 ms):";

/// What the disk witness saw during each workload that ran one, one line each.
pub fn witness_lines(records: &[Record]) -> String {
    let mut s = String::new();
    for r in records {
        let Some(w) = r.extra.get("disk_witness") else { continue };
        let rate = r.extra.get("target_rate").map(|v| format!(" {v}/s")).unwrap_or_default();
        let line = match w.get("error") {
            Some(e) => format!("failed: {e}"),
            None => format!(
                "{} fsyncs, p50 {} µs, p99 {} µs, max {} µs, {} of {} ms or more",
                w["fsyncs"],
                w["p50_us"],
                w["p99_us"],
                w["max_us"],
                w["stalls"],
                STALL_US / 1000
            ),
        };
        s.push_str(&format!("{:<10} {}{}: {line}\n", r.system, r.workload, rate));
    }
    s
}

/// Durable appends into one RocksDB with the node's group commit, no replication.
async fn raw_append(dir: &Path, writers: usize, opts: BenchOptions) -> Result<Record> {
    let (store, _) = Store::open(&dir.join("raw-append"))?;
    let payload = text("raw").into_bytes();
    let (count, _errors, s, elapsed) =
        closed_loop(std::slice::from_ref(&store), writers, opts.phase(), move |store: Store, w, index| {
            let payload = payload.clone();
            async move {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let wrote = tokio::task::spawn_blocking(move || {
                    let mut b = rocksdb::WriteBatch::default();
                    b.put_cf(store.cf(CF_LOG), log_key(w as u32, index), payload);
                    store.write(b)?;
                    store.syncer.after_sync(Box::new(move |r| {
                        let _ = tx.send(r);
                    }));
                    Ok::<_, convoy::Error>(())
                })
                .await;
                matches!(wrote, Ok(Ok(()))) && matches!(rx.await, Ok(Ok(())))
            }
        })
        .await;
    let mut r = record("raw_append", writers, 0, count, elapsed, s);
    let rounds = store.syncer.stats.rounds.load(Ordering::Relaxed).max(1);
    r.extra.insert("appends_per_fsync".into(), json!(count as f64 / rounds as f64));
    Ok(r)
}

/// `senders` concurrent sequential senders over `conversations` conversations.
async fn send_load(
    config: &Config,
    pids: &[u32],
    workload: &str,
    senders: usize,
    conversations: usize,
    phase: Duration,
) -> Result<Record> {
    let clients: Vec<Client> = (0..senders.div_ceil(SENDERS_PER_CLIENT))
        .map(|_| Client::connect_user(config, TEST_USER))
        .collect::<convoy::Result<_>>()?;
    let before = node_counters(config, pids).await?;
    let body = text("load");
    let (count, errors, s, elapsed) = closed_loop(&clients, senders, phase, move |client: Client, i, _n| {
        let (conv, body) = (format!("bench-{}", i % conversations), body.clone());
        async move { client.send(&conv, &body).await.is_ok() }
    })
    .await;
    let after = node_counters(config, pids).await?;
    let mut r = record(workload, senders, conversations, count, elapsed, s);
    r.extra.insert("errors".into(), json!(errors));
    r.extra.insert("stages".into(), stage_breakdown(&before.stages, &after.stages));
    r.extra.extend(after.per_message_costs(&before, count as u64));
    Ok(r)
}

/// CPU time and context switches of processes, from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcUsage {
    /// utime + stime, in ms.
    pub cpu_ms: f64,
    /// Voluntary and involuntary context switches, summed over the process's threads.
    pub ctx_switches: u64,
}

impl ProcUsage {
    /// The sum over `pids` (a process that is gone counts nothing).
    pub fn of(pids: &[u32]) -> ProcUsage {
        let mut total = ProcUsage::default();
        for pid in pids {
            if let Some(u) = proc_usage(&format!("/proc/{pid}")) {
                total.cpu_ms += u.cpu_ms;
                total.ctx_switches += u.ctx_switches;
            }
        }
        total
    }

    /// This process (the load generator).
    pub fn of_self() -> ProcUsage {
        proc_usage("/proc/self").unwrap_or_default()
    }
}

/// A process's usage from its `stat` (utime and stime, fields 14 and 15, in clock ticks) and
/// the context switches of each of its threads (`task/*/status`).
fn proc_usage(dir: &str) -> Option<ProcUsage> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // The name (field 2) may hold spaces; the fields after it start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    let mut ctx_switches = 0;
    for task in std::fs::read_dir(format!("{dir}/task")).ok()?.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        ctx_switches += status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(ProcUsage { cpu_ms: ticks as f64 * 1000.0 / hz, ctx_switches })
}

/// CPU time and context switches of a system's server processes and of this load generator,
/// at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub servers: ProcUsage,
    pub load: ProcUsage,
}

impl Usage {
    /// Now, for the server processes `pids`.
    pub fn now(pids: &[u32]) -> Usage {
        Usage { servers: ProcUsage::of(pids), load: ProcUsage::of_self() }
    }

    /// Per 1,000 acked messages between `before` and now (`acked` of them): the servers' CPU
    /// (`cpu_ms_per_1k`), the load generator's apart (`load_cpu_ms_per_1k`), and the servers'
    /// context switches per message (`ctx_switches_per_msg`). Null when nothing was acked.
    pub fn costs_since(&self, before: &Usage, acked: u64) -> BTreeMap<String, serde_json::Value> {
        let switches = self.servers.ctx_switches.saturating_sub(before.servers.ctx_switches);
        BTreeMap::from([
            ("cpu_ms_per_1k".to_string(), per_1k(self.servers.cpu_ms - before.servers.cpu_ms, acked)),
            ("load_cpu_ms_per_1k".to_string(), per_1k(self.load.cpu_ms - before.load.cpu_ms, acked)),
            (
                "ctx_switches_per_msg".to_string(),
                if acked == 0 { serde_json::Value::Null } else { json!(round2(switches as f64 / acked as f64)) },
            ),
        ])
    }
}

/// `amount` per 1,000 of `acked`, rounded to hundredths; null when nothing was acked.
pub fn per_1k(amount: f64, acked: u64) -> serde_json::Value {
    if acked == 0 {
        serde_json::Value::Null
    } else {
        json!(round2(amount * 1000.0 / acked as f64))
    }
}

/// The value of an unlabelled sample `name` in Prometheus text (the peer benchmark reads
/// etcd's fsync and commit counters with it).
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse::<f64>().ok().map(|v| v as u64)).flatten()
    })
}

/// What the nodes and this load generator had done at one moment: their CPU and context
/// switches, and the nodes' own counters and send-path histograms.
pub struct NodeCounters {
    usage: Usage,
    append_rpcs: u64,
    append_rpcs_empty: u64,
    append_frames: u64,
    fsyncs: u64,
    stages: Vec<StageSnapshot>,
}

/// The open-loop operating point of the per-message costs: `rate` sends per second for
/// `phase`, spread over `conversations` conversations round-robin, whatever the answers' pace
/// (at most 512 unanswered). The same offered load for every configuration, so the nodes'
/// CPU per message compares across builds even when throughput cannot.
async fn send_paced(config: &Config, pids: &[u32], rate: u64, conversations: usize, phase: Duration) -> Result<Record> {
    let client = Client::connect_user(config, TEST_USER)?;
    let before = node_counters(config, pids).await?;
    let (samples, failed, elapsed) = paced_phase(rate, conversations, phase, move |conv, body| {
        let client = client.clone();
        async move { client.send(&format!("paced-{conv}"), &body).await.is_ok() }
    })
    .await?;
    let after = node_counters(config, pids).await?;
    let acked = samples.len();
    let mut r = paced_record(rate, conversations, elapsed, samples, failed);
    r.extra.insert("stages".into(), stage_breakdown(&before.stages, &after.stages));
    r.extra.extend(after.per_message_costs(&before, acked));
    Ok(r)
}

/// Workload `send_paced`: `rate` sends per second for `phase`, open loop (whatever the
/// answers' pace, at most 512 unanswered), over conversations `0..conversations`
/// round-robin; `send(conversation, body)` says whether the send was acked. Returns the acked
/// sends' latencies, the failures and the phase's length.
pub async fn paced_phase<F, Fut>(
    rate: u64,
    conversations: usize,
    phase: Duration,
    send: F,
) -> Result<(Samples, u64, Duration)>
where
    F: Fn(u64, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let samples = Arc::new(Mutex::new(Samples::default()));
    let next = Arc::new(AtomicU64::new(0));
    let send = Arc::new(send);
    let started = Instant::now();
    let failed = {
        let samples = samples.clone();
        paced_sender(started, rate, phase, move |body| {
            let (send, samples) = (send.clone(), samples.clone());
            let conv = next.fetch_add(1, Ordering::Relaxed) % conversations.max(1) as u64;
            async move {
                let t = Instant::now();
                let ok = send(conv, body).await;
                if ok {
                    if let Ok(mut s) = samples.lock() {
                        s.push(t.elapsed());
                    }
                }
                ok
            }
        })
        .await?
    };
    let elapsed = started.elapsed();
    let s = samples.lock().map(|s| s.clone()).unwrap_or_default();
    Ok((s, failed, elapsed))
}

/// The record of a [`paced_phase`].
pub fn paced_record(rate: u64, conversations: usize, elapsed: Duration, samples: Samples, failed: u64) -> Record {
    let acked = samples.len();
    let mut r = record("send_paced", 0, conversations, acked as usize, elapsed, samples);
    r.extra.insert("target_rate".into(), json!(rate));
    r.extra.insert("errors".into(), json!(failed));
    r
}

/// The open-loop operating point's rate and conversations (the same for convoy and its peers).
pub const PACED_RATE: u64 = 3_000;
pub const PACED_CONVERSATIONS: usize = 64;

/// Every node's counters now (status needs an admin credential).
async fn node_counters(config: &Config, pids: &[u32]) -> Result<NodeCounters> {
    let client = Client::connect_user(config, convoy::net::tls::ADMIN_USER)?;
    let mut c = NodeCounters {
        usage: Usage::now(pids),
        append_rpcs: 0,
        append_rpcs_empty: 0,
        append_frames: 0,
        fsyncs: 0,
        stages: Vec::new(),
    };
    for id in config.node_ids() {
        let s = client.status(id).await?;
        c.append_rpcs += s.append_rpcs;
        c.append_rpcs_empty += s.append_rpcs_empty;
        c.append_frames += s.append_frames;
        c.fsyncs += s.fsyncs;
        c.stages.extend(s.stages);
    }
    Ok(c)
}

impl NodeCounters {
    /// Per 1,000 acked messages between `before` and now (`acked` of them): the costs of
    /// [`Usage::costs_since`], AppendEntries carrying entries and empty ones
    /// (`appends_per_1k`, `appends_empty_per_1k`), the per-peer frames that carried them
    /// (`frames_per_1k`, 0 with a lane per group) and WAL fsyncs on all nodes
    /// (`fsyncs_per_1k`).
    pub fn per_message_costs(&self, before: &NodeCounters, acked: u64) -> BTreeMap<String, serde_json::Value> {
        let empty = self.append_rpcs_empty.saturating_sub(before.append_rpcs_empty);
        let carrying = self.append_rpcs.saturating_sub(before.append_rpcs).saturating_sub(empty);
        let mut costs = self.usage.costs_since(&before.usage, acked);
        costs.insert("appends_per_1k".into(), per_1k(carrying as f64, acked));
        costs.insert("appends_empty_per_1k".into(), per_1k(empty as f64, acked));
        costs.insert("fsyncs_per_1k".into(), per_1k(self.fsyncs.saturating_sub(before.fsyncs) as f64, acked));
        costs.insert(
            "frames_per_1k".into(),
            per_1k(self.append_frames.saturating_sub(before.append_frames) as f64, acked),
        );
        costs
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The per-message costs of the records that have them, one line each.
pub fn cost_lines(records: &[Record]) -> String {
    let mut s = String::new();
    for r in records {
        let Some(cpu) = r.extra.get("cpu_ms_per_1k") else { continue };
        let f = |k: &str| r.extra.get(k).filter(|v| !v.is_null()).map_or_else(|| "-".to_string(), |v| v.to_string());
        let shape = match r.extra.get("target_rate") {
            Some(rate) => format!("{rate}/s"),
            None => format!("{}x{}", r.senders, r.conversations),
        };
        s.push_str(&format!(
            "{:<10} {:<16} {:>7} per 1k msgs: servers {cpu} CPU-ms, load {} CPU-ms, {} appends (+{} empty), {} fsyncs; {} ctx switches/msg\n",
            r.system,
            r.workload,
            shape,
            f("load_cpu_ms_per_1k"),
            f("appends_per_1k"),
            f("appends_empty_per_1k"),
            f("fsyncs_per_1k"),
            f("ctx_switches_per_msg"),
        ));
    }
    s
}

/// Per stage, over all nodes, what was recorded between two [`node_counters`]: count, p50
/// and p99 in µs (bucket bounds, 12.5 % resolution).
fn stage_breakdown(before: &[StageSnapshot], after: &[StageSnapshot]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for stage in Stage::ALL {
        let (b, a) = (StageSnapshot::merge(stage.name(), before), StageSnapshot::merge(stage.name(), after));
        let period = a.since(&b);
        if let (Some(p50), Some(p99), Some(max)) =
            (period.quantile_us(0.5), period.quantile_us(0.99), period.quantile_us(1.0))
        {
            out.insert(
                stage.name().into(),
                json!({"count": period.count(), "p50_us": p50, "p99_us": p99, "max_us": max}),
            );
        }
    }
    serde_json::Value::Object(out)
}

/// The send-path breakdown of the records that have one, one line each.
pub fn stage_lines(records: &[Record]) -> String {
    let mut s = String::new();
    for r in records {
        let Some(serde_json::Value::Object(stages)) = r.extra.get("stages") else { continue };
        let parts: Vec<String> = Stage::ALL
            .iter()
            .filter_map(|st| {
                stages.get(st.name()).map(|v| format!("{} {}/{}/{}", st.name(), v["p50_us"], v["p99_us"], v["max_us"]))
            })
            .collect();
        let shape = match r.extra.get("target_rate") {
            Some(rate) => format!("{rate}/s"),
            None => format!("{}x{}", r.senders, r.conversations),
        };
        s.push_str(&format!("{:<16} {:>7} p50/p99/max µs: {}\n", r.workload, shape, parts.join(", ")));
    }
    s
}

/// Send → receipt latency at a fixed rate, subscriber on a follower of the shard.
async fn push_latency(
    config: &Config,
    pids: &[u32],
    dir: &Path,
    leaders: &[u64],
    rate: u64,
    phase: Duration,
) -> Result<Record> {
    let conv = format!("push-{rate}");
    let shard = convoy::chat::shard_of(&conv, config.shards);
    let leader = leaders.get(shard as usize).copied().unwrap_or(1);
    let follower = (1..=3u64).find(|n| *n != leader).unwrap_or(1);
    let client = Client::connect_user(config, TEST_USER)?;
    let epoch = Instant::now();
    let mut sub = client.subscribe(&conv, 1, Some(follower));
    // Wait until attached and caught up (empty conversation).
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.ok().flatten() {
        if matches!(ev, Event::CaughtUp { .. }) {
            break;
        }
    }
    let sender = Client::connect_user(config, TEST_USER)?;
    let total = (rate as f64 * phase.as_secs_f64()) as u64;
    let before = node_counters(config, pids).await?;
    let witness = DiskWitness::start(dir)?;
    let send_task = {
        let conv = conv.clone();
        paced_sender(epoch, rate, phase, move |body| {
            let (sender, conv) = (sender.clone(), conv.clone());
            async move { sender.send(&conv, &body).await.is_ok() }
        })
    };
    let mut s = Samples::default();
    let mut received = 0u64;
    let deadline = Instant::now() + phase + Duration::from_secs(15);
    while received < total && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(Event::Message(m))) => {
                received += 1;
                if let Some(d) = latency_of(m.text.as_bytes(), epoch) {
                    s.push(d);
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let _ = send_task.await;
    let witnessed = witness.finish();
    let after = node_counters(config, pids).await?;
    let mut r = record("push_latency", 1, 1, received as usize, phase, s);
    r.extra.insert("stages".into(), stage_breakdown(&before.stages, &after.stages));
    r.extra.extend(after.per_message_costs(&before, received));
    r.extra.insert("disk_witness".into(), witnessed);
    r.msgs_per_s = rate as f64;
    r.extra.insert("target_rate".into(), json!(rate));
    r.extra.insert("received".into(), json!(received));
    r.extra.insert("sent".into(), json!(total));
    r.extra.insert("subscriber_on".into(), json!(format!("follower (node {follower})")));
    Ok(r)
}

/// One conversation, `subscribers` subscribers spread over the replicas and over many client
/// connections (each subscription is one stream; a client keeps up to 24 on its connection
/// to a node and the rest on connections of their own): sends at
/// `rate` per second; reports deliveries per second, delivery latency, and how many
/// subscribers missed messages by the end (stalled).
async fn fan_out(config: &Config, subscribers: usize, rate: u64, phase: Duration) -> Result<Record> {
    const SUBSCRIPTIONS_PER_CLIENT: usize = 50;
    let conv = format!("fan-out-{subscribers}");
    let epoch = Instant::now();
    let clients: Vec<Client> = (0..subscribers.div_ceil(SUBSCRIPTIONS_PER_CLIENT))
        .map(|_| Client::connect_user(config, TEST_USER))
        .collect::<convoy::Result<_>>()?;
    let samples = Arc::new(Mutex::new(Samples::default()));
    let delivered = Arc::new(AtomicU64::new(0));
    let total = (rate as f64 * phase.as_secs_f64()) as u64;
    let mut tasks = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers.max(1));
    for i in 0..subscribers {
        let client = clients[i / SUBSCRIPTIONS_PER_CLIENT].clone();
        let (conv, samples, delivered, ready_tx) = (conv.clone(), samples.clone(), delivered.clone(), ready_tx.clone());
        let node = (i % 3) as u64 + 1;
        tasks.push(tokio::spawn(async move {
            let mut sub = client.subscribe(&conv, 1, Some(node));
            let mut got = 0u64;
            let deadline = Instant::now() + phase + Duration::from_secs(30);
            while got < total && Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
                    Ok(Some(Event::CaughtUp { .. })) => {
                        let _ = ready_tx.try_send(());
                    }
                    Ok(Some(Event::Message(m))) => {
                        got += 1;
                        // One shared histogram, not one per subscriber: a thousand of them
                        // would hold about 100 MB in this process beside the nodes.
                        if let Some(d) = latency_of(m.text.as_bytes(), epoch) {
                            samples.lock().expect("samples lock").push(d);
                        }
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            delivered.fetch_add(got, Ordering::Relaxed);
            got
        }));
    }
    drop(ready_tx);
    // Wait until every subscriber is attached and caught up (bounded).
    let attach_deadline = Instant::now() + Duration::from_secs(60);
    let mut ready = 0;
    while ready < subscribers && Instant::now() < attach_deadline {
        match tokio::time::timeout(Duration::from_secs(5), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => break,
        }
    }
    let sender = Client::connect_user(config, TEST_USER)?;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut next = tokio::time::Instant::now();
    for i in 0..total {
        next += interval;
        tokio::time::sleep_until(next).await;
        let sent_us = epoch.elapsed().as_micros() as u64;
        let _ = sender.send(&conv, &text(&format!("{sent_us}:{i}:"))).await;
    }
    let mut stalled = 0u64;
    for t in tasks {
        if t.await.unwrap_or(0) < total {
            stalled += 1;
        }
    }
    let elapsed = started.elapsed();
    let s = samples.lock().expect("samples lock").clone();
    let deliveries = delivered.load(Ordering::Relaxed);
    let mut r = record("fan_out", 1, 1, deliveries as usize, elapsed, s);
    r.extra.insert("subscribers".into(), json!(subscribers));
    r.extra.insert("attached_before_sending".into(), json!(ready));
    r.extra.insert("send_rate".into(), json!(rate));
    r.extra.insert("stalled_subscribers".into(), json!(stalled));
    Ok(r)
}

/// Preloads a conversation, then reads it from offset 1 on a follower.
async fn catch_up(config: &Config, leaders: &[u64], messages: usize) -> Result<Record> {
    let conv = "catch-up";
    let clients: Vec<Client> =
        (0..8).map(|_| Client::connect_user(config, TEST_USER)).collect::<convoy::Result<_>>()?;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..256 {
        let (client, next) = (clients[i % clients.len()].clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let body = text("catch-up");
            while (next.fetch_add(1, Ordering::Relaxed) as usize) < messages {
                let _ = client.send(conv, &body).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let shard = convoy::chat::shard_of(conv, config.shards);
    let leader = leaders.get(shard as usize).copied().unwrap_or(1);
    let follower = (1..=3u64).find(|n| *n != leader).unwrap_or(1);
    let reader = Client::connect_user(config, TEST_USER)?;
    // Wait until the follower has applied everything.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok((_, head)) = reader.get_cursor(follower, conv).await {
            if head as usize >= messages {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The reader checks every message and keeps none, as JetStream's catch-up consumer in
    // `convoy-bench-peers` does (collecting 200,000 messages measured the client's allocator).
    let read_all = || async {
        let started = Instant::now();
        let n = reader
            .read_each(conv, 1, follower, |item| match item {
                ReadItem::Message(m) if m.text.len() == MESSAGE_BYTES => Ok(()),
                ReadItem::Message(m) => Err(convoy::Error::Protocol(format!(
                    "catch_up: offset {} came back with {} bytes",
                    m.offset,
                    m.text.len()
                ))),
                ReadItem::Truncated { earliest } => {
                    Err(convoy::Error::Protocol(format!("catch_up: truncated before {earliest} with no retention set")))
                }
            })
            .await?;
        Ok::<_, anyhow::Error>((n, started.elapsed()))
    };
    // Profiling aid: CONVOY_BENCH_CATCH_UP_REPEAT=N reads the conversation N more times first.
    for _ in 0..env_number::<usize>("CONVOY_BENCH_CATCH_UP_REPEAT").unwrap_or(0) {
        let (n, took) = read_all().await?;
        eprintln!("catch_up: {n} messages in {took:?}");
    }
    let (got, elapsed) = read_all().await?;
    let mut r = record("catch_up", 1, 1, got as usize, elapsed, Samples::default());
    r.extra.insert("messages".into(), json!(got));
    r.extra.insert("read_from".into(), json!(format!("follower (node {follower})")));
    Ok(r)
}

/// Resident memory of a process in KiB (Linux `/proc/<pid>/status`), 0 if unreadable.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// `count` clients, each on its own QUIC connection (sharing a few client UDP sockets), each
/// attached to its own idle conversation on one of the replicas: the nodes' memory growth
/// per attached connection, then push latency at 500 msgs/s while they stay attached.
async fn connections(cluster: &LocalCluster, leaders: &[u64], opts: BenchOptions) -> Result<Record> {
    const CONNECTIONS_PER_SOCKET: usize = 500;
    const ATTACHING_AT_ONCE: usize = 256;
    let count: usize = if opts.quick { 2_000 } else { 10_000 };
    let config = cluster.config();
    let pids: Vec<u32> = cluster.node_ids().into_iter().filter_map(|id| cluster.pid(id)).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let endpoints: Vec<quinn::Endpoint> =
        (0..count.div_ceil(CONNECTIONS_PER_SOCKET)).map(|_| Client::endpoint()).collect::<convoy::Result<_>>()?;
    let started = Instant::now();
    let mut attaching = tokio::task::JoinSet::new();
    let mut attached = Vec::with_capacity(count);
    let mut failed = 0u64;
    for i in 0..count {
        let client = Client::connect_on(config, TEST_USER, endpoints[i % endpoints.len()].clone())?;
        attaching.spawn(async move {
            let mut sub = client.subscribe(&format!("inbox-{i}"), 1, Some((i % 3) as u64 + 1));
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Ok(Some(ev)) = tokio::time::timeout_at(deadline.into(), sub.next()).await {
                if matches!(ev, Event::CaughtUp { .. }) {
                    return Some((client, sub));
                }
            }
            None
        });
        while attaching.len() >= ATTACHING_AT_ONCE {
            match attaching.join_next().await {
                Some(Ok(Some(pair))) => attached.push(pair),
                _ => failed += 1,
            }
        }
    }
    while let Some(r) = attaching.join_next().await {
        match r {
            Ok(Some(pair)) => attached.push(pair),
            _ => failed += 1,
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    // Let the handshakes' transient buffers go and a few keep-alive rounds pass.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let grown_bytes: u64 = after.iter().zip(&before).map(|(a, b)| a.saturating_sub(*b) * 1024).sum();
    let per_connection = grown_bytes / (attached.len().max(1) as u64);
    let push = push_latency(config, &pids, cluster.dir(), leaders, 500, opts.phase()).await?;
    let still_attached = attached.iter().filter(|(_, sub)| !sub.rx.is_closed()).count();
    let mut r = push.clone();
    r.workload = "connections".into();
    r.extra.insert("connections".into(), json!(attached.len()));
    r.extra.insert("failed_to_attach".into(), json!(failed));
    r.extra.insert("attached_after_push".into(), json!(still_attached));
    r.extra.insert("attach_s".into(), json!(connect_s));
    r.extra.insert("rss_kib_before".into(), json!(before));
    r.extra.insert("rss_kib_after".into(), json!(after));
    r.extra.insert("bytes_per_connection".into(), json!(per_connection));
    drop(attached);
    for e in &endpoints {
        e.close(0u32.into(), b"bench done");
    }
    Ok(r)
}

/// Node-wide count of sends answered `Throttled` by a rate limit.
async fn throttled_total(config: &Config) -> Result<u64> {
    let admin = Client::connect_user(config, convoy::net::tls::ADMIN_USER)?;
    let mut total = 0;
    for id in config.node_ids() {
        total += admin.status(id).await?.sends_throttled;
    }
    Ok(total)
}

/// A conversation named `prefix-N` whose shard `leaders` assigns to `node`.
fn conversation_led_by(config: &Config, leaders: &[u64], node: u64, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|c| leaders.get(convoy::chat::shard_of(c, config.shards) as usize) == Some(&node))
        .expect("some conversation maps to every shard")
}

/// Sequential sends of one client for `phase`: their latencies.
async fn sequential_sends(client: &Client, conversation: &str, phase: Duration) -> Result<Samples> {
    let mut samples = Samples::default();
    let until = Instant::now() + phase;
    let mut i = 0u64;
    while Instant::now() < until {
        let started = Instant::now();
        client.send(conversation, &format!("polite {i}")).await?;
        samples.push(started.elapsed());
        i += 1;
    }
    Ok(samples)
}

/// One flood sender: its client, its conversation, and the text its send count follows.
struct Flooder {
    client: Client,
    conversation: String,
    label: String,
}

/// `flooders` sending as fast as they are let (waiting `after_error` after a failed send, if
/// given) and, once the flood has run 2 s, the polite user's sequential sends to `quiet` for
/// `phase`: their latencies, and the flood's acked rate meanwhile.
async fn polite_under_flood(
    polite: &Client,
    quiet: &str,
    phase: Duration,
    flooders: Vec<Flooder>,
    after_error: Option<Duration>,
) -> Result<(Samples, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut flood = tokio::task::JoinSet::new();
    for Flooder { client, conversation, label } in flooders {
        let (stop, acked) = (stop.clone(), acked.clone());
        flood.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match client.send(&conversation, &format!("{label}{i}")).await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        if let Some(wait) = after_error {
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
                i += 1;
            }
        });
    }
    // Let the flood reach its steady state (buckets drained) before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked_before, started) = (acked.load(Ordering::Relaxed), Instant::now());
    let under = sequential_sends(polite, quiet, phase).await?;
    let flood_rate = (acked.load(Ordering::Relaxed) - acked_before) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    while flood.join_next().await.is_some() {}
    Ok((under, flood_rate))
}

/// Fairness on a cluster with the product's default limits: one polite user sending one
/// message at a time to a conversation, first alone, then while 64 other users (one client
/// each, sending as fast as they are let) flood another conversation led by the same node.
/// The polite sender's p99 under the flood is compared with its p99 alone; the flood's
/// throttled answers are counted on the nodes.
async fn fairness(dir: &Path, opts: BenchOptions) -> Result<Record> {
    const FLOODERS: usize = 64;
    let cluster = LocalCluster::launch(ClusterSpec {
        shards: env_number::<u32>("CONVOY_BENCH_SHARDS").unwrap_or(16),
        dir: Some(dir.to_path_buf()),
        remove_dir_on_drop: std::env::var_os("CONVOY_BENCH_KEEP").is_none(),
        ..ClusterSpec::default()
    })?;
    let leaders = wait_balanced(&cluster, Duration::from_secs(60)).await?;
    let config = cluster.config().clone();
    let loud = conversation_led_by(&config, &leaders, 1, "loud");
    let quiet = conversation_led_by(&config, &leaders, 1, "quiet");
    let polite = cluster.client_as("polite")?;
    let flooders: Vec<Client> =
        (0..FLOODERS).map(|i| cluster.client_as(&format!("flood-{i}"))).collect::<Result<_>>()?;
    let members: Vec<String> = (1..FLOODERS).map(|i| format!("flood-{i}")).collect();
    flooders[0].create_conversation(&loud, &members).await?;
    polite.send(&quiet, "hello").await?;

    let idle = sequential_sends(&polite, &quiet, opts.phase()).await?;
    let throttled_before = throttled_total(&config).await?;
    let flooders = flooders
        .into_iter()
        .map(|client| Flooder { client, conversation: loud.clone(), label: "flood ".into() })
        .collect();
    let (under, flood_rate) = polite_under_flood(&polite, &quiet, opts.phase(), flooders, None).await?;
    let throttled = throttled_total(&config).await?.saturating_sub(throttled_before);
    let (idle_p50, idle_p99) = (idle.pct(0.5), idle.pct(0.99));
    let count = under.len();
    let mut r = record("fairness", FLOODERS + 1, 2, count as usize, opts.phase(), under);
    r.extra.insert("polite_p99_us".into(), json!(r.p99_us));
    r.extra.insert("idle_p50_us".into(), json!(idle_p50));
    r.extra.insert("idle_p99_us".into(), json!(idle_p99));
    r.extra.insert("p99_ratio".into(), json!(r.p99_us as f64 / idle_p99.max(1) as f64));
    r.extra.insert("flood_msgs_per_s".into(), json!(flood_rate));
    r.extra.insert("throttled".into(), json!(throttled));
    r.extra.insert(
        "limits".into(),
        json!({
            "user_sends_per_s": config.limits.user_sends_per_s,
            "conversation_sends_per_s": config.limits.conversation_sends_per_s,
            "connection_sends_per_s": config.limits.connection_sends_per_s,
        }),
    );
    Ok(r)
}

/// What one side of `fair_window` measured.
struct WindowSide {
    idle: Samples,
    under: Samples,
    flood_rate: f64,
    throttled: u64,
}

/// One side of `fair_window`: a cluster with rate limits off and the given shard window; a
/// polite user's sequential sends to a conversation of the same shard as a flooded one,
/// alone, then under a flood of `flooders` × `each` concurrent sends.
async fn fair_window_side(dir: &Path, opts: BenchOptions, window: u32) -> Result<WindowSide> {
    const FLOODERS: usize = 32;
    const EACH: usize = 48;
    let cluster = LocalCluster::launch(ClusterSpec {
        shards: env_number::<u32>("CONVOY_BENCH_SHARDS").unwrap_or(16),
        dir: Some(dir.to_path_buf()),
        remove_dir_on_drop: std::env::var_os("CONVOY_BENCH_KEEP").is_none(),
        limits: LimitTweaks { shard_window_sends: Some(window), ..LimitTweaks::unthrottled() },
        ..ClusterSpec::default()
    })?;
    let leaders = wait_balanced(&cluster, Duration::from_secs(60)).await?;
    let config = cluster.config().clone();
    let loud = conversation_led_by(&config, &leaders, 1, "loud");
    let shard = convoy::chat::shard_of(&loud, config.shards);
    let quiet = (0..)
        .map(|i| format!("quiet-{i}"))
        .find(|c| convoy::chat::shard_of(c, config.shards) == shard)
        .expect("some conversation maps to every shard");
    let polite = cluster.client_as("polite")?;
    let flooders: Vec<Client> =
        (0..FLOODERS).map(|i| cluster.client_as(&format!("flood-{i}"))).collect::<Result<_>>()?;
    let members: Vec<String> = (1..FLOODERS).map(|i| format!("flood-{i}")).collect();
    flooders[0].create_conversation(&loud, &members).await?;
    polite.send(&quiet, "hello").await?;

    let idle = sequential_sends(&polite, &quiet, opts.phase()).await?;
    let throttled_before = throttled_total(&config).await?;
    let flooders = flooders
        .iter()
        .enumerate()
        .flat_map(|(f, client)| {
            let loud = &loud;
            (0..EACH).map(move |t| Flooder {
                client: client.clone(),
                conversation: loud.clone(),
                label: format!("flood {f}/{t}/"),
            })
        })
        .collect();
    let (under, flood_rate) =
        polite_under_flood(&polite, &quiet, opts.phase(), flooders, Some(Duration::from_millis(5))).await?;
    let throttled = throttled_total(&config).await?.saturating_sub(throttled_before);
    Ok(WindowSide { idle, under, flood_rate, throttled })
}

/// Fair proposal scheduling, on and off, in one run: with send rate limits off, 32 users
/// keep 1,536 sends in flight into one conversation while a polite user sends one message at
/// a time to another conversation of the same shard. With the shard window (the default)
/// the polite sends wait behind one turn of the flood; with it off (`shard_window_sends = 0`)
/// they queue behind the flood's whole backlog in Raft.
async fn fair_window(dir: &Path, opts: BenchOptions) -> Result<Record> {
    let window = env_number::<u32>("CONVOY_BENCH_WINDOW").unwrap_or(convoy::chat::limits::SHARD_WINDOW_SENDS_DEFAULT);
    let on = fair_window_side(&dir.join("window-on"), opts, window).await?;
    let off = fair_window_side(&dir.join("window-off"), opts, 0).await?;
    let count = on.under.len();
    let (off_p50, off_p99) = (off.under.pct(0.5), off.under.pct(0.99));
    let mut r = record("fair_window", 32 * 48 + 1, 2, count as usize, opts.phase(), on.under);
    r.extra.insert("polite_p99_us".into(), json!(r.p99_us));
    r.extra.insert("idle_p99_us".into(), json!(on.idle.pct(0.99)));
    r.extra.insert("p99_ratio".into(), json!(r.p99_us as f64 / on.idle.pct(0.99).max(1) as f64));
    r.extra.insert("flood_msgs_per_s".into(), json!(on.flood_rate));
    r.extra.insert("throttled".into(), json!(on.throttled));
    r.extra.insert("window_sends".into(), json!(window));
    r.extra.insert(
        "window_off".into(),
        json!({
            "polite_p50_us": off_p50,
            "polite_p99_us": off_p99,
            "idle_p99_us": off.idle.pct(0.99),
            "flood_msgs_per_s": off.flood_rate,
            "throttled": off.throttled,
        }),
    );
    Ok(r)
}

/// A reconnect storm: `count` subscribers, each on a conversation of its own and all attached
/// to node 2, follow from offset 1; node 2 is killed and restarted. Measured: the time from
/// the restart until every subscriber is live again (caught up after re-attaching), node 2's
/// peak resident memory meanwhile, and that each subscriber whose conversation got a message
/// while node 2 was down received it.
async fn reconnect_storm(dir: &Path, opts: BenchOptions) -> Result<Record> {
    const CONNECTIONS_PER_SOCKET: usize = 500;
    const NODE: u64 = 2;
    let count: usize = if opts.quick { 1_000 } else { 5_000 };
    let mut cluster = start_cluster(dir, opts)?;
    wait_balanced(&cluster, Duration::from_secs(60)).await?;
    let config = cluster.config().clone();
    let endpoints: Vec<quinn::Endpoint> =
        (0..count.div_ceil(CONNECTIONS_PER_SOCKET)).map(|_| Client::endpoint()).collect::<convoy::Result<_>>()?;
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<(usize, Event)>();
    let mut subscriptions = tokio::task::JoinSet::new();
    for i in 0..count {
        let client = Client::connect_on(&config, TEST_USER, endpoints[i % endpoints.len()].clone())?;
        let tx = events_tx.clone();
        subscriptions.spawn(async move {
            let mut sub = client.subscribe(&format!("storm-{i}"), 1, Some(NODE));
            while let Some(ev) = sub.next().await {
                if tx.send((i, ev)).is_err() {
                    return;
                }
            }
        });
    }
    drop(events_tx);
    // All attached and caught up.
    let mut live = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while live.len() < count {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Ok(Some((i, Event::CaughtUp { .. }))) => {
                live.insert(i);
            }
            Ok(Some(_)) => {}
            _ => bail!("only {} of {count} subscribers attached", live.len()),
        }
    }
    let pid_before = cluster.pid(NODE);
    cluster.kill(NODE);
    // While node 2 is down, every 50th conversation gets a message (the other nodes serve).
    let sender = Client::connect_user(&config, TEST_USER)?;
    let mut expected = std::collections::BTreeMap::new();
    for i in (0..count).step_by(50) {
        let ack = sender.send(&format!("storm-{i}"), &format!("while down {i}")).await?;
        expected.insert(i, ack.offset);
    }
    while events.try_recv().is_ok() {}
    cluster.start(NODE)?;
    let restarted = Instant::now();
    let pid = cluster.pid(NODE).filter(|p| Some(*p) != pid_before);
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(pid) = pid {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut relive = std::collections::HashSet::new();
    let mut received = std::collections::HashSet::new();
    let mut attach_latency = Samples::default();
    let mut live_at = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while relive.len() < count || received.len() < expected.len() {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Ok(Some((i, Event::CaughtUp { .. }))) => {
                if relive.insert(i) {
                    let at = restarted.elapsed();
                    live_at.push(at.as_secs_f64());
                    attach_latency.push(at);
                }
            }
            Ok(Some((i, Event::Message(m)))) => {
                if expected.get(&i) == Some(&m.offset) {
                    received.insert(i);
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let all_live_s = restarted.elapsed().as_secs_f64();
    // How the storm drains: subscribers live again in each half second after the restart.
    let mut live_per_half_s = vec![0usize; (all_live_s * 2.0) as usize + 1];
    for at in &live_at {
        if let Some(n) = live_per_half_s.get_mut((at * 2.0) as usize) {
            *n += 1;
        }
    }
    sampler.abort();
    let peak_kib = peak.load(Ordering::Relaxed);
    let after_kib = pid.map(rss_kib).unwrap_or(0);
    subscriptions.abort_all();
    for e in &endpoints {
        e.close(0u32.into(), b"bench done");
    }
    let mut r =
        record("reconnect_storm", count, count, relive.len(), Duration::from_secs_f64(all_live_s), attach_latency);
    r.extra.insert("subscribers".into(), json!(count));
    r.extra.insert("live_again".into(), json!(relive.len()));
    r.extra.insert("all_live_s".into(), json!(all_live_s));
    r.extra.insert("sent_while_down".into(), json!(expected.len()));
    r.extra.insert("received_after".into(), json!(received.len()));
    r.extra.insert("live_per_half_s".into(), json!(live_per_half_s));
    r.extra.insert("peak_rss_kib".into(), json!(peak_kib));
    r.extra.insert("rss_kib_after".into(), json!(after_kib));
    Ok(r)
}

/// Sends per second that go on through the `move` workload.
pub const MOVE_RATE: u64 = 1_000;

impl BenchOptions {
    /// Messages the moved shard holds before the `move` workload moves it.
    pub fn move_messages(&self) -> usize {
        if self.quick {
            50_000
        } else {
            1_000_000
        }
    }
}

/// A send's start, and its latency if it was acked.
type SendTiming = (Instant, Option<Duration>);

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// The newest cluster map the nodes report.
async fn cluster_map(admin: &Client, nodes: &[u64]) -> convoy::placement::ClusterMap {
    let mut statuses = Vec::new();
    for &id in nodes {
        statuses.push((id, admin.status(id).await.ok()));
    }
    convoy::admin::newest_map(&statuses)
}

/// Workload `move`: one shard is filled with [`BenchOptions::move_messages`] messages over 16
/// conversations, a fourth node is added, and the shard's replica on its leader moves there
/// (`admin move`, no bandwidth limit) while [`MOVE_RATE`] sends per second keep flowing into
/// the same conversations, open loop. Records the move's time, the bytes the new replica holds
/// on disk once it votes and their rate over the move, and the sends' p50/p99 during the move
/// against the phase before it (the record's own p50/p99 are those during the move).
async fn shard_move(dir: &Path, opts: BenchOptions) -> Result<Record> {
    let mut cluster = start_cluster(dir, opts)?;
    let leaders = wait_balanced(&cluster, Duration::from_secs(60)).await?;
    let shards = cluster.config().shards;
    let shard = convoy::chat::shard_of("move-0", shards);
    let convs: Arc<Vec<String>> = Arc::new(
        (0..).map(|i| format!("move-{i}")).filter(|c| convoy::chat::shard_of(c, shards) == shard).take(16).collect(),
    );
    let from = leaders.get(shard as usize).copied().unwrap_or(1);

    // The fourth node first: clients learn nodes from their cluster file, and the moved
    // shard's leadership goes there.
    let to = cluster.add_node()?;
    cluster.start(to)?;
    let admin = cluster.admin()?;
    let nodes = cluster.node_ids();
    let registered = Instant::now() + Duration::from_secs(60);
    while !cluster_map(&admin, &nodes).await.nodes.iter().any(|n| n.id == to) {
        if Instant::now() > registered {
            bail!("node {to} never registered\n{}", cluster.logs_tail());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let config = cluster.config().clone();

    // Fill the shard.
    let messages = opts.move_messages();
    let filled = Instant::now();
    let clients: Vec<Client> =
        (0..8).map(|_| Client::connect_user(&config, TEST_USER)).collect::<convoy::Result<_>>()?;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..256 {
        let (client, next, convs) = (clients[i % clients.len()].clone(), next.clone(), convs.clone());
        tasks.push(tokio::spawn(async move {
            let body = text("move-fill");
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                if n >= messages {
                    break;
                }
                while client.send(&convs[n % convs.len()], &body).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let fill_s = filled.elapsed().as_secs_f64();

    // Steady sends from now until the move is done: each send's start and latency.
    let sender = Client::connect_user(&config, TEST_USER)?;
    let stop = Arc::new(AtomicBool::new(false));
    let timings: Arc<Mutex<Vec<SendTiming>>> = Arc::default();
    let pacer = {
        let (stop, timings, convs) = (stop.clone(), timings.clone(), convs.clone());
        tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / MOVE_RATE as f64);
            let mut due = tokio::time::Instant::now();
            let mut in_flight = tokio::task::JoinSet::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                due += interval;
                tokio::time::sleep_until(due).await;
                let (sender, timings, conv) = (sender.clone(), timings.clone(), convs[i % convs.len()].clone());
                i += 1;
                in_flight.spawn(async move {
                    let t = Instant::now();
                    let ok = sender.send(&conv, &text("move-steady")).await.is_ok();
                    if let Ok(mut v) = timings.lock() {
                        v.push((t, ok.then(|| t.elapsed())));
                    }
                });
                while in_flight.len() > 512 {
                    in_flight.join_next().await;
                }
            }
            while in_flight.join_next().await.is_some() {}
        })
    };
    let steady_from = Instant::now();
    tokio::time::sleep(opts.phase()).await;

    let started = Instant::now();
    admin.move_replica(shard, from, to).await?;
    let deadline = started + Duration::from_secs(1800);
    loop {
        let map = cluster_map(&admin, &nodes).await;
        let done = map.operation_on(shard).is_none() && map.shard(shard).is_some_and(|p| p.voters.contains(&to));
        if done {
            break;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!("the move of shard {shard} did not finish within 30 min\n{}", cluster.logs_tail());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let move_time = started.elapsed();
    let ended = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let _ = pacer.await;
    let bytes = dir_bytes(&cluster.data_dir(to));

    let timings = timings.lock().map(|v| v.clone()).unwrap_or_default();
    let (mut before, mut during) = (Samples::default(), Samples::default());
    let (mut failed_before, mut failed_during) = (0u64, 0u64);
    for (t, latency) in &timings {
        let window = if *t < started {
            Some((&mut before, &mut failed_before))
        } else if *t <= ended {
            Some((&mut during, &mut failed_during))
        } else {
            None
        };
        match (window, latency) {
            (Some((s, _)), Some(l)) => s.push(*l),
            (Some((_, f)), None) => *f += 1,
            (None, _) => {}
        }
    }
    let (p50_before, p99_before) = (before.pct(0.50), before.pct(0.99));
    let sent_during = during.len();
    let mut r = record("move", 0, convs.len(), sent_during as usize, move_time, during);
    r.extra.insert("messages_moved".into(), json!(messages));
    r.extra.insert("fill_s".into(), json!(round2(fill_s)));
    r.extra.insert("from_node".into(), json!(from));
    r.extra.insert("moved_from_leader".into(), json!(true));
    r.extra.insert("move_s".into(), json!(round2(move_time.as_secs_f64())));
    r.extra.insert("new_replica_bytes".into(), json!(bytes));
    r.extra.insert("bytes_per_s".into(), json!((bytes as f64 / move_time.as_secs_f64().max(1e-9)).round()));
    r.extra.insert("target_rate".into(), json!(MOVE_RATE));
    r.extra.insert("move_bytes_per_s".into(), json!(config.admin.move_bytes_per_s));
    r.extra.insert("before_s".into(), json!(round2(started.duration_since(steady_from).as_secs_f64())));
    r.extra.insert("p50_before_us".into(), json!(p50_before));
    r.extra.insert("p99_before_us".into(), json!(p99_before));
    r.extra.insert("errors_before".into(), json!(failed_before));
    r.extra.insert("errors_during".into(), json!(failed_during));
    Ok(r)
}

/// Names of the workloads, in the order they run.
pub const WORKLOADS: &[&str] = &[
    "disk_fsync",
    "raw_append",
    "connections",
    "send_latency",
    "send_throughput",
    "send_paced",
    "push_latency",
    "catch_up",
    "fan_out",
    "fairness",
    "fair_window",
    "reconnect_storm",
    "move",
];

/// Runs every workload (or those named in `only`) on a fresh cluster under `dir`.
pub async fn run(
    dir: &Path,
    opts: BenchOptions,
    only: &[String],
    mut progress: impl FnMut(&Record),
) -> Result<Vec<Record>> {
    if let Some(unknown) = only.iter().find(|w| !WORKLOADS.contains(&w.as_str())) {
        bail!("unknown workload {unknown:?}; known: {}", WORKLOADS.join(", "));
    }
    let want = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    let mut out = Vec::new();
    let mut push = |r: Record, out: &mut Vec<Record>| {
        progress(&r);
        out.push(r);
    };
    std::fs::create_dir_all(dir)?;
    if want("disk_fsync") {
        push(disk_fsync(dir, opts)?, &mut out);
    }
    if want("raw_append") {
        push(raw_append(dir, 256, opts).await?, &mut out);
    }
    // On a cluster of its own: the memory it measures must not be masked by memory other
    // workloads left cached in the nodes' allocators, and the heap its 10,000 connections
    // leave behind must not slow the workloads after it.
    if want("connections") {
        let cluster = start_cluster(&dir.join("connections"), opts)?;
        let leaders = wait_balanced(&cluster, Duration::from_secs(60)).await?;
        push(connections(&cluster, &leaders, opts).await?, &mut out);
    }
    let cluster = start_cluster(&dir.join("cluster"), opts)?;
    let leaders = wait_balanced(&cluster, Duration::from_secs(60)).await?;
    let config = cluster.config().clone();
    let pids: Vec<u32> = cluster.node_ids().into_iter().filter_map(|id| cluster.pid(id)).collect();
    if want("send_latency") {
        push(send_load(&config, &pids, "send_latency", 1, 1, opts.phase()).await?, &mut out);
    }
    if want("send_throughput") {
        // Profiling aid: CONVOY_BENCH_SHAPE=SENDERSxCONVERSATIONS runs one shape for 10× the phase.
        let shape = std::env::var("CONVOY_BENCH_SHAPE").ok().and_then(|v| {
            let (s, c) = v.split_once('x')?;
            Some((s.parse::<usize>().ok()?, c.parse::<usize>().ok()?))
        });
        if let Some((senders, conversations)) = shape {
            let phase = opts.phase() * 10;
            push(send_load(&config, &pids, "send_throughput", senders, conversations, phase).await?, &mut out);
        }
        for conversations in if shape.is_some() { vec![] } else { vec![1, 64] } {
            for senders in [1, 16, 64, 256] {
                let phase = opts.phase();
                push(send_load(&config, &pids, "send_throughput", senders, conversations, phase).await?, &mut out);
            }
        }
    }
    if want("send_paced") {
        push(send_paced(&config, &pids, PACED_RATE, PACED_CONVERSATIONS, opts.phase()).await?, &mut out);
    }
    if want("push_latency") {
        for rate in [500, 5_000] {
            push(push_latency(&config, &pids, cluster.dir(), &leaders, rate, opts.phase()).await?, &mut out);
        }
    }
    if want("catch_up") {
        push(catch_up(&config, &leaders, opts.catch_up_messages()).await?, &mut out);
    }
    if want("fan_out") {
        push(fan_out(&config, 1_000, 20, opts.phase()).await?, &mut out);
    }
    drop(cluster);
    // Each on a cluster of its own: fairness runs with the product's default limits (the
    // others run unthrottled), and the storm restarts a node.
    if want("fairness") {
        push(fairness(&dir.join("fairness"), opts).await?, &mut out);
    }
    if want("fair_window") {
        push(fair_window(&dir.join("fair-window"), opts).await?, &mut out);
    }
    if want("reconnect_storm") {
        push(reconnect_storm(&dir.join("storm"), opts).await?, &mut out);
    }
    if want("move") {
        push(shard_move(&dir.join("move"), opts).await?, &mut out);
    }
    Ok(out)
}

/// The table `convoy-bench` (and `convoy-bench-peers`) prints.
pub fn table(records: &[Record]) -> String {
    let mut s = format!(
        "{:<10} {:<16} {:>7} {:>5} {:>12} {:>10} {:>10} {:>10}\n",
        "system", "workload", "senders", "convs", "msgs/s", "p50 µs", "p99 µs", "p99.9 µs"
    );
    for r in records {
        s.push_str(&format!(
            "{:<10} {:<16} {:>7} {:>5} {:>12.0} {:>10} {:>10} {:>10}\n",
            r.system, r.workload, r.senders, r.conversations, r.msgs_per_s, r.p50_us, r.p99_us, r.p999_us
        ));
    }
    s
}

/// The options every bench binary takes: run length and where the records and chart go.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Shorter phases (3 s instead of 10 s, 20k instead of 200k catch-up messages).
    #[arg(long)]
    pub quick: bool,
    /// Write the records as JSON here, and beside them (`.svg`) a chart of msgs/s and p99 per
    /// workload.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Records of an earlier run (JSON from `--out` of convoy-bench or convoy-bench-peers) to
    /// draw beside this run's in the chart.
    #[arg(long)]
    pub compare: Vec<PathBuf>,
}

/// Writes `records` as JSON to `path` and, beside it, their chart (see [`write_chart`]).
/// Returns the chart's path.
pub fn write_records(path: &Path, records: &[Record], compare: &[PathBuf]) -> Result<PathBuf> {
    std::fs::write(path, serde_json::to_string_pretty(records)?)?;
    let own: Vec<serde_json::Value> = records.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
    write_chart(path, own, compare)
}

/// Reads a record file written by [`write_records`].
pub fn read_records(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not a bench record list: {e}", path.display()))
}

/// Writes, beside `path` (`path` with the extension `svg`), one chart of msgs/s and p99 per
/// workload with every system side by side: the records `own` and those of the record files
/// in `compare` (an earlier run of the other systems). Returns the chart's path.
pub fn write_chart(path: &Path, own: Vec<serde_json::Value>, compare: &[PathBuf]) -> Result<PathBuf> {
    let mut all = own;
    for other in compare {
        all.extend(read_records(other)?);
    }
    let systems: std::collections::BTreeSet<&str> =
        all.iter().filter_map(|r| r.get("system").and_then(serde_json::Value::as_str)).collect();
    let title = format!("{} (msgs/s and p99 per workload)", systems.into_iter().collect::<Vec<_>>().join(", "));
    let svg = chart::svg(&chart::bars(&all), &title).map_err(anyhow::Error::msg)?;
    let svg_path = path.with_extension("svg");
    std::fs::write(&svg_path, svg)?;
    Ok(svg_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_reads_an_unlabelled_sample_and_nothing_else() {
        let text = "# HELP etcd_disk_wal_fsync_duration_seconds x\n\
                    etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 7\n\
                    etcd_disk_wal_fsync_duration_seconds_sum 0.25\n\
                    etcd_disk_wal_fsync_duration_seconds_count 1234\n\
                    etcd_disk_backend_commit_duration_seconds_count 5.67e+02\n";
        assert_eq!(metric_value(text, "etcd_disk_wal_fsync_duration_seconds_count"), Some(1234));
        assert_eq!(metric_value(text, "etcd_disk_backend_commit_duration_seconds_count"), Some(567));
        assert_eq!(metric_value(text, "etcd_disk_wal_fsync_duration_seconds"), None);
        assert_eq!(metric_value(text, "missing_count"), None);
    }

    #[test]
    fn samples_count_those_at_or_over_a_bound() {
        let mut s = Samples::default();
        for us in [10, 45_000, 50_000, 80_000] {
            s.push(Duration::from_micros(us));
        }
        assert_eq!(s.at_least(STALL_US), 2);
        assert_eq!(s.at_least(0), 4);
        assert_eq!(s.len(), 4);
        // Quantiles are exact to the histogram's resolution (0.1 %).
        let max = s.pct(1.0);
        assert!((80_000..=80_080).contains(&max), "{max}");
        assert_eq!(Samples::default().pct(0.99), 0, "no samples, no latency");
    }

    #[test]
    fn samples_keep_percentiles_across_a_merge() {
        let (mut a, mut b) = (Samples::default(), Samples::default());
        for us in 1..=1_000u64 {
            a.push(Duration::from_micros(us));
            b.push(Duration::from_micros(us + 1_000));
        }
        a.merge(b);
        assert_eq!(a.len(), 2_000);
        let near = |got: u64, want: u64| got.abs_diff(want) * 1_000 <= want;
        assert!(near(a.pct(0.5), 1_000), "p50 {}", a.pct(0.5));
        assert!(near(a.pct(0.99), 1_980), "p99 {}", a.pct(0.99));
        assert!(near(a.pct(0.999), 1_998), "p99.9 {}", a.pct(0.999));
        let r = record("send_latency", 1, 1, 2_000, Duration::from_secs(2), a);
        assert_eq!(r.msgs_per_s, 1_000.0);
        assert!(near(r.p50_us, 1_000) && near(r.p99_us, 1_980) && near(r.p999_us, 1_998), "{r:?}");
    }

    #[test]
    fn disk_witness_measures_fsyncs_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let witness = DiskWitness::start(dir.path()).expect("start");
        assert!(dir.path().join("disk-witness").exists());
        std::thread::sleep(Duration::from_millis(100));
        let seen = witness.finish();
        let fsyncs = seen["fsyncs"].as_u64().expect("a count, not an error");
        assert!(fsyncs > 0, "{seen}");
        let (p50, max) = (seen["p50_us"].as_u64().expect("p50"), seen["max_us"].as_u64().expect("max"));
        assert!(p50 <= max, "{seen}");
        assert!(seen["stalls"].as_u64().expect("stalls") <= fsyncs, "{seen}");
        assert!(!dir.path().join("disk-witness").exists(), "the witness's file is removed");
        let record = Record {
            extra: BTreeMap::from([("disk_witness".to_string(), seen), ("target_rate".to_string(), json!(500))]),
            ..record("push_latency", 1, 1, 0, Duration::from_secs(1), Samples::default())
        };
        let line = witness_lines(&[record]);
        assert!(line.starts_with("convoy     push_latency 500/s: "), "{line}");
        assert!(line.contains(&format!("{fsyncs} fsyncs")), "{line}");
    }

    #[test]
    fn disk_witness_reports_a_directory_it_cannot_write() {
        assert!(DiskWitness::start(Path::new("/nonexistent/convoy-witness")).is_err());
    }
}
