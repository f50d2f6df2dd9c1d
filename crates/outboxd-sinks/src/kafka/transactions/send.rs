//! One batch as one Kafka transaction: its events (and dead letters) and the marker of its
//! last event, committed together.
//!
//! Events the committed marker covers (as far as this WAL history trusts it) are duplicates,
//! already in Kafka, and are not sent again. A round produces the rest, then the marker, and commits only when every
//! delivery report says the message was written. Otherwise the transaction is aborted: a
//! record Kafka refused alone is dead-lettered in the redo (each redo dead-letters at least one
//! more record, so the loop ends); anything else fails the batch, transient or permanent, and
//! fencing stops this instance for good. A transaction call that fails in a way that is not
//! abortable discards the producer, and the next one reads the marker again, so a commit that
//! did happen is never repeated.

use outboxd_core::{Delivery, Ledger, Poison, PoisonKind, Record, SinkError, Trust};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};

use super::{fenced_error, is_fenced};
use crate::kafka::KafkaSink;
use crate::kafka::errors::{Context, ErrorClass, classify, dead_letter_refused, refused};
use crate::kafka::message::{Outgoing, too_large};
use crate::kafka::produce::produce_until_failure;

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
    /// One batch as one Kafka transaction; see the module documentation.
    pub(in crate::kafka) async fn send_transactional(
        &mut self,
        batch: &[Record],
    ) -> Result<Delivery, SinkError> {
        self.ensure_transactional().await?;
        let mut ledger = Ledger::new(batch);
        let first_new = batch
            .iter()
            .position(|r| !self.txn.covers(r.event.position))
            .unwrap_or(batch.len());
        (0..first_new).for_each(|i| ledger.duplicate(i));
        let Some(last) = batch.last().map(|r| r.event.position) else {
            return Ok(ledger.finish());
        };
        if first_new == batch.len() {
            return Ok(ledger.finish());
        }
        let (written, marker) = self.marker(last);
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
                self.txn.committed = Some((written, Trust::Whole));
                return Ok(ledger.finish());
            }
            self.abort(&producer).await;
            if let Some(fenced) = self.fenced_now() {
                return Err(fenced);
            }
            round.redo(&mut ledger)?;
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
        let shape = &self.config.shape;
        let batch = ledger.batch();
        let mut messages = Vec::with_capacity(batch.len() + 1);
        for (i, record) in batch.iter().enumerate().skip(first_new) {
            let message = match ledger.poison(i) {
                Some(p) => Outgoing::dead_letter(&record.event, p, dead_letter, max, shape),
                None => match Outgoing::event(&record.event, shape).and_then(|m| fits(m, max)) {
                    Ok(message) => message,
                    Err(poison) => {
                        let letter =
                            Outgoing::dead_letter(&record.event, &poison, dead_letter, max, shape);
                        ledger.reject(i, poison);
                        letter
                    }
                },
            };
            if ledger.poison(i).is_some() && message.omits_payload_of(&record.event) {
                ledger.omit_payload(i);
            }
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
            if let Some(refused) = self
                .missing_topic(messages.iter().flatten().map(|m| m.topic.as_str()))
                .await
            {
                return Err(refused);
            }
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
                ErrorClass::Refused => {
                    round.failure = Some(refused(err.clone()));
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
            Some(ErrorClass::Refused) => refused(err),
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
}

/// `message`, or `too_large` when it is over `max` bytes.
fn fits(message: Outgoing, max: usize) -> Result<Outgoing, Poison> {
    let size = message.wire_size();
    if size <= max {
        Ok(message)
    } else {
        Err(too_large(size, max))
    }
}
