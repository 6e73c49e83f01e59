//! Key layouts. Every key of the state database starts with a 4-byte
//! prefix: the group id, big-endian (so a group's keys are one contiguous
//! range, `[gid, gid + 1)`), or [`NODE_PREFIX`] for the node's own keys in
//! `meta`. After the prefix, user ids never contain NUL (validation rejects
//! control characters), so `gid user ⟂ suffix` keys sort each user's rows
//! together and a `gid user ⟂` prefix scan finds exactly one user's rows.
//!
//! | CF | key |
//! |---|---|
//! | profiles | `gid user ⟂ family` |
//! | history | `gid user ⟂ family ⟂ slot(u16 BE)` |
//! | dedupe | `gid user ⟂ event_id` |
//! | state | `gid user` |
//! | timers | `gid wake_at(u64 BE, sign-flipped) user` |
//! | meta | `gid name` (applied, membership, schema, clock, reeval; the meta group's `cluster`); `NODE_PREFIX name` (format, installing markers) |

use crate::types::GroupId;

pub const SEP: u8 = 0;

// State-machine column families.
pub const CF_PROFILES: &str = "profiles";
pub const CF_HISTORY: &str = "history";
pub const CF_DEDUPE: &str = "dedupe";
pub const CF_META: &str = "meta";
pub const CF_STATE: &str = "state";
pub const CF_TIMERS: &str = "timers";
/// Every state-machine column family.
pub const ALL_CFS: [&str; 6] = [CF_PROFILES, CF_HISTORY, CF_DEDUPE, CF_META, CF_STATE, CF_TIMERS];

/// Groups this node can hold: shards `0..MAX_SHARDS` and [`GroupId::META`].
/// Other ids are refused, so no group's range reaches [`NODE_PREFIX`].
pub use portrait_core::shard::MAX_SHARDS;

/// The prefix of the node's own keys in `meta` (not a group: group ids are
/// below [`MAX_SHARDS`] or `u32::MAX`).
pub const NODE_PREFIX: [u8; 4] = (u32::MAX - 1).to_be_bytes();

/// Bytes of the group prefix.
pub const GROUP_PREFIX_LEN: usize = 4;

/// Longest key under the meta group's prefix (`u32::MAX`, whose range has
/// no 4-byte end): its range ends at the prefix and this many `0xFF`.
const META_GROUP_KEY_MAX: usize = 4096;

// Names in `meta` (after a group prefix).
pub const META_APPLIED: &[u8] = b"applied";
pub const META_MEMBERSHIP: &[u8] = b"membership";
pub const META_SCHEMA: &[u8] = b"schema";
pub const META_CLOCK: &[u8] = b"clock";
pub const META_REEVAL: &[u8] = b"reeval";
/// A restore in progress (`types::RestoreMarker`).
pub const META_RESTORE: &[u8] = b"restore";
/// The `restore_id` of the last restore that ended in the group (a
/// string): a restore run again with that id skips the shard.
pub const META_RESTORED: &[u8] = b"restored";
/// Present once a write applied an event to the group (or a restore
/// ended with rows): a restore's `Begin` is refused in the state machine
/// while it is set and no restore is in progress. Replicated (written by
/// apply, carried by snapshots), unlike the data's presence, which TTL
/// compaction changes on each replica at its own pace.
pub const META_WRITTEN: &[u8] = b"written";
/// The apply rules version the group applies by (u32; absent:
/// `portrait_core::rules::FIRST`), set by `Command::Rules`. Replicated,
/// carried by snapshots.
pub const META_RULES: &[u8] = b"rules";
/// Column families of a shard's data (what a restore copies and wipes):
/// every one but `meta`.
pub const DATA_CFS: [&str; 5] = [CF_PROFILES, CF_HISTORY, CF_DEDUPE, CF_STATE, CF_TIMERS];
/// The meta group's state (`core::meta::MetaState`: shard map, schema).
pub const META_CLUSTER: &[u8] = b"cluster";
/// The storage format the database was written in (see `store::format`),
/// under [`NODE_PREFIX`].
pub const META_FORMAT: &[u8] = b"format_version";
/// `NODE_PREFIX installing gid`: a snapshot install of the group began and
/// has not finished (it is done again at open).
pub const META_INSTALLING: &[u8] = b"installing";
/// `NODE_PREFIX log_reset gid`: the group's state was wiped (an interrupted
/// install could not be finished), so its raft log must be emptied, the
/// vote kept, before the group opens: openraft would otherwise re-apply
/// from index 1 a log purged past the snapshot the state no longer holds.
pub const META_LOG_RESET: &[u8] = b"log_reset";
/// `NODE_PREFIX shards`: the cluster's number of shards `S` (u32 LE),
/// written once when the node first starts (bootstrap or join).
pub const META_SHARDS: &[u8] = b"shards";
/// `NODE_PREFIX identity`: the node id the data dir was created for and
/// its incarnation, a random number (u64 LE each), written once when the
/// node first starts.
pub const META_IDENTITY: &[u8] = b"identity";

// Log-engine column families and keys. Every raft group's keys start with
// its id (u32 BE), so a group's log and its meta are each one key range.
pub const CF_LOGS: &str = "logs";
pub const CF_RAFT_META: &str = "raft_meta";
/// Kinds of a group's `raft_meta` key (`gid ++ kind`, see [`raft_meta`]).
pub const RAFT_VOTE: u8 = 1;
pub const RAFT_LAST_PURGED: u8 = 2;
/// A purge that skips past the end of the log (a snapshot accepted, its
/// install not durable yet): the index it purges to, until it is on disk.
/// Every entry appended meanwhile lies past it and is unacknowledged, so a
/// node that finds this key at open drops them (`log_engine::repair_bridge`).
pub const RAFT_BRIDGE: u8 = 3;
/// The vote of a replica dropped from this node, kept (and not counted as
/// a group the node holds): should the group be placed here again, its
/// raft starts from this vote, never below it, so the node cannot vote
/// twice in a term it voted in before the drop.
pub const RAFT_RETIRED_VOTE: u8 = 4;
/// The storage format the log engine was written in (see `store::format`);
/// node-level, 14 bytes, so never taken for a 5-byte group key.
pub const RAFT_FORMAT: &[u8] = b"format_version";

/// Whether this node may hold group `gid` (see [`MAX_SHARDS`]).
pub fn valid_group(gid: GroupId) -> bool {
    gid.0 < MAX_SHARDS || gid == GroupId::META
}

/// The 4-byte prefix of every key of group `gid`.
pub fn group_prefix(gid: GroupId) -> [u8; 4] {
    gid.0.to_be_bytes()
}

/// The group whose prefix `key` starts with (or `NODE_PREFIX`'s id).
pub fn group_of(key: &[u8]) -> Option<GroupId> {
    let prefix: [u8; 4] = key.get(..GROUP_PREFIX_LEN)?.try_into().ok()?;
    Some(GroupId(u32::from_be_bytes(prefix)))
}

/// `[start, end)` holding every key of group `gid`, in every column family.
pub fn group_range(gid: GroupId) -> (Vec<u8>, Vec<u8>) {
    let start = group_prefix(gid).to_vec();
    let end = match gid.0.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xFF; GROUP_PREFIX_LEN + META_GROUP_KEY_MAX],
    };
    (start, end)
}

fn with_prefix(gid: GroupId, capacity: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(GROUP_PREFIX_LEN + capacity);
    k.extend_from_slice(&group_prefix(gid));
    k
}

/// `gid name` — a group's key in `meta`.
pub fn meta(gid: GroupId, name: &[u8]) -> Vec<u8> {
    let mut k = with_prefix(gid, name.len());
    k.extend_from_slice(name);
    k
}

/// `NODE_PREFIX name` — a node key in `meta`.
pub fn node_meta(name: &[u8]) -> Vec<u8> {
    let mut k = NODE_PREFIX.to_vec();
    k.extend_from_slice(name);
    k
}

/// `NODE_PREFIX installing gid` — the group's install marker.
pub fn installing(gid: GroupId) -> Vec<u8> {
    let mut k = node_meta(META_INSTALLING);
    k.extend_from_slice(&group_prefix(gid));
    k
}

/// `NODE_PREFIX log_reset gid` — see [`META_LOG_RESET`].
pub fn log_reset(gid: GroupId) -> Vec<u8> {
    let mut k = node_meta(META_LOG_RESET);
    k.extend_from_slice(&group_prefix(gid));
    k
}

/// The group of an install marker key.
pub fn parse_installing(key: &[u8]) -> Option<GroupId> {
    group_of(key.strip_prefix(&node_meta(META_INSTALLING)[..])?)
}

/// `gid user` — a user's engine state (`state`).
pub fn state(gid: GroupId, user_id: &str) -> Vec<u8> {
    let mut k = with_prefix(gid, user_id.len());
    k.extend_from_slice(user_id.as_bytes());
    k
}

/// The user of a `state` key.
pub fn user_of_state(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.get(GROUP_PREFIX_LEN..)?).ok()
}

/// `gid user ⟂` — the prefix of all of a user's rows.
pub fn user_prefix(gid: GroupId, user_id: &str) -> Vec<u8> {
    let mut k = with_prefix(gid, user_id.len() + 1);
    k.extend_from_slice(user_id.as_bytes());
    k.push(SEP);
    k
}

/// `gid user ⟂ family` — a family record.
pub fn profile(gid: GroupId, user_id: &str, family: &str) -> Vec<u8> {
    let mut k = user_prefix(gid, user_id);
    k.extend_from_slice(family.as_bytes());
    k
}

/// `gid user ⟂ family ⟂ slot` — one history event of a family (`history`).
pub fn history(gid: GroupId, user_id: &str, family: &str, slot: u16) -> Vec<u8> {
    let mut k = with_prefix(gid, user_id.len() + family.len() + 4);
    k.extend_from_slice(user_id.as_bytes());
    k.push(SEP);
    k.extend_from_slice(family.as_bytes());
    k.push(SEP);
    k.extend_from_slice(&slot.to_be_bytes());
    k
}

/// `gid user ⟂ event_id` — a dedupe marker.
pub fn dedupe(gid: GroupId, user_id: &str, event_id: &str) -> Vec<u8> {
    let mut k = user_prefix(gid, user_id);
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// The family part of a profile key found under `prefix`.
pub fn family_of<'a>(key: &'a [u8], prefix: &[u8]) -> Option<&'a str> {
    key.strip_prefix(prefix).and_then(|f| std::str::from_utf8(f).ok())
}

/// `gid wake_at (8 bytes) user` — a timer: the user's tags may change at
/// `wake_at`. Times are shifted to unsigned so keys sort in time order.
pub fn timer(gid: GroupId, wake_at: i64, user_id: &str) -> Vec<u8> {
    let mut k = with_prefix(gid, 8 + user_id.len());
    k.extend_from_slice(&((wake_at as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(user_id.as_bytes());
    k
}

/// The (time, user) of a timer key of group `gid` (`None` for another
/// group's key).
pub fn parse_timer(gid: GroupId, key: &[u8]) -> Option<(i64, &str)> {
    let rest = key.strip_prefix(&group_prefix(gid)[..])?;
    let (time, user) = rest.split_at_checked(8)?;
    let t = (u64::from_be_bytes(time.try_into().ok()?) ^ (1 << 63)) as i64;
    Some((t, std::str::from_utf8(user).ok()?))
}

/// `gid (u32 BE) ++ index (u64 BE)` — a raft log entry (`logs`): RocksDB
/// order is group order, then index order.
pub fn log_key(gid: GroupId, index: u64) -> [u8; 12] {
    let mut k = [0; 12];
    k[..4].copy_from_slice(&gid.0.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The group and index of a `logs` key.
pub fn parse_log_key(key: &[u8]) -> Option<(GroupId, u64)> {
    let (gid, index) = key.split_first_chunk::<4>()?;
    let index: [u8; 8] = index.try_into().ok()?;
    Some((GroupId(u32::from_be_bytes(*gid)), u64::from_be_bytes(index)))
}

/// An exclusive upper bound of every `logs` key of `gid`: its last possible
/// key and one more byte. Below the next group's first key, and defined for
/// [`GroupId::META`] too (whose id has no successor).
pub fn log_group_end(gid: GroupId) -> [u8; 13] {
    let mut k = [0; 13];
    k[..12].copy_from_slice(&log_key(gid, u64::MAX));
    k
}

/// The exclusive end of `gid`'s entries up to and including `index`.
pub fn log_key_after(gid: GroupId, index: u64) -> Vec<u8> {
    match index.checked_add(1) {
        Some(next) => log_key(gid, next).to_vec(),
        None => log_group_end(gid).to_vec(),
    }
}

/// `gid (u32 BE) ++ kind` — one of a group's `raft_meta` values.
pub fn raft_meta(gid: GroupId, kind: u8) -> [u8; 5] {
    let mut k = [kind; 5];
    k[..4].copy_from_slice(&gid.0.to_be_bytes());
    k
}

/// The group of a `raft_meta` key (`None` for node-level keys).
pub fn parse_raft_meta(key: &[u8]) -> Option<GroupId> {
    let k: [u8; 5] = key.try_into().ok()?;
    Some(GroupId(u32::from_be_bytes([k[0], k[1], k[2], k[3]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: GroupId = GroupId(7);

    #[test]
    fn one_users_rows_do_not_mix_with_anothers() {
        let prefix = user_prefix(G, "u1");
        assert!(profile(G, "u1", "browse").starts_with(&prefix));
        // "u10" must not fall under "u1"'s prefix.
        assert!(!profile(G, "u10", "browse").starts_with(&prefix));
        assert_eq!(family_of(&profile(G, "u1", "trade"), &prefix), Some("trade"));
        assert!(history(G, "u1", "trade", 3).starts_with(&prefix));
        assert!(!history(G, "u10", "trade", 3).starts_with(&prefix));
        assert!(history(G, "u1", "trade", 2) < history(G, "u1", "trade", 256));
        // Nor another group's rows of the same user.
        assert!(!profile(GroupId(8), "u1", "browse").starts_with(&prefix));
    }

    #[test]
    fn timer_keys_sort_by_time_then_user() {
        assert!(timer(G, 5, "zz") < timer(G, 6, "aa"));
        assert!(timer(G, -1, "a") < timer(G, 0, "a"));
        assert_eq!(parse_timer(G, &timer(G, 1_760_000_000_000, "u1")), Some((1_760_000_000_000, "u1")));
        assert_eq!(parse_timer(G, b"short"), None);
        assert_eq!(parse_timer(GroupId(8), &timer(G, 5, "u1")), None, "another group's timer");
    }

    #[test]
    fn every_key_of_a_group_is_in_its_range_and_no_other() {
        for gid in
            [GroupId(0), GroupId(1), GroupId(255), GroupId(256), GroupId(MAX_SHARDS - 1), GroupId::META]
        {
            let (start, end) = group_range(gid);
            let keys = [
                profile(gid, "u", "f"),
                history(gid, "\u{10FFFF}", "f", u16::MAX),
                dedupe(gid, "u", "e"),
                state(gid, "u"),
                timer(gid, i64::MAX, "u"),
                meta(gid, META_APPLIED),
            ];
            for k in keys {
                assert!(start <= k && k < end, "{gid}: {k:?}");
                assert_eq!(group_of(&k), Some(gid));
            }
            assert!(valid_group(gid));
            let node = node_meta(META_FORMAT);
            assert!(!(start <= node && node < end), "{gid}: node keys are in no group's range");
        }
        assert!(!valid_group(GroupId(u32::from_be_bytes(NODE_PREFIX))));
        assert_eq!(parse_installing(&installing(GroupId(9))), Some(GroupId(9)));
        assert_eq!(user_of_state(&state(G, "u1")), Some("u1"));
    }

    #[test]
    fn log_keys_sort_by_group_then_index() {
        let g = GroupId(7);
        assert!(log_key(g, 9) < log_key(g, 10));
        assert!(log_key(g, 255) < log_key(g, 256));
        assert!(log_key(GroupId(6), u64::MAX) < log_key(g, 0));
        assert!(log_key(g, u64::MAX)[..] < log_group_end(g)[..]);
        assert!(log_group_end(g)[..] < log_key(GroupId(8), 0)[..]);
        assert!(log_key(GroupId::META, u64::MAX)[..] < log_group_end(GroupId::META)[..]);
        assert_eq!(log_key_after(g, 4), log_key(g, 5));
        assert_eq!(log_key_after(g, u64::MAX), log_group_end(g));
        assert_eq!(parse_log_key(&log_key(g, 42)), Some((g, 42)));
        assert_eq!(parse_log_key(&log_key(GroupId::META, 1)), Some((GroupId::META, 1)));
        assert_eq!(parse_log_key(b"bad"), None);
    }

    #[test]
    fn raft_meta_keys_name_their_group_and_never_the_format_key() {
        let vote = raft_meta(GroupId(3), RAFT_VOTE);
        assert_eq!(parse_raft_meta(&vote), Some(GroupId(3)));
        assert_ne!(vote, raft_meta(GroupId(3), RAFT_LAST_PURGED));
        assert_eq!(parse_raft_meta(&raft_meta(GroupId::META, RAFT_VOTE)), Some(GroupId::META));
        assert_eq!(parse_raft_meta(RAFT_FORMAT), None);
    }
}
