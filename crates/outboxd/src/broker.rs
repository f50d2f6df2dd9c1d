//! The configured broker, as one [`Sink`] type.

use std::time::Duration;

use outboxd_core::{Delivery, Record, Sink, SinkError, WalHorizon};
#[cfg(feature = "kafka")]
use outboxd_sinks::kafka::{KafkaConfig, KafkaSink, TransactionsConfig};
use outboxd_sinks::redis::{RedisConfig, RedisSink, RedisTls};

use crate::config::{Config, DeliveryMode, SinkKind, mask_url};

/// The broker outboxd publishes to.
#[derive(Debug)]
pub enum Broker {
    /// Redis Streams.
    Redis(RedisSink),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(KafkaSink),
}

/// The broker cannot be built from this configuration.
#[derive(Debug, thiserror::Error)]
pub enum BrokerConfigError {
    /// This build of outboxd was made without the `kafka` cargo feature.
    #[error(
        "sink.kind = \"kafka\": this build of outboxd has no Kafka support (it was built without the `kafka` cargo feature)"
    )]
    KafkaNotBuilt,
}

impl Broker {
    /// Checks that the configured broker can be built, without connecting.
    pub fn check(config: &Config) -> Result<(), BrokerConfigError> {
        match config.sink.kind {
            SinkKind::Redis => Ok(()),
            SinkKind::Kafka if cfg!(feature = "kafka") => Ok(()),
            SinkKind::Kafka => Err(BrokerConfigError::KafkaNotBuilt),
        }
    }

    /// The Kafka producer's `transactional.id` in effectively-once mode: the configured one,
    /// or `outboxd-<slot>`, so that every instance on the slot shares it (and fences the
    /// previous one).
    pub fn transactional_id(config: &Config) -> String {
        let id = config.sink.kafka.transactional_id.trim();
        if id.is_empty() {
            format!("outboxd-{}", config.postgres.slot)
        } else {
            id.to_owned()
        }
    }

    /// The broker's name for messages and metrics.
    pub fn name(config: &Config) -> &'static str {
        match config.sink.kind {
            SinkKind::Redis => "redis",
            SinkKind::Kafka => "kafka",
        }
    }

    /// Where the broker is, without secrets.
    pub fn target(config: &Config) -> String {
        match config.sink.kind {
            SinkKind::Redis => mask_url(config.sink.redis.url.expose()),
            SinkKind::Kafka => config.sink.kafka.brokers.clone(),
        }
    }

    /// Builds the broker client (connections are made on first use). `horizon` is how far
    /// the server's WAL is known to reach (effectively-once Redis checks replays against it).
    pub fn build(config: &Config, horizon: &WalHorizon) -> Result<Broker, SinkError> {
        #[cfg(feature = "kafka")]
        if config.sink.kind == SinkKind::Kafka {
            let k = &config.sink.kafka;
            return Ok(Broker::Kafka(KafkaSink::new(KafkaConfig {
                brokers: k.brokers.clone(),
                dead_letter: config.sink.dead_letter.clone(),
                options: k.options.clone(),
                create_topics: k.create_topics,
                topic_partitions: i32::try_from(k.topic_partitions).unwrap_or(i32::MAX),
                topic_replication_factor: k.topic_replication_factor,
                delivery_timeout: Duration::from_millis(k.delivery_timeout_ms),
                timeout: Duration::from_millis(k.timeout_ms),
                transactions: (config.sink.delivery == DeliveryMode::EffectivelyOnce).then(|| {
                    TransactionsConfig {
                        transactional_id: Self::transactional_id(config),
                        offsets_topic: k.offsets_topic.clone(),
                        slot: config.postgres.slot.clone(),
                    }
                }),
            })?));
        }
        let r = &config.sink.redis;
        Ok(Broker::Redis(RedisSink::new(RedisConfig {
            url: r.url.expose().to_owned(),
            tls: RedisTls {
                ca_file: (!r.ca_file.is_empty()).then(|| r.ca_file.clone().into()),
                client: (!r.cert_file.is_empty())
                    .then(|| (r.cert_file.clone().into(), r.key_file.clone().into())),
            },
            stream_prefix: r.stream_prefix.clone(),
            dead_letter: config.sink.dead_letter.clone(),
            maxlen: r.maxlen,
            wait_replicas: r.wait_replicas,
            wait_timeout: Duration::from_millis(r.wait_timeout_ms),
            timeout: Duration::from_millis(r.timeout_ms),
            max_event_bytes: usize::try_from(r.max_event_bytes).unwrap_or(usize::MAX),
            effectively_once: config.sink.delivery == DeliveryMode::EffectivelyOnce,
            wal_horizon: horizon.clone(),
        })?))
    }
}

impl Sink for Broker {
    async fn send(&mut self, batch: &[Record]) -> Result<Delivery, SinkError> {
        match self {
            Broker::Redis(s) => s.send(batch).await,
            #[cfg(feature = "kafka")]
            Broker::Kafka(s) => s.send(batch).await,
        }
    }

    async fn ping(&mut self) -> Result<(), SinkError> {
        match self {
            Broker::Redis(s) => s.ping().await,
            #[cfg(feature = "kafka")]
            Broker::Kafka(s) => s.ping().await,
        }
    }
}
