//! Three nodes, four shards, every shard replicated on every node: a write
//! through any node lands on every replica of each of its shards, also
//! when the shards have different leaders (the receiving node forwards
//! each part to its shard's leader).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use portrait_client::{Consistency, Event, PortraitClient, Value, WriteResponse};
use portrait_cluster_tests::{workload, Cluster, TEST_SHARDS};

fn visit(user: &str, id: &str) -> Event {
    workload::visit(user, id, id)
}

/// Waits until node `id` has applied every part of `written` in its shard.
async fn wait_shards_applied(cluster: &Cluster, id: u64, written: &WriteResponse) {
    let client = cluster.client(id).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client.cluster_status().await.expect("status");
        let behind: Vec<_> = written
            .shards
            .iter()
            .filter(|part| status.shard_status[part.shard as usize].applied_index < part.log_index)
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "node {id} did not apply {behind:?}: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The page each user last visited, read locally on node `id`.
async fn check_local(cluster: &Cluster, id: u64, users: &[String], id_prefix: &str) {
    let client = PortraitClient::connect(&cluster.node(id).endpoint()).await.unwrap();
    let mut shards = BTreeSet::new();
    for user in users {
        let got = client.get_profile(user, &[], Consistency::Local).await.expect("read");
        shards.insert(got.read_info.expect("read info").shard);
        let browse = &got.profile.expect("profile").families["browse"];
        let page = browse.attrs["page"].value.clone().expect("page");
        assert_eq!(page, Value::string(format!("{id_prefix}-{user}")), "node {id}, {user}");
    }
    assert_eq!(shards.len(), TEST_SHARDS as usize, "the users cover every shard");
}

#[tokio::test]
async fn writes_through_any_node_land_on_every_replica_of_their_shard() {
    // Leaders placed by the test: no balancing (`max_moves = 0`).
    let cluster = Cluster::start_sharded_with_config(3, TEST_SHARDS, "max_moves = 0\n").await;
    for id in 1..=3 {
        let status = cluster.client(id).await.cluster_status().await.unwrap();
        assert_eq!((status.shards, status.shard_status.len()), (TEST_SHARDS, TEST_SHARDS as usize));
        assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3, "{status:?}");
    }
    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();

    // Through every node in turn (node 1 leads every shard).
    for via in 1..=3 {
        let prefix = format!("via{via}");
        let events: Vec<Event> = users.iter().map(|u| visit(u, &format!("{prefix}-{u}"))).collect();
        let written = cluster.client(via).await.write(events).await.expect("write");
        assert_eq!(written.applied, users.len() as u32);
        assert_eq!(written.shards.len(), TEST_SHARDS as usize, "{written:?}");
        for id in 1..=3 {
            wait_shards_applied(&cluster, id, &written).await;
            check_local(&cluster, id, &users, &prefix).await;
        }
    }

    // Shards with different leaders: shard 1 to node 2, shard 2 to node 3.
    let leader = cluster.client(1).await;
    leader.transfer_leader_of(2, Some(1)).await.expect("transfer shard 1");
    leader.transfer_leader_of(3, Some(2)).await.expect("transfer shard 2");
    let status = cluster.client(3).await.cluster_status().await.unwrap();
    let leaders: Vec<u64> = status.shard_status.iter().map(|s| s.leader_id).collect();
    assert_eq!(leaders[1..3], [2, 3], "{status:?}");

    // One write through any node still lands everywhere: parts are forwarded.
    for via in 1..=3 {
        let prefix = format!("split{via}");
        let events: Vec<Event> = users.iter().map(|u| visit(u, &format!("{prefix}-{u}"))).collect();
        let written = cluster.client(via).await.write(events).await.expect("write across leaders");
        assert_eq!(written.applied, users.len() as u32, "{written:?}");
        for id in 1..=3 {
            wait_shards_applied(&cluster, id, &written).await;
            check_local(&cluster, id, &users, &prefix).await;
        }
        // Linearizable reads go to each shard's leader through the client's
        // redirect (`leaders`, as node 3 reported them), and see this write.
        let client = cluster.client(via).await;
        for user in &users {
            let got = client.get_profile(user, &[], Consistency::Linearizable).await;
            let got = got.expect("linearizable read");
            let info = got.read_info.expect("read info");
            let shard_leader = leaders[info.shard as usize];
            assert_eq!(info.node_id, shard_leader, "{user}: shard {} read off its leader", info.shard);
            let browse = &got.profile.expect("profile").families["browse"];
            let page = browse.attrs["page"].value.clone().expect("page");
            assert_eq!(page, Value::string(format!("{prefix}-{user}")), "{user}, linearizable via {via}");
        }
    }
}

#[tokio::test]
async fn a_node_joining_a_sharded_cluster_learns_the_number_of_shards() {
    let mut cluster = Cluster::start_sharded(1, TEST_SHARDS).await;
    // Started with --join and no --shards.
    let id = cluster.spawn_joining(&[1]).await;
    let client = cluster.client(id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Shard 0's membership changes last: a voter there is one in every shard.
        let status = client.cluster_status().await.expect("status");
        assert_eq!(status.shards, TEST_SHARDS);
        if status.members.iter().any(|m| m.node_id == id && m.voter) {
            break;
        }
        assert!(Instant::now() < deadline, "node {id} did not become a voter: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    let events: Vec<Event> = users.iter().map(|u| visit(u, &format!("joined-{u}"))).collect();
    let written = client.write(events).await.expect("write through the new node");
    for node in [1, id] {
        wait_shards_applied(&cluster, node, &written).await;
        check_local(&cluster, node, &users, "joined").await;
    }
}
