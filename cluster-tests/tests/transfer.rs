//! Leadership transfer (`Admin.TransferLeader`) on real `portraitd`
//! processes: under a continuous write load, to a chosen follower and back,
//! with no acknowledged write lost and none hanging; and its errors.

use portrait_client::code_name;
use portrait_cluster_tests::workload::Workload;
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
