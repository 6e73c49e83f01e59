//! Threads owned by a store: joined when the store's last handle drops, so
//! none outlives the database it works on. A thread must end by itself once
//! its owner is gone (its channel closes, or its work is bounded).

use std::sync::Mutex;
use std::thread::JoinHandle;

#[derive(Default)]
pub struct Joined {
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Joined {
    /// Starts a named thread owned by this set.
    pub fn spawn(&self, name: &str, work: impl FnOnce() + Send + 'static) {
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(work)
            .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"));
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn dropping_the_owner_waits_for_its_threads() {
        let done = Arc::new(AtomicBool::new(false));
        let joined = Joined::default();
        let flag = done.clone();
        joined.spawn("test", move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            flag.store(true, Ordering::SeqCst);
        });
        drop(joined);
        assert!(done.load(Ordering::SeqCst));
    }
}
