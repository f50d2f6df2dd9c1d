//! Scenario 6, what keeping the outbox small costs: (a) the writers' side of each way of
//! writing an event (a plain INSERT, `outbox_emit` keeping the row or deleting it in the
//! transaction, table-less `outbox_emit_message`): commits per second, WAL and table growth
//! per event; (b) pruning forwarded rows with `outboxd prune`: its time, its WAL, the dead
//! tuples it leaves, and the VACUUM after it.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::backlog::{PAD, write_backlog};
use crate::broker::{Broker, broker_env, run_outboxd};
use crate::stats::median;
use crate::support::*;

/// What one way of writing events costs the writers (scenario 6).
#[derive(Debug, Clone)]
pub struct WriteCost {
    pub style: &'static str,
    pub commits_per_s: f64,
    pub wal_bytes_per_event: f64,
    pub table_bytes_per_event: f64,
}

/// The ways of writing an event that keep the outbox small, against a kept row, in the same
/// run (one-row transactions, 16 in flight on one connection; ~300-byte payloads).
const WRITE_STYLES: &[(&str, &str)] = &[
    (
        "INSERT (no function)",
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'order.created', $2::text::jsonb)",
    ),
    (
        "outbox_emit (row kept)",
        "SELECT outbox_emit('order', $1, 'order.created', $2::text::jsonb)",
    ),
    (
        "outbox_emit(keep => false)",
        "SELECT outbox_emit('order', $1, 'order.created', $2::text::jsonb, '{}', false)",
    ),
    (
        "outbox_emit_message (table-less)",
        "SELECT outbox_emit_message('order', $1, 'order.created', $2::text::jsonb)",
    ),
];

async fn wal_and_table_bytes(db: &Client) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT (pg_current_wal_lsn() - '0/0')::bigint, pg_total_relation_size('outbox')",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Scenario 6a: each write style for `events` one-row transactions, in alternating rounds.
pub async fn write_costs(events: u64, rounds: u64) -> Vec<WriteCost> {
    let env = Env::start().await;
    let db = env.db().await;
    let mut per_style: Vec<Vec<WriteCost>> = vec![Vec::new(); WRITE_STYLES.len()];
    for round in 0..rounds {
        for (i, &(style, sql)) in WRITE_STYLES.iter().enumerate() {
            per_style[i].push(write_cost(&db, style, sql, round * events, events).await);
        }
    }
    per_style
        .into_iter()
        .map(|costs| WriteCost {
            commits_per_s: median(costs.iter().map(|c| c.commits_per_s).collect()),
            wal_bytes_per_event: median(costs.iter().map(|c| c.wal_bytes_per_event).collect()),
            table_bytes_per_event: median(costs.iter().map(|c| c.table_bytes_per_event).collect()),
            ..costs[0].clone()
        })
        .collect()
}

/// `events` one-row transactions from `first` written with `sql`, 16 in flight.
async fn write_cost(
    db: &Client,
    style: &'static str,
    sql: &str,
    first: u64,
    events: u64,
) -> WriteCost {
    let pad = "x".repeat(PAD);
    let statement = db.prepare(sql).await.unwrap();
    db.batch_execute("CHECKPOINT").await.unwrap();
    let (wal_before, table_before) = wal_and_table_bytes(db).await;
    let started = Instant::now();
    let mut seq = first;
    let end = seq + events;
    while seq < end {
        let batch: Vec<(String, String)> = (seq..(seq + 16).min(end))
            .map(|n| {
                (
                    format!("k{}", n % 100),
                    format!(r#"{{"seq": {n}, "pad": "{pad}"}}"#),
                )
            })
            .collect();
        let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 2]> = batch
            .iter()
            .map(|(key, payload)| [key as _, payload as _])
            .collect();
        let futures = params.iter().map(|p| db.execute(&statement, p));
        for r in futures::future::join_all(futures).await {
            r.unwrap();
        }
        seq = end.min(seq + 16);
    }
    let secs = started.elapsed().as_secs_f64();
    let (wal_after, table_after) = wal_and_table_bytes(db).await;
    WriteCost {
        style,
        commits_per_s: events as f64 / secs,
        wal_bytes_per_event: (wal_after - wal_before) as f64 / events as f64,
        table_bytes_per_event: (table_after - table_before) as f64 / events as f64,
    }
}

/// What pruning `rows` rows cost (scenario 6b).
#[derive(Debug, Clone)]
pub struct PruneCost {
    pub rows: u64,
    pub prune_secs: f64,
    pub wal_bytes_per_row: f64,
    pub dead_tuples: i64,
    pub vacuum_secs: f64,
    pub table_bytes_before: i64,
    pub table_bytes_after_vacuum: i64,
}

/// Scenario 6b: `rows` rows forwarded by outboxd, then deleted by `outboxd prune` (which
/// waits for the slot's confirmation), then a VACUUM.
pub async fn prune_cost(rows: u64) -> PruneCost {
    let env = Env::start().await;
    let db = env.db().await;
    db.batch_execute("GRANT DELETE ON outbox TO outboxd")
        .await
        .unwrap();
    write_backlog(&db, 0, rows, 1000).await;
    let mut redis = env.redis.connect().await;
    let mut outboxd = run_outboxd(&env, &broker_env(Broker::Redis, None));
    while stream_len(&mut redis, "outbox.order").await < rows {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.batch_execute("VACUUM ANALYZE outbox").await.unwrap();
    let (wal_before, table_bytes_before) = wal_and_table_bytes(&db).await;
    let started = Instant::now();
    let out = env.command(&["prune", "--older-than", "0s"]);
    let prune_secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "outboxd prune: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (wal_after, _) = wal_and_table_bytes(&db).await;
    // The statistics collector reports dead tuples with a delay.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let dead_tuples: i64 = db
        .query_one(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let started = Instant::now();
    db.batch_execute("VACUUM outbox").await.unwrap();
    let vacuum_secs = started.elapsed().as_secs_f64();
    let (_, table_bytes_after_vacuum) = wal_and_table_bytes(&db).await;
    outboxd.sigterm();
    outboxd.wait(Duration::from_secs(60));
    PruneCost {
        rows,
        prune_secs,
        wal_bytes_per_row: (wal_after - wal_before) as f64 / rows as f64,
        dead_tuples,
        vacuum_secs,
        table_bytes_before,
        table_bytes_after_vacuum,
    }
}

/// The rows of the outbox-size scenarios.
pub fn render_outbox_size(writes: &[WriteCost], prune: &PruneCost) -> String {
    let mut t = String::from(
        "| way of writing an event (one-row transactions) | commits/s | WAL per event | table growth per event |\n|---|---|---|---|\n",
    );
    for w in writes {
        t.push_str(&format!(
            "| {} | {:.0} | {:.0} B | {:.0} B |\n",
            w.style, w.commits_per_s, w.wal_bytes_per_event, w.table_bytes_per_event
        ));
    }
    t.push_str(&format!(
        "\nPruning {} forwarded rows with `outboxd prune --older-than 0s`: {:.2} s ({:.0} rows/s, \
         including the wait for the slot's confirmation), {:.0} B of WAL per row, {} dead tuples \
         left; `VACUUM` {:.2} s; table and indexes {:.1} MiB before, {:.1} MiB after (VACUUM \
         returns empty pages at the end of the file; space freed in between is reused by new \
         rows, not returned).\n",
        prune.rows,
        prune.prune_secs,
        prune.rows as f64 / prune.prune_secs,
        prune.wal_bytes_per_row,
        prune.dead_tuples,
        prune.vacuum_secs,
        prune.table_bytes_before as f64 / 1048576.0,
        prune.table_bytes_after_vacuum as f64 / 1048576.0,
    ));
    t
}
