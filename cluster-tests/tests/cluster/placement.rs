//! Five nodes, eight shards, replication factor 3: the meta group's map
//! places each shard on three distinct nodes (the shards' raft groups
//! follow it) and balancing spreads the replicas within one per node, a
//! write or a read through a node that hosts no replica of a user's shard
//! is forwarded to one, and removing a node re-creates its replicas on the
//! others, balanced, losing nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use portrait_client::portrait_proto::v1::ClusterStatusResponse;
use portrait_client::{Consistency, Event, Value};
use portrait_cluster_tests::replicas::drain;
use portrait_cluster_tests::{workload, Cluster};
use portrait_core::shard::shard_of;

const SHARDS: u32 = 8;
const RF: usize = 3;

fn visit(user: &str, page: &str) -> Event {
    workload::visit(user, &format!("{page}-{user}"), page)
}

async fn statuses(cluster: &Cluster, nodes: &[u64]) -> BTreeMap<u64, ClusterStatusResponse> {
    let mut all = BTreeMap::new();
    for &id in nodes {
        all.insert(id, cluster.client(id).await.cluster_status().await.expect("status"));
    }
    all
}

/// Per shard, the nodes (of `nodes`) holding a voting replica of it.
fn voters(all: &BTreeMap<u64, ClusterStatusResponse>) -> BTreeMap<u32, BTreeSet<u64>> {
    let mut by_shard: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for (id, status) in all {
        for s in status.shard_status.iter().filter(|s| s.role == "Leader" || s.role == "Follower") {
            by_shard.entry(s.shard).or_default().insert(*id);
        }
    }
    by_shard
}

/// Waits until every shard has exactly `RF` voting replicas among `nodes`
/// and the nodes hold within one replica of each other (balancing).
async fn wait_placed(cluster: &Cluster, nodes: &[u64]) -> BTreeMap<u32, BTreeSet<u64>> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let placed = voters(&statuses(cluster, nodes).await);
        let load: Vec<usize> =
            nodes.iter().map(|id| placed.values().filter(|n| n.contains(id)).count()).collect();
        let balanced = load.iter().max().unwrap() - load.iter().min().unwrap() <= 1;
        if placed.len() == SHARDS as usize && placed.values().all(|n| n.len() == RF) && balanced {
            return placed;
        }
        assert!(Instant::now() < deadline, "shards not on {RF} of nodes {nodes:?}: {placed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every user's last page, read locally on every replica of its shard.
async fn check_replicas(
    cluster: &Cluster,
    placed: &BTreeMap<u32, BTreeSet<u64>>,
    users: &[String],
    page: &str,
) {
    for user in users {
        let shard = shard_of(user, SHARDS);
        for &id in &placed[&shard] {
            let client = cluster.client(id).await;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                // A replica still catching up (a new one, by snapshot) may
                // not have the user yet: a LOCAL read is allowed to lag.
                let seen = match client.get_profile(user, &[], Consistency::Local).await {
                    Ok(got) => {
                        let info = got.read_info.expect("read info");
                        assert_eq!((info.node_id, info.shard), (id, shard), "served where it lives");
                        got.profile
                            .and_then(|p| p.families.get("browse").and_then(|f| f.attrs.get("page").cloned()))
                    }
                    Err(e) if e.code() == Some(tonic::Code::NotFound) => None,
                    Err(e) => panic!("local read on node {id}: {e}"),
                };
                if seen.and_then(|a| a.value) == Some(Value::string(page)) {
                    break;
                }
                assert!(Instant::now() < deadline, "node {id} never showed {page} for {user}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn shards_live_on_three_of_five_nodes_and_a_removed_node_is_replaced() {
    let mut cluster = Cluster::start_placed(5, SHARDS, RF as u32).await;
    let all = [1, 2, 3, 4, 5];
    let placed = wait_placed(&cluster, &all).await;
    let load: BTreeMap<u64, usize> =
        all.iter().map(|id| (*id, placed.values().filter(|n| n.contains(id)).count())).collect();
    // Nodes join one after the other: nodes 2 and 3 bring every shard to
    // RF 3, then balancing moves replicas to nodes 4 and 5: 24 replicas,
    // 4 or 5 per node.
    assert!(load.values().all(|&l| l == 4 || l == 5), "{load:?} {placed:?}");
    let status = cluster.client(3).await.cluster_status().await.unwrap();
    assert_eq!(status.members.len(), 5, "every node is in the meta group: {status:?}");

    // Through a node that hosts some shards: the other parts are forwarded.
    let users: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    let via = 5;
    let events: Vec<Event> = users.iter().map(|u| visit(u, "first")).collect();
    let written = cluster.client(via).await.write(events).await.expect("write across shards");
    assert_eq!(written.applied, users.len() as u32, "{written:?}");
    assert_eq!(written.shards.len(), SHARDS as usize);
    check_replicas(&cluster, &placed, &users, "first").await;

    // Reads through it without the client's routing: it forwards each
    // shard's part to a node hosting the shard (the leader, for
    // LINEARIZABLE) and gathers them in request order.
    let direct = cluster.client(via).await.without_routing();
    let mut asked: Vec<String> = users.iter().rev().cloned().collect();
    asked.push(users[3].clone());
    let got =
        direct.batch_get_profiles(&asked, &[], Consistency::Linearizable).await.expect("forwarded read");
    let pages: Vec<(String, Option<Value>)> = got
        .profiles
        .iter()
        .map(|p| {
            let page =
                p.families.get("browse").and_then(|f| f.attrs.get("page")).and_then(|a| a.value.clone());
            (p.user_id.clone(), page)
        })
        .collect();
    let want: Vec<(String, Option<Value>)> =
        asked.iter().map(|u| (u.clone(), Some(Value::string("first")))).collect();
    assert_eq!(pages, want, "every user, in request order");
    let info = got.read_info.expect("read info");
    assert!(placed[&info.shard].contains(&info.node_id), "served by a replica of its shard: {info:?}");
    let one = direct.get_profile(&users[1], &[], Consistency::Local).await.expect("forwarded local read");
    let info = one.read_info.expect("read info");
    assert_eq!(info.shard, shard_of(&users[1], SHARDS));
    assert!(placed[&info.shard].contains(&info.node_id), "served by a replica: {info:?}");

    // Node 2 leaves: refused while it holds replicas; drained, its
    // replicas are re-created on the other nodes, then it is removed.
    let admin = cluster.client(3).await;
    let refused = admin.remove_node(2).await.expect_err("node 2 holds replicas");
    assert!(refused.to_string().contains("drain it first"), "{refused}");
    drain(&admin, 2).await;
    let r = admin.remove_node(2).await.expect("remove node 2");
    assert_eq!(r.members.iter().map(|m| m.node_id).collect::<Vec<_>>(), [1, 3, 4, 5]);
    let rest = [1, 3, 4, 5];
    let placed = wait_placed(&cluster, &rest).await;
    let load: Vec<usize> = rest.iter().map(|id| placed.values().filter(|n| n.contains(id)).count()).collect();
    assert_eq!(load, [6, 6, 6, 6], "node 2's replicas went to the others, balanced: {placed:?}");
    let events: Vec<Event> = users.iter().map(|u| visit(u, "second")).collect();
    let written = cluster.client(4).await.write(events).await.expect("write after the removal");
    // The client may have retried a part whose shard had just moved: the
    // retry finds what the first attempt applied as duplicates.
    assert_eq!(written.applied + written.duplicates, users.len() as u32, "{written:?}");
    check_replicas(&cluster, &placed, &users, "second").await;
    // Exactly once: the first events are there once, not applied again.
    let again: Vec<Event> = users.iter().map(|u| visit(u, "first")).collect();
    let dup = cluster.client(5).await.write(again).await.expect("retry of the first write");
    assert_eq!((dup.applied, dup.duplicates), (0, users.len() as u32), "{dup:?}");

    // The removed node drops its replicas (their raft stops, their data is deleted).
    let removed = cluster.client(2).await;
    let started = Instant::now();
    loop {
        let status = removed.cluster_status().await.expect("status of the removed node");
        if status.shard_status.is_empty() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "node 2 still has replicas: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("node 2 dropped its replicas {:?} after its removal", started.elapsed());

    // A node that is down (not drained yet: `replica_dead_after` is 10 min)
    // does not hold AddNode up: the call waits for the new node's replicas
    // of shards short of RF (none here), not for every node's. It waited
    // for every node of the map before, and gave up after 120 s.
    let meta_leader = cluster.client(1).await.cluster_status().await.expect("status").meta_leader_id;
    let down =
        *[3, 4, 5].iter().find(|&&n| n != meta_leader).expect("a node that does not lead the meta group");
    cluster.kill(down);
    let six = cluster.spawn_node().await;
    let admin = cluster.client(1).await;
    let started = Instant::now();
    let (addr, peer_addr) = (cluster.node(six).endpoint(), cluster.node(six).advertised());
    let add = admin.add_node(six, &addr, &peer_addr, false);
    let added = tokio::time::timeout(Duration::from_secs(60), add)
        .await
        .unwrap_or_else(|_| panic!("AddNode still waits with node {down} down"))
        .expect("add node 6 while a node is down");
    assert!(added.members.iter().any(|m| m.node_id == six), "{:?}", added.members);
    println!("node {six} added in {:?} with node {down} down", started.elapsed());
}

/// A cluster whose creation was cut short (node 1 killed between creating
/// the map and creating its shards, its placement pass not yet run, here
/// held by a fault-injection marker) is joined: `AddNode` creates the
/// shards first. Before, the map then had two nodes, the shards were never
/// initialized, and the new nodes' replicas waited for a leader forever.
#[tokio::test]
async fn a_node_joining_a_cluster_whose_creation_was_cut_short_finds_its_shards_created() {
    let cluster = Cluster::start_sharded_with_marker(3, SHARDS, 1, "fault-hold-hosting").await;
    std::fs::remove_file(cluster.node(1).data_dir().join("fault-hold-hosting")).unwrap();
    let all = [1, 2, 3];
    let placed = wait_placed(&cluster, &all).await;
    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    let events: Vec<Event> = users.iter().map(|u| visit(u, "first")).collect();
    let written = cluster.client(2).await.write(events).await.expect("write across shards");
    assert_eq!(written.applied, users.len() as u32, "{written:?}");
    check_replicas(&cluster, &placed, &users, "first").await;
}
