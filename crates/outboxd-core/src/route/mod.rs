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
mod tests {
    use super::template::Part;
    use super::*;
    use crate::lsn::Lsn;

    fn columns() -> Vec<String> {
        [
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
            "created_at",
        ]
        .map(String::from)
        .to_vec()
    }

    fn row(values: [Option<&str>; 7]) -> Vec<Option<Bytes>> {
        values
            .iter()
            .map(|v| v.map(|s| Bytes::copy_from_slice(s.as_bytes())))
            .collect()
    }

    fn pos() -> Position {
        Position {
            commit_lsn: Lsn::new(0x1_0000_00A0),
            index: 3,
        }
    }

    fn standard_row() -> Vec<Option<Bytes>> {
        row([
            Some("0b6f1f3c-6d1c-4a8e-9a53-1f0f0e3c2a11"),
            Some("order"),
            Some("123"),
            Some("order.paid"),
            Some(r#"{"amount": 5}"#),
            Some(r#"{"traceparent": "00-ab", "schema_version": 2}"#),
            Some("2026-11-22 10:00:00+00"),
        ])
    }

    #[test]
    fn parses_templates_with_escapes() {
        let t = Template::parse("a.{x}.{{lit}}-{y}").expect("parses");
        assert_eq!(t.columns().collect::<Vec<_>>(), ["x", "y"]);
        assert_eq!(
            t.parts,
            vec![
                Part::Text("a.".into()),
                Part::Column("x".into()),
                Part::Text(".{lit}-".into()),
                Part::Column("y".into()),
            ]
        );
        assert_eq!(
            Template::parse("a{b").unwrap_err(),
            TemplateError::Unclosed { at: 1 }
        );
        assert_eq!(
            Template::parse("a}b").unwrap_err(),
            TemplateError::Unmatched { at: 1 }
        );
        assert_eq!(
            Template::parse("{}").unwrap_err(),
            TemplateError::EmptyPlaceholder { at: 0 }
        );
        assert_eq!(
            Template::parse("{a{b}").unwrap_err(),
            TemplateError::Unclosed { at: 0 }
        );
    }

    #[test]
    fn routes_the_standard_table() {
        let router = Router::bind(&RouteSpec::standard(), &columns()).expect("binds");
        let record = router.route(&standard_row(), pos(), 42);
        assert_eq!(record.poison, None);
        let e = record.event;
        assert_eq!(e.id, "0b6f1f3c-6d1c-4a8e-9a53-1f0f0e3c2a11");
        assert_eq!(e.topic, "outbox.order");
        assert_eq!(e.key, "123");
        assert_eq!(e.event_type, "order.paid");
        assert_eq!(e.payload, r#"{"amount": 5}"#);
        assert_eq!(
            e.headers.pairs,
            vec![
                ("schema_version".to_owned(), Bytes::from("2")),
                ("traceparent".to_owned(), Bytes::from("00-ab")),
            ]
        );
        assert_eq!(e.position, pos());
        assert_eq!(e.commit_time_micros, 42);
    }

    #[test]
    fn unknown_columns_are_named_at_bind_time() {
        let mut spec = RouteSpec::standard();
        spec.topic = "outbox.{aggregatetype}".into();
        let err = Router::bind(&spec, &columns()).unwrap_err();
        assert!(
            matches!(err, RouteError::UnknownColumn { field: "topic", ref column, .. } if column == "aggregatetype")
        );
        assert!(err.to_string().contains("aggregate_type"), "{err}");

        let mut spec = RouteSpec::standard();
        spec.headers_column = "hdrs".into();
        assert!(matches!(
            Router::bind(&spec, &columns()),
            Err(RouteError::UnknownColumn {
                field: "headers_column",
                ..
            })
        ));
    }

    #[test]
    fn null_and_empty_routed_fields_are_poison() {
        let router = Router::bind(&RouteSpec::standard(), &columns()).expect("binds");

        let mut values = standard_row();
        values[1] = None;
        let r = router.route(&values, pos(), 0);
        let poison = r.poison.expect("poison");
        assert_eq!(poison.kind, PoisonKind::NullField);
        assert!(poison.detail.contains("aggregate_type"), "{poison}");
        // Everything else is still carried to the dead letter.
        assert_eq!(r.event.key, "123");
        assert_eq!(r.event.payload, r#"{"amount": 5}"#);

        let mut values = standard_row();
        values[2] = Some(Bytes::new());
        let poison = router.route(&values, pos(), 0).poison.expect("poison");
        assert_eq!(poison.kind, PoisonKind::EmptyField);

        let mut values = standard_row();
        values[4] = None;
        let poison = router.route(&values, pos(), 0).poison.expect("poison");
        assert_eq!(poison.kind, PoisonKind::NullField);
        assert!(poison.detail.contains("payload"));
    }

    #[test]
    fn headers_must_be_an_object() {
        let router = Router::bind(&RouteSpec::standard(), &columns()).expect("binds");
        let mut values = standard_row();
        values[5] = Some(Bytes::from_static(b"[1, 2]"));
        let r = router.route(&values, pos(), 0);
        assert_eq!(r.poison.expect("poison").kind, PoisonKind::InvalidHeaders);
        assert_eq!(r.event.headers.json, "[1, 2]");

        values[5] = None;
        let r = router.route(&values, pos(), 0);
        assert_eq!(r.poison, None);
        assert_eq!(r.event.headers, Headers::empty());
    }

    #[test]
    fn other_table_shapes_route_by_configuration() {
        // The Debezium outbox shape.
        let columns: Vec<String> = ["id", "aggregatetype", "aggregateid", "type", "payload"]
            .map(String::from)
            .to_vec();
        let spec = RouteSpec {
            topic: "outbox.event.{aggregatetype}".into(),
            key: "{aggregateid}".into(),
            id_column: "id".into(),
            type_column: "type".into(),
            payload_column: "payload".into(),
            headers_column: String::new(),
            ..RouteSpec::standard()
        };
        let router = Router::bind(&spec, &columns).expect("binds");
        let values: Vec<Option<Bytes>> = ["e1", "customer", "7", "created", "{}"]
            .map(|s| Some(Bytes::from(s)))
            .to_vec();
        let e = router.route(&values, pos(), 0).event;
        assert_eq!(e.topic, "outbox.event.customer");
        assert_eq!(e.key, "7");

        // A table without id or key: ids come from the WAL position.
        let columns: Vec<String> = ["topic", "payload"].map(String::from).to_vec();
        let spec = RouteSpec {
            topic: "{topic}".into(),
            key: String::new(),
            id_column: String::new(),
            type_column: String::new(),
            payload_column: "payload".into(),
            headers_column: String::new(),
            ..RouteSpec::standard()
        };
        let router = Router::bind(&spec, &columns).expect("binds");
        let values = vec![Some(Bytes::from("jobs")), Some(Bytes::from("{}"))];
        let r = router.route(&values, pos(), 0);
        assert_eq!(r.poison, None);
        assert_eq!(r.event.id, "1/A0#3");
        assert_eq!(r.event.key, "");
    }

    #[test]
    fn a_template_becomes_a_glob_of_the_names_it_can_produce() {
        let t = Template::parse("outbox.{aggregate_type}").unwrap();
        assert_eq!(t.glob(), "outbox.*");
        let t = Template::parse("a*b?[{x}]-{y}").unwrap();
        assert_eq!(t.glob(), "a\\*b\\?\\[*\\]-*");
        assert_eq!(Template::parse("fixed").unwrap().glob(), "fixed");
    }

    fn debezium_columns() -> Vec<String> {
        [
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "note",
            "at",
        ]
        .map(String::from)
        .to_vec()
    }

    fn debezium_row(payload: Option<&str>) -> Vec<Option<Bytes>> {
        [
            Some("4d47e190-0402-4048-bc2c-89dd54343cdc"),
            Some("order"),
            Some("1"),
            Some("OrderCreated"),
            payload,
            None,
            Some("2019-05-03 13:31:34.484+00"),
        ]
        .iter()
        .map(|v| v.map(|s| Bytes::copy_from_slice(s.as_bytes())))
        .collect()
    }

    #[test]
    fn the_debezium_preset_routes_as_the_event_router() {
        let router = Router::bind(&RouteSpec::debezium(false), &debezium_columns()).unwrap();
        let r = router.route(
            &debezium_row(Some(r#"{"id": 1, "s": "a\"b"}"#)),
            pos(),
            7_000,
        );
        assert_eq!(r.poison, None);
        assert_eq!(r.event.topic, "outbox.event.order");
        assert_eq!(r.event.key, "1");
        assert_eq!(r.event.id, "4d47e190-0402-4048-bc2c-89dd54343cdc");
        assert_eq!(r.event.event_type, "OrderCreated");
        assert_eq!(r.event.payload, r#""{\"id\": 1, \"s\": \"a\\\"b\"}""#);
        assert_eq!(r.event.timestamp_millis(), 7);
        assert_eq!(r.event.time_millis, None);

        let router = Router::bind(&RouteSpec::debezium(true), &debezium_columns()).unwrap();
        let r = router.route(&debezium_row(Some(r#"{"id": 1, "s": "a b"}"#)), pos(), 0);
        assert_eq!(r.event.payload, r#"{"id":1,"s":"a b"}"#);
        // Not JSON: kept, as a string.
        let r = router.route(&debezium_row(Some("plain text")), pos(), 0);
        assert_eq!(r.event.payload, r#""plain text""#);
    }

    #[test]
    fn a_bytea_payload_is_forwarded_as_its_bytes() {
        let mut types = vec![2950, 1043, 1043, 1043, value::BYTEA_OID, 25, 1184];
        let spec = RouteSpec::debezium(false);
        let router = Router::bind_typed(&spec, &debezium_columns(), &types).unwrap();
        let r = router.route(&debezium_row(Some("\\x00ff5c22")), pos(), 0);
        assert_eq!(r.poison, None);
        assert_eq!(
            r.event.payload.as_ref(),
            [0x00, 0xff, 0x5c, 0x22],
            "raw, not a JSON string"
        );

        let r = router.route(&debezium_row(Some("\\x0")), pos(), 0);
        assert_eq!(r.poison.unwrap().kind, PoisonKind::InvalidPayload);

        // The same text in a text column is text.
        types[4] = 25;
        let router = Router::bind_typed(&RouteSpec::standard(), &columns(), &types).unwrap();
        let mut row = standard_row();
        row[4] = Some(Bytes::from_static(b"\\x00ff"));
        assert_eq!(router.route(&row, pos(), 0).event.payload, "\\x00ff");
    }

    #[test]
    fn a_null_payload_is_a_tombstone_only_when_asked() {
        let mut spec = RouteSpec::debezium(false);
        let router = Router::bind(&spec, &debezium_columns()).unwrap();
        let r = router.route(&debezium_row(None), pos(), 0);
        assert_eq!(r.poison.unwrap().kind, PoisonKind::NullField);

        spec.tombstone_on_null = true;
        let router = Router::bind(&spec, &debezium_columns()).unwrap();
        let r = router.route(&debezium_row(None), pos(), 0);
        assert_eq!(r.poison, None);
        assert!(r.event.tombstone);
        assert!(r.event.payload.is_empty());
        // An empty payload is not a tombstone.
        let r = router.route(&debezium_row(Some("")), pos(), 0);
        assert!(!r.event.tombstone);
    }

    #[test]
    fn route_headers_and_the_timestamp_come_from_columns() {
        let mut spec = RouteSpec::debezium(false);
        spec.attributes = vec![
            ("kind".into(), "{aggregatetype}/{type}".into()),
            ("note".into(), "{note}".into()),
            ("source".into(), "billing".into()),
        ];
        spec.timestamp = TimestampSource::Column("at".into());
        let router = Router::bind(&spec, &debezium_columns()).unwrap();
        let r = router.route(&debezium_row(Some("{}")), pos(), 0);
        assert_eq!(r.poison, None);
        assert_eq!(
            r.event.attributes,
            vec![
                ("kind".to_owned(), Bytes::from("order/OrderCreated")),
                ("source".to_owned(), Bytes::from("billing")),
            ],
            "a header over a NULL column is left out"
        );
        assert_eq!(r.event.time_millis, Some(1_556_890_294_484));
        assert_eq!(r.event.timestamp_millis(), 1_556_890_294_484);

        let mut row = debezium_row(Some("{}"));
        row[6] = Some(Bytes::from_static(b"infinity"));
        let poison = router.route(&row, pos(), 0).poison.unwrap();
        assert_eq!(poison.kind, PoisonKind::InvalidTimestamp);
        row[6] = None;
        let poison = router.route(&row, pos(), 0).poison.unwrap();
        assert_eq!(poison.kind, PoisonKind::NullField);
        assert!(poison.detail.contains("\"at\""), "{poison}");

        spec.timestamp = TimestampSource::Commit;
        let router = Router::bind(&spec, &debezium_columns()).unwrap();
        assert_eq!(
            router.route(&row, pos(), 5_000_999).event.time_millis,
            Some(5_000)
        );

        spec.attributes = vec![("x".into(), "{missing}".into())];
        let err = Router::bind(&spec, &debezium_columns()).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        spec.attributes = vec![("x".into(), "{open".into())];
        let err = Router::bind(&spec, &debezium_columns()).unwrap_err();
        assert!(err.to_string().starts_with("route.headers.x"), "{err}");
        spec.attributes = Vec::new();
        spec.timestamp = TimestampSource::Column("when".into());
        assert!(Router::bind(&spec, &debezium_columns()).is_err());
    }
}
