//! Leadership transfer (`Admin.TransferLeader`) on real `portraitd`
//! processes: under a continuous write load, to a chosen follower and back,
//! with no acknowledged write lost and none hanging; a write without event
//! ids that waited out a transfer goes on to the new leader; and its errors.

use portrait_client::code_name;
use portrait_cluster_tests::workload::{OneEventWriters, Workload};
use portrait_cluster_tests::Cluster;

const ALL: [u64; 3] = [1, 2, 3];

#[tokio::test]
async fn leadership_moves_to_a_chosen_follower_and_back_under_load_losing_no_write() {
    let cluster = Cluster::start(3).await;
    let first = cluster.wait_leader(&ALL).await;
    let target = if first == 3 { 2 } else { 3 };
    let bystander = ALL.into_iter().find(|&id| id != first && id != target).unwrap();
    let load = Workload::start(ALL.iter().map(|&id| cluster.node(id).endpoint()).collect());
    load.wait_acked_over(20).await;

    // Asked through a node that is neither: it redirects to the leader.
    let r = cluster.client(bystander).await.transfer_leader(target).await.expect("transfer");
    assert_eq!(r.leader_id, target);
    assert_eq!(r.leader_addr, cluster.node(target).endpoint());
    cluster.wait_agreed_leader(&ALL, target).await;
    load.wait_acked_over(load.acked()).await;

    // And straight back, through the new leader.
    let r = cluster.client(target).await.transfer_leader(first).await.expect("transfer back");
    assert_eq!(r.leader_id, first);
    cluster.wait_agreed_leader(&ALL, first).await;
    load.wait_acked_over(load.acked()).await;

    let outcome = load.stop().await;
    assert_eq!(outcome.hung, 0, "writes hung during the transfers");
    outcome.assert_served_by(&cluster, &ALL, "").await;
}

#[tokio::test]
async fn transfer_to_a_non_voter_fails_naming_it_and_to_the_leader_is_a_no_op() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&ALL).await;
    let learner = cluster.spawn_node().await;
    let client = cluster.client(leader).await;
    client
        .add_node(learner, &cluster.node(learner).endpoint(), &cluster.node(learner).advertised(), true)
        .await
        .expect("add a learner");

    let e = client.transfer_leader(7).await.expect_err("node 7 is not a member");
    assert_eq!(e.code().map(code_name), Some("INVALID_ARGUMENT"), "{e}");
    assert!(e.to_string().contains("node_id: node 7 is not a member"), "{e}");

    let e = client.transfer_leader(learner).await.expect_err("a learner cannot lead");
    assert_eq!(e.code().map(code_name), Some("FAILED_PRECONDITION"), "{e}");
    assert!(e.to_string().contains(&format!("node_id: node {learner} is a learner")), "{e}");

    let r = client.transfer_leader(leader).await.expect("to the leader itself");
    assert_eq!(r.leader_id, leader);
    cluster.wait_agreed_leader(&ALL, leader).await;
}

/// Writes without event ids (never resent by the client) sent to a leader
/// while it hands its shard over: a write that waited at the transfer's
/// gate goes on to the new leader rather than fail with NOT_LEADER (a
/// caller could not resend it, and parts of other shards may have applied).
#[tokio::test]
async fn a_write_waiting_out_a_transfer_goes_on_to_the_new_leader() {
    let cluster = Cluster::start(3).await;
    let first = cluster.wait_leader(&ALL).await;
    let target = if first == 3 { 2 } else { 3 };
    let client = cluster.client(first).await.without_routing();
    let writers = OneEventWriters::start(&client, 6, |w, i| {
        let mut event = portrait_cluster_tests::workload::visit(&format!("u{w}-{}", i % 8), "", "p");
        event.event_id.clear();
        event
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for to in [target, first, target] {
        cluster.client(first).await.transfer_leader(to).await.expect("transfer");
        cluster.wait_agreed_leader(&ALL, to).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let (acked, failed) = writers.stop().await;
    assert!(acked > 0);
    assert!(failed.is_empty(), "{failed:?}");
}
