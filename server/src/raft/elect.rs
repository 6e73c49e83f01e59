//! Whether this node may campaign: openraft has one switch
//! (`runtime_config().elect`), and more than one reason to turn it off: a
//! clock off its peers ([`crate::clock`]) and, in tests, fault injection.
//! Each reason has its own flag; the node campaigns only if none objects.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::types::Raft;

#[derive(Clone)]
pub struct ElectSwitch {
    raft: Raft,
    clock_ok: Arc<AtomicBool>,
    faults_ok: Arc<AtomicBool>,
}

impl ElectSwitch {
    pub fn new(raft: Raft) -> ElectSwitch {
        ElectSwitch {
            raft,
            clock_ok: Arc::new(AtomicBool::new(true)),
            faults_ok: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The clock guard's say; returns whether it changed.
    pub fn set_clock_ok(&self, ok: bool) -> bool {
        let changed = self.clock_ok.swap(ok, Ordering::AcqRel) != ok;
        self.apply();
        changed
    }

    /// Fault injection's say (tests).
    pub fn set_faults_ok(&self, ok: bool) {
        self.faults_ok.store(ok, Ordering::Release);
        self.apply();
    }

    fn apply(&self) {
        let on = self.clock_ok.load(Ordering::Acquire) && self.faults_ok.load(Ordering::Acquire);
        self.raft.runtime_config().elect(on);
    }
}
