//! The producer: its librdkafka configuration, made once from [`KafkaConfig`], and its life.
//!
//! outboxd's own settings go over `sink.kafka.options`, which may not change them: the options
//! of [`PROTECTED_OPTIONS`](super::PROTECTED_OPTIONS) are refused, with the reason, before
//! anything is made.
//!
//! - `enable.idempotence = true` and `acks = all`: retries neither duplicate nor reorder, and a
//!   message counts as delivered once every in-sync replica has it;
//! - `message.timeout.ms = 0`: no per-message timeout, which could reorder first deliveries
//!   (see the overview in `kafka/mod.rs`); `delivery_timeout` bounds a whole batch instead. In
//!   transactional mode it is `delivery_timeout`, as is `transaction.timeout.ms`: an aborted
//!   transaction is redone whole, so it cannot reorder committed events;
//! - `linger.ms = 0` unless the options set a linger: outboxd batches itself;
//! - in transactional mode, `transactional.id`, and `retry.backoff.ms = 5` unless set.
//!
//! Two options are read as well: `message.max.bytes` (librdkafka's default unless set), to
//! size messages, and `log_level`.
//!
//! The producer is made when the sink is (librdkafka checks every option then, so a typo stops
//! outboxd at startup), and made again after it was discarded (a batch timed out, a fatal
//! error, a transaction that could not be aborted): discarding it purges what it still holds,
//! and the next one has a new producer id.

use std::collections::BTreeMap;

use outboxd_core::SinkError;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::producer::FutureProducer;

use super::errors::Context;
use super::{KafkaConfig, KafkaSink, protected_option};

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Refuses the first option that [`PROTECTED_OPTIONS`](super::PROTECTED_OPTIONS) names, with
/// the reason.
pub(super) fn check_options(options: &BTreeMap<String, String>) -> Result<(), SinkError> {
    if let Some((name, why)) = options
        .iter()
        .find_map(|(n, v)| protected_option(n, v).map(|why| (n, why)))
    {
        return Err(SinkError::permanent(
            "sink.kafka.options may not set this librdkafka option",
            format!("{name}: {why}"),
        ));
    }
    Ok(())
}

/// The producer's `message.max.bytes`: the option's, or librdkafka's default.
pub(super) fn max_message_bytes(options: &BTreeMap<String, String>) -> Result<usize, SinkError> {
    match options.get("message.max.bytes") {
        None => Ok(DEFAULT_MESSAGE_MAX_BYTES),
        Some(v) => v.trim().parse().map_err(|_| {
            SinkError::permanent(
                "sink.kafka.options.\"message.max.bytes\" must be a number of bytes",
                format!("got {v:?}"),
            )
        }),
    }
}

/// librdkafka's log level: warnings unless `log_level` (syslog levels 0-7) asks for more, for
/// example with `debug = "broker,msg"` when troubleshooting.
fn log_level(options: &BTreeMap<String, String>) -> Result<RDKafkaLogLevel, SinkError> {
    Ok(match options.get("log_level").map(|v| v.trim()) {
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
    })
}

/// The producer's configuration: `sink.kafka.options` under outboxd's settings (see the module
/// documentation).
pub(super) fn client_config(config: &KafkaConfig) -> Result<ClientConfig, SinkError> {
    let log_level = log_level(&config.options)?;
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
    Ok(client_config)
}

impl KafkaSink {
    /// The producer, made if there is none.
    pub(super) fn producer(&mut self) -> Result<FutureProducer<Context>, SinkError> {
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
    pub(super) fn discard_producer(&mut self) {
        self.txn.producer_lost();
        if let Some(producer) = self.producer.take() {
            // Dropping it purges, flushes for up to 500 ms and joins librdkafka's threads.
            tokio::task::spawn_blocking(move || drop(producer));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::kafka::Shape;

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
            effectively_once: false,
            transactions: None,
            shape: Shape::default(),
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
