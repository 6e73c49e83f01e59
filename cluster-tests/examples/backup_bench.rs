//! Online backup and restore benchmark on real `portraitd` processes
//! (loopback, one machine). Part of `make bench`.
//!
//! A 3-node cluster (8 shards × RF 3) is loaded with 10,000 page views of
//! 4 KB (pages that do not compress). One writer writes batches of 10
//! orders throughout: 10 s give the latency before; then the whole cluster
//! is backed up (`portrait_client::backup::backup`, what `portrait backup`
//! runs) while it writes on. Printed: the backup's size and MB/s, and the
//! write p50 / p99 during the backup against before (same run: the ratio is
//! what compares). Then the backup is restored into a new 3-node cluster
//! (`restore`: every shard's rows through its raft log) and the restore's
//! MB/s printed, with a check that a sample of users reads back the same.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portrait_client::backup::{backup, restore};
use portrait_client::{Consistency, Event, PortraitClient};
use portrait_cluster_tests::replicas::wait_leaders_balanced;
use portrait_cluster_tests::workload::{bulk_view, order_of, percentile};
use portrait_cluster_tests::Cluster;

const SHARDS: u32 = 8;
const BULK_USERS: usize = 10_000;

/// Write latencies of one writer until `stop`.
async fn write_until(client: PortraitClient, tag: &'static str, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut seq = 0usize;
    while !stop.load(Ordering::Relaxed) {
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

/// `p`-quantile latency in milliseconds.
fn percentile_ms(latencies: &mut [Duration], p: f64) -> f64 {
    percentile(latencies, p).as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    println!("online backup and restore: 8 shards x RF 3 on 3 nodes, one machine (loopback)");
    let source = Cluster::start_sharded(3, SHARDS).await;
    wait_leaders_balanced(&source, &[1, 2, 3], SHARDS, Duration::from_secs(60)).await;
    let loader = source.client(1).await;
    let bulk: Vec<Event> = (0..BULK_USERS).map(bulk_view).collect();
    for chunk in bulk.chunks(50) {
        while loader.write(chunk.to_vec()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(source.client(2).await, "before", stop.clone()));
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let mut before = writer.await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(source.client(2).await, "during", stop.clone()));
    let dir = tempfile::tempdir().unwrap();
    let backup_dir = dir.path().join("backup");
    let started = Instant::now();
    let manifest = backup(&loader, &backup_dir, |_| {}).await.expect("backup");
    let backup_secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut during = writer.await.unwrap();
    let mb = manifest.shard_files.iter().map(|f| f.bytes).sum::<u64>() as f64 / 1e6;
    println!(
        "  backup of {mb:.1} MB ({} shards) in {backup_secs:.1} s: {:.1} MB/s",
        SHARDS,
        mb / backup_secs
    );
    let (b50, b99) = (percentile_ms(&mut before, 0.5), percentile_ms(&mut before, 0.99));
    let (d50, d99) = (percentile_ms(&mut during, 0.5), percentile_ms(&mut during, 0.99));
    println!(
        "  write of 10 orders, one writer: before p50 {b50:.1} ms p99 {b99:.1} ms ({} writes); during the \
         backup p50 {d50:.1} ms p99 {d99:.1} ms ({} writes); p99 during / before {:.2}",
        before.len(),
        during.len(),
        d99 / b99
    );
    drop(source);

    let target = Cluster::start_sharded(3, SHARDS).await;
    wait_leaders_balanced(&target, &[1, 2, 3], SHARDS, Duration::from_secs(60)).await;
    let client = target.client(1).await;
    let started = Instant::now();
    let restored = restore(&client, &backup_dir, |_| {}).await.expect("restore");
    let restore_secs = started.elapsed().as_secs_f64();
    let rows: u64 = restored.iter().map(|r| r.rows).sum();
    let logical = restored.iter().map(|r| r.bytes).sum::<u64>() as f64 / 1e6;
    println!(
        "  restore into a new 3-node cluster: {rows} rows, {logical:.1} MB of keys and values in \
         {restore_secs:.1} s: {:.1} MB/s of archive, {:.1} MB/s of rows",
        mb / restore_secs,
        logical / restore_secs
    );
    let sample: Vec<String> = (0..BULK_USERS).step_by(97).map(|i| format!("bulk{i}")).collect();
    let got = client.batch_get_profiles(&sample, &[], Consistency::Linearizable).await.expect("read");
    let found = got.profiles.iter().filter(|p| p.families.contains_key("browse")).count();
    assert_eq!(found, sample.len(), "every sampled user restored");
    println!("  {found} of {} sampled users read back after the restore", sample.len());
}
