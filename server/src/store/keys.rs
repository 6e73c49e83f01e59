//! Key layouts. User ids never contain NUL (validation rejects control
//! characters), so `user ⟂ suffix` keys sort each user's rows together and a
//! `user ⟂` prefix scan finds exactly one user's rows.

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

// Keys in `meta`.
pub const META_APPLIED: &[u8] = b"applied";
pub const META_MEMBERSHIP: &[u8] = b"membership";
pub const META_SCHEMA: &[u8] = b"schema";
pub const META_CLOCK: &[u8] = b"clock";
pub const META_REEVAL: &[u8] = b"reeval";
/// The storage format the database was written in (see `store::format`).
pub const META_FORMAT: &[u8] = b"format_version";

// Log-store column families and keys.
pub const CF_LOGS: &str = "logs";
pub const CF_RAFT_META: &str = "raft_meta";
pub const RAFT_VOTE: &[u8] = b"vote";
pub const RAFT_LAST_PURGED: &[u8] = b"last_purged";
/// The storage format the log was written in (see `store::format`).
pub const RAFT_FORMAT: &[u8] = b"format_version";

/// `user ⟂` — the prefix of all of a user's rows.
pub fn user_prefix(user_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user_id.len() + 1);
    k.extend_from_slice(user_id.as_bytes());
    k.push(SEP);
    k
}

/// `user ⟂ family` — a family record.
pub fn profile(user_id: &str, family: &str) -> Vec<u8> {
    let mut k = user_prefix(user_id);
    k.extend_from_slice(family.as_bytes());
    k
}

/// `user ⟂ family ⟂ slot` — one history event of a family (`history`).
pub fn history(user_id: &str, family: &str, slot: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(user_id.len() + family.len() + 4);
    k.extend_from_slice(user_id.as_bytes());
    k.push(SEP);
    k.extend_from_slice(family.as_bytes());
    k.push(SEP);
    k.extend_from_slice(&slot.to_be_bytes());
    k
}

/// `user ⟂ event_id` — a dedupe marker.
pub fn dedupe(user_id: &str, event_id: &str) -> Vec<u8> {
    let mut k = user_prefix(user_id);
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// The family part of a profile key found under `prefix`.
pub fn family_of<'a>(key: &'a [u8], prefix: &[u8]) -> Option<&'a str> {
    key.strip_prefix(prefix).and_then(|f| std::str::from_utf8(f).ok())
}

/// `wake_at (8 bytes) + user` — a timer: the user's tags may change at
/// `wake_at`. Times are shifted to unsigned so keys sort in time order.
pub fn timer(wake_at: i64, user_id: &str) -> Vec<u8> {
    let mut k = ((wake_at as u64) ^ (1 << 63)).to_be_bytes().to_vec();
    k.extend_from_slice(user_id.as_bytes());
    k
}

/// The (time, user) of a timer key.
pub fn parse_timer(key: &[u8]) -> Option<(i64, &str)> {
    let (time, user) = key.split_at_checked(8)?;
    let t = (u64::from_be_bytes(time.try_into().ok()?) ^ (1 << 63)) as i64;
    Some((t, std::str::from_utf8(user).ok()?))
}

/// Log index as a big-endian key, so RocksDB order is index order.
pub fn log_index(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub fn parse_log_index(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_users_rows_do_not_mix_with_anothers() {
        let prefix = user_prefix("u1");
        assert!(profile("u1", "browse").starts_with(&prefix));
        // "u10" must not fall under "u1"'s prefix.
        assert!(!profile("u10", "browse").starts_with(&prefix));
        assert_eq!(family_of(&profile("u1", "trade"), &prefix), Some("trade"));
        assert!(history("u1", "trade", 3).starts_with(&prefix));
        assert!(!history("u10", "trade", 3).starts_with(&prefix));
        assert!(history("u1", "trade", 2) < history("u1", "trade", 256));
    }

    #[test]
    fn timer_keys_sort_by_time_then_user() {
        assert!(timer(5, "zz") < timer(6, "aa"));
        assert!(timer(-1, "a") < timer(0, "a"));
        assert_eq!(parse_timer(&timer(1_760_000_000_000, "u1")), Some((1_760_000_000_000, "u1")));
        assert_eq!(parse_timer(b"short"), None);
    }

    #[test]
    fn log_keys_sort_numerically() {
        assert!(log_index(9) < log_index(10));
        assert!(log_index(255) < log_index(256));
        assert_eq!(parse_log_index(&log_index(42)), Some(42));
        assert_eq!(parse_log_index(b"bad"), None);
    }
}
