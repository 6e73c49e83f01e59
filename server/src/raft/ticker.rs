//! Time-driven tags: one task for the whole node. Every tick interval it
//! looks at each shard this node leads (their rounds run concurrently) and,
//! when a user's wake time has come in that shard's timer index, proposes a
//! `Command::Tick` stamped with its clock in that shard's log. Every
//! replica of the shard then re-evaluates exactly the due users when it
//! applies the tick.
//!
//! Each proposal takes a pass from the [`ProposalGate`] first; while a
//! leadership transfer holds proposals off, the round is skipped. So is a
//! shard that still applies by an older apply rules version than the
//! cluster's (its leader proposes the new version first: see
//! `portrait_core::rules`): a tick or re-evaluation applied by rules its
//! replicas' builds may no longer have would stop them.
//!
//! Each shard's round runs as a task of its own, and a shard whose round is
//! still running is not started again: a round waits on raft, and a leader
//! that lost its quorum never commits (openraft 0.9 leaders do not step
//! down), so waiting for every round would stop the ticks of every other
//! shard the node leads. A round is cut after [`ROUND_LIMIT`] (what it
//! proposed may still commit later: a tick or a re-evaluation batch
//! applied late or twice changes nothing more).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use portrait_core::meta::MetaState;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::gate::ProposalGate;
use super::liveness::Liveness;
use super::replica::Registry;
use super::stamp::Stamper;
use crate::store::apply::first_timer;
use crate::store::GroupState;
use crate::types::{Command, CommandResult, GroupId, Raft};

/// A round still running after this is cut short.
const ROUND_LIMIT: Duration = Duration::from_secs(60);

/// Runs the ticker until `stop` turns true; the rounds running then are
/// cancelled. `cluster` is the meta group's applied state (the cluster's
/// apply rules version).
pub async fn run(
    registry: Arc<Registry>,
    cluster: watch::Receiver<Arc<MetaState>>,
    interval: Duration,
    quorum: QuorumSight,
    mut stop: watch::Receiver<bool>,
) {
    let mut rounds = Rounds::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let rules = cluster.borrow().rules();
        for replica in registry.all().into_iter().filter(|r| r.is_leader()) {
            let gid = replica.gid;
            if gid != GroupId::META && behind_rules(replica.sm.rules(), rules) {
                tracing::debug!(group = %gid, "no tick round: the shard has not taken the cluster's apply rules yet");
                continue;
            }
            if let Some((voters, answering)) =
                replica.quorum_out_of_sight(quorum.me, &quorum.liveness, quorum.within)
            {
                tracing::debug!(group = %gid, ?voters, ?answering, "no tick round: no quorum answers this leader");
                continue;
            }
            rounds.start(gid, async move {
                let r = &replica;
                if tokio::time::timeout(ROUND_LIMIT, round(&r.raft, &r.sm, &r.gate, &r.stamper))
                    .await
                    .is_err()
                {
                    tracing::debug!(group = %r.gid, "tick round cut short: not committed (no quorum?)");
                }
            });
        }
    }
}

/// What tells a leader cut off from its quorum (see
/// [`super::replica::Replica::quorum_out_of_sight`]): it proposes no tick
/// round, whose entries would wait in its log for the cut to end.
pub struct QuorumSight {
    /// This node.
    pub me: crate::types::NodeId,
    pub liveness: Arc<Liveness>,
    /// `RaftTuning::quorum_unheard_after`.
    pub within: Duration,
}

/// The shards' rounds running: at most one per shard. Dropping it cancels
/// them.
#[derive(Default)]
struct Rounds {
    tasks: JoinSet<()>,
    shard_of: HashMap<tokio::task::Id, GroupId>,
}

impl Rounds {
    /// Starts `round` for `gid` unless its last round is still running;
    /// says whether it started it.
    fn start(&mut self, gid: GroupId, round: impl Future<Output = ()> + Send + 'static) -> bool {
        while let Some(done) = self.tasks.try_join_next_with_id() {
            let id = match done {
                Ok((id, ())) => id,
                Err(e) => e.id(),
            };
            self.shard_of.remove(&id);
        }
        if self.shard_of.values().any(|&g| g == gid) {
            return false;
        }
        let task = self.tasks.spawn(round);
        self.shard_of.insert(task.id(), gid);
        true
    }
}

/// Whether a shard applying by rules version `shard` must wait for the
/// cluster's `cluster` before it takes ticks and re-evaluations.
fn behind_rules(shard: u32, cluster: u32) -> bool {
    shard < cluster
}

/// One leader round: re-evaluation batches, then ticks while timers are due.
async fn round(raft: &Raft, sm: &GroupState, gate: &ProposalGate, stamper: &Stamper) {
    reevaluate(raft, sm, gate, stamper).await;
    // Drain: a tick handles a bounded number of users.
    loop {
        let now = match stamper.stamp() {
            Ok(stamp) => stamp,
            Err(e) => return tracing::debug!(error = %e, "no tick: the clock is refused"),
        };
        match first_timer(&sm.db(), sm.gid()) {
            Ok(Some(t)) if t <= now => {}
            Ok(_) => return,
            Err(e) => return tracing::warn!(error = %e, "reading the timer index"),
        }
        let Some(_pass) = gate.try_pass() else { return };
        match raft.client_write(Command::Tick { stamp_ms: now }).await {
            Ok(resp) if matches!(resp.data, CommandResult::Ticked { users: 0 }) => return,
            Ok(_) => {}
            Err(e) => return tracing::debug!(error = %e, "tick not committed"),
        }
    }
}

/// Users per `Reevaluate` entry.
const REEVAL_BATCH: u32 = 500;
/// `Reevaluate` entries per ticker round, so ingest keeps its share.
const REEVAL_ROUNDS: usize = 20;

/// Drives the background re-evaluation after a schema change.
async fn reevaluate(raft: &Raft, sm: &GroupState, gate: &ProposalGate, stamper: &Stamper) {
    for _ in 0..REEVAL_ROUNDS {
        let progress = match sm.reeval_progress() {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => return tracing::warn!(error = %e, "reading re-evaluation progress"),
        };
        // Only now: a pass wakes a group at rest (see `super::quiet`).
        let Some(_pass) = gate.try_pass() else { return };
        let stamp_ms = match stamper.stamp() {
            Ok(stamp) => stamp,
            Err(e) => return tracing::debug!(error = %e, "no re-evaluation: the clock is refused"),
        };
        let command = Command::Reevaluate {
            stamp_ms,
            version: progress.version,
            after: progress.cursor,
            limit: REEVAL_BATCH,
        };
        if let Err(e) = raft.client_write(command).await {
            return tracing::debug!(error = %e, "re-evaluation batch not committed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_shard_behind_the_cluster_s_rules_takes_no_round() {
        assert!(behind_rules(1, 2));
        assert!(!behind_rules(2, 2));
        assert!(!behind_rules(3, 2), "a shard ahead of this node's view of the cluster is not held back");
    }

    #[tokio::test]
    async fn a_round_that_never_commits_holds_back_no_other_shard_and_is_not_started_twice() {
        let mut rounds = Rounds::default();
        let done = Arc::new(AtomicUsize::new(0));
        for interval in 0..5 {
            // Shard 0's round waits forever (its leader lost its quorum).
            let started = rounds.start(GroupId(0), std::future::pending());
            assert_eq!(started, interval == 0, "interval {interval}: shard 0 is still running");
            let counter = done.clone();
            assert!(rounds.start(GroupId(1), async move {
                counter.fetch_add(1, Ordering::SeqCst);
            }));
            // Let shard 1's round run to its end.
            while done.load(Ordering::SeqCst) <= interval {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(done.load(Ordering::SeqCst), 5, "shard 1 ticked at every interval");
        assert_eq!(rounds.shard_of.len(), 2, "shard 1's last round is reaped at the next start");
    }
}
