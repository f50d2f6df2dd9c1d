//! End to end against a real Apache Kafka broker (one KRaft node from the official jars, see
//! `support::apache_kafka`): Postgres → outboxd → Kafka → a plain consumer, at-least-once.
//! The broker does not create topics on first use (`auto.create.topics.enable=false`, as
//! many production clusters), so these tests also exercise `sink.kafka.create_topics`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use support::apache_kafka::Kafka;
use support::emit_txn;
use support::kafka::*;

fn settings() -> KafkaSettings {
    KafkaSettings {
        kafka: "create_topics = true\ntopic_partitions = 3".into(),
        ..KafkaSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_events_arrive_complete_and_in_order_per_key_with_headers() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    let env = KafkaEnv::start(&brokers, &settings()).await;
    let outboxd = env.run();
    let db = env.db().await;

    let started = Instant::now();
    let id: String = db
        .query_one(
            "SELECT outbox_emit('customer', 'c9', 'customer.created', '{\"name\": \"Ada\"}', \
                    '{\"traceparent\": \"00-abc-01\", \"correlation_id\": \"c-1\"}')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    emit_many(&db, 0, 5000, 50).await;
    // A row whose key is empty cannot be routed: it goes to the dead-letter topic, which
    // outboxd creates too.
    db.execute(
        "SELECT outbox_emit('order', '', 'order.created', jsonb_build_object('seq', 5000))",
        &[],
    )
    .await
    .unwrap();
    let messages = read_topic(&brokers, "outbox.order", Duration::from_secs(120), |m| {
        has_all(m, 0..5000)
    })
    .await;
    let elapsed = started.elapsed();
    let duplicates = check_partitions_complete_and_ordered(&messages, 0..5000);
    assert_eq!(duplicates, 0, "no failure, so no duplicates");
    assert_eq!(messages.len(), 5000);
    let partitions: HashSet<i32> = messages.iter().map(|m| m.partition).collect();
    assert_eq!(partitions.len(), 3, "50 keys over the 3 partitions created");

    let customer = read_topic(&brokers, "outbox.customer", Duration::from_secs(30), |m| {
        !m.is_empty()
    })
    .await;
    assert_eq!(customer.len(), 1, "{customer:?}");
    let m = &customer[0];
    assert_eq!(m.key.as_deref(), Some("c9"));
    assert_eq!(m.value, "{\"name\": \"Ada\"}");
    let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..2], ["id", "type"], "{names:?}");
    assert_eq!(m.header("id"), Some(id.as_str()));
    assert_eq!(m.header("type"), Some("customer.created"));
    assert_eq!(m.header("traceparent"), Some("00-abc-01"));
    assert_eq!(m.header("correlation_id"), Some("c-1"));

    let dead = read_topic(&brokers, "outboxd.dlq", Duration::from_secs(30), |m| {
        !m.is_empty()
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].header("reason"), Some("empty_field"));
    assert_eq!(dead[0].seq(), 5000);

    let log = outboxd.log_text();
    assert!(
        log.contains("created Kafka topic") && log.contains("outboxd.dlq"),
        "no topic creation in the log:\n{log}"
    );
    println!(
        "Apache Kafka: 5,000 events in transactions of 1 to 200 rows, 50 keys, 3 partitions: read back complete and in order per key {:.1} s after the first commit; 0 duplicates",
        elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_streaming_loses_nothing() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    let env = KafkaEnv::start(&brokers, &settings()).await;
    let mut outboxd = env.run();

    // 6,000 events in 300 transactions over a few seconds, so that the kill lands mid-stream.
    let writer_db = env.db().await;
    let writer = tokio::spawn(async move {
        for t in 0..300 {
            emit_txn(&writer_db, t * 20, 20, 40).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let part = read_topic(&brokers, "outbox.order", Duration::from_secs(60), |m| {
        m.len() >= 1500
    })
    .await;
    outboxd.kill9();
    let at_kill = part.len();
    assert!(at_kill >= 1500, "only {at_kill} events arrived");
    assert!(
        !writer.is_finished(),
        "the stream was over before the kill: nothing tested"
    );

    let _restarted = env.run();
    writer.await.unwrap();
    let messages = read_topic(&brokers, "outbox.order", Duration::from_secs(120), |m| {
        has_all(m, 0..6000)
    })
    .await;
    let duplicates = check_partitions_complete_and_ordered(&messages, 0..6000);
    println!(
        "Apache Kafka, kill -9 after {at_kill} of 6,000 events had been read back (more may have been acknowledged): none lost, first deliveries in order per key, {duplicates} duplicates ({} messages)",
        messages.len()
    );
}

/// A record the broker refuses (over the topic's `max.message.bytes`, which outboxd cannot
/// know in advance) is dead-lettered with the broker's reason; the events around it arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_is_dead_lettered_and_the_stream_goes_on() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    support::apache_kafka::create_topic(
        &brokers,
        "outbox.small",
        1,
        &[("max.message.bytes", "2000")],
    )
    .await;
    let env = KafkaEnv::start(&brokers, &settings()).await;
    let db = env.db().await;
    let outboxd = env.run();
    db.batch_execute(
        "BEGIN; \
         SELECT outbox_emit('order', 'k1', 'order.created', '{\"seq\": 0}'); \
         SELECT outbox_emit('small', 'k1', 'small.created', \
                jsonb_build_object('seq', 1, 'pad', repeat('x', 5000))); \
         SELECT outbox_emit('order', 'k1', 'order.created', '{\"seq\": 2}'); \
         COMMIT",
    )
    .await
    .unwrap();
    emit_txn(&db, 3, 100, 5).await;
    let dead = read_topic(&brokers, "outboxd.dlq", Duration::from_secs(60), |m| {
        !m.is_empty()
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].header("reason"), Some("too_large"));
    assert_eq!(dead[0].header("topic"), Some("outbox.small"));
    assert_eq!(dead[0].seq(), 1);
    let detail = dead[0].header("detail").unwrap();
    assert!(detail.contains("MessageSizeTooLarge"), "{detail}");
    let messages = read_topic(&brokers, "outbox.order", Duration::from_secs(60), |m| {
        has_all(m, 2..103)
    })
    .await;
    let duplicates =
        check_partitions_complete_and_ordered(&messages, std::iter::once(0).chain(2..103));
    assert_eq!(duplicates, 0);
    let log = outboxd.log_text();
    assert!(log.contains("event dead-lettered"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_stays_in_one_partition_in_commit_order() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    // A small librdkafka queue: batches of 500 fill it, so the sink waits for room (the
    // backpressure path) while keeping the order.
    let settings = KafkaSettings {
        sink: "max_batch_events = 500".into(),
        kafka: "create_topics = true\ntopic_partitions = 6".into(),
        options: "\"queue.buffering.max.messages\" = \"50\"".into(),
    };
    let env = KafkaEnv::start(&brokers, &settings).await;
    let outboxd = env.run();
    let db = env.db().await;

    let started = Instant::now();
    emit_many(&db, 0, 3000, 40).await;
    let messages = read_topic(&brokers, "outbox.order", Duration::from_secs(90), |m| {
        has_all(m, 0..3000)
    })
    .await;
    let elapsed = started.elapsed();
    let duplicates = check_partitions_complete_and_ordered(&messages, 0..3000);
    assert_eq!(duplicates, 0, "no failure, so no duplicates");
    assert_eq!(messages.len(), 3000);
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
    println!(
        "3,000 events, 40 keys, 6 partitions, librdkafka queue of 50: all in order in {:.1} s",
        elapsed.as_secs_f64()
    );
    let log = outboxd.log_text();
    assert!(
        log.contains("queue is full"),
        "the small queue never filled, so backpressure was not exercised:\n{log}"
    );
}
