//! Following the map: one task per node that makes what the node runs
//! match the meta group's shard map, a step at a time, every
//! [`EVERY`] and whenever the map changes.
//!
//! - **Hosting.** A shard the map places on this node gets a replica (an
//!   empty one that its leader fills by snapshot and log). A shard whose
//!   only replica the map puts here and that was never initialized is
//!   created (a new cluster's shards).
//! - **As a shard's leader**: its raft membership is brought to the map's
//!   replicas: a missing node is added as a learner, promoted to voter
//!   once it has replicated past the leader's purged log (a snapshot still
//!   on its way does not count), is within [`PROMOTE_LAG`] entries of
//!   the log's end and was heard by the liveness probe lately, and only
//!   when every replica the map wants votes, and a quorum of them is live
//!   and caught up, are the others removed (the group never drops below
//!   the map's replicas, nor to a quorum that needs a dead node; a leader
//!   that is to go hands its leadership to one of them first). The
//!   shard's schema is brought to the meta group's version through the
//!   shard's own log.
//! - **As the meta group's leader**: placement (`ShardMap::plan_additions`)
//!   fills shards that are short of the replication factor, and nodes of
//!   the map that only learn the meta group are promoted to its voters
//!   while it has fewer than five.
//! - **Removed replicas**: a shard the map no longer places here is
//!   dropped once its committed membership no longer has this node, or the
//!   shard's leader (or, when none is known, a node the map places it on)
//!   reports a membership without it: its raft stops and its log and state
//!   are deleted. Never on a timer: a replica the map left is still a
//!   voter until its successor has caught up.
//!
//! Each change is one raft membership change, bounded by the write
//! timeout; a failure is logged and retried on the next pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use portrait_core::meta::MetaState;
use portrait_core::shard::ShardMap;
use tokio::sync::watch;

use super::meta::{MAX_META_VOTERS, META_QUORUM_HEARD_WITHIN};
use super::Node;
use crate::error::{Error, Result};
use crate::raft::client_write_error;
use crate::raft::replica::Replica;
use crate::types::{Command, GroupId, NodeId};

/// How often the node compares itself with the map when nothing changes.
const EVERY: Duration = Duration::from_millis(250);

/// The longest a write waits for its shard to take the cluster's apply
/// rules version ([`Node::catch_up_rules`]).
const CATCH_UP_RULES: Duration = Duration::from_secs(1);
/// A learner within this many entries of its leader's log is promoted.
const PROMOTE_LAG: u64 = 1_000;

/// A leader that leaves its shard hands over to a wanted voter whose node
/// answered the liveness probe this recently.
const SUCCESSOR_HEARD_WITHIN: Duration = Duration::from_secs(3);

/// See [`Node::hosting_held`].
#[cfg(feature = "fault-injection")]
pub const HOLD_HOSTING_MARKER: &str = "fault-hold-hosting";

/// Runs until `stop` turns true (or the node is gone).
pub(super) async fn run(node: Weak<Node>, mut stop: watch::Receiver<bool>) {
    let Some(mut changes) = node.upgrade().map(|n| n.meta.sm.watch_cluster()) else { return };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = changes.changed() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(node) = node.upgrade() else { return };
        tokio::select! {
            _ = node.follow_map() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

impl Node {
    /// One pass (see the module docs).
    async fn follow_map(&self) {
        let cluster = self.cluster();
        let Some(map) = cluster.map.as_ref() else { return };
        if self.hosting_held() {
            tracing::debug!("hosting held by fault injection");
        } else if let Err(e) = self.host(map).await {
            tracing::warn!(error = %e, "opening the replicas the map places here");
        }
        if self.meta.is_leader() {
            if let Err(e) = self.place().await {
                tracing::debug!(error = %e, "placement");
            }
            if let Err(e) = self.keep_meta_voters(map).await {
                tracing::debug!(error = %e, "meta group voters");
            }
        }
        let cluster = &cluster;
        let shards: Vec<Arc<Replica>> =
            self.registry.all().into_iter().filter(|r| r.gid != GroupId::META).collect();
        let leading = shards.iter().filter(|r| r.is_leader()).map(|r| async move {
            if let Some(wanted) = map.replicas.get(r.gid.0 as usize) {
                if let Err(e) = self.follow_replicas(r, wanted, map).await {
                    tracing::debug!(group = %r.gid, error = %e, "bringing the membership to the map");
                }
            }
            // The rules first: a schema waits for the shard's version.
            self.sync_rules(r, cluster).await;
            self.sync_schema(r, cluster).await;
        });
        futures::future::join_all(leading).await;
        let hosted: BTreeSet<u32> = map.hosted_by(self.id).into_iter().collect();
        let mut drop = Vec::new();
        for replica in shards.into_iter().filter(|r| !hosted.contains(&r.gid.0)) {
            if replica.is_leader() {
                continue;
            }
            // Never on a timer: while its successor catches up, a replica
            // the map left is still a voter its shard's quorum may need.
            if removed(&replica, self.id) || self.leader_left_me(&replica, map).await {
                drop.push(replica);
            }
        }
        for replica in drop {
            // The map as it is now: asking the leaders took time, and a map
            // that places the shard here again keeps its replica.
            let placed_again = self.cluster().map.as_ref().is_some_and(|m| {
                m.replicas.get(replica.gid.0 as usize).is_some_and(|r| r.contains(&self.id))
            });
            if !placed_again {
                self.drop_replica(replica).await;
            }
        }
        if self.drops_pending.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.finish_drops();
        }
    }

    /// Deletes the state left on disk by replicas whose raft log is gone (a
    /// drop whose state deletion was refused, say while a backup export
    /// held the replica, or a crash between its two deletions): nothing
    /// else would, since a node opens only the groups its raft log has.
    /// A state still in use is tried again at the next pass.
    fn finish_drops(&self) {
        // Logs a drop could not delete yet, first: their state is then
        // left without a log, and deleted below.
        let log_drops: Vec<GroupId> =
            self.log_drops.lock().expect("log_drops lock").iter().copied().collect();
        for gid in log_drops {
            let placed = self
                .cluster()
                .map
                .as_ref()
                .is_some_and(|m| m.replicas.get(gid.0 as usize).is_some_and(|r| r.contains(&self.id)));
            if placed || self.registry.get(gid).is_some() {
                self.log_drops.lock().expect("log_drops lock").remove(&gid);
                continue;
            }
            match self.log_engine.drop_group(gid) {
                Ok(()) => {
                    self.log_drops.lock().expect("log_drops lock").remove(&gid);
                    tracing::info!(group = %gid, "deleted the raft log a dropped replica left");
                }
                Err(e) => {
                    tracing::debug!(group = %gid, error = %e, "the raft log a dropped replica left: not yet");
                    self.drops_pending.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        }
        let leftover = || -> anyhow::Result<Vec<GroupId>> {
            let logged: BTreeSet<GroupId> = self.log_engine.groups()?.into_iter().collect();
            let states = self.state_db.groups_with_state()?;
            Ok(states
                .into_iter()
                .filter(|g| *g != GroupId::META && !logged.contains(g) && self.registry.get(*g).is_none())
                .collect())
        };
        let gids = match leftover() {
            Ok(gids) => gids,
            Err(e) => {
                tracing::warn!(error = %e, "looking for the state of dropped replicas");
                self.drops_pending.store(true, std::sync::atomic::Ordering::Release);
                return;
            }
        };
        for gid in gids {
            match self.state_db.drop_group(gid) {
                Ok(()) => {
                    let _ = std::fs::remove_dir_all(self.data_dir.join("snapshots").join(gid.dir_name()));
                    tracing::info!(group = %gid, "deleted the state a dropped replica left");
                }
                Err(e) => {
                    tracing::debug!(group = %gid, error = %e, "the state a dropped replica left: not yet");
                    self.drops_pending.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        }
    }

    /// Opens a replica of every shard the map places here. While this node
    /// is the map's only node (the cluster is being created), a shard
    /// placed here alone that was never initialized is created. Never once
    /// another node is in the map: a shard placed here alone then came by a
    /// move (replication 1), and its data is on the node it moves from,
    /// whose leader adds this replica to the shard's group. A shard that
    /// fails to open does not keep the others from opening; the error
    /// names every shard that failed (tried again on the next pass).
    pub(super) async fn host(&self, map: &ShardMap) -> anyhow::Result<()> {
        let _one = self.hosting.lock().await;
        // The map as it is now: the one given may have changed while this
        // call waited for the lock.
        let now = self.cluster().map.clone();
        let map = now.as_ref().unwrap_or(map);
        let creating = map.nodes.len() == 1 && map.nodes.contains_key(&self.id);
        let mut failed = Vec::new();
        for shard in map.hosted_by(self.id) {
            let alone = creating && map.replicas[shard as usize] == [self.id];
            if let Err(e) = self.host_one(GroupId(shard), alone).await {
                failed.push(format!("shard {shard}: {e}"));
            }
        }
        match failed.is_empty() {
            true => Ok(()),
            false => Err(anyhow::anyhow!("{} replicas did not open: {}", failed.len(), failed.join("; "))),
        }
    }

    /// Fault injection (the `fault-injection` build only): while a file
    /// [`HOLD_HOSTING_MARKER`] is in the data dir, neither the bootstrap
    /// nor the placement pass opens replicas, as when a node was killed
    /// between creating the map and creating its shards and its first
    /// placement pass has not run yet. `AddNode` still finishes the
    /// creation.
    pub(super) fn hosting_held(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.fault_injection && self.data_dir.join(HOLD_HOSTING_MARKER).exists() {
            return true;
        }
        false
    }

    /// Opens this node's replica of `gid` (unless open) and, when this
    /// node is to create it `alone`, initializes it if it never was.
    async fn host_one(&self, gid: GroupId, alone: bool) -> anyhow::Result<()> {
        let replica = match self.registry.get(gid) {
            Some(r) => r,
            None => {
                let r = Arc::new(Replica::open(gid, &self.shared()).await?);
                self.registry.insert(r.clone());
                tracing::info!(group = %gid, "hosting a replica placed on this node");
                r
            }
        };
        if alone && !replica.raft.is_initialized().await? {
            let members = BTreeMap::from([(self.id, BasicNode::new(&self.peer_advertise))]);
            replica.raft.initialize(members).await?;
        }
        Ok(())
    }

    /// One step of bringing a shard's membership to the map's `wanted`
    /// replicas (this node leads the shard).
    async fn follow_replicas(&self, replica: &Replica, wanted: &[NodeId], map: &ShardMap) -> Result<()> {
        let m = replica.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() > 1 {
            return self.finish_joint(replica, &m, false).await;
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members: BTreeSet<NodeId> = membership.nodes().map(|(n, _)| *n).collect();
        let wanted: BTreeSet<NodeId> = wanted.iter().copied().collect();
        let raft = &replica.raft;
        if let Some(&new) = wanted.difference(&members).next() {
            let Some(entry) = map.nodes.get(&new) else { return Ok(()) };
            let _pass = replica.gate.pass(self.write_timeout).await?;
            let add = raft.add_learner(new, BasicNode::new(&entry.peer_addr), false);
            self.bounded(add).await?.map_err(client_write_error)?;
            tracing::info!(group = %replica.gid, node = new, "added a learner placed by the map");
            return Ok(());
        }
        // Heard by this node's liveness probe lately (it probes every member
        // of the groups it hosts): a caught-up learner that has died since
        // is not promoted, nor counted on to take over from old voters.
        let now = std::time::Instant::now();
        let heard = |n: &&NodeId| self.liveness.silent_for(**n, now) < SUCCESSOR_HEARD_WITHIN;
        let ready: BTreeSet<NodeId> = wanted
            .iter()
            .filter(|n| !voters.contains(n) && caught_up(&m, **n) && heard(n))
            .copied()
            .collect();
        if !ready.is_empty() {
            let _pass = replica.gate.pass(self.write_timeout).await?;
            let change = raft.change_membership(ChangeMembers::AddVoterIds(ready.clone()), false);
            self.bounded(change).await?.map_err(client_write_error)?;
            tracing::info!(group = %replica.gid, nodes = ?ready, "promoted caught-up learners to voters");
            return Ok(());
        }
        if !wanted.is_subset(&voters) {
            return Ok(()); // learners still catching up
        }
        let extra: BTreeSet<NodeId> = members.difference(&wanted).copied().collect();
        if extra.is_empty() {
            return Ok(());
        }
        if extra.contains(&self.id) {
            // Leave through a successor: one of the wanted voters leads
            // next, the first one the liveness probe hears (a successor
            // that is down would fail every pass and hold the move).
            let first = wanted.iter().next().expect("wanted is not empty");
            let target = *wanted.iter().find(heard).unwrap_or(first);
            let addr = map.nodes.get(&target).map(|n| n.peer_addr.clone()).unwrap_or_default();
            return replica.transfer.hand_over(target, &addr).await;
        }
        let (extra_voters, extra_learners): (BTreeSet<NodeId>, BTreeSet<NodeId>) =
            extra.iter().partition(|n| voters.contains(n));
        // Old voters go only while a quorum of the wanted ones is live and
        // caught up: removing them when a new voter has died since its
        // promotion would leave a configuration whose quorum needs it (with
        // 2 replicas: none left to commit anything, the removal included).
        let live = wanted.iter().filter(|n| **n == self.id || (heard(n) && caught_up(&m, **n))).count();
        if !extra_voters.is_empty() && live * 2 <= wanted.len() {
            tracing::debug!(group = %replica.gid, ?wanted, live, "old voters kept: too few wanted voters are live");
            return Ok(());
        }
        let change = match extra_voters.is_empty() {
            false => ChangeMembers::RemoveVoters(extra_voters),
            true => ChangeMembers::RemoveNodes(extra_learners),
        };
        let _pass = replica.gate.pass(self.write_timeout).await?;
        self.bounded(raft.change_membership(change, false)).await?.map_err(client_write_error)?;
        tracing::info!(group = %replica.gid, nodes = ?extra, "removed replicas the map no longer has");
        Ok(())
    }

    /// Finishes a joint configuration of `group` (this node leads it; `m`
    /// its metrics) once it is committed: its newest half becomes the
    /// configuration. openraft's `change_membership` proposes the second
    /// step itself, but a leader that changed between the two steps, or a
    /// call cut off by [`Node::bounded`], leaves the group joint, where
    /// both halves' quorums are needed, and no later change is proposed
    /// (a joint membership counts as a change under way). Not committed
    /// yet: the change is still under way, nothing to do.
    ///
    /// A leader that is not in the newest half (a leaving voter elected
    /// while the group was joint) hands the group over to one of that
    /// half instead, which finishes the change: finishing it itself would
    /// make it step down to a learner that its followers still name as
    /// leader, and quiet followers do not campaign while its node answers.
    async fn finish_joint(
        &self,
        group: &Replica,
        m: &openraft::RaftMetrics<NodeId, BasicNode>,
        retain: bool,
    ) -> Result<()> {
        let now = std::time::Instant::now();
        let heard = |n: NodeId| self.liveness.silent_for(n, now) < SUCCESSOR_HEARD_WITHIN;
        let newest = match joint_step(m, self.id, heard) {
            None => return Ok(()),
            Some(JointStep::HandOver(target)) => {
                let membership = m.membership_config.membership();
                let addr = membership.get_node(&target).map(|n| n.addr.clone()).unwrap_or_default();
                tracing::info!(group = %group.gid, target, "leaving in a joint membership: hands the group over");
                return group.transfer.hand_over(target, &addr).await;
            }
            Some(JointStep::Finish(newest)) => newest,
        };
        let _pass = group.gate.pass(self.write_timeout).await?;
        let change = group.raft.change_membership(ChangeMembers::ReplaceAllVoters(newest.clone()), retain);
        self.bounded(change).await?.map_err(client_write_error)?;
        tracing::info!(group = %group.gid, voters = ?newest, "finished a membership change left joint");
        Ok(())
    }

    /// Keeps the meta group's voters on nodes fit to hold them: nodes of
    /// the map that are not draining and have answered within
    /// `replica_dead_after` (this node leads the meta group). One step per
    /// pass: a learner that is fit, heard within `META_QUORUM_HEARD_WITHIN`
    /// and caught up (as a shard's learner is) is promoted while the group has fewer
    /// than [`MAX_META_VOTERS`] voters or to replace a voter that is not
    /// fit; then a voter that is not fit becomes a learner (it still reads
    /// the map), unless it is the last; a leader that is not fit first
    /// hands the group to a fit voter. So scaling in (drain, then remove)
    /// or losing nodes for good never leaves the meta group's quorum on
    /// nodes that are going: demoting a voter that is going never lowers
    /// the failures the group survives once it has gone. Before any of
    /// that, learners whose ids were retired (apply rules version 6) and
    /// are not in the map leave the group.
    async fn keep_meta_voters(&self, map: &ShardMap) -> Result<()> {
        let m = self.meta.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() > 1 {
            return self.finish_joint(&self.meta, &m, true).await;
        }
        // Learners whose ids are retired and not in the map: left by an
        // AddNode that raced their removal (apply rules version 6).
        let cluster = self.cluster();
        let retired: BTreeSet<NodeId> = membership
            .learner_ids()
            .filter(|n| cluster.retired.contains(n) && !map.nodes.contains_key(n))
            .collect();
        if !retired.is_empty() {
            tracing::info!(nodes = ?retired, "meta group: removing learners whose ids were retired by a removal");
            let _pass = self.meta.gate.pass(self.write_timeout).await?;
            let change = self.meta.raft.change_membership(ChangeMembers::RemoveNodes(retired), false);
            self.bounded(change).await?.map_err(client_write_error)?;
            return Ok(());
        }
        let now = std::time::Instant::now();
        // A voter not in the map yet is one AddNode is adding: fit.
        let fit = |n: &NodeId| {
            !map.draining.contains(n)
                && (*n == self.id || self.liveness.silent_for(*n, now) < self.replica_dead_after)
        };
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        // Promoted only if heard as lately as a quorum needs and caught up:
        // a new voter that is silent or behind weakens the quorum it joins.
        // One heard but still catching up is awaited (`catching_up`).
        let heard = |n: &NodeId| self.liveness.silent_for(*n, now) < META_QUORUM_HEARD_WITHIN;
        let (learners, catching_up): (BTreeSet<NodeId>, BTreeSet<NodeId>) = membership
            .learner_ids()
            .filter(|n| map.nodes.contains_key(n) && heard(n))
            .partition(|n| caught_up(&m, *n));
        let catching_up = catching_up.iter().any(fit);
        let change = match meta_voter_step(self.id, &voters, &learners, catching_up, fit) {
            MetaVoterStep::Keep => return Ok(()),
            MetaVoterStep::Promote(promote) => {
                tracing::info!(nodes = ?promote, "meta group: promoting learners to voters");
                ChangeMembers::AddVoterIds(promote)
            }
            MetaVoterStep::HandOff(first_fit) => {
                // A fit voter heard lately first (fit only says it answered
                // within `replica_dead_after`); paced like a shard's
                // handover, as this runs on every pass.
                let target =
                    voters.iter().copied().find(|v| *v != self.id && fit(v) && heard(v)).unwrap_or(first_fit);
                let addr = membership.get_node(&target).map(|n| n.addr.clone()).unwrap_or_default();
                tracing::info!(target, "meta group: handing leadership to a voter that stays");
                return self.meta.transfer.hand_over(target, &addr).await;
            }
            MetaVoterStep::Demote(unfit) => {
                tracing::info!(nodes = ?unfit, "meta group: voters draining or silent become learners");
                ChangeMembers::RemoveVoters(unfit)
            }
        };
        let _pass = self.meta.gate.pass(self.write_timeout).await?;
        // `retain`: a voter removed stays a learner.
        let change = self.meta.raft.change_membership(change, true);
        self.bounded(change).await?.map_err(client_write_error)?;
        Ok(())
    }

    /// Proposes the meta group's schema in `replica`'s shard (this node
    /// leads it) when the shard has an older one.
    async fn sync_schema(&self, replica: &Replica, cluster: &MetaState) {
        let Some(newest) = &cluster.schema else { return };
        if replica.sm.schema().version >= newest.version || replica.sm.rules() < cluster.rules() {
            return;
        }
        // Cut off from its quorum: the entry would wait in its log (the
        // next placement pass proposes it once the quorum answers).
        if let Err(e) = self.quorum_in_sight(replica) {
            return tracing::debug!(group = %replica.gid, error = %e, "not proposing the schema now");
        }
        // The meta leader checked it; a build that refuses it (a rolling
        // upgrade with a stricter check) does not propose it, and says why.
        if let Err(e) = crate::engine::check_schema(&newest.toml) {
            let mut refused = self.schema_refused.lock().expect("schema_refused lock");
            if *refused < newest.version {
                *refused = newest.version;
                tracing::error!(version = newest.version, error = %e,
                    "this build refuses the cluster's schema: not applying it to the shards this node leads");
            }
            return;
        }
        let propose = async {
            let _pass = replica.gate.pass(self.write_timeout).await?;
            let stamp_ms = replica.stamper.stamp()?;
            let command =
                Command::ApplySchema { stamp_ms, toml: newest.toml.clone(), version: newest.version };
            self.bounded(replica.raft.client_write(command)).await?.map_err(client_write_error)?;
            Ok::<_, Error>(())
        };
        if let Err(e) = propose.await {
            tracing::debug!(group = %replica.gid, version = newest.version, error = %e, "applying the schema");
        }
    }

    /// [`Node::sync_rules`] by the cluster's version now, when `replica`
    /// is behind it (a write or restore step about to be proposed): one
    /// proposal at a time (the writes waiting meanwhile find it done), and
    /// at most [`CATCH_UP_RULES`] in all, so a forwarded part still fits
    /// the forwarding node's deadline (two write timeouts and a second).
    pub(super) async fn catch_up_rules(&self, replica: &Replica) {
        if replica.sm.rules() >= self.cluster().rules() {
            return;
        }
        let catch_up = async {
            let _one = replica.rules_sync.lock().await;
            let cluster = self.cluster();
            if replica.sm.rules() < cluster.rules() {
                self.sync_rules(replica, &cluster).await;
            }
        };
        // Past it, the write is refused as behind (`retry later`).
        let _ = tokio::time::timeout(CATCH_UP_RULES.min(self.write_timeout), catch_up).await;
    }

    /// Proposes the cluster's apply rules version in `replica`'s shard
    /// (this node leads it) when the shard applies by an older one.
    async fn sync_rules(&self, replica: &Replica, cluster: &MetaState) {
        if cluster.map.is_none() || replica.sm.rules() >= cluster.rules() {
            return;
        }
        let version = cluster.rules();
        // Not reached in practice: the node's meta replica stops at a
        // version its build does not have.
        if let Err(e) = crate::rules::check(version) {
            tracing::debug!(group = %replica.gid, error = %e, "not proposing the cluster's apply rules");
            return;
        }
        if let Err(e) = self.quorum_in_sight(replica) {
            return tracing::debug!(group = %replica.gid, error = %e, "not proposing the apply rules now");
        }
        let propose = async {
            let _pass = replica.gate.pass(self.write_timeout).await?;
            let stamp_ms = replica.stamper.stamp()?;
            let command = Command::Rules { stamp_ms, version };
            self.bounded(replica.raft.client_write(command)).await?.map_err(client_write_error)?;
            Ok::<_, Error>(())
        };
        match propose.await {
            Ok(()) => {
                tracing::info!(group = %replica.gid, version, "the shard applies by a new apply rules version")
            }
            Err(e) => tracing::debug!(group = %replica.gid, version, error = %e, "proposing the apply rules"),
        }
    }

    /// Brings every shard this node leads to the meta group's schema now.
    pub(super) async fn sync_schemas(&self) {
        let cluster = self.cluster();
        let leading: Vec<_> =
            self.registry.all().into_iter().filter(|r| r.gid != GroupId::META && r.is_leader()).collect();
        futures::future::join_all(leading.iter().map(|r| self.sync_schema(r, &cluster))).await;
    }

    /// Stops a replica this node no longer hosts and deletes its log and
    /// state.
    async fn drop_replica(&self, replica: Arc<Replica>) {
        let gid = replica.gid;
        self.registry.remove(gid);
        if let Err(e) = replica.raft.shutdown().await {
            tracing::warn!(group = %gid, error = %e, "stopping a removed replica");
        }
        drop(replica);
        // The snapshot first (its meta, durably, then its archives): left
        // behind by a crash with the log and state gone, openraft would
        // take a replica placed here again for one holding it, and skip
        // the leader's older snapshot while the state is empty. Not
        // removed: the drop stops here, and the replica reopens from its
        // log at the next start (and is dropped again).
        let snapshots = crate::store::snapshot::SnapshotDir::new(&self.data_dir, gid);
        if let Err(e) = snapshots.and_then(|dir| dir.clear()) {
            tracing::warn!(group = %gid, error = %e, "dropping a removed replica: its snapshot stays");
            return;
        }
        // The log store closes as raft's tasks end, the state once its
        // state machine has applied what raft had queued for it.
        let (mut result, mut log_dropped) = (Ok(()), false);
        for _ in 0..50 {
            if !log_dropped {
                result = self.log_engine.drop_group(gid);
                log_dropped = result.is_ok();
            }
            if log_dropped {
                result = self.state_db.drop_group(gid);
                if result.is_ok() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if result.is_ok() {
            // Again: a snapshot build of the replica that outlived its raft
            // (openraft runs builds in tasks of their own) may have
            // published since. Should this fail, or the removal below be
            // undone by a power loss, the replica's next open removes it
            // (it has neither log nor state).
            let snapshots = crate::store::snapshot::SnapshotDir::new(&self.data_dir, gid);
            if let Err(e) = snapshots.and_then(|dir| dir.clear()) {
                tracing::warn!(group = %gid, error = %e, "dropping a removed replica: its snapshot stays");
            }
            let _ = std::fs::remove_dir_all(self.data_dir.join("snapshots").join(gid.dir_name()));
        }
        match result {
            Ok(()) => tracing::info!(group = %gid, "dropped a replica the map no longer places here"),
            Err(e) => {
                // Left to the next passes: its log (a task of its raft
                // still holds it), then its state.
                if !log_dropped {
                    self.log_drops.lock().expect("log_drops lock").insert(gid);
                }
                let what = if log_dropped { "its state is" } else { "its log and state are" };
                tracing::warn!(group = %gid, error = %e, "dropping a removed replica: {what} retried");
                self.drops_pending.store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// `call`, bounded by the write timeout (UNAVAILABLE past it).
    async fn bounded<T>(&self, call: impl std::future::Future<Output = T>) -> Result<T> {
        tokio::time::timeout(self.write_timeout, call)
            .await
            .map_err(|_| Error::Unavailable(format!("not done within {} ms", self.write_timeout.as_millis())))
    }
}

/// Whether `node`, as this leader's metrics `m` show it, is caught up
/// enough to vote: it holds something (a learner being sent a snapshot
/// has matched nothing yet), at least what the log no longer has (so it
/// has the snapshot), and is within [`PROMOTE_LAG`] of the log's end.
fn caught_up(m: &openraft::RaftMetrics<NodeId, BasicNode>, node: NodeId) -> bool {
    let last = m.last_log_index.unwrap_or(0);
    let purged = m.purged.map_or(0, |l| l.index);
    let matched = m.replication.as_ref().and_then(|r| r.get(&node).cloned().flatten()).map(|l| l.index);
    matched.is_some_and(|i| i >= purged && i + PROMOTE_LAG >= last)
}

/// One step of keeping the meta group's voters fit (see
/// `Node::keep_meta_voters`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum MetaVoterStep {
    Keep,
    /// Fit learners to promote: while fewer than [`MAX_META_VOTERS`] fit
    /// voters vote (a voter that is not fit leaves once replaced).
    Promote(BTreeSet<NodeId>),
    /// This leader is not fit: hand the group to this fit voter first.
    HandOff(NodeId),
    /// Voters that are not fit become learners (never all of them).
    Demote(BTreeSet<NodeId>),
}

/// The next step for the meta group led by `me`, with `voters`, and
/// `learners` ready to vote (those in the map), by `fit`; `catching_up`:
/// a fit learner is still catching up, so an unfit voter it can replace
/// is kept until it is ready (promote, then demote: never a smaller
/// group meanwhile). Pure, so its sequence can be tested: it never leaves
/// more than [`MAX_META_VOTERS`] voters once settled.
fn meta_voter_step(
    me: NodeId,
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    catching_up: bool,
    fit: impl Fn(&NodeId) -> bool,
) -> MetaVoterStep {
    let unfit: BTreeSet<NodeId> = voters.iter().filter(|v| !fit(v)).copied().collect();
    // Fit voters only: an unfit voter is replaced, not added to.
    let room = MAX_META_VOTERS.saturating_sub(voters.len() - unfit.len());
    let promote: BTreeSet<NodeId> = learners.iter().filter(|n| fit(n)).take(room).copied().collect();
    if !promote.is_empty() {
        MetaVoterStep::Promote(promote)
    } else if unfit.is_empty() || unfit.len() == voters.len() {
        MetaVoterStep::Keep
    } else if unfit.contains(&me) {
        MetaVoterStep::HandOff(*voters.iter().find(|v| fit(v)).expect("a fit voter"))
    } else if catching_up && room > 0 {
        MetaVoterStep::Keep
    } else {
        MetaVoterStep::Demote(unfit)
    }
}

impl Node {
    /// Whether the shard's leader (as this replica knows it) reports a
    /// membership without this node: a removed replica usually never hears
    /// of its removal, so it asks.
    /// A replica that restarted after its removal knows no leader: then
    /// the nodes the map places the shard on are asked.
    async fn leader_left_me(&self, replica: &Replica, map: &ShardMap) -> bool {
        // The term of the newest leader whose entries this replica applied:
        // a leader of an older term is deposed. (Not the replica's own
        // term, which a removed replica raises campaigning.)
        let (leader, term) = {
            let metrics = replica.raft.metrics();
            let m = metrics.borrow();
            (m.current_leader.filter(|&l| l != self.id), m.last_applied.map_or(0, |l| l.leader_id.term))
        };
        let placed = map.replicas.get(replica.gid.0 as usize).cloned().unwrap_or_default();
        // The leader it last knew, and the replicas the map names (that
        // leader may be gone too).
        let ask: BTreeSet<NodeId> = leader.into_iter().chain(placed).filter(|&n| n != self.id).collect();
        // All at once: a node down costs one timeout, not one per node.
        let asks = ask.into_iter().filter_map(|node| map.nodes.get(&node).map(|entry| (node, entry))).map(
            |(node, entry)| async move { super::meta::peer_status(Some(node), &entry.peer_addr).await.ok() },
        );
        let statuses = futures::future::join_all(asks).await;
        // The newest term's leader, if several claim the shard; never one
        // of an older term than the entries this replica applied (a
        // deposed leader cut off may hold a membership from before this
        // node joined).
        let led = statuses
            .iter()
            .flatten()
            .flat_map(|status| status.shard_status.iter())
            .filter(|s| s.shard == replica.gid.0 && s.role == "Leader" && s.term >= term)
            .max_by_key(|s| s.term);
        led.is_some_and(|s| left_out(s, self.id))
    }
}

/// Whether a leader's status shows a committed membership without node
/// `me`. Only a committed one: a leader (even of the newest term this
/// replica applied entries of, if it was deposed since) may hold an
/// appended change that a later leader never commits.
fn left_out(leader: &portrait_proto::v1::ShardStatus, me: NodeId) -> bool {
    leader.membership_index <= leader.applied_index
        && !leader.voters.is_empty()
        && !leader.voters.contains(&me)
        && !leader.learners.contains(&me)
}

/// Whether `replica`'s committed membership leaves node `me` out: it is
/// neither a learner nor a voter, and the membership is not joint. A
/// voter of a joint configuration's older half still counts for that
/// half's quorum until the change is finished, however long that takes
/// (its leader may fail between the two steps), so it keeps its data. A
/// removed voter often sees only the joint configuration that removes it
/// (its leader stops sending once the next one is appended): it learns of
/// its removal from the leader's status ([`Node::leader_left_me`]).
fn removed(replica: &Replica, me: NodeId) -> bool {
    left_by(&replica.raft.metrics().borrow(), me)
}

/// [`removed`] on a replica's metrics.
fn left_by(m: &openraft::RaftMetrics<NodeId, BasicNode>, me: NodeId) -> bool {
    let membership = m.membership_config.membership();
    let uniform = membership.get_joint_config().len() == 1;
    let voter = membership.voter_ids().any(|n| n == me);
    let learner = membership.learner_ids().any(|n| n == me);
    membership_applied(m) && uniform && !voter && !learner
}

/// Whether the membership in `m` is applied (so committed).
fn membership_applied(m: &openraft::RaftMetrics<NodeId, BasicNode>) -> bool {
    match (m.membership_config.log_id(), m.last_applied) {
        (Some(config), Some(applied)) => config.index <= applied.index,
        _ => false,
    }
}

/// The newest half of a joint membership that is committed (see
/// [`Node::finish_joint`]); `None` when the membership is not joint or
/// not committed yet.
fn joint_to_finish(m: &openraft::RaftMetrics<NodeId, BasicNode>) -> Option<BTreeSet<NodeId>> {
    let joint = m.membership_config.membership().get_joint_config();
    let newest = joint.last().filter(|c| joint.len() > 1 && !c.is_empty())?;
    membership_applied(m).then(|| newest.clone())
}

/// What the leader `me` of a group does with a committed joint membership.
#[derive(Debug, PartialEq, Eq)]
enum JointStep {
    /// Makes its newest half the configuration.
    Finish(BTreeSet<NodeId>),
    /// Hands the group over to this voter of the newest half, as `me` is
    /// not in it: the first one `heard`, else the first one.
    HandOver(NodeId),
}

fn joint_step(
    m: &openraft::RaftMetrics<NodeId, BasicNode>,
    me: NodeId,
    heard: impl Fn(NodeId) -> bool,
) -> Option<JointStep> {
    let newest = joint_to_finish(m)?;
    if newest.contains(&me) {
        return Some(JointStep::Finish(newest));
    }
    let first = *newest.first()?;
    Some(JointStep::HandOver(newest.iter().copied().find(|n| heard(*n)).unwrap_or(first)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(
        configs: Vec<BTreeSet<NodeId>>,
        learners: &[NodeId],
        at: u64,
        applied: u64,
    ) -> openraft::RaftMetrics<NodeId, BasicNode> {
        let ids: BTreeSet<NodeId> = configs.iter().flatten().chain(learners).copied().collect();
        let nodes: BTreeMap<NodeId, BasicNode> =
            ids.into_iter().map(|n| (n, BasicNode::new("http://n"))).collect();
        let membership = openraft::Membership::new(configs, nodes);
        let log_id = |index| openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index);
        let mut m = openraft::RaftMetrics::new_initial(1);
        m.membership_config = Arc::new(openraft::StoredMembership::new(Some(log_id(at)), membership));
        m.last_applied = Some(log_id(applied));
        m
    }

    #[test]
    fn a_committed_joint_membership_is_finished_and_its_old_half_keeps_its_data() {
        let joint = || vec![BTreeSet::from([1, 2, 3, 4]), BTreeSet::from([1, 2, 4])];
        // Committed: finished to its newest half. Not yet: left to the
        // change under way. Not joint: nothing to finish.
        assert_eq!(joint_to_finish(&metrics(joint(), &[], 10, 10)), Some(BTreeSet::from([1, 2, 4])));
        assert_eq!(joint_to_finish(&metrics(joint(), &[], 10, 9)), None);
        assert_eq!(joint_to_finish(&metrics(vec![BTreeSet::from([1, 2, 4])], &[], 10, 10)), None);
        // Node 3 leads (elected while the group was joint): it hands the
        // group to a node of the newest half it hears, which finishes.
        let m = metrics(joint(), &[], 10, 10);
        assert_eq!(joint_step(&m, 1, |_| true), Some(JointStep::Finish(BTreeSet::from([1, 2, 4]))));
        assert_eq!(joint_step(&m, 3, |n| n != 1), Some(JointStep::HandOver(2)));
        assert_eq!(joint_step(&m, 3, |_| false), Some(JointStep::HandOver(1)), "none heard: the first");
        assert_eq!(joint_step(&metrics(joint(), &[], 10, 9), 3, |_| true), None, "not committed yet");
        // Node 3, only in the old half of a committed joint membership,
        // still counts for that half's quorum: it keeps its data.
        assert!(!left_by(&metrics(joint(), &[], 10, 12), 3));
        // Once the newest half alone is committed it is out, unless it
        // stayed a learner; never before the membership is applied.
        let after =
            |learners: &[NodeId], applied| metrics(vec![BTreeSet::from([1, 2, 4])], learners, 11, applied);
        assert!(left_by(&after(&[], 11), 3));
        assert!(!left_by(&after(&[3], 11), 3));
        assert!(!left_by(&after(&[], 10), 3));
        assert!(!left_by(&after(&[], 11), 2));
    }

    /// Runs steps on a membership until it settles.
    fn settle(
        me: NodeId,
        voters: &mut BTreeSet<NodeId>,
        learners: &mut BTreeSet<NodeId>,
        fit: impl Fn(&NodeId) -> bool + Copy,
    ) {
        for _ in 0..20 {
            match meta_voter_step(me, voters, learners, false, fit) {
                MetaVoterStep::Keep => return,
                MetaVoterStep::Promote(p) => {
                    assert!(voters.len() + p.len() <= MAX_META_VOTERS + 1, "{voters:?} + {p:?}");
                    learners.retain(|n| !p.contains(n));
                    voters.extend(p);
                }
                MetaVoterStep::Demote(d) => {
                    voters.retain(|n| !d.contains(n));
                    learners.extend(d);
                }
                MetaVoterStep::HandOff(_) => return,
            }
        }
        panic!("did not settle: {voters:?}");
    }

    #[test]
    fn an_unfit_voter_is_replaced_one_for_one_and_voters_stay_at_five() {
        // Ten nodes, voters 1..=5; node 5 drains.
        let (mut voters, mut learners): (BTreeSet<NodeId>, BTreeSet<NodeId>) =
            ((1..=5).collect(), (6..=10).collect());
        settle(1, &mut voters, &mut learners, |n| *n != 5);
        assert_eq!(voters, [1, 2, 3, 4, 6].into());
        // Node 5 back: no room, it stays a learner; nothing moves.
        assert_eq!(meta_voter_step(1, &voters, &learners, false, |_| true), MetaVoterStep::Keep);
        // Three nodes, one silent, no learner to promote: it becomes a
        // learner (it was going to fail anyway; the two others still agree).
        let (mut voters, mut learners) = ([1, 2, 3].into(), BTreeSet::new());
        settle(1, &mut voters, &mut learners, |n| *n != 3);
        assert_eq!(voters, [1, 2].into(), "an unfit voter becomes a learner when others remain");
        // The leader unfit hands off first.
        let voters = [1, 2, 3].into();
        assert_eq!(
            meta_voter_step(1, &voters, &BTreeSet::new(), false, |n| *n != 1),
            MetaVoterStep::HandOff(2)
        );
        // Growing: learners fill up to five.
        let (mut voters, mut learners) = ([1].into(), (2..=8).collect());
        settle(1, &mut voters, &mut learners, |_| true);
        assert_eq!(voters.len(), MAX_META_VOTERS);
    }

    #[test]
    fn an_unfit_voter_stays_while_its_replacement_catches_up() {
        // Voters 1..=3, node 3 draining, node 4 a fit learner not caught up
        // yet: node 3 keeps its vote (demoting it now would leave two).
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let fit = |n: &NodeId| *n != 3;
        assert_eq!(meta_voter_step(1, &voters, &BTreeSet::new(), true, fit), MetaVoterStep::Keep);
        // Ready: promoted first, then node 3 goes.
        let (mut voters, mut learners) = (voters, [4].into());
        settle(1, &mut voters, &mut learners, fit);
        assert_eq!(voters, [1, 2, 4].into());
        // No replacement on its way: demoted at once.
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        assert_eq!(
            meta_voter_step(1, &voters, &BTreeSet::new(), false, fit),
            MetaVoterStep::Demote([3].into())
        );
        // Five fit voters already: a learner catching up replaces nothing.
        let voters: BTreeSet<NodeId> = (1..=6).collect();
        let fit = |n: &NodeId| *n != 6;
        assert_eq!(
            meta_voter_step(1, &voters, &BTreeSet::new(), true, fit),
            MetaVoterStep::Demote([6].into())
        );
    }

    #[test]
    fn only_a_committed_membership_without_this_node_removes_it() {
        let leader = |voters: Vec<NodeId>, learners: Vec<NodeId>, membership_index, applied_index| {
            portrait_proto::v1::ShardStatus {
                role: "Leader".into(),
                voters,
                learners,
                membership_index,
                applied_index,
                ..Default::default()
            }
        };
        // Committed (applied), without node 4: removed.
        assert!(left_out(&leader(vec![1, 2, 3], vec![], 40, 41), 4));
        assert!(left_out(&leader(vec![1, 2, 3], vec![], 41, 41), 4));
        // Appended, not yet applied: a later leader may never commit it.
        assert!(!left_out(&leader(vec![1, 2, 3], vec![], 42, 41), 4));
        // Still a voter or a learner; or no membership known.
        assert!(!left_out(&leader(vec![1, 2, 4], vec![], 40, 41), 4));
        assert!(!left_out(&leader(vec![1, 2, 3], vec![4], 40, 41), 4));
        assert!(!left_out(&leader(vec![], vec![], 0, 0), 4));
    }
}
