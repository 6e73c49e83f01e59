//! A user's feature and tag state (stored in the `state` column family under
//! the user id) and the
//! incremental update: [`Engine::observe`] per event, [`Engine::settle`]
//! once per touched user per entry, [`Engine::read`] for serving.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::expr::Val;
use super::feature::{typed, FeatureState};
use super::Engine;
use crate::model::{Event, Value};

/// A tag's current value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagState {
    pub value: Val,
    /// Logical time the value last changed.
    pub changed_at: i64,
    /// When the value could next change with time alone (from the rule).
    pub next_change: Option<i64>,
}

/// Everything the engine keeps for one user.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    /// Feature name → (spec fingerprint, buckets).
    pub features: BTreeMap<String, (u64, FeatureState)>,
    /// `family.attr` → (event time, latest value), for declared attributes.
    pub attrs: BTreeMap<String, (i64, Value)>,
    pub tags: BTreeMap<String, TagState>,
    /// When a tag could next change with time alone; the timer index holds
    /// the same moment.
    pub wake_at: Option<i64>,
}

/// Slots changed by the events of one entry, per user.
pub type Dirty = BTreeSet<usize>;

impl Engine {
    /// Folds one event into the user's features and declared attributes.
    pub fn observe(&self, state: &mut UserState, event: &Event, now: i64, dirty: &mut Dirty) {
        for (i, f) in self.features.iter().enumerate() {
            if !f.wants(event) {
                continue;
            }
            // Look up by reference: `entry()` would allocate the name per event.
            if !state.features.contains_key(&f.name) {
                state.features.insert(f.name.clone(), (f.fingerprint, FeatureState::default()));
            }
            let entry = state.features.get_mut(&f.name).expect("inserted above");
            if entry.0 != f.fingerprint {
                *entry = (f.fingerprint, FeatureState::default());
            }
            if f.add(&mut entry.1, event, now) {
                dirty.insert(i);
            }
        }
        for (i, a) in self.attrs.iter().enumerate() {
            let Some(value) = (a.family == event.family).then(|| event.attrs.get(&a.attr)).flatten() else {
                continue;
            };
            let newer = state.attrs.get(&a.key).is_none_or(|(t, _)| *t <= event.time_ms);
            if newer {
                state.attrs.insert(a.key.clone(), (event.time_ms, value.clone()));
                dirty.insert(self.attr_slot(i));
            }
        }
    }

    /// Re-evaluates the tags affected by `dirty` (and, when the user's wake
    /// time has come, every time-dependent tag) at logical time `now`, then
    /// recomputes the wake time. Returns the names of tags whose value changed.
    pub fn settle(&self, state: &mut UserState, dirty: &Dirty, now: i64) -> Vec<String> {
        let due_at = state.wake_at.filter(|w| *w <= now);
        // Drop what a schema change removed (feature and tag names are distinct).
        state.features.retain(|name, _| self.names.contains(name));
        state.tags.retain(|name, _| self.names.contains(name));
        let mut slots = Slots::new(self, now);
        let mut changed_slots = dirty.clone();
        let mut changed = Vec::new();
        for tag in &self.tags {
            let fresh = !state.tags.contains_key(&tag.name);
            let by_input = tag.rule.slots().iter().any(|s| changed_slots.contains(s));
            let by_time = due_at.is_some() && tag.time_dependent;
            if !(fresh || by_input || by_time) {
                if let Some(ts) = state.tags.get(&tag.name) {
                    slots.set(tag.slot, ts.value.clone());
                }
                continue;
            }
            slots.fill(self, state, tag.rule.slots());
            let mut next = None;
            let value = tag.rule.eval(&slots.values, now, &mut next);
            slots.set(tag.slot, value.clone());
            match state.tags.get_mut(&tag.name) {
                Some(ts) if ts.value == value => ts.next_change = next,
                _ => {
                    // A change found only because time passed happened at the
                    // scheduled moment, not at this (later) tick.
                    let at = if by_input || fresh { now } else { due_at.unwrap_or(now) };
                    state
                        .tags
                        .insert(tag.name.clone(), TagState { value, changed_at: at, next_change: next });
                    changed_slots.insert(tag.slot);
                    changed.push(tag.name.clone());
                }
            }
        }
        state.wake_at = self.wake_at(state, now);
        changed
    }

    /// The earliest moment after `now` a tag could change without an event.
    fn wake_at(&self, state: &UserState, now: i64) -> Option<i64> {
        let from_rules = state.tags.values().filter_map(|t| t.next_change);
        let windowed = self.tags.iter().filter(|t| t.time_dependent).flat_map(|t| t.rule.slots().iter());
        let from_windows = windowed.filter_map(|&s| {
            let f = self.features.get(s)?;
            f.next_change(&state.features.get(&f.name)?.1, now)
        });
        from_rules.chain(from_windows).filter(|t| *t > now).min()
    }

    /// Feature values and tag values as of `now` (wall clock, for reads).
    /// Stored tags are current until the wake time; past it they are
    /// re-evaluated here (the tick that persists them may not have run yet).
    pub fn read(&self, state: &UserState, now: i64) -> (BTreeMap<String, Val>, BTreeMap<String, TagState>) {
        let features = self.features.iter().map(|f| (f.name.clone(), feature_value(f, state, now))).collect();
        // Past the wake time, or the schema's tag set changed and the
        // background re-evaluation has not reached this user yet.
        let schema_changed = state.tags.len() != self.tags.len()
            || self.tags.iter().any(|t| !state.tags.contains_key(&t.name));
        let tags = if schema_changed || state.wake_at.is_some_and(|w| w <= now) {
            let mut fresh = state.clone();
            self.settle(&mut fresh, &Dirty::new(), now);
            fresh.tags
        } else {
            state.tags.clone()
        };
        (features, tags)
    }
}

/// A feature's value at `now` from the user's state (empty when the stored
/// state belongs to an older definition of the feature).
fn feature_value(f: &super::feature::CompiledFeature, state: &UserState, now: i64) -> Val {
    match state.features.get(&f.name) {
        Some((fp, st)) if *fp == f.fingerprint => f.value(st, now),
        _ => f.value(&FeatureState::default(), now),
    }
}

/// Slot values, filled lazily (feature values are merged from buckets only
/// when a rule needs them).
struct Slots {
    values: Vec<Val>,
    filled: Vec<bool>,
    now: i64,
}

impl Slots {
    fn new(engine: &Engine, now: i64) -> Slots {
        let n = engine.n_slots();
        Slots { values: vec![Val::Null; n], filled: vec![false; n], now }
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
                let value = feature_value(&engine.features[s], state, self.now);
                self.set(s, value);
            } else if s >= attrs_from {
                let a = &engine.attrs[s - attrs_from];
                let value = state.attrs.get(&a.key).map_or(Val::Null, |(_, v)| typed(v, a.ty));
                self.set(s, value);
            }
            // Tag slots are set as tags are evaluated, in dependency order.
        }
    }
}
