//! Effectively-once delivery to Redis (guarantee 6 of docs/guarantees.md): entry ids derived from the WAL
//! position, so that Redis itself refuses a replayed event. Crashes, a Postgres restart and a
//! walsender kill must leave every event in its stream exactly once; a stream that another
//! writer touched must stop outboxd rather than swallow events. Real Postgres, real Redis,
//! the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use support::*;
use tokio_postgres::Client;

const EFFECTIVELY_ONCE: &str = "[sink]\ndelivery = \"effectively-once\"\n";

/// Waits until `stream` holds `count` entries; returns them.
async fn wait_entries(
    redis: &mut MultiplexedConnection,
    stream: &str,
    count: u64,
    timeout: Duration,
) -> Vec<Entry> {
    wait_until(&format!("{count} entries in {stream}"), timeout, || async {
        stream_len(&mut redis.clone(), stream).await >= count
    })
    .await;
    read_stream(redis, stream).await
}

/// Every seq of `expected` exactly once, per key in commit order, and entry ids that are
/// `<commit lsn>-<index>` and strictly increasing.
fn assert_exactly_once(entries: &[Entry], expected: std::ops::Range<u64>) {
    let duplicates = check_complete_and_ordered(entries, expected.clone());
    assert_eq!(duplicates, 0, "duplicates in an effectively-once stream");
    assert_eq!(entries.len() as u64, expected.end - expected.start);
    let mut last = (0u64, 0u64);
    for e in entries {
        let (ms, seq) = e.entry_id.split_once('-').unwrap();
        let id = (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap());
        assert!(id > last, "entry ids must grow: {id:?} after {last:?}");
        last = id;
    }
}

async fn metric_value(port: u16, series: &str) -> f64 {
    let (_, text) = http_get(port, "/metrics").await.expect("/metrics answers");
    metric(&text, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_ids_are_wal_positions_and_a_clean_restart_repeats_nothing() {
    let env = Env::new(Postgres::start(), EFFECTIVELY_ONCE).await;
    env.setup();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;
    let mut outboxd = env.run();
    emit_txn(&db, 0, 3, 2).await;
    emit_txn(&db, 3, 1, 2).await;
    let entries = wait_entries(&mut redis, "outbox.order", 4, Duration::from_secs(30)).await;
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
    let entries = wait_entries(&mut redis, "outbox.order", 1000, Duration::from_secs(60)).await;
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
                > 0.0
        },
    )
    .await;
    let already = metric_value(
        port,
        "outboxd_events_already_delivered_total{topic=\"outbox.order\"}",
    )
    .await;
    let forwarded = metric_value(
        port,
        "outboxd_events_forwarded_total{topic=\"outbox.order\"}",
    )
    .await;
    println!(
        "replay after a crash: {before} entries before the restart, {already} refused as already delivered, {forwarded} forwarded after it, 0 duplicates"
    );
    assert_eq!(forwarded as u64 + before, 1000);
    drop(restarted);
}

/// 20,000 events: 16,000 written while outboxd is killed with SIGKILL at random moments 6
/// times, then a Postgres restart, then 4,000 more while the walsender is terminated. Every
/// event must be in the stream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_a_postgres_restart_and_a_walsender_kill_leave_no_duplicates() {
    const TOTAL: u64 = 20_000;
    const DURING_CRASHES: u64 = 16_000;
    let env = Env::new(
        Postgres::start(),
        "[sink]\ndelivery = \"effectively-once\"\nmax_inflight_events = 2000\nmax_batch_events = 500\n",
    )
    .await;
    env.setup();
    let mut redis = env.redis.connect().await;
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
        Duration::from_millis(800 + x % 1700)
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
    wait_entries(
        &mut redis,
        "outbox.order",
        DURING_CRASHES,
        Duration::from_secs(120),
    )
    .await;

    // A Postgres restart: on 16 and older the slot can fall back to its last saved position,
    // so thousands of forwarded events are sent again.
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
    let entries = wait_entries(&mut redis, "outbox.order", TOTAL, Duration::from_secs(120)).await;
    // Some time for anything more to (wrongly) arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let entries_after = stream_len(&mut redis, "outbox.order").await;
    let already = metric_value(
        env.http_port,
        "outboxd_events_already_delivered_total{topic=\"outbox.order\"}",
    )
    .await;
    println!(
        "effectively-once: {TOTAL} events, {kills} SIGKILLs (writer still writing at the last: {}), a Postgres restart and a walsender kill: 0 lost, 0 duplicates; the last process refused {already} replayed events as already delivered",
        !writer_done
    );
    assert_eq!(entries_after, TOTAL, "more entries than events");
    assert_exactly_once(&entries, 0..TOTAL);
    assert!(
        !writer_done,
        "the crashes must happen while events are written"
    );
    drop(outboxd);
}

/// Emits `total` events from `first` in transactions of 1 to `max_txn` rows (xorshift sizes).
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

/// A WRONGTYPE stream and a NULL key in one transaction: the refused entry is dead-lettered
/// before the later poison one (ids in the dead-letter stream must grow too), and the events
/// after them arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_entries_are_dead_lettered_in_order_and_the_stream_goes_on() {
    let (env, db, mut redis) = with_a_broken_stream().await;
    let _outboxd = env.run();
    db.batch_execute(
        "BEGIN; \
         SELECT outbox_emit('order', 'k1', 'order.created', '{\"seq\": 0}'); \
         SELECT outbox_emit('broken', 'k1', 'broken.created', '{\"seq\": 1}'); \
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
           VALUES ('order', '', 'order.created', '{\"seq\": 2}'); \
         SELECT outbox_emit('order', 'k1', 'order.created', '{\"seq\": 3}'); \
         COMMIT",
    )
    .await
    .unwrap();
    emit_txn(&db, 4, 10, 3).await;
    let dlq = wait_entries(&mut redis, "outboxd.dlq", 2, Duration::from_secs(30)).await;
    assert_eq!(dlq[0].get("reason"), Some("rejected"), "{dlq:?}");
    assert!(
        dlq[0].get("detail").unwrap().contains("WRONGTYPE"),
        "{dlq:?}"
    );
    assert_eq!(dlq[0].get("topic"), Some("outbox.broken"));
    assert_eq!(dlq[1].get("reason"), Some("empty_field"), "{dlq:?}");
    assert!(dlq[0].entry_id.ends_with("-1") && dlq[1].entry_id.ends_with("-2"));
    let entries = wait_entries(&mut redis, "outbox.order", 12, Duration::from_secs(30)).await;
    let seqs: Vec<u64> = entries.iter().map(Entry::seq).collect();
    let mut want = vec![0, 3];
    want.extend(4..14);
    assert_eq!(seqs, want);
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
    let entries = wait_entries(&mut redis, "outbox.order", 5, Duration::from_secs(30)).await;
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
    let entries = wait_entries(&mut redis, "outbox.order", 7, Duration::from_secs(30)).await;
    let seqs: Vec<u64> = entries.iter().map(Entry::seq).collect();
    assert_eq!(seqs, [0, 2, 3, 4, 5, 6, 7]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dlq = read_stream(&mut redis, "outboxd.dlq").await;
    assert_eq!(dlq.len(), 1, "the dead letter once: {dlq:?}");
    assert!(dlq[0].get("detail").unwrap().contains("WRONGTYPE"));
    assert!(dlq[0].entry_id.ends_with("-1"), "{}", dlq[0].entry_id);
}
