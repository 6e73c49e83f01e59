//! A family record: one user's latest attributes and last-N history in one
//! family, stored under `user ⟂ family`.
//!
//! Stored value: 8 bytes big-endian `max_expires_at` (read by the compaction
//! filter without decoding the rest), then the bincode record.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::codec;
use crate::model::{expiry, is_live, Attrs, Event, Value};

/// The latest value of one attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub value: Value,
    pub time_ms: i64,
    pub expires_at: i64,
}

/// One event kept in the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub event_type: String,
    pub time_ms: i64,
    pub event_id: String,
    pub attrs: Attrs,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FamilyRecord {
    pub attrs: BTreeMap<String, Cell>,
    /// Newest event time first; among equal times, the later applied first.
    pub history: Vec<HistoryEntry>,
}

impl FamilyRecord {
    /// Folds an event in. An attribute takes the value of the event with the
    /// latest event time (a late event does not overwrite a newer value).
    pub fn apply_event(&mut self, event: &Event, expires_at: i64, history_len: u32) {
        for (name, value) in &event.attrs {
            let newer = self.attrs.get(name).is_none_or(|c| c.time_ms <= event.time_ms);
            if newer {
                let cell = Cell { value: value.clone(), time_ms: event.time_ms, expires_at };
                self.attrs.insert(name.clone(), cell);
            }
        }
        if history_len == 0 {
            return;
        }
        let pos = self.history.partition_point(|h| h.time_ms > event.time_ms);
        if pos >= history_len as usize {
            return;
        }
        let entry = HistoryEntry {
            event_type: event.event_type.clone(),
            time_ms: event.time_ms,
            event_id: event.event_id.clone(),
            attrs: event.attrs.clone(),
            expires_at,
        };
        self.history.insert(pos, entry);
        self.history.truncate(history_len as usize);
    }

    /// Drops everything that is no longer live at `now_ms`.
    pub fn prune(&mut self, now_ms: i64) {
        self.attrs.retain(|_, c| is_live(c.expires_at, now_ms));
        self.history.retain(|h| is_live(h.expires_at, now_ms));
    }

    /// The part of the record served at `now_ms` under the family's current
    /// TTL (which may be shorter than the one the values were written with).
    /// Reported expiries are the effective ones.
    pub fn live_view(&self, now_ms: i64, ttl_ms: Option<i64>) -> FamilyRecord {
        let effective = |time_ms: i64, stored: i64| stored.min(expiry(time_ms, ttl_ms));
        let attrs = self
            .attrs
            .iter()
            .map(|(k, c)| (k, Cell { expires_at: effective(c.time_ms, c.expires_at), ..c.clone() }))
            .filter(|(_, c)| is_live(c.expires_at, now_ms))
            .map(|(k, c)| (k.clone(), c))
            .collect();
        let history = self
            .history
            .iter()
            .map(|h| HistoryEntry { expires_at: effective(h.time_ms, h.expires_at), ..h.clone() })
            .filter(|h| is_live(h.expires_at, now_ms))
            .collect();
        FamilyRecord { attrs, history }
    }

    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty() && self.history.is_empty()
    }

    /// The latest expiry of anything in the record.
    pub fn max_expiry(&self) -> i64 {
        let a = self.attrs.values().map(|c| c.expires_at);
        let h = self.history.iter().map(|h| h.expires_at);
        a.chain(h).max().unwrap_or(i64::MIN)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.max_expiry().to_be_bytes().to_vec();
        out.extend(codec::encode(self));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<FamilyRecord, bincode::Error> {
        codec::decode(bytes.get(8..).unwrap_or_default())
    }
}

/// The `max_expires_at` header of a stored value, if it has one.
pub fn stored_expiry(value: &[u8]) -> Option<i64> {
    value.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(time_ms: i64, id: &str, attrs: &[(&str, i64)]) -> Event {
        Event {
            user_id: "u".into(),
            family: "browse".into(),
            event_type: "view".into(),
            time_ms,
            event_id: id.into(),
            attrs: attrs.iter().map(|(k, v)| (k.to_string(), Value::Int(*v))).collect(),
        }
    }

    #[test]
    fn latest_event_time_wins_and_late_events_do_not_overwrite() {
        let mut r = FamilyRecord::default();
        r.apply_event(&ev(200, "b", &[("x", 2)]), 1_000, 10);
        r.apply_event(&ev(100, "a", &[("x", 1), ("y", 1)]), 900, 10);
        assert_eq!(r.attrs["x"].value, Value::Int(2));
        assert_eq!(r.attrs["y"].value, Value::Int(1));
        let ids: Vec<_> = r.history.iter().map(|h| h.event_id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
    }

    #[test]
    fn history_is_bounded_and_keeps_the_newest() {
        let mut r = FamilyRecord::default();
        for t in [5, 1, 9, 3, 7] {
            r.apply_event(&ev(t, &t.to_string(), &[]), i64::MAX, 3);
        }
        let times: Vec<_> = r.history.iter().map(|h| h.time_ms).collect();
        assert_eq!(times, [9, 7, 5]);
        r.apply_event(&ev(2, "old", &[]), i64::MAX, 3);
        assert_eq!(r.history.len(), 3);
        assert!(r.history.iter().all(|h| h.event_id != "old"));
    }

    #[test]
    fn prune_and_live_view_hide_expired_values() {
        let mut r = FamilyRecord::default();
        r.apply_event(&ev(100, "a", &[("x", 1)]), 200, 10);
        r.apply_event(&ev(150, "b", &[("y", 1)]), 250, 10);
        let view = r.live_view(200, Some(100));
        assert!(!view.attrs.contains_key("x"), "expires exactly at 200");
        assert!(view.attrs.contains_key("y"));
        // A shorter current TTL hides values sooner than their stored expiry,
        // and the reported expiry is the effective one.
        assert!(r.live_view(170, Some(10)).is_empty());
        assert_eq!(r.live_view(155, Some(10)).attrs["y"].expires_at, 160);
        r.prune(250);
        assert!(r.is_empty());
    }

    #[test]
    fn encoding_round_trips_with_expiry_header() {
        let mut r = FamilyRecord::default();
        r.apply_event(&ev(100, "a", &[("x", 1)]), 500, 10);
        r.apply_event(&ev(120, "b", &[("y", 1)]), 700, 10);
        let bytes = r.encode();
        assert_eq!(stored_expiry(&bytes), Some(700));
        assert_eq!(FamilyRecord::decode(&bytes).unwrap(), r);
    }
}
