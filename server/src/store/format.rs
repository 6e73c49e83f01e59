//! The storage format version: one number for everything a node keeps on
//! disk — the state-machine database (its keys, row encodings and feature
//! identities), the raft log, and snapshot archives.
//!
//! Each database records the version it was created with (a 4-byte LE key
//! in its meta column family, written with a synced WAL write when the
//! database is new); each snapshot archive carries it in its header. At
//! open, at snapshot install and when unpacking an archive, a version other
//! than [`STORAGE_FORMAT`] is refused with one line naming both versions,
//! before anything is read: a binary never half-reads data it does not
//! understand. A backup archive being restored is the one exception: it is
//! read from [`OLDEST_BACKUP_FORMAT`] on. Databases from before versions were recorded hold no key
//! and report format 1.
//!
//! Bumping the format is the one-line change of [`STORAGE_FORMAT`]: older
//! data dirs are then refused until migrated (docs/operations.md#upgrades).
//! History: 1 = unversioned (features identified by a hash of their
//! `Debug` text, unversioned rows); 2 = canonical feature identities,
//! version byte on every row, versioned archives with a checksum;
//! 3 = sharded layout (raft log and state keyed by group, one state
//! database per node, per-group SST snapshot archives); 4 = every node of
//! the shard map has a client and a peer address (raft memberships name
//! the peer one); 5 = the shard map records the nodes being drained;
//! 6 = each node's data dir has an identity (its node id and a random
//! incarnation), which the shard map records per node; 7 = the shard map
//! records the cluster's id (the creating node's incarnation); 8 = the meta
//! state records the cluster's apply rules version (`portrait_core::rules`;
//! a shard's own version is a meta key, absent meaning the first).

use std::path::Path;

use rocksdb::{IteratorMode, WriteOptions, DB};

use super::sm_db::cf;

/// The format this binary writes, and the only one it reads (backup
/// archives aside: [`OLDEST_BACKUP_FORMAT`]).
/// 8: the cluster's apply rules version (see the module's history)
pub const STORAGE_FORMAT: u32 = 8;

/// What a database or archive without a recorded version was written by.
pub const UNVERSIONED_FORMAT: u32 = 1;

/// The oldest format whose shard archives a restore reads (a backup
/// outlives the binary that took it). Formats 3 to 8 changed no key or row
/// encoding of a shard's data column families (a restore copies only
/// those; format 8's per-shard `rules` meta key is not copied) and not the
/// archive layout; a format that changes a shard's data rows must raise
/// this to itself (or convert older rows on restore).
pub const OLDEST_BACKUP_FORMAT: u32 = 3;

/// Refusal to read data written in another format.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} was written by storage format {found}; this binary reads format {STORAGE_FORMAT} \
     (see docs/operations.md#upgrades)"
)]
pub struct FormatError {
    pub what: String,
    pub found: u32,
}

/// Refusal to restore a backup archive written in a format this binary
/// does not restore.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} was written by storage format {found}; this binary restores backups of formats \
     {OLDEST_BACKUP_FORMAT} to {STORAGE_FORMAT} (see docs/operations.md#upgrades)"
)]
pub struct BackupFormatError {
    pub what: String,
    pub found: u32,
}

/// `Ok` if a backup archive written in `found` can be restored by this
/// binary ([`OLDEST_BACKUP_FORMAT`] to [`STORAGE_FORMAT`]).
pub fn check_backup(what: impl std::fmt::Display, found: u32) -> Result<(), BackupFormatError> {
    match (OLDEST_BACKUP_FORMAT..=STORAGE_FORMAT).contains(&found) {
        true => Ok(()),
        false => Err(BackupFormatError { what: what.to_string(), found }),
    }
}

/// `Ok` if data written in `found` can be read by this binary.
pub fn check(what: impl std::fmt::Display, found: u32) -> Result<(), FormatError> {
    match found == STORAGE_FORMAT {
        true => Ok(()),
        false => Err(FormatError { what: what.to_string(), found }),
    }
}

pub fn encode_version(version: u32) -> [u8; 4] {
    version.to_le_bytes()
}

/// A stored version; a value of the wrong size reads as version 0 (which
/// no binary reads), so it is refused rather than guessed.
pub fn decode_version(bytes: &[u8]) -> u32 {
    bytes.try_into().map(u32::from_le_bytes).unwrap_or(0)
}

/// Checks the version a database at `path` records under `key` in column
/// family `meta_cf`. A database with no version and nothing in `data_cfs`
/// (column families without a prefix extractor: a plain iteration sees all
/// of them) was just created: this version is recorded, synced.
pub fn check_or_init(
    db: &DB,
    path: &Path,
    meta_cf: &str,
    key: &[u8],
    data_cfs: &[&str],
) -> anyhow::Result<()> {
    let meta = cf(db, meta_cf);
    if let Some(found) = db.get_cf(meta, key)? {
        return Ok(check(path.display(), decode_version(&found))?);
    }
    for name in data_cfs {
        if db.iterator_cf(cf(db, name), IteratorMode::Start).next().is_some() {
            return Err(FormatError { what: path.display().to_string(), found: UNVERSIONED_FORMAT }.into());
        }
    }
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.put_cf_opt(meta, key, encode_version(STORAGE_FORMAT), &sync)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_is_one_line_naming_both_versions() {
        let e = check("data dir /x/state", 1).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "data dir /x/state was written by storage format 1; this binary reads format \
                 {STORAGE_FORMAT} (see docs/operations.md#upgrades)"
            )
        );
        assert!(!e.contains('\n'));
        assert!(check("x", STORAGE_FORMAT).is_ok());
        assert_eq!(decode_version(&encode_version(7)), 7);
        assert_eq!(decode_version(b"\x02"), 0, "a malformed version is never taken for a real one");
    }
}
