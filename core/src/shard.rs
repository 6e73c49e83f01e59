//! Shards: which shard a user belongs to, the cluster's shard map (nodes,
//! and the replicas each shard should have) and placement (where new
//! replicas go). See docs/shards.md.
//!
//! Pure and deterministic: the shard map is the state of the meta raft
//! group, so every function here gives the same answer on every replica
//! (ordered maps, ties broken by node id, no hashing of our own but the
//! shard hash).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A node's id (the raft node id).
pub type NodeId = u64;

/// Shards a cluster may have at most: the shard map and per-shard tables
/// (clocks, leaders) are sized by it, and a shard id must fit a `u16` in
/// client caches.
pub const MAX_SHARDS: u32 = 4_096;
/// Shards of a new cluster unless `--shards` says otherwise (docs/shards.md
/// explains the choice).
pub const DEFAULT_SHARDS: u32 = 64;
/// Replicas per shard a new cluster aims for (fewer while it has fewer
/// nodes).
pub const DEFAULT_REPLICATION: u32 = 3;
/// Replication factor at most: a shard's raft group stays small.
pub const MAX_REPLICATION: u32 = 7;

/// The shard of `user_id` among `shards`: `xxh3_64(utf8(user_id), seed 0)
/// mod shards`. Stable across versions and languages (docs/shards.md); it
/// is not the FNV-1a hash apply uses to spread a shard's users over its
/// threads, so one shard's users still spread over all of them.
pub fn shard_of(user_id: &str, shards: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(user_id.as_bytes()) % u64::from(shards.max(1))) as u32
}

/// Checks a shard count and replication factor for a new cluster.
pub fn check_layout(shards: u32, replication: u32) -> Result<(), String> {
    if !(1..=MAX_SHARDS).contains(&shards) {
        return Err(format!("shards: {shards} is outside 1..={MAX_SHARDS}"));
    }
    if !(1..=MAX_REPLICATION).contains(&replication) {
        return Err(format!("replication: {replication} is outside 1..={MAX_REPLICATION}"));
    }
    Ok(())
}

/// A node as the shard map knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Where clients reach it (`http://host:port`; its client port).
    pub addr: String,
    /// Where the other nodes reach it (its peer port; raft memberships
    /// name this address).
    pub peer_addr: String,
    /// The random number its data dir was created with (0: not known).
    /// Peers address every raft message to this incarnation, and the node
    /// refuses those addressed to another: a node restarted under its id on
    /// an empty data dir has lost its votes and log, and must not take part
    /// in raft as if it had them.
    pub incarnation: u64,
}

/// The cluster's layout: its nodes and the replicas each shard should
/// have. The meta group replicates it; `epoch` grows with every change, so
/// a client or node holding an older map can tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// The cluster's id: the incarnation of the data dir of the node that
    /// created it, kept for the cluster's life. Epochs compare only within
    /// one cluster: a client that sees another id (a cluster created anew
    /// at the same addresses, or restored into) drops what it knew.
    pub cluster: u64,
    pub epoch: u64,
    /// `S`, fixed at creation.
    pub shards: u32,
    /// The replication factor aimed for (`RF`); a shard has
    /// min(RF, nodes) replicas.
    pub replication: u32,
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    /// Per shard, its replicas' nodes (distinct), in the order they were
    /// added.
    pub replicas: Vec<Vec<NodeId>>,
    /// Nodes being drained: they get no new replicas and placement moves
    /// theirs away, until `RemoveNode` takes them out.
    pub draining: BTreeSet<NodeId>,
}

/// A change of the shard map (a meta group command's effect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapChange {
    /// A node joins (or changes its address), running on the data dir
    /// `incarnation` (0: not known; a known one is kept). Refused if the
    /// map has the node on another data dir.
    AddNode { node: NodeId, addr: String, peer_addr: String, incarnation: u64 },
    /// `node` should host a replica of `shard`.
    AddReplica { shard: u32, node: NodeId },
    /// The replica of `shard` on `from` moves to `to` (which takes its
    /// place in the list). The shard's leader adds `to` as a learner,
    /// promotes it once caught up and only then removes `from`: the shard
    /// never has fewer voters than the map's replicas.
    MoveReplica { shard: u32, from: NodeId, to: NodeId },
    /// The replica of `shard` on `node` goes (a draining node's, when no
    /// other node can take it); refused if the shard would have fewer than
    /// [`ShardMap::target_replicas`].
    RemoveReplica { shard: u32, node: NodeId },
    /// `node` is drained: placement moves its replicas to the other nodes
    /// and gives it none. Refused for the last node that could hold
    /// replicas, and while another node is still draining.
    Drain { node: NodeId },
    /// A node leaves. Refused while it holds replicas (drain it first).
    RemoveNode { node: NodeId },
    /// `node`, silent past `replica_dead_after`, is drained (as
    /// [`MapChange::Drain`]) even while another node is still draining:
    /// that drain may have nowhere to move its replicas but this dead node
    /// (four nodes, RF 3, one dead, another drained), and would otherwise
    /// wait for it for good. Proposed only by the meta leader's dead-node
    /// check, and only from apply rules version
    /// [`crate::rules::DRAIN_DEAD_BESIDE_DRAIN`] (every node decodes it).
    DrainDead { node: NodeId },
}

impl ShardMap {
    /// A new cluster's map: one node hosting every shard.
    pub fn create(
        shards: u32,
        replication: u32,
        node: NodeId,
        addr: &str,
        peer_addr: &str,
    ) -> Result<ShardMap, String> {
        check_layout(shards, replication)?;
        Ok(ShardMap {
            cluster: 0,
            epoch: 1,
            shards,
            replication,
            nodes: BTreeMap::from([(
                node,
                NodeEntry { addr: addr.into(), peer_addr: peer_addr.into(), incarnation: 0 },
            )]),
            replicas: vec![vec![node]; shards as usize],
            draining: BTreeSet::new(),
        })
    }

    /// The shard `user_id` belongs to.
    pub fn shard_of(&self, user_id: &str) -> u32 {
        shard_of(user_id, self.shards)
    }

    /// Replicas a shard should have now: min(RF, nodes not draining).
    pub fn target_replicas(&self) -> usize {
        (self.replication as usize).min(self.nodes.len() - self.draining.len())
    }

    /// Nodes that can take replicas (not draining, not in `unfit`), with
    /// their load.
    fn eligible_load(&self, unfit: &BTreeSet<NodeId>) -> BTreeMap<NodeId, usize> {
        let mut load = self.load();
        load.retain(|n, _| !self.draining.contains(n) && !unfit.contains(n));
        load
    }

    /// Shards with a replica on `node`, in shard order.
    pub fn hosted_by(&self, node: NodeId) -> Vec<u32> {
        (0..self.shards).filter(|&s| self.replicas[s as usize].contains(&node)).collect()
    }

    /// Replicas per node (every node of the map, also those with none).
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> = self.nodes.keys().map(|&n| (n, 0)).collect();
        for node in self.replicas.iter().flatten() {
            *load.entry(*node).or_default() += 1;
        }
        load
    }

    /// Applies `change`; an invalid one is refused and changes nothing.
    /// Every applied change moves the epoch on.
    pub fn apply(&mut self, change: &MapChange) -> Result<(), String> {
        match change {
            MapChange::AddNode { node, addr, peer_addr, incarnation } => {
                if addr.is_empty() || peer_addr.is_empty() {
                    return Err(format!("node {node}: a client and a peer address are required"));
                }
                let known = self.nodes.get(node).map_or(0, |n| n.incarnation);
                if known != 0 && *incarnation != 0 && known != *incarnation {
                    return Err(format!(
                        "node {node} is in the cluster on another data dir (incarnation {known:x}, not \
                         {incarnation:x})"
                    ));
                }
                let incarnation = if *incarnation == 0 { known } else { *incarnation };
                self.nodes.insert(
                    *node,
                    NodeEntry { addr: addr.clone(), peer_addr: peer_addr.clone(), incarnation },
                );
            }
            MapChange::AddReplica { shard, node } => {
                let replicas = self.replicas.get_mut(*shard as usize).ok_or_else(|| {
                    format!("shard {shard} does not exist (the cluster has {})", self.shards)
                })?;
                if !self.nodes.contains_key(node) {
                    return Err(format!("node {node} is not in the cluster"));
                }
                // A plan made before the drain committed: the drain would
                // have to move it off again, and RemoveNode wait for that.
                if self.draining.contains(node) {
                    return Err(format!("node {node} is draining: no replica is placed on it"));
                }
                if replicas.contains(node) {
                    return Err(format!("shard {shard} already has a replica on node {node}"));
                }
                replicas.push(*node);
            }
            MapChange::MoveReplica { shard, from, to } => {
                let replicas = self.replicas.get_mut(*shard as usize).ok_or_else(|| {
                    format!("shard {shard} does not exist (the cluster has {})", self.shards)
                })?;
                if !self.nodes.contains_key(to) {
                    return Err(format!("node {to} is not in the cluster"));
                }
                if self.draining.contains(to) {
                    return Err(format!("node {to} is draining: no replica is placed on it"));
                }
                if replicas.contains(to) {
                    return Err(format!("shard {shard} already has a replica on node {to}"));
                }
                let Some(slot) = replicas.iter_mut().find(|n| *n == from) else {
                    return Err(format!("shard {shard} has no replica on node {from}"));
                };
                *slot = *to;
            }
            MapChange::RemoveReplica { shard, node } => {
                // A shard never loses its last replica, whatever the target.
                let target = self.target_replicas().max(1);
                let replicas = self.replicas.get_mut(*shard as usize).ok_or_else(|| {
                    format!("shard {shard} does not exist (the cluster has {})", self.shards)
                })?;
                if !replicas.contains(node) {
                    return Err(format!("shard {shard} has no replica on node {node}"));
                }
                if replicas.len() <= target {
                    return Err(format!(
                        "shard {shard} would have fewer than its {target} replicas without node {node}"
                    ));
                }
                replicas.retain(|n| n != node);
            }
            MapChange::Drain { node } | MapChange::DrainDead { node } => {
                if !self.nodes.contains_key(node) {
                    return Err(format!("node {node} is not in the cluster"));
                }
                if self.draining.contains(node) {
                    return Err(format!("node {node} is already draining"));
                }
                let other = self.draining.iter().find(|n| !self.hosted_by(**n).is_empty());
                if let (Some(other), MapChange::Drain { .. }) = (other, change) {
                    return Err(format!(
                        "node {other} is still draining ({} replicas left): wait until it holds none (then \
                         remove it with cluster remove-node {other}), then drain node {node}",
                        self.hosted_by(*other).len()
                    ));
                }
                if self.nodes.len() - self.draining.len() <= 1 {
                    return Err(format!(
                        "node {node} is the last node that can hold replicas; add a node before draining it"
                    ));
                }
                self.draining.insert(*node);
            }
            MapChange::RemoveNode { node } => {
                if !self.nodes.contains_key(node) {
                    return Err(format!("node {node} is not in the cluster"));
                }
                // Without a node left to take replicas, every shard's target
                // would fall to 0 and the drain would remove the last ones.
                if !self.draining.contains(node) && self.nodes.len() - self.draining.len() <= 1 {
                    return Err(format!(
                        "node {node} is the last node that can hold replicas; add a node before removing it"
                    ));
                }
                let hosted = self.hosted_by(*node);
                if !hosted.is_empty() {
                    return Err(format!(
                        "node {node} still holds replicas of {} shards ({hosted:?}); drain it first \
                         (cluster drain {node}) and remove it once it holds none",
                        hosted.len()
                    ));
                }
                self.nodes.remove(node);
                self.draining.remove(node);
            }
        }
        self.epoch += 1;
        Ok(())
    }

    /// The next replicas to add so that every shard reaches
    /// [`ShardMap::target_replicas`] on distinct nodes, at most `limit` of
    /// them (placement moves a few replicas at a time). Each goes to the
    /// node with the fewest replicas (counting the ones planned before it)
    /// that does not host the shard yet, the lowest node id among equals;
    /// shards are served in order of how far they are from the target,
    /// then by shard id. No replica goes to a node in `unfit` (nodes not
    /// answering now: a replica there would never catch up, and its shard's
    /// leader would wait for it).
    pub fn plan_additions(&self, unfit: &BTreeSet<NodeId>, limit: usize) -> Vec<MapChange> {
        let target = self.target_replicas();
        let mut load = self.eligible_load(unfit);
        let mut short: Vec<(usize, u32)> = (0..self.shards)
            .filter_map(|s| {
                let have = self.replicas[s as usize].len();
                (have < target).then_some((have, s))
            })
            .collect();
        short.sort();
        let mut planned = Vec::new();
        let mut placed: BTreeMap<u32, BTreeSet<NodeId>> = BTreeMap::new();
        // Round-robin over the short shards, one replica each per round, so
        // a limited plan raises the worst shards first.
        while planned.len() < limit {
            let mut progressed = false;
            for &(have, shard) in &short {
                if planned.len() == limit {
                    break;
                }
                let extra = placed.get(&shard).map_or(0, BTreeSet::len);
                if have + extra >= target {
                    continue;
                }
                let hosts = &self.replicas[shard as usize];
                let taken = placed.entry(shard).or_default();
                let candidate = load
                    .iter()
                    .filter(|(n, _)| !hosts.contains(n) && !taken.contains(n))
                    .min_by_key(|(n, l)| (**l, **n))
                    .map(|(n, _)| *n);
                if let Some(node) = candidate {
                    taken.insert(node);
                    *load.get_mut(&node).expect("a node of the map") += 1;
                    planned.push(MapChange::AddReplica { shard, node });
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        planned
    }

    /// Replicas to take off draining nodes, at most `limit`, none of a
    /// shard in `busy`: each moves to the least loaded node that can take
    /// it (not in `unfit`: nodes not answering now, whose new replica
    /// would never catch up) and does not host the shard (lowest id among
    /// equals), or, where no node can, goes if the shard keeps
    /// [`ShardMap::target_replicas`]. Shards in order.
    pub fn plan_drain(&self, busy: &BTreeSet<u32>, unfit: &BTreeSet<NodeId>, limit: usize) -> Vec<MapChange> {
        let target = self.target_replicas();
        let mut load = self.eligible_load(unfit);
        let mut planned = Vec::new();
        for shard in (0..self.shards).filter(|s| !busy.contains(s)) {
            if planned.len() >= limit {
                break;
            }
            let replicas = &self.replicas[shard as usize];
            // An unfit (dead) draining node's replica first: moving a
            // living one first would leave the shard, for a while, with
            // one voter more that does not answer.
            let draining = || replicas.iter().filter(|n| self.draining.contains(n));
            let Some(&from) = draining().find(|n| unfit.contains(n)).or_else(|| draining().next()) else {
                continue;
            };
            let to = load.iter().filter(|(n, _)| !replicas.contains(n)).min_by_key(|(n, l)| (**l, **n));
            match to.map(|(n, _)| *n) {
                Some(to) => {
                    *load.get_mut(&to).expect("an eligible node") += 1;
                    planned.push(MapChange::MoveReplica { shard, from, to });
                }
                None if replicas.len() > target => {
                    planned.push(MapChange::RemoveReplica { shard, node: from })
                }
                None => {}
            }
        }
        planned
    }

    /// Moves that bring the replicas per node (of the nodes not draining)
    /// within one of each other, at most `limit`, none of a shard in `busy`
    /// (its last change is still under way). Only when no shard is short of replicas (additions come
    /// first). Each moves a replica from the most loaded node (the lowest
    /// id among equals) to the least loaded one that does not host the
    /// shard (the lowest id among equals), taking the lowest shard id the
    /// pair allows; a shard moves at most once per plan. Nodes in `unfit`
    /// (not answering now) take part in no move.
    pub fn plan_moves(&self, busy: &BTreeSet<u32>, unfit: &BTreeSet<NodeId>, limit: usize) -> Vec<MapChange> {
        let target = self.target_replicas();
        if self.replicas.iter().any(|r| r.len() < target) {
            return Vec::new();
        }
        let mut load = self.eligible_load(unfit);
        let mut replicas = self.replicas.clone();
        let mut planned = Vec::new();
        let mut moved: BTreeSet<u32> = busy.clone();
        while planned.len() < limit {
            // Nodes by load, most loaded first (ties: lowest id first).
            let mut by_load: Vec<(NodeId, usize)> = load.iter().map(|(n, l)| (*n, *l)).collect();
            by_load.sort_by_key(|&(n, l)| (std::cmp::Reverse(l), n));
            let Some(&(_, max)) = by_load.first() else { break };
            let Some(min) = by_load.iter().map(|&(_, l)| l).min() else { break };
            if max <= min + 1 {
                break;
            }
            // The most loaded source that has a movable shard, to the least
            // loaded node that can take it.
            let mut choice = None;
            'sources: for &(from, from_load) in by_load.iter().filter(|&&(_, l)| l == max) {
                let mut targets: Vec<(NodeId, usize)> =
                    by_load.iter().copied().filter(|&(_, l)| l + 1 < from_load).collect();
                targets.sort_by_key(|&(n, l)| (l, n));
                for (to, _) in targets {
                    let shard = (0..self.shards).find(|s| {
                        let r = &replicas[*s as usize];
                        !moved.contains(s) && r.contains(&from) && !r.contains(&to)
                    });
                    if let Some(shard) = shard {
                        choice = Some((shard, from, to));
                        break 'sources;
                    }
                }
            }
            let Some((shard, from, to)) = choice else { break };
            let r = &mut replicas[shard as usize];
            if let Some(slot) = r.iter_mut().find(|n| **n == from) {
                *slot = to;
            }
            *load.get_mut(&from).expect("a node of the map") -= 1;
            *load.get_mut(&to).expect("a node of the map") += 1;
            moved.insert(shard);
            planned.push(MapChange::MoveReplica { shard, from, to });
        }
        planned
    }
}

/// A shard's leader and voters, as its leader reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub leader: NodeId,
    pub voters: Vec<NodeId>,
}

/// A leadership transfer: `shard`'s leadership goes from `from` to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderTransfer {
    pub shard: u32,
    pub from: NodeId,
    pub to: NodeId,
}

/// Leadership transfers, at most `limit`, that bring the shards' leaders
/// per node of `nodes` (those that may lead: not draining) within one of
/// each other, as far as each shard's voters allow. A leadership held
/// outside `nodes` goes first, to the shard's voter in `nodes` that leads
/// the fewest. Then, one at a time, the pair (leader, voter of a shard it
/// leads) with the largest difference in leaderships, at least two, moves
/// one (ties: lowest shard, then lowest target id). Each transfer lowers
/// the sum of squared counts, so planning again on the result converges.
/// Pure: the same inputs give the same plan.
pub fn plan_leader_transfers(
    leaders: &BTreeMap<u32, Leadership>,
    nodes: &BTreeSet<NodeId>,
    limit: usize,
) -> Vec<LeaderTransfer> {
    let mut count: BTreeMap<NodeId, usize> = nodes.iter().map(|&n| (n, 0)).collect();
    let mut led: BTreeMap<u32, NodeId> = BTreeMap::new();
    for (&shard, l) in leaders {
        led.insert(shard, l.leader);
        if let Some(c) = count.get_mut(&l.leader) {
            *c += 1;
        }
    }
    let fewest = |count: &BTreeMap<NodeId, usize>, voters: &[NodeId], except: NodeId| {
        voters.iter().filter(|v| **v != except).filter_map(|v| count.get(v).map(|c| (*c, *v))).min()
    };
    let mut planned: Vec<LeaderTransfer> = Vec::new();
    let mut moved: BTreeSet<u32> = BTreeSet::new();
    while planned.len() < limit {
        let mut best: Option<(usize, u32, NodeId)> = None; // (gain, shard, to)
        for (&shard, l) in leaders.iter().filter(|(s, _)| !moved.contains(s)) {
            let from = led[&shard];
            let Some((to_count, to)) = fewest(&count, &l.voters, from) else { continue };
            let gain = match count.get(&from) {
                None => usize::MAX, // led from outside `nodes`: always moves
                Some(&c) if c >= to_count + 2 => c - to_count,
                Some(_) => continue,
            };
            if best.is_none_or(|(g, _, _)| gain > g) {
                best = Some((gain, shard, to));
            }
        }
        let Some((_, shard, to)) = best else { break };
        let from = led[&shard];
        if let Some(c) = count.get_mut(&from) {
            *c -= 1;
        }
        *count.get_mut(&to).expect("a node of `nodes`") += 1;
        led.insert(shard, to);
        moved.insert(shard);
        planned.push(LeaderTransfer { shard, from, to });
    }
    planned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn led(pairs: &[(u32, NodeId, &[NodeId])]) -> BTreeMap<u32, Leadership> {
        pairs.iter().map(|&(s, leader, voters)| (s, Leadership { leader, voters: voters.to_vec() })).collect()
    }

    fn counts(leaders: &BTreeMap<u32, Leadership>, plan: &[LeaderTransfer]) -> BTreeMap<NodeId, usize> {
        let mut leaders = leaders.clone();
        for t in plan {
            let l = leaders.get_mut(&t.shard).unwrap();
            assert_eq!(l.leader, t.from, "{t:?} starts at the shard's leader");
            assert!(l.voters.contains(&t.to), "{t:?} goes to a voter");
            l.leader = t.to;
        }
        let mut count = BTreeMap::new();
        for l in leaders.values() {
            *count.entry(l.leader).or_insert(0) += 1;
        }
        count
    }

    #[test]
    fn leaderships_spread_within_one_over_the_voters() {
        // Six shards on three nodes, all led by node 1.
        let all: &[NodeId] = &[1, 2, 3];
        let leaders = led(&[(0, 1, all), (1, 1, all), (2, 1, all), (3, 1, all), (4, 1, all), (5, 1, all)]);
        let nodes = BTreeSet::from([1, 2, 3]);
        let plan = plan_leader_transfers(&leaders, &nodes, 100);
        assert_eq!(plan.len(), 4, "{plan:?}");
        assert_eq!(plan[0], LeaderTransfer { shard: 0, from: 1, to: 2 });
        assert_eq!(counts(&leaders, &plan), BTreeMap::from([(1, 2), (2, 2), (3, 2)]));
        assert_eq!(plan_leader_transfers(&leaders, &nodes, 100), plan, "the same plan every time");
        assert_eq!(plan_leader_transfers(&leaders, &nodes, 1), plan[..1], "the limit holds");

        // Balanced within one: nothing to do.
        let leaders = led(&[(0, 1, all), (1, 1, all), (2, 2, all), (3, 3, all)]);
        assert!(plan_leader_transfers(&leaders, &nodes, 100).is_empty());

        // Voters constrain: shards 0-3 on {1, 2} only, node 3 leads what it
        // can (shard 4, 5 are its own); 1 and 2 end within one.
        let leaders = led(&[
            (0, 1, &[1, 2]),
            (1, 1, &[1, 2]),
            (2, 1, &[1, 2]),
            (3, 1, &[1, 2]),
            (4, 3, &[3]),
            (5, 3, &[3]),
        ]);
        let plan = plan_leader_transfers(&leaders, &nodes, 100);
        assert_eq!(counts(&leaders, &plan), BTreeMap::from([(1, 2), (2, 2), (3, 2)]));
        assert!(plan.iter().all(|t| t.to == 2), "{plan:?}");
    }

    #[test]
    fn leaderships_leave_nodes_that_may_not_lead() {
        // Node 3 drains: its leaderships go first, to the fewest-leading
        // voter, even when counts are even.
        let all: &[NodeId] = &[1, 2, 3];
        let leaders = led(&[(0, 1, all), (1, 2, all), (2, 3, all), (3, 3, &[3])]);
        let nodes = BTreeSet::from([1, 2]);
        let plan = plan_leader_transfers(&leaders, &nodes, 100);
        assert_eq!(plan, vec![LeaderTransfer { shard: 2, from: 3, to: 1 }], "shard 3 has no other voter");
        // A shard nobody leads (no leader reported) is simply absent.
        assert!(plan_leader_transfers(&BTreeMap::new(), &nodes, 100).is_empty());
    }

    #[test]
    fn the_shard_hash_is_xxh3_and_stable() {
        // Reference values of XXH3-64 (seed 0): any client must agree.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(shard_of("", 64), (0x2d06_8005_38d3_94c2u64 % 64) as u32);
        assert_eq!(shard_of("u1", 1), 0);
        for s in [1, 2, 16, 64, MAX_SHARDS] {
            assert!(shard_of("user-42", s) < s);
        }
    }

    #[test]
    fn users_spread_evenly_and_independently_of_the_apply_split() {
        // 64,000 users over 64 shards: every shard within 15 % of 1,000.
        let mut per_shard = vec![0u32; 64];
        // ... and inside one shard, FNV-1a mod 2 (the apply threads) still
        // splits its users about in half.
        let mut threads = [0u32; 2];
        for u in 0..64_000 {
            let user = format!("user-{u}");
            let s = shard_of(&user, 64);
            per_shard[s as usize] += 1;
            if s == 7 {
                let fnv = user
                    .bytes()
                    .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
                threads[(fnv % 2) as usize] += 1;
            }
        }
        assert!(per_shard.iter().all(|&n| (850..=1150).contains(&n)), "{per_shard:?}");
        let shard7 = threads[0] + threads[1];
        assert!(threads.iter().all(|&t| t * 10 >= shard7 * 4), "{threads:?}");
    }

    #[test]
    fn layouts_outside_the_limits_are_refused() {
        assert!(check_layout(64, 3).is_ok());
        assert_eq!(check_layout(0, 3).unwrap_err(), "shards: 0 is outside 1..=4096");
        assert!(check_layout(MAX_SHARDS + 1, 3).is_err());
        assert_eq!(check_layout(16, 0).unwrap_err(), "replication: 0 is outside 1..=7");
        assert!(ShardMap::create(0, 3, 1, "http://a", "http://a:8700").is_err());
    }

    fn join(map: &mut ShardMap, node: NodeId) {
        map.apply(&MapChange::AddNode {
            incarnation: 0,
            node,
            addr: format!("http://n{node}"),
            peer_addr: format!("http://n{node}:8700"),
        })
        .unwrap();
    }

    fn place_all(map: &mut ShardMap) {
        loop {
            let plan = map.plan_additions(&BTreeSet::new(), 5);
            if plan.is_empty() {
                return;
            }
            plan.iter().for_each(|c| map.apply(c).unwrap());
        }
    }

    #[test]
    fn a_single_node_cluster_reaches_rf_3_as_two_nodes_join() {
        let mut map = ShardMap::create(16, 3, 1, "http://n1", "http://n1:8700").unwrap();
        assert_eq!(map.target_replicas(), 1);
        assert!(map.plan_additions(&BTreeSet::new(), 100).is_empty(), "one node: nothing to add");
        join(&mut map, 2);
        assert_eq!(map.plan_additions(&BTreeSet::new(), 100).len(), 16);
        join(&mut map, 3);
        place_all(&mut map);
        assert!(map.replicas.iter().all(|r| r.len() == 3 && r.iter().collect::<BTreeSet<_>>().len() == 3));
        assert_eq!(map.load().values().collect::<Vec<_>>(), [&16, &16, &16]);
        // A fourth node: RF is met, nothing is added; balancing moves.
        join(&mut map, 4);
        assert!(map.plan_additions(&BTreeSet::new(), 100).is_empty());
        assert!(!map.plan_moves(&BTreeSet::new(), &BTreeSet::new(), 100).is_empty());
    }

    /// A node that does not answer gets no new replica: one node, joined by
    /// nodes 2 and 3 with node 3 silent, brings its shards to two replicas
    /// (on nodes 1 and 2) and leaves the third for when node 3 answers.
    #[test]
    fn additions_skip_nodes_that_do_not_answer() {
        let mut map = ShardMap::create(8, 3, 1, "http://n1", "http://n1:8700").unwrap();
        join(&mut map, 2);
        join(&mut map, 3);
        let silent = BTreeSet::from([3]);
        loop {
            let plan = map.plan_additions(&silent, 5);
            if plan.is_empty() {
                break;
            }
            assert!(plan.iter().all(|c| matches!(c, MapChange::AddReplica { node: 2, .. })), "{plan:?}");
            plan.iter().for_each(|c| map.apply(c).unwrap());
        }
        assert!(map.replicas.iter().all(|r| r == &[1, 2]), "{:?}", map.replicas);
        // Once it answers, it gets its replicas.
        assert_eq!(map.plan_additions(&BTreeSet::new(), 100).len(), 8);
    }

    /// Applies every planned move, `limit` at a time; the number of plans.
    fn balance(map: &mut ShardMap, limit: usize) -> usize {
        let mut rounds = 0;
        loop {
            let plan = map.plan_moves(&BTreeSet::new(), &BTreeSet::new(), limit);
            if plan.is_empty() {
                return rounds;
            }
            assert!(plan.len() <= limit);
            plan.iter().for_each(|c| map.apply(c).unwrap());
            rounds += 1;
        }
    }

    #[test]
    fn scaling_3_to_5_nodes_moves_replicas_until_every_node_is_within_one() {
        let mut map = ShardMap::create(16, 3, 1, "http://n1", "http://n1:8700").unwrap();
        for n in 2..=3 {
            join(&mut map, n);
        }
        place_all(&mut map);
        assert!(
            map.plan_moves(&BTreeSet::new(), &BTreeSet::new(), 100).is_empty(),
            "3 nodes, RF 3: balanced"
        );
        for n in 4..=5 {
            join(&mut map, n);
        }
        let plan = map.plan_moves(&BTreeSet::new(), &BTreeSet::new(), 2);
        assert_eq!(plan.len(), 2);
        assert_eq!(plan, map.plan_moves(&BTreeSet::new(), &BTreeSet::new(), 2), "a pure function of the map");
        assert!(balance(&mut map, 2) > 1, "a few moves at a time");
        let load = map.load();
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(max - min <= 1, "{load:?}");
        assert_eq!(load.values().sum::<usize>(), 48, "no replica lost or added");
        for r in &map.replicas {
            assert_eq!(r.iter().collect::<BTreeSet<_>>().len(), 3, "distinct nodes: {r:?}");
        }
        // Moves fewer than needed: 48 / 5 = 9.6, so nodes 1-3 give up 6 or 7 each.
        assert!(load.values().all(|&l| l == 9 || l == 10), "{load:?}");
    }

    #[test]
    fn busy_shards_do_not_move_and_invalid_moves_change_nothing() {
        let mut map = ShardMap::create(4, 3, 1, "http://n1", "http://n1:8700").unwrap();
        for n in 2..=4 {
            join(&mut map, n);
        }
        place_all(&mut map);
        let all: BTreeSet<u32> = (0..4).collect();
        let load = map.load();
        if load.values().max().unwrap() - load.values().min().unwrap() > 1 {
            assert!(map.plan_moves(&all, &BTreeSet::new(), 10).is_empty(), "every shard busy");
        }
        let before = map.clone();
        let host = map.replicas[0][0];
        let other = map.replicas[0][1];
        let absent = (1..=4).find(|n| !map.replicas[0].contains(n)).unwrap();
        let e = map.apply(&MapChange::MoveReplica { shard: 0, from: absent, to: host }).unwrap_err();
        assert_eq!(e, format!("shard 0 already has a replica on node {host}"));
        let e = map.apply(&MapChange::MoveReplica { shard: 0, from: absent, to: 9 }).unwrap_err();
        assert_eq!(e, "node 9 is not in the cluster");
        let e = map.apply(&MapChange::MoveReplica { shard: 7, from: host, to: absent }).unwrap_err();
        assert_eq!(e, "shard 7 does not exist (the cluster has 4)");
        let mut also = map.clone();
        let e = also.apply(&MapChange::MoveReplica { shard: 0, from: absent, to: absent }).unwrap_err();
        assert_eq!(e, format!("shard 0 has no replica on node {absent}"));
        assert_eq!(map, before);
        map.apply(&MapChange::MoveReplica { shard: 0, from: other, to: absent }).unwrap();
        assert_eq!(map.replicas[0][1], absent, "the new node takes the old one's place");
        assert_eq!(map.epoch, before.epoch + 1);
    }

    #[test]
    fn new_replicas_go_to_the_least_loaded_nodes_a_few_at_a_time() {
        let mut map = ShardMap::create(64, 3, 1, "http://n1", "http://n1:8700").unwrap();
        for n in 2..=5 {
            join(&mut map, n);
        }
        let epoch = map.epoch;
        let first = map.plan_additions(&BTreeSet::new(), 4);
        assert_eq!(first.len(), 4);
        // Planning is a pure function of the map: the same plan every time.
        assert_eq!(first, map.plan_additions(&BTreeSet::new(), 4));
        assert_eq!(map.epoch, epoch, "planning changes nothing");
        place_all(&mut map);
        let load = map.load();
        // 192 replicas over 5 nodes; node 1 has all 64, the rest share 128.
        assert_eq!(load[&1], 64);
        assert!(load.values().skip(1).all(|&l| l == 32), "{load:?}");
    }

    #[test]
    fn invalid_changes_are_refused_and_change_nothing() {
        let mut map = ShardMap::create(4, 3, 1, "http://n1", "http://n1:8700").unwrap();
        let before = map.clone();
        let e = map.apply(&MapChange::AddReplica { shard: 9, node: 1 }).unwrap_err();
        assert_eq!(e, "shard 9 does not exist (the cluster has 4)");
        let e = map.apply(&MapChange::AddReplica { shard: 0, node: 2 }).unwrap_err();
        assert_eq!(e, "node 2 is not in the cluster");
        let e = map.apply(&MapChange::AddReplica { shard: 0, node: 1 }).unwrap_err();
        assert_eq!(e, "shard 0 already has a replica on node 1");
        assert!(map
            .apply(&MapChange::AddNode {
                node: 2,
                addr: String::new(),
                peer_addr: "p".into(),
                incarnation: 0
            })
            .is_err());
        assert!(map
            .apply(&MapChange::AddNode {
                node: 2,
                addr: "a".into(),
                peer_addr: String::new(),
                incarnation: 0
            })
            .is_err());
        assert_eq!(map, before);
        assert_eq!(map.hosted_by(1), [0, 1, 2, 3]);
        assert_eq!(map.shard_of("u1"), shard_of("u1", 4));
    }

    /// Applies every planned drain step.
    fn drain_all(map: &mut ShardMap) {
        loop {
            let plan = map.plan_drain(&BTreeSet::new(), &BTreeSet::new(), 3);
            if plan.is_empty() {
                return;
            }
            plan.iter().for_each(|c| map.apply(c).unwrap());
        }
    }

    #[test]
    fn a_drained_node_gives_its_replicas_away_and_only_then_can_be_removed() {
        let mut map = ShardMap::create(8, 3, 1, "http://n1", "http://n1:8700").unwrap();
        let e = map.apply(&MapChange::Drain { node: 1 }).unwrap_err();
        assert_eq!(e, "node 1 is the last node that can hold replicas; add a node before draining it");
        for n in 2..=4 {
            join(&mut map, n);
        }
        place_all(&mut map);
        balance(&mut map, 2);
        let before: usize = map.load().values().sum();
        let e = map.apply(&MapChange::RemoveNode { node: 2 }).unwrap_err();
        assert!(e.starts_with("node 2 still holds replicas of 6 shards"), "{e}");
        assert!(e.contains("drain it first (cluster drain 2)"), "{e}");

        map.apply(&MapChange::Drain { node: 2 }).unwrap();
        assert_eq!(map.apply(&MapChange::Drain { node: 2 }).unwrap_err(), "node 2 is already draining");
        let e = map.apply(&MapChange::Drain { node: 3 }).unwrap_err();
        assert!(e.starts_with("node 2 is still draining (6 replicas left)"), "{e}");
        // A move or addition planned before the drain committed is refused.
        let off = (0..8).find(|s| !map.replicas[*s as usize].contains(&2)).unwrap();
        let from = map.replicas[off as usize][0];
        let e = map.apply(&MapChange::MoveReplica { shard: off, from, to: 2 }).unwrap_err();
        assert_eq!(e, "node 2 is draining: no replica is placed on it");
        let e = map.apply(&MapChange::AddReplica { shard: off, node: 2 }).unwrap_err();
        assert_eq!(e, "node 2 is draining: no replica is placed on it");
        assert!(map.plan_additions(&BTreeSet::new(), 10).is_empty(), "no additions: every shard has RF");
        assert!(map.plan_drain(&(0..8).collect(), &BTreeSet::new(), 10).is_empty(), "busy shards wait");
        // A node not answering takes none of the drained replicas (its new
        // replica would never catch up, and the move would hold a slot for
        // good), nor any balancing move.
        let quiet = BTreeSet::from([3]);
        let plan = map.plan_drain(&BTreeSet::new(), &quiet, 100);
        assert!(!plan.is_empty());
        assert!(plan.iter().all(|c| matches!(c, MapChange::MoveReplica { to, .. } if *to != 3)), "{plan:?}");
        let mut unbalanced = map.clone();
        unbalanced.draining.clear();
        let least = *unbalanced.load().iter().min_by_key(|(n, l)| (**l, **n)).unwrap().0;
        for shard in unbalanced.hosted_by(least).into_iter().take(2) {
            let from = least;
            if let Some(to) =
                unbalanced.nodes.keys().copied().find(|n| !unbalanced.replicas[shard as usize].contains(n))
            {
                unbalanced.apply(&MapChange::MoveReplica { shard, from, to }).unwrap();
            }
        }
        let moves = unbalanced.plan_moves(&BTreeSet::new(), &BTreeSet::new(), 100);
        assert!(
            moves.iter().any(|c| matches!(c, MapChange::MoveReplica { to, .. } if *to == least)),
            "{moves:?}"
        );
        let moves = unbalanced.plan_moves(&BTreeSet::new(), &BTreeSet::from([least]), 100);
        assert!(
            moves.iter().all(
                |c| !matches!(c, MapChange::MoveReplica { from, to, .. } if *to == least || *from == least)
            ),
            "{moves:?}"
        );
        drain_all(&mut map);
        assert!(map.hosted_by(2).is_empty());
        assert_eq!(map.load().values().sum::<usize>(), before, "every shard keeps RF 3");
        assert!(
            map.plan_moves(&BTreeSet::new(), &BTreeSet::new(), 10).is_empty(),
            "the other three hold 8 each"
        );
        map.apply(&MapChange::RemoveNode { node: 2 }).unwrap();
        assert!(!map.nodes.contains_key(&2) && !map.draining.contains(&2));
        assert_eq!(
            map.apply(&MapChange::RemoveNode { node: 2 }).unwrap_err(),
            "node 2 is not in the cluster"
        );

        // Three nodes, RF 3: a drained node's replicas have nowhere to go;
        // the shards keep the other two (RF is min(3, nodes not draining)).
        map.apply(&MapChange::Drain { node: 3 }).unwrap();
        assert_eq!(map.target_replicas(), 2);
        let plan = map.plan_drain(&BTreeSet::new(), &BTreeSet::new(), 100);
        assert!(plan.iter().all(|c| matches!(c, MapChange::RemoveReplica { node: 3, .. })), "{plan:?}");
        drain_all(&mut map);
        assert!(map.hosted_by(3).is_empty() && map.replicas.iter().all(|r| r.len() == 2));
        let e = map.apply(&MapChange::RemoveReplica { shard: 0, node: 1 }).unwrap_err();
        assert_eq!(e, "shard 0 would have fewer than its 2 replicas without node 1");
        // Node 3 holds nothing: another drain may start; node 1 is then
        // the last node that can hold replicas.
        map.apply(&MapChange::Drain { node: 4 }).unwrap();
        drain_all(&mut map);
        assert!(map.replicas.iter().all(|r| r == &[1]), "{:?}", map.replicas);
        let e = map.apply(&MapChange::Drain { node: 1 }).unwrap_err();
        assert_eq!(e, "node 1 is the last node that can hold replicas; add a node before draining it");
    }

    /// Four nodes, RF 3, node 4 dead, node 3 drained: the shards on
    /// {1, 2, 3} could move node 3's replica only to node 4, so the drain
    /// waits; a second `Drain` is refused while it does. `DrainDead` of node
    /// 4 is not: both drain, and every shard ends on nodes 1 and 2.
    #[test]
    fn a_dead_node_is_drained_beside_a_drain_that_has_nowhere_else_to_go() {
        let mut map = ShardMap::create(8, 3, 1, "http://n1", "http://n1:8700").unwrap();
        for n in 2..=4 {
            join(&mut map, n);
        }
        place_all(&mut map);
        balance(&mut map, 2);
        let dead = BTreeSet::from([4]);
        map.apply(&MapChange::Drain { node: 3 }).unwrap();
        let step = |map: &mut ShardMap| {
            let plan = map.plan_drain(&BTreeSet::new(), &dead, 3);
            plan.iter().for_each(|c| map.apply(c).unwrap());
            !plan.is_empty()
        };
        while step(&mut map) {}
        let stuck = map.hosted_by(3);
        assert!(!stuck.is_empty(), "some shards of node 3 have only node 4 to go to");
        assert!(stuck.iter().all(|&s| map.replicas[s as usize].len() == 3), "{:?}", map.replicas);
        let e = map.apply(&MapChange::Drain { node: 4 }).unwrap_err();
        assert!(e.starts_with("node 3 is still draining"), "{e}");

        map.apply(&MapChange::DrainDead { node: 4 }).unwrap();
        assert_eq!(map.target_replicas(), 2);
        while step(&mut map) {}
        assert!(map.hosted_by(3).is_empty() && map.hosted_by(4).is_empty(), "{:?}", map.replicas);
        assert!(map.replicas.iter().all(|r| r.len() == 2 && !r.contains(&3) && !r.contains(&4)));
        assert_eq!(map.apply(&MapChange::DrainDead { node: 4 }).unwrap_err(), "node 4 is already draining");
        // Like a drain, never of the last node that can hold replicas.
        map.apply(&MapChange::Drain { node: 2 }).unwrap();
        let e = map.apply(&MapChange::DrainDead { node: 1 }).unwrap_err();
        assert_eq!(e, "node 1 is the last node that can hold replicas; add a node before draining it");
    }

    #[test]
    fn the_last_node_that_can_hold_replicas_is_never_removed_and_a_shard_keeps_one_replica() {
        // RF 1 on {1, 2}: node 2 holds nothing yet when node 1 starts
        // draining. Removing node 2 would leave no node to drain to, and
        // the drain would then empty every shard.
        let mut map = ShardMap::create(4, 1, 1, "http://n1", "http://n1:8700").unwrap();
        join(&mut map, 2);
        map.apply(&MapChange::Drain { node: 1 }).unwrap();
        let e = map.apply(&MapChange::RemoveNode { node: 2 }).unwrap_err();
        assert_eq!(e, "node 2 is the last node that can hold replicas; add a node before removing it");
        assert!(map.nodes.contains_key(&2));
        // Even were the target 0, no change takes a shard's last replica.
        map.draining.insert(2);
        assert_eq!(map.target_replicas(), 0);
        assert!(map
            .plan_drain(&BTreeSet::new(), &BTreeSet::new(), 10)
            .iter()
            .all(|c| map.clone().apply(c).is_err()));
        let e = map.apply(&MapChange::RemoveReplica { shard: 0, node: 1 }).unwrap_err();
        assert_eq!(e, "shard 0 would have fewer than its 1 replicas without node 1");
        assert!(map.replicas.iter().all(|r| r == &[1]), "{:?}", map.replicas);

        // With another node left to take replicas, an empty node goes,
        // draining or not.
        let mut map = ShardMap::create(4, 1, 1, "http://n1", "http://n1:8700").unwrap();
        join(&mut map, 2);
        join(&mut map, 3);
        map.apply(&MapChange::Drain { node: 2 }).unwrap();
        map.apply(&MapChange::RemoveNode { node: 2 }).unwrap();
        map.apply(&MapChange::RemoveNode { node: 3 }).unwrap();
        assert_eq!(map.nodes.keys().copied().collect::<Vec<_>>(), [1]);
    }
}
