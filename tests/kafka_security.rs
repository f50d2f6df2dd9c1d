//! outboxd against an Apache Kafka broker that takes clients only over SASL_SSL: SCRAM-SHA-512
//! over TLS, the broker's certificate signed by a CA the test makes with `openssl`. TLS and
//! SASL are in every build (librdkafka with OpenSSL), configured through
//! `[sink.kafka.options]` alone. The test's own consumers read through a plaintext listener.
//! With an authorizer, a topic ACL revoked mid-stream, and a topic deleted, stop forwarding
//! without dead-lettering anything, until the broker takes the events again.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "kafka")] // the sink this file tests: built in, or nothing to run

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::apache_kafka::{
    AUTHORIZER, Kafka, SCRAM_USER, Security, create_topic, delete_topic, set_acls,
};
use support::kafka::*;
use support::*;

const PASSWORD: &str = "scram-Secr3t-9f1c";
const TOPIC: &str = "outbox.order";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA (`ca.pem`) and the broker's key and certificate for localhost and 127.0.0.1, in
/// one PEM file (`broker-keystore.pem`, the key in PKCS#8 as Kafka's PEM keystores want it).
fn make_certificates(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=outboxd test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "broker.key",
            "-out",
            "broker.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "broker.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "broker.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    openssl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "broker.key",
            "-out",
            "broker.pk8",
        ],
    );
    let keystore = dir.join("broker-keystore.pem");
    let key = std::fs::read_to_string(dir.join("broker.pk8")).unwrap();
    let cert = std::fs::read_to_string(dir.join("broker.pem")).unwrap();
    std::fs::write(&keystore, format!("{key}{cert}")).unwrap();
    (dir.join("ca.pem"), keystore)
}

fn secure_kafka() -> (Kafka, PathBuf) {
    let dir = scratch_dir("kafka-tls");
    let (ca, keystore) = make_certificates(&dir);
    let kafka = Kafka::start(
        1,
        Security::SaslSsl {
            keystore,
            password: PASSWORD.into(),
        },
    );
    (kafka, ca)
}

/// `[sink.kafka.options]` for SCRAM-SHA-512 over TLS (with `password`, unless it comes from
/// a file), librdkafka's debug logs of its security, broker and protocol layers on.
fn options(ca: &Path, password: Option<&str>) -> String {
    let password = password.map_or_else(String::new, |p| format!("\"sasl.password\" = \"{p}\"\n"));
    format!(
        "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
         \"sasl.username\" = \"{SCRAM_USER}\"\n{password}\
         \"ssl.ca.location\" = \"{}\"\n\"debug\" = \"security,broker,protocol\"\n\
         \"log_level\" = \"7\"",
        ca.display()
    )
}

/// The password in the options, or (`password_file`) read from that file through
/// `sink.kafka.sasl_password_file`.
fn settings(
    ca: &Path,
    password: &str,
    password_file: Option<&Path>,
    delivery: &str,
) -> KafkaSettings {
    let mut kafka =
        "create_topics = true\ntopic_partitions = 3\ndelivery_timeout_ms = 10000".to_owned();
    if let Some(file) = password_file {
        std::fs::write(file, format!("{password}\n")).unwrap();
        kafka.push_str(&format!(
            "\nsasl_password_file = {:?}",
            file.display().to_string()
        ));
    }
    KafkaSettings {
        sink: format!("delivery = \"{delivery}\""),
        kafka,
        options: options(ca, password_file.is_none().then_some(password)),
    }
}

const DEBUG_LOG: (&str, &str) = ("OUTBOXD_LOG", "debug");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_over_sasl_ssl_with_scram_and_no_log_line_holds_the_password() {
    let (kafka, ca) = secure_kafka();
    // Effectively-once: the producer, the admin client and the offsets topic's consumer all
    // go through SASL_SSL.
    // The password from a secret file (sink.kafka.sasl_password_file).
    let secret = scratch_dir("kafka-secret").join("sasl_password");
    let env = SinkEnv::kafka(
        &kafka.secure_brokers(),
        &settings(&ca, PASSWORD, Some(&secret), "effectively-once"),
    )
    .await;
    let mut outboxd = env.run_with(&[DEBUG_LOG]);
    let db = env.db().await;
    let started = Instant::now();
    write_events(&db, 0, 2000, 200, 20, 1).await;
    let messages = read_topic_isolated(
        &kafka.brokers(),
        TOPIC,
        "read_committed",
        Duration::from_secs(90),
        |m| has_all(m, 0..2000),
    )
    .await;
    let duplicates = check_complete_and_ordered(&messages, 0..2000);
    assert_eq!(duplicates, 0);
    let elapsed = started.elapsed();

    // `check` passes over SASL_SSL too.
    let check = env.command_with(&["check"], &[DEBUG_LOG]);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{report}");

    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(60)).success());
    let log = outboxd.log_text();
    assert!(
        log.contains("SASL") && log.contains("SCRAM-SHA-512"),
        "librdkafka's security debug logs are on, so the log shows the SASL handshake:\n{}",
        &log[..log.len().min(4000)]
    );
    for (what, text) in [("outboxd run", &log), ("outboxd check", &report)] {
        let leaks: Vec<&str> = text.lines().filter(|l| l.contains(PASSWORD)).collect();
        assert!(leaks.is_empty(), "{what} logged the password: {leaks:?}");
    }
    println!(
        "SASL_SSL (SCRAM-SHA-512 over TLS), effectively-once: 2,000 events in {:.1} s, each once; {} log lines with librdkafka debug on, none with the password",
        elapsed.as_secs_f64(),
        log.lines().count()
    );
    drop(kafka);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_one_clear_line_and_a_non_zero_exit() {
    let (kafka, ca) = secure_kafka();
    let wrong = "not-the-Secr3t";
    let env = SinkEnv::kafka(
        &kafka.secure_brokers(),
        &settings(&ca, wrong, None, "at-least-once"),
    )
    .await;
    let db = env.db().await;

    // outboxd check: a non-zero exit and a line that names the credentials.
    let check = env.command_with(&["check"], &[DEBUG_LOG]);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!check.status.success(), "{report}");
    let failures: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("FAIL") && l.to_lowercase().contains("kafka"))
        .collect();
    assert_eq!(failures.len(), 1, "one failure line for Kafka:\n{report}");
    assert!(
        failures[0].contains("refused outboxd")
            && (failures[0].contains("credentials") || failures[0].contains("authentication")),
        "the line says what is wrong: {}",
        failures[0]
    );

    // outboxd run: stops with one line that says so.
    let started = Instant::now();
    let mut outboxd = env.run_with(&[DEBUG_LOG]);
    emit_txn(&db, 0, 10, 2).await;
    let status = outboxd.wait(Duration::from_secs(120));
    let log = outboxd.log_text();
    assert!(!status.success(), "{log}");
    // librdkafka's debug lines go on while the client shuts down: the stop is the one ERROR.
    let stops: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") && !l.contains("librdkafka"))
        .collect();
    assert_eq!(stops.len(), 1, "one error line: {stops:?}");
    let last = stops[0];
    assert!(
        last.contains("outboxd stopped")
            && last.contains("refused outboxd")
            && last.contains("credentials"),
        "the line says the credentials were refused: {last}"
    );
    for (what, text) in [("outboxd run", &log), ("outboxd check", &report)] {
        let leaks: Vec<&str> = text.lines().filter(|l| l.contains(wrong)).collect();
        assert!(leaks.is_empty(), "{what} logged the password: {leaks:?}");
    }
    // Nothing was confirmed: the events are still to be delivered.
    let messages = read_topic(&kafka.brokers(), TOPIC, Duration::from_secs(3), |_| false).await;
    assert!(messages.is_empty(), "{messages:?}");
    println!(
        "wrong SCRAM password: check failed with {:?}; run stopped after {:.1} s with: {last}",
        failures[0],
        started.elapsed().as_secs_f64()
    );
}

/// Kafka with an authorizer: outboxd (SCRAM user `outboxd`) may write the topic and the
/// dead-letter topic. Its ACL on the topic is revoked while events are committed: nothing goes
/// to the dead-letter topic, the slot stays before them, and they arrive once the ACL is back.
/// Then the topic is deleted: the same, until it exists again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_acl_or_a_deleted_topic_stops_forwarding_and_dead_letters_nothing() {
    let dir = scratch_dir("kafka-acl");
    let (ca, keystore) = make_certificates(&dir);
    let kafka = Kafka::start_with(
        1,
        Security::SaslSsl {
            keystore,
            password: PASSWORD.into(),
        },
        AUTHORIZER,
    );
    let plain = kafka.brokers();
    let user = format!("User:{SCRAM_USER}");
    create_topic(&plain, TOPIC, 1, &[]).await;
    create_topic(&plain, "outboxd.dlq", 1, &[]).await;
    set_acls(&plain, true, &user, &[TOPIC, "outboxd.dlq"]);
    let settings = KafkaSettings {
        sink: "delivery = \"at-least-once\"".into(),
        kafka: "delivery_timeout_ms = 10000".into(),
        options: format!(
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
             \"sasl.username\" = \"{SCRAM_USER}\"\n\"sasl.password\" = \"{PASSWORD}\"\n\
             \"ssl.ca.location\" = \"{}\"",
            ca.display()
        ),
    };
    let env = SinkEnv::kafka(&kafka.secure_brokers(), &settings).await;
    let mut outboxd = env.run();
    let db = env.db().await;
    let port = env.http_port;
    let read = |want: std::ops::Range<u64>| {
        let plain = plain.clone();
        async move {
            read_topic(&plain, TOPIC, Duration::from_secs(90), move |m| {
                has_all(m, want.clone())
            })
            .await
        }
    };
    emit_txn(&db, 0, 50, 5).await;
    assert!(has_all(&read(0..50).await, 0..50));

    // The ACL revoked: the events wait, the slot waits, the dead-letter topic stays empty.
    set_acls(&plain, false, &user, &[TOPIC]);
    let before = wal_insert_lsn(&db).await;
    emit_txn(&db, 50, 50, 5).await;
    wait_refusal(port, true).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        confirmed_flush(&db, "outboxd").await <= before,
        "the slot passed events the broker refused"
    );
    assert_eq!(
        count_to_end(&plain, "outboxd.dlq", "read_uncommitted").await,
        0
    );
    assert!(
        outboxd.log_text().contains("the broker refuses the events"),
        "{}",
        outboxd.log_text()
    );
    // Given back: they arrive.
    set_acls(&plain, true, &user, &[TOPIC]);
    let messages = read(0..100).await;
    assert!(has_all(&messages, 0..100));
    wait_refusal(port, false).await;

    // The topic deleted: the same, until it exists again.
    delete_topic(&plain, TOPIC).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    emit_txn(&db, 100, 50, 5).await;
    wait_refusal(port, true).await;
    assert_eq!(
        count_to_end(&plain, "outboxd.dlq", "read_uncommitted").await,
        0
    );
    create_topic(&plain, TOPIC, 1, &[]).await;
    assert!(has_all(&read(100..150).await, 100..150));
    wait_refusal(port, false).await;
    assert_eq!(
        count_to_end(&plain, "outboxd.dlq", "read_uncommitted").await,
        0
    );
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}
