//! 3-node benchmark on real `portraitd` processes (loopback, one machine):
//! Write throughput and latency through the leader (batches of 100), and
//! event → tag-visible latency on a follower. Part of `make bench`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portrait_client::json::now_ms;
use portrait_client::portrait_proto::v1::rule_value::Kind;
use portrait_client::portrait_proto::v1::GetProfileRequest;
use portrait_client::{Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::Cluster;

const EVENTS: usize = 100_000;
const BATCH: usize = 100;
const USERS: usize = 20_000;
const TAG_SAMPLES: usize = 100;

fn event(seq: usize, run: usize) -> Event {
    let cats = ["phone", "laptop", "tv", "shoes", "books", "toys", "food", "beauty"];
    let family = if seq.is_multiple_of(10) { "trade" } else { "browse" };
    Event {
        user_id: format!("user-{}", (seq * 7919) % USERS),
        family: family.into(),
        r#type: if family == "trade" { "order".into() } else { "view".into() },
        event_time_ms: now_ms() - (seq % 86_400) as i64 * 1000,
        event_id: format!("r{run}-e{seq}"),
        attrs: [
            ("category".to_string(), Value::string(cats[seq % cats.len()])),
            ("amount".to_string(), Value::double((seq % 5000) as f64 / 10.0)),
        ]
        .into(),
    }
}

fn pct(lat: &mut [Duration], p: f64) -> f64 {
    lat.sort();
    lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3
}

async fn ingest(endpoint: &str, clients: usize, run: usize) -> (f64, f64, f64) {
    let batches = EVENTS / BATCH;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = PortraitClient::connect(endpoint).await.unwrap();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    return lat;
                }
                let events = (0..BATCH).map(|i| event(b * BATCH + i, run)).collect();
                let t = Instant::now();
                client.write(events).await.expect("write");
                lat.push(t.elapsed());
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    ((batches * BATCH) as f64 / secs, pct(&mut lat, 0.5), pct(&mut lat, 0.99))
}

/// Writes 3 views of a category for a fresh user on the leader and polls a
/// follower until its `coupon_target` tag reads true.
async fn tag_visible(leader: &PortraitClient, follower: &PortraitClient, i: usize) -> Duration {
    let user = format!("tagprobe-{i}");
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
    let t = Instant::now();
    leader.write(views).await.unwrap();
    let request = GetProfileRequest {
        user_id: user,
        tags: vec!["coupon_target".into()],
        consistency: Consistency::Local.into(),
        ..Default::default()
    };
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

#[tokio::main]
async fn main() {
    let cluster = Cluster::start(3).await;
    let leader_id = cluster.wait_leader(&[1, 2, 3]).await;
    let follower_id = (1..=3).find(|&id| id != leader_id).unwrap();
    let leader = cluster.node(leader_id).endpoint();
    println!("3-node cluster on loopback (one 2-core machine), demo schema, {EVENTS} events per scenario, batch {BATCH}");
    println!(
        "| {:<34} | {:>7} | {:>10} | {:>9} | {:>9} |",
        "scenario", "clients", "events/s", "p50 ms", "p99 ms"
    );
    println!("|{:-<36}|{:-<9}|{:-<12}|{:-<11}|{:-<11}|", "", "", "", "", "");
    for (run, clients) in [1usize, 32].into_iter().enumerate() {
        let (eps, p50, p99) = ingest(&leader, clients, run).await;
        println!(
            "| {:<34} | {:>7} | {:>10.0} | {:>9.3} | {:>9.3} |",
            "Write via leader (batch 100)", clients, eps, p50, p99
        );
    }
    let (l, f) = (cluster.client(leader_id).await, cluster.client(follower_id).await);
    let mut lat = Vec::new();
    for i in 0..TAG_SAMPLES {
        lat.push(tag_visible(&l, &f, i).await);
    }
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    println!(
        "| {:<34} | {:>7} | {:>10} | {:>9.3} | {:>9.3} |",
        "event -> tag visible on a follower", 1, "-", p50, p99
    );
}
