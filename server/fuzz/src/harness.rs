//! One fuzz case of the tag-rule language. Shared by the libFuzzer target
//! (`server/fuzz`) and by `server/tests/integration/expr_fuzz_harness.rs`, which runs
//! the seed corpus in every test run; each includes this file next to an
//! `expr` module.
//!
//! Input layout: an input whose first byte is 0 is `[now: 8 bytes LE, the
//! first being that 0][slot bytes: 2 per catalog name]` then the rule text
//! (lossy UTF-8). Any other input (a seed file of plain rule text, say) is
//! all text, evaluated at a fixed `now` with `Null` slots. Slot bytes pick
//! a value of any type, the declared one or not, non-finite numbers too.
//!
//! Checked for every input: compiling never panics; a compiled rule
//! evaluates without panicking to `Null` or a value of its declared type,
//! never to a non-finite number; its next change, if any, is after `now`;
//! evaluating again gives the same value and next change.

use super::expr::{compile, Limits, Type, Val};

/// The names a rule may use, with their types (slot = position).
pub const CATALOG: &[(&str, Type)] = &[
    ("orders_lifetime", Type::Num),
    ("last_order_time", Type::Num),
    ("first_order_time", Type::Num),
    ("spend_365d", Type::Num),
    ("browse_cat_7d", Type::Map),
    ("order_cat_7d", Type::Map),
    ("registration.city", Type::Str),
    ("vip", Type::Bool),
    ("tags", Type::Set),
    ("x", Type::Num),
];

/// 2023-11-14T22:13:20Z, for inputs too short to carry a clock.
const DEFAULT_NOW: i64 = 1_700_000_000_000;

/// What one input did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The text was rejected with a compile error.
    Rejected,
    /// It compiled and evaluated; `changes` = a next change was reported.
    Evaluated { changes: bool },
}

fn resolve(name: &str) -> Option<(usize, Type)> {
    CATALOG.iter().position(|(n, _)| *n == name).map(|i| (i, CATALOG[i].1))
}

/// A slot value from two bytes: the first picks the kind, the second a
/// magnitude or a size.
fn slot_value(kind: u8, b: u8, now: i64) -> Val {
    let strings = ["phone", "laptop", "", "shoes", "beijing"];
    let s = |i: u8| strings[i as usize % strings.len()].to_string();
    match kind % 12 {
        0 => Val::Null,
        1 => Val::Bool(b.is_multiple_of(2)),
        2 => Val::Num(b as f64),
        3 => Val::Num(now as f64 - b as f64 * 86_400_000.0),
        4 => Val::Num(now as f64 + b as f64 * 3_600_000.0),
        5 => Val::Num([f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, f64::MAX, f64::MIN][b as usize % 6]),
        6 => Val::Num(-(b as f64) / 7.0),
        7 => Val::Str(s(b)),
        8 => Val::Set((0..b % 4).map(s).collect()),
        9 => Val::Map((0..b % 4).map(|i| (s(i.wrapping_add(b)), (b / (i + 1)) as f64)).collect()),
        10 => Val::Map([(s(b), f64::NAN)].into_iter().collect()),
        _ => Val::Num(now as f64),
    }
}

/// Runs one input; panics only if a checked property fails (which the
/// fuzzer reports as a crash).
pub fn run(data: &[u8]) -> Outcome {
    let header = 8 + 2 * CATALOG.len();
    let (now, slots, text) = if data.first() == Some(&0) && data.len() >= header {
        let now = i64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let slots = (0..CATALOG.len()).map(|i| slot_value(data[8 + 2 * i], data[9 + 2 * i], now)).collect();
        (now, slots, &data[header..])
    } else {
        (DEFAULT_NOW, vec![Val::Null; CATALOG.len()], data)
    };
    let src = String::from_utf8_lossy(text);
    let Ok(rule) = compile(&src, &resolve, &Limits::default()) else {
        return Outcome::Rejected;
    };
    let mut next = None;
    let value = rule.eval(&slots, now, &mut next);
    assert!(value.ty().is_none_or(|t| t == rule.ty()), "{src:?}: {value:?} is not a {}", rule.ty());
    if let Val::Num(n) = value {
        assert!(n.is_finite(), "{src:?}: non-finite result {n}");
    }
    if let Some(t) = next {
        assert!(t > now, "{src:?}: next change {t} is not after now {now}");
    }
    let mut again = None;
    let repeat = rule.eval(&slots, now, &mut again);
    assert_eq!(format!("{repeat:?}"), format!("{value:?}"), "{src:?}: a second evaluation differs");
    assert_eq!(again, next, "{src:?}: a second evaluation reports another next change");
    Outcome::Evaluated { changes: next.is_some() }
}
