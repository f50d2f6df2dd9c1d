//! Arbitrary sequences of what the walsender may send, through the stream's state machine
//! ([`Machine`]): whatever the order (Begin inside a transaction, Commit without Begin,
//! rows outside transactions, keepalives anywhere, undecodable data, the table recreated),
//! the machine answers or refuses, never panics, and what it answers keeps the stream's
//! promises:
//!
//! - a row or a transactional message only inside a transaction, numbered 0, 1, 2… at the
//!   transaction's commit LSN; a message acted on only when transactional and signed with
//!   the session's key, any other refused and not numbered;
//! - a Commit only for the open transaction, counting exactly the events it gave;
//! - an Idle (a position safe to confirm) only between transactions;
//! - after an error the session is over: nothing more is fed, as `WalStream` does.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use outboxd_postgres::message;
use outboxd_postgres::state::keys::MessageKeys;
use outboxd_postgres::stream::{Machine, Source, StreamOptions, WalEvent};
use pgwire_replication::{Lsn, ReplicationEvent};

/// The outbox table's OID when the session starts.
const OUTBOX_OID: u32 = 16384;

#[derive(Debug, Arbitrary)]
struct Session {
    messages_source: bool,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A Begin at any position.
    Begin {
        final_lsn: u64,
        commit_time: i64,
    },
    /// A Commit that matches the open transaction (or, outside one, an arbitrary one).
    CommitOpen {
        end_delta: u16,
    },
    /// A Commit at any position.
    Commit {
        lsn: u64,
        end_lsn: u64,
    },
    KeepAlive {
        wal_end: u64,
    },
    /// A well-formed Relation: of the outbox table (maybe under a new OID) or another.
    Relation {
        oid: u32,
        outbox: bool,
        columns: Vec<(bool, u32)>,
    },
    /// A well-formed Insert into a table: the outbox's (first OID) or any.
    Insert {
        outbox: bool,
        oid: u32,
        values: Vec<Option<Vec<u8>>>,
    },
    /// Arbitrary pgoutput bytes.
    Raw {
        data: Vec<u8>,
    },
    /// A logical decoding message; `prefix` picks outboxd's three or another; `signed`: its
    /// content signed with the session's key for that prefix.
    Message {
        transactional: bool,
        lsn: u64,
        prefix: u8,
        signed: bool,
        content: Vec<u8>,
    },
    StoppedAt,
}

fn relation_bytes(oid: u32, outbox: bool, columns: &[(bool, u32)]) -> Vec<u8> {
    let mut b = vec![b'R'];
    b.extend_from_slice(&oid.to_be_bytes());
    b.extend_from_slice(if outbox {
        b"public\0outbox\0"
    } else {
        b"public\0other\0"
    });
    b.push(b'd');
    let n = columns.len().min(64);
    b.extend_from_slice(&(n as i16).to_be_bytes());
    for (i, (key, type_oid)) in columns.iter().take(n).enumerate() {
        b.push(u8::from(*key));
        b.extend_from_slice(format!("c{i}\0").as_bytes());
        b.extend_from_slice(&type_oid.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
    }
    b
}

fn insert_bytes(oid: u32, values: &[Option<Vec<u8>>]) -> Vec<u8> {
    let mut b = vec![b'I'];
    b.extend_from_slice(&oid.to_be_bytes());
    b.push(b'N');
    let n = values.len().min(64);
    b.extend_from_slice(&(n as i16).to_be_bytes());
    for v in values.iter().take(n) {
        match v {
            None => b.push(b'n'),
            Some(v) => {
                b.push(b't');
                b.extend_from_slice(&(v.len() as u32).to_be_bytes());
                b.extend_from_slice(v);
            }
        }
    }
    b
}

fn data(bytes: Vec<u8>) -> ReplicationEvent {
    ReplicationEvent::XLogData {
        wal_start: Lsn::from_u64(0x100),
        wal_end: Lsn::from_u64(0),
        server_time_micros: 0,
        data: Bytes::from(bytes),
    }
}

/// The open transaction as the harness sees it: its commit LSN and the events it gave.
#[derive(Debug, Clone, Copy)]
struct Open {
    commit_lsn: u64,
    given: u32,
}

fuzz_target!(|session: Session| {
    let source = if session.messages_source {
        Source::Messages
    } else {
        Source::Table
    };
    let options = StreamOptions {
        slot: "outboxd".into(),
        publication: "outboxd".into(),
        table_oid: OUTBOX_OID,
        table_name: ("public".into(), "outbox".into()),
        status_interval: Duration::from_secs(1),
        wal_sender_timeout: None,
        buffer_messages: 16,
        source,
        keys: MessageKeys::new([&[5u8; 64][..]]),
    };
    let mut machine = Machine::new(&options);
    let mut open: Option<Open> = None;
    let columns = message::event_columns();
    for op in session.ops {
        let begin_lsn = match op {
            Op::Begin { final_lsn, .. } => Some(final_lsn),
            _ => None,
        };
        let event = match op {
            Op::Begin {
                final_lsn,
                commit_time,
            } => ReplicationEvent::Begin {
                final_lsn: Lsn::from_u64(final_lsn),
                xid: 1,
                commit_time_micros: commit_time,
            },
            Op::CommitOpen { end_delta } => {
                let lsn = open.map_or(0, |o| o.commit_lsn);
                ReplicationEvent::Commit {
                    lsn: Lsn::from_u64(lsn),
                    end_lsn: Lsn::from_u64(lsn.saturating_add(u64::from(end_delta))),
                    commit_time_micros: 0,
                }
            }
            Op::Commit { lsn, end_lsn } => ReplicationEvent::Commit {
                lsn: Lsn::from_u64(lsn),
                end_lsn: Lsn::from_u64(end_lsn),
                commit_time_micros: 0,
            },
            Op::KeepAlive { wal_end } => ReplicationEvent::KeepAlive {
                wal_end: Lsn::from_u64(wal_end),
                reply_requested: false,
                server_time_micros: 0,
            },
            Op::Relation {
                oid,
                outbox,
                columns,
            } => data(relation_bytes(oid, outbox, &columns)),
            Op::Insert {
                outbox,
                oid,
                values,
            } => data(insert_bytes(if outbox { OUTBOX_OID } else { oid }, &values)),
            Op::Raw { data: bytes } => data(bytes),
            Op::Message {
                transactional,
                lsn,
                prefix,
                signed,
                content,
            } => {
                let prefix = ["outboxd", "outboxd.backfill", "outboxd.replay", "someone"]
                    [usize::from(prefix % 4)];
                let content = if signed {
                    options.keys.sign(prefix, &content).expect("a key")
                } else {
                    content
                };
                ReplicationEvent::Message {
                    transactional,
                    lsn: Lsn::from_u64(lsn),
                    prefix: prefix.into(),
                    content: Bytes::from(content),
                }
            }
            Op::StoppedAt => ReplicationEvent::StoppedAt {
                reached: Lsn::from_u64(1),
            },
        };
        let transactional = matches!(
            event,
            ReplicationEvent::Message {
                transactional: true,
                ..
            }
        );
        let result = machine.handle(event);
        let Ok(out) = result else {
            // The session ends on any error.
            return;
        };
        if let Some(lsn) = begin_lsn {
            assert!(open.is_none(), "a Begin inside a transaction was taken");
            open = Some(Open {
                commit_lsn: lsn,
                given: 0,
            });
        }
        match out {
            None | Some(WalEvent::Relation(_)) => {}
            Some(WalEvent::Row { position, .. }) => {
                let o = open.as_mut().expect("a row outside a transaction");
                assert_eq!(
                    position.commit_lsn.get(),
                    o.commit_lsn,
                    "a row of another commit"
                );
                assert_eq!(position.index, o.given, "rows numbered out of turn");
                o.given += 1;
            }
            Some(WalEvent::Message {
                kind,
                content,
                position,
                ..
            }) => {
                assert!(transactional, "a message outside a transaction was acted on");
                let o = open
                    .as_mut()
                    .expect("a message outside an open transaction was acted on");
                assert_eq!(
                    position.commit_lsn.get(),
                    o.commit_lsn,
                    "a message of another commit"
                );
                assert_eq!(position.index, o.given, "messages numbered out of turn");
                o.given += 1;
                let _ = message::decode(kind, &content, &columns);
            }
            Some(WalEvent::Refused { .. }) => {}
            Some(WalEvent::Commit { rows, .. }) => {
                let o = open.take().expect("a Commit without a Begin was taken");
                assert_eq!(rows, o.given, "a Commit miscounts its transaction");
            }
            Some(WalEvent::Idle { .. }) => {
                assert!(open.is_none(), "an Idle inside a transaction");
            }
        }
        assert_eq!(
            machine.in_transaction(),
            open.is_some(),
            "the machine lost track"
        );
    }
});
