//! A read storm does not starve raft (issue 10, section 2): reads run their
//! storage work on the blocking pool, at most `MAX_CONCURRENT_READS` at a
//! time, never on the async workers that carry heartbeats. 48 concurrent
//! readers hammer every node of a 3-node cluster (default heartbeat 250 ms,
//! election timeouts 1–2 s) with large `BatchGetProfiles` for 8 s, while a
//! writer keeps going through the leader: no election happens (the term
//! stays), the leader stays, and writes keep being acknowledged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portrait_client::Consistency;
use portrait_cluster_tests::workload::order;
use portrait_cluster_tests::Cluster;
use tokio::time::Instant;

const ALL: [u64; 3] = [1, 2, 3];
const READERS: u64 = 48;
/// Ids per `BatchGetProfiles`: users `u0`..`u99`, each with orders from the
/// preload (`order(i)` writes user `u{i % 1000}`); distinct, since a
/// repeated id would be read once.
const IDS: usize = 100;
const STORM: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elections_stay_quiet_while_reads_saturate_every_node() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.wait_leader(&ALL).await;
    let lc = cluster.client(leader).await;
    for i in 0..300 {
        lc.write(vec![order(i)]).await.expect("preload");
    }
    let before = lc.cluster_status().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let ids: Vec<String> = (0..IDS).map(|u| format!("u{u}")).collect();
    let mut readers = Vec::new();
    for r in 0..READERS {
        let client = cluster.client(ALL[(r % 3) as usize]).await;
        let (stop, reads, ids) = (stop.clone(), reads.clone(), ids.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client.batch_get_profiles(&ids, &[], Consistency::Local).await.expect("read");
                assert_eq!(r.profiles.len(), IDS);
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // A writer through the leader the whole time; the longest wait for an
    // acknowledgement is printed (figures belong in benchmarks).
    let start = Instant::now();
    let (mut written, mut slowest) = (0u64, Duration::ZERO);
    while start.elapsed() < STORM {
        let t = Instant::now();
        lc.write(vec![order(1_000 + written)]).await.expect("a write during the read storm");
        slowest = slowest.max(t.elapsed());
        written += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.expect("reader");
    }

    let reads = reads.load(Ordering::Relaxed);
    println!(
        "{reads} batch reads of {IDS} users and {written} writes in {STORM:?}; slowest write {slowest:?}"
    );
    assert!(reads > READERS, "the readers barely ran: {reads} batch reads");
    for id in ALL {
        let s = cluster.client(id).await.cluster_status().await.unwrap();
        assert_eq!(
            (s.term, s.leader_id),
            (before.term, leader),
            "node {id}: an election happened during the read storm"
        );
    }
}
