//! One test run: set up the cluster, run the workload while the nemesis rotates faults,
//! heal, prove liveness, read everything back from every node, check, and report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use convoy::client::RawRead;
use rand::SeedableRng;
use serde_json::json;
use tokio::sync::Mutex;

use crate::checker::{self, Validity};
use crate::db::{Db, DbOptions};
use crate::history::{Process, Type, F};
use crate::nemesis::{self, Nemesis};
use crate::recorder::Recorder;
use crate::report;
use crate::workload::{self, WorkloadOptions};

/// Everything a run is parameterised by.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub faults: Vec<String>,
    pub time_limit: Duration,
    pub rate: f64,
    pub seed: u64,
    pub planted_bug: Option<String>,
    pub store: PathBuf,
    pub convoy_bin: PathBuf,
    pub conversations: usize,
    pub senders: usize,
    pub subscribers: usize,
    /// Messages kept per conversation (`[retention] max_messages`), if any.
    pub retention: Option<u64>,
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub validity: Validity,
    pub report_dir: PathBuf,
    pub summary: String,
}

/// Time allowed for the cluster to recover after healing.
const RECOVERY: Duration = Duration::from_secs(90);
/// Time allowed for replicas to converge in the final read.
const CONVERGE: Duration = Duration::from_secs(60);

fn sh(cmd: &str, args: &[&str]) -> Result<()> {
    let status = std::process::Command::new(cmd).args(args).status().with_context(|| format!("running {cmd}"))?;
    anyhow::ensure!(status.success(), "{cmd} {args:?} failed");
    Ok(())
}

/// Runs one test. Must be called inside the run's private network namespace.
pub async fn run(opts: RunOptions) -> Result<RunOutcome> {
    let membership = opts.faults.iter().any(|f| f == "membership");
    if let Some(bad) = opts.faults.iter().find(|f| membership && nemesis::NOT_WITH_MEMBERSHIP.contains(&f.as_str())) {
        anyhow::bail!("`membership` does not run with `{bad}` yet (its rebuilds assume every node holds every shard)");
    }
    std::fs::create_dir_all(&opts.store)?;
    sh("ip", &["link", "set", "lo", "up"])?;
    if opts.faults.iter().any(|f| f == "partition") {
        nemesis::nft_init()?;
    }
    let rec = Recorder::default();
    let db_opts = DbOptions {
        convoy_bin: opts.convoy_bin.clone(),
        store: opts.store.clone(),
        shards: 4,
        lossy: opts.faults.iter().any(|f| f == "power" || f == "power-all"),
        faketime: opts.faults.iter().any(|f| f == "clock"),
        planted_bug: opts.planted_bug.clone(),
        retention: opts.retention,
        moves: membership,
    };
    if let Some(n) = opts.retention {
        rec.record(Type::Info, Process::NEMESIS, F::Retention, json!({"max_messages": n}), None);
    }
    let mut db = Db::setup(db_opts).await?;
    db.wait_ready(Duration::from_secs(60)).await.context("the cluster never became ready")?;
    if membership {
        // A fourth node, registered before the run: the target of moves.
        let spare = db.add_spare()?;
        let registered = async {
            loop {
                if db.cluster_map().await.is_ok_and(|m| m.nodes.iter().any(|n| n.id == spare)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), registered)
            .await
            .with_context(|| format!("the spare node {spare} never registered"))?;
    }
    let config = db.config().clone();
    let db = Arc::new(Mutex::new(db));

    let wl = WorkloadOptions {
        conversations: opts.conversations,
        senders: opts.senders,
        subscribers: opts.subscribers,
        rate: opts.rate,
        seed: opts.seed,
    };
    let stop_writers = Arc::new(AtomicBool::new(false));
    let stop_subscribers = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 0..wl.senders {
        writers.push(tokio::spawn(workload::sender(rec.clone(), config.clone(), wl.clone(), i, stop_writers.clone())));
    }
    writers.push(tokio::spawn(workload::reader(rec.clone(), config.clone(), wl.clone(), stop_writers.clone())));
    let mut subscribers = Vec::new();
    for i in 0..wl.subscribers {
        subscribers.push(tokio::spawn(workload::subscriber(
            rec.clone(),
            config.clone(),
            wl.clone(),
            i,
            stop_subscribers.clone(),
        )));
    }

    let until = tokio::time::Instant::now() + opts.time_limit;
    let mut nemesis = Nemesis {
        faults: opts.faults.clone(),
        nodes: db.lock().await.node_ids(),
        rng: rand::rngs::StdRng::seed_from_u64(opts.seed),
        recorder: rec.clone(),
        conversations: opts.conversations,
        voter_down_done: false,
    };
    if opts.faults.is_empty() {
        tokio::time::sleep_until(until).await;
    } else {
        nemesis.run(&db, until).await?;
        tokio::time::sleep_until(until).await;
    }
    stop_writers.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }

    // Heal everything.
    {
        let mut db = db.lock().await;
        rec.record(Type::Invoke, Process::NEMESIS, F::Heal, json!({"final": true}), None);
        if opts.faults.iter().any(|f| f == "partition") {
            nemesis::heal_network()?;
        }
        for id in db.node_ids() {
            db.resume(id);
            if opts.faults.iter().any(|f| f == "clock") {
                db.set_clock(id, "+0")?;
            }
            db.start(id)?;
        }
        rec.record(Type::Info, Process::NEMESIS, F::Heal, json!({"final": true, "outcome": "healed"}), None);
    }
    // Recovery is in the history: a cluster that does not recover cannot pass the check.
    let nodes: Vec<u64> = config.nodes.iter().map(|n| n.id).collect();
    rec.record(
        Type::Invoke,
        Process::NEMESIS,
        F::Recover,
        json!({"nodes": nodes, "within_s": RECOVERY.as_secs()}),
        None,
    );
    let recovered = db.lock().await.wait_ready(RECOVERY).await;
    let outcome = match &recovered {
        Ok(()) => json!({"nodes": nodes, "outcome": "recovered"}),
        Err(e) => {
            let error = e.to_string().lines().next().unwrap_or_default().to_string();
            json!({"nodes": nodes, "outcome": "not-recovered", "error": error})
        }
    };
    rec.record(Type::Info, Process::NEMESIS, F::Recover, outcome, None);

    // Liveness: a new send to every conversation succeeds.
    let client = db.lock().await.client()?;
    let final_client = workload::connect_as(&config, opts.seed ^ 0xf1a1)?;
    for i in 0..wl.conversations {
        let conv = workload::conversation(i);
        let text = format!("final-{i}");
        workload::send_op(&rec, &final_client, 300_000 + i as u64, F::FinalSend, &conv, i as u64 + 1, &text).await;
    }

    // Let subscribers drain, then read everything back from every node once they agree.
    let drained = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop_subscribers.store(true, Ordering::Relaxed);
    for s in subscribers {
        let _ = s.await;
    }
    // Moves asked during the run finish before the final reads, which read each shard's
    // voters: a replica that moved away holds nothing to compare.
    let db_nodes = db.lock().await.node_ids();
    let holders = if membership {
        let convs: Vec<String> = (0..wl.conversations).map(workload::conversation).collect();
        Some(settle(&rec, &db, &convs, config.shards).await)
    } else {
        None
    };
    // One convergence budget for all conversations: replicas that diverged for good must not
    // hold the run for CONVERGE per conversation.
    let converge_by = Instant::now() + CONVERGE;
    for i in 0..wl.conversations {
        let conv = workload::conversation(i);
        let nodes: Vec<u64> = match &holders {
            Some(map) => {
                let shard = convoy::chat::shard_of(&conv, config.shards);
                // No map (no node answered): every node, which fails the reads of those that
                // hold nothing, never a check of no replica at all.
                map.shard(shard).map(|p| p.voters.clone()).filter(|v| !v.is_empty()).unwrap_or_else(|| db_nodes.clone())
            }
            None => (1..=crate::db::NODES).collect(),
        };
        final_read(&rec, &client, &conv, &nodes, 400_000 + 10 * i as u64, converge_by).await;
    }
    db.lock().await.teardown();

    let history = rec.snapshot();
    let result = checker::check(&history);
    let mut results = result.to_json();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    for op in history.iter().filter(|o| o.process == Process::NEMESIS && o.kind == Type::Invoke) {
        *faults.entry(serde_json::to_value(&op.f)?.as_str().unwrap_or("?").to_string()).or_default() += 1;
    }
    results["run"] = json!({
        "faults_enabled": opts.faults, "time_limit_s": opts.time_limit.as_secs(), "rate": opts.rate,
        "seed": opts.seed, "planted_bug": opts.planted_bug, "retention": opts.retention, "operations": history.len(),
        "faults_injected": faults, "recovered_after_heal": recovered.as_ref().map(|_| true).unwrap_or(false),
        "recovery_error": recovered.err().map(|e| e.to_string()),
    });
    let dir = opts.store.clone();
    std::fs::write(dir.join("history.jsonl"), crate::history::render(&history))?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    let plots = report::plots(&history);
    std::fs::write(dir.join("latency.svg"), plots.latency_svg)?;
    std::fs::write(dir.join("throughput.svg"), plots.throughput_svg)?;
    std::fs::write(dir.join("unseen.svg"), plots.unseen_svg)?;
    let summary = report::summary_text(&history, &results);
    std::fs::write(dir.join("summary.txt"), &summary)?;
    Ok(RunOutcome { validity: result.valid, report_dir: dir, summary })
}

/// Reads `conv` from every node until all agree (or the deadline), then records each
/// node's last complete read as the `final-read`, or, for a node never read completely, its
/// last failed read (which makes the run undecided at best).
async fn final_read(
    rec: &Recorder,
    client: &convoy::client::Client,
    conv: &str,
    nodes: &[u64],
    process: u64,
    deadline: Instant,
) {
    const READ_TIMEOUT: Duration = Duration::from_secs(10);
    let mut last: BTreeMap<u64, RawRead> = BTreeMap::new();
    loop {
        for &node in nodes {
            let read = tokio::time::timeout(READ_TIMEOUT, client.read_raw(conv, 1, node)).await.unwrap_or_else(|_| {
                let error = convoy::Error::Unavailable(format!("node {node} did not answer within {READ_TIMEOUT:?}"));
                RawRead { messages: Vec::new(), truncated_before: None, end: Err(error) }
            });
            // A complete read is kept over a later failed one.
            if read.end.is_ok() || last.get(&node).is_none_or(|r| r.end.is_err()) {
                last.insert(node, read);
            }
        }
        let complete: Vec<&Vec<convoy::chat::StoredMessage>> =
            last.values().filter(|r| r.end.is_ok()).map(|r| &r.messages).collect();
        let agree = complete.len() == nodes.len() && complete.iter().all(|m| *m == complete[0]);
        if agree || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for &node in nodes {
        let p = Process::Client(process + node);
        rec.record(Type::Invoke, p, F::FinalRead, json!({"conversation": conv}), Some(node));
        let (kind, value) = match last.get(&node) {
            Some(read) => workload::read_outcome(conv, read),
            None => (Type::Fail, json!({"conversation": conv, "error": "never read"})),
        };
        rec.record(kind, p, F::FinalRead, value, Some(node));
    }
}

/// Time allowed, at the end of a `membership` run, for the moves in progress to finish.
const SETTLE: Duration = Duration::from_secs(180);

/// Waits (at most [`SETTLE`]) until the cluster map has no move in progress and every shard
/// three voters, recording the wait and the placement it ends with: each shard's voters, and
/// each conversation's (`holders`, the nodes the checker expects final reads from). Returns
/// that map.
async fn settle(rec: &Recorder, db: &Mutex<Db>, convs: &[String], shards: u32) -> convoy::placement::ClusterMap {
    rec.record(Type::Invoke, Process::NEMESIS, F::Settle, json!({"within_s": SETTLE.as_secs()}), None);
    let by = Instant::now() + SETTLE;
    let mut map = db.lock().await.cluster_map().await.unwrap_or_default();
    while !(map.operations.is_empty() && map.shards.iter().all(|p| p.voters.len() == 3)) && Instant::now() < by {
        tokio::time::sleep(Duration::from_millis(500)).await;
        map = db.lock().await.cluster_map().await.unwrap_or_default();
    }
    let placement: Vec<_> = map.shards.iter().map(|p| json!({"shard": p.shard, "voters": p.voters})).collect();
    let outcome = if map.operations.is_empty() { "settled" } else { "moves still in progress" };
    let holders: serde_json::Map<String, serde_json::Value> = convs
        .iter()
        .filter_map(|c| {
            let voters = &map.shard(convoy::chat::shard_of(c, shards))?.voters;
            (!voters.is_empty()).then(|| (c.clone(), json!(voters)))
        })
        .collect();
    rec.record(
        Type::Info,
        Process::NEMESIS,
        F::Settle,
        json!({"outcome": outcome, "epoch": map.epoch, "placement": placement, "holders": holders,
               "operations": map.operations.len()}),
        None,
    );
    map
}
