//! A three-node Apache Kafka cluster (KRaft, every node broker and controller, replication
//! factor 3, `min.insync.replicas = 2`) under load: brokers killed, restarted, stopped one
//! after the other, and down for a minute. Nothing may be lost, per-key order must hold, and
//! in effectively-once mode a read_committed consumer sees no duplicate.
//!
//! The tests of this file take a lock each: three JVMs, Postgres and outboxd already share the
//! machine's two cores.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "kafka")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::{Duration, Instant};

use support::apache_kafka::Kafka;
use support::kafka::*;
use support::*;

const SLOT: &str = "outboxd";
const TOPIC: &str = "outbox.order";

/// One cluster at a time in this test binary.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn settings(effectively_once: bool) -> KafkaSettings {
    let delivery = if effectively_once {
        "effectively-once"
    } else {
        "at-least-once"
    };
    KafkaSettings {
        sink: format!("delivery = \"{delivery}\""),
        // Topics with the brokers' default replication factor (3).
        kafka: "create_topics = true\ntopic_partitions = 3".into(),
        options: String::new(),
    }
}

/// Load: 1,000 events a second in transactions of 1 to 100 (50 on average), 20 keys.
async fn writer(env: &SinkEnv) -> Load {
    Load::start(env.db().await, 1000, 100, 20, 0xc1_0057)
}

fn isolation(effectively_once: bool) -> &'static str {
    if effectively_once {
        "read_committed"
    } else {
        "read_uncommitted"
    }
}

async fn wait_for_events(brokers: &str, effectively_once: bool, count: usize) {
    let read = read_topic_isolated(
        brokers,
        TOPIC,
        isolation(effectively_once),
        Duration::from_secs(60),
        move |m| m.len() >= count,
    )
    .await;
    assert!(read.len() >= count, "only {} events arrived", read.len());
}

/// Blocking cluster operations (JVMs starting, metadata polls) off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn leader_kill_and_rolling_restart_under_load(effectively_once: bool) {
    let _one = ONE_CLUSTER.lock().await;
    let kafka = blocking(Kafka::three_nodes).await;
    let brokers = kafka.brokers();
    let env = SinkEnv::kafka(&brokers, &settings(effectively_once)).await;
    let mut outboxd = env.run();
    let load = writer(&env).await;
    wait_for_events(&brokers, effectively_once, 1000).await;
    let mut kafka = kafka;
    let mut topics = vec![TOPIC];
    if effectively_once {
        topics.push("outboxd.offsets");
    }

    // SIGKILL the leader of a partition being written, let the load go on without it, then
    // restart it and wait until it is back in every in-sync replica set.
    let leader = kafka.leader(TOPIC, 0).expect("a leader of partition 0");
    let killed_at = Instant::now();
    kafka.kill_node(leader);
    let kafka = blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while kafka.leader(TOPIC, 0).is_none_or(|l| l == leader) {
            assert!(Instant::now() < deadline, "no new leader for partition 0");
            std::thread::sleep(Duration::from_millis(200));
        }
        kafka
    })
    .await;
    let failover = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (kafka, topics) = blocking(move || {
        let mut kafka = kafka;
        kafka.start_node(leader);
        kafka.wait_fully_replicated(&topics, Duration::from_secs(120));
        (kafka, topics)
    })
    .await;

    // A rolling restart: each node stopped (controlled shutdown) and started again, the next
    // one only once every partition has its three replicas in sync again.
    let rolling = Instant::now();
    let kafka = blocking(move || {
        let mut kafka = kafka;
        for i in 0..kafka.len() {
            kafka.stop_node(i);
            kafka.start_node(i);
            kafka.wait_fully_replicated(&topics, Duration::from_secs(120));
        }
        kafka
    })
    .await;
    let rolling = rolling.elapsed();
    let total = load.stop().await;
    assert!(
        outboxd.is_running(),
        "outboxd stopped:\n{}",
        outboxd.log_text()
    );

    let messages = read_topic_isolated(
        &brokers,
        TOPIC,
        isolation(effectively_once),
        Duration::from_secs(180),
        move |m| has_all(m, 0..total),
    )
    .await;
    let duplicates = check_complete_and_ordered(&messages, 0..total);
    let mode = if effectively_once {
        "effectively-once, read_committed"
    } else {
        "at-least-once"
    };
    println!(
        "3 nodes, {mode}: {total} events at 1,000/s through a SIGKILL of partition 0's leader (new leader after {:.1} s), its restart and a rolling restart of all three ({:.0} s): none lost, in order per key, {duplicates} duplicates",
        failover.as_secs_f64(),
        rolling.as_secs_f64()
    );
    if effectively_once {
        assert_eq!(
            duplicates, 0,
            "duplicates seen by a read_committed consumer"
        );
        assert_eq!(messages.len() as u64, total);
    }
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(60)).success());
    drop(kafka);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_at_least_once_leader_kill_and_rolling_restart_lose_nothing() {
    leader_kill_and_rolling_restart_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_effectively_once_leader_kill_and_rolling_restart_no_duplicates() {
    leader_kill_and_rolling_restart_under_load(true).await;
}

/// One broker of three down for 60 s under load: the other two hold every partition's
/// in-sync replicas (2 = `min.insync.replicas`), so events keep flowing, and memory stays
/// flat. Then a second broker goes down for 60 s: below `min.insync.replicas` (and without a
/// controller quorum), Kafka acknowledges nothing, the slot is held where the
/// acknowledgements stopped, and memory stops growing at the in-flight budget. Both come
/// back: everything arrives, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_down_under_load_hold_the_slot_keep_memory_flat_and_lose_nothing() {
    let _one = ONE_CLUSTER.lock().await;
    let kafka = blocking(Kafka::three_nodes).await;
    let brokers = kafka.brokers();
    let env = SinkEnv::kafka(&brokers, &settings(false)).await;
    let outboxd = env.run();
    let db = env.db().await;
    let load = writer(&env).await;
    wait_for_events(&brokers, false, 1000).await;
    let mut kafka = kafka;
    let before = outboxd.rss_kib().unwrap();

    // One broker down for 60 s (SIGKILL): events keep being acknowledged.
    let down = kafka.leader(TOPIC, 0).expect("a leader");
    kafka.kill_node(down);
    let outage = Instant::now();
    let confirmed_at_start = confirmed_flush(&db, SLOT).await;
    let (mut rss_early, mut rss_late) = (0, 0);
    while outage.elapsed() < Duration::from_secs(60) {
        let (rss, _) = outboxd.rss_kib().unwrap();
        if outage.elapsed() < Duration::from_secs(20) {
            rss_early = rss_early.max(rss);
        } else {
            rss_late = rss_late.max(rss);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let confirmed_after_minute = confirmed_flush(&db, SLOT).await;
    assert!(
        confirmed_after_minute > confirmed_at_start,
        "with two brokers of three, events must keep flowing (the slot stayed at {confirmed_at_start:X})"
    );
    assert!(
        rss_late <= rss_early + 8 * 1024,
        "memory grew while a broker was down: {rss_early} KiB then {rss_late} KiB"
    );

    // A second broker down: nothing can be acknowledged any more.
    let second = (0..3).find(|&i| i != down).unwrap();
    kafka.kill_node(second);
    // Requests already answered may still be acknowledged: half a second later, everything
    // committed is unacknowledged (the writer commits every 50 ms on average).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first_unacked = wal_insert_lsn(&db).await;
    let held = Instant::now();
    let (mut rss_held_early, mut rss_held_late) = (0, 0);
    while held.elapsed() < Duration::from_secs(60) {
        let confirmed = confirmed_flush(&db, SLOT).await;
        assert!(
            confirmed < first_unacked,
            "the slot moved to {confirmed:X}, past events Kafka cannot have acknowledged ({first_unacked:X})"
        );
        let (rss, _) = outboxd.rss_kib().unwrap();
        if held.elapsed() < Duration::from_secs(20) {
            rss_held_early = rss_held_early.max(rss);
        } else {
            rss_held_late = rss_held_late.max(rss);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rss_two_down = rss_held_early.max(rss_held_late);
    // Unacknowledged events pile up to the in-flight budget (10,000 events, reached in about
    // 10 s at this rate), no further: flat from then on, and within the budget's bytes.
    assert!(
        rss_held_late <= rss_held_early + 8 * 1024,
        "memory kept growing while Kafka acknowledged nothing: {rss_held_early} KiB in the first 20 s, then {rss_held_late} KiB"
    );
    assert!(
        rss_two_down <= rss_early + 24 * 1024,
        "memory grew past the in-flight budget while Kafka acknowledged nothing: {rss_early} KiB then {rss_two_down} KiB"
    );

    let kafka = blocking(move || {
        let mut kafka = kafka;
        kafka.start_node(second);
        kafka.start_node(down);
        kafka
    })
    .await;
    let back = Instant::now();
    let total = load.stop().await;
    let messages = read_topic(&brokers, TOPIC, Duration::from_secs(180), move |m| {
        has_all(m, 0..total)
    })
    .await;
    let duplicates = check_complete_and_ordered(&messages, 0..total);
    println!(
        "3 nodes, at-least-once, 1,000 events/s: one broker down 60 s (events kept flowing, slot {confirmed_at_start:X} -> {confirmed_after_minute:X}), then two down 60 s (slot held below {first_unacked:X}); all {total} arrived {:.1} s after both were back, in order per key, {duplicates} duplicates; RSS before {} KiB; one broker down: first 20 s {rss_early} KiB, last 40 s {rss_late} KiB; two down: first 20 s {rss_held_early} KiB, last 40 s {rss_held_late} KiB",
        back.elapsed().as_secs_f64(),
        before.0
    );
    let last = wal_insert_lsn(&db).await;
    wait_until(
        "the slot to confirm the backlog",
        Duration::from_secs(60),
        || {
            let db = &db;
            async move { confirmed_flush(db, SLOT).await >= first_unacked.max(last - 1) }
        },
    )
    .await;
    drop(kafka);
}
