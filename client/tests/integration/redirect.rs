//! Leader redirect and retry against in-process fake nodes.

use crate::fake;

use std::time::{Duration, Instant};

use fake::{bare_event, event, Fake, Node};
use portrait_client::{ClientError, Consistency, PortraitClient, WriteRequest};
use tonic::Code;

fn follower(id: u64, leader: &str) -> Fake {
    let fake = Fake { id, ..Default::default() };
    fake.set_hint(Some(leader));
    fake
}

#[tokio::test]
async fn write_follows_the_leader_hint_and_remembers_it() {
    let leader = Node::start(Fake { id: 2, ..Default::default() }).await;
    // The hint may omit the scheme.
    let follower = Node::start(follower(1, &leader.addr)).await;
    let client = PortraitClient::connect(&follower.addr).await.unwrap();

    let response = client.write(vec![event("u1"), event("u2")]).await.unwrap();
    assert_eq!((response.applied, response.log_index), (2, 2));
    assert_eq!(client.endpoint(), leader.url());

    // Later calls, from clones too, go straight to the leader.
    client.clone().write(vec![event("u3")]).await.unwrap();
    assert_eq!(follower.fake.calls(), 1);
    assert_eq!(leader.fake.calls(), 2);
}

/// Calls about the node the client was created for go to that node, also
/// once an earlier call moved the client to a leader.
#[tokio::test]
async fn a_call_about_the_connected_node_is_not_sent_to_the_leader_learned_since() {
    let leader = Node::start(Fake { id: 2, ..Default::default() }).await;
    let follower = Node::start(follower(1, &leader.addr)).await;
    let client = PortraitClient::connect(&follower.addr).await.unwrap();
    client.write(vec![event("u1")]).await.unwrap();
    assert_eq!(client.endpoint(), leader.url());
    // Asked for its leader, the node the client was created for refuses
    // with a hint: returned at once, not followed.
    let started = Instant::now();
    let e = client.cluster_status().await.unwrap_err();
    assert!(e.to_string().contains("node 1 is not the leader"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    follower.fake.set_hint(None);
    assert_eq!(client.cluster_status().await.unwrap().node_id, 1);
    // A bare UNAVAILABLE is retried there too.
    follower.fake.unavailable.store(2, std::sync::atomic::Ordering::SeqCst);
    let calls = follower.fake.calls();
    assert_eq!(client.cluster_status().await.unwrap().node_id, 1);
    assert_eq!(follower.fake.calls(), calls + 3);
    assert_eq!(leader.fake.calls(), 1, "only the write went to the leader");
}

#[tokio::test]
async fn bare_unavailable_is_retried_with_backoff() {
    let node = Node::start(Fake { id: 1, unavailable: 2.into(), ..Default::default() }).await;
    let client = PortraitClient::connect(&node.url()).await.unwrap();
    let status = client.cluster_status().await.unwrap();
    assert_eq!(status.node_id, 1);
    assert_eq!(node.fake.calls(), 3);
}

#[tokio::test]
async fn unavailable_gives_up_after_the_retry_budget() {
    let node = Node::start(Fake { id: 1, unavailable: u32::MAX.into(), ..Default::default() }).await;
    let client = PortraitClient::connect(&node.addr).await.unwrap();
    let started = Instant::now();
    let err = client.write(vec![event("u1")]).await.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert_eq!(err.to_string(), "UNAVAILABLE: no leader");
    let budget = portrait_client::retry::RETRY_BUDGET;
    assert!(
        elapsed >= budget - Duration::from_secs(1) && elapsed <= budget + Duration::from_secs(1),
        "{elapsed:?}"
    );
    // A budget of the caller's: 1 s.
    let options = portrait_client::ConnectOptions::new().retry_for(Duration::from_secs(1));
    let client = PortraitClient::connect_with(&node.addr, options).await.unwrap();
    let started = Instant::now();
    let err = client.write(vec![event("u1")]).await.unwrap_err();
    assert_eq!(err.to_string(), "UNAVAILABLE: no leader");
    assert!(started.elapsed() <= Duration::from_secs(2), "{:?}", started.elapsed());
}

/// With a deadline, a write or read fails with DEADLINE_EXCEEDED once it
/// has passed, whether the node is slow to answer or keeps refusing (the
/// retry budget, 8 s, would go on); without one, the slow answer comes.
#[tokio::test]
async fn a_call_with_a_deadline_fails_once_it_has_passed() {
    let node = Node::start(Fake { id: 1, ..Default::default() }).await;
    *node.fake.stall.lock().unwrap() = Some(Duration::from_secs(2));
    let options = portrait_client::ConnectOptions::new().deadline(Duration::from_millis(300));
    let client = PortraitClient::connect_with(&node.addr, options).await.unwrap();
    let users = ["u1".to_string()];
    let timed = |started: Instant, e: ClientError| {
        let took = started.elapsed();
        assert_eq!(e.code(), Some(Code::DeadlineExceeded), "{e}");
        assert!(e.to_string().contains("deadline of 300 ms"), "{e}");
        assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "{took:?}");
        e.to_string()
    };
    let started = Instant::now();
    let e = timed(started, client.write(vec![event("u1")]).await.unwrap_err());
    assert!(e.contains("same event_ids"), "{e}");
    let started = Instant::now();
    let e = timed(started, client.write(vec![bare_event("u1")]).await.unwrap_err());
    assert!(e.contains("could apply twice") && !e.contains("same event_ids"), "{e}");
    let started = Instant::now();
    timed(started, client.get_profile("u1", &[], Consistency::Local).await.unwrap_err());
    let started = Instant::now();
    timed(started, client.batch_get_profiles(&users, &[], Consistency::Local).await.unwrap_err());
    // A node that keeps refusing: the deadline ends the retries.
    *node.fake.stall.lock().unwrap() = None;
    node.fake.unavailable.store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
    let started = Instant::now();
    timed(started, client.write(vec![event("u1")]).await.unwrap_err());
    // No deadline: the slow answer is waited for.
    node.fake.unavailable.store(0, std::sync::atomic::Ordering::SeqCst);
    *node.fake.stall.lock().unwrap() = Some(Duration::from_millis(700));
    let patient = PortraitClient::connect(&node.addr).await.unwrap();
    patient.write(vec![event("u1")]).await.expect("answered after 700 ms");
    // With a deadline the answer makes: served.
    *node.fake.stall.lock().unwrap() = Some(Duration::from_millis(50));
    client.batch_get_profiles(&users, &[], Consistency::Local).await.expect("within the deadline");
}

#[tokio::test]
async fn a_leader_between_terms_is_waited_for_while_a_follower_keeps_naming_it() {
    // The seed names node 1, which answers a bare UNAVAILABLE four times
    // (an election): each backoff round is redirected again, and only the
    // retry budget would end the call.
    let a = Node::start(Fake { id: 1, unavailable: 4.into(), ..Default::default() }).await;
    let b = Node::start(follower(2, &a.url())).await;
    let client = PortraitClient::connect(&b.url()).await.unwrap();
    client.write(vec![event("u1")]).await.expect("served once node 1 leads again");
    assert_eq!(a.fake.calls(), 5, "four refusals, then the write");
}

#[tokio::test]
async fn a_write_with_an_event_without_an_id_is_sent_once_and_its_failure_says_why() {
    // Refused once with a bare UNAVAILABLE: a retry would be served, but
    // it could apply the event twice.
    let node = Node::start(Fake { id: 1, unavailable: 1.into(), ..Default::default() }).await;
    let client = PortraitClient::connect(&node.url()).await.unwrap();
    let err = client.write(vec![event("u1"), bare_event("u2")]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert!(err.to_string().contains("not retried: the batch has events without an event_id"), "{err}");
    assert_eq!(node.fake.calls(), 1);
    client.write(vec![bare_event("u2")]).await.expect("the caller's own retry");
    assert_eq!(node.fake.calls(), 2);

    // A leader it names is not followed by this call, but by the next.
    let leader = Node::start(Fake { id: 2, ..Default::default() }).await;
    let follower = Node::start(follower(3, &leader.url())).await;
    let client = PortraitClient::connect(&follower.url()).await.unwrap();
    client.write(vec![bare_event("u1")]).await.unwrap_err();
    assert_eq!((follower.fake.calls(), leader.fake.calls()), (1, 0));
    client.write(vec![bare_event("u1")]).await.expect("sent to the leader named before");
    assert_eq!((follower.fake.calls(), leader.fake.calls()), (1, 1));
    // With ids, the same write follows the redirect at once.
    let client = PortraitClient::connect(&follower.url()).await.unwrap();
    client.write(vec![event("u1")]).await.unwrap();
    assert_eq!((follower.fake.calls(), leader.fake.calls()), (2, 2));
}

#[tokio::test]
async fn a_loop_of_redirects_backs_off_until_the_budget_ends_it() {
    let a = Node::start(Fake { id: 1, ..Default::default() }).await;
    let b = Node::start(follower(2, &a.url())).await;
    a.fake.set_hint(Some(&b.url()));
    // Nodes naming each other (a new leader taking over): three redirects
    // in a row, then a pause, then three more, until the retry budget.
    let options = portrait_client::ConnectOptions::new().retry_for(Duration::from_millis(600));
    let client = PortraitClient::connect_with(&a.url(), options).await.unwrap();
    let started = Instant::now();
    let err = client.write(vec![event("u1")]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
    let calls = a.fake.calls() + b.fake.calls();
    assert!(calls >= 8, "went on after the first three redirects: {calls} calls");
    assert!(calls < 100, "each round of redirects is followed by a pause: {calls} calls");
    assert!(started.elapsed() < Duration::from_secs(5), "the budget ends it: {:?}", started.elapsed());
    a.fake.set_hint(None);
    client.write(vec![event("u1")]).await.expect("answered once a node leads");
}

#[tokio::test]
async fn other_errors_are_returned_at_once() {
    let node = Node::start(Fake { id: 1, ..Default::default() }).await;
    let client = PortraitClient::connect(&node.url()).await.unwrap();
    let err = client.write(vec![event("u1"), event("")]).await.unwrap_err();
    assert_eq!(err.to_string(), "INVALID_ARGUMENT: events[1].user_id: must not be empty");
    assert_eq!(node.fake.calls(), 1);
}

#[tokio::test]
async fn dead_leader_falls_back_to_the_seed() {
    let old_leader = Node::start(Fake { id: 2, ..Default::default() }).await;
    let new_leader = Node::start(Fake { id: 3, ..Default::default() }).await;
    let seed = Node::start(follower(1, &old_leader.url())).await;
    let client = PortraitClient::connect(&seed.url()).await.unwrap();
    client.write(vec![event("u1")]).await.unwrap();
    assert_eq!(client.endpoint(), old_leader.url());

    old_leader.stop().await;
    seed.fake.set_hint(Some(&new_leader.url()));
    let response = client.write(vec![event("u2")]).await.unwrap();
    assert_eq!(response.log_index, 3);
    assert_eq!(client.endpoint(), new_leader.url());
}

/// A call that fails in transport (the node is gone) names the node: the
/// transport's own message ("tcp connect error") does not.
#[tokio::test]
async fn a_transport_failure_names_the_node() {
    let node = Node::start(Fake { id: 1, ..Default::default() }).await;
    let url = node.url();
    let options = portrait_client::ConnectOptions::new().retry_for(Duration::from_millis(300));
    let client = PortraitClient::connect_with(&url, options).await.unwrap();
    node.stop().await;
    let e = client.cluster_status().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
    assert!(e.to_string().starts_with(&format!("UNAVAILABLE: {url}: ")), "{e}");
    let e = client.write(vec![event("u1")]).await.unwrap_err();
    assert!(e.to_string().contains(&format!("{url}: ")), "{e}");
    let e = client.write(vec![bare_event("u1")]).await.unwrap_err();
    assert!(e.to_string().contains(&format!("{url}: ")), "{e}");
}

#[tokio::test]
async fn write_stream_is_not_retried_but_learns_the_leader() {
    let leader = Node::start(Fake { id: 2, ..Default::default() }).await;
    let follower = Node::start(follower(1, &leader.url())).await;
    let client = PortraitClient::connect(&follower.url()).await.unwrap();
    let batches =
        || futures::stream::iter((0..3).map(|i| WriteRequest { events: vec![event(&format!("u{i}"))] }));

    let err = client.write_stream(batches()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert_eq!(client.endpoint(), leader.url());

    let response = client.write_stream(batches()).await.unwrap();
    assert_eq!((response.applied, response.batches, response.log_index), (3, 3, 2));
}

#[tokio::test]
async fn connect_fails_with_the_endpoint_named() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let endpoint = closed.to_string();
    match PortraitClient::connect(&endpoint).await {
        Err(err @ ClientError::Connect { .. }) => {
            assert_eq!(err.to_string(), format!("cannot connect to http://{endpoint}"));
        }
        Err(other) => panic!("expected a connect error, got {other}"),
        Ok(_) => panic!("connected to a closed port"),
    }
}

#[tokio::test]
async fn reads_follow_redirects_too() {
    let leader = Node::start(Fake { id: 2, ..Default::default() }).await;
    let follower = Node::start(follower(1, &leader.url())).await;
    let client = PortraitClient::connect(&follower.url()).await.unwrap();
    let ids = ["u1".to_string(), "u2".to_string()];
    let response = client.batch_get_profiles(&ids, &[], Consistency::Linearizable).await.unwrap();
    let found: Vec<bool> = response.profiles.iter().map(|p| p.found).collect();
    assert_eq!(found, [true, false]);
    let response = client.get_profile("u1", &["browse".into()], Consistency::Local).await.unwrap();
    assert_eq!(response.read_info.unwrap().node_id, 2);
}

#[tokio::test]
async fn a_call_to_a_node_that_went_silent_fails_instead_of_hanging() {
    // Accepts connections and never answers (a node that lost power
    // after the TCP handshake, as far as the client can tell).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let client = PortraitClient::connect(&format!("http://{addr}")).await.unwrap();
    let started = Instant::now();
    let limit = portrait_client::PING_INTERVAL + portrait_client::PING_TIMEOUT + Duration::from_secs(10);
    let answer = tokio::time::timeout(limit, client.cluster_status()).await;
    let err = answer.expect("the unanswered ping ends the call").unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(started.elapsed() >= portrait_client::PING_INTERVAL, "{:?}", started.elapsed());
}
