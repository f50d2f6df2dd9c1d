//! What a session has read and the broker has not yet acknowledged: the budget that bounds
//! it, and the checkpoint that turns acknowledgements into the position to confirm.
//!
//! ```text
//! forward(record) ─▶ budget.acquire(size) ─▶ Checkpoint::issue ─▶ channel ─▶ dispatcher
//! mark(commit / keepalive LSN)  ─▶ Checkpoint::mark ─▶ position to confirm, if nothing waits
//! acknowledged(n) ◀─ acks ◀───────────────────────────────────────────────── dispatcher
//!      └─▶ Checkpoint::ack ─▶ position to confirm, when the newest complete mark moved
//! ```
//!
//! The budget is a semaphore of bytes: a record takes its size (capped at the whole budget, so
//! that a record larger than the budget still goes, alone) before it is numbered and queued,
//! and the dispatcher gives the bytes back once the broker acknowledged it. The channel holds
//! at most `max_inflight_events` records. Waiting in [`InFlight::forward`] is the session's
//! backpressure: while it waits, the WAL is not read.
//!
//! Nothing here confirms anything: the positions returned are what the session may confirm
//! to the slot. The `confirmed_lsn` and `inflight_events` metrics follow them.

use std::sync::Arc;

use outboxd_core::{Checkpoint, Lsn, Record};
use outboxd_postgres::StreamError;
use tokio::sync::{Semaphore, mpsc};

use crate::dispatch::Queued;
use crate::metrics::{Metrics, seconds_between, unix_micros_now};

/// Records read and not acknowledged, and the position they let the slot confirm.
#[derive(Debug)]
pub(super) struct InFlight {
    /// Numbers the records and turns acknowledgements into positions.
    checkpoint: Checkpoint,
    /// To the dispatcher, in WAL order; `None` once closed (the dispatcher then drains).
    records: Option<mpsc::Sender<Queued>>,
    /// Bytes read and not acknowledged; the dispatcher returns a record's bytes on its ack.
    budget: Arc<Semaphore>,
    /// The whole budget: the most one record takes from it.
    max_permits: u32,
    /// `confirmed_lsn`, `inflight_events`, `commit_to_read_seconds`.
    metrics: Arc<Metrics>,
}

/// The dispatcher's side of [`InFlight`]: where records arrive, and the budget it refills.
#[derive(Debug)]
pub(super) struct DispatcherEnd {
    /// The records, in WAL order.
    pub records: mpsc::Receiver<Queued>,
    /// The budget to give acknowledged records' bytes back to.
    pub budget: Arc<Semaphore>,
}

impl InFlight {
    /// Nothing in flight yet, `start` confirmed; at most `max_events` records and `max_bytes`
    /// bytes (up to 4 GiB) in flight.
    pub(super) fn new(
        start: Lsn,
        max_events: usize,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> (Self, DispatcherEnd) {
        let max_permits = u32::try_from(max_bytes).unwrap_or(u32::MAX);
        let budget = Arc::new(Semaphore::new(max_permits as usize));
        let (records_tx, records_rx) = mpsc::channel(max_events);
        metrics.confirmed_lsn.set(start.get());
        let inflight = InFlight {
            checkpoint: Checkpoint::new(start),
            records: Some(records_tx),
            budget: budget.clone(),
            max_permits,
            metrics,
        };
        let end = DispatcherEnd {
            records: records_rx,
            budget,
        };
        (inflight, end)
    }

    /// Hands `record` to the dispatcher once the budget has room for it. Returns `Ok` also
    /// when the dispatcher has ended (the session finds out why from its task).
    pub(super) async fn forward(&mut self, record: Record) -> Result<(), StreamError> {
        self.metrics.commit_to_read_seconds.observe(seconds_between(
            record.event.commit_time_micros,
            unix_micros_now(),
        ));
        let Some(records) = &self.records else {
            return Err(StreamError::Ended);
        };
        let permits = u32::try_from(record.size())
            .unwrap_or(u32::MAX)
            .min(self.max_permits);
        // Waiting here is the backpressure: the WAL is not read while the budget is spent.
        match self.budget.acquire_many(permits).await {
            Ok(p) => p.forget(),
            Err(_) => return Err(StreamError::Ended),
        }
        self.checkpoint.issue();
        if records.send(Queued { record, permits }).await.is_err() {
            return Ok(());
        }
        self.set_in_flight();
        Ok(())
    }

    /// `lsn` (a commit's end, or a keepalive's WAL end between transactions) is safe once the
    /// records read before it are acknowledged. Returns the position to confirm when that is
    /// already so.
    pub(super) fn mark(&mut self, lsn: Lsn) -> Option<Lsn> {
        let confirm = self.checkpoint.mark(lsn)?;
        self.metrics.confirmed_lsn.set(confirm.get());
        Some(confirm)
    }

    /// The dispatcher reports `acked` records acknowledged since the session began. Returns
    /// the position to confirm when it moved.
    pub(super) fn acknowledged(&mut self, acked: u64) -> Option<Lsn> {
        let confirm = self.checkpoint.ack(acked);
        if let Some(lsn) = confirm {
            self.metrics.confirmed_lsn.set(lsn.get());
        }
        self.set_in_flight();
        confirm
    }

    /// Hands the dispatcher nothing more: it sends what it holds, then ends.
    pub(super) fn close(&mut self) {
        self.records = None;
    }

    /// Records handed to the dispatcher and not acknowledged.
    pub(super) fn in_flight(&self) -> u64 {
        self.checkpoint.in_flight()
    }

    /// The newest position whose records are all acknowledged.
    pub(super) fn confirmed(&self) -> Lsn {
        self.checkpoint.confirmed()
    }

    fn set_in_flight(&self) {
        self.metrics
            .inflight_events
            .set(self.checkpoint.in_flight() as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use outboxd_core::{Lsn, SinkError};
    use tokio::sync::{Notify, mpsc};
    use tokio::task::JoinHandle;

    use super::InFlight;
    use crate::dispatch::{self, DispatchOptions};
    use crate::fake_sink::{FakeSink, Reply, SentLog, ids, record};
    use crate::metrics::Metrics;
    use crate::status::Status;

    const START: Lsn = Lsn::new(0x1000);

    /// A session's in-flight side, wired to a dispatcher on a fake sink as `Session` wires it.
    struct Wired {
        inflight: InFlight,
        acks: mpsc::UnboundedReceiver<u64>,
        sent: SentLog,
        metrics: Arc<Metrics>,
        dispatcher: JoinHandle<Result<(), SinkError>>,
    }

    fn wire(max_bytes: u64, max_batch: usize, replies: impl IntoIterator<Item = Reply>) -> Wired {
        let metrics = Arc::new(Metrics::new());
        let (inflight, end) = InFlight::new(START, 100, max_bytes, metrics.clone());
        let sink = FakeSink::new(replies);
        let sent = sink.log();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let dispatcher = tokio::spawn(dispatch::run(
            sink,
            end.records,
            acks_tx,
            end.budget,
            DispatchOptions {
                max_batch,
                linger: Duration::ZERO,
                broker: "fake",
                spans: None,
            },
            None,
            metrics.clone(),
            Arc::new(Status::default()),
        ));
        Wired {
            inflight,
            acks,
            sent,
            metrics,
            dispatcher,
        }
    }

    impl Wired {
        /// Waits for the dispatcher's next acknowledgement and hands it over, as the session
        /// loop does; returns the position to confirm, if any.
        async fn acknowledge_next(&mut self) -> Option<Lsn> {
            let acked = self.acks.recv().await.expect("an acknowledgement");
            self.inflight.acknowledged(acked)
        }
    }

    fn lsn(n: u64) -> Lsn {
        Lsn::new(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_holds_reading_until_the_broker_acknowledges() {
        let size = record(0, "order", 100).size() as u64;
        let release = Arc::new(Notify::new());
        // Room for three records.
        let mut w = wire(3 * size, 10, [Reply::Hold(release.clone())]);
        for id in 0..3 {
            w.inflight.forward(record(id, "order", 100)).await.unwrap();
        }
        assert_eq!(w.inflight.in_flight(), 3);
        assert_eq!(w.metrics.inflight_events.get(), 3);

        // The fourth waits: the budget is spent and the broker holds the batch.
        let fourth = tokio::time::timeout(
            Duration::from_secs(60),
            w.inflight.forward(record(3, "order", 100)),
        )
        .await;
        assert!(fourth.is_err(), "forwarded beyond the budget");
        assert_eq!(w.sent.batches(), [ids(0..3)]);
        assert_eq!(w.inflight.in_flight(), 3);

        release.notify_one();
        assert_eq!(w.acknowledge_next().await, None, "no commit read yet");
        assert_eq!(w.inflight.in_flight(), 0);
        w.inflight.forward(record(3, "order", 100)).await.unwrap();
        assert_eq!(w.acknowledge_next().await, None);
        assert_eq!(w.sent.batches(), [ids(0..3), ids([3])]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_larger_than_the_whole_budget_still_goes_alone() {
        let mut w = wire(64, 10, []);
        w.inflight.forward(record(0, "order", 1_000)).await.unwrap();
        assert_eq!(w.acknowledge_next().await, None);
        w.inflight.forward(record(1, "order", 1_000)).await.unwrap();
        assert_eq!(w.acknowledge_next().await, None);
        assert_eq!(w.sent.batches(), [ids([0]), ids([1])]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_is_confirmed_only_once_the_broker_acknowledged_all_its_records() {
        // Batches of two: transaction A (records 0, 1) goes first; B (record 2) fails once.
        let mut w = wire(1 << 20, 2, [Reply::Accept, Reply::Transient]);
        w.inflight.forward(record(0, "order", 10)).await.unwrap();
        w.inflight.forward(record(1, "order", 10)).await.unwrap();
        assert_eq!(w.inflight.mark(lsn(0x2000)), None, "A is in flight");
        w.inflight.forward(record(2, "order", 10)).await.unwrap();
        assert_eq!(w.inflight.mark(lsn(0x3000)), None, "B is in flight");
        // A keepalive after B: safe only once B is.
        assert_eq!(w.inflight.mark(lsn(0x3100)), None);

        assert_eq!(w.acknowledge_next().await, Some(lsn(0x2000)));
        assert_eq!(w.metrics.confirmed_lsn.get(), 0x2000);
        // B's batch failed; while it waits for its retry, nothing more is confirmed.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(w.acks.try_recv().is_err());
        assert_eq!(w.inflight.confirmed(), lsn(0x2000));

        assert_eq!(w.acknowledge_next().await, Some(lsn(0x3100)));
        assert_eq!(w.sent.batches(), [ids(0..2), ids([2]), ids([2])]);
        assert_eq!(w.metrics.confirmed_lsn.get(), 0x3100);
        assert_eq!(w.metrics.inflight_events.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_confirms_each_keepalive_at_once_and_never_goes_back() {
        let mut w = wire(1 << 20, 10, []);
        assert_eq!(w.metrics.confirmed_lsn.get(), START.get());
        assert_eq!(w.inflight.mark(lsn(0x1800)), Some(lsn(0x1800)));
        assert_eq!(
            w.inflight.mark(lsn(0x1700)),
            None,
            "behind the confirmed position"
        );
        assert_eq!(w.metrics.confirmed_lsn.get(), 0x1800);
        w.inflight.forward(record(0, "order", 10)).await.unwrap();
        assert_eq!(w.inflight.mark(lsn(0x1900)), None);
        assert_eq!(w.acknowledge_next().await, Some(lsn(0x1900)));
    }

    #[tokio::test(start_paused = true)]
    async fn closing_lets_the_dispatcher_send_what_it_holds_then_end() {
        let mut w = wire(1 << 20, 1, []);
        for id in 0..3 {
            w.inflight.forward(record(id, "order", 10)).await.unwrap();
        }
        w.inflight.mark(lsn(0x2000));
        w.inflight.close();
        assert!(w.inflight.forward(record(3, "order", 10)).await.is_err());
        assert!((&mut w.dispatcher).await.unwrap().is_ok());
        let mut confirmed = None;
        while let Ok(acked) = w.acks.try_recv() {
            confirmed = w.inflight.acknowledged(acked).or(confirmed);
        }
        assert_eq!(confirmed, Some(lsn(0x2000)));
        assert_eq!(w.sent.batches(), [ids([0]), ids([1]), ids([2])]);
    }
}
