//! Retention, enforced by each shard's leader, and the space it frees given back.
//!
//! Every `retention.check_interval_ms`, the leader of each shard reads its conversations'
//! policies (a conversation's own, its unset limits filled by the cluster's `[retention]`),
//! works out the first offset each must keep, and proposes a [`Command::TrimUnder`] for those
//! that keep less than they hold. The trim names the conversation's own policy it was planned
//! under, and deletes nothing if another was set before its turn in the log. The leader alone reads the clock and the policies; the trim is a
//! log entry, so every replica deletes the same prefix at the same log position, and apply
//! bounds it (never past the head, at most [`TRIM_MESSAGES_MAX`] messages an entry: the next
//! check trims the rest).
//!
//! Which conversations are read: with no cluster default, only those with a policy of their
//! own (a scan of their records); with a default, every conversation of the shard (a scan of
//! its head records). A check reads at most `retention.conversations_per_check` of them and
//! the next resumes after the last one read, so a shard of millions of conversations costs
//! each check a bounded page, and is gone through in turn. A conversation whose trim a check
//! left unfinished (cut, refused as planned under an older policy, or not proposed) is read
//! again at the next one, beside its page; one that cannot be read (its head, policy or other
//! state does not decode) is logged and passed over. A node keeps its place in a shard it
//! stops leading, and goes on from there when it leads it again.
//! A `max_bytes` limit reads the newest messages back
//! from the head the first time (at most the limit and a window more); what it kept is
//! remembered, and later checks count on from it, reading only the messages sent since and
//! those the limit then leaves behind (again from the head when the limit changed, when
//! another limit's trim deleted messages it counted, when the count does not match what is
//! stored, and when the reading is gone: readings are in memory, lost at a restart, with the
//! shard's replica, and at the end of a pass that did not meet the limit). Trims are proposed until the
//! conversation starts where the limit keeps (a trim deletes at most [`TRIM_MESSAGES_MAX`],
//! and a proposal can fail).
//!
//! Trims are range deletions: their space comes back when compaction rewrites the files, which
//! RocksDB would do in its own time. Each node reclaims it on purpose instead ([`reclaim`]),
//! once enough was trimmed or the first trim waited long enough.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use super::{now_ms, Service, StopSignal};
use crate::chat::{Command, Outcome, Retention, ShardId, TrimCommand, TrimUnderCommand, TRIM_MESSAGES_MAX};
use crate::error::Result;
use crate::raft as consensus;
use crate::store::Store;

/// A trim to propose: the conversation, the first offset to keep, and the conversation's own
/// retention record it was planned under (`Retention::default()`: none).
type Trim = (String, u64, Retention);

/// A conversation's last `max_bytes` reading: under which limit, and what that limit kept
/// then (counted on from there at the next check, see [`Store::tally_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BytesKept {
    limit: u64,
    tally: crate::store::BytesTally,
}

/// What a shard's checks keep from one to the next, while the shard has a replica on this
/// node (led or not: a node that leads it again goes on from where it stopped).
#[derive(Debug, Default)]
struct Checks {
    /// The last `max_bytes` readings, by conversation, with the pass that made or confirmed
    /// each: at a pass's end, readings of an earlier pass (a limit or a conversation gone)
    /// are dropped.
    seen: HashMap<String, (BytesKept, u64)>,
    /// Which pass over the shard's conversations this is.
    pass: u64,
    /// Where the next check resumes: after this conversation (`None`: from the first).
    after: Option<String>,
    /// The conversations whose trim the last check left unfinished (cut at
    /// [`TRIM_MESSAGES_MAX`], or not applied), planned again at the next beside its page: the
    /// rest must not wait a whole pass. At most a page.
    carried: Vec<String>,
}

/// Runs the retention checks of the shards this node leads, until the service is dropped.
pub(super) async fn enforce(node: Weak<Service>, mut stop: StopSignal) {
    let (interval, page) = match node.upgrade() {
        Some(n) => {
            (Duration::from_millis(n.config.retention.check_interval_ms), n.config.retention.conversations_per_check)
        }
        None => return,
    };
    let mut checked: HashMap<ShardId, Checks> = HashMap::new();
    loop {
        if stop.unless_stopped(tokio::time::sleep(interval)).await.is_none() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let default = node.config.retention_default;
        let groups = node.groups();
        // A shard moved off this node leaves no state behind.
        checked.retain(|shard, _| groups.iter().any(|g| g.shard == *shard));
        for group in groups {
            if stop.is_set() {
                return;
            }
            // A shard this node no longer leads keeps its place: were the pass to start over
            // at each new leadership, leaders that change faster than a pass takes would never
            // reach the conversations at the end of the key order. (The readings kept with it
            // are checked against the head and the limit before use.)
            if consensus::metrics_of(&group.raft).current_leader != Some(group.replica) {
                continue;
            }
            let (store, shard) = (node.store.clone(), group.shard);
            let mut checks = checked.remove(&shard).unwrap_or_default();
            let planned = tokio::task::spawn_blocking(move || {
                let trims = plan_page(&store, shard, default, now_ms(), &mut checks, page);
                (trims, checks)
            })
            .await;
            let trims = match planned {
                Ok((Ok(trims), checks)) => {
                    checked.insert(shard, checks);
                    trims
                }
                Ok((Err(e), checks)) => {
                    // The page itself did not read: tried again at the next check.
                    checked.insert(shard, checks);
                    tracing::warn!(shard, error = %e, "retention check failed; going on at the next one");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, "retention check did not finish");
                    continue;
                }
            };
            let mut unfinished = Vec::new();
            let mut trims = trims.into_iter();
            while let Some((conversation, before, planned_under)) = trims.next() {
                if stop.is_set() {
                    return;
                }
                let trim = TrimCommand { conversation: conversation.clone(), before };
                let command = Command::TrimUnder(TrimUnderCommand { trim, planned_under });
                match node.propose(&group, command).await {
                    Ok(Outcome::Trimmed { earliest, deleted }) => {
                        if deleted > 0 {
                            tracing::debug!(shard, conversation, earliest, deleted, "trimmed by retention");
                        }
                        // Cut at TRIM_MESSAGES_MAX, or refused as planned under a policy
                        // changed since: planned again at the next check.
                        if earliest < before {
                            unfinished.push(conversation);
                        }
                    }
                    Ok(_) => {}
                    Err(refusal) => {
                        tracing::debug!(shard, conversation, ?refusal, "trim not applied; retrying at the next check");
                        unfinished.push(conversation);
                        unfinished.extend(trims.by_ref().map(|(c, ..)| c));
                        break;
                    }
                }
            }
            if let Some(checks) = checked.get_mut(&shard) {
                unfinished.truncate(page);
                checks.carried = unfinished;
            }
        }
    }
}

/// Every trim a shard's conversations need now: every page of [`plan_page`] in one go.
#[cfg(test)]
fn plan(
    store: &Store,
    shard: ShardId,
    default: Retention,
    now_ms: u64,
    seen: &mut HashMap<String, BytesKept>,
) -> Result<Vec<Trim>> {
    // The readings given are of an earlier pass: those this one does not confirm go.
    let readings = std::mem::take(seen).into_iter().map(|(c, k)| (c, (k, 0))).collect();
    let mut checks = Checks { seen: readings, pass: 1, ..Checks::default() };
    let trims = plan_page(store, shard, default, now_ms, &mut checks, usize::MAX);
    *seen = checks.seen.into_iter().map(|(c, (k, _))| (c, k)).collect();
    trims
}

/// The trims the next `page` conversations of a shard need now (`now_ms` by this leader's
/// clock), from where the last check stopped; `checks` says where that was and holds the
/// last `max_bytes` readings, and is updated (a short page starts the next check over from
/// the first conversation).
fn plan_page(
    store: &Store,
    shard: ShardId,
    default: Retention,
    now_ms: u64,
    checks: &mut Checks,
    page: usize,
) -> Result<Vec<Trim>> {
    let after = checks.after.as_deref();
    // The page's conversations, each with its own retention record (none: the default's
    // limits alone) or, with no default, its head. The place moves past the page before
    // anything of a conversation is read: one that cannot be read is passed over, not
    // read again at every check.
    let paged: Vec<(String, Option<u64>, Option<Retention>)> = if default.keeps_all() {
        store.retentions_page(shard, after, page)?.into_iter().map(|(c, own)| (c, None, own)).collect()
    } else {
        store.heads_page(shard, after, page)?.into_iter().map(|(c, head)| (c, head, None)).collect()
    };
    checks.after = (paged.len() >= page).then(|| paged.last().map(|(c, ..)| c.clone())).flatten();
    let pass_ends = checks.after.is_none();
    // The conversations the last check left unfinished first (those not in this page), then
    // the page.
    let mut conversations = Vec::with_capacity(checks.carried.len() + paged.len());
    for c in std::mem::take(&mut checks.carried) {
        if !paged.iter().any(|(p, ..)| *p == c) {
            conversations.push((c, None, None));
        }
    }
    conversations.extend(paged);
    let mut trims = Vec::new();
    for (conversation, head, own) in conversations {
        match plan_one(store, shard, default, now_ms, checks, &conversation, head, own) {
            Ok(Some(trim)) => trims.push(trim),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(shard, conversation, error = %e, "retention check of a conversation failed; passed over")
            }
        }
    }
    if pass_ends {
        let pass = checks.pass;
        checks.seen.retain(|_, (_, read)| *read == pass);
        checks.pass += 1;
    }
    Ok(trims)
}

/// The trim `conversation` needs now, if any; `head` and `own` (its own retention record)
/// are read here when not given.
#[allow(clippy::too_many_arguments)]
fn plan_one(
    store: &Store,
    shard: ShardId,
    default: Retention,
    now_ms: u64,
    checks: &mut Checks,
    conversation: &str,
    head: Option<u64>,
    own: Option<Retention>,
) -> Result<Option<Trim>> {
    let head = match head {
        Some(h) => h,
        None => store.head(shard, conversation)?,
    };
    let planned_under = match own {
        Some(r) => r,
        None => store.retention(shard, conversation)?.unwrap_or_default(),
    };
    let policy = planned_under.or(default);
    let seen = &mut checks.seen;
    // Readings are kept only for the conversations that still have a byte limit.
    if policy.max_bytes.is_none() {
        seen.remove(conversation);
    }
    if policy.keeps_all() || head == 0 {
        return Ok(None);
    }
    let earliest = store.earliest(shard, conversation)?;
    let mut keep_from = earliest;
    if let Some(n) = policy.max_messages {
        keep_from = keep_from.max(head.saturating_sub(n) + 1);
    }
    if let Some(age) = policy.max_age_ms {
        let cutoff = now_ms.saturating_sub(age);
        let mut first_young = None;
        let mut last_old = earliest.saturating_sub(1);
        store.each_message(shard, conversation, keep_from, TRIM_MESSAGES_MAX, |m| {
            if m.ts_ms >= cutoff {
                first_young = Some(m.offset);
                return false;
            }
            last_old = m.offset;
            true
        })?;
        keep_from = keep_from.max(first_young.unwrap_or(last_old + 1));
    }
    if let Some(limit) = policy.max_bytes {
        // Counted on from the last reading under the same limit: only what was sent since
        // is read (and what the limit now leaves behind), not the whole conversation again.
        let last = seen.get(conversation).filter(|(k, _)| k.limit == limit).map(|(k, _)| k.tally);
        let tally = match last {
            Some(t) if t.head == head && t.from >= earliest => t,
            _ => store.tally_bytes(shard, conversation, limit, last)?,
        };
        seen.insert(conversation.to_string(), (BytesKept { limit, tally }, checks.pass));
        if tally.cut {
            keep_from = keep_from.max(tally.from);
        }
    }
    Ok((keep_from > earliest).then(|| (conversation.to_string(), keep_from.min(head + 1), planned_under)))
}

/// Gives the space of trimmed messages back on this node (see [`Store::reclaim`]), until the
/// service is dropped.
pub(super) async fn reclaim(node: Weak<Service>, mut stop: StopSignal) {
    loop {
        if stop.unless_stopped(tokio::time::sleep(Duration::from_secs(1))).await.is_none() {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let r = &node.config.retention;
        let Some((messages, trimmed)) =
            node.store.reclaim.due(r.reclaim_after_messages, Duration::from_secs(r.reclaim_after_s))
        else {
            continue;
        };
        let store = node.store.clone();
        drop(node);
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || store.reclaim(&trimmed)).await {
            Ok(Ok(())) => tracing::info!(
                messages,
                took_ms = started.elapsed().as_millis() as u64,
                "reclaimed the space of messages trimmed by retention"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "reclaiming the space of trimmed messages failed"),
            Err(e) => tracing::warn!(error = %e, "reclaiming the space of trimmed messages did not finish"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::SendCommand;

    /// A store holding conversation `c` of shard 0 with `n` messages, the i-th stamped at
    /// `i * 1000` ms and `bytes` long, applied through the real state machine path.
    fn store_with(n: u64, bytes: usize) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        send_more(&store, 1, n, bytes);
        (dir, store)
    }

    /// A check reads at most a page of conversations, goes on from the last one at the
    /// next, and starts over after a short page: every conversation is checked in turn.
    #[test]
    fn checks_go_through_a_shards_conversations_a_page_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let sends: Vec<SendCommand> = names
            .iter()
            .flat_map(|c| {
                (1..=5).map(move |i| SendCommand {
                    conversation: c.clone(),
                    sender: "u".into(),
                    client_id: 1,
                    client_seq: i,
                    ts_ms: i,
                    text: "x".into(),
                })
            })
            .collect();
        crate::raft::state_machine::apply_for_test(&store, 0, vec![Command::SendBatch(sends)]).expect("apply");
        let default = Retention { max_messages: Some(2), ..Retention::default() };
        let mut checks = Checks::default();
        let check = |checks: &mut Checks, default, page| -> Vec<String> {
            let trims = plan_page(&store, 0, default, 0, checks, page).expect("plan");
            assert!(trims.iter().all(|(_, before, _)| *before == 4), "{trims:?}");
            trims.into_iter().map(|(c, ..)| c).collect()
        };
        let c = &mut checks;
        assert_eq!(check(c, default, 3), ["c0", "c1", "c2"]);
        assert_eq!(check(c, default, 3), ["c3", "c4", "c5"]);
        assert_eq!(check(c, default, 3), ["c6", "c7", "c8"]);
        assert_eq!(check(c, default, 3), ["c9"], "the last page is short");
        assert_eq!(check(c, default, 3), ["c0", "c1", "c2"], "and the next check starts over");
        assert_eq!(check(c, default, 100).len(), 7, "from where it stopped to the end");
        assert_eq!(check(c, default, 100).len(), 10, "one page holds them all");
        // Trims the last check left unfinished are planned again first, beside the page
        // (once, if the page has them too), and only at that check.
        c.carried = vec!["c9".into(), "c1".into()];
        assert_eq!(check(c, default, 3), ["c9", "c0", "c1", "c2"]);
        assert!(c.carried.is_empty());
        assert_eq!(check(c, default, 3), ["c3", "c4", "c5"]);
        c.after = None;

        // With no default, only the conversations with a policy of their own are read, paged
        // the same way.
        let own = Retention { max_messages: Some(2), ..Retention::default() };
        let set = |c: &str| {
            Command::SetRetention(crate::chat::RetentionCommand {
                conversation: c.into(),
                by: "op".into(),
                admin: true,
                retention: own,
            })
        };
        crate::raft::state_machine::apply_for_test(&store, 0, vec![set("c1"), set("c4"), set("c7")]).expect("apply");
        let none = Retention::default();
        assert_eq!(check(c, none, 2), ["c1", "c4"]);
        assert_eq!(check(c, none, 2), ["c7"]);
        assert_eq!(check(c, none, 2), ["c1", "c4"]);

        // A conversation whose state does not read is passed over; the rest of its page is
        // checked, and the next check goes on after it.
        let key = crate::store::keys::earliest_key(0, "c4");
        store.db.put_cf(store.cf(crate::store::keys::CF_STATE), key, b"not a number").expect("damage c4");
        c.after = None;
        assert_eq!(check(c, default, 5), ["c0", "c1", "c2", "c3"]);
        assert_eq!(check(c, default, 5), ["c5", "c6", "c7", "c8", "c9"]);

        // So is one whose record the page itself reads: a head (with a default) or a
        // retention record (without) that does not decode. The page goes on past it, and
        // the pass reaches its end.
        let state = store.cf(crate::store::keys::CF_STATE);
        store.db.delete_cf(state, crate::store::keys::earliest_key(0, "c4")).expect("mend c4");
        store.db.put_cf(state, crate::store::keys::head_key(0, "c6"), b"\xff").expect("damage c6");
        c.after = None;
        assert_eq!(check(c, default, 5), ["c0", "c1", "c2", "c3", "c4"]);
        assert_eq!(check(c, default, 5), ["c5", "c7", "c8", "c9"]);
        assert!(check(c, default, 5).is_empty(), "the page after the last full one is empty");
        assert_eq!(check(c, default, 5).len(), 5, "and the next pass starts over");
        store.db.put_cf(state, crate::store::keys::retention_key(0, "c1"), b"\xff").expect("damage c1");
        c.after = None;
        assert_eq!(check(c, none, 2), ["c4"]);
        assert_eq!(check(c, none, 2), ["c7"]);
    }

    #[test]
    fn max_messages_keeps_the_newest() {
        let (_d, store) = store_with(300, 10);
        let policy = Retention { max_messages: Some(100), ..Retention::default() };
        let trims = plan(&store, 0, policy, 0, &mut HashMap::new()).expect("plan");
        assert_eq!(trims, vec![("c".to_string(), 201, Retention::default())]);
        // Another shard, or no policy at all, trims nothing.
        assert!(plan(&store, 1, policy, 0, &mut HashMap::new()).expect("plan").is_empty());
        assert!(plan(&store, 0, Retention::default(), 0, &mut HashMap::new()).expect("plan").is_empty());
    }

    #[test]
    fn max_age_keeps_what_is_young_enough() {
        let (_d, store) = store_with(50, 10);
        // At 60 s, a 15 s age keeps the messages stamped 45 s and later: offsets 45..=50.
        let policy = Retention { max_age_ms: Some(15_000), ..Retention::default() };
        assert_eq!(
            plan(&store, 0, policy, 60_000, &mut HashMap::new()).expect("plan"),
            vec![("c".to_string(), 45, Retention::default())]
        );
        // Everything expired: the trim reaches past the head, which apply bounds.
        assert_eq!(
            plan(&store, 0, policy, 900_000, &mut HashMap::new()).expect("plan"),
            vec![("c".to_string(), 51, Retention::default())]
        );
    }

    /// `n` more messages of `bytes` each to conversation "c" of shard 0, numbered on from
    /// `first` (their client sequence numbers).
    fn send_more(store: &Store, first: u64, n: u64, bytes: usize) {
        let sends: Vec<SendCommand> = (first..first + n)
            .map(|i| SendCommand {
                conversation: "c".into(),
                sender: "u".into(),
                client_id: 1,
                client_seq: i,
                ts_ms: i * 1000,
                text: "x".repeat(bytes),
            })
            .collect();
        crate::raft::state_machine::apply_for_test(store, 0, vec![Command::SendBatch(sends)]).expect("apply");
    }

    /// A byte limit far above a busy conversation's size reads, at each check after the
    /// first, only the messages sent since; one that cuts reads those and the ones it now
    /// leaves behind; a new limit counts again from the head.
    #[test]
    fn max_bytes_counts_on_from_its_last_reading() {
        let (_d, store) = store_with(100, 100);
        let fresh = |limit| store.tally_bytes(0, "c", limit, None).expect("tally");
        let far = Retention { max_bytes: Some(1 << 40), ..Retention::default() };
        let mut seen = HashMap::new();
        assert!(plan(&store, 0, far, 0, &mut seen).expect("plan").is_empty());
        assert_eq!(
            (seen["c"].tally.read, seen["c"].tally.bytes),
            (100, fresh(1 << 40).bytes),
            "the first check reads all"
        );
        send_more(&store, 101, 5, 100);
        assert!(plan(&store, 0, far, 0, &mut seen).expect("plan").is_empty());
        assert_eq!((seen["c"].tally.read, seen["c"].tally.bytes), (5, fresh(1 << 40).bytes), "then only what was sent");
        assert!(plan(&store, 0, far, 0, &mut seen).expect("plan").is_empty());
        assert_eq!(seen["c"].tally.read, 5, "a quiet conversation is not read again");

        // A limit that cuts (about 20 messages): read back from the head once, then on from
        // where it kept.
        let size = store.tally_bytes(0, "c", u64::MAX, None).expect("tally").bytes / 105;
        let limit = 20 * size;
        let cut = Retention { max_bytes: Some(limit), ..Retention::default() };
        let want = || vec![("c".to_string(), fresh(limit).from, Retention::default())];
        assert!(fresh(limit).cut);
        assert_eq!(plan(&store, 0, cut, 0, &mut seen).expect("plan"), want());
        assert!(seen["c"].tally.read <= 21 + 8, "read back at most the limit and a window: {}", seen["c"].tally.read);
        send_more(&store, 106, 3, 100);
        assert_eq!(plan(&store, 0, cut, 0, &mut seen).expect("plan"), want());
        // The 3 sent, and one window (8 in tests) from where it kept, to leave about 3 behind.
        assert_eq!(seen["c"].tally.read, 3 + 8);
        let (t, f) = (seen["c"].tally, fresh(limit));
        assert_eq!((t.head, t.from, t.bytes, t.cut), (f.head, f.from, f.bytes, f.cut));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Counted on from its last reading, a byte limit keeps exactly what a count from
        /// the head keeps, through sends of any size and trims below, at, or past it.
        #[test]
        fn a_byte_count_carried_on_equals_one_from_the_head(
            limit in 1u64..3_000,
            steps in proptest::collection::vec((0u64..6, 1usize..300, proptest::prelude::any::<bool>(), 0u64..40), 1..30),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let (store, _) = Store::open(dir.path()).expect("open");
            let mut sent = 0;
            let mut last = None;
            for (n, bytes, trim, back) in steps {
                send_more(&store, sent + 1, n, bytes);
                sent += n;
                if trim {
                    let head = store.head(0, "c").expect("head");
                    let before = (head + 1).saturating_sub(back).max(1);
                    let trim = Command::Trim(TrimCommand { conversation: "c".into(), before });
                    crate::raft::state_machine::apply_for_test(&store, 0, vec![trim]).expect("trim");
                }
                let on = store.tally_bytes(0, "c", limit, last).expect("carried on");
                let fresh = store.tally_bytes(0, "c", limit, None).expect("from the head");
                proptest::prop_assert_eq!((on.head, on.from, on.bytes, on.cut), (fresh.head, fresh.from, fresh.bytes, fresh.cut));
                last = Some(on);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Planned from the readings of earlier checks, a check plans what a check with none
        /// plans: through sends of any size, a byte limit that changes (or goes, and comes
        /// back), a message limit beside it, and the planned trims applied or not (as when a
        /// proposal fails).
        #[test]
        fn a_check_with_readings_plans_what_a_check_without_plans(
            limits in proptest::collection::vec(1u64..3_000, 3),
            max_messages in proptest::option::of(5u64..40),
            steps in proptest::collection::vec(
                (0u64..6, 1usize..300, 0usize..4, proptest::prelude::any::<bool>()),
                1..30,
            ),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let (store, _) = Store::open(dir.path()).expect("open");
            let mut seen = HashMap::new();
            let mut sent = 0;
            for (n, bytes, limit, apply) in steps {
                send_more(&store, sent + 1, n, bytes);
                sent += n;
                let policy = Retention { max_bytes: limits.get(limit).copied(), max_messages, ..Retention::default() };
                let carried = plan(&store, 0, policy, 0, &mut seen).expect("plan with readings");
                let fresh = plan(&store, 0, policy, 0, &mut HashMap::new()).expect("plan without");
                proptest::prop_assert_eq!(&carried, &fresh);
                if apply {
                    for (conversation, before, _) in carried {
                        let trim = Command::Trim(TrimCommand { conversation, before });
                        crate::raft::state_machine::apply_for_test(&store, 0, vec![trim]).expect("trim");
                    }
                }
            }
        }
    }

    #[test]
    fn max_bytes_reads_back_from_the_head_once_per_head() {
        let (_d, store) = store_with(100, 100);
        let mut sizes = 0;
        store
            .scan_messages(0, "c", 100, 1, usize::MAX, |_, v| {
                sizes = v.len() as u64;
                Ok(())
            })
            .expect("scan");
        // Room for exactly 10 stored messages keeps offsets 91..=100.
        let policy = Retention { max_bytes: Some(10 * sizes), ..Retention::default() };
        let mut seen = HashMap::new();
        assert_eq!(
            plan(&store, 0, policy, 0, &mut seen).expect("plan"),
            vec![("c".to_string(), 91, Retention::default())]
        );
        let read = seen["c"];
        assert_eq!((read.limit, read.tally.head, read.tally.from, read.tally.cut), (10 * sizes, 100, 91, true));
        assert_eq!(read.tally.bytes, 10 * sizes);
        // Not applied yet (a failed proposal): proposed again, from the same reading.
        assert_eq!(
            plan(&store, 0, policy, 0, &mut seen).expect("plan"),
            vec![("c".to_string(), 91, Retention::default())]
        );
        // Applied in part (a trim deletes at most TRIM_MESSAGES_MAX), the head unmoved: the
        // rest is proposed at the next check, not left until someone sends.
        let trim = |before| Command::Trim(crate::chat::TrimCommand { conversation: "c".into(), before });
        crate::raft::state_machine::apply_for_test(&store, 0, vec![trim(50)]).expect("apply");
        assert_eq!(
            plan(&store, 0, policy, 0, &mut seen).expect("plan"),
            vec![("c".to_string(), 91, Retention::default())]
        );
        crate::raft::state_machine::apply_for_test(&store, 0, vec![trim(91)]).expect("apply");
        assert!(plan(&store, 0, policy, 0, &mut seen).expect("plan").is_empty(), "done");
        // A lower limit on a quiet conversation (the head unmoved) is read again and applied.
        let lower = Retention { max_bytes: Some(4 * sizes), ..Retention::default() };
        assert_eq!(
            plan(&store, 0, lower, 0, &mut seen).expect("plan"),
            vec![("c".to_string(), 97, Retention::default())]
        );
        // No byte limit any more: the reading is forgotten.
        assert!(plan(&store, 0, Retention::default(), 0, &mut seen).expect("plan").is_empty());
        assert!(seen.is_empty());
    }

    #[test]
    fn a_conversations_own_policy_fills_from_the_default() {
        let own = Retention { max_messages: Some(5), ..Retention::default() };
        let default = Retention { max_messages: Some(50), max_age_ms: Some(9), max_bytes: None };
        assert_eq!(own.or(default), Retention { max_messages: Some(5), max_age_ms: Some(9), max_bytes: None });
        let (_d, store) = store_with(20, 10);
        // The default alone: at 1,000 s every message is older than 9 ms.
        let at = 1_000_000;
        assert_eq!(
            plan(&store, 0, default, at, &mut HashMap::new()).expect("plan"),
            vec![("c".to_string(), 21, Retention::default())]
        );
        // The conversation's own limit wins where it is set: 5 messages, and no age at all.
        let set = crate::chat::RetentionCommand {
            conversation: "c".into(),
            by: "op".into(),
            admin: true,
            retention: Retention { max_messages: Some(5), max_age_ms: Some(u64::MAX / 2), max_bytes: None },
        };
        crate::raft::state_machine::apply_for_test(&store, 0, vec![Command::SetRetention(set.clone())]).expect("apply");
        assert_eq!(
            plan(&store, 0, default, at, &mut HashMap::new()).expect("plan"),
            vec![("c".to_string(), 16, set.retention)]
        );
    }

    // A trim planned under one policy, applied after a member set another (a higher limit):
    // it deletes nothing, and the next check plans under the new policy.
    #[test]
    fn a_trim_planned_before_a_policy_change_deletes_nothing() {
        let (_d, store) = store_with(20, 10);
        let apply = |c: Command| crate::raft::state_machine::apply_for_test(&store, 0, vec![c]).expect("apply");
        let set = |max_messages| {
            Command::SetRetention(crate::chat::RetentionCommand {
                conversation: "c".into(),
                by: "op".into(),
                admin: true,
                retention: Retention { max_messages: Some(max_messages), ..Retention::default() },
            })
        };
        apply(set(5));
        let trims = plan(&store, 0, Retention::default(), 0, &mut HashMap::new()).expect("plan");
        let five = Retention { max_messages: Some(5), ..Retention::default() };
        assert_eq!(trims, vec![("c".to_string(), 16, five)]);
        let (conversation, before, planned_under) = trims[0].clone();
        let trim = || {
            Command::TrimUnder(TrimUnderCommand {
                trim: TrimCommand { conversation: conversation.clone(), before },
                planned_under,
            })
        };
        // The member raises the limit to 15 before the trim's turn.
        apply(set(15));
        assert_eq!(apply(trim()), vec![Outcome::Trimmed { earliest: 1, deleted: 0 }]);
        assert_eq!(store.earliest(0, "c").expect("earliest"), 1);
        assert_eq!(
            plan(&store, 0, Retention::default(), 0, &mut HashMap::new()).expect("plan"),
            vec![("c".to_string(), 6, Retention { max_messages: Some(15), ..Retention::default() })]
        );
        // Under the policy in force, the same trim applies.
        apply(set(5));
        assert_eq!(apply(trim()), vec![Outcome::Trimmed { earliest: 16, deleted: 15 }]);
        // Both in one apply batch: the change earlier in the batch is seen.
        let (_d2, other) = store_with(20, 10);
        let outcomes =
            crate::raft::state_machine::apply_for_test(&other, 0, vec![set(5), set(15), trim()]).expect("apply");
        assert_eq!(outcomes[2], Outcome::Trimmed { earliest: 1, deleted: 0 });
    }
}
