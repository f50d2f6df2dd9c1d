//! The events the scenarios write (~300-byte payloads over 100 keys, as table rows or as
//! table-less messages), the WAL position, and waiting for a slot to be streamed.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

/// Payload padding: about 300 bytes of JSON per event.
pub const PAD: usize = 270;

/// Writes `count` table-less events from `first` in transactions of `per_txn` events, with the
/// content `outbox_emit_message` writes (the same fields and padding as `write_backlog`).
pub async fn write_message_backlog(db: &Client, first: u64, count: u64, per_txn: u64) {
    let emit = db
        .prepare(
            "SELECT count(pg_logical_emit_message(true, 'outboxd', json_build_object( \
                 'id', gen_random_uuid()::text, 'aggregate_type', 'order', \
                 'aggregate_id', 'k' || (g % 100), 'event_type', 'order.created', \
                 'payload', jsonb_build_object('seq', g, 'pad', repeat('x', $3::int))::text, \
                 'headers', '{}', 'created_at', now()::text)::text)) \
             FROM generate_series($1::bigint, $2::bigint) AS g",
        )
        .await
        .unwrap();
    let pad = PAD as i32;
    let mut seq = first;
    while seq < first + count {
        let m = per_txn.min(first + count - seq);
        db.query_one(&emit, &[&(seq as i64), &((seq + m - 1) as i64), &pad])
            .await
            .unwrap();
        seq += m;
    }
}

/// Writes `count` events from `first` in transactions of `per_txn` rows (INSERT … SELECT).
pub async fn write_backlog(db: &Client, first: u64, count: u64, per_txn: u64) {
    let insert = db
        .prepare(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'k' || (g % 100), 'order.created', \
                    jsonb_build_object('seq', g, 'pad', repeat('x', $3::int)) \
             FROM generate_series($1::bigint, $2::bigint) AS g",
        )
        .await
        .unwrap();
    let mut seq = first;
    while seq < first + count {
        // Up to 64 transactions in flight on the connection: each still commits on its own.
        let mut pending = Vec::new();
        let mut k = seq;
        while k < first + count && pending.len() < 64 {
            let m = per_txn.min(first + count - k);
            let (a, b) = (k as i64, (k + m - 1) as i64);
            pending.push((a, b));
            k += m;
        }
        let pad = PAD as i32;
        let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 3]> = pending
            .iter()
            .map(|(a, b)| [a as _, b as _, &pad as _])
            .collect();
        let futures = params.iter().map(|p| db.execute(&insert, p));
        for r in futures::future::join_all(futures).await {
            r.unwrap();
        }
        seq = k;
    }
}

pub async fn current_lsn(db: &Client) -> String {
    db.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until `slot` is streamed; returns when it was first seen active.
pub async fn wait_active(db: &Client, slot: &str) -> Instant {
    loop {
        let active: bool = db
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if active {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
