//! Faults, each recorded in the history (invoke, then `info` with its outcome):
//!
//! | fault       | variants |
//! |-------------|----------|
//! | `kill`      | `kill -9` of one random node, of the leader of a random shard, or of all nodes; restarted at the end of the fault |
//! | `pause`     | SIGSTOP of one random node or of a shard leader; SIGCONT at the end |
//! | `partition` | nftables input-hook drops between node addresses: isolate one node, isolate a leader, a bridge (two sides that only a middle node sees), one-way (one node's packets to another are dropped) |
//! | `clock`     | libfaketime offset of ±5–60 s on one node (`FAKETIME_DONT_FAKE_MONOTONIC=1`) |
//! | `power`     | a power failure of a majority or all nodes: `kill -9`, then every write not yet fsynced is dropped by the lossy filesystem, then restart |
//! | `power-all` | every node loses power while the leader of a random shard has its fsyncs held back (its followers' are not): `kill -9` of all, the held fsyncs fail, every unsynced write is dropped; the old leader boots first and alone (0.3–1 s after it answers, the others follow) |
//! | `corrupt`   | one stopped node's storage is damaged: a bit flipped in a Raft vote record or near the end of the newest WAL, or the newest table file truncated |
//! | `wipe`      | one stopped node's data directory is emptied |
//! | `corrupt-majority` | two stopped nodes each get a bit flipped near the end of their newest WAL (never with the others: see below) |
//! | `membership` | placement changes asked of a cluster with a fourth node added after formation: a move of a random replica to a node without one, a leader transfer, a rebalance's plan, a cancel (of a move in progress, or of one started 0–1.5 s before), a drain (of a random node while three others stay active, or the moves still due from the node draining) with its planned moves, or the recommission of the node draining; left to run, nothing undone. And, with no other fault in effect, `move-with-voter-down`: a follower of a shard is killed, a move of its other follower is asked, and the killed one stays down until the move ends (at most 30 s): the shard must keep acknowledging throughout (the checker's `unavailable`); the first chance 40 s or more into a run takes one. Not with the damage families. A cluster for `membership` paces moves at 4 kB/s and snapshots every 100 entries, so that moves copy by snapshot and last seconds |
//!
//! Damage (`corrupt`, `wipe`) hits at most one node at a time, and that node is repaired at
//! the end of the fault: started as it is, it either runs (the damage was harmless or
//! repaired) or refuses to start (exit status), which is recorded; a refused node is then
//! rebuilt (`rebuild`) as an operator would after losing a disk: its data directory emptied,
//! `admin replace-node` asked for it (it is marked lost), and the node started as it is, so it
//! comes back as new replicas and is active again once it has all of them (the cluster has no
//! node without a replica of every shard to move them to, so they are rebuilt in place). Should
//! the mark fail, the node is started with `--rejoin` instead, and the outcome says so. Damage to a minority therefore never stops the cluster;
//! what may never happen is a damaged node voting or acknowledging with what it lost.
//!
//! `corrupt-majority` is the other side of that fault model, run on its own: with a majority
//! damaged there is no quorum left to rebuild from, so the only correct outcome is that the
//! damaged nodes refuse and the shards stop, with no divergence and nothing acknowledged
//! lost. The refused nodes are not rebuilt; the checker reports such a run as undecided.
//!
//! [`Nemesis::run`] rotates random subsets of the enabled families — one fault, or two at
//! once about a third of the time — with quiet periods between.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::json;
use tokio::sync::Mutex;

use convoy::admin::{Action, ClusterView};
use convoy::placement::{ClusterMap, NodeState};

use crate::db::{node_ip, Db};
use crate::history::{Process, Type, F};
use crate::recorder::Recorder;

/// The fault families a run may use.
pub const ALL_FAULTS: [&str; 10] =
    ["kill", "stop", "pause", "partition", "clock", "power", "power-all", "corrupt", "wipe", "membership"];
/// Families `membership` does not run with (yet): the damage faults rebuild a node with
/// `--rejoin` on the assumption that every node holds every shard.
pub const NOT_WITH_MEMBERSHIP: [&str; 3] = ["corrupt", "wipe", "corrupt-majority"];
/// Families that are run only on their own, never in a rotation with the others.
pub const ALONE_FAULTS: [&str; 1] = ["corrupt-majority"];

/// Families that damage a node's storage: at most one such fault is in effect at a time.
const DAMAGE: [&str; 3] = ["corrupt", "wipe", "corrupt-majority"];
/// How long the cluster may take to show itself healthy before a damage fault.
const HEALTHY_WITHIN: Duration = Duration::from_secs(2);
/// How long a restarted node is watched for a refusal before it counts as started.
const REFUSAL_WATCH: Duration = Duration::from_secs(4);
/// `stop`: how long a node may take to exit after SIGTERM before it is killed instead.
const STOP_WITHIN: Duration = Duration::from_secs(15);
/// How long a placement change may take to be answered.
const ASK_WITHIN: Duration = Duration::from_secs(10);
/// `move-with-voter-down`: the most a voter of a shard moving is held down while it moves.
const VOTER_DOWN_FOR_AT_MOST: Duration = Duration::from_secs(30);
/// `move-with-voter-down`: a shard is moved only with its followers this close to its leader
/// (entries), so that the one left up can make a quorum with the leader at once.
const FOLLOWERS_WITHIN: u64 = 50;
/// `move-with-voter-down`: the first one runs at the first chance this far into a run (ns),
/// once the shards hold enough for a move to copy by snapshot for several seconds.
const VOTER_DOWN_FIRST_AFTER_NS: u64 = 40_000_000_000;
/// How long the node that boots first after `power-all` may take to answer.
const FIRST_BOOT_WITHIN: Duration = Duration::from_secs(5);

/// An injected fault that is still in effect.
#[derive(Debug, Clone)]
pub enum Active {
    Killed(Vec<u64>),
    /// Every node lost power; `first` (the old leader, which lost its unsynced tail) boots
    /// first and alone, the most adversarial order for a node that might resume its old
    /// leadership with a shorter log.
    PoweredOff {
        first: u64,
        nodes: Vec<u64>,
    },
    Paused(Vec<u64>),
    Partitioned,
    Skewed(Vec<u64>),
    /// Stopped nodes with damaged storage: restarted, and rebuilt if they refuse.
    Damaged(Vec<u64>),
    /// Nothing was injected (a second damage while one is in effect is skipped).
    Nothing,
}

/// Injects faults into the cluster and records them.
pub struct Nemesis {
    pub faults: Vec<String>,
    /// The nodes faults pick from (the spare too once `membership` added it).
    pub nodes: Vec<u64>,
    pub rng: StdRng,
    pub recorder: Recorder,
    /// The workload's conversation count (`workload::conversation(0..n)`).
    pub conversations: usize,
    /// Whether a `move-with-voter-down` has run (the first chance after
    /// [`VOTER_DOWN_FIRST_AFTER_NS`] takes one, so that every `membership` run long enough has
    /// one).
    pub voter_down_done: bool,
}

fn nft(script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .arg("-f")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("nft failed on:\n{script}");
    }
    Ok(())
}

/// Installs the (empty) table the partitions use.
pub fn nft_init() -> Result<()> {
    nft("table inet jepsen\ndelete table inet jepsen\ntable inet jepsen {\n chain input {\n  type filter hook input priority 0; policy accept;\n }\n}\n")
}

fn drop_rules(pairs: &[(u64, u64)]) -> String {
    let mut s = String::from("flush chain inet jepsen input\n");
    for (from, to) in pairs {
        s.push_str(&format!("add rule inet jepsen input ip saddr {} ip daddr {} drop\n", node_ip(*from), node_ip(*to)));
    }
    s
}

/// Removes every partition rule.
pub fn heal_network() -> Result<()> {
    nft("flush chain inet jepsen input\n")
}

impl Nemesis {
    fn begin(&self, f: F, value: serde_json::Value) {
        self.recorder.record(Type::Invoke, Process::NEMESIS, f, value, None);
    }

    fn end(&self, f: F, value: serde_json::Value) {
        self.recorder.record(Type::Info, Process::NEMESIS, f, value, None);
    }

    async fn pick_leader(&mut self, db: &Db) -> Option<u64> {
        let shard = self.rng.gen_range(0..db.config().shards);
        db.leader_of(shard).await
    }

    /// The nodes a `kill` or `stop` takes down: one at random, a random shard's leader, or all.
    async fn one_leader_or_all(&mut self, db: &Db) -> (&'static str, Vec<u64>) {
        let variant = ["one", "leader", "all"][self.rng.gen_range(0..3)];
        let nodes = match variant {
            "all" => self.nodes.clone(),
            "leader" => vec![self.pick_leader(db).await.unwrap_or_else(|| self.random_node())],
            _ => vec![self.random_node()],
        };
        (variant, nodes)
    }

    fn random_node(&mut self) -> u64 {
        *self.nodes.choose(&mut self.rng).expect("a cluster has nodes")
    }

    /// Injects one random fault from the enabled families; returns what must be undone.
    /// `alone`: no other fault is in effect.
    pub async fn inject(&mut self, db: &Mutex<Db>, damage_allowed: bool, alone: bool) -> Result<Active> {
        let family = self.faults.choose(&mut self.rng).cloned().context("no faults enabled")?;
        if DAMAGE.contains(&family.as_str()) && !damage_allowed {
            return Ok(Active::Nothing);
        }
        if family == "membership" {
            return self.membership(db, alone).await;
        }
        let mut db = db.lock().await;
        match family.as_str() {
            "kill" => {
                let (variant, nodes) = self.one_leader_or_all(&db).await;
                self.begin(F::Kill, json!({"nodes": nodes, "variant": variant}));
                for n in &nodes {
                    db.kill(*n);
                }
                self.end(F::Kill, json!({"nodes": nodes, "variant": variant, "outcome": "killed"}));
                Ok(Active::Killed(nodes))
            }
            "stop" => {
                // Under load, sends are in flight: a stopping node gives them a moment to
                // commit, and the rest are answered as unknown and resent with their keys.
                let (variant, nodes) = self.one_leader_or_all(&db).await;
                self.begin(F::Stop, json!({"nodes": nodes, "variant": variant}));
                for n in &nodes {
                    db.signal_term(*n);
                }
                let deadline = tokio::time::Instant::now() + STOP_WITHIN;
                let mut exits = serde_json::Map::new();
                let (mut killed, mut held) = (Vec::new(), Vec::new());
                for n in &nodes {
                    if db.paused().contains(n) {
                        // A paused process cannot run its stop (another fault holds it).
                        db.kill(*n);
                        held.push(*n);
                        continue;
                    }
                    loop {
                        if let Some(status) = db.exit_status(*n) {
                            exits.insert(n.to_string(), json!(status.code()));
                            break;
                        }
                        if tokio::time::Instant::now() >= deadline {
                            db.kill(*n);
                            killed.push(*n);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                let outcome = if killed.is_empty() && held.is_empty() { "stopped" } else { "killed" };
                let value = json!({
                    "nodes": nodes, "variant": variant, "outcome": outcome,
                    "exited": exits, "killed": killed, "paused_killed": held,
                });
                self.end(F::Stop, value);
                Ok(Active::Killed(nodes))
            }
            "pause" => {
                let variant = if self.rng.gen_bool(0.5) { "leader" } else { "one" };
                let node = match variant {
                    "leader" => self.pick_leader(&db).await.unwrap_or_else(|| self.random_node()),
                    _ => self.random_node(),
                };
                self.begin(F::Pause, json!({"nodes": [node], "variant": variant}));
                let ok = db.pause(node);
                self.end(
                    F::Pause,
                    json!({"nodes": [node], "variant": variant, "outcome": if ok { "paused" } else { "not running" }}),
                );
                Ok(Active::Paused(vec![node]))
            }
            "partition" => {
                let variant = ["isolate-one", "isolate-leader", "bridge", "one-way"][self.rng.gen_range(0..4)];
                let mut order = self.nodes.clone();
                order.shuffle(&mut self.rng);
                let pairs: Vec<(u64, u64)> = match variant {
                    "isolate-leader" => {
                        let l = self.pick_leader(&db).await.unwrap_or(order[0]);
                        let others: Vec<u64> = self.nodes.iter().copied().filter(|n| *n != l).collect();
                        others.iter().flat_map(|o| [(l, *o), (*o, l)]).collect()
                    }
                    "bridge" => {
                        // order[1] sees both sides; order[0] and order[2] do not see each other.
                        vec![(order[0], order[2]), (order[2], order[0])]
                    }
                    "one-way" => vec![(order[0], order[1])],
                    _ => {
                        let l = order[0];
                        order[1..].iter().flat_map(|o| [(l, *o), (*o, l)]).collect()
                    }
                };
                let value = json!({"variant": variant, "drops": pairs.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
                    "nodes": pairs.iter().flat_map(|(a, b)| [*a, *b]).collect::<std::collections::BTreeSet<u64>>()});
                self.begin(F::Partition, value.clone());
                let outcome = match nft(&drop_rules(&pairs)) {
                    Ok(()) => "partitioned".to_string(),
                    Err(e) => format!("failed: {e}"),
                };
                let mut done = value;
                done["outcome"] = json!(outcome);
                self.end(F::Partition, done);
                Ok(Active::Partitioned)
            }
            "clock" => {
                let node = self.random_node();
                let secs: i64 = self.rng.gen_range(5..=60) * if self.rng.gen_bool(0.5) { 1 } else { -1 };
                let offset = format!("{secs:+}s");
                self.begin(F::ClockSkew, json!({"nodes": [node], "offset": offset}));
                let outcome = match db.set_clock(node, &offset) {
                    Ok(()) => "skewed".to_string(),
                    Err(e) => format!("failed: {e}"),
                };
                self.end(F::ClockSkew, json!({"nodes": [node], "offset": offset, "outcome": outcome}));
                Ok(Active::Skewed(vec![node]))
            }
            "power" => {
                let nodes: Vec<u64> = if self.rng.gen_bool(0.5) {
                    self.nodes.clone()
                } else {
                    let mut o = self.nodes.clone();
                    o.shuffle(&mut self.rng);
                    o[..self.nodes.len() / 2 + 1].to_vec()
                };
                self.begin(F::PowerFail, json!({"nodes": nodes}));
                let mut dropped = serde_json::Map::new();
                for n in &nodes {
                    db.kill(*n);
                }
                for n in &nodes {
                    let v = match db.power_fail(*n) {
                        Ok(bytes) => json!(bytes),
                        Err(e) => json!(format!("failed: {e}")),
                    };
                    dropped.insert(n.to_string(), v);
                }
                self.end(
                    F::PowerFail,
                    json!({"nodes": nodes, "unsynced_bytes_dropped": dropped, "outcome": "powered off"}),
                );
                Ok(Active::Killed(nodes))
            }
            "power-all" => {
                let held = self.pick_leader(&db).await.unwrap_or_else(|| self.random_node());
                let nodes = self.nodes.clone();
                let window = Duration::from_millis(self.rng.gen_range(300..2_500));
                self.begin(F::PowerFail, json!({"nodes": nodes, "variant": "all", "fsyncs_held_on": held}));
                let held_ok = db.hold_fsyncs(held).is_ok();
                // The leader's appends stay unsynced while its followers' fsyncs complete: a
                // quorum acknowledges entries the leader itself does not hold durably.
                tokio::time::sleep(window).await;
                for n in &nodes {
                    db.signal_kill(*n);
                }
                let mut dropped = serde_json::Map::new();
                for n in &nodes {
                    let v = match db.power_fail(*n) {
                        Ok(bytes) => json!(bytes),
                        Err(e) => json!(format!("failed: {e}")),
                    };
                    dropped.insert(n.to_string(), v);
                }
                for n in &nodes {
                    db.kill(*n);
                }
                self.end(
                    F::PowerFail,
                    json!({"nodes": nodes, "variant": "all", "fsyncs_held_on": held, "held": held_ok,
                           "hold_ms": window.as_millis() as u64, "unsynced_bytes_dropped": dropped,
                           "outcome": "powered off"}),
                );
                Ok(Active::PoweredOff { first: held, nodes })
            }
            "corrupt" => {
                let node = self.random_node();
                self.begin(F::Corrupt, json!({"nodes": [node]}));
                db.kill(node);
                let outcome = match corrupt(&db.data_dir(node).join("db"), &mut self.rng) {
                    Ok(what) => what,
                    Err(e) => format!("failed: {e}"),
                };
                self.end(F::Corrupt, json!({"nodes": [node], "outcome": outcome}));
                Ok(Active::Damaged(vec![node]))
            }
            "corrupt-majority" => {
                let mut order = [1u64, 2, 3];
                order.shuffle(&mut self.rng);
                let nodes = order[..2].to_vec();
                self.begin(F::Corrupt, json!({"nodes": nodes, "variant": "majority"}));
                for n in &nodes {
                    db.kill(*n);
                }
                let mut outcomes = serde_json::Map::new();
                for n in &nodes {
                    let outcome = match corrupt_kind(&db.data_dir(*n).join("db"), &mut self.rng, Some("wal")) {
                        Ok(what) => what,
                        Err(e) => format!("failed: {e}"),
                    };
                    outcomes.insert(n.to_string(), json!(outcome));
                }
                self.end(F::Corrupt, json!({"nodes": nodes, "variant": "majority", "outcome": outcomes}));
                Ok(Active::Damaged(nodes))
            }
            "wipe" => {
                let node = self.random_node();
                self.begin(F::Wipe, json!({"nodes": [node]}));
                db.kill(node);
                let outcome = match db.wipe(node) {
                    Ok(n) => format!("wiped ({n} entries)"),
                    Err(e) => format!("failed: {e}"),
                };
                self.end(F::Wipe, json!({"nodes": [node], "outcome": outcome}));
                Ok(Active::Damaged(vec![node]))
            }
            other => bail!("unknown fault {other}"),
        }
    }

    /// One change of placement an operator might ask for at any time, asked and left to
    /// run (nothing to undo): a move of a random replica to a node without one, a leader
    /// transfer, a rebalance's plan, a cancel of a move in progress, a drain (of a random
    /// active node, or the moves still due from the node draining) or the recommission of
    /// the node draining. Each request's
    /// answer is recorded; a refusal (a shard already moving, a cancel too late, no node
    /// answering) is an outcome, not an error of the run.
    async fn membership(&mut self, db: &Mutex<Db>, alone: bool) -> Result<Active> {
        let (admin, view, map) = {
            let db = db.lock().await;
            let (view, map) = db.view().await?;
            (db.admin()?, view, map)
        };
        const VARIANTS: [&str; 9] = [
            "move",
            "move",
            "metadata",
            "transfer-leader",
            "rebalance",
            "cancel",
            "drain",
            "recommission",
            "move-with-voter-down",
        ];
        let mut variant = VARIANTS[self.rng.gen_range(0..VARIANTS.len())];
        if !self.voter_down_done && alone && self.recorder.now_ns() >= VOTER_DOWN_FIRST_AFTER_NS {
            variant = "move-with-voter-down";
        }
        if variant == "move-with-voter-down" {
            if alone {
                if let Some(active) = self.move_with_voter_down(db, &view, &map).await? {
                    self.voter_down_done = true;
                    return Ok(active);
                }
            }
            // Another fault is in effect (two nodes would be out), or no shard is ready for it.
            variant = "move";
        }
        let active: Vec<u64> = map.nodes.iter().filter(|n| n.state == NodeState::Active).map(|n| n.id).collect();
        let draining = map.nodes.iter().find(|n| n.state == NodeState::Draining).map(|n| n.id);
        let mut drain = None;
        let mut recommission = None;
        // The metadata group moves too (its placement beside the shards'), so the cluster
        // map's own group changes hands under the same faults.
        let movable: Vec<(u32, u64, u64)> = map
            .shards
            .iter()
            .chain(map.placement(convoy::placement::META_SHARD))
            .filter(|p| map.operation_on(p.shard).is_none())
            .flat_map(|p| {
                let to: Vec<u64> =
                    active.iter().copied().filter(|n| !p.voters.contains(n) && !p.learners.contains(n)).collect();
                p.voters.iter().flat_map(move |f| to.clone().into_iter().map(move |t| (p.shard, *f, t)))
            })
            .collect();
        let mut actions: Vec<Action> = Vec::new();
        let mut cancel = None;
        // With no move in progress to cancel, `cancel` starts one and cancels it within 1.5 s:
        // while it copies, or racing its promotion.
        let mut cancel_after: Option<(u32, Duration)> = None;
        match variant {
            "move" => {
                if let Some(&(shard, from, to)) = movable.choose(&mut self.rng) {
                    actions.push(Action::Move { shard, from, to });
                }
            }
            "metadata" => {
                let meta: Vec<_> = movable.iter().filter(|m| m.0 == convoy::placement::META_SHARD).collect();
                if let Some(&&(shard, from, to)) = meta.choose(&mut self.rng) {
                    actions.push(Action::Move { shard, from, to });
                }
            }
            "transfer-leader" => {
                if let Some(p) = map.shards.choose(&mut self.rng) {
                    if let Some(&node) = p.voters.choose(&mut self.rng) {
                        actions.push(Action::Prefer { shard: p.shard, node });
                    }
                }
            }
            "rebalance" => actions = convoy::admin::plan_rebalance(&map),
            "drain" => {
                // One node drains at a time, and only while three others stay active (a shard
                // needs three voters). The plan is made on the map with the node draining.
                let node = match draining {
                    Some(n) => Some(n),
                    None if active.len() > 3 => active.choose(&mut self.rng).copied(),
                    None => None,
                };
                if let Some(node) = node {
                    drain = Some(node);
                    let mut sim = map.clone();
                    if let Some(n) = sim.nodes.iter_mut().find(|n| n.id == node) {
                        n.state = NodeState::Draining;
                    }
                    actions = convoy::admin::plan_drain(&sim, node).unwrap_or_default();
                }
            }
            "recommission" => recommission = draining,
            _ => {
                cancel = map.operations.choose(&mut self.rng).map(|o| o.id);
                if cancel.is_none() {
                    if let Some(&(shard, from, to)) = movable.choose(&mut self.rng) {
                        actions.push(Action::Move { shard, from, to });
                        cancel_after = Some((shard, Duration::from_millis(self.rng.gen_range(0..1_500))));
                    }
                }
            }
        }
        let asked = json!({
            "variant": variant,
            "epoch": map.epoch,
            "actions": actions,
            "cancel": cancel,
            "drain": drain,
            "recommission": recommission,
        });
        self.begin(F::Membership, asked.clone());
        let mut outcomes = Vec::new();
        if let Some(node) = drain {
            outcomes.push(answered(tokio::time::timeout(ASK_WITHIN, admin.drain(node)).await));
        }
        if let Some(node) = recommission {
            outcomes.push(answered(tokio::time::timeout(ASK_WITHIN, admin.recommission(node)).await));
        }
        for a in &actions {
            let r = match *a {
                Action::Move { shard, from, to } => {
                    tokio::time::timeout(ASK_WITHIN, admin.move_replica(shard, from, to)).await
                }
                Action::Prefer { shard, node } => {
                    tokio::time::timeout(ASK_WITHIN, admin.transfer_leader(shard, node)).await
                }
            };
            outcomes.push(answered(r));
        }
        if let Some((shard, after)) = cancel_after {
            tokio::time::sleep(after).await;
            let now = db.lock().await.cluster_map().await?;
            cancel = now.operation_on(shard).map(|o| o.id);
            if cancel.is_none() {
                outcomes.push(json!({"refused": format!("the move of shard {shard} ended within {after:?}")}));
            }
        }
        if let Some(id) = cancel {
            outcomes.push(answered(tokio::time::timeout(ASK_WITHIN, admin.cancel_operation(id)).await));
        }
        let mut done = asked;
        done["cancel"] = json!(cancel);
        done["outcomes"] = json!(outcomes);
        let asked_any = !actions.is_empty() || cancel.is_some() || drain.is_some() || recommission.is_some();
        done["outcome"] = json!(if asked_any { "asked" } else { "nothing to ask" });
        self.end(F::Membership, done);
        Ok(Active::Nothing)
    }

    /// `move-with-voter-down`: an operator moves a replica of a shard while another of its
    /// followers is down. Follower D of shard S (never its leader L) is killed, then a move of
    /// S's other follower to a node without a replica is asked, and D stays down until the move
    /// has ended or [`VOTER_DOWN_FOR_AT_MOST`] passed (then the usual hold, then a restart).
    /// Throughout, S has a majority of voters up that hold its log (L and the follower moving,
    /// until the new replica has caught up and replaces it), so S must keep acknowledging: the
    /// checker's `unavailable` looks at S's sends between this membership op's invoke and its
    /// info. Only run with no other fault in effect. `None`: no shard is ready for it (every
    /// shard has a move in progress, a follower behind, no node to go to or no conversation).
    async fn move_with_voter_down(
        &mut self,
        db_lock: &Mutex<Db>,
        view: &ClusterView,
        map: &ClusterMap,
    ) -> Result<Option<Active>> {
        let mut db = db_lock.lock().await;
        let shards = db.config().shards;
        let active: Vec<u64> = map.nodes.iter().filter(|n| n.state == NodeState::Active).map(|n| n.id).collect();
        let mut ready = Vec::new();
        for p in &map.shards {
            if map.operation_on(p.shard).is_some() || p.voters.len() != 3 || !p.learners.is_empty() {
                continue;
            }
            let Some(v) = view.shards.iter().find(|v| v.shard == p.shard) else { continue };
            let Some(leader) = v.leader.filter(|l| p.voters.contains(l)) else { continue };
            let followers: Vec<u64> = p.voters.iter().copied().filter(|n| *n != leader).collect();
            let close = followers
                .iter()
                .all(|f| v.lag.iter().any(|l| l.node == *f && l.entries_behind.is_some_and(|e| e <= FOLLOWERS_WITHIN)));
            let to: Vec<u64> = active.iter().copied().filter(|n| !p.voters.contains(n)).collect();
            let conversations: Vec<String> = (0..self.conversations)
                .map(crate::workload::conversation)
                .filter(|c| convoy::chat::shard_of(c, shards) == p.shard)
                .collect();
            if close && !to.is_empty() && !conversations.is_empty() {
                ready.push((p.shard, leader, followers, to, conversations));
            }
        }
        let Some((shard, leader, mut followers, to, conversations)) = ready.choose(&mut self.rng).cloned() else {
            return Ok(None);
        };
        followers.shuffle(&mut self.rng);
        let (down, from) = (followers[0], followers[1]);
        let to = *to.choose(&mut self.rng).context("a node to move to")?;
        // Everything that can fail before the kill: once `down` is killed, only the returned
        // `Active::Killed` brings it back.
        let admin = db.admin()?;
        let kill = json!({"nodes": [down], "variant": "a follower of a shard about to move"});
        self.begin(F::Kill, kill.clone());
        db.kill(down);
        let mut killed = kill;
        killed["outcome"] = json!("killed");
        self.end(F::Kill, killed);
        drop(db);
        let asked = json!({
            "variant": "move-with-voter-down",
            "epoch": map.epoch,
            "actions": [Action::Move { shard, from, to }],
            "shard": shard,
            "leader": leader,
            "down": down,
            "conversations": conversations,
        });
        self.begin(F::Membership, asked.clone());
        let r = tokio::time::timeout(ASK_WITHIN, admin.move_replica(shard, from, to)).await;
        let accepted = matches!(r, Ok(Ok(_)));
        let mut ended = false;
        let by = tokio::time::Instant::now() + VOTER_DOWN_FOR_AT_MOST;
        while accepted && tokio::time::Instant::now() < by {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if db_lock.lock().await.cluster_map().await.is_ok_and(|m| m.operation_on(shard).is_none()) {
                ended = true;
                break;
            }
        }
        let mut done = asked;
        done["outcomes"] = json!([answered(r)]);
        done["move_ended"] = json!(ended);
        done["outcome"] = json!("asked");
        self.end(F::Membership, done);
        Ok(Some(Active::Killed(vec![down])))
    }

    /// Undoes a fault.
    pub async fn heal(&mut self, db_lock: &Mutex<Db>, active: Active) -> Result<()> {
        let mut db = db_lock.lock().await;
        match active {
            Active::PoweredOff { first, nodes } => {
                self.begin(F::Start, json!({"nodes": [first], "variant": "first"}));
                db.start(first)?;
                let outcome = match db.wait_answers(first, FIRST_BOOT_WITHIN).await {
                    Ok(()) => "answering".to_string(),
                    Err(e) => format!("not answering: {e:#}"),
                };
                self.end(F::Start, json!({"nodes": [first], "variant": "first", "outcome": outcome}));
                let gap = Duration::from_millis(self.rng.gen_range(300..1_000));
                tokio::time::sleep(gap).await;
                let rest: Vec<u64> = nodes.into_iter().filter(|n| *n != first).collect();
                drop(db);
                return Box::pin(self.heal(db_lock, Active::Killed(rest))).await;
            }
            Active::Killed(nodes) | Active::Damaged(nodes) => {
                self.begin(F::Start, json!({"nodes": nodes}));
                for n in &nodes {
                    db.start(*n)?;
                }
                // A node that refuses to start (it lost state its identity needs) is recorded
                // as refused, then rebuilt as new replicas.
                let deadline = tokio::time::Instant::now() + REFUSAL_WATCH;
                let mut refused: Vec<(u64, Option<i32>)> = Vec::new();
                while tokio::time::Instant::now() < deadline && refused.len() < nodes.len() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    for n in &nodes {
                        if !refused.iter().any(|(r, _)| r == n) {
                            if let Some(status) = db.exit_status(*n) {
                                refused.push((*n, status.code()));
                            }
                        }
                    }
                }
                let exits: serde_json::Map<String, serde_json::Value> =
                    refused.iter().map(|(n, code)| (n.to_string(), json!(code))).collect();
                let outcome = if refused.is_empty() { "started" } else { "refused" };
                self.end(F::Start, json!({"nodes": nodes, "outcome": outcome, "exited": exits}));
                if refused.len() * 2 > self.nodes.len() {
                    // No quorum is left to rebuild from: the shards stay stopped, which is the
                    // correct outcome of damage to a majority.
                    return Ok(());
                }
                for (n, _) in refused {
                    self.begin(F::Rebuild, json!({"nodes": [n]}));
                    let outcome = match db.wipe(n) {
                        Err(e) => format!("failed: {e}"),
                        Ok(_) => match replace_node(&db, n).await {
                            Ok(()) => match db.start(n) {
                                Ok(_) => "replace-node; rejoining".to_string(),
                                Err(e) => format!("replace-node; failed to start: {e}"),
                            },
                            Err(why) => match db.start_rejoin(n) {
                                Ok(_) => format!("replace-node failed ({why:#}); rejoining with --rejoin"),
                                Err(e) => format!("replace-node failed ({why:#}); failed to start: {e}"),
                            },
                        },
                    };
                    self.end(F::Rebuild, json!({"nodes": [n], "outcome": outcome}));
                }
            }
            Active::Nothing => {}
            Active::Paused(nodes) => {
                self.begin(F::Resume, json!({"nodes": nodes}));
                for n in &nodes {
                    db.resume(*n);
                }
                self.end(F::Resume, json!({"nodes": nodes, "outcome": "resumed"}));
            }
            Active::Partitioned => {
                self.begin(F::Heal, json!({}));
                let outcome = match heal_network() {
                    Ok(()) => "healed".to_string(),
                    Err(e) => format!("failed: {e}"),
                };
                self.end(F::Heal, json!({"outcome": outcome}));
            }
            Active::Skewed(nodes) => {
                self.begin(F::ClockReset, json!({"nodes": nodes}));
                for n in &nodes {
                    db.set_clock(*n, "+0")?;
                }
                self.end(F::ClockReset, json!({"nodes": nodes, "outcome": "reset"}));
            }
        }
        Ok(())
    }

    /// Rotates faults until `until`: quiet, inject, hold, heal.
    pub async fn run(&mut self, db: &Mutex<Db>, until: tokio::time::Instant) -> Result<()> {
        loop {
            let quiet = Duration::from_millis(self.rng.gen_range(3_000..6_000));
            tokio::time::sleep(quiet).await;
            if tokio::time::Instant::now() + Duration::from_secs(4) >= until {
                return Ok(());
            }
            // A random subset of the enabled families at once: usually one fault, sometimes
            // two together (e.g. a partition while a node is paused).
            let together = if self.faults.len() > 1 && self.rng.gen_bool(0.35) { 2 } else { 1 };
            let mut active = Vec::new();
            for _ in 0..together {
                // Damage only a healthy cluster: not while another damaged node is in effect
                // or still rejoining (every node must answer and agree on the leaders).
                let damage_allowed = !active.iter().any(|a| matches!(a, Active::Damaged(_)))
                    && db.lock().await.wait_ready(HEALTHY_WITHIN).await.is_ok();
                let alone = active.iter().all(|a| matches!(a, Active::Nothing));
                active.push(self.inject(db, damage_allowed, alone).await?);
            }
            let hold = Duration::from_millis(self.rng.gen_range(3_000..8_000));
            tokio::time::sleep_until((tokio::time::Instant::now() + hold).min(until)).await;
            for a in active.into_iter().rev() {
                self.heal(db, a).await?;
            }
        }
    }
}

/// A placement change's answer, for the history.
fn answered(r: Result<convoy::Result<(u64, bool)>, tokio::time::error::Elapsed>) -> serde_json::Value {
    match r {
        Ok(Ok((epoch, changed))) => json!({"epoch": epoch, "changed": changed}),
        Ok(Err(e)) => json!({"refused": e.to_string()}),
        Err(_) => json!({"refused": format!("no answer within {ASK_WITHIN:?}")}),
    }
}

/// Damages one stored record or file of a stopped node (the fault model of `corrupt`):
/// - `vote`: flips a bit inside a Raft vote record in the newest WAL (found by its key);
/// - `wal`: flips a bit near the end of the newest WAL;
/// - `table`: truncates the newest table file.
///
/// Each of these is damage RocksDB reveals when it opens the database (WAL checksums, table
/// sizes recorded in the MANIFEST). Not modelled: a WAL cut exactly at a record boundary looks
/// like a power failure before the lost records were fsynced, which no single node can tell
/// apart; and a bit flipped inside a table's data block is found only when that block is read,
/// while the node runs (the read fails with a checksum error and the shard's group stops on
/// that node, which is not yet turned into a refusal and a rebuild).
fn corrupt(dir: &Path, rng: &mut StdRng) -> Result<String> {
    corrupt_kind(dir, rng, None)
}

/// [`corrupt`] with the kind of damage chosen by the caller (`Some("wal")`), or at random.
fn corrupt_kind(dir: &Path, rng: &mut StdRng, only: Option<&str>) -> Result<String> {
    let newest = |ext: &str| -> Option<PathBuf> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|x| x.to_str()) == Some(ext))
            .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
            .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        files.sort();
        files.pop().map(|(_, p)| p)
    };
    let wal = newest("log");
    let table = newest("sst");
    let mut kinds = Vec::new();
    if wal.is_some() {
        kinds.extend(["vote", "wal"]);
    }
    if table.is_some() {
        kinds.push("table");
    }
    if let Some(only) = only {
        kinds.retain(|k| *k == only);
    }
    let kind = *kinds.choose(rng).context("no WAL or table file to damage")?;
    use std::os::unix::fs::FileExt;
    let flip = |path: &Path, at: u64, rng: &mut StdRng| -> Result<()> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at)?;
        b[0] ^= 1 << rng.gen_range(0..8);
        file.write_all_at(&b, at)?;
        file.sync_all()?;
        Ok(())
    };
    match kind {
        "vote" => {
            let path = wal.expect("chosen only with a WAL");
            let bytes = std::fs::read(&path)?;
            // A vote record's key: shard (u32 BE) ‖ 1, in the raft_meta family.
            let hits: Vec<usize> = (0..bytes.len().saturating_sub(5))
                .filter(|&i| bytes[i..i + 3] == [0, 0, 0] && bytes[i + 4] == 1 && i > 0 && bytes[i - 1] == 5)
                .collect();
            match hits.choose(rng) {
                Some(&at) => {
                    let at = (at + 5 + rng.gen_range(0..8)).min(bytes.len() - 1) as u64;
                    flip(&path, at, rng)?;
                    Ok(format!("flipped a bit in a vote record at byte {at} of {}", path.display()))
                }
                None => {
                    let len = bytes.len() as u64;
                    let at = len - rng.gen_range(1..=len.min(4096));
                    flip(&path, at, rng)?;
                    Ok(format!("no vote record found; flipped a bit at byte {at} of {}", path.display()))
                }
            }
        }
        "wal" => {
            let path = wal.expect("chosen only with a WAL");
            let len = std::fs::metadata(&path)?.len();
            let at = len - rng.gen_range(1..=len.min(4096));
            flip(&path, at, rng)?;
            Ok(format!("flipped a bit at byte {at} of {}", path.display()))
        }
        _ => {
            let path = table.expect("chosen only with a table file");
            let len = std::fs::metadata(&path)?.len();
            let cut = rng.gen_range(1..=len.min(4096));
            let file = std::fs::OpenOptions::new().write(true).open(&path)?;
            file.set_len(len - cut)?;
            file.sync_all()?;
            Ok(format!("truncated {cut} bytes off {}", path.display()))
        }
    }
}

/// What `convoy admin replace-node N` asks of the cluster: node `n`, which lost its disk, is
/// marked lost, so that it rebuilds its replicas under new ids when it starts empty.
async fn replace_node(db: &Db, n: u64) -> Result<()> {
    let admin = db.admin()?;
    match tokio::time::timeout(REPLACE_WITHIN, admin.mark_lost(n)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!("no answer within {REPLACE_WITHIN:?}"),
    }
}

/// How long the rebuild waits for the cluster map to mark a wiped node lost.
const REPLACE_WITHIN: Duration = Duration::from_secs(20);
