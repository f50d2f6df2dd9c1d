//! A slot outboxd streamed is never recreated without a decision: the container's
//! entrypoint, restarted after the slot was dropped while events were committed, exits 3,
//! names the gap and creates no slot; the recovery the message gives (a backfill) delivers
//! every event; `--new-slot` is the explicit way to skip them, and is recorded.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::*;

/// Runs docker/outboxd-entrypoint.sh as the image does, with this build's outboxd first on
/// the PATH and the configuration in `OUTBOXD_CONFIG`; waits for it to end (it execs
/// `outboxd run` when setup succeeds: that is stopped after `timeout`).
fn entrypoint(config: &Path, timeout: Duration) -> Output {
    let bin = Path::new(outboxd_bin()).parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docker/outboxd-entrypoint.sh");
    let mut child = Command::new("sh")
        .arg(script)
        .env("PATH", path)
        .env("OUTBOXD_CONFIG", config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            // Still running: setup passed and `outboxd run` streams. Stop it by its PID.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

async fn slot_count(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entrypoint_does_not_recreate_a_lost_slot_and_the_named_recovery_delivers_everything() {
    let env = Env::new(Postgres::start(), "").await;
    let db = env.db().await;
    let redis = env.redis.connect().await;

    // First start: the entrypoint creates the slot and streams.
    let mut run = {
        let out = entrypoint(&env.config, Duration::from_secs(5));
        let text = output_text(&out);
        assert!(
            text.contains("slot \"outboxd\" (pgoutput): created"),
            "{text}"
        );
        // It went on to `run`, stopped by the test.
        assert!(text.contains("streaming"), "{text}");
        env.run()
    };
    emit_txn(&db, 0, 10, 2).await;
    wait_stream_len(&redis, "outbox.order", 10, Duration::from_secs(30)).await;
    run.sigterm();
    assert!(run.wait(Duration::from_secs(30)).success());
    let recorded: String = db
        .query_one(
            "SELECT created_by FROM outboxd.slots WHERE slot = 'outboxd' AND retired_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, "setup");

    // The slot is lost while applications write 100 events.
    let out = env.command(&["slot", "drop", "--yes"]);
    assert!(out.status.success(), "{}", output_text(&out));
    // One transaction each, so that the backfill's order (created_at) is commit order.
    for seq in 10..110 {
        emit_txn(&db, seq, 1, 4).await;
    }

    // The container restarts: the entrypoint stops at setup, says why, creates nothing.
    let out = entrypoint(&env.config, Duration::from_secs(60));
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    for needle in [
        "replication slot \"outboxd\" does not exist, and outboxd streamed it",
        "setup --backfill-where",
        "setup --new-slot",
        "not retrying",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
    assert!(!text.contains("streaming"), "{text}");
    assert_eq!(slot_count(&db).await, 0, "no slot was created");
    // `run` refuses the same way.
    let mut run = env.run();
    let status = run.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{}", run.log_text());
    assert!(
        run.log_text()
            .contains("does not exist, and outboxd streamed it"),
        "{}",
        run.log_text()
    );

    // The recovery the message names: the rows committed since the gap began.
    let since = text
        .split("created_at >= '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("the refusal names the time the gap began")
        .to_owned();
    let out = env.command(&[
        "setup",
        "--backfill-where",
        &format!("created_at >= '{since}'::timestamptz - interval '1 minute'"),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("the record of the lost slot is retired"),
        "{}",
        output_text(&out)
    );
    let mut run = env.run();
    emit_txn(&db, 110, 10, 4).await;
    let delivered = wait_complete(&redis, "outbox.order", 0..120, Duration::from_secs(60)).await;
    check_complete_and_ordered(&delivered, 0..120);
    run.sigterm();
    assert!(run.wait(Duration::from_secs(30)).success());

    // The entrypoint starts normally again.
    let out = entrypoint(&env.config, Duration::from_secs(5));
    assert!(
        output_text(&out).contains("already there"),
        "{}",
        output_text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_slot_is_the_explicit_decision_and_a_slot_made_by_hand_is_adopted() {
    let env = Env::new(Postgres::start(), "").await;
    let db = env.db().await;
    // A slot made before outboxd kept records (or by hand): setup adopts it.
    db.batch_execute("SELECT pg_create_logical_replication_slot('outboxd', 'pgoutput')")
        .await
        .unwrap();
    let out = env.command(&["setup"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let by: String = db
        .query_one(
            "SELECT created_by FROM outboxd.slots WHERE slot = 'outboxd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by, "adopted");

    // Lost: setup refuses until --new-slot, which records the decision.
    db.batch_execute("SELECT pg_drop_replication_slot('outboxd')")
        .await
        .unwrap();
    let out = env.command(&["setup"]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    let out = env.command(&["setup", "--new-slot"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let rows = db
        .query(
            "SELECT created_by, retired_note IS NOT NULL, coalesce(retired_note, '') \
             FROM outboxd.slots WHERE slot = 'outboxd' ORDER BY created_at",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, bool, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1), ("adopted", true));
    assert!(rows[0].2.contains("--new-slot"), "{rows:?}");
    assert_eq!((rows[1].0.as_str(), rows[1].1), ("setup --new-slot", false));
    let out = env.command(&["setup"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(slot_count(&db).await, 1);
}
