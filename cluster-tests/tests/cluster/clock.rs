//! The clock guard (docs/operations.md, "Clocks"): a node whose wall clock
//! jumps a year ahead, as a leader or as a single node, never moves the
//! replicated time: nothing within its TTL is lost, tags do not flip, and
//! new events are applied once the clock is right (or confirmed).

use std::time::{Duration, Instant};

use portrait_client::json::now_ms;
use portrait_client::{code_name, ClientError, Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::Cluster;

const YEAR_MS: i64 = 365 * 86_400_000;

fn browse(user: &str, id: &str) -> Event {
    Event {
        user_id: user.into(),
        family: "browse".into(),
        r#type: "view".into(),
        event_time_ms: now_ms() - 60_000,
        event_id: id.into(),
        attrs: [("category".to_string(), Value::string("phone"))].into(),
    }
}

fn code(err: &ClientError) -> &'static str {
    err.code().map(code_name).unwrap_or("transport")
}

/// `browse_7d` and every tag of `user`, as `client`'s node serves them.
async fn features_and_tags(client: &PortraitClient, user: &str) -> (String, Vec<(String, String)>) {
    let p = client.get_profile(user, &[], Consistency::Local).await.unwrap().profile.unwrap();
    let browse_7d = format!("{:?}", p.features.get("browse_7d"));
    let mut tags: Vec<_> = p.tags.iter().map(|(k, t)| (k.clone(), format!("{:?}", t.value))).collect();
    tags.sort();
    (browse_7d, tags)
}

/// Writes `events` until one attempt is acknowledged (within `within`).
async fn write_until_acked(client: &PortraitClient, events: Vec<Event>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match client.write(events.clone()).await {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < deadline, "never acknowledged: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_leader_whose_clock_jumps_a_year_ahead_stops_leading_and_moves_no_time() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    let client = cluster.client(leader).await;
    let events: Vec<Event> = (0..3).map(|i| browse("u1", &format!("b{i}"))).collect();
    client.write(events).await.unwrap();
    let before = features_and_tags(&client, "u1").await;
    assert!(before.0.contains("3.0"), "browse_7d {}", before.0);

    cluster.client(leader).await.set_clock_offset(YEAR_MS).await.unwrap();
    // Writes go on through the other nodes: the skewed leader hands over.
    let other = (1..=3).find(|&id| id != leader).unwrap();
    let writer = cluster.client(other).await;
    write_until_acked(&writer, vec![browse("u2", "c1")], Duration::from_secs(30)).await;
    let new_leader = cluster.wait_leader(&[1, 2, 3]).await;
    assert_ne!(new_leader, leader, "the skewed node still leads");
    let status = cluster.client(leader).await.cluster_status().await.unwrap();
    let problem = status.clock.unwrap().problem;
    assert!(problem.contains("off a quorum of its peers"), "{problem}");

    cluster.client(leader).await.set_clock_offset(0).await.unwrap();
    let last = cluster.client(new_leader).await.cluster_status().await.unwrap().applied_index;
    for id in 1..=3 {
        cluster.wait_applied(id, last).await;
        let c = cluster.client(id).await;
        let s = c.cluster_status().await.unwrap();
        assert!(s.logical_clock_ms < now_ms() + 60_000, "node {id}: replicated time moved ahead");
        assert_eq!(features_and_tags(&c, "u1").await, before, "node {id}");
    }
}

#[tokio::test]
async fn a_single_node_restarted_a_year_ahead_refuses_to_stamp_and_loses_nothing() {
    let mut cluster = Cluster::start(1).await;
    let client = cluster.client(1).await;
    client.write((0..3).map(|i| browse("u1", &format!("b{i}"))).collect()).await.unwrap();
    let before = features_and_tags(&client, "u1").await;

    cluster.kill(1);
    let year = YEAR_MS.to_string();
    cluster.restart_with(1, &["--test-clock-offset-ms", &year]).await;
    let client = cluster.client(1).await;
    let err = client.write(vec![browse("u1", "late")]).await.unwrap_err();
    assert_eq!(code(&err), "FAILED_PRECONDITION", "{err}");
    assert!(err.to_string().contains("confirm-clock"), "{err}");
    let s = client.cluster_status().await.unwrap();
    assert!(s.logical_clock_ms < now_ms() + 60_000, "replicated time moved ahead");
    assert!(s.clock.unwrap().problem.contains("jumped"), "status names the jump");

    cluster.kill(1);
    cluster.restart(1).await;
    let client = cluster.client(1).await;
    assert_eq!(features_and_tags(&client, "u1").await, before, "nothing lost, no tag flipped");
    client.write(vec![browse("u1", "b3")]).await.unwrap();
    let (browse_7d, _) = features_and_tags(&client, "u1").await;
    assert!(browse_7d.contains("4.0"), "browse_7d {browse_7d}");

    // The confirm path: a jump the operator accepts.
    client.set_clock_offset(2 * 86_400_000).await.unwrap();
    let err = client.write(vec![browse("u1", "b4")]).await.unwrap_err();
    assert_eq!(code(&err), "FAILED_PRECONDITION", "{err}");
    let confirmed = client.confirm_clock().await.unwrap();
    assert!(confirmed.now_ms - confirmed.reference_ms > 86_400_000);
    client.write(vec![browse("u1", "b4")]).await.unwrap();
    let s = client.cluster_status().await.unwrap();
    assert!(s.logical_clock_ms > now_ms() + 86_400_000, "the confirmed time is the replicated time");
}

/// Event ids of `user`'s `contact` history as node `id` serves it locally
/// (none: NOT_FOUND, the user has nothing live).
async fn contact_history(cluster: &Cluster, id: u64, user: &str) -> Vec<String> {
    let client = cluster.client(id).await.without_routing();
    match client.get_profile(user, &["contact".to_string()], Consistency::Local).await {
        Ok(r) => r
            .profile
            .unwrap_or_default()
            .families
            .get("contact")
            .map_or(Vec::new(), |f| f.history.iter().map(|h| h.event_id.clone()).collect()),
        Err(e) if code(&e) == "NOT_FOUND" => Vec::new(),
        Err(e) => panic!("node {id}: {e}"),
    }
}

/// Expiry on read follows the shard's logical clock when the serving
/// node's wall clock lags it: a value that apply (and the compaction
/// filter) already count as expired is not served by a replica whose clock
/// is a minute behind, so replicas answer alike.
#[tokio::test]
async fn a_replica_whose_clock_lags_does_not_serve_what_its_shard_counts_as_expired() {
    const CONTACT_TTL_MS: i64 = 30 * 86_400_000;
    let cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    let lagging = (1..=3).find(|&id| id != leader).unwrap();
    let client = cluster.client(leader).await;
    // Time enough for the write, the apply and the first read on a loaded
    // machine before it expires.
    let expires = now_ms() + 6_000;
    let sms = Event {
        user_id: "short-lived".into(),
        family: "contact".into(),
        r#type: "sms".into(),
        event_time_ms: expires - CONTACT_TTL_MS,
        event_id: "s1".into(),
        attrs: Default::default(),
    };
    let index = client.write(vec![sms]).await.unwrap().log_index;
    cluster.wait_applied(lagging, index).await;
    cluster.client(lagging).await.set_clock_offset(-60_000).await.unwrap();
    assert_eq!(contact_history(&cluster, lagging, "short-lived").await, ["s1"], "served before it expires");

    // Past the expiry, a write stamps the shard's clock beyond it.
    tokio::time::sleep(Duration::from_millis((expires - now_ms()).max(0) as u64 + 200)).await;
    let index = client.write(vec![browse("someone-else", "o1")]).await.unwrap().log_index;
    for id in [leader, lagging] {
        cluster.wait_applied(id, index).await;
        let ids = contact_history(&cluster, id, "short-lived").await;
        assert_eq!(ids, Vec::<String>::new(), "node {id} serves an expired value");
        let read = cluster.client(id).await.without_routing();
        let other = read.get_profile("someone-else", &[], Consistency::Local).await.unwrap();
        let as_of = other.read_info.map_or(0, |i| i.as_of_ms);
        assert!(as_of >= expires, "node {id} read as of {as_of}, before the expiry {expires}");
    }
}
