//! Conversions between JSON and the wire types, for the CLI and for callers
//! that ingest JSON events.
//!
//! An event is a JSON object:
//! `{"user_id":"u1","family":"browse","type":"view","event_time_ms":1700000000000,
//!   "event_id":"e1","attrs":{"category":"phone","price":399.0,"qty":2,"vip":true}}`.
//! `user_id`, `family` and `type` are required; `event_time_ms` defaults to
//! now, `event_id` to `""` (never deduplicated), `attrs` to none. Unknown keys,
//! and a key given twice in one object ([`parse_json`]), are rejected so that
//! typos do not silently drop data. Attribute values map
//! JSON string → string, integer → int, other number → double, bool → bool.

use std::time::{SystemTime, UNIX_EPOCH};

use portrait_proto::v1::rule_value::Kind as RuleKind;
use portrait_proto::v1::{AttributeValue, Event, FamilyData, HistoryEvent, Profile, RuleValue, Value};
use portrait_proto::ValueKind;
use serde_json::{json, Map, Value as Json};

const FIELDS: &[&str] = &["user_id", "family", "type", "event_time_ms", "event_id", "attrs"];

/// Parses JSON text like `serde_json::from_str`, but refuses an object that
/// has a key twice (serde_json keeps the last one silently: a repeated
/// `user_id` would write to another user, a repeated attribute lose a
/// value), and an integer outside the 64-bit range (serde_json reads it as
/// a double, silently rounded).
pub fn parse_json(text: &str) -> Result<Json, serde_json::Error> {
    let value = serde_json::from_str::<Strict>(text).map(|s| s.0)?;
    if let Some(n) = integer_out_of_range(text) {
        return Err(serde::de::Error::custom(format!(
            "integer {n} is out of the 64-bit range (write a string, or a double with a fraction or an \
             exponent)"
        )));
    }
    Ok(value)
}

/// The first integer literal of valid JSON `text` (no fraction, no
/// exponent) that is neither an `i64` nor a `u64`.
fn integer_out_of_range(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        match (in_string, bytes[i]) {
            (true, b'\\') => i += 1,
            (true, b'"') | (false, b'"') => in_string = !in_string,
            (false, b'-' | b'0'..=b'9') => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    i += 1;
                }
                let token = &text[start..i];
                let integer = !token.contains(['.', 'e', 'E']);
                if integer && token.parse::<i64>().is_err() && token.parse::<u64>().is_err() {
                    return Some(token);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// A JSON value whose objects have no key twice ([`parse_json`]).
struct Strict(Json);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
        Ok(Json::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
        Ok(Json::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
        Ok(Json::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Json, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Json, E> {
        Ok(Json::String(s.to_string()))
    }
    fn visit_string<E>(self, s: String) -> Result<Json, E> {
        Ok(Json::String(s))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if obj.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
            }
            let Strict(value) = map.next_value()?;
            obj.insert(key, value);
        }
        Ok(Json::Object(obj))
    }
}

/// Converts one JSON event object; the error names the offending field.
pub fn event_from_json(json: &Json) -> Result<Event, String> {
    let obj = json.as_object().ok_or("event must be a JSON object")?;
    if let Some(key) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("unknown field `{key}` (expected one of {})", FIELDS.join(", ")));
    }
    Ok(Event {
        user_id: required_str(obj, "user_id")?,
        family: required_str(obj, "family")?,
        r#type: required_str(obj, "type")?,
        event_time_ms: event_time_ms(obj)?,
        event_id: optional_str(obj, "event_id")?.unwrap_or_default(),
        attrs: attrs_from_json(obj.get("attrs"))?,
    })
}

/// Converts one event object or an array of them; errors in an array are
/// prefixed with the element's position, e.g. `events[2]: missing field ...`.
pub fn events_from_json(json: &Json) -> Result<Vec<Event>, String> {
    match json {
        Json::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| event_from_json(item).map_err(|e| format!("events[{i}]: {e}")))
            .collect(),
        other => Ok(vec![event_from_json(other)?]),
    }
}

/// The inverse of [`event_from_json`] (always writes every field).
pub fn event_to_json(event: &Event) -> Json {
    json!({
        "user_id": event.user_id,
        "family": event.family,
        "type": event.r#type,
        "event_time_ms": event.event_time_ms,
        "event_id": event.event_id,
        "attrs": attrs_to_json(&event.attrs),
    })
}

/// Converts one attribute value; `name` only appears in the error.
pub fn value_from_json(name: &str, json: &Json) -> Result<Value, String> {
    let unsupported =
        |what: &str| format!("attrs.{name}: {what} is not supported (use a string, number or bool)");
    match json {
        Json::String(s) => Ok(Value::string(s.as_str())),
        Json::Bool(b) => Ok(Value::bool(*b)),
        Json::Number(n) if n.is_i64() => Ok(Value::int(n.as_i64().unwrap_or_default())),
        Json::Number(n) if n.is_u64() => Err(format!("attrs.{name}: integer {n} is out of range for int64")),
        Json::Number(n) => n.as_f64().map(Value::double).ok_or_else(|| unsupported("this number")),
        Json::Null => Err(unsupported("null")),
        Json::Array(_) => Err(unsupported("an array")),
        Json::Object(_) => Err(unsupported("an object")),
    }
}

/// A wire value as JSON: string, number or bool; `null` when unset or when a
/// double is not finite (JSON has no NaN or infinity).
pub fn value_to_json(value: &Value) -> Json {
    match &value.kind {
        Some(ValueKind::StringValue(s)) => Json::from(s.as_str()),
        Some(ValueKind::IntValue(i)) => Json::from(*i),
        Some(ValueKind::DoubleValue(d)) => serde_json::Number::from_f64(*d).map_or(Json::Null, Json::Number),
        Some(ValueKind::BoolValue(b)) => Json::from(*b),
        None => Json::Null,
    }
}

/// A profile as JSON: `{user_id, found, families: {name: {attrs: {attr:
/// {value, event_time_ms, expires_at_ms}}, history: [...]}}}`; maps are sorted
/// by key, history stays newest first.
pub fn profile_to_json(profile: &Profile) -> Json {
    let families: Map<String, Json> =
        profile.families.iter().map(|(name, data)| (name.clone(), family_to_json(data))).collect();
    let features: Map<String, Json> =
        profile.features.iter().map(|(name, v)| (name.clone(), rule_value_to_json(v))).collect();
    let tags: Map<String, Json> = profile
        .tags
        .iter()
        .map(|(name, t)| {
            let value = t.value.as_ref().map_or(Json::Null, rule_value_to_json);
            (name.clone(), json!({ "value": value, "changed_at_ms": t.changed_at_ms }))
        })
        .collect();
    json!({ "user_id": profile.user_id, "found": profile.found, "families": families, "features": features, "tags": tags })
}

/// A feature or tag value as JSON: null, number, string, bool, array (set)
/// or object (counts per value).
pub fn rule_value_to_json(v: &RuleValue) -> Json {
    match &v.kind {
        None => Json::Null,
        Some(RuleKind::StringValue(s)) => json!(s),
        Some(RuleKind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Some(RuleKind::BoolValue(b)) => json!(b),
        Some(RuleKind::SetValue(s)) => json!(s.values),
        Some(RuleKind::MapValue(m)) => {
            let mut entries: Vec<_> = m.counts.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Json::Object(entries.into_iter().map(|(k, n)| (k.clone(), json!(n))).collect())
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

fn family_to_json(data: &FamilyData) -> Json {
    let attrs: Map<String, Json> =
        data.attrs.iter().map(|(name, attr)| (name.clone(), attribute_to_json(attr))).collect();
    let history: Vec<Json> = data.history.iter().map(history_to_json).collect();
    json!({ "attrs": attrs, "history": history })
}

fn attribute_to_json(attr: &AttributeValue) -> Json {
    json!({
        "value": attr.value.as_ref().map_or(Json::Null, value_to_json),
        "event_time_ms": attr.event_time_ms,
        "expires_at_ms": attr.expires_at_ms,
    })
}

fn history_to_json(event: &HistoryEvent) -> Json {
    json!({
        "type": event.r#type,
        "event_time_ms": event.event_time_ms,
        "event_id": event.event_id,
        "attrs": attrs_to_json(&event.attrs),
        "expires_at_ms": event.expires_at_ms,
    })
}

fn attrs_to_json<'a>(attrs: impl IntoIterator<Item = (&'a String, &'a Value)>) -> Json {
    Json::Object(attrs.into_iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect())
}

fn attrs_from_json(json: Option<&Json>) -> Result<std::collections::HashMap<String, Value>, String> {
    match json {
        None | Some(Json::Null) => Ok(Default::default()),
        Some(Json::Object(attrs)) => {
            attrs.iter().map(|(name, v)| Ok((name.clone(), value_from_json(name, v)?))).collect()
        }
        Some(_) => Err("field `attrs` must be an object".into()),
    }
}

fn event_time_ms(obj: &Map<String, Json>) -> Result<i64, String> {
    match obj.get("event_time_ms") {
        None | Some(Json::Null) => Ok(now_ms()),
        Some(v) => v.as_i64().ok_or_else(|| {
            "field `event_time_ms` must be an integer (milliseconds since the Unix epoch)".into()
        }),
    }
}

fn required_str(obj: &Map<String, Json>, key: &str) -> Result<String, String> {
    optional_str(obj, key)?.ok_or_else(|| format!("missing field `{key}`"))
}

fn optional_str(obj: &Map<String, Json>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("field `{key}` must be a string")),
    }
}

#[cfg(test)]
mod tests;
