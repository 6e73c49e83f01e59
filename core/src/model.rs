//! Domain types shared by the store, the raft layer and the services.
//! Serialized with bincode inside raft entries and RocksDB values, so field
//! order is part of the on-disk format: append fields, never reorder.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A typed attribute value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// Attributes of an event, in a deterministic order.
pub type Attrs = BTreeMap<String, Value>;

/// One user event, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub user_id: String,
    pub family: String,
    pub event_type: String,
    pub time_ms: i64,
    /// Idempotency key, scoped to the user; empty = not deduplicated.
    pub event_id: String,
    pub attrs: Attrs,
}

impl Event {
    /// A `browse` `view` of user `u` at time 0, with no id and no attributes:
    /// a fixture for the server's raft and log tests, which only count and
    /// size. Not `cfg(test)`: those tests are in another crate.
    #[doc(hidden)]
    pub fn bare() -> Event {
        Event {
            user_id: "u".into(),
            family: "browse".into(),
            event_type: "view".into(),
            time_ms: 0,
            event_id: String::new(),
            attrs: Default::default(),
        }
    }
}

/// Expiry of something that never expires.
pub const NEVER: i64 = i64::MAX;

/// When a value written at `time_ms` in a family with `ttl_ms` expires.
pub fn expiry(time_ms: i64, ttl_ms: Option<i64>) -> i64 {
    match ttl_ms {
        Some(ttl) => time_ms.saturating_add(ttl),
        None => NEVER,
    }
}

/// Whether a value with this expiry is still served at `now_ms`.
pub fn is_live(expires_at_ms: i64, now_ms: i64) -> bool {
    expires_at_ms > now_ms
}

/// What applying one client write request did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteCounts {
    pub applied: u32,
    pub duplicates: u32,
    pub expired: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_arithmetic() {
        assert_eq!(expiry(1_000, Some(500)), 1_500);
        assert_eq!(expiry(1_000, None), NEVER);
        assert_eq!(expiry(i64::MAX - 1, Some(10)), NEVER);
        assert!(is_live(1_500, 1_499));
        // A value is dead at the exact moment it expires.
        assert!(!is_live(1_500, 1_500));
        assert!(is_live(NEVER, i64::MAX - 1));
    }
}
