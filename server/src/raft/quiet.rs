//! Idle groups go quiet (docs/shards.md, "Idle cost"): openraft 0.9 has no
//! hibernation, and each heartbeat of each group costs about 0.5 ms of CPU,
//! a quarter of a core for 64 idle groups. So, when `quiet_idle_groups` is
//! on:
//!
//! - **Leaders rest.** A group whose leader has proposed nothing for two
//!   heartbeat intervals, and whose followers all hold its whole log and
//!   have acknowledged a commit index that high (openraft sends a commit
//!   index once, in a heartbeat it does not retry), turns its heartbeats
//!   off ([`HeartbeatSwitch`]). Every proposal passes the
//!   group's [`super::gate::ProposalGate`], which turns them back on before
//!   anything is proposed; openraft replicates entries (and the commit index
//!   after them) with heartbeats off as well.
//! - **Followers never campaign on openraft's timer** (a leader at rest
//!   sends nothing to renew it; see [`super::elect`]). [`QuietGroups`], one
//!   task for the node, campaigns for them instead, from what the node-wide
//!   liveness probe ([`super::liveness`]) says of the leader's node: a
//!   follower campaigns, after a random delay within the election timeout
//!   range, when it has known no leader for an election timeout, when the
//!   leader's node has not answered for an election timeout, or when that
//!   node restarted and its leader has not been heard since. Also when it
//!   refused a candidate for a shorter log and has not heard its leader
//!   itself for an election timeout: a peer finds the leader gone, and
//!   only a replica with the longer log can win. (The leader's node may
//!   answer the probe while the group's own messages are lost: a one-way
//!   or per-connection cut.)
//! - **No campaign without a quorum in sight.** A replica whose node does
//!   not hear a quorum of the group's voters on the liveness probe neither
//!   campaigns nor, as a candidate, re-campaigns on openraft's timer: it
//!   cannot win, and its ever higher terms would depose the leader the
//!   others elect (a stand-in for the pre-vote openraft 0.9 lacks).
//! - A resting leader wakes when a follower's node comes up again (a new
//!   boot id), so the restarted replica learns its leader without an
//!   election, and stays awake for three election timeouts after: the
//!   restarted replica may hold entries it has not learnt are committed,
//!   and heartbeats to it can fail for a while (reconnect backoff) though
//!   the leader's view of its log is whole.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{BasicNode, RaftMetrics, ServerState};
use rand::Rng;
use tokio::sync::watch;

use super::liveness::Liveness;
use super::replica::{Registry, Replica};
use super::RaftTuning;
use crate::types::{GroupId, NodeId, Raft};

type Metrics = RaftMetrics<NodeId, BasicNode>;

/// A group's heartbeats: on unless the group rests or a leadership transfer
/// holds them off. Also counts the group's proposals, to tell when it is
/// idle.
pub struct HeartbeatSwitch {
    raft: Raft,
    state: Mutex<Switch>,
}

/// Held while a proposal is in flight; the group is not idle meanwhile.
#[must_use = "the proposal only counts while this is held"]
pub struct Proposing(Arc<HeartbeatSwitch>);

/// Heartbeats off while this lives (a leadership transfer).
#[must_use = "heartbeats resume as soon as this is dropped"]
pub struct HoldOff<'a>(&'a HeartbeatSwitch);

impl HeartbeatSwitch {
    pub fn new(raft: Raft) -> Arc<HeartbeatSwitch> {
        Arc::new(HeartbeatSwitch { raft, state: Mutex::new(Switch::new(Instant::now())) })
    }

    /// A proposal starts: heartbeats on before it is proposed.
    pub fn proposing(self: &Arc<Self>) -> Proposing {
        self.change(|s| s.begin());
        Proposing(self.clone())
    }

    /// Turns heartbeats off if nothing was proposed for `idle` (the caller
    /// has seen every follower hold the log); whether the group rests now.
    pub fn rest(&self, idle: Duration) -> bool {
        self.change(|s| s.rest(Instant::now(), idle))
    }

    /// Heartbeats on again, for at least the idle time before resting.
    pub fn wake(&self) {
        self.change(|s| s.wake(Instant::now()));
    }

    pub fn is_resting(&self) -> bool {
        self.lock().resting
    }

    /// Heartbeats off until the guard drops, whatever the group's activity.
    pub fn hold_off(&self) -> HoldOff<'_> {
        self.change(|s| s.held_off = true);
        HoldOff(self)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Switch> {
        self.state.lock().expect("heartbeat switch lock")
    }

    /// Applies `f` and sets openraft's switch to the outcome, under the lock
    /// so that two changes cannot apply in the wrong order.
    fn change<T>(&self, f: impl FnOnce(&mut Switch) -> T) -> T {
        let mut state = self.lock();
        let out = f(&mut state);
        self.raft.runtime_config().heartbeat(state.heartbeats());
        out
    }
}

impl Drop for Proposing {
    fn drop(&mut self) {
        self.0.change(|s| s.end(Instant::now()));
    }
}

impl Drop for HoldOff<'_> {
    fn drop(&mut self) {
        self.0.change(|s| s.held_off = false);
    }
}

/// The switch's state, apart from openraft (tested alone).
#[derive(Debug)]
struct Switch {
    in_flight: usize,
    last_proposal: Instant,
    resting: bool,
    held_off: bool,
}

impl Switch {
    fn new(now: Instant) -> Switch {
        Switch { in_flight: 0, last_proposal: now, resting: false, held_off: false }
    }

    fn heartbeats(&self) -> bool {
        !self.resting && !self.held_off
    }

    fn begin(&mut self) {
        self.in_flight += 1;
        self.resting = false;
    }

    fn end(&mut self, now: Instant) {
        self.in_flight -= 1;
        self.last_proposal = now;
    }

    fn rest(&mut self, now: Instant, idle: Duration) -> bool {
        let idle = self.in_flight == 0 && now.saturating_duration_since(self.last_proposal) >= idle;
        self.resting |= idle;
        idle
    }

    fn wake(&mut self, now: Instant) {
        if self.resting {
            self.resting = false;
            self.last_proposal = now;
        }
    }
}

/// The waits of [`QuietGroups`], from the raft tuning.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often groups are looked at: the heartbeat interval.
    pub round: Duration,
    /// No proposal and every follower caught up for this long: rest.
    pub rest_after: Duration,
    /// Not at rest while a member's node came up this recently (three
    /// election timeouts).
    pub awake_after_up: Duration,
    /// The leader's node silent this long: campaign (`election_timeout_min`).
    pub leader_silence: Duration,
    /// No leader known this long: campaign (`election_timeout_max`, what a
    /// follower that still had a leader lease would wait at least).
    pub leaderless: Duration,
    /// Campaigns wait a random delay up to this long, so that the replicas
    /// of different nodes do not all campaign at once.
    pub jitter: Duration,
}

impl From<&RaftTuning> for Timing {
    fn from(t: &RaftTuning) -> Timing {
        let ms = Duration::from_millis;
        Timing {
            round: ms(t.heartbeat_ms),
            rest_after: ms(2 * t.heartbeat_ms),
            awake_after_up: ms(3 * t.election_timeout_max_ms),
            leader_silence: ms(t.election_timeout_min_ms),
            leaderless: ms(t.election_timeout_max_ms),
            jitter: ms(t.election_timeout_max_ms - t.election_timeout_min_ms),
        }
    }
}

/// Whether a leader's followers all hold its whole log, and it applied it
/// (what is left to send is the commit index: see [`leader_caught_up`]).
/// `matched` is each follower's last log index the leader knows.
pub fn caught_up(last_log: Option<u64>, applied: Option<u64>, matched: &[Option<u64>]) -> bool {
    applied == last_log && matched.iter().all(|m| *m == last_log)
}

/// Whether a follower is known to hold the leader's `last_log` as
/// committed: it acknowledged a commit index at least that high since its
/// node last came up (`up_since`; a restarted node may have forgotten).
pub fn commit_known(last_log: Option<u64>, acked: Option<(u64, Instant)>, up_since: Option<Instant>) -> bool {
    let Some(last) = last_log else { return true };
    acked.is_some_and(|(commit, at)| commit >= last && up_since.is_none_or(|up| at >= up))
}

/// Whether the leader `me` (its metrics `m`) is caught up: [`caught_up`],
/// and each follower [`commit_known`] (`acked`: the commit index it
/// acknowledged and when; `up_since`: since when its node is up). openraft
/// lists the leader itself among the replication targets: it needs no
/// acknowledgement.
pub fn leader_caught_up(
    me: NodeId,
    m: &Metrics,
    acked: impl Fn(NodeId) -> Option<(u64, Instant)>,
    up_since: impl Fn(NodeId) -> Option<Instant>,
) -> bool {
    let Some(replication) = &m.replication else { return false };
    let matched: Vec<Option<u64>> = replication.values().map(|l| l.as_ref().map(|l| l.index)).collect();
    caught_up(m.last_log_index, m.last_applied.map(|l| l.index), &matched)
        && replication
            .keys()
            .filter(|peer| **peer != me)
            .all(|peer| commit_known(m.last_log_index, acked(*peer), up_since(*peer)))
}

/// Whether `leader`, whom a follower's vote names, has left the group: the
/// membership the follower has was written by it, in its term, without it
/// as a voter (it stepped down once that committed). A membership from an
/// earlier term says nothing: the follower may lag behind the one that
/// made `leader` a voter.
pub fn leader_left(m: &Metrics, leader: NodeId) -> bool {
    let config = &m.membership_config;
    let written_by = config.log_id().as_ref().map(|id| (id.leader_id.term, id.leader_id.node_id));
    written_by == Some((m.current_term, leader)) && !config.membership().voter_ids().any(|v| v == leader)
}

/// What a follower replica knows when deciding whether to campaign.
#[derive(Debug, Clone, Copy)]
pub struct FollowerView {
    /// A voter, and no reason to hold back (clock, fault injection).
    pub may_campaign: bool,
    /// The leader it knows (not itself).
    pub leader: Option<NodeId>,
    pub leaderless_for: Duration,
    /// Since the leader's node last answered the liveness probe, or the
    /// leader was last heard in this group, whichever is later.
    pub leader_silent_for: Duration,
    /// The leader's node restarted and its leader was not heard since.
    pub leader_restarted: bool,
    /// A candidate was refused here for its shorter log lately, and the
    /// leader has not been heard in this group for an election timeout.
    pub rival_refused: bool,
}

/// Why a follower campaigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Campaign {
    NoLeader,
    LeaderSilent,
    LeaderRestarted,
    /// A peer campaigns and cannot win: this replica has the longer log.
    RivalRefused,
}

/// Whether (and why) a follower should campaign now.
pub fn campaign(v: &FollowerView, t: &Timing) -> Option<Campaign> {
    if !v.may_campaign {
        return None;
    }
    match v.leader {
        None => (v.leaderless_for >= t.leaderless).then_some(Campaign::NoLeader),
        Some(_) if v.leader_restarted => Some(Campaign::LeaderRestarted),
        Some(_) if v.rival_refused => Some(Campaign::RivalRefused),
        Some(_) => (v.leader_silent_for >= t.leader_silence).then_some(Campaign::LeaderSilent),
    }
}

/// What [`QuietGroups`] remembers of one replica between rounds.
#[derive(Debug, Default)]
struct Watch {
    /// Leading: the (term, last log index) seen, and since when, caught up.
    steady: Option<((u64, Option<u64>), Instant)>,
    rested_at: Option<Instant>,
    /// Following: since when no leader is known.
    leaderless_since: Option<Instant>,
    /// The leader (and term) followed, and its node's boot id then.
    leader_boot: Option<(NodeId, u64, u64)>,
    /// When this replica campaigns, if the reason still holds.
    campaign_at: Option<Instant>,
}

/// The node's task that rests idle groups it leads and campaigns for the
/// groups it follows (see the module documentation).
pub struct QuietGroups {
    pub me: NodeId,
    pub registry: Arc<Registry>,
    pub liveness: Arc<Liveness>,
    pub timing: Timing,
}

impl QuietGroups {
    /// Runs until `stop` turns true (or its sender is dropped).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut watches: BTreeMap<GroupId, Watch> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.timing.round) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let replicas = self.registry.all();
            watches.retain(|gid, _| replicas.iter().any(|r| r.gid == *gid));
            for replica in replicas {
                let watch = watches.entry(replica.gid).or_default();
                let m = replica.raft.metrics().borrow().clone();
                match m.state {
                    ServerState::Leader => self.lead(&replica, &m, watch),
                    _ => self.follow(&replica, &m, watch).await,
                }
            }
        }
    }

    /// Whether the leader `replica`'s followers all hold its whole log and
    /// know it committed, and it applied it: nothing is left to send.
    fn leader_caught_up(&self, replica: &Replica, m: &Metrics) -> bool {
        leader_caught_up(
            self.me,
            m,
            |peer| replica.acks.commit_acked(peer),
            |peer| self.liveness.peer(peer).map(|p| p.up_since),
        )
    }

    fn lead(&self, replica: &Replica, m: &Metrics, w: &mut Watch) {
        let now = Instant::now();
        (w.leaderless_since, w.leader_boot, w.campaign_at) = (None, None, None);
        replica.elect.set_timer(false);
        let caught_up = self.leader_caught_up(replica, m);
        let seen = (m.current_term, m.last_log_index);
        let steady_since = match w.steady {
            Some((s, since)) if caught_up && s == seen => since,
            _ => now,
        };
        w.steady = caught_up.then_some((seen, steady_since));
        let heartbeats = &replica.heartbeats;
        // A follower that came up lately may not have heard the commit
        // index yet: heartbeats to it can fail for a while after its
        // restart (reconnect backoff) although the leader's view of its
        // log is whole, so the group stays awake for a while after.
        let up_lately = self.follower_came_up(m, now.checked_sub(self.timing.awake_after_up));
        if heartbeats.is_resting() {
            if !caught_up || up_lately || self.follower_came_up(m, w.rested_at) {
                heartbeats.wake();
            }
        } else if !up_lately
            && now - steady_since >= self.timing.rest_after
            && heartbeats.rest(self.timing.rest_after)
        {
            w.rested_at = Some(now);
            tracing::debug!(group = %replica.gid, "idle: heartbeats off");
        }
    }

    /// Whether a member's node came up (a new boot id) since `since`.
    fn follower_came_up(&self, m: &Metrics, since: Option<Instant>) -> bool {
        let Some(since) = since else { return true };
        let membership = m.membership_config.membership();
        membership
            .nodes()
            .filter(|(id, _)| **id != self.me)
            .any(|(id, _)| self.liveness.peer(*id).is_some_and(|p| p.up_since > since))
    }

    async fn follow(&self, replica: &Replica, m: &Metrics, w: &mut Watch) {
        let now = Instant::now();
        w.steady = None;
        if replica.heartbeats.is_resting() {
            // Deposed at rest: heartbeats on for whenever it leads again.
            replica.heartbeats.wake();
        }
        // A leader that has left the group is none: openraft still names
        // it (from the vote), and its node answering the probe would
        // otherwise keep every follower from campaigning.
        let leader = m.current_leader.filter(|l| *l != self.me && !leader_left(m, *l));
        let leaderless_since = match leader {
            Some(_) => None,
            None => Some(*w.leaderless_since.get_or_insert(now)),
        };
        w.leaderless_since = leaderless_since;
        // A campaign that did not win (a split vote) is retried by
        // openraft's own randomized timer, not by rounds of this task: that
        // timer waits longer after a voter answered with a longer log, so
        // that the replica holding it gets to campaign (and win) first.
        //
        // Neither campaigns while a quorum of the group's voters does not
        // answer this node's probes: such a campaign cannot win, and the
        // higher term it sends on every connection that still works would
        // only depose the leader the others elect (openraft 0.9 has no
        // pre-vote). A leader cut off by a one-way link otherwise campaigns
        // on and on, and its terms outrun every election of the others.
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let reachable = quorum_answers(self.me, &voters, |id| {
            self.liveness.silent_for(id, now) < self.timing.leader_silence
        });
        let candidate = m.state == ServerState::Candidate;
        replica.elect.set_timer(candidate && reachable);
        if candidate {
            w.campaign_at = None;
            return;
        }
        let voter = voters.contains(&self.me);
        let view = FollowerView {
            may_campaign: voter && reachable && replica.elect.may_campaign(),
            leader,
            leaderless_for: leaderless_since.map_or(Duration::ZERO, |s| now - s),
            // The probe's silence, unless the leader was heard in this group
            // since: a node that just started has no probe answer yet, but
            // a replica just sent entries has heard its leader.
            leader_silent_for: leader.map_or(Duration::ZERO, |l| {
                let probe = self.liveness.silent_for(l, now);
                replica.contact.age().map_or(probe, |heard| heard.min(probe))
            }),
            leader_restarted: leader
                .is_some_and(|l| self.leader_restarted(replica, l, m.current_term, w, now)),
            rival_refused: replica.contact.refusal_age().is_some_and(|a| a < self.timing.leaderless)
                && replica.contact.age().is_none_or(|a| a >= self.timing.leader_silence),
        };
        let Some(reason) = campaign(&view, &self.timing) else {
            w.campaign_at = None;
            return;
        };
        let jitter = self.timing.jitter.as_millis() as u64;
        let at = *w.campaign_at.get_or_insert_with(|| now + jitter_ms(jitter));
        if now < at {
            return;
        }
        tracing::info!(group = %replica.gid, ?reason, leader = ?view.leader, "campaigning");
        if let Err(e) = replica.raft.trigger().elect().await {
            tracing::warn!(group = %replica.gid, error = %e, "campaign not started");
        }
        (w.leaderless_since, w.leader_boot, w.campaign_at) = (Some(now), None, None);
    }

    /// Whether `leader`'s node restarted since this replica began to follow
    /// it in `term`, and the leader was not heard since (openraft restores a
    /// leader whose vote was committed; then it leads on, heard again).
    fn leader_restarted(
        &self,
        replica: &Replica,
        leader: NodeId,
        term: u64,
        w: &mut Watch,
        now: Instant,
    ) -> bool {
        let Some(life) = self.liveness.peer(leader).filter(|p| p.boot_id != 0) else { return false };
        let followed = w.leader_boot.filter(|(l, t, _)| (*l, *t) == (leader, term));
        let restarted = followed.is_some_and(|(_, _, boot)| boot != life.boot_id);
        let heard_since =
            replica.contact.age().is_some_and(|age| age < now.saturating_duration_since(life.up_since));
        if !restarted || heard_since {
            w.leader_boot = Some((leader, term, life.boot_id));
            return false;
        }
        true
    }
}

/// Whether a quorum of `voters` answers: this node, and the peers whose
/// nodes are `alive`.
pub(crate) fn quorum_answers(me: NodeId, voters: &[NodeId], alive: impl Fn(NodeId) -> bool) -> bool {
    let answering = voters.iter().filter(|&&id| id == me || alive(id)).count();
    answering * 2 > voters.len()
}

fn jitter_ms(max: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(0..=max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timing() -> Timing {
        (&RaftTuning::default()).into()
    }

    #[test]
    fn a_replica_campaigns_only_while_a_quorum_of_its_voters_answers() {
        let alive = |ids: &'static [NodeId]| move |id| ids.contains(&id);
        assert!(quorum_answers(1, &[1, 2, 3], alive(&[2])), "itself and one peer of three");
        assert!(!quorum_answers(1, &[1, 2, 3], alive(&[])), "a leader cut off from both followers");
        assert!(!quorum_answers(1, &[1, 2, 3, 4], alive(&[2])), "two of four is no quorum");
        assert!(quorum_answers(1, &[1], alive(&[])), "a single voter");
        assert!(!quorum_answers(9, &[1, 2, 3], alive(&[1])), "not a voter: counts only its peers");
    }

    #[test]
    fn a_leader_that_wrote_itself_out_of_the_voters_is_no_leader() {
        // Follower 2's vote names node 3, leader in term 5.
        let follower = |written_by: (u64, NodeId), voters: &[NodeId]| {
            let nodes: BTreeMap<NodeId, BasicNode> =
                voters.iter().chain(&[3]).map(|n| (*n, BasicNode::new("http://n"))).collect();
            let membership = openraft::Membership::new(vec![voters.iter().copied().collect()], nodes);
            let leader_id = openraft::CommittedLeaderId::new(written_by.0, written_by.1);
            let log_id = openraft::LogId::new(leader_id, 10);
            let mut m = Metrics::new_initial(2);
            m.current_term = 5;
            m.membership_config = Arc::new(openraft::StoredMembership::new(Some(log_id), membership));
            m
        };
        assert!(leader_left(&follower((5, 3), &[1, 2, 4]), 3), "node 3 finished a change removing itself");
        assert!(!leader_left(&follower((5, 3), &[1, 2, 3]), 3), "still a voter");
        assert!(
            !leader_left(&follower((4, 1), &[1, 2, 4]), 3),
            "an older term's membership: this replica lags"
        );
        assert!(!leader_left(&follower((5, 1), &[1, 2, 4]), 3), "written by another node");
    }

    #[test]
    fn a_leader_rests_only_once_each_follower_acknowledged_the_commit_index_since_it_came_up() {
        let t0 = Instant::now();
        assert!(commit_known(None, None, None), "an empty log");
        assert!(!commit_known(Some(7), None, None), "never acknowledged");
        assert!(!commit_known(Some(7), Some((6, t0)), None), "an older commit index");
        assert!(commit_known(Some(7), Some((7, t0)), None));
        assert!(commit_known(Some(7), Some((7, t0 + MS)), Some(t0)), "acknowledged after it came up");
        assert!(!commit_known(Some(7), Some((7, t0)), Some(t0 + MS)), "its node restarted since");

        // As openraft reports it, leader 1's replication lists itself:
        // only its followers need to have acknowledged.
        let log_id = |index| openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), index);
        let mut m = Metrics::new_initial(1);
        m.last_log_index = Some(7);
        m.last_applied = Some(log_id(7));
        m.replication = Some([1, 2, 3].into_iter().map(|n| (n, Some(log_id(7)))).collect());
        let up = |_| None;
        assert!(leader_caught_up(1, &m, |_| Some((7, t0)), up), "followers acknowledged 7");
        assert!(!leader_caught_up(1, &m, |n| (n == 2).then_some((7, t0)), up), "node 3 did not");
        assert!(!leader_caught_up(1, &m, |_| Some((6, t0)), up), "an older commit index");
        m.replication = Some(BTreeMap::from([(1, Some(log_id(7)))]));
        assert!(leader_caught_up(1, &m, |_| None, up), "a group of one");
    }

    #[test]
    fn a_leader_is_caught_up_when_every_follower_and_its_state_hold_the_log() {
        assert!(caught_up(Some(7), Some(7), &[Some(7), Some(7)]));
        assert!(!caught_up(Some(7), Some(7), &[Some(7), Some(6)]), "a follower behind");
        assert!(!caught_up(Some(7), Some(7), &[Some(7), None]), "a follower not heard yet");
        assert!(!caught_up(Some(7), Some(6), &[Some(7), Some(7)]), "the last entry not applied");
    }

    #[test]
    fn a_group_rests_only_after_its_last_proposal_is_old_enough() {
        let t0 = Instant::now();
        let idle = 500 * MS;
        let mut s = Switch::new(t0);
        assert!(!s.rest(t0 + 400 * MS, idle));
        s.begin();
        assert!(!s.rest(t0 + 900 * MS, idle), "a proposal in flight");
        s.end(t0 + 1000 * MS);
        assert!(s.heartbeats());
        assert!(!s.rest(t0 + 1400 * MS, idle));
        assert!(s.rest(t0 + 1500 * MS, idle));
        assert!(!s.heartbeats());
        s.begin();
        assert!(s.heartbeats(), "a proposal wakes it before it is proposed");
        s.end(t0 + 1600 * MS);
        assert!(s.rest(t0 + 2100 * MS, idle));
        s.wake(t0 + 3000 * MS);
        assert!(s.heartbeats());
        assert!(!s.rest(t0 + 3400 * MS, idle), "awake for the idle time at least");
    }

    #[test]
    fn a_transfer_holds_heartbeats_off_whatever_the_activity() {
        let mut s = Switch::new(Instant::now());
        s.held_off = true;
        s.begin();
        assert!(!s.heartbeats());
        s.held_off = false;
        assert!(s.heartbeats());
    }

    fn following(leader: Option<NodeId>) -> FollowerView {
        FollowerView {
            may_campaign: true,
            leader,
            leaderless_for: Duration::ZERO,
            leader_silent_for: 300 * MS,
            leader_restarted: false,
            rival_refused: false,
        }
    }

    #[test]
    fn a_follower_of_a_live_leader_does_not_campaign() {
        assert_eq!(campaign(&following(Some(2)), &timing()), None);
    }

    #[test]
    fn a_follower_campaigns_when_the_leaders_node_is_silent_or_restarted() {
        let t = timing();
        let silent = FollowerView { leader_silent_for: t.leader_silence, ..following(Some(2)) };
        assert_eq!(campaign(&silent, &t), Some(Campaign::LeaderSilent));
        let restarted = FollowerView { leader_restarted: true, ..following(Some(2)) };
        assert_eq!(campaign(&restarted, &t), Some(Campaign::LeaderRestarted));
    }

    #[test]
    fn a_follower_that_refused_a_shorter_log_campaigns_though_the_leaders_node_answers() {
        let t = timing();
        let view = FollowerView { rival_refused: true, ..following(Some(2)) };
        assert_eq!(campaign(&view, &t), Some(Campaign::RivalRefused));
        let held = FollowerView { may_campaign: false, ..view };
        assert_eq!(campaign(&held, &t), None);
    }

    #[test]
    fn a_follower_without_a_leader_waits_an_election_timeout() {
        let t = timing();
        let young = FollowerView { leaderless_for: t.leaderless - MS, ..following(None) };
        assert_eq!(campaign(&young, &t), None);
        let old = FollowerView { leaderless_for: t.leaderless, ..following(None) };
        assert_eq!(campaign(&old, &t), Some(Campaign::NoLeader));
    }

    #[test]
    fn nothing_campaigns_while_held_back() {
        let t = timing();
        let view = FollowerView { may_campaign: false, leader_restarted: true, ..following(Some(2)) };
        assert_eq!(campaign(&view, &t), None);
        let view = FollowerView { may_campaign: false, leaderless_for: 10 * t.leaderless, ..following(None) };
        assert_eq!(campaign(&view, &t), None);
    }

    #[test]
    fn timing_follows_the_tuning() {
        let t = timing();
        assert_eq!((t.round, t.rest_after), (250 * MS, 500 * MS));
        assert_eq!((t.leader_silence, t.leaderless, t.jitter), (1000 * MS, 2000 * MS, 1000 * MS));
    }
}
