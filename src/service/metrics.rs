//! A node's metrics, in the Prometheus text format (served at `metrics_addr` by
//! `crate::metrics`).
//!
//! Nothing here is on the send path beyond relaxed atomic increments: counters and the
//! subscriber registry are updated where things happen, and everything else — shard state,
//! follower lag, disk use, the send-path stage histograms — is read from its owner when the
//! endpoint is scraped ([`NodeCollector`]).
//!
//! Subscriber lag is sampled, not pushed: every [`LAG_SAMPLE_INTERVAL`] each live subscription
//! is measured against its conversation's head as this replica knows it, so a subscriber that
//! stopped reading shows up while it is stuck, not only once it moves again. One measured at
//! `limits.subscriber_lag_warn` messages or more is counted and logged (at most one line per
//! [`LAG_LOG_INTERVAL`] for the node).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::{Service, StopSignal};
use crate::net::wire::{ErrorCode, Response};
use crate::raft::types::node_of;
use crate::stages::{Stage, StageSnapshot};

/// How often live subscriptions are measured against their conversation's head.
pub const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// At most one lag warning per node per this interval.
pub const LAG_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Upper bounds of the subscriber lag histogram, in messages.
const LAG_BUCKETS: [u64; 8] = [0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000];

/// How a send was answered (`convoy_sends_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Acked,
    Duplicate,
    Rejected,
    Forbidden,
    Invalid,
    Throttled,
    NotLeader,
    Ambiguous,
    Unavailable,
    /// Refused for lack of disk space (an `Unavailable` answer that says so).
    DiskFull,
    Other,
}

impl SendOutcome {
    pub const ALL: [SendOutcome; 11] = [
        SendOutcome::Acked,
        SendOutcome::Duplicate,
        SendOutcome::Rejected,
        SendOutcome::Forbidden,
        SendOutcome::Invalid,
        SendOutcome::Throttled,
        SendOutcome::NotLeader,
        SendOutcome::Ambiguous,
        SendOutcome::Unavailable,
        SendOutcome::DiskFull,
        SendOutcome::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SendOutcome::Acked => "acked",
            SendOutcome::Duplicate => "duplicate",
            SendOutcome::Rejected => "rejected",
            SendOutcome::Forbidden => "forbidden",
            SendOutcome::Invalid => "invalid",
            SendOutcome::Throttled => "throttled",
            SendOutcome::NotLeader => "not_leader",
            SendOutcome::Ambiguous => "ambiguous",
            SendOutcome::Unavailable => "unavailable",
            SendOutcome::DiskFull => "disk_full",
            SendOutcome::Other => "other",
        }
    }

    /// The outcome a send's answer tells.
    pub fn of(answer: &Response) -> SendOutcome {
        match answer {
            Response::Ack { duplicate: false, .. } => SendOutcome::Acked,
            Response::Ack { duplicate: true, .. } => SendOutcome::Duplicate,
            Response::Throttled { .. } => SendOutcome::Throttled,
            Response::NotLeader { .. } => SendOutcome::NotLeader,
            Response::Error { code: ErrorCode::Unavailable, message } if message.starts_with(super::DISK_FULL) => {
                SendOutcome::DiskFull
            }
            Response::Error { code, .. } => match code {
                ErrorCode::Rejected => SendOutcome::Rejected,
                ErrorCode::Forbidden => SendOutcome::Forbidden,
                ErrorCode::InvalidInput => SendOutcome::Invalid,
                ErrorCode::Ambiguous => SendOutcome::Ambiguous,
                ErrorCode::Unavailable => SendOutcome::Unavailable,
                _ => SendOutcome::Other,
            },
            _ => SendOutcome::Other,
        }
    }
}

/// Why a send was throttled (`convoy_throttled_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// The user's send rate.
    User,
    /// The conversation's send rate.
    Conversation,
    /// The connection's send rate.
    Connection,
    /// The node's in-flight bound.
    Inflight,
    /// The conversation's queue on its shard's leader was full.
    QueueFull,
    /// The send waited its turn longer than the send timeout.
    QueueWait,
}

impl Throttle {
    pub const ALL: [Throttle; 6] = [
        Throttle::User,
        Throttle::Conversation,
        Throttle::Connection,
        Throttle::Inflight,
        Throttle::QueueFull,
        Throttle::QueueWait,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Throttle::User => "user",
            Throttle::Conversation => "conversation",
            Throttle::Connection => "connection",
            Throttle::Inflight => "inflight",
            Throttle::QueueFull => "queue_full",
            Throttle::QueueWait => "queue_wait",
        }
    }
}

/// One live subscription, as the lag sampler sees it.
struct Watched {
    /// The conversation's head as this replica last saw it.
    head: Arc<AtomicU64>,
    /// The next offset the subscription will deliver.
    next: Arc<AtomicU64>,
}

impl Watched {
    /// Messages behind the head.
    fn lag(&self) -> u64 {
        self.head.load(Relaxed).saturating_sub(self.next.load(Relaxed).saturating_sub(1))
    }
}

/// The node's event counters and its registry of live subscriptions.
pub struct Metrics {
    sends: [AtomicU64; SendOutcome::ALL.len()],
    throttled: [AtomicU64; Throttle::ALL.len()],
    /// Client connections open now.
    pub connections: AtomicI64,
    /// Client connections closed after their handshake because the node was at
    /// `connections_max`.
    pub refused_node_full: AtomicU64,
    /// … because their user was at `connections_per_user_max` on this node.
    pub refused_user_full: AtomicU64,
    /// Times a live subscriber was sent back to storage (it lagged past its push buffer, or
    /// a snapshot replaced its shard's state).
    pub push_fallbacks: AtomicU64,
    /// Samples of subscribers found `subscriber_lag_warn` or more messages behind.
    pub lagging: AtomicU64,
    /// Send batches over several conversations proposed per conversation because their
    /// shard's window was full (see `service::proposals_of`).
    pub batches_split: AtomicU64,
    lag_buckets: [AtomicU64; LAG_BUCKETS.len()],
    lag_count: AtomicU64,
    lag_sum: AtomicU64,
    subscribers: Mutex<HashMap<u64, Watched>>,
    next_id: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            sends: std::array::from_fn(|_| AtomicU64::new(0)),
            throttled: std::array::from_fn(|_| AtomicU64::new(0)),
            connections: AtomicI64::new(0),
            refused_node_full: AtomicU64::new(0),
            refused_user_full: AtomicU64::new(0),
            push_fallbacks: AtomicU64::new(0),
            lagging: AtomicU64::new(0),
            batches_split: AtomicU64::new(0),
            lag_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            lag_count: AtomicU64::new(0),
            lag_sum: AtomicU64::new(0),
            subscribers: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }
}

/// A live subscription's entry in the registry; removed when dropped.
pub struct Subscribed {
    metrics: Arc<Metrics>,
    id: u64,
    /// The conversation's head as the subscription knows it.
    pub head: Arc<AtomicU64>,
    /// The next offset it will deliver.
    pub next: Arc<AtomicU64>,
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.metrics.subscribers.lock().expect("subscriber registry lock").remove(&self.id);
    }
}

impl Metrics {
    /// Counts one send's answer.
    pub fn send_answered(&self, answer: &Response) {
        self.sends[SendOutcome::of(answer) as usize].fetch_add(1, Relaxed);
    }

    /// Counts every send of a batch's answer (or the one answer a whole batch got).
    pub fn sends_answered(&self, answer: &Response, sends: usize) {
        match answer {
            Response::Batch(answers) => answers.iter().for_each(|a| self.send_answered(a)),
            other => {
                self.sends[SendOutcome::of(other) as usize].fetch_add(sends as u64, Relaxed);
            }
        }
    }

    pub fn throttled(&self, why: Throttle, sends: u64) {
        self.throttled[why as usize].fetch_add(sends, Relaxed);
    }

    /// Sends answered `Throttled`, for every reason.
    pub fn throttled_total(&self) -> u64 {
        self.throttled.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn sends(&self, outcome: SendOutcome) -> u64 {
        self.sends[outcome as usize].load(Relaxed)
    }

    /// Registers a live subscription starting at `next`.
    pub fn subscribed(self: &Arc<Self>, head: Arc<AtomicU64>, next: u64) -> Subscribed {
        let id = self.next_id.fetch_add(1, Relaxed);
        let next = Arc::new(AtomicU64::new(next));
        let watched = Watched { head: head.clone(), next: next.clone() };
        self.subscribers.lock().expect("subscriber registry lock").insert(id, watched);
        Subscribed { metrics: self.clone(), id, head, next }
    }

    /// Live subscriptions now.
    pub fn subscribers(&self) -> usize {
        self.subscribers.lock().expect("subscriber registry lock").len()
    }

    /// The furthest any live subscription is behind its conversation's head now, in
    /// messages (not recorded as a sample).
    pub fn lag_max(&self) -> u64 {
        let subs = self.subscribers.lock().expect("subscriber registry lock");
        subs.values().map(Watched::lag).max().unwrap_or(0)
    }

    /// Measures every live subscription's lag once; returns how many were `warn` or more
    /// messages behind, and the largest lag.
    pub fn sample_lag(&self, warn: u64) -> (u64, u64) {
        let lags: Vec<u64> = {
            let subs = self.subscribers.lock().expect("subscriber registry lock");
            subs.values().map(Watched::lag).collect()
        };
        let (mut behind, mut worst) = (0, 0);
        for lag in lags {
            let bucket = LAG_BUCKETS.iter().position(|b| lag <= *b).unwrap_or(LAG_BUCKETS.len());
            if let Some(c) = self.lag_buckets.get(bucket) {
                c.fetch_add(1, Relaxed);
            }
            self.lag_count.fetch_add(1, Relaxed);
            self.lag_sum.fetch_add(lag, Relaxed);
            worst = worst.max(lag);
            if warn > 0 && lag >= warn {
                behind += 1;
            }
        }
        self.lagging.fetch_add(behind, Relaxed);
        (behind, worst)
    }
}

/// Measures subscriber lag every [`LAG_SAMPLE_INTERVAL`] until the service is dropped, and
/// logs (rate-limited) when subscribers are `limits.subscriber_lag_warn` or more behind.
pub(super) async fn sample_lag(node: Weak<Service>, mut stop: StopSignal) {
    let mut last_log: Option<Instant> = None;
    loop {
        if stop.unless_stopped(tokio::time::sleep(LAG_SAMPLE_INTERVAL)).await.is_none() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let warn = node.config.limits.subscriber_lag_warn;
        let (behind, worst) = node.metrics.sample_lag(warn);
        if behind > 0 && last_log.is_none_or(|t| t.elapsed() >= LAG_LOG_INTERVAL) {
            last_log = Some(Instant::now());
            tracing::warn!(
                subscribers = behind,
                worst_lag_messages = worst,
                threshold = warn,
                "subscribers are falling behind their conversations (see convoy_subscriber_lag_messages)"
            );
        }
    }
}

/// Encodes the node's metrics on each scrape.
#[derive(Debug)]
pub struct NodeCollector {
    node: Weak<Service>,
}

impl NodeCollector {
    pub fn new(node: &Arc<Service>) -> NodeCollector {
        NodeCollector { node: Arc::downgrade(node) }
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, series: &[(Labels, u64)]) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, series: &[(Labels, i64)]) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A stage histogram's cumulative buckets, at edges of 2^k µs (16 µs … 67 s), which are edges
/// of the stage's own finer buckets: a sample counts under the first edge above it.
fn stage_buckets(s: &StageSnapshot) -> (u64, Vec<(f64, u64)>) {
    let mut bounds: Vec<(f64, u64)> = (4..=26).map(|k| ((1u64 << k) as f64 / 1e6, 0)).collect();
    for &(bucket, n) in &s.buckets {
        let upper = crate::stages::bucket_upper(bucket as usize) as f64;
        for (le, c) in bounds.iter_mut() {
            if upper < *le * 1e6 {
                *c += n;
            }
        }
    }
    bounds.push((f64::INFINITY, s.count()));
    (s.count(), bounds)
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Some(node) = self.node.upgrade() else { return Ok(()) };
        let m = &node.metrics;
        let sends: Vec<(Labels, u64)> =
            SendOutcome::ALL.iter().map(|o| (vec![("outcome", o.name().to_string())], m.sends(*o))).collect();
        counter(&mut e, "convoy_sends", "Sends answered by this node, by outcome.", &sends)?;
        let throttled: Vec<(Labels, u64)> = Throttle::ALL
            .iter()
            .map(|t| (vec![("reason", t.name().to_string())], m.throttled[*t as usize].load(Relaxed)))
            .collect();
        counter(&mut e, "convoy_throttled", "Sends answered Throttled, by reason.", &throttled)?;
        counter(
            &mut e,
            "convoy_push_fallbacks",
            "Live subscribers sent back to storage (lagged past their push buffer, or a snapshot reset).",
            &[(vec![], m.push_fallbacks.load(Relaxed))],
        )?;
        counter(
            &mut e,
            "convoy_subscribers_lagging",
            "Lag samples of subscribers at limits.subscriber_lag_warn messages or more behind.",
            &[(vec![], m.lagging.load(Relaxed))],
        )?;
        counter(
            &mut e,
            "convoy_send_batches_split",
            "Send batches over several conversations proposed per conversation, their shard's window being full.",
            &[(vec![], m.batches_split.load(Relaxed))],
        )?;
        gauge(&mut e, "convoy_connections", "Client connections open.", &[(vec![], m.connections.load(Relaxed))])?;
        counter(
            &mut e,
            "convoy_connections_refused",
            "Client connections closed after their handshake at a limit: the node's (node_full) or their user's (user_full).",
            &[
                (vec![("reason", "node_full".to_string())], m.refused_node_full.load(Relaxed)),
                (vec![("reason", "user_full".to_string())], m.refused_user_full.load(Relaxed)),
            ],
        )?;
        gauge(&mut e, "convoy_subscribers", "Live subscriptions.", &[(vec![], m.subscribers() as i64)])?;
        gauge(
            &mut e,
            "convoy_catch_up_windows_wide",
            "Client connections catching up through a wide send window (at most limits.catch_up_windows_max).",
            &[(vec![], i64::try_from(node.catch_up.held()).unwrap_or(i64::MAX))],
        )?;
        counter(
            &mut e,
            "convoy_catch_up_narrow",
            "Catch-ups that started through their connection's narrow send window, every wide one being lent out.",
            &[(vec![], node.catch_up.narrow_total())],
        )?;
        gauge(
            &mut e,
            "convoy_catch_up_buffer_bytes",
            "Bytes of stored messages read for catch-ups and not yet handed to their connections (at most limits.catch_up_buffer_bytes).",
            &[(vec![], i64::try_from(node.catch_up.lent_bytes()).unwrap_or(i64::MAX))],
        )?;
        counter(
            &mut e,
            "convoy_catch_up_waits",
            "Catch-up reads that waited for room in limits.catch_up_buffer_bytes.",
            &[(vec![], node.catch_up.waits_total())],
        )?;
        counter(
            &mut e,
            "convoy_catch_up_slow_readers_dropped",
            "Subscriptions dropped because their reader took a batch of stored messages for over 10 s while other catch-up reads waited for room.",
            &[(vec![], node.catch_up.slow_dropped_total())],
        )?;
        {
            let mut buckets: Vec<(f64, u64)> = Vec::new();
            let mut cumulative = 0;
            for (i, b) in LAG_BUCKETS.iter().enumerate() {
                cumulative += m.lag_buckets[i].load(Relaxed);
                buckets.push((*b as f64, cumulative));
            }
            let count = m.lag_count.load(Relaxed);
            buckets.push((f64::INFINITY, count));
            let mut h = e.encode_descriptor(
                "convoy_subscriber_lag_messages",
                "Live subscriptions' distance behind their conversation's head, sampled every second.",
                None,
                MetricType::Histogram,
            )?;
            h.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                m.lag_sum.load(Relaxed) as f64,
                count,
                &buckets,
                None,
            )?;
        }
        // Shards, from each group's Raft metrics.
        let (mut leader, mut commit, mut apply_lag, mut follower_lag) = (vec![], vec![], vec![], vec![]);
        let (warn, mut lagging) = (node.config.limits.follower_lag_warn, 0i64);
        for g in node.groups() {
            let r = crate::raft::metrics_of(&g.raft);
            let shard = vec![("shard", g.shard.to_string())];
            leader.push((shard.clone(), r.current_leader.map(node_of).unwrap_or(0) as i64));
            let committed = r.local_committed.map(|l| l.index).unwrap_or(0);
            commit.push((shard.clone(), committed as i64));
            let applied = r.last_applied.map(|l| l.index).unwrap_or(0);
            apply_lag.push((shard.clone(), committed.saturating_sub(applied) as i64));
            for f in super::follower_lags(&r, g.replica, warn) {
                lagging += i64::from(f.lagging);
                let labels = vec![("shard", g.shard.to_string()), ("peer", f.node.to_string())];
                follower_lag.push((labels, f.entries as i64));
            }
        }
        gauge(&mut e, "convoy_shard_leader", "The node this node sees leading the shard (0: none).", &leader)?;
        gauge(&mut e, "convoy_shard_commit_index", "The shard's committed Raft log index on this node.", &commit)?;
        gauge(
            &mut e,
            "convoy_shard_apply_lag_entries",
            "Committed Raft entries this node has not applied yet.",
            &apply_lag,
        )?;
        gauge(
            &mut e,
            "convoy_follower_lag_entries",
            "On a shard's leader: log entries a follower has yet to replicate.",
            &follower_lag,
        )?;
        gauge(
            &mut e,
            "convoy_followers_lagging",
            "On shard leaders here: followers limits.follower_lag_warn entries or more behind.",
            &[(vec![], lagging)],
        )?;
        if let Some(q) = node.net.quiescer() {
            gauge(
                &mut e,
                "convoy_raft_quiesced_groups",
                "Groups that stopped ticking on this node, idle (see raft.quiesce_after_ms).",
                &[(vec![], q.quiesced() as i64)],
            )?;
            counter(
                &mut e,
                "convoy_raft_quiesce_wakes",
                "Times a quiesced group woke on this node (an entry, a Raft message, a peer's liveness).",
                &[(vec![], q.wakes())],
            )?;
        }
        // Storage.
        let disk: Vec<(Labels, i64)> = node
            .store
            .disk_bytes()
            .into_iter()
            .map(|(cf, bytes)| (vec![("column_family", cf.to_string())], bytes as i64))
            .collect();
        gauge(&mut e, "convoy_disk_bytes", "Bytes on disk by column family (table files), and the WAL.", &disk)?;
        gauge(
            &mut e,
            "convoy_retained_messages",
            "Messages stored on this node (RocksDB's estimate of the messages family's keys).",
            &[(vec![], node.store.estimated_messages() as i64)],
        )?;
        // The send path's stages (see `crate::stages`): the send and fsync ones under names
        // of their own, all of them by stage.
        let stages = node.store.stages.snapshot();
        let named = [
            (
                Stage::Send,
                "convoy_send_seconds",
                "A proposal on this node as leader, from reaching the shard's group to its outcome.",
            ),
            (Stage::Fsync, "convoy_fsync_seconds", "One group-commit fsync of the WAL."),
        ];
        for (stage, name, help) in named {
            if let Some(s) = stages.iter().find(|s| s.stage == stage.name()) {
                let (count, buckets) = stage_buckets(s);
                let sum = node.store.stages.sum_us(stage) as f64 / 1e6;
                let mut h = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
                h.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        let mut h = e.encode_descriptor(
            "convoy_stage_seconds",
            "The send path's stages on this node (send, append_durable, replicate, follower_append, apply_write, fsync).",
            None,
            MetricType::Histogram,
        )?;
        for (s, stage) in stages.iter().zip(Stage::ALL) {
            let (count, buckets) = stage_buckets(s);
            let sum = node.store.stages.sum_us(stage) as f64 / 1e6;
            let labels: Labels = vec![("stage", s.stage.clone())];
            h.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_sampled_against_the_head_and_counted_past_the_threshold() {
        let m = Arc::new(Metrics::default());
        let head = Arc::new(AtomicU64::new(0));
        let a = m.subscribed(head.clone(), 1);
        let b = m.subscribed(head.clone(), 1);
        assert_eq!(m.subscribers(), 2);
        head.store(20_000, Relaxed);
        a.next.store(20_001, Relaxed); // caught up
                                       // b is stuck at offset 1: 20,000 behind.
        assert_eq!(m.sample_lag(10_000), (1, 20_000));
        assert_eq!(m.lagging.load(Relaxed), 1);
        assert_eq!(m.lag_count.load(Relaxed), 2);
        assert_eq!(m.lag_buckets[0].load(Relaxed), 1, "a, 0 behind");
        assert_eq!(m.lag_buckets[6].load(Relaxed), 1, "b, in (10,000, 100,000]");
        drop(b);
        assert_eq!(m.subscribers(), 1);
        assert_eq!(m.sample_lag(10_000), (0, 0));
        drop(a);
        assert_eq!(m.subscribers(), 0);
    }

    #[test]
    fn sends_are_counted_by_the_outcome_their_answer_tells() {
        let m = Metrics::default();
        let ack = |duplicate| Response::Ack { conversation: "c".into(), offset: 1, ts_ms: 0, duplicate };
        m.send_answered(&ack(false));
        m.sends_answered(&Response::Batch(vec![ack(false), ack(true), Response::Throttled { retry_after_ms: 5 }]), 3);
        m.sends_answered(&Response::Error { code: ErrorCode::Unavailable, message: "x".into() }, 4);
        assert_eq!(m.sends(SendOutcome::Acked), 2);
        assert_eq!(m.sends(SendOutcome::Duplicate), 1);
        assert_eq!(m.sends(SendOutcome::Throttled), 1);
        assert_eq!(m.sends(SendOutcome::Unavailable), 4);
    }

    #[test]
    fn stage_buckets_are_cumulative_at_power_of_two_edges() {
        // Buckets holding 10 µs, 100 µs and 3 ms samples.
        let idx = |us: u64| (0..200).find(|i| crate::stages::bucket_upper(*i) >= us).expect("bucket") as u32;
        let s = StageSnapshot { stage: "send".into(), buckets: vec![(idx(10), 1), (idx(100), 2), (idx(3000), 3)] };
        let (count, buckets) = stage_buckets(&s);
        assert_eq!(count, 6);
        let at = |le: f64| buckets.iter().find(|(b, _)| (*b - le).abs() < 1e-12).expect("edge").1;
        assert_eq!(at(16e-6), 1);
        assert_eq!(at(128e-6), 3);
        assert_eq!(at(2048e-6), 3);
        assert_eq!(at(4096e-6), 6);
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative");
        assert_eq!(buckets.last().expect("+Inf"), &(f64::INFINITY, 6));
    }
}
