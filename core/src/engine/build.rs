//! Building an [`Engine`] from a schema: features with windows and filters,
//! tag rules compiled against a slot catalog, and the dependency graph
//! (computed once per schema version).
//!
//! Slots: `[features | tags | attributes]`. Tags are compiled in dependency
//! order, so a rule may use another tag's value; a cycle is rejected.

use std::cell::RefCell;
use std::collections::BTreeMap;

use super::expr::{compile, Limits, Type};
use super::feature::CompiledFeature;
use super::filter::Filter;
use super::identity::{feature_id, fnv1a};
use super::window::Window;
use super::{AttrSlot, CompiledTag, Engine};
use crate::limits::MAX_USER_STATE_BYTES;
use crate::schema::{Aggregation, FeatureSpec, Schema, SchemaError, ValueType};

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SchemaError {
    SchemaError::Invalid { field: field.into(), reason: reason.into() }
}

/// A tag's or attribute's identity in stored state: the hash of its name.
pub fn name_id(name: &str) -> u64 {
    fnv1a(name.as_bytes())
}

/// The half of a tag's identity that names it (see [`tag_id`]).
pub const TAG_NAME_HALF: u64 = 0xFFFF_FFFF_0000_0000;

/// A tag's identity in stored state: the hash of its name in the high half,
/// the hash of its rule's text in the low half. A tag whose rule changed is
/// still found by its name ([`TAG_NAME_HALF`]): it keeps its stored value
/// and `changed_at` until it is evaluated with the new rule, which the
/// next settle does for every such tag (see `Engine::align`).
pub fn tag_id(name: &str, rule: &str) -> u64 {
    (name_id(name) & TAG_NAME_HALF) | (fnv1a(rule.as_bytes()) & !TAG_NAME_HALF)
}

fn feature_type(spec: &FeatureSpec) -> Type {
    match spec.agg {
        Aggregation::TopK => Type::Map,
        Aggregation::LastValue => value_type(spec.value_type),
        _ => Type::Num,
    }
}

fn value_type(t: ValueType) -> Type {
    match t {
        ValueType::Str => Type::Str,
        ValueType::Num => Type::Num,
        ValueType::Bool => Type::Bool,
    }
}

impl Engine {
    /// Compiles a schema's features and tags; errors name the feature or
    /// tag and, for rules, the line and column.
    pub fn build(schema: &Schema) -> Result<Engine, SchemaError> {
        let features = build_features(schema)?;
        let attrs: Vec<AttrSlot> = schema
            .families
            .iter()
            .flat_map(|(f, spec)| spec.attrs.iter().map(move |(a, t)| (f.clone(), a.clone(), *t)))
            .map(|(family, attr, ty)| {
                let key = format!("{family}.{attr}");
                AttrSlot { id: name_id(&key), key, family, attr, ty }
            })
            .collect();
        let tag_names: Vec<&String> = schema.tags.keys().collect();
        let (n_features, n_tags) = (features.len(), tag_names.len());
        let mut types: BTreeMap<String, (usize, Type)> = BTreeMap::new();
        for (i, f) in features.iter().enumerate() {
            types.insert(f.name.clone(), (i, feature_type(&f.spec)));
        }
        for (i, a) in attrs.iter().enumerate() {
            types.insert(a.key.clone(), (n_features + n_tags + i, value_type(a.ty)));
        }
        let tag_slot = |name: &str| tag_names.iter().position(|t| *t == name).map(|i| n_features + i);
        let mut pending: Vec<&String> = tag_names.clone();
        let mut order: Vec<CompiledTag> = Vec::new();
        let limits = Limits::default();
        while !pending.is_empty() {
            let mut progressed = false;
            let mut still = Vec::new();
            // Which pending tag each stuck one waits on.
            let mut waits: BTreeMap<String, String> = BTreeMap::new();
            for name in pending {
                let waiting_on = RefCell::new(None);
                let resolve = |id: &str| {
                    if let Some(found) = types.get(id) {
                        return Some(*found);
                    }
                    if tag_slot(id).is_some() {
                        *waiting_on.borrow_mut() = Some(id.to_string());
                    }
                    None
                };
                match compile(&schema.tags[name].rule, &resolve, &limits) {
                    Ok(rule) => {
                        let slot = tag_slot(name).expect("a tag name");
                        types.insert(name.clone(), (slot, rule.ty()));
                        let id = tag_id(name, &schema.tags[name].rule);
                        order.push(CompiledTag {
                            name: name.clone(),
                            id,
                            slot,
                            rule,
                            time_dependent: false,
                            read_by_tags: false,
                        });
                        progressed = true;
                    }
                    Err(_) if waiting_on.borrow().is_some() => {
                        waits.insert(name.clone(), waiting_on.borrow().clone().expect("just checked"));
                        still.push(name)
                    }
                    Err(e) => return Err(invalid(format!("tags.{name}.rule"), e.to_string())),
                }
            }
            if !progressed {
                // Named by the tags of one cycle (not those that only read
                // it): follow the waits from a stuck tag until one repeats.
                let mut path: Vec<&str> = vec![still[0].as_str()];
                let cycle = loop {
                    let next = waits.get(*path.last().expect("not empty")).map(String::as_str);
                    match next.and_then(|n| path.iter().position(|p| *p == n).map(|at| (n, at))) {
                        Some((_, at)) => break path[at..].to_vec(),
                        None if next.is_some() && path.len() <= waits.len() => path.push(next.expect("some")),
                        // Not expected (every stuck tag waits on a stuck one).
                        None => break path,
                    }
                };
                let first = cycle.iter().min().expect("not empty");
                let at = cycle.iter().position(|n| n == first).expect("in the cycle");
                let names: Vec<&str> =
                    cycle[at..].iter().chain(&cycle[..at]).chain(std::iter::once(first)).copied().collect();
                return Err(invalid(
                    format!("tags.{}", names[0]),
                    format!("cycle between tags: {}", names.join(" -> ")),
                ));
            }
            pending = still;
        }
        let mut engine = Engine { features, tags: order, attrs, n_tags };
        engine.mark_time_dependent();
        let worst = engine.max_state_bytes();
        if worst > MAX_USER_STATE_BYTES {
            let reason = format!(
                "a user's feature and tag state could reach {worst} bytes, over the limit of \
                 {MAX_USER_STATE_BYTES} (fewer distinct_count, top_k or last_value features or tags)"
            );
            return Err(invalid("features", reason));
        }
        Ok(engine)
    }

    /// A tag is time-dependent if it uses `now`, a windowed feature, or a
    /// time-dependent tag (tags are in dependency order). Also marks the
    /// tags other rules read.
    fn mark_time_dependent(&mut self) {
        let n_features = self.features.len();
        let mut slot_dep = vec![false; n_features + self.n_tags + self.attrs.len()];
        for (i, f) in self.features.iter().enumerate() {
            slot_dep[i] = f.window.is_some();
        }
        let mut read = vec![false; slot_dep.len()];
        for tag in &mut self.tags {
            tag.time_dependent = tag.rule.uses_now() || tag.rule.slots().iter().any(|s| slot_dep[*s]);
            slot_dep[tag.slot] = tag.time_dependent;
            for s in tag.rule.slots() {
                read[*s] = true;
            }
        }
        for tag in &mut self.tags {
            tag.read_by_tags = read[tag.slot];
        }
    }
}

fn build_features(schema: &Schema) -> Result<Vec<CompiledFeature>, SchemaError> {
    let mut out = Vec::new();
    for (name, spec) in &schema.features {
        let filter = match &spec.filter {
            Some(text) => {
                Some(Filter::parse(text).map_err(|e| invalid(format!("features.{name}.where"), e))?)
            }
            None => None,
        };
        out.push(CompiledFeature {
            name: name.clone(),
            spec: spec.clone(),
            window: spec.window_ms.filter(|_| !spec.anchor_first).map(Window::new),
            filter,
            // A changed definition starts over; a renamed one keeps its state.
            fingerprint: feature_id(spec),
        });
    }
    Ok(out)
}
