//! The client's tests against in-process fake nodes, one test binary, a
//! module per subject.

mod cli;
mod fake;
mod redirect;
mod routing;
