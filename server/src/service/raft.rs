//! `portrait.v1.Raft`: the internal transport, decoding openraft messages
//! and answering with the encoded `Result` of the local raft call; plus
//! `StartElection`, the last step of a leadership transfer.

use std::sync::Arc;

use portrait_proto::v1::raft_server::Raft;
use portrait_proto::v1::{
    AddNodeRequest, BalanceLeaderRequest, ClockRequest, ClockResponse, ClusterStatusRequest,
    ClusterStatusResponse, MembershipResponse, RaftBatch, RaftBatchReply, RaftItemReply, RaftPayload,
    StartElectionRequest, StartElectionResponse, TransferLeaderResponse,
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
}

type PeerCerts = Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>;

impl RaftService {
    /// One AppendEntries (alone or an item of a batch): the encoded answer.
    async fn append_one(&self, certs: &PeerCerts, payload: RaftPayload) -> Result<Vec<u8>, Status> {
        let (group, req): (_, openraft::raft::AppendEntriesRequest<TypeConfig>) = decode_payload(payload)?;
        self.check_sender(certs, req.vote.leader_id().voted_for())?;
        Ok(encode(&self.node.append_entries(group, req).await?))
    }

    pub fn new(node: Arc<Node>, mutual_tls: bool, audit: Arc<crate::audit::AuditLog>) -> Self {
        RaftService { node, mutual_tls, audit }
    }

    /// The caller's certificates, looked up only with mutual TLS on (the
    /// raft messages' hot path skips it otherwise).
    fn peer_certs<T>(&self, req: &Request<T>) -> PeerCerts {
        self.mutual_tls.then(|| req.peer_certs()).flatten()
    }

    /// PERMISSION_DENIED unless the caller's certificate names `claimed`
    /// (with mutual TLS on; without it nothing can be checked).
    fn check_sender(&self, certs: &PeerCerts, claimed: Option<NodeId>) -> Result<(), Status> {
        if !self.mutual_tls {
            return Ok(());
        }
        let Some(claimed) = claimed else {
            return Err(Status::permission_denied("the message names no sending node"));
        };
        crate::tls::check_sender(certs.as_deref().map(Vec::as_slice), claimed).map_err(|reason| {
            tracing::warn!(claimed, %reason, "refused a peer message");
            Status::permission_denied(reason)
        })
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

fn reply<T: serde::Serialize>(result: T) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload { data: encode(&result), group: 0 }))
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let certs = self.peer_certs(&req);
        let data = self.append_one(&certs, req.into_inner()).await?;
        Ok(Response::new(RaftPayload { data, group: 0 }))
    }

    async fn append_entries_batch(
        &self,
        req: Request<RaftBatch>,
    ) -> Result<Response<RaftBatchReply>, Status> {
        let certs = self.peer_certs(&req);
        let items = req.into_inner().items;
        if items.len() > MAX_RAFT_BATCH_ITEMS {
            return Err(Status::invalid_argument(format!(
                "items: {} in one batch, over the limit of {MAX_RAFT_BATCH_ITEMS}",
                items.len()
            )));
        }
        // Each item goes to its own group; they run concurrently.
        let answers = futures::future::join_all(items.into_iter().map(|item| self.append_one(&certs, item)));
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
        let (group, req): (_, openraft::raft::VoteRequest<NodeId>) = decode_req(req)?;
        self.check_sender(&certs, req.vote.leader_id().voted_for())?;
        reply(self.node.vote(group, req).await?)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let certs = self.peer_certs(&req);
        let (group, req): (_, openraft::raft::InstallSnapshotRequest<TypeConfig>) = decode_req(req)?;
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
        let (group, events): (GroupId, Vec<crate::model::Event>) = decode_req(req)?;
        reply(self.node.forwarded_write(group, events).await?)
    }

    async fn forward_writes(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (_, parts): (GroupId, Vec<(u32, Vec<crate::model::Event>)>) = decode_req(req)?;
        reply(self.node.forwarded_writes(parts).await?)
    }

    async fn forward_read(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (group, part): (GroupId, crate::node::ForwardedRead) = decode_req(req)?;
        reply(self.node.forwarded_read(group, part).await?)
    }

    async fn status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
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

    async fn clock(&self, _: Request<ClockRequest>) -> Result<Response<ClockResponse>, Status> {
        let boot_id = crate::raft::liveness::boot_id();
        Ok(Response::new(ClockResponse { wall_ms: self.node.clock_now_ms(), boot_id }))
    }
}
