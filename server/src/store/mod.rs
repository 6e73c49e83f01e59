//! RocksDB storage: the raft log store and the state machines of the
//! node's raft groups.
//!
//! Two RocksDB instances per node:
//! - `<data>/raft`: the node's one log engine for all its raft groups
//!   ([`log_engine`]): column families `logs` (group ⟂ index → entry) and
//!   `raft_meta` (group ⟂ vote, group ⟂ last purged log id, and the
//!   node's storage format). Appends are acknowledged to openraft only
//!   after a synced WAL flush, one flush serving the appends of every group
//!   queued meanwhile; each group gets its own openraft log storage
//!   ([`log_store`]) bounded to its key range.
//! - `<data>/state`: the state machines of every group on the node, in one
//!   database ([`sm_db::StateDb`]), every key prefixed by its group id
//!   ([`keys`]): column families `profiles` (gid user ⟂ family → family
//!   record), `history`, `dedupe` (gid user ⟂ event id → expiry), `state`,
//!   `timers` and `meta` (per group: last applied, membership, schema,
//!   clock; per node: format, install markers). Each group's state machine
//!   ([`state_machine`], over its [`group::GroupState`]) writes one
//!   `WriteBatch` per applied entry. Expired values are filtered on read and
//!   reclaimed by a compaction filter that uses each key's group's durable
//!   clock. A group's snapshot is its key range as SST files
//!   ([`group_snapshot`]) in a checksummed archive ([`snapshot`]); a
//!   shard's backup is the same archive, which a restore reads back
//!   ([`restore`]) to propose its rows through the shard's log.
//!
//! Node-wide, shared by the groups: both databases (one block cache, one
//! memtable budget each), the log's fsync and purge threads, the recent
//! entries' byte budget, the apply writer thread and the apply cache budget
//! ([`apply_writer`]).
//!
//! Both databases and every snapshot archive record the storage format
//! they were written in; another format is refused at open ([`format`]).
//!
//! Layering: uses `model`, `schema`, `types`; never tonic.

pub mod apply;
pub mod apply_writer;
pub mod checksum;
pub mod codec;
pub mod format;
pub mod group;
pub mod group_snapshot;
pub mod keys;
pub mod log_bytes;
pub mod log_engine;
pub mod log_store;
pub mod read;
pub mod recent;
pub mod record;
pub mod restore;
pub mod sm_db;
pub mod snapshot;
pub mod state_machine;
mod sync_audit;
pub mod threads;

pub use group::GroupState;
pub use log_engine::{LogEngine, PurgeGuard};
pub use log_store::LogStore;
pub use sm_db::{SmStore, StateDb};
pub use state_machine::StateMachine;
