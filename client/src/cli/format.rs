//! Text formatting shared by the commands: timestamps, durations, values.

use portrait_client::portrait_proto::ValueKind;
use portrait_client::Value;

const MS_PER_DAY: i64 = 86_400_000;

/// Milliseconds since the epoch as RFC 3339 UTC, e.g.
/// `2023-11-14T22:13:20.000Z`; years outside 0000–9999 print as `<n>ms`.
pub fn timestamp(ms: i64) -> String {
    let (year, month, day) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    if !(0..=9999).contains(&year) {
        return format!("{ms}ms");
    }
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let (h, m, s, milli) = (in_day / 3_600_000, in_day / 60_000 % 60, in_day / 1000 % 60, in_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// An expiry time; 0 means the value never expires.
pub fn expiry(expires_at_ms: i64) -> String {
    if expires_at_ms == 0 {
        "never".to_string()
    } else {
        timestamp(expires_at_ms)
    }
}

/// A TTL in the largest unit that divides it exactly: `30d`, `90m`, `250ms`;
/// 0 is `never`.
pub fn ttl(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s")];
    if ms == 0 {
        return "never".to_string();
    }
    match UNITS.iter().find(|(unit, _)| ms.is_multiple_of(*unit)) {
        Some((unit, name)) => format!("{}{name}", ms / unit),
        None => format!("{ms}ms"),
    }
}

/// A value for people: strings quoted, doubles always with a fraction.
pub fn value(value: &Value) -> String {
    match &value.kind {
        Some(ValueKind::StringValue(s)) => format!("{s:?}"),
        Some(ValueKind::IntValue(i)) => i.to_string(),
        Some(ValueKind::DoubleValue(d)) => format!("{d:?}"),
        Some(ValueKind::BoolValue(b)) => b.to_string(),
        None => "null".to_string(),
    }
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
        assert_eq!(timestamp(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(timestamp(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(timestamp(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(timestamp(i64::MAX), format!("{}ms", i64::MAX));
        assert_eq!(timestamp(i64::MIN), format!("{}ms", i64::MIN));
    }

    #[test]
    fn expiry_zero_is_never() {
        assert_eq!(expiry(0), "never");
        assert_eq!(expiry(1000), "1970-01-01T00:00:01.000Z");
    }

    #[test]
    fn ttls_use_the_largest_exact_unit() {
        assert_eq!(ttl(0), "never");
        assert_eq!(ttl(30 * 86_400_000), "30d");
        assert_eq!(ttl(90 * 60_000), "90m");
        assert_eq!(ttl(1500), "1500ms");
    }

    #[test]
    fn values_for_people() {
        assert_eq!(value(&Value::string("a \"b\"")), r#""a \"b\"""#);
        assert_eq!(value(&Value::int(-2)), "-2");
        assert_eq!(value(&Value::double(399.0)), "399.0");
        assert_eq!(value(&Value::bool(true)), "true");
        assert_eq!(value(&Value { kind: None }), "null");
    }
}
