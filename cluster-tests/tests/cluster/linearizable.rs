//! Linearizability of registers across a leader failover, on real
//! processes: concurrent clients write and linearizably read one user's
//! attribute in each shard while a node leading some of the shards is
//! SIGKILLed; each register's recorded history is checked with the WGL
//! checker in `portrait_cluster_tests::linearizability`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portrait_client::portrait_proto::ValueKind;
use portrait_client::{Consistency, Event, PortraitClient, Value};
use portrait_cluster_tests::linearizability::{is_linearizable, Call, Op};
use portrait_cluster_tests::replicas::{transfer, users_of, wait_placed};
use portrait_cluster_tests::{Cluster, TEST_SHARDS};

/// Every write has the same event time, so the latest *applied* write wins:
/// the attribute behaves as a register in log order.
const TIME: i64 = 1_790_000_000_000;
const CLIENTS: u64 = 4;
/// Each client's operations, spread over the registers: 32 per register
/// (the checker takes at most 128).
const OPS_PER_CLIENT: usize = 32;

/// One register per shard: the first user id of each.
fn registers() -> Vec<String> {
    (0..TEST_SHARDS).map(|s| users_of(s, TEST_SHARDS, 1).remove(0)).collect()
}

fn write(user: &str, v: i64) -> Event {
    Event {
        user_id: user.into(),
        family: "registration".into(),
        r#type: "set".into(),
        event_time_ms: TIME,
        event_id: format!("set-{v}"),
        attrs: [("v".to_string(), Value::int(v))].into(),
    }
}

async fn read(client: &PortraitClient, user: &str) -> Result<Option<i64>, ()> {
    match client.get_profile(user, &["registration".into()], Consistency::Linearizable).await {
        Ok(r) => {
            let p = r.profile.unwrap_or_default();
            let v =
                p.families.get("registration").and_then(|f| f.attrs.get("v")).and_then(|a| a.value.clone());
            Ok(v.and_then(|v| match v.kind {
                Some(ValueKind::IntValue(i)) => Some(i),
                _ => None,
            }))
        }
        Err(e) if e.code().map(portrait_client::code_name) == Some("NOT_FOUND") => Ok(None),
        Err(_) => Err(()),
    }
}

/// Per register, its history.
type Histories = Arc<Mutex<Vec<Vec<Call>>>>;

/// Client `c`: operations `i` go to register `(i / 2 + c) % S`, writes and
/// reads alternating.
async fn client_loop(c: u64, endpoint: String, start: Instant, histories: Histories) {
    let client = PortraitClient::connect(&endpoint).await.unwrap();
    let registers = registers();
    let t = || start.elapsed().as_micros() as u64;
    for i in 0..OPS_PER_CLIENT {
        let r = (i / 2 + c as usize) % registers.len();
        let invoked = t();
        let call = if (i as u64 + c).is_multiple_of(2) {
            let v = (c * 1000 + i as u64) as i64;
            let ok =
                tokio::time::timeout(Duration::from_secs(5), client.write(vec![write(&registers[r], v)]))
                    .await;
            let returned = matches!(ok, Ok(Ok(_))).then(t);
            Call { op: Op::Write(v), invoked, returned }
        } else {
            match tokio::time::timeout(Duration::from_secs(5), read(&client, &registers[r])).await {
                Ok(Ok(v)) => Call { op: Op::Read(v), invoked, returned: Some(t()) },
                _ => Call { op: Op::Read(None), invoked, returned: None },
            }
        };
        histories.lock().unwrap()[r].push(call);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn registers_in_every_shard_stay_linearizable_across_a_kill_of_a_node_leading_some() {
    // Four nodes, RF 3: nodes 1-3 hold every shard, node 4 none (no
    // balancing moves: `max_moves = 0`).
    let all = [1, 2, 3, 4];
    let config = "replication = 3\nmax_moves = 0\n";
    let mut cluster = Cluster::start_sharded_with_config(4, TEST_SHARDS, config).await;
    wait_placed(&cluster, &all, TEST_SHARDS).await;
    // Node 1 created every shard and leads it (and the meta group): node 2
    // takes shards 0 and 1, and is killed.
    let (victim, moved) = (2, [0, 1]);
    for shard in moved {
        transfer(cluster.client(1).await, shard, victim).await;
    }
    let leaders = wait_placed(&cluster, &all, TEST_SHARDS).await;
    let led: Vec<u32> = leaders.iter().filter(|(_, (_, l))| *l == victim).map(|(&s, _)| s).collect();
    assert_eq!(led, moved, "{leaders:?}");

    // Clients start on the other nodes (one seed each; node 4 only knows
    // the map): the victim's shards' operations go to it until it dies.
    let seeds: Vec<String> = [1, 3, 4].iter().map(|&id| cluster.node(id).endpoint()).collect();
    let histories: Histories = Arc::new(Mutex::new(vec![Vec::new(); TEST_SHARDS as usize]));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(client_loop(c, seeds[c as usize % seeds.len()].clone(), start, histories.clone()))
        })
        .collect();

    // Every register has a completed operation before the kill (clients
    // connect and fetch the map first: slow on a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !histories.lock().unwrap().iter().all(|h| h.iter().any(|c| c.returned.is_some())) {
        assert!(Instant::now() < deadline, "some register completed no operation in 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill(victim);
    let killed_at = start.elapsed().as_micros() as u64;
    for t in tasks {
        t.await.unwrap();
    }
    println!("the clients finished {:?} after the start", start.elapsed());
    let histories = histories.lock().unwrap().clone();
    for (r, history) in histories.iter().enumerate() {
        let completed = history.iter().filter(|c| c.returned.is_some()).count();
        let before_kill = history.iter().filter(|c| c.returned.is_some_and(|t| t < killed_at)).count();
        let after_kill = history.iter().filter(|c| c.invoked > killed_at && c.returned.is_some()).count();
        println!("shard {r}: {completed} of {} operations completed, {before_kill} before the kill, {after_kill} after", history.len());
        assert!(completed >= history.len() / 2, "shard {r}: most operations completed: {history:#?}");
        assert!(
            before_kill > 0 && after_kill > 0,
            "shard {r}: operations before and after the kill: {history:#?}"
        );
        assert!(is_linearizable(history), "shard {r}: not linearizable: {history:#?}");
    }
}

/// A LINEARIZABLE batch read whose shards' leadership moves while it is
/// under way (leadership transfers back and forth between two nodes) is
/// answered whole: a part routed to the node it asked, which then finds
/// it no longer leads, is read at the new leader, not failed. The batch
/// goes straight to node 1 with no client routing or retry.
#[tokio::test]
async fn a_linearizable_batch_is_answered_while_its_shards_leadership_moves() {
    use portrait_client::portrait_proto::v1::profiles_client::ProfilesClient;
    use portrait_client::portrait_proto::v1::BatchGetProfilesRequest;

    let config = "replication = 3\nmax_moves = 0\n";
    let cluster = Cluster::start_sharded_with_config(3, TEST_SHARDS, config).await;
    wait_placed(&cluster, &[1, 2, 3], TEST_SHARDS).await;
    let users: Vec<String> = (0..TEST_SHARDS).flat_map(|s| users_of(s, TEST_SHARDS, 2)).collect();
    let client = cluster.client(1).await;
    let events = users.iter().enumerate().map(|(i, u)| write(u, i as i64)).collect();
    assert_eq!(client.write(events).await.expect("write").applied, users.len() as u32);

    let moving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let transfers = {
        let (client, moving) = (client.clone(), moving.clone());
        tokio::spawn(async move {
            for round in 0..3 {
                for to in [2, 1] {
                    for shard in 0..TEST_SHARDS {
                        transfer(client.clone(), shard, to).await;
                    }
                    println!("round {round}: every shard led by node {to}");
                }
            }
            moving.store(false, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut raw = ProfilesClient::connect(cluster.node(1).endpoint()).await.expect("connect to node 1");
    let request = BatchGetProfilesRequest {
        user_ids: users.clone(),
        families: vec!["registration".into()],
        consistency: Consistency::Linearizable as i32,
        ..Default::default()
    };
    let (mut answered, mut failed, mut served_elsewhere) = (0, Vec::new(), 0);
    while moving.load(std::sync::atomic::Ordering::SeqCst) {
        match raw.batch_get_profiles(request.clone()).await {
            Ok(r) => {
                let r = r.into_inner();
                let found: Vec<&str> =
                    r.profiles.iter().filter(|p| p.found).map(|p| p.user_id.as_str()).collect();
                assert_eq!(
                    found,
                    users.iter().map(String::as_str).collect::<Vec<_>>(),
                    "every user, in order"
                );
                served_elsewhere += usize::from(r.read_info.is_some_and(|i| i.node_id != 1));
                answered += 1;
            }
            Err(status) => failed.push(status),
        }
    }
    transfers.await.expect("transfers");
    println!(
        "{answered} batches answered ({served_elsewhere} reporting another node), {} failed",
        failed.len()
    );
    assert!(answered >= 10, "reads went on during the transfers: {answered}");
    assert!(failed.is_empty(), "batches failed while leadership moved: {failed:?}");
}
