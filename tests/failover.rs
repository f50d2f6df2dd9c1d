//! A promoted standby. outboxd streams from the primary under a multi-host URL with
//! `target_session_attrs=read-write`; the primary is stopped as a crash would stop it and
//! the standby promoted.
//!
//! - PostgreSQL 17+: the slot was created with `failover` and synchronised to the standby
//!   (`sync_replication_slots`, `synchronized_standby_slots`): outboxd finds the new primary
//!   by itself and continues from the synchronised slot; nothing lost, per-key order kept, no
//!   duplicate (effectively-once to Redis).
//! - Before 17 the slot does not survive: outboxd stops with one line naming the lost slot
//!   and the recovery, and the documented recovery (`setup --backfill-where` on the new
//!   primary) delivers every event.
//!
//! The commits are synchronous (`synchronous_standby_names = '*'`), so that every commit the
//! test saw is on the standby when the primary dies.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink the events go through

mod support;

use std::time::Duration;

use support::*;

const SLOT: &str = "outboxd";

/// The standby's copy of the slot: (synced, temporary), when it has one.
async fn synced_slot(standby: &tokio_postgres::Client) -> Option<(bool, bool)> {
    let row = standby
        .query_opt(
            "SELECT synced, temporary FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .unwrap()?;
    Some((row.get(0), row.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_continues_from_the_synced_slot_or_outboxd_says_what_to_do() {
    let env = Env::new(Postgres::start(), "").await;
    let version = env.pg.version_num().await;
    let failover_slots = version >= 170_000;
    let standby_conf: &[&str] = if failover_slots {
        &["sync_replication_slots = on", "hot_standby_feedback = on"]
    } else {
        &["hot_standby_feedback = on"]
    };
    let standby = env.pg.start_standby_with(standby_conf);
    let admin = env.db().await;
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await
        .unwrap();
    if failover_slots {
        admin
            .batch_execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby_1'")
            .await
            .unwrap();
    }
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();

    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=outboxd password={OUTBOXD_PASSWORD} \
         dbname=app target_session_attrs=read-write",
        env.pg.port, standby.port
    );
    env.write_config_with(
        &format!("url = \"{url}\"\nfailover_slot = {failover_slots}"),
        "\n[sink]\ndelivery = \"effectively-once\"\n",
    );
    env.setup();
    let mut outboxd = env.run();
    write_events(&admin, 0, 300, 20, 8, 11).await;
    let redis = env.redis.connect().await;
    wait_stream_len(&redis, "outbox.order", 300, Duration::from_secs(60)).await;

    let standby_db = standby.connect("app").await;
    if failover_slots {
        wait_until(
            "the slot synchronised to the standby",
            Duration::from_secs(90),
            || {
                let db = &standby_db;
                async move { synced_slot(db).await == Some((true, false)) }
            },
        )
        .await;
        let out = env.command(&["check"]);
        let text = output_text(&out);
        assert!(
            text.contains(&format!(
                "127.0.0.1:{} (standby) has the slot synchronised",
                standby.port
            )),
            "check says the standby can take over: {text}"
        );
    }
    let before_failover: String = admin
        .query_one("SELECT (now() - interval '1 minute')::text", &[])
        .await
        .unwrap()
        .get(0);

    // More events, and the primary dies while outboxd forwards them.
    write_events(&admin, 300, 300, 20, 8, 12).await;
    drop(admin);
    env.pg.stop_immediately();
    standby.promote();
    let new_primary = standby.connect("app").await;
    write_events(&new_primary, 600, 300, 20, 8, 13).await;

    if failover_slots {
        let entries = wait_stream_len(&redis, "outbox.order", 900, Duration::from_secs(120)).await;
        assert_each_once(&entries, 0..900);
        // Still streaming, from the new primary's slot.
        wait_slot_active(&new_primary).await;
        outboxd.sigterm();
        assert!(outboxd.wait(Duration::from_secs(30)).success());
        return;
    }

    // Before 17: the slot is gone with the old primary.
    let status = outboxd.wait(Duration::from_secs(120));
    assert!(!status.success(), "outboxd stops when the slot is lost");
    let log = outboxd.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" ERROR ") || l.starts_with("Error"))
        .unwrap_or_else(|| panic!("no error line: {log}"));
    assert!(line.contains(SLOT), "names the slot: {line}");
    assert!(
        line.contains("setup") || line.contains("operations.md"),
        "says what to do: {line}"
    );
    // The documented recovery: a new slot on the new primary, with a backfill of the window.
    let out = env.command(&[
        "setup",
        "--backfill-where",
        &format!("created_at >= '{before_failover}'"),
    ]);
    assert!(out.status.success(), "setup: {}", output_text(&out));
    let _outboxd = env.run();
    wait_until("every event", Duration::from_secs(120), || {
        let redis = redis.clone();
        async move {
            let mut r = redis;
            has_all(&read_stream(&mut r, "outbox.order").await, 0..900)
        }
    })
    .await;
}

/// PostgreSQL 17+: a standby cloned with `pg_basebackup` after the primary set
/// `synchronized_standby_slots = 'standby_1'` inherits the setting, and once promoted names
/// its own former slot, which it does not have: it accepts outboxd's session and then sends
/// nothing (logical decoding waits for that slot). `check` warns about it before the failover;
/// after the promotion outboxd says within 30 s that it is stalled, naming the setting and the
/// statement that fixes it (log, `/readyz`, `outboxd_stalled`, `slot status`); once fixed,
/// every event arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inherited_synchronized_standby_slots_is_named_before_and_after_the_promotion() {
    let env = Env::new(Postgres::start(), "").await;
    if env.pg.version_num().await < 170_000 {
        println!("synchronized_standby_slots needs PostgreSQL 17: nothing to show here");
        return;
    }
    let admin = env.db().await;
    // Set before the standby is cloned, as on a primary that had a standby before.
    admin
        .batch_execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby_1'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let standby = env
        .pg
        .start_standby_with(&["sync_replication_slots = on", "hot_standby_feedback = on"]);
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=outboxd password={OUTBOXD_PASSWORD} \
         dbname=app target_session_attrs=read-write",
        env.pg.port, standby.port
    );
    env.write_config_with(
        &format!("url = \"{url}\"\nfailover_slot = true"),
        "\n[sink]\ndelivery = \"effectively-once\"\n",
    );
    env.setup();
    let mut outboxd = env.run();
    emit_txn(&admin, 0, 100, 4).await;
    let redis = env.redis.connect().await;
    wait_stream_len(&redis, "outbox.order", 100, Duration::from_secs(60)).await;
    let standby_db = standby.connect("app").await;
    wait_until(
        "the slot synchronised to the standby",
        Duration::from_secs(90),
        || {
            let db = &standby_db;
            async move { synced_slot(db).await == Some((true, false)) }
        },
    )
    .await;

    // Before the failover, check names the trap on the standby.
    let text = output_text(&env.command(&["check"]));
    assert!(
        text.contains(&format!(
            "127.0.0.1:{} (standby) has synchronized_standby_slots = 'standby_1'",
            standby.port
        )) && text.contains("ALTER SYSTEM SET synchronized_standby_slots = ''"),
        "check warns about the inherited setting: {text}"
    );

    drop(admin);
    env.pg.stop_immediately();
    standby.promote();
    let promoted = std::time::Instant::now();
    let new_primary = standby.connect("app").await;
    emit_txn(&new_primary, 100, 100, 4).await;

    let port = env.http_port;
    wait_until("outboxd to name the stall", Duration::from_secs(60), || {
        let log = outboxd.log_text();
        async move {
            log.contains("connected but not advancing")
                && log.contains("synchronized_standby_slots")
        }
    })
    .await;
    let named_after = promoted.elapsed();
    let log = outboxd.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("connected but not advancing"))
        .unwrap();
    assert!(line.contains(" WARN "), "{line}");
    assert!(
        line.contains("ALTER SYSTEM SET synchronized_standby_slots = ''"),
        "names the fix: {line}"
    );
    assert!(
        named_after < Duration::from_secs(30),
        "named {named_after:?} after the promotion"
    );
    let (code, body) = http_get(port, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("stalled") && body.contains("synchronized_standby_slots"),
        "{body}"
    );
    assert_eq!(metric_value(port, "outboxd_stalled").await, Some(1.0));
    let status = output_text(&env.command(&["slot", "status", "--json"]));
    assert!(
        status.contains("\"kind\":\"synchronized_standby_slots\""),
        "{status}"
    );

    // The fix the line names: everything arrives, once.
    new_primary
        .batch_execute("ALTER SYSTEM SET synchronized_standby_slots = ''")
        .await
        .unwrap();
    new_primary
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let entries = wait_stream_len(&redis, "outbox.order", 200, Duration::from_secs(60)).await;
    assert_each_once(&entries, 0..200);
    wait_until(
        "the stall to be over",
        Duration::from_secs(30),
        || async move { metric_value(port, "outboxd_stalled").await == Some(0.0) },
    )
    .await;
    assert!(outboxd.log_text().contains("advancing again"));
    println!(
        "an inherited synchronized_standby_slots: check warned before the failover; outboxd named it {:.1} s after the promotion; after the fix every event once",
        named_after.as_secs_f64()
    );
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}
