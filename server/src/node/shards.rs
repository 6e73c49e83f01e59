//! The cluster's number of shards `S` on this node: fixed when the cluster
//! is created and recorded in the node's state database (`NODE shards` in
//! `meta`) the first time the node starts.
//!
//! - A node that holds a recorded `S` uses it; `--shards` with another value
//!   is refused with one line (shards do not split or merge). A data dir
//!   with raft state but no recorded `S` was written before nodes ran
//!   several groups: it ran group 0 alone, so `S` = 1.
//! - A new node that bootstraps takes `--shards` (default
//!   [`DEFAULT_SHARDS`]).
//! - A new node that joins through seeds (`--join`) asks them
//!   (`ClusterStatus.shards`) and creates the same groups; `--shards`, if
//!   given, must agree.
//! - A new node started with `--no-bootstrap` and no seeds (an operator
//!   adds it with `AddNode`) takes `--shards` or the default; the leader's
//!   `AddNode` checks it against the cluster's before adding it.

use std::time::Duration;

use portrait_core::shard::{check_layout, DEFAULT_REPLICATION, DEFAULT_SHARDS};
use portrait_proto::v1::raft_client::RaftClient;
use portrait_proto::v1::ClusterStatusRequest;

use super::NodeOptions;
use crate::store::{LogEngine, StateDb};

/// One `ClusterStatus` asked of a seed may take this long.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// This node's `S` (see the module docs); recorded if new.
pub(super) async fn resolve(db: &StateDb, log: &LogEngine, opts: &NodeOptions) -> anyhow::Result<u32> {
    let stored = match db.shards()? {
        None if !log.groups()?.is_empty() => Some(1),
        stored => stored,
    };
    if let Some(stored) = stored {
        if let Some(asked) = opts.shards.filter(|&a| a != stored) {
            anyhow::bail!(
                "--shards {asked}: the data dir {} belongs to a cluster of {stored} shards, which is fixed at \
                 creation; start with --shards {stored} or without --shards",
                opts.data_dir.display()
            );
        }
        db.set_shards(stored)?;
        return Ok(stored);
    }
    let shards = match (opts.bootstrap, opts.seeds.is_empty()) {
        (false, false) => {
            let learnt = ask_seeds(&opts.seeds).await?;
            if let Some(asked) = opts.shards.filter(|&a| a != learnt) {
                anyhow::bail!("--shards {asked}: the cluster to join has {learnt} shards");
            }
            learnt
        }
        _ => opts.shards.unwrap_or(DEFAULT_SHARDS),
    };
    check_layout(shards, DEFAULT_REPLICATION).map_err(|e| anyhow::anyhow!("--{e}"))?;
    db.set_shards(shards)?;
    tracing::info!(shards, "this node's cluster has {shards} shards");
    Ok(shards)
}

/// Asks the seeds in turn, with backoff, until one tells the cluster's `S`.
/// Fails only when a seed refuses this node's certificate as a removed
/// node's: asking again would never change that.
async fn ask_seeds(seeds: &[String]) -> anyhow::Result<u32> {
    let mut backoff = Duration::from_millis(500);
    loop {
        for seed in seeds {
            match ask(seed).await {
                Ok(shards) => return Ok(shards),
                Err(e) if e.contains(portrait_core::meta::RETIRED_ID) => {
                    anyhow::bail!("cannot join the cluster: {e}")
                }
                Err(e) => tracing::warn!(seed = %seed, error = %e, "cannot learn the number of shards yet"),
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The number of shards of the cluster `seed` (a peer address) belongs to.
pub async fn ask(seed: &str) -> Result<u32, String> {
    let endpoint = crate::tls::peer_endpoint(seed, None)
        .map_err(|e| format!("{seed}: {e}"))?
        .connect_timeout(ASK_TIMEOUT)
        .timeout(ASK_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| format!("cannot reach {seed}: {e}"))?;
    let status = RaftClient::new(channel)
        .status(ClusterStatusRequest {})
        .await
        .map_err(|s| format!("{seed}: {}", s.message()))?
        .into_inner();
    match status.shards {
        0 => Err(format!("{seed} does not report its number of shards (an older version?)")),
        n => Ok(n),
    }
}
