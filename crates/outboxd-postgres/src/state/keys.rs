//! The keys that sign outboxd's logical decoding messages (`outboxd.message_keys`), and the
//! check every message passes before it is acted on.
//!
//! `pg_logical_emit_message()` is executable by every role unless an admin revoked it, and a
//! message is decoded from the WAL like any row. So a message is acted on only when it carries
//! proof that it was written by `outbox_emit_message()`, `outboxd replay` or `outboxd setup
//! --backfill-where`: all three write through `outboxd.sign()`, which only its owner, the
//! outboxd role and `outbox_emit_message()` may call, and which only they (and the admin)
//! may read the key of. A signed message's content is
//!
//! ```text
//! sig1:<64 hex digits of HMAC-SHA256(key, prefix || 0x00 || body)>\n<body>
//! ```
//!
//! The prefix is signed with the body, so a signed table-less event cannot be replayed as a
//! backfilled row. Verification accepts any key of the table (the active one signs; the others
//! are kept through a rotation, docs/operations.md) and compares in constant time.

use ring::hmac;
use tokio_postgres::Client;

use super::StateError;

/// What starts the content of a signed message.
pub const SIGNATURE_TAG: &[u8] = b"sig1:";

/// Why a message of one of outboxd's prefixes is not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Written with `pg_logical_emit_message(false, …)`: decoded even when its transaction
    /// rolled back.
    NotTransactional,
    /// No signature: not written through `outboxd.sign()`.
    Unsigned,
    /// A signature that no key of `outboxd.message_keys` made.
    BadSignature,
    /// The database has no message key (schema outboxd missing), so nothing can be verified.
    NoKey,
}

impl Refusal {
    /// A stable label, for the `reason` of the metric.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotTransactional => "not_transactional",
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad_signature",
            Refusal::NoKey => "no_key",
        }
    }

    /// What it means, for the log.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::NotTransactional => {
                "written outside a transaction (pg_logical_emit_message(false, ...)): it is \
                 decoded even when its transaction rolls back"
            }
            Refusal::Unsigned => {
                "not signed: written by pg_logical_emit_message() directly, not by \
                 outbox_emit_message(), outboxd replay or a backfill"
            }
            Refusal::BadSignature => "signed with a key that is not in outboxd.message_keys",
            Refusal::NoKey => {
                "this database has no message key (outboxd.message_keys, sql/state.sql), so no \
                 message can be verified"
            }
        }
    }
}

/// The keys messages are verified against.
#[derive(Clone, Default)]
pub struct MessageKeys {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for MessageKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageKeys({} keys)", self.keys.len())
    }
}

impl MessageKeys {
    /// Keys from their raw bytes.
    pub fn new<'a>(raw: impl IntoIterator<Item = &'a [u8]>) -> Self {
        MessageKeys {
            keys: raw
                .into_iter()
                .map(|k| hmac::Key::new(hmac::HMAC_SHA256, k))
                .collect(),
        }
    }

    /// Whether there is no key at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The body of `content`, a message of `prefix`, if one of the keys signed it.
    pub fn verify<'a>(&self, prefix: &str, content: &'a [u8]) -> Result<&'a [u8], Refusal> {
        if self.keys.is_empty() {
            return Err(Refusal::NoKey);
        }
        let (tag, body) = split_signed(content).ok_or(Refusal::Unsigned)?;
        let signed = signed_bytes(prefix, body);
        if self
            .keys
            .iter()
            .any(|key| hmac::verify(key, &signed, &tag).is_ok())
        {
            Ok(body)
        } else {
            Err(Refusal::BadSignature)
        }
    }

    /// `body` signed as a message of `prefix` with the first key (for tests and fuzzing; the
    /// database signs with `outboxd.sign()`).
    pub fn sign(&self, prefix: &str, body: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let tag = hmac::sign(key, &signed_bytes(prefix, body));
        let mut out = SIGNATURE_TAG.to_vec();
        for byte in tag.as_ref() {
            out.extend_from_slice(format!("{byte:02x}").as_bytes());
        }
        out.push(b'\n');
        out.extend_from_slice(body);
        Some(out)
    }
}

/// `prefix || 0x00 || body`: what the signature covers.
fn signed_bytes(prefix: &str, body: &[u8]) -> Vec<u8> {
    let mut signed = Vec::with_capacity(prefix.len() + 1 + body.len());
    signed.extend_from_slice(prefix.as_bytes());
    signed.push(0);
    signed.extend_from_slice(body);
    signed
}

/// The signature (32 bytes) and the body of a signed message's content.
fn split_signed(content: &[u8]) -> Option<([u8; 32], &[u8])> {
    let rest = content.strip_prefix(SIGNATURE_TAG)?;
    let (hex, rest) = (rest.get(..64)?, rest.get(64..)?);
    let body = rest.strip_prefix(b"\n")?;
    let mut tag = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        tag[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some((tag, body))
}

/// Every key of `outboxd.message_keys` (none when the schema is missing).
pub async fn load(client: &Client) -> Result<MessageKeys, StateError> {
    let present: bool = client
        .query_one(
            "SELECT to_regclass('outboxd.message_keys') IS NOT NULL",
            &[],
        )
        .await
        .map_err(StateError::pg("looking for outboxd.message_keys"))?
        .get(0);
    if !present {
        return Ok(MessageKeys::default());
    }
    let rows = client
        .query(
            "SELECT key FROM outboxd.message_keys ORDER BY active DESC, created_at DESC",
            &[],
        )
        .await
        .map_err(StateError::pg("reading outboxd.message_keys"))?;
    let raw: Vec<Vec<u8>> = rows.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
    Ok(MessageKeys::new(raw.iter().map(Vec::as_slice)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_signature_of_a_known_key_over_the_same_prefix_passes() {
        let keys = MessageKeys::new([&[7u8; 64][..]]);
        let body = br#"{"row":{"id":"1"}}"#;
        let signed = keys.sign("outboxd.replay", body).unwrap();
        assert_eq!(keys.verify("outboxd.replay", &signed), Ok(&body[..]));
        // Another prefix, another key, a changed body, no signature, no key at all.
        assert_eq!(
            keys.verify("outboxd.backfill", &signed),
            Err(Refusal::BadSignature)
        );
        let other = MessageKeys::new([&[8u8; 64][..]]);
        assert_eq!(
            other.verify("outboxd.replay", &signed),
            Err(Refusal::BadSignature)
        );
        let mut changed = signed.clone();
        *changed.last_mut().unwrap() = b']';
        assert_eq!(
            keys.verify("outboxd.replay", &changed),
            Err(Refusal::BadSignature)
        );
        assert_eq!(keys.verify("outboxd.replay", body), Err(Refusal::Unsigned));
        assert_eq!(
            keys.verify("outboxd.replay", b"sig1:zz\n{}"),
            Err(Refusal::Unsigned)
        );
        assert_eq!(
            MessageKeys::default().verify("outboxd.replay", &signed),
            Err(Refusal::NoKey)
        );
        // A rotation: the old key still verifies.
        let both = MessageKeys::new([&[8u8; 64][..], &[7u8; 64][..]]);
        assert!(both.verify("outboxd.replay", &signed).is_ok());
        assert!(!format!("{keys:?}").contains('7'), "{keys:?}");
    }
}
