//! The sink driver: one task per replication session that owns the sink.
//!
//! ```text
//! pipeline ──Queued (in WAL order)──▶ dispatch: batch ─▶ Sink::send ─▶ broker
//!    ▲                                     │ transient error: same batch again, after a pause
//!    └──────── records acknowledged ◀──────┘
//! ```
//!
//! Records arrive in the order they were read from the WAL and are sent in that order, one
//! batch at a time: a batch is sent only after the one before it was acknowledged, so a retry
//! never overtakes anything. While a batch is in flight the pipeline keeps reading, and the
//! next batch takes everything that arrived meanwhile (up to `max_batch`). A batch that is
//! not full waits up to `linger` for more records first: when events trickle in one at a
//! time, that bounds the broker round trips (and the wakeups of outboxd, the broker and its
//! readers) to about one per interval.
//!
//! A batch that fails transiently is sent again, whole and in the same order, after a pause
//! ([`RETRY_INITIAL`], doubling up to [`RETRY_MAX`], with jitter), as often as it takes; the
//! broker is reported down meanwhile. A permanent error ends the driver with that error.
//!
//! A dead letter the broker could not take with its payload (`Delivery::payload_omitted`) is
//! kept whole in Postgres first ([`crate::dead_letters`]): only then is the batch
//! acknowledged.
//!
//! Each acknowledgement is the number of records acknowledged since the session began, which
//! is what [`outboxd_core::Checkpoint::ack`] takes; records the broker dead-lettered or already
//! held count as acknowledged (and in their metrics, not as forwarded). Acknowledging also
//! returns the records' bytes to the in-flight budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboxd_core::{Delivery, Record, Sink, SinkError};
use tokio::sync::{Semaphore, mpsc};

use crate::backoff::Backoff;
use crate::metrics::{Metrics, seconds_between, unix_micros_now};
use crate::otel::Spans;
use crate::status::Status;

/// A record on its way to the sink, with the budget it holds.
#[derive(Debug)]
pub struct Queued {
    /// The record.
    pub record: Record,
    /// Bytes taken from the in-flight budget, returned on acknowledgement.
    pub permits: u32,
}

/// How the driver behaves.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// Most records in one batch.
    pub max_batch: usize,
    /// How long a batch shorter than `max_batch` waits for more records (zero: not at all).
    pub linger: Duration,
    /// Broker name for log lines.
    pub broker: &'static str,
    /// One span per acknowledged event, when `[otel] endpoint` is set.
    pub spans: Option<Spans>,
}

/// Where the events whose dead letter went without its payload are kept before they count as
/// delivered; `None` (tests with a fake sink) keeps nothing: such a batch then fails.
pub type DeadLetterKeeper = Option<crate::dead_letters::Keeper>;

/// Sends records until the channel closes (then returns `Ok`) or the sink fails permanently.
#[allow(clippy::too_many_arguments)] // each is one of the driver's own ends; see the module docs
pub async fn run<S: Sink>(
    mut sink: S,
    mut records: mpsc::Receiver<Queued>,
    acks: mpsc::UnboundedSender<u64>,
    budget: Arc<Semaphore>,
    options: DispatchOptions,
    mut keeper: DeadLetterKeeper,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
) -> Result<(), SinkError> {
    let mut queued: Vec<Queued> = Vec::with_capacity(options.max_batch);
    let mut batch: Vec<Record> = Vec::with_capacity(options.max_batch);
    let mut acknowledged: u64 = 0;
    let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
    loop {
        if records.recv_many(&mut queued, options.max_batch).await == 0 {
            return Ok(());
        }
        if !options.linger.is_zero() {
            linger(&mut records, &mut queued, &options).await;
        }
        let permits: u32 = queued.iter().map(|q| q.permits).sum();
        batch.extend(queued.drain(..).map(|q| q.record));
        let delivery =
            send_until_accepted(&mut sink, &batch, &mut backoff, &options, &metrics, &status)
                .await?;
        if !delivery.payload_omitted().is_empty() {
            match keeper.as_mut() {
                Some(keeper) => keeper.keep(&batch, &delivery).await?,
                None => {
                    return Err(SinkError::permanent(
                        "keeping dead letters without their payload",
                        "no keeper",
                    ));
                }
            }
        }
        account(&batch, &delivery, &metrics, options.spans.as_ref());
        acknowledged += batch.len() as u64;
        batch.clear();
        budget.add_permits(permits as usize);
        if acks.send(acknowledged).is_err() {
            // The pipeline is gone (session ended): nothing left to report to.
            return Ok(());
        }
    }
}

/// The first pause before a failed batch is sent again; it doubles up to [`RETRY_MAX`].
pub const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// The longest pause between two attempts at a batch.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// Sends `batch` until the broker accepts it, pausing after each transient error (the
/// `backoff`, reset once it goes through); a permanent error ends the attempts. Keeps the
/// broker's health in `status` and the failures in `sink_errors`.
async fn send_until_accepted<S: Sink>(
    sink: &mut S,
    batch: &[Record],
    backoff: &mut Backoff,
    options: &DispatchOptions,
    metrics: &Metrics,
    status: &Status,
) -> Result<Delivery, SinkError> {
    let failing_since = Instant::now();
    let mut last_warning: Option<Instant> = None;
    let delivery = loop {
        match sink.send(batch).await {
            Ok(delivery) => break delivery,
            Err(e) if e.is_refusal() => {
                metrics.sink_errors.inc();
                metrics.sink_refused.set(1);
                status.set_refusal(Some(crate::report::one_line(&e)));
                let delay = backoff.next_delay();
                // Loud: it lasts until someone fixes the broker. Said at once, then every 30 s.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    tracing::error!(
                        broker = options.broker,
                        error = %e,
                        attempts = backoff.attempts(),
                        retry_in_ms = delay.as_millis() as u64,
                        pending_events = batch.len(),
                        "the broker refuses the events (an authorization or a missing topic): \
                         nothing is forwarded or dead-lettered, and the slot stays at the last \
                         acknowledged event, until the broker takes them; retrying"
                    );
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(delay).await;
            }
            Err(e) if e.is_transient() => {
                metrics.sink_errors.inc();
                status.set_broker_ok(false);
                let delay = backoff.next_delay();
                // One line when the broker fails, then one every 30 s while it stays down.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    tracing::warn!(
                        broker = options.broker,
                        error = %e,
                        attempts = backoff.attempts(),
                        retry_in_ms = delay.as_millis() as u64,
                        pending_events = batch.len(),
                        "broker unavailable; retrying the batch, the slot stays at the last acknowledged event"
                    );
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    };
    status.set_broker_ok(true);
    if status.refusal().is_some() {
        status.set_refusal(None);
        metrics.sink_refused.set(0);
    }
    if backoff.attempts() > 0 {
        tracing::info!(
            broker = options.broker,
            attempts = backoff.attempts(),
            down_for_ms = failing_since.elapsed().as_millis() as u64,
            "broker is back; batch delivered"
        );
        backoff.reset();
    }
    Ok(delivery)
}

/// Lets a short batch wait up to `options.linger` for more records, so that a trickle of
/// events costs one broker round trip per linger interval instead of one per event. Ends
/// early when the batch is full or the channel closed (what was taken is still sent).
async fn linger(
    records: &mut mpsc::Receiver<Queued>,
    queued: &mut Vec<Queued>,
    options: &DispatchOptions,
) {
    let deadline = tokio::time::Instant::now() + options.linger;
    while queued.len() < options.max_batch {
        let room = options.max_batch - queued.len();
        tokio::select! {
            // recv_many is cancel-safe: a record is either in `queued` or still queued.
            n = records.recv_many(queued, room) => if n == 0 { return },
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// Counts a delivered batch: forwarded per topic, dead-lettered per reason, already
/// delivered per topic, latency; and logs each dead letter.
fn account(batch: &[Record], delivery: &Delivery, metrics: &Metrics, spans: Option<&Spans>) {
    let now_micros = unix_micros_now();
    let acked = std::time::SystemTime::now();
    let mut forwarded: HashMap<&str, u64> = HashMap::new();
    let mut dead: HashMap<&'static str, u64> = HashMap::new();
    let mut already: HashMap<&str, u64> = HashMap::new();
    let mut rejected = delivery.rejected().iter().peekable();
    let mut duplicates = delivery.duplicates().iter().peekable();
    for (i, record) in batch.iter().enumerate() {
        let event = &record.event;
        if duplicates.next_if(|&&j| j == i).is_some() {
            *already.entry(event.topic.as_str()).or_default() += 1;
            continue;
        }
        let poison = match rejected.peek() {
            Some((j, p)) if *j == i => {
                rejected.next();
                Some(p)
            }
            _ => record.poison.as_ref(),
        };
        if let Some(spans) = spans {
            spans.record(event, poison, acked);
        }
        match poison {
            None => *forwarded.entry(event.topic.as_str()).or_default() += 1,
            Some(p) => {
                *dead.entry(p.kind.label()).or_default() += 1;
                tracing::warn!(
                    id = %String::from_utf8_lossy(&event.id),
                    topic = %event.topic,
                    key = %String::from_utf8_lossy(&event.key),
                    lsn = %event.position.commit_lsn,
                    index = event.position.index,
                    reason = p.kind.label(),
                    detail = %p.detail,
                    "event dead-lettered"
                );
            }
        }
        metrics
            .commit_to_ack_seconds
            .observe(seconds_between(event.commit_time_micros, now_micros));
    }
    metrics.record_batch(forwarded, dead);
    if !already.is_empty() {
        let total: u64 = already.values().sum();
        tracing::debug!(
            events = total,
            "replayed events were already at the broker; not written again"
        );
        metrics.record_already_delivered(already);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use outboxd_core::{Event, Headers, Lsn, Position, Record};
    use tokio::sync::mpsc;

    use super::{DispatchOptions, Queued, linger};

    fn queued(index: u32) -> Queued {
        Queued {
            record: Record::publish(Event {
                id: Bytes::from(index.to_string()),
                topic: "order".into(),
                key: Bytes::new(),
                event_type: Bytes::new(),
                payload: Bytes::from_static(b"{}"),
                headers: Headers::empty(),
                position: Position {
                    commit_lsn: Lsn::new(1),
                    index,
                },
                commit_time_micros: 0,
                tombstone: false,
                time_millis: None,
                attributes: Vec::new(),
            }),
            permits: 1,
        }
    }

    fn options(max_batch: usize, linger_ms: u64) -> DispatchOptions {
        DispatchOptions {
            max_batch,
            linger: Duration::from_millis(linger_ms),
            broker: "test",
            spans: None,
        }
    }

    fn indexes(batch: &[Queued]) -> Vec<u32> {
        batch
            .iter()
            .map(|q| q.record.event.position.index)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_batch_takes_what_arrives_within_the_linger() {
        let (tx, mut rx) = mpsc::channel(100);
        tx.send(queued(0)).await.unwrap();
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, 10).await;
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            tx.send(queued(1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send(queued(2)).await.unwrap();
            tx
        });
        let started = tokio::time::Instant::now();
        linger(&mut rx, &mut batch, &options(10, 5)).await;
        assert_eq!(indexes(&batch), [0, 1]);
        assert_eq!(started.elapsed(), Duration::from_millis(5));
        // The record after the linger waits for the next batch, in order.
        let _tx = late.await.unwrap();
        let mut next = Vec::new();
        rx.recv_many(&mut next, 10).await;
        assert_eq!(indexes(&next), [2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_sent_without_waiting_out_the_linger() {
        let (tx, mut rx) = mpsc::channel(100);
        for i in 0..5 {
            tx.send(queued(i)).await.unwrap();
        }
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, 3).await;
        let started = tokio::time::Instant::now();
        linger(&mut rx, &mut batch, &options(4, 1_000)).await;
        assert_eq!(indexes(&batch), [0, 1, 2, 3]);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_channel_ends_the_linger_and_keeps_what_was_taken() {
        let (tx, mut rx) = mpsc::channel(100);
        tx.send(queued(0)).await.unwrap();
        tx.send(queued(1)).await.unwrap();
        drop(tx);
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, 1).await;
        let started = tokio::time::Instant::now();
        linger(&mut rx, &mut batch, &options(10, 1_000)).await;
        assert_eq!(indexes(&batch), [0, 1]);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    mod with_a_fake_sink {
        use std::sync::Arc;
        use std::time::Duration;

        use outboxd_core::{Poison, PoisonKind, SinkError};
        use tokio::sync::{Notify, Semaphore, mpsc};
        use tokio::task::JoinHandle;
        use tokio::time::Instant;

        use super::super::{DispatchOptions, Queued, RETRY_INITIAL, run};
        use crate::fake_sink::{FakeSink, Reply, SentLog, ids, record};
        use crate::metrics::{Metrics, ReasonLabel, TopicLabel};
        use crate::status::Status;

        /// A dispatcher running on a fake sink, and everything around it.
        struct Driver {
            records: Option<mpsc::Sender<Queued>>,
            acks: mpsc::UnboundedReceiver<u64>,
            budget: Arc<Semaphore>,
            metrics: Arc<Metrics>,
            status: Arc<Status>,
            sent: SentLog,
            task: JoinHandle<Result<(), SinkError>>,
        }

        impl Driver {
            /// Starts a dispatcher on a sink answering `replies`; batches of at most
            /// `max_batch`, no linger. Records queued before the first await go in one batch.
            fn start(max_batch: usize, replies: impl IntoIterator<Item = Reply>) -> Self {
                let sink = FakeSink::new(replies);
                let sent = sink.log();
                let (records_tx, records_rx) = mpsc::channel(100);
                let (acks_tx, acks) = mpsc::unbounded_channel();
                let budget = Arc::new(Semaphore::new(0));
                let metrics = Arc::new(Metrics::new());
                let status = Arc::new(Status::default());
                status.set_streaming(true);
                // Up, as the readiness probe found it before the first batch.
                status.set_broker_ok(true);
                let task = tokio::spawn(run(
                    sink,
                    records_rx,
                    acks_tx,
                    budget.clone(),
                    DispatchOptions {
                        max_batch,
                        linger: Duration::ZERO,
                        broker: "fake",
                        spans: None,
                    },
                    None,
                    metrics.clone(),
                    status.clone(),
                ));
                Driver {
                    records: Some(records_tx),
                    acks,
                    budget,
                    metrics,
                    status,
                    sent,
                    task,
                }
            }

            /// Queues event `id` of topic "order", holding 10 bytes of budget.
            fn queue(&self, id: u32) {
                let queued = Queued {
                    record: record(id, "order", 2),
                    permits: 10,
                };
                self.queue_record(queued);
            }

            fn queue_record(&self, queued: Queued) {
                self.records
                    .as_ref()
                    .expect("open")
                    .try_send(queued)
                    .expect("room in the channel");
            }

            async fn next_ack(&mut self) -> u64 {
                self.acks.recv().await.expect("an acknowledgement")
            }

            /// Closes the input and returns how the dispatcher ended.
            async fn finish(mut self) -> Result<(), SinkError> {
                self.records = None;
                self.task.await.expect("no panic")
            }
        }

        #[tokio::test(start_paused = true)]
        async fn a_transient_error_sends_the_same_batch_again_in_order_after_a_backoff() {
            let mut d = Driver::start(10, [Reply::Transient, Reply::Transient, Reply::Accept]);
            for id in 0..3 {
                d.queue(id);
            }
            // While the batch waits for its retry, the broker is reported down.
            tokio::time::sleep(RETRY_INITIAL / 2).await;
            assert_eq!(
                d.status.ready(),
                Err("the broker does not answer".to_owned())
            );
            assert!(d.acks.try_recv().is_err(), "nothing acknowledged yet");

            assert_eq!(d.next_ack().await, 3);
            let calls = d.sent.calls();
            assert_eq!(calls.len(), 3);
            for call in &calls {
                assert_eq!(call.ids, ids(0..3), "the same batch, in the same order");
            }
            // 100 ms, then 200 ms, each ±20 %.
            let first = calls[1].at - calls[0].at;
            let second = calls[2].at - calls[1].at;
            assert!(
                first >= Duration::from_millis(80) && first <= Duration::from_millis(121),
                "{first:?}"
            );
            assert!(
                second >= Duration::from_millis(160) && second <= Duration::from_millis(241),
                "{second:?}"
            );
            assert_eq!(d.metrics.sink_errors.get(), 2);
            assert_eq!(d.status.ready(), Ok(()), "the broker is back");
            assert_eq!(d.metrics.forwarded_total(), 3);
            assert_eq!(d.budget.available_permits(), 30, "the budget comes back");
            assert!(d.finish().await.is_ok());
        }

        #[tokio::test(start_paused = true)]
        async fn the_backoff_starts_over_after_a_delivered_batch() {
            let mut d = Driver::start(
                1,
                [
                    Reply::Transient,
                    Reply::Transient,
                    Reply::Accept,
                    Reply::Transient,
                    Reply::Accept,
                ],
            );
            d.queue(0);
            d.queue(1);
            assert_eq!(d.next_ack().await, 1);
            assert_eq!(d.next_ack().await, 2);
            let calls = d.sent.calls();
            assert_eq!(calls[3].ids, ids([1]));
            let pause = calls[4].at - calls[3].at;
            // The first step (100 ms ± 20 %), not the second (200 ms ± 20 %); tokio's timer
            // rounds a sleep up to the next millisecond.
            assert!(pause <= Duration::from_millis(121), "{pause:?}");
        }

        #[tokio::test(start_paused = true)]
        async fn a_permanent_error_ends_the_dispatcher_and_acknowledges_nothing() {
            let mut d = Driver::start(10, [Reply::Transient, Reply::Permanent]);
            d.queue(0);
            d.queue(1);
            let started = Instant::now();
            let ended = (&mut d.task).await.expect("no panic");
            let err = ended.expect_err("a permanent error");
            assert!(!err.is_transient(), "{err}");
            assert_eq!(d.sent.batches(), [ids(0..2), ids(0..2)]);
            assert!(started.elapsed() < Duration::from_millis(120));
            assert_eq!(d.acks.recv().await, None, "nothing acknowledged");
            assert_eq!(d.budget.available_permits(), 0);
            assert_eq!(d.metrics.forwarded_total(), 0);
        }

        #[tokio::test(start_paused = true)]
        async fn batches_go_one_at_a_time_and_are_acknowledged_in_order() {
            let release = Arc::new(Notify::new());
            let mut d = Driver::start(3, [Reply::Hold(release.clone())]);
            d.queue(0);
            d.queue(1);
            tokio::time::sleep(Duration::from_millis(10)).await;
            // The first batch is with the broker; what arrives meanwhile waits for it.
            for id in 2..7 {
                d.queue(id);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(d.sent.batches(), [ids(0..2)]);
            assert!(d.acks.try_recv().is_err());

            release.notify_one();
            assert_eq!(d.next_ack().await, 2);
            assert_eq!(d.next_ack().await, 5);
            assert_eq!(d.next_ack().await, 7);
            assert_eq!(d.sent.batches(), [ids(0..2), ids(2..5), ids(5..7)]);
            assert_eq!(d.budget.available_permits(), 70);
            assert!(d.finish().await.is_ok(), "a closed input ends it cleanly");
        }

        #[tokio::test(start_paused = true)]
        async fn rejected_and_duplicate_records_are_acknowledged_and_counted_apart() {
            let delivery = Reply::Deliver {
                rejected: vec![(1, Poison::new(PoisonKind::Rejected, "wrong key type"))],
                duplicates: vec![2],
            };
            let mut d = Driver::start(10, [delivery]);
            d.queue(0);
            d.queue(1);
            d.queue(2);
            let mut poison = record(3, "order", 2);
            poison.poison = Some(Poison::new(PoisonKind::NullField, "aggregate_id is NULL"));
            d.queue_record(Queued {
                record: poison,
                permits: 10,
            });
            d.queue(4);

            assert_eq!(d.next_ack().await, 5, "every record is settled");
            let m = &d.metrics;
            let topic = TopicLabel {
                topic: "order".into(),
            };
            let reason = |r: &str| ReasonLabel { reason: r.into() };
            assert_eq!(m.events_forwarded.get_or_create(&topic).get(), 2);
            assert_eq!(m.events_already_delivered.get_or_create(&topic).get(), 1);
            assert_eq!(
                m.events_dead_lettered
                    .get_or_create(&reason("rejected"))
                    .get(),
                1
            );
            assert_eq!(
                m.events_dead_lettered
                    .get_or_create(&reason("null_field"))
                    .get(),
                1
            );
            assert_eq!(m.forwarded_total(), 2);
            assert_eq!(m.dead_lettered_total(), 2);
        }
    }
}
