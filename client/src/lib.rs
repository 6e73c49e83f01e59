//! Portrait client: an async library over the `portrait.v1` gRPC services,
//! used by the `portrait` CLI (`src/main.rs`) and by the cluster tests.
//!
//! Layering: this crate depends only on `portrait-proto`, never on the server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), portrait_client::ClientError> {
//! use portrait_client::{json, Consistency, PortraitClient};
//!
//! let client = PortraitClient::connect("127.0.0.1:7700").await?;
//! let event = json::event_from_json(&serde_json::json!({
//!     "user_id": "u1", "family": "browse", "type": "view", "attrs": {"category": "phone"}
//! }))
//! .expect("valid event");
//! client.write(vec![event]).await?;
//! let profile = client.get_profile("u1", &[], Consistency::Linearizable).await?;
//! # Ok(()) }
//! ```
//!
//! Key code locations:
//! - `client.rs`: [`PortraitClient`], one method per RPC.
//! - `retry.rs`: leader redirect (`x-portrait-leader`) and `UNAVAILABLE` retry.
//! - `conn.rs`: the seed and leader connections shared by clones.
//! - `routing.rs`: the cached shard map, and which node serves a shard.
//! - `split.rs`: calls split per shard or node, answers merged back.
//! - `shard.rs`: [`shard_of`], the shard of a user.
//! - `json.rs`: JSON events in, JSON profiles out.
//! - `certs.rs`: development certificates (`portrait certs init`).
//! - `error.rs`: [`ClientError`].

pub mod backup;
pub mod certs;
mod client;
mod conn;
mod error;
pub mod json;
pub mod retry;
pub mod routing;
mod shard;
mod split;

pub use client::{PortraitClient, MAX_MESSAGE_BYTES, STATUS_TIMEOUT};
pub use conn::{
    normalize_endpoint, plaintext_token_warning, ConnectOptions, MAX_TOKEN_BYTES, PING_INTERVAL, PING_TIMEOUT,
};
pub use error::{code_name, ClientError};
pub use portrait_proto;
pub use portrait_proto::v1::{Consistency, Event, Profile, Value, WriteRequest, WriteResponse};
pub use shard::shard_of;

/// `bytes` in B, KiB, MiB, GiB or TiB (one decimal past B).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}
