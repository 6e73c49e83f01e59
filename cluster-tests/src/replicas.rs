//! Where each shard's replicas are, as the nodes report them
//! (`ClusterStatus.shard_status`), and the check that every replica of a
//! shard holds each acknowledged event of its users exactly once.
//!
//! The check reads, per user, the lifetime order count (`orders_lifetime`
//! of the default schema) and the trade history as one replica serves them
//! locally: the count must equal the distinct events applied, which must
//! hold every acknowledged event and only sent ones. Users write `trade`
//! orders only, fewer than the history's 100 per user.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use portrait_client::portrait_proto::v1::rule_value::Kind;
use portrait_client::portrait_proto::v1::{ClusterStatusResponse, ShardStatus};
use portrait_client::{shard_of, Consistency, Event, PortraitClient, Profile};

use crate::Cluster;

/// Per shard: the nodes holding a voting replica of it, and its leader.
pub type Placement = BTreeMap<u32, (BTreeSet<u64>, Option<u64>)>;

/// `ClusterStatus` of each running node of `nodes`.
pub async fn statuses(cluster: &Cluster, nodes: &[u64]) -> BTreeMap<u64, ClusterStatusResponse> {
    let mut all = BTreeMap::new();
    for &id in nodes.iter().filter(|&&id| cluster.node(id).is_running()) {
        all.insert(id, cluster.client(id).await.cluster_status().await.expect("status"));
    }
    all
}

/// Per shard, the nodes holding a voting replica of it, and its leader.
pub fn placement(all: &BTreeMap<u64, ClusterStatusResponse>) -> Placement {
    let mut by_shard = Placement::new();
    for (id, status) in all {
        // A replica that its leader has not added yet reports Follower
        // with no membership: only replicas whose membership names them vote.
        let voting = status.shard_status.iter().filter(|s| s.role == "Leader" || s.role == "Follower");
        for s in voting.filter(|s| s.voters.contains(id)) {
            let entry = by_shard.entry(s.shard).or_default();
            entry.0.insert(*id);
            if s.role == "Leader" {
                entry.1 = Some(*id);
            }
        }
    }
    by_shard
}

/// Waits until each of the `shards` shards has 3 voters and a leader
/// among `nodes`; returns them.
pub async fn wait_placed(
    cluster: &Cluster,
    nodes: &[u64],
    shards: u32,
) -> BTreeMap<u32, (BTreeSet<u64>, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let placed = placement(&statuses(cluster, nodes).await);
        if placed.len() == shards as usize && placed.values().all(|(n, l)| n.len() == 3 && l.is_some()) {
            return placed.into_iter().map(|(s, (n, l))| (s, (n, l.unwrap()))).collect();
        }
        assert!(Instant::now() < deadline, "shards not placed on 3 of {nodes:?}: {placed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until each of the `shards` shards has a leader, no election under
/// way, and its 3 replicas are voters and have
/// applied all the leader holds (nothing is written meanwhile). Returns
/// each shard's replicas then.
pub async fn wait_caught_up(cluster: &Cluster, nodes: &[u64], shards: u32) -> BTreeMap<u32, BTreeSet<u64>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    'poll: loop {
        assert!(Instant::now() < deadline, "replicas did not catch up: {:?}", statuses(cluster, nodes).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let all = statuses(cluster, nodes).await;
        let shard_status = || all.iter().flat_map(|(id, s)| s.shard_status.iter().map(move |r| (*id, r)));
        let mut caught_up = BTreeMap::new();
        for (_, l) in shard_status().filter(|(_, s)| s.role == "Leader") {
            let replicas: Vec<_> = shard_status().filter(|(_, s)| s.shard == l.shard).collect();
            // No election under way that could depose the leader (a
            // follower of a quiet group may not know the leader yet).
            let follows = |s: &ShardStatus| s.role != "Candidate" && s.term <= l.term;
            // Each a voter again (only voters serve reads): a promotion
            // that had not committed before a crash is made again.
            if l.applied_index < l.last_log_index
                || replicas.len() < 3
                || replicas.iter().any(|(id, s)| {
                    !follows(s) || s.applied_index < l.last_log_index || !s.voters.contains(id)
                })
            {
                continue 'poll;
            }
            caught_up.insert(l.shard, replicas.iter().map(|(id, _)| *id).collect());
        }
        if caught_up.len() == shards as usize {
            return caught_up;
        }
    }
}

/// Makes `node` the leader of `shard`, asking again while the shard is in
/// an election (the transfer refuses a target whose term moved on).
pub async fn transfer(client: PortraitClient, shard: u32, node: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = client.transfer_leader_of(node, Some(shard)).await {
        assert!(Instant::now() < deadline, "shard {shard} to node {node}: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `count` user ids of `shard` (of `shards`): `x<i>` for the first such `i`.
pub fn users_of(shard: u32, shards: u32, count: usize) -> Vec<String> {
    (0..).map(|i| format!("x{i}")).filter(|u| shard_of(u, shards) == shard).take(count).collect()
}

/// Event ids per user: sent at least once, and acknowledged.
#[derive(Default, Debug, Clone)]
pub struct Book {
    pub sent: BTreeMap<String, BTreeSet<String>>,
    pub acked: BTreeMap<String, BTreeSet<String>>,
}

impl Book {
    pub fn record(&mut self, events: &[Event], acked: bool) {
        let book = if acked { &mut self.acked } else { &mut self.sent };
        for e in events {
            book.entry(e.user_id.clone()).or_default().insert(e.event_id.clone());
        }
    }

    /// Adds `other`'s events.
    pub fn merge(&mut self, other: Book) {
        for (mine, theirs) in [(&mut self.sent, other.sent), (&mut self.acked, other.acked)] {
            for (user, ids) in theirs {
                mine.entry(user).or_default().extend(ids);
            }
        }
    }

    pub fn acked_total(&self) -> usize {
        self.acked.values().map(BTreeSet::len).sum()
    }
}

/// `orders_lifetime` of a profile (0 without one).
pub fn lifetime_orders(p: &Profile) -> u64 {
    feature_count(p, "orders_lifetime")
}

/// A counting feature's value (0 when the profile has none).
pub fn feature_count(p: &Profile, feature: &str) -> u64 {
    match p.features.get(feature).and_then(|v| v.kind.clone()) {
        Some(Kind::NumberValue(n)) => n as u64,
        _ => 0,
    }
}

/// Per user as node `id` serves it locally: (`orders_lifetime`, trade
/// history ids); users without a profile there are absent.
pub async fn applied_on(
    cluster: &Cluster,
    id: u64,
    users: &[String],
) -> BTreeMap<String, (u64, Vec<String>)> {
    let client = cluster.client(id).await.without_routing();
    let mut all = BTreeMap::new();
    // No selection: every family, feature and tag.
    for chunk in users.chunks(1000) {
        let r = client.batch_get_profiles(chunk, &[], Consistency::Local).await.expect("local read");
        assert_eq!(r.read_info.expect("read info").node_id, id, "read where the replica is");
        let history = |p: &Profile| {
            p.families.get("trade").map(|f| f.history.iter().map(|h| h.event_id.clone()).collect())
        };
        all.extend(
            r.profiles
                .iter()
                .map(|p| (p.user_id.clone(), (lifetime_orders(p), history(p).unwrap_or_default()))),
        );
    }
    all
}

/// Each user's count equals its distinct applied events, which hold every
/// acknowledged one and only sent ones, none twice.
pub fn check_exactly_once(
    node: u64,
    users: &[String],
    applied: &BTreeMap<String, (u64, Vec<String>)>,
    book: &Book,
) {
    let (empty, none) = (BTreeSet::new(), (0, Vec::new()));
    for user in users {
        let (count, history) = applied.get(user).unwrap_or(&none);
        let sent = book.sent.get(user).unwrap_or(&empty);
        let acked = book.acked.get(user).unwrap_or(&empty);
        let distinct: BTreeSet<String> = history.iter().cloned().collect();
        assert_eq!(distinct.len(), history.len(), "node {node}, {user}: an event applied twice: {history:?}");
        assert!(history.len() < 100, "node {node}, {user}: history full; spread the writes over more users");
        assert_eq!(*count, distinct.len() as u64, "node {node}, {user}: count vs distinct events applied");
        let missing: Vec<_> = acked.difference(&distinct).collect();
        assert!(missing.is_empty(), "node {node}, {user}: acknowledged but not applied: {missing:?}");
        let unsent: Vec<_> = distinct.difference(sent).collect();
        assert!(unsent.is_empty(), "node {node}, {user}: applied but never sent: {unsent:?}");
    }
}

/// Waits until every replica of each of the `shards` shards among `nodes`
/// has caught up, then checks on each that every user of `book` in the
/// shard holds each acknowledged event exactly once. Returns how many
/// (node, shard) replicas were checked.
pub async fn assert_every_replica_holds(cluster: &Cluster, nodes: &[u64], shards: u32, book: &Book) -> usize {
    let placed = wait_caught_up(cluster, nodes, shards).await;
    let mut checked = 0;
    for (shard, replicas) in &placed {
        let users: Vec<String> =
            book.sent.keys().filter(|u| shard_of(u, shards) == *shard).cloned().collect();
        for &id in replicas {
            check_exactly_once(id, &users, &applied_on(cluster, id, &users).await, book);
            checked += 1;
        }
    }
    checked
}

/// Drains node `id` through `client` and waits (at most 60 s) until the map
/// places no replica on it.
pub async fn drain(client: &PortraitClient, id: u64) {
    client.drain_node(id).await.expect("drain");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = client.replicas_on(id).await.expect("shard map");
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "node {id} still holds {left} replicas");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Shards each node of `all` leads, as the nodes report it (every node of
/// `all` included, also with none).
pub fn leaders_per_node(all: &BTreeMap<u64, ClusterStatusResponse>) -> BTreeMap<u64, usize> {
    all.iter()
        .map(|(&id, s)| {
            (id, s.shard_status.iter().filter(|s| s.role == "Leader" && s.leader_id == id).count())
        })
        .collect()
}

/// Waits (at most `within`) until the nodes of `nodes` lead within one
/// shard of each other and every one of the `shards` shards has a leader;
/// returns the shards led per node.
pub async fn wait_leaders_balanced(
    cluster: &Cluster,
    nodes: &[u64],
    shards: u32,
    within: Duration,
) -> BTreeMap<u64, usize> {
    let deadline = Instant::now() + within;
    loop {
        let led = leaders_per_node(&statuses(cluster, nodes).await);
        let (min, max) = (led.values().min().copied().unwrap_or(0), led.values().max().copied().unwrap_or(0));
        if led.values().sum::<usize>() == shards as usize && max - min <= 1 {
            return led;
        }
        assert!(Instant::now() < deadline, "leaders not balanced over {nodes:?}: {led:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits (at most 60 s) until every replica on `nodes` reports its logical
/// size measured at its applied index as of now (no writes meanwhile), and
/// returns the bytes per node and per shard replica.
pub async fn wait_sizes(cluster: &Cluster, nodes: &[u64]) -> BTreeMap<u64, BTreeMap<u32, u64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut before: Option<BTreeMap<u64, BTreeMap<u32, u64>>> = None;
    loop {
        let all = statuses(cluster, nodes).await;
        let sizes: Option<BTreeMap<u64, BTreeMap<u32, u64>>> = all
            .iter()
            .map(|(&id, s)| {
                let shards: Option<BTreeMap<u32, u64>> =
                    s.shard_status.iter().map(|s| Some((s.shard, s.state_bytes?))).collect();
                Some((id, shards?))
            })
            .collect();
        // Two readings a measuring round apart that agree.
        if let Some(sizes) = sizes {
            if before.as_ref() == Some(&sizes) {
                return sizes;
            }
            before = Some(sizes);
        }
        assert!(Instant::now() < deadline, "sizes not measured on {nodes:?}: {all:?}");
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    }
}
