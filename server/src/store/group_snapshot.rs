//! A group's snapshot as SST files. Build: one RocksDB snapshot (a
//! consistent view of every column family), the group's key range of each
//! column family written with `SstFileWriter` (one `<cf>.sst` per non-empty
//! column family), plus `group.meta` (the group, its applied log id and
//! membership as of that view). Packed into one archive by
//! [`super::snapshot::pack`].
//!
//! Install: [`validate`] the unpacked files against the group and
//! openraft's meta before anything live changes; then [`ingest`]: a synced
//! write of the group's install marker with a range delete of the group in
//! every column family, then one ingest per SST. The caller reloads the
//! group's caches, publishes the archive as the group's current snapshot,
//! and only then clears the marker. The marker records the archive and
//! its meta ([`InstallRecord`]): a crash in between leaves it, and the next
//! open installs the same archive again ([`redo_install`]), so the group
//! holds the snapshot openraft was installing (wiping the group instead
//! would leave its state behind a log already purged past it).

use std::path::{Path, PathBuf};

use rocksdb::{Direction, IngestExternalFileOptions, IteratorMode, ReadOptions, SstFileWriter};
use serde::{Deserialize, Serialize};

use super::codec::{decode, encode};
use super::keys::*;
use super::sm_db::{cf, Marker, StateDb};
use super::snapshot::{unpack, SnapshotDir};
use crate::schema::VersionedSchema;
use crate::types::{GroupId, LogId, SnapshotMeta, StoredMembership};

/// The file of an archive describing its group's state.
pub const META_FILE: &str = "group.meta";

/// What `group.meta` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchiveMeta {
    pub group: GroupId,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// [`export`]'s refusal of a group whose snapshot install is under way
/// (its install marker is set in the view exported): its rows are then
/// those of a range delete and some of the snapshot's column families.
#[derive(Debug, thiserror::Error)]
#[error("{0} is installing a snapshot: its rows are not a state yet")]
pub struct Installing(pub GroupId);

/// A backup's export of a group a restore is writing: refused, as the copy
/// would hold part of the restore.
#[derive(Debug, thiserror::Error)]
#[error("{0} is being restored from a backup")]
pub struct Restoring(pub GroupId);

/// Writes group `gid`'s rows, as of one RocksDB snapshot, into the new
/// directory `dir` (replaced if it exists). Refused ([`Installing`]) while
/// the group installs a snapshot.
pub fn export(state_db: &StateDb, gid: GroupId, dir: &Path) -> anyhow::Result<ArchiveMeta> {
    Ok(export_with(state_db, gid, dir, false)?.0)
}

/// [`export`] for a backup: also refused ([`Restoring`]) while a restore
/// is under way in the group, as of the same RocksDB snapshot. Also gives
/// the version of the schema the exported rows were written under, read
/// from that snapshot (a schema applied during the export is not in it).
pub fn export_for_backup(state_db: &StateDb, gid: GroupId, dir: &Path) -> anyhow::Result<(ArchiveMeta, u64)> {
    export_with(state_db, gid, dir, true)
}

fn export_with(
    state_db: &StateDb,
    gid: GroupId,
    dir: &Path,
    backup: bool,
) -> anyhow::Result<(ArchiveMeta, u64)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let db = state_db.db();
    let snap = db.snapshot();
    if snap.get_cf(cf(&db, CF_META), installing(gid))?.is_some() {
        return Err(Installing(gid).into());
    }
    if backup && snap.get_cf(cf(&db, CF_META), meta(gid, META_RESTORE))?.is_some() {
        return Err(Restoring(gid).into());
    }
    let (start, end) = group_range(gid);
    for name in ALL_CFS {
        let mut opts = ReadOptions::default();
        opts.set_total_order_seek(true);
        opts.fill_cache(false);
        opts.set_iterate_upper_bound(end.clone());
        let options = state_db.sst_options(name);
        let mut writer: Option<SstFileWriter> = None;
        for item in snap.iterator_cf_opt(cf(&db, name), opts, IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item?;
            if writer.is_none() {
                let w = SstFileWriter::create(&options);
                w.open(dir.join(format!("{name}.sst")))?;
                writer = Some(w);
            }
            writer.as_mut().expect("just created").put(&key, &value)?;
        }
        if let Some(mut w) = writer {
            w.finish()?;
        }
    }
    let meta_cf = cf(&db, CF_META);
    let last_applied = snap.get_cf(meta_cf, meta(gid, META_APPLIED))?.map(|b| decode(&b)).transpose()?;
    let membership = snap
        .get_cf(meta_cf, meta(gid, META_MEMBERSHIP))?
        .map(|b| decode(&b))
        .transpose()?
        .unwrap_or_default();
    let schema_version = snap
        .get_cf(meta_cf, meta(gid, META_SCHEMA))?
        .map(|b| decode::<VersionedSchema>(&b))
        .transpose()?
        .map_or(0, |s| s.version);
    let archive_meta = ArchiveMeta { group: gid, last_applied, membership };
    std::fs::write(dir.join(META_FILE), encode(&archive_meta))?;
    Ok((archive_meta, schema_version))
}

/// The SST files of the unpacked snapshot in `dir`, with their column
/// families, once the snapshot is known to be group `gid`'s state as
/// `meta` describes it (its applied log id and membership).
pub fn validate(
    dir: &Path,
    gid: GroupId,
    meta: &SnapshotMeta,
) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let found: ArchiveMeta = decode(&std::fs::read(dir.join(META_FILE))?)?;
    anyhow::ensure!(found.group == gid, "the snapshot is of {}, not of {gid}", found.group);
    anyhow::ensure!(
        found.last_applied == meta.last_log_id,
        "the snapshot's database applied {:?}, its meta says {:?}",
        found.last_applied,
        meta.last_log_id
    );
    anyhow::ensure!(
        found.membership == meta.last_membership,
        "the snapshot's database has membership {:?}, its meta says {:?}",
        found.membership,
        meta.last_membership
    );
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if name == META_FILE {
            continue;
        }
        let cf_name = ALL_CFS.iter().find(|cf| name.strip_suffix(".sst") == Some(**cf));
        let Some(cf_name) = cf_name else { anyhow::bail!("unexpected file {name:?} in the snapshot") };
        files.push((*cf_name, dir.join(name)));
    }
    // The meta family last: once it is in, the flushed state reads as the
    // snapshot's applied index, and the log's deferred purge (which waits
    // for that) must not run before the rest of the state is in.
    files.sort_by_key(|(cf_name, _)| (*cf_name == CF_META, *cf_name));
    Ok(files)
}

/// What an install marker records: the validated archive being installed
/// and openraft's meta for it, so that an install a crash interrupted can be
/// finished at the next open ([`redo_install`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallRecord {
    pub archive: PathBuf,
    pub meta: SnapshotMeta,
}

/// Replaces group `gid`'s rows with the SST `files` (from [`validate`]),
/// leaving its install marker set with `record` (see the module docs).
pub fn ingest(
    state_db: &StateDb,
    gid: GroupId,
    files: Vec<(&'static str, PathBuf)>,
    record: &InstallRecord,
) -> anyhow::Result<()> {
    state_db.delete_range(gid, Marker::Set(encode(record)))?;
    let db = state_db.db();
    // An ingest overlapping the memtables (the range delete is there)
    // would flush them itself, with every write of the node stopped until
    // that flush ends (the other groups' applies too). Flushed here first,
    // as any flush is (every column family together, `atomic_flush`, so
    // other groups' unlogged applies stay consistent), while writes go
    // on; nothing of this group is written meanwhile (the install holds
    // its apply), so the ingests find no overlap.
    state_db.persist()?;
    let mut opts = IngestExternalFileOptions::default();
    opts.set_move_files(true);
    for (name, path) in files {
        db.ingest_external_file_cf_opts(cf(&db, name), &opts, vec![path])?;
    }
    Ok(())
}

/// Installs again the snapshot an interrupted install's marker `record`
/// names (at open, before any group is in use): unpack, validate, ingest,
/// publish it as the group's current snapshot, clear the marker. The
/// archive is where the marker says, or already under its published name
/// (the install publishes before it clears the marker). Returns the
/// snapshot's last index.
pub fn redo_install(
    state_db: &StateDb,
    data_dir: &Path,
    gid: GroupId,
    record: &[u8],
) -> Result<u64, RedoError> {
    let failed = |e: anyhow::Error| RedoError::Failed(e);
    let record: InstallRecord = decode(record).map_err(|e| RedoError::Damaged(e.into()))?;
    let dir = SnapshotDir::new(data_dir, gid).map_err(|e| failed(e.into()))?;
    // In this data dir's snapshot folder under the name the marker gives
    // (its path may be of the data dir as it was given or mounted then,
    // even of another copy of it), or where the marker says, or already
    // under its published name.
    let here = record.archive.file_name().and_then(|n| n.to_str()).map(|n| dir.scratch(n));
    let archive = [here, Some(record.archive.clone())]
        .into_iter()
        .flatten()
        .find(|a| a.exists())
        .unwrap_or_else(|| dir.archive(&record.meta.snapshot_id));
    let staging = dir.scratch("ingest");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| failed(e.into()))?;
    }
    if let Err(e) = unpack(&archive, &staging) {
        // Gone, truncated or not an archive: damaged. Anything else (a
        // full disk, a failing one) is not the archive's fault.
        let damaged = matches!(
            e.kind(),
            std::io::ErrorKind::NotFound
                | std::io::ErrorKind::InvalidData
                | std::io::ErrorKind::UnexpectedEof
        );
        let e = anyhow::Error::from(e).context(format!("unpacking {}", archive.display()));
        return Err(if damaged { RedoError::Damaged(e) } else { RedoError::Failed(e) });
    }
    // Damaged: what the archive holds is not the group's snapshot. A read
    // that failed (EIO, too many open files) is not the archive's fault.
    let files = validate(&staging, gid, &record.meta).map_err(|e| {
        let failed_read = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            !matches!(
                io.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::InvalidData
                    | std::io::ErrorKind::UnexpectedEof
            )
        });
        if failed_read {
            RedoError::Failed(e)
        } else {
            RedoError::Damaged(e)
        }
    })?;
    ingest(state_db, gid, files, &record).map_err(failed)?;
    dir.publish(&archive, &record.meta).map_err(failed)?;
    state_db.clear_install_marker(gid).map_err(|e| failed(e.into()))?;
    remove_staging(&staging);
    Ok(record.meta.last_log_id.map_or(0, |l| l.index))
}

/// Why [`redo_install`] could not finish an interrupted install.
#[derive(Debug)]
pub enum RedoError {
    /// The archive (or the install's record) is gone or damaged: the group
    /// can only start empty, and its leader sends a snapshot again.
    Damaged(anyhow::Error),
    /// Anything else (a full or failing disk, the ingest): nothing may be
    /// wiped for it; the node does not start, and the next start tries
    /// again.
    Failed(anyhow::Error),
}

/// Removes an install's staging directory (its SST files were moved into
/// RocksDB); a failure only leaves it for the next install to remove.
pub fn remove_staging(staging: &Path) {
    if let Err(e) = std::fs::remove_dir_all(staging) {
        tracing::warn!(path = %staging.display(), error = %e, "removing a snapshot's staging directory");
    }
}
