//! [`PortraitClient`]: one handle for the Ingest, Profiles and Admin services.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use portrait_proto::v1::{
    admin_client::AdminClient, ingest_client::IngestClient, profiles_client::ProfilesClient, AddNodeRequest,
    ApplySchemaRequest, ApplySchemaResponse, BatchGetProfilesRequest, BatchGetProfilesResponse,
    ClusterStatusRequest, ClusterStatusResponse, ConfirmClockRequest, ConfirmClockResponse, Consistency,
    DrainNodeRequest, DrainNodeResponse, Event, GetProfileRequest, GetProfileResponse, GetSchemaRequest,
    GetSchemaResponse, LocateRequest, LocateResponse, MembershipResponse, RemoveNodeRequest,
    SetClockOffsetRequest, SetPartitionRequest, ShardMapRequest, ShardMapResponse, TransferLeaderRequest,
    TransferLeaderResponse, WriteRequest, WriteResponse,
};
use portrait_proto::v1::{BackupShardChunk, BackupShardRequest, RestoreShardChunk, RestoreShardResponse};
use portrait_proto::OUTCOME_UNKNOWN;
use tonic::{Code, Response, Status};

use crate::conn::{Chan, ConnectOptions, Router};
use crate::retry::{
    connection_lost, leader_hint, lost_after_sent, named, note_leader, unary, unary_change, unary_on_seed,
    unary_since,
};
use crate::routing::Routes;
use crate::split::{busiest_shard, gather_profiles, reindex, Parts};
use crate::ClientError;

/// Largest message sent or accepted (64 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How long one node may take to report its status to
/// [`PortraitClient::node_statuses`].
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// An async Portrait client. Cheap to clone; clones share the connections,
/// the leader they have learnt and the shard map. Writes and profile reads
/// go straight to the nodes serving their shards (see [`crate::routing`]);
/// unary calls follow leader redirects and retry `UNAVAILABLE` (see
/// [`crate::retry`]); [`PortraitClient::write_stream`] does not.
#[derive(Clone)]
pub struct PortraitClient {
    router: Router,
    routes: Arc<Routes>,
    /// Route by shard (see [`PortraitClient::without_routing`]).
    routing: bool,
}

impl PortraitClient {
    /// Connects to `http://host:port` or `host:port`, without a token.
    pub async fn connect(endpoint: &str) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, ConnectOptions::new()).await
    }

    /// Connects to `endpoint`; every call (to it and to the nodes it
    /// routes to) carries `options`' token.
    pub async fn connect_with(endpoint: &str, options: ConnectOptions) -> Result<Self, ClientError> {
        let router = Router::connect(endpoint, options).await?;
        let routes = Arc::new(Routes::new(router.seed(), router.options().clone()));
        Ok(Self { router, routes, routing: true })
    }

    /// Another client with this one's token and TLS settings, to `endpoint`.
    pub async fn connect_like(&self, endpoint: &str) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, self.router.options().clone()).await
    }

    /// This client, sending every call to the node it is connected to (or
    /// the leader that node names), which forwards per shard: for nodes
    /// clients cannot reach directly, and for tests of that forwarding.
    pub fn without_routing(self) -> Self {
        Self { routing: false, ..self }
    }

    /// The shard map to route by, if routing is on and a node gave one.
    async fn map(&self) -> Option<Arc<crate::routing::RouteMap>> {
        match self.routing {
            true => self.routes.map(&self.router).await,
            false => None,
        }
    }

    /// The endpoint calls currently go to (the leader, once one was named).
    pub fn endpoint(&self) -> String {
        self.router.current().endpoint
    }

    /// Writes one batch: the request goes whole to one node, which
    /// validates it and commits each shard's part (atomically per shard);
    /// the answer sums the parts, with one result per shard. A failure is
    /// the first failing part's, in shard order; parts of other shards may
    /// have been applied (retrying with the same event ids applies each
    /// event once).
    ///
    /// A batch whose events all carry an `event_id` is redirected and
    /// retried as [`crate::retry`] describes. A batch with an event
    /// without one is sent once: a resent batch could apply it twice (a
    /// part may have committed, or a timed-out one may still commit); only
    /// a connection that was never made (nothing sent) is tried once more,
    /// at the next node. Its
    /// failure says so, and a leader it names is used by the next call.
    pub async fn write(&self, events: Vec<Event>) -> Result<WriteResponse, ClientError> {
        let call = match events.iter().all(|e| !e.event_id.is_empty()) {
            true => Call::Write,
            false => Call::WriteWithoutIds,
        };
        self.within(call, self.write_unbounded(events)).await
    }

    async fn write_unbounded(&self, events: Vec<Event>) -> Result<WriteResponse, ClientError> {
        // Whole, so the node validates it whole (nothing of an invalid
        // request is written), to the leader of the shard most of its
        // events go to: that part is proposed without a hop, the node
        // forwards the others. An empty request is the server's to refuse.
        let map = self.map().await.filter(|_| !events.is_empty());
        let target = map.as_ref().and_then(|map| map.target(busiest_shard(&events, map), true));
        self.write_part(target, events).await
    }

    async fn write_part(
        &self,
        target: Option<&str>,
        events: Vec<Event>,
    ) -> Result<WriteResponse, ClientError> {
        if events.iter().any(|e| e.event_id.is_empty()) {
            return self.write_once(target, WriteRequest { events }).await;
        }
        let request = WriteRequest { events };
        self.routed(target, |ch| {
            let request = request.clone();
            async move { ingest(ch).write(request).await }
        })
        .await
    }

    /// One attempt at a write that is not safe to resend (see
    /// [`PortraitClient::write`]).
    async fn write_once(
        &self,
        target: Option<&str>,
        request: WriteRequest,
    ) -> Result<WriteResponse, ClientError> {
        let target = self.routes.reachable(target);
        let (channel, endpoint) = match target {
            Some(target) => (self.routes.channel(target)?, target.to_string()),
            None => {
                let conn = self.router.current();
                (conn.channel, conn.endpoint)
            }
        };
        let at = target.map(|target| AtTarget::new(&self.routes, target));
        let mut answer = ingest(channel).write(request.clone()).await;
        if let Some(at) = at {
            at.answered(&answer);
        }
        // A connection never made carried nothing: sent once more, to the
        // next node (any node forwards), which is still at most once.
        let mut endpoint = endpoint;
        if let Err(status) = &answer {
            if portrait_proto::never_sent(status) {
                self.routes.mark_stale();
                self.router.avoid(&endpoint);
                let next = self.router.current();
                if next.endpoint != endpoint {
                    answer = ingest(next.channel).write(request).await;
                    endpoint = next.endpoint;
                }
            }
        }
        match answer {
            Ok(response) => {
                self.router.note_epoch(response.metadata());
                Ok(response.into_inner())
            }
            Err(status) if status.code() == Code::Unavailable || connection_lost(&status) => {
                self.router.note_epoch(status.metadata());
                self.routes.mark_stale();
                note_leader(&self.router, &endpoint, &status);
                let lost = match lost_after_sent(&status) {
                    true => {
                        self.router.avoid(&endpoint);
                        format!(" (the connection was lost: {OUTCOME_UNKNOWN})")
                    }
                    false => String::new(),
                };
                let message = format!(
                    "{}{lost} (not retried: the batch has events without an event_id, which a resend could \
                     apply twice; give every event an event_id to have it retried)",
                    named(status.clone(), &endpoint).message()
                );
                Err(Status::with_metadata(status.code(), message, status.metadata().clone()).into())
            }
            Err(status) => {
                self.router.note_epoch(status.metadata());
                Err(status.into())
            }
        }
    }
}

tokio::task_local! {
    /// When the client's own deadline for the call under way passes (set
    /// by [`PortraitClient::within`]; unset for a call without one).
    static CALL_DEADLINE: tokio::time::Instant;
}

/// A call at a node the shard map named. Dropped before the node answered
/// because the client's deadline for the call passed there, or answered
/// with a connection that could not be made or was lost, it has the node
/// routed past for a while ([`Routes::unreachable`]). Dropped by the
/// caller before that deadline (its own timeout, a `select!` that took
/// another branch), it says nothing of the node.
struct AtTarget<'a> {
    routes: &'a Routes,
    target: &'a str,
}

impl<'a> AtTarget<'a> {
    fn new(routes: &'a Routes, target: &'a str) -> AtTarget<'a> {
        AtTarget { routes, target }
    }

    /// The node answered; its answer is `answer`.
    fn answered<T>(self, answer: &Result<T, Status>) {
        let gone = answer.as_ref().err().is_some_and(|s| portrait_proto::never_sent(s) || connection_lost(s));
        if gone {
            self.routes.unreachable(self.target);
        }
        std::mem::forget(self);
    }
}

impl Drop for AtTarget<'_> {
    fn drop(&mut self) {
        // The call's future is dropped inside its deadline's scope (tokio
        // sets a task-local while dropping the future that scopes it).
        let deadline_passed =
            CALL_DEADLINE.try_with(|deadline| tokio::time::Instant::now() >= *deadline).unwrap_or(false);
        if deadline_passed {
            self.routes.unreachable(self.target);
        }
    }
}

impl PortraitClient {
    /// `call` bounded by the options' deadline (if any): past it, dropped
    /// (its attempt's stream is reset, and the node stops working on it)
    /// and `DEADLINE_EXCEEDED`.
    async fn within<T>(
        &self,
        what: Call,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let Some(deadline) = self.router.options().call_deadline() else { return call.await };
        let until = tokio::time::Instant::now() + deadline;
        match tokio::time::timeout_at(until, CALL_DEADLINE.scope(until, call)).await {
            Ok(answer) => answer,
            Err(_) => {
                let outcome = match what {
                    Call::Write => {
                        format!("; {OUTCOME_UNKNOWN} (resent with the same event_ids, its events apply once)")
                    }
                    Call::WriteWithoutIds => format!(
                        "; {OUTCOME_UNKNOWN} (not to be resent as it is: the batch has events without an \
                         event_id, which a resend could apply twice)"
                    ),
                    Call::Read => String::new(),
                };
                let message =
                    format!("no answer within the client's deadline of {} ms{outcome}", deadline.as_millis());
                Err(Status::deadline_exceeded(message).into())
            }
        }
    }

    /// Runs `call` once on `target` (a node the shard map names), then,
    /// when there is none or it answers UNAVAILABLE (it may be down, or no
    /// longer lead), through the router with its redirects and retries
    /// (the retry budget counting from the first attempt; none once it is
    /// spent, so `retry_for(ZERO)` makes one attempt); the map is fetched
    /// again before the next call.
    async fn routed<T, F, Fut>(&self, target: Option<&str>, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(Chan) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let started = tokio::time::Instant::now();
        if let Some(target) = self.routes.reachable(target) {
            let at = AtTarget::new(&self.routes, target);
            let answer = call(self.routes.channel(target)?).await;
            at.answered(&answer);
            match answer {
                Ok(response) => {
                    self.router.note_epoch(response.metadata());
                    return Ok(response.into_inner());
                }
                Err(status) if status.code() == Code::Unavailable || connection_lost(&status) => {
                    self.router.note_epoch(status.metadata());
                    self.routes.mark_stale();
                    match leader_hint(&status) {
                        // A malformed hint is ignored: the router's own retries follow.
                        Some(hint) => {
                            let _ = self.router.follow(hint, target);
                        }
                        None => self.router.avoid(target),
                    }
                    // No budget left (`retry_for(ZERO)`: one attempt): the
                    // first attempt was the call's.
                    if started.elapsed() >= self.router.options().retry_budget() {
                        return Err(named(status, target).into());
                    }
                }
                Err(status) => {
                    self.router.note_epoch(status.metadata());
                    return Err(status.into());
                }
            }
        }
        unary_since(&self.router, started, call).await
    }

    /// Streams batches, each applied atomically; the response sums them.
    ///
    /// Not retried: the stream cannot be replayed. If the node names a leader,
    /// the client still moves there, so retrying the call reaches the leader.
    pub async fn write_stream<S>(&self, batches: S) -> Result<WriteResponse, ClientError>
    where
        S: Stream<Item = WriteRequest> + Send + 'static,
    {
        let conn = self.router.current();
        match ingest(conn.channel).write_stream(batches).await {
            Ok(response) => {
                self.router.note_epoch(response.metadata());
                Ok(response.into_inner())
            }
            Err(status) => {
                self.router.note_epoch(status.metadata());
                note_leader(&self.router, &conn.endpoint, &status);
                if !lost_after_sent(&status) {
                    // A node that could not be reached: the next call
                    // starts at another (nothing was sent).
                    if portrait_proto::never_sent(&status) {
                        self.router.avoid(&conn.endpoint);
                    }
                    return Err(named(status, &conn.endpoint).into());
                }
                // The next call goes elsewhere; the batches sent before the
                // connection was lost may have been applied.
                self.router.avoid(&conn.endpoint);
                let message = format!(
                    "{} (the connection was lost: {OUTCOME_UNKNOWN}; batches sent may have been applied: resend \
                     only events with an event_id, which apply once)",
                    named(status.clone(), &conn.endpoint).message()
                );
                Err(Status::with_metadata(status.code(), message, status.metadata().clone()).into())
            }
        }
    }

    /// Reads one profile; empty `families` means everything (all families,
    /// features and tags); otherwise only those families.
    pub async fn get_profile(
        &self,
        user_id: &str,
        families: &[String],
        consistency: Consistency,
    ) -> Result<GetProfileResponse, ClientError> {
        let request = GetProfileRequest {
            user_id: user_id.to_string(),
            families: families.to_vec(),
            consistency: consistency.into(),
            ..Default::default()
        };
        self.get_profile_request(request).await
    }

    /// Reads one profile with a full request (families, features and tags
    /// selection).
    ///
    /// A LOCAL read goes to a replica of the user's shard (the connected
    /// node when it hosts one), a LINEARIZABLE read to the shard's leader.
    pub async fn get_profile_request(
        &self,
        request: GetProfileRequest,
    ) -> Result<GetProfileResponse, ClientError> {
        self.within(Call::Read, self.get_profile_unbounded(request)).await
    }

    async fn get_profile_unbounded(
        &self,
        request: GetProfileRequest,
    ) -> Result<GetProfileResponse, ClientError> {
        let map = self.map().await;
        let leader = request.consistency == Consistency::Linearizable as i32;
        let target = map.as_ref().and_then(|m| m.target(m.shard_of(&request.user_id), leader));
        self.routed(target, |ch| {
            let request = request.clone();
            async move { profiles(ch).get_profile(request).await }
        })
        .await
    }

    /// Reads many profiles, answered in request order: one call per node
    /// serving their shards (as in [`PortraitClient::get_profile_request`]),
    /// all at once; the read info is the stalest node's.
    pub async fn batch_get_profiles(
        &self,
        user_ids: &[String],
        families: &[String],
        consistency: Consistency,
    ) -> Result<BatchGetProfilesResponse, ClientError> {
        self.within(Call::Read, self.batch_get_unbounded(user_ids, families, consistency)).await
    }

    async fn batch_get_unbounded(
        &self,
        user_ids: &[String],
        families: &[String],
        consistency: Consistency,
    ) -> Result<BatchGetProfilesResponse, ClientError> {
        let request = |user_ids: Vec<String>| BatchGetProfilesRequest {
            user_ids,
            families: families.to_vec(),
            consistency: consistency.into(),
            ..Default::default()
        };
        let map = self.map().await;
        let Some(map) = map.filter(|_| !user_ids.is_empty()) else {
            return self.batch_get_part(None, request(user_ids.to_vec())).await;
        };
        let leader = consistency == Consistency::Linearizable;
        let by_node = Parts::new(user_ids.to_vec(), |u| map.target(map.shard_of(u), leader));
        let parts = by_node.parts.into_iter().map(|(target, (positions, users))| {
            let part = self.batch_get_part(target, request(users));
            async move {
                let answer = part.await.map_err(|e| reindex(e, "user_ids", &positions))?;
                // One profile per id asked, in order (a node of another
                // version could answer fewer: never padded with empty ones).
                if answer.profiles.len() != positions.len() {
                    return Err(ClientError::Rpc(tonic::Status::internal(format!(
                        "a node answered {} profiles for {} user ids",
                        answer.profiles.len(),
                        positions.len()
                    ))));
                }
                Ok::<_, ClientError>((positions, answer.profiles, answer.read_info))
            }
        });
        let answers = futures::future::try_join_all(parts).await?;
        let (profiles, read_info) = gather_profiles(user_ids.len(), answers);
        Ok(BatchGetProfilesResponse { profiles, read_info })
    }

    async fn batch_get_part(
        &self,
        target: Option<&str>,
        request: BatchGetProfilesRequest,
    ) -> Result<BatchGetProfilesResponse, ClientError> {
        self.routed(target, |ch| {
            let request = request.clone();
            async move { profiles(ch).batch_get_profiles(request).await }
        })
        .await
    }

    /// Streams a copy of shard `shard` from the node at `addr` (a client
    /// address from the shard map), which must host a replica of it (see
    /// [`crate::backup`]). Not retried.
    pub async fn backup_shard_from(
        &self,
        addr: &str,
        shard: u32,
    ) -> Result<tonic::Streaming<BackupShardChunk>, ClientError> {
        let response = admin(self.routes.channel(addr)?).backup_shard(BackupShardRequest { shard }).await?;
        Ok(response.into_inner())
    }

    /// Sends a restore's header and archive to the node at `addr`, which
    /// must lead the shard (see [`crate::backup`]). Not retried.
    pub async fn restore_shard_to<S>(
        &self,
        addr: &str,
        chunks: S,
    ) -> Result<RestoreShardResponse, ClientError>
    where
        S: Stream<Item = RestoreShardChunk> + Send + 'static,
    {
        Ok(admin(self.routes.channel(addr)?).restore_shard(chunks).await?.into_inner())
    }

    /// The cluster's shard map as the answering node knows it.
    pub async fn shard_map(&self) -> Result<ShardMapResponse, ClientError> {
        let before = self.router.seen();
        let map =
            unary(&self.router, |ch| async move { admin(ch).shard_map(ShardMapRequest {}).await }).await?;
        // Calls routed by no map (backup, restore, admin) move on to the
        // cluster's other nodes when the one they use stops answering (the
        // seed stays among them). Not from a node that knows no map yet, nor
        // from one whose map is older than one already seen, nor from
        // another cluster's node.
        let same_cluster = before.cluster == 0 || before.cluster == map.cluster_id;
        if !map.nodes.is_empty() && same_cluster && map.epoch >= before.epoch {
            self.router
                .know_nodes(map.nodes.iter().map(|n| crate::conn::normalize_endpoint(&n.addr)).collect());
        }
        Ok(map)
    }

    /// Where `user_id`'s data lives: its shard, replicas and leader.
    pub async fn locate(&self, user_id: &str) -> Result<LocateResponse, ClientError> {
        let request = LocateRequest { user_id: user_id.to_string() };
        unary(&self.router, |ch| {
            let request = request.clone();
            async move { admin(ch).locate(request).await }
        })
        .await
    }

    /// The current schema, as TOML and parsed.
    pub async fn get_schema(&self) -> Result<GetSchemaResponse, ClientError> {
        unary(&self.router, |ch| async move { admin(ch).get_schema(GetSchemaRequest {}).await }).await
    }

    /// Validates a TOML schema and, unless `dry_run`, replicates it.
    pub async fn apply_schema(
        &self,
        toml: String,
        dry_run: bool,
    ) -> Result<ApplySchemaResponse, ClientError> {
        let request = ApplySchemaRequest { toml, dry_run };
        unary_change(&self.router, |ch| {
            let request = request.clone();
            async move { admin(ch).apply_schema(request).await }
        })
        .await
    }

    /// Raft and membership state of the node that answers (no redirect is
    /// needed: every node answers, only `UNAVAILABLE` is retried).
    pub async fn cluster_status(&self) -> Result<ClusterStatusResponse, ClientError> {
        unary_on_seed(
            &self.router,
            |ch| async move { admin(ch).cluster_status(ClusterStatusRequest {}).await },
        )
        .await
    }

    /// Adds a node reached by clients at `addr` and by the other nodes at
    /// `peer_addr` (as a learner, then a voter unless `learner`); goes to
    /// the leader.
    pub async fn add_node(
        &self,
        node_id: u64,
        addr: &str,
        peer_addr: &str,
        learner: bool,
    ) -> Result<MembershipResponse, ClientError> {
        let request =
            AddNodeRequest { node_id, addr: addr.to_string(), peer_addr: peer_addr.to_string(), learner };
        // Not sent again when its outcome is unknown: the membership change
        // it started is still in flight, and a retry would only be told so.
        unary_change(&self.router, |ch| {
            let request = request.clone();
            async move { admin(ch).add_node(request).await }
        })
        .await
    }

    /// Makes voter `node_id` the leader; goes to the leader, and returns
    /// once `node_id` leads (a few seconds: writes pause for about one
    /// leader lease meanwhile). A no-op if it already leads.
    pub async fn transfer_leader(&self, node_id: u64) -> Result<TransferLeaderResponse, ClientError> {
        self.transfer_leader_of(node_id, None).await
    }

    /// Makes voter `node_id` the leader of `shard` (`None`: of every shard
    /// the called node leads, as [`PortraitClient::transfer_leader`]).
    pub async fn transfer_leader_of(
        &self,
        node_id: u64,
        shard: Option<u32>,
    ) -> Result<TransferLeaderResponse, ClientError> {
        unary(&self.router, |ch| async move {
            admin(ch).transfer_leader(TransferLeaderRequest { node_id, shard }).await
        })
        .await
    }

    /// Test-only fault injection on the connected node: drop raft messages to
    /// `blocked_peers` (empty heals). Clears `drop_entries_from`.
    pub async fn set_partition(&self, blocked_peers: Vec<u64>) -> Result<(), ClientError> {
        self.set_faults(blocked_peers, Vec::new()).await
    }

    /// Test-only fault injection on the connected node: drop raft messages to
    /// `blocked_peers`, and log entries and snapshots arriving from
    /// `drop_entries_from` (a follower that lags while it still hears the
    /// leader). Both empty heal.
    pub async fn set_faults(
        &self,
        blocked_peers: Vec<u64>,
        drop_entries_from: Vec<u64>,
    ) -> Result<(), ClientError> {
        let request = SetPartitionRequest { blocked_peers, drop_entries_from };
        unary_on_seed(&self.router, |ch| {
            let request = request.clone();
            async move { admin(ch).set_partition(request).await }
        })
        .await
        .map(|_| ())
    }

    /// Accepts the connected node's clock as it is now, after its clock
    /// guard refused a jump (see docs/operations.md, "Clocks").
    pub async fn confirm_clock(&self) -> Result<ConfirmClockResponse, ClientError> {
        unary_on_seed(&self.router, |ch| async move { admin(ch).confirm_clock(ConfirmClockRequest {}).await })
            .await
    }

    /// Test-only fault injection on the connected node: shifts its wall
    /// clock by `offset_ms` (0 = the real clock).
    pub async fn set_clock_offset(&self, offset_ms: i64) -> Result<(), ClientError> {
        unary_on_seed(&self.router, |ch| async move {
            admin(ch).set_clock_offset(SetClockOffsetRequest { offset_ms }).await
        })
        .await
        .map(|_| ())
    }

    /// Starts draining a node (its replicas move to the others); goes to
    /// the meta leader. Returns once the drain is recorded.
    pub async fn drain_node(&self, node_id: u64) -> Result<DrainNodeResponse, ClientError> {
        unary_change(
            &self.router,
            |ch| async move { admin(ch).drain_node(DrainNodeRequest { node_id }).await },
        )
        .await
    }

    /// Shards that still have a replica on `node_id`: placed there by the
    /// shard map the answering node knows, or still in the raft membership
    /// (voters or learners) their leader reports, while a move is under
    /// way. Once it is 0 the node can be removed. A shard whose leader does
    /// not answer counts by the map alone (`RemoveNode` then says it cannot
    /// tell yet).
    pub async fn replicas_on(&self, node_id: u64) -> Result<usize, ClientError> {
        let map = self.shard_map().await?;
        let mut left: BTreeSet<u32> = map
            .shard_replicas
            .iter()
            .filter(|s| s.replicas.iter().any(|r| r.node_id == node_id))
            .map(|s| s.shard)
            .collect();
        // The map moves a replica first; its raft group drops the old one
        // only once the new one has caught up (a snapshot away).
        for status in self.node_statuses(&map).await.into_values().flatten() {
            let members = status.shard_status.iter().filter(|s| s.role == "Leader");
            left.extend(
                members
                    .filter(|s| s.voters.contains(&node_id) || s.learners.contains(&node_id))
                    .map(|s| s.shard),
            );
        }
        Ok(left.len())
    }

    /// `ClusterStatus` of every node of `map` (this client's own node
    /// included), each asked on a connection of its own within
    /// [`STATUS_TIMEOUT`], or why it gave none.
    pub async fn node_statuses(
        &self,
        map: &ShardMapResponse,
    ) -> BTreeMap<u64, Result<ClusterStatusResponse, String>> {
        // Retried for what is left of the wait after a connection that
        // took as long as it may, less a second: a node that answers
        // UNAVAILABLE throughout is reported by its own last error, not
        // as silent (the retry budget counts from the first call).
        let retry = STATUS_TIMEOUT.saturating_sub(crate::conn::CONNECT_TIMEOUT + Duration::from_secs(1));
        let options = self.router.options().clone().retry_for(retry);
        let asks = map.nodes.iter().map(|n| async {
            let status = async { Self::connect_with(&n.addr, options.clone()).await?.cluster_status().await };
            let answer = match tokio::time::timeout(STATUS_TIMEOUT, status).await {
                Ok(answer) => answer.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {} s", STATUS_TIMEOUT.as_secs())),
            };
            (n.node_id, answer)
        });
        futures::future::join_all(asks).await.into_iter().collect()
    }

    /// Removes a node from the cluster; goes to the leader.
    pub async fn remove_node(&self, node_id: u64) -> Result<MembershipResponse, ClientError> {
        unary_change(
            &self.router,
            |ch| async move { admin(ch).remove_node(RemoveNodeRequest { node_id }).await },
        )
        .await
    }
}

fn ingest(channel: Chan) -> IngestClient<Chan> {
    IngestClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn profiles(channel: Chan) -> ProfilesClient<Chan> {
    ProfilesClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub(crate) fn admin(channel: Chan) -> AdminClient<Chan> {
    AdminClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// What a call bounded by the deadline was, for its failure's message.
#[derive(Clone, Copy)]
enum Call {
    /// A write whose events all carry an `event_id`.
    Write,
    WriteWithoutIds,
    Read,
}
