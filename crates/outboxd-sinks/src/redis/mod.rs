//! Redis Streams.
//!
//! Each event becomes one stream entry, `XADD <prefix><topic> [MAXLEN ~ N] * id <id> type
//! <type> key <key> payload <payload> headers <headers-json>`. A batch is one `MULTI` …
//! `EXEC` on one connection, so it is applied all at once or not at all: a connection lost
//! mid-batch leaves either nothing (the batch is sent again) or everything (sent again too,
//! as duplicates). Batches are sent one after another, so entries reach their streams in
//! commit order.
//!
//! How replies are read:
//!
//! - an error while queueing (`OOM`, `LOADING`, …) aborts the transaction: transient errors
//!   fail the batch for a retry; `NOPERM` (the ACL user may not write the stream) is a
//!   refusal of the stream, retried and reported, never dead-lettered; any other error that
//!   concerns only that entry dead-letters it, and the rest of the batch is sent again
//!   without it;
//! - an error from `EXEC` for one entry (`WRONGTYPE`: the key is not a stream) dead-letters
//!   that entry in a second transaction;
//! - a dead-letter entry that Redis refuses is a permanent error: nothing is dropped.
//!
//! With `wait_replicas = N`, `WAIT N timeout` follows each batch; fewer replicas than `N`
//! fails the batch for a retry.
//!
//! A `rediss://` URL connects over TLS (rustls), against the system's roots or the CA of
//! `[sink.redis] ca_file`, with a client certificate when the server asks for one; a certificate the
//! client does not trust is a permanent error that names the setting to fix. An ACL user and
//! password go in the URL (`rediss://user:password@host:port`).
//!
//! # Effectively-once
//!
//! With `effectively_once`, a batch is one Lua script that adds its entries and moves, in the
//! same step, a marker of the last event written, kept per WAL history in the hash
//! `offsets_key`; events the marker covers are not written again (see `effectively_once`).
//! Entry ids stay Redis' own, so streams may be shared with other writers and other
//! services.
//!
//! An event larger than `max_event_bytes` is dead-lettered as `too_large` before it is sent:
//! Redis answers an argument over its `proto-max-bulk-len` by closing the connection, which
//! would otherwise look like an outage and stall the stream. Its dead-letter entry carries an
//! empty payload (and empty headers if those are too large too), and is reported in
//! `Delivery::payload_omitted`: outboxd keeps the whole event in Postgres
//! (`outboxd.dead_letters`) before it counts it as delivered.

//!
//! The files: `config` (the section `[sink.redis]` and the plugin), `transaction`
//! (`MULTI`/`EXEC` batches), `effectively_once` (the marker and its script), `reply` (reading
//! Redis' replies and errors).

mod config;
mod effectively_once;
mod reply;
mod transaction;

pub use config::{Redis, RedisConfig, RedisFields, RedisSection, RedisTls};
pub use effectively_once::SCRIPT as EFFECTIVELY_ONCE_SCRIPT;

use bytes::Bytes;
use outboxd_core::{Delivery, Event, Ledger, Poison, PoisonKind, Record, Sink, SinkError};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisError};

use crate::cloudevents::{self, Envelope};
use crate::dead_letter;
use reply::classify;

/// Publishes batches to Redis Streams.
pub struct RedisSink {
    client: Client,
    config: RedisConfig,
    conn: Option<MultiplexedConnection>,
    script: redis::Script,
    /// Effectively-once: this history's marker as last read or written; `None` until read,
    /// and after anything that may have moved it unseen.
    marker: Option<effectively_once::MarkerState>,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("stream_prefix", &self.config.stream_prefix)
            .field("dead_letter", &self.config.dead_letter)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisSink {
    /// Checks the URL; connects on first use.
    pub fn new(config: RedisConfig) -> Result<Self, SinkError> {
        let invalid = |e| SinkError::permanent("sink.redis.url is not a valid Redis URL", e);
        // TCP_NODELAY: a batch is one write followed by a wait for its reply; Nagle's
        // algorithm would hold back a partial segment until the previous one is acknowledged.
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(invalid)?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        let client = if config.tls.is_set() {
            if !tls {
                return Err(SinkError::permanent(
                    "sink.redis.ca_file, cert_file and key_file need a rediss:// URL",
                    std::io::Error::other("sink.redis.url is not rediss://"),
                ));
            }
            Client::build_with_tls(info, config.tls.certificates()?).map_err(|e| {
                SinkError::permanent(
                    "sink.redis.ca_file, cert_file or key_file cannot be used",
                    e,
                )
            })?
        } else {
            Client::open(info).map_err(invalid)?
        };
        Ok(RedisSink {
            client,
            config,
            conn: None,
            script: redis::Script::new(effectively_once::SCRIPT),
            marker: None,
        })
    }

    async fn connection(&mut self) -> Result<&mut MultiplexedConnection, SinkError> {
        if self.conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.config.timeout))
                .set_response_timeout(Some(self.config.timeout));
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| classify("connecting to Redis", e))?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connection was just set"))
    }

    /// The stream an entry goes to.
    fn stream(&self, record: &Record, poison: Option<&Poison>) -> String {
        match poison {
            None => format!("{}{}", self.config.stream_prefix, record.event.topic),
            Some(_) => self.config.dead_letter.clone(),
        }
    }

    /// Appends an entry's field/value pairs to `cmd` (after its id); returns how many pairs.
    fn fields(&self, cmd: &mut redis::Cmd, record: &Record, poison: Option<&Poison>) -> usize {
        let fields = self.entry(record, poison);
        for (name, value) in &fields {
            cmd.arg(*name).arg(value.as_ref());
        }
        fields.len()
    }

    /// An entry's field/value pairs, in order (the values share the event's buffers).
    pub(super) fn entry<'a>(
        &'a self,
        record: &'a Record,
        poison: Option<&Poison>,
    ) -> Vec<(&'a str, Bytes)> {
        let event = &record.event;
        if poison.is_none()
            && self.config.envelope != Envelope::Plain
            && let Ok(fields) = self.cloudevent_entry(event)
        {
            return fields;
        }
        // A dead letter too large for Redis keeps its context, not its body.
        let oversized = poison.is_some() && entry_bytes(event) > self.config.max_event_bytes;
        let payload = if oversized {
            Bytes::new()
        } else {
            event.payload.clone()
        };
        let headers = if oversized && event.headers.json.len() > self.config.max_event_bytes / 2 {
            Bytes::from_static(b"{}")
        } else {
            event.headers.json.clone()
        };
        let values: [Option<Bytes>; 6] = [
            Some(event.id.clone()),
            Some(event.event_type.clone()),
            Some(event.key.clone()),
            Some(payload),
            Some(headers),
            event.time_millis.map(|ms| Bytes::from(ms.to_string())),
        ];
        let mut fields = Vec::with_capacity(12 + event.attributes.len());
        for ((_, name), value) in self.config.fields.names().into_iter().zip(values) {
            if let Some(value) = value.filter(|_| !name.is_empty()) {
                fields.push((name, value));
            }
        }
        fields.extend(
            event
                .attributes
                .iter()
                .map(|(n, v)| (n.as_str(), v.clone())),
        );
        if let Some(poison) = poison {
            fields.extend(dead_letter::context(event, poison));
        }
        fields
    }

    /// A CloudEvent's entry (see docs/formats.md): in binary mode one field per attribute,
    /// `partitionkey` (the key), `data` (the payload); in structured mode one field
    /// `cloudevent` holding the JSON document, and `partitionkey`. Then, in both, the row's
    /// headers (`headers`, a JSON object) and `[route.headers]`.
    fn cloudevent_entry<'a>(&self, event: &'a Event) -> Result<Vec<(&'a str, Bytes)>, Poison> {
        let source = &self.config.source;
        let mut fields: Vec<(&str, Bytes)> = Vec::with_capacity(10 + event.attributes.len());
        if self.config.envelope == Envelope::CloudEventsStructured {
            fields.push(("cloudevent", cloudevents::structured(event, source)?));
        } else {
            fields.extend(cloudevents::attributes(event, source)?);
            let content_type = cloudevents::content_type(&event.payload);
            fields.push((
                "datacontenttype",
                Bytes::from_static(content_type.as_bytes()),
            ));
        }
        if !event.key.is_empty() {
            fields.push(("partitionkey", event.key.clone()));
        }
        if self.config.envelope == Envelope::CloudEvents {
            fields.push(("data", event.payload.clone()));
        }
        fields.push(("headers", event.headers.json.clone()));
        fields.extend(
            event
                .attributes
                .iter()
                .map(|(n, v)| (n.as_str(), v.clone())),
        );
        Ok(fields)
    }

    /// Dead-letters, before anything is sent, the events of the batch over `max_event_bytes`
    /// and those the envelope cannot carry (a CloudEvent without a type).
    fn reject_unpublishable(&self, ledger: &mut Ledger<'_>) {
        let limit = self.config.max_event_bytes;
        for (i, r) in ledger.batch().iter().enumerate() {
            if r.poison.is_some() {
                // Already a dead letter: too large, it goes without its payload.
                if entry_bytes(&r.event) > limit && !r.event.payload.is_empty() {
                    ledger.omit_payload(i);
                }
                continue;
            }
            if self.config.envelope != Envelope::Plain
                && let Err(poison) = cloudevents::attributes(&r.event, &self.config.source)
            {
                ledger.reject(i, poison);
                continue;
            }
            let size = entry_bytes(&r.event);
            if size > limit {
                let detail = format!(
                    "the event is {size} bytes, over sink.redis.max_event_bytes = {limit}; its \
                     payload is not copied here: the whole event is kept in Postgres, table \
                     outboxd.dead_letters"
                );
                ledger.reject(i, Poison::new(PoisonKind::TooLarge, detail));
                ledger.omit_payload(i);
            }
        }
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Delivery, SinkError> {
        let mut ledger = Ledger::new(batch);
        self.reject_unpublishable(&mut ledger);
        if self.config.effectively_once {
            self.send_effectively_once(&mut ledger).await?;
        } else {
            self.send_at_least_once(&mut ledger).await?;
        }
        self.wait_for_replicas().await?;
        Ok(ledger.finish())
    }

    async fn ping(&mut self) -> Result<(), SinkError> {
        let conn = self.connection().await?;
        let res: Result<String, RedisError> = redis::cmd("PING").query_async(conn).await;
        if let Err(e) = res {
            self.conn = None;
            return Err(classify("pinging Redis", e));
        }
        Ok(())
    }
}

/// The bytes an event's stream entry takes.
fn entry_bytes(event: &Event) -> usize {
    event.payload.len()
        + event.headers.json.len()
        + event.id.len()
        + event.key.len()
        + event.event_type.len()
        + event.topic.len()
        + event
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}
