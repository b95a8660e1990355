//! openraft's state machine for one shard: applies committed commands through the pure
//! `chat::apply`, persists their effects and the applied log id in one RocksDB batch, and
//! publishes what it appended to the shard's live-push channel.
//!
//! Apply writes without fsync: the Raft log entries it applies are committed, durable on a
//! quorum (on this node, once its own fsync of them is done), and the applied log id is
//! written in the same batch as the effects, so after a crash the state machine is at some
//! consistent earlier point and openraft re-applies the rest from the log (or from the
//! leader, for a tail a power failure took) once a leader tells it the commit index (the
//! committed index is not persisted: openraft makes that optional, and it would cost a
//! write per round on every node). Until it has, the replica does not serve reads
//! (`raft::Rebuilt`). Log purge syncs first (see `log_store`).
//!
//! Snapshots are lazy: building one takes a RocksDB snapshot (O(1)) whose meta is the
//! applied state stored inside it; its data is produced only when streamed to a follower.
//! Installing one is crash-safe, and one a crash interrupted is completed when the state
//! machine is opened, before openraft reads its applied state (see `store::snapshot`).
//! An I/O error here is returned to openraft, which stops the group: the node never
//! continues with state it could not write.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use super::log_store::{blocking, inline};
use super::types::{Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, C};
use crate::chat::{
    self, Command, DedupKey, DedupRecord, Effect, Members, Outcome, Rejection, Retention, ShardId, ShardView,
    StoredMessage,
};
use crate::error::{Error, Result};
use crate::placement::{ClusterMap, META_SHARD};
use crate::stages::Stage;
use crate::store::codec::{decode, encode};
use crate::store::keys::{
    applied_key, cursor_key, dedup_key, dedup_scope, earliest_key, head_key, members_key, message_key, messages_below,
    placement_key, retention_key, CF_DEDUP, CF_MESSAGES, CF_STATE,
};
use crate::store::snapshot::{self, LocalSnapshot, Source};
use crate::store::Store;

/// What the state machine records about its own progress, in the shard's state range.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// Where a shard's state machine reports what it applied, on its own task, right after
/// each apply batch is written (live push; see `service::PushHub`). Handing the messages
/// over here, instead of through a channel to another task, saves every applied message a
/// task hop and a wake-up on the way to its subscribers.
pub trait ShardEvents: Send + Sync + 'static {
    /// Messages of one apply batch, in offset order per conversation; all are readable
    /// from storage. Must not block: it runs on the state machine's task.
    fn appended(&self, messages: Vec<StoredMessage>);
    /// The shard's state was replaced by a snapshot: its subscribers must re-read storage.
    fn reset(&self, shard: ShardId);
    /// These conversations' members changed in an apply batch (told before the batch's
    /// messages are handed to [`ShardEvents::appended`]): their subscribers must check they
    /// may still read, and up to which offset.
    fn members_changed(&self, conversations: Vec<String>);
    /// The metadata group applied a change to the cluster map (see `crate::placement`); a
    /// snapshot install is told as [`ShardEvents::reset`]. Must not block.
    fn placement_changed(&self) {}
}

/// For a state machine whose applies nobody watches (tests, tools).
pub struct NoEvents;

impl ShardEvents for NoEvents {
    fn appended(&self, _: Vec<StoredMessage>) {}
    fn reset(&self, _: ShardId) {}
    fn members_changed(&self, _: Vec<String>) {}
}

/// A snapshot's data: a local RocksDB snapshot to stream, or a received spool file.
pub enum ShardSnapshot {
    Local(LocalSnapshot),
    Spooled(PathBuf),
}

/// The state machine of one shard.
pub struct ShardStateMachine {
    pub shard: ShardId,
    store: Store,
    events: Arc<dyn ShardEvents>,
    applied: AppliedState,
    cache: ApplyCache,
    /// Dropped with the state machine: what [`Stopped`] waits for.
    alive: tokio::sync::watch::Sender<()>,
    /// Test hook: each apply counts itself started, then waits this long before it writes.
    #[cfg(test)]
    pub(crate) slow_apply: Option<(std::time::Duration, Arc<std::sync::atomic::AtomicU64>)>,
}

/// Resolves once a group's state machine is gone: dropped by openraft's state-machine
/// worker when the worker ends. `Raft::shutdown` stops the Raft core but not that worker,
/// which goes on with the applies already queued to it; whoever deletes or closes what the
/// state machine writes waits for this first.
#[derive(Clone)]
pub struct Stopped(tokio::sync::watch::Receiver<()>);

impl Stopped {
    /// Waits until the state machine was dropped (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        // Nothing is ever sent: `changed` returns only once the sender is dropped.
        while rx.changed().await.is_ok() {}
    }
}

/// Entries an [`ApplyCache`] map holds before it starts over (each is a few dozen bytes).
const APPLY_CACHE_ENTRIES_MAX: usize = 16_384;

/// What apply knows of the shard's stored state from earlier batches, so that most sends
/// read nothing from RocksDB: a send's dedup lookup is nearly always a miss, and a miss
/// costs a walk of every memtable and a bloom probe of every file.
///
/// - `dedup_max`: per dedup scope (conversation, sender, client; its key prefix), the
///   highest `client_seq` with a dedup record (`None`: there is none). A send whose seq is
///   above it cannot be a retry, and needs no lookup; any other still reads its record. A
///   scope seen for the first time costs one seek (its first key in the `dedup` family).
/// - `heads`: conversations' heads as stored.
/// - `members`: conversations' member records as stored (`None`: no such conversation).
///
/// Invariant: every entry equals what storage holds. Apply is the only writer of these
/// keys and updates the cache only after its batch is written; a snapshot install clears
/// it. A full map is cleared rather than evicted from: a missing entry is only a read.
#[derive(Default)]
struct ApplyCache {
    dedup_max: HashMap<Vec<u8>, Option<u64>>,
    heads: HashMap<String, u64>,
    members: HashMap<String, Option<Members>>,
}

impl ApplyCache {
    fn clear(&mut self) {
        self.dedup_max.clear();
        self.heads.clear();
        self.members.clear();
    }

    /// Records a batch's dedup records, heads and member records once they are written.
    fn written(
        &mut self,
        shard: ShardId,
        dedup: &[DedupKey],
        heads: HashMap<String, u64>,
        members: HashMap<String, Members>,
    ) {
        for key in dedup {
            // A scope not in the map is read from storage when next seen, which already
            // holds this record.
            let scope = dedup_scope(shard, &key.conversation, &key.sender, key.client_id);
            if let Some(max) = self.dedup_max.get_mut(&scope) {
                *max = Some(max.map_or(key.client_seq, |m| m.max(key.client_seq)));
            }
        }
        for (conversation, head) in heads {
            bounded_insert(&mut self.heads, conversation, head);
        }
        for (conversation, m) in members {
            bounded_insert(&mut self.members, conversation, Some(m));
        }
    }
}

fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, key: K, value: V) {
    if map.len() >= APPLY_CACHE_ENTRIES_MAX {
        map.clear();
    }
    map.insert(key, value);
}

/// The cluster map as this node's replica of the metadata group applied it (empty before
/// the group's first leader initialized it).
pub fn cluster_map(store: &Store) -> Result<ClusterMap> {
    match store.get(CF_STATE, &placement_key(META_SHARD))? {
        Some(v) => Ok(decode(&v)?),
        None => Ok(ClusterMap::default()),
    }
}

fn read_applied(store: &Store, shard: ShardId) -> Result<AppliedState> {
    match store.get(CF_STATE, &applied_key(shard))? {
        Some(v) => Ok(decode(&v)?),
        None => Ok(AppliedState::default()),
    }
}

/// The last applied log id of `shard` that a crash cannot take back (see
/// [`Store::durable_state`]): a log may be purged up to it.
pub fn durable_applied(store: &Store, shard: ShardId) -> Result<Option<LogId>> {
    match store.durable_state(&applied_key(shard))? {
        Some(v) => Ok(decode::<AppliedState>(&v)?.last_applied),
        None => Ok(None),
    }
}

impl ShardStateMachine {
    /// Opens a shard's state machine; completes a snapshot install that a crash interrupted,
    /// so that openraft, which reads the applied state next, finds the snapshot's (see
    /// `store::snapshot`). An install that cannot be completed is an error: the shard's
    /// state is gone and its log purged, and no state this replica could report would be
    /// consistent with that log.
    pub fn open(store: Store, shard: ShardId, events: Arc<dyn ShardEvents>) -> Result<Self> {
        if let Some(records) = snapshot::resume_interrupted_install(&store, shard)? {
            tracing::warn!(shard, records, "completed a snapshot install that a crash had interrupted");
        }
        let applied = read_applied(&store, shard)?;
        // The log is purged only up to the durable applied state, so state behind the purge
        // point lost writes that nothing can rebuild (a damaged or missing table file).
        let purged = super::log_store::purge_point(&store, shard)?;
        if purged > applied.last_applied {
            return Err(Error::Corrupt(format!(
                "shard {shard}: its state came back at {:?}, behind its log's purge point {purged:?}: the \
                 entries that would rebuild it are gone, and this replica of the shard must be rebuilt",
                applied.last_applied
            )));
        }
        Ok(ShardStateMachine {
            shard,
            store,
            events,
            applied,
            cache: ApplyCache::default(),
            alive: tokio::sync::watch::channel(()).0,
            #[cfg(test)]
            slow_apply: None,
        })
    }

    /// What resolves once this state machine is dropped.
    pub fn stopped(&self) -> Stopped {
        Stopped(self.alive.subscribe())
    }

    fn snapshot_now(&self) -> Result<Option<Snapshot>> {
        snapshot_of(&self.store, self.shard)
    }
}

/// Takes a lazy snapshot: `None` if nothing was ever applied.
fn snapshot_of(store: &Store, shard: ShardId) -> Result<Option<Snapshot>> {
    let local = LocalSnapshot::take(&store.db, shard);
    let state: AppliedState = match local.get_state(&applied_key(shard))? {
        Some(v) => decode(&v)?,
        None => return Ok(None),
    };
    if state.last_applied.is_none() {
        return Ok(None);
    }
    let meta = SnapshotMeta { last_log_id: state.last_applied, last_membership: state.membership };
    Ok(Some(Snapshot { meta, snapshot: ShardSnapshot::Local(local) }))
}

/// Reads the shard's committed state for apply, through the [`ApplyCache`].
struct StoreView<'a> {
    store: &'a Store,
    shard: ShardId,
    cache: &'a mut ApplyCache,
}

impl StoreView<'_> {
    /// A conversation's member record through the cache, read from storage on a miss.
    fn cached_members(&mut self, conversation: &str) -> Result<&Option<Members>> {
        if !self.cache.members.contains_key(conversation) {
            let m = self.store.members(self.shard, conversation)?;
            bounded_insert(&mut self.cache.members, conversation.to_string(), m);
        }
        Ok(&self.cache.members[conversation])
    }
}

impl ShardView for StoreView<'_> {
    type Error = Error;
    fn head(&mut self, conversation: &str) -> Result<u64> {
        if let Some(head) = self.cache.heads.get(conversation) {
            return Ok(*head);
        }
        let head = self.store.head(self.shard, conversation)?;
        bounded_insert(&mut self.cache.heads, conversation.to_string(), head);
        Ok(head)
    }
    fn dedup(&mut self, key: &DedupKey) -> Result<Option<DedupRecord>> {
        if crate::planted::active(crate::planted::Bug::SkipDedup) {
            return Ok(None);
        }
        let scope = dedup_scope(self.shard, &key.conversation, &key.sender, key.client_id);
        let max = match self.cache.dedup_max.get(&scope) {
            Some(max) => *max,
            None => {
                let max = self.store.dedup_max_seq(&scope)?;
                bounded_insert(&mut self.cache.dedup_max, scope, max);
                max
            }
        };
        match max {
            Some(max) if key.client_seq <= max => self.store.dedup(self.shard, key),
            _ => Ok(None),
        }
    }
    fn members(&mut self, conversation: &str) -> Result<Option<Members>> {
        Ok(self.cached_members(conversation)?.clone())
    }
    fn is_member(&mut self, conversation: &str, user: &str) -> Result<Option<bool>> {
        Ok(self.cached_members(conversation)?.as_ref().map(|m| m.contains(user)))
    }
    fn cursor(&mut self, user: &str, conversation: &str) -> Result<u64> {
        self.store.cursor(self.shard, user, conversation)
    }
    fn earliest(&mut self, conversation: &str) -> Result<u64> {
        self.store.earliest(self.shard, conversation)
    }
    fn keys_between(&mut self, conversation: &str, from: u64, before: u64) -> Result<Vec<DedupKey>> {
        self.store.keys_between(self.shard, conversation, from, before)
    }
    fn retention(&mut self, conversation: &str) -> Result<Option<Retention>> {
        self.store.retention(self.shard, conversation)
    }
}

/// What one apply batch changed: an outcome per entry, the new applied state, the appended
/// messages, the conversations whose members changed, and whether the cluster map changed.
type Applied = (Vec<Outcome>, AppliedState, Vec<StoredMessage>, Vec<String>, bool);

/// Applies a batch of entries in one write.
fn apply_batch(
    store: &Store,
    shard: ShardId,
    cache: &mut ApplyCache,
    entries: Vec<Entry>,
    mut applied: AppliedState,
) -> Result<Applied> {
    let mut base = StoreView { store, shard, cache };
    let mut view = chat::Overlay::new(&mut base);
    let mut batch = WriteBatch::default();
    let mut outcomes = Vec::with_capacity(entries.len());
    let mut appended = Vec::new();
    // The metadata group's map, read at its batch's first placement command.
    let mut map: Option<ClusterMap> = None;
    let mut placed = false;
    for entry in entries {
        let outcome = match &entry.payload {
            EntryPayload::Blank => Outcome::None,
            EntryPayload::Normal(Command::Place(command)) if shard == META_SHARD => {
                let map = match &mut map {
                    Some(m) => m,
                    None => map.insert(cluster_map(store)?),
                };
                match map.apply(command) {
                    Ok(changed) => {
                        placed |= changed;
                        Outcome::Placed { epoch: map.epoch, changed }
                    }
                    Err(reason) => Outcome::Rejected { reason: Rejection::Placement(reason) },
                }
            }
            EntryPayload::Membership(m) => {
                applied.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                Outcome::None
            }
            EntryPayload::Normal(cmd) => {
                let (outcome, effects) = chat::apply(&mut view, cmd)?;
                view.absorb(&effects);
                for effect in effects {
                    // Only a conversation's last head in the batch is written (below).
                    if !matches!(effect, Effect::SetHead { .. }) {
                        write_effect(store, shard, &mut batch, effect, &mut appended);
                    }
                }
                outcome
            }
        };
        applied.last_applied = Some(entry.log_id);
        outcomes.push(outcome);
    }
    let (heads, dedup, members) = view.into_written();
    for (conversation, head) in &heads {
        batch.put_cf(store.cf(CF_STATE), head_key(shard, conversation), encode(head));
    }
    if let (true, Some(map)) = (placed, &map) {
        batch.put_cf(store.cf(CF_STATE), placement_key(shard), encode(map));
    }
    batch.put_cf(store.cf(CF_STATE), applied_key(shard), encode(&applied));
    if shard == META_SHARD {
        // The cluster map is read at a node's start, before its group applies anything: it
        // must not come back older than what this node already acted on.
        store.write(batch)?;
    } else {
        store.write_unlogged(batch)?;
    }
    let changed: Vec<String> = members.keys().cloned().collect();
    base.cache.written(shard, &dedup, heads, members);
    Ok((outcomes, applied, appended, changed, placed))
}

fn write_effect(
    store: &Store,
    shard: ShardId,
    batch: &mut WriteBatch,
    effect: Effect,
    appended: &mut Vec<StoredMessage>,
) {
    match effect {
        Effect::PutMessage(m) => {
            batch.put_cf(store.cf(CF_MESSAGES), message_key(shard, &m.conversation, m.offset), encode(&m));
            appended.push(m);
        }
        Effect::SetHead { conversation, head } => {
            batch.put_cf(store.cf(CF_STATE), head_key(shard, &conversation), encode(&head));
        }
        Effect::PutDedup { key, record } => {
            batch.put_cf(store.cf(CF_DEDUP), dedup_key(shard, &key), encode(&record));
        }
        Effect::SetCursor { user, conversation, offset } => {
            batch.put_cf(store.cf(CF_STATE), cursor_key(shard, &user, &conversation), encode(&offset));
        }
        Effect::SetMembers { conversation, members } => {
            batch.put_cf(store.cf(CF_STATE), members_key(shard, &conversation), encode(&members));
        }
        Effect::SetRetention { conversation, retention } => {
            batch.put_cf(store.cf(CF_STATE), retention_key(shard, &conversation), encode(&retention));
        }
        Effect::Trim { conversation, from, before, dedup } => {
            // Everything below `before`, whatever is there: one range deletion, whose space
            // compaction gives back (see `store::Store::reclaim`).
            let (lo, hi) = messages_below(shard, &conversation, before);
            batch.delete_range_cf(store.cf(CF_MESSAGES), &lo, &hi);
            for key in &dedup {
                batch.delete_cf(store.cf(CF_DEDUP), dedup_key(shard, key));
            }
            batch.put_cf(store.cf(CF_STATE), earliest_key(shard, &conversation), encode(&before));
            store.reclaim.trimmed(shard, &conversation, before - from, before);
        }
    }
}

impl RaftStateMachine<C> for ShardStateMachine {
    type SnapshotData = ShardSnapshot;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        if batch.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if let Some((delay, started)) = &self.slow_apply {
            started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(*delay).await;
        }
        let started = std::time::Instant::now();
        let (outcomes, applied, appended, members_changed, placed) =
            inline(|| apply_batch(&self.store, self.shard, &mut self.cache, batch, self.applied.clone()))?;
        self.store.stages.record(Stage::ApplyWrite, started.elapsed());
        self.applied = applied;
        for (responder, outcome) in responders.into_iter().zip(outcomes) {
            if let Some(r) = responder {
                r.send(outcome);
            }
        }
        // Members first: a subscriber checks the stored members (the whole batch is
        // written) before it sees the batch's messages, so a removal stops it at the
        // removal's offset, never after a message sent once the reader was removed.
        if !members_changed.is_empty() {
            self.events.members_changed(members_changed);
        }
        if !appended.is_empty() {
            self.events.appended(appended);
        }
        if placed {
            self.events.placement_changed();
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { store: self.store.clone(), shard: self.shard }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, data: ShardSnapshot) -> Result<(), io::Error> {
        // The shard's state is replaced from here on, whether the install completes or not.
        self.cache.clear();
        let (store, shard) = (self.store.clone(), self.shard);
        let state = AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
        // The applied state is the meta's, written by the install as its last step, whatever
        // the streamed records hold.
        let value = encode(&state);
        let records = blocking(move || match &data {
            ShardSnapshot::Local(local) => snapshot::install(&store, shard, Source::Local(local), &value),
            ShardSnapshot::Spooled(path) => snapshot::install(&store, shard, Source::File(path), &value),
        })
        .await?;
        tracing::info!(shard, records, last_log_id = ?meta.last_log_id, "installed snapshot");
        self.applied = state;
        self.events.reset(self.shard);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        self.snapshot_now().map_err(io::Error::other)
    }
}

/// Builds lazy snapshots concurrently with apply (a RocksDB snapshot is a consistent view).
pub struct SnapshotBuilder {
    store: Store,
    shard: ShardId,
}

impl RaftSnapshotBuilder<C> for SnapshotBuilder {
    type SnapshotData = ShardSnapshot;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        match snapshot_of(&self.store, self.shard).map_err(io::Error::other)? {
            Some(s) => Ok(s),
            None => Ok(Snapshot {
                meta: SnapshotMeta::default(),
                snapshot: ShardSnapshot::Local(LocalSnapshot::take(&self.store.db, self.shard)),
            }),
        }
    }
}

/// Applies `commands` to `shard` as one batch of entries after the last applied one, as a
/// replica would (for tests of what apply stores).
#[cfg(test)]
pub(crate) fn apply_for_test(store: &Store, shard: ShardId, commands: Vec<chat::Command>) -> Result<Vec<Outcome>> {
    use openraft::entry::RaftEntry;
    let applied = read_applied(store, shard)?;
    let start = applied.last_applied.map_or(0, |l| l.index);
    let entries = (start + 1..)
        .zip(commands)
        .map(|(index, c)| Entry::new_normal(openraft::testing::log_id::<C>(1, 1, index), c))
        .collect();
    Ok(apply_batch(store, shard, &mut ApplyCache::default(), entries, applied)?.0)
}

#[cfg(test)]
#[path = "snapshot_install_tests.rs"]
mod snapshot_install_tests;

#[cfg(test)]
#[path = "shutdown_tests.rs"]
mod shutdown_tests;

#[cfg(test)]
#[path = "joint_tests.rs"]
mod joint_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Command, MemView, Rejection, SendCommand};
    use openraft::entry::RaftEntry;
    use proptest::prelude::*;

    fn send(conversation: &str, client_id: u64, client_seq: u64) -> SendCommand {
        SendCommand {
            conversation: conversation.into(),
            sender: "u".into(),
            client_id,
            client_seq,
            ts_ms: client_seq,
            text: format!("{client_id}/{client_seq}"),
        }
    }

    /// Applies `commands` as one batch of entries from `next_index` on.
    fn apply(store: &Store, cache: &mut ApplyCache, next_index: &mut u64, commands: Vec<Command>) -> Vec<Outcome> {
        let entries = commands
            .into_iter()
            .map(|c| {
                *next_index += 1;
                Entry::new_normal(openraft::testing::log_id::<C>(1, 1, *next_index), c)
            })
            .collect();
        let applied = read_applied(store, 0).expect("applied state");
        apply_batch(store, 0, cache, entries, applied).expect("apply").0
    }

    fn appended(offset: u64, ts_ms: u64, duplicate: bool) -> Outcome {
        Outcome::Appended { offset, ts_ms, duplicate }
    }

    // Apply batches bypass the WAL: a crash takes the state back to the last flush, every
    // family to the same point, and applying the lost entries again rebuilds exactly what
    // was there, offsets and dedup records included.
    #[test]
    fn a_crash_takes_the_state_back_to_the_last_flush_whole_and_the_log_rebuilds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let sends = |seqs: std::ops::RangeInclusive<u64>| -> Vec<Command> {
            seqs.map(|seq| Command::Send(send(if seq % 2 == 0 { "even" } else { "odd" }, 7, seq))).collect()
        };
        let first = apply_for_test(&store, 1, sends(1..=10)).expect("apply");
        assert_eq!(durable_applied(&store, 1).expect("durable"), None, "nothing is durable before a flush");
        store.flush_all().expect("flush");
        let flushed = store.dump_state(1);
        let second = apply_for_test(&store, 1, sends(11..=20)).expect("apply");
        let retry = apply_for_test(&store, 1, sends(3..=3)).expect("apply");
        assert_eq!(retry, vec![appended(2, 3, true)]);
        assert_eq!(durable_applied(&store, 1).expect("durable").map(|l| l.index), Some(10));
        assert_eq!(store.head(1, "even").expect("head"), 10);
        let live = store.dump_state(1);

        let image = tempfile::tempdir().expect("tempdir");
        store.crash_image(image.path());
        let (crashed, _) = Store::open(image.path()).expect("open the crash image");
        assert_eq!(crashed.dump_state(1), flushed, "the state is exactly the flushed one");
        assert_eq!(read_applied(&crashed, 1).expect("applied").last_applied.map(|l| l.index), Some(10));
        assert_eq!((crashed.head(1, "even").expect("head"), crashed.head(1, "odd").expect("head")), (5, 5));
        let lost = DedupKey::of(&send("odd", 7, 11));
        assert_eq!(crashed.dedup(1, &lost).expect("dedup"), None, "no dedup record outlives its message");
        assert_eq!(first.len(), 10);

        assert_eq!(apply_for_test(&crashed, 1, sends(11..=20)).expect("apply again"), second);
        assert_eq!(apply_for_test(&crashed, 1, sends(3..=3)).expect("apply again"), retry);
        assert_eq!(crashed.dump_state(1), live, "applying the log again rebuilds the same state");
    }

    #[test]
    fn retries_are_found_with_a_warm_and_a_cold_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let (mut warm, mut index) = (ApplyCache::default(), 0);
        let sends = (1..=3).map(|seq| Command::Send(send("c", 7, seq))).collect();
        let first = apply(&store, &mut warm, &mut index, sends);
        assert_eq!(first, vec![appended(1, 1, false), appended(2, 2, false), appended(3, 3, false)]);
        let scope = |conversation: &str, client_id: u64| dedup_scope(0, conversation, "u", client_id);
        assert_eq!(warm.dedup_max.get(&scope("c", 7)), Some(&Some(3)));
        assert_eq!(warm.heads.get("c"), Some(&3));

        // A retry below the client's highest seq is read from storage.
        let retry = apply(&store, &mut warm, &mut index, vec![Command::Send(send("c", 7, 2))]);
        assert_eq!(retry, vec![appended(2, 2, true)]);

        // A restarted state machine starts cold and still finds the highest seq's record.
        // The same key in another conversation is another message there; the same key with
        // another text is refused.
        let mut cold = ApplyCache::default();
        let mut other_text = send("c", 7, 2);
        other_text.text = "something else".into();
        let after_restart = apply(
            &store,
            &mut cold,
            &mut index,
            vec![
                Command::Send(send("c", 7, 3)),
                Command::Send(send("c", 7, 4)),
                Command::Send(send("d", 7, 1)),
                Command::Send(other_text),
            ],
        );
        let reused = Outcome::Rejected { reason: Rejection::SeqReused { conversation: "c".into() } };
        assert_eq!(after_restart, vec![appended(3, 3, true), appended(4, 4, false), appended(1, 1, false), reused]);

        // A seq below the highest that was never used (pipelined sends arrive out of
        // order) is new.
        let late = apply(&store, &mut cold, &mut index, vec![Command::Send(send("c", 7, 9))]);
        let gap = apply(&store, &mut cold, &mut index, vec![Command::Send(send("c", 7, 6))]);
        assert_eq!((late, gap), (vec![appended(5, 9, false)], vec![appended(6, 6, false)]));
        assert_eq!(store.dedup_max_seq(&scope("c", 7)).expect("seek"), Some(9));
        assert_eq!(store.dedup_max_seq(&scope("c", 8)).expect("seek"), None);
        assert_eq!(store.dedup_max_seq(&scope("d", 7)).expect("seek"), Some(1));
        assert_eq!(store.dedup_max_seq(&dedup_scope(1, "c", "u", 7)).expect("seek"), None);
    }

    // A replica whose state came from a snapshot answers the retry of a send applied before
    // the snapshot as the duplicate it is, with its original offset; neither its own state
    // nor its apply cache from before the install (a send it alone applied, as a deposed
    // leader's replica may have) survives to answer for the shard.
    #[tokio::test]
    async fn a_retry_after_a_snapshot_install_is_answered_from_the_installed_state() {
        let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        let ((src, _), (dst, _)) = (Store::open(a.path()).expect("open"), Store::open(b.path()).expect("open"));
        let (mut src_cache, mut src_index) = (ApplyCache::default(), 0);
        let sends = (1..=5).map(|seq| Command::Send(send("c", 7, seq))).collect();
        assert_eq!(apply(&src, &mut src_cache, &mut src_index, sends).len(), 5);

        let mut sm = ShardStateMachine::open(dst.clone(), 0, Arc::new(NoEvents)).expect("open state machine");
        let mut stale_index = 0;
        let stale = apply(&dst, &mut sm.cache, &mut stale_index, vec![Command::Send(send("c", 7, 9))]);
        assert_eq!(stale, vec![appended(1, 9, false)]);
        assert_eq!(sm.cache.dedup_max.get(&dedup_scope(0, "c", "u", 7)), Some(&Some(9)));

        let snap = snapshot_of(&src, 0).expect("snapshot").expect("something applied");
        sm.install_snapshot(&snap.meta, snap.snapshot).await.expect("install");
        let mut index = src_index;
        let retries =
            vec![Command::Send(send("c", 7, 3)), Command::Send(send("c", 7, 6)), Command::Send(send("c", 7, 9))];
        let answers = apply(&dst, &mut sm.cache, &mut index, retries);
        assert_eq!(answers, vec![appended(3, 3, true), appended(6, 6, false), appended(7, 9, false)]);
    }

    #[test]
    fn only_the_metadata_group_applies_placement_and_its_snapshot_carries_the_map() {
        use crate::placement::{NodeEntry, NodeState, PlacementCommand};
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let entry =
            |id| NodeEntry { id, peer_addr: String::new(), client_addr: String::new(), state: NodeState::Active };
        let init = Command::Place(PlacementCommand::Init { nodes: vec![entry(1), entry(2), entry(3)], shards: 4 });
        let prefer = Command::Place(PlacementCommand::SetPreferredLeader { shard: 2, node: 1 });

        let on_a_shard = apply_for_test(&store, 0, vec![init.clone()]).expect("apply");
        assert!(matches!(&on_a_shard[..], [Outcome::Rejected { reason: Rejection::Placement(_) }]), "{on_a_shard:?}");
        assert!(!cluster_map(&store).expect("read").is_set(), "a shard's group changes no map");

        // One batch: the second command sees the first's map.
        let outcomes = apply_for_test(&store, META_SHARD, vec![init.clone(), prefer, init]).expect("apply");
        assert_eq!(
            outcomes,
            vec![
                Outcome::Placed { epoch: 1, changed: true },
                Outcome::Placed { epoch: 2, changed: true },
                Outcome::Placed { epoch: 2, changed: false },
            ]
        );
        let map = cluster_map(&store).expect("read");
        assert_eq!((map.epoch, map.shard(2).map(|p| p.preferred_leader)), (2, Some(1)));
        let refused = apply_for_test(
            &store,
            META_SHARD,
            vec![Command::Place(PlacementCommand::SetPreferredLeader { shard: 9, node: 1 })],
        )
        .expect("apply");
        assert!(matches!(&refused[..], [Outcome::Rejected { reason: Rejection::Placement(_) }]), "{refused:?}");
        assert_eq!(cluster_map(&store).expect("read"), map, "a refused command changes nothing");

        // The map is in the group's state range: a snapshot of the group holds it.
        let snap = LocalSnapshot::take(&store.db, META_SHARD);
        let stored: ClusterMap = decode(&snap.get_state(&placement_key(META_SHARD)).unwrap().unwrap()).unwrap();
        assert_eq!(stored, map);
    }

    #[test]
    fn a_full_cache_map_starts_over() {
        let mut map = HashMap::new();
        for i in 0..APPLY_CACHE_ENTRIES_MAX as u64 {
            bounded_insert(&mut map, i, i);
        }
        assert_eq!(map.len(), APPLY_CACHE_ENTRIES_MAX);
        bounded_insert(&mut map, u64::MAX, 0);
        assert_eq!(map.len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        // Whatever the batching, and whenever the cache is lost, apply through the cache
        // answers exactly as the in-memory model with no cache at all — trims included, which
        // may delete messages appended earlier in the same batch and whose deleted dedup
        // records make a later retry of those keys a new message. What is stored at the end
        // is the model's: the same messages, and a dedup record for exactly those.
        #[test]
        fn cached_apply_matches_the_model(
            batches in prop::collection::vec(
                (prop::collection::vec((0u64..3, 0u64..12, 0usize..3, 0u8..8), 1..12), any::<bool>()),
                1..10,
            ),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let (store, _) = Store::open(dir.path()).expect("open");
            let (mut cache, mut index, mut model) = (ApplyCache::default(), 0, MemView::default());
            let convs = ["a", "b", "c"];
            for (commands, lose_cache) in batches {
                if lose_cache {
                    cache.clear();
                }
                let commands: Vec<Command> = commands
                    .into_iter()
                    .map(|(client, seq, conv, kind)| match kind {
                        // One command in eight trims, up to somewhere around the head.
                        0 => Command::Trim(crate::chat::TrimCommand { conversation: convs[conv].into(), before: seq }),
                        // One in eight sets a policy, one in eight trims under one (sometimes the
                        // policy in force, read from storage or from earlier in the batch).
                        1 => Command::SetRetention(crate::chat::RetentionCommand {
                            conversation: convs[conv].into(),
                            by: "op".into(),
                            admin: true,
                            retention: crate::chat::Retention { max_messages: Some(client + 1), ..Default::default() },
                        }),
                        2 => Command::TrimUnder(crate::chat::TrimUnderCommand {
                            trim: crate::chat::TrimCommand { conversation: convs[conv].into(), before: seq },
                            planned_under: crate::chat::Retention {
                                max_messages: (client > 0).then_some(client),
                                ..Default::default()
                            },
                        }),
                        _ => Command::Send(send(convs[conv], client, seq)),
                    })
                    .collect();
                let want: Vec<Outcome> = commands.iter().map(|c| model.apply(c)).collect();
                prop_assert_eq!(apply(&store, &mut cache, &mut index, commands), want);
            }
            for conv in convs {
                let mut stored = Vec::new();
                let from = store.earliest(0, conv).expect("earliest");
                prop_assert_eq!(from, model.earliest.get(conv).copied().unwrap_or(1));
                store.each_message(0, conv, 0, u64::MAX, |m| { stored.push(m); true }).expect("read");
                let kept: Vec<_> = model.messages.iter().filter(|m| m.conversation == conv).cloned().collect();
                prop_assert_eq!(&stored, &kept);
                for m in &stored {
                    let key = DedupKey::of_stored(m);
                    prop_assert!(store.dedup(0, &key).expect("dedup").is_some(), "{:?} lost its record", key);
                }
            }
            for key in model.dedup.keys() {
                prop_assert!(store.dedup(0, key).expect("dedup").is_some());
            }
            let (lo, hi) = crate::store::keys::shard_range(0);
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_iterate_upper_bound(hi);
            ro.set_total_order_seek(true);
            let records = store
                .db
                .iterator_cf_opt(store.cf(CF_DEDUP), ro, rocksdb::IteratorMode::From(&lo, rocksdb::Direction::Forward))
                .count();
            prop_assert_eq!(records, model.dedup.len(), "a trimmed message's dedup record was left behind");
        }
    }
}
