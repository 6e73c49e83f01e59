//! The meta group ([`GroupId::META`]) on a node: the cluster's shard map
//! (nodes, and the replicas each shard should have) and its schema, as
//! `portrait_core::meta` defines them. Every node hosts a replica of it:
//! voters on up to [`MAX_META_VOTERS`] nodes, learners on the rest, so
//! every node reads the map locally.
//!
//! The meta leader decides: AddNode, RemoveNode and ApplySchema go to it
//! (elsewhere they are NOT_LEADER with its address), change the map or the
//! schema through the meta log, and wait until the shards have followed
//! (each shard's leader makes its membership match the map and applies the
//! schema through its own log: see `node/placement.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use portrait_core::meta::{MetaCommand, MetaOutcome, MetaState};
use portrait_core::rules::DRAIN_DEAD_BESIDE_DRAIN;
use portrait_core::shard::{plan_leader_transfers, Leadership, MapChange, ShardMap};
use portrait_proto::v1::raft_client::RaftClient;
use portrait_proto::v1::{BalanceLeaderRequest, ClusterStatusRequest, ClusterStatusResponse, ShardStatus};

use super::Node;
use crate::engine::check_schema;
use crate::error::{Error, Result, OUTCOME_UNKNOWN};
use crate::raft::client_write_error;
use crate::raft::replica::Replica;
use crate::schema::VersionedSchema;
use crate::types::{Command, CommandResult, GroupId, NodeId};

/// Voters of the meta group at most; further nodes are its learners.
pub const MAX_META_VOTERS: usize = 5;
/// A node address longer than this is refused (it is kept in the map and
/// every raft membership).
pub const MAX_ADDR_BYTES: usize = 256;
/// How long AddNode and RemoveNode wait for the shards to follow the map
/// (a new replica may need a snapshot), and ApplySchema for every shard
/// to apply the schema. Past it the change stays made and goes on; the
/// call says so (UNAVAILABLE) and may be repeated.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(120);
/// A meta voter counts toward the quorum a removal leaves only if its node
/// answered the liveness probe this recently.
pub(super) const META_QUORUM_HEARD_WITHIN: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(200);
/// One status call to a peer may take this long.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How often leader balancing looks at the shards' leaders.
const LEADER_BALANCE_EVERY: Duration = Duration::from_secs(1);

/// A leader transfer that failed is not tried again (same shard, same
/// target) for this long: a node that refuses to campaign (its clock guard,
/// say) is not asked every second.
const LEADER_REFUSAL_BACKOFF: Duration = Duration::from_secs(30);
/// A leader balancing transfer may take this long (it waits for the
/// target to catch up, then sleeps one leader lease).
const LEADER_TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);

impl Node {
    /// The meta group's state as this node applied it.
    pub fn cluster(&self) -> Arc<MetaState> {
        self.meta.sm.cluster()
    }

    /// The ids a removal retired that have left both the shard map and the
    /// meta group (as this node has applied them): no raft message or peer
    /// call of theirs is taken (`service/raft.rs`). A retired node still in
    /// either is being removed and works on until the removal finishes: it
    /// may still vote in the meta group, whose elections can need it.
    pub fn gone_ids(&self) -> BTreeSet<NodeId> {
        let cluster = self.cluster();
        if cluster.retired.is_empty() {
            return BTreeSet::new();
        }
        let metrics = self.meta.raft.metrics();
        let metrics = metrics.borrow();
        let members = metrics.membership_config.membership();
        let in_map = |id: &NodeId| cluster.map.as_ref().is_some_and(|m| m.nodes.contains_key(id));
        cluster.retired.iter().copied().filter(|id| !in_map(id) && members.get_node(id).is_none()).collect()
    }

    /// The schema in force: the meta group's newest (version 1, 2, …; 0 is
    /// the built-in default). Requests are validated against it; each
    /// shard applies it through its own log.
    pub fn schema(&self) -> Arc<VersionedSchema> {
        let cluster = self.cluster();
        let Some(newest) = &cluster.schema else { return VersionedSchema::shared_default() };
        let mut cached = self.schema_cache.lock().expect("schema cache lock");
        if cached.version != newest.version {
            match check_schema(&newest.toml) {
                Ok((schema, _)) => *cached = Arc::new(VersionedSchema { version: newest.version, schema }),
                // Validated before it was proposed: only a binary whose
                // rule language changed could get here.
                Err(e) => {
                    tracing::error!(version = newest.version, error = %e, "the committed schema does not compile")
                }
            }
        }
        cached.clone()
    }

    /// NOT_LEADER with the meta leader's address unless this node leads
    /// the meta group. Never names this node (between an election won and
    /// its metrics saying Leader, it may be its own current leader): then
    /// no leader is named, and the caller retries.
    ///
    /// UNAVAILABLE ("retry") while this node leads but has not applied an
    /// entry of its own term: a new leader may not have applied what its
    /// predecessor committed (a replica addition, a drain), and a change
    /// planned on that older map would be planned again (a shard given a
    /// replica more than its target, for good). Its term's first entry
    /// applied, everything before it is.
    pub(super) fn lead_meta(&self) -> Result<()> {
        let m = self.meta.raft.metrics().borrow().clone();
        if m.state == openraft::ServerState::Leader {
            if m.last_applied.is_some_and(|applied| applied.leader_id.term == m.current_term) {
                return Ok(());
            }
            return Err(Error::Unavailable(
                "this node was just elected the meta group's leader and is applying its log; retry".into(),
            ));
        }
        let leader = m.current_leader.filter(|l| *l != self.id);
        let leader_addr =
            leader.and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()));
        Err(Error::NotLeader { leader_id: leader, leader_addr, group: None })
    }

    /// Commits a meta command (this node leads the meta group); returns
    /// the map's epoch and the schema version after it. A refused command
    /// is FAILED_PRECONDITION with its reason. Bounded by the write
    /// timeout: a meta leader without a quorum answers UNAVAILABLE (the
    /// outcome unknown: the command may still commit) rather than hold its
    /// caller, placement's pass included, until the quorum returns.
    pub(super) async fn propose_meta(&self, command: MetaCommand) -> Result<(u64, u64)> {
        let _pass = self.meta.gate.pass(self.write_timeout).await?;
        let command = Command::Meta { stamp_ms: self.meta.stamper.stamp()?, command };
        let write = tokio::time::timeout(self.write_timeout, self.meta.raft.client_write(command));
        let resp = write
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "the meta group did not commit the change within {} ms (no quorum?); {OUTCOME_UNKNOWN}",
                    self.write_timeout.as_millis()
                ))
            })?
            .map_err(client_write_error)?;
        match resp.data {
            CommandResult::Meta(MetaOutcome::Applied { epoch, schema_version }) => {
                Ok((epoch, schema_version))
            }
            CommandResult::Meta(MetaOutcome::Refused { reason }) => Err(Error::FailedPrecondition(reason)),
            other => Err(Error::Internal(format!("unexpected meta result {other:?}"))),
        }
    }

    /// Creates the cluster's map on a new single node (once: a created map
    /// is kept).
    pub(super) async fn create_cluster(&self, shards: u32, replication: u32) -> anyhow::Result<()> {
        if self.cluster().map.is_some() {
            return Ok(());
        }
        let wait = self.meta.raft.wait(Some(Duration::from_secs(10)));
        wait.metrics(|m| m.state == openraft::ServerState::Leader, "the new node leads the meta group")
            .await?;
        let create = MetaCommand::Create {
            shards,
            replication,
            node: self.id,
            addr: self.advertise.clone(),
            peer_addr: self.peer_advertise.clone(),
            incarnation: self.incarnation,
            rules: crate::rules::newest(),
        };
        match self.propose_meta(create).await {
            Ok(_) => Ok(()),
            // Killed before its first Create was applied to the state, a
            // node proposes it again at restart; the meta group keeps the
            // first (re-applied from the log) and refuses this one.
            Err(Error::FailedPrecondition(_)) if self.cluster().map.is_some() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Commits the replicas placement adds to reach the replication factor
    /// (`ShardMap::plan_additions`), one at a time, each planned on the map
    /// the previous one left (one placement runs at a time on the node);
    /// the shards' leaders then add them.
    pub(super) async fn place(&self) -> Result<()> {
        let _one = self.placing.lock().await;
        self.lead_meta()?;
        self.add_missing().await?;
        self.balance().await
    }

    /// The additions of [`Node::place`], without balancing (the caller
    /// holds `placing`).
    /// No replica goes to a node that does not answer ([`Node::silent`]):
    /// its shard's leader would wait for it to catch up for good.
    async fn add_missing(&self) -> Result<()> {
        let mut silent = None;
        loop {
            let Some(map) = self.cluster().map.clone() else { return Ok(()) };
            if map.plan_additions(&BTreeSet::new(), 1).is_empty() {
                return Ok(());
            }
            // Asked once a pass, and only when there is something to add.
            let silent = match &silent {
                Some(silent) => silent,
                None => silent.insert(self.silent(&map, &self.statuses().await)),
            };
            let Some(change) = map.plan_additions(silent, 1).pop() else { return Ok(()) };
            self.propose_meta(MetaCommand::Map(change)).await?;
        }
    }

    /// Whether node `n` counts as answering for a meta membership change:
    /// this node, or one heard on the liveness probe within
    /// [`META_QUORUM_HEARD_WITHIN`].
    fn answers_meta(&self, n: NodeId) -> bool {
        n == self.id || self.liveness.silent_for(n, std::time::Instant::now()) < META_QUORUM_HEARD_WITHIN
    }

    /// The map's nodes that do not answer: none to this round's status
    /// call (`statuses`), and none to the liveness probes for
    /// [`META_QUORUM_HEARD_WITHIN`] (a node slow to answer one call, busy
    /// with a snapshot, still counts as answering). Never this node.
    fn silent(&self, map: &ShardMap, statuses: &[(NodeId, ClusterStatusResponse)]) -> BTreeSet<NodeId> {
        let now = std::time::Instant::now();
        map.nodes
            .keys()
            .filter(|n| !statuses.iter().any(|(id, _)| id == *n))
            .filter(|n| **n != self.id && self.liveness.silent_for(**n, now) >= META_QUORUM_HEARD_WITHIN)
            .copied()
            .collect()
    }

    /// Balancing (meta leader): moves replicas from the most to the least
    /// loaded nodes until every node holds within one of the others, at
    /// most `max_moves` under way at once. A shard is under way (busy)
    /// while its leader's membership differs from the map's replicas, or
    /// while no leader of it answers; busy shards are not moved again.
    async fn balance(&self) -> Result<()> {
        self.drain_dead().await?;
        let Some(map) = self.cluster().map.clone() else { return Ok(()) };
        let (none, nobody) = (BTreeSet::new(), BTreeSet::new());
        let balancing = self.max_moves > 0 && !map.plan_moves(&none, &nobody, 1).is_empty();
        if !balancing && map.plan_drain(&none, &nobody, 1).is_empty() {
            self.balance_leaders(&map).await;
            return Ok(());
        }
        let statuses = self.statuses().await;
        let busy = busy_shards(&map, &statuses);
        // A move whose new replica is on a draining node that never came to
        // vote (its node died while catching up) would wait forever: it is
        // no move under way, and its replica is moved on.
        let stalled = stalled_on_draining(&map, &statuses, &busy);
        // A shard without a quorum of answering voters (two of its three
        // nodes dead, say; a leader that lost its quorum may still call
        // itself one) is drained in the map all the same: nothing moves
        // until it has a quorum again, and then its leader follows the map
        // (adding the new replicas before it removes the old). Held back,
        // its replica would keep its draining node holding replicas, and
        // that refuses every later drain: the other dead node's shards
        // would stay short of replicas.
        let stuck = without_quorum(&map, &statuses);
        // A drain moves at least one replica at a time, even with
        // balancing off. Only moves under way take room: a shard without a
        // leader (its nodes down) is busy, but must not hold up the drain
        // that gives the others their replicas back.
        // Nor does a shard without a quorum: its membership cannot change
        // until it has one, and it would hold the room for good.
        // Nor does a move waiting only on nodes that do not answer (a node
        // that died while it took a replica, and is not drained yet: the
        // drain under way must end before its own can start). And no new
        // replica goes to such a node.
        // Silent: no answer to this round's status call, and none to the
        // liveness probes for a while (a node slow to answer one call, busy
        // with a snapshot, still takes part in its moves).
        let silent = self.silent(&map, &statuses);
        let waiting = waiting_on(&map, &statuses, &busy, &silent);
        let moving = moving_shards(&map, &statuses, &(&(&stalled | &stuck) | &waiting));
        let room = self.max_moves.max(1).saturating_sub(moving);
        let mut plan = map.plan_drain(&(&(&busy - &stalled) - &stuck), &silent, room);
        tracing::debug!(?busy, ?stalled, ?waiting, ?silent, room, ?plan, "balance");
        if balancing && plan.is_empty() {
            plan = map.plan_moves(&busy, &silent, room);
        }
        for change in plan {
            tracing::info!(?change, "moving replicas");
            self.propose_meta(MetaCommand::Map(change)).await?;
        }
        Ok(())
    }

    /// Leader balancing (meta leader, with balancing on): once no replica
    /// is moving, asks shards' leaders to hand leaderships over so that
    /// the nodes not draining lead within one of each other
    /// ([`plan_leader_transfers`]), at most `max_moves` transfers under way
    /// at once. Looks every [`LEADER_BALANCE_EVERY`]; each transfer runs on
    /// the shard's leader (`Raft.BalanceLeader`) and pauses that shard's
    /// writes for about one leader lease.
    async fn balance_leaders(&self, map: &ShardMap) {
        if self.max_moves == 0 {
            return;
        }
        {
            let mut last = self.leaders_balanced.lock().expect("leaders_balanced lock");
            let now = tokio::time::Instant::now();
            if last.is_some_and(|at| now - at < LEADER_BALANCE_EVERY) {
                return;
            }
            *last = Some(now);
        }
        let statuses = self.statuses().await;
        if !busy_shards(map, &statuses).is_empty() {
            return;
        }
        let mut leaders: BTreeMap<u32, (u64, Leadership)> = BTreeMap::new();
        for (node, status) in &statuses {
            for s in status.shard_status.iter().filter(|s| s.role == "Leader" && s.leader_id == *node) {
                // Two claims (one stale): the later term's.
                if leaders.get(&s.shard).is_none_or(|(term, _)| s.term > *term) {
                    let leadership = Leadership { leader: *node, voters: s.voters.clone() };
                    leaders.insert(s.shard, (s.term, leadership));
                }
            }
        }
        let mut leaders: BTreeMap<u32, Leadership> = leaders.into_iter().map(|(s, (_, l))| (s, l)).collect();
        let mut moves = self.leader_moves.lock().expect("leader_moves lock");
        for (shard, t) in moves.iter() {
            if let Some(l) = leaders.get_mut(shard) {
                l.leader = t.to; // counted where it is going
            }
        }
        // Nodes that may lead: not draining, and answering now (a node that
        // is down leads nothing and would always look like the best target).
        let nodes: BTreeSet<NodeId> = map
            .nodes
            .keys()
            .filter(|n| !map.draining.contains(n) && statuses.iter().any(|(id, _)| id == *n))
            .copied()
            .collect();
        let room = self.max_moves.saturating_sub(moves.len());
        let now = tokio::time::Instant::now();
        let mut refusals = self.leader_refusals.lock().expect("leader_refusals lock");
        refusals.retain(|_, until| *until > now);
        for t in plan_leader_transfers(&leaders, &nodes, room) {
            if moves.contains_key(&t.shard) || refusals.contains_key(&(t.shard, t.to)) {
                continue;
            }
            let (Some(from), Some(_)) = (map.nodes.get(&t.from), map.nodes.get(&t.to)) else { continue };
            tracing::info!(shard = t.shard, from = t.from, to = t.to, "balancing leaders");
            moves.insert(t.shard, t);
            let request = BalanceLeaderRequest { from: self.id, group: t.shard, target: t.to };
            let (addr, moves) = (from.peer_addr.clone(), self.leader_moves.clone());
            let refusals = self.leader_refusals.clone();
            tokio::spawn(async move {
                if let Err(e) = peer_balance_leader(t.from, &addr, request).await {
                    tracing::info!(shard = t.shard, from = t.from, to = t.to, error = %e,
                        "leader transfer failed; not tried again for 30 s");
                    let until = tokio::time::Instant::now() + LEADER_REFUSAL_BACKOFF;
                    refusals.lock().expect("leader_refusals lock").insert((t.shard, t.to), until);
                }
                moves.lock().expect("leader_moves lock").remove(&t.shard);
            });
        }
    }

    /// Drains a node of the map that holds replicas and has not answered
    /// this node's probes for `replica_dead_after` (as far as this node,
    /// the meta leader, has seen: a new leader waits that long again), so
    /// that its replicas are re-created on the others. One per pass.
    /// Also while another node's drain is under way, from apply rules
    /// version [`DRAIN_DEAD_BESIDE_DRAIN`] on (`MapChange::DrainDead`):
    /// that drain may have nowhere to go but the dead node (four nodes,
    /// RF 3), and each would wait for the other for good. Before it, not.
    async fn drain_dead(&self) -> Result<()> {
        let cluster = self.cluster();
        let Some(map) = cluster.map.clone() else { return Ok(()) };
        let beside = cluster.rules() >= DRAIN_DEAD_BESIDE_DRAIN;
        if !beside && map.draining.iter().any(|d| !map.hosted_by(*d).is_empty()) {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let dead = map.nodes.keys().copied().find(|&n| {
            n != self.id
                && !map.draining.contains(&n)
                && !map.hosted_by(n).is_empty()
                && self.liveness.silent_for(n, now) >= self.replica_dead_after
        });
        if let Some(node) = dead {
            // Not on this node's word alone: a link cut between it and the
            // silent node only (a partial partition) would drain a healthy
            // node for good.
            if let Some(witness) =
                heard_elsewhere(node, self.id, &self.statuses().await, self.replica_dead_after)
            {
                tracing::warn!(
                    node,
                    witness,
                    "node silent to the meta leader past replica_dead_after, but node \
                    {witness} hears it: not draining it (a partial partition?)"
                );
                return Ok(());
            }
            let silent = self.liveness.silent_for(node, now);
            tracing::warn!(node, ?silent, "node silent past replica_dead_after: draining it to restore RF");
            let change = match beside {
                true => MapChange::DrainDead { node },
                false => MapChange::Drain { node },
            };
            self.propose_meta(MetaCommand::Map(change)).await?;
        }
        Ok(())
    }

    /// Starts draining node `id` (meta leader only): placement then moves
    /// its replicas away. Returns the replicas it holds now.
    pub async fn drain_node(&self, id: NodeId) -> Result<u32> {
        self.lead_meta()?;
        let map = self.cluster().map.clone().ok_or_else(not_created)?;
        if !map.nodes.contains_key(&id) {
            return Err(Error::NotFound(format!("node {id} is not in the cluster")));
        }
        self.propose_meta(MetaCommand::Map(MapChange::Drain { node: id })).await?;
        tracing::info!(node = id, "draining");
        Ok(map.hosted_by(id).len() as u32)
    }

    /// Adds node `id` at `addr` (meta leader only): to the meta group as a
    /// learner that catches up, then to the map with its data dir's
    /// incarnation, then a meta voter while the group has fewer than
    /// [`MAX_META_VOTERS`]; placement gives it replicas; returns when it
    /// is a voter of every shard placed on it.
    /// With `learner_only` it only follows the meta group (it hosts no
    /// shard). Idempotent: a call that failed part way is finished by
    /// calling again.
    pub async fn add_node(
        &self,
        id: NodeId,
        addr: String,
        peer_addr: String,
        learner_only: bool,
    ) -> Result<u64> {
        if id == 0 {
            return Err(Error::invalid("node_id", "must be at least 1 (0 means \"no node\" in the API)"));
        }
        check_addr("addr", &addr, "http://10.0.0.2:7700")?;
        check_addr("peer_addr", &peer_addr, "http://10.0.0.2:8700")?;
        if addr == peer_addr {
            return Err(Error::invalid(
                "peer_addr",
                "must differ from addr (peers have a port of their own)",
            ));
        }
        self.lead_meta()?;
        let map = self.cluster().map.clone().ok_or_else(not_created)?;
        // Its removal is not undone (its own join loop asks on).
        if self.cluster().retired.contains(&id) {
            return Err(retired(id));
        }
        // A drain is never undone: adding a draining node again would
        // change nothing and answer OK (and flap its meta vote).
        if map.draining.contains(&id) {
            let left = map.hosted_by(id).len();
            return Err(Error::FailedPrecondition(format!(
                "node_id: node {id} is draining ({left} replicas left to move off it), and a drain is not \
                 undone: once it holds none, remove it (cluster remove-node {id}) and add it again under a \
                 new id on an empty data dir (docs/operations.md)"
            )));
        }
        // The shards short of RF once the node is in: the call waits for
        // the replicas it gets of those, not for balancing moves to it.
        let short: BTreeSet<u32> = {
            let nodes = map.nodes.len() + usize::from(!map.nodes.contains_key(&id)) - map.draining.len();
            let target = (map.replication as usize).min(nodes);
            (0..map.shards).filter(|&s| map.replicas[s as usize].len() < target).collect()
        };
        if map.nodes.len() == 1 && map.nodes.contains_key(&self.id) {
            // A cluster whose creation was cut short (killed between the
            // map and its shards) creates its shards here first: once a
            // second node is in the map, a shard never initialized would
            // never be (`host`), and the new node's replicas would wait
            // for a leader forever.
            self.host(&map).await.map_err(|e| {
                Error::Unavailable(format!(
                    "node {} has not finished creating the cluster's shards ({e}); nothing was changed, \
                     call again",
                    self.id
                ))
            })?;
        }
        // Raft keeps a member's address once added: an address change
        // would leave the groups dialing the old one.
        let member = self.meta.raft.metrics().borrow().membership_config.membership().get_node(&id).cloned();
        let known = map.nodes.get(&id).map(|n| (n.addr.clone(), n.peer_addr.clone()));
        let moved = known.as_ref().is_some_and(|(a, p)| (a, p) != (&addr, &peer_addr))
            || member.as_ref().is_some_and(|m| m.addr != peer_addr);
        if moved {
            let (a, p) = known.unwrap_or_else(|| {
                ("(no client address yet)".into(), member.map(|m| m.addr).unwrap_or_default())
            });
            return Err(Error::FailedPrecondition(format!(
                "node_id: node {id} is in the cluster at {a} (peer {p}); to move it, remove it and add it again \
                 with a new id, or restart it on the old addresses"
            )));
        }
        if known.is_none() {
            check_addrs_free(
                id,
                &addr,
                &peer_addr,
                &map,
                self.meta.raft.metrics().borrow().membership_config.membership(),
            )?;
        }
        let recorded = map.nodes.get(&id).map_or(0, |n| n.incarnation);
        let mut incarnation = self.check_new_node(id, &peer_addr, recorded).await?;
        let voters = self.meta.raft.metrics().borrow().membership_config.membership().voter_ids().count();
        let is_voter =
            self.meta.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == id);
        let meta_voter = !learner_only && (is_voter || voters < MAX_META_VOTERS);
        // A learner first: it is promoted only once the map records its
        // data dir, so every raft message that could count its vote is
        // checked against that data dir.
        let added = add_to_group(&self.meta, id, &peer_addr, true, self.write_timeout, FOLLOW_TIMEOUT).await;
        // Retired meanwhile (a RemoveNode of it retires the id, then takes
        // it out of the meta group, perhaps before this learner was added),
        // whether or not the learner caught up: taken out again, so the
        // removal holds (the meta leader's placement pass also removes a
        // retired learner left behind, should this fail).
        if self.cluster().retired.contains(&id) {
            // Should this fail, the meta leader's placement pass removes it.
            let alive = |n| self.answers_meta(n);
            if let Err(e) = remove_from_group(&self.meta, id, self.write_timeout, alive).await {
                tracing::info!(node = id, error = %e, "a retired learner stays until the next placement pass");
            }
            return Err(retired(id));
        }
        let mut index = added.map_err(in_meta)?;
        if learner_only {
            return Ok(index);
        }
        if incarnation == 0 {
            // It has just caught up with the meta group, so it is up now.
            incarnation = self.check_new_node(id, &peer_addr, recorded).await?;
        }
        if incarnation == 0 && recorded == 0 {
            return Err(Error::Unavailable(format!(
                "node {id} at {peer_addr} did not say which data dir it runs on (Raft.Status); nothing is \
                 lost, call again"
            )));
        }
        let entry = map.nodes.get(&id).map(|n| (n.addr.as_str(), n.peer_addr.as_str(), n.incarnation));
        let incarnation = if recorded != 0 { recorded } else { incarnation };
        if entry != Some((&addr, &peer_addr, incarnation)) {
            // Asked again: the cluster's apply rules may have been raised
            // since the first check (the map did not have the node yet).
            let _rules = self.rules_gate.lock().await;
            self.check_rules_of(id, &peer_addr).await?;
            let add = MapChange::AddNode { node: id, addr, peer_addr, incarnation };
            self.propose_meta(MetaCommand::Map(add)).await?;
        }
        if meta_voter {
            // Within the cap again: another AddNode (or the voter upkeep)
            // may have promoted a node meanwhile. Past it the node stays a
            // learner, and the upkeep promotes it once there is room.
            index =
                promote_in_group(&self.meta, id, Some(MAX_META_VOTERS), self.write_timeout, FOLLOW_TIMEOUT)
                    .await
                    .map_err(in_meta)?;
        }
        // Waited for: the replicas the node gets to bring shards to their
        // replication factor, not the balancing moves that follow (a large
        // shard's move takes minutes), nor other nodes' replicas (one that
        // is down would hold the call up to no purpose).
        let added: BTreeSet<u32> = {
            let _one = self.placing.lock().await;
            self.add_missing().await?;
            let hosted = self.cluster().map.as_ref().map(|m| m.hosted_by(id)).unwrap_or_default();
            hosted.into_iter().filter(|s| short.contains(s)).collect()
        };
        // The node is in; a refused or timed-out balancing move is not
        // this call's failure (the next placement round retries it).
        if let Err(e) = self.place().await {
            tracing::info!(node = id, error = %e, "placement after an addition; the next round retries");
        }
        let what = format!("placing replicas on node {id}");
        self.wait_followed(&what, |node, shard| node == id && added.contains(&shard)).await?;
        Ok(index)
    }

    /// Removes node `id` (meta leader only): from the meta group, then from
    /// the map; returns once both changes committed.
    /// Refused (FAILED_PRECONDITION) while the map places replicas on it
    /// or a shard's membership still holds it (drain it first), while it
    /// cannot be marked draining (another node's drain is under way), and
    /// when the meta voters left would have no quorum that answers.
    pub async fn remove_node(&self, id: NodeId) -> Result<u64> {
        self.lead_meta()?;
        let map = self.cluster().map.clone().ok_or_else(not_created)?;
        let meta_member =
            self.meta.raft.metrics().borrow().membership_config.membership().get_node(&id).is_some();
        if !map.nodes.contains_key(&id) && !meta_member {
            return Err(Error::NotFound(format!(
                "node {id} is not a member of the cluster (if an earlier RemoveNode of it failed, it may have \
                 completed: `portrait cluster status` lists the members)"
            )));
        }
        if map.nodes.contains_key(&id) {
            // Refused while it holds replicas, or while it could not be
            // marked draining (below): checked before anything moves.
            map.clone().apply(&MapChange::RemoveNode { node: id }).map_err(Error::FailedPrecondition)?;
            if !map.draining.contains(&id) {
                map.clone()
                    .apply(&MapChange::Drain { node: id })
                    .map_err(|reason| draining_refused(id, reason))?;
            }
        }
        // The map moves a replica at once; its group drops the old one only
        // once the new one has caught up. Until then the node still votes.
        check_left_every_group(id, self.shards, &self.statuses().await)?;
        let alive = |n| self.answers_meta(n);
        let meta_voters: Vec<NodeId> =
            self.meta.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        quorum_without(&meta_voters, id, alive).map_err(in_meta)?;
        if id == self.id {
            // Hand the meta group over first (to a voter that answers);
            // the caller's retry (it follows the redirect) removes this
            // node from there.
            let others: Vec<NodeId> = meta_voters.iter().copied().filter(|v| *v != id).collect();
            let Some(target) = others.iter().copied().find(|v| alive(*v)).or(others.first().copied()) else {
                return Err(Error::FailedPrecondition(format!("node {id} is the cluster's last node")));
            };
            self.transfer_group(&self.meta, target).await.map_err(in_meta)?;
            return Err(self
                .lead_meta()
                .err()
                .unwrap_or(Error::Unavailable("handing the meta group over".into())));
        }
        // Draining first, so placement puts no replica on it meanwhile;
        // then out of the meta group before out of the map: the map's
        // record of its data dir checks every raft message sent to it
        // until then.
        if map.nodes.contains_key(&id) && !map.draining.contains(&id) {
            // Refused while another node's drain is under way: that drain
            // could move a replica here while this node leaves the meta
            // group, so the removal waits for it.
            self.propose_meta(MetaCommand::Map(MapChange::Drain { node: id })).await.map_err(
                |e| match e {
                    Error::FailedPrecondition(reason) => draining_refused(id, reason),
                    e => e,
                },
            )?;
        }
        // Checked again now that it is draining (no replica is placed on a
        // draining node): a move planned on the map read above may have
        // placed one on it since. Then the drain moves it off first.
        if let Some(map) = self.cluster().map.clone() {
            if map.nodes.contains_key(&id) {
                map.clone().apply(&MapChange::RemoveNode { node: id }).map_err(|reason| {
                    Error::FailedPrecondition(format!(
                        "{reason} (placed there while the removal began; it is draining now: retry once \
                         `portrait cluster status` shows it holds none)"
                    ))
                })?;
            }
        }
        // Its shards' memberships checked again, as the map was: a move
        // onto it may have completed since the first check.
        check_left_every_group(id, self.shards, &self.statuses().await)?;
        // Retired before it leaves the meta group: from here on no AddNode
        // adds it again (its join loop, if it was half-way through joining,
        // asks on). A cluster not yet on version 6 cannot decode this.
        if self.cluster().rules() >= portrait_core::rules::RETIRED_IDS
            && !self.cluster().retired.contains(&id)
        {
            self.propose_meta(MetaCommand::Retire { node: id }).await?;
        }
        let index = remove_from_group(&self.meta, id, self.write_timeout, alive).await.map_err(in_meta)?;
        // The map read now: an AddNode of a node that was joining may have
        // committed since the first read.
        if self.cluster().map.as_ref().is_some_and(|m| m.nodes.contains_key(&id)) {
            self.propose_meta(MetaCommand::Map(MapChange::RemoveNode { node: id })).await.map_err(
                |e| match e {
                    Error::FailedPrecondition(reason) => Error::FailedPrecondition(format!(
                        "node {id} left the meta group, but the shard map still lists it: {reason}; call \
                     remove-node {id} again"
                    )),
                    e => e,
                },
            )?;
        }
        // The node is gone, and held no replica (checked above): nothing is
        // left to wait for. Placement runs once more for the moves the
        // drain held back; its failure is not the removal's (an error here
        // would have the caller retry a removal that is done).
        if let Err(e) = self.place().await {
            tracing::info!(node = id, error = %e, "placement after a removal; the next round retries");
        }
        Ok(index)
    }

    /// Validates a schema, has every node of the map check it with its own
    /// build, and, unless `dry_run`, commits it in the meta group (meta
    /// leader only) and waits until every shard has applied it through its
    /// own log. Returns the schema and the nodes that did not answer the
    /// check (see `node/schema_gate.rs`).
    pub async fn apply_schema(&self, toml: String, dry_run: bool) -> Result<(VersionedSchema, Vec<NodeId>)> {
        let schema = self.check_schema_here(&toml)?;
        if dry_run {
            let unchecked = self.check_schema_everywhere(&toml).await?;
            return Ok((VersionedSchema { version: self.schema().version, schema }, unchecked));
        }
        self.lead_meta()?;
        self.cluster().map.as_ref().ok_or_else(not_created)?;
        let unchecked = self.check_schema_everywhere(&toml).await?;
        let (_, version) = self.propose_meta(MetaCommand::SetSchema { toml }).await?;
        let deadline = tokio::time::Instant::now() + FOLLOW_TIMEOUT;
        loop {
            self.sync_schemas().await;
            let behind = self.shards_behind_schema(version).await;
            if behind.is_empty() {
                return Ok((VersionedSchema { version, schema }, unchecked));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "schema version {version} is committed; shards {behind:?} have not applied it yet (they \
                     will: watch `portrait cluster status`; should their leaders run a build that refuses \
                     it, their logs say so)"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Shards no replica of which reports schema `version` applied.
    async fn shards_behind_schema(&self, version: u64) -> Vec<u32> {
        let mut applied = vec![false; self.shards as usize];
        for (_, status) in self.statuses().await {
            for s in status.shard_status.iter().filter(|s| s.schema_version >= version) {
                if let Some(a) = applied.get_mut(s.shard as usize) {
                    *a = true;
                }
            }
        }
        (0..self.shards).filter(|&k| !applied[k as usize]).collect()
    }

    /// Waits until each node of the map reports a voter replica of each
    /// shard the map places on it, for the (node, shard) pairs `awaited`
    /// (UNAVAILABLE naming what is left after [`FOLLOW_TIMEOUT`]).
    async fn wait_followed(&self, what: &str, awaited: impl Fn(NodeId, u32) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + FOLLOW_TIMEOUT;
        loop {
            let mut left = self.unfollowed().await;
            left.retain(|(node, shard)| awaited(*node, *shard));
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let left: Vec<String> = left.iter().map(|(n, s)| format!("node {n} shard {s}")).collect();
                return Err(Error::Unavailable(format!(
                    "{what}: the map is committed and still being followed ({} replicas left: {}); call again \
                     or watch `portrait cluster status`",
                    left.len(),
                    left.join(", ")
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// (node, shard) pairs of the map that are not yet a voter replica.
    async fn unfollowed(&self) -> Vec<(NodeId, u32)> {
        let Some(map) = self.cluster().map.clone() else { return vec![] };
        let statuses = self.statuses().await;
        let mut left = Vec::new();
        for &node in map.nodes.keys() {
            let voting: BTreeSet<u32> = statuses
                .iter()
                .filter(|(n, _)| *n == node)
                .flat_map(|(_, s)| s.shard_status.iter())
                // A replica opened but not yet added by its leader reports
                // Follower too: it votes once its membership names it.
                .filter(|s| matches!(s.role.as_str(), "Leader" | "Follower" | "Candidate"))
                .filter(|s| s.voters.contains(&node))
                .map(|s| s.shard)
                .collect();
            left.extend(map.hosted_by(node).into_iter().filter(|s| !voting.contains(s)).map(|s| (node, s)));
        }
        left
    }

    /// `ClusterStatus` of every node of the map that answers from the data
    /// dir the map records for it (a node restarted on another one takes
    /// no part in raft: it counts as silent, so it is drained like a dead
    /// node, and it vouches for nobody).
    async fn statuses(&self) -> Vec<(NodeId, ClusterStatusResponse)> {
        let Some(map) = self.cluster().map.clone() else { return vec![] };
        let asks =
            map.nodes.iter().map(|(&id, n)| async move { (id, peer_status(Some(id), &n.peer_addr).await) });
        let recorded = |id: NodeId| map.nodes.get(&id).map_or(0, |n| n.incarnation);
        futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(id, s)| match s {
                Ok(s) if recorded(id) != 0 && s.incarnation != 0 && s.incarnation != recorded(id) => {
                    tracing::debug!(node = id, "answers from a replaced data dir: not counted");
                    None
                }
                Ok(s) => Some((id, s)),
                Err(e) => {
                    tracing::debug!(node = id, error = %e, "no status");
                    None
                }
            })
            .collect()
    }

    /// Refuses to add, as node `id`, a node that reports another id (its
    /// raft messages would speak for another member), another number of
    /// shards (it would host other groups), or a data dir other than the
    /// map's `recorded` incarnation for it (0: none yet). Returns the data
    /// dir incarnation it reports; 0 if it does not answer, which is not
    /// refused here: adding it waits for it like any learner.
    async fn check_new_node(&self, id: NodeId, peer_addr: &str, recorded: u64) -> Result<u64> {
        let addr = peer_addr;
        // Any node's certificate: the answer's id is compared with `id`
        // below, with an error that says which node answered.
        let status = match peer_status(None, addr).await {
            Ok(status) => status,
            Err(e) => {
                tracing::debug!(node = id, error = %e, "could not ask the new node who it is");
                return Ok(0);
            }
        };
        if status.node_id != id {
            return Err(Error::FailedPrecondition(format!(
                "node_id: the node answering at {addr} is node {}, not node {id}; add it as node {} or start \
                 it with --node-id {id}",
                status.node_id, status.node_id
            )));
        }
        if recorded != 0 && status.incarnation != 0 && status.incarnation != recorded {
            return Err(Error::FailedPrecondition(format!(
                "node_id: node {id} at {addr} runs on a data dir (incarnation {:x}) other than the one it was \
                 added with ({recorded:x}): the raft votes and log it had are lost. Drain and remove node \
                 {id}, then empty this node's data dir and add it under a new id (docs/operations.md)",
                status.incarnation
            )));
        }
        // A node that created a cluster of its own (started without
        // --no-bootstrap or --join) holds its own meta log and shard
        // groups: as a member here, its shards' groups would take writes
        // the rest of this cluster never sees.
        let cluster = self.cluster().map.as_ref().map_or(0, |m| m.cluster);
        if status.cluster_id != 0 && cluster != 0 && status.cluster_id != cluster {
            return Err(Error::FailedPrecondition(format!(
                "node {id} at {addr} belongs to another cluster ({:x}, this one is {cluster:x}): it created its \
                 own (started without --no-bootstrap or --join); restart it on an empty data dir with \
                 --no-bootstrap (or --join), then add it",
                status.cluster_id
            )));
        }
        if status.shards != 0 && status.shards != self.shards {
            return Err(Error::FailedPrecondition(format!(
                "node {id} at {addr} was started for a cluster of {} shards, this one has {}; restart it on an \
                 empty data dir with --shards {} (or --join)",
                status.shards, self.shards, self.shards
            )));
        }
        check_rules_answer(id, addr, self.cluster().rules(), &status)?;
        self.check_schema_on_new_node(id, addr).await?;
        Ok(status.incarnation)
    }

    /// Raises the cluster's apply rules version (meta leader) to the newest
    /// version every node runs a build of: every node of the map and every
    /// member of the meta group (a node being added is a member before the
    /// map has it), once all of them answer (a silent one may run
    /// anything). Only while this node's build has a version above the
    /// cluster's (the nodes' minimum cannot be above its own). The command
    /// carries the map's epoch, so a node added to the map meanwhile makes
    /// the meta group refuse it (asked at the next round).
    pub(super) async fn raise_rules(&self) -> Result<()> {
        let cluster = self.cluster();
        if cluster.map.is_none() || crate::rules::newest() <= cluster.rules() || !self.meta.is_leader() {
            return Ok(());
        }
        let _rules = self.rules_gate.lock().await;
        let cluster = self.cluster();
        let Some(map) = cluster.map.as_ref() else { return Ok(()) };
        let mut nodes: BTreeMap<NodeId, String> =
            map.nodes.iter().map(|(id, n)| (*id, n.peer_addr.clone())).collect();
        for (id, member) in self.membership().nodes() {
            nodes.entry(*id).or_insert_with(|| member.addr.clone());
        }
        let asks = nodes.iter().map(|(&id, addr)| async move { (id, peer_status(Some(id), addr).await) });
        let mut version = crate::rules::newest();
        for (id, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(status) => version = version.min(status.apply_rules_newest),
                Err(e) => {
                    tracing::debug!(node = id, error = %e, "apply rules: no answer, the cluster's version stays");
                    return Ok(());
                }
            }
        }
        if version <= cluster.rules() {
            return Ok(());
        }
        tracing::info!(
            from = cluster.rules(),
            to = version,
            "every node's build applies a newer apply rules version: raising the cluster's"
        );
        self.propose_meta(MetaCommand::SetRules { version, epoch: map.epoch }).await?;
        Ok(())
    }

    /// Refuses node `id` (at `addr`) if it answers that its build lacks
    /// the cluster's apply rules version now. A node that does not answer
    /// is not refused here: its replicas refuse to open (and its meta
    /// replica stops) on a version its build lacks, so it takes no part.
    async fn check_rules_of(&self, id: NodeId, addr: &str) -> Result<()> {
        match peer_status(Some(id), addr).await {
            Ok(status) => check_rules_answer(id, addr, self.cluster().rules(), &status),
            Err(e) => {
                tracing::debug!(node = id, error = %e, "could not ask the new node for its apply rules");
                Ok(())
            }
        }
    }
}

/// FAILED_PRECONDITION unless the build of node `id` (its `status`)
/// applies the cluster's apply rules version `rules`.
fn check_rules_answer(id: NodeId, addr: &str, rules: u32, status: &ClusterStatusResponse) -> Result<()> {
    let (oldest, newest) = (status.apply_rules_oldest, status.apply_rules_newest);
    if portrait_core::rules::check(rules, oldest, newest).is_ok() {
        return Ok(());
    }
    let build = match newest {
        0 => "a build without apply rules versions".to_string(),
        _ => format!("a build that applies apply rules versions {oldest} to {newest}"),
    };
    Err(Error::FailedPrecondition(format!(
        "node {id} at {addr} runs {build}; the cluster applies by version {rules}: run a build that has it \
         (docs/operations.md, \"Apply rules across a rolling upgrade\")"
    )))
}

/// Runs [`Node::raise_rules`] every [`RULES_ASK_EVERY`] until `stop` turns
/// true (or the node is gone): a task of its own, so nodes that do not
/// answer (one is down in every rolling upgrade) never hold up placement.
pub(super) async fn raise_rules_until(
    node: std::sync::Weak<Node>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RULES_ASK_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(node) = node.upgrade() else { return };
        tokio::select! {
            result = node.raise_rules() => if let Err(e) = result {
                tracing::debug!(error = %e, "raising the cluster's apply rules version");
            },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
/// See [`Node::raise_rules`].
const RULES_ASK_EVERY: Duration = Duration::from_secs(2);

/// INVALID_ARGUMENT when another member already has `addr` or `peer_addr`:
/// two ids on one process would put two of a shard's votes on one node.
fn check_addrs_free(
    id: NodeId,
    addr: &str,
    peer_addr: &str,
    map: &ShardMap,
    meta: &openraft::Membership<NodeId, openraft::BasicNode>,
) -> Result<()> {
    for (&other, node) in map.nodes.iter().filter(|(n, _)| **n != id) {
        if node.addr == addr {
            return Err(Error::invalid("addr", format!("{addr} is node {other}'s address")));
        }
        if node.peer_addr == peer_addr {
            return Err(Error::invalid("peer_addr", format!("{peer_addr} is node {other}'s peer address")));
        }
    }
    if let Some((other, _)) = meta.nodes().find(|(n, m)| **n != id && m.addr == peer_addr) {
        return Err(Error::invalid("peer_addr", format!("{peer_addr} is node {other}'s peer address")));
    }
    Ok(())
}

/// A node other than `me` that answered with its status and has heard
/// `node` within `within` (its clock probe's last answer), or `node`
/// itself if it answered.
fn heard_elsewhere(
    node: NodeId,
    me: NodeId,
    statuses: &[(NodeId, ClusterStatusResponse)],
    within: Duration,
) -> Option<NodeId> {
    statuses.iter().filter(|(n, _)| *n != me).find_map(|(n, status)| {
        let peers = status.clock.as_ref().map(|c| c.peers.as_slice()).unwrap_or_default();
        let heard = peers.iter().any(|p| p.node_id == node && Duration::from_millis(p.age_ms) < within);
        (*n == node || heard).then_some(*n)
    })
}

/// FAILED_PRECONDITION while a shard's raft membership, as its leader
/// reports it, still has `node` (a voter or a learner: its replica is
/// being moved, and removing the node now could take the shard's quorum,
/// or its only up-to-date copy, with it); UNAVAILABLE while some shard's
/// leader does not answer (it cannot be told).
fn check_left_every_group(
    node: NodeId,
    shards: u32,
    statuses: &[(NodeId, ClusterStatusResponse)],
) -> Result<()> {
    let leaders = shard_leaders(statuses);
    let member: Vec<u32> = leaders
        .values()
        .filter(|s| s.voters.contains(&node) || s.learners.contains(&node))
        .map(|s| s.shard)
        .collect();
    if !member.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "node {node} is still in the raft membership of shards {member:?}: their replicas are moving \
             off it; remove it once `portrait cluster drain {node}` has finished"
        )));
    }
    let unknown: Vec<u32> = (0..shards).filter(|s| !leaders.contains_key(s)).collect();
    if !unknown.is_empty() {
        return Err(Error::Unavailable(format!(
            "shards {unknown:?} have no leader that answers, so whether node {node} still votes in them \
             cannot be told; nothing was changed, call again"
        )));
    }
    Ok(())
}

/// Each shard's status as its leader reports it. A deposed leader that has
/// not heard of its successor yet may still say Leader: the newest term's
/// word counts.
fn shard_leaders(statuses: &[(NodeId, ClusterStatusResponse)]) -> BTreeMap<u32, &ShardStatus> {
    let mut leaders: BTreeMap<u32, &ShardStatus> = BTreeMap::new();
    for s in statuses.iter().flat_map(|(_, status)| status.shard_status.iter()).filter(|s| s.role == "Leader")
    {
        let newest = leaders.entry(s.shard).or_insert(s);
        if s.term > newest.term {
            *newest = s;
        }
    }
    leaders
}

/// How many shards have a leader that answers and a membership that is not
/// the map's yet, besides those in `not`: the moves under way.
fn moving_shards(map: &ShardMap, statuses: &[(NodeId, ClusterStatusResponse)], not: &BTreeSet<u32>) -> usize {
    let led: BTreeSet<u32> = shard_leaders(statuses).into_keys().collect();
    busy_shards(map, statuses).intersection(&led).filter(|s| !not.contains(s)).count()
}

/// Of the `busy` shards, those (with a leader that answers) whose map
/// replicas missing from the leader's voters are all on `silent` nodes:
/// their move waits on a node that does not answer, and ends only once
/// that node answers again or is drained.
fn waiting_on(
    map: &ShardMap,
    statuses: &[(NodeId, ClusterStatusResponse)],
    busy: &BTreeSet<u32>,
    silent: &BTreeSet<NodeId>,
) -> BTreeSet<u32> {
    shard_leaders(statuses)
        .into_values()
        .filter(|s| busy.contains(&s.shard))
        .filter(|s| {
            let Some(replicas) = map.replicas.get(s.shard as usize) else { return false };
            let mut missing = replicas.iter().filter(|n| !s.voters.contains(n)).peekable();
            missing.peek().is_some() && missing.all(|n| silent.contains(n))
        })
        .map(|s| s.shard)
        .collect()
}

/// Of the `busy` shards, those (with a leader that answers) whose replicas in the map on
/// draining nodes are none of the leader's voters: a move's new replica
/// whose node went before it caught up (and was drained for it). Moving
/// that replica on is safe (it votes in nothing) and the only way the
/// move ends.
fn stalled_on_draining(
    map: &ShardMap,
    statuses: &[(NodeId, ClusterStatusResponse)],
    busy: &BTreeSet<u32>,
) -> BTreeSet<u32> {
    shard_leaders(statuses)
        .into_values()
        .filter(|s| busy.contains(&s.shard))
        .filter(|s| {
            let Some(replicas) = map.replicas.get(s.shard as usize) else { return false };
            let mut draining = replicas.iter().filter(|n| map.draining.contains(n)).peekable();
            draining.peek().is_some() && draining.all(|n| !s.voters.contains(n))
        })
        .map(|s| s.shard)
        .collect()
}

/// Shards whose voters, as their replicas that answered report them, do
/// not include a quorum of nodes that answered (none answered: all of
/// them). Such a shard commits nothing, membership changes included.
fn without_quorum(map: &ShardMap, statuses: &[(NodeId, ClusterStatusResponse)]) -> BTreeSet<u32> {
    let answered: BTreeSet<NodeId> = statuses.iter().map(|(n, _)| *n).collect();
    let leaders = shard_leaders(statuses);
    (0..map.shards)
        .filter(|k| {
            // The leader's view of the voters, else any replica's that has
            // one (a replica its leader has not added yet reports none).
            let view = leaders.get(k).copied().filter(|s| !s.voters.is_empty()).or_else(|| {
                statuses
                    .iter()
                    .flat_map(|(_, s)| s.shard_status.iter())
                    .find(|s| s.shard == *k && !s.voters.is_empty())
            });
            let Some(view) = view else { return true };
            let live = view.voters.iter().filter(|v| answered.contains(v)).count();
            live * 2 <= view.voters.len()
        })
        .collect()
}

/// Shards whose membership, as their leader reports it, is not yet the
/// map's replicas (a change under way), or whose leader did not answer.
fn busy_shards(map: &ShardMap, statuses: &[(NodeId, ClusterStatusResponse)]) -> BTreeSet<u32> {
    let settled: BTreeSet<u32> = shard_leaders(statuses)
        .into_values()
        .filter(|s| {
            let Some(wanted) = map.replicas.get(s.shard as usize) else { return false };
            let wanted: BTreeSet<NodeId> = wanted.iter().copied().collect();
            let voters: BTreeSet<NodeId> = s.voters.iter().copied().collect();
            s.learners.is_empty() && voters == wanted
        })
        .map(|s| s.shard)
        .collect();
    (0..map.shards).filter(|s| !settled.contains(s)).collect()
}

/// A node address in a request: a URL of at most [`MAX_ADDR_BYTES`].
fn check_addr(field: &str, addr: &str, example: &str) -> Result<()> {
    if addr.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if addr.len() > MAX_ADDR_BYTES {
        return Err(Error::invalid(
            field,
            format!("{} bytes is over the limit of {MAX_ADDR_BYTES}", addr.len()),
        ));
    }
    if let Err(e) = portrait_proto::addr::http_scheme(addr) {
        return Err(Error::invalid(field, format!("{e}; e.g. {example}")));
    }
    if let Err(e) = tonic::transport::Endpoint::from_shared(addr.to_string()) {
        return Err(Error::invalid(field, format!("not a valid URL ({e}); e.g. {example}")));
    }
    Ok(())
}

/// AddNode of node `id`, whose id a removal retired.
fn retired(id: NodeId) -> Error {
    Error::FailedPrecondition(format!("node_id: {}", portrait_core::meta::retired(id)))
}

/// Removing node `id` is refused because it cannot be marked draining.
fn draining_refused(id: NodeId, reason: String) -> Error {
    Error::FailedPrecondition(format!(
        "node {id} is marked draining before it is removed, and that is refused now: {reason}"
    ))
}

fn not_created() -> Error {
    Error::Unavailable("the cluster's map is not created yet (is the first node bootstrapped?)".into())
}

fn in_meta(e: Error) -> Error {
    e.in_shard(GroupId::META)
}

/// A node's status, asked on its peer port (with TLS, of `node` only when
/// given: see [`crate::tls::peer_endpoint`]).
pub(super) async fn peer_status(
    node: Option<NodeId>,
    addr: &str,
) -> std::result::Result<ClusterStatusResponse, String> {
    let endpoint = crate::tls::peer_endpoint(addr, node)
        .map_err(|e| e.to_string())?
        .connect_timeout(STATUS_TIMEOUT)
        .timeout(STATUS_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let reply = RaftClient::new(channel).status(ClusterStatusRequest {}).await;
    reply.map(|r| r.into_inner()).map_err(|s| s.message().to_string())
}

/// How often a node asks the meta group's leader whether it is still a
/// member (the first time shortly after it starts). It acts on two
/// answers in a row that say it is not: an AddNode under way, or an answer
/// from a leader about to be deposed, is over by the second.
const REMOVAL_CHECK_EVERY: Duration = Duration::from_secs(15);
const REMOVAL_CHECK_FIRST: Duration = Duration::from_secs(2);

impl Node {
    /// Resolves when the meta group's leader says this node is not a
    /// member, naming it: the node was removed while it was down or cut off
    /// (its stored map still places shards on it, so it would serve their
    /// frozen data to LOCAL reads), or the cluster at its peers' addresses
    /// was created anew. The daemon shuts down on it. Only a node that has
    /// joined a cluster with other nodes asks, and only the meta leader's
    /// answer counts (its membership is the newest).
    pub async fn removed_from_cluster(&self) -> String {
        let mut wait = REMOVAL_CHECK_FIRST;
        let mut suspected = false;
        loop {
            tokio::time::sleep(wait).await;
            wait = REMOVAL_CHECK_EVERY;
            match self.removal_check().await {
                Some(reason) if suspected => return reason,
                Some(reason) => {
                    tracing::warn!(%reason, "asking again in {} s before shutting down", wait.as_secs());
                    suspected = true;
                }
                None => suspected = false,
            }
        }
    }

    async fn removal_check(&self) -> Option<String> {
        if !self.is_initialized().await {
            return None;
        }
        let map = self.cluster().map.clone()?;
        // The meta leader this node knows first, then the others in order.
        let known = self.meta.raft.metrics().borrow().current_leader;
        let mut peers: Vec<(NodeId, String)> = map
            .nodes
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, n)| (*id, n.peer_addr.clone()))
            .collect();
        peers.sort_by_key(|(id, _)| (Some(*id) != known, *id));
        let term = self.meta.raft.metrics().borrow().current_term;
        for (id, addr) in peers {
            let Ok(status) = peer_status(Some(id), &addr).await else { continue };
            if status.cluster_id != 0 && map.cluster != 0 && status.cluster_id != map.cluster {
                return Some(format!(
                    "node {} is not a member of the cluster: node {id} at its peer address is in another \
                     cluster ({:016x}, not {:016x}: the cluster was created anew); this data dir is obsolete. \
                     To add the machine again, start it on an empty data dir with --join (or AddNode) under \
                     a new id",
                    self.id, status.cluster_id, map.cluster
                ));
            }
            // Only a leader's own word, in a term at least as new as this
            // node's vote (an old leader restarted, or cut off, may still
            // call itself leader with an older membership).
            if status.node_id != id || status.meta_leader_id != id || status.meta_term < term {
                continue;
            }
            if status.members.iter().any(|m| m.node_id == self.id) {
                return None;
            }
            let members: Vec<u64> = status.members.iter().map(|m| m.node_id).collect();
            return Some(format!(
                "node {} is not a member of the cluster: the meta group's leader, node {id}, has members \
                 {members:?} (it was removed while it was down or cut off, or the cluster was created anew); \
                 this data dir is obsolete. To add the machine again, start it on an empty data dir with \
                 --join (or AddNode) under a new id",
                self.id
            ));
        }
        None
    }
}

/// Asks the node at peer address `addr` to transfer a shard's leadership.
async fn peer_balance_leader(
    node: NodeId,
    addr: &str,
    request: BalanceLeaderRequest,
) -> std::result::Result<(), String> {
    let endpoint = crate::tls::peer_endpoint(addr, Some(node))
        .map_err(|e| e.to_string())?
        .connect_timeout(STATUS_TIMEOUT)
        .timeout(LEADER_TRANSFER_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    RaftClient::new(channel).balance_leader(request).await.map(|_| ()).map_err(|s| s.message().to_string())
}

/// Adds `id` to one group (a no-op where it is already what is asked): a
/// learner that catches up, then (unless `learner_only`) a voter. Returns
/// the group's last membership log index. Each change is proposed under a
/// pass of the group's gate and must commit within `commit_within` (the
/// write timeout: a leadership transfer waits for the passes, and a group
/// without a quorum must not hold it for the whole call); the wait for the
/// learner to catch up (up to `within`) holds none: a node that cannot be
/// reached never catches up.
pub(super) async fn add_to_group(
    replica: &Replica,
    id: NodeId,
    addr: &str,
    learner_only: bool,
    commit_within: Duration,
    within: Duration,
) -> Result<u64> {
    let raft = &replica.raft;
    let added = {
        let _pass = replica.gate.pass(commit_within).await?;
        let add = raft.add_learner(id, openraft::BasicNode::new(addr), false);
        tokio::time::timeout(commit_within, add)
            .await
            .map_err(|_| uncommitted(commit_within))?
            .map_err(client_write_error)?
    };
    let target = added.log_id.index;
    let matched = |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>| {
        m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index)
    };
    // Removed meanwhile (a RemoveNode while it could not be reached): no
    // use waiting for it.
    let gone = |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>| {
        m.membership_config.log_id().is_some_and(|l| l.index > target)
            && m.membership_config.membership().get_node(&id).is_none()
    };
    let caught_up = raft
        .wait(Some(within))
        .metrics(
            |m| m.id == id || matched(m).is_some_and(|i| i >= target) || gone(m),
            "the learner caught up",
        )
        .await;
    if caught_up.as_ref().is_ok_and(gone) {
        return Err(Error::FailedPrecondition(format!(
            "node {id} was removed from the group while it caught up with the log"
        )));
    }
    caught_up.map_err(|_| {
        Error::Unavailable(format!(
            "node {id} did not catch up with the log within {} s (is it reachable at {addr}?); it stays a \
                 learner: call again once it is up",
            within.as_secs()
        ))
    })?;
    if learner_only {
        return Ok(target);
    }
    promote_in_group(replica, id, None, commit_within, within).await
}

/// Makes member `id` of one group a voter (a no-op where it is one), unless
/// the group already has `max_voters` voters: then it stays a learner.
/// Returns the group's last membership log index. Another membership
/// change under way (the meta leader's own voter upkeep may promote the
/// same node) is waited out, within `within`, and the count read again;
/// each change must commit within `commit_within`.
pub(super) async fn promote_in_group(
    replica: &Replica,
    id: NodeId,
    max_voters: Option<usize>,
    commit_within: Duration,
    within: Duration,
) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let m = replica.raft.metrics().borrow().clone();
        let config = &m.membership_config;
        let uniform = config.membership().get_joint_config().len() == 1;
        let voter = config.membership().voter_ids().any(|v| v == id);
        let full = max_voters.is_some_and(|max| config.membership().voter_ids().count() >= max);
        if uniform && (voter || full) {
            return Ok(config.log_id().map_or(0, |l| l.index));
        }
        let voters = openraft::ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        if let Some(index) = change_membership_once(replica, voters, commit_within, deadline).await? {
            return Ok(index);
        }
    }
}

/// Proposes one membership change under a pass of the group's gate: its
/// log index, or `None` (after a pause) when another change is still in
/// progress and `deadline` has not passed, so the caller reads the
/// membership again and retries.
async fn change_membership_once(
    replica: &Replica,
    change: openraft::ChangeMembers<NodeId, openraft::BasicNode>,
    within: Duration,
    deadline: tokio::time::Instant,
) -> Result<Option<u64>> {
    let result = {
        let _pass = replica.gate.pass(within).await?;
        let change = replica.raft.change_membership(change, false);
        tokio::time::timeout(within, change).await.map_err(|_| uncommitted(within))?
    };
    match result {
        Ok(resp) => Ok(Some(resp.log_id.index)),
        Err(e) if change_in_progress(&e) && tokio::time::Instant::now() < deadline => {
            tokio::time::sleep(MEMBERSHIP_RETRY).await;
            Ok(None)
        }
        Err(e) => Err(client_write_error(e)),
    }
}

/// A membership change not committed within `within` (the group has no
/// quorum?): it may still commit, so the caller is told to call again.
fn uncommitted(within: Duration) -> Error {
    Error::Unavailable(format!(
        "the membership change was not committed within {} ms (no quorum reachable?); {OUTCOME_UNKNOWN}: call \
         again",
        within.as_millis()
    ))
}

/// How soon a membership change refused because another is under way is
/// tried again.
const MEMBERSHIP_RETRY: Duration = Duration::from_millis(100);

/// Whether a membership change was refused because another one has not
/// committed yet.
fn change_in_progress(
    e: &openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, openraft::BasicNode>>,
) -> bool {
    matches!(
        e,
        openraft::error::RaftError::APIError(openraft::error::ClientWriteError::ChangeMembershipError(
            openraft::error::ChangeMembershipError::InProgress(_)
        ))
    )
}

/// FAILED_PRECONDITION unless the `voters` other than `id` have a quorum
/// among the nodes that are `alive` (nothing to check if `id` does not
/// vote).
fn quorum_without(voters: &[NodeId], id: NodeId, alive: impl Fn(NodeId) -> bool) -> Result<()> {
    if !voters.contains(&id) {
        return Ok(());
    }
    let left: Vec<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
    let answering: Vec<NodeId> = left.iter().copied().filter(|v| alive(*v)).collect();
    if answering.len() * 2 <= left.len() {
        return Err(Error::FailedPrecondition(format!(
            "removing node {id} would leave voters {left:?} of which only {answering:?} answer: no quorum \
             could commit the change; bring a node back first"
        )));
    }
    Ok(())
}

/// Removes `id` from one group where it is a member. Refused when the
/// voters left would not have a quorum among the nodes that are `alive`:
/// the change itself could never commit, and the group would take no
/// other change until a node came back.
pub(super) async fn remove_from_group(
    replica: &Replica,
    id: NodeId,
    within: Duration,
    alive: impl Fn(NodeId) -> bool,
) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        // Read again each try: the meta leader's voter upkeep may have
        // turned a draining voter into a learner meanwhile.
        let m = replica.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let is_voter = membership.voter_ids().any(|v| v == id);
        if !membership.nodes().any(|(n, _)| *n == id) {
            return Ok(m.membership_config.log_id().map_or(0, |l| l.index));
        }
        quorum_without(&membership.voter_ids().collect::<Vec<_>>(), id, &alive)?;
        let set = BTreeSet::from([id]);
        let change = match is_voter {
            true => openraft::ChangeMembers::RemoveVoters(set),
            false => openraft::ChangeMembers::RemoveNodes(set),
        };
        if let Some(index) = change_membership_once(replica, change, within, deadline).await? {
            return Ok(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading(node: NodeId, shard: u32, voters: &[NodeId]) -> (NodeId, ClusterStatusResponse) {
        let status =
            ShardStatus { shard, role: "Leader".into(), voters: voters.to_vec(), ..Default::default() };
        (node, ClusterStatusResponse { node_id: node, shard_status: vec![status], ..Default::default() })
    }

    fn learning(
        node: NodeId,
        shard: u32,
        voters: &[NodeId],
        learners: &[NodeId],
    ) -> (NodeId, ClusterStatusResponse) {
        let (n, mut status) = leading(node, shard, voters);
        status.shard_status[0].learners = learners.to_vec();
        (n, status)
    }

    /// A map of `shards` shards (RF 3) over nodes 1..=`nodes`.
    fn map_of(shards: u32, nodes: NodeId) -> ShardMap {
        let mut map = ShardMap::create(shards, 3, 1, "http://n1", "http://n1:8700").unwrap();
        for n in 2..=nodes {
            let change = MapChange::AddNode {
                node: n,
                addr: format!("http://n{n}"),
                peer_addr: format!("http://n{n}:8700"),
                incarnation: 0,
            };
            map.apply(&change).unwrap();
        }
        map
    }

    #[test]
    fn a_removal_needs_a_quorum_of_the_voters_left_that_answer() {
        let alive = |ids: &'static [NodeId]| move |n: NodeId| ids.contains(&n);
        quorum_without(&[1, 2, 3], 3, alive(&[1, 2])).unwrap();
        let e = quorum_without(&[1, 2, 3], 3, alive(&[1])).unwrap_err().to_string();
        assert!(e.starts_with("removing node 3 would leave voters [1, 2] of which only [1] answer"), "{e}");
        quorum_without(&[1, 2, 3, 4, 5], 5, alive(&[1, 2, 3])).unwrap();
        quorum_without(&[1, 2, 3, 4, 5], 5, alive(&[1, 2])).unwrap_err();
        quorum_without(&[1, 2, 3], 4, alive(&[])).unwrap();
    }

    #[test]
    fn a_shard_without_a_leader_is_busy_but_is_no_move_under_way() {
        let mut map = map_of(4, 3);
        for shard in 0..4 {
            map.replicas[shard] = vec![1, 2, 3];
        }
        // Shard 0 settled, shard 1 moving (a voter still to go), shards 2
        // and 3 with no leader answering.
        let statuses = [leading(1, 0, &[1, 2, 3]), leading(2, 1, &[1, 2, 3, 4])];
        assert_eq!(busy_shards(&map, &statuses), BTreeSet::from([1, 2, 3]));
        assert_eq!(moving_shards(&map, &statuses, &BTreeSet::new()), 1);
        assert_eq!(moving_shards(&map, &statuses, &BTreeSet::from([1])), 0);
    }

    #[test]
    fn a_move_waiting_on_a_node_that_does_not_answer_takes_no_room_from_a_drain() {
        // Nodes 4 and 5 died together; node 4 is drained. Shard 0 was
        // moved to node 5 before anyone knew it was dead (its learner never
        // catches up); shard 1 moves to node 2, which answers.
        let mut map = map_of(3, 5);
        map.replicas = vec![vec![1, 2, 5], vec![1, 3, 2], vec![1, 3, 4]];
        map.apply(&MapChange::Drain { node: 4 }).unwrap();
        let statuses =
            [learning(1, 0, &[1, 2, 3], &[5]), learning(1, 1, &[1, 3, 4], &[2]), leading(1, 2, &[1, 3, 4])];
        let busy = busy_shards(&map, &statuses);
        assert_eq!(busy, BTreeSet::from([0, 1]), "shard 2's drain is not planned yet");
        let silent = BTreeSet::from([4, 5]);
        assert_eq!(waiting_on(&map, &statuses, &busy, &silent), BTreeSet::from([0]));
        // Before, shard 0 held one of the (here) two slots for good, shard 1
        // the other, and the drain of node 4 stopped with shard 2 on it.
        assert_eq!(moving_shards(&map, &statuses, &BTreeSet::new()), 2);
        let waiting = waiting_on(&map, &statuses, &busy, &silent);
        assert_eq!(moving_shards(&map, &statuses, &waiting), 1, "shard 1 only");
        // Shard 2's replica on node 4 goes to a node that answers (node 5
        // holds the fewest replicas, but does not answer).
        let plan = map.plan_drain(&BTreeSet::new(), &silent, 1);
        assert_eq!(plan, [MapChange::MoveReplica { shard: 2, from: 4, to: 2 }]);
        // Once node 5 answers again, its move is under way like any other.
        assert!(waiting_on(&map, &statuses, &busy, &BTreeSet::from([4])).is_empty());
    }

    #[test]
    fn shards_without_a_quorum_of_answering_voters_are_found_whatever_their_leader_claims() {
        let map = map_of(4, 5);
        // Only nodes 1 and 4 answer. Shard 0: its leader lost nodes 2 and
        // 3 (it still calls itself leader). Shard 1: 1 and 4 of 1, 4, 5.
        // Shard 2: only a follower answers, its voters 2, 3, 4. Shard 3:
        // nobody answers for it.
        let mut follower = leading(4, 2, &[2, 3, 4]);
        follower.1.shard_status[0].role = "Follower".into();
        let mut one = leading(1, 0, &[1, 2, 3]);
        one.1.shard_status.push(leading(1, 1, &[1, 4, 5]).1.shard_status.remove(0));
        let statuses = [one, follower];
        assert_eq!(without_quorum(&map, &statuses), BTreeSet::from([0, 2, 3]));
        // A replica not yet added reports no voters: it says nothing.
        let mut new = leading(4, 1, &[]);
        new.1.shard_status[0].role = "Follower".into();
        let mut two = leading(2, 1, &[2, 4, 5]);
        two.1.shard_status[0].role = "Follower".into();
        assert_eq!(without_quorum(&map, &[new.clone(), two]), BTreeSet::from([0, 2, 3]));
        assert!(without_quorum(&map, &[new]).contains(&1));
    }

    #[test]
    fn a_move_to_a_node_that_died_catching_up_is_moved_on_once_that_node_drains() {
        let mut map = map_of(3, 5);
        // Shard 0 moved from node 1 to node 4, which died as a learner;
        // shard 1 moves its replica off node 4 (still a voter there);
        // shard 2 is settled.
        map.replicas = vec![vec![4, 2, 3], vec![1, 2, 5], vec![1, 2, 3]];
        map.apply(&MapChange::Drain { node: 4 }).unwrap();
        let statuses =
            [learning(2, 0, &[1, 2, 3], &[4]), learning(1, 1, &[1, 2, 4], &[5]), leading(1, 2, &[1, 2, 3])];
        let busy = busy_shards(&map, &statuses);
        assert_eq!(busy, BTreeSet::from([0, 1]));
        let stalled = stalled_on_draining(&map, &statuses, &busy);
        assert_eq!(stalled, BTreeSet::from([0]), "node 4 votes in shard 1: that move is under way");
        let plan = map.plan_drain(&(&busy - &stalled), &BTreeSet::new(), 1);
        assert_eq!(plan, [MapChange::MoveReplica { shard: 0, from: 4, to: 5 }]);
        // Once that move is planned (node 5 takes shard 0), the shard is
        // an ordinary move under way again.
        map.apply(&plan[0]).unwrap();
        assert!(stalled_on_draining(&map, &statuses, &busy_shards(&map, &statuses)).is_empty());
        // Without a drain (node 4 merely slow), nothing is stalled.
        let mut slow = map.clone();
        slow.replicas[0] = vec![4, 2, 3];
        slow.draining.clear();
        assert!(stalled_on_draining(&slow, &statuses, &busy_shards(&slow, &statuses)).is_empty());
    }

    #[test]
    fn a_node_is_removed_only_once_every_shard_leader_reports_it_gone() {
        // Node 3's replicas of shards 0 and 1 moved to node 4 in the map.
        let settled = [leading(1, 0, &[1, 2, 4]), leading(2, 1, &[1, 2, 4]), leading(1, 2, &[1, 2, 4])];
        check_left_every_group(3, 3, &settled).unwrap();
        // Shard 1 still has node 3 as a voter (node 4 is catching up), or
        // as a learner being removed.
        let voting = [leading(1, 0, &[1, 2, 4]), learning(2, 1, &[1, 2, 3], &[4]), leading(1, 2, &[1, 2, 4])];
        let e = check_left_every_group(3, 3, &voting).unwrap_err();
        assert!(
            matches!(&e, Error::FailedPrecondition(m)
            if m.starts_with("node 3 is still in the raft membership of shards [1]")),
            "{e}"
        );
        let learner =
            [leading(1, 0, &[1, 2, 4]), learning(2, 1, &[1, 2, 4], &[3]), leading(1, 2, &[1, 2, 4])];
        check_left_every_group(3, 3, &learner).unwrap_err();
        // A follower's view does not count; a shard with no leader
        // answering cannot be told.
        let (n, mut follower) = leading(2, 1, &[1, 2, 3]);
        follower.shard_status[0].role = "Follower".into();
        let blind = [leading(1, 0, &[1, 2, 4]), (n, follower), leading(1, 2, &[1, 2, 4])];
        let e = check_left_every_group(3, 3, &blind).unwrap_err();
        assert!(
            matches!(&e, Error::Unavailable(m) if m.starts_with("shards [1] have no leader that answers")),
            "{e}"
        );
    }

    #[test]
    fn a_node_is_taken_for_dead_only_if_no_other_node_hears_it() {
        use portrait_proto::v1::{ClockStatus, PeerClock};
        let hearing = |me: NodeId, heard: &[(NodeId, u64)]| {
            let peers =
                heard.iter().map(|&(node_id, age_ms)| PeerClock { node_id, age_ms, ..Default::default() });
            let clock = ClockStatus { peers: peers.collect(), ..Default::default() };
            (me, ClusterStatusResponse { node_id: me, clock: Some(clock), ..Default::default() })
        };
        let within = Duration::from_secs(10);
        // Node 1 (the meta leader) has not heard node 4; nodes 2 and 3 have
        // not either (or long ago): dead.
        let silent = [hearing(1, &[]), hearing(2, &[(4, 60_000)]), hearing(3, &[(1, 5)])];
        assert_eq!(heard_elsewhere(4, 1, &silent, within), None);
        // Node 3 heard it lately: a partial partition, not a dead node.
        let heard = [hearing(1, &[]), hearing(2, &[(4, 60_000)]), hearing(3, &[(4, 900)])];
        assert_eq!(heard_elsewhere(4, 1, &heard, within), Some(3));
        // It answers itself.
        assert_eq!(heard_elsewhere(4, 1, &[hearing(4, &[])], within), Some(4));
        // The leader's own view does not count twice.
        assert_eq!(heard_elsewhere(4, 1, &[hearing(1, &[(4, 1)])], within), None);
    }
}
