//! Snapshot files: a group's SST files (see [`super::group_snapshot`])
//! packed into one archive file, so openraft can stream it in chunks (it
//! reads and writes the file; nothing is loaded into memory whole).
//!
//! Archive: the magic `PRTSNAPV`, `[u32 LE storage format]`, then per file
//! `[u32 LE name length][name][u64 LE size][bytes]`, then `[u32 0]`, then
//! `[u64 LE checksum]` of every byte before it. Unpacking refuses another
//! storage format (format-1 archives began `PRTSNAP1` and had no version
//! or checksum) and a checksum mismatch: a received archive that was
//! damaged in transit or on disk is never installed.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::checksum::Hashing;
use super::format::{self, STORAGE_FORMAT, UNVERSIONED_FORMAT};

const MAGIC: &[u8; 8] = b"PRTSNAPV";
/// How archives of format 1 began.
const MAGIC_UNVERSIONED: &[u8; 8] = b"PRTSNAP1";
const MAX_NAME: u32 = 4096;
/// The longest file name an archive may hold (the file system's limit).
const MAX_FILE_NAME: usize = 255;

/// Packs every regular file of `dir` (not recursive) into `archive`, synced.
pub fn pack(dir: &Path, archive: &Path) -> io::Result<()> {
    let mut out = Hashing::new(BufWriter::new(File::create(archive)?));
    out.write_all(MAGIC)?;
    out.write_all(&STORAGE_FORMAT.to_le_bytes())?;
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    for name in names {
        let mut file = File::open(dir.join(&name))?;
        let size = file.metadata()?.len();
        out.write_all(&(name.len() as u32).to_le_bytes())?;
        out.write_all(name.as_bytes())?;
        out.write_all(&size.to_le_bytes())?;
        let copied = io::copy(&mut (&mut file).take(size), &mut out)?;
        if copied != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{name} shrank while packing")));
        }
    }
    out.write_all(&0u32.to_le_bytes())?;
    let checksum = out.sum.finish();
    let mut out = out.inner;
    out.write_all(&checksum.to_le_bytes())?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// Unpacks `archive` into the new directory `dir`, syncing every file. On
/// an error `dir` may hold part of the archive: the caller removes it.
/// Only this binary's storage format: a snapshot between replicas.
pub fn unpack(archive: &Path, dir: &Path) -> io::Result<()> {
    unpack_as(archive, dir, Formats::Exact)
}

/// [`unpack`] for a backup archive being restored: any format from
/// [`format::OLDEST_BACKUP_FORMAT`] on (see there).
pub fn unpack_backup(archive: &Path, dir: &Path) -> io::Result<()> {
    unpack_as(archive, dir, Formats::Backup)
}

/// The storage formats an unpacking reads.
#[derive(Clone, Copy)]
enum Formats {
    Exact,
    Backup,
}

fn unpack_as(archive: &Path, dir: &Path, formats: Formats) -> io::Result<()> {
    let mut input = Hashing::new(BufReader::new(File::open(archive)?));
    read_header(&mut input, archive, formats)?;
    std::fs::create_dir_all(dir)?;
    loop {
        let name_len = read_u32(&mut input)?;
        if name_len == 0 {
            break;
        }
        if name_len > MAX_NAME {
            return Err(bad("file name too long"));
        }
        let mut name = vec![0u8; name_len as usize];
        input.read_exact(&mut name)?;
        let name = String::from_utf8(name).map_err(|_| bad("file name is not UTF-8"))?;
        if name.contains('/') || name.contains("..") {
            return Err(bad("file name escapes the directory"));
        }
        // What the file system would refuse is the archive's fault too (its
        // errors would read as this node's).
        if name.is_empty() || name == "." || name.contains('\0') || name.len() > MAX_FILE_NAME {
            return Err(bad("not a file name"));
        }
        let size = read_u64(&mut input)?;
        let mut out = File::create(dir.join(&name))?;
        let copied = io::copy(&mut (&mut input).take(size), &mut out)?;
        if copied != size {
            return Err(bad("archive truncated"));
        }
        out.sync_all()?;
    }
    let computed = input.sum.finish();
    let mut rest = input.inner;
    let stored = read_u64(&mut rest).map_err(|_| bad("archive truncated before its checksum"))?;
    if stored != computed {
        return Err(bad("archive checksum mismatch (damaged in transit or on disk)"));
    }
    if rest.read(&mut [0u8; 1])? != 0 {
        return Err(bad("bytes after the archive's checksum"));
    }
    File::open(dir)?.sync_all()
}

/// Checks the magic and the storage format before anything is unpacked.
fn read_header(input: &mut impl Read, archive: &Path, formats: Formats) -> io::Result<()> {
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic).map_err(|_| bad("not a Portrait snapshot archive"))?;
    let version = match &magic {
        m if m == MAGIC => read_u32(input)?,
        m if m == MAGIC_UNVERSIONED => UNVERSIONED_FORMAT,
        _ => return Err(bad("not a Portrait snapshot archive")),
    };
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    match formats {
        Formats::Exact => format::check(format!("snapshot archive {}", archive.display()), version)
            .map_err(|e| invalid(e.to_string())),
        Formats::Backup => format::check_backup(format!("backup archive {}", archive.display()), version)
            .map_err(|e| invalid(e.to_string())),
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Paths in `<data>/snapshots/<group>`: each group's snapshots apart.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    pub root: PathBuf,
}

impl SnapshotDir {
    pub fn new(data_dir: &Path, gid: crate::types::GroupId) -> io::Result<SnapshotDir> {
        let root = data_dir.join("snapshots").join(gid.dir_name());
        std::fs::create_dir_all(&root)?;
        Ok(SnapshotDir { root })
    }
    /// The archive of snapshot `id` (`current.meta` names the current one).
    pub fn archive(&self, id: &str) -> PathBuf {
        self.root.join(format!("snap-{id}.snap"))
    }
    /// Removes archives other than `keep`'s.
    pub fn remove_other_archives(&self, keep: &str) -> io::Result<()> {
        let keep = format!("snap-{keep}.snap");
        for entry in std::fs::read_dir(&self.root)? {
            let name = entry?.file_name().to_string_lossy().to_string();
            if name.starts_with("snap-") && name != keep {
                std::fs::remove_file(self.root.join(name))?;
            }
        }
        Ok(())
    }
    /// The bincode `SnapshotMeta` of the current snapshot.
    pub fn meta(&self) -> PathBuf {
        self.root.join("current.meta")
    }
    /// Where a snapshot being received from the leader is written.
    pub fn incoming(&self) -> PathBuf {
        self.root.join("incoming.part")
    }
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Removes a snapshot left for a replica that has neither a log (no
    /// entry, nothing purged) nor an applied state: it holds none. Left
    /// by a drop that raced a snapshot build of the replica, or whose
    /// removal a power loss undid, openraft would take the replica for one
    /// holding it, skip the leader's older snapshot, and apply the entries
    /// after it onto an empty state. Says whether there was one.
    pub async fn forget_leftover(
        &self,
        log: &mut super::LogStore,
        state: &super::GroupState,
    ) -> anyhow::Result<bool> {
        let log_state = openraft::storage::RaftLogStorage::get_log_state(log).await?;
        if log_state.last_log_id.is_some() || state.applied().last_applied.is_some() {
            return Ok(false);
        }
        let left = self.meta().exists();
        self.clear()?;
        Ok(left)
    }

    /// Removes the current snapshot (its meta first, then every archive),
    /// for a group whose state was wiped: openraft must not take the group
    /// for one that holds it.
    pub fn clear(&self) -> io::Result<()> {
        match std::fs::remove_file(self.meta()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.remove_other_archives("")?;
        self.sync()
    }

    /// Makes the directory's entries durable (a file created or renamed in
    /// it survives a power loss only once its directory is synced).
    pub fn sync(&self) -> io::Result<()> {
        std::fs::File::open(&self.root)?.sync_all()
    }

    /// Makes `archive` (installed or built) the current snapshot with
    /// `meta`. Crash-safe: the archive is moved to its id's name first;
    /// replacing `current.meta` is the one atomic switch; older archives
    /// are removed after.
    pub fn publish(&self, archive: &Path, meta: &crate::types::SnapshotMeta) -> anyhow::Result<()> {
        std::fs::rename(archive, self.archive(&meta.snapshot_id))?;
        let meta_tmp = self.scratch("meta.tmp");
        std::fs::write(&meta_tmp, super::codec::encode(meta))?;
        std::fs::File::open(&meta_tmp)?.sync_all()?;
        std::fs::rename(&meta_tmp, self.meta())?;
        self.sync()?;
        // Published: an older archive left behind (a failing disk) is
        // removed at the next publish, and fails nothing now.
        if let Err(e) = self.remove_other_archives(&meta.snapshot_id) {
            tracing::warn!(dir = %self.root.display(), error = %e, "removing older snapshot archives");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.sst"), vec![7u8; 100_000]).unwrap();
        std::fs::write(src.join("CURRENT"), b"MANIFEST-1\n").unwrap();
        std::fs::write(src.join("empty"), b"").unwrap();
        let archive = tmp.path().join("x.snap");
        pack(&src, &archive).unwrap();
        let dst = tmp.path().join("dst");
        unpack(&archive, &dst).unwrap();
        for name in ["a.sst", "CURRENT", "empty"] {
            assert_eq!(std::fs::read(src.join(name)).unwrap(), std::fs::read(dst.join(name)).unwrap());
        }
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("x.snap");
        std::fs::write(&archive, b"hello world").unwrap();
        assert!(unpack(&archive, &tmp.path().join("d1")).is_err());
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), vec![1u8; 1000]).unwrap();
        pack(&src, &archive).unwrap();
        let bytes = std::fs::read(&archive).unwrap();
        std::fs::write(&archive, &bytes[..bytes.len() - 100]).unwrap();
        assert!(unpack(&archive, &tmp.path().join("d2")).is_err());
    }

    fn packed(tmp: &Path) -> (PathBuf, Vec<u8>) {
        let src = tmp.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a.sst"), (0..5_000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<_>>())
            .unwrap();
        std::fs::write(src.join("CURRENT"), b"MANIFEST-1\n").unwrap();
        let archive = tmp.join("x.snap");
        pack(&src, &archive).unwrap();
        let bytes = std::fs::read(&archive).unwrap();
        (archive, bytes)
    }

    /// An archive of one file named `name`, with a sound checksum.
    fn archive_naming(name: &[u8]) -> Vec<u8> {
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&STORAGE_FORMAT.to_le_bytes());
        body.extend_from_slice(&(name.len() as u32).to_le_bytes());
        body.extend_from_slice(name);
        body.extend_from_slice(&3u64.to_le_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&0u32.to_le_bytes());
        sealed(body)
    }

    /// `body` followed by its checksum, as an archive ends.
    fn sealed(mut body: Vec<u8>) -> Vec<u8> {
        let mut sum = super::super::checksum::Checksum::default();
        sum.update(&body);
        body.extend_from_slice(&sum.finish().to_le_bytes());
        body
    }

    #[test]
    fn a_name_the_file_system_refuses_is_the_archives_fault() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("x.snap");
        std::fs::write(&archive, archive_naming(b"ok.sst")).unwrap();
        unpack(&archive, &tmp.path().join("ok")).unwrap();
        let long = vec![b'a'; 256];
        for name in [&b"."[..], b"a\0b", &long] {
            std::fs::write(&archive, archive_naming(name)).unwrap();
            let e = unpack(&archive, &tmp.path().join("bad")).unwrap_err();
            assert_eq!((e.kind(), e.to_string()), (io::ErrorKind::InvalidData, "not a file name".into()));
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (archive, bytes) = packed(tmp.path());
        assert_eq!(&bytes[..8], b"PRTSNAPV");
        assert_eq!(bytes[8..12], STORAGE_FORMAT.to_le_bytes());
        // In a file's bytes (no structural check would see it), in a name,
        // and in the checksum itself.
        for at in [bytes.len() / 2, 20, bytes.len() - 3] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            std::fs::write(&archive, &damaged).unwrap();
            let dst = tmp.path().join(format!("d{at}"));
            assert!(unpack(&archive, &dst).is_err(), "flip at {at} of {}", bytes.len());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(&archive, &longer).unwrap();
        assert!(unpack(&archive, &tmp.path().join("long")).is_err());
    }

    #[test]
    fn another_storage_format_is_refused_before_unpacking() {
        let tmp = tempfile::tempdir().unwrap();
        let (archive, mut bytes) = packed(tmp.path());
        bytes[8..12].copy_from_slice(&(STORAGE_FORMAT + 1).to_le_bytes());
        std::fs::write(&archive, &bytes).unwrap();
        let dst = tmp.path().join("d");
        let e = unpack(&archive, &dst).unwrap_err().to_string();
        assert!(e.contains(&format!("was written by storage format {}", STORAGE_FORMAT + 1)), "{e}");
        assert!(!dst.exists(), "nothing unpacked");
        // An archive from before formats were recorded.
        let mut old = b"PRTSNAP1".to_vec();
        old.extend_from_slice(&0u32.to_le_bytes());
        std::fs::write(&archive, &old).unwrap();
        let e = unpack(&archive, &dst).unwrap_err().to_string();
        assert!(e.contains("was written by storage format 1;"), "{e}");
    }

    /// Repacks `bytes` (an archive) as written by `version`: the header
    /// and the checksum over it.
    fn as_format(bytes: &[u8], version: u32) -> Vec<u8> {
        let mut body = bytes[..bytes.len() - 8].to_vec();
        body[8..12].copy_from_slice(&version.to_le_bytes());
        sealed(body)
    }

    #[test]
    fn a_backup_of_an_older_format_is_unpacked_for_a_restore_only() {
        use super::super::format::OLDEST_BACKUP_FORMAT;
        let tmp = tempfile::tempdir().unwrap();
        let (archive, bytes) = packed(tmp.path());
        for version in OLDEST_BACKUP_FORMAT..=STORAGE_FORMAT {
            std::fs::write(&archive, as_format(&bytes, version)).unwrap();
            let dst = tmp.path().join(format!("backup-{version}"));
            unpack_backup(&archive, &dst).unwrap_or_else(|e| panic!("format {version}: {e}"));
            assert!(dst.join("a.sst").exists());
            let replica = tmp.path().join(format!("replica-{version}"));
            assert_eq!(unpack(&archive, &replica).is_ok(), version == STORAGE_FORMAT, "a snapshot: exactly");
        }
        for version in [OLDEST_BACKUP_FORMAT - 1, STORAGE_FORMAT + 1] {
            std::fs::write(&archive, as_format(&bytes, version)).unwrap();
            let dst = tmp.path().join(format!("refused-{version}"));
            let e = unpack_backup(&archive, &dst).unwrap_err().to_string();
            let expected = format!(
                "was written by storage format {version}; this binary restores backups of formats \
                 {OLDEST_BACKUP_FORMAT} to {STORAGE_FORMAT}"
            );
            assert!(e.contains(&expected), "{e}");
            assert!(!dst.exists(), "nothing unpacked");
        }
    }
}
