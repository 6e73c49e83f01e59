//! Faults that hit some shards and spare others, on real `portraitd`
//! processes with several raft groups per node.
//!
//! 1. A node leading several (not all) of 16 shards is killed with SIGKILL
//!    under 8 writers that retry with the same event ids: every replica of
//!    every shard ends with each event applied once, and writes to shards
//!    led elsewhere keep being acknowledged through the failover.
//! 2. One shard loses its quorum (its followers drop the leader's entries):
//!    a write across it and a healthy shard fails UNAVAILABLE naming that
//!    shard; once the quorum is back the same request applies each event once.
//! 3. A leader whose node has not heard a quorum of its shard's voters for
//!    a while (both followers killed) refuses writes without proposing them:
//!    once the followers are back, nothing of the refused write was applied,
//!    and the same request applies each event once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portrait_client::json::now_ms;
use portrait_client::{Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::replicas::{
    applied_on, check_exactly_once, placement, statuses, transfer, users_of, wait_caught_up, wait_placed,
    Book,
};
use portrait_cluster_tests::Cluster;
use portrait_core::shard::shard_of;

/// Events per request.
const PER_REQUEST: usize = 4;
/// Requests per writer, at most. A writer bound to one shard cycles through
/// that shard's ~`USERS / 16` users, so none gets more than
/// `MAX_REQUESTS * PER_REQUEST * 16 / USERS` = 40 events from it (plus
/// about 10 from the writers across shards): the trade history of 100
/// events holds them all.
const MAX_REQUESTS: usize = 1_000;
/// Shards of test 1.
const MANY_SHARDS: u32 = 16;
/// Users of test 1.
const USERS: usize = 1_600;

/// An order of `user` with a unique `event_id`.
fn order(user: &str, event_id: String) -> Event {
    Event {
        user_id: user.into(),
        family: "trade".into(),
        r#type: "order".into(),
        event_time_ms: now_ms(),
        event_id,
        attrs: [("amount".to_string(), Value::int(1))].into(),
    }
}

/// The message of a write refused UNAVAILABLE (retryable) naming `shard`.
fn refused_naming_shard(err: portrait_client::ClientError, shard: u32) -> String {
    let message = err.to_string();
    assert!(message.starts_with("UNAVAILABLE: "), "retryable: {message}");
    assert!(message.contains(&format!("shard {shard}: ")), "names the shard: {message}");
    message
}

/// Sends `events` through `client` until it is answered (at most 20 s);
/// `after` says what the failures follow.
async fn write_until_answered(
    client: &PortraitClient,
    events: &[Event],
    after: &str,
) -> portrait_client::WriteResponse {
    let started = Instant::now();
    loop {
        match client.write(events.to_vec()).await {
            Ok(r) => return r,
            Err(e) if started.elapsed() < Duration::from_secs(20) => println!("retry: {e}"),
            Err(e) => panic!("the retry after {after} failed: {e}"),
        }
    }
}

/// Event ids per user: sent at least once, and acknowledged.
#[derive(Default)]
struct Ledger {
    book: Book,
    /// Requests sent again after a failed attempt.
    retries: u64,
    /// When each writer's requests were acknowledged.
    acks: BTreeMap<usize, Vec<Instant>>,
}

impl Ledger {
    fn acked_total(&self) -> usize {
        self.book.acked_total()
    }

    /// The longest time writer `w` went without an acknowledgement between
    /// `from` and `to` (e.g. the writers' start and stop: a writer stuck to
    /// the end has a gap up to `to`); acknowledgements outside the window
    /// are ignored.
    fn longest_gap(&self, w: usize, from: Instant, to: Instant) -> Duration {
        let acks = self.acks.get(&w).map_or(&[][..], Vec::as_slice);
        let within = acks.iter().copied().filter(|t| (from..=to).contains(t));
        let times: Vec<Instant> = [from].into_iter().chain(within).chain([to]).collect();
        times.windows(2).map(|p| p[1] - p[0]).max().unwrap_or_default()
    }
}

/// One writer: request `seq` holds `PER_REQUEST` orders of the next users
/// of `users` (ids `w<id>-<seq>-<j>`); each is retried with the same ids on
/// the next client until acknowledged or the test stops.
struct Writer {
    id: usize,
    users: Vec<String>,
    clients: Vec<PortraitClient>,
}

impl Writer {
    fn request(&self, seq: usize) -> Vec<Event> {
        (0..PER_REQUEST)
            .map(|j| {
                let user = &self.users[(self.id * 131 + seq * PER_REQUEST + j) % self.users.len()];
                order(user, format!("w{}-{seq}-{j}", self.id))
            })
            .collect()
    }

    async fn run(self, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
        let mut next = self.id;
        for seq in 0..MAX_REQUESTS {
            let events = self.request(seq);
            let mut attempt = 0;
            loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                ledger.lock().unwrap().book.record(&events, false);
                let client = &self.clients[next % self.clients.len()];
                let sent = tokio::time::timeout(Duration::from_secs(10), client.write(events.clone()));
                if let Ok(Ok(_)) = sent.await {
                    let mut l = ledger.lock().unwrap();
                    l.book.record(&events, true);
                    l.retries += (attempt > 0) as u64;
                    l.acks.entry(self.id).or_default().push(Instant::now());
                    break;
                }
                attempt += 1;
                next += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Clients of `nodes`: routing by shard, or (`forwarded`) sending every
/// write to the node itself, which forwards each part by the map.
async fn clients(cluster: &Cluster, nodes: &[u64], forwarded: bool) -> Vec<PortraitClient> {
    // Each request is sent once by the client (redirects followed): the
    // writer retries it itself, on the next node, so the kill shows there.
    let mut all = Vec::new();
    for &id in nodes {
        let c = cluster.client_once(id).await;
        all.push(if forwarded { c.without_routing() } else { c });
    }
    all
}

/// How long until each of `shards` has a leader among `nodes` (polled from
/// now), or the shards still without one after `limit`.
async fn time_to_new_leaders(
    cluster: &Cluster,
    nodes: &[u64],
    shards: &[u32],
    limit: Duration,
) -> Result<Duration, Vec<u32>> {
    let started = Instant::now();
    loop {
        let placed = placement(&statuses(cluster, nodes).await);
        let leaderless: Vec<u32> =
            shards.iter().copied().filter(|s| placed.get(s).is_none_or(|(_, l)| l.is_none())).collect();
        if leaderless.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            return Err(leaderless);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Users of test 1: all of them, or those of one of its shards.
fn users_in(shard: Option<u32>) -> Vec<String> {
    let all = (0..USERS).map(|i| format!("x{i}"));
    all.filter(|u| shard.is_none_or(|s| shard_of(u, MANY_SHARDS) == s)).collect()
}

/// Makes each `(shard, node)`'s node the leader of the shard, all at once,
/// asking node `via` (it follows redirects to the shards' leaders).
async fn move_leaderships(cluster: &Cluster, via: u64, moves: &[(u32, u64)]) {
    let client = cluster.client(via).await;
    let mut running = tokio::task::JoinSet::new();
    for &(shard, node) in moves {
        running.spawn(transfer(client.clone(), shard, node));
    }
    while let Some(moved) = running.join_next().await {
        moved.unwrap();
    }
}

/// Starts writer `i` over the users of shard `shards[i]` (`None`: all
/// users, across shards). Even writers send through nodes 4 and 5, which
/// host no shard and forward every part; odd ones route by shard.
/// Waits (30 s at most) until the writers have more than `n` events
/// acknowledged: a poll, as a loaded machine may be slow to get them going.
async fn wait_acked_over(ledger: &Mutex<Ledger>, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger.lock().unwrap().acked_total() <= n {
        assert!(Instant::now() < deadline, "no write acknowledged {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn spawn_writers(
    cluster: &Cluster,
    shards: [Option<u32>; 8],
    ledger: &Arc<Mutex<Ledger>>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (id, shard) in shards.into_iter().enumerate() {
        let clients = match id % 2 {
            0 => clients(cluster, &[4, 5], true).await,
            _ => clients(cluster, &[2, 3, 4, 5, 1], false).await,
        };
        let writer = Writer { id, users: users_in(shard), clients };
        tasks.push(tokio::spawn(writer.run(ledger.clone(), stop.clone())));
    }
    tasks
}

#[tokio::test]
async fn killing_a_node_that_leads_several_shards_loses_no_event_and_applies_each_once() {
    const ALL: [u64; 5] = [1, 2, 3, 4, 5];
    // No balancing moves (`max_moves = 0`): nodes 1-3 keep every shard.
    let config = "replication = 3\nmax_moves = 0\n";
    let mut cluster = Cluster::start_sharded_with_config(5, MANY_SHARDS, config).await;
    let placed = wait_placed(&cluster, &ALL, MANY_SHARDS).await;
    // Node 1 created every shard and leads it: hand six to nodes 2 and 3.
    move_leaderships(&cluster, 1, &[(0, 2), (1, 3), (2, 2), (3, 3), (4, 2), (5, 3)]).await;
    let leaders: BTreeMap<u32, u64> =
        wait_placed(&cluster, &ALL, MANY_SHARDS).await.into_iter().map(|(s, (_, l))| (s, l)).collect();
    let victim = 1;
    let led: Vec<u32> = leaders.iter().filter(|(_, &l)| l == victim).map(|(&s, _)| s).collect();
    // 10, unless an election under load moved one more.
    assert!((2..=10).contains(&led.len()), "node {victim} leads several shards, not all: {leaders:?}");
    assert!(placed.values().all(|(n, _)| n.contains(&victim)));

    // Writers 0-3 across shards; 4 and 5 each within a shard led elsewhere
    // (their acknowledgements must not pause), 6 and 7 within one of the
    // victim's.
    let spared: Vec<u32> = (0..MANY_SHARDS).filter(|s| !led.contains(s)).collect();
    let shard_of_writer =
        [None, None, None, None, Some(spared[0]), Some(spared[1]), Some(led[0]), Some(led[1])];
    let (ledger, stop) = (Arc::new(Mutex::new(Ledger::default())), Arc::new(AtomicBool::new(false)));
    let started = Instant::now();
    let tasks = spawn_writers(&cluster, shard_of_writer, &ledger, &stop).await;

    wait_acked_over(&ledger, 20, "before the kill").await;
    let before_kill = ledger.lock().unwrap().acked_total();
    cluster.kill(victim);
    let killed = Instant::now();
    let (down_for, survivors) = (Duration::from_secs(4), [2, 3]);
    // A generous limit of its own (not `down_for`): the survivors must lead
    // every one of the victim's shards before it comes back.
    let failover = time_to_new_leaders(&cluster, &survivors, &led, Duration::from_secs(20)).await;
    println!("the victim's {} shards had new leaders after: {failover:?}", led.len());
    if let Err(leaderless) = &failover {
        panic!("nodes {survivors:?} never led the victim's shards {leaderless:?} (of {led:?})");
    }
    tokio::time::sleep(down_for.saturating_sub(killed.elapsed())).await;
    cluster.restart(victim).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_acked_over(&ledger, before_kill, "after the kill").await;
    stop.store(true, Ordering::SeqCst);
    let stopped = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }

    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    let total = ledger.acked_total();
    let gaps: Vec<Duration> = (0..8).map(|w| ledger.longest_gap(w, started, stopped)).collect();
    // From the kill to the stop only: not the clients' start-up before it.
    let gaps_after_kill: Vec<Duration> = (0..8).map(|w| ledger.longest_gap(w, killed, stopped)).collect();
    println!(
        "acked {total} events ({before_kill} before the kill), {} retried requests; longest gap between \
         acks per writer: {gaps:?}, from the kill on: {gaps_after_kill:?} (4, 5: shards led elsewhere; \
         6, 7: the victim's)",
        ledger.retries
    );
    assert!(
        before_kill > 0 && total > before_kill,
        "writes before ({before_kill}) and after the kill ({total})"
    );
    assert!(ledger.retries > 0, "the kill made some writers retry");
    for w in [4, 5] {
        assert!(
            gaps_after_kill[w] < Duration::from_secs(5),
            "writer {w}, to a shard led elsewhere, paused {:?} after the kill",
            gaps_after_kill[w]
        );
    }
    // An election takes at least its timeout (1 s): the kill did hit these.
    for w in [6, 7] {
        assert!(gaps[w] > Duration::from_millis(500), "writer {w}, to a shard the victim led, never paused");
    }

    let hosts = wait_caught_up(&cluster, &ALL, MANY_SHARDS).await;
    for (shard, nodes) in &hosts {
        let users = users_in(Some(*shard));
        assert_eq!(nodes.len(), 3, "shard {shard} on {nodes:?}");
        for &id in nodes {
            check_exactly_once(id, &users, &applied_on(&cluster, id, &users).await, &ledger.book);
        }
    }
}

#[tokio::test]
async fn a_cross_shard_write_without_a_quorum_names_the_shard_and_a_retry_applies_once() {
    const SHARDS: u32 = 4;
    const ALL: [u64; 3] = [1, 2, 3];
    // A short write timeout: the write that cannot commit fails sooner.
    // Leaders placed by the test: no balancing (`max_moves = 0`).
    let config = "replication = 3\nmax_moves = 0\n[raft]\nwrite_timeout_ms = 4000\n";
    let mut cluster = Cluster::start_sharded_with_config(3, SHARDS, config).await;
    wait_placed(&cluster, &ALL, SHARDS).await;
    // Node 3 leads shard 0; another node the healthy shard.
    let cut = 0;
    transfer(cluster.client(1).await, cut, 3).await;
    let placed = wait_placed(&cluster, &ALL, SHARDS).await;
    assert_eq!(placed[&cut].1, 3, "{placed:?}");
    let healthy = *placed.iter().find(|(_, (_, l))| *l != 3).expect("a shard led by node 1 or 2").0;

    // Nodes 1 and 2 drop the log entries node 3 sends (they still hear it,
    // and do not campaign): shard 0 cannot commit, the healthy shard can.
    for id in [1, 2] {
        cluster.client(id).await.set_faults(Vec::new(), vec![3]).await.expect("set faults");
    }
    let users: Vec<String> = [cut, healthy].iter().flat_map(|&s| users_of(s, SHARDS, 2)).collect();
    let events: Vec<Event> = users.iter().map(|u| order(u, format!("e-{u}"))).collect();
    let client = cluster.client(2).await;
    let started = Instant::now();
    let err = client.write(events.clone()).await.expect_err("shard 0 has no quorum");
    println!("the write failed after {:?}: {err}", started.elapsed());
    let message = refused_naming_shard(err, cut);
    assert!(!message.contains(&format!("shard {healthy}")), "names only the failing shard: {message}");

    cluster.heal().await;
    let started = Instant::now();
    let retry = write_until_answered(&client, &events, "the heal").await;
    println!("the retry succeeded after {:?}: {retry:?}", started.elapsed());
    assert_eq!(retry.applied + retry.duplicates, events.len() as u32, "{retry:?}");
    let part =
        |shard: u32| retry.shards.iter().find(|s| s.shard == shard).cloned().expect("a part per shard");
    // The healthy shard's part was applied by the failed call.
    assert_eq!((part(healthy).applied, part(healthy).duplicates), (0, 2), "{retry:?}");
    assert_eq!(part(cut).applied + part(cut).duplicates, 2, "{retry:?}");
    let again = client.write(events.clone()).await.expect("a duplicate re-send");
    assert_eq!((again.applied, again.duplicates), (0, events.len() as u32), "{again:?}");

    wait_caught_up(&cluster, &ALL, SHARDS).await;
    for id in ALL {
        for (user, (count, history)) in applied_on(&cluster, id, &users).await {
            assert_eq!((count, history), (1, vec![format!("e-{user}")]), "node {id}, {user}");
        }
    }

    // Two nodes of three gone: no shard has a quorum. A LINEARIZABLE read
    // of no user reads no shard, so it still answers (it used to confirm
    // shard 0's leadership first).
    cluster.kill(2);
    cluster.kill(3);
    let lone = cluster.client(1).await.without_routing();
    let none = lone.batch_get_profiles(&[], &[], Consistency::Linearizable).await.expect("an empty batch");
    assert!(none.profiles.is_empty(), "{none:?}");
}

#[tokio::test]
async fn a_leader_that_hears_no_quorum_refuses_writes_and_proposes_nothing() {
    const SHARDS: u32 = 2;
    const ALL: [u64; 3] = [1, 2, 3];
    // Leaders placed by the test: no balancing (`max_moves = 0`).
    let mut cluster = Cluster::start_sharded_with_config(3, SHARDS, "replication = 3\nmax_moves = 0\n").await;
    wait_placed(&cluster, &ALL, SHARDS).await;
    let cut = 0;
    transfer(cluster.client(1).await, cut, 3).await;
    let placed = wait_placed(&cluster, &ALL, SHARDS).await;
    assert_eq!(placed[&cut].1, 3, "{placed:?}");

    // Both followers gone: node 3 still leads shard 0 (openraft 0.9's
    // leaders do not step down), and its probes go unanswered. Past twice
    // the longest election timeout (4 s by default) it refuses the write
    // (3 s of margin for a loaded machine: a write proposed before would
    // be applied once the followers are back).
    cluster.kill(1);
    cluster.kill(2);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let users = users_of(cut, SHARDS, 2);
    let events: Vec<Event> = users.iter().map(|u| order(u, format!("q-{u}"))).collect();
    let lone = cluster.client_once(3).await.without_routing();
    let started = Instant::now();
    let err = lone.write(events.clone()).await.expect_err("shard 0 has no quorum");
    println!("the write was refused after {:?}: {err}", started.elapsed());
    let message = refused_naming_shard(err, cut);
    assert!(
        message.contains("no quorum, so the write was not proposed"),
        "refused, not timed out: {message}"
    );
    assert!(message.contains("only [3] answered"), "names who answers: {message}");

    // The followers come back: the refused events were never in the log.
    cluster.restart(1).await;
    cluster.restart(2).await;
    wait_caught_up(&cluster, &ALL, SHARDS).await;
    for id in ALL {
        let applied = applied_on(&cluster, id, &users).await;
        for user in &users {
            let (count, history) = applied.get(user).cloned().unwrap_or_default();
            assert_eq!((count, history), (0, Vec::new()), "node {id}, {user}: the refused write was applied");
        }
    }
    // The same request, sent again, applies each event once.
    let client = cluster.client(3).await;
    let retry = write_until_answered(&client, &events, "the restart").await;
    assert_eq!((retry.applied, retry.duplicates), (events.len() as u32, 0), "{retry:?}");
    wait_caught_up(&cluster, &ALL, SHARDS).await;
    for id in ALL {
        for (user, (count, history)) in applied_on(&cluster, id, &users).await {
            assert_eq!((count, history), (1, vec![format!("q-{user}")]), "node {id}, {user}");
        }
    }
}

/// Node `id`'s (last log index, applied index) of `shard`.
async fn log_of(cluster: &Cluster, id: u64, shard: u32) -> (u64, u64) {
    let status = cluster.client_once(id).await.cluster_status().await.expect("status");
    let s = status.shard_status.iter().find(|s| s.shard == shard).expect("hosts the shard");
    (s.last_log_index, s.applied_index)
}

/// A leader cut off from its quorum proposes no tick either: a
/// time-driven tag falls due while both followers are down, and the
/// leader's log of the shard does not grow (a tick proposed then would
/// wait in it for the followers, and commit, or be dropped, whenever they
/// come back). Once they are back, the tick is proposed and applied.
#[tokio::test]
async fn a_leader_that_hears_no_quorum_proposes_no_tick() {
    const SHARDS: u32 = 2;
    const ALL: [u64; 3] = [1, 2, 3];
    const IDLE_AFTER_MS: i64 = 20_000;
    let mut cluster = Cluster::start_sharded_with_config(3, SHARDS, "replication = 3\nmax_moves = 0\n").await;
    wait_placed(&cluster, &ALL, SHARDS).await;
    let cut = 0;
    transfer(cluster.client(1).await, cut, 3).await;
    let schema = format!(
        "{}\n[features.last_order]\nfamily = \"trade\"\nagg = \"last_time\"\n\n[tags.idle]\nrule = 'not \
         is_null(last_order) and now - last_order > {}s'\n",
        portrait_core::schema::DEFAULT_SCHEMA_TOML,
        IDLE_AFTER_MS / 1000
    );
    cluster.client(1).await.apply_schema(schema, false).await.expect("schema");
    let placed = wait_placed(&cluster, &ALL, SHARDS).await;
    assert_eq!(placed[&cut].1, 3, "{placed:?}");
    let users = users_of(cut, SHARDS, 2);
    let t = now_ms();
    let events: Vec<Event> = users.iter().map(|u| order(u, format!("t-{u}"))).collect();
    cluster.client(3).await.write(events).await.expect("write");
    wait_caught_up(&cluster, &ALL, SHARDS).await;
    // The entries the write sets off (a tick about a second later) are in:
    // nothing is proposed for 2 s.
    let mut last = log_of(&cluster, 3, cut).await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = log_of(&cluster, 3, cut).await;
        if now == last {
            break;
        }
        assert!(now_ms() < t + 12_000, "node 3 keeps proposing in shard {cut}: {now:?}");
        last = now;
    }

    // Both followers gone well before the tag falls due (at t + 20 s);
    // node 3 knows it has no quorum 4 s later (5 s are given).
    cluster.kill(1);
    cluster.kill(2);
    let killed = now_ms();
    let sleep_until =
        |at_ms: i64| tokio::time::sleep(Duration::from_millis((at_ms - now_ms()).max(0) as u64));
    sleep_until(killed + 5_000).await;
    let before = log_of(&cluster, 3, cut).await;
    assert!(now_ms() + 1_000 < t + IDLE_AFTER_MS, "the tag fell due too early to tell; a loaded machine?");
    // Due, and five tick intervals (1 s) past it.
    sleep_until(t + IDLE_AFTER_MS + 5_000).await;
    let after = log_of(&cluster, 3, cut).await;
    assert_eq!(after, before, "node 3's log of shard {cut} (last, applied) grew while it had no quorum");

    // The followers back: the tick is proposed and applied.
    cluster.restart(1).await;
    cluster.restart(2).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while log_of(&cluster, 3, cut).await.1 <= before.1 {
        assert!(Instant::now() < deadline, "no tick applied once the quorum was back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
