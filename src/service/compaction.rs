//! When each group this node runs builds a snapshot, and so purges its log.
//!
//! openraft's own policy (`LogsSinceLast`) builds a snapshot every `snapshot_logs_since_last`
//! applied entries, and a leader then purges its log up to that snapshot less
//! `snapshot_log_kept_max` entries, even while it streams an older snapshot to a replica
//! that needs one. A stream paced by `[admin] move_bytes_per_s` can outlast the log the
//! leader keeps under writes: the replica installs a snapshot the purged log has already
//! passed, needs another, and a move never ends. So the groups are built with openraft's
//! policy off (`raft::raft_config`) and this task triggers their snapshots ([`decide`]):
//! - a group builds one once `snapshot_logs_since_last` entries were applied since its last;
//! - a leader holds off while it streams a snapshot, and for [`CATCH_UP_GRACE`] after a
//!   replica installed one while that replica's log is still behind what the next purge
//!   would keep, so it goes on by log from the snapshot it installed (a replica that cannot
//!   be reached, or whose stream failed, holds nothing);
//! - a leader also holds off while a learner whose log catch-up it paces
//!   (`PeerNet::paced_learners`) is still behind what the purge would keep: paced, a move's
//!   log catch-up can last longer than the grace;
//! - never past [`hold_limit`] entries since the last snapshot, so a stream that never ends
//!   cannot make the log grow without bound.

use std::sync::Weak;
use std::time::{Duration, Instant};

use super::{Service, StopSignal};
use crate::raft::network::SnapshotStreams;
use crate::raft::types::{NodeId, Raft};

/// How often each group is looked at.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How long after a replica installed a snapshot it may still be catching up by log.
pub const CATCH_UP_GRACE: Duration = Duration::from_secs(60);
/// A held snapshot is built anyway past this many entries since the last one (or four
/// times `snapshot_logs_since_last`, if more).
pub const HOLD_ENTRIES_MIN: u64 = 50_000;

/// The most entries since the last snapshot a hold may let the log keep.
pub fn hold_limit(every: u64) -> u64 {
    every.saturating_mul(4).max(HOLD_ENTRIES_MIN)
}

/// What one group should do about its next snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Too few entries since the last one.
    Wait,
    /// Build it now.
    Build,
    /// Due, but a replica still needs the log it would purge.
    Hold,
}

/// One group's state, as [`decide`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct GroupView {
    /// Index of the last applied entry, and of the last snapshot (0: none).
    pub applied: u64,
    pub snapshot: u64,
    /// Whether this replica leads the group (only a leader streams snapshots).
    pub leading: bool,
    /// When leading: the log index matched by the replica the last snapshot was installed
    /// on (see [`SnapshotStreams::last_target`]), if the leader replicates to it.
    pub target_match: Option<u64>,
    pub streams: SnapshotStreams,
    /// When leading: the lowest log index matched by a learner whose log catch-up this
    /// leader is pacing (`[admin] move_bytes_per_s`), if any.
    pub paced_match: Option<u64>,
}

/// Whether the group builds its snapshot now. `every` is `snapshot_logs_since_last`, `kept`
/// `snapshot_log_kept_max`.
pub fn decide(g: &GroupView, every: u64, kept: u64, now: Instant) -> Decision {
    let since = g.applied.saturating_sub(g.snapshot);
    if since < every.max(1) {
        return Decision::Wait;
    }
    if !g.leading || since >= hold_limit(every) {
        return Decision::Build;
    }
    if g.streams.sending > 0 {
        return Decision::Hold;
    }
    // The next snapshot would be at `applied`, and the purge keep the `kept` entries below it.
    let purge_to = g.applied.saturating_sub(kept);
    let recent = g.streams.last_installed.is_some_and(|t| now.saturating_duration_since(t) < CATCH_UP_GRACE);
    if recent && g.target_match.is_some_and(|m| m < purge_to) {
        return Decision::Hold;
    }
    if g.paced_match.is_some_and(|m| m < purge_to) {
        return Decision::Hold;
    }
    Decision::Build
}

/// The view of `raft`'s group `shard`.
fn view(net: &crate::raft::network::PeerNet, shard: u32, raft: &Raft, me: NodeId) -> GroupView {
    let m = crate::raft::metrics_of(raft);
    let leading = m.current_leader == Some(me);
    let streams = net.snapshot_streams(shard);
    let matched = |t: NodeId| {
        let matched = m.replication.as_ref()?.get(&t)?;
        Some(matched.as_ref().map_or(0, |l| l.index))
    };
    let target_match = streams.last_target.and_then(matched);
    let paced_match = if leading { net.paced_learners(shard).into_iter().filter_map(matched).min() } else { None };
    GroupView {
        applied: m.last_applied.as_ref().map_or(0, |l| l.index),
        snapshot: m.snapshot.as_ref().map_or(0, |l| l.index),
        leading,
        target_match,
        streams,
        paced_match,
    }
}

/// Triggers each group's snapshots by [`decide`] until the service is dropped.
pub(super) async fn compact(node: Weak<Service>, mut stop: StopSignal) {
    let mut held: std::collections::HashSet<u32> = std::collections::HashSet::new();
    loop {
        if stop.unless_stopped(tokio::time::sleep(CHECK_INTERVAL)).await.is_none() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let (every, kept) = (node.config.raft.snapshot_logs_since_last, node.config.raft.snapshot_log_kept_max);
        let mut groups: Vec<(u32, NodeId, Raft)> =
            node.groups().into_iter().map(|g| (g.shard, g.replica, g.raft.clone())).collect();
        if let Some(h) = node.meta_hosted() {
            groups.push((crate::placement::META_SHARD, h.replica, h.raft));
        }
        for (shard, replica, raft) in groups {
            if stop.is_set() {
                return;
            }
            let g = view(&node.net, shard, &raft, replica);
            match decide(&g, every, kept, Instant::now()) {
                Decision::Wait => {
                    held.remove(&shard);
                }
                Decision::Build => {
                    held.remove(&shard);
                    if let Err(e) = raft.trigger().snapshot().await {
                        tracing::debug!(shard, error = %e, "triggering a snapshot");
                    }
                }
                Decision::Hold => {
                    if held.insert(shard) {
                        tracing::info!(
                            shard,
                            applied = g.applied,
                            snapshot = g.snapshot,
                            target_match = ?g.target_match,
                            "holding the next snapshot: a replica is catching up from the last one"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(applied: u64, snapshot: u64) -> GroupView {
        GroupView {
            applied,
            snapshot,
            leading: true,
            target_match: Some(applied),
            streams: SnapshotStreams::default(),
            paced_match: None,
        }
    }

    #[test]
    fn a_snapshot_is_built_every_so_many_entries() {
        let now = Instant::now();
        assert_eq!(decide(&group(99, 0), 100, 0, now), Decision::Wait);
        assert_eq!(decide(&group(100, 0), 100, 0, now), Decision::Build);
        assert_eq!(decide(&group(250, 200), 100, 0, now), Decision::Wait);
        let follower = GroupView { leading: false, ..group(300, 100) };
        assert_eq!(decide(&follower, 100, 0, now), Decision::Build);
    }

    #[test]
    fn a_leader_holds_while_it_streams_and_while_the_replica_catches_up_by_log() {
        let now = Instant::now();
        let streaming =
            GroupView { streams: SnapshotStreams { sending: 1, ..SnapshotStreams::default() }, ..group(500, 100) };
        assert_eq!(decide(&streaming, 100, 0, now), Decision::Hold);
        // A follower never streams: nothing to hold for.
        assert_eq!(decide(&GroupView { leading: false, ..streaming }, 100, 0, now), Decision::Build);

        // A replica installed it 5 s ago, at 100, and is at 300 of 500.
        let ended = SnapshotStreams {
            last_installed: Some(now - Duration::from_secs(5)),
            last_target: Some(4),
            ..SnapshotStreams::default()
        };
        let catching_up = GroupView { streams: ended, target_match: Some(300), ..group(500, 100) };
        assert_eq!(decide(&catching_up, 100, 0, now), Decision::Hold);
        // Once it holds what the purge would keep, the snapshot is built.
        assert_eq!(decide(&catching_up, 100, 250, now), Decision::Build);
        assert_eq!(decide(&GroupView { target_match: Some(500), ..catching_up }, 100, 0, now), Decision::Build);
        // Past the grace, a replica that stays behind (it went down) holds nothing.
        let later = now + CATCH_UP_GRACE;
        assert_eq!(decide(&catching_up, 100, 0, later), Decision::Build);
        // No install by this node, no hold, however far behind a replica is: a peer that
        // cannot be reached (openraft retries its snapshot) never starts a stream.
        let no_install = GroupView { target_match: None, ..group(500, 100) };
        assert_eq!(decide(&no_install, 100, 0, now), Decision::Build);
    }

    // A learner whose log catch-up is paced is held for past the grace, until it holds what
    // the purge keeps, and never past the hold's limit.
    #[test]
    fn a_leader_holds_while_a_paced_learner_catches_up_by_log() {
        let now = Instant::now();
        let paced = GroupView { paced_match: Some(300), ..group(500, 100) };
        assert_eq!(decide(&paced, 100, 0, now + CATCH_UP_GRACE * 3), Decision::Hold);
        assert_eq!(decide(&paced, 100, 250, now), Decision::Build, "it holds what the purge keeps");
        assert_eq!(decide(&GroupView { paced_match: Some(500), ..paced }, 100, 0, now), Decision::Build);
        assert_eq!(decide(&GroupView { leading: false, ..paced }, 100, 0, now), Decision::Build);
        let long = GroupView { paced_match: Some(300), ..group(HOLD_ENTRIES_MIN + 100, 100) };
        assert_eq!(decide(&long, 100, 0, now), Decision::Build, "the limit");
    }

    #[test]
    fn a_hold_ends_at_its_limit() {
        let now = Instant::now();
        let streaming = |applied| GroupView {
            streams: SnapshotStreams { sending: 1, ..SnapshotStreams::default() },
            ..group(applied, 0)
        };
        assert_eq!(hold_limit(100), HOLD_ENTRIES_MIN);
        assert_eq!(hold_limit(20_000), 80_000);
        assert_eq!(decide(&streaming(HOLD_ENTRIES_MIN - 1), 100, 0, now), Decision::Hold);
        assert_eq!(decide(&streaming(HOLD_ENTRIES_MIN), 100, 0, now), Decision::Build);
    }
}
