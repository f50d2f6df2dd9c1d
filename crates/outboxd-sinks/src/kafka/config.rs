//! `[sink.kafka]`: the section, the librdkafka options it may not change, and how it becomes
//! a [`KafkaSink`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use outboxd_core::{SinkError, WalOrigin, read_secret_file};
use serde::{Deserialize, Serialize};

use super::{KafkaConfig, KafkaSink, Shape, TransactionsConfig};
use crate::plugin::{CheckLevel, MAX_TIMEOUT_MS, SinkConfigError, SinkContext, SinkPlugin};

/// `[sink.kafka]`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSection {
    /// Bootstrap servers.
    pub brokers: String,
    /// Effectively-once: the compacted topic holding the committed position per slot.
    pub offsets_topic: String,
    /// Effectively-once: the producer's `transactional.id`; empty for
    /// `outboxd-<system id>-<database>-<slot>`.
    pub transactional_id: String,
    /// Create missing topics (the routed ones and the dead-letter topic) through the Admin
    /// API, for clusters that do not create topics on first use.
    pub create_topics: bool,
    /// Partitions of the topics outboxd creates.
    pub topic_partitions: u32,
    /// Replication factor of the topics outboxd creates; -1 for the broker's default.
    pub topic_replication_factor: i32,
    /// How long a batch may wait for its delivery reports before it is sent again, in
    /// milliseconds.
    pub delivery_timeout_ms: u64,
    /// Timeout of metadata and Admin requests, in milliseconds.
    pub timeout_ms: u64,
    /// A file holding the SASL password (`sasl.password`), for Kubernetes and Docker secrets.
    pub sasl_password_file: String,
    /// A NULL payload becomes a tombstone (a message with a null value, which deletes its key
    /// from a compacted topic) instead of a dead letter.
    pub tombstone_on_null: bool,
    /// Passed to librdkafka as is.
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaSection {
    fn default() -> Self {
        KafkaSection {
            brokers: "127.0.0.1:9092".into(),
            offsets_topic: "outboxd.offsets".into(),
            transactional_id: String::new(),
            create_topics: false,
            topic_partitions: 1,
            topic_replication_factor: -1,
            delivery_timeout_ms: 60_000,
            timeout_ms: 10_000,
            sasl_password_file: String::new(),
            tombstone_on_null: false,
            options: BTreeMap::new(),
        }
    }
}

impl KafkaSection {
    /// The options with the values of secret ones (passwords, keys) replaced by `***`.
    pub fn redacted_options(&self) -> BTreeMap<String, String> {
        self.options
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_option(k) {
                    "***".to_owned()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// The producer's `transactional.id` in effectively-once mode: the configured one, or
    /// `outboxd-<system id>-<database>-<slot>`, so that every instance on the slot shares it
    /// (and fences the previous one), and services of other clusters or databases on the same
    /// Kafka cluster never share it.
    pub fn transactional_id(&self, origin: &WalOrigin) -> String {
        match self.transactional_id.trim() {
            "" => format!(
                "outboxd-{}-{}-{}",
                origin.system_id, origin.database, origin.slot
            ),
            id => id.to_owned(),
        }
    }

    fn option(&self, name: &str) -> Option<String> {
        self.options
            .get(name)
            .map(|v| v.trim().to_ascii_lowercase())
    }
}

impl fmt::Debug for KafkaSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSection")
            .field("brokers", &self.brokers)
            .field("offsets_topic", &self.offsets_topic)
            .field("transactional_id", &self.transactional_id)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("delivery_timeout_ms", &self.delivery_timeout_ms)
            .field("timeout_ms", &self.timeout_ms)
            .field("sasl_password_file", &self.sasl_password_file)
            .field("tombstone_on_null", &self.tombstone_on_null)
            .field("options", &self.redacted_options())
            .finish()
    }
}

/// Whether a librdkafka option holds a secret (`sasl.password`, `ssl.key.password`,
/// `ssl.key.pem`, `sasl.oauthbearer.client.secret`, …).
pub fn is_secret_option(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("password")
        || name.contains("secret")
        || name.contains("jaas")
        || name.ends_with(".pem")
        || name == "sasl.oauthbearer.config"
}

/// librdkafka settings that outboxd sets itself; [`KafkaConfig::options`] may not change them
/// (the configuration refuses them with the reason).
pub const PROTECTED_OPTIONS: &[(&str, &str)] = &[
    (
        "enable.idempotence",
        "outboxd always sets it to true: retries must neither duplicate nor reorder",
    ),
    (
        "acks",
        "outboxd always sets it to all: an event counts as delivered only once every in-sync replica has it",
    ),
    (
        "request.required.acks",
        "outboxd always sets it to all: an event counts as delivered only once every in-sync replica has it",
    ),
    (
        "message.timeout.ms",
        "outboxd sets it to 0 (no per-message timeout, which could reorder events on a retry); use sink.kafka.delivery_timeout_ms",
    ),
    (
        "delivery.timeout.ms",
        "outboxd sets it to 0 (no per-message timeout, which could reorder events on a retry); use sink.kafka.delivery_timeout_ms",
    ),
    (
        "retries",
        "outboxd leaves it at librdkafka's maximum: a message out of retries while a later one of its partition went through would be sent again after it",
    ),
    (
        "message.send.max.retries",
        "outboxd leaves it at librdkafka's maximum: a message out of retries while a later one of its partition went through would be sent again after it",
    ),
    ("bootstrap.servers", "use sink.kafka.brokers"),
    ("metadata.broker.list", "use sink.kafka.brokers"),
    (
        "transactional.id",
        "use sink.kafka.transactional_id (with sink.delivery = \"effectively-once\")",
    ),
    (
        "transaction.timeout.ms",
        "outboxd sets it from sink.kafka.delivery_timeout_ms",
    ),
];

/// Why an option may not be set, or `None` when it may.
pub fn protected_option(name: &str, value: &str) -> Option<&'static str> {
    let v = value.trim().to_ascii_lowercase();
    match name {
        "enable.idempotence" if v == "true" => None,
        "acks" | "request.required.acks" if v == "all" || v == "-1" => None,
        _ => PROTECTED_OPTIONS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, why)| *why),
    }
}

/// The Kafka sink, as registered.
#[derive(Debug)]
pub struct Kafka;

impl SinkPlugin for Kafka {
    const NAME: &'static str = "kafka";
    const EFFECTIVELY_ONCE: bool = true;
    const CLOUDEVENTS: bool = true;
    const OPEN_TABLES: &'static [&'static str] = &["options"];
    type Config = KafkaSection;
    type Sink = KafkaSink;

    fn read_secret_files(
        config: &mut KafkaSection,
        _is_set: &dyn Fn(&str) -> bool,
    ) -> Result<(), SinkConfigError> {
        if config.sasl_password_file.is_empty() {
            return Ok(());
        }
        if config.options.contains_key("sasl.password") {
            return Err(SinkConfigError::Both {
                key: "sink.kafka.options.\"sasl.password\"",
                file_key: "sink.kafka.sasl_password_file",
            });
        }
        let password =
            read_secret_file("sink.kafka.sasl_password_file", &config.sasl_password_file)?;
        config.options.insert("sasl.password".into(), password);
        Ok(())
    }

    fn validate(config: &KafkaSection) -> Result<(), SinkConfigError> {
        SinkConfigError::check_ranges(&[
            (
                "sink.kafka.topic_partitions",
                u64::from(config.topic_partitions),
                1..=i32::MAX as u64,
            ),
            (
                "sink.kafka.delivery_timeout_ms",
                config.delivery_timeout_ms,
                1..=MAX_TIMEOUT_MS,
            ),
            (
                "sink.kafka.timeout_ms",
                config.timeout_ms,
                1..=MAX_TIMEOUT_MS,
            ),
        ])?;
        if config.topic_replication_factor == 0 || config.topic_replication_factor < -1 {
            return Err(SinkConfigError::invalid(
                "sink.kafka.topic_replication_factor",
                "must be -1 (the broker's default) or at least 1",
            ));
        }
        for (name, value) in &config.options {
            if let Some(why) = protected_option(name, value) {
                return Err(SinkConfigError::invalid(
                    format!("sink.kafka.options.\"{name}\""),
                    format!("may not be set: {why}"),
                ));
            }
        }
        Ok(())
    }

    fn redact(config: &mut KafkaSection) {
        config.options = config.redacted_options();
    }

    fn target(config: &KafkaSection) -> String {
        config.brokers.clone()
    }

    fn security(config: &KafkaSection) -> (CheckLevel, String) {
        let protocol = config
            .option("security.protocol")
            .unwrap_or_else(|| "plaintext".into());
        if !protocol.ends_with("ssl") {
            return (
                CheckLevel::Ok,
                format!("not encrypted (security.protocol={protocol})"),
            );
        }
        if config
            .option("enable.ssl.certificate.verification")
            .as_deref()
            == Some("false")
        {
            return (
                CheckLevel::Warn,
                format!(
                    "TLS (security.protocol={protocol}) with enable.ssl.certificate.verification \
                     = false: the brokers' certificates are not verified"
                ),
            );
        }
        let roots = config
            .options
            .get("ssl.ca.location")
            .cloned()
            .unwrap_or_else(|| "the system's roots".into());
        let host = match config
            .option("ssl.endpoint.identification.algorithm")
            .as_deref()
        {
            Some("none") => "host name not checked",
            _ => "host name checked",
        };
        (
            CheckLevel::Ok,
            format!(
                "TLS (security.protocol={protocol}), certificate verified against {roots}, {host}"
            ),
        )
    }

    fn tombstone_on_null(config: &KafkaSection) -> bool {
        config.tombstone_on_null
    }

    fn build(config: &KafkaSection, ctx: &SinkContext<'_>) -> Result<KafkaSink, SinkError> {
        KafkaSink::new(KafkaConfig {
            brokers: config.brokers.clone(),
            dead_letter: ctx.dead_letter.to_owned(),
            options: config.options.clone(),
            create_topics: config.create_topics,
            topic_partitions: i32::try_from(config.topic_partitions).unwrap_or(i32::MAX),
            topic_replication_factor: config.topic_replication_factor,
            delivery_timeout: Duration::from_millis(config.delivery_timeout_ms),
            timeout: Duration::from_millis(config.timeout_ms),
            effectively_once: ctx.effectively_once,
            transactions: ctx.origin.filter(|_| ctx.effectively_once).map(|origin| {
                TransactionsConfig {
                    transactional_id: config.transactional_id(origin),
                    offsets_topic: config.offsets_topic.clone(),
                    origin: origin.clone(),
                }
            }),
            shape: Shape {
                type_header: ctx.type_header,
                envelope: ctx.envelope,
                source: ctx.source.to_owned(),
            },
        })
    }
}
