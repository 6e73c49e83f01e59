//! An in-process fake Portrait node for client tests: it can name a leader
//! (`UNAVAILABLE` + `x-portrait-leader`), fail a number of calls with a bare
//! `UNAVAILABLE`, or answer like a leader. It counts the calls it receives.
//! Reads know one user, `u1`, with one `browse` attribute.

// Each test crate uses part of this module.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use portrait_client::portrait_proto::v1::admin_server::{Admin, AdminServer};
use portrait_client::portrait_proto::v1::ingest_server::{Ingest, IngestServer};
use portrait_client::portrait_proto::v1::profiles_server::{Profiles, ProfilesServer};
use portrait_client::portrait_proto::v1::*;
use portrait_client::retry::LEADER_HEADER;
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
    pub calls: AtomicU32,
}

impl Fake {
    pub fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn set_hint(&self, hint: Option<&str>) {
        *self.hint.lock().unwrap() = hint.map(str::to_string);
    }

    /// Counts the call and returns the refusal it gets, if any.
    fn refusal(&self) -> Option<Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(hint) = self.hint.lock().unwrap().clone() {
            let mut status = Status::unavailable(format!("node {} is not the leader", self.id));
            status.metadata_mut().insert(LEADER_HEADER, hint.parse().unwrap());
            return Some(status);
        }
        let take = self.unavailable.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        take.is_ok().then(|| Status::unavailable("no leader"))
    }

    fn apply(&self, events: &[Event], batches: u32) -> Result<WriteResponse, Status> {
        if let Some(i) = events.iter().position(|e| e.user_id.is_empty()) {
            return Err(Status::invalid_argument(format!("events[{i}].user_id: must not be empty")));
        }
        Ok(WriteResponse { applied: events.len() as u32, log_index: self.id, batches, ..Default::default() })
    }
}

#[tonic::async_trait]
impl Ingest for Fake {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        if let Some(status) = self.refusal() {
            return Err(status);
        }
        Ok(Response::new(self.apply(&request.into_inner().events, 1)?))
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

    async fn shard_map(&self, _: Request<ShardMapRequest>) -> Result<Response<ShardMapResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn locate(&self, _: Request<LocateRequest>) -> Result<Response<LocateResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
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
        if let Some(status) = self.refusal() {
            return Err(status);
        }
        let request = request.into_inner();
        let read_info = ReadInfo { node_id: self.id, applied_index: 9, ..Default::default() };
        Ok(Response::new(GetProfileResponse {
            profile: Some(profile(&request.user_id)),
            read_info: Some(read_info),
        }))
    }

    async fn batch_get_profiles(
        &self,
        request: Request<BatchGetProfilesRequest>,
    ) -> Result<Response<BatchGetProfilesResponse>, Status> {
        if let Some(status) = self.refusal() {
            return Err(status);
        }
        let profiles = request.into_inner().user_ids.iter().map(|id| profile(id)).collect();
        Ok(Response::new(BatchGetProfilesResponse { profiles, read_info: None }))
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

pub fn event(user_id: &str) -> Event {
    Event { user_id: user_id.into(), family: "browse".into(), r#type: "view".into(), ..Default::default() }
}
