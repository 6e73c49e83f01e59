//! bincode helpers and the mapping of storage failures to openraft errors.

use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
use serde::{de::DeserializeOwned, Serialize};

use crate::types::StorageError;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("bincode serialization of plain data cannot fail")
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
    use bincode::Options;
    compact().serialize(value).expect("bincode serialization of plain data cannot fail")
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
