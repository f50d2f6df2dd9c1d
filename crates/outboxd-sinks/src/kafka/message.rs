//! The wire form of what the sink produces ([`Outgoing`]), and its size.
//!
//! Each event becomes one message: topic = the routed topic, key = the route key (none when
//! empty), value = the payload (none for a tombstone), timestamp = the event's
//! ([`Event::timestamp_millis`]: the commit time unless the route names a column), headers
//! `id`, `type` (left out under the Debezium preset), the row's headers in their order, then
//! the route's `[route.headers]`. A dead-letter message is the same message in the dead-letter topic, followed by the context
//! headers of [`dead_letter::context`] (the original topic, the reason, the WAL position…).
//!
//! [`Outgoing::wire_size`] is an upper bound of the size librdkafka checks against the
//! producer's `message.max.bytes`, so that a record too large is dead-lettered before it is
//! produced ([`too_large`]) rather than refused by librdkafka. A dead-letter message that does
//! not fit either loses its payload (and, if needed, the row's headers), with a note in
//! `detail`.

use bytes::Bytes;
use outboxd_core::{Event, Poison, PoisonKind};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::cloudevents::{self, Envelope};
use crate::dead_letter;

/// Bytes a message takes on the wire beyond its key, value and headers (an upper bound of
/// librdkafka's own estimate), and per header beyond its name and value.
const MESSAGE_OVERHEAD: usize = 64;
const HEADER_OVERHEAD: usize = 10;

/// One message to produce, owning its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Outgoing {
    pub(super) topic: String,
    /// A fixed partition (the offsets topic's marker); `None` lets the key choose.
    pub(super) partition: Option<i32>,
    pub(super) key: Option<Bytes>,
    pub(super) value: Bytes,
    /// No value at all (a tombstone), rather than an empty one.
    pub(super) tombstone: bool,
    /// The message timestamp, in milliseconds since the epoch; `None`: librdkafka's clock.
    pub(super) timestamp: Option<i64>,
    pub(super) headers: Vec<(String, Bytes)>,
}

/// How events are laid out: from `[route] preset` and `[sink] envelope`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The plain layout's `type` header (off under the Debezium preset).
    pub type_header: bool,
    /// outboxd's layout, or CloudEvents in binary or structured content mode.
    pub envelope: Envelope,
    /// CloudEvents' `source`.
    pub source: String,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            type_header: true,
            envelope: Envelope::Plain,
            source: "outboxd".into(),
        }
    }
}

impl Outgoing {
    /// The event in its topic, laid out as `shape` says; an event CloudEvents cannot carry
    /// (no type) is poison.
    pub(super) fn event(event: &Event, shape: &Shape) -> Result<Outgoing, Poison> {
        let mut m = Outgoing::plain(event, shape.type_header);
        match shape.envelope {
            Envelope::Plain => return Ok(m),
            Envelope::CloudEvents => {
                let mut headers: Vec<(String, Bytes)> =
                    cloudevents::attributes(event, &shape.source)?
                        .into_iter()
                        .map(|(name, value)| (format!("ce_{name}"), value))
                        .collect();
                let content_type = cloudevents::content_type(&event.payload);
                headers.push((
                    "content-type".into(),
                    Bytes::from_static(content_type.as_bytes()),
                ));
                m.headers
                    .splice(..1 + usize::from(shape.type_header), headers);
            }
            Envelope::CloudEventsStructured => {
                m.value = cloudevents::structured(event, &shape.source)?;
                let content_type =
                    Bytes::from_static(cloudevents::STRUCTURED_CONTENT_TYPE.as_bytes());
                m.headers.splice(
                    ..1 + usize::from(shape.type_header),
                    [("content-type".to_owned(), content_type)],
                );
            }
        }
        Ok(m)
    }

    /// The event in outboxd's own layout; `type_header`: with the `type` header.
    fn plain(event: &Event, type_header: bool) -> Outgoing {
        let mut headers =
            Vec::with_capacity(event.headers.pairs.len() + event.attributes.len() + 2);
        headers.push(("id".to_owned(), event.id.clone()));
        if type_header {
            headers.push(("type".to_owned(), event.event_type.clone()));
        }
        headers.extend(event.headers.pairs.iter().cloned());
        headers.extend(event.attributes.iter().cloned());
        Outgoing {
            topic: event.topic.clone(),
            partition: None,
            key: (!event.key.is_empty()).then(|| event.key.clone()),
            value: event.payload.clone(),
            tombstone: event.tombstone,
            timestamp: Some(event.timestamp_millis()),
            headers,
        }
    }

    /// The event in the dead-letter topic: its message plus the context headers, made to fit
    /// in `max_bytes` by dropping the payload, then the row's headers, with a note in
    /// `detail`.
    pub(super) fn dead_letter(
        event: &Event,
        poison: &Poison,
        topic: &str,
        max_bytes: usize,
        shape: &Shape,
    ) -> Outgoing {
        let type_header = shape.type_header;
        let build = |poison: &Poison, payload: bool, row_headers: bool| {
            let mut m = Outgoing::plain(event, type_header);
            m.topic = topic.to_owned();
            if !row_headers {
                m.headers.truncate(1 + usize::from(type_header));
            }
            if !payload {
                m.value = Bytes::new();
            }
            m.headers.extend(
                dead_letter::context(event, poison)
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), value)),
            );
            m
        };
        let full = build(poison, true, true);
        if full.wire_size() <= max_bytes {
            return full;
        }
        let mut noted = poison.clone();
        noted.detail.push_str(&format!(
            "; payload ({} bytes) omitted from this dead-letter message to fit message.max.bytes \
             ({max_bytes}): the whole event is kept in Postgres, table outboxd.dead_letters",
            event.payload.len()
        ));
        let without_payload = build(&noted, false, true);
        if without_payload.wire_size() <= max_bytes {
            return without_payload;
        }
        noted.detail.push_str(", and so are the row's headers");
        build(&noted, false, false)
    }

    /// Whether this dead letter of `event` lacks the event's payload (it did not fit).
    pub(super) fn omits_payload_of(&self, event: &Event) -> bool {
        !event.payload.is_empty() && self.value.is_empty()
    }

    /// An upper bound of the message's size as librdkafka counts it for `message.max.bytes`.
    pub(super) fn wire_size(&self) -> usize {
        MESSAGE_OVERHEAD
            + self.key.as_ref().map_or(0, Bytes::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + HEADER_OVERHEAD)
                .sum::<usize>()
    }

    pub(super) fn record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            });
        }
        let mut record = FutureRecord::to(&self.topic).headers(headers);
        if !self.tombstone {
            record = record.payload(self.value.as_ref());
        }
        if let Some(timestamp) = self.timestamp {
            record = record.timestamp(timestamp);
        }
        if let Some(partition) = self.partition {
            record = record.partition(partition);
        }
        match &self.key {
            Some(key) => record.key(key.as_ref()),
            None => record,
        }
    }
}

/// Why a message of `size` bytes is not produced when the producer takes at most `max`.
pub(super) fn too_large(size: usize, max: usize) -> Poison {
    Poison::new(
        PoisonKind::TooLarge,
        format!(
            "the message would be about {size} bytes, over the producer's message.max.bytes ({max})"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboxd_core::{Headers, Lsn, Position};

    fn event(payload: &str) -> Event {
        Event {
            id: Bytes::from_static(b"0b9c6a43-2a1d-4a86-8f0e-5b0b1f1f0c8e"),
            topic: "outbox.order".into(),
            key: Bytes::from_static(b"123"),
            event_type: Bytes::from_static(b"order.paid"),
            payload: Bytes::from(payload.to_owned()),
            headers: Headers {
                json: Bytes::from_static(br#"{"traceparent":"00-abc-01"}"#),
                pairs: vec![("traceparent".into(), Bytes::from_static(b"00-abc-01"))],
            },
            position: Position {
                commit_lsn: Lsn::new(0x1_6B37_4D48),
                index: 3,
            },
            commit_time_micros: 1_700_000_000_000_000,
            tombstone: false,
            time_millis: None,
            attributes: Vec::new(),
        }
    }

    fn header<'a>(m: &'a Outgoing, name: &str) -> Option<&'a [u8]> {
        m.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn an_event_is_key_value_and_headers() {
        let m = Outgoing::event(&event(r#"{"amount":42}"#), &Shape::default()).unwrap();
        assert_eq!(m.topic, "outbox.order");
        assert_eq!(m.key.as_deref(), Some(&b"123"[..]));
        assert_eq!(m.value.as_ref(), br#"{"amount":42}"#);
        let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["id", "type", "traceparent"]);
        assert_eq!(header(&m, "type"), Some(&b"order.paid"[..]));

        let mut keyless = event("{}");
        keyless.key = Bytes::new();
        assert_eq!(
            Outgoing::event(&keyless, &Shape::default()).unwrap().key,
            None
        );
    }

    #[test]
    fn route_headers_the_time_and_tombstones_shape_the_message() {
        let no_type = Shape {
            type_header: false,
            ..Shape::default()
        };
        let mut e = event("{}");
        e.attributes = vec![("tenant".into(), Bytes::from_static(b"acme"))];
        e.time_millis = Some(1_556_890_294_484);
        let m = Outgoing::event(&e, &no_type).unwrap();
        let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["id", "traceparent", "tenant"], "no type header");
        assert_eq!(m.timestamp, Some(1_556_890_294_484));
        assert!(m.record().payload.is_some());

        e.time_millis = None;
        e.tombstone = true;
        e.payload = Bytes::new();
        let m = Outgoing::event(&e, &Shape::default()).unwrap();
        assert_eq!(m.timestamp, Some(1_700_000_000_000), "the commit time");
        assert!(m.record().payload.is_none(), "a tombstone has no value");
        assert_eq!(m.record().key, Some(&b"123"[..]));

        // A dead letter without the type header keeps only the id when it sheds headers.
        let big = "x".repeat(50_000);
        let mut e = event(&big);
        e.headers.pairs = vec![("blob".into(), Bytes::from("h".repeat(20_000)))];
        let poison = Poison::new(PoisonKind::TooLarge, "over the limit");
        let m = Outgoing::dead_letter(&e, &poison, "outboxd.dlq", 10_000, &no_type);
        assert_eq!(m.headers[0].0, "id");
        assert_ne!(m.headers[1].0, "blob");
    }

    #[test]
    fn a_dead_letter_message_carries_the_context() {
        let poison = Poison::new(PoisonKind::Rejected, "kafka refused the message: x");
        let m = Outgoing::dead_letter(
            &event("{}"),
            &poison,
            "outboxd.dlq",
            1_000_000,
            &Shape::default(),
        );
        assert_eq!(m.topic, "outboxd.dlq");
        assert_eq!(m.key.as_deref(), Some(&b"123"[..]));
        assert_eq!(m.value.as_ref(), b"{}");
        let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "id",
                "type",
                "traceparent",
                "topic",
                "reason",
                "detail",
                "lsn",
                "index",
                "commit_time_us"
            ]
        );
        assert_eq!(header(&m, "topic"), Some(&b"outbox.order"[..]));
        assert_eq!(header(&m, "reason"), Some(&b"rejected"[..]));
        assert_eq!(header(&m, "lsn"), Some(&b"1/6B374D48"[..]));
        assert_eq!(header(&m, "index"), Some(&b"3"[..]));
    }

    #[test]
    fn a_too_large_dead_letter_message_drops_its_payload_and_says_so() {
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(50_000));
        let poison = Poison::new(PoisonKind::TooLarge, "over the limit");
        let m = Outgoing::dead_letter(
            &event(&big),
            &poison,
            "outboxd.dlq",
            10_000,
            &Shape::default(),
        );
        assert!(m.wire_size() <= 10_000);
        assert!(m.value.is_empty());
        assert_eq!(header(&m, "traceparent"), Some(&b"00-abc-01"[..]));
        let detail = String::from_utf8(header(&m, "detail").unwrap().to_vec()).unwrap();
        let note = format!("over the limit; payload ({} bytes) omitted", big.len());
        assert!(detail.starts_with(&note), "{detail}");

        // Headers too large as well: they go too, and the detail says so.
        let mut e = event(&big);
        e.headers.pairs = vec![("blob".into(), Bytes::from("h".repeat(20_000)))];
        let m = Outgoing::dead_letter(&e, &poison, "outboxd.dlq", 10_000, &Shape::default());
        assert!(m.wire_size() <= 10_000);
        assert_eq!(header(&m, "blob"), None);
        let detail = String::from_utf8(header(&m, "detail").unwrap().to_vec()).unwrap();
        assert!(detail.ends_with("and so are the row's headers"), "{detail}");
    }

    #[test]
    fn the_size_estimate_is_not_below_librdkafkas() {
        // librdkafka: 36 bytes of record overhead + key + value + serialized headers (two
        // varints and the bytes per header).
        let m = Outgoing::event(&event("{}"), &Shape::default()).unwrap();
        let librdkafka = 36
            + 3
            + 2
            + m.headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum::<usize>();
        assert!(m.wire_size() >= librdkafka);
    }
}
