//! When does passing time change a result?
//!
//! Every number carries its slope with respect to `now` (`now` has slope 1,
//! literals and slots 0; see `eval`). Each comparison `a op b` is rewritten
//! as `d op 0` with `d = a - b`, which moves linearly in time:
//! `d(t) = d0 + ds·(t − now)`. [`flip_time`] finds the first whole
//! millisecond after `now` at which `d(t) op 0` differs from `d(now) op 0`:
//! the model locates the crossing, then the condition itself is evaluated at
//! the candidate milliseconds around it (and searched for when rounding put
//! the model seconds off), so floating-point rounding in the model (slopes
//! such as 1/86400000 from `days()`) never shifts the answer.
//! [`Schedule`] keeps the earliest such moment over one evaluation.

use super::ast::CmpOp;

/// Collects the earliest flip time seen during one evaluation.
pub(super) struct Schedule<'n> {
    now: i64,
    /// `None` while probing: evaluating a subtree at a candidate time to
    /// check a flip, which records nothing and probes no further.
    next: Option<&'n mut Option<i64>>,
}

impl<'n> Schedule<'n> {
    pub fn new(now: i64, next: &'n mut Option<i64>) -> Schedule<'n> {
        Schedule { now, next: Some(next) }
    }

    /// A schedule for evaluating at `now` that records nothing.
    pub fn probe(now: i64) -> Schedule<'n> {
        Schedule { now, next: None }
    }

    pub fn now(&self) -> i64 {
        self.now
    }

    /// Notes when `d op 0` flips, `d` being `d0` now and moving by `ds` per
    /// ms; `holds_at(t)` evaluates the condition at `t` exactly as a full
    /// evaluation at `t` would, to settle the millisecond despite rounding.
    pub fn flip(&mut self, op: CmpOp, d0: f64, ds: f64, holds_at: impl FnMut(i64) -> bool) {
        let Some(next) = self.next.as_deref_mut() else { return };
        if let Some(t) = flip_time(op, d0, ds, self.now, holds_at) {
            *next = Some(next.map_or(t, |n| n.min(t)));
        }
    }
}

/// The first integer `t > now` at which `d(t) op 0` differs from
/// `d(now) op 0`, where `d(t) = d0 + ds·(t − now)`; `None` if it never does.
/// The linear model finds the crossing; `holds_at` decides the millisecond.
///
/// The model can be far off: a slope computed as the difference of two
/// nearly equal slopes keeps only a few significant digits. So the model's
/// moment is only a starting point: when the condition already differs
/// there, the first differing millisecond is searched for between `now` and
/// it; when it does not yet differ but the crossing is approaching, the
/// search gallops forward to find it. Each step of both searches is one
/// `holds_at` evaluation; the usual case (the model is right to the
/// millisecond) costs the four candidate evaluations and nothing more.
pub(super) fn flip_time(
    op: CmpOp,
    d0: f64,
    ds: f64,
    now: i64,
    mut holds_at: impl FnMut(i64) -> bool,
) -> Option<i64> {
    if ds == 0.0 || !ds.is_finite() || !d0.is_finite() || now == i64::MAX {
        return None;
    }
    let current = op.holds(d0);
    let mut differs = |t: i64| holds_at(t) != current;
    // The real moment `d` is zero; by the model the outcome changes next to it.
    let zero_at = now as f64 - d0 / ds;
    if !zero_at.is_finite() || zero_at >= i64::MAX as f64 {
        return None;
    }
    let base = zero_at.floor() as i64;
    // `before` is a moment known not to differ (now, or a checked candidate).
    let mut before = now;
    for t in (base.saturating_sub(1)..=base.saturating_add(2)).filter(|&t| t > now) {
        if differs(t) {
            return Some(if t.checked_sub(before) == Some(1) {
                t
            } else {
                first_differing(before, t, &mut differs)
            });
        }
        before = t;
    }
    // Nothing differs next to the model's crossing. An ordering whose
    // crossing is approaching still flips, later than the model says.
    if !(op.is_ordering() && d0 * ds < 0.0) {
        return None;
    }
    let mut step: i64 = 1;
    while let Some(t) = before.checked_add(step) {
        if differs(t) {
            return Some(first_differing(before, t, &mut differs));
        }
        before = t;
        step = step.saturating_mul(2);
    }
    None
}

/// The first moment in `(same, differs]` at which the condition differs,
/// given that it does not at `same` and does at `differs`. The evaluated
/// condition changes once near a crossing (every arithmetic step rounds
/// monotonically), so bisection finds it.
fn first_differing(mut same: i64, mut differs_at: i64, differs: &mut impl FnMut(i64) -> bool) -> i64 {
    while (differs_at as i128) - (same as i128) > 1 {
        let mid = ((same as i128 + differs_at as i128) / 2) as i64;
        if differs(mid) {
            differs_at = mid;
        } else {
            same = mid;
        }
    }
    differs_at
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `flip_time` with the linear model as the exact condition.
    fn flip(op: CmpOp, d0: f64, ds: f64, now: i64) -> Option<i64> {
        flip_time(op, d0, ds, now, |t| op.holds(d0 + ds * (t.saturating_sub(now) as f64)))
    }

    #[test]
    fn ordering_flips_at_the_first_millisecond_the_outcome_differs() {
        // d = -10 now, rising 1 per ms: zero at now + 10.
        assert_eq!(flip(CmpOp::Gt, -10.0, 1.0, 100), Some(111));
        assert_eq!(flip(CmpOp::Ge, -10.0, 1.0, 100), Some(110));
        assert_eq!(flip(CmpOp::Lt, -10.0, 1.0, 100), Some(110));
        assert_eq!(flip(CmpOp::Le, -10.0, 1.0, 100), Some(111));
        assert_eq!(flip(CmpOp::Eq, -10.0, 1.0, 100), Some(110));
        assert_eq!(flip(CmpOp::Ne, -10.0, 1.0, 100), Some(110));
    }

    #[test]
    fn moving_away_never_flips() {
        assert_eq!(flip(CmpOp::Gt, 10.0, 1.0, 100), None);
        assert_eq!(flip(CmpOp::Lt, -10.0, -1.0, 100), None);
        assert_eq!(flip(CmpOp::Gt, -10.0, 0.0, 100), None);
        assert_eq!(flip(CmpOp::Ge, 0.0, 1.0, 100), None);
    }

    #[test]
    fn at_zero_flips_on_the_next_millisecond() {
        assert_eq!(flip(CmpOp::Eq, 0.0, 1.0, 100), Some(101));
        assert_eq!(flip(CmpOp::Le, 0.0, 1.0, 100), Some(101));
        assert_eq!(flip(CmpOp::Ge, 0.0, -0.5, 100), Some(101));
    }

    #[test]
    fn fractional_slopes_and_crossings() {
        // d = -1, slope 0.3: zero at now + 3.33; > holds from now + 4.
        assert_eq!(flip(CmpOp::Gt, -1.0, 0.3, 0), Some(4));
        // equality is never exact at a whole millisecond.
        assert_eq!(flip(CmpOp::Eq, -1.0, 0.3, 0), None);
    }

    #[test]
    fn the_exact_condition_settles_the_millisecond() {
        // The model says 111; the condition, evaluated for real, flips at 110.
        assert_eq!(flip_time(CmpOp::Gt, -10.0, 1.0, 100, |t| t >= 110), Some(110));
        // Never consulted for moments at or before now.
        let after_now = |t: i64| {
            assert!(t > 100, "consulted at {t}");
            t >= 101
        };
        assert_eq!(flip_time(CmpOp::Gt, -1.0, 1.0, 100, after_now), Some(101));
    }

    #[test]
    fn a_model_crossing_too_late_is_searched_back_from() {
        // The model says 1000; the condition really flips at 400.
        let mut calls = 0;
        let t = flip_time(CmpOp::Gt, -900.0, 1.0, 100, |t| {
            calls += 1;
            t >= 400
        });
        assert_eq!(t, Some(400));
        assert!(calls < 20, "{calls} evaluations");
    }

    #[test]
    fn a_model_crossing_too_early_is_galloped_to() {
        // The model says 110; the condition really flips at 5000.
        assert_eq!(flip_time(CmpOp::Gt, -10.0, 1.0, 100, |t| t >= 5000), Some(5000));
        // Moving away (by the model): nothing is searched for.
        assert_eq!(flip_time(CmpOp::Gt, 10.0, 1.0, 100, |t| t >= 5000), None);
        // Equality has no direction to gallop in.
        assert_eq!(flip_time(CmpOp::Eq, -10.0, 1.0, 100, |t| t == 5000), None);
    }

    #[test]
    fn extremes_do_not_overflow() {
        assert_eq!(flip_time(CmpOp::Lt, 1.0, -1.0, i64::MIN, |_| false), None);
        assert_eq!(flip(CmpOp::Gt, -1e300, 1e-300, 0), None);
        assert_eq!(flip(CmpOp::Gt, -1.0, 1.0, i64::MAX), None);
        assert_eq!(flip(CmpOp::Lt, 1.0, -1.0, i64::MIN), Some(i64::MIN + 2));
    }
}
