//! On-disk formats on real RocksDB: a data dir or a raft log written in
//! another storage format is refused at open with one line; rows of an
//! unknown encoding are an error, not a misread; a received snapshot is
//! validated (archive integrity, format, applied log id, membership) before
//! it replaces the live database, and a bad one leaves it untouched.

use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder, StoredMembership};
use portrait_server::model::{Event, Value};
use portrait_server::store::format::{encode_version, STORAGE_FORMAT};
use portrait_server::store::keys::{
    self, CF_LOGS, CF_META, CF_RAFT_META, CF_STATE, META_FORMAT, RAFT_FORMAT,
};
use portrait_server::store::{apply::decode_user_state, sm_db, GroupState, LogEngine, StateMachine};
use portrait_server::types::{Command, Entry, GroupId, LogId, SnapshotMeta};
use tempfile::TempDir;

const T0: i64 = 1_760_000_000_000;

struct Replica {
    dir: TempDir,
    store: Arc<GroupState>,
    sm: StateMachine,
}

fn replica() -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let store = GroupState::open(dir.path()).unwrap();
    let sm = StateMachine::new(store.clone(), dir.path()).unwrap();
    Replica { dir, store, sm }
}

/// `n` order events of `user` (the default schema counts them in features).
async fn write_orders(r: &mut Replica, first_index: u64, user: &str, n: u64) {
    let entries: Vec<Entry> = (0..n)
        .map(|i| {
            let e = Event {
                user_id: user.into(),
                family: "trade".into(),
                event_type: "order".into(),
                time_ms: T0 - i as i64,
                event_id: format!("{user}-{i}"),
                attrs: [("amount".to_string(), Value::Float(10.0 + i as f64))].into_iter().collect(),
            };
            let requests = vec![vec![e]].into();
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), first_index + i),
                payload: EntryPayload::Normal(Command::Write { stamp_ms: T0, requests }),
            }
        })
        .collect();
    r.sm.apply(entries).await.unwrap();
    r.sm.applied_state().await.unwrap();
}

/// Rewrites the state machine's recorded format (`None`: removes it, as
/// in a data dir from before formats were recorded).
fn set_sm_format(dir: &std::path::Path, version: Option<u32>) {
    let db = sm_db::open_db(&dir.join("state"), Arc::default()).unwrap();
    let meta = sm_db::cf(&db, CF_META);
    let key = keys::node_meta(META_FORMAT);
    match version {
        Some(v) => db.put_cf(meta, key, encode_version(v)).unwrap(),
        None => db.delete_cf(meta, key).unwrap(),
    }
}

fn open_error(dir: &std::path::Path) -> String {
    format!("{:#}", GroupState::open(dir).err().expect("refused"))
}

#[tokio::test]
async fn a_data_dir_of_another_format_is_refused_with_one_line() {
    let mut r = replica();
    write_orders(&mut r, 1, "u1", 3).await;
    r.store.persist().unwrap();
    let Replica { dir, store, sm } = r;
    drop((sm, store));

    set_sm_format(dir.path(), None);
    let e = open_error(dir.path());
    let expected = format!(
        "{} was written by storage format 1; this binary reads format {STORAGE_FORMAT} \
         (see docs/operations.md#upgrades)",
        dir.path().join("state").display()
    );
    assert_eq!(e, expected);
    set_sm_format(dir.path(), Some(STORAGE_FORMAT + 1));
    assert!(open_error(dir.path()).contains(&format!("storage format {}; ", STORAGE_FORMAT + 1)));
    set_sm_format(dir.path(), Some(STORAGE_FORMAT));
    let store = GroupState::open(dir.path()).unwrap();
    assert_eq!(store.applied().last_applied.map(|l| l.index), Some(3), "its own format opens");
}

#[test]
fn a_raft_log_of_another_format_is_refused_and_a_new_one_records_its_format() {
    let dir = tempfile::tempdir().unwrap();
    let engine = LogEngine::open(dir.path()).unwrap();
    let cfs = [CF_LOGS, CF_RAFT_META];
    let path = dir.path().join("raft");
    let ro = rocksdb::DB::open_cf_for_read_only(&rocksdb::Options::default(), &path, cfs, false).unwrap();
    let recorded = ro.get_cf(ro.cf_handle(CF_RAFT_META).unwrap(), RAFT_FORMAT).unwrap();
    assert_eq!(recorded.as_deref(), Some(&encode_version(STORAGE_FORMAT)[..]));
    drop((ro, engine));

    let refusal = |dir: &std::path::Path, found: u32| {
        let e = format!("{:#}", LogEngine::open(dir).err().expect("refused"));
        let expected = format!(
            "{} was written by storage format {found}; this binary reads format {STORAGE_FORMAT} \
             (see docs/operations.md#upgrades)",
            dir.join("raft").display()
        );
        assert_eq!(e, expected);
    };
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // A log from before formats were recorded: a vote, no version.
    let old = tempfile::tempdir().unwrap();
    let db = rocksdb::DB::open_cf(&opts, old.path().join("raft"), cfs).unwrap();
    db.put_cf(db.cf_handle(CF_RAFT_META).unwrap(), b"vote", b"x").unwrap();
    drop(db);
    refusal(old.path(), 1);
    // A format 2 log (one group, keyed by index alone) is not read as
    // groups: refused before any key is looked at.
    let two = tempfile::tempdir().unwrap();
    let db = rocksdb::DB::open_cf(&opts, two.path().join("raft"), cfs).unwrap();
    db.put_cf(db.cf_handle(CF_RAFT_META).unwrap(), RAFT_FORMAT, encode_version(2)).unwrap();
    db.put_cf(db.cf_handle(CF_LOGS).unwrap(), 1u64.to_be_bytes(), b"entry").unwrap();
    drop(db);
    refusal(two.path(), 2);
}

#[tokio::test]
async fn a_row_of_an_unknown_encoding_is_an_error_not_a_misread() {
    let mut r = replica();
    write_orders(&mut r, 1, "u1", 2).await;
    let db = r.store.db();
    let key = keys::state(GroupId(0), "u1");
    let mut row = db.get_cf(sm_db::cf(&db, CF_STATE), key).unwrap().expect("a user state");
    assert!(decode_user_state(&row).is_ok());
    row[8] = 9;
    let e = decode_user_state(&row).unwrap_err().to_string();
    assert!(e.contains("user state row in encoding version 9; this binary reads version 1"), "{e}");
}

fn state(user: &str) -> Vec<u8> {
    keys::state(GroupId(0), user)
}

/// Hands `archive` (the bytes of a snapshot) to the follower as if
/// received from the leader, with `meta`.
async fn install(r: &mut Replica, archive: &[u8], meta: &SnapshotMeta) -> Result<(), String> {
    let mut incoming = r.sm.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *incoming, archive).await.unwrap();
    r.sm.install_snapshot(meta, incoming).await.map_err(|e| format!("{e}"))
}

#[tokio::test]
async fn a_bad_snapshot_leaves_the_live_database_untouched() {
    let mut leader = replica();
    write_orders(&mut leader, 1, "leader-user", 20).await;
    let snap = leader.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let archive =
        std::fs::read(leader.dir.path().join(format!("snapshots/0/snap-{}.snap", snap.meta.snapshot_id)))
            .unwrap();
    let mut follower = replica();
    write_orders(&mut follower, 1, "follower-user", 5).await;
    let before = follower.sm.applied_state().await.unwrap();

    // A flipped bit in the last file (an SST's footer), just before the
    // archive's 12-byte trailer.
    let mut damaged = archive.clone();
    let at = damaged.len() - 20;
    damaged[at] ^= 0x01;
    let truncated = archive[..archive.len() - 1].to_vec();
    let mut other_format = archive.clone();
    other_format[8..12].copy_from_slice(&(STORAGE_FORMAT + 1).to_le_bytes());
    let mut ahead = snap.meta.clone();
    ahead.last_log_id = Some(LogId::new(CommittedLeaderId::new(1, 1), 21));
    let mut other_members = snap.meta.clone();
    let membership = snap.meta.last_membership.membership().clone();
    other_members.last_membership =
        StoredMembership::new(Some(LogId::new(CommittedLeaderId::new(1, 1), 7)), membership);
    let newer = format!("storage format {}", STORAGE_FORMAT + 1);
    let cases = [
        (&damaged, &snap.meta, "checksum mismatch"),
        (&truncated, &snap.meta, "truncated"),
        (&other_format, &snap.meta, newer.as_str()),
        (&archive, &ahead, "its meta says"),
        (&archive, &other_members, "membership"),
    ];
    for (bytes, meta, why) in cases {
        let e = install(&mut follower, bytes, meta).await.expect_err(why);
        assert!(e.contains(why) && e.contains("the live state machine is unchanged"), "{why}: {e}");
        assert_eq!(follower.sm.applied_state().await.unwrap(), before, "{why}");
        let db = follower.store.db();
        assert!(db.get_cf(sm_db::cf(&db, CF_STATE), state("follower-user")).unwrap().is_some(), "{why}");
        assert!(db.get_cf(sm_db::cf(&db, CF_STATE), state("leader-user")).unwrap().is_none(), "{why}");
    }
    // The follower still applies, and the good snapshot installs.
    write_orders(&mut follower, 6, "follower-user", 1).await;
    install(&mut follower, &archive, &snap.meta).await.unwrap();
    assert_eq!(follower.sm.applied_state().await.unwrap().0, snap.meta.last_log_id);
    let db = follower.store.db();
    assert!(db.get_cf(sm_db::cf(&db, CF_STATE), state("leader-user")).unwrap().is_some());
    assert!(db.get_cf(sm_db::cf(&db, CF_STATE), state("follower-user")).unwrap().is_none(), "replaced");
}
