//! Every guarantee of docs/guarantees.md, tested by breaking something on purpose: crashes at random and
//! at chosen points, Postgres restarts and network cuts, broker outages under load, poison
//! events, a million-row transaction, a dropped or invalidated slot, a second instance taking
//! over. Real Postgres, real Redis, the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use support::proxy::Proxy;
use support::*;
use tokio_postgres::Client;

const SLOT: &str = "outboxd";

/// A small deterministic pseudo-random sequence (xorshift), so failures can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Emits `total` events from `first` in transactions of 1 to `max_txn` rows.
async fn write_events(db: &Client, first: u64, total: u64, max_txn: u64, keys: u64, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut seq = first;
    while seq < first + total {
        let n = (1 + rng.below(max_txn)).min(first + total - seq);
        emit_txn(db, seq, n, keys).await;
        seq += n;
    }
}

/// Waits until every seq of `expected` is in `stream`; returns the entries.
async fn wait_all(
    redis: &mut MultiplexedConnection,
    stream: &str,
    expected: std::ops::Range<u64>,
    timeout: Duration,
) -> Vec<Entry> {
    let deadline = Instant::now() + timeout;
    let want = expected.end - expected.start;
    loop {
        if stream_len(redis, stream).await >= want {
            let entries = read_stream(redis, stream).await;
            let mut seqs: Vec<u64> = entries
                .iter()
                .map(Entry::seq)
                .filter(|s| expected.contains(s))
                .collect();
            seqs.sort_unstable();
            seqs.dedup();
            if seqs.len() as u64 == want {
                return entries;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not every event of {expected:?} reached {stream} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for the process to end; returns its log.
fn wait_exit(outboxd: &mut Outboxd, timeout: Duration) -> (std::process::ExitStatus, String) {
    let status = outboxd.wait(timeout);
    (status, outboxd.log_text())
}

// ------------------------------------------------------------------------- crashes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_50000_events_with_sigkill_at_random_moments() {
    const MAX_INFLIGHT: u64 = 2000;
    const MAX_BATCH: u64 = 500;
    const MAX_TXN: u64 = 300;
    const STATUS_INTERVAL_MS: u64 = 100;
    const RATE: u64 = 2000; // events per second
    let env = Env::new(
        Postgres::start(),
        &format!("[sink]\nmax_inflight_events = {MAX_INFLIGHT}\nmax_batch_events = {MAX_BATCH}\n"),
    )
    .await;
    env.setup();
    let mut redis = env.redis.connect().await;
    let writer_db = env.db().await;
    // 50,000 events over about 25 s, so that every crash happens while applications write.
    let writer = tokio::spawn(async move {
        let started = Instant::now();
        for chunk in 0..100u64 {
            write_events(&writer_db, chunk * 500, 500, MAX_TXN, 100, 0x5eed + chunk).await;
            let due = started + Duration::from_millis((chunk + 1) * 500 * 1000 / RATE);
            tokio::time::sleep_until(due.into()).await;
        }
    });
    let status_interval = STATUS_INTERVAL_MS.to_string();

    let mut rng = Rng(0xc0ffee);
    let mut kills: u32 = 0;
    while kills < 6 {
        let mut outboxd =
            env.run_with(&[("OUTBOXD_POSTGRES__STATUS_INTERVAL_MS", &status_interval)]);
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(2500))).await;
        outboxd.kill9();
        kills += 1;
    }
    let writer_done = writer.is_finished();
    let _last = env.run();
    writer.await.unwrap();
    let entries = wait_all(
        &mut redis,
        "outbox.order",
        0..50_000,
        Duration::from_secs(240),
    )
    .await;
    let duplicates = check_complete_and_ordered(&entries, 0..50_000);
    // What may repeat after a crash: the events in flight (the budget and the batch being
    // sent), the part of a transaction sent before its commit, and what was acknowledged
    // within the last status interval, before Postgres was told.
    let per_crash = MAX_INFLIGHT + MAX_BATCH + MAX_TXN + RATE * STATUS_INTERVAL_MS / 1000;
    println!(
        "crash loop: 50,000 events, {kills} SIGKILLs (writer still writing at the last: {}), none lost, {duplicates} duplicates ({:.0} per crash; bound per crash {per_crash} = in-flight limit {MAX_INFLIGHT} + batch {MAX_BATCH} + transaction {MAX_TXN} + one status interval)",
        !writer_done,
        duplicates as f64 / f64::from(kills)
    );
    assert!(
        !writer_done,
        "the crashes must happen while events are written"
    );
    assert!(
        duplicates <= u64::from(kills) * per_crash,
        "{duplicates} duplicates for {kills} crashes: more than in flight could explain"
    );
}

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
    let (status, log) = wait_exit(&mut outboxd, Duration::from_secs(60));
    assert!(
        !status.success(),
        "outboxd did not crash at {failpoint}:\n{log}"
    );
    let name = failpoint.split('@').next().unwrap_or(failpoint);
    assert!(log.contains(&format!("failpoint {name} reached")), "{log}");

    let _restarted = env.run();
    let mut redis = env.redis.connect().await;
    let entries = wait_all(
        &mut redis,
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
    let mut redis = env.redis.connect().await;
    {
        let db = env.db().await;
        wait_slot_active(&db).await;
        write_events(&db, 0, 2000, 100, 10, 7).await;
    }
    // Postgres stops while outboxd streams (some events arrived, maybe not all).
    wait_until("the first events", Duration::from_secs(30), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 100 }
    })
    .await;
    env.pg.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.pg.start_again();
    let db = env.db().await;
    write_events(&db, 2000, 2000, 100, 10, 8).await;
    let entries = wait_all(&mut redis, "outbox.order", 0..4000, Duration::from_secs(90)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..4000);
    println!("postgres restart: none lost, {duplicates} duplicates");
    assert!(
        outboxd.log_text().contains("reconnecting"),
        "{}",
        outboxd.log_text()
    );
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
    let mut redis = env.redis.connect().await;

    emit_txn(&db, 0, 300, 5).await;
    wait_all(&mut redis, "outbox.order", 0..300, Duration::from_secs(30)).await;
    proxy.cut();
    // Applications write directly; outboxd cannot reach Postgres for a while.
    emit_txn(&db, 300, 300, 5).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    emit_txn(&db, 600, 300, 5).await;
    let entries = wait_all(&mut redis, "outbox.order", 0..900, Duration::from_secs(60)).await;
    let duplicates = check_complete_and_ordered(&entries, 0..900);
    println!("network cut: none lost, {duplicates} duplicates");
    assert!(
        outboxd.log_text().contains("reconnecting"),
        "{}",
        outboxd.log_text()
    );
}

// ------------------------------------------------------------------------- broker side

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_second_redis_outage_under_load_loses_nothing_and_memory_stays_flat() {
    let pg = Postgres::start();
    let redis_dir = scratch_dir("redis-aof");
    let redis_server = Redis::start_persistent(&redis_dir);
    let mut env = Env::with_redis(pg, redis_server, "").await;
    env.setup();
    let outboxd = env.run();
    let db = env.db().await;

    // Load: 1,000 events a second for 40 s, in transactions of 50.
    let writer_db = env.db().await;
    let writer = tokio::spawn(async move {
        let started = Instant::now();
        for i in 0..800u64 {
            emit_txn(&writer_db, i * 50, 50, 20).await;
            let due = started + Duration::from_millis(50 * (i + 1));
            tokio::time::sleep_until(due.into()).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = outboxd.rss_kib().unwrap();
    env.redis.stop();
    // Every commit from here on ends after this position; reaching it exactly is right when
    // everything before was acknowledged and a keepalive confirmed the WAL's end.
    let first_unacked = wal_insert_lsn(&db).await;
    let outage = Instant::now();
    let mut rss_early = 0;
    let mut rss_late = 0;
    while outage.elapsed() < Duration::from_secs(30) {
        let confirmed = confirmed_flush(&db, SLOT).await;
        assert!(
            confirmed <= first_unacked,
            "the slot moved to {confirmed:X}, past events Redis never acknowledged ({first_unacked:X})"
        );
        let (rss, _) = outboxd.rss_kib().unwrap();
        if outage.elapsed() < Duration::from_secs(10) {
            rss_early = rss_early.max(rss);
        } else {
            rss_late = rss_late.max(rss);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    env.redis.start_again();
    let mut redis = env.redis.connect().await;
    writer.await.unwrap();
    let entries = wait_all(
        &mut redis,
        "outbox.order",
        0..40_000,
        Duration::from_secs(120),
    )
    .await;
    let duplicates = check_complete_and_ordered(&entries, 0..40_000);
    println!(
        "30 s Redis outage under 1,000 events/s: none lost, {duplicates} duplicates; RSS before {} KiB, first 10 s of the outage {} KiB, last 20 s {} KiB",
        before.0, rss_early, rss_late
    );
    assert!(
        rss_late <= rss_early + 8 * 1024,
        "memory grew during the outage: {rss_early} KiB then {rss_late} KiB"
    );
}

// ------------------------------------------------------------------------- poison events

/// Runs outboxd, lets `poison` create one poison event between good ones, and checks that
/// it reached the dead-letter stream with `reason`, was counted, and that the events after
/// it arrived.
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
    let mut r = admin_redis.clone();
    wait_all(&mut r, "outbox.order", 0..20, Duration::from_secs(30)).await;
    wait_until("the dead letter", Duration::from_secs(10), || {
        let mut r = admin_redis.clone();
        async move { stream_len(&mut r, "outboxd.dlq").await >= 1 }
    })
    .await;
    let dlq = read_stream(&mut r, "outboxd.dlq").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_a_null_routed_field() {
    let env = Env::start().await;
    env.db()
        .await
        .batch_execute("ALTER TABLE outbox ALTER COLUMN aggregate_id DROP NOT NULL")
        .await
        .unwrap();
    let entry = poison_case(&env, &[], "null_field", "aggregate_id", async |db| {
        db.batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('order', NULL, 'order.created', '{\"poison\": true}')",
        )
        .await
        .unwrap();
    })
    .await;
    assert_eq!(entry.get("payload"), Some("{\"poison\": true}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_an_empty_routed_field() {
    let env = Env::start().await;
    poison_case(&env, &[], "empty_field", "key", async |db| {
        db.batch_execute("SELECT outbox_emit('order', '', 'order.created', '{}')")
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_headers_that_are_not_an_object() {
    let env = Env::start().await;
    env.db()
        .await
        .batch_execute("ALTER TABLE outbox DROP CONSTRAINT outbox_headers_is_object")
        .await
        .unwrap();
    let entry = poison_case(
        &env,
        &[],
        "invalid_headers",
        "not a JSON object",
        async |db| {
            db.batch_execute("SELECT outbox_emit('order', 'k1', 'order.created', '{}', '[1, 2]')")
                .await
                .unwrap();
        },
    )
    .await;
    assert_eq!(entry.get("headers"), Some("[1, 2]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_a_stream_redis_refuses_as_the_wrong_type() {
    let env = Env::start().await;
    let mut admin = env.redis.connect().await;
    let _: () = redis::cmd("SET")
        .arg("outbox.blocked")
        .arg("not a stream")
        .query_async(&mut admin)
        .await
        .unwrap();
    let entry = poison_case(&env, &[], "rejected", "WRONGTYPE", async |db| {
        db.batch_execute("SELECT outbox_emit('blocked', 'k1', 'blocked.created', '{}')")
            .await
            .unwrap();
    })
    .await;
    assert_eq!(entry.get("topic"), Some("outbox.blocked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_a_stream_the_redis_user_may_not_write() {
    let env = Env::start().await;
    let mut admin = env.redis.connect().await;
    // A Redis user that may write outbox.order* and the dead-letter stream only.
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "outboxd",
                "on",
                ">pw",
                "~outbox.order*",
                "~outboxd.dlq",
                "+@all",
            ][..],
        )
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://outboxd:pw@127.0.0.1:{}", env.redis.port);
    let entry = poison_case(
        &env,
        &[("OUTBOXD_SINK__REDIS__URL", &url)],
        "rejected",
        "NOPERM",
        async |db| {
            db.batch_execute("SELECT outbox_emit('secret', 'k1', 'secret.created', '{}')")
                .await
                .unwrap();
        },
    )
    .await;
    assert_eq!(entry.get("topic"), Some("outbox.secret"));
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
    let deadline = started + Duration::from_secs(300);
    while stream_len(&mut redis, "outbox.order").await < 1_000_000 {
        assert!(
            Instant::now() < deadline,
            "the transaction did not arrive in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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

/// `count` entries from `start` towards `end` (XRANGE, or XREVRANGE when `start` is `+`).
async fn read_range(
    redis: &mut MultiplexedConnection,
    stream: &str,
    start: &str,
    end: &str,
    count: usize,
) -> Vec<Entry> {
    let command = if start == "+" { "XREVRANGE" } else { "XRANGE" };
    let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd(command)
        .arg(stream)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query_async(redis)
        .await
        .unwrap();
    reply
        .into_iter()
        .map(|(entry_id, flat)| Entry {
            entry_id,
            fields: flat
                .chunks(2)
                .map(|kv| {
                    (
                        String::from_utf8_lossy(&kv[0]).into_owned(),
                        String::from_utf8_lossy(&kv[1]).into_owned(),
                    )
                })
                .collect(),
        })
        .collect()
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
    let (status, log) = wait_exit(&mut outboxd, Duration::from_secs(30));
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
    let mut env = Env::new(
        Postgres::start_with(&[
            "wal_level = logical",
            "max_slot_wal_keep_size = 1MB",
            "max_wal_size = 32MB",
            "min_wal_size = 32MB",
        ]),
        "",
    )
    .await;
    env.setup();
    let mut outboxd = env.run();
    let db = env.db().await;
    wait_slot_active(&db).await;
    // Redis goes away, so the slot cannot move; WAL piles up past the limit.
    env.redis.stop();
    emit_txn(&db, 0, 10, 2).await;
    db.batch_execute("CREATE TABLE filler (pad text)")
        .await
        .unwrap();
    wait_until("the slot to be invalidated", Duration::from_secs(60), || {
        let db = &db;
        async move {
            let _ = db
                .batch_execute(
                    "INSERT INTO filler SELECT repeat(md5(g::text), 60) FROM generate_series(1, 3000) g; \
                     SELECT pg_switch_wal(); CHECKPOINT;",
                )
                .await;
            db.query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outboxd'", &[])
                .await
                .ok()
                .and_then(|r| r.get::<_, Option<String>>(0))
                .as_deref()
                == Some("lost")
        }
    })
    .await;
    let (status, log) = wait_exit(&mut outboxd, Duration::from_secs(60));
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
    let mut redis = env.redis.connect().await;

    let writer_db = env.db().await;
    let writer = tokio::spawn(async move {
        write_events(&writer_db, 0, 20_000, 200, 30, 99).await;
    });
    wait_until("some events", Duration::from_secs(30), || {
        let mut r = redis.clone();
        async move { stream_len(&mut r, "outbox.order").await >= 3000 }
    })
    .await;
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
    let entries = wait_all(
        &mut redis,
        "outbox.order",
        0..20_000,
        Duration::from_secs(120),
    )
    .await;
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

/// Five minutes: not in the default run. `scripts/test.sh --long` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_minute_redis_outage_under_load_stays_within_the_memory_bound() {
    const BOUND_KIB: u64 = 64 * 1024;
    let pg = Postgres::start();
    let redis_dir = scratch_dir("redis-aof-long");
    let mut env = Env::with_redis(pg, Redis::start_persistent(&redis_dir), "").await;
    env.setup();
    let outboxd = env.run();
    // Load: 500 events a second for 5.5 minutes, in transactions of 25.
    let writer_db = env.db().await;
    let writer = tokio::spawn(async move {
        let started = Instant::now();
        for i in 0..6600u64 {
            emit_txn(&writer_db, i * 25, 25, 50).await;
            let due = started + Duration::from_millis(50 * (i + 1));
            tokio::time::sleep_until(due.into()).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(15)).await;
    env.redis.stop();
    let outage = Instant::now();
    let mut samples = Vec::new();
    while outage.elapsed() < Duration::from_secs(300) {
        samples.push(outboxd.rss_kib().unwrap().0);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    env.redis.start_again();
    let mut redis = env.redis.connect().await;
    writer.await.unwrap();
    let entries = wait_all(
        &mut redis,
        "outbox.order",
        0..165_000,
        Duration::from_secs(600),
    )
    .await;
    let duplicates = check_complete_and_ordered(&entries, 0..165_000);
    let (_, peak) = outboxd.rss_kib().unwrap();
    let minute = |m: usize| {
        samples[m * 60..(m + 1) * 60]
            .iter()
            .max()
            .copied()
            .unwrap_or(0)
    };
    println!(
        "5-minute Redis outage under 500 events/s: none lost, {duplicates} duplicates; RSS max per minute of the outage {:?} KiB; peak {peak} KiB (bound {BOUND_KIB} KiB)",
        (0..5).map(minute).collect::<Vec<_>>()
    );
    assert!(peak <= BOUND_KIB, "peak RSS {peak} KiB over the bound");
    assert!(
        minute(4) <= minute(0) + 8 * 1024,
        "memory grew during the outage"
    );
}
