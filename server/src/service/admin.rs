//! `portrait.v1.Admin`.

use std::sync::Arc;
use std::time::Duration;

use portrait_proto::v1::admin_server::Admin;
use portrait_proto::v1::{
    backup_shard_chunk, restore_shard_chunk, BackupHeader, BackupShardChunk, BackupShardRequest,
    BackupTrailer, RestoreShardChunk, RestoreShardResponse,
};
use portrait_proto::v1::{
    AddNodeRequest, ApplySchemaRequest, ApplySchemaResponse, ClockStatus, ClusterStatusRequest,
    ClusterStatusResponse, ConfirmClockRequest, ConfirmClockResponse, DrainNodeRequest, DrainNodeResponse,
    GetSchemaRequest, GetSchemaResponse, LocateRequest, LocateResponse, MapNode, Member, MembershipResponse,
    PeerClock, RemoveNodeRequest, SetClockOffsetRequest, SetClockOffsetResponse, SetPartitionRequest,
    SetPartitionResponse, ShardMapRequest, ShardMapResponse, ShardReplica, ShardReplicas, ShardStatus,
    TransferLeaderRequest, TransferLeaderResponse,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status, Streaming};

use super::auth::{Caller, Grant};
use super::convert::families_to_pb;
use crate::audit::{AuditLog, Who};
use crate::error::Error;
use crate::node::map::{self, ShardMapView};
use crate::node::Node;
use crate::validate::validate_user_id;

pub struct AdminService {
    node: Arc<Node>,
    audit: Arc<AuditLog>,
}

impl AdminService {
    pub fn new(node: Arc<Node>, audit: Arc<AuditLog>) -> Self {
        AdminService { node, audit }
    }

    /// Runs `call` and writes its audit entry (crate::audit).
    async fn audited<T>(
        &self,
        who: Who,
        rpc: &str,
        args: serde_json::Value,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let mut pending = crate::audit::Pending::new(&self.audit, who, rpc, args);
        let result = call.await;
        pending.finish(result.as_ref().map(|_| ()));
        result
    }

    fn members(&self) -> Vec<Member> {
        members_pb(&self.node)
    }
}

/// Who made `request`: its token's name (set by the token check) and address.
pub fn who<T>(request: &Request<T>) -> Who {
    Who { token: request.extensions().get::<Caller>().map(|c| c.0.clone()), remote: request.remote_addr() }
}

/// The node's members, as `MembershipResponse` lists them.
pub fn members_pb(node: &Node) -> Vec<Member> {
    node.status().members.into_iter().map(member_to_pb).collect()
}

fn clock_to_pb(c: crate::clock::ClockStatus) -> ClockStatus {
    let peers = c
        .peers
        .into_iter()
        .map(|p| PeerClock {
            node_id: p.node_id,
            offset_ms: p.offset_ms,
            uncertainty_ms: p.uncertainty_ms,
            age_ms: p.age.as_millis() as u64,
        })
        .collect();
    ClockStatus {
        now_ms: c.now_ms,
        problem: c.problem.unwrap_or_default(),
        max_offset_ms: c.max_offset_ms,
        max_jump_ms: c.max_jump_ms,
        reference_ms: c.reference_ms.unwrap_or(0),
        peers,
    }
}

fn shard_status_to_pb(s: crate::node::ShardStatus) -> ShardStatus {
    ShardStatus {
        shard: s.shard,
        role: s.role,
        leader_id: s.leader_id.unwrap_or(0),
        term: s.term,
        last_log_index: s.last_log_index,
        applied_index: s.applied_index,
        schema_version: s.schema_version,
        voters: s.voters,
        learners: s.learners,
        membership_index: s.membership_index,
        state_bytes: s.state_bytes,
        apply_rules: s.rules,
        restoring: s.restoring.map(|m| portrait_proto::v1::ShardRestore { id: m.id, rows: m.rows }),
    }
}

fn replicas_to_pb(map: &ShardMapView, replicas: &[map::ReplicaView]) -> Vec<ShardReplica> {
    let replica = |r: &map::ReplicaView| ShardReplica {
        node_id: r.node,
        addr: map.addr(r.node).into(),
        voter: r.voter,
    };
    replicas.iter().map(replica).collect()
}

fn shard_map_to_pb(map: &ShardMapView, node_id: u64) -> ShardMapResponse {
    let shard = |s: &map::ShardReplicas| ShardReplicas {
        shard: s.shard,
        replicas: replicas_to_pb(map, &s.replicas),
        leader_id: s.leader.unwrap_or(0),
        applied_index: s.applied_index,
    };
    ShardMapResponse {
        epoch: map.epoch,
        shards: map.shards,
        replication: map.replication,
        nodes: map.nodes.iter().map(|(id, addr)| MapNode { node_id: *id, addr: addr.clone() }).collect(),
        shard_replicas: map.shard_replicas.iter().map(shard).collect(),
        node_id,
        draining: map.draining.clone(),
        cluster_id: map.cluster,
    }
}

fn member_to_pb(m: crate::node::MemberStatus) -> Member {
    Member {
        node_id: m.node_id,
        addr: m.addr,
        peer_addr: m.peer_addr,
        voter: m.voter,
        matched_index: m.matched_index.unwrap_or(0),
        lag_entries: m.lag_entries,
    }
}

/// Longest `restore_id` accepted.
const MAX_RESTORE_ID_BYTES: usize = 128;

/// Streams an exported shard: header, chunks, trailer (with the SHA-256 of
/// what was sent). The export (and the node's backup slot) is released when
/// the stream ends or the caller goes away.
/// Sends `item` unless the caller has taken nothing for `stall` (the
/// node's `--backup-stream-stall`) or hung up: false ends the stream, which
/// frees the export's slot and file.
async fn send_within<T>(tx: &tokio::sync::mpsc::Sender<T>, stall: Duration, item: T) -> bool {
    matches!(tokio::time::timeout(stall, tx.send(item)).await, Ok(Ok(())))
}

/// Streams an export: its header, its archive in chunks, its trailer. A
/// token removed from the token file (or that lost its role) meanwhile
/// ends the stream before the next chunk, as it does a `WriteStream`.
fn stream_export(
    node_id: u64,
    shard: u32,
    export: crate::node::ShardExport,
    stall: Duration,
    grant: Option<Grant>,
) -> tokio_stream::wrappers::ReceiverStream<Result<BackupShardChunk, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let chunk = |part| Ok(BackupShardChunk { part: Some(part) });
    tokio::spawn(async move {
        let header = BackupHeader {
            shard,
            node_id,
            applied_index: export.applied.map_or(0, |l| l.index),
            applied_term: export.applied.map_or(0, |l| l.leader_id.term),
            schema_version: export.schema_version,
            archive_bytes: export.bytes,
        };
        if !send_within(&tx, stall, chunk(backup_shard_chunk::Part::Header(header))).await {
            return;
        }
        let mut file = match tokio::fs::File::open(&export.file.path).await {
            Ok(f) => f,
            Err(e) => {
                send_within(&tx, stall, Err(Status::internal(format!("reading the export: {e}")))).await;
                return;
            }
        };
        let (mut hash, mut sent) = (Sha256::new(), 0u64);
        loop {
            let mut buf = vec![0u8; crate::limits::BACKUP_CHUNK_BYTES];
            let n = match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    send_within(&tx, stall, Err(Status::internal(format!("reading the export: {e}")))).await;
                    return;
                }
            };
            if let Err(refused) = Grant::recheck(grant.as_ref()) {
                send_within(&tx, stall, Err(refused)).await;
                return;
            }
            buf.truncate(n);
            hash.update(&buf);
            sent += n as u64;
            if !send_within(&tx, stall, chunk(backup_shard_chunk::Part::Data(buf))).await {
                return;
            }
        }
        let trailer = BackupTrailer { archive_bytes: sent, sha256: hex_digest(hash) };
        send_within(&tx, stall, chunk(backup_shard_chunk::Part::Trailer(trailer))).await;
        drop(export);
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn hex_digest(hash: Sha256) -> String {
    crate::auth::hex(&hash.finalize().into())
}

/// Receives a restore's archive (after its header) into `upload`'s file,
/// checking its size and SHA-256 against the header's.
async fn receive_archive(
    stream: &mut Streaming<RestoreShardChunk>,
    upload: &crate::node::ShardUpload,
    bytes: u64,
    sha256: &str,
    (stall, grant): (Duration, Option<&Grant>),
) -> Result<(), Status> {
    let mut file = tokio::fs::File::create(&upload.file.path).await.map_err(Error::internal)?;
    let (mut hash, mut received) = (Sha256::new(), 0u64);
    let stalled = |_| {
        Status::deadline_exceeded(format!("no archive chunk for {stall:?}: the restore's upload stalled"))
    };
    while let Some(message) = tokio::time::timeout(stall, stream.message()).await.map_err(stalled)?? {
        Grant::recheck(grant)?;
        let Some(restore_shard_chunk::Part::Data(data)) = message.part else {
            return Err(Error::invalid("part", "only data chunks may follow the header").into());
        };
        received += data.len() as u64;
        if received > bytes {
            return Err(
                Error::invalid("data", format!("more than the header's {bytes} archive bytes")).into()
            );
        }
        hash.update(&data);
        // This node's failure (a full disk), not the archive's: retried.
        file.write_all(&data).await.map_err(|e| {
            Error::Unavailable(format!(
                "writing the uploaded archive on this node failed: {e} (free disk space, then retry)"
            ))
        })?;
    }
    if received != bytes {
        return Err(Error::invalid(
            "data",
            format!("{received} archive bytes received, the header said {bytes}"),
        )
        .into());
    }
    let digest = hex_digest(hash);
    if digest != sha256.to_ascii_lowercase() {
        return Err(Status::data_loss(format!(
            "the archive's SHA-256 is {digest}, the header (the backup's manifest) says {sha256}: the file \
             was damaged; nothing was restored"
        )));
    }
    file.sync_all().await.map_err(Error::internal)?;
    Ok(())
}

#[tonic::async_trait]
impl Admin for AdminService {
    type BackupShardStream = tokio_stream::wrappers::ReceiverStream<Result<BackupShardChunk, Status>>;

    async fn backup_shard(
        &self,
        request: Request<BackupShardRequest>,
    ) -> Result<Response<Self::BackupShardStream>, Status> {
        let who = who(&request);
        let grant = request.extensions().get::<Grant>().cloned();
        let shard = request.into_inner().shard;
        let args = serde_json::json!({"shard": shard});
        let export = async { self.node.export_shard(shard).await.map_err(Status::from) };
        let export = self.audited(who, "Admin/BackupShard", args, export).await?;
        let stall = self.node.backup_stream_stall();
        Ok(Response::new(stream_export(self.node.id, shard, export, stall, grant)))
    }

    async fn restore_shard(
        &self,
        request: Request<Streaming<RestoreShardChunk>>,
    ) -> Result<Response<RestoreShardResponse>, Status> {
        let who = who(&request);
        let grant = request.extensions().get::<Grant>().cloned();
        let mut stream = request.into_inner();
        // Audited also when the header is missing (or does not come
        // within the stall limit).
        let stall = self.node.backup_stream_stall();
        let first = match tokio::time::timeout(stall, stream.message()).await {
            Ok(first) => first,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "header: no message within {} s (--backup-stream-stall)",
                stall.as_secs()
            ))),
        };
        let header = match &first {
            Ok(Some(RestoreShardChunk { part: Some(restore_shard_chunk::Part::Header(h)) })) => {
                Some(h.clone())
            }
            _ => None,
        };
        let args = header.as_ref().map_or(serde_json::json!({}), |h| {
            serde_json::json!({"shard": h.shard, "archive_bytes": h.archive_bytes, "restore_id": h.restore_id,
                "check_only": h.check_only})
        });
        let restore = async {
            first?;
            let Some(header) = header.clone() else {
                return Err(Error::invalid("header", "the first message must be the header").into());
            };
            if header.restore_id.is_empty() || header.restore_id.len() > MAX_RESTORE_ID_BYTES {
                return Err(Error::invalid(
                    "restore_id",
                    format!("must be 1 to {MAX_RESTORE_ID_BYTES} bytes"),
                )
                .into());
            }
            if header.sha256.len() != 64 || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::invalid("sha256", "must be 64 hex digits").into());
            }
            if header.shards != 0 && header.shards != self.node.shards() {
                return Err(Error::invalid(
                    "shards",
                    format!(
                        "the backup has {} shards, this cluster {}: its users belong to other shards here",
                        header.shards,
                        self.node.shards()
                    ),
                )
                .into());
            }
            if header.archive_format != 0 {
                let what = format!("shard {}'s backup archive", header.shard);
                crate::store::format::check_backup(what, header.archive_format)
                    .map_err(|e| Error::invalid("archive_format", e.to_string()))?;
            }
            if header.check_only {
                self.node.restore_check(header.shard, &header.restore_id, header.archive_bytes)?;
                return Ok(crate::node::RestoreSummary::default());
            }
            let upload =
                self.node.restore_upload(header.shard, &header.restore_id, header.archive_bytes).await?;
            receive_archive(
                &mut stream,
                &upload,
                header.archive_bytes,
                &header.sha256,
                (self.node.backup_stream_stall(), grant.as_ref()),
            )
            .await?;
            let id = crate::types::restore_attempt_id(
                &header.restore_id,
                &header.sha256,
                crate::wall_clock_ms().max(0) as u64,
            );
            Ok::<_, Status>(self.node.restore_shard(upload, id).await?)
        };
        let summary = self.audited(who, "Admin/RestoreShard", args, restore).await?;
        Ok(Response::new(RestoreShardResponse {
            shard: header.map_or(0, |h| h.shard),
            rows: summary.rows,
            bytes: summary.bytes,
            source_applied_index: summary.source_applied.map_or(0, |l| l.index),
            log_index: summary.log_index,
            resumed_rows: summary.resumed_rows,
        }))
    }

    async fn get_schema(&self, _: Request<GetSchemaRequest>) -> Result<Response<GetSchemaResponse>, Status> {
        let s = self.node.schema();
        Ok(Response::new(GetSchemaResponse {
            version: s.version,
            toml: s.schema.toml.clone(),
            families: families_to_pb(s.schema.families.iter()),
        }))
    }

    async fn apply_schema(
        &self,
        request: Request<ApplySchemaRequest>,
    ) -> Result<Response<ApplySchemaResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        let digest = crate::auth::hex(&crate::auth::sha256(&req.toml));
        let args =
            serde_json::json!({"dry_run": req.dry_run, "toml_bytes": req.toml.len(), "toml_sha256": digest});
        let (applied, unchecked_nodes) = self
            .audited(who, "Admin/ApplySchema", args, async {
                self.node.apply_schema(req.toml, req.dry_run).await.map_err(Status::from)
            })
            .await?;
        Ok(Response::new(ApplySchemaResponse {
            version: applied.version,
            families: families_to_pb(applied.schema.families.iter()),
            unchecked_nodes,
        }))
    }

    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        let args = serde_json::json!({
            "node_id": req.node_id, "addr": req.addr, "peer_addr": req.peer_addr, "learner": req.learner
        });
        let add = self.node.add_node(req.node_id, req.addr, req.peer_addr, req.learner);
        let log_index =
            self.audited(who, "Admin/AddNode", args, async { add.await.map_err(Status::from) }).await?;
        Ok(Response::new(MembershipResponse { log_index, members: self.members() }))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let who = who(&request);
        let node_id = request.into_inner().node_id;
        let args = serde_json::json!({"node_id": node_id});
        let remove = async { self.node.remove_node(node_id).await.map_err(Status::from) };
        let log_index = self.audited(who, "Admin/RemoveNode", args, remove).await?;
        Ok(Response::new(MembershipResponse { log_index, members: self.members() }))
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<DrainNodeResponse>, Status> {
        let who = who(&request);
        let node_id = request.into_inner().node_id;
        let args = serde_json::json!({"node_id": node_id});
        let drain = async { self.node.drain_node(node_id).await.map_err(Status::from) };
        let replicas = self.audited(who, "Admin/DrainNode", args, drain).await?;
        Ok(Response::new(DrainNodeResponse { node_id, replicas }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        let args = serde_json::json!({"node_id": req.node_id, "shard": req.shard});
        let transfer =
            async { self.node.transfer_leader(req.node_id, req.shard).await.map_err(Status::from) };
        let (leader_id, leader_addr) = self.audited(who, "Admin/TransferLeader", args, transfer).await?;
        Ok(Response::new(TransferLeaderResponse { leader_id, leader_addr }))
    }

    async fn set_partition(
        &self,
        request: Request<SetPartitionRequest>,
    ) -> Result<Response<SetPartitionResponse>, Status> {
        let who = who(&request);
        let req = request.into_inner();
        let args = serde_json::json!({"blocked_peers": req.blocked_peers, "drop_entries_from": req.drop_entries_from});
        let set =
            async { self.node.set_partition(req.blocked_peers, req.drop_entries_from).map_err(Status::from) };
        self.audited(who, "Admin/SetPartition", args, set).await?;
        Ok(Response::new(SetPartitionResponse {}))
    }

    async fn confirm_clock(
        &self,
        request: Request<ConfirmClockRequest>,
    ) -> Result<Response<ConfirmClockResponse>, Status> {
        let confirm = async { self.node.confirm_clock().map_err(Status::from) };
        let (now_ms, reference) =
            self.audited(who(&request), "Admin/ConfirmClock", serde_json::json!({}), confirm).await?;
        Ok(Response::new(ConfirmClockResponse { now_ms, reference_ms: reference.unwrap_or(0) }))
    }

    async fn set_clock_offset(
        &self,
        request: Request<SetClockOffsetRequest>,
    ) -> Result<Response<SetClockOffsetResponse>, Status> {
        let who = who(&request);
        let offset_ms = request.into_inner().offset_ms;
        let set = async { self.node.set_clock_offset(offset_ms).map_err(Status::from) };
        self.audited(who, "Admin/SetClockOffset", serde_json::json!({"offset_ms": offset_ms}), set).await?;
        Ok(Response::new(SetClockOffsetResponse {}))
    }

    async fn shard_map(&self, _: Request<ShardMapRequest>) -> Result<Response<ShardMapResponse>, Status> {
        Ok(Response::new(shard_map_to_pb(&self.node.shard_map(), self.node.id)))
    }

    async fn locate(&self, request: Request<LocateRequest>) -> Result<Response<LocateResponse>, Status> {
        let user_id = request.into_inner().user_id;
        validate_user_id(&user_id).map_err(Error::from)?;
        let map = self.node.shard_map();
        let shard = map.locate(&user_id).ok_or_else(|| {
            Error::Unavailable(
                "this node does not know the cluster's map yet (not created, or the node is still joining)"
                    .into(),
            )
        })?;
        Ok(Response::new(LocateResponse {
            shard: shard.shard,
            epoch: map.epoch,
            replicas: replicas_to_pb(&map, &shard.replicas),
            leader_id: shard.leader.unwrap_or(0),
            leader_addr: shard.leader.map(|l| map.addr(l).to_string()).unwrap_or_default(),
        }))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(cluster_status_pb(&self.node)))
    }
}

/// The node's `ClusterStatus` (also served to peers as `Raft.Status`).
pub fn cluster_status_pb(node: &Node) -> ClusterStatusResponse {
    let s = node.status();
    let members = s.members.into_iter().map(member_to_pb).collect();
    ClusterStatusResponse {
        node_id: s.node_id,
        role: s.role,
        leader_id: s.leader_id.unwrap_or(0),
        leader_addr: s.leader_addr.unwrap_or_default(),
        term: s.term,
        last_log_index: s.last_log_index,
        applied_index: s.applied_index,
        snapshot_index: s.snapshot_index,
        purged_index: s.purged_index,
        members,
        schema_version: s.schema_version,
        reevaluating: s.reevaluation.0,
        reevaluated_users: s.reevaluation.1,
        version: env!("CARGO_PKG_VERSION").into(),
        lag_entries: s.freshness.lag_entries,
        leader_contact_age_ms: s.freshness.leader_contact_age.map(|d| d.as_millis() as u64),
        logical_clock_ms: s.logical_clock_ms,
        clock: Some(clock_to_pb(s.clock)),
        shards: s.shards,
        shard_status: s.shard_status.into_iter().map(shard_status_to_pb).collect(),
        log_fsyncs: s.log_fsyncs,
        raft_batches_sent: s.raft_batches_sent,
        raft_batch_items_sent: s.raft_batch_items_sent,
        meta_voters: s.meta_voters,
        meta_leader_id: s.meta_leader_id.unwrap_or(0),
        snapshot_bytes_sent: s.snapshot_bytes_sent,
        incarnation: s.incarnation,
        replaced_peers: s.replaced_peers,
        meta_term: s.meta_term,
        cluster_id: s.cluster_id,
        apply_rules_oldest: crate::rules::oldest(),
        apply_rules_newest: crate::rules::newest(),
        cluster_apply_rules: s.cluster_rules,
    }
}
