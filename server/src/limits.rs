//! Explicit limits on input. Every limit here is documented in `docs/api.md`;
//! input past a limit is rejected with INVALID_ARGUMENT naming the field and
//! the limit; a gRPC message over `MAX_MESSAGE_BYTES` fails with OUT_OF_RANGE
//! (tonic's own status).

/// Largest gRPC message accepted or sent.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Events in one `WriteRequest`.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;
/// Bytes in a `user_id`.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Bytes in an `event_id`.
pub const MAX_EVENT_ID_BYTES: usize = 128;
/// Bytes in an event `type`.
pub const MAX_EVENT_TYPE_BYTES: usize = 64;
/// Attributes on one event.
pub const MAX_ATTRS_PER_EVENT: usize = 64;
/// Bytes in an attribute name.
pub const MAX_ATTR_NAME_BYTES: usize = 64;
/// Bytes in a string attribute value.
pub const MAX_STRING_VALUE_BYTES: usize = 4 * 1024;
/// How far an event time may be ahead of the receiving node's clock.
pub const MAX_FUTURE_SKEW_MS: i64 = 5 * 60 * 1000;
/// Earliest accepted event time: 2000-01-01T00:00:00Z.
pub const MIN_EVENT_TIME_MS: i64 = 946_684_800_000;
/// User ids in one `BatchGetProfiles`.
pub const MAX_BATCH_GET_USERS: usize = 1_000;
/// Families in a schema.
pub const MAX_FAMILIES: usize = 64;
/// Last-N history length of a family.
pub const MAX_HISTORY_LEN: u32 = 1_000;
/// Bytes of schema TOML.
pub const MAX_SCHEMA_BYTES: usize = 1024 * 1024;
/// Events the batcher packs into one raft entry.
pub const MAX_EVENTS_PER_ENTRY: usize = 20_000;
/// Features in a schema.
pub const MAX_FEATURES: usize = 256;
/// Tags in a schema.
pub const MAX_TAGS: usize = 256;
/// Users a tick re-evaluates at most (the rest wait for the next tick).
pub const MAX_USERS_PER_TICK: usize = 2_000;
/// Distinct values a `distinct_count` or `top_k` bucket tracks; past it,
/// new values are not counted (the result saturates).
pub const MAX_DISTINCT_PER_BUCKET: usize = 1_000;

// ---------------------------------------------------------------------------
// Raft entries and messages, bounded by encoded bytes (issue 10, section 1).
// Sizes are of the bincode (fixed-int) encoding the raft log and the peer
// transport use, which can be larger than the protobuf a client sent: each
// string carries an 8-byte length, each attribute a 4-byte value tag.

/// Encoded bytes the batcher packs into one raft entry: it stops adding
/// requests before the entry would pass this. A single request larger than
/// this becomes an entry of its own; a request is never split (a `Write` is
/// applied whole or not at all). 4 MiB keeps an entry's append, replication
/// and apply short while still grouping hundreds of typical requests.
pub const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;

/// Encoded bytes of log entries in one AppendEntries RPC: the log reader
/// hands replication at most this much (at least one entry), and the network
/// refuses a larger request with openraft's `PayloadTooLarge` (so openraft
/// resends fewer entries). An entry larger than this alone is still sent.
pub const MAX_APPEND_ENTRIES_BYTES: usize = 8 * 1024 * 1024;

/// Largest gRPC message of the internal `Raft` service, on both the server
/// and the client side. It must hold the largest single entry: one `Write`
/// request of at most `MAX_MESSAGE_BYTES` protobuf, whose bincode can grow by
/// at most `MAX_EVENTS_PER_REQUEST` x (48 bytes of lengths per event + 64
/// attributes x 12 bytes of length and tag) = 7.8 MiB, so about 24 MiB, plus
/// the request's envelope. Snapshot chunks are 4 MiB.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Encoded bytes of the newest log entries the log store keeps decoded in
/// memory (besides at most 256 entries and 200,000 events); the newest entry
/// is always kept.
pub const MAX_RECENT_ENTRY_BYTES: usize = 64 * 1024 * 1024;
