//! Background tasks, tracked so that whoever spawned them joins them before it returns.
//!
//! Every task outboxd spawns goes through a [`Tasks`]: `outboxd run`'s own (the HTTP server,
//! pruning, the signal handler, the broker probe, the progress line) and each replication
//! session's (the dispatcher, the retention watch, a failpoint's watcher). The owner tells its
//! tasks to stop (each watches a cancellation token) and then calls [`Tasks::join`]: the tasks
//! get a bounded time to end on their own, and whatever still runs after it is aborted and
//! named in the log. So nothing outlives its owner, and shutdown never hangs on a task.
//!
//! A `tokio_util::task::TaskTracker` counts the tasks; the abort handles, with the tasks'
//! names, are what it adds.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::task::TaskTracker;

/// How long [`Tasks::join`] waits for aborted tasks to be dropped.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// A set of spawned tasks that one owner joins. Clones share the set.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    /// What to abort when a task does not stop in time, with the task's name for the log.
    /// Finished tasks are pruned at each spawn.
    handles: Arc<Mutex<Vec<(&'static str, AbortHandle)>>>,
}

impl Tasks {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task`, named `name` in the log if it has to be aborted.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = self.tracker.spawn(task);
        let mut handles = self.handles();
        handles.retain(|(_, h)| !h.is_finished());
        handles.push((name, handle.abort_handle()));
        handle
    }

    /// Tasks spawned and not yet ended (their future not yet dropped).
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Waits up to `within` for every task to end, then aborts the ones still running and
    /// waits (briefly) for them to be dropped. Returns the names of the aborted tasks. Tasks
    /// may be spawned again afterwards.
    pub async fn join(&self, within: Duration) -> Vec<&'static str> {
        self.tracker.close();
        let mut aborted = Vec::new();
        if tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_err()
        {
            for (name, handle) in std::mem::take(&mut *self.handles()) {
                if !handle.is_finished() {
                    handle.abort();
                    aborted.push(name);
                }
            }
            tracing::warn!(
                tasks = %aborted.join(", "),
                waited_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX),
                "background tasks did not stop in time; aborted"
            );
            // An aborted task is dropped at its next turn on the runtime.
            let _ = tokio::time::timeout(ABORT_GRACE, self.tracker.wait()).await;
        }
        self.tracker.reopen();
        aborted
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, AbortHandle)>> {
        self.handles.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// Sets its flag when dropped: a task's state was released.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_that_stop_when_told_are_joined_without_aborting() {
        let tasks = Tasks::new();
        let stop = CancellationToken::new();
        for _ in 0..3 {
            let stop = stop.clone();
            tasks.spawn("polite", async move {
                stop.cancelled().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
        assert_eq!(tasks.running(), 3);
        stop.cancel();
        let started = tokio::time::Instant::now();
        assert!(tasks.join(Duration::from_secs(5)).await.is_empty());
        assert_eq!(tasks.running(), 0);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_does_not_stop_is_aborted_after_the_bound() {
        let tasks = Tasks::new();
        let released = Arc::new(AtomicBool::new(false));
        let state = Dropped(released.clone());
        tasks.spawn("done", async {});
        tasks.spawn("stubborn", async move {
            let _state = state;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        assert_eq!(tasks.join(Duration::from_secs(2)).await, ["stubborn"]);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(tasks.running(), 0, "nothing outlives join");
        assert!(released.load(Ordering::SeqCst));
    }
}
