//! Quiet idle groups (docs/shards.md, "Idle cost") on real `portraitd`
//! processes, 3 nodes and 8 shards: once the cluster is idle its leaders
//! stop heartbeating (every follower replica's last leader contact ages)
//! without any follower campaigning, a write wakes its shard at once, and
//! when the node leading the idle shards is killed, the liveness probe has
//! every shard elect a new leader.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use portrait_client::portrait_proto::v1::ClusterStatusResponse;
use portrait_client::{Consistency, Event, PortraitClient, WriteResponse};
use portrait_cluster_tests::replicas::wait_leaders_balanced;
use portrait_cluster_tests::{workload, Cluster};

const SHARDS: u32 = 8;
const ALL: [u64; 3] = [1, 2, 3];
/// Heartbeats every 250 ms keep a follower's contact younger than this.
const QUIET: Duration = Duration::from_secs(2);

fn visit(user: &str, id: &str) -> Event {
    workload::visit(user, id, id)
}

/// Writes one event for each of `users` through node `via`; every shard
/// must be touched.
async fn write_all(cluster: &Cluster, via: u64, users: &[String], round: &str) -> WriteResponse {
    let events = users.iter().map(|u| visit(u, &format!("{round}-{u}"))).collect();
    let written = cluster.client(via).await.write(events).await.expect("write");
    assert_eq!(written.shards.len(), SHARDS as usize, "the users cover every shard");
    written
}

fn users() -> Vec<String> {
    (0..64).map(|i| format!("quiet-user-{i}")).collect()
}

async fn status(cluster: &Cluster, id: u64) -> ClusterStatusResponse {
    cluster.client(id).await.cluster_status().await.expect("status")
}

/// Waits until node `id` has applied every part of `written`.
async fn wait_applied(cluster: &Cluster, id: u64, written: &WriteResponse) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(cluster, id).await;
        let behind =
            written.shards.iter().any(|p| s.shard_status[p.shard as usize].applied_index < p.log_index);
        if !behind {
            return;
        }
        assert!(Instant::now() < deadline, "node {id} did not apply {written:?}: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One user of each shard (from local reads on node `id`).
async fn user_per_shard(client: &PortraitClient, users: &[String]) -> BTreeMap<u32, String> {
    let mut by_shard = BTreeMap::new();
    for user in users {
        let read = client.get_profile(user, &[], Consistency::Local).await.expect("read");
        by_shard.entry(read.read_info.expect("read info").shard).or_insert_with(|| user.clone());
    }
    assert_eq!(by_shard.len(), SHARDS as usize);
    by_shard
}

/// Each shard's (leader, term) as node `id` sees it.
async fn leaders(cluster: &Cluster, id: u64) -> Vec<(u64, u64)> {
    status(cluster, id).await.shard_status.iter().map(|s| (s.leader_id, s.term)).collect()
}

/// How long ago node `id`'s replica of each shard last heard its leader
/// (a local read reports it), for the shards `id` follows.
async fn contact_ages(cluster: &Cluster, id: u64, probe: &BTreeMap<u32, String>) -> Vec<Duration> {
    let client = cluster.client(id).await;
    let s = status(cluster, id).await;
    let mut ages = Vec::new();
    for (shard, user) in probe {
        if s.shard_status[*shard as usize].role != "Follower" {
            continue;
        }
        let read = client.get_profile(user, &[], Consistency::Local).await.expect("read");
        let info = read.read_info.expect("read info");
        // A replica that has not heard its leader yet (one that led until
        // leader balancing moved the shard away) is not idle yet: zero.
        ages.push(info.leader_contact_age_ms.map_or(Duration::ZERO, Duration::from_millis));
    }
    ages
}

#[tokio::test]
async fn idle_leaders_stop_heartbeating_and_a_write_wakes_them() {
    let cluster = &Cluster::start_sharded(3, SHARDS).await;
    // Leader balancing first spreads the leaders (deliberate transfers,
    // not the campaigns this test looks for).
    wait_leaders_balanced(cluster, &ALL, SHARDS, Duration::from_secs(60)).await;
    let users = users();
    let written = write_all(cluster, 1, &users, "a").await;
    for id in ALL {
        wait_applied(cluster, id, &written).await;
    }
    let probe = user_per_shard(&cluster.client(1).await, &users).await;
    let before = leaders(cluster, 1).await;

    // Idle: no follower replica hears its leader any more.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut ages = Vec::new();
        for id in ALL {
            ages.extend(contact_ages(cluster, id, &probe).await);
        }
        assert_eq!(ages.len(), 2 * SHARDS as usize, "two followers per shard");
        if ages.iter().all(|a| *a >= QUIET) {
            break;
        }
        assert!(Instant::now() < deadline, "followers still hear their leaders: {ages:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nobody campaigned meanwhile: the same leaders, in the same terms.
    for id in ALL {
        assert_eq!(leaders(cluster, id).await, before, "node {id}");
    }

    // A write wakes every shard it touches and is acknowledged at once.
    let started = Instant::now();
    let written = write_all(cluster, 1, &users, "b").await;
    let took = started.elapsed();
    // Far below a campaign's wait (about 1 s of silence, then a vote) had
    // the write to wake the shards; wide, for a loaded machine.
    println!("a write to idle shards took {took:?}");
    assert!(took < Duration::from_secs(5), "a write to idle shards took {took:?}");
    for id in ALL {
        wait_applied(cluster, id, &written).await;
    }
    // Woken, not elected: the same leaders, in the same terms (the 5 s
    // above only guards against a hang).
    for id in ALL {
        assert_eq!(leaders(cluster, id).await, before, "node {id}: an election after the write");
    }
    let mut ages = Vec::new();
    for id in ALL {
        ages.extend(contact_ages(cluster, id, &probe).await);
    }
    // Every follower heard its leader since the write was sent: a contact
    // age (the node's own clock, cut to whole ms) no older than the write.
    let since_write = started.elapsed();
    assert!(
        ages.iter().all(|a| *a <= since_write),
        "the followers heard the write ({since_write:?} ago): {ages:?}"
    );
}

#[tokio::test]
async fn killing_the_leader_of_idle_shards_elects_a_leader_in_every_shard() {
    let mut cluster = Cluster::start_sharded(3, SHARDS).await;
    let users = users();
    let written = write_all(&cluster, 1, &users, "a").await;
    for id in ALL {
        wait_applied(&cluster, id, &written).await;
    }
    // Idle long enough for every shard to rest: every follower replica
    // (two per shard) last heard its leader at least `QUIET` ago.
    let probe = user_per_shard(&cluster.client(1).await, &users).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ages = Vec::new();
        for id in ALL {
            ages.extend(contact_ages(&cluster, id, &probe).await);
        }
        if ages.len() == 2 * SHARDS as usize && ages.iter().all(|a| *a >= QUIET) {
            break;
        }
        assert!(Instant::now() < deadline, "the shards did not go idle: {ages:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = status(&cluster, 1).await;
    let victim = (1..=3u64)
        .max_by_key(|id| s.shard_status.iter().filter(|r| r.leader_id == *id).count())
        .expect("a leader");
    let led = s.shard_status.iter().filter(|r| r.leader_id == victim).count();
    assert!(led >= 2, "node {victim} leads several shards: {:?}", s.shard_status);
    let survivors: Vec<u64> = ALL.into_iter().filter(|&id| id != victim).collect();

    cluster.kill(victim);
    let killed = Instant::now();
    let bound = Duration::from_secs(10);
    loop {
        let mut led_by = Vec::new();
        for &id in &survivors {
            led_by.push(leaders(&cluster, id).await);
        }
        // Every shard led by a survivor, by its own account and the other's.
        let done = (0..SHARDS as usize).all(|shard| {
            let leader = led_by[0][shard].0;
            survivors.contains(&leader) && led_by.iter().all(|l| l[shard].0 == leader)
        });
        if done {
            break;
        }
        assert!(killed.elapsed() < bound, "not every shard has a new leader after {bound:?}: {led_by:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failover = killed.elapsed();
    eprintln!("every shard led again {failover:?} after the kill");
    for &id in &survivors {
        let s = status(&cluster, id).await;
        for r in &s.shard_status {
            assert!(r.leader_id != victim, "node {id} still follows the dead node: {:?}", s.shard_status);
        }
    }

    // Writes to every shard succeed through either survivor.
    for (i, &id) in survivors.iter().enumerate() {
        let written = write_all(&cluster, id, &users, &format!("b{i}")).await;
        for &other in &survivors {
            wait_applied(&cluster, other, &written).await;
        }
    }

    // The killed node comes back and follows every shard's new leader.
    cluster.restart(victim).await;
    let written = write_all(&cluster, survivors[0], &users, "c").await;
    wait_applied(&cluster, victim, &written).await;
}
