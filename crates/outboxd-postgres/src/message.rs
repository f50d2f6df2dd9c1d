//! outboxd's logical decoding messages: events written to the WAL without a table row.
//!
//! Three kinds, told apart by the message prefix, all emitted with
//! `pg_logical_emit_message(true, prefix, content)` inside a transaction, so that they are
//! decoded only if it commits, in commit order, like rows:
//!
//! | prefix             | written by                          | content                     |
//! |--------------------|-------------------------------------|-----------------------------|
//! | `outboxd`          | `outbox_emit_message(...)` (table-less mode) | `{"id": "…", "aggregate_type": "…", …}` |
//! | `outboxd.backfill` | `outboxd setup --backfill-where`    | `{"row": {…}}`              |
//! | `outboxd.replay`   | `outboxd replay`                    | `{"row": {…}, "topic": "…"}` |
//!
//! Each object maps column names to the column's text (as `::text` renders it, which is what
//! pgoutput sends for a row) or `null`. A backfilled or replayed row carries the outbox
//! table's columns, so it is routed exactly like the row itself; `topic`, when present,
//! replaces the routed topic. Values that are JSON but not strings (a payload written as an
//! object by hand) are taken as their JSON text.
//!
//! A message that is not such an object is poison: the pipeline dead-letters it with the
//! reason, and the stream goes on.

use std::collections::HashMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The prefix of table-less events.
pub const EVENT_PREFIX: &str = "outboxd";
/// The prefix of backfilled rows.
pub const BACKFILL_PREFIX: &str = "outboxd.backfill";
/// The prefix of replayed rows.
pub const REPLAY_PREFIX: &str = "outboxd.replay";

/// The fields of a table-less event, in the order `outbox_emit_message` writes them: the
/// "columns" routes are bound to in `postgres.source = "messages"`.
pub const EVENT_FIELDS: &[&str] = &[
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "created_at",
];

/// [`EVENT_FIELDS`] as the column list routes are bound to.
pub fn event_columns() -> Vec<String> {
    EVENT_FIELDS.iter().map(|f| (*f).to_owned()).collect()
}

/// Which of outboxd's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A table-less event.
    Event,
    /// A row published by a backfill.
    Backfill,
    /// A row re-published by `outboxd replay`.
    Replay,
}

impl MessageKind {
    /// The kind of a message prefix, `None` for messages that are not outboxd's.
    pub fn of_prefix(prefix: &str) -> Option<MessageKind> {
        match prefix {
            EVENT_PREFIX => Some(MessageKind::Event),
            BACKFILL_PREFIX => Some(MessageKind::Backfill),
            REPLAY_PREFIX => Some(MessageKind::Replay),
            _ => None,
        }
    }
}

/// A message whose content is not what its prefix promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("logical decoding message with prefix {prefix:?} is not valid: {detail}")]
pub struct MessageError {
    /// The prefix.
    pub prefix: &'static str,
    /// What is wrong.
    pub detail: String,
}

/// A decoded message: values in the order of the columns asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// One value per requested column, `None` for a missing or `null` field.
    pub values: Vec<Option<Bytes>>,
    /// The topic that replaces the routed one (replay `--topic`).
    pub topic: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    row: HashMap<&'a str, &'a RawValue>,
    #[serde(default)]
    topic: Option<String>,
}

/// Decodes `content` of a message of `kind` into values for `columns`.
pub fn decode(
    kind: MessageKind,
    content: &[u8],
    columns: &[String],
) -> Result<MessageRow, MessageError> {
    let prefix = match kind {
        MessageKind::Event => EVENT_PREFIX,
        MessageKind::Backfill => BACKFILL_PREFIX,
        MessageKind::Replay => REPLAY_PREFIX,
    };
    let error = |detail: String| MessageError { prefix, detail };
    let text = std::str::from_utf8(content).map_err(|e| error(format!("not UTF-8: {e}")))?;
    let (fields, topic): (HashMap<&str, &RawValue>, Option<String>) = match kind {
        MessageKind::Event => (
            serde_json::from_str(text)
                .map_err(|e| error(format!("not a JSON object of fields: {e}")))?,
            None,
        ),
        MessageKind::Backfill | MessageKind::Replay => {
            let envelope: Envelope<'_> = serde_json::from_str(text)
                .map_err(|e| error(format!("not {{\"row\": {{…}}}}: {e}")))?;
            (envelope.row, envelope.topic)
        }
    };
    let mut values = Vec::with_capacity(columns.len());
    for column in columns {
        let value = match fields.get(column.as_str()) {
            None => None,
            Some(raw) => field_text(raw).map_err(|e| error(format!("field {column:?}: {e}")))?,
        };
        values.push(value);
    }
    Ok(MessageRow { values, topic })
}

/// A field's text: a JSON string unescaped, `null` as `None`, anything else as its JSON text.
fn field_text(raw: &RawValue) -> Result<Option<Bytes>, serde_json::Error> {
    let json = raw.get();
    match json.as_bytes().first() {
        Some(b'n') if json == "null" => Ok(None),
        Some(b'"') => {
            let s: String = serde_json::from_str(json)?;
            Ok(Some(Bytes::from(s)))
        }
        _ => Ok(Some(Bytes::copy_from_slice(json.as_bytes()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn text(v: &Option<Bytes>) -> Option<&str> {
        v.as_ref().map(|b| std::str::from_utf8(b).expect("utf8"))
    }

    #[test]
    fn events_give_their_fields_in_column_order() {
        let content = br#"{"id":"e1","aggregate_type":"order","aggregate_id":"7","event_type":"order.paid","payload":"{\"amount\": 42}","headers":"{}","created_at":"2026-12-02 10:00:00+00"}"#;
        let cols = columns(EVENT_FIELDS);
        let row = decode(MessageKind::Event, content, &cols).expect("decodes");
        let got: Vec<Option<&str>> = row.values.iter().map(text).collect();
        assert_eq!(
            got,
            [
                Some("e1"),
                Some("order"),
                Some("7"),
                Some("order.paid"),
                Some("{\"amount\": 42}"),
                Some("{}"),
                Some("2026-12-02 10:00:00+00")
            ]
        );
        assert_eq!(row.topic, None);
    }

    #[test]
    fn rows_carry_nulls_missing_fields_json_values_and_a_topic() {
        let content =
            br#"{"row":{"id":"1","payload":{"a":[1,2]},"published_at":null},"topic":"replays"}"#;
        let row = decode(
            MessageKind::Replay,
            content,
            &columns(&["id", "payload", "published_at", "absent"]),
        )
        .expect("decodes");
        let got: Vec<Option<&str>> = row.values.iter().map(text).collect();
        assert_eq!(got, [Some("1"), Some(r#"{"a":[1,2]}"#), None, None]);
        assert_eq!(row.topic.as_deref(), Some("replays"));
        let row = decode(
            MessageKind::Backfill,
            br#"{"row":{"id":"2"}}"#,
            &columns(&["id"]),
        )
        .expect("decodes");
        assert_eq!(row.topic, None);
    }

    #[test]
    fn bad_content_is_an_error_that_names_the_prefix() {
        let cols = columns(EVENT_FIELDS);
        for (kind, content) in [
            (MessageKind::Event, &b"not json"[..]),
            (MessageKind::Event, b"[1,2]"),
            (MessageKind::Event, b"\xff\xfe"),
            (MessageKind::Replay, br#"{"rows":{}}"#),
            (MessageKind::Backfill, br#"{"row":{"id":"1"},"topic":5}"#),
        ] {
            let err = decode(kind, content, &cols).expect_err("refused");
            assert!(err.to_string().contains("outboxd"), "{err}");
        }
        assert_eq!(
            MessageKind::of_prefix("outboxd.replay"),
            Some(MessageKind::Replay)
        );
        assert_eq!(MessageKind::of_prefix("someone-else"), None);
    }
}
