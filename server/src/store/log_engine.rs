//! The node's raft log engine: one RocksDB (`<data>/raft`) for the logs of
//! every raft group on the node (shards and the meta group), with ONE fsync
//! thread and ONE purge thread for all of them, and one byte budget for the
//! recent entries all groups keep in memory. [`LogEngine::group`] hands out
//! a group's [`LogStore`], openraft's log storage for exactly that group.
//!
//! Durability: an append of any group is written without a sync and its
//! openraft callback queued to the fsync thread, which syncs the WAL once
//! for every callback queued meanwhile, whatever their groups, before
//! reporting them flushed: one fsync serves many shards' appends. Votes
//! and truncations are synced writes.
//!
//! Keys start with the group id (`keys::log_key`, `keys::raft_meta`), so a
//! group's log is one key range: every read and delete of a group is bounded
//! to that range, and [`LogEngine::drop_group`] removes a group whole.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};

use super::codec::{decode, encode, read_err, write_err};
use super::keys::*;
use super::log_store::{Group, LogStore};
use super::recent::RecentBudget;
use super::sm_db::{cf, SmStore};
use super::sync_audit as audit;
use super::threads::Joined;
use crate::limits::MAX_RECENT_ENTRY_BYTES;
use crate::types::{GroupId, LogId, StorageError, TypeConfig};

/// What must be durable before a group's log is purged: the state machine
/// the log is the write-ahead log of (it applies without a WAL).
pub trait PurgeGuard: Send + Sync {
    /// The newest log index the state's flushed (on-disk) part covers.
    fn durable_index(&self) -> anyhow::Result<u64>;
    /// Flushes the state, so it covers everything applied.
    fn persist(&self) -> anyhow::Result<()>;
    /// The newest log index the state holds, flushed or not: a flush
    /// covers no more than this.
    fn applied_index(&self) -> u64;
}

impl PurgeGuard for SmStore {
    fn durable_index(&self) -> anyhow::Result<u64> {
        Ok(self.durable_applied()?.0)
    }

    fn applied_index(&self) -> u64 {
        self.applied().last_applied.map_or(0, |l| l.index)
    }

    fn persist(&self) -> anyhow::Result<()> {
        Ok(SmStore::persist(self)?)
    }
}

/// The node's log engine. Cheap to clone; the database and the threads
/// live until the engine and every group's store are dropped.
#[derive(Clone)]
pub struct LogEngine {
    shared: Arc<Shared>,
}

/// Fault injection (the `fault-injection` build only): while a file of
/// this name is in the data dir, every raft log append fails, as on a full
/// or failing disk.
#[cfg(feature = "fault-injection")]
pub const FAIL_APPENDS_MARKER: &str = "fault-fail-log-appends";

/// What the engine and every group's store share.
pub(super) struct Shared {
    pub(super) db: Arc<DB>,
    pub(super) syncer: Arc<Syncer>,
    flusher: mpsc::Sender<Queued>,
    purger: mpsc::Sender<PurgeJob>,
    pub(super) recent: Arc<RecentBudget>,
    /// Fault injection (tests): while this file exists, log appends fail.
    #[cfg(feature = "fault-injection")]
    pub(super) fail_appends_marker: std::path::PathBuf,
    /// The open groups. Its lock also orders deferred purges with
    /// `drop_group`, so a purge never writes into a dropped group.
    open: Arc<Mutex<HashMap<GroupId, Weak<Group>>>>,
    /// The fsync and purge threads. Last: the senders above drop first, so
    /// the threads see their channels close, end, and are joined here.
    _threads: Joined,
}

/// The raft log engine's WAL files, all together, before RocksDB flushes
/// the column family that keeps the oldest one alive.
pub const MAX_LOG_WAL_BYTES: u64 = 256 << 20;

impl LogEngine {
    /// Opens (or creates) the engine under `<data>/raft`.
    pub fn open(data_dir: &Path) -> anyhow::Result<LogEngine> {
        LogEngine::open_with(data_dir, RecentBudget::new(MAX_RECENT_ENTRY_BYTES))
    }

    fn open_with(data_dir: &Path, recent: Arc<RecentBudget>) -> anyhow::Result<LogEngine> {
        let path = data_dir.join("raft");
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let audit = audit::Audit::new(&mut opts);
        // The `raft_meta` family takes a few small writes (votes, purge
        // marks) and seldom fills a memtable, so its oldest write keeps
        // every WAL file since alive: by RocksDB's default bound, up to
        // about 1.5 GiB of WAL, all read back at a restart. Past this,
        // RocksDB flushes the family holding the oldest WAL file.
        opts.set_max_total_wal_size(MAX_LOG_WAL_BYTES);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOGS, Options::default()),
            ColumnFamilyDescriptor::new(CF_RAFT_META, Options::default()),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&opts, &path, cfs)?);
        super::format::check_or_init(&db, &path, CF_RAFT_META, RAFT_FORMAT, &[CF_LOGS, CF_RAFT_META])?;
        let syncer =
            Arc::new(Syncer { db: db.clone(), audit, syncs: AtomicU64::default(), hold: Mutex::default() });
        let open = Arc::new(Mutex::new(HashMap::new()));
        let threads = Joined::default();
        let (flusher, flush_rx) = mpsc::channel();
        let flush_syncer = syncer.clone();
        threads.spawn("raft-log-fsync", move || flush_loop(&flush_syncer, flush_rx));
        let (purger, purge_rx) = mpsc::channel();
        let (purge_db, purge_open, released) = (db.clone(), open.clone(), flusher.clone());
        threads.spawn("raft-log-purge", move || purge_loop(&purge_db, &purge_open, &released, purge_rx));
        let shared = Shared {
            db,
            syncer,
            flusher,
            purger,
            recent,
            open,
            #[cfg(feature = "fault-injection")]
            fail_appends_marker: data_dir.join(FAIL_APPENDS_MARKER),
            _threads: threads,
        };
        Ok(LogEngine { shared: Arc::new(shared) })
    }

    /// The log of group `gid`, as openraft's log storage. `guard`, when
    /// given, is persisted before the group's log is purged past what it
    /// covers. One store per group at a time (clones are its readers): a
    /// group already open is refused.
    pub fn group(&self, gid: GroupId, guard: Option<Arc<dyn PurgeGuard>>) -> anyhow::Result<LogStore> {
        let mut open = self.shared.open.lock().expect("open groups lock");
        if open.get(&gid).is_some_and(|g| g.strong_count() > 0) {
            anyhow::bail!("the raft log of {gid} is already open");
        }
        open.retain(|_, g| g.strong_count() > 0);
        repair_bridge(&self.shared.db, gid).with_context(|| format!("opening the raft log of {gid}"))?;
        let group = Arc::new(Group::new(gid, guard, &self.shared.recent));
        open.insert(gid, Arc::downgrade(&group));
        Ok(LogStore::new(self.shared.clone(), group))
    }

    /// Deletes everything of group `gid` (its entries, vote and last purged
    /// id), with a synced write: a replica removed from this node. Its vote
    /// is kept aside ([`RAFT_RETIRED_VOTE`], which [`LogEngine::groups`]
    /// does not count), so a replica placed here again cannot vote twice
    /// in a term. The group must not be open (its raft shut down, its
    /// stores dropped).
    pub fn drop_group(&self, gid: GroupId) -> anyhow::Result<()> {
        self.delete_log(gid, &[RAFT_VOTE, RAFT_LAST_PURGED, RAFT_BRIDGE])
            .with_context(|| format!("dropping the raft log of {gid}"))
    }

    /// Empties group `gid`'s log (its entries and purge mark) but keeps its
    /// vote, so the node cannot vote twice in a term: the group then
    /// starts as a replica that has nothing, and its leader sends it a
    /// snapshot. For a group whose state was wiped at open.
    pub fn reset_log(&self, gid: GroupId) -> anyhow::Result<()> {
        self.delete_log(gid, &[RAFT_LAST_PURGED, RAFT_BRIDGE])
            .with_context(|| format!("emptying the raft log of {gid}"))
    }

    /// Deletes `gid`'s entries and its `raft_meta` keys of `kinds` (synced);
    /// refused while the group's log is open.
    fn delete_log(&self, gid: GroupId, kinds: &[u8]) -> anyhow::Result<()> {
        let open = self.shared.open.lock().expect("open groups lock");
        if open.get(&gid).is_some_and(|g| g.strong_count() > 0) {
            anyhow::bail!("the raft log of {gid} is open; shut its raft down first");
        }
        let db = &self.shared.db;
        let mut batch = WriteBatch::default();
        if kinds.contains(&RAFT_VOTE) {
            if let Some(vote) = db.get_cf(cf(db, CF_RAFT_META), raft_meta(gid, RAFT_VOTE))? {
                batch.put_cf(cf(db, CF_RAFT_META), raft_meta(gid, RAFT_RETIRED_VOTE), vote);
            }
        }
        batch.delete_range_cf(cf(db, CF_LOGS), &log_key(gid, 0)[..], &log_group_end(gid)[..]);
        // Key by key, not a range: a range of 5-byte keys could hold the
        // node-level format key for some group id.
        for &kind in kinds {
            batch.delete_cf(cf(db, CF_RAFT_META), raft_meta(gid, kind));
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        // A failed fsync stops the node here too (see `fsync_failed`).
        db.write_opt(batch, &sync).map_err(synced_write_failed)?;
        Ok(())
    }

    /// The groups with anything in the engine (a vote, a purge mark or
    /// entries; a dropped replica's retired vote does not count), in order:
    /// the replicas this node held when it stopped.
    pub fn groups(&self) -> anyhow::Result<Vec<GroupId>> {
        let db = &self.shared.db;
        let mut groups = BTreeSet::new();
        for item in db.iterator_cf(cf(db, CF_RAFT_META), IteratorMode::Start) {
            let (key, _) = item?;
            if key.last() != Some(&RAFT_RETIRED_VOTE) {
                groups.extend(parse_raft_meta(&key));
            }
        }
        // One seek per group with entries: the first key at or after `next`.
        let mut next = Some(GroupId(0));
        while let Some(from) = next {
            let mut opts = ReadOptions::default();
            opts.set_iterate_lower_bound(log_key(from, 0));
            let Some(item) = db.iterator_cf_opt(cf(db, CF_LOGS), opts, IteratorMode::Start).next() else {
                break;
            };
            let Some((gid, _)) = parse_log_key(&item?.0) else { break };
            groups.insert(gid);
            next = gid.0.checked_add(1).map(GroupId);
        }
        Ok(groups.into_iter().collect())
    }

    /// WAL syncs of the fsync thread since the engine opened (each one
    /// acknowledges every append queued before it, of any group).
    pub fn fsyncs(&self) -> u64 {
        self.shared.syncer.syncs.load(Ordering::Relaxed)
    }

    /// Encoded bytes of recent entries kept in memory by all groups.
    pub fn recent_bytes(&self) -> usize {
        self.shared.recent.used()
    }
}

impl Shared {
    /// Hands an append's callback to the fsync thread, unless its group
    /// holds it behind a purge that skips past the log's end.
    pub(super) fn queue_sync(&self, group: &Group, callback: Flushed, written: audit::Mark) {
        if let Some(queued) = group.hold(Queued { callback, written }) {
            self.send_sync(queued);
        }
    }

    fn send_sync(&self, queued: Queued) {
        if let Err(mpsc::SendError(queued)) = self.flusher.send(queued) {
            // The flusher only stops with the engine; sync inline then.
            self.syncer.sync_and_ack(vec![queued]);
        }
    }

    /// Purges `group`'s log up to `log_id` now, then lets the appends its
    /// bridge held (if this purge lands it) go to the fsync thread.
    pub(super) fn purge_now(&self, group: &Group, log_id: LogId) -> Result<(), StorageError> {
        purge_and_release(&self.db, group, log_id, |queued| self.send_sync(queued))
    }

    /// Hands a purge that waits for `guard` to the purge thread.
    pub(super) fn defer_purge(
        &self,
        group: &Arc<Group>,
        guard: Arc<dyn PurgeGuard>,
        log_id: LogId,
    ) -> Result<(), StorageError> {
        let job = PurgeJob { gid: group.gid, log_id, guard, group: Arc::downgrade(group), flushed: None };
        self.purger.send(job).map_err(|e| {
            write_err(std::io::Error::other(format!(
                "the log purger stopped; {} of {} not purged",
                e.0.log_id, e.0.gid
            )))
        })
    }
}

/// Removes `gid`'s entries up to `log_id` and records it as the last purged
/// (and, in the same write, clears a bridge it lands: see [`RAFT_BRIDGE`]).
/// Never moves the last purged id back: a purge runs either at once (in
/// openraft's core loop) or later on the purger thread, and a deferred
/// purge that finishes after a newer immediate one must not record the
/// older id over it (the log would then claim entries it deleted).
fn purge_now(db: &DB, gid: GroupId, log_id: LogId) -> Result<(), StorageError> {
    let _purging = PURGING.lock().expect("purge lock");
    let recorded: Option<LogId> = read_meta(db, gid, RAFT_LAST_PURGED)?;
    if recorded.is_some_and(|r| r.index >= log_id.index) {
        return Ok(());
    }
    let meta = cf(db, CF_RAFT_META);
    let mut batch = WriteBatch::default();
    batch.put_cf(meta, raft_meta(gid, RAFT_LAST_PURGED), encode(&log_id));
    batch.delete_range_cf(cf(db, CF_LOGS), &log_key(gid, 0)[..], &log_key_after(gid, log_id.index)[..]);
    let bridge: Option<u64> = read_meta(db, gid, RAFT_BRIDGE)?;
    if bridge.is_some_and(|b| b <= log_id.index) {
        batch.delete_cf(meta, raft_meta(gid, RAFT_BRIDGE));
    }
    db.write(batch).map_err(super::codec::write_err)
}

/// [`purge_now`], then hands the appends the group's bridge held (if this
/// purge lands it) to `release`, in order.
fn purge_and_release(
    db: &DB,
    group: &Group,
    log_id: LogId,
    release: impl FnMut(Queued),
) -> Result<(), StorageError> {
    purge_now(db, group.gid, log_id)?;
    group.release(log_id.index).into_iter().for_each(release);
    Ok(())
}

/// Orders the read-compare-writes of purge marks and bridges: a purge's
/// batch deletes the bridge it read, never a newer one written meanwhile.
static PURGING: Mutex<()> = Mutex::new(());

/// Records (synced) that `gid`'s log is purged up to `index`, past its last
/// stored entry, before that purge is on disk: see [`RAFT_BRIDGE`].
pub(super) fn write_bridge(db: &DB, gid: GroupId, index: u64) -> Result<(), StorageError> {
    let _purging = PURGING.lock().expect("purge lock");
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.put_cf_opt(cf(db, CF_RAFT_META), raft_meta(gid, RAFT_BRIDGE), encode(&index), &sync)
        .map_err(synced_write_failed)
}

/// `gid`'s `raft_meta` value of `kind`, decoded.
pub(super) fn read_meta<T: serde::de::DeserializeOwned>(
    db: &DB,
    gid: GroupId,
    kind: u8,
) -> Result<Option<T>, StorageError> {
    let raw = db.get_cf(cf(db, CF_RAFT_META), raft_meta(gid, kind)).map_err(read_err)?;
    raw.map(|b| decode(&b).map_err(read_err)).transpose()
}

/// At open: a bridge whose purge never reached the disk (a crash while a
/// snapshot's install was not durable yet) leaves the old log, then a hole,
/// then the entries appended after the snapshot. None of those was ever
/// acknowledged (their flush callbacks wait for the purge), so they are
/// dropped: the log ends where it ended before the snapshot, and the state
/// it joins is the old one (or, if the install did finish, openraft purges
/// up to the installed state at start).
fn repair_bridge(db: &DB, gid: GroupId) -> anyhow::Result<()> {
    let Some(bridge): Option<u64> = read_meta(db, gid, RAFT_BRIDGE)? else { return Ok(()) };
    let purged: Option<LogId> = read_meta(db, gid, RAFT_LAST_PURGED)?;
    let mut batch = WriteBatch::default();
    batch.delete_cf(cf(db, CF_RAFT_META), raft_meta(gid, RAFT_BRIDGE));
    if purged.is_none_or(|p| p.index < bridge) {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(log_key(gid, bridge.saturating_add(1)));
        opts.set_iterate_upper_bound(log_group_end(gid));
        let dropped = db.iterator_cf_opt(cf(db, CF_LOGS), opts, IteratorMode::Start).count();
        tracing::warn!(
            %gid,
            snapshot_index = bridge,
            dropped,
            "a snapshot install did not finish before the node stopped: the unacknowledged entries \
             appended after the snapshot are dropped, and the leader sends the snapshot again"
        );
        batch.delete_range_cf(cf(db, CF_LOGS), &log_key_after(gid, bridge)[..], &log_group_end(gid)[..]);
    }
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync).map_err(synced_write_failed)?;
    Ok(())
}

/// A purge waiting for its group's state to be flushed.
struct PurgeJob {
    gid: GroupId,
    log_id: LogId,
    guard: Arc<dyn PurgeGuard>,
    /// Gone once the group is closed: the purge is then forgotten, as after
    /// a crash (the log just covers more), and never races `drop_group`.
    group: Weak<Group>,
    /// When the purge thread last flushed the state for this purge.
    flushed: Option<Instant>,
}

/// How often a deferred purge that its group's flushed state does not
/// cover yet is looked at again.
const PURGE_RETRY: Duration = Duration::from_millis(500);

/// How often a waiting purge flushes its group's state again.
const PURGE_REFLUSH: Duration = Duration::from_secs(10);

/// Deferred purges, in order: flush the group's state, then purge. Purges
/// queued meanwhile are coalesced per group (the newest covers the others),
/// and a group's state is flushed only if what is on disk does not cover
/// the purge yet: the groups share one state database, whose flush covers
/// them all, so a round of many groups' purges flushes about once.
///
/// A purge that the flushed state still does not cover after the flush
/// waits, and is tried again every [`PURGE_RETRY`] (or when a newer purge of
/// its group comes): openraft purges up to a snapshot it has just received
/// as soon as it hands the snapshot to the state machine, before the
/// install has run. Purging then would leave a crash during the install
/// with a log that starts past the state. The install records the
/// snapshot's index as applied when it is on disk; the purge runs then.
/// A group closed meanwhile drops its purge (the log just covers more).
fn purge_loop(
    db: &DB,
    open: &Mutex<HashMap<GroupId, Weak<Group>>>,
    release_to: &mpsc::Sender<Queued>,
    rx: mpsc::Receiver<PurgeJob>,
) {
    let mut jobs: BTreeMap<GroupId, PurgeJob> = BTreeMap::new();
    loop {
        let first = if jobs.is_empty() {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(PURGE_RETRY) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        for job in first.into_iter().chain(rx.try_iter()) {
            // A queued job of the same open group at or past this one
            // covers it; one of a closed incarnation of the group (dropped
            // and placed here again meanwhile) covers nothing.
            match jobs.get(&job.gid) {
                Some(queued)
                    if queued.log_id.index >= job.log_id.index && Weak::ptr_eq(&queued.group, &job.group) => {
                }
                _ => drop(jobs.insert(job.gid, job)),
            }
        }
        // The groups share one state database: one flush a round covers
        // them all.
        let mut flushed = false;
        let mut waiting = BTreeMap::new();
        for (gid, mut job) in std::mem::take(&mut jobs) {
            if job.group.strong_count() == 0 {
                continue;
            }
            let covered = |job: &PurgeJob| match job.guard.durable_index() {
                Ok(durable) => durable >= job.log_id.index,
                Err(e) => {
                    tracing::warn!(error = %e, %gid, log_id = %job.log_id, "reading the flushed state before a log purge; tried again");
                    false
                }
            };
            // A flush helps only once the state has applied the purge's
            // index (a snapshot waiting for its install has not; the
            // install makes its own state durable), and a job still
            // waiting flushes again only now and then.
            let due = job.flushed.is_none_or(|at| at.elapsed() >= PURGE_REFLUSH);
            let helps = job.guard.applied_index() >= job.log_id.index;
            if !covered(&job) && due && helps && !flushed {
                job.flushed = Some(Instant::now());
                if let Err(e) = job.guard.persist() {
                    tracing::error!(error = %e, %gid, log_id = %job.log_id, "flushing the state before a log purge; tried again later");
                    waiting.insert(gid, job);
                    continue;
                }
                flushed = true;
            }
            if !covered(&job) {
                tracing::debug!(%gid, log_id = %job.log_id, "purge waits for the state to cover it");
                waiting.insert(gid, job);
                continue;
            }
            let _open = open.lock().expect("open groups lock");
            let Some(group) = job.group.upgrade() else { continue };
            // The engine is closing when a send fails: the held appends
            // then stay unacknowledged, as after a crash.
            if let Err(e) = purge_and_release(db, &group, job.log_id, |q| drop(release_to.send(q))) {
                // Tried again: a bridge's held appends (and openraft's core,
                // which waits for each append) wait for this purge.
                tracing::error!(error = %e, %gid, log_id = %job.log_id, "purging the raft log; tried again");
                waiting.insert(gid, job);
            }
        }
        jobs = waiting;
    }
}

type Flushed = openraft::storage::LogFlushed<TypeConfig>;

/// An append waiting for its sync.
pub(super) struct Queued {
    callback: Flushed,
    /// Where the sync audit stood when the append was written (tests).
    written: audit::Mark,
}

/// Syncs the WAL for queued appends and acknowledges them.
pub(super) struct Syncer {
    db: Arc<DB>,
    pub(super) audit: audit::Audit,
    /// `flush_wal` calls made, for the batching figures (and metrics).
    syncs: AtomicU64,
    /// Taken (uncontended) before each sync; a test holds it to keep
    /// appends queued and see one sync serve them all.
    hold: Mutex<()>,
}

impl Syncer {
    /// Syncs the WAL, then reports every append of `queued` durable.
    fn sync_and_ack(&self, queued: Vec<Queued>) {
        let result = self.db.flush_wal(true);
        if let Err(e) = &result {
            fsync_failed(e);
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        for Queued { callback, written } in queued {
            self.audit.acknowledged(written, "append");
            let outcome = result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
            callback.log_io_completed(outcome);
        }
    }
}

/// The error of a synced write to the raft log (a vote, a truncation, a
/// bridge): an I/O error may be a failed fsync, after which nothing may be
/// acknowledged ([`fsync_failed`]); other errors go back to openraft.
pub(super) fn synced_write_failed(e: rocksdb::Error) -> StorageError {
    if e.kind() == rocksdb::ErrorKind::IOError {
        fsync_failed(&e);
    }
    write_err(e)
}

/// A failed WAL sync stops the node. After a failed fsync the kernel may
/// have dropped the dirty pages and cleared the error, so a later sync can
/// succeed without the lost writes on disk: acknowledging anything after
/// it would be unsafe, and failing every group one by one leaves a node
/// that serves but cannot write. The process aborts (as after a kill -9)
/// and its restart recovers from what the disk holds.
fn fsync_failed(e: &rocksdb::Error) -> ! {
    tracing::error!(error = %e,
        "syncing the raft log failed: what reached the disk is unknown; the node stops (restart it once the disk \
         is healthy; it recovers from what is on disk)");
    eprintln!("portraitd: syncing the raft log failed ({e}); aborting");
    std::process::abort()
}

/// After an append arrives, the fsync thread waits for more while they
/// keep coming at most this far apart (the shards' parts of one write are
/// appended within microseconds of each other)...
const GATHER_GAP: std::time::Duration = std::time::Duration::from_micros(200);
/// ... and at most this long in all, before it syncs.
const GATHER_MAX: std::time::Duration = std::time::Duration::from_millis(1);

/// Syncs the WAL once per run of queued callbacks, whatever their groups:
/// a run is what arrived until a gap of [`GATHER_GAP`] (at most
/// [`GATHER_MAX`] after its first append).
fn flush_loop(syncer: &Syncer, rx: mpsc::Receiver<Queued>) {
    while let Ok(first) = rx.recv() {
        let started = std::time::Instant::now();
        let mut queued = vec![first];
        loop {
            queued.extend(rx.try_iter());
            let left = GATHER_MAX.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(GATHER_GAP.min(left)) {
                Ok(next) => queued.push(next),
                Err(_) => break,
            }
        }
        drop(syncer.hold.lock().unwrap_or_else(|e| e.into_inner()));
        queued.extend(rx.try_iter());
        syncer.sync_and_ack(queued);
    }
}

#[cfg(test)]
mod tests;
