//! openraft wiring: the raft configuration, the gRPC peer network, the
//! write batcher that groups concurrent client writes into one log entry,
//! the ticker, leadership transfer (with the gate that pauses proposals
//! for it), and quiet idle groups (with the node-wide liveness probe).
//!
//! Layering: uses `store` and `types`; services call it through [`crate::node`].

pub mod batcher;
pub mod clock_probe;
pub mod contact;
pub mod elect;
pub mod fault;
pub mod gate;
pub mod incoming;
pub mod liveness;
pub mod log_policy;
pub mod network;
pub mod quiet;
pub mod replica;
pub mod stamp;
pub mod ticker;
pub mod transfer;

use crate::error::Error;
use crate::types::NodeId;
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::BasicNode;

/// How long the last chunk of a snapshot may wait for its answer: the
/// follower answers it once the install is done (unpacking, ingesting and
/// flushing a shard of many GiB can take minutes). Past it the leader
/// sends the whole snapshot again. A follower that is gone fails the call
/// far sooner: its connection's ping (`tls::PEER_PING_INTERVAL` +
/// `tls::PEER_PING_TIMEOUT`) ends the connection.
pub const SNAPSHOT_INSTALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// How long any other snapshot chunk may take; past it the chunk is sent
/// again (openraft retries a chunk a few times, then starts over).
pub const SNAPSHOT_CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Tunables of the raft group (node-local; not replicated).
#[derive(Debug, Clone)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and allow purging the log) after this many entries.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind the latest snapshot, for slow followers.
    pub keep_logs_after_snapshot: u64,
    /// Also build a snapshot once the log entries after the last one hold
    /// this many encoded bytes (see [`log_policy`]).
    pub snapshot_every_bytes: u64,
    /// Also purge the log behind the latest snapshot down to this many
    /// encoded bytes (whichever of this and `keep_logs_after_snapshot`
    /// keeps less).
    pub keep_log_bytes_after_snapshot: u64,
    /// Flush the node's state once the log entries its shards applied and
    /// its flushed state does not cover hold this many encoded bytes, all
    /// shards together: what a restart re-applies, and reads from the log
    /// at once (see [`log_policy`]).
    pub max_unflushed_log_bytes: u64,
    /// How often the leader checks for due timers (time-driven tags).
    pub tick_interval_ms: u64,
    /// A write not committed within this time fails with UNAVAILABLE.
    pub write_timeout_ms: u64,
    /// Idle groups turn their heartbeats off, and followers campaign on the
    /// node-wide liveness probe instead of their own timers (see [`quiet`]).
    pub quiet_idle_groups: bool,
    /// Snapshots this node sends (every group, every peer together) go
    /// out at this many MB/s at most (0: no limit): a replica moving or
    /// catching up does not take the disk and network from the writes.
    pub snapshot_send_mb_per_sec: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 250,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            snapshot_every_entries: 20_000,
            keep_logs_after_snapshot: 2_000,
            // With 4 MiB entries the entry counts alone would allow 80 GB
            // of log between snapshots and 8 GB behind one. 256 MiB between
            // snapshots keeps a snapshot's cost (a RocksDB checkpoint: hard
            // links, seconds at most) small against the ingest it covers.
            snapshot_every_bytes: 256 * 1024 * 1024,
            keep_log_bytes_after_snapshot: 128 * 1024 * 1024,
            // A quarter of the memtable budget (512 MiB): ingest whose state
            // is as large as its log fills the memtables first; one of
            // duplicates or counters is flushed every 128 MiB of log.
            max_unflushed_log_bytes: 128 * 1024 * 1024,
            tick_interval_ms: 1_000,
            write_timeout_ms: 5_000,
            quiet_idle_groups: true,
            snapshot_send_mb_per_sec: 100,
        }
    }
}

impl RaftTuning {
    /// How often the node probes each peer node (`Raft.Clock`): every
    /// heartbeat interval when it is what tells quiet groups their leader
    /// is alive, else once a second (for the clock guard alone).
    pub fn probe_interval(&self) -> std::time::Duration {
        match self.quiet_idle_groups {
            true => std::time::Duration::from_millis(self.heartbeat_ms),
            false => std::time::Duration::from_secs(1),
        }
    }

    /// A leader refuses writes while its node has heard fewer than a
    /// quorum of the group's voters on the liveness probe for this long
    /// (`node/write.rs`): twice the longest election timeout, and at least
    /// a probe's timeout plus three probe intervals (a peer with a probe in
    /// flight gets no other), so that a probe answered late is not a lost
    /// quorum.
    pub fn quorum_unheard_after(&self) -> std::time::Duration {
        let elections = std::time::Duration::from_millis(self.election_timeout_max_ms.saturating_mul(2));
        elections.max(clock_probe::PROBE_TIMEOUT + self.probe_interval() * 3)
    }

    /// Snapshot chunks: 4 MiB, or one second of the snapshot send rate if
    /// less (at least 64 KiB), so that paced sending stays smooth.
    pub fn snapshot_chunk_bytes(&self) -> u64 {
        const MAX: u64 = 4 * 1024 * 1024;
        match self.snapshot_send_mb_per_sec {
            0 => MAX,
            mb => mb.saturating_mul(1_000_000).clamp(64 * 1024, MAX),
        }
    }

    pub fn openraft_config(&self) -> anyhow::Result<openraft::Config> {
        let config = openraft::Config {
            cluster_name: "portrait".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            // The longest a snapshot chunk may take: the last one's answer
            // waits for the install (other chunks are held to
            // `SNAPSHOT_CHUNK_TIMEOUT` by the network).
            install_snapshot_timeout: SNAPSHOT_INSTALL_TIMEOUT.as_millis() as u64,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes(),
            // Entries per AppendEntries; the log reader also stops at
            // `MAX_APPEND_ENTRIES_BYTES` (8 MiB), which binds first for any
            // entry over 32 KiB (a batch of ~100 typical events).
            max_payload_entries: 256,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            // The log policy purges (by entries and bytes, holding the log
            // for members catching up): openraft's own purging is off.
            max_in_snapshot_log_to_keep: u64::MAX,
            ..Default::default()
        };
        Ok(config.validate()?)
    }
}

/// Maps a forward-to-leader answer to [`Error::NotLeader`].
pub fn not_leader(f: ForwardToLeader<NodeId, BasicNode>) -> Error {
    Error::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.map(|n| n.addr), group: None }
}

/// Why a group's raft stopped, if it stopped on an error: a storage error
/// or a panic. `Stopped` is a shutdown on purpose (the node's, or a
/// replica dropped from it), not a failure.
pub fn fatal_reason(running: &Result<(), openraft::error::Fatal<NodeId>>) -> Option<String> {
    match running {
        Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Maps a failed `client_write`.
pub fn client_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f),
        // Another change still running: retry once it is done.
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            e @ openraft::error::ChangeMembershipError::InProgress(_),
        )) => Error::Unavailable(format!("{e}; retry")),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Error::FailedPrecondition(e.to_string())
        }
        // It may have stopped after the entry reached the log (or a
        // follower's): a new leader may still commit it.
        RaftError::Fatal(f) => Error::Unavailable(format!(
            "raft is not running: {f}; {}: retry with the same event_ids",
            crate::error::OUTCOME_UNKNOWN
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::Fatal;
    use openraft::{ErrorSubject, ErrorVerb, StorageError, StorageIOError};

    #[test]
    fn a_leader_gives_its_quorum_two_election_timeouts_and_at_least_a_probe_timeout_and_three_probes() {
        let secs = std::time::Duration::from_secs;
        assert_eq!(RaftTuning::default().quorum_unheard_after(), secs(4));
        let loud =
            RaftTuning { quiet_idle_groups: false, election_timeout_max_ms: 500, ..Default::default() };
        assert_eq!(loud.quorum_unheard_after(), secs(4), "a probe's timeout and three probes a second apart");
        let quick = RaftTuning { heartbeat_ms: 50, election_timeout_max_ms: 300, ..Default::default() };
        assert_eq!(quick.quorum_unheard_after(), std::time::Duration::from_millis(1_150));
    }

    #[test]
    fn a_group_stopped_on_an_error_is_a_failure_and_one_stopped_on_purpose_is_not() {
        assert_eq!(fatal_reason(&Ok(())), None);
        assert_eq!(fatal_reason(&Err(Fatal::Stopped)), None, "a shutdown, or a replica dropped");
        let io =
            StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Write, openraft::AnyError::error("disk full"));
        let reason = fatal_reason(&Err(Fatal::StorageError(StorageError::from(io)))).expect("a failure");
        assert!(reason.contains("disk full"), "{reason}");
        assert_eq!(fatal_reason(&Err(Fatal::Panicked)).as_deref(), Some("panicked"));
    }

    #[test]
    fn a_write_that_raft_stopped_under_has_an_unknown_outcome() {
        let io =
            StorageIOError::new(ErrorSubject::Logs, ErrorVerb::Write, openraft::AnyError::error("disk full"));
        let e = client_write_error(RaftError::Fatal(Fatal::StorageError(StorageError::from(io))));
        assert!(e.outcome_unknown(), "{e}");
        assert!(client_write_error(RaftError::Fatal(Fatal::Stopped)).outcome_unknown());
    }
}
