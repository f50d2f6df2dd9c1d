//! Only outboxd's own messages are acted on: a role with nothing but LOGIN that calls
//! `pg_logical_emit_message()` with each of outboxd's prefixes (committed or rolled back,
//! transactional or not, with a made-up signature) gets nothing to any broker, in table mode
//! and in table-less mode; `check` reports the grant; signed messages still flow.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::Duration;

use support::*;

/// A row as a replay or backfill message carries it, aimed at a topic of the intruder's.
const FORGED_ROW: &str = r#"{"row":{"id":"00000000-0000-0000-0000-000000000001","aggregate_type":"order","aggregate_id":"k0","event_type":"order.created","payload":"{\"seq\": 999999}","headers":"{}","created_at":"2026-12-07 10:00:00+00"},"topic":"stolen"}"#;
/// A table-less event as `outbox_emit_message` writes it.
const FORGED_EVENT: &str = r#"{"id":"00000000-0000-0000-0000-000000000002","aggregate_type":"order","aggregate_id":"k0","event_type":"order.created","payload":"{\"seq\": 999998}","headers":"{}","created_at":"2026-12-07 10:00:00+00"}"#;

/// What every test server is like on a managed service: PUBLIC keeps EXECUTE on
/// pg_logical_emit_message() (only a superuser may revoke it; sql/role.sql did, here, since
/// the test's admin is one). And a role with LOGIN only.
async fn intruder(env: &Env) -> tokio_postgres::Client {
    let db = env.db().await;
    db.batch_execute(
        "DO $$ DECLARE f regprocedure; BEGIN \
           FOR f IN SELECT oid::regprocedure FROM pg_proc \
                    WHERE proname = 'pg_logical_emit_message' LOOP \
             EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', f); \
           END LOOP; END $$; \
         CREATE ROLE intruder LOGIN PASSWORD 'intruder-pw'",
    )
    .await
    .unwrap();
    env.pg.connect_as("intruder", "intruder-pw", "app").await
}

/// Everything the intruder tries: each prefix, transactional or not, committed or rolled
/// back, unsigned or with a made-up signature; and the two signing functions, which it may
/// not call.
async fn forge(client: &mut tokio_postgres::Client) {
    let fake_sig = format!("sig1:{}\n", "0".repeat(64));
    for prefix in ["outboxd", "outboxd.replay", "outboxd.backfill"] {
        let body = if prefix == "outboxd" {
            FORGED_EVENT
        } else {
            FORGED_ROW
        };
        for content in [body.to_owned(), format!("{fake_sig}{body}")] {
            for transactional in [true, false] {
                for commit in [true, false] {
                    let tx = client.transaction().await.unwrap();
                    tx.execute(
                        "SELECT pg_logical_emit_message($1, $2, $3::text)",
                        &[&transactional, &prefix, &content],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("PUBLIC may call it here: {e}"));
                    if commit {
                        tx.commit().await.unwrap();
                    } else {
                        tx.rollback().await.unwrap();
                    }
                }
            }
        }
    }
    for call in [
        "SELECT outboxd.sign('outboxd.replay', '{}')",
        "SELECT outbox_emit_message('order', 'k0', 'order.created', '{}', '{}')",
    ] {
        let err = client.batch_execute(call).await.unwrap_err();
        let text = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(text.contains("permission denied"), "{call}: {err:?}");
    }
}

/// Nothing of the intruder's reached Redis: only the sentinel events in their stream, no
/// dead letter, no stream `stolen`; the refusals are counted and said.
async fn assert_nothing_forged(env: &Env, outboxd: &Outboxd, sentinels: u64, refusals: f64) {
    let mut redis = env.redis.connect().await;
    let entries = wait_complete(
        &redis,
        "outbox.order",
        0..sentinels,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(check_complete_and_ordered(&entries, 0..sentinels), 0);
    assert_eq!(entries.len() as u64, sentinels, "{entries:?}");
    for stream in ["stolen", "outboxd.dlq"] {
        assert_eq!(stream_len(&mut redis, stream).await, 0, "{stream}");
    }
    let refused = metric_value(
        env.http_port,
        "outboxd_messages_refused_total{reason=\"unsigned\"}",
    )
    .await
    .unwrap_or_default()
        + metric_value(
            env.http_port,
            "outboxd_messages_refused_total{reason=\"not_transactional\"}",
        )
        .await
        .unwrap_or_default()
        + metric_value(
            env.http_port,
            "outboxd_messages_refused_total{reason=\"bad_signature\"}",
        )
        .await
        .unwrap_or_default();
    // Per prefix: 2 contents x (transactional and committed, not transactional committed or
    // rolled back): the rolled-back transactional ones never leave Postgres. The prefixes of
    // the other source are skipped before that.
    assert_eq!(refused, refusals, "messages refused");
    let log = outboxd.log_text();
    assert!(
        log.contains("is not acted on") && log.contains("Nothing of it is published"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_only_role_cannot_publish_through_outboxd_messages() {
    let env = Env::start().await;
    let mut client = intruder(&env).await;
    let check = env.command(&["check"]);
    assert!(
        output_text(&check).contains("every role may call pg_logical_emit_message()"),
        "{}",
        output_text(&check)
    );
    let mut outboxd = env.run();
    let db = env.db().await;
    wait_slot_active(&db).await;
    forge(&mut client).await;
    emit_txn(&db, 0, 10, 2).await;
    // The replay and backfill prefixes: 2 x 6.
    assert_nothing_forged(&env, &outboxd, 10, 12.0).await;
    // outboxd's own messages still flow: a replay of the kept rows.
    let out = env.command(&["replay", "--where", "true", "--wait"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let redis = env.redis.connect().await;
    wait_stream_len(&redis, "outbox.order", 20, Duration::from_secs(30)).await;
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());

    // Revoked, as sql/role.sql does when a superuser runs it: check says so.
    db.batch_execute(&sql_file("role.sql")).await.unwrap();
    let check = env.command(&["check"]);
    assert!(
        output_text(&check).contains("pg_logical_emit_message() is not executable by PUBLIC"),
        "{}",
        output_text(&check)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_only_role_cannot_publish_table_less_events() {
    let env = Env::new(Postgres::start(), "").await;
    env.write_config_with(
        &format!(
            "url = {:?}\nsource = \"messages\"",
            env.pg.outboxd_url("app")
        ),
        "",
    );
    env.setup();
    let mut client = intruder(&env).await;
    let mut outboxd = env.run();
    let db = env.db().await;
    wait_slot_active(&db).await;
    forge(&mut client).await;
    emit_txn_through(&db, "outbox_emit_message", 0, 10, 2).await;
    // The `outboxd` prefix: 6.
    assert_nothing_forged(&env, &outboxd, 10, 6.0).await;
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}
