//! Validation of incoming events against the limits and the schema. Runs on
//! the node that receives the request (with its clock, for the future-skew
//! check) and again at apply against the schema in force (without clock
//! checks, so apply stays deterministic).

use crate::error::Invalid;
use crate::limits::*;
use crate::model::{Event, Value};
use crate::schema::Schema;

type Result<T, E = Invalid> = std::result::Result<T, E>;

/// Checks a whole request; the first error names `events[i].field`.
pub fn validate_request(events: &[Event], schema: &Schema, now_ms: Option<i64>) -> Result<()> {
    if events.is_empty() {
        return Err(Invalid::new("events", "must not be empty"));
    }
    if events.len() > MAX_EVENTS_PER_REQUEST {
        return Err(Invalid::new(
            "events",
            format!("{} events is over the limit of {MAX_EVENTS_PER_REQUEST} per request", events.len()),
        ));
    }
    for (i, event) in events.iter().enumerate() {
        validate_event(event, schema, now_ms).map_err(|e| e.within(&format!("events[{i}]")))?;
    }
    Ok(())
}

/// Checks one event. `now_ms` enables the clock checks (ingress only).
pub fn validate_event(event: &Event, schema: &Schema, now_ms: Option<i64>) -> Result<()> {
    validate_user_id(&event.user_id)?;
    if schema.family(&event.family).is_none() {
        let reason =
            format!("unknown family {} (schema has: {})", shown(&event.family), schema.family_list());
        return Err(Invalid::new("family", reason));
    }
    check_len(|| "type", &event.event_type, MAX_EVENT_TYPE_BYTES)?;
    check_len(|| "event_id", &event.event_id, MAX_EVENT_ID_BYTES)?;
    if event.time_ms <= 0 {
        return Err(Invalid::new("event_time_ms", "required: milliseconds since the Unix epoch"));
    }
    if event.time_ms < MIN_EVENT_TIME_MS {
        return Err(Invalid::new("event_time_ms", format!("{} is before 2000-01-01", event.time_ms)));
    }
    if let Some(now) = now_ms {
        if event.time_ms > now.saturating_add(MAX_FUTURE_SKEW_MS) {
            let ahead = event.time_ms - now;
            let reason =
                format!("{ahead} ms in the future; at most {MAX_FUTURE_SKEW_MS} ms ahead is accepted");
            return Err(Invalid::new("event_time_ms", reason));
        }
    }
    validate_attrs(event)?;
    match now_ms {
        Some(_) => check_magnitudes(event),
        None => Ok(()),
    }
}

/// Doubles within [`MAX_DOUBLE_MAGNITUDE`] (an ingress check).
fn check_magnitudes(event: &Event) -> Result<()> {
    for (name, value) in &event.attrs {
        if let Value::Float(f) = value {
            if f.abs() > MAX_DOUBLE_MAGNITUDE {
                let reason = format!("{f:e} is beyond the limit of ±2^63 for a double");
                return Err(Invalid::new(format!("attrs.{}", shown_name(name)), reason));
            }
        }
    }
    Ok(())
}

/// A user id: 1..=256 bytes, no control characters.
pub fn validate_user_id(user_id: &str) -> Result<()> {
    if user_id.is_empty() {
        return Err(Invalid::new("user_id", "must not be empty"));
    }
    check_len(|| "user_id", user_id, MAX_USER_ID_BYTES)?;
    if user_id.chars().any(char::is_control) {
        return Err(Invalid::new("user_id", "must not contain control characters"));
    }
    Ok(())
}

fn validate_attrs(event: &Event) -> Result<()> {
    if event.attrs.len() > MAX_ATTRS_PER_EVENT {
        let reason = format!("{} attributes is over the limit of {MAX_ATTRS_PER_EVENT}", event.attrs.len());
        return Err(Invalid::new("attrs", reason));
    }
    for (name, value) in &event.attrs {
        if name.is_empty() {
            return Err(Invalid::new("attrs", "attribute names must not be empty"));
        }
        // The field path is built only for an error: this runs for every
        // attribute of every event, twice (at the API and at apply).
        let field = || format!("attrs.{}", shown_name(name));
        check_len(field, name, MAX_ATTR_NAME_BYTES)?;
        match value {
            Value::Str(s) => check_len(field, s, MAX_STRING_VALUE_BYTES)?,
            Value::Float(f) if !f.is_finite() => {
                return Err(Invalid::new(field(), "must be a finite number"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Bytes of a caller's text an error message repeats: the message
/// travels in the `grpc-message` header, which clients cap (hyper: 16 KiB
/// of headers), so an error about a 20 KB name must not be 20 KB long.
pub const SHOWN_BYTES: usize = 64;

/// Bytes of a list of names (e.g. the schema's families) an error message
/// repeats.
pub const LISTED_BYTES: usize = 1024;

/// `text` cut after [`SHOWN_BYTES`] (at a character boundary), with its
/// length when longer.
fn cut(text: &str) -> Option<(&str, usize)> {
    if text.len() <= SHOWN_BYTES {
        return None;
    }
    let mut end = SHOWN_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some((&text[..end], text.len()))
}

/// `text` as an error message repeats it: quoted, cut after
/// [`SHOWN_BYTES`] with its length when longer.
pub fn shown(text: &str) -> String {
    match cut(text) {
        None => format!("{text:?}"),
        Some((head, len)) => format!("{head:?}… ({len} bytes)"),
    }
}

/// A name as a field path repeats it (`attrs.<name>`): as is, cut after
/// [`SHOWN_BYTES`] with its length when longer.
pub fn shown_name(name: &str) -> String {
    match cut(name) {
        None => name.to_string(),
        Some((head, len)) => format!("{head}…({len} bytes)"),
    }
}

/// `names` joined with ", " for an error message, cut after about
/// [`LISTED_BYTES`] with the count of those left out.
pub fn listed<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    let mut left_out = 0usize;
    for name in names {
        if left_out > 0 || out.len() + name.len() > LISTED_BYTES {
            left_out += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(name);
    }
    if left_out > 0 {
        out.push_str(&format!(", … and {left_out} more"));
    }
    out
}

fn check_len<F: Into<String>>(field: impl FnOnce() -> F, text: &str, max: usize) -> Result<()> {
    if text.len() > max {
        return Err(Invalid::new(field(), format!("{} bytes is over the limit of {max}", text.len())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Attrs;

    const NOW: i64 = 1_750_000_000_000;

    #[test]
    fn error_messages_repeat_at_most_a_bounded_part_of_the_input() {
        assert_eq!(shown("price"), "\"price\"");
        assert_eq!(shown_name("price"), "price");
        let long = "é".repeat(10_000);
        let s = shown(&long);
        assert!(s.len() < SHOWN_BYTES + 32 && s.ends_with("(20000 bytes)"), "{s}");
        let names: Vec<String> = (0..1000).map(|i| format!("family_{i}")).collect();
        let l = listed(names.iter().map(String::as_str));
        assert!(l.len() < LISTED_BYTES + 32 && l.ends_with("more"), "{l}");
        assert_eq!(listed(["a", "b"]), "a, b");

        let schema = Schema::default_schema();
        let event = Event { user_id: "u1".into(), family: "f".repeat(100_000), ..Event::bare() };
        let e = validate_event(&event, &schema, None).unwrap_err();
        assert!(e.reason.len() < 2 * LISTED_BYTES, "{}", e.reason);
        let mut event = Event { user_id: "u1".into(), family: "trade".into(), time_ms: NOW, ..Event::bare() };
        event.attrs.insert("a".repeat(100_000), Value::Int(1));
        let e = validate_event(&event, &schema, None).unwrap_err();
        assert!(e.field.starts_with("attrs.") && e.field.len() < 2 * SHOWN_BYTES, "{}", e.field);
    }

    fn event() -> Event {
        Event {
            user_id: "u1".into(),
            family: "browse".into(),
            event_type: "view".into(),
            time_ms: NOW - 1000,
            event_id: "e1".into(),
            attrs: Attrs::from([("category".into(), Value::Str("phone".into()))]),
        }
    }

    fn err(e: Event) -> String {
        validate_request(&[event(), e], &Schema::default_schema(), Some(NOW)).unwrap_err().to_string()
    }

    #[test]
    fn a_double_beyond_the_int64_range_is_refused_at_ingress_only() {
        let with = |f: f64| Event { attrs: Attrs::from([("amount".into(), Value::Float(f))]), ..event() };
        assert_eq!(
            err(with(1e308)),
            "events[1].attrs.amount: 1e308 is beyond the limit of ±2^63 for a double"
        );
        assert!(err(with(-1e19)).starts_with("events[1].attrs.amount: -1e19 is beyond"));
        let schema = Schema::default_schema();
        validate_request(&[with(MAX_DOUBLE_MAGNITUDE), with(-MAX_DOUBLE_MAGNITUDE)], &schema, Some(NOW))
            .unwrap();
        assert_eq!(err(with(f64::INFINITY)), "events[1].attrs.amount: must be a finite number");
        // Apply (no clock) takes what an older version accepted.
        validate_request(&[with(1e308)], &schema, None).unwrap();
    }

    #[test]
    fn accepts_a_good_event() {
        validate_request(&[event()], &Schema::default_schema(), Some(NOW)).unwrap();
    }

    #[test]
    fn names_field_and_limit() {
        assert_eq!(err(Event { user_id: "".into(), ..event() }), "events[1].user_id: must not be empty");
        assert!(err(Event { user_id: "x".repeat(300), ..event() }).contains("over the limit of 256"));
        assert!(err(Event { family: "nope".into(), ..event() })
            .starts_with("events[1].family: unknown family \"nope\""));
        assert!(err(Event { time_ms: 0, ..event() }).starts_with("events[1].event_time_ms: required"));
        assert!(err(Event { time_ms: NOW + 3_600_000, ..event() }).contains("in the future"));
        assert!(err(Event { time_ms: 5, ..event() }).contains("before 2000"));
        let many: Attrs = (0..65).map(|i| (format!("a{i}"), Value::Int(i))).collect();
        assert!(err(Event { attrs: many, ..event() }).starts_with("events[1].attrs: 65 attributes"));
        let nan = Attrs::from([("p".into(), Value::Float(f64::NAN))]);
        assert_eq!(err(Event { attrs: nan, ..event() }), "events[1].attrs.p: must be a finite number");
    }

    #[test]
    fn empty_and_oversized_requests() {
        let schema = Schema::default_schema();
        assert_eq!(
            validate_request(&[], &schema, None).unwrap_err().to_string(),
            "events: must not be empty"
        );
        let many = vec![event(); MAX_EVENTS_PER_REQUEST + 1];
        assert!(validate_request(&many, &schema, None).unwrap_err().to_string().contains("over the limit"));
    }

    #[test]
    fn apply_time_validation_skips_clock_checks() {
        let future = Event { time_ms: NOW + 3_600_000, ..event() };
        validate_request(&[future], &Schema::default_schema(), None).unwrap();
    }
}
