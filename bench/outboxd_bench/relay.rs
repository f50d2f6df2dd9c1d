//! Scenario 5, the baseline users would otherwise write: a polling relay (`SELECT … FOR
//! UPDATE SKIP LOCKED` in batches of 1,000, publish to Redis in one pipeline, `UPDATE …
//! published_at`) on the same kind of backlog as the drains.

use std::time::Instant;

use crate::backlog::write_backlog;
use crate::support::*;

/// Scenario 5: a polling relay on the same kind of backlog; its events per second.
pub async fn polling_relay(events: u64) -> f64 {
    let env = Env::start().await;
    let db = env.db().await;
    db.batch_execute(
        "ALTER TABLE outbox ADD COLUMN published_at timestamptz; \
         CREATE INDEX outbox_unpublished ON outbox (created_at, id) WHERE published_at IS NULL",
    )
    .await
    .unwrap();
    write_backlog(&db, 0, events, 1000).await;
    let mut relay = env.db().await;
    let mut redis = env.redis.connect().await;
    let started = Instant::now();
    let mut published = 0;
    while published < events {
        let tx = relay.transaction().await.unwrap();
        let rows = tx
            .query(
                "SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text, headers::text \
                 FROM outbox WHERE published_at IS NULL ORDER BY created_at, id \
                 LIMIT 1000 FOR UPDATE SKIP LOCKED",
                &[],
            )
            .await
            .unwrap();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.get(0);
            let topic = format!("outbox.{}", row.get::<_, String>(1));
            pipe.cmd("XADD")
                .arg(topic)
                .arg("*")
                .arg("id")
                .arg(&id)
                .arg("type")
                .arg(row.get::<_, String>(3))
                .arg("key")
                .arg(row.get::<_, String>(2))
                .arg("payload")
                .arg(row.get::<_, String>(4))
                .arg("headers")
                .arg(row.get::<_, String>(5))
                .ignore();
            ids.push(id);
        }
        let () = pipe.query_async(&mut redis).await.unwrap();
        tx.execute(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1::text[]::uuid[])",
            &[&ids],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        published += rows.len() as u64;
    }
    let eps = events as f64 / started.elapsed().as_secs_f64();
    println!("polling relay ({events} events, batches of 1,000): {eps:.0} events/s");
    eps
}
