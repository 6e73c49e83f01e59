//! Snapshot files: a RocksDB checkpoint of the state machine packed into one
//! archive file, so openraft can stream it in chunks (it reads and writes
//! the file; nothing is loaded into memory whole).
//!
//! Archive: `PRTSNAP1`, then per file `[u32 LE name length][name][u64 LE
//! size][bytes]`, then `[u32 0]`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"PRTSNAP1";
const MAX_NAME: u32 = 4096;

/// Packs every regular file of `dir` (not recursive) into `archive`, synced.
pub fn pack(dir: &Path, archive: &Path) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(archive)?);
    out.write_all(MAGIC)?;
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
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// Unpacks `archive` into the new directory `dir`, syncing every file.
pub fn unpack(archive: &Path, dir: &Path) -> io::Result<()> {
    let mut input = BufReader::new(File::open(archive)?);
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("not a Portrait snapshot archive"));
    }
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
        let size = read_u64(&mut input)?;
        let mut out = File::create(dir.join(&name))?;
        let copied = io::copy(&mut (&mut input).take(size), &mut out)?;
        if copied != size {
            return Err(bad("archive truncated"));
        }
        out.sync_all()?;
    }
    File::open(dir)?.sync_all()
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

/// Paths in `<data>/snapshots`.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    pub root: PathBuf,
}

impl SnapshotDir {
    pub fn new(data_dir: &Path) -> io::Result<SnapshotDir> {
        let root = data_dir.join("snapshots");
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
}
