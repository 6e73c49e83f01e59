//! Splitting a call into per-node parts and putting the answers back
//! together, as one call to one node would have answered.

use std::collections::BTreeMap;

use portrait_proto::v1::{Event, Profile, ReadInfo};
use tonic::Status;

use crate::ClientError;

/// Items grouped by key, each group keeping the items' order and their
/// positions in the whole list.
pub(crate) struct Parts<K, T> {
    pub parts: BTreeMap<K, (Vec<usize>, Vec<T>)>,
}

impl<K: Ord, T> Parts<K, T> {
    pub fn new(items: Vec<T>, key: impl Fn(&T) -> K) -> Self {
        let mut parts: BTreeMap<K, (Vec<usize>, Vec<T>)> = BTreeMap::new();
        for (i, item) in items.into_iter().enumerate() {
            let (positions, part) = parts.entry(key(&item)).or_default();
            positions.push(i);
            part.push(item);
        }
        Parts { parts }
    }
}

/// The shard most of `events` belong to (the lowest such shard on a tie).
pub(crate) fn busiest_shard(events: &[Event], map: &crate::routing::RouteMap) -> u32 {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for e in events {
        *counts.entry(map.shard_of(&e.user_id)).or_default() += 1;
    }
    let most = counts.values().copied().max().unwrap_or(0);
    counts.into_iter().find(|(_, n)| *n == most).map_or(0, |(s, _)| s)
}

/// The profiles of the parts of a batch read in request order, and the
/// stalest part's read info (as a node reports the stalest shard it read).
pub(crate) fn gather_profiles(
    len: usize,
    answers: impl IntoIterator<Item = (Vec<usize>, Vec<Profile>, Option<ReadInfo>)>,
) -> (Vec<Profile>, Option<ReadInfo>) {
    let mut profiles = vec![Profile::default(); len];
    let mut info: Option<ReadInfo> = None;
    // The oldest leader contact of any part (unset, never heard, is the
    // oldest): a part cut off from its leader may show no lag at all.
    let mut contact: Option<Option<u64>> = None;
    for (positions, part, part_info) in answers {
        for (i, profile) in positions.into_iter().zip(part) {
            profiles[i] = profile;
        }
        let Some(part_info) = part_info else { continue };
        let age = part_info.leader_contact_age_ms;
        contact = Some(match contact {
            None => age,
            Some(seen) => oldest_contact(seen, age),
        });
        if info.as_ref().is_none_or(|i| part_info.lag_entries > i.lag_entries) {
            info = Some(part_info);
        }
    }
    if let (Some(info), Some(age)) = (info.as_mut(), contact) {
        info.leader_contact_age_ms = age;
    }
    (profiles, info)
}

/// The older of two leader contact ages, unset (never heard) the oldest.
fn oldest_contact(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    a.zip(b).map(|(a, b)| a.max(b))
}

/// An INVALID_ARGUMENT about item `n` of a part (`events[n].user_id: ...`)
/// names the item's position in the whole request instead.
pub(crate) fn reindex(error: ClientError, list: &str, positions: &[usize]) -> ClientError {
    let ClientError::Rpc(status) = &error else { return error };
    let message = status.message();
    let Some(rest) = message.strip_prefix(list).and_then(|r| r.strip_prefix('[')) else { return error };
    let Some((n, rest)) = rest.split_once(']') else { return error };
    let Some(&i) = n.parse::<usize>().ok().and_then(|n| positions.get(n)) else { return error };
    let message = format!("{list}[{i}]{rest}");
    ClientError::Rpc(Status::with_metadata(status.code(), message, status.metadata().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_order_and_positions() {
        let parts = Parts::new(vec![10, 21, 12, 33, 14], |n| n % 2);
        assert_eq!(parts.parts[&0], (vec![0, 2, 4], vec![10, 12, 14]));
        assert_eq!(parts.parts[&1], (vec![1, 3], vec![21, 33]));
    }

    #[test]
    fn profiles_come_back_in_request_order_with_the_stalest_info() {
        let p = |u: &str| Profile { user_id: u.into(), ..Default::default() };
        let info = |lag_entries| Some(ReadInfo { lag_entries, ..Default::default() });
        let (profiles, read_info) = gather_profiles(
            3,
            [(vec![1], vec![p("b")], info(0)), (vec![0, 2], vec![p("a"), p("c")], info(4))],
        );
        assert_eq!(profiles.iter().map(|p| p.user_id.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(read_info.unwrap().lag_entries, 4);
    }

    #[test]
    fn the_batch_info_has_the_largest_lag_and_the_oldest_leader_contact() {
        // A part cut off from its leader can show no lag: its contact age
        // must still reach the caller.
        let info = |shard, lag_entries, age| {
            Some(ReadInfo { shard, lag_entries, leader_contact_age_ms: age, ..Default::default() })
        };
        let gather = |infos: Vec<Option<ReadInfo>>| {
            gather_profiles(0, infos.into_iter().map(|i| (vec![], vec![], i))).1.unwrap()
        };
        let got = gather(vec![info(3, 1, Some(20)), info(5, 0, Some(60_000))]);
        assert_eq!((got.shard, got.lag_entries, got.leader_contact_age_ms), (3, 1, Some(60_000)));
        let got = gather(vec![info(3, 1, Some(20)), info(5, 0, None)]);
        assert_eq!((got.shard, got.lag_entries, got.leader_contact_age_ms), (3, 1, None));
        let got = gather(vec![info(3, 0, Some(20)), None, info(5, 0, Some(10))]);
        assert_eq!((got.shard, got.leader_contact_age_ms), (3, Some(20)));
    }

    #[test]
    fn an_invalid_item_is_named_by_its_position_in_the_request() {
        let error = ClientError::from(Status::invalid_argument("events[1].user_id: must not be empty"));
        let error = reindex(error, "events", &[0, 4]);
        assert_eq!(error.to_string(), "INVALID_ARGUMENT: events[4].user_id: must not be empty");
        let other = ClientError::from(Status::invalid_argument("families[0]: unknown family"));
        assert_eq!(
            reindex(other, "events", &[3]).to_string(),
            "INVALID_ARGUMENT: families[0]: unknown family"
        );
    }
}
