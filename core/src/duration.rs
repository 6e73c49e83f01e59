//! Durations in schema files: `500ms`, `30s`, `15m`, `12h`, `90d`, `2w`,
//! `13mo` (a month is 30 days), `2y` (a year is 365 days).
//!
//! Fixed-length months and years keep window arithmetic deterministic and
//! independent of time zones and calendars.

pub const SECOND_MS: i64 = 1_000;
pub const MINUTE_MS: i64 = 60 * SECOND_MS;
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
pub const DAY_MS: i64 = 24 * HOUR_MS;
pub const MONTH_MS: i64 = 30 * DAY_MS;
pub const YEAR_MS: i64 = 365 * DAY_MS;

/// Parses a duration such as `90d` into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let text = text.trim();
    // Repeated in errors cut short: a schema value may be long.
    let shown = crate::validate::shown(text);
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("invalid duration {shown}: expected a number followed by a unit, e.g. \"90d\""));
    }
    let n: i64 = digits.parse().map_err(|_| format!("invalid duration {shown}: number too large"))?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => SECOND_MS,
        "m" | "min" => MINUTE_MS,
        "h" => HOUR_MS,
        "d" => DAY_MS,
        "w" => 7 * DAY_MS,
        "mo" => MONTH_MS,
        "y" => YEAR_MS,
        _ => {
            return Err(format!(
                "invalid duration {shown}: unknown unit {} (use ms, s, m, h, d, w, mo, y)",
                crate::validate::shown(unit)
            ))
        }
    };
    n.checked_mul(unit_ms).ok_or_else(|| format!("invalid duration {shown}: too large"))
}

/// Formats milliseconds with the largest unit that divides them exactly.
pub fn format_duration_ms(ms: i64) -> String {
    const UNITS: [(i64, &str); 7] = [
        (YEAR_MS, "y"),
        (MONTH_MS, "mo"),
        (7 * DAY_MS, "w"),
        (DAY_MS, "d"),
        (HOUR_MS, "h"),
        (MINUTE_MS, "m"),
        (SECOND_MS, "s"),
    ];
    for (unit, name) in UNITS {
        if ms != 0 && ms % unit == 0 {
            return format!("{}{name}", ms / unit);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("15m"), Ok(15 * MINUTE_MS));
        assert_eq!(parse_duration_ms("15min"), Ok(15 * MINUTE_MS));
        assert_eq!(parse_duration_ms("12h"), Ok(12 * HOUR_MS));
        assert_eq!(parse_duration_ms("90d"), Ok(90 * DAY_MS));
        assert_eq!(parse_duration_ms("2w"), Ok(14 * DAY_MS));
        assert_eq!(parse_duration_ms("13mo"), Ok(390 * DAY_MS));
        assert_eq!(parse_duration_ms("2y"), Ok(730 * DAY_MS));
    }

    #[test]
    fn rejects_bad_input_with_reason() {
        assert!(parse_duration_ms("d").unwrap_err().contains("expected a number"));
        assert!(parse_duration_ms("10 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_duration_ms("99999999999999999999d").unwrap_err().contains("too large"));
        assert!(parse_duration_ms("9999999999999999y").unwrap_err().contains("too large"));
    }

    #[test]
    fn formats_round_trip() {
        for text in ["90d", "2y", "13mo", "2w", "12h", "15m", "30s", "250ms"] {
            let ms = parse_duration_ms(text).unwrap();
            assert_eq!(parse_duration_ms(&format_duration_ms(ms)), Ok(ms), "{text}");
        }
        assert_eq!(format_duration_ms(parse_duration_ms("13mo").unwrap()), "13mo");
        assert_eq!(format_duration_ms(1_500), "1500ms");
    }
}
