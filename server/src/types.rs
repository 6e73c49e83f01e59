//! The raft type configuration and the replicated commands.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{Event, WriteCounts};

openraft::declare_raft_types!(
    /// Portrait's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;

/// A raft group of this cluster. Shard `k` (users with
/// `xxh3(user_id) mod S == k`) is `GroupId(k)`; the meta group, which holds
/// nodes, placement and the schema, is [`GroupId::META`]. Every group is its
/// own openraft instance; a node's groups share one log engine, whose keys
/// start with the group id (u32 big-endian, so a group is one key range).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct GroupId(pub u32);

impl GroupId {
    /// The meta group: the largest id, so it never collides with a shard.
    pub const META: GroupId = GroupId(u32::MAX);

    /// The group's directory name under a data dir's `snapshots/`: the
    /// shard number, or `meta`.
    pub fn dir_name(self) -> String {
        match self {
            GroupId::META => "meta".into(),
            GroupId(k) => k.to_string(),
        }
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            GroupId::META => f.write_str("meta"),
            GroupId(k) => write!(f, "shard {k}"),
        }
    }
}

/// A state-machine command. Every field the apply needs is in the entry:
/// `stamp_ms` is the leader's clock when it proposed the entry, the only time
/// apply ever uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Client write requests batched into one entry; each inner vector is one
    /// request, applied whole or not at all. Shared, not copied, between the
    /// log store's cache of recent entries and the state machine; encoded as
    /// the plain vector (serde's `rc` feature).
    Write { stamp_ms: i64, requests: Arc<Vec<Vec<Event>>> },
    /// Replace the schema with this TOML (validated before proposing and
    /// again at apply): the meta group's schema `version`, which each shard
    /// applies through its own log. A version not above the shard's is
    /// skipped (a leader may propose it twice).
    ApplySchema { stamp_ms: i64, toml: String, version: u64 },
    /// A command of the meta group's log (only the meta group applies it).
    Meta { stamp_ms: i64, command: portrait_core::meta::MetaCommand },
    /// Re-evaluate the users whose tags may have changed by `stamp_ms`
    /// with time alone (proposed by the leader when a timer is due).
    Tick { stamp_ms: i64 },
    /// Background re-evaluation after a schema change: the next `limit`
    /// users after `after` (in key order), for schema `version`. Ignored if
    /// the schema has changed since.
    Reevaluate { stamp_ms: i64, version: u64, after: Option<String>, limit: u32 },
    /// One step of restoring the shard from a backup (`node/backup.rs`):
    /// the leader reads the backup's archive and proposes its rows, so
    /// every replica applies the same rows at the same indexes.
    Restore { stamp_ms: i64, step: RestoreStep },
    /// From this entry on the shard applies by apply rules `version` (the
    /// meta group's, see `portrait_core::rules`). A version not above the
    /// shard's is skipped; a replica whose build does not apply `version`
    /// stops here rather than apply the shard by other rules.
    Rules { stamp_ms: i64, version: u32 },
}

/// A step of a shard's restore, in log order: `Begin`, `Rows` (numbered
/// from 0), `End`, all with the same attempt id; a step of another attempt
/// or out of order is rejected and changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RestoreStep {
    /// Deletes the shard's rows (its raft state, clock and schema stay)
    /// and marks it restoring: writes are rejected, ticks and
    /// re-evaluation wait, until `End`. A new `Begin` starts over.
    Begin { id: String },
    /// The archive's rows in key order, of at most `RESTORE_ENTRY_BYTES`.
    Rows { id: String, seq: u64, rows: Vec<RestoreRow> },
    /// Ends the restore once `rows` rows were applied: the clock moves to
    /// at least the backup's; the backup's re-evaluation progress is kept
    /// when `schema` (the backup's schema of the shard; `None`: the
    /// built-in one) is the shard's, else every user is re-evaluated.
    End {
        id: String,
        rows: u64,
        clock_ms: i64,
        schema: Option<crate::schema::Schema>,
        reeval: Option<ReevalProgress>,
    },
}

/// One row of a restore: the column family (its index in the state
/// database's `ALL_CFS`), the key after the shard's 4-byte prefix, the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreRow {
    pub cf: u8,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// The id of one attempt at restoring a shard: the caller's `restore_id`
/// (the backup's id), `#`, the first 16 hex digits of the archive's
/// SHA-256, `.`, and the receiving node's wall clock in ms. (Builds before
/// session 33 wrote `restore_id#ms`.)
pub fn restore_attempt_id(restore_id: &str, sha256: &str, now_ms: u64) -> String {
    let archive = sha256.get(..16).unwrap_or(sha256).to_ascii_lowercase();
    format!("{restore_id}#{archive}.{now_ms}")
}

/// The archive digest of an attempt id from [`restore_attempt_id`], if it
/// records one: an attempt goes on after an earlier one only with the same
/// archive.
pub fn restore_archive_of(attempt: &str) -> Option<&str> {
    attempt.rsplit_once('#').and_then(|(_, tail)| tail.split_once('.')).map(|(archive, _)| archive)
}

/// How a restore `Begin`'s rejection starts when the restore it names
/// already ended in the shard (an attempt run again after its `End`
/// applied): the node answers ALREADY_EXISTS, which the CLI counts done.
pub const ALREADY_RESTORED: &str = "already restored:";

/// How a restore `Rows` step's rejection starts when its `seq` is not the
/// one the shard expects (the node answers UNAVAILABLE: retry).
pub const ROWS_OUT_OF_ORDER: &str = "restore rows";

/// The `restore_id` of an attempt id from [`restore_attempt_id`].
pub fn restore_id_of(attempt: &str) -> &str {
    attempt.rsplit_once('#').map_or(attempt, |(id, _)| id)
}

/// What a shard's restore marker records (`meta` key `restore`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreMarker {
    pub id: String,
    /// The `seq` the next `Rows` step must have.
    pub next_seq: u64,
    /// Rows applied so far.
    pub rows: u64,
}

/// Progress of the background re-evaluation after a schema change
/// (stored in the state machine's meta; absent when none is running).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReevalProgress {
    pub version: u64,
    /// The last user re-evaluated; `None` = not started.
    pub cursor: Option<String>,
    pub users_done: u64,
}

/// Result of applying one entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Blank and membership entries.
    None,
    /// One outcome per request, in order.
    Write(Vec<WriteOutcome>),
    /// The schema now has this version (the meta group's number).
    SchemaApplied { version: u64 },
    /// What a meta command did.
    Meta(portrait_core::meta::MetaOutcome),
    /// Rejected at apply; nothing of the command was applied.
    Rejected { reason: String },
    /// A tick re-evaluated this many users.
    Ticked { users: u32 },
    /// A re-evaluation batch covered this many users.
    Reevaluated { users: u32 },
    /// A restore step applied; rows applied by the restore so far.
    Restored { rows: u64 },
    /// The shard applies by this rules version now.
    RulesApplied { version: u32 },
}

/// Outcome of one write request inside a `Command::Write`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WriteOutcome {
    Applied(WriteCounts),
    /// Rejected at apply (e.g. its family was removed by a schema change in
    /// between); nothing of the request was applied.
    Rejected {
        reason: String,
    },
    /// Not applied: the entry had loaded its budget of stored state
    /// ([`crate::limits::MAX_WRITE_STATE_BYTES_PER_ENTRY`]) before it; a
    /// later entry may take it (retryable).
    Deferred {
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_id_names_its_restore_and_its_archive() {
        let sha = "ABCDEF0123456789".repeat(4);
        let id = restore_attempt_id("backup-17#x", &sha, 42);
        assert_eq!(id, "backup-17#x#abcdef0123456789.42");
        assert_eq!(restore_id_of(&id), "backup-17#x");
        assert_eq!(restore_archive_of(&id), Some("abcdef0123456789"));
        // An attempt id of a build before the archive was recorded.
        assert_eq!(restore_id_of("backup-17#42"), "backup-17");
        assert_eq!(restore_archive_of("backup-17#42"), None);
    }

    /// The command as it was before its requests were shared.
    #[derive(Serialize)]
    enum PlainCommand {
        Write { stamp_ms: i64, requests: Vec<Vec<Event>> },
    }

    #[test]
    fn shared_requests_keep_the_raft_log_format() {
        let event = Event {
            user_id: "u1".into(),
            family: "browse".into(),
            event_type: "view".into(),
            time_ms: 1_760_000_000_000,
            event_id: "e1".into(),
            attrs: [("category".to_string(), crate::model::Value::Str("phone".into()))].into(),
        };
        let requests = vec![vec![event.clone(), event], vec![]];
        let shared = Command::Write { stamp_ms: 7, requests: Arc::new(requests.clone()) };
        let plain = PlainCommand::Write { stamp_ms: 7, requests };
        let bytes = crate::store::codec::encode(&shared);
        assert_eq!(bytes, crate::store::codec::encode(&plain));
        assert_eq!(crate::store::codec::decode::<Command>(&bytes).unwrap(), shared);
    }
}
