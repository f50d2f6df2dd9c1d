//! Where a new transactional producer resumes: it fences the older ones, then reads back, from
//! the offsets topic, the position of the last event committed.
//!
//! `init_transactions` fences every older producer of the same `transactional.id` and
//! completes or aborts its open transaction, so what the offsets topic holds afterwards, read
//! with `isolation.level = read_committed`, is final: the newest marker of this WAL history's
//! key is the last event in Kafka, and the sink skips every event it covers, as far as
//! [`WalOrigin::trust`](outboxd_core::WalOrigin::trust) says the marker is this server's
//! history (a marker of another history skips nothing, and is reported). An offsets topic that
//! does not exist yet means nothing was committed. With `create_topics`, the offsets topic is
//! created first, with one partition and `cleanup.policy = compact`.
//!
//! The consumer that reads it has `sink.kafka.options` (TLS, SASL) less the producer-only
//! options.

use std::time::Duration;

use outboxd_core::{Marker, SinkError, Trust};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::kafka::KafkaSink;
use crate::kafka::errors::{Context, ErrorClass, classify, client_error};

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

impl KafkaSink {
    /// Makes the producer transactional (fencing older ones) and learns how far the source
    /// was delivered.
    pub(super) async fn ensure_transactional(&mut self) -> Result<(), SinkError> {
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
                    "Kafka refused the transactional producer: check the credentials in \
                     sink.kafka.options",
                    e,
                ),
                Some(ErrorClass::Refused) => SinkError::refused(
                    "Kafka refuses the transactional producer: grant the user Write and Describe \
                     on its transactional.id (an ACL on TransactionalId)",
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
        let key = t.origin.key();
        let read = self.read_marker(&t.offsets_topic, &key).await?;
        // What this sink committed itself is final too (a producer discarded after a commit).
        let newest = match (read, self.txn.committed.as_ref().map(|(m, _)| *m)) {
            (Some(read), Some(mine)) if mine.timeline == read.timeline => {
                Some(read.max_by_position(mine))
            }
            (read, mine) => read.or(mine),
        };
        self.txn.committed = newest.map(|m| {
            let trust = t.origin.trust(&m);
            if let Trust::Foreign(why) = &trust {
                tracing::warn!(
                    key = %key,
                    offsets_topic = %t.offsets_topic,
                    marker = %m.to_json(),
                    "effectively-once: the offsets topic's marker is not of this server's WAL \
                     history ({why}); nothing is skipped against it, so events Kafka already \
                     holds from before may be delivered again"
                );
            } else if let Trust::Below(end) = trust {
                tracing::warn!(
                    key = %key,
                    marker = %m.to_json(),
                    %end,
                    "effectively-once: the marker was written on an earlier timeline, which \
                     ended at {end}; only events committed before that are skipped against it"
                );
            }
            (m, trust)
        });
        self.txn.ready = true;
        tracing::info!(
            transactional_id = %t.transactional_id,
            offsets_topic = %t.offsets_topic,
            key = %key,
            committed = %self.txn.committed.as_ref().map_or_else(|| "nothing yet".to_owned(), |(m, _)| m.to_json()),
            "Kafka transactions ready; events the committed marker covers are skipped"
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

    /// The newest marker recorded under `key` in the offsets topic's partition 0 (the last by
    /// offset), read with `isolation.level = read_committed`.
    async fn read_marker(&self, topic: &str, key: &str) -> Result<Option<Marker>, SinkError> {
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
            .set("group.id", format!("outboxd-offsets-{key}"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        let (topic, key) = (topic.to_owned(), key.to_owned());
        let timeout = self.config.timeout;
        tokio::task::spawn_blocking(move || read_marker_blocking(&config, &topic, &key, timeout))
            .await
            .map_err(|e| SinkError::transient("reading the offsets topic", e.to_string()))?
    }
}

/// [`KafkaSink::read_marker`]'s work, on a blocking thread: reads partition 0 from its
/// beginning to the high watermark it found first, within three times `timeout`.
fn read_marker_blocking(
    config: &ClientConfig,
    topic: &str,
    key: &str,
    timeout: Duration,
) -> Result<Option<Marker>, SinkError> {
    let err = |e| client_error("reading the offsets topic", e);
    let consumer: BaseConsumer<Context> = config.create_with_context(Context::default()).map_err(|e| {
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
    let mut newest: Option<Marker> = None;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                // The last one by offset: after a new timeline, positions may go down.
                if message.key() == Some(key.as_bytes())
                    && let Some(m) = message.payload().and_then(Marker::from_json)
                {
                    newest = Some(m);
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
