//! Feature state: per-bucket accumulators, updated in O(1) per event and
//! merged over at most one window's buckets when read.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::expr::Val;
use super::filter::Filter;
use super::window::Window;
use crate::limits::{MAX_DISTINCT_PER_BUCKET, MAX_DISTINCT_PER_FEATURE, MAX_DISTINCT_VALUE_BYTES};
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

/// The text a value is counted under by `distinct_count` and `top_k`: at
/// most [`MAX_DISTINCT_VALUE_BYTES`]. A longer value is cut at a character
/// boundary and ends with `~` and the FNV-1a 64 hash of the whole value in
/// 16 hex digits, so long values that share a prefix still count apart
/// (the same key on every replica).
pub fn value_key(v: &Value) -> String {
    let key = match v {
        Value::Str(s) if s.len() > MAX_DISTINCT_VALUE_BYTES => return hashed_key(s),
        Value::Str(s) => return s.clone(),
        Value::Int(i) => i.to_string(),
        // `1e300` prints 301 digits.
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
    };
    if key.len() > MAX_DISTINCT_VALUE_BYTES {
        return hashed_key(&key);
    }
    key
}

/// [`value_key`] of a string, borrowed when it is kept as it is: what
/// `contains` and `get` look a text up under in a feature's keys.
pub fn text_key(s: &str) -> std::borrow::Cow<'_, str> {
    match s.len() > MAX_DISTINCT_VALUE_BYTES {
        true => hashed_key(s).into(),
        false => s.into(),
    }
}

fn hashed_key(s: &str) -> String {
    const SUFFIX: usize = 17; // `~` and 16 hex digits
    let hash = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut cut = MAX_DISTINCT_VALUE_BYTES - SUFFIX;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash:016x}", &s[..cut])
}

/// Keys held by a `distinct_count` or `top_k` state, over all its buckets.
fn keys_held(state: &FeatureState) -> usize {
    let len = |acc: &Acc| match acc {
        Acc::Distinct(s) => s.len(),
        Acc::Counts(m) => m.len(),
        _ => 0,
    };
    state.buckets.iter().map(|(_, acc)| len(acc)).sum()
}

/// Whether merging `seed` (one new key) into `bucket` adds a key.
fn adds_key(bucket: Option<&Acc>, seed: &Acc) -> bool {
    match (bucket, seed) {
        (Some(Acc::Distinct(s)), Acc::Distinct(new)) => new.iter().any(|k| !s.contains(k)),
        (Some(Acc::Counts(m)), Acc::Counts(new)) => new.keys().any(|k| !m.contains_key(k)),
        (_, Acc::Distinct(_) | Acc::Counts(_)) => true,
        _ => false,
    }
}

/// Adds `key` at bucket `b` to a `distinct_count` state, which holds each
/// key once, in the newest bucket it was seen in: the key leaves the window
/// with that bucket, and the feature's budget counts distinct keys. Past
/// [`MAX_DISTINCT_PER_FEATURE`] keys (or [`MAX_DISTINCT_PER_BUCKET`] in
/// one bucket), new keys are not counted.
fn add_distinct(state: &mut FeatureState, b: i64, key: String) -> bool {
    let holds = |acc: &Acc| matches!(acc, Acc::Distinct(s) if s.contains(&key));
    if state.buckets.iter().any(|(i, acc)| *i >= b && holds(acc)) {
        return false;
    }
    let seen_before = state.buckets.iter().any(|(_, acc)| holds(acc));
    if !seen_before && keys_held(state) >= MAX_DISTINCT_PER_FEATURE {
        return false;
    }
    let at = state.buckets.binary_search_by_key(&b, |(i, _)| *i);
    if let Ok(pos) = at {
        if matches!(&state.buckets[pos].1, Acc::Distinct(s) if s.len() >= MAX_DISTINCT_PER_BUCKET) {
            return false;
        }
    }
    // Older copies go: a state written before keys moved may hold several.
    for (_, acc) in state.buckets.iter_mut() {
        if let Acc::Distinct(s) = acc {
            s.remove(&key);
        }
    }
    match at {
        Ok(pos) => {
            if let Acc::Distinct(s) = &mut state.buckets[pos].1 {
                s.insert(key);
            }
        }
        Err(pos) => state.buckets.insert(pos, (b, Acc::Distinct(BTreeSet::from([key])))),
    }
    state.buckets.retain(|(_, acc)| !matches!(acc, Acc::Distinct(s) if s.is_empty()));
    true
}

impl CompiledFeature {
    /// Whether the event feeds this feature (family and filter), by this
    /// build's newest apply rules.
    pub fn wants(&self, event: &Event) -> bool {
        self.wants_by(event, crate::rules::NEWEST)
    }

    /// [`CompiledFeature::wants`] by apply rules version `rules`.
    pub fn wants_by(&self, event: &Event, rules: u32) -> bool {
        event.family == self.spec.family && self.filter.as_ref().is_none_or(|f| f.matches_by(event, rules))
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

    /// Folds an event in at logical time `now` by the newest apply rules.
    /// Returns whether the state changed. Events already outside the
    /// window are ignored.
    pub fn add(&self, state: &mut FeatureState, event: &Event, now: i64) -> bool {
        self.add_by(state, event, now, crate::rules::NEWEST)
    }

    /// [`Feature::add`] by apply rules version `rules`.
    pub fn add_by(&self, state: &mut FeatureState, event: &Event, now: i64, rules: u32) -> bool {
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
        if let Acc::Distinct(keys) = &seed {
            let key = keys.first().expect("a seed holds one key").clone();
            return add_distinct(state, b, key);
        }
        let mut at = state.buckets.binary_search_by_key(&b, |(i, _)| *i);
        // A feature keeps at most MAX_DISTINCT_PER_FEATURE (bucket, key)
        // pairs (with MAX_DISTINCT_VALUE_BYTES, 64 KiB). Past it, `top_k`'s
        // oldest buckets give way to newer events (recent activity counts
        // most); an event older than every bucket left is not counted.
        let bucket = at.ok().map(|pos| &state.buckets[pos].1);
        if adds_key(bucket, &seed) {
            // A full bucket takes no new value (`merge` refuses it): nothing
            // else may give way for it.
            let full = matches!(bucket, Some(Acc::Counts(m)) if m.len() >= MAX_DISTINCT_PER_BUCKET);
            if full && rules >= crate::rules::FULL_BUCKET_KEEPS_OLDER {
                return false;
            }
            while keys_held(state) >= MAX_DISTINCT_PER_FEATURE {
                if state.buckets.first().is_none_or(|(first, _)| *first >= b) {
                    return false;
                }
                state.buckets.remove(0);
                at = state.buckets.binary_search_by_key(&b, |(i, _)| *i);
            }
        }
        match at {
            Ok(pos) => merge(&mut state.buckets[pos].1, seed),
            Err(pos) => state.buckets.insert(pos, (b, seed)),
        }
        true
    }

    /// The feature's value at `now`, by this build's newest apply rules.
    pub fn value(&self, state: &FeatureState, now: i64) -> Val {
        self.value_by(state, now, crate::rules::NEWEST)
    }

    /// [`FeatureDef::value`] by apply rules version `rules`.
    pub fn value_by(&self, state: &FeatureState, now: i64, rules: u32) -> Val {
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
            Some((_, first)) => self.fold(first, live.iter().map(|(_, acc)| acc), rules),
        }
    }

    /// Combines live buckets by reference (reads clone only the result).
    /// `first` is the first of `live`, and tells the aggregation.
    fn fold<'a>(&self, first: &Acc, live: impl Iterator<Item = &'a Acc> + Clone, rules: u32) -> Val {
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
                // Every value (the feature holds at most
                // MAX_DISTINCT_PER_FEATURE), then the top ones kept.
                let every = rules >= crate::rules::TOP_COUNTS_KEPT;
                // Built once, with owned keys: a key is cloned only when new.
                let mut map: BTreeMap<String, f64> = BTreeMap::new();
                for (k, n) in
                    live.clone().filter_map(|a| if let Acc::Counts(m) = a { Some(m) } else { None }).flatten()
                {
                    if let Some(total) = map.get_mut(k.as_str()) {
                        *total += *n as f64;
                    } else if every || map.len() < MAX_DISTINCT_PER_BUCKET {
                        map.insert(k.clone(), *n as f64);
                    }
                }
                if map.len() > MAX_DISTINCT_PER_BUCKET {
                    // Counts are whole numbers: the order is exact.
                    let mut ranked: Vec<(f64, &String)> = map.iter().map(|(k, n)| (*n, k)).collect();
                    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
                    let dropped: Vec<String> =
                        ranked[MAX_DISTINCT_PER_BUCKET..].iter().map(|(_, k)| (*k).clone()).collect();
                    for k in dropped {
                        map.remove(&k);
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

/// Worst-case encoded sizes (compact bincode: varint integers, 1-byte length
/// prefixes up to 250) behind [`CompiledFeature::max_state_bytes`].
mod worst {
    use crate::limits::{MAX_DISTINCT_VALUE_BYTES, MAX_STRING_VALUE_BYTES};

    /// A bucket's index and accumulator tag and lengths.
    pub const BUCKET: usize = 16;
    /// A number or a time.
    pub const NUM: usize = 9;
    /// A `distinct_count` / `top_k` key and its count.
    pub const KEY: usize = MAX_DISTINCT_VALUE_BYTES + 1 + NUM;
    /// An attribute value.
    pub const VALUE: usize = MAX_STRING_VALUE_BYTES + 4;
}

impl CompiledFeature {
    /// The most bytes this feature's stored state can take for one user
    /// (what [`crate::limits::MAX_USER_STATE_BYTES`] is checked against).
    pub fn max_state_bytes(&self) -> usize {
        // Live buckets, the one being entered, and the future ones events
        // up to the accepted clock skew ahead can open.
        let buckets = self
            .window
            .map_or(1, |w| (w.buckets + 2 + crate::limits::MAX_FUTURE_SKEW_MS / w.width_ms.max(1)) as usize);
        let per_bucket = |acc: usize| buckets * (worst::BUCKET + acc);
        if self.spec.anchor_first {
            return worst::BUCKET + MAX_DISTINCT_PER_BUCKET * worst::NUM;
        }
        match self.spec.agg {
            Aggregation::DistinctCount | Aggregation::TopK => {
                per_bucket(0) + MAX_DISTINCT_PER_FEATURE * worst::KEY
            }
            Aggregation::LastValue => per_bucket(worst::NUM + worst::VALUE),
            _ => per_bucket(2 * worst::NUM),
        }
    }
}

impl super::Engine {
    /// The most bytes one user's stored state can take under this engine:
    /// every feature, declared attribute and tag at its worst.
    pub fn max_state_bytes(&self) -> usize {
        use super::expr::Type;
        let identity = worst::NUM + 1;
        let features: usize = self.features.iter().map(|f| identity + f.max_state_bytes()).sum();
        let attrs = self.attrs.len() * (identity + worst::NUM + worst::VALUE);
        let tag_value = |ty: Type| match ty {
            Type::Bool | Type::Num => worst::NUM,
            // A literal of a rule (at most 4 KiB) or an attribute value.
            Type::Str => worst::VALUE,
            Type::Set | Type::Map => MAX_DISTINCT_PER_BUCKET * worst::KEY,
        };
        let tags: usize = self.tags.iter().map(|t| identity + 3 * worst::NUM + tag_value(t.rule.ty())).sum();
        features + attrs + tags + worst::NUM
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::check_schema;

    const DAY: i64 = 86_400_000;
    const NOW: i64 = 1_750_000_000_000;

    fn schema(features: &str) -> String {
        format!("[families.browse]\nttl = \"90d\"\nhistory = 5\n\n{features}")
    }

    fn feature(agg: &str) -> CompiledFeature {
        let f = format!(
            "[features.f]\nfamily = \"browse\"\nagg = \"{agg}\"\nattr = \"category\"\nwindow = \"30d\"\n"
        );
        let (_, engine) = check_schema(&schema(&f)).expect("a valid schema");
        engine.features[0].clone()
    }

    fn event(time_ms: i64, category: Value) -> Event {
        Event {
            user_id: "u".into(),
            family: "browse".into(),
            event_type: "view".into(),
            time_ms,
            event_id: String::new(),
            attrs: [("category".to_string(), category)].into(),
        }
    }

    #[test]
    fn values_count_by_their_text() {
        // docs/tag-language.md: 1, 1.0 and "1" are one value; so are true
        // and "true"; 1.5 and "1.5" too.
        let one = value_key(&Value::Int(1));
        assert_eq!(one, "1");
        assert_eq!(value_key(&Value::Float(1.0)), one);
        assert_eq!(value_key(&Value::Str("1".into())), one);
        assert_eq!(value_key(&Value::Bool(true)), value_key(&Value::Str("true".into())));
        assert_eq!(value_key(&Value::Float(1.5)), "1.5");
        assert_ne!(value_key(&Value::Float(1.5)), one);
    }

    #[test]
    fn long_values_are_cut_and_hashed_deterministically() {
        let long = |tail: &str| Value::Str(format!("{}{tail}", "é".repeat(2_000)));
        let (a, b) = (value_key(&long("a")), value_key(&long("b")));
        assert!(a.len() <= MAX_DISTINCT_VALUE_BYTES && b.len() <= MAX_DISTINCT_VALUE_BYTES, "{a}");
        assert_ne!(a, b, "values sharing a prefix count apart");
        assert_eq!(a, value_key(&long("a")), "the same key every time");
        assert!(a.starts_with("éé") && a.contains('~'), "{a}");
        assert_eq!(value_key(&Value::Str("short".into())), "short");
        assert!(value_key(&Value::Float(1e300)).len() <= MAX_DISTINCT_VALUE_BYTES);
    }

    #[test]
    fn a_feature_keeps_at_most_max_distinct_per_feature_values() {
        for agg in ["distinct_count", "top_k"] {
            let f = feature(agg);
            let mut state = FeatureState::default();
            // Two days, two buckets, 600 and 424 new values.
            for i in 0..MAX_DISTINCT_PER_FEATURE as i64 {
                let day = if i < 600 { 2 } else { 1 };
                f.add(&mut state, &event(NOW - day * DAY, Value::Int(i)), NOW);
            }
            assert_eq!(keys_held(&state), MAX_DISTINCT_PER_FEATURE, "{agg}");
            // Values already kept still count (a distinct value already in
            // its bucket changes nothing).
            let counted = f.add(&mut state, &event(NOW - DAY, Value::Int(600)), NOW);
            assert_eq!(counted, agg == "top_k", "{agg}");
            assert_eq!(keys_held(&state), MAX_DISTINCT_PER_FEATURE, "{agg}");
        }
        // distinct_count: a new value is not kept.
        let f = feature("distinct_count");
        let mut state = FeatureState::default();
        for i in 0..1_100 {
            f.add(&mut state, &event(NOW - DAY, Value::Int(i)), NOW);
        }
        assert_eq!(keys_held(&state), MAX_DISTINCT_PER_BUCKET, "a bucket's own limit");
        for i in 0..100 {
            f.add(&mut state, &event(NOW, Value::Int(2_000 + i)), NOW);
        }
        assert_eq!(keys_held(&state), MAX_DISTINCT_PER_FEATURE);
        assert!(!f.add(&mut state, &event(NOW, Value::Int(5_000)), NOW), "a new value is not kept");
        // The value counts at most MAX_DISTINCT_PER_BUCKET.
        assert_eq!(f.value(&state, NOW), Val::Num(MAX_DISTINCT_PER_BUCKET as f64));
    }

    /// A `top_k` event with a new value for a bucket that already holds
    /// MAX_DISTINCT_PER_BUCKET values is not counted, and from apply rules
    /// version 3 on drops nothing else; version 1 dropped older buckets
    /// for it first.
    #[test]
    fn a_full_top_k_bucket_takes_no_new_value_and_keeps_the_older_buckets() {
        let f = feature("top_k");
        // Today's bucket full, then older events up to the feature's limit.
        let older = (MAX_DISTINCT_PER_FEATURE - MAX_DISTINCT_PER_BUCKET) as i64;
        let fill = || {
            let mut state = FeatureState::default();
            for i in 0..MAX_DISTINCT_PER_BUCKET as i64 {
                f.add(&mut state, &event(NOW, Value::Int(i)), NOW);
            }
            for i in 0..older {
                f.add(&mut state, &event(NOW - 2 * DAY, Value::Int(10_000 + i)), NOW);
            }
            assert_eq!(keys_held(&state), MAX_DISTINCT_PER_FEATURE);
            state
        };
        let mut state = fill();
        let before = state.clone();
        let new = event(NOW, Value::Int(5_000));
        assert!(!f.add_by(&mut state, &new, NOW, crate::rules::FULL_BUCKET_KEEPS_OLDER), "not counted");
        assert_eq!(state, before, "nothing dropped");
        // A value the full bucket holds still counts.
        assert!(f.add(&mut state, &event(NOW, Value::Int(7)), NOW));
        // Version 1: the older bucket went, and the value was not counted.
        let mut state = fill();
        assert!(f.add_by(&mut state, &new, NOW, crate::rules::FIRST));
        assert_eq!(keys_held(&state), MAX_DISTINCT_PER_BUCKET, "the older bucket was dropped");
    }

    /// An older bucket holding MAX_DISTINCT_PER_BUCKET values once each,
    /// then a new value seen 20 times today: from apply rules version 4 on
    /// the value holds it (the values with the fewest counts give way);
    /// before, the newer value was left out while the older bucket lasted.
    #[test]
    fn a_top_k_value_keeps_the_values_with_the_highest_counts() {
        let f = feature("top_k");
        let mut state = FeatureState::default();
        for i in 0..MAX_DISTINCT_PER_BUCKET as i64 {
            f.add(&mut state, &event(NOW - 2 * DAY, Value::Int(i)), NOW);
        }
        for _ in 0..20 {
            assert!(f.add(&mut state, &event(NOW, Value::Str("phone".into())), NOW));
        }
        let Val::Map(top) = f.value(&state, NOW) else { panic!("a top_k value is a map") };
        assert_eq!(top.len(), MAX_DISTINCT_PER_BUCKET);
        assert_eq!(top.get("phone"), Some(&20.0));
        // Among the values seen once, the largest one gave way ("999"
        // sorts last of "0".."999").
        assert!(!top.contains_key("999") && top.contains_key("0"), "ties go to the smaller value");
        let Val::Map(before) = f.value_by(&state, NOW, crate::rules::FULL_BUCKET_KEEPS_OLDER) else {
            panic!("a map")
        };
        assert_eq!(before.get("phone"), None, "version 3 left it out");
    }

    /// Values seen again in newer buckets: the budget counts each value
    /// once for `distinct_count`, and `top_k` keeps the newest events.
    #[test]
    fn values_seen_again_keep_counting_in_newer_buckets() {
        let fill = |f: &CompiledFeature| {
            let mut state = FeatureState::default();
            for i in 0..600 {
                f.add(&mut state, &event(NOW - 2 * DAY, Value::Int(i)), NOW);
            }
            for i in 600..MAX_DISTINCT_PER_FEATURE as i64 {
                f.add(&mut state, &event(NOW - DAY, Value::Int(i)), NOW);
            }
            assert_eq!(keys_held(&state), MAX_DISTINCT_PER_FEATURE);
            state
        };

        // distinct_count: value 0 moves to today's bucket, and stays in the
        // window after the bucket of two days ago has left it.
        let f = feature("distinct_count");
        let mut state = fill(&f);
        assert!(f.add(&mut state, &event(NOW, Value::Int(0)), NOW), "a kept value seen again");
        assert!(
            !f.add(&mut state, &event(NOW - 3 * DAY, Value::Int(0)), NOW),
            "an older sighting changes nothing"
        );
        assert_eq!(keys_held(&state), MAX_DISTINCT_PER_FEATURE, "each value once");
        // 28 days on, the bucket of two days ago is out (a bucket leaves
        // the window once its start is a window old), yesterday's is in.
        let later = NOW + 28 * DAY;
        assert_eq!(f.value(&state, later), Val::Num(1.0 + (MAX_DISTINCT_PER_FEATURE - 600) as f64));

        // top_k: today's event is counted; the oldest bucket gives way.
        let f = feature("top_k");
        let mut state = fill(&f);
        assert!(f.add(&mut state, &event(NOW, Value::Int(0)), NOW), "today's event counts");
        assert!(f.add(&mut state, &event(NOW, Value::Int(5_000)), NOW), "so does a new value");
        assert_eq!(keys_held(&state), MAX_DISTINCT_PER_FEATURE - 600 + 2);
        assert_eq!(state.buckets.len(), 2, "yesterday's and today's");
        // An event older than every bucket left is not counted when full.
        for i in 0..598 {
            f.add(&mut state, &event(NOW, Value::Int(10_000 + i)), NOW);
        }
        assert_eq!(keys_held(&state), MAX_DISTINCT_PER_FEATURE);
        assert!(!f.add(&mut state, &event(NOW - 3 * DAY, Value::Int(7)), NOW));
        assert!(f.add(&mut state, &event(NOW, Value::Int(0)), NOW), "a kept key in its bucket");
        assert_eq!(keys_held(&state), MAX_DISTINCT_PER_FEATURE);
    }

    #[test]
    fn schemas_whose_user_state_could_pass_the_budget_are_rejected() {
        let (_, engine) = check_schema(crate::schema::DEFAULT_SCHEMA_TOML).expect("the demo schema");
        assert!(engine.max_state_bytes() < 2 * 1024 * 1024, "{}", engine.max_state_bytes());
        let many: String = (0..120)
            .map(|i| {
                format!(
                    "[features.f{i}]\nfamily = \"browse\"\nagg = \"top_k\"\nattr = \"c\"\nwindow = \"7d\"\n"
                )
            })
            .collect();
        let err = check_schema(&schema(&many)).unwrap_err().to_string();
        assert!(err.contains(&format!("over the limit of {}", crate::limits::MAX_USER_STATE_BYTES)), "{err}");
    }
}
