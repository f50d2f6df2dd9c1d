//! Producing messages and reading their delivery reports.
//!
//! A round ([`KafkaSink::round`]) enqueues its messages in order, waiting for room when
//! librdkafka's queue is full (`queue.buffering.max.*`) rather than skipping one, then waits
//! for the delivery report of each, all within `delivery_timeout`. When that time passes, the
//! producer is destroyed (which purges what it still holds) and the round fails as transient,
//! with librdkafka's last client error in the message; a refused authentication fails it as
//! permanent instead. A report that never comes because the producer went away counts as not
//! delivered.
//!
//! [`KafkaSink::judge`] says what one failed delivery means: a record Kafka refuses alone (too
//! large, rejected) becomes poison, to dead-letter; refused credentials are permanent; a fatal
//! producer error discards the producer and fails the batch as transient, for a new producer
//! to send again; anything else is transient.
//!
//! In a transaction, [`produce_until_failure`] takes the reports as they come and stops at the
//! first failure, since librdkafka sends nothing more of a transaction once one of its
//! messages failed.

use std::time::Duration;

use outboxd_core::{Poison, PoisonKind, SinkError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};

use super::KafkaSink;
use super::errors::{Context, ErrorClass, classify, refused};
use super::message::Outgoing;

/// How one message of a round ended.
pub(super) type Outcome = Result<(), KafkaError>;

impl KafkaSink {
    /// Produces `messages` in order and waits for every delivery report, within
    /// `delivery_timeout`. `None` entries are skipped (their outcome is `Ok`).
    pub(super) async fn round(
        &mut self,
        messages: &[Option<Outgoing>],
    ) -> Result<Vec<Outcome>, SinkError> {
        let deadline = self.config.delivery_timeout;
        let producer = self.producer()?;
        match tokio::time::timeout(deadline, produce_all(&producer, messages)).await {
            Ok(outcomes) => Ok(outcomes),
            Err(_) => {
                self.discard_producer();
                if let Some(refused) = self
                    .missing_topic(messages.iter().flatten().map(|m| m.topic.as_str()))
                    .await
                {
                    return Err(refused);
                }
                let last = self.context.last_error.take();
                let count = messages.iter().flatten().count();
                if let Some((code, text)) = &last
                    && classify(*code) == ErrorClass::Credentials
                {
                    return Err(SinkError::permanent(
                        "Kafka refused the client: check the credentials and permissions in sink.kafka.options",
                        format!("{code}: {text}"),
                    ));
                }
                let why = match last {
                    Some((code, text)) => format!("; last client error: {code}: {text}"),
                    None => String::new(),
                };
                Err(SinkError::transient(
                    "waiting for Kafka delivery reports",
                    format!(
                        "not every one of {count} messages was acknowledged within sink.kafka.delivery_timeout_ms ({} ms){why}",
                        deadline.as_millis()
                    ),
                ))
            }
        }
    }

    /// What a failed delivery means for the batch: `Ok(poison)` to dead-letter the record,
    /// `Err` to fail the batch.
    pub(super) fn judge(&mut self, err: &KafkaError) -> Result<Poison, SinkError> {
        let code = err
            .rdkafka_error_code()
            .unwrap_or(RDKafkaErrorCode::Unknown);
        match classify(code) {
            ErrorClass::TooLarge => Ok(Poison::new(
                PoisonKind::TooLarge,
                format!("kafka refused the message: {err}"),
            )),
            ErrorClass::Rejected => Ok(Poison::new(
                PoisonKind::Rejected,
                format!("kafka refused the message: {err}"),
            )),
            ErrorClass::Credentials => Err(SinkError::permanent(
                "Kafka refused the client: check the credentials and permissions in sink.kafka.options",
                err.clone(),
            )),
            ErrorClass::Refused => {
                // A deleted topic is created again (with create_topics) before the retry.
                self.topics.clear();
                Err(refused(err.clone()))
            }
            ErrorClass::Fatal => {
                let fatal = self
                    .producer
                    .as_ref()
                    .and_then(|p| p.client().fatal_error());
                self.discard_producer();
                match fatal {
                    Some((code, text)) if classify(code) == ErrorClass::Credentials => {
                        Err(SinkError::permanent(
                            "Kafka refused the client: check the credentials and permissions in sink.kafka.options",
                            format!("{code}: {text}"),
                        ))
                    }
                    Some((code, text)) => Err(SinkError::transient(
                        "the Kafka producer failed fatally; a new producer sends the batch again",
                        format!("{code}: {text}"),
                    )),
                    None => Err(SinkError::transient(
                        "the Kafka producer failed fatally; a new producer sends the batch again",
                        err.clone(),
                    )),
                }
            }
            ErrorClass::Transient => Err(SinkError::transient(
                "delivering a batch to Kafka",
                err.clone(),
            )),
        }
    }
}

/// Enqueues every message in order, waiting for room when librdkafka's queue is full, then
/// waits for each delivery report.
async fn produce_all(
    producer: &FutureProducer<Context>,
    messages: &[Option<Outgoing>],
) -> Vec<Outcome> {
    let mut outcomes = Vec::with_capacity(messages.len());
    for p in enqueue_all(producer, messages).await {
        outcomes.push(match p {
            None => Ok(()),
            Some(Err(e)) => Err(e),
            Some(Ok(delivery)) => delivered(delivery.await),
        });
    }
    outcomes
}

/// Like [`produce_all`], for a transaction: takes the delivery reports as they come and stops
/// at the first failure. Once one message of a transaction fails, librdkafka sends nothing
/// more of it until it is aborted, so the reports of the others would only come when their
/// timeout passes. The outcomes not known then are `None`.
pub(super) async fn produce_until_failure(
    producer: &FutureProducer<Context>,
    messages: &[Option<Outgoing>],
) -> Vec<Option<Outcome>> {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(messages.len());
    let mut waiting = FuturesUnordered::new();
    for (i, p) in enqueue_all(producer, messages)
        .await
        .into_iter()
        .enumerate()
    {
        match p {
            None => outcomes.push(Some(Ok(()))),
            Some(Err(e)) => outcomes.push(Some(Err(e))),
            Some(Ok(delivery)) => {
                outcomes.push(None);
                waiting.push(async move { (i, delivered(delivery.await)) });
            }
        }
    }
    if outcomes.iter().any(|o| matches!(o, Some(Err(_)))) {
        return outcomes;
    }
    while let Some((i, outcome)) = waiting.next().await {
        let failed = outcome.is_err();
        outcomes[i] = Some(outcome);
        if failed {
            break;
        }
    }
    outcomes
}

/// A delivery report as an outcome.
fn delivered<Canceled>(
    report: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, Canceled>,
) -> Outcome {
    match report {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _message))) => Err(e),
        // The producer went away before reporting: treat it as not delivered.
        Err(_canceled) => Err(KafkaError::Canceled),
    }
}

/// Enqueues every message in order, waiting for room when librdkafka's queue is full; `None`
/// entries stay `None`.
async fn enqueue_all(
    producer: &FutureProducer<Context>,
    messages: &[Option<Outgoing>],
) -> Vec<Option<Result<DeliveryFuture, KafkaError>>> {
    let mut pending: Vec<Option<Result<DeliveryFuture, KafkaError>>> =
        Vec::with_capacity(messages.len());
    let mut waited_for_room = false;
    for message in messages {
        let Some(message) = message else {
            pending.push(None);
            continue;
        };
        let mut record = message.record();
        let enqueued = loop {
            match producer.send_result(record) {
                Ok(delivery) => break Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // Backpressure: librdkafka's queue is full (queue.buffering.max.*); wait
                    // for deliveries to make room, then go on in order.
                    record = r;
                    if !waited_for_room {
                        tracing::debug!(
                            "librdkafka's queue is full (queue.buffering.max.messages/kbytes); waiting for room"
                        );
                        waited_for_room = true;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => break Err(e),
            }
        };
        pending.push(Some(enqueued));
    }
    pending
}
