//! Online backup and restore on real `portraitd` processes, through the
//! `portrait` CLI: a 3-node cluster is backed up while a writer keeps
//! writing, written to some more, then restored into a new 3-node cluster
//! of the same shard count while one of its nodes is down (it catches up
//! once restarted). Users written before the backup read back
//! exactly as they were (not as they are now on the source); users written
//! during the backup hold at least what was acknowledged before it began
//! and at most what was sent by its end; every replica of every restored
//! shard holds the same; the backup's schema came along; the same backup
//! restores into a single node too; a second restore into a now non-empty
//! cluster is refused. Also: a shard left mid-restore by one backup refuses
//! another; a schema change during a backup; a restore whose `Begin` had
//! no quorum, run again; a restore cut off midway, run again; a restore
//! whose shard leader and seed node are killed midway, going on at the new
//! leader; a restore run again over a shard the backup left empty.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portrait_client::backup::{read_manifest, Manifest};
use portrait_client::{Consistency, PortraitClient, Profile};
use portrait_cluster_tests::replicas::{lifetime_orders, users_of, wait_placed};
use portrait_cluster_tests::workload::order_of;
use portrait_cluster_tests::{portrait_cli, Cluster, TEST_SHARDS};

/// The default schema plus a feature only the backup's schema has.
fn schema() -> String {
    let default = include_str!("../../../core/src/schema/default.toml");
    format!("{default}\n[features.orders_copy]\nfamily = \"trade\"\nagg = \"count\"\nwhere = 'type == \"order\"'\n")
}

/// Users written before the backup (`a*`) and during it (`b*`).
const USERS_A: usize = 120;
const USERS_B: usize = 40;

/// `(orders_lifetime, orders_copy, trade history ids)` of each user, as
/// `client` reads them (linearizable when `strong`, else from its node).
async fn snapshot(
    client: &PortraitClient,
    users: &[String],
    strong: bool,
) -> BTreeMap<String, (u64, u64, Vec<String>)> {
    let consistency = if strong { Consistency::Linearizable } else { Consistency::Local };
    let got = client.batch_get_profiles(users, &[], consistency).await.expect("read");
    users
        .iter()
        .zip(got.profiles.iter())
        .map(|(user, p): (&String, &Profile)| {
            let ids = p.families.get("trade").map(|f| f.history.iter().map(|h| h.event_id.clone()).collect());
            let copy = portrait_cluster_tests::replicas::feature_count(p, "orders_copy");
            (user.clone(), (lifetime_orders(p), copy, ids.unwrap_or_default()))
        })
        .collect()
}

fn cli(endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(portrait_cli()).arg("--endpoint").arg(endpoint).args(args).output().expect("run portrait")
}

#[tokio::test]
async fn a_backup_taken_while_writing_restores_into_a_new_cluster_shard_by_shard() {
    let source = Cluster::start_sharded(3, TEST_SHARDS).await;
    let client = source.client(1).await;
    client.apply_schema(schema(), false).await.expect("schema");
    let users_a: Vec<String> = (0..USERS_A).map(|i| format!("a{i}")).collect();
    let users_b: Vec<String> = (0..USERS_B).map(|i| format!("b{i}")).collect();
    for round in 0..3 {
        let events = users_a.iter().map(|u| order_of(u, &format!("{u}-{round}"))).collect();
        client.write(events).await.expect("write a");
    }
    let before = snapshot(&client, &users_a, true).await;
    assert!(before.values().all(|(n, copy, _)| *n == 3 && *copy == 3), "{before:?}");

    // A writer on the b users throughout the backup: one order per user
    // per round, each round acknowledged before the next.
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, sent) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (client, stop, acked, sent, users) =
            (client.clone(), stop.clone(), acked.clone(), sent.clone(), users_b.clone());
        tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let events = users.iter().map(|u| order_of(u, &format!("{u}-{round}"))).collect();
                sent.store(round + 1, Ordering::SeqCst);
                if client.write(events).await.is_ok() {
                    acked.store(round + 1, Ordering::SeqCst);
                    round += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer got {} of 3 rounds acknowledged in 30 s",
            acked.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked_before = acked.load(Ordering::SeqCst);
    let backup_dir = tempfile::tempdir().unwrap();
    let dir = backup_dir.path().join("b1");
    let out = cli(&source.node(2).endpoint(), &["backup", dir.to_str().unwrap()]);
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
    let sent_after = sent.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();

    let manifest = read_manifest(&dir).expect("manifest");
    // Private: the archives hold every profile.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert_eq!((manifest.shards, manifest.shard_files.len()), (TEST_SHARDS, TEST_SHARDS as usize));
    assert_eq!(manifest.schema.toml, schema());
    assert!(manifest.shard_files.iter().all(|f| f.applied_index > 0 && f.bytes > 0), "{manifest:?}");
    // A backup directory is never overwritten.
    let again = cli(&source.node(1).endpoint(), &["backup", dir.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"), "{again:?}");

    // The source moves on: the restore must not see this.
    for u in &users_a[..10] {
        client.write(vec![order_of(u, &format!("{u}-late"))]).await.expect("late write");
    }
    let now = snapshot(&client, &users_a, true).await;
    assert_ne!(now, before);

    // Node 2 of the new cluster is down during the restore (every shard
    // keeps a quorum): it catches up from the restored shards' logs or
    // snapshots once it is back.
    let mut target = Cluster::start_sharded(3, TEST_SHARDS).await;
    target.kill(2);
    let out = cli(&target.node(3).endpoint(), &["restore", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restore: {stderr}");
    target.restart(2).await;
    assert!(stderr.contains("applied the backup's schema"), "{stderr}");
    let restored = target.client(1).await;
    assert_eq!(snapshot(&restored, &users_a, true).await, before, "users written before the backup");
    let during = snapshot(&restored, &users_b, true).await;
    for (user, (count, copy, ids)) in &during {
        assert!(
            (acked_before..=sent_after).contains(count) && *copy == *count && ids.len() as u64 == *count,
            "{user}: {count} orders ({ids:?}), acknowledged before the backup {acked_before}, sent by its end \
             {sent_after}"
        );
    }
    // Every replica of every shard (RF 3 on 3 nodes) serves the same.
    let all: Vec<String> = users_a.iter().chain(&users_b).cloned().collect();
    let strong = snapshot(&restored, &all, true).await;
    for id in 1..=3 {
        let local = PortraitClient::connect(&target.node(id).endpoint()).await.unwrap().without_routing();
        // A follower may apply the restore's last entries a moment later.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while snapshot(&local, &all, false).await != strong && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(snapshot(&local, &all, false).await, strong, "node {id}");
    }
    // Any node count: the same backup into a single node.
    let single = Cluster::start_sharded(1, TEST_SHARDS).await;
    let out = cli(&single.node(1).endpoint(), &["restore", dir.to_str().unwrap()]);
    assert!(out.status.success(), "restore into one node: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(snapshot(&single.client(1).await, &all, true).await, strong, "one node");
    // A damaged archive is found before anything changes.
    let damaged = backup_dir.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, damaged.join(path.file_name().unwrap())).unwrap();
    }
    let shard1 = damaged.join("shard-00001.snap");
    let mut bytes = std::fs::read(&shard1).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&shard1, bytes).unwrap();
    let out = cli(&single.node(1).endpoint(), &["restore", damaged.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the backup is damaged"), "{out:?}");
    // The restored cluster takes writes. The same backup restored again
    // (a run that stopped part way is run again) skips the shards it
    // restored, and changes nothing.
    restored.write(vec![order_of("a0", "a0-new")]).await.expect("write after restore");
    let with_new = snapshot(&restored, &all, true).await;
    let out = cli(&target.node(1).endpoint(), &["restore", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restore again: {stderr}");
    let skipped = stderr.matches("already restored from this backup by an earlier run").count();
    assert_eq!(skipped, TEST_SHARDS as usize, "{stderr}");
    assert_eq!(snapshot(&restored, &all, true).await, with_new);
    // A cluster whose data did not come from this backup is refused, and
    // before anything changes: its newer schema stays.
    let newer = format!("{}\n[families.extra]\nttl = \"30d\"\n", schema());
    let applied = client.apply_schema(newer.clone(), false).await.expect("a newer schema on the source");
    let out = cli(&source.node(1).endpoint(), &["restore", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds data") && stderr.contains("nothing was changed"), "{stderr}");
    let kept = client.get_schema().await.expect("schema");
    assert_eq!((kept.version, kept.toml), (applied.version, newer), "the source's schema is kept");
}

/// A shard the backup left empty, and still empty once restored, is
/// skipped by a run of the same restore again like the others: the run
/// changes nothing, the cluster's newer schema included (before, it was
/// counted as not restored, and the run applied the backup's schema over
/// the cluster's).
#[tokio::test]
async fn a_restore_run_again_skips_a_shard_the_backup_left_empty_and_keeps_the_cluster_s_schema() {
    let source = Cluster::start_sharded(1, TEST_SHARDS).await;
    let client = source.client(1).await;
    client.apply_schema(schema(), false).await.expect("schema");
    // Users of shard 0 only: the other shards stay empty.
    let users: Vec<String> = (0..)
        .map(|i| format!("u{i}"))
        .filter(|u| portrait_client::shard_of(u, TEST_SHARDS) == 0)
        .take(5)
        .collect();
    client.write(users.iter().map(|u| order_of(u, &format!("{u}-1"))).collect()).await.expect("write");
    let backup_dir = tempfile::tempdir().unwrap();
    let dir = backup_dir.path().join("b");
    let out = cli(&source.node(1).endpoint(), &["backup", dir.to_str().unwrap()]);
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));

    let target = Cluster::start_sharded(1, TEST_SHARDS).await;
    let out = cli(&target.node(1).endpoint(), &["restore", dir.to_str().unwrap()]);
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    let restored = target.client(1).await;
    let newer = format!("{}\n[families.extra]\nttl = \"30d\"\n", schema());
    let applied = restored.apply_schema(newer.clone(), false).await.expect("a newer schema");
    let out = cli(&target.node(1).endpoint(), &["restore", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restore again: {stderr}");
    let skipped = stderr.matches("already restored from this backup by an earlier run").count();
    assert_eq!(skipped, TEST_SHARDS as usize, "{stderr}");
    assert!(!stderr.contains("applied the backup's schema"), "{stderr}");
    let kept = restored.get_schema().await.expect("schema");
    assert_eq!((kept.version, kept.toml), (applied.version, newer), "the cluster's schema is kept");
}

/// A follower that lags its leader does not export a copy missing
/// acknowledged writes: it first catches up with its leader's log, and one
/// that cannot (its leader's entries dropped) answers UNAVAILABLE, so the
/// CLI copies another replica. Healed, it catches up and exports them.
#[tokio::test]
async fn a_lagging_follower_exports_only_once_caught_up_and_a_foreign_shard_count_is_refused() {
    let config = "replication = 3\nmax_moves = 0\n[raft]\nwrite_timeout_ms = 2000\n";
    let cluster = Cluster::start_sharded_with_config(3, 1, config).await;
    portrait_cluster_tests::replicas::wait_placed(&cluster, &[1, 2, 3], 1).await;
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    let behind = if leader == 1 { 2 } else { 1 };
    let writer = cluster.client(leader).await;
    writer.write(vec![order_of("a0", "a0-first")]).await.expect("first write");

    // `behind` drops what the leader sends it (it still hears it, and does
    // not campaign); the leader and the third node acknowledge writes.
    cluster.client(behind).await.set_faults(Vec::new(), vec![leader]).await.expect("set faults");
    let mut last = 0;
    for i in 0..5 {
        last = writer
            .write(vec![order_of(&format!("a{i}"), &format!("a{i}-later"))])
            .await
            .expect("write")
            .log_index;
    }
    let copier = cluster.client(behind).await;
    let endpoint = cluster.node(behind).endpoint();
    let message = match copier.backup_shard_from(&endpoint, 0).await {
        Err(e) => e.to_string(),
        Ok(mut stream) => {
            let first = tokio::time::timeout(Duration::from_secs(30), stream.message()).await;
            let status = first
                .expect("the copy answered within 30 s")
                .expect_err("a copy from a replica behind its leader");
            portrait_client::ClientError::from(status).to_string()
        }
    };
    assert!(message.starts_with("UNAVAILABLE: "), "{message}");
    assert!(message.contains("did not reach its leader's index"), "{message}");

    cluster.client(behind).await.set_faults(Vec::new(), Vec::new()).await.expect("heal");
    let mut stream = copier.backup_shard_from(&endpoint, 0).await.expect("a copy once healed");
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message()).await;
    let header = match first.expect("the header within 30 s").expect("header").and_then(|c| c.part) {
        Some(portrait_client::portrait_proto::v1::backup_shard_chunk::Part::Header(h)) => h,
        other => panic!("the stream did not begin with a header: {other:?}"),
    };
    assert_eq!(header.node_id, behind);
    assert!(header.applied_index >= last, "copied at {}, the last write at {last}", header.applied_index);

    // A backup of another shard count is refused by the node itself (not
    // only by the CLI): its users would belong to other shards here.
    use portrait_client::portrait_proto::v1::{restore_shard_chunk, RestoreHeader, RestoreShardChunk};
    let header = RestoreHeader {
        shard: 0,
        archive_bytes: 1,
        sha256: "0".repeat(64),
        restore_id: "other-count".into(),
        shards: 4,
        check_only: false,
        archive_format: 0,
    };
    let chunks = tonic::codegen::tokio_stream::iter([RestoreShardChunk {
        part: Some(restore_shard_chunk::Part::Header(header)),
    }]);
    let refused =
        writer.restore_shard_to(&cluster.node(leader).endpoint(), chunks).await.expect_err("4 shards");
    let message = refused.to_string();
    assert!(
        message.starts_with("INVALID_ARGUMENT: shards: the backup has 4 shards, this cluster 1"),
        "{message}"
    );
    // So is an archive of a storage format this build does not restore,
    // before its bytes are sent, even when only checking.
    for check_only in [true, false] {
        let header = RestoreHeader {
            shard: 0,
            archive_bytes: 1,
            sha256: "0".repeat(64),
            restore_id: "newer-format".into(),
            shards: 1,
            check_only,
            archive_format: 99,
        };
        let chunks = tonic::codegen::tokio_stream::iter([RestoreShardChunk {
            part: Some(restore_shard_chunk::Part::Header(header)),
        }]);
        let refused =
            writer.restore_shard_to(&cluster.node(leader).endpoint(), chunks).await.expect_err("format 99");
        let message = refused.to_string();
        assert!(
            message.starts_with(
                "INVALID_ARGUMENT: archive_format: shard 0's backup archive was written by storage format 99; \
                 this binary restores backups of formats"
            ),
            "{message}"
        );
    }
}

/// A restore whose caller sends its header and then nothing holds the
/// node's one export-or-restore slot only for `backup_stream_stall`: the
/// node then ends it with DEADLINE_EXCEEDED, and the next backup is served.
#[tokio::test]
async fn a_stalled_restore_upload_is_ended_and_frees_the_nodes_backup_slot() {
    use portrait_client::portrait_proto::v1::{restore_shard_chunk, RestoreHeader, RestoreShardChunk};
    use tonic::codegen::tokio_stream::{self, StreamExt};
    let cluster = Cluster::start_sharded_with_config(1, 1, "backup_stream_stall = \"1s\"\n").await;
    let client = cluster.client(1).await;
    let endpoint = cluster.node(1).endpoint();
    let stalled_restore = || {
        let (client, endpoint) = (client.clone(), endpoint.clone());
        let header = RestoreHeader {
            shard: 0,
            archive_bytes: 1024,
            sha256: "0".repeat(64),
            restore_id: "stalled".into(),
            shards: 1,
            check_only: false,
            archive_format: 0,
        };
        let chunks =
            tokio_stream::iter([RestoreShardChunk { part: Some(restore_shard_chunk::Part::Header(header)) }])
                .chain(tokio_stream::pending());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let answer = client.restore_shard_to(&endpoint, chunks).await;
            (answer, started.elapsed())
        })
    };
    // A backup's answer: Ok once its header arrived, else the error text.
    let backup = || async {
        match client.backup_shard_from(&endpoint, 0).await {
            Err(e) => Err(e.to_string()),
            Ok(mut stream) => match stream.message().await {
                Ok(_) => Ok(()),
                Err(status) => Err(portrait_client::ClientError::from(status).to_string()),
            },
        }
    };

    // An archive the data dir's disk could not hold is refused before a
    // byte is received, naming what it needs (a full disk would stop the
    // node: its raft log could no longer be written).
    let huge = RestoreHeader {
        shard: 0,
        archive_bytes: 1 << 60,
        sha256: "0".repeat(64),
        restore_id: "huge".into(),
        shards: 1,
        check_only: false,
        archive_format: 0,
    };
    let chunks =
        tokio_stream::iter([RestoreShardChunk { part: Some(restore_shard_chunk::Part::Header(huge)) }]);
    let refused = tokio::time::timeout(Duration::from_secs(30), client.restore_shard_to(&endpoint, chunks))
        .await
        .expect("answered")
        .expect_err("no room");
    assert_eq!(refused.code(), Some(tonic::Code::ResourceExhausted), "{refused}");
    assert!(refused.to_string().contains("bytes free under"), "{refused}");

    // A restore that never sends its header is ended after the stall too
    // (before, its handler waited for it forever).
    let silent = tokio::time::timeout(
        Duration::from_secs(15),
        client.restore_shard_to(&endpoint, tokio_stream::pending::<RestoreShardChunk>()),
    )
    .await
    .expect("a restore without its header was never ended")
    .expect_err("no header");
    assert_eq!(silent.code(), Some(tonic::Code::DeadlineExceeded), "{silent}");
    assert!(silent.to_string().contains("header: no message within 1 s"), "{silent}");

    // Until a backup finds the slot taken by the stalled upload (a backup
    // that came first makes the upload itself find it taken: start again).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut restore = stalled_restore();
    loop {
        assert!(std::time::Instant::now() < deadline, "no backup ever found the slot held by the upload");
        match backup().await {
            Err(e) if e.contains("already exporting or restoring") => break,
            Err(e) => panic!("backup: {e}"),
            Ok(()) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if restore.is_finished() {
                    restore = stalled_restore();
                }
            }
        }
    }
    let (answer, took) = tokio::time::timeout(Duration::from_secs(15), restore)
        .await
        .expect("the stalled upload was never ended")
        .unwrap();
    let message = answer.expect_err("a restore without its archive").to_string();
    assert!(message.starts_with("DEADLINE_EXCEEDED: "), "{message}");
    assert!(message.contains("stalled"), "{message}");
    assert!(took >= Duration::from_secs(1), "ended after {took:?}, before the 1s stall");
    // The slot is free again, and the shard was left as it was: empty,
    // written to by nobody, so a restore could still begin.
    backup().await.expect("a backup once the stalled upload ended");
    client.write(vec![order_of("u1", "u1-first")]).await.expect("write after the stalled restore");
}

/// Node `id`'s view of shard 0: (its role, the leader it knows).
async fn shard0(cluster: &Cluster, id: u64) -> Option<(String, u64)> {
    let status = cluster.client(id).await.cluster_status().await.ok()?;
    status.shard_status.iter().find(|s| s.shard == 0).map(|s| (s.role.clone(), s.leader_id))
}

/// With 5 replicas a quorum can form without a leader and one of its
/// followers: cut off together, the deposed leader still calls itself
/// leader and its log stops short of what its successor commits. A copy of
/// that follower must not vouch for the old leader's log: the old leader
/// cannot confirm its read index with a quorum, so the copy is refused
/// (UNAVAILABLE) rather than miss the successor's acknowledged writes.
#[tokio::test]
async fn a_follower_with_a_deposed_leader_does_not_export_a_copy_missing_its_successors_writes() {
    let config = "replication = 5\nmax_moves = 0\n[raft]\nwrite_timeout_ms = 2000\n";
    let all = [1, 2, 3, 4, 5];
    let cluster = Cluster::start_sharded_with_config(5, 1, config).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let old = loop {
        use portrait_cluster_tests::replicas::{placement, statuses};
        let statuses = statuses(&cluster, &all).await;
        let voters = |id: &u64| {
            statuses[id]
                .shard_status
                .iter()
                .any(|s| s.shard == 0 && s.voters.len() == 5 && s.voters.contains(id))
        };
        match placement(&statuses).get(&0) {
            Some((replicas, Some(leader))) if replicas.len() == 5 && all.iter().all(voters) => break *leader,
            placed => assert!(std::time::Instant::now() < deadline, "shard 0 not on 5 voters: {placed:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let follower = if old == 1 { 2 } else { 1 };
    let rest: Vec<u64> = all.into_iter().filter(|&n| n != old && n != follower).collect();
    cluster.client(old).await.write(vec![order_of("d0", "d0-first")]).await.expect("first write");

    cluster.partition(&[old, follower], &rest).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let new = loop {
        let mut leader = None;
        for &id in &rest {
            if shard0(&cluster, id).await.is_some_and(|(role, _)| role == "Leader") {
                leader = Some(id);
            }
        }
        if let Some(l) = leader {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no successor elected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let writer = cluster.client(new).await.without_routing();
    let mut last = 0;
    for i in 0..3 {
        let event = order_of(&format!("d{i}"), &format!("d{i}-after"));
        last = writer.write(vec![event]).await.expect("a write the successor acknowledges").log_index;
    }
    // The follower still follows the deposed leader, which still leads in
    // its own eyes.
    assert_eq!(shard0(&cluster, follower).await.map(|s| s.1), Some(old));
    assert_eq!(shard0(&cluster, old).await.map(|s| s.0).as_deref(), Some("Leader"));

    let copier = cluster.client(follower).await;
    let endpoint = cluster.node(follower).endpoint();
    let outcome = match copier.backup_shard_from(&endpoint, 0).await {
        Err(e) => Err(e.to_string()),
        Ok(mut stream) => {
            let first = tokio::time::timeout(Duration::from_secs(30), stream.message()).await;
            match first.expect("the copy answered within 30 s") {
                Err(status) => Err(portrait_client::ClientError::from(status).to_string()),
                Ok(chunk) => Ok(chunk),
            }
        }
    };
    let message = outcome.expect_err(&format!("a copy of a replica without the writes up to index {last}"));
    assert!(message.starts_with("UNAVAILABLE: ") && message.contains("read index"), "{message}");
    cluster.heal().await;
}

/// What [`snapshot`] reads per user.
type Snapshot = BTreeMap<String, (u64, u64, Vec<String>)>;

/// `per_shard` users of each of `shards` shards, with `orders` orders each
/// written through `client`.
async fn write_orders(client: &PortraitClient, shards: u32, per_shard: usize, orders: usize) -> Vec<String> {
    let users: Vec<String> = (0..shards).flat_map(|s| users_of(s, shards, per_shard)).collect();
    for round in 0..orders {
        let events = users.iter().map(|u| order_of(u, &format!("{u}-{round}"))).collect();
        client.write(events).await.expect("write");
    }
    users
}

/// Backs up the cluster `client` talks to into the new directory `dir`.
async fn back_up(client: &PortraitClient, dir: &std::path::Path) -> Manifest {
    portrait_client::backup::backup(client, dir, |_| {}).await.expect("backup")
}

/// The header of a restore of shard `shard` of `manifest`'s backup, as
/// `restore_id`.
fn restore_header(
    manifest: &Manifest,
    shard: u32,
    restore_id: &str,
    check_only: bool,
) -> portrait_client::portrait_proto::v1::RestoreShardChunk {
    use portrait_client::portrait_proto::v1::{restore_shard_chunk, RestoreHeader, RestoreShardChunk};
    let file = &manifest.shard_files[shard as usize];
    let header = RestoreHeader {
        shard,
        archive_bytes: file.bytes,
        sha256: file.sha256.clone(),
        restore_id: restore_id.to_string(),
        shards: manifest.shards,
        check_only,
        archive_format: 0,
    };
    RestoreShardChunk { part: Some(restore_shard_chunk::Part::Header(header)) }
}

/// Waits until `client` reads `users` linearizably (every shard has a
/// leader again after a restart).
async fn wait_serving(client: &PortraitClient, users: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = client.batch_get_profiles(users, &[], Consistency::Linearizable).await {
        assert!(std::time::Instant::now() < deadline, "no linearizable read within 30 s: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every node of `cluster` serves `expected` from its own replicas (a
/// follower may apply the last entries a moment later).
async fn assert_every_node_serves(cluster: &Cluster, users: &[String], expected: &Snapshot) {
    for node in &cluster.nodes {
        let local = PortraitClient::connect(&node.endpoint()).await.unwrap().without_routing();
        // The read the loop ends on is the one checked: a node hosting no
        // replica forwards each LOCAL read to one of the shard's replicas,
        // which may be one still catching up (a node just restarted).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = snapshot(&local, users, false).await;
        while got != *expected && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            got = snapshot(&local, users, false).await;
        }
        assert_eq!(got, *expected, "node {}", node.id);
    }
}

/// Writes into shard `shard` of a stopped node's state a timer row larger
/// than a restore takes: due never, so the node never reads it, but a
/// backup copies it, and a restore of that backup is refused before its
/// `Begin`.
fn add_oversized_row(data_dir: &std::path::Path, shard: u32) {
    use portrait_server::limits::MAX_RESTORE_ROW_BYTES;
    use portrait_server::store::keys::{timer, CF_TIMERS};
    use portrait_server::store::sm_db::cf;
    use portrait_server::store::StateDb;
    use portrait_server::types::GroupId;
    let db = StateDb::open(data_dir).expect("the stopped node's state database");
    let raw = db.db();
    let key = timer(GroupId(shard), i64::MAX, "oversized");
    raw.put_cf(cf(&raw, CF_TIMERS), key, vec![0u8; MAX_RESTORE_ROW_BYTES + 1]).unwrap();
    raw.flush_wal(true).unwrap();
}

/// A backup with a row a restore cannot take (over its size) is refused
/// before its `Begin`: nothing changes in the shard. A restore that stopped
/// after its `Begin` (fault injection, as when its leader is lost there)
/// leaves its shard marked mid-restore by that backup. Another backup is
/// then refused with FAILED_PRECONDITION naming both, by the check and by
/// an upload alike, before anything changes: a restore run of it applies
/// no schema and restores no shard. The backup that began may still go on.
#[tokio::test]
async fn a_shard_left_mid_restore_by_one_backup_refuses_another_before_anything_changes() {
    use portrait_server::limits::MAX_RESTORE_ROW_BYTES;
    use tonic::codegen::tokio_stream;
    let mut source = Cluster::start_sharded(1, 2).await;
    let client = source.client(1).await;
    client.apply_schema(schema(), false).await.expect("schema");
    let users = write_orders(&client, 2, 3, 2).await;
    let backups = tempfile::tempdir().unwrap();
    let (sound_dir, bad_dir) = (backups.path().join("sound"), backups.path().join("bad"));
    let oversized_dir = backups.path().join("oversized");
    let sound = back_up(&client, &sound_dir).await;
    // The second backup has a newer schema; the third, the oversized row.
    let newer = format!("{}\n[families.extra]\nttl = \"30d\"\n", schema());
    client.apply_schema(newer.clone(), false).await.expect("a newer schema");
    let bad = back_up(&client, &bad_dir).await;
    assert_ne!(bad.backup_id, sound.backup_id);
    source.kill(1);
    add_oversized_row(&source.node(1).data_dir(), 0);
    source.restart(1).await;
    let client = source.client(1).await;
    wait_serving(&client, &users).await;
    back_up(&client, &oversized_dir).await;

    let stop = [("PORTRAIT_FAULT_RESTORE_STOP_AFTER_BEGIN", "1")];
    let target = Cluster::start_sharded_with_env(3, 2, Some("max_moves = 0\n"), &stop).await;
    let restorer = target.client(1).await;
    let failed = portrait_client::backup::restore(&restorer, &oversized_dir, |_| {}).await;
    let failed = failed.expect_err("a restore of an oversized row").to_string();
    assert!(failed.starts_with("shard 0: INVALID_ARGUMENT: archive: a row of family timers is "), "{failed}");
    assert!(failed.contains(&format!("over the limit of {MAX_RESTORE_ROW_BYTES}")), "{failed}");
    let leader = wait_placed(&target, &[1, 2, 3], 2).await[&0].1;
    let endpoint = target.node(leader).endpoint();
    // Refused before its Begin: the shard takes another backup.
    let chunks = tokio_stream::iter([restore_header(&bad, 0, &bad.backup_id, true)]);
    restorer.restore_shard_to(&endpoint, chunks).await.expect("nothing began");

    let failed = portrait_client::backup::restore(&restorer, &bad_dir, |_| {}).await;
    let failed = failed.expect_err("a restore stopped after its Begin").to_string();
    assert!(failed.contains("shard 0: fault injection: the restore stops after its Begin"), "{failed}");
    let then = restorer.get_schema().await.expect("schema");
    assert_eq!(then.toml, newer, "the restore applies its backup's schema before the shards");
    // The shard left mid-restore says so in its status, on every replica
    // (once it applied the Begin).
    for id in 1..=3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = target.client(id).await.cluster_status().await.expect("status");
            let shard0 = status.shard_status.iter().find(|s| s.shard == 0).expect("shard 0 is on every node");
            let shard1 = status.shard_status.iter().find(|s| s.shard == 1).expect("shard 1");
            assert_eq!(shard1.restoring, None, "node {id}: shard 1 never began");
            let restoring = shard0.restoring.as_ref().map(|r| (r.id.starts_with(&bad.backup_id), r.rows));
            if restoring.is_some() || Instant::now() > deadline {
                assert_eq!(restoring, Some((true, 0)), "node {id}: {shard0:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let expected = format!(
        "FAILED_PRECONDITION: shard 0 is being restored from {:?}, not {:?}: a shard takes one backup; \
         finish that restore, or restore into a new, empty cluster",
        bad.backup_id, sound.backup_id
    );
    for check_only in [true, false] {
        let chunks = tokio_stream::iter([restore_header(&sound, 0, &sound.backup_id, check_only)]);
        let refused = restorer.restore_shard_to(&endpoint, chunks).await.expect_err("another backup");
        assert_eq!(refused.code(), Some(tonic::Code::FailedPrecondition), "{refused}");
        assert_eq!(refused.to_string(), expected, "check only {check_only}");
    }
    let chunks = tokio_stream::iter([restore_header(&bad, 0, &bad.backup_id, true)]);
    restorer.restore_shard_to(&endpoint, chunks).await.expect("the backup that began may go on");

    let refused = portrait_client::backup::restore(&restorer, &sound_dir, |_| {}).await;
    let refused = refused.expect_err("a restore of another backup").to_string();
    assert_eq!(refused, format!("shard 0: {expected} (nothing was changed in this cluster)"));
    let kept = restorer.get_schema().await.expect("schema");
    assert_eq!((kept.version, kept.toml), (then.version, newer), "no schema applied");
    let empty = snapshot(&restorer, &users, true).await;
    assert!(empty.values().all(|v| *v == (0, 0, Vec::new())), "no shard restored: {empty:?}");
}

/// A schema applied during a backup: the shards copied under the old
/// version are copied again, so that every archive and the manifest are of
/// one version (the new one), which restores as the source serves it. Here
/// the change lands right after shard 0 is copied, and every shard has
/// applied it before shard 1 is: exactly shard 0 is copied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_applied_during_a_backup_has_the_shards_copied_before_it_copied_again() {
    let source = Cluster::start_sharded(3, 2).await;
    let client = source.client(1).await;
    let old = client.apply_schema(schema(), false).await.expect("schema").version;
    let users = write_orders(&client, 2, 3, 2).await;
    let before = snapshot(&client, &users, true).await;
    assert!(before.values().all(|(n, copy, ids)| *n == 2 && *copy == 2 && ids.len() == 2), "{before:?}");

    let newer = format!("{}\n[families.extra]\nttl = \"30d\"\n", schema());
    let (changer, handle) = (source.client(2).await, tokio::runtime::Handle::current());
    let (lines, changed_to) = (std::sync::Mutex::new(Vec::new()), AtomicU64::new(0));
    // Called by the backup after each shard: blocks it while the schema
    // changes, and until the backup's node has the new version.
    let progress = |line: &str| {
        lines.lock().unwrap().push(line.to_string());
        if changed_to.load(Ordering::SeqCst) != 0 || !line.starts_with("shard 0: ") {
            return;
        }
        let change = async {
            let applied = changer.apply_schema(newer.clone(), false).await.expect("a schema mid-backup");
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while client.get_schema().await.expect("schema").version < applied.version {
                assert!(std::time::Instant::now() < deadline, "its node lacks version {}", applied.version);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            applied.version
        };
        changed_to.store(tokio::task::block_in_place(|| handle.block_on(change)), Ordering::SeqCst);
    };
    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().join("b");
    let manifest = portrait_client::backup::backup(&client, &dir, progress).await.expect("backup");
    let (new, lines) = (changed_to.into_inner(), lines.into_inner().unwrap());
    assert!(new > old, "{new} after {old}");
    let again: Vec<&String> = lines.iter().filter(|l| l.contains("copied again")).collect();
    let expected =
        format!("shard 0: copied again, as the schema changed during the backup (version {old} -> {new})");
    assert_eq!(again, [&expected], "{lines:#?}");
    assert_eq!((manifest.schema.version, &manifest.schema.toml), (new, &newer));
    assert!(manifest.shard_files.iter().all(|f| f.schema_version == new), "{manifest:?}");

    let target = Cluster::start_sharded(1, 2).await;
    let restorer = target.client(1).await;
    let restored = portrait_client::backup::restore(&restorer, &dir, |_| {}).await.expect("restore");
    assert_eq!(restored.iter().filter(|r| !r.earlier && r.rows > 0).count(), 2, "{restored:?}");
    assert_eq!(restorer.get_schema().await.expect("schema").toml, newer);
    assert_eq!(snapshot(&restorer, &users, true).await, before);
}

/// A restore into a shard whose leader has no quorum (the shard's other
/// replicas were killed) ends UNAVAILABLE, having restored nothing: at the
/// leadership check that reads where an earlier attempt stopped, or, had
/// the quorum gone after it, when its `Begin` is not committed within the
/// write timeout. Once they are back, the same backup restored again
/// restores every shard, on every replica.
#[tokio::test]
async fn a_restore_whose_begin_had_no_quorum_is_run_again_and_restores_every_shard() {
    use portrait_client::portrait_proto::v1::{restore_shard_chunk, RestoreShardChunk};
    use tonic::codegen::tokio_stream;
    let source = Cluster::start_sharded(1, 2).await;
    let client = source.client(1).await;
    client.apply_schema(schema(), false).await.expect("schema");
    let users = write_orders(&client, 2, 3, 2).await;
    let before = snapshot(&client, &users, true).await;
    assert!(before.values().all(|(n, copy, ids)| *n == 2 && *copy == 2 && ids.len() == 2), "{before:?}");
    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().join("b");
    let manifest = back_up(&client, &dir).await;

    let config = "max_moves = 0\n[raft]\nwrite_timeout_ms = 2000\n";
    let mut target = Cluster::start_sharded_with_config(3, 2, config).await;
    let leader = wait_placed(&target, &[1, 2, 3], 2).await[&0].1;
    let others: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    for &id in &others {
        target.kill(id);
    }
    let archive = std::fs::read(dir.join(&manifest.shard_files[0].file)).unwrap();
    let data = |c: &[u8]| RestoreShardChunk { part: Some(restore_shard_chunk::Part::Data(c.to_vec())) };
    let mut chunks = vec![restore_header(&manifest, 0, &manifest.backup_id, false)];
    chunks.extend(archive.chunks(256 << 10).map(data));
    let (lead, endpoint) = (target.client(leader).await, target.node(leader).endpoint());
    let started = std::time::Instant::now();
    let upload = lead.restore_shard_to(&endpoint, tokio_stream::iter(chunks));
    let refused = tokio::time::timeout(Duration::from_secs(30), upload)
        .await
        .expect("answered within 30 s")
        .expect_err("a Begin without a quorum");
    assert_eq!(refused.code(), Some(tonic::Code::Unavailable), "{refused}");
    let message = refused.to_string();
    let no_quorum = message.starts_with("UNAVAILABLE: shard 0: not enough for a quorum")
        || message.starts_with("UNAVAILABLE: shard 0: a restore step was not committed within 2000 ms");
    assert!(no_quorum, "{message} (after {:?})", started.elapsed());

    for &id in &others {
        target.restart(id).await;
    }
    let restorer = target.client(leader).await;
    let restored = portrait_client::backup::restore(&restorer, &dir, |_| {}).await.expect("restore again");
    let shards: Vec<(u32, bool)> = restored.iter().map(|r| (r.shard, r.earlier)).collect();
    assert_eq!(shards, [(0u32, false), (1, false)], "{restored:?}");
    assert!(restored.iter().all(|r| r.rows > 0), "{restored:?}");
    assert_eq!(restorer.get_schema().await.expect("schema").toml, schema());
    assert_eq!(snapshot(&restorer, &users, true).await, before);
    assert_every_node_serves(&target, &users, &before).await;
}

/// A restore cut off midway (here: fault injection stops a fresh attempt
/// after its first entry of rows, as a lost leader would) leaves its shard
/// mid-restore with those rows applied. Run again, the restore goes on
/// after them instead of wiping them and starting over: the answer counts
/// the rows kept, which are the ones the shard's status showed, and every
/// replica then holds exactly what the backup held.
#[tokio::test]
async fn a_restore_cut_off_midway_goes_on_after_the_rows_it_applied() {
    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().join("b");
    let (users, before) = noted_backup(&dir).await;

    let stop = [("PORTRAIT_FAULT_RESTORE_STOP_AFTER_ROWS", "1")];
    let target = Cluster::start_sharded_with_env(3, 1, Some("max_moves = 0\n"), &stop).await;
    wait_placed(&target, &[1, 2, 3], 1).await;
    let restorer = target.client(1).await;
    let failed = portrait_client::backup::restore(&restorer, &dir, |_| {}).await;
    let failed = failed.expect_err("a restore cut off after its first rows").to_string();
    assert!(failed.contains("shard 0: fault injection: the restore stops after 1 rows entries"), "{failed}");
    let kept = restoring_rows(&restorer).await.expect("shard 0 is mid-restore");
    assert!(kept > 0, "its first entry's rows: {kept}");

    let restored = portrait_client::backup::restore(&restorer, &dir, |_| {}).await.expect("run again");
    assert_eq!(restored.len(), 1, "{restored:?}");
    let shard = &restored[0];
    assert!(!shard.earlier, "{shard:?}");
    assert_eq!(shard.resumed_rows, kept, "it went on after the rows applied: {shard:?}");
    assert!(shard.rows > kept, "{shard:?}");
    assert_eq!(snapshot(&restorer, &users, true).await, before);
    assert_every_node_serves(&target, &users, &before).await;
    // The rows the first attempt applied are whole too.
    assert_notes(&restorer, &users).await;
}

/// A 3 KB note of `user`'s (the `k`th).
fn note(user: &str, k: usize) -> String {
    format!("{user}:{k}:{}", "n".repeat(3_000))
}

/// Backs up into `dir` a single-shard cluster of 900 users with one order
/// and two notes of 3 KB each (about 6 MB: six entries of rows, see
/// `RESTORE_ENTRY_BYTES`); returns the users and what they read.
async fn noted_backup(dir: &std::path::Path) -> (Vec<String>, Snapshot) {
    let source = Cluster::start_sharded(1, 1).await;
    let client = source.client(1).await;
    client.apply_schema(schema(), false).await.expect("schema");
    // 900 users (a batch read takes 1,000).
    let users: Vec<String> = (0..900).map(|i| format!("r{i}")).collect();
    for part in users.chunks(300) {
        let events = part.iter().map(|u| {
            let mut e = order_of(u, &format!("{u}-order"));
            for k in 0..2 {
                e.attrs.insert(format!("note{k}"), portrait_client::Value::string(note(u, k)));
            }
            e
        });
        client.write(events.collect()).await.expect("write");
    }
    let before = snapshot(&client, &users, true).await;
    assert!(before.values().all(|(n, _, ids)| *n == 1 && ids.len() == 1), "every order is there");
    back_up(&client, dir).await;
    (users, before)
}

/// Every user of [`noted_backup`] reads both its notes whole.
async fn assert_notes(client: &PortraitClient, users: &[String]) {
    let got = client.batch_get_profiles(users, &["trade".into()], Consistency::Linearizable).await;
    for (user, p) in users.iter().zip(got.expect("read").profiles) {
        let attrs = &p.families["trade"].attrs;
        for k in 0..2 {
            let want = Some(portrait_client::Value::string(note(user, k)));
            assert_eq!(attrs[&format!("note{k}")].value, want, "{user}");
        }
    }
}

/// The rows shard 0 holds of the restore under way in it, as `client`'s
/// node reports them (`None`: no restore under way).
async fn restoring_rows(client: &PortraitClient) -> Option<u64> {
    let status = client.cluster_status().await.expect("status");
    status.shard_status.iter().find(|s| s.shard == 0).and_then(|s| s.restoring.clone()).map(|r| r.rows)
}

/// A restore run through a node that hosts no replica of the shard (5
/// nodes, RF 3: it knows no leader of it), whose shard leader and seed node
/// are both killed (SIGKILL) between two of its rows entries: the same run
/// moves on to the other nodes, finds the new leader from the shard's
/// replicas, and goes on there after the rows already applied.
#[tokio::test]
async fn a_restore_whose_leader_and_seed_are_killed_midway_goes_on_at_the_new_leader() {
    const ALL: [u64; 5] = [1, 2, 3, 4, 5];
    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().join("b");
    let (users, before) = noted_backup(&dir).await;

    // Each node's leader of a fresh attempt waits 30 s after its first
    // rows entry: the test kills it then, the restore call open.
    let pause = [("PORTRAIT_FAULT_RESTORE_PAUSE_AFTER_ROWS", "1")];
    let mut target = Cluster::start_sharded_with_env(5, 1, Some("max_moves = 0\n"), &pause).await;
    let (replicas, leader) = wait_placed(&target, &ALL, 1).await[&0].clone();
    let seed = *ALL.iter().find(|n| !replicas.contains(n)).expect("a node without a replica");
    let follower = *replicas.iter().find(|&&n| n != leader).expect("a follower");
    let restorer = target.client(seed).await;
    let run = {
        let (restorer, dir) = (restorer.clone(), dir.clone());
        tokio::spawn(async move { portrait_client::backup::restore(&restorer, &dir, |_| {}).await })
    };
    let watcher = target.client(follower).await.without_routing();
    let deadline = Instant::now() + Duration::from_secs(60);
    let kept = loop {
        match restoring_rows(&watcher).await {
            Some(rows) if rows > 0 => break rows,
            _ => assert!(Instant::now() < deadline, "no rows entry applied within 60 s"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    target.kill(leader);
    target.kill(seed);

    // The same run goes on at the shard's new leader, after the rows the
    // killed one had committed.
    let restored = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the restore ends");
    let restored = restored.expect("join").expect("the restore goes on at the new leader");
    assert_eq!(restored.len(), 1, "{restored:?}");
    let shard = &restored[0];
    assert!(!shard.earlier, "{shard:?}");
    assert_eq!(shard.resumed_rows, kept, "it went on after the rows applied: {shard:?}");
    assert!(shard.rows > kept, "{shard:?}");
    // The follower's replica may apply the End a moment after the leader.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(rows) = restoring_rows(&watcher).await {
        assert!(Instant::now() < deadline, "node {follower} still shows the restore under way ({rows} rows)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(snapshot(&watcher, &users, true).await, before);
    assert_notes(&watcher, &users).await;
    // The killed nodes, back, serve the same (the leader's replica caught up).
    target.restart(leader).await;
    target.restart(seed).await;
    assert_every_node_serves(&target, &users, &before).await;
}
