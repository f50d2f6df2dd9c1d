//! Configuration: one TOML file, then environment overrides.
//!
//! Every key can be overridden by `OUTBOXD_<SECTION>__<KEY>`, nested sections joined by `__`
//! (`OUTBOXD_POSTGRES__URL`, `OUTBOXD_SINK__REDIS__URL`). Unknown keys, in the file or in
//! the environment, are an error that names the key. The Postgres URL is wrapped so that
//! `Debug` cannot print its password.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use outboxd_core::RouteSpec;
use serde::{Deserialize, Serialize};

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
    #[error("cannot read {key} {path:?}: {source}")]
    SecretFile {
        /// The dotted key.
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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

/// A secret string: its `Debug` and `Display` never show it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
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

/// `[route]`: templates over the row's columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
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
}

impl Default for RouteConfig {
    fn default() -> Self {
        let s = RouteSpec::standard();
        RouteConfig {
            topic: s.topic,
            key: s.key,
            id_column: s.id_column,
            type_column: s.type_column,
            payload_column: s.payload_column,
            headers_column: s.headers_column,
        }
    }
}

impl RouteConfig {
    /// The route for the core's router.
    pub fn spec(&self) -> RouteSpec {
        RouteSpec {
            topic: self.topic.clone(),
            key: self.key.clone(),
            id_column: self.id_column.clone(),
            type_column: self.type_column.clone(),
            payload_column: self.payload_column.clone(),
            headers_column: self.headers_column.clone(),
        }
    }
}

/// Which broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkKind {
    /// Redis Streams.
    Redis,
    /// Kafka.
    Kafka,
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
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// `redis` or `kafka`.
    pub kind: SinkKind,
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
    /// `[sink.redis]`.
    pub redis: RedisSinkConfig,
    /// `[sink.kafka]`.
    pub kafka: KafkaSinkConfig,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            kind: SinkKind::Redis,
            dead_letter: "outboxd.dlq".into(),
            delivery: DeliveryMode::AtLeastOnce,
            max_batch_events: 1000,
            linger_ms: 1,
            max_inflight_events: 10_000,
            max_inflight_bytes: 16 * 1024 * 1024,
            drain_timeout_ms: 30_000,
            redis: RedisSinkConfig::default(),
            kafka: KafkaSinkConfig::default(),
        }
    }
}

/// `[sink.redis]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSinkConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: Secret,
    /// A file holding the URL (a Kubernetes or Docker secret), instead of `url`.
    pub url_file: String,
    /// TLS: the CA certificate (PEM) that signed the server's; empty for the system's roots.
    pub ca_file: String,
    /// TLS: a client certificate (PEM), for servers with `tls-auth-clients yes`.
    pub cert_file: String,
    /// TLS: the client certificate's private key (PEM).
    pub key_file: String,
    /// Prepended to each routed topic to name its stream.
    pub stream_prefix: String,
    /// `XADD MAXLEN ~ N` when non-zero.
    pub maxlen: u64,
    /// Replicas that must acknowledge each batch (`WAIT`); 0 for none.
    pub wait_replicas: u32,
    /// How long `WAIT` may take, in milliseconds.
    pub wait_timeout_ms: u64,
    /// Connection and reply timeout, in milliseconds.
    pub timeout_ms: u64,
    /// Largest event published; a larger one is dead-lettered as `too_large`.
    pub max_event_bytes: u64,
}

impl Default for RedisSinkConfig {
    fn default() -> Self {
        RedisSinkConfig {
            url: Secret("redis://127.0.0.1:6379".into()),
            url_file: String::new(),
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            stream_prefix: String::new(),
            maxlen: 0,
            wait_replicas: 0,
            wait_timeout_ms: 1000,
            timeout_ms: 10_000,
            max_event_bytes: 16 * 1024 * 1024,
        }
    }
}

/// `[sink.kafka]`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Effectively-once: the compacted topic holding the committed position per slot.
    pub offsets_topic: String,
    /// Effectively-once: the producer's `transactional.id`; empty for `outboxd-<slot>`.
    pub transactional_id: String,
    /// Create missing topics (the routed ones and the dead-letter topic) through the Admin
    /// API, for clusters that do not create topics on first use.
    pub create_topics: bool,
    /// Partitions of the topics outboxd creates.
    pub topic_partitions: u32,
    /// Replication factor of the topics outboxd creates; -1 for the broker's default.
    pub topic_replication_factor: i32,
    /// How long a batch may wait for its delivery reports before it is sent again, in
    /// milliseconds.
    pub delivery_timeout_ms: u64,
    /// Timeout of metadata and Admin requests, in milliseconds.
    pub timeout_ms: u64,
    /// A file holding the SASL password (`sasl.password`), for Kubernetes and Docker secrets.
    pub sasl_password_file: String,
    /// Passed to librdkafka as is.
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        KafkaSinkConfig {
            brokers: "127.0.0.1:9092".into(),
            offsets_topic: "outboxd.offsets".into(),
            transactional_id: String::new(),
            create_topics: false,
            topic_partitions: 1,
            topic_replication_factor: -1,
            delivery_timeout_ms: 60_000,
            timeout_ms: 10_000,
            sasl_password_file: String::new(),
            options: BTreeMap::new(),
        }
    }
}

impl KafkaSinkConfig {
    /// The options with the values of secret ones (passwords, keys) replaced by `***`.
    pub fn redacted_options(&self) -> BTreeMap<String, String> {
        self.options
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_option(k) {
                    "***".to_owned()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }
}

impl fmt::Debug for KafkaSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSinkConfig")
            .field("brokers", &self.brokers)
            .field("offsets_topic", &self.offsets_topic)
            .field("transactional_id", &self.transactional_id)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("delivery_timeout_ms", &self.delivery_timeout_ms)
            .field("timeout_ms", &self.timeout_ms)
            .field("sasl_password_file", &self.sasl_password_file)
            .field("options", &self.redacted_options())
            .finish()
    }
}

/// Whether a librdkafka option holds a secret (`sasl.password`, `ssl.key.password`,
/// `ssl.key.pem`, `sasl.oauthbearer.client.secret`, …).
pub fn is_secret_option(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("password")
        || name.contains("secret")
        || name.contains("jaas")
        || name.ends_with(".pem")
        || name == "sasl.oauthbearer.config"
}

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

/// Sections whose keys are free-form (passed through), by dotted path.
const OPEN_SECTIONS: &[&str] = &["sink.kafka.options"];

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
        let redis_url_set = table
            .get("sink")
            .and_then(|s| s.get("redis"))
            .is_some_and(|r| r.get("url").is_some());
        let mut config: Config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Invalid {
                origin: shown.clone(),
                message: one_line(&e.to_string()),
            })?;
        config.read_secret_files(redis_url_set)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the `…_file` twins of secret keys into the keys. `redis_url_set`: whether
    /// `sink.redis.url` was set (it has a default, so the value cannot tell).
    fn read_secret_files(&mut self, redis_url_set: bool) -> Result<(), ConfigError> {
        let pg = &mut self.postgres;
        if !pg.url_file.is_empty() {
            if !pg.url.expose().is_empty() {
                return Err(ConfigError::Both {
                    key: "postgres.url",
                    file_key: "postgres.url_file",
                });
            }
            pg.url = Secret(read_secret("postgres.url_file", &pg.url_file)?);
        }
        let redis = &mut self.sink.redis;
        if !redis.url_file.is_empty() {
            if redis_url_set {
                return Err(ConfigError::Both {
                    key: "sink.redis.url",
                    file_key: "sink.redis.url_file",
                });
            }
            redis.url = Secret(read_secret("sink.redis.url_file", &redis.url_file)?);
        }
        let kafka = &mut self.sink.kafka;
        if !kafka.sasl_password_file.is_empty() {
            if kafka.options.contains_key("sasl.password") {
                return Err(ConfigError::Both {
                    key: "sink.kafka.options.\"sasl.password\"",
                    file_key: "sink.kafka.sasl_password_file",
                });
            }
            let password = read_secret("sink.kafka.sasl_password_file", &kafka.sasl_password_file)?;
            kafka.options.insert("sasl.password".into(), password);
        }
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
        let kafka = &self.sink.kafka;
        let positive = positive.into_iter().chain([
            (
                "sink.kafka.topic_partitions",
                u64::from(kafka.topic_partitions),
            ),
            ("sink.kafka.delivery_timeout_ms", kafka.delivery_timeout_ms),
            ("sink.kafka.timeout_ms", kafka.timeout_ms),
        ]);
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    origin: "configuration".into(),
                    message: format!("{key} must be greater than 0"),
                });
            }
        }
        let redis = &self.sink.redis;
        if redis.cert_file.is_empty() != redis.key_file.is_empty() {
            return Err(ConfigError::Invalid {
                origin: "configuration".into(),
                message:
                    "sink.redis.cert_file and sink.redis.key_file go together: set both, or neither"
                        .into(),
            });
        }
        let redis_tls_files = !(redis.ca_file.is_empty() && redis.cert_file.is_empty());
        if redis_tls_files && !redis.url.expose().starts_with("rediss://") {
            return Err(ConfigError::Invalid {
                origin: "configuration".into(),
                message: "sink.redis.ca_file, cert_file and key_file are for TLS: sink.redis.url must start with rediss://".into(),
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
        if self.postgres.prune_interval_ms == 0 || self.postgres.prune_batch_rows == 0 {
            return Err(ConfigError::Invalid {
                origin: "configuration".into(),
                message: "postgres.prune_interval_ms and postgres.prune_batch_rows must be greater than 0".into(),
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
        if kafka.topic_replication_factor == 0 || kafka.topic_replication_factor < -1 {
            return Err(ConfigError::Invalid {
                origin: "configuration".into(),
                message: "sink.kafka.topic_replication_factor must be -1 (the broker's default) \
                          or at least 1"
                    .into(),
            });
        }
        #[cfg(feature = "kafka")]
        for (name, value) in &kafka.options {
            if let Some(why) = outboxd_sinks::kafka::protected_option(name, value) {
                return Err(ConfigError::Invalid {
                    origin: "configuration".into(),
                    message: format!("sink.kafka.options.\"{name}\" may not be set: {why}"),
                });
            }
        }
        Ok(())
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
        c.postgres.url = Secret(mask_url(c.postgres.url.expose()));
        c.sink.redis.url = Secret(mask_url(c.sink.redis.url.expose()));
        c.sink.kafka.options = c.sink.kafka.redacted_options();
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

/// Reads a secret from `path`: the file's text without its trailing line break (secret files
/// written by `echo` or editors end with one).
fn read_secret(key: &'static str, path: &str) -> Result<String, ConfigError> {
    let error = |source| ConfigError::SecretFile {
        key,
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(error)?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty",
        )));
    }
    Ok(value.to_owned())
}

/// Replaces the password of a `scheme://user:password@host` URL (or a `password=` pair) with
/// `***`.
pub fn mask_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            return format!("{scheme}://{masked}@{host}{tail}");
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***".to_owned()
            } else {
                kv.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn defaults_table() -> toml::Table {
    match toml::Table::try_from(Config::default()) {
        Ok(t) => t,
        Err(e) => unreachable!("the default configuration serializes: {e}"),
    }
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join("; ")
}

fn check_keys(
    table: &toml::Table,
    defaults: &toml::Table,
    prefix: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    for (key, value) in table {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if OPEN_SECTIONS.contains(&dotted.as_str()) {
            continue;
        }
        match (defaults.get(key), value) {
            (None, _) => {
                return Err(ConfigError::UnknownKey {
                    key: dotted,
                    origin: origin.to_owned(),
                    hint: known_keys(defaults, prefix),
                });
            }
            (Some(toml::Value::Table(d)), toml::Value::Table(t)) => {
                check_keys(t, d, &dotted, origin)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn known_keys(defaults: &toml::Table, prefix: &str) -> String {
    let keys: Vec<&str> = defaults.keys().map(String::as_str).collect();
    let section = if prefix.is_empty() {
        "the top level".to_owned()
    } else {
        format!("[{prefix}]")
    };
    format!(" (known keys in {section}: {})", keys.join(", "))
}

fn apply_env(
    table: &mut toml::Table,
    defaults: &toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let dotted = path.join(".");
        // Walk the defaults to find the key's type; open sections take any string.
        let mut expected = Some(defaults);
        let mut kind = None;
        for (i, part) in path.iter().enumerate() {
            let here = path[..i].join(".");
            if OPEN_SECTIONS.contains(&here.as_str()) {
                kind = Some(toml::Value::String(String::new()));
                break;
            }
            match expected.and_then(|t| t.get(part)) {
                Some(toml::Value::Table(t)) if i + 1 < path.len() => expected = Some(t),
                Some(v) if i + 1 == path.len() && !v.is_table() => kind = Some(v.clone()),
                _ => break,
            }
        }
        let Some(kind) = kind else {
            return Err(ConfigError::UnknownKey {
                key: dotted,
                origin: format!("environment variable {var}"),
                hint: String::new(),
            });
        };
        let invalid = |what: &str| ConfigError::Invalid {
            origin: format!("environment variable {var}"),
            message: format!("{dotted} must be {what}, got {raw:?}"),
        };
        let value = match kind {
            toml::Value::Integer(_) => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| invalid("an integer"))?)
            }
            toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err(invalid("true or false")),
            }),
            _ => toml::Value::String(raw.clone()),
        };
        // Set it, creating sections on the way.
        let (last, sections) = path.split_last().expect("the path has at least one part");
        let mut at = &mut *table;
        for section in sections {
            let entry = at
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            at = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(invalid("a section")),
            };
        }
        at.insert(last.clone(), value);
    }
    Ok(())
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
    fn loads_the_documented_example() {
        let f = write(DOCUMENTED_EXAMPLE);
        let c = Config::load(f.path(), true, []).expect("loads");
        assert_eq!(
            c.postgres.url.expose(),
            "postgres://outboxd:secret@127.0.0.1:5432/app"
        );
        assert_eq!(c.sink.kind, SinkKind::Redis);
        assert_eq!(c.sink.kafka.options["compression.type"], "lz4");
        assert!(!format!("{c:?}").contains("secret"));
        assert!(!c.redacted_toml().contains("secret"));
    }

    #[test]
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
        assert_eq!(c.sink.kind, SinkKind::Kafka);
        assert_eq!(c.sink.redis.maxlen, 5000);
        assert!(c.postgres.failover_slot);
        assert_eq!(c.sink.kafka.options["linger.ms"], "7");
    }

    #[test]
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
        let k = &c.sink.kafka;
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

    #[test]
    fn masks_passwords_in_urls() {
        assert_eq!(
            mask_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(mask_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(mask_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(
            mask_url("host=h user=u password=pw"),
            "host=h user=u password=***"
        );
    }
}
