//! A running node: its store, its shard groups, its endpoints, and the client operations
//! (send, subscribe, cursors, status) expressed over them.
//!
//! - **send**: validate → this node must lead the shard (else `NotLeader{hint}`) → bounded
//!   in-flight check (else `Throttled`) → the leader stamps the time → Raft commit on a
//!   quorum, fsynced → apply assigns the offset → `Ack`, written to the client's stream by
//!   the state machine's task itself, so the answers of one apply batch leave the node
//!   together. A timeout is answered `Ambiguous`, never as a failure: the client retries
//!   with the same idempotency key.
//! - **subscribe**: served by any replica. It attaches to its conversation's live-push
//!   channel *first*, then reads storage from `from`; at the head it pushes live events.
//!   An event at the next expected offset is delivered, older ones are skipped, and a gap,
//!   a lag overflow or a snapshot reset sends it back to storage — so the seam never skips
//!   or repeats and a slow subscriber costs storage reads, not memory.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::async_runtime::WatchReceiver;
use openraft::error::ClientWriteError;
use openraft::raft::ClientWriteResult;
use tokio::sync::{broadcast, Semaphore};

use crate::chat::{self, Command, CursorCommand, Outcome, SendCommand, ShardId, StoredMessage};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::net::frame;
use crate::net::peer::{self, Groups, PeerNet};
use crate::net::tls::{self, Link};
use crate::net::wire::{ErrorCode, NodeStatus, Request, Response, SendRequest, ShardStatus, SEND_BATCH_MAX};
use crate::raft::state_machine::ShardEvents;
use crate::raft::types::{FnResponder, NodeId, C};
use crate::raft::{self as consensus, Group};
use crate::stages::Stage;
use crate::store::Store;

/// How long a proposal may take before the answer is "outcome unknown".
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages read from storage per catch-up batch.
pub const CATCH_UP_BATCH: usize = 512;
/// Suggested back-off when throttled.
pub const THROTTLE_RETRY_MS: u64 = 50;
/// How often a node hands leaderships it holds back to their preferred nodes.
pub const LEADER_BALANCE_INTERVAL: Duration = Duration::from_secs(5);

/// Hands each shard this node leads to its preferred leader once that node has the whole
/// log (like Kafka's preferred-leader election): after bootstrap or a failover, leadership
/// — and with it the proposal and fsync load — spreads back over the nodes.
async fn balance_leaders(node: std::sync::Weak<Node>) {
    loop {
        tokio::time::sleep(LEADER_BALANCE_INTERVAL).await;
        let Some(node) = node.upgrade() else { return };
        for group in node.groups.values() {
            let preferred = node.preferred_leader(group.shard);
            if preferred == node.id {
                continue;
            }
            let metrics = {
                let rx = group.raft.metrics();
                let snapshot = rx.borrow_watched().clone();
                snapshot
            };
            let caught_up = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&preferred).cloned().flatten())
                .is_some_and(|matched| Some(matched.index) == metrics.last_log_index);
            if metrics.current_leader == Some(node.id) && caught_up {
                tracing::info!(shard = group.shard, to = preferred, "transferring leadership to the preferred node");
                let _ = group.raft.trigger().transfer_leader(preferred).await;
            }
        }
    }
}

/// One live-pushed message, framed once for all of its conversation's subscribers.
#[derive(Debug)]
enum Push {
    Message {
        offset: u64,
        frame: bytes::Bytes,
    },
    /// The shard's state was replaced by a snapshot: subscribers re-read storage.
    Resync,
}

/// Live push routed by conversation: each shard's state machine hands its applied
/// messages to the hub on its own task ([`ShardEvents`]), and the hub forwards each message,
/// encoded once, only to the channel of its conversation — so a message wakes its own
/// subscribers, not every subscriber of every conversation of the shard (10,000 attached
/// idle clients would otherwise each wake for every message of their shard).
struct PushHub {
    /// The cluster's shard count, to tell which conversations a shard's reset concerns.
    shards: u32,
    /// Slots of a conversation's channel (`limits.push_buffer_messages`, validated 16..=65,536).
    capacity: usize,
    channels: std::sync::Mutex<HashMap<String, broadcast::Sender<Arc<Push>>>>,
}

impl PushHub {
    fn new(shards: u32, capacity: usize) -> Self {
        PushHub { shards, capacity, channels: std::sync::Mutex::default() }
    }

    fn attach(&self, conversation: &str) -> broadcast::Receiver<Arc<Push>> {
        let mut channels = self.channels.lock().expect("push hub lock");
        match channels.get(conversation) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.capacity);
                channels.insert(conversation.to_string(), tx);
                rx
            }
        }
    }

    /// Called by a subscriber that has dropped its receiver.
    fn detach(&self, conversation: &str) {
        let mut channels = self.channels.lock().expect("push hub lock");
        if channels.get(conversation).is_some_and(|tx| tx.receiver_count() == 0) {
            channels.remove(conversation);
        }
    }
}

impl ShardEvents for PushHub {
    fn appended(&self, messages: Vec<StoredMessage>) {
        // Only the lookups hold the hub's lock: framing and waking a loud conversation's
        // subscribers must not hold up attaches and detaches of the node's others.
        let watched: Vec<(broadcast::Sender<Arc<Push>>, StoredMessage)> = {
            let channels = self.channels.lock().expect("push hub lock");
            if channels.is_empty() {
                return;
            }
            // No channel: nobody tails that conversation on this replica.
            messages.into_iter().filter_map(|m| Some((channels.get(&m.conversation)?.clone(), m))).collect()
        };
        for (tx, m) in watched {
            let offset = m.offset;
            let frame = bytes::Bytes::from(frame::encode(&Response::Message(m)));
            let _ = tx.send(Arc::new(Push::Message { offset, frame }));
        }
    }

    fn reset(&self, shard: ShardId) {
        let channels = self.channels.lock().expect("push hub lock");
        for (conversation, tx) in channels.iter() {
            if chat::shard_of(conversation, self.shards) == shard {
                let _ = tx.send(Arc::new(Push::Resync));
            }
        }
    }
}

/// A batch of stored messages, framed for the wire.
struct StoredFrames {
    frames: Vec<u8>,
    /// Messages in `frames`.
    count: usize,
    /// The offset after the last one.
    next: u64,
}

/// A batch of stored messages being read and framed on a blocking thread.
struct StoredRead(tokio::task::JoinHandle<Result<StoredFrames>>);

impl StoredRead {
    async fn finish(&mut self) -> Result<StoredFrames> {
        (&mut self.0).await.map_err(|e| Error::Storage(e.to_string()))?
    }
}

/// Detaches a subscriber from the hub when its subscription ends, however it ends.
struct Attached<'a> {
    hub: &'a PushHub,
    conversation: &'a str,
    rx: Option<broadcast::Receiver<Arc<Push>>>,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.hub.detach(self.conversation);
    }
}

/// A running node.
pub struct Node {
    pub id: NodeId,
    pub config: Config,
    pub store: Store,
    groups: HashMap<ShardId, Group>,
    push: Arc<PushHub>,
    inflight: Arc<Semaphore>,
    peer_stats: Arc<peer::PeerStats>,
    counters: Arc<CommitCounters>,
    pub client_endpoint: quinn::Endpoint,
    pub peer_endpoint: quinn::Endpoint,
}

/// Sends committed through this node as leader, and the entries that carried them.
#[derive(Debug, Default)]
struct CommitCounters {
    sends: AtomicU64,
    entries: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

/// A batch's valid sends by shard, with their slots in the batch.
type ByShard = BTreeMap<ShardId, (Vec<usize>, Vec<SendCommand>)>;
/// The answers of a batch's invalid sends by slot, and its valid sends by shard.
type PreparedBatch = (Vec<Option<Response>>, ByShard);

/// The answer to a send whose outcome did not come within [`SEND_TIMEOUT`].
pub fn no_commit_in_time() -> Response {
    error(ErrorCode::Ambiguous, format!("no commit within {SEND_TIMEOUT:?}; outcome unknown"))
}

/// The answer to a send whose proposal was dropped without an outcome (its group stopped).
pub fn stopped_before_outcome() -> Response {
    error(ErrorCode::Ambiguous, "the shard's group stopped before the outcome was known")
}

/// Each send's answer from the outcome of the `SendBatch` entry that carried them.
fn batch_answers(outcome: std::result::Result<Outcome, Response>, conversations: Vec<String>) -> Vec<Response> {
    let sends = conversations.len();
    match outcome {
        Ok(Outcome::Batch(outcomes)) if outcomes.len() == sends => {
            outcomes.into_iter().zip(conversations).map(|(o, c)| send_answer(o, c)).collect()
        }
        Ok(other) => vec![error(ErrorCode::Protocol, format!("unexpected outcome of a send batch: {other:?}")); sends],
        Err(answer) => vec![answer; sends],
    }
}

/// The answer to one send, from its applied outcome.
fn send_answer(outcome: Outcome, conversation: String) -> Response {
    match outcome {
        Outcome::Appended { offset, ts_ms, duplicate } => Response::Ack { conversation, offset, ts_ms, duplicate },
        Outcome::Rejected { reason } => error(ErrorCode::Rejected, reason.to_string()),
        other => error(ErrorCode::Protocol, format!("unexpected outcome of a send: {other:?}")),
    }
}

impl Node {
    /// Opens storage, binds both endpoints, starts every shard group and serves peers and
    /// clients until the process ends.
    pub async fn start(config: Config, id: NodeId) -> Result<Arc<Node>> {
        let me = config.node(id)?.clone();
        let paths = tls::ensure_material(&config)?;
        let (store, fresh) = {
            let dir = me.data_dir.join("db");
            tokio::task::spawn_blocking(move || Store::open(&dir))
                .await
                .map_err(|e| Error::Storage(e.to_string()))??
        };
        let spool_dir: PathBuf = me.data_dir.join("spool");
        std::fs::create_dir_all(&spool_dir)?;

        let peer_server = tls::server_config(&paths, id, Link::Peer, 1024)?;
        let peer_endpoint = quinn::Endpoint::server(peer_server, me.peer_addr)
            .map_err(|e| Error::Config(format!("cannot bind peer address {}: {e}", me.peer_addr)))?;
        let addrs: HashMap<NodeId, SocketAddr> = config.nodes.iter().map(|n| (n.id, n.peer_addr)).collect();
        let append_timeout = Duration::from_millis(config.raft.election_timeout_min_ms);
        let client_tls = tls::client_config(&paths, Some(id))?;
        let net = PeerNet::new(peer_endpoint.clone(), client_tls, addrs, append_timeout, store.stages.clone());

        let raft_config = consensus::raft_config(&config)?;
        let registry: Groups = Arc::new(RwLock::new(HashMap::new()));
        let push = Arc::new(PushHub::new(config.shards, config.limits.push_buffer_messages));
        let mut groups = HashMap::new();
        for shard in 0..config.shards {
            let events: Arc<dyn ShardEvents> = push.clone();
            let group =
                consensus::start_group(id, shard, raft_config.clone(), store.clone(), net.clone(), events).await?;
            registry.write().expect("registry lock is never poisoned at start-up").insert(shard, group.raft.clone());
            groups.insert(shard, group);
        }
        tokio::spawn(peer::serve(peer_endpoint.clone(), registry, spool_dir, store.stages.clone()));

        let bootstrapper = config.node_ids().first().copied() == Some(id);
        if fresh && bootstrapper {
            for group in groups.values() {
                consensus::initialize_if_pristine(group, &config).await?;
            }
            tracing::info!(shards = config.shards, "initialized every shard group");
        }

        let client_server = tls::server_config(&paths, id, Link::Client, config.limits.max_streams_per_connection)?;
        let client_endpoint = quinn::Endpoint::server(client_server, me.client_addr)
            .map_err(|e| Error::Config(format!("cannot bind client address {}: {e}", me.client_addr)))?;
        let inflight = Arc::new(Semaphore::new(config.limits.max_inflight_sends));
        let node = Arc::new(Node {
            id,
            config,
            store,
            groups,
            push,
            inflight,
            peer_stats: net.stats(),
            counters: Arc::default(),
            client_endpoint,
            peer_endpoint,
        });
        tokio::spawn(crate::net::server::serve(node.clone()));
        tokio::spawn(balance_leaders(Arc::downgrade(&node)));
        Ok(node)
    }

    /// The node that should lead `shard` when it is healthy: shards are spread round-robin
    /// over the nodes so every node leads (and fsyncs for) its share.
    pub fn preferred_leader(&self, shard: ShardId) -> NodeId {
        let ids = self.config.node_ids();
        ids[shard as usize % ids.len()]
    }

    fn group_of(&self, conversation: &str) -> Result<&Group> {
        chat::validate_id("conversation", conversation).map_err(Error::InvalidInput)?;
        let shard = chat::shard_of(conversation, self.config.shards);
        self.groups.get(&shard).ok_or_else(|| Error::Unavailable(format!("shard {shard} is not hosted here")))
    }

    /// Proposes a command on the shard's leader (this node). It takes one in-flight permit
    /// per send it carries (one for a cursor), held until the outcome is known. `done`
    /// receives the outcome exactly once — from the state machine's task when the entry is
    /// applied, or with the answer for everything the command carried (not leader, outcome
    /// unknown) — unless the group stops first, which drops it uncalled. An `Err` here is
    /// the immediate answer (throttled, group stopped); `done` is then dropped.
    async fn propose_then(
        &self,
        group: &Group,
        command: Command,
        done: impl FnOnce(std::result::Result<Outcome, Response>) + Send + 'static,
    ) -> std::result::Result<(), Response> {
        let sends = match &command {
            Command::Send(_) => 1,
            Command::SendBatch(b) => b.len() as u32,
            Command::Cursor(_) => 0,
        };
        let Ok(permits) = self.inflight.clone().try_acquire_many_owned(sends.max(1)) else {
            return Err(Response::Throttled { retry_after_ms: THROTTLE_RETRY_MS });
        };
        let (shard, counters, stages) = (group.shard, self.counters.clone(), self.store.stages.clone());
        let proposed = std::time::Instant::now();
        let responder = FnResponder::new(move |result: ClientWriteResult<C>| {
            drop(permits);
            done(match result {
                Err(ClientWriteError::ForwardToLeader(f)) => Err(Response::NotLeader { shard, leader: f.leader_id }),
                Err(e) => Err(error(ErrorCode::Ambiguous, format!("shard {shard}: {e}"))),
                Ok(resp) => {
                    if sends > 0 {
                        stages.record(Stage::Send, proposed.elapsed());
                        counters.entries.fetch_add(1, Ordering::Relaxed);
                        counters.sends.fetch_add(u64::from(sends), Ordering::Relaxed);
                    }
                    Ok(resp.data)
                }
            })
        });
        // Refused only when the group has stopped: the command never reached it.
        group
            .raft
            .client_write_ff(command, Some(responder))
            .await
            .map_err(|e| error(ErrorCode::Unavailable, format!("shard {shard}: {e}")))
    }

    /// [`Node::propose_then`], waiting for the outcome at most [`SEND_TIMEOUT`]. An `Err` is
    /// the answer for everything the command carried (throttled, not leader, unknown outcome).
    async fn propose(&self, group: &Group, command: Command) -> std::result::Result<Outcome, Response> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.propose_then(group, command, move |outcome| {
            let _ = tx.send(outcome);
        })
        .await?;
        match tokio::time::timeout(SEND_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(stopped_before_outcome()),
            Err(_) => Err(no_commit_in_time()),
        }
    }

    /// Validates a send and stamps it: its shard and command, or the error answer.
    fn prepare_send(&self, req: SendRequest) -> std::result::Result<(ShardId, SendCommand), Response> {
        let shard = match self.group_of(&req.conversation) {
            Ok(g) => g.shard,
            Err(e) => return Err(error(ErrorCode::InvalidInput, e.to_string())),
        };
        if let Err(m) = chat::validate_id("user", &req.sender) {
            return Err(error(ErrorCode::InvalidInput, m));
        }
        let max = self.config.limits.max_message_bytes;
        if req.text.len() > max {
            return Err(error(ErrorCode::InvalidInput, format!("message is {} bytes, limit {max}", req.text.len())));
        }
        Ok((
            shard,
            SendCommand {
                conversation: req.conversation,
                sender: req.sender,
                client_id: req.client_id,
                client_seq: req.client_seq,
                ts_ms: now_ms(),
                text: req.text,
            },
        ))
    }

    /// Handles a send or a batch of sends (see the module doc) and hands the answer to
    /// `reply`, called at most once: `Some(answer)` is the answer known at once (invalid,
    /// throttled, or a batch that spans shards, which is awaited here), and `reply` is
    /// dropped; `None` means `reply` will be called from the state machine's task when the
    /// proposal is applied or refused — or dropped uncalled if the group stops first. The
    /// caller bounds the wait.
    pub async fn send_replying(
        &self,
        request: Request,
        reply: impl FnOnce(Response) + Send + 'static,
    ) -> Option<Response> {
        match request {
            Request::Send(req) => {
                let (shard, command) = match self.prepare_send(req) {
                    Ok(p) => p,
                    Err(answer) => return Some(answer),
                };
                let conversation = command.conversation.clone();
                let done = move |outcome: std::result::Result<Outcome, Response>| {
                    reply(match outcome {
                        Ok(outcome) => send_answer(outcome, conversation),
                        Err(answer) => answer,
                    })
                };
                self.propose_then(&self.groups[&shard], Command::Send(command), done).await.err()
            }
            Request::SendBatch(reqs) => {
                let (answers, mut by_shard) = match self.prepare_batch(reqs) {
                    Ok(prepared) => prepared,
                    Err(answer) => return Some(answer),
                };
                // The usual batch — every send valid, one shard (the client batches per
                // shard) — is answered from the state machine's task like a single send.
                if by_shard.len() == 1 && answers.iter().all(Option::is_none) {
                    if let Some((shard, (_, commands))) = by_shard.pop_first() {
                        let conversations: Vec<String> = commands.iter().map(|c| c.conversation.clone()).collect();
                        let done = move |outcome| reply(Response::Batch(batch_answers(outcome, conversations)));
                        return self.propose_then(&self.groups[&shard], Command::SendBatch(commands), done).await.err();
                    }
                }
                Some(self.send_batch_awaited((answers, by_shard)).await)
            }
            other => Some(error(ErrorCode::Protocol, format!("not a send: {other:?}"))),
        }
    }

    /// Validates each send of a batch on its own: the answers of the invalid ones by slot,
    /// and the valid ones grouped by shard with their slots.
    fn prepare_batch(&self, reqs: Vec<SendRequest>) -> std::result::Result<PreparedBatch, Response> {
        if reqs.len() > SEND_BATCH_MAX {
            return Err(error(
                ErrorCode::InvalidInput,
                format!("{} sends in one batch, limit {SEND_BATCH_MAX}", reqs.len()),
            ));
        }
        let mut answers: Vec<Option<Response>> = vec![None; reqs.len()];
        let mut by_shard = ByShard::new();
        for (i, req) in reqs.into_iter().enumerate() {
            match self.prepare_send(req) {
                Ok((shard, command)) => {
                    let (slots, commands) = by_shard.entry(shard).or_default();
                    slots.push(i);
                    commands.push(command);
                }
                Err(answer) => answers[i] = Some(answer),
            }
        }
        Ok((answers, by_shard))
    }

    /// A prepared batch's valid sends proposed as one `SendBatch` entry per shard
    /// (concurrently), each answered as it would have been alone.
    async fn send_batch_awaited(&self, (mut answers, by_shard): PreparedBatch) -> Response {
        let proposals = by_shard.into_iter().map(|(shard, (slots, commands))| async move {
            let conversations: Vec<String> = commands.iter().map(|c| c.conversation.clone()).collect();
            let outcome = self.propose(&self.groups[&shard], Command::SendBatch(commands)).await;
            (slots, batch_answers(outcome, conversations))
        });
        for (slots, shard_answers) in futures::future::join_all(proposals).await {
            for (slot, answer) in slots.into_iter().zip(shard_answers) {
                answers[slot] = Some(answer);
            }
        }
        Response::Batch(
            answers.into_iter().map(|a| a.unwrap_or_else(|| error(ErrorCode::Protocol, "send not answered"))).collect(),
        )
    }

    /// Moves a user's read cursor forward.
    pub async fn set_cursor(&self, user: String, conversation: String, offset: u64) -> Response {
        let group = match self.group_of(&conversation) {
            Ok(g) => g,
            Err(e) => return error(ErrorCode::InvalidInput, e.to_string()),
        };
        let shard = group.shard;
        let (store, c) = (self.store.clone(), conversation.clone());
        let command = Command::Cursor(CursorCommand { user, conversation, offset });
        match self.propose(group, command).await {
            Ok(Outcome::CursorAt { offset }) => {
                let head = tokio::task::spawn_blocking(move || store.head(shard, &c)).await;
                Response::Cursor { offset, head: head.ok().and_then(|h| h.ok()).unwrap_or(0) }
            }
            Ok(Outcome::Rejected { reason }) => error(ErrorCode::Rejected, reason.to_string()),
            Ok(other) => error(ErrorCode::Protocol, format!("unexpected outcome of a cursor move: {other:?}")),
            Err(answer) => answer,
        }
    }

    /// Reads a cursor and the head from this replica.
    pub async fn get_cursor(&self, user: String, conversation: String) -> Response {
        let shard = match self.group_of(&conversation) {
            Ok(g) => g.shard,
            Err(e) => return error(ErrorCode::InvalidInput, e.to_string()),
        };
        if let Err(m) = chat::validate_id("user", &user) {
            return error(ErrorCode::InvalidInput, m);
        }
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || {
            Ok::<_, Error>((store.cursor(shard, &user, &conversation)?, store.head(shard, &conversation)?))
        })
        .await;
        match read {
            Ok(Ok((offset, head))) => Response::Cursor { offset, head },
            Ok(Err(e)) => error(ErrorCode::Unavailable, e.to_string()),
            Err(e) => error(ErrorCode::Unavailable, e.to_string()),
        }
    }

    /// Starts reading and framing up to [`CATCH_UP_BATCH`] stored messages from `from` on
    /// a blocking thread.
    fn read_stored(&self, shard: ShardId, conversation: &str, from: u64) -> StoredRead {
        let (store, conversation) = (self.store.clone(), conversation.to_string());
        StoredRead(tokio::task::spawn_blocking(move || {
            let mut frames = Vec::new();
            let mut next = from.max(1);
            let count = store.scan_messages(shard, &conversation, next, CATCH_UP_BATCH, |offset, value| {
                if offset != next {
                    return Err(Error::Storage(format!(
                        "conversation {conversation:?}: offset {offset} stored where {next} was due"
                    )));
                }
                next = offset + 1;
                crate::net::wire::message_frame_from_stored(value, &mut frames)
            })?;
            Ok(StoredFrames { frames, count, next })
        }))
    }

    /// Streams a conversation to `out`; see the module doc. Returns when the client goes
    /// away, when not following and caught up, or on error.
    pub async fn subscribe(
        &self,
        conversation: String,
        from: u64,
        follow: bool,
        out: &mut quinn::SendStream,
    ) -> Result<()> {
        let shard = self.group_of(&conversation)?.shard;
        // Attach before reading storage: anything applied from now on reaches `events`.
        let mut attached =
            Attached { hub: &self.push, conversation: &conversation, rx: Some(self.push.attach(&conversation)) };
        let events = attached.rx.as_mut().expect("attached until dropped");
        let mut next = from.max(1);
        let mut caught_up = false;
        loop {
            // Catch up from storage, reading the next batch while this one is written, each
            // batch in one write: per-frame writes cost a stream (and connection) lock and a
            // wake-up each.
            let mut reading = self.read_stored(shard, &conversation, next);
            loop {
                let batch = reading.finish().await?;
                if batch.count == CATCH_UP_BATCH {
                    reading = self.read_stored(shard, &conversation, batch.next);
                }
                next = batch.next;
                if !batch.frames.is_empty() {
                    out.write_all(&batch.frames)
                        .await
                        .map_err(|e| Error::Unavailable(format!("subscriber stream: {e}")))?;
                }
                if batch.count < CATCH_UP_BATCH {
                    break;
                }
            }
            if !caught_up {
                caught_up = true;
                frame::write(out, &Response::CaughtUp { head: next - 1 }).await?;
                if !follow {
                    return Ok(());
                }
            }
            // Live push until a gap, a lag overflow or a reset sends us back to storage.
            loop {
                let event = tokio::select! {
                    ev = events.recv() => ev,
                    _ = out.stopped() => return Ok(()),
                };
                match event.as_deref() {
                    Ok(Push::Message { offset, frame }) => {
                        if *offset < next {
                            continue;
                        }
                        if *offset > next {
                            break;
                        }
                        next += 1;
                        out.write_all(frame)
                            .await
                            .map_err(|e| Error::Unavailable(format!("subscriber stream: {e}")))?;
                    }
                    Ok(Push::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Error::Unavailable(format!("shard {shard} stopped")));
                    }
                }
            }
        }
    }

    /// This node's view of every shard.
    pub fn status(&self) -> NodeStatus {
        let mut shards: Vec<ShardStatus> = self
            .groups
            .values()
            .map(|g| {
                // Clone at once: holding the watch borrow can block the Raft core.
                let m = {
                    let rx = g.raft.metrics();
                    let snapshot = rx.borrow_watched().clone();
                    snapshot
                };
                ShardStatus {
                    shard: g.shard,
                    leader: m.current_leader,
                    term: m.current_term,
                    role: format!("{:?}", m.state),
                    last_log_index: m.last_log_index,
                    last_applied_index: m.last_applied.map(|l| l.index),
                    voters: m.membership_config.membership().voter_ids().collect(),
                }
            })
            .collect();
        shards.sort_by_key(|s| s.shard);
        let stats = &self.store.syncer.stats;
        NodeStatus {
            node_id: self.id,
            shards,
            fsyncs: stats.rounds.load(Ordering::Relaxed),
            fsync_completions: stats.completions.load(Ordering::Relaxed),
            fsync_us_total: stats.fsync_us_total.load(Ordering::Relaxed),
            sends_committed: self.counters.sends.load(Ordering::Relaxed),
            entries_committed: self.counters.entries.load(Ordering::Relaxed),
            append_rpcs: self.peer_stats.append_rpcs.load(Ordering::Relaxed),
            append_rpc_entries: self.peer_stats.append_rpc_entries.load(Ordering::Relaxed),
            append_rpcs_empty: self.peer_stats.append_rpcs_empty.load(Ordering::Relaxed),
            append_rpcs_cut: self.peer_stats.append_rpcs_cut.load(Ordering::Relaxed),
            stages: self.store.stages.snapshot(),
        }
    }

    /// Stops the groups (used by tests that run a node in-process).
    pub async fn shutdown(&self) {
        self.client_endpoint.close(0u32.into(), b"shutdown");
        for g in self.groups.values() {
            let _ = g.raft.shutdown().await;
        }
        self.peer_endpoint.close(0u32.into(), b"shutdown");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(conversation: &str, offset: u64) -> StoredMessage {
        StoredMessage {
            conversation: conversation.into(),
            offset,
            sender: "u".into(),
            ts_ms: 0,
            client_id: 1,
            client_seq: offset,
            text: format!("m{offset}"),
        }
    }

    // Containment and routing of live push: a message reaches only its conversation's
    // subscribers, framed exactly as a `Response::Message`; a reset reaches every watched
    // conversation of its shard and no other; a conversation's channel is freed with its
    // last subscriber.
    #[tokio::test]
    async fn push_hub_routes_by_conversation_and_frees_idle_channels() {
        let shards = 4;
        let hub = PushHub::new(shards, 8);
        let a = "alpha";
        let shard = chat::shard_of(a, shards);
        let same_shard = (0..).map(|i| format!("beta-{i}")).find(|c| chat::shard_of(c, shards) == shard);
        let b = same_shard.expect("some conversation shares alpha's shard");
        let other_shard = (0..).map(|i| format!("gamma-{i}")).find(|c| chat::shard_of(c, shards) != shard);
        let c = other_shard.expect("some conversation is on another shard");

        let mut on_a = hub.attach(a);
        let mut also_on_a = hub.attach(a);
        let mut on_b = hub.attach(&b);
        let mut on_c = hub.attach(&c);
        assert_eq!(hub.channels.lock().expect("lock").len(), 3);

        hub.appended(vec![message(a, 1), message("unwatched", 1)]);
        for rx in [&mut on_a, &mut also_on_a] {
            match rx.recv().await.expect("a push").as_ref() {
                Push::Message { offset, frame } => {
                    assert_eq!(*offset, 1);
                    assert_eq!(frame.as_ref(), frame::encode(&Response::Message(message(a, 1))).as_slice());
                }
                Push::Resync => panic!("expected alpha's message"),
            }
        }
        hub.reset(shard);
        assert!(matches!(on_b.recv().await.expect("a push").as_ref(), Push::Resync), "b saw only the reset");
        assert!(matches!(on_a.recv().await.expect("a push").as_ref(), Push::Resync));
        assert!(on_c.try_recv().is_err(), "another shard's reset and messages do not reach c");

        drop(on_a);
        hub.detach(a);
        assert!(hub.channels.lock().expect("lock").contains_key(a), "alpha still has a subscriber");
        drop(also_on_a);
        hub.detach(a);
        drop((on_b, on_c));
        hub.detach(&b);
        hub.detach(&c);
        assert!(hub.channels.lock().expect("lock").is_empty(), "channels are freed with their last subscriber");
    }
}
