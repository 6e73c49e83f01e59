//! Family data: one user's latest attributes and last-N history in one
//! family.
//!
//! Stored as a small [`FamilyHead`] under `user ⟂ family` in `profiles`
//! (latest attributes plus the index of the history) and one value per
//! history event under `user ⟂ family ⟂ slot` in `history`. An event costs
//! one small history put and a head rewrite, whatever the history length; a
//! full history evicts its oldest event by reusing that event's slot.
//! [`FamilyRecord`] is the assembled form the read path serves.
//!
//! Stored values (heads and history events): 8 bytes big-endian
//! `max_expires_at` (read by the compaction filter without decoding the
//! rest), a version byte, then bincode with variable-length integers
//! ([`codec::encode_row_into`]).

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

/// [`HistoryEntry`] borrowed from an event, to encode without copying
/// (bincode writes the same bytes for both).
#[derive(Serialize)]
struct HistoryEntryRef<'a> {
    event_type: &'a str,
    time_ms: i64,
    event_id: &'a str,
    attrs: &'a Attrs,
    expires_at: i64,
}

/// The stored value of a history event.
pub fn encode_history_event(event: &Event, expires_at: i64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_history_event_into(&mut out, event, expires_at);
    out
}

/// [`encode_history_event`] into `out` (cleared first).
pub fn encode_history_event_into(out: &mut Vec<u8>, event: &Event, expires_at: i64) {
    let entry = HistoryEntryRef {
        event_type: &event.event_type,
        time_ms: event.time_ms,
        event_id: &event.event_id,
        attrs: &event.attrs,
        expires_at,
    };
    codec::encode_row_into(out, expires_at, &entry);
}

pub fn decode_history_event(bytes: &[u8]) -> Result<HistoryEntry, bincode::Error> {
    codec::decode_row(bytes, "history event")
}

/// A history event's place in the head's index.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SlotRef {
    pub time_ms: i64,
    pub expires_at: i64,
    /// Where the event is stored (`user ⟂ family ⟂ slot` in `history`).
    pub slot: u16,
}

/// What `profiles` holds under `user ⟂ family`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FamilyHead {
    pub attrs: BTreeMap<String, Cell>,
    /// The history, newest event time first; among equal times, the later
    /// applied first.
    pub history: Vec<SlotRef>,
}

/// The history writes an event needs.
#[derive(Debug, Default, PartialEq)]
pub struct HistoryWrite {
    /// Slots no longer referenced (the history got shorter): delete them.
    pub freed: Vec<u16>,
    /// The slot to store the event in, if it made it into the history.
    pub put: Option<u16>,
}

impl FamilyHead {
    /// Folds an event in. An attribute takes the value of the event with the
    /// latest event time (a late event does not overwrite a newer value).
    /// The event enters the history unless `history_len` newer events are
    /// kept already; it then takes the evicted oldest event's slot.
    pub fn apply_event(&mut self, event: &Event, expires_at: i64, history_len: u32) -> HistoryWrite {
        for (name, value) in &event.attrs {
            let newer = self.attrs.get(name).is_none_or(|c| c.time_ms <= event.time_ms);
            if newer {
                let cell = Cell { value: value.clone(), time_ms: event.time_ms, expires_at };
                self.attrs.insert(name.clone(), cell);
            }
        }
        let len = history_len as usize;
        let mut write = HistoryWrite::default();
        // A schema change may have shortened the history.
        while self.history.len() > len {
            write.freed.extend(self.history.pop().map(|s| s.slot));
        }
        let pos = self.history.partition_point(|h| h.time_ms > event.time_ms);
        if pos >= len {
            return write;
        }
        let slot = match self.history.len() == len {
            true => self.history.pop().map_or(0, |evicted| evicted.slot),
            false => self.free_slot(),
        };
        self.history.insert(pos, SlotRef { time_ms: event.time_ms, expires_at, slot });
        write.put = Some(slot);
        write
    }

    /// The smallest slot number not in use (history is at most
    /// `MAX_HISTORY_LEN` long, so one always fits a `u16`).
    fn free_slot(&self) -> u16 {
        let mut used: Vec<u16> = self.history.iter().map(|s| s.slot).collect();
        used.sort_unstable();
        let mut slot = 0;
        for u in used {
            if u != slot {
                break;
            }
            slot += 1;
        }
        slot
    }

    /// Drops everything that is no longer live at `now_ms`. The stored
    /// events of dropped slots are expired too: compaction reclaims them,
    /// and a slot reused before that is simply overwritten.
    pub fn prune(&mut self, now_ms: i64) {
        self.attrs.retain(|_, c| is_live(c.expires_at, now_ms));
        self.history.retain(|h| is_live(h.expires_at, now_ms));
    }

    /// [`FamilyHead::prune`] by the family's current TTL too, as
    /// [`FamilyRecord::live_view`] filters: a schema change may have
    /// shortened the TTL since the values were written (their stored
    /// expiry is the old one). For reads only: the history events it drops
    /// are then neither fetched nor counted against the response's size.
    pub fn prune_by_ttl(&mut self, now_ms: i64, ttl_ms: Option<i64>) {
        let live = |time_ms: i64, stored: i64| is_live(stored.min(expiry(time_ms, ttl_ms)), now_ms);
        self.attrs.retain(|_, c| live(c.time_ms, c.expires_at));
        self.history.retain(|h| live(h.time_ms, h.expires_at));
    }

    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty() && self.history.is_empty()
    }

    /// The latest expiry of anything in the head.
    pub fn max_expiry(&self) -> i64 {
        let a = self.attrs.values().map(|c| c.expires_at);
        let h = self.history.iter().map(|h| h.expires_at);
        a.chain(h).max().unwrap_or(i64::MIN)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// [`FamilyHead::encode`] into `out` (cleared first).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        codec::encode_row_into(out, self.max_expiry(), self);
    }

    pub fn decode(bytes: &[u8]) -> Result<FamilyHead, bincode::Error> {
        codec::decode_row(bytes, "family head")
    }

    /// The record with the history events `events` (the stored values of
    /// `self.history`'s slots, in the same order). An event whose stored
    /// time or expiry does not match its slot reference, or that is gone
    /// (compacted away after expiring), is left out.
    pub fn assemble(&self, events: Vec<Option<HistoryEntry>>) -> FamilyRecord {
        let history = self
            .history
            .iter()
            .zip(events)
            .filter_map(|(r, e)| e.filter(|e| e.time_ms == r.time_ms && e.expires_at == r.expires_at))
            .collect();
        FamilyRecord { attrs: self.attrs.clone(), history }
    }
}

/// A family's data as served: latest attributes and history events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FamilyRecord {
    pub attrs: BTreeMap<String, Cell>,
    /// Newest event time first; among equal times, the later applied first.
    pub history: Vec<HistoryEntry>,
}

impl FamilyRecord {
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
}

/// The `max_expires_at` header of a stored value, if it has one.
pub fn stored_expiry(value: &[u8]) -> Option<i64> {
    value.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

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

    /// A head with its history slots, as the `profiles` and `history`
    /// column families hold them.
    #[derive(Default)]
    struct Stored {
        head: FamilyHead,
        slots: HashMap<u16, Vec<u8>>,
    }

    impl Stored {
        fn apply(&mut self, event: &Event, expires_at: i64, history_len: u32) -> HistoryWrite {
            let write = self.head.apply_event(event, expires_at, history_len);
            for s in &write.freed {
                self.slots.remove(s);
            }
            if let Some(s) = write.put {
                self.slots.insert(s, encode_history_event(event, expires_at));
            }
            write
        }

        fn record(&self) -> FamilyRecord {
            let events = self
                .head
                .history
                .iter()
                .map(|r| self.slots.get(&r.slot).map(|b| decode_history_event(b).expect("decodes")));
            self.head.assemble(events.collect())
        }
    }

    #[test]
    fn latest_event_time_wins_and_late_events_do_not_overwrite() {
        let mut s = Stored::default();
        s.apply(&ev(200, "b", &[("x", 2)]), 1_000, 10);
        s.apply(&ev(100, "a", &[("x", 1), ("y", 1)]), 900, 10);
        let r = s.record();
        assert_eq!(r.attrs["x"].value, Value::Int(2));
        assert_eq!(r.attrs["y"].value, Value::Int(1));
        let ids: Vec<_> = r.history.iter().map(|h| h.event_id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
        assert_eq!(r.history[1].attrs["y"], Value::Int(1));
        assert_eq!(r.history[1].expires_at, 900);
    }

    #[test]
    fn history_is_bounded_keeps_the_newest_and_reuses_the_evicted_slot() {
        let mut s = Stored::default();
        for t in [5, 1, 9] {
            s.apply(&ev(t, &t.to_string(), &[]), i64::MAX, 3);
        }
        assert_eq!(s.slots.len(), 3);
        let slot_of_1 = s.head.history.iter().find(|r| r.time_ms == 1).unwrap().slot;
        // 7 evicts 1 (the oldest) and takes its slot.
        assert_eq!(
            s.apply(&ev(7, "7", &[]), i64::MAX, 3),
            HistoryWrite { freed: vec![], put: Some(slot_of_1) }
        );
        let times: Vec<_> = s.record().history.iter().map(|h| h.time_ms).collect();
        assert_eq!(times, [9, 7, 5]);
        // Older than everything kept: not stored at all.
        assert_eq!(s.apply(&ev(2, "old", &[]), i64::MAX, 3), HistoryWrite::default());
        assert!(s.record().history.iter().all(|h| h.event_id != "old"));
        assert_eq!(s.slots.len(), 3);
    }

    #[test]
    fn equal_times_put_the_later_applied_first() {
        let mut s = Stored::default();
        s.apply(&ev(5, "first", &[]), i64::MAX, 3);
        s.apply(&ev(5, "second", &[]), i64::MAX, 3);
        let ids: Vec<_> = s.record().history.iter().map(|h| h.event_id.clone()).collect();
        assert_eq!(ids, ["second", "first"]);
    }

    #[test]
    fn a_shorter_history_frees_the_oldest_slots() {
        let mut s = Stored::default();
        for t in 1..=5 {
            s.apply(&ev(t, &t.to_string(), &[]), i64::MAX, 5);
        }
        let slot_of_4 = s.head.history.iter().find(|r| r.time_ms == 4).unwrap().slot;
        // Down to 2 (5 and 4 stay), then 10 evicts 4 and takes its slot.
        let write = s.apply(&ev(10, "10", &[]), i64::MAX, 2);
        assert_eq!((write.freed.len(), write.put), (3, Some(slot_of_4)), "{write:?}");
        assert_eq!(s.slots.len(), 2);
        let times: Vec<_> = s.record().history.iter().map(|h| h.time_ms).collect();
        assert_eq!(times, [10, 5]);
        // No history at all.
        let write = s.apply(&ev(11, "11", &[("x", 1)]), i64::MAX, 0);
        assert_eq!((write.freed.len(), write.put), (2, None));
        assert!(s.slots.is_empty() && s.head.history.is_empty());
        assert_eq!(s.record().attrs["x"].value, Value::Int(1));
    }

    #[test]
    fn pruned_slots_are_reused_first() {
        let mut s = Stored::default();
        s.apply(&ev(100, "a", &[]), 150, 10);
        s.apply(&ev(110, "b", &[]), 1_000, 10);
        s.head.prune(150);
        assert_eq!(s.head.history.len(), 1);
        // "a"'s slot (0) is free again; its stale value is overwritten.
        assert_eq!(s.apply(&ev(120, "c", &[]), 1_000, 10).put, Some(0));
        let ids: Vec<_> = s.record().history.iter().map(|h| h.event_id.clone()).collect();
        assert_eq!(ids, ["c", "b"]);
    }

    #[test]
    fn assemble_leaves_out_missing_and_mismatched_events() {
        let mut s = Stored::default();
        s.apply(&ev(100, "a", &[]), 500, 10);
        s.apply(&ev(200, "b", &[]), 600, 10);
        let slot_a = s.head.history[1].slot;
        s.slots.remove(&slot_a);
        assert_eq!(s.record().history.len(), 1);
        s.slots.insert(slot_a, encode_history_event(&ev(999, "other", &[]), 500));
        assert_eq!(s.record().history.len(), 1);
    }

    #[test]
    fn prune_and_live_view_hide_expired_values() {
        let mut s = Stored::default();
        s.apply(&ev(100, "a", &[("x", 1)]), 200, 10);
        s.apply(&ev(150, "b", &[("y", 1)]), 250, 10);
        let r = s.record();
        let view = r.live_view(200, Some(100));
        assert!(!view.attrs.contains_key("x"), "expires exactly at 200");
        assert!(view.attrs.contains_key("y"));
        assert_eq!(view.history.len(), 1);
        // A shorter current TTL hides values sooner than their stored expiry,
        // and the reported expiry is the effective one.
        assert!(r.live_view(170, Some(10)).is_empty());
        assert_eq!(r.live_view(155, Some(10)).attrs["y"].expires_at, 160);
        s.head.prune(250);
        assert!(s.head.is_empty());
    }

    #[test]
    fn a_read_prunes_a_head_by_the_current_ttl_as_the_live_view_filters() {
        let mut s = Stored::default();
        s.apply(&ev(100, "a", &[("x", 1)]), 10_000, 10);
        s.apply(&ev(150, "b", &[("y", 1)]), 10_000, 10);
        let mut head = s.head.clone();
        head.prune(170);
        assert_eq!(head.history.len(), 2, "stored expiries: both live");
        let mut head = s.head.clone();
        head.prune_by_ttl(170, Some(50));
        assert_eq!(head.history.iter().map(|h| h.time_ms).collect::<Vec<_>>(), [150], "100 + 50 <= 170");
        assert_eq!(head.attrs.keys().collect::<Vec<_>>(), ["y"]);
        let view = s.record().live_view(170, Some(50));
        assert_eq!(view.history.len(), head.history.len());
        let mut head = s.head.clone();
        head.prune_by_ttl(170, None);
        assert_eq!(head.history.len(), 2, "no TTL: the stored expiries");
    }

    #[test]
    fn encodings_round_trip_with_expiry_header() {
        let mut s = Stored::default();
        s.apply(&ev(100, "a", &[("x", 1)]), 500, 10);
        s.apply(&ev(120, "b", &[("y", 1)]), 700, 10);
        let bytes = s.head.encode();
        assert_eq!(stored_expiry(&bytes), Some(700));
        assert_eq!(FamilyHead::decode(&bytes).unwrap(), s.head);
        let event = ev(120, "b", &[("y", 1)]);
        let stored = encode_history_event(&event, 700);
        assert_eq!(stored_expiry(&stored), Some(700));
        let entry = HistoryEntry {
            event_type: "view".into(),
            time_ms: 120,
            event_id: "b".into(),
            attrs: event.attrs.clone(),
            expires_at: 700,
        };
        assert_eq!(decode_history_event(&stored).unwrap(), entry);
        assert_eq!(stored[8], codec::ROW_V1);
        assert_eq!(
            &stored[9..],
            codec::encode_compact(&entry),
            "borrowed and owned encodings are the same bytes"
        );
    }

    #[test]
    fn rows_of_an_unknown_encoding_are_refused_not_misread() {
        let mut s = Stored::default();
        s.apply(&ev(100, "a", &[("x", 1)]), 500, 10);
        let mut head = s.head.encode();
        let mut event = encode_history_event(&ev(100, "a", &[("x", 1)]), 500);
        // As a later binary might write them: version 2, the expiry header kept.
        head[8] = 2;
        event[8] = 2;
        assert_eq!(stored_expiry(&head), Some(500));
        let e = FamilyHead::decode(&head).unwrap_err().to_string();
        assert!(e.contains("family head row in encoding version 2"), "{e}");
        let e = decode_history_event(&event).unwrap_err().to_string();
        assert!(e.contains("history event row in encoding version 2"), "{e}");
    }
}
