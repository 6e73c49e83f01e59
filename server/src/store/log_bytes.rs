//! How many bytes the raft log holds, entry by entry, so snapshots and log
//! retention can count bytes as well as entries (openraft's own policies
//! count entries only: 20,000 entries of 4 MiB would be 80 GB of log).
//!
//! The log store records every append, truncation and purge here; the raft
//! layer's snapshot policy ([`crate::raft::log_policy`]) reads it. One
//! 16-byte mark per entry in the log (tens of thousands at most: a few
//! hundred KB). Entries that were in the log when the node started are not
//! known here: after a restart the byte counts start from the first new
//! append, so a snapshot by bytes may come up to one interval late, once.

use std::collections::VecDeque;
use std::sync::Mutex;

/// The byte ledger of the log; shared between the log store and the policy.
#[derive(Debug, Default)]
pub struct LogBytes {
    inner: Mutex<Ledger>,
}

#[derive(Debug, Default)]
struct Ledger {
    /// `(index, cumulative bytes through this entry)`, for a contiguous run
    /// of indexes ending with the newest appended entry.
    marks: VecDeque<(u64, u64)>,
    /// The cumulative count before the first mark.
    base: u64,
}

impl Ledger {
    fn last_total(&self) -> u64 {
        self.marks.back().map_or(self.base, |m| m.1)
    }

    /// Cumulative bytes through `index`, if `index` is known.
    fn total_at(&self, index: u64) -> Option<u64> {
        let first = self.marks.front()?.0;
        let pos = index.checked_sub(first)?;
        self.marks.get(pos as usize).map(|m| m.1)
    }
}

impl LogBytes {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.inner.lock().expect("log bytes lock")
    }

    /// An entry of `bytes` encoded bytes was appended at `index`.
    pub fn appended(&self, index: u64, bytes: usize) {
        let mut l = self.ledger();
        if l.marks.back().is_some_and(|m| m.0 + 1 != index) {
            // Not the next index (the log was truncated or purged under us):
            // start again from this entry.
            l.base = l.last_total();
            l.marks.clear();
        }
        let total = l.last_total() + bytes as u64;
        l.marks.push_back((index, total));
    }

    /// Entries from `index` on were removed.
    pub fn truncated(&self, index: u64) {
        let mut l = self.ledger();
        while l.marks.back().is_some_and(|m| m.0 >= index) {
            l.marks.pop_back();
        }
    }

    /// Entries up to and including `index` were removed.
    pub fn purged(&self, index: u64) {
        let mut l = self.ledger();
        while let Some(&(i, total)) = l.marks.front() {
            if i > index {
                break;
            }
            l.base = total;
            l.marks.pop_front();
        }
    }

    /// Known bytes of the entries after `index` (all known ones if `None`).
    pub fn bytes_after(&self, index: Option<u64>) -> u64 {
        let l = self.ledger();
        let Some(&(first, _)) = l.marks.front() else { return 0 };
        let from = match index {
            Some(i) if i >= first => l.total_at(i).unwrap_or(l.last_total()),
            _ => l.base,
        };
        l.last_total() - from
    }

    /// The newest index `i <= upto` such that the entries after `i` through
    /// `upto` hold at least `keep` bytes: purging through `i` keeps `keep`
    /// bytes of log behind `upto`. `None` if the known entries hold less.
    pub fn keep_bytes_before(&self, upto: u64, keep: u64) -> Option<u64> {
        let l = self.ledger();
        let target = l.total_at(upto)?.checked_sub(keep)?;
        let end = (upto - l.marks.front()?.0) as usize + 1;
        // Marks are sorted by cumulative bytes: the last one at or below target.
        let n = l.marks.partition_point(|m| m.1 <= target).min(end);
        n.checked_sub(1).map(|p| l.marks[p].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bytes_after_an_index() {
        let b = LogBytes::default();
        assert_eq!(b.bytes_after(None), 0);
        for i in 1..=4 {
            b.appended(i, 100 * i as usize);
        }
        assert_eq!(b.bytes_after(None), 1_000);
        assert_eq!(b.bytes_after(Some(0)), 1_000);
        assert_eq!(b.bytes_after(Some(2)), 700);
        assert_eq!(b.bytes_after(Some(4)), 0);
        assert_eq!(b.bytes_after(Some(9)), 0);
        b.truncated(4);
        assert_eq!(b.bytes_after(Some(2)), 300);
        b.appended(4, 50);
        assert_eq!(b.bytes_after(Some(2)), 350);
        b.purged(2);
        assert_eq!(b.bytes_after(None), 350);
        assert_eq!(b.bytes_after(Some(1)), 350);
        // A jump (the log changed under us) starts again.
        b.appended(10, 7);
        assert_eq!(b.bytes_after(None), 7);
    }

    #[test]
    fn finds_where_to_purge_to_keep_some_bytes() {
        let b = LogBytes::default();
        for i in 1..=10 {
            b.appended(i, 10);
        }
        // Keep 30 bytes behind index 8: entries 6, 7, 8; purge through 5.
        assert_eq!(b.keep_bytes_before(8, 30), Some(5));
        assert_eq!(b.keep_bytes_before(8, 25), Some(5));
        assert_eq!(b.keep_bytes_before(8, 0), Some(8));
        assert_eq!(b.keep_bytes_before(8, 80), None, "only 80 bytes through 8, entry 1 included");
        assert_eq!(b.keep_bytes_before(8, 70), Some(1));
        assert_eq!(b.keep_bytes_before(11, 10), None, "unknown index");
        b.purged(5);
        assert_eq!(b.keep_bytes_before(8, 30), None, "5 is gone: nothing to purge");
        assert_eq!(b.keep_bytes_before(8, 20), Some(6));
    }
}
