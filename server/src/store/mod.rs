//! RocksDB storage: the raft log store and the state machine.
//!
//! Two RocksDB instances per node, so a snapshot can replace the state
//! machine without touching the log:
//! - `<data>/raft`: the node's one log engine for all its raft groups
//!   ([`log_engine`]): column families `logs` (group ⟂ index → entry) and
//!   `raft_meta` (group ⟂ vote, group ⟂ last purged log id, and the
//!   node's storage format). Appends are acknowledged to openraft only
//!   after a synced WAL flush, one flush serving the appends of every group
//!   queued meanwhile; each group gets its own openraft log storage
//!   ([`log_store`]) bounded to its key range.
//! - `<data>/sm/<db-N>`: column families `profiles` (user ⟂ family →
//!   family record), `dedupe` (user ⟂ event id → expiry) and `meta` (last
//!   applied, membership, schema, clock), written with one `WriteBatch` per
//!   applied entry ([`state_machine`]). Expired values are filtered on read
//!   and reclaimed by a compaction filter ([`sm_db`]).
//!
//! Both databases and every snapshot archive record the storage format
//! they were written in; another format is refused at open ([`format`]).
//!
//! Layering: uses `model`, `schema`, `types`; never tonic.

pub mod apply;
pub mod checksum;
pub mod codec;
pub mod format;
pub mod keys;
pub mod log_bytes;
pub mod log_engine;
pub mod log_store;
pub mod read;
pub mod recent;
pub mod record;
pub mod sm_db;
pub mod snapshot;
pub mod state_machine;
mod sync_audit;
pub mod threads;

pub use log_engine::{LogEngine, PurgeGuard};
pub use log_store::LogStore;
pub use sm_db::SmStore;
pub use state_machine::StateMachine;
