//! Reading a shard's backup archive for a restore. A backup archive is a
//! shard snapshot archive ([`super::group_snapshot::export`], packed by
//! [`super::snapshot::pack`]). RocksDB's C API has no SST reader, so
//! [`BackupSource::open`] unpacks the archive, checks it, and ingests its
//! SST files into a scratch database (under the node's data dir, removed
//! when the source is dropped), which it then reads in key order. The rows
//! go to every replica through the shard's raft log (`Command::Restore`),
//! never by copying files into the live database: every replica applies
//! the same rows at the same log index, and a replica added later catches
//! up by the log or a snapshot like any other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, IngestExternalFileOptions, IteratorMode, Options, ReadOptions, DB};

use super::apply::decode_user_state;
use super::codec::decode;
use super::group_snapshot::{ArchiveMeta, META_FILE};
use super::keys::*;
use super::record::{decode_history_event, FamilyHead};
use super::sm_db::{cf, cf_options_for, DurableClocks, StateDb};
use super::snapshot::unpack_backup;
use crate::limits::{MAX_RESTORE_ROW_BYTES, RESTORE_ROW_OVERHEAD_BYTES};
use crate::schema::VersionedSchema;
use crate::types::{GroupId, LogId, ReevalProgress, RestoreMarker, RestoreRow};

/// What a backup recorded of its shard besides the rows.
#[derive(Debug, Clone)]
pub struct SourceMeta {
    /// The shard's applied log id the copy is consistent at.
    pub applied: Option<LogId>,
    /// The shard's schema then (`None`: the built-in one).
    pub schema: Option<VersionedSchema>,
    pub clock_ms: i64,
    pub reeval: Option<ReevalProgress>,
}

/// An unpacked, checked backup archive of one shard (see the module docs).
pub struct BackupSource {
    db: Option<DB>,
    dir: PathBuf,
    gid: GroupId,
    pub meta: SourceMeta,
}

impl BackupSource {
    /// Unpacks `archive` (its checksum is verified) into the new directory
    /// `scratch` and opens it; refuses an archive of another shard, or one
    /// taken while its shard was being restored.
    pub fn open(archive: &Path, gid: GroupId, scratch: &Path) -> anyhow::Result<BackupSource> {
        if scratch.exists() {
            std::fs::remove_dir_all(scratch)?;
        }
        // From here on, dropping `source` removes `scratch`.
        let mut source = BackupSource {
            db: None,
            dir: scratch.to_path_buf(),
            gid,
            meta: SourceMeta { applied: None, schema: None, clock_ms: 0, reeval: None },
        };
        let files = scratch.join("files");
        unpack_backup(archive, &files)?;
        let found: ArchiveMeta = decode(&std::fs::read(files.join(META_FILE))?)?;
        anyhow::ensure!(found.group == gid, "the archive is of {}, not of {gid}", found.group);
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // As the state database: its column families' options need it.
        opts.set_allow_concurrent_memtable_write(false);
        let clocks = Arc::new(DurableClocks::default());
        let cfs: Vec<_> = ALL_CFS
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options_for(name, &clocks, None)))
            .collect();
        let db = DB::open_cf_descriptors(&opts, scratch.join("db"), cfs)?;
        let mut ingest = IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        for name in ALL_CFS {
            let sst = files.join(format!("{name}.sst"));
            if sst.exists() {
                db.ingest_external_file_cf_opts(cf(&db, name), &ingest, vec![sst])?;
            }
        }
        let meta_cf = cf(&db, CF_META);
        let get = |name: &[u8]| db.get_cf(meta_cf, meta(gid, name));
        anyhow::ensure!(
            get(META_RESTORE)?.is_none(),
            "the backup of {gid} was taken while it was being restored; back it up again"
        );
        source.meta = SourceMeta {
            applied: found.last_applied,
            schema: get(META_SCHEMA)?.map(|b| decode(&b)).transpose()?,
            clock_ms: get(META_CLOCK)?.map(|b| decode(&b)).transpose()?.unwrap_or(0),
            reeval: get(META_REEVAL)?.map(|b| decode(&b)).transpose()?,
        };
        source.db = Some(db);
        Ok(source)
    }

    /// Hands the shard's data rows to `emit` in chunks of about
    /// `chunk_bytes` (keys and values; a larger row is a chunk of its own),
    /// column family by column family in key order, until `emit` returns
    /// false. Returns the rows and bytes emitted.
    pub fn rows(
        &self,
        chunk_bytes: usize,
        mut emit: impl FnMut(Vec<RestoreRow>) -> bool,
    ) -> anyhow::Result<(u64, u64)> {
        let (mut rows, mut bytes) = (0u64, 0u64);
        let mut chunk = Vec::new();
        let mut chunk_size = 0usize;
        let all = self.each_row(|_, index, key, value| {
            let row = key.len() + value.len();
            let size = row + RESTORE_ROW_OVERHEAD_BYTES;
            if chunk_size > 0 && chunk_size + size > chunk_bytes {
                if !emit(std::mem::take(&mut chunk)) {
                    return false;
                }
                chunk_size = 0;
            }
            chunk.push(RestoreRow { cf: index, key: key.to_vec(), value: value.to_vec() });
            chunk_size += size;
            rows += 1;
            bytes += row as u64;
            true
        })?;
        if all && !chunk.is_empty() {
            emit(chunk);
        }
        Ok((rows, bytes))
    }

    /// The rows in the first `chunks` chunks [`BackupSource::rows`] emits
    /// with `chunk_bytes`, or `None` when it emits fewer: whether a restore
    /// can go on after the steps an earlier attempt applied.
    pub fn rows_in_chunks(&self, chunk_bytes: usize, chunks: u64) -> anyhow::Result<Option<u64>> {
        let (mut seen, mut rows) = (0u64, 0u64);
        if chunks == 0 {
            return Ok(Some(0));
        }
        self.rows(chunk_bytes, |chunk| {
            seen += 1;
            rows += chunk.len() as u64;
            seen < chunks
        })?;
        Ok((seen == chunks).then_some(rows))
    }

    /// Reads every data row once and checks that apply can read it (its
    /// value decodes, its key has its family's shape): run before a
    /// restore begins, so an archive that is not one of Portrait's backups
    /// is refused before the shard changes, rather than half restored, or
    /// restored with a row that stops every replica's next write to it.
    pub fn check(&self) -> anyhow::Result<u64> {
        let mut rows = 0u64;
        let mut bad = None;
        self.each_row(|name, _, key, value| match check_row(name, key, value) {
            Ok(()) => {
                rows += 1;
                true
            }
            Err(e) => {
                let user =
                    String::from_utf8_lossy(key.get(..64.min(key.len())).unwrap_or_default()).into_owned();
                bad = Some(format!("a row of family {name} (key {user:?}...) cannot be read: {e}"));
                false
            }
        })?;
        match bad {
            Some(why) => {
                anyhow::bail!("{why} (no row Portrait writes is so: the archive is not one of its backups)")
            }
            None => Ok(rows),
        }
    }

    /// Calls `f(family, family index, key without the group prefix, value)`
    /// for each data row in order until it returns false; returns whether
    /// every row was seen.
    fn each_row(&self, mut f: impl FnMut(&str, u8, &[u8], &[u8]) -> bool) -> anyhow::Result<bool> {
        let db = self.db.as_ref().expect("open until dropped");
        let (start, end) = group_range(self.gid);
        for name in DATA_CFS {
            let index = ALL_CFS.iter().position(|c| *c == name).expect("a data family is a family") as u8;
            let mut opts = ReadOptions::default();
            opts.set_total_order_seek(true);
            // Read once: no block cache to grow with the archive.
            opts.fill_cache(false);
            opts.set_iterate_upper_bound(end.clone());
            let mode = IteratorMode::From(&start, rocksdb::Direction::Forward);
            for item in db.iterator_cf_opt(cf(db, name), opts, mode) {
                let (key, value) = item?;
                let key = key.get(GROUP_PREFIX_LEN..).unwrap_or_default();
                let row = key.len() + value.len();
                if row > MAX_RESTORE_ROW_BYTES {
                    anyhow::bail!(
                        "a row of family {name} is {row} bytes, over the limit of {MAX_RESTORE_ROW_BYTES} (no row \
                         Portrait writes is larger: the archive is not one of its backups)"
                    );
                }
                if !f(name, index, key, &value) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// Whether apply can read a data row of `family` (`key` without its group
/// prefix): what [`BackupSource::check`] asks of each row.
fn check_row(family: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
    let text =
        |b: &[u8]| std::str::from_utf8(b).map(drop).map_err(|_| "its key is not UTF-8 text".to_string());
    let decoded = |r: Result<(), bincode::Error>| r.map_err(|e| format!("its value does not decode: {e}"));
    match family {
        CF_PROFILES => decoded(FamilyHead::decode(value).map(drop)),
        CF_HISTORY => decoded(decode_history_event(value).map(drop)),
        CF_STATE => {
            text(key)?;
            decoded(decode_user_state(value).map(drop))
        }
        CF_TIMERS => match key.split_at_checked(8) {
            Some((_, user)) => text(user),
            None => Err("its key is shorter than a timer's 8-byte time".into()),
        },
        CF_DEDUPE if value.len() != 8 => {
            Err(format!("its value is {} bytes, not a dedupe marker's 8", value.len()))
        }
        _ => Ok(()),
    }
}

impl Drop for BackupSource {
    fn drop(&mut self) {
        drop(self.db.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a restore checks before it begins: whether group `gid` holds any
/// data row, its restore marker if a restore is in progress, and the
/// `restore_id` of the last restore that ended in it.
pub struct RestoreState {
    pub has_data: bool,
    /// The shard's replicated `written` mark: it took a write (or a
    /// restore's rows) once, whatever it holds now.
    pub written: bool,
    pub marker: Option<RestoreMarker>,
    pub restored: Option<String>,
}

/// The marker of the restore under way in group `gid`, if any (one point
/// read).
pub fn restoring(state_db: &StateDb, gid: GroupId) -> anyhow::Result<Option<RestoreMarker>> {
    let db = state_db.db();
    Ok(db.get_cf(cf(&db, CF_META), meta(gid, META_RESTORE))?.map(|b| decode(&b)).transpose()?)
}

/// Group `gid`'s [`RestoreState`].
pub fn restore_state(state_db: &StateDb, gid: GroupId) -> anyhow::Result<RestoreState> {
    let db = state_db.db();
    let (start, end) = group_range(gid);
    let mut has_data = false;
    for name in DATA_CFS {
        let mut opts = ReadOptions::default();
        opts.set_total_order_seek(true);
        opts.set_iterate_upper_bound(end.clone());
        let mut it = db.raw_iterator_cf_opt(cf(&db, name), opts);
        it.seek(&start);
        it.status()?;
        if it.valid() {
            has_data = true;
            break;
        }
    }
    let get = |name| db.get_cf(cf(&db, CF_META), meta(gid, name));
    let marker = get(META_RESTORE)?.map(|b| decode(&b)).transpose()?;
    let restored = get(META_RESTORED)?.map(|b| decode(&b)).transpose()?;
    let written = get(META_WRITTEN)?.is_some();
    Ok(RestoreState { has_data, written, marker, restored })
}
