//! Stamps for new entries: the node's guarded clock ([`crate::clock`]),
//! judged against the current voters and the replicated clock. Every
//! proposal that carries a time (writes, ticks, re-evaluation, schema
//! changes) takes its stamp here.

use std::sync::Arc;

use crate::clock::NodeClock;
use crate::error::Result;
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

    /// The stamp for an entry proposed now, or why the clock is refused.
    /// Only the leader's stamps reach the log: elsewhere the proposal is
    /// redirected anyway, so the clock is not judged there (a follower
    /// with a wrong clock redirects writes like any follower).
    pub fn stamp(&self) -> Result<i64> {
        let (leading, voters) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (
                m.current_leader == Some(self.me),
                m.membership_config.membership().voter_ids().collect::<Vec<_>>(),
            )
        };
        let replicated = self.sm.clock_ms();
        if !leading {
            return Ok(self.clock.now_ms().max(replicated));
        }
        self.clock.stamp(self.me, &voters, replicated).map_err(|p| self.clock.error(p))
    }
}
