//! `portrait.v1.Raft`: the internal transport, decoding openraft messages
//! and answering with the encoded `Result` of the local raft call; plus
//! `StartElection`, the last step of a leadership transfer.

use std::sync::Arc;

use portrait_proto::v1::raft_server::Raft;
use portrait_proto::v1::{
    AddNodeRequest, ClockRequest, ClockResponse, ClusterStatusRequest, ClusterStatusResponse,
    MembershipResponse, RaftPayload, StartElectionRequest, StartElectionResponse,
};
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::store::codec::{decode, encode};
use crate::types::GroupId;

pub struct RaftService {
    node: Arc<Node>,
}

impl RaftService {
    pub fn new(node: Arc<Node>) -> Self {
        RaftService { node }
    }
}

/// The message's raft group and its decoded openraft request.
fn decode_req<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<(GroupId, T), Status> {
    let payload = req.into_inner();
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
        let (group, req) = decode_req(req)?;
        reply(self.node.append_entries(group, req).await?)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (group, req) = decode_req(req)?;
        reply(self.node.vote(group, req).await?)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (group, req) = decode_req(req)?;
        reply(self.node.install_snapshot(group, req).await?)
    }

    async fn start_election(
        &self,
        req: Request<StartElectionRequest>,
    ) -> Result<Response<StartElectionResponse>, Status> {
        let req = req.into_inner();
        tracing::debug!(leader = req.leader_id, term = req.term, dry_run = req.dry_run, "StartElection");
        self.node.start_election(GroupId(req.group), req.term, req.last_log_index, req.dry_run).await?;
        Ok(Response::new(StartElectionResponse {}))
    }

    async fn forward_write(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (group, events): (GroupId, Vec<crate::model::Event>) = decode_req(req)?;
        reply(self.node.forwarded_write(group, events).await?)
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
        let req = request.into_inner();
        tracing::info!(node = req.node_id, addr = %req.addr, peer_addr = %req.peer_addr, "a node asks to join");
        let log_index = self.node.add_node(req.node_id, req.addr, req.peer_addr, req.learner).await?;
        Ok(Response::new(MembershipResponse { log_index, members: super::admin::members_pb(&self.node) }))
    }

    async fn clock(&self, _: Request<ClockRequest>) -> Result<Response<ClockResponse>, Status> {
        let boot_id = crate::raft::liveness::boot_id();
        Ok(Response::new(ClockResponse { wall_ms: self.node.clock_now_ms(), boot_id }))
    }
}
