//! Node removal and a minority partition, on real
//! `portraitd` processes (partitions through the raft transport's fault
//! injection filter; no root needed).

use std::time::{Duration, Instant};

use portrait_client::json::now_ms;
use portrait_client::{ClientError, Consistency, Event, Value};
use portrait_cluster_tests::replicas::{drain, placement, statuses, transfer};
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

    // Node 3 is still running (a stale process): a raft message that claims
    // to come from it is refused once the removal is applied here, naming
    // why (without TLS, a guard against mistakes).
    use portrait_client::portrait_proto::v1::{raft_client::RaftClient, StartElectionRequest};
    let mut raft = RaftClient::connect(cluster.node(1).peer_endpoint()).await.expect("node 1's peer port");
    let claim = || StartElectionRequest { leader_id: 3, term: 1, last_log_index: 0, dry_run: true, group: 0 };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match raft.start_election(claim()).await {
            Err(status) if status.code() == tonic::Code::PermissionDenied => break status,
            other => assert!(Instant::now() < deadline, "node 3's message still taken: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.message().contains(portrait_core::meta::RETIRED_ID), "{status:?}");
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
    // Sent once: a retry could reach the majority's leader.
    let once = portrait_client::ConnectOptions::new().retry_for(Duration::ZERO);
    let isolated = portrait_client::PortraitClient::connect_with(&cluster.node(leader).endpoint(), once)
        .await
        .expect("connect");
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

/// The map moves a drained node's replica at once; the shard's raft group
/// lets the old one go only once the new one has caught up. Until then the
/// node still votes, and removing it could take the shard's quorum with
/// it (RF 2 here: the shard could commit nothing, not even the move).
#[tokio::test]
async fn a_drained_node_is_not_removed_while_its_shard_still_counts_its_vote() {
    let all = [1, 2, 3, 4];
    let cluster = Cluster::start_placed(4, 1, 2).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (voters, leader, meta_leader) = loop {
        let now = statuses(&cluster, &all).await;
        let meta_leader = now.values().map(|s| s.meta_leader_id).find(|&l| l != 0);
        if let (Some((voters, Some(leader))), Some(meta)) = (placement(&now).get(&0), meta_leader) {
            if voters.len() == 2 {
                break (voters.clone(), *leader, meta);
            }
        }
        assert!(Instant::now() < deadline, "shard 0 not placed on 2 nodes: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // `a` leads the shard and not the meta group (cutting its messages
    // below must not cut the meta group's); `b` is drained.
    let a = match leader == meta_leader {
        false => leader,
        true => {
            let other = *voters.iter().find(|&&n| n != leader).unwrap();
            transfer(cluster.client(leader).await, 0, other).await;
            other
        }
    };
    let b = *voters.iter().find(|&&n| n != a).unwrap();
    let client = cluster.client(a).await;
    let events: Vec<Event> = (0..20).map(|i| view(&format!("u{i}"), &format!("before-{i}"))).collect();
    assert_eq!(client.write(events).await.unwrap().applied, 20);

    // `a` sends nothing to the nodes that could take b's replica: the new
    // replica never catches up.
    let takers: Vec<u64> = all.iter().copied().filter(|n| *n != a && *n != b).collect();
    // (Fault injection goes to the node a client is connected to, which a
    // redirect moves: a fresh client of node a each time.)
    cluster.client(a).await.set_partition(takers).await.unwrap();
    client.drain_node(b).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.shard_map().await.unwrap().shard_replicas[0].replicas.iter().any(|r| r.node_id == b) {
        assert!(Instant::now() < deadline, "the map still places shard 0 on node {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(client.replicas_on(b).await.unwrap(), 1, "shard 0's leader still has node {b} as a voter");
    let refused = client.remove_node(b).await.expect_err("node b still votes");
    assert_eq!(refused.code().map(portrait_client::code_name), Some("FAILED_PRECONDITION"), "{refused}");
    let why = format!("node {b} is still in the raft membership of shards [0]");
    assert!(refused.to_string().contains(&why), "{refused}");

    // Healed, the move completes, and then the node goes.
    cluster.client(a).await.set_partition(Vec::new()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.replicas_on(b).await.unwrap() > 0 {
        if Instant::now() > deadline {
            let map = client.shard_map().await.unwrap();
            panic!("node {b} still holds a replica: {map:?}\n{:#?}", statuses(&cluster, &all).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = client.remove_node(b).await.expect("remove the drained node");
    assert!(!r.members.iter().any(|m| m.node_id == b), "{:?}", r.members);
    for i in 0..20 {
        let ids = history_ids(&client, &format!("u{i}"), "browse", Consistency::Linearizable).await;
        assert_eq!(ids, [format!("before-{i}")], "u{i}");
    }
}

/// AddNode adds a node under its own id only: not 0, not at another
/// member's addresses, and not a process that answers as another node.
/// Two ids on one process would give one machine two of a shard's votes.
#[tokio::test]
async fn a_node_is_added_only_under_its_own_id_and_addresses() {
    let mut cluster = Cluster::start(3).await;
    let spare = cluster.spawn_node().await;
    let client = cluster.client(1).await;
    let code = |e: &ClientError| e.code().map(portrait_client::code_name);
    let (three, three_peer) = (cluster.node(3).endpoint(), cluster.node(3).advertised());

    let e =
        client.add_node(0, &cluster.node(spare).endpoint(), &cluster.node(spare).advertised(), false).await;
    let e = e.expect_err("node id 0");
    assert_eq!(code(&e), Some("INVALID_ARGUMENT"), "{e}");
    assert!(e.to_string().contains("node_id: must be at least 1"), "{e}");

    let e = client.add_node(9, &three, &three_peer, false).await.expect_err("node 3's addresses");
    assert_eq!(code(&e), Some("INVALID_ARGUMENT"), "{e}");
    assert!(e.to_string().contains(&format!("addr: {three} is node 3's address")), "{e}");

    // The spare process is node `spare`: added as another id, refused.
    let (addr, peer) = (cluster.node(spare).endpoint(), cluster.node(spare).advertised());
    let e = client.add_node(spare + 1, &addr, &peer, false).await.expect_err("another id");
    assert_eq!(code(&e), Some("FAILED_PRECONDITION"), "{e}");
    let why = format!("the node answering at {peer} is node {spare}, not node {}", spare + 1);
    assert!(e.to_string().contains(&why), "{e}");

    // Nothing changed; under its own id it is added.
    let r = client.add_node(spare, &addr, &peer, false).await.expect("its own id");
    assert_eq!(r.members.iter().map(|m| m.node_id).collect::<Vec<_>>(), [1, 2, 3, spare]);

    // A node started without --no-bootstrap created a cluster of its own:
    // its shard groups would take writes this cluster never sees. Refused,
    // and nothing changed.
    let own = cluster.spawn_node_of_its_own_cluster().await;
    let (addr, peer) = (cluster.node(own).endpoint(), cluster.node(own).advertised());
    let e = client.add_node(own, &addr, &peer, false).await.expect_err("another cluster's node");
    assert_eq!(code(&e), Some("FAILED_PRECONDITION"), "{e}");
    assert!(e.to_string().contains(&format!("node {own} at {peer} belongs to another cluster")), "{e}");
    assert!(e.to_string().contains("--no-bootstrap"), "{e}");
    let members = client.cluster_status().await.unwrap().members;
    assert_eq!(members.iter().map(|m| m.node_id).collect::<Vec<_>>(), [1, 2, 3, spare]);
    cluster.kill(own);

    // With two of the meta group's four voters gone, adding another node
    // cannot commit: refused within the write timeout (5 s), not after
    // the 120 s a node is given to catch up, while holding the meta
    // group's proposal gate (which a leadership transfer waits for).
    let late = cluster.spawn_node().await;
    cluster.kill(2);
    cluster.kill(3);
    let (addr, peer) = (cluster.node(late).endpoint(), cluster.node(late).advertised());
    let started = Instant::now();
    let e = client.add_node(late, &addr, &peer, false).await.expect_err("no quorum");
    assert_eq!(code(&e), Some("UNAVAILABLE"), "{e}");
    assert!(e.to_string().contains("was not committed within 5000 ms"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(20), "refused after {:?}", started.elapsed());
}
