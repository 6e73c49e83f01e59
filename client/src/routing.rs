//! Routing by shard: the client caches the cluster's shard map
//! (`Admin.ShardMap`) and sends each call, or each shard's part of a call,
//! straight to a node that serves its shard: writes and LINEARIZABLE reads
//! to the shard's leader, LOCAL reads to the node the client was created
//! with when it hosts the shard (else the leader, else any replica).
//!
//! The map is fetched on first use and again when it is older than
//! [`MAP_TTL`], when an answer carries a newer epoch in
//! `x-portrait-map-epoch` (or another cluster's id in
//! `x-portrait-cluster-id`: a cluster created anew at the same addresses,
//! whose epochs start again at 1), or after a node it named answered UNAVAILABLE
//! (a redirect, no leader, unreachable). Routing only saves hops: any node
//! serves any call, so without a map, or when the node a map names fails,
//! a call goes through the [`Router`] as before (redirects and retries).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portrait_proto::v1::{ShardMapRequest, ShardMapResponse};
use tokio::time::Instant;
use tonic::Status;

use crate::conn::{lazy_channel, normalize_endpoint, Chan, Conn, ConnectOptions, Router};
use crate::shard::{shard_of, MAX_SHARDS};
use crate::ClientError;

/// Response header carrying the answering node's map epoch.
pub const MAP_EPOCH_HEADER: &str = "x-portrait-map-epoch";
/// Response header carrying the id of the answering node's cluster (16 hex
/// digits; absent before the cluster exists).
pub const CLUSTER_ID_HEADER: &str = "x-portrait-cluster-id";

/// The newest map answers told of: the cluster (0: none said) and the
/// largest epoch within it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    pub cluster: u64,
    pub epoch: u64,
}

impl Seen {
    /// What is seen after an answer carrying `cluster` (0: none) and
    /// `epoch`. Another cluster's id replaces what was seen, as epochs of
    /// two clusters do not compare (a cluster created anew at the same
    /// addresses starts again at 1); otherwise the larger epoch.
    pub fn note(self, cluster: u64, epoch: u64) -> Seen {
        if cluster != 0 && self.cluster != 0 && cluster != self.cluster {
            return Seen { cluster, epoch };
        }
        Seen { cluster: if cluster == 0 { self.cluster } else { cluster }, epoch: self.epoch.max(epoch) }
    }

    /// Whether `map` is behind what was seen: another cluster's, or older.
    fn passes(self, map: &RouteMap) -> bool {
        let other_cluster = self.cluster != 0 && map.cluster != 0 && map.cluster != self.cluster;
        other_cluster || map.epoch < self.epoch
    }
}
/// How long a fetched map is used before it is fetched again (leaders
/// move without a new epoch).
pub const MAP_TTL: Duration = Duration::from_secs(10);

/// What routing needs of a shard map.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RouteMap {
    /// The cluster's id (0: the node did not say).
    pub cluster: u64,
    pub epoch: u64,
    pub shards: u32,
    /// The endpoint of each node.
    endpoints: BTreeMap<u64, String>,
    /// Per shard: its replicas' nodes and its leader, if known.
    replicas: Vec<Vec<u64>>,
    leaders: Vec<Option<u64>>,
    /// The node the client was created with, if the map came from it.
    home: Option<u64>,
}

impl RouteMap {
    /// The map `answer` describes; `from` is the endpoint that answered,
    /// and is `home` when it is the client's seed. `None` when the answer
    /// names no shard count or one past [`MAX_SHARDS`] (the client then
    /// routes without a map).
    pub fn new(answer: ShardMapResponse, from: &str, home: bool) -> Option<RouteMap> {
        let shards = answer.shards;
        if !(1..=MAX_SHARDS).contains(&shards) {
            return None;
        }
        let mut endpoints: BTreeMap<u64, String> =
            answer.nodes.into_iter().map(|n| (n.node_id, normalize_endpoint(&n.addr))).collect();
        // The answering node is reached where it answered (its advertised
        // address may be a name only its peers resolve).
        endpoints.insert(answer.node_id, from.to_string());
        let mut replicas = vec![Vec::new(); shards as usize];
        let mut leaders = vec![None; shards as usize];
        for s in answer.shard_replicas.into_iter().filter(|s| s.shard < shards) {
            replicas[s.shard as usize] = s.replicas.iter().map(|r| r.node_id).collect();
            leaders[s.shard as usize] = Some(s.leader_id).filter(|&l| l != 0);
        }
        let home = home.then_some(answer.node_id);
        Some(RouteMap {
            cluster: answer.cluster_id,
            epoch: answer.epoch,
            shards,
            endpoints,
            replicas,
            leaders,
            home,
        })
    }

    pub fn shard_of(&self, user_id: &str) -> u32 {
        shard_of(user_id, self.shards)
    }

    /// Where a call of `shard` goes: its leader when `leader` is asked,
    /// else the home node if it hosts the shard; failing that, the other,
    /// then the first replica. `None`: the map knows no node of the shard
    /// (the router decides).
    pub fn target(&self, shard: u32, leader: bool) -> Option<&str> {
        let replicas = self.replicas.get(shard as usize)?;
        let known_leader = self.leaders[shard as usize];
        let home = self.home.filter(|h| replicas.contains(h));
        let (first, second) = if leader { (known_leader, home) } else { (home, known_leader) };
        let node = first.or(second).or_else(|| replicas.first().copied())?;
        self.endpoints.get(&node).map(String::as_str)
    }
}

/// The cached map and connections to the nodes it names, shared by the
/// clones of a client.
pub(crate) struct Routes {
    cache: tokio::sync::Mutex<Cached>,
    /// Set when a node the map named failed: the next call fetches it again.
    stale: AtomicBool,
    /// Set while a call refreshes a cached map (see [`Routes::map`]).
    refreshing: AtomicBool,
    channels: Mutex<HashMap<String, Chan>>,
    /// Nodes the map names that a call could not reach, or gave up on
    /// (its deadline passed there), with when calls go to them directly
    /// again ([`ROUTE_PAST_FOR`]); meanwhile they go through the router.
    /// At most one per node of the map.
    route_past: Mutex<HashMap<String, Instant>>,
    options: ConnectOptions,
}

/// How long calls go through the router instead of to a node the map
/// names once a call could not reach it or was cut short there by its
/// deadline. Without it, while the map still names a silent node (until
/// its shard elects another leader and the map is fetched again), every
/// call to its shards would wait there until its deadline passed.
pub const ROUTE_PAST_FOR: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Cached {
    map: Option<Arc<RouteMap>>,
    fetched: Option<Instant>,
    /// After failed fetches: no fetch for a stale map before this, and
    /// the wait after the next failure.
    retry: Option<(Instant, Duration)>,
}

/// The first wait after a failed fetch before a stale map (a node it
/// named failed, a newer epoch seen) is fetched again; each failure in a
/// row doubles it, up to [`MAP_TTL`]. Without it, while the nodes that
/// serve the map are down, every call would first try them.
pub const REFETCH_BACKOFF: Duration = Duration::from_millis(250);

/// The longest wait before a stale map is fetched again after fetches in
/// a row that answered the map as cached.
pub const SAME_MAP_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Cached {
    /// Whether to fetch now: no map was fetched yet or it expired, or it is
    /// stale (or none was had: the first fetch failed) and the backoff
    /// after failed fetches has passed.
    fn due(&self, stale: bool, now: Instant) -> bool {
        let expired = self.fetched.is_none_or(|at| now.duration_since(at) > MAP_TTL);
        let stale = stale || self.map.is_none();
        expired || (stale && self.retry.is_none_or(|(at, _)| now >= at))
    }

    /// Records a fetch's outcome at `now`, `seen` being the newest map
    /// answers told of: a map at least that new resets the backoff. A
    /// failure keeps the old map (it still routes most calls right) and
    /// waits longer before the next; so does a map older than the cached
    /// one (kept: a lagging node's answer never replaces a newer map), and
    /// a map taken that is still older than `seen` (else every call would
    /// fetch again). A map of another cluster than the cached one replaces
    /// it when it is the cluster seen last, whatever the epochs, and the
    /// next fetch waits too (should nodes of both clusters still answer,
    /// the client would otherwise fetch on every call).
    fn fetched(&mut self, map: Option<RouteMap>, seen: Seen, now: Instant) {
        self.fetched = Some(now);
        let newer = |m: &RouteMap| match &self.map {
            None => true,
            Some(cached) if cached.cluster != m.cluster => m.cluster == seen.cluster,
            Some(cached) => m.epoch >= cached.epoch,
        };
        match map {
            Some(map) if newer(&map) => {
                let switched = self.map.as_ref().is_some_and(|cached| cached.cluster != map.cluster);
                let behind = seen.passes(&map) || switched;
                // The same map again (a node answered UNAVAILABLE under
                // load, or its shard has no leader yet): the next stale
                // fetch waits too, up to a second, else every call failing
                // so would fetch the map once more.
                let same = self.map.as_deref() == Some(&map);
                self.map = Some(Arc::new(map));
                match (behind, same) {
                    (true, _) => self.back_off(now, MAP_TTL),
                    (false, true) => self.back_off(now, SAME_MAP_BACKOFF_MAX),
                    (false, false) => self.retry = None,
                }
            }
            _ => self.back_off(now, MAP_TTL),
        }
    }

    /// The next stale fetch waits [`REFETCH_BACKOFF`], doubling after each
    /// in a row, up to `max`.
    fn back_off(&mut self, now: Instant, max: Duration) {
        let wait = self.retry.map_or(REFETCH_BACKOFF, |(_, wait)| (wait * 2).min(max));
        self.retry = Some((now + wait, wait));
    }
}

impl Routes {
    pub fn new(seed: Conn, options: ConnectOptions) -> Routes {
        Routes {
            cache: tokio::sync::Mutex::default(),
            stale: AtomicBool::new(false),
            refreshing: AtomicBool::new(false),
            channels: Mutex::new(HashMap::from([(seed.endpoint, seed.channel)])),
            route_past: Mutex::default(),
            options,
        }
    }

    /// The map to route by, fetched when there is none yet or it is older
    /// than [`MAP_TTL`], and when it is older than an epoch seen since or
    /// a node it named failed (not within [`REFETCH_BACKOFF`], doubling, of
    /// a failed fetch). `None` when no node gave one (the call goes
    /// through the router).
    ///
    /// Only the first map is waited for by every call. A cached map is
    /// refreshed by one call, without the cache's lock: the others route
    /// by the cached map meanwhile, so a silent node asked for the map
    /// (up to [`FETCH_TIMEOUT`] each) holds up one call, not all of them.
    ///
    /// The fetch runs in a task of its own, which the calling call awaits:
    /// a call dropped part way (its deadline passed while a silent node
    /// was asked) leaves the fetch to finish and record its outcome, the
    /// map or the backoff after a failure. Were it dropped with the call,
    /// nothing would be recorded, and every call with a deadline shorter
    /// than a fetch would start the same fetch again and be cut short.
    pub async fn map(self: &Arc<Self>, router: &Router) -> Option<Arc<RouteMap>> {
        let first = {
            let cached = self.cache.lock().await;
            if !cached.due(self.is_stale(&cached, router), Instant::now()) {
                return cached.map.clone();
            }
            let first = cached.map.is_none();
            if !first && self.refreshing.swap(true, Ordering::AcqRel) {
                return cached.map.clone();
            }
            first
        };
        // Cleared when the task ends, or is dropped without running (a
        // runtime shutting down): never left set.
        let refreshing = (!first).then(|| Refreshing(self.clone()));
        let (routes, router) = (self.clone(), router.clone());
        let fetch = tokio::spawn(async move {
            let _refreshing = refreshing;
            routes.refresh(&router, first).await
        });
        fetch.await.unwrap_or_default()
    }

    /// Whether the cached map is to be fetched again before its time: a
    /// node it named failed, or an answer told of a newer epoch.
    fn is_stale(&self, cached: &Cached, router: &Router) -> bool {
        let outdated = cached.map.as_ref().is_some_and(|m| router.seen().passes(m));
        self.stale.load(Ordering::Relaxed) || outdated
    }

    /// The fetch [`Routes::map`] starts: the first map (under the cache's
    /// lock, so every call waits for it; checked again once the lock is
    /// taken, as another call's fetch may have got it or failed just
    /// before), or a refresh of the cached one (its task holds the
    /// `refreshing` flag).
    async fn refresh(&self, router: &Router, first: bool) -> Option<Arc<RouteMap>> {
        let mut cached = self.cache.lock().await;
        if first {
            if cached.map.is_some() || !cached.due(self.is_stale(&cached, router), Instant::now()) {
                return cached.map.clone();
            }
            // Nothing to route by yet: every call waits for the first map.
            self.stale.store(false, Ordering::Relaxed);
            let map = self.fetch(router, &[]).await;
            self.took(&mut cached, map, router);
            return cached.map.clone();
        }
        let named: Vec<String> =
            cached.map.as_ref().map(|m| m.endpoints.values().cloned().collect()).unwrap_or_default();
        self.stale.store(false, Ordering::Relaxed);
        drop(cached);
        let map = self.fetch(router, &named).await;
        let mut cached = self.cache.lock().await;
        self.took(&mut cached, map, router);
        cached.map.clone()
    }

    /// Records a fetch's outcome in the cache, and drops the channels the
    /// map taken no longer names.
    fn took(&self, cached: &mut Cached, map: Option<RouteMap>, router: &Router) {
        cached.fetched(map, router.seen(), Instant::now());
        if let Some(map) = &cached.map {
            self.prune(map, &router.seed().endpoint);
            router.know_nodes(map.endpoints.values().cloned().collect());
        }
    }

    /// Drops the channels to endpoints neither `map` nor the seed names (a
    /// node removed, or moved to another address): calls holding one keep
    /// it; the connection closes once they are done.
    fn prune(&self, map: &RouteMap, seed: &str) {
        let mut channels = self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        channels.retain(|endpoint, _| endpoint == seed || map.endpoints.values().any(|e| e == endpoint));
        drop(channels);
        let mut past = self.route_past.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        past.retain(|endpoint, _| endpoint == seed || map.endpoints.values().any(|e| e == endpoint));
    }

    /// The next call fetches the map again.
    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// A call could not reach `endpoint`, a node the map named, or gave up
    /// there: calls go through the router instead for [`ROUTE_PAST_FOR`],
    /// and the next one fetches the map again.
    pub fn unreachable(&self, endpoint: &str) {
        self.mark_stale();
        let mut past = self.route_past.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        past.insert(endpoint.to_string(), Instant::now() + ROUTE_PAST_FOR);
    }

    /// `target`, unless calls are to route past it for now.
    pub fn reachable<'a>(&self, target: Option<&'a str>) -> Option<&'a str> {
        let target = target?;
        let mut past = self.route_past.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        past.retain(|_, until| *until > now);
        (!past.contains_key(target)).then_some(target)
    }

    /// A channel to `endpoint`, shared by calls (connected on first use).
    pub fn channel(&self, endpoint: &str) -> Result<Chan, ClientError> {
        let mut channels = self.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = lazy_channel(endpoint, &self.options)?;
        channels.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Clears the routes' `refreshing` flag when dropped.
struct Refreshing(Arc<Routes>);

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
    }
}

/// How long one node is given to answer for the map: the call refreshing
/// it (or every call, for the first map) waits meanwhile.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Other nodes of the cached map a fetch asks when the seed and the
/// router's current node give no map as new as the newest epoch seen.
const FETCH_OTHERS: usize = 2;

impl Routes {
    /// Asks the seed for the map, then the router's current node, then up
    /// to [`FETCH_OTHERS`] other nodes `named` (the cached map's), until
    /// one answers with a map at least as new as the newest seen (a
    /// lagging node's map is older); else the newest map answered. One
    /// attempt each, within [`FETCH_TIMEOUT`], so a fetch never holds a
    /// call up for long; a seed down for good no longer freezes the map.
    async fn fetch(&self, router: &Router, named: &[String]) -> Option<RouteMap> {
        let seed = router.seed();
        let current = router.current();
        let mut asked = vec![seed.clone()];
        if current.endpoint != seed.endpoint {
            asked.push(current);
        }
        let others = named.iter().filter(|e| !asked.iter().any(|c| &c.endpoint == *e)).take(FETCH_OTHERS);
        let others: Vec<Conn> = others
            .filter_map(|e| self.channel(e).ok().map(|channel| Conn { endpoint: e.clone(), channel }))
            .collect();
        asked.extend(others);
        let mut best: Option<RouteMap> = None;
        for conn in asked {
            let mut admin = crate::client::admin(conn.channel);
            let call = admin.shard_map(ShardMapRequest {});
            match tokio::time::timeout(FETCH_TIMEOUT, call)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("")))
            {
                Ok(answer) => {
                    router.note_epoch(answer.metadata());
                    let home = conn.endpoint == seed.endpoint;
                    let Some(map) = RouteMap::new(answer.into_inner(), &conn.endpoint, home) else {
                        continue;
                    };
                    let seen = router.seen();
                    if !seen.passes(&map) {
                        return Some(map);
                    }
                    // The seen cluster's first, then the newest.
                    let rank = |m: &RouteMap| (m.cluster == seen.cluster, m.epoch);
                    if best.as_ref().is_none_or(|b| rank(&map) > rank(b)) {
                        best = Some(map);
                    }
                }
                Err(status) => router.note_epoch(status.metadata()),
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use portrait_proto::v1::{MapNode, ShardReplica, ShardReplicas};

    use super::*;

    fn answer() -> ShardMapResponse {
        let replica = |node_id| ShardReplica { node_id, voter: true, ..Default::default() };
        let shard = |shard, nodes: &[u64], leader_id| ShardReplicas {
            shard,
            replicas: nodes.iter().map(|&n| replica(n)).collect(),
            leader_id,
            applied_index: None,
        };
        ShardMapResponse {
            epoch: 3,
            shards: 3,
            replication: 2,
            nodes: (1..=3).map(|n| MapNode { node_id: n, addr: format!("n{n}:7700") }).collect(),
            shard_replicas: vec![shard(0, &[1, 2], 2), shard(1, &[2, 3], 0), shard(2, &[3, 1], 3)],
            node_id: 1,
            draining: vec![],
            cluster_id: 0xa,
        }
    }

    /// Seen `epoch` of the cluster [`answer`] is in.
    fn seen(epoch: u64) -> Seen {
        Seen { cluster: 0xa, epoch }
    }

    #[test]
    fn targets_leaders_and_prefers_home_for_local_reads() {
        let map = RouteMap::new(answer(), "http://127.0.0.1:7701", true).unwrap();
        assert_eq!(map.target(0, true), Some("http://n2:7700"));
        assert_eq!(map.target(0, false), Some("http://127.0.0.1:7701"), "home hosts shard 0");
        assert_eq!(map.target(1, true), Some("http://n2:7700"), "no known leader: a replica");
        assert_eq!(map.target(1, false), Some("http://n2:7700"), "the first replica");
        assert_eq!(map.target(2, false), Some("http://127.0.0.1:7701"));
        assert_eq!(map.target(7, false), None, "no such shard");
    }

    #[test]
    fn a_map_with_an_impossible_shard_count_is_not_used() {
        for shards in [0, MAX_SHARDS + 1, u32::MAX] {
            let answer = ShardMapResponse { shards, ..answer() };
            assert!(RouteMap::new(answer, "http://127.0.0.1:7701", true).is_none(), "{shards}");
        }
        let answer = ShardMapResponse { shards: MAX_SHARDS, ..answer() };
        assert_eq!(RouteMap::new(answer, "http://127.0.0.1:7701", true).unwrap().replicas.len(), 4_096);
    }

    #[test]
    fn a_map_from_another_node_has_no_home() {
        let map = RouteMap::new(answer(), "http://127.0.0.1:7701", false).unwrap();
        assert_eq!(map.target(2, false), Some("http://n3:7700"), "the leader");
    }

    #[test]
    fn failed_fetches_back_off_for_a_stale_map_and_a_map_resets_the_wait() {
        let t0 = Instant::now();
        let ms = |n| Duration::from_millis(n);
        let mut cached = Cached::default();
        assert!(cached.due(false, t0), "no map yet");
        // A first fetch that failed is tried again after the backoff, not
        // only once the TTL has passed.
        cached.fetched(None, seen(3), t0);
        assert!(!cached.due(false, t0 + ms(249)) && cached.due(false, t0 + ms(250)), "no map: backoff");
        cached.retry = None;
        cached.fetched(RouteMap::new(answer(), "http://127.0.0.1:7701", true), seen(3), t0);
        assert!(!cached.due(false, t0 + ms(1)) && cached.due(true, t0 + ms(1)), "fresh: fetched when stale");
        // The nodes are down: each failure waits twice as long, up to the TTL.
        let mut at = t0 + ms(1);
        for wait in [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000] {
            cached.fetched(None, seen(3), at);
            assert!(!cached.due(true, at + ms(wait) - ms(1)), "stale, within {wait} ms of a failure");
            at += ms(wait);
            assert!(cached.due(true, at), "stale, {wait} ms after");
        }
        assert!(cached.map.is_some(), "the old map is kept");
        assert!(cached.due(false, at + MAP_TTL + ms(1)), "expired: fetched whatever the backoff");
        let moved = ShardMapResponse { epoch: 4, ..answer() };
        cached.fetched(RouteMap::new(moved, "http://127.0.0.1:7701", true), seen(3), at);
        assert!(cached.due(true, at + ms(1)), "a new map resets the backoff");
    }

    #[test]
    fn fetches_that_answer_the_cached_map_again_back_off_up_to_a_second() {
        let t0 = Instant::now();
        let ms = |n| Duration::from_millis(n);
        let map = |leader_id| {
            let mut answer = answer();
            answer.shard_replicas[1].leader_id = leader_id;
            RouteMap::new(answer, "http://127.0.0.1:7701", true)
        };
        let mut cached = Cached::default();
        cached.fetched(map(0), seen(3), t0);
        assert!(cached.due(true, t0 + ms(1)), "a first map: a stale mark fetches at once");
        // Calls failing under load mark the map stale; each fetch answers it
        // as it is.
        let mut at = t0 + ms(1);
        for wait in [250, 500, 1000, 1000, 1000] {
            cached.fetched(map(0), seen(3), at);
            assert!(!cached.due(true, at + ms(wait) - ms(1)), "the same map: within {wait} ms");
            at += ms(wait);
            assert!(cached.due(true, at), "{wait} ms after");
        }
        // Shard 1 elected a leader (same epoch): taken, and the wait is reset.
        cached.fetched(map(3), seen(3), at);
        assert_eq!(cached.map.as_ref().unwrap().target(1, true), Some("http://n3:7700"));
        assert!(cached.due(true, at + ms(1)), "a changed map resets the backoff");
    }

    #[test]
    fn an_older_map_never_replaces_a_newer_one_and_a_map_behind_the_epoch_seen_backs_off() {
        let t0 = Instant::now();
        let ms = |n| Duration::from_millis(n);
        let map =
            |epoch| RouteMap::new(ShardMapResponse { epoch, ..answer() }, "http://127.0.0.1:7701", true);
        let mut cached = Cached::default();
        cached.fetched(map(7), seen(7), t0);
        assert!(cached.due(true, t0 + ms(1)), "current: a stale mark fetches at once");
        // A lagging node answers epoch 5: the cached 7 stays, and the next
        // fetch waits.
        cached.fetched(map(5), seen(7), t0 + ms(1));
        assert_eq!(cached.map.as_ref().unwrap().epoch, 7);
        assert!(!cached.due(true, t0 + ms(2)), "backs off after an older map");
        assert!(cached.due(true, t0 + ms(252)));
        // Epoch 8 is seen, only 7 answered: taken (not older), but the
        // fetch backs off instead of running on every call.
        cached.fetched(map(7), seen(8), t0 + ms(300));
        assert!(!cached.due(true, t0 + ms(301)), "still behind the epoch seen: backs off");
        cached.fetched(map(8), seen(8), t0 + ms(2000));
        assert_eq!(cached.map.as_ref().unwrap().epoch, 8);
        assert!(cached.due(true, t0 + ms(2001)), "caught up: the backoff is reset");
    }

    #[test]
    fn a_cluster_created_anew_at_the_same_addresses_replaces_the_map_whatever_its_epoch() {
        let t0 = Instant::now();
        let ms = |n| Duration::from_millis(n);
        let map = |cluster_id, epoch| {
            let answer = ShardMapResponse { cluster_id, epoch, ..answer() };
            RouteMap::new(answer, "http://127.0.0.1:7701", true)
        };
        // What answers carry: another cluster's id starts the count again;
        // an answer without an id (an older node) counts as the same one.
        let old = Seen::default().note(0xa, 40);
        assert_eq!(old, Seen { cluster: 0xa, epoch: 40 });
        assert_eq!(old.note(0xa, 12), old, "a lagging node of the same cluster");
        assert_eq!(old.note(0, 41), Seen { cluster: 0xa, epoch: 41 });
        let new = old.note(0xb, 2);
        assert_eq!(new, Seen { cluster: 0xb, epoch: 2 });
        assert_eq!(new.note(0xb, 3), Seen { cluster: 0xb, epoch: 3 });

        let mut cached = Cached::default();
        cached.fetched(map(0xa, 40), old, t0);
        assert!(new.passes(cached.map.as_ref().unwrap()), "the cached map is the old cluster's: stale");
        cached.fetched(map(0xb, 2), new, t0 + ms(1));
        let taken = cached.map.as_ref().unwrap();
        assert_eq!((taken.cluster, taken.epoch), (0xb, 2), "taken although its epoch is lower");
        assert!(!cached.due(true, t0 + ms(2)), "another cluster: the next fetch waits");
        assert!(cached.due(true, t0 + ms(251)));
        // A node still answering with the old cluster's map (not yet
        // restarted) does not bring it back.
        cached.fetched(map(0xa, 41), new, t0 + ms(3));
        assert_eq!(cached.map.as_ref().unwrap().cluster, 0xb);
    }

    #[tokio::test]
    async fn channels_to_nodes_no_map_names_are_dropped() {
        let options = ConnectOptions::new();
        let seed = "http://127.0.0.1:1";
        let conn = Conn { endpoint: seed.into(), channel: lazy_channel(seed, &options).unwrap() };
        let routes = Routes::new(conn, options);
        for endpoint in ["http://gone:7700", "http://n2:7700"] {
            routes.channel(endpoint).unwrap();
        }
        let map = RouteMap::new(answer(), "http://127.0.0.1:7701", false).unwrap();
        routes.prune(&map, seed);
        let kept: BTreeSet<String> = routes.channels.lock().unwrap().keys().cloned().collect();
        assert_eq!(kept, BTreeSet::from([seed.to_string(), "http://n2:7700".to_string()]));
    }
}
