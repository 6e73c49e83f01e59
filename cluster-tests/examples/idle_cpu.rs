//! Idle cost of the default shard count (docs/shards.md, "Idle cost"): 3
//! real `portraitd` processes, 64 shards each replicated on all three, left
//! idle; each process's CPU time (utime + stime from /proc/PID/stat) over
//! 20 s, with quiet idle groups on and then off. Part of `make bench`.

use std::time::{Duration, Instant};

use portrait_cluster_tests::cpu::{clock_ticks, cpu_ticks};
use portrait_cluster_tests::Cluster;

const NODES: u64 = 3;
const SHARDS: u32 = 64;
/// Idle time after the cluster formed, before measuring: the last
/// membership entries commit and every leader comes to rest.
const SETTLE: Duration = Duration::from_secs(10);
const MEASURE: Duration = Duration::from_secs(20);

/// Each node's CPU use while idle, in % of one core.
async fn idle_cpu(quiet: bool) -> Vec<f64> {
    let config = format!("[raft]\nquiet_idle_groups = {quiet}\n");
    let cluster = Cluster::start_sharded_with_config(NODES, SHARDS, &config).await;
    tokio::time::sleep(SETTLE).await;
    let pids: Vec<u32> = cluster.nodes.iter().map(|n| n.pid().expect("running")).collect();
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let started = Instant::now();
    tokio::time::sleep(MEASURE).await;
    let after: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let secs = started.elapsed().as_secs_f64() * clock_ticks() as f64;
    before.iter().zip(&after).map(|(b, a)| 100.0 * (a - b) as f64 / secs).collect()
}

#[tokio::main]
async fn main() {
    println!(
        "Idle CPU: {NODES} nodes, {SHARDS} shards x RF {NODES}, {} s idle after {} s settling, % of one core",
        MEASURE.as_secs(),
        SETTLE.as_secs()
    );
    println!(
        "| {:<24} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "quiet idle groups", "node 1", "node 2", "node 3", "mean"
    );
    println!("|{:-<26}|{:-<10}|{:-<10}|{:-<10}|{:-<10}|", "", "", "", "", "");
    let mut means = Vec::new();
    for quiet in [true, false] {
        let cpu = idle_cpu(quiet).await;
        let mean = cpu.iter().sum::<f64>() / cpu.len() as f64;
        let name = if quiet { "on (default)" } else { "off" };
        println!("| {name:<24} | {:>7.2}% | {:>7.2}% | {:>7.2}% | {mean:>7.2}% |", cpu[0], cpu[1], cpu[2]);
        means.push(mean);
    }
    println!("off / on: {:.1}x", means[1] / means[0].max(f64::MIN_POSITIVE));
}
