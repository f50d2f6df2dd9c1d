//! `[sink.nats]`: the section, its checks, and how it becomes a [`NatsSink`].

use std::path::PathBuf;
use std::time::Duration;

use outboxd_core::{Secret, SinkError, mask_token_url, read_secret_file};
use serde::{Deserialize, Serialize};

use super::NatsSink;
use crate::plugin::{
    CheckLevel, CheckLine, MAX_TIMEOUT_MS, Preflight, SinkConfigError, SinkContext, SinkPlugin,
};

/// The longest duplicate window accepted: a year.
const MAX_DUPLICATE_WINDOW_MS: u64 = 365 * 86_400_000;

/// `[sink.nats]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// `nats://[user:password@]host:port` (or `nats://token@host:port`), or `tls://…` for
    /// TLS; several servers separated by commas.
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
    /// The server URL(s), without credentials.
    pub url: String,
    /// The user and password, or the token, that `sink.nats.url` carried.
    pub auth: Option<UrlAuth>,
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

/// Credentials written in `sink.nats.url`. async-nats does not read them from the URL, so
/// outboxd takes them out and hands them to the client itself.
#[derive(Clone, PartialEq, Eq)]
pub enum UrlAuth {
    /// `nats://user:password@host`.
    UserPassword(String, String),
    /// `nats://token@host`.
    Token(String),
}

impl std::fmt::Debug for UrlAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlAuth::UserPassword(user, _) => write!(f, "UserPassword({user:?}, \"***\")"),
            UrlAuth::Token(_) => f.write_str("Token(\"***\")"),
        }
    }
}

/// The servers of `url` (comma-separated) without their credentials, and those credentials,
/// percent-decoded. Every server that carries credentials must carry the same.
pub fn split_credentials(url: &str) -> Result<(String, Option<UrlAuth>), SinkConfigError> {
    let invalid = |problem: &str| SinkConfigError::invalid("sink.nats.url", problem);
    let mut servers = Vec::new();
    let mut auth: Option<UrlAuth> = None;
    for server in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !server.contains("://") {
            servers.push(server.to_owned());
            continue;
        }
        let mut parsed = url::Url::parse(server)
            .map_err(|e| invalid(&format!("a server is not a valid URL ({e})")))?;
        let this = match (parsed.username(), parsed.password()) {
            ("", None) => None,
            (user, Some(password)) => Some(UrlAuth::UserPassword(
                percent_decoded(user),
                percent_decoded(password),
            )),
            (token, None) => Some(UrlAuth::Token(percent_decoded(token))),
        };
        if let Some(this) = this {
            if auth.as_ref().is_some_and(|a| *a != this) {
                return Err(invalid(
                    "gives different credentials for different servers: outboxd connects \
                     with one user; give it once, or on every server the same",
                ));
            }
            auth = Some(this);
            // Both only fail for URLs that cannot have a user part, which these have.
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
        }
        servers.push(parsed.to_string());
    }
    Ok((servers.join(","), auth))
}

/// `text` with its `%XX` escapes decoded (a URL's user part); invalid escapes stay as they
/// are.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The NATS JetStream sink, as registered.
#[derive(Debug)]
pub struct Nats;

impl SinkPlugin for Nats {
    const NAME: &'static str = "nats";
    /// Within the stream's duplicate window: see the module documentation.
    const EFFECTIVELY_ONCE: bool = true;
    /// The client logs every (re)connection at info; outboxd logs outages and recoveries
    /// itself. Its warnings stay.
    const LOG_DIRECTIVES: &'static [&'static str] = &["async_nats=warn"];
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
        let (_, auth) = split_credentials(config.url.expose())?;
        if auth.is_some() && !config.credentials_file.is_empty() {
            return Err(SinkConfigError::invalid(
                "sink.nats.url",
                "carries a user or token, and sink.nats.credentials_file is set: keep one",
            ));
        }
        if config.cert_file.is_empty() != config.key_file.is_empty() {
            return Err(SinkConfigError::invalid(
                "sink.nats.cert_file",
                "and sink.nats.key_file go together: set both, or neither",
            ));
        }
        SinkConfigError::check_ranges(&[
            (
                "sink.nats.timeout_ms",
                config.timeout_ms,
                1..=MAX_TIMEOUT_MS,
            ),
            (
                "sink.nats.duplicate_window_ms",
                config.duplicate_window_ms,
                0..=MAX_DUPLICATE_WINDOW_MS,
            ),
        ])?;
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
        config.url = Secret::new(mask_token_url(config.url.expose()));
    }

    fn target(config: &NatsSection) -> String {
        mask_token_url(config.url.expose())
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
        let (url, auth) = split_credentials(config.url.expose())
            .map_err(|e| SinkError::permanent("sink.nats.url", e))?;
        Ok(NatsSink::new(NatsConfig {
            url,
            auth,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_the_url_once_for_every_server() {
        let (servers, auth) =
            split_credentials("nats://u%40x:p%3Aw@a:4222,nats://u%40x:p%3Aw@b:4223").unwrap();
        assert_eq!(servers, "nats://a:4222,nats://b:4223");
        assert_eq!(
            auth,
            Some(UrlAuth::UserPassword("u@x".into(), "p:w".into()))
        );
        let (servers, auth) = split_credentials("tls://tok3n@a:4222, nats://b:4222").unwrap();
        assert_eq!(servers, "tls://a:4222,nats://b:4222");
        assert_eq!(auth, Some(UrlAuth::Token("tok3n".into())));
        assert_eq!(format!("{auth:?}"), "Some(Token(\"***\"))");
        let (servers, auth) = split_credentials("nats://a:4222").unwrap();
        assert_eq!((servers.as_str(), auth), ("nats://a:4222", None));
        let err = split_credentials("nats://u:p1@a:4222,nats://u:p2@b:4222").unwrap_err();
        assert!(err.to_string().contains("different credentials"), "{err}");
        assert!(!err.to_string().contains("p1"), "{err}");
    }
}
