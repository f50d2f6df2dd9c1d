//! Keeping the outbox table small: pruning rows once the slot confirmed them (in `run`, and
//! `outboxd prune`), and a partitioned outbox whose old partitions are dropped while
//! outboxd streams.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;

const STREAM: &str = "outbox.order";

/// Configuration with pruning of rows older than `after`, every 200 ms.
async fn pruning_env(after: &str) -> Env {
    let env = Env::new(Postgres::start(), "").await;
    env.write_config_with(
        &format!(
            "url = {:?}\nprune_after = {after:?}\nprune_interval_ms = 200\nprune_batch_rows = 100",
            env.pg.outboxd_url("app")
        ),
        "",
    );
    env.db()
        .await
        .batch_execute("GRANT DELETE ON outbox TO outboxd")
        .await
        .unwrap();
    env.setup();
    env
}

/// The seqs still in the table.
async fn seqs_in_table(db: &tokio_postgres::Client) -> HashSet<u64> {
    db.query("SELECT (payload->>'seq')::bigint FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i64>(0) as u64)
        .collect()
}

/// Every row of `emitted` that is gone from the table is in the broker already.
async fn assert_pruned_rows_were_delivered(env: &Env, emitted: std::ops::Range<u64>) {
    let db = env.db().await;
    let in_table = seqs_in_table(&db).await;
    let mut redis = env.redis.connect().await;
    let delivered: HashSet<u64> = read_stream(&mut redis, STREAM)
        .await
        .iter()
        .map(Entry::seq)
        .collect();
    let early: Vec<u64> = emitted
        .filter(|s| !in_table.contains(s) && !delivered.contains(s))
        .collect();
    assert!(
        early.is_empty(),
        "{} rows were pruned before the broker had them, e.g. {:?}",
        early.len(),
        &early[..early.len().min(10)]
    );
}

async fn wait_table_len(db: &tokio_postgres::Client, what: &str, n: i64) {
    wait_until(what, Duration::from_secs(60), || async move {
        let left: i64 = db
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .unwrap()
            .get(0);
        left == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_deletes_nothing_while_the_broker_is_down_and_only_confirmed_rows_after() {
    let mut env = pruning_env("0s").await;
    let out = env.command(&["check"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("ok    prune"),
        "{}",
        output_text(&out)
    );
    let mut outboxd = env.run();
    let db = env.db().await;
    for t in 0..3 {
        emit_txn(&db, t * 100, 100, 5).await;
    }
    wait_table_len(&db, "the first 300 rows pruned", 0).await;

    env.redis.stop();
    for t in 3..5 {
        emit_txn(&db, t * 100, 100, 5).await;
    }
    // Many pruning rounds while the broker is away: every row stays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        seqs_in_table(&db).await.len(),
        200,
        "rows pruned unconfirmed"
    );

    env.redis.start_again();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // At every moment, what is gone from the table is in Redis.
        assert_pruned_rows_were_delivered(&env, 300..500).await;
        if seqs_in_table(&db).await.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rows never pruned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut redis = env.redis.connect().await;
    let entries = read_stream(&mut redis, STREAM).await;
    check_complete_and_ordered(&entries, 300..500);
    // The counter moves when a round's last batch is done.
    let port = env.http_port;
    wait_until(
        "outboxd_pruned_rows_total 500",
        Duration::from_secs(10),
        || async move {
            let (_, metrics) = http_get(port, "/metrics").await.unwrap_or_default();
            metric(&metrics, "outboxd_pruned_rows_total") == Some(500.0)
        },
    )
    .await;
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_under_load_loses_no_event() {
    let env = pruning_env("0s").await;
    let mut outboxd = env.run();
    let db = env.db().await;
    let writer_db = env.db().await;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = written.clone();
    let writer = tokio::spawn(async move {
        for t in 0..200u64 {
            emit_txn(&writer_db, t * 25, 25, 11).await;
            progress.store((t + 1) * 25, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    while !writer.is_finished() {
        // Rows below `committed` were committed before the table is read.
        let committed = written.load(std::sync::atomic::Ordering::SeqCst);
        assert_pruned_rows_were_delivered(&env, 0..committed).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.await.unwrap();
    wait_table_len(&db, "every row pruned", 0).await;
    let mut redis = env.redis.connect().await;
    let entries = read_stream(&mut redis, STREAM).await;
    let duplicates = check_complete_and_ordered(&entries, 0..5000);
    assert_eq!(duplicates, 0);
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_once_waits_for_confirmation_and_needs_delete_rights() {
    let env = Env::start().await;
    let db = env.db().await;
    // Without DELETE: one line with the grant.
    let out = env.command(&["prune", "--older-than", "0s"]);
    assert!(!out.status.success());
    assert_eq!(
        output_text(&out).lines().count(),
        1,
        "{}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("GRANT DELETE ON \"public\".\"outbox\" TO \"outboxd\""),
        "{}",
        output_text(&out)
    );
    db.batch_execute("GRANT DELETE ON outbox TO outboxd")
        .await
        .unwrap();
    emit_txn(&db, 0, 50, 5).await;
    // Nothing streams the slot: the rows are not confirmed, so nothing goes.
    let out = env.command(&["prune", "--older-than", "0s", "--wait", "2"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("never pruned"),
        "{}",
        output_text(&out)
    );
    assert_eq!(seqs_in_table(&db).await.len(), 50);

    let mut outboxd = env.run();
    let mut redis = env.redis.connect().await;
    wait_stream_len(&redis, STREAM, 50, Duration::from_secs(30)).await;
    let out = env.command(&["prune", "--older-than", "1h", "--dry-run"]);
    assert!(
        output_text(&out).contains("prune (dry run): 0 rows"),
        "{}",
        output_text(&out)
    );
    let out = env.command(&["prune", "--older-than", "0s", "--dry-run"]);
    assert!(
        output_text(&out).contains("prune (dry run): 50 rows"),
        "{}",
        output_text(&out)
    );
    assert_eq!(seqs_in_table(&db).await.len(), 50);
    let out = env.command(&["prune", "--older-than", "0s"]);
    assert!(
        output_text(&out).contains("deleted 50 rows"),
        "{}",
        output_text(&out)
    );
    assert!(seqs_in_table(&db).await.is_empty());
    assert_eq!(read_stream(&mut redis, STREAM).await.len(), 50);
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}

/// A partitioned outbox (by creation day, three partitions), published through its root: a
/// partition dropped while outboxd streams costs nothing, and rows of another table of the
/// publication are not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_outbox_loses_nothing_when_a_partition_is_dropped() {
    let env = Env::new(Postgres::start(), "").await;
    let db = env.db().await;
    db.batch_execute(
        "DROP PUBLICATION outboxd;
         DROP TABLE outbox CASCADE;
         CREATE TABLE outbox (
             id             uuid        NOT NULL DEFAULT gen_random_uuid(),
             aggregate_type text        NOT NULL,
             aggregate_id   text        NOT NULL,
             event_type     text        NOT NULL,
             payload        jsonb       NOT NULL,
             headers        jsonb       NOT NULL DEFAULT '{}',
             created_at     timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (id, created_at)
         ) PARTITION BY RANGE (created_at);
         CREATE TABLE outbox_old PARTITION OF outbox
             FOR VALUES FROM ('2000-01-01') TO (now()::date - 1);
         CREATE TABLE outbox_yesterday PARTITION OF outbox
             FOR VALUES FROM (now()::date - 1) TO (now()::date);
         CREATE TABLE outbox_today PARTITION OF outbox
             FOR VALUES FROM (now()::date) TO (now()::date + 2);
         CREATE TABLE audit (id bigserial PRIMARY KEY, note text);
         GRANT SELECT ON outbox, audit TO outboxd;
         -- Without publish_via_partition_root, setup and check say what to change.
         CREATE PUBLICATION outboxd FOR TABLE outbox, audit WITH (publish = 'insert');",
    )
    .await
    .unwrap();
    let out = env.command(&["setup"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("publish_via_partition_root = true"),
        "{}",
        output_text(&out)
    );
    db.batch_execute(
        "ALTER PUBLICATION outboxd SET (publish = 'insert', publish_via_partition_root = true)",
    )
    .await
    .unwrap();
    env.setup();
    let mut outboxd = env.run();
    // Rows in each partition, and rows of the other table.
    let insert = |first: u64, days_ago: i32| {
        format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
             SELECT 'order', 'k' || (g % 7), 'order.created', jsonb_build_object('seq', g), \
                    now() - interval '{days_ago} days' - (1000 - g) * interval '1 ms' \
             FROM generate_series({first}, {}) AS g",
            first + 99
        )
    };
    db.batch_execute(&insert(0, 400)).await.unwrap();
    db.batch_execute(&insert(100, 1)).await.unwrap();
    db.batch_execute("INSERT INTO audit (note) SELECT 'not an event' FROM generate_series(1, 50)")
        .await
        .unwrap();
    let writer_db = env.db().await;
    let writer = tokio::spawn(async move {
        for t in 0..20u64 {
            emit_txn(&writer_db, 200 + t * 10, 10, 7).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The cheapest cleanup: drop the oldest partition while streaming.
    db.batch_execute("DROP TABLE outbox_old").await.unwrap();
    writer.await.unwrap();
    let mut redis = env.redis.connect().await;
    wait_stream_len(&redis, STREAM, 400, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let entries = read_stream(&mut redis, STREAM).await;
    assert_eq!(check_complete_and_ordered(&entries, 0..400), 0);
    assert_eq!(entries.len(), 400, "nothing else arrived");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(keys, vec![STREAM.to_owned()], "no other stream: {keys:?}");
    assert!(outboxd.is_running(), "{}", outboxd.log_text());
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}
