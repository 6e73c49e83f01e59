//! The fsync audit, compiled into unit tests only: RocksDB's own count of
//! WAL syncs (the `rocksdb.wal.synced` ticker) is read when an append or a
//! vote is written to the raft log and again when it is reported durable
//! (an append's `log_io_completed`, `save_vote` returning); a report with no
//! sync in between is recorded as a violation, which the log store's audit
//! test asserts never happens. One audit per log engine: a sync of its
//! WAL covers the writes of every raft group in it. Removing the `flush_wal(true)` or the vote's
//! `set_sync(true)` fails it (rust-rocksdb has no fault-injecting file
//! system to test durability directly).

pub use imp::*;

#[cfg(test)]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use rocksdb::statistics::Ticker;
    use rocksdb::Options;

    /// The sync count when something was written.
    pub type Mark = u64;

    /// Reports checked, and the ones that no sync covered.
    pub static CHECKED: AtomicU64 = AtomicU64::new(0);
    pub static VIOLATIONS: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// The statistics of one RocksDB instance (shared with it by the options).
    #[derive(Clone)]
    pub struct Audit(Arc<Options>);

    impl Audit {
        pub fn new(opts: &mut Options) -> Audit {
            opts.enable_statistics();
            Audit(Arc::new(opts.clone()))
        }

        pub fn mark(&self) -> Mark {
            self.0.get_ticker_count(Ticker::WalFileSynced)
        }

        /// Something written at `written` is being reported durable.
        pub fn acknowledged(&self, written: Mark, what: &str) {
            CHECKED.fetch_add(1, Ordering::SeqCst);
            let now = self.mark();
            if now <= written {
                let v =
                    format!("{what} reported durable with no WAL sync since it was written (syncs: {now})");
                VIOLATIONS.lock().expect("audit lock").push(v);
            }
        }
    }
}

/// Outside unit tests the audit compiles to nothing.
#[cfg(not(test))]
mod imp {
    #[derive(Clone, Copy)]
    pub struct Mark;

    #[derive(Clone)]
    pub struct Audit;

    impl Audit {
        pub fn new(_: &mut rocksdb::Options) -> Audit {
            Audit
        }

        pub fn mark(&self) -> Mark {
            Mark
        }

        pub fn acknowledged(&self, _: Mark, _: &str) {}
    }
}
