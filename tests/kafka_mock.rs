//! Injected errors: Postgres (wal_level = logical) → outboxd → Kafka, where Kafka is
//! librdkafka's mock cluster running in the test process (a Kafka protocol server on 127.0.0.1
//! that can inject produce errors, refused topics, outages and fencing answers). outboxd is the
//! real binary, configured with `sink.kind = "kafka"`. Everything that needs no injected error
//! runs against real Apache Kafka instead (`conformance_kafka`, an outage among them,
//! `kafka_e2e`, `kafka_effectively_once`, `kafka_cluster`, `kafka_security`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "kafka")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use support::kafka::*;
use support::*;

const SLOT: &str = "outboxd";

fn mock(brokers: i32) -> MockCluster<'static, DefaultProducerContext> {
    MockCluster::new(brokers).expect("start librdkafka's mock cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_produce_errors_lose_nothing_and_reorder_nothing() {
    let mock = mock(3);
    mock.create_topic("outbox.order", 4, 3).unwrap();
    let brokers = mock.bootstrap_servers();
    // librdkafka waits between retries (up to retry.backoff.max.ms, 1 s) and between
    // reconnects (up to reconnect.backoff.max.ms, 10 s): 30 errors in a row could take a
    // minute. Shorter waits here, so the test is quick.
    //
    // One request in flight per connection: the mock checks produce sequence numbers only for
    // transactional producers (rdkafka_mock.c, rd_kafka_mock_validate_records). With five in
    // flight, a request refused by an injected error is retried after the mock has already
    // appended the next request of that partition, an order a real broker refuses
    // (OUT_OF_ORDER_SEQUENCE_NUMBER). Order under real broker errors is proven in kafka_cluster.
    let settings = KafkaSettings {
        options: "\"retry.backoff.ms\" = \"10\"\n\"retry.backoff.max.ms\" = \"50\"\n\
                  \"reconnect.backoff.ms\" = \"10\"\n\"reconnect.backoff.max.ms\" = \"100\"\n\
                  \"max.in.flight.requests.per.connection\" = \"1\""
            .into(),
        ..KafkaSettings::default()
    };
    let env = SinkEnv::kafka(&brokers, &settings).await;
    let outboxd = env.run();
    let db = env.db().await;

    use RDKafkaRespErr::*;
    let retriable = [
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        // The mock broker drops the connection.
        RD_KAFKA_RESP_ERR__TRANSPORT,
    ];
    let errors: Vec<RDKafkaRespErr> = retriable.iter().copied().cycle().take(30).collect();
    mock.request_errors(RDKafkaApiKey::Produce, &errors);
    let started = Instant::now();
    write_events(&db, 0, 1000, 200, 25, 1).await;
    let first = read_topic(&brokers, "outbox.order", Duration::from_secs(60), |m| {
        has_all(m, 0..1000)
    })
    .await;
    assert!(
        has_all(&first, 0..1000),
        "the first 1,000 did not all arrive"
    );

    // Again while events are flowing.
    mock.request_errors(RDKafkaApiKey::Produce, &errors);
    write_events(&db, 1000, 1000, 200, 25, 1).await;
    let messages = read_topic(&brokers, "outbox.order", Duration::from_secs(60), |m| {
        has_all(m, 0..2000)
    })
    .await;
    let duplicates = check_complete_and_ordered(&messages, 0..2000);
    println!(
        "60 injected produce errors (6 kinds): 2,000 events complete and in order in {:.1} s, {duplicates} duplicates",
        started.elapsed().as_secs_f64()
    );
    // Duplicates are allowed (at-least-once). outboxd resends no batch here (no delivery
    // report failed), so any duplicate comes from librdkafka's own recovery of a request whose
    // outcome it could not know (measured: 0 in most runs, up to 8).
    assert!(
        duplicates < 2000,
        "{duplicates} duplicates: more than one resend of everything"
    );
    drop(outboxd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_is_dead_lettered_and_later_events_flow() {
    let mock = mock(1);
    let brokers = mock.bootstrap_servers();
    let settings = KafkaSettings {
        options: "\"message.max.bytes\" = \"20000\"".into(),
        ..KafkaSettings::default()
    };
    let env = SinkEnv::kafka(&brokers, &settings).await;
    let mut outboxd = env.run();
    let db = env.db().await;

    emit_txn(&db, 0, 1, 1).await;
    let big_id: String = db
        .query_one(
            "SELECT outbox_emit('order', 'k0', 'order.created', \
                    jsonb_build_object('seq', 1, 'pad', repeat('x', 50000)), \
                    '{\"traceparent\": \"00-big-01\"}')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    write_events(&db, 3, 200, 200, 1, 1).await;

    let dead = read_topic(&brokers, "outboxd.dlq", Duration::from_secs(60), |m| {
        !m.is_empty()
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let too_large = dead
        .iter()
        .find(|m| m.header("reason") == Some("too_large"))
        .expect("a too_large dead letter");
    assert_eq!(too_large.header("id"), Some(big_id.as_str()));
    assert_eq!(too_large.header("topic"), Some("outbox.order"));
    assert_eq!(too_large.header("type"), Some("order.created"));
    assert_eq!(too_large.header("traceparent"), Some("00-big-01"));
    assert_eq!(too_large.key.as_deref(), Some("k0"));
    assert!(too_large.value.is_empty(), "the payload was to be left out");
    let detail = too_large.header("detail").unwrap();
    assert!(
        detail.contains("message.max.bytes") && detail.contains("omitted"),
        "{detail}"
    );
    assert!(too_large.header("lsn").unwrap().contains('/'));
    assert_eq!(too_large.header("index"), Some("0"));

    // Everything else arrived, in order, and the stream went on.
    let messages = read_topic(&brokers, "outbox.order", Duration::from_secs(60), |m| {
        has_all(m, 3..203)
    })
    .await;
    let seqs: Vec<u64> = messages.iter().map(KafkaMessage::seq).collect();
    let expected: Vec<u64> = std::iter::once(0).chain(3..203).collect();
    assert_eq!(seqs, expected);
    assert!(outboxd.is_running(), "{}", outboxd.log_text());
    let log = outboxd.log_text();
    assert!(
        log.contains("event dead-lettered") && log.contains("too_large"),
        "no dead-letter log line:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_producer_options_stop_outboxd_with_one_clear_line() {
    let mock = mock(1);
    let env = SinkEnv::kafka(&mock.bootstrap_servers(), &KafkaSettings::default()).await;
    let base = std::fs::read_to_string(&env.config).unwrap();
    let run_with = |options: &str| {
        std::fs::write(&env.config, format!("{base}{options}\n")).unwrap();
        let out = env.command_with(&["run"], &[("OUTBOXD_LOG", "info")]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    };

    // Weakening the delivery guarantees: refused when the configuration is read.
    let (code, err) = run_with("\"acks\" = \"1\"");
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("sink.kafka.options.\"acks\" may not be set"),
        "{err}"
    );

    // An option librdkafka does not know: refused at startup, before streaming.
    let (code, err) = run_with("\"no.such.option\" = \"1\"");
    assert_eq!(code, Some(1), "{err}");
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("outboxd stopped") && last.contains("no.such.option"),
        "{err}"
    );
}

// ------------------------------------------------------------ effectively-once (transactions)

fn effectively_once_settings() -> KafkaSettings {
    KafkaSettings {
        sink: "delivery = \"effectively-once\"\nmax_batch_events = 200\nmax_inflight_events = 1000"
            .into(),
        kafka: String::new(),
        options: String::new(),
    }
}

/// A mock cluster with the topics (it has no CreateTopics): the outbox topic in 3 partitions
/// and the offsets topic.
fn effectively_once_mock() -> MockCluster<'static, DefaultProducerContext> {
    let mock = mock(1);
    mock.create_topic("outbox.order", 3, 1).unwrap();
    mock.create_topic("outboxd.offsets", 1, 1).unwrap();
    mock
}

async fn read_committed(brokers: &str, count: usize) -> Vec<KafkaMessage> {
    read_topic_isolated(
        brokers,
        "outbox.order",
        "read_committed",
        Duration::from_secs(60),
        move |m| m.len() >= count,
    )
    .await
}

/// Fencing: the broker answers the transaction coordinator's calls with PRODUCER_FENCED, as it
/// does once another producer with the same transactional.id (another outboxd that took over
/// the slot) has initialised. outboxd must stop with a message and confirm nothing past what
/// was committed; a restarted instance delivers the rest, each event once.
///
/// librdkafka's mock cluster gives every new producer a new producer id, so a second outboxd
/// does not fence the first there (a real broker bumps the epoch of the transactional.id's
/// one producer id); the fencing answer is injected instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_stops_and_the_next_instance_delivers_the_rest_once() {
    let mock = effectively_once_mock();
    let brokers = mock.bootstrap_servers();
    let env = SinkEnv::kafka(&brokers, &effectively_once_settings()).await;
    let db = env.db().await;
    let mut first = env.run();
    emit_txn(&db, 0, 50, 5).await;
    read_committed(&brokers, 50).await;
    let confirmed_before = confirmed_flush(&db, SLOT).await;
    mock.request_errors(
        RDKafkaApiKey::AddPartitionsToTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    emit_txn(&db, 50, 50, 5).await;
    let status = first.wait(Duration::from_secs(60));
    let log = first.log_text();
    assert!(!status.success(), "the fenced instance stops:\n{log}");
    assert!(
        log.contains("fenced") && log.contains("transactional.id"),
        "the stop says why:\n{log}"
    );
    let confirmed_after = confirmed_flush(&db, SLOT).await;
    let fenced_commit_end = wal_insert_lsn(&db).await;
    assert!(
        confirmed_after < fenced_commit_end,
        "the slot was not confirmed past the uncommitted batch ({confirmed_before} → {confirmed_after})"
    );

    // The fencing answer is used up: a new instance initialises, reads the committed position
    // and delivers the rest.
    let _next = env.run();
    let messages = read_committed(&brokers, 100).await;
    let duplicates = check_complete_and_ordered(&messages, 0..100);
    println!(
        "fenced: the first instance stopped with a message; the next delivered the rest ({duplicates} duplicates visible on the mock, which keeps the fenced batch's messages)"
    );
}
