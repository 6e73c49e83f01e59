//! The cluster side of a [`Node`]: leadership transfer, incoming raft
//! messages (dispatched to the group's replica, noting the leader's commit
//! index for [`crate::raft::contact`]) and fault injection for tests.
//! Membership is the meta group's (`node/meta.rs`); each shard's raft
//! membership follows the map (`node/placement.rs`).

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
};
use openraft::ServerState;

use super::Node;
use crate::error::{Error, Result};
use crate::raft::replica::Replica;
use crate::types::{GroupId, NodeId, TypeConfig};

/// Leadership transfer (see [`crate::raft::transfer`]).
impl Node {
    /// Makes voter `target` the leader of `shard`, or (`None`) of every
    /// shard this node leads (concurrently), and returns it with its
    /// address. This node must lead `shard` (or, for all, shard 0):
    /// elsewhere `NotLeader` with the leader's address.
    pub async fn transfer_leader(&self, target: NodeId, shard: Option<u32>) -> Result<(NodeId, String)> {
        let Some(shard) = shard else {
            let first = self.first();
            if !first.is_leader() {
                return self.transfer_group(&first, target).await;
            }
            let leading: Vec<_> =
                self.registry.all().into_iter().filter(|r| r.gid == GroupId(0) || r.is_leader()).collect();
            let moves = leading
                .iter()
                .map(|r| async move { self.transfer_group(r, target).await.map_err(|e| e.in_shard(r.gid)) });
            let mut answers = futures::future::try_join_all(moves).await?;
            // Its leadership lost since it was checked, this node may lead
            // nothing (and host no shard 0): the first group answers why.
            if answers.is_empty() {
                return self.transfer_group(&first, target).await;
            }
            return Ok(answers.swap_remove(0));
        };
        if shard >= self.shards {
            let reason = format!("the cluster has shards 0 to {}", self.shards - 1);
            return Err(Error::invalid("shard", reason));
        }
        let replica = self.replica(GroupId(shard))?;
        self.transfer_group(&replica, target).await.map_err(|e| e.in_shard(replica.gid))
    }

    pub(super) async fn transfer_group(&self, replica: &Replica, target: NodeId) -> Result<(NodeId, String)> {
        let m = replica.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let addr_of = |id: NodeId| membership.get_node(&id).map(|n| n.addr.clone());
        if m.state != ServerState::Leader || m.current_leader != Some(self.id) {
            let leader_addr = m.current_leader.and_then(addr_of);
            return Err(Error::NotLeader { leader_id: m.current_leader, leader_addr, group: None });
        }
        if target == self.id {
            return Ok((target, self.client_addr(target).unwrap_or_default()));
        }
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let Some(addr) = addr_of(target) else {
            if let Some(node) = self.membership().get_node(&target) {
                return Err(Error::FailedPrecondition(format!(
                    "node_id: node {target} is a learner of the cluster or hosts no replica of {}; only a \
                     voter of the group can lead it (it is at {})",
                    replica.gid, node.addr
                )));
            }
            let nodes: Vec<String> = self.membership().nodes().map(|(n, _)| n.to_string()).collect();
            let reason =
                format!("node {target} is not a member of the cluster (nodes: {})", nodes.join(", "));
            return Err(Error::invalid("node_id", reason));
        };
        if !voters.contains(&target) {
            // A shard's learner is a replica still catching up, which the
            // shard's leader promotes itself; a meta group learner is
            // promoted by AddNode.
            let how = match replica.gid == GroupId::META {
                true => {
                    format!("promote it with `portrait cluster add-node {target} ADDR --peer-addr {addr}`")
                }
                false => {
                    format!("it is a replica of {} still catching up, promoted once it has", replica.gid)
                }
            };
            return Err(Error::FailedPrecondition(format!(
                "node_id: node {target} is a learner; only a voter can lead ({how})"
            )));
        }
        replica.transfer.run(target, &addr).await?;
        Ok((target, self.client_addr(target).unwrap_or_default()))
    }

    /// On the transfer's target: campaigns now if this node is a voter in
    /// `term` whose log reaches `last_log_index` (only checks, if `dry_run`).
    pub async fn start_election(
        &self,
        group: GroupId,
        term: u64,
        last_log_index: u64,
        dry_run: bool,
    ) -> Result<()> {
        let replica = self.replica(group)?;
        let m = replica.raft.metrics().borrow().clone();
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        if !voters.contains(&self.id) {
            return Err(Error::FailedPrecondition(format!("node {} is not a voter", self.id)));
        }
        if self.clock.group_verdict(self.id, &voters).skewed {
            return Err(Error::FailedPrecondition(format!(
                "node {}'s clock is off a quorum of its peers; it does not lead",
                self.id
            )));
        }
        if m.current_term != term {
            return Err(Error::FailedPrecondition(format!(
                "asked to campaign in term {term}, but this node is in term {}",
                m.current_term
            )));
        }
        let last = m.last_log_index.unwrap_or(0);
        if dry_run || m.state == ServerState::Leader {
            return Ok(());
        }
        if last < last_log_index {
            return Err(Error::FailedPrecondition(format!(
                "its log ends at {last}, before the leader's {last_log_index}"
            )));
        }
        tracing::info!(%group, term, last_log_index, "leadership transfer: campaigning");
        replica
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Error::Unavailable(format!("raft is not running: {e}")))
    }
}

/// Incoming raft messages (the internal `Raft` service), noting what the
/// leader says about its commit index ([`crate::raft::contact`]).
impl Node {
    /// `Err`: dropped by fault injection (the sender sees the node unreachable).
    pub async fn append_entries(
        &self,
        group: GroupId,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
        let replica = self.replica(group)?;
        let commit = req.leader_commit.map(|l| l.index);
        if !req.entries.is_empty() {
            if let Some(from) = self.dropped_sender(&req.vote) {
                if req.vote >= replica.raft.metrics().borrow().vote {
                    replica.contact.heard(commit);
                }
                return Err(dropped(from));
            }
        }
        let result = replica.raft.append_entries(req).await;
        if matches!(&result, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            replica.contact.heard(commit);
        }
        Ok(result)
    }

    /// A vote request from a candidate; a refusal for the candidate's
    /// shorter log is noted ([`crate::raft::contact`]).
    pub async fn vote(
        &self,
        group: GroupId,
        req: openraft::raft::VoteRequest<NodeId>,
    ) -> Result<std::result::Result<openraft::raft::VoteResponse<NodeId>, RaftError<NodeId>>> {
        let replica = self.replica(group)?;
        let candidate_log = req.last_log_id;
        let result = replica.raft.vote(req).await;
        if matches!(&result, Ok(r) if !r.vote_granted && r.last_log_id > candidate_log) {
            replica.contact.refused_shorter_log();
        }
        Ok(result)
    }

    /// `Err`: dropped by fault injection.
    pub async fn install_snapshot(
        &self,
        group: GroupId,
        req: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
        let replica = self.replica(group)?;
        if let Some(from) = self.dropped_sender(&req.vote) {
            return Err(dropped(from));
        }
        let (id, offset, done) = (&req.meta.snapshot_id, req.offset, req.done);
        // A chunk of a deposed leader (a lower vote) is left to openraft,
        // which refuses it, before it can reset the check of the stream
        // being received.
        let current = replica.raft.metrics().borrow().vote;
        let checked = match req.vote >= current {
            true => replica.incoming.chunk(id, offset, &req.data, done),
            false => Ok(()),
        };
        if let Err(reason) = checked {
            tracing::error!(%group, "{reason}");
            // A refusal of this chunk, not a failure of the connection,
            // which every group to this node shares: FAILED_PRECONDITION,
            // which the sender answers without reconnecting.
            return Err(Error::FailedPrecondition(format!("{group}: {reason}")));
        }
        let result = replica.raft.install_snapshot(req).await;
        if result.is_ok() {
            replica.contact.heard(None);
        }
        Ok(result)
    }

    /// The sender of a message carrying `vote`, if its log entries are
    /// dropped (never without the `fault-injection` feature).
    fn dropped_sender(&self, vote: &openraft::Vote<NodeId>) -> Option<NodeId> {
        let from = vote.leader_id().voted_for()?;
        self.dropping.contains(from).then_some(from)
    }
}

fn dropped(from: NodeId) -> Error {
    Error::Unavailable(format!("fault injection: log entries from node {from} are dropped"))
}

/// Fault injection (tests; see [`crate::raft::fault`]).
impl Node {
    /// From now on (replacing the previous sets): drops raft messages to
    /// `blocked`, and log entries and snapshots arriving from
    /// `drop_entries_from` (their heartbeats and commit index still arrive).
    /// While the latter is not empty this node does not campaign, so a
    /// lagging follower stays a follower.
    #[cfg(feature = "fault-injection")]
    pub fn set_partition(&self, blocked: Vec<NodeId>, drop_entries_from: Vec<NodeId>) -> Result<()> {
        if !self.fault_injection {
            return Err(Error::FailedPrecondition(
                "fault injection is off (start portraitd-faults with --fault-injection)".into(),
            ));
        }
        let elect = drop_entries_from.is_empty();
        self.blocked.set(blocked);
        self.dropping.set(drop_entries_from);
        self.registry.all().iter().for_each(|r| r.elect.set_faults_ok(elect));
        Ok(())
    }

    /// Refused: this build has no fault injection (the release `portraitd`).
    #[cfg(not(feature = "fault-injection"))]
    pub fn set_partition(&self, _blocked: Vec<NodeId>, _drop_entries_from: Vec<NodeId>) -> Result<()> {
        // Only set by code that builds `NodeOptions` itself: `--fault-injection` is refused at start.
        let ignored = if self.fault_injection { " (NodeOptions.fault_injection is ignored)" } else { "" };
        Err(Error::FailedPrecondition(format!("{}{ignored}", crate::raft::fault::NO_FAULT_INJECTION)))
    }

    /// Test-only: shifts this node's wall clock by `offset_ms` from now on.
    #[cfg(feature = "fault-injection")]
    pub fn set_clock_offset(&self, offset_ms: i64) -> Result<()> {
        if !self.fault_injection {
            return Err(Error::FailedPrecondition(
                "fault injection is off (start portraitd-faults with --fault-injection)".into(),
            ));
        }
        tracing::warn!(offset_ms, "fault injection: clock offset");
        self.clock.set_test_offset(offset_ms);
        Ok(())
    }

    /// Refused: this build has no fault injection (the release `portraitd`).
    #[cfg(not(feature = "fault-injection"))]
    pub fn set_clock_offset(&self, _offset_ms: i64) -> Result<()> {
        Err(Error::FailedPrecondition(crate::raft::fault::NO_FAULT_INJECTION.into()))
    }

    /// This node's wall clock (answers peers' clock probes).
    pub fn clock_now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}
