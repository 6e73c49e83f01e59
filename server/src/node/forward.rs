//! One-hop calls to other nodes for a shard's part of a client request:
//! `Raft.ForwardWrite` to the shard's leader, `Raft.ForwardRead` to a node
//! hosting a replica. The receiver serves the part itself or answers with
//! a redirect; it never forwards again, so a part takes at most one hop per
//! node tried and a stale view cannot make nodes bounce it between them.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;

use portrait_proto::v1::RaftPayload;

use super::write::leader_elsewhere;
use super::Node;
use crate::error::{Error, Result, OUTCOME_UNKNOWN};
use crate::raft::batcher::Room;
use crate::raft::network::refused_by_peer;
use crate::service::status::{error_from_status, ERROR_CODE_KEY};
use crate::types::{GroupId, NodeId};

/// Which internal call carries a forwarded part.
#[derive(Debug, Clone, Copy)]
pub(super) enum Forward {
    Write,
    /// Several shards' write parts in one call (`Raft.ForwardWrites`).
    Writes,
    Read,
}

/// The node that last served a forwarded part of a shard this node hosts
/// no replica of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Heard {
    pub node: NodeId,
    /// It served a write or a LINEARIZABLE read (only a leader does), or
    /// it was that leader and served a LOCAL read since. A follower that
    /// served a LOCAL read is tried first next time (it answers), but the
    /// shard map this node gives clients does not name it as the leader.
    pub leads: bool,
}

impl Node {
    /// Where `gid`'s leader may be: the one this node's replica follows, or
    /// else the node last heard of, then the map's replicas of the shard,
    /// with their peer addresses.
    pub(super) fn route(&self, gid: GroupId) -> Vec<(NodeId, String)> {
        let cluster = self.cluster();
        let Some(map) = cluster.map.as_ref() else { return vec![] };
        let followed = self.registry.get(gid).and_then(|r| leader_elsewhere(&r, self.id)).map(|(n, _)| n);
        let known = followed.or_else(|| self.leaders.lock().expect("leaders lock").get(&gid).map(|h| h.node));
        let replicas = map.replicas.get(gid.0 as usize).cloned().unwrap_or_default();
        known
            .into_iter()
            .chain(replicas)
            .filter_map(|n| map.nodes.get(&n).map(|e| (n, e.peer_addr.clone())))
            .collect()
    }

    /// Runs `call` against the nodes [`Node::route`] names for `gid`, each
    /// at most once, a redirect's leader first, until one serves it or a
    /// write's outcome is unknown ([`Error::outcome_unknown`]: another node
    /// could apply it a second time). The
    /// node that served is the one tried first next time ([`Heard`]);
    /// `leads`: only the shard's leader serves this call (a write, a
    /// LINEARIZABLE read).
    pub(super) async fn to_replicas<T, F, Fut>(&self, gid: GroupId, leads: bool, call: F) -> Result<T>
    where
        F: Fn(NodeId, String) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let none = Error::Unavailable(format!("the map names no replica of {gid}"));
        self.to_replicas_after(gid, None, None, none, leads, call).await
    }

    /// [`Node::to_replicas`], trying `first` before the others and never
    /// node `tried` (it already failed); `none` is the error when no node
    /// is left to try.
    pub(super) async fn to_replicas_after<T, F, Fut>(
        &self,
        gid: GroupId,
        first: Option<(NodeId, String)>,
        tried: Option<NodeId>,
        none: Error,
        leads: bool,
        call: F,
    ) -> Result<T>
    where
        F: Fn(NodeId, String) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut candidates: VecDeque<(NodeId, String)> = first.into_iter().chain(self.route(gid)).collect();
        let mut tried: BTreeSet<NodeId> = tried.into_iter().collect();
        let mut last = none;
        while let Some((node, addr)) = candidates.pop_front() {
            if !tried.insert(node) {
                continue;
            }
            match call(node, addr).await {
                Ok(done) => {
                    let mut heard = self.leaders.lock().expect("leaders lock");
                    let led = heard.get(&gid).is_some_and(|h| h.node == node && h.leads);
                    heard.insert(gid, Heard { node, leads: leads || led });
                    return Ok(done);
                }
                // A redirect to a node tried already says less than what
                // that node answered: kept as it was.
                Err(Error::NotLeader { leader_id: Some(l), .. }) if tried.contains(&l) => {}
                Err(Error::NotLeader { leader_id: Some(l), leader_addr: Some(a), group }) => {
                    candidates.push_front((l, a.clone()));
                    last = Error::NotLeader { leader_id: Some(l), leader_addr: Some(a), group };
                }
                Err(e) if e.outcome_unknown() || e.leader_refused() => return Err(e),
                Err(e @ (Error::NotFound(_) | Error::Unavailable(_) | Error::NotLeader { .. })) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Sends one shard's encoded part to node `to` at `addr` and returns
    /// its encoded reply. The receiver's own errors come back as they are
    /// (a redirect stays a redirect); a transport failure is UNAVAILABLE
    /// naming the node, and drops the cached channel.
    pub(super) async fn call_peer(
        &self,
        kind: Forward,
        gid: GroupId,
        to: NodeId,
        addr: &str,
        data: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let unreachable =
            |e: &dyn std::fmt::Display| Error::Unavailable(format!("forwarding to node {to} at {addr}: {e}"));
        let write = matches!(kind, Forward::Write | Forward::Writes);
        // A write part held here while another node proposes it counts
        // against this node's queued-write budget too.
        let _held = match write {
            true => Some(self.batcher.hold(data.len(), Room::Wait).await?),
            false => None,
        };
        let mut client = self.channels.get(to, addr).map_err(|e| unreachable(&e))?;
        // A write part, or a read's selection, was validated against this
        // node's schema: the receiver holds a write back while its shard is
        // behind that version, and sends a read that needs it elsewhere.
        let schema_version = self.schema().version;
        let mut request =
            tonic::Request::new(RaftPayload { data, group: gid.0, schema_version, ..Default::default() });
        // The receiver may hold a write at a leadership transfer's gate,
        // then for its proposal, each up to the write timeout, after at
        // most a second bringing its shard to the cluster's apply rules: a
        // shorter deadline would call outcomes unknown that are not.
        let waits = if write { 2 } else { 1 };
        request.set_timeout(self.write_timeout * waits + std::time::Duration::from_secs(2));
        let reply = match kind {
            Forward::Write => client.forward_write(request).await,
            Forward::Writes => client.forward_writes(request).await,
            Forward::Read => client.forward_read(request).await,
        };
        match reply {
            Ok(reply) => Ok(reply.into_inner().data),
            Err(status) if status.metadata().contains_key(ERROR_CODE_KEY) => Err(error_from_status(&status)),
            // Refused before the receiver's handler ran (its peer-port
            // checks, a request it cannot decode, a build without the
            // call): nothing was proposed, and the connection, which the
            // raft groups share, works.
            Err(status) if refused_by_peer(status.code()) => {
                Err(Error::Unavailable(format!("forwarding to node {to} at {addr}: refused: {status}")))
            }
            Err(status) => {
                self.channels.reset(to, addr);
                Err(transport_error(write, to, addr, &status))
            }
        }
    }
}

/// A forwarded call that failed in transport. A connection never made
/// (`portrait_proto::never_sent`) is "not delivered"; any other failure
/// (the deadline passed, the stream broke, a keep-alive timeout, which
/// tonic reports as UNAVAILABLE too) may have come after the receiver
/// proposed a write, so a write's outcome is then unknown.
fn transport_error(write: bool, to: NodeId, addr: &str, status: &tonic::Status) -> Error {
    use std::error::Error as _;
    let not_delivered = portrait_proto::never_sent(status)
        || (status.code() == tonic::Code::Unavailable && status.source().is_none());
    let unknown = write && !not_delivered;
    let outcome =
        if unknown { format!("; {OUTCOME_UNKNOWN}: retry with the same event_ids") } else { String::new() };
    Error::Unavailable(format!("forwarding to node {to} at {addr}: {status}{outcome}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_lost_after_it_may_have_been_delivered_has_an_unknown_outcome() {
        let refused = tonic::Status::unavailable("tcp connect error");
        let late = tonic::Status::deadline_exceeded("timeout expired");
        let broken = tonic::Status::unknown("stream reset");
        // hyper fails a call in flight whose connection's keep-alive ping
        // timed out; tonic makes it UNAVAILABLE, with the error as source.
        let mut silent = tonic::Status::unavailable("transport error");
        silent.set_source(std::sync::Arc::new(std::io::Error::other("keep-alive timed out")));
        assert!(transport_error(true, 2, "n2:7800", &silent).outcome_unknown(), "may have been delivered");
        let mut refused_by_os = tonic::Status::unavailable("transport error");
        let os = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        refused_by_os.set_source(std::sync::Arc::new(os));
        assert!(!transport_error(true, 2, "n2:7800", &refused_by_os).outcome_unknown(), "never delivered");
        assert!(!transport_error(true, 2, "n2:7800", &refused).outcome_unknown(), "never delivered");
        assert!(transport_error(true, 2, "n2:7800", &late).outcome_unknown());
        assert!(transport_error(true, 2, "n2:7800", &broken).outcome_unknown());
        assert!(!transport_error(false, 2, "n2:7800", &late).outcome_unknown(), "a read changes nothing");
        // Refusals by the receiver's service are told apart before
        // `transport_error` (nothing was proposed): see `refused_by_peer`.
        assert!(refused_by_peer(tonic::Code::Unimplemented) && !refused_by_peer(tonic::Code::Unknown));
        let e = transport_error(true, 2, "n2:7800", &late);
        assert!(matches!(&e, Error::Unavailable(m) if m.contains("node 2")), "{e}");
    }
}
