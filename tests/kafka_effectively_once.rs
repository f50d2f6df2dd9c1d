//! Effectively-once delivery to a real Apache Kafka broker (one KRaft node from the official
//! jars): each batch is one Kafka transaction with the WAL position in the offsets topic, and
//! a `read_committed` consumer must see every event exactly once, in per-key order, whatever
//! is killed. These are the proofs librdkafka's mock cluster cannot give: it shows aborted
//! transactions to read_committed consumers and never fences a producer.
//!
//! SIGKILLs at random moments, a Postgres restart and a walsender kill with no duplicate, and
//! a record the broker refuses inside a transaction, are in the conformance suite
//! (tests/conformance_kafka.rs); here the crash windows and what is particular to Kafka's
//! transactions.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "kafka")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::{Duration, Instant};

use support::apache_kafka::{Kafka, transaction_open};
use support::kafka::*;
use support::*;
use tokio_postgres::Client;

const TOPIC: &str = "outbox.order";

fn settings(sink: &str, kafka: &str) -> KafkaSettings {
    KafkaSettings {
        sink: format!("delivery = \"effectively-once\"\n{sink}"),
        kafka: format!("create_topics = true\ntopic_partitions = 3\n{kafka}"),
        options: String::new(),
    }
}

/// What a read_committed consumer sees of `topic` once it holds every seq of `expected`,
/// and after a further wait for anything more to (wrongly) arrive.
async fn read_committed_settled(
    brokers: &str,
    topic: &str,
    expected: std::ops::Range<u64>,
    timeout: Duration,
) -> Vec<KafkaMessage> {
    let want = expected.clone();
    let first = read_topic_isolated(brokers, topic, "read_committed", timeout, move |m| {
        has_all(m, want.clone())
    })
    .await;
    assert!(
        has_all(&first, expected.clone()),
        "not every event reached the read_committed consumer within {timeout:?} ({} messages)",
        first.len()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = first.len();
    read_topic_isolated(
        brokers,
        topic,
        "read_committed",
        Duration::from_secs(20),
        move |m| m.len() >= n,
    )
    .await
}

/// Emits `count` events from `first`, keys `k<seq % 20>`, with payloads of about `pad`
/// bytes, in one Postgres transaction: outboxd sends them as several large Kafka transactions,
/// each open for a while.
async fn emit_padded(db: &Client, first: u64, count: u64, pad: usize) {
    db.execute(
        "SELECT outbox_emit('order', 'k' || (g % 20), 'order.created', \
                jsonb_build_object('seq', g, 'pad', repeat('p', $3::int))) \
         FROM generate_series($1::bigint, $2::bigint) AS g",
        &[
            &(first as i64),
            &((first + count - 1) as i64),
            &(pad as i32),
        ],
    )
    .await
    .expect("emit padded events");
}

/// Polls until a transaction of outboxd's is open on [`TOPIC`] (records written, no commit
/// yet), or `timeout` passes.
async fn wait_open_transaction(brokers: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let b = brokers.to_owned();
        if tokio::task::spawn_blocking(move || transaction_open(&b, TOPIC))
            .await
            .unwrap()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// The crash windows that replay committed transactions: after Kafka committed a batch and
/// before the slot was confirmed, a Postgres restart (the slot can forget confirmations on 16
/// and older) and a walsender kill. The replayed events are at or below the position committed
/// in the offsets topic, so outboxd skips them: a read_committed consumer sees each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_after_a_crash_a_postgres_restart_and_a_walsender_kill_are_skipped() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    let env = SinkEnv::kafka(
        &brokers,
        &settings("max_batch_events = 200\nmax_inflight_events = 1000", ""),
    )
    .await;
    let db = env.db().await;

    let mut crashing = env.run_with(&[("OUTBOXD_FAILPOINT", "after-ack-before-confirm@3")]);
    for i in 0..10 {
        emit_txn(&db, i * 100, 100, 20).await;
    }
    let status = crashing.wait(Duration::from_secs(60));
    assert!(!status.success(), "{}", crashing.log_text());
    let committed_before_restart = count_to_end(&brokers, TOPIC, "read_committed").await;
    assert!(
        committed_before_restart > 0,
        "the crash came after Kafka committed"
    );
    let restarted = env.run();
    let messages = read_committed_settled(&brokers, TOPIC, 0..1000, Duration::from_secs(60)).await;
    assert_each_once(&messages, 0..1000);
    let log = std::fs::read_to_string(env.dir.join("outboxd-1.log")).unwrap();
    assert!(
        log.contains("Kafka transactions ready") && !log.contains("committed=nothing yet"),
        "the restarted instance read the committed position:\n{log}"
    );
    drop(restarted);

    // A Postgres restart, then a walsender kill, while more events are written.
    let outboxd = env.run_with(&[("OUTBOXD_POSTGRES__STATUS_INTERVAL_MS", "100")]);
    wait_slot_active(&db).await;
    write_events(&db, 1000, 1000, 200, 20, 1).await;
    env.pg.stop();
    env.pg.start_again();
    let db = env.db().await;
    write_events(&db, 2000, 1000, 200, 20, 1).await;
    wait_slot_active(&db).await;
    db.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active",
    )
    .await
    .unwrap();
    write_events(&db, 3000, 1000, 200, 20, 1).await;
    let messages = read_committed_settled(&brokers, TOPIC, 0..4000, Duration::from_secs(90)).await;
    assert_each_once(&messages, 0..4000);

    // The offsets topic holds this slot's position, under its WAL history's key
    // (`<system id>/<database>/<slot>`), as compacted JSON values with the timeline.
    let offsets = read_topic_isolated(
        &brokers,
        "outboxd.offsets",
        "read_committed",
        Duration::from_secs(30),
        |m| !m.is_empty(),
    )
    .await;
    let key = marker_key(&db).await;
    assert!(
        offsets
            .iter()
            .all(|m| m.key.as_deref() == Some(key.as_str())),
        "{offsets:?}"
    );
    let last = offsets.last().expect("a committed position");
    assert!(
        last.value.contains("\"commit_lsn\"") && last.value.contains("\"timeline\":1"),
        "{}",
        last.value
    );
    println!(
        "effectively-once (Apache Kafka): 4,000 events through a crash after a commit, a Postgres restart and a walsender kill: each exactly once for read_committed; {} positions committed, the last {}",
        offsets.len(),
        last.value
    );
    drop(outboxd);
}

/// A transaction left open by a killed outboxd is never visible to read_committed consumers:
/// first the broker aborts it when its timeout passes (no outboxd running), then, after a
/// second kill, the next outboxd's producer aborts it when it starts. Either way the records
/// stay in the log (a read_uncommitted consumer sees them) and read_committed never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_open_by_a_killed_outboxd_is_never_visible() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    // The transaction timeout is the delivery timeout: 5 s, so that the broker aborts soon.
    let env = SinkEnv::kafka(
        &brokers,
        &settings(
            "max_batch_events = 2000\nmax_inflight_events = 4000\nmax_inflight_bytes = 67108864",
            "delivery_timeout_ms = 5000",
        ),
    )
    .await;
    let db = env.db().await;
    let mut outboxd = env.run();
    emit_txn(&db, 0, 10, 5).await;
    let first = read_committed_settled(&brokers, TOPIC, 0..10, Duration::from_secs(60)).await;
    assert_each_once(&first, 0..10);

    // outboxd may produce 1 MB/s: a 2 MB transaction stays open for about 2 s.
    kafka.throttle_producer("outboxd", Some(1_000_000));
    // Kill 1, while a transaction is open; nobody takes over: the broker aborts it.
    let mut next = 10;
    let mut open_at_kill = false;
    // A kill can land just after a commit on a loaded machine: try up to 15 times.
    for _ in 0..15 {
        emit_padded(&db, next, 4_000, 1000).await;
        next += 4_000;
        if wait_open_transaction(&brokers, Duration::from_secs(30)).await {
            outboxd.kill9();
            let b = brokers.clone();
            open_at_kill = tokio::task::spawn_blocking(move || transaction_open(&b, TOPIC))
                .await
                .unwrap();
            if open_at_kill {
                break;
            }
        }
        // The kill came after the commit: go on with a new instance and try again.
        outboxd.kill9();
        outboxd = env.run();
    }
    assert!(open_at_kill, "never killed outboxd inside a transaction");
    let committed_at_kill = count_to_end(&brokers, TOPIC, "read_committed").await;
    let b = brokers.clone();
    let aborted_by_broker = Instant::now();
    wait_until(
        "the broker to abort the open transaction (transaction timeout 5 s)",
        Duration::from_secs(60),
        || {
            let b = b.clone();
            async move {
                !tokio::task::spawn_blocking(move || transaction_open(&b, TOPIC))
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    let after_abort = count_to_end(&brokers, TOPIC, "read_committed").await;
    let in_log = count_to_end(&brokers, TOPIC, "read_uncommitted").await;
    assert_eq!(
        after_abort, committed_at_kill,
        "the aborted transaction's records became visible to read_committed"
    );
    assert!(
        in_log > after_abort,
        "the aborted records are in the log ({in_log} records, {after_abort} committed)"
    );
    println!(
        "killed inside a transaction: {committed_at_kill} records visible to read_committed; the broker aborted the open one after {:.1} s and read_committed still sees {after_abort} of the {in_log} records in the log",
        aborted_by_broker.elapsed().as_secs_f64()
    );

    // Kill 2, while a transaction is open; a new outboxd starts at once: its producer's
    // initialisation aborts the open transaction before it writes.
    let mut outboxd = env.run();
    let mut open_at_kill = false;
    // A kill can land just after a commit on a loaded machine: try up to 15 times.
    for _ in 0..15 {
        emit_padded(&db, next, 4_000, 1000).await;
        next += 4_000;
        if wait_open_transaction(&brokers, Duration::from_secs(60)).await {
            outboxd.kill9();
            let b = brokers.clone();
            open_at_kill = tokio::task::spawn_blocking(move || transaction_open(&b, TOPIC))
                .await
                .unwrap();
            if open_at_kill {
                break;
            }
        }
        outboxd.kill9();
        outboxd = env.run();
    }
    assert!(
        open_at_kill,
        "never killed outboxd inside a second transaction"
    );
    kafka.throttle_producer("outboxd", None);
    let _last = env.run();
    let messages = read_committed_settled(&brokers, TOPIC, 0..next, Duration::from_secs(180)).await;
    assert_each_once(&messages, 0..next);
    let uncommitted = count_to_end(&brokers, TOPIC, "read_uncommitted").await;
    assert!(
        uncommitted > messages.len(),
        "the records of the aborted transactions are in the log: {uncommitted} read_uncommitted, {} read_committed",
        messages.len()
    );
    println!(
        "two kills inside transactions: read_committed saw each of {next} events once; read_uncommitted sees {} more records (the aborted ones)",
        uncommitted - messages.len()
    );
}

/// Fencing for real: outboxd A is frozen (SIGSTOP) inside a Kafka transaction. Postgres ends
/// its session after outboxd's `wal_sender_timeout` (10 s), and outboxd B (same slot, same
/// `transactional.id`, standing by) takes the slot over: forwarding resumes within 15 s of the
/// freeze. B's producer fences A's (the broker bumps the transactional.id's epoch and aborts
/// A's open transaction) and delivers everything. A is resumed (SIGCONT): it commits nothing,
/// stops with one clear line and a non-zero exit, and the consumer sees no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_is_fenced_by_the_one_that_took_over_and_commits_nothing() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    let env = SinkEnv::kafka(
        &brokers,
        &settings(
            "max_batch_events = 2000\nmax_inflight_events = 4000\nmax_inflight_bytes = 67108864",
            "",
        ),
    )
    .await;
    let db = env.db().await;
    let mut a = env.run();
    emit_txn(&db, 0, 10, 5).await;
    read_committed_settled(&brokers, TOPIC, 0..10, Duration::from_secs(60)).await;

    // outboxd may produce 1 MB/s: a 2 MB transaction stays open for about 2 s.
    kafka.throttle_producer("outboxd", Some(1_000_000));
    let mut next = 10;
    let mut frozen = false;
    let mut frozen_at = Instant::now();
    // A kill can land just after a commit on a loaded machine: try up to 15 times.
    for _ in 0..15 {
        emit_padded(&db, next, 4_000, 1000).await;
        next += 4_000;
        if wait_open_transaction(&brokers, Duration::from_secs(60)).await {
            a.signal("STOP");
            frozen_at = Instant::now();
            let b = brokers.clone();
            frozen = tokio::task::spawn_blocking(move || transaction_open(&b, TOPIC))
                .await
                .unwrap();
            if frozen {
                break;
            }
            a.signal("CONT");
        }
    }
    assert!(frozen, "never froze outboxd A inside a transaction");
    kafka.throttle_producer("outboxd", None);
    let committed_when_frozen = count_to_end(&brokers, TOPIC, "read_committed").await;

    // B stands by; Postgres ends A's session at its wal_sender_timeout, and B takes over.
    // A, frozen, still holds the HTTP port: B serves none.
    let mut b = env.run_with(&[("OUTBOXD_HTTP__LISTEN", "")]);
    let b_brokers = brokers.clone();
    wait_until("B to forward", Duration::from_secs(120), || {
        let brokers = b_brokers.clone();
        async move { count_to_end(&brokers, TOPIC, "read_committed").await > committed_when_frozen }
    })
    .await;
    let takeover = frozen_at.elapsed();
    assert!(
        takeover < Duration::from_secs(15),
        "B forwarded {takeover:?} after A froze\n{}",
        b.log_text()
    );
    let messages = read_committed_settled(&brokers, TOPIC, 0..next, Duration::from_secs(180)).await;
    assert_each_once(&messages, 0..next);
    let b_log = b.log_text();
    assert!(
        b_log.contains("Kafka transactions ready"),
        "B initialised its transactional producer:\n{b_log}"
    );

    // A wakes up inside its transaction: fenced.
    a.signal("CONT");
    let status = a.wait(Duration::from_secs(90));
    let a_log = a.log_text();
    assert!(!status.success(), "A must stop:\n{a_log}");
    let last = a_log.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("fenced") && last.contains("transactional.id"),
        "A's last line must say it was fenced: {last:?}\n{a_log}"
    );

    // Nothing of A's came through, and B goes on.
    emit_txn(&db, next, 100, 5).await;
    let messages =
        read_committed_settled(&brokers, TOPIC, 0..next + 100, Duration::from_secs(60)).await;
    assert_each_once(&messages, 0..next + 100);
    assert!(b.is_running(), "B stopped:\n{}", b.log_text());
    println!(
        "fencing: A frozen inside a transaction with {committed_when_frozen} records committed; B forwarded {:.1} s after the freeze and delivered all {next}; A resumed and stopped with: {last}; read_committed saw each of {} events once",
        takeover.as_secs_f64(),
        next + 100
    );
}
