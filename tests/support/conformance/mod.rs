//! The conformance suite: what every sink must do, proven against its real broker.
//!
//! The scenarios ([`scenarios`]) are written once, against [`BrokerUnderTest`]: the
//! configuration that reaches the broker, `down` and `up` of its process, `read` of what
//! arrived, and how to make the broker refuse an event. `tests/conformance_<broker>.rs`
//! implements the trait for one broker and instantiates every scenario with
//! [`conformance_tests!`]; adding a broker changes nothing here.
//!
//! Every scenario asserts exactly: each event written is present, the first deliveries of
//! each key in commit order (each key in one shard), each event with its row's id, type and
//! headers; duplicates are counted and bounded (at-least-once) or must be 0
//! (effectively-once). A scenario ends with a sentinel transaction, one event per key, written
//! after everything else: once a consumer reads every sentinel, everything sent before it has
//! arrived too, so the count of duplicates is final without waiting on a clock.
//!
//! Adding a broker: in `tests/conformance_<broker>.rs`, a type that starts the broker's server
//! on a free port ([`super::free_port`]) with its data in a scratch directory
//! ([`super::scratch_dir`]) and kills it by PID when dropped; `impl BrokerUnderTest` for it,
//! whose `read` maps what the broker holds to [`Arrived`] (the key, the payload, and the id,
//! type, row headers and dead-letter context by the names the sink gives them); then
//! `conformance_tests!(MyServer::start());`. See `tests/conformance_redis.rs`.

pub mod scenarios;

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use tokio_postgres::Client;

use super::{Delivered, SinkEnv, emit_txn, has_all, last_header, wait_until};

/// The topic of the test events (aggregate type `order`).
pub const TOPIC: &str = "outbox.order";
/// The dead-letter topic or stream (`sink.dead_letter`'s default).
pub const DEAD_LETTER: &str = "outboxd.dlq";
/// The slot outboxd streams.
pub const SLOT: &str = "outboxd";

/// A broker started by a test for the conformance scenarios, and stopped (by PID) when
/// dropped.
pub trait BrokerUnderTest {
    /// `kind` of outboxd's `[sink]` section.
    const KIND: &'static str;
    /// Whether the sink has `delivery = "effectively-once"` (no duplicates through crashes).
    const EFFECTIVELY_ONCE: bool;

    /// The sink's own configuration for this broker, as TOML: its `[sink.<kind>]` section
    /// (and subsections), whatever `[sink]` says.
    fn section(&self) -> String;

    /// Stops the broker process, keeping its data where the broker can (on disk).
    async fn down(&mut self);

    /// Starts the broker again on the same port and data; returns once it takes clients.
    async fn up(&mut self);

    /// What a consumer reads of `topic` now, from its start, in the broker's order (a Kafka
    /// topic partition by partition). For a sink that writes transactions only what was
    /// committed (Kafka: a `read_committed` consumer). Empty when the topic does not exist.
    async fn read(&self, topic: &str) -> Vec<Arrived>;

    /// [`section`](Self::section) with the broker's size limit at its default (about 1 MB)
    /// where the sink's own is larger (Redis), so that a 2 MB event is too large.
    fn limited_section(&self) -> String {
        self.section()
    }

    /// Makes the broker itself refuse events sent to `topic` (set up before outboxd
    /// starts), and says how it refuses; `None` when this broker cannot be made to.
    async fn refuse(&self, topic: &str) -> Option<Refusal>;
}

/// How a broker refuses the events of a topic prepared by [`BrokerUnderTest::refuse`].
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Bytes of padding the refused event's payload carries (over a size limit), or 0.
    pub pad: usize,
    /// The dead letter's `reason`.
    pub reason: &'static str,
    /// What the dead letter's `detail` contains: the broker's own error.
    pub detail: &'static str,
}

/// One event as a consumer reads it back, whatever the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrived {
    /// Its key; empty when it has none.
    pub key: String,
    /// Its payload, as text.
    pub payload: String,
    /// Everything else the broker carries, by the names the sink gives it: `id`, `type`, the
    /// row's headers one by one, and a dead letter's context (`reason`, `detail`, `topic`,
    /// `lsn`, ...).
    pub headers: Vec<(String, String)>,
    /// The shard that holds it when the broker splits a topic (a Kafka partition).
    pub shard: Option<i32>,
}

impl Arrived {
    /// The last value named `name` (a dead letter's context comes after the row's headers).
    pub fn header(&self, name: &str) -> Option<&str> {
        last_header(&self.headers, name)
    }
}

impl Delivered for Arrived {
    fn seq(&self) -> u64 {
        let payload: serde_json::Value = serde_json::from_str(&self.payload)
            .unwrap_or_else(|e| panic!("payload {:?}: {e}", self.payload));
        payload["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("no seq in {:?}", self.payload))
    }

    fn key(&self) -> &str {
        &self.key
    }

    fn shard(&self) -> Option<i32> {
        self.shard
    }
}

/// `sink.delivery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// `at-least-once`.
    AtLeastOnce,
    /// `effectively-once`.
    EffectivelyOnce,
}

impl Delivery {
    fn as_str(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::EffectivelyOnce => "effectively-once",
        }
    }
}

/// Postgres, the outbox, and a configuration for `broker` with `delivery` and more `[sink]`
/// lines; `outboxd setup` done.
async fn start_env<B: BrokerUnderTest>(broker: &B, delivery: Delivery, sink: &str) -> SinkEnv {
    start_env_with(broker.section(), B::KIND, delivery, sink).await
}

/// [`start_env`] with the broker's section `section`.
async fn start_env_with(section: String, kind: &str, delivery: Delivery, sink: &str) -> SinkEnv {
    SinkEnv::start(&format!(
        "[sink]\nkind = \"{kind}\"\ndelivery = \"{}\"\n{sink}\n\n{section}",
        delivery.as_str(),
    ))
    .await
}

/// Waits until a consumer of `topic` has read every seq of `expected`; returns what it read.
async fn wait_arrived<B: BrokerUnderTest>(
    broker: &B,
    topic: &str,
    expected: Range<u64>,
    timeout: Duration,
) -> Vec<Arrived> {
    let what = format!("events {expected:?} in {topic}");
    wait_until(&what, timeout, || {
        let expected = expected.clone();
        async move { has_all(&broker.read(topic).await, expected) }
    })
    .await;
    broker.read(topic).await
}

/// Waits until a consumer of `topic` has read at least `n` messages.
async fn wait_count<B: BrokerUnderTest>(broker: &B, topic: &str, n: usize, timeout: Duration) {
    let what = format!("{n} messages in {topic}");
    wait_until(&what, timeout, || async move {
        broker.read(topic).await.len() >= n
    })
    .await;
}

/// Writes the sentinel transaction (seqs `next..next+keys`, one per key), waits until every
/// event from 0 to it has arrived in [`TOPIC`], and returns what arrived and the range of
/// seqs written.
async fn settle<B: BrokerUnderTest>(
    broker: &B,
    db: &Client,
    next: u64,
    keys: u64,
    timeout: Duration,
) -> (Vec<Arrived>, Range<u64>) {
    emit_txn(db, next, keys, keys).await;
    let all = 0..next + keys;
    (wait_arrived(broker, TOPIC, all.clone(), timeout).await, all)
}

/// Checks that each arrived test event carries its row's id, its type and its headers.
async fn assert_rows_carried(db: &Client, arrived: &[Arrived]) {
    let ids: HashMap<u64, String> = db
        .query(
            "SELECT (payload->>'seq')::bigint, id::text FROM outbox WHERE aggregate_type = 'order'",
            &[],
        )
        .await
        .expect("read the outbox")
        .iter()
        .filter_map(|r| Some((r.get::<_, Option<i64>>(0)? as u64, r.get(1))))
        .collect();
    for a in arrived {
        let id = ids.get(&a.seq()).map(String::as_str);
        assert!(id.is_some(), "no row for {a:?}");
        assert_eq!(a.header("id"), id, "the row's id: {a:?}");
        assert_eq!(a.header("type"), Some("order.created"), "{a:?}");
        assert_eq!(a.header("source"), Some("test"), "the row's headers: {a:?}");
    }
}

/// Generates one `#[tokio::test]` per conformance scenario for the broker that `$start` (an
/// expression giving a [`BrokerUnderTest`]) starts, a new one per test.
#[allow(unused_macros)] // used by the conformance_*.rs files only
macro_rules! conformance_tests {
    ($start:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn per_key_order_under_load() {
            $crate::support::conformance::scenarios::per_key_order_under_load($start).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_outage_under_load_holds_the_slot_and_loses_nothing() {
            $crate::support::conformance::scenarios::outage_under_load($start).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn poison_is_dead_lettered_and_later_events_flow() {
            $crate::support::conformance::scenarios::poison(
                $start,
                $crate::support::conformance::Delivery::AtLeastOnce,
            )
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn poison_is_dead_lettered_once_in_effectively_once_mode() {
            $crate::support::conformance::scenarios::poison(
                $start,
                $crate::support::conformance::Delivery::EffectivelyOnce,
            )
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_event_too_large_for_the_broker_is_kept_whole_and_its_row_is_not_pruned() {
            $crate::support::conformance::scenarios::too_large_event_is_kept_whole($start).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_clean_run_logs_no_warning_or_error() {
            $crate::support::conformance::scenarios::a_clean_run_logs_no_warning_or_error(
                $start,
                $crate::support::conformance::Delivery::AtLeastOnce,
            )
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_clean_effectively_once_run_logs_no_warning_or_error() {
            $crate::support::conformance::scenarios::a_clean_run_logs_no_warning_or_error(
                $start,
                $crate::support::conformance::Delivery::EffectivelyOnce,
            )
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn kill_9_while_streaming_loses_nothing() {
            $crate::support::conformance::scenarios::kill_9_while_streaming($start).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn effectively_once_through_kill_9s_and_a_postgres_restart_has_no_duplicates() {
            $crate::support::conformance::scenarios::effectively_once_through_crashes($start).await;
        }
    };
}

#[allow(unused_imports)] // used by the conformance_*.rs files only
pub(crate) use conformance_tests;
