//! Conversions between wire (`portrait.v1`) and domain types.

use portrait_proto::v1 as pb;
use portrait_proto::ValueKind;

use crate::engine::expr::Val;
use crate::error::{Error, Result};
use crate::model::{Event, Value};
use crate::node::{Consistency, ReadInfo};
use crate::schema::FamilySpec;
use crate::store::read::ProfileView;
use crate::store::record::FamilyRecord;

/// Expiry on the wire: 0 = never.
fn wire_expiry(expires_at: i64) -> i64 {
    if expires_at == crate::model::NEVER {
        0
    } else {
        expires_at
    }
}

pub fn value_from_pb(v: pb::Value) -> Result<Value, String> {
    match v.kind {
        Some(ValueKind::StringValue(s)) => Ok(Value::Str(s)),
        Some(ValueKind::IntValue(i)) => Ok(Value::Int(i)),
        Some(ValueKind::DoubleValue(d)) => Ok(Value::Float(d)),
        Some(ValueKind::BoolValue(b)) => Ok(Value::Bool(b)),
        None => Err("value has no kind set (string, int, double or bool)".into()),
    }
}

pub fn value_to_pb(v: &Value) -> pb::Value {
    match v {
        Value::Str(s) => pb::Value::string(s.clone()),
        Value::Int(i) => pb::Value::int(*i),
        Value::Float(f) => pb::Value::double(*f),
        Value::Bool(b) => pb::Value::bool(*b),
    }
}

/// Converts a request's events; errors name `events[i].attrs.NAME`.
pub fn events_from_pb(events: Vec<pb::Event>) -> Result<Vec<Event>> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| event_from_pb(e).map_err(|e| e.within(&format!("events[{i}]"))))
        .collect()
}

fn event_from_pb(e: pb::Event) -> Result<Event> {
    let mut attrs = crate::model::Attrs::new();
    for (name, value) in e.attrs {
        let value = value_from_pb(value).map_err(|reason| {
            Error::invalid(format!("attrs.{}", portrait_core::validate::shown_name(&name)), reason)
        })?;
        attrs.insert(name, value);
    }
    Ok(Event {
        user_id: e.user_id,
        family: e.family,
        event_type: e.r#type,
        time_ms: e.event_time_ms,
        event_id: e.event_id,
        attrs,
    })
}

pub fn consistency_from_pb(c: i32) -> Result<Consistency> {
    match pb::Consistency::try_from(c) {
        Ok(pb::Consistency::Unspecified | pb::Consistency::Local) => Ok(Consistency::Local),
        Ok(pb::Consistency::Linearizable) => Ok(Consistency::Linearizable),
        Err(_) => Err(Error::invalid("consistency", format!("unknown value {c}"))),
    }
}

pub fn profile_to_pb(user_id: String, view: ProfileView) -> pb::Profile {
    pb::Profile {
        user_id,
        found: view.found,
        families: view.families.into_iter().map(|(name, rec)| (name, family_to_pb(rec))).collect(),
        features: view.features.into_iter().map(|(name, v)| (name, rule_value_to_pb(v))).collect(),
        tags: view
            .tags
            .into_iter()
            .map(|(name, t)| {
                (name, pb::TagValue { value: Some(rule_value_to_pb(t.value)), changed_at_ms: t.changed_at })
            })
            .collect(),
    }
}

pub fn rule_value_to_pb(v: Val) -> pb::RuleValue {
    use pb::rule_value::Kind;
    let kind = match v {
        Val::Null => None,
        Val::Bool(b) => Some(Kind::BoolValue(b)),
        Val::Num(n) => Some(Kind::NumberValue(n)),
        Val::Str(s) => Some(Kind::StringValue(s)),
        Val::Set(s) => Some(Kind::SetValue(pb::StringSet { values: s.into_iter().collect() })),
        Val::Map(m) => Some(Kind::MapValue(pb::CountMap { counts: m.into_iter().collect() })),
    };
    pb::RuleValue { kind }
}

fn family_to_pb(rec: FamilyRecord) -> pb::FamilyData {
    let attrs = rec
        .attrs
        .into_iter()
        .map(|(name, cell)| {
            let value = pb::AttributeValue {
                value: Some(value_to_pb(&cell.value)),
                event_time_ms: cell.time_ms,
                expires_at_ms: wire_expiry(cell.expires_at),
            };
            (name, value)
        })
        .collect();
    let history = rec
        .history
        .into_iter()
        .map(|h| pb::HistoryEvent {
            r#type: h.event_type,
            event_time_ms: h.time_ms,
            event_id: h.event_id,
            attrs: h.attrs.iter().map(|(k, v)| (k.clone(), value_to_pb(v))).collect(),
            expires_at_ms: wire_expiry(h.expires_at),
        })
        .collect();
    pb::FamilyData { attrs, history }
}

pub fn read_info_to_pb(info: ReadInfo) -> pb::ReadInfo {
    pb::ReadInfo {
        node_id: info.node_id,
        applied_index: info.applied_index,
        as_of_ms: info.as_of_ms,
        lag_entries: info.freshness.lag_entries,
        leader_contact_age_ms: info.freshness.leader_contact_age.map(|d| d.as_millis() as u64),
        shard: info.shard,
    }
}

pub fn families_to_pb<'a>(
    families: impl Iterator<Item = (&'a String, &'a FamilySpec)>,
) -> Vec<pb::FamilySpec> {
    families
        .map(|(name, spec)| pb::FamilySpec {
            name: name.clone(),
            ttl_ms: spec.ttl_ms.unwrap_or(0) as u64,
            history_len: spec.history_len,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::state::TagState;
    use prost::Message;

    #[test]
    fn a_views_counted_bytes_cover_its_profile_message_with_the_longest_user_id() {
        // What a batch read counts against the response limit must be at
        // least what the response then takes, envelope included.
        let user_id = "u".repeat(crate::limits::MAX_USER_ID_BYTES);
        let mut full = ProfileView { found: true, ..Default::default() };
        full.features.insert("spend_30d".into(), Val::Num(12.5));
        full.features.insert("cats".into(), Val::Set(["a".to_string(), "bb".to_string()].into()));
        full.tags.insert(
            "vip".into(),
            TagState { value: Val::Bool(true), changed_at: 1_760_000_000_000, next_change: None },
        );
        for view in [ProfileView::default(), ProfileView { found: true, ..Default::default() }, full] {
            let counted = view.approx_bytes();
            // Inside a repeated field: its tag and length prefix too.
            let sent = profile_to_pb(user_id.clone(), view).encoded_len() + 4;
            assert!(sent <= counted, "{sent} bytes sent, {counted} counted");
        }
    }
}
