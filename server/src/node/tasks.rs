//! Background tasks owned by the node: each gets a stop signal when it is
//! spawned, and [`Tasks::stop`] raises it and waits for every task to end,
//! so nothing outlives the node or races its shutdown.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A task that has not ended this long after the stop signal is aborted.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct Tasks {
    stop: watch::Sender<bool>,
    running: Mutex<Vec<(&'static str, JoinHandle<()>)>>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks { stop: watch::Sender::new(false), running: Mutex::default() }
    }
}

impl Tasks {
    /// Spawns `task(stop)`; the task must return soon after `stop` turns true.
    pub fn spawn<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task(self.stop.subscribe()));
        self.running.lock().expect("tasks lock").push((name, handle));
    }

    /// Signals every task to stop and waits for them (aborting one that
    /// does not end within the grace period).
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let running = std::mem::take(&mut *self.running.lock().expect("tasks lock"));
        for (name, mut handle) in running {
            if tokio::time::timeout(STOP_GRACE, &mut handle).await.is_err() {
                tracing::warn!(task = name, "did not stop in time; aborted");
                handle.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_waits_for_every_task() {
        let tasks = Tasks::default();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let done = done_tx.clone();
            tasks.spawn("test", move |mut stop| async move {
                let _ = stop.wait_for(|s| *s).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                done.send(i).unwrap();
            });
        }
        drop(done_tx);
        tasks.stop().await;
        let mut ended = Vec::new();
        while let Ok(i) = done_rx.try_recv() {
            ended.push(i);
        }
        ended.sort();
        assert_eq!(ended, [0, 1, 2], "every task ended before stop returned");
    }
}
