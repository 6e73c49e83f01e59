//! A node that was down while the shards' logs were compacted catches up
//! by snapshot install and converges to the same profiles, features and
//! tags as each shard's leader; so does a replica whose state was wiped at
//! open because a snapshot install a crash interrupted could not be
//! finished, and one killed while its installs were held.

use std::collections::BTreeSet;

use portrait_client::json::now_ms;
use portrait_client::{shard_of, Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::replicas::{lifetime_orders, wait_caught_up, wait_placed};
use portrait_cluster_tests::{Cluster, TEST_SHARDS};

/// Four nodes, RF 3: nodes 1-3 hold every shard, node 4 none (it forwards
/// the writes). Snapshots every 40 entries, keeping 5 entries behind: a
/// replica that misses a hundred entries of a shard can only catch up by
/// snapshot.
const CONFIG: &str =
    "replication = 3\nmax_moves = 0\n[raft]\nsnapshot_every_entries = 40\nkeep_logs_after_snapshot = 5\n";
const USERS: i64 = 25;
const PER_REQUEST: i64 = 4;

/// A comparable digest of one user's logical state: families, features and
/// tags as canonical JSON (sorted keys), as `client`'s node serves it.
async fn digest(client: &PortraitClient, user: &str) -> String {
    match client.get_profile(user, &[], Consistency::Local).await {
        Ok(r) => portrait_client::json::profile_to_json(&r.profile.unwrap_or_default()).to_string(),
        Err(e) => format!("error {e}"),
    }
}

/// Request `r`: events `r * PER_REQUEST ..` (consecutive users, so most
/// requests touch most shards).
fn request(r: i64) -> Vec<Event> {
    (r * PER_REQUEST..(r + 1) * PER_REQUEST).map(event).collect()
}

/// The cluster of [`CONFIG`] with node 3 down while 119 requests are
/// written (through node 4, which hosts no shard: every part is forwarded
/// to its shard's leader), and that client.
async fn with_node_3_behind() -> (Cluster, PortraitClient) {
    let mut cluster = Cluster::start_sharded_with_config(4, TEST_SHARDS, CONFIG).await;
    wait_placed(&cluster, &[1, 2, 3, 4], TEST_SHARDS).await;
    let client = cluster.client(4).await.without_routing();
    client.write(request(0)).await.unwrap();
    cluster.kill(3);
    for r in 1..120 {
        client.write(request(r)).await.expect("write with one replica down");
    }
    (cluster, client)
}

#[tokio::test]
async fn a_lagging_replica_catches_up_by_snapshot_in_every_shard() {
    let hosts = [1, 2, 3];
    let (mut cluster, client) = with_node_3_behind().await;
    // Node 1 created every shard and leads it; its top-level status is
    // shard 0's. The purge follows the snapshot in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        let status = cluster.client(1).await.cluster_status().await.unwrap();
        if status.purged_index > 5 || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(status.purged_index > 5, "shard 0's log was compacted past what node 3 has: {status:?}");
    // Node 1's snapshot archives rot on its disk: it must not send them
    // (node 3 would refuse them; openraft stops a replica whose install
    // fails), but build new ones.
    let damaged = damage_snapshots(&cluster.node(1).data_dir());
    assert!(damaged >= 1, "node 1 holds snapshot archives");

    cluster.restart(3).await;
    wait_caught_up(&cluster, &hosts, TEST_SHARDS).await;
    assert!(cluster.node(1).log().contains("the snapshot archive is damaged"), "node 1 checked its archive");
    assert!(cluster.node(3).is_running());
    // The install's snapshot shows in node 3's metrics a moment after
    // its log and applied index do.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let s3 = loop {
        let s3 = cluster.client(3).await.cluster_status().await.unwrap();
        if s3.snapshot_index >= status.purged_index || std::time::Instant::now() > deadline {
            break s3;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        s3.snapshot_index >= status.purged_index,
        "node 3 installed a snapshot of shard 0 past the leader's purge ({}): {s3:?}",
        status.purged_index
    );
    assert_converged(&cluster, 3).await;
    // And keeps applying new writes after the install.
    client.write(request(1000)).await.unwrap();
    wait_caught_up(&cluster, &hosts, TEST_SHARDS).await;
    assert_converged(&cluster, 3).await;

    // A crash inside an install of shard 0 whose archive is then gone:
    // node 3 wipes the shard's state at open and empties its raft log (the
    // vote kept), and the leader sends it a snapshot again.
    cluster.kill(3);
    mark_install_interrupted(&cluster.node(3).data_dir(), 0);
    cluster.restart(3).await;
    client.write(request(1001)).await.unwrap();
    wait_caught_up(&cluster, &hosts, TEST_SHARDS).await;
    assert_converged(&cluster, 3).await;
    assert!(cluster.node(3).log().contains("its raft log is emptied too"), "the reset ran");
}

/// openraft asks for the log's purge up to a received snapshot as soon as
/// it hands the snapshot to the state machine, before the install. Node 3
/// is killed (-9) while its installs are held (a fault-injection marker):
/// its logs must not have been purged past its state, or it could never
/// apply again. Before that, node 1 (the leader) is killed while every
/// shard's install on node 3 is held: no write commits, as openraft 0.9
/// holds node 3's later votes and appends in a group until its install is
/// done (the order the log's bridge guards against relying on; were an
/// append past the snapshot acknowledged, the crash would leave node 3's
/// log with a hole). Restarted while the old leader is still down, node 3
/// catches up from the new leader and converges, and the write retried
/// applies.
#[tokio::test]
async fn a_replica_killed_in_the_middle_of_snapshot_installs_catches_up_after_a_restart() {
    let hosts = [1, 2, 3];
    let (mut cluster, client) = with_node_3_behind().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cluster.client(1).await.cluster_status().await.unwrap().purged_index <= 5 {
        assert!(std::time::Instant::now() < deadline, "shard 0's log on node 1 was never compacted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let stall = cluster.node(3).data_dir().join(portrait_server::store::state_machine::STALL_INSTALLS_MARKER);
    std::fs::write(&stall, b"").unwrap();
    cluster.restart(3).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cluster.node(3).log().matches("fault injection: snapshot install stalled").count()
        < TEST_SHARDS as usize
    {
        assert!(std::time::Instant::now() < deadline, "node 3 never received every shard's snapshot");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Time for openraft's purge requests to reach the log's purge thread.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    // With node 1 down, a shard needs node 3's vote and acknowledgements,
    // which it gives only once its install is done: the write cannot
    // commit, so it is given a short time and retried below.
    cluster.kill(1);
    let early = tokio::time::timeout(std::time::Duration::from_secs(3), client.write(request(400))).await;
    assert!(
        !matches!(early, Ok(Ok(_))),
        "a write committed by a replica whose install is not durable: {early:?}"
    );
    cluster.kill(3);
    std::fs::remove_file(&stall).unwrap();
    cluster.restart(3).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for r in [400, 500] {
        while let Err(e) = client.write(request(r)).await {
            assert!(cluster.node(3).is_running(), "node 3 exited by itself: {e}");
            assert!(std::time::Instant::now() < deadline, "no write through nodes 2 and 3: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    cluster.restart(1).await;
    wait_caught_up(&cluster, &hosts, TEST_SHARDS).await;
    assert!(cluster.node(3).is_running());
    assert_converged(&cluster, 3).await;
    client.write(request(1000)).await.unwrap();
    wait_caught_up(&cluster, &hosts, TEST_SHARDS).await;
    assert_converged(&cluster, 3).await;
    // Every request was acknowledged once in the end, the one that gave up
    // included (retried with the same event ids): each applied exactly once.
    let written: Vec<i64> = (0..120).chain([400, 500, 1000]).collect();
    for id in hosts {
        assert_orders_applied_once(&cluster, id, &written).await;
    }
}

/// On node `id`, every user's `orders_lifetime` counts each order event of
/// `requests` once.
async fn assert_orders_applied_once(cluster: &Cluster, id: u64, requests: &[i64]) {
    let replica = cluster.client(id).await.without_routing();
    for u in 0..USERS {
        let user = format!("u{u}");
        let orders = requests
            .iter()
            .flat_map(|&r| r * PER_REQUEST..(r + 1) * PER_REQUEST)
            .filter(|i| i % USERS == u && event(*i).r#type == "order")
            .count() as u64;
        let profile =
            replica.get_profile(&user, &[], Consistency::Local).await.unwrap().profile.unwrap_or_default();
        assert_eq!(lifetime_orders(&profile), orders, "{user}'s orders on node {id}");
    }
}

/// Flips one byte in the middle of each shard's current snapshot archive
/// in `data_dir` (`snapshots/<shard>/snap-*.snap`); returns how many.
fn damage_snapshots(data_dir: &std::path::Path) -> usize {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut damaged = 0;
    for shard in 0..TEST_SHARDS {
        let dir = data_dir.join("snapshots").join(shard.to_string());
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !(name.starts_with("snap-") && name.ends_with(".snap")) {
                continue;
            }
            let mut file = std::fs::OpenOptions::new().read(true).write(true).open(entry.path()).unwrap();
            let middle = file.metadata().unwrap().len() / 2;
            let mut byte = [0u8];
            file.seek(SeekFrom::Start(middle)).unwrap();
            file.read_exact(&mut byte).unwrap();
            file.seek(SeekFrom::Start(middle)).unwrap();
            file.write_all(&[byte[0] ^ 0x5a]).unwrap();
            file.sync_all().unwrap();
            damaged += 1;
        }
    }
    damaged
}

/// Sets shard `shard`'s install marker in a stopped node's state database,
/// naming an archive that does not exist (what a crash in the middle of an
/// install leaves after the archive was lost).
fn mark_install_interrupted(data_dir: &std::path::Path, shard: u32) {
    use portrait_server::store::codec::encode;
    use portrait_server::store::group_snapshot::InstallRecord;
    use portrait_server::store::keys::{installing, CF_META};
    use portrait_server::store::sm_db::cf;
    use portrait_server::store::StateDb;
    use portrait_server::types::GroupId;
    let db = StateDb::open(data_dir).expect("the stopped node's state database");
    let raw = db.db();
    let record = InstallRecord { archive: data_dir.join("lost.snap"), meta: Default::default() };
    raw.put_cf(cf(&raw, CF_META), installing(GroupId(shard)), encode(&record)).unwrap();
    raw.flush_wal(true).unwrap();
}

/// Every user's state on node `id` equals its shard leader's (all applied).
async fn assert_converged(cluster: &Cluster, id: u64) {
    let placed = wait_placed(cluster, &[1, 2, 3, 4], TEST_SHARDS).await;
    let replica = cluster.client(id).await.without_routing();
    let mut compared = BTreeSet::new();
    for u in 0..USERS {
        let user = format!("u{u}");
        let shard = shard_of(&user, TEST_SHARDS);
        let (voters, leader) = &placed[&shard];
        // The leader, unless node `id` leads: then another replica.
        let other = *voters.iter().find(|&&n| n != id && (n == *leader || *leader == id)).unwrap();
        let expected = digest(&cluster.client(other).await.without_routing(), &user).await;
        assert!(expected.contains("orders_lifetime"), "{user} on node {other}: {expected}");
        assert_eq!(digest(&replica, &user).await, expected, "{user} (shard {shard}) on node {id} vs {other}");
        compared.insert(shard);
    }
    assert_eq!(compared.len(), TEST_SHARDS as usize, "the users cover every shard");
}

fn event(i: i64) -> Event {
    let kind = if i % 3 == 0 { "order" } else { "view" };
    let family = if kind == "order" { "trade" } else { "browse" };
    Event {
        user_id: format!("u{}", i % USERS),
        family: family.into(),
        r#type: kind.into(),
        event_time_ms: now_ms() - (i % 50) * 3_600_000,
        event_id: format!("e{i}"),
        attrs: [
            ("category".to_string(), Value::string(["phone", "tv", "books"][(i % 3) as usize])),
            ("amount".to_string(), Value::int(i * 7 % 900)),
        ]
        .into(),
    }
}
