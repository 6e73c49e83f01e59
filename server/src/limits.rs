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

// Request and state memory bounds

/// Largest request the `Profiles` service decodes: a `BatchGetProfiles` of
/// `MAX_BATCH_GET_USERS` ids of `MAX_USER_ID_BYTES` plus full selections is
/// about 300 KB. A larger message fails with OUT_OF_RANGE before it is decoded
/// (a 5 MB request of 1,000,000 names cost 570 MB of peak RSS when decoded).
pub const MAX_PROFILES_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest request the `Admin` service decodes: a schema of
/// `MAX_SCHEMA_BYTES` plus 64 KiB for the rest of the message.
pub const MAX_ADMIN_REQUEST_BYTES: usize = MAX_SCHEMA_BYTES + 64 * 1024;
/// Largest response the `Profiles` and `Admin` services send (a
/// `BatchGetProfiles` of 1,000 large profiles).
pub const MAX_RESPONSE_BYTES: usize = MAX_MESSAGE_BYTES;
/// Reads (GetProfile / BatchGetProfiles calls) that run their RocksDB work
/// at once, each on a blocking thread; more wait for a turn. Keeps a read
/// storm off the async workers that carry raft heartbeats and bounds the
/// blocking pool and the memory of reads in progress.
pub const MAX_CONCURRENT_READS: usize = 8;
/// Distinct attribute names not declared in the schema that one user's
/// family keeps as latest values. A write that would add more is rejected
/// whole (FAILED_PRECONDITION naming the attribute and this limit): every
/// replica rewrites the family row on each event, so it must stay small
/// (256 names × (64-byte name + 4 KiB value) ≤ 1.1 MB, typically a few KB).
pub const MAX_UNDECLARED_ATTRS_PER_FAMILY: usize = 256;
/// Bytes of a value as `distinct_count` and `top_k` keep it. A longer value
/// is kept as its first bytes, `~` and a 16-hex-digit hash of the whole
/// value (deterministic: FNV-1a 64), exactly this long at most.
pub const MAX_DISTINCT_VALUE_BYTES: usize = 64;
/// Values one `distinct_count` or `top_k` feature keeps over all its time
/// buckets; past it, new values are not counted (the result saturates).
/// With `MAX_DISTINCT_VALUE_BYTES`, a feature's state holds at most 64 KiB
/// of values.
pub const MAX_DISTINCT_PER_FEATURE: usize = 1_024;
/// Bytes one user's feature and tag state (`UserState`, rewritten on each
/// of the user's events) may take at most. Enforced on the schema: one whose
/// worst case (every bound above reached by every feature, declared
/// attribute and tag) is larger is rejected (INVALID_ARGUMENT naming the
/// worst case and this limit). The demo schema's worst case is about 1 MB; a
/// typical user's state is a few KB.
pub const MAX_USER_STATE_BYTES: usize = 8 * 1024 * 1024;
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

/// Encoded bytes of the newest log entries the log engine keeps decoded in
/// memory, all raft groups of the node together (besides at most 256
/// entries and 200,000 events per group); each group's newest entry is
/// always kept.
pub const MAX_RECENT_ENTRY_BYTES: usize = 64 * 1024 * 1024;

/// Encoded bytes of write requests a node holds between their validation
/// and their answer: queued for the batcher, in an entry being proposed, or
/// waiting for its apply. A request that would pass it is refused at once
/// with UNAVAILABLE ("write queue full", retryable) instead of waiting in
/// memory: a few hundred 16 MB writes to a slow leader would otherwise stay
/// resident until their timeout. 256 MiB is 64 entries of the largest size.
pub const MAX_QUEUED_WRITE_BYTES: usize = 256 * 1024 * 1024;
