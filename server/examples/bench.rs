//! Single-node benchmark: ingest (batches of 100 events, 1 and 32 concurrent
//! clients) and GetProfile (1 and 32 concurrent clients) against a real node
//! (RocksDB on a temp dir, raft, gRPC over loopback), once per shard count
//! (`--shards`, default 1 and 16: the multi-raft overhead). Prints a table,
//! with the log fsyncs per second, and each shard count's ingest rate as a
//! ratio of the first's (same run).
//! The clients run in this process: each scenario's requests are built
//! before its clock starts, so what is timed is encoding, sending and the
//! node's work.
//!
//! Run: `make bench` (or `cargo run --release -p portrait-server --example bench -- --help`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use portrait_proto::v1::ingest_client::IngestClient;
use portrait_proto::v1::profiles_client::ProfilesClient;
use portrait_proto::v1::{Event, GetProfileRequest, Value, WriteRequest};
use portrait_server::node::{Node, NodeOptions};
use portrait_server::raft::RaftTuning;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// Events ingested per ingest scenario.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per Write call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Distinct users the events spread over.
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// GetProfile calls per read scenario.
    #[arg(long, default_value_t = 50_000)]
    reads: usize,
    /// Client counts for the ingest scenarios, comma-separated (empty: skip).
    #[arg(long, default_value = "1,32", value_parser = counts)]
    ingest_clients: Counts,
    /// Client counts for the read scenarios, comma-separated (empty: skip).
    #[arg(long, default_value = "1,32", value_parser = counts)]
    read_clients: Counts,
    /// Shard counts to run every scenario with, each on a new node.
    #[arg(long, default_value = "1,16", value_parser = counts)]
    shards: Counts,
}

/// A comma-separated list of client counts; empty is an empty list.
#[derive(Clone)]
struct Counts(Vec<usize>);

fn counts(text: &str) -> Result<Counts, String> {
    let parse = |n: &str| n.trim().parse().map_err(|e| format!("{n:?}: {e}"));
    text.split(',').filter(|n| !n.trim().is_empty()).map(parse).collect::<Result<_, _>>().map(Counts)
}

struct Row {
    shards: usize,
    scenario: String,
    clients: usize,
    ops: usize,
    events: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Log fsyncs of the node during the scenario.
    fsyncs: u64,
    /// Raft log entries appended during the scenario, over every group.
    entries: u64,
    /// CPU time of this process (node and clients) during the scenario.
    cpu: Duration,
}

/// What a scenario's row measures on the node besides time.
struct Counters {
    fsyncs: u64,
    entries: u64,
    cpu: Duration,
}

impl Counters {
    fn now(node: &Node) -> Counters {
        let status = node.status();
        let entries = status.shard_status.iter().map(|s| s.last_log_index).sum();
        Counters { fsyncs: node.log_fsyncs(), entries, cpu: process_cpu() }
    }

    /// Fills `row`'s counters with what happened since `self`.
    fn since(self, node: &Node, row: &mut Row) {
        let now = Counters::now(node);
        row.fsyncs = now.fsyncs - self.fsyncs;
        row.entries = now.entries - self.entries;
        row.cpu = now.cpu.saturating_sub(self.cpu);
    }
}

/// User plus system CPU time of this process so far (`/proc/self/stat`,
/// in clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after it.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

impl Row {
    fn print(&mut self) {
        self.latencies.sort();
        let pct = |p: f64| {
            self.latencies[((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1)]
        };
        let secs = self.elapsed.as_secs_f64();
        println!(
            "| {:>6} | {:<28} | {:>7} | {:>10.0} | {:>12.0} | {:>9.3} | {:>9.3} | {:>9.0} | {:>9.1} | {:>9.1} |",
            self.shards,
            self.scenario,
            self.clients,
            self.ops as f64 / secs,
            self.events as f64 / secs,
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            self.fsyncs as f64 / secs,
            self.events as f64 / self.entries.max(1) as f64,
            self.cpu.as_secs_f64() * 1e6 / self.events as f64,
        );
    }

    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    println!(
        "Portrait single-node benchmark: {} events/scenario, batch {}, {} users",
        args.events, args.batch, args.users
    );
    println!(
        "| {:>6} | {:<28} | {:>7} | {:>10} | {:>12} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9} |",
        "shards",
        "scenario",
        "clients",
        "ops/s",
        "events/s",
        "p50 ms",
        "p99 ms",
        "fsyncs/s",
        "ev/entry",
        "cpu µs/ev"
    );
    println!(
        "|{:-<8}|{:-<30}|{:-<9}|{:-<12}|{:-<14}|{:-<11}|{:-<11}|{:-<11}|{:-<11}|{:-<11}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    let mut ingest_rates: Vec<(usize, Vec<(f64, f64)>)> = Vec::new();
    for &shards in &args.shards.0 {
        ingest_rates.push((shards, run_node(&args, shards).await?));
    }
    // Same-run ratios: each shard count's ingest rate against the first's.
    if let Some((base, base_rates)) = ingest_rates.first() {
        for (shards, rates) in &ingest_rates[1..] {
            let ratios: Vec<String> = rates
                .iter()
                .zip(base_rates)
                .zip(&args.ingest_clients.0)
                .map(|((r, b), clients)| {
                    format!("{clients} clients {:.2} (CPU per event {:.2}x)", r.0 / b.0, r.1 / b.1)
                })
                .collect();
            println!("ingest events/s, {shards} shards / {base}: {}", ratios.join(", "));
        }
    }
    Ok(())
}

/// Starts a node of `shards` shards on a new temp dir, runs every
/// scenario, prints the rows; returns the ingest scenarios' events/s and
/// CPU seconds per event.
async fn run_node(args: &Arc<Args>, shards: usize) -> anyhow::Result<Vec<(f64, f64)>> {
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let peer = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let peer_addr = peer.local_addr()?;
    let node = Node::start(NodeOptions {
        node_id: 1,
        data_dir: dir.path().to_path_buf(),
        advertise: format!("http://{addr}"),
        peer_advertise: format!("http://{peer_addr}"),
        bootstrap: true,
        tuning: RaftTuning::default(),
        fault_injection: false,
        clock: Default::default(),
        shards: Some(shards as u32),
        replication: None,
        seeds: Vec::new(),
        max_moves: portrait_server::node::DEFAULT_MAX_MOVES,
        replica_dead_after: portrait_server::node::DEFAULT_REPLICA_DEAD_AFTER,
        backup_stream_stall: portrait_server::limits::BACKUP_STREAM_STALL,
    })
    .await?;
    anyhow::ensure!(node.wait_for_leader(Duration::from_secs(10)).await, "no leader");
    tokio::spawn(portrait_server::service::serve(
        node.clone(),
        portrait_server::service::Listeners { client: listener, peer },
        portrait_server::service::Security::none(1),
        std::future::pending(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut rates = Vec::new();
    for (i, &clients) in args.ingest_clients.0.iter().enumerate() {
        let before = Counters::now(&node);
        let mut row = ingest(&channel, args, clients, i).await?;
        row.shards = shards;
        before.since(&node, &mut row);
        row.print();
        rates.push((row.events_per_sec(), row.cpu.as_secs_f64() / row.events as f64));
    }
    for &clients in &args.read_clients.0 {
        let before = Counters::now(&node);
        let mut row = reads(&channel, args, clients).await?;
        row.shards = shards;
        before.since(&node, &mut row);
        row.print();
    }
    node.shutdown().await;
    Ok(rates)
}

fn synthetic_event(seq: usize, run: usize, users: usize, now: i64) -> Event {
    let categories = ["phone", "laptop", "tv", "shoes", "books", "toys", "food", "beauty"];
    let family = if seq.is_multiple_of(10) { "trade" } else { "browse" };
    let mut attrs = std::collections::HashMap::new();
    attrs.insert("category".to_string(), Value::string(categories[seq % categories.len()]));
    attrs.insert("price".to_string(), Value::double((seq % 5000) as f64 / 10.0));
    attrs.insert("page".to_string(), Value::int((seq % 37) as i64));
    Event {
        user_id: format!("user-{}", (seq * 7919) % users),
        family: family.into(),
        r#type: if family == "trade" { "order".into() } else { "view".into() },
        event_time_ms: now - (seq % 86_400) as i64 * 1000,
        event_id: format!("r{run}-e{seq}"),
        attrs,
    }
}

async fn ingest(channel: &Channel, args: &Arc<Args>, clients: usize, run: usize) -> anyhow::Result<Row> {
    let batches = args.events / args.batch;
    // The requests are made before the clock starts: on 2 cores, building
    // them (strings and attribute maps per event) took CPU from the node,
    // and a real producer runs elsewhere. Encoding and sending stay timed.
    let now = portrait_server::wall_clock_ms();
    let requests: Vec<WriteRequest> = (0..batches)
        .map(|b| WriteRequest {
            events: (0..args.batch)
                .map(|i| synthetic_event(b * args.batch + i, run, args.users, now))
                .collect(),
        })
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(requests.into_iter()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (mut client, queue) = (IngestClient::new(channel.clone()), queue.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(request) = queue.lock().expect("request queue").next() else {
                    return Ok::<_, tonic::Status>(lat);
                };
                let t = Instant::now();
                client.write(request).await?;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(Row {
        scenario: format!("Write (batch {})", args.batch),
        clients,
        ops: batches,
        events: batches * args.batch,
        elapsed: start.elapsed(),
        latencies,
        shards: 0,
        fsyncs: 0,
        entries: 0,
        cpu: Duration::ZERO,
    })
}

async fn reads(channel: &Channel, args: &Arc<Args>, clients: usize) -> anyhow::Result<Row> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (mut client, args, next) = (ProfilesClient::new(channel.clone()), args.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= args.reads {
                    return Ok::<_, tonic::Status>(lat);
                }
                let user_id = format!("user-{}", (i * 7919) % args.users);
                let t = Instant::now();
                client.get_profile(GetProfileRequest { user_id, ..Default::default() }).await?;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(Row {
        scenario: "GetProfile".into(),
        clients,
        ops: args.reads,
        events: 0,
        elapsed: start.elapsed(),
        latencies,
        shards: 0,
        fsyncs: 0,
        entries: 0,
        cpu: Duration::ZERO,
    })
}
