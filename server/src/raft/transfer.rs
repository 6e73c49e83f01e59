//! Leadership transfer (`Admin.TransferLeader`), run by the leader.
//!
//! openraft 0.9 has no transfer call, and simply asking the target to
//! campaign fails under load, for two reasons:
//! - a voter refuses to vote while its **leader lease** holds, i.e. for
//!   `election_timeout_max` after it last heard from the leader, and every
//!   AppendEntries (an entry, a commit index, a heartbeat) renews it;
//! - a voter refuses a candidate whose log is behind its own, and under
//!   load the leader's log moves on every few milliseconds.
//!
//! So the leader makes itself quiet first:
//!
//! 1. it checks the target (a voter, reachable, in this term: a dry-run
//!    `Raft.StartElection`);
//! 2. it waits until the target has the log as it was when the transfer
//!    began, so that the pause below stays short;
//! 3. it pauses proposals ([`ProposalGate`]): those in flight finish, new
//!    ones wait;
//! 4. it waits until the target and a quorum hold every entry (then nothing
//!    is left to send but heartbeats, and the commit index is final);
//! 5. it turns heartbeats off;
//! 6. it sleeps one leader lease plus a margin: every follower's lease has
//!    lapsed, but none has started an election of its own yet, since a
//!    follower campaigns only `lease + election timeout` after it last heard
//!    from the leader (`election_timeout_min` at the earliest; with quiet
//!    idle groups a follower campaigns only once the leader's node stops
//!    answering the liveness probe, see [`super::quiet`]);
//! 7. it asks the target to campaign (`Raft.StartElection`): the target's
//!    log is as long as anyone's and no lease holds, so the voters grant it,
//!    the old leader included, which steps down;
//! 8. it waits until it follows the target.
//!
//! Heartbeats and proposals resume whatever happens: they are restored by
//! guards dropped on success, on error, on timeout and when the call is
//! cancelled. Writes that waited at the gate then go on and reach the new
//! leader by the usual redirect. No acknowledged write can be lost: the
//! transfer never touches the log, and the new leader is elected by an
//! ordinary raft election, which only a candidate holding every committed
//! entry can win.

use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, RaftMetrics, ServerState};
use portrait_proto::v1::StartElectionRequest;

use super::gate::ProposalGate;
use super::network::{Blocked, ElectionPeer};
use super::quiet::HeartbeatSwitch;
use super::RaftTuning;
use crate::error::{Error, Result};
use crate::types::{GroupId, NodeId, Raft};

type Metrics = RaftMetrics<NodeId, BasicNode>;

/// How long the target may take to catch up before proposals are paused.
const CATCH_UP: Duration = Duration::from_secs(10);
/// How long the last entries may take to reach the target and a quorum once
/// proposals are paused.
const SETTLE: Duration = Duration::from_secs(5);

/// Runs transfers on the leader (one at a time).
pub struct LeaderTransfer {
    me: NodeId,
    group: GroupId,
    raft: Raft,
    gate: ProposalGate,
    heartbeats: Arc<HeartbeatSwitch>,
    blocked: Blocked,
    tuning: RaftTuning,
    running: tokio::sync::Mutex<()>,
    /// Paces the handovers the node starts ([`LeaderTransfer::hand_over`]).
    pacing: std::sync::Mutex<Pacing>,
}

/// After a failed handover, placement waits this long before the next
/// (doubling per failure up to [`HANDOVER_BACKOFF_MAX`]): a failure past
/// step 3 has paused the group's writes for up to several seconds, and the
/// placement pass comes every 250 ms.
const HANDOVER_BACKOFF_MIN: Duration = Duration::from_secs(1);
const HANDOVER_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Consecutive failed handovers (in one term) and when the next may start.
#[derive(Debug, Default)]
struct Pacing {
    failures: u32,
    next: Option<std::time::Instant>,
    term: u64,
}

impl Pacing {
    /// Whether a handover may start at `now` in `term`; if not, how long
    /// until it may. A new term starts afresh (a node leading again later
    /// inherits no old wait).
    fn ready(&mut self, now: std::time::Instant, term: u64) -> std::result::Result<(), Duration> {
        if term != self.term {
            *self = Pacing { term, ..Pacing::default() };
        }
        match self.next {
            Some(next) if next > now => Err(next - now),
            _ => Ok(()),
        }
    }

    /// Records a handover's outcome at `now`: `paused_writes` false for a
    /// failure before the pause (nothing was held up), which is not paced.
    fn record(&mut self, ok: bool, paused_writes: bool, now: std::time::Instant) {
        if ok {
            *self = Pacing { term: self.term, ..Pacing::default() };
            return;
        }
        if !paused_writes {
            return;
        }
        self.failures = self.failures.saturating_add(1);
        let doublings = self.failures.saturating_sub(1).min(16);
        let wait = HANDOVER_BACKOFF_MIN.saturating_mul(1 << doublings).min(HANDOVER_BACKOFF_MAX);
        self.next = Some(now + wait);
    }
}

impl LeaderTransfer {
    pub fn new(
        me: NodeId,
        group: GroupId,
        raft: Raft,
        gate: ProposalGate,
        heartbeats: Arc<HeartbeatSwitch>,
        blocked: Blocked,
        tuning: RaftTuning,
    ) -> Self {
        let running = tokio::sync::Mutex::new(());
        let pacing = std::sync::Mutex::default();
        LeaderTransfer { me, group, raft, gate, heartbeats, blocked, tuning, running, pacing }
    }

    /// A handover placement starts (this leader is leaving the group):
    /// [`LeaderTransfer::run`], unless the last one failed lately after
    /// pausing the group's writes. After such a failure the next waits
    /// 1 s, doubling per failure up to 30 s within a term (UNAVAILABLE
    /// meanwhile). Not paced: an operator's `TransferLeader`, and the
    /// handover of a leader whose clock is off (it takes no writes until
    /// it has handed over).
    pub async fn hand_over(&self, target: NodeId, addr: &str) -> Result<()> {
        let now = std::time::Instant::now();
        let term = self.raft.metrics().borrow().current_term;
        if let Err(wait) = self.pacing.lock().expect("pacing").ready(now, term) {
            return Err(Error::Unavailable(format!(
                "the last handover of {} failed; the next is tried in {} ms",
                self.group,
                wait.as_millis()
            )));
        }
        let mut paused = false;
        let outcome = self.run_noting_pause(target, addr, &mut paused).await;
        self.pacing.lock().expect("pacing").record(outcome.is_ok(), paused, std::time::Instant::now());
        outcome
    }

    /// Moves leadership from this node (the leader) to voter `target` at
    /// `addr`; returns once this node follows it. The caller has checked
    /// that `target` is another voter.
    pub async fn run(&self, target: NodeId, addr: &str) -> Result<()> {
        self.run_noting_pause(target, addr, &mut false).await
    }

    /// [`LeaderTransfer::run`]; `paused` turns true once proposals are
    /// paused (step 3).
    async fn run_noting_pause(&self, target: NodeId, addr: &str, paused: &mut bool) -> Result<()> {
        let Ok(_running) = self.running.try_lock() else {
            return Err(Error::Unavailable("a leadership transfer is already in progress".into()));
        };
        let start = self.raft.metrics().borrow().clone();
        let term = start.current_term;
        let request = |last_log_index, dry_run| StartElectionRequest {
            leader_id: self.me,
            term,
            last_log_index,
            dry_run,
            group: self.group.0,
        };
        // 1. The target is reachable and a voter in this term.
        let mut peer = ElectionPeer::connect(target, addr, self.blocked.clone()).await?;
        peer.start_election(request(0, true)).await?;
        // 2. Catch up before pausing, so writes wait for as short as possible.
        let goal = start.last_log_index.unwrap_or(0);
        let behind = |m: &Metrics| {
            Error::DeadlineExceeded(format!(
                "node_id: node {target} did not catch up within {} s (it has entries up to {}, the leader \
                 up to {}); retry when it has",
                CATCH_UP.as_secs(),
                matched(m, target),
                m.last_log_index.unwrap_or(0)
            ))
        };
        self.wait_log(term, target, CATCH_UP, |m| matched(m, target) >= goal, behind).await?;
        // 3. From here on this node proposes nothing.
        let pause_within = Duration::from_millis(self.tuning.write_timeout_ms) + Duration::from_secs(1);
        let _pause = self.gate.pause(pause_within).await?;
        *paused = true;
        // 4. Everything proposed so far reaches the target and a quorum.
        let unsettled = |_: &Metrics| {
            Error::DeadlineExceeded(format!(
                "the last entries did not reach node {target} and a quorum within {} s; leadership was \
                 not transferred",
                SETTLE.as_secs()
            ))
        };
        let settled = |m: &Metrics| {
            let last = m.last_log_index.unwrap_or(0);
            matched(m, target) == last && quorum_matched(m, last)
        };
        let last = self.wait_log(term, target, SETTLE, settled, unsettled).await?.last_log_index.unwrap_or(0);
        // 5 and 6. Quiet for one lease; the guard turns heartbeats back on.
        let _quiet = self.heartbeats.hold_off();
        tokio::time::sleep(quiet_time(&self.tuning)).await;
        self.check_still_quiet(term, target, last)?;
        // 7. The target campaigns.
        peer.start_election(request(last, false)).await?;
        // 8. This node follows it.
        self.wait_follow(target).await
    }

    /// Waits until `done` holds while this node still leads in `term`; on
    /// timeout, the error `timed_out` makes of the last metrics.
    async fn wait_log(
        &self,
        term: u64,
        target: NodeId,
        within: Duration,
        done: impl Fn(&Metrics) -> bool,
        timed_out: impl FnOnce(&Metrics) -> Error,
    ) -> Result<Metrics> {
        let answer = watch(&self.raft, within, |m| {
            if m.state != ServerState::Leader || m.current_term != term {
                Some(Err(lost_leadership(target)))
            } else if done(m) {
                Some(Ok(m.clone()))
            } else {
                None
            }
        })
        .await;
        answer.unwrap_or_else(|| Err(timed_out(&self.raft.metrics().borrow())))
    }

    /// After the quiet time: nothing was appended meanwhile (e.g. by a write
    /// that had timed out at its caller but was still queued), or the
    /// target's vote would be refused; and this node still leads.
    fn check_still_quiet(&self, term: u64, target: NodeId, last: u64) -> Result<()> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || m.current_term != term {
            return Err(lost_leadership(target));
        }
        if m.last_log_index.unwrap_or(0) != last || matched(&m, target) != last {
            return Err(Error::Unavailable(format!(
                "an entry was appended during the hand-off (log {} → {}); leadership was not \
                 transferred, retry",
                last,
                m.last_log_index.unwrap_or(0)
            )));
        }
        Ok(())
    }

    /// Waits until this node follows `target`.
    async fn wait_follow(&self, target: NodeId) -> Result<()> {
        let within = Duration::from_millis(2 * self.tuning.election_timeout_max_ms) + Duration::from_secs(1);
        let me = self.me;
        let outcome = watch(&self.raft, within, |m| match m.current_leader {
            Some(l) if l == target && m.state != ServerState::Leader => Some(Ok(())),
            Some(l) if l != target && l != me => Some(Err(Error::Unavailable(format!(
                "node {l} won the election instead of node {target}; retry the transfer"
            )))),
            _ => None,
        })
        .await;
        outcome.unwrap_or_else(|| {
            let m = self.raft.metrics().borrow().clone();
            let now = match m.current_leader {
                Some(l) if l == me && m.state == ServerState::Leader => format!("node {me} still leads"),
                Some(l) => format!("node {l} leads"),
                None => "no leader is known yet".into(),
            };
            Err(Error::DeadlineExceeded(format!(
                "node {target} did not become leader within {} ms ({now})",
                within.as_millis()
            )))
        })
    }
}

/// One leader lease (`election_timeout_max`) plus a margin for messages
/// still in flight, well before `lease + election_timeout_min - heartbeat`,
/// the earliest a follower that heard the last heartbeat campaigns (with the
/// defaults: 2,250 ms, against 2,750 ms).
fn quiet_time(t: &RaftTuning) -> Duration {
    let margin = t.election_timeout_min_ms.saturating_sub(t.heartbeat_ms) / 3;
    Duration::from_millis(t.election_timeout_max_ms + margin)
}

fn lost_leadership(target: NodeId) -> Error {
    Error::Unavailable(format!(
        "this node stopped leading during the transfer to node {target}; see ClusterStatus for the leader"
    ))
}

/// The last log index the leader knows `id` holds (0 if unknown).
pub fn matched(m: &Metrics, id: NodeId) -> u64 {
    m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index).unwrap_or(0)
}

/// A majority of the voters hold the log up to `index`.
fn quorum_matched(m: &Metrics, index: u64) -> bool {
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let holding = voters.iter().filter(|&&v| matched(m, v) >= index).count();
    holding > voters.len() / 2
}

/// Waits (at most `within`) until `check` gives an answer.
async fn watch<T>(raft: &Raft, within: Duration, mut check: impl FnMut(&Metrics) -> Option<T>) -> Option<T> {
    let mut rx = raft.metrics();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let answer = check(&rx.borrow_and_update());
        if answer.is_some() {
            return answer;
        }
        if !matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(()))) {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_handovers_back_off_doubling_to_a_cap_and_a_success_resets_the_pace() {
        let t0 = std::time::Instant::now();
        let mut p = Pacing::default();
        assert_eq!(p.ready(t0, 1), Ok(()));
        let mut waits = Vec::new();
        for _ in 0..7 {
            p.record(false, true, t0);
            waits.push(p.ready(t0, 1).unwrap_err().as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert!(p.ready(t0 + Duration::from_secs(29), 1).is_err());
        assert_eq!(p.ready(t0 + Duration::from_secs(30), 1), Ok(()));
        p.record(true, false, t0);
        assert_eq!(p.ready(t0, 1), Ok(()));
        p.record(false, true, t0);
        assert_eq!(p.ready(t0, 1).unwrap_err(), Duration::from_secs(1));
        // Many failures never overflow the shift.
        for _ in 0..100 {
            p.record(false, true, t0);
        }
        assert_eq!(p.ready(t0, 1).unwrap_err(), HANDOVER_BACKOFF_MAX);
        // A new term starts afresh.
        assert_eq!(p.ready(t0, 2), Ok(()));
        // A failure before the pause held nothing up: not paced.
        p.record(false, false, t0);
        assert_eq!(p.ready(t0, 2), Ok(()));
    }

    #[test]
    fn quiet_time_falls_between_lease_expiry_and_the_first_follower_election() {
        let t = RaftTuning::default();
        let quiet = quiet_time(&t).as_millis() as u64;
        // Every lease (measured from the last message) has lapsed...
        assert!(quiet > t.election_timeout_max_ms);
        // ...and a follower that heard the last heartbeat has not campaigned yet.
        assert!(quiet < t.election_timeout_max_ms + t.election_timeout_min_ms - t.heartbeat_ms);
    }
}
