//! The build check of a schema across the cluster.
//!
//! A schema is compiled by every replica of every shard when it meets the
//! schema's entry in the shard's log. A replica whose build refuses it (a
//! stricter or older build, mid rolling upgrade) stops there rather than
//! go on under the old rules (`store/state_machine.rs`), and its node shuts
//! down. So before a schema is applied, every node of the map is asked
//! whether its build accepts it (`Raft.CheckSchema`): one that refuses it
//! fails the call (FAILED_PRECONDITION naming it) and nothing is applied.
//! A node that does not answer (down, unreachable) cannot be asked: the
//! schema is applied without its word and the caller is told which nodes
//! those were. A node being added is asked about the cluster's schema
//! before it joins.

use std::time::Duration;

use portrait_proto::v1::raft_client::RaftClient;
use portrait_proto::v1::CheckSchemaRequest;

use super::Node;
use crate::error::{Error, Result};
use crate::schema::Schema;
use crate::types::NodeId;

/// One check of a schema by a peer may take this long (a schema is at most
/// 1 MiB; compiling it takes milliseconds).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Fault injection (the `fault-injection` build only): while a file of this
/// name is in the data dir, the node's build refuses every schema whose
/// text contains the file's (trimmed, non-empty) contents, as a stricter
/// build would.
#[cfg(feature = "fault-injection")]
pub const REFUSE_SCHEMA_MARKER: &str = "fault-refuse-schema";

/// What a peer said of a schema.
#[derive(Debug)]
enum Verdict {
    Accepted,
    /// Its build refuses the schema: why.
    Refused(String),
    /// It runs a build without the check (older than this one).
    NoCheck,
    /// It did not answer: why.
    Silent(String),
}

impl Node {
    /// Whether this node's build accepts `toml`: the schema it compiles to,
    /// or INVALID_ARGUMENT (field `toml`) saying why not.
    pub fn check_schema_here(&self, toml: &str) -> Result<Schema> {
        #[cfg(feature = "fault-injection")]
        if let Ok(marker) = std::fs::read_to_string(self.data_dir.join(REFUSE_SCHEMA_MARKER)) {
            let marker = marker.trim();
            if !marker.is_empty() && toml.contains(marker) {
                return Err(Error::invalid(
                    "toml",
                    format!("refused by fault injection (it contains {marker:?})"),
                ));
            }
        }
        let (schema, _) =
            crate::engine::check_new_schema(toml).map_err(|e| Error::invalid("toml", e.to_string()))?;
        Ok(schema)
    }

    /// Asks every other node of the map whether its build accepts `toml`.
    /// FAILED_PRECONDITION naming the first node that refuses it (or runs a
    /// build without the check); otherwise the nodes that did not answer,
    /// in id order (none when no map exists yet: a single node).
    pub(super) async fn check_schema_everywhere(&self, toml: &str) -> Result<Vec<NodeId>> {
        let Some(map) = self.cluster().map.clone() else { return Ok(Vec::new()) };
        let asks = map
            .nodes
            .iter()
            .filter(|(&id, _)| id != self.id)
            .map(|(&id, n)| async move { (id, peer_check_schema(id, &n.peer_addr, toml).await) });
        let mut silent = Vec::new();
        for (id, verdict) in futures::future::join_all(asks).await {
            match verdict {
                Verdict::Accepted => {}
                Verdict::Refused(why) => return Err(refused_by(id, &why)),
                Verdict::NoCheck => {
                    return Err(Error::FailedPrecondition(format!(
                    "node {id} runs an older build that cannot check schemas: finish the rolling upgrade, \
                         then apply the schema"
                )))
                }
                Verdict::Silent(why) => {
                    tracing::warn!(node = id, error = %why, "the schema's build check: no answer; applied without it");
                    silent.push(id);
                }
            }
        }
        Ok(silent)
    }

    /// FAILED_PRECONDITION when node `id` (being added, at `peer_addr`)
    /// answers that its build refuses the cluster's schema. A node that
    /// does not answer is not refused here: adding it waits for it like
    /// any learner, and should it refuse the schema then, it stops at the
    /// schema's entry (its log says why).
    pub(super) async fn check_schema_on_new_node(&self, id: NodeId, peer_addr: &str) -> Result<()> {
        let schema = self.schema();
        match peer_check_schema(id, peer_addr, &schema.schema.toml).await {
            Verdict::Accepted | Verdict::Silent(_) => Ok(()),
            Verdict::Refused(why) => Err(Error::FailedPrecondition(format!(
                "node {id}'s build refuses the cluster's schema (version {}): {why}; start it with a build \
                 that accepts the schema",
                schema.version
            ))),
            Verdict::NoCheck => Err(Error::FailedPrecondition(format!(
                "node {id} runs an older build that cannot check schemas: start it with this build or a later one"
            ))),
        }
    }
}

fn refused_by(id: NodeId, why: &str) -> Error {
    Error::FailedPrecondition(format!(
        "node {id}'s build refuses this schema: {why}. Nothing was applied: its shards would stop at the \
         schema's entry. Finish the rolling upgrade to a build that accepts it, then apply it again"
    ))
}

/// Asks the node at peer address `addr` whether its build accepts `toml`.
async fn peer_check_schema(node: NodeId, addr: &str, toml: &str) -> Verdict {
    let endpoint = match crate::tls::peer_endpoint(addr, Some(node)) {
        Ok(e) => e.connect_timeout(CHECK_TIMEOUT).timeout(CHECK_TIMEOUT),
        Err(e) => return Verdict::Silent(e.to_string()),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return Verdict::Silent(e.to_string()),
    };
    let reply = RaftClient::new(channel)
        .max_decoding_message_size(crate::limits::MAX_ADMIN_REQUEST_BYTES)
        .check_schema(CheckSchemaRequest { toml: toml.to_string() })
        .await;
    match reply {
        Ok(_) => Verdict::Accepted,
        Err(s) if s.code() == tonic::Code::InvalidArgument => Verdict::Refused(s.message().to_string()),
        Err(s) if s.code() == tonic::Code::Unimplemented => Verdict::NoCheck,
        Err(s) => Verdict::Silent(s.message().to_string()),
    }
}
