//! Replication and failover on real `portraitd` processes.

use std::collections::BTreeMap;

use portrait_client::json::now_ms;
use portrait_client::{Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::workload::history_ids;
use portrait_cluster_tests::Cluster;

fn order(user: &str, id: &str, amount: i64) -> Event {
    Event {
        user_id: user.into(),
        family: "trade".into(),
        r#type: "order".into(),
        event_time_ms: now_ms(),
        event_id: id.into(),
        attrs: [("amount".to_string(), Value::int(amount))].into(),
    }
}

#[tokio::test]
async fn writes_on_any_node_are_replicated_to_every_node() {
    let cluster = Cluster::start(3).await;
    let status = cluster.client(1).await.cluster_status().await.unwrap();
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3, "{status:?}");

    // A write sent to a follower is redirected to the leader by the client.
    let follower = cluster.client(3).await;
    let r = follower.write(vec![order("u1", "o1", 10)]).await.unwrap();
    assert_eq!(r.applied, 1);
    // Linearizable read on the leader sees it at once.
    let leader = cluster.client(1).await;
    assert_eq!(history_ids(&leader, "u1", "trade", Consistency::Linearizable).await, ["o1"]);
    // Every node serves it locally once applied.
    for id in 1..=3 {
        cluster.wait_applied(id, r.log_index).await;
        let local = PortraitClient::connect(&cluster.node(id).endpoint()).await.unwrap();
        assert_eq!(history_ids(&local, "u1", "trade", Consistency::Local).await, ["o1"], "node {id}");
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_a_leader_kill() {
    let mut cluster = Cluster::start(3).await;
    let mut acked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let client = cluster.client(2).await;
    for i in 0..20 {
        let user = format!("u{}", i % 4);
        let id = format!("before-{i}");
        client.write(vec![order(&user, &id, i)]).await.unwrap();
        acked.entry(user).or_default().push(id);
    }
    let old_leader = cluster.wait_leader(&[1, 2, 3]).await;
    cluster.kill(old_leader);
    let survivors: Vec<u64> = (1..=3).filter(|&id| id != old_leader).collect();
    let new_leader = cluster.wait_leader(&survivors).await;
    assert_ne!(new_leader, old_leader);

    // Writes resume through a surviving node.
    let client = cluster.client(survivors[0]).await;
    let mut last_index = 0;
    for i in 0..20 {
        let user = format!("u{}", i % 4);
        let id = format!("after-{i}");
        let r = client.write(vec![order(&user, &id, i)]).await.expect("write after failover");
        last_index = r.log_index;
        acked.entry(user).or_default().push(id);
    }
    for &id in &survivors {
        cluster.wait_applied(id, last_index).await;
        let local = cluster.client(id).await;
        for (user, ids) in &acked {
            let mut expected = ids.clone();
            expected.sort();
            assert_eq!(
                history_ids(&local, user, "trade", Consistency::Local).await,
                expected,
                "node {id}, {user}"
            );
        }
    }

    // The killed node restarts from disk and catches up.
    cluster.restart(old_leader).await;
    cluster.wait_applied(old_leader, last_index).await;
    let local = cluster.client(old_leader).await;
    for (user, ids) in &acked {
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(
            history_ids(&local, user, "trade", Consistency::Local).await,
            expected,
            "restarted node {old_leader}, {user}"
        );
    }
}
