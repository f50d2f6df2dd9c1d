//! Kafka for the tests: Postgres + outboxd configured for Kafka, and a plain consumer that
//! reads a topic back.
//!
//! Two kinds of broker:
//!
//! - real Apache Kafka brokers, one node or a three-node cluster ([`super::apache_kafka`]):
//!   the end-to-end, effectively-once, cluster and security suites;
//! - librdkafka's mock cluster (`rdkafka::mocking::MockCluster`), created by the test itself:
//!   it runs in the test process and speaks Kafka over TCP on 127.0.0.1, so the spawned
//!   `outboxd` connects to it like to any broker, and the test can inject errors (kept for
//!   those: `tests/kafka_mock.rs`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{Delivered, Postgres, SinkEnv, last_header};

static GROUPS: AtomicU32 = AtomicU32::new(0);

/// What goes into the `[sink]`, `[sink.kafka]` and `[sink.kafka.options]` sections, beyond
/// `kind = "kafka"` and `brokers`.
#[derive(Debug, Default, Clone)]
pub struct KafkaSettings {
    /// Lines of `[sink]`.
    pub sink: String,
    /// Lines of `[sink.kafka]`.
    pub kafka: String,
    /// Lines of `[sink.kafka.options]`.
    pub options: String,
}

impl SinkEnv {
    /// Everything ready for `outboxd run` against Kafka at `brokers`.
    pub async fn kafka(brokers: &str, settings: &KafkaSettings) -> SinkEnv {
        Self::kafka_on(Postgres::start(), brokers, settings).await
    }

    /// [`kafka`](Self::kafka) on a given cluster.
    pub async fn kafka_on(pg: Postgres, brokers: &str, settings: &KafkaSettings) -> SinkEnv {
        SinkEnv::start_on(
            pg,
            &format!(
                "[sink]\nkind = \"kafka\"\n{}\n\n[sink.kafka]\nbrokers = \"{brokers}\"\n{}\n\n\
             [sink.kafka.options]\n{}\n",
                settings.sink, settings.kafka, settings.options
            ),
        )
        .await
    }
}

/// One message read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaMessage {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Its key, as text.
    pub key: Option<String>,
    /// Its value, as text.
    pub value: String,
    /// Its value as sent; `None` for a null value (a tombstone).
    pub raw_value: Option<Vec<u8>>,
    /// Its timestamp in milliseconds since the epoch, when it has one.
    pub timestamp: Option<i64>,
    /// Its headers in order, values as text.
    pub headers: Vec<(String, String)>,
}

impl KafkaMessage {
    /// The last header named `name` (the dead-letter context comes after the row's headers).
    pub fn header(&self, name: &str) -> Option<&str> {
        last_header(&self.headers, name)
    }

    fn from_message(m: &BorrowedMessage<'_>) -> KafkaMessage {
        KafkaMessage {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            value: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            raw_value: m.payload().map(<[u8]>::to_vec),
            timestamp: m.timestamp().to_millis(),
            headers: m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

impl Delivered for KafkaMessage {
    fn seq(&self) -> u64 {
        let payload: serde_json::Value = serde_json::from_str(&self.value).expect("payload JSON");
        payload["seq"].as_u64().expect("seq")
    }

    fn key(&self) -> &str {
        self.key.as_deref().expect("a key")
    }

    fn shard(&self) -> Option<i32> {
        Some(self.partition)
    }
}

/// Reads `topic` from the beginning, all partitions, with a plain consumer (its own group
/// id, nothing committed), until `done` holds for what was read or `timeout` passes; returns
/// what was read, ordered by partition and offset.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[KafkaMessage]) -> bool + Send + 'static,
) -> Vec<KafkaMessage> {
    read_topic_isolated(brokers, topic, "read_uncommitted", timeout, done).await
}

/// Like [`read_topic`], with the consumer's `isolation.level`.
pub async fn read_topic_isolated(
    brokers: &str,
    topic: &str,
    isolation: &'static str,
    timeout: Duration,
    done: impl Fn(&[KafkaMessage]) -> bool + Send + 'static,
) -> Vec<KafkaMessage> {
    let brokers = brokers.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        read_topic_blocking(&brokers, &topic, isolation, timeout, done)
    })
    .await
    .expect("consumer thread")
}

fn read_topic_blocking(
    brokers: &str,
    topic: &str,
    isolation: &str,
    timeout: Duration,
    done: impl Fn(&[KafkaMessage]) -> bool,
) -> Vec<KafkaMessage> {
    let group = format!(
        "outboxd-test-{}-{}",
        std::process::id(),
        GROUPS.fetch_add(1, Ordering::Relaxed)
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", isolation)
        .create()
        .expect("create consumer");
    let deadline = Instant::now() + timeout;
    // The topic may not exist yet: wait for its partitions.
    let partitions = loop {
        if let Some(n) = partitions(&consumer, topic) {
            break n;
        }
        if Instant::now() >= deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assign_from_beginning(&consumer, topic, partitions);
    let mut read: Vec<KafkaMessage> = Vec::new();
    let mut since_check = 0usize;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                read.push(KafkaMessage::from_message(&m));
                // While messages keep coming, check every 50 of them, fewer as they add up (a
                // check may look at every message read so far).
                since_check += 1;
                if since_check >= (read.len() / 20).clamp(50, 2000) {
                    since_check = 0;
                    if done(&read) {
                        break;
                    }
                }
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {
                if done(&read) {
                    break;
                }
            }
        }
    }
    read.sort_by_key(|m| (m.partition, m.offset));
    read
}

/// How many partitions `topic` has, per the metadata `client` fetches; `None` while it does
/// not exist.
pub fn partitions(client: &BaseConsumer, topic: &str) -> Option<i32> {
    client
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()?
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .filter(|&n| n > 0)
}

/// Assigns `consumer` every partition of `topic`, each from its beginning.
fn assign_from_beginning(consumer: &BaseConsumer, topic: &str, partitions: i32) {
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("assign");
    }
    consumer.assign(&assignment).expect("assign partitions");
}

/// Every message of `topic` that a consumer with `isolation` (`read_committed` or
/// `read_uncommitted`) reads now, from the beginning of every partition to its end (the last
/// stable offset for read_committed, the high watermark otherwise), ordered by partition and
/// offset. Empty when the topic does not exist. Blocking.
pub fn read_to_end(brokers: &str, topic: &str, isolation: &str) -> Vec<KafkaMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outboxd-test-read-to-end")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .set("log_level", "2")
        .create()
        .expect("create consumer");
    let Some(partitions) = partitions(&consumer, topic) else {
        return Vec::new();
    };
    assign_from_beginning(&consumer, topic, partitions);
    let mut at_end = HashSet::new();
    let mut read = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while at_end.len() < partitions as usize {
        assert!(Instant::now() < deadline, "did not read {topic} to its end");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => read.push(KafkaMessage::from_message(&m)),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    read.sort_by_key(|m| (m.partition, m.offset));
    read
}

/// How many records a consumer with `isolation` reads from `topic` now, from the beginning
/// of every partition to its end (see [`read_to_end`]).
pub async fn count_to_end(brokers: &str, topic: &str, isolation: &'static str) -> usize {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_to_end(&brokers, &topic, isolation).len())
        .await
        .expect("consumer thread")
}
