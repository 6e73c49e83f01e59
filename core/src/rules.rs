//! Apply rules versions: how replicas that run different builds keep
//! applying every entry alike.
//!
//! Replicas agree because each applies an entry by the same rules (what a
//! write entry loads and refuses, how a feature folds an event, ...). A
//! build that changes such a rule would, beside an older one in the same
//! shard, apply the same entry differently, and the replicas would stay
//! apart for good. So the rules are versioned, and a new version takes
//! effect at one log index of each shard, once every node runs a build that
//! has it:
//!
//! - Each build applies the versions [`OLDEST`]`..=`[`NEWEST`]. A rule
//!   change bumps [`NEWEST`] and keeps the old rule behind a branch on the
//!   shard's version (dropped, with [`OLDEST`] raised, a release later).
//! - The meta group holds the cluster's version ([`crate::meta::MetaState::rules`]).
//!   Its leader raises it (`MetaCommand::SetRules`) once every node of the
//!   map reports a build whose newest version reaches it; a cluster starts
//!   at its first node's newest.
//! - Each shard's leader then proposes the version in its shard's log; from
//!   that entry on, every replica applies the shard by it. A replica whose
//!   build does not have it (an older build started after the raise) stops
//!   at that entry rather than apply it by other rules; a node refuses to
//!   open a shard whose stored version its build does not apply.
//!
//! A shard that never recorded a version applies by [`FIRST`].

/// The first version (and the one of a shard that recorded none).
pub const FIRST: u32 = 1;

/// The newest version this build applies. History:
/// - 1: the rules of the first sharded builds;
/// - 2: [`INPUT_CHANGE_TIMES`];
/// - 3: [`FULL_BUCKET_KEEPS_OLDER`];
/// - 4: [`TOP_COUNTS_KEPT`], [`RESET_FEATURES_RESETTLE`];
/// - 5: [`DRAIN_DEAD_BESIDE_DRAIN`];
/// - 6: [`RETIRED_IDS`], [`ONE_RESTORE_AT_A_TIME`];
/// - 7: [`EXACT_INTEGERS`].
pub const NEWEST: u32 = 7;

/// From this version on, a tag changed by another tag's change records
/// the latest change time of its changed inputs as its `changed_at` (a tag
/// that reads a time-driven tag changes at that tag's scheduled moment);
/// before, the time of the entry that applied it (a tick's, up to a tick
/// interval or a backlog later).
pub const INPUT_CHANGE_TIMES: u32 = 2;

/// From this version on, a `top_k` event with a new value whose bucket
/// already holds [`crate::limits::MAX_DISTINCT_PER_BUCKET`] values is not
/// counted and changes nothing, as in `distinct_count`; before, it first
/// dropped older buckets to make room in the feature (their counts lost),
/// then was not counted all the same.
pub const FULL_BUCKET_KEEPS_OLDER: u32 = 3;

/// From this version on, a `top_k` feature's value merges every value its
/// live buckets hold (at most [`crate::limits::MAX_DISTINCT_PER_FEATURE`])
/// and keeps the [`crate::limits::MAX_DISTINCT_PER_BUCKET`] with the
/// highest counts (among equal counts, the smaller values); before, the
/// first values met from the oldest bucket on, so that a value seen only
/// in newer buckets (the user's latest interest) was left out while older
/// buckets held that many.
pub const TOP_COUNTS_KEPT: u32 = 4;

/// From this version on, a feature that a schema change redefined (its
/// state starts over) counts as changed at the user's next settle, so the
/// tags that read it are evaluated again then (an event of the user, a
/// read); before, they kept their value until the schema change's
/// re-evaluation reached the user, or an input of theirs changed.
pub const RESET_FEATURES_RESETTLE: u32 = 4;

/// From this version on, the meta leader may propose
/// [`crate::shard::MapChange::DrainDead`] (a meta entry builds before it
/// cannot decode): a node silent past `replica_dead_after` is drained even
/// while another node's drain is under way, which may have had nowhere to
/// go but that dead node. Before, the dead node waited for the other drain,
/// and that drain for the dead node.
pub const DRAIN_DEAD_BESIDE_DRAIN: u32 = 5;

/// From this version on, `RemoveNode` retires the node's id before the
/// node leaves the meta group ([`crate::meta::MetaCommand::Retire`], a
/// meta entry builds before cannot decode), and the meta group refuses to
/// add a retired id again. Before, a node removed half-way through its
/// join (a learner of the meta group, not yet in the map) was added back
/// by its own join loop, undoing the removal.
pub const RETIRED_IDS: u32 = 6;

/// From this version on, a restore's `Begin` is rejected while a restore
/// of another backup (another restore id) is in progress in the shard;
/// before, it started over, wiping the rows the other restore had applied
/// (whose next step was then rejected). Another attempt of the same
/// restore still starts over.
pub const ONE_RESTORE_AT_A_TIME: u32 = 6;

/// From this version on, a feature filter compares an integer attribute
/// with an integer (or a float) exactly; before, both were rounded to
/// floats first, so above 2^53 (64-bit ids) neighbouring integers were
/// equal: `sku == 9007199254740993` also counted sku 9007199254740992.
pub const EXACT_INTEGERS: u32 = 7;

/// The oldest version this build still applies.
pub const OLDEST: u32 = 1;

/// Whether a build that applies `oldest..=newest` can apply by `version`,
/// or why not.
pub fn check(version: u32, oldest: u32, newest: u32) -> Result<(), String> {
    if version > newest {
        return Err(format!(
            "apply rules version {version} is newer than this build's (it applies versions {oldest} to \
             {newest}): run a build that has it"
        ));
    }
    if version < oldest {
        return Err(format!(
            "apply rules version {version} is older than this build applies (versions {oldest} to \
             {newest}): run a build that still has it until the cluster moves on"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_applies_its_range_and_names_it_otherwise() {
        check(1, 1, 2).unwrap();
        check(2, 1, 2).unwrap();
        let newer = check(3, 1, 2).unwrap_err();
        assert!(newer
            .starts_with("apply rules version 3 is newer than this build's (it applies versions 1 to 2)"));
        let older = check(1, 2, 3).unwrap_err();
        assert!(older.starts_with("apply rules version 1 is older than this build applies"), "{older}");
    }
}
