//! Whether this node may campaign: openraft has one switch
//! (`runtime_config().elect`), and more than one reason to turn it off: a
//! clock off its peers ([`crate::clock`]) and, in tests, fault injection.
//! Each reason has its own flag; the node campaigns only if none objects.
//!
//! With quiet idle groups ([`super::quiet`]) openraft's election timer is
//! off while the replica follows, since a leader at rest sends nothing to
//! renew it; the quiet task campaigns instead, when
//! [`ElectSwitch::may_campaign`] allows. A candidate (a campaign that has
//! not won yet, e.g. a split vote) gets the timer back: openraft's
//! randomized timeouts settle the election.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::types::Raft;

#[derive(Clone)]
pub struct ElectSwitch {
    raft: Raft,
    /// Whether openraft's own election timer may run (off for quiet
    /// groups but while campaigning).
    timer: Arc<AtomicBool>,
    clock_ok: Arc<AtomicBool>,
    faults_ok: Arc<AtomicBool>,
    /// Held while the flags are read and openraft's switch set: two
    /// callers changing different flags at once would otherwise set the
    /// switch in the other order than they read the flags, and the last
    /// word could be a stale one (the timer left on for a quiet follower,
    /// or campaigning allowed with the clock off).
    applying: Arc<std::sync::Mutex<()>>,
}

impl ElectSwitch {
    pub fn new(raft: Raft, timer: bool) -> ElectSwitch {
        let switch = ElectSwitch {
            raft,
            timer: Arc::new(AtomicBool::new(timer)),
            clock_ok: Arc::new(AtomicBool::new(true)),
            faults_ok: Arc::new(AtomicBool::new(true)),
            applying: Arc::default(),
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

    /// Lets openraft's election timer run or not (quiet groups: while a
    /// candidate).
    pub fn set_timer(&self, on: bool) {
        if self.timer.swap(on, Ordering::AcqRel) != on {
            self.apply();
        }
    }

    /// Whether no reason holds this node back from campaigning.
    pub fn may_campaign(&self) -> bool {
        self.clock_ok.load(Ordering::Acquire) && self.faults_ok.load(Ordering::Acquire)
    }

    fn apply(&self) {
        let _one = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        self.raft.runtime_config().elect(self.timer.load(Ordering::Acquire) && self.may_campaign());
    }
}
