//! Events whose dead letter could not carry the payload (`outboxd.dead_letters`).
//!
//! A broker that cannot take an event (over its size limit) cannot take its dead letter with
//! the payload either. The dead letter then goes without it, and the whole event is kept
//! here, before the slot may pass it: so no event is lost to a dead letter, also when its row
//! is deleted (`outbox_emit(..., keep => false)`, pruning) or never existed (table-less
//! events). `prune` keeps the outbox rows of the events kept here. A replay of the same event
//! (same slot and WAL position) is kept once.

use outboxd_core::{Event, Poison};
use tokio_postgres::Client;

use super::StateError;

/// Keeps `events` (each with why it was dead-lettered) as streamed through `slot`.
pub async fn keep(
    client: &Client,
    slot: &str,
    events: &[(&Event, &Poison)],
) -> Result<(), StateError> {
    let statement = client
        .prepare(
            "INSERT INTO outboxd.dead_letters (slot, commit_lsn, position_index, event_id, \
             topic, event_key, event_type, payload, headers, reason, detail) \
             VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (slot, commit_lsn, position_index) DO NOTHING",
        )
        .await
        .map_err(StateError::pg(
            "preparing to keep dead letters in outboxd.dead_letters",
        ))?;
    for (event, poison) in events {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let index = i32::try_from(event.position.index).unwrap_or(i32::MAX);
        client
            .execute(
                &statement,
                &[
                    &slot,
                    &event.position.commit_lsn.to_string(),
                    &index,
                    &text(&event.id),
                    &event.topic,
                    &event.key.as_ref(),
                    &text(&event.event_type),
                    &event.payload.as_ref(),
                    &text(&event.headers.json),
                    &poison.kind.label(),
                    &poison.detail,
                ],
            )
            .await
            .map_err(StateError::pg(
                "keeping a dead letter in outboxd.dead_letters",
            ))?;
    }
    Ok(())
}

/// How many events are kept for `slot`.
pub async fn count(client: &Client, slot: &str) -> Result<i64, StateError> {
    let row = client
        .query_one(
            "SELECT count(*) FROM outboxd.dead_letters WHERE slot = $1",
            &[&slot],
        )
        .await
        .map_err(StateError::pg("counting outboxd.dead_letters"))?;
    Ok(row.get(0))
}
