//! How far behind the leader a node reports itself (`ReadInfo.lag_entries`,
//! `leader_contact_age_ms`) and the leader reports each member
//! (`ClusterStatus` member `lag_entries`), on real `portraitd` processes:
//! a follower that still hears the leader but receives no entries, and one
//! cut off entirely; both catch up and report 0 after heal.

use std::time::Duration;

use portrait_client::portrait_proto::v1::{ClusterStatusResponse, ReadInfo};
use portrait_client::{Consistency, PortraitClient};
use portrait_cluster_tests::workload::order;
use portrait_cluster_tests::Cluster;
use tokio::time::Instant;

const ALL: [u64; 3] = [1, 2, 3];
/// Writes made while the follower is behind (one raft entry each).
const N: u64 = 40;

/// The `ReadInfo` of a local read on `client`'s node.
async fn read_info(client: &PortraitClient) -> ReadInfo {
    let r = client.batch_get_profiles(&["u0".into()], &[], Consistency::Local).await.unwrap();
    r.read_info.expect("read info")
}

/// The lag the leader reports for member `id`.
fn member_lag(status: &ClusterStatusResponse, id: u64) -> Option<u64> {
    status.members.iter().find(|m| m.node_id == id).and_then(|m| m.lag_entries)
}

/// Polls `probe` until it holds (at most 20 s); `what` names it on failure.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match probe().await {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => panic!("{what}: still {last}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Writes `N` events one entry at a time; returns the last log index.
async fn write_n(client: &PortraitClient, first: u64) -> u64 {
    let mut last = 0;
    for i in first..first + N {
        last = client.write(vec![order(i)]).await.expect("write via the leader").log_index;
    }
    last
}

#[tokio::test]
async fn a_follower_behind_the_leader_reports_its_lag_until_it_catches_up() {
    let cluster = &Cluster::start(3).await;
    let leader = cluster.wait_leader(&ALL).await;
    let f = ALL.into_iter().find(|&id| id != leader).unwrap();
    let (lc, fc) = (cluster.client(leader).await, cluster.client(f).await);
    eventually("follower caught up at start", || async move {
        let i = read_info(&cluster.client(f).await).await;
        match i.leader_contact_age_ms {
            Some(_) if i.lag_entries == 0 => Ok(()),
            _ => Err(format!("{i:?}")),
        }
    })
    .await;

    // The follower hears the leader (and its commit index) but gets no entries.
    fc.set_faults(Vec::new(), vec![leader]).await.unwrap();
    let last = write_n(&lc, 0).await;
    eventually("follower reports the entries it misses", || async move {
        let i = read_info(&cluster.client(f).await).await;
        let s = cluster.client(f).await.cluster_status().await.unwrap();
        match i.leader_contact_age_ms {
            Some(_)
                if i.lag_entries >= N && i.applied_index + i.lag_entries >= last && s.lag_entries >= N =>
            {
                Ok(())
            }
            _ => Err(format!("{i:?}, status lag {}", s.lag_entries)),
        }
    })
    .await;
    let s = lc.cluster_status().await.unwrap();
    assert!(member_lag(&s, f).unwrap() >= N, "the leader sees the follower behind: {:?}", s.members);
    for id in ALL.into_iter().filter(|&id| id != f) {
        assert!(member_lag(&s, id).is_some(), "the leader reports every member: {:?}", s.members);
    }
    eventually("the leader itself is caught up", || async move {
        let i = read_info(&cluster.client(leader).await).await;
        if i.lag_entries == 0 {
            Ok(())
        } else {
            Err(format!("{i:?}"))
        }
    })
    .await;

    fc.set_faults(Vec::new(), Vec::new()).await.unwrap();
    caught_up(cluster, f, last).await;
}

#[tokio::test]
async fn a_cut_off_follower_shows_a_growing_contact_age_then_catches_up() {
    let cluster = &Cluster::start(3).await;
    let leader = cluster.wait_leader(&ALL).await;
    let f = ALL.into_iter().find(|&id| id != leader).unwrap();
    let others: Vec<u64> = ALL.into_iter().filter(|&id| id != f).collect();
    cluster.partition(&[f], &others).await;
    let last = write_n(&cluster.client(leader).await, 1000).await;

    // Cut off, the follower cannot know how far the leader moved on; it
    // can tell how long ago it last heard from it.
    eventually("the follower's last leader contact ages", || async move {
        let i = read_info(&cluster.client(f).await).await;
        match i.leader_contact_age_ms {
            Some(age) if age >= 1000 => Ok(()),
            _ => Err(format!("{i:?}")),
        }
    })
    .await;
    let s = cluster.client(leader).await.cluster_status().await.unwrap();
    assert!(member_lag(&s, f).unwrap() >= N, "the leader sees the follower behind: {:?}", s.members);

    cluster.heal().await;
    caught_up(cluster, f, last).await;
}

/// After heal: `f` applies up to `last` and reports lag 0 with a fresh
/// contact, and the leader (whichever node leads now) reports every member
/// at lag 0.
async fn caught_up(cluster: &Cluster, f: u64, last: u64) {
    eventually("the follower catches up and reports lag 0", || async move {
        let i = read_info(&cluster.client(f).await).await;
        match i.leader_contact_age_ms {
            Some(age) if i.lag_entries == 0 && i.applied_index >= last && age < 1000 => Ok(()),
            _ => Err(format!("{i:?}")),
        }
    })
    .await;
    eventually("the leader reports every member at lag 0", || async move {
        let leader = cluster.wait_leader(&ALL).await;
        let s = cluster.client(leader).await.cluster_status().await.unwrap();
        match ALL.iter().all(|&id| member_lag(&s, id) == Some(0)) {
            true => Ok(()),
            false => Err(format!("{:?}", s.members)),
        }
    })
    .await;
}
