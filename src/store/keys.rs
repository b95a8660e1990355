//! The whole on-disk key schema, in one place.
//!
//! One RocksDB per node, a handful of column families, every key prefixed by the shard id
//! as a big-endian `u32` so a shard's data is one contiguous range per family (the unit of
//! snapshots and moves) and integers sort numerically:
//!
//! | family        | key                                              | value                 |
//! |---------------|--------------------------------------------------|-----------------------|
//! | `raft_log`    | shard ‖ index (u64 BE)                           | Raft entry            |
//! | `raft_meta`   | shard ‖ kind (u8: vote, committed, purged)       | log id / vote         |
//! | `messages`    | shard ‖ len(conv) u8 ‖ conv ‖ offset (u64 BE)    | [`StoredMessage`]     |
//! | `shard_state` | shard ‖ 0x01                                     | applied log id + membership |
//! |               | shard ‖ 0x02 ‖ len(conv) ‖ conv                  | head offset (u64)     |
//! |               | shard ‖ 0x03 ‖ … ‖ client_seq (u64 BE): legacy dedup records, moved to `dedup` at open |  |
//! |               | shard ‖ 0x04 ‖ len(user) ‖ user ‖ len(conv) ‖ conv | cursor offset (u64) |
//! |               | shard ‖ 0x05                                     | snapshot-install-in-progress marker |
//! |               | shard ‖ 0x06 ‖ len(conv) ‖ conv                  | [`Members`]           |
//! |               | shard ‖ 0x07 ‖ len(conv) ‖ conv                  | earliest retained offset (u64; absent: 1) |
//! |               | shard ‖ 0x08 ‖ len(conv) ‖ conv                  | [`Retention`] set for the conversation |
//! |               | shard ‖ 0x09 (the metadata group's only)         | [`ClusterMap`]        |
//! | `dedup`       | shard ‖ 0x03 ‖ len(conv) ‖ conv ‖ len(sender) ‖ sender ‖ client_id ‖ !client_seq (u64 BE, complemented) | [`DedupRecord`] |
//! | `default`     | `wm` ‖ shard                                     | [`Watermark`] (vote, last log id) |
//! |               | `cluster`                                        | [`ClusterRecord`] of this node |
//! |               | `replica` ‖ shard                                | this node's replica id in the shard's group |
//! |               | `left` ‖ shard                                   | the last replica id this node deleted of the shard |
//!
//! Every value is written by `codec::encode`: a format-version byte, then bincode.
//! Ids are at most 128 bytes, so a one-byte length prefix suffices and keeps a conversation's
//! messages contiguous and ordered by offset. The replicated state of a shard is exactly its
//! ranges in `messages`, `shard_state` and `dedup` (the install marker excepted).
//!
//! A data shard's `messages`, `shard_state` and `dedup` records are written by apply without the WAL
//! (rebuilt from the log after a crash; see `Store::write_unlogged`); everything else goes
//! through the WAL.
//!
//! The `messages` family's prefix is a key's conversation part ([`message_conversation_prefix`]):
//! its memtable is hashed by it, so a read of that family stays in one conversation and goes
//! forwards, unless it sets `total_order_seek` (see `Store::open`). The `dedup` family is
//! hashed the same way by a key's scope, everything but its sequence number
//! ([`dedup_key_scope`]); its sequence numbers are complemented so that a forward seek to a
//! scope finds its highest first.
//!
//! The watermark lives in `default`, another family than the log and the vote it guards, and
//! is written in the same batch as each append, vote and truncation: damage to one family's
//! files, or a lost WAL, shows as a log or vote behind its watermark at open.
//!
//! [`StoredMessage`]: crate::chat::StoredMessage
//! [`Watermark`]: crate::raft::log_store::Watermark
//! [`ClusterRecord`]: crate::raft::formation::ClusterRecord
//! [`DedupRecord`]: crate::chat::DedupRecord
//! [`Members`]: crate::chat::Members
//! [`Retention`]: crate::chat::Retention
//! [`ClusterMap`]: crate::placement::ClusterMap

use crate::chat::{DedupKey, ShardId};

pub const CF_LOG: &str = "raft_log";
pub const CF_META: &str = "raft_meta";
pub const CF_MESSAGES: &str = "messages";
pub const CF_STATE: &str = "shard_state";
/// Idempotent-send records, one per stored message, apart from `shard_state` so that their
/// memtable can be hashed by scope (see [`dedup_key_scope`]): in `shard_state` they made one
/// large skiplist that every apply's inserts walked.
pub const CF_DEDUP: &str = "dedup";
/// Every family this schema uses (besides RocksDB's `default`).
pub const ALL_CFS: [&str; 5] = [CF_LOG, CF_META, CF_MESSAGES, CF_STATE, CF_DEDUP];
/// The families that hold a shard's replicated state (what a snapshot carries; a record
/// names its family by index here, so new families go at the end).
pub const STATE_CFS: [&str; 3] = [CF_MESSAGES, CF_STATE, CF_DEDUP];

/// Kinds of `raft_meta` records.
pub const META_VOTE: u8 = 1;
/// Reserved: the committed log id, no longer persisted (see `raft::state_machine`).
pub const META_COMMITTED: u8 = 2;
pub const META_PURGED: u8 = 3;

/// The node's cluster record, in the `default` family.
pub const CLUSTER_KEY: &[u8] = b"cluster";

/// A shard's durable watermark, in the `default` family.
pub fn watermark_key(shard: ShardId) -> [u8; 6] {
    let mut k = [0u8; 6];
    k[..2].copy_from_slice(b"wm");
    k[2..].copy_from_slice(&shard.to_be_bytes());
    k
}

/// The last replica id this node deleted of a shard (it left the shard), in the `default`
/// family: no replica id at or below it is run here again.
pub fn left_key(shard: ShardId) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(b"left");
    k[4..].copy_from_slice(&shard.to_be_bytes());
    k
}

/// This node's replica id in a shard's group, in the `default` family.
pub fn replica_key(shard: ShardId) -> [u8; 11] {
    let mut k = [0u8; 11];
    k[..7].copy_from_slice(b"replica");
    k[7..].copy_from_slice(&shard.to_be_bytes());
    k
}

const STATE_APPLIED: u8 = 0x01;
const STATE_HEAD: u8 = 0x02;
const STATE_DEDUP: u8 = 0x03;
const STATE_CURSOR: u8 = 0x04;
const STATE_INSTALLING: u8 = 0x05;
const STATE_MEMBERS: u8 = 0x06;
const STATE_EARLIEST: u8 = 0x07;
const STATE_RETENTION: u8 = 0x08;
const STATE_PLACEMENT: u8 = 0x09;

/// Largest shard id the schema supports: the range of shard `s` ends at `s + 1`, so
/// `u32::MAX` itself has no finite upper bound. Config validation keeps shards ≤ 4096.
pub const SHARD_ID_MAX: ShardId = u32::MAX - 1;
const _: () = assert!(crate::placement::META_SHARD <= SHARD_ID_MAX, "the metadata group needs a key range");

/// `[shard, shard + 1)` as key bounds: the shard's whole range in any family.
pub fn shard_range(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    assert!(shard <= SHARD_ID_MAX, "shard ids are validated to at most {SHARD_ID_MAX}");
    (shard.to_be_bytes().to_vec(), (shard + 1).to_be_bytes().to_vec())
}

pub fn log_key(shard: ShardId, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The index in a `raft_log` key, if it is one.
pub fn log_key_index(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

pub fn meta_key(shard: ShardId, kind: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4] = kind;
    k
}

fn push_id(k: &mut Vec<u8>, id: &str) {
    debug_assert!(id.len() <= 255, "ids are validated to at most 128 bytes");
    k.push(id.len() as u8);
    k.extend_from_slice(id.as_bytes());
}

/// Prefix of every message of a conversation.
pub fn conversation_prefix(shard: ShardId, conversation: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + conversation.len() + 8);
    k.extend_from_slice(&shard.to_be_bytes());
    push_id(&mut k, conversation);
    k
}

pub fn message_key(shard: ShardId, conversation: &str, offset: u64) -> Vec<u8> {
    let mut k = conversation_prefix(shard, conversation);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// The conversation part of a `messages` key (shard ‖ len(conv) ‖ conv): the family's
/// prefix, so each conversation has a hash bucket of its own in the memtable. Total, and it
/// must stay so: RocksDB's hashed memtable asks for the prefix of any key it inserts, looks
/// up or seeks, in the domain ([`is_message_key`]) or not — e.g. the 4-byte shard bound it
/// seeks to past a range deletion — and a key too short for its length byte gives what it
/// has.
pub fn message_conversation_prefix(key: &[u8]) -> &[u8] {
    let end = key.get(4).map_or(key.len(), |&len| 5 + len as usize);
    &key[..end.min(key.len())]
}

/// Whether `key` holds a whole conversation prefix (see [`message_conversation_prefix`]).
pub fn is_message_key(key: &[u8]) -> bool {
    key.get(4).is_some_and(|&len| key.len() >= 5 + len as usize)
}

/// The offset in a `messages` key, if it is one.
pub fn message_key_offset(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

pub fn applied_key(shard: ShardId) -> [u8; 5] {
    meta_key(shard, STATE_APPLIED)
}

/// The metadata group's [`ClusterMap`](crate::placement::ClusterMap) (in its own range, so
/// its snapshots carry it).
pub fn placement_key(shard: ShardId) -> [u8; 5] {
    meta_key(shard, STATE_PLACEMENT)
}

pub fn installing_key(shard: ShardId) -> [u8; 5] {
    meta_key(shard, STATE_INSTALLING)
}

pub fn head_key(shard: ShardId, conversation: &str) -> Vec<u8> {
    conversation_record(shard, STATE_HEAD, conversation)
}

/// The prefix of every dedup key of one `(conversation, sender, client_id)`.
pub fn dedup_scope(shard: ShardId, conversation: &str, sender: &str, client_id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(7 + conversation.len() + sender.len() + 16);
    k.extend_from_slice(&shard.to_be_bytes());
    k.push(STATE_DEDUP);
    push_id(&mut k, conversation);
    push_id(&mut k, sender);
    k.extend_from_slice(&client_id.to_be_bytes());
    k
}

/// `[lo, hi)` of a conversation's messages below offset `before`: what a trim deletes.
pub fn messages_below(shard: ShardId, conversation: &str, before: u64) -> (Vec<u8>, Vec<u8>) {
    (message_key(shard, conversation, 0), message_key(shard, conversation, before))
}

/// `[lo, hi)` around every dedup key of a conversation (a sender id's length byte is at
/// most 128, so `0xff` after the prefix bounds them all).
pub fn dedup_range(shard: ShardId, conversation: &str) -> (Vec<u8>, Vec<u8>) {
    let lo = conversation_record(shard, STATE_DEDUP, conversation);
    let mut hi = lo.clone();
    hi.push(0xff);
    (lo, hi)
}

/// A `dedup` key: its scope, then its `client_seq` complemented, so that a scope's records
/// run from its highest sequence number down.
pub fn dedup_key(shard: ShardId, key: &DedupKey) -> Vec<u8> {
    let mut k = dedup_scope(shard, &key.conversation, &key.sender, key.client_id);
    k.extend_from_slice(&(!key.client_seq).to_be_bytes());
    k
}

/// The `client_seq` of a dedup key under `scope` (see [`dedup_scope`]); `None` for any
/// other key.
pub fn dedup_key_seq(key: &[u8], scope: &[u8]) -> Option<u64> {
    let seq: [u8; 8] = key.strip_prefix(scope)?.try_into().ok()?;
    Some(!u64::from_be_bytes(seq))
}

/// The scope part of a `dedup` key (shard ‖ 0x03 ‖ len(conv) ‖ conv ‖ len(sender) ‖ sender ‖
/// client_id, see [`dedup_scope`]): the family's prefix, so that each scope has a hash
/// bucket of its own in the memtable. Total, like [`message_conversation_prefix`] and for the
/// same reason: a key too short for its length bytes gives what it has.
pub fn dedup_key_scope(key: &[u8]) -> &[u8] {
    &key[..dedup_scope_len(key).min(key.len())]
}

/// Whether `key` holds a whole scope (see [`dedup_key_scope`]).
pub fn is_dedup_key(key: &[u8]) -> bool {
    dedup_scope_len(key) <= key.len()
}

/// Whether `key` has a dedup key's shape: the 0x03 kind, a whole scope, then 8 bytes of
/// sequence number (complemented or not, as its family holds it).
pub fn is_whole_dedup_key(key: &[u8]) -> bool {
    key.get(4) == Some(&STATE_DEDUP) && dedup_scope_len(key).checked_add(8) == Some(key.len())
}

/// The length of a dedup key's scope, as its length bytes tell (may exceed the key's).
fn dedup_scope_len(key: &[u8]) -> usize {
    let Some(&conversation) = key.get(5) else { return usize::MAX };
    let sender_at = 6 + usize::from(conversation);
    match key.get(sender_at) {
        Some(&sender) => sender_at + 1 + usize::from(sender) + 8,
        None => usize::MAX,
    }
}

/// A `dedup` key for a record of the old layout, a `shard_state` key under 0x03 whose
/// `client_seq` is not complemented; `None` for any other key.
pub fn dedup_key_from_legacy(key: &[u8]) -> Option<Vec<u8>> {
    if !is_whole_dedup_key(key) {
        return None;
    }
    let (scope, seq) = key.split_at(key.len() - 8);
    let seq = u64::from_be_bytes(seq.try_into().ok()?);
    let mut k = scope.to_vec();
    k.extend_from_slice(&(!seq).to_be_bytes());
    Some(k)
}

/// The start of `shard`'s legacy dedup records in `shard_state` (see
/// [`dedup_key_from_legacy`]).
pub fn legacy_dedup_prefix(shard: ShardId) -> [u8; 5] {
    meta_key(shard, STATE_DEDUP)
}

/// `[lo, hi)` around `shard`'s legacy dedup records in `shard_state`.
pub fn legacy_dedup_range(shard: ShardId) -> ([u8; 5], [u8; 5]) {
    (meta_key(shard, STATE_DEDUP), meta_key(shard, STATE_DEDUP + 1))
}

pub fn members_key(shard: ShardId, conversation: &str) -> Vec<u8> {
    conversation_record(shard, STATE_MEMBERS, conversation)
}

/// A per-conversation record of `shard_state` under `kind`.
fn conversation_record(shard: ShardId, kind: u8, conversation: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + conversation.len());
    k.extend_from_slice(&shard.to_be_bytes());
    k.push(kind);
    push_id(&mut k, conversation);
    k
}

pub fn earliest_key(shard: ShardId, conversation: &str) -> Vec<u8> {
    conversation_record(shard, STATE_EARLIEST, conversation)
}

pub fn retention_key(shard: ShardId, conversation: &str) -> Vec<u8> {
    conversation_record(shard, STATE_RETENTION, conversation)
}

/// The prefix of every head record of a shard (one per conversation) …
pub fn heads_prefix(shard: ShardId) -> [u8; 5] {
    meta_key(shard, STATE_HEAD)
}

/// … and of every retention record.
pub fn retentions_prefix(shard: ShardId) -> [u8; 5] {
    meta_key(shard, STATE_RETENTION)
}

/// The conversation of a per-conversation `shard_state` key (a head, earliest or retention
/// record: shard ‖ kind ‖ len ‖ conversation), if it is one.
pub fn record_conversation(key: &[u8]) -> Option<&str> {
    let len = usize::from(*key.get(5)?);
    std::str::from_utf8(key.get(6..6 + len)?).ok()
}

pub fn cursor_key(shard: ShardId, user: &str, conversation: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(7 + user.len() + conversation.len());
    k.extend_from_slice(&shard.to_be_bytes());
    k.push(STATE_CURSOR);
    push_id(&mut k, user);
    push_id(&mut k, conversation);
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Log keys sort by (shard, index) numerically: range scans and "last entry" depend on it.
        #[test]
        fn log_keys_sort_numerically(a in any::<(u32, u64)>(), b in any::<(u32, u64)>()) {
            let (ka, kb) = (log_key(a.0, a.1), log_key(b.0, b.1));
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
            prop_assert_eq!(log_key_index(&ka), Some(a.1));
        }

        // Messages of one conversation are contiguous and ordered by offset, and no other
        // conversation's key falls between them (length prefix).
        #[test]
        fn message_keys_group_by_conversation(c1 in "[a-z]{1,6}", c2 in "[a-z]{1,6}", o1 in 1u64..u64::MAX, o2 in 1u64..u64::MAX) {
            let (k1, k2) = (message_key(7, &c1, o1), message_key(7, &c1, o2));
            prop_assert_eq!(o1.cmp(&o2), k1.cmp(&k2));
            prop_assert_eq!(message_key_offset(&k1), Some(o1));
            let prefix = conversation_prefix(7, &c1);
            prop_assert!(k1.starts_with(&prefix));
            if c1 != c2 {
                prop_assert!(!message_key(7, &c2, o1).starts_with(&prefix));
            }
            // The family's prefix extractor gives exactly the conversation's prefix, for a
            // message key and for the conversation's bounds alike.
            prop_assert!(is_message_key(&k1) && is_message_key(&prefix));
            prop_assert_eq!(message_conversation_prefix(&k1), &prefix[..]);
            prop_assert_eq!(message_conversation_prefix(&prefix), &prefix[..]);
        }

        // The prefix extractor is total: no key makes it panic, and it accepts a key only
        // when the key holds the whole prefix its length byte announces.
        #[test]
        fn the_conversation_prefix_of_any_bytes(key in proptest::collection::vec(any::<u8>(), 0..40)) {
            let prefix = message_conversation_prefix(&key);
            prop_assert!(key.starts_with(prefix));
            prop_assert_eq!(is_message_key(&key), key.len() >= 5 && prefix.len() == 5 + key[4] as usize);
        }

        // Every key of a shard lies inside shard_range, and outside every other shard's.
        #[test]
        fn keys_stay_in_their_shard(shard in 0u32..u32::MAX, other in 0u32..u32::MAX, c in "[a-z]{1,8}", u in "[a-z]{1,8}", x in any::<u64>()) {
            let (lo, hi) = shard_range(shard);
            let keys: Vec<Vec<u8>> = vec![
                log_key(shard, x).to_vec(), meta_key(shard, META_VOTE).to_vec(),
                message_key(shard, &c, x), head_key(shard, &c),
                dedup_key(shard, &DedupKey { conversation: c.clone(), sender: u.clone(), client_id: x, client_seq: x }),
                cursor_key(shard, &u, &c), applied_key(shard).to_vec(), members_key(shard, &c),
                earliest_key(shard, &c), retention_key(shard, &c),
            ];
            for k in &keys {
                prop_assert!(k.as_slice() >= lo.as_slice() && k.as_slice() < hi.as_slice());
                if other != shard {
                    let (olo, ohi) = shard_range(other);
                    prop_assert!(!(k.as_slice() >= olo.as_slice() && k.as_slice() < ohi.as_slice()));
                }
            }
        }
    }

    // Every dedup key of a conversation lies in its dedup range, and no other conversation's.
    proptest! {
        #[test]
        fn dedup_keys_lie_in_their_conversations_range(c in "[a-z]{1,6}", other in "[a-z]{1,6}", u in "[a-z]{1,128}", id in any::<u64>(), seq in any::<u64>()) {
            let key = dedup_key(3, &DedupKey { conversation: c.clone(), sender: u, client_id: id, client_seq: seq });
            let (lo, hi) = dedup_range(3, &c);
            prop_assert!(key >= lo && key < hi);
            if other != c {
                let (olo, ohi) = dedup_range(3, &other);
                prop_assert!(!(key >= olo && key < ohi));
            }
        }
    }

    proptest! {
        // A scope's dedup keys sort from the highest sequence number down, carry their
        // sequence number back, and the family's prefix extractor gives exactly their scope.
        #[test]
        fn dedup_keys_run_down_their_scope(c in "[a-z]{0,6}", u in "[a-z]{0,128}", id in any::<u64>(), s1 in any::<u64>(), s2 in any::<u64>()) {
            let key = |seq| dedup_key(3, &DedupKey { conversation: c.clone(), sender: u.clone(), client_id: id, client_seq: seq });
            let (k1, k2) = (key(s1), key(s2));
            prop_assert_eq!(s1.cmp(&s2), k2.cmp(&k1));
            let scope = dedup_scope(3, &c, &u, id);
            prop_assert_eq!(dedup_key_seq(&k1, &scope), Some(s1));
            prop_assert!(is_dedup_key(&k1) && is_dedup_key(&scope));
            prop_assert_eq!(dedup_key_scope(&k1), &scope[..]);
            prop_assert_eq!(dedup_key_scope(&scope), &scope[..]);
            // A record of the old layout (sequence number as is) converts to the new key.
            let mut legacy = scope.clone();
            legacy.extend_from_slice(&s1.to_be_bytes());
            prop_assert!(legacy.starts_with(&legacy_dedup_prefix(3)));
            prop_assert_eq!(dedup_key_from_legacy(&legacy), Some(k1));
        }

        // The dedup prefix extractor is total, and accepts a key only when it holds the whole
        // scope its length bytes announce; no other kind of state key converts as legacy.
        #[test]
        fn the_dedup_scope_of_any_bytes(key in proptest::collection::vec(any::<u8>(), 0..48)) {
            let scope = dedup_key_scope(&key);
            prop_assert!(key.starts_with(scope));
            let whole = key.len() > 5 && {
                let at = 6 + key[5] as usize;
                key.len() > at && key.len() >= at + 1 + key[at] as usize + 8
            };
            prop_assert_eq!(is_dedup_key(&key), whole);
            prop_assert_eq!(whole, scope.len() == dedup_scope_len(&key));
            if let Some(converted) = dedup_key_from_legacy(&key) {
                prop_assert_eq!(converted.len(), key.len());
                prop_assert_eq!(key[4], STATE_DEDUP);
                prop_assert_eq!(dedup_key_scope(&converted), &key[..key.len() - 8]);
            }
        }
    }

    #[test]
    fn other_state_records_are_not_legacy_dedup_records() {
        for key in [head_key(3, "c"), members_key(3, "c"), cursor_key(3, "u", "c"), applied_key(3).to_vec()] {
            assert_eq!(dedup_key_from_legacy(&key), None, "{key:?}");
        }
    }

    // A per-conversation record names its conversation back, and lies under its kind's prefix.
    #[test]
    fn records_name_their_conversation() {
        for c in ["a", "général", &"x".repeat(128)] {
            assert_eq!(record_conversation(&head_key(3, c)), Some(c));
            assert_eq!(record_conversation(&retention_key(3, c)), Some(c));
            assert_eq!(record_conversation(&earliest_key(3, c)), Some(c));
            assert!(head_key(3, c).starts_with(&heads_prefix(3)));
            assert!(retention_key(3, c).starts_with(&retentions_prefix(3)));
        }
        assert_eq!(record_conversation(&applied_key(3)), None);
    }

    // The last supported shard's range still contains its largest and smallest keys.
    #[test]
    fn last_shard_range_is_bounded() {
        let (lo, hi) = shard_range(SHARD_ID_MAX);
        assert!(log_key(SHARD_ID_MAX, u64::MAX).as_slice() < hi.as_slice());
        assert!(log_key(SHARD_ID_MAX, 0).as_slice() >= lo.as_slice());
    }
}
