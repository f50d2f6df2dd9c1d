//! The replication stream of the outbox table, as events the pipeline can act on.
//!
//! ```text
//! walsender ──pgoutput──▶ pgwire-replication ──▶ WalStream::next ──▶ WalEvent
//!                     ◀── standby status ◀── WalStream::confirm(lsn) ◀── checkpoint
//! ```
//!
//! [`WalStream`] owns one replication session. It checks the shape of the stream
//! (`Begin → Relation/Insert… → Commit`, with the Commit's LSN matching the Begin's), keeps
//! the outbox table's latest Relation, skips other tables and other kinds of change, and
//! reports keepalives only between transactions, where their WAL position is safe to
//! confirm once everything before it is acknowledged.
//!
//! pgoutput (without streaming) sends a transaction only after it committed, so every row
//! between Begin and Commit is committed data: rows may be forwarded before their Commit
//! arrives. Rolled-back transactions never appear.
//!
//! Confirming is `WalStream::confirm`: the position is sent to the server with the next
//! standby status update (every `status_interval`). It only moves forward.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outboxd_core::{Lsn, Position};
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationEvent};

use crate::catalog::TlsState;
use crate::conninfo::ConnInfo;
use crate::decode::{self, DecodeError, Message, Relation};
use crate::message::MessageKind;

/// Now, in microseconds since the Unix epoch.
fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Microseconds from the Unix epoch to Postgres' epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

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
    /// How many undecoded messages may wait between the socket and the pipeline.
    pub buffer_messages: usize,
    /// Where events come from: the table's rows, or table-less messages.
    pub source: Source,
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
    /// The session ended without an error.
    #[error("replication session ended")]
    Ended,
}

impl StreamError {
    /// Whether reconnecting may help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StreamError::Connection(_) | StreamError::SlotInUse { .. } | StreamError::Ended
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

/// An open transaction.
#[derive(Debug, Clone, Copy)]
struct Txn {
    commit_lsn: Lsn,
    commit_time_micros: i64,
    rows: u32,
}

/// One replication session on the outbox slot.
pub struct WalStream {
    client: ReplicationClient,
    options: StreamOptions,
    /// The OID the outbox table has in this session (updated if it was recreated).
    outbox_oid: u32,
    /// Whether the outbox relation was announced in this session.
    outbox_known: bool,
    /// The transaction being received, between Begin and Commit.
    txn: Option<Txn>,
    /// The position the session started from; confirming it again needs no wait.
    start: Lsn,
    /// Whether messages of the other source were reported in this session.
    warned_source: bool,
}

impl std::fmt::Debug for WalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalStream")
            .field("slot", &self.options.slot)
            .field("outbox_oid", &self.outbox_oid)
            .field("txn", &self.txn)
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
        let config = conn
            .replication_config(&options.slot, &options.publication)
            .await
            .map_err(|e| StreamError::classify_start(&slot, conn, e))?
            .with_status_interval(options.status_interval)
            .with_wakeup_interval(Duration::from_secs(10))
            .with_buffer_size(options.buffer_messages);
        let mut client = ReplicationClient::connect(config)
            .await
            .map_err(|e| StreamError::classify_start(&slot, conn, e))?;
        client
            .wait_started()
            .await
            .map_err(|e| StreamError::classify_start(&slot, conn, e))?;
        Ok(WalStream {
            client,
            outbox_oid: options.table_oid,
            options,
            outbox_known: false,
            txn: None,
            start,
            warned_source: false,
        })
    }

    /// The next event. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<WalEvent, StreamError> {
        loop {
            let event = match self.client.recv().await {
                Ok(Some(event)) => event,
                Ok(None) => return Err(StreamError::Ended),
                Err(e) => return Err(StreamError::classify(&self.options.slot, e)),
            };
            if let Some(out) = self.handle(event)? {
                return Ok(out);
            }
        }
    }

    fn handle(&mut self, event: ReplicationEvent) -> Result<Option<WalEvent>, StreamError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                if let Some(open) = self.txn {
                    return Err(StreamError::Sequence(format!(
                        "Begin of {final_lsn} while the transaction of {} is open",
                        open.commit_lsn
                    )));
                }
                self.txn = Some(Txn {
                    commit_lsn: Lsn::new(final_lsn.as_u64()),
                    commit_time_micros: commit_time_micros.saturating_add(PG_EPOCH_OFFSET_MICROS),
                    rows: 0,
                });
                Ok(None)
            }
            ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                let txn = self.txn.take().ok_or_else(|| {
                    StreamError::Sequence(format!("Commit of {lsn} without a Begin"))
                })?;
                if txn.commit_lsn.get() != lsn.as_u64() {
                    return Err(StreamError::Sequence(format!(
                        "Commit at {lsn} does not match Begin's commit position {}",
                        txn.commit_lsn
                    )));
                }
                Ok(Some(WalEvent::Commit {
                    end_lsn: Lsn::new(end_lsn.as_u64()),
                    rows: txn.rows,
                }))
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                Ok(self.txn.is_none().then_some(WalEvent::Idle {
                    wal_end: Lsn::new(wal_end.as_u64()),
                }))
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let lsn = Lsn::new(wal_start.as_u64());
                let message =
                    decode::decode(&data).map_err(|source| StreamError::Decode { lsn, source })?;
                self.handle_message(message)
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => Ok(self.message(transactional, Lsn::new(lsn.as_u64()), &prefix, content)),
            ReplicationEvent::StoppedAt { .. } => Err(StreamError::Ended),
        }
    }

    /// A logical decoding message: forwarded when it is one of outboxd's for this source.
    fn message(
        &mut self,
        transactional: bool,
        lsn: Lsn,
        prefix: &str,
        content: Bytes,
    ) -> Option<WalEvent> {
        let kind = MessageKind::of_prefix(prefix)?;
        let wanted = match self.options.source {
            Source::Table => kind != MessageKind::Event,
            Source::Messages => kind == MessageKind::Event,
        };
        if !wanted {
            if !self.warned_source {
                self.warned_source = true;
                tracing::warn!(
                    prefix,
                    source = ?self.options.source,
                    "skipping outboxd messages this source does not take: table-less events \
                     (outbox_emit_message) need postgres.source = \"messages\"; backfill and \
                     replay need the table source"
                );
            }
            return None;
        }
        // A message outside a transaction (pg_logical_emit_message(false, ...)) is decoded at
        // once, between transactions: its own LSN orders it.
        let (position, commit_time_micros) = match (transactional, self.txn.as_mut()) {
            (true, Some(txn)) => {
                let position = Position {
                    commit_lsn: txn.commit_lsn,
                    index: txn.rows,
                };
                txn.rows += 1;
                (position, txn.commit_time_micros)
            }
            _ => (
                Position {
                    commit_lsn: lsn,
                    index: 0,
                },
                unix_micros(),
            ),
        };
        Some(WalEvent::Message {
            kind,
            content,
            position,
            commit_time_micros,
        })
    }

    fn handle_message(&mut self, message: Message) -> Result<Option<WalEvent>, StreamError> {
        match message {
            Message::Relation(rel) => {
                let (schema, name) = &self.options.table_name;
                if self.options.source == Source::Messages {
                    return Ok(None);
                }
                if rel.id == self.outbox_oid || (&rel.namespace == schema && &rel.name == name) {
                    self.outbox_oid = rel.id;
                    self.outbox_known = true;
                    return Ok(Some(WalEvent::Relation(Arc::new(rel))));
                }
                Ok(None)
            }
            Message::Insert {
                relation_id,
                values,
            } if relation_id == self.outbox_oid => {
                if !self.outbox_known {
                    return Err(StreamError::Sequence(
                        "outbox row before the table's Relation message".into(),
                    ));
                }
                let txn = self.txn.as_mut().ok_or_else(|| {
                    StreamError::Sequence("outbox row outside a transaction".into())
                })?;
                let position = Position {
                    commit_lsn: txn.commit_lsn,
                    index: txn.rows,
                };
                txn.rows += 1;
                Ok(Some(WalEvent::Row {
                    values,
                    position,
                    commit_time_micros: txn.commit_time_micros,
                }))
            }
            Message::Update { relation_id } | Message::Delete { relation_id }
                if relation_id == self.outbox_oid =>
            {
                tracing::debug!("skipping an update or delete of the outbox table");
                Ok(None)
            }
            // Other tables of the publication, truncates, types, origins.
            _ => Ok(None),
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
        self.txn.is_some()
    }

    /// A handle that reads the newest position reported to the server, usable from another
    /// task.
    pub fn reported_handle(&self) -> impl Fn() -> Lsn + Send + Sync + 'static {
        let metrics = self.client.metrics();
        move || Lsn::new(metrics.last_applied_lsn().as_u64())
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
