//! A node's replica of one raft group, and the registry that finds the
//! replicas a node hosts by group.
//!
//! Everything that exists once per group lives in [`Replica`]: its openraft
//! instance, its state ([`GroupState`]), its proposal gate, leadership
//! transfer, stamper, campaign and heartbeat switches, and what it heard
//! from its leader. Everything a node has once, whatever its number of
//! groups (the log engine, the state database, the clock, peer connections,
//! the write batcher, the ticker, the clock probe and liveness, the quiet
//! task, the log policy task), lives in the node and reaches the replicas
//! through the [`Registry`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::contact::{LeaderContact, PeerAcks};
use super::elect::ElectSwitch;
use super::gate::ProposalGate;
use super::liveness::Liveness;
use super::network::{Blocked, Channels, Network};
use super::quiet::{quorum_answers, HeartbeatSwitch};
use super::stamp::Stamper;
use super::transfer::LeaderTransfer;
use super::RaftTuning;
use crate::clock::NodeClock;
use crate::store::log_bytes::LogBytes;
use crate::store::snapshot::SnapshotDir;
use crate::store::state_machine::IdleTrim;
use crate::store::{GroupState, LogEngine, PurgeGuard, StateDb, StateMachine};
use crate::types::{GroupId, NodeId, Raft};

/// One group's replica on this node.
pub struct Replica {
    pub gid: GroupId,
    pub raft: Raft,
    pub sm: Arc<GroupState>,
    /// Every proposal of this group passes it; a transfer closes it.
    pub gate: ProposalGate,
    /// On unless the group rests (see [`super::quiet`]) or a transfer runs.
    pub heartbeats: Arc<HeartbeatSwitch>,
    pub transfer: LeaderTransfer,
    pub stamper: Stamper,
    pub elect: ElectSwitch,
    /// What this replica last heard from its leader, and (leading) when
    /// each peer last answered: see [`super::contact`].
    pub contact: LeaderContact,
    pub acks: Arc<PeerAcks>,
    /// The encoded bytes of this group's log (for [`super::log_policy`]).
    pub log_bytes: Arc<LogBytes>,
    /// Trims the apply cache of the group when idle (for
    /// [`super::log_policy`]).
    pub idle_trim: IdleTrim,
    /// The snapshot this replica is receiving, checked chunk by chunk.
    pub incoming: super::incoming::IncomingSnapshot,
    /// The check of the snapshots it sends as leader.
    pub snapshots: Arc<super::network::SnapshotCheck>,
    /// Held while a write brings the shard to the cluster's apply rules
    /// version: one proposal for every write waiting on it.
    pub rules_sync: tokio::sync::Mutex<()>,
}

/// What every replica of a node shares, to open one.
pub struct Shared<'a> {
    pub me: NodeId,
    pub data_dir: &'a Path,
    pub log_engine: &'a LogEngine,
    pub state_db: &'a Arc<StateDb>,
    pub config: Arc<openraft::Config>,
    pub channels: Channels,
    pub blocked: Blocked,
    pub clock: Arc<NodeClock>,
    pub tuning: &'a RaftTuning,
}

impl Replica {
    /// Opens group `gid`'s state and log and starts its raft instance
    /// (not initialized: the caller bootstraps or a leader adds it).
    pub async fn open(gid: GroupId, s: &Shared<'_>) -> anyhow::Result<Replica> {
        let sm = s.state_db.open_group(gid)?;
        if s.state_db.log_reset_pending(gid)? {
            s.log_engine.reset_log(gid)?;
            s.state_db.clear_log_reset(gid)?;
            tracing::warn!(
                group = %gid,
                "the group's state was wiped at open: its raft log is emptied too (vote kept), and its leader \
                 sends it a snapshot"
            );
        }
        let guard: Arc<dyn PurgeGuard> = sm.clone();
        let mut log = s.log_engine.group(gid, Some(guard))?;
        let log_bytes = log.log_bytes();
        if SnapshotDir::new(s.data_dir, gid)?.forget_leftover(&mut log, &sm).await? {
            tracing::warn!(group = %gid, "removed a snapshot a replica dropped here before left behind");
        }
        let state_machine = StateMachine::new(sm.clone(), s.data_dir)?.purging(log.clone());
        let idle_trim = state_machine.idle_trim();
        let network = Network::new(gid, s.channels.clone(), s.blocked.clone());
        let (acks, snapshots) = (network.acks.clone(), network.snapshots.clone());
        let raft = Raft::new(s.me, s.config.clone(), network, log, state_machine).await?;
        let heartbeats = HeartbeatSwitch::new(raft.clone());
        let gate = ProposalGate::new(heartbeats.clone());
        let (blocked, tuning) = (s.blocked.clone(), s.tuning.clone());
        let transfer =
            LeaderTransfer::new(s.me, gid, raft.clone(), gate.clone(), heartbeats.clone(), blocked, tuning);
        Ok(Replica {
            gid,
            stamper: Stamper::new(s.me, raft.clone(), sm.clone(), s.clock.clone()),
            elect: ElectSwitch::new(raft.clone(), !s.tuning.quiet_idle_groups),
            raft,
            sm,
            gate,
            heartbeats,
            transfer,
            contact: LeaderContact::default(),
            acks,
            log_bytes,
            idle_trim,
            incoming: Default::default(),
            snapshots,
            rules_sync: Default::default(),
        })
    }

    /// Whether this replica leads its group now (by its metrics).
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == openraft::ServerState::Leader
    }

    /// When this replica leads its group (on node `me`) and some
    /// configuration of its membership (each of a joint one: a change
    /// commits only with a quorum of both) had no quorum answer within
    /// `within`, neither on the node's liveness probe (`liveness`) nor on
    /// the group's own AppendEntries: that configuration's voters and those
    /// of them that answered (`me` among them). A leader cut off so would
    /// never commit what it proposes now (openraft 0.9 leaders do not step
    /// down), and its entries would wait in its log, to commit or be
    /// dropped whenever the cut ends. `None` otherwise, and when it does not
    /// lead.
    pub fn quorum_out_of_sight(
        &self,
        me: NodeId,
        liveness: &Liveness,
        within: Duration,
    ) -> Option<(Vec<NodeId>, Vec<NodeId>)> {
        let configs: Vec<Vec<NodeId>> = {
            let m = self.raft.metrics();
            let m = m.borrow();
            if m.state != openraft::ServerState::Leader {
                return None;
            }
            let joint = m.membership_config.membership().get_joint_config();
            joint.iter().map(|c| c.iter().copied().collect()).collect()
        };
        let now = Instant::now();
        let heard = |id: NodeId| liveness.silent_for(id, now) < within;
        // A quorum that answered the group's own AppendEntries lately
        // vetoes: the node's probe loop may be the one stalled (its clock
        // tick fsyncs). A resting quiet group has no such answers; the
        // probe alone speaks for it.
        let lost = configs.into_iter().find(|voters| {
            let acked = self.acks.quorum_age(me, voters).is_some_and(|age| age < within);
            !acked && !quorum_answers(me, voters, heard)
        })?;
        let answering = lost.iter().copied().filter(|&id| id == me || heard(id)).collect();
        Some((lost, answering))
    }
}

/// The replicas a node hosts, by group. Read on every request; written
/// when placement adds or drops one.
#[derive(Default)]
pub struct Registry {
    replicas: RwLock<BTreeMap<GroupId, Arc<Replica>>>,
}

impl Registry {
    pub fn insert(&self, replica: Arc<Replica>) {
        self.replicas.write().expect("registry lock").insert(replica.gid, replica);
    }

    /// Takes `gid`'s replica out (placement dropped it from this node).
    pub fn remove(&self, gid: GroupId) -> Option<Arc<Replica>> {
        self.replicas.write().expect("registry lock").remove(&gid)
    }

    /// The replica of `gid`, if this node hosts one.
    pub fn get(&self, gid: GroupId) -> Option<Arc<Replica>> {
        self.replicas.read().expect("registry lock").get(&gid).cloned()
    }

    /// Every replica, in group order.
    pub fn all(&self) -> Vec<Arc<Replica>> {
        self.replicas.read().expect("registry lock").values().cloned().collect()
    }
}
