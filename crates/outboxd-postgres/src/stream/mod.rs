//! The replication stream of the outbox table, as events the pipeline can act on.
//!
//! ```text
//! walsender ──pgoutput──▶ pgwire-replication ──▶ WalStream::next ──▶ WalEvent
//!                     ◀── standby status ◀── WalStream::confirm(lsn) ◀── checkpoint
//! ```
//!
//! [`WalStream`] owns one replication session: the connection, the confirmed position and
//! the errors of the server. What each message means is [`Machine`]'s ([`machine`], no I/O):
//! it checks the shape of the stream (`Begin → Relation/Insert… → Commit`, with the Commit's
//! LSN matching the Begin's), keeps the outbox table's latest Relation, skips other tables
//! and other kinds of change, and reports keepalives only between transactions, where their
//! WAL position is safe to confirm once everything before it is acknowledged.
//!
//! pgoutput (without streaming) sends a transaction only after it committed, so every row
//! between Begin and Commit is committed data: rows may be forwarded before their Commit
//! arrives. Rolled-back transactions never appear.
//!
//! Confirming is `WalStream::confirm`: the position is sent to the server with the next
//! standby status update (every `status_interval`). It only moves forward.
//!
//! A server shutting down waits for its client to confirm everything it sent, which outboxd
//! cannot while the broker is down: [`shutdown`] recognises that wait, and
//! `WalStream::server_stopping` tells the session to let the server go.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outboxd_core::origin::parse_timeline_history;
use outboxd_core::{Lsn, Position, WalOrigin};
use pgwire_replication::{PgWireError, ReplicationClient};

use crate::catalog::TlsState;
use crate::conninfo::ConnInfo;
use crate::decode::{DecodeError, Relation};
use crate::message::MessageKind;
use crate::state::keys::{MessageKeys, Refusal};

pub mod machine;
pub mod shutdown;

pub use machine::Machine;

/// How to open the stream.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// The replication slot.
    pub slot: String,
    /// The publication.
    pub publication: String,
    /// The outbox table's OID (rows of other relations are skipped).
    pub table_oid: u32,
    /// The outbox table's schema and name, to recognise it if recreated under a new OID.
    pub table_name: (String, String),
    /// How often confirmed positions are sent to the server.
    pub status_interval: Duration,
    /// The session's `wal_sender_timeout` (`None`: the server's): how soon the server ends
    /// the session of a client that stopped answering, which frees the slot for another.
    pub wal_sender_timeout: Option<Duration>,
    /// How many undecoded messages may wait between the socket and the pipeline.
    pub buffer_messages: usize,
    /// Where events come from: the table's rows, or table-less messages.
    pub source: Source,
    /// The keys outboxd's messages must be signed with (`outboxd.message_keys`): a message
    /// that is not signed by one of them is refused ([`WalEvent::Refused`]).
    pub keys: MessageKeys,
}

/// Where outbox events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Inserts into the outbox table, plus backfilled and replayed rows (messages
    /// `outboxd.backfill` and `outboxd.replay`).
    Table,
    /// Logical decoding messages with prefix `outboxd` (`outbox_emit_message`); no table.
    Messages,
}

/// What the pipeline acts on.
#[derive(Debug, Clone)]
pub enum WalEvent {
    /// The outbox table's shape; sent before its first row in a session and after changes.
    Relation(Arc<Relation>),
    /// An outbox row of a committed transaction.
    Row {
        /// The values in table column order, `None` for NULL.
        values: Vec<Option<Bytes>>,
        /// The row's position in the WAL.
        position: Position,
        /// The transaction's commit time, microseconds since the Unix epoch.
        commit_time_micros: i64,
    },
    /// One of outboxd's logical decoding messages (see [`crate::message`]), in a committed
    /// transaction; numbered among the transaction's rows.
    Message {
        /// Which kind.
        kind: MessageKind,
        /// Its content, to decode against the route's columns.
        content: Bytes,
        /// Its position in the WAL.
        position: Position,
        /// The transaction's commit time, microseconds since the Unix epoch.
        commit_time_micros: i64,
    },
    /// A message with one of outboxd's prefixes that is not acted on: not transactional, or
    /// not signed with a key of `outboxd.message_keys` (see [`crate::state::keys`]). Nothing
    /// of it reaches a broker.
    Refused {
        /// Which kind its prefix claims.
        kind: MessageKind,
        /// Its LSN.
        lsn: Lsn,
        /// Why.
        reason: Refusal,
    },
    /// The end of a transaction: its end LSN is safe once its rows are acknowledged.
    Commit {
        /// The LSN after the commit record: the position to confirm.
        end_lsn: Lsn,
        /// How many outbox rows the transaction held.
        rows: u32,
    },
    /// A keepalive between transactions: nothing before `wal_end` is left to send.
    Idle {
        /// The server's WAL position.
        wal_end: Lsn,
    },
}

/// Why the stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed or the server ended the session: reconnect and resume.
    #[error("replication connection lost: {0}")]
    Connection(#[source] PgWireError),
    /// Another session streams the slot (high availability: this instance waits).
    #[error("replication slot {slot:?} is in use by another session: {detail}")]
    SlotInUse {
        /// The slot name.
        slot: String,
        /// The server's message.
        detail: String,
    },
    /// The slot no longer exists.
    #[error(
        "replication slot {slot:?} no longer exists (it was dropped, or this server was promoted \
         from a standby that had no copy of it): outboxd does not recreate it, since events \
         committed meanwhile would be skipped. Recover with `outboxd setup --backfill-where \
         \"created_at >= '<a little before the loss>'\"`, which creates a new slot and publishes \
         the rows since then (docs/operations.md, \"Postgres failover\")"
    )]
    SlotMissing {
        /// The slot name.
        slot: String,
    },
    /// Postgres invalidated the slot.
    #[error(
        "replication slot {slot:?} was invalidated by Postgres ({detail}): events after its last \
         confirmed position are gone from the WAL. Recover them from the outbox table if you keep \
         rows, then `outboxd slot drop --yes` and `outboxd setup`"
    )]
    SlotInvalidated {
        /// The slot name.
        slot: String,
        /// The server's message.
        detail: String,
    },
    /// The replication connection's TLS handshake failed on the server's certificate or the
    /// TLS settings: retrying cannot fix it.
    #[error("the replication connection's TLS handshake failed: {detail}. {advice}")]
    Tls {
        /// What failed.
        detail: String,
        /// What to change.
        advice: String,
    },
    /// The server refused the session for a reason retrying cannot fix.
    #[error("postgres refused replication: {0}")]
    Refused(#[source] PgWireError),
    /// A message outboxd cannot decode.
    #[error("cannot decode the replication stream at {lsn}: {source}")]
    Decode {
        /// Where in the stream.
        lsn: Lsn,
        /// What is wrong.
        #[source]
        source: DecodeError,
    },
    /// The stream broke its own rules (for example a Commit that does not match its Begin).
    #[error("replication stream out of order: {0}")]
    Sequence(String),
    /// The server is shutting down and waits for a confirmation the broker does not allow
    /// (see [`shutdown`]): the session ends so that it can stop, and resumes from the slot.
    #[error(
        "Postgres is shutting down and has waited {waited:?} for outboxd to confirm WAL up to \
         {wal_end}, but the broker has not acknowledged the events after {confirmed}: closing the \
         replication connection so that Postgres can stop; outboxd resumes from the slot when \
         it is back"
    )]
    ServerStopping {
        /// The end of what the server sent.
        wal_end: Lsn,
        /// The position outboxd had confirmed.
        confirmed: Lsn,
        /// How long the server had waited with nothing newer confirmed.
        waited: Duration,
    },
    /// The session ended without an error.
    #[error("replication session ended")]
    Ended,
}

impl StreamError {
    /// Whether reconnecting may help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StreamError::Connection(_)
                | StreamError::SlotInUse { .. }
                | StreamError::ServerStopping { .. }
                | StreamError::Ended
        )
    }

    /// Like [`classify`](Self::classify), for the errors of opening a session, which may be
    /// TLS failures that `conn` can explain.
    fn classify_start(slot: &str, conn: &ConnInfo, err: PgWireError) -> StreamError {
        if let PgWireError::Tls(detail) = &err {
            return match conn.tls_advice(detail) {
                Some(advice) => StreamError::Tls {
                    detail: detail.clone(),
                    advice,
                },
                // A handshake cut short (reset, timeout) may go through next time.
                None => StreamError::Connection(err),
            };
        }
        Self::classify(slot, err)
    }

    fn classify(slot: &str, err: PgWireError) -> StreamError {
        let text = err.to_string();
        let sqlstate = text
            .rsplit_once("(SQLSTATE ")
            .and_then(|(_, rest)| rest.get(..5))
            .unwrap_or("");
        match &err {
            PgWireError::Server(_) => match sqlstate {
                "55006" => StreamError::SlotInUse {
                    slot: slot.to_owned(),
                    detail: text,
                },
                "42704" if text.contains("replication slot") => StreamError::SlotMissing {
                    slot: slot.to_owned(),
                },
                "55000" if text.contains("can no longer get changes") => {
                    StreamError::SlotInvalidated {
                        slot: slot.to_owned(),
                        detail: text,
                    }
                }
                // Shutdown, crash, "cannot connect now", too many connections, lost primary,
                // serialization trouble: all pass.
                s if s.starts_with("57") || s.starts_with("53") || s.starts_with("08") => {
                    StreamError::Connection(err)
                }
                "40001" | "40P01" => StreamError::Connection(err),
                _ => StreamError::Refused(err),
            },
            PgWireError::Auth(_) | PgWireError::Tls(_) | PgWireError::MessageTooLarge { .. } => {
                StreamError::Refused(err)
            }
            _ => StreamError::Connection(err),
        }
    }
}

/// Opens a replication connection the way `run` does (same TLS, same authentication,
/// `replication=database`), reads its TLS state, and ends it without streaming: a preflight
/// of the connection `run` streams on, harmless while another session streams the slot.
pub async fn probe_replication(
    conn: &ConnInfo,
    slot: &str,
    publication: &str,
) -> Result<TlsState, StreamError> {
    let config = conn
        .replication_config(slot, publication)
        .await
        .map_err(|e| StreamError::classify_start(slot, conn, e))?;
    let mut client = ReplicationClient::connect_gated(config)
        .await
        .map_err(|e| StreamError::classify_start(slot, conn, e))?;
    let rows = client
        .simple_query(TlsState::QUERY)
        .await
        .map_err(|e| StreamError::classify_start(slot, conn, e))?;
    // Dropping the gated client ends the session with a Terminate message.
    drop(client);
    let text = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i).cloned().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    Ok(TlsState {
        ssl: text(0).as_deref() == Some("t"),
        version: text(1),
        cipher: text(2),
    })
}

/// `IDENTIFY_SYSTEM`, and on a timeline after the first its `TIMELINE_HISTORY`, on a gated
/// session: the history its stream will be of.
async fn identify(client: &mut ReplicationClient, slot: &str) -> Result<WalOrigin, PgWireError> {
    let system = client.identify_system().await?;
    let ancestors = if system.timeline > 1 {
        let history = client.timeline_history(system.timeline).await?;
        let text = String::from_utf8_lossy(&history.content);
        parse_timeline_history(&text).ok_or_else(|| {
            PgWireError::Protocol(format!(
                "timeline history file {} cannot be read: {text:?}",
                history.filename
            ))
        })?
    } else {
        Vec::new()
    };
    Ok(WalOrigin {
        system_id: system.system_id,
        database: system.dbname.unwrap_or_default(),
        slot: slot.to_owned(),
        timeline: system.timeline,
        wal_end: Lsn::new(system.xlogpos.as_u64()),
        ancestors,
    })
}

/// One replication session on the outbox slot.
pub struct WalStream {
    client: ReplicationClient,
    options: StreamOptions,
    /// The shape of the stream: what each message means.
    machine: Machine,
    /// The position the session started from; confirming it again needs no wait.
    start: Lsn,
    /// The WAL history it streams (system, database, slot, timeline and its ancestors).
    origin: WalOrigin,
}

impl std::fmt::Debug for WalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalStream")
            .field("slot", &self.options.slot)
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

impl WalStream {
    /// Connects and starts streaming from the slot's confirmed position.
    pub async fn start(
        conn: &ConnInfo,
        options: StreamOptions,
        start: Lsn,
    ) -> Result<Self, StreamError> {
        let slot = options.slot.clone();
        let mut config = conn
            .replication_config(&options.slot, &options.publication)
            .await
            .map_err(|e| StreamError::classify_start(&slot, conn, e))?
            .with_status_interval(options.status_interval)
            .with_wakeup_interval(Duration::from_secs(10))
            .with_buffer_size(options.buffer_messages);
        if let Some(timeout) = options.wal_sender_timeout {
            // A user setting since PostgreSQL 12: per session, through the startup packet.
            config = config.with_options(format!("-c wal_sender_timeout={}", timeout.as_millis()));
        }
        let classify = |e| StreamError::classify_start(&slot, conn, e);
        let mut client = ReplicationClient::connect_gated(config)
            .await
            .map_err(classify)?;
        // Which history the stream is, read on its own session before it starts.
        let origin = identify(&mut client, &slot).await.map_err(classify)?;
        client.start().await.map_err(classify)?;
        client.wait_started().await.map_err(classify)?;
        Ok(WalStream {
            client,
            machine: Machine::new(&options),
            options,
            start,
            origin,
        })
    }

    /// The WAL history this session streams.
    pub fn origin(&self) -> &WalOrigin {
        &self.origin
    }

    /// The next event. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<WalEvent, StreamError> {
        loop {
            let event = match self.client.recv().await {
                Ok(Some(event)) => event,
                Ok(None) => return Err(StreamError::Ended),
                Err(e) => return Err(StreamError::classify(&self.options.slot, e)),
            };
            if let Some(out) = self.machine.handle(event)? {
                return Ok(out);
            }
        }
    }

    /// Confirms `lsn` to the slot: Postgres may discard the WAL before it, and will not send
    /// events before it again. Never call it with a position whose events are unacknowledged.
    pub fn confirm(&self, lsn: Lsn) {
        self.client
            .update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.get()));
    }

    /// The newest position the server has been told about.
    pub fn reported(&self) -> Lsn {
        Lsn::new(self.client.metrics().last_applied_lsn().as_u64())
    }

    /// Whether a transaction's Begin was read and its Commit was not.
    pub fn in_transaction(&self) -> bool {
        self.machine.in_transaction()
    }

    /// A handle that reads the newest position reported to the server, usable from another
    /// task.
    pub fn reported_handle(&self) -> impl Fn() -> Lsn + Send + Sync + 'static {
        let metrics = self.client.metrics();
        move || Lsn::new(metrics.last_applied_lsn().as_u64())
    }

    /// Ends the replication session now, confirming nothing more: the server's walsender is
    /// released (a server shutting down waits for it). Events still read are returned by
    /// [`next`](Self::next) until it reports [`StreamError::Ended`].
    pub fn close(&self) {
        self.client.stop();
    }

    /// Resolves when the server is shutting down and has waited [`shutdown::PATIENCE`] for a
    /// confirmation that is not coming (see [`shutdown`]); pending otherwise. Owns what it
    /// reads, so it can be polled beside [`next`](Self::next) from the session's loop.
    pub fn server_stopping(&self) -> impl Future<Output = StreamError> + Send + 'static {
        let metrics = self.client.metrics();
        async move {
            let mut wait = shutdown::ShutdownWait::default();
            let mut every = tokio::time::interval(shutdown::SAMPLE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let now = every.tick().await;
                let sample = shutdown::Sample {
                    keepalive_replies: metrics.keepalive_replies(),
                    wal_end: Lsn::new(metrics.last_wal_end().as_u64()),
                    confirmed: Lsn::new(metrics.last_applied_lsn().as_u64()),
                };
                if let Some(stopping) = wait.observe(sample, now) {
                    return stopping;
                }
            }
        }
    }

    /// Ends the session after confirming `lsn`, waiting up to `wait` for the server to be
    /// told. Returns whether it was.
    pub async fn finish(mut self, lsn: Lsn, wait: Duration) -> bool {
        self.confirm(lsn);
        let deadline = tokio::time::Instant::now() + wait;
        let reported = lsn <= self.start
            || loop {
                if self.reported() >= lsn {
                    break true;
                }
                if tokio::time::Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
        if let Err(e) = self.client.shutdown().await {
            tracing::debug!(error = %e, "replication session ended with an error");
        }
        reported
    }
}
