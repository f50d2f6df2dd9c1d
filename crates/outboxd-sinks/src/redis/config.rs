//! `[sink.redis]`: the section, its checks, and how it becomes a [`RedisSink`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use outboxd_core::{Secret, SinkError, WalOrigin, mask_url, read_secret_file};
use serde::{Deserialize, Serialize};

use super::RedisSink;
use super::effectively_once;
use crate::cloudevents::Envelope;
use crate::plugin::{
    CheckLevel, CheckLine, MAX_TIMEOUT_MS, Preflight, SinkConfigError, SinkContext, SinkPlugin,
};

/// The largest `max_event_bytes`: Redis' own default `proto-max-bulk-len`, 512 MiB.
const MAX_EVENT_BYTES: u64 = 512 * 1024 * 1024;

/// `[sink.redis]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
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
    /// Effectively-once: the hash holding, per WAL history, the position of the last event
    /// written.
    pub offsets_key: String,
    /// The entry's field names, for consumers that read another relay's names.
    pub fields: RedisFields,
}

/// `[sink.redis.fields]`: the name of each field of an entry; `""` leaves the field out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisFields {
    /// The event id.
    pub id: String,
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The ordering key.
    pub key: String,
    /// The payload.
    pub payload: String,
    /// The row's headers object.
    pub headers: String,
    /// The event's time in milliseconds since the epoch, when `[route] timestamp` is set.
    pub time: String,
}

impl RedisFields {
    /// The names in entry order, with their standard names.
    pub(super) fn names(&self) -> [(&'static str, &str); 6] {
        [
            ("id", &self.id),
            ("type", &self.event_type),
            ("key", &self.key),
            ("payload", &self.payload),
            ("headers", &self.headers),
            ("time", &self.time),
        ]
    }

    fn validate(&self) -> Result<(), SinkConfigError> {
        let names = self.names();
        if names[..5].iter().all(|(_, name)| name.is_empty()) {
            return Err(SinkConfigError::invalid(
                "sink.redis.fields",
                "leaves every field out: an entry needs at least one (keep payload)",
            ));
        }
        for (i, (field, name)) in names.iter().enumerate() {
            if let Some((other, _)) = names[..i]
                .iter()
                .find(|(_, n)| !name.is_empty() && n == name)
            {
                return Err(SinkConfigError::invalid(
                    format!("sink.redis.fields.{field}"),
                    format!("names the same field as sink.redis.fields.{other} ({name:?})"),
                ));
            }
        }
        Ok(())
    }
}

impl Default for RedisFields {
    fn default() -> Self {
        RedisFields {
            id: "id".into(),
            event_type: "type".into(),
            key: "key".into(),
            payload: "payload".into(),
            headers: "headers".into(),
            time: "time".into(),
        }
    }
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            url: Secret::new("redis://127.0.0.1:6379"),
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
            offsets_key: "outboxd.offsets".into(),
            fields: RedisFields::default(),
        }
    }
}

/// What the Redis sink runs with: the section, resolved, and what the rest of the
/// configuration says.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// TLS (`rediss://`): the CA and the client certificate, when not the system's roots and
    /// no client certificate.
    pub tls: RedisTls,
    /// Prepended to every routed topic to name its stream.
    pub stream_prefix: String,
    /// The stream for dead-letter entries (no prefix is added).
    pub dead_letter: String,
    /// `XADD MAXLEN ~ maxlen` when non-zero.
    pub maxlen: u64,
    /// Replicas that must acknowledge each batch (`WAIT`); 0 for none.
    pub wait_replicas: u32,
    /// How long `WAIT` may take.
    pub wait_timeout: Duration,
    /// How long to wait for a connection or a reply.
    pub timeout: Duration,
    /// Largest entry (payload, headers, id, key, type, topic) published; a larger event goes
    /// to the dead-letter stream as `too_large`, without its payload.
    pub max_event_bytes: usize,
    /// `[sink] delivery = "effectively-once"`.
    pub effectively_once: bool,
    /// Effectively-once: the WAL history the events come from (the field of its marker in
    /// `offsets_key`); `None` for a sink that only answers pings.
    pub origin: Option<WalOrigin>,
    /// Effectively-once: the hash of the markers.
    pub offsets_key: String,
    /// The entry's field names; empty ones are left out.
    pub fields: RedisFields,
    /// outboxd's layout, or a CloudEvent.
    pub envelope: Envelope,
    /// CloudEvents' `source`.
    pub source: String,
}

/// The TLS files of a `rediss://` connection (PEM).
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    /// The CA that signed the server's certificate; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for servers with `tls-auth-clients yes`.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl RedisTls {
    /// Whether anything is set.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client.is_some()
    }

    /// The files' contents, for the client.
    pub(super) fn certificates(&self) -> Result<redis::TlsCertificates, SinkError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                SinkError::permanent(
                    what,
                    std::io::Error::new(e.kind(), format!("{}: {e}", path.display())),
                )
            })
        };
        let root_cert = match &self.ca_file {
            Some(p) => Some(read("cannot read sink.redis.ca_file", p)?),
            None => None,
        };
        let client_tls = match &self.client {
            Some((cert, key)) => Some(redis::ClientTlsConfig {
                client_cert: read("cannot read sink.redis.cert_file", cert)?,
                client_key: read("cannot read sink.redis.key_file", key)?,
            }),
            None => None,
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// The Redis Streams sink, as registered.
#[derive(Debug)]
pub struct Redis;

impl SinkPlugin for Redis {
    const NAME: &'static str = "redis";
    const EFFECTIVELY_ONCE: bool = true;
    const CLOUDEVENTS: bool = true;
    type Config = RedisSection;
    type Sink = RedisSink;

    fn read_secret_files(
        config: &mut RedisSection,
        is_set: &dyn Fn(&str) -> bool,
    ) -> Result<(), SinkConfigError> {
        if !config.url_file.is_empty() {
            if is_set("url") {
                return Err(SinkConfigError::Both {
                    key: "sink.redis.url",
                    file_key: "sink.redis.url_file",
                });
            }
            config.url = Secret::new(read_secret_file("sink.redis.url_file", &config.url_file)?);
        }
        Ok(())
    }

    fn validate(config: &RedisSection) -> Result<(), SinkConfigError> {
        if config.cert_file.is_empty() != config.key_file.is_empty() {
            return Err(SinkConfigError::invalid(
                "sink.redis.cert_file",
                "and sink.redis.key_file go together: set both, or neither",
            ));
        }
        SinkConfigError::check_ranges(&[
            (
                "sink.redis.timeout_ms",
                config.timeout_ms,
                1..=MAX_TIMEOUT_MS,
            ),
            (
                "sink.redis.wait_timeout_ms",
                config.wait_timeout_ms,
                1..=MAX_TIMEOUT_MS,
            ),
            (
                "sink.redis.max_event_bytes",
                config.max_event_bytes,
                1024..=MAX_EVENT_BYTES,
            ),
        ])?;
        let tls_files = !(config.ca_file.is_empty() && config.cert_file.is_empty());
        if tls_files && !config.url.expose().starts_with("rediss://") {
            return Err(SinkConfigError::invalid(
                "sink.redis.url",
                "must start with rediss:// when sink.redis.ca_file, cert_file or key_file is \
                 set: they are for TLS",
            ));
        }
        config.fields.validate()
    }

    fn redact(config: &mut RedisSection) {
        config.url = Secret::new(mask_url(config.url.expose()));
    }

    fn target(config: &RedisSection) -> String {
        mask_url(config.url.expose())
    }

    fn security(config: &RedisSection) -> (CheckLevel, String) {
        if !config.url.expose().starts_with("rediss://") {
            return (CheckLevel::Ok, "not encrypted (redis://)".into());
        }
        let roots = if config.ca_file.is_empty() {
            "the system's roots".to_owned()
        } else {
            config.ca_file.clone()
        };
        let client = if config.cert_file.is_empty() {
            String::new()
        } else {
            format!(", client certificate {}", config.cert_file)
        };
        (
            CheckLevel::Ok,
            format!("TLS, certificate verified against {roots}, host name checked{client}"),
        )
    }

    fn build(config: &RedisSection, ctx: &SinkContext<'_>) -> Result<RedisSink, SinkError> {
        let set = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        RedisSink::new(RedisConfig {
            url: config.url.expose().to_owned(),
            tls: RedisTls {
                ca_file: set(&config.ca_file),
                client: set(&config.cert_file).zip(set(&config.key_file)),
            },
            stream_prefix: config.stream_prefix.clone(),
            dead_letter: ctx.dead_letter.to_owned(),
            maxlen: config.maxlen,
            wait_replicas: config.wait_replicas,
            wait_timeout: Duration::from_millis(config.wait_timeout_ms),
            timeout: Duration::from_millis(config.timeout_ms),
            max_event_bytes: usize::try_from(config.max_event_bytes).unwrap_or(usize::MAX),
            effectively_once: ctx.effectively_once,
            origin: ctx.origin.cloned(),
            offsets_key: config.offsets_key.clone(),
            fields: config.fields.clone(),
            envelope: ctx.envelope,
            source: ctx.source.to_owned(),
        })
    }

    async fn preflight(
        sink: &mut RedisSink,
        config: &RedisSection,
        ctx: &Preflight<'_>,
    ) -> Vec<CheckLine> {
        if !ctx.effectively_once {
            return Vec::new();
        }
        vec![effectively_once::check_offsets(sink, &config.offsets_key).await]
    }
}
