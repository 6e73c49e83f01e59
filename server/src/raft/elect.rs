//! Whether this node may campaign: openraft has one switch
//! (`runtime_config().elect`), and more than one reason to turn it off: a
//! clock off its peers ([`crate::clock`]) and, in tests, fault injection.
//! Each reason has its own flag; the node campaigns only if none objects.
//!
//! With quiet idle groups ([`super::quiet`]) openraft's election timer is
//! always off, since a leader at rest sends nothing to renew it; the quiet
//! task campaigns instead, when [`ElectSwitch::may_campaign`] allows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::types::Raft;

#[derive(Clone)]
pub struct ElectSwitch {
    raft: Raft,
    /// Whether openraft's own election timer may run (off for quiet groups).
    timer: bool,
    clock_ok: Arc<AtomicBool>,
    faults_ok: Arc<AtomicBool>,
}

impl ElectSwitch {
    pub fn new(raft: Raft, timer: bool) -> ElectSwitch {
        let switch = ElectSwitch {
            raft,
            timer,
            clock_ok: Arc::new(AtomicBool::new(true)),
            faults_ok: Arc::new(AtomicBool::new(true)),
        };
        switch.apply();
        switch
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

    /// Whether no reason holds this node back from campaigning.
    pub fn may_campaign(&self) -> bool {
        self.clock_ok.load(Ordering::Acquire) && self.faults_ok.load(Ordering::Acquire)
    }

    fn apply(&self) {
        self.raft.runtime_config().elect(self.timer && self.may_campaign());
    }
}
