//! A replica move interrupted by a crash, on real `portraitd` processes.
//!
//! Three nodes hold two shards with a few MB of data each; snapshots are
//! sent at 2 MB/s (2 MB chunks) and the logs are purged behind frequent
//! snapshots down to 5 entries, so the replica a fourth node receives is
//! filled by a snapshot that takes seconds, and the writers append far more
//! than 5 entries meanwhile: the leader holds its log for the new replica
//! (log policy), else it would need snapshot after snapshot. While its first chunk is out, the test kills the
//! move's target, or separately its source (the replica it replaces).
//! Two writers keep writing orders throughout, with retries under the same
//! event ids: no shard may stop taking writes (none loses its quorum), the
//! move must resume (target restarted), complete without the source, or,
//! the target gone for good, end on the nodes left, and every replica of
//! every shard must hold each user's orders exactly once.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portrait_client::{Event, PortraitClient};
use portrait_cluster_tests::replicas::{assert_every_replica_holds, statuses, wait_placed, Book};
use portrait_cluster_tests::workload::{bulk_view, order_of};
use portrait_cluster_tests::Cluster;

const SHARDS: u32 = 2;
/// Bulk data: this many users with one 4 KB page view each (about 3 MB
/// of pages per shard, 2 per request: over 500 entries per shard, so the
/// logs are purged before the fourth node joins).
const BULK_USERS: usize = 1_500;
const CONFIG: &str = "replication = 3\n[raft]\nsnapshot_every_entries = 50\nkeep_logs_after_snapshot = 5\n\
                      snapshot_send_mb_per_sec = 2\n";

/// Writes the bulk page views, 2 per request.
async fn load_bulk(client: &PortraitClient) {
    let events: Vec<Event> = (0..BULK_USERS).map(bulk_view).collect();
    for chunk in events.chunks(2) {
        let written = client.write(chunk.to_vec()).await.expect("bulk write");
        // A retried request finds its applied part as duplicates.
        assert_eq!((written.applied + written.duplicates) as usize, chunk.len(), "{written:?}");
    }
}

/// One writer of orders: request `seq` holds 2 orders (ids `w<id>-<seq>-<j>`)
/// of 200 users, retried with the same ids on the next client until
/// acknowledged or the test stops.
async fn write(id: usize, clients: Vec<PortraitClient>, book: Arc<Mutex<Book>>, stop: Arc<AtomicBool>) {
    let mut next = id;
    for seq in 0.. {
        let events: Vec<Event> = (0..2)
            .map(|j| order_of(&format!("u{}", (id * 101 + seq * 2 + j) % 200), &format!("w{id}-{seq}-{j}")))
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
        // Well inside the trade history of 100 per user.
        if seq >= 2_000 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A move to node `to` under way: its shard, the move's source (a voter of
/// the shard the map no longer places it on) and the shard's leader, once
/// the leader has sent a snapshot chunk since `sent_before` (per node).
async fn move_in_flight(
    cluster: &Cluster,
    nodes: &[u64],
    to: u64,
    sent_before: &std::collections::BTreeMap<u64, u64>,
) -> (u32, u64, u64) {
    let client = cluster.client(1).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let map = client.shard_map().await.expect("map");
        let all = statuses(cluster, nodes).await;
        for (&leader, status) in &all {
            let sending = status.snapshot_bytes_sent > sent_before.get(&leader).copied().unwrap_or(0);
            for s in status.shard_status.iter().filter(|s| s.role == "Leader" && s.learners.contains(&to)) {
                let wanted: BTreeSet<u64> =
                    map.shard_replicas[s.shard as usize].replicas.iter().map(|r| r.node_id).collect();
                let source = s.voters.iter().copied().find(|v| !wanted.contains(v));
                if let (true, Some(source)) = (sending, source) {
                    return (s.shard, source, leader);
                }
            }
        }
        assert!(Instant::now() < deadline, "no move to node {to} with a snapshot under way: {all:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the leader of each shard of `shards` reports the map's
/// replicas as its voters and no learner, with the replicas on `nodes` only.
async fn wait_settled(cluster: &Cluster, nodes: &[u64], via: u64, shards: &[u32]) {
    let client = cluster.client(via).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let map = client.shard_map().await.expect("map");
        let all = statuses(cluster, nodes).await;
        let settled = shards.iter().all(|&shard| {
            let wanted: BTreeSet<u64> =
                map.shard_replicas[shard as usize].replicas.iter().map(|r| r.node_id).collect();
            wanted.iter().all(|n| nodes.contains(n))
                && all.values().flat_map(|s| &s.shard_status).any(|s| {
                    s.shard == shard
                        && s.role == "Leader"
                        && s.learners.is_empty()
                        && s.voters.iter().copied().collect::<BTreeSet<_>>() == wanted
                })
        });
        if settled {
            return;
        }
        assert!(Instant::now() < deadline, "moves not settled on {nodes:?}: {map:?} {all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

type Loaded = (Cluster, Arc<Mutex<Book>>, Arc<AtomicBool>, Vec<tokio::task::JoinHandle<()>>);

/// Starts the loaded three-node cluster and two writers.
async fn loaded() -> Loaded {
    loaded_with(CONFIG).await
}

async fn loaded_with(config: &str) -> Loaded {
    let cluster = Cluster::start_sharded_with_config(3, SHARDS, config).await;
    wait_placed(&cluster, &[1, 2, 3], SHARDS).await;
    load_bulk(&cluster.client(1).await).await;
    let book = Arc::new(Mutex::new(Book::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 1..=3 {
        clients.push(cluster.client(id).await);
    }
    let writers =
        (0..2).map(|w| tokio::spawn(write(w, clients.clone(), book.clone(), stop.clone()))).collect();
    (cluster, book, stop, writers)
}

/// Waits until the writers' acknowledgements grow by `more` within 30 s.
async fn writes_go_on(book: &Mutex<Book>, more: usize, what: &str) {
    let start = book.lock().unwrap().acked_total();
    let deadline = Instant::now() + Duration::from_secs(30);
    while book.lock().unwrap().acked_total() < start + more {
        assert!(Instant::now() < deadline, "writes stopped {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop_writers(
    book: &Mutex<Book>,
    stop: &AtomicBool,
    writers: Vec<tokio::task::JoinHandle<()>>,
) -> Book {
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let book = book.lock().unwrap().clone();
    assert!(book.acked_total() > 50, "the writers made progress: {}", book.acked_total());
    book
}

#[tokio::test]
async fn killing_the_target_mid_snapshot_leaves_every_shard_writable_and_the_move_resumes() {
    let (mut cluster, book, stop, writers) = loaded().await;
    let before: std::collections::BTreeMap<u64, u64> =
        statuses(&cluster, &[1, 2, 3]).await.into_iter().map(|(id, s)| (id, s.snapshot_bytes_sent)).collect();
    let four = cluster.spawn_joining(&[1]).await;
    let (shard, source, leader) = move_in_flight(&cluster, &[1, 2, 3], four, &before).await;
    cluster.kill(four);
    println!(
        "killed node {four} mid-snapshot: shard {shard} moving from node {source}, sent by node {leader}"
    );

    // The shard keeps its three voters: every shard takes writes.
    writes_go_on(&book, 40, "after the target died").await;
    let status = &statuses(&cluster, &[leader]).await[&leader];
    let s = status.shard_status.iter().find(|s| s.shard == shard).expect("the shard on its leader");
    assert!(s.voters.contains(&source) && !s.voters.contains(&four), "{s:?}");

    // Back again, the target gets its snapshot anew and the move finishes.
    let restarted = Instant::now();
    cluster.restart(four).await;
    wait_settled(&cluster, &[1, 2, 3, four], 1, &[0, 1]).await;
    println!("move finished {:?} after the target came back", restarted.elapsed());
    let book = stop_writers(&book, &stop, writers).await;
    assert_eq!(assert_every_replica_holds(&cluster, &[1, 2, 3, four], SHARDS, &book).await, 6);
}

#[tokio::test]
async fn killing_the_source_mid_snapshot_leaves_every_shard_writable_and_the_move_completes() {
    let (mut cluster, book, stop, writers) = loaded().await;
    let before: std::collections::BTreeMap<u64, u64> =
        statuses(&cluster, &[1, 2, 3]).await.into_iter().map(|(id, s)| (id, s.snapshot_bytes_sent)).collect();
    let four = cluster.spawn_joining(&[1]).await;
    let (shard, source, leader) = move_in_flight(&cluster, &[1, 2, 3], four, &before).await;
    cluster.kill(source);
    println!("killed node {source} mid-snapshot: shard {shard} moving to node {four}, sent by node {leader}");
    let living: Vec<u64> = [1, 2, 3, four].into_iter().filter(|&n| n != source).collect();

    // Two of three voters of every shard live: writes go on, and the move
    // completes without the source (the new leader, if the source led,
    // sends the snapshot again).
    writes_go_on(&book, 40, "after the source died").await;
    let via = living[0];
    wait_settled(&cluster, &living, via, &[shard]).await;
    let placed: Vec<u64> = cluster.client(via).await.shard_map().await.expect("map").shard_replicas
        [shard as usize]
        .replicas
        .iter()
        .map(|r| r.node_id)
        .collect();
    assert!(placed.contains(&four) && !placed.contains(&source), "{placed:?}");

    // The source comes back: its other replicas catch up, the moved one is
    // dropped (it knows no leader: it asks the nodes the map places the
    // shard on).
    cluster.restart(source).await;
    let all = [1, 2, 3, four];
    wait_settled(&cluster, &all, via, &[0, 1]).await;
    let restarted = Instant::now();
    loop {
        let status = &statuses(&cluster, &[source]).await[&source];
        if status.shard_status.iter().all(|s| s.shard != shard) {
            break;
        }
        let waited = restarted.elapsed();
        assert!(waited < Duration::from_secs(20), "node {source} still hosts shard {shard}: {status:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("the source dropped its moved replica {:?} after its restart", restarted.elapsed());
    let book = stop_writers(&book, &stop, writers).await;
    assert_eq!(assert_every_replica_holds(&cluster, &all, SHARDS, &book).await, 6);
}

#[tokio::test]
async fn a_move_whose_target_dies_for_good_ends_on_the_nodes_left() {
    let config = format!("replica_dead_after = \"6s\"\n{CONFIG}");
    let (mut cluster, book, stop, writers) = loaded_with(&config).await;
    let before: std::collections::BTreeMap<u64, u64> =
        statuses(&cluster, &[1, 2, 3]).await.into_iter().map(|(id, s)| (id, s.snapshot_bytes_sent)).collect();
    let four = cluster.spawn_joining(&[1]).await;
    let (shard, source, leader) = move_in_flight(&cluster, &[1, 2, 3], four, &before).await;
    cluster.kill(four);
    let killed = Instant::now();
    println!("killed node {four} for good mid-snapshot: shard {shard} was moving from node {source}");
    writes_go_on(&book, 40, "after the target died").await;
    // It died a learner: the move can end only by moving that replica on.
    let status = &statuses(&cluster, &[leader]).await[&leader];
    let s = status.shard_status.iter().find(|s| s.shard == shard).expect("the shard on its leader");
    assert!(s.voters.contains(&source) && !s.voters.contains(&four), "{s:?}");

    // Its learner never caught up, so the move stays open until node 4 is
    // taken for dead and drained: its replicas then go back to the nodes
    // left, and the drain ends (the node can be removed).
    wait_settled(&cluster, &[1, 2, 3], 1, &[0, 1]).await;
    println!("every shard settled on nodes 1-3 {:?} after the kill", killed.elapsed());
    let admin = cluster.client(1).await;
    let removed = admin.remove_node(four).await.expect("remove the dead, drained node");
    assert_eq!(removed.members.iter().map(|m| m.node_id).collect::<Vec<_>>(), [1, 2, 3]);
    writes_go_on(&book, 40, "after node 4 was removed").await;
    let book = stop_writers(&book, &stop, writers).await;
    assert_eq!(assert_every_replica_holds(&cluster, &[1, 2, 3], SHARDS, &book).await, 6);
}
