//! Coming from a polling relay: `setup --backfill-where` publishes the rows the relay had not
//! published yet and creates the slot at the same point, while writers go on; `replay`
//! re-publishes kept rows at any time.
//!
//! The table is the Django tutorial's relay table (`outbox_event`: `id`, `topic`, `payload`,
//! `created_at`, `published_at`), routed by configuration alone.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::*;

/// The relay table and its publication, as the application's admin would make them; the
/// relay published every even `seq` of the first `rows`.
async fn django_table(env: &Env, rows: u64) {
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE outbox_event (
             id           bigserial PRIMARY KEY,
             topic        varchar(200) NOT NULL,
             payload      jsonb NOT NULL,
             created_at   timestamptz NOT NULL DEFAULT now(),
             published_at timestamptz
         );
         GRANT SELECT ON outbox_event TO outboxd;
         CREATE PUBLICATION relay FOR TABLE outbox_event WITH (publish = 'insert');",
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO outbox_event (topic, payload, created_at, published_at) \
         SELECT 'orders', jsonb_build_object('seq', g), \
                now() - interval '1 hour' + g * interval '1 ms', \
                CASE WHEN g % 2 = 0 THEN now() END \
         FROM generate_series(0, $1::bigint - 1) AS g",
        &[&(rows as i64)],
    )
    .await
    .unwrap();
}

/// The configuration for the relay table, plus `extra` sections.
fn write_django_config(env: &Env, extra: &str) {
    env.write_config_with(
        &format!(
            "url = {:?}\ntable = \"public.outbox_event\"\npublication = \"relay\"",
            env.pg.outboxd_url("app")
        ),
        &format!(
            "[route]\ntopic = \"{{topic}}\"\nkey = \"{{topic}}\"\nid_column = \"id\"\n\
             type_column = \"\"\nheaders_column = \"\"\n{extra}"
        ),
    );
}

/// Inserts one relay row after another (seq from `first`) until stopped; returns the next
/// seq.
fn start_writer(env: &Env, first: u64) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let url = env.pg.admin_url("app");
    let handle = tokio::spawn(async move {
        let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut seq = first;
        while !flag.load(Ordering::Relaxed) {
            db.execute(
                "INSERT INTO outbox_event (topic, payload) VALUES ('orders', jsonb_build_object('seq', $1::bigint))",
                &[&(seq as i64)],
            )
            .await
            .unwrap();
            seq += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seq
    });
    (stop, handle)
}

/// Every seq in `expected` arrived exactly once, and nothing else.
fn assert_exactly(entries: &[Entry], expected: &HashSet<u64>) {
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for e in entries {
        *seen.entry(e.seq()).or_default() += 1;
    }
    let unexpected: Vec<u64> = seen
        .keys()
        .filter(|s| !expected.contains(s))
        .copied()
        .collect();
    assert!(
        unexpected.is_empty(),
        "{} rows arrived that should not (published already?), e.g. {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(10)]
    );
    let missing: Vec<u64> = expected
        .iter()
        .filter(|s| !seen.contains_key(s))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} rows missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let twice: Vec<u64> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    assert!(twice.is_empty(), "{} rows arrived twice", twice.len());
}

/// Waits until `stream` holds at least `n` entries; returns them.
async fn wait_entries(env: &Env, stream: &str, n: u64) -> Vec<Entry> {
    let redis = env.redis.connect().await;
    wait_stream_len(&redis, stream, n, Duration::from_secs(120)).await
}

/// The cutover: 10,000 relay rows (half published), a writer inserting throughout; every
/// unpublished and every new row arrives exactly once, no published row arrives, and each
/// part keeps its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_from_a_polling_relay_has_no_gap_and_no_overlap() {
    let env = Env::new(Postgres::start(), "").await;
    django_table(&env, 10_000).await;
    write_django_config(&env, "[backfill]\nbatch_rows = 500\n");

    let out = env.command(&[
        "setup",
        "--backfill-where",
        "published_at IS NULL",
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("5000 rows"),
        "{}",
        output_text(&out)
    );
    let db = env.db().await;
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a dry run creates nothing");

    let (stop, writer) = start_writer(&env, 10_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = env.command(&["setup", "--backfill-where", "published_at IS NULL"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let report = output_text(&out);
    assert!(report.contains("slot \"outboxd\" created"), "{report}");
    // Progress, not on a terminal: a line per tenth of the rows (5,000 and what the writer
    // added before the snapshot), growing, ending with all of them.
    let progress: Vec<(u64, u64)> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| {
            let (done, total) = l.strip_prefix("backfill: ")?.split_once(" of ")?;
            Some((
                done.parse().ok()?,
                total.strip_suffix(" rows")?.parse().ok()?,
            ))
        })
        .collect();
    let last = progress.last().copied().unwrap_or_default();
    assert!(
        progress.len() >= 5
            && last.0 == last.1
            && last.1 >= 5000
            && progress.windows(2).all(|w| w[0].0 < w[1].0),
        "{report}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut outboxd = env.run();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let next = writer.await.unwrap();
    println!("cutover: {} rows written during it", next - 10_000);

    let expected: HashSet<u64> = (1..10_000).step_by(2).chain(10_000..next).collect();
    let entries = wait_entries(&env, "orders", expected.len() as u64).await;
    // A moment more: anything extra would show up now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut redis = env.redis.connect().await;
    let entries_now = read_stream(&mut redis, "orders").await;
    assert_eq!(entries.len(), entries_now.len(), "more entries than rows");
    assert_exactly(&entries_now, &expected);
    // The backfilled rows arrive in table order. Rows the writer committed after the
    // backfill's transaction arrive after it, in commit order (the writer commits in seq
    // order). Rows committed while the backfill was written may come before it: the order
    // caveat of docs/adopting.md.
    let in_order = |part: &[u64], what: &str| {
        assert!(part.windows(2).all(|w| w[0] < w[1]), "{what} out of order");
    };
    let seqs: Vec<u64> = entries_now.iter().map(Entry::seq).collect();
    let backfilled: Vec<u64> = seqs.iter().copied().filter(|s| *s < 10_000).collect();
    in_order(&backfilled, "backfill");
    let last_backfilled = seqs.iter().rposition(|s| *s < 10_000).unwrap();
    in_order(
        &seqs[last_backfilled + 1..],
        "the stream after the backfill",
    );
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());

    // Again: the slot exists, so a backfill is refused with what to do.
    let out = env.command(&["setup", "--backfill-where", "published_at IS NULL"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("already exists")
            && output_text(&out).contains("outboxd replay"),
        "{}",
        output_text(&out)
    );
}

/// A kill -9 in the middle of the backfill, and one after its commit but before the slot is
/// made: the next `setup` starts over, and every row still arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_midway_is_started_over_and_loses_nothing() {
    for failpoint in ["backfill-batch@4", "backfill-committed"] {
        let env = Env::new(Postgres::start(), "").await;
        django_table(&env, 4_000).await;
        write_django_config(&env, "[backfill]\nbatch_rows = 250\n");
        let out = std::process::Command::new(outboxd_bin())
            .args([
                "setup",
                "--backfill-where",
                "published_at IS NULL",
                "--config",
            ])
            .arg(&env.config)
            .env("OUTBOXD_FAILPOINT", failpoint)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{failpoint}: {}", output_text(&out));
        let db = env.db().await;
        let permanent: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE NOT temporary",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(permanent, 0, "{failpoint}: no slot is left behind");
        db.execute(
            "INSERT INTO outbox_event (topic, payload) VALUES ('orders', '{\"seq\": 4000}')",
            &[],
        )
        .await
        .unwrap();

        let out = env.command(&["setup", "--backfill-where", "published_at IS NULL"]);
        assert!(out.status.success(), "{failpoint}: {}", output_text(&out));
        let mut outboxd = env.run();
        let expected: HashSet<u64> = (1..4_000).step_by(2).chain([4000]).collect();
        wait_entries(&env, "orders", expected.len() as u64).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut redis = env.redis.connect().await;
        assert_exactly(&read_stream(&mut redis, "orders").await, &expected);
        outboxd.sigterm();
        assert!(outboxd.wait(Duration::from_secs(30)).success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_predicate_or_order_is_one_clear_line() {
    let env = Env::new(Postgres::start(), "").await;
    django_table(&env, 10).await;
    write_django_config(&env, "");
    let out = env.command(&["setup", "--backfill-where", "published_at IS NUL"]);
    assert!(!out.status.success());
    let t = output_text(&out);
    assert_eq!(t.lines().count(), 1, "{t}");
    assert!(
        t.contains("the predicate \"published_at IS NUL\" cannot be used"),
        "{t}"
    );
    write_django_config(&env, "[backfill]\norder_by = \"created, id\"\n");
    let out = env.command(&["setup", "--backfill-where", "true"]);
    let t = output_text(&out);
    assert!(!out.status.success());
    assert!(t.contains("backfill.order_by names \"created\""), "{t}");
    // A predicate is one expression: a second statement is refused by Postgres.
    write_django_config(&env, "");
    let out = env.command(&[
        "setup",
        "--backfill-where",
        "true); DROP TABLE outbox_event; --",
    ]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let db = env.db().await;
    db.query_one("SELECT count(*) FROM outbox_event", &[])
        .await
        .expect("the table is still there");
}

/// Replay of a time range: marked, routed and dead-lettered like any event; with
/// effectively-once, its entries have WAL-position ids and no duplicates after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_time_range_arrives_marked_once_and_poison_is_dead_lettered() {
    let env = Env::new(
        Postgres::start(),
        "[sink]\ndelivery = \"effectively-once\"\n",
    )
    .await;
    env.setup();
    let mut outboxd = env.run();
    let db = env.db().await;
    emit_txn(&db, 0, 100, 5).await;
    let marker: String = db
        .query_one("SELECT now()::text", &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    emit_txn(&db, 100, 100, 5).await;
    // A row that cannot be routed (empty key) goes to the dead letter, then and on replay.
    db.execute(
        "SELECT outbox_emit('order', '', 'order.created', jsonb_build_object('seq', 999))",
        &[],
    )
    .await
    .unwrap();
    wait_entries(&env, "outbox.order", 200).await;
    wait_entries(&env, "outboxd.dlq", 1).await;

    let predicate = format!("created_at > '{marker}'");
    let out = env.command(&["replay", "--where", &predicate, "--dry-run"]);
    assert!(
        output_text(&out).contains("101 rows"),
        "{}",
        output_text(&out)
    );
    let out = env.command(&["replay", "--where", &predicate, "--wait"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("acknowledged"),
        "{}",
        output_text(&out)
    );
    let entries = wait_entries(&env, "outbox.order", 300).await;
    let replayed: Vec<&Entry> = entries
        .iter()
        .filter(|e| {
            e.get("headers")
                .is_some_and(|h| h.contains("\"outboxd-replay\":\"true\""))
        })
        .collect();
    assert_eq!(replayed.len(), 100, "the 100 rows after the marker, marked");
    let seqs: Vec<u64> = replayed.iter().map(|e| e.seq()).collect();
    let table_order: Vec<u64> = db
        .query(
            &format!(
                "SELECT (payload->>'seq')::bigint FROM outbox WHERE {predicate} \
                 AND aggregate_id <> '' ORDER BY created_at, id"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i64>(0) as u64)
        .collect();
    assert_eq!(seqs, table_order, "in table order (created_at, id)");
    // The replay's entries come after the originals'.
    let first_replayed = entries
        .iter()
        .position(|e| {
            e.get("headers")
                .is_some_and(|h| h.contains("\"outboxd-replay\":\"true\""))
        })
        .expect("replayed entries");
    assert!(
        first_replayed >= 200,
        "replayed entries come after the originals"
    );
    let dead = wait_entries(&env, "outboxd.dlq", 2).await;
    assert!(
        dead.iter().all(|d| d.get("reason") == Some("empty_field")),
        "{dead:?}"
    );

    // To another stream.
    let out = env.command(&[
        "replay",
        "--where",
        "(payload->>'seq')::int < 10",
        "--topic",
        "orders.replayed",
        "--wait",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let other = wait_entries(&env, "orders.replayed", 10).await;
    assert_eq!(other.len(), 10);

    // A crash while a replay is forwarded: Redis acknowledged two batches of it and the slot
    // confirmed neither. The next run sends them again; the marker in Redis says they are
    // there, and nothing is written twice.
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
    let out = env.command(&["replay", "--where", &predicate]);
    assert!(out.status.success(), "{}", output_text(&out));
    let mut crashing = env.run_with(&[
        ("OUTBOXD_FAILPOINT", "after-ack-before-confirm@2"),
        ("OUTBOXD_SINK__MAX_BATCH_EVENTS", "20"),
    ]);
    let status = crashing.wait(Duration::from_secs(60));
    assert!(!status.success(), "{}", crashing.log_text());
    let mut redis = env.redis.connect().await;
    let partial = stream_len(&mut redis, "outbox.order").await;
    assert!(
        (301..400).contains(&partial),
        "the crash came while the replay was forwarded: {partial} entries"
    );
    let mut outboxd = env.run();
    emit_txn(&db, 200, 10, 5).await;
    let entries = wait_entries(&env, "outbox.order", 410).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        read_stream(&mut redis, "outbox.order").await.len(),
        410,
        "no duplicates in effectively-once mode"
    );
    let marked = entries
        .iter()
        .filter(|e| {
            e.get("headers")
                .is_some_and(|h| h.contains("\"outboxd-replay\":\"true\""))
        })
        .count();
    assert_eq!(
        marked, 200,
        "two replays of 100 rows, each row once per replay"
    );
    check_complete_and_ordered(&entries[400..], 200..210);
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());

    // Without a slot, replay says what to do.
    let out = env.command(&["slot", "drop", "--yes"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = env.command(&["replay", "--where", "true"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("run `outboxd setup` first"),
        "{}",
        output_text(&out)
    );
}
