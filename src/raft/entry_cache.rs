//! The newest entries of one shard's Raft log, kept decoded in memory.
//!
//! Every entry is read back right after it is appended: by the leader's replication once per
//! follower, and by the state machine on every node when it applies. From RocksDB each read
//! is an iterator seek (a skiplist walk in a memtable shared by all shards) and a decode of
//! every entry. The cache answers those reads with clones instead, the way raft-rs and
//! etcd keep their unstable entries in memory.
//!
//! Invariant: the cache holds one contiguous run of indexes, and each entry in it is the
//! entry the log in RocksDB holds at that index. Every change of the log goes through
//! [`EntryCache::appended`], [`EntryCache::truncate_after`] or [`EntryCache::purge`], and a
//! read is answered only when the whole range lies inside the run; anything else reads
//! RocksDB, so the cache can make a read cheaper, never different.

use std::collections::VecDeque;

use super::types::Entry;

/// Entries kept per shard, at most.
pub const CACHED_ENTRIES_MAX: usize = 4096;
/// Encoded bytes of the entries kept per shard, at most (16 shards: 64 MiB per node).
pub const CACHED_BYTES_MAX: usize = 4 << 20;

/// See the module documentation.
#[derive(Default)]
pub struct EntryCache {
    /// Consecutive entries, oldest first, with their encoded sizes.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl EntryCache {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Records entries just written to the log (consecutive, with their encoded sizes).
    pub fn appended(&mut self, new: impl IntoIterator<Item = (Entry, usize)>) {
        for (entry, size) in new {
            let index = entry.log_id.index;
            match (self.first(), self.last()) {
                (Some(_), Some(last)) if index == last + 1 => {}
                // Overwrites the tail: what followed in the cache is no longer the log.
                (Some(first), Some(last)) if index > first && index <= last => self.truncate_after(Some(index - 1)),
                // Empty, a gap, or an overwrite of everything cached: start over here.
                _ => self.clear(),
            }
            self.bytes += size;
            self.entries.push_back((entry, size));
        }
        while self.entries.len() > CACHED_ENTRIES_MAX || (self.bytes > CACHED_BYTES_MAX && self.entries.len() > 1) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    /// The log now ends at `last` (`None`: it is empty).
    pub fn truncate_after(&mut self, last: Option<u64>) {
        let Some(last) = last else { return self.clear() };
        while self.last().is_some_and(|l| l > last) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// The log no longer holds entries up to and including `upto`.
    pub fn purge(&mut self, upto: u64) {
        while self.first().is_some_and(|f| f <= upto) {
            self.pop_front();
        }
    }

    /// The entries `[start, end)`, if all of them are cached.
    pub fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let (first, last) = (self.first()?, self.last()?);
        if start < first || end > last + 1 {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let skip = (start - first) as usize;
        Some(self.entries.iter().skip(skip).take((end - start) as usize).map(|(e, _)| e.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::{LogId, C};

    fn entry(term: u64, index: u64) -> (Entry, usize) {
        (openraft::testing::blank_ent::<C>(term, 1, index), 100)
    }

    fn id(term: u64, index: u64) -> LogId {
        openraft::testing::log_id::<C>(term, 1, index)
    }

    fn ids(cache: &EntryCache, start: u64, end: u64) -> Option<Vec<LogId>> {
        cache.get(start, end).map(|v| v.iter().map(|e| e.log_id).collect())
    }

    #[test]
    fn answers_only_ranges_it_holds_whole() {
        let mut cache = EntryCache::default();
        assert_eq!(cache.get(1, 2).map(|v| v.len()), None, "an empty cache answers nothing");
        cache.appended((5..=9).map(|i| entry(1, i)));
        assert_eq!(ids(&cache, 6, 9), Some(vec![id(1, 6), id(1, 7), id(1, 8)]));
        assert_eq!(ids(&cache, 5, 10).map(|v| v.len()), Some(5));
        assert_eq!(cache.get(4, 6).map(|v| v.len()), None, "below the first cached entry");
        assert_eq!(cache.get(8, 11).map(|v| v.len()), None, "past the last cached entry");
        assert_eq!(cache.get(7, 7).map(|v| v.len()), Some(0));
    }

    #[test]
    fn an_overwrite_drops_the_old_tail_and_a_gap_starts_over() {
        let mut cache = EntryCache::default();
        cache.appended((1..=6).map(|i| entry(1, i)));
        // A new leader's entry 4 replaces the old 4..6.
        cache.appended([entry(2, 4)]);
        assert_eq!(ids(&cache, 1, 5), Some(vec![id(1, 1), id(1, 2), id(1, 3), id(2, 4)]));
        assert_eq!(cache.get(4, 7).map(|v| v.len()), None, "the old 5 and 6 are gone");
        // Not contiguous: the cache restarts at the new entry.
        cache.appended([entry(2, 9)]);
        assert_eq!(cache.get(4, 5).map(|v| v.len()), None);
        assert_eq!(ids(&cache, 9, 10), Some(vec![id(2, 9)]));
        // Overwriting from the first cached index also restarts.
        cache.appended([entry(3, 9)]);
        assert_eq!(ids(&cache, 9, 10), Some(vec![id(3, 9)]));
        assert_eq!(cache.bytes, 100);
    }

    #[test]
    fn truncate_and_purge_follow_the_log() {
        let mut cache = EntryCache::default();
        cache.appended((1..=10).map(|i| entry(1, i)));
        cache.truncate_after(Some(7));
        assert_eq!(cache.get(1, 9).map(|v| v.len()), None);
        assert_eq!(cache.get(1, 8).map(|v| v.len()), Some(7));
        cache.purge(3);
        assert_eq!(cache.get(3, 5).map(|v| v.len()), None);
        assert_eq!(ids(&cache, 4, 8).map(|v| v.len()), Some(4));
        assert_eq!(cache.bytes, 400);
        cache.truncate_after(None);
        assert_eq!(cache.get(4, 5).map(|v| v.len()), None);
        assert_eq!(cache.bytes, 0);
    }

    #[test]
    fn keeps_within_its_bounds() {
        let mut cache = EntryCache::default();
        cache.appended((1..=(CACHED_ENTRIES_MAX as u64 + 10)).map(|i| entry(1, i)));
        assert_eq!(cache.entries.len(), CACHED_ENTRIES_MAX);
        assert_eq!(cache.first(), Some(11));
        let mut big = EntryCache::default();
        let huge = CACHED_BYTES_MAX / 2 + 1;
        big.appended((1..=3).map(|i| (entry(1, i).0, huge)));
        assert_eq!(big.entries.len(), 1, "only the newest entry fits the byte budget");
        assert_eq!(big.first(), Some(3));
        assert_eq!(big.bytes, huge);
    }
}
