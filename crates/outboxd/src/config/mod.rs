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
    /// `wal_sender_timeout` of outboxd's replication sessions, in milliseconds: how soon
    /// Postgres ends the session of an outboxd that stopped answering (frozen, its host cut
    /// off), so that a standing-by instance takes the slot over; 0: the server's setting.
    pub wal_sender_timeout_ms: u64,
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
            wal_sender_timeout_ms: 10_000,
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
/// The most events of one batch (`sink.max_batch_events`).
const MAX_BATCH_EVENTS: u64 = 100_000;
/// The most events in flight (`sink.max_inflight_events`).
const MAX_INFLIGHT_EVENTS: u64 = 10_000_000;
/// The smallest and largest in-flight budget in bytes (`sink.max_inflight_bytes`; the budget
/// is a semaphore of 32-bit permits).
const MIN_INFLIGHT_BYTES: u64 = 64 * 1024;
const MAX_INFLIGHT_BYTES: u64 = u32::MAX as u64;
/// The most rows of one statement (`prune_batch_rows`, `backfill.batch_rows`).
const MAX_ROWS_PER_STATEMENT: u64 = 1_000_000;
/// An hour and a day, in milliseconds.
const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 86_400_000;
/// The longest duration [`parse_duration`] accepts: 100 years.
const MAX_DURATION_SECS: f64 = 100.0 * 365.0 * 86_400.0;

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
            drain_timeout_ms: 20_000,
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
                    message: syntax_message(&text, &e),
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
        for (key, value, range) in self.numeric_keys() {
            if !range.contains(&value) {
                return Err(ConfigError::Invalid {
                    origin: "configuration".into(),
                    message: format!(
                        "{key} must be between {} and {}, got {value}",
                        range.start(),
                        range.end()
                    ),
                });
            }
        }
        let (timeout, interval) = (
            self.postgres.wal_sender_timeout_ms,
            self.postgres.status_interval_ms,
        );
        if timeout != 0 && timeout < 3 * interval {
            return Err(ConfigError::Invalid {
                origin: "configuration".into(),
                message: format!(
                    "postgres.wal_sender_timeout_ms = {timeout} must be at least three times \
                     postgres.status_interval_ms ({interval}), or 0 for the server's setting: \
                     Postgres would end sessions between two status updates"
                ),
            });
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
        self.validate_sink()
    }

    /// The numeric keys of the shared sections, with the values each accepts: beyond them a
    /// budget, a batch or a timer would exhaust memory or overflow a clock.
    fn numeric_keys(&self) -> [(&'static str, u64, std::ops::RangeInclusive<u64>); 10] {
        let (pg, sink) = (&self.postgres, &self.sink);
        [
            (
                "sink.max_batch_events",
                sink.max_batch_events as u64,
                1..=MAX_BATCH_EVENTS,
            ),
            (
                "sink.max_inflight_events",
                sink.max_inflight_events as u64,
                1..=MAX_INFLIGHT_EVENTS,
            ),
            (
                "sink.max_inflight_bytes",
                sink.max_inflight_bytes,
                MIN_INFLIGHT_BYTES..=MAX_INFLIGHT_BYTES,
            ),
            ("sink.linger_ms", sink.linger_ms, 0..=MAX_LINGER_MS),
            ("sink.drain_timeout_ms", sink.drain_timeout_ms, 0..=HOUR_MS),
            (
                "postgres.status_interval_ms",
                pg.status_interval_ms,
                1..=600_000,
            ),
            (
                "postgres.wal_sender_timeout_ms",
                pg.wal_sender_timeout_ms,
                0..=HOUR_MS,
            ),
            (
                "postgres.prune_interval_ms",
                pg.prune_interval_ms,
                1..=DAY_MS,
            ),
            (
                "postgres.prune_batch_rows",
                u64::from(pg.prune_batch_rows),
                1..=MAX_ROWS_PER_STATEMENT,
            ),
            (
                "backfill.batch_rows",
                u64::from(self.backfill.batch_rows),
                1..=MAX_ROWS_PER_STATEMENT,
            ),
        ]
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
    if seconds > MAX_DURATION_SECS {
        return Err(format!(
            "{text:?} is longer than the longest duration accepted, 36500d (100 years)"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// A TOML syntax error as one line: where, and what the parser expected, without the
/// offending line itself (it may hold a password).
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let place = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    format!("{}{}", place.unwrap_or_default(), one_line(e.message()))
}

#[cfg(test)]
mod tests;
