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

/// The fault-injection file that makes a node's build refuse every schema
/// containing its text (as a stricter build, mid rolling upgrade, would).
const REFUSE_MARKER_FILE: &str = "fault-refuse-schema";

fn code(e: &portrait_client::ClientError) -> Option<&'static str> {
    e.code().map(portrait_client::code_name)
}

/// Every node checks a schema with its own build before it is applied: a
/// node whose build refuses it fails `ApplySchema` (dry run or not) naming
/// it, and nothing is applied anywhere (its shards would otherwise stop at
/// the schema's entry). A node being added whose build refuses the
/// cluster's schema is not added. A node that is down cannot be asked: the
/// schema applies without its word, and the response names it.
#[tokio::test]
async fn a_node_whose_build_refuses_a_schema_stops_it_before_anything_is_applied() {
    const MARKER: &str = "# for-the-next-build-only";
    let all = [1, 2, 3];
    let mut cluster = Cluster::start_sharded(3, TEST_SHARDS).await;
    wait_placed(&cluster, &all, TEST_SHARDS).await;
    let before = cluster.client(1).await.get_schema().await.expect("schema").version;
    let marked = format!("{}\n{MARKER}\n", new_schema());
    std::fs::write(cluster.node(3).data_dir().join(REFUSE_MARKER_FILE), MARKER).unwrap();
    for dry_run in [true, false] {
        let refused = cluster
            .client(1)
            .await
            .apply_schema(marked.clone(), dry_run)
            .await
            .expect_err("node 3 refuses it");
        assert_eq!(code(&refused), Some("FAILED_PRECONDITION"), "dry run {dry_run}: {refused}");
        let text = refused.to_string();
        assert!(
            text.contains("node 3's build refuses this schema") && text.contains("fault injection"),
            "{text}"
        );
    }
    for (id, status) in statuses(&cluster, &all).await {
        assert_eq!(status.schema_version, before, "node {id} kept the schema");
        for r in &status.shard_status {
            assert_eq!(r.schema_version, before, "node {id} shard {}", r.shard);
        }
    }
    assert!(cluster.node(3).is_running(), "node 3 did not stop");

    // Once node 3's build accepts it, the same schema applies everywhere.
    std::fs::remove_file(cluster.node(3).data_dir().join(REFUSE_MARKER_FILE)).unwrap();
    let applied = cluster.client(1).await.apply_schema(marked, false).await.expect("accepted everywhere");
    assert!(applied.version > before, "version {} after {before}", applied.version);
    assert_eq!(applied.unchecked_nodes, Vec::<u64>::new());
    assert_eq!(wait_schema(&cluster, &all, applied.version).await, 3 * TEST_SHARDS as usize);

    // A node whose build refuses the cluster's schema is not added.
    let new = cluster.spawn_node().await;
    std::fs::write(cluster.node(new).data_dir().join(REFUSE_MARKER_FILE), MARKER).unwrap();
    let (addr, peer_addr) = (cluster.node(new).endpoint(), cluster.node(new).advertised());
    let refused = cluster.client(1).await.add_node(new, &addr, &peer_addr, false).await.expect_err("refused");
    assert_eq!(code(&refused), Some("FAILED_PRECONDITION"), "{refused}");
    assert!(
        refused.to_string().contains(&format!("node {new}'s build refuses the cluster's schema")),
        "{refused}"
    );
    let map = cluster.client(1).await.shard_map().await.expect("map");
    assert!(map.nodes.iter().all(|n| n.node_id != new), "node {new} is not in the map: {:?}", map.nodes);

    // A node that is down is not asked; the response names it.
    cluster.kill(3);
    let next = format!("{}\n# one more\n", new_schema());
    let applied_without =
        cluster.client(1).await.apply_schema(next, false).await.expect("applied without node 3");
    assert_eq!(applied_without.unchecked_nodes, vec![3]);
    assert!(applied_without.version > applied.version);
}

/// Whether every node in `nodes` reports the cluster's apply rules version
/// `version` and every shard replica on it applies by it.
async fn rules_everywhere(cluster: &Cluster, nodes: &[u64], version: u32) -> bool {
    let all = statuses(cluster, nodes).await;
    all.len() == nodes.len()
        && all.values().all(|s| {
            s.cluster_apply_rules == version
                && s.shard_status.len() == TEST_SHARDS as usize
                && s.shard_status.iter().all(|r| r.apply_rules == version)
        })
}

/// Lifetime orders of `users`, read from the shards' leaders (retried
/// while a shard elects one, for at most 30 s).
async fn orders(cluster: &Cluster, users: &[String]) -> BTreeMap<String, u64> {
    let client = cluster.client(1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        match client.batch_get_profiles(users, &[], Consistency::Linearizable).await {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline && code(&e) == Some("UNAVAILABLE") => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("read: {e}"),
        }
    };
    r.profiles
        .iter()
        .map(|p| (p.user_id.clone(), portrait_cluster_tests::replicas::lifetime_orders(p)))
        .collect()
}

/// Apply rules versions across a rolling upgrade (docs/operations.md):
/// with two of three nodes on a build of a newer version, the cluster and
/// every shard stay on the old one; once the third runs it, the meta
/// leader raises the cluster's and every shard replica moves on. A node
/// whose build lacks the version is not added, and a node rolled back to
/// such a build stops at start instead of applying by other rules. Writes
/// before and after apply exactly once. "Builds" of version 1 are this
/// build told to claim 1 as its newest (it then applies every shard by
/// version 1's rules, as the builds before version 2 did); the upgrade is
/// this build as it is (its newest version, `UP`).
#[tokio::test]
async fn apply_rules_move_on_only_once_every_node_runs_a_build_that_has_them() {
    const NEWEST: &str = "PORTRAIT_FAULT_APPLY_RULES_NEWEST";
    const UP: u32 = portrait_core::rules::NEWEST;
    const { assert!(UP > 1, "this test upgrades from version 1 to this build's newest") };
    let all = [1, 2, 3];
    let mut cluster = Cluster::start_sharded_with_env(3, TEST_SHARDS, None, &[(NEWEST, "1")]).await;
    wait_placed(&cluster, &all, TEST_SHARDS).await;
    assert!(rules_everywhere(&cluster, &all, 1).await, "{:?}", statuses(&cluster, &all).await);
    let users: Vec<String> = (0..TEST_SHARDS).flat_map(|s| users_of(s, TEST_SHARDS, 2)).collect();
    let write = |round: &str| users.iter().map(|u| order_of(u, &format!("{round}-{u}"))).collect::<Vec<_>>();
    cluster.client(1).await.write(write("before")).await.expect("write before");

    // Nodes 1 and 2 upgraded, one at a time.
    for id in [1, 2] {
        cluster.set_env(id, NEWEST, None);
        cluster.kill(id);
        cluster.restart(id).await;
        portrait_cluster_tests::replicas::wait_caught_up(&cluster, &all, TEST_SHARDS).await;
    }
    // The meta leader on an upgraded node (only one of those raises), then
    // well past its asking period (2 s): node 3's build holds it back.
    let meta_leader = |all: &BTreeMap<u64, portrait_client::portrait_proto::v1::ClusterStatusResponse>| {
        all.values().map(|s| s.meta_leader_id).max().unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while meta_leader(&statuses(&cluster, &all).await) == 3 {
        assert!(Instant::now() < deadline, "node 3 keeps leading the meta group");
        cluster.kill(3);
        cluster.restart(3).await;
        portrait_cluster_tests::replicas::wait_caught_up(&cluster, &all, TEST_SHARDS).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mixed = statuses(&cluster, &all).await;
    assert!([1, 2].contains(&meta_leader(&mixed)), "meta leader {}", meta_leader(&mixed));
    let builds: Vec<(u64, u32)> = mixed.iter().map(|(id, s)| (*id, s.apply_rules_newest)).collect();
    assert_eq!(builds, [(1, UP), (2, UP), (3, 1)]);
    assert!(rules_everywhere(&cluster, &all, 1).await, "raised with node 3 on version 1: {mixed:?}");
    cluster.client(2).await.write(write("mixed")).await.expect("write with mixed builds");

    // The last node upgraded: the cluster and every shard move on.
    cluster.set_env(3, NEWEST, None);
    cluster.kill(3);
    cluster.restart(3).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rules_everywhere(&cluster, &all, UP).await {
        assert!(Instant::now() < deadline, "not raised: {:?}", statuses(&cluster, &all).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Kept across a restart (the shards' `rules` keys and the meta state).
    cluster.kill(1);
    cluster.restart(1).await;
    portrait_cluster_tests::replicas::wait_caught_up(&cluster, &all, TEST_SHARDS).await;
    assert!(rules_everywhere(&cluster, &all, UP).await, "{:?}", statuses(&cluster, &all).await);
    cluster.client(3).await.write(write("after")).await.expect("write after the raise");
    let counted = orders(&cluster, &users).await;
    assert_eq!(counted.len(), users.len());
    assert!(counted.values().all(|&n| n == 3), "each user's three orders once: {counted:?}");

    // A node whose build lacks the cluster's version is not added.
    let new = cluster.spawn_node_with_env(NEWEST, "1").await;
    let (addr, peer_addr) = (cluster.node(new).endpoint(), cluster.node(new).advertised());
    let refused = cluster.client(1).await.add_node(new, &addr, &peer_addr, false).await.expect_err("refused");
    assert_eq!(code(&refused), Some("FAILED_PRECONDITION"), "{refused}");
    assert!(
        refused.to_string().contains(&format!(
            "node {new} at {peer_addr} runs a build that applies apply rules versions 1 to 1; the cluster \
             applies by version {UP}"
        )),
        "{refused}"
    );
    let map = cluster.client(1).await.shard_map().await.expect("map");
    assert!(map.nodes.iter().all(|n| n.node_id != new), "node {new} is not in the map: {:?}", map.nodes);

    // Node 3 rolled back to a build of version 1: it stops at start.
    cluster.set_env(3, NEWEST, Some("1"));
    cluster.kill(3);
    cluster.start_again(3);
    let exit = cluster.wait_exit(3, Duration::from_secs(30)).await;
    assert!(!exit.success(), "node 3 exits with an error");
    let log = cluster.node(3).log();
    assert!(
        log.contains(&format!(
            "apply rules version {UP} is newer than this build's (it applies versions 1 to 1)"
        )),
        "{log}"
    );
    // The others go on by the newest version.
    let counted = orders(&cluster, &users).await;
    assert!(counted.values().all(|&n| n == 3), "{counted:?}");
}
