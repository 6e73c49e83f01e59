//! A Wing–Gong/Lowe linearizability checker for a single register, used on
//! histories recorded against a real cluster.
//!
//! Each operation has an invocation and a response time. A write whose
//! outcome is unknown (error or timeout) may have taken effect or not: it
//! is `pending` and may be linearized anywhere after its invocation, or
//! never. The search tries, at each step, every unlinearized operation that
//! was invoked before the earliest response among unlinearized completed
//! operations, with a cache of visited (linearized set, value) states.

use std::collections::HashSet;

/// A register operation and what it observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write(i64),
    /// `None`: the register had no value yet.
    Read(Option<i64>),
}

/// One operation of a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub op: Op,
    pub invoked: u64,
    /// `None`: no response (unknown outcome; only meaningful for writes).
    pub returned: Option<u64>,
}

/// Whether the history of a register that starts empty is linearizable.
pub fn is_linearizable(history: &[Call]) -> bool {
    // A read without a response tells nothing; drop it.
    let calls: Vec<Call> =
        history.iter().copied().filter(|c| c.returned.is_some() || matches!(c.op, Op::Write(_))).collect();
    assert!(calls.len() <= 128, "the checker handles at most 128 operations");
    let mut seen = HashSet::new();
    search(&calls, 0u128, None, &mut seen)
}

fn search(calls: &[Call], done: u128, value: Option<i64>, seen: &mut HashSet<(u128, Option<i64>)>) -> bool {
    let open = |i: usize| done & (1 << i) == 0;
    let completed_left = (0..calls.len()).any(|i| open(i) && calls[i].returned.is_some());
    if !completed_left {
        return true;
    }
    let horizon =
        (0..calls.len()).filter(|&i| open(i)).filter_map(|i| calls[i].returned).min().unwrap_or(u64::MAX);
    for i in (0..calls.len()).filter(|&i| open(i) && calls[i].invoked <= horizon) {
        let next = match calls[i].op {
            Op::Write(v) => Some(v),
            Op::Read(seen_value) if seen_value == value => value,
            Op::Read(_) => continue,
        };
        let state = (done | (1 << i), next);
        if seen.insert(state) && search(calls, state.0, next, seen) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: i64, a: u64, b: u64) -> Call {
        Call { op: Op::Write(v), invoked: a, returned: Some(b) }
    }
    fn r(v: Option<i64>, a: u64, b: u64) -> Call {
        Call { op: Op::Read(v), invoked: a, returned: Some(b) }
    }
    fn pending_write(v: i64, a: u64) -> Call {
        Call { op: Op::Write(v), invoked: a, returned: None }
    }

    #[test]
    fn sequential_histories() {
        assert!(is_linearizable(&[
            r(None, 0, 1),
            w(1, 2, 3),
            r(Some(1), 4, 5),
            w(2, 6, 7),
            r(Some(2), 8, 9)
        ]));
        assert!(!is_linearizable(&[w(1, 0, 1), r(None, 2, 3)]), "stale read after the write completed");
        assert!(!is_linearizable(&[w(1, 0, 1), r(Some(7), 2, 3)]), "a value nobody wrote");
        assert!(!is_linearizable(&[w(1, 0, 1), w(2, 2, 3), r(Some(1), 4, 5)]), "an overwritten value");
    }

    #[test]
    fn concurrent_operations_may_take_either_order() {
        // Two overlapping writes, then reads agreeing on one order.
        assert!(is_linearizable(&[w(1, 0, 10), w(2, 1, 9), r(Some(1), 11, 12)]));
        assert!(is_linearizable(&[w(1, 0, 10), w(2, 1, 9), r(Some(2), 11, 12)]));
        // A read overlapping a write may see the old or the new value.
        assert!(is_linearizable(&[w(1, 0, 1), w(2, 2, 10), r(Some(1), 3, 4), r(Some(2), 5, 6)]));
    }

    #[test]
    fn reads_must_not_go_back_in_time() {
        // Once a later read saw 2, a read that starts after it cannot see 1.
        let h = [w(1, 0, 1), w(2, 2, 20), r(Some(2), 3, 4), r(Some(1), 5, 6)];
        assert!(!is_linearizable(&h));
    }

    #[test]
    fn pending_writes_may_or_may_not_have_happened() {
        assert!(is_linearizable(&[pending_write(5, 0), r(Some(5), 10, 11)]), "it happened");
        assert!(is_linearizable(&[pending_write(5, 0), r(None, 10, 11)]), "it did not");
        assert!(!is_linearizable(&[r(Some(5), 0, 1), pending_write(5, 2)]), "not before it was invoked");
        // It cannot happen twice: seen, then gone, then seen again.
        let h = [pending_write(5, 0), w(6, 1, 2), r(Some(5), 3, 4), r(Some(6), 5, 6), r(Some(5), 7, 8)];
        assert!(!is_linearizable(&h));
    }

    #[test]
    fn failed_reads_are_ignored() {
        let failed_read = Call { op: Op::Read(Some(99)), invoked: 0, returned: None };
        assert!(is_linearizable(&[failed_read, w(1, 1, 2), r(Some(1), 3, 4)]));
    }
}
