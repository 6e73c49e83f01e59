//! Node removal and a minority partition, on real
//! `portraitd` processes (partitions through the raft transport's fault
//! injection filter; no root needed).

use std::time::Duration;

use portrait_client::json::now_ms;
use portrait_client::{ClientError, Consistency, Event, Value};
use portrait_cluster_tests::replicas::drain;
use portrait_cluster_tests::workload::history_ids;
use portrait_cluster_tests::Cluster;

fn view(user: &str, id: &str) -> Event {
    Event {
        user_id: user.into(),
        family: "browse".into(),
        r#type: "view".into(),
        event_time_ms: now_ms(),
        event_id: id.into(),
        attrs: [("category".to_string(), Value::string("phone"))].into(),
    }
}

#[tokio::test]
async fn a_removed_node_leaves_the_membership() {
    let cluster = Cluster::start(3).await;
    let client = cluster.client(1).await;
    // It holds a replica: refused, saying what to do.
    let refused = client.remove_node(3).await.expect_err("node 3 holds a replica");
    assert_eq!(refused.code().map(portrait_client::code_name), Some("FAILED_PRECONDITION"), "{refused}");
    assert!(refused.to_string().contains("drain it first (cluster drain 3)"), "{refused}");
    drain(&client, 3).await;
    let again = client.drain_node(3).await.expect_err("already draining");
    assert!(again.to_string().contains("node 3 is already draining"), "{again}");
    let r = client.remove_node(3).await.unwrap();
    assert_eq!(r.members.iter().map(|m| m.node_id).collect::<Vec<_>>(), [1, 2]);
    let w = client.write(vec![view("u1", "two-voters")]).await.unwrap();
    assert_eq!(w.applied, 1, "a 2-voter cluster still commits");
    match client.remove_node(7).await {
        Err(e @ ClientError::Rpc(_)) => {
            assert_eq!(e.code().map(portrait_client::code_name), Some("NOT_FOUND"))
        }
        other => panic!("{other:?}"),
    }
    let unknown = client.drain_node(7).await.expect_err("no node 7");
    assert_eq!(unknown.code().map(portrait_client::code_name), Some("NOT_FOUND"), "{unknown}");
}

#[tokio::test]
async fn an_isolated_minority_cannot_acknowledge_and_converges_after_heal() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    let majority: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    // Isolate the current leader: it is the minority.
    cluster.partition(&[leader], &majority).await;
    let new_leader = cluster.wait_leader(&majority).await;

    // The isolated node cannot commit: its write fails with a retryable
    // UNAVAILABLE (after the 5 s write timeout), never acks, never hangs.
    let isolated = cluster.client(leader).await;
    let attempt =
        tokio::time::timeout(Duration::from_secs(15), isolated.write(vec![view("u9", "minority")])).await;
    match attempt {
        Ok(Err(e)) => assert_eq!(e.code().map(portrait_client::code_name), Some("UNAVAILABLE"), "{e}"),
        other => panic!("a minority write must fail with UNAVAILABLE, got {other:?}"),
    }

    // The majority keeps serving writes.
    let w = cluster.client(new_leader).await.write(vec![view("u9", "majority")]).await.unwrap();
    assert_eq!(w.applied, 1);

    cluster.heal().await;
    cluster.wait_applied(leader, w.log_index).await;
    for id in 1..=3 {
        let ids = history_ids(&cluster.client(id).await, "u9", "browse", Consistency::Local).await;
        assert!(ids.contains(&"majority".to_string()), "node {id}: {ids:?}");
        // If the minority's write was ever committed later it would be on every
        // node; it must be all or none, never split.
        let everywhere =
            history_ids(&cluster.client(new_leader).await, "u9", "browse", Consistency::Local).await;
        assert_eq!(ids, everywhere, "node {id} differs from the leader");
    }
}
