//! Portrait's core: the domain model, the schema, the feature and tag engine
//! with its rule language, and the validation of input against the limits.
//!
//! Pure: no I/O, no clocks (callers pass the time), no RocksDB, no tonic, no
//! async runtime, and nothing else of Portrait's. The server (store, raft,
//! services) builds on it; the fuzz target (`server/fuzz`) uses it directly.
//!
//! Modules, bottom-up: [`duration`], [`limits`], [`model`], [`error`],
//! [`schema`], [`validate`], [`engine`] (with [`engine::expr`], the rule
//! language), [`shard`] (the shard of a user, the shard map, placement),
//! [`meta`] (the meta group's state and commands), [`rules`] (apply rules
//! versions).

pub mod duration;
pub mod engine;
pub mod error;
pub mod limits;
pub mod meta;
pub mod model;
pub mod rules;
pub mod schema;
pub mod shard;
pub mod validate;

pub use error::Invalid;
