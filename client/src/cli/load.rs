//! `portrait load FILE.jsonl`: bulk ingest.
//!
//! A reader thread parses lines into batches (`batches.rs`) and hands them
//! over a bounded channel; up to `concurrency` unary writes are in flight at
//! once. On the first failure no new batch is sent, the writes in flight are
//! awaited, and the error says which lines were written (every line before
//! the first batch that was not, and any later batch that was in flight),
//! which lines failed, and the line of the event a server error names.

mod batches;

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use portrait_client::{ClientError, PortraitClient, WriteResponse};
use tokio::sync::mpsc;

use batches::{Batch, Batches};

/// Counts over every acknowledged batch.
#[derive(Debug, Default, PartialEq)]
struct Totals {
    events: u64,
    applied: u64,
    duplicates: u64,
    expired: u64,
}

impl Totals {
    fn add(&mut self, events: usize, r: &WriteResponse) {
        self.events += events as u64;
        self.applied += u64::from(r.applied);
        self.duplicates += u64::from(r.duplicates);
        self.expired += u64::from(r.expired);
    }
}

pub async fn run(
    endpoint: &super::Target,
    file: &Path,
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<String> {
    let (reader, len) = open(file)?;
    let client = endpoint.connect().await?;
    let bar = progress_bar(len);
    let started = Instant::now();
    let (tx, rx) = mpsc::channel(concurrency);
    // A plain thread, not `spawn_blocking`: a reader stuck on stdin must not
    // keep the runtime from shutting down after an error.
    std::thread::spawn(move || {
        for item in Batches::new(reader, batch) {
            if tx.blocking_send(item).is_err() {
                break;
            }
        }
    });
    let (totals, written, failure) = send_all(&client, rx, concurrency, &bar).await;
    bar.finish_and_clear();
    match failure {
        None => Ok(summary(&totals, started.elapsed())),
        Some(failure) => Err(anyhow::anyhow!(stopped(&written, failure))),
    }
}

/// Why a load stopped.
enum Failure {
    /// A line could not be read or parsed (its batch was not sent).
    Read(ClientError),
    /// A batch's write failed (some of it may have been applied: a write
    /// is atomic per shard only).
    Write { first_line: usize, last_line: usize, lines: Vec<usize>, err: ClientError },
}

/// A batch that was written: its first and last lines and its events.
type Written = (usize, usize, usize);

/// The error of a load that stopped: which lines were written (every line
/// before the first one that was not, and any batch after it that was in
/// flight), then what failed, with the line of the event a server error
/// names (`events[i]` of the batch). Resuming after the written prefix with
/// the same event ids skips what was written.
fn stopped(written: &[Written], failure: Failure) -> String {
    let mut written = written.to_vec();
    written.sort();
    let cut = match &failure {
        Failure::Read(ClientError::Json { line, .. }) => *line,
        Failure::Read(_) => usize::MAX,
        Failure::Write { first_line, .. } => *first_line,
    };
    let (before, after): (Vec<Written>, Vec<Written>) =
        written.iter().partition(|(first, _, _)| *first < cut);
    let count = |ranges: &[Written]| ranges.iter().map(|(_, _, n)| n).sum::<usize>();
    let mut parts = Vec::new();
    match before.last() {
        Some((_, last, _)) => parts.push(format!("lines 1-{last} were written ({} events)", count(&before))),
        None => parts.push("nothing was written".to_string()),
    }
    if !after.is_empty() {
        let ranges: Vec<String> = after.iter().map(|(f, l, _)| format!("{f}-{l}")).collect();
        parts.push(format!("lines {} were written too ({} events)", ranges.join(", "), count(&after)));
    }
    let cause = match failure {
        Failure::Read(err) => err.to_string(),
        Failure::Write { first_line, last_line, lines, err } => {
            let text = err.to_string();
            let line = event_index(&text).and_then(|i| lines.get(i));
            let at = line.map(|l| format!(" (line {l} is the event it names)")).unwrap_or_default();
            // A request is validated whole (nothing of an invalid one is
            // written), but applied per shard.
            let partly = match text.starts_with("INVALID_ARGUMENT") {
                true => "",
                false => {
                    " (a write is atomic per shard, not across shards: events of these lines in other shards \
                     may have been written; loaded again, those with an event_id come back as duplicates, \
                     those without one are applied again)"
                }
            };
            format!("lines {first_line}-{last_line} failed{at}{partly}: {text}")
        }
    };
    format!("stopped: {}; {cause}", parts.join("; "))
}

/// `N` of the first `events[N]` in a server's error message.
fn event_index(message: &str) -> Option<usize> {
    let rest = &message[message.find("events[")? + "events[".len()..];
    rest[..rest.find(']')?].parse().ok()
}

/// The input and its size in bytes when known (a regular file).
fn open(path: &Path) -> anyhow::Result<(Box<dyn BufRead + Send>, Option<u64>)> {
    if path.as_os_str() == "-" {
        return Ok((Box::new(BufReader::new(std::io::stdin())), None));
    }
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?;
    let len = meta.is_file().then_some(meta.len());
    Ok((Box::new(BufReader::with_capacity(1 << 20, file)), len))
}

async fn send_all(
    client: &PortraitClient,
    mut rx: mpsc::Receiver<Result<Batch, ClientError>>,
    concurrency: usize,
    bar: &ProgressBar,
) -> (Totals, Vec<Written>, Option<Failure>) {
    let mut totals = Totals::default();
    let mut written = Vec::new();
    let mut failure = None;
    let mut reading = true;
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            item = rx.recv(), if reading && failure.is_none() && in_flight.len() < concurrency => match item {
                Some(Ok(batch)) => in_flight.push(write(client, batch)),
                Some(Err(err)) => failure = Some(Failure::Read(err)),
                None => reading = false,
            },
            Some((sent, result)) = in_flight.next(), if !in_flight.is_empty() => match result {
                Ok(response) => {
                    totals.add(sent.events, &response);
                    written.push((sent.first_line, sent.last_line, sent.events));
                    bar.inc(sent.bytes);
                    bar.set_message(format!("{} events", totals.events));
                }
                Err(err) => {
                    let failed = Failure::Write {
                        first_line: sent.first_line,
                        last_line: sent.last_line,
                        lines: sent.lines,
                        err,
                    };
                    // The earliest failed batch is the one to report.
                    match &failure {
                        Some(Failure::Write { first_line, .. }) if *first_line < sent.first_line => {}
                        _ => failure = Some(failed),
                    }
                }
            },
            else => break,
        }
    }
    (totals, written, failure)
}

/// What a batch was, kept while its write is in flight.
struct Sent {
    events: usize,
    bytes: u64,
    first_line: usize,
    last_line: usize,
    lines: Vec<usize>,
}

/// Writes one batch; returns what it was with the result.
async fn write(client: &PortraitClient, batch: Batch) -> (Sent, Result<WriteResponse, ClientError>) {
    let sent = Sent {
        events: batch.events.len(),
        bytes: batch.bytes,
        first_line: batch.first_line,
        last_line: batch.last_line,
        lines: batch.lines,
    };
    (sent, client.write(batch.events).await)
}

const BAR_TEMPLATE: &str = "{spinner} {elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {msg}";
const SPINNER_TEMPLATE: &str = "{spinner} {elapsed_precise} {msg}";

/// A byte-based bar for files, a spinner for stdin; hidden unless stderr is a
/// terminal.
fn progress_bar(len: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(len) => (ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()), BAR_TEMPLATE),
        None => (ProgressBar::new_spinner(), SPINNER_TEMPLATE),
    };
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn summary(t: &Totals, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { t.events as f64 / secs } else { 0.0 };
    format!(
        "events={} applied={} duplicates={} expired={} elapsed={secs:.2}s rate={rate:.0} events/s\n",
        t.events, t.applied, t.duplicates, t.expired
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_write(first_line: usize, last_line: usize, message: &str) -> Failure {
        failed_with(first_line, last_line, tonic::Status::invalid_argument(message))
    }

    fn failed_with(first_line: usize, last_line: usize, status: tonic::Status) -> Failure {
        let lines = (first_line..=last_line).collect();
        let err = ClientError::Rpc(status);
        Failure::Write { first_line, last_line, lines, err }
    }

    #[test]
    fn a_stopped_load_names_the_lines_written_and_the_event_that_failed() {
        // Batches of 100 lines, 4 in flight: 1-100 and 301-400 written,
        // 101-200 failed on its fourth event, 201-300 failed too.
        let written = [(301, 400, 100), (1, 100, 100)];
        let failure = failed_write(101, 200, "events[3].user_id: must not be empty");
        assert_eq!(
            stopped(&written, failure),
            "stopped: lines 1-100 were written (100 events); lines 301-400 were written too (100 events); \
             lines 101-200 failed (line 104 is the event it names): INVALID_ARGUMENT: events[3].user_id: must \
             not be empty"
        );
        let failure = failed_write(1, 100, "shard 2: no quorum");
        assert_eq!(
            stopped(&[], failure),
            "stopped: nothing was written; lines 1-100 failed: INVALID_ARGUMENT: shard 2: no quorum"
        );
        let failure = failed_with(1, 100, tonic::Status::unavailable("shard 2: no quorum"));
        assert_eq!(
            stopped(&[], failure),
            "stopped: nothing was written; lines 1-100 failed (a write is atomic per shard, not across \
             shards: events of these lines in other shards may have been written; loaded again, those with \
             an event_id come back as duplicates, those without one are applied again): UNAVAILABLE: shard \
             2: no quorum"
        );
        let bad_line =
            Failure::Read(ClientError::Json { line: 152, reason: "missing field `family`".into() });
        assert_eq!(
            stopped(&[(1, 100, 100)], bad_line),
            "stopped: lines 1-100 were written (100 events); line 152: missing field `family`"
        );
        assert_eq!(event_index("shard 1: events[12].attrs.x: too long"), Some(12));
        assert_eq!(event_index("events[x]"), None);
    }

    #[test]
    fn progress_templates_parse() {
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(SPINNER_TEMPLATE).is_ok());
    }

    #[test]
    fn totals_sum_responses() {
        let mut totals = Totals::default();
        totals.add(
            3,
            &WriteResponse {
                applied: 2,
                duplicates: 1,
                expired: 0,
                log_index: 5,
                batches: 1,
                shards: vec![],
            },
        );
        totals.add(
            2,
            &WriteResponse {
                applied: 1,
                duplicates: 0,
                expired: 1,
                log_index: 6,
                batches: 1,
                shards: vec![],
            },
        );
        assert_eq!(totals, Totals { events: 5, applied: 3, duplicates: 1, expired: 1 });
        let line = summary(&totals, Duration::from_millis(500));
        assert_eq!(line, "events=5 applied=3 duplicates=1 expired=1 elapsed=0.50s rate=10 events/s\n");
    }
}
