//! Reads across shards: users are grouped by shard; each shard this node
//! hosts a replica of is read here, each other shard's part is forwarded
//! in one hop to a node hosting it (`Raft.ForwardRead`), all concurrently.
//! LINEARIZABLE first confirms, per shard, that shard's leadership through
//! its read index (a forwarded part goes to the leader; a part whose
//! leadership moved away since it was routed here is forwarded to the
//! leader the check names). Results come back
//! in request order. The Rust client sends each shard's part to a replica
//! itself, so its reads take no extra hop.

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::BasicNode;
use portrait_core::shard::shard_of;

use super::forward::Forward;
use super::write::leader_elsewhere;
use super::{written_index, Consistency, Node, ReadInfo};
use crate::error::{Error, Result};
use crate::limits::{MAX_CONCURRENT_READS, MAX_FAMILIES, MAX_FEATURES, MAX_RESPONSE_BYTES, MAX_TAGS};
use crate::raft::contact::freshness;
use crate::raft::not_leader;
use crate::raft::replica::Replica;
use crate::schema::VersionedSchema;
use crate::store::codec::{decode, encode};
use crate::store::group::RowsBusy;
use crate::store::read::{distinct_ids, read_profile, repeat_counts, ProfileView, Selection};
use crate::types::{GroupId, NodeId};
use crate::validate::validate_user_id;

/// One shard's part of a read, forwarded to a node hosting the shard.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ForwardedRead {
    pub users: Vec<String>,
    pub selection: Selection,
    pub consistency: Consistency,
    /// The most this part may bring back (its share of the call's
    /// response limit, see [`forwarded_share`]): it stops once its views
    /// pass it (and never past [`MAX_RESPONSE_BYTES`]).
    pub max_bytes: u64,
}

/// The least a forwarded part of a `BatchGetProfiles` may bring back in
/// the first round (see [`forwarded_share`]).
const FORWARDED_PART_MIN_BYTES: usize = 1 << 20;

/// What each of `parts` forwarded parts may bring back in the first round:
/// an equal share of the response limit, at least 1 MiB. A part over it is
/// asked again alone (the call's parts all go out at once, and together
/// they hold at most about max(limit, parts × 1 MiB)).
fn forwarded_share(parts: usize) -> usize {
    (MAX_RESPONSE_BYTES / parts.max(1)).clamp(FORWARDED_PART_MIN_BYTES, MAX_RESPONSE_BYTES)
}

/// Whether `e` is a read refused for the size of its answer ([`too_large`]).
fn is_too_large(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument { field, reason } if field == "user_ids" && reason.starts_with(TOO_LARGE))
}

/// A shard's users (each with how many times the request asks for it) and
/// the replica that serves them.
type HostedPart = (Arc<Replica>, Vec<(String, usize)>);

impl Node {
    /// Reads profiles as of now; linearizable reads first confirm leadership
    /// of every shard they read.
    ///
    /// The selection is bounded and checked before any per-name work, then
    /// deduplicated; a user id asked for more than once is read once and
    /// its view returned at each of its positions. The response is bounded
    /// by [`MAX_RESPONSE_BYTES`] as a whole: each part stops early when it
    /// alone passes it (memory: the limit per shard read, plus one user's
    /// profile), and the gathered views are counted again.
    pub async fn read_profiles(
        &self,
        user_ids: &[String],
        selection: Selection,
        consistency: Consistency,
    ) -> Result<(Vec<ProfileView>, ReadInfo)> {
        let schema = self.schema();
        let validated = schema.version;
        check_selection(&schema, &selection)?;
        let selection = selection.deduped();
        for (i, u) in user_ids.iter().enumerate() {
            validate_user_id(u).map_err(|e| Error::invalid(format!("user_ids[{i}]"), e.reason))?;
        }
        let (unique, positions) = distinct_ids(user_ids);
        let repeats = repeat_counts(&positions, unique.len());
        // Indexes into `unique`, by shard; an empty request reads the first
        // shard this node votes in (shard 0 if none), whose replica's
        // freshness the answer reports: no hop, and no failure while
        // another node's shard is down.
        let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, user) in unique.iter().enumerate() {
            by_shard.entry(shard_of(user, self.shards)).or_default().push(i);
        }
        // Nothing to read: no leadership to confirm either (a LINEARIZABLE
        // empty batch returns its empty list even while shard 0 has no
        // quorum).
        let consistency = match by_shard.is_empty() {
            true => Consistency::Local,
            false => consistency,
        };
        if by_shard.is_empty() {
            let replicas = self.registry.all();
            let first = replicas.iter().find(|r| r.gid != GroupId::META && votes(r, self.id));
            by_shard.insert(first.map_or(0, |r| r.gid.0), vec![]);
        }
        // LINEARIZABLE reads a shard here only where this node leads it (or
        // knows no leader: the read index then says who leads).
        // Each shard's replica is looked up once: the parts read here are
        // exactly `hosted`, in its order.
        let (mut hosted, mut remote) = (Vec::new(), Vec::new());
        for (s, idx) in by_shard {
            match self.registry.get(GroupId(s)) {
                Some(r)
                    if votes(&r, self.id)
                        && (consistency == Consistency::Local || leader_elsewhere(&r, self.id).is_none()) =>
                {
                    hosted.push((idx, r))
                }
                _ => remote.push((s, idx)),
            }
        }
        let hosted_parts: Vec<HostedPart> = hosted
            .iter()
            .map(|(idx, r)| (r.clone(), idx.iter().map(|&i| (unique[i].clone(), repeats[i])).collect()))
            .collect();
        // The parts read here, by position in `hosted`: `None` for a part
        // whose shard's leadership moved away since it was routed here (a
        // transfer, an election), with the leader its check named in
        // `moved`. Such a part is forwarded there below, not failed.
        let local = async {
            let mut moved = Vec::new();
            if consistency == Consistency::Linearizable {
                let checks = hosted_parts.iter().map(|(r, _)| self.ensure_linearizable(r));
                for (k, checked) in futures::future::join_all(checks).await.into_iter().enumerate() {
                    match checked {
                        Ok(()) => {}
                        Err(Error::NotLeader { leader_id: Some(l), leader_addr: Some(a), .. })
                            if l != self.id =>
                        {
                            moved.push((k, (l, a)))
                        }
                        Err(e) => return Err(e.in_shard(hosted_parts[k].0.gid)),
                    }
                }
            }
            let here: Vec<HostedPart> = (hosted_parts.into_iter().enumerate())
                .filter(|(k, _)| !moved.iter().any(|(m, _)| m == k))
                .map(|(_, part)| part)
                .collect();
            let mut read = match here.is_empty() {
                true => vec![],
                false => self.read_hosted(here, &selection, validated, MAX_RESPONSE_BYTES).await?,
            }
            .into_iter();
            let parts = (0..hosted.len())
                .map(|k| match moved.iter().any(|(m, _)| *m == k) {
                    true => None,
                    false => read.next(),
                })
                .collect::<Vec<_>>();
            Ok((parts, moved))
        };
        // The forwarded parts go out at once, each capped at its share of
        // the response limit (`forwarded_share`); a part over its share is
        // asked again alone, with what is left of the limit. A call holds
        // the limit for the parts read here, about max(limit, parts × 1 MiB)
        // for the first round of forwarded ones, then one part at a time.
        // By position: a closure over `&(shard, users)` makes a future the
        // compiler cannot prove `Send` for every lifetime.
        let part_of = |idx: &[usize], max_bytes: usize| ForwardedRead {
            users: idx.iter().map(|&i| unique[i].clone()).collect(),
            selection: selection.clone(),
            consistency,
            max_bytes: max_bytes as u64,
        };
        let ask = |k: usize, max_bytes: usize| {
            let (s, idx) = &remote[k];
            self.forward_read(GroupId(*s), None, part_of(idx, max_bytes))
        };
        let share = forwarded_share(remote.len());
        let first = futures::future::join_all((0..remote.len()).map(|k| ask(k, share)));
        let (local, first) = futures::future::join(local, first).await;
        let (mut local, moved) = local?;
        // The bytes of a part's views, each counted at every position its
        // user is asked at.
        let views_bytes = |idx: &[usize], views: &[ProfileView]| {
            let bytes = views.iter().zip(idx).map(|(v, &i)| v.approx_bytes().saturating_mul(repeats[i]));
            bytes.fold(0usize, usize::saturating_add)
        };
        let part_bytes = |k: usize, views: &[ProfileView]| views_bytes(&remote[k].1, views);
        let over = || too_large(unique.len(), unique.len());
        // What is left of the response limit once each part is counted,
        // the parts read here first.
        let local_bytes = hosted.iter().zip(&local).map(|((idx, _), read)| match read {
            Some((views, _)) => views_bytes(idx, views),
            None => 0,
        });
        let mut left =
            MAX_RESPONSE_BYTES.checked_sub(local_bytes.fold(0, usize::saturating_add)).ok_or_else(over)?;
        let (mut forwarded, mut again) = (Vec::with_capacity(remote.len()), Vec::new());
        for (k, read) in first.into_iter().enumerate() {
            match read {
                Ok(read) => {
                    left = left.checked_sub(part_bytes(k, &read.0)).ok_or_else(over)?;
                    forwarded.push(Some(read));
                }
                Err(e) if is_too_large(&e) => {
                    again.push(k);
                    forwarded.push(None);
                }
                Err(e) => return Err(e),
            }
        }
        for k in again {
            // The part passed its share: asking again with no more than
            // that would only read it twice.
            if left <= share {
                return Err(over());
            }
            let read = ask(k, left).await?;
            left = left.checked_sub(part_bytes(k, &read.0)).ok_or_else(over)?;
            forwarded[k] = Some(read);
        }
        // The parts whose leadership moved, at the leader their check
        // named, one at a time with what is left of the limit.
        for (k, leader) in moved {
            let (idx, replica) = &hosted[k];
            let read = self.forward_read(replica.gid, Some(leader), part_of(idx, left)).await;
            let read = read.map_err(|e| if is_too_large(&e) { over() } else { e })?;
            left = left.checked_sub(views_bytes(idx, &read.0)).ok_or_else(over)?;
            local[k] = Some(read);
        }
        let local = local.into_iter().map(|read| read.expect("every part read here or forwarded"));
        let forwarded = forwarded.into_iter().map(|read| read.expect("every forwarded part was read"));
        // Each part's views in its users' order, back into `unique`'s.
        let mut views: Vec<Option<ProfileView>> = vec![None; unique.len()];
        let mut infos = Vec::new();
        let indexes = hosted.iter().map(|(idx, _)| idx).chain(remote.iter().map(|(_, idx)| idx));
        for (idx, (part_views, info)) in indexes.zip(local.into_iter().chain(forwarded)) {
            if part_views.len() != idx.len() {
                return Err(Error::Internal(format!(
                    "shard {}: {} views for {} users",
                    info.shard,
                    part_views.len(),
                    idx.len()
                )));
            }
            for (&i, view) in idx.iter().zip(part_views) {
                views[i] = Some(view);
            }
            infos.push(info);
        }
        let views: Vec<ProfileView> =
            views.into_iter().map(|v| v.expect("every user is in one part")).collect();
        let bytes = views.iter().zip(&repeats).map(|(v, r)| v.approx_bytes().saturating_mul(*r));
        if bytes.fold(0usize, usize::saturating_add) > MAX_RESPONSE_BYTES {
            return Err(too_large(unique.len(), unique.len()));
        }
        // Without repeats, positions are 0..n: the views are in order already.
        let views = match views.len() == positions.len() {
            true => views,
            false => positions.into_iter().map(|i| views[i].clone()).collect(),
        };
        let info = stalest(infos);
        Ok((views, info))
    }

    /// Reads shards this node hosts, each part's views in its users'
    /// order, with each part's read info.
    ///
    /// The RocksDB reads and feature evaluation run on a blocking thread,
    /// at most [`MAX_CONCURRENT_READS`] at once, so a read storm cannot
    /// starve the async workers that carry raft heartbeats. A LINEARIZABLE
    /// caller has confirmed each part's leadership first
    /// ([`Node::ensure_linearizable`]).
    async fn read_hosted(
        &self,
        parts: Vec<HostedPart>,
        selection: &Selection,
        validated: u64,
        max_bytes: usize,
    ) -> Result<Vec<(Vec<ProfileView>, ReadInfo)>> {
        static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_READS);
        // Moved into the blocking task: a cancelled call still holds its turn
        // until its reads are done.
        let permit = READS.acquire().await.map_err(Error::internal)?;
        let clock = self.clock.clone();
        let db = self.first().sm.db();
        let selection = selection.clone();
        let total: usize = parts.iter().map(|(_, users)| users.len()).sum();
        let id = self.id;
        let read = move || {
            let _permit = permit;
            // The response's bytes, counted as the views are read, so a
            // call that would pass the response limit stops early (memory:
            // the limit plus one user's profile).
            let mut bytes = 0usize;
            let mut done = 0usize;
            let mut out = Vec::with_capacity(parts.len());
            // Held while the parts are read: a snapshot install does not
            // replace the rows meanwhile.
            // A shard installing a snapshot (seconds, under load) is not
            // waited for on one of the node's few read threads:
            // UNAVAILABLE, and the caller retries, elsewhere if it can.
            let rows = parts
                .iter()
                .map(|(replica, _)| match replica.sm.try_read_rows() {
                    Ok(rows) => Ok(rows),
                    Err(RowsBusy::Installing) => Err(Error::Unavailable(format!(
                        "{}'s replica on node {id} is installing a snapshot (catching up); retry",
                        replica.gid
                    ))),
                    Err(RowsBusy::Broken) => Err(Error::Unavailable(format!(
                        "{}'s replica on node {id} failed a snapshot install midway (the node stops; its log \
                         says why); retry, another replica serves",
                        replica.gid
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            // Taken before the rows are read: every entry up to it is in
            // what is read (a lower bound, as read_info's applied_index
            // promises).
            let applied: Vec<u64> = parts.iter().map(|(replica, _)| written_index(replica)).collect();
            // Then the time the views are read at: the later of this node's
            // wall clock and the logical clock of every shard read (its
            // leaders' stamps, which apply and the compaction filter expire
            // values by), taken after the applied indexes, so it is at
            // least the clock of every entry they cover. What a replica at
            // the same applied index has already reclaimed is hidden here
            // too, however far this node's wall clock lags.
            let now = parts.iter().map(|(r, _)| r.sm.clock_ms()).fold(clock.now_ms(), i64::max);
            for ((replica, users), applied_index) in parts.iter().zip(applied) {
                // The schema and engine are the ones of the rows read.
                let (schema, engine) = (replica.sm.schema(), replica.sm.engine());
                // During a schema rollout the selection was checked against
                // a newer schema than this shard applied: a name the shard
                // does not know yet would be left out of the answer (or
                // the user reported missing). Retryable, and another
                // replica of the shard may have applied it.
                if schema.version < validated && check_selection(&schema, &selection).is_err() {
                    return Err(Error::Unavailable(format!(
                        "{}'s replica on node {id} has applied schema version {} of the selection's {validated} \
                         (a schema rollout); retry",
                        replica.gid, schema.version
                    )));
                }
                let mut views = Vec::with_capacity(users.len());
                for (user, repeats) in users {
                    // What is left of the limit for this user's view (at each
                    // of its positions), doubled for its stored size.
                    let left = max_bytes.saturating_sub(bytes) / (*repeats).max(1);
                    let stored_max = left.saturating_mul(2);
                    let view = read_profile(
                        &db,
                        replica.gid,
                        &schema.schema,
                        &engine,
                        user,
                        &selection,
                        replica.sm.at(now),
                        stored_max,
                    )
                    .map_err(|e| {
                        let user: String = user.chars().take(64).collect();
                        Error::internal(format!("{}: reading user {user:?} on node {id}: {e}", replica.gid))
                    })?
                    .ok_or_else(|| too_large(done + 1, total))?;
                    done += 1;
                    bytes = bytes.saturating_add(view.approx_bytes().saturating_mul(*repeats));
                    if bytes > max_bytes {
                        return Err(too_large(done, total));
                    }
                    views.push(view);
                }
                out.push((views, replica.clone(), applied_index));
            }
            drop(rows);
            Ok((out, now))
        };
        let (read, now) = tokio::task::spawn_blocking(read).await.map_err(Error::internal)??;
        Ok(read.into_iter().map(|(views, r, applied)| (views, self.read_info(&r, applied, now))).collect())
    }

    /// One shard's part, read by a node that hosts the shard (its leader
    /// for LINEARIZABLE), tried as [`Node::to_replicas`] does; `leader`
    /// (named by this node's own failed leadership check) first.
    async fn forward_read(
        &self,
        gid: GroupId,
        leader: Option<(NodeId, String)>,
        part: ForwardedRead,
    ) -> Result<(Vec<ProfileView>, ReadInfo)> {
        let data = encode(&part);
        let leads = part.consistency == Consistency::Linearizable;
        let none = Error::Unavailable(format!("the map names no replica of {gid}"));
        // This node stays a candidate: leadership may come back to it
        // (asked over its own peer port, it reads as any replica would).
        let read = self
            .to_replicas_after(gid, leader, None, none, leads, |node, addr| {
                let data = data.clone();
                async move {
                    let reply = self.call_peer(Forward::Read, gid, node, &addr, data).await?;
                    decode::<(Vec<ProfileView>, ReadInfo)>(&reply).map_err(Error::internal)
                }
            })
            .await;
        read.map_err(|e| super::write::moved_on(e).in_shard(gid))
    }

    /// A part forwarded by another node: served from this node's replica
    /// of `gid` (never forwarded again), else NOT_FOUND; LINEARIZABLE on a
    /// replica that does not lead is a redirect to the leader.
    pub async fn forwarded_read(
        &self,
        gid: GroupId,
        part: ForwardedRead,
        validated: u64,
    ) -> Result<(Vec<ProfileView>, ReadInfo)> {
        let replica = self.replica(gid)?;
        if !votes(&replica, self.id) {
            return Err(Error::NotFound(format!(
                "node {}'s replica of {gid} is not a voter (still catching up, or removed)",
                self.id
            )));
        }
        if let Some(u) = part.users.iter().find(|u| shard_of(u, self.shards) != gid.0) {
            return Err(Error::invalid("users", format!("{u:?} is not a user of {gid}")));
        }
        // Checked by the sender against its schema (version `validated`);
        // checked again here, where a refusal from a node that has not seen
        // that version yet is a retry elsewhere, not the caller's error.
        let schema = self.schema();
        if let Err(e) = check_selection(&schema, &part.selection) {
            return Err(match validated > schema.version {
                true => Error::Unavailable(format!(
                    "node {} has not seen schema version {validated} yet (it has {}); retry",
                    self.id, schema.version
                )),
                false => e,
            });
        }
        let validated = validated.max(schema.version);
        if part.users.len() > crate::limits::MAX_BATCH_GET_USERS {
            return Err(Error::invalid("users", format!("{} users in one forwarded read", part.users.len())));
        }
        let selection = part.selection.deduped();
        let users = part.users.into_iter().map(|u| (u, 1)).collect();
        let max_bytes = usize::try_from(part.max_bytes).unwrap_or(usize::MAX).min(MAX_RESPONSE_BYTES);
        if part.consistency == Consistency::Linearizable {
            self.ensure_linearizable(&replica).await.map_err(|e| e.in_shard(gid))?;
        }
        let mut read = self.read_hosted(vec![(replica, users)], &selection, validated, max_bytes).await?;
        Ok(read.pop().expect("one part"))
    }

    /// Confirms this node leads `replica`'s group through its read index
    /// and waits until that index is readable.
    pub(super) async fn ensure_linearizable(&self, replica: &Replica) -> Result<()> {
        let index = self.read_index(replica).await?;
        // Applied is not yet readable until its batch is written.
        if index > 0 {
            replica.sm.wait_written(index).await.map_err(Error::Internal)?;
        }
        Ok(())
    }

    /// As this shard's leader, confirmed with a quorum: the index every
    /// write acknowledged so far is at or under (0: none yet). Not the
    /// leader: NOT_LEADER with the leader it knows.
    pub(super) async fn read_index(&self, replica: &Replica) -> Result<u64> {
        // The leadership check sends AppendEntries, which a transfer must not.
        let _pass = replica.gate.pass(self.write_timeout).await.map_err(|_| {
            Error::Unavailable(format!(
                "{}: leadership transfer in progress: the leadership check of a LINEARIZABLE read waited {} ms; \
                 retry",
                replica.gid,
                self.write_timeout.as_millis()
            ))
        })?;
        let read_log_id = replica.raft.ensure_linearizable().await.map_err(check_leader_error)?;
        Ok(read_log_id.map_or(0, |id| id.index))
    }

    /// `Raft.ReadIndex`: [`Node::read_index`] of this node's replica of
    /// shard `shard`.
    pub async fn shard_read_index(&self, shard: u32) -> Result<u64> {
        let gid = self.shard_group(shard)?;
        let replica = self.hosted(gid)?;
        self.read_index(&replica).await
    }

    /// The read info of a part of `replica` read with every entry up to
    /// `applied_index` in it.
    fn read_info(&self, replica: &Replica, applied_index: u64, as_of_ms: i64) -> ReadInfo {
        let m = replica.raft.metrics().borrow().clone();
        let freshness = freshness(&m, applied_index, &replica.contact, &replica.acks);
        ReadInfo { node_id: self.id, shard: replica.gid.0, applied_index, as_of_ms, freshness }
    }
}

/// The read info a call over several shards reports: that of the shard
/// read with the largest lag (the first on a tie), with the oldest leader
/// contact of any shard read (never heard is the oldest): a shard cut off
/// from its leader may show no lag at all.
fn stalest(infos: Vec<ReadInfo>) -> ReadInfo {
    let contact = infos
        .iter()
        .map(|i| i.freshness.leader_contact_age)
        .reduce(|a, b| a.zip(b).map(|(a, b)| a.max(b)))
        .flatten();
    let mut info = infos
        .into_iter()
        .reduce(|a, b| if b.freshness.lag_entries > a.freshness.lag_entries { b } else { a })
        .expect("at least one shard");
    info.freshness.leader_contact_age = contact;
    info
}

/// Whether node `id` is a voter in the membership `replica`'s state has
/// applied ([`crate::store::GroupState::is_voter`]): only then does it
/// serve reads. A replica just placed here is empty until its snapshot is
/// in (a learner), and one removed from its group no longer follows it;
/// either would answer "no such profile" for users it simply lacks.
fn votes(replica: &Replica, id: NodeId) -> bool {
    replica.sm.is_voter(id)
}

/// How a read refused for the size of its answer starts.
const TOO_LARGE: &str = "the response would pass";

/// INVALID_ARGUMENT on `user_ids`: the response would pass
/// [`MAX_RESPONSE_BYTES`] at the `at`-th of `of` users read.
fn too_large(at: usize, of: usize) -> Error {
    Error::invalid(
        "user_ids",
        format!(
            "{TOO_LARGE} {} MiB (at user {at} of {of}); ask for fewer users or select fewer families, \
             features or tags",
            MAX_RESPONSE_BYTES >> 20
        ),
    )
}

/// The selection's names exist in the schema (and are not too many).
fn check_selection(schema: &VersionedSchema, sel: &Selection) -> Result<()> {
    let s = &schema.schema;
    check_names(
        ("families", "family", MAX_FAMILIES),
        &sel.families,
        |n| s.families.contains_key(n),
        s.families.keys(),
    )?;
    check_names(
        ("features", "feature", MAX_FEATURES),
        &sel.features,
        |n| s.features.contains_key(n),
        s.features.keys(),
    )?;
    check_names(("tags", "tag", MAX_TAGS), &sel.tags, |n| s.tags.contains_key(n), s.tags.keys())
}

/// Rejects a list of more than `max` names (checked first: a request of
/// 1,000,000 names costs one comparison), then names that are not in the
/// schema: `families[1]: unknown family "x" (schema has: ...)`.
fn check_names<'a>(
    (kind, singular, max): (&str, &str, usize),
    names: &Option<Vec<String>>,
    known: impl Fn(&str) -> bool,
    all: impl Iterator<Item = &'a String>,
) -> Result<()> {
    let Some(names) = names else { return Ok(()) };
    if names.len() > max {
        return Err(Error::invalid(kind, format!("{} names is over the limit of {max}", names.len())));
    }
    if let Some((i, name)) = names.iter().enumerate().find(|(_, n)| !known(n)) {
        let list = portrait_core::validate::listed(all.map(String::as_str));
        let name = portrait_core::validate::shown(name);
        return Err(Error::invalid(
            format!("{kind}[{i}]"),
            format!("unknown {singular} {name} (schema has: {list})"),
        ));
    }
    Ok(())
}

fn check_leader_error(e: RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>) -> Error {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => not_leader(f),
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => Error::Unavailable(q.to_string()),
        RaftError::Fatal(f) => Error::Unavailable(format!("raft is not running: {f}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_reports_the_largest_lag_and_the_oldest_leader_contact() {
        use crate::raft::contact::Freshness;
        use std::time::Duration;
        let info = |shard, lag_entries, age: Option<u64>| ReadInfo {
            node_id: 1,
            shard,
            applied_index: 7,
            as_of_ms: 0,
            freshness: Freshness { lag_entries, leader_contact_age: age.map(Duration::from_millis) },
        };
        // Shard 5 is cut off from its leader: no lag, an old contact.
        let got = stalest(vec![info(3, 1, Some(20)), info(5, 0, Some(60_000))]);
        assert_eq!((got.shard, got.freshness.lag_entries), (3, 1));
        assert_eq!(got.freshness.leader_contact_age, Some(Duration::from_secs(60)));
        let got = stalest(vec![info(3, 1, Some(20)), info(5, 0, None)]);
        assert_eq!((got.shard, got.freshness.leader_contact_age), (3, None));
        let got = stalest(vec![info(3, 0, Some(20)), info(5, 0, Some(10))]);
        assert_eq!((got.shard, got.freshness.leader_contact_age), (3, Some(Duration::from_millis(20))));
    }

    #[test]
    fn forwarded_parts_share_the_response_limit_with_a_floor() {
        assert_eq!(forwarded_share(0), MAX_RESPONSE_BYTES);
        assert_eq!(forwarded_share(1), MAX_RESPONSE_BYTES);
        assert_eq!(forwarded_share(4), MAX_RESPONSE_BYTES / 4);
        assert_eq!(forwarded_share(64), FORWARDED_PART_MIN_BYTES, "at least 1 MiB each");
        // What the first round holds at most: the limit, or 1 MiB a part.
        for parts in [1, 3, 16, 64, 4096] {
            let held = parts * forwarded_share(parts);
            assert!(held <= MAX_RESPONSE_BYTES.max(parts * FORWARDED_PART_MIN_BYTES), "{parts}: {held}");
        }
    }

    #[test]
    fn a_part_over_its_share_is_told_from_other_refusals() {
        assert!(is_too_large(&too_large(3, 10)));
        assert!(!is_too_large(&Error::invalid("user_ids[2]", "must not be empty")));
        assert!(!is_too_large(&Error::Unavailable(TOO_LARGE.into())));
    }
}
