//! The Portrait node: storage, raft, the ingest apply path, gRPC services.
//!
//! Layers, bottom-up (each only uses the ones before it):
//! - the `portrait-core` crate, re-exported under its module names
//!   ([`model`], [`schema`], [`engine`], [`validate`], [`duration`]): domain
//!   types and rules, the feature and tag engine; pure, no I/O. [`limits`]
//!   adds the transport's limits to the core's; [`rules`] the apply rules
//!   versions this build applies;
//! - [`store`]: RocksDB log store and state machine (no tonic);
//! - [`raft`]: openraft wiring, the write batcher and the raft network;
//! - [`service`]: gRPC adapters (validate, call one domain method, map the error);
//! - `portraitd` ([`daemon`], called by `main.rs`), [`config`] and [`join`]:
//!   wiring, and joining a cluster on first start.

/// mimalloc for every binary that links the node: apply allocates and frees
/// per event (decoded records and feature states), and glibc malloc was
/// ~15 % of apply's CPU in profiles. Built without transparent huge pages
/// (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// The core's modules under the paths they had when they lived here.
pub use portrait_core::{duration, engine, model, schema, validate};

pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod error;
pub mod join;
pub mod limits;
pub mod node;
pub mod raft;
pub mod rules;
pub mod service;
pub mod store;
pub mod tls;
pub mod types;

/// Wall-clock milliseconds since the Unix epoch. Never used inside the state
/// machine: apply takes its time from the log entry.
pub fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
