//! An in-process fake Portrait node for client tests: it can name a leader
//! (`UNAVAILABLE` + `x-portrait-leader`), fail a number of calls with a bare
//! `UNAVAILABLE`, or answer like a leader. It counts the calls it receives
//! and notes the users they name. Reads know one user, `u1`, with one
//! `browse` attribute. Given a shard map, it serves it (else
//! `Admin.ShardMap` is UNIMPLEMENTED) and its answers carry the map's epoch
//! and cluster id.

// Each test crate uses part of this module.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use portrait_client::portrait_proto::v1::admin_server::{Admin, AdminServer};
use portrait_client::portrait_proto::v1::ingest_server::{Ingest, IngestServer};
use portrait_client::portrait_proto::v1::profiles_server::{Profiles, ProfilesServer};
use portrait_client::portrait_proto::v1::*;
use portrait_client::retry::LEADER_HEADER;
use portrait_client::routing::{CLUSTER_ID_HEADER, MAP_EPOCH_HEADER};
use portrait_client::shard_of;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
pub struct Fake {
    pub id: u64,
    /// When set, every call is refused with this leader hint.
    pub hint: Mutex<Option<String>>,
    /// Calls still to refuse with a bare UNAVAILABLE.
    pub unavailable: AtomicU32,
    /// Calls still to fail as a connection lost mid-call does: the handler
    /// panics, and the call's stream is reset.
    pub lost: AtomicU32,
    pub calls: AtomicU32,
    /// The shard map it serves, if any.
    pub map: Mutex<Option<ShardMapResponse>>,
    /// `Admin.ShardMap` calls answered.
    pub map_calls: AtomicU32,
    /// `Admin.ShardMap` calls received (counted on arrival).
    pub map_arrivals: AtomicU32,
    /// When set, a `ShardMap` call waits for a permit of it before it is
    /// answered (a node slow to give the map).
    pub map_gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// When set, writes and profile reads wait this long before they
    /// answer (a node slow to answer).
    pub stall: Mutex<Option<std::time::Duration>>,
    /// The users of the events written and profiles read, in arrival order.
    pub users: Mutex<Vec<String>>,
    /// The `authorization` header of each write, profile read, map and
    /// status call ("" when absent), in arrival order.
    pub authorizations: Mutex<Vec<String>>,
}

impl Fake {
    pub fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn map_calls(&self) -> u32 {
        self.map_calls.load(Ordering::SeqCst)
    }

    pub fn authorizations(&self) -> Vec<String> {
        self.authorizations.lock().unwrap().clone()
    }

    fn note_auth<T>(&self, request: &Request<T>) {
        let header = request.metadata().get("authorization").map(|v| v.to_str().unwrap().to_string());
        self.authorizations.lock().unwrap().push(header.unwrap_or_default());
    }

    pub fn users(&self) -> Vec<String> {
        self.users.lock().unwrap().clone()
    }

    pub fn set_map(&self, map: ShardMapResponse) {
        *self.map.lock().unwrap() = Some(map);
    }

    fn shards(&self) -> Option<u32> {
        self.map.lock().unwrap().as_ref().map(|m| m.shards)
    }

    /// `message` with the map's epoch and cluster id in its headers (when
    /// it has a map).
    fn answer<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        if let Some(map) = &*self.map.lock().unwrap() {
            response.metadata_mut().insert(MAP_EPOCH_HEADER, map.epoch.into());
            let id = format!("{:016x}", map.cluster_id).parse().expect("hex digits");
            response.metadata_mut().insert(CLUSTER_ID_HEADER, id);
        }
        response
    }

    fn note_users<'a>(&self, users: impl IntoIterator<Item = &'a String>) {
        self.users.lock().unwrap().extend(users.into_iter().cloned());
    }

    pub fn set_hint(&self, hint: Option<&str>) {
        *self.hint.lock().unwrap() = hint.map(str::to_string);
    }

    /// Counts the call and returns the refusal it gets, if any.
    async fn stalled(&self) {
        let stall = *self.stall.lock().unwrap();
        if let Some(stall) = stall {
            tokio::time::sleep(stall).await;
        }
    }

    fn refusal(&self) -> Option<Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(hint) = self.hint.lock().unwrap().clone() {
            let mut status = Status::unavailable(format!("node {} is not the leader", self.id));
            status.metadata_mut().insert(LEADER_HEADER, hint.parse().unwrap());
            return Some(status);
        }
        let lost = self.lost.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if lost.is_ok() {
            panic!("fake node {}: the call's stream is cut (a node killed mid-call)", self.id);
        }
        let take = self.unavailable.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        take.is_ok().then(|| Status::unavailable("no leader"))
    }

    fn apply(&self, events: &[Event], batches: u32) -> Result<WriteResponse, Status> {
        if let Some(i) = events.iter().position(|e| e.user_id.is_empty()) {
            return Err(Status::invalid_argument(format!("events[{i}].user_id: must not be empty")));
        }
        self.note_users(events.iter().map(|e| &e.user_id));
        let mut shards: Vec<ShardWrite> = Vec::new();
        for shard in events.iter().filter_map(|e| Some(shard_of(&e.user_id, self.shards()?))) {
            match shards.iter_mut().find(|s| s.shard == shard) {
                Some(part) => part.applied += 1,
                None => {
                    shards.push(ShardWrite { shard, applied: 1, log_index: self.id, ..Default::default() })
                }
            }
        }
        shards.sort_by_key(|s| s.shard);
        let applied = events.len() as u32;
        Ok(WriteResponse { applied, log_index: self.id, batches, shards, ..Default::default() })
    }
}

#[tonic::async_trait]
impl Ingest for Fake {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        self.note_auth(&request);
        self.stalled().await;
        if let Some(status) = self.refusal() {
            return Err(status);
        }
        Ok(self.answer(self.apply(&request.into_inner().events, 1)?))
    }

    async fn write_stream(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        if let Some(status) = self.refusal() {
            return Err(status);
        }
        let mut stream = request.into_inner();
        let mut events = Vec::new();
        let mut batches = 0;
        while let Some(batch) = stream.next().await {
            events.extend(batch?.events);
            batches += 1;
        }
        Ok(Response::new(self.apply(&events, batches)?))
    }
}

#[tonic::async_trait]
impl Admin for Fake {
    type BackupShardStream = tokio_stream::Empty<Result<BackupShardChunk, Status>>;

    async fn backup_shard(
        &self,
        _: Request<BackupShardRequest>,
    ) -> Result<Response<Self::BackupShardStream>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn restore_shard(
        &self,
        _: Request<Streaming<RestoreShardChunk>>,
    ) -> Result<Response<RestoreShardResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn get_schema(&self, _: Request<GetSchemaRequest>) -> Result<Response<GetSchemaResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn apply_schema(
        &self,
        _: Request<ApplySchemaRequest>,
    ) -> Result<Response<ApplySchemaResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn add_node(
        &self,
        _: Request<portrait_client::portrait_proto::v1::AddNodeRequest>,
    ) -> Result<Response<portrait_client::portrait_proto::v1::MembershipResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn transfer_leader(
        &self,
        _: Request<portrait_client::portrait_proto::v1::TransferLeaderRequest>,
    ) -> Result<Response<portrait_client::portrait_proto::v1::TransferLeaderResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn set_partition(
        &self,
        _: Request<portrait_client::portrait_proto::v1::SetPartitionRequest>,
    ) -> Result<Response<portrait_client::portrait_proto::v1::SetPartitionResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn confirm_clock(
        &self,
        _: Request<portrait_client::portrait_proto::v1::ConfirmClockRequest>,
    ) -> Result<Response<portrait_client::portrait_proto::v1::ConfirmClockResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn set_clock_offset(
        &self,
        _: Request<portrait_client::portrait_proto::v1::SetClockOffsetRequest>,
    ) -> Result<Response<portrait_client::portrait_proto::v1::SetClockOffsetResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn remove_node(
        &self,
        _: Request<portrait_client::portrait_proto::v1::RemoveNodeRequest>,
    ) -> Result<Response<portrait_client::portrait_proto::v1::MembershipResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn drain_node(
        &self,
        _: Request<portrait_client::portrait_proto::v1::DrainNodeRequest>,
    ) -> Result<Response<portrait_client::portrait_proto::v1::DrainNodeResponse>, Status> {
        Err(self.refusal().unwrap_or_else(|| Status::unimplemented("fake")))
    }

    async fn shard_map(
        &self,
        request: Request<ShardMapRequest>,
    ) -> Result<Response<ShardMapResponse>, Status> {
        self.note_auth(&request);
        self.map_arrivals.fetch_add(1, Ordering::SeqCst);
        let gate = self.map_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.expect("gate open").forget();
        }
        let map = self.map.lock().unwrap().clone().ok_or_else(|| Status::unimplemented("fake"))?;
        self.map_calls.fetch_add(1, Ordering::SeqCst);
        Ok(self.answer(ShardMapResponse { node_id: self.id, ..map }))
    }

    async fn locate(&self, _: Request<LocateRequest>) -> Result<Response<LocateResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.note_auth(&request);
        match self.refusal() {
            Some(status) => Err(status),
            None => Ok(Response::new(ClusterStatusResponse { node_id: self.id, ..Default::default() })),
        }
    }
}

#[tonic::async_trait]
impl Profiles for Fake {
    async fn get_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<GetProfileResponse>, Status> {
        self.note_auth(&request);
        self.stalled().await;
        if let Some(status) = self.refusal() {
            return Err(status);
        }
        let request = request.into_inner();
        self.note_users([&request.user_id]);
        let read_info = ReadInfo { node_id: self.id, applied_index: 9, ..Default::default() };
        Ok(self.answer(GetProfileResponse {
            profile: Some(profile(&request.user_id)),
            read_info: Some(read_info),
        }))
    }

    async fn batch_get_profiles(
        &self,
        request: Request<BatchGetProfilesRequest>,
    ) -> Result<Response<BatchGetProfilesResponse>, Status> {
        self.stalled().await;
        if let Some(status) = self.refusal() {
            return Err(status);
        }
        let user_ids = request.into_inner().user_ids;
        self.note_users(&user_ids);
        let profiles = user_ids.iter().map(|id| profile(id)).collect();
        let read_info = ReadInfo { node_id: self.id, ..Default::default() };
        Ok(self.answer(BatchGetProfilesResponse { profiles, read_info: Some(read_info) }))
    }
}

fn profile(user_id: &str) -> Profile {
    let mut profile = Profile { user_id: user_id.into(), ..Default::default() };
    if user_id == "u1" {
        let attr = AttributeValue {
            value: Some(Value::string("phone")),
            event_time_ms: 1_700_000_000_000,
            expires_at_ms: 0,
        };
        let family = FamilyData { attrs: [("category".to_string(), attr)].into(), history: vec![] };
        profile.found = true;
        profile.families.insert("browse".into(), family);
    }
    profile
}

/// A running fake node.
pub struct Node {
    pub addr: String,
    pub fake: Arc<Fake>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Node {
    pub async fn start(fake: Fake) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fake = Arc::new(fake);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(IngestServer::from_arc(fake.clone()))
            .add_service(AdminServer::from_arc(fake.clone()))
            .add_service(ProfilesServer::from_arc(fake.clone()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            });
        let task = tokio::spawn(async move { server.await.unwrap() });
        Node { addr, fake, stop, task }
    }

    /// `http://` + the address, as the client names endpoints.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and closes the listener.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// A map of `shards` shards, each replicated on every node of `nodes`
/// (id, address) and led by `leaders[shard]`.
pub fn shard_map(epoch: u64, nodes: &[(u64, &str)], leaders: &[u64]) -> ShardMapResponse {
    let replicas: Vec<ShardReplica> = nodes
        .iter()
        .map(|(id, addr)| ShardReplica { node_id: *id, addr: addr.to_string(), voter: true })
        .collect();
    let shard_replicas = (0..leaders.len() as u32)
        .map(|shard| ShardReplicas {
            shard,
            replicas: replicas.clone(),
            leader_id: leaders[shard as usize],
            applied_index: None,
        })
        .collect();
    ShardMapResponse {
        epoch,
        shards: leaders.len() as u32,
        replication: nodes.len() as u32,
        nodes: nodes.iter().map(|(id, addr)| MapNode { node_id: *id, addr: addr.to_string() }).collect(),
        shard_replicas,
        node_id: 0,
        draining: vec![],
        cluster_id: 0xa,
    }
}

/// The first user id `u0`, `u1`, ... of `shard` among `shards`, skipping `skip` of them.
pub fn user_of_shard(shard: u32, shards: u32, skip: usize) -> String {
    (0..).map(|i| format!("u{i}")).filter(|u| shard_of(u, shards) == shard).nth(skip).unwrap()
}

/// A page view of `user_id` with an event id (so that a write of it may
/// be retried).
pub fn event(user_id: &str) -> Event {
    Event { event_id: format!("e-{user_id}"), ..bare_event(user_id) }
}

/// A page view of `user_id` without an event id.
pub fn bare_event(user_id: &str) -> Event {
    Event { user_id: user_id.into(), family: "browse".into(), r#type: "view".into(), ..Default::default() }
}
