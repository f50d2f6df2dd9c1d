//! The live status of a running outboxd, shared by the pipeline, the readiness probe, the
//! HTTP endpoints and the progress display.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use outboxd_core::{Lsn, WalHorizon};

/// What `/readyz` and the progress display read. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Status {
    /// A replication session is streaming the slot.
    streaming: AtomicBool,
    /// The broker answered the last probe or batch.
    broker_ok: AtomicBool,
    /// Why the broker refuses the stream (an ACL, a missing topic), while it does: set by the
    /// dispatcher on a refused batch, cleared by an accepted one. A ping still answers then.
    refused: Mutex<Option<String>>,
    /// Why the session is connected and not advancing, while it is (`crate::stall`).
    stalled: Mutex<Option<String>>,
    /// The server's current WAL position (read every few seconds, and from keepalives), for
    /// the backlog.
    server_wal_end: WalHorizon,
}

impl Status {
    /// Whether outboxd is ready: streaming, the broker answers and takes the events.
    pub fn ready(&self) -> Result<(), String> {
        if !self.streaming.load(Ordering::Relaxed) {
            return Err("not streaming from the replication slot".into());
        }
        if let Some(why) = self.refusal() {
            return Err(format!("the broker refuses the events: {why}"));
        }
        if !self.broker_ok.load(Ordering::Relaxed) {
            return Err("the broker does not answer".into());
        }
        if let Some(why) = self.stall() {
            return Err(format!("stalled: {why}"));
        }
        Ok(())
    }

    /// The session is connected and does not advance, and why; `None`: it advances.
    pub fn set_stall(&self, why: Option<String>) {
        if let Ok(mut stalled) = self.stalled.lock() {
            *stalled = why;
        }
    }

    /// Why the session does not advance, while it does not.
    pub fn stall(&self) -> Option<String> {
        self.stalled.lock().ok().and_then(|s| s.clone())
    }

    /// The broker refuses the stream, and why; `None`: it takes it again.
    pub fn set_refusal(&self, why: Option<String>) {
        if let Ok(mut refused) = self.refused.lock() {
            *refused = why;
        }
    }

    /// Why the broker refuses the stream, while it does.
    pub fn refusal(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }

    /// A session started or ended.
    pub fn set_streaming(&self, on: bool) {
        self.streaming.store(on, Ordering::Relaxed);
    }

    /// The broker answered, or failed.
    pub fn set_broker_ok(&self, ok: bool) {
        self.broker_ok.store(ok, Ordering::Relaxed);
    }

    /// The server mentioned WAL up to `lsn`.
    pub fn set_server_wal_end(&self, lsn: u64) {
        self.server_wal_end.observe(Lsn::new(lsn));
    }

    /// The newest WAL position the server mentioned (0 before the first).
    pub fn server_wal_end(&self) -> u64 {
        self.server_wal_end.get().map_or(0, Lsn::get)
    }
}

/// Sets `streaming` for as long as it lives.
#[derive(Debug)]
pub struct StreamingGuard<'a>(&'a Status);

impl<'a> StreamingGuard<'a> {
    /// Marks `status` as streaming until dropped.
    pub fn new(status: &'a Status) -> Self {
        status.set_streaming(true);
        StreamingGuard(status)
    }
}

impl Drop for StreamingGuard<'_> {
    fn drop(&mut self) {
        self.0.set_streaming(false);
    }
}
