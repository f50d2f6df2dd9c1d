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
        }
    }
}

/// A template that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its `}`.
    #[error("unclosed '{{' at byte {at}")]
    Unclosed {
        /// Byte offset of the opening brace.
        at: usize,
    },
    /// A `}` that closes nothing (write `}}` for a literal brace).
    #[error("unmatched '}}' at byte {at} (write '}}}}' for a literal brace)")]
    Unmatched {
        /// Byte offset of the brace.
        at: usize,
    },
    /// `{}` names no column.
    #[error("empty placeholder '{{}}' at byte {at}")]
    EmptyPlaceholder {
        /// Byte offset of the opening brace.
        at: usize,
    },
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
    /// `topic` is empty.
    #[error("route.topic is empty: give a template such as \"outbox.{{aggregate_type}}\"")]
    NoTopic,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part<C> {
    Text(String),
    Column(C),
}

/// A parsed template; column references are by name until bound to a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part<String>>,
}

impl Template {
    /// Parses `{column}` placeholders and `{{`/`}}` escapes.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let rest = &text[at + 1..];
                    let end = rest.find('}').ok_or(TemplateError::Unclosed { at })?;
                    let name = &rest[..end];
                    if name.is_empty() {
                        return Err(TemplateError::EmptyPlaceholder { at });
                    }
                    if name.contains('{') {
                        return Err(TemplateError::Unclosed { at });
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Column(name.to_owned()));
                    // Skip the name and the closing brace.
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                }
                '}' => return Err(TemplateError::Unmatched { at }),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// The columns the template refers to, in order of appearance.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Text(_) => None,
        })
    }

    /// A Redis `SCAN MATCH` glob that matches every name the template can produce:
    /// placeholders become `*`, glob characters of the literal text are escaped.
    pub fn glob(&self) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Column(_) => "*".to_owned(),
                Part::Text(t) => glob_escape(t),
            })
            .collect()
    }

    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    fn bind(&self, field: &'static str, columns: &[String]) -> Result<BoundTemplate, RouteError> {
        let parts = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => Ok(Part::Text(t.clone())),
                Part::Column(name) => Ok(Part::Column(BoundColumn {
                    index: column_index(field, name, columns)?,
                    name: name.clone(),
                })),
            })
            .collect::<Result<_, _>>()?;
        Ok(BoundTemplate { field, parts })
    }
}

/// `text` as a Redis glob that matches only itself.
pub fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn column_index(field: &'static str, name: &str, columns: &[String]) -> Result<usize, RouteError> {
    columns
        .iter()
        .position(|c| c == name)
        .ok_or_else(|| RouteError::UnknownColumn {
            field,
            column: name.to_owned(),
            available: columns.join(", "),
        })
}

#[derive(Clone, Debug)]
struct BoundColumn {
    index: usize,
    name: String,
}

impl BoundColumn {
    fn bind(
        field: &'static str,
        name: &str,
        columns: &[String],
    ) -> Result<Option<BoundColumn>, RouteError> {
        if name.is_empty() {
            return Ok(None);
        }
        Ok(Some(BoundColumn {
            index: column_index(field, name, columns)?,
            name: name.to_owned(),
        }))
    }

    /// The column's value, or the poison reason when it is NULL.
    fn value(&self, field: &str, values: &[Option<Bytes>]) -> Result<Bytes, Poison> {
        values.get(self.index).cloned().flatten().ok_or_else(|| {
            Poison::new(
                PoisonKind::NullField,
                format!("{field} column {:?} is NULL", self.name),
            )
        })
    }
}

#[derive(Clone, Debug)]
struct BoundTemplate {
    field: &'static str,
    parts: Vec<Part<BoundColumn>>,
}

impl BoundTemplate {
    fn render(&self, values: &[Option<Bytes>]) -> Result<Bytes, Poison> {
        // The common template `{column}` is the column's value itself: no copy.
        if let [Part::Column(col)] = self.parts.as_slice() {
            return col.value(self.field, values);
        }
        let mut out = Vec::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Column(col) => out.extend_from_slice(&col.value(self.field, values)?),
            }
        }
        Ok(Bytes::from(out))
    }
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
}

impl Router {
    /// Checks `spec` against the table's `columns` (in table order) and binds it.
    pub fn bind(spec: &RouteSpec, columns: &[String]) -> Result<Router, RouteError> {
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
        Ok(Router {
            topic: topic.bind("topic", columns)?,
            key: if key.is_empty() {
                None
            } else {
                Some(key.bind("key", columns)?)
            },
            id: BoundColumn::bind("id_column", &spec.id_column, columns)?,
            event_type: BoundColumn::bind("type_column", &spec.type_column, columns)?,
            payload: BoundColumn::bind("payload_column", &spec.payload_column, columns)?
                .ok_or(RouteError::NoPayloadColumn)?,
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
        let payload = take(self.payload.value("payload", values));
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
            headers,
            position,
            commit_time_micros,
        };
        match poison {
            None => Record::publish(event),
            Some(p) => Record::dead_letter(event, p),
        }
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
}
