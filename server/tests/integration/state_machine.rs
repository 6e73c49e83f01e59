//! The state machine on real RocksDB: apply semantics (dedupe, expiry,
//! atomic requests, late events), determinism across replicas, restart, and
//! snapshot build → install into another node.

use std::collections::BTreeMap;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
use portrait_server::duration::DAY_MS;
use portrait_server::engine::expr::Val;
use portrait_server::model::{Attrs, Event, Value, WriteCounts};
use portrait_server::schema::Schema;
use portrait_server::store::apply_writer::CacheBudget;
use portrait_server::store::keys;
use portrait_server::store::read::{read_profile, ProfileView, Selection};
use portrait_server::store::{GroupState, StateMachine};
use portrait_server::types::{Command, CommandResult, Entry, LogId, WriteOutcome};
use tempfile::TempDir;

const T0: i64 = 1_760_000_000_000;

struct Replica {
    dir: TempDir,
    store: std::sync::Arc<GroupState>,
    sm: StateMachine,
}

fn open(dir: TempDir) -> Replica {
    let store = GroupState::open(dir.path()).unwrap();
    let sm = StateMachine::new(store.clone(), dir.path()).unwrap();
    Replica { dir, store, sm }
}

fn replica() -> Replica {
    open(tempfile::tempdir().unwrap())
}

fn event(user: &str, family: &str, time_ms: i64, id: &str, attrs: &[(&str, Value)]) -> Event {
    Event {
        user_id: user.into(),
        family: family.into(),
        event_type: "view".into(),
        time_ms,
        event_id: id.into(),
        attrs: attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<Attrs>(),
    }
}

fn entry(index: u64, command: Command) -> Entry {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(command) }
}

fn write(index: u64, stamp_ms: i64, requests: Vec<Vec<Event>>) -> Entry {
    entry(index, Command::Write { stamp_ms, requests: requests.into() })
}

async fn apply(r: &mut Replica, entries: Vec<Entry>) -> Vec<CommandResult> {
    let results = r.sm.apply(entries).await.unwrap();
    // A write entry's batch may still be in flight: wait, as reads do.
    r.sm.applied_state().await.unwrap();
    results
}

fn counts(result: &CommandResult) -> Vec<Result<WriteCounts, String>> {
    match result {
        CommandResult::Write(outcomes) => outcomes
            .iter()
            .map(|o| match o {
                WriteOutcome::Applied(c) => Ok(c.clone()),
                WriteOutcome::Rejected { reason } | WriteOutcome::Deferred { reason } => Err(reason.clone()),
            })
            .collect(),
        other => panic!("not a write result: {other:?}"),
    }
}

fn read(r: &Replica, user: &str, now: i64) -> ProfileView {
    let s = &r.store;
    read_profile(
        &s.db(),
        s.gid(),
        &s.schema().schema,
        &s.engine(),
        user,
        &Selection::all(),
        s.at(now),
        usize::MAX,
    )
    .unwrap()
    .expect("no byte limit")
}

fn applied(a: u32, d: u32, e: u32) -> Result<WriteCounts, String> {
    Ok(WriteCounts { applied: a, duplicates: d, expired: e })
}

#[tokio::test]
async fn duplicates_within_and_across_entries_apply_once() {
    let mut r = replica();
    let e1 = event("u1", "browse", T0, "e1", &[("category", Value::Str("phone".into()))]);
    let res = apply(&mut r, vec![write(1, T0, vec![vec![e1.clone(), e1.clone()]])]).await;
    assert_eq!(counts(&res[0]), vec![applied(1, 1, 0)]);
    let res = apply(&mut r, vec![write(2, T0 + 1000, vec![vec![e1.clone()], vec![e1]])]).await;
    assert_eq!(counts(&res[0]), vec![applied(0, 1, 0), applied(0, 1, 0)]);
    assert_eq!(read(&r, "u1", T0 + 2000).families["browse"].history.len(), 1);
}

#[tokio::test]
async fn dedupe_window_ends() {
    let mut r = replica();
    let e1 = event("u1", "trade", T0, "order-1", &[]);
    apply(&mut r, vec![write(1, T0, vec![vec![e1.clone()]])]).await;
    // The default window is 7 days: after it, the same id is new again.
    let res = apply(&mut r, vec![write(2, T0 + 8 * DAY_MS, vec![vec![e1]])]).await;
    assert_eq!(counts(&res[0]), vec![applied(1, 0, 0)]);
}

#[tokio::test]
async fn expired_on_arrival_is_counted_not_stored() {
    let mut r = replica();
    let old = event("u1", "browse", T0 - 91 * DAY_MS, "old", &[("category", Value::Str("tv".into()))]);
    let fresh = event("u1", "browse", T0 - DAY_MS, "fresh", &[("category", Value::Str("phone".into()))]);
    let res = apply(&mut r, vec![write(1, T0, vec![vec![old, fresh]])]).await;
    assert_eq!(counts(&res[0]), vec![applied(1, 0, 1)]);
    let view = read(&r, "u1", T0);
    assert_eq!(view.families["browse"].attrs["category"].value, Value::Str("phone".into()));
    assert_eq!(view.families["browse"].history.len(), 1);
}

#[tokio::test]
async fn ttl_hides_values_at_read_time() {
    let mut r = replica();
    let a = event("u1", "browse", T0, "a", &[("category", Value::Str("phone".into()))]);
    let b = event("u1", "registration", T0, "b", &[("city", Value::Str("Beijing".into()))]);
    apply(&mut r, vec![write(1, T0, vec![vec![a, b]])]).await;
    assert!(read(&r, "u1", T0 + 89 * DAY_MS).families.contains_key("browse"));
    let later = read(&r, "u1", T0 + 90 * DAY_MS);
    assert!(!later.families.contains_key("browse"), "browse expired after 90d");
    assert!(later.families.contains_key("registration"), "registration never expires");
    assert!(later.found);
}

#[tokio::test]
async fn a_rejected_request_leaves_nothing_and_others_apply() {
    let mut r = replica();
    let good = event("u1", "browse", T0, "g", &[]);
    let bad = vec![event("u2", "browse", T0, "x", &[]), event("u2", "no_such_family", T0, "y", &[])];
    let res = apply(&mut r, vec![write(1, T0, vec![bad, vec![good]])]).await;
    let c = counts(&res[0]);
    assert!(c[0].as_ref().unwrap_err().contains("events[1].family: unknown family"), "{c:?}");
    assert_eq!(c[1], applied(1, 0, 0));
    assert!(!read(&r, "u2", T0).found, "nothing of the rejected request is stored");
}

#[tokio::test]
async fn same_log_gives_same_state_on_every_replica() {
    let mut entries = Vec::new();
    for i in 0..50u64 {
        let t = T0 + (i as i64 % 7) * 60_000 - 40 * DAY_MS * (i as i64 % 3);
        let evs = (0..20)
            .map(|j| {
                event(
                    &format!("u{}", j % 9),
                    ["browse", "trade", "social"][j % 3],
                    t + j as i64,
                    &format!("{i}-{}", j % 15),
                    &[("n", Value::Int(j as i64))],
                )
            })
            .collect();
        entries.push(write(i + 1, T0 + i as i64 * 1000, vec![evs]));
    }
    let (mut a, mut b) = (replica(), replica());
    let ra = apply(&mut a, entries.clone()).await;
    // The second replica applies the same log in smaller pieces.
    let mut rb = Vec::new();
    for chunk in entries.chunks(7) {
        rb.extend(apply(&mut b, chunk.to_vec()).await);
    }
    assert_eq!(ra, rb);
    for u in 0..9 {
        let user = format!("u{u}");
        assert_eq!(read(&a, &user, T0 + DAY_MS), read(&b, &user, T0 + DAY_MS), "{user}");
    }
}

#[tokio::test]
async fn state_and_schema_survive_restart() {
    let mut r = replica();
    let toml = "[families.browse]\nttl = \"30d\"\nhistory = 3\n[families.app]\nttl = \"none\"\n";
    let res =
        apply(&mut r, vec![entry(1, Command::ApplySchema { stamp_ms: T0, toml: toml.into(), version: 1 })])
            .await;
    assert_eq!(res[0], CommandResult::SchemaApplied { version: 1 });
    apply(&mut r, vec![write(2, T0, vec![vec![event("u1", "app", T0, "e", &[("v", Value::Bool(true))])]])])
        .await;
    let before = read(&r, "u1", T0);
    let Replica { dir, sm, store } = r;
    drop((sm, store));
    let mut r = open(dir);
    assert_eq!(r.store.schema().version, 1);
    assert_eq!(r.store.schema().schema, Schema::parse(toml).unwrap());
    assert_eq!(read(&r, "u1", T0), before);
    let (last, _) = r.sm.applied_state().await.unwrap();
    assert_eq!(last.unwrap().index, 2);
}

#[tokio::test]
async fn a_schema_version_not_above_the_shards_is_skipped() {
    let mut r = replica();
    let v2 = "[families.browse]\nttl = \"30d\"\nhistory = 3\n";
    let v1 = "[families.app]\nttl = \"none\"\n";
    let res = apply(
        &mut r,
        vec![
            entry(1, Command::ApplySchema { stamp_ms: T0, toml: v2.into(), version: 2 }),
            // Proposed late by a previous leader: older than what the shard has.
            entry(2, Command::ApplySchema { stamp_ms: T0, toml: v1.into(), version: 1 }),
            entry(3, Command::ApplySchema { stamp_ms: T0, toml: v2.into(), version: 2 }),
        ],
    )
    .await;
    let applied = CommandResult::SchemaApplied { version: 2 };
    assert_eq!(res, [applied.clone(), applied.clone(), applied]);
    assert_eq!(r.store.schema().schema, Schema::parse(v2).unwrap());
}

#[tokio::test]
async fn a_schema_this_build_refuses_stops_the_replica_rather_than_skip_it() {
    // The leader's build accepted it; this one (stricter, mid rolling
    // upgrade) cannot parse it. Skipping it would leave this replica on the
    // old rules while the others run the new ones.
    let mut r = replica();
    let v1 = "[families.browse]\nttl = \"30d\"\nhistory = 3\n";
    apply(&mut r, vec![entry(1, Command::ApplySchema { stamp_ms: T0, toml: v1.into(), version: 1 })]).await;
    let refused = "families = 3";
    // An older version is skipped without being parsed, as before.
    let res = apply(
        &mut r,
        vec![entry(2, Command::ApplySchema { stamp_ms: T0, toml: refused.into(), version: 1 })],
    )
    .await;
    assert_eq!(res, [CommandResult::SchemaApplied { version: 1 }]);
    let err =
        r.sm.apply(vec![entry(3, Command::ApplySchema { stamp_ms: T0, toml: refused.into(), version: 2 })])
            .await
            .expect_err("a refused schema must stop the replica");
    assert!(err.to_string().contains("schema version 2 refused by this build"), "{err}");
    // Nothing of the entry applied: the schema and the applied index stay.
    assert_eq!(r.store.schema().version, 1);
    assert_eq!(r.store.schema().schema, Schema::parse(v1).unwrap());
    let (last, _) = r.sm.applied_state().await.unwrap();
    assert_eq!(last.unwrap().index, 2);
}

/// This build's newest apply rules version, and one it does not have.
const NEWEST: u32 = portrait_core::rules::NEWEST;
const LACKING: u32 = NEWEST + 1;

#[tokio::test]
async fn apply_rules_this_build_lacks_stop_the_replica_and_a_stored_one_refuses_to_open() {
    let mut r = replica();
    apply(
        &mut r,
        vec![
            write(1, T0, vec![vec![event("u1", "browse", T0, "e1", &[])]]),
            entry(2, Command::Tick { stamp_ms: T0 }),
        ],
    )
    .await;
    assert_eq!(r.store.rules(), 1);
    // The version the shard has already: skipped (a leader may propose twice).
    let res = apply(&mut r, vec![entry(3, Command::Rules { stamp_ms: T0, version: 1 })]).await;
    assert_eq!(res, [CommandResult::RulesApplied { version: 1 }]);
    // This build's newest: the shard applies by it from this entry on.
    let res = apply(&mut r, vec![entry(4, Command::Rules { stamp_ms: T0, version: NEWEST })]).await;
    assert_eq!(res, [CommandResult::RulesApplied { version: NEWEST }]);
    assert_eq!(r.store.rules(), NEWEST);
    // A version this build does not have: the replica stops at the entry
    // rather than apply the shard's next entries by other rules.
    let err =
        r.sm.apply(vec![entry(5, Command::Rules { stamp_ms: T0, version: LACKING })]).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "apply rules version {LACKING} is newer than this build's (it applies versions 1 to {NEWEST})"
        )),
        "{err}"
    );
    assert_eq!(r.store.rules(), NEWEST);
    let (last, _) = r.sm.applied_state().await.unwrap();
    assert_eq!(last.unwrap().index, 4, "nothing of the refused entry applied");

    // A shard a newer build moved on (its version stored as that build
    // writes it): this build refuses to open it.
    let Replica { dir, sm, store } = r;
    drop((sm, store));
    {
        let db = portrait_server::store::StateDb::open(dir.path()).unwrap();
        let raw = db.db();
        let meta = raw.cf_handle(keys::CF_META).unwrap();
        let key = keys::meta(portrait_server::types::GroupId(0), keys::META_RULES);
        raw.put_cf(meta, key, portrait_server::store::codec::encode(&LACKING)).unwrap();
    }
    let e = GroupState::open(dir.path()).err().expect("a group stored with a newer version must not open");
    assert!(
        format!("{e:#}").contains(&format!(
            "(its stored state): apply rules version {LACKING} is newer than this build's"
        )),
        "{e:#}"
    );
}

#[tokio::test]
async fn a_raise_of_the_clusters_rules_this_build_lacks_stops_the_meta_replica() {
    use portrait_core::meta::MetaCommand;
    let mut r = replica();
    let (create, _) = create_and_join(1, 2);
    let meta = |i, command| entry(i, Command::Meta { stamp_ms: T0, command });
    apply(&mut r, vec![meta(1, create)]).await;
    assert_eq!(r.store.cluster().rules(), 1);
    let err =
        r.sm.apply(vec![meta(2, MetaCommand::SetRules { version: LACKING, epoch: 1 })]).await.unwrap_err();
    let newer = format!("apply rules version {LACKING} is newer than this build's");
    assert!(err.to_string().contains(&newer), "{err}");
    assert_eq!(r.store.cluster().rules(), 1);
    let (last, _) = r.sm.applied_state().await.unwrap();
    assert_eq!(last.unwrap().index, 1, "nothing of the refused entry applied");
}

#[tokio::test]
async fn a_cluster_created_by_a_newer_build_stops_an_older_meta_replica() {
    use portrait_core::meta::MetaCommand;
    let mut r = replica();
    let (create, _) = create_and_join(1, 2);
    let MetaCommand::Create { shards, replication, node, addr, peer_addr, incarnation, .. } = create else {
        unreachable!()
    };
    let newer =
        MetaCommand::Create { shards, replication, node, addr, peer_addr, incarnation, rules: LACKING };
    let err = r.sm.apply(vec![entry(1, Command::Meta { stamp_ms: T0, command: newer })]).await.unwrap_err();
    let newer = format!("(the cluster's version): apply rules version {LACKING} is newer");
    assert!(err.to_string().contains(&newer), "{err}");
    assert!(r.store.cluster().map.is_none(), "nothing of the entry applied");
}

/// Meta commands creating a cluster of 4 shards, RF 3, on node 1 (data dir
/// incarnation `first`) and adding node 2 (incarnation `second`).
fn create_and_join(
    first: u64,
    second: u64,
) -> (portrait_core::meta::MetaCommand, portrait_core::meta::MetaCommand) {
    use portrait_core::meta::MetaCommand;
    use portrait_core::shard::MapChange;
    let create = MetaCommand::Create {
        shards: 4,
        replication: 3,
        node: 1,
        addr: "http://n1".into(),
        peer_addr: "http://n1:8700".into(),
        incarnation: first,
        rules: 1,
    };
    let join = MetaCommand::Map(MapChange::AddNode {
        node: 2,
        addr: "http://n2".into(),
        peer_addr: "http://n2:8700".into(),
        incarnation: second,
    });
    (create, join)
}

#[tokio::test]
async fn meta_commands_change_the_map_durably_and_refusals_change_nothing() {
    use portrait_core::meta::{MetaCommand, MetaOutcome};
    use portrait_core::shard::MapChange;
    let mut r = replica();
    let (create, join) = create_and_join(1, 2);
    let bad = MetaCommand::Map(MapChange::AddReplica { shard: 9, node: 2 });
    let meta = |i, command| entry(i, Command::Meta { stamp_ms: T0, command });
    let res =
        apply(&mut r, vec![meta(1, create.clone()), meta(2, join), meta(3, bad), meta(4, create)]).await;
    assert_eq!(res[0], CommandResult::Meta(MetaOutcome::Applied { epoch: 1, schema_version: 0 }));
    assert_eq!(res[1], CommandResult::Meta(MetaOutcome::Applied { epoch: 2, schema_version: 0 }));
    assert!(
        matches!(&res[2], CommandResult::Meta(MetaOutcome::Refused { reason }) if reason.contains("shard 9"))
    );
    assert!(matches!(&res[3], CommandResult::Meta(MetaOutcome::Refused { .. })));
    let before = r.store.cluster();
    assert_eq!(before.map.as_ref().map(|m| (m.epoch, m.nodes.len())), Some((2, 2)));
    let Replica { dir, sm, store } = r;
    drop((sm, store));
    let r = open(dir);
    assert_eq!(r.store.cluster(), before, "the map is reloaded at open");
}

#[tokio::test]
async fn snapshot_installs_on_another_replica() {
    let mut leader = replica();
    let mut users = BTreeMap::new();
    for i in 0..200u64 {
        let e = event(
            &format!("user-{}", i % 40),
            "trade",
            T0 - i as i64,
            &format!("o{i}"),
            &[("amount", Value::Float(i as f64))],
        );
        users.insert(e.user_id.clone(), ());
        apply(&mut leader, vec![write(i + 1, T0, vec![vec![e]])]).await;
    }
    let mut builder = leader.sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.unwrap().index, 200);

    let mut follower = replica();
    let mut incoming = follower.sm.begin_receiving_snapshot().await.unwrap();
    let mut source = snap.snapshot;
    tokio::io::copy(&mut *source, &mut *incoming).await.unwrap();
    follower.sm.install_snapshot(&snap.meta, incoming).await.unwrap();
    for user in users.keys() {
        assert_eq!(read(&follower, user, T0), read(&leader, user, T0), "{user}");
    }
    let (last, _) = follower.sm.applied_state().await.unwrap();
    assert_eq!(last.unwrap().index, 200);
    // The follower keeps applying after the install.
    let res =
        apply(&mut follower, vec![write(201, T0, vec![vec![event("user-1", "trade", T0, "o1", &[])]])]).await;
    assert_eq!(counts(&res[0]), vec![applied(0, 1, 0)], "dedupe markers travel in the snapshot");
    let _keep = (&leader.dir, &follower.dir);
}

/// A snapshot install replaces the rows only while no read holds them
/// (`GroupState::read_rows`): a read never sees the range emptied by the
/// install's delete or half ingested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_install_waits_for_reads_of_the_rows() {
    let mut leader = replica();
    for i in 0..20u64 {
        let e = event(&format!("user-{i}"), "trade", T0, &format!("o{i}"), &[]);
        apply(&mut leader, vec![write(i + 1, T0, vec![vec![e]])]).await;
    }
    let snap = leader.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let Replica { dir, store, mut sm } = replica();
    let mut incoming = sm.begin_receiving_snapshot().await.unwrap();
    let mut source = snap.snapshot;
    tokio::io::copy(&mut *source, &mut *incoming).await.unwrap();
    // A read holding the rows, on a thread of its own.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let reader = {
        let store = store.clone();
        std::thread::spawn(move || {
            let _rows = store.read_rows();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
        })
    };
    held_rx.recv().unwrap();
    let meta = snap.meta.clone();
    let install = tokio::spawn(async move {
        sm.install_snapshot(&meta, incoming).await.unwrap();
        sm
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!install.is_finished(), "the install waits while a read holds the rows");
    assert_eq!(store.applied().last_applied, None, "nothing of the snapshot visible yet");
    release_tx.send(()).unwrap();
    reader.join().unwrap();
    let sm = tokio::time::timeout(std::time::Duration::from_secs(10), install).await.unwrap().unwrap();
    assert_eq!(store.applied().last_applied.map(|l| l.index), Some(20));
    let follower = Replica { dir, store, sm };
    for i in 0..20u64 {
        let user = format!("user-{i}");
        assert_eq!(read(&follower, &user, T0), read(&leader, &user, T0), "{user}");
    }
}

/// History events live under their own keys (one slot per kept event): the
/// newest N survive shuffled arrival across many entries, a restart (cache
/// gone, read from disk), expiry, and a schema change that shortens N.
#[tokio::test]
async fn history_keeps_the_newest_events_across_entries_restart_and_a_shorter_history() {
    let mut r = replica();
    let toml = |n: u32| format!("[families.browse]\nttl = \"30d\"\nhistory = {n}\n");
    apply(&mut r, vec![entry(1, Command::ApplySchema { stamp_ms: T0, toml: toml(5), version: 1 })]).await;
    // Times 0..40 minutes in a shuffled order, 3 events per entry.
    let mut times: Vec<i64> = (0..40).map(|i| (i * 17) % 40).collect();
    times.rotate_left(7);
    let mut index = 2;
    for chunk in times.chunks(3) {
        let events = chunk
            .iter()
            .map(|&m| event("u1", "browse", T0 + m * 60_000, &format!("e{m}"), &[("m", Value::Int(m))]))
            .collect();
        apply(&mut r, vec![write(index, T0 + 40 * 60_000, vec![events])]).await;
        index += 1;
    }
    let ids = |v: &ProfileView| -> Vec<String> {
        v.families.get("browse").map_or(vec![], |f| f.history.iter().map(|h| h.event_id.clone()).collect())
    };
    let now = T0 + 41 * 60_000;
    assert_eq!(ids(&read(&r, "u1", now)), ["e39", "e38", "e37", "e36", "e35"]);
    assert_eq!(read(&r, "u1", now).families["browse"].attrs["m"].value, Value::Int(39));

    let Replica { dir, sm, store } = r;
    drop((sm, store));
    let mut r = open(dir);
    assert_eq!(ids(&read(&r, "u1", now)), ["e39", "e38", "e37", "e36", "e35"]);
    // A late event newer than the oldest kept one displaces it, after restart.
    let late = event("u1", "browse", T0 + 35 * 60_000 + 1, "late", &[]);
    apply(&mut r, vec![write(index, now, vec![vec![late]])]).await;
    assert_eq!(ids(&read(&r, "u1", now)), ["e39", "e38", "e37", "e36", "late"]);

    // Shorter history: served at once, stored slots trimmed by the next event.
    apply(&mut r, vec![entry(index + 1, Command::ApplySchema { stamp_ms: now, toml: toml(2), version: 2 })])
        .await;
    assert_eq!(ids(&read(&r, "u1", now)), ["e39", "e38"]);
    apply(&mut r, vec![write(index + 2, now, vec![vec![event("u1", "browse", now, "e41", &[])]])]).await;
    assert_eq!(ids(&read(&r, "u1", now)), ["e41", "e39"]);

    // Everything expires after 30 days; nothing is served.
    let later = T0 + 40 * 60_000 + 31 * DAY_MS;
    assert!(read(&r, "u1", later).families.is_empty());
}

/// A profile whose stored history passes the read's byte limit is refused
/// (`None`) while it is fetched, not held whole first; one under the limit
/// reads whole, and a view's size stays within the stored bytes allowed
/// for it (callers double the response limit for them).
#[tokio::test]
async fn a_read_stops_once_the_stored_history_passes_its_byte_limit() {
    let mut r = replica();
    let toml = "[families.browse]\nttl = \"30d\"\nhistory = 1000\n";
    apply(&mut r, vec![entry(1, Command::ApplySchema { stamp_ms: T0, toml: toml.into(), version: 1 })]).await;
    // 600 events of 4 KiB each (2.4 MB), 200 per entry.
    let big = Value::Str("x".repeat(4096));
    for (index, part) in (2..).zip(0..3) {
        let events = (0..200)
            .map(|i| {
                event("u1", "browse", T0 + (part * 200 + i), &format!("e{part}-{i}"), &[("v", big.clone())])
            })
            .collect();
        apply(&mut r, vec![write(index, T0 + 1_000, vec![events])]).await;
    }
    let s = &r.store;
    let now = T0 + 2_000;
    let read_within = |max: usize| {
        read_profile(
            &s.db(),
            s.gid(),
            &s.schema().schema,
            &s.engine(),
            "u1",
            &Selection::all(),
            s.at(now),
            max,
        )
        .unwrap()
    };
    let whole = read_within(usize::MAX).expect("no limit");
    assert_eq!(whole.families["browse"].history.len(), 600);
    let size = whole.approx_bytes();
    assert!(size > 600 * 4096, "{size}");
    assert!(read_within(2 * size).is_some(), "a view that fits is read at twice its size");
    assert!(read_within(1 << 20).is_none(), "1 MiB of 2.4 MB stored: refused");
    assert!(read_within(100).is_none());
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Applies skip the RocksDB WAL (the raft log is the state machine's WAL).
/// A crash — here: the files copied while the database is open, memtables
/// not flushed — loses the unflushed tail of every column family together
/// with `last_applied`; re-applying the log from there gives the same state.
#[tokio::test]
async fn a_crash_rolls_back_to_the_last_flush_and_the_log_replays_the_rest() {
    let entries: Vec<Entry> = (0..40u64)
        .map(|i| {
            let evs = (0..25)
                .map(|j| {
                    let user = format!("u{}", (i * 7 + j) % 31);
                    let family = ["browse", "trade"][(j % 2) as usize];
                    event(&user, family, T0 - (j as i64) * 3_600_000, &format!("{i}-{j}"), &[])
                })
                .collect();
            write(i + 1, T0 + i as i64 * 1000, vec![evs])
        })
        .collect();
    let mut live = replica();
    apply(&mut live, entries[..15].to_vec()).await;
    live.store.persist().unwrap();
    apply(&mut live, entries[15..].to_vec()).await;

    let crashed_dir = tempfile::tempdir().unwrap();
    copy_tree(live.dir.path(), crashed_dir.path());
    let mut crashed = open(crashed_dir);
    let (last, _) = crashed.sm.applied_state().await.unwrap();
    assert_eq!(last.map(|l| l.index), Some(15), "everything after the flush is gone, last_applied included");
    let now = T0 + DAY_MS;
    let users: Vec<String> = (0..31).map(|u| format!("u{u}")).collect();
    assert!(users.iter().any(|u| read(&crashed, u, now) != read(&live, u, now)), "the tail was lost");

    apply(&mut crashed, entries[15..].to_vec()).await;
    for user in &users {
        assert_eq!(read(&crashed, user, now), read(&live, user, now), "{user}");
    }
}

/// The meta group's entries are written through the RocksDB WAL: after a
/// crash (the files copied while the database is open, nothing flushed)
/// its replica still has the map it applied, so the data dirs it records
/// check raft messages from the first one; and a membership applied before
/// a map change comes back with it. A shard group's entries still roll
/// back to the last flush (the previous test).
#[tokio::test]
async fn the_meta_groups_applied_state_survives_a_crash_without_a_flush() {
    use openraft::storage::RaftStateMachine;
    use portrait_server::store::StateDb;
    use portrait_server::types::GroupId;
    use std::collections::BTreeSet;

    let open_meta = |dir: TempDir| {
        let store = StateDb::open(dir.path()).unwrap().open_group(GroupId::META).unwrap();
        let sm = StateMachine::new(store.clone(), dir.path()).unwrap();
        Replica { dir, store, sm }
    };
    let mut live = open_meta(tempfile::tempdir().unwrap());
    let (create, join) = create_and_join(11, 22);
    let membership = openraft::Membership::new(vec![BTreeSet::from([1, 2])], None);
    let meta = |i, command| entry(i, Command::Meta { stamp_ms: T0, command });
    apply(&mut live, vec![meta(1, create)]).await;
    live.store.persist().unwrap();
    let voters = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
        payload: EntryPayload::Membership(membership.clone()),
    };
    apply(&mut live, vec![voters, meta(3, join)]).await;
    let before = live.store.cluster();

    let crashed_dir = tempfile::tempdir().unwrap();
    copy_tree(live.dir.path(), crashed_dir.path());
    let mut crashed = open_meta(crashed_dir);
    let (last, stored) = crashed.sm.applied_state().await.unwrap();
    assert_eq!(last.map(|l| l.index), Some(3), "nothing applied is lost");
    assert_eq!(stored.membership(), &membership, "the membership applied before the map change");
    assert_eq!(crashed.store.cluster(), before);
    let map = before.map.as_ref().unwrap();
    assert_eq!(map.nodes.get(&2).map(|n| n.incarnation), Some(22));
}

/// The compaction filter drops expired values by the **durable** logical
/// clock, the one in the flushed state, not by the applied one that runs
/// ahead of it. Here a dedupe marker (window 7 days) is flushed at day 0;
/// entries at day 6 (its duplicate) and day 8 stay in the memtables; a
/// compaction runs; the node crashes. Replaying day 6 from the log must
/// still find the marker: had the filter used the applied clock (day 8),
/// the marker would be gone and the duplicate applied a second time.
#[tokio::test]
async fn compaction_never_drops_what_a_replay_after_a_crash_still_reads() {
    let first = event("u1", "browse", T0, "e1", &[]);
    let entries = [
        write(1, T0, vec![vec![first.clone()]]),
        write(2, T0 + 6 * DAY_MS, vec![vec![first.clone()]]),
        write(3, T0 + 8 * DAY_MS, vec![vec![event("u2", "browse", T0 + 8 * DAY_MS, "e2", &[])]]),
    ];
    let mut live = replica();
    apply(&mut live, entries[..1].to_vec()).await;
    live.store.persist().unwrap();
    let results = apply(&mut live, entries[1..].to_vec()).await;
    assert_eq!(counts(&results[0]), [applied(0, 1, 0)], "day 6: still a duplicate");
    // Let the filter see the marker, with the clock at day 8 in memory.
    let db = live.store.db();
    let dedupe = db.cf_handle(keys::CF_DEDUPE).unwrap();
    // Only u1's range: RocksDB flushes a memtable that overlaps the range
    // first, and the memtable holds u2's marker only.
    let gid = live.store.gid();
    let (from, mut to) = (keys::state(gid, "u1"), keys::state(gid, "u1"));
    to.push(1);
    db.compact_range_cf(dedupe, Some(&from), Some(&to));
    drop(db);

    let crashed_dir = tempfile::tempdir().unwrap();
    copy_tree(live.dir.path(), crashed_dir.path());
    let mut crashed = open(crashed_dir);
    let (last, _) = crashed.sm.applied_state().await.unwrap();
    assert_eq!(last.map(|l| l.index), Some(1));
    let replayed = apply(&mut crashed, entries[1..].to_vec()).await;
    assert_eq!(counts(&replayed[0]), [applied(0, 1, 0)], "the replayed duplicate is still one");
    let now = T0 + 8 * DAY_MS;
    assert_eq!(read(&crashed, "u1", now), read(&live, "u1", now));
}

/// Entries of 64+ events apply their user shards on parallel threads:
/// the state and the per-request counts equal those of the same events
/// applied in small (sequential) entries.
#[tokio::test]
async fn large_entries_applied_in_parallel_match_small_entries() {
    let mk = |r: u64, j: u64| {
        // Some events are duplicates (the last 900 repeat earlier ids of the
        // same users), some expired on arrival (browse keeps 90 days).
        let n = (r * 100 + j) % 1500;
        let user = format!("user-{}", (n * 7) % 53);
        let family = ["browse", "trade", "social"][(j % 3) as usize];
        let id = format!("e{n}");
        let t = T0 - ((j % 11) as i64) * 20 * DAY_MS;
        event(&user, family, t, &id, &[("category", Value::Str(format!("c{}", j % 4)))])
    };
    let requests: Vec<Vec<Event>> = (0..24u64).map(|r| (0..100).map(|j| mk(r, j)).collect()).collect();
    let mut bad = requests[5].clone();
    bad[7].family = "no_such_family".into();

    let mut big = replica();
    let mut big_counts = Vec::new();
    for (i, chunk) in requests.chunks(6).enumerate() {
        let mut reqs = chunk.to_vec();
        if i == 1 {
            reqs.push(bad.clone());
        }
        let res = apply(&mut big, vec![write(i as u64 + 1, T0, reqs)]).await;
        big_counts.extend(counts(&res[0]));
    }
    let mut small = replica();
    let mut small_counts = Vec::new();
    let mut index = 1;
    for (r, request) in requests.iter().enumerate() {
        let mut request_total = WriteCounts::default();
        for part in request.chunks(10) {
            let res = apply(&mut small, vec![write(index, T0, vec![part.to_vec()])]).await;
            index += 1;
            let c = counts(&res[0]).remove(0).unwrap();
            request_total.applied += c.applied;
            request_total.duplicates += c.duplicates;
            request_total.expired += c.expired;
        }
        small_counts.push(Ok(request_total));
        if r == 11 {
            small_counts.push(Err(String::new()));
        }
    }
    assert_eq!(big_counts.len(), small_counts.len());
    for (b, s) in big_counts.iter().zip(&small_counts) {
        match (b, s) {
            (Err(reason), Err(_)) => assert!(reason.contains("no_such_family"), "{reason}"),
            _ => assert_eq!(b, s),
        }
    }
    let totals: u32 = big_counts.iter().flatten().map(|c| c.applied + c.duplicates + c.expired).sum();
    assert_eq!(totals, 2400);
    assert!(big_counts.iter().flatten().any(|c| c.duplicates > 0));
    assert!(big_counts.iter().flatten().any(|c| c.expired > 0));
    for u in 0..53 {
        let user = format!("user-{u}");
        let a = read(&big, &user, T0 + 1000);
        assert!(a.found, "{user}");
        assert_eq!(a, read(&small, &user, T0 + 1000), "{user}");
    }
}

#[tokio::test]
async fn pipelined_entries_match_entries_written_one_by_one() {
    // A cache of 8 heads and states: trimmed by count on almost every entry.
    pipelined_entries_match_one_by_one(8, usize::MAX, |_| 20, 39 * 6).await;
}

#[tokio::test]
async fn pipelined_entries_match_entries_written_one_by_one_when_small_ones_apply_inline() {
    // Every other entry has 10 events: small enough to apply on the raft
    // task when the batch before it is written, else through the blocking
    // pool. Duplicates: 4 per 10-event entry (ids of the 20 before it), 3
    // per 20-event entry after the first (ids 1..9 of the 10 before it).
    pipelined_entries_match_one_by_one(8, usize::MAX, |k| if k % 2 == 1 { 10 } else { 20 }, 20 * 4 + 19 * 3)
        .await;
}

#[tokio::test]
async fn pipelined_entries_match_entries_written_one_by_one_with_a_cache_bounded_by_bytes() {
    // A cache of 2 KiB: trimmed by its bytes every few entries.
    pipelined_entries_match_one_by_one(100_000, 2048, |_| 20, 39 * 6).await;
}

/// 200 users' events from `from` on (ids `e{i}`).
fn two_hundred_users(from: u64) -> Vec<Event> {
    (from..from + 200)
        .map(|i| event(&format!("user-{i}"), "trade", T0 + i as i64, &format!("e{i}"), &[]))
        .collect()
}

/// The encoded bytes an apply cache keeps after an entry of
/// [`two_hundred_users`] (measured with a budget of its own).
async fn bytes_of_two_hundred_users() -> usize {
    let dir = tempfile::tempdir().unwrap();
    let store = GroupState::open(dir.path()).unwrap();
    let mut sm = StateMachine::with_cache(store, dir.path(), 100_000, 1 << 30).unwrap();
    sm.apply(vec![write(1, T0, vec![two_hundred_users(0)])]).await.unwrap();
    sm.cached_bytes()
}

/// Four groups' state machines sharing one apply cache budget of `bytes`.
fn groups_sharing(bytes: usize) -> Vec<Replica> {
    let budget = std::sync::Arc::new(CacheBudget::new(100_000, bytes));
    (0..4)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let store = GroupState::open(dir.path()).unwrap();
            let sm = StateMachine::with_cache_budget(store.clone(), dir.path(), budget.clone()).unwrap();
            Replica { dir, store, sm }
        })
        .collect()
}

/// An entry keeps its users in the apply cache for the next one, past the
/// cache's share (it trims before it adds them), while the node's caches
/// together are within its budget. A group that goes idle then has its
/// cache trimmed once its last batch is written; what the next entry does
/// is unchanged (its duplicates are found in the database).
#[tokio::test]
async fn an_idle_groups_apply_cache_is_trimmed_to_its_share_once_its_batch_is_written() {
    // Four groups share 1.5 entries' worth: a share is under half of one.
    let x = bytes_of_two_hundred_users().await;
    let mut groups = groups_sharing(x * 3 / 2);
    let Replica { dir, store, mut sm } = groups.remove(0);
    let events = two_hundred_users;
    let first = sm.apply(vec![write(1, T0, vec![events(0)])]).await.unwrap();
    assert_eq!(counts(&first[0]), [applied(200, 0, 0)]);
    assert_eq!(sm.cached_bytes(), x, "the entry's 200 users are kept, past the group's share");
    let trim = sm.idle_trim();
    sm.applied_state().await.unwrap();
    assert!(trim.trim(), "idle and written: trimmed");
    assert_eq!(sm.cached_bytes(), 0, "over its share: emptied");

    // The next entry repeats 100 of those ids (no longer in the cache's
    // recent ids) and adds 100 new ones.
    let second = sm.apply(vec![write(2, T0 + 1000, vec![events(100)])]).await.unwrap();
    assert_eq!(counts(&second[0]), [applied(100, 100, 0)]);
    sm.applied_state().await.unwrap();
    let r = Replica { dir, store, sm };
    for i in [0, 150, 299] {
        let view = read(&r, &format!("user-{i}"), T0 + 2000);
        assert_eq!(view.families["trade"].history.len(), 1, "user-{i}: once, not twice");
    }
    drop(r.sm);
    assert!(!trim.trim(), "the state machine is gone: nothing to trim");
}

/// The users an entry keeps for the next one count against the node's
/// budget: a group whose entry takes the caches together past it, while it
/// holds more than its share, trims once its batch is written instead of
/// keeping them (64 busy groups would otherwise hold 64 entries' users).
/// Its next entry finds the duplicates in the database.
#[tokio::test]
async fn a_group_past_its_share_trims_after_its_entry_once_the_node_s_caches_pass_their_budget() {
    let x = bytes_of_two_hundred_users().await;
    let mut groups = groups_sharing(x * 3 / 2);
    let (mut a, mut b) = (groups.remove(0), groups.remove(0));
    a.sm.apply(vec![write(1, T0, vec![two_hundred_users(0)])]).await.unwrap();
    assert_eq!(a.sm.cached_bytes(), x, "within the budget: kept");
    let first = b.sm.apply(vec![write(1, T0, vec![two_hundred_users(1000)])]).await.unwrap();
    assert_eq!(counts(&first[0]), [applied(200, 0, 0)]);
    assert_eq!(b.sm.cached_bytes(), 0, "2 entries' users past 1.5 entries' budget: trimmed");
    assert_eq!(a.sm.cached_bytes(), x, "the group that kept its users within the budget keeps them");

    let second = b.sm.apply(vec![write(2, T0 + 1000, vec![two_hundred_users(1100)])]).await.unwrap();
    assert_eq!(counts(&second[0]), [applied(100, 100, 0)]);
    b.sm.applied_state().await.unwrap();
    for i in [1000, 1150, 1299] {
        let view = read(&b, &format!("user-{i}"), T0 + 2000);
        assert_eq!(view.families["trade"].history.len(), 1, "user-{i}: once, not twice");
    }
    drop(a);
}

/// Entry `k` has `size(k)` events; at least `min_dups` of all are
/// duplicates of the entry just before.
async fn pipelined_entries_match_one_by_one(
    cache_entries: usize,
    cache_bytes: usize,
    size: fn(u64) -> u64,
    min_dups: u32,
) {
    // Consecutive write entries overlap (entry k+1 is computed while k's
    // batch is written). Entries here repeat ids of the entry just before
    // (whose batch may be in flight), run with a tiny apply cache (trimmed
    // on almost every entry), and are mixed with ticks and multi-entry calls.
    let mk = |k: u64, j: u64| {
        let n = k * 20 + j;
        // Every third event repeats (user, id) of an event of the previous entry.
        let src = if j.is_multiple_of(3) && k > 0 { (k - 1) * 20 + j + 1 } else { n };
        let (user, id) = (format!("user-{}", (src * 7) % 29), format!("e{src}"));
        let family = ["browse", "trade"][(j % 2) as usize];
        event(&user, family, T0 + n as i64, &id, &[("category", Value::Str(format!("c{}", j % 5)))])
    };
    let entries = || -> Vec<Entry> {
        let mut out = Vec::new();
        for k in 0..40u64 {
            let index = out.len() as u64 + 1;
            let stamp = T0 + 1000 * k as i64;
            out.push(write(index, stamp, vec![(0..size(k)).map(|j| mk(k, j)).collect()]));
            if k % 9 == 4 {
                out.push(entry(out.len() as u64 + 1, Command::Tick { stamp_ms: stamp + 1 }));
            }
        }
        out
    };
    let pipelined_dir = tempfile::tempdir().unwrap();
    let store = GroupState::open(pipelined_dir.path()).unwrap();
    let mut sm =
        StateMachine::with_cache(store.clone(), pipelined_dir.path(), cache_entries, cache_bytes).unwrap();
    let mut results = Vec::new();
    let all = entries();
    let mut rest = all.as_slice();
    while !rest.is_empty() {
        // Mostly one entry per call (as under load), sometimes three.
        let take = if rest.len() % 4 == 0 { 3.min(rest.len()) } else { 1 };
        results.extend(sm.apply(rest[..take].to_vec()).await.unwrap());
        rest = &rest[take..];
    }
    let (last, _) = sm.applied_state().await.unwrap();
    assert_eq!(last.map(|l| l.index), Some(all.len() as u64));
    let pipelined = Replica { dir: pipelined_dir, store, sm };

    let mut one_by_one = replica();
    let mut expected = Vec::new();
    for e in entries() {
        expected.extend(apply(&mut one_by_one, vec![e]).await);
    }
    assert_eq!(results, expected, "same outcomes, duplicates included");
    let dups: u32 = expected
        .iter()
        .filter(|r| matches!(r, CommandResult::Write(_)))
        .flat_map(counts)
        .map(|c| c.unwrap().duplicates)
        .sum();
    assert!(dups >= min_dups, "ids of the previous entry count as duplicates: {dups}");
    for u in 0..29 {
        let user = format!("user-{u}");
        let a = read(&pipelined, &user, T0 + 50_000);
        assert!(a.found, "{user}");
        assert_eq!(a, read(&one_by_one, &user, T0 + 50_000), "{user}");
    }
}

/// A backup's rows are checked before a restore begins: a sound archive
/// passes, one with a row apply could not read (a user state that does not
/// decode, a timer key too short) is refused naming the row.
#[tokio::test]
async fn a_backup_row_apply_could_not_read_is_refused_before_the_restore_begins() {
    use portrait_server::store::restore::BackupSource;
    use portrait_server::types::GroupId;

    let mut source = replica();
    let e = event("u1", "trade", T0, "o1", &[("amount", Value::Float(1.0))]);
    apply(&mut source, vec![write(1, T0, vec![vec![e]])]).await;
    let work = tempfile::tempdir().unwrap();
    let archive_of = |name: &str| {
        let files = work.path().join(name);
        portrait_server::store::group_snapshot::export(source.store.state_db(), GroupId(0), &files).unwrap();
        let archive = work.path().join(format!("{name}.snap"));
        portrait_server::store::snapshot::pack(&files, &archive).unwrap();
        BackupSource::open(&archive, GroupId(0), &work.path().join(format!("{name}.scratch"))).unwrap()
    };
    let sound = archive_of("sound");
    let rows = sound.check().expect("a sound archive");
    let (emitted, _) = sound.rows(usize::MAX, |_| true).unwrap();
    assert_eq!(rows, emitted, "every row checked");
    assert!(rows >= 4, "profile, history, dedupe and state rows: {rows}");

    let raw = source.store.state_db().db();
    let put =
        |family, key: Vec<u8>, value: &[u8]| raw.put_cf(raw.cf_handle(family).unwrap(), key, value).unwrap();
    put(keys::CF_STATE, keys::state(GroupId(0), "u2"), b"not a user state");
    let e = archive_of("bad_state").check().unwrap_err().to_string();
    assert!(
        e.starts_with("a row of family state (key \"u2\"...) cannot be read: its value does not decode"),
        "{e}"
    );
    assert!(e.ends_with("the archive is not one of its backups)"), "{e}");
    raw.delete_cf(raw.cf_handle(keys::CF_STATE).unwrap(), keys::state(GroupId(0), "u2")).unwrap();
    let mut short = keys::state(GroupId(0), "");
    short.extend_from_slice(b"abc");
    put(keys::CF_TIMERS, short, b"");
    let e = archive_of("bad_timer").check().unwrap_err().to_string();
    assert!(
        e.contains("family timers (key \"abc\"...) cannot be read: its key is shorter than a timer's"),
        "{e}"
    );
}

/// A restore through the log (`Command::Restore`): `Begin` is refused on a
/// shard that took writes, else it wipes the rows of an earlier attempt and
/// refuses writes until `End`; the backup's rows arrive in numbered steps
/// (a step out of order or of another attempt changes nothing); afterwards
/// the replica serves exactly what the backup held, dedupe markers
/// included, takes writes again, and refuses another restore.
#[tokio::test]
async fn a_restore_through_the_log_replaces_the_rows_with_the_backups() {
    use portrait_server::store::restore::BackupSource;
    use portrait_server::types::{GroupId, RestoreStep};

    let mut source = replica();
    let users: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    for (i, user) in users.iter().enumerate() {
        let e = event(user, "trade", T0, &format!("o{i}"), &[("amount", Value::Float(i as f64))]);
        apply(&mut source, vec![write(i as u64 + 1, T0, vec![vec![e]])]).await;
    }
    let work = tempfile::tempdir().unwrap();
    let files = work.path().join("files");
    let exported =
        portrait_server::store::group_snapshot::export(source.store.state_db(), GroupId(0), &files).unwrap();
    assert_eq!(exported.last_applied.unwrap().index, 30);
    let archive = work.path().join("shard.snap");
    portrait_server::store::snapshot::pack(&files, &archive).unwrap();
    let backup = BackupSource::open(&archive, GroupId(0), &work.path().join("scratch")).unwrap();
    assert_eq!(backup.meta.applied, exported.last_applied);
    let mut chunks = Vec::new();
    let (rows, _) = backup
        .rows(2048, |c| {
            chunks.push(c);
            true
        })
        .unwrap();
    assert!(chunks.len() > 2, "small chunks: {}", chunks.len());
    // What a restore that goes on after an earlier attempt's steps counts:
    // the rows of the first chunks, the same chunks again.
    for k in 0..=chunks.len() {
        let want: usize = chunks[..k].iter().map(Vec::len).sum();
        assert_eq!(backup.rows_in_chunks(2048, k as u64).unwrap(), Some(want as u64), "{k} chunks");
    }
    assert_eq!(backup.rows_in_chunks(2048, chunks.len() as u64 + 1).unwrap(), None, "past the last chunk");
    assert_ne!(
        backup.rows_in_chunks(4096, 2).unwrap(),
        backup.rows_in_chunks(2048, 2).unwrap(),
        "other sizes"
    );
    assert!(
        BackupSource::open(&archive, GroupId(1), &work.path().join("scratch1")).is_err(),
        "another shard's"
    );

    let restore = |index, step| entry(index, Command::Restore { stamp_ms: T0 + 1, step });
    let begin = |id: &str| RestoreStep::Begin { id: id.into() };
    // A shard that took a write is not restored into, whatever the leader
    // saw when it proposed the restore.
    let mut written = replica();
    let other = event("someone-else", "trade", T0, "x1", &[]);
    apply(&mut written, vec![write(1, T0, vec![vec![other]])]).await;
    let before = read(&written, "someone-else", T0);
    let res = apply(&mut written, vec![restore(2, begin("r1"))]).await;
    assert!(
        matches!(&res[0], CommandResult::Rejected { reason } if reason.contains("holds data")),
        "{res:?}"
    );
    assert_eq!(read(&written, "someone-else", T0), before, "nothing wiped");
    assert_ne!(before, ProfileView::default());
    // Nor one whose writes were all counted as expired: their dedupe
    // markers (and lifetime feature state) are data a Begin would wipe.
    let mut expired_only = replica();
    let old = event("backfilled", "browse", T0 - 200 * DAY_MS, "b1", &[]);
    let res = apply(&mut expired_only, vec![write(1, T0, vec![vec![old.clone()]])]).await;
    assert_eq!(counts(&res[0])[0].as_ref().map(|c| (c.applied, c.expired)), Ok((0, 1)), "{res:?}");
    let res = apply(&mut expired_only, vec![restore(2, begin("r1"))]).await;
    assert!(
        matches!(&res[0], CommandResult::Rejected { reason } if reason.contains("holds data")),
        "{res:?}"
    );
    let again = apply(&mut expired_only, vec![write(3, T0, vec![vec![old]])]).await;
    assert_eq!(counts(&again[0])[0].as_ref().map(|c| c.duplicates), Ok(1), "its dedupe marker is kept");

    // An attempt cut short (its first chunk applied), then a new attempt:
    // its Begin wipes what the first one wrote.
    let mut target = replica();
    assert_eq!(
        apply(&mut target, vec![restore(1, begin("r0"))]).await,
        vec![CommandResult::Restored { rows: 0 }]
    );
    let first = restore(2, RestoreStep::Rows { id: "r0".into(), seq: 0, rows: chunks[0].clone() });
    assert!(
        matches!(&apply(&mut target, vec![first]).await[0], CommandResult::Restored { rows } if *rows > 0)
    );
    assert!(users.iter().any(|u| read(&target, u, T0) != ProfileView::default()), "chunk 0 landed");
    assert_eq!(
        apply(&mut target, vec![restore(3, begin("r1"))]).await,
        vec![CommandResult::Restored { rows: 0 }]
    );
    assert!(users.iter().all(|u| read(&target, u, T0) == ProfileView::default()), "Begin wipes the attempt");
    let refused =
        apply(&mut target, vec![write(4, T0, vec![vec![event("user-1", "trade", T0, "n1", &[])]])]).await;
    assert!(counts(&refused[0])[0].as_ref().unwrap_err().contains("being restored"), "{refused:?}");

    let mut index = 5;
    let rows_step = |seq: u64, id: &str, rows| restore(0, RestoreStep::Rows { id: id.into(), seq, rows });
    let out_of_order = rows_step(1, "r1", chunks[1].clone());
    let foreign = rows_step(0, "r0", chunks[0].clone());
    for mut bad in [out_of_order, foreign] {
        bad.log_id.index = index;
        index += 1;
        let res = apply(&mut target, vec![bad]).await;
        assert!(matches!(&res[0], CommandResult::Rejected { .. }), "{res:?}");
    }
    for (seq, chunk) in chunks.iter().enumerate() {
        let mut step = rows_step(seq as u64, "r1", chunk.clone());
        step.log_id.index = index;
        index += 1;
        apply(&mut target, vec![step]).await;
    }
    let end = |rows| RestoreStep::End {
        id: "r1".into(),
        rows,
        clock_ms: backup.meta.clock_ms,
        schema: None,
        reeval: None,
    };
    let short = apply(&mut target, vec![restore(index, end(rows - 1))]).await;
    assert!(matches!(&short[0], CommandResult::Rejected { .. }), "{short:?}");
    let done = apply(&mut target, vec![restore(index + 1, end(rows))]).await;
    assert_eq!(done, vec![CommandResult::Restored { rows }]);
    for user in &users {
        assert_eq!(read(&target, user, T0), read(&source, user, T0), "{user}");
    }
    let again = vec![write(
        index + 2,
        T0 + 2,
        vec![vec![event("user-3", "trade", T0, "o3", &[]), event("user-3", "trade", T0, "n3", &[])]],
    )];
    let res = apply(&mut target, again).await;
    assert_eq!(counts(&res[0]), vec![applied(1, 1, 0)], "dedupe markers restored; writes apply again");
    let res = apply(&mut target, vec![restore(index + 3, begin("r2"))]).await;
    assert!(
        matches!(&res[0], CommandResult::Rejected { reason } if reason.contains("holds data")),
        "{res:?}"
    );
    // Another attempt of the restore that ended here (its End answered
    // late, the run went on): done, not a foreign cluster's data.
    let res = apply(&mut target, vec![restore(index + 4, begin("r1#2"))]).await;
    assert!(
        matches!(&res[0], CommandResult::Rejected { reason }
            if reason.starts_with(portrait_server::types::ALREADY_RESTORED)),
        "{res:?}"
    );
    assert_eq!(
        read(&target, "user-1", T0),
        read(&source, "user-1", T0),
        "a restored shard is not restored over"
    );
    let _keep = (&source.dir, &target.dir, &written.dir);
}

/// A restore refuses an archive row larger than any Portrait writes
/// (`MAX_RESTORE_ROW_BYTES`), naming its family and size, instead of
/// proposing an entry that size.
#[test]
fn a_restore_refuses_a_row_larger_than_portrait_writes() {
    use portrait_server::limits::{MAX_RESTORE_ROW_BYTES, RESTORE_ENTRY_BYTES};
    use portrait_server::store::keys::{group_prefix, CF_PROFILES};
    use portrait_server::store::restore::BackupSource;
    use portrait_server::store::sm_db::cf;
    use portrait_server::types::GroupId;

    let source = replica();
    let db = source.store.state_db().db();
    let mut key = group_prefix(GroupId(0)).to_vec();
    key.extend_from_slice(b"crafted");
    db.put_cf(cf(&db, CF_PROFILES), &key, vec![7u8; MAX_RESTORE_ROW_BYTES + 1]).unwrap();
    let work = tempfile::tempdir().unwrap();
    let files = work.path().join("files");
    portrait_server::store::group_snapshot::export(source.store.state_db(), GroupId(0), &files).unwrap();
    let archive = work.path().join("shard.snap");
    portrait_server::store::snapshot::pack(&files, &archive).unwrap();
    let backup = BackupSource::open(&archive, GroupId(0), &work.path().join("scratch")).unwrap();
    let mut emitted = 0;
    let err = backup
        .rows(RESTORE_ENTRY_BYTES, |_| {
            emitted += 1;
            true
        })
        .expect_err("a row over the limit");
    let message = format!("{err:#}");
    assert!(message.contains("a row of family profiles is"), "{message}");
    assert!(message.contains(&format!("over the limit of {MAX_RESTORE_ROW_BYTES}")), "{message}");
    assert_eq!(emitted, 0, "nothing of it proposed");
}

/// A backup's export of a shard mid-restore is refused as of the same
/// RocksDB snapshot it would copy; a raft snapshot of it is not (a replica
/// catching up must get the restore's partial state).
#[tokio::test]
async fn a_backup_export_of_a_shard_mid_restore_is_refused() {
    use portrait_server::store::group_snapshot::{export, export_for_backup, Restoring};
    use portrait_server::types::{GroupId, RestoreStep};

    let mut r = replica();
    let begin = entry(1, Command::Restore { stamp_ms: T0, step: RestoreStep::Begin { id: "r1".into() } });
    assert_eq!(apply(&mut r, vec![begin]).await, vec![CommandResult::Restored { rows: 0 }]);
    let work = tempfile::tempdir().unwrap();
    let err =
        export_for_backup(r.store.state_db(), GroupId(0), &work.path().join("b")).expect_err("mid-restore");
    assert!(err.downcast_ref::<Restoring>().is_some(), "{err:#}");
    export(r.store.state_db(), GroupId(0), &work.path().join("s")).expect("a raft snapshot");
}

/// A restore in progress is not wiped by the `Begin` of a restore of
/// another backup (apply rules version 6), however the two got past the
/// leader's look; another attempt of the same restore still starts over.
/// A shard on version 5 starts over for either, as builds before did.
#[tokio::test]
async fn a_restore_in_progress_is_not_wiped_by_another_backup_s_begin_from_rules_version_6() {
    use portrait_server::types::RestoreStep;

    let restore = |index, step| entry(index, Command::Restore { stamp_ms: T0, step });
    let begin = |index, id: &str| restore(index, RestoreStep::Begin { id: id.into() });
    for (rules, other_begins) in [(portrait_core::rules::ONE_RESTORE_AT_A_TIME, false), (5, true)] {
        let mut r = replica();
        let res = apply(&mut r, vec![entry(1, Command::Rules { stamp_ms: T0, version: rules })]).await;
        assert_eq!(res, [CommandResult::RulesApplied { version: rules }]);
        let res = apply(&mut r, vec![begin(2, "backup-a#00aa.1")]).await;
        assert_eq!(res, [CommandResult::Restored { rows: 0 }]);
        let res = apply(&mut r, vec![begin(3, "backup-b#00bb.2")]).await;
        if other_begins {
            assert_eq!(res, [CommandResult::Restored { rows: 0 }], "version {rules}: starts over");
            continue;
        }
        let want = "shard 0 is being restored from \"backup-a\", not \"backup-b\": a shard takes one backup";
        assert!(
            matches!(&res[0], CommandResult::Rejected { reason } if reason.starts_with(want)),
            "version {rules}: {res:?}"
        );
        // The running restore goes on: its next step (seq 0) applies.
        let rows = restore(4, RestoreStep::Rows { id: "backup-a#00aa.1".into(), seq: 0, rows: vec![] });
        assert_eq!(apply(&mut r, vec![rows]).await, [CommandResult::Restored { rows: 0 }]);
        // Another attempt of the same restore starts over.
        let res = apply(&mut r, vec![begin(5, "backup-a#00aa.3")]).await;
        assert_eq!(res, [CommandResult::Restored { rows: 0 }], "an attempt of the same restore");
        let stale = restore(6, RestoreStep::Rows { id: "backup-a#00aa.1".into(), seq: 1, rows: vec![] });
        let res = apply(&mut r, vec![stale]).await;
        assert!(matches!(&res[0], CommandResult::Rejected { .. }), "the earlier attempt's step: {res:?}");
    }
}

/// A feature filter compares 64-bit integer ids exactly from apply rules
/// version 7 on; a shard on version 6 still applies the old rounding (so
/// its replicas agree whichever build they run).
#[tokio::test]
async fn a_filter_on_an_id_above_2_53_counts_that_id_only_from_rules_version_7() {
    let schema =
        "[families.browse]\nttl = \"30d\"\n\n[features.sku_views]\nfamily = \"browse\"\nagg = \"count\"\n\
                  where = 'sku == 9007199254740993'\n";
    let big = 9_007_199_254_740_993_i64; // 2^53 + 1
    for (rules, counted) in [(portrait_core::rules::EXACT_INTEGERS, 1.0), (6, 2.0)] {
        let mut r = replica();
        let res = apply(
            &mut r,
            vec![
                entry(1, Command::Rules { stamp_ms: T0, version: rules }),
                entry(2, Command::ApplySchema { stamp_ms: T0, toml: schema.into(), version: 1 }),
            ],
        )
        .await;
        assert_eq!(res[0], CommandResult::RulesApplied { version: rules });
        assert_eq!(res[1], CommandResult::SchemaApplied { version: 1 });
        let views = vec![
            event("u1", "browse", T0, "e1", &[("sku", Value::Int(big))]),
            event("u1", "browse", T0, "e2", &[("sku", Value::Int(big - 1))]),
        ];
        let res = apply(&mut r, vec![write(3, T0, vec![views])]).await;
        assert_eq!(counts(&res[0]), [applied(2, 0, 0)]);
        let features = read(&r, "u1", T0).features;
        assert_eq!(features.get("sku_views"), Some(&Val::Num(counted)), "rules version {rules}");
    }
}

/// A backup's export names the schema version of the rows it copied, read
/// from the same RocksDB snapshot (0 before any schema is applied).
#[tokio::test]
async fn a_backup_export_names_the_schema_version_of_its_rows() {
    use portrait_server::store::group_snapshot::export_for_backup;
    use portrait_server::types::GroupId;

    let mut r = replica();
    let work = tempfile::tempdir().unwrap();
    let (_, version) = export_for_backup(r.store.state_db(), GroupId(0), &work.path().join("a")).unwrap();
    assert_eq!(version, 0);
    let toml = "[families.browse]\nttl = \"30d\"\nhistory = 3\n";
    apply(&mut r, vec![entry(1, Command::ApplySchema { stamp_ms: T0, toml: toml.into(), version: 4 })]).await;
    let (meta, version) = export_for_backup(r.store.state_db(), GroupId(0), &work.path().join("b")).unwrap();
    assert_eq!(version, 4);
    assert_eq!(meta.last_applied.map(|l| l.index), Some(1));
}

/// Re-evaluation after a schema change walks the users in entries of at
/// most `limit`, each resuming after the last user of the one before, and
/// ends with the entry that reaches the last user.
#[tokio::test]
async fn a_reevaluation_walks_the_users_in_entries_and_ends_with_the_last_user() {
    let mut r = replica();
    let users = ["u1", "u2", "u3", "u4"];
    let events = users.iter().map(|u| event(u, "browse", T0, &format!("{u}-e"), &[])).collect();
    apply(&mut r, vec![write(1, T0, vec![events])]).await;
    let toml = portrait_server::schema::DEFAULT_SCHEMA_TOML.to_string();
    apply(&mut r, vec![entry(2, Command::ApplySchema { stamp_ms: T0, toml, version: 1 })]).await;
    let progress = || r.store.reeval_progress().unwrap();
    assert_eq!(progress().map(|p| (p.version, p.cursor)), Some((1, None)));
    let reevaluate = |index, after: Option<&str>| {
        entry(
            index,
            Command::Reevaluate { stamp_ms: T0, version: 1, after: after.map(str::to_string), limit: 2 },
        )
    };
    let res = apply(&mut r, vec![reevaluate(3, None)]).await;
    assert_eq!(res, [CommandResult::Reevaluated { users: 2 }]);
    let p = r.store.reeval_progress().unwrap().expect("more users left");
    assert_eq!((p.cursor.as_deref(), p.users_done), (Some("u2"), 2));
    // The last two: this entry ends it (no empty entry after it).
    let res = apply(&mut r, vec![reevaluate(4, Some("u2"))]).await;
    assert_eq!(res, [CommandResult::Reevaluated { users: 2 }]);
    assert_eq!(r.store.reeval_progress().unwrap(), None);
    // A stale proposal (the cursor moved on) is a no-op.
    let res = apply(&mut r, vec![reevaluate(5, Some("u2"))]).await;
    assert_eq!(res, [CommandResult::Reevaluated { users: 0 }]);
}

/// Outcomes as text: `A` applied, `D` deferred (retry), `R` rejected.
fn outcome_letters(result: &CommandResult) -> String {
    match result {
        CommandResult::Write(outcomes) => outcomes
            .iter()
            .map(|o| match o {
                WriteOutcome::Applied(_) => 'A',
                WriteOutcome::Deferred { .. } => 'D',
                WriteOutcome::Rejected { .. } => 'R',
            })
            .collect(),
        other => panic!("not a write result: {other:?}"),
    }
}

/// The `n`-th name `{prefix}-{i}` whose half of the user space (FNV-1a of
/// the id mod 2, as apply splits users) is `half`.
fn name_in_half(prefix: &str, half: u64, n: usize) -> String {
    let fnv = |s: &str| {
        s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    };
    (0..).map(|i| format!("{prefix}-{i}")).filter(|u| fnv(u) % 2 == half).nth(n).expect("names")
}

/// A user of the first half: [`heavy_users`] are all there.
fn heavy(u: usize) -> String {
    name_in_half("heavy", 0, u)
}

/// `users` users whose `registration` head holds 256 undeclared attributes
/// of 4,000 bytes (about 1 MiB each, kept forever), written from index 1.
fn heavy_users(users: usize) -> Vec<Entry> {
    let value = Value::Str("v".repeat(4_000));
    (0..users)
        .map(|u| {
            let events = (0..4)
                .map(|e| {
                    let names: Vec<String> = (e * 64..e * 64 + 64).map(|a| format!("a{a}")).collect();
                    let attrs: Vec<(&str, Value)> =
                        names.iter().map(|n| (n.as_str(), value.clone())).collect();
                    event(&heavy(u), "registration", T0, &format!("fill-{e}"), &attrs)
                })
                .collect();
            write(u as u64 + 1, T0, vec![events])
        })
        .collect()
}

#[tokio::test]
async fn a_write_entry_loads_a_bounded_amount_of_stored_state_and_defers_the_rest_alike_on_every_replica() {
    use portrait_server::limits::MAX_WRITE_STATE_BYTES_PER_ENTRY;
    const USERS: usize = 100;
    let setup = heavy_users(USERS);
    let probe_as = |id: &'static str| move |u: usize| vec![event(&heavy(u), "registration", T0, id, &[])];
    let probe = probe_as("probe");
    // One request per user: 200 MiB of stored heads, over the 128 MiB budget.
    // Each request also writes a user with no data yet, of the other half
    // (which never fills: every deferred request's new user is loaded).
    let fresh = |u: usize| name_in_half("fresh", 1, u);
    let requests: Vec<Vec<Event>> = (0..USERS)
        .map(|u| {
            let mut request = probe(u);
            request.push(event(&fresh(u), "browse", T0, "probe", &[]));
            request
        })
        .collect();
    let each = write(USERS as u64 + 1, T0 + 1_000, requests);
    assert_eq!(MAX_WRITE_STATE_BYTES_PER_ENTRY, 128 << 20);

    let mut a = replica();
    for chunk in setup.chunks(50) {
        apply(&mut a, chunk.to_vec()).await;
    }
    let result = apply(&mut a, vec![each.clone()]).await;
    let letters = outcome_letters(&result[0]);
    let applied = letters.chars().take_while(|c| *c == 'A').count();
    // Each half may load 64 MiB: the heavy users' half is full after about
    // 64 heads of 1 MiB, and every request from there is deferred.
    assert!((55..=66).contains(&applied), "{applied} applied: {letters}");
    assert_eq!(letters[applied..], "D".repeat(USERS - applied), "the rest deferred");
    let CommandResult::Write(outcomes) = &result[0] else { unreachable!() };
    let WriteOutcome::Deferred { reason } = &outcomes[applied] else { unreachable!() };
    assert!(reason.contains("nothing of it was written: retry"), "{reason}");
    let probed = |r: &Replica, u: usize| {
        let view = read(r, &heavy(u), T0 + 2_000);
        view.families["registration"].history.iter().any(|h| h.event_id == "probe")
    };
    assert!(probed(&a, 0) && probed(&a, applied - 1));
    assert!(!probed(&a, applied) && !probed(&a, USERS - 1), "deferred requests left nothing");
    let state_row = |r: &Replica, user: &str| {
        let db = r.store.db();
        db.get_cf(db.cf_handle(keys::CF_STATE).unwrap(), keys::state(r.store.gid(), user)).unwrap().is_some()
    };
    assert!(state_row(&a, &fresh(applied - 1)));
    for u in applied..USERS {
        assert!(!state_row(&a, &fresh(u)), "a state row for {}, whose request was deferred", fresh(u));
    }

    // Another replica, restarted before the entry (its cache is empty: the
    // sizes come from the database), decides the same.
    let mut b = replica();
    apply(&mut b, setup).await;
    let Replica { dir, store, sm } = b;
    drop((store, sm));
    let mut b = open(dir);
    assert_eq!(apply(&mut b, vec![each]).await, result);

    // One request of every user never fits: rejected, saying what to do.
    let again = probe_as("again");
    let all = write(USERS as u64 + 2, T0 + 3_000, vec![(0..USERS).flat_map(again).collect(), again(0)]);
    let result = apply(&mut a, vec![all]).await;
    assert_eq!(outcome_letters(&result[0]), "RD");
    let CommandResult::Write(outcomes) = &result[0] else { unreachable!() };
    let WriteOutcome::Rejected { reason } = &outcomes[0] else { unreachable!() };
    assert!(reason.contains("send fewer users per request"), "{reason}");
}

/// A snapshot left in a group's directory while the group has neither log
/// nor state (a drop that raced a snapshot build, or whose removal a power
/// loss undid) is removed when a replica of the group opens there again;
/// one of a replica that holds state or log stays.
#[tokio::test]
async fn a_snapshot_left_by_a_dropped_replica_is_removed_when_the_group_opens_again() {
    use portrait_server::store::snapshot::SnapshotDir;
    use portrait_server::store::{LogEngine, StateDb};
    use portrait_server::types::GroupId;
    let dir = tempfile::tempdir().unwrap();
    let (state_db, log_engine, gid) =
        (StateDb::open(dir.path()).unwrap(), LogEngine::open(dir.path()).unwrap(), GroupId(3));
    let snapshots = SnapshotDir::new(dir.path(), gid).unwrap();
    {
        let store = state_db.open_group(gid).unwrap();
        let mut sm = StateMachine::new(store.clone(), dir.path()).unwrap();
        let mut log = log_engine.group(gid, None).unwrap();
        sm.apply(vec![write(1, T0, vec![vec![event("u1", "trade", T0, "e1", &[])]])]).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert!(snapshots.meta().exists());
        assert!(
            !snapshots.forget_leftover(&mut log, &store).await.unwrap(),
            "the state holds what it covers"
        );
        assert!(snapshots.meta().exists());
    }
    // Dropped, but the snapshot came back (or was never removed).
    log_engine.drop_group(gid).unwrap();
    state_db.drop_group(gid).unwrap();
    assert!(snapshots.meta().exists());
    let store = state_db.open_group(gid).unwrap();
    let mut log = log_engine.group(gid, None).unwrap();
    assert!(snapshots.forget_leftover(&mut log, &store).await.unwrap());
    assert!(!snapshots.meta().exists());
    let archives = std::fs::read_dir(&snapshots.root)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("snap-"));
    assert_eq!(archives.count(), 0, "its archives are gone too");
    let mut sm = StateMachine::new(store, dir.path()).unwrap();
    assert!(sm.get_current_snapshot().await.unwrap().is_none(), "openraft finds no snapshot");
}

/// History a schema change's shorter TTL hides is neither fetched nor
/// counted against a read's byte limit: a profile whose live view is
/// small is served within a limit its hidden history would pass.
#[tokio::test]
async fn history_a_shortened_ttl_hides_does_not_count_against_the_read_limit() {
    let mut r = replica();
    let long = "[families.browse]\nttl = \"365d\"\nhistory = 100\n";
    let short = "[families.browse]\nttl = \"1h\"\nhistory = 100\n";
    apply(&mut r, vec![entry(1, Command::ApplySchema { stamp_ms: T0, toml: long.into(), version: 1 })]).await;
    // 50 events of about 1 KiB each, a day old by the read; one fresh.
    let big = Value::Str("x".repeat(1000));
    let old: Vec<Event> = (0..50)
        .map(|i| event("u1", "browse", T0 + i, &format!("old{i}"), &[("page", big.clone())]))
        .collect();
    apply(&mut r, vec![write(2, T0, vec![old])]).await;
    let now = T0 + DAY_MS;
    let fresh = event("u1", "browse", now - 1000, "new", &[("n", Value::Int(1))]);
    apply(&mut r, vec![write(3, now - 1000, vec![vec![fresh]])]).await;
    apply(&mut r, vec![entry(4, Command::ApplySchema { stamp_ms: now, toml: short.into(), version: 2 })])
        .await;
    let s = &r.store;
    let read_within = |max_bytes| {
        let (schema, engine) = (s.schema().schema.clone(), s.engine());
        read_profile(&s.db(), s.gid(), &schema, &engine, "u1", &Selection::all(), s.at(now), max_bytes)
            .unwrap()
    };
    let view = read_within(usize::MAX).expect("no byte limit");
    assert_eq!(view.families["browse"].history.len(), 1, "the old events are past the 1 h TTL");
    let view = read_within(8 * 1024).expect("the hidden 50 KiB are not counted");
    assert_eq!(view.families["browse"].history.len(), 1);
}
