//! Built-in functions: their signatures, for the checker, and the strict
//! ones' runtime. `if`, `coalesce` and `is_null` look at `Null` themselves
//! and only evaluate what they need, so `eval` runs them; `band` takes
//! literal thresholds and has its own node.
//!
//! Numeric functions keep track of time: `abs`, `min`, `max`, `floor`,
//! `ceil` and `round` report when a `now`-dependent argument crosses the
//! point where their formula changes (see `next_change`).

use std::collections::BTreeMap;

use super::ast::CmpOp;
use super::eval::Ev;
use super::next_change::Schedule;
use super::{Type, Val};
use crate::duration::{DAY_MS, HOUR_MS};
use crate::engine::feature::text_key;
use crate::limits::MAX_DISTINCT_PER_BUCKET;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Func {
    Abs,
    Min,
    Max,
    Days,
    Hours,
    Floor,
    Ceil,
    Round,
    Size,
    Keys,
    KeysAtLeast,
    Difference,
    Union,
    Intersection,
    Contains,
    Top,
    Get,
    Coalesce,
    IsNull,
    If,
}

/// What a parameter accepts. A `null` literal fits every parameter.
#[derive(Clone, Copy, Debug)]
pub(super) enum Param {
    Is(Type),
    /// A Set or a Map.
    Collection,
    Any,
    /// One type shared by all `Same` parameters and the result.
    Same,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Ret {
    Is(Type),
    Same,
}

pub(super) struct Sig {
    pub name: &'static str,
    pub func: Func,
    pub params: &'static [Param],
    /// The last parameter repeats: the function takes `params.len()` or more.
    pub variadic: bool,
    pub ret: Ret,
}

const NUM: Param = Param::Is(Type::Num);
const STR: Param = Param::Is(Type::Str);
const SET: Param = Param::Is(Type::Set);
const MAP: Param = Param::Is(Type::Map);
const BOOL: Param = Param::Is(Type::Bool);

const fn sig(name: &'static str, func: Func, params: &'static [Param], ret: Type) -> Sig {
    Sig { name, func, params, variadic: false, ret: Ret::Is(ret) }
}

const SIGS: &[Sig] = &[
    sig("abs", Func::Abs, &[NUM], Type::Num),
    Sig { name: "min", func: Func::Min, params: &[NUM, NUM], variadic: true, ret: Ret::Is(Type::Num) },
    Sig { name: "max", func: Func::Max, params: &[NUM, NUM], variadic: true, ret: Ret::Is(Type::Num) },
    sig("days", Func::Days, &[NUM], Type::Num),
    sig("hours", Func::Hours, &[NUM], Type::Num),
    sig("floor", Func::Floor, &[NUM], Type::Num),
    sig("ceil", Func::Ceil, &[NUM], Type::Num),
    sig("round", Func::Round, &[NUM], Type::Num),
    sig("size", Func::Size, &[Param::Collection], Type::Num),
    sig("keys", Func::Keys, &[MAP], Type::Set),
    sig("keys_at_least", Func::KeysAtLeast, &[MAP, NUM], Type::Set),
    sig("difference", Func::Difference, &[SET, SET], Type::Set),
    sig("union", Func::Union, &[SET, SET], Type::Set),
    sig("intersection", Func::Intersection, &[SET, SET], Type::Set),
    sig("contains", Func::Contains, &[Param::Collection, STR], Type::Bool),
    sig("top", Func::Top, &[MAP], Type::Str),
    sig("get", Func::Get, &[MAP, STR], Type::Num),
    Sig {
        name: "coalesce",
        func: Func::Coalesce,
        params: &[Param::Same, Param::Same],
        variadic: true,
        ret: Ret::Same,
    },
    sig("is_null", Func::IsNull, &[Param::Any], Type::Bool),
    Sig {
        name: "if",
        func: Func::If,
        params: &[BOOL, Param::Same, Param::Same],
        variadic: false,
        ret: Ret::Same,
    },
];

pub(super) fn lookup(name: &str) -> Option<&'static Sig> {
    SIGS.iter().find(|sig| sig.name == name)
}

/// Evaluates argument `i` at time `t` (for settling flip times; see
/// `Schedule::flip`); `None` if it is not a number then.
pub(super) type ArgAt<'p> = &'p dyn Fn(i64, usize) -> Option<f64>;

/// Applies a strict function to arguments that are all non-`Null`; `None`
/// means a `Null` result.
pub(super) fn apply(func: Func, args: &[Ev<'_>], schedule: &mut Schedule, at: ArgAt) -> Option<Ev<'static>> {
    let num = |i: usize| args.get(i).and_then(Ev::as_num);
    let set = |i: usize| args.get(i).and_then(Ev::as_set);
    let map = |i: usize| args.get(i).and_then(Ev::as_map);
    let text = |i: usize| args.get(i).and_then(Ev::as_str);
    // Keys come in ascending order: a set past the limit keeps the smallest
    // (the same on every replica), so a tag's state stays within its budget.
    let set_of = |keys: Vec<&String>| {
        Ev::owned(Val::Set(keys.into_iter().take(MAX_DISTINCT_PER_BUCKET).cloned().collect()))
    };
    Some(match func {
        Func::Abs => abs(num(0)?, schedule, at),
        Func::Min => extreme(args, CmpOp::Le, schedule, at)?,
        Func::Max => extreme(args, CmpOp::Ge, schedule, at)?,
        Func::Days => scaled(num(0)?, DAY_MS),
        Func::Hours => scaled(num(0)?, HOUR_MS),
        Func::Floor => floor(num(0)?, 0.0, schedule, at),
        Func::Ceil => ceil(num(0)?, schedule, at),
        Func::Round => floor(num(0)?, 0.5, schedule, at),
        Func::Size => Ev::number(size(args.first()?)? as f64, 0.0),
        Func::Keys => set_of(map(0)?.keys().collect()),
        Func::KeysAtLeast => set_of(keys_at_least(map(0)?, num(1)?.0)),
        Func::Difference => set_of(set(0)?.difference(set(1)?).collect()),
        Func::Union => set_of(set(0)?.union(set(1)?).collect()),
        Func::Intersection => set_of(set(0)?.intersection(set(1)?).collect()),
        Func::Contains => Ev::boolean(contains(args.first()?, text(1)?)?),
        Func::Top => Ev::owned(Val::Str(top(map(0)?)?.to_owned())),
        Func::Get => Ev::number(map(0)?.get(&*text_key(text(1)?)).copied().unwrap_or(0.0), 0.0),
        Func::Coalesce | Func::IsNull | Func::If => return None,
    })
}

/// Whether argument 0 at time `t` satisfies `x op bound`.
fn arg_holds(at: ArgAt<'_>, op: CmpOp, bound: f64) -> impl Fn(i64) -> bool + '_ {
    move |t| at(t, 0).is_some_and(|x| op.holds(x - bound))
}

fn abs((x, s): (f64, f64), schedule: &mut Schedule, at: ArgAt) -> Ev<'static> {
    schedule.flip(CmpOp::Ge, x, s, arg_holds(at, CmpOp::Ge, 0.0));
    let slope = if x > 0.0 {
        s
    } else if x < 0.0 {
        -s
    } else {
        s.abs()
    };
    Ev::number(x.abs(), slope)
}

/// `min` (keep = `<=`) or `max` (keep = `>=`): the extreme argument, and the
/// moments another argument overtakes it.
fn extreme(args: &[Ev<'_>], keep: CmpOp, schedule: &mut Schedule, at: ArgAt) -> Option<Ev<'static>> {
    let nums: Vec<(f64, f64)> = args.iter().map(Ev::as_num).collect::<Option<_>>()?;
    let mut best = 0;
    for (i, n) in nums.iter().enumerate() {
        // Ties go to the slope that stays extreme an instant later.
        if !keep.test(nums.get(best)?.partial_cmp(n)) {
            best = i;
        }
    }
    let (bx, bs) = *nums.get(best)?;
    for (i, &(x, s)) in nums.iter().enumerate() {
        let still_best = |t| match (at(t, best), at(t, i)) {
            (Some(b), Some(x)) => keep.test(b.partial_cmp(&x)),
            _ => false,
        };
        schedule.flip(keep, bx - x, bs - s, still_best);
    }
    Some(Ev::number(bx, bs))
}

fn scaled((x, s): (f64, f64), unit_ms: i64) -> Ev<'static> {
    let unit = unit_ms as f64;
    Ev::number(x / unit, s / unit)
}

/// `floor(x + shift)`: constant while `f <= x + shift < f + 1`. `round` is
/// `floor(x + 0.5)`.
fn floor((x, s): (f64, f64), shift: f64, schedule: &mut Schedule, at: ArgAt) -> Ev<'static> {
    let x = x + shift;
    let f = x.floor();
    let shifted = |t| at(t, 0).map(|x| x + shift);
    schedule.flip(CmpOp::Ge, x - f, s, |t| shifted(t).is_some_and(|x| x >= f));
    schedule.flip(CmpOp::Lt, x - (f + 1.0), s, |t| shifted(t).is_some_and(|x| x < f + 1.0));
    Ev::number(f, 0.0)
}

/// `ceil(x)`: constant while `c - 1 < x <= c`.
fn ceil((x, s): (f64, f64), schedule: &mut Schedule, at: ArgAt) -> Ev<'static> {
    let c = x.ceil();
    schedule.flip(CmpOp::Le, x - c, s, arg_holds(at, CmpOp::Le, c));
    schedule.flip(CmpOp::Gt, x - (c - 1.0), s, arg_holds(at, CmpOp::Gt, c - 1.0));
    Ev::number(c, 0.0)
}

fn size(arg: &Ev<'_>) -> Option<usize> {
    match &*arg.val {
        Val::Set(set) => Some(set.len()),
        Val::Map(map) => Some(map.len()),
        _ => None,
    }
}

fn keys_at_least(map: &BTreeMap<String, f64>, n: f64) -> Vec<&String> {
    map.iter().filter(|(_, &count)| count >= n).map(|(key, _)| key).collect()
}

/// Whether a feature's keys (a `distinct_count` / `top_k` map, or a set of
/// its keys) hold `key`, looked up in the form values are kept under
/// (long ones shortened: [`text_key`]).
fn contains(collection: &Ev<'_>, key: &str) -> Option<bool> {
    let key = &*text_key(key);
    match &*collection.val {
        Val::Set(set) => Some(set.contains(key)),
        Val::Map(map) => Some(map.contains_key(key)),
        _ => None,
    }
}

/// The key with the largest finite count; ties go to the smallest key.
fn top(map: &BTreeMap<String, f64>) -> Option<&str> {
    let mut best: Option<(&String, f64)> = None;
    for (key, &count) in map {
        if count.is_finite() && best.is_none_or(|(_, b)| count > b) {
            best = Some((key, count));
        }
    }
    best.map(|(key, _)| key.as_str())
}
