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
//! Each acknowledgement is the number of records acknowledged since the session began, which
//! is what [`outboxd_core::Checkpoint::ack`] takes. Acknowledging also returns the records'
//! bytes to the in-flight budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboxd_core::{Delivery, Record, Sink, SinkError};
use tokio::sync::{Semaphore, mpsc};

use crate::backoff::Backoff;
use crate::metrics::{Metrics, seconds_between, unix_micros_now};
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
}

/// Sends records until the channel closes (then returns `Ok`) or the sink fails permanently.
pub async fn run<S: Sink>(
    mut sink: S,
    mut records: mpsc::Receiver<Queued>,
    acks: mpsc::UnboundedSender<u64>,
    budget: Arc<Semaphore>,
    options: DispatchOptions,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
) -> Result<(), SinkError> {
    let mut queued: Vec<Queued> = Vec::with_capacity(options.max_batch);
    let mut batch: Vec<Record> = Vec::with_capacity(options.max_batch);
    let mut acknowledged: u64 = 0;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        if records.recv_many(&mut queued, options.max_batch).await == 0 {
            return Ok(());
        }
        if !options.linger.is_zero() {
            linger(&mut records, &mut queued, &options).await;
        }
        let permits: u32 = queued.iter().map(|q| q.permits).sum();
        batch.extend(queued.drain(..).map(|q| q.record));

        let failing_since = Instant::now();
        let mut last_warning: Option<Instant> = None;
        let delivery = loop {
            match sink.send(&batch).await {
                Ok(delivery) => break delivery,
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
        if backoff.attempts() > 0 {
            tracing::info!(
                broker = options.broker,
                attempts = backoff.attempts(),
                down_for_ms = failing_since.elapsed().as_millis() as u64,
                "broker is back; batch delivered"
            );
            backoff.reset();
        }

        account(&batch, &delivery, &metrics);
        acknowledged += batch.len() as u64;
        batch.clear();
        budget.add_permits(permits as usize);
        if acks.send(acknowledged).is_err() {
            // The pipeline is gone (session ended): nothing left to report to.
            return Ok(());
        }
    }
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
fn account(batch: &[Record], delivery: &Delivery, metrics: &Metrics) {
    let now_micros = unix_micros_now();
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
            }),
            permits: 1,
        }
    }

    fn options(max_batch: usize, linger_ms: u64) -> DispatchOptions {
        DispatchOptions {
            max_batch,
            linger: Duration::from_millis(linger_ms),
            broker: "test",
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
}
