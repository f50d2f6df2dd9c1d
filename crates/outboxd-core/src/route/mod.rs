//! Routing: from an outbox row to an [`Event`], through small templates over the row's
//! columns.
//!
//! A template is text with `{column}` placeholders: `outbox.{aggregate_type}`. `{{` and `}}`
//! stand for literal braces. The route names a template for the topic and for the key, and
//! which columns hold the event id, type, payload and headers. [`Router::bind`] checks the
//! route against the outbox table's columns once, so that a typo is a startup error, not a
//! stream of dead letters.
//!
//! Routing a row never fails as a whole: a row that cannot be routed (a NULL or empty routed
//! field, headers that are not a JSON object) becomes a [`Record`] for the dead-letter
//! destination, carrying every field that could be read and the reason.

use bytes::Bytes;

use crate::event::{Event, Headers, Poison, PoisonKind, Position, Record};

mod template;
mod value;

use template::{BoundColumn, BoundTemplate};
pub use template::{Template, TemplateError, glob_escape};
pub use value::{PayloadEncoding, TimestampSource, rfc3339_millis};

/// The route as configured: templates and column names, not yet checked against a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// Template for the topic (Kafka) or stream (Redis), e.g. `outbox.{aggregate_type}`.
    pub topic: String,
    /// Template for the ordering key, e.g. `{aggregate_id}`. Empty for events without a key.
    pub key: String,
    /// Column holding the event id. Empty: the id is the event's WAL position.
    pub id_column: String,
    /// Column holding the event type. Empty: events have an empty type.
    pub type_column: String,
    /// Column holding the payload (required).
    pub payload_column: String,
    /// Column holding the headers object. Empty: events have no headers.
    pub headers_column: String,
    /// `[route.headers]`: extra headers (Kafka, NATS) or fields (Redis), name and template.
    pub attributes: Vec<(String, String)>,
    /// Where the event's timestamp comes from.
    pub timestamp: TimestampSource,
    /// How the payload becomes the message value.
    pub payload_encoding: PayloadEncoding,
    /// A NULL payload makes a tombstone (a message without a value) instead of a dead letter.
    pub tombstone_on_null: bool,
}

impl RouteSpec {
    /// The route for the outbox table that `sql/` creates.
    pub fn standard() -> Self {
        RouteSpec {
            topic: "outbox.{aggregate_type}".into(),
            key: "{aggregate_id}".into(),
            id_column: "id".into(),
            type_column: "event_type".into(),
            payload_column: "payload".into(),
            headers_column: "headers".into(),
            attributes: Vec::new(),
            timestamp: TimestampSource::CommitQuiet,
            payload_encoding: PayloadEncoding::AsIs,
            tombstone_on_null: false,
        }
    }

    /// The route of Debezium's Outbox Event Router with its defaults, for its outbox table
    /// (`id`, `aggregatetype`, `aggregateid`, `type`, `payload`): topic
    /// `outbox.event.<aggregatetype>`, key `aggregateid`, the payload as a JSON string, or as
    /// the JSON document with `expand_json_payload` (its `table.expand.json.payload`).
    pub fn debezium(expand_json_payload: bool) -> Self {
        RouteSpec {
            topic: "outbox.event.{aggregatetype}".into(),
            key: "{aggregateid}".into(),
            id_column: "id".into(),
            type_column: "type".into(),
            payload_column: "payload".into(),
            headers_column: String::new(),
            attributes: Vec::new(),
            timestamp: TimestampSource::CommitQuiet,
            payload_encoding: if expand_json_payload {
                PayloadEncoding::JsonDocument
            } else {
                PayloadEncoding::JsonString
            },
            tombstone_on_null: false,
        }
    }
}

/// The route does not fit the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A template could not be parsed.
    #[error("route.{field} = {template:?}: {source}")]
    Template {
        /// The route key (`topic` or `key`).
        field: &'static str,
        /// The template text.
        template: String,
        /// What is wrong with it.
        #[source]
        source: TemplateError,
    },
    /// The route names a column the table does not have.
    #[error(
        "route.{field} names column {column:?}, which the outbox table does not have (its columns: {available})"
    )]
    UnknownColumn {
        /// The route key that names the column.
        field: &'static str,
        /// The column named.
        column: String,
        /// The table's columns, comma-separated.
        available: String,
    },
    /// `payload_column` is empty.
    #[error("route.payload_column is empty: name the column that holds the event payload")]
    NoPayloadColumn,
    /// A `[route.headers]` template could not be parsed.
    #[error("route.headers.{name} = {template:?}: {source}")]
    AttributeTemplate {
        /// The header's name.
        name: String,
        /// The template text.
        template: String,
        /// What is wrong with it.
        #[source]
        source: TemplateError,
    },
    /// `topic` is empty.
    #[error("route.topic is empty: give a template such as \"outbox.{{aggregate_type}}\"")]
    NoTopic,
}

/// A route bound to the columns of one version of the outbox table.
///
/// Rebind when the table's shape changes (a new pgoutput Relation message).
#[derive(Clone, Debug)]
pub struct Router {
    topic: BoundTemplate,
    key: Option<BoundTemplate>,
    id: Option<BoundColumn>,
    event_type: Option<BoundColumn>,
    payload: BoundColumn,
    headers: Option<BoundColumn>,
    attributes: Vec<(String, BoundTemplate)>,
    timestamp: BoundTimestamp,
    encoding: PayloadEncoding,
    /// The payload column is `bytea`: its text form is decoded to its bytes.
    payload_bytea: bool,
    tombstone_on_null: bool,
}

#[derive(Clone, Debug)]
enum BoundTimestamp {
    CommitQuiet,
    Commit,
    Column(BoundColumn),
}

impl Router {
    /// Checks `spec` against the table's `columns` (in table order) and binds it.
    pub fn bind(spec: &RouteSpec, columns: &[String]) -> Result<Router, RouteError> {
        Router::bind_typed(spec, columns, &[])
    }

    /// [`Router::bind`], knowing the columns' type OIDs (in the same order; missing ones are
    /// unknown): a `bytea` payload is forwarded as its bytes.
    pub fn bind_typed(
        spec: &RouteSpec,
        columns: &[String],
        types: &[u32],
    ) -> Result<Router, RouteError> {
        let parse = |field, text: &str| {
            Template::parse(text).map_err(|source| RouteError::Template {
                field,
                template: text.to_owned(),
                source,
            })
        };
        let topic = parse("topic", &spec.topic)?;
        if topic.is_empty() {
            return Err(RouteError::NoTopic);
        }
        let key = parse("key", &spec.key)?;
        if spec.payload_column.is_empty() {
            return Err(RouteError::NoPayloadColumn);
        }
        let payload = BoundColumn::bind("payload_column", &spec.payload_column, columns)?
            .ok_or(RouteError::NoPayloadColumn)?;
        let attributes = spec
            .attributes
            .iter()
            .map(|(name, text)| {
                let template =
                    Template::parse(text).map_err(|source| RouteError::AttributeTemplate {
                        name: name.clone(),
                        template: text.clone(),
                        source,
                    })?;
                Ok((name.clone(), template.bind("headers", columns)?))
            })
            .collect::<Result<_, RouteError>>()?;
        let timestamp = match &spec.timestamp {
            TimestampSource::CommitQuiet => BoundTimestamp::CommitQuiet,
            TimestampSource::Commit => BoundTimestamp::Commit,
            TimestampSource::Column(name) => {
                BoundTimestamp::Column(BoundColumn::bind("timestamp", name, columns)?.ok_or_else(
                    || RouteError::UnknownColumn {
                        field: "timestamp",
                        column: String::new(),
                        available: columns.join(", "),
                    },
                )?)
            }
        };
        Ok(Router {
            payload_bytea: types.get(payload.index) == Some(&value::BYTEA_OID),
            attributes,
            timestamp,
            encoding: spec.payload_encoding,
            tombstone_on_null: spec.tombstone_on_null,
            topic: topic.bind("topic", columns)?,
            key: if key.is_empty() {
                None
            } else {
                Some(key.bind("key", columns)?)
            },
            id: BoundColumn::bind("id_column", &spec.id_column, columns)?,
            event_type: BoundColumn::bind("type_column", &spec.type_column, columns)?,
            payload,
            headers: BoundColumn::bind("headers_column", &spec.headers_column, columns)?,
        })
    }

    /// Routes one row (`values` in table column order, `None` for NULL).
    ///
    /// Returns a record to publish, or a dead-letter record with the first problem found and
    /// every field that could be read.
    pub fn route(
        &self,
        values: &[Option<Bytes>],
        position: Position,
        commit_time_micros: i64,
    ) -> Record {
        let mut poison = None;
        let mut take = |r: Result<Bytes, Poison>| {
            r.unwrap_or_else(|p| {
                poison.get_or_insert(p);
                Bytes::new()
            })
        };

        let id = match &self.id {
            Some(col) => take(col.value("id", values)),
            None => Bytes::from(position.to_string()),
        };
        let topic = take(
            self.topic
                .render(values)
                .and_then(|t| non_empty("topic", t)),
        );
        let key = match &self.key {
            Some(t) => take(t.render(values).and_then(|k| non_empty("key", k))),
            None => Bytes::new(),
        };
        let event_type = match &self.event_type {
            Some(col) => take(col.value("type", values)),
            None => Bytes::new(),
        };
        let (payload, tombstone) = match self.payload(values) {
            Ok(Some(payload)) => (payload, false),
            Ok(None) => (Bytes::new(), true),
            Err(p) => (take(Err(p)), false),
        };
        let time_millis = match &self.timestamp {
            BoundTimestamp::CommitQuiet => None,
            BoundTimestamp::Commit => Some(commit_time_micros.div_euclid(1000)),
            BoundTimestamp::Column(col) => col
                .value("timestamp", values)
                .and_then(|text| value::timestamp_millis(&col.name, &text))
                .map_err(|p| poison.get_or_insert(p))
                .ok(),
        };
        let attributes = self
            .attributes
            .iter()
            .filter_map(|(name, t)| Some((name.clone(), t.render(values).ok()?)))
            .collect();
        let headers = match self.headers.as_ref().and_then(|c| values.get(c.index)) {
            Some(Some(raw)) => parse_headers(raw.clone()).unwrap_or_else(|p| {
                poison.get_or_insert(p);
                Headers {
                    json: raw.clone(),
                    pairs: Vec::new(),
                }
            }),
            // No headers column, or a NULL value: no headers.
            _ => Headers::empty(),
        };

        let event = Event {
            id,
            topic: String::from_utf8_lossy(&topic).into_owned(),
            key,
            event_type,
            payload,
            tombstone,
            headers,
            position,
            commit_time_micros,
            time_millis,
            attributes,
        };
        match poison {
            None => Record::publish(event),
            Some(p) => Record::dead_letter(event, p),
        }
    }
}

impl Router {
    /// The message value; `None` for a tombstone.
    fn payload(&self, values: &[Option<Bytes>]) -> Result<Option<Bytes>, Poison> {
        let raw = match self.payload.value("payload", values) {
            Ok(raw) => raw,
            Err(_) if self.tombstone_on_null => return Ok(None),
            Err(p) => return Err(p),
        };
        if self.payload_bytea {
            // Bytes are forwarded as they are, whatever the encoding (the Event Router's
            // BinaryDataConverter does the same).
            return value::bytea(&raw)
                .map(|b| Some(Bytes::from(b)))
                .map_err(|e| {
                    Poison::new(
                        PoisonKind::InvalidPayload,
                        format!("bytea payload column {:?}: {e}", self.payload.name),
                    )
                });
        }
        Ok(Some(match self.encoding {
            PayloadEncoding::AsIs => raw,
            PayloadEncoding::JsonString => value::json_string(&raw),
            PayloadEncoding::JsonDocument => {
                value::compact_json(&raw).unwrap_or_else(|| value::json_string(&raw))
            }
        }))
    }
}

fn non_empty(field: &str, value: Bytes) -> Result<Bytes, Poison> {
    if value.is_empty() {
        Err(Poison::new(
            PoisonKind::EmptyField,
            format!("the {field} is empty"),
        ))
    } else {
        Ok(value)
    }
}

/// Reads a headers value: a JSON object whose values are strings (other values are kept as
/// their JSON text).
fn parse_headers(json: Bytes) -> Result<Headers, Poison> {
    if json.as_ref() == b"{}" {
        return Ok(Headers {
            json,
            pairs: Vec::new(),
        });
    }
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| {
            Poison::new(
                PoisonKind::InvalidHeaders,
                format!("headers are not a JSON object: {e}"),
            )
        })?;
    let pairs = map
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                serde_json::Value::String(s) => Bytes::from(s),
                other => Bytes::from(other.to_string()),
            };
            (name, value)
        })
        .collect();
    Ok(Headers { json, pairs })
}

#[cfg(test)]
mod tests;
