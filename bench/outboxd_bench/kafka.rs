//! The Kafka drains: the 1,000-row backlog drained to a one-node Apache Kafka broker (KRaft,
//! from the jars the tests run) in both delivery modes, each on a fresh broker warmed up with
//! the producer settings of the mode measured, so that a JVM's start-up is not what is
//! measured. The drain reports the broker's CPU per event beside outboxd's.

use std::time::{Duration, Instant};

use crate::args::Args;
use crate::backlog::PAD;
use crate::broker::{Broker, KafkaTarget};
use crate::drain::{Drain, drain};
use crate::support;
use crate::support::apache_kafka::Kafka;

/// The Kafka drains of one round: at-least-once, then effectively-once.
pub async fn drains(args: &Args) -> Vec<Drain> {
    let mut drains = Vec::new();
    for effectively_once in [false, true] {
        // A fresh broker per run: no topic, log or transaction state of the previous one.
        let kafka = Kafka::single();
        warm_up(&kafka.brokers(), effectively_once).await;
        let target = KafkaTarget {
            brokers: kafka.brokers(),
            pid: kafka.pids().first().copied(),
            max_batch: args.kafka_batch,
            create_topics: true,
        };
        drains.push(
            drain(
                Broker::Kafka,
                1000,
                args.events,
                Some(&target),
                effectively_once,
                false,
            )
            .await,
        );
        drop(kafka);
    }
    drains
}

/// Events a fresh broker is sent before it is measured, with the producer settings of the
/// mode measured.
const WARM_UP_EVENTS: u64 = 300_000;

/// Brings a fresh Kafka broker to speed before it is measured: a JVM started seconds ago runs
/// its code interpreted until the JIT compiles it, and spends several times the CPU per
/// record of a broker that has been running (measured here: about one core for 50,000
/// records/s just after start). The broker takes `WARM_UP_EVENTS` records of the drain's size
/// into a topic of its own, in 5,000-record transactions when `transactional`, so that the
/// code paths of the measured mode are compiled.
async fn warm_up(brokers: &str, transactional: bool) {
    support::apache_kafka::create_topic(brokers, "bench.warmup", 3, &[]).await;
    let brokers = brokers.to_owned();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || produce_warm_up(&brokers, transactional))
        .await
        .expect("warm-up thread");
    println!(
        "warm-up: {WARM_UP_EVENTS} records to a fresh broker{} in {:.1} s",
        if transactional { ", transactional" } else { "" },
        started.elapsed().as_secs_f64()
    );
}

/// The warm-up's records, sent by a producer configured as outboxd's (blocking).
fn produce_warm_up(brokers: &str, transactional: bool) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0");
    if transactional {
        // As outboxd's transactional producer (see the Kafka sink).
        config
            .set("transactional.id", "outboxd-bench-warm-up")
            .set("retry.backoff.ms", "5");
    }
    let producer: ThreadedProducer<DefaultProducerContext> =
        config.create().expect("warm-up producer");
    let timeout = Duration::from_secs(30);
    if transactional {
        producer
            .init_transactions(timeout)
            .expect("init_transactions");
    }
    let payload = format!("{{\"seq\":0,\"pad\":\"{}\"}}", "x".repeat(PAD));
    // Transactions of 5,000: a ThreadedProducer's commit waits for its polling thread
    // (100 ms), a cost outboxd's producer does not have.
    for chunk in 0..WARM_UP_EVENTS / 5000 {
        if transactional {
            producer.begin_transaction().expect("begin_transaction");
        }
        for i in 0..5000u64 {
            let key = format!("k{}", (chunk * 5000 + i) % 100);
            let mut record = BaseRecord::to("bench.warmup").key(&key).payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        if transactional {
            producer
                .commit_transaction(timeout)
                .expect("commit_transaction");
        }
    }
    producer.flush(timeout).expect("flush");
}
