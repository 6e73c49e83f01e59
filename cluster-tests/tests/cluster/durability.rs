//! Acknowledged writes under membership changes and whole-cluster restarts,
//! with a continuous workload that records every acknowledged write and a
//! full-set comparison afterwards (not a count). The restart runs at
//! several shards and checks every replica of each shard: per user, the
//! order count and the distinct events applied equal what was acknowledged.

use std::collections::{BTreeMap, BTreeSet};

use std::time::{Duration, Instant};

use portrait_client::{shard_of, Consistency, Event, PortraitClient, Profile};
use portrait_cluster_tests::replicas::{
    assert_every_replica_holds, drain, lifetime_orders, wait_placed, Book,
};
use portrait_cluster_tests::workload::{history_ids, order_of, Workload};
use portrait_cluster_tests::{Cluster, TEST_SHARDS};

/// A leader whose raft log cannot be written (fault injection: a marker
/// file in its data dir, as a full or failing disk) has its groups' raft
/// stopped for good by openraft. The node shuts down and exits 1 naming
/// the error, instead of answering its peers' probes with a dead leader;
/// the others elect a leader and take writes, and the write acknowledged
/// before is kept.
#[tokio::test]
async fn a_leader_whose_log_cannot_be_written_exits_and_the_others_take_over() {
    let mut cluster = Cluster::start(3).await;
    let leader = wait_placed(&cluster, &[1, 2, 3], 1).await[&0].1;
    let client = cluster.client(leader).await;
    client.write(vec![order_of("u1", "before")]).await.expect("a write before the fault");
    std::fs::write(cluster.node(leader).data_dir().join("fault-fail-log-appends"), b"").unwrap();
    // The leader cannot append it, but it answers UNAVAILABLE (outcome
    // unknown) and the client retries for up to 8 s, which may reach a new
    // leader and succeed (its followers may also have it): either outcome,
    // and the event is applied at most once (checked below).
    let during = client.write(vec![order_of("u1", "during")]).await;
    println!("the write the leader cannot log: {during:?}");
    let status = cluster.wait_exit(leader, Duration::from_secs(20)).await;
    let log = cluster.node(leader).log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("a raft group stopped on an error"), "{log}");
    let other = (1..=3).find(|&id| id != leader).unwrap();
    let via = cluster.client(other).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = via.write(vec![order_of("u1", "after")]).await {
        assert!(Instant::now() < deadline, "no write taken without node {leader}: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let history = history_ids(&via, "u1", "trade", Consistency::Linearizable).await;
    for id in ["before", "after"] {
        assert!(history.iter().any(|h| h == id), "{id} not served: {history:?}");
    }
    if during.is_ok() {
        assert!(history.iter().any(|h| h == "during"), "acknowledged, not served: {history:?}");
    }
    // Each event (the retried ones too) applied and counted once.
    let distinct: BTreeSet<&String> = history.iter().collect();
    assert_eq!(distinct.len(), history.len(), "an event applied twice: {history:?}");
    let profile = via.get_profile("u1", &[], Consistency::Linearizable).await.expect("read u1").profile;
    assert_eq!(profile.map_or(0, |p| lifetime_orders(&p)), history.len() as u64, "orders vs {history:?}");
}

#[tokio::test]
async fn no_acknowledged_write_is_lost_when_a_node_joins_and_another_leaves_under_load() {
    let mut cluster = Cluster::start(3).await;
    let load = Workload::start(vec![cluster.node(2).endpoint(), cluster.node(3).endpoint()]);

    // Under load: some writes acknowledged before the membership changes.
    load.wait_acked_over(10).await;
    let four = cluster.spawn_node().await;
    let admin = cluster.client(2).await;
    admin
        .add_node(four, &cluster.node(four).endpoint(), &cluster.node(four).advertised(), false)
        .await
        .expect("add node 4 under load");
    // Drain and remove node 1, the first leader (unless leadership moved):
    // its replica moves to node 4, the cluster commits without it and a
    // remaining node leads.
    drain(&admin, 1).await;
    let r = admin.remove_node(1).await.expect("remove node 1 under load");
    assert_eq!(r.members.iter().map(|m| m.node_id).collect::<Vec<_>>(), [2, 3, 4]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let outcome = load.stop().await;
    assert!(outcome.acked.len() > 20, "the workload made progress: {}", outcome.acked.len());
    assert_eq!(outcome.hung, 0, "writes hung");
    outcome.assert_served_by(&cluster, &[2, 3, 4], "").await;
}

/// Users of the restart test: spread over the shards, 4 orders each.
const RESTART_USERS: usize = 40;

/// Every user's tags (no selection: every feature and tag), read
/// linearizably through the shards' leaders.
async fn tags(client: &PortraitClient, users: &[String]) -> BTreeMap<String, BTreeMap<String, String>> {
    let r =
        client.batch_get_profiles(users, &[], Consistency::Linearizable).await.expect("linearizable read");
    let tags = |p: &Profile| p.tags.iter().map(|(n, t)| (n.clone(), format!("{:?}", t.value))).collect();
    r.profiles.iter().map(|p| (p.user_id.clone(), tags(p))).collect()
}

#[tokio::test]
async fn all_nodes_killed_and_restarted_keep_every_acknowledged_write_and_tag_in_every_shard() {
    let all = [1, 2, 3];
    let mut cluster = Cluster::start_sharded(3, TEST_SHARDS).await;
    wait_placed(&cluster, &all, TEST_SHARDS).await;
    let users: Vec<String> = (0..RESTART_USERS).map(|u| format!("r{u}")).collect();
    let shards: BTreeSet<u32> = users.iter().map(|u| shard_of(u, TEST_SHARDS)).collect();
    assert_eq!(shards.len(), TEST_SHARDS as usize, "the users cover every shard");
    let client = cluster.client(2).await;
    let mut book = Book::default();
    for r in 0..20 {
        let events: Vec<Event> =
            (0..8).map(|j| order_of(&users[(r * 8 + j) % RESTART_USERS], &format!("e{r}-{j}"))).collect();
        book.record(&events, false);
        client.write(events.clone()).await.expect("write");
        book.record(&events, true);
    }
    let before = tags(&client, &users).await;
    for id in all {
        cluster.kill(id);
    }
    for id in all {
        cluster.restart(id).await;
    }
    // Every replica of every shard: each user's 4 orders, counted once.
    let replicas = assert_every_replica_holds(&cluster, &all, TEST_SHARDS, &book).await;
    assert_eq!(replicas, 3 * TEST_SHARDS as usize, "every shard on every node");
    assert!(book.acked.values().all(|ids| ids.len() == 4), "{book:?}");
    assert_eq!(tags(&cluster.client(1).await, &users).await, before, "tags after the restart");
}

#[tokio::test]
async fn no_acknowledged_write_is_lost_when_the_leader_is_killed_under_load() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    let survivors: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let load = Workload::start(survivors.iter().map(|&id| cluster.node(id).endpoint()).collect());

    load.wait_acked_over(0).await;
    let before_kill = load.acked();
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(&survivors).await;
    load.wait_acked_over(before_kill).await;
    let outcome = load.stop().await;

    assert!(
        before_kill > 0 && outcome.acked.len() > before_kill,
        "writes before ({before_kill}) and after ({}) the kill",
        outcome.acked.len()
    );
    outcome.assert_served_by(&cluster, &survivors, &format!(" (leader now: {new_leader})")).await;
}

/// A replica killed between a snapshot and the flush of its state restarts
/// with its state machine behind the snapshot: it re-applies the entries
/// after its last flush from the log once it learns the commit index, so
/// the log policy must not purge them meanwhile (it purged up to the
/// snapshot minus the entries kept, and the shard stopped on that node:
/// "try to get log at index N but got M"). Three nodes, one shard led by
/// node 1, snapshots every 10 entries, 2 entries kept; node 3 (a follower)
/// killed under writes and restarted three times, the group left idle
/// (no heartbeats: the commit index arrives with the next write) for a
/// second: afterwards node 3 serves every acknowledged order.
#[tokio::test]
async fn a_follower_killed_right_after_a_snapshot_replays_its_log_after_the_restart() {
    let config = "max_moves = 0\n[raft]\nsnapshot_every_entries = 10\nkeep_logs_after_snapshot = 2\n";
    let mut cluster = Cluster::start_sharded_with_config(3, 1, config).await;
    let client = cluster.client(1).await;
    let mut acked = 0u64;
    for round in 0..3 {
        for i in 0..(30 + round * 7) {
            client.write(vec![order_of("u1", &format!("r{round}-{i}"))]).await.expect("write");
            acked += 1;
        }
        cluster.kill(3);
        cluster.restart(3).await;
        tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
        client.write(vec![order_of("u1", &format!("r{round}-after"))]).await.expect("write after");
        acked += 1;
        let local = PortraitClient::connect(&cluster.node(3).endpoint()).await.unwrap().without_routing();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let got = local.get_profile("u1", &[], Consistency::Local).await;
            let count = got
                .ok()
                .and_then(|r| r.profile)
                .map_or(0, |p| portrait_cluster_tests::replicas::lifetime_orders(&p));
            if count == acked {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: node 3 serves {count} of {acked} orders:\n{}",
                cluster.node(3).log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}
