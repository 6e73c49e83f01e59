//! Logical size of each shard replica on the node: the bytes of its keys
//! and values in the state database ([`crate::store::StateDb::groups_bytes`]),
//! reported per shard by `ClusterStatus` (`ShardStatus.state_bytes`). Not
//! disk usage, which lags compaction and depends on compression: two
//! replicas of a shard report about the same, whichever way (log or
//! snapshot) they got their data.
//!
//! Measuring reads the shard's whole range, so it is paced: a replica is
//! measured again only once its applied index has moved (those of a round
//! all in one pass over one RocksDB snapshot), and after a round
//! that took `t` the task waits `max(`[`EVERY`]`, `[`PACE`]` × t)` before the
//! next (at most about 5 % of one core on a large node; the figures are
//! then that old). A round gives up as soon as the node stops.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Node;
use crate::types::GroupId;

/// Rounds start at most this often.
const EVERY: Duration = Duration::from_secs(2);
/// A round that took `t` is followed by at least `PACE × t` of rest.
const PACE: u32 = 20;

/// A replica's last measurement.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Size {
    pub bytes: u64,
    /// Its applied index when measured.
    pub applied: u64,
}

/// Runs until `stop` turns true (or the node is gone).
pub(super) async fn run(node: Weak<Node>, mut stop: watch::Receiver<bool>) {
    let mut rest = EVERY;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(rest) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(node) = node.upgrade() else { return };
        let started = Instant::now();
        node.measure_sizes(&stop).await;
        rest = EVERY.max(started.elapsed() * PACE);
    }
}

impl Node {
    /// One round: measures every shard replica whose applied index moved
    /// since its last measurement, and forgets replicas no longer hosted.
    async fn measure_sizes(&self, stop: &watch::Receiver<bool>) {
        let replicas: Vec<_> = self.registry.all().into_iter().filter(|r| r.gid != GroupId::META).collect();
        let known = self.sizes.lock().expect("sizes lock").clone();
        let mut measured: BTreeMap<GroupId, Size> = BTreeMap::new();
        // The replicas whose applied index moved, with that index.
        let mut moved: BTreeMap<GroupId, u64> = BTreeMap::new();
        for replica in replicas {
            let applied = super::written_index(&replica);
            match known.get(&replica.gid).filter(|s| s.applied == applied) {
                Some(size) => {
                    measured.insert(replica.gid, *size);
                }
                None => {
                    moved.insert(replica.gid, applied);
                }
            }
        }
        if !moved.is_empty() {
            let (db, gids) = (self.state_db.clone(), moved.keys().copied().collect::<Vec<_>>());
            let stop = stop.clone();
            match tokio::task::spawn_blocking(move || db.groups_bytes(&gids, || *stop.borrow())).await {
                Ok(Ok(None)) => return, // the node is stopping
                Ok(Ok(Some(sizes))) => {
                    for (gid, bytes) in sizes {
                        measured.insert(gid, Size { bytes, applied: moved[&gid] });
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "measuring the replicas' sizes"),
                Err(e) => tracing::warn!(error = %e, "measuring the replicas' sizes"),
            }
        }
        *self.sizes.lock().expect("sizes lock") = measured;
    }

    /// The last measured logical size of shard `gid`'s replica here.
    pub(super) fn state_bytes(&self, gid: GroupId) -> Option<u64> {
        self.sizes.lock().expect("sizes lock").get(&gid).map(|s| s.bytes)
    }
}
