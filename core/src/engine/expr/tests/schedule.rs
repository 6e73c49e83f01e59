//! `next_change`: the exact millisecond at which passing time changes a result.

use super::*;
use crate::duration::{DAY_MS, HOUR_MS, MONTH_MS};

/// The last order, ten days before `NOW`.
const T: i64 = NOW - 10 * DAY_MS;

fn churn_values(orders: f64) -> [(&'static str, Val); 2] {
    [("orders_lifetime", num(orders)), ("last_order_time", num(T as f64))]
}

/// Follows the reported changes from `from`: the value must hold until just
/// before each reported moment and differ at it. Returns the values seen.
fn walk(src: &str, values: &[(&str, Val)], from: i64, steps: usize) -> Vec<(i64, Val)> {
    follow(src, values, from, steps, true)
}

/// Like [`walk`], but a reported moment may also be an inner change (the
/// argument `abs`, `min` or `max` picks) that leaves the result as it was.
fn walk_loose(src: &str, values: &[(&str, Val)], from: i64, steps: usize) {
    follow(src, values, from, steps, false);
}

fn follow(src: &str, values: &[(&str, Val)], from: i64, steps: usize, strict: bool) -> Vec<(i64, Val)> {
    let c = compiled(src);
    let slots = slots(values);
    let eval = |t: i64| {
        let mut next = None;
        let v = c.eval(&slots, t, &mut next);
        (v, next)
    };
    let (mut t, mut seen) = (from, Vec::new());
    for _ in 0..steps {
        let (v, next) = eval(t);
        seen.push((t, v.clone()));
        let Some(next) = next else { break };
        assert!(next > t, "{src}: next {next} <= {t}");
        for probe in [t + 1, t + (next - t) / 2, next - 1].into_iter().filter(|&p| p > t && p < next) {
            assert_eq!(eval(probe).0, v, "{src}: changed early, at {probe}");
        }
        if strict {
            assert_ne!(eval(next).0, v, "{src}: no change at {next}");
        }
        t = next;
    }
    seen
}

#[test]
fn churn_risk_turns_true_one_ms_after_thirty_days() {
    let src = "orders_lifetime > 0 and now - last_order_time > 30d";
    let at = T + 30 * DAY_MS;
    assert_eq!(run_at(src, &churn_values(1.0), NOW), (Val::Bool(false), Some(at + 1)));
    assert_eq!(run_at(src, &churn_values(1.0), at), (Val::Bool(false), Some(at + 1)));
    assert_eq!(run_at(src, &churn_values(1.0), at + 1), (Val::Bool(true), None));
    // No orders: the rule cannot turn true with time, so nothing is scheduled.
    assert_eq!(run_at(src, &churn_values(0.0), NOW), (Val::Bool(false), None));
    let seen = walk(src, &churn_values(1.0), NOW, 5);
    assert_eq!(seen, vec![(NOW, Val::Bool(false)), (at + 1, Val::Bool(true))]);
}

#[test]
fn each_comparison_flips_at_its_boundary() {
    let at = T + 30 * DAY_MS;
    let cases = [
        ("now - last_order_time > 30d", at + 1),
        ("now - last_order_time >= 30d", at),
        ("now - last_order_time < 30d", at),
        ("now - last_order_time <= 30d", at + 1),
        ("now - last_order_time == 30d", at),
        ("now - last_order_time != 30d", at),
        ("30d < now - last_order_time", at + 1),
        ("last_order_time + 30d < now", at + 1),
        ("-(now - last_order_time) < -30d", at + 1),
        ("2 * (now - last_order_time) > 60d", at + 1),
        ("(now - last_order_time) / 2 > 15d", at + 1),
    ];
    for (src, want) in cases {
        assert_eq!(run_at(src, &churn_values(1.0), NOW).1, Some(want), "{src}");
        walk(src, &churn_values(1.0), NOW, 4);
    }
}

#[test]
fn nothing_is_scheduled_without_a_pending_flip() {
    let values = churn_values(1.0);
    for src in
        ["orders_lifetime > 0", "now - last_order_time > 5d", "now > 0", "now - now > 0", "top(m) == \"a\""]
    {
        assert_eq!(run_at(src, &values, NOW).1, None, "{src}");
    }
    // An earlier moment already noted is kept.
    let mut next = Some(NOW + 5);
    compiled("now - last_order_time > 30d").eval(&slots(&values), NOW, &mut next);
    assert_eq!(next, Some(NOW + 5));
}

#[test]
fn equality_with_a_future_moment() {
    let values = [("t", num((NOW + 500) as f64))];
    assert_eq!(run_at("now == t", &values, NOW), (Val::Bool(false), Some(NOW + 500)));
    assert_eq!(run_at("now == t", &values, NOW + 500), (Val::Bool(true), Some(NOW + 501)));
    assert_eq!(run_at("now == t", &values, NOW + 501), (Val::Bool(false), None));
    assert_eq!(run_at("now in (1, 2)", &[], 0), (Val::Bool(false), Some(1)));
}

#[test]
fn lifecycle_schedules_the_nearest_stage_change() {
    let src = r#"case when orders_lifetime == 0 then "prospect"
        when now - last_order_time > 180d then "churned"
        when now - first_order_time < 13mo then "new"
        when now - first_order_time < 24mo then "established"
        else "loyal" end"#;
    let first = NOW - 100 * DAY_MS;
    let mut values = vec![("orders_lifetime", num(2.0)), ("first_order_time", num(first as f64))];
    values.push(("last_order_time", num(T as f64)));
    assert_eq!(run_at(src, &values, NOW), (text("new"), Some(T + 180 * DAY_MS + 1)));
    let seen = walk(src, &values, NOW, 5);
    assert_eq!(seen, vec![(NOW, text("new")), (T + 180 * DAY_MS + 1, text("churned"))]);
    // A recent order keeps the user out of "churned": new → established → loyal.
    values[2] = ("last_order_time", num((NOW + 900 * DAY_MS) as f64));
    let stages: Vec<Val> = walk(src, &values, NOW, 3).into_iter().map(|(_, v)| v).collect();
    assert_eq!(stages, vec![text("new"), text("established"), text("loyal")]);
    assert_eq!(run_at(src, &values, NOW).1, Some(first + 13 * MONTH_MS));
}

#[test]
fn rfm_band_moves_at_each_threshold() {
    let src = "6 - band(days(now - last_order_time), 7, 30, 90, 180)";
    let values = [("last_order_time", num(T as f64))];
    let seen = walk(src, &values, NOW, 10);
    let times: Vec<i64> = seen.iter().map(|(t, _)| *t).collect();
    let at = |d: i64| T + d * DAY_MS;
    assert_eq!(times, vec![NOW, at(30), at(90), at(180)]);
    let scores: Vec<Val> = seen.into_iter().map(|(_, v)| v).collect();
    assert_eq!(scores, vec![num(4.0), num(3.0), num(2.0), num(1.0)]);
    walk("band(now - last_order_time, 1d, 7d, 30d)", &values, T, 10);
}

#[test]
fn step_functions_and_remainders() {
    let t = NOW - 10 * DAY_MS - 12 * HOUR_MS;
    let values = [("t", num(t as f64))];
    assert_eq!(run_at("floor(days(now - t))", &values, NOW), (num(10.0), Some(t + 11 * DAY_MS)));
    walk("floor(days(now - t))", &values, NOW, 4);
    walk("ceil(hours(now - t) / 5)", &values, NOW, 4);
    walk("round(days(now - t))", &values, NOW, 4);
    // 12 hours into the day now; true during the first hour of each day.
    let src = "(now - t) % 1d < 1h";
    assert_eq!(run_at(src, &values, NOW), (Val::Bool(false), Some(t + 11 * DAY_MS)));
    let seen = walk(src, &values, NOW, 5);
    let want = [NOW, t + 11 * DAY_MS, t + 11 * DAY_MS + HOUR_MS, t + 12 * DAY_MS, t + 12 * DAY_MS + HOUR_MS];
    assert_eq!(seen.iter().map(|(t, _)| *t).collect::<Vec<_>>(), want);
}

#[test]
fn abs_min_and_max_track_their_crossings() {
    let t = NOW + 2 * HOUR_MS;
    let values = [("t", num(t as f64)), ("x", num((NOW + 100) as f64))];
    assert_eq!(run_at("abs(now - t) < 1h", &values, NOW), (Val::Bool(false), Some(t - HOUR_MS + 1)));
    walk_loose("abs(now - t) < 1h", &values, NOW, 4);
    // min(now, x) follows now, then stops at x: its slope changes after x.
    assert_eq!(run_at("min(now, x)", &values, NOW), (num(NOW as f64), Some(NOW + 101)));
    assert_eq!(run_at("max(now, x)", &values, NOW), (num((NOW + 100) as f64), Some(NOW + 101)));
    walk_loose("min(now, x) >= x - 10", &values, NOW, 4);
    walk_loose("max(now - t, t - now) > 1h", &values, NOW, 4);
}

#[test]
fn only_evaluated_branches_schedule() {
    let values = [("t", num(NOW as f64)), ("vip", Val::Bool(true))];
    assert_eq!(run_at("if(vip, true, now - t > 1d)", &values, NOW).1, None);
    assert_eq!(run_at("vip or now - t > 1d", &values, NOW).1, None);
    assert_eq!(run_at("coalesce(x, now - t) > 1d", &values, NOW).1, Some(NOW + DAY_MS + 1));
    assert_eq!(run_at("if(vip, now - t > 1d, false)", &values, NOW).1, Some(NOW + DAY_MS + 1));
}

/// Found by the property test in CI: the slope of `hours(now) + now` against
/// `1h + now` is `1 - (1 + 1/3600000)`, which loses ten digits to
/// cancellation, so the linear model placed the crossing about five seconds
/// after the real one (at year 2380). The reported moment must still be the
/// first millisecond the evaluated result differs.
#[test]
fn a_crossing_misplaced_by_cancellation_is_found_by_the_real_condition() {
    let src = "not (case when (x > 1) then (1h + now) else x end < (hours(now) + now))";
    let values = [("x", num(2.0))];
    let seen = walk(src, &values, 0, 4);
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (at, value) = &seen[1];
    assert_eq!(value, &Val::Bool(false));
    // The first differing millisecond lies within seconds of the exact crossing at 3600000 h.
    assert!((at - 3_600_000 * HOUR_MS).abs() < 10_000, "{at}");
    // Far from the crossing, in both directions, the same holds.
    walk(src, &values, 3_600_000 * HOUR_MS - 40 * DAY_MS, 4);
    walk(src, &[("x", num(0.5))], 0, 4);
}
