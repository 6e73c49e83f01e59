//! The raft network: openraft RPCs to peers over the internal `Raft` gRPC
//! service, payloads encoded with bincode. Connections are made lazily and
//! re-made after a failure.

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use std::sync::Arc;

use openraft::BasicNode;
use portrait_proto::v1::raft_client::RaftClient;
use portrait_proto::v1::{RaftPayload, StartElectionRequest};
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::contact::PeerAcks;
use crate::error::Error;
use crate::limits::MAX_MESSAGE_BYTES;
use crate::store::codec::{decode, encode};
use crate::types::{NodeId, TypeConfig};

/// Peers this node must not send raft messages to (fault injection; empty
/// unless built with the cargo feature `fault-injection`).
pub use super::fault::Blocked;

/// Creates a [`Peer`] per target node.
#[derive(Clone, Default)]
pub struct Network {
    pub blocked: Blocked,
    /// When each peer last acknowledged an AppendEntries.
    pub acks: Arc<PeerAcks>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            client: None,
            blocked: self.blocked.clone(),
            acks: self.acks.clone(),
        }
    }
}

/// The connection to one peer.
pub struct Peer {
    target: NodeId,
    addr: String,
    client: Option<RaftClient<Channel>>,
    blocked: Blocked,
    acks: Arc<PeerAcks>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Peer {
    fn client<E: std::error::Error>(&mut self) -> Result<RaftClient<Channel>, RpcErr<E>> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(self.addr.clone())
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
            .connect_timeout(std::time::Duration::from_secs(2))
            .tcp_nodelay(true);
        let client = RaftClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES * 4)
            .max_encoding_message_size(MAX_MESSAGE_BYTES * 4);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Sends one call and decodes the peer's `Result<Resp, RaftError<E>>`.
    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        f: F,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: serde::Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, tonic::Request<RaftPayload>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        if self.blocked.contains(self.target) {
            let e = std::io::Error::other(format!(
                "fault injection: messages to node {} are dropped",
                self.target
            ));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        let client = self.client()?;
        let mut request = tonic::Request::new(RaftPayload { data: encode(req) });
        request.set_timeout(option.hard_ttl());
        let response = match f(client, request).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&response.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(self.target, BasicNode::new(&self.addr), e))
        })
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let result = self.call(&rpc, &option, |mut c, r| async move { c.append_entries(r).await }).await;
        // Any answer but a higher vote means the peer still takes this node as leader.
        if matches!(&result, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.acks.acked(self.target);
        }
        result
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(&rpc, &option, |mut c, r| async move { c.install_snapshot(r).await }).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(&rpc, &option, |mut c, r| async move { c.vote(r).await }).await
    }
}

/// The target of a leadership transfer, reached over the internal `Raft`
/// service; see [`super::transfer`]. Fault injection drops these calls like
/// any other raft message to a blocked peer.
pub struct ElectionPeer {
    target: NodeId,
    addr: String,
    client: RaftClient<Channel>,
    blocked: Blocked,
}

impl ElectionPeer {
    /// Connects now, so that the call made at the right moment is quick.
    pub async fn connect(target: NodeId, addr: &str, blocked: Blocked) -> Result<ElectionPeer, Error> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::Unavailable(format!("cannot reach node {target} at {addr}: {e}"))
        };
        let endpoint = tonic::transport::Endpoint::from_shared(addr.to_string())
            .map_err(|e| unreachable(&e))?
            .connect_timeout(std::time::Duration::from_secs(2))
            .timeout(std::time::Duration::from_secs(5))
            .tcp_nodelay(true);
        let client = RaftClient::new(endpoint.connect().await.map_err(|e| unreachable(&e))?);
        Ok(ElectionPeer { target, addr: addr.to_string(), client, blocked })
    }

    /// Sends `StartElection`; the target's refusal is `FAILED_PRECONDITION`.
    pub async fn start_election(&mut self, request: StartElectionRequest) -> Result<(), Error> {
        let target = self.target;
        if self.blocked.contains(target) {
            return Err(Error::Unavailable(format!(
                "cannot reach node {target}: fault injection drops messages to it"
            )));
        }
        match self.client.start_election(request).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                Err(Error::FailedPrecondition(format!("node {target} will not campaign: {}", s.message())))
            }
            Err(s) => Err(Error::Unavailable(format!("cannot reach node {target} at {}: {s}", self.addr))),
        }
    }
}
