//! End to end: Postgres (wal_level = logical) → outboxd → Redis Streams, real servers: the
//! documented fields, transactions large and small, rollbacks, a graceful stop, a walsender
//! kill, an idle outbox. An outage and kill -9 are in the conformance suite
//! (tests/conformance_redis.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::{Duration, Instant};

use support::*;

const SLOT: &str = "outboxd";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_with_exactly_the_documented_fields() {
    let env = Env::start().await;
    let _outboxd = env.run();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;

    let row = db
        .query_one(
            "SELECT outbox_emit('order', '123', 'order.paid', '{\"amount\": 42, \"currency\": \"EUR\"}', \
                    '{\"traceparent\": \"00-abc-01\", \"correlation_id\": \"c-1\"}')::text",
            &[],
        )
        .await
        .unwrap();
    let id: String = row.get(0);
    db.execute(
        "SELECT outbox_emit('customer', 'c9', 'customer.created', '{\"name\": \"Ada\"}')",
        &[],
    )
    .await
    .unwrap();

    wait_until("both events", Duration::from_secs(20), || {
        let mut r = redis.clone();
        async move {
            stream_len(&mut r, "outbox.order").await == 1
                && stream_len(&mut r, "outbox.customer").await == 1
        }
    })
    .await;

    let order = read_stream(&mut redis, "outbox.order").await;
    let names: Vec<&str> = order[0].fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["id", "type", "key", "payload", "headers"]);
    assert_eq!(order[0].get("id"), Some(id.as_str()));
    assert_eq!(order[0].get("type"), Some("order.paid"));
    assert_eq!(order[0].get("key"), Some("123"));
    let payload: serde_json::Value =
        serde_json::from_str(order[0].get("payload").unwrap()).unwrap();
    assert_eq!(
        payload,
        serde_json::json!({"amount": 42, "currency": "EUR"})
    );
    let headers: serde_json::Value =
        serde_json::from_str(order[0].get("headers").unwrap()).unwrap();
    assert_eq!(
        headers,
        serde_json::json!({"traceparent": "00-abc-01", "correlation_id": "c-1"})
    );

    let customer = read_stream(&mut redis, "outbox.customer").await;
    assert_eq!(customer[0].get("key"), Some("c9"));
    assert_eq!(customer[0].get("type"), Some("customer.created"));
    assert_eq!(customer[0].get("headers"), Some("{}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_row_transaction_and_many_one_row_transactions() {
    let env = Env::start().await;
    let _outboxd = env.run();
    let db = env.db().await;
    let redis = env.redis.connect().await;

    emit_txn(&db, 0, 1000, 7).await;
    for seq in 1000..1500 {
        emit_txn(&db, seq, 1, 7).await;
    }
    let entries = wait_stream_len(&redis, "outbox.order", 1500, Duration::from_secs(60)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..1500);
    assert_eq!(duplicates, 0, "no crash, so no duplicates");
    assert_eq!(entries.len(), 1500);
    // Commit order overall, not only per key: one sink, batches in order.
    let seqs: Vec<u64> = entries.iter().map(Entry::seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "entries out of commit order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_rows_never_arrive() {
    let env = Env::start().await;
    let _outboxd = env.run();
    let mut db = env.db().await;
    let mut redis = env.redis.connect().await;

    let tx = db.transaction().await.unwrap();
    emit_txn(&tx, 0, 50, 3).await;
    tx.rollback().await.unwrap();

    // A savepoint rolled back inside a committed transaction.
    let tx = db.transaction().await.unwrap();
    emit_txn(&tx, 100, 1, 3).await;
    tx.batch_execute("SAVEPOINT s").await.unwrap();
    emit_txn(&tx, 101, 10, 3).await;
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    emit_txn(&tx, 200, 1, 3).await;
    tx.commit().await.unwrap();

    wait_stream_len(&redis, "outbox.order", 2, Duration::from_secs(20)).await;
    // Give a wrongly forwarded row time to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seqs: Vec<u64> = read_stream(&mut redis, "outbox.order")
        .await
        .iter()
        .map(Entry::seq)
        .collect();
    assert_eq!(seqs, [100, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_confirms_and_exits_0() {
    let env = Env::start().await;
    let mut outboxd = env.run();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;

    emit_txn(&db, 0, 300, 4).await;
    let before_last_commit = wal_insert_lsn(&db).await;
    emit_txn(&db, 300, 200, 4).await;
    wait_stream_len(&redis, "outbox.order", 500, Duration::from_secs(20)).await;

    outboxd.sigterm();
    let status = outboxd.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        outboxd.log_text()
    );
    let confirmed = confirmed_flush(&db, SLOT).await;
    assert!(
        confirmed > before_last_commit,
        "the final position was not confirmed: {confirmed:X} <= {before_last_commit:X}"
    );

    // A restart sends nothing twice.
    let _again = env.run();
    emit_txn(&db, 500, 1, 4).await;
    wait_stream_len(&redis, "outbox.order", 501, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let entries = read_stream(&mut redis, "outbox.order").await;
    assert_eq!(check_complete_and_ordered(&entries, 0..501), 0);
    assert_eq!(entries.len(), 501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_walsender_is_reconnected_and_nothing_is_lost() {
    let env = Env::start().await;
    let outboxd = env.run();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;

    emit_txn(&db, 0, 100, 3).await;
    wait_stream_len(&redis, "outbox.order", 100, Duration::from_secs(20)).await;
    let mut pid: Option<i32> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid.is_none() {
        assert!(Instant::now() < deadline, "the slot never became active");
        pid = db
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT],
            )
            .await
            .unwrap()
            .get(0);
    }
    let terminated: bool = db
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated, "walsender {pid:?} was not terminated");
    emit_txn(&db, 100, 100, 3).await;
    // Every event, not 200 entries: the reconnect may replay some as duplicates.
    wait_until(
        "the events after the reconnect",
        Duration::from_secs(30),
        || {
            let mut r = redis.clone();
            async move {
                let seqs: std::collections::HashSet<u64> = read_stream(&mut r, "outbox.order")
                    .await
                    .iter()
                    .map(Entry::seq)
                    .collect();
                (0..200).all(|s| seqs.contains(&s))
            }
        },
    )
    .await;
    let entries = read_stream(&mut redis, "outbox.order").await;
    check_complete_and_ordered(&entries, 0..200);
    let log = outboxd.log_text();
    assert!(
        log.contains("reconnecting"),
        "no reconnect log line:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_outbox_keeps_little_wal_while_other_tables_write() {
    let env = Env::start().await;
    let _outboxd = env.run();
    let db = env.db().await;
    let redis = env.redis.connect().await;

    emit_txn(&db, 0, 1, 1).await;
    wait_stream_len(&redis, "outbox.order", 1, Duration::from_secs(20)).await;

    db.batch_execute("CREATE TABLE filler (id bigserial, pad text)")
        .await
        .unwrap();
    let start = wal_insert_lsn(&db).await;
    while wal_insert_lsn(&db).await - start < 100 * 1024 * 1024 {
        db.batch_execute(
            "INSERT INTO filler (pad) SELECT repeat(md5(g::text), 60) FROM generate_series(1, 4000) g",
        )
        .await
        .unwrap();
    }
    let written = wal_insert_lsn(&db).await - start;
    let done = Instant::now();
    // Postgres moves restart_lsn only at a running-transactions record. outboxd requests one
    // (pg_log_standby_snapshot, PostgreSQL 16+). Before 16 only Postgres writes them: 15 s
    // after the previous one, up to 10 s later when its background writer hibernates.
    let version: i32 = db
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let bound = if version >= 160_000 {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(10 + 30)
    };
    let deadline = done + bound;
    let mut last;
    loop {
        let row = db
            .query_one(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, \
                        (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT],
            )
            .await
            .unwrap();
        last = (row.get::<_, i64>(0), row.get::<_, i64>(1));
        if last.0 < 16 * 1024 * 1024 && last.1 < 16 * 1024 * 1024 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{bound:?} after writing {} MB elsewhere, the slot still retains {} MB (unconfirmed: {} MB)",
            written >> 20,
            last.0 >> 20,
            last.1 >> 20
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "idle outbox (server {version}, bound {bound:?}): {} MB written elsewhere; {:.1} s later the slot retains {} kB, {} kB unconfirmed",
        written >> 20,
        done.elapsed().as_secs_f64(),
        last.0 >> 10,
        last.1 >> 10
    );
}
