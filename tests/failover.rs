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
