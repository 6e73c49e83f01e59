//! Online backup and restore (docs/operations.md, "Backup and restore").
//!
//! [`backup`] copies every shard of a serving cluster into a directory:
//! one archive per shard (`shard-NNNNN.snap`, the shard's key range as SST
//! files, consistent at the applied index its replica had when the copy
//! was taken), the schema (`schema.toml`) and `manifest.json` (the
//! cluster's layout, the schema, and per shard the file's size, SHA-256 and
//! applied index), written last: a directory without a manifest is not a
//! backup. Shards are copied from a follower when one is reachable, so
//! leaders keep their resources for writes. Each shard is consistent on its
//! own; shards are copied one after another (a write is atomic per shard,
//! never across shards, so no cross-shard guarantee is lost).
//!
//! [`restore`] loads such a directory into a new cluster with the same
//! number of shards (any number of nodes): it checks every file against
//! the manifest before it changes anything, applies the backup's schema,
//! then sends each shard's archive to the shard's leader, which proposes
//! the rows through the shard's raft log.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use portrait_proto::v1::{
    backup_shard_chunk, restore_shard_chunk, RestoreHeader, RestoreShardChunk, ShardMapResponse,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::{human_bytes, ClientError, PortraitClient};

/// The manifest's format; a restore refuses others.
pub const MANIFEST_FORMAT: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
const CHUNK_BYTES: usize = 1024 * 1024;

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub backup_id: String,
    pub portrait_version: String,
    pub created_unix_ms: u64,
    /// The cluster's number of shards; a restore needs the same.
    pub shards: u32,
    pub replication: u32,
    /// The meta group's state: the shard map's epoch, nodes and placement.
    pub map_epoch: u64,
    pub nodes: Vec<ManifestNode>,
    pub schema: ManifestSchema,
    pub shard_files: Vec<ShardFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestNode {
    pub node_id: u64,
    pub addr: String,
    /// Shards this node held replicas of.
    pub shards: Vec<u32>,
}

/// The cluster's schema when the backup began (0: the built-in one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestSchema {
    pub version: u64,
    pub toml: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardFile {
    pub shard: u32,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// The shard's log position the copy is consistent at.
    pub applied_index: u64,
    pub applied_term: u64,
    pub schema_version: u64,
    /// The node whose replica was copied.
    pub node_id: u64,
}

/// What a restore did per shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredShard {
    pub shard: u32,
    /// Restored from this backup by an earlier run (which stopped before
    /// the other shards were done): skipped, and the figures are 0.
    pub earlier: bool,
    pub rows: u64,
    pub bytes: u64,
    pub source_applied_index: u64,
    pub log_index: u64,
    /// Rows an earlier attempt of this restore had applied to the shard
    /// (its leader was lost midway), kept: the restore went on after them.
    pub resumed_rows: u64,
}

fn shard_file_name(shard: u32) -> String {
    format!("shard-{shard:05}.snap")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn config(msg: impl Into<String>) -> ClientError {
    ClientError::Backup(msg.into())
}

fn hex(hash: Sha256) -> String {
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Backs up every shard of the cluster `client` talks to into `dir`
/// (created; refused if it exists and is not empty). `progress` gets a line
/// per step.
pub async fn backup(
    client: &PortraitClient,
    dir: &Path,
    progress: impl Fn(&str),
) -> Result<Manifest, ClientError> {
    if dir.exists() && std::fs::read_dir(dir).map_err(io_at(dir))?.next().is_some() {
        return Err(config(format!("{} is not empty: back up into a new directory", dir.display())));
    }
    // Private: the archives hold every profile (an empty directory given
    // is made private too). Its entry in its parent is made durable.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(io_at(dir))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(io_at(dir))?;
    sync_dir(dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    let mut schema = client.get_schema().await?;
    let map = client.shard_map().await?;
    if map.shards == 0 || map.shard_replicas.len() != map.shards as usize {
        return Err(config("the node gave no shard map yet (is the cluster created?)"));
    }
    let started = Instant::now();
    let mut files = Vec::new();
    let mut total = 0u64;
    for shard in 0..map.shards {
        let file = backup_one(client, &map, shard, dir).await?;
        total += file.bytes;
        progress(&format!(
            "shard {shard}: {} at index {} from node {} ({}/{})",
            human_bytes(file.bytes),
            file.applied_index,
            file.node_id,
            shard + 1,
            map.shards
        ));
        files.push(file);
    }
    // A schema applied while the shards were copied leaves shards under
    // different versions, and the manifest must name the one every
    // archive's rows were written under (restore applies it first): the
    // schema is read again and the shards under another version copied
    // again (a shard applies a committed version within seconds).
    for round in 0.. {
        let versions: BTreeSet<u64> = files.iter().map(|f| f.schema_version).collect();
        if versions.len() == 1 && versions.contains(&schema.version) {
            break;
        }
        if round == 3 {
            return Err(config(format!(
                "the cluster's schema changed during the backup (the shards were copied under versions \
                 {versions:?}, the cluster is at {}): run the backup again into a new directory",
                schema.version
            )));
        }
        if round > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        schema = client.get_schema().await?;
        for file in files.iter_mut().filter(|f| f.schema_version != schema.version) {
            let again = backup_one(client, &map, file.shard, dir).await?;
            progress(&format!(
                "shard {}: copied again, as the schema changed during the backup (version {} -> {})",
                file.shard, file.schema_version, again.schema_version
            ));
            total = total - file.bytes + again.bytes;
            *file = again;
        }
    }
    let nodes = map
        .nodes
        .iter()
        .map(|n| ManifestNode {
            node_id: n.node_id,
            addr: n.addr.clone(),
            shards: map
                .shard_replicas
                .iter()
                .filter(|s| s.replicas.iter().any(|r| r.node_id == n.node_id))
                .map(|s| s.shard)
                .collect(),
        })
        .collect();
    let created_unix_ms = now_ms();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        backup_id: format!("backup-{created_unix_ms}"),
        portrait_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_ms,
        shards: map.shards,
        replication: map.replication,
        map_epoch: map.epoch,
        nodes,
        schema: ManifestSchema { version: schema.version, toml: schema.toml.clone() },
        shard_files: files,
    };
    let schema_file = dir.join("schema.toml");
    write_synced(&schema_file, schema.toml.as_bytes()).map_err(io_at(&schema_file))?;
    // The shard files' names are durable before the manifest that lists
    // them: a manifest is only ever found beside its files.
    sync_dir(dir)?;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| config(e.to_string()))?;
    let tmp = dir.join("manifest.json.tmp");
    write_synced(&tmp, &json).map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, dir.join(MANIFEST_FILE)).map_err(io_at(&tmp))?;
    sync_dir(dir)?;
    progress(&format!(
        "backup {}: {} shards, {} in {:.1} s",
        manifest.backup_id,
        map.shards,
        human_bytes(total),
        started.elapsed().as_secs_f64()
    ));
    Ok(manifest)
}

/// An I/O error that names the path it happened at.
fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |e| config(format!("{}: {e}", path.display()))
}

/// Makes the entries of directory `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), ClientError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

/// Files of a backup: readable by their owner only (mode 0600).
fn private_file() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = private_file().open(path)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()
}

/// Copies one shard from the first of its replicas that can serve it:
/// followers first, then the leader.
async fn backup_one(
    client: &PortraitClient,
    map: &ShardMapResponse,
    shard: u32,
    dir: &Path,
) -> Result<ShardFile, ClientError> {
    let mut map = std::borrow::Cow::Borrowed(map);
    // The latest error of each replica tried, by node.
    let mut failed: BTreeMap<u64, String> = BTreeMap::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            // Replicas move (a drain, a rebalance) during a long backup.
            if let Ok(newer) = client.shard_map().await {
                if newer.shard_replicas.len() == map.shard_replicas.len() {
                    map = std::borrow::Cow::Owned(newer);
                }
            }
        }
        let replicas = &map.shard_replicas[shard as usize];
        let leader = replicas.leader_id;
        let mut candidates: Vec<_> = replicas.replicas.iter().collect();
        candidates.sort_by_key(|r| (r.node_id == leader, !r.voter, r.node_id));
        for replica in candidates {
            match fetch_shard(client, &replica.addr, shard, dir).await {
                Ok(file) => return Ok(file),
                Err(e) => drop(failed.insert(replica.node_id, format!("node {}: {e}", replica.node_id))),
            }
        }
    }
    if failed.is_empty() {
        return Err(config(format!("shard {shard} has no replica in the map")));
    }
    let errors: Vec<String> = failed.into_values().collect();
    Err(config(format!("shard {shard}: no replica could be copied ({})", errors.join("; "))))
}

async fn fetch_shard(
    client: &PortraitClient,
    addr: &str,
    shard: u32,
    dir: &Path,
) -> Result<ShardFile, ClientError> {
    let at = |e: tonic::Status| config(format!("{addr}: {}", ClientError::from(e)));
    let mut stream = client.backup_shard_from(addr, shard).await?;
    let header = match stream.message().await.map_err(at)? {
        Some(c) => match c.part {
            Some(backup_shard_chunk::Part::Header(h)) => h,
            _ => return Err(config(format!("{addr}: the stream did not begin with a header"))),
        },
        None => return Err(config(format!("{addr}: empty stream"))),
    };
    let name = shard_file_name(shard);
    let part = dir.join(format!("{name}.part"));
    let mut out = tokio::fs::File::from_std(private_file().open(&part).map_err(io_at(&part))?);
    let (mut hash, mut received) = (Sha256::new(), 0u64);
    let trailer = loop {
        match stream.message().await.map_err(at)?.and_then(|c| c.part) {
            Some(backup_shard_chunk::Part::Data(data)) => {
                hash.update(&data);
                received += data.len() as u64;
                out.write_all(&data).await.map_err(io_at(&part))?;
            }
            Some(backup_shard_chunk::Part::Trailer(t)) => break t,
            _ => return Err(config(format!("{addr}: shard {shard}'s stream ended without its trailer"))),
        }
    };
    out.sync_all().await.map_err(io_at(&part))?;
    let sha256 = hex(hash);
    if received != trailer.archive_bytes || received != header.archive_bytes || sha256 != trailer.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(config(format!(
            "{addr}: shard {shard} arrived damaged ({received} bytes, SHA-256 {sha256}; the node sent {} bytes, \
             {})",
            trailer.archive_bytes, trailer.sha256
        )));
    }
    std::fs::rename(&part, dir.join(&name)).map_err(io_at(&part))?;
    Ok(ShardFile {
        shard,
        file: name,
        bytes: received,
        sha256,
        applied_index: header.applied_index,
        applied_term: header.applied_term,
        schema_version: header.schema_version,
        node_id: header.node_id,
    })
}

/// Reads and checks `dir/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ClientError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        config(format!("{}: {e} (a backup directory without its manifest is incomplete)", path.display()))
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| config(format!("{}: {e}", path.display())))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(config(format!(
            "{}: manifest format {} (this client reads {MANIFEST_FORMAT})",
            path.display(),
            manifest.format
        )));
    }
    let shards: Vec<u32> = manifest.shard_files.iter().map(|f| f.shard).collect();
    // Compared without building the expected list first: a damaged count
    // must not size an allocation.
    if manifest.shards > crate::shard::MAX_SHARDS || !shards.iter().copied().eq(0..manifest.shards) {
        return Err(config(format!(
            "{}: the shard files do not cover shards 0..{}",
            path.display(),
            manifest.shards
        )));
    }
    Ok(manifest)
}

/// Checks every shard file's size and SHA-256 against the manifest.
pub async fn verify(dir: &Path, manifest: &Manifest) -> Result<(), ClientError> {
    for file in &manifest.shard_files {
        let path = shard_path(dir, file)?;
        let mut input = tokio::fs::File::open(&path).await.map_err(io_at(&path))?;
        let (mut hash, mut size, mut buf) = (Sha256::new(), 0u64, vec![0u8; CHUNK_BYTES]);
        loop {
            let n = input.read(&mut buf).await.map_err(io_at(&path))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            size += n as u64;
        }
        let sha256 = hex(hash);
        if size != file.bytes || sha256 != file.sha256 {
            return Err(config(format!(
                "{}: {size} bytes with SHA-256 {sha256}; the manifest says {} bytes, {}: the backup is damaged",
                path.display(),
                file.bytes,
                file.sha256
            )));
        }
    }
    Ok(())
}

/// A shard file's path; refuses names that leave the directory.
fn shard_path(dir: &Path, file: &ShardFile) -> Result<PathBuf, ClientError> {
    if file.file.contains('/') || file.file.contains("..") || file.file.is_empty() {
        return Err(config(format!("manifest: bad file name {:?}", file.file)));
    }
    Ok(dir.join(&file.file))
}

/// Restores the backup in `dir` into the (new, empty) cluster `client`
/// talks to (see the module docs).
pub async fn restore(
    client: &PortraitClient,
    dir: &Path,
    progress: impl Fn(&str),
) -> Result<Vec<RestoredShard>, ClientError> {
    let manifest = read_manifest(dir)?;
    progress(&format!("checking {} shard files of {}", manifest.shard_files.len(), manifest.backup_id));
    verify(dir, &manifest).await?;
    let map = client.shard_map().await?;
    if map.shards != manifest.shards {
        return Err(config(format!(
            "the backup has {} shards and this cluster {}: restore into a cluster created with --shards {}",
            manifest.shards, map.shards, manifest.shards
        )));
    }
    // Every shard is checked before anything changes: a cluster that holds
    // data (a serving cluster, or one restored from another backup) keeps
    // its schema, and a run whose shards were all restored by an earlier
    // run of this backup changes nothing.
    progress(&format!("checking that the cluster's {} shards can take this backup", manifest.shards));
    let mut earlier = 0;
    for file in &manifest.shard_files {
        let format = archive_format(&shard_path(dir, file)?)?;
        if check_one(client, &manifest.backup_id, manifest.shards, file, format).await? {
            earlier += 1;
        }
    }
    if earlier < manifest.shard_files.len() && manifest.schema.version > 0 {
        let current = client.get_schema().await?;
        if current.toml != manifest.schema.toml {
            let applied = client.apply_schema(manifest.schema.toml.clone(), false).await?;
            progress(&format!("applied the backup's schema as version {}", applied.version));
            wait_schema(client, applied.version, Duration::from_secs(60), &progress).await?;
        }
    }
    let started = Instant::now();
    let mut restored = Vec::new();
    for file in &manifest.shard_files {
        let done = restore_one(client, dir, &manifest.backup_id, manifest.shards, file).await?;
        if done.earlier {
            progress(&format!(
                "shard {}: already restored from this backup by an earlier run ({}/{})",
                done.shard,
                done.shard + 1,
                manifest.shards
            ));
            restored.push(done);
            continue;
        }
        let resumed = match done.resumed_rows {
            0 => String::new(),
            n => format!(", going on after the {n} an earlier attempt applied"),
        };
        progress(&format!(
            "shard {}: {} rows ({}) as of index {} restored{resumed} ({}/{})",
            done.shard,
            done.rows,
            human_bytes(done.bytes),
            done.source_applied_index,
            done.shard + 1,
            manifest.shards
        ));
        restored.push(done);
    }
    let bytes: u64 = restored.iter().map(|r| r.bytes).sum();
    let earlier = restored.iter().filter(|r| r.earlier).count();
    progress(&format!(
        "restored {} shards{}, {} in {:.1} s",
        restored.len(),
        if earlier > 0 { format!(" ({earlier} by an earlier run)") } else { String::new() },
        human_bytes(bytes),
        started.elapsed().as_secs_f64()
    ));
    Ok(restored)
}

/// Waits until every shard's leader has applied schema `version` (so
/// restored rows keep their features and tags without a re-evaluation).
async fn wait_schema(
    client: &PortraitClient,
    version: u64,
    within: Duration,
    progress: &impl Fn(&str),
) -> Result<(), ClientError> {
    let deadline = Instant::now() + within;
    loop {
        let map = client.shard_map().await?;
        // A shard is caught up once a leader of it reports the version; one
        // whose leader did not answer (a node down, an election) is not.
        let mut caught_up = BTreeSet::new();
        for status in client.node_statuses(&map).await.into_values().flatten() {
            let led = status.shard_status.iter().filter(|s| s.role.eq_ignore_ascii_case("leader"));
            caught_up.extend(led.filter(|s| s.schema_version >= version).map(|s| s.shard));
        }
        let behind: Vec<u32> = (0..map.shards).filter(|s| !caught_up.contains(s)).collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            progress(&format!(
                "shards {behind:?} are not confirmed to have applied schema version {version} (their leader did \
                 not answer, or has not applied it yet); their users are re-evaluated after the restore"
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The address of shard `shard`'s leader: as the map names it, else as
/// one of the shard's replicas reports it (a node hosting no replica of a
/// shard names its leader only once it has forwarded a call to it), or why
/// there is none to ask now.
/// A map's leader that is `failed` (the node the previous attempt failed
/// at: a node hosting no replica of the shard may name a leader long gone)
/// is not taken; the replicas are asked.
async fn shard_leader(
    client: &PortraitClient,
    shard: u32,
    failed: Option<&str>,
) -> Result<String, ClientError> {
    let map = client.shard_map().await?;
    // A node that does not know the map yet lists no shard.
    let Some(replicas) = map.shard_replicas.get(shard as usize) else {
        return Err(config(format!("shard {shard}: the answering node does not know the cluster's map yet")));
    };
    let addr_of = |id: u64| map.nodes.iter().find(|n| n.node_id == id && id != 0).map(|n| n.addr.clone());
    if let Some(leader) = addr_of(replicas.leader_id).filter(|l| Some(l.as_str()) != failed) {
        return Ok(leader);
    }
    let asks = replicas.replicas.iter().filter_map(|r| addr_of(r.node_id)).map(|addr| async move {
        let status = async { client.connect_like(&addr).await?.cluster_status().await };
        let status = tokio::time::timeout(LEADER_ASK_TIMEOUT, status).await.ok()?.ok()?;
        status.shard_status.iter().find(|s| s.shard == shard).map(|s| s.leader_id)
    });
    let named = futures::future::join_all(asks).await;
    match named.into_iter().flatten().find_map(addr_of) {
        Some(leader) => Ok(leader),
        None => Err(config(format!("shard {shard}: no leader found"))),
    }
}

/// Uploads of one shard that may stall before its restore fails.
const MAX_STALLED_UPLOADS: u32 = 3;

/// One replica's answer, asked which node leads its shard, may take this
/// long.
const LEADER_ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether a restore step may be tried again: the shard has no leader
/// yet, its leader moved or is busy, the node gave no answer, the
/// connection was lost during the call (the leader killed: sent again, the
/// restore goes on after the rows it committed, or is found done), the
/// upload stalled (`DEADLINE_EXCEEDED`), or the node asked hosts no replica
/// of the shard (the map moved on).
fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Rpc(status) if crate::retry::connection_lost(status) => true,
        ClientError::Rpc(status) if status.code() == Code::FailedPrecondition => {
            status.message().contains(" hosts no replica of ")
        }
        _ => matches!(e.code(), Some(Code::Unavailable | Code::DeadlineExceeded) | None),
    }
}

/// The shard's leader to send the next attempt to: the one the previous
/// attempt's refusal named (`hint`, taken), else [`shard_leader`]; `None`
/// (the reason left in `last`) when the attempt should wait and try again.
async fn leader_now(
    client: &PortraitClient,
    shard: u32,
    hint: &mut Option<String>,
    failed: Option<&str>,
    last: &mut ClientError,
) -> Result<Option<String>, ClientError> {
    if let Some(leader) = hint.take() {
        return Ok(Some(leader));
    }
    match shard_leader(client, shard, failed).await {
        Ok(leader) => Ok(Some(leader)),
        Err(e) if retryable(&e) => {
            *last = e;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The leader a refusal from `asked` names, if another node.
fn redirect(e: &ClientError, asked: &str) -> Option<String> {
    let ClientError::Rpc(status) = e else { return None };
    crate::retry::leader_hint(status).filter(|l| *l != asked).map(str::to_string)
}

/// `e`, naming the node `asked` when it is a transport failure (no node's
/// answer, which names no node).
fn named_error(e: ClientError, asked: &str) -> ClientError {
    match e {
        ClientError::Rpc(status) => ClientError::Rpc(crate::retry::named(status, asked)),
        other => other,
    }
}

/// The pause before attempt `attempt` (0-based) at a shard's leader.
async fn before_attempt(attempt: u64) {
    if attempt > 0 {
        tokio::time::sleep(Duration::from_millis(250 * attempt.min(8))).await;
    }
}

fn restore_header(
    backup_id: &str,
    shards: u32,
    file: &ShardFile,
    archive_format: u32,
    check_only: bool,
) -> RestoreHeader {
    RestoreHeader {
        shard: file.shard,
        archive_bytes: file.bytes,
        sha256: file.sha256.clone(),
        restore_id: backup_id.to_string(),
        shards,
        check_only,
        archive_format,
    }
}

/// The storage format a shard archive was written in, from its first 12
/// bytes (see `RestoreHeader.archive_format`), so that a node whose build
/// cannot restore it says so before the archive is sent.
fn archive_format(path: &Path) -> Result<u32, ClientError> {
    use std::io::Read;
    let mut head = [0u8; 12];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    read.map_err(|e| config(format!("{}: reading its header: {e}", path.display())))?;
    match &head[..8] {
        b"PRTSNAPV" => Ok(u32::from_le_bytes(head[8..].try_into().expect("4 bytes"))),
        b"PRTSNAP1" => Ok(1),
        _ => Err(config(format!("{}: not a Portrait shard archive (no PRTSNAP magic)", path.display()))),
    }
}

/// Asks shard `file.shard`'s leader whether it can take this backup,
/// changing nothing: `true` when an earlier run of it restored the shard
/// already, `false` when it can; an error naming the shard when it holds
/// other data or another restore is under way in it. Retries like
/// [`restore_one`].
async fn check_one(
    client: &PortraitClient,
    backup_id: &str,
    shards: u32,
    file: &ShardFile,
    format: u32,
) -> Result<bool, ClientError> {
    let (mut last, mut hint) = (config(format!("shard {}: no leader found", file.shard)), None);
    let mut failed: Option<String> = None;
    for attempt in 0..20u64 {
        before_attempt(attempt).await;
        let found = leader_now(client, file.shard, &mut hint, failed.as_deref(), &mut last).await?;
        let Some(leader) = found else { continue };
        let header = restore_header(backup_id, shards, file, format, true);
        let chunks = futures::stream::iter([RestoreShardChunk {
            part: Some(restore_shard_chunk::Part::Header(header)),
        }]);
        match client.restore_shard_to(&leader, chunks).await {
            Ok(_) => return Ok(false),
            Err(e) if e.code() == Some(Code::AlreadyExists) => return Ok(true),
            Err(e) if retryable(&e) => {
                (hint, last) = (redirect(&e, &leader), named_error(e, &leader));
                failed = Some(leader);
            }
            Err(e) => {
                return Err(config(format!(
                    "shard {}: {e} (nothing was changed in this cluster)",
                    file.shard
                )))
            }
        }
    }
    Err(config(format!("shard {}: not checked after 20 attempts; last error: {last}", file.shard)))
}

/// Sends one shard's archive to its leader; retries (with the map fetched
/// again) while the shard has no leader or its leader moved.
async fn restore_one(
    client: &PortraitClient,
    dir: &Path,
    backup_id: &str,
    shards: u32,
    file: &ShardFile,
) -> Result<RestoredShard, ClientError> {
    let path = shard_path(dir, file)?;
    let format = archive_format(&path)?;
    let (mut last, mut hint) = (config(format!("shard {}: no leader found", file.shard)), None);
    let (mut failed, mut stalls): (Option<String>, u32) = (None, 0);
    for attempt in 0..20u64 {
        before_attempt(attempt).await;
        let found = leader_now(client, file.shard, &mut hint, failed.as_deref(), &mut last).await?;
        let Some(leader) = found else { continue };
        let header = restore_header(backup_id, shards, file, format, false);
        let read_failed = Arc::new(Mutex::new(None));
        let chunks = archive_chunks(header, path.clone(), read_failed.clone()).await?;
        let sent = client.restore_shard_to(&leader, chunks).await;
        // The node saw a short archive; the cause is the local read.
        if let Some(e) = read_failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(config(format!("shard {}: reading {}: {e}", file.shard, path.display())));
        }
        match sent {
            Ok(r) => {
                return Ok(RestoredShard {
                    shard: r.shard,
                    earlier: false,
                    rows: r.rows,
                    bytes: r.bytes,
                    source_applied_index: r.source_applied_index,
                    log_index: r.log_index,
                    resumed_rows: r.resumed_rows,
                })
            }
            // The node ended an upload that stalled (`--backup-stream-stall`):
            // sent again a few times, not 20 (each waits out the stall).
            Err(e) if e.code() == Some(Code::DeadlineExceeded) && stalls + 1 >= MAX_STALLED_UPLOADS => {
                return Err(config(format!(
                    "shard {}: the upload stalled {MAX_STALLED_UPLOADS} times (the node ends an upload that sends \
                     nothing for its --backup-stream-stall); last: {e}",
                    file.shard
                )))
            }
            // Not (or no longer) the leader, no quorum, the node busy or
            // unreachable: ask again (the leader it names first).
            Err(e) if retryable(&e) => {
                stalls += u32::from(e.code() == Some(Code::DeadlineExceeded));
                (hint, last) = (redirect(&e, &leader), named_error(e, &leader));
                failed = Some(leader);
            }
            // An `End` that timed out but committed comes back as this too.
            Err(e) if e.code() == Some(Code::AlreadyExists) => {
                return Ok(RestoredShard {
                    shard: file.shard,
                    earlier: true,
                    rows: 0,
                    bytes: 0,
                    source_applied_index: 0,
                    log_index: 0,
                    resumed_rows: 0,
                })
            }
            Err(e) => return Err(config(format!("shard {}: {e}", file.shard))),
        }
    }
    Err(config(format!("shard {}: not restored after 20 attempts; last error: {last}", file.shard)))
}

/// The header, then the file in chunks, read as the stream is sent. A read
/// error ends the stream (the node then refuses the short archive) and is
/// left in `failed` for the caller.
async fn archive_chunks(
    header: RestoreHeader,
    path: PathBuf,
    failed: Arc<Mutex<Option<std::io::Error>>>,
) -> Result<impl futures::Stream<Item = RestoreShardChunk> + Send + 'static, ClientError> {
    let file = tokio::fs::File::open(&path).await.map_err(io_at(&path))?;
    let first = RestoreShardChunk { part: Some(restore_shard_chunk::Part::Header(header)) };
    let data = futures::stream::unfold(Some(file), move |file| {
        let failed = failed.clone();
        async move {
            let mut file = file?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Err(e) => {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    None
                }
                Ok(n) => {
                    buf.truncate(n);
                    Some((RestoreShardChunk { part: Some(restore_shard_chunk::Part::Data(buf)) }, Some(file)))
                }
            }
        }
    });
    Ok(futures::stream::iter([first]).chain(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archives_format_is_read_from_its_header() {
        let tmp = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let path = tmp.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let v8 = file("v8", &[&b"PRTSNAPV"[..], &8u32.to_le_bytes(), b"rest"].concat());
        assert_eq!(archive_format(&v8).unwrap(), 8);
        assert_eq!(archive_format(&file("v1", b"PRTSNAP1 and the rest")).unwrap(), 1);
        let other = archive_format(&file("other", b"not an archive at all")).unwrap_err().to_string();
        assert!(other.contains("not a Portrait shard archive"), "{other}");
        let short = archive_format(&file("short", b"PRTSNAPV")).unwrap_err().to_string();
        assert!(short.contains("reading its header"), "{short}");
    }
}
