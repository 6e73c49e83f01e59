//! Exactly-once application under a leader crash: 8 concurrent writers,
//! the leader killed with SIGKILL mid-stream, every failed request retried
//! with the same event ids (so a retry of a request that did commit must be
//! skipped as a duplicate), the killed node restarted.
//!
//! Afterwards, on every node and for every user, the lifetime order count
//! (`orders_lifetime` of the default schema) equals the number of distinct
//! events in the user's history, lies between what was acknowledged and
//! what was sent, and the history holds no id twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portrait_client::json::now_ms;
use portrait_client::{Event, PortraitClient, Value};
use portrait_cluster_tests::replicas::applied_on;
use portrait_cluster_tests::Cluster;

const WRITERS: u64 = 8;
/// Events per request, each for another user.
const PER_REQUEST: u64 = 4;
/// Users written. Each writer's requests cycle through them, so a user gets
/// at most `WRITERS * MAX_REQUESTS * PER_REQUEST / USERS` = 80 events: its
/// trade history of 100 events holds them all, however fast the machine.
const USERS: u64 = 400;
/// Requests per writer, at most (about 450 are sent in the ~6 s the test
/// runs on 2 cores).
const MAX_REQUESTS: u64 = 1_000;

fn user(writer: u64, seq: u64, j: u64) -> String {
    format!("x{}", (writer * 131 + seq * PER_REQUEST + j) % USERS)
}

/// Request `seq` of `writer`: `PER_REQUEST` orders with ids `w<writer>-<seq>-<j>`.
fn request(writer: u64, seq: u64) -> Vec<Event> {
    (0..PER_REQUEST)
        .map(|j| Event {
            user_id: user(writer, seq, j),
            family: "trade".into(),
            r#type: "order".into(),
            event_time_ms: now_ms(),
            event_id: format!("w{writer}-{seq}-{j}"),
            attrs: [("amount".to_string(), Value::int(1))].into(),
        })
        .collect()
}

/// Event ids per user: sent at least once, and acknowledged.
#[derive(Default)]
struct Ledger {
    sent: BTreeMap<String, BTreeSet<String>>,
    acked: BTreeMap<String, BTreeSet<String>>,
    last_index: u64,
    /// Requests sent again after a failed attempt.
    retries: u64,
}

impl Ledger {
    fn record(&mut self, events: &[Event], acked: bool) {
        let book = if acked { &mut self.acked } else { &mut self.sent };
        for e in events {
            book.entry(e.user_id.clone()).or_default().insert(e.event_id.clone());
        }
    }
}

/// One writer: a request at a time, each retried (same ids, next node) until
/// acknowledged or the test stops.
async fn writer(id: u64, endpoints: Vec<String>, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    // Each request is sent once by the client (redirects followed): the
    // writer retries it itself, on the next node, so the kill shows here.
    let once = portrait_client::ConnectOptions::new().retry_for(Duration::ZERO);
    let mut clients = Vec::new();
    for e in &endpoints {
        clients.push(PortraitClient::connect_with(e, once.clone()).await.unwrap());
    }
    let mut node = id as usize;
    for seq in 0..MAX_REQUESTS {
        let events = request(id, seq);
        let mut attempt = 0;
        while !stop.load(Ordering::SeqCst) {
            ledger.lock().unwrap().record(&events, false);
            let sent = tokio::time::timeout(
                Duration::from_secs(10),
                clients[node % clients.len()].write(events.clone()),
            );
            if let Ok(Ok(r)) = sent.await {
                let mut l = ledger.lock().unwrap();
                l.record(&events, true);
                l.last_index = l.last_index.max(r.log_index);
                l.retries += (attempt > 0) as u64;
                break;
            }
            attempt += 1;
            node += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Per user on node `id`: (`orders_lifetime`, trade history ids), read
/// locally on that node itself (`applied_on` checks the read's `node_id`).
async fn applied(cluster: &Cluster, id: u64) -> BTreeMap<String, (u64, Vec<String>)> {
    let users: Vec<String> = (0..USERS).map(|u| format!("x{u}")).collect();
    applied_on(cluster, id, &users).await
}

#[tokio::test]
async fn eight_writers_and_a_leader_kill_apply_every_event_exactly_once() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&[1, 2, 3]).await;
    let endpoints: Vec<String> = (1..=3).map(|id| cluster.node(id).endpoint()).collect();
    let (ledger, stop) = (Arc::new(Mutex::new(Ledger::default())), Arc::new(AtomicBool::new(false)));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(w, endpoints.clone(), ledger.clone(), stop.clone())))
        .collect();
    let acked = || ledger.lock().unwrap().acked.values().map(BTreeSet::len).sum::<usize>();

    // Polls, not fixed sleeps: a loaded machine may take longer to get
    // the writers going, or to acknowledge after the failover.
    let acked_over = |n: usize, what: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked() <= n {
            assert!(Instant::now() < deadline, "no write acknowledged {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    acked_over(20, "before the kill").await;
    let before_kill = acked();
    cluster.kill(leader);
    let survivors: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    cluster.wait_leader(&survivors).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.restart(leader).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    acked_over(before_kill, "after the kill").await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }

    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    let total = acked_total(&ledger);
    eprintln!("acked {total} events ({before_kill} before the kill), {} retried requests", ledger.retries);
    assert!(
        before_kill > 0 && total > before_kill,
        "writes before ({before_kill}) and after the kill ({total})"
    );
    assert!(ledger.retries > 0, "the kill made some writers retry");
    for id in 1..=3 {
        cluster.wait_applied(id, ledger.last_index).await;
        check_exactly_once(id, &applied(&cluster, id).await, &ledger);
    }
}

fn acked_total(ledger: &Ledger) -> usize {
    ledger.acked.values().map(BTreeSet::len).sum()
}

fn check_exactly_once(node: u64, applied: &BTreeMap<String, (u64, Vec<String>)>, ledger: &Ledger) {
    let empty = BTreeSet::new();
    for (user, sent) in &ledger.sent {
        let acked = ledger.acked.get(user).unwrap_or(&empty);
        let (count, history) = applied.get(user).cloned().unwrap_or_default();
        let distinct: BTreeSet<String> = history.iter().cloned().collect();
        assert_eq!(distinct.len(), history.len(), "node {node}, {user}: an event applied twice: {history:?}");
        assert!(history.len() < 100, "node {node}, {user}: history full; raise USERS");
        assert_eq!(count, distinct.len() as u64, "node {node}, {user}: count vs distinct events applied");
        let missing: Vec<_> = acked.difference(&distinct).collect();
        assert!(missing.is_empty(), "node {node}, {user}: acknowledged but not applied: {missing:?}");
        let unsent: Vec<_> = distinct.difference(sent).collect();
        assert!(unsent.is_empty(), "node {node}, {user}: applied but never sent: {unsent:?}");
    }
    let applied_total: u64 = applied.values().map(|(count, _)| count).sum();
    let sent_total: usize = ledger.sent.values().map(BTreeSet::len).sum();
    assert!(applied_total as usize >= acked_total(ledger) && applied_total as usize <= sent_total);
}
