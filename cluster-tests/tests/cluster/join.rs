//! `portraitd --join`: nodes that add themselves to a cluster on first
//! start (through the leader, or through a follower that redirects to it),
//! replicate, and do not join again when they restart with their data.

use std::collections::BTreeSet;
use std::time::Duration;

use portrait_cluster_tests::workload::{order, served};
use portrait_cluster_tests::{free_port, portraitd, Cluster};
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

#[tokio::test]
async fn a_node_joining_with_an_id_in_use_is_refused_and_told_what_to_do() {
    let cluster = Cluster::start(3).await;
    // A new process claims node 2's id, at addresses of its own.
    let dir = tempfile::tempdir().unwrap();
    let (port, peer_port) = (free_port(), free_port());
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(portraitd())
        .args(["--node-id", "2", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--peer-listen", &format!("127.0.0.1:{peer_port}"), "--join", &cluster.node(1).advertised()])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("PORTRAIT_CONFIG")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("the cluster refused to add this node")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no refusal logged:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(refusal.contains("ERROR"), "{refusal}");
    let what = format!("node 2 is in the cluster at {}", cluster.node(2).endpoint());
    assert!(refusal.contains(&what), "{refusal}");
    assert!(refusal.contains("remove it and add it again with a new id"), "{refusal}");

    // Nothing changed: node 2 is where it was.
    let status = cluster.client(1).await.cluster_status().await.unwrap();
    let members: Vec<(u64, &str)> =
        status.members.iter().map(|m| (m.node_id, m.peer_addr.as_str())).collect();
    let (one, two, three) =
        (cluster.node(1).advertised(), cluster.node(2).advertised(), cluster.node(3).advertised());
    assert_eq!(members, [(1, one.as_str()), (2, two.as_str()), (3, three.as_str())]);
}

/// Node `via`'s meta group members (voters and learners).
async fn members(cluster: &Cluster, via: u64) -> BTreeSet<u64> {
    let s = cluster.client(via).await.cluster_status().await.expect("status");
    s.members.iter().map(|m| m.node_id).collect()
}

/// A node removed half-way through its join (a learner of the meta group
/// that cannot catch up: it drops every raft message from the others) is
/// not added back by its own join loop, which asks every few seconds: its
/// id is retired (apply rules version 6), the AddNode under way and the
/// loop are told so and the loop stops, and an AddNode of the id is
/// refused naming why.
#[tokio::test]
async fn a_node_removed_half_way_through_its_join_is_not_added_back_by_its_join_loop() {
    let mut cluster = Cluster::start(3).await;
    // The others drop their raft messages to node 4 before it starts
    // asking: it becomes a learner of the meta group that never catches up.
    for id in [1, 2, 3] {
        cluster.client(id).await.set_partition(vec![4]).await.expect("cut node 4 off");
    }
    let four = cluster.spawn_joining(&[1]).await;
    assert_eq!(four, 4);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !members(&cluster, 1).await.contains(&four) {
        assert!(Instant::now() < deadline, "node {four} never became a meta learner");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let map = cluster.client(1).await.shard_map().await.expect("map");
    assert!(map.nodes.iter().all(|n| n.node_id != four), "half-joined: not in the map {:?}", map.nodes);

    cluster.client(1).await.remove_node(four).await.expect("remove the half-joined node");
    // Reachable again: a join loop asking on would now complete the join.
    cluster.heal().await;
    // Its join loop asks again within its backoff (at most 10 s); watched
    // for longer than that.
    let watch_until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < watch_until {
        let now = members(&cluster, 1).await;
        assert!(!now.contains(&four), "node {four} is back in the meta group: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = cluster.node(four).log();
    assert!(log.contains("this node was removed from the cluster; not asking to join again"), "{log}");
    assert!(
        log.contains(&format!("node {four} was removed from the cluster, and a removed id is never")),
        "{log}"
    );
    let (addr, peer_addr) = (cluster.node(four).endpoint(), cluster.node(four).advertised());
    let refused =
        cluster.client(2).await.add_node(four, &addr, &peer_addr, false).await.expect_err("retired");
    assert_eq!(refused.code().map(portrait_client::code_name), Some("FAILED_PRECONDITION"), "{refused}");
    let text = refused.to_string();
    assert!(text.contains(&format!("node_id: node {four} was removed from the cluster")), "{text}");
    assert_eq!(members(&cluster, 2).await, BTreeSet::from([1, 2, 3]));
}

/// Node `via`'s `replaced_peers`, once it is `want` (at most 30 s).
async fn wait_replaced(cluster: &Cluster, via: u64, want: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster.client(via).await.cluster_status().await.unwrap();
        if s.replaced_peers == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {via} reports {:?} replaced, not {want:?}",
            s.replaced_peers
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_node_restarted_under_its_id_on_an_empty_data_dir_takes_no_part_in_raft() {
    let config = "replica_dead_after = \"3s\"\n";
    let mut cluster = Cluster::start_sharded_with_config(3, 2, config).await;
    replicated(&cluster, 1, &[2, 3]).await;
    let before = cluster.client(3).await.cluster_status().await.unwrap();
    assert_ne!(before.incarnation, 0);

    // Its disk is lost: it comes back under its id with nothing, having
    // forgotten every vote it gave.
    cluster.kill(3);
    std::fs::remove_dir_all(cluster.node(3).data_dir()).unwrap();
    cluster.restart(3).await;
    let after = cluster.client(3).await.cluster_status().await.unwrap();
    assert_ne!(after.incarnation, before.incarnation);
    wait_replaced(&cluster, 1, &[3]).await;
    wait_replaced(&cluster, 2, &[3]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.node(3).log().contains("refused raft messages: node 3 runs on a data dir") {
        assert!(
            Instant::now() < deadline,
            "node 3 took its peers' raft messages:\n{}",
            cluster.node(3).log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Nodes 1 and 2 go on without it; it neither votes nor replicates.
    replicated(&cluster, 2, &[1, 2]).await;
    let s = cluster.client(3).await.cluster_status().await.unwrap();
    assert!(s.members.is_empty(), "{:?}", s.members);
    assert!(s.shard_status.iter().all(|g| g.term == 0 && g.last_log_index == 0), "{:?}", s.shard_status);
    assert_eq!(s.meta_voters, Vec::<u64>::new());

    // Adding it back under its id is refused, saying why.
    let e = cluster
        .client(1)
        .await
        .add_node(3, &cluster.node(3).endpoint(), &cluster.node(3).advertised(), false)
        .await
        .expect_err("the same id on a new data dir");
    assert!(e.to_string().contains("runs on a data dir"), "{e}");

    // Silent to raft past replica_dead_after, it is drained like a dead
    // node, although it still answers its status (which counts for
    // nothing); removed, it is no one's peer any more.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.client(1).await.replicas_on(3).await.expect("shard map") > 0 {
        assert!(Instant::now() < deadline, "node 3 was not drained:\n{}", cluster.node(1).log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.client(1).await.remove_node(3).await.expect("remove node 3");
    wait_replaced(&cluster, 1, &[]).await;
    replicated(&cluster, 3, &[1, 2]).await;
}
