//! Decoding pgoutput messages (protocol version 1).
//!
//! pgwire-replication parses Begin, Commit and logical-decoding Message itself; every other
//! pgoutput message arrives here as raw bytes. This module recognises each message kind that
//! protocol version 1 can send and decodes the ones outboxd needs (Relation, Insert). Kinds
//! it does not expect (streaming, two-phase) are an error, never silently skipped or misread.
//! Column values are slices of the received buffer: decoding copies no value bytes.

use bytes::Bytes;

/// A pgoutput message outboxd could not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field it announced.
    #[error("pgoutput {message} message is truncated")]
    Truncated {
        /// The message kind.
        message: &'static str,
    },
    /// A field holds a value the protocol does not allow.
    #[error("pgoutput {message} message is malformed: {detail}")]
    Malformed {
        /// The message kind.
        message: &'static str,
        /// What is wrong.
        detail: &'static str,
    },
    /// A message kind protocol version 1 does not send to outboxd.
    #[error(
        "unexpected pgoutput message kind {tag:?}: outboxd uses protocol version 1 without \
         streaming or two-phase commit"
    )]
    UnexpectedKind {
        /// The message's first byte.
        tag: char,
    },
}

/// One column of a relation, as described by a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// The column name.
    pub name: String,
    /// The column's type OID.
    pub type_oid: u32,
    /// Whether the column is part of the replica identity key.
    pub is_key: bool,
}

/// A table's shape, sent before its first change in a session and after every change to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID: changes refer to it.
    pub id: u32,
    /// The schema (empty for `pg_catalog`).
    pub namespace: String,
    /// The table name.
    pub name: String,
    /// The columns in table order (dropped columns are not included).
    pub columns: Vec<RelationColumn>,
}

/// A decoded pgoutput message (Begin, Commit and Message are handled by pgwire-replication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A table's shape.
    Relation(Relation),
    /// A new row: one value per column in table order, `None` for NULL.
    Insert {
        /// The table's OID.
        relation_id: u32,
        /// The row's values in text format.
        values: Vec<Option<Bytes>>,
    },
    /// A changed row (not forwarded: the outbox publication publishes inserts only).
    Update {
        /// The table's OID.
        relation_id: u32,
    },
    /// A deleted row (not forwarded).
    Delete {
        /// The table's OID.
        relation_id: u32,
    },
    /// Truncated tables (not forwarded).
    Truncate,
    /// A data type's name, sent before rows that use a non-built-in type.
    Type,
    /// The replication origin of the following transaction.
    Origin,
}

/// Decodes one pgoutput message.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError::Truncated { message: "empty" });
    };
    let mut r = Reader {
        data,
        pos: 1,
        message: "",
    };
    match tag {
        b'R' => {
            r.message = "Relation";
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let _replica_identity = r.u8()?;
            let count = r.i16()?;
            let count = usize::try_from(count).map_err(|_| r.malformed("negative column count"))?;
            let mut columns = Vec::with_capacity(count);
            for _ in 0..count {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _type_modifier = r.u32()?;
                columns.push(RelationColumn {
                    name,
                    type_oid,
                    is_key: flags & 1 == 1,
                });
            }
            Ok(Message::Relation(Relation {
                id,
                namespace,
                name,
                columns,
            }))
        }
        b'I' => {
            r.message = "Insert";
            let relation_id = r.u32()?;
            if r.u8()? != b'N' {
                return Err(r.malformed("expected a new tuple ('N')"));
            }
            let values = r.tuple()?;
            Ok(Message::Insert {
                relation_id,
                values,
            })
        }
        b'U' => Ok(Message::Update {
            relation_id: Reader::with("Update", data).u32()?,
        }),
        b'D' => Ok(Message::Delete {
            relation_id: Reader::with("Delete", data).u32()?,
        }),
        b'T' => Ok(Message::Truncate),
        b'Y' => Ok(Message::Type),
        b'O' => Ok(Message::Origin),
        other => Err(DecodeError::UnexpectedKind {
            tag: char::from(other),
        }),
    }
}

struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn with(message: &'static str, data: &'a Bytes) -> Self {
        Reader {
            data,
            pos: 1,
            message,
        }
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
        }
    }

    fn malformed(&self, detail: &'static str) -> DecodeError {
        DecodeError::Malformed {
            message: self.message,
            detail,
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.pos + N;
        let bytes = self
            .data
            .get(self.pos..end)
            .ok_or_else(|| self.truncated())?;
        self.pos = end;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = self.data.get(self.pos..).ok_or_else(|| self.truncated())?;
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated())?;
        let s = std::str::from_utf8(&rest[..len])
            .map_err(|_| self.malformed("name is not UTF-8"))?
            .to_owned();
        self.pos += len + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Option<Bytes>>, DecodeError> {
        let count =
            usize::try_from(self.i16()?).map_err(|_| self.malformed("negative column count"))?;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            match self.u8()? {
                b'n' => values.push(None),
                b't' => {
                    let len = usize::try_from(self.u32()?)
                        .map_err(|_| self.malformed("value length does not fit"))?;
                    let end = self.pos.checked_add(len).ok_or_else(|| self.truncated())?;
                    if end > self.data.len() {
                        return Err(self.truncated());
                    }
                    values.push(Some(self.data.slice(self.pos..end)));
                    self.pos = end;
                }
                b'u' => return Err(self.malformed("unchanged TOAST value in a new row")),
                b'b' => return Err(self.malformed("binary value, but text format was requested")),
                _ => return Err(self.malformed("unknown column value kind")),
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend_from_slice(&16384u32.to_be_bytes());
        b.extend_from_slice(b"public\0outbox\0");
        b.push(b'd');
        b.extend_from_slice(&2i16.to_be_bytes());
        for (flags, name, oid) in [(1u8, "id", 2950u32), (0, "payload", 3802)] {
            b.push(flags);
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
        }
        b
    }

    fn insert_bytes() -> Vec<u8> {
        let mut b = vec![b'I'];
        b.extend_from_slice(&16384u32.to_be_bytes());
        b.push(b'N');
        b.extend_from_slice(&3i16.to_be_bytes());
        b.push(b't');
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(b"e1");
        b.push(b'n');
        b.push(b't');
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    }

    #[test]
    fn decodes_relation() {
        let msg = decode(&Bytes::from(relation_bytes())).expect("decodes");
        let Message::Relation(rel) = msg else {
            panic!("not a relation: {msg:?}")
        };
        assert_eq!(rel.id, 16384);
        assert_eq!(
            (rel.namespace.as_str(), rel.name.as_str()),
            ("public", "outbox")
        );
        assert_eq!(rel.columns.len(), 2);
        assert_eq!(rel.columns[0].name, "id");
        assert!(rel.columns[0].is_key);
        assert_eq!(rel.columns[1].type_oid, 3802);
    }

    #[test]
    fn decodes_insert_values_without_copying() {
        let data = Bytes::from(insert_bytes());
        let Message::Insert {
            relation_id,
            values,
        } = decode(&data).expect("decodes")
        else {
            panic!("not an insert")
        };
        assert_eq!(relation_id, 16384);
        assert_eq!(values.len(), 3);
        let first = values[0].as_ref().expect("value");
        assert_eq!(first, "e1");
        assert_eq!(values[1], None);
        assert_eq!(values[2].as_deref(), Some(&b""[..]));
        // The value points into the received buffer.
        assert!(data.as_ptr_range().contains(&first.as_ptr()));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for full in [relation_bytes(), insert_bytes()] {
            for cut in 0..full.len() {
                let res = decode(&Bytes::copy_from_slice(&full[..cut]));
                assert!(res.is_err(), "prefix of {cut} bytes decoded: {res:?}");
            }
        }
    }

    #[test]
    fn unexpected_kinds_are_errors() {
        for tag in [b'S', b'E', b'c', b'A', b'P', b'K', b'r', b'b', b'p', b'x'] {
            assert!(matches!(
                decode(&Bytes::from(vec![tag, 0, 0, 0, 1])),
                Err(DecodeError::UnexpectedKind { .. })
            ));
        }
    }

    #[test]
    fn recognises_but_does_not_forward_other_changes() {
        let mut update = vec![b'U'];
        update.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            decode(&Bytes::from(update)),
            Ok(Message::Update { relation_id: 7 })
        );
        assert_eq!(decode(&Bytes::from_static(b"Y")), Ok(Message::Type));
    }
}
