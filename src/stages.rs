//! Where a send's time goes on a node: latency histograms of the stages every send passes,
//! kept since start and shown by `convoy cluster status`.
//!
//! A send is acknowledged after the leader has appended it, a quorum has fsynced it and the
//! leader has applied it. The stages, in the order a send meets them:
//!
//! | stage | where | from → to |
//! |---|---|---|
//! | `send` | leader | a proposal (one send, or a batch of sends for one shard) reaches the Raft group → its outcome is known |
//! | `append_durable` | every replica | a log append is written → the fsync covering it completed |
//! | `replicate` | leader | an AppendEntries carrying entries leaves → its answer arrived |
//! | `follower_append` | follower | such an AppendEntries arrived → its answer was produced |
//! | `apply_write` | every replica | the state machine's batch write for one apply |
//! | `fsync` | every replica | one group-commit fsync of the WAL |
//!
//! `send` minus `replicate` is the leader's own work (queueing, commit, apply, answer);
//! `replicate` minus `follower_append` is the peer transport; `follower_append` minus
//! `append_durable` is the follower's hand-offs around its fsync.
//!
//! Each histogram has 8 buckets per power of two of microseconds (12.5 % resolution) up to
//! about 67 s; recording is one relaxed atomic increment. Counts are cumulative, so a reader
//! that wants one period subtracts two snapshots ([`StageSnapshot::since`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Buckets per histogram: values up to 2^26 µs (about 67 s); longer ones land in the last.
const BUCKETS: usize = 200;

/// The stages, by index into [`Stages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Send,
    AppendDurable,
    Replicate,
    FollowerAppend,
    ApplyWrite,
    Fsync,
}

impl Stage {
    pub const ALL: [Stage; 6] =
        [Stage::Send, Stage::AppendDurable, Stage::Replicate, Stage::FollowerAppend, Stage::ApplyWrite, Stage::Fsync];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Send => "send",
            Stage::AppendDurable => "append_durable",
            Stage::Replicate => "replicate",
            Stage::FollowerAppend => "follower_append",
            Stage::ApplyWrite => "apply_write",
            Stage::Fsync => "fsync",
        }
    }
}

fn bucket_of(us: u64) -> usize {
    let i = if us < 8 {
        us as usize
    } else {
        let e = 63 - us.leading_zeros() as u64; // e >= 3
        ((e - 2) * 8 + ((us >> (e - 3)) & 7)) as usize
    };
    i.min(BUCKETS - 1)
}

/// The largest value (µs) bucket `i` holds.
pub fn bucket_upper(i: usize) -> u64 {
    // A bucket index comes from a node's answer too: past the last it is the last's bound,
    // never an overflowing shift.
    let i = i.min(BUCKETS - 1);
    if i < 8 {
        return i as u64;
    }
    let (e, m) = ((i / 8 + 2) as u64, (i % 8) as u64);
    ((8 + m + 1) << (e - 3)) - 1
}

/// One node's stage histograms.
pub struct Stages {
    counts: Vec<[AtomicU64; BUCKETS]>,
    /// The sum of each stage's samples, in µs.
    sums_us: Vec<AtomicU64>,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            counts: Stage::ALL.iter().map(|_| std::array::from_fn(|_| AtomicU64::new(0))).collect(),
            sums_us: Stage::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for Stages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stages").finish_non_exhaustive()
    }
}

impl Stages {
    pub fn record(&self, stage: Stage, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.counts[stage as usize][bucket_of(us)].fetch_add(1, Relaxed);
        self.sums_us[stage as usize].fetch_add(us, Relaxed);
    }

    /// The sum of a stage's samples since start, in µs.
    pub fn sum_us(&self, stage: Stage) -> u64 {
        self.sums_us[stage as usize].load(Relaxed)
    }

    /// The cumulative counts of every stage.
    pub fn snapshot(&self) -> Vec<StageSnapshot> {
        Stage::ALL
            .iter()
            .map(|s| {
                let buckets = self.counts[*s as usize]
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| {
                        let n = c.load(Relaxed);
                        (n > 0).then_some((i as u32, n))
                    })
                    .collect();
                StageSnapshot { stage: s.name().to_string(), buckets }
            })
            .collect()
    }
}

/// A stage's histogram as carried in a status answer: non-empty buckets only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSnapshot {
    pub stage: String,
    /// (bucket index, count), ascending by index.
    pub buckets: Vec<(u32, u64)>,
}

impl StageSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }

    /// The `q` quantile (0..=1) in µs: the upper bound of the bucket holding it; `None` if
    /// empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in &self.buckets {
            seen = n.saturating_add(seen);
            if seen >= rank {
                return Some(bucket_upper(*i as usize));
            }
        }
        self.buckets.last().map(|(i, _)| bucket_upper(*i as usize))
    }

    /// What was recorded after `earlier` (a snapshot of the same stage taken before).
    pub fn since(&self, earlier: &StageSnapshot) -> StageSnapshot {
        let buckets = self
            .buckets
            .iter()
            .filter_map(|(i, n)| {
                let before = earlier.buckets.iter().find(|(j, _)| j == i).map(|(_, m)| *m).unwrap_or(0);
                let d = n.saturating_sub(before);
                (d > 0).then_some((*i, d))
            })
            .collect();
        StageSnapshot { stage: self.stage.clone(), buckets }
    }

    /// The sum of several nodes' histograms of one stage.
    pub fn merge<'a>(stage: &str, all: impl IntoIterator<Item = &'a StageSnapshot>) -> StageSnapshot {
        let mut counts = std::collections::BTreeMap::<u32, u64>::new();
        for s in all.into_iter().filter(|s| s.stage == stage) {
            for (i, n) in &s.buckets {
                *counts.entry(*i).or_default() += n;
            }
        }
        StageSnapshot { stage: stage.to_string(), buckets: counts.into_iter().collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_bound_their_values() {
        let mut last = 0;
        for us in 0..200_000u64 {
            let b = bucket_of(us);
            assert!(b == last || b == last + 1, "bucket jumped at {us}: {last} -> {b}");
            assert!(us <= bucket_upper(b), "{us} above its bucket's bound {}", bucket_upper(b));
            if b > 0 {
                assert!(us > bucket_upper(b - 1), "{us} also fits bucket {}", b - 1);
            }
            last = b;
        }
        // Resolution: a bucket's bound is within 12.5 % of every value it holds (from 8 µs).
        for us in [8u64, 100, 999, 12_345, 1_000_000] {
            let upper = bucket_upper(bucket_of(us));
            assert!((upper - us) as f64 <= us as f64 * 0.125, "{us} -> {upper}");
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        // A snapshot from a node's answer may name any bucket and any counts.
        assert_eq!(bucket_upper(usize::MAX), bucket_upper(BUCKETS - 1));
        let odd = StageSnapshot { stage: "odd".into(), buckets: vec![(600, u64::MAX), (u32::MAX, 5)] };
        assert_eq!(odd.count(), u64::MAX);
        assert_eq!(odd.quantile_us(0.5), Some(bucket_upper(BUCKETS - 1)));
    }

    #[test]
    fn quantiles_and_differences() {
        let stages = Stages::default();
        for us in 1..=100u64 {
            stages.record(Stage::Send, Duration::from_micros(us * 10));
        }
        let before = stages.snapshot();
        let send = &before[0];
        assert_eq!(send.stage, "send");
        assert_eq!(send.count(), 100);
        let p50 = send.quantile_us(0.5).unwrap();
        assert!((500..=563).contains(&p50), "p50 {p50}");
        let p99 = send.quantile_us(0.99).unwrap();
        assert!((990..=1_119).contains(&p99), "p99 {p99}");
        assert_eq!(before[1].quantile_us(0.5), None, "nothing recorded for append_durable");

        for _ in 0..50 {
            stages.record(Stage::Send, Duration::from_millis(40));
        }
        let after = stages.snapshot();
        let period = after[0].since(&before[0]);
        assert_eq!(period.count(), 50);
        let p50 = period.quantile_us(0.5).unwrap();
        assert!((40_000..=45_000).contains(&p50), "period p50 {p50}");

        let merged = StageSnapshot::merge("send", [&before[0], &period]);
        assert_eq!(merged.count(), 150);
        assert_eq!(merged, after[0]);
    }
}
