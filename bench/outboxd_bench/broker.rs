//! The broker outboxd forwards to in a scenario, and outboxd under test: its environment for
//! that broker, starting it, and counting the events the broker has.

use redis::aio::MultiplexedConnection;

use crate::support::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Redis,
    /// A one-node Apache Kafka broker (KRaft), from the jars the tests run.
    Kafka,
}

impl Broker {
    pub fn name(self) -> &'static str {
        match self {
            Broker::Redis => "redis",
            Broker::Kafka => "kafka (Apache Kafka, one node)",
        }
    }
}

/// Where a Kafka-protocol broker is, and whether outboxd must create the topics.
#[derive(Debug, Clone)]
pub struct KafkaTarget {
    pub brokers: String,
    /// `sink.max_batch_events`, when not outboxd's default.
    pub max_batch: Option<u64>,
    /// The broker's JVM, whose CPU time the drain reports.
    pub pid: Option<u32>,
    pub create_topics: bool,
}

/// outboxd's environment overrides for a broker.
pub fn broker_env(broker: Broker, kafka: Option<&KafkaTarget>) -> Vec<(String, String)> {
    broker_env_mode(broker, kafka, false)
}

/// The same, in effectively-once mode when `effectively_once`.
pub fn broker_env_mode(
    broker: Broker,
    kafka: Option<&KafkaTarget>,
    effectively_once: bool,
) -> Vec<(String, String)> {
    let mut env = vec![("OUTBOXD_LOG".to_owned(), "info".to_owned())];
    if effectively_once {
        env.push((
            "OUTBOXD_SINK__DELIVERY".to_owned(),
            "effectively-once".to_owned(),
        ));
    }
    if broker != Broker::Redis {
        let kafka = kafka.expect("a Kafka broker");
        env.extend([
            ("OUTBOXD_SINK__KIND".to_owned(), "kafka".to_owned()),
            (
                "OUTBOXD_SINK__KAFKA__BROKERS".to_owned(),
                kafka.brokers.clone(),
            ),
            (
                "OUTBOXD_SINK__KAFKA__CREATE_TOPICS".to_owned(),
                kafka.create_topics.to_string(),
            ),
            // The outbox topic in 3 partitions (100 keys).
            (
                "OUTBOXD_SINK__KAFKA__TOPIC_PARTITIONS".to_owned(),
                "3".to_owned(),
            ),
        ]);
        if let Some(n) = kafka.max_batch {
            env.push(("OUTBOXD_SINK__MAX_BATCH_EVENTS".to_owned(), n.to_string()));
        }
    }
    env
}

pub fn run_outboxd(env: &Env, vars: &[(String, String)]) -> Outboxd {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.run_with(&vars)
}

/// How many events reached the broker: Redis' own count, or for Kafka the events outboxd
/// counted as acknowledged by delivery reports (`/metrics` on `http_port`).
pub async fn delivered(broker: Broker, redis: &mut MultiplexedConnection, http_port: u16) -> u64 {
    match broker {
        Broker::Redis => stream_len(redis, "outbox.order").await,
        Broker::Kafka => http_get(http_port, "/metrics")
            .await
            .and_then(|(_, text)| {
                metric(
                    &text,
                    "outboxd_events_forwarded_total{topic=\"outbox.order\"}",
                )
            })
            .map_or(0, |n| n as u64),
    }
}
