//! A schema change applied while two writers write, at several shards:
//! `ApplySchema` commits the new version in the meta group and returns once
//! every shard has applied it through its own log. Afterwards every
//! replica of every shard reports the new version, counts orders written
//! after the change in the new feature (and sets the new tag), and holds
//! each acknowledged order exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use portrait_client::portrait_proto::v1::rule_value::Kind;
use portrait_client::{shard_of, Consistency, Event, Profile};
use portrait_cluster_tests::replicas::{
    assert_every_replica_holds, feature_count, placement, statuses, users_of, wait_placed, Book,
};
use portrait_cluster_tests::workload::{order, order_of, Workload};
use portrait_cluster_tests::{Cluster, TEST_SHARDS};
use portrait_core::schema::DEFAULT_SCHEMA_TOML;

/// Counts the orders a user makes from the change on (a new feature starts
/// from zero: existing orders are not counted).
const FEATURE: &str = "orders_since_change";
/// `FEATURE > 0`.
const TAG: &str = "ordered_since_change";

fn new_schema() -> String {
    format!(
        "{DEFAULT_SCHEMA_TOML}\n[features.{FEATURE}]\nfamily = \"trade\"\nagg = \"count\"\nwhere = 'type == \
         \"order\"'\n\n[tags.{TAG}]\nrule = '{FEATURE} > 0'\n"
    )
}

/// Waits until every replica on `nodes` reports schema `version` or later
/// for each of its shards; returns the replicas.
async fn wait_schema(cluster: &Cluster, nodes: &[u64], version: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = statuses(cluster, nodes).await;
        let replicas: Vec<(u64, u32, u64)> = all
            .iter()
            .flat_map(|(id, s)| s.shard_status.iter().map(move |r| (*id, r.shard, r.schema_version)))
            .collect();
        if replicas.iter().all(|r| r.2 >= version) && all.values().all(|s| s.schema_version >= version) {
            return replicas.len();
        }
        assert!(Instant::now() < deadline, "replicas (node, shard, version) behind {version}: {replicas:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per user, as node `id` serves it locally: (the new feature, the new tag).
async fn new_values(cluster: &Cluster, id: u64, users: &[String]) -> BTreeMap<String, (u64, Option<bool>)> {
    let client = cluster.client(id).await.without_routing();
    let r = client.batch_get_profiles(users, &[], Consistency::Local).await.expect("local read");
    let tag = |p: &Profile| match p.tags.get(TAG).and_then(|t| t.value.clone()).and_then(|v| v.kind) {
        Some(Kind::BoolValue(b)) => Some(b),
        _ => None,
    };
    r.profiles.iter().map(|p| (p.user_id.clone(), (feature_count(p, FEATURE), tag(p)))).collect()
}

#[tokio::test]
async fn a_schema_applied_while_writing_reaches_every_shard_and_loses_no_order() {
    let all = [1, 2, 3];
    let cluster = Cluster::start_sharded(3, TEST_SHARDS).await;
    wait_placed(&cluster, &all, TEST_SHARDS).await;
    let old = cluster.client(1).await.get_schema().await.expect("schema").version;
    // Two writers with distinct write numbers, through different nodes.
    let writers = [
        Workload::start(vec![cluster.node(2).endpoint()]),
        Workload::start_at(vec![cluster.node(3).endpoint()], 1_000_000),
    ];
    for w in &writers {
        w.wait_acked_over(20).await;
    }
    let started = Instant::now();
    let applied = cluster.client(3).await.apply_schema(new_schema(), false).await.expect("apply under load");
    println!("ApplySchema took {:?} under load", started.elapsed());
    assert!(applied.version > old, "a new version: {} after {old}", applied.version);
    // Orders acknowledged from now on come after the change in their shard's log.
    let before: Vec<BTreeSet<String>> = writers.iter().map(Workload::acked_ids).collect();
    for w in &writers {
        w.wait_acked_over(w.acked() + 20).await;
    }
    let mut book = Book::default();
    let mut after_change: BTreeMap<String, u64> = BTreeMap::new();
    for (w, before) in writers.into_iter().zip(before) {
        let outcome = w.stop().await;
        assert_eq!(outcome.hung, 0, "writes hung");
        for id in outcome.acked.difference(&before) {
            *after_change.entry(order(id[1..].parse().unwrap()).user_id).or_default() += 1;
        }
        book.merge(outcome.book());
    }
    // Users of their own, 3 per shard, with 2 orders each after the change.
    let fresh: Vec<String> = (0..TEST_SHARDS).flat_map(|s| users_of(s, TEST_SHARDS, 3)).collect();
    let events: Vec<Event> =
        fresh.iter().flat_map(|u| [order_of(u, &format!("{u}-a")), order_of(u, &format!("{u}-b"))]).collect();
    book.record(&events, false);
    cluster.client(1).await.write(events.clone()).await.expect("write after the change");
    book.record(&events, true);
    for u in &fresh {
        after_change.insert(u.clone(), 2);
    }

    assert_eq!(wait_schema(&cluster, &all, applied.version).await, 3 * TEST_SHARDS as usize);
    assert_eq!(
        assert_every_replica_holds(&cluster, &all, TEST_SHARDS, &book).await,
        3 * TEST_SHARDS as usize
    );
    let placed = placement(&statuses(&cluster, &all).await);
    for (shard, (replicas, _)) in &placed {
        let users: Vec<String> =
            after_change.keys().filter(|u| shard_of(u, TEST_SHARDS) == *shard).cloned().collect();
        for &id in replicas {
            let values = new_values(&cluster, id, &users).await;
            for user in &users {
                let (count, tag) = values.get(user).copied().unwrap_or_default();
                let lifetime = book.sent[user].len() as u64;
                let at_least = after_change[user];
                assert!(
                    (at_least..=lifetime).contains(&count),
                    "node {id}, {user}: {FEATURE} {count}, expected {at_least}..={lifetime}"
                );
                assert_eq!(tag, Some(true), "node {id}, {user}: {TAG}");
            }
            for user in fresh.iter().filter(|u| shard_of(u, TEST_SHARDS) == *shard) {
                assert_eq!(values[user].0, 2, "node {id}, {user}: exactly its orders since the change");
            }
        }
    }
}
