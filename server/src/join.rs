//! `portraitd --join SEED`: a new node adds itself to an existing cluster.
//!
//! On start, a node given seeds that is not yet in the cluster's map asks
//! them (their peer ports), in turn, to add it (`Raft.Join` with its own id
//! and both advertised addresses), following the `x-portrait-leader` redirect to the leader, and
//! retries with backoff (0.5 s doubling to 10 s) until one call succeeds.
//! `AddNode` is idempotent, so a retry after an answer that was lost is
//! harmless.
//!
//! Restarts: a node that the map it stored has, or a voter of the meta
//! group, does nothing, so a member restarting with data on disk never
//! re-joins. A learner of the meta group asks again (AddNode is idempotent:
//! it finishes an interrupted join);
//! a node that holds data but is in neither was removed, and is not added
//! back (wipe its data dir to join as a new node).

use std::sync::Arc;
use std::time::Duration;

use portrait_proto::v1::raft_client::RaftClient;
use portrait_proto::v1::AddNodeRequest;

use crate::node::Node;
use crate::service::status::LEADER_KEY;

/// Leader redirects followed within one attempt.
const MAX_REDIRECTS: usize = 3;
/// One `AddNode` may wait for the new node to catch up (a snapshot).
const ADD_TIMEOUT: Duration = Duration::from_secs(300);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What a node started with seeds should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Never initialized, or a learner: ask the seeds to add it as a voter.
    Join,
    /// Already a voter: nothing to do.
    Member,
    /// Holds data but is not in its stored membership: it was removed.
    Removed,
}

/// Decides from the node's stored state (before it has heard from anyone).
pub async fn plan(node: &Node) -> Plan {
    if !node.is_initialized().await {
        return Plan::Join;
    }
    // The map may be behind after a crash (applies skip the WAL; raft
    // replays them once it hears from its leader), the membership in the
    // log is not.
    let membership = node.membership();
    if node.in_map() || membership.voter_ids().any(|v| v == node.id) {
        Plan::Member
    } else if membership.get_node(&node.id).is_some() {
        Plan::Join
    } else {
        Plan::Removed
    }
}

/// Starts joining in the background when `plan` says so.
pub async fn start(node: Arc<Node>, seeds: Vec<String>) {
    match plan(&node).await {
        Plan::Member => tracing::info!("already a voter of the cluster; not joining"),
        Plan::Removed => tracing::warn!(
            "this node holds data but is not in the cluster's membership (removed?); not joining again. \
             To join as a new node, start it on an empty data dir"
        ),
        Plan::Join => {
            let joining = node.clone();
            node.spawn_task("join", |mut stop| async move {
                tokio::select! {
                    _ = join(joining, seeds) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
        }
    }
}

/// Asks the seeds until one adds this node, or it is found to be a voter.
async fn join(node: Arc<Node>, seeds: Vec<String>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        for seed in &seeds {
            if is_voter(&node) {
                return tracing::info!("joined the cluster as a voter");
            }
            match add_self(&node, seed).await {
                Ok(()) => return tracing::info!(seed = %seed, "joined the cluster as a voter"),
                // Removed (half-way through joining, or earlier): asking
                // again would never change that.
                Err(Refusal::Refused(e)) if e.contains(portrait_core::meta::RETIRED_ID) => {
                    return tracing::error!(seed = %seed, error = %e, "this node was removed from the cluster; \
                        not asking to join again")
                }
                // Refused (e.g. this node's id is another node's): no retry
                // changes that until an operator acts; say so loudly.
                Err(Refusal::Refused(e)) => {
                    tracing::error!(seed = %seed, error = %e, "the cluster refused to add this node; will retry")
                }
                Err(Refusal::NotYet(e)) => {
                    tracing::warn!(seed = %seed, error = %e, "cannot join the cluster yet; will retry")
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Joined: the cluster's map has this node.
fn is_voter(node: &Node) -> bool {
    node.in_map()
}

/// Why an attempt failed.
enum Refusal {
    /// The cluster refused the node as it is (FAILED_PRECONDITION,
    /// INVALID_ARGUMENT or PERMISSION_DENIED: e.g. its id is in use at
    /// other addresses, or its certificate does not name it).
    Refused(String),
    /// Anything else: the seed unreachable, no leader yet, a timeout.
    NotYet(String),
}

/// One attempt through `seed`, following leader redirects.
async fn add_self(node: &Node, seed: &str) -> Result<(), Refusal> {
    let mut target = seed.to_string();
    for _ in 0..=MAX_REDIRECTS {
        let endpoint = crate::tls::peer_endpoint(&target, None)
            .map_err(|e| Refusal::NotYet(format!("{target}: {e}")))?
            .connect_timeout(Duration::from_secs(3));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Refusal::NotYet(format!("cannot reach {target}: {}", causes(&e))))?;
        let mut request = tonic::Request::new(AddNodeRequest {
            node_id: node.id,
            addr: node.advertise.clone(),
            peer_addr: node.peer_advertise.clone(),
            learner: false,
        });
        request.set_timeout(ADD_TIMEOUT);
        let status = match RaftClient::new(channel).join(request).await {
            Ok(_) => return Ok(()),
            Err(status) => status,
        };
        match status.metadata().get(LEADER_KEY).and_then(|v| v.to_str().ok()) {
            Some(leader) if leader != target => target = leader.to_string(),
            _ => {
                let message = format!("{target}: {}", status.message());
                return Err(match status.code() {
                    // PERMISSION_DENIED: this node's certificate (another
                    // node's, or a removed one's) is refused as it is.
                    tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied => Refusal::Refused(message),
                    _ => Refusal::NotYet(message),
                });
            }
        }
    }
    Err(Refusal::NotYet(format!("more than {MAX_REDIRECTS} leader redirects from {seed}")))
}

/// An error and its sources, e.g. `transport error: dns error: ...`.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
