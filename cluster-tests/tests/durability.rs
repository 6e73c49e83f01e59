//! Acknowledged writes under membership changes and whole-cluster restarts,
//! with a continuous workload that records every acknowledged write and a
//! full-set comparison afterwards (not a count).

use std::collections::BTreeSet;

use portrait_client::Consistency;
use portrait_cluster_tests::workload::{order, served, Workload};
use portrait_cluster_tests::Cluster;

#[tokio::test]
async fn no_acknowledged_write_is_lost_when_a_node_joins_and_another_leaves_under_load() {
    let mut cluster = Cluster::start(3).await;
    let load = Workload::start(vec![cluster.node(2).endpoint(), cluster.node(3).endpoint()]);

    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let four = cluster.spawn_node().await;
    let admin = cluster.client(2).await;
    admin.add_node(four, &cluster.node(four).endpoint(), false).await.expect("add node 4 under load");
    // Remove node 1, the first leader (unless leadership moved): the
    // cluster commits without it and a remaining node leads.
    let r = admin.remove_node(1).await.expect("remove node 1 under load");
    assert_eq!(r.members.iter().map(|m| m.node_id).collect::<Vec<_>>(), [2, 3, 4]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let outcome = load.stop().await;
    assert!(outcome.acked.len() > 20, "the workload made progress: {}", outcome.acked.len());
    assert_eq!(outcome.hung, 0, "writes hung");
    outcome.assert_served_by(&cluster, &[2, 3, 4], "").await;
}

#[tokio::test]
async fn all_nodes_killed_and_restarted_keep_every_acknowledged_write_and_tag() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client(1).await;
    let mut acked = BTreeSet::new();
    for i in 0..60 {
        client.write(vec![order(i)]).await.unwrap();
        acked.insert(format!("w{i}"));
    }
    let before = client.get_profile("u1", &[], Consistency::Linearizable).await.unwrap().profile.unwrap();
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.restart(id).await;
    }
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    let client = cluster.client(leader).await;
    // A linearizable read waits until the restarted leader has applied the log.
    let after = client.get_profile("u1", &[], Consistency::Linearizable).await.unwrap().profile.unwrap();
    assert_eq!(after.tags.len(), before.tags.len());
    for (name, tag) in &before.tags {
        assert_eq!(after.tags[name].value, tag.value, "tag {name}");
    }
    let last = client.cluster_status().await.unwrap().applied_index;
    for id in 1..=3 {
        cluster.wait_applied(id, last).await;
        assert_eq!(served(&cluster.client(id).await).await, acked, "node {id}");
    }
}

#[tokio::test]
async fn no_acknowledged_write_is_lost_when_the_leader_is_killed_under_load() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    let survivors: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let load = Workload::start(survivors.iter().map(|&id| cluster.node(id).endpoint()).collect());

    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let before_kill = load.acked();
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(&survivors).await;
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let outcome = load.stop().await;

    assert!(
        before_kill > 0 && outcome.acked.len() > before_kill,
        "writes before ({before_kill}) and after ({}) the kill",
        outcome.acked.len()
    );
    outcome.assert_served_by(&cluster, &survivors, &format!(" (leader now: {new_leader})")).await;
}
