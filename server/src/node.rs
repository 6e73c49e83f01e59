//! A running Portrait node: raft, storage and the write batcher, with the
//! domain operations the gRPC services call (one method per call). The
//! cluster operations (membership, leadership transfer, incoming raft
//! messages, fault injection) are in `node/cluster.rs`.

mod cluster;
mod tasks;

pub use tasks::Tasks;

/// How often the node measures its peers' clocks.
const CLOCK_PROBE_INTERVAL: Duration = Duration::from_secs(1);

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::{BasicNode, ServerState};

use crate::clock::{ClockOptions, ClockStatus, NodeClock};
use crate::engine::check_schema;
use crate::error::{Error, Result};
use crate::limits::{MAX_CONCURRENT_READS, MAX_FAMILIES, MAX_FEATURES, MAX_RESPONSE_BYTES, MAX_TAGS};
use crate::model::{Event, WriteCounts};
use crate::raft::batcher::WriteBatcher;
use crate::raft::clock_probe::ClockProbe;
use crate::raft::contact::{freshness, Freshness, LeaderContact, PeerAcks};
use crate::raft::elect::ElectSwitch;
use crate::raft::gate::ProposalGate;
use crate::raft::network::{Blocked, Channels, Network};
use crate::raft::stamp::Stamper;
use crate::raft::transfer::LeaderTransfer;
use crate::raft::{client_write_error, not_leader, RaftTuning};
use crate::schema::VersionedSchema;
use crate::store::read::{distinct_ids, read_profile, repeat_counts, ProfileView, Selection};
use crate::store::{GroupState, LogEngine, PurgeGuard, StateDb, StateMachine};
use crate::types::{Command, CommandResult, GroupId, NodeId, Raft};
use crate::validate::{validate_request, validate_user_id};

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// The address peers and clients reach this node's gRPC server at.
    pub advertise: String,
    /// Form a one-node cluster if this node has never been initialized.
    pub bootstrap: bool,
    pub tuning: RaftTuning,
    /// Allow `Admin.SetPartition` (tests only).
    pub fault_injection: bool,
    pub clock: ClockOptions,
}

/// Read freshness, as asked by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Local,
    Linearizable,
}

/// Where a read was served and how fresh it was.
#[derive(Debug, Clone)]
pub struct ReadInfo {
    pub node_id: NodeId,
    pub applied_index: u64,
    pub as_of_ms: i64,
    pub freshness: Freshness,
}

/// A member of the cluster as seen by this node.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub node_id: NodeId,
    pub addr: String,
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
}

pub struct Node {
    pub id: NodeId,
    /// The raft group this node runs (one, until the group registry).
    group: GroupId,
    /// The address recorded for this node in the membership when it joins.
    pub advertise: String,
    raft: Raft,
    /// Group 0's state: the node runs one raft group (shards come next).
    sm: Arc<GroupState>,
    /// The node's raft log engine (its one group's store holds it too).
    _log_engine: LogEngine,
    batcher: WriteBatcher,
    /// Every proposal passes it; a leadership transfer closes it.
    gate: ProposalGate,
    transfer: Arc<LeaderTransfer>,
    /// This node's clock and its guard; every stamp comes from `stamper`.
    clock: Arc<NodeClock>,
    stamper: Stamper,
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    elect: ElectSwitch,
    /// Background tasks the node owns: stopped and joined by `shutdown`.
    tasks: Tasks,
    /// What this node last heard from its leader, and (leading) when each
    /// peer last answered: see [`crate::raft::contact`].
    contact: LeaderContact,
    acks: Arc<PeerAcks>,
    /// Fault injection (tests): peers raft messages are not sent to, and
    /// peers whose log entries are dropped on arrival.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    blocked: Blocked,
    dropping: Blocked,
    fault_injection: bool,
    write_timeout: Duration,
}

impl Node {
    /// Opens the stores, starts raft and, for a new single node, bootstraps.
    pub async fn start(opts: NodeOptions) -> anyhow::Result<Arc<Node>> {
        std::fs::create_dir_all(&opts.data_dir)?;
        let sm = StateDb::open(&opts.data_dir)?.open_group(GroupId(0))?;
        // One log engine per node; this node runs one group, shard 0.
        let log_engine = LogEngine::open(&opts.data_dir)?;
        let guard: Arc<dyn PurgeGuard> = sm.clone();
        let log = log_engine.group(GroupId(0), Some(guard))?;
        let log_bytes = log.log_bytes();
        let state_machine = StateMachine::new(sm.clone(), &opts.data_dir)?;
        let config = Arc::new(opts.tuning.openraft_config()?);
        let network = Network::new(GroupId(0), Channels::default(), Blocked::default());
        let (blocked, acks) = (network.blocked.clone(), network.acks.clone());
        let raft = Raft::new(opts.node_id, config, network, log, state_machine).await?;
        if opts.bootstrap && !raft.is_initialized().await? {
            tracing::info!(node_id = opts.node_id, "bootstrapping a new single-node cluster");
            let members = BTreeMap::from([(opts.node_id, BasicNode::new(&opts.advertise))]);
            raft.initialize(members).await?;
        }
        let tasks = Tasks::default();
        let clock = Arc::new(NodeClock::open(&opts.data_dir, opts.clock.clone())?);
        let stamper = Stamper::new(opts.node_id, raft.clone(), sm.clone(), clock.clone());
        let elect = ElectSwitch::new(raft.clone());
        // Snapshots and log retention by bytes.
        let policy = (&opts.tuning).into();
        tasks.spawn("log policy", |stop| {
            crate::raft::log_policy::run_until(raft.clone(), log_bytes, policy, stop)
        });
        let (batcher, requests) = WriteBatcher::channel();
        let (b_raft, b_sm, b_stamper) = (raft.clone(), sm.clone(), stamper.clone());
        tasks.spawn("write batcher", |stop| {
            crate::raft::batcher::run(b_raft, b_sm, b_stamper, requests, stop)
        });
        let gate = ProposalGate::default();
        let tick_interval = Duration::from_millis(opts.tuning.tick_interval_ms);
        tasks.spawn("ticker", |stop| {
            crate::raft::ticker::run(
                raft.clone(),
                sm.clone(),
                gate.clone(),
                stamper.clone(),
                tick_interval,
                stop,
            )
        });
        let transfer = Arc::new(LeaderTransfer::new(
            opts.node_id,
            GroupId(0),
            raft.clone(),
            gate.clone(),
            blocked.clone(),
            opts.tuning.clone(),
        ));
        let probe = ClockProbe {
            me: opts.node_id,
            raft: raft.clone(),
            sm: sm.clone(),
            clock: clock.clone(),
            elect: elect.clone(),
            transfer: transfer.clone(),
            blocked: blocked.clone(),
            interval: CLOCK_PROBE_INTERVAL,
        };
        tasks.spawn("clock probe", |stop| probe.run(stop));
        Ok(Arc::new(Node {
            id: opts.node_id,
            group: GroupId(0),
            advertise: opts.advertise.clone(),
            raft,
            sm,
            _log_engine: log_engine,
            batcher,
            gate,
            transfer,
            clock,
            stamper,
            elect,
            tasks,
            contact: LeaderContact::default(),
            acks,
            blocked,
            dropping: Blocked::default(),
            fault_injection: opts.fault_injection,
            write_timeout: Duration::from_millis(opts.tuning.write_timeout_ms),
        }))
    }

    /// Whether this node's raft state was ever initialized (bootstrapped or
    /// joined).
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// The membership this node knows.
    pub fn membership(&self) -> openraft::Membership<NodeId, BasicNode> {
        self.raft.metrics().borrow().membership_config.membership().clone()
    }

    /// Runs `task` in the background until the node shuts down (see [`Tasks`]).
    pub fn spawn_task<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(tokio::sync::watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(name, task)
    }

    /// Waits until some leader is known (or `timeout` passes).
    pub async fn wait_for_leader(&self, timeout: Duration) -> bool {
        let wait = self.raft.wait(Some(timeout));
        wait.metrics(|m| m.current_leader.is_some(), "a leader is known").await.is_ok()
    }

    /// Validates and commits one write request.
    ///
    /// During a leadership transfer the write waits at the gate (at most
    /// the write timeout, then UNAVAILABLE: nothing was proposed), then goes
    /// on; on the old leader that is a redirect to the new one.
    pub async fn write(&self, events: Vec<Event>) -> Result<(WriteCounts, u64)> {
        let schema = self.sm.schema();
        validate_request(&events, &schema.schema, Some(self.clock.now_ms()))?;
        let _pass = self.gate.pass(self.write_timeout).await?;
        // Never hang: a leader cut off from its quorum cannot commit.
        match tokio::time::timeout(self.write_timeout, self.batcher.write(events)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(format!(
                "not committed within {} ms (no quorum reachable?); the outcome is unknown: retry with the \
                 same event_ids, duplicates are skipped",
                self.write_timeout.as_millis()
            ))),
        }
    }

    /// Reads profiles as of now; linearizable reads first confirm leadership.
    ///
    /// The selection is bounded and checked before any per-name work, then
    /// deduplicated; a user id asked for more than once is read once and
    /// its view returned at each of its positions. The RocksDB reads and
    /// feature evaluation run on a blocking thread, at most
    /// [`MAX_CONCURRENT_READS`] at once, so a read storm cannot starve the
    /// async workers that carry raft heartbeats.
    pub async fn read_profiles(
        &self,
        user_ids: &[String],
        selection: Selection,
        consistency: Consistency,
    ) -> Result<(Vec<ProfileView>, ReadInfo)> {
        static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_READS);
        let (schema, engine) = (self.sm.schema(), self.sm.engine());
        let s = &schema.schema;
        let sel = &selection;
        check_names(
            ("families", "family", MAX_FAMILIES),
            &sel.families,
            |n| s.families.contains_key(n),
            s.families.keys(),
        )?;
        check_names(
            ("features", "feature", MAX_FEATURES),
            &sel.features,
            |n| s.features.contains_key(n),
            s.features.keys(),
        )?;
        check_names(("tags", "tag", MAX_TAGS), &sel.tags, |n| s.tags.contains_key(n), s.tags.keys())?;
        let selection = selection.deduped();
        for (i, u) in user_ids.iter().enumerate() {
            validate_user_id(u).map_err(|e| Error::invalid(format!("user_ids[{i}]"), e.reason))?;
        }
        if consistency == Consistency::Linearizable {
            // The leadership check sends AppendEntries, which a transfer must not.
            let _pass = self.gate.pass(self.write_timeout).await?;
            let read_log_id = self.raft.ensure_linearizable().await.map_err(check_leader_error)?;
            // Applied is not yet readable until its batch is written.
            if let Some(id) = read_log_id {
                self.sm.wait_written(id.index).await.map_err(Error::Internal)?;
            }
        }
        let (unique, positions) = distinct_ids(user_ids);
        // Moved into the blocking task: a cancelled call still holds its turn
        // until its reads are done.
        let permit = READS.acquire().await.map_err(Error::internal)?;
        let now = self.clock.now_ms();
        let (db, gid) = (self.sm.db(), self.sm.gid());
        let repeats = repeat_counts(&positions, unique.len());
        let read = move || {
            let _permit = permit;
            // The response's bytes, counted as the views are read, so a
            // call that would pass the response limit stops early (memory:
            // the limit plus one user's profile).
            let mut bytes = 0usize;
            let mut views = Vec::with_capacity(unique.len());
            for (i, user) in unique.iter().enumerate() {
                let view = read_profile(&db, gid, &schema.schema, &engine, user, &selection, now)
                    .map_err(Error::internal)?;
                bytes = bytes.saturating_add(view.approx_bytes().saturating_mul(repeats[i]));
                if bytes > MAX_RESPONSE_BYTES {
                    return Err(Error::invalid(
                        "user_ids",
                        format!(
                            "the response would pass {} MiB (at user {} of {}); ask for fewer users or \
                             select fewer families, features or tags",
                            MAX_RESPONSE_BYTES >> 20,
                            i + 1,
                            unique.len()
                        ),
                    ));
                }
                views.push(view);
            }
            Ok(views)
        };
        let views = tokio::task::spawn_blocking(read).await.map_err(Error::internal)??;
        // Without repeats, positions are 0..n: the views are in order already.
        let views = match views.len() == positions.len() {
            true => views,
            false => positions.into_iter().map(|i| views[i].clone()).collect(),
        };
        Ok((views, self.read_info(now)))
    }

    fn read_info(&self, as_of_ms: i64) -> ReadInfo {
        let applied_index = self.sm.applied().last_applied.map(|l| l.index).unwrap_or(0);
        let freshness = freshness(&self.raft.metrics().borrow(), applied_index, &self.contact, &self.acks);
        ReadInfo { node_id: self.id, applied_index, as_of_ms, freshness }
    }

    pub fn schema(&self) -> Arc<VersionedSchema> {
        self.sm.schema()
    }

    /// Validates a schema and, unless `dry_run`, replicates it.
    pub async fn apply_schema(&self, toml: String, dry_run: bool) -> Result<VersionedSchema> {
        let (schema, _) = check_schema(&toml).map_err(|e| Error::invalid("toml", e.to_string()))?;
        if dry_run {
            return Ok(VersionedSchema { version: self.sm.schema().version, schema });
        }
        let _pass = self.gate.pass(self.write_timeout).await?;
        let command = Command::ApplySchema { stamp_ms: self.stamper.stamp()?, toml };
        let resp = self.raft.client_write(command).await.map_err(client_write_error)?;
        match resp.data {
            CommandResult::SchemaApplied { version } => Ok(VersionedSchema { version, schema }),
            CommandResult::Rejected { reason } => Err(Error::FailedPrecondition(reason)),
            other => Err(Error::Internal(format!("unexpected apply result {other:?}"))),
        }
    }

    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<_> = membership.voter_ids().collect();
        let last_log_index = m.last_log_index.unwrap_or(0);
        // Only the leader has replication metrics; there every member has a row.
        let matched =
            |id: &NodeId| m.replication.as_ref().map(|r| r.get(id).cloned().flatten().map(|l| l.index));
        let members = membership
            .nodes()
            .map(|(id, node)| MemberStatus {
                node_id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched(id).flatten(),
                lag_entries: matched(id).map(|i| last_log_index.saturating_sub(i.unwrap_or(0))),
            })
            .collect();
        // What reads see (raft's own applied index may be one entry ahead
        // while that entry's batch is written).
        let applied_index = self.sm.applied().last_applied.map(|l| l.index).unwrap_or(0);
        let leader_addr = m.current_leader.and_then(|l| membership.get_node(&l).map(|n| n.addr.clone()));
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
            schema_version: self.sm.schema().version,
            reevaluation: match self.sm.reeval_progress() {
                Ok(Some(p)) => (true, p.users_done),
                _ => (false, 0),
            },
            freshness: freshness(&m, applied_index, &self.contact, &self.acks),
            logical_clock_ms: self.sm.clock_ms(),
            clock: self.clock.status(
                self.id,
                &voters.iter().copied().collect::<Vec<_>>(),
                self.sm.clock_ms(),
            ),
        }
    }

    /// An operator accepts this node's clock as it is now (after the guard
    /// refused a jump); returns (now, the reference it replaces).
    pub fn confirm_clock(&self) -> Result<(i64, Option<i64>)> {
        self.clock
            .confirm(self.sm.clock_ms())
            .map_err(|e| Error::Internal(format!("writing the clock mark: {e}")))
    }

    /// Stops the node's background tasks, then raft, then flushes the state
    /// machine so the next start replays no log (the stores close when the
    /// last handle drops).
    pub async fn shutdown(&self) {
        self.tasks.stop().await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        let sm = self.sm.clone();
        match tokio::task::spawn_blocking(move || sm.persist()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the state machine at shutdown"),
            Err(e) => tracing::warn!(error = %e, "flushing the state machine at shutdown"),
        }
    }
}

/// Rejects a list of more than `max` names (checked first: a request of
/// 1,000,000 names costs one comparison), then names that are not in the
/// schema: `families[1]: unknown family "x" (schema has: ...)`.
fn check_names<'a>(
    (kind, singular, max): (&str, &str, usize),
    names: &Option<Vec<String>>,
    known: impl Fn(&str) -> bool,
    all: impl Iterator<Item = &'a String>,
) -> Result<()> {
    let Some(names) = names else { return Ok(()) };
    if names.len() > max {
        return Err(Error::invalid(kind, format!("{} names is over the limit of {max}", names.len())));
    }
    if let Some((i, name)) = names.iter().enumerate().find(|(_, n)| !known(n)) {
        let list = all.cloned().collect::<Vec<_>>().join(", ");
        return Err(Error::invalid(
            format!("{kind}[{i}]"),
            format!("unknown {singular} {name:?} (schema has: {list})"),
        ));
    }
    Ok(())
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

fn check_leader_error(e: RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>) -> Error {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => not_leader(f),
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => Error::Unavailable(q.to_string()),
        RaftError::Fatal(f) => Error::Unavailable(format!("raft is not running: {f}")),
    }
}
