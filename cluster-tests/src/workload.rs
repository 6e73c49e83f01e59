//! A continuous write workload that records every acknowledged write, and
//! the full-set check that each one is served afterwards (not a count).
//!
//! Each write is one `trade` order with a unique `event_id` (`w<i>`), for
//! one of [`USERS`] users, so no user's history (100 trade events) can
//! overflow in a test run and drop an acknowledged event.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portrait_client::json::now_ms;
use portrait_client::{Consistency, Event, PortraitClient, Value};
use tokio::task::JoinHandle;

use crate::replicas::Book;

/// Users written round robin (also the most `BatchGetProfiles` reads at once).
pub const USERS: u64 = 1000;

/// A write that takes longer than this counts as hung (writes must fail
/// with UNAVAILABLE after the server's write timeout instead).
const HANG: Duration = Duration::from_secs(30);

/// Write number `i`: an order of user `u<i % USERS>` with event id `w<i>`.
pub fn order(i: u64) -> Event {
    Event {
        user_id: format!("u{}", i % USERS),
        family: "trade".into(),
        r#type: "order".into(),
        event_time_ms: now_ms(),
        event_id: format!("w{i}"),
        attrs: [("amount".to_string(), Value::int(i as i64))].into(),
    }
}

/// An order of `user` with id `event_id` (amount 1).
pub fn order_of(user: &str, event_id: &str) -> Event {
    Event {
        user_id: user.into(),
        family: "trade".into(),
        r#type: "order".into(),
        event_time_ms: now_ms(),
        event_id: event_id.into(),
        attrs: [("amount".to_string(), Value::int(1))].into(),
    }
}

/// A page view of `user` a second ago, with id `event_id` and attribute
/// `page`.
pub fn visit(user: &str, event_id: &str, page: &str) -> Event {
    Event {
        user_id: user.into(),
        family: "browse".into(),
        r#type: "view".into(),
        event_time_ms: now_ms() - 1_000,
        event_id: event_id.into(),
        attrs: [("page".to_string(), Value::string(page))].into(),
    }
}

/// A page of 4,000 hex digits that does not compress (a counter mixed by
/// SplitMix64): bulk data whose bytes are what they seem on disk too.
pub fn incompressible_page(seed: u64) -> String {
    let mut x = seed;
    let mut out = String::with_capacity(4_016);
    while out.len() < 4_000 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.push_str(&format!("{:016x}", z ^ (z >> 31)));
    }
    out.truncate(4_000);
    out
}

/// Bulk page view `i`: user `bulk<i>`, id `bulk-<i>`, an incompressible
/// 4 KB page.
pub fn bulk_view(i: usize) -> Event {
    visit(&format!("bulk{i}"), &format!("bulk-{i}"), &incompressible_page(i as u64))
}

/// The `p` quantile of `latencies` (nearest rank; zero when empty).
pub fn percentile(latencies: &mut [Duration], p: f64) -> Duration {
    latencies.sort();
    let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
    latencies.get(i).copied().unwrap_or_default()
}

/// Every event id a node serves in the users' trade history (local read).
pub async fn served(client: &PortraitClient) -> BTreeSet<String> {
    let users: Vec<String> = (0..USERS).map(|u| format!("u{u}")).collect();
    let r = client.batch_get_profiles(&users, &["trade".into()], Consistency::Local).await.unwrap();
    r.profiles
        .iter()
        .filter_map(|p| p.families.get("trade"))
        .flat_map(|f| f.history.iter().map(|h| h.event_id.clone()))
        .collect()
}

/// The sorted event ids of `user`'s `family` history as `client`'s node
/// serves them (empty when the read fails, e.g. the node is down).
pub async fn history_ids(
    client: &PortraitClient,
    user: &str,
    family: &str,
    consistency: Consistency,
) -> Vec<String> {
    let Ok(r) = client.get_profile(user, &[family.to_string()], consistency).await else {
        return Vec::new();
    };
    let profile = r.profile.unwrap_or_default();
    let mut ids: Vec<String> = profile
        .families
        .get(family)
        .map(|f| f.history.iter().map(|h| h.event_id.clone()).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

/// What a stopped workload did.
pub struct Outcome {
    /// Event ids of the acknowledged writes.
    pub acked: BTreeSet<String>,
    /// The highest log index an acknowledgement named.
    pub last_index: u64,
    /// Writes that did not answer within 30 s.
    pub hung: u64,
    /// The write numbers sent (each once; acknowledged or not).
    pub sent: Range<u64>,
}

/// One writer sending one event at a time through its endpoints (round robin).
pub struct Workload {
    acked: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<(u64, u64, u64)>,
    first: u64,
}

impl Outcome {
    /// Waits until each of `nodes` has applied every acknowledged write,
    /// then asserts it serves all of them (the full set, not a count).
    pub async fn assert_served_by(&self, cluster: &crate::Cluster, nodes: &[u64], context: &str) {
        for &id in nodes {
            cluster.wait_applied(id, self.last_index).await;
            let served = served(&cluster.client(id).await).await;
            let missing: Vec<_> = self.acked.difference(&served).collect();
            assert!(missing.is_empty(), "node {id}{context} lost acknowledged writes: {missing:?}");
        }
    }

    /// The writes per user, sent and acknowledged (for
    /// [`crate::replicas::assert_every_replica_holds`]).
    pub fn book(&self) -> Book {
        let mut book = Book::default();
        let sent: Vec<Event> = self.sent.clone().map(order).collect();
        book.record(&sent, false);
        book.record(&sent.into_iter().filter(|e| self.acked.contains(&e.event_id)).collect::<Vec<_>>(), true);
        book
    }
}

impl Workload {
    pub fn start(endpoints: Vec<String>) -> Workload {
        Workload::start_at(endpoints, 0)
    }

    /// Like [`Workload::start`], numbering writes from `first` (so that
    /// several workloads at once send distinct events).
    pub fn start_at(endpoints: Vec<String>, first: u64) -> Workload {
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(endpoints, first, acked.clone(), stop.clone()));
        Workload { acked, stop, task, first }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Event ids of the writes acknowledged so far.
    pub fn acked_ids(&self) -> BTreeSet<String> {
        self.acked.lock().unwrap().clone()
    }

    /// Waits (at most 20 s) until more than `n` writes are acknowledged.
    pub async fn wait_acked_over(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.acked() <= n {
            assert!(tokio::time::Instant::now() < deadline, "writes did not resume: still {n} acknowledged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        let (last_index, hung, end) = self.task.await.unwrap();
        let acked = self.acked.lock().unwrap().clone();
        Outcome { acked, last_index, hung, sent: self.first..end }
    }
}

/// Returns the highest log index acknowledged, the hung writes and the
/// next write number.
async fn run(
    endpoints: Vec<String>,
    first: u64,
    acked: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
) -> (u64, u64, u64) {
    let mut clients = Vec::new();
    for e in &endpoints {
        clients.push(PortraitClient::connect(e).await.unwrap());
    }
    let (mut i, mut last, mut hung) = (first, 0u64, 0u64);
    while !stop.load(Ordering::SeqCst) {
        let client = &clients[(i as usize) % clients.len()];
        match tokio::time::timeout(HANG, client.write(vec![order(i)])).await {
            Ok(Ok(r)) => {
                acked.lock().unwrap().insert(format!("w{i}"));
                last = last.max(r.log_index);
            }
            Ok(Err(_)) => {}
            Err(_) => hung += 1,
        }
        i += 1;
    }
    (last, hung, i)
}

/// Writers that each send one-event writes through a client until stopped:
/// writer `w`'s `i`-th event is `event(w, i)`.
pub struct OneEventWriters {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<(u32, Vec<portrait_client::ClientError>)>>,
}

impl OneEventWriters {
    pub fn start(client: &PortraitClient, writers: u32, event: fn(u32, u32) -> Event) -> OneEventWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..writers)
            .map(|w| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut acked, mut failed) = (0u32, Vec::new());
                    for i in 0u32.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match client.write(vec![event(w, i)]).await {
                            Ok(_) => acked += 1,
                            Err(e) => failed.push(e),
                        }
                    }
                    (acked, failed)
                })
            })
            .collect();
        OneEventWriters { stop, tasks }
    }

    /// Stops the writers once their calls in flight end: the writes
    /// acknowledged and the failures, printed.
    pub async fn stop(self) -> (u32, Vec<portrait_client::ClientError>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut acked, mut failed) = (0, Vec::new());
        for task in self.tasks {
            let (a, f) = task.await.expect("writer task");
            acked += a;
            failed.extend(f);
        }
        println!("{acked} writes acknowledged, {} failed: {failed:?}", failed.len());
        (acked, failed)
    }
}
