//! Reads across shards: each user is read from its shard's replica on this
//! node; LINEARIZABLE first confirms, per shard read, that shard's
//! leadership through its read index. Results come back in request order.
//! A read of a shard this node hosts no replica of is redirected (the
//! leader-redirect metadata names a node that hosts it; the Rust client
//! sends each shard's part to such a node itself).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::BasicNode;
use portrait_core::shard::shard_of;

use super::{written_index, Consistency, Node, ReadInfo};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::limits::{MAX_CONCURRENT_READS, MAX_FAMILIES, MAX_FEATURES, MAX_RESPONSE_BYTES, MAX_TAGS};
use crate::raft::contact::freshness;
use crate::raft::not_leader;
use crate::raft::replica::Replica;
use crate::schema::VersionedSchema;
use crate::store::read::{distinct_ids, read_profile, repeat_counts, ProfileView, Selection};
use crate::types::{GroupId, NodeId};
use crate::validate::validate_user_id;

impl Node {
    /// Reads profiles as of now; linearizable reads first confirm leadership
    /// of every shard they read.
    ///
    /// The selection is bounded and checked before any per-name work, then
    /// deduplicated; a user id asked for more than once is read once and
    /// its view returned at each of its positions. The RocksDB reads and
    /// feature evaluation run on a blocking thread, at most
    /// [`MAX_CONCURRENT_READS`] at once, so a read storm cannot starve the
    /// async workers that carry raft heartbeats.
    pub async fn read_profiles(
        &self,
        user_ids: &[String],
        selection: Selection,
        consistency: Consistency,
    ) -> Result<(Vec<ProfileView>, ReadInfo)> {
        static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_READS);
        check_selection(&self.schema(), &selection)?;
        let selection = selection.deduped();
        for (i, u) in user_ids.iter().enumerate() {
            validate_user_id(u).map_err(|e| Error::invalid(format!("user_ids[{i}]"), e.reason))?;
        }
        let (unique, positions) = distinct_ids(user_ids);
        let shard_of_user: Vec<u32> = unique.iter().map(|u| shard_of(u, self.shards)).collect();
        let read: BTreeSet<u32> =
            shard_of_user.iter().copied().chain(user_ids.is_empty().then_some(0)).collect();
        let replicas: BTreeMap<u32, Arc<Replica>> =
            read.into_iter().map(|s| Ok((s, self.hosted_or_redirect(GroupId(s))?))).collect::<Result<_>>()?;
        if consistency == Consistency::Linearizable {
            let checks = replicas
                .values()
                .map(|r| async move { self.ensure_linearizable(r).await.map_err(|e| e.in_shard(r.gid)) });
            futures::future::try_join_all(checks).await?;
        }
        // Per shard, the schema and engine its users are read with.
        let engines: BTreeMap<u32, (Arc<VersionedSchema>, Arc<Engine>)> =
            replicas.iter().map(|(s, r)| (*s, (r.sm.schema(), r.sm.engine()))).collect();
        // Moved into the blocking task: a cancelled call still holds its turn
        // until its reads are done.
        let permit = READS.acquire().await.map_err(Error::internal)?;
        let now = self.clock.now_ms();
        let db = self.first().sm.db();
        let repeats = repeat_counts(&positions, unique.len());
        let read = move || {
            let _permit = permit;
            // The response's bytes, counted as the views are read, so a
            // call that would pass the response limit stops early (memory:
            // the limit plus one user's profile).
            let mut bytes = 0usize;
            let mut views = Vec::with_capacity(unique.len());
            for (i, user) in unique.iter().enumerate() {
                let shard = shard_of_user[i];
                let (schema, engine) = &engines[&shard];
                let view = read_profile(&db, GroupId(shard), &schema.schema, engine, user, &selection, now)
                    .map_err(Error::internal)?;
                bytes = bytes.saturating_add(view.approx_bytes().saturating_mul(repeats[i]));
                if bytes > MAX_RESPONSE_BYTES {
                    return Err(Error::invalid(
                        "user_ids",
                        format!(
                            "the response would pass {} MiB (at user {} of {}); ask for fewer users or \
                             select fewer families, features or tags",
                            MAX_RESPONSE_BYTES >> 20,
                            i + 1,
                            unique.len()
                        ),
                    ));
                }
                views.push(view);
            }
            Ok(views)
        };
        let views = tokio::task::spawn_blocking(read).await.map_err(Error::internal)??;
        // Without repeats, positions are 0..n: the views are in order already.
        let views = match views.len() == positions.len() {
            true => views,
            false => positions.into_iter().map(|i| views[i].clone()).collect(),
        };
        // The stalest shard read speaks for the call.
        let info = replicas
            .values()
            .map(|r| self.read_info(r, now))
            .max_by_key(|i| i.freshness.lag_entries)
            .expect("at least one shard");
        Ok((views, info))
    }

    /// Confirms this node leads `replica`'s group through its read index
    /// and waits until that index is readable.
    async fn ensure_linearizable(&self, replica: &Replica) -> Result<()> {
        // The leadership check sends AppendEntries, which a transfer must not.
        let _pass = replica.gate.pass(self.write_timeout).await?;
        let read_log_id = replica.raft.ensure_linearizable().await.map_err(check_leader_error)?;
        // Applied is not yet readable until its batch is written.
        if let Some(id) = read_log_id {
            replica.sm.wait_written(id.index).await.map_err(Error::Internal)?;
        }
        Ok(())
    }

    /// This node's replica of `gid`, else a redirect to a node that hosts
    /// one (its leader if known).
    fn hosted_or_redirect(&self, gid: GroupId) -> Result<Arc<Replica>> {
        if let Some(replica) = self.registry.get(gid) {
            return Ok(replica);
        }
        match self.route(gid).into_iter().next() {
            Some((node, addr)) => Err(Error::NotLeader { leader_id: Some(node), leader_addr: Some(addr) }),
            None => Err(Error::NotFound(format!("node {} hosts no replica of {gid}", self.id))),
        }
    }

    fn read_info(&self, replica: &Replica, as_of_ms: i64) -> ReadInfo {
        let applied_index = written_index(replica);
        let m = replica.raft.metrics().borrow().clone();
        let freshness = freshness(&m, applied_index, &replica.contact, &replica.acks);
        ReadInfo { node_id: self.id, shard: replica.gid.0, applied_index, as_of_ms, freshness }
    }
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
        let list = all.cloned().collect::<Vec<_>>().join(", ");
        return Err(Error::invalid(
            format!("{kind}[{i}]"),
            format!("unknown {singular} {name:?} (schema has: {list})"),
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
