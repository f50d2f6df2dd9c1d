//! The conformance suite (`support::conformance`) against a real Apache Kafka broker (one
//! KRaft node from the official jars, see `support::apache_kafka`): per-key order, an outage,
//! poison, kill -9 and effectively-once (Kafka transactions, read back by a `read_committed`
//! consumer).
//!
//! The broker does not create topics on first use (`auto.create.topics.enable=false`, as many
//! production clusters): outboxd creates them (`create_topics`, 3 partitions). A 10 s delivery
//! timeout makes an outage reach outboxd (failed batches, sent again) rather than only
//! librdkafka's queue. The outage is a SIGKILL of the broker's JVM; its log stays on disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "kafka")] // the sink this file tests: built in, or nothing to run

mod support;

use support::apache_kafka::{Kafka, create_topic};
use support::conformance::{Arrived, BrokerUnderTest, Refusal, conformance_tests};
use support::kafka::read_to_end;

/// A one-node Kafka cluster of one test.
struct KafkaBroker(Kafka);

impl KafkaBroker {
    fn start() -> KafkaBroker {
        KafkaBroker(Kafka::single())
    }
}

impl BrokerUnderTest for KafkaBroker {
    const KIND: &'static str = "kafka";
    const EFFECTIVELY_ONCE: bool = true;

    fn section(&self) -> String {
        format!(
            "[sink.kafka]\nbrokers = \"{}\"\ncreate_topics = true\ntopic_partitions = 3\n\
             delivery_timeout_ms = 10000\n",
            self.0.brokers()
        )
    }

    async fn down(&mut self) {
        self.0.kill_node(0);
    }

    async fn up(&mut self) {
        // Waits for the JVM to start and join its cluster: off the runtime's other thread.
        tokio::task::block_in_place(|| self.0.start_node(0));
    }

    async fn read(&self, topic: &str) -> Vec<Arrived> {
        let (brokers, topic) = (self.0.brokers(), topic.to_owned());
        tokio::task::spawn_blocking(move || read_to_end(&brokers, &topic, "read_committed"))
            .await
            .unwrap()
            .into_iter()
            .map(|m| Arrived {
                key: m.key.unwrap_or_default(),
                payload: m.value,
                headers: m.headers,
                shard: Some(m.partition),
            })
            .collect()
    }

    async fn refuse(&self, topic: &str) -> Option<Refusal> {
        // A topic whose records may be 2,000 bytes at most, which outboxd cannot know:
        // the broker answers MessageSizeTooLarge.
        create_topic(
            &self.0.brokers(),
            topic,
            1,
            &[("max.message.bytes", "2000")],
        )
        .await;
        Some(Refusal {
            pad: 5000,
            reason: "too_large",
            detail: "MessageSizeTooLarge",
        })
    }
}

conformance_tests!(KafkaBroker::start());
