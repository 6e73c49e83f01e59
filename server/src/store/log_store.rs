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
use super::sm_db::{cf, SmStore};
use crate::types::{Command, Entry, LogId, NodeId, StorageError, TypeConfig};

type Flushed = LogFlushed<TypeConfig>;

/// The raft log. Cloning gives another handle to the same log (a reader).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: mpsc::Sender<Flushed>,
    /// Purges that wait for a state-machine flush (see `purge`).
    purger: mpsc::Sender<LogId>,
    sm: Option<Arc<SmStore>>,
    recent: Arc<Mutex<RecentEntries>>,
}

/// The newest entries, as appended: the state machine reads each entry
/// right after its append, and would otherwise decode it back from RocksDB.
/// Always a contiguous suffix of the log (possibly empty): appends extend
/// it, truncation cuts it, purging and the size bound drop its oldest
/// entries. Entries share their payload (`Command::Write` holds an `Arc`),
/// so keeping them costs no copy.
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<Entry>,
    /// Events in `entries` (the bound that matters for memory).
    events: usize,
}

/// At most this many entries, and this many events, are kept.
const RECENT_MAX_ENTRIES: usize = 256;
const RECENT_MAX_EVENTS: usize = 200_000;

fn events_in(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(Command::Write { requests, .. }) => {
            requests.iter().map(Vec::len).sum()
        }
        _ => 0,
    }
}

impl RecentEntries {
    fn push(&mut self, entry: Entry) {
        let follows = self.entries.back().is_none_or(|last| last.log_id.index + 1 == entry.log_id.index);
        if !follows {
            // Not the next index (the log was truncated or purged under us):
            // start again from this entry, which is the log's newest.
            self.entries.clear();
            self.events = 0;
        }
        self.events += events_in(&entry);
        self.entries.push_back(entry);
        while self.entries.len() > RECENT_MAX_ENTRIES
            || (self.events > RECENT_MAX_EVENTS && self.entries.len() > 1)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.events -= events_in(&e);
        }
    }

    /// Drops entries from `index` on.
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|e| e.log_id.index >= index) {
            let e = self.entries.pop_back().expect("checked");
            self.events -= events_in(&e);
        }
    }

    /// Drops entries up to and including `index`.
    fn purge(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= index) {
            self.pop_front();
        }
    }

    /// The entries of `[start, end)` if every one of them is here. An
    /// open end, or one past the newest entry here, is left to RocksDB (an
    /// append may have written newer entries that are not here yet).
    fn get(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let (first, last) = (self.entries.front()?.log_id.index, self.entries.back()?.log_id.index);
        let end = end?;
        if start < first || end > last + 1 {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        Some(self.entries.range((start - first) as usize..(end - first) as usize).cloned().collect())
    }
}

impl LogStore {
    /// Opens the log under `<data>/raft`. `sm`, when given, is persisted
    /// before logs are purged.
    pub fn open(data_dir: &Path, sm: Option<Arc<SmStore>>) -> anyhow::Result<LogStore> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOGS, Options::default()),
            ColumnFamilyDescriptor::new(CF_RAFT_META, Options::default()),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&opts, data_dir.join("raft"), cfs)?);
        check_format(&db, &data_dir.join("raft"))?;
        let (tx, rx) = mpsc::channel();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-fsync".into())
            .spawn(move || flush_loop(&flush_db, rx))
            .expect("spawn log flusher");
        let (purger, purge_rx) = mpsc::channel();
        let (purge_db, purge_sm) = (db.clone(), sm.clone());
        std::thread::Builder::new()
            .name("raft-log-purge".into())
            .spawn(move || purge_loop(&purge_db, purge_sm, purge_rx))
            .expect("spawn log purger");
        Ok(LogStore { db, flusher: tx, purger, sm, recent: Arc::default() })
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

/// Syncs the WAL once per group of queued callbacks.
fn flush_loop(db: &DB, rx: mpsc::Receiver<Flushed>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        let result = db.flush_wal(true);
        for callback in group {
            let outcome = result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
            callback.log_io_completed(outcome);
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
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
        if let Some(entries) = self.recent.lock().expect("recent entries lock").get(start, end) {
            return Ok(entries);
        }
        let mut entries = Vec::new();
        let mode = IteratorMode::From(&log_index(start), Direction::Forward);
        for item in self.db.iterator_cf(self.logs(), mode) {
            let (key, value) = item.map_err(read_err)?;
            let index = parse_log_index(&key).unwrap_or(u64::MAX);
            if !range.contains(&index) {
                break;
            }
            entries.push(decode(&value).map_err(read_err)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.meta_get(RAFT_LAST_PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
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
        self.db.write_opt(batch, &opts).map_err(write_err)
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
        for entry in &entries {
            batch.put_cf(self.logs(), log_index(entry.log_id.index), encode(entry));
        }
        self.db.write(batch).map_err(write_err)?;
        let mut recent = self.recent.lock().expect("recent entries lock");
        for entry in entries {
            recent.push(entry);
        }
        drop(recent);
        if let Err(mpsc::SendError(callback)) = self.flusher.send(callback) {
            // The flusher only stops with the process; sync inline then.
            let outcome = self.db.flush_wal(true).map_err(|e| std::io::Error::other(e.to_string()));
            callback.log_io_completed(outcome);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Before the log: a reader never finds a removed entry here.
        self.recent.lock().expect("recent entries lock").truncate(log_id.index);
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
        let durable = match &self.sm {
            Some(sm) => sm.durable_applied().map_err(read_err)?.0 >= log_id.index,
            None => true,
        };
        if durable {
            return purge_now(&self.db, log_id);
        }
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
        let event = Event {
            user_id: "u".into(),
            family: "browse".into(),
            event_type: "view".into(),
            time_ms: 0,
            event_id: String::new(),
            attrs: Default::default(),
        };
        let requests = Arc::new(vec![vec![event; events]]);
        let payload = EntryPayload::Normal(Command::Write { stamp_ms: 0, requests });
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload }
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|es| es.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn recent_entries_serve_only_ranges_they_hold_whole() {
        let mut r = RecentEntries::default();
        assert_eq!(indexes(r.get(1, Some(2))), None, "empty");
        for i in 5..=9 {
            r.push(entry(i, 1));
        }
        assert_eq!(indexes(r.get(5, Some(10))), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(r.get(7, Some(9))), Some(vec![7, 8]));
        assert_eq!(indexes(r.get(8, Some(8))), Some(vec![]));
        assert_eq!(indexes(r.get(4, Some(6))), None, "starts before the oldest");
        assert_eq!(indexes(r.get(8, Some(11))), None, "ends past the newest");
        assert_eq!(indexes(r.get(8, None)), None, "open end");
    }

    #[test]
    fn recent_entries_stay_a_suffix_of_the_log() {
        let mut r = RecentEntries::default();
        for i in 1..=6 {
            r.push(entry(i, 2));
        }
        r.truncate(5);
        assert_eq!(indexes(r.get(1, Some(5))), Some(vec![1, 2, 3, 4]));
        assert_eq!(indexes(r.get(1, Some(6))), None, "5 was truncated");
        r.push(entry(5, 2));
        assert_eq!(indexes(r.get(4, Some(6))), Some(vec![4, 5]));
        r.purge(2);
        assert_eq!(indexes(r.get(2, Some(4))), None, "2 was purged");
        assert_eq!(indexes(r.get(3, Some(6))), Some(vec![3, 4, 5]));
        assert_eq!(r.events, 6);
        // An append that does not follow (the log changed under us) restarts.
        r.push(entry(9, 1));
        assert_eq!(indexes(r.get(3, Some(6))), None);
        assert_eq!(indexes(r.get(9, Some(10))), Some(vec![9]));
        assert_eq!(r.events, 1);
    }

    #[test]
    fn recent_entries_are_bounded_by_count_and_events() {
        let mut r = RecentEntries::default();
        for i in 1..=(RECENT_MAX_ENTRIES as u64 + 10) {
            r.push(entry(i, 1));
        }
        assert_eq!(r.entries.len(), RECENT_MAX_ENTRIES);
        assert_eq!(r.entries.front().unwrap().log_id.index, 11);
        let mut r = RecentEntries::default();
        r.push(entry(1, RECENT_MAX_EVENTS / 2));
        r.push(entry(2, RECENT_MAX_EVENTS / 2));
        r.push(entry(3, 10));
        assert_eq!(indexes(r.get(2, Some(4))), Some(vec![2, 3]), "the oldest went over the event bound");
        assert_eq!(r.events, RECENT_MAX_EVENTS / 2 + 10);
        // A single entry over the bound is still kept (it is the newest).
        r.push(entry(4, RECENT_MAX_EVENTS + 1));
        assert_eq!(indexes(r.get(4, Some(5))), Some(vec![4]));
    }
}
