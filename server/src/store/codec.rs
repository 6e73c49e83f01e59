//! bincode helpers and the mapping of storage failures to openraft errors.

use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
use serde::{de::DeserializeOwned, Serialize};

use crate::types::StorageError;

/// Fixed-width bincode. Written straight into a growing buffer: bincode's
/// own `serialize` walks the value twice (once to size the buffer), which
/// costs more than the few reallocations of a large log entry.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    bincode::serialize_into(&mut out, value).expect("bincode serialization of plain data cannot fail");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(bytes)
}

/// Variable-length integers: for the rows apply rewrites most (user
/// states), where lengths, counts and bucket indexes are small numbers that
/// fixed 8-byte encoding would pad out to twice the size. Trailing bytes
/// are an error: bincode is not self-describing, so a value with fields
/// appended must never decode as the shorter one (rows carry a version
/// byte instead, see [`encode_row_into`]).
fn compact() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_varint_encoding()
}

pub fn encode_compact<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_compact_into(&mut out, value);
    out
}

/// Appends the compact encoding of `value` to `out` (apply reuses one
/// buffer for every row it writes, and skips bincode's sizing pass).
pub fn encode_compact_into<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    use bincode::Options;
    compact().serialize_into(out, value).expect("bincode serialization of plain data cannot fail")
}

pub fn decode_compact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
    use bincode::Options;
    compact().deserialize(bytes)
}

/// The encoding version of stored rows (family heads, history events, user
/// states), written after their 8-byte expiry header. Each row carries its
/// own version (one byte) rather than one per column family in meta: a
/// later encoding can then be introduced row by row — new rows in the new
/// version, old ones read in theirs and rewritten when next applied —
/// without rewriting a whole column family at upgrade.
pub const ROW_V1: u8 = 1;

/// Writes a stored row into `out` (cleared first): `[i64 BE expiry]` (read
/// by the compaction filter without decoding, see `record::stored_expiry`),
/// `[u8 version]`, then compact bincode of `value`.
pub fn encode_row_into<T: Serialize>(out: &mut Vec<u8>, expiry: i64, value: &T) {
    out.clear();
    out.extend_from_slice(&expiry.to_be_bytes());
    out.push(ROW_V1);
    encode_compact_into(out, value);
}

/// Decodes a row written by [`encode_row_into`]. A row in an encoding this
/// binary does not know (`what` names its kind) is an error, never a
/// misread.
pub fn decode_row<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, bincode::Error> {
    match bytes.get(8) {
        Some(&ROW_V1) => decode_compact(&bytes[9..]),
        Some(v) => Err(Box::new(bincode::ErrorKind::Custom(format!(
            "{what} row in encoding version {v}; this binary reads version {ROW_V1} \
             (see docs/operations.md#upgrades)"
        )))),
        None => Err(Box::new(bincode::ErrorKind::Custom(format!(
            "{what} row of {} bytes has no header",
            bytes.len()
        )))),
    }
}

/// A storage failure while reading, as an openraft error.
pub fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, openraft::AnyError::new(&e)).into()
}

/// A storage failure while writing, as an openraft error.
pub fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, openraft::AnyError::new(&e)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_carry_a_version_and_unknown_ones_are_refused() {
        let mut row = Vec::new();
        encode_row_into(&mut row, 42, &(7u32, "x".to_string()));
        assert_eq!(&row[..9], &[0, 0, 0, 0, 0, 0, 0, 42, ROW_V1]);
        assert_eq!(decode_row::<(u32, String)>(&row, "test").unwrap(), (7, "x".to_string()));
        row[8] = 2;
        let e = decode_row::<(u32, String)>(&row, "test").unwrap_err().to_string();
        assert!(e.contains("test row in encoding version 2; this binary reads version 1"), "{e}");
        assert!(decode_row::<u32>(&row[..8], "test").is_err());
    }

    #[test]
    fn appended_fields_are_an_error_not_a_shorter_value() {
        // What an "append a field" change would write, read by the old type.
        let longer = encode_compact(&(7u32, 8u32));
        assert!(decode_compact::<u32>(&longer).is_err());
    }
}
