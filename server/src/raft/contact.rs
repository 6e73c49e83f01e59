//! How far behind the leader this node is, and how recently it heard from it.
//!
//! openraft's metrics say neither on a follower, so the node keeps its own
//! record:
//! - [`LeaderContact`] (follower side): every AppendEntries the leader sends
//!   carries its commit index (`leader_commit`); the node remembers the
//!   highest one and when the leader was last heard. Committed entries are
//!   never undone, so the highest commit index seen is a safe lower bound of
//!   the leader's, even across a change of leader.
//! - It also remembers when it last refused a candidate for a shorter log
//!   ([`LeaderContact::refused_shorter_log`]): a quiet group's follower
//!   that the leader no longer reaches, while a peer finds the leader gone,
//!   campaigns itself (see [`super::quiet`]).
//! - [`PeerAcks`] (leader side): when each peer last acknowledged an
//!   AppendEntries. The age of the most recent time a quorum had answered
//!   bounds how stale a leader that was cut off may be. It also keeps the
//!   highest commit index each peer acknowledged learning: a quiet group's
//!   leader rests only once every follower has (openraft sends a commit
//!   index once, in a heartbeat it does not retry).
//!
//! [`freshness`] turns them into what reads and `ClusterStatus` report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::{BasicNode, RaftMetrics, ServerState};

use crate::types::NodeId;

/// Milliseconds since a fixed instant, plus one, so that 0 means "never".
#[derive(Debug)]
struct Clock {
    base: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock { base: Instant::now() }
    }
}

impl Clock {
    fn stamp(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn age(&self, stamp: u64) -> Option<Duration> {
        (stamp > 0).then(|| Duration::from_millis(self.stamp().saturating_sub(stamp)))
    }
}

/// What a follower last heard from its leader.
#[derive(Debug, Default)]
pub struct LeaderContact {
    clock: Clock,
    heard_at: AtomicU64,
    commit: AtomicU64,
    refused_at: AtomicU64,
}

impl LeaderContact {
    /// The leader was heard, with this commit index (if it sent one).
    pub fn heard(&self, leader_commit: Option<u64>) {
        self.heard_at.store(self.clock.stamp(), Ordering::Relaxed);
        if let Some(c) = leader_commit {
            self.commit.fetch_max(c, Ordering::Relaxed);
        }
    }

    /// The highest leader commit index seen (0 if none).
    pub fn commit_seen(&self) -> u64 {
        self.commit.load(Ordering::Relaxed)
    }

    /// Time since the leader was last heard; `None` if never since start.
    pub fn age(&self) -> Option<Duration> {
        self.clock.age(self.heard_at.load(Ordering::Relaxed))
    }

    /// This replica refused a candidate whose log is shorter than its own:
    /// that candidate cannot win, and this replica (or one like it) must
    /// campaign if the leader is gone.
    pub fn refused_shorter_log(&self) {
        self.refused_at.store(self.clock.stamp(), Ordering::Relaxed);
    }

    /// Time since a candidate was last refused for its shorter log.
    pub fn refusal_age(&self) -> Option<Duration> {
        self.clock.age(self.refused_at.load(Ordering::Relaxed))
    }
}

/// When each peer last acknowledged this node's AppendEntries, and the
/// highest commit index it acknowledged learning.
#[derive(Debug, Default)]
pub struct PeerAcks {
    clock: Clock,
    acked_at: Mutex<BTreeMap<NodeId, u64>>,
    commits: Mutex<BTreeMap<NodeId, (u64, Instant)>>,
}

impl PeerAcks {
    /// `peer` answered an AppendEntries with success: it now knows entries
    /// up to `commit` (the request's commit index, capped at the last
    /// entry the request matched) are committed.
    pub fn acked_commit(&self, peer: NodeId, commit: u64) {
        if let Ok(mut commits) = self.commits.lock() {
            let known = commits.entry(peer).or_insert((commit, Instant::now()));
            if commit >= known.0 {
                *known = (commit, Instant::now());
            }
        }
    }

    /// The highest commit index `peer` acknowledged learning, and when.
    pub fn commit_acked(&self, peer: NodeId) -> Option<(u64, Instant)> {
        self.commits.lock().ok()?.get(&peer).copied()
    }

    pub fn acked(&self, peer: NodeId) {
        let now = self.clock.stamp();
        if let Ok(mut acks) = self.acked_at.lock() {
            acks.insert(peer, now);
        }
    }

    /// How long ago a quorum of `voters` (this node `me` counting as now)
    /// had last answered; `None` if a quorum never has.
    pub fn quorum_age(&self, me: NodeId, voters: &[NodeId]) -> Option<Duration> {
        let now = self.clock.stamp();
        let acks = self.acked_at.lock().ok()?;
        let mut stamps: Vec<u64> =
            voters.iter().filter_map(|v| if *v == me { Some(now) } else { acks.get(v).copied() }).collect();
        stamps.sort_unstable_by(|a, b| b.cmp(a));
        let quorum = voters.len() / 2 + 1;
        stamps.get(quorum - 1).and_then(|s| self.clock.age(*s))
    }
}

/// How fresh this node's state is, as reads and `ClusterStatus` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Freshness {
    /// The leader's commit index as last seen here (on the leader: its last
    /// log index) minus this node's applied index.
    pub lag_entries: u64,
    /// Since the leader was last heard (on the leader: since a quorum last
    /// answered). `None` when never, since this node started.
    pub leader_contact_age: Option<Duration>,
}

/// The freshness of a node with these metrics and `applied` index.
pub fn freshness(
    m: &RaftMetrics<NodeId, BasicNode>,
    applied: u64,
    contact: &LeaderContact,
    acks: &PeerAcks,
) -> Freshness {
    if m.state == ServerState::Leader {
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        return Freshness {
            lag_entries: m.last_log_index.unwrap_or(0).saturating_sub(applied),
            leader_contact_age: acks.quorum_age(m.id, &voters),
        };
    }
    Freshness {
        lag_entries: contact.commit_seen().saturating_sub(applied),
        leader_contact_age: contact.age(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_keeps_the_highest_commit_and_the_last_time() {
        let c = LeaderContact::default();
        assert_eq!((c.commit_seen(), c.age(), c.refusal_age()), (0, None, None));
        c.refused_shorter_log();
        assert!(c.refusal_age().unwrap() < Duration::from_secs(5));
        c.heard(Some(9));
        c.heard(Some(7)); // a new leader that does not know the commit yet
        c.heard(None);
        assert_eq!(c.commit_seen(), 9);
        assert!(c.age().unwrap() < Duration::from_secs(5));
    }

    #[test]
    fn quorum_age_needs_a_majority_including_this_node() {
        let acks = PeerAcks::default();
        assert_eq!(acks.quorum_age(1, &[1]), Some(Duration::ZERO));
        assert_eq!(acks.quorum_age(1, &[1, 2, 3]), None);
        acks.acked(3);
        assert!(acks.quorum_age(1, &[1, 2, 3]).is_some());
        assert_eq!(acks.quorum_age(1, &[1, 2, 3, 4, 5]), None);
    }
}
