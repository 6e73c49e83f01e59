//! The proposal gate: lets a leadership transfer stop this node from
//! proposing raft entries for a moment.
//!
//! A transfer can only succeed while the leader sends nothing: every
//! AppendEntries (an entry, a commit index, a heartbeat) renews the
//! followers' leader lease, and a follower whose lease holds refuses to vote
//! (see [`super::transfer`]). So every path that makes the leader send
//! holds a [`Pass`] while it is in flight: writes, schema and membership
//! changes, the ticker's `Tick` and `Reevaluate` entries, and linearizable
//! reads (openraft confirms leadership with a round of AppendEntries). A
//! transfer takes the [`Pause`]: it waits for the passes in flight to be
//! released, and new passes wait until the pause ends.
//!
//! Callers **wait** rather than fail fast: a write that arrives during a
//! transfer waits at most its own deadline (the write timeout), and once the
//! pause ends it goes on, usually to a node that is no longer the leader and
//! answers with the usual redirect to the new one. Clients see a latency
//! spike of about one leader lease, not an error.
//!
//! Being the one door to the log, the gate also wakes a group at rest
//! ([`super::quiet`]): a pass turns the group's heartbeats back on before
//! its holder proposes, and the group counts as busy while a pass is held.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use super::quiet::{HeartbeatSwitch, Proposing};
use crate::error::{Error, Result};

/// Shared by the node, the ticker and the transfer.
#[derive(Clone, Default)]
pub struct ProposalGate {
    // tokio's RwLock is fair: once a pause waits, new passes queue behind it.
    lock: Arc<RwLock<()>>,
    /// The group's heartbeats, woken by every pass (none in unit tests).
    heartbeats: Option<Arc<HeartbeatSwitch>>,
}

/// Held by a proposal while it is in flight.
#[must_use = "the pass only counts while it is held"]
pub struct Pass {
    _guard: OwnedRwLockReadGuard<()>,
    _proposing: Option<Proposing>,
}

/// Held by a leadership transfer; proposals resume when it drops.
#[must_use = "proposals resume as soon as the pause is dropped"]
pub struct Pause {
    _guard: OwnedRwLockWriteGuard<()>,
}

impl ProposalGate {
    /// The gate of a group whose heartbeats are `heartbeats`.
    pub fn new(heartbeats: Arc<HeartbeatSwitch>) -> ProposalGate {
        ProposalGate { lock: Arc::default(), heartbeats: Some(heartbeats) }
    }

    fn pass_with(&self, guard: OwnedRwLockReadGuard<()>) -> Pass {
        Pass { _guard: guard, _proposing: self.heartbeats.as_ref().map(|h| h.proposing()) }
    }

    /// Waits (at most `within`) until no transfer holds proposals off.
    /// On timeout nothing was proposed, so the caller may retry safely.
    pub async fn pass(&self, within: Duration) -> Result<Pass> {
        match tokio::time::timeout(within, self.lock.clone().read_owned()).await {
            Ok(guard) => Ok(self.pass_with(guard)),
            Err(_) => Err(Error::Unavailable(format!(
                "leadership transfer in progress: not proposed within {} ms; nothing was written, retry",
                within.as_millis()
            ))),
        }
    }

    /// A pass if no transfer is running or waiting; for background work
    /// (ticks) that can simply try again next round.
    pub fn try_pass(&self) -> Option<Pass> {
        self.lock.clone().try_read_owned().ok().map(|guard| self.pass_with(guard))
    }

    /// Holds new proposals off and waits (at most `within`) until the ones
    /// in flight are done.
    pub async fn pause(&self, within: Duration) -> Result<Pause> {
        match tokio::time::timeout(within, self.lock.clone().write_owned()).await {
            Ok(guard) => Ok(Pause { _guard: guard }),
            Err(_) => Err(Error::Unavailable(format!(
                "proposals in flight did not finish within {} ms (no quorum? a membership change \
                 running?); leadership was not transferred",
                within.as_millis()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pause_waits_for_passes_and_holds_new_ones() {
        let gate = ProposalGate::default();
        let pass = gate.pass(Duration::from_millis(10)).await.unwrap();
        assert!(gate.pause(Duration::from_millis(20)).await.is_err(), "a pass is in flight");
        drop(pass);
        let pause = gate.pause(Duration::from_millis(20)).await.unwrap();
        assert!(gate.try_pass().is_none());
        let waited = gate.pass(Duration::from_millis(20)).await;
        assert!(matches!(waited, Err(Error::Unavailable(m)) if m.contains("nothing was written")));
        drop(pause);
        assert!(gate.try_pass().is_some());
    }

    #[tokio::test]
    async fn a_waiting_pass_goes_on_when_the_pause_ends() {
        let gate = ProposalGate::default();
        let pause = gate.pause(Duration::from_millis(10)).await.unwrap();
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.pass(Duration::from_secs(5)).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(pause);
        assert!(waiter.await.unwrap());
    }
}
