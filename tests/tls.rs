//! TLS against servers the tests start, with a CA and certificates made per test: a Postgres
//! whose pg_hba.conf takes TCP connections only over TLS (`hostssl`), and a Redis that
//! listens only on TLS and wants client certificates.
//!
//! Events flow with `verify-full`, `verify-ca`, `require` and a client certificate, in both
//! connection-string forms; every certificate problem (unknown CA, a host name the
//! certificate does not cover, no TLS against a TLS-only server, an expired certificate, a
//! missing client certificate) stops `run` and fails `check` with one line that says what to
//! change, and leaves the slot where it was: nothing is lost.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::path::Path;
use std::time::Duration;

use support::tls::TestPki;
use support::*;

/// The stream the test events go to.
const STREAM: &str = "outbox.order";

fn hostssl(options: &str) -> String {
    format!("hostssl all all 127.0.0.1/32 scram-sha-256 {options}")
}

/// Postgres taking only TLS on TCP (with `hba_options` on its hostssl line), a plain Redis,
/// the outbox schema; no configuration written yet.
async fn tls_env(pki: &TestPki, hba_options: &str, server: &tls::CertFiles) -> Env {
    let hba = hostssl(hba_options);
    let pg = Postgres::start_tls(&PgTlsSetup {
        server,
        client_ca: &pki.ca,
        hba: &hba,
    });
    Env::new(pg, "").await
}

/// `postgres://outboxd:…@HOST:PORT/app?QUERY`.
fn url(env: &Env, host: &str, query: &str) -> String {
    format!(
        "postgres://outboxd:{OUTBOXD_PASSWORD}@{host}:{}/app?{query}",
        env.pg.port
    )
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn use_url(env: &Env, url: &str) {
    env.write_config_with(&format!("url = {url:?}"), "");
}

/// `check` passes; returns its report.
fn check_passes(env: &Env) -> String {
    let out = env.command(&["check"]);
    let text = output_text(&out);
    assert!(out.status.success(), "check failed:\n{text}");
    assert!(!text.contains(OUTBOXD_PASSWORD), "password leaked:\n{text}");
    text
}

/// Streams `count` events from seq `first` with the current configuration, then stops
/// outboxd with SIGTERM (exit 0).
/// Runs outboxd (debug logging on) until events `first..first + count` are in Redis, stops it
/// and returns its log.
async fn stream_events(env: &Env, first: u64, count: u64) -> String {
    let mut outboxd = env.run_with(&[("OUTBOXD_LOG", "debug")]);
    let db = env.db().await;
    emit_txn(&db, first, count, 7).await;
    let redis = env.redis.connect().await;
    let want = first + count;
    wait_stream_len(&redis, STREAM, want, Duration::from_secs(30)).await;
    outboxd.sigterm();
    let status = outboxd.wait(Duration::from_secs(30));
    let log = outboxd.log_text();
    assert!(status.success(), "outboxd: {status}\n{log}");
    log
}

/// A line from the middle of a PEM key file: what would show if the key leaked.
fn key_material(key: &Path) -> String {
    let pem = std::fs::read_to_string(key).unwrap();
    let line = pem
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() >= 40)
        .expect("a base64 line in the key file");
    line.to_owned()
}

/// `run` with the current configuration fails: returns its one error line.
fn run_fails(env: &Env) -> String {
    let mut outboxd = env.run();
    let status = outboxd.wait(Duration::from_secs(60));
    let log = outboxd.log_text();
    assert!(!status.success(), "run should fail:\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{log}");
    assert!(!log.contains(OUTBOXD_PASSWORD), "password leaked:\n{log}");
    errors[0].to_owned()
}

/// `check` fails with a `postgres` (or `replication`) line holding `needle`.
fn check_fails(env: &Env, needle: &str) {
    let out = env.command(&["check"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "check should fail:\n{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains(needle)),
        "no FAIL line with {needle:?}:\n{text}"
    );
    assert!(!text.contains(OUTBOXD_PASSWORD), "password leaked:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_with_verify_full_verify_ca_and_require_in_both_forms() {
    let dir = scratch_dir("tls");
    let pki = TestPki::create(&dir.join("pki"));
    let env = tls_env(&pki, "", &pki.server).await;
    let ca = path(&pki.ca);

    // verify-full: the certificate names localhost.
    use_url(
        &env,
        &url(
            &env,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
    );
    env.setup();
    let report = check_passes(&env);
    for subject in ["tls", "replication"] {
        let line = report
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(subject))
            .unwrap_or_else(|| panic!("no {subject} line:\n{report}"));
        assert!(
            line.starts_with("ok")
                && line.contains("TLSv1.3")
                && line.contains(&format!("certificate verified against {ca}"))
                && line.contains("host name checked"),
            "{line}"
        );
    }
    stream_events(&env, 0, 40).await;

    // verify-ca: the chain is checked, the name is not (127.0.0.1 is not in the certificate).
    use_url(
        &env,
        &url(
            &env,
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ),
    );
    let report = check_passes(&env);
    assert!(
        report.contains("host name not checked (verify-ca)"),
        "{report}"
    );
    stream_events(&env, 40, 40).await;

    // require: encrypted, not verified.
    use_url(&env, &url(&env, "127.0.0.1", "sslmode=require"));
    let report = check_passes(&env);
    assert!(
        report.contains("certificate not verified (sslmode=require)"),
        "{report}"
    );
    stream_events(&env, 80, 40).await;

    // sslrootcert=system: the operating system's bundle, here the test CA through
    // SSL_CERT_FILE (as with OpenSSL); verify-full is its default mode.
    use_url(&env, &url(&env, "localhost", "sslrootcert=system"));
    let out = std::process::Command::new(outboxd_bin())
        .args(["check", "--config"])
        .arg(&env.config)
        .env("SSL_CERT_FILE", &pki.ca)
        .output()
        .unwrap();
    let report = output_text(&out);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains(&format!(
            "certificate verified against the system's roots ({ca}), host name checked"
        )),
        "{report}"
    );

    // key=value form, verify-full.
    use_url(
        &env,
        &format!(
            "host=localhost port={} user=outboxd password={OUTBOXD_PASSWORD} dbname=app \
             sslmode=verify-full sslrootcert='{ca}'",
            env.pg.port
        ),
    );
    check_passes(&env);
    stream_events(&env, 120, 40).await;

    let mut redis = env.redis.connect().await;
    let entries = read_stream(&mut redis, STREAM).await;
    let duplicates = check_complete_and_ordered(&entries, 0..160);
    assert_eq!(duplicates, 0, "clean stops between the runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_the_server_demands_one() {
    let dir = scratch_dir("tls-client");
    let pki = TestPki::create(&dir.join("pki"));
    let env = tls_env(&pki, "clientcert=verify-full", &pki.server).await;
    let ca = path(&pki.ca);
    let with_cert = format!(
        "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        path(&pki.client.cert),
        path(&pki.client.key)
    );
    use_url(&env, &url(&env, "localhost", &with_cert));
    env.setup();
    let report = check_passes(&env);
    let log = stream_events(&env, 0, 50).await;
    // The client key's content appears nowhere: not in check, not in run's debug log.
    let secret = key_material(&pki.client.key);
    assert!(!report.contains(&secret), "key shown by check:\n{report}");
    assert!(!log.contains(&secret), "key in the log:\n{log}");

    // Without it, the server says no: one line naming the client certificate.
    use_url(
        &env,
        &url(
            &env,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
    );
    let line = run_fails(&env);
    assert!(line.contains("client certificate"), "{line}");
    check_fails(&env, "client certificate");

    // A key file that holds no key is named, and nothing of its content is shown.
    let bad_key = dir.join("bad.key");
    std::fs::write(&bad_key, "not-a-key-Secr3tKeyMaterial\n").unwrap();
    use_url(
        &env,
        &url(
            &env,
            "localhost",
            &format!(
                "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
                path(&pki.client.cert),
                path(&bad_key)
            ),
        ),
    );
    let out = env.command(&["check"]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("sslkey={}", path(&bad_key))) && text.contains("no PEM private key"),
        "{text}"
    );
    assert!(
        !text.contains("Secr3tKeyMaterial"),
        "key file content shown:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_problems_stop_run_with_one_line_and_lose_nothing() {
    let dir = scratch_dir("tls-bad");
    let pki = TestPki::create(&dir.join("pki"));
    let env = tls_env(&pki, "", &pki.server).await;
    let ca = path(&pki.ca);
    let good = url(
        &env,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    use_url(&env, &good);
    env.setup();
    stream_events(&env, 0, 20).await;

    // Events committed while outboxd cannot connect must arrive later.
    let db = env.db().await;
    emit_txn(&db, 20, 30, 7).await;
    let confirmed = confirmed_flush(&db, "outboxd").await;

    let cases = [
        (
            url(
                &env,
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={}", path(&pki.other_ca)),
            ),
            "not signed by a CA in",
        ),
        (
            url(
                &env,
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "does not cover the host \"127.0.0.1\"",
        ),
        (
            url(&env, "127.0.0.1", "sslmode=disable"),
            "accepts only TLS connections",
        ),
        (
            url(&env, "localhost", "sslmode=verify-full"),
            "no root certificate is given",
        ),
    ];
    for (bad, needle) in &cases {
        use_url(&env, bad);
        let line = run_fails(&env);
        assert!(line.contains(needle), "{bad}: {line}");
        println!("{line}");
        check_fails(&env, needle);
        let slot = db
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'outboxd'",
                &[],
            )
            .await
            .unwrap();
        assert!(!slot.get::<_, bool>(0), "slot left active");
        assert_eq!(
            confirmed_flush(&db, "outboxd").await,
            confirmed,
            "the slot moved"
        );
    }

    use_url(&env, &good);
    stream_events(&env, 50, 10).await;
    let mut redis = env.redis.connect().await;
    let entries = read_stream(&mut redis, STREAM).await;
    assert_eq!(check_complete_and_ordered(&entries, 0..60), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_refused_with_what_to_do() {
    let dir = scratch_dir("tls-expired");
    let pki = TestPki::create(&dir.join("pki"));
    let env = tls_env(&pki, "", &pki.expired).await;
    let ca = path(&pki.ca);
    use_url(
        &env,
        &url(
            &env,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
    );
    let out = env.command(&["setup"]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("certificate has expired"), "{text}");
    check_fails(&env, "certificate has expired");
    // Unverified TLS (require) still connects: the expiry is a verification matter.
    let require = url(&env, "127.0.0.1", "sslmode=require");
    use_url(&env, &require);
    env.setup();
    stream_events(&env, 0, 20).await;

    // Events committed while outboxd refuses the certificate arrive once it is accepted.
    let db = env.db().await;
    emit_txn(&db, 20, 30, 7).await;
    let confirmed = confirmed_flush(&db, "outboxd").await;
    use_url(
        &env,
        &url(
            &env,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
    );
    let line = run_fails(&env);
    assert!(line.contains("certificate has expired"), "{line}");
    let active: bool = db
        .query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!active, "slot left active");
    assert_eq!(
        confirmed_flush(&db, "outboxd").await,
        confirmed,
        "the slot moved"
    );

    use_url(&env, &require);
    stream_events(&env, 50, 10).await;
    let mut redis = env.redis.connect().await;
    let entries = read_stream(&mut redis, STREAM).await;
    assert_eq!(check_complete_and_ordered(&entries, 0..60), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_to_a_tls_only_redis_with_an_acl_user() {
    let dir = scratch_dir("rediss");
    let pki = TestPki::create(&dir.join("pki"));
    let redis = Redis::start_tls(&pki, "forwarder", "redis-Secr3t-pw");
    let env = Env::with_redis(Postgres::start(), redis, "").await;
    let tls_lines = |ca: &Path| {
        format!(
            "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            path(ca),
            path(&pki.client.cert),
            path(&pki.client.key)
        )
    };
    let postgres = format!("url = {:?}", env.pg.outboxd_url("app"));
    env.write_config_with(&postgres, &tls_lines(&pki.ca));
    env.setup();
    let report = check_passes(&env);
    assert!(!report.contains("redis-Secr3t-pw"), "{report}");
    assert!(
        report.contains(&format!(
            "TLS, certificate verified against {}, host name checked, client certificate {}",
            path(&pki.ca),
            path(&pki.client.cert)
        )),
        "{report}"
    );
    let log = stream_events(&env, 0, 100).await;
    let secret = key_material(&pki.client.key);
    for text in [&report, &log] {
        assert!(
            !text.contains("redis-Secr3t-pw") && !text.contains(&secret),
            "a secret shown:\n{text}"
        );
    }
    let mut conn = env.redis.connect().await;
    let entries = read_stream(&mut conn, STREAM).await;
    assert_eq!(check_complete_and_ordered(&entries, 0..100), 0);

    // The wrong CA: one clear line, from run and from check.
    env.write_config_with(&postgres, &tls_lines(&pki.other_ca));
    let line = run_fails(&env);
    assert!(
        line.contains("not signed by sink.redis.ca_file") && !line.contains("redis-Secr3t-pw"),
        "{line}"
    );
    check_fails(&env, "not signed by sink.redis.ca_file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walsender_kill_and_a_postgres_restart_over_tls_lose_nothing() {
    let dir = scratch_dir("tls-faults");
    let pki = TestPki::create(&dir.join("pki"));
    let env = tls_env(&pki, "", &pki.server).await;
    use_url(
        &env,
        &url(
            &env,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", path(&pki.ca)),
        ),
    );
    env.setup();
    let mut outboxd = env.run();
    let db = env.db().await;
    wait_slot_active(&db).await;
    for t in 0..10 {
        emit_txn(&db, t * 50, 50, 7).await;
    }
    // The walsender of outboxd's TLS session dies: outboxd reconnects through a new one.
    db.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
         WHERE slot_name = 'outboxd'",
        &[],
    )
    .await
    .unwrap();
    for t in 10..20 {
        emit_txn(&db, t * 50, 50, 7).await;
    }
    wait_slot_active(&db).await;
    drop(db);
    env.pg.stop();
    env.pg.start_again();
    let db = env.db().await;
    for t in 20..30 {
        emit_txn(&db, t * 50, 50, 7).await;
    }
    let redis = env.redis.connect().await;
    let entries = wait_complete(&redis, STREAM, 0..1500, Duration::from_secs(90)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..1500);
    println!("TLS: walsender kill and Postgres restart, 1,500 events, {duplicates} duplicates");
    assert!(outboxd.is_running(), "{}", outboxd.log_text());
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}
