//! Operating outboxd: slot status, the preflight check, metrics, health, logs. Real Postgres,
//! real Redis, the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// test code: a panic is a failed test
// Runs Redis and Kafka: a build with both sinks (the default).
#![cfg(all(feature = "redis", feature = "kafka"))]

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

// ---------------------------------------------------------------- slot status

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_status_json_matches_pg_replication_slots() {
    let env = Env::start().await;
    let db = env.db().await;
    let mut outboxd = env.run();
    let redis = env.redis.connect().await;
    emit_txn(&db, 0, 50, 2).await;
    wait_stream_len(&redis, "outbox.order", 50, Duration::from_secs(20)).await;

    // While streaming: active, with the walsender's pid.
    let out = env.command(&["slot", "status", "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid: i32 = db
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status["active"], true);
    assert_eq!(status["active_pid"], pid);

    // Stopped, so nothing moves between the two reads: every field equals Postgres' own.
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
    let out = env.command(&["slot", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = db
        .query_one(
            "SELECT slot_name::text, plugin::text, active, confirmed_flush_lsn::text, \
                    restart_lsn::text, wal_status, \
                    (pg_current_wal_lsn() - restart_lsn)::bigint, \
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(status["slot"], row.get::<_, String>(0));
    assert_eq!(status["plugin"], row.get::<_, String>(1));
    assert_eq!(status["active"], row.get::<_, bool>(2));
    assert_eq!(status["confirmed_flush_lsn"], row.get::<_, String>(3));
    assert_eq!(status["restart_lsn"], row.get::<_, String>(4));
    assert_eq!(status["wal_status"], row.get::<_, String>(5));
    assert_eq!(status["retained_wal_bytes"], row.get::<_, i64>(6));
    assert_eq!(status["lag_bytes"], row.get::<_, i64>(7));
    assert_eq!(status["active_pid"], serde_json::Value::Null);

    // The human form says the same.
    let out = env.command(&["slot", "status"]);
    let human = output_text(&out);
    assert!(
        human.contains(&format!("confirmed_flush_lsn  {}", row.get::<_, String>(3))),
        "{human}"
    );
    assert!(human.contains("wal_status           reserved"), "{human}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_status_of_a_missing_slot_says_so() {
    let env = Env::new(Postgres::start(), "").await;
    let out = env.command(&["slot", "status", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output_text(&out).contains("does not exist: run `outboxd setup`"),
        "{}",
        output_text(&out)
    );
}

// ---------------------------------------------------------------- check

/// Runs `check`; returns (exit code, output).
fn check(env: &Env) -> (Option<i32>, String) {
    let out = env.command(&["check"]);
    (out.status.code(), output_text(&out))
}

fn assert_fails(report: &(Option<i32>, String), subject: &str, needle: &str) {
    let (code, out) = report;
    assert_eq!(*code, Some(1), "check should fail:\n{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains(needle))
        .unwrap_or_else(|| panic!("no FAIL line with {needle:?}:\n{out}"));
    assert!(
        line.split_whitespace().nth(1) == Some(subject),
        "{needle:?} reported under another subject than {subject}: {line}"
    );
    assert!(!out.contains(OUTBOXD_PASSWORD), "password leaked:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_when_everything_is_ready() {
    let env = Env::start().await;
    let (code, out) = check(&env);
    assert_eq!(code, Some(0), "{out}");
    for subject in [
        "configuration",
        "postgres",
        "wal_level",
        "table",
        "route",
        "publication",
        "slot",
        "broker",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("ok") && l.split_whitespace().nth(1) == Some(subject)),
            "no ok line for {subject}:\n{out}"
        );
    }
    assert!(!out.contains("FAIL"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_an_unreachable_postgres() {
    let env = Env::start().await;
    let port = free_port();
    let url = format!("postgres://outboxd:{OUTBOXD_PASSWORD}@127.0.0.1:{port}/app");
    let out = Command::new(outboxd_bin())
        .args(["check", "--config"])
        .arg(&env.config)
        .env("OUTBOXD_POSTGRES__URL", &url)
        .output()
        .unwrap();
    let report = (out.status.code(), output_text(&out));
    assert_fails(&report, "postgres", "cannot connect to Postgres");
    // The broker is still checked.
    assert!(
        report
            .1
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("broker")),
        "{}",
        report.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_wal_level() {
    let env = Env::new(Postgres::start_with(&["wal_level = replica"]), "").await;
    assert_fails(&check(&env), "wal_level", "wal_level is \"replica\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_missing_table() {
    let env = Env::start().await;
    env.db()
        .await
        .batch_execute("DROP TABLE outbox CASCADE")
        .await
        .unwrap();
    assert_fails(&check(&env), "table", "does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_role_that_may_not_read_the_table() {
    let env = Env::start().await;
    env.db()
        .await
        .batch_execute("REVOKE SELECT ON outbox FROM outboxd")
        .await
        .unwrap();
    assert_fails(&check(&env), "rights", "GRANT SELECT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_role_without_replication() {
    let env = Env::start().await;
    env.db()
        .await
        .batch_execute("ALTER ROLE outboxd NOREPLICATION")
        .await
        .unwrap();
    assert_fails(&check(&env), "rights", "lacks the REPLICATION attribute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_missing_publication() {
    let env = Env::start().await;
    env.db()
        .await
        .batch_execute("DROP PUBLICATION outboxd")
        .await
        .unwrap();
    assert_fails(&check(&env), "publication", "does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_publication_without_the_table() {
    let env = Env::start().await;
    env.db()
        .await
        .batch_execute("CREATE TABLE other (id int); ALTER PUBLICATION outboxd SET TABLE other")
        .await
        .unwrap();
    assert_fails(&check(&env), "publication", "does not include");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_publication_without_inserts() {
    let env = Env::start().await;
    env.db()
        .await
        .batch_execute("ALTER PUBLICATION outboxd SET (publish = 'update, delete')")
        .await
        .unwrap();
    assert_fails(&check(&env), "publication", "does not publish inserts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_missing_slot() {
    let env = Env::new(Postgres::start(), "").await;
    assert_fails(&check(&env), "slot", "run `outboxd setup`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_slot_of_another_plugin() {
    let env = Env::new(Postgres::start(), "").await;
    env.db()
        .await
        .batch_execute("SELECT pg_create_logical_replication_slot('outboxd', 'test_decoding')")
        .await
        .unwrap();
    assert_fails(&check(&env), "slot", "plugin test_decoding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_an_invalidated_slot() {
    let env = Env::new(Postgres::start_slot_limited(), "").await;
    env.setup();
    let db = env.db().await;
    // Nobody streams the slot; the WAL it needs is written past its limit and a checkpoint
    // removes it.
    write_wal_until_the_slot_is(&db, "lost").await;
    assert_fails(&check(&env), "slot", "was invalidated");
}

/// A slot that keeps more WAL than `max_wal_size` (outboxd not running) is not a failure yet,
/// but `check` warns that it is `extended`, and still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_a_slot_that_keeps_more_wal_than_max_wal_size() {
    let env = Env::new(
        Postgres::start_with(&[
            "wal_level = logical",
            "max_wal_size = 32MB",
            "min_wal_size = 32MB",
        ]),
        "",
    )
    .await;
    env.setup();
    let db = env.db().await;
    write_wal_until_the_slot_is(&db, "extended").await;
    let (code, report) = check(&env);
    assert_eq!(code, Some(0), "a warning is not a failure:\n{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("warn") && l.contains("wal_status is \"extended\"")),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_route_that_does_not_fit_the_table() {
    let env = Env::start().await;
    env.write_config("[route]\ntopic = \"outbox.{aggregatetype}\"\n");
    assert_fails(&check(&env), "route", "aggregatetype");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_an_unreachable_broker() {
    let mut env = Env::start().await;
    env.redis.stop();
    assert_fails(
        &check(&env),
        "broker",
        &format!("cannot reach redis at redis://127.0.0.1:{}", env.redis.port),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_an_unreachable_kafka_broker() {
    let env = Env::start().await;
    let port = free_port();
    env.write_config(&format!(
        "[sink]\nkind = \"kafka\"\n\n[sink.kafka]\nbrokers = \"127.0.0.1:{port}\"\ntimeout_ms = 2000\n"
    ));
    assert_fails(
        &check(&env),
        "broker",
        &format!("cannot reach kafka at 127.0.0.1:{port}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_lists_every_problem_at_once() {
    let mut env = Env::new(Postgres::start(), "").await;
    env.redis.stop();
    let (code, out) = check(&env);
    assert_eq!(code, Some(1));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("FAIL")).count(),
        2,
        "{out}"
    );
    assert!(out.contains("2 problems found"), "{out}");
}

// ---------------------------------------------------------------- metrics and health

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_forwarded_and_dead_lettered() {
    let env = Env::start().await;
    let _outboxd = env.run();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;

    emit_txn(&db, 0, 120, 3).await;
    db.batch_execute(
        "SELECT outbox_emit('customer', 'c' || g, 'customer.created', '{}') FROM generate_series(1, 30) g; \
         SELECT outbox_emit('order', '', 'order.created', '{\"seq\": 999}');",
    )
    .await
    .unwrap();
    wait_until(
        "the events and the dead letter",
        Duration::from_secs(20),
        || {
            let mut r = redis.clone();
            async move {
                stream_len(&mut r, "outbox.order").await >= 120
                    && stream_len(&mut r, "outbox.customer").await >= 30
                    && stream_len(&mut r, "outboxd.dlq").await >= 1
            }
        },
    )
    .await;

    let port = env.http_port;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        if let Some((200, text)) = http_get(port, "/metrics").await {
            // The dispatcher counts a batch, then the pipeline takes the acknowledgement off
            // the in-flight gauge: wait for both.
            if metric(&text, "outboxd_commit_to_ack_seconds_count") == Some(151.0)
                && metric(&text, "outboxd_inflight_events") == Some(0.0)
            {
                break text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "metrics never counted 151 events:\n{text}"
            );
        }
        assert!(std::time::Instant::now() < deadline, "no /metrics");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        metric(
            &body,
            "outboxd_events_forwarded_total{topic=\"outbox.order\"}"
        ),
        Some(120.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "outboxd_events_forwarded_total{topic=\"outbox.customer\"}"
        ),
        Some(30.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "outboxd_events_dead_lettered_total{reason=\"empty_field\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "outboxd_inflight_events"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "outboxd_sink_errors_total"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "outboxd_reconnects_total"),
        Some(0.0),
        "{body}"
    );
    // Every event was read, then acknowledged: its read latency is part of its ack latency.
    assert_eq!(
        metric(&body, "outboxd_commit_to_read_seconds_count"),
        Some(151.0),
        "{body}"
    );
    let read_sum = metric(&body, "outboxd_commit_to_read_seconds_sum").expect("read sum");
    let ack_sum = metric(&body, "outboxd_commit_to_ack_seconds_sum").expect("ack sum");
    assert!(read_sum > 0.0 && read_sum <= ack_sum, "{body}");
    let confirmed = metric(&body, "outboxd_confirmed_lsn").expect("confirmed_lsn");
    assert!(confirmed > 0.0, "{body}");
    assert!(
        body.contains("# TYPE outboxd_retained_wal_bytes gauge"),
        "{body}"
    );

    // The dead letter says why, and where the row is.
    let dlq = read_stream(&mut redis, "outboxd.dlq").await;
    assert_eq!(dlq[0].get("reason"), Some("empty_field"));
    assert_eq!(dlq[0].get("topic"), Some("outbox.order"));
    assert_eq!(dlq[0].get("payload"), Some("{\"seq\": 999}"));
    assert!(
        dlq[0].get("lsn").is_some_and(|l| l.contains('/')),
        "{:?}",
        dlq[0]
    );

    // retained_wal_bytes follows the slot (polled every 2 s).
    wait_until(
        "retained_wal_bytes to be set",
        Duration::from_secs(10),
        || async move {
            http_get(port, "/metrics")
                .await
                .and_then(|(_, t)| metric(&t, "outboxd_retained_wal_bytes"))
                .is_some_and(|v| v > 0.0)
        },
    )
    .await;
    assert_eq!(
        http_get(port, "/healthz").await,
        Some((200, "ok\n".to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_flips_when_the_broker_goes_down_and_comes_back() {
    let mut env = Env::start().await;
    let _outboxd = env.run();
    let port = env.http_port;
    let ready = |want: u16| async move {
        http_get(port, "/readyz")
            .await
            .is_some_and(|(code, _)| code == want)
    };
    wait_until("ready", Duration::from_secs(20), || ready(200)).await;

    env.redis.stop();
    wait_until(
        "not ready once Redis is down",
        Duration::from_secs(15),
        || ready(503),
    )
    .await;
    let (_, body) = http_get(port, "/readyz").await.unwrap();
    assert!(body.contains("broker"), "{body}");
    assert_eq!(http_get(port, "/healthz").await.map(|(c, _)| c), Some(200));

    env.redis.start_again();
    wait_until("ready again", Duration::from_secs(15), || ready(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_not_ready_while_not_streaming() {
    let env = Env::start().await;
    // Another session holds the slot: outboxd stands by, alive but not ready.
    let db = env.db().await;
    let mut holder = Outboxd::spawn(
        &["run", "--config", &env.config.to_string_lossy()],
        env.dir.join("holder.log"),
        &[("OUTBOXD_HTTP__LISTEN", "")],
    );
    wait_slot_active(&db).await;
    let standby = env.run();
    let port = env.http_port;
    wait_until(
        "the standby to serve HTTP",
        Duration::from_secs(20),
        || async move { http_get(port, "/healthz").await.is_some() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, body) = http_get(port, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not streaming"), "{body}");

    // The first one dies; the standby takes over and becomes ready.
    holder.kill9();
    wait_until(
        "the standby to take over",
        Duration::from_secs(30),
        || async move {
            http_get(port, "/readyz")
                .await
                .is_some_and(|(c, _)| c == 200)
        },
    )
    .await;
    assert!(
        standby.log_text().contains("standing by"),
        "{}",
        standby.log_text()
    );
}

// ---------------------------------------------------------------- logs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_or_error_message_contains_a_password() {
    const REDIS_PASSWORD: &str = "redis-Secr3t-pw";
    let mut env = Env::with_redis(
        Postgres::start(),
        Redis::start_with_password(Some(REDIS_PASSWORD)),
        "",
    )
    .await;
    env.setup();
    let db = env.db().await;
    let mut outputs: Vec<String> = Vec::new();

    // A run with everything logged, through a reconnect, a Redis outage and a stop.
    let mut outboxd = Outboxd::spawn(
        &[
            "run",
            "--config",
            &env.config.to_string_lossy(),
            "--log-level",
            "trace",
        ],
        env.dir.join("trace.log"),
        &[],
    );
    let mut redis = env.redis.connect().await;
    emit_txn(&db, 0, 20, 2).await;
    wait_stream_len(&redis, "outbox.order", 20, Duration::from_secs(20)).await;
    db.batch_execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots")
        .await
        .unwrap();
    env.redis.stop();
    emit_txn(&db, 20, 20, 2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.redis.start_again();
    redis = env.redis.connect().await;
    wait_stream_len(&redis, "outbox.order", 20, Duration::from_secs(30)).await;
    outboxd.sigterm();
    outboxd.wait(Duration::from_secs(30));
    outputs.push(outboxd.log_text());

    // JSON logs.
    let mut json = Outboxd::spawn(
        &[
            "run",
            "--config",
            &env.config.to_string_lossy(),
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
        env.dir.join("json.log"),
        &[],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    json.sigterm();
    json.wait(Duration::from_secs(30));
    let json_log = json.log_text();
    for line in json_log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    outputs.push(json_log);

    // Error paths: wrong passwords, an unreachable server, and the other commands.
    let wrong_redis = format!(
        "redis://:{REDIS_PASSWORD}-wrong@127.0.0.1:{}",
        env.redis.port
    );
    let wrong_pg = format!(
        "postgres://outboxd:{OUTBOXD_PASSWORD}-wrong@127.0.0.1:{}/app",
        env.pg.port
    );
    let down_pg = format!(
        "postgres://outboxd:{OUTBOXD_PASSWORD}@127.0.0.1:{}/app",
        free_port()
    );
    for (var, value) in [
        ("OUTBOXD_SINK__REDIS__URL", wrong_redis.as_str()),
        ("OUTBOXD_POSTGRES__URL", wrong_pg.as_str()),
        ("OUTBOXD_POSTGRES__URL", down_pg.as_str()),
    ] {
        for cmd in [&["run"][..], &["check"], &["setup"], &["slot", "status"]] {
            let out = Command::new(outboxd_bin())
                .args(cmd)
                .arg("--config")
                .arg(&env.config)
                .env(var, value)
                .env("OUTBOXD_LOG", "trace")
                .output()
                .unwrap();
            outputs.push(output_text(&out));
        }
    }
    for cmd in [&["check"][..], &["slot", "status", "--json"], &["setup"]] {
        outputs.push(output_text(&env.command(cmd)));
    }

    for out in &outputs {
        for secret in [OUTBOXD_PASSWORD, REDIS_PASSWORD] {
            assert!(!out.contains(secret), "{secret} appears in:\n{out}");
        }
    }
    // The wrong credentials were reported, not silently retried forever.
    assert!(
        outputs
            .iter()
            .any(|o| o.contains("password authentication failed")),
        "{outputs:#?}"
    );
}

/// Kafka credentials in `[sink.kafka.options]` never reach a log line or an error message,
/// even with librdkafka's debug logging on and the broker refusing the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_contains_a_kafka_password() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    const KAFKA_PASSWORD: &str = "kafka-Secr3t-pw";
    let mock: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).expect("start librdkafka's mock cluster");
    let env = Env::start().await;
    env.write_config(&format!(
        "[sink]\nkind = \"kafka\"\n\n[sink.kafka]\nbrokers = \"{}\"\ntimeout_ms = 2000\n\n\
         [sink.kafka.options]\n\"security.protocol\" = \"sasl_plaintext\"\n\
         \"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"outboxd\"\n\
         \"sasl.password\" = \"{KAFKA_PASSWORD}\"\ndebug = \"all\"\nlog_level = \"7\"\n",
        mock.bootstrap_servers()
    ));
    let mut outputs = Vec::new();
    let mut outboxd = Outboxd::spawn(
        &[
            "run",
            "--config",
            &env.config.to_string_lossy(),
            "--log-level",
            "trace",
        ],
        env.dir.join("kafka-trace.log"),
        &[],
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    if outboxd.is_running() {
        outboxd.sigterm();
        outboxd.wait(Duration::from_secs(30));
    }
    let log = outboxd.log_text();
    assert!(
        log.contains("librdkafka"),
        "librdkafka's debug log is on:\n{log}"
    );
    outputs.push(log);
    for cmd in [&["check"][..], &["slot", "status"]] {
        outputs.push(output_text(&env.command(cmd)));
    }
    for out in &outputs {
        assert!(
            !out.contains(KAFKA_PASSWORD),
            "the Kafka password appears in:\n{out}"
        );
    }
}

// ---------------------------------------------------------------- progress display

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_catch_up_shows_progress_on_a_terminal_only() {
    let env = Env::start().await;
    let db = env.db().await;
    // A backlog before outboxd starts: 60,000 events, about 20 MB of WAL.
    for i in 0..60 {
        emit_txn(&db, i * 1000, 1000, 10).await;
    }
    // On a terminal (script(1) gives it a pseudo-terminal).
    let transcript = env.dir.join("tty.txt");
    let pid_file = env.dir.join("tty.pid");
    // The shell records outboxd's pid (exec keeps it), so that it can be stopped by pid.
    let command = format!(
        "echo $$ > {}; exec {} run --config {}",
        pid_file.to_string_lossy(),
        outboxd_bin(),
        env.config.to_string_lossy()
    );
    /// Stops the outboxd under script(1) by its pid, also when the test fails.
    struct StopByPid(std::path::PathBuf);
    impl Drop for StopByPid {
        fn drop(&mut self) {
            if let Ok(pid) = std::fs::read_to_string(&self.0) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
    }
    let _guard = StopByPid(pid_file.clone());
    let mut tty = Command::new("script")
        .args(["-qfec", &command])
        .arg(&transcript)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("script(1) from util-linux");
    let redis = env.redis.connect().await;
    wait_stream_len(&redis, "outbox.order", 60_000, Duration::from_secs(120)).await;
    let transcript_text = || std::fs::read_to_string(&transcript).unwrap_or_default();
    wait_until("the caught-up line", Duration::from_secs(10), || {
        let t = transcript_text();
        async move { t.contains("caught up with the WAL") }
    })
    .await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    let stopped = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(stopped.success());
    let _ = tty.wait();
    let shown = transcript_text();
    assert!(
        shown.contains("catching up:"),
        "no progress line on the terminal:\n{shown}"
    );
    assert!(shown.contains("of WAL to go"), "{shown}");

    // Not a terminal: no progress line in the log.
    let db2 = env.db().await;
    emit_txn(&db2, 60_000, 1, 1).await;
    let piped = env.run();
    wait_stream_len(&redis, "outbox.order", 60_001, Duration::from_secs(20)).await;
    let log = piped.log_text();
    assert!(
        !log.contains("catching up:") && !log.contains('\r'),
        "{log}"
    );
    drop(db);
}

/// Creating a slot waits for every transaction that holds an xid to end: `setup` names the
/// one it waits for (PID, how long it has been open, the fix) instead of hanging without a
/// word, and finishes once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_names_the_open_transaction_a_new_slot_waits_for() {
    let env = Env::start().await;
    let db = env.db().await;
    db.batch_execute("SELECT pg_drop_replication_slot('outboxd')")
        .await
        .unwrap();
    // A transaction with an xid, left open (another application's).
    let holder = env.db().await;
    holder
        .batch_execute("BEGIN; CREATE TABLE held (x int)")
        .await
        .unwrap();
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let config = env.config.clone();
    let setup =
        tokio::task::spawn_blocking(move || command(&config, &["setup", "--new-slot"], &[]));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !setup.is_finished(),
        "the slot waits for the open transaction"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let out = setup.await.unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("creating the slot waits for this transaction to end")
            && text.contains(&format!("pid={pid}"))
            && text.contains(&format!("pg_terminate_backend({pid})")),
        "{text}"
    );
}

/// The server's warnings on outboxd's SQL connections reach the log at WARN, with their
/// DETAIL and HINT, once a minute however often the server repeats them: here a trigger on
/// the outbox that warns at each row `prune` deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_warnings_are_logged_with_detail_and_hint_once_a_minute() {
    let env = Env::start().await;
    let db = env.db().await;
    db.batch_execute(
        "GRANT DELETE ON outbox TO outboxd; \
         CREATE FUNCTION warn_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE WARNING 'the archive is not keeping up' \
             USING DETAIL = 'archive lag 3 h', HINT = 'look at the archiver'; \
           RETURN OLD; END $$; \
         CREATE TRIGGER warn_on_delete BEFORE DELETE ON outbox \
           FOR EACH ROW EXECUTE FUNCTION warn_on_delete()",
    )
    .await
    .unwrap();
    let mut outboxd = env.run();
    emit_txn(&db, 0, 20, 2).await;
    let redis = env.redis.connect().await;
    wait_stream_len(&redis, "outbox.order", 20, Duration::from_secs(30)).await;
    let out = env.command(&["prune", "--older-than", "0s", "--wait", "30"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("postgres says: the archive is not keeping up"))
        .collect();
    assert_eq!(lines.len(), 1, "one line for 20 warnings:\n{text}");
    assert!(
        lines[0].contains(" WARN ")
            && lines[0].contains("archive lag 3 h")
            && lines[0].contains("look at the archiver"),
        "{}",
        lines[0]
    );
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}
