//! Keeping the events whose dead letter went without its payload (see
//! `outboxd_postgres::state::dead_letters`), before the dispatcher counts them as delivered.
//!
//! The sink reports them in `Delivery::payload_omitted`; the [`Keeper`] writes each whole
//! event to `outboxd.dead_letters` on a connection of its own. Until that succeeds the batch
//! is not acknowledged, so the slot cannot pass it: a lost connection is retried after a pause,
//! and a database without the table (or without the grant) stops outboxd, since the event
//! would otherwise be nowhere.

use std::time::Duration;

use outboxd_core::{Delivery, Event, Poison, Record, SinkError};
use outboxd_postgres::ConnInfo;
use outboxd_postgres::state::{StateError, dead_letters};
use tokio_postgres::error::SqlState;

use crate::backoff::Backoff;

/// Writes events to `outboxd.dead_letters`.
#[derive(Debug)]
pub struct Keeper {
    conn: ConnInfo,
    slot: String,
    client: Option<tokio_postgres::Client>,
}

impl Keeper {
    /// A keeper for the events of `slot`, connecting to `conn` when it first has one.
    pub fn new(conn: ConnInfo, slot: String) -> Self {
        Keeper {
            conn,
            slot,
            client: None,
        }
    }

    /// Keeps the events of `batch` whose dead letter lacks the payload; returns once they are
    /// in Postgres. Errors only when retrying cannot help.
    pub async fn keep(&mut self, batch: &[Record], delivery: &Delivery) -> Result<(), SinkError> {
        let events: Vec<(&Event, &Poison)> = delivery
            .payload_omitted()
            .iter()
            .filter_map(|&i| {
                let poison = delivery
                    .rejected()
                    .iter()
                    .find(|(j, _)| *j == i)
                    .map(|(_, p)| p)
                    .or(batch[i].poison.as_ref())?;
                Some((&batch[i].event, poison))
            })
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.try_keep(&events).await {
                Ok(()) => {
                    tracing::warn!(
                        events = events.len(),
                        "dead letters without their payload (too large for the broker): the \
                         whole events are kept in Postgres, table outboxd.dead_letters"
                    );
                    return Ok(());
                }
                Err(e) if is_missing(&e) => {
                    return Err(SinkError::permanent(
                        "an event too large for the broker must be kept in Postgres \
                         (outboxd.dead_letters) before the slot may pass it, and it cannot be: \
                         apply sql/state.sql and sql/role.sql",
                        e,
                    ));
                }
                Err(e) => {
                    self.client = None;
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %crate::report::one_line(&e),
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot keep dead letters in outboxd.dead_letters yet; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn try_keep(&mut self, events: &[(&Event, &Poison)]) -> Result<(), StateError> {
        if self.client.is_none() {
            let client = self
                .conn
                .connect()
                .await
                .map_err(StateError::pg("connecting to keep dead letters"))?;
            self.client = Some(client);
        }
        let Some(client) = &self.client else {
            unreachable!("connected above");
        };
        dead_letters::keep(client, &self.slot, events).await
    }
}

/// Whether the table is missing or the role may not write it.
fn is_missing(e: &StateError) -> bool {
    let StateError::Postgres { source, .. } = e else {
        return true;
    };
    matches!(
        source.code(),
        Some(c) if *c == SqlState::UNDEFINED_TABLE
            || *c == SqlState::INVALID_SCHEMA_NAME
            || *c == SqlState::INSUFFICIENT_PRIVILEGE
    )
}
