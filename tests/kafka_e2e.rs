//! End to end against a real Apache Kafka broker (one KRaft node from the official jars, see
//! `support::apache_kafka`), for what is particular to Kafka: librdkafka's queue filling up
//! (the sink waits for room and keeps the order), partitions in commit order, the header
//! layout, and topics created by outboxd (the broker does not create them on first use,
//! `auto.create.topics.enable=false`, as many production clusters).
//!
//! What every sink must do (per-key order, an outage, poison, kill -9, effectively-once) is in
//! the conformance suite (tests/conformance_kafka.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "kafka")] // the sink this file tests: built in, or nothing to run

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use support::apache_kafka::Kafka;
use support::kafka::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_librdkafka_queue_holds_batches_back_and_partitions_keep_commit_order() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    // A small librdkafka queue: batches of 500 fill it, so the sink waits for room (the
    // backpressure path) while keeping the order.
    let settings = KafkaSettings {
        sink: "max_batch_events = 500".into(),
        kafka: "create_topics = true\ntopic_partitions = 6".into(),
        options: "\"queue.buffering.max.messages\" = \"50\"".into(),
    };
    let env = SinkEnv::kafka(&brokers, &settings).await;
    let outboxd = env.run();
    let db = env.db().await;

    let started = Instant::now();
    write_events(&db, 0, 3000, 200, 40, 1).await;
    let messages = read_topic(&brokers, "outbox.order", Duration::from_secs(90), |m| {
        has_all(m, 0..3000)
    })
    .await;
    let elapsed = started.elapsed();
    assert_each_once(&messages, 0..3000);
    let partitions: HashSet<i32> = messages.iter().map(|m| m.partition).collect();
    assert!(
        partitions.len() >= 4,
        "40 keys over 6 partitions used only {partitions:?}"
    );
    // Within a partition, offsets follow commit order (not only per key).
    let mut last: HashMap<i32, u64> = HashMap::new();
    for m in &messages {
        if let Some(prev) = last.insert(m.partition, m.seq()) {
            assert!(
                prev < m.seq(),
                "partition {}: {} after {prev}",
                m.partition,
                m.seq()
            );
        }
    }
    // The event's id and type come first, then the row's headers.
    let names: Vec<&str> = messages[0]
        .headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["id", "type", "source"]);
    println!(
        "3,000 events, 40 keys, 6 partitions, librdkafka queue of 50: all in order in {:.1} s",
        elapsed.as_secs_f64()
    );
    let log = outboxd.log_text();
    assert!(
        log.contains("queue is full"),
        "the small queue never filled, so backpressure was not exercised:\n{log}"
    );
    assert!(
        log.contains("created Kafka topic"),
        "no topic creation in the log:\n{log}"
    );
}
