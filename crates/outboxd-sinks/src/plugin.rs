//! How a broker plugs into outboxd: the one trait a sink's folder implements, beside its
//! [`Sink`].
//!
//! A sink folder (`src/<name>/`) holds the broker client (the [`Sink`]), its configuration
//! section `[sink.<name>]` (a serde struct), and a unit type implementing [`SinkPlugin`] that
//! ties them together: how the section is read, checked and shown, and how the sink is built.
//! The registration in `lib.rs` (one line per sink) makes the binary know it: `[sink] kind`,
//! the configuration keys and their environment overrides, `check`, `run` and `--help` all
//! come from there. Nothing outside the folder names a sink.

use std::fmt;
use std::future::Future;

use outboxd_core::{Lsn, SecretFileError, Sink, SinkError, WalOrigin};

use crate::cloudevents::Envelope;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// What every sink gets from the rest of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct SinkContext<'a> {
    /// The topic, stream or subject for dead-letter entries (`[sink] dead_letter`).
    pub dead_letter: &'a str,
    /// `[sink] delivery = "effectively-once"`: remove the repeats a replay would cause, as far
    /// as the broker allows.
    pub effectively_once: bool,
    /// The replication slot's name: an identity that every instance on the slot shares.
    pub slot: &'a str,
    /// Whether events carry their type as a `type` header (Kafka; off under `[route] preset = "debezium"`, whose consumers expect the `id` header only).
    pub type_header: bool,
    /// `[sink] envelope`: outboxd's layout, or CloudEvents (only for sinks whose
    /// [`SinkPlugin::CLOUDEVENTS`] is true).
    pub envelope: Envelope,
    /// `[sink] source`: CloudEvents' `source` attribute.
    pub source: &'a str,
    /// The WAL history the events come from (system, database, slot, timeline), read on the
    /// replication session the sink serves. Effectively-once sinks keep their markers under
    /// it and trust a marker only as far as [`WalOrigin::trust`] says; `None` for a sink that
    /// only answers pings (`check`, the readiness probe), which must not send in that mode.
    pub origin: Option<&'a WalOrigin>,
}

/// A sink's configuration section cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SinkConfigError {
    /// A secret is set both directly and from a file.
    #[error("{key} and {file_key} are both set: keep one")]
    Both {
        /// The direct key.
        key: &'static str,
        /// Its `_file` twin.
        file_key: &'static str,
    },
    /// A secret file cannot be read.
    #[error(transparent)]
    SecretFile(#[from] SecretFileError),
    /// A value out of range, or keys that do not go together: "`key` `problem`", e.g.
    /// "sink.kafka.timeout_ms must be greater than 0".
    #[error("{key} {problem}")]
    Invalid {
        /// The dotted key (`sink.<name>.<key>`).
        key: String,
        /// What is wrong, and what to do.
        problem: String,
    },
}

impl SinkConfigError {
    /// `key` has a value that cannot be used, because of `problem`.
    pub fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        SinkConfigError::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// Refuses every `(key, value)` outside its range, naming the key and the range.
    pub fn check_ranges(
        keys: &[(&str, u64, std::ops::RangeInclusive<u64>)],
    ) -> Result<(), SinkConfigError> {
        match keys.iter().find(|(_, value, range)| !range.contains(value)) {
            Some((key, value, range)) => Err(SinkConfigError::invalid(
                *key,
                format!(
                    "must be between {} and {}, got {value}",
                    range.start(),
                    range.end()
                ),
            )),
            None => Ok(()),
        }
    }
}

/// The longest timeout a sink section accepts, in milliseconds (librdkafka's limit: a
/// 32-bit count of milliseconds, about 24 days).
pub const MAX_TIMEOUT_MS: u64 = i32::MAX as u64;

/// How a line of `outboxd check` came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckLevel {
    /// Fine.
    Ok,
    /// Works, but worth attention.
    Warn,
    /// `run` would fail.
    Fail,
}

/// A line of `outboxd check` a sink adds.
#[derive(Debug, Clone)]
pub struct CheckLine {
    /// How it came out.
    pub level: CheckLevel,
    /// What was checked (a few words).
    pub subject: &'static str,
    /// What was found, or what to do.
    pub message: String,
}

/// What a sink's own checks may look at, once its broker answered.
#[derive(Debug, Clone)]
pub struct Preflight<'a> {
    /// The dead-letter destination.
    pub dead_letter: &'a str,
    /// `[sink] delivery = "effectively-once"`.
    pub effectively_once: bool,
    /// The server's WAL position, when Postgres could be read.
    pub wal: Option<Lsn>,
    /// A glob matching every topic the route can name, when the route is valid.
    pub topic_glob: Option<String>,
}

/// A broker outboxd can publish to: its section `[sink.<NAME>]` and how its [`Sink`] is made.
///
/// Implemented by a unit type in the sink's folder and registered once in `lib.rs`.
pub trait SinkPlugin {
    /// The sink's name: `[sink] kind = "<NAME>"` selects it, `[sink.<NAME>]` configures it,
    /// and it is the cargo feature that builds it in.
    const NAME: &'static str;
    /// Whether `[sink] delivery = "effectively-once"` is supported.
    const EFFECTIVELY_ONCE: bool;
    /// Whether `[sink] envelope = "cloudevents"` and `"cloudevents-structured"` are supported.
    const CLOUDEVENTS: bool = false;
    /// Tables of the section whose keys are free-form (passed through to a client library),
    /// relative to the section (`options` for `[sink.kafka.options]`).
    const OPEN_TABLES: &'static [&'static str] = &[];
    /// Log directives for the client library's own logging (`async_nats=warn`): added to
    /// outboxd's log filter unless the filter names that library itself.
    const LOG_DIRECTIVES: &'static [&'static str] = &[];

    /// The section `[sink.<NAME>]`. Its `Default` holds the documented defaults; unknown keys
    /// are refused by the configuration loader, which compares against it.
    type Config: Serialize
        + DeserializeOwned
        + Default
        + Clone
        + PartialEq
        + fmt::Debug
        + Send
        + Sync
        + 'static;
    /// The broker client.
    type Sink: Sink + fmt::Debug + 'static;

    /// Reads the secrets that `_file` keys name into their keys. `is_set(key)` tells whether
    /// `key` of the section was given (in the file or the environment), for keys that have a
    /// default.
    fn read_secret_files(
        config: &mut Self::Config,
        is_set: &dyn Fn(&str) -> bool,
    ) -> Result<(), SinkConfigError> {
        let _ = (config, is_set);
        Ok(())
    }

    /// Checks the section without connecting.
    fn validate(config: &Self::Config) -> Result<(), SinkConfigError>;

    /// Replaces secrets with `***`, for showing the configuration.
    fn redact(config: &mut Self::Config);

    /// Where the broker is, without secrets (for messages).
    fn target(config: &Self::Config) -> String;

    /// How the connection is secured, as far as the configuration tells, for `check`:
    /// unverified TLS is worth a warning.
    fn security(config: &Self::Config) -> (CheckLevel, String);

    /// Builds the client; connections are made on first use.
    fn build(config: &Self::Config, ctx: &SinkContext<'_>) -> Result<Self::Sink, SinkError>;

    /// Whether the route makes a NULL payload a tombstone (an event without a value) instead
    /// of a dead letter: for brokers where a missing value means something (Kafka's compacted
    /// topics). No by default.
    fn tombstone_on_null(config: &Self::Config) -> bool {
        let _ = config;
        false
    }

    /// More checks for `outboxd check`, once the broker answered (none by default).
    fn preflight(
        sink: &mut Self::Sink,
        config: &Self::Config,
        ctx: &Preflight<'_>,
    ) -> impl Future<Output = Vec<CheckLine>> + Send {
        let _ = (sink, config, ctx);
        async { Vec::new() }
    }
}
