//! The codec of every generated service and client: prost's, with an
//! optional check of a message's encoded bytes before prost decodes it.
//!
//! prost builds a whole message before a handler sees it, and a small
//! message can decode into a large one: an empty `Event` is 2 bytes on the
//! wire and about 150 in memory, so a 16 MiB `WriteRequest` of empty events
//! would take over 1 GiB before its event count were checked. A server
//! installs a check ([`check_before_decoding`]) that walks the bytes of the
//! messages it knows to be at risk and refuses them with a status instead.
//! Without one (a client), decoding is prost's alone.

use std::any::TypeId;
use std::sync::OnceLock;

use prost::bytes::Buf;
use prost::Message;
use tonic::codec::{BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// A check of a message of type `TypeId` given its encoded bytes: `Err` is
/// the call's status, and the message is not decoded.
pub type Check = fn(TypeId, &[u8]) -> Result<(), Status>;

static CHECK: OnceLock<Check> = OnceLock::new();

/// Installs the process's check of every message decoded from now on (the
/// first call wins).
pub fn check_before_decoding(check: Check) {
    let _ = CHECK.set(check);
}

/// prost's codec with the check.
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(ProstCodec::default())
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ExactEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ExactEncoder(self.0.encoder())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(self.0.decoder())
    }
}

/// prost's encoder into a buffer grown once to the message's size. prost
/// writes into tonic's `BytesMut` without reserving, which then grows by
/// doubling: a 13 MB message held a 16 MiB allocation, and one just past a
/// power of two nearly twice its size, for as long as HTTP/2 kept the bytes
/// (a slow reader: the node's response budget counts the encoded size).
pub struct ExactEncoder<T>(ProstEncoder<T>);

impl<T: Message> Encoder for ExactEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// prost's decoder after the check.
pub struct CheckedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + 'static> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let Some(check) = CHECK.get() else { return self.0.decode(buf) };
        // One message is one contiguous buffer (tonic's `BytesMut`).
        check(TypeId::of::<U>(), buf.chunk())?;
        // A client's request the walk passed that prost still cannot
        // decode (a field of the wrong wire type, text that is not UTF-8)
        // is the caller's to mend, not the server's fault (prost's
        // INTERNAL). Only requests of the client API: a node decodes its
        // peers' answers with this decoder too, and a peer's undecodable
        // answer is no fault of the request (a forwarded write may have
        // been applied).
        self.0.decode(buf).map_err(|e| match e.code() {
            tonic::Code::Internal if client_request(TypeId::of::<U>()) => undecodable(e.message()),
            _ => e,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Whether `message` is a request of the client API (only ever decoded by
/// the server it is sent to).
fn client_request(message: TypeId) -> bool {
    use crate::v1::*;
    [TypeId::of::<WriteRequest>(), TypeId::of::<GetProfileRequest>(), TypeId::of::<BatchGetProfilesRequest>()]
        .contains(&message)
}

/// INVALID_ARGUMENT for a request prost cannot decode, with the stable
/// error code a server's statuses carry (`x-portrait-error`).
fn undecodable(reason: &str) -> Status {
    let mut status = Status::invalid_argument(format!("request: not a valid protobuf message ({reason})"));
    status
        .metadata_mut()
        .insert("x-portrait-error", tonic::metadata::MetadataValue::from_static("INVALID_ARGUMENT"));
    status
}

/// Walking protobuf's wire format without decoding it.
pub mod wire {
    /// One field: its number and, for a length-delimited field, its bytes.
    pub struct Field<'a> {
        pub number: u32,
        pub bytes: Option<&'a [u8]>,
    }

    /// The top-level fields of an encoded message, in order. Ends early
    /// at the first field it cannot walk (malformed, or a group, which
    /// prost would skip whatever it holds): [`Fields::broken`] then says so,
    /// and a check must refuse the message rather than pass what it did
    /// not see.
    pub struct Fields<'a> {
        rest: &'a [u8],
        broken: bool,
    }

    pub fn fields(bytes: &[u8]) -> Fields<'_> {
        Fields { rest: bytes, broken: false }
    }

    impl Fields<'_> {
        /// Whether the walk stopped before the end of the bytes.
        pub fn broken(&self) -> bool {
            self.broken
        }
    }

    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }

    impl<'a> Iterator for Fields<'a> {
        type Item = Field<'a>;

        fn next(&mut self) -> Option<Field<'a>> {
            if self.rest.is_empty() || self.broken {
                return None;
            }
            let field = self.step();
            if field.is_none() {
                self.broken = true;
            }
            field
        }
    }

    impl<'a> Fields<'a> {
        fn step(&mut self) -> Option<Field<'a>> {
            let key = varint(&mut self.rest)?;
            let number = u32::try_from(key >> 3).ok()?;
            let bytes = match key & 7 {
                0 => {
                    varint(&mut self.rest)?;
                    None
                }
                1 | 5 => {
                    let n = if key & 7 == 1 { 8 } else { 4 };
                    self.rest = self.rest.get(n..)?;
                    None
                }
                2 => {
                    let len = usize::try_from(varint(&mut self.rest)?).ok()?;
                    let (field, rest) = (self.rest.get(..len)?, self.rest.get(len..)?);
                    self.rest = rest;
                    Some(field)
                }
                // Groups (3, 4) and unknown wire types.
                _ => return None,
            };
            Some(Field { number, bytes })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wire::fields;
    use crate::v1::{Event, Value, WriteRequest};
    use prost::Message;

    #[test]
    fn fields_walk_a_message_as_prost_wrote_it() {
        let event = Event {
            user_id: "u1".into(),
            event_time_ms: 1_700_000_000_000,
            attrs: [("a".to_string(), Value::int(1)), ("b".to_string(), Value::string("x"))].into(),
            ..Default::default()
        };
        let request = WriteRequest { events: vec![event.clone(), Event::default(), event] };
        let bytes = request.encode_to_vec();
        let events: Vec<_> = fields(&bytes).collect();
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|f| f.number == 1 && f.bytes.is_some()));
        let first: Vec<u32> = fields(events[0].bytes.unwrap()).map(|f| f.number).collect();
        assert_eq!(first.iter().filter(|&&n| n == 6).count(), 2, "two attrs: {first:?}");
        assert!(first.contains(&1) && first.contains(&4));
        assert_eq!(fields(events[1].bytes.unwrap()).count(), 0, "an empty event has no fields");
        let mut walk = fields(&bytes);
        assert_eq!(walk.by_ref().count(), 3);
        assert!(!walk.broken());
        // Truncated or malformed input ends the walk, without a panic, and
        // says so.
        for cut in 0..bytes.len() {
            let _ = fields(&bytes[..cut]).count();
        }
        let mut cut = fields(&bytes[..bytes.len() - 1]);
        assert_eq!(cut.by_ref().count(), 2);
        assert!(cut.broken(), "the last event is cut short");
        for (input, what) in
            [(&[0x1b, 0x1c, 0x0a, 0x00][..], "a group"), (&[0xff; 11][..], "a varint past 64 bits")]
        {
            let mut walk = fields(input);
            assert_eq!(walk.by_ref().count(), 0, "{what}");
            assert!(walk.broken(), "{what}");
        }
    }
}
