//! Measures the peers' clocks (`Raft.Clock`, one call per peer node every
//! probe interval, whatever the number of groups), records who answered
//! for quiet groups ([`super::liveness`]), and acts on the clock verdict
//! ([`crate::clock`]): a node whose clock is off a quorum of voters stops
//! campaigning in every group and hands over each group it leads; it
//! campaigns again once its clock agrees. Also lets the clock rewrite its
//! durable mark. Peers and voters are those of all groups together (the
//! same nodes while every shard is replicated on every node).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portrait_proto::v1::raft_client::RaftClient;
use portrait_proto::v1::{ClockRequest, ClockResponse};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::liveness::Liveness;
use super::network::{Blocked, Channels};
use super::replica::{Registry, Replica};
use crate::clock::peers::PeerOffset;
use crate::clock::NodeClock;
use crate::types::NodeId;

/// How long one clock probe may take; a slower answer is no sample.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A peer's answer to one probe, with when it was sent and received.
type Answer = (NodeId, Result<ClockResponse, tonic::Status>, Instant, Instant);

/// Probes sent and not answered yet (aborted when the probe task ends).
#[derive(Default)]
struct InFlight {
    probes: JoinSet<Answer>,
    peers: BTreeSet<NodeId>,
}

pub struct ClockProbe {
    pub me: NodeId,
    pub registry: Arc<Registry>,
    pub clock: Arc<NodeClock>,
    pub blocked: Blocked,
    pub liveness: Arc<Liveness>,
    pub interval: Duration,
    /// Where the peers' incarnations are looked up, and replaced peers
    /// recorded.
    pub channels: Channels,
}

impl ClockProbe {
    /// Runs until `stop` turns true (or its sender is dropped).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut clients: BTreeMap<NodeId, (String, RaftClient<Channel>)> = BTreeMap::new();
        let mut in_flight = InFlight::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let replicas = self.registry.all();
            let (members, voters, replicated) = self.members(&replicas);
            clients.retain(|id, _| members.iter().any(|(m, _)| m == id));
            self.clock.peers().retain(|id| members.iter().any(|(m, _)| *m == id));
            self.channels.retain_replaced(&members.iter().map(|(m, _)| *m).collect::<Vec<_>>());
            self.probe_all(&members, &mut clients, &mut in_flight);
            // On the blocking pool: a tick may write and fsync the clock
            // mark, which can take long under disk load.
            let (clock, me) = (self.clock.clone(), self.me);
            let Ok(verdict) = tokio::task::spawn_blocking(move || clock.tick(me, &voters, replicated)).await
            else {
                continue;
            };
            let changed = replicas.iter().fold(false, |c, r| r.elect.set_clock_ok(!verdict.skewed) | c);
            if changed {
                match verdict.skewed {
                    true => tracing::error!(
                        offset_ms = -verdict.worst_offset_ms,
                        max_offset_ms = self.clock.options().max_offset_ms,
                        "this node's clock is off a quorum of its peers: it stops campaigning and leading"
                    ),
                    false => tracing::info!("this node's clock agrees with its peers again: it may campaign"),
                }
            }
            let leading: Vec<_> = replicas.iter().filter(|r| r.is_leader()).collect();
            if verdict.skewed && !leading.is_empty() {
                // Inline: probing pauses meanwhile, and a transfer is bounded
                // in time (see `LeaderTransfer`); the groups hand over together.
                let hand_overs = leading.iter().map(|r| self.hand_over(r, &members));
                tokio::select! {
                    _ = futures::future::join_all(hand_overs) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }

    /// The other members and the voters of all groups, and the largest
    /// replicated clock among them (what the clock guard must not go below).
    fn members(&self, replicas: &[Arc<Replica>]) -> (Vec<(NodeId, String)>, Vec<NodeId>, i64) {
        let mut members = BTreeMap::new();
        let mut voters = std::collections::BTreeSet::new();
        let mut replicated = i64::MIN;
        for r in replicas {
            let m = r.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            for (id, n) in membership.nodes().filter(|(id, _)| **id != self.me) {
                members.entry(*id).or_insert_with(|| n.addr.clone());
            }
            voters.extend(membership.voter_ids());
            replicated = replicated.max(r.sm.clock_ms());
        }
        (members.into_iter().collect(), voters.into_iter().collect(), replicated)
    }

    /// Records the answers that came since the last round, and asks every
    /// peer without a probe in flight for its clock. A peer that does not
    /// answer holds up neither the others nor the next round: the liveness
    /// of quiet groups needs each live peer heard every interval.
    fn probe_all(
        &self,
        members: &[(NodeId, String)],
        clients: &mut BTreeMap<NodeId, (String, RaftClient<Channel>)>,
        in_flight: &mut InFlight,
    ) {
        while let Some(done) = in_flight.probes.try_join_next() {
            let Ok((peer, answer, sent, received)) = done else { continue };
            in_flight.peers.remove(&peer);
            match answer {
                Ok(r) if self.is_replaced(peer, r.incarnation) => {}
                Ok(r) => {
                    self.liveness.answered(peer, r.boot_id, received);
                    self.clock.peers().record(peer, r.wall_ms, sent, received);
                }
                Err(status) => tracing::debug!(peer, %status, "clock probe failed"),
            }
        }
        for (id, addr) in members.iter().filter(|(id, _)| !self.blocked.contains(*id)) {
            if in_flight.peers.contains(id) {
                continue;
            }
            if clients.get(id).is_none_or(|(a, _)| a != addr) {
                let Ok(endpoint) = crate::tls::peer_endpoint(addr, Some(*id)) else { continue };
                let endpoint =
                    endpoint.connect_timeout(PROBE_TIMEOUT).timeout(PROBE_TIMEOUT).tcp_nodelay(true);
                clients.insert(*id, (addr.clone(), RaftClient::new(endpoint.connect_lazy())));
            }
            let mut client = clients[id].1.clone();
            let (me, peer) = (self.me, *id);
            in_flight.peers.insert(peer);
            in_flight.probes.spawn(async move {
                let sent = Instant::now();
                let answer = client.clock(ClockRequest { from: me }).await;
                (peer, answer.map(|r| r.into_inner()), sent, Instant::now())
            });
        }
    }

    /// Whether `peer` answered from another data dir than the shard map
    /// records for it (it refuses every raft message, so it counts as
    /// silent); logs when that changes.
    fn is_replaced(&self, peer: NodeId, incarnation: u64) -> bool {
        let expected = self.channels.incarnation_of(peer);
        let replaced = expected != 0 && incarnation != 0 && incarnation != expected;
        if self.channels.set_replaced(peer, replaced) {
            match replaced {
                true => tracing::error!(
                    peer,
                    incarnation = format!("{incarnation:x}"),
                    expected = format!("{expected:x}"),
                    "node {peer} answers from another data dir than the shard map records for it: it lost its \
                     raft votes and logs and takes no part in raft; drain and remove it, then add it back under \
                     a new id on an empty data dir (docs/operations.md)"
                ),
                false => tracing::info!(peer, "node {peer} answers from its recorded data dir again"),
            }
        }
        replaced
    }

    /// Transfers leadership of `replica`'s group to a voter of that group
    /// whose clock was measured recently.
    async fn hand_over(&self, replica: &Replica, members: &[(NodeId, String)]) {
        let offsets = self.clock.peers().offsets(self.clock.now_ms(), Instant::now());
        let group_voters: Vec<NodeId> =
            replica.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        let target = hand_over_target(&offsets, &group_voters, self.me)
            .and_then(|target| members.iter().find(|(id, _)| *id == target));
        if let Some((id, addr)) = target {
            let group = replica.gid;
            tracing::warn!(target = id, %group, "clock off its peers: handing leadership over");
            if let Err(e) = replica.transfer.run(*id, addr).await {
                tracing::warn!(target = id, %group, error = %e, "handing leadership over failed; will retry");
            }
        }
    }
}

/// Whom a leader whose clock is off hands its group over to: the voter of
/// that group (not this node) whose clock was measured last, if within
/// [`crate::clock::peers::FRESH`]. Only the group's own voters: the node's
/// peers of other groups host no replica of it, and a transfer to one
/// would fail at every round.
fn hand_over_target(offsets: &[PeerOffset], group_voters: &[NodeId], me: NodeId) -> Option<NodeId> {
    offsets
        .iter()
        .filter(|o| o.node_id != me && group_voters.contains(&o.node_id))
        .filter(|o| o.age <= crate::clock::peers::FRESH)
        .min_by_key(|o| o.age)
        .map(|o| o.node_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leadership_is_handed_to_a_fresh_voter_of_the_group_only() {
        let offset = |node_id, age_ms| PeerOffset {
            node_id,
            offset_ms: 0,
            uncertainty_ms: 0,
            age: Duration::from_millis(age_ms),
        };
        // Node 4 was measured last, but votes in other groups only.
        let offsets = [offset(2, 900), offset(3, 400), offset(4, 100), offset(5, 20_000)];
        assert_eq!(hand_over_target(&offsets, &[1, 2, 3], 1), Some(3));
        assert_eq!(hand_over_target(&offsets, &[1, 2], 1), Some(2));
        assert_eq!(hand_over_target(&offsets, &[1, 5], 1), None, "its only other voter's sample is stale");
        assert_eq!(hand_over_target(&offsets, &[1], 1), None);
    }
}
