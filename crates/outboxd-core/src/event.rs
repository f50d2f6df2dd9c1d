//! What flows from the decoder to the sink: routed outbox events, and the poison ones that
//! go to the dead-letter destination instead.

use std::fmt;

use bytes::Bytes;

use crate::lsn::Lsn;

/// Where an event sits in the WAL: the commit record of its transaction and its index among
/// the outbox rows of that transaction (0-based, in insert order).
///
/// Positions grow strictly in commit order, so `(commit_lsn, index)` is a stable identity for
/// an event across replays of the same WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The LSN of the transaction's commit record (pgoutput's Begin `final_lsn`).
    pub commit_lsn: Lsn,
    /// The row's index among the outbox rows of its transaction.
    pub index: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.index)
    }
}

/// The event's headers: a JSON object of strings.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Headers {
    /// The object as JSON text, forwarded as is where the wire format carries JSON (Redis).
    /// `{}` when the row has no headers.
    pub json: Bytes,
    /// The same object as name/value pairs, for wire formats with native headers (Kafka).
    /// Values that were not JSON strings hold their JSON text.
    pub pairs: Vec<(String, Bytes)>,
}

impl Headers {
    /// No headers.
    pub fn empty() -> Self {
        Headers {
            json: Bytes::from_static(b"{}"),
            pairs: Vec::new(),
        }
    }

    /// Adds a header in front of the others (in the JSON object too). `name` and `value`
    /// must need no JSON escaping.
    pub fn push_front(&mut self, name: &'static str, value: &'static str) {
        let entry = format!("\"{name}\":\"{value}\"");
        let json = match self.json.as_ref() {
            b"{}" | b"" => format!("{{{entry}}}"),
            other => format!("{{{entry},{}", String::from_utf8_lossy(&other[1..])),
        };
        self.json = Bytes::from(json);
        self.pairs
            .insert(0, (name.to_owned(), Bytes::from_static(value.as_bytes())));
    }
}

/// One outbox row, routed: everything a sink needs to publish it.
///
/// All text fields are UTF-8 (pgoutput sends text in the connection's `UTF8` encoding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The stable event id: the consumers' idempotency key.
    pub id: Bytes,
    /// The destination the route chose (a Kafka topic or, with the prefix, a Redis stream).
    /// Empty when routing failed before the topic was known.
    pub topic: String,
    /// The ordering key: events with the same key are delivered in commit order.
    pub key: Bytes,
    /// The event type, e.g. `order.paid`.
    pub event_type: Bytes,
    /// The message value: the payload column's bytes (a `bytea` payload decoded from its
    /// text form), shaped as the route's [`PayloadEncoding`](crate::route::PayloadEncoding)
    /// says. Empty for a tombstone.
    pub payload: Bytes,
    /// The payload column was NULL and the route makes such rows tombstones (a message
    /// without a value, for compacted Kafka topics) rather than dead letters.
    pub tombstone: bool,
    /// The row's headers.
    pub headers: Headers,
    /// Where the row sits in the WAL.
    pub position: Position,
    /// The commit time of the transaction, in microseconds since the Unix epoch, for the
    /// commit-to-ack latency.
    pub commit_time_micros: i64,
    /// `[route] timestamp`, when set: the event's time in milliseconds since the epoch (the
    /// commit time, or a column's), written as a Redis field `time`.
    pub time_millis: Option<i64>,
    /// `[route.headers]`, rendered for this row in name order: extra headers (Kafka, NATS) or
    /// fields (Redis). A header whose template reads a NULL column is left out.
    pub attributes: Vec<(String, Bytes)>,
}

impl Event {
    /// The event's timestamp in milliseconds since the epoch, for brokers that carry one
    /// (Kafka): [`Event::time_millis`], or else the commit time.
    pub fn timestamp_millis(&self) -> i64 {
        self.time_millis
            .unwrap_or(self.commit_time_micros.div_euclid(1000))
    }
}

/// Why an event cannot be published; written to the dead-letter destination with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoisonKind {
    /// A column the route needs is SQL NULL.
    NullField,
    /// A routed field (topic, or a templated key) came out empty.
    EmptyField,
    /// The headers column is not a JSON object.
    InvalidHeaders,
    /// The event is larger than the broker accepts.
    TooLarge,
    /// The broker refused this event (for example a wrong-typed key or a forbidden topic).
    Rejected,
    /// A logical decoding message with one of outboxd's prefixes whose content is not what
    /// the prefix promises.
    InvalidMessage,
    /// The route's timestamp column holds something that is not a timestamp.
    InvalidTimestamp,
    /// A `bytea` payload whose text form could not be decoded.
    InvalidPayload,
}

impl PoisonKind {
    /// The label used in dead-letter entries and the `reason` label of metrics.
    pub const fn label(self) -> &'static str {
        match self {
            PoisonKind::NullField => "null_field",
            PoisonKind::EmptyField => "empty_field",
            PoisonKind::InvalidHeaders => "invalid_headers",
            PoisonKind::TooLarge => "too_large",
            PoisonKind::Rejected => "rejected",
            PoisonKind::InvalidMessage => "invalid_message",
            PoisonKind::InvalidTimestamp => "invalid_timestamp",
            PoisonKind::InvalidPayload => "invalid_payload",
        }
    }
}

/// The reason an event went to the dead-letter destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Poison {
    /// The class of problem, for metrics and for consumers of the dead-letter destination.
    pub kind: PoisonKind,
    /// A human-readable explanation naming the field or the broker's error.
    pub detail: String,
}

impl Poison {
    /// A poison reason of `kind`, explained by `detail`.
    pub fn new(kind: PoisonKind, detail: impl Into<String>) -> Self {
        Poison {
            kind,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Poison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.detail)
    }
}

/// A unit of work for a sink: an event to publish, or one to dead-letter with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The event (for a poison row, with whatever fields could be read).
    pub event: Event,
    /// `Some` when the event must go to the dead-letter destination instead of its topic.
    pub poison: Option<Poison>,
}

impl Record {
    /// An event to publish to its topic.
    pub fn publish(event: Event) -> Self {
        Record {
            event,
            poison: None,
        }
    }

    /// An event to send to the dead-letter destination.
    pub fn dead_letter(event: Event, poison: Poison) -> Self {
        Record {
            event,
            poison: Some(poison),
        }
    }

    /// The bytes this record holds, as counted against the in-flight memory budget.
    pub fn size(&self) -> usize {
        let e = &self.event;
        let headers: usize = e.headers.pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
        e.id.len()
            + e.topic.len()
            + e.key.len()
            + e.event_type.len()
            + e.payload.len()
            + e.headers.json.len()
            + e.attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + headers
            + self.poison.as_ref().map_or(0, |p| p.detail.len())
            + 128
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_header_in_front_keeps_the_object_valid() {
        let mut h = super::Headers::empty();
        h.push_front("outboxd-replay", "true");
        assert_eq!(h.json.as_ref(), br#"{"outboxd-replay":"true"}"#);
        let mut h = super::Headers {
            json: bytes::Bytes::from_static(br#"{"a": "1"}"#),
            pairs: vec![("a".into(), bytes::Bytes::from_static(b"1"))],
        };
        h.push_front("outboxd-replay", "true");
        assert_eq!(h.json.as_ref(), br#"{"outboxd-replay":"true","a": "1"}"#);
        assert_eq!(h.pairs[0].0, "outboxd-replay");
        assert_eq!(h.pairs.len(), 2);
    }
}
