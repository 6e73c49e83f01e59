//! The shard of a user, computed as the server does (docs/shards.md):
//! `xxh3_64(utf8(user_id), seed 0) mod S`.

/// The most shards a cluster can have (the server's `MAX_SHARDS`): a map
/// naming more is refused rather than sized from it.
pub const MAX_SHARDS: u32 = 4_096;

/// The shard of `user_id` among `shards`.
pub fn shard_of(user_id: &str, shards: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(user_id.as_bytes()) % u64::from(shards.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specified_hash() {
        // The same vector as the server's (`portrait_core::shard`).
        assert_eq!(shard_of("", 64), (0x2d06_8005_38d3_94c2u64 % 64) as u32);
        assert_eq!(shard_of("u1", 1), 0);
        assert_eq!(shard_of("u1", 0), 0);
    }
}
