//! Effectively-once delivery to Kafka: each batch is one Kafka transaction that also records,
//! in the offsets topic, how far the source has been delivered.
//!
//! ```text
//! batch ─▶ skip events at or below `committed` (already in Kafka: a replay)
//!       ─▶ begin ─▶ produce events (and dead letters) ─▶ produce marker ─▶ commit
//!                   offsets topic, partition 0, key = slot, value = last event's position
//! new producer ─▶ init_transactions (fences older producers of the same transactional.id,
//!                 completes or aborts their open transaction)
//!              ─▶ read the offsets topic (read_committed) ─▶ `committed`
//! ```
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

use std::time::Duration;

use outboxd_core::{Delivery, Ledger, Lsn, Poison, PoisonKind, Position, Record, SinkError};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::KafkaSink;
use super::errors::{Context, ErrorClass, classify, client_error, dead_letter_refused};
use super::message::{Outgoing, too_large};
use super::produce::produce_until_failure;

/// Producer-only options of `sink.kafka.options` that the offsets topic's consumer is not
/// given (librdkafka would warn about each).
const CONSUMER_OPTIONS_SKIPPED: &[&str] = &[
    "compression.type",
    "compression.codec",
    "compression.level",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "batch.num.messages",
    "batch.size",
    "partitioner",
    "sticky.partitioning.linger.ms",
    "request.timeout.ms",
];

/// The transactional state of a [`KafkaSink`].
#[derive(Debug, Default)]
pub struct State {
    /// `init_transactions` ran on the current producer.
    ready: bool,
    /// The position of the newest event known to be committed in Kafka.
    committed: Option<Position>,
}

impl State {
    /// The producer was discarded: the next one must initialise and read the marker again.
    pub(super) fn producer_lost(&mut self) {
        self.ready = false;
    }
}

/// The offsets topic's value for `position`: `{"commit_lsn":"16/B374D848","index":12}`.
pub fn marker_value(position: Position) -> String {
    format!(
        "{{\"commit_lsn\":\"{}\",\"index\":{}}}",
        position.commit_lsn, position.index
    )
}

/// The position in an offsets topic value, or `None` when it is not one of outboxd's.
pub fn parse_marker(value: &[u8]) -> Option<Position> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let commit_lsn: Lsn = v.get("commit_lsn")?.as_str()?.parse().ok()?;
    let index = u32::try_from(v.get("index")?.as_u64()?).ok()?;
    Some(Position { commit_lsn, index })
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

/// The delivery reports of one transaction, judged.
#[derive(Debug, Default)]
struct TransactionRound {
    /// Records Kafka refused alone: redone in the dead-letter topic.
    refused: Vec<(usize, Poison)>,
    /// A failure that is not one record's: transient, or permanent.
    failure: Option<SinkError>,
    /// Messages whose report did not come before the first failure.
    unknown: usize,
}

impl TransactionRound {
    /// Everything was acknowledged: the transaction may commit.
    fn is_clean(&self) -> bool {
        self.failure.is_none() && self.refused.is_empty() && self.unknown == 0
    }

    /// After the abort: the refused records go to the dead-letter topic in the redo. A record
    /// refused alone makes the other messages of the transaction fail (or never be reported),
    /// so only a permanent failure, or one with no refused record to redo without, fails the
    /// batch.
    fn redo(self, ledger: &mut Ledger<'_>) -> Result<(), SinkError> {
        match self.failure {
            Some(e) if !e.is_transient() || self.refused.is_empty() => return Err(e),
            None if self.refused.is_empty() => {
                return Err(SinkError::transient(
                    "delivering a batch in a Kafka transaction",
                    format!(
                        "{} messages were not acknowledged before the transaction failed",
                        self.unknown
                    ),
                ));
            }
            _ => {}
        }
        for (i, poison) in self.refused {
            ledger.reject(i, poison);
        }
        Ok(())
    }
}

impl KafkaSink {
    fn transactional_id(&self) -> &str {
        self.config
            .transactions
            .as_ref()
            .map_or("", |t| t.transactional_id.as_str())
    }

    /// One batch as one Kafka transaction; see the module documentation.
    pub(super) async fn send_transactional(
        &mut self,
        batch: &[Record],
    ) -> Result<Delivery, SinkError> {
        self.ensure_transactional().await?;
        let mut ledger = Ledger::new(batch);
        let committed = self.txn.committed;
        let first_new = batch
            .iter()
            .position(|r| committed.is_none_or(|c| r.event.position > c))
            .unwrap_or(batch.len());
        (0..first_new).for_each(|i| ledger.duplicate(i));
        let Some(last) = batch.last().map(|r| r.event.position) else {
            return Ok(ledger.finish());
        };
        if first_new == batch.len() {
            return Ok(ledger.finish());
        }
        let marker = self.marker(last);
        // Each round commits, fails, or dead-letters at least one more record, so this ends.
        loop {
            let mut messages = self.transaction_messages(&mut ledger, first_new);
            messages.push(Some(marker.clone()));
            self.ensure_topics(messages.iter().flatten().map(|m| m.topic.as_str()))
                .await?;
            let producer = self.producer()?;
            if let Err(e) = producer.begin_transaction() {
                return Err(self.txn_error("beginning a Kafka transaction", e).await);
            }
            let outcomes = self.produce_in_transaction(&producer, &messages).await?;
            let round = self.judge_transaction(&ledger, first_new, outcomes)?;
            if round.is_clean() {
                self.commit(&producer).await?;
                self.txn.committed = Some(last);
                return Ok(ledger.finish());
            }
            self.abort(&producer).await;
            if let Some(fenced) = self.fenced_now() {
                return Err(fenced);
            }
            round.redo(&mut ledger)?;
        }
    }

    /// The offsets topic's record for a batch that ends at `last`.
    fn marker(&self, last: Position) -> Outgoing {
        let Some(t) = &self.config.transactions else {
            unreachable!("a marker without transactions");
        };
        Outgoing {
            topic: t.offsets_topic.clone(),
            partition: Some(0),
            key: Some(t.slot.clone().into_bytes().into()),
            value: marker_value(last).into_bytes().into(),
            headers: Vec::new(),
        }
    }

    /// The messages of the batch's new records, in order: each to its topic, or to the
    /// dead-letter topic when it is poison or was refused in an earlier round. A message over
    /// `message.max.bytes` is rejected here and dead-lettered in its place.
    fn transaction_messages(
        &self,
        ledger: &mut Ledger<'_>,
        first_new: usize,
    ) -> Vec<Option<Outgoing>> {
        let (dead_letter, max) = (&self.config.dead_letter, self.max_message_bytes);
        let batch = ledger.batch();
        let mut messages = Vec::with_capacity(batch.len() + 1);
        for (i, record) in batch.iter().enumerate().skip(first_new) {
            let message = match ledger.poison(i) {
                Some(p) => Outgoing::dead_letter(&record.event, p, dead_letter, max),
                None => {
                    let message = Outgoing::event(&record.event);
                    let size = message.wire_size();
                    if size <= max {
                        message
                    } else {
                        let poison = too_large(size, max);
                        let letter =
                            Outgoing::dead_letter(&record.event, &poison, dead_letter, max);
                        ledger.reject(i, poison);
                        letter
                    }
                }
            };
            messages.push(Some(message));
        }
        messages
    }

    /// Produces a transaction's messages within `delivery_timeout`; at the timeout the
    /// transaction is aborted and the batch fails as transient.
    async fn produce_in_transaction(
        &mut self,
        producer: &FutureProducer<Context>,
        messages: &[Option<Outgoing>],
    ) -> Result<Vec<Option<Result<(), KafkaError>>>, SinkError> {
        let produced = tokio::time::timeout(
            self.config.delivery_timeout,
            produce_until_failure(producer, messages),
        )
        .await;
        let Ok(outcomes) = produced else {
            self.abort(producer).await;
            return Err(SinkError::transient(
                "waiting for Kafka delivery reports in a transaction",
                format!(
                    "not every message was acknowledged within sink.kafka.delivery_timeout_ms \
                     ({} ms); the transaction was aborted",
                    self.config.delivery_timeout.as_millis()
                ),
            ));
        };
        if outcomes.iter().any(|o| !matches!(o, Some(Ok(()))))
            && let Some(fenced) = self.fenced_now()
        {
            return Err(fenced);
        }
        Ok(outcomes)
    }

    /// What a transaction's delivery reports say: which records Kafka refused alone, and the
    /// failure of anything else. Fencing is an error at once.
    fn judge_transaction(
        &self,
        ledger: &Ledger<'_>,
        first_new: usize,
        outcomes: Vec<Option<Result<(), KafkaError>>>,
    ) -> Result<TransactionRound, SinkError> {
        let batch = ledger.batch();
        let mut round = TransactionRound::default();
        for (k, outcome) in outcomes.into_iter().enumerate() {
            let err = match outcome {
                Some(Ok(())) => continue,
                Some(Err(err)) => err,
                None => {
                    round.unknown += 1;
                    continue;
                }
            };
            if is_fenced(&err) {
                return Err(fenced_error(self.transactional_id(), &err));
            }
            let code = err
                .rdkafka_error_code()
                .unwrap_or(RDKafkaErrorCode::Unknown);
            let i = first_new + k;
            let is_marker = i >= batch.len();
            let is_dead_letter = !is_marker && ledger.poison(i).is_some();
            match classify(code) {
                class @ (ErrorClass::TooLarge | ErrorClass::Rejected)
                    if !is_marker && !is_dead_letter =>
                {
                    let kind = if class == ErrorClass::TooLarge {
                        PoisonKind::TooLarge
                    } else {
                        PoisonKind::Rejected
                    };
                    let poison = Poison::new(kind, format!("kafka refused the message: {err}"));
                    round.refused.push((i, poison));
                }
                ErrorClass::TooLarge | ErrorClass::Rejected if is_dead_letter => {
                    round.failure = Some(dead_letter_refused(&self.config.dead_letter, &err, None));
                }
                ErrorClass::TooLarge | ErrorClass::Rejected | ErrorClass::Credentials => {
                    round.failure = Some(SinkError::permanent(
                        "Kafka refused the offsets topic or the client (check \
                         sink.kafka.offsets_topic and the credentials and ACLs in \
                         sink.kafka.options)",
                        err.clone(),
                    ));
                }
                ErrorClass::Fatal | ErrorClass::Transient => {
                    if round.failure.is_none() {
                        round.failure = Some(SinkError::transient(
                            "delivering a batch in a Kafka transaction",
                            err.clone(),
                        ));
                    }
                }
            }
        }
        Ok(round)
    }

    /// Commits the transaction (blocking in librdkafka, so off the runtime's threads).
    async fn commit(&mut self, producer: &FutureProducer<Context>) -> Result<(), SinkError> {
        let timeout = self.config.delivery_timeout;
        let p = producer.clone();
        let committed = tokio::task::spawn_blocking(move || p.commit_transaction(timeout))
            .await
            .map_err(|e| SinkError::transient("committing a Kafka transaction", e.to_string()))?;
        match committed {
            Ok(()) => Ok(()),
            Err(e) => Err(self.txn_error("committing a Kafka transaction", e).await),
        }
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

    /// What a failed transaction call means: fenced is permanent; an abortable error aborts;
    /// anything else discards the producer (the next one re-reads the marker).
    async fn txn_error(&mut self, what: &'static str, err: KafkaError) -> SinkError {
        if is_fenced(&err) {
            return fenced_error(self.transactional_id(), &err);
        }
        if let Some(fenced) = self.fenced_now() {
            return fenced;
        }
        let abortable = match &err {
            KafkaError::Transaction(e) => e.txn_requires_abort(),
            _ => false,
        };
        if abortable && let Some(p) = self.producer.clone() {
            self.abort(&p).await;
        } else {
            self.discard_producer();
        }
        match err.rdkafka_error_code().map(classify) {
            Some(ErrorClass::Credentials) => SinkError::permanent(what, err),
            _ => SinkError::transient(what, err),
        }
    }

    /// Aborts the open transaction; a producer that cannot abort is discarded.
    async fn abort(&mut self, producer: &FutureProducer<Context>) {
        if self.fenced_now().is_some() {
            // Nothing to abort: the broker already did; the caller reports the fencing.
            return;
        }
        let timeout = self.config.delivery_timeout;
        let p = producer.clone();
        let aborted = tokio::task::spawn_blocking(move || p.abort_transaction(timeout)).await;
        if !matches!(aborted, Ok(Ok(()))) {
            tracing::debug!(
                ?aborted,
                "aborting the Kafka transaction failed; discarding the producer"
            );
            self.discard_producer();
        }
    }

    /// Makes the producer transactional (fencing older ones) and learns how far the source
    /// was delivered.
    async fn ensure_transactional(&mut self) -> Result<(), SinkError> {
        if self.txn.ready {
            return Ok(());
        }
        let Some(t) = self.config.transactions.clone() else {
            return Ok(());
        };
        let producer = self.producer()?;
        let timeout = self.config.delivery_timeout;
        let init = tokio::task::spawn_blocking(move || producer.init_transactions(timeout))
            .await
            .map_err(|e| SinkError::transient("initialising Kafka transactions", e.to_string()))?;
        if let Err(e) = init {
            self.discard_producer();
            return Err(match e.rdkafka_error_code().map(classify) {
                Some(ErrorClass::Credentials) => SinkError::permanent(
                    "Kafka refused the transactional producer: check that the user may use \
                     transactional.id (TransactionalIdAuthorization) in sink.kafka.options",
                    e,
                ),
                _ => SinkError::transient(
                    "initialising Kafka transactions (the broker must support transactions)",
                    e,
                ),
            });
        }
        if self.config.create_topics {
            self.ensure_offsets_topic(&t.offsets_topic).await?;
        }
        let committed = self.read_marker(&t.offsets_topic, &t.slot).await?;
        self.txn.committed = self.txn.committed.max(committed);
        self.txn.ready = true;
        tracing::info!(
            transactional_id = %t.transactional_id,
            offsets_topic = %t.offsets_topic,
            committed = %self.txn.committed.map_or_else(|| "nothing yet".to_owned(), |p| p.to_string()),
            "Kafka transactions ready; events at or below the committed position are skipped"
        );
        Ok(())
    }

    /// Creates the offsets topic (one partition, compacted) unless it exists (with
    /// `create_topics`; otherwise it must exist, or be created on first use by the broker).
    async fn ensure_offsets_topic(&mut self, topic: &str) -> Result<(), SinkError> {
        if self.topics.contains(topic) {
            return Ok(());
        }
        let new = NewTopic::new(
            topic,
            1,
            TopicReplication::Fixed(self.config.topic_replication_factor),
        )
        .set("cleanup.policy", "compact");
        let options = AdminOptions::new()
            .request_timeout(Some(self.config.timeout))
            .operation_timeout(Some(self.config.timeout));
        let results = self
            .admin()?
            .create_topics([&new], &options)
            .await
            .map_err(|e| client_error("creating the offsets topic", e))?;
        for result in results {
            match result {
                Ok(_) => tracing::info!(topic, "created the offsets topic (compacted)"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) if classify(code) == ErrorClass::Transient => {
                    return Err(SinkError::transient(
                        "creating the offsets topic",
                        format!("topic {topic:?}: {code}"),
                    ));
                }
                Err((_, code)) => {
                    return Err(SinkError::permanent(
                        "the offsets topic is missing and cannot be created: create it \
                         (cleanup.policy=compact) or name another with sink.kafka.offsets_topic",
                        format!("topic {topic:?}: {code}"),
                    ));
                }
            }
        }
        self.topics.insert(topic.to_owned());
        Ok(())
    }

    /// The newest position recorded for `slot` in the offsets topic's partition 0, read with
    /// `isolation.level = read_committed`.
    async fn read_marker(&self, topic: &str, slot: &str) -> Result<Option<Position>, SinkError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.config.brokers);
        for (name, value) in &self.config.options {
            if CONSUMER_OPTIONS_SKIPPED
                .iter()
                .all(|skipped| skipped != name)
            {
                config.set(name, value);
            }
        }
        config
            .set("group.id", format!("outboxd-offsets-{slot}"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        let (topic, slot) = (topic.to_owned(), slot.to_owned());
        let timeout = self.config.timeout;
        tokio::task::spawn_blocking(move || read_marker_blocking(&config, &topic, &slot, timeout))
            .await
            .map_err(|e| SinkError::transient("reading the offsets topic", e.to_string()))?
    }
}

fn read_marker_blocking(
    config: &ClientConfig,
    topic: &str,
    slot: &str,
    timeout: Duration,
) -> Result<Option<Position>, SinkError> {
    let err = |e| client_error("reading the offsets topic", e);
    let consumer: BaseConsumer = config.create().map_err(|e| {
        SinkError::permanent(
            "the Kafka consumer configuration for the offsets topic was refused (check sink.kafka.options)",
            e,
        )
    })?;
    let (low, high) = match consumer.fetch_watermarks(topic, 0, timeout) {
        Ok(w) => w,
        // No offsets topic yet: nothing was ever committed through it.
        Err(e)
            if matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(err(e)),
    };
    if high <= low {
        return Ok(None);
    }
    let mut partitions = TopicPartitionList::new();
    partitions
        .add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(err)?;
    consumer.assign(&partitions).map_err(err)?;
    let deadline = std::time::Instant::now() + timeout * 3;
    let mut newest: Option<Position> = None;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                if message.key() == Some(slot.as_bytes())
                    && let Some(p) = message.payload().and_then(parse_marker)
                {
                    newest = newest.max(Some(p));
                }
                if message.offset() + 1 >= high {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(err(e)),
            None if std::time::Instant::now() > deadline => {
                return Err(SinkError::transient(
                    "reading the offsets topic",
                    format!(
                        "did not reach the end of {topic:?} (offset {high}) within {:?}",
                        timeout * 3
                    ),
                ));
            }
            None => {}
        }
    }
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_foreign_values_are_ignored() {
        let p = Position {
            commit_lsn: Lsn::new(0x16_B374_D848),
            index: 12,
        };
        assert_eq!(
            marker_value(p),
            r#"{"commit_lsn":"16/B374D848","index":12}"#
        );
        assert_eq!(parse_marker(marker_value(p).as_bytes()), Some(p));
        for bad in [&b"{}"[..], b"not json", br#"{"commit_lsn":"x","index":1}"#] {
            assert_eq!(parse_marker(bad), None);
        }
    }
}
