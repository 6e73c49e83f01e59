//! The raft state machine of one group: applies committed entries to the
//! group's key range of the node's state database (one `WriteBatch` per
//! entry, the group's `last_applied` and clock inside it), builds the
//! group's snapshots as SST files and installs received ones
//! ([`super::group_snapshot`]). Apply runs on tokio's blocking pool, at
//! most one apply per core across the node's groups; batches are written by
//! the node's one writer thread ([`super::apply_writer`]).

use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError};
use rocksdb::{WriteBatch, DB};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::apply::{apply_reevaluate, apply_tick, apply_write, ApplyCache};
use super::apply_writer::{CacheBudget, WriteJob};
use super::codec::{decode, encode, read_err, write_err};
use super::group::{AppliedState, GroupState};
use super::group_snapshot;
use super::keys::*;
use super::sm_db::{apply_write_options, cf, meta_apply_write_options};
use super::snapshot::{pack, unpack, SnapshotDir};
use crate::engine::check_schema;
use crate::schema::VersionedSchema;
use crate::types::{
    Command, CommandResult, Entry, GroupId, LogId, ReevalProgress, RestoreMarker, RestoreStep, SnapshotMeta,
    StorageError, StoredMembership, TypeConfig, WriteOutcome,
};
use portrait_core::meta::MetaOutcome;

/// openraft's handle to one group's state machine.
pub struct StateMachine {
    store: Arc<GroupState>,
    snapshots: SnapshotBuilder,
    applier: Arc<std::sync::Mutex<Applier>>,
    /// The group's raft log, whose purge up to an installed snapshot runs
    /// once the install is on disk ([`StateMachine::purging`]).
    log: Option<super::LogStore>,
    /// While this file exists, snapshot installs wait before they start
    /// (cluster tests crash a node in the middle of one).
    #[cfg(feature = "fault-injection")]
    stall_installs: std::path::PathBuf,
}

/// The fault-injection marker (in the data dir) that holds snapshot
/// installs before they start.
#[cfg(feature = "fault-injection")]
pub const STALL_INSTALLS_MARKER: &str = "fault-stall-snapshot-installs";

/// Applies entries. Runs on tokio's blocking pool, not on a runtime worker:
/// an entry's apply is milliseconds of synchronous CPU and RocksDB work, and
/// a worker stuck in it would stall the gRPC, raft and batching tasks queued
/// behind it on that worker (with two cores, half of the runtime).
///
/// Write entries are pipelined: an entry's `WriteBatch` is handed to the
/// node's writer thread and apply goes on computing the next entry while it
/// is written (the memtable inserts are a quarter of apply's time and run on
/// one thread). At most one batch of the group is in flight, and the next
/// entry sees its effects through the write-through cache (users and family
/// heads) and the shard's recent dedupe ids. Every other entry, a snapshot
/// install and `applied_state` first wait for the batch in flight.
struct Applier {
    store: Arc<GroupState>,
    keys: MetaKeys,
    cache: ApplyCache,
    /// Outcomes of this group's batches from the writer thread.
    done_tx: std::sync::mpsc::Sender<Result<(), String>>,
    done: std::sync::mpsc::Receiver<Result<(), String>>,
    /// The state after the batch in flight, if one is.
    in_flight: Option<AppliedState>,
    /// A write failure of the last batch that [`IdleTrim`] received: the
    /// next wait returns it, as if it had received it itself.
    failed: Option<StorageError>,
    /// Whether the group is mid-restore (its `restore` marker is set);
    /// `None`: not read yet (at open and after a snapshot install).
    restoring: Option<bool>,
    /// Whether the group's `written` mark is set (or in the batch in
    /// flight); `None`: not read yet.
    written: Option<bool>,
    /// Set while a lone small write applies on openraft's task (see
    /// `apply`), where nothing may block.
    inline: bool,
}

/// The group's keys in `meta`.
struct MetaKeys {
    applied: Vec<u8>,
    clock: Vec<u8>,
    membership: Vec<u8>,
    schema: Vec<u8>,
    reeval: Vec<u8>,
    cluster: Vec<u8>,
    restore: Vec<u8>,
    restored: Vec<u8>,
    written: Vec<u8>,
    rules: Vec<u8>,
}

impl MetaKeys {
    fn new(gid: crate::types::GroupId) -> MetaKeys {
        MetaKeys {
            applied: meta(gid, META_APPLIED),
            clock: meta(gid, META_CLOCK),
            membership: meta(gid, META_MEMBERSHIP),
            schema: meta(gid, META_SCHEMA),
            reeval: meta(gid, META_REEVAL),
            cluster: meta(gid, META_CLUSTER),
            restore: meta(gid, META_RESTORE),
            restored: meta(gid, META_RESTORED),
            written: meta(gid, META_WRITTEN),
            rules: meta(gid, META_RULES),
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        // The batch in flight holds a handle of the group: let it land.
        let _ = self.wait_in_flight();
    }
}

/// Builds snapshots; shares the snapshot directory lock with the state
/// machine so a build never races an install.
#[derive(Clone)]
pub struct SnapshotBuilder {
    store: Arc<GroupState>,
    dir: SnapshotDir,
    lock: Arc<Mutex<()>>,
}

impl StateMachine {
    /// The state machine of `store`'s group; its snapshots live in
    /// `<data>/snapshots/<group>`. Its apply cache holds a share of the
    /// node's budget.
    pub fn new(store: Arc<GroupState>, data_dir: &std::path::Path) -> std::io::Result<StateMachine> {
        let budget = store.state_db().cache_budget();
        StateMachine::with_cache_budget(store, data_dir, budget)
    }

    /// [`StateMachine::new`] with an apply cache of its own of
    /// `entries` heads and states and `bytes` encoded bytes (tests use tiny
    /// ones to exercise its trimming).
    pub fn with_cache(
        store: Arc<GroupState>,
        data_dir: &std::path::Path,
        entries: usize,
        bytes: usize,
    ) -> std::io::Result<StateMachine> {
        StateMachine::with_cache_budget(store, data_dir, Arc::new(CacheBudget::new(entries, bytes)))
    }

    /// [`StateMachine::new`] with its apply cache holding a share of
    /// `budget` (tests share a small one between groups).
    pub fn with_cache_budget(
        store: Arc<GroupState>,
        data_dir: &std::path::Path,
        budget: Arc<CacheBudget>,
    ) -> std::io::Result<StateMachine> {
        let dir = SnapshotDir::new(data_dir, store.gid())?;
        let snapshots = SnapshotBuilder { store: store.clone(), dir, lock: Arc::new(Mutex::new(())) };
        let (done_tx, done) = std::sync::mpsc::channel();
        let applier = Applier {
            store: store.clone(),
            keys: MetaKeys::new(store.gid()),
            cache: ApplyCache::new(budget),
            done_tx,
            done,
            in_flight: None,
            failed: None,
            restoring: None,
            written: None,
            inline: false,
        };
        Ok(StateMachine {
            store,
            snapshots,
            applier: Arc::new(std::sync::Mutex::new(applier)),
            log: None,
            #[cfg(feature = "fault-injection")]
            stall_installs: data_dir.join(STALL_INSTALLS_MARKER),
        })
    }

    /// Runs the purge of `log` that openraft asks for with a snapshot once
    /// the install has put the snapshot's state on disk.
    pub fn purging(mut self, log: super::LogStore) -> StateMachine {
        self.log = Some(log);
        self
    }

    fn applier(&self) -> std::sync::MutexGuard<'_, Applier> {
        lock_applier(&self.applier)
    }

    /// A handle that trims this group's apply cache while the group is
    /// idle (it does not keep the state machine alive).
    pub fn idle_trim(&self) -> IdleTrim {
        IdleTrim(Arc::downgrade(&self.applier))
    }

    /// Encoded bytes of the heads and states in the apply cache (waits for
    /// an entry being applied).
    pub fn cached_bytes(&self) -> usize {
        self.applier().cache.bytes()
    }
}

/// Trims an idle group's apply cache. Each entry trims the cache to its
/// share of the node's budget before it adds its own users, which it keeps
/// for the next entry (computed while this one's batch is written). A
/// group that then goes idle would keep that working set, up to a whole
/// entry's users, past its share; 64 idle groups, 64 of them. The node's
/// log policy task calls [`IdleTrim::trim`] on a group whose applied index
/// has not moved for a while.
#[derive(Clone)]
pub struct IdleTrim(std::sync::Weak<std::sync::Mutex<Applier>>);

impl IdleTrim {
    /// Trims the cache if no entry is being applied and the group's last
    /// batch is written, and says whether it did; else does nothing (never
    /// waits). A write failure it receives is kept for the applier's next
    /// wait.
    pub fn trim(&self) -> bool {
        let Some(applier) = self.0.upgrade() else { return false };
        let Ok(mut applier) = applier.try_lock() else { return false };
        match applier.settled() {
            Ok(true) => {
                applier.cache.trim_settled();
                true
            }
            Ok(false) => false,
            Err(e) => {
                applier.failed = Some(e);
                false
            }
        }
    }
}

fn apply_err(log_id: LogId, e: anyhow::Error) -> StorageError {
    StorageError::from(StorageIOError::apply(log_id, AnyError::error(format!("{e:#}"))))
}

/// A panic while applying is fatal to raft anyway; the cache it may have
/// left half-updated is cleared so nothing stale is reused.
/// A write entry of at most this many events applies on the raft task
/// when nothing is in flight (see `apply`).
const INLINE_MAX_EVENTS: usize = 16;

fn small_write(entry: &Entry) -> bool {
    match &entry.payload {
        EntryPayload::Normal(Command::Write { requests, .. }) => {
            requests.iter().map(Vec::len).sum::<usize>() <= INLINE_MAX_EVENTS
        }
        _ => false,
    }
}

fn lock_applier(applier: &std::sync::Mutex<Applier>) -> std::sync::MutexGuard<'_, Applier> {
    applier.lock().unwrap_or_else(|poisoned| {
        let mut guard = poisoned.into_inner();
        guard.cache.clear();
        guard.inline = false;
        guard
    })
}

/// Whether the group's meta `key` is present: `cache` if known, else read
/// once from the database and kept there.
fn cached_mark(db: &DB, cache: &mut Option<bool>, key: &[u8]) -> Result<bool, StorageError> {
    if let Some(present) = *cache {
        return Ok(present);
    }
    let present = db.get_cf(cf(db, CF_META), key).map_err(read_err)?.is_some();
    *cache = Some(present);
    Ok(present)
}

impl Applier {
    fn apply_entry(
        &mut self,
        db: &Arc<DB>,
        state: &mut AppliedState,
        entry: Entry,
    ) -> Result<CommandResult, StorageError> {
        let mut batch = WriteBatch::default();
        let meta = cf(db, CF_META);
        let gid = self.store.gid();
        let log_id = entry.log_id;
        if !matches!(entry.payload, EntryPayload::Normal(Command::Write { .. })) {
            self.wait_in_flight()?;
        }
        // A shard entry applies by the shard's rules version: one this
        // build no longer has (a shard that never took the cluster's
        // newer version) stops the replica rather than apply it by others.
        if let EntryPayload::Normal(command) = &entry.payload {
            if !matches!(command, Command::Rules { .. } | Command::Meta { .. }) {
                if let Err(e) = crate::rules::check(self.store.rules()) {
                    tracing::error!(group = %gid, error = %e,
                        "this build cannot apply the shard's entry by the shard's rules: the replica stops here");
                    return Err(apply_err(log_id, anyhow::anyhow!("{gid}: {e}")));
                }
            }
        }
        let result = match entry.payload {
            EntryPayload::Blank => CommandResult::None,
            EntryPayload::Membership(m) => {
                state.membership = StoredMembership::new(Some(log_id), m);
                batch.put_cf(meta, &self.keys.membership, encode(&state.membership));
                CommandResult::None
            }
            EntryPayload::Normal(Command::Write { stamp_ms, requests }) if self.restoring(db)? => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let reason = format!("{gid} is being restored from a backup; write again once it ends");
                let outcomes = requests.iter().map(|_| WriteOutcome::Rejected { reason: reason.clone() });
                self.wait_in_flight()?;
                CommandResult::Write(outcomes.collect())
            }
            EntryPayload::Normal(Command::Write { stamp_ms, requests }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let (schema, engine) = (self.store.schema(), self.store.engine());
                let outcomes = apply_write(
                    db,
                    gid,
                    &mut self.cache,
                    &schema.schema,
                    &engine,
                    self.store.at(state.clock_ms),
                    &requests,
                    &mut batch,
                )
                .map_err(|e| StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e))))?;
                // Anything written marks the shard as holding data: events
                // counted as expired still leave dedupe markers and
                // lifetime feature state, which a restore's range delete
                // would wipe.
                let stored = !batch.is_empty();
                if stored && !self.written(db)? {
                    batch.put_cf(meta, &self.keys.written, encode(&true));
                    self.written = Some(true);
                }
                self.submit(db, batch, state, log_id)?;
                return Ok(CommandResult::Write(outcomes));
            }
            // Timers and re-evaluation wait for a restore to end.
            EntryPayload::Normal(Command::Tick { stamp_ms }) if self.restoring(db)? => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                CommandResult::Ticked { users: 0 }
            }
            EntryPayload::Normal(Command::Reevaluate { stamp_ms, .. }) if self.restoring(db)? => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                CommandResult::Reevaluated { users: 0 }
            }
            EntryPayload::Normal(Command::Restore { stamp_ms, step }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                match self.restore_step(db, state, step, &mut batch).map_err(|e| apply_err(log_id, e))? {
                    Ok(rows) => CommandResult::Restored { rows },
                    Err(reason) => CommandResult::Rejected { reason },
                }
            }
            EntryPayload::Normal(Command::Tick { stamp_ms }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let users = apply_tick(
                    db,
                    gid,
                    &mut self.cache,
                    &self.store.engine(),
                    self.store.at(state.clock_ms),
                    &mut batch,
                )
                .map_err(|e| StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e))))?;
                CommandResult::Ticked { users }
            }
            EntryPayload::Normal(Command::Reevaluate { stamp_ms, version, after, limit }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let progress = self.store.reeval_progress().map_err(read_err)?;
                match progress {
                    Some(p) if p.version == version && p.cursor == after => {
                        let engine = self.store.engine();
                        let covered = apply_reevaluate(
                            db,
                            gid,
                            &mut self.cache,
                            &engine,
                            self.store.at(state.clock_ms),
                            after.as_deref(),
                            limit,
                            &mut batch,
                        )
                        .map_err(|e| StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e))))?;
                        let n = covered.users;
                        if covered.done {
                            batch.delete_cf(meta, &self.keys.reeval);
                        } else {
                            let cursor = covered.last;
                            let next =
                                ReevalProgress { version, cursor, users_done: p.users_done + n as u64 };
                            batch.put_cf(meta, &self.keys.reeval, encode(&next));
                        }
                        CommandResult::Reevaluated { users: n }
                    }
                    // A stale proposal (the schema or the cursor moved on).
                    _ => CommandResult::Reevaluated { users: 0 },
                }
            }
            EntryPayload::Normal(Command::ApplySchema { stamp_ms, toml, version }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let current = self.store.schema().version;
                // Proposed again (or overtaken by a newer one): applied
                // already, whatever this build makes of its text.
                if version <= current {
                    CommandResult::SchemaApplied { version: current }
                } else {
                    match check_schema(&toml) {
                        Ok((schema, engine)) => {
                            let versioned = VersionedSchema { version, schema };
                            batch.put_cf(meta, &self.keys.schema, encode(&versioned));
                            // Existing users get the new rules in the background.
                            let progress = ReevalProgress { version, cursor: None, users_done: 0 };
                            batch.put_cf(meta, &self.keys.reeval, encode(&progress));
                            self.finish(db, batch, state, log_id)?;
                            self.store.set_schema(versioned, engine);
                            return Ok(CommandResult::SchemaApplied { version });
                        }
                        // The proposer's build accepted it (it checks before
                        // proposing), so only a build that checks more strictly
                        // gets here (a rolling upgrade). Skipping the entry
                        // would leave this replica on the old rules while the
                        // others run the new ones: its tags would diverge for
                        // good. The replica stops applying instead: openraft
                        // stops the group on a storage error, which shuts the
                        // node down (its log kept) until a build that accepts
                        // the schema runs it.
                        Err(e) => {
                            tracing::error!(group = %self.store.gid(), version, error = %e,
                            "this build refuses a schema the shard's leader proposed: the replica stops here \
                             rather than diverge; run a build that accepts it");
                            return Err(apply_err(
                                log_id,
                                anyhow::anyhow!("schema version {version} refused by this build: {e}"),
                            ));
                        }
                    }
                }
            }
            EntryPayload::Normal(Command::Rules { stamp_ms, version }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let current = self.store.rules();
                if version <= current {
                    CommandResult::RulesApplied { version: current }
                } else if let Err(e) = crate::rules::check(version) {
                    // Going on would apply the shard's next entries by
                    // other rules than its other replicas: stop here (the
                    // node stops; each restart stops here again) until a
                    // build that has the version runs this replica.
                    tracing::error!(group = %gid, version, error = %e,
                        "this build cannot apply the shard by the rules its leader proposed: the replica stops \
                         here rather than diverge");
                    return Err(apply_err(log_id, anyhow::anyhow!("{gid}: {e}")));
                } else {
                    batch.put_cf(meta, &self.keys.rules, encode(&version));
                    self.finish(db, batch, state, log_id)?;
                    self.store.set_rules(version);
                    return Ok(CommandResult::RulesApplied { version });
                }
            }
            EntryPayload::Normal(Command::Meta { stamp_ms, command }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let before = self.store.cluster().rules();
                let mut cluster = (*self.store.cluster()).clone();
                let outcome = cluster.apply(&command);
                // The cluster's apply rules raised past this build's (a
                // node started after every node was checked, or created by
                // a newer build): the meta group's next entries may follow
                // them, so stop as a shard replica does.
                if cluster.rules() > before {
                    if let Err(e) = crate::rules::check(cluster.rules()) {
                        tracing::error!(group = %gid, version = cluster.rules(), error = %e,
                            "this build cannot follow the cluster's apply rules: the meta replica stops here");
                        return Err(apply_err(log_id, anyhow::anyhow!("{gid} (the cluster's version): {e}")));
                    }
                }
                if matches!(outcome, MetaOutcome::Applied { .. }) {
                    batch.put_cf(meta, &self.keys.cluster, encode(&cluster));
                    self.finish(db, batch, state, log_id)?;
                    self.store.set_cluster(cluster);
                    return Ok(CommandResult::Meta(outcome));
                }
                CommandResult::Meta(outcome)
            }
        };
        self.finish(db, batch, state, log_id)?;
        Ok(result)
    }

    /// Whether the group is mid-restore (read once, then kept up to date).
    fn restoring(&mut self, db: &DB) -> Result<bool, StorageError> {
        cached_mark(db, &mut self.restoring, &self.keys.restore)
    }

    /// Whether the group's `written` mark is set. Read from the database
    /// only while unknown: then no batch in flight sets it (the cache is
    /// set with every put, and cleared only once the batch in flight is
    /// written).
    fn written(&mut self, db: &DB) -> Result<bool, StorageError> {
        cached_mark(db, &mut self.written, &self.keys.written)
    }

    /// Applies one restore step into `batch` (see [`RestoreStep`]): the
    /// rows applied so far, or why the step was rejected (nothing of it is
    /// applied). Deterministic: it reads only the group's replicated rows.
    fn restore_step(
        &mut self,
        db: &DB,
        state: &mut AppliedState,
        step: RestoreStep,
        batch: &mut WriteBatch,
    ) -> anyhow::Result<Result<u64, String>> {
        let gid = self.store.gid();
        let meta_cf = cf(db, CF_META);
        let marker: Option<RestoreMarker> =
            db.get_cf(meta_cf, &self.keys.restore)?.map(|b| decode(&b)).transpose()?;
        let current = |id: &str| match &marker {
            Some(m) if m.id == id => Ok(m.clone()),
            Some(m) => Err(format!("restore {id:?} is not the one in progress ({:?})", m.id)),
            None => Err(format!("no restore {id:?} is in progress on {gid}")),
        };
        match step {
            RestoreStep::Begin { id } => {
                // Another restore (another backup) in progress is not
                // wiped: a shard takes one backup. The leader checks it
                // before proposing; two restores that both passed its
                // look are told apart here (apply rules version 6).
                let restore_id = crate::types::restore_id_of(&id);
                if let Some(m) = &marker {
                    let running = crate::types::restore_id_of(&m.id);
                    if running != restore_id
                        && self.store.rules() >= portrait_core::rules::ONE_RESTORE_AT_A_TIME
                    {
                        return Ok(Err(format!(
                            "{gid} is being restored from {running:?}, not {restore_id:?}: a shard takes one \
                             backup; finish that restore, or restore into a new, empty cluster"
                        )));
                    }
                }
                // Only into a shard that never took a write, or to start a
                // restore in progress again: decided here, on every
                // replica alike, not by the leader's earlier look (writes
                // may have been applied since, or not be readable yet).
                if marker.is_none() && self.written(db)? {
                    // This restore's own End applied before this Begin (an
                    // attempt whose End answered late, then run again):
                    // done, not a foreign cluster's data.
                    let restored: Option<String> =
                        db.get_cf(meta_cf, &self.keys.restored)?.map(|b| decode(&b)).transpose()?;
                    if restored.as_deref() == Some(restore_id) {
                        return Ok(Err(format!(
                            "{} {gid} from {restore_id:?}",
                            crate::types::ALREADY_RESTORED
                        )));
                    }
                    return Ok(Err(format!(
                        "{gid} holds data (it has taken writes): a restore needs a new, empty cluster"
                    )));
                }
                let (start, end) = group_range(gid);
                for name in DATA_CFS {
                    batch.delete_range_cf(cf(db, name), &start, &end);
                }
                batch.put_cf(
                    meta_cf,
                    &self.keys.restore,
                    encode(&RestoreMarker { id, next_seq: 0, rows: 0 }),
                );
                batch.delete_cf(meta_cf, &self.keys.reeval);
                batch.delete_cf(meta_cf, &self.keys.restored);
                batch.delete_cf(meta_cf, &self.keys.written);
                self.cache.clear();
                self.restoring = Some(true);
                self.written = Some(false);
                Ok(Ok(0))
            }
            RestoreStep::Rows { id, seq, rows } => {
                let mut marker = match current(&id) {
                    Ok(m) if m.next_seq == seq => m,
                    Ok(m) => {
                        let expected = m.next_seq;
                        return Ok(Err(format!(
                            "{} {seq} arrived, {expected} expected",
                            crate::types::ROWS_OUT_OF_ORDER
                        )));
                    }
                    Err(reason) => return Ok(Err(reason)),
                };
                let prefix = group_prefix(gid);
                let data_cf = |index: u8| ALL_CFS.get(index as usize).filter(|name| DATA_CFS.contains(name));
                if let Some(row) = rows.iter().find(|row| data_cf(row.cf).is_none()) {
                    return Ok(Err(format!("restore row of column family {} (not a data family)", row.cf)));
                }
                for row in &rows {
                    let name = data_cf(row.cf).expect("checked above");
                    let mut key = Vec::with_capacity(prefix.len() + row.key.len());
                    key.extend_from_slice(&prefix);
                    key.extend_from_slice(&row.key);
                    batch.put_cf(cf(db, name), key, &row.value);
                }
                marker.next_seq += 1;
                marker.rows += rows.len() as u64;
                batch.put_cf(meta_cf, &self.keys.restore, encode(&marker));
                Ok(Ok(marker.rows))
            }
            RestoreStep::End { id, rows, clock_ms, schema, reeval } => {
                let marker = match current(&id) {
                    Ok(m) if m.rows == rows => m,
                    Ok(m) => {
                        return Ok(Err(format!("restore ends with {rows} rows, {} were applied", m.rows)))
                    }
                    Err(reason) => return Ok(Err(reason)),
                };
                state.clock_ms = state.clock_ms.max(clock_ms);
                let current = self.store.schema();
                let backup_schema = schema.unwrap_or_else(crate::schema::Schema::default_schema);
                // Features and tags were computed under the backup's schema:
                // kept if it is the shard's, else every user is re-evaluated.
                let progress = match (backup_schema == current.schema, reeval) {
                    (true, None) => None,
                    (true, Some(p)) => Some(ReevalProgress { version: current.version, ..p }),
                    (false, _) => {
                        Some(ReevalProgress { version: current.version, cursor: None, users_done: 0 })
                    }
                };
                match progress {
                    Some(p) => batch.put_cf(meta_cf, &self.keys.reeval, encode(&p)),
                    None => batch.delete_cf(meta_cf, &self.keys.reeval),
                }
                batch.delete_cf(meta_cf, &self.keys.restore);
                batch.put_cf(
                    meta_cf,
                    &self.keys.restored,
                    encode(&crate::types::restore_id_of(&id).to_string()),
                );
                if marker.rows > 0 {
                    batch.put_cf(meta_cf, &self.keys.written, encode(&true));
                    self.written = Some(true);
                }
                self.cache.clear();
                self.restoring = Some(false);
                Ok(Ok(marker.rows))
            }
        }
    }

    fn apply_all(&mut self, entries: Vec<Entry>) -> Result<Vec<CommandResult>, StorageError> {
        let db = self.store.db();
        // The state after the batch in flight, else what the database holds.
        let mut state = self.in_flight.clone().unwrap_or_else(|| self.store.applied());
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            results.push(self.apply_entry(&db, &mut state, entry)?);
        }
        Ok(results)
    }

    /// Records `last_applied` and the clock in the entry's batch.
    fn seal(&self, db: &DB, batch: &mut WriteBatch, state: &mut AppliedState, log_id: LogId) {
        state.last_applied = Some(log_id);
        let meta = cf(db, CF_META);
        batch.put_cf(meta, &self.keys.applied, encode(&log_id));
        batch.put_cf(meta, &self.keys.clock, encode(&state.clock_ms));
    }

    /// Seals the entry's batch and writes it here (entries other than writes).
    fn finish(
        &mut self,
        db: &DB,
        mut batch: WriteBatch,
        state: &mut AppliedState,
        log_id: LogId,
    ) -> Result<(), StorageError> {
        self.seal(db, &mut batch, state, log_id);
        let opts = match self.store.gid() {
            GroupId::META => meta_apply_write_options(),
            _ => apply_write_options(),
        };
        db.write_opt(batch, &opts).map_err(write_err)?;
        self.store.set_applied(state.clone());
        // A tick or re-evaluation keeps its users too; its batch is written.
        if self.cache.over_budget() {
            self.cache.trim_settled();
        }
        Ok(())
    }

    /// Seals a write entry's batch and hands it to the writer thread once
    /// the previous one is written.
    fn submit(
        &mut self,
        db: &Arc<DB>,
        mut batch: WriteBatch,
        state: &mut AppliedState,
        log_id: LogId,
    ) -> Result<(), StorageError> {
        self.seal(db, &mut batch, state, log_id);
        self.wait_in_flight()?;
        let job =
            WriteJob { batch, group: self.store.clone(), state: state.clone(), done: self.done_tx.clone() };
        self.store.state_db().writer().submit(job).map_err(|e| write_err(std::io::Error::other(e)))?;
        self.in_flight = Some(state.clone());
        // The entry's users, kept for the next entry, took the node's
        // caches past its budget: this one gives up the overlap of the
        // next entry's apply with this batch's write, and trims. Not on
        // openraft's task, where nothing may block: a lone small write
        // adds at most 16 events' users past the share, which its group's
        // next entry or idle trim takes back.
        if !self.inline && self.cache.over_budget() {
            self.wait_in_flight()?;
            self.cache.trim_settled();
        }
        Ok(())
    }

    /// Whether no batch is in flight (the last one is written), without
    /// waiting.
    fn settled(&mut self) -> Result<bool, StorageError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.in_flight.is_none() {
            return Ok(true);
        }
        match self.done.try_recv() {
            Ok(Ok(())) => {
                self.in_flight = None;
                Ok(true)
            }
            Ok(Err(e)) => {
                self.in_flight = None;
                Err(write_err(std::io::Error::other(e)))
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => Ok(false),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.in_flight = None;
                Err(write_err(std::io::Error::other("the apply writer thread stopped")))
            }
        }
    }

    /// Waits until the batch in flight, if any, is written.
    fn wait_in_flight(&mut self) -> Result<(), StorageError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.in_flight.take().is_none() {
            return Ok(());
        }
        match self.done.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(write_err(std::io::Error::other(e))),
            Err(_) => Err(write_err(std::io::Error::other("the apply writer thread stopped"))),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applier = self.applier.clone();
        tokio::task::spawn_blocking(move || lock_applier(&applier).wait_in_flight())
            .await
            .map_err(write_err)??;
        let state = self.store.applied();
        Ok((state.last_applied, state.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let applier = self.applier.clone();
        let slot = self.store.state_db().apply_slots().acquire_owned().await.map_err(write_err)?;
        // A lone small write applies on this task when nothing waits: the
        // blocking pool's two thread hand-offs cost more than its apply
        // (what keeps many shards' small entries cheap), and nothing here
        // can block (its reads are few, the batch before it is written).
        if let [entry] = entries.as_slice() {
            if small_write(entry) {
                if let Ok(mut guard) = applier.try_lock() {
                    if guard.settled()? {
                        guard.inline = true;
                        let results = guard.apply_all(entries);
                        guard.inline = false;
                        drop(slot);
                        return results;
                    }
                }
            }
        }
        let run = move || {
            let _slot = slot;
            lock_applier(&applier).apply_all(entries)
        };
        tokio::task::spawn_blocking(run).await.map_err(write_err)?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.snapshots.dir.incoming();
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(write_err)?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        #[cfg(feature = "fault-injection")]
        if self.stall_installs.exists() {
            tracing::warn!(group = %self.store.gid(), "fault injection: snapshot install stalled");
            while self.stall_installs.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        snapshot.flush().await.map_err(write_err)?;
        snapshot.sync_all().await.map_err(write_err)?;
        let file = snapshot.into_std().await;
        let _guard = self.snapshots.lock.lock().await;
        let (store, dir, meta) = (self.store.clone(), self.snapshots.dir.clone(), meta.clone());
        let applier = self.applier.clone();
        // On the blocking pool: the batch in flight may queue behind other
        // groups' batches (and write stalls) on the node's writer thread.
        tokio::task::spawn_blocking(move || {
            {
                let mut applier = lock_applier(&applier);
                applier.wait_in_flight()?;
                applier.cache.clear();
                applier.restoring = None;
                applier.written = None;
            }
            install_blocking(&store, &dir, file, &meta).map_err(|e| {
                StorageError::from(StorageIOError::write_snapshot(None, AnyError::error(format!("{e:#}"))))
            })
        })
        .await
        .map_err(write_err)??;
        // openraft asked for the log's purge up to the snapshot when it
        // handed the snapshot over; it waited for this state to be on disk
        // (see `LogStore::purge`). Done before the leader hears the install
        // finished, so the entries it sends next never follow a hole.
        // On the blocking pool: it reads the flushed state and may take the
        // node's purge lock, which another group's synced write can hold.
        if let Some(log) = self.log.clone() {
            tokio::task::spawn_blocking(move || log.purge_covered()).await.map_err(write_err)??;
        }
        Ok(())
    }

    /// Not under the snapshot lock: a build holds it while it exports and
    /// packs the group (tens of seconds for a large shard), and openraft
    /// asks for the current snapshot on the state machine's task, so every
    /// apply of the group would wait behind the build.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        self.snapshots.open_current().await
    }
}

impl SnapshotBuilder {
    /// The current snapshot, if any. Safe without the lock: `current.meta`
    /// is replaced atomically and only ever names a complete archive, and
    /// an archive opened stays readable once removed. A publish between
    /// reading the meta and opening its archive (which it removes) sends
    /// this back to read the new meta.
    async fn open_current(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let mut tries = 0;
        loop {
            let meta_bytes = match tokio::fs::read(self.dir.meta()).await {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(read_err(e)),
            };
            let meta: SnapshotMeta = decode(&meta_bytes).map_err(read_err)?;
            match tokio::fs::File::open(self.dir.archive(&meta.snapshot_id)).await {
                Ok(file) => return Ok(Some(Snapshot { meta, snapshot: Box::new(file) })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 8 => tries += 1,
                Err(e) => return Err(read_err(e)),
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let _guard = self.lock.lock().await;
        let (store, dir) = (self.store.clone(), self.dir.clone());
        tokio::task::spawn_blocking(move || build_blocking(&store, &dir)).await.map_err(write_err)?.map_err(
            |e| StorageError::from(StorageIOError::write_snapshot(None, AnyError::error(format!("{e:#}")))),
        )?;
        Ok(self.open_current().await?.expect("snapshot was just written"))
    }
}

/// The group's SST files → archive → `snap-<id>.snap` + `current.meta`.
/// Unless the current snapshot is newer than the state: after a crash the
/// state restarts from its last flush, which may be behind the snapshot
/// openraft holds, and a build then keeps that snapshot rather than
/// replacing it (and deleting its archive) with an older one.
fn build_blocking(store: &GroupState, dir: &SnapshotDir) -> anyhow::Result<()> {
    let current = match std::fs::read(dir.meta()) {
        Ok(bytes) => Some(decode::<SnapshotMeta>(&bytes)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    let newest = current.and_then(|m| m.last_log_id).map_or(0, |l| l.index);
    if store.applied().last_applied.map_or(0, |l| l.index) < newest {
        tracing::info!(group = %store.gid(), snapshot = newest, "the current snapshot is ahead of the state: kept");
        return Ok(());
    }
    let export = dir.scratch("export");
    let building = dir.scratch("building.snap");
    let exported = group_snapshot::export(store.state_db(), store.gid(), &export)
        .and_then(|meta| pack(&export, &building).map(|()| meta).map_err(anyhow::Error::from));
    // The export is a copy of the group's rows, the archive another: a
    // failed build does not leave them taking a shard's size twice.
    let _ = std::fs::remove_dir_all(&export);
    let archive_meta = match exported {
        Ok(meta) => meta,
        Err(e) => {
            let _ = std::fs::remove_file(&building);
            return Err(e);
        }
    };
    let index = archive_meta.last_applied.map(|l| l.index).unwrap_or(0);
    let meta = SnapshotMeta {
        last_log_id: archive_meta.last_applied,
        last_membership: archive_meta.membership,
        snapshot_id: format!("{index}-{}", crate::wall_clock_ms()),
    };
    dir.publish(&building, &meta)
}

/// Unpacks the received archive and validates it against the group and
/// `meta`; only then replaces the group's rows with it: a damaged,
/// foreign-format, other group's or mismatched snapshot leaves the live
/// state as it was.
fn install_blocking(
    store: &GroupState,
    dir: &SnapshotDir,
    file: std::fs::File,
    meta: &SnapshotMeta,
) -> anyhow::Result<()> {
    let archive = received_archive(dir, file)?;
    let staging = dir.scratch("ingest");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let unpacked = unpack(&archive, &staging).map_err(anyhow::Error::from);
    let files = match unpacked.and_then(|()| group_snapshot::validate(&staging, store.gid(), meta)) {
        Ok(files) => files,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e.context("snapshot refused, the live state machine is unchanged"));
        }
    };
    // The marker names the archive: its directory entry must outlive a
    // power loss as surely as the marker does.
    dir.sync()?;
    let record = group_snapshot::InstallRecord { archive: archive.clone(), meta: meta.clone() };
    {
        // Reads wait out the range delete and the ingest (see `read_rows`).
        let mut rows = store.replace_rows();
        // Should the ingest or the reload fail, the range may be emptied or
        // half ingested, and the caches those of the old state: no read
        // takes them until the node opens the group again (which installs
        // the archive again, by the install marker).
        *rows = true;
        group_snapshot::ingest(store.state_db(), store.gid(), files, &record)?;
        store.reload_caches()?;
        *rows = false;
    }
    // Published before the marker is cleared: a crash in between installs
    // the published archive again at the next open, and the group never
    // holds a state newer than its current snapshot (openraft purges the
    // log up to the state at startup, and serves lagging followers the
    // current snapshot).
    dir.publish(&archive, meta)?;
    store.state_db().clear_install_marker(store.gid())?;
    group_snapshot::remove_staging(&staging);
    Ok(())
}

/// The path of the received archive: `incoming.part` when openraft wrote
/// the chunks into the file we handed out, else a streamed copy of `file`.
fn received_archive(dir: &SnapshotDir, mut file: std::fs::File) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let incoming = dir.incoming();
    let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    if let Ok(meta) = std::fs::metadata(&incoming) {
        if same(&meta, &file.metadata()?) {
            return Ok(incoming);
        }
    }
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0))?;
    let copy = dir.scratch("received.snap");
    let mut out = std::fs::File::create(&copy)?;
    std::io::copy(&mut file, &mut out)?;
    out.sync_all()?;
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// openraft asks for the current snapshot on the state machine's task:
    /// a build in progress (holding the snapshot lock) must not hold it,
    /// nor the applies queued behind it.
    #[tokio::test]
    async fn the_current_snapshot_is_given_while_a_build_holds_the_snapshot_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = GroupState::open(dir.path()).unwrap();
        let mut sm = StateMachine::new(store, dir.path()).unwrap();
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let _building = sm.snapshots.lock.clone().lock_owned().await;
        let current = tokio::time::timeout(std::time::Duration::from_secs(5), sm.get_current_snapshot())
            .await
            .expect("not held up by the build")
            .unwrap()
            .expect("a snapshot");
        assert_eq!(current.meta.snapshot_id, built.meta.snapshot_id);
    }
}
