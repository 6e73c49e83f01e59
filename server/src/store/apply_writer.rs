//! What every group's apply shares on a node: the thread that writes
//! applied batches ([`ApplyWriter`]) and the apply cache budget
//! ([`CacheBudget`]). Neither grows with the number of groups.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use rocksdb::{WriteBatch, DB};

use super::group::{AppliedState, GroupState};
use super::sm_db::apply_write_options;

/// A sealed batch of one group's entry, to write in order.
pub(crate) struct WriteJob {
    pub batch: WriteBatch,
    pub group: Arc<GroupState>,
    /// The group's applied state once the batch is written.
    pub state: AppliedState,
    /// Where the outcome goes (the group's applier waits on it).
    pub done: mpsc::Sender<Result<(), String>>,
}

/// The node's apply writer thread: writes the batches of every group in
/// the order they were submitted. A group's applier has at most one batch
/// in flight (it computes its next entry meanwhile), so batches of one
/// group are written in log order. Dropping it waits for the thread.
pub struct ApplyWriter {
    jobs: Option<mpsc::Sender<WriteJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApplyWriter {
    pub(crate) fn start(db: Arc<DB>) -> ApplyWriter {
        let (jobs, job_rx) = mpsc::channel::<WriteJob>();
        let thread = std::thread::Builder::new()
            .name("apply-write".into())
            .spawn(move || {
                for WriteJob { batch, group, state, done } in job_rx {
                    let result = db.write_opt(batch, &apply_write_options()).map_err(|e| e.to_string());
                    match &result {
                        Ok(()) => group.set_applied(state),
                        Err(e) => group.set_write_failure(e.clone()),
                    }
                    // Before the reply: the applier may drop the last other
                    // handle once it has it, and the state database must not
                    // be dropped on this thread.
                    drop(group);
                    let _ = done.send(result);
                }
            })
            .expect("start the apply writer thread");
        ApplyWriter { jobs: Some(jobs), thread: Some(thread) }
    }

    /// Queues a batch; `Err` if the thread has stopped.
    pub(crate) fn submit(&self, job: WriteJob) -> Result<(), String> {
        let jobs = self.jobs.as_ref().expect("open until dropped");
        jobs.send(job).map_err(|_| "the apply writer thread stopped".to_string())
    }
}

impl Drop for ApplyWriter {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            // Never join itself (the last handle dropped on the writer).
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// The apply cache budget of the node, in users and family records and in
/// their encoded bytes: each group's cache keeps at most an equal share of
/// both, so 64 groups keep what one did.
///
/// An entry trims its group's cache to the share before it adds its own
/// users, and keeps them for the next entry (whose apply may read them
/// while this one's batch is still being written): a group may hold its
/// share plus one entry's users. The bytes every cache holds are summed
/// here, so that once they pass the node's budget, a group past its share
/// waits for its batch and trims ([`CacheBudget::over`]): the node holds
/// its budget plus the entries being applied at that moment, not one
/// entry's users per group.
#[derive(Debug)]
pub struct CacheBudget {
    entries: usize,
    bytes: usize,
    caches: AtomicUsize,
    /// Encoded bytes held by all caches, as each last reported them.
    held: AtomicUsize,
}

impl CacheBudget {
    pub fn new(entries: usize, bytes: usize) -> CacheBudget {
        CacheBudget { entries, bytes, caches: AtomicUsize::new(0), held: AtomicUsize::new(0) }
    }

    /// A cache that held `before` bytes now holds `after`.
    pub(crate) fn held(&self, before: usize, after: usize) {
        if after >= before {
            self.held.fetch_add(after - before, Ordering::AcqRel);
        } else {
            self.held.fetch_sub(before - after, Ordering::AcqRel);
        }
    }

    /// Whether the caches together hold more encoded bytes than the budget.
    pub(crate) fn over(&self) -> bool {
        self.held.load(Ordering::Acquire) > self.bytes
    }

    /// The share of one cache in entries (of the caches that exist now).
    pub fn share(&self) -> usize {
        self.entries / self.caches.load(Ordering::Acquire).max(1)
    }

    /// The share of one cache in encoded bytes.
    pub fn byte_share(&self) -> usize {
        self.bytes / self.caches.load(Ordering::Acquire).max(1)
    }

    pub(crate) fn join(&self) {
        self.caches.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn leave(&self) {
        self.caches.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_not_multiplied() {
        let budget = CacheBudget::new(100_000, 64 << 20);
        assert_eq!(budget.share(), 100_000);
        for _ in 0..64 {
            budget.join();
        }
        assert_eq!(budget.share() * 64, 100_000 - 100_000 % 64);
        assert_eq!(budget.byte_share(), 1 << 20);
        budget.leave();
        assert_eq!(budget.share(), 100_000 / 63);
    }

    #[test]
    fn the_budget_sums_what_the_caches_hold() {
        let budget = CacheBudget::new(100, 1000);
        budget.held(0, 600);
        budget.held(0, 400);
        assert!(!budget.over(), "1,000 bytes: at the budget, not past it");
        budget.held(400, 401);
        assert!(budget.over());
        budget.held(600, 0);
        assert!(!budget.over());
        assert_eq!(budget.held.load(Ordering::Acquire), 401);
    }
}
