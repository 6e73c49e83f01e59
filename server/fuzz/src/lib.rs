//! The fuzz harness over the server's own expression sources: the same
//! files `portrait-server` compiles, included by path.

#[allow(dead_code)]
#[path = "../../src/duration.rs"]
pub mod duration;

#[allow(dead_code)]
#[path = "../../src/engine/expr/mod.rs"]
pub mod expr;

mod harness;

pub use harness::{run, Outcome};
