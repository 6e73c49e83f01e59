//! Snapshots and log retention by bytes. openraft's own policies count
//! entries (`snapshot_every_entries`, `keep_logs_after_snapshot`), and an
//! entry may hold 4 MiB (or one 16 MiB request): 20,000 entries between
//! snapshots could be 80 GB of log. This task watches raft's data metrics
//! and the log's byte ledger ([`LogBytes`]) and
//! - asks for a snapshot once the entries after the last snapshot hold
//!   `snapshot_every_bytes`;
//! - once a snapshot exists, asks openraft to purge the log behind it down
//!   to `keep_logs_after_snapshot` entries or `keep_log_bytes_after_snapshot`
//!   bytes, whichever keeps less (openraft still keeps what a replication in
//!   flight needs, and purges no entry that is not in the snapshot; its own
//!   purging by entries is off: `max_in_snapshot_log_to_keep` is `u64::MAX`);
//! - on a group's leader, holds the log for members catching up (learners:
//!   replicas being added or moved in; and any member that has matched
//!   nothing yet while its node answers the liveness probe): no entry such a member still needs (after its matched
//!   index; for one that has matched nothing, such as a new replica being
//!   sent a snapshot, nothing past what is purged now) is purged while the
//!   log after the hold point is at most `CATCH_UP_HOLD` times
//!   `keep_log_bytes_after_snapshot`.
//!   Without it, a replica that receives a snapshot while the writes go on
//!   finds the entries after it purged and needs another, and a move of a
//!   large shard under steady writes may never finish. A member gone for
//!   good holds the log up to that bound only.
//!
//! Whichever bound, entries or bytes, comes first wins. The same task
//! trims the apply cache of a group gone idle ([`IdleTrim`]), and flushes
//! the node's state once the applied log entries its flushed part does not
//! cover hold `max_unflushed_log_bytes`, all shards together (see
//! [`unflushed_bytes`]).
//!
//! One task for the whole node looks at every group it hosts every
//! [`POLL`]; it ends when the node stops it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::liveness::Liveness;
use super::replica::{Registry, Replica};
use super::RaftTuning;
use crate::store::log_bytes::LogBytes;
#[cfg(doc)]
use crate::store::state_machine::IdleTrim;
use crate::types::{GroupId, NodeId};

/// How often the groups' logs are looked at: appending 256 MiB takes
/// seconds, so a snapshot asked for up to this late changes nothing.
const POLL: Duration = Duration::from_millis(200);

/// The log held for members catching up is at most this many times
/// `keep_log_bytes_after_snapshot` (1 GiB by default).
const CATCH_UP_HOLD: u64 = 8;

/// The bounds, from [`RaftTuning`].
#[derive(Debug, Clone, Copy)]
pub struct BytePolicy {
    pub snapshot_every_bytes: u64,
    pub keep_logs_after_snapshot: u64,
    pub keep_log_bytes_after_snapshot: u64,
    pub max_unflushed_log_bytes: u64,
}

impl From<&RaftTuning> for BytePolicy {
    fn from(t: &RaftTuning) -> Self {
        BytePolicy {
            snapshot_every_bytes: t.snapshot_every_bytes,
            keep_logs_after_snapshot: t.keep_logs_after_snapshot,
            keep_log_bytes_after_snapshot: t.keep_log_bytes_after_snapshot,
            max_unflushed_log_bytes: t.max_unflushed_log_bytes,
        }
    }
}

/// What the policy asks raft for.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Snapshot,
    Purge(u64),
}

/// What the task remembers between metrics changes.
#[derive(Debug, Default)]
struct Seen {
    /// The snapshot index when a snapshot was last asked for: no new ask
    /// until the snapshot changes.
    snapshot_asked_at: Option<Option<u64>>,
    /// The last purge asked for.
    purge_asked: u64,
    /// The applied index at the last poll, and the one at which the apply
    /// cache was last trimmed as idle.
    applied: Option<u64>,
    trimmed_at: Option<Option<u64>>,
    /// The index the state's flushed part covered when last read: at or
    /// behind the real one (RocksDB also flushes on its own when its
    /// memtables fill), so the sum of [`unflushed_bytes`] it gives is an
    /// upper bound, read again only when it passes the limit.
    durable: u64,
}

impl Seen {
    /// Whether the group's apply cache is to be trimmed as idle now: its
    /// applied index has not moved since the last poll, and no trim has
    /// been done at that index yet ([`Seen::trimmed`]; a trim that could
    /// not be done is asked for again at the next poll).
    fn trim_due(&mut self, applied: Option<u64>) -> bool {
        let idle = self.applied == applied;
        self.applied = applied;
        idle && self.trimmed_at != Some(applied)
    }

    /// The apply cache was trimmed at `applied`.
    fn trimmed(&mut self, applied: Option<u64>) {
        self.trimmed_at = Some(applied);
    }

    /// `hold`: on a leader, the newest index every member already has (or,
    /// for a member that has nothing yet, what is purged now): purging past
    /// it is put off while the log after it is small enough. `applied`: the
    /// state machine's applied index; nothing past it is ever purged (after
    /// a restart the state machine is back at its last flush, behind the
    /// snapshot, and re-applies the entries after it from the log).
    fn decide(
        &mut self,
        policy: BytePolicy,
        log: &LogBytes,
        snapshot: Option<u64>,
        hold: Option<u64>,
        applied: Option<u64>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.snapshot_asked_at.is_some_and(|at| at != snapshot) {
            self.snapshot_asked_at = None;
        }
        if self.snapshot_asked_at.is_none() && log.bytes_after(snapshot) >= policy.snapshot_every_bytes {
            self.snapshot_asked_at = Some(snapshot);
            actions.push(Action::Snapshot);
        }
        let purge = snapshot.zip(applied).and_then(|(s, applied)| {
            let s = s.min(applied);
            let by_entries = s.checked_sub(policy.keep_logs_after_snapshot).filter(|&u| u > 0);
            let by_bytes = log.keep_bytes_before(s, policy.keep_log_bytes_after_snapshot);
            let upto = by_entries.max(by_bytes)?;
            match hold {
                Some(h) if h < upto => {
                    let held = log.bytes_after(Some(h));
                    match held <= policy.keep_log_bytes_after_snapshot.saturating_mul(CATCH_UP_HOLD) {
                        true => Some(h),
                        false => Some(upto),
                    }
                }
                _ => Some(upto),
            }
        });
        if let Some(upto) = purge.filter(|&upto| upto > self.purge_asked) {
            self.purge_asked = upto;
            actions.push(Action::Purge(upto));
        }
        actions
    }
}

/// The known bytes of the log entries a shard applied after `durable` (the
/// newest index its flushed state covers) through `applied`: what a restart
/// of the node now would apply again from the log. openraft reads that
/// range from the log in one piece when it re-applies it (after a restart,
/// once the leader's commit index arrives), so the node bounds the sum over
/// its shards by flushing the state (one flush covers every group). The
/// memtables' own budget does not bound it: an entry whose events are all
/// duplicates, or that only bumps counters, writes a few bytes of state for
/// kilobytes of log. Entries in the log before the node started are not
/// known (see [`LogBytes`]); they are re-applied, and so flushed, once
/// the sum of the known ones passes the bound.
fn unflushed_bytes(log: &LogBytes, durable: u64, applied: Option<u64>) -> u64 {
    match applied {
        // Two reads of the ledger: an append in between only adds to both.
        Some(applied) if applied > durable => {
            log.bytes_after(Some(durable)).saturating_sub(log.bytes_after(Some(applied)))
        }
        _ => 0,
    }
}

/// Flushes the node's state if its shards' applied, unflushed log entries
/// hold `limit` bytes or more (see [`unflushed_bytes`]). The durable
/// indexes in `seen` are read again first: RocksDB may have flushed on its
/// own.
async fn bound_unflushed(replicas: &[Arc<Replica>], seen: &mut BTreeMap<GroupId, Seen>, limit: u64) {
    let shards = || replicas.iter().filter(|r| r.gid != GroupId::META);
    let sum = |seen: &BTreeMap<GroupId, Seen>| -> u64 {
        shards()
            .map(|r| {
                let durable = seen.get(&r.gid).map_or(0, |s| s.durable);
                unflushed_bytes(&r.log_bytes, durable, r.sm.applied().last_applied.map(|l| l.index))
            })
            .sum()
    };
    let reread = |seen: &mut BTreeMap<GroupId, Seen>| {
        for r in shards() {
            match r.sm.durable_applied() {
                Ok((index, _)) => seen.entry(r.gid).or_default().durable = index,
                Err(e) => {
                    // Left out until it reads again: a flush every poll
                    // would not move an index that cannot be read.
                    let applied = r.sm.applied().last_applied.map_or(0, |l| l.index);
                    seen.entry(r.gid).or_default().durable = applied;
                    tracing::warn!(group = %r.gid, error = %e, "reading the flushed applied index")
                }
            }
        }
    };
    if sum(seen) < limit {
        return;
    }
    reread(seen);
    let unflushed = sum(seen);
    if unflushed < limit {
        return;
    }
    tracing::info!(bytes = unflushed, "applied log entries not covered by a flush of the state: flushing it");
    let Some(first) = shards().next() else { return };
    let sm = first.sm.clone();
    match tokio::task::spawn_blocking(move || sm.persist()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "flushing the state (bounding what a restart re-applies); tried again")
        }
        Err(e) => tracing::error!(error = %e, "flushing the state: the task failed"),
    }
    reread(seen);
}

/// Runs until `stop` turns true; see the module docs.
pub async fn run_until(
    registry: Arc<Registry>,
    policy: BytePolicy,
    liveness: Arc<Liveness>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen: BTreeMap<GroupId, Seen> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let replicas = registry.all();
        bound_unflushed(&replicas, &mut seen, policy.max_unflushed_log_bytes).await;
        for replica in replicas {
            let (raft, log) = (&replica.raft, &replica.log_bytes);
            let snapshot = raft.data_metrics().borrow().snapshot.map(|l| l.index);
            let now = std::time::Instant::now();
            let alive = |id| liveness.silent_for(id, now) < HOLD_FOR_SILENT_UNDER;
            let (hold, applied) = {
                let m = raft.metrics();
                let m = m.borrow();
                (catch_up_hold(&m, alive), m.last_applied.map(|l| l.index))
            };
            let group = seen.entry(replica.gid).or_default();
            if group.trim_due(applied) {
                // Off the runtime's workers: dropping a large cache takes
                // milliseconds.
                let trim = replica.idle_trim.clone();
                if tokio::task::spawn_blocking(move || trim.trim()).await.unwrap_or(false) {
                    group.trimmed(applied);
                }
            }
            if replica.snapshots.take_rebuild() {
                tracing::warn!(group = %replica.gid, "the current snapshot is damaged: building a new one");
                if let Err(e) = raft.trigger().snapshot().await {
                    tracing::debug!(group = %replica.gid, error = %e, "raft stopped: no new snapshot");
                }
            }
            for action in group.decide(policy, log, snapshot, hold, applied) {
                let result = match action {
                    Action::Snapshot => {
                        tracing::info!(
                            group = %replica.gid,
                            bytes = log.bytes_after(snapshot),
                            "log bytes since the snapshot: building one"
                        );
                        raft.trigger().snapshot().await
                    }
                    Action::Purge(upto) => raft.trigger().purge_log(upto).await,
                };
                if let Err(e) = result {
                    tracing::debug!(group = %replica.gid, error = %e, "raft stopped: no log byte policy");
                }
            }
        }
    }
}

/// A member that has matched nothing is held for only while its node
/// answers the liveness probe: a new leader knows no follower's match at
/// first, and a voter whose node is down never answers; holding the log for
/// it would keep up to the `CATCH_UP_HOLD` bound on every shard it votes
/// in, for as long as it is down (it gets a snapshot when it is back).
const HOLD_FOR_SILENT_UNDER: Duration = Duration::from_secs(10);

/// On a leader: the newest index that every learner (a replica being
/// added or moved in) has replicated, and what is purged now if a member
/// whose node is `alive` has replicated nothing yet (it is being sent a
/// snapshot); `None` elsewhere, or when no member is catching up. A voter
/// that fell behind (a node that was down) is not waited for: it gets a
/// snapshot.
fn catch_up_hold(
    m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>,
    alive: impl Fn(NodeId) -> bool,
) -> Option<u64> {
    let replication = m.replication.as_ref()?;
    let purged = m.purged.map_or(0, |l| l.index);
    let membership = m.membership_config.membership();
    let learners: Vec<NodeId> = membership.learner_ids().collect();
    let members = replication.iter().map(|(id, matched)| (*id, matched.map(|l| l.index)));
    hold_point(m.id, purged, members, |id| learners.contains(&id), alive)
}

/// [`catch_up_hold`] on plain values: `members` are `(node, matched index)`.
fn hold_point(
    me: NodeId,
    purged: u64,
    members: impl Iterator<Item = (NodeId, Option<u64>)>,
    learner: impl Fn(NodeId) -> bool,
    alive: impl Fn(NodeId) -> bool,
) -> Option<u64> {
    members
        .filter(|(id, matched)| *id != me && (learner(*id) || (matched.is_none() && alive(*id))))
        .map(|(_, matched)| matched.unwrap_or(purged))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_held_for_learners_and_for_live_members_with_no_match() {
        let hold = |members: &[(NodeId, Option<u64>)], learners: &[NodeId], down: &[NodeId]| {
            hold_point(1, 50, members.iter().copied(), |id| learners.contains(&id), |id| !down.contains(&id))
        };
        // Followers caught up: nothing held.
        assert_eq!(hold(&[(1, Some(90)), (2, Some(90)), (3, Some(88))], &[], &[]), None);
        // A learner at 70 holds from 70 (alive or not: a move resumes).
        assert_eq!(hold(&[(2, Some(90)), (4, Some(70))], &[4], &[4]), Some(70));
        // A live voter with no match yet (being sent a snapshot): what is purged now.
        assert_eq!(hold(&[(2, Some(90)), (3, None)], &[], &[]), Some(50));
        // A voter whose node is down is not waited for.
        assert_eq!(hold(&[(2, Some(90)), (3, None)], &[], &[3]), None);
    }

    /// Everything applied (the purge limits under test are the others).
    const ALL: Option<u64> = Some(u64::MAX);

    #[test]
    fn nothing_the_state_machine_has_not_applied_is_purged() {
        // A restart: the snapshot covers 20, the state machine is back at 12.
        let log = LogBytes::default();
        for i in 1..=20 {
            log.appended(i, 10);
        }
        let policy =
            BytePolicy { keep_logs_after_snapshot: 5, keep_log_bytes_after_snapshot: 1_000, ..POLICY };
        assert_eq!(Seen::default().decide(policy, &log, Some(20), None, Some(12)), [Action::Purge(7)]);
        assert_eq!(Seen::default().decide(policy, &log, Some(20), None, None), [], "nothing applied");
        assert_eq!(Seen::default().decide(policy, &log, Some(20), None, Some(20)), [Action::Purge(15)]);
    }

    const POLICY: BytePolicy = BytePolicy {
        snapshot_every_bytes: 100,
        keep_logs_after_snapshot: 1_000,
        keep_log_bytes_after_snapshot: 30,
        max_unflushed_log_bytes: 1_000,
    };

    #[test]
    fn unflushed_bytes_are_those_of_the_entries_applied_after_the_flushed_index() {
        let log = LogBytes::default();
        for i in 1..=10 {
            log.appended(i, 100);
        }
        assert_eq!(unflushed_bytes(&log, 0, Some(10)), 1_000);
        assert_eq!(unflushed_bytes(&log, 4, Some(10)), 600);
        assert_eq!(unflushed_bytes(&log, 4, Some(7)), 300, "entries 8 to 10 are not applied yet");
        assert_eq!(unflushed_bytes(&log, 7, Some(7)), 0);
        assert_eq!(unflushed_bytes(&log, 9, Some(7)), 0, "a snapshot install moved the flushed index ahead");
        assert_eq!(unflushed_bytes(&log, 0, None), 0, "nothing applied");
        // After a restart the ledger knows only the entries appended since:
        // the older ones count as nothing until they are flushed.
        let log = LogBytes::default();
        for i in 51..=60 {
            log.appended(i, 100);
        }
        assert_eq!(unflushed_bytes(&log, 40, Some(60)), 1_000);
        assert_eq!(unflushed_bytes(&log, 40, Some(55)), 500);
    }

    #[test]
    fn the_apply_cache_is_trimmed_once_per_idle_index_until_a_trim_happens() {
        let mut seen = Seen::default();
        // (applied index at the poll, whether the trim succeeds if tried)
        let polls = [(Some(5), true), (Some(7), true), (Some(7), false), (Some(7), true), (Some(7), true)];
        let mut calls = Vec::new();
        for (i, (applied, succeeds)) in polls.into_iter().enumerate() {
            if seen.trim_due(applied) {
                calls.push(i);
                if succeeds {
                    seen.trimmed(applied);
                }
            }
        }
        // Poll 0: None → 5 moved. Poll 1: moved. Poll 2: idle, the trim
        // fails (a batch in flight). Poll 3: tried again, done. Poll 4:
        // already trimmed at 7.
        assert_eq!(calls, [2, 3]);
        assert!(!seen.trim_due(Some(8)), "moved: not idle");
        assert!(seen.trim_due(Some(8)), "idle at a new index: trimmed again");
    }

    #[test]
    fn snapshots_once_per_interval_of_bytes() {
        let (log, mut seen) = (LogBytes::default(), Seen::default());
        for i in 1..=9 {
            log.appended(i, 10);
        }
        assert_eq!(seen.decide(POLICY, &log, None, None, ALL), []);
        log.appended(10, 10);
        assert_eq!(seen.decide(POLICY, &log, None, None, ALL), [Action::Snapshot]);
        log.appended(11, 10);
        assert_eq!(seen.decide(POLICY, &log, None, None, ALL), [], "asked already; no snapshot yet");
        // The snapshot covers 10: 10 bytes after it, and 30 kept behind it.
        assert_eq!(seen.decide(POLICY, &log, Some(10), None, ALL), [Action::Purge(7)]);
        assert_eq!(seen.decide(POLICY, &log, Some(10), None, ALL), []);
        for i in 12..=19 {
            log.appended(i, 10);
        }
        assert_eq!(seen.decide(POLICY, &log, Some(10), None, ALL), [], "90 bytes after the snapshot");
        log.appended(20, 10);
        assert_eq!(seen.decide(POLICY, &log, Some(10), None, ALL), [Action::Snapshot]);
        assert_eq!(seen.decide(POLICY, &log, Some(20), None, ALL), [Action::Purge(17)]);
    }

    #[test]
    fn a_snapshot_built_meanwhile_allows_a_new_ask() {
        let (log, mut seen) = (LogBytes::default(), Seen::default());
        for i in 1..=30 {
            log.appended(i, 10);
        }
        assert_eq!(seen.decide(POLICY, &log, Some(5), None, ALL), [Action::Snapshot, Action::Purge(2)]);
        // A snapshot (asked before, by entries) ends at 6: 240 bytes after it.
        assert_eq!(seen.decide(POLICY, &log, Some(6), None, ALL), [Action::Snapshot, Action::Purge(3)]);
    }

    #[test]
    fn entries_bound_the_log_too_and_members_catching_up_hold_it_within_a_bound() {
        let policy = BytePolicy {
            snapshot_every_bytes: 1_000_000,
            keep_logs_after_snapshot: 5,
            keep_log_bytes_after_snapshot: 1_000,
            max_unflushed_log_bytes: 1_000,
        };
        let log = LogBytes::default();
        for i in 1..=20 {
            log.appended(i, 10);
        }
        // By entries: a snapshot at 20 keeps 5 entries behind it.
        assert_eq!(Seen::default().decide(policy, &log, Some(20), None, ALL), [Action::Purge(15)]);
        // A member that has 8 holds the log after it (120 bytes, well
        // under 8 x 1,000); as it catches up, the purge follows it.
        let mut seen = Seen::default();
        assert_eq!(seen.decide(policy, &log, Some(20), Some(8), ALL), [Action::Purge(8)]);
        assert_eq!(seen.decide(policy, &log, Some(20), Some(12), ALL), [Action::Purge(12)]);
        assert_eq!(seen.decide(policy, &log, Some(20), Some(20), ALL), [Action::Purge(15)], "caught up");
        // A hold beyond the bound is ignored: 10 bytes kept, at most 80
        // held; 150 bytes after 5 is too much, 60 after 14 is not.
        let tight = BytePolicy { keep_log_bytes_after_snapshot: 10, ..policy };
        assert_eq!(Seen::default().decide(tight, &log, Some(20), Some(5), ALL), [Action::Purge(19)]);
        assert_eq!(Seen::default().decide(tight, &log, Some(20), Some(14), ALL), [Action::Purge(14)]);
        // A member with nothing yet holds at what is purged now: nothing
        // more goes.
        assert_eq!(Seen::default().decide(policy, &log, Some(20), Some(0), ALL), []);
    }
}
