//! `portraitd --join`: nodes that add themselves to a cluster on first
//! start (through the leader, or through a follower that redirects to it),
//! replicate, and do not join again when they restart with their data.

use std::collections::BTreeSet;
use std::time::Duration;

use portrait_cluster_tests::workload::{order, served};
use portrait_cluster_tests::Cluster;
use tokio::time::Instant;

/// Waits until node `via` reports exactly `voters` as voters.
async fn wait_voters(cluster: &Cluster, via: u64, voters: &[u64]) {
    let want: BTreeSet<u64> = voters.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster.client(via).await.cluster_status().await.unwrap();
        let now: BTreeSet<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.node_id).collect();
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "voters are {now:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes event `i` through node 1 and waits until `nodes` serve it.
async fn replicated(cluster: &Cluster, i: u64, nodes: &[u64]) {
    let w = cluster.client(1).await.write(vec![order(i)]).await.expect("write");
    for &id in nodes {
        cluster.wait_applied(id, w.log_index).await;
        assert!(served(&cluster.client(id).await).await.contains(&format!("w{i}")), "node {id}");
    }
}

#[tokio::test]
async fn nodes_started_with_join_become_voters_and_do_not_join_again_on_restart() {
    let mut cluster = Cluster::start(1).await;
    let two = cluster.spawn_joining(&[1]).await;
    wait_voters(&cluster, 1, &[1, two]).await;
    // Through node 2, a follower: it redirects the AddNode to the leader.
    let three = cluster.spawn_joining(&[two]).await;
    wait_voters(&cluster, 1, &[1, two, three]).await;
    replicated(&cluster, 1, &[two, three]).await;

    // Its AddNode returns once every shard placed on it has it as a voter.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.node(three).log().contains("joined the cluster as a voter") {
        assert!(Instant::now() < deadline, "node {three} never finished joining");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A restart with the same flags (--join included) finds a voter on disk.
    cluster.kill(three);
    cluster.restart(three).await;
    let log = cluster.node(three).log();
    assert_eq!(log.matches("joined the cluster as a voter").count(), 1, "{log}");
    assert!(log.contains("already a voter of the cluster; not joining"), "{log}");
    wait_voters(&cluster, 1, &[1, two, three]).await;
    replicated(&cluster, 2, &[two, three]).await;
}
