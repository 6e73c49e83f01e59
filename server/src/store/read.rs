//! The read path: a user's family records filtered by expiry as of a
//! wall-clock `now` under the current schema's TTLs, plus features (windows
//! evaluated at `now`) and tags. One read sees one RocksDB snapshot, so a
//! family head and the history events it points at come from the same
//! applied entry.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode, ReadOptions, SnapshotWithThreadMode, DB};

use super::apply::{decode_user_state, ApplyError, At};
use super::keys::{self, CF_HISTORY, CF_PROFILES, CF_STATE};
use super::record::{decode_history_event, FamilyHead, FamilyRecord};
use super::sm_db::cf;
use crate::engine::expr::Val;
use crate::engine::state::TagState;
use crate::engine::Engine;
use crate::schema::Schema;
use crate::types::GroupId;

/// What to read; `None` = all of that kind. As requested (in request order,
/// repeats kept) until [`Selection::deduped`]; the read path expects a
/// deduplicated selection (sorted, so membership is a binary search).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
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

    /// From request lists (moved, not copied): all empty = everything;
    /// otherwise only what is listed.
    pub fn from_lists(families: Vec<String>, features: Vec<String>, tags: Vec<String>) -> Selection {
        if families.is_empty() && features.is_empty() && tags.is_empty() {
            return Selection::all();
        }
        Selection { families: Some(families), features: Some(features), tags: Some(tags) }
    }

    /// Each list sorted, each name once.
    pub fn deduped(mut self) -> Selection {
        for list in [&mut self.families, &mut self.features, &mut self.tags].into_iter().flatten() {
            list.sort_unstable();
            list.dedup();
        }
        self
    }
}

/// Each distinct id of `user_ids` once, in order of first appearance, and
/// for each position of `user_ids` the index of its id in that list.
pub fn distinct_ids(user_ids: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut first_at = std::collections::HashMap::with_capacity(user_ids.len());
    let mut unique = Vec::with_capacity(user_ids.len());
    let positions = user_ids
        .iter()
        .map(|u| {
            *first_at.entry(u.as_str()).or_insert_with(|| {
                unique.push(u.clone());
                unique.len() - 1
            })
        })
        .collect();
    (unique, positions)
}

/// How many times each distinct id of [`distinct_ids`] is asked for.
pub fn repeat_counts(positions: &[usize], distinct: usize) -> Vec<usize> {
    let mut counts = vec![0; distinct];
    positions.iter().for_each(|&i| counts[i] += 1);
    counts
}

/// A user's live data.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProfileView {
    /// Whether the user has any live data or computed state.
    pub found: bool,
    pub families: BTreeMap<String, FamilyRecord>,
    pub features: BTreeMap<String, Val>,
    pub tags: BTreeMap<String, TagState>,
}

/// A `Profile` message's bytes beside its view: the user id (at most
/// [`MAX_USER_ID_BYTES`](crate::limits::MAX_USER_ID_BYTES)), `found`, and
/// the framing of the message and its fields, with room to spare.
const PROFILE_ENVELOPE_BYTES: usize = portrait_core::limits::MAX_USER_ID_BYTES + 32;

impl ProfileView {
    /// About the bytes this view takes in a response: its bincode size,
    /// which is at least its protobuf size (fixed-width integers and
    /// lengths), plus its `Profile` envelope at its largest (the user id,
    /// `found`, the message's framing). Walks the view without allocating.
    pub fn approx_bytes(&self) -> usize {
        fn size<T: serde::Serialize>(v: &T) -> usize {
            bincode::serialized_size(v).map_or(usize::MAX, |n| n as usize)
        }
        let families = self.families.iter().map(|(name, f)| name.len() + size(&f.attrs) + size(&f.history));
        let envelope = PROFILE_ENVELOPE_BYTES + size(&self.features).saturating_add(size(&self.tags));
        families.fold(envelope, usize::saturating_add)
    }
}

/// History events are fetched this many at a time, each batch's bytes
/// counted before the next is fetched (one batch is at most 64 events of
/// 64 attributes of 4 KiB: 16 MiB past the budget). A usual history (the
/// demo schema keeps at most 50) is still one `multi_get`.
const HISTORY_FETCH: usize = 64;

/// Reads a user's profile in group `gid`. Families no longer in the schema
/// are not served. `selection` must be [`Selection::deduped`].
///
/// `None` when the family records stored for the user pass `max_bytes`
/// (counted as they are fetched, before they are decoded): a profile whose
/// history is too large for the response is refused before it is held
/// whole in memory. Stored records are about the size of their view (they
/// hold the same fields; a family no longer in the schema is not
/// counted), so a caller that refuses a view past `B` bytes passes `2 × B`
/// here: a view that fits is not refused for its stored size, and a read
/// holds at most about twice the limit (plus one fetch) per user.
#[allow(clippy::too_many_arguments)]
pub fn read_profile(
    db: &DB,
    gid: GroupId,
    schema: &Schema,
    engine: &Engine,
    user_id: &str,
    selection: &Selection,
    at: At,
    max_bytes: usize,
) -> Result<Option<ProfileView>, ApplyError> {
    let now_ms = at.now_ms;
    let snap = db.snapshot();
    let Some(families) =
        read_families(db, &snap, gid, schema, user_id, &selection.families, now_ms, max_bytes)?
    else {
        return Ok(None);
    };
    let mut view = ProfileView { families, ..Default::default() };
    let mut found = !view.families.is_empty();
    let wants = |list: &Option<Vec<String>>| list.as_ref().is_none_or(|l| !l.is_empty());
    if wants(&selection.features) || wants(&selection.tags) || !found {
        let stored = snap.get_pinned_cf(cf(db, CF_STATE), keys::state(gid, user_id))?;
        if let Some(state) = stored.map(|bytes| decode_user_state(&bytes)).transpose()? {
            // Tags due are re-evaluated by the shard's rules (what its
            // next tick stores).
            let (features, tags) = engine.read_by(&state, now_ms, at.rules);
            // Tags always have a value; a user is known by data or features.
            found |= features.values().any(|v| !v.is_empty_value());
            let keep = |list: &Option<Vec<String>>, name: &String| {
                list.as_ref().is_none_or(|l| l.binary_search(name).is_ok())
            };
            view.features = features.into_iter().filter(|(n, _)| keep(&selection.features, n)).collect();
            view.tags = tags.into_iter().filter(|(n, _)| keep(&selection.tags, n)).collect();
        }
    }
    view.found = found;
    Ok(Some(view))
}

/// The user's live family records; `None` once the stored bytes fetched
/// pass `max_bytes`.
#[allow(clippy::too_many_arguments)]
fn read_families(
    db: &DB,
    snap: &SnapshotWithThreadMode<'_, DB>,
    gid: GroupId,
    schema: &Schema,
    user_id: &str,
    families: &Option<Vec<String>>,
    now_ms: i64,
    max_bytes: usize,
) -> Result<Option<BTreeMap<String, FamilyRecord>>, ApplyError> {
    let profiles = cf(db, CF_PROFILES);
    let mut heads = Vec::new();
    let mut fetched = 0usize;
    match families {
        None => {
            let prefix = keys::user_prefix(gid, user_id);
            // Keys are bucketed by user: the scan must stay within this one.
            let mut opts = ReadOptions::default();
            opts.set_prefix_same_as_start(true);
            for item in snap.iterator_cf_opt(profiles, opts, IteratorMode::From(&prefix, Direction::Forward))
            {
                let (key, value) = item?;
                let Some(family) = keys::family_of(&key, &prefix) else { break };
                heads.push((family.to_string(), value.len(), FamilyHead::decode(&value)?));
            }
        }
        Some(families) => {
            let keys = families.iter().map(|f| (profiles, keys::profile(gid, user_id, f)));
            for (family, value) in families.iter().zip(snap.multi_get_cf(keys)) {
                if let Some(bytes) = value? {
                    heads.push((family.clone(), bytes.len(), FamilyHead::decode(&bytes)?));
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    let history = cf(db, CF_HISTORY);
    for (family, head_bytes, mut head) in heads {
        // Families no longer in the schema are not served.
        let Some(spec) = schema.family(&family) else { continue };
        fetched = fetched.saturating_add(head_bytes);
        // Fetch only history events live at `now` by the current TTL too
        // (a schema change may have shortened it since they were written):
        // the others are neither read nor counted against `max_bytes`.
        head.prune_by_ttl(now_ms, spec.ttl_ms);
        // A schema change may have shortened the history since it was written.
        head.history.truncate(spec.history_len as usize);
        let mut events = Vec::with_capacity(head.history.len());
        for slots in head.history.chunks(HISTORY_FETCH) {
            if fetched > max_bytes {
                return Ok(None);
            }
            let keys = slots.iter().map(|r| (history, keys::history(gid, user_id, &family, r.slot)));
            for value in snap.multi_get_cf(keys) {
                let event = value?.map(|bytes| {
                    fetched = fetched.saturating_add(bytes.len());
                    decode_history_event(&bytes)
                });
                events.push(event.transpose()?);
            }
        }
        if fetched > max_bytes {
            return Ok(None);
        }
        let live = head.assemble(events).live_view(now_ms, spec.ttl_ms);
        if !live.is_empty() {
            out.insert(family, live);
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn repeated_ids_are_read_once_and_answered_at_each_position() {
        let (unique, positions) = distinct_ids(&strings(&["b", "a", "b", "c", "a"]));
        assert_eq!(unique, ["b", "a", "c"]);
        assert_eq!(positions, [0, 1, 0, 2, 1]);
        assert_eq!(repeat_counts(&positions, unique.len()), [2, 2, 1]);
    }

    #[test]
    fn a_selection_is_deduplicated_and_sorted() {
        let s = Selection::from_lists(strings(&["trade", "browse", "trade"]), vec![], strings(&["x", "x"]));
        let s = s.deduped();
        assert_eq!(s.families.unwrap(), ["browse", "trade"]);
        assert_eq!(s.features.unwrap(), Vec::<String>::new());
        assert_eq!(s.tags.unwrap(), ["x"]);
        assert!(Selection::from_lists(vec![], vec![], vec![]).deduped().families.is_none());
    }
}
