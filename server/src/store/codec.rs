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
/// fixed 8-byte encoding would pad out to twice the size.
fn compact() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_varint_encoding().allow_trailing_bytes()
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

/// A storage failure while reading, as an openraft error.
pub fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, openraft::AnyError::new(&e)).into()
}

/// A storage failure while writing, as an openraft error.
pub fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, openraft::AnyError::new(&e)).into()
}
