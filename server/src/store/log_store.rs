//! The raft log store on RocksDB (`<data>/raft`).
//!
//! Durability: entries are written without a sync, then the openraft flush
//! callback is handed to a flusher thread that syncs the WAL once for every
//! callback queued meanwhile (group commit) before reporting them flushed.
//! Votes are written with a synced write. The state machine applies without
//! a WAL (this log is its write-ahead log): before logs are purged, its
//! memtables are flushed, so applied state never depends on a purged entry.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, Vote};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::codec::{decode, encode, read_err, write_err};
use super::keys::*;
use super::sm_db::{cf, SmStore};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

type Flushed = LogFlushed<TypeConfig>;

/// The raft log. Cloning gives another handle to the same log (a reader).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: mpsc::Sender<Flushed>,
    sm: Option<Arc<SmStore>>,
}

impl LogStore {
    /// Opens the log under `<data>/raft`. `sm`, when given, is persisted
    /// before logs are purged.
    pub fn open(data_dir: &Path, sm: Option<Arc<SmStore>>) -> Result<LogStore, rocksdb::Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOGS, Options::default()),
            ColumnFamilyDescriptor::new(CF_RAFT_META, Options::default()),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&opts, data_dir.join("raft"), cfs)?);
        let (tx, rx) = mpsc::channel();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-fsync".into())
            .spawn(move || flush_loop(&flush_db, rx))
            .expect("spawn log flusher");
        Ok(LogStore { db, flusher: tx, sm })
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
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
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
        for entry in entries {
            batch.put_cf(self.logs(), log_index(entry.log_id.index), encode(&entry));
        }
        self.db.write(batch).map_err(write_err)?;
        if let Err(mpsc::SendError(callback)) = self.flusher.send(callback) {
            // The flusher only stops with the process; sync inline then.
            let outcome = self.db.flush_wal(true).map_err(|e| std::io::Error::other(e.to_string()));
            callback.log_io_completed(outcome);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.logs(), log_index(log_id.index), log_index(u64::MAX));
        self.db.write_opt(batch, &opts).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        if let Some(sm) = &self.sm {
            sm.persist().map_err(write_err)?;
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_RAFT_META), RAFT_LAST_PURGED, encode(&log_id));
        batch.delete_range_cf(self.logs(), log_index(0), log_index(log_id.index + 1));
        self.db.write(batch).map_err(write_err)
    }
}
