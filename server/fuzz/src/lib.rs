//! The fuzz harness over the tag-rule language of `portrait-core`, the
//! crate `portrait-server` builds on (no RocksDB, no tonic).

pub use portrait_core::engine::expr;

mod harness;

pub use harness::{run, Outcome};
