//! Configuration: one TOML file, then environment overrides.
//!
//! Every key can be overridden by `OUTBOXD_<SECTION>__<KEY>`, nested sections joined by `__`
//! (`OUTBOXD_POSTGRES__URL`, `OUTBOXD_SINK__REDIS__URL`). Unknown keys, in the file or in
//! the environment, are an error that names the key. The Postgres URL is wrapped so that
//! `Debug` cannot print its password.

use std::path::Path;

pub use outboxd_core::mask_url;
use outboxd_core::{RouteSpec, Secret, SecretFileError, read_secret_file};
use outboxd_sinks::cloudevents::Envelope;
use outboxd_sinks::{SinkConfigError, SinkSections};
use serde::{Deserialize, Serialize};

mod keys;
mod route;

use keys::{apply_env, check_keys, defaults_table, given_keys, one_line};
pub use route::{Preset, RouteConfig};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "OUTBOXD_";

/// Configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("configuration file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with the line.
        message: String,
    },
    /// A key that outboxd does not know.
    #[error("unknown configuration key `{key}` in {origin}{hint}")]
    UnknownKey {
        /// The dotted key.
        key: String,
        /// The file or the environment variable.
        origin: String,
        /// The known keys of that section.
        hint: String,
    },
    /// A value of the wrong type or out of range.
    #[error("invalid configuration value in {origin}: {message}")]
    Invalid {
        /// The file or the environment variable.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A secret file (`…_file`) cannot be read. Its content is never shown.
    #[error(transparent)]
    SecretFile(#[from] SecretFileError),
    /// A secret is set both directly and from a file.
    #[error("{key} and {file_key} are both set: keep one")]
    Both {
        /// The direct key.
        key: &'static str,
        /// Its `_file` twin.
        file_key: &'static str,
    },
    /// A required key is not set.
    #[error("{key} is not set: set it in the configuration file or with {env}")]
    Missing {
        /// The dotted key.
        key: &'static str,
        /// Its environment variable.
        env: &'static str,
    },
}

impl From<SinkConfigError> for ConfigError {
    fn from(e: SinkConfigError) -> Self {
        match e {
            SinkConfigError::Both { key, file_key } => ConfigError::Both { key, file_key },
            SinkConfigError::SecretFile(e) => ConfigError::SecretFile(e),
            e @ SinkConfigError::Invalid { .. } => ConfigError::Invalid {
                origin: "configuration".into(),
                message: e.to_string(),
            },
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[postgres]`: where the outbox lives.
    pub postgres: PostgresConfig,
    /// `[route]`: how rows become events.
    pub route: RouteConfig,
    /// `[sink]`: where events go.
    pub sink: SinkConfig,
    /// `[http]`: metrics and health.
    pub http: HttpConfig,
    /// `[backfill]`: how `setup --backfill-where` and `replay` read the table.
    pub backfill: BackfillConfig,
    /// `[otel]`: a span per event, exported over OTLP/HTTP.
    pub otel: OtelConfig,
}

/// `[otel]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// The OpenTelemetry collector's OTLP/HTTP base URL (`http://127.0.0.1:4318`); empty: no
    /// spans.
    pub endpoint: String,
    /// The `service.name` of the spans.
    pub service_name: String,
}

impl Default for OtelConfig {
    fn default() -> Self {
        OtelConfig {
            endpoint: String::new(),
            service_name: "outboxd".into(),
        }
    }
}

/// `[backfill]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillConfig {
    /// Columns the rows are published in order of, comma-separated; empty for
    /// `created_at, id` as far as the table has them.
    pub order_by: String,
    /// Rows emitted per round trip (the progress step).
    pub batch_rows: u32,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            order_by: String::new(),
            batch_rows: 1000,
        }
    }
}

/// `[postgres]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL (or `key=value` string); needs a role with REPLICATION.
    pub url: Secret,
    /// A file holding the connection URL (a Kubernetes or Docker secret), instead of `url`.
    pub url_file: String,
    /// The logical replication slot.
    pub slot: String,
    /// The publication of the outbox table.
    pub publication: String,
    /// The outbox table, optionally schema-qualified.
    pub table: String,
    /// Create the slot with `failover = true` (PostgreSQL 17+).
    pub failover_slot: bool,
    /// How often confirmed positions are reported to Postgres, in milliseconds.
    pub status_interval_ms: u64,
    /// Where events come from: `table` (inserts into `table`) or `messages` (table-less:
    /// `outbox_emit_message`, PostgreSQL 14+).
    pub source: SourceKind,
    /// While `run` streams, delete rows older than this (`7d`, `12h`, `30m`, `90s`) once the
    /// slot has confirmed them; empty: never.
    pub prune_after: String,
    /// How often pruning looks for rows to delete, in milliseconds.
    pub prune_interval_ms: u64,
    /// Rows per delete statement.
    pub prune_batch_rows: u32,
}

/// `postgres.source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Inserts into the outbox table.
    Table,
    /// Transactional logical decoding messages with prefix `outboxd`.
    Messages,
}

impl SourceKind {
    /// The stream's source.
    pub fn stream_source(self) -> outboxd_postgres::Source {
        match self {
            SourceKind::Table => outboxd_postgres::Source::Table,
            SourceKind::Messages => outboxd_postgres::Source::Messages,
        }
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: Secret::default(),
            url_file: String::new(),
            slot: "outboxd".into(),
            publication: "outboxd".into(),
            table: "public.outbox".into(),
            failover_slot: false,
            status_interval_ms: 1000,
            source: SourceKind::Table,
            prune_after: String::new(),
            prune_interval_ms: 60_000,
            prune_batch_rows: 1000,
        }
    }
}

/// Delivery guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// Every event at least once; duplicates only after a crash.
    AtLeastOnce,
    /// No duplicates where the broker allows it.
    EffectivelyOnce,
}

/// The longest `sink.linger_ms` accepted.
const MAX_LINGER_MS: u64 = 1_000;

/// `[sink]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SinkConfig {
    /// The sink: one of the names this build registers (`redis`, `kafka`, …).
    pub kind: String,
    /// Topic or stream for poison events.
    pub dead_letter: String,
    /// `at-least-once` or `effectively-once`.
    pub delivery: DeliveryMode,
    /// Most events sent to the broker in one batch.
    pub max_batch_events: usize,
    /// How long a short batch waits for more events before it is sent, in milliseconds.
    pub linger_ms: u64,
    /// Most events read from the WAL and not yet acknowledged.
    pub max_inflight_events: usize,
    /// Most bytes of events read from the WAL and not yet acknowledged.
    pub max_inflight_bytes: u64,
    /// How long a graceful stop waits for in-flight events, in milliseconds.
    pub drain_timeout_ms: u64,
    /// `plain`, `cloudevents` (binary content mode) or `cloudevents-structured`.
    pub envelope: Envelope,
    /// CloudEvents' `source` attribute.
    pub source: String,
    /// `[sink.<name>]`, one section per sink this build has (each defined in its folder).
    #[serde(flatten)]
    pub sections: SinkSections,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            kind: DEFAULT_SINK.into(),
            dead_letter: "outboxd.dlq".into(),
            delivery: DeliveryMode::AtLeastOnce,
            max_batch_events: 1000,
            linger_ms: 1,
            max_inflight_events: 10_000,
            max_inflight_bytes: 16 * 1024 * 1024,
            drain_timeout_ms: 30_000,
            envelope: Envelope::Plain,
            source: "outboxd".into(),
            sections: SinkSections::default(),
        }
    }
}

/// `[sink] kind` when none is given: the first sink this build has (Redis in the default
/// build).
const DEFAULT_SINK: &str = {
    let mut i = 0;
    while i < outboxd_sinks::SINKS.len() && !outboxd_sinks::SINKS[i].1 {
        i += 1;
    }
    outboxd_sinks::SINKS[i].0
};

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`; empty to serve none.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

impl Config {
    /// Loads `path` (if it exists, or if `required`), then applies `env` overrides, then
    /// checks the result.
    pub fn load(
        path: &Path,
        required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let mut table = match std::fs::read_to_string(path) {
            Ok(text) => text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: shown.clone(),
                    message: one_line(&e.to_string()),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => toml::Table::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: shown,
                    source,
                });
            }
        };
        let defaults = defaults_table();
        check_keys(&table, &defaults, "", &shown)?;
        apply_env(&mut table, &defaults, env)?;
        let given = given_keys(&table, "");
        let mut config: Config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Invalid {
                origin: shown.clone(),
                message: one_line(&e.to_string()),
            })?;
        let is_set = |key: &str| given.iter().any(|g| g == key);
        config.route.apply_preset(&is_set);
        config.read_secret_files(&is_set)?;
        config.validate()?;
        Ok(config)
    }

    /// The route for the core's router, with what the sink asks of it (tombstones).
    pub fn route_spec(&self) -> RouteSpec {
        let mut spec = self.route.spec();
        spec.tombstone_on_null = self.sink.sections.tombstone_on_null(&self.sink.kind);
        spec
    }

    /// Reads the `…_file` twins of secret keys into the keys. `is_set(dotted key)`: whether
    /// the key was given (keys with a default cannot tell by their value).
    fn read_secret_files(&mut self, is_set: &dyn Fn(&str) -> bool) -> Result<(), ConfigError> {
        let pg = &mut self.postgres;
        if !pg.url_file.is_empty() {
            if !pg.url.is_empty() {
                return Err(ConfigError::Both {
                    key: "postgres.url",
                    file_key: "postgres.url_file",
                });
            }
            pg.url = Secret::new(read_secret_file("postgres.url_file", &pg.url_file)?);
        }
        self.sink.sections.read_secret_files(is_set)?;
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.postgres.url.expose().is_empty() {
            return Err(ConfigError::Missing {
                key: "postgres.url",
                env: "OUTBOXD_POSTGRES__URL",
            });
        }
        let positive = [
            ("sink.max_batch_events", self.sink.max_batch_events as u64),
            (
                "sink.max_inflight_events",
                self.sink.max_inflight_events as u64,
            ),
            ("sink.max_inflight_bytes", self.sink.max_inflight_bytes),
            (
                "postgres.status_interval_ms",
                self.postgres.status_interval_ms,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    origin: "configuration".into(),
                    message: format!("{key} must be greater than 0"),
                });
            }
        }
        if !self.postgres.prune_after.trim().is_empty() {
            if let Err(message) = parse_duration(&self.postgres.prune_after) {
                return Err(ConfigError::Invalid {
                    origin: "configuration".into(),
                    message: format!("postgres.prune_after: {message}"),
                });
            }
            if self.postgres.source == SourceKind::Messages {
                return Err(ConfigError::Invalid {
                    origin: "configuration".into(),
                    message: "postgres.prune_after prunes the outbox table, and postgres.source = \"messages\" writes no rows: leave it empty".into(),
                });
            }
        }
        if self.postgres.prune_interval_ms == 0 || self.postgres.prune_batch_rows == 0 {
            return Err(ConfigError::Invalid {
                origin: "configuration".into(),
                message: "postgres.prune_interval_ms and postgres.prune_batch_rows must be greater than 0".into(),
            });
        }
        let endpoint = self.otel.endpoint.trim();
        if !endpoint.is_empty() && !endpoint.starts_with("http://") {
            return Err(ConfigError::Invalid {
                origin: "configuration".into(),
                message: format!(
                    "otel.endpoint = {endpoint:?}: outboxd exports spans over plain http:// only; \
                     send them to a collector beside it (http://127.0.0.1:4318) and let that \
                     one forward over TLS"
                ),
            });
        }
        if let Some(message) = self.route.problems() {
            return Err(ConfigError::Invalid {
                origin: "configuration".into(),
                message,
            });
        }
        if self.sink.linger_ms > MAX_LINGER_MS {
            return Err(ConfigError::Invalid {
                origin: "configuration".into(),
                message: format!(
                    "sink.linger_ms must be at most {MAX_LINGER_MS} (it is added to every \
                     event's latency when events trickle in); it is {}",
                    self.sink.linger_ms
                ),
            });
        }
        self.validate_sink()
    }

    /// `[sink] kind` names a sink of this build that supports the delivery mode, and its
    /// sections are usable.
    fn validate_sink(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: "configuration".into(),
            message,
        };
        match SinkSections::effectively_once(&self.sink.kind) {
            None => {
                return Err(invalid(outboxd_sinks::registry::unknown_kind(
                    &self.sink.kind,
                )));
            }
            Some(false) if self.sink.delivery == DeliveryMode::EffectivelyOnce => {
                return Err(invalid(format!(
                    "sink.delivery = \"effectively-once\" is not supported by sink.kind = {:?}: \
                     use \"at-least-once\"",
                    self.sink.kind
                )));
            }
            Some(_) => {}
        }
        if let Some(message) = self.envelope_problem() {
            return Err(invalid(message));
        }
        Ok(self.sink.sections.validate()?)
    }

    /// Why `[sink] envelope` cannot work with the rest, if it cannot.
    fn envelope_problem(&self) -> Option<String> {
        if self.sink.envelope == Envelope::Plain {
            return None;
        }
        let envelope = if self.sink.envelope == Envelope::CloudEvents {
            "cloudevents"
        } else {
            "cloudevents-structured"
        };
        if SinkSections::cloudevents(&self.sink.kind) != Some(true) {
            return Some(format!(
                "sink.envelope = {envelope:?} is not supported by sink.kind = {:?} (kafka and \
                 redis support it): use \"plain\"",
                self.sink.kind
            ));
        }
        if self.route.type_column.is_empty() {
            return Some(format!(
                "sink.envelope = {envelope:?} needs route.type_column: CloudEvents requires a \
                 type for every event"
            ));
        }
        if self.sink.source.trim().is_empty() {
            return Some(format!(
                "sink.envelope = {envelope:?} needs sink.source (CloudEvents' source, e.g. \
                 \"/billing\")"
            ));
        }
        None
    }

    /// What `setup`, `check` and `run` set up or check in Postgres.
    pub fn slot_spec(&self) -> outboxd_postgres::slot::SlotSpec<'_> {
        outboxd_postgres::slot::SlotSpec {
            slot: &self.postgres.slot,
            publication: &self.postgres.publication,
            table: &self.postgres.table,
            failover: self.postgres.failover_slot,
            source: self.postgres.source.stream_source(),
        }
    }

    /// The configuration as TOML, with secrets masked (for `outboxd check` and logs).
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        c.postgres.url = Secret::new(mask_url(c.postgres.url.expose()));
        c.sink.sections = c.sink.sections.redacted();
        toml::to_string(&c).unwrap_or_default()
    }
}

/// Parses a duration: a number and a unit (`ms`, `s`, `m`, `h`, `d`), or a number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 7d, 12h, 30m, 90s or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use ms, s, m, h or d"
            ));
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A configuration file in the temporary directory, removed on drop.
    struct TempConfig(std::path::PathBuf);

    impl TempConfig {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn write(text: &str) -> TempConfig {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "outboxd-config-test-{}-{n}.toml",
            std::process::id()
        ));
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(text.as_bytes()).expect("write");
        TempConfig(path)
    }

    #[cfg(all(feature = "redis", feature = "kafka"))]
    const DOCUMENTED_EXAMPLE: &str = r#"
[postgres]
url = "postgres://outboxd:secret@127.0.0.1:5432/app"
slot = "outboxd"
publication = "outboxd"
table = "public.outbox"

[route]
topic = "outbox.{aggregate_type}"
key = "{aggregate_id}"
id_column = "id"
type_column = "event_type"
payload_column = "payload"
headers_column = "headers"

[sink]
kind = "redis"
dead_letter = "outboxd.dlq"
delivery = "at-least-once"

[sink.redis]
url = "redis://127.0.0.1:6379"
stream_prefix = ""
maxlen = 0

[sink.kafka]
brokers = "127.0.0.1:9092"
offsets_topic = "outboxd.offsets"
[sink.kafka.options]
"compression.type" = "lz4"

[http]
listen = "127.0.0.1:9187"
"#;

    #[test]
    #[cfg(all(feature = "redis", feature = "kafka"))]
    fn loads_the_documented_example() {
        let f = write(DOCUMENTED_EXAMPLE);
        let c = Config::load(f.path(), true, []).expect("loads");
        assert_eq!(
            c.postgres.url.expose(),
            "postgres://outboxd:secret@127.0.0.1:5432/app"
        );
        assert_eq!(c.sink.kind, "redis");
        assert_eq!(c.sink.sections.kafka.options["compression.type"], "lz4");
        assert!(!format!("{c:?}").contains("secret"));
        assert!(!c.redacted_toml().contains("secret"));
    }

    #[test]
    #[cfg(all(feature = "redis", feature = "kafka"))]
    fn environment_overrides_every_kind_of_key() {
        let f = write(DOCUMENTED_EXAMPLE);
        let env = [
            ("OUTBOXD_POSTGRES__URL", "postgres://u:pw2@db/app"),
            ("OUTBOXD_SINK__KIND", "kafka"),
            ("OUTBOXD_SINK__REDIS__MAXLEN", "5000"),
            ("OUTBOXD_POSTGRES__FAILOVER_SLOT", "true"),
            ("OUTBOXD_SINK__KAFKA__OPTIONS__LINGER.MS", "7"),
            ("OUTBOXD_CONFIG", "ignored: not a key override"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let c = Config::load(f.path(), true, env).expect("loads");
        assert_eq!(c.postgres.url.expose(), "postgres://u:pw2@db/app");
        assert_eq!(c.sink.kind, "kafka");
        assert_eq!(c.sink.sections.redis.maxlen, 5000);
        assert!(c.postgres.failover_slot);
        assert_eq!(c.sink.sections.kafka.options["linger.ms"], "7");
    }

    #[test]
    #[cfg(all(feature = "redis", feature = "kafka"))]
    fn the_debezium_preset_changes_defaults_and_keys_set_still_win() {
        let f = write(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[route]\npreset = \"debezium\"\nkey = \"{id}\"\n",
        );
        let c = Config::load(f.path(), true, []).expect("loads");
        let spec = c.route_spec();
        assert_eq!(spec.topic, "outbox.event.{aggregatetype}");
        assert_eq!(spec.key, "{id}", "set in the file");
        assert_eq!(spec.type_column, "type");
        assert_eq!(spec.headers_column, "");
        assert_eq!(
            spec.payload_encoding,
            outboxd_core::PayloadEncoding::JsonString
        );
        assert!(!c.route.type_header());
        let env = [
            ("OUTBOXD_ROUTE__TOPIC", "events"),
            ("OUTBOXD_ROUTE__EXPAND_JSON_PAYLOAD", "true"),
            ("OUTBOXD_ROUTE__HEADERS__TENANT", "{tenant}"),
            ("OUTBOXD_ROUTE__TIMESTAMP", "created"),
            ("OUTBOXD_SINK__KIND", "kafka"),
            ("OUTBOXD_SINK__KAFKA__TOMBSTONE_ON_NULL", "true"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let c = Config::load(f.path(), true, env).expect("loads");
        let spec = c.route_spec();
        assert_eq!(spec.topic, "events", "set in the environment");
        assert_eq!(
            spec.payload_encoding,
            outboxd_core::PayloadEncoding::JsonDocument
        );
        assert_eq!(
            spec.attributes,
            [("tenant".to_owned(), "{tenant}".to_owned())]
        );
        assert_eq!(
            spec.timestamp,
            outboxd_core::TimestampSource::Column("created".into())
        );
        assert!(spec.tombstone_on_null);

        // Without the preset: outboxd's defaults, the type header, no tombstones on Redis.
        let f = write(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[sink.kafka]\ntombstone_on_null = true\n",
        );
        let c = Config::load(f.path(), true, []).expect("loads");
        assert_eq!(c.route_spec().topic, "outbox.{aggregate_type}");
        assert!(c.route.type_header());
        assert!(
            !c.route_spec().tombstone_on_null,
            "the redis sink has no tombstones"
        );
    }

    #[test]
    #[cfg(feature = "redis")]
    fn format_settings_that_cannot_work_are_refused() {
        let cases = [
            (
                "[route]\nexpand_json_payload = true",
                "preset = \"debezium\"",
            ),
            ("[route]\npreset = \"avro\"", "preset"),
            ("[route.headers]\n\"\" = \"x\"", "route.headers"),
            (
                "[sink.redis.fields]\npayload = \"id\"",
                "sink.redis.fields.payload",
            ),
            (
                "[sink.redis.fields]\nid = \"\"\ntype = \"\"\nkey = \"\"\npayload = \"\"\nheaders = \"\"",
                "at least one",
            ),
            ("[sink.redis.fields]\nbody = \"data\"", "body"),
            (
                "[sink]\nenvelope = \"cloudevents\"\n[route]\ntype_column = \"\"",
                "needs route.type_column",
            ),
            (
                "[sink]\nenvelope = \"cloudevents-structured\"\nsource = \" \"",
                "needs sink.source",
            ),
            ("[sink]\nenvelope = \"xml\"", "envelope"),
            (
                "[otel]\nendpoint = \"https://otel.example.com\"",
                "plain http://",
            ),
            #[cfg(feature = "nats")]
            (
                "[sink]\nkind = \"nats\"\nenvelope = \"cloudevents\"",
                "not supported by sink.kind = \"nats\"",
            ),
        ];
        for (text, expected) in cases {
            let f = write(&format!(
                "[postgres]\nurl = \"postgres://u@h/db\"\n{text}\n"
            ));
            let err = Config::load(f.path(), true, []).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    #[cfg(all(feature = "redis", feature = "kafka"))]
    fn linger_defaults_to_one_millisecond_and_is_bounded() {
        let f = write(DOCUMENTED_EXAMPLE);
        let c = Config::load(f.path(), true, []).expect("loads");
        assert_eq!(c.sink.linger_ms, 1);
        let env = |v: &str| [("OUTBOXD_SINK__LINGER_MS".to_owned(), v.to_owned())];
        let c = Config::load(f.path(), true, env("0")).expect("0 turns it off");
        assert_eq!(c.sink.linger_ms, 0);
        let err = Config::load(f.path(), true, env("5000"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sink.linger_ms must be at most 1000"), "{err}");
    }

    #[test]
    #[cfg(all(feature = "redis", feature = "kafka"))]
    fn unknown_keys_are_named() {
        let f = write("[postgres]\nurl = \"postgres://u@h/d\"\nslott = \"x\"\n");
        let err = Config::load(f.path(), true, []).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`postgres.slott`"), "{text}");
        assert!(text.contains("slot"), "{text}");

        let f = write("[sinks]\nkind = \"redis\"\n");
        assert!(
            Config::load(f.path(), true, [])
                .unwrap_err()
                .to_string()
                .contains("`sinks`")
        );

        let f = write("[postgres]\nurl = \"postgres://u@h/d\"\n");
        let env = [("OUTBOXD_SINK__REDIS__URLL".to_owned(), "x".to_owned())];
        let text = Config::load(f.path(), true, env).unwrap_err().to_string();
        assert!(
            text.contains("sink.redis.urll") && text.contains("OUTBOXD_SINK__REDIS__URLL"),
            "{text}"
        );
    }

    #[test]
    #[cfg(all(feature = "redis", feature = "kafka"))]
    fn bad_values_and_missing_url_are_clear() {
        let f = write("[postgres]\nurl = \"postgres://u@h/d\"\n[sink]\nkind = \"rabbitmq\"\n");
        let text = Config::load(f.path(), true, []).unwrap_err().to_string();
        assert!(text.contains("rabbitmq"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");

        let f = write("[postgres]\nurl = \"postgres://u@h/d\"\n");
        let env = [("OUTBOXD_SINK__REDIS__MAXLEN".to_owned(), "lots".to_owned())];
        let text = Config::load(f.path(), true, env).unwrap_err().to_string();
        assert!(text.contains("must be an integer"), "{text}");

        let f = write("");
        let text = Config::load(f.path(), true, []).unwrap_err().to_string();
        assert!(text.contains("OUTBOXD_POSTGRES__URL"), "{text}");

        let f = write("[postgres\n");
        let text = Config::load(f.path(), true, []).unwrap_err().to_string();
        assert!(
            text.contains("not valid TOML") && !text.contains('\n'),
            "{text}"
        );
    }

    #[test]
    #[cfg(all(feature = "redis", feature = "kafka"))]
    fn kafka_keys_load_and_options_that_weaken_the_producer_are_refused() {
        let f = write(
            "[postgres]\nurl = \"postgres://u@h/d\"\n[sink]\nkind = \"kafka\"\n\
             [sink.kafka]\nbrokers = \"k1:9092,k2:9092\"\ncreate_topics = true\n\
             topic_partitions = 6\ntopic_replication_factor = 3\n\
             [sink.kafka.options]\n\"security.protocol\" = \"sasl_ssl\"\n\
             \"sasl.password\" = \"kafka-Secr3t\"\n",
        );
        let env = [(
            "OUTBOXD_SINK__KAFKA__DELIVERY_TIMEOUT_MS".to_owned(),
            "5000".to_owned(),
        )];
        let c = Config::load(f.path(), true, env).expect("loads");
        let k = &c.sink.sections.kafka;
        assert_eq!(k.brokers, "k1:9092,k2:9092");
        assert!(k.create_topics);
        assert_eq!((k.topic_partitions, k.topic_replication_factor), (6, 3));
        assert_eq!(k.delivery_timeout_ms, 5000);
        assert_eq!(k.timeout_ms, 10_000);
        assert!(!format!("{c:?}").contains("kafka-Secr3t"));
        assert!(!c.redacted_toml().contains("kafka-Secr3t"));
        assert!(c.redacted_toml().contains("sasl_ssl"));

        for (name, value) in [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("message.timeout.ms", "1000"),
        ] {
            let f = write(&format!(
                "[postgres]\nurl = \"postgres://u@h/d\"\n[sink.kafka.options]\n\"{name}\" = \"{value}\"\n"
            ));
            let text = Config::load(f.path(), true, []).unwrap_err().to_string();
            assert!(
                text.contains(name) && text.contains("may not be set"),
                "{text}"
            );
        }
        let f =
            write("[postgres]\nurl = \"postgres://u@h/d\"\n[sink.kafka]\ntopic_partitions = 0\n");
        let text = Config::load(f.path(), true, []).unwrap_err().to_string();
        assert!(text.contains("sink.kafka.topic_partitions"), "{text}");
    }

    #[test]
    fn a_missing_file_is_an_error_only_when_named() {
        let missing = Path::new("/nonexistent/outboxd.toml");
        assert!(matches!(
            Config::load(missing, true, []),
            Err(ConfigError::Read { .. })
        ));
        let env = [(
            "OUTBOXD_POSTGRES__URL".to_owned(),
            "postgres://u@h/d".to_owned(),
        )];
        assert!(Config::load(missing, false, env).is_ok());
    }

    #[test]
    fn durations_take_a_unit() {
        use std::time::Duration;
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration(" 30m "), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("7 weeks").is_err());
        assert!(parse_duration("d").is_err());
        let f = write("[postgres]\nurl = \"postgres://u@h/d\"\nprune_after = \"1y\"\n");
        let text = Config::load(f.path(), true, []).unwrap_err().to_string();
        assert!(
            text.contains("postgres.prune_after") && text.contains("\"y\""),
            "{text}"
        );
    }

    /// docs/configuration.md documents every key with its default and its environment
    /// variable, and nothing else.
    #[test]
    fn the_configuration_reference_matches_the_keys() {
        let doc = include_str!("../../../../docs/configuration.md");
        let documented = documented_keys(doc);
        let mut keys = Vec::new();
        leaf_keys(&defaults_table(), "", &mut keys);
        for (key, default) in &keys {
            let Some((doc_default, env)) = documented.get(key) else {
                panic!("docs/configuration.md does not document `{key}`");
            };
            let want_env = format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase());
            assert!(
                env.starts_with(&format!("`{want_env}")),
                "`{key}`: documented environment {env}, expected {want_env}"
            );
            // `[sink] kind` defaults to the first sink of the build: the documented one,
            // redis, in the default build.
            let build_dependent = key == "sink.kind" && !cfg!(feature = "redis");
            if let Some(shown) = doc_default
                .strip_prefix('`')
                .and_then(|d| d.strip_suffix('`'))
                && !build_dependent
            {
                assert_eq!(
                    &shown_default(default),
                    shown,
                    "the documented default of `{key}`"
                );
            }
        }
        // A sink this build was made without is documented too.
        let not_built = |key: &str| {
            outboxd_sinks::SINKS
                .iter()
                .any(|(name, built)| !built && key.starts_with(&format!("sink.{name}.")))
        };
        for key in documented.keys().filter(|k| !not_built(k)) {
            assert!(
                keys.iter().any(|(k, _)| k == key),
                "docs/configuration.md documents `{key}`, which is not a configuration key"
            );
        }
    }

    /// `section.key` → (default cell, environment cell) of the reference's tables.
    fn documented_keys(doc: &str) -> std::collections::BTreeMap<String, (String, String)> {
        let mut keys = std::collections::BTreeMap::new();
        let mut section = String::new();
        for line in doc.lines() {
            if let Some(rest) = line.strip_prefix("## `[") {
                section = rest.trim_end_matches("]`").to_owned();
                continue;
            }
            let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
            let Some(key) = cells.first().and_then(|c| c.strip_prefix("| `")) else {
                continue;
            };
            let Some(key) = key.strip_suffix('`') else {
                continue;
            };
            if cells.len() >= 4 && cells[2].starts_with("`OUTBOXD_") && !section.is_empty() {
                keys.insert(
                    format!("{section}.{key}"),
                    (cells[1].to_owned(), cells[2].to_owned()),
                );
            }
        }
        keys
    }

    /// The keys of the defaults that take a value (free-form tables count as one key).
    fn leaf_keys(table: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
        let open = keys::open_tables();
        for (key, value) in table {
            let dotted = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(t) if !open.contains(&dotted) => leaf_keys(t, &dotted, out),
                v => out.push((dotted, v.clone())),
            }
        }
    }

    /// A default as the reference shows it: text as is (`""` when empty), the rest as TOML.
    fn shown_default(value: &toml::Value) -> String {
        match value {
            toml::Value::String(s) if s.is_empty() => "\"\"".into(),
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    #[test]
    #[cfg(feature = "nats")]
    fn a_list_from_the_environment_is_comma_separated() {
        let env = [
            ("OUTBOXD_POSTGRES__URL", "postgres://u@h/d"),
            ("OUTBOXD_SINK__KIND", "nats"),
            ("OUTBOXD_SINK__NATS__SUBJECTS", "orders.>, outboxd.dlq ,"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let c = Config::load(Path::new("/nonexistent/outboxd.toml"), false, env).expect("loads");
        assert_eq!(c.sink.kind, "nats");
        assert_eq!(c.sink.sections.nats.subjects, ["orders.>", "outboxd.dlq"]);
    }
}
