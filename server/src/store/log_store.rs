//! One raft group's log: openraft's log storage (`RaftLogStorage`,
//! `RaftLogReader`) over the group's key range of the node's
//! [`LogEngine`](super::log_engine::LogEngine), which owns the database,
//! the fsync and purge threads and the memory budget shared by all groups.
//!
//! Durability: entries are written without a sync, then the openraft flush
//! callback goes to the engine's fsync thread, which syncs the WAL once for
//! every callback queued meanwhile, of any group (group commit across
//! shards), before reporting them flushed. Votes and truncations are synced
//! writes. The state machine applies without a WAL (this log is its
//! write-ahead log): a group's log is purged only up to what its
//! [`PurgeGuard`]'s flushed state covers (a purge past it waits on the
//! engine's purge thread for a flush), so applied state never depends on a
//! purged entry.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, Vote};
use rocksdb::{IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use super::codec::{decode, encode, read_err, write_err};
use super::keys::*;
use super::log_bytes::LogBytes;
use super::log_engine::{read_meta, write_bridge, PurgeGuard, Queued, Shared};
use super::recent::{Budget, RecentBudget, RecentEntries};
use super::sm_db::cf;
use crate::limits::MAX_APPEND_ENTRIES_BYTES;
use crate::types::{Entry, GroupId, LogId, NodeId, StorageError, TypeConfig};

type Flushed = LogFlushed<TypeConfig>;

/// The raft log of one group. Cloning gives another handle to the same
/// group's log (a reader).
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<Shared>,
    group: Arc<Group>,
}

/// A group's state in memory, shared by its handles.
pub(super) struct Group {
    pub(super) gid: GroupId,
    guard: Option<Arc<dyn PurgeGuard>>,
    recent: Mutex<RecentEntries>,
    /// A purge handed to the purge thread and not yet on disk: openraft
    /// counts it purged at once, so the log answers as if it were (after
    /// a crash it is simply forgotten, and the log covers more: safe).
    pending_purge: Mutex<Option<LogId>>,
    bridge: Mutex<Bridge>,
    bytes: Arc<LogBytes>,
}

/// A deferred purge that skips past the log's last stored entry: openraft
/// accepted a snapshot whose install is not durable yet. Entries appended
/// after it are written, but their flush callbacks wait here until the
/// purge is on disk: acknowledged before, a crash would leave a log with a
/// hole after the old entries, on a state that lacks the snapshot (see
/// [`RAFT_BRIDGE`] for the repair at open). The purge lands as soon as the
/// install is on disk (`purge_covered`, else the purge thread, which retries
/// a failed purge).
///
/// openraft 0.9.25 never appends in that window: its core runs the
/// commands after an install only once the install's response is sent,
/// which waits for the install (so it also waits for each append's
/// callback, and a held one would stop the group until the purge lands).
/// The bridge is a guard that keeps the log safe without relying on that
/// order.
#[derive(Default)]
struct Bridge {
    /// The purge's index, while it is not on disk.
    upto: Option<u64>,
    /// Appends written past it, in order.
    held: Vec<Queued>,
}

impl Group {
    pub(super) fn new(gid: GroupId, guard: Option<Arc<dyn PurgeGuard>>, budget: &Arc<RecentBudget>) -> Group {
        Group {
            gid,
            guard,
            recent: Mutex::new(RecentEntries::new(budget.clone())),
            pending_purge: Mutex::default(),
            bridge: Mutex::default(),
            bytes: Arc::default(),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        self.recent.lock().expect("recent entries lock")
    }

    fn pending_purged(&self) -> Option<LogId> {
        *self.pending_purge.lock().expect("pending purge lock")
    }

    fn bridge(&self) -> std::sync::MutexGuard<'_, Bridge> {
        self.bridge.lock().expect("bridge lock")
    }

    /// Keeps an append's callback while a bridge is open; else gives it back.
    pub(super) fn hold(&self, queued: Queued) -> Option<Queued> {
        let mut bridge = self.bridge();
        match bridge.upto {
            Some(upto) => {
                if bridge.held.is_empty() {
                    tracing::info!(
                        group = %self.gid,
                        snapshot_index = upto,
                        "entries appended after a snapshot whose install is not durable yet wait for it \
                         before they are acknowledged"
                    );
                }
                bridge.held.push(queued);
                None
            }
            None => Some(queued),
        }
    }

    /// A purge up to `purged` is on disk: the appends a bridge it lands
    /// held, in order (to be synced and acknowledged).
    pub(super) fn release(&self, purged: u64) -> Vec<Queued> {
        let mut bridge = self.bridge();
        match bridge.upto {
            Some(upto) if upto <= purged => {
                bridge.upto = None;
                std::mem::take(&mut bridge.held)
            }
            _ => Vec::new(),
        }
    }
}

impl LogStore {
    pub(super) fn new(engine: Arc<Shared>, group: Arc<Group>) -> LogStore {
        LogStore { engine, group }
    }

    /// The group this log belongs to.
    pub fn group_id(&self) -> GroupId {
        self.group.gid
    }

    /// The log's byte ledger, for the snapshot and retention policy.
    pub fn log_bytes(&self) -> Arc<LogBytes> {
        self.group.bytes.clone()
    }

    fn logs(&self) -> &rocksdb::ColumnFamily {
        cf(&self.engine.db, CF_LOGS)
    }

    fn meta_key(&self, kind: u8) -> [u8; 5] {
        raft_meta(self.group.gid, kind)
    }

    fn meta_get<T: serde::de::DeserializeOwned>(&self, kind: u8) -> Result<Option<T>, StorageError> {
        read_meta(&self.engine.db, self.group.gid, kind)
    }

    /// Read options bounded to this group's entries from `index` on.
    fn bounded_from(&self, index: u64) -> ReadOptions {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(log_key(self.group.gid, index));
        opts.set_iterate_upper_bound(log_group_end(self.group.gid));
        opts
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let opts = self.bounded_from(0);
        match self.engine.db.iterator_cf_opt(self.logs(), opts, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(read_err)?;
                let entry: Entry = decode(&value).map_err(read_err)?;
                Ok(Some(entry.log_id))
            }
        }
    }

    /// The entries of `range`, cut after the first entry that reaches
    /// `budget` encoded bytes (the stored value is the encoding).
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
        if let Some(entries) = self.group.recent().get(start, end, budget) {
            return Ok(entries);
        }
        let mut entries = Vec::new();
        let mut budget = Budget::new(budget);
        // Entries a deferred purge removes are gone for openraft already.
        let purged = self.group.pending_purged().max(self.meta_get(RAFT_LAST_PURGED)?);
        let from = start.max(purged.map_or(0, |l: LogId| l.index + 1));
        let opts = self.bounded_from(from);
        for item in self.engine.db.iterator_cf_opt(self.logs(), opts, IteratorMode::Start) {
            let (key, value) = item.map_err(read_err)?;
            let index = parse_log_key(&key).map_or(u64::MAX, |(_, i)| i);
            if !range.contains(&index) || !budget.take(value.len()) {
                break;
            }
            // Entries are contiguous, from the one after the purge mark if
            // there is one: a hole is corruption, never skipped (a follower
            // sent entries after it would apply a gap), at the start of the
            // range too.
            let first = if purged.is_some() { from } else { index };
            let expected = entries.last().map_or(first, |e: &Entry| e.log_id.index + 1);
            if index != expected {
                return Err(read_err(std::io::Error::other(format!(
                    "{}: log entry {expected} is missing (the next stored entry is {index})",
                    self.group.gid
                ))));
            }
            entries.push(decode(&value).map_err(read_err)?);
        }
        Ok(entries)
    }

    /// Runs the group's deferred purge now if its flushed state covers it
    /// (a snapshot install has just put its state on disk); otherwise it
    /// stays with the engine's purge thread.
    pub fn purge_covered(&self) -> Result<(), StorageError> {
        let (Some(pending), Some(guard)) = (self.group.pending_purged(), &self.group.guard) else {
            return Ok(());
        };
        let durable = guard.durable_index().map_err(|e| read_err(std::io::Error::other(format!("{e:#}"))))?;
        match durable >= pending.index {
            true => self.engine.purge_now(&self.group, pending),
            false => Ok(()),
        }
    }

    /// A synced write of `batch`, checked by the sync audit as `what`.
    /// A synced write (a vote, a truncation), on the blocking pool: an
    /// fsync takes milliseconds, and openraft calls these from its core
    /// loop on a runtime worker, which would stall every other group's
    /// tasks queued on that worker (an election moves many groups' votes at
    /// once). openraft awaits the call, so the group's order is kept.
    async fn write_synced(&self, batch: WriteBatch, what: &'static str) -> Result<(), StorageError> {
        let engine = self.engine.clone();
        let write = move || {
            let mut opts = WriteOptions::default();
            opts.set_sync(true);
            let before = engine.syncer.audit.mark();
            engine.db.write_opt(batch, &opts).map_err(super::log_engine::synced_write_failed)?;
            engine.syncer.audit.acknowledged(before, what);
            Ok(())
        };
        tokio::task::spawn_blocking(write).await.map_err(write_err)?
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
        let last_purged_log_id = on_disk.max(self.group.pending_purged());
        let last_log_id = self.last_entry_id()?.max(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.engine.db, CF_RAFT_META), self.meta_key(RAFT_VOTE), encode(vote));
        self.write_synced(batch, "vote").await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        // A replica placed here again starts from the vote it had when it
        // was dropped (see `RAFT_RETIRED_VOTE`).
        match self.meta_get(RAFT_VOTE)? {
            Some(vote) => Ok(Some(vote)),
            None => self.meta_get(RAFT_RETIRED_VOTE),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: Flushed) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        #[cfg(feature = "fault-injection")]
        if self.engine.fail_appends_marker.exists() {
            return Err(write_err(std::io::Error::other(format!(
                "fault injection: log appends fail ({} is in the data dir)",
                super::log_engine::FAIL_APPENDS_MARKER
            ))));
        }
        let gid = self.group.gid;
        let mut batch = WriteBatch::default();
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut sizes = Vec::with_capacity(entries.len());
        for entry in &entries {
            let value = encode(entry);
            sizes.push(value.len());
            batch.put_cf(self.logs(), log_key(gid, entry.log_id.index), value);
        }
        self.engine.db.write(batch).map_err(write_err)?;
        let written = self.engine.syncer.audit.mark();
        let mut recent = self.group.recent();
        for (entry, bytes) in entries.into_iter().zip(sizes) {
            self.group.bytes.appended(entry.log_id.index, bytes);
            recent.push(entry, bytes);
        }
        drop(recent);
        self.engine.queue_sync(&self.group, callback, written);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Before the log: a reader never finds a removed entry here.
        self.group.recent().truncate(log_id.index);
        self.group.bytes.truncated(log_id.index);
        let gid = self.group.gid;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.logs(), &log_key(gid, log_id.index)[..], &log_group_end(gid)[..]);
        self.write_synced(batch, "truncate").await
    }

    /// Purges now if the guard's flushed state covers `log_id` (the usual
    /// case: a snapshot, which flushes, comes before a purge); otherwise
    /// hands the purge to the engine's purge thread, which flushes the
    /// state first. The flush is never run here: openraft calls this from
    /// its core loop, and a flush of hundreds of MB would stop heartbeats.
    /// Until the deferred purge runs, the entries stay on disk and
    /// `last_purged` keeps its old value, so a crash in between leaves a
    /// log that still covers everything the flushed state lacks. A deferred
    /// purge past the last stored entry (a snapshot accepted) also opens a
    /// [`Bridge`]: appends wait for it to be on disk before they are
    /// acknowledged.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.group.recent().purge(log_id.index);
        self.group.bytes.purged(log_id.index);
        // On the blocking pool: a read of the flushed state (and for the
        // meta group, a WAL sync) is no work for openraft's core loop.
        let durable = match self.group.guard.clone() {
            Some(guard) => Some(
                tokio::task::spawn_blocking(move || guard.durable_index())
                    .await
                    .map_err(write_err)?
                    .map_err(|e| read_err(std::io::Error::other(format!("{e:#}"))))?,
            ),
            None => None,
        };
        let deferred = match (&self.group.guard, durable) {
            (Some(guard), Some(durable)) if durable < log_id.index => guard.clone(),
            // On the blocking pool: it takes the node's purge lock, which a
            // bridge's synced write (another group's) may hold.
            _ => {
                let (engine, group) = (self.engine.clone(), self.group.clone());
                return tokio::task::spawn_blocking(move || engine.purge_now(&group, log_id))
                    .await
                    .map_err(write_err)?;
            }
        };
        if self.last_entry_id()?.is_none_or(|last| last.index < log_id.index) {
            // Synced, on the blocking pool (see `write_synced`).
            let (db, gid) = (self.engine.db.clone(), self.group.gid);
            tokio::task::spawn_blocking(move || write_bridge(&db, gid, log_id.index))
                .await
                .map_err(write_err)??;
            let mut bridge = self.group.bridge();
            bridge.upto = bridge.upto.max(Some(log_id.index));
        }
        *self.group.pending_purge.lock().expect("pending purge lock") = Some(log_id);
        self.engine.defer_purge(&self.group, deferred, log_id)
    }
}

#[cfg(test)]
pub(crate) mod tests;
