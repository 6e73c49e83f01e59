//! Applying a `Command::Write`: dedupe, expiry check, fold events into family
//! records. Pure over (database as of the previous entry, entry contents):
//! everything it writes goes into the entry's `WriteBatch`, and the only time
//! it uses is the entry's logical clock.

use std::collections::{HashMap, HashSet};

use rocksdb::{WriteBatch, DB};

use super::keys::{self, CF_DEDUPE, CF_PROFILES};
use super::record::FamilyRecord;
use super::sm_db::cf;
use crate::model::{expiry, is_live, Event, WriteCounts};
use crate::schema::Schema;
use crate::types::WriteOutcome;
use crate::validate::validate_request;

/// Failure to read the current state (fatal for the node).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("corrupt record: {0}")]
    Decode(#[from] bincode::Error),
}

/// Records and dedupe markers touched by one entry, written at the end.
struct EntryState<'a> {
    db: &'a DB,
    now_ms: i64,
    records: HashMap<Vec<u8>, FamilyRecord>,
    new_ids: HashSet<Vec<u8>>,
}

/// Applies the requests of one entry at logical time `now_ms`.
pub fn apply_write(
    db: &DB,
    schema: &Schema,
    now_ms: i64,
    requests: &[Vec<Event>],
    batch: &mut WriteBatch,
) -> Result<Vec<WriteOutcome>, ApplyError> {
    let mut st = EntryState { db, now_ms, records: HashMap::new(), new_ids: HashSet::new() };
    let mut outcomes = Vec::with_capacity(requests.len());
    for request in requests {
        // Validation happens before any change, so a rejected request leaves
        // nothing behind.
        if let Err(e) = validate_request(request, schema, None) {
            outcomes.push(WriteOutcome::Rejected { reason: e.to_string() });
            continue;
        }
        let mut counts = WriteCounts::default();
        for event in request {
            st.apply_event(schema, event, &mut counts, batch)?;
        }
        outcomes.push(WriteOutcome::Applied(counts));
    }
    let profiles = cf(db, CF_PROFILES);
    for (key, record) in st.records {
        if record.is_empty() {
            batch.delete_cf(profiles, key);
        } else {
            batch.put_cf(profiles, key, record.encode());
        }
    }
    Ok(outcomes)
}

impl EntryState<'_> {
    fn apply_event(
        &mut self,
        schema: &Schema,
        event: &Event,
        counts: &mut WriteCounts,
        batch: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        let spec = schema.family(&event.family).expect("validated against this schema");
        let expires_at = expiry(event.time_ms, spec.ttl_ms);
        if !is_live(expires_at, self.now_ms) {
            counts.expired += 1;
            return Ok(());
        }
        if !event.event_id.is_empty() {
            let key = keys::dedupe(&event.user_id, &event.event_id);
            if self.new_ids.contains(&key) || self.seen_before(&key)? {
                counts.duplicates += 1;
                return Ok(());
            }
            let until = self.now_ms.saturating_add(schema.dedupe_window_ms);
            batch.put_cf(cf(self.db, CF_DEDUPE), &key, until.to_be_bytes());
            self.new_ids.insert(key);
        }
        let record = self.record(keys::profile(&event.user_id, &event.family))?;
        record.apply_event(event, expires_at, spec.history_len);
        counts.applied += 1;
        Ok(())
    }

    /// Whether a live dedupe marker exists from an earlier entry.
    fn seen_before(&self, key: &[u8]) -> Result<bool, ApplyError> {
        let stored = self.db.get_pinned_cf(cf(self.db, CF_DEDUPE), key)?;
        let until = stored.as_deref().and_then(super::record::stored_expiry);
        Ok(until.is_some_and(|until| is_live(until, self.now_ms)))
    }

    /// The record under `key`, loaded once per entry and pruned of what has
    /// expired by the entry's time.
    fn record(&mut self, key: Vec<u8>) -> Result<&mut FamilyRecord, ApplyError> {
        use std::collections::hash_map::Entry;
        match self.records.entry(key) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => {
                let mut record = match self.db.get_pinned_cf(cf(self.db, CF_PROFILES), v.key())? {
                    Some(bytes) => FamilyRecord::decode(&bytes)?,
                    None => FamilyRecord::default(),
                };
                record.prune(self.now_ms);
                Ok(v.insert(record))
            }
        }
    }
}
