//! A streaming checksum for snapshot archives (see `snapshot`).

use std::io::{self, Read, Write};

/// A reader or writer that checksums the bytes passing through it.
pub struct Hashing<T> {
    pub inner: T,
    pub sum: Checksum,
}

impl<T> Hashing<T> {
    pub fn new(inner: T) -> Self {
        Hashing { inner, sum: Checksum::default() }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }
}

/// A 64-bit checksum against accidental damage (bit flips, truncation,
/// lost or repeated blocks), not tampering: a word at a time, each step
/// `h = (rotl(h, 5) ^ word) * K` (FxHash's), a bijection of both `h` and
/// the word, so any one changed word changes the result. Several GB/s,
/// where a byte-at-a-time hash would add a second per GB to every
/// snapshot.
#[derive(Clone, Default)]
pub struct Checksum {
    h: u64,
    tail: [u8; 8],
    tail_len: usize,
    len: u64,
}

impl Checksum {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.tail));
            self.tail_len = 0;
        }
        let words = data.chunks_exact(8);
        let rest = words.remainder();
        for w in words {
            self.mix(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    fn mix(&mut self, word: u64) {
        self.h = (self.h.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    /// Pads the last partial word with zeros, then mixes in the length (so
    /// trailing zero bytes count).
    pub fn finish(mut self) -> u64 {
        if self.tail_len > 0 {
            self.tail[self.tail_len..].fill(0);
            self.mix(u64::from_le_bytes(self.tail));
        }
        self.mix(self.len);
        self.h
    }
}

/// Checks an archive's trailer (the u64 LE checksum of every byte before
/// it) as the archive's bytes come in, in order and in pieces of any size:
/// the last 8 bytes seen are held back from the sum.
#[derive(Clone, Default)]
pub struct TrailerCheck {
    sum: Checksum,
    held: Vec<u8>,
}

impl TrailerCheck {
    pub fn update(&mut self, data: &[u8]) {
        self.held.extend_from_slice(data);
        if self.held.len() > 8 {
            let n = self.held.len() - 8;
            self.sum.update(&self.held[..n]);
            self.held.drain(..n);
        }
    }

    /// Whether the bytes so far end with the checksum of those before them.
    pub fn is_intact(&self) -> bool {
        let Ok(trailer) = <[u8; 8]>::try_from(&self.held[..]) else { return false };
        self.sum.clone().finish() == u64::from_le_bytes(trailer)
    }
}

/// Whether the archive read from `input` ends with the checksum of its
/// bytes before it (`snapshot`'s archive format), read in 1 MiB pieces.
pub async fn archive_is_intact(input: &mut (impl tokio::io::AsyncRead + Unpin)) -> io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let mut check = TrailerCheck::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match input.read(&mut buf).await? {
            0 => return Ok(check.is_intact()),
            n => check.update(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `data` followed by its checksum, as an archive ends.
    fn sealed(data: &[u8]) -> Vec<u8> {
        let mut sum = Checksum::default();
        sum.update(data);
        let mut out = data.to_vec();
        out.extend_from_slice(&sum.finish().to_le_bytes());
        out
    }

    #[tokio::test]
    async fn a_trailer_is_checked_however_the_archive_is_split() {
        let archive = sealed(&(0..10_000u32).map(|i| (i * 13) as u8).collect::<Vec<_>>());
        for piece in [1, 3, 8, 9, 4096, archive.len()] {
            let mut check = TrailerCheck::default();
            for chunk in archive.chunks(piece) {
                check.update(chunk);
            }
            assert!(check.is_intact(), "pieces of {piece}");
        }
        assert!(archive_is_intact(&mut &archive[..]).await.unwrap());
        let mut damaged = archive.clone();
        damaged[5000] ^= 0x10;
        assert!(!archive_is_intact(&mut &damaged[..]).await.unwrap());
        assert!(!archive_is_intact(&mut &archive[..archive.len() - 1]).await.unwrap(), "truncated");
        assert!(!TrailerCheck::default().is_intact());
        assert!(archive_is_intact(&mut &sealed(b"")[..]).await.unwrap());
    }

    #[test]
    fn checksum_is_the_same_however_the_bytes_are_split() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut whole = Checksum::default();
        whole.update(&data);
        let mut parts = Checksum::default();
        for chunk in data.chunks(3) {
            parts.update(chunk);
        }
        let mut padded = Checksum::default();
        padded.update(&data);
        padded.update(&[0]);
        let whole = whole.finish();
        assert_eq!(whole, parts.finish());
        assert_ne!(whole, padded.finish(), "a trailing zero counts");
    }
}
