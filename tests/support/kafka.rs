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

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::Client;

use super::{Outboxd, Postgres, create_outbox_db, outboxd_bin, scratch_dir};

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

/// Postgres with the outbox schema and role, a configuration for Kafka at `brokers`, and
/// `outboxd setup` done.
pub struct KafkaEnv {
    /// The Postgres cluster; the outbox is in database `app`.
    pub pg: Postgres,
    /// This test's scratch directory.
    pub dir: PathBuf,
    /// The configuration file.
    pub config: PathBuf,
    runs: AtomicU32,
}

impl KafkaEnv {
    /// Everything ready for `outboxd run` against `brokers`.
    pub async fn start(brokers: &str, settings: &KafkaSettings) -> KafkaEnv {
        let pg = Postgres::start();
        create_outbox_db(&pg).await;
        let dir = scratch_dir("kafka-env");
        let config = dir.join("outboxd.toml");
        let text = format!(
            "[postgres]\nurl = \"{}\"\n\n[http]\nlisten = \"\"\n\n[sink]\nkind = \"kafka\"\n{}\n\n\
             [sink.kafka]\nbrokers = \"{brokers}\"\n{}\n\n[sink.kafka.options]\n{}\n",
            pg.outboxd_url("app"),
            settings.sink,
            settings.kafka,
            settings.options
        );
        fs::write(&config, text).expect("write config");
        let env = KafkaEnv {
            pg,
            dir,
            config,
            runs: AtomicU32::new(0),
        };
        let out = Command::new(outboxd_bin())
            .arg("setup")
            .arg("--config")
            .arg(&env.config)
            .output()
            .expect("run outboxd setup");
        assert!(
            out.status.success(),
            "outboxd setup failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        env
    }

    /// Starts `outboxd run`.
    pub fn run(&self) -> Outboxd {
        self.run_with(&[])
    }

    /// Starts `outboxd run` with extra environment variables.
    pub fn run_with(&self, env: &[(&str, &str)]) -> Outboxd {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        Outboxd::spawn(
            &["run", "--config", &self.config.to_string_lossy()],
            self.dir.join(format!("outboxd-{n}.log")),
            env,
        )
    }

    /// Runs an outboxd command to completion with extra environment variables.
    pub fn command_with(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        Command::new(outboxd_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(env.iter().copied())
            .output()
            .expect("run outboxd")
    }

    /// A superuser connection to the outbox database.
    pub async fn db(&self) -> Client {
        self.pg.connect("app").await
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
    /// Its headers in order, values as text.
    pub headers: Vec<(String, String)>,
}

impl KafkaMessage {
    /// The last header named `name` (the dead-letter context comes after the row's headers).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `seq` of the payload of a test event.
    pub fn seq(&self) -> u64 {
        let payload: serde_json::Value = serde_json::from_str(&self.value).expect("payload JSON");
        payload["seq"].as_u64().expect("seq")
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
        let found = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
            })
            .filter(|&n| n > 0);
        if let Some(n) = found {
            break n;
        }
        if Instant::now() >= deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p as i32, Offset::Beginning)
            .expect("assign");
    }
    consumer.assign(&assignment).expect("assign partitions");
    let mut read: Vec<KafkaMessage> = Vec::new();
    let mut since_check = 0usize;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                read.push(KafkaMessage {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    headers: m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| {
                                    (
                                        h.key.to_owned(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                });
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

/// Emits `count` events from seq `first` in transactions of 1 to 200 rows (sizes cycling),
/// keys `k<seq % keys>`.
pub async fn emit_many(db: &Client, first: u64, count: u64, keys: u64) {
    let mut seq = first;
    let mut size = 1u64;
    while seq < first + count {
        let n = size.min(first + count - seq);
        super::emit_txn(db, seq, n, keys).await;
        seq += n;
        size = size % 200 + 37;
    }
}

/// Whether every seq of `expected` is among `messages`.
pub fn has_all(messages: &[KafkaMessage], expected: std::ops::Range<u64>) -> bool {
    let seen: std::collections::HashSet<u64> = messages.iter().map(KafkaMessage::seq).collect();
    expected.into_iter().all(|s| seen.contains(&s))
}

/// Checks that every seq in `expected` arrived, that each key stayed in one partition, and
/// that the first deliveries of each key are in commit (seq) order; returns how many
/// messages were duplicates.
pub fn check_partitions_complete_and_ordered(
    messages: &[KafkaMessage],
    expected: impl Iterator<Item = u64>,
) -> u64 {
    let mut ordered: Vec<&KafkaMessage> = messages.iter().collect();
    ordered.sort_by_key(|m| (m.partition, m.offset));
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut last_by_key: HashMap<String, u64> = HashMap::new();
    let mut partition_of_key: HashMap<String, i32> = HashMap::new();
    for m in ordered {
        let key = m.key.clone().expect("a key");
        let partition = *partition_of_key.entry(key.clone()).or_insert(m.partition);
        assert_eq!(
            partition, m.partition,
            "key {key} is in partitions {partition} and {}",
            m.partition
        );
        let seq = m.seq();
        let count = seen.entry(seq).or_default();
        *count += 1;
        if *count > 1 {
            continue;
        }
        if let Some(prev) = last_by_key.insert(key.clone(), seq) {
            assert!(
                prev < seq,
                "key {key}: event {seq} (offset {}) arrived after {prev} (first deliveries out of commit order)",
                m.offset
            );
        }
    }
    let missing: Vec<u64> = expected.filter(|s| !seen.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "{} events missing, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    seen.values().map(|&c| u64::from(c - 1)).sum()
}
