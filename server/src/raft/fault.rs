//! Fault injection's message filters (`Admin.SetPartition`), for tests.
//!
//! A [`Blocked`] is a set of peers: the raft network drops the messages it
//! would send to them, and a node drops the log entries arriving from them.
//! The sets can only be filled with the cargo feature `fault-injection`
//! (the cluster tests' `portraitd-faults` binary, the TiKV/`fail` habit).
//! Without it a `Blocked` holds nothing and [`Blocked::contains`] is a
//! constant `false`, so the release `portraitd` has no filter to turn on.

#[cfg(feature = "fault-injection")]
use std::collections::BTreeSet;
#[cfg(feature = "fault-injection")]
use std::sync::{Arc, RwLock};

use crate::types::NodeId;

/// Why `Admin.SetPartition` and `--fault-injection` are refused by a build
/// without the feature.
#[cfg(not(feature = "fault-injection"))]
pub const NO_FAULT_INJECTION: &str = "this build has no fault injection: it is compiled only with the cargo \
     feature `fault-injection`, into the cluster tests' `portraitd-faults`";

/// Peers whose raft messages are dropped (shared by clones).
#[derive(Clone, Default)]
pub struct Blocked {
    #[cfg(feature = "fault-injection")]
    peers: Arc<RwLock<BTreeSet<NodeId>>>,
}

impl Blocked {
    /// Whether messages to or from `peer` are dropped.
    #[cfg(feature = "fault-injection")]
    pub fn contains(&self, peer: NodeId) -> bool {
        self.peers.read().map(|p| p.contains(&peer)).unwrap_or(false)
    }

    /// Whether messages to or from `peer` are dropped: never, in this build.
    #[cfg(not(feature = "fault-injection"))]
    #[inline(always)]
    pub fn contains(&self, _peer: NodeId) -> bool {
        false
    }

    /// Replaces the set (empty: nothing is dropped).
    #[cfg(feature = "fault-injection")]
    pub fn set(&self, peers: impl IntoIterator<Item = NodeId>) {
        // A writer cannot panic while holding the lock; take it back if poisoned anyway.
        let mut guard = self.peers.write().unwrap_or_else(|e| e.into_inner());
        *guard = peers.into_iter().collect();
    }
}
