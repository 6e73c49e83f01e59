use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, RaftLogReader, Vote};

use super::*;
use crate::store::log_store::tests::{contents, entry};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// 16 groups append 4 entries each, all issued while the fsync thread is
/// held: none is acknowledged before a sync, and one sync (two at most, if
/// the thread took the first append before the hold) acknowledges all 64.
/// After a reopen every entry is there and the engine lists the 16 groups.
#[test]
fn one_fsync_acknowledges_appends_of_many_groups() {
    const GROUPS: u32 = 16;
    const APPENDS: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(dir.path()).unwrap();
    let logs: Vec<LogStore> = (0..GROUPS).map(|g| engine.group(GroupId(g * 3), None).unwrap()).collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let before = engine.fsyncs();
    let hold = engine.shared.syncer.hold.lock().unwrap();
    let appending = {
        let (logs, acked) = (logs.clone(), acked.clone());
        std::thread::spawn(move || {
            // join_all polls every append once before any completes.
            let appends = (1..=APPENDS).flat_map(|i| logs.iter().map(move |log| (i, log.clone())));
            let appends = appends.map(|(i, mut log)| {
                let acked = acked.clone();
                async move {
                    log.blocking_append([entry(i, 1)]).await.unwrap();
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            });
            runtime().block_on(futures::future::join_all(appends));
        })
    };
    let written = |log: &LogStore| contents(log).0.len() as u64 == APPENDS;
    let start = Instant::now();
    while !logs.iter().all(written) {
        assert!(start.elapsed() < Duration::from_secs(30), "appends not written");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(acked.load(Ordering::SeqCst), 0, "acknowledged with the fsync thread held");
    assert_eq!(engine.fsyncs(), before, "no sync while held");
    drop(hold);
    appending.join().unwrap();
    let appends = GROUPS as u64 * APPENDS;
    let fsyncs = engine.fsyncs() - before;
    eprintln!("{appends} appends of {GROUPS} groups acknowledged by {fsyncs} fsync(s)");
    assert_eq!(acked.load(Ordering::SeqCst) as u64, appends);
    assert!((1..=2).contains(&fsyncs), "{fsyncs} fsyncs for {appends} appends");

    drop((logs, engine));
    let engine = LogEngine::open(dir.path()).unwrap();
    assert_eq!(engine.groups().unwrap(), (0..GROUPS).map(|g| GroupId(g * 3)).collect::<Vec<_>>());
    for g in 0..GROUPS {
        let log = engine.group(GroupId(g * 3), None).unwrap();
        assert_eq!(contents(&log), ((1..=APPENDS).collect(), None, None), "group {g}");
    }
}

/// A store of `gid` holding entries 1..=10 and a vote.
fn filled(rt: &tokio::runtime::Runtime, engine: &LogEngine, gid: GroupId) -> LogStore {
    let mut log = engine.group(gid, None).unwrap();
    rt.block_on(log.blocking_append((1..=10).map(|i| entry(i, 1)))).unwrap();
    rt.block_on(log.save_vote(&Vote::new(u64::from(gid.0 % 100) + 1, 1))).unwrap();
    log
}

fn untouched(log: &LogStore) {
    let vote = Vote::new(u64::from(log.group_id().0 % 100) + 1, 1);
    assert_eq!(contents(log), ((1..=10).collect(), Some(vote), None), "{}", log.group_id());
}

/// Truncating, purging and dropping a group leaves every other group's
/// entries and meta as they were, at the ends of the id space too (group
/// 0 and the meta group, whose id has no successor).
#[test]
fn truncate_purge_and_drop_touch_only_their_group() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(dir.path()).unwrap();
    let ids = [GroupId(0), GroupId(1), GroupId(7), GroupId(8), GroupId(u32::MAX - 1), GroupId::META];
    let mut logs: Vec<LogStore> = ids.iter().map(|&g| filled(&rt, &engine, g)).collect();
    assert!(engine.group(GroupId(7), None).is_err(), "an open group is not opened twice");

    // Group 0: truncate, then purge.
    rt.block_on(logs[0].truncate(log_id(6))).unwrap();
    rt.block_on(logs[0].purge(log_id(2))).unwrap();
    assert_eq!(contents(&logs[0]).0, vec![3, 4, 5]);
    assert_eq!(contents(&logs[0]).2, Some(log_id(2)));
    // The meta group: purge, then truncate (to the end of the id space).
    rt.block_on(logs[5].purge(log_id(4))).unwrap();
    rt.block_on(logs[5].truncate(log_id(8))).unwrap();
    assert_eq!(contents(&logs[5]).0, vec![5, 6, 7]);
    let state = rt.block_on(logs[5].get_log_state()).unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(4)), Some(log_id(7))));
    // Group 7: refused while open, dropped once closed.
    assert!(engine.drop_group(GroupId(7)).is_err(), "an open group is not dropped");
    drop(logs.remove(2));
    engine.drop_group(GroupId(7)).unwrap();
    // Placed here again, the replica has nothing but the vote it had
    // (never below it: no second vote in a term), and the retired vote
    // alone does not count as a group held.
    let mut dropped = engine.group(GroupId(7), None).unwrap();
    assert_eq!(contents(&dropped), (vec![], None, None));
    assert_eq!(rt.block_on(dropped.read_vote()).unwrap(), Some(Vote::new(8, 1)));
    assert!(!engine.groups().unwrap().contains(&GroupId(7)));
    rt.block_on(dropped.save_vote(&Vote::new(9, 2))).unwrap();
    drop(dropped);
    engine.drop_group(GroupId(7)).unwrap();
    let mut dropped = engine.group(GroupId(7), None).unwrap();
    assert_eq!(rt.block_on(dropped.read_vote()).unwrap(), Some(Vote::new(9, 2)), "the newest vote is kept");
    drop(dropped);
    for log in [&logs[1], &logs[2], &logs[3]] {
        untouched(log);
    }
    let left: Vec<GroupId> = ids.into_iter().filter(|&g| g != GroupId(7)).collect();
    assert_eq!(engine.groups().unwrap(), left);
    // Every meta group entry is dropped too; the others stay.
    drop(logs.remove(4));
    engine.drop_group(GroupId::META).unwrap();
    assert_eq!(engine.groups().unwrap(), left[..4]);
    untouched(&logs[3]);
}

/// Emptying a group's log (its state was wiped) deletes its entries and
/// purge mark but keeps its vote; other groups are untouched.
#[test]
fn a_reset_log_keeps_only_the_vote() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(dir.path()).unwrap();
    let (a, b) = (filled(&rt, &engine, GroupId(3)), filled(&rt, &engine, GroupId(4)));
    super::purge_now(&engine.shared.db, GroupId(3), log_id(4)).unwrap();
    assert!(engine.reset_log(GroupId(3)).is_err(), "an open group is not reset");
    drop(a);
    engine.reset_log(GroupId(3)).unwrap();
    let mut a = engine.group(GroupId(3), None).unwrap();
    assert_eq!(contents(&a), (vec![], Some(Vote::new(4, 1)), None));
    let state = rt.block_on(a.get_log_state()).unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None));
    untouched(&b);
}

/// A deferred purge that lands after a newer immediate one (the review's
/// race: the purger thread flushed for 4 while the core loop purged 8 at
/// once) keeps the newer mark: the log never claims entries it deleted.
#[test]
fn the_last_purged_id_never_moves_back() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(dir.path()).unwrap();
    let mut log = filled(&rt, &engine, GroupId(3));
    super::purge_now(&engine.shared.db, GroupId(3), log_id(8)).unwrap();
    super::purge_now(&engine.shared.db, GroupId(3), log_id(4)).unwrap();
    let (indexes, _, purged) = contents(&log);
    assert_eq!((indexes, purged), (vec![9, 10], Some(log_id(8))));
    let state = rt.block_on(log.get_log_state()).unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(8)));
    // Reading across the purged range starts after it, never at a hole.
    let entries = rt.block_on(log.try_get_log_entries(9..11)).unwrap();
    assert_eq!(entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), [9, 10]);
}

/// A group's guard on a state database whose flushed state covers nothing
/// until it is persisted, then everything; guards made by
/// [`Guard::sharing`] are other groups on the same database.
#[derive(Default)]
struct Guard {
    durable: Arc<AtomicU64>,
    persisted: Arc<AtomicU64>,
}

impl Guard {
    fn sharing(&self) -> Guard {
        Guard { durable: self.durable.clone(), persisted: self.persisted.clone() }
    }
}

impl PurgeGuard for Guard {
    fn durable_index(&self) -> anyhow::Result<u64> {
        Ok(self.durable.load(Ordering::SeqCst))
    }

    fn persist(&self) -> anyhow::Result<()> {
        self.persisted.fetch_add(1, Ordering::SeqCst);
        self.durable.store(u64::MAX, Ordering::SeqCst);
        Ok(())
    }

    fn applied_index(&self) -> u64 {
        u64::MAX
    }
}

/// A purge past the guard's flushed state waits for the purge thread,
/// which persists that group's guard first and purges only that group;
/// openraft sees it purged at once.
#[test]
fn a_deferred_purge_persists_its_group_first_and_purges_only_it() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(dir.path()).unwrap();
    let guard = Arc::new(Guard::default());
    let mut log = engine.group(GroupId(5), Some(guard.clone())).unwrap();
    rt.block_on(log.blocking_append((1..=10).map(|i| entry(i, 1)))).unwrap();
    let neighbours = [filled(&rt, &engine, GroupId(4)), filled(&rt, &engine, GroupId(6))];
    rt.block_on(log.purge(log_id(6))).unwrap();
    let state = rt.block_on(log.get_log_state()).unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(6)), "purged for openraft at once");
    assert_eq!(rt.block_on(log.try_get_log_entries(1..11)).unwrap().len(), 4);
    let start = Instant::now();
    while contents(&log).2 != Some(log_id(6)) {
        assert!(start.elapsed() < Duration::from_secs(30), "deferred purge never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(guard.persisted.load(Ordering::SeqCst) >= 1, "persisted before purging");
    assert_eq!(contents(&log).0, vec![7, 8, 9, 10]);
    neighbours.iter().for_each(untouched);
}

/// Deferred purges of two groups on one state database: the first flush
/// covers the second purge, which does not flush again.
#[test]
fn one_flush_covers_the_deferred_purges_of_groups_sharing_a_database() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(dir.path()).unwrap();
    let database = Guard::default();
    let mut logs: Vec<LogStore> = [GroupId(5), GroupId(7)]
        .into_iter()
        .map(|gid| {
            let guard = Arc::new(database.sharing());
            let mut log = engine.group(gid, Some(guard)).unwrap();
            rt.block_on(log.blocking_append((1..=10).map(|i| entry(i, 1)))).unwrap();
            log
        })
        .collect();
    for log in &mut logs {
        rt.block_on(log.purge(log_id(6))).unwrap();
    }
    let start = Instant::now();
    while logs.iter().any(|log| contents(log).2 != Some(log_id(6))) {
        assert!(start.elapsed() < Duration::from_secs(30), "deferred purges never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(database.persisted.load(Ordering::SeqCst), 1, "one flush for both groups");
}

/// 32 groups append in turn, each about 1/40 of the node budget per entry
/// and 20 entries each (16 budgets in all): the recent entries of all
/// groups stay within the one budget, and closing the groups frees them.
#[test]
fn recent_entries_of_many_groups_stay_within_the_node_budget() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let size = crate::store::codec::encode(&entry(1, 100)).len();
    let max = 40 * size;
    let engine = LogEngine::open_with(dir.path(), RecentBudget::new(max)).unwrap();
    let mut logs: Vec<LogStore> = (0..32).map(|g| engine.group(GroupId(g), None).unwrap()).collect();
    for i in 1..=20 {
        for log in &mut logs {
            rt.block_on(log.blocking_append([entry(i, 100)])).unwrap();
            assert!(engine.recent_bytes() <= max, "{} over {max}", engine.recent_bytes());
        }
    }
    assert!(engine.recent_bytes() >= 32 * size, "every group keeps its newest entry");
    for log in &mut logs {
        assert_eq!(rt.block_on(log.try_get_log_entries(1..21)).unwrap().len(), 20, "the rest from disk");
    }
    drop(logs);
    assert_eq!(engine.recent_bytes(), 0, "closed groups give their bytes back");
}

/// A guard whose flush does not cover the purge: the state of a snapshot
/// that openraft has handed to the state machine but that is not installed
/// yet (openraft asks for the log's purge up to it at once).
#[derive(Default)]
struct Installing {
    durable: AtomicU64,
    persisted: AtomicU64,
    /// Whether the purge thread always sees nothing durable (so only the
    /// path under test can land a purge).
    hidden_from_purger: std::sync::atomic::AtomicBool,
}

impl PurgeGuard for Installing {
    fn durable_index(&self) -> anyhow::Result<u64> {
        let purger = std::thread::current().name() == Some("raft-log-purge");
        if purger && self.hidden_from_purger.load(Ordering::SeqCst) {
            return Ok(0);
        }
        Ok(self.durable.load(Ordering::SeqCst))
    }

    fn persist(&self) -> anyhow::Result<()> {
        self.persisted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The snapshot is not applied until it is installed.
    fn applied_index(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }
}

/// A purge past a state that even a flush does not cover waits: the log
/// on disk keeps its entries and no purge mark (a crash during the install
/// then leaves a log that still joins the old state), while openraft sees
/// the purge at once. Once the install has made the state durable, the
/// state machine's `purge_covered` runs it; else the purge thread's retry.
#[test]
fn a_purge_past_a_snapshot_not_installed_yet_waits_for_its_state() {
    let rt = runtime();
    for finish in ["by the state machine", "by the purge thread"] {
        let dir = tempfile::tempdir().unwrap();
        let engine = LogEngine::open(dir.path()).unwrap();
        let gid = GroupId(3 + u32::from(finish.ends_with("thread")));
        let guard = Arc::new(Installing::default());
        let mut log = engine.group(gid, Some(guard.clone())).unwrap();
        rt.block_on(log.blocking_append((1..=10).map(|i| entry(i, 1)))).unwrap();
        rt.block_on(log.purge(log_id(8))).unwrap();
        assert_eq!(rt.block_on(log.get_log_state()).unwrap().last_purged_log_id, Some(log_id(8)));
        // Two retry rounds: still not purged on disk.
        std::thread::sleep(PURGE_RETRY * 2 + Duration::from_millis(200));
        let db = &engine.shared.db;
        let mark = db.get_cf(cf(db, CF_RAFT_META), raft_meta(gid, RAFT_LAST_PURGED)).unwrap();
        assert_eq!(mark, None, "{finish}: no purge mark past the state");
        let on_disk = db
            .iterator_cf(cf(db, CF_LOGS), IteratorMode::Start)
            .filter(|item| parse_log_key(&item.as_ref().unwrap().0).is_some_and(|(g, _)| g == gid))
            .count();
        assert_eq!(on_disk, 10, "{finish}: every entry still on disk");
        assert_eq!(guard.persisted.load(Ordering::SeqCst), 0, "{finish}: no flush, which could not help");

        guard.durable.store(8, Ordering::SeqCst);
        if finish == "by the state machine" {
            log.purge_covered().unwrap();
            assert_eq!(contents(&log).2, Some(log_id(8)), "purged at once");
        }
        let start = Instant::now();
        while contents(&log).2 != Some(log_id(8)) {
            assert!(start.elapsed() < Duration::from_secs(30), "{finish}: the purge never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(contents(&log).0, vec![9, 10], "{finish}");
        drop(log);
    }
}

/// The log's entries follow its purge mark without a hole: a read whose
/// first stored entry lies past the one it needs is an error, never a
/// shorter answer that starts later.
#[test]
fn a_hole_at_the_start_of_a_read_is_an_error() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(dir.path()).unwrap();
    let mut log = engine.group(GroupId(2), None).unwrap();
    rt.block_on(log.blocking_append((1..=10).map(|i| entry(i, 1)))).unwrap();
    rt.block_on(log.purge(log_id(3))).unwrap();
    assert_eq!(rt.block_on(log.try_get_log_entries(4..6)).unwrap().len(), 2);
    let db = &engine.shared.db;
    db.delete_range_cf(cf(db, CF_LOGS), log_key(GroupId(2), 4), log_key(GroupId(2), 6)).unwrap();
    // Reopened: read from disk (not the recent entries), the mark from disk.
    drop(log);
    let mut log = engine.group(GroupId(2), None).unwrap();
    let e = rt.block_on(log.try_get_log_entries(4..8)).unwrap_err().to_string();
    assert!(e.contains("log entry 4 is missing (the next stored entry is 6)"), "{e}");
    let e = rt.block_on(log.try_get_log_entries(0..8)).unwrap_err().to_string();
    assert!(e.contains("log entry 4 is missing"), "{e}");
    assert_eq!(rt.block_on(log.try_get_log_entries(6..8)).unwrap().len(), 2);
}

/// Appends `indexes` to `log` on a thread of its own, as openraft's core
/// would; the flag is set once they are acknowledged (flushed). The thread
/// gives up after `patience` (its clone of the log dropped then).
fn append_in_background(
    log: &LogStore,
    indexes: std::ops::RangeInclusive<u64>,
    patience: Duration,
) -> (Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>) {
    let acked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut log, flag) = (log.clone(), acked.clone());
    let thread = std::thread::spawn(move || {
        let append = log.blocking_append(indexes.map(|i| entry(i, 1)));
        if let Ok(Ok(_)) = runtime().block_on(async { tokio::time::timeout(patience, append).await }) {
            flag.store(true, Ordering::SeqCst);
        }
    });
    (acked, thread)
}

fn bridge_on_disk(engine: &LogEngine, gid: GroupId) -> Option<u64> {
    read_meta(&engine.shared.db, gid, RAFT_BRIDGE).unwrap()
}

/// Waits until `log` holds exactly `indexes` (as openraft reads it).
fn wait_for_entries(log: &LogStore, indexes: &[u64]) {
    let start = Instant::now();
    while contents(log).0 != indexes {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "entries {indexes:?} never written: {:?}",
            contents(log)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A snapshot accepted past the log's end (entries 1-5 stored, snapshot at
/// 10): openraft asks for the purge to 10 at once, and entries 11 to 13
/// appended before the install is durable are written but not acknowledged
/// until a purge at or past 10 is on disk (with the bridge key gone in the
/// same write), whichever path lands it: the state machine after its
/// install, the purge thread's retry, or a newer purge the state covers.
#[test]
fn appends_past_an_accepted_snapshot_wait_for_its_purge_to_be_on_disk() {
    let rt = runtime();
    for finish in ["by the state machine", "by the purge thread", "by a newer purge"] {
        let dir = tempfile::tempdir().unwrap();
        let engine = LogEngine::open(dir.path()).unwrap();
        let gid = GroupId(5);
        let guard = Arc::new(Installing::default());
        guard.hidden_from_purger.store(finish != "by the purge thread", Ordering::SeqCst);
        let mut log = engine.group(gid, Some(guard.clone())).unwrap();
        rt.block_on(log.blocking_append((1..=5).map(|i| entry(i, 1)))).unwrap();
        // A purge inside the log opens no bridge.
        rt.block_on(log.purge(log_id(3))).unwrap();
        assert_eq!(bridge_on_disk(&engine, gid), None, "{finish}");
        rt.block_on(log.purge(log_id(10))).unwrap();
        assert_eq!(bridge_on_disk(&engine, gid), Some(10), "{finish}: the bridge is on disk");

        let (acked, thread) = append_in_background(&log, 11..=12, Duration::from_secs(60));
        wait_for_entries(&log, &[11, 12]);
        std::thread::sleep(Duration::from_millis(300));
        assert!(!acked.load(Ordering::SeqCst), "{finish}: acknowledged before the snapshot is durable");
        // Appends meanwhile are held too, in order.
        let (acked_13, thread_13) = append_in_background(&log, 13..=13, Duration::from_secs(60));
        wait_for_entries(&log, &[11, 12, 13]);
        assert!(!acked_13.load(Ordering::SeqCst), "{finish}");

        let purged = match finish {
            "by the state machine" => {
                guard.durable.store(10, Ordering::SeqCst);
                log.purge_covered().unwrap();
                10
            }
            "by the purge thread" => {
                guard.durable.store(10, Ordering::SeqCst);
                10
            }
            _ => {
                guard.durable.store(12, Ordering::SeqCst);
                rt.block_on(log.purge(log_id(12))).unwrap();
                12
            }
        };
        thread.join().unwrap();
        thread_13.join().unwrap();
        assert!(
            acked.load(Ordering::SeqCst) && acked_13.load(Ordering::SeqCst),
            "{finish}: acknowledged after"
        );
        assert_eq!(contents(&log).2, Some(log_id(purged)), "{finish}: purged on disk");
        assert_eq!(bridge_on_disk(&engine, gid), None, "{finish}: the bridge is gone with the purge");
        // And appends go straight to the fsync thread again.
        rt.block_on(log.blocking_append([entry(14, 1)])).unwrap();
        drop(log);
        drop(engine);
        let engine = LogEngine::open(dir.path()).unwrap();
        let log = engine.group(gid, None).unwrap();
        let kept: Vec<u64> = (purged + 1..=14).collect();
        assert_eq!(contents(&log).0, kept, "{finish}: nothing dropped at reopen");
    }
}

/// A crash while the bridge is open (the install not durable, the purge not
/// on disk) leaves entries 1-5, a hole, then 11 and 12, none of which was
/// acknowledged. At open the log drops what lies past the bridge and ends at
/// 5 again, joining the old state; a log without a bridge is left alone.
#[test]
fn a_crash_inside_a_bridge_drops_the_unacknowledged_entries_past_it_at_open() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (gid, other) = (GroupId(6), GroupId(7));
    {
        let engine = LogEngine::open(dir.path()).unwrap();
        let mut log = engine.group(gid, Some(Arc::new(Installing::default()))).unwrap();
        let mut neighbour = engine.group(other, None).unwrap();
        rt.block_on(log.blocking_append((1..=5).map(|i| entry(i, 1)))).unwrap();
        rt.block_on(neighbour.blocking_append((1..=3).map(|i| entry(i, 1)))).unwrap();
        rt.block_on(log.purge(log_id(10))).unwrap();
        let (acked, thread) = append_in_background(&log, 11..=12, Duration::from_millis(500));
        wait_for_entries(&log, &[11, 12]);
        // Another group's append syncs the WAL: 11 and 12 are on disk.
        rt.block_on(neighbour.blocking_append([entry(4, 1)])).unwrap();
        thread.join().unwrap();
        assert!(!acked.load(Ordering::SeqCst), "never acknowledged");
    }
    let engine = LogEngine::open(dir.path()).unwrap();
    assert_eq!(bridge_on_disk(&engine, gid), Some(10), "the crash left the bridge");
    let mut log = engine.group(gid, None).unwrap();
    assert_eq!(contents(&log), (vec![1, 2, 3, 4, 5], None, None), "the tail past the bridge is gone");
    assert_eq!(bridge_on_disk(&engine, gid), None);
    let state = rt.block_on(log.get_log_state()).unwrap();
    assert_eq!(state.last_log_id, Some(log_id(5)));
    assert_eq!(contents(&engine.group(other, None).unwrap()).0, vec![1, 2, 3, 4], "the neighbour untouched");
}
