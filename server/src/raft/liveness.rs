//! Which peer nodes answer, for the whole node: the clock probe records
//! every answer to `Raft.Clock` here, with the peer's boot id, and quiet
//! groups' followers read it to tell whether their leader's node is alive
//! or restarted ([`super::quiet`]). One record per peer node, whatever the
//! number of groups.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// A random number chosen when this process started (never 0, which an
/// older peer answers): a peer that sees it change knows this node
/// restarted.
pub fn boot_id() -> u64 {
    static BOOT_ID: OnceLock<u64> = OnceLock::new();
    *BOOT_ID.get_or_init(|| rand::random::<u64>().max(1))
}

/// What the probe last heard from one peer node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLife {
    /// The peer's boot id (0: it does not send one).
    pub boot_id: u64,
    /// When it last answered.
    pub answered: Instant,
    /// Its first answer with this boot id: when it came up, as far as this
    /// node can tell.
    pub up_since: Instant,
}

/// Every peer node's last answer.
#[derive(Debug)]
pub struct Liveness {
    /// Before this, no peer could have answered.
    started: Instant,
    peers: Mutex<BTreeMap<NodeId, PeerLife>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness { started: Instant::now(), peers: Mutex::default() }
    }
}

impl Liveness {
    /// `peer` answered at `at`, running with `boot_id`.
    pub fn answered(&self, peer: NodeId, boot_id: u64, at: Instant) {
        let mut peers = self.peers.lock().expect("liveness lock");
        let life = peers.entry(peer).or_insert(PeerLife { boot_id, answered: at, up_since: at });
        if life.boot_id != boot_id {
            *life = PeerLife { boot_id, answered: at, up_since: at };
        }
        life.answered = life.answered.max(at);
    }

    /// What `peer` last answered, if it ever did.
    pub fn peer(&self, peer: NodeId) -> Option<PeerLife> {
        self.peers.lock().expect("liveness lock").get(&peer).copied()
    }

    /// How long `peer` has not answered as of `now` (since this node
    /// started, if it never did).
    pub fn silent_for(&self, peer: NodeId, now: Instant) -> Duration {
        let last = self.peer(peer).map_or(self.started, |p| p.answered);
        now.saturating_duration_since(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_boot_id_starts_a_new_life() {
        let live = Liveness::default();
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);
        assert!(live.peer(2).is_none());
        assert!(live.silent_for(2, later(300)) >= Duration::from_millis(300));
        live.answered(2, 7, later(10));
        live.answered(2, 7, later(20));
        assert_eq!(live.peer(2), Some(PeerLife { boot_id: 7, answered: later(20), up_since: later(10) }));
        assert_eq!(live.silent_for(2, later(120)), Duration::from_millis(100));
        live.answered(2, 8, later(30));
        assert_eq!(live.peer(2).unwrap().up_since, later(30));
    }

    #[test]
    fn the_boot_id_is_never_zero_and_stays() {
        assert_ne!(boot_id(), 0);
        assert_eq!(boot_id(), boot_id());
    }
}
