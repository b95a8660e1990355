//! Live push routed by conversation: each shard's state machine hands its applied messages
//! to the hub on its own task ([`ShardEvents`]), and the hub forwards each message, framed
//! once, only to the channel of its conversation. A channel is a bounded broadcast: a
//! subscriber that falls more than its capacity behind is told it lagged and re-reads
//! storage, so a slow reader costs storage reads, never memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::chat::{self, ShardId, StoredMessage};
use crate::net::frame;
use crate::net::wire::Response;
use crate::raft::state_machine::ShardEvents;

/// One live-pushed message, framed once for all of its conversation's subscribers.
#[derive(Debug)]
pub(super) enum Push {
    Message {
        offset: u64,
        frame: bytes::Bytes,
    },
    /// The shard's state was replaced by a snapshot: subscribers re-read storage.
    Resync,
    /// The conversation's members changed: subscribers check they may still read.
    Members,
}

/// Live push routed by conversation: each shard's state machine hands its applied
/// messages to the hub on its own task ([`ShardEvents`]), and the hub forwards each message,
/// encoded once, only to the channel of its conversation — so a message wakes its own
/// subscribers, not every subscriber of every conversation of the shard (10,000 attached
/// idle clients would otherwise each wake for every message of their shard).
pub(super) struct PushHub {
    /// The cluster's shard count, to tell which conversations a shard's reset concerns.
    shards: u32,
    /// Slots of a conversation's channel (`limits.push_buffer_messages`, validated 16..=65,536).
    capacity: usize,
    channels: std::sync::Mutex<HashMap<String, Channel>>,
}

/// A watched conversation's channel, and its head as last pushed here (for lag sampling;
/// subscribers raise it too, with heads they read from storage).
struct Channel {
    tx: broadcast::Sender<Arc<Push>>,
    head: Arc<AtomicU64>,
}

impl PushHub {
    pub(super) fn new(shards: u32, capacity: usize) -> Self {
        PushHub { shards, capacity, channels: std::sync::Mutex::default() }
    }

    /// A receiver of the conversation's live pushes, and its head as pushed here.
    pub(super) fn attach(&self, conversation: &str) -> (broadcast::Receiver<Arc<Push>>, Arc<AtomicU64>) {
        let mut channels = self.channels.lock().expect("push hub lock");
        match channels.get(conversation) {
            Some(c) => (c.tx.subscribe(), c.head.clone()),
            None => {
                let (tx, rx) = broadcast::channel(self.capacity);
                let head = Arc::new(AtomicU64::new(0));
                channels.insert(conversation.to_string(), Channel { tx, head: head.clone() });
                (rx, head)
            }
        }
    }

    /// Called by a subscriber that has dropped its receiver.
    pub(super) fn detach(&self, conversation: &str) {
        let mut channels = self.channels.lock().expect("push hub lock");
        if channels.get(conversation).is_some_and(|c| c.tx.receiver_count() == 0) {
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
            messages
                .into_iter()
                .filter_map(|m| {
                    let c = channels.get(&m.conversation)?;
                    c.head.fetch_max(m.offset, Ordering::Relaxed);
                    Some((c.tx.clone(), m))
                })
                .collect()
        };
        for (tx, m) in watched {
            let offset = m.offset;
            let frame = bytes::Bytes::from(frame::encode(&Response::Message(m)));
            let _ = tx.send(Arc::new(Push::Message { offset, frame }));
        }
    }

    fn members_changed(&self, conversations: Vec<String>) {
        let channels = self.channels.lock().expect("push hub lock");
        for conversation in conversations {
            if let Some(c) = channels.get(&conversation) {
                let _ = c.tx.send(Arc::new(Push::Members));
            }
        }
    }

    fn reset(&self, shard: ShardId) {
        let channels = self.channels.lock().expect("push hub lock");
        for (conversation, c) in channels.iter() {
            if chat::shard_of(conversation, self.shards) == shard {
                let _ = c.tx.send(Arc::new(Push::Resync));
            }
        }
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

        let (mut on_a, a_head) = hub.attach(a);
        let (mut also_on_a, _) = hub.attach(a);
        let (mut on_b, _) = hub.attach(&b);
        let (mut on_c, _) = hub.attach(&c);
        assert_eq!(hub.channels.lock().expect("lock").len(), 3);

        hub.appended(vec![message(a, 1), message("unwatched", 1)]);
        assert_eq!(a_head.load(Ordering::Relaxed), 1, "the channel knows the head it pushed");
        for rx in [&mut on_a, &mut also_on_a] {
            match rx.recv().await.expect("a push").as_ref() {
                Push::Message { offset, frame } => {
                    assert_eq!(*offset, 1);
                    assert_eq!(frame.as_ref(), frame::encode(&Response::Message(message(a, 1))).as_slice());
                }
                Push::Resync | Push::Members => panic!("expected alpha's message"),
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
