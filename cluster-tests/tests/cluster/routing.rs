//! Routing from the Rust client on three nodes and four shards whose
//! leaders are on different nodes: writes across shards go to each shard's
//! leader and read back LINEARIZABLE from it, and `portrait locate` names
//! the shard the server reads a user from. An empty batch is answered
//! where it is asked. Calls cut off by a node's kill are sent again by the
//! client, not failed with the lost connection; a client whose seed node
//! dies goes on through the other nodes its map names.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use portrait_client::portrait_proto::v1::rule_value::Kind;
use portrait_client::{shard_of, Consistency, Event, Value};
use portrait_cluster_tests::replicas::{placement, statuses};
use portrait_cluster_tests::workload::OneEventWriters;
use portrait_cluster_tests::{portrait_cli, workload, Cluster, TEST_SHARDS};

fn visit(user: &str, page: &str) -> Event {
    workload::visit(user, &format!("{page}-{user}"), page)
}

/// The shard `portrait locate USER` prints (its `shard  K (...)` line).
fn located_shard(endpoint: &str, user: &str) -> u32 {
    let out = Command::new(portrait_cli()).args(["--endpoint", endpoint, "locate", user]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "portrait locate {user}: {}", String::from_utf8_lossy(&out.stderr));
    let line = text.lines().find(|l| l.starts_with("shard ")).unwrap_or_else(|| panic!("no shard in {text}"));
    line.split_whitespace().nth(1).and_then(|k| k.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

#[tokio::test]
async fn the_client_writes_to_each_shards_leader_and_reads_back_from_it() {
    // Leaders placed by the test: no balancing (`max_moves = 0`).
    let cluster = Cluster::start_sharded_with_config(3, TEST_SHARDS, "max_moves = 0\n").await;
    // Leaders on three nodes: shard 1 to node 2, shard 2 to node 3.
    let client = cluster.client(1).await;
    client.transfer_leader_of(2, Some(1)).await.expect("transfer shard 1");
    client.transfer_leader_of(3, Some(2)).await.expect("transfer shard 2");

    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    let shards: BTreeSet<u32> = users.iter().map(|u| shard_of(u, TEST_SHARDS)).collect();
    assert_eq!(shards.len(), TEST_SHARDS as usize, "the users cover every shard");
    let written = client.write(users.iter().map(|u| visit(u, "routed")).collect()).await.expect("write");
    assert_eq!(written.applied, users.len() as u32);
    let parts: Vec<u32> = written.shards.iter().map(|s| s.shard).collect();
    assert_eq!(parts, (0..TEST_SHARDS).collect::<Vec<_>>(), "one result per shard, in shard order");

    let map = client.shard_map().await.expect("shard map");
    for user in &users {
        let got = client.get_profile(user, &[], Consistency::Linearizable).await.expect("read");
        let info = got.read_info.expect("read info");
        assert_eq!(info.shard, shard_of(user, TEST_SHARDS), "{user}");
        assert_eq!(
            info.node_id, map.shard_replicas[info.shard as usize].leader_id,
            "{user}: read on the leader"
        );
        let page = got.profile.expect("profile").families["browse"].attrs["page"].value.clone();
        assert_eq!(page, Some(Value::string("routed")), "{user}");
        assert_eq!(located_shard(&cluster.node(1).endpoint(), user), info.shard, "{user}");
    }

    let batch = client.batch_get_profiles(&users, &[], Consistency::Linearizable).await.expect("batch read");
    let order: Vec<&str> = batch.profiles.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(order, users.iter().map(String::as_str).collect::<Vec<_>>(), "request order");
    assert!(batch.profiles.iter().all(|p| p.found));
}

/// Each node's view of shard 0's leader (0: none).
async fn leaders_seen(cluster: &Cluster) -> Vec<u64> {
    let mut seen = Vec::new();
    for id in 1..=3 {
        let status = cluster.client(id).await.without_routing().cluster_status().await.expect("status");
        seen.push(status.shard_status.iter().find(|s| s.shard == 0).map_or(0, |s| s.leader_id));
    }
    seen
}

/// A node forwards a part to the leader it knows; that node no longer
/// leads and redirects. Nothing was proposed, so the part goes on to the
/// new leader: a write whose events have no event_id (which neither the
/// client nor the node may resend once it may have been proposed)
/// succeeds, and each event is applied once.
#[tokio::test]
async fn a_part_redirected_by_a_former_leader_goes_on_to_the_new_one() {
    let cluster = Cluster::start_sharded_with_config(3, 1, "max_moves = 0\n").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let old = loop {
        let seen = leaders_seen(&cluster).await;
        if seen[0] != 0 && seen.iter().all(|&l| l == seen[0]) {
            break seen[0];
        }
        assert!(std::time::Instant::now() < deadline, "no agreed leader: {seen:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let new = old % 3 + 1;
    let stale = new % 3 + 1;
    // `stale` hears nothing of the transfer: it keeps forwarding to `old`.
    cluster.partition(&[stale], &[old, new]).await;
    cluster.client(old).await.transfer_leader_of(new, Some(0)).await.expect("transfer");
    let seen = leaders_seen(&cluster).await;
    assert_eq!(seen[(stale - 1) as usize], old, "node {stale} still follows node {old}: {seen:?}");
    assert_eq!(seen[(new - 1) as usize], new, "{seen:?}");

    let users: Vec<String> = (0..5).map(|i| format!("redirected-{i}")).collect();
    let events = users.iter().map(|u| workload::visit(u, "", "redirected")).collect();
    let via = cluster.client(stale).await.without_routing();
    let written = via.write(events).await.unwrap_or_else(|e| panic!("write via node {stale}: {e}"));
    assert_eq!(written.applied, 5);

    cluster.heal().await;
    let client = cluster.client(new).await;
    for user in &users {
        let got = client.get_profile(user, &[], Consistency::Linearizable).await.expect("read");
        let count = got.profile.and_then(|p| p.features.get("browse_7d").cloned()).and_then(|v| v.kind);
        assert!(
            matches!(count, Some(Kind::NumberValue(n)) if n == 1.0),
            "{user}: one view applied: {count:?}"
        );
    }
}

/// A write sent to a follower is forwarded to its shard's leader; when it
/// returns, a LOCAL read from that follower sees it (api.md: "a read from
/// that node right after sees the write"), each of many times.
#[tokio::test]
async fn a_write_forwarded_by_a_follower_is_visible_there_when_it_returns() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    let follower = if leader == 2 { 3 } else { 2 };
    let via = cluster.client(follower).await.without_routing();
    for i in 0..40 {
        let user = format!("user-{i}");
        let written = via.write(vec![visit(&user, "forwarded")]).await.expect("write");
        assert_eq!(written.applied, 1, "{written:?}");
        let got = via.get_profile(&user, &[], Consistency::Local).await.expect("local read");
        assert_eq!(got.read_info.as_ref().map(|r| r.node_id), Some(follower), "read where it was written");
        let page =
            got.profile.and_then(|p| p.families.get("browse").and_then(|f| f.attrs.get("page").cloned()));
        assert_eq!(
            page.and_then(|a| a.value),
            Some(Value::string("forwarded")),
            "write {i} not visible on node {follower}"
        );
    }
}

/// Two nodes, replication 1: each hosts some of the shards. An empty
/// `BatchGetProfiles` reads no user, so it is answered from a shard the
/// node hosts, not from shard 0 wherever it is: it still answers, on its
/// own node, while the node holding shard 0 is down.
#[tokio::test]
async fn an_empty_batch_is_answered_by_the_node_asked_while_shard_0_is_down() {
    let mut cluster = Cluster::start_sharded_with_config(2, TEST_SHARDS, "replication = 1\n").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let holder = loop {
        let placed = placement(&statuses(&cluster, &[1, 2]).await);
        let settled = placed.len() == TEST_SHARDS as usize
            && placed.values().all(|(nodes, leader)| nodes.len() == 1 && leader.is_some());
        let hosts = |id| placed.values().any(|(nodes, _)| nodes.contains(&id));
        if settled && hosts(1) && hosts(2) {
            break *placed[&0].0.first().expect("shard 0's node");
        }
        assert!(Instant::now() < deadline, "shards not spread over both nodes: {placed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let other = 3 - holder;
    cluster.kill(holder);
    let client = cluster.client(other).await.without_routing();
    for consistency in [Consistency::Local, Consistency::Linearizable] {
        let read = client.batch_get_profiles(&[], &[], consistency).await.expect("an empty batch");
        assert!(read.profiles.is_empty(), "{read:?}");
        let info = read.read_info.expect("read info");
        assert_eq!(info.node_id, other, "{consistency:?}: answered where asked: {info:?}");
        assert_ne!(info.shard, 0, "{consistency:?}: a shard node {other} hosts: {info:?}");
    }
}

#[tokio::test]
async fn calls_in_flight_to_a_node_killed_are_retried_not_failed_as_a_lost_connection() {
    let mut cluster = Cluster::start_sharded_with_config(3, TEST_SHARDS, "max_moves = 0\n").await;
    let client = cluster.client(1).await;
    // Node 2 leads shards 1 to 3: most calls go straight to it.
    for shard in 1..TEST_SHARDS {
        client.transfer_leader_of(2, Some(shard)).await.expect("transfer");
    }
    let writers = OneEventWriters::start(&client, 8, |w, i| {
        visit(&format!("user-{w}-{}", i % 16), &format!("w{w}-{i}"))
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.kill(2);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, failed) = writers.stop().await;
    // A call cut off by the kill is sent again (its events have ids); one
    // may still fail while a shard elects a leader (UNAVAILABLE after the
    // retry budget), never as the lost connection itself.
    for e in &failed {
        let portrait_client::ClientError::Rpc(status) = e else { panic!("{e}") };
        assert_eq!(status.code(), tonic::Code::Unavailable, "{e}");
    }
    let after = client.write(vec![visit("user-after", "after")]).await.expect("writes go on");
    assert_eq!(after.applied, 1);
}

#[tokio::test]
async fn a_client_whose_seed_node_dies_goes_on_through_the_nodes_its_map_names() {
    let mut cluster = Cluster::start_sharded_with_config(3, TEST_SHARDS, "max_moves = 0\n").await;
    // Created with node 1's address only; node 1 leads every shard.
    let client = cluster.client(1).await;
    for shard in 0..TEST_SHARDS {
        client.transfer_leader_of(1, Some(shard)).await.expect("transfer");
    }
    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    let first = client.write(users.iter().map(|u| visit(u, "before")).collect()).await.expect("write");
    assert_eq!(first.applied, users.len() as u32);
    cluster.kill(1);
    // Each call's retries leave the dead seed for the nodes the map names
    // (before, they went back to the seed until the retry budget ran out).
    let written = client.write(users.iter().map(|u| visit(u, "after")).collect()).await.expect("write");
    // Parts an attempt cut short committed are duplicates in the next.
    assert_eq!(written.applied + written.duplicates, users.len() as u32, "{written:?}");
    for user in &users {
        for consistency in [Consistency::Local, Consistency::Linearizable] {
            let got = client.get_profile(user, &[], consistency).await.expect("read");
            let info = got.read_info.expect("read info");
            assert_ne!(info.node_id, 1, "{user}, {consistency:?}: served by a live node");
            let page = got.profile.expect("profile").families["browse"].attrs["page"].value.clone();
            // A LOCAL read may come from a replica a little behind.
            if consistency == Consistency::Linearizable {
                assert_eq!(page, Some(Value::string("after")), "{user}");
            }
        }
    }
    let map = client.shard_map().await.expect("the shard map from a live node");
    assert!(map.shard_replicas.iter().all(|s| s.leader_id != 1), "new leaders: {map:?}");
}
