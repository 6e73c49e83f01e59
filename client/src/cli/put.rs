//! `portrait put --json ...`: one atomic write.

use anyhow::{anyhow, bail};
use portrait_client::{json, Event, WriteResponse};

pub async fn run(endpoint: &super::Target, text: &str) -> anyhow::Result<String> {
    let events = parse(text)?;
    let response = endpoint.connect().await?.write(events).await?;
    Ok(summary(&response))
}

/// One event object or an array of them.
fn parse(text: &str) -> anyhow::Result<Vec<Event>> {
    let value = json::parse_json(text).map_err(|e| anyhow!("invalid JSON: {e}"))?;
    let events = json::events_from_json(&value).map_err(|e| anyhow!(e))?;
    if events.is_empty() {
        bail!("no events to write");
    }
    Ok(events)
}

fn summary(r: &WriteResponse) -> String {
    format!(
        "applied={} duplicates={} expired={} log_index={}\n",
        r.applied, r.duplicates, r.expired, r.log_index
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_object_and_array() {
        let one = r#"{"user_id":"u1","family":"browse","type":"view"}"#;
        assert_eq!(parse(one).unwrap().len(), 1);
        assert_eq!(parse(&format!("[{one},{one}]")).unwrap().len(), 2);
    }

    #[test]
    fn reports_bad_input() {
        assert_eq!(parse("[]").unwrap_err().to_string(), "no events to write");
        assert!(parse("{").unwrap_err().to_string().starts_with("invalid JSON: "));
        assert_eq!(
            parse(r#"[{"user_id":"u1"}]"#).unwrap_err().to_string(),
            "events[0]: missing field `family`"
        );
    }

    #[test]
    fn summary_line() {
        let r = WriteResponse {
            applied: 2,
            duplicates: 1,
            expired: 0,
            log_index: 42,
            batches: 1,
            shards: vec![],
        };
        assert_eq!(summary(&r), "applied=2 duplicates=1 expired=0 log_index=42\n");
    }
}
