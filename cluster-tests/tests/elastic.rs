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

use portrait_client::{Event, PortraitClient};
use portrait_cluster_tests::replicas::{assert_every_replica_holds, placement, statuses, wait_placed, Book};
use portrait_cluster_tests::workload::order_of;
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

/// Voting replicas per node (of `nodes`), once every shard has exactly 3
/// voters and a leader, and no node is more than one replica off another.
async fn wait_balanced(cluster: &Cluster, nodes: &[u64]) -> BTreeMap<u64, usize> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = statuses(cluster, nodes).await;
        let placed = placement(&all);
        let mut load: BTreeMap<u64, usize> = nodes.iter().map(|&n| (n, 0)).collect();
        for (replicas, _) in placed.values() {
            replicas.iter().for_each(|n| *load.entry(*n).or_default() += 1);
        }
        let settled = placed.len() == SHARDS as usize
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
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let four = cluster.spawn_joining(&[1]).await;
    let five = cluster.spawn_joining(&[2]).await;
    let all = [1, 2, 3, four, five];
    let load = wait_balanced(&cluster, &all).await;
    println!("balanced after {:?}: {load:?}", started.elapsed());
    // 24 replicas over 5 nodes: 4 or 5 each, the new nodes included.
    assert!(load.values().all(|&l| l == 4 || l == 5), "{load:?}");
    assert_eq!(load.values().sum::<usize>(), 24);

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
    assert_eq!(client.replicas_on(4).await.unwrap(), 0);
    assert_eq!(assert_every_replica_holds(&cluster, &[1, 2, 3], SHARDS, &book).await, 12);
}
