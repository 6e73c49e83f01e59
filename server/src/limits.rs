//! Limits of the transport and the raft log: gRPC message sizes, requests a
//! service decodes, raft entries and messages, the log store's cache. A gRPC
//! message over `MAX_MESSAGE_BYTES` fails with OUT_OF_RANGE (tonic's own
//! status). The limits on input and on per-user state are the core's, and
//! are re-exported here so every limit is `crate::limits::*`.

pub use portrait_core::limits::*;

/// Largest gRPC message accepted or sent.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Events the batcher packs into one raft entry.
pub const MAX_EVENTS_PER_ENTRY: usize = 20_000;

// Request memory bounds

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

/// Encoded bytes of the AppendEntries items in one `AppendEntriesBatch`
/// (several groups' messages to one peer in one call); an item larger than
/// this alone is sent alone. A peer's queue holds at most one message per
/// group (openraft waits for each answer before it sends the group's next).
pub const MAX_RAFT_BATCH_BYTES: usize = MAX_APPEND_ENTRIES_BYTES;

/// Bytes of rows (keys and values) in one restore entry
/// (`Command::Restore`): small enough that an entry's append, replication
/// and apply stay short next to the shard's other traffic.
pub const RESTORE_ENTRY_BYTES: usize = 1024 * 1024;

/// Bytes of one row (key and value) a restore takes from an archive: the
/// largest row Portrait writes is a user's feature and tag state (at most
/// `MAX_USER_STATE_BYTES`) under its key. A larger row (an archive crafted
/// or not Portrait's) ends the restore with INVALID_ARGUMENT naming
/// `archive` before it is proposed (alone in an entry it would be far over
/// `RESTORE_ENTRY_BYTES`); the shard stays marked mid-restore, as after
/// any failed restore, until a sound backup is restored into it.
pub const MAX_RESTORE_ROW_BYTES: usize = portrait_core::limits::MAX_USER_STATE_BYTES + 64 * 1024;

/// Encoding bytes of one restore row besides its key and value (its family
/// and two lengths), counted against `RESTORE_ENTRY_BYTES`.
pub const RESTORE_ROW_OVERHEAD_BYTES: usize = 24;

/// How long a `BackupShard` or `RestoreShard` stream may stall (the caller
/// takes or sends no message) before the node ends it (`DEADLINE_EXCEEDED`
/// for a restore) and frees its one export-or-restore slot and scratch
/// file for the next caller: the default of `--backup-stream-stall`.
pub const BACKUP_STREAM_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Bytes of archive in one `BackupShard` or `RestoreShard` message.
pub const BACKUP_CHUNK_BYTES: usize = 1024 * 1024;

/// Items in one `AppendEntriesBatch`; a receiver refuses more.
pub const MAX_RAFT_BATCH_ITEMS: usize = 4096;

/// `AppendEntriesBatch` calls in flight to one peer: while they are out,
/// the groups' next messages queue and leave together in the next batch.
pub const RAFT_BATCHES_IN_FLIGHT: usize = 2;

/// Encoded bytes of the newest log entries the log engine keeps decoded in
/// memory, all raft groups of the node together (besides at most 256
/// entries and 200,000 events per group). Over it, a group keeps its newest
/// entry only if it is at most 64 KiB (`store::recent::KEEP_NEWEST_MAX_BYTES`).
pub const MAX_RECENT_ENTRY_BYTES: usize = 64 * 1024 * 1024;

/// Bytes of client requests (gRPC messages of the Ingest, Profiles and
/// Admin services) a node holds received but not yet decoded, all calls
/// together (`service::receiving`). A request whose next bytes would pass
/// it fails at once with UNAVAILABLE ("retry"); it holds room for eight of
/// the largest writes at once, and thousands of typical ones.
pub const MAX_RECEIVING_BYTES: usize = 128 * 1024 * 1024;
const _: () = assert!(MAX_RECEIVING_BYTES >= MAX_MESSAGE_BYTES + 5, "the largest request must fit");
/// How long a client request's message may go without a byte arriving
/// before the node ends the call (DEADLINE_EXCEEDED) and frees what it
/// held of `MAX_RECEIVING_BYTES`.
pub const RECEIVE_STALL: std::time::Duration = std::time::Duration::from_secs(15);

/// Encoded bytes of read responses (`GetProfile`, `BatchGetProfiles`) a
/// node holds until their readers take them, all calls together
/// (`service::sending`): from the moment a response is built until HTTP/2
/// has written its bytes to the connection (or the call ended). A response
/// that would pass it is refused with UNAVAILABLE ("retry"). Readers that
/// stop reading hold their responses; this keeps them to eight of the
/// largest responses, or thousands of typical ones.
pub const MAX_UNSENT_RESPONSE_BYTES: usize = 128 * 1024 * 1024;
const _: () = assert!(MAX_UNSENT_RESPONSE_BYTES >= MAX_RESPONSE_BYTES, "the largest response must fit");

/// The share of [`MAX_UNSENT_RESPONSE_BYTES`] the responses of one client
/// connection may hold once the node holds more than half of it: two of
/// the largest. A connection whose reads stopped being read (a stuck
/// consumer multiplexing its calls on it) then keeps about half the node's
/// budget at most, not all of it, and the other connections' large reads
/// still fit; below half, a busy connection is not held to it.
pub const MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION: usize = 2 * MAX_RESPONSE_BYTES;
const _: () = assert!(MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION >= MAX_RESPONSE_BYTES);

/// How often the client port pings an HTTP/2 connection (and the idle time
/// before TCP keepalive probes start), and how long a ping may go
/// unanswered before the connection is closed: a client that vanished
/// without closing its connections (a host gone) is found within about a
/// minute, and what its calls held is freed.
pub const CLIENT_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
pub const CLIENT_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
const _: () = assert!(MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION < MAX_UNSENT_RESPONSE_BYTES);

/// Encoded bytes of write requests a node holds between their validation
/// and their answer: queued for the batcher, in an entry being proposed,
/// waiting for its apply, or forwarded to another node that leads the
/// shard and not yet answered. A request that would pass it waits for room
/// (in arrival order, at most [`QUEUE_WAIT`], while at most
/// [`MAX_WAITING_WRITE_BYTES`] wait), then is refused with UNAVAILABLE
/// ("write queue full", retryable) instead of waiting in memory: a few
/// hundred 16 MB writes to a slow leader would otherwise stay resident
/// until their timeout. 256 MiB is 64 entries of the largest size.
pub const MAX_QUEUED_WRITE_BYTES: usize = 256 * 1024 * 1024;

/// Encoded bytes of write requests a node lets wait for room in
/// [`MAX_QUEUED_WRITE_BYTES`], all together (their decoded events are in
/// memory meanwhile); a request that finds this full too is refused at
/// once. Four of the largest requests.
pub const MAX_WAITING_WRITE_BYTES: usize = 64 * 1024 * 1024;
const _: () = assert!(MAX_WAITING_WRITE_BYTES >= MAX_MESSAGE_BYTES, "the largest request can wait");

/// How long a write request waits for room in [`MAX_QUEUED_WRITE_BYTES`]
/// before it is refused. Waiting requests take the room given back in
/// arrival order, so a large one is not starved by a stream of small ones
/// that would each fit what is left.
pub const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
