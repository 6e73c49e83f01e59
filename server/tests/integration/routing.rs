//! The map views a node gives clients: `Admin.ShardMap`, `Admin.Locate`
//! and the `x-portrait-map-epoch` header on every answer, on a real node of
//! several shards.

// Not every helper is used here.
#[allow(dead_code)]
use crate::common;

use std::time::Duration;

use common::{TestNode, SHARDS};
use portrait_client::json::now_ms;
use portrait_client::portrait_proto::v1::admin_client::AdminClient;
use portrait_client::portrait_proto::v1::{LocateRequest, ShardMapRequest};
use portrait_client::routing::MAP_EPOCH_HEADER;
use portrait_client::{Consistency, Event, Value};
use portrait_core::limits::MAX_USER_ID_BYTES;
use portrait_core::shard::shard_of;
use tonic::Code;

fn event(user: &str) -> Event {
    Event {
        user_id: user.into(),
        family: "browse".into(),
        r#type: "view".into(),
        event_time_ms: now_ms() - 1_000,
        event_id: format!("e-{user}"),
        attrs: [("page".to_string(), Value::string("home"))].into(),
    }
}

#[tokio::test]
async fn the_map_lists_every_shard_with_its_replicas_leader_and_applied_index() {
    let node = TestNode::start_sharded(SHARDS).await;
    let client = node.client().await;
    client.write((0..20).map(|i| event(&format!("user-{i}"))).collect()).await.expect("write");

    // Every shard elects its leader on its own: wait for the last.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let map = loop {
        let map = client.shard_map().await.expect("shard map");
        if map.shard_replicas.iter().all(|s| s.leader_id == 1) || tokio::time::Instant::now() > deadline {
            break map;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A new cluster's map (epoch 1): every shard on its one node, aiming for RF 3.
    assert_eq!((map.epoch, map.shards, map.replication, map.node_id), (1, SHARDS, 3, 1));
    assert_eq!(map.nodes.len(), 1);
    assert_eq!(map.nodes[0].node_id, 1);
    let status = client.cluster_status().await.expect("status");
    for (k, shard) in map.shard_replicas.iter().enumerate() {
        assert_eq!(shard.shard, k as u32);
        assert_eq!(shard.leader_id, 1, "{map:?}");
        let replicas: Vec<_> = shard.replicas.iter().map(|r| (r.node_id, r.addr.as_str(), r.voter)).collect();
        assert_eq!(replicas, [(1, map.nodes[0].addr.as_str(), true)]);
        let applied = shard.applied_index.expect("the node hosts every shard");
        assert!(applied > 0 && applied <= status.shard_status[k].last_log_index, "{shard:?}");
    }
}

#[tokio::test]
async fn locate_names_the_shard_reads_report() {
    let node = TestNode::start_sharded(SHARDS).await;
    let client = node.client().await;
    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    client.write(users.iter().map(|u| event(u)).collect()).await.expect("write");
    for user in &users {
        let located = client.locate(user).await.expect("locate");
        let read = client.get_profile(user, &[], Consistency::Linearizable).await.expect("read");
        assert_eq!(located.shard, read.read_info.expect("read info").shard, "{user}");
        assert_eq!(located.shard, shard_of(user, SHARDS));
        assert_eq!(located.leader_id, 1);
        assert_eq!(located.replicas.len(), 1);
        assert_eq!(located.leader_addr, located.replicas[0].addr);
    }
}

#[tokio::test]
async fn locate_refuses_an_invalid_user_id_naming_the_field() {
    let node = TestNode::start_sharded(SHARDS).await;
    let client = node.client().await;
    for user in [String::new(), "u".repeat(MAX_USER_ID_BYTES + 1)] {
        let err = client.locate(&user).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
        assert!(err.to_string().starts_with("INVALID_ARGUMENT: user_id: "), "{err}");
    }
}

#[tokio::test]
async fn every_answer_carries_the_map_epoch() {
    let node = TestNode::start_sharded(SHARDS).await;
    let mut admin = AdminClient::connect(node.endpoint()).await.expect("connect");
    let answer = admin.shard_map(ShardMapRequest {}).await.expect("shard map");
    assert_eq!(answer.metadata().get(MAP_EPOCH_HEADER).expect("header"), "1");
    let refused = admin.locate(LocateRequest { user_id: String::new() }).await.unwrap_err();
    assert_eq!(refused.metadata().get(MAP_EPOCH_HEADER).expect("header on errors too"), "1");
}
