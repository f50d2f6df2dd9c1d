//! The shape of a replication session, without the connection: what each message the
//! walsender sends means for the pipeline.
//!
//! ```text
//! (between transactions) ──Begin──▶ (in a transaction) ──Commit──▶ (between transactions)
//!        │ KeepAlive → Idle             │ Relation → Relation (the outbox table's)
//!        │ Message (non-transactional)  │ Insert   → Row      (the outbox table's)
//!                                       │ Message  → Message  (outboxd's, this source)
//! ```
//!
//! A message with one of outboxd's prefixes is acted on only when it is transactional and
//! signed with one of the keys the session was given (`outboxd.message_keys`); any other is
//! [`WalEvent::Refused`], with the reason, and takes no position among the transaction's
//! events.
//!
//! [`Machine`] holds the state the shape needs: the open transaction (its commit LSN and how
//! many events it has given, which numbers their [`Position`]s), the outbox table's OID (which
//! changes when the table is recreated) and whether its Relation has been seen. It is fed every
//! [`ReplicationEvent`] and answers with a [`WalEvent`], nothing, or a [`StreamError`]:
//! a Begin inside a transaction, a Commit that does not match its Begin or comes without one,
//! an outbox row outside a transaction or before its Relation, and undecodable pgoutput are
//! errors, never guesses. It does no I/O, so it is fuzzed with arbitrary event sequences.

use std::sync::Arc;

use bytes::Bytes;

use outboxd_core::{Lsn, Position};
use pgwire_replication::ReplicationEvent;

use super::{Source, StreamError, StreamOptions, WalEvent};
use crate::decode::{self, Message};
use crate::message::MessageKind;
use crate::state::keys::{MessageKeys, Refusal};

/// Microseconds from the Unix epoch to Postgres' epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// An open transaction.
#[derive(Debug, Clone, Copy)]
struct Txn {
    commit_lsn: Lsn,
    commit_time_micros: i64,
    rows: u32,
}

/// The state of one session's stream (see the module documentation).
#[derive(Debug, Clone)]
pub struct Machine {
    /// The outbox table's schema and name, to recognise it if recreated under a new OID.
    table_name: (String, String),
    /// Where events come from.
    source: Source,
    /// The OID the outbox table has in this session (updated if it was recreated).
    outbox_oid: u32,
    /// Whether the outbox relation was announced in this session.
    outbox_known: bool,
    /// The transaction being received, between Begin and Commit.
    txn: Option<Txn>,
    /// Whether messages of the other source were reported in this session.
    warned_source: bool,
    /// What messages must be signed with.
    keys: MessageKeys,
}

impl Machine {
    /// The state at the start of a session streaming with `options`.
    pub fn new(options: &StreamOptions) -> Machine {
        Machine {
            table_name: options.table_name.clone(),
            source: options.source,
            outbox_oid: options.table_oid,
            outbox_known: false,
            txn: None,
            warned_source: false,
            keys: options.keys.clone(),
        }
    }

    /// Whether a transaction's Begin was read and its Commit was not.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// What `event` means for the pipeline: an event to act on, nothing (another table, a
    /// keepalive inside a transaction, a message of the other source), or an error when the
    /// stream breaks its shape or a message cannot be decoded. Never panics, whatever the
    /// input (fuzzed: `crates/outboxd-postgres/fuzz`).
    pub fn handle(&mut self, event: ReplicationEvent) -> Result<Option<WalEvent>, StreamError> {
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
        let wanted = match self.source {
            Source::Table => kind != MessageKind::Event,
            Source::Messages => kind == MessageKind::Event,
        };
        if !wanted {
            if !self.warned_source {
                self.warned_source = true;
                tracing::warn!(
                    prefix,
                    source = ?self.source,
                    "skipping outboxd messages this source does not take: table-less events \
                     (outbox_emit_message) need postgres.source = \"messages\"; backfill and \
                     replay need the table source"
                );
            }
            return None;
        }
        // A message outside a transaction (pg_logical_emit_message(false, ...)) is decoded at
        // once, also when the transaction that wrote it rolls back: never acted on.
        let txn = match (transactional, self.txn.as_mut()) {
            (true, Some(txn)) => txn,
            _ => {
                return Some(WalEvent::Refused {
                    kind,
                    lsn,
                    reason: Refusal::NotTransactional,
                });
            }
        };
        let body = match self.keys.verify(prefix, &content) {
            Ok(body) => content.slice_ref(body),
            Err(reason) => return Some(WalEvent::Refused { kind, lsn, reason }),
        };
        let position = Position {
            commit_lsn: txn.commit_lsn,
            index: txn.rows,
        };
        txn.rows += 1;
        Some(WalEvent::Message {
            kind,
            content: body,
            position,
            commit_time_micros: txn.commit_time_micros,
        })
    }

    fn handle_message(&mut self, message: Message) -> Result<Option<WalEvent>, StreamError> {
        match message {
            Message::Relation(rel) => {
                let (schema, name) = &self.table_name;
                if self.source == Source::Messages {
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const OID: u32 = 16384;

    fn machine(source: Source) -> Machine {
        Machine::new(&StreamOptions {
            slot: "outboxd".into(),
            publication: "outboxd".into(),
            table_oid: OID,
            table_name: ("public".into(), "outbox".into()),
            status_interval: Duration::from_secs(1),
            wal_sender_timeout: None,
            buffer_messages: 16,
            source,
            keys: keys(),
        })
    }

    /// The key the test messages are signed with.
    fn keys() -> MessageKeys {
        MessageKeys::new([&[42u8; 64][..]])
    }

    fn signed(prefix: &str, body: &[u8]) -> Bytes {
        Bytes::from(keys().sign(prefix, body).expect("a key"))
    }

    fn lsn(raw: u64) -> pgwire_replication::Lsn {
        pgwire_replication::Lsn::from_u64(raw)
    }

    fn begin(at: u64) -> ReplicationEvent {
        ReplicationEvent::Begin {
            final_lsn: lsn(at),
            xid: 7,
            commit_time_micros: 0,
        }
    }

    fn commit(at: u64) -> ReplicationEvent {
        ReplicationEvent::Commit {
            lsn: lsn(at),
            end_lsn: lsn(at + 0x30),
            commit_time_micros: 0,
        }
    }

    fn keepalive(at: u64) -> ReplicationEvent {
        ReplicationEvent::KeepAlive {
            wal_end: lsn(at),
            reply_requested: false,
            server_time_micros: 0,
        }
    }

    fn data(bytes: Vec<u8>) -> ReplicationEvent {
        ReplicationEvent::XLogData {
            wal_start: lsn(0x100),
            wal_end: lsn(0),
            server_time_micros: 0,
            data: Bytes::from(bytes),
        }
    }

    fn relation(oid: u32, name: &str) -> ReplicationEvent {
        let mut b = vec![b'R'];
        b.extend_from_slice(&oid.to_be_bytes());
        b.extend_from_slice(format!("public\0{name}\0").as_bytes());
        b.push(b'd');
        b.extend_from_slice(&1i16.to_be_bytes());
        b.push(1);
        b.extend_from_slice(b"id\0");
        b.extend_from_slice(&25u32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        data(b)
    }

    fn insert(oid: u32) -> ReplicationEvent {
        let mut b = vec![b'I'];
        b.extend_from_slice(&oid.to_be_bytes());
        b.push(b'N');
        b.extend_from_slice(&1i16.to_be_bytes());
        b.push(b't');
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(b"e1");
        data(b)
    }

    #[test]
    fn a_transaction_numbers_its_rows_and_its_commit_counts_them() {
        let mut m = machine(Source::Table);
        assert!(m.handle(begin(0x500)).expect("begin").is_none());
        assert!(matches!(
            m.handle(relation(OID, "outbox")),
            Ok(Some(WalEvent::Relation(_)))
        ));
        for index in 0..3 {
            let Ok(Some(WalEvent::Row { position, .. })) = m.handle(insert(OID)) else {
                panic!("not a row")
            };
            assert_eq!((position.commit_lsn.get(), position.index), (0x500, index));
        }
        // Another table's row is skipped and not counted.
        assert!(m.handle(insert(99)).expect("other table").is_none());
        // A keepalive inside a transaction is no position to confirm.
        assert!(m.handle(keepalive(0x400)).expect("keepalive").is_none());
        let Ok(Some(WalEvent::Commit { end_lsn, rows })) = m.handle(commit(0x500)) else {
            panic!("not a commit")
        };
        assert_eq!((end_lsn.get(), rows), (0x530, 3));
        assert!(!m.in_transaction());
        assert!(matches!(
            m.handle(keepalive(0x600)),
            Ok(Some(WalEvent::Idle { wal_end })) if wal_end.get() == 0x600
        ));
    }

    #[test]
    fn a_broken_shape_is_an_error_not_a_guess() {
        let mut m = machine(Source::Table);
        assert!(matches!(
            m.handle(commit(0x500)),
            Err(StreamError::Sequence(_))
        ));
        let mut m = machine(Source::Table);
        m.handle(begin(0x500)).expect("begin");
        assert!(matches!(
            m.handle(begin(0x600)),
            Err(StreamError::Sequence(_))
        ));
        let mut m = machine(Source::Table);
        m.handle(begin(0x500)).expect("begin");
        assert!(matches!(
            m.handle(commit(0x510)),
            Err(StreamError::Sequence(_))
        ));
        let mut m = machine(Source::Table);
        m.handle(begin(0x500)).expect("begin");
        assert!(matches!(
            m.handle(insert(OID)),
            Err(StreamError::Sequence(_))
        ));
        let mut m = machine(Source::Table);
        m.handle(relation(OID, "outbox")).expect("relation");
        assert!(matches!(
            m.handle(insert(OID)),
            Err(StreamError::Sequence(_))
        ));
        let mut m = machine(Source::Table);
        assert!(matches!(
            m.handle(data(vec![b'S', 0, 0])),
            Err(StreamError::Decode { .. })
        ));
    }

    #[test]
    fn the_table_recreated_under_a_new_oid_is_followed_by_its_name() {
        let mut m = machine(Source::Table);
        m.handle(begin(0x500)).expect("begin");
        m.handle(relation(OID + 1, "outbox")).expect("relation");
        assert!(
            m.handle(insert(OID)).expect("old oid").is_none(),
            "the old table's OID is no longer the outbox"
        );
        assert!(matches!(
            m.handle(insert(OID + 1)),
            Ok(Some(WalEvent::Row { .. }))
        ));
    }

    #[test]
    fn messages_of_the_other_source_are_skipped() {
        let mut m = machine(Source::Table);
        m.handle(begin(0x500)).expect("begin");
        let message = |prefix: &str| ReplicationEvent::Message {
            transactional: true,
            lsn: lsn(0x480),
            prefix: prefix.into(),
            content: signed(prefix, b"{}"),
        };
        assert!(m.handle(message("outboxd")).expect("event").is_none());
        assert!(m.handle(message("someone")).expect("foreign").is_none());
        assert!(matches!(
            m.handle(message("outboxd.replay")),
            Ok(Some(WalEvent::Message { kind: MessageKind::Replay, position, content, .. }))
                if position.index == 0 && content.as_ref() == b"{}"
        ));
        let Ok(Some(WalEvent::Commit { rows, .. })) = m.handle(commit(0x500)) else {
            panic!("not a commit")
        };
        assert_eq!(rows, 1);
    }

    #[test]
    fn messages_that_are_not_transactional_or_not_signed_are_refused_and_not_numbered() {
        let mut m = machine(Source::Messages);
        let message = |transactional: bool, content: Bytes| ReplicationEvent::Message {
            transactional,
            lsn: lsn(0x480),
            prefix: "outboxd".into(),
            content,
        };
        let body = br#"{"id":"1"}"#;
        // Outside a transaction: refused even when signed.
        assert!(matches!(
            m.handle(message(false, signed("outboxd", body))),
            Ok(Some(WalEvent::Refused {
                reason: Refusal::NotTransactional,
                ..
            }))
        ));
        m.handle(begin(0x500)).expect("begin");
        for (content, why) in [
            (Bytes::from_static(body), Refusal::Unsigned),
            (signed("outboxd.replay", body), Refusal::BadSignature),
            (
                Bytes::from(
                    MessageKeys::new([&[1u8; 64][..]])
                        .sign("outboxd", body)
                        .unwrap(),
                ),
                Refusal::BadSignature,
            ),
        ] {
            assert!(
                matches!(
                    m.handle(message(true, content)),
                    Ok(Some(WalEvent::Refused { reason, kind: MessageKind::Event, .. })) if reason == why
                ),
                "{why:?}"
            );
        }
        assert!(matches!(
            m.handle(message(true, signed("outboxd", body))),
            Ok(Some(WalEvent::Message { position, .. })) if position.index == 0
        ));
        let Ok(Some(WalEvent::Commit { rows, .. })) = m.handle(commit(0x500)) else {
            panic!("not a commit")
        };
        assert_eq!(rows, 1, "refused messages take no position");
    }
}
