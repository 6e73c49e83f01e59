//! A running Portrait node: its replica of the meta group and of the
//! shards the map places on it (one raft group each, found through the
//! [`Registry`]) and what it has once whatever their number (log engine,
//! state database, clock, peer connections, the write batcher, ticker,
//! clock probe, quiet, log policy and placement tasks), with the domain
//! operations the gRPC services call (one method per call). Writes are in
//! `node/write.rs`, reads in `node/read.rs`, the number of shards in
//! `node/shards.rs`, the meta group (map, membership, schema) in
//! `node/meta.rs`, following the map in `node/placement.rs`; leadership
//! transfer, incoming raft messages and fault injection in
//! `node/cluster.rs`.

mod backup;
mod cluster;
mod forward;
pub mod map;
mod meta;
mod placement;
mod read;
mod schema_gate;
mod shards;
mod sizes;
mod tasks;
mod write;

pub use tasks::Tasks;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, ServerState};
use portrait_core::shard::{check_layout, LeaderTransfer, DEFAULT_REPLICATION};

use crate::clock::{ClockOptions, ClockStatus, NodeClock};
use crate::error::{Error, Result};
use crate::raft::batcher::WriteBatcher;
use crate::raft::clock_probe::ClockProbe;
use crate::raft::contact::{freshness, Freshness};
use crate::raft::liveness::Liveness;
use crate::raft::network::{Blocked, Channels};
use crate::raft::quiet::QuietGroups;
use crate::raft::replica::{Registry, Replica, Shared};
use crate::raft::RaftTuning;
use crate::schema::VersionedSchema;
use crate::store::{LogEngine, StateDb};
use crate::types::{GroupId, NodeId};

pub use backup::{RestoreSummary, ShardExport, ShardUpload};
pub use read::ForwardedRead;
pub use write::{ShardWrite, WriteResult};

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// The address clients reach this node's client port at.
    pub advertise: String,
    /// The address the other nodes reach its peer port at (the raft
    /// memberships name it).
    pub peer_advertise: String,
    /// Form a one-node cluster if this node has never been initialized.
    pub bootstrap: bool,
    pub tuning: RaftTuning,
    /// Allow `Admin.SetPartition` (tests only).
    pub fault_injection: bool,
    pub clock: ClockOptions,
    /// The number of shards of a new cluster (`--shards`; `None`: the
    /// default, or what the data dir or the cluster joined says). Checked
    /// against the data dir's: see `node/shards.rs`.
    pub shards: Option<u32>,
    /// Replicas per shard a new cluster aims for (`--replication`; `None`:
    /// [`DEFAULT_REPLICATION`]). Recorded in the map at creation.
    pub replication: Option<u32>,
    /// Replica moves kept under way at once by balancing (`--max-moves`;
    /// 0: no balancing).
    pub max_moves: usize,
    /// A node that has not answered for this long is drained by the meta
    /// leader, so its replicas are re-created elsewhere
    /// (`--replica-dead-after`).
    pub replica_dead_after: Duration,
    /// A backup or restore stream that stalls this long is ended
    /// (`--backup-stream-stall`).
    pub backup_stream_stall: Duration,
    /// Seeds of `--join`: a new node asks them for the number of shards.
    pub seeds: Vec<String>,
}

/// Read freshness, as asked by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Consistency {
    Local,
    Linearizable,
}

/// Where a read was served and how fresh it was.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReadInfo {
    pub node_id: NodeId,
    /// The shard whose replica served the read.
    pub shard: u32,
    pub applied_index: u64,
    pub as_of_ms: i64,
    pub freshness: Freshness,
}

/// A member of the cluster as seen by this node.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub node_id: NodeId,
    /// Its client address ("" while the map does not have it).
    pub addr: String,
    /// Its peer address (the membership's).
    pub peer_addr: String,
    pub voter: bool,
    pub matched_index: Option<u64>,
    /// Entries behind the leader's last log index (reported by the leader only).
    pub lag_entries: Option<u64>,
}

/// What `ClusterStatus` reports.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub node_id: NodeId,
    pub role: String,
    pub leader_id: Option<NodeId>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub members: Vec<MemberStatus>,
    pub schema_version: u64,
    /// Background re-evaluation after a schema change: (running, users done).
    pub reevaluation: (bool, u64),
    /// This node's own lag behind the leader, as reads report it.
    pub freshness: Freshness,
    /// The replicated logical clock (the largest stamp applied).
    pub logical_clock_ms: i64,
    pub clock: ClockStatus,
    /// The cluster's number of shards.
    pub shards: u32,
    /// Every shard's group (the fields above are shard 0's).
    pub shard_status: Vec<ShardStatus>,
    /// See [`Node::log_fsyncs`].
    pub log_fsyncs: u64,
    /// AppendEntriesBatch calls sent and the items they carried.
    pub raft_batches_sent: u64,
    pub raft_batch_items_sent: u64,
    /// The meta group's voters, as this node's replica of it knows them.
    pub meta_voters: Vec<NodeId>,
    /// Bytes of snapshot chunks this node has sent since it started.
    pub snapshot_bytes_sent: u64,
    /// The meta group's leader, as this node's replica of it knows it.
    pub meta_leader_id: Option<NodeId>,
    /// This node's data dir incarnation.
    pub incarnation: u64,
    /// The term of the meta group's vote on this node.
    pub meta_term: u64,
    /// The cluster's id in this node's map (0: none yet).
    pub cluster_id: u64,
    /// Peers answering from another data dir than the map records.
    pub replaced_peers: Vec<NodeId>,
    /// The cluster's apply rules version as this node knows it (0: no
    /// cluster yet); this build applies `crate::rules::oldest()..=newest()`.
    pub cluster_rules: u32,
}

/// One shard's raft group as this node sees it.
#[derive(Debug, Clone)]
pub struct ShardStatus {
    pub shard: u32,
    pub role: String,
    pub leader_id: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub schema_version: u64,
    /// The group's membership as this replica knows it (the newest in its
    /// log; during a change, the voters of both configurations).
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The log index of that membership: committed once `applied_index`
    /// reaches it.
    pub membership_index: u64,
    /// The replica's logical size as last measured (`node/sizes.rs`).
    pub state_bytes: Option<u64>,
    /// The apply rules version the replica applies by.
    pub rules: u32,
    /// The restore under way in the shard, as this replica applied it.
    pub restoring: Option<crate::types::RestoreMarker>,
}

pub struct Node {
    pub id: NodeId,
    /// The incarnation of this node's data dir (`StateDb::identity`).
    pub incarnation: u64,
    /// The address clients reach this node at (recorded in the map).
    pub advertise: String,
    /// The address of its peer port, which the raft memberships name.
    pub peer_advertise: String,
    /// The cluster's number of shards (S): shard k is `GroupId(k)`.
    shards: u32,
    /// The replicas this node hosts: the meta group's and those of the
    /// shards the map places here.
    registry: Arc<Registry>,
    /// This node's replica of the meta group (also in the registry).
    meta: Arc<Replica>,
    /// The node's raft log engine and state database (each replica holds
    /// them too), and what opening a replica takes besides.
    log_engine: LogEngine,
    state_db: Arc<StateDb>,
    data_dir: PathBuf,
    raft_config: Arc<openraft::Config>,
    tuning: RaftTuning,
    /// The meta group's schema, compiled (see [`Node::schema`]).
    schema_cache: Mutex<Arc<VersionedSchema>>,
    /// Replicas the map no longer places here, since when (see
    /// `node/placement.rs`).
    /// Held by the one placement running on the node (`Node::place`).
    placing: tokio::sync::Mutex<()>,
    /// Leader balancing's transfers under way (meta leader), by shard, and
    /// when leaders were last balanced (see `Node::balance_leaders`).
    leader_moves: Arc<Mutex<BTreeMap<u32, LeaderTransfer>>>,
    /// Leader balancing's failed transfers, by (shard, target): not tried
    /// again before this instant.
    leader_refusals: Arc<Mutex<BTreeMap<(u32, NodeId), tokio::time::Instant>>>,
    leaders_balanced: Mutex<Option<tokio::time::Instant>>,
    /// The newest schema version this build refused to propose to its
    /// shards (logged once per version).
    schema_refused: Mutex<u64>,
    /// Held by the meta leader while it asks the nodes' builds and raises
    /// the cluster's apply rules, and while AddNode checks a node's build
    /// and records it in the map: neither decides on what the other is
    /// changing.
    rules_gate: tokio::sync::Mutex<()>,
    /// Each hosted shard replica's logical size (`node/sizes.rs`).
    sizes: Mutex<BTreeMap<GroupId, sizes::Size>>,
    /// Per shard this node hosts no replica of, the node that last served
    /// a forwarded part, and whether that proves it leads the shard.
    leaders: Mutex<BTreeMap<GroupId, forward::Heard>>,
    /// One connection per peer node, shared by every group (and forwarded
    /// writes).
    channels: Channels,
    batcher: WriteBatcher,
    /// This node's clock and its guard; every stamp comes from a replica's
    /// stamper, which asks it.
    clock: Arc<NodeClock>,
    /// Background tasks the node owns: stopped and joined by `shutdown`.
    tasks: Tasks,
    /// Fault injection (tests): peers raft messages are not sent to, and
    /// peers whose log entries are dropped on arrival.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    blocked: Blocked,
    dropping: Blocked,
    fault_injection: bool,
    write_timeout: Duration,
    /// See [`NodeOptions::max_moves`].
    max_moves: usize,
    /// See [`NodeOptions::replica_dead_after`].
    replica_dead_after: Duration,
    /// When each peer node last answered the clock probe.
    liveness: Arc<Liveness>,
    /// Held by the one backup export or restore running on the node
    /// (`node/backup.rs`): each needs scratch disk of its shard's size.
    backup_slot: Arc<tokio::sync::Semaphore>,
    /// See [`NodeOptions::backup_stream_stall`].
    backup_stream_stall: Duration,
    /// Whether the state of a dropped replica may be left on disk (a drop
    /// cut short, or a crash in the middle of one; true at start): the
    /// next placement pass looks for it (`node/placement.rs`).
    drops_pending: std::sync::atomic::AtomicBool,
    /// Dropped replicas whose raft log could not be deleted yet (a task of
    /// their raft, such as a snapshot stream, still held it): the
    /// placement passes retry it, unless the map places the shard here
    /// again.
    log_drops: std::sync::Mutex<BTreeSet<GroupId>>,
    /// Held while replicas the map places here are opened (`host`): the
    /// placement pass and an `AddNode` that finishes a cluster's creation
    /// never open the same replica twice.
    hosting: tokio::sync::Mutex<()>,
}

/// How long a node may not answer before the meta leader re-creates its
/// replicas elsewhere, by default (`--replica-dead-after`).
pub const DEFAULT_REPLICA_DEAD_AFTER: Duration = Duration::from_secs(600);

/// Replica moves under way at once by default (`--max-moves`).
pub const DEFAULT_MAX_MOVES: usize = 2;

impl Node {
    /// Opens the stores and starts a raft instance for the meta group and
    /// each shard replica the node held; a new single node (`bootstrap`)
    /// creates the cluster: the meta group, the map, and every shard with
    /// itself as the one replica. The placement task then follows the map.
    pub async fn start(opts: NodeOptions) -> anyhow::Result<Arc<Node>> {
        // Readable by the node's user alone when the node creates it: it
        // holds every profile, and exports and uploaded archives in flight.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&opts.data_dir)?;
        backup::remove_scratch(&opts.data_dir)?;
        let state_db = StateDb::open(&opts.data_dir)?;
        let incarnation = state_db.identity(opts.node_id)?;
        let log_engine = LogEngine::open(&opts.data_dir)?;
        let shards = shards::resolve(&state_db, &log_engine, &opts).await?;
        let replication = opts.replication.unwrap_or(DEFAULT_REPLICATION);
        check_layout(shards, replication).map_err(|e| anyhow::anyhow!("--{e}"))?;
        let clock = Arc::new(NodeClock::open(&opts.data_dir, opts.clock.clone())?);
        let snapshot_rate = opts.tuning.snapshot_send_mb_per_sec.saturating_mul(1_000_000);
        let (channels, blocked) = (Channels::new(snapshot_rate), Blocked::default());
        let raft_config = Arc::new(opts.tuning.openraft_config()?);
        let shared = Shared {
            me: opts.node_id,
            data_dir: &opts.data_dir,
            log_engine: &log_engine,
            state_db: &state_db,
            config: raft_config.clone(),
            channels: channels.clone(),
            blocked: blocked.clone(),
            clock: clock.clone(),
            tuning: &opts.tuning,
        };
        let registry = Arc::new(Registry::default());
        let meta = Arc::new(Replica::open(GroupId::META, &shared).await?);
        channels.follow_cluster(meta.sm.watch_cluster());
        registry.insert(meta.clone());
        for gid in log_engine.groups()?.into_iter().filter(|g| *g != GroupId::META && g.0 < shards) {
            registry.insert(Arc::new(Replica::open(gid, &shared).await?));
        }
        let tasks = Tasks::default();
        let liveness = Arc::new(Liveness::default());
        // Snapshots and log retention by bytes, of every group.
        let policy = (&opts.tuning).into();
        let (r, live) = (registry.clone(), liveness.clone());
        tasks.spawn("log policy", |stop| crate::raft::log_policy::run_until(r, policy, live, stop));
        let (batcher, requests) = WriteBatcher::channel();
        let r = registry.clone();
        tasks.spawn("write batcher", |stop| crate::raft::batcher::run(r, requests, stop));
        let tick_interval = Duration::from_millis(opts.tuning.tick_interval_ms);
        let r = registry.clone();
        let c = meta.sm.watch_cluster();
        let quorum = crate::raft::ticker::QuorumSight {
            me: opts.node_id,
            liveness: liveness.clone(),
            within: opts.tuning.quorum_unheard_after(),
        };
        tasks.spawn("ticker", |stop| crate::raft::ticker::run(r, c, tick_interval, quorum, stop));
        let probe = ClockProbe {
            me: opts.node_id,
            registry: registry.clone(),
            clock: clock.clone(),
            blocked: blocked.clone(),
            liveness: liveness.clone(),
            interval: opts.tuning.probe_interval(),
            channels: channels.clone(),
        };
        tasks.spawn("clock probe", |stop| probe.run(stop));
        if opts.tuning.quiet_idle_groups {
            let quiet = QuietGroups {
                me: opts.node_id,
                registry: registry.clone(),
                liveness: liveness.clone(),
                timing: (&opts.tuning).into(),
            };
            tasks.spawn("quiet groups", |stop| quiet.run(stop));
        }
        let node = Arc::new(Node {
            id: opts.node_id,
            incarnation,
            advertise: opts.advertise.clone(),
            peer_advertise: opts.peer_advertise.clone(),
            shards,
            registry,
            meta,
            log_engine,
            state_db,
            data_dir: opts.data_dir.clone(),
            raft_config,
            tuning: opts.tuning.clone(),
            schema_cache: Mutex::default(),
            leaders: Mutex::default(),
            placing: tokio::sync::Mutex::default(),
            leader_moves: Arc::default(),
            leader_refusals: Arc::default(),
            sizes: Mutex::default(),
            leaders_balanced: Mutex::default(),
            schema_refused: Mutex::default(),
            rules_gate: tokio::sync::Mutex::default(),
            max_moves: opts.max_moves,
            replica_dead_after: opts.replica_dead_after,
            liveness,
            channels,
            batcher,
            clock,
            tasks,
            blocked,
            dropping: Blocked::default(),
            fault_injection: opts.fault_injection,
            write_timeout: Duration::from_millis(opts.tuning.write_timeout_ms),
            backup_slot: Arc::new(tokio::sync::Semaphore::new(1)),
            backup_stream_stall: opts.backup_stream_stall,
            drops_pending: std::sync::atomic::AtomicBool::new(true),
            log_drops: Default::default(),
            hosting: tokio::sync::Mutex::default(),
        });
        if opts.bootstrap {
            node.bootstrap(replication).await?;
        }
        let weak = Arc::downgrade(&node);
        node.spawn_task("placement", |stop| placement::run(weak, stop));
        let weak = Arc::downgrade(&node);
        node.spawn_task("sizes", |stop| sizes::run(weak, stop));
        let weak = Arc::downgrade(&node);
        node.spawn_task("apply rules", |stop| meta::raise_rules_until(weak, stop));
        Ok(node)
    }

    /// A new single node creates the cluster: the meta group with itself
    /// as its voter, the map (every shard on this node), then the shards
    /// (`host`, as the placement task does). A start interrupted part way
    /// is finished by the next placement pass or `AddNode`, whichever
    /// comes first: the map is created if missing, and shards placed only
    /// here that were never initialized are created.
    async fn bootstrap(&self, replication: u32) -> anyhow::Result<()> {
        let me = BTreeMap::from([(self.id, BasicNode::new(&self.peer_advertise))]);
        if !self.meta.raft.is_initialized().await? {
            self.meta.raft.initialize(me.clone()).await?;
        } else if self.cluster().map.is_some() || self.membership().voter_ids().count() > 1 {
            return Ok(());
        }
        self.create_cluster(self.shards, replication).await?;
        if self.hosting_held() {
            return Ok(());
        }
        // The new map places every shard here alone: opening them creates them.
        if let Some(map) = self.cluster().map.as_ref() {
            self.host(map).await?;
        }
        tracing::info!(
            node_id = self.id,
            shards = self.shards,
            replication,
            "created a new cluster on this node"
        );
        Ok(())
    }

    /// What opening a replica on this node takes.
    fn shared(&self) -> Shared<'_> {
        Shared {
            me: self.id,
            data_dir: &self.data_dir,
            log_engine: &self.log_engine,
            state_db: &self.state_db,
            config: self.raft_config.clone(),
            channels: self.channels.clone(),
            blocked: self.blocked.clone(),
            clock: self.clock.clone(),
            tuning: &self.tuning,
        }
    }

    /// The cluster's number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// How long a backup or restore stream may stall before the node ends
    /// it (`--backup-stream-stall`).
    pub fn backup_stream_stall(&self) -> Duration {
        self.backup_stream_stall
    }

    /// WAL fsyncs of the node's raft log since it started (one serves every
    /// group that appended meanwhile).
    pub fn log_fsyncs(&self) -> u64 {
        self.log_engine.fsyncs()
    }

    /// The replica of `group` (a shard or the meta group); NOT_FOUND if
    /// this node hosts none.
    fn replica(&self, group: GroupId) -> Result<Arc<Replica>> {
        self.registry
            .get(group)
            .ok_or_else(|| Error::NotFound(format!("node {} hosts no replica of {group}", self.id)))
    }

    /// Shard 0's replica if this node hosts one, else the meta group's:
    /// what the single-group fields of `ClusterStatus` report.
    fn first(&self) -> Arc<Replica> {
        self.registry.get(GroupId(0)).unwrap_or_else(|| self.meta.clone())
    }

    /// Whether this node ever joined a cluster (bootstrapped, or added to
    /// the meta group).
    pub async fn is_initialized(&self) -> bool {
        self.meta.raft.is_initialized().await.unwrap_or(false)
    }

    /// The meta group's membership: the cluster's nodes (voters on up to
    /// five, learners on the rest).
    pub fn membership(&self) -> openraft::Membership<NodeId, BasicNode> {
        self.meta.raft.metrics().borrow().membership_config.membership().clone()
    }

    /// Whether the map has this node (it joined and was not removed).
    pub fn in_map(&self) -> bool {
        self.cluster().map.as_ref().is_some_and(|m| m.nodes.contains_key(&self.id))
    }

    /// Runs `task` in the background until the node shuts down (see [`Tasks`]).
    pub fn spawn_task<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(tokio::sync::watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(name, task)
    }

    /// Resolves when a group this node hosts has stopped on an error (a
    /// storage error or a panic in its raft core: openraft stops that
    /// group for good), naming it. The process keeps answering its peers'
    /// liveness probes meanwhile, so with quiet groups nobody would replace
    /// a leader whose raft stopped: the daemon shuts down on it instead.
    /// A group stopped on purpose (its replica dropped) is not an error.
    pub async fn raft_failed(&self) -> String {
        loop {
            for replica in self.registry.all() {
                let state = replica.raft.metrics().borrow().running_state.clone();
                if let Some(reason) = crate::raft::fatal_reason(&state) {
                    return format!("{}: {reason}", replica.gid);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until every shard knows a leader (or `timeout` passes).
    pub async fn wait_for_leader(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for replica in self.registry.all() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let wait = replica.raft.wait(Some(left));
            if wait.metrics(|m| m.current_leader.is_some(), "a leader is known").await.is_err() {
                return false;
            }
        }
        true
    }

    pub fn status(&self) -> NodeStatus {
        let first = self.first();
        let m = first.raft.metrics().borrow().clone();
        let last_log_index = m.last_log_index.unwrap_or(0);
        // The cluster's nodes are the meta group's members. Their match and
        // lag are those of the group the other fields report where it has
        // them (its leader has a row per member), else the meta group's.
        let mm = self.meta.raft.metrics().borrow().clone();
        let cluster = mm.membership_config.membership();
        let voters: std::collections::BTreeSet<_> = cluster.voter_ids().collect();
        let progress = |id: &NodeId| {
            let of = |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
                let row = m.replication.as_ref()?.get(id)?;
                let matched = row.map(|l| l.index);
                Some((matched, m.last_log_index.unwrap_or(0).saturating_sub(matched.unwrap_or(0))))
            };
            of(&m).or_else(|| of(&mm))
        };
        let members = cluster
            .nodes()
            .map(|(id, node)| MemberStatus {
                node_id: *id,
                addr: self.client_addr(*id).unwrap_or_default(),
                peer_addr: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: progress(id).and_then(|(matched, _)| matched),
                lag_entries: progress(id).map(|(_, lag)| lag),
            })
            .collect();
        // What reads see (raft's own applied index may be one entry ahead
        // while that entry's batch is written).
        let applied_index = written_index(&first);
        let leader_addr = m.current_leader.and_then(|l| self.client_addr(l));
        let sm = &first.sm;
        NodeStatus {
            node_id: self.id,
            role: role_name(m.state).into(),
            leader_id: m.current_leader,
            leader_addr,
            term: m.current_term,
            last_log_index,
            applied_index,
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            members,
            schema_version: self.schema().version,
            reevaluation: match sm.reeval_progress() {
                Ok(Some(p)) => (true, p.users_done),
                _ => (false, 0),
            },
            freshness: freshness(&m, applied_index, &first.contact, &first.acks),
            logical_clock_ms: sm.clock_ms(),
            clock: self.clock.status(self.id, &voters.iter().copied().collect::<Vec<_>>(), sm.clock_ms()),
            shards: self.shards,
            shard_status: self
                .registry
                .all()
                .iter()
                .filter(|r| r.gid != GroupId::META)
                .map(|r| ShardStatus { state_bytes: self.state_bytes(r.gid), ..shard_status(r) })
                .collect(),
            log_fsyncs: self.log_fsyncs(),
            raft_batches_sent: self.channels.batches_sent(),
            raft_batch_items_sent: self.channels.batch_items_sent(),
            meta_voters: self
                .meta
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect(),
            snapshot_bytes_sent: self.channels.snapshot_bytes_sent(),
            meta_leader_id: mm.current_leader,
            incarnation: self.incarnation,
            meta_term: mm.current_term,
            cluster_id: self.cluster().map.as_ref().map_or(0, |m| m.cluster),
            replaced_peers: self.channels.replaced(),
            cluster_rules: self.cluster().map.as_ref().map_or(0, |_| self.cluster().rules()),
        }
    }

    /// An operator accepts this node's clock as it is now (after the guard
    /// refused a jump); returns (now, the reference it replaces).
    pub fn confirm_clock(&self) -> Result<(i64, Option<i64>)> {
        let replicated = self.registry.all().iter().map(|r| r.sm.clock_ms()).max().unwrap_or(i64::MIN);
        self.clock.confirm(replicated).map_err(|e| Error::Internal(format!("writing the clock mark: {e}")))
    }

    /// Stops the node's background tasks, then raft, then flushes the state
    /// machine so the next start replays no log (the stores close when the
    /// last handle drops).
    pub async fn shutdown(&self) {
        self.tasks.stop().await;
        let replicas = self.registry.all();
        let stopped = futures::future::join_all(replicas.iter().map(|r| r.raft.shutdown())).await;
        for (replica, result) in replicas.iter().zip(stopped) {
            if let Err(e) = result {
                tracing::warn!(group = %replica.gid, error = %e, "raft shutdown");
            }
        }
        // One flush covers every group.
        let sm = self.first().sm.clone();
        match tokio::task::spawn_blocking(move || sm.persist()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the state machine at shutdown"),
            Err(e) => tracing::warn!(error = %e, "flushing the state machine at shutdown"),
        }
    }
}

/// The index whose batch is in the database: what reads of the group see.
fn written_index(replica: &Replica) -> u64 {
    replica.sm.applied().last_applied.map(|l| l.index).unwrap_or(0)
}

fn shard_status(replica: &Replica) -> ShardStatus {
    let m = replica.raft.metrics().borrow().clone();
    ShardStatus {
        shard: replica.gid.0,
        role: role_name(m.state).into(),
        leader_id: m.current_leader,
        term: m.current_term,
        last_log_index: m.last_log_index.unwrap_or(0),
        applied_index: written_index(replica),
        schema_version: replica.sm.schema().version,
        voters: m.membership_config.membership().voter_ids().collect(),
        learners: m.membership_config.membership().learner_ids().collect(),
        membership_index: m.membership_config.log_id().map_or(0, |l| l.index),
        state_bytes: None,
        rules: replica.sm.rules(),
        restoring: crate::store::restore::restoring(replica.sm.state_db(), replica.gid).unwrap_or_else(|e| {
            tracing::warn!(group = %replica.gid, error = %e, "reading the shard's restore marker");
            None
        }),
    }
}

fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "Leader",
        ServerState::Follower => "Follower",
        ServerState::Candidate => "Candidate",
        ServerState::Learner => "Learner",
        ServerState::Shutdown => "Shutdown",
    }
}
