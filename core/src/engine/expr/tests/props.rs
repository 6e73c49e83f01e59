//! Property tests: `compile` and `eval` never panic, whatever the input.

use proptest::prelude::*;

use super::*;
use crate::duration::{DAY_MS, HOUR_MS};

const TOKENS: &[&str] = &[
    "(",
    ")",
    ",",
    "+",
    "-",
    "*",
    "/",
    "%",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "=",
    "!",
    ".",
    "\"",
    "and",
    "or",
    "not",
    "in",
    "case",
    "when",
    "then",
    "else",
    "end",
    "true",
    "false",
    "null",
    "now",
    "0",
    "1",
    "-1",
    "2.5",
    "30d",
    "13mo",
    "0.0",
    "\"a\"",
    "\"\"",
    "x",
    "y",
    "t",
    "vip",
    "s",
    "tags",
    "other",
    "m",
    "registration.city",
    "abs",
    "min",
    "max",
    "days",
    "hours",
    "floor",
    "ceil",
    "round",
    "band",
    "size",
    "keys",
    "keys_at_least",
    "difference",
    "union",
    "intersection",
    "contains",
    "top",
    "get",
    "coalesce",
    "is_null",
    "if",
    "A",
    "é",
];

const BINARY: &[&str] = &["+", "-", "*", "/", "%", "==", "!=", "<", "<=", ">", ">=", "and", "or"];

const FUNCTIONS: &[&str] = &[
    "abs",
    "min",
    "max",
    "days",
    "hours",
    "floor",
    "ceil",
    "round",
    "size",
    "keys",
    "keys_at_least",
    "difference",
    "union",
    "intersection",
    "contains",
    "top",
    "get",
    "coalesce",
    "is_null",
    "if",
];

const LEAVES: &[&str] =
    &["x", "y", "t", "now", "vip", "s", "tags", "other", "m", "1", "0", "-2", "30d", "\"a\"", "true", "null"];

fn any_val() -> impl Strategy<Value = Val> {
    let key = "[a-c]{1,2}";
    prop_oneof![
        Just(Val::Null),
        any::<bool>().prop_map(Val::Bool),
        any::<f64>().prop_map(Val::Num),
        (-2e12f64..2e12).prop_map(Val::Num),
        "[a-c]{0,2}".prop_map(Val::Str),
        prop::collection::btree_set(key, 0..4).prop_map(Val::Set),
        prop::collection::btree_map(key, any::<f64>(), 0..4).prop_map(Val::Map),
        prop::collection::btree_map(key, 0f64..5.0, 0..4).prop_map(Val::Map),
    ]
}

/// Expressions that parse; many of them also type-check.
fn expression() -> impl Strategy<Value = String> {
    let leaf = prop::sample::select(LEAVES).prop_map(String::from);
    leaf.prop_recursive(5, 48, 3, |inner| {
        prop_oneof![
            (inner.clone(), prop::sample::select(BINARY), inner.clone())
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (prop::sample::select(FUNCTIONS), prop::collection::vec(inner.clone(), 1..4))
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| format!("case when {c} then {a} else {b} end")),
            inner.clone().prop_map(|a| format!("not {a}")),
            inner.clone().prop_map(|a| format!("-{a}")),
            inner.clone().prop_map(|a| format!("{a} in (1, -2, 30d)")),
            inner.prop_map(|a| format!("band({a}, -1, 0, 1d)")),
        ]
    })
}

const NUM_LEAVES: &[&str] =
    &["x", "y", "t", "now", "now", "now", "1", "-2", "30d", "1h", "0.5", "get(m, \"a\")", "size(tags)"];
const SCALE: &[&str] = &["* 2", "* -0.5", "/ 4", "% 1d", "% 7", "- now", "+ now"];
const UNARY: &[&str] = &["abs", "days", "hours", "floor", "ceil", "round", "-"];
const CMP: &[&str] = &["==", "!=", "<", "<=", ">", ">="];

/// Boolean conditions over `num`.
fn condition(num: BoxedStrategy<String>) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (num.clone(), prop::sample::select(CMP), num.clone())
            .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
        1 => num.prop_map(|a| format!("({a} in (0, 1d, -5))")),
        1 => Just("vip".to_owned()),
    ]
}

/// Well-typed numeric expressions, piecewise linear in `now` (scaled only by
/// constants), so every change over time is one `next_change` announces.
fn numeric() -> BoxedStrategy<String> {
    let leaf = prop::sample::select(NUM_LEAVES).prop_map(String::from);
    leaf.prop_recursive(4, 24, 3, |n| {
        let cond = condition(n.clone()).boxed();
        prop_oneof![
            (n.clone(), prop::sample::select(&["+", "-"][..]), n.clone())
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (n.clone(), prop::sample::select(SCALE)).prop_map(|(a, op)| format!("({a} {op})")),
            (prop::sample::select(UNARY), n.clone()).prop_map(|(f, a)| format!("{f}({a})")),
            (prop::sample::select(&["min", "max", "coalesce"][..]), n.clone(), n.clone())
                .prop_map(|(f, a, b)| format!("{f}({a}, {b})")),
            n.clone().prop_map(|a| format!("band({a}, -1d, 0, 30d, 90d)")),
            (cond.clone(), n.clone(), n.clone()).prop_map(|(c, a, b)| format!("if({c}, {a}, {b})")),
            (cond, n.clone(), n).prop_map(|(c, a, b)| format!("case when {c} then {a} else {b} end")),
        ]
    })
    .boxed()
}

/// Well-typed boolean rules.
fn rule() -> impl Strategy<Value = String> {
    let cond = condition(numeric()).boxed();
    prop_oneof![
        cond.clone(),
        (cond.clone(), prop::sample::select(&["and", "or"][..]), cond.clone())
            .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        cond.prop_map(|a| format!("not {a}")),
    ]
}

/// `now` and slot values of the declared types: times within 200 days of
/// `now` (so rules cross their thresholds soon), or `Null`.
fn typed_slots() -> impl Strategy<Value = (i64, Vec<(&'static str, Val)>)> {
    let offset = prop_oneof![3 => (-200 * DAY_MS..200 * DAY_MS).prop_map(Some), 1 => Just(None)];
    let counts = prop::collection::btree_map("[ab]", 0f64..5.0, 0..3).prop_map(Val::Map);
    let now = 0i64..4_000_000_000_000;
    (now, offset.clone(), offset.clone(), offset, counts, any::<Option<bool>>()).prop_map(
        |(now, x, y, t, m, vip)| {
            let time = |offset: Option<i64>| offset.map_or(Val::Null, |o| num((now + o) as f64));
            let vip = vip.map_or(Val::Null, Val::Bool);
            let values = vec![("x", time(x)), ("y", time(y)), ("t", time(t)), ("m", m), ("vip", vip)];
            (now, values.into_iter().chain([("tags", set(&["a"]))]).collect())
        },
    )
}

/// Evaluates at `now` and checks what every result must satisfy.
fn check_eval(c: &Compiled, slots: &[Val], now: i64) -> Result<(), TestCaseError> {
    let mut next = None;
    let value = c.eval(slots, now, &mut next);
    prop_assert!(value.ty().is_none_or(|t| t == c.ty()), "{value:?} is not a {}", c.ty());
    if let Val::Num(n) = value {
        prop_assert!(n.is_finite());
    }
    if let Some(t) = next {
        prop_assert!(t > now);
    }
    let mut again = None;
    prop_assert_eq!(format!("{:?}", c.eval(slots, now, &mut again)), format!("{value:?}"));
    prop_assert_eq!(again, next);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn rules_hold_until_their_next_change(src in rule(), (now, values) in typed_slots()) {
        let c = match compile(&src, &resolve, &Limits::default()) {
            Ok(c) => c,
            Err(e) if e.message.contains("max_") => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("{src}: {e}"))),
        };
        let slots = slots(&values);
        let mut next = None;
        let value = c.eval(&slots, now, &mut next);
        check_eval(&c, &slots, now)?;
        let probes: Vec<i64> = match next {
            Some(n) => (0..=8).map(|k| now + 1 + (n - now - 2) * k / 8).collect(),
            None => [1, 1000, HOUR_MS, DAY_MS, 30 * DAY_MS, 400 * DAY_MS].iter().map(|d| now + d).collect(),
        };
        // Past 2^53 ms (year 287,000) a millisecond is below an f64's precision.
        let exact = |t: i64| t < 1 << 53;
        for t in probes.into_iter().filter(|&t| t > now && next.is_none_or(|n| t < n) && exact(t)) {
            let later = c.eval(&slots, t, &mut None);
            prop_assert_eq!(&later, &value, "{} changed at {} before next change {:?}", src, t, next);
        }
    }

    #[test]
    fn random_text_never_panics(src in "\\PC{0,80}") {
        let _ = compile(&src, &resolve, &Limits::default());
    }

    #[test]
    fn token_soup_never_panics(
        tokens in prop::collection::vec(prop::sample::select(TOKENS), 0..40),
        slots in prop::collection::vec(any_val(), CATALOG.len()),
        now in any::<i64>(),
    ) {
        if let Ok(c) = compile(&tokens.join(" "), &resolve, &Limits::default()) {
            check_eval(&c, &slots, now)?;
        }
    }

    #[test]
    fn well_formed_expressions_evaluate_without_panics(
        src in expression(),
        slots in prop::collection::vec(any_val(), 0..CATALOG.len() + 2),
        now in prop_oneof![any::<i64>(), -2_000_000_000_000i64..2_000_000_000_000],
    ) {
        if let Ok(c) = compile(&src, &resolve, &Limits::default()) {
            check_eval(&c, &slots, now)?;
        }
    }
}

fn sample<S: Strategy>(runner: &mut proptest::test_runner::TestRunner, strategy: &S) -> S::Value {
    use proptest::strategy::ValueTree;
    strategy.new_tree(runner).map(|tree| tree.current()).unwrap_or_else(|e| panic!("{e}"))
}

/// The generators are worth running: untyped expressions often compile,
/// typed rules always do, and many of those have a change ahead.
#[test]
fn generators_exercise_the_evaluator_and_the_schedule() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let total = 400;
    let (expressions, rules, slot_values) = (expression(), rule(), typed_slots());
    let untyped = (0..total)
        .filter(|_| compile(&sample(&mut runner, &expressions), &resolve, &Limits::default()).is_ok())
        .count();
    assert!(untyped * 10 >= total, "only {untyped} of {total} generated expressions compile");
    let (mut typed, mut scheduled) = (0, 0);
    for _ in 0..total {
        let (src, (now, values)) = (sample(&mut runner, &rules), sample(&mut runner, &slot_values));
        if let Ok(c) = compile(&src, &resolve, &Limits::default()) {
            typed += 1;
            let mut next = None;
            c.eval(&slots(&values), now, &mut next);
            scheduled += usize::from(next.is_some());
        }
    }
    assert!(typed * 10 >= total * 9, "only {typed} of {total} typed rules compile");
    assert!(scheduled * 20 >= total, "only {scheduled} of {total} typed rules schedule a change");
}
