//! The meta group's state and how its commands change it: the cluster's
//! shard map (nodes, and the replicas each shard should have) and its
//! schema versions. The server replicates these commands through the meta
//! raft group and applies them with [`MetaState::apply`] on every member,
//! so this is deterministic: no clock, no I/O, ordered maps only. A refused
//! command changes nothing and says why, the same way on every replica.
//!
//! Shards learn a new schema from here: each shard leader proposes it in
//! its own log, so every replica of a shard applies it at the same index
//! (docs/shards.md).

use serde::{Deserialize, Serialize};

use std::collections::BTreeSet;

use crate::shard::{MapChange, NodeId, ShardMap};

/// A schema the meta group committed, with its version (1, 2, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaVersion {
    pub version: u64,
    /// The TOML text as applied (validated when it was committed).
    pub toml: String,
}

/// What the meta group holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// `None` until the cluster is created.
    pub map: Option<ShardMap>,
    /// The newest schema; `None`: the built-in default, version 0.
    pub schema: Option<SchemaVersion>,
    /// The cluster's apply rules version (see [`crate::rules`]; 0 before
    /// the cluster is created).
    pub rules: u32,
    /// Ids of removed nodes (from apply rules version
    /// [`crate::rules::RETIRED_IDS`]): never added again, so a removal is
    /// not undone by the removed node's own join loop, nor by an AddNode
    /// that was under way. The last field: builds before version 6 stored
    /// the state without it (the server decodes both).
    pub retired: BTreeSet<NodeId>,
}

/// A command of the meta group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Creates the cluster: `shards` shards, aiming for `replication`
    /// replicas each, all on the first node (whose data dir is
    /// `incarnation`, see [`crate::shard::NodeEntry::incarnation`]),
    /// applying by apply rules version `rules` (its build's newest).
    Create {
        shards: u32,
        replication: u32,
        node: NodeId,
        addr: String,
        peer_addr: String,
        incarnation: u64,
        rules: u32,
    },
    /// A change of the shard map.
    Map(MapChange),
    /// A new schema (its TOML text); its version is the next one.
    SetSchema { toml: String },
    /// Raises the cluster's apply rules version (see [`crate::rules`]);
    /// refused unless above the current one, and unless the map is still
    /// at `epoch`, the one whose nodes' builds were checked before it was
    /// proposed (a node added since was not asked). The builds are never
    /// checked here (see `SetSchema`).
    SetRules { version: u32, epoch: u64 },
    /// Retires `node`'s id (a removal under way): the map refuses to add
    /// it from then on. Proposed by `RemoveNode` before the node leaves
    /// the meta group, only from apply rules version
    /// [`crate::rules::RETIRED_IDS`] (builds before it cannot decode this
    /// command); refused below that version. Retiring an id twice is a
    /// no-op; a retired node still in the map works on until the removal
    /// finishes.
    Retire { node: NodeId },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOutcome {
    /// Applied: the map's epoch and the schema version afterwards.
    Applied { epoch: u64, schema_version: u64 },
    /// Refused (nothing changed), with the reason for the caller.
    Refused { reason: String },
}

impl MetaState {
    /// The cluster's apply rules version: [`crate::rules::FIRST`] until it
    /// records one.
    pub fn rules(&self) -> u32 {
        self.rules.max(crate::rules::FIRST)
    }

    /// The current schema version (0: the built-in default).
    pub fn schema_version(&self) -> u64 {
        self.schema.as_ref().map_or(0, |s| s.version)
    }

    /// Applies one command. Deterministic; a refused command changes
    /// nothing.
    pub fn apply(&mut self, command: &MetaCommand) -> MetaOutcome {
        match self.try_apply(command) {
            Ok(()) => MetaOutcome::Applied {
                epoch: self.map.as_ref().map_or(0, |m| m.epoch),
                schema_version: self.schema_version(),
            },
            Err(reason) => MetaOutcome::Refused { reason },
        }
    }

    fn try_apply(&mut self, command: &MetaCommand) -> Result<(), String> {
        match command {
            MetaCommand::Create { shards, replication, node, addr, peer_addr, incarnation, rules } => {
                if let Some(map) = &self.map {
                    let nodes: Vec<_> = map.nodes.keys().collect();
                    return Err(format!(
                        "the cluster exists already: {} shards on nodes {nodes:?}",
                        map.shards
                    ));
                }
                let mut map = ShardMap::create(*shards, *replication, *node, addr, peer_addr)?;
                map.nodes.entry(*node).and_modify(|n| n.incarnation = *incarnation);
                map.cluster = *incarnation;
                self.map = Some(map);
                self.rules = (*rules).max(crate::rules::FIRST);
            }
            MetaCommand::Map(change) => {
                let map = self.map.as_mut().ok_or("the cluster has not been created")?;
                if let MapChange::AddNode { node, .. } = change {
                    if self.retired.contains(node) {
                        return Err(retired(*node));
                    }
                }
                // Applied to a copy: a refusal leaves the map as it was.
                let mut next = map.clone();
                next.apply(change)?;
                *map = next;
            }
            // Validated before it is proposed, never here: a binary with a
            // stricter check (a rolling upgrade, a log replayed by a newer
            // build) would refuse what the others applied, and diverge.
            MetaCommand::SetSchema { toml } => {
                let version = self.schema_version() + 1;
                self.schema = Some(SchemaVersion { version, toml: toml.clone() });
            }
            MetaCommand::SetRules { version, epoch } => {
                let map = self.map.as_ref().ok_or("the cluster has not been created")?;
                if map.epoch != *epoch {
                    return Err(format!(
                        "the map changed since the nodes' builds were checked (epoch {epoch}, now {})",
                        map.epoch
                    ));
                }
                if *version <= self.rules() {
                    return Err(format!(
                        "the cluster applies rules version {} already (asked for {version})",
                        self.rules()
                    ));
                }
                self.rules = *version;
            }
            MetaCommand::Retire { node } => {
                self.map.as_ref().ok_or("the cluster has not been created")?;
                if self.rules() < crate::rules::RETIRED_IDS {
                    return Err(format!(
                        "retiring a node id needs apply rules version {} (the cluster applies {})",
                        crate::rules::RETIRED_IDS,
                        self.rules()
                    ));
                }
                self.retired.insert(*node);
            }
        }
        Ok(())
    }
}

/// Why node `node` is not added: its id was retired by a removal.
pub fn retired(node: NodeId) -> String {
    format!(
        "node {node} was removed from the cluster, and {RETIRED_ID}: start the machine on an empty data \
         dir and add it under a new id"
    )
}

/// What every refusal of a retired id says (a joining node stops asking).
pub const RETIRED_ID: &str = "a removed id is never used again";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::DEFAULT_SCHEMA_TOML;

    fn create() -> MetaCommand {
        MetaCommand::Create {
            shards: 8,
            replication: 3,
            node: 1,
            addr: "http://n1".into(),
            peer_addr: "http://n1:8700".into(),
            incarnation: 0x11,
            rules: 1,
        }
    }

    #[test]
    fn a_cluster_is_created_once_and_grows_by_map_changes() {
        let mut meta = MetaState::default();
        let add = MetaCommand::Map(MapChange::AddNode {
            node: 2,
            addr: "http://n2".into(),
            peer_addr: "http://n2:8700".into(),
            incarnation: 0x22,
        });
        assert_eq!(
            meta.apply(&add),
            MetaOutcome::Refused { reason: "the cluster has not been created".into() }
        );
        assert_eq!(meta.apply(&create()), MetaOutcome::Applied { epoch: 1, schema_version: 0 });
        let again = meta.apply(&create());
        assert_eq!(
            again,
            MetaOutcome::Refused { reason: "the cluster exists already: 8 shards on nodes [1]".into() }
        );
        assert_eq!(meta.apply(&add), MetaOutcome::Applied { epoch: 2, schema_version: 0 });
        let map = meta.map.as_ref().unwrap();
        assert_eq!((map.shards, map.nodes.len(), map.hosted_by(2).len()), (8, 2, 0));
        let incarnations: Vec<_> = map.nodes.values().map(|n| n.incarnation).collect();
        assert_eq!(incarnations, [0x11, 0x22]);
    }

    #[test]
    fn a_node_keeps_its_data_dir_incarnation() {
        let mut meta = MetaState::default();
        meta.apply(&create());
        let add = |incarnation| {
            MetaCommand::Map(MapChange::AddNode {
                node: 2,
                addr: "http://n2".into(),
                peer_addr: "http://n2:8700".into(),
                incarnation,
            })
        };
        assert_eq!(meta.apply(&add(0)), MetaOutcome::Applied { epoch: 2, schema_version: 0 });
        // Learned later; an unknown one (0) does not forget it.
        assert_eq!(meta.apply(&add(0x22)), MetaOutcome::Applied { epoch: 3, schema_version: 0 });
        assert_eq!(meta.apply(&add(0)), MetaOutcome::Applied { epoch: 4, schema_version: 0 });
        let before = meta.clone();
        assert_eq!(
            meta.apply(&add(0x33)),
            MetaOutcome::Refused {
                reason: "node 2 is in the cluster on another data dir (incarnation 22, not 33)".into()
            }
        );
        assert_eq!(meta, before);
        assert_eq!(meta.map.unwrap().nodes[&2].incarnation, 0x22);
    }

    #[test]
    fn a_refused_change_leaves_the_state_as_it_was() {
        let mut meta = MetaState::default();
        meta.apply(&create());
        let before = meta.clone();
        let bad = MetaCommand::Map(MapChange::AddReplica { shard: 3, node: 9 });
        assert_eq!(meta.apply(&bad), MetaOutcome::Refused { reason: "node 9 is not in the cluster".into() });
        assert_eq!(meta, before);
    }

    #[test]
    fn schemas_are_numbered_in_order_and_not_validated_at_apply() {
        let mut meta = MetaState::default();
        meta.apply(&create());
        let set = MetaCommand::SetSchema { toml: DEFAULT_SCHEMA_TOML.to_string() };
        assert_eq!(meta.apply(&set), MetaOutcome::Applied { epoch: 1, schema_version: 1 });
        assert_eq!(meta.apply(&set), MetaOutcome::Applied { epoch: 1, schema_version: 2 });
        assert_eq!(meta.schema.as_ref().map(|s| s.version), Some(2));
        // Whatever was proposed applies alike on every build: validating
        // is the proposer's (Admin.ApplySchema checks before proposing).
        let unchecked = MetaCommand::SetSchema { toml: "families = 3".into() };
        assert_eq!(meta.apply(&unchecked), MetaOutcome::Applied { epoch: 1, schema_version: 3 });
    }

    #[test]
    fn the_rules_version_starts_at_the_creating_build_and_only_rises() {
        let mut meta = MetaState::default();
        assert_eq!(meta.rules(), 1);
        let early = meta.apply(&MetaCommand::SetRules { version: 2, epoch: 1 });
        assert_eq!(early, MetaOutcome::Refused { reason: "the cluster has not been created".into() });
        let MetaCommand::Create { shards, replication, node, addr, peer_addr, incarnation, .. } = create()
        else {
            unreachable!()
        };
        let create =
            MetaCommand::Create { shards, replication, node, addr, peer_addr, incarnation, rules: 2 };
        meta.apply(&create);
        assert_eq!(meta.rules(), 2);
        let before = meta.clone();
        assert_eq!(
            meta.apply(&MetaCommand::SetRules { version: 2, epoch: 1 }),
            MetaOutcome::Refused {
                reason: "the cluster applies rules version 2 already (asked for 2)".into()
            }
        );
        assert!(matches!(
            meta.apply(&MetaCommand::SetRules { version: 1, epoch: 1 }),
            MetaOutcome::Refused { .. }
        ));
        assert_eq!(
            meta.apply(&MetaCommand::SetRules { version: 3, epoch: 7 }),
            MetaOutcome::Refused {
                reason: "the map changed since the nodes' builds were checked (epoch 7, now 1)".into()
            }
        );
        assert_eq!(meta, before);
        assert!(matches!(
            meta.apply(&MetaCommand::SetRules { version: 3, epoch: 1 }),
            MetaOutcome::Applied { .. }
        ));
        assert_eq!(meta.rules(), 3);
    }

    #[test]
    fn a_retired_id_is_never_added_again_and_retiring_needs_rules_version_6() {
        let add = |node| {
            MetaCommand::Map(MapChange::AddNode {
                node,
                addr: format!("http://n{node}"),
                peer_addr: format!("http://n{node}:8700"),
                incarnation: 0,
            })
        };
        let mut meta = MetaState::default();
        let early = meta.apply(&MetaCommand::Retire { node: 2 });
        assert_eq!(early, MetaOutcome::Refused { reason: "the cluster has not been created".into() });
        meta.apply(&create());
        // A cluster on version 5 (not every node has a build with 6):
        // nothing is retired, so builds without the command agree.
        meta.rules = crate::rules::RETIRED_IDS - 1;
        let before = meta.clone();
        assert_eq!(
            meta.apply(&MetaCommand::Retire { node: 2 }),
            MetaOutcome::Refused {
                reason: "retiring a node id needs apply rules version 6 (the cluster applies 5)".into()
            }
        );
        assert_eq!(meta, before);
        meta.rules = crate::rules::RETIRED_IDS;
        assert_eq!(meta.apply(&add(2)), MetaOutcome::Applied { epoch: 2, schema_version: 0 });
        // Node 3 retired half-way through its join (never in the map),
        // node 2 while in it: neither is added again; the map is unchanged
        // by the retirement itself (the epoch does not move).
        for node in [3, 2, 3] {
            assert_eq!(
                meta.apply(&MetaCommand::Retire { node }),
                MetaOutcome::Applied { epoch: 2, schema_version: 0 }
            );
        }
        assert_eq!(meta.retired, BTreeSet::from([2, 3]));
        assert!(meta.map.as_ref().unwrap().nodes.contains_key(&2), "it works on until it is removed");
        let before = meta.clone();
        for node in [2, 3] {
            assert_eq!(meta.apply(&add(node)), MetaOutcome::Refused { reason: retired(node) });
        }
        assert_eq!(meta, before);
        assert!(retired(3).starts_with("node 3 was removed from the cluster, and a removed id is never used"));
        assert_eq!(
            meta.apply(&MetaCommand::Map(MapChange::RemoveNode { node: 2 })),
            MetaOutcome::Applied { epoch: 3, schema_version: 0 }
        );
        assert_eq!(meta.apply(&add(4)), MetaOutcome::Applied { epoch: 4, schema_version: 0 });
    }

    #[test]
    fn replicas_apply_the_same_commands_to_the_same_state() {
        // Two replicas applying one log end equal, refusals included.
        let log = [
            create(),
            MetaCommand::Map(MapChange::AddNode {
                node: 2,
                addr: "http://n2".into(),
                peer_addr: "http://n2:8700".into(),
                incarnation: 0,
            }),
            MetaCommand::Map(MapChange::AddReplica { shard: 0, node: 2 }),
            MetaCommand::Map(MapChange::AddReplica { shard: 0, node: 2 }),
            MetaCommand::SetSchema { toml: DEFAULT_SCHEMA_TOML.to_string() },
        ];
        let (mut a, mut b) = (MetaState::default(), MetaState::default());
        let outcomes_a: Vec<_> = log.iter().map(|c| a.apply(c)).collect();
        let outcomes_b: Vec<_> = log.iter().map(|c| b.apply(c)).collect();
        assert_eq!((a, outcomes_a.clone()), (b, outcomes_b));
        assert!(matches!(outcomes_a[3], MetaOutcome::Refused { .. }));
    }
}
