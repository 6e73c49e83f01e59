//! The raft network: openraft RPCs to peers over the internal `Raft` gRPC
//! service, payloads encoded with bincode and tagged with their raft group.
//! All groups of a node share one connection per peer node ([`Channels`]:
//! one HTTP/2 connection carries every shard's messages), made lazily and
//! re-made after a failure.
//!
//! Batching: AppendEntries of all groups to one peer go through that peer's
//! queue ([`Channels::append`]). A task per peer sends what has queued as
//! one `AppendEntriesBatch` call, with at most `RAFT_BATCHES_IN_FLIGHT`
//! calls out at once: while they are out, the next messages of the other
//! groups queue behind them and leave together. A request touching 16
//! shards thus costs a few calls per follower instead of 16 (like TiKV's
//! raft message batching per store). The queue holds at most one message
//! per group (openraft awaits each answer before the group's next), a batch
//! at most `MAX_RAFT_BATCH_BYTES` (a larger message goes alone, one at a
//! time per peer on a lane of its own beside those calls). Votes and
//! snapshots stay single calls.
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
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::BasicNode;
use portrait_core::meta::MetaState;
use portrait_proto::v1::raft_client::RaftClient;
use portrait_proto::v1::{RaftBatch, RaftBatchReply, RaftPayload, StartElectionRequest};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tonic::transport::Channel;

use super::contact::PeerAcks;
use crate::error::Error;
use crate::limits::{
    MAX_APPEND_ENTRIES_BYTES, MAX_RAFT_BATCH_BYTES, MAX_RAFT_BATCH_ITEMS, MAX_RAFT_MESSAGE_BYTES,
    RAFT_BATCHES_IN_FLIGHT,
};
use crate::store::codec::{decode, encode};
use crate::types::{GroupId, NodeId, TypeConfig};

/// Peers this node must not send raft messages to (fault injection; empty
/// unless built with the cargo feature `fault-injection`).
pub use super::fault::Blocked;

/// The node's connections to its peers, by address, shared by all of its
/// raft groups, and each peer's AppendEntries queue.
#[derive(Clone, Default)]
pub struct Channels(Arc<Links>);

#[derive(Default)]
pub struct Links {
    /// By peer node and address: with TLS each channel checks that the
    /// node answering is that node (its certificate names it).
    clients: std::sync::Mutex<HashMap<(NodeId, String), RaftClient<Channel>>>,
    queues: std::sync::Mutex<HashMap<(NodeId, String), mpsc::UnboundedSender<Queued>>>,
    batches: AtomicU64,
    items: AtomicU64,
    /// Snapshot chunks of every group to every peer share this rate.
    snapshots: Pacer,
    snapshot_bytes: AtomicU64,
    /// Snapshots being sent at once (see [`MAX_SNAPSHOT_STREAMS`]).
    snapshot_streams: Streams,
    /// The meta group's applied state: each node's data dir incarnation,
    /// which raft messages are addressed to.
    cluster: std::sync::OnceLock<watch::Receiver<Arc<MetaState>>>,
    /// Peers the clock probe found answering from another data dir than
    /// the map records for them.
    replaced: std::sync::Mutex<BTreeSet<NodeId>>,
}

/// Turns to send a snapshot: [`MAX_SNAPSHOT_STREAMS`].
struct Streams(Arc<Semaphore>);

impl Default for Streams {
    fn default() -> Self {
        Streams(Arc::new(Semaphore::new(MAX_SNAPSHOT_STREAMS)))
    }
}

/// Snapshots a node sends at once, all groups and peers together; more
/// wait for a turn. They share `snapshot_send_mb_per_sec`, and a chunk's
/// wait for its share runs inside openraft's per-chunk timeout
/// (`SNAPSHOT_INSTALL_TIMEOUT`; the chunk's own call is then held to
/// `SNAPSHOT_CHUNK_TIMEOUT`, 60 s, past which it is sent again):
/// with chunks of up to one second of the rate, each waits about as many
/// seconds as streams are sending. A few at a time also finish the first
/// replicas sooner than all of them at once would.
pub const MAX_SNAPSHOT_STREAMS: usize = 4;

/// Paces the node's outgoing snapshot chunks to `bytes_per_sec` (0: no
/// limit), all groups and peers together: a chunk of `n` bytes starts no
/// earlier than the previous one's start plus the previous `n / rate`, so
/// sending averages the rate with bursts of one chunk (openraft sends
/// snapshots in chunks of `snapshot_max_chunk_size`, 4 MiB).
#[derive(Default)]
pub struct Pacer {
    bytes_per_sec: u64,
    next: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Pacer {
        Pacer { bytes_per_sec, next: Default::default() }
    }

    /// Waits until a chunk of `bytes` may start.
    pub async fn pace(&self, bytes: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let start = {
            let mut next = self.next.lock().expect("pacer lock");
            let now = tokio::time::Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// One group's AppendEntries waiting in a peer's queue.
pub struct Queued {
    payload: RaftPayload,
    ttl: Duration,
    /// When the caller queued it (its `ttl` counts from there).
    queued_at: tokio::time::Instant,
    reply: oneshot::Sender<Result<Vec<u8>, tonic::Status>>,
}

impl Channels {
    /// Channels whose snapshot chunks go out at `snapshot_bytes_per_sec`
    /// at most (0: no limit).
    pub fn new(snapshot_bytes_per_sec: u64) -> Channels {
        Channels(Arc::new(Links { snapshots: Pacer::new(snapshot_bytes_per_sec), ..Links::default() }))
    }

    /// Where the node's raft messages learn their targets' incarnations:
    /// the meta group's applied state (set once, when it opens).
    pub fn follow_cluster(&self, cluster: watch::Receiver<Arc<MetaState>>) {
        let _ = self.0.cluster.set(cluster);
    }

    /// The data dir incarnation the shard map records for `node` (0: not
    /// known).
    pub fn incarnation_of(&self, node: NodeId) -> u64 {
        let Some(cluster) = self.0.cluster.get() else { return 0 };
        let cluster = cluster.borrow();
        cluster.map.as_ref().and_then(|m| m.nodes.get(&node)).map_or(0, |n| n.incarnation)
    }

    /// Records whether `node` answers from another data dir than the map
    /// records; true if that changed.
    pub fn set_replaced(&self, node: NodeId, replaced: bool) -> bool {
        let mut set = self.0.replaced.lock().expect("replaced lock");
        match replaced {
            true => set.insert(node),
            false => set.remove(&node),
        }
    }

    /// Forgets replaced peers that are no longer `members`.
    pub fn retain_replaced(&self, members: &[NodeId]) {
        self.0.replaced.lock().expect("replaced lock").retain(|n| members.contains(n));
    }

    /// Peers answering from another data dir than the map records.
    pub fn replaced(&self) -> Vec<NodeId> {
        self.0.replaced.lock().expect("replaced lock").iter().copied().collect()
    }

    /// Bytes of snapshot chunks this node has sent (answered by the peer).
    pub fn snapshot_bytes_sent(&self) -> u64 {
        self.0.snapshot_bytes.load(Ordering::Relaxed)
    }

    /// The client for node `node` at `addr`, connecting lazily on first
    /// use (with TLS, refusing a peer whose certificate does not name
    /// `node`).
    pub fn get(&self, node: NodeId, addr: &str) -> Result<RaftClient<Channel>, tonic::transport::Error> {
        let mut map = self.0.clients.lock().expect("channels lock");
        let key = (node, addr.to_string());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let endpoint = crate::tls::peer_endpoint(addr, Some(node))?
            .connect_timeout(std::time::Duration::from_secs(2))
            .tcp_nodelay(true);
        let client = RaftClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        map.insert(key, client.clone());
        Ok(client)
    }

    /// Drops the connection to `addr` after a transport failure: the next
    /// call of any group connects anew.
    pub fn reset(&self, node: NodeId, addr: &str) {
        self.0.clients.lock().expect("channels lock").remove(&(node, addr.to_string()));
    }

    /// Sends one group's encoded AppendEntries to `addr` in the peer's
    /// next batch; the peer's encoded answer, or the status of the item or
    /// of the whole call. Gives up after `ttl`.
    pub async fn append(
        &self,
        node: NodeId,
        addr: &str,
        payload: RaftPayload,
        ttl: Duration,
    ) -> Result<Vec<u8>, tonic::Status> {
        let (reply, answer) = oneshot::channel();
        let queued = Queued { payload, ttl, queued_at: tokio::time::Instant::now(), reply };
        if self.queue(node, addr).send(queued).is_err() {
            return Err(tonic::Status::unavailable(format!("the queue to {addr} is closed")));
        }
        match tokio::time::timeout(ttl, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(tonic::Status::unavailable(format!("the batch to {addr} was dropped"))),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer from {addr} within {ttl:?}"))),
        }
    }

    /// `AppendEntriesBatch` calls sent since the node started.
    pub fn batches_sent(&self) -> u64 {
        self.0.batches.load(Ordering::Relaxed)
    }

    /// AppendEntries items those calls carried.
    pub fn batch_items_sent(&self) -> u64 {
        self.0.items.load(Ordering::Relaxed)
    }

    /// The queue to node `node` at `addr`, starting its sending task on
    /// first use.
    fn queue(&self, node: NodeId, addr: &str) -> mpsc::UnboundedSender<Queued> {
        let mut map = self.0.queues.lock().expect("queues lock");
        let key = (node, addr.to_string());
        if let Some(tx) = map.get(&key).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_queued(Arc::downgrade(&self.0), node, addr.to_string(), rx));
        map.insert(key, tx.clone());
        tx
    }
}

/// A peer's sending task: takes everything queued (up to the batch bounds)
/// whenever a call slot is free and sends it as one `AppendEntriesBatch`.
/// Ends when the node's [`Channels`] are dropped.
async fn send_queued(
    links: Weak<Links>,
    node: NodeId,
    addr: String,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    let slots = Arc::new(Semaphore::new(RAFT_BATCHES_IN_FLIGHT));
    let large = Arc::new(Semaphore::new(1));
    let mut carried: Option<Queued> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let first = match carried.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        if first.payload.data.len() > MAX_RAFT_BATCH_BYTES {
            // A message over the batch bound goes alone, on a lane of its
            // own: openraft resends one that does not fit its timeout, and
            // two such in the shared slots would hold back every other
            // group's appends and heartbeats to this peer meanwhile.
            drop(slot);
            let (links, addr, large) = (links.clone(), addr.clone(), large.clone());
            tokio::spawn(async move {
                let Ok(_lane) = large.acquire_owned().await else { return };
                // What is left of its caller's time (it waited for the lane).
                let mut first = first;
                first.ttl = first.ttl.saturating_sub(first.queued_at.elapsed());
                if first.reply.is_closed() || first.ttl.is_zero() {
                    return;
                }
                let Some(links) = links.upgrade() else { return };
                links.batches.fetch_add(1, Ordering::Relaxed);
                links.items.fetch_add(1, Ordering::Relaxed);
                let client = Channels(links).get(node, &addr);
                send_batch(client, vec![first]).await;
            });
            continue;
        }
        // Groups that proposed alongside this one queue theirs now.
        tokio::task::yield_now().await;
        let mut bytes = first.payload.data.len();
        let mut batch = vec![first];
        while batch.len() < MAX_RAFT_BATCH_ITEMS {
            let Ok(q) = rx.try_recv() else { break };
            if bytes + q.payload.data.len() > MAX_RAFT_BATCH_BYTES {
                carried = Some(q);
                break;
            }
            bytes += q.payload.data.len();
            batch.push(q);
        }
        // Callers that gave up (timed out) need no answer.
        batch.retain(|q| !q.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let Some(links) = links.upgrade() else { return };
        links.batches.fetch_add(1, Ordering::Relaxed);
        links.items.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let client = Channels(links).get(node, &addr);
        tokio::spawn(async move {
            send_batch(client, batch).await;
            drop(slot);
        });
    }
}

/// Sends one batch and hands each item its answer.
async fn send_batch(client: Result<RaftClient<Channel>, tonic::transport::Error>, batch: Vec<Queued>) {
    // The time its items have left: each caller's deadline counts from
    // when it queued.
    let ttl = batch.iter().map(|q| q.ttl.saturating_sub(q.queued_at.elapsed())).max().unwrap_or_default();
    let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.payload, q.reply)).unzip();
    let answer = match client {
        Ok(mut client) => {
            let mut request = tonic::Request::new(RaftBatch { items });
            request.set_timeout(ttl);
            client.append_entries_batch(request).await.map(tonic::Response::into_inner)
        }
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    match answer {
        Ok(RaftBatchReply { items }) if items.len() == replies.len() => {
            for (item, reply) in items.into_iter().zip(replies) {
                let result = match item.code {
                    0 => Ok(item.data),
                    code => Err(tonic::Status::new(tonic::Code::from(code), item.message)),
                };
                let _ = reply.send(result);
            }
        }
        Ok(RaftBatchReply { items }) => {
            let status = tonic::Status::internal(format!(
                "the peer answered {} items for a batch of {}",
                items.len(),
                replies.len()
            ));
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
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
    /// The group's snapshots (see [`SnapshotCheck`]).
    pub snapshots: Arc<SnapshotCheck>,
}

impl Network {
    pub fn new(group: GroupId, channels: Channels, blocked: Blocked) -> Network {
        Network { group, channels, blocked, acks: Arc::default(), snapshots: Arc::default() }
    }
}

/// A leader checks its snapshot archive (its trailing checksum) before it
/// first sends it: a follower would refuse a damaged one anyway
/// ([`super::incoming`]), and the leader builds a new one instead of
/// sending the damaged one again and again.
#[derive(Default)]
pub struct SnapshotCheck {
    /// A damaged snapshot was found: the log policy task has openraft build
    /// a new one ([`SnapshotCheck::take_rebuild`]).
    rebuild: std::sync::atomic::AtomicBool,
    /// The snapshot found sound last (its id).
    sound: std::sync::Mutex<Option<String>>,
}

impl SnapshotCheck {
    /// The archive found sound is to be read again before it is sent.
    fn forget_sound(&self) {
        *self.sound.lock().expect("snapshot check lock") = None;
    }

    /// Whether a new snapshot should be built (once per request).
    pub fn take_rebuild(&self) -> bool {
        self.rebuild.swap(false, Ordering::Relaxed)
    }

    /// Whether `snapshot`'s archive is sound, read once per snapshot id;
    /// for a damaged one a new snapshot of the applied state is requested,
    /// which openraft then sends.
    async fn is_sound(&self, group: GroupId, snapshot: &mut openraft::storage::Snapshot<TypeConfig>) -> bool {
        use tokio::io::AsyncSeekExt;
        let id = &snapshot.meta.snapshot_id;
        if self.sound.lock().expect("snapshot check lock").as_deref() == Some(id.as_str()) {
            return true;
        }
        let file = &mut snapshot.snapshot;
        let read = match file.seek(std::io::SeekFrom::Start(0)).await {
            Ok(_) => crate::store::checksum::archive_is_intact(file).await,
            Err(e) => Err(e),
        };
        if let Ok(true) = read {
            *self.sound.lock().expect("snapshot check lock") = Some(id.clone());
            return true;
        }
        tracing::error!(
            %group,
            snapshot = %id,
            error = ?read.err(),
            "the snapshot archive is damaged (its checksum does not match) or unreadable: not sent; building a \
             new snapshot"
        );
        self.rebuild.store(true, Ordering::Relaxed);
        false
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
            snapshots: self.snapshots.clone(),
            turn: Default::default(),
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
    snapshots: Arc<SnapshotCheck>,
    /// The snapshot stream's turn while one is sent ([`MAX_SNAPSHOT_STREAMS`]),
    /// given back once the last chunk has gone out: the wait for its answer
    /// (the follower's install) sends nothing.
    turn: Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>,
}

/// Gives a snapshot stream's turn back when dropped (the send ended, or
/// its future was dropped).
struct TurnBack(Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>);

impl Drop for TurnBack {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Peer {
    fn client<E: std::error::Error>(&mut self) -> Result<RaftClient<Channel>, RpcErr<E>> {
        self.channels.get(self.target, &self.addr).map_err(|e| RPCError::Network(NetworkError::new(&e)))
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
        self.check_blocked()?;
        let client = self.client()?;
        let mut request = tonic::Request::new(self.payload(data));
        request.set_timeout(option.hard_ttl());
        let response = f(client, request).await.map(|r| r.into_inner().data);
        self.settle(response, too_large)
    }

    /// One message of this group for the target, addressed to the data dir
    /// the map records for it.
    fn payload(&self, data: Vec<u8>) -> RaftPayload {
        RaftPayload {
            data,
            group: self.group.0,
            to_node: self.target,
            to_incarnation: self.channels.incarnation_of(self.target),
            schema_version: 0,
        }
    }

    /// Fault injection: messages to a blocked peer are dropped.
    fn check_blocked<E: std::error::Error>(&self) -> Result<(), RpcErr<E>> {
        if self.blocked.contains(self.target) {
            let e = std::io::Error::other(format!(
                "fault injection: messages to node {} are dropped",
                self.target
            ));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        Ok(())
    }

    /// Decodes the peer's answer to one call (or batch item), or maps its
    /// failure; a "message too large" failure is mapped by `too_large`.
    fn settle<Resp, E>(
        &self,
        response: Result<Vec<u8>, tonic::Status>,
        too_large: impl FnOnce(&tonic::Status) -> RpcErr<E>,
    ) -> Result<Resp, RpcErr<E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let response = match response {
            Ok(data) => data,
            Err(status) if is_too_large(&status) => {
                tracing::error!(peer = self.target, error = %status, "raft message too large for the transport");
                return Err(too_large(&status));
            }
            // The peer does not host this group (yet, or any more): the
            // node is up, the group's replica is not. Or it refuses messages
            // for the node it was (another data dir): nothing to reconnect.
            Err(status)
                if matches!(status.code(), tonic::Code::NotFound | tonic::Code::FailedPrecondition) =>
            {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            // A refusal by the peer's service: the connection is sound, and
            // every group shares it (a reset would make them all reconnect).
            Err(status) if refused_by_peer(status.code()) => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Err(status) => {
                self.channels.reset(self.target, &self.addr);
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&response).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(self.target, BasicNode::new(&self.addr), e))
        })
    }
}

/// Status codes that only a peer's service answers (never the transport
/// itself): the connection they came on works.
pub(crate) fn refused_by_peer(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        InvalidArgument
            | Aborted
            | PermissionDenied
            | Unauthenticated
            | ResourceExhausted
            | AlreadyExists
            | Unimplemented
    )
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
        let result = match self.check_blocked() {
            Ok(()) => {
                let payload = self.payload(data);
                let response =
                    self.channels.append(self.target, &self.addr, payload, option.hard_ttl()).await;
                self.settle(response, too_large)
            }
            Err(e) => Err(e),
        };
        // Any answer but a higher vote means the peer still takes this node as leader.
        if matches!(&result, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.acks.acked(self.target);
        }
        // A success: the peer's log matches up to the request's last entry,
        // and it committed up to the commit index sent, within that.
        if matches!(&result, Ok(AppendEntriesResponse::Success)) {
            let matched = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id).map(|l| l.index);
            if let Some(commit) = rpc.leader_commit.map(|c| c.index).min(matched) {
                self.acks.acked_commit(self.target, commit);
            }
        }
        result
    }

    /// openraft's chunked sending, once one of the node's
    /// [`MAX_SNAPSHOT_STREAMS`] turns is free (or the replication closes).
    async fn full_snapshot(
        &mut self,
        vote: openraft::Vote<NodeId>,
        mut snapshot: openraft::storage::Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        use openraft::network::snapshot_transport::{Chunked, SnapshotTransport};
        if !self.snapshots.is_sound(self.group, &mut snapshot).await {
            let e = std::io::Error::other(format!(
                "snapshot {} is damaged; a new one is being built",
                snapshot.meta.snapshot_id
            ));
            return Err(StreamingError::Unreachable(Unreachable::new(&e)));
        }
        // `cancel` is needed twice (waiting for a turn, then sending): a
        // watch carries its outcome to both.
        let (tx, rx) = tokio::sync::watch::channel(None::<ReplicationClosed>);
        let watcher = tokio::spawn(async move {
            let _ = tx.send(Some(cancel.await));
        });
        let closed = |mut rx: tokio::sync::watch::Receiver<Option<ReplicationClosed>>| async move {
            let got = rx.wait_for(Option::is_some).await.map(|c| c.clone());
            match got {
                Ok(Some(c)) => c,
                _ => std::future::pending().await,
            }
        };
        let streams = self.channels.0.snapshot_streams.0.clone();
        let turn = tokio::select! {
            turn = streams.acquire_owned() => turn.expect("the semaphore is never closed"),
            c = closed(rx.clone()) => {
                watcher.abort();
                return Err(StreamingError::Closed(c));
            }
        };
        *self.turn.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(turn);
        let back = TurnBack(self.turn.clone());
        let sent = Chunked::send_snapshot(self, vote, snapshot, closed(rx), option).await;
        drop(back);
        watcher.abort();
        // The follower found the archive damaged (on this disk since it
        // was checked, say): it is checked again before the next send,
        // which then has a new snapshot built instead of sending it again
        // and again.
        if matches!(&sent, Err(e) if e.to_string().contains(super::incoming::DAMAGED_ARCHIVE)) {
            self.snapshots.forget_sound();
        }
        sent
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let done = rpc.done;
        let data = encode(&rpc);
        let bytes = data.len();
        let send = async {
            self.channels.0.snapshots.pace(bytes).await;
            if done {
                // Sent: the wait for the install's answer holds no turn.
                self.turn.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
            }
            self.call(data, &option, network_error, |mut c, r| async move { c.install_snapshot(r).await })
                .await
        };
        // openraft's own timeout (`SNAPSHOT_INSTALL_TIMEOUT`) is for the
        // last chunk, whose answer waits for the install; any other chunk,
        // its wait for its share of the rate included, has
        // `SNAPSHOT_CHUNK_TIMEOUT`. Timed out here, its call is dropped
        // (its stream reset), not failed as a connection would be: the
        // connection, which every group to the peer shares, stays.
        let sent = match chunk_timeout(done, &option) {
            None => send.await,
            Some(limit) => match tokio::time::timeout(limit, send).await {
                Ok(sent) => sent,
                Err(_) => Err(RPCError::Network(NetworkError::new(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("snapshot chunk not answered within {} s; sent again", limit.as_secs()),
                )))),
            },
        };
        if sent.is_ok() {
            self.channels.0.snapshot_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        sent
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(encode(&rpc), &option, network_error, |mut c, r| async move { c.vote(r).await }).await
    }
}

/// The limit a snapshot chunk's call is held to below openraft's own
/// (`option`'s, `SNAPSHOT_INSTALL_TIMEOUT`): none for the last chunk
/// (`done`: its answer waits for the install), `SNAPSHOT_CHUNK_TIMEOUT`
/// for any other.
fn chunk_timeout(done: bool, option: &RPCOption) -> Option<std::time::Duration> {
    let limit = super::SNAPSHOT_CHUNK_TIMEOUT;
    (!done && option.hard_ttl() > limit).then_some(limit)
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
        let endpoint = crate::tls::peer_endpoint(addr, Some(target))
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

    #[test]
    fn the_last_snapshot_chunk_waits_for_the_install_and_the_others_for_the_chunk_s_time() {
        let tuning = crate::raft::RaftTuning::default();
        let config = tuning.openraft_config().unwrap();
        let option = RPCOption::new(config.install_snapshot_timeout());
        assert_eq!(option.hard_ttl(), crate::raft::SNAPSHOT_INSTALL_TIMEOUT);
        assert_eq!(chunk_timeout(true, &option), None);
        assert_eq!(chunk_timeout(false, &option), Some(crate::raft::SNAPSHOT_CHUNK_TIMEOUT));
        // openraft's own binds when it is the shorter.
        let short = RPCOption::new(std::time::Duration::from_secs(5));
        assert_eq!(chunk_timeout(false, &short), None);
    }

    #[tokio::test]
    async fn snapshot_chunks_go_out_at_the_paced_rate() {
        // 10 MB/s, chunks of 2 MB: each takes 200 ms of the budget, so the
        // fifth starts 800 ms after the first. (Times are wide so that a
        // loaded machine's scheduling delays stay well inside them.)
        let pacer = Pacer::new(10_000_000);
        let started = std::time::Instant::now();
        for _ in 0..5 {
            pacer.pace(2_000_000).await;
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(795), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        // A pause spends no budget in advance: after it, the next chunk
        // starts at once (not after a chunk's 200 ms).
        tokio::time::sleep(Duration::from_millis(400)).await;
        let now = std::time::Instant::now();
        pacer.pace(2_000_000).await;
        assert!(now.elapsed() < Duration::from_millis(150), "{:?}", now.elapsed());
        // No limit: never waits.
        let unlimited = Pacer::new(0);
        let now = std::time::Instant::now();
        for _ in 0..1_000 {
            unlimited.pace(64 << 20).await;
        }
        assert!(now.elapsed() < Duration::from_secs(1));
    }

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
        peer.append_entries(rpc, RPCOption::new(Duration::from_secs(5))).await
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

    /// A peer that holds each batch until the test lets it go, records the
    /// batch sizes and groups, and answers NOT_FOUND for group 99.
    #[derive(Clone)]
    struct HeldPeer {
        sizes: Arc<std::sync::Mutex<Vec<usize>>>,
        groups: Arc<std::sync::Mutex<Vec<u32>>>,
        release: Arc<Semaphore>,
    }

    impl HeldPeer {
        /// The peer, listening; and its address.
        async fn start() -> (HeldPeer, String) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = format!("http://{}", listener.local_addr().unwrap());
            let held = HeldPeer {
                sizes: Arc::default(),
                groups: Arc::default(),
                release: Arc::new(Semaphore::new(0)),
            };
            let server = portrait_proto::v1::raft_server::RaftServer::new(held.clone())
                .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(server)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            (held, addr)
        }
    }

    #[tonic::async_trait]
    impl portrait_proto::v1::raft_server::Raft for HeldPeer {
        async fn append_entries_batch(
            &self,
            req: tonic::Request<RaftBatch>,
        ) -> Result<tonic::Response<RaftBatchReply>, tonic::Status> {
            let items = req.into_inner().items;
            self.sizes.lock().unwrap().push(items.len());
            self.groups.lock().unwrap().extend(items.iter().map(|i| i.group));
            self.release.acquire().await.expect("open").forget();
            let ok: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
                Ok(AppendEntriesResponse::Success);
            let items = items
                .iter()
                .map(|i| match i.group {
                    99 => portrait_proto::v1::RaftItemReply {
                        code: tonic::Code::NotFound as i32,
                        message: "node 2 hosts no replica of shard 99".into(),
                        ..Default::default()
                    },
                    _ => portrait_proto::v1::RaftItemReply { data: encode(&ok), ..Default::default() },
                })
                .collect();
            Ok(tonic::Response::new(RaftBatchReply { items }))
        }
        async fn append_entries(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("batches only"))
        }
        async fn vote(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn install_snapshot(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn start_election(
            &self,
            _: tonic::Request<StartElectionRequest>,
        ) -> Result<tonic::Response<portrait_proto::v1::StartElectionResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn clock(
            &self,
            _: tonic::Request<portrait_proto::v1::ClockRequest>,
        ) -> Result<tonic::Response<portrait_proto::v1::ClockResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn forward_write(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn forward_read(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn forward_writes(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn status(
            &self,
            _: tonic::Request<portrait_proto::v1::ClusterStatusRequest>,
        ) -> Result<tonic::Response<portrait_proto::v1::ClusterStatusResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn join(
            &self,
            _: tonic::Request<portrait_proto::v1::AddNodeRequest>,
        ) -> Result<tonic::Response<portrait_proto::v1::MembershipResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn balance_leader(
            &self,
            _: tonic::Request<portrait_proto::v1::BalanceLeaderRequest>,
        ) -> Result<tonic::Response<portrait_proto::v1::TransferLeaderResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn check_schema(
            &self,
            _: tonic::Request<portrait_proto::v1::CheckSchemaRequest>,
        ) -> Result<tonic::Response<portrait_proto::v1::CheckSchemaResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn read_index(
            &self,
            _: tonic::Request<portrait_proto::v1::ReadIndexRequest>,
        ) -> Result<tonic::Response<portrait_proto::v1::ReadIndexResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }

    #[tokio::test]
    async fn groups_queued_behind_calls_in_flight_leave_in_one_batch_and_fail_alone() {
        let (held, addr) = HeldPeer::start().await;
        let channels = Channels::default();
        let groups: Vec<u32> = (0..9).chain([99]).collect();
        let mut calls = Vec::new();
        for &g in &groups {
            let mut network = Network::new(GroupId(g), channels.clone(), Blocked::default());
            let mut peer = network.new_client(2, &BasicNode::new(&addr)).await;
            calls.push(tokio::spawn(async move { send(&mut peer, vec![]).await }));
            // The first calls leave at once and are held by the peer.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while held.sizes.lock().unwrap().len() < RAFT_BATCHES_IN_FLIGHT {
            assert!(std::time::Instant::now() < deadline, "calls did not arrive");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Everything else is queued; let the calls go.
        held.release.add_permits(100);
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await.unwrap());
        }
        let sizes = held.sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), groups.len(), "{sizes:?}");
        assert_eq!(sizes.len(), RAFT_BATCHES_IN_FLIGHT + 1, "the rest left together: {sizes:?}");
        assert_eq!((channels.batches_sent(), channels.batch_items_sent()), (sizes.len() as u64, 10));
        for (g, result) in groups.iter().zip(results) {
            match g {
                99 => assert!(matches!(result, Err(RPCError::Unreachable(_))), "{result:?}"),
                _ => assert!(matches!(result, Ok(AppendEntriesResponse::Success)), "group {g}: {result:?}"),
            }
        }
    }

    /// Two groups' appends over the batch bound, both held by the peer (as
    /// by a slow link): they take one lane of their own, one at a time, and
    /// another group's heartbeat still leaves at once.
    #[tokio::test]
    async fn appends_over_the_batch_bound_never_hold_back_other_groups() {
        let (held, addr) = HeldPeer::start().await;
        let channels = Channels::default();
        let per_event = (encode(&entry(1, 1001)).len() - encode(&entry(1, 1)).len()) / 1000;
        let events = MAX_RAFT_BATCH_BYTES / per_event + 1000;
        let mut calls = Vec::new();
        for g in [1, 2, 3] {
            let mut network = Network::new(GroupId(g), channels.clone(), Blocked::default());
            let mut peer = network.new_client(2, &BasicNode::new(&addr)).await;
            let entries = if g == 3 { vec![] } else { vec![entry(1, events)] };
            calls.push(tokio::spawn(async move { send(&mut peer, entries).await }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !{
            let arrived = held.groups.lock().unwrap();
            arrived.contains(&3) && arrived.len() >= 2
        } {
            assert!(
                std::time::Instant::now() < deadline,
                "the heartbeat of group 3 waited behind the large appends: {:?}",
                held.groups.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // On a loaded machine a large append may still be encoding when the
        // heartbeat leaves, so arrival order is not the point: while the
        // peer holds one large append, the other waits and the heartbeat
        // does not.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let first = held.groups.lock().unwrap().clone();
        let large: Vec<u32> = first.iter().copied().filter(|&g| g != 3).collect();
        assert_eq!((first.len(), large.len()), (2, 1), "one large append at a time: {first:?}");
        held.release.add_permits(100);
        for call in calls {
            assert!(matches!(call.await.unwrap(), Ok(AppendEntriesResponse::Success)));
        }
        let arrived = held.groups.lock().unwrap().clone();
        let mut sorted = arrived.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![1, 2, 3], "{arrived:?}");
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
