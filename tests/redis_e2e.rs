//! End to end: Postgres (wal_level = logical) → outboxd → Redis Streams, real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

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
    let mut redis = env.redis.connect().await;

    emit_txn(&db, 0, 1000, 7).await;
    for seq in 1000..1500 {
        emit_txn(&db, seq, 1, 7).await;
    }
    wait_until("1,500 events", Duration::from_secs(60), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 1500 }
    })
    .await;
    let entries = read_stream(&mut redis, "outbox.order").await;
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

    wait_until("the committed events", Duration::from_secs(20), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 2 }
    })
    .await;
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
async fn redis_outage_holds_the_slot_and_every_event_arrives_after() {
    let mut env = Env::start().await;
    let mut outboxd = env.run();
    let db = env.db().await;
    let redis = env.redis.connect().await;

    emit_txn(&db, 0, 100, 5).await;
    wait_until("events before the outage", Duration::from_secs(20), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 100 }
    })
    .await;

    env.redis.stop();
    // Applications keep committing while Redis is down.
    let started = Instant::now();
    emit_txn(&db, 100, 100, 5).await;
    let first_unacked_commit_end = wal_insert_lsn(&db).await;
    for i in 0..9 {
        emit_txn(&db, 200 + i * 100, 100, 5).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "commits were held up by the outage"
    );

    // Other tables keep writing, so keepalives keep coming; the slot must not move past the
    // first event Redis has not acknowledged.
    db.batch_execute("CREATE TABLE noise (id serial, pad text)")
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        db.batch_execute(
            "INSERT INTO noise (pad) SELECT repeat('n', 500) FROM generate_series(1, 200)",
        )
        .await
        .unwrap();
        let confirmed = confirmed_flush(&db, SLOT).await;
        assert!(
            confirmed < first_unacked_commit_end,
            "slot confirmed {confirmed:X} past an unacknowledged event (commit ends at or before {first_unacked_commit_end:X})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        outboxd.is_running(),
        "outboxd gave up during the outage:\n{}",
        outboxd.log_text()
    );

    // Redis comes back (empty: it had no persistence); every event since the outage arrives.
    env.redis.start_again();
    let mut redis = env.redis.connect().await;
    wait_until("events after the outage", Duration::from_secs(60), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 1000 }
    })
    .await;
    let entries = read_stream(&mut redis, "outbox.order").await;
    let duplicates = check_complete_and_ordered(&entries, 100..1100);
    println!(
        "redis outage: 1,000 events committed during the outage, all arrived; {duplicates} duplicates"
    );
    let log = outboxd.log_text();
    assert!(
        log.contains("broker unavailable"),
        "no log line about the outage:\n{log}"
    );
    assert!(
        log.contains("broker is back"),
        "no log line about the recovery:\n{log}"
    );

    // And the slot catches up once they are acknowledged.
    let last = wal_insert_lsn(&db).await;
    wait_until(
        "the slot to confirm the backlog",
        Duration::from_secs(20),
        || {
            let db = &db;
            async move { confirmed_flush(db, SLOT).await >= first_unacked_commit_end.max(last - 1) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_10000_events_loses_nothing() {
    let env = Env::start().await;
    let mut outboxd = env.run();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;

    // 10,000 events: transactions of 1 to 200 rows, written while outboxd streams.
    let writer_db = env.db().await;
    let writer = tokio::spawn(async move {
        let mut seq = 0u64;
        let mut size = 1u64;
        while seq < 10_000 {
            let n = size.min(10_000 - seq);
            emit_txn(&writer_db, seq, n, 50).await;
            seq += n;
            size = size % 200 + 37;
        }
    });

    wait_until("a part of the stream", Duration::from_secs(60), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 2500 }
    })
    .await;
    outboxd.kill9();
    let at_kill = stream_len(&mut redis, "outbox.order").await;
    assert!(
        at_kill < 10_000,
        "the kill must land in the middle of the stream ({at_kill} entries had arrived)"
    );

    let _restarted = env.run();
    writer.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let entries = loop {
        if stream_len(&mut redis, "outbox.order").await >= 10_000 {
            let entries = read_stream(&mut redis, "outbox.order").await;
            let mut seqs: Vec<u64> = entries.iter().map(Entry::seq).collect();
            seqs.sort_unstable();
            seqs.dedup();
            if seqs.len() == 10_000 {
                break entries;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not all 10,000 events arrived after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let duplicates = check_complete_and_ordered(&entries, 0..10_000);
    println!(
        "kill -9 after {at_kill} of 10,000 events: none lost, {duplicates} duplicates ({} entries)",
        entries.len()
    );
    drop(db);
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
    wait_until("500 events", Duration::from_secs(20), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 500 }
    })
    .await;

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
    wait_until(
        "the event after the restart",
        Duration::from_secs(20),
        || {
            let mut r = redis.clone();
            async move { stream_len(&mut r, "outbox.order").await >= 501 }
        },
    )
    .await;
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
    wait_until("the first events", Duration::from_secs(20), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 100 }
    })
    .await;
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
    wait_until("the first event", Duration::from_secs(20), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 1 }
    })
    .await;

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
