//! Keeping the outbox table empty: events as transactional logical decoding messages
//! (`outbox_emit_message`, `postgres.source = "messages"`), and rows deleted in the
//! transaction that inserted them (`outbox_emit(..., keep => false)`).
//!
//! Table-less events get the same guarantees as rows: only committed ones, per-key commit
//! order, nothing lost through kill -9 and a Postgres restart, no duplicates in
//! effectively-once mode, and a message that is not an event is dead-lettered with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::Duration;

use support::*;

const STREAM: &str = "outbox.order";

/// Emits `count` table-less events from seq `first` in one transaction, keys `k<n % keys>`.
async fn emit_messages(db: &impl tokio_postgres::GenericClient, first: u64, count: u64, keys: u64) {
    emit_txn_through(db, "outbox_emit_message", first, count, keys).await;
}

/// A configuration for table-less events (`extra`: more sections), with the outbox table
/// dropped: nothing needs it.
async fn table_less_env(pg: Postgres, extra: &str) -> Env {
    let env = Env::new(pg, "").await;
    env.write_config_with(
        &format!(
            "url = {:?}\nsource = \"messages\"",
            env.pg.outboxd_url("app")
        ),
        extra,
    );
    env.db()
        .await
        .batch_execute("DROP TABLE outbox")
        .await
        .unwrap();
    env.setup();
    env
}

/// Waits until `stream` holds the events `0..n`; returns its entries.
async fn wait_len(env: &Env, stream: &str, n: u64) -> Vec<Entry> {
    let redis = env.redis.connect().await;
    wait_complete(&redis, stream, 0..n, Duration::from_secs(90)).await
}

async fn run_through_faults(env: &Env) -> Vec<Entry> {
    let mut outboxd = env.run();
    let mut db = env.db().await;
    wait_slot_active(&db).await;
    // Rolled back: never forwarded.
    let tx = db.transaction().await.unwrap();
    emit_messages(&tx, 100_000, 10, 3).await;
    tx.rollback().await.unwrap();
    for t in 0..30u64 {
        emit_messages(&db, t * 100, 100, 17).await;
        match t {
            10 => {
                outboxd.kill9();
                // The next outboxd streams before Postgres restarts: a startup that cannot
                // connect stops outboxd.
                wait_slot_released(&db).await;
                outboxd = env.run();
                wait_slot_active(&db).await;
            }
            20 => {
                drop(db);
                env.pg.stop();
                env.pg.start_again();
                db = env.db().await;
            }
            _ => {}
        }
    }
    let entries = wait_len(env, STREAM, 3000).await;
    assert!(outboxd.is_running(), "{}", outboxd.log_text());
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_less_events_arrive_complete_and_in_order_through_kill_9_and_a_restart() {
    let env = table_less_env(Postgres::start(), "").await;
    let out = env.command(&["check"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = run_through_faults(&env).await;
    let duplicates = check_complete_and_ordered(&entries, 0..3000);
    assert!(
        entries.iter().all(|e| e.seq() < 100_000),
        "a rolled-back event arrived"
    );
    let first = &entries[0];
    assert_eq!(first.get("type"), Some("order.created"));
    assert_eq!(first.get("headers"), Some(r#"{"source": "test"}"#));
    assert_eq!(first.get("id").map(str::len), Some(36), "a uuid: {first:?}");
    println!(
        "table-less: 3,000 events through a kill -9 and a Postgres restart, {duplicates} duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_less_effectively_once_has_no_duplicates() {
    let env = table_less_env(
        Postgres::start(),
        "[sink]\ndelivery = \"effectively-once\"\n",
    )
    .await;
    let entries = run_through_faults(&env).await;
    assert_eq!(check_complete_and_ordered(&entries, 0..3000), 0);
    assert_eq!(entries.len(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_an_event_is_dead_lettered_and_later_events_flow() {
    let env = table_less_env(Postgres::start(), "").await;
    let mut outboxd = env.run();
    let db = env.db().await;
    // Signed (by outboxd.sign(), as outbox_emit_message signs), but not an event.
    db.batch_execute(
        "SELECT pg_logical_emit_message(true, 'outboxd', outboxd.sign('outboxd', 'not json'))",
    )
    .await
    .unwrap();
    // Messages of other prefixes are someone else's: skipped.
    db.batch_execute("SELECT pg_logical_emit_message(true, 'another-app', 'hello')")
        .await
        .unwrap();
    emit_messages(&db, 0, 20, 3).await;
    let entries = wait_len(&env, STREAM, 20).await;
    assert_eq!(check_complete_and_ordered(&entries, 0..20), 0);
    let redis = env.redis.connect().await;
    let dead = wait_stream_len(&redis, "outboxd.dlq", 1, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].get("reason"), Some("invalid_message"), "{dead:?}");
    assert_eq!(dead[0].get("payload"), Some("not json"));
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_deleted_in_their_own_transaction_are_forwarded_and_the_table_stays_empty() {
    let env = Env::start().await;
    let mut outboxd = env.run();
    let db = env.db().await;
    db.execute(
        "SELECT outbox_emit('order', 'k' || (g % 5), 'order.created', jsonb_build_object('seq', g), \
                '{}', keep => false) FROM generate_series(0, 499) AS g",
        &[],
    )
    .await
    .unwrap();
    let entries = wait_len(&env, STREAM, 500).await;
    assert_eq!(check_complete_and_ordered(&entries, 0..500), 0);
    let left: i64 = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the table stays empty");
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}
