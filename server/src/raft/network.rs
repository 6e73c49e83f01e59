//! The raft network: openraft RPCs to peers over the internal `Raft` gRPC
//! service, payloads encoded with bincode and tagged with their raft group.
//! All groups of a node share one connection per peer node ([`Channels`]:
//! one HTTP/2 connection carries every shard's messages), made lazily and
//! re-made after a failure.
//!
//! Size: replication reads at most `MAX_APPEND_ENTRIES_BYTES` of entries per
//! AppendEntries (see the log store); as a second line, a request above that
//! with more than one entry is refused here with openraft's
//! `PayloadTooLarge` and a hint of how many entries fit, so openraft resends
//! fewer at once. A transport error that means "message too large" is never
//! reported as `Unreachable` (which backs off and resends the same payload
//! forever): for AppendEntries it is `PayloadTooLarge` (half the entries),
//! otherwise a network error with a log line.

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use std::collections::HashMap;
use std::sync::Arc;

use openraft::BasicNode;
use portrait_proto::v1::raft_client::RaftClient;
use portrait_proto::v1::{RaftPayload, StartElectionRequest};
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::contact::PeerAcks;
use crate::error::Error;
use crate::limits::{MAX_APPEND_ENTRIES_BYTES, MAX_RAFT_MESSAGE_BYTES};
use crate::store::codec::{decode, encode};
use crate::types::{GroupId, NodeId, TypeConfig};

/// Peers this node must not send raft messages to (fault injection; empty
/// unless built with the cargo feature `fault-injection`).
pub use super::fault::Blocked;

/// The node's connections to its peers, by address, shared by all of its
/// raft groups.
#[derive(Clone, Default)]
pub struct Channels(Arc<std::sync::Mutex<HashMap<String, RaftClient<Channel>>>>);

impl Channels {
    /// The client for `addr`, connecting lazily on first use.
    pub fn get(&self, addr: &str) -> Result<RaftClient<Channel>, tonic::transport::Error> {
        let mut map = self.0.lock().expect("channels lock");
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = crate::tls::peer_endpoint(addr)?
            .connect_timeout(std::time::Duration::from_secs(2))
            .tcp_nodelay(true);
        let client = RaftClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        map.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Drops the connection to `addr` after a transport failure: the next
    /// call of any group connects anew.
    pub fn reset(&self, addr: &str) {
        self.0.lock().expect("channels lock").remove(addr);
    }
}

/// Creates a [`Peer`] per target node for one raft group.
#[derive(Clone)]
pub struct Network {
    pub group: GroupId,
    pub channels: Channels,
    pub blocked: Blocked,
    /// When each peer last acknowledged an AppendEntries.
    pub acks: Arc<PeerAcks>,
}

impl Network {
    pub fn new(group: GroupId, channels: Channels, blocked: Blocked) -> Network {
        Network { group, channels, blocked, acks: Arc::default() }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            group: self.group,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            blocked: self.blocked.clone(),
            acks: self.acks.clone(),
        }
    }
}

/// One group's messages to one peer.
pub struct Peer {
    target: NodeId,
    group: GroupId,
    addr: String,
    channels: Channels,
    blocked: Blocked,
    acks: Arc<PeerAcks>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Peer {
    fn client<E: std::error::Error>(&mut self) -> Result<RaftClient<Channel>, RpcErr<E>> {
        self.channels.get(&self.addr).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    /// Sends one encoded call and decodes the peer's `Result<Resp, RaftError<E>>`.
    /// A "message too large" failure is mapped by `too_large`.
    async fn call<Resp, E, F, Fut>(
        &mut self,
        data: Vec<u8>,
        option: &RPCOption,
        too_large: impl FnOnce(&tonic::Status) -> RpcErr<E>,
        f: F,
    ) -> Result<Resp, RpcErr<E>>
    where
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
        let mut request = tonic::Request::new(RaftPayload { data, group: self.group.0 });
        request.set_timeout(option.hard_ttl());
        let response = match f(client, request).await {
            Ok(r) => r.into_inner(),
            Err(status) if is_too_large(&status) => {
                tracing::error!(peer = self.target, error = %status, "raft message too large for the transport");
                return Err(too_large(&status));
            }
            // The peer does not host this group (yet, or any more): the
            // node is up, the group's replica is not.
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Err(status) => {
                self.channels.reset(&self.addr);
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
        let data = encode(&rpc);
        if data.len() > MAX_APPEND_ENTRIES_BYTES + ENVELOPE_BYTES && rpc.entries.len() > 1 {
            // Fewer than now, so openraft's retry always makes progress.
            let fit =
                entries_within(&rpc.entries, MAX_APPEND_ENTRIES_BYTES).min(rpc.entries.len() as u64 - 1);
            tracing::debug!(peer = self.target, bytes = data.len(), fit, "AppendEntries split");
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
        }
        let n = rpc.entries.len() as u64;
        let too_large = |status: &tonic::Status| match n {
            0 | 1 => RPCError::Network(NetworkError::new(status)),
            n => {
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(n / 2).with_source_error(status))
            }
        };
        let result =
            self.call(data, &option, too_large, |mut c, r| async move { c.append_entries(r).await }).await;
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
        self.call(encode(&rpc), &option, network_error, |mut c, r| async move { c.install_snapshot(r).await })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(encode(&rpc), &option, network_error, |mut c, r| async move { c.vote(r).await }).await
    }
}

/// Room for an AppendEntries request's own fields (vote, previous log id,
/// commit index: under 100 bytes) beside its entries.
const ENVELOPE_BYTES: usize = 4096;

/// Whether a failed call means the message was over a size limit: tonic's
/// own limits answer OUT_OF_RANGE (the sender's encoding or the receiver's
/// decoding limit) or RESOURCE_EXHAUSTED; an HTTP/2 frame or stream error
/// about size surfaces as INTERNAL or UNKNOWN with h2's message.
fn is_too_large(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => true,
        tonic::Code::Internal | tonic::Code::Unknown => {
            let m = status.message().to_ascii_lowercase();
            m.contains("too large") || m.contains("frame_size") || m.contains("frame size")
        }
        _ => false,
    }
}

fn network_error<E: std::error::Error>(status: &tonic::Status) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(status))
}

/// How many of `entries`, from the first, fit in `budget` encoded bytes
/// (at least one: a single entry is always sent).
fn entries_within(entries: &[crate::types::Entry], budget: usize) -> u64 {
    let mut total = 0u64;
    let fit = entries
        .iter()
        .take_while(|e| {
            total = total.saturating_add(bincode::serialized_size(e).unwrap_or(u64::MAX));
            total <= budget as u64
        })
        .count();
    fit.max(1) as u64
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
        let endpoint = crate::tls::peer_endpoint(addr)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};

    use super::*;
    use crate::model::Event;
    use crate::types::{Command, Entry};

    fn entry(index: u64, events: usize) -> Entry {
        let event = Event::bare();
        let payload = EntryPayload::Normal(Command::Write {
            stamp_ms: 0,
            requests: Arc::new(vec![vec![event; events]]),
        });
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload }
    }

    fn peer() -> Peer {
        // Nothing listens there: a request that is sent fails as unreachable.
        let node = BasicNode::new("http://127.0.0.1:1");
        let mut network = Network::new(GroupId(0), Channels::default(), Blocked::default());
        futures::executor::block_on(network.new_client(2, &node))
    }

    async fn send(peer: &mut Peer, entries: Vec<Entry>) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let rpc =
            AppendEntriesRequest { vote: Vote::new(1, 1), prev_log_id: None, leader_commit: None, entries };
        peer.append_entries(rpc, RPCOption::new(std::time::Duration::from_millis(200))).await
    }

    #[tokio::test]
    async fn an_append_over_the_byte_bound_asks_for_fewer_entries() {
        let mut peer = peer();
        let size = encode(&entry(1, 40_000)).len(); // about 2.4 MB
        let fit = MAX_APPEND_ENTRIES_BYTES / size;
        let entries: Vec<Entry> = (1..=fit as u64 + 2).map(|i| entry(i, 40_000)).collect();
        match send(&mut peer, entries).await {
            Err(RPCError::PayloadTooLarge(p)) => assert_eq!(p.entries_hint(), fit as u64),
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        // Just over the bound in total, each entry alone fits: one fewer.
        let entries: Vec<Entry> =
            (1..=2).map(|i| entry(i, MAX_APPEND_ENTRIES_BYTES / 2 / 59 + 100)).collect();
        match send(&mut peer, entries).await {
            Err(RPCError::PayloadTooLarge(p)) => assert_eq!(p.entries_hint(), 1),
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        // One entry over the bound is sent all the same (and fails here as
        // unreachable: nothing listens).
        let one = vec![entry(1, MAX_APPEND_ENTRIES_BYTES / 59 + 100)];
        assert!(matches!(send(&mut peer, one).await, Err(RPCError::Unreachable(_))));
    }

    #[test]
    fn message_too_large_is_told_apart_from_unreachable() {
        use tonic::{Code, Status};
        let too_large = [
            Status::out_of_range("Error, encoded message length too large: found 70000000 bytes"),
            Status::resource_exhausted("message too big"),
            Status::internal("h2 protocol error: frame size too big"),
        ];
        assert!(too_large.iter().all(is_too_large));
        let other =
            [Status::unavailable("connection refused"), Status::new(Code::Unknown, "transport error")];
        assert!(!other.iter().any(is_too_large));
    }
}
