//! A `BatchGetProfiles` taken by a node that hosts none of its shards:
//! every shard's part is forwarded at once, each capped at an equal share
//! of the response limit, and a part over its share is asked again alone
//! with what is left. A skewed batch within the limit is served whole; one
//! past it is refused naming the field.

use portrait_client::{shard_of, Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::replicas::wait_placed;
use portrait_cluster_tests::workload::visit;
use portrait_cluster_tests::{Cluster, TEST_SHARDS};

/// Four nodes, RF 3, no rebalancing: nodes 1-3 hold every shard, node 4
/// none.
const CONFIG: &str = "replication = 3\nmax_moves = 0\n";

/// The first `n` ids `prefix0`, `prefix1`, ... of users of `shard`.
fn users_of(shard: u32, prefix: &str, n: usize) -> Vec<String> {
    (0..).map(|i| format!("{prefix}{i}")).filter(|u| shard_of(u, TEST_SHARDS) == shard).take(n).collect()
}

/// A 3.2 MiB profile: 50 history events (the browse family's length) of 16
/// attributes of 4 KiB.
async fn write_big(client: &PortraitClient, user: &str) {
    let attrs = || (0..16).map(|a| (format!("note{a}"), Value::string("x".repeat(4096)))).collect();
    for part in 0..2 {
        let events: Vec<Event> =
            (0..25).map(|i| Event { attrs: attrs(), ..visit(user, &format!("e{part}-{i}"), "") }).collect();
        client.write(events).await.expect("write a large profile");
    }
}

#[tokio::test]
async fn a_forwarded_part_over_its_share_is_read_again_within_the_limit() {
    let cluster = Cluster::start_sharded_with_config(4, TEST_SHARDS, CONFIG).await;
    let placed = wait_placed(&cluster, &[1, 2, 3, 4], TEST_SHARDS).await;
    assert!(placed.values().all(|(nodes, _)| !nodes.contains(&4)), "node 4 hosts no shard: {placed:?}");
    let client = cluster.client(4).await.without_routing();
    let big = users_of(0, "big", 3);
    for user in &big {
        write_big(&client, user).await;
    }
    let small: Vec<String> = (1..TEST_SHARDS).map(|s| users_of(s, "small", 1).remove(0)).collect();
    for user in &small {
        client.write(vec![visit(user, "s", "home")]).await.unwrap();
    }

    // Shard 0's part holds two big profiles (6.4 MiB): over its first-round
    // share (16 MiB over 4 parts), within the limit for the whole call.
    let ids: Vec<String> = big[..2].iter().chain(&small).cloned().collect();
    let read = client.batch_get_profiles(&ids, &[], Consistency::Local).await.expect("served whole");
    assert_eq!(read.profiles.len(), ids.len());
    for (id, profile) in ids.iter().zip(&read.profiles) {
        let history = profile.families["browse"].history.len();
        assert_eq!(history, if id.starts_with("big") { 50 } else { 1 }, "{id}");
    }

    // Six big profiles (about 19 MiB) pass the limit: refused, naming the field.
    let ids: Vec<String> = big.iter().chain(&big).cloned().chain(small.iter().cloned()).collect();
    let e = client.batch_get_profiles(&ids, &[], Consistency::Local).await.expect_err("over the limit");
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("user_ids: the response would pass 16 MiB"), "{e}");
}
