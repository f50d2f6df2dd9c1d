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
//! # Errors
//!
//! Each error code has one class ([`ErrorClass`], see [`classify`]):
//!
//! | class | codes (examples) | what happens |
//! |---|---|---|
//! | too large | `MSG_SIZE_TOO_LARGE`, `RECORD_LIST_TOO_LARGE` | the record goes to the dead-letter topic (`too_large`), the rest of the batch goes on |
//! | rejected | `TOPIC_AUTHORIZATION_FAILED`, `INVALID_TOPIC_EXCEPTION`, unknown topic, `INVALID_RECORD`, `POLICY_VIOLATION` | the record goes to the dead-letter topic (`rejected`) |
//! | credentials | SASL authentication, `CLUSTER_AUTHORIZATION_FAILED` | permanent: outboxd stops with a message |
//! | fatal | librdkafka's fatal producer errors (idempotence state lost) | the producer is recreated and the batch retried |
//! | transient | everything else: transport, leader change, timeouts, purges | the batch is retried whole |
//!
//! A record is also dead-lettered as too large before it is produced when its message would
//! exceed the producer's `message.max.bytes`. A dead-letter message that does not fit either
//! loses its payload (and, if needed, the row's headers), with a note in `detail`. A
//! dead-letter message that Kafka refuses is a permanent error: nothing is dropped.
//!
//! # Effectively-once: transactions
//!
//! With [`KafkaConfig::transactions`] set, the producer is transactional (see
//! [`transactions`]): each batch is one Kafka transaction that also writes the WAL position of
//! the batch's last event to the offsets topic, and a new producer reads that position back
//! (`read_committed`) and skips what is at or below it.
//!
//! # Topics
//!
//! With `create_topics`, a topic (including the dead-letter topic) is created through the Admin
//! API the first time a batch needs it; "already exists" counts as success.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outboxd_core::{Delivery, Event, Ledger, Poison, PoisonKind, Record, Sink, SinkError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::dead_letter;

mod config;
pub mod transactions;

pub use config::{Kafka, KafkaSection, PROTECTED_OPTIONS, is_secret_option, protected_option};

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Bytes a message takes on the wire beyond its key, value and headers (an upper bound of
/// librdkafka's own estimate), and per header beyond its name and value.
const MESSAGE_OVERHEAD: usize = 64;
const HEADER_OVERHEAD: usize = 10;

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
    /// Effectively-once delivery through transactions; `None` for at-least-once.
    pub transactions: Option<TransactionsConfig>,
}

/// Settings of the transactional (effectively-once) mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionsConfig {
    /// The producer's `transactional.id`: one per slot, so that a new instance fences the
    /// previous one.
    pub transactional_id: String,
    /// The compacted topic that holds, per slot, the WAL position of the last event committed.
    pub offsets_topic: String,
    /// The key of this slot's records in the offsets topic.
    pub slot: String,
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

/// What to do about an error code from librdkafka or the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The message is larger than the broker or the producer accepts: dead-letter it.
    TooLarge,
    /// The broker refuses this message (its topic): dead-letter it.
    Rejected,
    /// The credentials or the permissions of the client are wrong: stop.
    Credentials,
    /// The producer is in a state it cannot leave: recreate it, retry the batch.
    Fatal,
    /// Anything that may pass: retry the batch.
    Transient,
}

/// Classifies an error code of a delivery report, an enqueue or the client.
pub fn classify(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge | C::MessageBatchTooLarge => ErrorClass::TooLarge,
        C::TopicAuthorizationFailed
        | C::InvalidTopic
        | C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::UnknownPartition
        | C::InvalidRecord
        | C::PolicyViolation
        | C::InvalidTimestamp
        | C::InvalidMessageSize
        | C::UnsupportedForMessageFormat
        | C::BadMessage => ErrorClass::Rejected,
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::InvalidRequiredAcks => ErrorClass::Credentials,
        C::Fatal
        | C::OutOfOrderSequenceNumber
        | C::UnknownProducerId
        | C::InvalidProducerEpoch
        | C::ProducerFenced
        | C::Fenced
        | C::InvalidProducerIdMapping => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

/// The last error librdkafka reported outside delivery reports (connection failures,
/// authentication), shown when a batch times out.
///
/// A refused authentication is kept until it is taken, over the errors that follow it: the
/// broker closes the connection after a failed SASL handshake, and librdkafka then reports a
/// transport failure on every reconnect, which would hide the reason (a wrong password would
/// read as an unreachable broker).
#[derive(Clone, Default)]
struct LastError(Arc<Mutex<Option<(RDKafkaErrorCode, String)>>>);

impl LastError {
    fn set(&self, code: RDKafkaErrorCode, text: String) {
        if let Ok(mut last) = self.0.lock() {
            let keep = last
                .as_ref()
                .is_some_and(|(kept, _)| classify(*kept) == ErrorClass::Credentials)
                && classify(code) != ErrorClass::Credentials;
            if !keep {
                *last = Some((code, text));
            }
        }
    }

    fn take(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.0.lock().ok().and_then(|mut last| last.take())
    }
}

/// Routes librdkafka's logs and client errors to `tracing`, and remembers the last error.
#[derive(Clone, Default)]
struct Context {
    last_error: LastError,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(facility, "librdkafka: {message}");
            }
            // Connection failures are logged at error level on every attempt; the sink
            // reports an outage once, through its errors.
            _ => tracing::debug!(facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
        tracing::debug!(%error, reason, "kafka client error");
        self.last_error.set(code, reason.to_owned());
    }
}

/// One message to produce, owning its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outgoing {
    topic: String,
    /// A fixed partition (the offsets topic's marker); `None` lets the key choose.
    partition: Option<i32>,
    key: Option<Bytes>,
    value: Bytes,
    headers: Vec<(String, Bytes)>,
}

impl Outgoing {
    /// The event in its topic.
    fn event(event: &Event) -> Outgoing {
        let mut headers = Vec::with_capacity(event.headers.pairs.len() + 2);
        headers.push(("id".to_owned(), event.id.clone()));
        headers.push(("type".to_owned(), event.event_type.clone()));
        headers.extend(event.headers.pairs.iter().cloned());
        Outgoing {
            topic: event.topic.clone(),
            partition: None,
            key: (!event.key.is_empty()).then(|| event.key.clone()),
            value: event.payload.clone(),
            headers,
        }
    }

    /// The event in the dead-letter topic: its message plus the context headers, made to fit
    /// in `max_bytes` by dropping the payload, then the row's headers, with a note in
    /// `detail`.
    fn dead_letter(event: &Event, poison: &Poison, topic: &str, max_bytes: usize) -> Outgoing {
        let build = |poison: &Poison, payload: bool, row_headers: bool| {
            let mut m = Outgoing::event(event);
            m.topic = topic.to_owned();
            if !row_headers {
                m.headers.truncate(2);
            }
            if !payload {
                m.value = Bytes::new();
            }
            m.headers.extend(
                dead_letter::context(event, poison)
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), value)),
            );
            m
        };
        let full = build(poison, true, true);
        if full.wire_size() <= max_bytes {
            return full;
        }
        let mut noted = poison.clone();
        noted.detail.push_str(&format!(
            "; payload ({} bytes) omitted from this dead-letter message to fit message.max.bytes ({max_bytes})",
            event.payload.len()
        ));
        let without_payload = build(&noted, false, true);
        if without_payload.wire_size() <= max_bytes {
            return without_payload;
        }
        noted.detail.push_str(", and so are the row's headers");
        build(&noted, false, false)
    }

    /// An upper bound of the message's size as librdkafka counts it for `message.max.bytes`.
    fn wire_size(&self) -> usize {
        MESSAGE_OVERHEAD
            + self.key.as_ref().map_or(0, Bytes::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + HEADER_OVERHEAD)
                .sum::<usize>()
    }

    fn record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            });
        }
        let mut record = FutureRecord::to(&self.topic)
            .payload(self.value.as_ref())
            .headers(headers);
        if let Some(partition) = self.partition {
            record = record.partition(partition);
        }
        match &self.key {
            Some(key) => record.key(key.as_ref()),
            None => record,
        }
    }
}

/// How one message of a round ended.
type Outcome = Result<(), KafkaError>;

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
        if let Some((name, why)) = config
            .options
            .iter()
            .find_map(|(n, v)| protected_option(n, v).map(|why| (n, why)))
        {
            return Err(SinkError::permanent(
                "sink.kafka.options may not set this librdkafka option",
                format!("{name}: {why}"),
            ));
        }
        let max_message_bytes = match config.options.get("message.max.bytes") {
            None => DEFAULT_MESSAGE_MAX_BYTES,
            Some(v) => v.trim().parse().map_err(|_| {
                SinkError::permanent(
                    "sink.kafka.options.\"message.max.bytes\" must be a number of bytes",
                    format!("got {v:?}"),
                )
            })?,
        };
        // librdkafka's log level: warnings unless `log_level` (syslog levels 0-7) asks for
        // more, for example with `debug = "broker,msg"` when troubleshooting.
        let log_level = match config.options.get("log_level").map(|v| v.trim()) {
            None => RDKafkaLogLevel::Warning,
            Some("0") => RDKafkaLogLevel::Emerg,
            Some("1") => RDKafkaLogLevel::Alert,
            Some("2") => RDKafkaLogLevel::Critical,
            Some("3") => RDKafkaLogLevel::Error,
            Some("4") => RDKafkaLogLevel::Warning,
            Some("5") => RDKafkaLogLevel::Notice,
            Some("6") => RDKafkaLogLevel::Info,
            Some("7") => RDKafkaLogLevel::Debug,
            Some(v) => {
                return Err(SinkError::permanent(
                    "sink.kafka.options.log_level must be a syslog level from 0 to 7",
                    format!("got {v:?}"),
                ));
            }
        };
        let mut client_config = ClientConfig::new();
        client_config
            .set("bootstrap.servers", &config.brokers)
            .set("client.id", "outboxd")
            .set_log_level(log_level);
        // outboxd batches itself (sink.linger_ms) and waits for every batch before the next:
        // librdkafka's own linger (5 ms by default) would be paid once per batch, a third of
        // the time of a 1,000-event batch on a local broker. Set it to send at once, unless
        // the options say otherwise.
        if !config
            .options
            .keys()
            .any(|k| k == "linger.ms" || k == "queue.buffering.max.ms")
        {
            client_config.set("linger.ms", "0");
        }
        for (name, value) in &config.options {
            client_config.set(name, value);
        }
        client_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0");
        if config.transactions.is_some() && !config.options.contains_key("retry.backoff.ms") {
            // A transaction's first records wait until the broker has written the markers of
            // the previous one: until then it answers CONCURRENT_TRANSACTIONS, and librdkafka
            // asks again after retry.backoff.ms. Its default (100 ms) made each 1,000-event
            // batch take about 100 ms on Apache Kafka; the markers take a few milliseconds.
            client_config.set("retry.backoff.ms", "5");
        }
        if let Some(t) = &config.transactions {
            // An aborted transaction is redone whole, so a per-message timeout cannot reorder
            // committed events; librdkafka requires it to be within the transaction timeout.
            let ms = config.delivery_timeout.as_millis().to_string();
            client_config
                .set("transactional.id", &t.transactional_id)
                .set("transaction.timeout.ms", &ms)
                .set("message.timeout.ms", &ms);
        }
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

    fn producer(&mut self) -> Result<FutureProducer<Context>, SinkError> {
        if let Some(p) = &self.producer {
            return Ok(p.clone());
        }
        let producer: FutureProducer<Context> = self
            .client_config
            .create_with_context(self.context.clone())
            .map_err(|e| {
                SinkError::permanent(
                    "the Kafka producer configuration was refused (check sink.kafka.options)",
                    e,
                )
            })?;
        self.producer = Some(producer.clone());
        Ok(producer)
    }

    /// Destroys the producer: what it still holds is purged, and a new one (with a new
    /// producer id) is made for the next batch.
    fn discard_producer(&mut self) {
        self.txn.producer_lost();
        if let Some(producer) = self.producer.take() {
            // Dropping it purges, flushes for up to 500 ms and joins librdkafka's threads.
            tokio::task::spawn_blocking(move || drop(producer));
        }
    }

    fn admin(&mut self) -> Result<&AdminClient<Context>, SinkError> {
        if self.admin.is_none() {
            // Not transactional: an admin client with a transactional.id would wait for
            // transactions that it never starts.
            let mut config = self.client_config.clone();
            config
                .remove("transactional.id")
                .remove("transaction.timeout.ms");
            let admin: AdminClient<Context> = config
                .create_with_context(self.context.clone())
                .map_err(|e| {
                    SinkError::permanent(
                        "the Kafka admin client configuration was refused (check sink.kafka.options)",
                        e,
                    )
                })?;
            self.admin = Some(admin);
        }
        Ok(self.admin.as_ref().expect("admin client was just set"))
    }

    /// Creates the topics of `names` that are not known yet, when `create_topics` is on.
    async fn ensure_topics<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), SinkError> {
        if !self.config.create_topics {
            return Ok(());
        }
        let mut missing: Vec<&str> = Vec::new();
        for name in names {
            if !name.is_empty() && !self.topics.contains(name) && !missing.contains(&name) {
                missing.push(name);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let replication = TopicReplication::Fixed(self.config.topic_replication_factor);
        let partitions = self.config.topic_partitions;
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|name| NewTopic::new(name, partitions, replication_copy(&replication)))
            .collect();
        let options = AdminOptions::new()
            .request_timeout(Some(self.config.timeout))
            .operation_timeout(Some(self.config.timeout));
        let results = self
            .admin()?
            .create_topics(new.iter(), &options)
            .await
            .map_err(|e| client_error("creating Kafka topics (sink.kafka.create_topics)", e))?;
        for result in results {
            match result {
                Ok(name) => {
                    tracing::info!(topic = %name, partitions, "created Kafka topic");
                    self.topics.insert(name);
                }
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    self.topics.insert(name);
                }
                Err((name, code)) => match classify(code) {
                    ErrorClass::Transient | ErrorClass::Fatal => {
                        return Err(SinkError::transient(
                            "creating Kafka topics (sink.kafka.create_topics)",
                            format!("topic {name:?}: {code}"),
                        ));
                    }
                    ErrorClass::Credentials => {
                        return Err(SinkError::permanent(
                            "creating Kafka topics (sink.kafka.create_topics): check the credentials and permissions in sink.kafka.options",
                            format!("topic {name:?}: {code}"),
                        ));
                    }
                    // An invalid name, a forbidden topic, a bad partition count: producing to
                    // it fails too, and that dead-letters its events with the broker's reason.
                    ErrorClass::TooLarge | ErrorClass::Rejected => {
                        tracing::warn!(topic = %name, error = %code, "cannot create Kafka topic; its events will be dead-lettered if the broker refuses them");
                        self.topics.insert(name);
                    }
                },
            }
        }
        Ok(())
    }

    /// Produces `messages` in order and waits for every delivery report, within
    /// `delivery_timeout`. `None` entries are skipped (their outcome is `Ok`).
    async fn round(&mut self, messages: &[Option<Outgoing>]) -> Result<Vec<Outcome>, SinkError> {
        let deadline = self.config.delivery_timeout;
        let producer = self.producer()?;
        match tokio::time::timeout(deadline, produce_all(&producer, messages)).await {
            Ok(outcomes) => Ok(outcomes),
            Err(_) => {
                self.discard_producer();
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

    /// What a failed delivery means for the batch: `Ok(Some(poison))` to dead-letter the
    /// record, `Err` to fail the batch.
    fn judge(&mut self, err: &KafkaError) -> Result<Poison, SinkError> {
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

/// `TopicReplication` is not `Clone`.
fn replication_copy<'a>(r: &TopicReplication<'a>) -> TopicReplication<'a> {
    match r {
        TopicReplication::Fixed(n) => TopicReplication::Fixed(*n),
        TopicReplication::Variable(v) => TopicReplication::Variable(v),
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
async fn produce_until_failure(
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

fn client_error(what: &'static str, e: KafkaError) -> SinkError {
    match e.rdkafka_error_code().map(classify) {
        Some(ErrorClass::Credentials) => SinkError::permanent(what, e),
        _ => SinkError::transient(what, e),
    }
}

impl KafkaSink {
    /// Round 1 of an at-least-once batch: every record, in batch order, to its topic (poison
    /// ones to the dead-letter topic). A message over `message.max.bytes` is not produced: it
    /// is rejected here and dead-lettered in round 2.
    fn first_round(&self, ledger: &mut Ledger<'_>) -> Vec<Option<Outgoing>> {
        let (dead_letter, max) = (&self.config.dead_letter, self.max_message_bytes);
        let mut first = Vec::with_capacity(ledger.batch().len());
        for (i, record) in ledger.batch().iter().enumerate() {
            let event = &record.event;
            if let Some(poison) = &record.poison {
                first.push(Some(Outgoing::dead_letter(event, poison, dead_letter, max)));
                continue;
            }
            let message = Outgoing::event(event);
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
    async fn dead_letter_round(&mut self, ledger: &Ledger<'_>) -> Result<(), SinkError> {
        let dead_letter = self.config.dead_letter.clone();
        let second: Vec<Option<Outgoing>> = ledger
            .rejections()
            .map(|(i, poison)| {
                Some(Outgoing::dead_letter(
                    &ledger.batch()[i].event,
                    poison,
                    &dead_letter,
                    self.max_message_bytes,
                ))
            })
            .collect();
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
        self.dead_letter_round(&ledger).await?;
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

/// Why a message of `size` bytes is not produced when the producer takes at most `max`.
fn too_large(size: usize, max: usize) -> Poison {
    Poison::new(
        PoisonKind::TooLarge,
        format!(
            "the message would be about {size} bytes, over the producer's message.max.bytes ({max})"
        ),
    )
}

/// The dead-letter topic refused a message: permanent, since the event would otherwise be
/// lost — unless the failure itself was transient (`retry` is that error).
fn dead_letter_refused(topic: &str, err: &KafkaError, judged: Option<SinkError>) -> SinkError {
    match judged {
        Some(e) if e.is_transient() => e,
        Some(SinkError::Permanent { what, source }) => SinkError::Permanent { what, source },
        _ => SinkError::permanent(
            "the dead-letter topic refused a message (check sink.dead_letter names a topic the \
             Kafka user may write, with a large enough max.message.bytes)",
            format!("topic {topic:?}: {err}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboxd_core::{Headers, Lsn, Position};

    fn event(payload: &str) -> Event {
        Event {
            id: Bytes::from_static(b"0b9c6a43-2a1d-4a86-8f0e-5b0b1f1f0c8e"),
            topic: "outbox.order".into(),
            key: Bytes::from_static(b"123"),
            event_type: Bytes::from_static(b"order.paid"),
            payload: Bytes::from(payload.to_owned()),
            headers: Headers {
                json: Bytes::from_static(br#"{"traceparent":"00-abc-01"}"#),
                pairs: vec![("traceparent".into(), Bytes::from_static(b"00-abc-01"))],
            },
            position: Position {
                commit_lsn: Lsn::new(0x1_6B37_4D48),
                index: 3,
            },
            commit_time_micros: 1_700_000_000_000_000,
        }
    }

    fn header<'a>(m: &'a Outgoing, name: &str) -> Option<&'a [u8]> {
        m.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn an_event_is_key_value_and_headers() {
        let m = Outgoing::event(&event(r#"{"amount":42}"#));
        assert_eq!(m.topic, "outbox.order");
        assert_eq!(m.key.as_deref(), Some(&b"123"[..]));
        assert_eq!(m.value.as_ref(), br#"{"amount":42}"#);
        let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["id", "type", "traceparent"]);
        assert_eq!(header(&m, "type"), Some(&b"order.paid"[..]));

        let mut keyless = event("{}");
        keyless.key = Bytes::new();
        assert_eq!(Outgoing::event(&keyless).key, None);
    }

    #[test]
    fn a_dead_letter_message_carries_the_context() {
        let poison = Poison::new(PoisonKind::Rejected, "kafka refused the message: x");
        let m = Outgoing::dead_letter(&event("{}"), &poison, "outboxd.dlq", 1_000_000);
        assert_eq!(m.topic, "outboxd.dlq");
        assert_eq!(m.key.as_deref(), Some(&b"123"[..]));
        assert_eq!(m.value.as_ref(), b"{}");
        let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "id",
                "type",
                "traceparent",
                "topic",
                "reason",
                "detail",
                "lsn",
                "index",
                "commit_time_us"
            ]
        );
        assert_eq!(header(&m, "topic"), Some(&b"outbox.order"[..]));
        assert_eq!(header(&m, "reason"), Some(&b"rejected"[..]));
        assert_eq!(header(&m, "lsn"), Some(&b"1/6B374D48"[..]));
        assert_eq!(header(&m, "index"), Some(&b"3"[..]));
    }

    #[test]
    fn a_too_large_dead_letter_message_drops_its_payload_and_says_so() {
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(50_000));
        let poison = Poison::new(PoisonKind::TooLarge, "over the limit");
        let m = Outgoing::dead_letter(&event(&big), &poison, "outboxd.dlq", 10_000);
        assert!(m.wire_size() <= 10_000);
        assert!(m.value.is_empty());
        assert_eq!(header(&m, "traceparent"), Some(&b"00-abc-01"[..]));
        let detail = String::from_utf8(header(&m, "detail").unwrap().to_vec()).unwrap();
        let note = format!("over the limit; payload ({} bytes) omitted", big.len());
        assert!(detail.starts_with(&note), "{detail}");

        // Headers too large as well: they go too, and the detail says so.
        let mut e = event(&big);
        e.headers.pairs = vec![("blob".into(), Bytes::from("h".repeat(20_000)))];
        let m = Outgoing::dead_letter(&e, &poison, "outboxd.dlq", 10_000);
        assert!(m.wire_size() <= 10_000);
        assert_eq!(header(&m, "blob"), None);
        let detail = String::from_utf8(header(&m, "detail").unwrap().to_vec()).unwrap();
        assert!(detail.ends_with("and so are the row's headers"), "{detail}");
    }

    #[test]
    fn the_size_estimate_is_not_below_librdkafkas() {
        // librdkafka: 36 bytes of record overhead + key + value + serialized headers (two
        // varints and the bytes per header).
        let m = Outgoing::event(&event("{}"));
        let librdkafka = 36
            + 3
            + 2
            + m.headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum::<usize>();
        assert!(m.wire_size() >= librdkafka);
    }

    #[test]
    fn errors_are_classified_by_what_to_do() {
        use RDKafkaErrorCode as C;
        for code in [C::MessageSizeTooLarge, C::MessageBatchTooLarge] {
            assert_eq!(classify(code), ErrorClass::TooLarge, "{code:?}");
        }
        for code in [
            C::TopicAuthorizationFailed,
            C::InvalidTopic,
            C::UnknownTopic,
            C::UnknownTopicOrPartition,
            C::InvalidRecord,
            C::PolicyViolation,
        ] {
            assert_eq!(classify(code), ErrorClass::Rejected, "{code:?}");
        }
        for code in [
            C::SaslAuthenticationFailed,
            C::Authentication,
            C::ClusterAuthorizationFailed,
        ] {
            assert_eq!(classify(code), ErrorClass::Credentials, "{code:?}");
        }
        for code in [C::Fatal, C::OutOfOrderSequenceNumber, C::UnknownProducerId] {
            assert_eq!(classify(code), ErrorClass::Fatal, "{code:?}");
        }
        for code in [
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::RequestTimedOut,
            C::MessageTimedOut,
            C::NotEnoughReplicas,
            C::NotEnoughReplicasAfterAppend,
            C::NetworkException,
            C::PurgeQueue,
            C::PurgeInflight,
            C::QueueFull,
            C::KafkaStorageError,
            C::Unknown,
        ] {
            assert_eq!(classify(code), ErrorClass::Transient, "{code:?}");
        }
    }

    #[test]
    fn a_refused_authentication_is_not_hidden_by_the_transport_failures_after_it() {
        let last = LastError::default();
        last.set(RDKafkaErrorCode::BrokerTransportFailure, "refused".into());
        last.set(
            RDKafkaErrorCode::Authentication,
            "SASL authentication error: invalid credentials".into(),
        );
        last.set(
            RDKafkaErrorCode::BrokerTransportFailure,
            "disconnected".into(),
        );
        last.set(RDKafkaErrorCode::AllBrokersDown, "all down".into());
        assert_eq!(
            last.take().map(|(code, _)| code),
            Some(RDKafkaErrorCode::Authentication)
        );
        // Taken: what comes next is reported as it is.
        last.set(RDKafkaErrorCode::BrokerTransportFailure, "refused".into());
        assert_eq!(
            last.take().map(|(code, _)| code),
            Some(RDKafkaErrorCode::BrokerTransportFailure)
        );
    }

    #[test]
    fn options_may_not_weaken_the_producer() {
        assert!(protected_option("enable.idempotence", "false").is_some());
        assert!(protected_option("enable.idempotence", "true").is_none());
        assert!(protected_option("acks", "1").is_some());
        assert!(protected_option("acks", "all").is_none());
        assert!(protected_option("acks", "-1").is_none());
        assert!(protected_option("message.timeout.ms", "30000").is_some());
        assert!(protected_option("delivery.timeout.ms", "0").is_some());
        assert!(protected_option("bootstrap.servers", "x:9092").is_some());
        assert!(protected_option("retries", "3").is_some());
        assert!(protected_option("message.send.max.retries", "3").is_some());
        assert!(protected_option("compression.type", "lz4").is_none());
        assert!(protected_option("security.protocol", "sasl_ssl").is_none());

        let config = |options: &[(&str, &str)]| KafkaConfig {
            brokers: "127.0.0.1:9".into(),
            dead_letter: "dlq".into(),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            create_topics: false,
            topic_partitions: 1,
            topic_replication_factor: -1,
            delivery_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            transactions: None,
        };
        let err = KafkaSink::new(config(&[("acks", "1")])).unwrap_err();
        assert!(!err.is_transient());
        assert!(err.to_string().contains("acks"), "{err}");
        let err = KafkaSink::new(config(&[("no.such.option", "1")])).unwrap_err();
        assert!(!err.is_transient());
        assert!(err.to_string().contains("no.such.option"), "{err}");
        let err = KafkaSink::new(config(&[("message.max.bytes", "lots")])).unwrap_err();
        assert!(err.to_string().contains("message.max.bytes"), "{err}");
        let sink = KafkaSink::new(config(&[
            ("compression.type", "lz4"),
            ("sasl.password", "hunter2"),
        ]))
        .unwrap();
        assert!(!format!("{sink:?}").contains("hunter2"));
    }
}
