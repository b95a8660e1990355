//! openraft's state machine for one shard: applies committed commands through the pure
//! `chat::apply`, persists their effects and the applied log id in one RocksDB batch, and
//! publishes what it appended to the shard's live-push channel.
//!
//! Apply writes without fsync: the Raft log entries it applies are already durable, and
//! the applied log id is written in the same batch as the effects, so after a crash the
//! state machine is at some consistent earlier point and openraft re-applies the rest from
//! the log once a leader tells it the commit index (the committed index is not persisted:
//! openraft makes that optional, and it would cost a write per round on every node). Log
//! purge syncs first (see `log_store`).
//!
//! Snapshots are lazy: building one takes a RocksDB snapshot (O(1)) whose meta is the
//! applied state stored inside it; its data is produced only when streamed to a follower.
//! An I/O error here is returned to openraft, which stops the group: the node never
//! continues with state it could not write.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::log_store::{blocking, inline};
use super::types::{Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, C};
use crate::chat::{self, DedupRecord, Effect, Outcome, ShardId, ShardView, StoredMessage};
use crate::error::{Error, Result};
use crate::stages::Stage;
use crate::store::codec::{decode, encode};
use crate::store::keys::{applied_key, cursor_key, dedup_key, head_key, message_key, CF_MESSAGES, CF_STATE};
use crate::store::snapshot::{self, LocalSnapshot, Source};
use crate::store::Store;

/// What the state machine records about its own progress, in the shard's state range.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// Events a shard publishes to its subscribers.
#[derive(Debug, Clone)]
pub enum ShardEvent {
    /// A message was appended (and is readable from storage).
    Appended(Arc<StoredMessage>),
    /// The shard's state was replaced by a snapshot: re-read storage.
    Reset,
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
    events: broadcast::Sender<ShardEvent>,
    applied: AppliedState,
}

fn read_applied(store: &Store, shard: ShardId) -> Result<AppliedState> {
    match store.get(CF_STATE, &applied_key(shard))? {
        Some(v) => Ok(decode(&v)?),
        None => Ok(AppliedState::default()),
    }
}

impl ShardStateMachine {
    /// Opens a shard's state machine; clears a snapshot install that a crash interrupted.
    pub fn open(store: Store, shard: ShardId, events: broadcast::Sender<ShardEvent>) -> Result<Self> {
        if snapshot::clear_interrupted_install(&store, shard)? {
            tracing::warn!(shard, "cleared an interrupted snapshot install; the shard will be re-sent");
        }
        let applied = read_applied(&store, shard)?;
        Ok(ShardStateMachine { shard, store, events, applied })
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

/// Reads the shard's committed state for apply.
struct StoreView<'a> {
    store: &'a Store,
    shard: ShardId,
}

impl ShardView for StoreView<'_> {
    type Error = Error;
    fn head(&mut self, conversation: &str) -> Result<u64> {
        self.store.head(self.shard, conversation)
    }
    fn dedup(&mut self, client_id: u64, client_seq: u64) -> Result<Option<DedupRecord>> {
        if crate::planted::active(crate::planted::Bug::SkipDedup) {
            return Ok(None);
        }
        self.store.dedup(self.shard, client_id, client_seq)
    }
    fn cursor(&mut self, user: &str, conversation: &str) -> Result<u64> {
        self.store.cursor(self.shard, user, conversation)
    }
}

/// Applies a batch of entries in one write; returns an outcome per entry, the new applied
/// state and the appended messages.
fn apply_batch(
    store: &Store,
    shard: ShardId,
    entries: Vec<Entry>,
    mut applied: AppliedState,
) -> Result<(Vec<Outcome>, AppliedState, Vec<StoredMessage>)> {
    let mut base = StoreView { store, shard };
    let mut view = chat::Overlay::new(&mut base);
    let mut batch = WriteBatch::default();
    let mut outcomes = Vec::with_capacity(entries.len());
    let mut appended = Vec::new();
    let mut heads: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for entry in entries {
        let outcome = match &entry.payload {
            EntryPayload::Blank => Outcome::None,
            EntryPayload::Membership(m) => {
                applied.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                Outcome::None
            }
            EntryPayload::Normal(cmd) => {
                let (outcome, effects) = chat::apply(&mut view, cmd)?;
                view.absorb(&effects);
                for effect in effects {
                    match effect {
                        // Only a conversation's last head in the batch is written.
                        Effect::SetHead { conversation, head } => {
                            heads.insert(conversation, head);
                        }
                        other => write_effect(store, shard, &mut batch, other, &mut appended),
                    }
                }
                outcome
            }
        };
        applied.last_applied = Some(entry.log_id);
        outcomes.push(outcome);
    }
    for (conversation, head) in heads {
        write_effect(store, shard, &mut batch, Effect::SetHead { conversation, head }, &mut appended);
    }
    batch.put_cf(store.cf(CF_STATE), applied_key(shard), encode(&applied));
    store.write(batch)?;
    Ok((outcomes, applied, appended))
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
        Effect::PutDedup { client_id, client_seq, record } => {
            batch.put_cf(store.cf(CF_STATE), dedup_key(shard, client_id, client_seq), encode(&record));
        }
        Effect::SetCursor { user, conversation, offset } => {
            batch.put_cf(store.cf(CF_STATE), cursor_key(shard, &user, &conversation), encode(&offset));
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
        let started = std::time::Instant::now();
        let (outcomes, applied, appended) =
            inline(|| apply_batch(&self.store, self.shard, batch, self.applied.clone()))?;
        self.store.stages.record(Stage::ApplyWrite, started.elapsed());
        self.applied = applied;
        for (responder, outcome) in responders.into_iter().zip(outcomes) {
            if let Some(r) = responder {
                r.send(outcome);
            }
        }
        for m in appended {
            // No receivers is fine: nobody is tailing this shard on this replica.
            let _ = self.events.send(ShardEvent::Appended(Arc::new(m)));
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { store: self.store.clone(), shard: self.shard }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, data: ShardSnapshot) -> Result<(), io::Error> {
        let (store, shard) = (self.store.clone(), self.shard);
        let state = AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
        let value = encode(&state);
        let records = blocking(move || {
            let n = match &data {
                ShardSnapshot::Local(local) => snapshot::install(&store, shard, Source::Local(local))?,
                ShardSnapshot::Spooled(path) => {
                    let n = snapshot::install(&store, shard, Source::File(path))?;
                    let _ = std::fs::remove_file(path);
                    n
                }
            };
            // The applied state streamed with the data must be the one the meta names.
            let mut b = WriteBatch::default();
            b.put_cf(store.cf(CF_STATE), applied_key(shard), value);
            store.write_sync(b)?;
            Ok(n)
        })
        .await?;
        tracing::info!(shard, records, last_log_id = ?meta.last_log_id, "installed snapshot");
        self.applied = state;
        let _ = self.events.send(ShardEvent::Reset);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        self.snapshot_now().map_err(|e| io::Error::other(e.to_string()))
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
        match snapshot_of(&self.store, self.shard).map_err(|e| io::Error::other(e.to_string()))? {
            Some(s) => Ok(s),
            None => Ok(Snapshot {
                meta: SnapshotMeta::default(),
                snapshot: ShardSnapshot::Local(LocalSnapshot::take(&self.store.db, self.shard)),
            }),
        }
    }
}
