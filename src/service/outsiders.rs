//! Requests from users who are not members of the conversation they write to, told apart
//! before they cost anything shared.
//!
//! Apply refuses a send, cursor move, membership or retention change by a non-member
//! (`chat::Rejection::NotMember`), but only once the request is a log entry: replicated,
//! fsynced on a quorum and decoded by every replica, after it waited in its conversation's
//! fair queue and took a token from the conversation's rate bucket. Any user with a valid
//! credential could so throttle a conversation they are not in, and slow its members'
//! sends, by writing to it at their own rate.
//!
//! The same holds for a creation of a conversation that exists (`Exists`).
//!
//! The shard leader therefore looks at who the conversation's members are before it charges
//! the conversation or proposes anything, from a cache of the members its own replica
//! applied ([`MembersCache`]):
//! - a member, or a conversation that does not exist yet (the first send creates it): the
//!   request goes on as before;
//! - otherwise the request takes only its user's and connection's tokens, and the leader
//!   confirms its view (a read index, [`openraft::ReadPolicy::ReadIndex`]: a quorum still
//!   follows it, and everything committed before is applied), reads the members (and a
//!   send's idempotency key) from storage, and answers the request there as apply would
//!   answer it: not a member; or, for a removed member's retry of a send stored before the
//!   removal, its offset (`SeqReused` for another text under the key) — unless that read
//!   finds the user a member after all: then the request goes on.
//!
//! The cache is only ever a hint: a stale entry that takes an outsider for a member lets
//! apply refuse the request, as before this check; one that takes a member for an outsider
//! costs that request a read index and a storage read, and is answered from storage.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::chat::{self, Members, ShardId};

/// What the cache holds at most, counting each conversation as one plus its members' names;
/// past it, it starts over. A conversation has at most [`chat::MEMBERS_MAX`] members, so
/// this holds at least 256 conversations' worth: at most 262,400 names of up to 128 bytes,
/// some 60 MB with the sets' own overhead. Only conversations that exist are kept: names
/// made up by a client cannot fill it.
pub const CACHED_WEIGHT_MAX: usize = 256 * (chat::MEMBERS_MAX + 1);

/// The members of a conversation, as this node's replica applied them.
type Known = HashSet<String>;

#[derive(Default)]
struct Inner {
    /// Raised by every change told ([`MembersCache::changed`], [`MembersCache::reset`]): a
    /// read from storage that began before a change is not kept.
    generation: u64,
    known: HashMap<String, Known>,
    /// The sum of the entries' [`weight`]s.
    weight: usize,
}

/// The members of conversations this node's leaders were asked to write to, as their
/// replicas applied them; told of every applied membership change and snapshot install.
#[derive(Default)]
pub struct MembersCache {
    inner: Mutex<Inner>,
}

impl MembersCache {
    /// Whether `user` is a member of `conversation`, as far as the cache knows: `None` if
    /// it does not exist (or cannot be read: apply decides). `read` reads the members from
    /// storage when the cache does not hold them.
    pub fn member<E>(
        &self,
        conversation: &str,
        user: &str,
        read: impl FnOnce() -> std::result::Result<Option<Members>, E>,
    ) -> Option<bool> {
        let generation = {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(known) = inner.known.get(conversation) {
                return Some(known.contains(user));
            }
            inner.generation
        };
        let known: Known = read().ok()??.users.into_iter().collect();
        let answer = known.contains(user);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.generation == generation {
            let added = weight(&known);
            if inner.weight + added > CACHED_WEIGHT_MAX {
                inner.known.clear();
                inner.weight = 0;
            }
            inner.weight += added;
            if let Some(old) = inner.known.insert(conversation.to_string(), known) {
                inner.weight -= weight(&old);
            }
        }
        Some(answer)
    }

    /// These conversations' members changed (told by their shard's state machine once the
    /// change is written).
    pub fn changed(&self, conversations: &[String]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        for c in conversations {
            if let Some(old) = inner.known.remove(c) {
                inner.weight -= weight(&old);
            }
        }
    }

    /// A shard's state was replaced (a snapshot install): forget its conversations.
    pub fn reset(&self, shard: ShardId, shards: u32) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        let mut freed = 0;
        inner.known.retain(|c, known| {
            let keep = chat::shard_of(c, shards) != shard;
            if !keep {
                freed += weight(known);
            }
            keep
        });
        inner.weight -= freed;
    }

    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap();
        (inner.known.len(), inner.weight)
    }
}

/// What an entry counts against [`CACHED_WEIGHT_MAX`]: one, plus its members' names.
fn weight(known: &Known) -> usize {
    1 + known.len()
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn members(users: &[&str]) -> Option<Members> {
        Some(Members { users: users.iter().map(|u| u.to_string()).collect::<BTreeSet<_>>(), removed: BTreeMap::new() })
    }

    #[test]
    fn members_are_told_from_the_cache_and_storage_is_read_once() {
        let cache = MembersCache::default();
        let reads = Cell::new(0);
        let read = |m: Option<Members>| {
            let reads = &reads;
            move || -> Result<_, ()> {
                reads.set(reads.get() + 1);
                Ok(m)
            }
        };
        assert_eq!(cache.member("c", "mallory", read(members(&["alice", "bob"]))), Some(false));
        assert_eq!(cache.member("c", "alice", read(None)), Some(true), "answered from the cache, not this read");
        assert_eq!(cache.member("c", "eve", read(None)), Some(false));
        assert_eq!(reads.get(), 1);
        // A conversation that does not exist is not kept: made-up names cannot fill the cache.
        assert_eq!(cache.member("new", "mallory", read(None)), None);
        assert_eq!(cache.member("new", "mallory", read(members(&["mallory"]))), Some(true));
        assert_eq!(reads.get(), 3);
        // A read that fails decides nothing, and is not kept.
        assert_eq!(cache.member("broken", "mallory", || Err::<Option<Members>, _>(())), None);
        assert_eq!(cache.member("broken", "mallory", read(members(&["alice"]))), Some(false));
        // Weights: c 1 + 2, new 1 + 1, broken 1 + 1.
        assert_eq!(cache.held(), (3, 7));
    }

    #[test]
    fn a_change_or_a_reset_forgets_and_a_read_across_a_change_is_not_kept() {
        let shards = 4;
        let cache = MembersCache::default();
        let never = || -> Result<Option<Members>, ()> { panic!("answered from the cache") };
        assert_eq!(cache.member("c", "mallory", || Ok::<_, ()>(members(&["alice"]))), Some(false));
        assert_eq!(cache.member("c", "mallory", never), Some(false));
        cache.changed(&["c".to_string()]);
        assert_eq!(cache.member("c", "mallory", || Ok::<_, ()>(members(&["alice", "mallory"]))), Some(true));
        assert_eq!(cache.member("c", "mallory", never), Some(true));
        // A change told while a read was on its way: the read answers, but is not kept.
        let racing = || {
            cache.changed(&["d".to_string()]);
            Ok::<_, ()>(members(&["alice"]))
        };
        assert_eq!(cache.member("d", "mallory", racing), Some(false));
        assert_eq!(cache.member("d", "mallory", || Ok::<_, ()>(members(&["mallory"]))), Some(true));
        // A reset forgets its shard's conversations only.
        let other = (0..).map(|i| format!("o{i}")).find(|o| chat::shard_of(o, shards) != chat::shard_of("c", shards));
        let other = other.expect("a conversation of another shard");
        assert_eq!(cache.member(&other, "mallory", || Ok::<_, ()>(members(&["alice"]))), Some(false));
        cache.reset(chat::shard_of("c", shards), shards);
        assert_eq!(cache.member(&other, "mallory", never), Some(false));
        assert_eq!(cache.member("c", "mallory", || Ok::<_, ()>(members(&["alice"]))), Some(false));
        let (conversations, weight) = cache.held();
        assert_eq!(weight, 2 * conversations, "every conversation left holds one name");
    }

    #[test]
    fn what_the_cache_holds_is_bounded() {
        let cache = MembersCache::default();
        let crowd: Vec<String> = (0..chat::MEMBERS_MAX).map(|i| format!("u{i}")).collect();
        let crowd: Vec<&str> = crowd.iter().map(String::as_str).collect();
        for i in 0..(CACHED_WEIGHT_MAX / chat::MEMBERS_MAX + 3) {
            assert_eq!(cache.member(&format!("c{i}"), "mallory", || Ok::<_, ()>(members(&crowd))), Some(false));
            assert!(cache.held().1 <= CACHED_WEIGHT_MAX);
        }
        let (conversations, weight) = cache.held();
        assert_eq!(weight, conversations * (chat::MEMBERS_MAX + 1));
        assert!(conversations < 10, "it started over when full: {conversations}");
    }
}
