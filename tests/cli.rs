//! The command line against real services: bad input gets one clear line and a non-zero
//! exit; `setup` refuses what it cannot use and is idempotent; every command has help.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// test code: a panic is a failed test
// Runs Redis and Kafka: a build with both sinks (the default).
#![cfg(all(feature = "redis", feature = "kafka"))]

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The process failed with exactly one non-empty line on stderr, containing every `needle`.
fn assert_one_clear_line(out: &Output, needles: &[&str]) {
    assert!(
        !out.status.success(),
        "expected failure, got {:?}",
        out.status
    );
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{err}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} not in: {}", lines[0]);
    }
    assert!(
        !err.contains(OUTBOXD_PASSWORD),
        "the password leaked: {err}"
    );
}

fn outboxd(args: &[&str], config_text: &str) -> Output {
    let dir = scratch_dir("cli");
    let config = dir.join("outboxd.toml");
    // No HTTP: tests run in parallel, and the default port is one.
    std::fs::write(&config, format!("{config_text}\n[http]\nlisten = \"\"\n")).unwrap();
    Command::new(outboxd_bin())
        .args(args)
        .arg("--config")
        .arg(&config)
        .env("OUTBOXD_LOG", "info")
        .output()
        .unwrap()
}

#[test]
fn an_unknown_config_key_is_named_and_exits_2() {
    let out = outboxd(
        &["run"],
        "[postgres]\nurl = \"postgres://u:pw@127.0.0.1/app\"\nslott = \"typo\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    assert_one_clear_line(
        &out,
        &["unknown configuration key `postgres.slott`", "slot"],
    );
}

#[test]
fn an_unknown_environment_override_is_named() {
    let dir = scratch_dir("cli-env");
    let config = dir.join("outboxd.toml");
    std::fs::write(
        &config,
        "[postgres]\nurl = \"postgres://u@127.0.0.1/app\"\n",
    )
    .unwrap();
    let out = Command::new(outboxd_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("OUTBOXD_SINK__REDIS__ULR", "redis://x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_one_clear_line(&out, &["sink.redis.ulr", "OUTBOXD_SINK__REDIS__ULR"]);
}

#[test]
fn an_unreachable_postgres_says_where_and_what_to_check() {
    let port = free_port();
    let out = outboxd(
        &["run"],
        &format!(
            "[postgres]\nurl = \"postgres://outboxd:{OUTBOXD_PASSWORD}@127.0.0.1:{port}/app\"\n"
        ),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_one_clear_line(
        &out,
        &[
            &format!("cannot connect to Postgres at postgres://outboxd@127.0.0.1:{port}/app"),
            "Check postgres.url",
        ],
    );
    // setup says the same.
    let out = outboxd(
        &["setup"],
        &format!(
            "[postgres]\nurl = \"postgres://outboxd:{OUTBOXD_PASSWORD}@127.0.0.1:{port}/app\"\n"
        ),
    );
    assert_one_clear_line(&out, &["cannot connect to Postgres"]);
}

#[test]
fn a_config_without_postgres_url_says_how_to_set_it() {
    let out = outboxd(&["run"], "");
    assert_eq!(out.status.code(), Some(2));
    assert_one_clear_line(&out, &["postgres.url is not set", "OUTBOXD_POSTGRES__URL"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_slot_stops_run_with_what_to_do() {
    let env = Env::new(Postgres::start(), "").await;
    let out = env.command(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert_one_clear_line(
        &out,
        &[
            "replication slot \"outboxd\" does not exist",
            "run `outboxd setup`",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_stops_run_with_what_to_check() {
    let mut env = Env::start().await;
    env.redis.stop();
    let out = env.command(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!(
            "cannot reach redis at redis://127.0.0.1:{}",
            env.redis.port
        )) && last.contains("[sink.redis]"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_is_idempotent_and_creates_what_is_missing() {
    let env = Env::new(Postgres::start(), "").await;
    let db = env.db().await;
    db.batch_execute("DROP PUBLICATION outboxd").await.unwrap();
    // The least-privileged role cannot create the publication: it says who can, and how.
    let out = env.command(&["setup"]);
    assert_one_clear_line(
        &out,
        &[
            "may not create publication",
            "CREATE PUBLICATION \"outboxd\" FOR TABLE \"public\".\"outbox\" WITH (publish = 'insert')",
        ],
    );
    db.batch_execute("CREATE PUBLICATION outboxd FOR TABLE outbox WITH (publish = 'insert')")
        .await
        .unwrap();

    let first = env.command(&["setup"]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stdout(&first).contains("slot \"outboxd\" (pgoutput): created"),
        "{}",
        stdout(&first)
    );
    let second = env.command(&["setup"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stdout(&second).contains("already there"),
        "{}",
        stdout(&second)
    );
    let slots: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE plugin = 'pgoutput'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_refuses_wal_level_replica() {
    let env = Env::new(Postgres::start_with(&["wal_level = replica"]), "").await;
    let out = env.command(&["setup"]);
    assert_one_clear_line(
        &out,
        &["wal_level is \"replica\"", "wal_level = logical", "restart"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_refuses_a_missing_table() {
    let env = Env::new(Postgres::start(), "[postgres]\n").await;
    env.write_config("");
    let db = env.db().await;
    db.batch_execute("DROP TABLE outbox CASCADE").await.unwrap();
    let out = env.command(&["setup"]);
    assert_one_clear_line(
        &out,
        &["table \"public.outbox\" does not exist", "sql/outbox.sql"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_refuses_a_role_without_rights() {
    let env = Env::new(Postgres::start(), "").await;
    let db = env.db().await;
    db.batch_execute("ALTER ROLE outboxd NOREPLICATION")
        .await
        .unwrap();
    let out = env.command(&["setup"]);
    assert_one_clear_line(
        &out,
        &[
            "lacks the REPLICATION attribute",
            "ALTER ROLE outboxd WITH REPLICATION",
        ],
    );

    db.batch_execute("ALTER ROLE outboxd REPLICATION; REVOKE SELECT ON outbox FROM outboxd")
        .await
        .unwrap();
    let out = env.command(&["setup"]);
    assert_one_clear_line(
        &out,
        &["may not read \"public\".\"outbox\"", "GRANT SELECT"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_drop_asks_for_yes_and_refuses_an_active_slot() {
    let env = Env::start().await;
    let out = env.command(&["slot", "drop"]);
    assert_one_clear_line(&out, &["without --yes"]);

    let running = env.run();
    let db = env.db().await;
    wait_slot_active(&db).await;
    let out = env.command(&["slot", "drop", "--yes"]);
    assert_one_clear_line(&out, &["is in use", "stop outboxd first"]);
    drop(running);

    // Stopped: `--yes` drops it, and Postgres no longer has it.
    wait_until(
        "the slot to be released",
        Duration::from_secs(20),
        || async {
            !db.query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'outboxd'",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(true)
        },
    )
    .await;
    let out = env.command(&["slot", "drop", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the slot is gone");
    // And outboxd does not recreate it on its own.
    let out = env.command(&["run"]);
    assert_one_clear_line(&out, &["outboxd setup"]);
}

#[test]
fn every_command_has_help_with_an_example() {
    for args in [
        vec!["--help"],
        vec!["setup", "--help"],
        vec!["run", "--help"],
        vec!["check", "--help"],
        vec!["slot", "--help"],
        vec!["slot", "status", "--help"],
        vec!["slot", "drop", "--help"],
    ] {
        let out = Command::new(outboxd_bin()).args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = stdout(&out);
        assert!(text.contains("Example"), "{args:?} has no example:\n{text}");
        assert!(
            text.contains("--config"),
            "{args:?} does not mention --config:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_files_are_used_and_never_shown() {
    const REDIS_PASSWORD: &str = "redis-Secr3t-from-file";
    const KAFKA_PASSWORD: &str = "kafka-Secr3t-from-file";
    let env = Env::with_redis(
        Postgres::start(),
        Redis::start_with_password(Some(REDIS_PASSWORD)),
        "",
    )
    .await;
    let pg_file = env.dir.join("pg_url");
    let redis_file = env.dir.join("redis_url");
    // Secret files usually end with a line break: it is not part of the secret.
    std::fs::write(&pg_file, format!("{}\n", env.pg.outboxd_url("app"))).unwrap();
    std::fs::write(&redis_file, format!("{}\n", env.redis.url())).unwrap();
    let postgres = format!("url_file = {:?}", pg_file.to_string_lossy());
    let text = format!(
        "[postgres]\n{postgres}\n\n[http]\nlisten = \"127.0.0.1:{}\"\n\n[sink.redis]\nurl_file = {:?}\n",
        env.http_port,
        redis_file.to_string_lossy()
    );
    std::fs::write(&env.config, &text).unwrap();
    let secret_free = |what: &str, out: &str| {
        for secret in [OUTBOXD_PASSWORD, REDIS_PASSWORD, KAFKA_PASSWORD] {
            assert!(!out.contains(secret), "{what} shows a secret:\n{out}");
        }
    };

    env.setup();
    let out = env.command(&["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    secret_free("check", &format!("{}{}", stdout(&out), stderr(&out)));
    let mut run = env.run();
    let db = env.db().await;
    emit_txn(&db, 0, 25, 5).await;
    let mut redis = env.redis.connect().await;
    wait_stream_len(&redis, "outbox.order", 25, Duration::from_secs(30)).await;
    assert_eq!(
        check_complete_and_ordered(&read_stream(&mut redis, "outbox.order").await, 0..25),
        0
    );
    run.sigterm();
    assert!(run.wait(Duration::from_secs(30)).success());
    secret_free("run's log", &run.log_text());

    // From the environment, and --help with it set.
    let out = Command::new(outboxd_bin())
        .args(["check", "--config"])
        .arg(&env.config)
        .env("OUTBOXD_POSTGRES__URL_FILE", &pg_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    secret_free(
        "check with OUTBOXD_POSTGRES__URL_FILE",
        &format!("{}{}", stdout(&out), stderr(&out)),
    );
    let out = Command::new(outboxd_bin())
        .args(["run", "--help"])
        .env("OUTBOXD_POSTGRES__URL_FILE", &pg_file)
        .env("OUTBOXD_POSTGRES__URL", env.pg.outboxd_url("app"))
        .output()
        .unwrap();
    secret_free("--help", &stdout(&out));

    // A key and its _file twin, an unreadable file, an empty file: one line, exit 2, no
    // content shown.
    let both = outboxd(
        &["check"],
        &format!(
            "[postgres]\nurl = \"postgres://u:{OUTBOXD_PASSWORD}@127.0.0.1/app\"\n{postgres}\n"
        ),
    );
    assert_eq!(both.status.code(), Some(2));
    assert_one_clear_line(&both, &["postgres.url and postgres.url_file are both set"]);
    let missing = outboxd(&["run"], "[postgres]\nurl_file = \"/nonexistent/pg_url\"\n");
    assert_eq!(missing.status.code(), Some(2));
    assert_one_clear_line(
        &missing,
        &[
            "cannot read postgres.url_file \"/nonexistent/pg_url\"",
            "No such file",
        ],
    );
    let empty = env.dir.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let out = outboxd(
        &["run"],
        &format!("[postgres]\nurl_file = {:?}\n", empty.to_string_lossy()),
    );
    assert_one_clear_line(&out, &["postgres.url_file", "the file is empty"]);

    // The Kafka SASL password from a file: librdkafka's debug log on, a broker that is not
    // there; the password is in no line.
    let kafka_file = env.dir.join("kafka_password");
    std::fs::write(&kafka_file, format!("{KAFKA_PASSWORD}\n")).unwrap();
    let out = Command::new(outboxd_bin())
        .args(["run", "--config"])
        .arg(&env.config)
        .env("OUTBOXD_SINK__KIND", "kafka")
        .env(
            "OUTBOXD_SINK__KAFKA__BROKERS",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("OUTBOXD_SINK__KAFKA__SASL_PASSWORD_FILE", &kafka_file)
        .env(
            "OUTBOXD_SINK__KAFKA__OPTIONS__SECURITY.PROTOCOL",
            "sasl_plaintext",
        )
        .env(
            "OUTBOXD_SINK__KAFKA__OPTIONS__SASL.MECHANISMS",
            "SCRAM-SHA-512",
        )
        .env("OUTBOXD_SINK__KAFKA__OPTIONS__SASL.USERNAME", "outboxd")
        .env("OUTBOXD_SINK__KAFKA__OPTIONS__DEBUG", "all")
        .env("OUTBOXD_SINK__KAFKA__OPTIONS__LOG_LEVEL", "7")
        .env("OUTBOXD_SINK__KAFKA__TIMEOUT_MS", "2000")
        .env("OUTBOXD_LOG", "debug")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = format!("{}{}", stdout(&out), stderr(&out));
    assert!(log.contains("sasl"), "librdkafka's debug log is on:\n{log}");
    secret_free("the Kafka debug log", &log);
    let both = Command::new(outboxd_bin())
        .args(["check", "--config"])
        .arg(&env.config)
        .env("OUTBOXD_SINK__KAFKA__SASL_PASSWORD_FILE", &kafka_file)
        .env("OUTBOXD_SINK__KAFKA__OPTIONS__SASL.PASSWORD", "x")
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2));
    assert_one_clear_line(&both, &["sink.kafka.sasl_password_file"]);
}

/// Every form a secret can take in the configuration (libpq's `key = value` with quotes and
/// spaces, a password query parameter, several NATS servers with credentials, a NATS token, a
/// Redis password): neither `check`, nor `run`'s log, nor an error shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_every_url_form_are_never_shown() {
    const NATS_PASSWORD: &str = "nats-Pa55word";
    const NATS_TOKEN: &str = "nats-T0ken";
    const REDIS_PASSWORD: &str = "redis-Pa55word";
    let pg = Postgres::start();
    create_outbox_db(&pg).await;
    let port = pg.port;
    let dead = free_port();
    let postgres_forms = [
        format!(
            "host=127.0.0.1 port={port} user=outboxd password = '{OUTBOXD_PASSWORD}' dbname=app"
        ),
        format!("host=127.0.0.1 port={port} user=outboxd password={OUTBOXD_PASSWORD} dbname=app"),
        format!("postgres://127.0.0.1:{port}/app?user=outboxd&password={OUTBOXD_PASSWORD}"),
        pg.outboxd_url("app"),
    ];
    let sinks = [
        format!(
            "[sink]\nkind = \"nats\"\n[sink.nats]\nurl = \"nats://u:{NATS_PASSWORD}@127.0.0.1:{dead},nats://u:{NATS_PASSWORD}@127.0.0.1:{dead}\"\ntimeout_ms = 500\n"
        ),
        format!(
            "[sink]\nkind = \"nats\"\n[sink.nats]\nurl = \"nats://{NATS_TOKEN}@127.0.0.1:{dead}\"\ntimeout_ms = 500\n"
        ),
        format!(
            "[sink]\nkind = \"redis\"\n[sink.redis]\nurl = \"redis://:{REDIS_PASSWORD}@127.0.0.1:{dead}\"\ntimeout_ms = 500\n"
        ),
    ];
    let secrets = [OUTBOXD_PASSWORD, NATS_PASSWORD, NATS_TOKEN, REDIS_PASSWORD];
    for postgres in &postgres_forms {
        let setup = outboxd(
            &["setup"],
            &format!("[postgres]\nurl = {postgres:?}\n{}", sinks[2]),
        );
        let text = format!("{}{}", stdout(&setup), stderr(&setup));
        assert!(setup.status.success(), "{postgres}: {text}");
        for sink in &sinks {
            let config = format!("[postgres]\nurl = {postgres:?}\n{sink}");
            for command in ["check", "run"] {
                let out = outboxd(&[command], &config);
                let text = format!("{}{}", stdout(&out), stderr(&out));
                assert!(
                    !out.status.success(),
                    "{command} with an unreachable broker: {text}"
                );
                for secret in secrets {
                    assert!(
                        !text.contains(secret),
                        "{command} shows {secret} ({postgres}, {sink}):\n{text}"
                    );
                }
            }
        }
    }
}

/// Values that once panicked or exhausted memory: one line and exit 2.
#[test]
fn values_out_of_range_are_refused_with_the_key_and_exit_2() {
    for (line, needle) in [
        (
            "[postgres]\nprune_after = \"99999999999999999999d\"",
            "postgres.prune_after",
        ),
        (
            "[sink]\nmax_inflight_events = 9223372036854775807",
            "sink.max_inflight_events must be between 1 and 10000000",
        ),
        (
            "[sink]\nmax_batch_events = 9223372036854775807",
            "sink.max_batch_events must be between 1 and 100000",
        ),
        (
            "[sink]\ndrain_timeout_ms = 9223372036854775807",
            "sink.drain_timeout_ms must be between 0 and 3600000",
        ),
    ] {
        let (section, rest) = line.split_once('\n').unwrap();
        let text = if section == "[postgres]" {
            format!("[postgres]\nurl = \"postgres://u:pw@127.0.0.1/app\"\n{rest}\n")
        } else {
            format!("[postgres]\nurl = \"postgres://u:pw@127.0.0.1/app\"\n{section}\n{rest}\n")
        };
        let out = outboxd(&["run"], &text);
        assert_eq!(out.status.code(), Some(2), "{line}: {}", stderr(&out));
        assert_one_clear_line(&out, &[needle]);
    }
}
