//! Splits JSON lines into batches of events. Blank lines are skipped; the
//! first bad line ends the iteration with an error naming it, and the batch
//! it would have joined is dropped, so nothing of that batch is sent.
//! A batch ends at its event count, or once its events' encoded size
//! reaches [`MAX_BATCH_BYTES`], whichever comes first.

use std::io::{BufRead, Read};

use portrait_client::{json, ClientError, Event};

/// A batch ends once its events' encoded size reaches this: half the
/// 16 MiB a node accepts in one request, so that the event that passes it
/// (at most about 270 KB: 64 attributes of 4 KiB) still fits.
pub const MAX_BATCH_BYTES: usize = 8 << 20;

/// The longest input line read: one event, whose largest (64 attributes
/// of 4 KiB) is about 270 KB encoded and about 1.6 MB as JSON with every
/// character escaped (`\u00XX`). A longer line (a whole JSON array on one
/// line, a binary file) is refused as soon as it passes this, not read
/// whole.
pub const MAX_LINE_BYTES: u64 = 4 << 20;

/// Events to send in one write, and the input bytes they came from.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub bytes: u64,
    /// The input lines it covers (blank ones included), 1-based.
    pub first_line: usize,
    pub last_line: usize,
    /// The line of each event.
    pub lines: Vec<usize>,
}

pub struct Batches<R> {
    reader: R,
    size: usize,
    line: usize,
    done: bool,
}

impl<R: BufRead> Batches<R> {
    pub fn new(reader: R, size: usize) -> Self {
        Self { reader, size: size.max(1), line: 0, done: false }
    }

    fn fill(&mut self) -> Result<Batch, ClientError> {
        let mut batch = Batch { first_line: self.line + 1, ..Batch::default() };
        let mut buf = Vec::new();
        let mut encoded = 0;
        while batch.events.len() < self.size && encoded < MAX_BATCH_BYTES {
            buf.clear();
            let read = (&mut self.reader).take(MAX_LINE_BYTES + 1).read_until(b'\n', &mut buf)?;
            if read == 0 {
                self.done = true;
                break;
            }
            self.line += 1;
            if read as u64 > MAX_LINE_BYTES {
                let reason = format!("longer than {MAX_LINE_BYTES} bytes (one event per line)");
                return Err(ClientError::Json { line: self.line, reason });
            }
            batch.bytes += read as u64;
            let parsed = parse_line(&buf).map_err(|reason| ClientError::Json { line: self.line, reason })?;
            if let Some(event) = parsed {
                // The event's bytes in the request, its field tag and length included.
                encoded += prost::Message::encoded_len(&event) + 8;
                batch.events.push(event);
                batch.lines.push(self.line);
            }
        }
        batch.last_line = self.line;
        Ok(batch)
    }
}

impl<R: BufRead> Iterator for Batches<R> {
    type Item = Result<Batch, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.fill() {
            Ok(batch) if batch.events.is_empty() => None,
            Ok(batch) => Some(Ok(batch)),
            Err(err) => {
                self.done = true;
                Some(Err(err))
            }
        }
    }
}

/// One line: `None` when blank, else its event.
fn parse_line(bytes: &[u8]) -> Result<Option<Event>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not valid UTF-8".to_string())?.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let value = json::parse_json(text).map_err(|e| json_error(&e))?;
    json::event_from_json(&value).map(Some)
}

/// serde_json's message without its "at line 1 column N" suffix, which would
/// be confused with the file's line number.
fn json_error(err: &serde_json::Error) -> String {
    let message = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    let message = message.strip_suffix(&suffix).unwrap_or(&message);
    format!("invalid JSON at column {}: {message}", err.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"user_id":"u1","family":"browse","type":"view","event_time_ms":1}"#;

    fn sizes(input: &str, size: usize) -> Vec<Result<usize, String>> {
        Batches::new(input.as_bytes(), size)
            .map(|b| b.map(|b| b.events.len()).map_err(|e| e.to_string()))
            .collect()
    }

    #[test]
    fn a_line_past_the_limit_is_refused_without_reading_it_whole() {
        let long = format!("{{\"user_id\":\"{}\"}}\n", "u".repeat(MAX_LINE_BYTES as usize));
        let input = format!("{EVENT}\n{long}{EVENT}\n");
        let got = sizes(&input, 10);
        assert_eq!(
            got,
            vec![Err(format!("line 2: longer than {MAX_LINE_BYTES} bytes (one event per line)"))]
        );
    }

    #[test]
    fn splits_into_batches_and_skips_blank_lines() {
        let input = format!("{EVENT}\n\n{EVENT}\r\n  \n{EVENT}\n{EVENT}");
        assert_eq!(sizes(&input, 3), [Ok(3), Ok(1)]);
        assert_eq!(sizes(&input, 1), [Ok(1), Ok(1), Ok(1), Ok(1)]);
        assert_eq!(sizes("", 3), []);
        assert_eq!(sizes("\n\n", 3), []);
    }

    #[test]
    fn a_batch_ends_at_its_encoded_size_too() {
        let big = format!(
            r#"{{"user_id":"u1","family":"browse","type":"view","event_time_ms":1,"attrs":{{"note":"{}"}}}}"#,
            "x".repeat(100_000)
        );
        let input = format!(
            "{big}
"
        )
        .repeat(200);
        let batches: Vec<Batch> = Batches::new(input.as_bytes(), 1_000).map(|b| b.unwrap()).collect();
        let counts: Vec<usize> = batches.iter().map(|b| b.events.len()).collect();
        // 84 events of about 100 KB reach 8 MiB.
        assert_eq!(counts, [84, 84, 32]);
        for b in &batches {
            let request = portrait_client::WriteRequest { events: b.events.clone() };
            let bytes = prost::Message::encoded_len(&request);
            assert!(bytes <= MAX_BATCH_BYTES + 110_000, "{bytes} bytes");
        }
    }

    #[test]
    fn counts_bytes() {
        let input = format!("{EVENT}\n\n{EVENT}\n");
        let total: u64 = Batches::new(input.as_bytes(), 1).map(|b| b.unwrap().bytes).sum();
        assert_eq!(total, input.len() as u64);
    }

    #[test]
    fn bad_line_stops_with_its_number_and_drops_its_batch() {
        let input = format!("{EVENT}\n{EVENT}\n\n{EVENT}\n{{\"user_id\":\"u\"}}\n{EVENT}\n");
        assert_eq!(sizes(&input, 2), [Ok(2), Err("line 5: missing field `family`".to_string())]);
    }

    #[test]
    fn invalid_json_and_utf8_are_named() {
        assert_eq!(
            sizes("{\"user_id\": }\n", 5),
            [Err("line 1: invalid JSON at column 13: expected value".into())]
        );
        let bytes: &[u8] = b"\xff\n";
        let err = Batches::new(bytes, 5).next().unwrap().unwrap_err();
        assert_eq!(err.to_string(), "line 1: not valid UTF-8");
    }
}
