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
//! [`Checkpoint`]. Each Commit's end LSN (and, between transactions, each keepalive's WAL
//! end) is recorded as a mark after the records read before it. The dispatcher reports how
//! many records the broker has acknowledged; the checkpoint turns that into the newest mark
//! whose records are all acknowledged, and only that position is confirmed to the slot. So
//! the slot never passes an unacknowledged event (guarantee 2), and an idle outbox confirms
//! the server's position at each keepalive (guarantee 5).
//!
//! Memory is bounded by the in-flight budget: at most `max_inflight_events` records and
//! `max_inflight_bytes` bytes are read and not yet acknowledged. When the budget is spent the
//! loop stops reading the WAL, pgwire-replication keeps the session alive with status
//! updates, and TCP flow control holds the walsender back.
//!
//! Failures. At startup, anything wrong (Postgres unreachable, slot missing, broker
//! unreachable) stops the process with one clear message. Once streaming, a lost replication
//! connection ends the session and a new one starts from the slot after a backoff; a broker
//! that fails transiently has its batch retried by the dispatcher while the session waits.
//! Permanent errors (slot dropped or invalidated, broker refusing credentials) stop outboxd.
//!
//! Shutdown: stop reading, let the dispatcher drain what is in flight (bounded by
//! `drain_timeout`), confirm the final position, end the session.

use std::sync::Arc;
use std::time::Duration;

use outboxd_core::{
    Checkpoint, Event, Headers, Lsn, Poison, PoisonKind, Position, Record, RouteError, RouteSpec,
    Router, Sink, SinkError,
};
use outboxd_postgres::catalog;
use outboxd_postgres::message::{self, MessageKind};
use outboxd_postgres::slot::{self, Mode, SlotError, SlotSpec};
use outboxd_postgres::{ConnInfo, Source, StreamError, StreamOptions, WalEvent, WalStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::dispatch::{self, DispatchOptions, Queued};
use crate::failpoint;
use crate::metrics::{Metrics, seconds_between, unix_micros_now};
use crate::retention;
use crate::status::{Status, StreamingGuard};

/// The header that marks a replayed event (`outboxd replay`).
pub const REPLAY_HEADER: &str = "outboxd-replay";

/// The dead-letter record of a message whose content cannot be decoded: its content as the
/// payload, its WAL position as the id.
fn invalid_message(
    content: bytes::Bytes,
    position: Position,
    commit_time_micros: i64,
    error: &message::MessageError,
) -> Record {
    Record::dead_letter(
        Event {
            id: bytes::Bytes::from(position.to_string()),
            topic: String::new(),
            key: bytes::Bytes::new(),
            event_type: bytes::Bytes::new(),
            payload: content,
            headers: Headers::empty(),
            position,
            commit_time_micros,
        },
        Poison::new(PoisonKind::InvalidMessage, error.to_string()),
    )
}

/// How often the summary line is logged.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(30);

/// How long a session that failed waits for the batch being sent before it abandons it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

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
}

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Postgres could not be reached.
    #[error(
        "cannot connect to Postgres at {target}: {}. {advice}",
        crate::report::one_line(.source)
    )]
    Connect {
        /// The server, without password.
        target: String,
        /// What to do: the TLS setting to change, or where to look.
        advice: String,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Postgres is not set up for outboxd.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The replication stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The route does not fit the table.
    #[error("the route does not fit the outbox table: {0}")]
    Route(#[from] RouteError),
    /// The broker could not be reached at startup.
    #[error(
        "cannot reach {broker} at {target}: {}. Check the [sink.{broker}] settings and that \
         the broker is running",
        crate::report::one_line(.source)
    )]
    BrokerUnreachable {
        /// The broker.
        broker: &'static str,
        /// Its address, without secrets.
        target: String,
        /// Why.
        #[source]
        source: SinkError,
    },
    /// The broker answered at startup and refused outboxd (credentials, permissions).
    #[error(
        "{broker} at {target} refused outboxd: {}",
        crate::report::one_line(.source)
    )]
    BrokerRefused {
        /// The broker.
        broker: &'static str,
        /// Its address, without secrets.
        target: String,
        /// Why.
        #[source]
        source: SinkError,
    },
    /// The broker failed in a way retrying cannot fix.
    #[error("{broker} failed permanently: {source}")]
    Sink {
        /// The broker.
        broker: &'static str,
        /// Why.
        #[source]
        source: SinkError,
    },
}

impl RunError {
    /// Postgres could not be reached at `conn`.
    pub fn connect(conn: &ConnInfo) -> impl FnOnce(tokio_postgres::Error) -> RunError + '_ {
        move |source| RunError::Connect {
            target: conn.to_string(),
            advice: conn
                .tls_advice(&crate::report::one_line(&source))
                .unwrap_or_else(|| {
                    "Check postgres.url and that Postgres is running and accepts connections \
                     from here"
                        .to_owned()
                }),
            source,
        }
    }

    /// Whether a new session may succeed.
    fn is_transient(&self) -> bool {
        match self {
            RunError::Connect { .. } => true,
            RunError::Stream(e) => e.is_transient(),
            RunError::Slot(SlotError::Postgres { .. }) => true,
            _ => false,
        }
    }
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
    F: FnMut() -> Result<S, SinkError>,
{
    let spec = SlotSpec {
        slot: &settings.slot,
        publication: &settings.publication,
        table: &settings.table,
        failover: false,
        source: settings.source,
    };
    // Startup: everything must be in place, or one clear message.
    let client = settings
        .conn
        .connect()
        .await
        .map_err(RunError::connect(&settings.conn))?;
    let prepared = slot::prepare(&client, spec, Mode::Check).await?;
    drop(client);
    // The columns routes read: the table's, or the fields of table-less messages.
    let columns = match (&prepared.table, settings.source) {
        (Some(table), Source::Table) => table.columns.clone(),
        _ => message::event_columns(),
    };
    Router::bind(&settings.route, &columns)?;
    let sink_error = |source| RunError::Sink {
        broker: settings.broker,
        source,
    };
    let mut sink = make_sink().map_err(sink_error)?;
    sink.ping().await.map_err(|source| {
        let (broker, target) = (settings.broker, settings.broker_target.clone());
        if source.is_transient() {
            RunError::BrokerUnreachable {
                broker,
                target,
                source,
            }
        } else {
            RunError::BrokerRefused {
                broker,
                target,
                source,
            }
        }
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

    let options = StreamOptions {
        slot: settings.slot.clone(),
        publication: settings.publication.clone(),
        table_oid: prepared.table.as_ref().map_or(0, |t| t.oid),
        table_name: prepared
            .table
            .as_ref()
            .map(|t| (t.schema.clone(), t.name.clone()))
            .unwrap_or_default(),
        status_interval: settings.status_interval,
        buffer_messages: 4096,
        source: settings.source,
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut sink = Some(sink);
    let mut waiting_for_slot = false;
    loop {
        let s = match sink.take() {
            Some(s) => s,
            None => make_sink().map_err(sink_error)?,
        };
        let mut session = Session {
            settings: &settings,
            options: &options,
            columns: &columns,
            metrics: &metrics,
            status: &status,
            shutdown: &shutdown,
        };
        let err = match session.run(s, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e),
        };
        let delay = backoff.next_delay();
        match &err {
            RunError::Stream(StreamError::SlotInUse { .. }) => {
                if !waiting_for_slot {
                    tracing::info!(
                        slot = %settings.slot,
                        "the slot is streamed by another session (another outboxd?); standing by to take over"
                    );
                    waiting_for_slot = true;
                }
            }
            _ => {
                waiting_for_slot = false;
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "replication session ended; reconnecting");
            }
        }
        metrics.reconnects.inc();
        failpoint::hit(failpoint::DURING_RECONNECT);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// One replication session.
struct Session<'a> {
    settings: &'a RunSettings,
    options: &'a StreamOptions,
    /// The columns known at startup: messages read before the session's first Relation are
    /// routed with them.
    columns: &'a [String],
    metrics: &'a Arc<Metrics>,
    status: &'a Arc<Status>,
    shutdown: &'a CancellationToken,
}

/// What the session reads into.
struct Flow {
    checkpoint: Checkpoint,
    router: Option<Router>,
    /// The columns `router` is bound to: messages are decoded into them.
    columns: Vec<String>,
    records: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    max_permits: u32,
}

impl Session<'_> {
    async fn run<S: Sink + 'static>(
        &mut self,
        sink: S,
        backoff: &mut Backoff,
    ) -> Result<(), RunError> {
        let settings = self.settings;
        // Where the slot stands now: another instance may have moved it.
        let client = settings
            .conn
            .connect()
            .await
            .map_err(RunError::connect(&settings.conn))?;
        let slot = catalog::slot(&client, &settings.slot)
            .await
            .map_err(|source| SlotError::Postgres {
                what: "reading the slot",
                source,
            })?
            .ok_or_else(|| StreamError::SlotMissing {
                slot: settings.slot.clone(),
            })?;
        drop(client);
        // Before any event: the effectively-once Redis sink judges replays against it.
        self.status.set_server_wal_end(slot.current_wal_lsn.get());
        if slot.is_invalidated() {
            return Err(SlotError::invalidated(&slot).into());
        }
        let start = slot.confirmed_flush_lsn.unwrap_or_default();
        let mut stream = WalStream::start(&settings.conn, self.options.clone(), start).await?;
        backoff.reset();
        tracing::info!(slot = %settings.slot, from = %start, "streaming");
        let _streaming = StreamingGuard::new(self.status);
        let watching = self.shutdown.child_token();
        let _stop_watching = watching.clone().drop_guard();
        tokio::spawn(retention::watch(
            settings.conn.clone(),
            settings.slot.clone(),
            self.metrics.clone(),
            self.status.clone(),
            watching,
        ));

        let max_bytes = u32::try_from(settings.max_inflight_bytes).unwrap_or(u32::MAX);
        let budget = Arc::new(Semaphore::new(max_bytes as usize));
        let (records_tx, records_rx) = mpsc::channel(settings.max_inflight_events);
        let (acks_tx, mut acks) = mpsc::unbounded_channel();
        let mut dispatcher: JoinHandle<Result<(), SinkError>> = tokio::spawn(dispatch::run(
            sink,
            records_rx,
            acks_tx,
            budget.clone(),
            DispatchOptions {
                max_batch: settings.max_batch_events,
                linger: settings.linger,
                broker: settings.broker,
            },
            self.metrics.clone(),
            self.status.clone(),
        ));
        let mut flow = Flow {
            checkpoint: Checkpoint::new(start),
            router: Some(Router::bind(&settings.route, self.columns)?),
            columns: self.columns.to_vec(),
            records: records_tx,
            budget,
            max_permits: max_bytes,
        };
        self.metrics.confirmed_lsn.set(start.get());
        let mut summary = tokio::time::interval(SUMMARY_INTERVAL);
        summary.tick().await;
        let mut last_forwarded = self.metrics.forwarded_total();

        let mut dispatcher_ended = false;
        let result: Result<(), RunError> = loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break Ok(()),
                res = &mut dispatcher => {
                    dispatcher_ended = true;
                    break Err(self.dispatcher_ended(res));
                }
                Some(acked) = acks.recv() => self.acknowledged(&mut flow.checkpoint, &stream, acked),
                event = stream.next() => {
                    let event = match event {
                        Ok(event) => event,
                        Err(e) => break Err(e.into()),
                    };
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => break Ok(()),
                        res = self.handle(&mut flow, &stream, event) => {
                            if let Err(e) = res {
                                break Err(e);
                            }
                        }
                    }
                }
                _ = summary.tick() => {
                    let forwarded = self.metrics.forwarded_total();
                    let confirmed = flow.checkpoint.confirmed();
                    tracing::info!(
                        forwarded = forwarded - last_forwarded,
                        per_second = (forwarded - last_forwarded) / SUMMARY_INTERVAL.as_secs(),
                        dead_lettered_total = self.metrics.dead_lettered_total(),
                        in_flight = flow.checkpoint.in_flight(),
                        confirmed_lsn = %confirmed,
                        lag_bytes = confirmed.bytes_until(Lsn::new(self.status.server_wal_end())),
                        "summary"
                    );
                    last_forwarded = forwarded;
                }
            }
        };

        if let Err(e) = result {
            // Let the batch being sent finish (briefly) before the next session starts with a
            // new sink: a Kafka transaction still committing in the background would
            // otherwise land after the new sink read the committed position, and be sent
            // again. Nothing is confirmed from here; the next session resumes from the slot.
            //
            // That batch may also end in a permanent error (a Kafka producer fenced by another
            // outboxd that took the slot over while this one was frozen): then that error is
            // the reason to stop, not the lost session, which would only make this instance
            // stand by for the slot.
            if !dispatcher_ended {
                drop(flow);
                match tokio::time::timeout(SETTLE_TIMEOUT, &mut dispatcher).await {
                    Err(_) => dispatcher.abort(),
                    Ok(Ok(Err(sink))) if !sink.is_transient() => {
                        tracing::debug!(session = %e, "the session ended, and the batch being sent failed permanently");
                        return Err(self.dispatcher_ended(Ok(Err(sink))));
                    }
                    Ok(_) => {}
                }
            }
            return Err(e);
        }
        self.drain(flow, stream, acks, dispatcher).await
    }

    /// Acts on one event from the WAL.
    async fn handle(
        &self,
        flow: &mut Flow,
        stream: &WalStream,
        event: WalEvent,
    ) -> Result<(), RunError> {
        match event {
            WalEvent::Relation(rel) => {
                let columns: Vec<String> = rel.columns.iter().map(|c| c.name.clone()).collect();
                flow.router = Some(Router::bind(&self.settings.route, &columns)?);
                flow.columns = columns;
            }
            WalEvent::Row {
                values,
                position,
                commit_time_micros,
            } => {
                let router = flow.router.as_ref().ok_or_else(|| {
                    StreamError::Sequence("outbox row before the table's shape".into())
                })?;
                let record = router.route(&values, position, commit_time_micros);
                self.forward(flow, record).await?;
            }
            WalEvent::Message {
                kind,
                content,
                position,
                commit_time_micros,
            } => {
                let router = flow.router.as_ref().ok_or_else(|| {
                    StreamError::Sequence("outbox message before the table's shape".into())
                })?;
                let record = match message::decode(kind, &content, &flow.columns) {
                    Ok(row) => {
                        let mut record = router.route(&row.values, position, commit_time_micros);
                        if let Some(topic) = row.topic {
                            record.event.topic = topic;
                        }
                        if kind == MessageKind::Replay {
                            record.event.headers.push_front(REPLAY_HEADER, "true");
                        }
                        record
                    }
                    Err(e) => invalid_message(content, position, commit_time_micros, &e),
                };
                self.forward(flow, record).await?;
            }
            WalEvent::Commit { end_lsn, .. } => self.confirm(flow, stream, end_lsn),
            WalEvent::Idle { wal_end } => {
                self.status.set_server_wal_end(wal_end.get());
                self.confirm(flow, stream, wal_end);
            }
        }
        Ok(())
    }

    /// Hands `record` to the dispatcher, within the in-flight budget.
    async fn forward(&self, flow: &mut Flow, record: Record) -> Result<(), RunError> {
        self.metrics.commit_to_read_seconds.observe(seconds_between(
            record.event.commit_time_micros,
            unix_micros_now(),
        ));
        let permits = u32::try_from(record.size())
            .unwrap_or(u32::MAX)
            .min(flow.max_permits);
        // Waiting here is the backpressure: the WAL is not read while the budget is spent.
        match flow.budget.acquire_many(permits).await {
            Ok(p) => p.forget(),
            Err(_) => return Err(StreamError::Ended.into()),
        }
        flow.checkpoint.issue();
        if flow.records.send(Queued { record, permits }).await.is_err() {
            // The dispatcher ended; the select loop reports why.
            return Ok(());
        }
        self.metrics
            .inflight_events
            .set(flow.checkpoint.in_flight() as i64);
        Ok(())
    }

    fn confirm(&self, flow: &mut Flow, stream: &WalStream, lsn: Lsn) {
        if let Some(lsn) = flow.checkpoint.mark(lsn) {
            stream.confirm(lsn);
            self.metrics.confirmed_lsn.set(lsn.get());
        }
    }

    fn acknowledged(&self, checkpoint: &mut Checkpoint, stream: &WalStream, acked: u64) {
        failpoint::hit(failpoint::AFTER_ACK_BEFORE_CONFIRM);
        if stream.in_transaction() {
            failpoint::hit(failpoint::MID_TRANSACTION);
        }
        if let Some(lsn) = checkpoint.ack(acked) {
            stream.confirm(lsn);
            self.metrics.confirmed_lsn.set(lsn.get());
            if failpoint::is_armed(failpoint::AFTER_CONFIRM) {
                // Crash once Postgres has been told.
                let reported = stream.reported_handle();
                tokio::spawn(async move {
                    while reported() < lsn {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    failpoint::hit(failpoint::AFTER_CONFIRM);
                });
            }
        }
        self.metrics
            .inflight_events
            .set(checkpoint.in_flight() as i64);
    }

    fn dispatcher_ended(
        &self,
        res: Result<Result<(), SinkError>, tokio::task::JoinError>,
    ) -> RunError {
        let source = match res {
            Ok(Err(e)) => e,
            Ok(Ok(())) => SinkError::permanent("the sink driver stopped", "its input closed"),
            Err(e) => SinkError::permanent("the sink driver panicked", e.to_string()),
        };
        RunError::Sink {
            broker: self.settings.broker,
            source,
        }
    }

    /// Graceful stop: no more reading; wait for in-flight records; confirm; end the session.
    async fn drain(
        &self,
        flow: Flow,
        stream: WalStream,
        mut acks: mpsc::UnboundedReceiver<u64>,
        mut dispatcher: JoinHandle<Result<(), SinkError>>,
    ) -> Result<(), RunError> {
        let Flow {
            mut checkpoint,
            records,
            ..
        } = flow;
        tracing::info!(
            in_flight = checkpoint.in_flight(),
            "stopping: draining in-flight events"
        );
        drop(records);
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout;
        let mut failure = None;
        while checkpoint.in_flight() > 0 {
            tokio::select! {
                biased;
                Some(acked) = acks.recv() => self.acknowledged(&mut checkpoint, &stream, acked),
                res = &mut dispatcher => {
                    // Ended: either drained (its last acks are queued) or failed.
                    if let Ok(Err(e)) = res {
                        failure = Some(e);
                    }
                    while let Ok(acked) = acks.try_recv() {
                        self.acknowledged(&mut checkpoint, &stream, acked);
                    }
                    break;
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        unacknowledged = checkpoint.in_flight(),
                        "the broker did not acknowledge every in-flight event in time; they will be sent again on the next start"
                    );
                    break;
                }
            }
        }
        dispatcher.abort();
        let confirmed = checkpoint.confirmed();
        let reported = stream.finish(confirmed, Duration::from_secs(5)).await;
        tracing::info!(confirmed_lsn = %confirmed, reported, "stopped");
        match failure {
            Some(source) => Err(RunError::Sink {
                broker: self.settings.broker,
                source,
            }),
            None => Ok(()),
        }
    }
}
