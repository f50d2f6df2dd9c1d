//! Connection strings that name several hosts (libpq's `host=a,b` and the URL form): the
//! SQL and the replication connection both pass over a host that does not answer, and with
//! `target_session_attrs=read-write` over one in recovery (a standby), to reach the primary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink the events go through

mod support;

use std::time::Duration;

use support::*;

/// Runs `setup` and `run` with `url`, writes 200 events and waits for them in Redis.
async fn events_flow_with(env: &Env, url: &str) -> Outboxd {
    env.write_config_with(&format!("url = \"{url}\""), "");
    env.setup();
    let outboxd = env.run();
    let db = env.db().await;
    write_events(&db, 0, 200, 10, 4, 7).await;
    let redis = env.redis.connect().await;
    let entries = wait_stream_len(&redis, "outbox.order", 200, Duration::from_secs(60)).await;
    assert_each_once(&entries, 0..200);
    outboxd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_does_not_answer_is_passed_over() {
    let env = Env::new(Postgres::start(), "").await;
    let dead = free_port();
    let url = format!(
        "postgres://outboxd:{OUTBOXD_PASSWORD}@127.0.0.1:{dead},127.0.0.1:{}/app",
        env.pg.port
    );
    let mut outboxd = events_flow_with(&env, &url).await;
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
    let log = outboxd.log_text();
    assert!(
        log.contains(&format!("127.0.0.1:{dead},127.0.0.1:{}", env.pg.port)),
        "the log names both hosts: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_passes_over_a_standby_to_the_primary() {
    let env = Env::new(Postgres::start(), "").await;
    let standby = env.pg.start_standby();
    // The standby answers first, and is in recovery.
    let standby_db = standby.connect("app").await;
    let in_recovery: bool = standby_db
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery);
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=outboxd password={OUTBOXD_PASSWORD} \
         dbname=app target_session_attrs=read-write",
        standby.port, env.pg.port
    );
    let mut outboxd = events_flow_with(&env, &url).await;
    // The slot is streamed from the primary.
    wait_slot_active(&env.db().await).await;
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}
