//! Several raft groups on one node's state database: each group's data,
//! applied state, clocks, snapshots and removal stay within its own key
//! range, and the compaction filter judges each key by its own group's
//! durable clock.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, Membership, RaftSnapshotBuilder};
use portrait_server::duration::DAY_MS;
use portrait_server::model::{Event, Value};
use portrait_server::store::keys::{self, CF_DEDUPE, CF_META};
use portrait_server::store::read::{read_profile, ProfileView, Selection};
use portrait_server::store::sm_db::cf;
use portrait_server::store::{GroupState, StateDb, StateMachine};
use portrait_server::types::{Command, Entry, GroupId, LogId, SnapshotMeta};
use tempfile::TempDir;

const T0: i64 = 1_760_000_000_000;
const A: GroupId = GroupId(0);
const B: GroupId = GroupId(1);
const C: GroupId = GroupId(300);

struct Group {
    store: Arc<GroupState>,
    sm: StateMachine,
}

fn group(db: &Arc<StateDb>, dir: &Path, gid: GroupId) -> Group {
    let store = db.open_group(gid).unwrap();
    let sm = StateMachine::new(store.clone(), dir).unwrap();
    Group { store, sm }
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn event(user: &str, time_ms: i64, id: &str) -> Event {
    Event {
        user_id: user.into(),
        family: "trade".into(),
        event_type: "order".into(),
        time_ms,
        event_id: id.into(),
        attrs: [("amount".to_string(), Value::Float(12.5))].into_iter().collect(),
    }
}

fn write(index: u64, stamp_ms: i64, events: Vec<Event>) -> Entry {
    let requests = vec![events].into();
    Entry { log_id: log_id(index), payload: EntryPayload::Normal(Command::Write { stamp_ms, requests }) }
}

fn membership(index: u64, voters: &[u64]) -> Entry {
    let m = Membership::new(vec![voters.iter().copied().collect::<BTreeSet<_>>()], None);
    Entry { log_id: log_id(index), payload: EntryPayload::Membership(m) }
}

async fn apply(g: &mut Group, entries: Vec<Entry>) {
    g.sm.apply(entries).await.unwrap();
    g.sm.applied_state().await.unwrap();
}

/// `n` orders of each of `users` in entries `first..`, stamped `stamp`.
async fn orders(g: &mut Group, first: u64, users: &[&str], n: u64, stamp: i64) -> u64 {
    let mut index = first;
    for i in 0..n {
        let events = users.iter().map(|u| event(u, stamp - i as i64, &format!("{u}-{i}"))).collect();
        apply(g, vec![write(index, stamp, events)]).await;
        index += 1;
    }
    index
}

fn read(g: &Group, user: &str) -> ProfileView {
    let s = &g.store;
    read_profile(
        &s.db(),
        s.gid(),
        &s.schema().schema,
        &s.engine(),
        user,
        &Selection::all(),
        s.at(T0),
        usize::MAX,
    )
    .unwrap()
    .expect("no byte limit")
}

/// Every key of every column family in `gid`'s range, with its value.
fn rows(db: &StateDb, gid: GroupId) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let db = db.db();
    let (start, end) = keys::group_range(gid);
    let mut out = Vec::new();
    for name in keys::ALL_CFS {
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_total_order_seek(true);
        opts.set_iterate_upper_bound(end.clone());
        let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        for item in db.iterator_cf_opt(cf(&db, name), opts, mode) {
            let (k, v) = item.unwrap();
            out.push((name, k.to_vec(), v.to_vec()));
        }
    }
    out
}

#[tokio::test]
async fn groups_keep_their_data_applied_state_clock_and_membership_apart() {
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let mut a = group(&db, dir.path(), A);
    let mut b = group(&db, dir.path(), B);
    let mut c = group(&db, dir.path(), C);
    // The same user id in two groups: distinct users.
    orders(&mut a, 1, &["u1", "only-a"], 3, T0).await;
    orders(&mut b, 1, &["u1"], 5, T0 + 1000).await;
    apply(&mut b, vec![membership(6, &[1, 2])]).await;
    apply(&mut c, vec![membership(1, &[3])]).await;
    assert!(read(&a, "only-a").found);
    assert!(!read(&b, "only-a").found, "a write to A never appears in B");
    assert!(!read(&c, "u1").found);
    assert_ne!(read(&a, "u1"), read(&b, "u1"));
    let before = [read(&a, "u1"), read(&b, "u1")];
    let a_rows = rows(&db, A).len();
    assert!(a_rows > 0 && !rows(&db, B).is_empty());
    db.persist().unwrap();
    drop((a, b, c, db));

    let db = StateDb::open(dir.path()).unwrap();
    let (a, b, c) = (group(&db, dir.path(), A), group(&db, dir.path(), B), group(&db, dir.path(), C));
    assert_eq!([read(&a, "u1"), read(&b, "u1")], before);
    let (sa, sb, sc) = (a.store.applied(), b.store.applied(), c.store.applied());
    assert_eq!(sa.last_applied.map(|l| l.index), Some(3));
    assert_eq!(sb.last_applied.map(|l| l.index), Some(6));
    assert_eq!(sc.last_applied.map(|l| l.index), Some(1));
    assert_eq!((sa.clock_ms, sb.clock_ms, sc.clock_ms), (T0, T0 + 1000, 0));
    let voters = |g: &Group| g.store.applied().membership.membership().voter_ids().collect::<Vec<_>>();
    assert_eq!((voters(&a), voters(&b), voters(&c)), (vec![], vec![1, 2], vec![3]));
    assert_eq!(rows(&db, A).len(), a_rows);
}

async fn build(g: &mut Group) -> (Vec<u8>, SnapshotMeta) {
    let snap = g.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut bytes = Vec::new();
    let mut file = snap.snapshot;
    tokio::io::AsyncReadExt::read_to_end(&mut *file, &mut bytes).await.unwrap();
    (bytes, snap.meta)
}

async fn install(g: &mut Group, archive: &[u8], meta: &SnapshotMeta) -> Result<(), String> {
    let mut incoming = g.sm.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *incoming, archive).await.unwrap();
    g.sm.install_snapshot(meta, incoming).await.map_err(|e| format!("{e}"))
}

#[tokio::test]
async fn a_groups_snapshot_replaces_exactly_that_group() {
    let leader_dir = tempfile::tempdir().unwrap();
    let leader = StateDb::open(leader_dir.path()).unwrap();
    let mut la = group(&leader, leader_dir.path(), A);
    let mut lb = group(&leader, leader_dir.path(), B);
    orders(&mut la, 1, &["u1", "u2"], 4, T0).await;
    orders(&mut lb, 1, &["u1", "leader-b"], 2, T0).await;
    let (archive, meta) = build(&mut la).await;
    assert_eq!(meta.last_log_id.map(|l| l.index), Some(4));
    let leader_a = rows(&leader, A);

    // Into a fresh database's A.
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = StateDb::open(fresh_dir.path()).unwrap();
    let mut fa = group(&fresh, fresh_dir.path(), A);
    install(&mut fa, &archive, &meta).await.unwrap();
    assert_eq!(rows(&fresh, A), leader_a);
    assert_eq!(read(&fa, "u1"), read(&la, "u1"));
    assert!(rows(&fresh, B).is_empty(), "the snapshot holds nothing of B");

    // Into a database where A held other data, next to B's.
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let mut a = group(&db, dir.path(), A);
    let mut b = group(&db, dir.path(), B);
    orders(&mut a, 1, &["u1", "stale-a"], 9, T0 + 5).await;
    orders(&mut b, 1, &["u1", "mine-b"], 3, T0 + 7).await;
    let b_before = rows(&db, B);
    install(&mut a, &archive, &meta).await.unwrap();
    assert_eq!(rows(&db, A), leader_a, "exactly A's data");
    assert!(!read(&a, "stale-a").found, "what A held before is gone");
    assert_eq!(read(&a, "u2"), read(&la, "u2"));
    assert_eq!(a.sm.applied_state().await.unwrap().0, meta.last_log_id);
    assert_eq!(a.store.clock_ms(), T0);
    assert_eq!(rows(&db, B), b_before, "B untouched");
    assert!(read(&b, "mine-b").found);
    // A keeps applying after the install, and so does B.
    orders(&mut a, 5, &["u3"], 1, T0 + 10).await;
    orders(&mut b, 4, &["u4"], 1, T0 + 10).await;
    assert!(read(&a, "u3").found && read(&b, "u4").found);
    // And the installed state survives a restart (ingested files and
    // the cleared install marker are durable).
    drop((a, b, db));
    let db = StateDb::open(dir.path()).unwrap();
    let a = group(&db, dir.path(), A);
    assert_eq!(a.store.applied().last_applied.map(|l| l.index), Some(5));
    assert_eq!(read(&a, "u2"), read(&la, "u2"));
    let _keep = (&leader_dir, &fresh_dir);
}

#[tokio::test]
async fn a_snapshot_of_another_group_is_refused_before_anything_changes() {
    let leader_dir = tempfile::tempdir().unwrap();
    let leader = StateDb::open(leader_dir.path()).unwrap();
    let mut la = group(&leader, leader_dir.path(), A);
    orders(&mut la, 1, &["leader-a"], 3, T0).await;
    let (archive, meta) = build(&mut la).await;

    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let mut b = group(&db, dir.path(), B);
    orders(&mut b, 1, &["mine-b"], 2, T0).await;
    let (b_rows, a_rows) = (rows(&db, B), rows(&db, A));
    let applied = b.sm.applied_state().await.unwrap();
    let e = install(&mut b, &archive, &meta).await.expect_err("another group's snapshot");
    assert!(e.contains("the snapshot is of shard 0, not of shard 1"), "{e}");
    assert!(e.contains("the live state machine is unchanged"), "{e}");
    assert_eq!(rows(&db, B), b_rows);
    assert_eq!(rows(&db, A), a_rows);
    assert!(a_rows.is_empty());
    assert_eq!(b.sm.applied_state().await.unwrap(), applied);
    // B still applies.
    orders(&mut b, 3, &["mine-b"], 1, T0 + 1).await;
}

/// Sizes measured in one pass for several groups are each group's own bytes
/// (keys and values of every column family), memtables and flushed files
/// alike; a group without rows measures 0.
#[tokio::test]
async fn groups_are_measured_each_by_its_own_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let mut a = group(&db, dir.path(), A);
    let mut b = group(&db, dir.path(), B);
    let mut c = group(&db, dir.path(), C);
    let bytes = |gid| rows(&db, gid).iter().map(|(_, k, v)| (k.len() + v.len()) as u64).sum::<u64>();
    let next = orders(&mut a, 1, &["u1", "u2"], 3, T0).await;
    db.persist().unwrap();
    orders(&mut a, next, &["u3"], 2, T0).await;
    orders(&mut c, 1, &["u1"], 4, T0).await;
    let empty = GroupId(7);
    let sizes = db.groups_bytes(&[C, empty, A], || false).unwrap().unwrap();
    assert_eq!(sizes.len(), 3);
    assert!(bytes(A) > bytes(C) && bytes(C) > 0);
    assert_eq!((sizes[&A], sizes[&C], sizes[&empty]), (bytes(A), bytes(C), 0));
    // B's rows are there but not asked for.
    apply(&mut b, vec![membership(1, &[1])]).await;
    assert_eq!(db.groups_bytes(&[B], || false).unwrap().unwrap()[&B], bytes(B));
    assert!(!db.groups_bytes(&[A], || false).unwrap().unwrap().contains_key(&B));
}

/// A measuring pass gives up when told to (the node is stopping): it checks
/// every few thousand keys, so a large node's scan does not hold shutdown.
#[tokio::test]
async fn a_measurement_stops_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let mut a = group(&db, dir.path(), A);
    let users: Vec<String> = (0..3000).map(|i| format!("u{i}")).collect();
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    orders(&mut a, 1, &users, 1, T0).await;
    assert!(rows(&db, A).len() > 2 * 4096, "enough rows to be asked twice");
    let asked = std::cell::Cell::new(0);
    let stopped = db.groups_bytes(&[A], || {
        asked.set(asked.get() + 1);
        true
    });
    assert_eq!(stopped.unwrap(), None);
    assert_eq!(asked.get(), 1, "it stopped at the first check");
    assert!(db.groups_bytes(&[A], || false).unwrap().is_some());
}

#[tokio::test]
async fn dropping_a_group_leaves_the_others_intact() {
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let mut a = group(&db, dir.path(), A);
    let mut b = group(&db, dir.path(), B);
    orders(&mut a, 1, &["u1"], 3, T0).await;
    let next_b = orders(&mut b, 1, &["u1"], 3, T0).await;
    // A's applied index and clock in SST files, then an apply without the
    // WAL (as every shard apply is): the memtables now hold data that is
    // not persisted, so a persisted-tier read skips them.
    db.persist().unwrap();
    assert_eq!(db.durable_applied(A).unwrap(), (3, T0));
    orders(&mut b, next_b, &["u2"], 1, T0).await;
    let b_rows = rows(&db, B);
    let a_rows = rows(&db, A);
    // Not while its state machine is there: entries it still applied would
    // write into the emptied range.
    let e = db.drop_group(A).expect_err("group A is open");
    assert!(e.to_string().contains("still in use"), "{e}");
    assert_eq!(rows(&db, A), a_rows, "nothing deleted");
    drop(a);
    db.drop_group(A).unwrap();
    assert!(rows(&db, A).is_empty());
    // What a replica of A placed here again reads as its durable index and
    // clock (the log purge guard, the TTL compaction filter): none, not the
    // dropped replica's.
    assert_eq!(db.durable_applied(A).unwrap(), (0, i64::MIN));
    assert_eq!(rows(&db, B), b_rows);
    assert!(read(&b, "u1").found);
    drop((b, db));
    // Durable: after a restart too.
    let db = StateDb::open(dir.path()).unwrap();
    let a = group(&db, dir.path(), A);
    assert_eq!(a.store.applied().last_applied, None);
    assert!(rows(&db, A).is_empty());
    assert_eq!(rows(&db, B), b_rows);
}

/// A crash inside a snapshot install, after its first step (the marker,
/// naming the validated archive, and the range delete) and before its last
/// (clearing the marker): the next open installs the same archive again, so
/// the group holds the snapshot (it must not start empty: its log may be
/// purged past what an empty group could replay). Without the archive, the
/// group is wiped. Other groups are untouched either way.
#[tokio::test]
async fn an_install_a_crash_interrupted_is_finished_at_the_next_open() {
    use portrait_server::store::codec::encode;
    use portrait_server::store::group_snapshot::InstallRecord;
    let leader_dir = tempfile::tempdir().unwrap();
    let leader = StateDb::open(leader_dir.path()).unwrap();
    let mut la = group(&leader, leader_dir.path(), A);
    orders(&mut la, 1, &["u1", "u2"], 4, T0).await;
    let (archive, meta) = build(&mut la).await;
    let leader_a = rows(&leader, A);

    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let mut a = group(&db, dir.path(), A);
    let mut b = group(&db, dir.path(), B);
    orders(&mut a, 1, &["old"], 2, T0).await;
    orders(&mut b, 1, &["u1"], 3, T0).await;
    db.persist().unwrap();
    let b_rows = rows(&db, B);
    let crash_mid_install = |db: &StateDb, archive_path: std::path::PathBuf| {
        let raw = db.db();
        let record = InstallRecord { archive: archive_path, meta: meta.clone() };
        let mut batch = rocksdb::WriteBatch::default();
        let (start, end) = keys::group_range(A);
        for name in keys::ALL_CFS {
            batch.delete_range_cf(cf(&raw, name), &start, &end);
        }
        batch.put_cf(cf(&raw, CF_META), keys::installing(A), encode(&record));
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        raw.write_opt(batch, &sync).unwrap();
    };
    // The received archive where the install left it.
    let received = dir.path().join("snapshots/0/incoming.part");
    std::fs::write(&received, &archive).unwrap();
    crash_mid_install(&db, received.clone());
    // Meanwhile (and while a live install is under way) the group is not
    // exported: a backup would hold part of a state.
    let export = portrait_server::store::group_snapshot::export(&db, A, &dir.path().join("export"));
    let e = export.expect_err("a group mid-install");
    assert!(e.downcast_ref::<portrait_server::store::group_snapshot::Installing>().is_some(), "{e:#}");
    drop((a, b, db));

    let db = StateDb::open(dir.path()).unwrap();
    let a = group(&db, dir.path(), A);
    assert_eq!(rows(&db, A), leader_a, "the snapshot is installed");
    assert_eq!(a.store.applied().last_applied, meta.last_log_id);
    assert!(read(&a, "u2").found && !read(&a, "old").found);
    assert_eq!(rows(&db, B), b_rows);
    let raw = db.db();
    assert_eq!(raw.get_cf(cf(&raw, CF_META), keys::installing(A)).unwrap(), None, "marker cleared");
    assert!(!received.exists(), "the archive became the group's current snapshot");
    let current = std::fs::read(dir.path().join(format!("snapshots/0/snap-{}.snap", meta.snapshot_id)));
    assert_eq!(current.unwrap(), archive);

    // A crash after the install published the archive (renamed it to its
    // id's name) and before it cleared the marker: the next open finds it
    // under that name and installs it again.
    let published = dir.path().join(format!("snapshots/0/snap-{}.snap", meta.snapshot_id));
    crash_mid_install(&db, received.clone());
    drop((raw, a, db));
    // First an open that fails for a reason other than the archive (its
    // staging path cannot be cleared: a failing disk, say): the node does
    // not start, and nothing is wiped; the archive and marker stay.
    let blocker = dir.path().join("snapshots/0/ingest");
    let _ = std::fs::remove_dir_all(&blocker);
    std::fs::write(&blocker, b"not a directory").unwrap();
    match StateDb::open(dir.path()) {
        Ok(_) => panic!("opened although the install could not be redone (staging {})", blocker.display()),
        Err(e) => assert!(format!("{e:#}").contains("nothing was wiped"), "{e:#}"),
    }
    assert_eq!(std::fs::read(&published).unwrap(), archive, "the archive is kept");
    std::fs::remove_file(&blocker).unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let a = group(&db, dir.path(), A);
    assert_eq!(rows(&db, A), leader_a, "installed from the published archive");
    assert_eq!(a.store.applied().last_applied, meta.last_log_id);
    assert_eq!(rows(&db, B), b_rows);
    let raw = db.db();
    assert_eq!(raw.get_cf(cf(&raw, CF_META), keys::installing(A)).unwrap(), None, "marker cleared");
    assert_eq!(std::fs::read(&published).unwrap(), archive, "still the current snapshot");

    // A data dir that moved (or was given by a relative path) since the
    // install began: the marker's path is stale, and the archive is found
    // under its name in this data dir's snapshot folder.
    std::fs::remove_file(&published).unwrap();
    std::fs::write(&received, &archive).unwrap();
    crash_mid_install(&db, std::path::PathBuf::from("/moved/elsewhere/snapshots/0/incoming.part"));
    drop((raw, a, db));
    let db = StateDb::open(dir.path()).unwrap();
    let a = group(&db, dir.path(), A);
    assert_eq!(rows(&db, A), leader_a, "installed from the archive in this data dir");
    assert_eq!(rows(&db, B), b_rows);
    let raw = db.db();
    assert_eq!(std::fs::read(&published).unwrap(), archive, "the current snapshot again");

    // The archive is gone under both names: the group starts empty (raft
    // sends a snapshot again).
    std::fs::remove_file(&published).unwrap();
    crash_mid_install(&db, dir.path().join("snapshots/0/missing.part"));
    drop((raw, a, db));
    let db = StateDb::open(dir.path()).unwrap();
    let a = group(&db, dir.path(), A);
    assert!(rows(&db, A).is_empty(), "wiped");
    assert_eq!(a.store.applied().last_applied, None);
    assert!(db.log_reset_pending(A).unwrap(), "its raft log is to be emptied before it opens");
    assert!(!dir.path().join("snapshots/0/current.meta").exists(), "nor a current snapshot left");
    assert!(!db.log_reset_pending(B).unwrap());
    db.clear_log_reset(A).unwrap();
    assert!(!db.log_reset_pending(A).unwrap());
    assert_eq!(rows(&db, B), b_rows);
    let raw = db.db();
    assert_eq!(raw.get_cf(cf(&raw, CF_META), keys::installing(A)).unwrap(), None, "marker cleared");
}

/// Two groups, one dedupe marker each (window 7 days), both flushed at
/// day 0; A's durable clock then moves to day 8, B's stays at day 0. A
/// compaction of the whole column family drops A's expired marker only:
/// B's replay after a crash may still read its marker.
#[tokio::test]
async fn compaction_drops_only_what_its_own_groups_durable_clock_expired() {
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let mut a = group(&db, dir.path(), A);
    let mut b = group(&db, dir.path(), B);
    apply(&mut a, vec![write(1, T0, vec![event("u1", T0, "e1")])]).await;
    apply(&mut b, vec![write(1, T0, vec![event("u1", T0, "e1")])]).await;
    db.persist().unwrap();
    apply(&mut a, vec![write(2, T0 + 8 * DAY_MS, vec![event("u2", T0 + 8 * DAY_MS, "e2")])]).await;
    db.persist().unwrap();
    assert_eq!(a.store.durable_clock_ms(), T0 + 8 * DAY_MS);
    assert_eq!(b.store.durable_clock_ms(), T0);
    let raw = db.db();
    let dedupe = cf(&raw, CF_DEDUPE);
    raw.compact_range_cf(dedupe, None::<&[u8]>, None::<&[u8]>);
    let marker = |gid| raw.get_cf(dedupe, keys::dedupe(gid, "u1", "e1")).unwrap();
    assert_eq!(marker(A), None, "A's marker expired by A's durable clock");
    assert!(marker(B).is_some(), "B's clock has not reached it");
    assert!(raw.get_cf(dedupe, keys::dedupe(A, "u2", "e2")).unwrap().is_some());
}

#[test]
fn a_data_dir_of_the_single_group_layout_is_refused() {
    let dir: TempDir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sm/db-0")).unwrap();
    let e = format!("{:#}", StateDb::open(dir.path()).err().expect("refused"));
    assert!(!e.contains('\n'), "{e}");
    assert!(e.contains(&dir.path().join("sm").display().to_string()), "{e}");
    assert!(e.contains("the single-group format is not supported"), "{e}");
    assert!(!dir.path().join("state").exists(), "nothing created");
}

#[test]
fn group_ids_beyond_the_shard_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    assert!(db.open_group(GroupId(keys::MAX_SHARDS)).is_err());
    assert!(db.open_group(GroupId::META).is_ok());
    let a1 = db.open_group(A).unwrap();
    assert!(Arc::ptr_eq(&a1, &db.open_group(A).unwrap()), "one handle per group");
}

/// After a crash the state restarts from its last flush, which may be
/// behind the snapshot openraft holds: a build then keeps that snapshot
/// (and its archive), never replacing it with an older one.
#[tokio::test]
async fn a_build_never_replaces_a_newer_current_snapshot() {
    use portrait_server::store::snapshot::SnapshotDir;
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(dir.path()).unwrap();
    let mut a = group(&db, dir.path(), A);
    orders(&mut a, 1, &["u1"], 4, T0).await;
    let (_, built) = build(&mut a).await;
    assert_eq!(built.last_log_id.map(|l| l.index), Some(4));
    // The snapshot openraft holds is at 10; the state only at 4.
    let snapshots = SnapshotDir::new(dir.path(), A).unwrap();
    let newer = SnapshotMeta { last_log_id: Some(log_id(10)), snapshot_id: "10-1".into(), ..built.clone() };
    let archive = snapshots.scratch("newer.snap");
    std::fs::write(&archive, b"the snapshot at 10").unwrap();
    snapshots.publish(&archive, &newer).unwrap();
    let (bytes, meta) = build(&mut a).await;
    assert_eq!((meta.snapshot_id.as_str(), bytes.as_slice()), ("10-1", &b"the snapshot at 10"[..]));
    assert!(snapshots.archive("10-1").exists());
    // Once the state has caught up past it, builds go on.
    orders(&mut a, 5, &["u1"], 7, T0).await;
    let (_, meta) = build(&mut a).await;
    assert_eq!(meta.last_log_id.map(|l| l.index), Some(11));
    assert!(!snapshots.archive("10-1").exists(), "replaced by the newer build");
}
