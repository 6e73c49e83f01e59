//! What this node knows of its peers' clocks, and the verdict on its own.
//!
//! A sample is a peer's wall clock read in the middle of a round trip,
//! kept with the monotonic instant of that middle. To compare it with the
//! local clock *now*, it is carried forward by the monotonic time since:
//! so a local clock that jumps is seen disagreeing with every peer at once,
//! without waiting for new samples (samples taken before the jump cannot
//! vouch for it). Samples older than [`FRESH`] count for nothing.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// A sample older than this is not used.
pub const FRESH: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Sample {
    peer_wall_ms: i64,
    at: Instant,
    uncertainty_ms: i64,
}

/// One peer's clock as seen now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerOffset {
    pub node_id: NodeId,
    /// The peer's clock minus this node's.
    pub offset_ms: i64,
    pub uncertainty_ms: i64,
    pub age: Duration,
}

/// The verdict on this node's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    /// A quorum of voters (this node counted if it votes), at least one of
    /// them a peer, agrees with this clock now: a jump is confirmed.
    pub confirmed: bool,
    /// A quorum of voters disagrees with this clock: it must not lead.
    pub skewed: bool,
    /// The largest disagreeing offset (for messages).
    pub worst_offset_ms: i64,
}

/// Samples of the peers' clocks.
#[derive(Debug, Default)]
pub struct PeerClocks {
    samples: Mutex<BTreeMap<NodeId, Sample>>,
}

impl PeerClocks {
    /// Records a peer's clock `peer_wall_ms`, asked at `sent` and answered
    /// at `received` (monotonic).
    pub fn record(&self, peer: NodeId, peer_wall_ms: i64, sent: Instant, received: Instant) {
        let rtt = received.saturating_duration_since(sent);
        let sample =
            Sample { peer_wall_ms, at: sent + rtt / 2, uncertainty_ms: (rtt / 2).as_millis() as i64 + 1 };
        self.samples.lock().expect("peer clocks lock").insert(peer, sample);
    }

    /// Forgets peers that are no longer members.
    pub fn retain(&self, members: impl Fn(NodeId) -> bool) {
        self.samples.lock().expect("peer clocks lock").retain(|id, _| members(*id));
    }

    /// Every peer's offset from `now_ms` (read at `mono`).
    pub fn offsets(&self, now_ms: i64, mono: Instant) -> Vec<PeerOffset> {
        let samples = self.samples.lock().expect("peer clocks lock");
        samples
            .iter()
            .map(|(&node_id, s)| {
                let age = mono.saturating_duration_since(s.at);
                let peer_now = s.peer_wall_ms.saturating_add(age.as_millis().min(i64::MAX as u128) as i64);
                PeerOffset {
                    node_id,
                    offset_ms: peer_now.saturating_sub(now_ms),
                    uncertainty_ms: s.uncertainty_ms,
                    age,
                }
            })
            .collect()
    }

    /// Judges this node's clock `now_ms` against the fresh samples of the
    /// voters `voters` (this node is `me`).
    pub fn verdict(
        &self,
        me: NodeId,
        voters: &[NodeId],
        now_ms: i64,
        mono: Instant,
        max_offset_ms: i64,
    ) -> Verdict {
        let quorum = voters.len() / 2 + 1;
        let offsets = self.offsets(now_ms, mono);
        let fresh = offsets.iter().filter(|o| o.age <= FRESH);
        let (mut agree_peers, mut agree_voters, mut disagree_voters, mut worst) = (0, 0, 0, 0i64);
        for o in fresh {
            let voter = voters.contains(&o.node_id);
            if o.offset_ms.saturating_abs() <= max_offset_ms.saturating_add(o.uncertainty_ms) {
                agree_peers += 1;
                agree_voters += usize::from(voter);
            } else if voter {
                disagree_voters += 1;
                if o.offset_ms.saturating_abs() > worst.saturating_abs() {
                    worst = o.offset_ms;
                }
            }
        }
        let me_votes = usize::from(voters.contains(&me));
        Verdict {
            confirmed: agree_peers > 0 && agree_voters + me_votes >= quorum,
            skewed: disagree_voters >= quorum,
            worst_offset_ms: worst,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_800_000_000_000;
    const YEAR: i64 = 365 * 86_400_000;

    fn clocks(samples: &[(NodeId, i64)], at: Instant) -> PeerClocks {
        let c = PeerClocks::default();
        for &(id, wall) in samples {
            c.record(id, wall, at, at);
        }
        c
    }

    #[test]
    fn absurd_peer_clocks_are_skewed_not_a_panic() {
        // A peer's answer is untrusted input: the extremes must not overflow.
        let at = Instant::now();
        let c = clocks(&[(2, i64::MAX), (3, i64::MIN)], at);
        let v = c.verdict(1, &[1, 2, 3], T, at, 500);
        assert!(v.skewed && !v.confirmed, "{v:?}");
        let v = c.verdict(1, &[1, 2, 3], i64::MIN, at + Duration::from_secs(1), i64::MAX);
        assert!(v.confirmed && !v.skewed, "{v:?}");
    }

    #[test]
    fn a_node_agreeing_with_its_peers_is_confirmed() {
        let at = Instant::now();
        let c = clocks(&[(2, T + 100), (3, T - 200)], at);
        let v = c.verdict(1, &[1, 2, 3], T, at, 500);
        assert_eq!(v, Verdict { confirmed: true, skewed: false, worst_offset_ms: 0 });
    }

    #[test]
    fn a_clock_a_year_ahead_is_skewed_and_never_confirmed() {
        let at = Instant::now();
        let c = clocks(&[(2, T), (3, T)], at);
        let v = c.verdict(1, &[1, 2, 3], T + YEAR, at, 500);
        assert!(v.skewed && !v.confirmed);
        assert_eq!(v.worst_offset_ms, -YEAR);
    }

    #[test]
    fn samples_taken_before_a_jump_do_not_vouch_for_it() {
        // The peers agreed a second ago; the local clock has jumped since.
        let at = Instant::now();
        let c = clocks(&[(2, T), (3, T)], at);
        let later = at + Duration::from_secs(1);
        assert!(c.verdict(1, &[1, 2, 3], T + 1_000, later, 500).confirmed);
        assert!(c.verdict(1, &[1, 2, 3], T + 1_000 + YEAR, later, 500).skewed);
    }

    #[test]
    fn one_bad_peer_does_not_make_a_good_node_skewed() {
        let at = Instant::now();
        let c = clocks(&[(2, T + YEAR), (3, T + 10)], at);
        let v = c.verdict(1, &[1, 2, 3], T, at, 500);
        assert!(v.confirmed && !v.skewed);
    }

    #[test]
    fn a_single_node_is_never_confirmed_by_itself() {
        let at = Instant::now();
        let v = PeerClocks::default().verdict(1, &[1], T, at, 500);
        assert!(!v.confirmed && !v.skewed);
    }

    #[test]
    fn stale_samples_count_for_nothing() {
        let at = Instant::now();
        let c = clocks(&[(2, T), (3, T)], at);
        let later = at + FRESH + Duration::from_secs(1);
        let v = c.verdict(1, &[1, 2, 3], T + YEAR, later, 500);
        assert!(!v.skewed && !v.confirmed);
    }

    #[test]
    fn a_slow_round_trip_widens_the_agreement() {
        let sent = Instant::now();
        let c = PeerClocks::default();
        c.record(2, T + 900, sent, sent + Duration::from_millis(1_000));
        // Compared at the middle of the round trip: 900 ms off, 501 ms uncertain.
        let v = c.verdict(1, &[1, 2], T, sent + Duration::from_millis(500), 500);
        assert!(v.confirmed);
    }
}
