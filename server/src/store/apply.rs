//! Applying commands: dedupe, expiry check, fold events into family records,
//! update features and tags, keep the timer index. Pure over (database as of
//! the previous entry, entry contents): everything it writes goes into the
//! entry's `WriteBatch`, and the only time it uses is the entry's logical
//! clock.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::BTreeSet;

/// Maps keyed by user ids and row keys: foldhash (seeded per process) is
/// several times cheaper than SipHash on these short keys.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch, DB};

use super::apply_writer::CacheBudget;
use super::codec;
use super::keys::{self, CF_DEDUPE, CF_HISTORY, CF_PROFILES, CF_STATE, CF_TIMERS};
use super::record::{encode_history_event_into, stored_expiry, FamilyHead};
use super::sm_db::cf;
use crate::engine::state::{Dirty, UserState};
use crate::engine::Engine;
use crate::error::RETRY_LATER;
use crate::limits::{
    MAX_SETTLE_BYTES_PER_ENTRY, MAX_UNDECLARED_ATTRS_PER_FAMILY, MAX_USERS_PER_TICK,
    MAX_WRITE_STATE_BYTES_PER_ENTRY,
};
use crate::model::{expiry, is_live, Event, WriteCounts, NEVER};
use crate::schema::Schema;
use crate::types::{GroupId, WriteOutcome};
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
/// Bounded: emptied when it grows past its share of the node's
/// [`CacheBudget`]; cleared when a snapshot replaces the group's data.
/// One per group (its keys are that group's).
///
/// Split in [`SHARDS`] by user: an entry's users are applied in parallel,
/// one shard per thread (users never share rows, so the outcome does not
/// depend on which runs first).
pub struct ApplyCache {
    shards: Vec<CacheShard>,
    budget: std::sync::Arc<CacheBudget>,
    /// The bytes last reported to the budget.
    reported: usize,
}

struct CacheShard {
    /// Each head and state with its encoded size (what it last was in the
    /// database), counted in `bytes`.
    records: HashMap<Vec<u8>, (FamilyHead, usize)>,
    users: HashMap<String, (UserState, usize)>,
    /// Encoded bytes of the heads and states held: the memory bound (the
    /// decoded forms are a small multiple of it), besides the counts.
    bytes: usize,
    byte_capacity: usize,
    /// The dedupe keys the previous entry wrote, with their ends: its batch
    /// may still be in flight (see the state machine's writer), so they are
    /// checked here before the database.
    recent_ids: HashMap<Vec<u8>, i64>,
    capacity: usize,
    /// Bytes of this shard's batch for the last entry: the next batch
    /// reserves about as much (growing a large batch copies it each time).
    batch_bytes: usize,
    /// The per-entry maps of the last entry, emptied, kept for their
    /// capacity: an entry of thousands of users would otherwise allocate
    /// (and the allocator zero fresh pages for) large tables every time.
    scratch: Scratch,
}

#[derive(Default)]
struct Scratch {
    records: HashMap<Vec<u8>, Head>,
    users: HashMap<String, Touched>,
    new_ids: HashMap<Vec<u8>, i64>,
    buf: Vec<u8>,
}

/// A family head while an entry is applied.
struct Head {
    head: FamilyHead,
    /// An applied event changed it (or may have): it is written back.
    /// One only loaded for checks ([`EntryState::prepare`]) is not.
    used: bool,
}

/// Parallel apply: user shards, and the smallest entry worth a second thread.
pub const SHARDS: usize = 2;
const PARALLEL_MIN_EVENTS: usize = 64;

/// Long-lived threads for the shards (threads started per entry cost more
/// than they saved: start-up, and the allocator's per-thread heaps), shared
/// by every group of the node: one per core (at least [`SHARDS`]), so that
/// the entries of several busy groups applied at once each get theirs.
/// The outcome never depends on the threads: each user shard is its own
/// item, gathered in shard order.
fn apply_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(SHARDS, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores.max(SHARDS))
            .thread_name(|i| format!("apply-{i}"))
            .build()
            .expect("start the apply threads")
    })
}

/// The shard of a user (FNV-1a of the id).
fn shard_of(user_id: &str) -> usize {
    let hash =
        user_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (hash % SHARDS as u64) as usize
}

impl ApplyCache {
    /// A group's cache, holding a share of `budget`.
    pub fn new(budget: std::sync::Arc<CacheBudget>) -> ApplyCache {
        budget.join();
        let shard = || CacheShard {
            records: HashMap::default(),
            users: HashMap::default(),
            recent_ids: HashMap::default(),
            bytes: 0,
            capacity: 0,
            byte_capacity: 0,
            batch_bytes: 0,
            scratch: Scratch::default(),
        };
        ApplyCache { shards: (0..SHARDS).map(|_| shard()).collect(), budget, reported: 0 }
    }

    /// The shards, each bounded by its part of this cache's current share
    /// of the budget (groups open and close).
    fn sized(&mut self) -> &mut [CacheShard] {
        let capacity = self.budget.share().div_ceil(SHARDS);
        let byte_capacity = self.budget.byte_share().div_ceil(SHARDS);
        for shard in &mut self.shards {
            shard.capacity = capacity;
            shard.byte_capacity = byte_capacity;
        }
        &mut self.shards
    }

    /// Trims an idle group's cache: whatever is over its share goes (as
    /// the next entry would trim it), and so do the previous entry's dedupe
    /// ids and the per-entry scratch tables, both only kept for the next
    /// entry. Call only when no batch of the group is in flight: the ids
    /// and the dropped heads and states must be in the database.
    pub fn trim_settled(&mut self) {
        for shard in self.sized() {
            shard.trim();
            shard.recent_ids = HashMap::default();
            shard.scratch = Scratch::default();
        }
        self.report();
    }

    /// Reports what the cache holds to the node's budget, and says whether
    /// it should be trimmed once its last batch is written: the node's
    /// caches together hold more than the budget, and this one more than
    /// its share (an entry just kept its users past it).
    pub fn over_budget(&mut self) -> bool {
        let bytes = self.report();
        bytes > self.budget.byte_share() && self.budget.over()
    }

    fn report(&mut self) -> usize {
        let bytes = self.bytes();
        self.budget.held(self.reported, bytes);
        self.reported = bytes;
        bytes
    }

    /// Encoded bytes of the heads and states held.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    pub fn clear(&mut self) {
        for shard in &mut self.shards {
            shard.records.clear();
            shard.users.clear();
            shard.bytes = 0;
            shard.recent_ids.clear();
        }
        self.report();
    }
}

impl Drop for ApplyCache {
    fn drop(&mut self) {
        self.budget.held(self.reported, 0);
        self.budget.leave();
    }
}

impl CacheShard {
    /// Empties what is over its bound: a map over its count, both over
    /// their bytes (the next entries reload what they touch).
    fn trim(&mut self) {
        let over = self.bytes > self.byte_capacity;
        if over || self.records.len() > self.capacity {
            self.bytes -= self.records.values().map(|(_, n)| n).sum::<usize>();
            self.records.clear();
        }
        if over || self.users.len() > self.capacity {
            self.bytes -= self.users.values().map(|(_, n)| n).sum::<usize>();
            self.users.clear();
        }
    }

    /// The cached head under `key`, with its stored size.
    fn take_record(&mut self, key: &[u8]) -> Option<(FamilyHead, usize)> {
        let (record, n) = self.records.remove(key)?;
        self.bytes -= n;
        Some((record, n))
    }

    /// The cached state of `user_id`, with its stored size.
    fn take_user(&mut self, user_id: &str) -> Option<(UserState, usize)> {
        let (state, n) = self.users.remove(user_id)?;
        self.bytes -= n;
        Some((state, n))
    }

    fn keep_record(&mut self, key: Vec<u8>, record: FamilyHead, bytes: usize) {
        self.bytes += bytes;
        if let Some((_, old)) = self.records.insert(key, (record, bytes)) {
            self.bytes -= old;
        }
    }

    fn keep_user(&mut self, user_id: String, state: UserState, bytes: usize) {
        self.bytes += bytes;
        if let Some((_, old)) = self.users.insert(user_id, (state, bytes)) {
            self.bytes -= old;
        }
    }
}

/// An event's dedupe key, and whether an earlier entry left a live marker.
type DedupeKey = (Vec<u8>, bool);

/// A user's engine state while an entry is applied.
struct Touched {
    state: UserState,
    dirty: Dirty,
    /// The wake time stored before this entry (its timer key to replace).
    stored_wake: Option<i64>,
    /// An applied event, a tick or a re-evaluation took it: it is settled
    /// and written back. One only loaded for the entry's budget (its
    /// requests were deferred) is not: no state row appears for a user
    /// nothing was applied to.
    used: bool,
}

/// When and by which rules an entry applies: its logical time (the
/// leader's stamp, never the local clock) and the shard's apply rules
/// version.
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub now_ms: i64,
    pub rules: u32,
}

/// Family heads, user states and dedupe markers touched by one entry.
struct EntryState<'a> {
    db: &'a DB,
    gid: GroupId,
    cache: &'a mut CacheShard,
    engine: &'a Engine,
    now_ms: i64,
    /// The shard's apply rules version (see `portrait_core::rules`).
    rules: u32,
    records: HashMap<Vec<u8>, Head>,
    users: HashMap<String, Touched>,
    /// Dedupe keys written by this entry, with the end of their window.
    new_ids: HashMap<Vec<u8>, i64>,
    /// Where each row's value is encoded before the batch copies it.
    buf: Vec<u8>,
    /// Stored bytes of the live heads and the states loaded so far (see
    /// [`MAX_WRITE_STATE_BYTES_PER_ENTRY`]).
    loaded: usize,
}

/// What a shard's first pass over its part of a write entry found.
struct Prepared {
    /// Each event's dedupe lookup ([`EntryState::dedupe_lookups`]).
    dedupe: Vec<Option<DedupeKey>>,
    /// The request (its index in the entry) during which this shard's
    /// loads passed its share of [`MAX_WRITE_STATE_BYTES_PER_ENTRY`].
    over: Option<usize>,
    /// Requests refused for their undeclared attribute names, with why.
    overflows: Vec<(usize, String)>,
}

/// Applies the write requests of one entry `at` its logical time.
/// Entries of [`PARALLEL_MIN_EVENTS`] or more apply their user shards on
/// the apply threads in parallel; each shard fills its own batch, appended in
/// shard order.
#[allow(clippy::too_many_arguments)]
pub fn apply_write(
    db: &DB,
    gid: GroupId,
    cache: &mut ApplyCache,
    schema: &Schema,
    engine: &Engine,
    at: At,
    requests: &[Vec<Event>],
    batch: &mut WriteBatch,
) -> Result<Vec<WriteOutcome>, ApplyError> {
    let mut outcomes = Vec::with_capacity(requests.len());
    let mut parts: Vec<Vec<(usize, &Event)>> = vec![Vec::new(); SHARDS];
    for (i, request) in requests.iter().enumerate() {
        // Validation happens before any change, so a rejected request leaves
        // nothing behind.
        if let Err(e) = validate_request(request, schema, None) {
            outcomes.push(WriteOutcome::Rejected { reason: e.to_string() });
            continue;
        }
        outcomes.push(WriteOutcome::Applied(WriteCounts::default()));
        for event in request {
            parts[shard_of(&event.user_id)].push((i, event));
        }
    }
    let total: usize = parts.iter().map(Vec::len).sum();
    let parallel = total >= PARALLEL_MIN_EVENTS;
    let mut states: Vec<_> =
        cache.sized().iter_mut().map(|shard| EntryState::new(db, gid, shard, engine, at)).collect();
    // First pass: dedupe lookups, then the heads and states apply will need,
    // within the entry's budget of stored bytes; then the bound on
    // undeclared attribute names per user and family. A request over either
    // is not applied at all.
    let first = outcomes.iter().position(|o| matches!(o, WriteOutcome::Applied(_)));
    let share = MAX_WRITE_STATE_BYTES_PER_ENTRY / SHARDS;
    let checks: Vec<_> = states.iter_mut().zip(&parts).collect();
    let prepared: Vec<Prepared> = on_shards(parallel, checks, |(st, part)| st.prepare(schema, part, share))
        .into_iter()
        .collect::<Result<_, _>>()?;
    let mut refused = false;
    if let Some(over) = prepared.iter().filter_map(|p| p.over).min() {
        for (i, outcome) in outcomes.iter_mut().enumerate().skip(over) {
            if !matches!(outcome, WriteOutcome::Applied(_)) {
                continue;
            }
            refused = true;
            *outcome = match Some(i) == first {
                true => WriteOutcome::Rejected {
                    reason: format!(
                        "the stored profiles and states of the request's users (those of one half of the \
                         user space) are over the {} MiB a write entry may load \
                         (MAX_WRITE_STATE_BYTES_PER_ENTRY, half of it per half): send fewer users per \
                         request",
                        MAX_WRITE_STATE_BYTES_PER_ENTRY >> 20
                    ),
                },
                false => WriteOutcome::Deferred {
                    reason: format!(
                        "not applied: the write entry it was proposed in had loaded the {} MiB of stored \
                         profiles and states it may (MAX_WRITE_STATE_BYTES_PER_ENTRY) before reaching it; \
                         nothing of it was written: {RETRY_LATER}",
                        MAX_WRITE_STATE_BYTES_PER_ENTRY >> 20
                    ),
                },
            };
        }
    }
    for p in &prepared {
        for (i, reason) in &p.overflows {
            if matches!(outcomes[*i], WriteOutcome::Applied(_)) {
                outcomes[*i] = WriteOutcome::Rejected { reason: reason.clone() };
                refused = true;
            }
        }
    }
    let outcomes_now = &outcomes;
    let results = on_shards(
        parallel,
        states.into_iter().zip(&parts).zip(prepared).collect(),
        |((mut st, part), prepared)| -> Result<_, ApplyError> {
            let mut counts = vec![WriteCounts::default(); requests.len()];
            let reserve = st.cache.batch_bytes + st.cache.batch_bytes / 4;
            let mut shard_batch = WriteBatch::with_capacity_bytes(reserve.max(1024));
            let applied = |i: usize| matches!(outcomes_now[i], WriteOutcome::Applied(_));
            let events = part.iter().zip(prepared.dedupe);
            for (&(i, event), dedupe) in events.filter(|((i, _), _)| !refused || applied(*i)) {
                st.apply_event(schema, event, dedupe, &mut counts[i], &mut shard_batch)?;
            }
            st.finish(&mut shard_batch)?;
            Ok((counts, shard_batch))
        },
    );
    let mut shard_batches = Vec::with_capacity(SHARDS);
    for (result, shard) in results.into_iter().zip(&mut cache.shards) {
        let (counts, shard_batch) = result?;
        for (outcome, c) in outcomes.iter_mut().zip(counts) {
            if let WriteOutcome::Applied(total) = outcome {
                total.applied += c.applied;
                total.duplicates += c.duplicates;
                total.expired += c.expired;
            }
        }
        shard.batch_bytes = shard_batch.size_in_bytes();
        shard_batches.push(shard_batch);
    }
    append_batches(batch, shard_batches);
    Ok(outcomes)
}

/// `f` on each shard's item, on the apply threads in parallel or here in turn.
fn on_shards<I: Send, T: Send>(parallel: bool, items: Vec<I>, f: impl Fn(I) -> T + Sync) -> Vec<T> {
    if !parallel {
        return items.into_iter().map(f).collect();
    }
    let mut results: Vec<Option<T>> = items.iter().map(|_| None).collect();
    apply_pool().scope(|scope| {
        for (item, slot) in items.into_iter().zip(results.iter_mut()) {
            let f = &f;
            scope.spawn(move |_| *slot = Some(f(item)));
        }
    });
    results.into_iter().map(|r| r.expect("every shard ran")).collect()
}

/// Appends the operations of `srcs`, in order, to `dst`. RocksDB's batch
/// format: a 12-byte header (8-byte sequence number, 4-byte little-endian
/// count), then the records, so appending is concatenating records and
/// adding counts (what RocksDB's own `WriteBatchInternal::Append` does).
/// A lone non-empty batch appended to an empty one is moved, not copied.
fn append_batches(dst: &mut WriteBatch, srcs: Vec<WriteBatch>) {
    const HEADER: usize = 12;
    let mut parts: Vec<WriteBatch> = srcs.into_iter().filter(|b| !b.is_empty()).collect();
    if parts.is_empty() {
        return;
    }
    if dst.is_empty() && parts.len() == 1 {
        *dst = parts.pop().expect("one part");
        return;
    }
    let bytes = dst.data().len() + parts.iter().map(|b| b.data().len() - HEADER).sum::<usize>();
    let mut data = Vec::with_capacity(bytes.max(HEADER));
    if dst.is_empty() {
        data.resize(HEADER, 0);
    } else {
        data.extend_from_slice(dst.data());
    }
    let mut count = dst.len();
    for part in &parts {
        data.extend_from_slice(&part.data()[HEADER..]);
        count += part.len();
    }
    data[8..HEADER].copy_from_slice(&(count as u32).to_le_bytes());
    *dst = WriteBatch::from_data(&data);
}

/// Re-evaluates the users whose timers are due `at` its time (at most
/// [`MAX_USERS_PER_TICK`]; the rest stay due for the next tick). Returns how
/// many users were re-evaluated.
pub fn apply_tick(
    db: &DB,
    gid: GroupId,
    cache: &mut ApplyCache,
    engine: &Engine,
    at: At,
    batch: &mut WriteBatch,
) -> Result<u32, ApplyError> {
    let now_ms = at.now_ms;
    let mut due = Vec::new();
    let mut bytes = 0usize;
    for item in group_iter(db, gid, CF_TIMERS, None) {
        let (key, _) = item?;
        match keys::parse_timer(gid, &key) {
            Some((t, user)) if t <= now_ms && due.len() < MAX_USERS_PER_TICK => {
                if !due.is_empty() && bytes >= MAX_SETTLE_BYTES_PER_ENTRY {
                    break;
                }
                bytes += stored_state_len(db, gid, user)?;
                due.push(user.to_string());
            }
            _ => break,
        }
    }
    for (s, shard) in cache.sized().iter_mut().enumerate() {
        let mut st = EntryState::new(db, gid, shard, engine, at);
        for user in due.iter().filter(|u| shard_of(u) == s) {
            st.user(user)?;
        }
        st.finish(batch)?;
    }
    Ok(due.len() as u32)
}

/// The stored size of `user`'s state row (0: none).
fn stored_state_len(db: &DB, gid: GroupId, user: &str) -> Result<usize, ApplyError> {
    Ok(db.get_pinned_cf(cf(db, CF_STATE), keys::state(gid, user))?.map_or(0, |v| v.len()))
}

/// What one re-evaluation entry covered.
#[derive(Debug, PartialEq, Eq)]
pub struct Reevaluated {
    /// The last user covered (`None` when none were left).
    pub last: Option<String>,
    /// How many were covered.
    pub users: u32,
    /// No user is left after `last`: the re-evaluation is done.
    pub done: bool,
}

/// Re-evaluates every tag of up to `limit` users after `after` (key order)
/// in the `state` column family, and of fewer once their stored states
/// reach [`MAX_SETTLE_BYTES_PER_ENTRY`].
#[allow(clippy::too_many_arguments)]
pub fn apply_reevaluate(
    db: &DB,
    gid: GroupId,
    cache: &mut ApplyCache,
    engine: &Engine,
    at: At,
    after: Option<&str>,
    limit: u32,
    batch: &mut WriteBatch,
) -> Result<Reevaluated, ApplyError> {
    let start = keys::state(gid, after.unwrap_or_default());
    let mut users = Vec::new();
    let (mut bytes, mut done) = (0usize, true);
    for item in group_iter(db, gid, CF_STATE, Some(&start)) {
        let (key, value) = item?;
        let user = keys::user_of_state(&key).unwrap_or_default();
        if after == Some(user) {
            continue;
        }
        if users.len() >= limit as usize || (!users.is_empty() && bytes >= MAX_SETTLE_BYTES_PER_ENTRY) {
            done = false;
            break;
        }
        bytes += value.len();
        users.push(user.to_string());
    }
    let all = engine.all_inputs();
    for (s, shard) in cache.sized().iter_mut().enumerate() {
        let mut st = EntryState::new(db, gid, shard, engine, at);
        for user in users.iter().filter(|u| shard_of(u) == s) {
            st.user(user)?.dirty.clone_from(&all);
        }
        st.finish(batch)?;
    }
    let n = users.len() as u32;
    Ok(Reevaluated { last: users.pop(), users: n, done })
}

/// Group `gid`'s rows of column family `name` in key order, from `from`
/// (else the group's first key), never past the group's range. Total order:
/// user-keyed memtables are bucketed by user (see sm_db).
fn group_iter<'a>(
    db: &'a DB,
    gid: GroupId,
    name: &str,
    from: Option<&[u8]>,
) -> rocksdb::DBIteratorWithThreadMode<'a, DB> {
    let (start, end) = keys::group_range(gid);
    let mut opts = ReadOptions::default();
    opts.set_total_order_seek(true);
    opts.set_iterate_upper_bound(end);
    let from = from.unwrap_or(&start);
    db.iterator_cf_opt(cf(db, name), opts, IteratorMode::From(from, Direction::Forward))
}

/// The first timer's time of group `gid`, if any (the leader proposes a
/// tick when it is due).
pub fn first_timer(db: &DB, gid: GroupId) -> Result<Option<i64>, ApplyError> {
    match group_iter(db, gid, CF_TIMERS, None).next() {
        Some(item) => Ok(keys::parse_timer(gid, &item?.0).map(|(t, _)| t)),
        None => Ok(None),
    }
}

/// A user's stored engine state in group `gid`.
pub fn load_user_state(db: &DB, gid: GroupId, user_id: &str) -> Result<Option<UserState>, ApplyError> {
    match db.get_pinned_cf(cf(db, CF_STATE), keys::state(gid, user_id))? {
        Some(bytes) => Ok(Some(decode_user_state(&bytes)?)),
        None => Ok(None),
    }
}

/// A stored user state (an 8-byte header, a version byte, then compact
/// bincode: [`codec::encode_row_into`]).
pub fn decode_user_state(bytes: &[u8]) -> Result<UserState, bincode::Error> {
    codec::decode_row(bytes, "user state")
}

/// The stored form of a user state, into `out` (cleared first).
fn encode_user_state_into(out: &mut Vec<u8>, state: &UserState) {
    codec::encode_row_into(out, NEVER, state);
}

impl<'a> EntryState<'a> {
    fn new(db: &'a DB, gid: GroupId, cache: &'a mut CacheShard, engine: &'a Engine, at: At) -> Self {
        let Scratch { records, users, new_ids, buf } = std::mem::take(&mut cache.scratch);
        let (now_ms, rules) = (at.now_ms, at.rules);
        EntryState { db, gid, cache, engine, now_ms, rules, records, users, new_ids, buf, loaded: 0 }
    }

    /// The first pass over this shard's `part` of a write entry (see
    /// [`Prepared`]): looks up the events' dedupe keys, loads the heads and
    /// states apply will need, request by request, until their stored bytes
    /// pass `share`, and checks the undeclared attribute names of the
    /// requests before that one.
    fn prepare(
        &mut self,
        schema: &Schema,
        part: &[(usize, &Event)],
        share: usize,
    ) -> Result<Prepared, ApplyError> {
        let dedupe = self.dedupe_lookups(part)?;
        let mut over = None;
        let mut within = part.len();
        for (pos, (&(i, event), dedupe)) in part.iter().zip(&dedupe).enumerate() {
            // What apply loads for it: nothing for an event an earlier entry
            // saw; else the user's state (if the schema computes anything)
            // and, for a live event, its family head. (Apply loads less: an
            // id repeated within the entry is a duplicate too.)
            if dedupe.as_ref().is_some_and(|(_, seen)| *seen) {
                continue;
            }
            if !self.engine.is_empty() {
                self.load_user(&event.user_id)?;
            }
            let spec = schema.family(&event.family).expect("validated against this schema");
            if is_live(expiry(event.time_ms, spec.ttl_ms), self.now_ms) {
                self.load_record(keys::profile(self.gid, &event.user_id, &event.family))?;
            }
            if self.loaded > share {
                over = Some(i);
                within = part.partition_point(|(j, _)| *j < i).min(pos);
                break;
            }
        }
        let overflows = self.attr_overflows(schema, &part[..within], &dedupe[..within])?;
        Ok(Prepared { dedupe, over, overflows })
    }

    /// For each event with an id: its dedupe key, and whether an earlier
    /// entry left a live marker for it. The previous entry's ids are checked
    /// first (its batch may be in flight); the rest are looked up in the
    /// database in one batched read (cheaper than a point lookup each).
    fn dedupe_lookups(&self, events: &[(usize, &Event)]) -> Result<Vec<Option<DedupeKey>>, ApplyError> {
        let mut found: Vec<Option<DedupeKey>> = Vec::with_capacity(events.len());
        let mut lookups: Vec<usize> = Vec::new();
        for (_, event) in events {
            if event.event_id.is_empty() {
                found.push(None);
                continue;
            }
            let key = keys::dedupe(self.gid, &event.user_id, &event.event_id);
            let seen = match self.cache.recent_ids.get(&key) {
                Some(until) => is_live(*until, self.now_ms),
                None => {
                    lookups.push(found.len());
                    false
                }
            };
            found.push(Some((key, seen)));
        }
        if lookups.is_empty() {
            return Ok(found);
        }
        let key_of =
            |i: usize| found[i].as_ref().map(|(k, _)| k.as_slice()).expect("looked-up events have ids");
        lookups.sort_unstable_by(|a, b| key_of(*a).cmp(key_of(*b)));
        let results =
            self.db.batched_multi_get_cf(cf(self.db, CF_DEDUPE), lookups.iter().map(|&i| key_of(i)), true);
        let mut live = Vec::with_capacity(lookups.len());
        for result in results {
            let until = result?.as_deref().and_then(stored_expiry);
            live.push(until.is_some_and(|until| is_live(until, self.now_ms)));
        }
        for (i, live) in lookups.into_iter().zip(live) {
            if let Some((_, seen)) = &mut found[i] {
                *seen = live;
            }
        }
        Ok(found)
    }

    /// The requests of `part` (this shard's events, in request order) that
    /// would leave a family head with more than
    /// [`MAX_UNDECLARED_ATTRS_PER_FAMILY`] undeclared attribute names, with
    /// the reason. Names an earlier request of the entry adds count for the
    /// later ones (also when another shard refuses that earlier request:
    /// conservative, and the same on every replica). Heads are loaded into
    /// this entry's state, where apply then finds them.
    fn attr_overflows(
        &mut self,
        schema: &Schema,
        part: &[(usize, &Event)],
        dedupe: &[Option<DedupeKey>],
    ) -> Result<Vec<(usize, String)>, ApplyError> {
        let mut refused = Vec::new();
        // Undeclared names added by this entry's earlier requests, per head.
        let mut added: HashMap<Vec<u8>, BTreeSet<&str>> = HashMap::default();
        let mut adds = HashMap::default();
        // Events an earlier entry saw add nothing (apply skips them).
        let fresh: Vec<(usize, &Event)> = part
            .iter()
            .zip(dedupe)
            .filter(|(_, d)| !d.as_ref().is_some_and(|(_, seen)| *seen))
            .map(|(e, _)| *e)
            .collect();
        for request in fresh.chunk_by(|a, b| a.0 == b.0) {
            match self.request_overflow(schema, request, &added, &mut adds)? {
                Some(reason) => refused.push((request[0].0, reason)),
                None => {
                    for (key, names) in adds.drain() {
                        added.entry(key).or_default().extend(names);
                    }
                }
            }
            adds.clear();
        }
        Ok(refused)
    }

    /// [`EntryState::attr_overflows`] for one request: collects the names it
    /// adds in `adds`, or returns why it cannot.
    fn request_overflow<'e>(
        &mut self,
        schema: &Schema,
        request: &[(usize, &'e Event)],
        added: &HashMap<Vec<u8>, BTreeSet<&'e str>>,
        adds: &mut HashMap<Vec<u8>, BTreeSet<&'e str>>,
    ) -> Result<Option<String>, ApplyError> {
        for &(_, event) in request {
            let spec = schema.family(&event.family).expect("validated against this schema");
            let declared = |name: &str| spec.attrs.contains_key(name);
            // Expired events do not reach the head.
            let live = is_live(expiry(event.time_ms, spec.ttl_ms), self.now_ms);
            if !live || event.attrs.keys().all(|n| declared(n.as_str())) {
                continue;
            }
            let key = keys::profile(self.gid, &event.user_id, &event.family);
            let earlier = added.get(&key);
            let mine = adds.get(&key);
            let head = &self.load_record(key)?.head;
            let mut new = Vec::new();
            for name in event.attrs.keys().map(String::as_str).filter(|n| !declared(n)) {
                let kept = head.attrs.contains_key(name)
                    || earlier.is_some_and(|e| e.contains(name))
                    || mine.is_some_and(|m| m.contains(name));
                if kept {
                    continue;
                }
                let count = head.attrs.keys().filter(|n| !declared(n.as_str())).count()
                    + earlier.map_or(0, BTreeSet::len)
                    + mine.map_or(0, BTreeSet::len)
                    + new.len();
                if count >= MAX_UNDECLARED_ATTRS_PER_FAMILY {
                    return Ok(Some(format!(
                        "user {:?}, family {:?}: attribute {name:?} is over the limit of \
                         {MAX_UNDECLARED_ATTRS_PER_FAMILY} attribute names not declared in the schema \
                         kept per user and family (declare it in the family's attrs, or reuse names)",
                        event.user_id, event.family
                    )));
                }
                new.push(name);
            }
            if !new.is_empty() {
                adds.entry(keys::profile(self.gid, &event.user_id, &event.family)).or_default().extend(new);
            }
        }
        Ok(None)
    }

    /// Applies one event. `dedupe`: its key and whether an earlier entry
    /// saw it ([`EntryState::dedupe_lookups`]); `None` for an event without
    /// an id.
    fn apply_event(
        &mut self,
        schema: &Schema,
        event: &Event,
        dedupe: Option<DedupeKey>,
        counts: &mut WriteCounts,
        batch: &mut WriteBatch,
    ) -> Result<(), ApplyError> {
        let spec = schema.family(&event.family).expect("validated against this schema");
        if let Some((key, seen_before)) = dedupe {
            // An id repeated within this entry is a duplicate too.
            let seen = seen_before || self.new_ids.contains_key(&key);
            if seen {
                counts.duplicates += 1;
                return Ok(());
            }
            let until = self.now_ms.saturating_add(schema.dedupe_window_ms);
            batch.put_cf(cf(self.db, CF_DEDUPE), &key, until.to_be_bytes());
            self.new_ids.insert(key, until);
        }
        // Features see every new event, even one whose raw data has already
        // expired (a lifetime "first order" outlives the trade TTL); windows
        // ignore what is outside them.
        if !self.engine.is_empty() {
            let (engine, now, rules) = (self.engine, self.now_ms, self.rules);
            let touched = self.user(&event.user_id)?;
            engine.observe_by(&mut touched.state, event, now, rules, &mut touched.dirty);
        }
        let expires_at = expiry(event.time_ms, spec.ttl_ms);
        if !is_live(expires_at, self.now_ms) {
            counts.expired += 1;
            return Ok(());
        }
        let db = self.db;
        let head = self.record(keys::profile(self.gid, &event.user_id, &event.family))?;
        let write = head.apply_event(event, expires_at, spec.history_len);
        let history = cf(db, CF_HISTORY);
        for slot in write.freed {
            batch.delete_cf(history, keys::history(self.gid, &event.user_id, &event.family, slot));
        }
        if let Some(slot) = write.put {
            let key = keys::history(self.gid, &event.user_id, &event.family, slot);
            encode_history_event_into(&mut self.buf, event, expires_at);
            batch.put_cf(history, key, &self.buf);
        }
        counts.applied += 1;
        Ok(())
    }

    /// The family head under `key`, loaded once per entry and pruned of what
    /// has expired by the entry's time.
    fn record(&mut self, key: Vec<u8>) -> Result<&mut FamilyHead, ApplyError> {
        let loaded = self.load_record(key)?;
        loaded.used = true;
        Ok(&mut loaded.head)
    }

    /// [`EntryState::record`] without taking it: it is not written back
    /// unless an applied event takes it too.
    fn load_record(&mut self, key: Vec<u8>) -> Result<&mut Head, ApplyError> {
        match self.records.entry(key) {
            MapEntry::Occupied(o) => Ok(o.into_mut()),
            MapEntry::Vacant(v) => {
                // Counted only when live at the entry's time: compaction may
                // have dropped an expired row on one replica and not yet on
                // another, whose cache may also still hold it.
                let (mut record, expires, bytes) = match self.cache.take_record(v.key()) {
                    Some((record, n)) => {
                        let expires = record.max_expiry();
                        (record, expires, n)
                    }
                    None => match self.db.get_pinned_cf(cf(self.db, CF_PROFILES), v.key())? {
                        Some(bytes) => {
                            let expires = stored_expiry(&bytes).unwrap_or(NEVER);
                            (FamilyHead::decode(&bytes)?, expires, v.key().len() + bytes.len())
                        }
                        None => (FamilyHead::default(), i64::MIN, 0),
                    },
                };
                if is_live(expires, self.now_ms) {
                    self.loaded += bytes;
                }
                record.prune(self.now_ms);
                Ok(v.insert(Head { head: record, used: false }))
            }
        }
    }

    /// The user's engine state, loaded once per entry.
    fn user(&mut self, user_id: &str) -> Result<&mut Touched, ApplyError> {
        let touched = self.load_user(user_id)?;
        touched.used = true;
        Ok(touched)
    }

    /// [`EntryState::user`] without taking it: it is not settled nor
    /// written back unless an applied event takes it too.
    fn load_user(&mut self, user_id: &str) -> Result<&mut Touched, ApplyError> {
        match self.users.entry(user_id.to_string()) {
            MapEntry::Occupied(o) => Ok(o.into_mut()),
            MapEntry::Vacant(v) => {
                let (mut state, bytes) = match self.cache.take_user(user_id) {
                    Some(cached) => cached,
                    None => {
                        match self.db.get_pinned_cf(cf(self.db, CF_STATE), keys::state(self.gid, user_id))? {
                            Some(bytes) => (decode_user_state(&bytes)?, user_id.len() + bytes.len()),
                            None => (UserState::default(), 0),
                        }
                    }
                };
                self.loaded += bytes;
                let stored_wake = state.wake_at;
                // Once per user per entry; observe and settle rely on it.
                // A feature whose state started over (a schema change
                // redefined it) is an input changed for the tags reading it.
                let reset = self.engine.align_reset(&mut state);
                let dirty = match self.rules >= portrait_core::rules::RESET_FEATURES_RESETTLE {
                    true => reset,
                    false => Dirty::new(),
                };
                Ok(v.insert(Touched { state, dirty, stored_wake, used: false }))
            }
        }
    }

    /// Settles every touched user's tags and writes heads, states and
    /// timers into the batch (history events went in as they were applied).
    ///
    /// The cache is trimmed before this entry's heads and states go in: the
    /// next entry may be computed while this one's batch is still being
    /// written, and must find them here.
    fn finish(self, batch: &mut WriteBatch) -> Result<(), ApplyError> {
        let profiles = cf(self.db, CF_PROFILES);
        let (mut records, mut users, new_ids, mut buf) = (self.records, self.users, self.new_ids, self.buf);
        self.cache.trim();
        // What was only loaded is dropped, from the cache too: the
        // database holds it as it was (a previous entry's batch still in
        // flight when this entry took it from the cache is written before
        // the next entry is computed).
        for (key, Head { head: record, used }) in records.drain() {
            if !used {
                continue;
            }
            let bytes = if record.is_empty() {
                batch.delete_cf(profiles, &key);
                0
            } else {
                record.encode_into(&mut buf);
                batch.put_cf(profiles, &key, &buf);
                buf.len()
            };
            let bytes = key.len() + bytes;
            self.cache.keep_record(key, record, bytes);
        }
        let (state_cf, timers) = (cf(self.db, CF_STATE), cf(self.db, CF_TIMERS));
        for (user, mut t) in users.drain() {
            if !t.used {
                continue;
            }
            self.engine.settle_aligned(&mut t.state, &t.dirty, self.now_ms, self.rules);
            encode_user_state_into(&mut buf, &t.state);
            batch.put_cf(state_cf, keys::state(self.gid, &user), &buf);
            if t.stored_wake != t.state.wake_at {
                if let Some(old) = t.stored_wake {
                    batch.delete_cf(timers, keys::timer(self.gid, old, &user));
                }
                if let Some(new) = t.state.wake_at {
                    batch.put_cf(timers, keys::timer(self.gid, new, &user), []);
                }
            }
            let bytes = user.len() + buf.len();
            self.cache.keep_user(user, t.state, bytes);
        }
        let mut spare_ids = std::mem::replace(&mut self.cache.recent_ids, new_ids);
        spare_ids.clear();
        // A large user's state grew the encoding buffer; a group that then
        // goes idle would hold it (two per group, 64 groups).
        if buf.capacity() > SCRATCH_KEEP_BYTES {
            buf = Vec::new();
        }
        self.cache.scratch = Scratch { records, users, new_ids: spare_ids, buf };
        Ok(())
    }
}

/// The encoding buffer an apply shard keeps between entries, at most.
const SCRATCH_KEEP_BYTES: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_shard(capacity: usize, byte_capacity: usize) -> CacheShard {
        CacheShard {
            records: HashMap::default(),
            users: HashMap::default(),
            bytes: 0,
            byte_capacity,
            recent_ids: HashMap::default(),
            capacity,
            batch_bytes: 0,
            scratch: Scratch::default(),
        }
    }

    #[test]
    fn the_cache_counts_the_bytes_it_holds_and_empties_past_its_byte_bound() {
        let mut c = cache_shard(100, 1000);
        c.keep_record(b"a".to_vec(), FamilyHead::default(), 300);
        c.keep_user("u".into(), UserState::default(), 200);
        assert_eq!(c.bytes, 500);
        // Kept again with a new size: counted once, at the new size.
        c.keep_record(b"a".to_vec(), FamilyHead::default(), 400);
        assert_eq!(c.bytes, 600);
        assert!(c.take_user("u").is_some());
        assert_eq!(c.bytes, 400);
        c.trim();
        assert_eq!((c.records.len(), c.bytes), (1, 400), "within its bounds: kept");
        c.keep_user("v".into(), UserState::default(), 700);
        c.trim();
        assert_eq!((c.records.len(), c.users.len(), c.bytes), (0, 0, 0), "over 1000 bytes: emptied");
        // Over its count only: that map alone is emptied, its bytes given back.
        let mut c = cache_shard(1, 1 << 20);
        c.keep_record(b"a".to_vec(), FamilyHead::default(), 10);
        c.keep_record(b"b".to_vec(), FamilyHead::default(), 20);
        c.keep_user("u".into(), UserState::default(), 5);
        c.trim();
        assert_eq!((c.records.len(), c.users.len(), c.bytes), (0, 1, 5));
    }

    #[test]
    fn appended_batches_apply_every_operation_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = DB::open_default(dir.path()).unwrap();
        db.put(b"gone", b"x").unwrap();
        let mut dst = WriteBatch::default();
        append_batches(&mut dst, vec![WriteBatch::default()]);
        assert!(dst.is_empty());
        let mut a = WriteBatch::default();
        a.put(b"a", b"1");
        a.put(b"k", b"first");
        append_batches(&mut dst, vec![a]);
        assert_eq!(dst.len(), 2, "a lone batch is taken as it is");
        let mut b = WriteBatch::default();
        b.put(b"b", b"2");
        b.delete(b"gone");
        let mut c = WriteBatch::default();
        c.put(b"k", b"second");
        c.put(b"c", b"3");
        append_batches(&mut dst, vec![b, WriteBatch::default(), c]);
        assert_eq!(dst.len(), 6);
        db.write(dst).unwrap();
        assert_eq!(db.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(db.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(db.get(b"c").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(db.get(b"gone").unwrap(), None);
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"second"[..]), "later operations win");

        // Several parts into an empty batch.
        let (mut x, mut y, mut fresh) = (WriteBatch::default(), WriteBatch::default(), WriteBatch::default());
        x.put(b"x", b"1");
        y.delete(b"x");
        y.put(b"y", b"2");
        append_batches(&mut fresh, vec![x, y]);
        assert_eq!(fresh.len(), 3);
        db.write(fresh).unwrap();
        assert_eq!(db.get(b"x").unwrap(), None);
        assert_eq!(db.get(b"y").unwrap().as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn users_spread_over_the_shards() {
        let mut per_shard = [0usize; SHARDS];
        for u in 0..1000 {
            per_shard[shard_of(&format!("user-{u}"))] += 1;
        }
        assert!(per_shard.iter().all(|&n| n > 400), "{per_shard:?}");
    }
}
