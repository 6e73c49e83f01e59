//! Writes across shards: a request is validated whole, split by
//! `shard_of(user_id, S)` (events keep their order within a shard), and
//! each shard's part goes through that shard: proposed here when this node
//! leads the shard (the node's write batcher merges it with other requests
//! of the shard), forwarded in one hop to the shard's leader otherwise
//! (`Raft.ForwardWrite`; the parts of every shard one other node leads go
//! in one `Raft.ForwardWrites` call, each part answered on its own). A
//! shard without a replica here is forwarded to
//! the leader last heard of, else to the replicas the map names, following
//! their redirects (`forward.rs`). A forwarded part that fails before it
//! was proposed (a redirect from a node that no longer leads, no such
//! replica, no connection) goes on the same way; one whose outcome is
//! unknown does not. Parts run concurrently; the call returns when
//! every part is applied, or with a failed part's error, named after its
//! shard: the first whose outcome is unknown, else the first in shard
//! order. Atomic per shard, not across shards.

use std::collections::BTreeMap;
use std::time::Duration;

use portrait_core::schema::VersionedSchema;
use portrait_core::shard::shard_of;

use super::forward::Forward;
use super::Node;
use crate::error::{Error, Result, OUTCOME_UNKNOWN, RETRY_LATER};
use crate::model::{Event, WriteCounts};
use crate::raft::batcher::Room;
use crate::raft::replica::Replica;
use crate::store::codec::{decode, encode};
use crate::types::{GroupId, NodeId};
use crate::validate::validate_request;

/// What one shard's part of a write became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardWrite {
    pub shard: u32,
    pub log_index: u64,
    pub counts: WriteCounts,
}

/// What a whole write became: totals, and per shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteResult {
    pub counts: WriteCounts,
    /// The largest log index of the parts (each shard has its own log).
    pub log_index: u64,
    /// In shard order.
    pub shards: Vec<ShardWrite>,
}

/// One shard's events of a request.
type Part = (u32, Vec<Event>);

/// Which failed part fails a whole write: the first whose outcome is
/// unknown, else the first in shard order. The caller of a part whose
/// outcome is unknown must learn to retry with the same event ids; a
/// definite failure of another part (a refusal, say) would hide that the
/// part may still apply.
fn failing_part<T>(results: &BTreeMap<u32, Result<T>>) -> Option<u32> {
    let unknown = results.iter().find(|(_, r)| r.as_ref().is_err_and(Error::outcome_unknown));
    unknown.or_else(|| results.iter().find(|(_, r)| r.is_err())).map(|(shard, _)| *shard)
}

/// Splits events by shard, keeping their order within each shard: per
/// shard, the events' positions in the request, and the events.
pub fn split_by_shard(events: Vec<Event>, shards: u32) -> BTreeMap<u32, (Vec<usize>, Vec<Event>)> {
    let mut parts: BTreeMap<u32, (Vec<usize>, Vec<Event>)> = BTreeMap::new();
    for (i, event) in events.into_iter().enumerate() {
        let (positions, part) = parts.entry(shard_of(&event.user_id, shards)).or_default();
        positions.push(i);
        part.push(event);
    }
    parts
}

impl Node {
    /// Validates one write request whole, then commits each shard's part
    /// (see the module docs).
    pub async fn write(&self, events: Vec<Event>) -> Result<WriteResult> {
        let schema = self.schema();
        let now = self.clock.now_ms();
        if let Err(e) = validate_request(&events, &schema.schema, Some(now)) {
            let newest = self.registry.all().iter().map(|r| r.sm.schema()).max_by_key(|s| s.version);
            return Err(
                view_behind(schema.version, newest.as_deref(), &events, now).unwrap_or_else(|| e.into())
            );
        }
        let mut positions = BTreeMap::new();
        // Parts of shards hosted here whose leader is another node go to
        // that node together, one call per node (`Raft.ForwardWrites`);
        // the others one by one.
        let mut alone = Vec::new();
        let mut by_leader: BTreeMap<(NodeId, String), Vec<Part>> = BTreeMap::new();
        for (shard, (at, part)) in split_by_shard(events, self.shards) {
            positions.insert(shard, at);
            match self.registry.get(GroupId(shard)).and_then(|r| leader_elsewhere(&r, self.id)) {
                Some(leader) => by_leader.entry(leader).or_default().push((shard, part)),
                None => alone.push((shard, part)),
            }
        }
        let alone = alone
            .into_iter()
            .map(|(shard, part)| async move { vec![(shard, self.write_shard(GroupId(shard), part).await)] });
        let grouped =
            by_leader.into_iter().map(|((leader, addr), parts)| self.forward_parts(leader, addr, parts));
        let (alone, grouped) =
            futures::future::join(futures::future::join_all(alone), futures::future::join_all(grouped)).await;
        let mut results: BTreeMap<u32, Result<(WriteCounts, u64)>> =
            alone.into_iter().chain(grouped).flatten().collect();
        if let Some((shard, Err(e))) = failing_part(&results).and_then(|s| Some((s, results.remove(&s)?))) {
            // A part's error names its events by their place in the part.
            return Err(e.reindexed("events", &positions[&shard]).in_shard(GroupId(shard)));
        }
        let mut total = WriteResult::default();
        for (shard, result) in results {
            let Ok((counts, log_index)) = result else { continue };
            total.counts.applied += counts.applied;
            total.counts.duplicates += counts.duplicates;
            total.counts.expired += counts.expired;
            total.log_index = total.log_index.max(log_index);
            total.shards.push(ShardWrite { shard, log_index, counts });
        }
        self.wait_applied_here(&total.shards).await;
        Ok(total)
    }

    /// Visible here when the write returns (api.md): a part another node
    /// committed is waited for on this node's replica of its shard, when
    /// the map places the shard here and that replica is a voter of its
    /// applied membership, following or, since, leading (it holds the
    /// entry or will within a round; a learner may be a whole snapshot
    /// behind, a removed voter never hears of it). At most one election timeout: the write is
    /// committed whatever this replica does, so it still succeeds after
    /// that.
    async fn wait_applied_here(&self, parts: &[ShardWrite]) {
        let cluster = self.cluster();
        let map = cluster.map.as_ref();
        let within = Duration::from_millis(self.tuning.election_timeout_max_ms).min(self.write_timeout);
        let waits = parts.iter().filter_map(|part| {
            let placed = map?.replicas.get(part.shard as usize)?.contains(&self.id);
            let replica = self.registry.get(GroupId(part.shard))?;
            // Following, or leading since the part was forwarded (it
            // applies the part once its own first entry commits); not a
            // candidate, which may be cut off and apply nothing.
            let state = replica.raft.metrics().borrow().state;
            let votes = matches!(state, openraft::ServerState::Follower | openraft::ServerState::Leader);
            let waits = placed && votes && !replica.sm.written_up_to(part.log_index);
            (waits && replica.sm.is_voter(self.id)).then_some(async move {
                let wait = tokio::time::timeout(within, replica.sm.wait_written(part.log_index));
                if !matches!(wait.await, Ok(Ok(()))) {
                    tracing::debug!(group = %replica.gid, index = part.log_index, "a forwarded write not applied here in time");
                }
            })
        });
        futures::future::join_all(waits).await;
    }

    /// One shard's part: proposed here if this node leads the shard (or
    /// knows no leader: the proposal then says who leads), else forwarded.
    async fn write_shard(&self, gid: GroupId, events: Vec<Event>) -> Result<(WriteCounts, u64)> {
        let Some(replica) = self.registry.get(gid) else {
            return self.forward_unhosted(gid, events).await;
        };
        match leader_elsewhere(&replica, self.id) {
            Some((leader, addr)) => match self.forward(gid, leader, addr, &events).await {
                Err(e) => self.send_on(gid, e, leader, &events).await,
                done => done,
            },
            None => match self.propose_write(&replica, events, 0, Room::Wait).await {
                Proposal::Done(result) => result,
                // Led elsewhere once past the gate (a leadership transfer
                // it waited out): nothing was proposed, so the part goes
                // on to the new leader, as a forwarded part would.
                Proposal::Moved { events, leader, addr } => {
                    match self.forward(gid, leader, addr, &events).await {
                        Err(e) => self.send_on(gid, e, leader, &events).await,
                        done => done,
                    }
                }
            },
        }
    }

    /// A part forwarded to node `tried` that failed before anything was
    /// proposed (a redirect, the replica gone, no connection, a leadership
    /// transfer's gate) goes on to the shard's other replicas, a
    /// redirect's leader first, each at most once. One whose outcome is
    /// unknown, or that was refused for what it holds, fails as it is: sent
    /// again, it could be applied twice, or fail the same way.
    async fn send_on(
        &self,
        gid: GroupId,
        failed: Error,
        tried: NodeId,
        events: &[Event],
    ) -> Result<(WriteCounts, u64)> {
        if failed.outcome_unknown()
            || failed.leader_refused()
            || !matches!(failed, Error::NotLeader { .. } | Error::NotFound(_) | Error::Unavailable(_))
        {
            return Err(failed);
        }
        let hint = match &failed {
            Error::NotLeader { leader_id: Some(l), leader_addr: Some(a), .. } => Some((*l, a.clone())),
            _ => None,
        };
        // With no other node to try, the first failure says most.
        self.to_replicas_after(gid, hint, Some(tried), failed, true, |node, addr| {
            self.forward(gid, node, addr, events)
        })
        .await
    }

    /// A part of a shard this node hosts no replica of: to the leader last
    /// heard of, then the map's replicas of the shard, following a
    /// redirect; each node is tried once.
    async fn forward_unhosted(&self, gid: GroupId, events: Vec<Event>) -> Result<(WriteCounts, u64)> {
        self.to_replicas(gid, true, |node, addr| self.forward(gid, node, addr, &events)).await
    }

    /// Proposes a validated part through the write batcher.
    ///
    /// During a leadership transfer the write waits at the gate (at most
    /// the write timeout, then UNAVAILABLE: nothing was proposed), then goes
    /// on; should another node lead the shard by then, the events come back
    /// unproposed ([`Proposal::Moved`]).
    /// `validated`: the schema version the events were validated against
    /// (where they were received), when newer than this node's view.
    /// `room`: whether the part may wait for room in the node's queued-write
    /// budget (a client's request) or not (a part another node forwarded,
    /// which holds that node's budget meanwhile: two nodes whose budgets
    /// are full of parts forwarded to each other would wait on each other).
    async fn propose_write(
        &self,
        replica: &Replica,
        events: Vec<Event>,
        validated: u64,
        room: Room,
    ) -> Proposal {
        if let Err(e) = self.quorum_in_sight(replica) {
            return Proposal::Done(Err(e));
        }
        // A shard behind the cluster's apply rules (new, or just raised)
        // takes the version first, here rather than at the next placement
        // pass: one proposal, at most a second (before the queued-write
        // budget: the events wait that long outside it).
        self.catch_up_rules(replica).await;
        // The node's queued-write budget counts the wait at the gate.
        let (admitted, _pass) =
            match self.batcher.admit(&replica.gate, self.write_timeout, &events, room).await {
                Ok(admitted) => admitted,
                Err(e) => return Proposal::Done(Err(e)),
            };
        if let Some((leader, addr)) = leader_elsewhere(replica, self.id) {
            return Proposal::Moved { events, leader, addr };
        }
        // Again after the wait at the gate and for room (up to the write
        // timeout), in which the quorum may have gone.
        if let Err(e) = self.quorum_in_sight(replica) {
            return Proposal::Done(Err(e));
        }
        let behind = behind_schema(self.schema().version.max(validated), &replica.sm.schema(), &events)
            .and_then(|()| behind_rules(self.cluster().rules(), replica.sm.rules(), replica.gid));
        if let Err(e) = behind {
            return Proposal::Done(Err(e));
        }
        // Never hang: a leader cut off from its quorum cannot commit.
        let write = self.batcher.write_held(replica.gid, events, admitted);
        Proposal::Done(match tokio::time::timeout(self.write_timeout, write).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(format!(
                "not committed within {} ms (no quorum reachable?); {OUTCOME_UNKNOWN}: retry with the same \
                 event_ids, duplicates are skipped",
                self.write_timeout.as_millis()
            ))),
        })
    }

    /// Refuses a write to a shard this node leads while the node has heard
    /// fewer than a quorum of the shard's voters (itself counting) on the
    /// liveness probe for [`crate::raft::RaftTuning::quorum_unheard_after`]:
    /// the leader of a minority side cannot commit, and a proposal would
    /// only wait in its log for the write timeout, then be committed or
    /// dropped whenever the partition ends, long after the caller was told
    /// its outcome is unknown. Nothing is proposed: UNAVAILABLE, and the
    /// part goes on to the shard's other replicas (one may lead by now).
    /// A leader that hears the nodes but whose messages to them are lost
    /// still proposes, and its write times out as before. Checked before
    /// and after the write's wait at the gate and for room. During a
    /// membership change each configuration needs its quorum.
    pub(super) fn quorum_in_sight(&self, replica: &Replica) -> Result<()> {
        let within = self.tuning.quorum_unheard_after();
        let Some((voters, answering)) = replica.quorum_out_of_sight(self.id, &self.liveness, within) else {
            return Ok(());
        };
        Err(Error::Unavailable(format!(
            "node {} leads the shard, but of its voters {voters:?} only {answering:?} answered within {} ms: \
             no quorum, so the write was not proposed; retry (another replica may lead the shard by now)",
            self.id,
            within.as_millis()
        )))
    }

    /// Sends a part to the shard's leader, which proposes it (one hop: it
    /// never forwards again; if it no longer leads, its redirect comes back).
    async fn forward(
        &self,
        gid: GroupId,
        leader: NodeId,
        addr: String,
        events: &[Event],
    ) -> Result<(WriteCounts, u64)> {
        let reply =
            self.call_peer(Forward::Write, gid, leader, &addr, encode(&events)).await.map_err(moved_on)?;
        decode(&reply).map_err(Error::internal)
    }

    /// Parts of several shards that `leader` leads, as this node knows:
    /// one call (one part: `Raft.ForwardWrite`), each part answered on its
    /// own. A failed call fails each of its parts the same way.
    async fn forward_parts(
        &self,
        leader: NodeId,
        addr: String,
        parts: Vec<Part>,
    ) -> Vec<(u32, Result<(WriteCounts, u64)>)> {
        let shards: Vec<u32> = parts.iter().map(|(s, _)| *s).collect();
        let results: Vec<Result<(WriteCounts, u64)>> = match &parts[..] {
            [(shard, part)] => vec![self.forward(GroupId(*shard), leader, addr, part).await],
            _ => {
                let reply =
                    self.call_peer(Forward::Writes, GroupId(shards[0]), leader, &addr, encode(&parts)).await;
                let results: Result<Vec<Result<(WriteCounts, u64)>>> = reply
                    .map_err(moved_on)
                    .and_then(|r| decode::<Vec<Result<(WriteCounts, u64)>>>(&r).map_err(Error::internal))
                    .map(|r| r.into_iter().map(|p| p.map_err(moved_on)).collect());
                match results {
                    Ok(results) if results.len() == shards.len() => results,
                    Ok(results) => {
                        let e = Error::Internal(format!(
                            "node {leader} answered {} of {} parts",
                            results.len(),
                            shards.len()
                        ));
                        shards.iter().map(|_| Err(e.clone())).collect()
                    }
                    Err(e) => shards.iter().map(|_| Err(e.clone())).collect(),
                }
            }
        };
        // Parts refused before they were proposed go on to other replicas.
        let answers = parts.iter().zip(results).map(|((shard, part), result)| async move {
            let gid = GroupId(*shard);
            match result {
                Err(e) => (*shard, self.send_on(gid, e, leader, part).await),
                done => (*shard, done),
            }
        });
        futures::future::join_all(answers).await
    }

    /// Parts forwarded together by another node (`Raft.ForwardWrites`):
    /// each as [`Node::forwarded_write`], all at once, each answered on its own.
    pub async fn forwarded_writes(
        &self,
        parts: Vec<Part>,
        validated: u64,
    ) -> Result<Vec<Result<(WriteCounts, u64)>>> {
        if parts.len() > self.shards as usize {
            return Err(Error::invalid("parts", format!("{} parts for {} shards", parts.len(), self.shards)));
        }
        let writes = parts.into_iter().map(|(shard, events)| async move {
            if shard >= self.shards {
                return Err(Error::invalid(
                    "group",
                    format!("{shard} is not a shard (the cluster has {})", self.shards),
                ));
            }
            self.forwarded_write(GroupId(shard), events, validated).await
        });
        Ok(futures::future::join_all(writes).await)
    }

    /// A part forwarded by another node, validated there against schema
    /// version `validated`: proposed if this node leads the shard, else
    /// NOT_LEADER with the leader it knows (no second hop).
    pub async fn forwarded_write(
        &self,
        gid: GroupId,
        events: Vec<Event>,
        validated: u64,
    ) -> Result<(WriteCounts, u64)> {
        // Never the meta group (the registry holds its replica too), nor
        // an empty part, which the per-event check below would pass.
        if gid.0 >= self.shards {
            return Err(Error::invalid(
                "group",
                format!("{gid} is not a shard (the cluster has {})", self.shards),
            ));
        }
        if events.is_empty() {
            return Err(Error::invalid("events", "a forwarded part holds no event"));
        }
        let replica = self.replica(gid)?;
        if let Some((leader, addr)) = leader_elsewhere(&replica, self.id) {
            return Err(Error::NotLeader { leader_id: Some(leader), leader_addr: Some(addr), group: None });
        }
        if events.iter().any(|e| shard_of(&e.user_id, self.shards) != gid.0) {
            return Err(Error::invalid(
                "events",
                format!("a forwarded part holds users of shards other than {gid}"),
            ));
        }
        match self.propose_write(&replica, events, validated, Room::Now).await {
            Proposal::Done(result) => result,
            // One hop only: the sender goes on to the new leader.
            Proposal::Moved { leader, addr, .. } => {
                Err(Error::NotLeader { leader_id: Some(leader), leader_addr: Some(addr), group: None })
            }
        }
    }
}

/// A write refused against this node's view of the schema (its meta
/// replica's, version `seen`) while a shard replica here has applied a
/// newer one (`newest`): the view lags a schema change that has reached
/// the shards (ApplySchema returns once every shard applied it). If the
/// newer schema accepts the write, UNAVAILABLE, to be retried, rather than
/// an INVALID_ARGUMENT no client resends; else the newer schema's refusal.
/// `None` (the view's refusal stands) when no replica here is newer.
fn view_behind(seen: u64, newest: Option<&VersionedSchema>, events: &[Event], now: i64) -> Option<Error> {
    let newest = newest.filter(|n| n.version > seen)?;
    if let Err(e) = validate_request(events, &newest.schema, Some(now)) {
        return Some(e.into());
    }
    Some(Error::Unavailable(format!(
        "this node's view of the schema (version {seen}) is behind its shards' (version {}): a schema change \
         is still reaching it; retry",
        newest.version
    )))
}

/// What [`Node::propose_write`] did with a part.
enum Proposal {
    Done(Result<(WriteCounts, u64)>),
    /// Nothing was proposed: past the gate, another node leads the shard.
    Moved {
        events: Vec<Event>,
        leader: NodeId,
        addr: String,
    },
}

/// While the meta group has raised the cluster's apply rules version to
/// `cluster` and the shard applies by an older `shard`, nothing is proposed
/// in it but the new version (its leader proposes that within a moment):
/// every write then applies by the cluster's version, the one each node's
/// build was checked for (see `portrait_core::rules`).
pub(super) fn behind_rules(cluster: u32, shard: u32, gid: GroupId) -> Result<()> {
    // Reached only when the shard could not take the version at once (a
    // leadership change, no quorum): `Node::catch_up_rules` proposes it
    // before every write and restore step.
    if shard >= cluster {
        return Ok(());
    }
    Err(Error::Unavailable(format!(
        "{gid} applies by apply rules version {shard}, the cluster by {cluster}: it moves over within a moment; \
         nothing was written, {RETRY_LATER}"
    )))
}

/// During a schema rollout (the meta group committed version `newest`, a
/// shard applied only `applied`) a part validated against the new schema
/// may be one the shard's would refuse at apply. Such a part is not
/// proposed: UNAVAILABLE, retryable once the shard applied the new version.
/// Outside a rollout this is one comparison.
fn behind_schema(newest: u64, applied: &VersionedSchema, events: &[Event]) -> Result<()> {
    if applied.version >= newest {
        return Ok(());
    }
    validate_request(events, &applied.schema, None).map_err(|e| {
        Error::Unavailable(format!(
            "{}; the shard has not applied schema version {newest} yet (it has {}): nothing was written, \
             {RETRY_LATER}",
            Error::from(e),
            applied.version
        ))
    })
}

/// A forwarded part's NOT_FOUND: the node this one took for the shard's
/// leader no longer hosts it (its replica moved away while this node's view
/// was stale). Nothing was proposed, and the shard exists: UNAVAILABLE,
/// which clients retry, not NOT_FOUND, which they do not.
pub(super) fn moved_on(e: Error) -> Error {
    match e {
        Error::NotFound(m) => Error::Unavailable(format!("{m} (it moved away; retry)")),
        e => e,
    }
}

/// The leader of `replica`'s group and its address, if it is another node
/// whose address is known.
pub(super) fn leader_elsewhere(replica: &Replica, me: NodeId) -> Option<(NodeId, String)> {
    let m = replica.raft.metrics();
    let m = m.borrow();
    let leader = m.current_leader.filter(|l| *l != me)?;
    let addr = m.membership_config.membership().get_node(&leader)?.addr.clone();
    Some((leader, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_whose_outcome_is_unknown_fails_the_write_before_an_earlier_shard_s_refusal() {
        let refused = || Err(Error::FailedPrecondition("refused".into()));
        let unknown = || Err(Error::Unavailable(format!("no quorum; {OUTCOME_UNKNOWN}")));
        let unavailable = || Err(Error::Unavailable("no connection".into()));
        let results = |parts: Vec<(u32, Result<()>)>| parts.into_iter().collect::<BTreeMap<_, _>>();
        assert_eq!(failing_part(&results(vec![(0, Ok(())), (1, Ok(()))])), None);
        assert_eq!(failing_part(&results(vec![(0, Ok(())), (1, unavailable()), (2, refused())])), Some(1));
        assert_eq!(failing_part(&results(vec![(0, refused()), (3, unknown()), (5, unknown())])), Some(3));
        assert_eq!(failing_part(&results(vec![(1, unavailable()), (2, Ok(())), (4, unknown())])), Some(4));
    }

    #[test]
    fn a_refusal_by_a_schema_view_behind_the_shards_is_retryable_only_if_the_newer_schema_takes_it() {
        let now = 1_800_000_000_000;
        let event = |family: &str| Event {
            user_id: "u1".into(),
            family: family.into(),
            event_type: "view".into(),
            time_ms: now,
            event_id: String::new(),
            attrs: Default::default(),
        };
        let newer = VersionedSchema {
            version: 4,
            schema: crate::schema::Schema::parse("[families.shop]\nttl = \"1d\"\n").unwrap(),
        };
        let shop = [event("shop")];
        assert!(view_behind(4, Some(&newer), &shop, now).is_none(), "the view is the newest");
        assert!(view_behind(3, None, &shop, now).is_none(), "no replica here");
        let e = view_behind(3, Some(&newer), &shop, now).expect("behind");
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        assert!(e.to_string().contains("(version 3) is behind its shards' (version 4)"), "{e}");
        // What the newer schema refuses too gets that schema's error.
        let e = view_behind(3, Some(&newer), &[event("nope")], now).expect("refused");
        assert!(e.to_string().contains("unknown family \"nope\" (schema has: shop)"), "{e}");
    }

    #[test]
    fn a_forward_to_a_node_that_no_longer_hosts_the_shard_is_retryable() {
        let e = moved_on(Error::NotFound("node 2 hosts no replica of shard 5".into()));
        assert!(
            matches!(&e, Error::Unavailable(m) if m.starts_with("node 2 hosts no replica of shard 5")),
            "{e}"
        );
        assert!(
            matches!(moved_on(Error::invalid("f", "r")), Error::InvalidArgument { .. }),
            "others as they are"
        );
    }

    #[test]
    fn a_shard_behind_the_clusters_apply_rules_takes_no_write() {
        assert_eq!(behind_rules(1, 1, GroupId(3)), Ok(()));
        assert_eq!(behind_rules(1, 2, GroupId(3)), Ok(()));
        let e = behind_rules(2, 1, GroupId(3)).unwrap_err();
        assert!(
            matches!(&e, Error::Unavailable(m) if m.starts_with("shard 3 applies by apply rules version 1, the cluster by 2")),
            "{e:?}"
        );
    }

    #[test]
    fn a_shard_behind_a_schema_rollout_refuses_what_its_schema_would_refuse_at_apply() {
        let old = VersionedSchema::shared_default();
        let ok = Event {
            user_id: "u".into(),
            family: "browse".into(),
            time_ms: 1_750_000_000_000,
            ..Event::bare()
        };
        let unknown = Event { family: "app_usage".into(), ..ok.clone() };
        assert_eq!(
            behind_schema(old.version, &old, std::slice::from_ref(&unknown)),
            Ok(()),
            "no rollout: not checked"
        );
        assert_eq!(
            behind_schema(old.version + 1, &old, std::slice::from_ref(&ok)),
            Ok(()),
            "valid under both"
        );
        let e = behind_schema(old.version + 1, &old, &[ok, unknown]).unwrap_err();
        assert!(
            matches!(&e, Error::Unavailable(m) if m.starts_with("events[1].family: unknown family")
                && m.ends_with(&format!("has not applied schema version {} yet (it has {}): nothing was \
                    written, retry later", old.version + 1, old.version))),
            "{e}"
        );
        // The leader refused it for now: not sent to the shard's other
        // replicas (they would redirect back to it).
        assert!(e.leader_refused() && !e.outcome_unknown());
    }

    #[test]
    fn a_split_keeps_every_event_once_in_its_shard_and_in_order() {
        let events: Vec<Event> = (0..200)
            .map(|i| Event { user_id: format!("u{}", i % 37), event_id: format!("e{i}"), ..Event::bare() })
            .collect();
        let parts = split_by_shard(events.clone(), 4);
        assert!(parts.len() > 1, "37 users spread over 4 shards");
        let mut seen = 0;
        for (shard, (positions, part)) in &parts {
            assert!(part.iter().all(|e| shard_of(&e.user_id, 4) == *shard));
            let order: Vec<_> = events.iter().filter(|e| shard_of(&e.user_id, 4) == *shard).collect();
            assert_eq!(part.iter().collect::<Vec<_>>(), order);
            assert!(positions.iter().zip(part).all(|(&i, e)| events[i] == *e), "positions in the request");
            seen += part.len();
        }
        assert_eq!(seen, events.len());
        assert_eq!(split_by_shard(events, 1).len(), 1);
    }
}
