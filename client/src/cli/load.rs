//! `portrait load FILE.jsonl`: bulk ingest.
//!
//! A reader thread parses lines into batches (`batches.rs`) and hands them
//! over a bounded channel; up to `concurrency` unary writes are in flight at
//! once. On the first failure no new batch is sent, the writes in flight are
//! awaited, and the error says how many events were written before it.

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
    let (totals, failure) = send_all(&client, rx, concurrency, &bar).await;
    bar.finish_and_clear();
    match failure {
        None => Ok(summary(&totals, started.elapsed())),
        Some(err) if totals.events == 0 => Err(err.into()),
        Some(err) => {
            Err(anyhow::Error::new(err)
                .context(format!("stopped after {} events were written", totals.events)))
        }
    }
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
) -> (Totals, Option<ClientError>) {
    let mut totals = Totals::default();
    let mut failure = None;
    let mut reading = true;
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            item = rx.recv(), if reading && failure.is_none() && in_flight.len() < concurrency => match item {
                Some(Ok(batch)) => in_flight.push(write(client, batch)),
                Some(Err(err)) => failure = Some(err),
                None => reading = false,
            },
            Some((events, bytes, result)) = in_flight.next(), if !in_flight.is_empty() => match result {
                Ok(response) => {
                    totals.add(events, &response);
                    bar.inc(bytes);
                    bar.set_message(format!("{} events", totals.events));
                }
                Err(err) => {
                    failure.get_or_insert(err);
                }
            },
            else => break,
        }
    }
    (totals, failure)
}

/// Writes one batch; returns its event count and input bytes with the result.
async fn write(client: &PortraitClient, batch: Batch) -> (usize, u64, Result<WriteResponse, ClientError>) {
    let (events, bytes) = (batch.events.len(), batch.bytes);
    (events, bytes, client.write(batch.events).await)
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
