//! An event, or its dead letter, as a NATS message: subject, headers, payload.
//!
//! - subject = the sink's `subject_prefix` + the routed topic; it must be a valid publish
//!   subject (dot-separated tokens, no spaces, no wildcards), or the event is dead-lettered
//!   as `rejected`;
//! - headers: `Nats-Msg-Id` (below), `id`, `type`, `key`, then the row's headers in their
//!   order, then the route's `[route.headers]`; a header NATS cannot carry (a name with `:` or control characters, a value with a
//!   line break) dead-letters the event as `rejected`, rather than being altered;
//! - payload = the event's payload, byte for byte.
//!
//! `Nats-Msg-Id` is the event id, so that the stream drops a replayed event within its
//! duplicate window. A replay on purpose (`outboxd replay`, header `outboxd-replay`) adds its
//! WAL position, so that it is not taken for a duplicate of the original; a dead letter adds
//! `:dead-letter`.
//!
//! A dead letter goes to the dead-letter subject with the event's payload, the row's headers
//! as one JSON header (`headers`), and the context every broker writes (`topic`, `reason`,
//! `detail`, `lsn`, `index`, `commit_time_us`).

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use bytes::Bytes;
use outboxd_core::{Event, Poison, PoisonKind};

use crate::dead_letter;

/// The header that marks a deliberate re-publish (`outboxd replay`).
const REPLAY_HEADER: &str = "outboxd-replay";

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Where it goes.
    pub subject: String,
    /// Its headers, `Nats-Msg-Id` included.
    pub headers: HeaderMap,
    /// Its body.
    pub payload: Bytes,
}

impl Outgoing {
    /// `event` to its subject, or why it cannot go there.
    pub fn event(event: &Event, subject_prefix: &str) -> Result<Outgoing, Poison> {
        let subject = format!("{subject_prefix}{}", event.topic);
        if !valid_subject(&subject) {
            return Err(refused(format!(
                "{subject:?} is not a valid NATS subject (dot-separated tokens without spaces \
                 or the wildcards * and >)"
            )));
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", message_id(event).as_str());
        for (name, value) in [
            ("id", &event.id),
            ("type", &event.event_type),
            ("key", &event.key),
        ] {
            headers.insert(name, value_of(name, value)?);
        }
        for (name, value) in event.headers.pairs.iter().chain(&event.attributes) {
            let name = HeaderName::try_from(name.as_str()).map_err(|_| {
                refused(format!(
                    "header name {name:?} cannot be a NATS header (no ':', control characters \
                     or non-ASCII)"
                ))
            })?;
            let value = value_of(name_text(&name), value)?;
            headers.append(name, value);
        }
        Ok(Outgoing {
            subject,
            headers,
            payload: event.payload.clone(),
        })
    }

    /// The dead letter of `event` for `poison`, to `subject`; `with_payload`: false when the
    /// broker cannot take it (the dead letter then says where the event is kept).
    pub fn dead_letter(
        event: &Event,
        poison: &Poison,
        subject: &str,
        with_payload: bool,
    ) -> Outgoing {
        let mut headers = HeaderMap::new();
        let id = format!("{}:dead-letter", message_id(event));
        headers.insert("Nats-Msg-Id", id.as_str());
        let lossy = |b: &Bytes| HeaderValue::from_lossy(&String::from_utf8_lossy(b));
        headers.insert("id", lossy(&event.id));
        headers.insert("type", lossy(&event.event_type));
        headers.insert("key", lossy(&event.key));
        headers.insert("headers", lossy(&event.headers.json));
        let mut poison = poison.clone();
        if !with_payload {
            poison.detail.push_str(&format!(
                "; payload ({} bytes) omitted from this dead letter, which NATS would not take \
                 with it: the whole event is kept in Postgres, table outboxd.dead_letters",
                event.payload.len()
            ));
        }
        for (name, value) in dead_letter::context(event, &poison) {
            headers.insert(name, lossy(&value));
        }
        Outgoing {
            subject: subject.to_owned(),
            headers,
            payload: if with_payload {
                event.payload.clone()
            } else {
                Bytes::new()
            },
        }
    }

    /// About how many bytes the message takes on the wire (headers and payload), to compare
    /// with the server's `max_payload`.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, values)| {
                values
                    .iter()
                    .map(|v| name_text(name).len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum();
        headers + 16 + self.payload.len()
    }
}

/// The `Nats-Msg-Id` of an event: its id; a deliberate replay adds its WAL position.
pub fn message_id(event: &Event) -> String {
    let id = String::from_utf8_lossy(&event.id);
    let replay = event
        .headers
        .pairs
        .iter()
        .any(|(name, value)| name == REPLAY_HEADER && value.as_ref() == b"true");
    if replay {
        let p = event.position;
        format!("{id}:replay:{}-{}", p.commit_lsn.get(), p.index)
    } else {
        id.into_owned()
    }
}

/// Whether `subject` can be published to: non-empty tokens separated by dots, none holding
/// whitespace, and no wildcard token.
pub fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

fn name_text(name: &HeaderName) -> &str {
    name.as_ref()
}

/// A header value that NATS carries unchanged, or why not.
fn value_of(name: &str, value: &Bytes) -> Result<HeaderValue, Poison> {
    let text =
        std::str::from_utf8(value).map_err(|_| refused(format!("header {name:?} is not UTF-8")))?;
    if text.contains(['\r', '\n']) {
        return Err(refused(format!(
            "header {name:?} holds a line break, which a NATS header cannot carry"
        )));
    }
    Ok(HeaderValue::from_lossy(text))
}

fn refused(detail: String) -> Poison {
    Poison::new(PoisonKind::Rejected, detail)
}

#[cfg(test)]
mod tests {
    use outboxd_core::{Headers, Lsn, Position};

    use super::*;

    fn event(topic: &str, headers: &[(&str, &str)]) -> Event {
        let mut h = Headers::empty();
        h.pairs = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), Bytes::from((*v).to_owned())))
            .collect();
        Event {
            id: Bytes::from_static(b"0b9d2c4e-0000-4000-8000-000000000001"),
            topic: topic.into(),
            key: Bytes::from_static(b"order-7"),
            event_type: Bytes::from_static(b"order.paid"),
            payload: Bytes::from_static(br#"{"amount": 42}"#),
            headers: h,
            position: Position {
                commit_lsn: Lsn::new(0x1_6B37_4D48),
                index: 2,
            },
            commit_time_micros: 0,
            tombstone: false,
            time_millis: None,
            attributes: Vec::new(),
        }
    }

    fn header<'a>(m: &'a Outgoing, name: &str) -> Option<&'a str> {
        m.headers.get(name).map(HeaderValue::as_str)
    }

    #[test]
    fn an_event_is_subject_headers_and_payload() {
        let e = event("outbox.order", &[("traceparent", "00-abc-01")]);
        let m = Outgoing::event(&e, "prod.").unwrap();
        assert_eq!(m.subject, "prod.outbox.order");
        assert_eq!(m.payload.as_ref(), br#"{"amount": 42}"#);
        assert_eq!(
            header(&m, "Nats-Msg-Id"),
            Some("0b9d2c4e-0000-4000-8000-000000000001")
        );
        assert_eq!(header(&m, "type"), Some("order.paid"));
        assert_eq!(header(&m, "key"), Some("order-7"));
        assert_eq!(header(&m, "traceparent"), Some("00-abc-01"));
    }

    #[test]
    fn a_replay_is_not_a_duplicate_of_the_original() {
        let original = event("outbox.order", &[]);
        let replay = event("outbox.order", &[("outboxd-replay", "true")]);
        assert_ne!(message_id(&original), message_id(&replay));
        assert!(message_id(&replay).ends_with(&format!(":replay:{}-2", 0x1_6B37_4D48u64)));
    }

    #[test]
    fn what_nats_cannot_carry_is_refused_not_altered() {
        for topic in [
            "",
            "outbox..order",
            "outbox.*",
            "outbox.>",
            "outbox.my order",
        ] {
            let err = Outgoing::event(&event(topic, &[]), "").unwrap_err();
            assert_eq!(err.kind, PoisonKind::Rejected, "{topic:?}");
        }
        let err = Outgoing::event(&event("t", &[("a:b", "x")]), "").unwrap_err();
        assert!(err.detail.contains("header name"), "{}", err.detail);
        let err = Outgoing::event(&event("t", &[("note", "two\nlines")]), "").unwrap_err();
        assert!(err.detail.contains("line break"), "{}", err.detail);
    }

    #[test]
    fn a_dead_letter_carries_the_context_under_its_own_id() {
        let e = event("outbox.order", &[("note", "two\nlines")]);
        let poison = Poison::new(PoisonKind::Rejected, "header \"note\" holds a line break");
        let m = Outgoing::dead_letter(&e, &poison, "outboxd.dlq", true);
        assert_eq!(m.subject, "outboxd.dlq");
        assert_eq!(header(&m, "reason"), Some("rejected"));
        assert_eq!(header(&m, "topic"), Some("outbox.order"));
        assert_eq!(header(&m, "index"), Some("2"));
        assert!(header(&m, "Nats-Msg-Id").unwrap().ends_with(":dead-letter"));
        assert_eq!(m.payload, e.payload);
    }
}
