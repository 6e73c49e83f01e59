//! A group's handle on the node's state database: the group's schema and
//! compiled engine, what it has applied, its logical clocks, and the watch
//! replies and linearizable reads wait on. One per raft group on the node
//! (the role the single state machine's store had before shards).

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::DB;

use super::codec;
use super::keys::*;
use super::sm_db::{cf, StateDb};
use crate::engine::Engine;
use crate::schema::VersionedSchema;
use crate::types::{GroupId, LogId, NodeId, StoredMembership};
use portrait_core::meta::MetaState;

/// What a group's state machine has applied, cached in memory.
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

/// One group's state (see the module docs).
pub struct GroupState {
    gid: GroupId,
    state_db: Arc<StateDb>,
    schema: RwLock<Arc<VersionedSchema>>,
    /// The meta group's state (empty in shard groups), watched by the
    /// node's placement and schema tasks.
    cluster: tokio::sync::watch::Sender<Arc<MetaState>>,
    /// The compiled features and tags of `schema`.
    engine: RwLock<Arc<Engine>>,
    /// The apply rules version the group applies by (`Command::Rules`).
    rules: std::sync::atomic::AtomicU32,
    applied: Mutex<AppliedState>,
    /// The applied logical clock (what apply has reached; stamps are never
    /// below it).
    clock: AtomicI64,
    /// When the durable clock was last read back. The durable clock itself
    /// (the one in the flushed column families: applies skip the WAL, so
    /// memtables are lost in a crash) is the group's slot in the node's
    /// [`super::sm_db::DurableClocks`]; the compaction filters compare
    /// expiries with it, never with `clock`: after a crash, replay starts
    /// from the flushed state and may still read a value that expires
    /// between the two (a dedupe marker, say); deleting it by the newer
    /// clock would let the replay apply that event again, and replicas
    /// would differ.
    durable_read_at: Mutex<Option<std::time::Instant>>,
    /// The log index whose batch is in the database (what reads see), or
    /// why the state machine stopped writing. Apply hands an entry's batch
    /// to the writer thread and goes on with the next entry, so openraft may
    /// count an entry applied a moment before this index reaches it; replies
    /// and linearizable reads wait for it ([`GroupState::wait_written`]).
    written: tokio::sync::watch::Sender<Written>,
    /// Held shared while a read takes the group's rows, and exclusively by
    /// a snapshot install from its range delete to its cache reload: a read
    /// sees the state before the install or the one after, never the
    /// emptied or half-ingested range ([`GroupState::read_rows`]). Holds
    /// `true` once an install failed midway: the range may be emptied or
    /// half ingested for good (the group's raft stops on the error, and the
    /// node with it), and no read takes it ([`GroupState::try_read_rows`]).
    rows: RwLock<bool>,
}

/// Why a replica's rows cannot be read now ([`GroupState::try_read_rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsBusy {
    /// A snapshot install is replacing them.
    Installing,
    /// A snapshot install failed midway: they may be half replaced.
    Broken,
}

/// See [`GroupState::wait_written`].
#[derive(Debug, Clone, Default)]
struct Written {
    index: u64,
    failure: Option<Arc<str>>,
}

impl GroupState {
    /// Opens the state database under `data_dir` and its group 0: the
    /// single-group node (tests, examples and the log store's suite builder).
    pub fn open(data_dir: &Path) -> anyhow::Result<Arc<GroupState>> {
        StateDb::open(data_dir)?.open_group(GroupId(0))
    }

    /// An empty handle; [`StateDb::open_group`] loads it.
    pub(crate) fn new(state_db: Arc<StateDb>, gid: GroupId) -> GroupState {
        GroupState {
            gid,
            state_db,
            schema: RwLock::new(VersionedSchema::shared_default()),
            cluster: tokio::sync::watch::Sender::new(Arc::default()),
            engine: RwLock::new(Arc::new(Engine::empty())),
            rules: std::sync::atomic::AtomicU32::new(portrait_core::rules::FIRST),
            applied: Mutex::new(AppliedState::default()),
            clock: AtomicI64::new(0),
            durable_read_at: Mutex::new(None),
            written: tokio::sync::watch::Sender::new(Written::default()),
            rows: RwLock::new(false),
        }
    }

    /// A read's hold on the group's rows (see `rows`): take it before the
    /// schema and engine to read with, and keep it while reading. Blocks
    /// while a snapshot install replaces the rows.
    pub fn read_rows(&self) -> std::sync::RwLockReadGuard<'_, bool> {
        self.rows.read().unwrap_or_else(|e| e.into_inner())
    }

    /// [`GroupState::read_rows`] without waiting, and never of rows a
    /// failed install left half replaced.
    pub fn try_read_rows(&self) -> Result<std::sync::RwLockReadGuard<'_, bool>, RowsBusy> {
        let guard = match self.rows.try_read() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(RowsBusy::Installing),
        };
        match *guard {
            true => Err(RowsBusy::Broken),
            false => Ok(guard),
        }
    }

    /// A snapshot install's hold on the group's rows: no read runs while
    /// it is held. The install sets it to `true` before it changes the
    /// rows and back to `false` once they are whole again.
    pub(crate) fn replace_rows(&self) -> std::sync::RwLockWriteGuard<'_, bool> {
        self.rows.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn gid(&self) -> GroupId {
        self.gid
    }

    pub fn state_db(&self) -> &Arc<StateDb> {
        &self.state_db
    }

    /// The node's database (every key of this group starts with its prefix).
    pub fn db(&self) -> Arc<DB> {
        self.state_db.db()
    }

    pub fn schema(&self) -> Arc<VersionedSchema> {
        self.schema.read().expect("schema lock").clone()
    }

    pub fn engine(&self) -> Arc<Engine> {
        self.engine.read().expect("engine lock").clone()
    }

    /// Installs a schema and the engine compiled from it.
    pub(crate) fn set_schema(&self, schema: VersionedSchema, engine: Engine) {
        *self.engine.write().expect("engine lock") = Arc::new(engine);
        *self.schema.write().expect("schema lock") = Arc::new(schema);
    }

    /// The apply rules version the group applies by (see
    /// `portrait_core::rules`).
    pub fn rules(&self) -> u32 {
        self.rules.load(Ordering::Acquire)
    }

    /// An entry or read at `now_ms` by the group's apply rules.
    pub fn at(&self, now_ms: i64) -> super::apply::At {
        super::apply::At { now_ms, rules: self.rules() }
    }

    pub(crate) fn set_rules(&self, version: u32) {
        self.rules.store(version, Ordering::Release);
    }

    /// The meta group's state as applied (empty in a shard group).
    pub fn cluster(&self) -> Arc<MetaState> {
        self.cluster.borrow().clone()
    }

    /// Changes of [`GroupState::cluster`].
    pub fn watch_cluster(&self) -> tokio::sync::watch::Receiver<Arc<MetaState>> {
        self.cluster.subscribe()
    }

    pub(crate) fn set_cluster(&self, cluster: MetaState) {
        self.cluster.send_replace(Arc::new(cluster));
    }

    /// The applied logical clock: the largest entry stamp applied.
    pub fn clock_ms(&self) -> i64 {
        self.clock.load(Ordering::Acquire)
    }

    /// The logical clock the compaction filters use for this group.
    pub fn durable_clock_ms(&self) -> i64 {
        self.state_db.clocks().get(self.gid)
    }

    /// What the flushed column families hold for this group:
    /// `(last_applied index, clock)` (see [`StateDb::durable_applied`]).
    pub fn durable_applied(&self) -> anyhow::Result<(u64, i64)> {
        self.state_db.durable_applied(self.gid)
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
        self.state_db.refresh_durable_clock(self.gid);
    }

    pub fn applied(&self) -> AppliedState {
        self.applied.lock().expect("applied lock").clone()
    }

    /// Whether node `id` is a voter in the membership this state has
    /// applied (what its data corresponds to; raft's metrics start empty
    /// when a node starts, until raft's task first reports).
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.applied.lock().expect("applied lock").membership.membership().voter_ids().any(|v| v == id)
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

    /// Whether entry `index` is applied and its batch written.
    pub fn written_up_to(&self, index: u64) -> bool {
        self.written.borrow().index >= index
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

    /// The running background re-evaluation, if any.
    pub fn reeval_progress(&self) -> Result<Option<crate::types::ReevalProgress>, super::apply::ApplyError> {
        let db = self.db();
        let raw = db.get_cf(cf(&db, CF_META), meta(self.gid, META_REEVAL))?;
        Ok(raw.map(|b| codec::decode(&b)).transpose()?)
    }

    /// Makes every applied write durable ([`StateDb::persist`]: one flush
    /// covers every group of the node).
    pub fn persist(&self) -> Result<(), rocksdb::Error> {
        self.state_db.persist()
    }

    /// Loads schema, applied state and clocks from the database (at open
    /// and after a snapshot install).
    pub(crate) fn reload_caches(&self) -> anyhow::Result<()> {
        let db = self.db();
        let meta_cf = cf(&db, CF_META);
        let get = |name: &[u8]| db.get_cf(meta_cf, meta(self.gid, name));
        let schema = match get(META_SCHEMA)? {
            Some(b) => codec::decode(&b)?,
            None => VersionedSchema::default(),
        };
        let applied = AppliedState {
            last_applied: get(META_APPLIED)?.map(|b| codec::decode(&b)).transpose()?,
            membership: get(META_MEMBERSHIP)?.map(|b| codec::decode(&b)).transpose()?.unwrap_or_default(),
            clock_ms: get(META_CLOCK)?.map(|b| codec::decode(&b)).transpose()?.unwrap_or(0),
        };
        let cluster: MetaState =
            get(META_CLUSTER)?.map(|b| decode_cluster(&b)).transpose()?.unwrap_or_default();
        let stored: Option<u32> = get(META_RULES)?.map(|b| codec::decode(&b)).transpose()?;
        let rules = stored.unwrap_or(portrait_core::rules::FIRST);
        // Applied by rules this build does not have (a node started on an
        // older build after its shards moved on): opening it would apply
        // the next entries by other rules than the other replicas. A shard
        // that never applied an entry takes its version from its log or a
        // snapshot; the meta group goes by the cluster's version.
        if self.gid != GroupId::META && (stored.is_some() || applied.last_applied.is_some()) {
            crate::rules::check(rules)
                .map_err(|e| anyhow::anyhow!("{} (its stored state): {e}", self.gid))?;
        }
        if cluster.map.is_some() {
            crate::rules::check(cluster.rules())
                .map_err(|e| anyhow::anyhow!("{} (the cluster's version): {e}", self.gid))?;
        }
        // A stored schema was compiled by the build that applied it. One
        // this build refuses (a stricter build, mid rolling upgrade) must
        // not run as an empty engine: this replica would drop every
        // feature and tag its ticks and re-evaluations touch while the
        // others keep them. The group refuses to open instead (at start the
        // node stops; after a snapshot install the group stops), as apply
        // does when it meets such a schema in the log.
        let engine = Engine::build(&schema.schema).map_err(|e| {
            anyhow::anyhow!(
                "{}: the stored schema (version {}) does not compile with this build: {e}; run a build that \
                 accepts it",
                self.gid,
                schema.version
            )
        })?;
        self.set_schema(schema, engine);
        self.set_rules(rules);
        self.set_cluster(cluster);
        self.set_applied(applied);
        self.refresh_durable_clock(None);
        Ok(())
    }
}

/// The meta state as builds before apply rules version 6 stored it:
/// without [`MetaState::retired`], its last field.
#[derive(serde::Deserialize)]
struct MetaStateBefore6 {
    map: Option<portrait_core::shard::ShardMap>,
    schema: Option<portrait_core::meta::SchemaVersion>,
    rules: u32,
}

/// Decodes the stored meta state, in either layout. (Builds before
/// version 6 read this build's layout too: fixed-width bincode ignores the
/// trailing field, and only a cluster on version 6 retires ids.)
fn decode_cluster(bytes: &[u8]) -> Result<MetaState, bincode::Error> {
    codec::decode(bytes).or_else(|e| match codec::decode::<MetaStateBefore6>(bytes) {
        Ok(MetaStateBefore6 { map, schema, rules }) => {
            Ok(MetaState { map, schema, rules, retired: Default::default() })
        }
        Err(_) => Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;

    #[test]
    fn rows_an_install_left_half_replaced_are_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupState::open(dir.path()).unwrap();
        assert!(group.try_read_rows().is_ok());
        {
            let mut rows = group.replace_rows();
            assert_eq!(group.try_read_rows().err(), Some(RowsBusy::Installing));
            // What an install that failed after its range delete leaves.
            *rows = true;
        }
        assert_eq!(group.try_read_rows().err(), Some(RowsBusy::Broken));
        *group.replace_rows() = false;
        assert!(group.try_read_rows().is_ok(), "a completed install");
    }

    #[test]
    fn a_stored_schema_this_build_cannot_compile_refuses_to_open_rather_than_run_without_rules() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let gid = GroupId(1);
        // Parses, but its rule names nothing this build knows: what a
        // stricter build makes of a schema an older one applied.
        let schema =
            Schema::parse("[families.browse]\nttl = \"30d\"\n\n[tags.x]\nrule = 'no_such_feature > 1'\n")
                .expect("parses");
        assert!(Engine::build(&schema).is_err(), "the rule must not compile");
        let stored = VersionedSchema { version: 3, schema };
        let raw = db.db();
        raw.put_cf(cf(&raw, CF_META), meta(gid, META_SCHEMA), codec::encode(&stored)).unwrap();
        let err = db.open_group(gid).err().expect("refused").to_string();
        assert!(err.contains("the stored schema (version 3) does not compile with this build"), "{err}");
        // A group whose stored schema compiles opens with its rules.
        let good = VersionedSchema { version: 4, schema: Schema::default_schema() };
        raw.put_cf(cf(&raw, CF_META), meta(gid, META_SCHEMA), codec::encode(&good)).unwrap();
        let group = db.open_group(gid).expect("opens");
        assert_eq!(group.schema().version, 4);
        assert!(!group.engine().is_empty());
    }

    /// The meta state gained `retired` (apply rules version 6): a data dir
    /// of an older build opens, and an older build reads the new layout.
    #[test]
    fn the_meta_state_decodes_in_the_layout_before_retired_ids_and_after() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Old {
            map: Option<portrait_core::shard::ShardMap>,
            schema: Option<portrait_core::meta::SchemaVersion>,
            rules: u32,
        }
        let map = portrait_core::shard::ShardMap::create(4, 3, 1, "http://n1", "http://n1:8700").unwrap();
        let schema = Some(portrait_core::meta::SchemaVersion { version: 2, toml: "x".into() });
        let old = Old { map: Some(map.clone()), schema: schema.clone(), rules: 5 };
        let read = decode_cluster(&codec::encode(&old)).expect("the old layout");
        assert_eq!(
            read,
            MetaState {
                map: Some(map.clone()),
                schema: schema.clone(),
                rules: 5,
                retired: Default::default()
            }
        );
        let new = MetaState { map: Some(map.clone()), schema, rules: 6, retired: [3, 9].into() };
        assert_eq!(decode_cluster(&codec::encode(&new)).expect("the new layout"), new);
        let by_old: Old = codec::decode(&codec::encode(&new)).expect("an older build reads it");
        assert_eq!((by_old.map, by_old.rules), (Some(map), 6));
        assert!(decode_cluster(&[1, 2, 3]).is_err(), "garbage is an error, not a default");
    }
}
