//! Kafka, through librdkafka (rdkafka).
//!
//! Each event becomes one message: topic = the routed topic, key = the route key (none when
//! empty), value = the payload, headers `id`, `type`, then the row's headers in their order.
//!
//! # Acknowledgement
//!
//! The producer is idempotent (`enable.idempotence=true`, `acks=all`): a record counts as
//! acknowledged when its delivery report says the partition leader wrote it and every in-sync
//! replica has it. [`KafkaSink::send`] enqueues the whole batch in order, then waits for the
//! report of every message; it resolves `Ok` only when each record is in its topic or, refused
//! alone, in the dead-letter topic.
//!
//! # Order, also under retries
//!
//! librdkafka keeps produce order per partition and, being idempotent, retries without
//! duplicating or reordering. One thing could still reorder *first deliveries*: librdkafka's own
//! per-message timeout (`message.timeout.ms`). If messages 2 and 3 of a partition time out while
//! 4 and 5 are written later, sending the batch again would put 2 and 3 after 4 and 5. So:
//!
//! - `message.timeout.ms = 0` (no per-message timeout): librdkafka retries retriable errors
//!   (broker down, leader change, request timeouts) for as long as it takes, in order, and
//!   never skips a message of a partition while a later one goes through;
//! - outboxd bounds the wait instead, for the whole batch (`delivery_timeout`). When it passes,
//!   the producer is destroyed, which purges everything queued and in flight, and the batch
//!   fails as transient. What the broker wrote of it is, per partition, a prefix of the batch
//!   (the broker accepts an idempotent producer's messages only in sequence). The retry, by a
//!   new producer, writes the whole batch again after it: duplicates, but the first copy of
//!   every event is still in commit order.
//!
//! # Errors and dead letters
//!
//! Each error code has one class ([`ErrorClass`], see [`classify`]): too large and rejected
//! dead-letter the record, the rest of the batch goes on; refused credentials stop outboxd;
//! a fatal producer error recreates the producer; anything else retries the batch whole. A
//! record whose message would exceed the producer's `message.max.bytes` is dead-lettered as
//! too large before it is produced. A dead-letter message that Kafka refuses is a permanent
//! error: nothing is dropped.
//!
//! An at-least-once batch is two rounds: every record to its topic (poison ones to the
//! dead-letter topic), then the records Kafka refused alone, to the dead-letter topic.
//!
//! # Effectively-once: transactions
//!
//! With [`KafkaConfig::transactions`] set, the producer is transactional (see
//! [`transactions`]): each batch is one Kafka transaction that also writes the WAL position of
//! the batch's last event to the offsets topic, under the key of its WAL history, and a new
//! producer reads that position back (`read_committed`) and skips what is at or below it, as
//! far as the position belongs to the server's history.
//!
//! # Topics
//!
//! With `create_topics`, a topic (including the dead-letter topic) is created through the Admin
//! API the first time a batch needs it; "already exists" counts as success.
//!
//! # Files
//!
//! - `mod.rs`: the settings, the sink, and the at-least-once rounds;
//! - `config.rs`: `[sink.kafka]`, the options outboxd protects, the plugin;
//! - `producer.rs`: the producer's librdkafka configuration, and its life;
//! - `message.rs`: the wire form of an event or a dead letter, and its size;
//! - `produce.rs`: enqueueing, delivery reports, and what a failed delivery means;
//! - `errors.rs`: the class of each error code, the client's last error;
//! - `topics.rs`: creating topics through the Admin API;
//! - `transactions/`: effectively-once: the state and markers, the transactional send, and
//!   where a new producer resumes.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use outboxd_core::{Delivery, Ledger, Record, Sink, SinkError, WalOrigin};
use rdkafka::admin::AdminClient;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, Producer};

mod config;
mod errors;
mod message;
mod produce;
mod producer;
mod topics;
pub mod transactions;

pub use config::{Kafka, KafkaSection, PROTECTED_OPTIONS, is_secret_option, protected_option};
pub use errors::{ErrorClass, classify};
pub use producer::DEFAULT_MESSAGE_MAX_BYTES;

use errors::{Context, client_error, dead_letter_refused};
pub use message::Shape;
use message::{Outgoing, too_large};
use produce::Outcome;

/// Kafka sink settings.
#[derive(Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The topic for dead-letter messages.
    pub dead_letter: String,
    /// librdkafka settings passed as is (TLS, SASL, compression, batching…).
    pub options: BTreeMap<String, String>,
    /// Create missing topics through the Admin API.
    pub create_topics: bool,
    /// Partitions of the topics outboxd creates.
    pub topic_partitions: i32,
    /// Replication factor of the topics outboxd creates; -1 for the broker's default.
    pub topic_replication_factor: i32,
    /// How long a batch may wait for its delivery reports before it is failed and retried.
    pub delivery_timeout: Duration,
    /// How long metadata and Admin requests may take.
    pub timeout: Duration,
    /// `[sink] delivery = "effectively-once"`.
    pub effectively_once: bool,
    /// Effectively-once delivery through transactions, for the WAL history of one session;
    /// `None` for at-least-once, and for a sink that only answers pings.
    pub transactions: Option<TransactionsConfig>,
    /// How events are laid out (the `type` header, CloudEvents).
    pub shape: Shape,
}

/// Settings of the transactional (effectively-once) mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionsConfig {
    /// The producer's `transactional.id`: one per slot of one cluster and database, so that a
    /// new instance fences the previous one and two services never fence each other.
    pub transactional_id: String,
    /// The compacted topic that holds, per WAL history, the position of the last event
    /// committed.
    pub offsets_topic: String,
    /// The WAL history the events come from: the key of its markers, and what a marker of
    /// another timeline may be trusted for.
    pub origin: WalOrigin,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Options may hold passwords: show only their names.
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("dead_letter", &self.dead_letter)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("timeout", &self.timeout)
            .field("transactions", &self.transactions)
            .finish()
    }
}

/// Publishes batches to Kafka.
pub struct KafkaSink {
    config: KafkaConfig,
    client_config: ClientConfig,
    context: Context,
    /// Created on first use, and again after a timeout or a fatal error.
    producer: Option<FutureProducer<Context>>,
    /// Transactional mode: whether `producer` has run `init_transactions`, and the position
    /// of the last event committed (read back from the offsets topic after it did).
    txn: transactions::State,
    admin: Option<AdminClient<Context>>,
    /// Topics known to exist (or created) when `create_topics` is on.
    topics: HashSet<String>,
    /// The producer's `message.max.bytes`.
    max_message_bytes: usize,
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSink")
            .field("config", &self.config)
            .field("connected", &self.producer.is_some())
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Checks the settings and builds the producer configuration; connects on first use.
    pub fn new(config: KafkaConfig) -> Result<Self, SinkError> {
        producer::check_options(&config.options)?;
        let max_message_bytes = producer::max_message_bytes(&config.options)?;
        let client_config = producer::client_config(&config)?;
        let mut sink = KafkaSink {
            config,
            client_config,
            context: Context::default(),
            producer: None,
            txn: transactions::State::default(),
            admin: None,
            topics: HashSet::new(),
            max_message_bytes,
        };
        // librdkafka checks every option when the client is made: a typo stops outboxd at
        // startup rather than at the first event.
        let _producer = sink.producer()?;
        Ok(sink)
    }

    /// Round 1 of an at-least-once batch: every record, in batch order, to its topic (poison
    /// ones to the dead-letter topic). A message over `message.max.bytes` is not produced: it
    /// is rejected here and dead-lettered in round 2.
    fn first_round(&self, ledger: &mut Ledger<'_>) -> Vec<Option<Outgoing>> {
        let (dead_letter, max) = (&self.config.dead_letter, self.max_message_bytes);
        let mut first = Vec::with_capacity(ledger.batch().len());
        for (i, record) in ledger.batch().iter().enumerate() {
            let event = &record.event;
            if let Some(poison) = &record.poison {
                let letter =
                    Outgoing::dead_letter(event, poison, dead_letter, max, &self.config.shape);
                if letter.omits_payload_of(event) {
                    ledger.omit_payload(i);
                }
                first.push(Some(letter));
                continue;
            }
            let message = match Outgoing::event(event, &self.config.shape) {
                Ok(message) => message,
                Err(poison) => {
                    ledger.reject(i, poison);
                    first.push(None);
                    continue;
                }
            };
            let size = message.wire_size();
            if size > max {
                ledger.reject(i, too_large(size, max));
                first.push(None);
            } else {
                first.push(Some(message));
            }
        }
        first
    }

    /// Reads round 1's delivery reports: records Kafka refused alone are rejected; any other
    /// failure fails the batch (the first one, or the first permanent one).
    fn judge_round(
        &mut self,
        ledger: &mut Ledger<'_>,
        outcomes: Vec<Outcome>,
    ) -> Result<(), SinkError> {
        let mut failure: Option<SinkError> = None;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let Err(err) = outcome else { continue };
            if ledger.batch()[i].poison.is_some() {
                let judged = self.judge(&err).err();
                return Err(dead_letter_refused(&self.config.dead_letter, &err, judged));
            }
            match self.judge(&err) {
                Ok(poison) => ledger.reject(i, poison),
                // Keep the first error; the batch is sent again whole.
                Err(e) => {
                    if failure.is_none() || !e.is_transient() {
                        failure = Some(e);
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Round 2: the records Kafka (or the size check) refused, to the dead-letter topic.
    async fn dead_letter_round(&mut self, ledger: &mut Ledger<'_>) -> Result<(), SinkError> {
        let dead_letter = self.config.dead_letter.clone();
        let mut omitted = Vec::new();
        let second: Vec<Option<Outgoing>> = ledger
            .rejections()
            .map(|(i, poison)| {
                let event = &ledger.batch()[i].event;
                let letter = Outgoing::dead_letter(
                    event,
                    poison,
                    &dead_letter,
                    self.max_message_bytes,
                    &self.config.shape,
                );
                if letter.omits_payload_of(event) {
                    omitted.push(i);
                }
                Some(letter)
            })
            .collect();
        for i in omitted {
            ledger.omit_payload(i);
        }
        if second.is_empty() {
            return Ok(());
        }
        self.ensure_topics([dead_letter.as_str()]).await?;
        for outcome in self.round(&second).await? {
            if let Err(err) = outcome {
                let judged = self.judge(&err);
                return Err(dead_letter_refused(&dead_letter, &err, judged.err()));
            }
        }
        Ok(())
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Delivery, SinkError> {
        if self.config.transactions.is_some() {
            return self.send_transactional(batch).await;
        }
        if self.config.effectively_once {
            return Err(SinkError::permanent(
                "sending in effectively-once mode",
                "this Kafka sink was built without the WAL history of a replication session \
                 (a probe); it may only answer pings",
            ));
        }
        let mut ledger = Ledger::new(batch);
        let first = self.first_round(&mut ledger);
        let topics: Vec<&str> = first
            .iter()
            .flatten()
            .map(|m| m.topic.as_str())
            .chain(
                ledger
                    .any_dead_letter()
                    .then_some(self.config.dead_letter.as_str()),
            )
            .collect();
        let topics: Vec<String> = topics.into_iter().map(str::to_owned).collect();
        self.ensure_topics(topics.iter().map(String::as_str))
            .await?;
        let outcomes = self.round(&first).await?;
        self.judge_round(&mut ledger, outcomes)?;
        self.dead_letter_round(&mut ledger).await?;
        Ok(ledger.finish())
    }

    async fn ping(&mut self) -> Result<(), SinkError> {
        let producer = self.producer()?;
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        // Metadata in short attempts, so that a refused authentication (reported at once by
        // the client, while a metadata request would wait for its whole timeout) ends the
        // ping early.
        loop {
            let attempt = (deadline - tokio::time::Instant::now()).min(PING_ATTEMPT);
            let p = producer.clone();
            let result =
                tokio::task::spawn_blocking(move || p.client().fetch_metadata(None, attempt))
                    .await
                    .map_err(|e| SinkError::transient("fetching Kafka metadata", e.to_string()))?;
            let Err(e) = result else {
                return Ok(());
            };
            if let Some((code, text)) = self.context.last_error.take()
                && classify(code) == ErrorClass::Credentials
            {
                return Err(SinkError::permanent(
                    "Kafka refused the client: check the credentials and permissions in sink.kafka.options",
                    format!("{code}: {text}"),
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(client_error("fetching Kafka metadata", e));
            }
        }
    }
}

/// The longest one metadata request of [`KafkaSink::ping`] may wait.
const PING_ATTEMPT: Duration = Duration::from_millis(500);
