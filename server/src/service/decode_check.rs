//! The node's check of a request's encoded bytes before prost decodes it
//! (see `portrait_proto::codec`): counts that bound what decoding would
//! allocate, checked on the wire. A `WriteRequest` (Write and each
//! WriteStream message) of more than `MAX_EVENTS_PER_REQUEST` events, or
//! with an event of more than `MAX_ATTRS_PER_EVENT` attributes, is refused
//! with INVALID_ARGUMENT, the same message the validation after decoding
//! gives, before any of it is decoded. Decoded, an empty event costs about
//! 150 bytes for 2 on the wire: a 16 MiB request of them took over 1 GiB.

use std::any::TypeId;

use portrait_proto::codec::wire::fields;
use portrait_proto::v1::WriteRequest;
use tonic::Status;

use crate::error::Error;
use crate::limits::{MAX_ATTRS_PER_EVENT, MAX_EVENTS_PER_REQUEST};

/// `WriteRequest.events`.
const EVENTS: u32 = 1;
/// `Event.attrs` (each map entry is one field).
const ATTRS: u32 = 6;

/// See the module docs.
pub fn check(message: TypeId, bytes: &[u8]) -> Result<(), Status> {
    if message == TypeId::of::<WriteRequest>() {
        check_write(bytes).map_err(Status::from)?;
    }
    Ok(())
}

fn check_write(bytes: &[u8]) -> Result<(), Error> {
    // What the walk cannot see past (a group, which prost skips whatever it
    // holds; a malformed field) is refused, not passed unchecked.
    let unreadable = |field: String| {
        Error::invalid(
            field,
            "not a valid protobuf message (malformed, or a group, which Portrait never sends)",
        )
    };
    let mut events = 0usize;
    let mut walk = fields(bytes);
    for field in walk.by_ref().filter(|f| f.number == EVENTS) {
        if events < MAX_EVENTS_PER_REQUEST {
            let mut event = fields(field.bytes.unwrap_or_default());
            let attrs = event.by_ref().filter(|f| f.number == ATTRS).count();
            if event.broken() {
                return Err(unreadable(format!("events[{events}]")));
            }
            if attrs > MAX_ATTRS_PER_EVENT {
                let reason = format!("{attrs} attributes is over the limit of {MAX_ATTRS_PER_EVENT}");
                return Err(Error::invalid(format!("events[{events}].attrs"), reason));
            }
        }
        events += 1;
    }
    if walk.broken() {
        return Err(unreadable("events".into()));
    }
    if events > MAX_EVENTS_PER_REQUEST {
        let reason = format!("{events} events is over the limit of {MAX_EVENTS_PER_REQUEST} per request");
        return Err(Error::invalid("events", reason));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use portrait_proto::v1::{Event, Value};
    use prost::Message;

    fn encoded(events: usize, attrs: usize) -> Vec<u8> {
        let attrs: std::collections::HashMap<String, Value> =
            (0..attrs).map(|i| (format!("a{i}"), Value::int(1))).collect();
        let event = Event { user_id: "u".into(), attrs, ..Default::default() };
        WriteRequest { events: vec![event; events] }.encode_to_vec()
    }

    #[test]
    fn counts_are_checked_on_the_wire_with_the_validations_messages() {
        check(TypeId::of::<WriteRequest>(), &encoded(MAX_EVENTS_PER_REQUEST, MAX_ATTRS_PER_EVENT)).unwrap();
        let e = check(TypeId::of::<WriteRequest>(), &encoded(MAX_EVENTS_PER_REQUEST + 1, 0)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "events: 10001 events is over the limit of 10000 per request");
        let e = check(TypeId::of::<WriteRequest>(), &encoded(2, MAX_ATTRS_PER_EVENT + 1)).unwrap_err();
        assert_eq!(e.message(), "events[0].attrs: 65 attributes is over the limit of 64");
        // Other messages are not looked at.
        check(TypeId::of::<Event>(), &encoded(MAX_EVENTS_PER_REQUEST + 1, 0)).unwrap();
    }

    /// A group hides what follows it from the walk (prost skips it and
    /// decodes the rest): refused.
    #[test]
    fn what_the_walk_cannot_see_past_is_refused() {
        let mut hidden = vec![0x1b, 0x1c];
        hidden.extend([0x0a, 0x00].repeat(MAX_EVENTS_PER_REQUEST + 1));
        let e = check(TypeId::of::<WriteRequest>(), &hidden).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("events: not a valid protobuf message"), "{}", e.message());
        let mut in_event = encoded(1, 1);
        // The event's length grows by the group's two bytes.
        in_event[1] += 2;
        in_event.extend([0x1b, 0x1c]);
        let e = check(TypeId::of::<WriteRequest>(), &in_event).unwrap_err();
        assert!(e.message().starts_with("events[0]: not a valid protobuf message"), "{}", e.message());
    }

    /// The case that took over 1 GiB decoded: 16 MiB of empty events
    /// (2 bytes each) is refused from its bytes.
    #[test]
    fn sixteen_mib_of_empty_events_is_refused_before_decoding() {
        let bytes: Vec<u8> = [0x0a, 0x00].repeat(8 * 1024 * 1024);
        let e = check(TypeId::of::<WriteRequest>(), &bytes).unwrap_err();
        assert_eq!(e.message(), "events: 8388608 events is over the limit of 10000 per request");
    }
}
