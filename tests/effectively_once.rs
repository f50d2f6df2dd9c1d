//! Effectively-once delivery to Redis (guarantee 6 of docs/guarantees.md): a marker per WAL
//! history, moved in one script with the entries, so that a replayed event is recognised and
//! not written again. The marker, a replay after a crash counted as already delivered, a dead
//! letter refused and replayed, and a stream another writer uses too. SIGKILLs, a Postgres
//! restart and a walsender kill with no duplicate, and poison in effectively-once mode, are in
//! the conformance suite (tests/conformance_redis.rs); other WAL histories (a new cluster, two
//! services, a restored copy) in tests/histories.rs. Real Postgres, real Redis, the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use support::*;
use tokio_postgres::Client;

const EFFECTIVELY_ONCE: &str = "[sink]\ndelivery = \"effectively-once\"\n";

/// Every seq of `expected` exactly once, per key in commit order.
fn assert_exactly_once(entries: &[Entry], expected: std::ops::Range<u64>) {
    assert_each_once(entries, expected);
}

/// The marker of this database's slot in `outboxd.offsets`, as JSON.
async fn marker(db: &Client, redis: &mut MultiplexedConnection) -> serde_json::Value {
    let value: String = redis::cmd("HGET")
        .arg("outboxd.offsets")
        .arg(marker_key(db).await)
        .query_async(redis)
        .await
        .unwrap();
    serde_json::from_str(&value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_marker_follows_the_last_event_and_a_clean_restart_repeats_nothing() {
    let env = Env::new(Postgres::start(), EFFECTIVELY_ONCE).await;
    env.setup();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;
    let mut outboxd = env.run();
    emit_txn(&db, 0, 3, 2).await;
    emit_txn(&db, 3, 1, 2).await;
    let entries = wait_stream_len(&redis, "outbox.order", 4, Duration::from_secs(30)).await;
    assert_exactly_once(&entries, 0..4);
    // The last event: the second transaction's first (and only) row, on timeline 1, at a WAL
    // position below the server's.
    let m = marker(&db, &mut redis).await;
    assert_eq!(m["timeline"], 1, "{m}");
    assert_eq!(m["index"], 0, "{m}");
    let lsn: outboxd_core::Lsn = m["commit_lsn"].as_str().unwrap().parse().unwrap();
    assert!(lsn.get() < wal_insert_lsn(&db).await, "{m}");
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
    // A restart repeats nothing, and goes on.
    let _outboxd = env.run();
    emit_txn(&db, 4, 2, 2).await;
    let entries = wait_stream_len(&redis, "outbox.order", 6, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stream_len(&mut redis, "outbox.order").await, 6);
    assert_exactly_once(&entries, 0..6);
}

/// A crash after Redis acknowledged a batch and before the slot was confirmed: the restarted
/// outboxd sends the batch again, Redis refuses every entry of it, and outboxd counts them as
/// already delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_a_crash_is_refused_by_redis_and_counted_as_already_delivered() {
    let env = Env::new(Postgres::start(), EFFECTIVELY_ONCE).await;
    env.setup();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;
    // Batches of at most 100 events: at least ten acknowledgements, so the third comes.
    let mut crashing = env.run_with(&[
        ("OUTBOXD_FAILPOINT", "after-ack-before-confirm@3"),
        ("OUTBOXD_SINK__MAX_BATCH_EVENTS", "100"),
    ]);
    for i in 0..10 {
        emit_txn(&db, i * 100, 100, 4).await;
    }
    let status = crashing.wait(Duration::from_secs(60));
    assert!(!status.success(), "{}", crashing.log_text());
    let before = stream_len(&mut redis, "outbox.order").await;
    assert!(before > 0, "the crash came after Redis acknowledged events");

    let restarted = env.run();
    let entries = wait_stream_len(&redis, "outbox.order", 1000, Duration::from_secs(60)).await;
    assert_exactly_once(&entries, 0..1000);
    let port = env.http_port;
    wait_until(
        "the replayed events to be counted",
        Duration::from_secs(20),
        || async move {
            metric_value(
                port,
                "outboxd_events_already_delivered_total{topic=\"outbox.order\"}",
            )
            .await
            .unwrap_or(0.0)
                > 0.0
        },
    )
    .await;
    let already = metric_value(
        port,
        "outboxd_events_already_delivered_total{topic=\"outbox.order\"}",
    )
    .await
    .unwrap_or(0.0);
    let forwarded = metric_value(
        port,
        "outboxd_events_forwarded_total{topic=\"outbox.order\"}",
    )
    .await
    .unwrap_or(0.0);
    println!(
        "replay after a crash: {before} entries before the restart, {already} refused as already delivered, {forwarded} forwarded after it, 0 duplicates"
    );
    assert_eq!(forwarded as u64 + before, 1000);
    drop(restarted);
}

/// An effectively-once setup whose key `outbox.broken` holds a string, so that Redis refuses
/// stream entries there (WRONGTYPE).
async fn with_a_broken_stream() -> (Env, Client, MultiplexedConnection) {
    let env = Env::new(Postgres::start(), EFFECTIVELY_ONCE).await;
    env.setup();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;
    let () = redis::cmd("SET")
        .arg("outbox.broken")
        .arg("not a stream")
        .query_async(&mut redis)
        .await
        .unwrap();
    (env, db, redis)
}

/// Another writer adds entries to outboxd's stream: no problem, since entry ids are Redis' own
/// and the marker lives apart. Its entries stay; outboxd's arrive once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_on_the_stream_changes_nothing() {
    let env = Env::new(Postgres::start(), EFFECTIVELY_ONCE).await;
    env.setup();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;
    let _: String = redis::cmd("XADD")
        .arg("outbox.order")
        .arg("*")
        .arg("by")
        .arg("someone else")
        .query_async(&mut redis)
        .await
        .unwrap();
    let check = env.command(&["check"]);
    assert!(check.status.success(), "{}", output_text(&check));
    assert!(output_text(&check).contains("markers in hash \"outboxd.offsets\""));
    let _outboxd = env.run();
    emit_txn(&db, 0, 5, 2).await;
    let entries = wait_stream_len(&redis, "outbox.order", 6, Duration::from_secs(30)).await;
    assert_eq!(entries[0].get("by"), Some("someone else"));
    assert_exactly_once(&entries[1..], 0..5);
}

/// An entry Redis refuses (WRONGTYPE) is dead-lettered in order, and a replay of the whole
/// batch is skipped as already delivered, the dead-letter entry included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_refused_in_a_multi_batch_is_dead_lettered_once_also_after_a_replay() {
    let (env, db, mut redis) = with_a_broken_stream().await;
    let mut outboxd = env.run_with(&[("OUTBOXD_FAILPOINT", "after-ack-before-confirm")]);
    db.batch_execute(
        "BEGIN; \
         SELECT outbox_emit('order', 'k1', 'order.created', '{\"seq\": 0}'); \
         SELECT outbox_emit('broken', 'k1', 'broken.created', '{\"seq\": 1}'); \
         SELECT outbox_emit('order', 'k1', 'order.created', '{\"seq\": 2}'); \
         COMMIT",
    )
    .await
    .unwrap();
    // Crashes after Redis acknowledged the batch, before the slot was confirmed.
    let status = outboxd.wait(Duration::from_secs(60));
    assert!(!status.success(), "{}", outboxd.log_text());
    let _restarted = env.run();
    emit_txn(&db, 3, 5, 2).await;
    let entries = wait_stream_len(&redis, "outbox.order", 7, Duration::from_secs(30)).await;
    let seqs: Vec<u64> = entries.iter().map(Entry::seq).collect();
    assert_eq!(seqs, [0, 2, 3, 4, 5, 6, 7]);
    // The replayed batch went to Redis before the events written after the restart: its dead
    // letter, had it been written again, is there by now.
    let dlq = read_stream(&mut redis, "outboxd.dlq").await;
    assert_eq!(dlq.len(), 1, "the dead letter once: {dlq:?}");
    assert!(dlq[0].get("detail").unwrap().contains("WRONGTYPE"));
    assert_eq!(dlq[0].seq(), 1);
}
