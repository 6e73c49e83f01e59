//! Online backup and restore of shards (docs/operations.md, "Backup and
//! restore").
//!
//! Backup: a node hosting a replica of the shard exports it from one
//! RocksDB snapshot (the shard's key range as SST files, consistent at the
//! replica's applied index; [`crate::store::group_snapshot::export`]) into
//! an archive under `<data>/backup/`, which the service streams to the
//! caller and removes. The node keeps serving: the export reads a
//! snapshot, bypassing the block cache. The replica first catches up with
//! its shard's leader ([`Node::caught_up_for_backup`]), so the copy holds
//! every write acknowledged before the export was asked for.
//!
//! Restore: the shard's leader reads a received archive
//! ([`crate::store::restore::BackupSource`]) and proposes its rows through
//! the shard's raft log (`Command::Restore`: `Begin`, `Rows`…, `End`), so
//! every replica applies them at the same indexes. It runs only on an
//! empty shard, or one an earlier attempt of the same restore left mid-way
//! (a leader lost, a call cut off): it then goes on after the rows that
//! attempt applied, which the shard's restore marker counts, rather than
//! begin again.
//!
//! One export or restore at a time per node (each needs the shard's size in
//! scratch disk); the scratch directory is emptied when the node starts.

/// Fault injection (the `fault-injection` build only): with this
/// environment variable set, a restore stops after its `Begin` step, as
/// one whose leader was lost there, leaving its shard mid-restore.
#[cfg(feature = "fault-injection")]
pub const STOP_AFTER_BEGIN_ENV: &str = "PORTRAIT_FAULT_RESTORE_STOP_AFTER_BEGIN";

/// Fault injection (the `fault-injection` build only): with this
/// environment variable set to `N`, a restore attempt that began its shard
/// afresh stops after `N` of its `Rows` steps, as one whose leader was
/// lost there; an attempt that goes on from an earlier one does not stop.
#[cfg(feature = "fault-injection")]
pub const STOP_AFTER_ROWS_ENV: &str = "PORTRAIT_FAULT_RESTORE_STOP_AFTER_ROWS";

/// Fault injection (the `fault-injection` build only): with this
/// environment variable set to `N`, a restore attempt that began its shard
/// afresh waits [`FAULT_PAUSE`] after `N` of its `Rows` steps committed
/// (a test kills its leader meanwhile); an attempt that goes on from an
/// earlier one does not wait.
#[cfg(feature = "fault-injection")]
pub const PAUSE_AFTER_ROWS_ENV: &str = "PORTRAIT_FAULT_RESTORE_PAUSE_AFTER_ROWS";

/// See [`PAUSE_AFTER_ROWS_ENV`].
#[cfg(feature = "fault-injection")]
const FAULT_PAUSE: Duration = Duration::from_secs(30);

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::write::leader_elsewhere;
use super::Node;
use portrait_proto::v1::raft_client::RaftClient;
use portrait_proto::v1::ReadIndexRequest;

use crate::error::{Error, Result};
use crate::limits::RESTORE_ENTRY_BYTES;
use crate::raft::client_write_error;
use crate::raft::replica::Replica;
use crate::store::group_snapshot;
use crate::store::restore::{restore_state, BackupSource, SourceMeta};
use crate::store::snapshot::pack;
use crate::types::{Command, CommandResult, GroupId, LogId, RestoreMarker, RestoreStep};

/// The node's scratch directory for backup exports and received archives.
fn scratch_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("backup")
}

/// Empties the scratch directory (at start: what a crash left there).
pub(crate) fn remove_scratch(data_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(scratch_dir(data_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A file under the scratch directory, removed when dropped.
pub struct ScratchFile {
    pub path: PathBuf,
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Disk space a backup's export or a restore's upload leaves free on the
/// data dir's file system beyond what it needs, for the raft log and the
/// state to go on growing meanwhile.
pub const BACKUP_DISK_HEADROOM: u64 = 1 << 30;

/// Bytes an unprivileged writer may still use on the file system holding
/// `path` (`statvfs`: available blocks × fragment size).
fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A shard's exported archive, ready to stream; holds the node's backup
/// slot until dropped.
pub struct ShardExport {
    pub file: ScratchFile,
    pub applied: Option<LogId>,
    pub schema_version: u64,
    pub bytes: u64,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// A received archive being restored; holds the node's backup slot.
pub struct ShardUpload {
    pub file: ScratchFile,
    gid: GroupId,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// What a shard's restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreSummary {
    pub rows: u64,
    pub bytes: u64,
    pub source_applied: Option<LogId>,
    pub log_index: u64,
    /// Rows an earlier attempt of the same restore had applied, which this
    /// one kept and went on after (0: it began the shard afresh).
    pub resumed_rows: u64,
}

fn unique(prefix: &str, gid: GroupId) -> String {
    format!("{prefix}-{}-{}", gid.0, crate::wall_clock_ms())
}

impl Node {
    /// Shard `shard`'s group, if the cluster has it.
    pub(super) fn shard_group(&self, shard: u32) -> Result<GroupId> {
        if shard >= self.shards {
            return Err(Error::invalid(
                "shard",
                format!("{shard} is not a shard (the cluster has {})", self.shards),
            ));
        }
        Ok(GroupId(shard))
    }

    /// This node's replica of `gid`, or FAILED_PRECONDITION naming the nodes
    /// the map places it on.
    pub(super) fn hosted(&self, gid: GroupId) -> Result<Arc<Replica>> {
        self.registry.get(gid).ok_or_else(|| {
            let nodes: Vec<u64> = self.route(gid).into_iter().map(|(n, _)| n).collect();
            Error::FailedPrecondition(format!(
                "node {} hosts no replica of {gid}; ask one of nodes {nodes:?}",
                self.id
            ))
        })
    }

    /// The node's backup slot, or RESOURCE_EXHAUSTED-like UNAVAILABLE if
    /// another export or restore holds it.
    fn backup_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.backup_slot.clone().try_acquire_owned().map_err(|_| {
            Error::Unavailable(format!(
                "node {} is already exporting or restoring a shard (one at a time); retry when it is done",
                self.id
            ))
        })
    }

    /// Exports shard `shard` as this node's replica holds it (see the
    /// module docs).
    pub async fn export_shard(&self, shard: u32) -> Result<ShardExport> {
        let gid = self.shard_group(shard)?;
        let replica = self.hosted(gid)?;
        // A replica just placed here (a learner, or one not yet sent
        // anything) would export an empty or partial shard.
        if !replica.sm.is_voter(self.id) {
            return Err(Error::FailedPrecondition(format!(
                "{gid}'s replica on node {} is not a voter yet (still catching up); copy another replica",
                self.id
            )));
        }
        let slot = self.backup_slot()?;
        // The SST files, then the archive packed from them, both at about
        // the replica's logical size (RocksDB's estimate of its files until
        // it is measured: a node that started lately).
        let size = self.state_bytes(gid).unwrap_or_else(|| self.state_db.approximate_bytes(gid));
        self.check_room(
            size.saturating_mul(2),
            &format!("exporting {gid} (about {size} bytes)"),
            "free disk space there, or copy another replica",
        )?;
        self.caught_up_for_backup(&replica).await?;
        let state_db = self.state_db.clone();
        let marker = restore_state(&state_db, gid).map_err(Error::internal)?.marker;
        if let Some(marker) = marker {
            return Err(Error::FailedPrecondition(format!(
                "{gid} is being restored (restore {:?}); back it up once the restore ends",
                marker.id
            )));
        }
        let dir = scratch_dir(&self.data_dir);
        let name = unique("export", gid);
        let file = ScratchFile { path: dir.join(format!("{name}.snap")) };
        let archive = file.path.clone();
        // The scratch file and the slot go with the export and come back
        // with it: a caller gone meanwhile (the call cancelled) drops the
        // future, not the export, and the archive that export then writes
        // is removed, and the slot freed, only once it ends.
        let export = move || {
            let export = || -> anyhow::Result<(Option<LogId>, u64, u64)> {
                let files = dir.join(&name);
                let exported = group_snapshot::export_for_backup(&state_db, gid, &files);
                let packed = exported.and_then(|meta| {
                    pack(&files, &archive)?;
                    Ok(meta)
                });
                let _ = std::fs::remove_dir_all(&files);
                let (meta, schema_version) = packed?;
                Ok((meta.last_applied, schema_version, std::fs::metadata(&archive)?.len()))
            };
            (export(), file, slot)
        };
        let (exported, file, slot) = tokio::task::spawn_blocking(export).await.map_err(Error::internal)?;
        let (applied, schema_version, bytes) =
            exported.map_err(|e| match e.downcast_ref::<group_snapshot::Installing>() {
                Some(_) => Error::Unavailable(format!(
                    "{gid}'s replica on node {} is installing a snapshot (catching up); retry, or copy another \
                     replica",
                    self.id
                )),
                None if e.downcast_ref::<group_snapshot::Restoring>().is_some() => Error::FailedPrecondition(
                    format!("{gid} is being restored; back it up once the restore ends"),
                ),
                None => Error::Internal(format!("exporting {gid}: {e:#}")),
            })?;
        tracing::info!(group = %gid, ?applied, bytes, "shard exported for a backup");
        Ok(ShardExport { file, applied, schema_version, bytes, _slot: slot })
    }

    /// Waits until `replica` has written every entry acknowledged so far:
    /// on the shard's leader its read index; on a follower the leader's
    /// (`Raft.ReadIndex`). Either is confirmed with a quorum of the shard's
    /// voters, so a deposed leader that has not heard of its successor
    /// (with 5 replicas, a quorum can form without it or this node) cannot
    /// vouch for an index short of what its successor committed. At most
    /// the write timeout, else UNAVAILABLE (the CLI then copies another
    /// replica). Without it a lagging follower could export a copy missing
    /// acknowledged writes.
    async fn caught_up_for_backup(&self, replica: &Replica) -> Result<()> {
        let gid = replica.gid;
        let leader = replica.raft.metrics().borrow().current_leader;
        let target = match leader {
            None => {
                return Err(Error::Unavailable(format!(
                    "{gid} has no leader known to node {}; retry, or copy another replica",
                    self.id
                )))
            }
            Some(l) if l == self.id => return self.ensure_linearizable(replica).await,
            Some(l) => {
                let addr =
                    self.cluster().map.as_ref().and_then(|m| m.nodes.get(&l).map(|n| n.peer_addr.clone()));
                let addr = addr.ok_or_else(|| {
                    Error::Unavailable(format!("{gid}'s leader, node {l}, is not in the shard map; retry"))
                })?;
                peer_read_index(l, &addr, gid.0, self.write_timeout).await.map_err(|e| {
                    Error::Unavailable(format!("{gid}: asking its leader, node {l}, for its read index: {e}"))
                })?
            }
        };
        match tokio::time::timeout(self.write_timeout, replica.sm.wait_written(target)).await {
            Ok(written) => written.map_err(Error::Internal),
            Err(_) => Err(Error::Unavailable(format!(
                "{gid}'s replica on node {} did not reach its leader's index {target} within {:?}; copy another \
                 replica",
                self.id, self.write_timeout
            ))),
        }
    }

    /// Where a restore's archive for shard `shard` is received: checks
    /// that this node leads the shard (else NOT_LEADER naming the leader)
    /// and that the shard can be restored from `restore_id`, before any
    /// byte is received.
    pub async fn restore_upload(
        &self,
        shard: u32,
        restore_id: &str,
        archive_bytes: u64,
    ) -> Result<ShardUpload> {
        let gid = self.shard_group(shard)?;
        let replica = self.hosted(gid)?;
        self.check_restorable(&replica, restore_id)?;
        self.check_restore_room(gid, archive_bytes)?;
        let slot = self.backup_slot()?;
        let dir = scratch_dir(&self.data_dir);
        std::fs::create_dir_all(&dir).map_err(Error::internal)?;
        let file = ScratchFile { path: dir.join(format!("{}.snap", unique("restore", gid))) };
        Ok(ShardUpload { file, gid, _slot: slot })
    }

    /// Whether shard `shard` could take restore `restore_id` now, as
    /// [`Node::check_restorable`] answers: nothing is received or changed.
    pub fn restore_check(&self, shard: u32, restore_id: &str, archive_bytes: u64) -> Result<()> {
        let gid = self.shard_group(shard)?;
        let replica = self.hosted(gid)?;
        self.check_restorable(&replica, restore_id)?;
        self.check_restore_room(gid, archive_bytes)
    }

    /// The free disk a restore upload of `archive_bytes` needs here: the
    /// archive, its unpacked SST files, then its rows in the raft log and
    /// in the state.
    fn check_restore_room(&self, gid: GroupId, archive_bytes: u64) -> Result<()> {
        self.check_room(
            archive_bytes.saturating_mul(4),
            &format!("restoring {gid} from an archive of {archive_bytes} bytes"),
            "free disk space there (a restore must reach the shard's leader; moving its leadership to a node \
             with room also works)",
        )
    }

    /// RESOURCE_EXHAUSTED unless the file system of the data dir has
    /// `need` bytes free beyond [`BACKUP_DISK_HEADROOM`] (a backup or
    /// restore must not fill the disk the raft log and state live on: a
    /// failed log append or fsync stops the node).
    fn check_room(&self, need: u64, what: &str, advice: &str) -> Result<()> {
        let free = free_bytes(&self.data_dir).map_err(|e| {
            Error::Internal(format!("reading the free space of {}: {e}", self.data_dir.display()))
        })?;
        let wanted = need.saturating_add(BACKUP_DISK_HEADROOM);
        if free < wanted {
            return Err(Error::ResourceExhausted(format!(
                "node {}: {what} needs about {wanted} bytes free under {} ({need} of scratch files and the log, \
                 plus {BACKUP_DISK_HEADROOM} kept free), {free} are: {advice}",
                self.id,
                self.data_dir.display()
            )));
        }
        Ok(())
    }

    /// NOT_LEADER unless this node leads the replica's shard; with no
    /// restore in progress, ALREADY_EXISTS when the last restore that
    /// ended in it was `restore_id`'s (a restore run again skips it), else
    /// FAILED_PRECONDITION if it holds data or ever took a write;
    /// FAILED_PRECONDITION too
    /// while another restore is in progress in it (a shard never mixes
    /// two backups).
    fn check_restorable(&self, replica: &Replica, restore_id: &str) -> Result<()> {
        let gid = replica.gid;
        if let Some((leader, addr)) = leader_elsewhere(replica, self.id) {
            return Err(Error::NotLeader { leader_id: Some(leader), leader_addr: Some(addr), group: None });
        }
        if replica.raft.metrics().borrow().current_leader != Some(self.id) {
            return Err(Error::Unavailable(format!("{gid} has no leader yet; retry")));
        }
        let state = restore_state(&self.state_db, gid).map_err(Error::internal)?;
        if let Some(marker) = &state.marker {
            let running = crate::types::restore_id_of(&marker.id);
            if running != restore_id {
                return Err(Error::FailedPrecondition(format!(
                    "{gid} is being restored from {running:?}, not {restore_id:?}: a shard takes one backup; \
                     finish that restore, or restore into a new, empty cluster"
                )));
            }
        }
        if state.marker.is_none() && state.restored.as_deref() == Some(restore_id) {
            // Whatever it holds now: a shard the backup left empty, and
            // still empty, is restored too (a run again would otherwise
            // restore it anew, and apply the backup's schema to the
            // cluster again).
            return Err(Error::AlreadyExists(format!(
                "{gid} was already restored from {restore_id:?} (an earlier run)"
            )));
        }
        // As the restore's first step decides on every replica: a shard
        // that ever took a write, even one whose rows have all expired
        // since, takes no backup.
        if (state.has_data || state.written) && state.marker.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "{gid} holds data (it has taken writes): a restore needs a new, empty cluster with the backup's \
                 shard count"
            )));
        }
        Ok(())
    }

    /// Restores the shard of `upload` from its received archive, as
    /// attempt `id` (see the module docs).
    pub async fn restore_shard(&self, upload: ShardUpload, id: String) -> Result<RestoreSummary> {
        let gid = upload.gid;
        let replica = self.hosted(gid)?;
        self.check_restorable(&replica, crate::types::restore_id_of(&id))?;
        let (archive, scratch) = (upload.file.path.clone(), upload.file.path.with_extension("d"));
        // Every row is checked before the shard changes (see `check`). The
        // upload (its file and the node's slot) goes with the unpacking and
        // comes back with it: a call cancelled meanwhile frees neither the
        // disk nor the slot before the unpacking ends.
        let open = move || {
            let open = || {
                let source = BackupSource::open(&archive, gid, &scratch)?;
                source.check()?;
                Ok::<_, anyhow::Error>(source)
            };
            (open(), upload)
        };
        let (opened, upload) = tokio::task::spawn_blocking(open).await.map_err(Error::internal)?;
        let source = opened.map_err(|e| archive_error(gid, e))?;
        let SourceMeta { applied: source_applied, schema, clock_ms, reeval } = source.meta.clone();
        if let Some(schema) = &schema {
            let current = replica.sm.schema();
            if schema.schema != current.schema {
                tracing::warn!(group = %gid, backup_version = schema.version, version = current.version,
                    "the backup's schema of the shard is not the cluster's: every user is re-evaluated after \
                     the restore (apply the backup's schema before restoring to avoid it)");
            }
        }
        // An earlier attempt of this restore that stopped midway: its
        // rows are kept, and this one goes on after them, under its id.
        let (source, upload, resumed) = self.restore_resume(&replica, &id, source, upload).await?;
        let id = match &resumed {
            Some(m) => {
                tracing::info!(group = %gid, id = m.id, next_seq = m.next_seq, rows = m.rows,
                    "restore resumes after the rows an earlier attempt applied");
                m.id.clone()
            }
            None => {
                tracing::info!(group = %gid, id, ?source_applied, "restore begins");
                self.propose_restore(&replica, RestoreStep::Begin { id: id.clone() }).await?;
                id
            }
        };
        #[cfg(feature = "fault-injection")]
        if std::env::var_os(STOP_AFTER_BEGIN_ENV).is_some() {
            return Err(Error::FailedPrecondition(format!(
                "{gid}: fault injection: the restore stops after its Begin"
            )));
        }
        #[cfg(feature = "fault-injection")]
        let fault_after = |env: &str| -> Option<u64> {
            match resumed {
                None => std::env::var(env).ok().and_then(|n| n.parse().ok()),
                Some(_) => None,
            }
        };
        #[cfg(feature = "fault-injection")]
        let (stop_after, pause_after) = (fault_after(STOP_AFTER_ROWS_ENV), fault_after(PAUSE_AFTER_ROWS_ENV));
        // The chunks the earlier attempt applied are read and skipped.
        let (skip, resumed_rows) = resumed.as_ref().map_or((0, 0), |m| (m.next_seq, m.rows));
        // Rows are read on a blocking thread, at most two chunks ahead.
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let reader = tokio::task::spawn_blocking(move || {
            let mut skipped = 0;
            let counted = source.rows(RESTORE_ENTRY_BYTES, |rows| {
                if skipped < skip {
                    skipped += 1;
                    return true;
                }
                tx.blocking_send(rows).is_ok()
            });
            drop(source);
            counted
        });
        let mut seq = skip;
        let mut proposed = Ok(());
        while let Some(rows) = rx.recv().await {
            let step = RestoreStep::Rows { id: id.clone(), seq, rows };
            if let Err(e) = self.propose_restore(&replica, step).await {
                proposed = Err(e);
                break;
            }
            seq += 1;
            #[cfg(feature = "fault-injection")]
            if pause_after == Some(seq) {
                tracing::warn!(group = %gid, seq, "fault injection: the restore pauses");
                tokio::time::sleep(FAULT_PAUSE).await;
            }
            #[cfg(feature = "fault-injection")]
            if stop_after == Some(seq) {
                proposed = Err(Error::FailedPrecondition(format!(
                    "{gid}: fault injection: the restore stops after {seq} rows entries"
                )));
                break;
            }
        }
        drop(rx);
        let counted = reader.await.map_err(Error::internal)?;
        proposed?;
        let (rows, bytes) = counted.map_err(|e| archive_error(gid, e))?;
        drop(upload);
        let schema = schema.map(|s| s.schema);
        let end = RestoreStep::End { id: id.clone(), rows, clock_ms, schema, reeval };
        let log_index = self.propose_restore(&replica, end).await?;
        tracing::info!(group = %gid, id, rows, bytes, log_index, resumed_rows, "restore ended");
        Ok(RestoreSummary { rows, bytes, source_applied, log_index, resumed_rows })
    }

    /// Where attempt `id` of a restore goes on in its shard: after the
    /// rows an earlier attempt of the same restore applied (the shard's
    /// restore marker, read once every step committed so far is applied
    /// here, with the same archive digest in its attempt id), when
    /// `source` splits into the same chunks that attempt's steps held (the
    /// same archive, chunked as this build chunks it); `None` to begin the
    /// shard afresh. Hands `source` back, and `upload`, which goes with
    /// the count as with the unpacking: a call cancelled meanwhile frees
    /// neither the node's slot nor the archive before the count ends.
    async fn restore_resume(
        &self,
        replica: &Replica,
        id: &str,
        source: BackupSource,
        upload: ShardUpload,
    ) -> Result<(BackupSource, ShardUpload, Option<RestoreMarker>)> {
        use crate::types::{restore_archive_of, restore_id_of};
        let gid = replica.gid;
        // The marker as of every step committed so far (a leader elected
        // since may not have applied the last ones yet).
        self.ensure_linearizable(replica).await.map_err(|e| e.in_shard(gid))?;
        let state = restore_state(&self.state_db, gid).map_err(Error::internal)?;
        // Of this restore, and of the same archive (an attempt id of an
        // older build records none: it begins again).
        let same = |m: &RestoreMarker| {
            restore_id_of(&m.id) == restore_id_of(id)
                && restore_archive_of(&m.id).is_some()
                && restore_archive_of(&m.id) == restore_archive_of(id)
        };
        let Some(marker) = state.marker.filter(|m| m.next_seq > 0 && same(m)) else {
            return Ok((source, upload, None));
        };
        let chunks = marker.next_seq;
        let count = move || {
            let rows = source.rows_in_chunks(RESTORE_ENTRY_BYTES, chunks);
            (rows, source, upload)
        };
        let (rows, source, upload) = tokio::task::spawn_blocking(count).await.map_err(Error::internal)?;
        match rows.map_err(|e| archive_error(gid, e))? {
            Some(rows) if rows == marker.rows => Ok((source, upload, Some(marker))),
            rows => {
                tracing::warn!(group = %gid, earlier = marker.id, marker.next_seq, marker.rows, ?rows,
                    "the archive does not split into the chunks the earlier attempt applied: the restore begins \
                     the shard again");
                Ok((source, upload, None))
            }
        }
    }

    /// Proposes one restore step in the shard this node leads; returns its
    /// log index. A rejected step is FAILED_PRECONDITION with the reason.
    async fn propose_restore(&self, replica: &Replica, step: RestoreStep) -> Result<u64> {
        // Like a write: a step applies by the cluster's apply rules, which
        // the shard's leader proposes first.
        self.catch_up_rules(replica).await;
        super::write::behind_rules(self.cluster().rules(), replica.sm.rules(), replica.gid)?;
        let attempt = match &step {
            RestoreStep::Begin { id } | RestoreStep::Rows { id, .. } | RestoreStep::End { id, .. } => {
                id.clone()
            }
        };
        let propose = async {
            let _pass = replica.gate.pass(self.write_timeout).await?;
            let stamp_ms = replica.stamper.stamp()?;
            let response = replica
                .raft
                .client_write(Command::Restore { stamp_ms, step })
                .await
                .map_err(client_write_error)?;
            match response.data {
                CommandResult::Rejected { reason } if reason.starts_with(crate::types::ALREADY_RESTORED) => {
                    Err(Error::AlreadyExists(format!("{reason} (an earlier run)")))
                }
                // A step of an earlier attempt (one that timed out here)
                // committed after this attempt read where to go on from.
                CommandResult::Rejected { reason } if reason.starts_with(crate::types::ROWS_OUT_OF_ORDER) => {
                    Err(Error::Unavailable(format!(
                        "{reason}: an earlier attempt's step committed meanwhile; retry (the restore goes on after \
                         the rows applied)"
                    )))
                }
                // Another attempt of this restore (one whose answer was
                // lost, still running at this leader) ended it first: read
                // once the rejecting entry's batch (and the End's before
                // it) is in the database.
                // Or took the shard over (it began again): this attempt
                // retries, and goes on after the rows that one applies.
                CommandResult::Rejected { reason } => {
                    let wait = replica.sm.wait_written(response.log_id.index);
                    let written = match tokio::time::timeout(Duration::from_secs(1), wait).await {
                        Ok(written) => written.is_ok(),
                        // Not told yet: asked again, the shard will say.
                        Err(_) => {
                            return Err(Error::Unavailable(format!(
                                "{reason}: the rejection is not in this node's database yet; retry"
                            )))
                        }
                    };
                    match written.then(|| self.restore_by(replica, &attempt)).flatten() {
                        Some(Restore::Ended) => {
                            Err(Error::AlreadyExists(format!("{reason}: another attempt of it ended the restore")))
                        }
                        Some(Restore::UnderWay) => Err(Error::Unavailable(format!(
                            "{reason}: another attempt of the same restore took the shard over; retry (the \
                             restore goes on after the rows applied)"
                        ))),
                        None => Err(Error::FailedPrecondition(reason)),
                    }
                }
                _ => Ok(response.log_id.index),
            }
        };
        match tokio::time::timeout(self.write_timeout, propose).await {
            Ok(result) => result.map_err(|e| e.in_shard(replica.gid)),
            Err(_) => Err(Error::Unavailable(format!(
                "{}: a restore step was not committed within {} ms (no quorum?); retry the restore of the shard",
                replica.gid,
                self.write_timeout.as_millis()
            ))),
        }
    }
}

/// Where the restore of an attempt stands in a shard, as its node applied
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restore {
    /// It ended there last, and no other is under way.
    Ended,
    /// Another attempt of it is under way there.
    UnderWay,
}

impl Node {
    /// Where the restore that `attempt` (an attempt id) is of stands in
    /// `replica`'s shard; `None` when neither (another restore's, or this
    /// attempt's own).
    fn restore_by(&self, replica: &Replica, attempt: &str) -> Option<Restore> {
        let restore_id = crate::types::restore_id_of(attempt);
        let state = restore_state(&self.state_db, replica.gid).ok()?;
        match &state.marker {
            Some(m) => (m.id != attempt && crate::types::restore_id_of(&m.id) == restore_id)
                .then_some(Restore::UnderWay),
            None => (state.restored.as_deref() == Some(restore_id)).then_some(Restore::Ended),
        }
    }
}

/// Asks the node at peer address `addr` for shard `shard`'s read index
/// (`Raft.ReadIndex`); the error says why not (not the leader, no quorum,
/// unreachable).
async fn peer_read_index(
    node: crate::types::NodeId,
    addr: &str,
    shard: u32,
    within: Duration,
) -> std::result::Result<u64, String> {
    let endpoint = crate::tls::peer_endpoint(addr, Some(node)).map_err(|e| e.to_string())?;
    let channel =
        endpoint.connect_timeout(within).timeout(within).connect().await.map_err(|e| e.to_string())?;
    let reply = RaftClient::new(channel).read_index(ReadIndexRequest { group: shard }).await;
    reply.map(|r| r.into_inner().index).map_err(|s| s.message().to_string())
}

/// A failure opening, checking or reading a backup archive: the archive's
/// (damaged, not a backup of this shard, a row apply cannot read:
/// INVALID_ARGUMENT, which the CLI does not retry) or this node's (a full
/// or failing disk, RocksDB's I/O: UNAVAILABLE, which it retries; the
/// archive may be sound).
fn archive_error(gid: GroupId, e: anyhow::Error) -> Error {
    match node_failure(&e) {
        true => Error::Unavailable(format!(
            "restoring {gid}: this node failed, not the archive: {e:#} (free disk space or mend the node, then \
             retry)"
        )),
        false => Error::invalid("archive", format!("{e:#}")),
    }
}

/// Whether `e` comes from the node's disk or database rather than from
/// the archive's content: an I/O error other than bad or missing data, or
/// a RocksDB error of I/O, or of a busy or stopping database.
fn node_failure(e: &anyhow::Error) -> bool {
    use rocksdb::ErrorKind as Db;
    use std::io::ErrorKind as Io;
    e.chain().any(|cause| {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return !matches!(io.kind(), Io::InvalidData | Io::UnexpectedEof | Io::NotFound);
        }
        if let Some(db) = cause.downcast_ref::<rocksdb::Error>() {
            return matches!(
                db.kind(),
                Db::IOError | Db::Busy | Db::TimedOut | Db::TryAgain | Db::ShutdownInProgress | Db::Aborted
            );
        }
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_of_the_node_is_told_from_a_bad_archive() {
        let gid = GroupId(3);
        let full = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::StorageFull));
        let e = archive_error(gid, full.context("unpacking"));
        assert!(
            matches!(&e, Error::Unavailable(m) if m.starts_with("restoring shard 3: this node failed")),
            "{e}"
        );
        let damaged = std::io::Error::new(std::io::ErrorKind::InvalidData, "checksum does not match");
        let e = archive_error(gid, anyhow::Error::from(damaged).context("unpacking"));
        assert!(matches!(&e, Error::InvalidArgument { .. }), "{e}");
        let e = archive_error(gid, anyhow::anyhow!("the archive is of shard 2, not of shard 3"));
        assert!(matches!(&e, Error::InvalidArgument { .. }), "{e}");
    }

    #[test]
    fn free_bytes_reads_the_file_system_of_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0 && free < 1 << 60, "{free}");
        let err = free_bytes(&dir.path().join("missing")).expect_err("no such path");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
