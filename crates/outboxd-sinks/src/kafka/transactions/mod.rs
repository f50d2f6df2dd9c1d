//! Effectively-once delivery to Kafka: each batch is one Kafka transaction that also records,
//! in the offsets topic, how far the source has been delivered.
//!
//! ```text
//! batch ─▶ skip events the committed marker covers (already in Kafka: a replay)
//!       ─▶ begin ─▶ produce events (and dead letters) ─▶ produce marker ─▶ commit
//!                   offsets topic, partition 0, key = <system id>/<database>/<slot>,
//!                   value = {"timeline", "commit_lsn", "index"} of the last event
//! new producer ─▶ init_transactions (fences older producers of the same transactional.id,
//!                 completes or aborts their open transaction)
//!              ─▶ read the offsets topic (read_committed): the newest marker of the key
//!              ─▶ WalOrigin::trust: how much of it is this server's WAL history
//! ```
//!
//! A marker is trusted only as far as it is this history's (`outboxd_core::origin`): the key
//! keeps apart other clusters and databases, and two services on one Kafka cluster with the
//! default names; the timeline and the server's WAL end keep apart a restored server, and a
//! promoted standby that did not have everything the marker covers. What is not trusted is
//! sent again (said once, as a warning): duplicates, never a skipped event.
//!
//! The marker is the WAL position of the batch's last event, `(commit LSN, index)`, not only a
//! commit LSN: batches are bounded by the in-flight budget, so a source transaction larger than
//! a batch spans several Kafka transactions, and each must say exactly which of its events it
//! holds. Positions grow along the WAL, so "at or below the marker" is a prefix of any replay.
//!
//! What each outcome means:
//!
//! - commit succeeded: the batch and its marker are visible to `read_committed` consumers;
//!   `committed` moves to the batch's last event;
//! - a record Kafka refuses alone (too large, a forbidden or invalid topic): the transaction is
//!   aborted (nothing of it is visible) and redone with that record sent to the dead-letter
//!   topic instead;
//! - anything transient, or a commit whose result is unknown: the transaction is aborted, or
//!   the producer discarded; the batch fails as transient. A new producer re-reads the marker,
//!   so a commit that did happen is not repeated;
//! - fenced (a newer producer with the same `transactional.id` exists: another outboxd took
//!   over the slot): permanent. This instance stops; it must not write again.
//!
//! `init_transactions` runs on the first batch, not on [`Sink::ping`](outboxd_core::Sink): an
//! instance that stands by for the slot never fences the one streaming it.
//!
//! Here: the state, the markers and fencing. `send.rs` sends a batch as one transaction;
//! `offsets.rs` starts a transactional producer and reads back how far the source was
//! delivered.

use outboxd_core::{Marker, Position, SinkError, Trust};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;

use super::KafkaSink;
use super::message::Outgoing;

mod offsets;
mod send;

/// The transactional state of a [`KafkaSink`].
#[derive(Debug, Default)]
pub struct State {
    /// `init_transactions` ran on the current producer.
    ready: bool,
    /// The newest marker known to be committed in Kafka, and how much of it this history
    /// trusts.
    committed: Option<(Marker, Trust)>,
}

impl State {
    /// The producer was discarded: the next one must initialise and read the marker again.
    pub(super) fn producer_lost(&mut self) {
        self.ready = false;
    }

    /// Whether the event at `position` is already in Kafka.
    fn covers(&self, position: Position) -> bool {
        self.committed
            .as_ref()
            .is_some_and(|(marker, trust)| marker.covers(trust, position))
    }
}

/// Whether `err` says this producer was fenced by a newer one.
fn is_fenced(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    )
}

fn fenced_error(transactional_id: &str, err: impl ToString) -> SinkError {
    SinkError::permanent(
        "this outboxd was fenced: another producer with the same transactional.id (another \
         outboxd that took over the slot) is writing now; this instance stops so that it never \
         writes again. If no other instance should run, check sink.kafka.transactional_id",
        format!("transactional.id {transactional_id:?}: {}", err.to_string()),
    )
}

impl KafkaSink {
    fn transactional_id(&self) -> &str {
        self.config
            .transactions
            .as_ref()
            .map_or("", |t| t.transactional_id.as_str())
    }

    /// The offsets topic's record for a batch that ends at `last`.
    fn marker(&self, last: Position) -> (Marker, Outgoing) {
        let Some(t) = &self.config.transactions else {
            unreachable!("a marker without transactions");
        };
        let marker = Marker {
            position: last,
            timeline: t.origin.timeline,
        };
        let outgoing = Outgoing {
            topic: t.offsets_topic.clone(),
            partition: Some(0),
            key: Some(t.origin.key().into_bytes().into()),
            value: marker.to_json().into_bytes().into(),
            tombstone: false,
            timestamp: None,
            headers: Vec::new(),
        };
        (marker, outgoing)
    }

    /// The permanent error to stop with when the producer has been fenced: librdkafka then
    /// fails every later call and message with a generic fatal error, so the cause is read
    /// from the producer itself.
    fn fenced_now(&self) -> Option<SinkError> {
        let (code, text) = self.producer.as_ref()?.client().fatal_error()?;
        matches!(
            code,
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
        .then(|| fenced_error(self.transactional_id(), text))
    }
}
