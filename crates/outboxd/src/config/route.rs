//! `[route]`: how a row becomes an event, and the formats consumers already read.
//!
//! The keys name templates and columns ([`RouteSpec`]). `preset = "debezium"` changes the
//! defaults of those keys to the Debezium Outbox Event Router's; a key set explicitly still
//! wins. `[route.headers]` is a table of free names, each a template.

use std::collections::BTreeMap;

use outboxd_core::{PayloadEncoding, RouteSpec, TimestampSource};
use serde::{Deserialize, Serialize};

/// `[route] preset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// outboxd's own table and wire format.
    #[default]
    None,
    /// Debezium's outbox table, forwarded as its Outbox Event Router does by default.
    Debezium,
}

/// `[route]`: templates over the row's columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// `none`, or `debezium` for the Event Router's table, topic, key and value.
    pub preset: Preset,
    /// Topic (Kafka) or stream (Redis) template.
    pub topic: String,
    /// Key template; empty for no key.
    pub key: String,
    /// Column with the event id; empty to use the WAL position.
    pub id_column: String,
    /// Column with the event type; empty for none.
    pub type_column: String,
    /// Column with the payload.
    pub payload_column: String,
    /// Column with the headers object; empty for none.
    pub headers_column: String,
    /// With `preset = "debezium"`: the payload's JSON document as the value, as the Event
    /// Router's `table.expand.json.payload = true` (default: a JSON string, as its default).
    pub expand_json_payload: bool,
    /// `""` (the commit time, no Redis field), `commit`, or a column: the Kafka message
    /// timestamp and a Redis field `time`.
    pub timestamp: String,
    /// `[route.headers]`: header (Kafka, NATS) or field (Redis) name → template.
    pub headers: BTreeMap<String, String>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        let s = RouteSpec::standard();
        RouteConfig {
            preset: Preset::None,
            topic: s.topic,
            key: s.key,
            id_column: s.id_column,
            type_column: s.type_column,
            payload_column: s.payload_column,
            headers_column: s.headers_column,
            expand_json_payload: false,
            timestamp: String::new(),
            headers: BTreeMap::new(),
        }
    }
}

/// The keys of `[route]` a preset gives other defaults.
const PRESET_KEYS: [&str; 6] = [
    "topic",
    "key",
    "id_column",
    "type_column",
    "payload_column",
    "headers_column",
];

impl RouteConfig {
    /// Gives the keys the preset covers its defaults, where `is_set("route.<key>")` says the
    /// key was not given.
    pub(super) fn apply_preset(&mut self, is_set: &dyn Fn(&str) -> bool) {
        let preset = match self.preset {
            Preset::None => return,
            Preset::Debezium => RouteSpec::debezium(self.expand_json_payload),
        };
        for key in PRESET_KEYS
            .into_iter()
            .filter(|k| !is_set(&format!("route.{k}")))
        {
            let (field, value) = match key {
                "topic" => (&mut self.topic, &preset.topic),
                "key" => (&mut self.key, &preset.key),
                "id_column" => (&mut self.id_column, &preset.id_column),
                "type_column" => (&mut self.type_column, &preset.type_column),
                "payload_column" => (&mut self.payload_column, &preset.payload_column),
                _ => (&mut self.headers_column, &preset.headers_column),
            };
            field.clone_from(value);
        }
    }

    /// Whether the `type` header (Kafka, NATS) is sent: not under the Debezium preset, whose
    /// consumers get the id header only.
    pub fn type_header(&self) -> bool {
        self.preset == Preset::None
    }

    /// Problems that need no table to find.
    pub(super) fn problems(&self) -> Option<String> {
        if self.expand_json_payload && self.preset != Preset::Debezium {
            return Some(
                "route.expand_json_payload applies to preset = \"debezium\" only (outboxd's own \
                 format forwards the payload as it is)"
                    .into(),
            );
        }
        self.headers
            .keys()
            .find(|name| name.is_empty() || name.bytes().any(|b| b.is_ascii_control()))
            .map(|name| format!("route.headers: {name:?} is not a usable header name"))
    }

    /// The route for the core's router. `tombstone_on_null`: the sink makes a NULL payload a
    /// tombstone.
    pub fn spec(&self) -> RouteSpec {
        RouteSpec {
            topic: self.topic.clone(),
            key: self.key.clone(),
            id_column: self.id_column.clone(),
            type_column: self.type_column.clone(),
            payload_column: self.payload_column.clone(),
            headers_column: self.headers_column.clone(),
            attributes: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timestamp: match self.timestamp.trim() {
                "" => TimestampSource::CommitQuiet,
                "commit" => TimestampSource::Commit,
                column => TimestampSource::Column(column.to_owned()),
            },
            payload_encoding: match self.preset {
                Preset::None => PayloadEncoding::AsIs,
                Preset::Debezium if self.expand_json_payload => PayloadEncoding::JsonDocument,
                Preset::Debezium => PayloadEncoding::JsonString,
            },
            tombstone_on_null: false,
        }
    }
}
