//! Routing by shard against in-process fake nodes that serve a shard map:
//! two nodes, two shards, each led by one of them.

use crate::fake;

use fake::{bare_event, event, shard_map, user_of_shard, Fake, Node};
use portrait_client::portrait_proto::v1::ShardMapResponse;
use portrait_client::{Consistency, PortraitClient};

/// Nodes 1 and 2, both serving a map (epoch 1) in which node 1 leads shard
/// 0 and node 2 shard 1, and a client connected to node 1.
async fn two_nodes() -> (Node, Node, PortraitClient) {
    two_nodes_with(portrait_client::ConnectOptions::new()).await
}

/// [`two_nodes`], the client connected with `options`.
async fn two_nodes_with(options: portrait_client::ConnectOptions) -> (Node, Node, PortraitClient) {
    let a = Node::start(Fake { id: 1, ..Default::default() }).await;
    let b = Node::start(Fake { id: 2, ..Default::default() }).await;
    set_leaders(&[&a, &b], 1, &[1, 2]);
    let client = PortraitClient::connect_with(&a.url(), options).await.unwrap();
    (a, b, client)
}

/// [`two_nodes_with`] a client whose calls have `deadline`, after one
/// write to a user of shard 1 that node 2 (its leader) served; the user.
async fn two_nodes_after_a_write(deadline: std::time::Duration) -> (Node, Node, PortraitClient, String) {
    let (a, b, client) = two_nodes_with(portrait_client::ConnectOptions::new().deadline(deadline)).await;
    let u = user(1, 0);
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(b.fake.users(), vec![u.clone()]);
    (a, b, client, u)
}

fn set_leaders(nodes: &[&Node], epoch: u64, leaders: &[u64]) {
    let addrs: Vec<(u64, String)> = nodes.iter().map(|n| (n.fake.id, n.url())).collect();
    let addrs: Vec<(u64, &str)> = addrs.iter().map(|(id, a)| (*id, a.as_str())).collect();
    for node in nodes {
        node.fake.set_map(shard_map(epoch, &addrs, leaders));
    }
}

/// The `skip`-th user of `shard` (of 2).
fn user(shard: u32, skip: usize) -> String {
    user_of_shard(shard, 2, skip)
}

#[tokio::test]
async fn a_write_goes_whole_to_the_leader_of_its_busiest_shard() {
    let (a, b, client) = two_nodes().await;
    // Two events of shard 1 (led by node 2), one of shard 0: node 2 gets
    // the whole request (it validates it whole and forwards shard 0's part).
    let users = [user(1, 0), user(0, 0), user(1, 1)];
    let response = client.write(users.iter().map(|u| event(u)).collect()).await.unwrap();
    assert_eq!(b.fake.users(), users);
    assert!(a.fake.users().is_empty(), "{:?}", a.fake.users());
    assert_eq!(response.applied, 3);
    assert_eq!(a.fake.map_calls(), 1, "the map is fetched once, from the connected node");
}

#[tokio::test]
async fn local_reads_stay_on_the_connected_node_and_linearizable_ones_go_to_the_leader() {
    let (a, b, client) = two_nodes().await;
    let u = user(1, 0);
    let local = client.get_profile(&u, &[], Consistency::Local).await.unwrap();
    assert_eq!(local.read_info.unwrap().node_id, 1, "node 1 hosts shard 1 too");
    let linearizable = client.get_profile(&u, &[], Consistency::Linearizable).await.unwrap();
    assert_eq!(linearizable.read_info.unwrap().node_id, 2, "node 2 leads shard 1");

    let ids = [user(1, 1), "u-x".to_string(), user(0, 0), user(1, 2)];
    let response = client.batch_get_profiles(&ids, &[], Consistency::Linearizable).await.unwrap();
    let order: Vec<_> = response.profiles.iter().map(|p| p.user_id.clone()).collect();
    assert_eq!(order, ids, "request order");
    let on_b: Vec<_> = ids.iter().filter(|u| portrait_client::shard_of(u, 2) == 1).cloned().collect();
    assert_eq!(b.fake.users()[1..], on_b[..], "one call for node 2's users");
    assert_eq!(a.fake.users().len(), 1 + ids.len() - on_b.len());
}

#[tokio::test]
async fn a_cluster_created_anew_at_the_same_addresses_is_routed_by_its_own_map() {
    let a = Node::start(Fake { id: 1, ..Default::default() }).await;
    let b = Node::start(Fake { id: 2, ..Default::default() }).await;
    set_leaders(&[&a, &b], 40, &[1, 2]);
    let client = PortraitClient::connect(&a.url()).await.unwrap();
    let u = user(1, 0);
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(b.fake.users(), vec![u.clone()]);

    // The cluster is created anew at the same addresses: another id, its
    // epochs from 1 again, node 1 leading both shards.
    let addrs = [(1, a.url()), (2, b.url())];
    let addrs: Vec<(u64, &str)> = addrs.iter().map(|(id, url)| (*id, url.as_str())).collect();
    for node in [&a, &b] {
        node.fake.set_map(ShardMapResponse { cluster_id: 0xb, ..shard_map(2, &addrs, &[1, 1]) });
    }
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(b.fake.users().len(), 2, "the cached map still names node 2");
    // Node 2's answer named the new cluster: its map is taken although its
    // epoch (2) is below the cached one (40).
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(a.fake.map_calls(), 2);
    assert_eq!(a.fake.users(), vec![u.clone()], "routed by the new cluster's map");
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!((a.fake.users().len(), b.fake.users().len(), a.fake.map_calls()), (2, 2, 2));
}

#[tokio::test]
async fn a_newer_epoch_in_an_answer_refreshes_the_map() {
    let (a, b, client) = two_nodes().await;
    let u = user(1, 0);
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(b.fake.users(), vec![u.clone()]);

    // Node 1 now leads both shards, in a map of epoch 2.
    set_leaders(&[&a, &b], 2, &[1, 1]);
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(b.fake.users().len(), 2, "the cached map still names node 2");
    assert_eq!(a.fake.map_calls(), 1);

    // Node 2's answer carried epoch 2: the next call fetches the map first.
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(a.fake.map_calls(), 2);
    assert_eq!(a.fake.users(), vec![u.clone()]);
}

#[tokio::test]
async fn a_slow_map_refresh_holds_up_one_call_not_all() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let (a, b, client) = two_nodes().await;
    let u = user(1, 0);
    client.write(vec![event(&u)]).await.unwrap();
    // The connected node now holds map calls until the test lets them go;
    // node 2's next answer carries a newer epoch, so the map is due.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    *a.fake.map_gate.lock().unwrap() = Some(gate.clone());
    set_leaders(&[&a, &b], 2, &[1, 2]);
    client.write(vec![event(&u)]).await.unwrap();
    let refreshing = {
        let client = client.clone();
        let u = u.clone();
        tokio::spawn(async move { client.write(vec![event(&u)]).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.fake.map_arrivals.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the refresh never asked node 1");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The refresh is held: this call routes by the cached map meanwhile.
    tokio::time::timeout(Duration::from_secs(10), client.write(vec![event(&u)]))
        .await
        .expect("not held up by the refresh")
        .unwrap();
    assert!(!refreshing.is_finished(), "the first call is still fetching the map");
    assert_eq!(b.fake.users().len(), 3);
    gate.add_permits(8);
    tokio::time::timeout(Duration::from_secs(10), refreshing).await.unwrap().unwrap().unwrap();
    assert_eq!(a.fake.map_calls(), 2, "one refresh");
    assert_eq!(b.fake.users().len(), 4);
}

/// A call whose deadline passes while it refreshes the map (the connected
/// node is silent to map calls) does not take the refresh with it: the
/// refresh goes on, asks the next node, and records its map, instead of
/// each next call starting it again and being cut short in turn.
#[tokio::test]
async fn a_map_refresh_outlives_the_call_whose_deadline_cut_it_short() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let (a, b, client, u) = two_nodes_after_a_write(Duration::from_millis(300)).await;

    // Node 1 now holds map calls (past the fetch's 2 s for one node) and,
    // in a map of epoch 2, leads both shards; node 2's next answer
    // carries that epoch, so the map is due.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    *a.fake.map_gate.lock().unwrap() = Some(gate.clone());
    set_leaders(&[&a, &b], 2, &[1, 1]);
    client.write(vec![event(&u)]).await.unwrap();
    let cut = client.write(vec![event(&u)]).await.unwrap_err();
    assert_eq!(cut.code(), Some(tonic::Code::DeadlineExceeded), "{cut}");

    // The refresh asks node 2 once node 1's 2 s are up, and takes its map.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.fake.users().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the map was never refreshed");
        let _ = client.write(vec![event(&u)]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.fake.map_arrivals.load(Ordering::SeqCst), 2, "node 1 was asked once more, not once a call");
    assert_eq!(b.fake.map_calls(), 1, "node 2 gave the new map");
    gate.add_permits(8);
}

/// A node the map names that does not answer within the call's deadline
/// (a host gone silent, a stalled process) is routed past for a while:
/// the next calls go through the connected node, which forwards, instead
/// of each waiting there until its deadline passes.
#[tokio::test]
async fn a_node_that_lets_a_call_s_deadline_pass_is_routed_past_for_a_while() {
    use std::time::Duration;
    let (a, b, client, u) = two_nodes_after_a_write(Duration::from_millis(500)).await;

    *b.fake.stall.lock().unwrap() = Some(Duration::from_secs(30));
    let cut = client.write(vec![event(&u)]).await.unwrap_err();
    assert_eq!(cut.code(), Some(tonic::Code::DeadlineExceeded), "{cut}");
    assert_eq!(b.fake.authorizations().len(), 2, "node 2 received it");
    for read in 0..3 {
        let profile = client.get_profile(&u, &[], Consistency::Linearizable).await;
        assert_eq!(profile.unwrap().read_info.unwrap().node_id, 1, "read {read}: through node 1");
    }
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(a.fake.users().len(), 4, "the reads and the write went to node 1");
    assert_eq!(b.fake.authorizations().len(), 2, "node 2 was not asked again");
    assert!(a.fake.map_calls() >= 2, "the map was fetched again");

    // Once the while is over, calls go to it again.
    *b.fake.stall.lock().unwrap() = None;
    tokio::time::sleep(portrait_client::routing::ROUTE_PAST_FOR).await;
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(b.fake.users().len(), 2, "node 2 took this write");
}

/// A call the caller drops itself (its own timeout, well inside the
/// client's deadline) says nothing of the node it was at: the next call
/// goes there again.
#[tokio::test]
async fn a_call_the_caller_drops_before_the_client_s_deadline_does_not_route_past_its_node() {
    use std::time::Duration;
    let (a, b, client, u) = two_nodes_after_a_write(Duration::from_secs(20)).await;

    *b.fake.stall.lock().unwrap() = Some(Duration::from_secs(30));
    let dropped = tokio::time::timeout(Duration::from_millis(300), client.write(vec![event(&u)])).await;
    assert!(dropped.is_err(), "the caller's own timeout ended it: {dropped:?}");
    assert_eq!(b.fake.authorizations().len(), 2, "node 2 received it");
    *b.fake.stall.lock().unwrap() = None;
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(b.fake.users().len(), 2, "node 2 took the next write");
    assert_eq!(a.fake.users().len(), 0, "nothing went through node 1");
}

#[tokio::test]
async fn a_failing_node_is_bypassed_and_the_map_fetched_again() {
    let (a, b, client) = two_nodes().await;
    b.fake.unavailable.store(1, std::sync::atomic::Ordering::SeqCst);
    let u = user(1, 0);
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!((b.fake.calls(), b.fake.users().len()), (1, 0), "node 2 refused");
    assert_eq!(a.fake.users(), vec![u.clone()], "served through the connected node");

    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!(a.fake.map_calls(), 2);
    assert_eq!(b.fake.users(), [u]);
}

#[tokio::test]
async fn a_connection_lost_mid_call_is_retried_elsewhere_unless_a_resend_could_apply_twice() {
    let (a, b, client) = two_nodes().await;
    b.fake.lost.store(1, std::sync::atomic::Ordering::SeqCst);
    let u = user(1, 0);
    client.write(vec![event(&u)]).await.unwrap();
    assert_eq!((b.fake.calls(), b.fake.users().len()), (1, 0), "node 2's connection was lost");
    assert_eq!(a.fake.users(), vec![u.clone()], "sent again through the connected node");

    // Node 2 is routed past for a while: the next write goes through the
    // connected node. An event without an id is not sent again: the first
    // attempt may have been applied.
    a.fake.lost.store(1, std::sync::atomic::Ordering::SeqCst);
    let err = client.write(vec![bare_event(&u)]).await.unwrap_err().to_string();
    assert!(
        err.contains("the connection was lost: the outcome is unknown") && err.contains("not retried"),
        "{err}"
    );
    assert_eq!((a.fake.calls(), b.fake.calls()), (2, 1), "the second write went to node 1, once");
    assert_eq!(a.fake.users(), vec![u], "and was not resent");
}

#[tokio::test]
async fn an_invalid_event_is_named_by_its_position_in_the_request() {
    let (_a, _b, client) = two_nodes().await;
    let empty_shard = portrait_client::shard_of("", 2);
    let events = vec![event(&user(empty_shard, 0)), event(&user(1 - empty_shard, 0)), event("")];
    let err = client.write(events).await.unwrap_err();
    assert_eq!(err.to_string(), "INVALID_ARGUMENT: events[2].user_id: must not be empty");
}

#[tokio::test]
async fn the_token_goes_with_every_call_to_every_node() {
    let a = Node::start(Fake { id: 1, ..Default::default() }).await;
    let b = Node::start(Fake { id: 2, ..Default::default() }).await;
    set_leaders(&[&a, &b], 1, &[1, 2]);
    let options = portrait_client::ConnectOptions::new().token("t0k3n").unwrap();
    let client = PortraitClient::connect_with(&a.url(), options).await.unwrap();
    client.write(vec![event(&user(1, 0))]).await.unwrap(); // map from node 1, write to node 2
    client.get_profile(&user(0, 0), &[], Consistency::Linearizable).await.unwrap();
    let other = client.connect_like(&b.url()).await.unwrap().without_routing();
    other.cluster_status().await.unwrap();
    let (seen_a, seen_b) = (a.fake.authorizations(), b.fake.authorizations());
    assert_eq!(seen_a.len(), 2, "map and read on node 1: {seen_a:?}");
    assert_eq!(seen_b.len(), 2, "write and status on node 2: {seen_b:?}");
    assert!(seen_a.iter().chain(&seen_b).all(|h| h == "Bearer t0k3n"), "{seen_a:?} {seen_b:?}");

    let plain = PortraitClient::connect(&b.url()).await.unwrap().without_routing();
    plain.cluster_status().await.unwrap();
    assert_eq!(b.fake.authorizations().last().unwrap(), "", "no token, no header");
}

#[tokio::test]
async fn a_write_stream_whose_connection_is_lost_names_the_node_and_moves_on() {
    let (a, b, client) = two_nodes().await;
    client.shard_map().await.expect("the map: both nodes known");
    a.fake.lost.store(1, std::sync::atomic::Ordering::SeqCst);
    let batches = || {
        futures::stream::iter(
            (0..2).map(|i| portrait_client::WriteRequest { events: vec![event(&user(0, i))] }),
        )
    };
    let err = client.write_stream(batches()).await.unwrap_err().to_string();
    assert!(err.contains(&a.url()), "names the node: {err}");
    assert!(err.contains("the connection was lost: the outcome is unknown"), "{err}");
    // The next call starts at the other node.
    client.write_stream(batches()).await.expect("sent to node 2");
    assert_eq!((a.fake.users().len(), b.fake.users().len()), (0, 2));
}

#[tokio::test]
async fn a_write_stream_to_a_node_that_is_gone_moves_on_for_the_next_call() {
    let (a, b, client) = two_nodes().await;
    client.shard_map().await.expect("the map: both nodes known");
    let b_fake = b.fake.clone();
    let url = a.url();
    a.stop().await;
    let batches =
        || futures::stream::iter([portrait_client::WriteRequest { events: vec![event(&user(0, 0))] }]);
    let err = client.write_stream(batches()).await.unwrap_err().to_string();
    assert!(err.contains(&url), "names the node: {err}");
    client.write_stream(batches()).await.expect("the next call goes to node 2");
    assert_eq!(b_fake.users().len(), 1);
}

/// `node_statuses` names each node that gives no status by its own error
/// (one that answers UNAVAILABLE throughout, one that is gone), within
/// its wait, rather than as silent.
#[tokio::test]
async fn node_statuses_report_each_node_that_gives_none_by_its_own_error() {
    let a = Node::start(Fake { id: 1, ..Default::default() }).await;
    let b = Node::start(Fake { id: 2, unavailable: u32::MAX.into(), ..Default::default() }).await;
    let c = Node::start(Fake { id: 3, ..Default::default() }).await;
    set_leaders(&[&a, &b, &c], 1, &[1, 3]);
    let client = PortraitClient::connect(&a.url()).await.unwrap();
    let map = client.shard_map().await.unwrap();
    let gone = c.url();
    c.stop().await;
    let started = std::time::Instant::now();
    let statuses = client.node_statuses(&map).await;
    assert!(started.elapsed() < portrait_client::STATUS_TIMEOUT, "{:?}", started.elapsed());
    assert_eq!(statuses[&1].as_ref().map(|s| s.node_id), Ok(1));
    let unavailable = statuses[&2].as_ref().unwrap_err();
    assert!(unavailable.contains("UNAVAILABLE") && unavailable.contains("no leader"), "{unavailable}");
    let refused = statuses[&3].as_ref().unwrap_err();
    assert!(!refused.contains("no answer within"), "{refused}");
    assert!(refused.contains(&gone), "names the address it could not reach: {refused}");
}
