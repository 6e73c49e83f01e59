//! The jump guard: decides whether this node's wall clock may move the
//! replicated time. Pure: every moment is passed in.
//!
//! The **reference** is what the wall clock should read now: the last wall
//! time this node trusted (a stamp it proposed, a mark it wrote, an
//! operator's confirmation) plus the monotonic time since, and never less
//! than the replicated clock (the largest stamp applied). A wall clock more
//! than `max_jump_ms` ahead of the reference has **jumped**: an NTP step, a
//! VM resumed after a pause, a restart under a wrong clock, or simply a
//! node that was down for longer than the bound. The guard cannot tell
//! these apart alone, so a jump is accepted only when a quorum of peers
//! confirms the clock, or an operator does; until then stamps are refused.
//! A clock behind the reference is no jump: stamps never move backwards
//! (the stamp is at least the replicated clock), and the reference is not
//! moved back, so a clock stepped back and then forward again is not
//! mistaken for a jump.

use std::time::Instant;

/// A wall time this node trusted, and when (monotonic).
#[derive(Debug, Clone, Copy)]
pub struct Trusted {
    pub wall_ms: i64,
    pub at: Instant,
}

/// The guard's memory.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// `None` until something is trusted (a fresh data dir with no mark).
    pub trusted: Option<Trusted>,
}

/// Why the guard refused the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jump {
    pub now_ms: i64,
    pub reference_ms: i64,
}

impl Jump {
    pub fn ahead_ms(&self) -> i64 {
        self.now_ms - self.reference_ms
    }
}

impl Guard {
    /// What the wall clock should read at `mono` (`None`: no reference yet).
    pub fn reference(&self, mono: Instant, replicated_ms: i64) -> Option<i64> {
        let local = self.trusted.map(|t| t.wall_ms + mono.saturating_duration_since(t.at).as_millis() as i64);
        match (local, replicated_ms > 0) {
            (Some(l), true) => Some(l.max(replicated_ms)),
            (Some(l), false) => Some(l),
            (None, true) => Some(replicated_ms),
            (None, false) => None,
        }
    }

    /// Checks `now_ms` read at `mono`. `confirmed`: a quorum of peers agrees
    /// with this clock now. On success the clock becomes the new trusted
    /// time (when it is ahead of the reference, so drift does not pile up).
    pub fn check(
        &mut self,
        now_ms: i64,
        mono: Instant,
        replicated_ms: i64,
        max_jump_ms: i64,
        confirmed: bool,
    ) -> Result<(), Jump> {
        let Some(reference_ms) = self.reference(mono, replicated_ms) else {
            // Nothing to protect yet: a new node's first reading.
            self.trust(now_ms, mono);
            return Ok(());
        };
        let ahead = now_ms - reference_ms;
        if ahead > max_jump_ms && !confirmed {
            return Err(Jump { now_ms, reference_ms });
        }
        if ahead >= 0 {
            self.trust(now_ms, mono);
        }
        Ok(())
    }

    /// Trusts `now_ms` at `mono` whatever the reference (an operator's word).
    pub fn trust(&mut self, now_ms: i64, mono: Instant) {
        self.trusted = Some(Trusted { wall_ms: now_ms, at: mono });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DAY: i64 = 86_400_000;
    const T: i64 = 1_800_000_000_000;

    fn guard_at(wall_ms: i64, at: Instant) -> Guard {
        Guard { trusted: Some(Trusted { wall_ms, at }) }
    }

    #[test]
    fn a_fresh_node_trusts_its_first_reading() {
        let mono = Instant::now();
        let mut g = Guard::default();
        assert_eq!(g.reference(mono, 0), None);
        g.check(T, mono, 0, DAY, false).unwrap();
        assert_eq!(g.reference(mono + Duration::from_secs(5), 0), Some(T + 5_000));
    }

    #[test]
    fn a_clock_that_runs_with_the_monotonic_clock_passes() {
        let mono = Instant::now();
        let mut g = guard_at(T, mono);
        let later = mono + Duration::from_secs(3_600);
        g.check(T + 3_600_000 + 20, later, T, DAY, false).unwrap();
        assert_eq!(g.trusted.unwrap().wall_ms, T + 3_600_020, "ahead: trusted, so drift does not pile up");
    }

    #[test]
    fn a_jump_past_the_bound_is_refused_until_confirmed() {
        let mono = Instant::now();
        let mut g = guard_at(T, mono);
        let year = 365 * DAY;
        let jump = g.check(T + year, mono, T - 1_000, DAY, false).unwrap_err();
        assert_eq!(jump.ahead_ms(), year);
        // Refused again: nothing was trusted meanwhile.
        assert!(g.check(T + year + 10, mono, T, DAY, false).is_err());
        g.check(T + year + 10, mono, T, DAY, true).unwrap();
        assert_eq!(g.reference(mono, T), Some(T + year + 10));
    }

    #[test]
    fn the_replicated_clock_is_the_reference_of_a_node_with_no_mark() {
        // A new node that joined a cluster: its own first reading must
        // not become the reference, the cluster's time is.
        let mono = Instant::now();
        let g = Guard::default();
        let mut g2 = g.clone();
        assert!(g2.check(T + 400 * DAY, mono, T, DAY, false).is_err());
        assert_eq!(g.reference(mono, T), Some(T));
    }

    #[test]
    fn a_clock_stepped_back_then_forward_is_no_jump() {
        let mono = Instant::now();
        let mut g = guard_at(T, mono);
        // Stepped back by two days: no jump, and the reference stays.
        g.check(T - 2 * DAY, mono, T, DAY, false).unwrap();
        assert_eq!(g.trusted.unwrap().wall_ms, T);
        // Stepped forward again, an hour later: right on the reference.
        let later = mono + Duration::from_secs(3_600);
        g.check(T + 3_600_000, later, T, DAY, false).unwrap();
    }

    #[test]
    fn a_node_down_longer_than_the_bound_needs_a_confirmation() {
        // The mark says the node last trusted T; it restarts 3 days later.
        let mono = Instant::now();
        let mut g = guard_at(T, mono);
        assert!(g.check(T + 3 * DAY, mono, T, DAY, false).is_err());
        g.check(T + 3 * DAY, mono, T, DAY, true).unwrap();
    }
}
