//! The raft state machine: applies committed entries to the state-machine
//! database (one `WriteBatch` per entry, `last_applied` inside it), builds
//! snapshots from RocksDB checkpoints and installs received ones.

use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError};
use rocksdb::checkpoint::Checkpoint;
use rocksdb::{WriteBatch, DB};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::apply::{apply_reevaluate, apply_tick, apply_write, ApplyCache};
use super::codec::{decode, encode, read_err, write_err};
use super::format::check_recorded;
use super::keys::*;
use super::sm_db::{apply_write_options, cf, AppliedState, SmStore};
use super::snapshot::{pack, unpack, SnapshotDir};
use crate::engine::check_schema;
use crate::schema::VersionedSchema;
use crate::types::{
    Command, CommandResult, Entry, LogId, ReevalProgress, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};

/// openraft's handle to the state machine.
pub struct StateMachine {
    store: Arc<SmStore>,
    snapshots: SnapshotBuilder,
    applier: Arc<std::sync::Mutex<Applier>>,
}

/// Applies entries. Runs on tokio's blocking pool, not on a runtime worker:
/// an entry's apply is milliseconds of synchronous CPU and RocksDB work, and
/// a worker stuck in it would stall the gRPC, raft and batching tasks queued
/// behind it on that worker (with two cores, half of the runtime).
///
/// Write entries are pipelined: an entry's `WriteBatch` is handed to the
/// writer thread and apply goes on computing the next entry while it is
/// written (the memtable inserts are a quarter of apply's time and run on
/// one thread). At most one batch is in flight, and the next entry sees its
/// effects through the write-through cache (users and family heads) and the
/// shard's recent dedupe ids. Every other entry, a snapshot install and
/// `applied_state` first wait for the batch in flight.
struct Applier {
    store: Arc<SmStore>,
    cache: ApplyCache,
    writer: Writer,
    /// The state after the batch in flight, if one is.
    in_flight: Option<AppliedState>,
}

type WriteJob = (Arc<DB>, WriteBatch, AppliedState);

/// The thread that writes applied batches, in order. Dropping it waits for
/// the thread, so the database is closed when the state machine is.
struct Writer {
    jobs: Option<std::sync::mpsc::Sender<WriteJob>>,
    done: std::sync::mpsc::Receiver<Result<(), String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Writer {
    fn start(store: Arc<SmStore>) -> Writer {
        let (jobs, job_rx) = std::sync::mpsc::channel::<WriteJob>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("apply-write".into())
            .spawn(move || {
                for (db, batch, state) in job_rx {
                    let result = db.write_opt(batch, &apply_write_options()).map_err(|e| e.to_string());
                    match &result {
                        Ok(()) => store.set_applied(state),
                        Err(e) => store.set_write_failure(e.clone()),
                    }
                    if done_tx.send(result).is_err() {
                        return;
                    }
                }
            })
            .expect("start the apply writer thread");
        Writer { jobs: Some(jobs), done, thread: Some(thread) }
    }
}

/// Users (and family records) whose decoded state apply keeps in memory.
const APPLY_CACHE_ENTRIES: usize = 100_000;

/// Builds snapshots; shares the snapshot directory lock with the state
/// machine so a build never races an install.
#[derive(Clone)]
pub struct SnapshotBuilder {
    store: Arc<SmStore>,
    dir: SnapshotDir,
    lock: Arc<Mutex<()>>,
}

impl StateMachine {
    pub fn new(store: Arc<SmStore>, data_dir: &std::path::Path) -> std::io::Result<StateMachine> {
        StateMachine::with_cache_entries(store, data_dir, APPLY_CACHE_ENTRIES)
    }

    /// [`StateMachine::new`] with another apply cache size (tests use a
    /// tiny one to exercise its trimming).
    pub fn with_cache_entries(
        store: Arc<SmStore>,
        data_dir: &std::path::Path,
        cache_entries: usize,
    ) -> std::io::Result<StateMachine> {
        let dir = SnapshotDir::new(data_dir)?;
        let snapshots = SnapshotBuilder { store: store.clone(), dir, lock: Arc::new(Mutex::new(())) };
        let applier = Applier {
            store: store.clone(),
            cache: ApplyCache::new(cache_entries),
            writer: Writer::start(store.clone()),
            in_flight: None,
        };
        Ok(StateMachine { store, snapshots, applier: Arc::new(std::sync::Mutex::new(applier)) })
    }

    fn applier(&self) -> std::sync::MutexGuard<'_, Applier> {
        lock_applier(&self.applier)
    }
}

/// A panic while applying is fatal to raft anyway; the cache it may have
/// left half-updated is cleared so nothing stale is reused.
fn lock_applier(applier: &std::sync::Mutex<Applier>) -> std::sync::MutexGuard<'_, Applier> {
    applier.lock().unwrap_or_else(|poisoned| {
        let mut guard = poisoned.into_inner();
        guard.cache.clear();
        guard
    })
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
        let log_id = entry.log_id;
        if !matches!(entry.payload, EntryPayload::Normal(Command::Write { .. })) {
            self.wait_in_flight()?;
        }
        let result = match entry.payload {
            EntryPayload::Blank => CommandResult::None,
            EntryPayload::Membership(m) => {
                state.membership = StoredMembership::new(Some(log_id), m);
                batch.put_cf(meta, META_MEMBERSHIP, encode(&state.membership));
                CommandResult::None
            }
            EntryPayload::Normal(Command::Write { stamp_ms, requests }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let (schema, engine) = (self.store.schema(), self.store.engine());
                let outcomes = apply_write(
                    db,
                    &mut self.cache,
                    &schema.schema,
                    &engine,
                    state.clock_ms,
                    &requests,
                    &mut batch,
                )
                .map_err(|e| StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e))))?;
                self.submit(db, batch, state, log_id)?;
                return Ok(CommandResult::Write(outcomes));
            }
            EntryPayload::Normal(Command::Tick { stamp_ms }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let users = apply_tick(db, &mut self.cache, &self.store.engine(), state.clock_ms, &mut batch)
                    .map_err(|e| StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e))))?;
                CommandResult::Ticked { users }
            }
            EntryPayload::Normal(Command::Reevaluate { stamp_ms, version, after, limit }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                let progress = self.store.reeval_progress().map_err(read_err)?;
                match progress {
                    Some(p) if p.version == version && p.cursor == after => {
                        let engine = self.store.engine();
                        let (last, n) = apply_reevaluate(
                            db,
                            &mut self.cache,
                            &engine,
                            state.clock_ms,
                            after.as_deref(),
                            limit,
                            &mut batch,
                        )
                        .map_err(|e| StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e))))?;
                        if n < limit {
                            batch.delete_cf(meta, META_REEVAL);
                        } else {
                            let next =
                                ReevalProgress { version, cursor: last, users_done: p.users_done + n as u64 };
                            batch.put_cf(meta, META_REEVAL, encode(&next));
                        }
                        CommandResult::Reevaluated { users: n }
                    }
                    // A stale proposal (the schema or the cursor moved on).
                    _ => CommandResult::Reevaluated { users: 0 },
                }
            }
            EntryPayload::Normal(Command::ApplySchema { stamp_ms, toml }) => {
                state.clock_ms = state.clock_ms.max(stamp_ms);
                match check_schema(&toml) {
                    Ok((schema, _)) => {
                        let versioned = VersionedSchema { version: log_id.index, schema };
                        batch.put_cf(meta, META_SCHEMA, encode(&versioned));
                        // Existing users get the new rules in the background.
                        let progress = ReevalProgress { version: log_id.index, cursor: None, users_done: 0 };
                        batch.put_cf(meta, META_REEVAL, encode(&progress));
                        self.finish(db, batch, state, log_id)?;
                        self.store.set_schema(versioned);
                        return Ok(CommandResult::SchemaApplied { version: log_id.index });
                    }
                    Err(e) => CommandResult::Rejected { reason: e.to_string() },
                }
            }
        };
        self.finish(db, batch, state, log_id)?;
        Ok(result)
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
    fn seal(db: &DB, batch: &mut WriteBatch, state: &mut AppliedState, log_id: LogId) {
        state.last_applied = Some(log_id);
        let meta = cf(db, CF_META);
        batch.put_cf(meta, META_APPLIED, encode(&log_id));
        batch.put_cf(meta, META_CLOCK, encode(&state.clock_ms));
    }

    /// Seals the entry's batch and writes it here (entries other than writes).
    fn finish(
        &self,
        db: &DB,
        mut batch: WriteBatch,
        state: &mut AppliedState,
        log_id: LogId,
    ) -> Result<(), StorageError> {
        Self::seal(db, &mut batch, state, log_id);
        db.write_opt(batch, &apply_write_options()).map_err(write_err)?;
        self.store.set_applied(state.clone());
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
        Self::seal(db, &mut batch, state, log_id);
        self.wait_in_flight()?;
        let jobs = self.writer.jobs.as_ref().expect("open until dropped");
        if jobs.send((db.clone(), batch, state.clone())).is_err() {
            return Err(write_err(std::io::Error::other("the apply writer thread stopped")));
        }
        self.in_flight = Some(state.clone());
        Ok(())
    }

    /// Waits until the batch in flight, if any, is written.
    fn wait_in_flight(&mut self) -> Result<(), StorageError> {
        if self.in_flight.take().is_none() {
            return Ok(());
        }
        match self.writer.done.recv() {
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
        let run = move || lock_applier(&applier).apply_all(entries);
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
        snapshot.flush().await.map_err(write_err)?;
        snapshot.sync_all().await.map_err(write_err)?;
        let file = snapshot.into_std().await;
        let _guard = self.snapshots.lock.lock().await;
        {
            let mut applier = self.applier();
            applier.wait_in_flight()?;
            applier.cache.clear();
        }
        let (store, dir, meta) = (self.store.clone(), self.snapshots.dir.clone(), meta.clone());
        tokio::task::spawn_blocking(move || install_blocking(&store, &dir, file, &meta))
            .await
            .map_err(write_err)?
            .map_err(|e| {
                StorageError::from(StorageIOError::write_snapshot(None, AnyError::error(format!("{e:#}"))))
            })
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let _guard = self.snapshots.lock.lock().await;
        self.snapshots.open_current().await
    }
}

impl SnapshotBuilder {
    async fn open_current(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let meta_bytes = match tokio::fs::read(self.dir.meta()).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let meta: SnapshotMeta = decode(&meta_bytes).map_err(read_err)?;
        let file = tokio::fs::File::open(self.dir.archive(&meta.snapshot_id)).await.map_err(read_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(file) }))
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

/// Checkpoint → archive → `current.snap` + `current.meta`.
fn build_blocking(store: &SmStore, dir: &SnapshotDir) -> anyhow::Result<()> {
    let checkpoint = dir.scratch("checkpoint");
    if checkpoint.exists() {
        std::fs::remove_dir_all(&checkpoint)?;
    }
    Checkpoint::new(&store.db())?.create_checkpoint(&checkpoint)?;
    let (last_applied, membership) = read_checkpoint_meta(&checkpoint)?;
    let building = dir.scratch("building.snap");
    pack(&checkpoint, &building)?;
    std::fs::remove_dir_all(&checkpoint)?;
    let index = last_applied.map(|l| l.index).unwrap_or(0);
    let meta = SnapshotMeta {
        last_log_id: last_applied,
        last_membership: membership,
        snapshot_id: format!("{index}-{}", crate::wall_clock_ms()),
    };
    publish(dir, &building, &meta)
}

/// The applied log id and membership recorded inside a checkpoint, which
/// must be in this binary's storage format.
fn read_checkpoint_meta(path: &std::path::Path) -> anyhow::Result<(Option<LogId>, StoredMembership)> {
    let db = DB::open_cf_for_read_only(&rocksdb::Options::default(), path, ALL_CFS, false)?;
    check_recorded(&db, path, CF_META, META_FORMAT)?;
    let meta = cf(&db, CF_META);
    let applied = db.get_cf(meta, META_APPLIED)?.map(|b| decode(&b)).transpose()?;
    let membership = db.get_cf(meta, META_MEMBERSHIP)?.map(|b| decode(&b)).transpose()?.unwrap_or_default();
    Ok((applied, membership))
}

/// Makes `archive` the current snapshot with `meta`. Crash-safe: the
/// archive is moved to its id's name first; replacing `current.meta` is the
/// one atomic switch; older archives are removed after.
fn publish(dir: &SnapshotDir, archive: &std::path::Path, meta: &SnapshotMeta) -> anyhow::Result<()> {
    std::fs::rename(archive, dir.archive(&meta.snapshot_id))?;
    let meta_tmp = dir.scratch("meta.tmp");
    std::fs::write(&meta_tmp, encode(meta))?;
    std::fs::File::open(&meta_tmp)?.sync_all()?;
    std::fs::rename(&meta_tmp, dir.meta())?;
    std::fs::File::open(&dir.root)?.sync_all()?;
    dir.remove_other_archives(&meta.snapshot_id)?;
    Ok(())
}

/// Unpacks the received archive into a new database, validates it against
/// `meta`, and only then swaps it in: a damaged, foreign-format or
/// mismatched snapshot leaves the live database as it was.
fn install_blocking(
    store: &SmStore,
    dir: &SnapshotDir,
    file: std::fs::File,
    meta: &SnapshotMeta,
) -> anyhow::Result<()> {
    let archive = received_archive(dir, file)?;
    let name = store.next_dir_name()?;
    let staging = store.dir().join(format!("{name}.tmp"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let unpacked = unpack(&archive, &staging).map_err(anyhow::Error::from);
    if let Err(e) = unpacked.and_then(|()| validate_checkpoint(&staging, meta)) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.context("snapshot refused, the live state machine is unchanged"));
    }
    std::fs::rename(&staging, store.dir().join(&name))?;
    store.swap_in(&name)?;
    publish(dir, &archive, meta)
}

/// The unpacked checkpoint at `path` holds the state `meta` describes: its
/// storage format is this binary's, its applied log id and membership are
/// the meta's.
fn validate_checkpoint(path: &std::path::Path, meta: &SnapshotMeta) -> anyhow::Result<()> {
    let (applied, membership) = read_checkpoint_meta(path)?;
    anyhow::ensure!(
        applied == meta.last_log_id,
        "the snapshot's database applied {applied:?}, its meta says {:?}",
        meta.last_log_id
    );
    anyhow::ensure!(
        membership == meta.last_membership,
        "the snapshot's database has membership {membership:?}, its meta says {:?}",
        meta.last_membership
    );
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
