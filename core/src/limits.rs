//! Explicit limits on input and on the state kept per user: events,
//! attribute values, selections, schemas, distinct values. Every limit here
//! is documented in `docs/api.md`; input past a limit is rejected with
//! INVALID_ARGUMENT naming the field and the limit. The transport's limits
//! (gRPC message sizes, raft entries and messages) are the server's
//! (`portrait_server::limits`, which re-exports these).

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
/// Largest magnitude of a double attribute a write may carry: 2^63, the
/// int64 range. Sums and averages add values up, and a few values near
/// `f64::MAX` would overflow them to infinity for good. Checked at ingress
/// only (apply replays what older versions accepted unchanged).
pub const MAX_DOUBLE_MAGNITUDE: f64 = 9_223_372_036_854_775_808.0;
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
/// Features in a schema.
pub const MAX_FEATURES: usize = 256;
/// Tags in a schema.
pub const MAX_TAGS: usize = 256;
/// Users a tick re-evaluates at most (the rest wait for the next tick).
pub const MAX_USERS_PER_TICK: usize = 2_000;
/// Stored (encoded) user state one tick or re-evaluation entry loads at
/// most, counted from the stored rows (the same on every replica, so every
/// replica stops at the same user); at least one user is taken. Decoded,
/// the states take a small multiple of it while the entry applies.
pub const MAX_SETTLE_BYTES_PER_ENTRY: usize = 64 * 1024 * 1024;
/// Stored (encoded) family heads and user states one write entry loads at
/// most, half of it in each of the two halves of the user space its apply
/// splits users into (FNV-1a of the id, one apply thread each): counted
/// from the stored rows that are live at the entry's time (the same on
/// every replica), request by request in the entry's order. The requests
/// from the one during which a half passes its share on are not applied
/// and answered `UNAVAILABLE` (retry; nothing of them was written); a
/// request that passes it as the entry's first is rejected, as it never
/// fits. Decoded, heads and states take a small multiple of it while the
/// entry applies.
pub const MAX_WRITE_STATE_BYTES_PER_ENTRY: usize = 128 * 1024 * 1024;
/// Distinct values a `distinct_count` or `top_k` bucket tracks; past it,
/// new values are not counted (the result saturates).
pub const MAX_DISTINCT_PER_BUCKET: usize = 1_000;

// State memory bounds

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
/// (Bucket, value) pairs one `distinct_count` or `top_k` feature keeps over
/// all its time buckets. `distinct_count` holds a value once, so past it new
/// values are not counted (the result saturates); `top_k` drops its oldest
/// buckets for newer events.
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
