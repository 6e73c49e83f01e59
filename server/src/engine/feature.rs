//! Feature state: per-bucket accumulators, updated in O(1) per event and
//! merged over at most one window's buckets when read.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::expr::Val;
use super::filter::Filter;
use super::window::Window;
use crate::limits::MAX_DISTINCT_PER_BUCKET;
use crate::model::{Event, Value};
use crate::schema::{Aggregation, FeatureSpec, ValueType};

/// A feature ready to use: its spec with the window and filter built.
#[derive(Debug, Clone)]
pub struct CompiledFeature {
    pub name: String,
    pub spec: FeatureSpec,
    pub window: Option<Window>,
    pub filter: Option<Filter>,
    /// Changes when the definition changes; stored state with another
    /// fingerprint is discarded.
    pub fingerprint: u64,
}

/// One bucket's accumulator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Acc {
    Count(u64),
    Sum {
        sum: f64,
        count: u64,
    },
    Min(f64),
    Max(f64),
    Distinct(BTreeSet<String>),
    First(i64),
    Last(i64),
    LastValue {
        time: i64,
        value: Value,
    },
    Counts(BTreeMap<String, u64>),
    /// Anchored count: event times in `[first, first + window)`, sorted.
    Times(Vec<i64>),
}

/// A feature's buckets, ascending by bucket index (one bucket, index 0, for
/// lifetime features).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeatureState {
    pub buckets: Vec<(i64, Acc)>,
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

/// The text a value is counted under by `distinct_count` and `top_k`.
pub fn value_key(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
    }
}

impl CompiledFeature {
    /// Whether the event feeds this feature (family and filter).
    pub fn wants(&self, event: &Event) -> bool {
        event.family == self.spec.family && self.filter.as_ref().is_none_or(|f| f.matches(event))
    }

    fn bucket_of(&self, t: i64) -> i64 {
        self.window.map_or(0, |w| w.bucket_of(t))
    }

    /// The first bucket index still inside the window at `now`.
    fn first_live(&self, now: i64) -> i64 {
        self.window.map_or(i64::MIN, |w| w.horizon(now) + 1)
    }

    /// A fresh accumulator for the event, or `None` if the event lacks a
    /// usable attribute.
    fn seed(&self, event: &Event) -> Option<Acc> {
        let attr = || self.spec.attr.as_ref().and_then(|a| event.attrs.get(a));
        Some(match self.spec.agg {
            Aggregation::Count => Acc::Count(1),
            Aggregation::Sum | Aggregation::Avg => Acc::Sum { sum: number(attr()?)?, count: 1 },
            Aggregation::Min => Acc::Min(number(attr()?)?),
            Aggregation::Max => Acc::Max(number(attr()?)?),
            Aggregation::DistinctCount => Acc::Distinct(BTreeSet::from([value_key(attr()?)])),
            Aggregation::FirstTime => Acc::First(event.time_ms),
            Aggregation::LastTime => Acc::Last(event.time_ms),
            Aggregation::LastValue => Acc::LastValue { time: event.time_ms, value: attr()?.clone() },
            Aggregation::TopK => Acc::Counts(BTreeMap::from([(value_key(attr()?), 1)])),
        })
    }

    /// Anchored count: keeps the times within `window` of the first event.
    fn add_anchored(&self, state: &mut FeatureState, t: i64) -> bool {
        let span = self.spec.window_ms.unwrap_or(i64::MAX);
        if state.buckets.is_empty() {
            state.buckets.push((0, Acc::Times(Vec::new())));
        }
        let Some((_, Acc::Times(times))) = state.buckets.first_mut() else { return false };
        let before = times.clone();
        let pos = times.partition_point(|x| *x <= t);
        times.insert(pos, t);
        let end = times[0].saturating_add(span);
        times.retain(|x| *x < end);
        times.truncate(MAX_DISTINCT_PER_BUCKET);
        *times != before
    }

    /// Folds an event in at logical time `now`. Returns whether the state
    /// changed. Events already outside the window are ignored.
    pub fn add(&self, state: &mut FeatureState, event: &Event, now: i64) -> bool {
        if self.spec.anchor_first {
            return self.add_anchored(state, event.time_ms);
        }
        let first_live = self.first_live(now);
        let expired = state.buckets.partition_point(|(b, _)| *b < first_live);
        state.buckets.drain(..expired);
        let b = self.bucket_of(event.time_ms);
        if b < first_live {
            return false;
        }
        let Some(seed) = self.seed(event) else { return false };
        match state.buckets.binary_search_by_key(&b, |(i, _)| *i) {
            Ok(pos) => merge(&mut state.buckets[pos].1, seed),
            Err(pos) => state.buckets.insert(pos, (b, seed)),
        }
        true
    }

    /// The feature's value at `now`.
    pub fn value(&self, state: &FeatureState, now: i64) -> Val {
        if self.spec.anchor_first {
            return match state.buckets.first() {
                Some((_, Acc::Times(t))) => Val::Num(t.len() as f64),
                _ => Val::Num(0.0),
            };
        }
        // Buckets are ascending: the live ones are a suffix.
        let first_live = self.first_live(now);
        let live = &state.buckets[state.buckets.partition_point(|(b, _)| *b < first_live)..];
        match live.first() {
            None => self.empty(),
            Some((_, first)) => self.fold(first, live.iter().map(|(_, acc)| acc)),
        }
    }

    /// Combines live buckets by reference (reads clone only the result).
    /// `first` is the first of `live`, and tells the aggregation.
    fn fold<'a>(&self, first: &Acc, live: impl Iterator<Item = &'a Acc> + Clone) -> Val {
        let nums = |f: fn(&Acc) -> Option<f64>| live.clone().filter_map(f);
        match first {
            Acc::Count(_) => {
                Val::Num(nums(|a| if let Acc::Count(n) = a { Some(*n as f64) } else { None }).sum())
            }
            Acc::Sum { .. } => {
                let (mut sum, mut count) = (0.0, 0u64);
                for a in live.clone() {
                    if let Acc::Sum { sum: s, count: c } = a {
                        sum += s;
                        count += c;
                    }
                }
                finite(if self.spec.agg == Aggregation::Avg { sum / count as f64 } else { sum })
            }
            Acc::Min(_) => finite(
                nums(|a| if let Acc::Min(x) = a { Some(*x) } else { None }).fold(f64::INFINITY, f64::min),
            ),
            Acc::Max(_) => finite(
                nums(|a| if let Acc::Max(x) = a { Some(*x) } else { None }).fold(f64::NEG_INFINITY, f64::max),
            ),
            Acc::First(_) => Val::Num(
                nums(|a| if let Acc::First(t) = a { Some(*t as f64) } else { None })
                    .fold(f64::INFINITY, f64::min),
            ),
            Acc::Last(_) => Val::Num(
                nums(|a| if let Acc::Last(t) = a { Some(*t as f64) } else { None })
                    .fold(f64::NEG_INFINITY, f64::max),
            ),
            Acc::Distinct(_) => {
                let mut set: BTreeSet<&str> = BTreeSet::new();
                for v in live
                    .clone()
                    .filter_map(|a| if let Acc::Distinct(s) = a { Some(s) } else { None })
                    .flatten()
                {
                    if set.len() < MAX_DISTINCT_PER_BUCKET || set.contains(v.as_str()) {
                        set.insert(v);
                    }
                }
                Val::Num(set.len() as f64)
            }
            Acc::Counts(_) => {
                // Built once, with owned keys: a key is cloned only when new.
                let mut map: BTreeMap<String, f64> = BTreeMap::new();
                for (k, n) in
                    live.clone().filter_map(|a| if let Acc::Counts(m) = a { Some(m) } else { None }).flatten()
                {
                    if let Some(total) = map.get_mut(k.as_str()) {
                        *total += *n as f64;
                    } else if map.len() < MAX_DISTINCT_PER_BUCKET {
                        map.insert(k.clone(), *n as f64);
                    }
                }
                Val::Map(map)
            }
            Acc::LastValue { .. } => {
                // Later event time wins; on a tie, the later bucket.
                let mut best: Option<(i64, &Value)> = None;
                for a in live.clone() {
                    if let Acc::LastValue { time, value } = a {
                        if best.is_none_or(|(t, _)| *time >= t) {
                            best = Some((*time, value));
                        }
                    }
                }
                best.map_or(Val::Null, |(_, v)| typed(v, self.spec.value_type))
            }
            Acc::Times(t) => Val::Num(t.len() as f64),
        }
    }

    /// When the value can next change without a new event: the moment the
    /// oldest live bucket leaves the window.
    pub fn next_change(&self, state: &FeatureState, now: i64) -> Option<i64> {
        if self.spec.anchor_first {
            return None;
        }
        let w = self.window?;
        let first_live = self.first_live(now);
        state.buckets.iter().find(|(b, _)| *b >= first_live).map(|(b, _)| w.leaves_at(*b))
    }

    fn empty(&self) -> Val {
        match self.spec.agg {
            Aggregation::Count | Aggregation::Sum | Aggregation::DistinctCount => Val::Num(0.0),
            Aggregation::TopK => Val::Map(BTreeMap::new()),
            _ => Val::Null,
        }
    }
}

fn finite(x: f64) -> Val {
    if x.is_finite() {
        Val::Num(x)
    } else {
        Val::Null
    }
}

/// An attribute value as a rule value of the declared type (else null).
pub fn typed(value: &Value, ty: ValueType) -> Val {
    match (ty, value) {
        (ValueType::Str, Value::Str(s)) => Val::Str(s.clone()),
        (ValueType::Num, v) => number(v).map_or(Val::Null, finite),
        (ValueType::Bool, Value::Bool(b)) => Val::Bool(*b),
        _ => Val::Null,
    }
}

/// Merges `other` into `acc` (both of the same aggregation).
fn merge(acc: &mut Acc, other: Acc) {
    match (acc, other) {
        (Acc::Count(a), Acc::Count(b)) => *a += b,
        (Acc::Sum { sum, count }, Acc::Sum { sum: s, count: c }) => {
            *sum += s;
            *count += c;
        }
        (Acc::Min(a), Acc::Min(b)) => *a = a.min(b),
        (Acc::Max(a), Acc::Max(b)) => *a = a.max(b),
        (Acc::Distinct(a), Acc::Distinct(b)) => {
            for v in b {
                if a.len() < MAX_DISTINCT_PER_BUCKET || a.contains(&v) {
                    a.insert(v);
                }
            }
        }
        (Acc::First(a), Acc::First(b)) => *a = (*a).min(b),
        (Acc::Last(a), Acc::Last(b)) => *a = (*a).max(b),
        // Later event time wins; on a tie, the later applied event.
        (Acc::LastValue { time, value }, Acc::LastValue { time: t, value: v }) if t >= *time => {
            *time = t;
            *value = v;
        }
        (Acc::Counts(a), Acc::Counts(b)) => {
            for (k, n) in b {
                if a.len() < MAX_DISTINCT_PER_BUCKET || a.contains_key(&k) {
                    *a.entry(k).or_insert(0) += n;
                }
            }
        }
        _ => {} // different aggregations never meet: a state is reset when its spec changes
    }
}
