//! The state-machine RocksDB instance, shared by the raft state machine
//! (writes) and the read path, and replaceable as a whole when a snapshot
//! is installed.
//!
//! `<data>/sm/CURRENT` names the live database directory (`db-N`); it is
//! replaced atomically (write temp, fsync, rename) when a snapshot installs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, FlushOptions, MemtableFactory, Options, SliceTransform,
    WriteOptions, DB,
};

use super::codec;
use super::keys::*;
use super::record::stored_expiry;
use super::threads::Joined;
use crate::engine::Engine;
use crate::schema::VersionedSchema;
use crate::types::{LogId, StoredMembership};

/// What the state machine has applied, cached in memory.
#[derive(Debug, Clone, Default)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// Logical clock: the largest entry stamp applied so far.
    pub clock_ms: i64,
}

/// How often apply reads the durable clock back (one point read that
/// skips the memtables).
const DURABLE_CLOCK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The shared handle to the live state-machine database.
pub struct SmStore {
    dir: PathBuf,
    db: RwLock<Arc<DB>>,
    schema: RwLock<Arc<VersionedSchema>>,
    /// The compiled features and tags of `schema`.
    engine: RwLock<Arc<Engine>>,
    applied: Mutex<AppliedState>,
    /// The applied logical clock (what apply has reached; stamps are never
    /// below it).
    clock: AtomicI64,
    /// The logical clock that is **durable**: the one in the flushed
    /// column families (applies skip the WAL, so memtables are lost in a
    /// crash). The compaction filter compares expiries with this one, never
    /// with `clock`: after a crash, replay starts from the flushed state and
    /// may still read a value that expires between the two (a dedupe
    /// marker, say); deleting it by the newer clock would let the replay
    /// apply that event again, and replicas would differ.
    durable_clock: Arc<AtomicI64>,
    /// When the durable clock was last read back.
    durable_read_at: Mutex<Option<std::time::Instant>>,
    /// Threads closing and deleting replaced databases (joined on drop).
    retiring: Joined,
    /// The log index whose batch is in the database (what reads see), or
    /// why the state machine stopped writing. Apply hands an entry's batch
    /// to a writer thread and goes on with the next entry, so openraft may
    /// count an entry applied a moment before this index reaches it; replies
    /// and linearizable reads wait for it ([`SmStore::wait_written`]).
    written: tokio::sync::watch::Sender<Written>,
}

/// See [`SmStore::wait_written`].
#[derive(Debug, Clone, Default)]
struct Written {
    index: u64,
    failure: Option<Arc<str>>,
}

impl SmStore {
    /// Opens (or creates) the state machine under `<data>/sm`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Arc<SmStore>> {
        let dir = data_dir.join("sm");
        std::fs::create_dir_all(&dir)?;
        let current = read_current(&dir)?;
        remove_stale_dirs(&dir, &current)?;
        let durable_clock = Arc::new(AtomicI64::new(i64::MIN));
        let db = open_db(&dir.join(&current), durable_clock.clone())?;
        check_format(&db, &dir.join(&current))?;
        let store = SmStore {
            dir,
            db: RwLock::new(Arc::new(db)),
            schema: RwLock::new(Arc::default()),
            engine: RwLock::new(Arc::new(Engine::empty())),
            applied: Mutex::new(AppliedState::default()),
            clock: AtomicI64::new(0),
            durable_clock,
            durable_read_at: Mutex::new(None),
            retiring: Joined::default(),
            written: tokio::sync::watch::Sender::new(Written::default()),
        };
        store.reload_caches()?;
        Ok(Arc::new(store))
    }

    pub fn db(&self) -> Arc<DB> {
        self.db.read().expect("db lock").clone()
    }

    pub fn schema(&self) -> Arc<VersionedSchema> {
        self.schema.read().expect("schema lock").clone()
    }

    pub fn engine(&self) -> Arc<Engine> {
        self.engine.read().expect("engine lock").clone()
    }

    /// Installs a schema and its compiled engine. Stored schemas were
    /// validated before they were applied, so building cannot fail unless
    /// the binary's rule language changed incompatibly.
    pub(crate) fn set_schema(&self, schema: VersionedSchema) {
        let engine = Engine::build(&schema.schema).unwrap_or_else(|e| {
            tracing::error!(version = schema.version, error = %e, "stored schema does not compile; tags disabled");
            Engine::empty()
        });
        *self.engine.write().expect("engine lock") = Arc::new(engine);
        *self.schema.write().expect("schema lock") = Arc::new(schema);
    }

    /// The applied logical clock: the largest entry stamp applied.
    pub fn clock_ms(&self) -> i64 {
        self.clock.load(Ordering::Acquire)
    }

    /// The logical clock the compaction filter uses (see `durable_clock`).
    pub fn durable_clock_ms(&self) -> i64 {
        self.durable_clock.load(Ordering::Acquire)
    }

    /// What the flushed column families hold: `(last_applied index, clock)`.
    /// A read that skips the memtables (RocksDB's persisted tier; applies
    /// write no WAL, so only flushed data survives a crash).
    pub fn durable_applied(&self) -> Result<(u64, i64), rocksdb::Error> {
        let db = self.db();
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_read_tier(rocksdb::ReadTier::Persisted);
        let meta = cf(&db, CF_META);
        let applied: Option<LogId> =
            db.get_cf_opt(meta, META_APPLIED, &opts)?.and_then(|b| codec::decode(&b).ok());
        let clock: Option<i64> = db.get_cf_opt(meta, META_CLOCK, &opts)?.and_then(|b| codec::decode(&b).ok());
        Ok((applied.map_or(0, |l| l.index), clock.unwrap_or(i64::MIN)))
    }

    /// Reads the durable clock back for the compaction filter (after a
    /// flush, or at most every `every` while applying: RocksDB flushes on
    /// its own when memtables fill, and a lagging value only makes the
    /// filter keep more).
    pub fn refresh_durable_clock(&self, every: Option<std::time::Duration>) {
        {
            let mut at = self.durable_read_at.lock().expect("durable clock lock");
            if let (Some(every), Some(last)) = (every, *at) {
                if last.elapsed() < every {
                    return;
                }
            }
            *at = Some(std::time::Instant::now());
        }
        match self.durable_applied() {
            Ok((_, clock)) => self.durable_clock.store(clock, Ordering::Release),
            Err(e) => tracing::warn!(error = %e, "reading the durable clock"),
        }
    }

    pub fn applied(&self) -> AppliedState {
        self.applied.lock().expect("applied lock").clone()
    }

    /// Records what the database now holds (called once its batch is
    /// written): reads report it, and waiters for its index are released.
    pub(crate) fn set_applied(&self, state: AppliedState) {
        self.clock.store(state.clock_ms, Ordering::Release);
        let index = state.last_applied.map_or(0, |l| l.index);
        *self.applied.lock().expect("applied lock") = state;
        self.written.send_modify(|w| w.index = index);
        self.refresh_durable_clock(Some(DURABLE_CLOCK_EVERY));
    }

    /// The state machine can no longer write: every waiter gets `reason`.
    pub(crate) fn set_write_failure(&self, reason: String) {
        self.written.send_modify(|w| w.failure = Some(reason.into()));
    }

    /// Waits until the entry at `index` (and everything before it) is in the
    /// database, so what a reply acknowledges or a linearizable read
    /// promises is what a read then sees.
    pub async fn wait_written(&self, index: u64) -> Result<(), String> {
        let mut rx = self.written.subscribe();
        let w = rx.wait_for(|w| w.index >= index || w.failure.is_some()).await.map_err(|e| e.to_string())?;
        match &w.failure {
            Some(reason) if w.index < index => Err(format!("state machine stopped writing: {reason}")),
            _ => Ok(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The running background re-evaluation, if any.
    pub fn reeval_progress(&self) -> Result<Option<crate::types::ReevalProgress>, super::apply::ApplyError> {
        let db = self.db();
        let raw = db.get_cf(cf(&db, CF_META), META_REEVAL)?;
        Ok(raw.map(|b| codec::decode(&b)).transpose()?)
    }

    /// Makes every applied write durable (called before raft purges logs):
    /// applies are written without the RocksDB WAL (the raft log is the
    /// write-ahead log of the state machine), so this flushes the memtables
    /// of every column family, atomically.
    pub fn persist(&self) -> Result<(), rocksdb::Error> {
        let db = self.db();
        let cfs: Vec<_> = ALL_CFS.iter().map(|name| cf(&db, name)).collect();
        let mut opts = FlushOptions::default();
        opts.set_wait(true);
        db.flush_cfs_opt(&cfs, &opts)?;
        self.refresh_durable_clock(None);
        Ok(())
    }

    /// Replaces the live database with the one in `new_dir` (a directory
    /// name under `<data>/sm`), which must be complete and synced.
    pub fn swap_in(&self, new_dir: &str) -> anyhow::Result<()> {
        let db = open_db(&self.dir.join(new_dir), self.durable_clock.clone())?;
        write_current(&self.dir, new_dir)?;
        let old = std::mem::replace(&mut *self.db.write().expect("db lock"), Arc::new(db));
        self.reload_caches()?;
        retire(&self.retiring, old);
        Ok(())
    }

    /// A fresh directory name for the next database.
    pub fn next_dir_name(&self) -> anyhow::Result<String> {
        let current = read_current(&self.dir)?;
        let n: u64 = current.trim_start_matches("db-").parse().unwrap_or(0);
        Ok(format!("db-{}", n + 1))
    }

    fn reload_caches(&self) -> anyhow::Result<()> {
        let db = self.db();
        let meta = cf(&db, CF_META);
        let get = |k: &[u8]| db.get_cf(meta, k);
        let schema = match get(META_SCHEMA)? {
            Some(b) => codec::decode(&b)?,
            None => VersionedSchema::default(),
        };
        let applied = AppliedState {
            last_applied: get(META_APPLIED)?.map(|b| codec::decode(&b)).transpose()?,
            membership: get(META_MEMBERSHIP)?.map(|b| codec::decode(&b)).transpose()?.unwrap_or_default(),
            clock_ms: get(META_CLOCK)?.map(|b| codec::decode(&b)).transpose()?.unwrap_or(0),
        };
        self.set_schema(schema);
        self.set_applied(applied);
        // Just opened: nothing is in a memtable, everything read is durable.
        self.refresh_durable_clock(None);
        Ok(())
    }
}

/// Refuses a database written in another storage format before anything
/// is read from it; records the format in a new one.
fn check_format(db: &DB, path: &Path) -> anyhow::Result<()> {
    super::format::check_or_init(db, path, CF_META, META_FORMAT, &[CF_META])
}

/// A column family handle; the families are created at open, so a missing
/// one is a programming error.
pub fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} is created at open"))
}

/// Opens a state-machine database with its column families and filters.
/// `clock` is the durable logical clock the compaction filter compares
/// expiries with (see [`SmStore`]'s `durable_clock`).
pub fn open_db(path: &Path, clock: Arc<AtomicI64>) -> Result<DB, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // One writer (the apply loop): the single-writer memtable insert path
    // with splice hints is much cheaper than the concurrent one.
    opts.set_allow_concurrent_memtable_write(false);
    opts.set_enable_write_thread_adaptive_yield(false);
    // Applies skip the WAL (see `apply_write_options`): column families must
    // then flush together, or a crash could leave one column family ahead
    // of `last_applied` in `meta`.
    opts.set_atomic_flush(true);
    // Memtables of all column families together: past this, the fullest
    // flushes (with atomic flush, all of them). Bounds what `cf_options`'
    // four memtables per column family could otherwise reach.
    opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_PROFILES, expiring_cf_options("portrait-profile-ttl", clock.clone())),
        ColumnFamilyDescriptor::new(CF_HISTORY, expiring_cf_options("portrait-history-ttl", clock.clone())),
        ColumnFamilyDescriptor::new(CF_DEDUPE, expiring_cf_options("portrait-dedupe-ttl", clock)),
        ColumnFamilyDescriptor::new(CF_META, cf_options()),
        ColumnFamilyDescriptor::new(CF_STATE, user_keyed(cf_options())),
        ColumnFamilyDescriptor::new(CF_TIMERS, cf_options()),
    ];
    DB::open_cf_descriptors(&opts, path, cfs)
}

/// Memory for the state machine's memtables, all column families together.
pub const MEMTABLE_BUDGET_BYTES: usize = 512 << 20;

/// What every state-machine column family starts from: up to three full
/// memtables may wait for their flush before apply stalls. With RocksDB's
/// default of two, a flush slower than apply stopped every write until it
/// finished.
fn cf_options() -> Options {
    let mut opts = Options::default();
    opts.set_max_write_buffer_number(4);
    opts
}

/// How applied entries are written: no RocksDB WAL. The raft log already
/// holds every entry durably, and `last_applied` is written in the same batch
/// as the state it covers; after a crash the memtables are lost together
/// (atomic flush), `last_applied` rolls back with them, and raft re-applies
/// the missing entries from its log, which is never purged past what
/// [`SmStore::persist`] flushed. Saves encoding, checksumming and writing
/// every applied byte twice.
pub fn apply_write_options() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.disable_wal(true);
    opts
}

/// Options for a column family whose values start with an 8-byte expiry:
/// bloom filters for point lookups and a compaction filter that drops values
/// expired by the durable logical clock. Using the logical clock (not the
/// wall clock) keeps replicas identical: every later entry has a stamp at or
/// past that clock, so apply would treat the dropped value as expired anyway,
/// on every replica, however far behind it applies; and the durable one
/// (not the applied one, which runs ahead of the last flush) keeps that true
/// for the entries replayed after a crash.
fn expiring_cf_options(filter_name: &'static str, clock: Arc<AtomicI64>) -> Options {
    let mut opts = user_keyed(cf_options());
    let mut block = BlockBasedOptions::default();
    block.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&block);
    // Most dedupe lookups miss: a memtable bloom filter answers them without
    // walking the bucket.
    opts.set_memtable_whole_key_filtering(true);
    opts.set_memtable_prefix_bloom_ratio(0.1);

    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_compaction_filter(
        filter_name,
        move |_level: u32, _key: &[u8], value: &[u8]| match stored_expiry(value) {
            Some(exp) if exp <= clock.load(Ordering::Acquire) => rocksdb::compaction_filter::Decision::Remove,
            _ => rocksdb::compaction_filter::Decision::Keep,
        },
    );
    opts
}

/// Options for a column family keyed by `user` or `user ⟂ ...`: the user
/// id is the key prefix, and the memtable is a hash table of per-user
/// skiplists. Apply writes rows of ~100 random users per entry; in one big
/// skiplist every insert walks ~20 levels of cache-missing nodes (a third
/// of apply's CPU in profiles), in a user's bucket only a few.
///
/// Consequences for readers: a seek stays within one user
/// (`ReadOptions::set_prefix_same_as_start`), and an iteration across users
/// must ask for `set_total_order_seek` (slower: it sorts the memtable).
fn user_keyed(mut opts: Options) -> Options {
    opts.set_prefix_extractor(SliceTransform::create("portrait-user-prefix", user_of_key, None));
    opts.set_memtable_factory(MemtableFactory::HashSkipList {
        bucket_count: 1 << 18,
        height: 4,
        branching_factor: 4,
    });
    opts
}

/// The user part of a key: everything before the first separator.
fn user_of_key(key: &[u8]) -> &[u8] {
    key.iter().position(|&b| b == SEP).map_or(key, |i| &key[..i])
}

fn read_current(dir: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(dir.join("CURRENT")) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_current(dir, "db-0")?;
            Ok("db-0".into())
        }
        Err(e) => Err(e),
    }
}

fn write_current(dir: &Path, name: &str) -> std::io::Result<()> {
    let tmp = dir.join("CURRENT.tmp");
    std::fs::write(&tmp, name)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join("CURRENT"))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes databases left over from an interrupted or finished swap.
fn remove_stale_dirs(dir: &Path, current: &str) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("db-") && name != current && entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// Closes and deletes a replaced database once no reader holds it.
fn retire(threads: &Joined, old: Arc<DB>) {
    threads.spawn("sm-retire", move || {
        let path = old.path().to_path_buf();
        for _ in 0..600 {
            if Arc::strong_count(&old) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        drop(old);
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove replaced state machine");
        }
    });
}
