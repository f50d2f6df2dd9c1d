//! `outboxd run`: stream the outbox from the slot to the broker.
//!
//! ```text
//!            ┌──────────────────── session (one select! loop) ─────────────────────┐
//! walsender ─┼▶ WalStream::next ─▶ Router::route ─▶ budget ─▶ channel ─┐           │
//!            │                                                         ▼           │
//!            │  WalStream::confirm ◀─ Checkpoint::ack ◀─ acks ◀─ dispatch ─▶ Sink ─┼▶ broker
//!            └─────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Progress tracking. Every record handed to the dispatcher is numbered by the
//! [`Checkpoint`](outboxd_core::Checkpoint). Each Commit's end LSN (and, between
//! transactions, each keepalive's WAL end) is recorded as a mark after the records read
//! before it. The dispatcher reports how many records the broker has acknowledged; the
//! checkpoint turns that into the newest mark whose records are all acknowledged, and only
//! that position is confirmed to the slot. So the slot never passes an unacknowledged event
//! (guarantee 2 of docs/guarantees.md), and an idle outbox confirms the server's position at
//! each keepalive (guarantee 5).
//!
//! Memory is bounded by the in-flight budget: at most `max_inflight_events` records and
//! `max_inflight_bytes` bytes are read and not yet acknowledged. When the budget is spent the
//! loop stops reading the WAL, pgwire-replication keeps the session alive with status
//! updates, and TCP flow control holds the walsender back. The replication client reads at
//! most `read_ahead_messages(max_inflight_bytes)` messages ahead of the loop (as many 1 MiB
//! rows as the budget holds), so the read-ahead stays within the budget too.
//!
//! Failures. At startup, anything wrong (Postgres unreachable, slot missing, broker
//! unreachable) stops the process with one clear message. Once streaming, a lost replication
//! connection ends the session and a new one starts from the slot after a backoff; a broker
//! that fails transiently has its batch retried by the dispatcher while the session waits.
//! Permanent errors (slot dropped or invalidated, broker refusing credentials) stop outboxd.
//!
//! Shutdown: stop reading, let the dispatcher drain what is in flight (bounded by
//! `drain_timeout`), confirm the final position, end the session; the session's tasks are
//! joined before `run` returns.
//!
//! Where each part lives, in `pipeline/`: `session.rs` (the select loop, the drain),
//! `inflight.rs` (the budget, and the checkpoint fed by acknowledgements), `routing.rs` (rows
//! and messages to records), `error.rs` (why `run` stops); the dispatcher is
//! [`crate::dispatch`].

mod error;
mod inflight;
mod routing;
mod session;

use std::sync::Arc;
use std::time::Duration;

use outboxd_core::{RouteSpec, Router, Sink, SinkError, WalOrigin};
use outboxd_postgres::message;
use outboxd_postgres::slot::{self, Mode, Prepared, SlotError, SlotSpec};
use outboxd_postgres::state::keys::{self, MessageKeys};
use outboxd_postgres::state::{self, slots};
use outboxd_postgres::{ConnInfo, Source, StreamError, StreamOptions};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::failpoint;
use crate::metrics::Metrics;
use crate::status::Status;

pub use error::RunError;
pub use routing::REPLAY_HEADER;
use session::Session;

/// Everything `run` needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Where Postgres is.
    pub conn: ConnInfo,
    /// The slot.
    pub slot: String,
    /// The publication.
    pub publication: String,
    /// The outbox table.
    pub table: String,
    /// Where events come from: the table's rows, or table-less messages.
    pub source: Source,
    /// How rows become events.
    pub route: RouteSpec,
    /// How often confirmed positions are reported.
    pub status_interval: Duration,
    /// The replication sessions' `wal_sender_timeout` (`None`: the server's).
    pub wal_sender_timeout: Option<Duration>,
    /// Most records per batch.
    pub max_batch_events: usize,
    /// How long a short batch waits for more records.
    pub linger: Duration,
    /// Most records read and not acknowledged.
    pub max_inflight_events: usize,
    /// Most bytes read and not acknowledged.
    pub max_inflight_bytes: u64,
    /// How long shutdown waits for in-flight records.
    pub drain_timeout: Duration,
    /// The broker's name, for messages.
    pub broker: &'static str,
    /// The broker's address without secrets, for messages.
    pub broker_target: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (empty: nowhere), for the log.
    pub http: String,
    /// One span per event, when `[otel] endpoint` is set.
    pub spans: Option<crate::otel::Spans>,
}

/// Streams until `shutdown` is cancelled (returns `Ok` after a clean stop) or a permanent
/// error.
pub async fn run<S, F>(
    settings: RunSettings,
    mut make_sink: F,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    shutdown: CancellationToken,
) -> Result<(), RunError>
where
    S: Sink + 'static,
    F: FnMut(Option<&WalOrigin>) -> Result<S, SinkError>,
{
    // A stop asked for during the startup checks (a Postgres or broker that does not answer
    // yet) is a clean stop: nothing was read.
    let ready = tokio::select! {
        ready = preflight(&settings, &mut make_sink) => ready?,
        () = shutdown.cancelled() => {
            tracing::info!("stopped during the startup checks");
            return Ok(());
        }
    };
    let Ready {
        prepared,
        columns,
        column_types,
        keys,
    } = ready;
    let options = stream_options(&settings, &prepared, keys);
    let session = Session {
        settings: &settings,
        options: &options,
        columns: &columns,
        column_types: &column_types,
        metrics: &metrics,
        status: &status,
        shutdown: &shutdown,
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut waiting_for_slot = false;
    loop {
        let err = match session.run(&mut make_sink, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e),
        };
        let delay = match err {
            // Standing by: look again soon, so that a takeover follows the other session's
            // end (at most wal_sender_timeout after it stopped answering) within seconds.
            RunError::Stream(StreamError::SlotInUse { .. }) => STANDBY_POLL,
            _ => backoff.next_delay(),
        };
        log_session_end(&settings, &err, delay, &mut waiting_for_slot);
        if !matches!(err, RunError::Stream(StreamError::SlotInUse { .. })) {
            metrics.reconnects.inc();
        }
        failpoint::hit(failpoint::DURING_RECONNECT);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// How often an instance standing by (the slot streamed by another session) tries it again.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// What startup found: the slot and table, the columns routes read (and their types, empty
/// for table-less messages), and the keys messages must be signed with. The broker answered.
struct Ready {
    prepared: Prepared,
    columns: Vec<String>,
    column_types: Vec<u32>,
    keys: MessageKeys,
}

/// Startup: everything must be in place, or one clear message.
///
/// The broker is asked with a sink of its own (each session builds one for the WAL history
/// it streams, see [`Session::run`]).
async fn preflight<S, F>(settings: &RunSettings, make_sink: &mut F) -> Result<Ready, RunError>
where
    S: Sink,
    F: FnMut(Option<&WalOrigin>) -> Result<S, SinkError>,
{
    let spec = SlotSpec {
        slot: &settings.slot,
        publication: &settings.publication,
        table: &settings.table,
        failover: false,
        source: settings.source,
    };
    let client = settings
        .conn
        .connect()
        .await
        .map_err(RunError::connect(&settings.conn))?;
    let prepared = slot::prepare(&client, spec, Mode::Check).await?;
    keep_slot_record(&client, settings, &prepared).await;
    let keys = keys::load(&client).await.map_err(SlotError::from)?;
    if keys.is_empty() && settings.source == Source::Messages {
        return Err(RunError::NoMessageKey);
    }
    drop(client);
    // The columns routes read: the table's, or the fields of table-less messages.
    let (columns, types) = match (&prepared.table, settings.source) {
        (Some(table), Source::Table) => (table.columns.clone(), table.types.clone()),
        _ => (message::event_columns(), Vec::new()),
    };
    Router::bind_typed(&settings.route, &columns, &types)?;
    let mut sink = make_sink(None).map_err(|source| RunError::Sink {
        broker: settings.broker,
        source,
    })?;
    sink.ping().await.map_err(|source| {
        RunError::ping(settings.broker, settings.broker_target.clone(), source)
    })?;
    tracing::info!(
        postgres = %settings.conn,
        slot = %settings.slot,
        table = %prepared.table.as_ref().map_or_else(
            || "none (table-less messages)".to_owned(),
            |t| format!("{}.{}", t.schema, t.name)
        ),
        broker = settings.broker,
        target = %settings.broker_target,
        confirmed_flush_lsn = %prepared.slot.confirmed_flush_lsn.unwrap_or_default(),
        http = %settings.http,
        "outboxd starting"
    );
    Ok(Ready {
        prepared,
        columns,
        column_types: types,
        keys,
    })
}

/// Makes sure outboxd's record knows the slot (adopting one made before it kept records), so
/// that `setup` notices if it is ever lost. A database without schema outboxd still
/// streams, with a warning.
async fn keep_slot_record(
    client: &tokio_postgres::Client,
    settings: &RunSettings,
    prepared: &Prepared,
) {
    let access = match state::access(client).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %crate::report::one_line(&e), "cannot read schema outboxd");
            return;
        }
    };
    if !access.present {
        tracing::warn!(
            "schema outboxd is missing: outboxd keeps no record of its slot (if the slot is lost, \
             setup cannot tell), cannot verify its signed messages (replays and backfills are \
             refused) and cannot keep dead letters too large for the broker (outboxd stops at \
             one). As the admin, apply sql/state.sql and sql/role.sql"
        );
        return;
    }
    if !access.slots {
        tracing::warn!(
            "role may not record its slot in outboxd.slots: apply sql/role.sql as the admin"
        );
        return;
    }
    match slots::adopt(
        client,
        &settings.slot,
        &settings.publication,
        prepared.slot.confirmed_flush_lsn,
    )
    .await
    {
        Ok(true) => tracing::info!(slot = %settings.slot, "recorded the slot in outboxd.slots"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %crate::report::one_line(&e), "cannot record the slot in outboxd.slots")
        }
    }
}

/// What every session streams.
fn stream_options(settings: &RunSettings, prepared: &Prepared, keys: MessageKeys) -> StreamOptions {
    StreamOptions {
        slot: settings.slot.clone(),
        publication: settings.publication.clone(),
        table_oid: prepared.table.as_ref().map_or(0, |t| t.oid),
        table_name: prepared
            .table
            .as_ref()
            .map(|t| (t.schema.clone(), t.name.clone()))
            .unwrap_or_default(),
        status_interval: settings.status_interval,
        wal_sender_timeout: settings.wal_sender_timeout,
        buffer_messages: read_ahead_messages(settings.max_inflight_bytes),
        source: settings.source,
        keys,
    }
}

/// The row size the read-ahead is sized for: larger rows are rare, and take more.
const READ_AHEAD_ROW_BYTES: u64 = 1024 * 1024;

/// How many messages the replication client may read ahead of the pipeline: as many rows of
/// [`READ_AHEAD_ROW_BYTES`] as the in-flight budget holds (16 with the default budget), at
/// least 16 and at most 4096. While the budget is spent (a broker outage) the client holds
/// this many messages and stops reading the socket: with rows up to 1 MiB, the read-ahead
/// takes no more than the budget itself; a larger row counts as one message.
fn read_ahead_messages(max_inflight_bytes: u64) -> usize {
    usize::try_from((max_inflight_bytes / READ_AHEAD_ROW_BYTES).clamp(16, 4096)).unwrap_or(4096)
}

/// Logs why a session ended before the next one starts after `delay`: a slot taken by
/// another session once (this instance stands by), anything else each time.
fn log_session_end(
    settings: &RunSettings,
    err: &RunError,
    delay: Duration,
    waiting_for_slot: &mut bool,
) {
    match err {
        RunError::Stream(StreamError::SlotInUse { .. }) => {
            if !*waiting_for_slot {
                tracing::info!(
                    slot = %settings.slot,
                    "the slot is streamed by another session (another outboxd?); standing by to take over"
                );
                *waiting_for_slot = true;
            }
        }
        _ => {
            *waiting_for_slot = false;
            tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "replication session ended; reconnecting");
        }
    }
}
