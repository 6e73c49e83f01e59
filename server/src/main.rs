//! `portraitd`: starts a Portrait node. Wiring only; see the library.

use std::time::Duration;

use clap::Parser;
use portrait_server::config::{Cli, Config};
use portrait_server::node::Node;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("portraitd: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let config = Config::resolve(Cli::parse())?;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log)?)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let node = Node::start(config.node.clone()).await?;
    if config.node.bootstrap && !node.wait_for_leader(Duration::from_secs(10)).await {
        tracing::warn!("no leader elected yet; serving anyway");
    }
    tracing::info!(
        node_id = node.id,
        listen = %config.listen,
        data_dir = %config.node.data_dir.display(),
        "portraitd serving"
    );
    if !config.join.is_empty() {
        portrait_server::join::start(node.clone(), config.join.clone()).await;
    }
    portrait_server::service::serve(node.clone(), listener, shutdown_signal()).await?;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
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
