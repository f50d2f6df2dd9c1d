//! One replication session: from the slot's confirmed position until the connection is lost,
//! the dispatcher fails, or shutdown.
//!
//! A session reads where the slot stands (another instance may have moved it), starts the
//! stream there, and spawns its tasks: the dispatcher, which owns the sink, and the
//! retention watch. Then one `select!` loop owns the replication connection: shutdown first,
//! then the dispatcher ending (a permanent broker error), then acknowledgements coming back
//! (each may let the slot confirm further), then the next WAL event, and the summary line.
//!
//! How a session ends decides what is confirmed:
//!
//! - shutdown: [`drain`](Session::drain) stops reading, waits (up to `drain_timeout`) for
//!   the dispatcher to send what it holds, confirms the final position and ends the stream;
//! - a failure: nothing more is confirmed (the next session resumes from the slot); the batch
//!   being sent gets [`SETTLE_TIMEOUT`] to finish first ([`settle`](Session::settle)).
//!
//! Either way the session's tasks are joined before it returns.

use std::sync::Arc;
use std::time::Duration;

use outboxd_core::{Lsn, Sink, SinkError, WalOrigin};
use outboxd_postgres::catalog;
use outboxd_postgres::message::MessageKind;
use outboxd_postgres::slot::SlotError;
use outboxd_postgres::state::keys::Refusal;
use outboxd_postgres::{StreamError, StreamOptions, WalEvent, WalStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::inflight::InFlight;
use super::routing::Routing;
use super::{RunError, RunSettings};
use crate::backoff::Backoff;
use crate::dispatch::{self, DispatchOptions};
use crate::failpoint;
use crate::metrics::{Metrics, ReasonLabel};
use crate::retention;
use crate::status::{Status, StreamingGuard};
use crate::tasks::Tasks;

/// How often the summary line is logged.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(30);

/// How long a session that failed waits for the batch being sent before it abandons it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a session's tasks get to stop once it ended, before they are aborted. The
/// dispatcher has ended or been aborted by then; the retention watch stops at once.
/// Part of the shutdown budget (`crate::commands::run`).
const TASKS_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the final position may take to reach Postgres at shutdown (part of the shutdown
/// budget).
const FINISH_TIMEOUT: Duration = Duration::from_secs(3);

/// What one replication session works with; the same for every session of a run.
pub(super) struct Session<'a> {
    pub settings: &'a RunSettings,
    pub options: &'a StreamOptions,
    /// The columns known at startup: messages read before the session's first Relation are
    /// routed with them.
    pub columns: &'a [String],
    /// Their type OIDs (empty for table-less messages), until the first Relation.
    pub column_types: &'a [u32],
    pub metrics: &'a Arc<Metrics>,
    pub status: &'a Arc<Status>,
    pub shutdown: &'a CancellationToken,
}

/// A session's state while it streams.
struct Streaming<'a> {
    stream: WalStream,
    /// Records read and not acknowledged, and what may be confirmed.
    inflight: InFlight,
    /// How WAL rows and messages become records.
    routing: Routing<'a>,
    /// Records acknowledged since the session began, from the dispatcher.
    acks: mpsc::UnboundedReceiver<u64>,
    /// The dispatcher's task: it ends only when its input closes or the sink fails.
    dispatcher: JoinHandle<Result<(), SinkError>>,
    /// Whether `dispatcher` has been awaited to its end.
    dispatcher_ended: bool,
    /// The session's tasks, joined when it ends.
    tasks: Tasks,
    /// Cancelled when the session ends: stops the tasks that watch it.
    ending: CancellationToken,
    /// Logs the summary line every [`SUMMARY_INTERVAL`].
    summary: Summary,
    /// Says, at most once per [`REFUSALS_INTERVAL`], which messages were refused.
    refusals: Refusals,
}

impl Session<'_> {
    /// Streams until shutdown (`Ok`) or an error; `backoff` is reset once streaming starts.
    /// The session's sink is made by `make_sink` for the WAL history the stream turned out to
    /// be (effectively-once sinks keep their markers under it).
    pub(super) async fn run<S, F>(
        &self,
        make_sink: &mut F,
        backoff: &mut Backoff,
    ) -> Result<(), RunError>
    where
        S: Sink + 'static,
        F: FnMut(Option<&WalOrigin>) -> Result<S, SinkError>,
    {
        // A stop while connecting (Postgres not answering) ends here: nothing was read.
        let (stream, start) = tokio::select! {
            opened = self.open() => opened?,
            () = self.shutdown.cancelled() => return Ok(()),
        };
        let sink = make_sink(Some(stream.origin())).map_err(|source| RunError::Sink {
            broker: self.settings.broker,
            source,
        })?;
        backoff.reset();
        tracing::info!(
            slot = %self.settings.slot,
            from = %start,
            timeline = stream.origin().timeline,
            "streaming"
        );
        let _streaming = StreamingGuard::new(self.status);
        let mut s = self.begin(stream, start, sink)?;
        let (tasks, ending) = (s.tasks.clone(), s.ending.clone());
        let result = match self.read(&mut s).await {
            Ok(()) => self.drain(s).await,
            Err(e) => self.settle(s, e).await,
        };
        ending.cancel();
        tasks.join(TASKS_STOP_TIMEOUT).await;
        // Whatever the session's stall watch reported ends with it (the watch may have been
        // stopped in the middle of a query, before it could say so).
        self.status.set_stall(None);
        self.metrics.stalled.set(0);
        result
    }

    /// Reads where the slot stands and starts streaming from its confirmed position.
    async fn open(&self) -> Result<(WalStream, Lsn), RunError> {
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
        // Streamed by another session: standing by costs no replication connection.
        if let Some(pid) = slot.active_pid.filter(|_| slot.active) {
            return Err(StreamError::SlotInUse {
                slot: settings.slot.clone(),
                detail: format!("active for PID {pid}"),
            }
            .into());
        }
        let start = slot.confirmed_flush_lsn.unwrap_or_default();
        let stream = WalStream::start(&settings.conn, self.options.clone(), start).await?;
        Ok((stream, start))
    }

    /// Spawns the session's tasks (retention watch, dispatcher) around `stream`.
    fn begin<S: Sink + 'static>(
        &self,
        stream: WalStream,
        start: Lsn,
        sink: S,
    ) -> Result<Streaming<'_>, RunError> {
        let settings = self.settings;
        // The only step that may fail, before any task is spawned.
        let routing = Routing::new(&settings.route, self.columns, self.column_types)?;
        let tasks = Tasks::new();
        let ending = self.shutdown.child_token();
        let watch = retention::watch(
            settings.conn.clone(),
            settings.slot.clone(),
            self.metrics.clone(),
            self.status.clone(),
            ending.clone(),
        );
        let stop_watching = ending.clone();
        tasks.spawn("retention watch", async move {
            // Also in the middle of a query: it only reads, and the next session starts sooner.
            tokio::select! {
                () = watch => {}
                () = stop_watching.cancelled() => {}
            }
        });
        let (inflight, end) = InFlight::new(
            start,
            settings.max_inflight_events,
            settings.max_inflight_bytes,
            self.metrics.clone(),
        );
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let dispatcher = tasks.spawn(
            "dispatcher",
            dispatch::run(
                sink,
                end.records,
                acks_tx,
                end.budget,
                DispatchOptions {
                    max_batch: settings.max_batch_events,
                    linger: settings.linger,
                    broker: settings.broker,
                    spans: settings.spans.clone(),
                },
                Some(crate::dead_letters::Keeper::new(
                    settings.conn.clone(),
                    settings.slot.clone(),
                )),
                self.metrics.clone(),
                self.status.clone(),
            ),
        );
        Ok(Streaming {
            stream,
            inflight,
            routing,
            acks,
            dispatcher,
            dispatcher_ended: false,
            tasks,
            ending,
            summary: Summary::new(self.metrics.forwarded_total()),
            refusals: Refusals::default(),
        })
    }

    /// The session's loop: returns `Ok` on shutdown, or why the session must end.
    async fn read(&self, s: &mut Streaming<'_>) -> Result<(), RunError> {
        // The interval's first tick is immediate: the first summary comes after a period.
        s.summary.interval.tick().await;
        // Postgres shutting down and waiting on a confirmation the broker does not allow:
        // end the session so that it can stop (polled also while a record waits for room).
        let server_stopping = s.stream.server_stopping();
        tokio::pin!(server_stopping);
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Ok(()),
                stopping = &mut server_stopping => return Err(stopping.into()),
                res = &mut s.dispatcher => {
                    s.dispatcher_ended = true;
                    return Err(RunError::dispatcher_ended(self.settings.broker, res));
                }
                Some(acked) = s.acks.recv() => self.acknowledged(s, acked),
                event = s.stream.next() => {
                    let event = event?;
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => return Ok(()),
                        stopping = &mut server_stopping => return Err(stopping.into()),
                        res = self.handle(s, event) => res?,
                    }
                }
                _ = s.summary.interval.tick() => {
                    s.summary.log(self.metrics, self.status, &s.inflight);
                }
            }
        }
    }

    /// Acts on one event from the WAL.
    async fn handle(&self, s: &mut Streaming<'_>, event: WalEvent) -> Result<(), RunError> {
        match event {
            WalEvent::Relation(rel) => {
                let columns = rel.columns.iter().map(|c| c.name.clone()).collect();
                let types: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
                s.routing.rebind(columns, &types)?;
            }
            WalEvent::Row {
                values,
                position,
                commit_time_micros,
            } => {
                let record = s.routing.row(&values, position, commit_time_micros);
                s.inflight.forward(record).await?;
            }
            WalEvent::Message {
                kind,
                content,
                position,
                commit_time_micros,
            } => {
                let record = s
                    .routing
                    .message(kind, content, position, commit_time_micros);
                s.inflight.forward(record).await?;
            }
            WalEvent::Commit { end_lsn, .. } => {
                if let Some(lsn) = s.inflight.mark(end_lsn) {
                    s.stream.confirm(lsn);
                }
            }
            WalEvent::Idle { wal_end } => {
                self.status.set_server_wal_end(wal_end.get());
                if let Some(lsn) = s.inflight.mark(wal_end) {
                    s.stream.confirm(lsn);
                }
            }
            WalEvent::Refused { kind, lsn, reason } => {
                self.metrics
                    .messages_refused
                    .get_or_create(&ReasonLabel {
                        reason: reason.label().to_owned(),
                    })
                    .inc();
                s.refusals.report(kind, lsn, reason);
            }
        }
        Ok(())
    }

    /// The dispatcher reports `acked` records acknowledged: confirm what that lets go.
    fn acknowledged(&self, s: &mut Streaming<'_>, acked: u64) {
        failpoint::hit(failpoint::AFTER_ACK_BEFORE_CONFIRM);
        if s.stream.in_transaction() {
            failpoint::hit(failpoint::MID_TRANSACTION);
        }
        let Some(lsn) = s.inflight.acknowledged(acked) else {
            return;
        };
        s.stream.confirm(lsn);
        if failpoint::is_armed(failpoint::AFTER_CONFIRM) {
            // Crash once Postgres has been told.
            let reported = s.stream.reported_handle();
            let ending = s.ending.clone();
            s.tasks.spawn("after-confirm failpoint", async move {
                while reported() < lsn {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(5)) => {}
                        () = ending.cancelled() => return,
                    }
                }
                failpoint::hit(failpoint::AFTER_CONFIRM);
            });
        }
    }

    /// After a failure: let the batch being sent finish (briefly) before the next session
    /// starts with a new sink. A Kafka transaction still committing in the background would
    /// otherwise land after the new sink read the committed position, and be sent again.
    /// Nothing is confirmed from here, so the replication session is closed first; the next
    /// session resumes from the slot.
    ///
    /// That batch may also end in a permanent error (a Kafka producer fenced by another
    /// outboxd that took the slot over while this one was frozen): then that error is the
    /// reason to stop, not the lost session, which would only make this instance stand by for
    /// the slot.
    async fn settle(&self, mut s: Streaming<'_>, error: RunError) -> Result<(), RunError> {
        // Nothing is confirmed from here on: release the walsender at once (Postgres, if it
        // is shutting down, waits for it).
        s.stream.close();
        if s.dispatcher_ended {
            return Err(error);
        }
        s.inflight.close();
        match tokio::time::timeout(SETTLE_TIMEOUT, &mut s.dispatcher).await {
            Err(_) => s.dispatcher.abort(),
            Ok(Ok(Err(sink))) if !sink.is_transient() => {
                tracing::debug!(session = %error, "the session ended, and the batch being sent failed permanently");
                return Err(RunError::dispatcher_ended(
                    self.settings.broker,
                    Ok(Err(sink)),
                ));
            }
            Ok(_) => {}
        }
        Err(error)
    }

    /// Graceful stop: no more reading; wait for in-flight records; confirm; end the session.
    async fn drain(&self, mut s: Streaming<'_>) -> Result<(), RunError> {
        tracing::info!(
            in_flight = s.inflight.in_flight(),
            "stopping: draining in-flight events"
        );
        s.inflight.close();
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout;
        let mut failure = None;
        while s.inflight.in_flight() > 0 {
            tokio::select! {
                biased;
                Some(acked) = s.acks.recv() => self.acknowledged(&mut s, acked),
                res = &mut s.dispatcher => {
                    // Ended: either drained (its last acks are queued) or failed.
                    if let Ok(Err(e)) = res {
                        failure = Some(e);
                    }
                    while let Ok(acked) = s.acks.try_recv() {
                        self.acknowledged(&mut s, acked);
                    }
                    break;
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        unacknowledged = s.inflight.in_flight(),
                        "the broker did not acknowledge every in-flight event in time; they will be sent again on the next start"
                    );
                    break;
                }
            }
        }
        s.dispatcher.abort();
        let confirmed = s.inflight.confirmed();
        let reported = s.stream.finish(confirmed, FINISH_TIMEOUT).await;
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

/// Least time between two warnings about refused messages.
const REFUSALS_INTERVAL: Duration = Duration::from_secs(60);

/// Warns about messages with outboxd's prefixes that are not acted on: the first at once,
/// then at most one line per [`REFUSALS_INTERVAL`] with how many came since.
#[derive(Debug, Default)]
struct Refusals {
    last_warning: Option<std::time::Instant>,
    since_warning: u64,
}

impl Refusals {
    fn report(&mut self, kind: MessageKind, lsn: Lsn, reason: Refusal) {
        self.since_warning += 1;
        if self
            .last_warning
            .is_some_and(|t| t.elapsed() < REFUSALS_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            kind = ?kind,
            %lsn,
            reason = reason.label(),
            refused = self.since_warning,
            "a logical decoding message with an outboxd prefix is not acted on: {}. Nothing of \
             it is published. Whoever writes such messages can write to the WAL but not \
             through outboxd; see docs/guarantees.md (\"Who can publish\")",
            reason.explain()
        );
        self.last_warning = Some(std::time::Instant::now());
        self.since_warning = 0;
    }
}

/// The summary line: events forwarded over the last interval, and where the slot stands.
struct Summary {
    interval: tokio::time::Interval,
    /// `forwarded_total` at the previous line.
    last_forwarded: u64,
}

impl Summary {
    fn new(forwarded: u64) -> Self {
        Summary {
            interval: tokio::time::interval(SUMMARY_INTERVAL),
            last_forwarded: forwarded,
        }
    }

    fn log(&mut self, metrics: &Metrics, status: &Status, inflight: &InFlight) {
        let forwarded = metrics.forwarded_total();
        let confirmed = inflight.confirmed();
        tracing::info!(
            forwarded = forwarded - self.last_forwarded,
            per_second = (forwarded - self.last_forwarded) / SUMMARY_INTERVAL.as_secs(),
            dead_lettered_total = metrics.dead_lettered_total(),
            in_flight = inflight.in_flight(),
            confirmed_lsn = %confirmed,
            lag_bytes = confirmed.bytes_until(Lsn::new(status.server_wal_end())),
            "summary"
        );
        self.last_forwarded = forwarded;
    }
}
