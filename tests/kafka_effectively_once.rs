//! Effectively-once delivery to a real Apache Kafka broker (one KRaft node from the official
//! jars): each batch is one Kafka transaction with the WAL position in the offsets topic, and
//! a `read_committed` consumer must see every event exactly once, in per-key order, whatever
//! is killed. These are the proofs librdkafka's mock cluster cannot give: it shows aborted
//! transactions to read_committed consumers and never fences a producer.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::{Duration, Instant};

use support::apache_kafka::{Kafka, count_to_end, transaction_open};
use support::kafka::*;
use support::*;
use tokio_postgres::Client;

const SLOT: &str = "outboxd";
const TOPIC: &str = "outbox.order";

fn settings(sink: &str, kafka: &str) -> KafkaSettings {
    KafkaSettings {
        sink: format!("delivery = \"effectively-once\"\n{sink}"),
        kafka: format!("create_topics = true\ntopic_partitions = 3\n{kafka}"),
        options: String::new(),
    }
}

/// Each seq of `expected` exactly once (per key in one partition, in commit order).
fn assert_each_once(messages: &[KafkaMessage], expected: std::ops::Range<u64>) {
    let duplicates = check_partitions_complete_and_ordered(messages, expected.clone());
    assert_eq!(
        duplicates, 0,
        "duplicates seen by a read_committed consumer"
    );
    assert_eq!(
        messages.len() as u64,
        expected.end - expected.start,
        "more messages than events"
    );
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

/// How many records a consumer with `isolation` reads from [`TOPIC`] to its end now.
async fn count(brokers: &str, isolation: &'static str) -> usize {
    let b = brokers.to_owned();
    tokio::task::spawn_blocking(move || count_to_end(&b, TOPIC, isolation))
        .await
        .unwrap()
}

/// Emits `total` events from `first` in transactions of 1 to `max_txn` rows (xorshift sizes),
/// keys `k<seq % 50>`.
async fn write_events(db: &Client, first: u64, total: u64, max_txn: u64, seed: u64) {
    let mut x = seed | 1;
    let mut seq = first;
    while seq < first + total {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (1 + x % max_txn).min(first + total - seq);
        emit_txn(db, seq, n, 50).await;
        seq += n;
    }
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
    let env = KafkaEnv::start(
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
    let committed_before_restart = count(&brokers, "read_committed").await;
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
    emit_many(&db, 1000, 1000, 20).await;
    env.pg.stop();
    env.pg.start_again();
    let db = env.db().await;
    emit_many(&db, 2000, 1000, 20).await;
    wait_slot_active(&db).await;
    db.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active",
    )
    .await
    .unwrap();
    emit_many(&db, 3000, 1000, 20).await;
    let messages = read_committed_settled(&brokers, TOPIC, 0..4000, Duration::from_secs(90)).await;
    assert_each_once(&messages, 0..4000);

    // The offsets topic holds this slot's position, as compacted JSON values.
    let offsets = read_topic_isolated(
        &brokers,
        "outboxd.offsets",
        "read_committed",
        Duration::from_secs(30),
        |m| !m.is_empty(),
    )
    .await;
    assert!(offsets.iter().all(|m| m.key.as_deref() == Some(SLOT)));
    let last = offsets.last().expect("a committed position");
    assert!(last.value.contains("\"commit_lsn\""), "{}", last.value);
    println!(
        "effectively-once (Apache Kafka): 4,000 events through a crash after a commit, a Postgres restart and a walsender kill: each exactly once for read_committed; {} positions committed, the last {}",
        offsets.len(),
        last.value
    );
    drop(outboxd);
}

/// The proof: 20,000 events, 16,000 of them written while outboxd is killed with
/// SIGKILL at 6 random moments, then a Postgres restart, then 4,000 more while the walsender
/// is terminated. A read_committed consumer sees every event exactly once, in per-key order;
/// the transactions the kills left open or half-written are aborted and never seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_events_through_sigkills_a_postgres_restart_and_a_walsender_kill_each_once()
{
    const TOTAL: u64 = 20_000;
    const DURING_CRASHES: u64 = 16_000;
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    let env = KafkaEnv::start(
        &brokers,
        &settings("max_batch_events = 500\nmax_inflight_events = 2000", ""),
    )
    .await;
    let writer_db = env.db().await;
    // About 1,000 events per second, so that every crash happens while applications write.
    let writer = tokio::spawn(async move {
        let started = Instant::now();
        for chunk in 0..DURING_CRASHES / 250 {
            write_events(&writer_db, chunk * 250, 250, 100, 0xabc + chunk).await;
            let due = started + Duration::from_millis((chunk + 1) * 250);
            tokio::time::sleep_until(due.into()).await;
        }
    });

    let mut x: u64 = 0x5eed_f00d;
    let mut next_delay = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Duration::from_millis(1000 + x % 1800)
    };
    let mut kills = 0;
    for _ in 0..6 {
        let mut outboxd = env.run_with(&[("OUTBOXD_POSTGRES__STATUS_INTERVAL_MS", "100")]);
        tokio::time::sleep(next_delay()).await;
        outboxd.kill9();
        kills += 1;
    }
    let writer_done = writer.is_finished();
    let outboxd = env.run();
    writer.await.unwrap();
    read_topic_isolated(
        &brokers,
        TOPIC,
        "read_committed",
        Duration::from_secs(120),
        |m| has_all(m, 0..DURING_CRASHES),
    )
    .await;

    // A Postgres restart: on 16 and older the slot can fall back to its last saved position,
    // so thousands of forwarded events are sent again (and skipped).
    env.pg.stop();
    env.pg.start_again();
    let db = env.db().await;
    let more = tokio::spawn({
        let db = env.db().await;
        async move { write_events(&db, DURING_CRASHES, TOTAL - DURING_CRASHES, 100, 0xdef).await }
    });
    wait_slot_active(&db).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    db.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active",
    )
    .await
    .unwrap();
    more.await.unwrap();
    let messages =
        read_committed_settled(&brokers, TOPIC, 0..TOTAL, Duration::from_secs(120)).await;
    let uncommitted = count(&brokers, "read_uncommitted").await;
    println!(
        "effectively-once (Apache Kafka): {TOTAL} events, {kills} SIGKILLs (writer still writing at the last: {}), a Postgres restart and a walsender kill: read_committed saw each exactly once, in order per key; the log holds {} records of aborted transactions that it never showed",
        !writer_done,
        uncommitted - messages.len()
    );
    assert_each_once(&messages, 0..TOTAL);
    assert!(
        !writer_done,
        "the crashes must happen while events are written"
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
    let env = KafkaEnv::start(
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
    let committed_at_kill = count(&brokers, "read_committed").await;
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
    let after_abort = count(&brokers, "read_committed").await;
    let in_log = count(&brokers, "read_uncommitted").await;
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
    let uncommitted = count(&brokers, "read_uncommitted").await;
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

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Fencing for real: outboxd A is frozen (SIGSTOP) inside a Kafka transaction; its walsender
/// is terminated, so outboxd B (same slot, same `transactional.id`) takes the slot over. B's
/// producer fences A's (the broker bumps the transactional.id's epoch and aborts A's open
/// transaction) and delivers everything. A is resumed (SIGCONT): it commits nothing, stops
/// with one clear line and a non-zero exit, and the consumer sees no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_is_fenced_by_the_one_that_took_over_and_commits_nothing() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    let env = KafkaEnv::start(
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
    // A kill can land just after a commit on a loaded machine: try up to 15 times.
    for _ in 0..15 {
        emit_padded(&db, next, 4_000, 1000).await;
        next += 4_000;
        if wait_open_transaction(&brokers, Duration::from_secs(60)).await {
            signal(a.pid(), "STOP");
            let b = brokers.clone();
            frozen = tokio::task::spawn_blocking(move || transaction_open(&b, TOPIC))
                .await
                .unwrap();
            if frozen {
                break;
            }
            signal(a.pid(), "CONT");
        }
    }
    assert!(frozen, "never froze outboxd A inside a transaction");
    kafka.throttle_producer("outboxd", None);
    let committed_when_frozen = count(&brokers, "read_committed").await;

    // A's walsender goes (as it would after wal_sender_timeout); B takes the slot over.
    db.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'outboxd'",
    )
    .await
    .unwrap();
    let mut b = env.run();
    let messages = read_committed_settled(&brokers, TOPIC, 0..next, Duration::from_secs(180)).await;
    assert_each_once(&messages, 0..next);
    let b_log = b.log_text();
    assert!(
        b_log.contains("Kafka transactions ready"),
        "B initialised its transactional producer:\n{b_log}"
    );

    // A wakes up inside its transaction: fenced.
    signal(a.pid(), "CONT");
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
        "fencing: A frozen inside a transaction with {committed_when_frozen} records committed; B took over and delivered all {next}; A resumed and stopped with: {last}; read_committed saw each of {} events once",
        next + 100
    );
}

/// A record the broker itself refuses (over the topic's `max.message.bytes`, which outboxd
/// cannot know in advance) inside a transaction: the transaction is aborted and redone with
/// that record in the dead-letter topic. read_committed consumers see every other event once,
/// in order, and the dead letter once; the aborted first attempt stays invisible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_is_dead_lettered_after_an_abort_and_the_rest_arrives_once() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    support::apache_kafka::create_topic(
        &brokers,
        "outbox.small",
        1,
        &[("max.message.bytes", "2000")],
    )
    .await;
    let env = KafkaEnv::start(&brokers, &settings("", "")).await;
    let db = env.db().await;
    let _outboxd = env.run();
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
    let dead = read_topic_isolated(
        &brokers,
        "outboxd.dlq",
        "read_committed",
        Duration::from_secs(60),
        |m| !m.is_empty(),
    )
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].header("reason"), Some("too_large"));
    assert_eq!(dead[0].header("topic"), Some("outbox.small"));
    let detail = dead[0].header("detail").unwrap();
    assert!(detail.contains("MessageSizeTooLarge"), "{detail}");
    let want = std::iter::once(0).chain(2..103);
    let messages = read_committed_settled(&brokers, TOPIC, 2..103, Duration::from_secs(60)).await;
    let seqs: std::collections::HashSet<u64> = messages.iter().map(KafkaMessage::seq).collect();
    assert!(seqs.contains(&0), "seq 0 arrived");
    let duplicates = check_partitions_complete_and_ordered(&messages, want);
    assert_eq!(duplicates, 0, "the aborted attempt is not visible");
    assert_eq!(messages.len(), 102);
    let small = count_to_end(&brokers, "outbox.small", "read_uncommitted");
    assert_eq!(small, 0, "the broker wrote nothing of the refused record");
    println!(
        "refused by the broker inside a transaction: aborted, redone with the record in the dead-letter topic ({detail}); 102 events once"
    );
}
