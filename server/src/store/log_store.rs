//! The raft log store on RocksDB (`<data>/raft`).
//!
//! Durability: entries are written without a sync, then the openraft flush
//! callback is handed to a flusher thread that syncs the WAL once for every
//! callback queued meanwhile (group commit) before reporting them flushed.
//! Votes are written with a synced write. The state machine applies without
//! a WAL (this log is its write-ahead log): logs are purged only up to what
//! its flushed state covers (a purge past it waits on a background thread
//! for a flush), so applied state never depends on a purged entry.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, Vote};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::codec::{decode, encode, read_err, write_err};
use super::keys::*;
use super::log_bytes::LogBytes;
use super::sm_db::{cf, SmStore};
use super::sync_audit as audit;
use super::threads::Joined;
use crate::limits::{MAX_APPEND_ENTRIES_BYTES, MAX_RECENT_ENTRY_BYTES};
use crate::types::{Command, Entry, LogId, NodeId, StorageError, TypeConfig};

type Flushed = LogFlushed<TypeConfig>;

/// The raft log. Cloning gives another handle to the same log (a reader).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: mpsc::Sender<Queued>,
    /// Purges that wait for a state-machine flush (see `purge`).
    purger: mpsc::Sender<LogId>,
    sm: Option<Arc<SmStore>>,
    recent: Arc<Mutex<RecentEntries>>,
    /// A purge handed to the purger thread and not yet on disk: openraft
    /// counts it purged at once, so the log answers as if it were (after
    /// a crash it is simply forgotten, and the log covers more: safe).
    pending_purge: Arc<Mutex<Option<LogId>>>,
    bytes: Arc<LogBytes>,
    audit: audit::Audit,
    /// The fsync and purge threads. Last: the senders above drop first, so
    /// when the last handle drops the threads see their channels close and
    /// end, and are joined here.
    _threads: Arc<Joined>,
}

/// The newest entries, as appended: the state machine reads each entry
/// right after its append, and would otherwise decode it back from RocksDB.
/// Always a contiguous suffix of the log (possibly empty): appends extend
/// it, truncation cuts it, purging and the size bounds drop its oldest
/// entries. Entries share their payload (`Command::Write` holds an `Arc`),
/// so keeping them costs no copy.
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<Entry>,
    /// The encoded size of each entry in `entries`.
    sizes: VecDeque<usize>,
    /// Events in `entries`.
    events: usize,
    /// Encoded bytes of `entries`: the bound that matters for memory (an
    /// entry decoded takes about as much as encoded, give or take the
    /// allocator), since one entry may hold 9,000 events or 16 MB.
    bytes: usize,
}

/// At most this many entries, events and encoded bytes are kept (the
/// newest entry always is).
const RECENT_MAX_ENTRIES: usize = 256;
const RECENT_MAX_EVENTS: usize = 200_000;
const RECENT_MAX_BYTES: usize = MAX_RECENT_ENTRY_BYTES;

fn events_in(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(Command::Write { requests, .. }) => {
            requests.iter().map(Vec::len).sum()
        }
        _ => 0,
    }
}

impl RecentEntries {
    /// Adds the newest entry, `bytes` long encoded.
    fn push(&mut self, entry: Entry, bytes: usize) {
        let follows = self.entries.back().is_none_or(|last| last.log_id.index + 1 == entry.log_id.index);
        if !follows {
            // Not the next index (the log was truncated or purged under us):
            // start again from this entry, which is the log's newest.
            *self = RecentEntries::default();
        }
        self.events += events_in(&entry);
        self.bytes += bytes;
        self.entries.push_back(entry);
        self.sizes.push_back(bytes);
        while self.entries.len() > 1
            && (self.entries.len() > RECENT_MAX_ENTRIES
                || self.events > RECENT_MAX_EVENTS
                || self.bytes > RECENT_MAX_BYTES)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let (Some(e), Some(bytes)) = (self.entries.pop_front(), self.sizes.pop_front()) {
            self.events -= events_in(&e);
            self.bytes -= bytes;
        }
    }

    /// Drops entries from `index` on.
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|e| e.log_id.index >= index) {
            let e = self.entries.pop_back().expect("checked");
            self.events -= events_in(&e);
            self.bytes -= self.sizes.pop_back().expect("one size per entry");
        }
    }

    /// Drops entries up to and including `index`.
    fn purge(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= index) {
            self.pop_front();
        }
    }

    /// The entries of `[start, end)` if every one of them is here, cut
    /// after the first entry that reaches `budget` encoded bytes. An open
    /// end, or one past the newest entry here, is left to RocksDB (an
    /// append may have written newer entries that are not here yet).
    fn get(&self, start: u64, end: Option<u64>, budget: usize) -> Option<Vec<Entry>> {
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

/// A byte budget for a run of entries: the first entry always fits, the
/// rest while the total stays within the budget.
struct Budget {
    left: usize,
    first: bool,
}

impl Budget {
    fn new(bytes: usize) -> Budget {
        Budget { left: bytes, first: true }
    }

    /// Whether an entry of `bytes` fits (and takes it from the budget).
    fn take(&mut self, bytes: usize) -> bool {
        let fits = std::mem::take(&mut self.first) || bytes <= self.left;
        self.left = self.left.saturating_sub(bytes);
        fits
    }
}

impl LogStore {
    /// Opens the log under `<data>/raft`. `sm`, when given, is persisted
    /// before logs are purged.
    pub fn open(data_dir: &Path, sm: Option<Arc<SmStore>>) -> anyhow::Result<LogStore> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let audit = audit::Audit::new(&mut opts);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOGS, Options::default()),
            ColumnFamilyDescriptor::new(CF_RAFT_META, Options::default()),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&opts, data_dir.join("raft"), cfs)?);
        check_format(&db, &data_dir.join("raft"))?;
        let (tx, rx) = mpsc::channel();
        let threads = Arc::new(Joined::default());
        let (flush_db, flush_audit) = (db.clone(), audit.clone());
        threads.spawn("raft-log-fsync", move || flush_loop(&flush_db, &flush_audit, rx));
        let (purger, purge_rx) = mpsc::channel();
        let (purge_db, purge_sm) = (db.clone(), sm.clone());
        threads.spawn("raft-log-purge", move || purge_loop(&purge_db, purge_sm, purge_rx));
        Ok(LogStore {
            db,
            flusher: tx,
            purger,
            sm,
            recent: Arc::default(),
            pending_purge: Arc::default(),
            bytes: Arc::default(),
            audit,
            _threads: threads,
        })
    }

    /// The log's byte ledger, for the snapshot and retention policy.
    pub fn log_bytes(&self) -> Arc<LogBytes> {
        self.bytes.clone()
    }

    fn logs(&self) -> &rocksdb::ColumnFamily {
        cf(&self.db, CF_LOGS)
    }

    fn meta_get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self.db.get_cf(cf(&self.db, CF_RAFT_META), key).map_err(read_err)?;
        raw.map(|b| decode(&b).map_err(read_err)).transpose()
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        match self.db.iterator_cf(self.logs(), IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(read_err)?;
                let entry: Entry = decode(&value).map_err(read_err)?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

/// Removes the entries up to `log_id` and records it as the last purged.
fn purge_now(db: &DB, log_id: LogId) -> Result<(), StorageError> {
    let mut batch = WriteBatch::default();
    batch.put_cf(cf(db, CF_RAFT_META), RAFT_LAST_PURGED, encode(&log_id));
    batch.delete_range_cf(cf(db, CF_LOGS), log_index(0), log_index(log_id.index + 1));
    db.write(batch).map_err(write_err)
}

/// Deferred purges, in order: flush the state machine, then purge.
fn purge_loop(db: &DB, sm: Option<Arc<SmStore>>, rx: mpsc::Receiver<LogId>) {
    while let Ok(first) = rx.recv() {
        // Purges queued meanwhile: the newest covers the others.
        let log_id = rx.try_iter().fold(first, |a, b| if b.index > a.index { b } else { a });
        if let Some(sm) = &sm {
            if let Err(e) = sm.persist() {
                tracing::error!(error = %e, %log_id, "flushing the state machine before a log purge; not purged");
                continue;
            }
        }
        if let Err(e) = purge_now(db, log_id) {
            tracing::error!(error = %e, %log_id, "purging the raft log");
        }
    }
}

/// Refuses a log written in another storage format before any entry is
/// read; records the format in a new one.
fn check_format(db: &DB, path: &Path) -> anyhow::Result<()> {
    super::format::check_or_init(db, path, CF_RAFT_META, RAFT_FORMAT, &[CF_LOGS, CF_RAFT_META])
}

/// An append waiting for its sync.
struct Queued {
    callback: Flushed,
    /// Where the sync audit stood when the append was written (tests).
    written: audit::Mark,
}

/// Syncs the WAL once per group of queued callbacks.
fn flush_loop(db: &DB, audit: &audit::Audit, rx: mpsc::Receiver<Queued>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        flush_group(db, audit, group);
    }
}

/// Syncs the WAL, then reports every append of `group` durable.
fn flush_group(db: &DB, audit: &audit::Audit, group: Vec<Queued>) {
    let result = db.flush_wal(true);
    for Queued { callback, written } in group {
        audit.acknowledged(written, "append");
        let outcome = result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(outcome);
    }
}

impl LogStore {
    /// The entries of `range`, cut after the first entry that reaches
    /// `budget` encoded bytes (the stored value is the encoding).
    fn pending_purged(&self) -> Option<LogId> {
        *self.pending_purge.lock().expect("pending purge lock")
    }

    fn read_entries<RB: RangeBounds<u64>>(
        &self,
        range: RB,
        budget: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i.saturating_add(1)),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if let Some(entries) = self.recent.lock().expect("recent entries lock").get(start, end, budget) {
            return Ok(entries);
        }
        let mut entries = Vec::new();
        let mut budget = Budget::new(budget);
        // Entries a deferred purge removes are gone for openraft already.
        let first_kept = self.pending_purged().map_or(0, |l| l.index + 1);
        let mode = IteratorMode::From(&log_index(start.max(first_kept)), Direction::Forward);
        for item in self.db.iterator_cf(self.logs(), mode) {
            let (key, value) = item.map_err(read_err)?;
            let index = parse_log_index(&key).unwrap_or(u64::MAX);
            if !range.contains(&index) || !budget.take(value.len()) {
                break;
            }
            entries.push(decode(&value).map_err(read_err)?);
        }
        Ok(entries)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(range, usize::MAX)
    }

    /// Replication reads through here: at most `MAX_APPEND_ENTRIES_BYTES`
    /// of entries per AppendEntries (at least one entry), so a run of large
    /// entries never makes one RPC over the raft message limit.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(start..end, MAX_APPEND_ENTRIES_BYTES)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let on_disk: Option<LogId> = self.meta_get(RAFT_LAST_PURGED)?;
        let last_purged_log_id = on_disk.max(self.pending_purged());
        let last_log_id = self.last_entry_id()?.max(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_RAFT_META), RAFT_VOTE, encode(vote));
        let before = self.audit.mark();
        self.db.write_opt(batch, &opts).map_err(write_err)?;
        self.audit.acknowledged(before, "vote");
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta_get(RAFT_VOTE)
    }

    async fn append<I>(&mut self, entries: I, callback: Flushed) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut sizes = Vec::with_capacity(entries.len());
        for entry in &entries {
            let value = encode(entry);
            sizes.push(value.len());
            batch.put_cf(self.logs(), log_index(entry.log_id.index), value);
        }
        self.db.write(batch).map_err(write_err)?;
        let written = self.audit.mark();
        let mut recent = self.recent.lock().expect("recent entries lock");
        for (entry, bytes) in entries.into_iter().zip(sizes) {
            self.bytes.appended(entry.log_id.index, bytes);
            recent.push(entry, bytes);
        }
        drop(recent);
        if let Err(mpsc::SendError(queued)) = self.flusher.send(Queued { callback, written }) {
            // The flusher only stops with the process; sync inline then.
            flush_group(&self.db, &self.audit, vec![queued]);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Before the log: a reader never finds a removed entry here.
        self.recent.lock().expect("recent entries lock").truncate(log_id.index);
        self.bytes.truncated(log_id.index);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.logs(), log_index(log_id.index), log_index(u64::MAX));
        self.db.write_opt(batch, &opts).map_err(write_err)
    }

    /// Purges now if the state machine's flushed state covers `log_id`
    /// (the usual case: a snapshot, which flushes, comes before a purge);
    /// otherwise hands the purge to the purger thread, which flushes the
    /// state machine first. The flush is never run here: openraft calls
    /// this from its core loop, and a flush of hundreds of MB would stop
    /// heartbeats. Until the deferred purge runs, the entries stay on disk
    /// and `last_purged` keeps its old value, so a crash in between leaves
    /// a log that still covers everything the flushed state lacks.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.recent.lock().expect("recent entries lock").purge(log_id.index);
        self.bytes.purged(log_id.index);
        let durable = match &self.sm {
            Some(sm) => sm.durable_applied().map_err(read_err)?.0 >= log_id.index,
            None => true,
        };
        if durable {
            return purge_now(&self.db, log_id);
        }
        *self.pending_purge.lock().expect("pending purge lock") = Some(log_id);
        if let Err(mpsc::SendError(log_id)) = self.purger.send(log_id) {
            return Err(write_err(std::io::Error::other(format!(
                "the log purger stopped; {log_id} not purged"
            ))));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::model::Event;

    fn entry(index: u64, events: usize) -> Entry {
        let event = Event::bare();
        let requests = Arc::new(vec![vec![event; events]]);
        let payload = EntryPayload::Normal(Command::Write { stamp_ms: 0, requests });
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload }
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
        let mut r = RecentEntries::default();
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
        let mut r = RecentEntries::default();
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
    }

    #[test]
    fn recent_entries_are_bounded_by_count_and_events() {
        let mut r = RecentEntries::default();
        for i in 1..=(RECENT_MAX_ENTRIES as u64 + 10) {
            push(&mut r, entry(i, 1));
        }
        assert_eq!(r.entries.len(), RECENT_MAX_ENTRIES);
        assert_eq!(r.entries.front().unwrap().log_id.index, 11);
        let mut r = RecentEntries::default();
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
        let mut r = RecentEntries::default();
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
        // A single entry over the bound is still kept (it is the newest).
        r.push(entry(4, 1), RECENT_MAX_BYTES + 1);
        assert_eq!(indexes(r.get(4, Some(5), usize::MAX)), Some(vec![4]));
        assert_eq!(r.bytes, RECENT_MAX_BYTES + 1);
    }

    #[test]
    fn recent_entries_cut_a_range_at_the_byte_budget() {
        let mut r = RecentEntries::default();
        for i in 1..=4 {
            r.push(entry(i, 1), 100);
        }
        assert_eq!(indexes(r.get(1, Some(5), 250)), Some(vec![1, 2]));
        assert_eq!(indexes(r.get(1, Some(5), 300)), Some(vec![1, 2, 3]));
        assert_eq!(indexes(r.get(2, Some(5), 10)), Some(vec![2]), "the first entry always goes");
    }

    fn open_log() -> (tempfile::TempDir, LogStore) {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path(), None).unwrap();
        (dir, log)
    }

    #[test]
    fn replication_reads_at_most_the_byte_budget() {
        let (_dir, mut log) = open_log();
        let big = |i| entry(i, 40_000); // about 2.4 MB encoded each
        let size = encode(&big(1)).len();
        let fit = MAX_APPEND_ENTRIES_BYTES / size;
        assert!(fit >= 2, "{size}");
        let entries: Vec<Entry> = (1..=fit as u64 + 3).map(big).collect();
        let batch = entries.iter().fold(WriteBatch::default(), |mut b, e| {
            b.put_cf(log.logs(), log_index(e.log_id.index), encode(e));
            b
        });
        log.db.write(batch).unwrap();
        let end = fit as u64 + 4;
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // From RocksDB (nothing in the recent cache).
        let got = rt.block_on(log.limited_get_log_entries(1, end)).unwrap();
        assert_eq!(got.len(), fit);
        assert_eq!(rt.block_on(log.try_get_log_entries(1..end)).unwrap().len(), fit + 3);
        // From the recent cache.
        for e in entries {
            let bytes = encode(&e).len();
            log.recent.lock().unwrap().push(e, bytes);
        }
        assert_eq!(rt.block_on(log.limited_get_log_entries(1, end)).unwrap().len(), fit);
        assert_eq!(rt.block_on(log.limited_get_log_entries(end - 1, end)).unwrap().len(), 1);
    }

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, crate::store::StateMachine, tempfile::TempDir>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, crate::store::StateMachine), StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let sm = SmStore::open(dir.path()).expect("open state machine");
            let log = LogStore::open(dir.path(), Some(sm.clone())).expect("open log store");
            let state_machine = crate::store::StateMachine::new(sm, dir.path()).expect("snapshot dir");
            Ok((dir, log, state_machine))
        }
    }

    /// openraft's storage suite drives appends (with its real flush
    /// callbacks) and votes; the audit checks every one of them was synced.
    #[test]
    fn every_acknowledged_append_and_vote_follows_a_wal_sync() {
        use std::sync::atomic::Ordering;
        openraft::testing::Suite::test_all(Builder).expect("storage suite");
        let checked = audit::CHECKED.load(Ordering::SeqCst);
        assert!(checked >= 20, "the suite reported only {checked} appends and votes durable");
        let violations = audit::VIOLATIONS.lock().unwrap().clone();
        assert!(violations.is_empty(), "{} of {checked}: {violations:?}", violations.len());
    }
}
