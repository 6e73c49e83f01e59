use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::storage::RaftLogStorageExt;
use openraft::{CommittedLeaderId, EntryPayload};

use super::*;
use crate::model::Event;
use crate::store::log_engine::LogEngine;
use crate::store::sync_audit as audit;
use crate::store::SmStore;
use crate::types::Command;

pub(crate) fn entry(index: u64, events: usize) -> Entry {
    let event = Event::bare();
    let requests = Arc::new(vec![vec![event; events]]);
    let payload = EntryPayload::Normal(Command::Write { stamp_ms: 0, requests });
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload }
}

#[test]
fn replication_reads_at_most_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(dir.path()).unwrap();
    let mut log = engine.group(GroupId(3), None).unwrap();
    let big = |i| entry(i, 40_000); // about 2.4 MB encoded each
    let size = encode(&big(1)).len();
    let fit = MAX_APPEND_ENTRIES_BYTES / size;
    assert!(fit >= 2, "{size}");
    let entries: Vec<Entry> = (1..=fit as u64 + 3).map(big).collect();
    let batch = entries.iter().fold(WriteBatch::default(), |mut b, e| {
        b.put_cf(log.logs(), log_key(GroupId(3), e.log_id.index), encode(e));
        b
    });
    log.engine.db.write(batch).unwrap();
    let end = fit as u64 + 4;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    // From RocksDB (nothing in the recent cache).
    let got = rt.block_on(log.limited_get_log_entries(1, end)).unwrap();
    assert_eq!(got.len(), fit);
    assert_eq!(rt.block_on(log.try_get_log_entries(1..end)).unwrap().len(), fit + 3);
    // From the recent cache.
    for e in entries {
        let bytes = encode(&e).len();
        log.group.recent().push(e, bytes);
    }
    assert_eq!(rt.block_on(log.limited_get_log_entries(1, end)).unwrap().len(), fit);
    assert_eq!(rt.block_on(log.limited_get_log_entries(end - 1, end)).unwrap().len(), 1);
}

/// What a neighbour group holds before openraft's suite runs next to it.
const NEIGHBOUR_ENTRIES: u64 = 3;

fn neighbour_vote(gid: GroupId) -> Vote<NodeId> {
    Vote::new(u64::from(gid.0 % 1000) + 2, 9)
}

/// The groups next to `gid` in key order, and the meta group.
fn neighbours(gid: GroupId) -> Vec<GroupId> {
    let mut n = vec![gid.0.checked_sub(1).map(GroupId), gid.0.checked_add(1).map(GroupId)];
    n.push(Some(if gid == GroupId::META { GroupId(0) } else { GroupId::META }));
    n.into_iter().flatten().collect()
}

/// How a group's log looks: entry indexes, vote, last purged.
pub(crate) fn contents(log: &LogStore) -> (Vec<u64>, Option<Vote<NodeId>>, Option<LogId>) {
    let entries = log.read_entries(.., usize::MAX).unwrap();
    let vote = log.meta_get(RAFT_VOTE).unwrap();
    let purged = log.meta_get(RAFT_LAST_PURGED).unwrap();
    (entries.iter().map(|e| e.log_id.index).collect(), vote, purged)
}

/// Neighbour checks done, by the group under test (the two suites run in
/// parallel).
static NEIGHBOURS_CHECKED: Mutex<BTreeMap<GroupId, u64>> = Mutex::new(BTreeMap::new());
static NEIGHBOURS_DAMAGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The engine of one suite case; when the case is over (the suite drops
/// it last), checks the neighbour groups are as they were written.
struct SuiteEngine {
    engine: LogEngine,
    gid: GroupId,
    _dir: tempfile::TempDir,
}

impl Drop for SuiteEngine {
    fn drop(&mut self) {
        for n in neighbours(self.gid) {
            let found = self.engine.group(n, None).map(|log| contents(&log));
            let expected = ((1..=NEIGHBOUR_ENTRIES).collect(), Some(neighbour_vote(n)), None);
            *NEIGHBOURS_CHECKED.lock().unwrap().entry(self.gid).or_default() += 1;
            if found.as_ref().ok() != Some(&expected) {
                let case = format!("testing {}: {n} holds {found:?}, expected {expected:?}", self.gid);
                NEIGHBOURS_DAMAGED.lock().unwrap().push(case);
            }
        }
    }
}

/// Builds the store of group `gid` on an engine whose neighbour groups
/// (gid - 1, gid + 1 and the meta group) already hold entries and a vote.
struct Builder(GroupId);

impl openraft::testing::StoreBuilder<TypeConfig, LogStore, crate::store::StateMachine, SuiteEngine>
    for Builder
{
    async fn build(&self) -> Result<(SuiteEngine, LogStore, crate::store::StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = LogEngine::open(dir.path()).expect("open log engine");
        for n in neighbours(self.0) {
            let mut log = engine.group(n, None).expect("neighbour");
            log.blocking_append((1..=NEIGHBOUR_ENTRIES).map(|i| entry(i, 1))).await?;
            log.save_vote(&neighbour_vote(n)).await?;
        }
        let sm = SmStore::open(dir.path()).expect("open state machine");
        let guard: Arc<dyn PurgeGuard> = sm.clone();
        let log = engine.group(self.0, Some(guard)).expect("open group");
        let state_machine = crate::store::StateMachine::new(sm, dir.path()).expect("snapshot dir");
        Ok((SuiteEngine { engine, gid: self.0, _dir: dir }, log, state_machine))
    }
}

/// openraft's suite on one group of a shared engine; neighbours intact.
fn suite_on(gid: GroupId) {
    openraft::testing::Suite::test_all(Builder(gid)).expect("storage suite");
    let checked = NEIGHBOURS_CHECKED.lock().unwrap().get(&gid).copied().unwrap_or(0);
    let per_case = neighbours(gid).len() as u64;
    assert!(
        checked >= 30 * per_case,
        "the suite's cases were checked: {checked} checks of {per_case} neighbours"
    );
    let damaged = NEIGHBOURS_DAMAGED.lock().unwrap().clone();
    assert!(damaged.is_empty(), "{} damaged: {damaged:?}", damaged.len());
}

/// openraft's storage suite drives appends (with its real flush
/// callbacks) and votes; the audit checks every one of them was synced.
#[test]
fn storage_suite_on_group_0_and_every_acknowledged_append_and_vote_follows_a_wal_sync() {
    suite_on(GroupId(0));
    let checked = audit::CHECKED.load(Ordering::SeqCst);
    assert!(checked >= 20, "the suite reported only {checked} appends and votes durable");
    let violations = audit::VIOLATIONS.lock().unwrap().clone();
    assert!(violations.is_empty(), "{} of {checked}: {violations:?}", violations.len());
}

#[test]
fn storage_suite_on_group_7_between_neighbours() {
    suite_on(GroupId(7));
}

#[test]
fn storage_suite_on_the_meta_group() {
    suite_on(GroupId::META);
}
