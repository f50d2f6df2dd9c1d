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
//!   fail the batch for a retry; an error that concerns only that entry (`NOPERM` on one
//!   stream) dead-letters it, and the rest of the batch is sent again without it;
//! - an error from `EXEC` for one entry (`WRONGTYPE`: the key is not a stream) dead-letters
//!   that entry in a second transaction;
//! - a dead-letter entry that Redis refuses is a permanent error: nothing is dropped.
//!
//! With `wait_replicas = N`, `WAIT N timeout` follows each batch; fewer replicas than `N`
//! fails the batch for a retry.
//!
//! An event larger than `max_event_bytes` is dead-lettered as `too_large` before it is sent:
//! Redis answers an argument over its `proto-max-bulk-len` by closing the connection, which
//! would otherwise look like an outage and stall the stream. Its dead-letter entry carries an
//! empty payload (and empty headers if those are too large too); the row is in the outbox
//! table under its id.

use std::time::Duration;

use outboxd_core::{Delivery, Poison, PoisonKind, Record, Sink, SinkError};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, ServerError, Value};

use crate::dead_letter;

/// Redis sink settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
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
}

/// Server error codes that pass: retry the batch.
const TRANSIENT_CODES: &[&str] = &[
    "OOM",
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "MASTERDOWN",
    "READONLY",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "MISCONF",
];

/// Server error codes that concern the connection, not one entry.
const PERMANENT_CODES: &[&str] = &["NOAUTH", "WRONGPASS"];

/// Publishes batches to Redis Streams.
pub struct RedisSink {
    client: Client,
    config: RedisConfig,
    conn: Option<MultiplexedConnection>,
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

/// What a transaction's replies said.
enum Outcome {
    /// Executed; the entries that failed, with Redis' error.
    Executed(Vec<(usize, ServerError)>),
    /// Aborted while queueing; the entries whose queueing failed.
    Aborted(Vec<(usize, ServerError)>),
}

impl RedisSink {
    /// Checks the URL; connects on first use.
    pub fn new(config: RedisConfig) -> Result<Self, SinkError> {
        let client = Client::open(config.url.as_str())
            .map_err(|e| SinkError::permanent("sink.redis.url is not a valid Redis URL", e))?;
        Ok(RedisSink {
            client,
            config,
            conn: None,
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

    /// Runs `pipe` (`MULTI`, `entries` commands, `EXEC`) and reads its replies.
    async fn transact(
        &mut self,
        pipe: &redis::Pipeline,
        entries: usize,
    ) -> Result<Outcome, SinkError> {
        let conn = self.connection().await?;
        let replies = match conn.req_packed_commands(pipe, 0, entries + 2).await {
            Ok(replies) => replies,
            Err(e) => {
                self.conn = None;
                return Err(classify("sending a batch to Redis", e));
            }
        };
        if replies.len() != entries + 2 {
            self.conn = None;
            return Err(SinkError::transient(
                "reading Redis replies",
                format!("expected {} replies, got {}", entries + 2, replies.len()),
            ));
        }
        if let Value::ServerError(e) = &replies[0] {
            return Err(server_error("starting a Redis transaction (MULTI)", e));
        }
        let queue_errors: Vec<(usize, ServerError)> = replies[1..=entries]
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v {
                Value::ServerError(e) => Some((i, e.clone())),
                _ => None,
            })
            .collect();
        match &replies[entries + 1] {
            Value::Array(results) if queue_errors.is_empty() && results.len() == entries => {
                Ok(Outcome::Executed(
                    results
                        .iter()
                        .enumerate()
                        .filter_map(|(i, v)| match v {
                            Value::ServerError(e) => Some((i, e.clone())),
                            _ => None,
                        })
                        .collect(),
                ))
            }
            Value::ServerError(_) if !queue_errors.is_empty() => Ok(Outcome::Aborted(queue_errors)),
            Value::ServerError(e) => Err(server_error("committing a Redis transaction (EXEC)", e)),
            other => {
                self.conn = None;
                Err(SinkError::transient(
                    "reading the EXEC reply",
                    format!("unexpected reply {other:?}"),
                ))
            }
        }
    }

    fn build(&self, pipe: &mut redis::Pipeline, entries: &[(&Record, Option<&Poison>)]) {
        pipe.clear();
        pipe.cmd("MULTI");
        for (record, poison) in entries {
            let event = &record.event;
            let cmd = pipe.cmd("XADD");
            match poison {
                None => cmd.arg(format!("{}{}", self.config.stream_prefix, event.topic)),
                Some(_) => cmd.arg(&self.config.dead_letter),
            };
            if self.config.maxlen > 0 {
                cmd.arg("MAXLEN").arg("~").arg(self.config.maxlen);
            }
            // A dead letter too large for Redis keeps its context, not its body.
            let oversized = poison.is_some() && entry_bytes(event) > self.config.max_event_bytes;
            let payload: &[u8] = if oversized { b"" } else { &event.payload };
            let headers: &[u8] =
                if oversized && event.headers.json.len() > self.config.max_event_bytes / 2 {
                    b"{}"
                } else {
                    &event.headers.json
                };
            cmd.arg("*")
                .arg("id")
                .arg(event.id.as_ref())
                .arg("type")
                .arg(event.event_type.as_ref())
                .arg("key")
                .arg(event.key.as_ref())
                .arg("payload")
                .arg(payload)
                .arg("headers")
                .arg(headers);
            if let Some(poison) = poison {
                for (name, value) in dead_letter::context(event, poison) {
                    cmd.arg(name).arg(value.as_ref());
                }
            }
        }
        pipe.cmd("EXEC");
    }

    async fn wait_for_replicas(&mut self) -> Result<(), SinkError> {
        let (want, timeout) = (self.config.wait_replicas, self.config.wait_timeout);
        if want == 0 {
            return Ok(());
        }
        let conn = self.connection().await?;
        let got: i64 = match redis::cmd("WAIT")
            .arg(want)
            .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
            .query_async(conn)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                self.conn = None;
                return Err(classify("waiting for Redis replicas (WAIT)", e));
            }
        };
        if got < i64::from(want) {
            return Err(SinkError::transient(
                "waiting for Redis replicas (WAIT)",
                format!("{got} of {want} replicas acknowledged within {timeout:?}"),
            ));
        }
        Ok(())
    }
}

impl Sink for RedisSink {
    async fn send(&mut self, batch: &[Record]) -> Result<Delivery, SinkError> {
        let limit = self.config.max_event_bytes;
        let mut rejected: Vec<(usize, Poison)> = batch
            .iter()
            .enumerate()
            .filter(|(_, r)| r.poison.is_none() && entry_bytes(&r.event) > limit)
            .map(|(i, r)| {
                let size = entry_bytes(&r.event);
                let detail = format!(
                    "the event is {size} bytes, over sink.redis.max_event_bytes = {limit}; \
                     its payload is not copied here: read it from the outbox table by id"
                );
                (i, Poison::new(PoisonKind::TooLarge, detail))
            })
            .collect();
        let mut pipe = redis::pipe();
        // Each round either succeeds or rejects at least one more entry, so this ends.
        let executed_errors = loop {
            let entries: Vec<(&Record, Option<&Poison>)> = batch
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let poison = r
                        .poison
                        .as_ref()
                        .or_else(|| rejected.iter().find(|(j, _)| *j == i).map(|(_, p)| p));
                    (r, poison)
                })
                .collect();
            self.build(&mut pipe, &entries);
            match self.transact(&pipe, entries.len()).await? {
                Outcome::Executed(errors) => break errors,
                Outcome::Aborted(errors) => {
                    let mut newly = Vec::with_capacity(errors.len());
                    for (i, err) in errors {
                        if entries[i].1.is_some() {
                            return Err(dead_letter_refused(&self.config.dead_letter, &err));
                        }
                        if is_code(&err, TRANSIENT_CODES) {
                            return Err(server_error("queueing a batch in Redis", &err));
                        }
                        newly.push((i, rejection(&err)));
                    }
                    rejected.extend(newly);
                }
            }
        };

        // Entries Redis refused when executing: dead-letter them in a second transaction.
        let mut late = Vec::new();
        for (i, err) in executed_errors {
            if batch[i].poison.is_some() || rejected.iter().any(|(j, _)| *j == i) {
                return Err(dead_letter_refused(&self.config.dead_letter, &err));
            }
            rejected.push((i, rejection(&err)));
            late.push(i);
        }
        if !late.is_empty() {
            let entries: Vec<(&Record, Option<&Poison>)> = late
                .iter()
                .map(|&i| {
                    let poison = rejected.iter().find(|(j, _)| *j == i).map(|(_, p)| p);
                    (&batch[i], poison)
                })
                .collect();
            self.build(&mut pipe, &entries);
            match self.transact(&pipe, entries.len()).await? {
                Outcome::Executed(errors) | Outcome::Aborted(errors) => {
                    if let Some((_, err)) = errors.first() {
                        return Err(dead_letter_refused(&self.config.dead_letter, err));
                    }
                }
            }
        }

        self.wait_for_replicas().await?;
        rejected.sort_by_key(|(i, _)| *i);
        Ok(Delivery { rejected })
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
fn entry_bytes(event: &outboxd_core::Event) -> usize {
    event.payload.len()
        + event.headers.json.len()
        + event.id.len()
        + event.key.len()
        + event.event_type.len()
        + event.topic.len()
}

fn is_code(err: &ServerError, codes: &[&str]) -> bool {
    codes.contains(&err.code())
}

fn rejection(err: &ServerError) -> Poison {
    Poison::new(
        PoisonKind::Rejected,
        format!(
            "redis refused the entry: {} {}",
            err.code(),
            err.details().unwrap_or_default()
        ),
    )
}

fn dead_letter_refused(stream: &str, err: &ServerError) -> SinkError {
    SinkError::permanent(
        "the dead-letter stream refused an entry (check sink.dead_letter names a stream the \
         Redis user may write)",
        format!("stream {stream:?}: {err}"),
    )
}

fn server_error(what: &'static str, err: &ServerError) -> SinkError {
    let source = format!("{err}");
    if is_code(err, PERMANENT_CODES) {
        SinkError::permanent(what, source)
    } else {
        SinkError::transient(what, source)
    }
}

fn classify(what: &'static str, err: RedisError) -> SinkError {
    let permanent = matches!(
        err.kind(),
        ErrorKind::InvalidClientConfig | ErrorKind::AuthenticationFailed
    ) || err.code().is_some_and(|c| PERMANENT_CODES.contains(&c));
    if permanent {
        SinkError::permanent(what, err)
    } else {
        SinkError::transient(what, err)
    }
}
