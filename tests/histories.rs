//! Effectively-once markers belong to one WAL history, and never skip the events of another:
//! two services of two Postgres clusters on one Redis (and one Kafka cluster) with every name
//! at its default both deliver everything, each event once; a copy of one cluster restored from
//! a backup taken before it wrote on (same system, WAL positions below the marker) delivers its
//! new events instead of skipping them as "already delivered".
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(all(feature = "redis", feature = "kafka"))]

mod support;

use std::time::Duration;

use support::apache_kafka::Kafka;
use support::kafka::*;
use support::*;

const EFFECTIVELY_ONCE: &str = "[sink]\ndelivery = \"effectively-once\"\n";

/// Writes about `mb` MB of WAL on `db` outside the outbox: its positions move far ahead.
async fn write_wal(db: &tokio_postgres::Client, mb: u32) {
    db.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS ballast (b text); \
         INSERT INTO ballast SELECT repeat('x', 1000) FROM generate_series(1, {})",
        mb * 1000
    ))
    .await
    .unwrap();
}

/// The entries whose seq is in `range`.
fn within<D: Delivered + Clone>(all: &[D], range: std::ops::Range<u64>) -> Vec<D> {
    all.iter()
        .filter(|d| range.contains(&d.seq()))
        .cloned()
        .collect()
}

/// Points `env`'s configuration at `redis` (the Redis of another environment).
fn use_redis(env: &Env, redis: &str) {
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, text.replace(&env.redis.url(), redis)).unwrap();
}

/// A restored copy has outboxd's record of the slot but not the slot: `setup` refuses until
/// the operator decides, then creates a new one.
fn setup_after_restore(command: impl Fn(&[&str]) -> std::process::Output) {
    let out = command(&["setup"]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    let out = command(&["setup", "--new-slot"]);
    assert!(out.status.success(), "{}", output_text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_markers_of_other_histories_skip_nothing() {
    let a = Env::new(Postgres::start_new_system(), EFFECTIVELY_ONCE).await;
    let b = Env::new(Postgres::start_new_system(), EFFECTIVELY_ONCE).await;
    let redis_url = a.redis.url();
    use_redis(&b, &redis_url);
    a.setup();
    b.setup();
    let (db_a, db_b) = (a.db().await, b.db().await);
    let mut run_a = a.run();
    emit_txn(&db_a, 0, 100, 4).await;
    let redis = a.redis.connect().await;
    wait_stream_len(&redis, "outbox.order", 100, Duration::from_secs(30)).await;
    // A backup of A now; then A writes on, far ahead of it.
    let copy = Env::without_schema(a.pg.start_restored_copy(), Redis::start(), EFFECTIVELY_ONCE);
    use_redis(&copy, &redis_url);
    write_wal(&db_a, 30).await;

    // Two services, one Redis, every name at its default, at the same time.
    let mut run_b = b.run();
    emit_txn(&db_a, 100, 200, 4).await;
    emit_txn(&db_b, 1000, 300, 4).await;
    let want = |all: &[Entry]| has_all(all, 0..300) && has_all(all, 1000..1300);
    wait_until("both services' events", Duration::from_secs(60), || {
        let redis = redis.clone();
        async move {
            let mut r = redis;
            want(&read_stream(&mut r, "outbox.order").await)
        }
    })
    .await;
    run_a.sigterm();
    run_b.sigterm();
    assert!(run_a.wait(Duration::from_secs(30)).success());
    assert!(run_b.wait(Duration::from_secs(30)).success());

    // A is lost and restored from the backup: same system, same slot name, WAL behind the
    // marker A left.
    drop(db_a);
    a.pg.stop_immediately();
    setup_after_restore(|args| copy.command(args));
    let mut run_copy = copy.run();
    let db_copy = copy.db().await;
    emit_txn(&db_copy, 2000, 100, 4).await;
    let mut r = redis.clone();
    let entries = wait_stream_len(&redis, "outbox.order", 700, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stream_len(&mut r, "outbox.order").await,
        700,
        "nothing twice"
    );
    assert_each_once(&within(&entries, 0..300), 0..300);
    assert_each_once(&within(&entries, 1000..1300), 1000..1300);
    assert_each_once(&within(&entries, 2000..2100), 2000..2100);
    run_copy.sigterm();
    assert!(run_copy.wait(Duration::from_secs(30)).success());
    let log = run_copy.log_text();
    assert!(
        log.contains("not of this server's WAL history") || log.contains("earlier timeline"),
        "the restored copy says why it does not trust the marker:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_markers_of_other_histories_skip_nothing() {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    let settings = KafkaSettings {
        sink: "delivery = \"effectively-once\"".into(),
        kafka: "create_topics = true\ntopic_partitions = 2".into(),
        options: String::new(),
    };
    let a = SinkEnv::kafka_on(Postgres::start_new_system(), &brokers, &settings).await;
    let b = SinkEnv::kafka_on(Postgres::start_new_system(), &brokers, &settings).await;
    let (db_a, db_b) = (a.db().await, b.db().await);
    let mut run_a = a.run();
    emit_txn(&db_a, 0, 100, 4).await;
    let got = |want: Vec<std::ops::Range<u64>>| {
        let brokers = brokers.clone();
        async move {
            read_topic_isolated(
                &brokers,
                "outbox.order",
                "read_committed",
                Duration::from_secs(90),
                move |m| want.iter().all(|r| has_all(m, r.clone())),
            )
            .await
        }
    };
    got(vec![0..100, 0..0]).await;
    let copy_pg = a.pg.start_restored_copy();
    write_wal(&db_a, 30).await;

    // Two services on one Kafka cluster with the default offsets topic and transactional.id:
    // neither fences the other, neither skips the other's events.
    let mut run_b = b.run();
    emit_txn(&db_a, 100, 200, 4).await;
    emit_txn(&db_b, 1000, 300, 4).await;
    got(vec![0..300, 1000..1300]).await;
    run_a.sigterm();
    run_b.sigterm();
    assert!(
        run_a.wait(Duration::from_secs(30)).success(),
        "{}",
        run_a.log_text()
    );
    assert!(
        run_b.wait(Duration::from_secs(30)).success(),
        "{}",
        run_b.log_text()
    );
    for log in [run_a.log_text(), run_b.log_text()] {
        assert!(!log.contains("fenced"), "{log}");
    }

    // A restored from the backup.
    drop(db_a);
    a.pg.stop_immediately();
    let config = std::fs::read_to_string(&a.config)
        .unwrap()
        .replace(&a.pg.port.to_string(), &copy_pg.port.to_string());
    let copy_config = a.dir.join("restored.toml");
    std::fs::write(&copy_config, config).unwrap();
    let command = |args: &[&str]| {
        std::process::Command::new(outboxd_bin())
            .args(args)
            .arg("--config")
            .arg(&copy_config)
            .output()
            .unwrap()
    };
    setup_after_restore(command);
    let mut run_copy = Outboxd::spawn(
        &["run", "--config", &copy_config.to_string_lossy()],
        a.dir.join("outboxd-restored.log"),
        &[],
    );
    let db_copy = copy_pg.connect("app").await;
    emit_txn(&db_copy, 2000, 100, 4).await;
    let messages = got(vec![0..300, 1000..1300, 2000..2100]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let messages = {
        let n = messages.len();
        read_topic_isolated(
            &brokers,
            "outbox.order",
            "read_committed",
            Duration::from_secs(20),
            move |m| m.len() >= n,
        )
        .await
    };
    assert_eq!(messages.len(), 700, "nothing twice");
    assert_each_once(&within(&messages, 0..300), 0..300);
    assert_each_once(&within(&messages, 1000..1300), 1000..1300);
    assert_each_once(&within(&messages, 2000..2100), 2000..2100);
    run_copy.sigterm();
    assert!(run_copy.wait(Duration::from_secs(30)).success());
    let log = run_copy.log_text();
    assert!(
        log.contains("not of this server's WAL history") || log.contains("earlier timeline"),
        "the restored copy says why it does not trust the marker:\n{log}"
    );
}
