//! The node's state database: ONE RocksDB at `<data>/state` holding the
//! state machines of every raft group on the node, each in its own key range
//! (every key starts with the group id: see [`super::keys`]). One block
//! cache, one memtable budget, one apply writer thread and one apply cache
//! budget serve every group; none of them grows with the number of groups.
//!
//! - Compaction filters decide per key with **that key's group's** durable
//!   clock ([`DurableClocks`]).
//! - A group's snapshot install writes a durable marker first
//!   (`NODE_PREFIX installing gid` in `meta`), then deletes the group's range
//!   and ingests the snapshot's SST files; a group found with the marker at
//!   open has the install done again from the archive the marker names
//!   (wiped only if that archive is gone or bad).
//! - Data dirs of the single-group layout (`<data>/sm`) are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, FlushOptions, IteratorMode, MemtableFactory,
    Options, ReadOptions, SliceTransform, WriteBatch, WriteOptions, DB,
};

use super::apply_writer::{ApplyWriter, CacheBudget};
use super::codec;
use super::keys::*;
use super::record::stored_expiry;
use crate::types::{GroupId, LogId};

pub use super::group::{AppliedState, GroupState};

/// The single-group name of a group's handle, kept for `log_store.rs`
/// (being rewritten into the multi-group log engine): it persists through
/// it and its suite builder opens group 0 with `SmStore::open`.
pub type SmStore = GroupState;

/// Users (and family records) whose decoded state apply keeps in memory,
/// all groups together.
pub const APPLY_CACHE_ENTRIES: usize = 100_000;

/// Encoded bytes of those heads and states, all groups together: the
/// bound on the cache's memory whatever the size of profiles (decoded,
/// they take a small multiple of it).
pub const APPLY_CACHE_BYTES: usize = 128 << 20;

/// The block cache of every column family, all groups together (what six
/// RocksDB default caches of 32 MiB, one per column family, came to).
pub const BLOCK_CACHE_BYTES: usize = 192 << 20;

/// The durable logical clock of each group (see [`GroupState`]): what the
/// compaction filters compare a key's expiry with. One slot per shard below
/// [`MAX_SHARDS`] and one for [`GroupId::META`]; a group without a known
/// clock (not opened since the node started, dropped, or another id) reads
/// `i64::MIN`, so the filter keeps all of its keys.
pub struct DurableClocks {
    shards: Box<[AtomicI64]>,
    meta: AtomicI64,
}

impl Default for DurableClocks {
    fn default() -> Self {
        DurableClocks {
            shards: (0..MAX_SHARDS).map(|_| AtomicI64::new(i64::MIN)).collect(),
            meta: AtomicI64::new(i64::MIN),
        }
    }
}

impl DurableClocks {
    fn slot(&self, gid: GroupId) -> Option<&AtomicI64> {
        match gid {
            GroupId::META => Some(&self.meta),
            GroupId(n) => self.shards.get(n as usize),
        }
    }

    pub fn get(&self, gid: GroupId) -> i64 {
        self.slot(gid).map_or(i64::MIN, |c| c.load(Ordering::Acquire))
    }

    pub fn set(&self, gid: GroupId, clock: i64) {
        if let Some(slot) = self.slot(gid) {
            slot.store(clock, Ordering::Release);
        }
    }

    /// The durable clock of the group `key` belongs to.
    fn of_key(&self, key: &[u8]) -> i64 {
        group_of(key).map_or(i64::MIN, |gid| self.get(gid))
    }
}

/// The node's state database (see the module docs).
pub struct StateDb {
    /// First: dropping it joins the writer thread before the database closes.
    writer: ApplyWriter,
    dir: PathBuf,
    db: Arc<DB>,
    clocks: Arc<DurableClocks>,
    /// Groups with a live handle ([`StateDb::open_group`] returns it again).
    groups: Mutex<BTreeMap<GroupId, Weak<GroupState>>>,
    cache_budget: Arc<CacheBudget>,
    /// Applies running at once, all groups together (each runs on tokio's
    /// blocking pool): at most one per core.
    apply_slots: Arc<tokio::sync::Semaphore>,
}

impl StateDb {
    /// Opens (or creates) the node's state database under `<data>/state`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Arc<StateDb>> {
        let old = data_dir.join("sm");
        anyhow::ensure!(
            !old.exists(),
            "{} holds a single-group state machine (storage format 2 or older); the single-group format \
             is not supported by this binary, which reads the sharded layout under {} (format {})",
            old.display(),
            data_dir.join("state").display(),
            super::format::STORAGE_FORMAT
        );
        let dir = data_dir.join("state");
        let clocks = Arc::new(DurableClocks::default());
        let db = Arc::new(open_db(&dir, clocks.clone())?);
        super::format::check_or_init(&db, &dir, CF_META, &node_meta(META_FORMAT), &[CF_META])?;
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        let state = StateDb {
            writer: ApplyWriter::start(db.clone()),
            dir,
            db,
            clocks,
            groups: Mutex::default(),
            cache_budget: Arc::new(CacheBudget::new(APPLY_CACHE_ENTRIES, APPLY_CACHE_BYTES)),
            apply_slots: Arc::new(tokio::sync::Semaphore::new(parallel)),
        };
        state.finish_interrupted_installs(data_dir)?;
        Ok(Arc::new(state))
    }

    /// The handle of group `gid` (the one already open, if any).
    pub fn open_group(self: &Arc<Self>, gid: GroupId) -> anyhow::Result<Arc<GroupState>> {
        anyhow::ensure!(valid_group(gid), "{gid} is not a shard below {MAX_SHARDS} nor the meta group");
        let mut groups = self.groups.lock().expect("groups lock");
        if let Some(open) = groups.get(&gid).and_then(Weak::upgrade) {
            return Ok(open);
        }
        let group = Arc::new(GroupState::new(self.clone(), gid));
        group.reload_caches()?;
        groups.insert(gid, Arc::downgrade(&group));
        Ok(group)
    }

    /// Groups with a live handle.
    pub fn open_groups(&self) -> Vec<Arc<GroupState>> {
        let groups = self.groups.lock().expect("groups lock");
        groups.values().filter_map(Weak::upgrade).collect()
    }

    /// Removes a replica: deletes the group's range in every column family
    /// (durably). Refused while a handle of the group is open: its state
    /// machine may still apply entries raft had queued before it stopped,
    /// and they would write a partial state, claiming their index, into
    /// the emptied range.
    pub fn drop_group(&self, gid: GroupId) -> anyhow::Result<()> {
        anyhow::ensure!(valid_group(gid), "{gid} is not a shard below {MAX_SHARDS} nor the meta group");
        let mut groups = self.groups.lock().expect("groups lock");
        if groups.get(&gid).is_some_and(|g| g.strong_count() > 0) {
            anyhow::bail!("the state of {gid} is still in use; stop its raft and drop its handles first");
        }
        groups.remove(&gid);
        self.delete_range(gid, Marker::Keep)?;
        // Flushed at once: a persisted-tier read (`durable_applied`: the log
        // purge guard, the TTL compaction filter's clock) skips the
        // memtables, and with them the range tombstone, while any apply
        // (written without the WAL) is unflushed. A replica of the group
        // placed here again would read the dropped one's index and clock.
        drop(groups);
        self.persist()?;
        self.clocks.set(gid, i64::MIN);
        Ok(())
    }

    /// The groups (the meta group too) that have an applied state in this
    /// database (an `applied` key in `meta`).
    pub fn groups_with_state(&self) -> anyhow::Result<BTreeSet<GroupId>> {
        let mut opts = ReadOptions::default();
        opts.set_total_order_seek(true);
        let mut found = BTreeSet::new();
        for item in self.db.iterator_cf_opt(cf(&self.db, CF_META), opts, IteratorMode::Start) {
            let (key, _) = item?;
            let gid = group_of(&key).filter(|g| valid_group(*g));
            if let Some(gid) = gid.filter(|_| key.len() == GROUP_PREFIX_LEN + META_APPLIED.len()) {
                if key.ends_with(META_APPLIED) {
                    found.insert(gid);
                }
            }
        }
        Ok(found)
    }

    /// The logical size of each of groups `gids`: the bytes of its keys
    /// and values in every column family, as of one RocksDB snapshot for
    /// all of them (what a snapshot of the group copies; values expired but
    /// not yet reclaimed count). Reads the groups' whole ranges, bypassing
    /// the block cache, with one iterator per column family for all the
    /// groups: a total-order iterator over the hash skip list memtables
    /// builds a sorted copy of the whole memtable when it is created, so one
    /// per group would copy it once per shard. Gives up (`Ok(None)`) as
    /// soon as `stop` says so, checked every few thousand keys: a scan of a
    /// large node must not hold its shutdown.
    pub fn groups_bytes(
        &self,
        gids: &[GroupId],
        stop: impl Fn() -> bool,
    ) -> Result<Option<BTreeMap<GroupId, u64>>, rocksdb::Error> {
        const CHECK_EVERY: u32 = 4096;
        let mut until_check = CHECK_EVERY;
        let snap = self.db.snapshot();
        let mut sizes: BTreeMap<GroupId, u64> = gids.iter().map(|&gid| (gid, 0)).collect();
        for name in ALL_CFS {
            let mut opts = ReadOptions::default();
            opts.set_total_order_seek(true);
            opts.fill_cache(false);
            let mut it = snap.raw_iterator_cf_opt(cf(&self.db, name), opts);
            // Ascending group order: ranges ascend with the group id.
            for (&gid, bytes) in sizes.iter_mut() {
                let (start, end) = group_range(gid);
                it.seek(&start);
                while let (Some(key), Some(value)) = (it.key(), it.value()) {
                    if key >= end.as_slice() {
                        break;
                    }
                    *bytes += (key.len() + value.len()) as u64;
                    it.next();
                    until_check -= 1;
                    if until_check == 0 {
                        if stop() {
                            return Ok(None);
                        }
                        until_check = CHECK_EVERY;
                    }
                }
                it.status()?;
            }
        }
        Ok(Some(sizes))
    }

    pub fn db(&self) -> Arc<DB> {
        self.db.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn clocks(&self) -> &DurableClocks {
        &self.clocks
    }

    pub(crate) fn writer(&self) -> &ApplyWriter {
        &self.writer
    }

    pub(crate) fn cache_budget(&self) -> Arc<CacheBudget> {
        self.cache_budget.clone()
    }

    /// The options snapshot SST files of column family `name` are written with.
    pub fn sst_options(&self, name: &str) -> Options {
        cf_options_for(name, &self.clocks, None)
    }

    pub(crate) fn apply_slots(&self) -> Arc<tokio::sync::Semaphore> {
        self.apply_slots.clone()
    }

    /// What the flushed column families hold for group `gid`:
    /// `(last_applied index, clock)`. A read that skips the memtables
    /// (RocksDB's persisted tier; applies write no WAL, so only flushed data
    /// survives a crash). The meta group writes through the WAL, unsynced
    /// ([`meta_apply_write_options`]), and the persisted tier reads the
    /// memtables while the process has written nothing without the WAL:
    /// the WAL is synced first, so what the read finds is on disk either way.
    /// A row that does not decode is an error, not "nothing applied": a
    /// purge waiting for that index would wait for good, unexplained.
    pub fn durable_applied(&self, gid: GroupId) -> anyhow::Result<(u64, i64)> {
        if gid == GroupId::META {
            self.db.flush_wal(true)?;
        }
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_read_tier(rocksdb::ReadTier::Persisted);
        let meta_cf = cf(&self.db, CF_META);
        let get = |name| self.db.get_cf_opt(meta_cf, meta(gid, name), &opts);
        let applied: Option<LogId> = get(META_APPLIED)?.map(|b| codec::decode(&b)).transpose()?;
        let clock: Option<i64> = get(META_CLOCK)?.map(|b| codec::decode(&b)).transpose()?;
        Ok((applied.map_or(0, |l| l.index), clock.unwrap_or(i64::MIN)))
    }

    /// The cluster's number of shards as this node recorded it (`None`: a
    /// node that never started before).
    pub fn shards(&self) -> anyhow::Result<Option<u32>> {
        let Some(bytes) = self.db.get_cf(cf(&self.db, CF_META), node_meta(META_SHARDS))? else {
            return Ok(None);
        };
        let bytes: [u8; 4] = bytes[..].try_into().map_err(|_| {
            anyhow::anyhow!("{}: the stored number of shards is not 4 bytes", self.dir.display())
        })?;
        Ok(Some(u32::from_le_bytes(bytes)))
    }

    /// Records the cluster's number of shards (synced).
    pub fn set_shards(&self, shards: u32) -> anyhow::Result<()> {
        let key = node_meta(META_SHARDS);
        Ok(self.db.put_cf_opt(cf(&self.db, CF_META), key, shards.to_le_bytes(), &synced())?)
    }

    /// The incarnation of this data dir: a random number (never 0) drawn
    /// when the node first started and stored with its id (synced). Peers
    /// address raft messages to it, so a node restarted under its id on an
    /// empty data dir (its votes and log lost) is told apart from the node
    /// they knew. A data dir created for another node id is refused.
    pub fn identity(&self, node_id: u64) -> anyhow::Result<u64> {
        let (meta_cf, key) = (cf(&self.db, CF_META), node_meta(META_IDENTITY));
        if let Some(bytes) = self.db.get_cf(meta_cf, &key)? {
            let (id, incarnation) = match bytes.len() {
                16 => (
                    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
                    u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes")),
                ),
                n => anyhow::bail!("{}: the stored node identity is {n} bytes, not 16", self.dir.display()),
            };
            anyhow::ensure!(
                id == node_id,
                "data dir {} belongs to node {id}, not node {node_id}: start it with --node-id {id}, or give \
                 node {node_id} its own data dir",
                self.dir.parent().unwrap_or(&self.dir).display()
            );
            return Ok(incarnation);
        }
        let incarnation = loop {
            match rand::random::<u64>() {
                0 => continue,
                n => break n,
            }
        };
        let mut value = node_id.to_le_bytes().to_vec();
        value.extend_from_slice(&incarnation.to_le_bytes());
        self.db.put_cf_opt(meta_cf, key, value, &synced())?;
        Ok(incarnation)
    }

    /// Reads group `gid`'s durable clock back for the compaction filter.
    pub fn refresh_durable_clock(&self, gid: GroupId) {
        match self.durable_applied(gid) {
            Ok((_, clock)) => self.clocks.set(gid, clock),
            Err(e) => tracing::warn!(group = %gid, error = %e, "reading the durable clock"),
        }
    }

    /// Makes every applied write of every group durable (called before raft
    /// purges logs): applies are written without the RocksDB WAL (the raft
    /// log is the write-ahead log of the state machine), so this flushes the
    /// memtables of every column family, atomically.
    pub fn persist(&self) -> Result<(), rocksdb::Error> {
        let cfs: Vec<_> = ALL_CFS.iter().map(|name| cf(&self.db, name)).collect();
        let mut opts = FlushOptions::default();
        opts.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &opts)?;
        for group in self.open_groups() {
            group.refresh_durable_clock(None);
        }
        Ok(())
    }

    /// RocksDB's estimate of the bytes group `gid` takes in the SST files
    /// of every column family (compressed; memtables not counted): a stand-in
    /// for its logical size before that is measured.
    pub fn approximate_bytes(&self, gid: GroupId) -> u64 {
        let (start, end) = group_range(gid);
        ALL_CFS
            .iter()
            .flat_map(|name| {
                self.db.get_approximate_sizes_cf(cf(&self.db, name), &[rocksdb::Range::new(&start, &end)])
            })
            .sum()
    }

    /// Deletes group `gid`'s range in every column family, and sets or
    /// clears its install marker in the same synced write.
    pub(crate) fn delete_range(&self, gid: GroupId, marker: Marker) -> Result<(), rocksdb::Error> {
        let (start, end) = group_range(gid);
        let mut batch = WriteBatch::default();
        for name in ALL_CFS {
            batch.delete_range_cf(cf(&self.db, name), &start, &end);
        }
        match marker {
            Marker::Set(record) => batch.put_cf(cf(&self.db, CF_META), installing(gid), record),
            Marker::Wiped => {
                batch.delete_cf(cf(&self.db, CF_META), installing(gid));
                batch.put_cf(cf(&self.db, CF_META), log_reset(gid), []);
            }
            Marker::Keep => {}
        }
        self.db.write_opt(batch, &synced())
    }

    /// Whether group `gid`'s state was wiped at open (an interrupted install
    /// could not be finished) and its raft log must be emptied, the vote
    /// kept, before the group opens; then [`StateDb::clear_log_reset`].
    pub fn log_reset_pending(&self, gid: GroupId) -> Result<bool, rocksdb::Error> {
        Ok(self.db.get_pinned_cf(cf(&self.db, CF_META), log_reset(gid))?.is_some())
    }

    /// Clears group `gid`'s log reset marker (synced), once its log is empty.
    pub fn clear_log_reset(&self, gid: GroupId) -> Result<(), rocksdb::Error> {
        self.db.delete_cf_opt(cf(&self.db, CF_META), log_reset(gid), &synced())
    }

    /// Clears group `gid`'s install marker (synced).
    pub(crate) fn clear_install_marker(&self, gid: GroupId) -> Result<(), rocksdb::Error> {
        self.db.delete_cf_opt(cf(&self.db, CF_META), installing(gid), &synced())
    }

    /// Finishes the snapshot installs a crash interrupted: the marker
    /// names the validated archive and its meta, so the install is done
    /// again from it (the group then holds the snapshot, as openraft was
    /// about to be told). Only when the archive is gone or unreadable is
    /// the group wiped, and its raft log marked to be emptied before it
    /// opens (its leader then sends a snapshot again).
    fn finish_interrupted_installs(&self, data_dir: &Path) -> anyhow::Result<()> {
        let prefix = node_meta(META_INSTALLING);
        let meta = cf(&self.db, CF_META);
        let mut interrupted = Vec::new();
        for item in self.db.iterator_cf(meta, IteratorMode::From(&prefix, Direction::Forward)) {
            let (key, record) = item?;
            match parse_installing(&key) {
                Some(gid) => interrupted.push((gid, record)),
                None => break,
            }
        }
        for (gid, record) in interrupted {
            match super::group_snapshot::redo_install(self, data_dir, gid, &record) {
                Ok(index) => {
                    tracing::warn!(group = %gid, index, "finished a snapshot install a crash interrupted")
                }
                Err(super::group_snapshot::RedoError::Failed(e)) => {
                    anyhow::bail!(
                        "{gid}: a snapshot install a crash interrupted could not be finished ({e:#}); nothing \
                         was wiped: fix the cause (disk full? failing disk?) and start the node again"
                    );
                }
                Err(super::group_snapshot::RedoError::Damaged(e)) => {
                    tracing::error!(
                        group = %gid,
                        error = format!("{e:#}"),
                        "a snapshot install was interrupted and its archive is gone or damaged: the group \
                         starts empty"
                    );
                    // Nothing of the group is left: no state, no snapshot
                    // (openraft would take the group for one at that
                    // snapshot's index), and its log is emptied at open.
                    super::snapshot::SnapshotDir::new(data_dir, gid)?.clear()?;
                    self.delete_range(gid, Marker::Wiped)?;
                    // Flushed, as in `drop_group`: the group's durable index
                    // and clock are read from the persisted tier.
                    self.persist()?;
                }
            }
        }
        Ok(())
    }
}

/// What a range delete does to the group's install marker.
pub(crate) enum Marker {
    /// Sets it, with the install's record (see `group_snapshot`).
    Set(Vec<u8>),
    /// Clears it and marks the group's raft log to be emptied before the
    /// group opens (see [`StateDb::log_reset_pending`]).
    Wiped,
    Keep,
}

fn synced() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    opts
}

/// A column family handle; the families are created at open, so a missing
/// one is a programming error.
pub fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} is created at open"))
}

/// Opens the state database with its column families and filters.
/// `clocks` are the durable logical clocks the compaction filters compare
/// expiries with (see [`DurableClocks`]).
pub fn open_db(path: &Path, clocks: Arc<DurableClocks>) -> Result<DB, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // One writer (the apply writer thread): the single-writer memtable
    // insert path with splice hints is much cheaper than the concurrent one.
    opts.set_allow_concurrent_memtable_write(false);
    opts.set_enable_write_thread_adaptive_yield(false);
    // Applies skip the WAL (see `apply_write_options`): column families must
    // then flush together, or a crash could leave one column family ahead
    // of `last_applied` in `meta`.
    opts.set_atomic_flush(true);
    // Memtables of all column families (and so of all groups) together:
    // past this, the fullest flushes (with atomic flush, all of them).
    opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
    let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let cfs: Vec<_> = ALL_CFS
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, cf_options_for(name, &clocks, Some(&cache))))
        .collect();
    DB::open_cf_descriptors(&opts, path, cfs)
}

/// The options of column family `name` (also what snapshot SST files are
/// written with, without `cache`).
pub fn cf_options_for(name: &str, clocks: &Arc<DurableClocks>, cache: Option<&Cache>) -> Options {
    let filter = match name {
        CF_PROFILES => Some("portrait-profile-ttl"),
        CF_HISTORY => Some("portrait-history-ttl"),
        CF_DEDUPE => Some("portrait-dedupe-ttl"),
        _ => None,
    };
    let mut block = BlockBasedOptions::default();
    if let Some(cache) = cache {
        block.set_block_cache(cache);
    }
    match filter {
        Some(filter) => expiring_cf_options(filter, clocks.clone(), block),
        None => {
            let mut opts = cf_options();
            opts.set_block_based_table_factory(&block);
            match name {
                CF_STATE => user_keyed(opts),
                _ => opts,
            }
        }
    }
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
/// [`StateDb::persist`] flushed. Saves encoding, checksumming and writing
/// every applied byte twice.
pub fn apply_write_options() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.disable_wal(true);
    opts
}

/// How the meta group's applied entries are written: through the WAL, not
/// synced. Its entries are few (membership, the map, schemas), and a node
/// must know the map it last applied from its first message after a
/// restart, before its meta replica hears from the leader again: the map
/// records which data dir each node runs on, and raft messages are checked
/// against it. A process crash (`kill -9`) then loses none of them (the
/// WAL is in the page cache); a machine crash may lose the tail since the
/// last sync, which raft replays as for a shard. Every entry of the group
/// goes this way, not only the map's: recovery replays the WAL's batches
/// only, and a logged entry after an unlogged one would otherwise come
/// back without it (e.g. a membership).
pub fn meta_apply_write_options() -> WriteOptions {
    WriteOptions::default()
}

/// Options for a column family whose values start with an 8-byte expiry:
/// bloom filters for point lookups and a compaction filter that drops values
/// expired by the durable logical clock. Using the logical clock (not the
/// wall clock) keeps replicas identical: every later entry has a stamp at or
/// past that clock, so apply would treat the dropped value as expired anyway,
/// on every replica, however far behind it applies; and the durable one
/// (not the applied one, which runs ahead of the last flush) keeps that true
/// for the entries replayed after a crash.
///
/// Each key is judged by its own group's durable clock: groups apply at
/// their own pace, and another group's clock says nothing about what a
/// replay of this group may still read.
fn expiring_cf_options(
    filter_name: &'static str,
    clocks: Arc<DurableClocks>,
    mut block: BlockBasedOptions,
) -> Options {
    let mut opts = user_keyed(cf_options());
    block.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&block);
    // Most dedupe lookups miss: a memtable bloom filter answers them without
    // walking the bucket.
    opts.set_memtable_whole_key_filtering(true);
    opts.set_memtable_prefix_bloom_ratio(0.1);

    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_compaction_filter(
        filter_name,
        move |_level: u32, key: &[u8], value: &[u8]| match stored_expiry(value) {
            Some(exp) if exp <= clocks.of_key(key) => rocksdb::compaction_filter::Decision::Remove,
            _ => rocksdb::compaction_filter::Decision::Keep,
        },
    );
    opts
}

/// Options for a column family keyed by `gid user` or `gid user ⟂ ...`: the
/// group and user id are the key prefix, and the memtable is a hash table of per-user
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

/// The group and user part of a key: the 4-byte group prefix and everything
/// after it up to the first separator (group ids may contain the separator
/// byte, so the search starts after them).
fn user_of_key(key: &[u8]) -> &[u8] {
    let Some(rest) = key.get(GROUP_PREFIX_LEN..) else { return key };
    rest.iter().position(|&b| b == SEP).map_or(key, |i| &key[..GROUP_PREFIX_LEN + i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_of_a_key_is_its_group_and_user() {
        let gid = GroupId(0);
        assert_eq!(user_of_key(&profile(gid, "u1", "browse")), &state(gid, "u1")[..]);
        assert_eq!(user_of_key(&history(gid, "u1", "browse", 0)), &state(gid, "u1")[..]);
        assert_eq!(user_of_key(&state(gid, "u1")), &state(gid, "u1")[..]);
        assert_eq!(user_of_key(&state(GroupId(256), "u1")), &state(GroupId(256), "u1")[..]);
        assert_eq!(user_of_key(b"ab"), b"ab");
    }

    #[test]
    fn a_data_dir_keeps_its_node_id_and_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let db = StateDb::open(dir.path()).unwrap();
            let incarnation = db.identity(3).unwrap();
            assert_ne!(incarnation, 0);
            assert_eq!(db.identity(3).unwrap(), incarnation);
            incarnation
        };
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.identity(3).unwrap(), first, "kept across a restart");
        let e = db.identity(4).unwrap_err().to_string();
        assert!(e.contains("belongs to node 3, not node 4: start it with --node-id 3"), "{e}");
        let other = tempfile::tempdir().unwrap();
        assert_ne!(StateDb::open(other.path()).unwrap().identity(3).unwrap(), first, "a new data dir");
    }

    #[test]
    fn unknown_groups_have_no_durable_clock() {
        let clocks = DurableClocks::default();
        clocks.set(GroupId(3), 7);
        clocks.set(GroupId::META, 9);
        clocks.set(GroupId(MAX_SHARDS), 11);
        assert_eq!(clocks.of_key(&state(GroupId(3), "u")), 7);
        assert_eq!(clocks.of_key(&state(GroupId::META, "u")), 9);
        assert_eq!(clocks.of_key(&state(GroupId(4), "u")), i64::MIN);
        assert_eq!(clocks.of_key(&state(GroupId(MAX_SHARDS), "u")), i64::MIN);
        assert_eq!(clocks.of_key(b"x"), i64::MIN);
    }
}
