//! Watching the WAL the slot retains, and helping Postgres release it.
//!
//! Confirming a position tells Postgres that outboxd needs nothing before it, but Postgres
//! moves the slot's `restart_lsn` (the oldest WAL it keeps for the slot) only when logical
//! decoding passes a running-transactions record. Postgres writes one every 15 seconds while
//! the server is busy and at each checkpoint, so even a fully caught-up slot retains up to 15
//! seconds of WAL, more on a server writing fast elsewhere.
//!
//! While a session streams, this task reads the slot every few seconds, keeps the
//! `retained_wal_bytes` metric and the server's WAL position (the backlog) current, and when the slot retains more than
//! [`NUDGE_ABOVE_BYTES`] it calls `pg_log_standby_snapshot()` (PostgreSQL 16+, EXECUTE granted
//! by sql/role.sql), at most once per [`NUDGE_EVERY`]. The record costs a few bytes of WAL.
//! Without the function or the grant, Postgres' own cadence applies; that is logged once.
//!
//! Each reading also goes to the session's [`stall::Watch`], which notices a session that is
//! connected but not advancing and says why.
//!
//! It also notes, at most once per [`NOTE_EVERY`] and only when events were forwarded since
//! the last note, the slot's confirmed position in outboxd's record of the slot
//! (`outboxd.slots`): if the slot is ever lost, that is where the gap starts, and `setup`
//! says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outboxd_postgres::ConnInfo;
use outboxd_postgres::catalog;
use outboxd_postgres::state::slots;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::stall;
use crate::status::Status;

/// How often the slot is read.
const POLL_EVERY: Duration = Duration::from_secs(2);
/// Retained WAL above which a running-transactions record is requested.
pub const NUDGE_ABOVE_BYTES: u64 = 4 * 1024 * 1024;
/// Least time between two requests.
pub const NUDGE_EVERY: Duration = Duration::from_secs(5);
/// Least time between two notes of the confirmed position in `outboxd.slots`.
pub const NOTE_EVERY: Duration = Duration::from_secs(60);

/// Watches `slot` until `stop` is cancelled; also publishes the server's WAL position, for
/// the backlog shown in logs and the progress line.
pub async fn watch(
    conn: ConnInfo,
    slot: String,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    stop: CancellationToken,
) {
    let mut client = None;
    let mut can_nudge = true;
    let mut last_nudge: Option<Instant> = None;
    let mut notes = Notes::default();
    let mut stall = stall::Watch::default();
    let mut ticker = tokio::time::interval(POLL_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                stall.end(&metrics, &status);
                return;
            }
            _ = ticker.tick() => {}
        }
        if client.is_none() {
            match conn.connect().await {
                Ok(c) => {
                    if let Ok(server) = catalog::server(&c).await {
                        can_nudge = can_nudge && server.version_num >= 160_000;
                    }
                    client = Some(c);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "retention watch cannot connect; will retry");
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let s = match catalog::slot(c, &slot).await {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "retention watch lost its connection");
                client = None;
                continue;
            }
        };
        status.set_server_wal_end(s.current_wal_lsn.get());
        if let Some(confirmed) = s.confirmed_flush_lsn {
            notes
                .maybe_note(c, &slot, confirmed, metrics.events_handled_total())
                .await;
            let reading = stall::Reading {
                confirmed,
                wal: s.current_wal_lsn,
                handled: metrics.events_handled_total(),
                sent: outboxd_postgres::holdups::walsender_sent(c, &slot)
                    .await
                    .ok()
                    .flatten(),
            };
            stall.observe(c, &slot, reading, &metrics, &status).await;
        }
        let Some(retained) = s.retained_wal_bytes() else {
            continue;
        };
        metrics.retained_wal_bytes.set(retained);
        let due = last_nudge.is_none_or(|t| t.elapsed() >= NUDGE_EVERY);
        if can_nudge && due && s.active && retained > NUDGE_ABOVE_BYTES {
            last_nudge = Some(Instant::now());
            match catalog::log_standby_snapshot(c).await {
                Ok(lsn) => {
                    tracing::debug!(%lsn, retained, "requested a running-transactions record")
                }
                Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                    can_nudge = false;
                    tracing::info!(
                        "outboxd may not call pg_log_standby_snapshot(); the slot's retained WAL \
                         will follow Postgres' own 15-second snapshots and checkpoints. To release \
                         it sooner: GRANT EXECUTE ON FUNCTION pg_log_standby_snapshot() TO <role>"
                    );
                }
                Err(e) => tracing::debug!(error = %e, "pg_log_standby_snapshot() failed"),
            }
        }
    }
}

/// When the confirmed position was last noted in `outboxd.slots`, and how many events had
/// been handled then.
#[derive(Debug, Default)]
struct Notes {
    last: Option<(Instant, u64)>,
    /// Off once the record cannot be written (no schema outboxd, no grant): said once.
    off: bool,
}

impl Notes {
    async fn maybe_note(
        &mut self,
        client: &tokio_postgres::Client,
        slot: &str,
        confirmed: outboxd_core::Lsn,
        handled: u64,
    ) {
        let due = match self.last {
            None => handled > 0,
            Some((at, before)) => at.elapsed() >= NOTE_EVERY && handled > before,
        };
        if self.off || !due {
            return;
        }
        match slots::note_confirmed(client, slot, confirmed).await {
            Ok(()) => self.last = Some((Instant::now(), handled)),
            Err(e) => {
                self.off = true;
                tracing::info!(
                    error = %crate::report::one_line(&e),
                    "cannot note the slot's confirmed position in outboxd.slots; if the slot \
                     is ever lost, setup will not know since when (apply sql/state.sql and \
                     sql/role.sql)"
                );
            }
        }
    }
}
