//! The read path: a user's family records filtered by expiry as of a
//! wall-clock `now` under the current schema's TTLs, plus features (windows
//! evaluated at `now`) and tags.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode, DB};

use super::apply::{load_user_state, ApplyError};
use super::keys::{self, CF_PROFILES};
use super::record::FamilyRecord;
use super::sm_db::cf;
use crate::engine::expr::Val;
use crate::engine::state::TagState;
use crate::engine::Engine;
use crate::schema::Schema;

/// What to read; `None` = all of that kind.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub families: Option<Vec<String>>,
    pub features: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
}

impl Selection {
    /// Everything.
    pub fn all() -> Selection {
        Selection::default()
    }

    /// From request lists: all empty = everything; otherwise only what is listed.
    pub fn from_lists(families: &[String], features: &[String], tags: &[String]) -> Selection {
        if families.is_empty() && features.is_empty() && tags.is_empty() {
            return Selection::all();
        }
        Selection {
            families: Some(families.to_vec()),
            features: Some(features.to_vec()),
            tags: Some(tags.to_vec()),
        }
    }
}

/// A user's live data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileView {
    /// Whether the user has any live data or computed state.
    pub found: bool,
    pub families: BTreeMap<String, FamilyRecord>,
    pub features: BTreeMap<String, Val>,
    pub tags: BTreeMap<String, TagState>,
}

/// Reads a user's profile. Families no longer in the schema are not served.
pub fn read_profile(
    db: &DB,
    schema: &Schema,
    engine: &Engine,
    user_id: &str,
    selection: &Selection,
    now_ms: i64,
) -> Result<ProfileView, ApplyError> {
    let mut view = ProfileView {
        families: read_families(db, schema, user_id, &selection.families, now_ms)?,
        ..Default::default()
    };
    let mut found = !view.families.is_empty();
    let wants = |list: &Option<Vec<String>>| list.as_ref().is_none_or(|l| !l.is_empty());
    if wants(&selection.features) || wants(&selection.tags) || !found {
        if let Some(state) = load_user_state(db, user_id)? {
            let (features, tags) = engine.read(&state, now_ms);
            // Tags always have a value; a user is known by data or features.
            found |= features.values().any(|v| !v.is_empty_value());
            let keep =
                |list: &Option<Vec<String>>, name: &String| list.as_ref().is_none_or(|l| l.contains(name));
            view.features = features.into_iter().filter(|(n, _)| keep(&selection.features, n)).collect();
            view.tags = tags.into_iter().filter(|(n, _)| keep(&selection.tags, n)).collect();
        }
    }
    view.found = found;
    Ok(view)
}

fn read_families(
    db: &DB,
    schema: &Schema,
    user_id: &str,
    families: &Option<Vec<String>>,
    now_ms: i64,
) -> Result<BTreeMap<String, FamilyRecord>, ApplyError> {
    let mut out = BTreeMap::new();
    let mut add = |family: &str, bytes: &[u8]| -> Result<(), ApplyError> {
        if let Some(spec) = schema.family(family) {
            let live = FamilyRecord::decode(bytes)?.live_view(now_ms, spec.ttl_ms);
            if !live.is_empty() {
                out.insert(family.to_string(), live);
            }
        }
        Ok(())
    };
    let profiles = cf(db, CF_PROFILES);
    match families {
        None => {
            let prefix = keys::user_prefix(user_id);
            for item in db.iterator_cf(profiles, IteratorMode::From(&prefix, Direction::Forward)) {
                let (key, value) = item?;
                let Some(family) = keys::family_of(&key, &prefix) else { break };
                add(family, &value)?;
            }
        }
        Some(families) => {
            let keys: Vec<_> = families.iter().map(|f| (profiles, keys::profile(user_id, f))).collect();
            for (family, value) in families.iter().zip(db.multi_get_cf(keys)) {
                if let Some(bytes) = value? {
                    add(family, &bytes)?;
                }
            }
        }
    }
    Ok(out)
}
