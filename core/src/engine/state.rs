//! A user's feature and tag state (stored in the `state` column family under
//! the user id) and the
//! incremental update: [`Engine::observe`] per event, [`Engine::settle`]
//! once per touched user per entry, [`Engine::read`] for serving.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::expr::Val;
use super::feature::{typed, FeatureState};
use super::Engine;
use crate::model::{Event, Value};
use crate::rules;

/// A tag's current value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagState {
    pub value: Val,
    /// Logical time the value last changed.
    pub changed_at: i64,
    /// When the value could next change with time alone (from the rule).
    pub next_change: Option<i64>,
}

/// Everything the engine keeps for one user, laid out in the engine's
/// order: `features[i]` belongs to `engine.features[i]`, `tags[i]` to
/// `engine.tags[i]`, `attrs[i]` to `engine.attrs[i]`. Each entry carries the
/// identity it was computed for (a feature's spec fingerprint, a hash of the
/// tag name or attribute key), so state written under an older schema is
/// re-laid out by identity ([`Engine::align`]) and never misread. Apply, the
/// hot path, then works by index: no name lookups, no names stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    /// Per feature: (spec fingerprint, buckets).
    pub features: Vec<(u64, FeatureState)>,
    /// Per declared attribute: (key id, (event time, latest value)).
    pub attrs: Vec<(u64, Option<(i64, Value)>)>,
    /// Per tag: (name id, state; `None` until first evaluated).
    pub tags: Vec<(u64, Option<TagState>)>,
    /// When a tag could next change with time alone; the timer index holds
    /// the same moment.
    pub wake_at: Option<i64>,
}

/// Slots changed by the events of one entry, per user: a bit set (apply
/// fills and tests one per touched user per entry).
#[derive(Debug, Clone, Default)]
pub struct Dirty {
    words: Vec<u64>,
}

impl Dirty {
    pub fn new() -> Dirty {
        Dirty::default()
    }

    /// Adds `slot`; returns whether it was absent.
    pub fn insert(&mut self, slot: usize) -> bool {
        let (w, bit) = (slot / 64, 1u64 << (slot % 64));
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let absent = self.words[w] & bit == 0;
        self.words[w] |= bit;
        absent
    }

    pub fn contains(&self, slot: usize) -> bool {
        self.words.get(slot / 64).is_some_and(|w| w & (1u64 << (slot % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Adds every slot of `other`.
    pub fn union_with(&mut self, other: &Dirty) {
        if self.words.len() < other.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
    }

    /// Becomes a copy of `other`, keeping this set's allocation.
    pub fn copy_from(&mut self, other: &Dirty) {
        self.words.clear();
        self.words.extend_from_slice(&other.words);
    }

    /// The slots, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(i, w)| (0..64).filter(move |b| w & (1u64 << b) != 0).map(move |b| i * 64 + b))
    }
}

impl FromIterator<usize> for Dirty {
    fn from_iter<I: IntoIterator<Item = usize>>(slots: I) -> Dirty {
        let mut set = Dirty::new();
        for s in slots {
            set.insert(s);
        }
        set
    }
}

/// Whether two tag identities name the same tag (their rules may differ).
fn same_tag(a: u64, b: u64) -> bool {
    a & super::build::TAG_NAME_HALF == b & super::build::TAG_NAME_HALF
}

impl Engine {
    /// Whether `state` is laid out for this engine: one entry per feature,
    /// tag and attribute, in order. A tag's entry may still hold the value
    /// of an earlier rule (its identity's rule half differs): the next
    /// settle evaluates it.
    fn laid_out(&self, state: &UserState) -> bool {
        state.features.len() == self.features.len()
            && state.tags.len() == self.tags.len()
            && state.attrs.len() == self.attrs.len()
            && state.features.iter().zip(&self.features).all(|((fp, _), f)| *fp == f.fingerprint)
            && state.tags.iter().zip(&self.tags).all(|((id, _), t)| same_tag(*id, t.id))
            && state.attrs.iter().zip(&self.attrs).all(|((id, _), a)| *id == a.id)
    }

    /// Whether `state` is laid out for this engine and every stored tag was
    /// evaluated with its current rule.
    fn aligned(&self, state: &UserState) -> bool {
        self.laid_out(state) && state.tags.iter().zip(&self.tags).all(|((id, _), t)| *id == t.id)
    }

    /// Lays `state` out for this engine: entries are matched by identity;
    /// what the schema no longer has is dropped, what is new starts empty,
    /// and a feature whose definition changed starts over. A tag whose rule
    /// changed keeps its entry (under its old identity) until it is settled.
    pub fn align(&self, state: &mut UserState) {
        self.align_reset(state);
    }

    /// [`Engine::align`], returning the slots of the features whose state
    /// started over (new, or redefined): the tags that read them may hold
    /// a value of the state that was.
    pub fn align_reset(&self, state: &mut UserState) -> Dirty {
        let mut reset = Dirty::new();
        if self.laid_out(state) {
            return reset;
        }
        let old = std::mem::take(state);
        state.wake_at = old.wake_at;
        state.features = self
            .features
            .iter()
            .enumerate()
            .map(|(slot, f)| {
                let kept = old.features.iter().find(|(fp, _)| *fp == f.fingerprint);
                if kept.is_none() {
                    reset.insert(slot);
                }
                (f.fingerprint, kept.map(|(_, st)| st.clone()).unwrap_or_default())
            })
            .collect();
        state.tags = self
            .tags
            .iter()
            .map(|t| {
                let kept = old.tags.iter().find(|(id, _)| *id == t.id);
                match kept.or_else(|| old.tags.iter().find(|(id, ts)| same_tag(*id, t.id) && ts.is_some())) {
                    Some((id, ts)) => (*id, ts.clone()),
                    None => (t.id, None),
                }
            })
            .collect();
        state.attrs = self
            .attrs
            .iter()
            .map(|a| (a.id, old.attrs.iter().find(|(id, _)| *id == a.id).and_then(|(_, v)| v.clone())))
            .collect();
        reset
    }

    /// A tag's stored state by name (`None`: unknown tag or not evaluated).
    pub fn tag_state<'a>(&self, state: &'a UserState, name: &str) -> Option<&'a TagState> {
        let i = self.tags.iter().position(|t| t.name == name)?;
        let (id, ts) = state.tags.get(i)?;
        (*id == self.tags[i].id).then_some(ts.as_ref()).flatten()
    }

    /// Folds one event into the user's features and declared attributes.
    /// A feature whose state started over (a schema change redefined it)
    /// is marked changed, as apply does from apply rules version 4.
    pub fn observe(&self, state: &mut UserState, event: &Event, now: i64, dirty: &mut Dirty) {
        dirty.union_with(&self.align_reset(state));
        self.observe_aligned(state, event, now, dirty);
    }

    /// [`Engine::observe`] for a state already laid out for this engine
    /// ([`Engine::align`]): apply aligns each user once per entry, not per
    /// event.
    pub fn observe_aligned(&self, state: &mut UserState, event: &Event, now: i64, dirty: &mut Dirty) {
        self.observe_by(state, event, now, rules::NEWEST, dirty);
    }

    /// [`Engine::observe_aligned`] by apply rules version `rules`.
    pub fn observe_by(&self, state: &mut UserState, event: &Event, now: i64, rules: u32, dirty: &mut Dirty) {
        debug_assert!(self.laid_out(state));
        for (i, f) in self.features.iter().enumerate() {
            if f.wants_by(event, rules) && f.add_by(&mut state.features[i].1, event, now, rules) {
                dirty.insert(i);
            }
        }
        for (i, a) in self.attrs.iter().enumerate() {
            let Some(value) = (a.family == event.family).then(|| event.attrs.get(&a.attr)).flatten() else {
                continue;
            };
            let latest = &mut state.attrs[i].1;
            if latest.as_ref().is_none_or(|(t, _)| *t <= event.time_ms) {
                *latest = Some((event.time_ms, value.clone()));
                dirty.insert(self.attr_slot(i));
            }
        }
    }

    /// Re-evaluates the tags affected by `dirty` (and, when the user's wake
    /// time has come, every time-dependent tag) at logical time `now`, then
    /// recomputes the wake time. Returns the names of tags whose value changed.
    /// By this build's newest apply rules; a replicated state goes by its
    /// shard's ([`Engine::settle_aligned`]).
    pub fn settle(&self, state: &mut UserState, dirty: &Dirty, now: i64) -> Vec<String> {
        self.settle_by(state, dirty, now, rules::NEWEST)
    }

    /// [`Engine::settle`] by apply rules version `rules`.
    pub fn settle_by(&self, state: &mut UserState, dirty: &Dirty, now: i64, rules: u32) -> Vec<String> {
        let mut reset = self.align_reset(state);
        let dirty = match rules >= rules::RESET_FEATURES_RESETTLE && !reset.is_empty() {
            true => {
                reset.union_with(dirty);
                &reset
            }
            false => dirty,
        };
        let mut changed = Vec::new();
        SLOTS.with_borrow_mut(|slots| self.settle_with(state, dirty, now, rules, slots, Some(&mut changed)));
        changed
    }

    /// [`Engine::settle_by`] for a state already laid out for this engine,
    /// without collecting the names of the tags that changed (apply's path).
    pub fn settle_aligned(&self, state: &mut UserState, dirty: &Dirty, now: i64, rules: u32) {
        debug_assert!(self.laid_out(state));
        SLOTS.with_borrow_mut(|slots| self.settle_with(state, dirty, now, rules, slots, None));
    }

    fn settle_with(
        &self,
        state: &mut UserState,
        dirty: &Dirty,
        now: i64,
        rules: u32,
        slots: &mut Slots,
        mut changed: Option<&mut Vec<String>>,
    ) {
        let due_at = state.wake_at.filter(|w| *w <= now);
        let input_times = rules >= rules::INPUT_CHANGE_TIMES;
        slots.reset(self, now, rules);
        slots.changed.copy_from(dirty);
        for (i, tag) in self.tags.iter().enumerate() {
            // Never evaluated, or evaluated with an earlier rule.
            let fresh = state.tags[i].1.is_none() || state.tags[i].0 != tag.id;
            state.tags[i].0 = tag.id;
            let by_input = tag.rule.slots().iter().any(|s| slots.changed.contains(*s));
            let by_time = due_at.is_some() && tag.time_dependent;
            if !(fresh || by_input || by_time) {
                // Only a later rule reads a tag's slot.
                if let (true, Some(ts)) = (tag.read_by_tags, &state.tags[i].1) {
                    slots.set(tag.slot, ts.value.clone());
                }
                continue;
            }
            slots.fill(self, state, tag.rule.slots());
            let mut next = None;
            let value = tag.rule.eval(&slots.values, now, &mut next);
            if tag.read_by_tags {
                slots.set(tag.slot, value.clone());
            }
            match &mut state.tags[i].1 {
                Some(ts) if ts.value == value => ts.next_change = next,
                stored => {
                    // A change found only because time passed happened at the
                    // scheduled moment, not at this (later) tick: the tag's
                    // own next change when it had one, else the user's wake
                    // time (a window's edge).
                    let scheduled = stored.as_ref().and_then(|t| t.next_change).filter(|t| *t <= now);
                    let by_schedule = || match (scheduled, due_at) {
                        (Some(t), due) => due.map_or(t, |d| t.max(d)),
                        (None, due) => due.unwrap_or(now),
                    };
                    let at = if fresh {
                        now
                    } else if input_times && by_input {
                        // Changed by its inputs: no earlier than the latest
                        // of them changed (an event: `now`; a tag: its own
                        // change time), and no earlier than its own
                        // schedule when that came too. From then on, every
                        // input has held its new value, so the tag has.
                        let inputs = tag.rule.slots().iter().filter(|s| slots.changed.contains(**s));
                        let latest = inputs.map(|&s| slots.at[s]).max().unwrap_or(now);
                        if by_time {
                            latest.max(by_schedule())
                        } else {
                            latest
                        }
                    } else if by_input {
                        // Apply rules version 1: the entry's time.
                        now
                    } else {
                        by_schedule()
                    };
                    *stored = Some(TagState { value, changed_at: at, next_change: next });
                    slots.at[tag.slot] = at;
                    slots.changed.insert(tag.slot);
                    if let Some(names) = changed.as_deref_mut() {
                        names.push(tag.name.clone());
                    }
                }
            }
        }
        state.wake_at = self.wake_at(state, now);
    }

    /// The earliest moment after `now` a tag could change without an event.
    fn wake_at(&self, state: &UserState, now: i64) -> Option<i64> {
        let from_rules = state.tags.iter().filter_map(|(_, t)| t.as_ref()?.next_change);
        let windowed = self.tags.iter().filter(|t| t.time_dependent).flat_map(|t| t.rule.slots().iter());
        let from_windows = windowed.filter_map(|&s| {
            let f = self.features.get(s)?;
            f.next_change(&state.features[s].1, now)
        });
        from_rules.chain(from_windows).filter(|t| *t > now).min()
    }

    /// Feature values and tag values as of `now` (wall clock, for reads).
    /// Stored tags are current until the wake time; past it they are
    /// re-evaluated here (the tick that persists them may not have run yet).
    /// By this build's newest apply rules ([`Engine::read_by`]).
    pub fn read(&self, state: &UserState, now: i64) -> (BTreeMap<String, Val>, BTreeMap<String, TagState>) {
        self.read_by(state, now, rules::NEWEST)
    }

    /// [`Engine::read`] re-evaluating by apply rules version `rules` (the
    /// shard's: what its next tick stores).
    pub fn read_by(
        &self,
        state: &UserState,
        now: i64,
        rules: u32,
    ) -> (BTreeMap<String, Val>, BTreeMap<String, TagState>) {
        // Past the wake time, or the schema changed and the background
        // re-evaluation has not reached this user yet.
        let stale = !self.aligned(state)
            || state.tags.iter().any(|(_, t)| t.is_none())
            || state.wake_at.is_some_and(|w| w <= now);
        let fresh;
        let state = if stale {
            let mut copy = state.clone();
            self.settle_by(&mut copy, &Dirty::new(), now, rules);
            fresh = copy;
            &fresh
        } else {
            state
        };
        let features = self
            .features
            .iter()
            .zip(&state.features)
            .map(|(f, (_, st))| (f.name.clone(), f.value_by(st, now, rules)))
            .collect();
        let tags = self
            .tags
            .iter()
            .zip(&state.tags)
            .filter_map(|(t, (_, ts))| Some((t.name.clone(), ts.clone()?)))
            .collect();
        (features, tags)
    }
}

/// Slot values, filled lazily (feature values are merged from buckets only
/// when a rule needs them).
#[derive(Default)]
struct Slots {
    values: Vec<Val>,
    filled: Vec<bool>,
    /// The input slots that changed and the tags whose value changed.
    changed: Dirty,
    /// When each changed slot changed: `now` for an event's input, a tag's
    /// `changed_at` for a tag (scheduled moments of time-driven tags).
    at: Vec<i64>,
    now: i64,
    /// The apply rules version features are read by.
    rules: u32,
}

thread_local! {
    /// Each thread's slots, reused by every settle (two vectors per touched
    /// user per entry otherwise).
    static SLOTS: std::cell::RefCell<Slots> = std::cell::RefCell::new(Slots::default());
}

impl Slots {
    fn reset(&mut self, engine: &Engine, now: i64, rules: u32) {
        let n = engine.n_slots();
        self.values.clear();
        self.values.resize(n, Val::Null);
        self.filled.clear();
        self.filled.resize(n, false);
        self.at.clear();
        self.at.resize(n, now);
        self.now = now;
        self.rules = rules;
    }

    fn set(&mut self, slot: usize, value: Val) {
        self.values[slot] = value;
        self.filled[slot] = true;
    }

    fn fill(&mut self, engine: &Engine, state: &UserState, needed: &[usize]) {
        let n_features = engine.features.len();
        let attrs_from = engine.attr_slot(0);
        for &s in needed {
            if self.filled[s] {
                continue;
            }
            if s < n_features {
                let value = engine.features[s].value_by(&state.features[s].1, self.now, self.rules);
                self.set(s, value);
            } else if s >= attrs_from {
                let i = s - attrs_from;
                let value =
                    state.attrs[i].1.as_ref().map_or(Val::Null, |(_, v)| typed(v, engine.attrs[i].ty));
                self.set(s, value);
            }
            // Tag slots are set as tags are evaluated, in dependency order.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::check_schema;

    const DAY: i64 = 86_400_000;
    const NOW: i64 = 1_000 * DAY;

    #[test]
    fn dirty_is_a_set_of_slots() {
        let mut d = Dirty::new();
        assert!(d.is_empty() && !d.contains(0) && !d.contains(500));
        assert!(d.insert(3));
        assert!(!d.insert(3), "second insert reports present");
        assert!(d.insert(64) && d.insert(300) && d.insert(0));
        assert!(d.contains(3) && d.contains(64) && d.contains(300) && d.contains(0));
        assert!(!d.contains(2) && !d.contains(63) && !d.contains(65) && !d.contains(10_000));
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![0, 3, 64, 300]);
        assert!([300, 0, 64, 3].into_iter().collect::<Dirty>().iter().eq(d.iter()));
        assert!(!d.is_empty());
    }

    fn engine(toml: &str) -> Engine {
        check_schema(toml).unwrap().1
    }

    fn order(id: &str, time_ms: i64, amount: i64) -> Event {
        Event {
            user_id: "u".into(),
            family: "trade".into(),
            event_type: "order".into(),
            time_ms,
            event_id: id.into(),
            attrs: [("amount".to_string(), Value::Int(amount))].into(),
        }
    }

    fn apply(engine: &Engine, state: &mut UserState, events: &[Event], now: i64) {
        let mut dirty = Dirty::new();
        for e in events {
            engine.observe(state, e, now, &mut dirty);
        }
        engine.settle(state, &dirty, now);
    }

    /// The `trade` family the test schemas share.
    const TRADE: &str = "[families.trade]\nttl = \"none\"\nattrs = { amount = \"num\" }";

    const BEFORE: &str = r#"
[families.trade]
ttl = "none"
attrs = { amount = "num" }
[features.orders]
family = "trade"
agg = "count"
[features.spend_30d]
family = "trade"
agg = "sum"
attr = "amount"
window = "30d"
[tags.buyer]
rule = 'orders > 0'
[tags.big]
rule = 'spend_30d >= 100'
"#;

    // `orders` renamed (same definition), `spend_30d` redefined (7d),
    // `repeat` new (reads the `trade.amount` attribute), `big` removed.
    const AFTER: &str = r#"
[families.trade]
ttl = "none"
attrs = { amount = "num" }
[features.aaa_orders]
family = "trade"
agg = "count"
[features.spend_30d]
family = "trade"
agg = "sum"
attr = "amount"
window = "7d"
[tags.buyer]
rule = 'aaa_orders > 0'
[tags.repeat]
rule = 'aaa_orders >= 2 and trade.amount > 10'
"#;

    /// Tags `a` and `b`, changed by time alone 1 and 5 days after the
    /// first order.
    const TIME_DRIVEN: &str = r#"
[features.first_order_time]
family = "trade"
agg = "first_time"
[tags.a]
rule = 'days(now - first_order_time) > 1'
[tags.b]
rule = 'days(now - first_order_time) > 5'
"#;

    #[test]
    fn a_tag_changed_by_time_alone_records_its_own_scheduled_moment() {
        let engine = engine(&format!("{TRADE}{TIME_DRIVEN}"));
        let mut state = UserState::default();
        apply(&engine, &mut state, &[order("o1", NOW, 5)], NOW);
        let wake = state.wake_at.expect("a wakes the user");
        assert!(wake > NOW + DAY && wake <= NOW + DAY + 1, "{wake}");
        // One late tick, after both moments: each keeps its own.
        engine.settle(&mut state, &Dirty::new(), NOW + 6 * DAY);
        let at = |name| engine.tag_state(&state, name).unwrap().changed_at;
        assert_eq!(at("a"), wake);
        assert_eq!(at("b"), wake + 4 * DAY);
    }

    /// Apply rules version 2 (`rules::INPUT_CHANGE_TIMES`): a tag that
    /// reads a time-driven tag changes when that tag did, not at the tick;
    /// a tag that also reads an event's input changes at the event. Version
    /// 1 keeps the tick's time (replicas on it must agree).
    #[test]
    fn a_tag_changed_by_a_time_driven_tag_takes_its_change_time_from_version_2() {
        let engine = engine(&format!(
            r#"{TRADE}{TIME_DRIVEN}
[features.orders]
family = "trade"
agg = "count"
[tags.not_a]
rule = 'not a'
[tags.both]
rule = 'a and b'
[tags.a_and_two]
rule = 'a and orders >= 2'
"#
        ));
        let late_tick = |rules: u32| {
            let mut state = UserState::default();
            apply(&engine, &mut state, &[order("o1", NOW, 5)], NOW);
            engine.settle_by(&mut state, &Dirty::new(), NOW + 6 * DAY, rules);
            let at = |name| engine.tag_state(&state, name).unwrap().changed_at;
            (at("a"), at("b"), at("not_a"), at("both"), state)
        };
        let (a, b, not_a, both, mut state) = late_tick(2);
        assert_eq!((a, b), (NOW + DAY + 1, NOW + 5 * DAY + 1), "each at its own moment");
        assert_eq!(not_a, a, "not a: when a changed");
        assert_eq!(both, b, "a and b: when the later of them changed");
        // A second order changes `a_and_two` at the event, though `a`
        // changed long before.
        let second = NOW + 7 * DAY;
        let mut dirty = Dirty::new();
        engine.observe(&mut state, &order("o2", second, 5), second, &mut dirty);
        engine.settle_by(&mut state, &dirty, second, 2);
        assert_eq!(engine.tag_state(&state, "a_and_two").unwrap().changed_at, second);

        let (a, b, not_a, both, _) = late_tick(1);
        assert_eq!((a, b), (NOW + DAY + 1, NOW + 5 * DAY + 1), "version 1: the tags' own moments too");
        assert_eq!((not_a, both), (NOW + 6 * DAY, NOW + 6 * DAY), "version 1: the tick's time");
        // The read path re-evaluates by the shard's version.
        let mut state = UserState::default();
        apply(&engine, &mut state, &[order("o1", NOW, 5)], NOW);
        let (_, v1) = engine.read_by(&state, NOW + 6 * DAY, 1);
        let (_, v2) = engine.read_by(&state, NOW + 6 * DAY, 2);
        assert_eq!((v1["not_a"].changed_at, v2["not_a"].changed_at), (NOW + 6 * DAY, NOW + DAY + 1));
    }

    #[test]
    fn state_is_laid_out_in_engine_order_without_names() {
        let e = engine(BEFORE);
        let mut state = UserState::default();
        apply(&e, &mut state, &[order("1", NOW - DAY, 120)], NOW);
        assert_eq!(state.features.len(), 2);
        assert_eq!(state.tags.len(), 2);
        assert_eq!(state.attrs.len(), 1);
        assert_eq!(e.tag_state(&state, "buyer").unwrap().value, Val::Bool(true));
        assert_eq!(e.tag_state(&state, "big").unwrap().value, Val::Bool(true));
        assert_eq!(e.tag_state(&state, "nope"), None);
        // Compact bincode (varint integers), as the server's store writes it.
        use bincode::Options;
        let compact = || bincode::DefaultOptions::new().with_varint_encoding();
        let encoded = compact().serialize(&state).unwrap();
        assert!(!encoded.windows(3).any(|w| w == b"big"), "names are not stored");
        let decoded: UserState = compact().deserialize(&encoded).unwrap();
        assert_eq!(decoded, state);
    }

    #[test]
    fn a_schema_change_keeps_state_by_identity() {
        let (before, after) = (engine(BEFORE), engine(AFTER));
        let mut state = UserState::default();
        apply(&before, &mut state, &[order("1", NOW - 2 * DAY, 120)], NOW);
        let buyer_since = before.tag_state(&state, "buyer").unwrap().changed_at;

        // Read under the new schema before anything re-lays the state out.
        let (features, tags) = after.read(&state, NOW + 1);
        assert_eq!(features["aaa_orders"], Val::Num(1.0), "renamed feature keeps its buckets");
        assert_eq!(features["spend_30d"], Val::Num(0.0), "redefined feature starts over");
        assert_eq!(tags["buyer"].changed_at, buyer_since, "unchanged tag keeps its change time");
        assert_eq!(tags["repeat"].value, Val::Bool(false));
        assert!(!tags.contains_key("big"));

        apply(&after, &mut state, &[order("2", NOW, 50)], NOW + 10);
        assert_eq!(state.features.len(), 2);
        assert_eq!(state.tags.len(), 2);
        assert_eq!(after.tag_state(&state, "buyer").unwrap().changed_at, buyer_since);
        assert_eq!(after.tag_state(&state, "repeat").unwrap().value, Val::Bool(true));
        assert_eq!(after.tag_state(&state, "big"), None);
        let (features, _) = after.read(&state, NOW + 10);
        assert_eq!(features["aaa_orders"], Val::Num(2.0));
        assert_eq!(features["spend_30d"], Val::Num(50.0));

        // And back: what the newer schema dropped comes back empty, not stale.
        before.align(&mut state);
        assert_eq!(before.tag_state(&state, "big"), None);
        assert_eq!(before.features[1].value(&state.features[1].1, NOW + 10), Val::Num(0.0));
        assert!(before.laid_out(&state));
    }

    /// A feature redefined by a schema change starts over, and the tags
    /// that read it are evaluated again at the user's next settle or read
    /// (apply rules version 4), not only once the re-evaluation reaches
    /// the user or an input of theirs changes.
    #[test]
    fn a_tag_reading_a_redefined_feature_is_evaluated_again() {
        let schema = |window: &str| {
            format!(
                "{TRADE}\n[features.spend]\nfamily = \"trade\"\nagg = \"sum\"\nattr = \"amount\"\nwindow = \"{window}\"\n\
                 [tags.big]\nrule = 'spend >= 100'\n"
            )
        };
        let (v1, v2) = (engine(&schema("30d")), engine(&schema("7d")));
        let mut state = UserState::default();
        apply(&v1, &mut state, &[order("o1", NOW - DAY, 120)], NOW);
        assert_eq!(v1.tag_state(&state, "big").unwrap().value, Val::Bool(true));
        // A read under v2 before any re-evaluation: the feature is 0, and so
        // is the tag that reads it.
        let (features, tags) = v2.read(&state, NOW + 5);
        assert_eq!(features["spend"], Val::Num(0.0));
        assert_eq!((&tags["big"].value, tags["big"].changed_at), (&Val::Bool(false), NOW + 5));
        let (_, old) = v2.read_by(&state, NOW + 5, crate::rules::FULL_BUCKET_KEEPS_OLDER);
        assert_eq!(old["big"].value, Val::Bool(true), "version 3 kept the stale value");
        // A settle for another reason (here: nothing dirty) re-evaluates it.
        let mut settled = state.clone();
        v2.settle(&mut settled, &Dirty::new(), NOW + 6);
        assert_eq!(v2.tag_state(&settled, "big").unwrap().value, Val::Bool(false));
        let mut kept = state.clone();
        v2.settle_by(&mut kept, &Dirty::new(), NOW + 6, crate::rules::FULL_BUCKET_KEEPS_OLDER);
        assert_eq!(v2.tag_state(&kept, "big").unwrap().value, Val::Bool(true));
    }

    /// A tag whose rule changed is evaluated with its new rule at the next
    /// settle (a schema change's re-evaluation) and on read, even when its
    /// rule reads only other tags, or nothing at all; one whose value the
    /// new rule keeps keeps its change time.
    #[test]
    fn a_changed_rule_is_evaluated_even_when_nothing_it_reads_changed() {
        let schema = |vip: &str, off: &str, heavy: &str| {
            format!(
                "{TRADE}\n[features.orders]\nfamily = \"trade\"\nagg = \"count\"\n[tags.heavy]\nrule = '{heavy}'\n\
                 [tags.vip]\nrule = '{vip}'\n[tags.off]\nrule = '{off}'\n"
            )
        };
        let v1 = engine(&schema("heavy", "true", "orders > 0"));
        let v2 = engine(&schema("not heavy", "false", "orders >= 1"));
        let mut state = UserState::default();
        apply(&v1, &mut state, &[order("o1", NOW, 5)], NOW);
        let value = |e: &Engine, s: &UserState, name| e.tag_state(s, name).map(|t| t.value.clone());
        assert_eq!(value(&v1, &state, "vip"), Some(Val::Bool(true)));
        assert_eq!(value(&v1, &state, "off"), Some(Val::Bool(true)));

        // A read under v2 before the re-evaluation reached the user.
        let (_, tags) = v2.read(&state, NOW + 5);
        assert_eq!((&tags["vip"].value, tags["vip"].changed_at), (&Val::Bool(false), NOW + 5));
        assert_eq!(tags["off"].value, Val::Bool(false));
        assert_eq!((&tags["heavy"].value, tags["heavy"].changed_at), (&Val::Bool(true), NOW), "kept");

        // The re-evaluation: every input slot dirty, as `Reevaluate` does.
        v2.settle(&mut state, &v2.all_inputs(), NOW + 10);
        assert!(v2.aligned(&state));
        assert_eq!(value(&v2, &state, "vip"), Some(Val::Bool(false)));
        assert_eq!(value(&v2, &state, "off"), Some(Val::Bool(false)));
        assert_eq!(v2.tag_state(&state, "heavy").unwrap().changed_at, NOW, "same value: same change time");
        assert_eq!(v2.tag_state(&state, "vip").unwrap().changed_at, NOW + 10);
        // Back to v1: the rules changed again.
        v1.settle(&mut state, &Dirty::new(), NOW + 20);
        assert_eq!(value(&v1, &state, "vip"), Some(Val::Bool(true)));
        assert_eq!(value(&v1, &state, "off"), Some(Val::Bool(true)));
    }
}
