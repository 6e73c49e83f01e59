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
//! then that old). A replica being written is measured at the first round
//! after its writes stop, or once they went on for [`BUSY_EVERY`] (and so
//! on): a round iterates the memtables in key order, which copies and sorts
//! them (hash skip lists), a burst that showed in the write latency of a
//! busy node. A round gives up as soon as the node stops.

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
/// A replica whose applied index moved at every round since its last
/// measurement (it is being written) is measured again after this long.
const BUSY_EVERY: Duration = Duration::from_secs(10);

/// A replica's last measurement.
#[derive(Debug, Clone, Copy)]
pub(super) struct Size {
    pub bytes: u64,
    /// Its applied index when measured.
    pub applied: u64,
}

/// A replica as the previous round saw it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    applied: u64,
    /// Since when its applied index moved at every round (and it was not
    /// measured), if it did.
    moving_since: Option<Instant>,
}

/// Whether a replica at `applied` is measured in the round starting `now`:
/// never measured; or moved since its last measurement and either quiet
/// since the previous round (`seen`) or moving for [`BUSY_EVERY`].
fn due(last: Option<&Size>, applied: u64, seen: Option<&Seen>, now: Instant) -> bool {
    match (last, seen) {
        (None, _) => true,
        (Some(size), _) if size.applied == applied => false,
        (Some(_), None) => false,
        (Some(_), Some(seen)) if seen.applied == applied => true,
        (Some(_), Some(seen)) => {
            seen.moving_since.is_some_and(|t| now.saturating_duration_since(t) >= BUSY_EVERY)
        }
    }
}

/// How the round starting `now` leaves a replica at `applied` that it
/// `measured` (or not), given how the previous round saw it.
fn seen_after(seen: Option<&Seen>, applied: u64, measured: bool, now: Instant) -> Seen {
    let moving = seen.is_some_and(|s| s.applied != applied) && !measured;
    let moving_since = match moving {
        true => Some(seen.and_then(|s| s.moving_since).unwrap_or(now)),
        false => None,
    };
    Seen { applied, moving_since }
}

/// Runs until `stop` turns true (or the node is gone).
pub(super) async fn run(node: Weak<Node>, mut stop: watch::Receiver<bool>) {
    let mut rest = EVERY;
    // Each replica as the previous round saw it.
    let mut previous = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(rest) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(node) = node.upgrade() else { return };
        let started = Instant::now();
        previous = node.measure_sizes(&previous, &stop).await;
        rest = EVERY.max(started.elapsed() * PACE);
    }
}

impl Node {
    /// One round: measures every shard replica that is [`due`], and
    /// forgets replicas no longer hosted. `previous` is how the previous
    /// round saw each replica; returns how this one does.
    async fn measure_sizes(
        &self,
        previous: &BTreeMap<GroupId, Seen>,
        stop: &watch::Receiver<bool>,
    ) -> BTreeMap<GroupId, Seen> {
        let replicas: Vec<_> = self.registry.all().into_iter().filter(|r| r.gid != GroupId::META).collect();
        let known = self.sizes.lock().expect("sizes lock").clone();
        let mut measured: BTreeMap<GroupId, Size> = BTreeMap::new();
        // The replicas to measure, with their applied index.
        let mut moved: BTreeMap<GroupId, u64> = BTreeMap::new();
        let mut seen = BTreeMap::new();
        let now = Instant::now();
        for replica in replicas {
            let applied = super::written_index(&replica);
            let (last, before) = (known.get(&replica.gid), previous.get(&replica.gid));
            let due = due(last, applied, before, now);
            seen.insert(replica.gid, seen_after(before, applied, due, now));
            match (due, last) {
                (false, Some(size)) => {
                    measured.insert(replica.gid, *size);
                }
                _ => {
                    moved.insert(replica.gid, applied);
                }
            }
        }
        if !moved.is_empty() {
            let (db, gids) = (self.state_db.clone(), moved.keys().copied().collect::<Vec<_>>());
            let stop = stop.clone();
            let measuring =
                tokio::task::spawn_blocking(move || db.groups_bytes(&gids, || *stop.borrow())).await;
            match measuring.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                Ok(None) => return seen, // the node is stopping
                Ok(Some(sizes)) => {
                    for (gid, bytes) in sizes {
                        measured.insert(gid, Size { bytes, applied: moved[&gid] });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "measuring the replicas' sizes");
                    // Their last figures stay; the next round tries again.
                    measured.extend(moved.keys().filter_map(|gid| Some((*gid, *known.get(gid)?))));
                }
            }
        }
        *self.sizes.lock().expect("sizes lock") = measured;
        seen
    }

    /// The last measured logical size of shard `gid`'s replica here.
    pub(super) fn state_bytes(&self, gid: GroupId) -> Option<u64> {
        self.sizes.lock().expect("sizes lock").get(&gid).map(|s| s.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs rounds every [`EVERY`] over one replica whose applied index is
    /// `applied[i]` at round `i`; returns the rounds that measured it.
    fn rounds(applied: &[u64]) -> Vec<usize> {
        let t0 = Instant::now();
        let (mut last, mut seen): (Option<Size>, Option<Seen>) = (None, None);
        let mut measured = Vec::new();
        for (i, &applied) in applied.iter().enumerate() {
            let now = t0 + EVERY * i as u32;
            let due = due(last.as_ref(), applied, seen.as_ref(), now);
            seen = Some(seen_after(seen.as_ref(), applied, due, now));
            if due {
                last = Some(Size { bytes: applied * 10, applied });
                measured.push(i);
            }
        }
        measured
    }

    #[test]
    fn a_replica_being_written_is_measured_once_its_writes_stop_or_every_busy_period() {
        let busy = (BUSY_EVERY.as_millis() / EVERY.as_millis()) as usize;
        assert_eq!(busy, 5);
        // Measured at its first round, then never again while it is quiet.
        assert_eq!(rounds(&[7, 7, 7, 7]), vec![0]);
        // A burst shorter than BUSY_EVERY: measured once, at the first
        // round after it.
        assert_eq!(rounds(&[0, 0, 10, 20, 30, 30, 30]), vec![0, 5]);
        // Writes that go on: BUSY_EVERY after the round that first saw
        // them moving (and again after the next such round), then
        // once more when they stop.
        let mut going: Vec<u64> = (0..14).collect();
        going.extend([13, 13]);
        assert_eq!(rounds(&going), vec![0, 6, 12, 14]);
    }
}
