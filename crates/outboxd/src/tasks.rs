//! Background tasks, tracked so that whoever spawned them joins them before it returns.
//!
//! Every task outboxd spawns goes through a [`Tasks`]: `outboxd run`'s own (the HTTP server,
//! pruning, the signal handler, the broker probe, the progress line) and each replication
//! session's (the dispatcher, the retention watch, a failpoint's watcher). The owner tells its
//! tasks to stop (each watches a cancellation token) and then calls [`Tasks::join`]: the tasks
//! get a bounded time to end on their own, and whatever still runs after it is aborted and
//! named in the log. So nothing outlives its owner, and shutdown never hangs on a task.
//!
//! This is `tokio_util::task::TaskTracker` plus the abort handles; it is built on tokio alone
//! because the crate's tokio-util is compiled without its `rt` feature.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};

/// How long [`Tasks::join`] waits for aborted tasks to be dropped.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// A set of spawned tasks that one owner joins. Clones share the set.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Tasks whose future has not been dropped yet (finished, or aborted and dropped).
    running: AtomicUsize,
    /// Woken when `running` drops to zero.
    idle: Notify,
    /// What to abort when a task does not stop in time, with the task's name for the log.
    /// Finished tasks are pruned at each spawn.
    handles: Mutex<Vec<(&'static str, AbortHandle)>>,
}

/// Held by a task's future: counts it as running until the future is dropped.
struct Running(Arc<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
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
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(self.inner.clone());
        let handle = tokio::spawn(async move {
            let _running = running;
            task.await
        });
        let mut handles = self.handles();
        handles.retain(|(_, h)| !h.is_finished());
        handles.push((name, handle.abort_handle()));
        handle
    }

    /// Tasks spawned and not yet ended.
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Waits up to `within` for every task to end, then aborts the ones still running and
    /// waits (briefly) for them to be dropped. Returns the names of the aborted tasks.
    pub async fn join(&self, within: Duration) -> Vec<&'static str> {
        if tokio::time::timeout(within, self.idle()).await.is_ok() {
            return Vec::new();
        }
        let handles = std::mem::take(&mut *self.handles());
        let mut aborted = Vec::new();
        for (name, handle) in handles {
            if !handle.is_finished() {
                handle.abort();
                aborted.push(name);
            }
        }
        tracing::warn!(
            tasks = %aborted.join(", "),
            waited_ms = within.as_millis() as u64,
            "background tasks did not stop in time; aborted"
        );
        // An aborted task is dropped at its next turn on the runtime.
        let _ = tokio::time::timeout(ABORT_GRACE, self.idle()).await;
        aborted
    }

    /// Resolves once no task runs.
    async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so that the last task ending in between wakes it.
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, AbortHandle)>> {
        self.inner
            .handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
