//! The newest raft log entries of each group, kept decoded in memory: the
//! state machine reads each entry right after its append, and would
//! otherwise decode it back from RocksDB.
//!
//! Each group keeps its own contiguous suffix ([`RecentEntries`]), bounded
//! per group in entries and events, while the bytes of all groups together
//! are bounded by one node-wide [`RecentBudget`] (64 MiB,
//! `MAX_RECENT_ENTRY_BYTES`), never by a multiple of the group count. A
//! group that pushes the node over the budget drops its own oldest entries,
//! and its newest too when that is over [`KEEP_NEWEST_MAX_BYTES`], so while
//! other groups are hot a group may keep little: that only costs a decode
//! from RocksDB on a read. Groups that go idle keep what they hold, so the
//! node holds at most the budget, plus one entry being pushed, plus
//! [`KEEP_NEWEST_MAX_BYTES`] per group (64 groups: 4 MiB).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::limits::MAX_RECENT_ENTRY_BYTES;
use crate::types::{Command, Entry};

/// At most this many entries and events per group are kept (the newest
/// entry always is, whatever its count of events).
pub const RECENT_MAX_ENTRIES: usize = 256;
pub const RECENT_MAX_EVENTS: usize = 200_000;

/// A group's newest entry stays while the node is over its byte budget
/// only if it is at most this large (encoded). A larger one (up to a 16 MiB
/// request of one shard's users) is read back from RocksDB instead: kept by
/// each of 64 groups that then went idle, it would hold 1 GiB.
pub const KEEP_NEWEST_MAX_BYTES: usize = 64 * 1024;

/// Encoded bytes of recent entries held by all groups of a node.
#[derive(Debug)]
pub struct RecentBudget {
    used: AtomicUsize,
    max: usize,
}

impl RecentBudget {
    pub fn new(max: usize) -> Arc<RecentBudget> {
        Arc::new(RecentBudget { used: AtomicUsize::new(0), max })
    }

    /// Bytes held now, all groups together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    fn over(&self) -> bool {
        self.used() > self.max
    }
}

impl Default for RecentBudget {
    fn default() -> RecentBudget {
        RecentBudget { used: AtomicUsize::new(0), max: MAX_RECENT_ENTRY_BYTES }
    }
}

/// One group's newest entries, as appended. Always a contiguous suffix of
/// the group's log (possibly empty): appends extend it, truncation cuts it,
/// purging and the bounds drop its oldest entries. Entries share their
/// payload (`Command::Write` holds an `Arc`), so keeping them costs no copy.
pub struct RecentEntries {
    entries: VecDeque<Entry>,
    /// The encoded size of each entry in `entries`.
    sizes: VecDeque<usize>,
    /// Events in `entries`.
    events: usize,
    /// Encoded bytes of `entries` (also counted in `budget`): the bound
    /// that matters for memory (an entry decoded takes about as much as
    /// encoded), since one entry may hold 9,000 events or 16 MB.
    bytes: usize,
    budget: Arc<RecentBudget>,
}

fn events_in(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(Command::Write { requests, .. }) => {
            requests.iter().map(Vec::len).sum()
        }
        _ => 0,
    }
}

impl RecentEntries {
    pub fn new(budget: Arc<RecentBudget>) -> RecentEntries {
        RecentEntries { entries: VecDeque::new(), sizes: VecDeque::new(), events: 0, bytes: 0, budget }
    }

    /// Encoded bytes this group holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds the newest entry, `bytes` long encoded.
    pub fn push(&mut self, entry: Entry, bytes: usize) {
        let follows = self.entries.back().is_none_or(|last| last.log_id.index + 1 == entry.log_id.index);
        if !follows {
            // Not the next index (the log was truncated or purged under us):
            // start again from this entry, which is the log's newest.
            self.clear();
        }
        self.events += events_in(&entry);
        self.bytes += bytes;
        self.budget.used.fetch_add(bytes, Ordering::Relaxed);
        self.entries.push_back(entry);
        self.sizes.push_back(bytes);
        loop {
            let over_own = self.entries.len() > RECENT_MAX_ENTRIES || self.events > RECENT_MAX_EVENTS;
            let drop_oldest = match self.entries.len() {
                0 => false,
                1 => self.budget.over() && self.bytes > KEEP_NEWEST_MAX_BYTES,
                _ => over_own || self.budget.over(),
            };
            if !drop_oldest {
                break;
            }
            self.pop_front();
        }
    }

    fn clear(&mut self) {
        while !self.entries.is_empty() {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let (Some(e), Some(bytes)) = (self.entries.pop_front(), self.sizes.pop_front()) {
            self.forget(&e, bytes);
        }
    }

    fn forget(&mut self, entry: &Entry, bytes: usize) {
        self.events -= events_in(entry);
        self.bytes -= bytes;
        self.budget.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Drops entries from `index` on.
    pub fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|e| e.log_id.index >= index) {
            let e = self.entries.pop_back().expect("checked");
            let bytes = self.sizes.pop_back().expect("one size per entry");
            self.forget(&e, bytes);
        }
    }

    /// Drops entries up to and including `index`.
    pub fn purge(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= index) {
            self.pop_front();
        }
    }

    /// The entries of `[start, end)` if every one of them is here, cut
    /// after the first entry that reaches `budget` encoded bytes. An open
    /// end, or one past the newest entry here, is left to RocksDB (an
    /// append may have written newer entries that are not here yet).
    pub fn get(&self, start: u64, end: Option<u64>, budget: usize) -> Option<Vec<Entry>> {
        let (first, last) = (self.entries.front()?.log_id.index, self.entries.back()?.log_id.index);
        let end = end?;
        if start < first || end > last + 1 {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let range = (start - first) as usize..(end - first) as usize;
        let mut budget = Budget::new(budget);
        let sizes = self.sizes.range(range.clone());
        Some(
            self.entries
                .range(range)
                .zip(sizes)
                .take_while(|(_, n)| budget.take(**n))
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

impl Drop for RecentEntries {
    /// A closed group gives its bytes back to the node.
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A byte budget for a run of entries: the first entry always fits, the
/// rest while the total stays within the budget.
pub struct Budget {
    left: usize,
    first: bool,
}

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        Budget { left: bytes, first: true }
    }

    /// Whether an entry of `bytes` fits (and takes it from the budget).
    pub fn take(&mut self, bytes: usize) -> bool {
        let fits = std::mem::take(&mut self.first) || bytes <= self.left;
        self.left = self.left.saturating_sub(bytes);
        fits
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::model::Event;
    use crate::store::codec::encode;
    use crate::types::LogId;

    const RECENT_MAX_BYTES: usize = MAX_RECENT_ENTRY_BYTES;

    fn entry(index: u64, events: usize) -> Entry {
        let event = Event::bare();
        let requests = Arc::new(vec![vec![event; events]]);
        let payload = EntryPayload::Normal(Command::Write { stamp_ms: 0, requests });
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload }
    }

    /// One group alone on a node budget.
    fn alone() -> RecentEntries {
        RecentEntries::new(Arc::default())
    }

    /// Pushes `e` with its real encoded size.
    fn push(r: &mut RecentEntries, e: Entry) {
        let bytes = encode(&e).len();
        r.push(e, bytes);
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|es| es.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn recent_entries_serve_only_ranges_they_hold_whole() {
        let mut r = alone();
        assert_eq!(indexes(r.get(1, Some(2), usize::MAX)), None, "empty");
        for i in 5..=9 {
            push(&mut r, entry(i, 1));
        }
        assert_eq!(indexes(r.get(5, Some(10), usize::MAX)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(r.get(7, Some(9), usize::MAX)), Some(vec![7, 8]));
        assert_eq!(indexes(r.get(8, Some(8), usize::MAX)), Some(vec![]));
        assert_eq!(indexes(r.get(4, Some(6), usize::MAX)), None, "starts before the oldest");
        assert_eq!(indexes(r.get(8, Some(11), usize::MAX)), None, "ends past the newest");
        assert_eq!(indexes(r.get(8, None, usize::MAX)), None, "open end");
    }

    #[test]
    fn recent_entries_stay_a_suffix_of_the_log() {
        let mut r = alone();
        for i in 1..=6 {
            push(&mut r, entry(i, 2));
        }
        r.truncate(5);
        assert_eq!(indexes(r.get(1, Some(5), usize::MAX)), Some(vec![1, 2, 3, 4]));
        assert_eq!(indexes(r.get(1, Some(6), usize::MAX)), None, "5 was truncated");
        push(&mut r, entry(5, 2));
        assert_eq!(indexes(r.get(4, Some(6), usize::MAX)), Some(vec![4, 5]));
        r.purge(2);
        assert_eq!(indexes(r.get(2, Some(4), usize::MAX)), None, "2 was purged");
        assert_eq!(indexes(r.get(3, Some(6), usize::MAX)), Some(vec![3, 4, 5]));
        assert_eq!(r.events, 6);
        // An append that does not follow (the log changed under us) restarts.
        push(&mut r, entry(9, 1));
        assert_eq!(indexes(r.get(3, Some(6), usize::MAX)), None);
        assert_eq!(indexes(r.get(9, Some(10), usize::MAX)), Some(vec![9]));
        assert_eq!(r.events, 1);
        assert_eq!(r.budget.used(), r.bytes, "the restart gave the dropped bytes back");
    }

    #[test]
    fn recent_entries_are_bounded_by_count_and_events() {
        let mut r = alone();
        for i in 1..=(RECENT_MAX_ENTRIES as u64 + 10) {
            push(&mut r, entry(i, 1));
        }
        assert_eq!(r.entries.len(), RECENT_MAX_ENTRIES);
        assert_eq!(r.entries.front().unwrap().log_id.index, 11);
        let mut r = alone();
        push(&mut r, entry(1, RECENT_MAX_EVENTS / 2));
        push(&mut r, entry(2, RECENT_MAX_EVENTS / 2));
        push(&mut r, entry(3, 10));
        assert_eq!(
            indexes(r.get(2, Some(4), usize::MAX)),
            Some(vec![2, 3]),
            "the oldest went over the event bound"
        );
        assert_eq!(r.events, RECENT_MAX_EVENTS / 2 + 10);
        // A single entry over the bound is still kept (it is the newest).
        push(&mut r, entry(4, RECENT_MAX_EVENTS + 1));
        assert_eq!(indexes(r.get(4, Some(5), usize::MAX)), Some(vec![4]));
    }

    #[test]
    fn recent_entries_are_bounded_by_bytes() {
        let mut r = alone();
        let third = RECENT_MAX_BYTES / 3;
        for i in 1..=3 {
            r.push(entry(i, 1), third);
        }
        assert_eq!(indexes(r.get(1, Some(4), usize::MAX)), Some(vec![1, 2, 3]));
        r.push(entry(4, 1), third);
        assert_eq!(indexes(r.get(2, Some(5), usize::MAX)), Some(vec![2, 3, 4]), "1 went over the byte bound");
        assert_eq!(r.bytes, 3 * third);
        r.truncate(4);
        assert_eq!(r.bytes, 2 * third);
        // A single entry over the bound is not kept, even as the newest:
        // it is read back from RocksDB.
        r.push(entry(4, 1), RECENT_MAX_BYTES + 1);
        assert_eq!(indexes(r.get(4, Some(5), usize::MAX)), None);
        assert_eq!((r.bytes, r.budget.used()), (0, 0));
        // The next entry follows on from an empty suffix.
        r.push(entry(5, 1), 100);
        assert_eq!(indexes(r.get(5, Some(6), usize::MAX)), Some(vec![5]));
    }

    /// 64 groups each append one entry of a whole `Write` of 16 MiB (one
    /// shard's users, as a bulk loader sends) and go idle: the node holds
    /// at most its budget, not 64 such entries. Small newest entries are
    /// still kept over the budget, so a group under pressure keeps serving
    /// its state machine from memory.
    #[test]
    fn idle_groups_do_not_hold_large_entries_past_the_node_budget() {
        let budget = RecentBudget::new(RECENT_MAX_BYTES);
        let mut groups: Vec<RecentEntries> = (0..64).map(|_| RecentEntries::new(budget.clone())).collect();
        let large = 16 << 20;
        for g in &mut groups {
            g.push(entry(1, 1), large);
            assert!(budget.used() <= RECENT_MAX_BYTES, "{} over {RECENT_MAX_BYTES}", budget.used());
        }
        let kept = groups.iter().filter(|g| g.bytes() > 0).count();
        assert_eq!(kept, RECENT_MAX_BYTES / large, "only what fits the budget");
        // The idle groups without an entry first: the node is over its
        // budget while they push.
        for g in groups.iter_mut().rev() {
            g.push(entry(2, 1), KEEP_NEWEST_MAX_BYTES);
            assert!(budget.used() <= RECENT_MAX_BYTES + 64 * KEEP_NEWEST_MAX_BYTES);
            assert_eq!(indexes(g.get(2, Some(3), usize::MAX)), Some(vec![2]), "a small newest entry stays");
        }
    }

    #[test]
    fn recent_entries_cut_a_range_at_the_byte_budget() {
        let mut r = alone();
        for i in 1..=4 {
            r.push(entry(i, 1), 100);
        }
        assert_eq!(indexes(r.get(1, Some(5), 250)), Some(vec![1, 2]));
        assert_eq!(indexes(r.get(1, Some(5), 300)), Some(vec![1, 2, 3]));
        assert_eq!(indexes(r.get(2, Some(5), 10)), Some(vec![2]), "the first entry always goes");
    }

    /// 64 groups, each pushing half the node budget in turn (32 budgets in
    /// all): the node total stays within the one budget after every push
    /// (not 64 of them), every group keeps at least its newest entry, a
    /// group only ever drops its own entries, and closed groups give their
    /// bytes back.
    #[test]
    fn groups_share_one_node_budget() {
        let budget = RecentBudget::new(RECENT_MAX_BYTES);
        let mut groups: Vec<RecentEntries> = (0..64).map(|_| RecentEntries::new(budget.clone())).collect();
        let size = RECENT_MAX_BYTES / 100;
        for i in 1..=50 {
            for g in &mut groups {
                g.push(entry(i, 1), size);
                assert!(budget.used() <= RECENT_MAX_BYTES, "{} over {RECENT_MAX_BYTES}", budget.used());
            }
        }
        assert_eq!(budget.used(), groups.iter().map(RecentEntries::bytes).sum::<usize>());
        assert!(budget.used() > RECENT_MAX_BYTES - size, "the budget is used: {}", budget.used());
        assert!(groups.iter().all(|g| g.get(50, Some(51), usize::MAX).is_some()), "newest kept");
        // A hot group cannot take the others' share: it keeps little (at
        // least its newest entry), and the node stays within budget.
        let cold: usize = groups[1..].iter().map(RecentEntries::bytes).sum();
        let hot = &mut groups[0];
        for i in 51..=150 {
            hot.push(entry(i, 1), size);
            assert!(budget.used() <= RECENT_MAX_BYTES);
            assert_eq!(hot.entries.back().unwrap().log_id.index, i);
        }
        assert_eq!(groups[1..].iter().map(RecentEntries::bytes).sum::<usize>(), cold, "others untouched");
        drop(groups);
        assert_eq!(budget.used(), 0, "closed groups gave their bytes back");
    }
}
