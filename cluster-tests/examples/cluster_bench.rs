//! 3-node benchmark on real `portraitd` processes (loopback, one machine),
//! once per cluster layout, each a new cluster: S = 1 (one raft group, as
//! before shards), then S = 16 with RF 3 as the cluster makes it (node 1
//! created every shard and leads them all), then S = 16 with the leaders
//! spread over the three nodes. Per layout: write throughput and latency
//! (batches of 100, 1 and 32 clients) and event → tag-visible latency on a
//! follower; each node's raft-log fsyncs per second (`ClusterStatus`), the
//! CPU time of the three nodes per event written (`/proc`: on a shared,
//! busy machine it varies less than the wall time); and each S = 16
//! layout's figures as a ratio of S = 1's (same run: the machine is
//! shared, only those compare). The last layout repeats the spread one
//! with TLS on both ports (mutual TLS between the nodes, certificates from
//! `portrait certs init`), for the cost of encryption. Part of `make bench`.
//!
//! Writes go through the Rust client: a whole request to the leader of the
//! shard most of its events belong to, which proposes that part and
//! forwards each other shard's part to its leader. Batches of 100 span
//! every shard (a request becomes 16 raft entries at S = 16, one at S = 1);
//! the one-event scenarios are the online path (an event lands on its
//! user), one shard per request: with 32 clients a shard has about two
//! requests at a time at S = 16, with 256 about sixteen. Each scenario's
//! requests are built before its clock starts (as in `server/examples/bench.rs`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portrait_client::json::now_ms;
use portrait_client::portrait_proto::v1::rule_value::Kind;
use portrait_client::portrait_proto::v1::{ClusterStatusResponse, GetProfileRequest};
use portrait_client::{Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::cpu::cpu_time;
use portrait_cluster_tests::Cluster;

const NODES: u64 = 3;
const EVENTS: usize = 60_000;
const USERS: usize = 20_000;
const TAG_SAMPLES: usize = 100;

/// A write scenario: requests of `batch` events from `clients` clients.
struct Load {
    batch: usize,
    clients: usize,
    events: usize,
}

const LOADS: [Load; 4] = [
    Load { batch: 100, clients: 1, events: EVENTS },
    Load { batch: 100, clients: 32, events: EVENTS },
    Load { batch: 1, clients: 32, events: 20_000 },
    Load { batch: 1, clients: 256, events: 40_000 },
];

/// A cluster to run every scenario on.
#[derive(Clone, Copy)]
struct Layout {
    shards: u32,
    /// Shard `s` led by node `s % 3 + 1` (else node 1 leads every shard).
    spread: bool,
    /// TLS on the client ports, mutual TLS on the peer ports.
    tls: bool,
}

const LAYOUTS: [Layout; 4] = [
    Layout { shards: 1, spread: false, tls: false },
    Layout { shards: 16, spread: false, tls: false },
    Layout { shards: 16, spread: true, tls: false },
    Layout { shards: 16, spread: true, tls: true },
];

impl Layout {
    fn leaders(&self) -> &'static str {
        match (self.shards, self.spread, self.tls) {
            (1, _, _) => "node 1",
            (_, false, _) => "all node 1",
            (_, true, false) => "spread",
            (_, true, true) => "spread+TLS",
        }
    }
}

/// One scenario's measures.
struct Row {
    scenario: String,
    clients: usize,
    /// 0 for the tag-visibility probe (no rate).
    events: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Each node's log fsyncs and CPU time during the scenario.
    counted: Counters,
}

impl Row {
    fn pct(&mut self, p: f64) -> f64 {
        self.latencies.sort();
        let i = ((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1);
        self.latencies[i].as_secs_f64() * 1e3
    }

    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU time of the three nodes together per event, in µs.
    fn cpu_us_per_event(&self) -> f64 {
        self.counted.cpu.iter().sum::<Duration>().as_secs_f64() * 1e6 / self.events as f64
    }

    fn print(&mut self, layout: Layout) {
        let secs = self.elapsed.as_secs_f64();
        let fsyncs: Vec<String> =
            self.counted.fsyncs.iter().map(|f| format!("{:.0}", *f as f64 / secs)).collect();
        let (p50, p99) = (self.pct(0.50), self.pct(0.99));
        let (rate, cpu) = match self.events {
            0 => ("-".to_string(), "-".to_string()),
            _ => (format!("{:.0}", self.events_per_sec()), format!("{:.0}", self.cpu_us_per_event())),
        };
        let per_batch = self.counted.items as f64 / self.counted.batches.max(1) as f64;
        let per_entry = match self.events {
            0 => "-".to_string(),
            n => format!("{:.1}", n as f64 / self.counted.entries.max(1) as f64),
        };
        // AppendEntries sent (all nodes) per raft entry: with two followers
        // at least 2; a heartbeat that only carries a new commit index to a
        // follower adds one.
        let appends_per_entry = self.counted.items as f64 / self.counted.entries.max(1) as f64;
        println!(
            "| {:>6} | {:<10} | {:<34} | {:>7} | {:>10} | {:>9.3} | {:>9.3} | {:>17} | {:>12} | {:>11.1} | {:>13} | {:>8.1} |",
            layout.shards,
            layout.leaders(),
            self.scenario,
            self.clients,
            rate,
            p50,
            p99,
            fsyncs.join(" / "),
            cpu,
            per_batch,
            per_entry,
            appends_per_entry,
        );
    }
}

fn event(seq: usize, run: usize, now: i64) -> Event {
    let cats = ["phone", "laptop", "tv", "shoes", "books", "toys", "food", "beauty"];
    let family = if seq.is_multiple_of(10) { "trade" } else { "browse" };
    Event {
        user_id: format!("user-{}", (seq * 7919) % USERS),
        family: family.into(),
        r#type: if family == "trade" { "order".into() } else { "view".into() },
        event_time_ms: now - (seq % 86_400) as i64 * 1000,
        event_id: format!("r{run}-e{seq}"),
        attrs: [
            ("category".to_string(), Value::string(cats[seq % cats.len()])),
            ("amount".to_string(), Value::double((seq % 5000) as f64 / 10.0)),
        ]
        .into(),
    }
}

async fn statuses(cluster: &Cluster) -> Vec<ClusterStatusResponse> {
    let mut all = Vec::new();
    for id in 1..=NODES {
        all.push(cluster.client(id).await.cluster_status().await.expect("status"));
    }
    all
}

/// Each node's raft-log fsyncs and CPU time, since it started, and the
/// AppendEntries batches all nodes sent and the items in them.
struct Counters {
    fsyncs: Vec<u64>,
    cpu: Vec<Duration>,
    batches: u64,
    items: u64,
    /// Raft entries applied by the shards (each shard's highest applied
    /// index over its replicas, summed).
    entries: u64,
}

impl Counters {
    async fn read(cluster: &Cluster) -> Counters {
        let all = statuses(cluster).await;
        let fsyncs = all.iter().map(|s| s.log_fsyncs).collect();
        let cpu = cluster.nodes.iter().map(|n| cpu_time(n.pid().expect("running"))).collect();
        let batches = all.iter().map(|s| s.raft_batches_sent).sum();
        let items = all.iter().map(|s| s.raft_batch_items_sent).sum();
        let mut applied = std::collections::BTreeMap::new();
        for g in all.iter().flat_map(|s| &s.shard_status) {
            let index = applied.entry(g.shard).or_insert(0);
            *index = g.applied_index.max(*index);
        }
        Counters { fsyncs, cpu, batches, items, entries: applied.values().sum() }
    }

    /// What each node counted since `before`.
    async fn since(cluster: &Cluster, before: &Counters) -> Counters {
        let now = Counters::read(cluster).await;
        Counters {
            fsyncs: now.fsyncs.iter().zip(&before.fsyncs).map(|(a, b)| a - b).collect(),
            cpu: now.cpu.iter().zip(&before.cpu).map(|(a, b)| a.saturating_sub(*b)).collect(),
            batches: now.batches - before.batches,
            items: now.items - before.items,
            entries: now.entries - before.entries,
        }
    }
}

/// Each shard's leader (0: none) as every node sees it, if all nodes are
/// voters of every shard and agree; and whether every replica has applied
/// all its shard's leader holds.
fn placed(all: &[ClusterStatusResponse], shards: u32) -> Option<(Vec<u64>, bool)> {
    let mut leaders = vec![0; shards as usize];
    let mut caught_up = true;
    for shard in 0..shards {
        let of = |s: &ClusterStatusResponse| s.shard_status.iter().find(|g| g.shard == shard).cloned();
        let groups: Vec<_> = all.iter().map(of).collect::<Option<_>>()?;
        let leader = groups.iter().find(|g| g.role == "Leader")?;
        if groups
            .iter()
            .any(|g| g.leader_id != leader.leader_id || !matches!(&*g.role, "Leader" | "Follower"))
        {
            return None;
        }
        leaders[shard as usize] = leader.leader_id;
        caught_up &= groups.iter().all(|g| g.applied_index >= leader.last_log_index);
    }
    Some((leaders, caught_up))
}

/// Waits until every shard has 3 voters, one leader (the one `want` names,
/// if any) and every replica has applied its whole log: between scenarios,
/// so that a follower still applying the last one takes no CPU from the
/// next.
async fn settle(cluster: &Cluster, shards: u32, want: Option<&[u64]>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((leaders, true)) = placed(&statuses(cluster).await, shards) {
            if want.is_none_or(|w| w == leaders) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "shards not placed or not caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes node `s % 3 + 1` the leader of shard `s`; returns the leaders.
async fn spread_leaders(cluster: &Cluster, shards: u32) -> Vec<u64> {
    let want: Vec<u64> = (0..shards).map(|s| s as u64 % NODES + 1).collect();
    let client = cluster.client(1).await;
    for (shard, &node) in want.iter().enumerate().filter(|(_, &n)| n != 1) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = client.transfer_leader_of(node, Some(shard as u32)).await {
            assert!(Instant::now() < deadline, "shard {shard} to node {node}: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    want
}

async fn ingest(cluster: &Cluster, load: &Load, run: usize) -> Row {
    let (batch, clients) = (load.batch, load.clients);
    let now = now_ms();
    let requests: Vec<Vec<Event>> = (0..load.events / batch)
        .map(|b| (0..batch).map(|i| event(b * batch + i, run, now)).collect())
        .collect();
    let queue = Arc::new(Mutex::new(requests.into_iter()));
    let mut connected = Vec::new();
    for _ in 0..clients {
        connected.push(cluster.client(1).await);
    }
    let before = Counters::read(cluster).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in connected {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(events) = queue.lock().expect("request queue").next() else { return lat };
                let t = Instant::now();
                client.write(events).await.expect("write");
                lat.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    let counted = Counters::since(cluster, &before).await;
    let scenario = format!("Write via Rust client (batch {batch})");
    Row { scenario, clients, events: load.events / batch * batch, elapsed, latencies, counted }
}

/// Writes 3 views of a category for a fresh user (to its shard's leader)
/// and polls a follower of its shard until its `coupon_target` tag reads
/// true.
async fn tag_visible(writer: &PortraitClient, nodes: &[PortraitClient], i: usize) -> Duration {
    let user = format!("tagprobe-{i}");
    let leader = writer.locate(&user).await.expect("locate").leader_id;
    let follower = &nodes[(leader % NODES) as usize]; // node leader % 3 + 1
    let views = (0..3)
        .map(|k| Event {
            user_id: user.clone(),
            family: "browse".into(),
            r#type: "view".into(),
            event_time_ms: now_ms(),
            event_id: format!("p{k}"),
            attrs: [("category".to_string(), Value::string("phone"))].into(),
        })
        .collect();
    let request = GetProfileRequest {
        user_id: user,
        tags: vec!["coupon_target".into()],
        consistency: Consistency::Local.into(),
        ..Default::default()
    };
    let t = Instant::now();
    writer.write(views).await.expect("write");
    loop {
        if let Ok(r) = follower.get_profile_request(request.clone()).await {
            let tag = r.profile.and_then(|p| p.tags.get("coupon_target").and_then(|t| t.value.clone()));
            if matches!(tag.and_then(|v| v.kind), Some(Kind::BoolValue(true))) {
                return t.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn tag_probe(cluster: &Cluster) -> Row {
    let writer = cluster.client(1).await;
    let mut nodes = Vec::new();
    for id in 1..=NODES {
        // Reads stay on the node asked (no routing by shard).
        nodes.push(cluster.client(id).await.without_routing());
    }
    let before = Counters::read(cluster).await;
    let start = Instant::now();
    let mut latencies = Vec::new();
    for i in 0..TAG_SAMPLES {
        latencies.push(tag_visible(&writer, &nodes, i).await);
    }
    let elapsed = start.elapsed();
    let counted = Counters::since(cluster, &before).await;
    let scenario = "event -> tag visible on a follower".to_string();
    Row { scenario, clients: 1, events: 0, elapsed, latencies, counted }
}

/// What a layout's ratios to S = 1 are made of.
struct Outcome {
    /// Per write scenario ([`LOADS`]).
    rates: Vec<f64>,
    cpu_us_per_event: Vec<f64>,
    tag_p50: f64,
}

/// Runs every scenario on a new cluster of `layout`, printing the rows.
async fn run_layout(layout: Layout) -> Outcome {
    // The bench places leaders itself: no balancing (`max_moves = 0`).
    let config = "max_moves = 0\n";
    let cluster = match layout.tls {
        true => Cluster::start_tls_with_config(NODES, layout.shards, config).await,
        false => Cluster::start_sharded_with_config(NODES, layout.shards, config).await,
    };
    settle(&cluster, layout.shards, None).await;
    if layout.spread {
        let want = spread_leaders(&cluster, layout.shards).await;
        settle(&cluster, layout.shards, Some(&want)).await;
    }
    let (mut rates, mut cpu_us_per_event) = (Vec::new(), Vec::new());
    for (run, load) in loads() {
        let mut row = ingest(&cluster, load, run).await;
        row.print(layout);
        rates.push(row.events_per_sec());
        cpu_us_per_event.push(row.cpu_us_per_event());
        settle(&cluster, layout.shards, None).await;
    }
    let mut row = tag_probe(&cluster).await;
    row.print(layout);
    Outcome { rates, cpu_us_per_event, tag_p50: row.pct(0.5) }
}

/// The write scenarios to run, with their index in [`LOADS`]: all, or
/// those `BENCH_LOADS` names (1-based, e.g. `BENCH_LOADS=3` for one-event
/// writes from 32 clients alone, to profile them).
fn loads() -> Vec<(usize, &'static Load)> {
    let only: Option<Vec<usize>> = std::env::var("BENCH_LOADS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect());
    let chosen = |i: &usize| only.as_ref().is_none_or(|o| o.contains(&(i + 1)));
    LOADS.iter().enumerate().filter(|(i, _)| chosen(i)).collect()
}

/// `a / b` per write scenario.
fn ratios(a: &[f64], b: &[f64]) -> String {
    let each = loads()
        .into_iter()
        .map(|(_, l)| l)
        .zip(a.iter().zip(b))
        .map(|(l, (a, b))| format!("batch {} x {} clients {:.2}", l.batch, l.clients, a / b));
    each.collect::<Vec<_>>().join(", ")
}

#[tokio::main]
async fn main() {
    println!(
        "{NODES}-node cluster on loopback (one machine), RF {NODES}, demo schema, \
         {USERS} users; write scenarios (events, batch, clients): {}",
        LOADS.map(|l| format!("{}/{}/{}", l.events, l.batch, l.clients)).join(", ")
    );
    println!("Writes: Rust client -> leader of the request's busiest shard, which forwards the other shards' parts");
    println!("CPU: utime + stime of the 3 nodes together, per event written");
    println!(
        "| {:>6} | {:<10} | {:<34} | {:>7} | {:>10} | {:>9} | {:>9} | {:>17} | {:>12} | {:>11} | {:>13} | {:>8} |",
        "shards",
        "leaders",
        "scenario",
        "clients",
        "events/s",
        "p50 ms",
        "p99 ms",
        "fsyncs/s n1/n2/n3",
        "CPU µs/event",
        "items/batch",
        "events/entry",
        "AE/entry"
    );
    println!(
        "|{:-<8}|{:-<12}|{:-<36}|{:-<9}|{:-<12}|{:-<11}|{:-<11}|{:-<19}|{:-<14}|{:-<13}|{:-<15}|{:-<10}|",
        "", "", "", "", "", "", "", "", "", "", "", ""
    );
    // `BENCH_LAYOUTS=1,2` runs only those layouts (1-based; for profiling
    // one of them); the ratios then compare against the first one run.
    let only: Option<Vec<usize>> = std::env::var("BENCH_LAYOUTS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect());
    let mut results = Vec::new();
    for (i, layout) in LAYOUTS.into_iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.contains(&(i + 1))) {
            continue;
        }
        results.push((layout, run_layout(layout).await));
    }
    if results.is_empty() {
        return;
    }
    // Same-run ratios against the first layout (S = 1).
    let (_, base) = &results[0];
    for (layout, outcome) in &results[1..] {
        println!(
            "S = {} (leaders {}) / S = 1: write events/s {}; CPU per event {}; tag-visible p50 {:.2}",
            layout.shards,
            layout.leaders(),
            ratios(&outcome.rates, &base.rates),
            ratios(&outcome.cpu_us_per_event, &base.cpu_us_per_event),
            outcome.tag_p50 / base.tag_p50
        );
    }
}
