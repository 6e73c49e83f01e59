//! The shard map as this node knows it, for clients and operators: the
//! nodes, and per shard its replicas, its leader and this node's applied
//! index. Plain data (no openraft): the meta group's map, with what this
//! node's replicas add.

use std::collections::{BTreeMap, BTreeSet};

use portrait_core::shard::shard_of;

use super::{written_index, Node};
use crate::types::{GroupId, NodeId};

/// The cluster's layout as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMapView {
    /// The cluster's id (0 before the map exists).
    pub cluster: u64,
    /// The map's version, which grows with every change of nodes or
    /// replicas.
    pub epoch: u64,
    /// The number of shards (S).
    pub shards: u32,
    /// Replicas each shard aims for.
    pub replication: u32,
    /// Every node of the cluster and its address.
    pub nodes: BTreeMap<NodeId, String>,
    /// One per shard, in shard order.
    pub shard_replicas: Vec<ShardReplicas>,
    /// Nodes being drained.
    pub draining: Vec<NodeId>,
}

/// One shard's replicas and leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReplicas {
    pub shard: u32,
    pub replicas: Vec<ReplicaView>,
    /// `None` when no leader is known.
    pub leader: Option<NodeId>,
    /// This node's applied index in the shard's log, if it hosts a replica.
    pub applied_index: Option<u64>,
}

/// A replica of a shard: the node it is on and whether it votes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    pub node: NodeId,
    pub voter: bool,
}

impl ShardMapView {
    /// The shard `user_id` belongs to, with its replicas and leader;
    /// `None` before the node knows the cluster's map (it lists no shard
    /// then: the map is not created yet, or this node is still joining).
    pub fn locate(&self, user_id: &str) -> Option<&ShardReplicas> {
        self.shard_replicas.get(shard_of(user_id, self.shards) as usize)
    }

    /// The address of `node` ("" if the map does not know it).
    pub fn addr(&self, node: NodeId) -> &str {
        self.nodes.get(&node).map_or("", String::as_str)
    }
}

impl Node {
    /// The shard map as this node knows it: the meta group's map (nodes,
    /// each shard's replicas, epoch), with what this node's own replicas
    /// say (whether each replica votes yet, the leader, the applied index)
    /// and, for shards it hosts no replica of, the leader it last heard of.
    pub fn shard_map(&self) -> ShardMapView {
        let cluster = self.cluster();
        let Some(map) = cluster.map.as_ref() else {
            return ShardMapView {
                cluster: 0,
                epoch: 0,
                shards: self.shards,
                replication: 0,
                nodes: BTreeMap::new(),
                shard_replicas: vec![],
                draining: vec![],
            };
        };
        let heard = self.leaders.lock().expect("leaders lock").clone();
        let shard_replicas = (0..map.shards)
            .map(|k| {
                let placed = &map.replicas[k as usize];
                let Some(replica) = self.registry.get(GroupId(k)) else {
                    let replicas = placed.iter().map(|&node| ReplicaView { node, voter: true }).collect();
                    // Only a node known to lead (a follower that served a
                    // LOCAL read would send clients' writes a hop further).
                    let leader = heard.get(&GroupId(k)).filter(|h| h.leads).map(|h| h.node);
                    return ShardReplicas { shard: k, replicas, leader, applied_index: None };
                };
                let metrics = replica.raft.metrics();
                let m = metrics.borrow();
                let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
                let replicas =
                    placed.iter().map(|&node| ReplicaView { node, voter: voters.contains(&node) }).collect();
                let applied_index = Some(written_index(&replica));
                ShardReplicas { shard: k, replicas, leader: m.current_leader, applied_index }
            })
            .collect();
        ShardMapView {
            cluster: map.cluster,
            epoch: map.epoch,
            shards: map.shards,
            replication: map.replication,
            nodes: map.nodes.iter().map(|(id, n)| (*id, n.addr.clone())).collect(),
            shard_replicas,
            draining: map.draining.iter().copied().collect(),
        }
    }

    /// The client address of `node`, if the map has it.
    pub fn client_addr(&self, node: NodeId) -> Option<String> {
        self.cluster().map.as_ref()?.nodes.get(&node).map(|n| n.addr.clone())
    }

    /// The map's epoch and the id of the cluster it counts in (0 and 0
    /// before the node knows the map); every client response carries both
    /// (`x-portrait-map-epoch`, `x-portrait-cluster-id`).
    pub fn map_epoch_and_cluster(&self) -> (u64, u64) {
        self.cluster().map.as_ref().map_or((0, 0), |m| (m.epoch, m.cluster))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_names_the_users_shard_and_nothing_before_the_map_exists() {
        let mut map = ShardMapView {
            cluster: 0,
            epoch: 0,
            shards: 16,
            replication: 0,
            nodes: BTreeMap::new(),
            shard_replicas: vec![],
            draining: vec![],
        };
        assert_eq!(map.locate("u1"), None, "no map yet: no shard listed");
        map.shard_replicas = (0..16)
            .map(|shard| ShardReplicas { shard, replicas: vec![], leader: None, applied_index: None })
            .collect();
        assert_eq!(map.locate("u1").map(|s| s.shard), Some(shard_of("u1", 16)));
    }
}
