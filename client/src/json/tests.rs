use std::collections::HashMap;

use portrait_proto::v1::rule_value::Kind as RuleKind;
use portrait_proto::v1::{
    AttributeValue, CountMap, Event, FamilyData, HistoryEvent, Profile, RuleValue, TagValue, Value,
};
use serde_json::json;

use super::*;

fn sample() -> Json {
    json!({
        "user_id": "u1", "family": "browse", "type": "view",
        "event_time_ms": 1_700_000_000_000_i64, "event_id": "e1",
        "attrs": {"category": "phone", "price": 399.0, "qty": 2, "vip": true}
    })
}

#[test]
fn parses_every_field_and_attr_type() {
    let event = event_from_json(&sample()).unwrap();
    assert_eq!(event.user_id, "u1");
    assert_eq!(event.family, "browse");
    assert_eq!(event.r#type, "view");
    assert_eq!(event.event_time_ms, 1_700_000_000_000);
    assert_eq!(event.event_id, "e1");
    assert_eq!(event.attrs["category"], Value::string("phone"));
    assert_eq!(event.attrs["price"], Value::double(399.0));
    assert_eq!(event.attrs["qty"], Value::int(2));
    assert_eq!(event.attrs["vip"], Value::bool(true));
}

#[test]
fn json_round_trip() {
    let json = sample();
    assert_eq!(event_to_json(&event_from_json(&json).unwrap()), json);
}

#[test]
fn event_round_trip() {
    let event = Event {
        user_id: "u2".into(),
        family: "trade".into(),
        r#type: "order".into(),
        event_time_ms: -5,
        event_id: String::new(),
        attrs: HashMap::from([
            ("amount".into(), Value::double(-0.5)),
            ("n".into(), Value::int(i64::MIN)),
            ("big".into(), Value::int(i64::MAX)),
            ("note".into(), Value::string("")),
            ("paid".into(), Value::bool(false)),
        ]),
    };
    let text = event_to_json(&event).to_string();
    let back = event_from_json(&serde_json::from_str(&text).unwrap()).unwrap();
    assert_eq!(back, event);
}

#[test]
fn optional_fields_default() {
    let before = now_ms();
    let event = event_from_json(&json!({"user_id": "u1", "family": "social", "type": "follow"})).unwrap();
    assert!(event.event_time_ms >= before && event.event_time_ms <= now_ms());
    assert_eq!(event.event_id, "");
    assert!(event.attrs.is_empty());
    let nulls = json!({"user_id": "u1", "family": "f", "type": "t", "event_id": null, "attrs": null});
    assert_eq!(event_from_json(&nulls).unwrap().event_id, "");
}

#[test]
fn integral_double_stays_double_and_integer_stays_int() {
    let event = event_from_json(&json!({"user_id": "u", "family": "f", "type": "t",
        "attrs": {"a": 1.0, "b": 1, "c": -3, "d": 1e3}}))
    .unwrap();
    assert_eq!(event.attrs["a"], Value::double(1.0));
    assert_eq!(event.attrs["b"], Value::int(1));
    assert_eq!(event.attrs["c"], Value::int(-3));
    assert_eq!(event.attrs["d"], Value::double(1000.0));
}

fn err(json: Json) -> String {
    event_from_json(&json).unwrap_err()
}

#[test]
fn unsupported_attr_values_name_the_attribute() {
    let with = |v: Json| json!({"user_id": "u", "family": "f", "type": "t", "attrs": {"tags": v}});
    let hint = "is not supported (use a string, number or bool)";
    assert_eq!(err(with(Json::Null)), format!("attrs.tags: null {hint}"));
    assert_eq!(err(with(json!(["a"]))), format!("attrs.tags: an array {hint}"));
    assert_eq!(err(with(json!({"a": 1}))), format!("attrs.tags: an object {hint}"));
    assert_eq!(
        err(with(json!(u64::MAX))),
        "attrs.tags: integer 18446744073709551615 is out of range for int64"
    );
}

#[test]
fn malformed_events_are_named() {
    assert_eq!(err(json!([])), "event must be a JSON object");
    assert_eq!(err(json!({"family": "f", "type": "t"})), "missing field `user_id`");
    assert_eq!(err(json!({"user_id": 1, "family": "f", "type": "t"})), "field `user_id` must be a string");
    assert_eq!(
        err(json!({"user_id": "u", "family": "f", "type": "t", "event_time_ms": 1.5})),
        "field `event_time_ms` must be an integer (milliseconds since the Unix epoch)"
    );
    assert_eq!(
        err(json!({"user_id": "u", "family": "f", "type": "t", "attrs": [1]})),
        "field `attrs` must be an object"
    );
    assert_eq!(
        err(json!({"user_id": "u", "family": "f", "type": "t", "event_time": "2024-01-01T00:00:00Z"})),
        "unknown field `event_time` (expected one of user_id, family, type, event_time_ms, event_id, attrs)"
    );
}

#[test]
fn events_from_json_accepts_object_or_array() {
    assert_eq!(events_from_json(&sample()).unwrap().len(), 1);
    assert_eq!(events_from_json(&json!([sample(), sample()])).unwrap().len(), 2);
    assert!(events_from_json(&json!([])).unwrap().is_empty());
    let bad = json!([sample(), {"user_id": "u"}]);
    assert_eq!(events_from_json(&bad).unwrap_err(), "events[1]: missing field `family`");
}

#[test]
fn value_to_json_covers_every_kind() {
    assert_eq!(value_to_json(&Value::string("x")), json!("x"));
    assert_eq!(value_to_json(&Value::int(-7)), json!(-7));
    assert_eq!(value_to_json(&Value::double(2.5)), json!(2.5));
    assert_eq!(value_to_json(&Value::bool(true)), json!(true));
    assert_eq!(value_to_json(&Value::double(f64::NAN)), Json::Null);
    assert_eq!(value_to_json(&Value { kind: None }), Json::Null);
}

#[test]
fn values_round_trip_through_json() {
    for value in [Value::string("é\"\n"), Value::int(0), Value::double(0.1), Value::bool(false)] {
        assert_eq!(value_from_json("a", &value_to_json(&value)).unwrap(), value);
    }
}

#[test]
fn profile_to_json_shape() {
    let attr = AttributeValue { value: Some(Value::string("phone")), event_time_ms: 10, expires_at_ms: 0 };
    let history = HistoryEvent {
        r#type: "view".into(),
        event_time_ms: 10,
        event_id: "e1".into(),
        attrs: HashMap::from([("category".into(), Value::string("phone"))]),
        expires_at_ms: 99,
    };
    let family = FamilyData { attrs: HashMap::from([("category".into(), attr)]), history: vec![history] };
    let churn =
        TagValue { value: Some(RuleValue { kind: Some(RuleKind::BoolValue(true)) }), changed_at_ms: 7 };
    let cats = CountMap { counts: HashMap::from([("tv".into(), 2.0), ("phone".into(), 3.0)]) };
    let profile = Profile {
        user_id: "u1".into(),
        found: true,
        families: HashMap::from([("browse".into(), family)]),
        features: HashMap::from([
            ("views".into(), RuleValue { kind: Some(RuleKind::NumberValue(4.0)) }),
            ("cats".into(), RuleValue { kind: Some(RuleKind::MapValue(cats)) }),
            ("avg".into(), RuleValue { kind: None }),
        ]),
        tags: HashMap::from([("churn_risk".into(), churn)]),
    };
    let expected = json!({
        "user_id": "u1", "found": true,
        "families": {"browse": {
            "attrs": {"category": {"value": "phone", "event_time_ms": 10, "expires_at_ms": 0}},
            "history": [{"type": "view", "event_time_ms": 10, "event_id": "e1",
                         "attrs": {"category": "phone"}, "expires_at_ms": 99}]
        }},
        "features": {"views": 4.0, "cats": {"phone": 3.0, "tv": 2.0}, "avg": null},
        "tags": {"churn_risk": {"value": true, "changed_at_ms": 7}}
    });
    assert_eq!(profile_to_json(&profile), expected);
}

#[test]
fn missing_profile_is_empty() {
    let json = profile_to_json(&Profile { user_id: "nobody".into(), found: false, ..Default::default() });
    assert_eq!(
        json,
        json!({"user_id": "nobody", "found": false, "families": {}, "features": {}, "tags": {}})
    );
}

#[test]
fn an_integer_outside_64_bits_is_refused_not_rounded() {
    for (text, n) in [
        (r#"{"attrs":{"n":18446744073709551616}}"#, "18446744073709551616"),
        (r#"[1, {"a":"x\"1e999\"", "b":-9223372036854775809}]"#, "-9223372036854775809"),
        (r#"123456789012345678901234567890"#, "123456789012345678901234567890"),
    ] {
        let e = parse_json(text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("integer {n} is out of the 64-bit range")), "{text}: {e}");
    }
    // In range, a double, or inside a string: read as before.
    let text = r#"{"a":18446744073709551615,"b":-9223372036854775808,"c":1e30,"d":-2.5e-3,"e":"99999999999999999999","f":0}"#;
    assert_eq!(parse_json(text).unwrap(), serde_json::from_str::<Json>(text).unwrap());
}

#[test]
fn a_key_twice_in_an_object_is_refused_at_any_depth() {
    let twice = r#"{"user_id":"alice","family":"browse","type":"view","user_id":"bob"}"#;
    let e = parse_json(twice).unwrap_err().to_string();
    assert!(e.starts_with("duplicate key `user_id`"), "{e}");
    let nested = r#"[{"user_id":"a","family":"browse","type":"view","attrs":{"price":1,"price":2}}]"#;
    assert!(parse_json(nested).unwrap_err().to_string().starts_with("duplicate key `price`"));
    // Anything else reads as serde_json reads it.
    let text = r#"[{"a":1,"b":-2,"c":2.0,"d":"x","e":[true,null],"f":{"g":18446744073709551615}}]"#;
    assert_eq!(parse_json(text).unwrap(), serde_json::from_str::<Json>(text).unwrap());
    assert_eq!(parse_json(&sample().to_string()).unwrap(), sample());
}
