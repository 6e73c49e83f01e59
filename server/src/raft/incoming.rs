//! Checks the snapshot a follower receives, chunk by chunk, before the
//! last chunk reaches openraft: an archive whose trailing checksum does not
//! match (damaged on the sender's disk or in transit) is refused there, so
//! openraft never gets to install it. openraft 0.9 treats a failed install
//! as fatal (the group's raft stops, and with it the node), so the state
//! machine's own check at install is too late to keep the node up.

use std::sync::Mutex;

use crate::store::checksum::TrailerCheck;

/// What a refused snapshot's error says: the sender reads it to check its
/// archive again (`raft/network.rs`).
pub const DAMAGED_ARCHIVE: &str = "the archive's checksum does not match";

/// One group's snapshot being received.
#[derive(Default)]
pub struct IncomingSnapshot(Mutex<Option<Receiving>>);

struct Receiving {
    id: String,
    /// The offset the next chunk should have, and the check of the bytes
    /// before it.
    next: u64,
    check: TrailerCheck,
    /// The last chunk's offset and the check before it: a resent chunk
    /// (its answer was lost) is checked again from there.
    last: (u64, TrailerCheck),
}

impl IncomingSnapshot {
    /// Takes the chunk of snapshot `id` at `offset`; `Err` with the reason
    /// when it is the last one (`done`) and the archive it completes is
    /// damaged (nothing is recorded: a resent last chunk is checked again).
    /// Chunks out of order are not checked (openraft refuses them, and the
    /// sender starts over at offset 0), and change nothing here: a stray
    /// chunk (a deposed leader's, of another snapshot) must not turn the
    /// check off for the rest of the stream being received. A last chunk
    /// that cannot be checked (the chunks before it were not seen here, or
    /// a stray first chunk took their place) is refused: the sender starts
    /// over at offset 0, and that stream is checked.
    pub fn chunk(&self, id: &str, offset: u64, data: &[u8], done: bool) -> Result<(), String> {
        let mut receiving = self.0.lock().expect("incoming snapshot lock");
        let base = match receiving.as_ref() {
            _ if offset == 0 => TrailerCheck::default(),
            Some(r) if r.id == id && r.next == offset => r.check.clone(),
            Some(r) if r.id == id && r.last.0 == offset => r.last.1.clone(),
            _ if done => {
                return Err(format!(
                    "snapshot {id}: its last chunk (at {offset}) came without the chunks before it, so the \
                     archive cannot be checked; refused before install: send it again from the start"
                ))
            }
            _ => return Ok(()),
        };
        let mut check = base.clone();
        check.update(data);
        if done && !check.is_intact() {
            return Err(format!(
                "snapshot {id}: {DAMAGED_ARCHIVE} its {} bytes (damaged on the sender's disk or in transit); \
                 refused before install, this replica is unchanged",
                offset + data.len() as u64
            ));
        }
        *receiving = match done {
            true => None,
            false => Some(Receiving {
                id: id.to_string(),
                next: offset + data.len() as u64,
                check,
                last: (offset, base),
            }),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::checksum::Checksum;

    fn archive(n: u32) -> Vec<u8> {
        let mut data: Vec<u8> = (0..n).map(|i| (i * 31 + 7) as u8).collect();
        let mut sum = Checksum::default();
        sum.update(&data);
        data.extend_from_slice(&sum.finish().to_le_bytes());
        data
    }

    /// Sends `archive` in chunks of `size`.
    fn send(incoming: &IncomingSnapshot, id: &str, archive: &[u8], size: usize) -> Result<(), String> {
        let chunks: Vec<&[u8]> = archive.chunks(size).collect();
        let mut offset = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            incoming.chunk(id, offset, chunk, i + 1 == chunks.len())?;
            offset += chunk.len() as u64;
        }
        Ok(())
    }

    #[test]
    fn a_damaged_archive_is_refused_at_its_last_chunk_and_a_sound_one_passes() {
        let incoming = IncomingSnapshot::default();
        let sound = archive(10_000);
        for size in [3, 4096, sound.len()] {
            assert_eq!(send(&incoming, "7-1", &sound, size), Ok(()), "chunks of {size}");
        }
        let mut damaged = sound.clone();
        damaged[1234] ^= 1;
        let e = send(&incoming, "7-2", &damaged, 4096).unwrap_err();
        assert!(e.starts_with("snapshot 7-2: the archive's checksum does not match its 10008 bytes"), "{e}");
        // Sent again from the start, a sound archive passes.
        assert_eq!(send(&incoming, "7-3", &sound, 4096), Ok(()));
    }

    #[test]
    fn a_resent_chunk_is_checked_from_where_it_began() {
        let incoming = IncomingSnapshot::default();
        let sound = archive(9_000);
        let (a, rest) = sound.split_at(4096);
        let (b, c) = rest.split_at(4096);
        incoming.chunk("s", 0, a, false).unwrap();
        incoming.chunk("s", 4096, b, false).unwrap();
        incoming.chunk("s", 4096, b, false).unwrap();
        let mut bad = c.to_vec();
        bad[0] ^= 1;
        assert!(incoming.chunk("s", 8192, &bad, true).is_err());
        assert_eq!(incoming.chunk("s", 8192, c, true), Ok(()), "the last chunk resent whole");
    }

    #[test]
    fn a_stray_chunk_does_not_turn_the_check_off() {
        let incoming = IncomingSnapshot::default();
        let sound = archive(9_000);
        let (a, rest) = sound.split_at(4096);
        let (b, c) = rest.split_at(4096);
        incoming.chunk("s", 0, a, false).unwrap();
        // A deposed leader's chunk of another snapshot, mid-stream.
        assert_eq!(incoming.chunk("old", 4096, b, false), Ok(()), "left to openraft");
        incoming.chunk("s", 4096, b, false).unwrap();
        let mut bad = c.to_vec();
        bad[0] ^= 1;
        assert!(incoming.chunk("s", 8192, &bad, true).is_err(), "still checked");
        // A stray first chunk mid-stream: what follows cannot be checked,
        // so its last chunk is refused, and the stream sent again passes.
        incoming.chunk("s", 0, a, false).unwrap();
        incoming.chunk("old", 0, a, false).unwrap();
        assert_eq!(incoming.chunk("s", 4096, b, false), Ok(()), "left to openraft");
        let e = incoming.chunk("s", 8192, &bad, true).unwrap_err();
        assert!(e.contains("came without the chunks before it"), "{e}");
        assert_eq!(send(&incoming, "s", &sound, 4096), Ok(()));
    }
}
