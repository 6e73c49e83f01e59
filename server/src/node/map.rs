//! The shard map as this node knows it: the nodes, and per shard its
//! replicas, its leader and this node's applied index. The types here are
//! plain data (no openraft), so the map can come from elsewhere without
//! touching the services: today it is read from the raft metrics of the
//! replicas in the registry; the meta group will provide it instead.

use std::collections::{BTreeMap, BTreeSet};

use portrait_core::shard::shard_of;

use super::{written_index, Node};
use crate::types::{GroupId, NodeId};

/// The cluster's layout as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMapView {
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
    /// The shard `user_id` belongs to, with its replicas and leader.
    pub fn locate(&self, user_id: &str) -> &ShardReplicas {
        &self.shard_replicas[shard_of(user_id, self.shards) as usize]
    }

    /// The address of `node` ("" if the map does not know it).
    pub fn addr(&self, node: NodeId) -> &str {
        self.nodes.get(&node).map_or("", String::as_str)
    }
}

impl Node {
    /// The shard map as this node knows it, read from its replicas' raft
    /// state: each shard's membership and the leader it knows.
    ///
    /// Today every node hosts every shard, so the replication factor is the
    /// number of nodes; the epoch is [`Node::map_epoch`].
    pub fn shard_map(&self) -> ShardMapView {
        let mut nodes = BTreeMap::new();
        let shard_replicas = (0..self.shards)
            .map(|k| {
                let Some(replica) = self.registry.get(GroupId(k)) else {
                    return ShardReplicas { shard: k, replicas: vec![], leader: None, applied_index: None };
                };
                let metrics = replica.raft.metrics();
                let m = metrics.borrow();
                let membership = m.membership_config.membership();
                let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
                let replicas = membership
                    .nodes()
                    .map(|(id, node)| {
                        nodes.entry(*id).or_insert_with(|| node.addr.clone());
                        ReplicaView { node: *id, voter: voters.contains(id) }
                    })
                    .collect();
                let applied_index = Some(written_index(&replica));
                ShardReplicas { shard: k, replicas, leader: m.current_leader, applied_index }
            })
            .collect();
        ShardMapView {
            epoch: self.map_epoch(),
            shards: self.shards,
            replication: nodes.len() as u32,
            nodes,
            shard_replicas,
        }
    }

    /// The epoch of the map this node knows; every client response carries
    /// it (`x-portrait-map-epoch`). 0 for now: the meta group will provide
    /// it, moving it on with every change of the map.
    pub fn map_epoch(&self) -> u64 {
        0
    }
}
