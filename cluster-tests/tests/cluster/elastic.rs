//! Elastic scaling on real `portraitd` processes: nodes that join a loaded
//! cluster receive replicas moved from the others (the meta leader's
//! balancing: add a learner on the new node, catch it up, promote it,
//! remove the old replica, which then drops its data), while 8 writers
//! keep writing with retries under the same event ids. Afterwards every
//! node holds within one replica of the others, and on every replica of
//! every shard each user's count equals its distinct applied events
//! (every acknowledged one, only sent ones, none twice).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portrait_client::{Consistency, Event, PortraitClient};
use portrait_cluster_tests::replicas::{
    applied_on, assert_every_replica_holds, drain, placement, statuses, wait_leaders_balanced, wait_placed,
    wait_sizes, Book,
};
use portrait_cluster_tests::workload::{history_ids, order_of};
use portrait_cluster_tests::Cluster;

const SHARDS: u32 = 8;
const WRITERS: usize = 8;
const PER_REQUEST: usize = 4;
/// Requests per writer at most: 8 x 600 x 4 events over 1,600 users is
/// 12 per user on average, well inside the trade history of 100.
const MAX_REQUESTS: usize = 600;
const USERS: usize = 1_600;

/// One writer: request `seq` holds `PER_REQUEST` orders (ids
/// `w<id>-<seq>-<j>`), retried with the same ids on the next client until
/// acknowledged or the test stops.
async fn write(id: usize, clients: Vec<PortraitClient>, book: Arc<Mutex<Book>>, stop: Arc<AtomicBool>) {
    let mut next = id;
    for seq in 0..MAX_REQUESTS {
        let events: Vec<Event> = (0..PER_REQUEST)
            .map(|j| {
                order_of(
                    &format!("u{}", (id * 397 + seq * PER_REQUEST + j) % USERS),
                    &format!("w{id}-{seq}-{j}"),
                )
            })
            .collect();
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            book.lock().unwrap().record(&events, false);
            let client = &clients[next % clients.len()];
            let sent = tokio::time::timeout(Duration::from_secs(10), client.write(events.clone()));
            if let Ok(Ok(_)) = sent.await {
                book.lock().unwrap().record(&events, true);
                break;
            }
            next += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (30 s at most) until the writers have more than `n` events
/// acknowledged: a poll, as a loaded machine may be slow to get them going.
async fn wait_acked_over(book: &Mutex<Book>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while book.lock().unwrap().acked_total() <= n {
        assert!(Instant::now() < deadline, "writers: no more than {n} events acknowledged in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Voting replicas per node (of `nodes`), once every one of the `shards`
/// shards has exactly 3 voters and a leader, and no node is more than one
/// replica off another.
async fn wait_balanced(cluster: &Cluster, nodes: &[u64], shards: u32) -> BTreeMap<u64, usize> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = statuses(cluster, nodes).await;
        let placed = placement(&all);
        let mut load: BTreeMap<u64, usize> = nodes.iter().map(|&n| (n, 0)).collect();
        for (replicas, _) in placed.values() {
            replicas.iter().for_each(|n| *load.entry(*n).or_default() += 1);
        }
        let settled = placed.len() == shards as usize
            && placed.values().all(|(n, leader)| n.len() == 3 && leader.is_some())
            && all.values().flat_map(|s| &s.shard_status).all(|s| s.learners.is_empty());
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        if settled && max - min <= 1 {
            return load;
        }
        assert!(Instant::now() < deadline, "not balanced over {nodes:?}: {load:?} {placed:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn scaling_3_to_5_nodes_under_writers_moves_replicas_and_loses_nothing() {
    let mut cluster = Cluster::start_placed(3, SHARDS, 3).await;
    wait_placed(&cluster, &[1, 2, 3], SHARDS).await;

    let book = Arc::new(Mutex::new(Book::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 1..=3 {
        clients.push(cluster.client(id).await);
    }
    let writers: Vec<_> =
        (0..WRITERS).map(|w| tokio::spawn(write(w, clients.clone(), book.clone(), stop.clone()))).collect();
    // Under load: some writes acknowledged first.
    wait_acked_over(&book, 20).await;

    let started = Instant::now();
    let four = cluster.spawn_joining(&[1]).await;
    let five = cluster.spawn_joining(&[2]).await;
    let all = [1, 2, 3, four, five];
    let load = wait_balanced(&cluster, &all, SHARDS).await;
    println!("replicas balanced after {:?}: {load:?}", started.elapsed());
    // 24 replicas over 5 nodes: 4 or 5 each, the new nodes included.
    assert!(load.values().all(|&l| l == 4 || l == 5), "{load:?}");
    assert_eq!(load.values().sum::<usize>(), 24);
    // Then leaderships, by transfers under the writers: 8 over 5 nodes.
    let led = wait_leaders_balanced(&cluster, &all, SHARDS, Duration::from_secs(90)).await;
    println!("leaders balanced after {:?}: {led:?}", started.elapsed());
    assert!(led.values().all(|&l| l == 1 || l == 2), "{led:?}");

    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let book = book.lock().unwrap().clone();
    assert!(book.acked_total() > 100, "the writers made progress: {}", book.acked_total());
    let checked = assert_every_replica_holds(&cluster, &all, SHARDS, &book).await;
    assert_eq!(checked, 24, "every replica checked");

    // The nodes that gave replicas away dropped them (data deleted).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hosted: BTreeMap<u64, usize> =
            statuses(&cluster, &all).await.into_iter().map(|(id, s)| (id, s.shard_status.len())).collect();
        if hosted == load {
            break;
        }
        assert!(Instant::now() < deadline, "replicas moved away still hosted: {hosted:?} vs {load:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Each node's logical bytes (the sum of its replicas' reported sizes)
    // within 30 % of total x RF / N; a shard's replicas report about the
    // same size, however they got their data. Nodes measure at their own
    // pace (a replica is measured again a round after its last write, and
    // rounds are spaced further on a loaded machine): two readings can
    // agree while one replica's figure is from before its last entries, so
    // the figures are read until they converge.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (sizes, by_shard) = loop {
        let sizes = wait_sizes(&cluster, &all).await;
        let mut by_shard: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for shards in sizes.values() {
            shards.iter().for_each(|(s, b)| by_shard.entry(*s).or_default().push(*b));
        }
        let apart: Vec<_> = by_shard
            .iter()
            .filter(|(_, b)| *b.iter().max().unwrap() as f64 > *b.iter().min().unwrap() as f64 * 1.2)
            .collect();
        if apart.is_empty() {
            break (sizes, by_shard);
        }
        assert!(Instant::now() < deadline, "shards whose replicas differ (shard, sizes): {apart:?}");
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    };
    let total: f64 = by_shard.values().map(|b| b.iter().sum::<u64>() as f64 / b.len() as f64).sum();
    let fair = total * 3.0 / all.len() as f64;
    let per_node: BTreeMap<u64, u64> = sizes.iter().map(|(id, s)| (*id, s.values().sum())).collect();
    println!("logical bytes per node {per_node:?}; total {total:.0} x RF 3 / 5 = {fair:.0}");
    for (id, bytes) in &per_node {
        let ratio = *bytes as f64 / fair;
        assert!((0.7..=1.3).contains(&ratio), "node {id}: {bytes} bytes is {ratio:.2} x its share {fair:.0}");
    }
    // Five nodes: all of them vote in the meta group.
    let meta_voters = &statuses(&cluster, &[1]).await[&1].meta_voters;
    assert_eq!(meta_voters, &all, "meta voters");
}

#[tokio::test]
async fn draining_a_node_under_writers_moves_its_replicas_and_its_meta_vote_away() {
    const SHARDS: u32 = 4;
    let mut cluster = Cluster::start_placed(4, SHARDS, 3).await;
    let load = wait_balanced(&cluster, &[1, 2, 3, 4], SHARDS).await;
    assert_eq!(load.values().sum::<usize>(), 12, "{load:?}");
    let status = &statuses(&cluster, &[1]).await[&1];
    assert_eq!(status.meta_voters, [1, 2, 3, 4], "four nodes: four meta voters");

    let book = Arc::new(Mutex::new(Book::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 1..=3 {
        clients.push(cluster.client(id).await);
    }
    let writers: Vec<_> =
        (0..WRITERS).map(|w| tokio::spawn(write(w, clients.clone(), book.clone(), stop.clone()))).collect();
    // Under load: some writes acknowledged first.
    wait_acked_over(&book, 20).await;

    let admin = cluster.client(1).await;
    let started = Instant::now();
    drain(&admin, 4).await;
    let placed = wait_placed(&cluster, &[1, 2, 3], SHARDS).await;
    assert!(placed.values().all(|(n, l)| !n.contains(&4) && *l != 4), "{placed:?}");
    // Draining also takes node 4's meta vote (no learner can replace it:
    // the meta group goes to three voters on the nodes that stay).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let voters =
            statuses(&cluster, &[1, 2, 3]).await.into_values().map(|s| s.meta_voters).collect::<Vec<_>>();
        if voters.iter().all(|v| v == &[1, 2, 3]) {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 still a meta voter: {voters:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("node 4 drained after {:?}", started.elapsed());
    // A drain is not undone by adding the node again: refused, not an OK
    // that changes nothing.
    let (addr, peer) = (cluster.node(4).endpoint(), cluster.node(4).advertised());
    let e = admin.add_node(4, &addr, &peer, false).await.expect_err("a draining node");
    assert_eq!(e.code().map(portrait_client::code_name), Some("FAILED_PRECONDITION"), "{e}");
    assert!(e.to_string().contains("node 4 is draining"), "{e}");
    let removed = admin.remove_node(4).await.expect("remove the drained node");
    assert_eq!(removed.members.iter().map(|m| m.node_id).collect::<Vec<_>>(), [1, 2, 3]);
    cluster.kill(4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let book = book.lock().unwrap().clone();
    assert!(book.acked_total() > 100, "the writers made progress: {}", book.acked_total());
    assert_eq!(assert_every_replica_holds(&cluster, &[1, 2, 3], SHARDS, &book).await, 12);
}

#[tokio::test]
async fn a_node_dead_past_replica_dead_after_has_its_replicas_re_created() {
    const SHARDS: u32 = 4;
    let config = "replication = 3\nreplica_dead_after = \"3s\"\n";
    let mut cluster = Cluster::start_sharded_with_config(4, SHARDS, config).await;
    let all = [1, 2, 3, 4];
    // Balancing gives node 4 its share (12 replicas: 3 per node).
    let deadline = Instant::now() + Duration::from_secs(60);
    let hosted_by_4 = loop {
        let placed = placement(&statuses(&cluster, &all).await);
        let on_4: Vec<u32> = placed.iter().filter(|(_, (n, _))| n.contains(&4)).map(|(s, _)| *s).collect();
        if on_4.len() == 3 && placed.values().all(|(n, l)| n.len() == 3 && l.is_some()) {
            break on_4;
        }
        assert!(Instant::now() < deadline, "node 4 got no replicas: {placed:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let client = cluster.client(1).await;
    let events: Vec<Event> = (0..40).map(|i| order_of(&format!("u{i}"), &format!("before-{i}"))).collect();
    let written = client.write(events.clone()).await.expect("write");
    assert_eq!(written.applied, 40);
    let mut book = Book::default();
    book.record(&events, false);
    book.record(&events, true);

    let killed = Instant::now();
    cluster.kill(4);
    // Every shard back on 3 voters, all among the living nodes.
    let placed = wait_placed(&cluster, &[1, 2, 3], SHARDS).await;
    println!(
        "RF restored {:?} after the kill (replica_dead_after 3 s); node 4 held {hosted_by_4:?}",
        killed.elapsed()
    );
    assert!(killed.elapsed() >= Duration::from_secs(3), "not before replica_dead_after");
    assert!(placed.values().all(|(n, _)| n.len() == 3));
    let map = client.shard_map().await.expect("map");
    assert_eq!(map.draining, [4], "the dead node is drained");
    // The map at once; each shard's membership once its leader has
    // removed the dead voter (after promoting its successor).
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.replicas_on(4).await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "a shard's leader still has node 4 in its membership");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(assert_every_replica_holds(&cluster, &[1, 2, 3], SHARDS, &book).await, 12);

    // Removed while it is down, node 4 comes back on its old data dir. Its
    // stored map still places shards on it, whose frozen data it would
    // serve to LOCAL reads: it asks the meta group's leader, finds itself
    // no member, and stops with an error saying what to do.
    let removed = client.remove_node(4).await.expect("remove the dead, drained node");
    assert!(!removed.members.iter().any(|m| m.node_id == 4), "{:?}", removed.members);
    cluster.start_again(4);
    let exit = cluster.wait_exit(4, Duration::from_secs(45)).await;
    assert!(!exit.success(), "{exit:?}");
    let log = cluster.node(4).log();
    assert!(log.contains("node 4 is not a member of the cluster"), "{log}");
    assert!(log.contains("this data dir is obsolete"), "{log}");
}

/// Four nodes, RF 3: one dies, and an operator drains another. The shard
/// that lacked the dead node can move the drained node's replica only to
/// the dead one, so the drain waits; it used to refuse the dead node's own
/// drain meanwhile, and both waited for good. Now the dead node is drained
/// beside it (apply rules version 5): both drains end, every shard keeps
/// the two living nodes, and the data written before is on both.
#[tokio::test]
async fn a_drain_with_only_a_dead_node_to_go_to_ends_once_the_dead_node_is_drained_too() {
    const SHARDS: u32 = 4;
    let config = "replication = 3\nreplica_dead_after = \"20s\"\n";
    let mut cluster = Cluster::start_sharded_with_config(4, SHARDS, config).await;
    let all = [1, 2, 3, 4];
    // Balanced: every node holds 3 replicas, so each misses one shard.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let placed = placement(&statuses(&cluster, &all).await);
        let held = |n: &u64| placed.values().filter(|(r, _)| r.contains(n)).count();
        if placed.len() == SHARDS as usize
            && placed.values().all(|(r, l)| r.len() == 3 && l.is_some())
            && all.iter().all(|n| held(n) == 3)
        {
            break;
        }
        assert!(Instant::now() < deadline, "not balanced on four nodes: {placed:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let meta_leader = cluster.client(1).await.cluster_status().await.expect("status").meta_leader_id;
    let others: Vec<u64> = all.iter().copied().filter(|&n| n != meta_leader).collect();
    let (dead, drained) = (others[0], others[1]);
    let living: Vec<u64> = all.iter().copied().filter(|&n| n != dead && n != drained).collect();
    let client = cluster.client(meta_leader).await;
    let events: Vec<Event> = (0..40).map(|i| order_of(&format!("u{i}"), &format!("before-{i}"))).collect();
    assert_eq!(client.write(events.clone()).await.expect("write").applied, 40);

    cluster.kill(dead);
    let started = Instant::now();
    // The drain starts once the meta leader counts the dead node silent (no
    // new replica goes to it: after 5 s), and well before it drains it as
    // dead (replica_dead_after, 20 s: the operator's drain is refused once
    // that one is under way). Started sooner, the drain moves a replica to
    // the dead node, which the dead node's own drain then moves on.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Both drains end: `drain` waits until the drained node holds nothing.
    drain(&client, drained).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let map = loop {
        let map = client.shard_map().await.expect("map");
        if client.replicas_on(dead).await.expect("map") == 0 {
            break map;
        }
        assert!(Instant::now() < deadline, "the dead node {dead} still holds replicas: {map:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "nodes {drained} (drained) and {dead} (dead) hold nothing {:?} after the kill",
        started.elapsed()
    );
    let mut draining = map.draining.clone();
    draining.sort();
    let mut expected = vec![dead, drained];
    expected.sort();
    assert_eq!(draining, expected, "both are drained");
    for shard in &map.shard_replicas {
        let mut nodes: Vec<u64> = shard.replicas.iter().map(|r| r.node_id).collect();
        nodes.sort();
        assert_eq!(nodes, living, "shard {} on the living nodes", shard.shard);
    }
    // Still writable, and every event is on both living replicas, once.
    let after: Vec<Event> = (0..8).map(|i| order_of(&format!("u{i}"), &format!("after-{i}"))).collect();
    assert_eq!(client.write(after).await.expect("a write after both drains").applied, 8);
    let users: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
    let expected = |u: &str| {
        let i: usize = u[1..].parse().unwrap();
        let mut ids = vec![format!("before-{i}")];
        ids.extend((i < 8).then(|| format!("after-{i}")));
        ids.sort();
        ids
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    for &id in &living {
        loop {
            let applied = applied_on(&cluster, id, &users).await;
            let wrong: Vec<_> = applied
                .iter()
                .filter(|(u, (count, history))| {
                    let mut history = history.clone();
                    history.sort();
                    *count != expected(u).len() as u64 || history != expected(u)
                })
                .collect();
            if wrong.is_empty() && applied.len() == users.len() {
                break;
            }
            assert!(Instant::now() < deadline, "node {id}: {wrong:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Replication 1: a shard moved to a new node keeps its data. The node it
/// moves to must join the shard's group, not create an empty one of its
/// own (which it did while it was the map's only replica of the shard).
#[tokio::test]
async fn with_replication_1_a_shard_moved_to_a_new_node_keeps_its_data() {
    const SHARDS: u32 = 4;
    let mut cluster = Cluster::start_placed(1, SHARDS, 1).await;
    let client = cluster.client(1).await;
    let events: Vec<Event> = (0..40).map(|i| order_of(&format!("u{i}"), &format!("before-{i}"))).collect();
    assert_eq!(client.write(events).await.expect("write").applied, 40);

    let two = cluster.spawn_joining(&[1]).await;
    // Balanced: two shards each, one voter, led, and node 1 hosts only its own.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = statuses(&cluster, &[1, two]).await;
        let placed = placement(&all);
        let hosted: Vec<usize> = all.values().map(|s| s.shard_status.len()).collect();
        let on_two = placed.values().filter(|(n, _)| n.contains(&two)).count();
        let settled = placed.len() == SHARDS as usize
            && placed.values().all(|(n, l)| n.len() == 1 && l.is_some_and(|l| n.contains(&l)));
        if settled && on_two == 2 && hosted == [2, 2] {
            break;
        }
        assert!(Instant::now() < deadline, "not moved: {placed:?}, hosted {hosted:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let reader = cluster.client(two).await;
    let after: Vec<Event> = (0..40).map(|i| order_of(&format!("u{i}"), &format!("after-{i}"))).collect();
    assert_eq!(reader.write(after).await.expect("write after the move").applied, 40);
    for i in 0..40 {
        let user = format!("u{i}");
        let ids = history_ids(&reader, &user, "trade", Consistency::Linearizable).await;
        assert_eq!(ids, [format!("after-{i}"), format!("before-{i}")], "{user}");
    }
}

/// Two nodes that share a shard die together: that shard has no quorum and
/// no leader, yet both nodes are drained in the map (one after the other),
/// so the shards that lost only one of them get their third replica back.
/// The shard that lost two gets its new replicas once a leader can act
/// (here never: it stays without a quorum). Its replica held back, the
/// first drain never ended and refused the second.
#[tokio::test]
async fn two_nodes_dead_together_are_both_drained_though_a_shard_they_share_has_no_leader() {
    const SHARDS: u32 = 4;
    let config = "replication = 3\nreplica_dead_after = \"3s\"\n";
    let mut cluster = Cluster::start_sharded_with_config(5, SHARDS, config).await;
    let all = [1, 2, 3, 4, 5];
    // Balanced: every node holds replicas, every shard 3 voters and a leader.
    let deadline = Instant::now() + Duration::from_secs(60);
    let placed = loop {
        let placed = placement(&statuses(&cluster, &all).await);
        let used = all.iter().filter(|n| placed.values().any(|(r, _)| r.contains(n))).count();
        if used == all.len()
            && placed.len() == SHARDS as usize
            && placed.values().all(|(n, l)| n.len() == 3 && l.is_some())
        {
            break placed;
        }
        assert!(Instant::now() < deadline, "not placed on all five: {placed:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let meta_leader = cluster.client(1).await.cluster_status().await.expect("status").meta_leader_id;
    // Two replicas of one shard, neither the meta leader (its group keeps
    // 3 of 5 voters).
    let (shared, dead) = placed
        .iter()
        .find_map(|(shard, (replicas, _))| {
            let pair: Vec<u64> = replicas.iter().copied().filter(|&n| n != meta_leader).take(2).collect();
            (pair.len() == 2).then_some((*shard, pair))
        })
        .expect("a shard with two replicas off the meta leader");
    let living: Vec<u64> = all.iter().copied().filter(|n| !dead.contains(n)).collect();
    let lost_both: Vec<u32> =
        placed.iter().filter(|(_, (r, _))| dead.iter().all(|n| r.contains(n))).map(|(s, _)| *s).collect();
    for &n in &dead {
        cluster.kill(n);
    }
    let client = cluster.client(living[0]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let map = client.shard_map().await.expect("map");
        let on_dead: Vec<(u32, u64)> = map
            .shard_replicas
            .iter()
            .flat_map(|s| s.replicas.iter().map(move |r| (s.shard, r.node_id)))
            .filter(|(_, n)| dead.contains(n))
            .collect();
        if on_dead.is_empty() {
            let mut draining = map.draining.clone();
            draining.sort();
            assert_eq!(draining, dead, "both dead nodes are drained");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas still placed on the dead nodes {dead:?} (shard {shared} lost both): {on_dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Every shard that kept a quorum is back on 3 voters among the living.
    assert!(lost_both.contains(&shared) && lost_both.len() < SHARDS as usize, "{lost_both:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let placed = placement(&statuses(&cluster, &living).await);
        // Shards that lost both nodes may report no replica at all (their
        // survivor campaigning): only the others are looked at.
        let short: Vec<u32> = (0..SHARDS)
            .filter(|s| !lost_both.contains(s))
            .filter(|s| placed.get(s).is_none_or(|(replicas, leader)| replicas.len() < 3 || leader.is_none()))
            .collect();
        if short.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "shards {short:?} not back on 3 living voters: {placed:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
