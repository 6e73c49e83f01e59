//! Applying commands: dedupe, expiry check, fold events into family records,
//! update features and tags, keep the timer index. Pure over (database as of
//! the previous entry, entry contents): everything it writes goes into the
//! entry's `WriteBatch`, and the only time it uses is the entry's logical
//! clock.

use std::collections::hash_map::Entry as MapEntry;

/// Maps keyed by user ids and row keys: foldhash (seeded per process) is
/// several times cheaper than SipHash on these short keys.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch, DB};

use super::codec;
use super::keys::{self, CF_DEDUPE, CF_HISTORY, CF_PROFILES, CF_STATE, CF_TIMERS};
use super::record::{encode_history_event, stored_expiry, FamilyHead};
use super::sm_db::cf;
use crate::engine::state::{Dirty, UserState};
use crate::engine::Engine;
use crate::limits::MAX_USERS_PER_TICK;
use crate::model::{expiry, is_live, Event, WriteCounts, NEVER};
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

/// Decoded family heads and user states of recently applied users. It is
/// write-through — after an entry's batch is written it equals what the
/// database holds — so apply can skip the read and decode of hot users.
/// Bounded: emptied when it grows past its capacity; cleared when a snapshot
/// replaces the database.
pub struct ApplyCache {
    records: HashMap<Vec<u8>, FamilyHead>,
    users: HashMap<String, UserState>,
    capacity: usize,
    /// The per-entry maps of the last entry, emptied, kept for their
    /// capacity: an entry of thousands of users would otherwise allocate
    /// (and the allocator zero fresh pages for) large tables every time.
    scratch: Scratch,
}

#[derive(Default)]
struct Scratch {
    records: HashMap<Vec<u8>, FamilyHead>,
    users: HashMap<String, Touched>,
    new_ids: HashSet<Vec<u8>>,
}

impl ApplyCache {
    pub fn new(capacity: usize) -> ApplyCache {
        ApplyCache {
            records: HashMap::default(),
            users: HashMap::default(),
            capacity,
            scratch: Scratch::default(),
        }
    }

    pub fn clear(&mut self) {
        self.records.clear();
        self.users.clear();
    }

    fn trim(&mut self) {
        if self.records.len() > self.capacity {
            self.records.clear();
        }
        if self.users.len() > self.capacity {
            self.users.clear();
        }
    }
}

/// A user's engine state while an entry is applied.
struct Touched {
    state: UserState,
    dirty: Dirty,
    /// The wake time stored before this entry (its timer key to replace).
    stored_wake: Option<i64>,
}

/// Family heads, user states and dedupe markers touched by one entry.
struct EntryState<'a> {
    db: &'a DB,
    cache: &'a mut ApplyCache,
    engine: &'a Engine,
    now_ms: i64,
    records: HashMap<Vec<u8>, FamilyHead>,
    users: HashMap<String, Touched>,
    new_ids: HashSet<Vec<u8>>,
}

/// Applies the write requests of one entry at logical time `now_ms`.
pub fn apply_write(
    db: &DB,
    cache: &mut ApplyCache,
    schema: &Schema,
    engine: &Engine,
    now_ms: i64,
    requests: &[Vec<Event>],
    batch: &mut WriteBatch,
) -> Result<Vec<WriteOutcome>, ApplyError> {
    let mut st = EntryState::new(db, cache, engine, now_ms);
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
    st.finish(batch)?;
    Ok(outcomes)
}

/// Re-evaluates the users whose timers are due at `now_ms` (at most
/// [`MAX_USERS_PER_TICK`]; the rest stay due for the next tick). Returns how
/// many users were re-evaluated.
pub fn apply_tick(
    db: &DB,
    cache: &mut ApplyCache,
    engine: &Engine,
    now_ms: i64,
    batch: &mut WriteBatch,
) -> Result<u32, ApplyError> {
    let mut st = EntryState::new(db, cache, engine, now_ms);
    let mut due = Vec::new();
    for item in db.iterator_cf(cf(db, CF_TIMERS), IteratorMode::Start) {
        let (key, _) = item?;
        match keys::parse_timer(&key) {
            Some((t, user)) if t <= now_ms && due.len() < MAX_USERS_PER_TICK => due.push(user.to_string()),
            _ => break,
        }
    }
    for user in &due {
        st.user(user)?;
    }
    let n = due.len() as u32;
    st.finish(batch)?;
    Ok(n)
}

/// Re-evaluates every tag of up to `limit` users after `after` (key order)
/// in the `state` column family. Returns the last user covered (`None` when
/// none were left) and how many were covered.
pub fn apply_reevaluate(
    db: &DB,
    cache: &mut ApplyCache,
    engine: &Engine,
    now_ms: i64,
    after: Option<&str>,
    limit: u32,
    batch: &mut WriteBatch,
) -> Result<(Option<String>, u32), ApplyError> {
    let mut st = EntryState::new(db, cache, engine, now_ms);
    let start = after.map(|a| a.as_bytes().to_vec()).unwrap_or_default();
    let mut users = Vec::new();
    // Across users: the `state` memtable is bucketed by user (see sm_db).
    let mut opts = ReadOptions::default();
    opts.set_total_order_seek(true);
    for item in db.iterator_cf_opt(cf(db, CF_STATE), opts, IteratorMode::From(&start, Direction::Forward)) {
        let (key, _) = item?;
        if after.is_some_and(|a| a.as_bytes() == &key[..]) {
            continue;
        }
        if users.len() >= limit as usize {
            break;
        }
        users.push(String::from_utf8_lossy(&key).to_string());
    }
    let all = engine.all_inputs();
    for user in &users {
        st.user(user)?.dirty.clone_from(&all);
    }
    let n = users.len() as u32;
    st.finish(batch)?;
    Ok((users.pop(), n))
}

/// The first timer's time, if any (the leader proposes a tick when it is due).
pub fn first_timer(db: &DB) -> Result<Option<i64>, ApplyError> {
    match db.iterator_cf(cf(db, CF_TIMERS), IteratorMode::Start).next() {
        Some(item) => Ok(keys::parse_timer(&item?.0).map(|(t, _)| t)),
        None => Ok(None),
    }
}

/// A user's stored engine state.
pub fn load_user_state(db: &DB, user_id: &str) -> Result<Option<UserState>, ApplyError> {
    match db.get_pinned_cf(cf(db, CF_STATE), user_id.as_bytes())? {
        Some(bytes) => Ok(Some(decode_user_state(&bytes)?)),
        None => Ok(None),
    }
}

/// A stored user state (an 8-byte header, then bincode).
pub fn decode_user_state(bytes: &[u8]) -> Result<UserState, bincode::Error> {
    codec::decode(bytes.get(8..).unwrap_or_default())
}

impl<'a> EntryState<'a> {
    fn new(db: &'a DB, cache: &'a mut ApplyCache, engine: &'a Engine, now_ms: i64) -> Self {
        let Scratch { records, users, new_ids } = std::mem::take(&mut cache.scratch);
        EntryState { db, cache, engine, now_ms, records, users, new_ids }
    }

    fn apply_event(
        &mut self,
        schema: &Schema,
        event: &Event,
        counts: &mut WriteCounts,
        batch: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        let spec = schema.family(&event.family).expect("validated against this schema");
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
        // Features see every new event, even one whose raw data has already
        // expired (a lifetime "first order" outlives the trade TTL); windows
        // ignore what is outside them.
        if !self.engine.is_empty() {
            let (engine, now) = (self.engine, self.now_ms);
            let touched = self.user(&event.user_id)?;
            engine.observe(&mut touched.state, event, now, &mut touched.dirty);
        }
        let expires_at = expiry(event.time_ms, spec.ttl_ms);
        if !is_live(expires_at, self.now_ms) {
            counts.expired += 1;
            return Ok(());
        }
        let db = self.db;
        let head = self.record(keys::profile(&event.user_id, &event.family))?;
        let write = head.apply_event(event, expires_at, spec.history_len);
        let history = cf(db, CF_HISTORY);
        for slot in write.freed {
            batch.delete_cf(history, keys::history(&event.user_id, &event.family, slot));
        }
        if let Some(slot) = write.put {
            let key = keys::history(&event.user_id, &event.family, slot);
            batch.put_cf(history, key, encode_history_event(event, expires_at));
        }
        counts.applied += 1;
        Ok(())
    }

    /// Whether a live dedupe marker exists from an earlier entry.
    fn seen_before(&self, key: &[u8]) -> Result<bool, ApplyError> {
        let stored = self.db.get_pinned_cf(cf(self.db, CF_DEDUPE), key)?;
        let until = stored.as_deref().and_then(stored_expiry);
        Ok(until.is_some_and(|until| is_live(until, self.now_ms)))
    }

    /// The family head under `key`, loaded once per entry and pruned of what
    /// has expired by the entry's time.
    fn record(&mut self, key: Vec<u8>) -> Result<&mut FamilyHead, ApplyError> {
        match self.records.entry(key) {
            MapEntry::Occupied(o) => Ok(o.into_mut()),
            MapEntry::Vacant(v) => {
                let cached = self.cache.records.remove(v.key());
                let mut record = match cached {
                    Some(record) => record,
                    None => match self.db.get_pinned_cf(cf(self.db, CF_PROFILES), v.key())? {
                        Some(bytes) => FamilyHead::decode(&bytes)?,
                        None => FamilyHead::default(),
                    },
                };
                record.prune(self.now_ms);
                Ok(v.insert(record))
            }
        }
    }

    /// The user's engine state, loaded once per entry.
    fn user(&mut self, user_id: &str) -> Result<&mut Touched, ApplyError> {
        match self.users.entry(user_id.to_string()) {
            MapEntry::Occupied(o) => Ok(o.into_mut()),
            MapEntry::Vacant(v) => {
                let state = match self.cache.users.remove(user_id) {
                    Some(state) => state,
                    None => load_user_state(self.db, user_id)?.unwrap_or_default(),
                };
                let stored_wake = state.wake_at;
                Ok(v.insert(Touched { state, dirty: Dirty::new(), stored_wake }))
            }
        }
    }

    /// Settles every touched user's tags and writes heads, states and
    /// timers into the batch (history events went in as they were applied).
    fn finish(self, batch: &mut WriteBatch) -> Result<(), ApplyError> {
        let profiles = cf(self.db, CF_PROFILES);
        let (mut records, mut users, mut new_ids) = (self.records, self.users, self.new_ids);
        for (key, record) in records.drain() {
            if record.is_empty() {
                batch.delete_cf(profiles, &key);
            } else {
                batch.put_cf(profiles, &key, record.encode());
            }
            self.cache.records.insert(key, record);
        }
        let (state_cf, timers) = (cf(self.db, CF_STATE), cf(self.db, CF_TIMERS));
        for (user, mut t) in users.drain() {
            self.engine.settle(&mut t.state, &t.dirty, self.now_ms);
            let mut value = NEVER.to_be_bytes().to_vec();
            value.extend(codec::encode(&t.state));
            batch.put_cf(state_cf, user.as_bytes(), value);
            if t.stored_wake != t.state.wake_at {
                if let Some(old) = t.stored_wake {
                    batch.delete_cf(timers, keys::timer(old, &user));
                }
                if let Some(new) = t.state.wake_at {
                    batch.put_cf(timers, keys::timer(new, &user), []);
                }
            }
            self.cache.users.insert(user, t.state);
        }
        self.cache.trim();
        new_ids.clear();
        self.cache.scratch = Scratch { records, users, new_ids };
        Ok(())
    }
}
