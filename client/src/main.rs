//! `portrait`: the Portrait command-line client. Parses arguments, runs one
//! command (see `cli/`), prints its output; any failure is one line
//! `error: <reason>` on stderr and exit code 1 (2 for usage errors).

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args).await {
        Ok(output) => match std::io::stdout().lock().write_all(output.as_bytes()) {
            // A closed pipe (`portrait get u1 | head -1`) is not an error.
            Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => fail(&err.into()),
            _ => ExitCode::SUCCESS,
        },
        Err(err) => fail(&err),
    }
}

fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", reason(err));
    ExitCode::FAILURE
}

/// The error and its causes on one line, `: `-separated, without the
/// repeats some transport errors have (`tcp connect error: tcp connect error`).
fn reason(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if parts.last() != Some(&text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}
