//! Tests for the expression language, by area, with a small catalog of
//! names shared by all of them.

mod errors;
mod examples;
mod functions;
mod operators;
mod props;
mod schedule;

use std::collections::{BTreeMap, BTreeSet};

use super::{compile, Compiled, Limits, Type, Val};

/// 2023-11-14T22:13:20Z.
pub(super) const NOW: i64 = 1_700_000_000_000;

pub(super) const CATALOG: &[(&str, Type)] = &[
    ("orders_lifetime", Type::Num),
    ("last_order_time", Type::Num),
    ("first_order_time", Type::Num),
    ("spend_365d", Type::Num),
    ("model_score", Type::Num),
    ("browse_cat_7d", Type::Map),
    ("order_cat_7d", Type::Map),
    ("browse_cat_30d", Type::Map),
    ("registration.city", Type::Str),
    ("x", Type::Num),
    ("y", Type::Num),
    ("t", Type::Num),
    ("s", Type::Str),
    ("vip", Type::Bool),
    ("tags", Type::Set),
    ("other", Type::Set),
    ("m", Type::Map),
];

pub(super) fn resolve(name: &str) -> Option<(usize, Type)> {
    CATALOG.iter().position(|(n, _)| *n == name).map(|i| (i, CATALOG[i].1))
}

pub(super) fn compiled(src: &str) -> Compiled {
    compile(src, &resolve, &Limits::default()).unwrap_or_else(|e| panic!("{src}: {e}"))
}

/// Slot values by name; every other slot is `Null`.
pub(super) fn slots(values: &[(&str, Val)]) -> Vec<Val> {
    let mut out = vec![Val::Null; CATALOG.len()];
    for (name, value) in values {
        let (i, _) = resolve(name).unwrap_or_else(|| panic!("no slot {name}"));
        out[i] = value.clone();
    }
    out
}

/// Evaluates `src` at `now`: the value and the next change.
pub(super) fn run_at(src: &str, values: &[(&str, Val)], now: i64) -> (Val, Option<i64>) {
    let mut next = None;
    let value = compiled(src).eval(&slots(values), now, &mut next);
    (value, next)
}

pub(super) fn run(src: &str, values: &[(&str, Val)]) -> Val {
    run_at(src, values, NOW).0
}

/// The compile error of `src`: line, column, message.
pub(super) fn error(src: &str) -> (u32, u32, String) {
    match compile(src, &resolve, &Limits::default()) {
        Ok(_) => panic!("{src}: compiled"),
        Err(e) => (e.line, e.col, e.message),
    }
}

pub(super) fn num(n: f64) -> Val {
    Val::Num(n)
}

pub(super) fn text(s: &str) -> Val {
    Val::Str(s.to_owned())
}

pub(super) fn set(items: &[&str]) -> Val {
    Val::Set(items.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>())
}

pub(super) fn map(pairs: &[(&str, f64)]) -> Val {
    Val::Map(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>())
}
