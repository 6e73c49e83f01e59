//! Elastic scaling benchmark on real `portraitd` processes (loopback, one
//! machine). Part of `make bench`.
//!
//! 1. **Moves**: 3 nodes, 8 shards × RF 3, loaded with 10,000 page views
//!    of 4 KB (pages that do not compress); the logs are purged behind
//!    snapshots every 100 entries, so moved replicas are filled by
//!    snapshot (sent at the default 100 MB/s per sending node). One writer
//!    writes batches of 10 orders throughout. 10 s of writes give the
//!    latency before; then two nodes join and the cluster moves replicas
//!    and leaderships until balanced. Printed: the time to balance, the
//!    logical data the new nodes received (`ShardStatus.state_bytes`) and
//!    the snapshot bytes sent (`ClusterStatus.snapshot_bytes_sent`) per
//!    second of moving, and the write p50 / p99 before and during the moves
//!    (same run: the ratio is what compares).
//! 2. **Work per node**: the same 48,000 orders written on a new 3-node
//!    cluster and on a new 6-node one (balanced): per node the raft entries
//!    it applied (its replicas' applied indexes) and its CPU time (`/proc`),
//!    and the 6-node mean as a ratio of the 3-node one (RF 3 over N nodes:
//!    about 3 / N of the entries each, so about 0.5; CPU also has per-node
//!    costs that do not shrink: client calls, forwarding, idle work).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use portrait_client::{Event, PortraitClient};
use portrait_cluster_tests::cpu::cpu_time;
use portrait_cluster_tests::replicas::{statuses, wait_leaders_balanced};
use portrait_cluster_tests::workload::{bulk_view, order_of, percentile};
use portrait_cluster_tests::Cluster;

const SHARDS: u32 = 8;
const BULK_USERS: usize = 10_000;
const ORDERS: usize = 48_000;

/// Write latencies of one writer until `until` says stop.
async fn write_for(client: &PortraitClient, tag: &str, mut until: impl FnMut() -> bool) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut seq = 0usize;
    while !until() {
        let events: Vec<Event> = (0..10)
            .map(|j| order_of(&format!("w{}", (seq * 10 + j) % 5_000), &format!("{tag}-{seq}-{j}")))
            .collect();
        let started = Instant::now();
        if client.write(events).await.is_ok() {
            latencies.push(started.elapsed());
        }
        seq += 1;
    }
    latencies
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Whether every node of `nodes` holds within one replica of the others,
/// every shard has 3 voters and a leader, and no shard has a learner.
async fn balanced(cluster: &Cluster, nodes: &[u64]) -> bool {
    let all = statuses(cluster, nodes).await;
    let mut load: BTreeMap<u64, usize> = nodes.iter().map(|&n| (n, 0)).collect();
    let mut led = 0;
    for s in all.values().flat_map(|s| &s.shard_status) {
        if s.role == "Leader" {
            led += 1;
            if s.voters.len() != 3 || !s.learners.is_empty() {
                return false;
            }
            s.voters.iter().for_each(|v| *load.entry(*v).or_default() += 1);
        }
    }
    let (min, max) = (load.values().min().copied().unwrap_or(0), load.values().max().copied().unwrap_or(0));
    led == SHARDS as usize && max - min <= 1
}

/// Per node: raft entries applied (sum of its replicas' applied indexes)
/// and CPU time.
async fn work(cluster: &Cluster, nodes: &[u64]) -> BTreeMap<u64, (u64, Duration)> {
    let all = statuses(cluster, nodes).await;
    nodes
        .iter()
        .map(|&n| {
            let applied = all[&n].shard_status.iter().map(|s| s.applied_index).sum();
            (n, (applied, cpu_time(cluster.node(n).pid().expect("running"))))
        })
        .collect()
}

/// Writes `ORDERS` orders (batches of 100, 4 clients) and returns each
/// node's applied entries and CPU time spent meanwhile, once every replica
/// has applied them.
async fn measure_work(cluster: &Cluster, nodes: &[u64], tag: &str) -> BTreeMap<u64, (u64, f64)> {
    let before = work(cluster, nodes).await;
    let mut writers = Vec::new();
    for c in 0..4 {
        let client = cluster.client(nodes[c % nodes.len()]).await;
        let tag = tag.to_string();
        writers.push(tokio::spawn(async move {
            for b in (c..ORDERS / 100).step_by(4) {
                let events: Vec<Event> = (0..100)
                    .map(|j| order_of(&format!("m{}", (b * 100 + j) % 20_000), &format!("{tag}-{b}-{j}")))
                    .collect();
                while client.write(events.clone()).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // Every replica caught up: applied indexes stop moving.
    let mut last = work(cluster, nodes).await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = work(cluster, nodes).await;
        if now.iter().all(|(n, (a, _))| last[n].0 == *a) {
            break;
        }
        last = now;
    }
    last.iter().map(|(n, (a, cpu))| (*n, (a - before[n].0, (*cpu - before[n].1).as_secs_f64()))).collect()
}

fn print_work(label: &str, w: &BTreeMap<u64, (u64, f64)>) -> (f64, f64) {
    let n = w.len() as f64;
    let entries = w.values().map(|(a, _)| *a as f64).sum::<f64>() / n;
    let cpu = w.values().map(|(_, c)| *c).sum::<f64>() / n;
    let rows: Vec<String> = w.iter().map(|(id, (a, c))| format!("{id}: {a} entries {c:.2} s")).collect();
    println!("  {label}: mean {entries:.0} entries, {cpu:.2} s CPU per node ({})", rows.join(", "));
    (entries, cpu)
}

#[tokio::main]
async fn main() {
    println!("elastic scaling: 8 shards x RF 3, one machine (loopback)");
    let config = "[raft]\nsnapshot_every_entries = 100\nkeep_logs_after_snapshot = 10\n";
    let mut cluster = Cluster::start_sharded_with_config(3, SHARDS, config).await;
    let three = [1, 2, 3];
    wait_leaders_balanced(&cluster, &three, SHARDS, Duration::from_secs(60)).await;

    // Bulk data.
    let loader = cluster.client(1).await;
    let started = Instant::now();
    let bulk: Vec<Event> = (0..BULK_USERS).map(bulk_view).collect();
    for chunk in bulk.chunks(50) {
        while loader.write(chunk.to_vec()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!("  loaded {BULK_USERS} page views of 4 KB in {:.1} s", started.elapsed().as_secs_f64());

    // Part 1: latency before, then during the moves.
    let writer = cluster.client(2).await;
    let end = Instant::now() + Duration::from_secs(10);
    let mut before = write_for(&writer, "before", || Instant::now() >= end).await;
    // Node 1 holds every shard: its replicas' logical sizes are the data.
    let logical: u64 = statuses(&cluster, &[1])
        .await
        .values()
        .flat_map(|s| &s.shard_status)
        .filter_map(|s| s.state_bytes)
        .sum();
    let sent_before: u64 = statuses(&cluster, &three).await.values().map(|s| s.snapshot_bytes_sent).sum();

    let moving = Instant::now();
    let four = cluster.spawn_joining(&[1]).await;
    let five = cluster.spawn_joining(&[1]).await;
    let five_nodes = [1, 2, 3, four, five];
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let during = tokio::spawn(async move {
        write_for(&writer, "during", || flag.load(std::sync::atomic::Ordering::Relaxed)).await
    });
    while !balanced(&cluster, &five_nodes).await {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let replicas_moved = moving.elapsed();
    wait_leaders_balanced(&cluster, &five_nodes, SHARDS, Duration::from_secs(120)).await;
    let all_balanced = moving.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut during = during.await.unwrap();
    let after = statuses(&cluster, &five_nodes).await;
    let sent = (after.values().map(|s| s.snapshot_bytes_sent).sum::<u64>() - sent_before) as f64 / 1e6;
    let received =
        [four, five].iter().flat_map(|n| &after[n].shard_status).filter_map(|s| s.state_bytes).sum::<u64>()
            as f64
            / 1e6;
    let secs = replicas_moved.as_secs_f64();
    println!(
        "  3 -> 5 nodes: replicas balanced in {secs:.1} s, leaders in {:.1} s; the new nodes received \
         {received:.1} MB of logical data ({:.1} MB/s), {sent:.1} MB of snapshots sent ({:.1} MB/s); \
         data {:.1} MB (one copy)",
        all_balanced.as_secs_f64(),
        received / secs,
        sent / secs,
        logical as f64 / 1e6,
    );
    let (b50, b99) = (percentile(&mut before, 0.5), percentile(&mut before, 0.99));
    let (d50, d99) = (percentile(&mut during, 0.5), percentile(&mut during, 0.99));
    println!(
        "  write of 10 orders, one writer: before p50 {:.1} ms p99 {:.1} ms ({} writes); during the moves \
         p50 {:.1} ms p99 {:.1} ms ({} writes); p99 during / before {:.2}",
        ms(b50),
        ms(b99),
        before.len(),
        ms(d50),
        ms(d99),
        during.len(),
        ms(d99) / ms(b99)
    );

    drop(cluster);

    // Part 2: work per node, on a new 3-node and a new 6-node cluster.
    let small = Cluster::start_sharded(3, SHARDS).await;
    wait_leaders_balanced(&small, &three, SHARDS, Duration::from_secs(60)).await;
    let w3 = measure_work(&small, &three, "three").await;
    drop(small);
    let big = Cluster::start_sharded(6, SHARDS).await;
    let six_nodes = [1, 2, 3, 4, 5, 6];
    while !balanced(&big, &six_nodes).await {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_leaders_balanced(&big, &six_nodes, SHARDS, Duration::from_secs(120)).await;
    let w6 = measure_work(&big, &six_nodes, "six").await;
    println!("work per node for {ORDERS} orders (batches of 100, 4 clients):");
    let (e3, c3) = print_work("3 nodes", &w3);
    let (e6, c6) = print_work("6 nodes", &w6);
    println!("  6 nodes / 3 nodes per node: entries applied {:.2}, CPU {:.2}", e6 / e3, c6 / c3);
}
