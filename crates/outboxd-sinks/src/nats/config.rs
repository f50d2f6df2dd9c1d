//! `[sink.nats]`: the section, its checks, and how it becomes a [`NatsSink`].

use std::path::PathBuf;
use std::time::Duration;

use outboxd_core::{Secret, SinkError, mask_url, read_secret_file};
use serde::{Deserialize, Serialize};

use super::NatsSink;
use crate::plugin::{CheckLevel, CheckLine, Preflight, SinkConfigError, SinkContext, SinkPlugin};

/// `[sink.nats]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// `nats://[user:password@]host:port`, or `tls://…` for TLS; several servers separated
    /// by commas.
    pub url: Secret,
    /// A file holding `url` (a Kubernetes or Docker secret).
    pub url_file: String,
    /// A NATS credentials file (`.creds`: a user JWT and its NKey seed).
    pub credentials_file: String,
    /// TLS: the CA certificate (PEM) that signed the server's; empty for the system's roots.
    pub ca_file: String,
    /// TLS: a client certificate (PEM), for servers that verify clients.
    pub cert_file: String,
    /// TLS: the client certificate's private key (PEM).
    pub key_file: String,
    /// Prepended to each routed topic to name its subject.
    pub subject_prefix: String,
    /// Create the stream `stream` (capturing `subjects`) when it does not exist.
    pub create_stream: bool,
    /// The JetStream stream outboxd creates with `create_stream`, and that `check` looks for.
    pub stream: String,
    /// The subjects of the stream outboxd creates.
    pub subjects: Vec<String>,
    /// The duplicate window of the stream outboxd creates, in milliseconds: a message whose
    /// `Nats-Msg-Id` the stream saw within it is dropped.
    pub duplicate_window_ms: u64,
    /// Connection and acknowledgement timeout, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for NatsSection {
    fn default() -> Self {
        NatsSection {
            url: Secret::new("nats://127.0.0.1:4222"),
            url_file: String::new(),
            credentials_file: String::new(),
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            subject_prefix: String::new(),
            create_stream: false,
            stream: "outboxd".into(),
            subjects: vec!["outbox.>".into(), "outboxd.>".into()],
            duplicate_window_ms: 120_000,
            timeout_ms: 10_000,
        }
    }
}

/// What the NATS sink runs with: the section, resolved, and what the rest of the
/// configuration says.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// The server URL(s), with credentials if any.
    pub url: String,
    /// A credentials file.
    pub credentials_file: Option<PathBuf>,
    /// The CA of the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Prepended to every routed topic to name its subject.
    pub subject_prefix: String,
    /// The subject of dead-letter messages (no prefix is added).
    pub dead_letter: String,
    /// The stream to create when missing, if any: name, subjects, duplicate window.
    pub create_stream: Option<(String, Vec<String>, Duration)>,
    /// How long to wait for a connection or an acknowledgement.
    pub timeout: Duration,
}

/// The NATS JetStream sink, as registered.
#[derive(Debug)]
pub struct Nats;

impl SinkPlugin for Nats {
    const NAME: &'static str = "nats";
    /// Within the stream's duplicate window: see the module documentation.
    const EFFECTIVELY_ONCE: bool = true;
    type Config = NatsSection;
    type Sink = NatsSink;

    fn read_secret_files(
        config: &mut NatsSection,
        is_set: &dyn Fn(&str) -> bool,
    ) -> Result<(), SinkConfigError> {
        if !config.url_file.is_empty() {
            if is_set("url") {
                return Err(SinkConfigError::Both {
                    key: "sink.nats.url",
                    file_key: "sink.nats.url_file",
                });
            }
            config.url = Secret::new(read_secret_file("sink.nats.url_file", &config.url_file)?);
        }
        Ok(())
    }

    fn validate(config: &NatsSection) -> Result<(), SinkConfigError> {
        if config.cert_file.is_empty() != config.key_file.is_empty() {
            return Err(SinkConfigError::invalid(
                "sink.nats.cert_file",
                "and sink.nats.key_file go together: set both, or neither",
            ));
        }
        if config.timeout_ms == 0 {
            return Err(SinkConfigError::invalid(
                "sink.nats.timeout_ms",
                "must be greater than 0",
            ));
        }
        if config.create_stream && (config.stream.is_empty() || config.subjects.is_empty()) {
            return Err(SinkConfigError::invalid(
                "sink.nats.create_stream",
                "needs sink.nats.stream and sink.nats.subjects",
            ));
        }
        if config.duplicate_window_ms == 0 {
            return Err(SinkConfigError::invalid(
                "sink.nats.duplicate_window_ms",
                "must be greater than 0: it is what drops replayed events",
            ));
        }
        Ok(())
    }

    fn redact(config: &mut NatsSection) {
        config.url = Secret::new(mask_url(config.url.expose()));
    }

    fn target(config: &NatsSection) -> String {
        mask_url(config.url.expose())
    }

    fn security(config: &NatsSection) -> (CheckLevel, String) {
        let tls = config.url.expose().starts_with("tls://")
            || !(config.ca_file.is_empty() && config.cert_file.is_empty());
        let auth = if config.credentials_file.is_empty() {
            String::new()
        } else {
            format!(", credentials {}", config.credentials_file)
        };
        if !tls {
            return (CheckLevel::Ok, format!("not encrypted (nats://){auth}"));
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
            format!("TLS, certificate verified against {roots}{client}{auth}"),
        )
    }

    fn build(config: &NatsSection, ctx: &SinkContext<'_>) -> Result<NatsSink, SinkError> {
        let set = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        Ok(NatsSink::new(NatsConfig {
            url: config.url.expose().to_owned(),
            credentials_file: set(&config.credentials_file),
            ca_file: set(&config.ca_file),
            client_cert: set(&config.cert_file).zip(set(&config.key_file)),
            subject_prefix: config.subject_prefix.clone(),
            dead_letter: ctx.dead_letter.to_owned(),
            create_stream: config.create_stream.then(|| {
                (
                    config.stream.clone(),
                    config.subjects.clone(),
                    Duration::from_millis(config.duplicate_window_ms),
                )
            }),
            timeout: Duration::from_millis(config.timeout_ms),
        }))
    }

    async fn preflight(
        sink: &mut NatsSink,
        config: &NatsSection,
        ctx: &Preflight<'_>,
    ) -> Vec<CheckLine> {
        sink.check_streams(&config.stream, ctx).await
    }
}
