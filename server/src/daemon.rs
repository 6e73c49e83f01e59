//! The `portraitd` process: parse the configuration, start the node, serve
//! until SIGTERM or Ctrl-C, shut down. Wiring only. A library function so
//! that the cluster tests' `portraitd-faults` (the same daemon built with
//! the cargo feature `fault-injection`) runs exactly this code.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Cli, Config};
use crate::node::Node;
use crate::service::auth::{reload_on_sighup, Gate};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Runs `portraitd` with the process's arguments; exits 1 on a start error.
#[tokio::main]
pub async fn main() {
    if let Err(e) = run().await {
        eprintln!("portraitd: {e:#}");
        std::process::exit(1);
    }
}

/// `--log`'s filter, with audit entries on whatever it says: a filter
/// naming no `audit` directive (`warn`, `portrait_server=debug`) would
/// turn them off.
fn log_filter(log: &str) -> anyhow::Result<EnvFilter> {
    Ok(EnvFilter::try_new(log)?.add_directive("audit=info".parse()?))
}

async fn run() -> anyhow::Result<()> {
    let config = Config::resolve(Cli::parse())?;
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(&config.log)?)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    #[cfg(feature = "fault-injection")]
    tracing::warn!("built with fault injection (Admin.SetPartition): for tests only, never ship this binary");
    let gate = match &config.token_file {
        Some(path) => {
            let book = crate::auth::TokenBook::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(file = %path.display(), tokens = book.len(), "token checks on");
            Gate::new(book)
        }
        None => {
            tracing::warn!("no --token-file: every client call is allowed without a token");
            Gate::open()
        }
    };
    let tls = crate::tls::Tls::load(&config.tls, config.node.node_id)?;
    let audit = Arc::new(match &config.audit_log {
        Some(path) => crate::audit::AuditLog::open(config.node.node_id, path)?,
        None => crate::audit::AuditLog::log_only(config.node.node_id),
    });
    // Always handled: SIGHUP's default action would end the process.
    reload_on_sighup(gate.clone(), config.token_file.clone(), audit.clone())?;
    if let Some(peer) = &tls.peer {
        crate::tls::set_peer_client(peer.client.clone());
    }
    match (&tls.client, &tls.peer) {
        (Some(_), Some(_)) => tracing::info!("TLS on both ports; mutual TLS between peers"),
        (client, peer) => tracing::warn!(
            client_port = if client.is_some() { "TLS" } else { "PLAINTEXT" },
            peer_port = if peer.is_some() { "mutual TLS" } else { "PLAINTEXT" },
            insecure = config.insecure,
            insecure_peer = config.insecure_peer,
            "a port serves plaintext: anyone on the network can read its traffic{}",
            match (config.insecure, config.insecure_peer) {
                (false, false) => " (loopback only)",
                _ => " (--insecure or --insecure-peer: NOT loopback only)",
            }
        ),
    }
    let client = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: cannot listen: {e}", config.listen))?;
    let peer = tokio::net::TcpListener::bind(&config.peer_listen)
        .await
        .map_err(|e| anyhow::anyhow!("--peer-listen {}: cannot listen: {e}", config.peer_listen))?;
    let node = Node::start(config.node.clone()).await?;
    if config.node.bootstrap && !node.wait_for_leader(Duration::from_secs(10)).await {
        tracing::warn!("no leader elected yet; serving anyway");
    }
    tracing::info!(
        node_id = node.id,
        listen = %config.listen,
        peer_listen = %config.peer_listen,
        data_dir = %config.node.data_dir.display(),
        "portraitd serving"
    );
    if !config.join.is_empty() {
        crate::join::start(node.clone(), config.join.clone()).await;
    }
    let listeners = crate::service::Listeners { client, peer };
    let security = crate::service::Security { gate, tls, audit };
    // A group whose raft stopped on an error (e.g. its log could not be
    // written) would hold its shards' leadership for good while this
    // process answers its peers' probes: stop, so that they take over, and
    // exit with an error, so that the supervisor restarts the node.
    // So does a node that is no longer a member of its cluster (removed
    // while it was down): its stored map would have it serve frozen data.
    let failed = Arc::new(std::sync::OnceLock::new());
    let stop = {
        let (node, failed) = (node.clone(), failed.clone());
        async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                reason = node.raft_failed() => {
                    tracing::error!(%reason, "a raft group stopped on an error: shutting the node down");
                    let _ = failed.set(format!(
                        "a raft group stopped on an error ({reason}); the node shut down so that its peers \
                         take over its shards: fix the cause (disk full? failing disk?) and start it again"
                    ));
                }
                reason = node.removed_from_cluster() => {
                    tracing::error!(%reason, "shutting the node down");
                    let _ = failed.set(reason);
                }
            }
        }
    };
    crate::service::serve(node.clone(), listeners, security, stop).await?;
    tracing::info!("shutting down");
    node.shutdown().await;
    match failed.get() {
        Some(reason) => Err(anyhow::anyhow!("{reason}")),
        None => Ok(()),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn audit_entries_pass_any_log_filter() {
        for log in ["warn", "portrait_server=debug,openraft=info", "error,audit=off"] {
            let buffer = Buffer::default();
            let writer = buffer.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(super::log_filter(log).unwrap())
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(target: "audit", "an audit line");
                tracing::info!(target: "elsewhere", "an info line");
            });
            let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
            assert!(text.contains("an audit line"), "--log {log}: {text}");
            assert!(
                !text.contains("an info line"),
                "--log {log}: the filter still applies to the rest: {text}"
            );
        }
    }
}
