//! The scenarios every sink runs (see [`super`]). Each takes the broker a test started, sets
//! up its own Postgres and outboxd, and asserts exactly.
//!
//! Sizes are chosen to prove the point on a loaded two-core machine: a few thousand events,
//! a 20-second outage, five kills.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{
    Arrived, BrokerUnderTest, DEAD_LETTER, Delivery, Refusal, SLOT, TOPIC, assert_rows_carried,
    settle, start_env, wait_arrived, wait_count,
};
use crate::support::{
    Delivered, Load, Outboxd, Rng, SinkEnv, assert_each_once, check_complete_and_ordered,
    confirmed_flush, emit_txn, metric_value, output_text, wait_slot_active, wait_until,
    wal_insert_lsn, write_events,
};

/// How long a wait for events may take: long for a loaded machine, still a bound.
const ARRIVAL: Duration = Duration::from_secs(120);

/// The seq of the event committed first while the broker is down (beyond any other).
const MARKER: u64 = 1 << 40;

/// 5,000 events in transactions of 1 to 200, 50 keys, written while outboxd streams: each
/// arrives once (no failure, so no duplicate), the first of each key in commit order and
/// each key in one shard, each with its row's id, type and headers.
pub async fn per_key_order_under_load<B: BrokerUnderTest>(broker: B) {
    const EVENTS: u64 = 5000;
    const KEYS: u64 = 50;
    let env = start_env(&broker, Delivery::AtLeastOnce, "max_batch_events = 200").await;
    let mut outboxd = env.run();
    let db = env.db().await;
    wait_slot_active(&db).await;
    let started = Instant::now();
    write_events(&db, 0, EVENTS, 200, KEYS, 0x0de7).await;
    let (arrived, all) = settle(&broker, &db, EVENTS, KEYS, ARRIVAL).await;
    let elapsed = started.elapsed();
    assert_each_once(&arrived, all.clone());
    assert_rows_carried(&db, &arrived).await;
    assert!(outboxd.is_running(), "{}", outboxd.log_text());
    let shards: std::collections::HashSet<Option<i32>> =
        arrived.iter().map(Delivered::shard).collect();
    println!(
        "{}: {} events, {KEYS} keys in {} shard(s), read back complete, once each and in order per key {:.1} s after the first commit",
        B::KIND,
        all.end,
        shards.len(),
        elapsed.as_secs_f64()
    );
}

/// The broker down for 20 s while applications commit 500 events a second: commits go on,
/// the slot's `confirmed_flush_lsn` never passes an event the broker did not acknowledge,
/// outboxd's memory stays flat, and once the broker is back every event arrives, in order
/// per key, with at most one in-flight window of duplicates.
pub async fn outage_under_load<B: BrokerUnderTest>(mut broker: B) {
    const RATE: u64 = 500;
    const KEYS: u64 = 20;
    const OUTAGE: Duration = Duration::from_secs(20);
    const MAX_INFLIGHT: u64 = 2000;
    const MAX_BATCH: u64 = 200;
    let env = start_env(
        &broker,
        Delivery::AtLeastOnce,
        &format!("max_inflight_events = {MAX_INFLIGHT}\nmax_batch_events = {MAX_BATCH}"),
    )
    .await;
    let mut outboxd = env.run();
    let mut db = env.db().await;
    let load = Load::start(env.db().await, RATE, 50, KEYS, 0x0a7a9e);
    wait_count(&broker, TOPIC, 500, ARRIVAL).await;
    let (rss_before, _) = outboxd.rss_kib().expect("outboxd runs");

    broker.down().await;
    let written_at_down = load.written();
    let first_unacked = commit_marker(&mut db).await;
    let (rss_early, rss_late) = hold_down::<B>(&db, &outboxd, first_unacked, OUTAGE).await;
    let written_during = load.written() - written_at_down;
    assert!(
        outboxd.is_running(),
        "outboxd gave up during the outage:\n{}",
        outboxd.log_text()
    );
    broker.up().await;
    let up_at = Instant::now();
    let written = load.stop().await;
    let (arrived, all) = settle(&broker, &db, written, KEYS, ARRIVAL).await;
    let caught_up = up_at.elapsed();
    let duplicates = check_complete_and_ordered(&arrived, all.clone().chain([MARKER]));
    println!(
        "{}: down {:.0} s under {RATE} events/s ({written_during} committed meanwhile): all {} arrived {:.1} s after it came back, in order per key; {duplicates} duplicates; RSS before {rss_before} KiB, first third of the outage {rss_early} KiB, rest {rss_late} KiB",
        B::KIND,
        OUTAGE.as_secs_f64(),
        all.end,
        caught_up.as_secs_f64()
    );
    assert!(
        written_during >= RATE * OUTAGE.as_secs() / 2,
        "commits were held up by the outage: {written_during} events in {OUTAGE:?}"
    );
    assert!(
        duplicates <= MAX_INFLIGHT + MAX_BATCH,
        "{duplicates} duplicates: more than one in-flight window"
    );
    assert!(
        rss_late <= rss_early + 8 * 1024,
        "memory grew during the outage: {rss_early} KiB then {rss_late} KiB"
    );
    let log = outboxd.log_text();
    assert!(
        log.contains("broker unavailable") && log.contains("broker is back"),
        "no log lines about the outage and the recovery:\n{log}"
    );
    // And the slot catches up once everything is acknowledged.
    let last = wal_insert_lsn(&db).await;
    wait_until(
        "the slot to confirm the backlog",
        Duration::from_secs(30),
        || {
            let db = &db;
            async move { confirmed_flush(db, SLOT).await >= last - 1 }
        },
    )
    .await;
}

/// Commits the event [`MARKER`] (under a key of its own) and returns the WAL position just
/// before its commit. With the broker down, this transaction cannot be acknowledged: the slot
/// may reach that position (when everything before was acknowledged and a keepalive confirmed
/// the WAL's end), never pass it.
async fn commit_marker(db: &mut Client) -> u64 {
    let tx = db.transaction().await.expect("begin");
    tx.execute(
        "SELECT outbox_emit('order', 'marker', 'order.created', \
                jsonb_build_object('seq', $1::bigint), '{\"source\": \"test\"}')",
        &[&(MARKER as i64)],
    )
    .await
    .expect("emit the marker");
    let lsn: i64 = tx
        .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
        .await
        .expect("read the WAL position")
        .get(0);
    tx.commit().await.expect("commit");
    lsn as u64
}

/// For [`outage_under_load`], while the broker is down and other tables write (so that
/// keepalives with later WAL positions keep coming): checks twice a second that the slot stays
/// at or below `first_unacked`, and samples outboxd's memory; returns its peak in the first
/// third of the outage and in the rest, in KiB.
async fn hold_down<B: BrokerUnderTest>(
    db: &Client,
    outboxd: &Outboxd,
    first_unacked: u64,
    outage: Duration,
) -> (u64, u64) {
    let started = Instant::now();
    db.batch_execute("CREATE TABLE noise (id serial, pad text)")
        .await
        .expect("create noise");
    let (mut early, mut late) = (0, 0);
    while started.elapsed() < outage {
        db.batch_execute(
            "INSERT INTO noise (pad) SELECT repeat('n', 500) FROM generate_series(1, 100)",
        )
        .await
        .expect("write noise");
        let confirmed = confirmed_flush(db, SLOT).await;
        assert!(
            confirmed <= first_unacked,
            "the slot moved to {confirmed:X}, past events {} never acknowledged ({first_unacked:X})",
            B::KIND
        );
        let (rss, _) = outboxd.rss_kib().expect("outboxd runs");
        if started.elapsed() < outage / 3 {
            early = early.max(rss);
        } else {
            late = late.max(rss);
        }
        // The pace of the samples, not a wait for something.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (early, late)
}

/// Poison in one transaction between good events: rows that cannot be routed (a NULL key,
/// an empty key, headers that are not a JSON object) and, where the broker can be made to,
/// an event the broker itself refuses. Each goes to the dead letter with its reason, its
/// context and (for a routing failure) its payload, is counted by reason, and every other
/// event arrives once, also the later ones. In effectively-once mode (where the sink has it)
/// the same, through the sink's transactional path.
pub async fn poison<B: BrokerUnderTest>(broker: B, delivery: Delivery) {
    if delivery == Delivery::EffectivelyOnce && !B::EFFECTIVELY_ONCE {
        println!("{}: no effectively-once mode, nothing to test", B::KIND);
        return;
    }
    let env = start_env(&broker, delivery, "").await;
    let mut db = env.db().await;
    db.batch_execute(
        "ALTER TABLE outbox ALTER COLUMN aggregate_id DROP NOT NULL; \
         ALTER TABLE outbox DROP CONSTRAINT outbox_headers_is_object",
    )
    .await
    .expect("loosen the outbox table");
    let refusal = broker.refuse("outbox.refused").await;
    let mut outboxd = env.run();
    emit_txn(&db, 0, 10, 2).await;
    let poison = poison_rows(refusal.as_ref());
    // One transaction: a good event before each poison one and after the last.
    let tx = db.transaction().await.expect("begin");
    let mut seq = 10;
    for p in &poison {
        emit_txn(&tx, seq, 1, 2).await;
        seq += 1;
        tx.batch_execute(&p.sql).await.expect("poison");
    }
    emit_txn(&tx, seq, 1, 2).await;
    tx.commit().await.expect("commit");
    emit_txn(&db, seq + 1, 10, 2).await;

    let (arrived, all) = settle(&broker, &db, seq + 11, 2, ARRIVAL).await;
    assert_each_once(&arrived, all);
    assert_rows_carried(&db, &arrived).await;
    wait_count(&broker, DEAD_LETTER, poison.len(), ARRIVAL).await;
    let dead = broker.read(DEAD_LETTER).await;
    assert_eq!(
        dead.len(),
        poison.len(),
        "each poison event once: {dead:#?}"
    );
    for Poison { reason, detail, .. } in &poison {
        let letter = dead_letter(&dead, reason);
        assert!(
            letter.header("detail").is_some_and(|d| d.contains(detail)),
            "the detail says {detail:?}: {letter:#?}"
        );
        assert!(
            letter.header("lsn").is_some_and(|l| l.contains('/')),
            "{letter:#?}"
        );
        assert!(
            letter.header("id").is_some_and(|id| !id.is_empty()),
            "{letter:#?}"
        );
        let series = format!("outboxd_events_dead_lettered_total{{reason=\"{reason}\"}}");
        let port = env.http_port;
        wait_until(&series, Duration::from_secs(20), || {
            let series = series.clone();
            async move { metric_value(port, &series).await == Some(1.0) }
        })
        .await;
    }
    assert_eq!(
        dead_letter(&dead, "null_field").payload,
        "{\"poison\": \"null key\"}",
        "the payload is kept"
    );
    if let Some(r) = &refusal {
        assert_eq!(
            dead_letter(&dead, r.reason).header("topic"),
            Some("outbox.refused")
        );
    }
    let log = outboxd.log_text();
    assert!(log.contains("event dead-lettered"), "{log}");
    assert!(outboxd.is_running(), "{log}");
    println!(
        "{} ({}): {} poison events dead-lettered once each with their reasons ({}), {} good events around them once each",
        B::KIND,
        delivery.as_str(),
        poison.len(),
        poison
            .iter()
            .map(|p| p.reason)
            .collect::<Vec<_>>()
            .join(", "),
        arrived.len()
    );
}

/// A 2 MB event, over the broker's limit (about 1 MB by default): its dead letter goes
/// without the payload and says where the event is kept; the whole event is in
/// `outboxd.dead_letters`; `prune` keeps its row while deleting the others; the events around
/// it flow.
pub async fn too_large_event_is_kept_whole<B: BrokerUnderTest>(broker: B) {
    let env =
        super::start_env_with(broker.limited_section(), B::KIND, Delivery::AtLeastOnce, "").await;
    let db = env.db().await;
    db.batch_execute("GRANT DELETE ON outbox TO outboxd")
        .await
        .expect("grant delete");
    let mut outboxd = env.run();
    emit_txn(&db, 0, 5, 2).await;
    let big: String = db
        .query_one(
            "SELECT outbox_emit('order', 'k0', 'order.created', \
                    jsonb_build_object('seq', 1000000, 'pad', repeat('x', 2000000)))::text",
            &[],
        )
        .await
        .expect("emit a 2 MB event")
        .get(0);
    emit_txn(&db, 5, 5, 2).await;
    let (arrived, _) = settle(&broker, &db, 10, 2, ARRIVAL).await;
    assert!(arrived.iter().all(|a| a.seq() != 1_000_000));
    wait_count(&broker, DEAD_LETTER, 1, ARRIVAL).await;
    let dead = broker.read(DEAD_LETTER).await;
    let letter = dead_letter(&dead, "too_large");
    assert_eq!(letter.header("id"), Some(big.as_str()), "{letter:#?}");
    assert!(
        letter.payload.is_empty(),
        "the dead letter fits: {} bytes",
        letter.payload.len()
    );
    assert!(
        letter
            .header("detail")
            .is_some_and(|d| d.contains("outboxd.dead_letters")),
        "{letter:#?}"
    );
    // Kept before the slot may pass it (the dead letter may be read a moment before).
    wait_until(
        "the event kept in outboxd.dead_letters",
        ARRIVAL,
        || async {
            db.query_opt(
                "SELECT 1 FROM outboxd.dead_letters WHERE event_id = $1",
                &[&big],
            )
            .await
            .is_ok_and(|r| r.is_some())
        },
    )
    .await;
    let kept = db
        .query_one(
            "SELECT reason, length(payload), topic FROM outboxd.dead_letters WHERE event_id = $1",
            &[&big],
        )
        .await
        .expect("the event is kept whole");
    assert_eq!(kept.get::<_, String>(0), "too_large");
    assert!(kept.get::<_, i32>(1) > 2_000_000);
    assert_eq!(kept.get::<_, String>(2), TOPIC);
    // Pruning deletes every confirmed row but that one.
    let out = env.command_with(&["prune", "--older-than", "0s"], &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    let left: Vec<String> = db
        .query("SELECT id::text FROM outbox", &[])
        .await
        .expect("read the outbox")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, [big], "only the row of the kept event stays");
    assert!(outboxd.is_running(), "{}", outboxd.log_text());
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
    println!(
        "{}: a 2 MB event dead-lettered without its payload, kept whole in outboxd.dead_letters, its row kept by prune",
        B::KIND
    );
}

/// A poison event: the SQL that writes it, the dead letter's `reason` and what its `detail`
/// says.
struct Poison {
    sql: String,
    reason: &'static str,
    detail: &'static str,
}

/// The poison of the scenario: rows that cannot be routed, and an event the broker refuses
/// when it can be made to.
fn poison_rows(refusal: Option<&Refusal>) -> Vec<Poison> {
    let mut poison = vec![
        Poison {
            sql: "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                  VALUES ('order', NULL, 'order.created', '{\"poison\": \"null key\"}')"
                .into(),
            reason: "null_field",
            detail: "aggregate_id",
        },
        Poison {
            sql: "SELECT outbox_emit('order', '', 'order.created', '{\"poison\": \"empty key\"}')"
                .into(),
            reason: "empty_field",
            detail: "key",
        },
        Poison {
            sql: "SELECT outbox_emit('order', 'k1', 'order.created', \
                  '{\"poison\": \"headers\"}', '[1, 2]')"
                .into(),
            reason: "invalid_headers",
            detail: "not a JSON object",
        },
    ];
    if let Some(r) = refusal {
        poison.push(Poison {
            sql: format!(
                "SELECT outbox_emit('refused', 'k1', 'refused.created', \
                        jsonb_build_object('poison', 'refused', 'pad', repeat('x', {})))",
                r.pad
            ),
            reason: r.reason,
            detail: r.detail,
        });
    }
    poison
}

/// The dead letter with `reason`.
fn dead_letter<'a>(dead: &'a [Arrived], reason: &str) -> &'a Arrived {
    dead.iter()
        .find(|d| d.header("reason") == Some(reason))
        .unwrap_or_else(|| panic!("no {reason} dead letter in {dead:#?}"))
}

/// Applications write 1,000 events a second while outboxd is killed with SIGKILL at 5 random
/// moments: after a last restart every event arrives, in order per key, and the duplicates
/// stay within what may be in flight per crash.
pub async fn kill_9_while_streaming<B: BrokerUnderTest>(broker: B) {
    const KILLS: u64 = 5;
    let (env, _outboxd, written) =
        crash_loop(&broker, Delivery::AtLeastOnce, KILLS, 0x5eed, (1000, 2500)).await;
    let db = env.db().await;
    let (arrived, all) = settle(&broker, &db, written, CRASH_KEYS, ARRIVAL).await;
    let duplicates = check_complete_and_ordered(&arrived, all.clone());
    // What may repeat after a crash: the events in flight (the budget and the batch being
    // sent), the part of a transaction sent before its commit, and what was acknowledged
    // within the last status interval, before Postgres was told.
    let per_crash = CRASH_MAX_INFLIGHT
        + CRASH_MAX_BATCH
        + CRASH_MAX_TXN
        + CRASH_RATE * CRASH_STATUS_INTERVAL_MS / 1000;
    println!(
        "{}: {} events, {KILLS} SIGKILLs while written: none lost, in order per key, {duplicates} duplicates ({:.0} per crash; bound {per_crash})",
        B::KIND,
        all.end,
        duplicates as f64 / KILLS as f64
    );
    assert!(
        duplicates <= KILLS * per_crash,
        "{duplicates} duplicates for {KILLS} crashes: more than in flight could explain"
    );
}

/// The happy path in `delivery`: 500 events in transactions of up to 50 while outboxd
/// streams, SIGTERM, a restart (which reads back what the first run left: Kafka's offsets
/// topic, Redis' markers), 500 more, SIGTERM. Every event arrives once, outboxd exits 0 both
/// times, and neither log holds a WARN or ERROR line: a warning in a clean run teaches
/// operators to ignore them. (Nothing to do for effectively-once on a sink without it.)
pub async fn a_clean_run_logs_no_warning_or_error<B: BrokerUnderTest>(
    broker: B,
    delivery: Delivery,
) {
    const EVENTS: u64 = 1000;
    const KEYS: u64 = 10;
    if delivery == Delivery::EffectivelyOnce && !B::EFFECTIVELY_ONCE {
        return;
    }
    let env = start_env(&broker, delivery, "").await;
    let db = env.db().await;
    for run in 0..2 {
        let mut outboxd = env.run();
        wait_slot_active(&db).await;
        write_events(&db, run * EVENTS / 2, EVENTS / 2, 50, KEYS, 0xc1ea + run).await;
        wait_arrived(&broker, TOPIC, 0..(run + 1) * EVENTS / 2, ARRIVAL).await;
        if run == 1 {
            let (arrived, all) = settle(&broker, &db, EVENTS, KEYS, ARRIVAL).await;
            assert_each_once(&arrived, all);
        }
        outboxd.sigterm();
        let status = outboxd.wait(Duration::from_secs(30));
        let log = outboxd.log_text();
        assert!(status.success(), "{log}");
        let alarming: Vec<&str> = log
            .lines()
            .filter(|l| matches!(l.split_whitespace().nth(1), Some("WARN" | "ERROR")))
            .collect();
        assert!(
            alarming.is_empty(),
            "{} ({delivery:?}, run {run}): a clean run logged warnings or errors:\n{}",
            B::KIND,
            alarming.join("\n")
        );
    }
    println!(
        "{} ({delivery:?}): two clean runs, no WARN or ERROR line",
        B::KIND
    );
}

/// Effectively-once: SIGKILLs at 6 random moments while applications write, then a Postgres
/// restart (on 16 and older the slot can fall back to its last saved position, so forwarded
/// events come again) and a walsender kill while more are written, 20,000 events or more in
/// all. A consumer reads each event exactly once, in order per key.
pub async fn effectively_once_through_crashes<B: BrokerUnderTest>(broker: B) {
    const KILLS: u64 = 6;
    const AT_LEAST: u64 = 20_000;
    if !B::EFFECTIVELY_ONCE {
        println!("{}: no effectively-once mode, nothing to test", B::KIND);
        return;
    }
    let (env, _outboxd, written) = crash_loop(
        &broker,
        Delivery::EffectivelyOnce,
        KILLS,
        0xe0_5eed,
        (2500, 4000),
    )
    .await;
    wait_arrived(&broker, TOPIC, 0..written, ARRIVAL).await;
    // Written across the restart and the walsender kill: at least 2,000, and enough for the
    // whole run to reach AT_LEAST.
    let more = AT_LEAST.saturating_sub(written).max(2000);

    env.pg.stop();
    env.pg.start_again();
    let db = env.db().await;
    let writer = tokio::spawn({
        let db = env.db().await;
        async move { write_events(&db, written, more, 100, CRASH_KEYS, 0xd0d0).await }
    });
    wait_slot_active(&db).await;
    db.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active",
    )
    .await
    .expect("terminate the walsender");
    writer.await.expect("writer");
    let (arrived, all) = settle(&broker, &db, written + more, CRASH_KEYS, ARRIVAL).await;
    assert!(all.end >= AT_LEAST, "only {} events written", all.end);
    println!(
        "{} effectively-once: {} events through {KILLS} SIGKILLs, a Postgres restart and a walsender kill: each read exactly once, in order per key",
        B::KIND,
        all.end
    );
    assert_each_once(&arrived, all);
}

const CRASH_RATE: u64 = 1000;
const CRASH_KEYS: u64 = 50;
const CRASH_MAX_TXN: u64 = 100;
const CRASH_MAX_INFLIGHT: u64 = 2000;
const CRASH_MAX_BATCH: u64 = 500;
const CRASH_STATUS_INTERVAL_MS: u64 = 100;

/// Applications write [`CRASH_RATE`] events a second while outboxd runs and is killed with
/// SIGKILL `kills` times, each a random moment (seeded) of `window` milliseconds into its
/// run; then a last outboxd runs and the writing stops. Returns the environment, that
/// outboxd and how many events were written.
async fn crash_loop<B: BrokerUnderTest>(
    broker: &B,
    delivery: Delivery,
    kills: u64,
    seed: u64,
    window: (u64, u64),
) -> (SinkEnv, Outboxd, u64) {
    let env = start_env(
        broker,
        delivery,
        &format!(
            "max_inflight_events = {CRASH_MAX_INFLIGHT}\nmax_batch_events = {CRASH_MAX_BATCH}"
        ),
    )
    .await;
    let load = Load::start(env.db().await, CRASH_RATE, CRASH_MAX_TXN, CRASH_KEYS, seed);
    let status_interval = CRASH_STATUS_INTERVAL_MS.to_string();
    let mut rng = Rng::new(seed);
    for kill in 0..kills {
        let mut outboxd =
            env.run_with(&[("OUTBOXD_POSTGRES__STATUS_INTERVAL_MS", &status_interval)]);
        if kill == 0 {
            // The first run streams before the first kill (creating topics may take a while).
            wait_count(broker, TOPIC, 1, ARRIVAL).await;
        }
        // A random moment of the run: what the kill interrupts.
        let (from, to) = window;
        tokio::time::sleep(rng.between(Duration::from_millis(from), Duration::from_millis(to)))
            .await;
        outboxd.kill9();
    }
    let outboxd = env.run();
    let written = load.stop().await;
    (env, outboxd, written)
}
