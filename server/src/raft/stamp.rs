//! Stamps for new entries: the node's guarded clock ([`crate::clock`]),
//! judged against the current voters and the replicated clock. Every
//! proposal that carries a time (writes, ticks, re-evaluation, schema
//! changes) takes its stamp here.

use std::sync::Arc;

use crate::clock::NodeClock;
use crate::error::{Error, Result};
use crate::store::GroupState;
use crate::types::{NodeId, Raft};

#[derive(Clone)]
pub struct Stamper {
    me: NodeId,
    raft: Raft,
    sm: Arc<GroupState>,
    clock: Arc<NodeClock>,
}

impl Stamper {
    pub fn new(me: NodeId, raft: Raft, sm: Arc<GroupState>, clock: Arc<NodeClock>) -> Stamper {
        Stamper { me, raft, sm, clock }
    }

    /// The stamp for an entry proposed now, or why it cannot be made.
    /// Fails closed: metrics trail the raft core, so a node that has just
    /// won an election may still read "not leader" here; its proposal
    /// would then be accepted with an unjudged stamp. So a node that does
    /// not see itself leading redirects to the leader it knows, without
    /// proposing, and one that knows no leader judges its clock as a
    /// leader would (a follower with a wrong clock still redirects writes
    /// like any follower).
    pub fn stamp(&self) -> Result<i64> {
        let (leader, voters, leader_addr) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let addr = m
                .current_leader
                .and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()));
            (m.current_leader, m.membership_config.membership().voter_ids().collect::<Vec<_>>(), addr)
        };
        match leader {
            Some(l) if l != self.me => Err(Error::NotLeader { leader_id: Some(l), leader_addr, group: None }),
            _ => {
                let replicated = self.sm.clock_ms();
                self.clock.stamp(self.me, &voters, replicated).map_err(|p| self.clock.error(p))
            }
        }
    }
}
