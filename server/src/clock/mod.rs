//! The node's clock and the guard that keeps a wrong clock from moving the
//! replicated time.
//!
//! The state machine takes its time from the stamps in the log, and the
//! replicated clock is the largest stamp applied: it never moves back. So a
//! leader whose clock is a year ahead would, with one stamp, expire every
//! TTL'd value, shrink dedupe windows and fire time-driven tags early, on
//! every replica, for good. Two checks stand in the way of every stamp
//! ([`NodeClock::stamp`]):
//!
//! - **Peers** ([`peers`]): every node measures every member's clock about
//!   once a second (`Raft.Clock`). A node whose clock is more than
//!   `max_offset_ms` off a quorum of voters is *skewed*: it does not stamp,
//!   does not campaign, and if it leads it hands leadership to a peer (the
//!   rule CockroachDB applies to its nodes).
//! - **Jumps** ([`guard`]): a clock more than `max_jump_ms` ahead of this
//!   node's reference (the last time it trusted, carried forward by the
//!   monotonic clock, and never behind the replicated clock) is refused
//!   until a quorum of peers confirms it or an operator does
//!   (`Admin.ConfirmClock`). The last trusted time is also written to
//!   `<data>/clock-mark` every few seconds, so a restart under a wrong clock
//!   is caught too; a node that was merely down for days resumes without
//!   help when its peers agree with its clock.
//!
//! Stamps never move backwards: a stamp is at least the replicated clock.

pub mod guard;
pub mod peers;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use guard::{Guard, Jump};
use peers::{PeerClocks, PeerOffset, Verdict};

use crate::error::Error;
use crate::types::NodeId;

/// How the clock is guarded (node-local configuration).
#[derive(Debug, Clone)]
pub struct ClockOptions {
    /// A node whose clock is further than this from a quorum of voters
    /// does not lead (default 500 ms, CockroachDB's default).
    pub max_offset_ms: i64,
    /// A clock further than this ahead of the node's reference needs a
    /// quorum's or an operator's confirmation (default 24 h).
    pub max_jump_ms: i64,
    /// Test-only: added to the wall clock (fault injection).
    pub test_offset_ms: i64,
}

impl Default for ClockOptions {
    fn default() -> Self {
        ClockOptions { max_offset_ms: 500, max_jump_ms: 24 * 3_600_000, test_offset_ms: 0 }
    }
}

/// The mark is rewritten at most this often.
const MARK_EVERY: Duration = Duration::from_secs(5);
const MARK_FILE: &str = "clock-mark";

/// Why a stamp was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockProblem {
    /// Off a quorum of voters by `worst_offset_ms` (peer minus this node).
    Skewed { worst_offset_ms: i64 },
    /// Ahead of the reference by more than the bound, unconfirmed.
    Jumped(Jump),
}

/// This node's clock: the wall clock (plus the test offset), the guard and
/// the peers' samples.
pub struct NodeClock {
    opts: ClockOptions,
    test_offset_ms: AtomicI64,
    mark_path: PathBuf,
    guard: Mutex<GuardState>,
    peers: PeerClocks,
    /// The voters of every group this node hosts, as the last
    /// [`NodeClock::tick`] saw them: a stamp is judged against them too,
    /// so a node its cluster finds skewed cannot stamp in a group whose
    /// own voters are too few to say so (one voter: itself).
    cluster_voters: Mutex<Vec<NodeId>>,
}

struct GuardState {
    guard: Guard,
    /// The last refusal, until the clock is accepted again (for status).
    problem: Option<ClockProblem>,
    marked_at: Option<Instant>,
}

/// What `ClusterStatus` reports of the clock.
#[derive(Debug, Clone)]
pub struct ClockStatus {
    pub now_ms: i64,
    pub problem: Option<String>,
    pub max_offset_ms: i64,
    pub max_jump_ms: i64,
    pub reference_ms: Option<i64>,
    pub peers: Vec<PeerOffset>,
}

impl NodeClock {
    /// The clock of the node whose data lives in `data_dir`: the last
    /// trusted time is read back from the mark, if there is one.
    pub fn open(data_dir: &Path, opts: ClockOptions) -> std::io::Result<NodeClock> {
        let mark_path = data_dir.join(MARK_FILE);
        let mark = read_mark(&mark_path)?;
        let mut guard = Guard::default();
        if let Some(ms) = mark {
            guard.trust(ms, Instant::now());
        }
        Ok(NodeClock {
            test_offset_ms: AtomicI64::new(opts.test_offset_ms),
            opts,
            mark_path,
            guard: Mutex::new(GuardState { guard, problem: None, marked_at: None }),
            peers: PeerClocks::default(),
            cluster_voters: Mutex::default(),
        })
    }

    /// Milliseconds since the Unix epoch by this node's clock.
    pub fn now_ms(&self) -> i64 {
        crate::wall_clock_ms().saturating_add(self.test_offset_ms.load(Ordering::Relaxed))
    }

    pub fn options(&self) -> &ClockOptions {
        &self.opts
    }

    /// Test-only (fault injection): shifts the wall clock from now on.
    pub fn set_test_offset(&self, offset_ms: i64) {
        self.test_offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    pub fn peers(&self) -> &PeerClocks {
        &self.peers
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GuardState> {
        self.guard.lock().expect("clock guard lock")
    }

    /// The verdict of the peers on this clock now.
    pub fn verdict(&self, me: NodeId, voters: &[NodeId]) -> Verdict {
        self.peers.verdict(me, voters, self.now_ms(), Instant::now(), self.opts.max_offset_ms)
    }

    /// The verdict on this clock for a group with these `voters`: skewed
    /// if the group's voters or those of all the node's groups find it so;
    /// a jump confirmed if a quorum of either agrees with it.
    pub fn group_verdict(&self, me: NodeId, voters: &[NodeId]) -> Verdict {
        self.group_verdict_at(me, voters, self.now_ms(), Instant::now())
    }

    fn group_verdict_at(&self, me: NodeId, voters: &[NodeId], now: i64, mono: Instant) -> Verdict {
        let verdict = self.peers.verdict(me, voters, now, mono, self.opts.max_offset_ms);
        let cluster = self.cluster_voters.lock().expect("cluster voters lock").clone();
        if cluster.is_empty() || cluster == voters {
            return verdict;
        }
        let wide = self.peers.verdict(me, &cluster, now, mono, self.opts.max_offset_ms);
        Verdict {
            confirmed: verdict.confirmed || wide.confirmed,
            skewed: verdict.skewed || wide.skewed,
            worst_offset_ms: match (verdict.skewed, wide.skewed) {
                (false, true) => wide.worst_offset_ms,
                _ => verdict.worst_offset_ms,
            },
        }
    }

    /// The time to stamp a new entry of a group with these `voters`: this
    /// node's clock, never less than `replicated_ms`; refused if the clock
    /// is skewed (against the group's voters, or against the voters of all
    /// the node's groups) or jumped (unless a quorum of either confirms
    /// it).
    pub fn stamp(&self, me: NodeId, voters: &[NodeId], replicated_ms: i64) -> Result<i64, ClockProblem> {
        let (now, mono) = (self.now_ms(), Instant::now());
        let verdict = self.group_verdict_at(me, voters, now, mono);
        let mut state = self.state();
        if verdict.skewed {
            let problem = ClockProblem::Skewed { worst_offset_ms: verdict.worst_offset_ms };
            state.problem = Some(problem);
            return Err(problem);
        }
        match state.guard.check(now, mono, replicated_ms, self.opts.max_jump_ms, verdict.confirmed) {
            Ok(()) => {
                state.problem = None;
                Ok(now.max(replicated_ms))
            }
            Err(jump) => {
                state.problem = Some(ClockProblem::Jumped(jump));
                Err(ClockProblem::Jumped(jump))
            }
        }
    }

    /// Called about once a second: checks the clock as a stamp would (so a
    /// jump is noticed and reported on an idle node too) and rewrites the
    /// mark when the clock is accepted. Returns the verdict.
    /// `voters` are those of every group the node hosts; later stamps are
    /// judged against them too.
    pub fn tick(&self, me: NodeId, voters: &[NodeId], replicated_ms: i64) -> Verdict {
        *self.cluster_voters.lock().expect("cluster voters lock") = voters.to_vec();
        let verdict = self.verdict(me, voters);
        let accepted = self.stamp(me, voters, replicated_ms).is_ok();
        let due = {
            let state = self.state();
            let trusted = state.guard.trusted.map(|t| t.wall_ms);
            let due = state.marked_at.is_none_or(|at| at.elapsed() >= MARK_EVERY);
            trusted.filter(|_| accepted && due)
        };
        if let Some(ms) = due {
            match write_mark(&self.mark_path, ms) {
                Ok(()) => self.state().marked_at = Some(Instant::now()),
                Err(e) => {
                    tracing::warn!(error = %e, path = %self.mark_path.display(), "writing the clock mark")
                }
            }
        }
        verdict
    }

    /// An operator accepts the clock as it is now; returns (now, the
    /// reference it replaces).
    pub fn confirm(&self, replicated_ms: i64) -> std::io::Result<(i64, Option<i64>)> {
        let (now, mono) = (self.now_ms(), Instant::now());
        let reference = {
            let mut state = self.state();
            let reference = state.guard.reference(mono, replicated_ms);
            state.guard.trust(now, mono);
            state.problem = None;
            reference
        };
        write_mark(&self.mark_path, now)?;
        self.state().marked_at = Some(Instant::now());
        tracing::warn!(now_ms = now, reference_ms = ?reference, "clock confirmed by an operator");
        Ok((now, reference))
    }

    /// The clock as `ClusterStatus` reports it.
    pub fn status(&self, me: NodeId, voters: &[NodeId], replicated_ms: i64) -> ClockStatus {
        let (now, mono) = (self.now_ms(), Instant::now());
        let state = self.state();
        let skewed = self.peers.verdict(me, voters, now, mono, self.opts.max_offset_ms);
        let problem = match (skewed.skewed, state.problem) {
            (true, _) => Some(ClockProblem::Skewed { worst_offset_ms: skewed.worst_offset_ms }),
            (false, p @ Some(ClockProblem::Jumped(_))) => p,
            _ => None,
        };
        ClockStatus {
            now_ms: now,
            problem: problem.map(|p| self.describe(p)),
            max_offset_ms: self.opts.max_offset_ms,
            max_jump_ms: self.opts.max_jump_ms,
            reference_ms: state.guard.reference(mono, replicated_ms),
            peers: self.peers.offsets(now, mono),
        }
    }

    /// One line saying what is wrong and what to do.
    pub fn describe(&self, problem: ClockProblem) -> String {
        match problem {
            ClockProblem::Skewed { worst_offset_ms } => format!(
                "this node's clock is {} ms off a quorum of its peers (max_clock_offset {} ms): it does not \
                 lead or stamp entries until its clock is fixed",
                -worst_offset_ms, self.opts.max_offset_ms
            ),
            ClockProblem::Jumped(j) => format!(
                "this node's clock jumped {} ahead of its reference (unix ms {}; max_clock_jump {}) and no \
                 quorum of peers confirms it: entries are not stamped with it; fix the clock, or if it is \
                 right run `portrait cluster confirm-clock` against this node",
                human_ms(j.ahead_ms()),
                j.reference_ms,
                human_ms(self.opts.max_jump_ms),
            ),
        }
    }

    /// The error a refused stamp gives a caller.
    pub fn error(&self, problem: ClockProblem) -> Error {
        match problem {
            ClockProblem::Skewed { .. } => Error::Unavailable(self.describe(problem)),
            ClockProblem::Jumped(_) => Error::FailedPrecondition(self.describe(problem)),
        }
    }
}

fn human_ms(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        ms if ms >= 86_400_000 => format!("{:.1}d", ms as f64 / 86_400_000.0),
        ms if ms >= 3_600_000 => format!("{:.1}h", ms as f64 / 3_600_000.0),
        ms if ms >= 1_000 => format!("{:.1}s", ms as f64 / 1_000.0),
        ms => format!("{ms}ms"),
    }
}

fn read_mark(path: &Path) -> std::io::Result<Option<i64>> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse().map(Some).map_err(|e| {
            std::io::Error::other(format!(
                "{}: not a clock mark ({e}); remove it to start afresh",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the mark atomically (write, sync, rename).
fn write_mark(path: &Path, ms: i64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, ms.to_string())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename survives a power loss only once its directory is synced.
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_survives_a_restart_and_a_jump_after_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let clock = NodeClock::open(dir.path(), ClockOptions::default()).unwrap();
        let now = clock.now_ms();
        clock.stamp(1, &[1], 0).unwrap();
        clock.tick(1, &[1], now);
        assert!(dir.path().join(MARK_FILE).exists());
        // "Restarted" a year later (the test offset stands in for the clock).
        let year = 365 * 86_400_000;
        let opts = ClockOptions { test_offset_ms: year, ..ClockOptions::default() };
        let clock = NodeClock::open(dir.path(), opts).unwrap();
        let err = clock.stamp(1, &[1], now).unwrap_err();
        assert!(matches!(err, ClockProblem::Jumped(j) if j.ahead_ms() > year - 60_000));
        assert!(clock.describe(err).contains("confirm-clock"), "{}", clock.describe(err));
        let status = clock.status(1, &[1], now);
        assert!(status.problem.unwrap().contains("jumped 365"));
        // An operator confirms: stamps go on from the new time.
        let (confirmed_now, reference) = clock.confirm(now).unwrap();
        assert!(reference.unwrap() < confirmed_now - year + 60_000);
        assert!(clock.stamp(1, &[1], now).unwrap() >= confirmed_now);
        assert!(clock.status(1, &[1], now).problem.is_none());
    }

    #[test]
    fn a_node_its_cluster_finds_skewed_cannot_stamp_in_a_group_of_one_voter() {
        let dir = tempfile::tempdir().unwrap();
        let hour = 3_600_000;
        let opts = ClockOptions { test_offset_ms: hour, ..ClockOptions::default() };
        let clock = NodeClock::open(dir.path(), opts).unwrap();
        // Peers 2 and 3 answer with the true time: this clock is an hour ahead.
        let (sent, wall) = (Instant::now(), crate::wall_clock_ms());
        for peer in [2, 3] {
            clock.peers().record(peer, wall, sent, sent);
        }
        assert!(clock.stamp(1, &[1], 0).is_ok(), "no peer votes in the group: nobody to say so yet");
        let verdict = clock.tick(1, &[1, 2, 3], 0);
        assert!(verdict.skewed);
        let err = clock.stamp(1, &[1], 0).expect_err("the cluster finds it skewed");
        assert!(matches!(err, ClockProblem::Skewed { worst_offset_ms } if worst_offset_ms.abs() > hour / 2));
        assert!(clock.stamp(1, &[1, 2], 0).is_err(), "nor in a group of two voters");
    }

    #[test]
    fn stamps_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let clock = NodeClock::open(dir.path(), ClockOptions::default()).unwrap();
        let replicated = clock.now_ms() + 10 * 60_000;
        assert_eq!(clock.stamp(1, &[1], replicated).unwrap(), replicated);
    }

    #[test]
    fn a_bad_mark_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MARK_FILE), "yesterday").unwrap();
        let err = NodeClock::open(dir.path(), ClockOptions::default()).err().unwrap();
        assert!(err.to_string().contains("not a clock mark"), "{err}");
    }
}
