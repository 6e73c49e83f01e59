//! Evaluates a [`Node`] tree. Never panics and never fails: anything that
//! cannot produce a value produces `Null`.
//!
//! `Null` rules: arithmetic and strict functions of `Null` are `Null`;
//! comparisons and `in` involving `Null` are false; in a boolean position
//! (`and`, `or`, `not`, `when`, `if`) `Null` counts as false. Division or
//! remainder by zero, and any non-finite result, are `Null`.
//!
//! Every number carries its slope with respect to `now`, so comparisons can
//! report when passing time will flip them (see `next_change`). Products and
//! quotients of two `now`-dependent numbers use the tangent slope.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use super::ast::{ArithOp, CmpOp};
use super::check::Node;
use super::functions::{self, ArgAt, Func};
use super::next_change::Schedule;
use super::{Type, Val};

/// A value with its slope with respect to `now` (0 unless a number).
pub(super) struct Ev<'a> {
    pub val: Cow<'a, Val>,
    pub slope: f64,
}

impl<'a> Ev<'a> {
    pub fn null() -> Ev<'a> {
        Ev::owned(Val::Null)
    }

    pub fn owned(val: Val) -> Ev<'a> {
        Ev { val: Cow::Owned(val), slope: 0.0 }
    }

    pub fn boolean(b: bool) -> Ev<'a> {
        Ev::owned(Val::Bool(b))
    }

    /// A number; `Null` if it is not finite.
    pub fn number(value: f64, slope: f64) -> Ev<'a> {
        if !value.is_finite() {
            return Ev::null();
        }
        Ev { val: Cow::Owned(Val::Num(value)), slope: if slope.is_finite() { slope } else { 0.0 } }
    }

    pub fn is_null(&self) -> bool {
        self.val.is_null()
    }

    /// `true` only for `Bool(true)`: `Null` counts as false.
    pub fn truthy(&self) -> bool {
        matches!(*self.val, Val::Bool(true))
    }

    /// The number and its slope.
    pub fn as_num(&self) -> Option<(f64, f64)> {
        match *self.val {
            Val::Num(n) => Some((n, self.slope)),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &*self.val {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_set(&self) -> Option<&BTreeSet<String>> {
        match &*self.val {
            Val::Set(set) => Some(set),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&BTreeMap<String, f64>> {
        match &*self.val {
            Val::Map(map) => Some(map),
            _ => None,
        }
    }
}

/// What one evaluation reads and where it records flip times.
pub(super) struct Ctx<'a, 'n> {
    pub slots: &'a [Val],
    pub schedule: Schedule<'n>,
}

pub(super) fn eval<'a>(node: &'a Node, cx: &mut Ctx<'a, '_>) -> Ev<'a> {
    match node {
        Node::Lit(v) => Ev { val: Cow::Borrowed(v), slope: 0.0 },
        Node::Now => Ev::number(cx.schedule.now() as f64, 1.0),
        Node::Slot(i, ty) => slot(cx.slots, *i, *ty),
        Node::Neg(x) => eval(x, cx).as_num().map_or_else(Ev::null, |(v, s)| Ev::number(-v, -s)),
        Node::Not(x) => Ev::boolean(!eval(x, cx).truthy()),
        Node::And(items) => Ev::boolean(items.iter().all(|x| eval(x, cx).truthy())),
        Node::Or(items) => Ev::boolean(items.iter().any(|x| eval(x, cx).truthy())),
        Node::Arith(op, a, b) => arith(*op, a, b, cx),
        Node::Cmp(op, a, b) => Ev::boolean(compare(*op, a, b, cx)),
        Node::In { value, list, negated } => Ev::boolean(member(value, list, *negated, cx)),
        Node::Case { arms, default } => case(arms, default.as_deref(), cx),
        Node::Band(x, thresholds) => band(x, thresholds, cx),
        Node::Call(func, args) => call(*func, args, cx),
    }
}

/// A slot's value; `Null` when missing, of another type, or not finite.
fn slot(slots: &[Val], i: usize, ty: Type) -> Ev<'_> {
    match slots.get(i) {
        Some(Val::Num(n)) if !n.is_finite() => Ev::null(),
        Some(v) if v.ty() == Some(ty) => Ev { val: Cow::Borrowed(v), slope: 0.0 },
        _ => Ev::null(),
    }
}

/// The number `node` evaluates to at time `t`, computed exactly as a full
/// evaluation at `t` would, recording nothing: settles flip times.
fn num_at(slots: &[Val], node: &Node, t: i64) -> Option<f64> {
    let mut cx = Ctx { slots, schedule: Schedule::probe(t) };
    eval(node, &mut cx).as_num().map(|(v, _)| v)
}

fn arith<'a>(op: ArithOp, a: &'a Node, b: &'a Node, cx: &mut Ctx<'a, '_>) -> Ev<'a> {
    let Some((x, sx)) = eval(a, cx).as_num() else { return Ev::null() };
    let Some((y, sy)) = eval(b, cx).as_num() else { return Ev::null() };
    let slots = cx.slots;
    let ratio_at = |t| Some(num_at(slots, a, t)? / num_at(slots, b, t)?);
    match op {
        ArithOp::Add => Ev::number(x + y, sx + sy),
        ArithOp::Sub => Ev::number(x - y, sx - sy),
        ArithOp::Mul => Ev::number(x * y, sx * y + x * sy),
        ArithOp::Div | ArithOp::Rem if y == 0.0 => Ev::null(),
        ArithOp::Div => Ev::number(x / y, (sx * y - x * sy) / (y * y)),
        ArithOp::Rem => remainder((x, sx), (y, sy), &mut cx.schedule, &ratio_at),
    }
}

/// `x % y = x - q·y` with `q = trunc(x / y)`: linear in time while `q` stays
/// put, so note when `x / y` leaves the interval that truncates to `q`.
fn remainder(
    (x, sx): (f64, f64),
    (y, sy): (f64, f64),
    schedule: &mut Schedule,
    ratio_at: &dyn Fn(i64) -> Option<f64>,
) -> Ev<'static> {
    let (ratio, slope) = (x / y, (sx * y - x * sy) / (y * y));
    let q = ratio.trunc();
    let (low, low_op, high, high_op) = if q > 0.0 {
        (q, CmpOp::Ge, q + 1.0, CmpOp::Lt)
    } else if q < 0.0 {
        (q - 1.0, CmpOp::Gt, q, CmpOp::Le)
    } else {
        (-1.0, CmpOp::Gt, 1.0, CmpOp::Lt)
    };
    if slope.is_finite() {
        schedule.flip(low_op, ratio - low, slope, |t| ratio_at(t).is_some_and(|r| low_op.holds(r - low)));
        schedule.flip(high_op, ratio - high, slope, |t| ratio_at(t).is_some_and(|r| high_op.holds(r - high)));
    }
    Ev::number(x % y, sx - q * sy)
}

fn compare<'a>(op: CmpOp, left: &'a Node, right: &'a Node, cx: &mut Ctx<'a, '_>) -> bool {
    let (a, b) = (eval(left, cx), eval(right, cx));
    match (&*a.val, &*b.val) {
        (Val::Num(x), Val::Num(y)) => {
            let slots = cx.slots;
            let holds_at = |t| match (num_at(slots, left, t), num_at(slots, right, t)) {
                (Some(x), Some(y)) => op.test(x.partial_cmp(&y)),
                _ => false,
            };
            cx.schedule.flip(op, x - y, a.slope - b.slope, holds_at);
            op.test(x.partial_cmp(y))
        }
        (Val::Str(x), Val::Str(y)) => op.test(Some(x.cmp(y))),
        (Val::Bool(x), Val::Bool(y)) => op.test(Some(x.cmp(y))),
        _ => false,
    }
}

fn member<'a>(node: &'a Node, list: &[Val], negated: bool, cx: &mut Ctx<'a, '_>) -> bool {
    let value = eval(node, cx);
    if value.is_null() {
        return false;
    }
    if let Some((x, s)) = value.as_num() {
        let slots = cx.slots;
        for item in list {
            if let Val::Num(y) = *item {
                cx.schedule.flip(CmpOp::Eq, x - y, s, |t| num_at(slots, node, t) == Some(y));
            }
        }
    }
    list.iter().any(|item| *item == *value.val) != negated
}

fn case<'a>(arms: &'a [(Node, Node)], default: Option<&'a Node>, cx: &mut Ctx<'a, '_>) -> Ev<'a> {
    for (cond, value) in arms {
        if eval(cond, cx).truthy() {
            return eval(value, cx);
        }
    }
    default.map_or_else(Ev::null, |value| eval(value, cx))
}

/// `band(x, t1, ..., tn)` = 1 + the number of thresholds `<= x`.
fn band<'a>(node: &'a Node, thresholds: &[f64], cx: &mut Ctx<'a, '_>) -> Ev<'a> {
    let Some((x, s)) = eval(node, cx).as_num() else { return Ev::null() };
    let slots = cx.slots;
    for &threshold in thresholds {
        let holds_at = |t| num_at(slots, node, t).is_some_and(|x| x >= threshold);
        cx.schedule.flip(CmpOp::Ge, x - threshold, s, holds_at);
    }
    let below = thresholds.iter().filter(|&&t| t <= x).count();
    Ev::number(below as f64 + 1.0, 0.0)
}

fn call<'a>(func: Func, args: &'a [Node], cx: &mut Ctx<'a, '_>) -> Ev<'a> {
    match func {
        Func::If => {
            let chosen = if args.first().is_some_and(|c| eval(c, cx).truthy()) { 1 } else { 2 };
            args.get(chosen).map_or_else(Ev::null, |branch| eval(branch, cx))
        }
        Func::Coalesce => {
            for arg in args {
                let ev = eval(arg, cx);
                if !ev.is_null() {
                    return ev;
                }
            }
            Ev::null()
        }
        Func::IsNull => Ev::boolean(args.first().is_none_or(|x| eval(x, cx).is_null())),
        _ => {
            let mut values = Vec::with_capacity(args.len());
            for arg in args {
                let ev = eval(arg, cx);
                if ev.is_null() {
                    return Ev::null();
                }
                values.push(ev);
            }
            let slots = cx.slots;
            let arg_at = |t: i64, i: usize| num_at(slots, args.get(i)?, t);
            let at: ArgAt = &arg_at;
            functions::apply(func, &values, &mut cx.schedule, at).unwrap_or_else(Ev::null)
        }
    }
}
