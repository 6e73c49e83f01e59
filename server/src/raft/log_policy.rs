//! Snapshots and log retention by bytes. openraft's own policies count
//! entries (`snapshot_every_entries`, `keep_logs_after_snapshot`), and an
//! entry may hold 4 MiB (or one 16 MiB request): 20,000 entries between
//! snapshots could be 80 GB of log. This task watches raft's data metrics
//! and the log's byte ledger ([`LogBytes`]) and
//! - asks for a snapshot once the entries after the last snapshot hold
//!   `snapshot_every_bytes`;
//! - once a snapshot exists, asks openraft to purge the log behind it down
//!   to `keep_log_bytes_after_snapshot` (openraft still keeps what a
//!   replication in flight needs, and purges no entry that is not in the
//!   snapshot).
//!
//! Whichever bound, entries or bytes, comes first wins. One task for the
//! whole node looks at every group it hosts every [`POLL`]; it ends when
//! the node stops it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::replica::Registry;
use super::RaftTuning;
use crate::store::log_bytes::LogBytes;
use crate::types::GroupId;

/// How often the groups' logs are looked at: appending 256 MiB takes
/// seconds, so a snapshot asked for up to this late changes nothing.
const POLL: Duration = Duration::from_millis(200);

/// The byte bounds, from [`RaftTuning`].
#[derive(Debug, Clone, Copy)]
pub struct BytePolicy {
    pub snapshot_every_bytes: u64,
    pub keep_log_bytes_after_snapshot: u64,
}

impl From<&RaftTuning> for BytePolicy {
    fn from(t: &RaftTuning) -> Self {
        BytePolicy {
            snapshot_every_bytes: t.snapshot_every_bytes,
            keep_log_bytes_after_snapshot: t.keep_log_bytes_after_snapshot,
        }
    }
}

/// What the policy asks raft for.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Snapshot,
    Purge(u64),
}

/// What the task remembers between metrics changes.
#[derive(Debug, Default)]
struct Seen {
    /// The snapshot index when a snapshot was last asked for: no new ask
    /// until the snapshot changes.
    snapshot_asked_at: Option<Option<u64>>,
    /// The last purge asked for.
    purge_asked: u64,
}

impl Seen {
    fn decide(&mut self, policy: BytePolicy, log: &LogBytes, snapshot: Option<u64>) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.snapshot_asked_at.is_some_and(|at| at != snapshot) {
            self.snapshot_asked_at = None;
        }
        if self.snapshot_asked_at.is_none() && log.bytes_after(snapshot) >= policy.snapshot_every_bytes {
            self.snapshot_asked_at = Some(snapshot);
            actions.push(Action::Snapshot);
        }
        let purge = snapshot.and_then(|s| log.keep_bytes_before(s, policy.keep_log_bytes_after_snapshot));
        if let Some(upto) = purge.filter(|&upto| upto > self.purge_asked) {
            self.purge_asked = upto;
            actions.push(Action::Purge(upto));
        }
        actions
    }
}

/// Runs until `stop` turns true; see the module docs.
pub async fn run_until(registry: Arc<Registry>, policy: BytePolicy, mut stop: watch::Receiver<bool>) {
    let mut seen: BTreeMap<GroupId, Seen> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for replica in registry.all() {
            let (raft, log) = (&replica.raft, &replica.log_bytes);
            let snapshot = raft.data_metrics().borrow().snapshot.map(|l| l.index);
            for action in seen.entry(replica.gid).or_default().decide(policy, log, snapshot) {
                let result = match action {
                    Action::Snapshot => {
                        tracing::info!(
                            group = %replica.gid,
                            bytes = log.bytes_after(snapshot),
                            "log bytes since the snapshot: building one"
                        );
                        raft.trigger().snapshot().await
                    }
                    Action::Purge(upto) => raft.trigger().purge_log(upto).await,
                };
                if let Err(e) = result {
                    tracing::debug!(group = %replica.gid, error = %e, "raft stopped: no log byte policy");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BytePolicy = BytePolicy { snapshot_every_bytes: 100, keep_log_bytes_after_snapshot: 30 };

    #[test]
    fn snapshots_once_per_interval_of_bytes() {
        let (log, mut seen) = (LogBytes::default(), Seen::default());
        for i in 1..=9 {
            log.appended(i, 10);
        }
        assert_eq!(seen.decide(POLICY, &log, None), []);
        log.appended(10, 10);
        assert_eq!(seen.decide(POLICY, &log, None), [Action::Snapshot]);
        log.appended(11, 10);
        assert_eq!(seen.decide(POLICY, &log, None), [], "asked already; no snapshot yet");
        // The snapshot covers 10: 10 bytes after it, and 30 kept behind it.
        assert_eq!(seen.decide(POLICY, &log, Some(10)), [Action::Purge(7)]);
        assert_eq!(seen.decide(POLICY, &log, Some(10)), []);
        for i in 12..=19 {
            log.appended(i, 10);
        }
        assert_eq!(seen.decide(POLICY, &log, Some(10)), [], "90 bytes after the snapshot");
        log.appended(20, 10);
        assert_eq!(seen.decide(POLICY, &log, Some(10)), [Action::Snapshot]);
        assert_eq!(seen.decide(POLICY, &log, Some(20)), [Action::Purge(17)]);
    }

    #[test]
    fn a_snapshot_built_meanwhile_allows_a_new_ask() {
        let (log, mut seen) = (LogBytes::default(), Seen::default());
        for i in 1..=30 {
            log.appended(i, 10);
        }
        assert_eq!(seen.decide(POLICY, &log, Some(5)), [Action::Snapshot, Action::Purge(2)]);
        // A snapshot (asked before, by entries) ends at 6: 240 bytes after it.
        assert_eq!(seen.decide(POLICY, &log, Some(6)), [Action::Snapshot, Action::Purge(3)]);
    }
}
