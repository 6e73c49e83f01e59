//! The read path: a user's family records, filtered by expiry as of a
//! wall-clock `now` under the current schema's TTLs.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode, DB};

use super::apply::ApplyError;
use super::keys::{self, CF_PROFILES};
use super::record::FamilyRecord;
use super::sm_db::cf;
use crate::schema::Schema;

/// A user's live data, per family.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileView {
    /// Whether the user has any live data.
    pub found: bool,
    pub families: BTreeMap<String, FamilyRecord>,
}

/// Reads a user's profile. `families` empty = every family of the schema.
/// Families no longer in the schema are not served.
pub fn read_profile(
    db: &DB,
    schema: &Schema,
    user_id: &str,
    families: &[String],
    now_ms: i64,
) -> Result<ProfileView, ApplyError> {
    let mut view = ProfileView::default();
    let add = |family: &str, bytes: &[u8], view: &mut ProfileView| -> Result<(), ApplyError> {
        if let Some(spec) = schema.family(family) {
            let live = FamilyRecord::decode(bytes)?.live_view(now_ms, spec.ttl_ms);
            if !live.is_empty() {
                view.families.insert(family.to_string(), live);
            }
        }
        Ok(())
    };
    let profiles = cf(db, CF_PROFILES);
    if families.is_empty() {
        let prefix = keys::user_prefix(user_id);
        for item in db.iterator_cf(profiles, IteratorMode::From(&prefix, Direction::Forward)) {
            let (key, value) = item?;
            let Some(family) = keys::family_of(&key, &prefix) else { break };
            add(family, &value, &mut view)?;
        }
    } else {
        let keys: Vec<_> = families.iter().map(|f| (profiles, keys::profile(user_id, f))).collect();
        for (family, value) in families.iter().zip(db.multi_get_cf(keys)) {
            if let Some(bytes) = value? {
                add(family, &bytes, &mut view)?;
            }
        }
    }
    view.found = !view.families.is_empty();
    Ok(view)
}
