//! `portrait.v1.Raft`: the internal transport, decoding openraft messages
//! and answering with the encoded `Result` of the local raft call; plus
//! `StartElection`, the last step of a leadership transfer.

use std::sync::{Arc, Mutex};

use portrait_proto::v1::raft_server::Raft;
use portrait_proto::v1::{
    AddNodeRequest, BalanceLeaderRequest, CheckSchemaRequest, CheckSchemaResponse, ClockRequest,
    ClockResponse, ClusterStatusRequest, ClusterStatusResponse, MembershipResponse, RaftBatch,
    RaftBatchReply, RaftItemReply, RaftPayload, ReadIndexRequest, ReadIndexResponse, StartElectionRequest,
    StartElectionResponse, TransferLeaderResponse,
};
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::limits::MAX_RAFT_BATCH_ITEMS;
use crate::node::Node;
use crate::store::codec::{decode, encode};
use crate::types::{GroupId, NodeId, TypeConfig};

pub struct RaftService {
    node: Arc<Node>,
    audit: Arc<crate::audit::AuditLog>,
    /// The peer port uses mutual TLS: a message claiming to come from node
    /// N must arrive over a connection whose certificate names node N.
    mutual_tls: bool,
    /// When a misaddressed raft message was last logged.
    refused_logged: Mutex<Option<std::time::Instant>>,
    /// When each reason a peer call was refused for (PERMISSION_DENIED) was
    /// last logged (see [`RaftService::refused`]).
    denied_logged: Mutex<std::collections::BTreeMap<String, std::time::Instant>>,
}

/// How often refusals of misaddressed raft messages are logged (they come
/// with every heartbeat of every group).
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Distinct refusal reasons of peer calls logged within one
/// [`REFUSAL_LOG_EVERY`]; more are not logged until the period passes.
const REFUSAL_REASONS_KEPT: usize = 64;

/// Why node `me`, on the data dir `incarnation`, must not take `payload`
/// (a raft message): it is for another node id, or for another data dir
/// (the node was restarted under its id on an empty or replaced data dir,
/// so the votes and log entries its peers count on are gone). `None`: it
/// may (0 in either field is not checked).
fn addressee_error(me: NodeId, incarnation: u64, payload: &RaftPayload) -> Option<String> {
    let (to, expected) = (payload.to_node, payload.to_incarnation);
    if to != 0 && to != me {
        return Some(format!(
            "a raft message for node {to} reached node {me}: the sender's raft membership gives this address \
             to node {to}"
        ));
    }
    (expected != 0 && expected != incarnation).then(|| {
        format!(
            "node {me} runs on a data dir (incarnation {incarnation:x}) other than the one the shard map \
             records for it ({expected:x}): the raft votes and log it had are lost, so it takes no part in \
             raft. Drain and remove node {me} (`portrait cluster drain {me}`, then `portrait cluster remove \
             {me}`), then empty this node's data dir and start it with a new --node-id and --join; see \
             docs/operations.md"
        )
    })
}

type PeerCerts = Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>;

impl RaftService {
    /// One AppendEntries (alone or an item of a batch): the encoded answer.
    async fn append_one(&self, certs: &PeerCerts, payload: RaftPayload) -> Result<Vec<u8>, Status> {
        self.check_addressee(&payload)?;
        let (group, req): (_, openraft::raft::AppendEntriesRequest<TypeConfig>) = decode_payload(payload)?;
        self.check_sender(certs, req.vote.leader_id().voted_for())?;
        Ok(encode(&self.node.append_entries(group, req).await?))
    }

    pub fn new(node: Arc<Node>, mutual_tls: bool, audit: Arc<crate::audit::AuditLog>) -> Self {
        RaftService {
            node,
            mutual_tls,
            audit,
            refused_logged: Mutex::default(),
            denied_logged: Mutex::default(),
        }
    }

    /// FAILED_PRECONDITION for a raft message addressed to another node or
    /// another data dir (see [`addressee_error`]); logged as an error at
    /// most once every [`REFUSAL_LOG_EVERY`].
    fn check_addressee(&self, payload: &RaftPayload) -> Result<(), Status> {
        let Some(reason) = addressee_error(self.node.id, self.node.incarnation, payload) else {
            return Ok(());
        };
        let mut logged = self.refused_logged.lock().expect("refusal log lock");
        if logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
            *logged = Some(std::time::Instant::now());
            tracing::error!("refused raft messages: {reason}");
        }
        Err(Status::failed_precondition(reason))
    }

    /// The caller's certificates, looked up only with mutual TLS on (the
    /// raft messages' hot path skips it otherwise).
    fn peer_certs<T>(&self, req: &Request<T>) -> PeerCerts {
        self.mutual_tls.then(|| req.peer_certs()).flatten()
    }

    /// PERMISSION_DENIED unless the caller's certificate names `claimed`
    /// and no removed node that has left the cluster (with mutual TLS on;
    /// see [`crate::tls::check_peer`] and [`Node::gone_ids`]). Without it,
    /// only a claim of such a node's id is refused (a stale process of it,
    /// say).
    fn check_sender(&self, certs: &PeerCerts, claimed: Option<NodeId>) -> Result<(), Status> {
        if !self.mutual_tls {
            // The retired set first: most clusters never removed a node,
            // and this runs for every raft message.
            let gone =
                |id: &NodeId| self.node.cluster().retired.contains(id) && self.node.gone_ids().contains(id);
            return match claimed.filter(gone) {
                Some(id) => Err(self.refused(Some(id), portrait_core::meta::retired(id))),
                None => Ok(()),
            };
        }
        let Some(claimed) = claimed else {
            return Err(Status::permission_denied("the message names no sending node"));
        };
        crate::tls::check_peer(certs.as_deref().map(Vec::as_slice), Some(claimed), &self.node.gone_ids())
            .map_err(|reason| self.refused(Some(claimed), reason))
    }

    /// For the peer calls that name no sender (forwarded parts, status,
    /// clock, schema and read-index checks): with mutual TLS on,
    /// PERMISSION_DENIED unless the caller's certificate is a node
    /// certificate of no removed node that has left the cluster.
    fn check_caller<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if !self.mutual_tls {
            return Ok(());
        }
        let certs = req.peer_certs();
        crate::tls::check_peer(certs.as_deref().map(Vec::as_slice), None, &self.node.gone_ids())
            .map_err(|reason| self.refused(None, reason))
    }

    /// A refused peer call: logged (each reason at most once every
    /// [`REFUSAL_LOG_EVERY`], as the caller retries: a removed node's
    /// leftover process hides no other refusal), PERMISSION_DENIED.
    fn refused(&self, claimed: Option<NodeId>, reason: String) -> Status {
        let mut logged = self.denied_logged.lock().expect("denial log lock");
        let now = std::time::Instant::now();
        // Bounded: the reasons logged within the last period, and no more
        // than REFUSAL_REASONS_KEPT of them.
        logged.retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_EVERY);
        if !logged.contains_key(&reason) && logged.len() < REFUSAL_REASONS_KEPT {
            logged.insert(reason.clone(), now);
            tracing::warn!(claimed, %reason, "refused a peer call");
        }
        Status::permission_denied(reason)
    }
}

/// The message's raft group and its decoded openraft request.
fn decode_req<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<(GroupId, T), Status> {
    decode_payload(req.into_inner())
}

fn decode_payload<T: DeserializeOwned>(payload: RaftPayload) -> Result<(GroupId, T), Status> {
    let message = decode(&payload.data)
        .map_err(|e| Status::invalid_argument(format!("data: undecodable raft message: {e}")))?;
    Ok((GroupId(payload.group), message))
}

/// Of a batch's deadline, the share each item may take (the rest carries
/// the answer back).
const ITEM_SHARE_OF_DEADLINE: f64 = 0.9;

/// When a call to the internal service arrived (its headers), put in the
/// request's extensions by [`WithArrival`].
#[derive(Clone, Copy)]
pub struct Arrived(pub std::time::Instant);

/// A service whose requests carry [`Arrived`].
#[derive(Clone)]
pub struct WithArrival<S>(pub S);

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for WithArrival<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: tonic::codegen::http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(Arrived(std::time::Instant::now()));
        self.0.call(request)
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for WithArrival<S> {
    const NAME: &'static str = S::NAME;
}

/// A call's `grpc-timeout` (`<digits><unit>`, gRPC over HTTP/2), if any.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn reply<T: serde::Serialize>(result: T) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload { data: encode(&result), ..Default::default() }))
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let certs = self.peer_certs(&req);
        let data = self.append_one(&certs, req.into_inner()).await?;
        Ok(Response::new(RaftPayload { data, ..Default::default() }))
    }

    async fn append_entries_batch(
        &self,
        req: Request<RaftBatch>,
    ) -> Result<Response<RaftBatchReply>, Status> {
        let certs = self.peer_certs(&req);
        // Each item answers within most of the batch's deadline, or as
        // busy: one group whose core is held up (a snapshot install, a
        // held append) must not hold the others' answers past the
        // sender's deadline, which would fail every item of the batch.
        // Counted from the call's arrival (the body's transfer and decoding
        // took part of it), as the caller's own deadline is.
        let arrived = req.extensions().get::<Arrived>().map(|a| a.0);
        let item_deadline = grpc_timeout(req.metadata()).map(|t| {
            let spent = arrived.map_or(std::time::Duration::ZERO, |at| at.elapsed());
            t.mul_f64(ITEM_SHARE_OF_DEADLINE).saturating_sub(spent)
        });
        let items = req.into_inner().items;
        if items.len() > MAX_RAFT_BATCH_ITEMS {
            return Err(Status::invalid_argument(format!(
                "items: {} in one batch, over the limit of {MAX_RAFT_BATCH_ITEMS}",
                items.len()
            )));
        }
        // Each item goes to its own group; they run concurrently.
        let answers = futures::future::join_all(items.into_iter().map(|item| {
            let group = item.group;
            let append = self.append_one(&certs, item);
            async move {
                let Some(deadline) = item_deadline else { return append.await };
                tokio::time::timeout(deadline, append).await.unwrap_or_else(|_| {
                    // A refusal by this service (the sender keeps the
                    // connection, which every group shares, and backs
                    // off): ABORTED, which no transport failure is, and
                    // which the sender does not read as "too large".
                    Err(Status::aborted(format!(
                        "group {group} did not answer within {} ms (busy: a snapshot install, a held append); \
                         sent again later",
                        deadline.as_millis()
                    )))
                })
            }
        }));
        let items = answers
            .await
            .into_iter()
            .map(|answer| match answer {
                Ok(data) => RaftItemReply { data, code: 0, message: String::new() },
                Err(s) => RaftItemReply {
                    data: Vec::new(),
                    code: s.code() as i32,
                    message: s.message().to_string(),
                },
            })
            .collect();
        Ok(Response::new(RaftBatchReply { items }))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let certs = self.peer_certs(&req);
        let payload = req.into_inner();
        self.check_addressee(&payload)?;
        let (group, req): (_, openraft::raft::VoteRequest<NodeId>) = decode_payload(payload)?;
        self.check_sender(&certs, req.vote.leader_id().voted_for())?;
        reply(self.node.vote(group, req).await?)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let certs = self.peer_certs(&req);
        let payload = req.into_inner();
        self.check_addressee(&payload)?;
        let (group, req): (_, openraft::raft::InstallSnapshotRequest<TypeConfig>) = decode_payload(payload)?;
        self.check_sender(&certs, req.vote.leader_id().voted_for())?;
        reply(self.node.install_snapshot(group, req).await?)
    }

    async fn start_election(
        &self,
        req: Request<StartElectionRequest>,
    ) -> Result<Response<StartElectionResponse>, Status> {
        self.check_sender(&self.peer_certs(&req), Some(req.get_ref().leader_id))?;
        let req = req.into_inner();
        tracing::debug!(leader = req.leader_id, term = req.term, dry_run = req.dry_run, "StartElection");
        self.node.start_election(GroupId(req.group), req.term, req.last_log_index, req.dry_run).await?;
        Ok(Response::new(StartElectionResponse {}))
    }

    async fn forward_write(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.check_caller(&req)?;
        let validated = req.get_ref().schema_version;
        let (group, events): (GroupId, Vec<crate::model::Event>) = decode_req(req)?;
        reply(self.node.forwarded_write(group, events, validated).await?)
    }

    async fn forward_writes(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.check_caller(&req)?;
        let validated = req.get_ref().schema_version;
        let (_, parts): (GroupId, Vec<(u32, Vec<crate::model::Event>)>) = decode_req(req)?;
        reply(self.node.forwarded_writes(parts, validated).await?)
    }

    async fn forward_read(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.check_caller(&req)?;
        let validated = req.get_ref().schema_version;
        let (group, part): (GroupId, crate::node::ForwardedRead) = decode_req(req)?;
        reply(self.node.forwarded_read(group, part, validated).await?)
    }

    async fn status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.check_caller(&req)?;
        Ok(Response::new(super::admin::cluster_status_pb(&self.node)))
    }

    async fn join(&self, request: Request<AddNodeRequest>) -> Result<Response<MembershipResponse>, Status> {
        // A node joins as itself only.
        self.check_sender(&self.peer_certs(&request), Some(request.get_ref().node_id))?;
        let who = crate::audit::Who {
            token: Some(format!("node {} (peer port)", request.get_ref().node_id)),
            remote: request.remote_addr(),
        };
        let req = request.into_inner();
        let args = serde_json::json!({
            "node_id": req.node_id, "addr": req.addr, "peer_addr": req.peer_addr, "learner": req.learner
        });
        let mut pending = crate::audit::Pending::new(&self.audit, who, "Raft/Join", args);
        let added =
            self.node.add_node(req.node_id, req.addr, req.peer_addr, req.learner).await.map_err(Status::from);
        pending.finish(added.as_ref().map(|_| ()));
        let log_index = added?;
        Ok(Response::new(MembershipResponse { log_index, members: super::admin::members_pb(&self.node) }))
    }

    async fn balance_leader(
        &self,
        req: Request<BalanceLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.check_sender(&self.peer_certs(&req), Some(req.get_ref().from))?;
        let req = req.into_inner();
        tracing::info!(
            from = req.from,
            shard = req.group,
            target = req.target,
            "balancing leaders: transfer"
        );
        let (leader_id, leader_addr) = self.node.transfer_leader(req.target, Some(req.group)).await?;
        Ok(Response::new(TransferLeaderResponse { leader_id, leader_addr }))
    }

    async fn check_schema(
        &self,
        request: Request<CheckSchemaRequest>,
    ) -> Result<Response<CheckSchemaResponse>, Status> {
        self.check_caller(&request)?;
        self.node.check_schema_here(&request.get_ref().toml)?;
        Ok(Response::new(CheckSchemaResponse { build: crate::config::VERSION.to_string() }))
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.check_caller(&request)?;
        let index = self.node.shard_read_index(request.get_ref().group).await?;
        Ok(Response::new(ReadIndexResponse { index }))
    }

    async fn clock(&self, req: Request<ClockRequest>) -> Result<Response<ClockResponse>, Status> {
        self.check_caller(&req)?;
        let boot_id = crate::raft::liveness::boot_id();
        let incarnation = self.node.incarnation;
        Ok(Response::new(ClockResponse { wall_ms: self.node.clock_now_ms(), boot_id, incarnation }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calls_grpc_timeout_is_read_in_each_unit() {
        use std::time::Duration;
        let timeout = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(timeout("1M"), Some(Duration::from_secs(60)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "m", "12", "1x", "-1m"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
        // As tonic's client writes it.
        let mut request = tonic::Request::new(());
        request.set_timeout(Duration::from_millis(250));
        assert_eq!(grpc_timeout(request.metadata()), Some(Duration::from_millis(250)));
    }

    #[test]
    fn a_raft_message_is_taken_only_by_the_node_and_data_dir_it_is_for() {
        let to = |to_node, to_incarnation| RaftPayload { to_node, to_incarnation, ..Default::default() };
        assert_eq!(addressee_error(3, 0xabc, &to(3, 0xabc)), None);
        assert_eq!(addressee_error(3, 0xabc, &to(3, 0)), None, "a target not known yet is not checked");
        assert_eq!(addressee_error(3, 0xabc, &to(0, 0)), None);
        let other_node = addressee_error(3, 0xabc, &to(4, 0xabc)).unwrap();
        assert!(other_node.starts_with("a raft message for node 4 reached node 3"), "{other_node}");
        let replaced = addressee_error(3, 0xabc, &to(3, 0xdef)).unwrap();
        assert!(
            replaced.starts_with(
                "node 3 runs on a data dir (incarnation abc) other than the one the shard map records for it \
                 (def)"
            ),
            "{replaced}"
        );
        assert!(replaced.contains("portrait cluster drain 3"), "{replaced}");
    }
}
