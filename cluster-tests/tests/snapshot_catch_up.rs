//! A node that was down while the log was compacted catches up by snapshot
//! install and converges to the same profiles, features and tags.

use portrait_client::json::now_ms;
use portrait_client::{Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::Cluster;

/// Snapshots every 40 entries, keeping 5 entries behind: a node that misses
/// a few hundred entries can only catch up by snapshot.
const CONFIG: &str = "[raft]\nsnapshot_every_entries = 40\nkeep_logs_after_snapshot = 5\n";

/// A comparable digest of one user's logical state: families, features and
/// tags as canonical JSON (sorted keys).
async fn digest(client: &PortraitClient, user: &str) -> String {
    match client.get_profile(user, &[], Consistency::Local).await {
        Ok(r) => portrait_client::json::profile_to_json(&r.profile.unwrap_or_default()).to_string(),
        Err(e) => format!("error {e}"),
    }
}

#[tokio::test]
async fn a_lagging_node_catches_up_by_snapshot() {
    let mut cluster = Cluster::start_with_config(3, Some(CONFIG)).await;
    let client = cluster.client(1).await;
    client.write(vec![event(0)]).await.unwrap();
    cluster.kill(3);

    let mut last = 0;
    for i in 1..300 {
        last = client.write(vec![event(i)]).await.expect("write with one node down").log_index;
    }
    let status = client.cluster_status().await.unwrap();
    assert!(status.purged_index > 1, "the log was compacted past what node 3 has: {status:?}");

    cluster.restart(3).await;
    cluster.wait_applied(3, last).await;
    let (a, c) = (cluster.client(1).await, cluster.client(3).await);
    for u in 0..25 {
        let user = format!("u{u}");
        assert_eq!(digest(&c, &user).await, digest(&a, &user).await, "{user}");
    }
    let s3 = c.cluster_status().await.unwrap();
    assert!(s3.snapshot_index > 1, "node 3 installed a snapshot: {s3:?}");
    // And keeps applying new writes after the install.
    let r = client.write(vec![event(1000)]).await.unwrap();
    cluster.wait_applied(3, r.log_index).await;
    assert_eq!(digest(&c, "u0").await, digest(&a, "u0").await);
}

fn event(i: i64) -> Event {
    let kind = if i % 3 == 0 { "order" } else { "view" };
    let family = if kind == "order" { "trade" } else { "browse" };
    Event {
        user_id: format!("u{}", i % 25),
        family: family.into(),
        r#type: kind.into(),
        event_time_ms: now_ms() - (i % 50) * 3_600_000,
        event_id: format!("e{i}"),
        attrs: [
            ("category".to_string(), Value::string(["phone", "tv", "books"][(i % 3) as usize])),
            ("amount".to_string(), Value::int(i * 7 % 900)),
        ]
        .into(),
    }
}
