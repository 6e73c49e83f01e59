//! The server's integration tests, one test binary (one link of the node
//! and RocksDB), a module per subject. Run one module with `cargo test
//! --release -p portrait-server --test integration -- state_machine::`.

mod auth;
mod common;
mod engine_oracle;
mod expr_fuzz_harness;
mod formats;
mod groups;
mod limits;
mod no_fault_injection;
mod node;
mod routing;
mod shards;
mod state_machine;
mod storage_conformance;
mod tags;
mod tls;
