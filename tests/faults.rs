//! Every guarantee of docs/guarantees.md, tested by breaking something on purpose: crashes at
//! chosen points (failpoints), Postgres restarts and network cuts, poison events particular to
//! Redis, a million-row transaction, a five-minute outage, a dropped or invalidated slot, a
//! second instance taking over. Real Postgres, real Redis, the real binary.
//!
//! What every sink must do (per-key order, an outage under load, poison, kill -9 at random
//! moments, effectively-once) is proven for each broker by the conformance suite
//! (`support::conformance`, tests/conformance_*.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::*;
use tokio_postgres::Client;

// ------------------------------------------------------------------------- crashes

/// Starts outboxd with a failpoint armed, runs `drive`, waits for the abort, restarts
/// without it, and checks that every event of `expected` arrives. Returns the duplicates.
async fn crash_at(
    env: &Env,
    failpoint: &str,
    expected: std::ops::Range<u64>,
    drive: impl AsyncFnOnce(&Client),
) -> u64 {
    let db = env.db().await;
    // Batches of at most 100 events, so that a failpoint armed for its n-th pass gets there
    // however fast the machine drains.
    let mut outboxd = env.run_with(&[
        ("OUTBOXD_FAILPOINT", failpoint),
        ("OUTBOXD_SINK__MAX_BATCH_EVENTS", "100"),
    ]);
    drive(&db).await;
    let status = outboxd.wait(Duration::from_secs(60));
    let log = outboxd.log_text();
    assert!(
        !status.success(),
        "outboxd did not crash at {failpoint}:\n{log}"
    );
    let name = failpoint.split('@').next().unwrap_or(failpoint);
    assert!(log.contains(&format!("failpoint {name} reached")), "{log}");

    let _restarted = env.run();
    let redis = env.redis.connect().await;
    let entries = wait_complete(
        &redis,
        "outbox.order",
        expected.clone(),
        Duration::from_secs(60),
    )
    .await;
    let duplicates = check_complete_and_ordered(&entries, expected);
    println!("crash at {failpoint}: none lost, {duplicates} duplicates");
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_broker_ack_before_the_confirm() {
    let env = Env::start().await;
    let duplicates = crash_at(&env, "after-ack-before-confirm@3", 0..1000, async |db| {
        for i in 0..10 {
            emit_txn(db, i * 100, 100, 4).await;
        }
    })
    .await;
    assert!(
        duplicates > 0,
        "the acknowledged, unconfirmed events must be sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_confirm() {
    let env = Env::start().await;
    crash_at(&env, "after-confirm@2", 0..1000, async |db| {
        for i in 0..10 {
            emit_txn(db, i * 100, 100, 4).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_in_the_middle_of_a_transaction() {
    // A small budget: the transaction's first events are acknowledged while the rest of it
    // is still being read.
    let env = Env::new(
        Postgres::start(),
        "[sink]\nmax_inflight_events = 200\nmax_batch_events = 50\n",
    )
    .await;
    env.setup();
    let duplicates = crash_at(&env, "mid-transaction", 0..5000, async |db| {
        emit_txn(db, 0, 5000, 10).await;
    })
    .await;
    assert!(
        duplicates > 0,
        "the part sent before the crash must be sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_a_reconnect() {
    let env = Env::start().await;
    crash_at(&env, "during-reconnect", 0..400, async |db| {
        emit_txn(db, 0, 200, 4).await;
        wait_slot_active(db).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        db.batch_execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots")
            .await
            .unwrap();
        emit_txn(db, 200, 200, 4).await;
    })
    .await;
}

// ------------------------------------------------------------------------- Postgres side

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_is_survived() {
    let env = Env::start().await;
    let outboxd = env.run();
    let redis = env.redis.connect().await;
    {
        let db = env.db().await;
        wait_slot_active(&db).await;
        write_events(&db, 0, 2000, 100, 10, 7).await;
    }
    // Postgres stops while outboxd streams (some events arrived, maybe not all).
    wait_stream_len(&redis, "outbox.order", 100, Duration::from_secs(30)).await;
    env.pg.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.pg.start_again();
    let db = env.db().await;
    write_events(&db, 2000, 2000, 100, 10, 8).await;
    let entries = wait_complete(&redis, "outbox.order", 0..4000, Duration::from_secs(90)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..4000);
    println!("postgres restart: none lost, {duplicates} duplicates");
    assert!(
        outboxd.log_text().contains("reconnecting"),
        "{}",
        outboxd.log_text()
    );
}

/// Postgres shutting down while the broker is down: its walsender waits for outboxd to confirm
/// what it sent, which outboxd may not do. Without outboxd closing the session, `pg_ctl stop
/// -m fast` waited until its own timeout (then the harness stops it as a crash would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_shutdown_during_a_broker_outage_is_not_held_up_and_loses_nothing() {
    let redis_dir = scratch_dir("redis-aof-shutdown");
    let mut env = Env::with_redis(Postgres::start(), Redis::start_persistent(&redis_dir), "").await;
    env.setup();
    let outboxd = env.run();
    {
        let db = env.db().await;
        wait_slot_active(&db).await;
        emit_txn(&db, 0, 300, 5).await;
        let redis = env.redis.connect().await;
        wait_complete(&redis, "outbox.order", 0..300, Duration::from_secs(30)).await;
        env.redis.stop();
        // Read by outboxd, never acknowledged.
        emit_txn(&db, 300, 300, 5).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopping = Instant::now();
    env.pg.stop();
    let took = stopping.elapsed();
    println!("fast shutdown of Postgres with the broker down: {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "pg_ctl stop -m fast took {took:?}\n{}",
        outboxd.log_text()
    );
    // Logged once the batch being sent has been given up (a few seconds).
    wait_until(
        "outboxd says why it closed the session",
        Duration::from_secs(30),
        || async { outboxd.log_text().contains("Postgres is shutting down") },
    )
    .await;
    env.pg.start_again();
    env.redis.start_again();
    let db = env.db().await;
    emit_txn(&db, 600, 300, 5).await;
    let redis = env.redis.connect().await;
    let entries = wait_complete(&redis, "outbox.order", 0..900, Duration::from_secs(90)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..900);
    println!("shutdown during an outage: none lost, {duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_to_postgres_is_survived() {
    let env = Env::start().await;
    let mut proxy = Proxy::start(env.pg.port);
    let via_proxy = format!(
        "postgres://outboxd:{OUTBOXD_PASSWORD}@127.0.0.1:{}/app",
        proxy.port
    );
    let outboxd = env.run_with(&[("OUTBOXD_POSTGRES__URL", &via_proxy)]);
    let db = env.db().await;
    let redis = env.redis.connect().await;

    emit_txn(&db, 0, 300, 5).await;
    wait_complete(&redis, "outbox.order", 0..300, Duration::from_secs(30)).await;
    proxy.cut();
    // Applications write directly; outboxd cannot reach Postgres for a while.
    emit_txn(&db, 300, 300, 5).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    emit_txn(&db, 600, 300, 5).await;
    let entries = wait_complete(&redis, "outbox.order", 0..900, Duration::from_secs(60)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..900);
    println!("network cut: none lost, {duplicates} duplicates");
    assert!(
        outboxd.log_text().contains("reconnecting"),
        "{}",
        outboxd.log_text()
    );
}

// ------------------------------------------------------------------------- poison events

/// Runs outboxd, lets `poison` create one poison event between good ones, and checks that
/// it reached the dead-letter stream with `reason`, was counted, and that the events after
/// it arrived. (Poison every sink must dead-letter, the rows that cannot be routed and an
/// event the broker refuses, is in the conformance suite; here what is particular to Redis.)
async fn poison_case(
    env: &Env,
    run_env: &[(&str, &str)],
    reason: &str,
    detail: &str,
    poison: impl AsyncFnOnce(&Client),
) -> Entry {
    let _outboxd = env.run_with(run_env);
    let db = env.db().await;
    let admin_redis = env.redis.connect().await;
    emit_txn(&db, 0, 10, 2).await;
    poison(&db).await;
    emit_txn(&db, 10, 10, 2).await;
    wait_complete(&admin_redis, "outbox.order", 0..20, Duration::from_secs(30)).await;
    let dlq = wait_stream_len(&admin_redis, "outboxd.dlq", 1, Duration::from_secs(10)).await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let entry = dlq[0].clone();
    assert_eq!(entry.get("reason"), Some(reason), "{entry:?}");
    assert!(
        entry.get("detail").is_some_and(|d| d.contains(detail)),
        "{entry:?}"
    );
    assert!(
        entry.get("lsn").is_some_and(|l| l.contains('/')),
        "{entry:?}"
    );
    assert!(
        entry.get("id").is_some_and(|id| !id.is_empty()),
        "{entry:?}"
    );
    let port = env.http_port;
    let series = format!("outboxd_events_dead_lettered_total{{reason=\"{reason}\"}}");
    wait_until(
        "the dead letter to be counted",
        Duration::from_secs(10),
        || {
            let series = series.clone();
            async move {
                http_get(port, "/metrics")
                    .await
                    .and_then(|(_, t)| metric(&t, &series))
                    == Some(1.0)
            }
        },
    )
    .await;
    entry
}

/// A stream the Redis user may not write (`NOPERM`) is the broker refusing the stream, not a
/// poison event: nothing after it is forwarded and nothing is dead-lettered (an ACL slip must
/// not send every event to the dead-letter stream and move the slot past them); outboxd says so
/// (ERROR line, `/readyz`, `outboxd_sink_refused`) and goes on once the ACL allows the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_redis_user_may_not_write_stops_forwarding_and_dead_letters_nothing() {
    let env = Env::start().await;
    let mut admin = env.redis.connect().await;
    // A Redis user that may write outbox.order* and the dead-letter stream only.
    let acl = async |admin: &mut redis::aio::MultiplexedConnection, keys: &[&str]| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg(&["SETUSER", "outboxd", "on", ">pw", "resetkeys", "+@all"][..]);
        for k in keys {
            cmd.arg(format!("~{k}"));
        }
        let _: () = cmd.query_async(admin).await.unwrap();
    };
    acl(&mut admin, &["outbox.order*", "outboxd.dlq"]).await;
    let url = format!("redis://outboxd:pw@127.0.0.1:{}", env.redis.port);
    let mut outboxd = env.run_with(&[("OUTBOXD_SINK__REDIS__URL", &url)]);
    let db = env.db().await;
    let port = env.http_port;
    emit_txn(&db, 0, 10, 2).await;
    wait_complete(&admin, "outbox.order", 0..10, Duration::from_secs(30)).await;

    let before = wal_insert_lsn(&db).await;
    db.batch_execute("SELECT outbox_emit('secret', 'k1', 'secret.created', '{\"seq\": 10}')")
        .await
        .unwrap();
    emit_txn(&db, 11, 10, 2).await;
    wait_refusal(port, true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        confirmed_flush(&db, "outboxd").await <= before,
        "the slot passed an event the broker refused"
    );
    assert_eq!(stream_len(&mut admin, "outboxd.dlq").await, 0);
    let order = read_stream(&mut admin, "outbox.order").await;
    assert!(
        order.iter().all(|e| e.seq() < 10),
        "events after the refused one were forwarded: {order:?}"
    );
    let log = outboxd.log_text();
    assert!(
        log.contains("ERROR") && log.contains("refuses the stream") && log.contains("NOPERM"),
        "{log}"
    );
    assert!(outboxd.is_running(), "{log}");

    // The ACL fixed: the refused event and everything after it arrive, nothing dead-lettered.
    acl(&mut admin, &["outbox.*", "outboxd.dlq"]).await;
    let secret = wait_stream_len(&admin, "outbox.secret", 1, Duration::from_secs(60)).await;
    assert_eq!(secret[0].seq(), 10);
    wait_complete(&admin, "outbox.order", 11..21, Duration::from_secs(30)).await;
    wait_refusal(port, false).await;
    assert_eq!(stream_len(&mut admin, "outboxd.dlq").await, 0);
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_a_payload_over_the_size_limit() {
    let env = Env::start().await;
    let entry = poison_case(
        &env,
        &[("OUTBOXD_SINK__REDIS__MAX_EVENT_BYTES", "2048")],
        "too_large",
        "over sink.redis.max_event_bytes = 2048",
        async |db| {
            db.batch_execute(
                "SELECT outbox_emit('order', 'k1', 'order.created', \
                        jsonb_build_object('blob', repeat('x', 5000)))",
            )
            .await
            .unwrap();
        },
    )
    .await;
    assert_eq!(
        entry.get("payload"),
        Some(""),
        "the oversized payload is not copied"
    );
}

// ------------------------------------------------------------------------- bounded memory

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_stays_within_the_memory_bound() {
    const BOUND_KIB: u64 = 64 * 1024;
    let env = Env::start().await;
    let outboxd = env.run();
    let db = env.db().await;
    let mut redis = env.redis.connect().await;
    wait_slot_active(&db).await;
    let (idle, _) = outboxd.rss_kib().unwrap();

    db.batch_execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', 'k' || (g % 100), 'order.created', \
                jsonb_build_object('seq', g, 'pad', repeat('p', 250)) \
         FROM generate_series(0, 999999) AS g",
    )
    .await
    .unwrap();
    let started = Instant::now();
    wait_stream_len(&redis, "outbox.order", 1_000_000, Duration::from_secs(300)).await;
    let (_, peak) = outboxd.rss_kib().unwrap();
    let first = read_range(&mut redis, "outbox.order", "-", "+", 1).await;
    let last = read_range(&mut redis, "outbox.order", "+", "-", 1).await;
    assert_eq!((first[0].seq(), last[0].seq()), (0, 999_999));
    println!(
        "one 1,000,000-row transaction: forwarded in {:.1} s; RSS idle {idle} KiB, peak {peak} KiB (bound {BOUND_KIB} KiB)",
        started.elapsed().as_secs_f64()
    );
    assert!(
        peak <= BOUND_KIB,
        "peak RSS {peak} KiB over the bound {BOUND_KIB} KiB"
    );
}

// ------------------------------------------------------------------------- slot trouble

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_running_stops_outboxd_and_is_not_recreated() {
    let env = Env::start().await;
    let mut outboxd = env.run();
    let db = env.db().await;
    emit_txn(&db, 0, 10, 2).await;
    wait_slot_active(&db).await;
    // Terminate the walsender and drop the slot before outboxd reconnects.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = db
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active",
            )
            .await;
        if db
            .batch_execute("SELECT pg_drop_replication_slot('outboxd')")
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "could not drop the slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = outboxd.wait(Duration::from_secs(30));
    let log = outboxd.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("no longer exists") || log.contains("does not exist"),
        "no clear message:\n{log}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the slot was recreated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_while_running_stops_outboxd_with_what_to_do() {
    let mut env = Env::new(Postgres::start_slot_limited(), "").await;
    env.setup();
    let mut outboxd = env.run();
    let db = env.db().await;
    wait_slot_active(&db).await;
    // Redis goes away, so the slot cannot move; WAL piles up past the limit.
    env.redis.stop();
    emit_txn(&db, 0, 10, 2).await;
    write_wal_until_the_slot_is(&db, "lost").await;
    let status = outboxd.wait(Duration::from_secs(60));
    let log = outboxd.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("was invalidated"), "no clear message:\n{log}");
    assert!(
        log.contains("outboxd slot drop --yes"),
        "does not say what to do:\n{log}"
    );
}

// ------------------------------------------------------------------------- high availability

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_takes_over_within_seconds() {
    let env = Env::start().await;
    let db = env.db().await;
    let mut first = env.run();
    wait_slot_active(&db).await;
    let standby_http = format!("127.0.0.1:{}", free_port());
    let second = env.run_with(&[("OUTBOXD_HTTP__LISTEN", &standby_http)]);
    let redis = env.redis.connect().await;

    let writer_db = env.db().await;
    let writer = tokio::spawn(async move {
        write_events(&writer_db, 0, 20_000, 200, 30, 99).await;
    });
    wait_stream_len(&redis, "outbox.order", 3000, Duration::from_secs(30)).await;
    wait_until(
        "the second instance to stand by",
        Duration::from_secs(20),
        || {
            let log = second.log_text();
            async move { log.contains("standing by") }
        },
    )
    .await;
    first.kill9();
    let killed = Instant::now();
    wait_until(
        "the second instance to stream",
        Duration::from_secs(30),
        || {
            let log = second.log_text();
            async move { log.contains("streaming") }
        },
    )
    .await;
    let takeover = killed.elapsed();
    writer.await.unwrap();
    let entries = wait_complete(&redis, "outbox.order", 0..20_000, Duration::from_secs(120)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..20_000);
    println!(
        "takeover: the standby streamed {:.1} s after the first instance was killed; none lost, {duplicates} duplicates",
        takeover.as_secs_f64()
    );
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
}

/// Five minutes without Redis under load (the conformance suite's outage lasts 20 s): in
/// every run of the suite, the longest test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_minute_redis_outage_under_load_stays_within_the_memory_bound() {
    const BOUND_KIB: u64 = 64 * 1024;
    let pg = Postgres::start();
    let redis_dir = scratch_dir("redis-aof-long");
    let mut env = Env::with_redis(pg, Redis::start_persistent(&redis_dir), "").await;
    env.setup();
    let outboxd = env.run();
    // Load: 500 events a second, in transactions of 1 to 50, 15 s before the outage and
    // throughout it.
    let load = Load::start(env.db().await, 500, 50, 50, 0x5_0000);
    tokio::time::sleep(Duration::from_secs(15)).await;
    env.redis.stop();
    let outage = Instant::now();
    let mut samples = Vec::new();
    while outage.elapsed() < Duration::from_secs(300) {
        samples.push(outboxd.rss_kib().unwrap().0);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    env.redis.start_again();
    let redis = env.redis.connect().await;
    let written = load.stop().await;
    let entries = wait_complete(&redis, "outbox.order", 0..written, Duration::from_secs(600)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..written);
    let (_, peak) = outboxd.rss_kib().unwrap();
    let minute = |m: usize| {
        samples[m * 60..(m + 1) * 60]
            .iter()
            .max()
            .copied()
            .unwrap_or(0)
    };
    println!(
        "5-minute Redis outage under 500 events/s ({written} events): none lost, {duplicates} duplicates; RSS max per minute of the outage {:?} KiB; peak {peak} KiB (bound {BOUND_KIB} KiB)",
        (0..5).map(minute).collect::<Vec<_>>()
    );
    assert!(peak <= BOUND_KIB, "peak RSS {peak} KiB over the bound");
    assert!(
        minute(4) <= minute(0) + 8 * 1024,
        "memory grew during the outage"
    );
}

/// Rows of 1 MB while Redis is down for 60 s: the in-flight budget (16 MiB by default) and the
/// replication read-ahead (as many 1 MiB rows as the budget holds) bound outboxd's memory;
/// every event arrives once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_megabyte_rows_through_a_60_s_outage_stay_within_the_memory_bound() {
    // The documented bounds for the default budget (docs/guarantees.md, 8): during the outage
    // 40 MiB of its own, the budget, the read-ahead, and the batch being retried encoded for
    // Redis; catching up, twice the budget more (a batch encoded while the next one is read).
    const OUTAGE_BOUND_KIB: u64 = (40 + 16 + 16 + 16) * 1024;
    const BOUND_KIB: u64 = 128 * 1024;
    let pg = Postgres::start();
    let redis_dir = scratch_dir("redis-aof-big-rows");
    let mut env = Env::with_redis(pg, Redis::start_persistent(&redis_dir), "").await;
    env.setup();
    let outboxd = env.run();
    let db = env.db().await;
    wait_slot_active(&db).await;
    env.redis.stop();
    let outage = Instant::now();
    let emit = |first: u64, count: u64| {
        let sql = format!(
            "SELECT outbox_emit('order', 'k' || (g % 4), 'order.created', \
                    jsonb_build_object('seq', g, 'pad', repeat('x', 1000000))) \
             FROM generate_series({first}, {}) AS g",
            first + count - 1
        );
        sql
    };
    // 150 MB of rows, ten at a time, during the outage.
    for t in 0..15 {
        db.batch_execute(&emit(t * 10, 10)).await.unwrap();
    }
    let mut peak_during = 0;
    while outage.elapsed() < Duration::from_secs(60) {
        peak_during = peak_during.max(outboxd.rss_kib().unwrap().0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    env.redis.start_again();
    let redis = env.redis.connect().await;
    let entries = wait_complete(&redis, "outbox.order", 0..150, Duration::from_secs(120)).await;
    assert_eq!(check_complete_and_ordered(&entries, 0..150), 0);
    let (_, peak) = outboxd.rss_kib().unwrap();
    println!(
        "1 MB rows through a 60 s Redis outage: 150 events, none lost; RSS at most {peak_during} KiB during the outage (bound {OUTAGE_BOUND_KIB} KiB), peak {peak} KiB (bound {BOUND_KIB} KiB)"
    );
    assert!(
        peak_during <= OUTAGE_BOUND_KIB,
        "RSS {peak_during} KiB during the outage, over the bound"
    );
    assert!(peak <= BOUND_KIB, "peak RSS {peak} KiB over the bound");
}

// ------------------------------------------------------------------------------ shutdown

/// SIGTERM under load while the broker hangs (Redis SIGSTOPped: it takes the connection and
/// answers nothing). Once: outboxd gives up the drain and exits 0 within Kubernetes' default
/// 30 s grace period. Twice: the second signal exits at once (code 130). Either way nothing is
/// confirmed past what Redis acknowledged before it hung, and the next start delivers every
/// event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_hung_broker_exits_within_30_s_and_a_second_signal_at_once() {
    for twice in [false, true] {
        let env = Env::start().await;
        let mut outboxd = env.run();
        let db = env.db().await;
        let redis = env.redis.connect().await;
        emit_txn(&db, 0, 100, 4).await;
        wait_complete(&redis, "outbox.order", 0..100, Duration::from_secs(30)).await;

        env.redis.signal("STOP");
        let hung_at = wal_insert_lsn(&db).await;
        write_events(&db, 100, 2000, 50, 4, 0x5157).await;
        let port = env.http_port;
        wait_until("events in flight", Duration::from_secs(30), || async move {
            metric_value(port, "outboxd_inflight_events")
                .await
                .is_some_and(|n| n > 0.0)
        })
        .await;

        let asked = Instant::now();
        outboxd.sigterm();
        let (status, took) = if twice {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let again = Instant::now();
            outboxd.sigterm();
            let status = outboxd.wait(Duration::from_secs(10));
            (status, again.elapsed())
        } else {
            let status = outboxd.wait(Duration::from_secs(40));
            (status, asked.elapsed())
        };
        let log = outboxd.log_text();
        if twice {
            assert_eq!(status.code(), Some(130), "{log}");
            assert!(
                took < Duration::from_secs(1),
                "{took:?} after the second SIGTERM\n{log}"
            );
            assert!(log.contains("second stop signal"), "{log}");
        } else {
            assert!(status.success(), "{log}");
            assert!(
                took < Duration::from_secs(30),
                "{took:?} after SIGTERM\n{log}"
            );
        }
        assert!(
            confirmed_flush(&db, "outboxd").await <= hung_at,
            "confirmed past what Redis acknowledged\n{log}"
        );
        println!(
            "a hung broker, {}: exited {:.1} s after the {} SIGTERM",
            if twice {
                "SIGTERM twice"
            } else {
                "SIGTERM once"
            },
            took.as_secs_f64(),
            if twice { "second" } else { "first" }
        );

        env.redis.signal("CONT");
        let _again = env.run();
        wait_complete(&redis, "outbox.order", 0..2100, Duration::from_secs(60)).await;
    }
}
