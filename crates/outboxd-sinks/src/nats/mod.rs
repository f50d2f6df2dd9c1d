//! NATS JetStream, through async-nats.
//!
//! Each event becomes one message on subject `<subject_prefix><topic>` (see [`message`]),
//! published to JetStream, which answers each message with an acknowledgement once the
//! stream that captures the subject has stored it (on a replicated stream, once a quorum
//! has). A batch is published in order on one connection, then its acknowledgements are read
//! in order; [`send`](outboxd_core::Sink::send) resolves `Ok` only when every record is in
//! its stream or, refused alone, in the dead-letter subject.
//!
//! # Duplicates
//!
//! Every message carries `Nats-Msg-Id` = the event id: a stream drops a message whose id it
//! stored within its duplicate window (2 minutes by default) and says so in the
//! acknowledgement, which counts the record as already delivered. So a batch sent again after
//! a failure or a crash, within the window, adds nothing twice: effectively-once delivery,
//! as long as outboxd comes back within the window. After a longer outage the replay of the
//! batches in flight at the crash may be stored again. With `[sink] delivery =
//! "effectively-once"` this is the whole mechanism; in at-least-once mode it is the same.
//!
//! # Errors
//!
//! | what | class |
//! |---|---|
//! | a subject or header NATS cannot carry; a message over the server's `max_payload` or the stream's `max_msg_size` | the record is dead-lettered (`rejected`, `too_large`) |
//! | no stream captures the subject ("no responders"), a subject the user may not publish to (the server's permissions violation) | refused: the batch is sent again, with an ERROR line, `/readyz` and `outboxd_sink_refused`, until it is fixed; nothing is dead-lettered |
//! | an acknowledgement that does not come, a lost connection, a stream that is full | transient: the batch is sent again |
//! | a refused authorization, a server without JetStream | permanent: outboxd stops with a message |
//! | a dead letter the dead-letter subject's stream refuses, or one over the server's `max_payload` | permanent: nothing is dropped |
//!
//! No stream for a subject is transient, not poison: a stream that is being created, or a
//! JetStream that is still starting after a restart, answers the same way, and dead-lettering
//! then would empty a topic into the dead-letter subject. The log names the subject, and
//! `outboxd check` looks for the streams.
//!
//! Order: messages of one connection reach a stream in the order they were published. A batch
//! that fails is sent again whole; what the stream stored of it is dropped as duplicates.
//!
//! The files: `config` (the section `[sink.nats]` and the plugin), [`message`] (subject,
//! headers, dead letters).

mod config;
pub mod message;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectErrorKind, ConnectOptions};
use outboxd_core::{Delivery, Ledger, Poison, PoisonKind, Record, Sink, SinkError};

pub use config::{Nats, NatsConfig, NatsSection, UrlAuth, split_credentials};
use message::Outgoing;

use crate::plugin::{CheckLevel, CheckLine, Preflight};

/// JetStream's error code for a message over the stream's `max_msg_size`.
const MESSAGE_TOO_LARGE: u64 = 10054;

/// Publishes batches to NATS JetStream.
pub struct NatsSink {
    config: NatsConfig,
    /// Connected on first use; async-nats reconnects it by itself after that.
    js: Option<jetstream::Context>,
    /// The last permissions violation the server reported on the connection: a publish to a
    /// subject the user may not publish to gets no acknowledgement, only this.
    denied: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("subject_prefix", &self.config.subject_prefix)
            .field("dead_letter", &self.config.dead_letter)
            .field("connected", &self.js.is_some())
            .finish_non_exhaustive()
    }
}

/// What became of one published message.
enum Acked {
    /// Stored (`true`: it was already there, a duplicate).
    Stored(bool),
    /// Refused, for this message alone: dead-letter it.
    Refused(Poison),
}

impl NatsSink {
    /// A sink for `config`; connects on first use.
    pub fn new(config: NatsConfig) -> Self {
        NatsSink {
            config,
            js: None,
            denied: Arc::default(),
        }
    }

    async fn jetstream(&mut self) -> Result<jetstream::Context, SinkError> {
        if let Some(js) = &self.js {
            return Ok(js.clone());
        }
        let client = self.connect().await?;
        let mut js = jetstream::new(client);
        js.set_timeout(self.config.timeout);
        if let Some((name, subjects, window)) = &self.config.create_stream {
            create_stream(&js, name, subjects, *window).await?;
        }
        self.js = Some(js.clone());
        Ok(js)
    }

    async fn connect(&self) -> Result<Client, SinkError> {
        let c = &self.config;
        let denied = self.denied.clone();
        let mut options = ConnectOptions::new()
            .event_callback(move |event| {
                let denied = denied.clone();
                async move {
                    if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) =
                        event
                        && text.to_ascii_lowercase().contains("permissions violation")
                        && let Ok(mut last) = denied.lock()
                    {
                        *last = Some(text);
                    }
                }
            })
            .name("outboxd")
            .connection_timeout(c.timeout)
            .request_timeout(Some(c.timeout));
        if let Some(ca) = &c.ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &c.client_cert {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        match &c.auth {
            Some(UrlAuth::UserPassword(user, password)) => {
                options = options.user_and_password(user.clone(), password.clone());
            }
            Some(UrlAuth::Token(token)) => options = options.token(token.clone()),
            None => {}
        }
        if let Some(creds) = &c.credentials_file {
            options = options
                .credentials_file(creds)
                .await
                .map_err(|e| SinkError::permanent("cannot read sink.nats.credentials_file", e))?;
        }
        // async-nats takes one server per string: a comma-separated list is parsed here.
        let servers = c
            .url
            .split(',')
            .map(|s| s.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SinkError::permanent("sink.nats.url is not a valid NATS URL", e))?;
        options.connect(servers).await.map_err(|e| {
            let what = "connecting to NATS";
            match e.kind() {
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                    SinkError::permanent(
                        "NATS refused outboxd: check the user and password in sink.nats.url, or \
                         sink.nats.credentials_file",
                        e,
                    )
                }
                ConnectErrorKind::Tls => SinkError::permanent(
                    "TLS to NATS failed: check sink.nats.ca_file, cert_file and key_file, and \
                     that the URL names a host the server's certificate covers",
                    e,
                ),
                ConnectErrorKind::ServerParse => {
                    SinkError::permanent("sink.nats.url is not a valid NATS URL", e)
                }
                _ => SinkError::transient(what, e),
            }
        })
    }

    /// A permissions violation the server reported since the last call, as a refusal of the
    /// stream.
    fn refusal(&self) -> Option<SinkError> {
        let text = self.denied.lock().ok()?.take()?;
        Some(SinkError::refused(
            "NATS refuses the events: the user may not publish to the subject (grant it in \
             the server's authorization, publish permissions)",
            text,
        ))
    }

    /// The message of record `i`: the event to its subject, or its dead letter. A dead letter
    /// that would be over the server's `max_payload` (`max`) goes without the payload.
    fn outgoing(&self, ledger: &mut Ledger<'_>, i: usize, max: usize) -> Outgoing {
        let event = &ledger.batch()[i].event;
        let poison = match ledger.poison(i) {
            Some(poison) => poison.clone(),
            None => match Outgoing::event(event, &self.config.subject_prefix) {
                Ok(message) => return message,
                Err(poison) => {
                    ledger.reject(i, poison.clone());
                    poison
                }
            },
        };
        self.dead_letter(ledger, i, &poison, max)
    }

    /// The dead letter of record `i`: with its payload when it fits in `max` bytes and the
    /// payload was not already found too large for the dead-letter stream.
    fn dead_letter(
        &self,
        ledger: &mut Ledger<'_>,
        i: usize,
        poison: &Poison,
        max: usize,
    ) -> Outgoing {
        let event = &ledger.batch()[i].event;
        let subject = &self.config.dead_letter;
        if !ledger.is_payload_omitted(i) {
            let letter = Outgoing::dead_letter(event, poison, subject, true);
            if letter.size() <= max || event.payload.is_empty() {
                return letter;
            }
        }
        ledger.omit_payload(i);
        Outgoing::dead_letter(event, poison, subject, false)
    }

    /// Publishes `messages` in order; a message the client refuses before sending (over the
    /// server's `max_payload`) is dead-lettered in its place, in order.
    async fn publish_all(
        &self,
        js: &jetstream::Context,
        ledger: &mut Ledger<'_>,
        indexes: &[usize],
    ) -> Result<Vec<(usize, PublishAckFuture)>, SinkError> {
        let mut pending = Vec::with_capacity(indexes.len());
        let max = js.client().server_info().max_payload;
        for &i in indexes {
            let m = self.outgoing(ledger, i, max);
            let published = js
                .publish_with_headers(m.subject.clone(), m.headers.clone(), m.payload.clone())
                .await;
            let ack = match published {
                Ok(ack) => ack,
                Err(e)
                    if e.kind() == PublishErrorKind::MaxPayloadExceeded
                        && ledger.poison(i).is_none() =>
                {
                    let poison = Poison::new(
                        PoisonKind::TooLarge,
                        format!("nats refused the message: {e}"),
                    );
                    ledger.reject(i, poison.clone());
                    let letter = self.dead_letter(ledger, i, &poison, max);
                    js.publish_with_headers(letter.subject, letter.headers, letter.payload)
                        .await
                        .map_err(|e| publish_error(&self.config.dead_letter, e, true))?
                }
                Err(e) => {
                    return Err(self.refusal().unwrap_or_else(|| {
                        publish_error(&m.subject, e, ledger.poison(i).is_some())
                    }));
                }
            };
            pending.push((i, ack));
        }
        Ok(pending)
    }

    /// Reads the acknowledgements in order: duplicates and refusals go into the ledger;
    /// returns the records refused now, whose dead letters are still to be written.
    async fn read_acks(
        &self,
        ledger: &mut Ledger<'_>,
        pending: Vec<(usize, PublishAckFuture)>,
    ) -> Result<Vec<usize>, SinkError> {
        let mut refused = Vec::new();
        for (i, ack) in pending {
            let subject = match ledger.poison(i) {
                Some(_) => self.config.dead_letter.clone(),
                None => format!(
                    "{}{}",
                    self.config.subject_prefix,
                    ledger.batch()[i].event.topic
                ),
            };
            let ack = acked(ack.await, &subject, ledger.poison(i).is_some());
            let ack = match ack {
                Err(e) if e.is_transient() => return Err(self.refusal().unwrap_or(e)),
                other => other?,
            };
            match ack {
                Acked::Stored(true) => ledger.duplicate(i),
                Acked::Stored(false) => {}
                Acked::Refused(poison) => {
                    ledger.reject(i, poison);
                    refused.push(i);
                }
            }
        }
        Ok(refused)
    }

    /// `outboxd check`: JetStream answers for the dead-letter subject, and the configured
    /// stream exists.
    pub(crate) async fn check_streams(
        &mut self,
        stream: &str,
        ctx: &Preflight<'_>,
    ) -> Vec<CheckLine> {
        let line = |level, message| CheckLine {
            level,
            subject: "streams",
            message,
        };
        let js = match self.jetstream().await {
            Ok(js) => js,
            Err(e) => return vec![line(CheckLevel::Fail, e.to_string())],
        };
        let mut lines = Vec::new();
        match js.stream_by_subject(ctx.dead_letter).await {
            Ok(name) => lines.push(line(
                CheckLevel::Ok,
                format!(
                    "dead-letter subject {:?} is stored by stream {name:?}",
                    ctx.dead_letter
                ),
            )),
            Err(e) => lines.push(line(
                CheckLevel::Fail,
                format!(
                    "no JetStream stream stores the dead-letter subject {:?} ({e}): create one, \
                     or set sink.nats.create_stream = true",
                    ctx.dead_letter
                ),
            )),
        }
        if !stream.is_empty() {
            match js.get_stream(stream).await {
                Ok(mut s) => match s.info().await {
                    Ok(info) => lines.push(line(
                        CheckLevel::Ok,
                        format!(
                            "stream {stream:?}: subjects {:?}, duplicate window {} s",
                            info.config.subjects,
                            info.config.duplicate_window.as_secs()
                        ),
                    )),
                    Err(e) => lines.push(line(CheckLevel::Warn, format!("stream {stream:?}: {e}"))),
                },
                Err(e) => lines.push(line(
                    CheckLevel::Warn,
                    format!("stream {stream:?} (sink.nats.stream) not found: {e}"),
                )),
            }
        }
        lines
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Delivery, SinkError> {
        let js = self.jetstream().await?;
        let mut ledger = Ledger::new(batch);
        let all: Vec<usize> = (0..batch.len()).collect();
        let pending = self.publish_all(&js, &mut ledger, &all).await?;
        let refused = self.read_acks(&mut ledger, pending).await?;
        if !refused.is_empty() {
            // The stream refused these alone (too large for it): their dead letters now.
            let pending = self.publish_all(&js, &mut ledger, &refused).await?;
            let again = self.read_acks(&mut ledger, pending).await?;
            // A dead letter the dead-letter stream finds too large: once more, without the
            // payload (the whole event is kept in Postgres).
            let retry: Vec<usize> = again
                .iter()
                .copied()
                .filter(|&i| !ledger.is_payload_omitted(i))
                .collect();
            if again.len() == retry.len() && !retry.is_empty() {
                retry.iter().for_each(|&i| ledger.omit_payload(i));
                let pending = self.publish_all(&js, &mut ledger, &retry).await?;
                let last = self.read_acks(&mut ledger, pending).await?;
                if let Some(&i) = last.first() {
                    return Err(dead_letter_refused(i));
                }
            } else if let Some(&i) = again.first() {
                return Err(dead_letter_refused(i));
            }
        }
        Ok(ledger.finish())
    }

    async fn ping(&mut self) -> Result<(), SinkError> {
        // JetStream's account information, read as plain JSON: it answers for any server
        // version, and an error in it (JetStream off for this account) is the server's own.
        let client = self.jetstream().await?.client();
        let what = "asking NATS JetStream for the account ($JS.API.INFO)";
        let reply = match tokio::time::timeout(
            self.config.timeout,
            client.request("$JS.API.INFO", bytes::Bytes::new()),
        )
        .await
        {
            Err(_) => {
                return Err(SinkError::transient(
                    what,
                    format!("no answer within {:?}", self.config.timeout),
                ));
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(SinkError::transient(
                    what,
                    format!("{e}: is JetStream on (nats-server -js)?"),
                ));
            }
            Ok(Err(e)) => return Err(SinkError::transient(what, e)),
            Ok(Ok(reply)) => reply,
        };
        let info: serde_json::Value =
            serde_json::from_slice(&reply.payload).map_err(|e| SinkError::transient(what, e))?;
        match info.get("error") {
            None => Ok(()),
            Some(error) => Err(SinkError::permanent(
                "NATS JetStream refused outboxd's account: enable JetStream for it",
                error.to_string(),
            )),
        }
    }
}

/// The dead-letter subject's stream refused record `i`'s dead letter even without payload.
fn dead_letter_refused(i: usize) -> SinkError {
    SinkError::permanent(
        "the dead-letter subject refused a message (check sink.dead_letter and the stream that \
         stores it)",
        format!("record {i} of the batch"),
    )
}

/// Creates the stream when it does not exist (an existing one is left as it is).
async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[String],
    window: Duration,
) -> Result<(), SinkError> {
    let config = stream::Config {
        name: name.to_owned(),
        subjects: subjects.to_vec(),
        duplicate_window: window,
        ..stream::Config::default()
    };
    match js.get_or_create_stream(config).await {
        Ok(_) => Ok(()),
        Err(e) => Err(SinkError::transient(
            "creating the JetStream stream (sink.nats.create_stream)",
            e,
        )),
    }
}

/// What an acknowledgement says about a message to `subject`.
fn acked(
    ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    subject: &str,
    dead_letter: bool,
) -> Result<Acked, SinkError> {
    let e = match ack {
        Ok(ack) => return Ok(Acked::Stored(ack.duplicate)),
        Err(e) => e,
    };
    let code = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(|j| j.error_code().0);
    match code {
        // JetStream's own refusal of a dead letter: nothing may be dropped, so outboxd stops.
        Some(code) if dead_letter => Err(SinkError::permanent(
            "the stream of the dead-letter subject refused a dead letter (check sink.dead_letter \
             and that stream's limits)",
            format!("subject {subject:?}: JetStream error {code}: {e}"),
        )),
        Some(MESSAGE_TOO_LARGE) => Ok(Acked::Refused(Poison::new(
            PoisonKind::TooLarge,
            format!("nats refused the message: {e}"),
        ))),
        _ => Err(publish_error(subject, e, dead_letter)),
    }
}

/// A failed publish of a message to `subject`, as a batch failure.
fn publish_error(
    subject: &str,
    e: jetstream::context::PublishError,
    dead_letter: bool,
) -> SinkError {
    if dead_letter && e.kind() == PublishErrorKind::MaxPayloadExceeded {
        return SinkError::permanent("a dead letter is over the NATS server's max_payload", e);
    }
    match e.kind() {
        PublishErrorKind::StreamNotFound => SinkError::refused(
            "publishing to NATS: no JetStream stream stores this subject (create one, or set \
             sink.nats.create_stream = true)",
            format!("subject {subject:?}: {e}"),
        ),
        _ => SinkError::transient(
            "publishing to NATS JetStream",
            format!("subject {subject:?}: {e}"),
        ),
    }
}
