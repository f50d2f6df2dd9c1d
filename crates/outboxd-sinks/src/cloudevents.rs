//! CloudEvents 1.0: an event's attributes, and its structured JSON form, for the sinks that
//! offer `[sink] envelope = "cloudevents"` (binary content mode) or `"cloudevents-structured"`.
//!
//! The mapping, the same for every broker:
//!
//! | attribute | value |
//! |---|---|
//! | `specversion` | `1.0` |
//! | `id` | the event id |
//! | `source` | `[sink] source` |
//! | `type` | the event type (required: an event without one is dead-lettered) |
//! | `time` | the event's timestamp (the commit time, or `[route] timestamp`), RFC 3339 |
//! | `datacontenttype` | `application/json` when the payload is JSON, `text/plain; charset=utf-8` when it is other text, `application/octet-stream` otherwise |
//!
//! In structured mode the payload is `data` (JSON embedded as is, other text as a JSON
//! string) or `data_base64` (bytes that are not UTF-8). How each broker carries the
//! attributes (Kafka: `ce_` headers and `content-type`) is in the sink.

use base64::Engine;
use bytes::Bytes;
use outboxd_core::{Event, Poison, PoisonKind, rfc3339_millis};
use serde::{Deserialize, Serialize};

/// `[sink] envelope`: how each event is wrapped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Envelope {
    /// outboxd's own layout (see docs/formats.md).
    #[default]
    Plain,
    /// CloudEvents, binary content mode: attributes beside the payload.
    #[serde(rename = "cloudevents")]
    CloudEvents,
    /// CloudEvents, structured content mode: one JSON document.
    #[serde(rename = "cloudevents-structured")]
    CloudEventsStructured,
}

/// The content type of a structured CloudEvent.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// The CloudEvents attributes of an event that has a type, without `datacontenttype`, in
/// this order: `specversion`, `id`, `source`, `type`, `time`.
pub fn attributes(event: &Event, source: &str) -> Result<[(&'static str, Bytes); 5], Poison> {
    if event.event_type.is_empty() {
        return Err(Poison::new(
            PoisonKind::EmptyField,
            "CloudEvents requires a type, and the event's type is empty",
        ));
    }
    if event.id.is_empty() {
        return Err(Poison::new(
            PoisonKind::EmptyField,
            "CloudEvents requires an id, and the event's id is empty",
        ));
    }
    Ok([
        ("specversion", Bytes::from_static(b"1.0")),
        ("id", event.id.clone()),
        ("source", Bytes::from(source.to_owned())),
        ("type", event.event_type.clone()),
        (
            "time",
            Bytes::from(rfc3339_millis(event.timestamp_millis())),
        ),
    ])
}

/// What the payload is, as CloudEvents' `datacontenttype` says it.
pub fn content_type(payload: &[u8]) -> &'static str {
    if is_json(payload) {
        "application/json"
    } else if std::str::from_utf8(payload).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

fn is_json(payload: &[u8]) -> bool {
    !payload.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

/// The event as one structured-mode JSON document.
pub fn structured(event: &Event, source: &str) -> Result<Bytes, Poison> {
    let mut doc = serde_json::Map::new();
    for (name, value) in attributes(event, source)? {
        let text = String::from_utf8_lossy(&value).into_owned();
        doc.insert(name.to_owned(), serde_json::Value::String(text));
    }
    let payload = &event.payload;
    doc.insert(
        "datacontenttype".into(),
        serde_json::Value::String(content_type(payload).into()),
    );
    let to_json = |doc: &serde_json::Map<String, serde_json::Value>| {
        serde_json::to_vec(doc)
            .map_err(|e| Poison::new(PoisonKind::Rejected, format!("CloudEvent JSON: {e}")))
    };
    if is_json(payload) {
        // JSON data is embedded as it is (numbers, member order, spacing kept).
        let mut out = to_json(&doc)?;
        out.pop(); // the closing brace
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(payload);
        out.push(b'}');
        return Ok(Bytes::from(out));
    }
    let (name, value) = match std::str::from_utf8(payload) {
        Ok(text) => ("data", text.to_owned()),
        Err(_) => (
            "data_base64",
            base64::engine::general_purpose::STANDARD.encode(payload),
        ),
    };
    doc.insert(name.to_owned(), serde_json::Value::String(value));
    to_json(&doc).map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use outboxd_core::{Headers, Lsn, Position};

    use super::*;

    fn event(payload: &[u8]) -> Event {
        Event {
            id: Bytes::from_static(b"4d47e190-0402-4048-bc2c-89dd54343cdc"),
            topic: "outbox.order".into(),
            key: Bytes::from_static(b"1"),
            event_type: Bytes::from_static(b"order.paid"),
            payload: Bytes::copy_from_slice(payload),
            tombstone: false,
            headers: Headers::empty(),
            position: Position {
                commit_lsn: Lsn::new(0x100),
                index: 0,
            },
            commit_time_micros: 1_556_890_294_484_000,
            time_millis: None,
            attributes: Vec::new(),
        }
    }

    #[test]
    fn attributes_follow_the_mapping() {
        let attrs = attributes(&event(b"{}"), "/billing").unwrap();
        let text: Vec<(&str, &str)> = attrs
            .iter()
            .map(|(n, v)| (*n, std::str::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            text,
            [
                ("specversion", "1.0"),
                ("id", "4d47e190-0402-4048-bc2c-89dd54343cdc"),
                ("source", "/billing"),
                ("type", "order.paid"),
                ("time", "2019-05-03T13:31:34.484Z"),
            ]
        );
        let mut untyped = event(b"{}");
        untyped.event_type = Bytes::new();
        assert_eq!(
            attributes(&untyped, "s").unwrap_err().kind,
            PoisonKind::EmptyField
        );
    }

    #[test]
    fn the_content_type_follows_the_payload() {
        assert_eq!(content_type(br#"{"a": 1}"#), "application/json");
        assert_eq!(content_type(b"\"text\""), "application/json");
        assert_eq!(content_type(b"plain words"), "text/plain; charset=utf-8");
        assert_eq!(content_type(b""), "text/plain; charset=utf-8");
        assert_eq!(content_type(&[0xff, 0x00]), "application/octet-stream");
    }

    #[test]
    fn structured_mode_embeds_json_and_encodes_bytes() {
        let doc = structured(&event(br#"{"amount": 1.50, "z": 1, "a": 2}"#), "s").unwrap();
        let text = std::str::from_utf8(&doc).unwrap();
        assert!(
            text.ends_with(r#""data":{"amount": 1.50, "z": 1, "a": 2}}"#),
            "JSON data is kept byte for byte: {text}"
        );
        let parsed: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(parsed["specversion"], "1.0");
        assert_eq!(parsed["datacontenttype"], "application/json");

        let doc = structured(&event(b"plain"), "s").unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(parsed["data"], "plain");

        let bytes: Vec<u8> = (0..=255).collect();
        let doc = structured(&event(&bytes), "s").unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(parsed["data_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(decoded, bytes);
        assert_eq!(parsed["datacontenttype"], "application/octet-stream");
    }
}
