//! Effectively-once delivery to Redis (guarantee 6 of docs/guarantees.md): entry ids derived
//! from the WAL position, so that Redis itself refuses a replayed event. The ids, a replay
//! after a crash counted as already delivered, a dead letter refused in a MULTI batch and
//! replayed, and a stream that another writer touched (outboxd must stop rather than swallow
//! events). SIGKILLs, a Postgres restart and a walsender kill with no duplicate, and poison in
//! effectively-once mode, are in the conformance suite (tests/conformance_redis.rs). Real
//! Postgres, real Redis, the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use support::*;
use tokio_postgres::Client;

const EFFECTIVELY_ONCE: &str = "[sink]\ndelivery = \"effectively-once\"\n";

/// Every seq of `expected` exactly once, per key in commit order, and entry ids that are
/// `<commit lsn>-<index>` and strictly increasing.
fn assert_exactly_once(entries: &[Entry], expected: std::ops::Range<u64>) {
    assert_each_once(entries, expected);
    let mut last = (0u64, 0u64);
    for e in entries {
        let (ms, seq) = e.entry_id.split_once('-').unwrap();
        let id = (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap());
        assert!(id > last, "entry ids must grow: {id:?} after {last:?}");
        last = id;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_ids_are_wal_positions_and_a_clean_restart_repeats_nothing() {
    let env = Env::new(Postgres::start(), EFFECTIVELY_ONCE).await;
    env.setup();
    let db = env.db().await;
    let redis = env.redis.connect().await;
    let mut outboxd = env.run();
    emit_txn(&db, 0, 3, 2).await;
    emit_txn(&db, 3, 1, 2).await;
    let entries = wait_stream_len(&redis, "outbox.order", 4, Duration::from_secs(30)).await;
    // The three rows of the first transaction share its commit LSN, indexed 0, 1, 2.
    let ids: Vec<(u64, u64)> = entries
        .iter()
        .map(|e| {
            let (a, b) = e.entry_id.split_once('-').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(ids[0].0, ids[1].0);
    assert_eq!(ids[1].0, ids[2].0);
    assert_eq!(
        ids.iter().map(|i| i.1).collect::<Vec<_>>(),
        [0, 1, 2, 0],
        "{ids:?}"
    );
    assert!(ids[3].0 > ids[0].0);
    let wal = wal_insert_lsn(&db).await;
    assert!(ids[3].0 < wal, "an id is a WAL position below the server's");
    assert_exactly_once(&entries, 0..4);
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
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

/// Another writer adds an entry with an automatic id (a millisecond timestamp, beyond any
/// WAL position): Redis would refuse outboxd's entries as "not above the top". outboxd must
/// stop and say so rather than count the events as delivered; `check` reports the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_a_foreign_writer_stops_outboxd_and_check_reports_it() {
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
    let report = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(!check.status.success(), "{report}");
    let line = report
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("stream ids"))
        .unwrap_or_else(|| panic!("no stream ids failure in:\n{report}"));
    assert!(
        line.contains("\"outbox.order\"") && line.contains("only writer"),
        "{line}"
    );

    let mut outboxd = env.run();
    emit_txn(&db, 0, 5, 2).await;
    let status = outboxd.wait(Duration::from_secs(60));
    let log = outboxd.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("only writer") && log.contains("outbox.order"),
        "the stop must name the stream and the rule:\n{log}"
    );
    // Nothing was confirmed past the refused events: once the stream is fixed, they arrive.
    let () = redis::cmd("DEL")
        .arg("outbox.order")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _outboxd = env.run();
    let entries = wait_stream_len(&redis, "outbox.order", 5, Duration::from_secs(30)).await;
    assert_exactly_once(&entries, 0..5);
}

/// A batch with no dead-letter entry of its own goes to Redis as one MULTI/EXEC: an entry
/// refused there (WRONGTYPE) is dead-lettered after it, and a replay of the whole thing is
/// refused as already delivered, the dead-letter entry included.
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
    assert!(dlq[0].entry_id.ends_with("-1"), "{}", dlq[0].entry_id);
}
