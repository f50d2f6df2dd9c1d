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
//! A `rediss://` URL connects over TLS (rustls), against the system's roots or the CA of
//! [`RedisTls`], with a client certificate when the server asks for one; a certificate the
//! client does not trust is a permanent error that names the setting to fix. An ACL user and
//! password go in the URL (`rediss://user:password@host:port`).
//!
//! # Effectively-once
//!
//! With `effectively_once`, each entry's id is not `*` but its WAL position:
//! `<commit LSN as a number>-<index in the transaction>`. Events reach a stream in commit
//! order, so ids only grow, and a replay after a crash writes an id that is not greater than
//! the stream's top: Redis refuses it ("equal or smaller than the target stream top item"),
//! and that refusal, and only that one, counts as "already delivered". Dead-letter entries get
//! the same id in the dead-letter stream.
//!
//! A batch with no entry for the dead-letter stream is one `MULTI`/`EXEC`, as in
//! at-least-once mode but with explicit ids: an entry refused when executing is dead-lettered
//! afterwards, which is safe because nothing of the batch is in the dead-letter stream. A batch
//! with dead-letter entries is one Lua script ([`EFFECTIVELY_ONCE_SCRIPT`]): it adds the
//! entries in order and stops at the first entry Redis refuses for another reason, so that the
//! entry can be dead-lettered *before* any later dead-letter entry (whose larger id would make
//! the dead-letter stream refuse it). The script is not atomic across a crash or a transient
//! error, and need not be: whatever it added is refused as a duplicate on the retry.
//!
//! The refusal proves delivery only if every id in the stream is one of outboxd's. An id
//! beyond the server's WAL position (for example a `*` id, a millisecond timestamp, added by
//! another writer) cannot be, so a refusal by such a stream is a permanent error that names
//! it, never "already delivered": the stream must have outboxd as its only writer.
//!
//! An event larger than `max_event_bytes` is dead-lettered as `too_large` before it is sent:
//! Redis answers an argument over its `proto-max-bulk-len` by closing the connection, which
//! would otherwise look like an outage and stall the stream. Its dead-letter entry carries an
//! empty payload (and empty headers if those are too large too); the row is in the outbox
//! table under its id.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outboxd_core::{Delivery, Lsn, Poison, PoisonKind, Record, Sink, SinkError, WalHorizon};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, ErrorKind, IntoConnectionInfo, RedisError, ServerError, Value,
};

use crate::dead_letter;

/// Redis sink settings.
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
    /// Entry ids derived from the WAL position, so that replays are refused by Redis.
    pub effectively_once: bool,
    /// How far the server's WAL is known to reach: no id outboxd wrote can be beyond it.
    pub wal_horizon: WalHorizon,
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

    fn certificates(&self) -> Result<redis::TlsCertificates, SinkError> {
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

/// Adds a batch's entries in order (effectively-once mode).
///
/// `KEYS[i]`: the stream of entry `i`. `ARGV[1]`: `MAXLEN ~` value, `0` for none; then for
/// each entry: the number of field pairs, the entry id, the fields. Returns
/// `{processed, error, duplicates}`: `error` is empty when every entry was handled, else the
/// error of entry `processed` (0-based), which was not added and after which nothing was
/// tried; `duplicates` holds, for each entry refused as not above its stream's top, its index
/// and that stream's last generated id.
pub const EFFECTIVELY_ONCE_SCRIPT: &str = r"
local maxlen = ARGV[1]
local a = 2
local dups = {}
local tops = {}
for i = 1, #KEYS do
  local pairs_n = tonumber(ARGV[a])
  local cmd = {'XADD', KEYS[i]}
  if maxlen ~= '0' then
    cmd[#cmd + 1] = 'MAXLEN'
    cmd[#cmd + 1] = '~'
    cmd[#cmd + 1] = maxlen
  end
  for j = a + 1, a + 1 + 2 * pairs_n do
    cmd[#cmd + 1] = ARGV[j]
  end
  a = a + 2 + 2 * pairs_n
  local r = redis.pcall(unpack(cmd))
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'equal or smaller than the target stream top', 1, true) then
      local top = tops[KEYS[i]]
      if not top then
        top = ''
        local info = redis.call('XINFO', 'STREAM', KEYS[i])
        for k = 1, #info, 2 do
          if info[k] == 'last-generated-id' then top = info[k + 1] end
        end
        tops[KEYS[i]] = top
      end
      dups[#dups + 1] = i - 1
      dups[#dups + 1] = top
    else
      return {i - 1, r.err, dups}
    end
  end
end
return {#KEYS, '', dups}
";

/// How Redis refuses an entry id that is not above its stream's top.
const DUPLICATE_ID: &str = "equal or smaller than the target stream top";

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
    script: redis::Script,
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
            script: redis::Script::new(EFFECTIVELY_ONCE_SCRIPT),
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

    /// The stream an entry goes to.
    fn stream(&self, record: &Record, poison: Option<&Poison>) -> String {
        match poison {
            None => format!("{}{}", self.config.stream_prefix, record.event.topic),
            Some(_) => self.config.dead_letter.clone(),
        }
    }

    /// Appends an entry's field/value pairs to `cmd` (after its id); returns how many pairs.
    fn fields(&self, cmd: &mut redis::Cmd, record: &Record, poison: Option<&Poison>) -> usize {
        let event = &record.event;
        // A dead letter too large for Redis keeps its context, not its body.
        let oversized = poison.is_some() && entry_bytes(event) > self.config.max_event_bytes;
        let payload: &[u8] = if oversized { b"" } else { &event.payload };
        let headers: &[u8] =
            if oversized && event.headers.json.len() > self.config.max_event_bytes / 2 {
                b"{}"
            } else {
                &event.headers.json
            };
        cmd.arg("id")
            .arg(event.id.as_ref())
            .arg("type")
            .arg(event.event_type.as_ref())
            .arg("key")
            .arg(event.key.as_ref())
            .arg("payload")
            .arg(payload)
            .arg("headers")
            .arg(headers);
        let mut pairs = 5;
        if let Some(poison) = poison {
            for (name, value) in dead_letter::context(event, poison) {
                cmd.arg(name).arg(value.as_ref());
                pairs += 1;
            }
        }
        pairs
    }

    /// `MULTI`, one `XADD` per entry (with `*` ids, or with [`entry_id`]s when
    /// `explicit_ids`), `EXEC`.
    fn build(
        &self,
        pipe: &mut redis::Pipeline,
        entries: &[(&Record, Option<&Poison>)],
        explicit_ids: bool,
    ) {
        pipe.clear();
        pipe.cmd("MULTI");
        for (record, poison) in entries {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(self.stream(record, *poison));
            if self.config.maxlen > 0 {
                cmd.arg("MAXLEN").arg("~").arg(self.config.maxlen);
            }
            if explicit_ids {
                cmd.arg(entry_id(record));
            } else {
                cmd.arg("*");
            }
            self.fields(&mut cmd, record, *poison);
            pipe.add_command(cmd);
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
        let rejected = self.too_large(batch);
        let delivery = if self.config.effectively_once {
            self.send_effectively_once(batch, rejected).await?
        } else {
            self.send_at_least_once(batch, rejected).await?
        };
        self.wait_for_replicas().await?;
        Ok(delivery)
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

impl RedisSink {
    /// The events of `batch` over `max_event_bytes`: dead-lettered without being sent.
    fn too_large(&self, batch: &[Record]) -> Vec<(usize, Poison)> {
        let limit = self.config.max_event_bytes;
        batch
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
            .collect()
    }

    /// `MULTI`/`EXEC` batches with `*` ids.
    async fn send_at_least_once(
        &mut self,
        batch: &[Record],
        mut rejected: Vec<(usize, Poison)>,
    ) -> Result<Delivery, SinkError> {
        let mut pipe = redis::pipe();
        // Each round either succeeds or rejects at least one more entry, so this ends.
        let executed_errors = loop {
            let entries: Vec<(&Record, Option<&Poison>)> = batch
                .iter()
                .enumerate()
                .map(|(i, r)| (r, poison_of(r, i, &rejected)))
                .collect();
            self.build(&mut pipe, &entries, false);
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
            self.build(&mut pipe, &entries, false);
            match self.transact(&pipe, entries.len()).await? {
                Outcome::Executed(errors) | Outcome::Aborted(errors) => {
                    if let Some((_, err)) = errors.first() {
                        return Err(dead_letter_refused(&self.config.dead_letter, err));
                    }
                }
            }
        }

        rejected.sort_by_key(|(i, _)| *i);
        Ok(Delivery {
            rejected,
            duplicates: Vec::new(),
        })
    }

    /// Entry ids from the WAL position: see the module documentation.
    ///
    /// A batch with nothing for the dead-letter stream (the usual case) is one `MULTI`/`EXEC`
    /// with explicit ids: a transient error aborts it whole, and an entry refused when
    /// executing (`WRONGTYPE`) can be dead-lettered afterwards, since nothing of the batch is
    /// in the dead-letter stream yet. Any other batch goes through [`EFFECTIVELY_ONCE_SCRIPT`].
    async fn send_effectively_once(
        &mut self,
        batch: &[Record],
        mut rejected: Vec<(usize, Poison)>,
    ) -> Result<Delivery, SinkError> {
        if !rejected.is_empty() || batch.iter().any(|r| r.poison.is_some()) {
            return self.send_scripted(batch, rejected).await;
        }
        let entries: Vec<(&Record, Option<&Poison>)> = batch.iter().map(|r| (r, None)).collect();
        let mut pipe = redis::pipe();
        self.build(&mut pipe, &entries, true);
        let errors = match self.transact(&pipe, entries.len()).await? {
            Outcome::Executed(errors) => errors,
            Outcome::Aborted(errors) => {
                // Nothing was added. Entries refused alone go to the dead-letter stream.
                for (i, err) in errors {
                    if is_code(&err, TRANSIENT_CODES) || is_code(&err, PERMANENT_CODES) {
                        return Err(server_error("queueing a batch in Redis", &err));
                    }
                    rejected.push((i, rejection(&err)));
                }
                return self.send_scripted(batch, rejected).await;
            }
        };
        let mut duplicates: Vec<usize> = Vec::new();
        let mut tops: Vec<(String, String)> = Vec::new();
        for (i, err) in errors {
            if err.to_string().contains(DUPLICATE_ID) {
                let stream = self.stream(&batch[i], None);
                let top = match tops.iter().find(|(s, _)| *s == stream) {
                    Some((_, top)) => top.clone(),
                    None => {
                        let top = self.stream_top(&stream).await?.unwrap_or_default();
                        tops.push((stream, top.clone()));
                        top
                    }
                };
                self.check_top(&batch[i], &top)?;
                duplicates.push(i);
            } else {
                // Never retried: later entries of its stream are in, so a retry would be
                // refused as "already delivered". Dead-lettered, as in at-least-once mode.
                rejected.push((i, rejection(&err)));
            }
        }
        if !rejected.is_empty() {
            let letters: Vec<Record> = rejected
                .iter()
                .map(|(i, p)| Record::dead_letter(batch[*i].event.clone(), p.clone()))
                .collect();
            let written = self.send_scripted(&letters, Vec::new()).await?;
            for k in written.duplicates {
                duplicates.push(rejected[k].0);
            }
            rejected.retain(|(i, _)| !duplicates.contains(i));
        }
        duplicates.sort_unstable();
        Ok(Delivery {
            rejected,
            duplicates,
        })
    }

    /// The last generated id of `stream` (`None` when Redis does not report one).
    async fn stream_top(&mut self, stream: &str) -> Result<Option<String>, SinkError> {
        let conn = self.connection().await?;
        let info: Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(stream)
            .query_async(conn)
            .await
            .map_err(|e| classify("reading a stream's newest id (XINFO STREAM)", e))?;
        Ok(reply_field(&info, b"last-generated-id"))
    }

    /// Entry ids from the WAL position, through [`EFFECTIVELY_ONCE_SCRIPT`].
    async fn send_scripted(
        &mut self,
        batch: &[Record],
        mut rejected: Vec<(usize, Poison)>,
    ) -> Result<Delivery, SinkError> {
        let mut duplicates: Vec<usize> = Vec::new();
        let mut start = 0;
        // Each round ends the batch or dead-letters one more entry, so this ends.
        while start < batch.len() {
            let round = self.script_round(batch, start, &rejected).await?;
            for (i, top) in round.duplicates {
                self.check_top(&batch[start + i], &top)?;
                duplicates.push(start + i);
            }
            let Some((processed, error)) = round.error else {
                break;
            };
            let i = start + processed;
            let poisoned = batch[i].poison.is_some() || rejected.iter().any(|(j, _)| *j == i);
            let code = error.split_whitespace().next().unwrap_or("");
            if poisoned {
                return Err(SinkError::permanent(
                    "the dead-letter stream refused an entry (check sink.dead_letter names a \
                     stream the Redis user may write)",
                    format!("stream {:?}: {error}", self.config.dead_letter),
                ));
            }
            if TRANSIENT_CODES.contains(&code) || PERMANENT_CODES.contains(&code) {
                let what = "adding a batch to Redis (effectively-once script)";
                return Err(if PERMANENT_CODES.contains(&code) {
                    SinkError::permanent(what, error)
                } else {
                    SinkError::transient(what, error)
                });
            }
            rejected.push((
                i,
                Poison::new(
                    PoisonKind::Rejected,
                    format!("redis refused the entry: {error}"),
                ),
            ));
            start = i;
        }
        rejected.retain(|(i, _)| !duplicates.contains(i));
        rejected.sort_by_key(|(i, _)| *i);
        Ok(Delivery {
            rejected,
            duplicates,
        })
    }

    /// Runs the script on `batch[start..]`.
    async fn script_round(
        &mut self,
        batch: &[Record],
        start: usize,
        rejected: &[(usize, Poison)],
    ) -> Result<ScriptRound, SinkError> {
        let entries: Vec<(&Record, Option<&Poison>)> = batch[start..]
            .iter()
            .enumerate()
            .map(|(k, r)| (r, poison_of(r, start + k, rejected)))
            .collect();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(entries.len());
        self.script_args(&mut cmd, &entries);
        let reply = match self.query_script(&cmd).await? {
            Some(reply) => reply,
            None => {
                // The script is not in Redis' cache (a restart, SCRIPT FLUSH): send it whole.
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(EFFECTIVELY_ONCE_SCRIPT).arg(entries.len());
                self.script_args(&mut cmd, &entries);
                self.query_script(&cmd).await?.ok_or_else(|| {
                    SinkError::transient(
                        "running the effectively-once script",
                        "NOSCRIPT after EVAL",
                    )
                })?
            }
        };
        ScriptRound::parse(&reply)
    }

    fn script_args(&self, cmd: &mut redis::Cmd, entries: &[(&Record, Option<&Poison>)]) {
        for (record, poison) in entries {
            cmd.arg(self.stream(record, *poison));
        }
        cmd.arg(self.config.maxlen);
        for (record, poison) in entries {
            let pairs = if poison.is_some() { 11 } else { 5 };
            cmd.arg(pairs).arg(entry_id(record));
            let written = self.fields(cmd, record, *poison);
            debug_assert_eq!(written, pairs);
        }
    }

    /// Sends a script command; `None` when Redis does not have the script cached.
    async fn query_script(&mut self, cmd: &redis::Cmd) -> Result<Option<Value>, SinkError> {
        let conn = self.connection().await?;
        match cmd.query_async::<Value>(conn).await {
            Ok(Value::ServerError(e)) if e.code() == "NOSCRIPT" => Ok(None),
            Ok(Value::ServerError(e)) => {
                Err(server_error("running the effectively-once script", &e))
            }
            Ok(reply) => Ok(Some(reply)),
            Err(e) if e.code() == Some("NOSCRIPT") => Ok(None),
            Err(e) if e.code().is_some() => {
                // A server error: the connection is fine.
                Err(classify("running the effectively-once script", e))
            }
            Err(e) => {
                self.conn = None;
                Err(classify("running the effectively-once script", e))
            }
        }
    }

    /// A stream refused `record` as not above its top `top`: that proves the record is there
    /// only if `top` can be an id outboxd wrote, that is, not beyond the server's WAL.
    fn check_top(&self, record: &Record, top: &str) -> Result<(), SinkError> {
        let top_ms = id_ms(top);
        let Some(horizon) = self.config.wal_horizon.get() else {
            return Err(SinkError::transient(
                "judging a replayed entry",
                "the server's WAL position is not known yet",
            ));
        };
        let horizon = horizon.max(record.event.position.commit_lsn);
        match top_ms {
            Some(ms) if ms <= horizon.get() => Ok(()),
            _ => Err(SinkError::permanent(
                "a Redis stream holds entries outboxd did not write; with sink.delivery = \
                 \"effectively-once\" outboxd must be the only writer of its streams (entry ids \
                 are WAL positions). Remove the foreign entries' stream or use another \
                 sink.redis.stream_prefix",
                format!(
                    "stream {:?} refused entry {} because its newest id is {top:?}, beyond the \
                     server's WAL position {horizon} ({}): not an id outboxd wrote",
                    self.stream(record, record.poison.as_ref()),
                    entry_id(record),
                    horizon.get()
                ),
            )),
        }
    }

    /// Streams matching `patterns` whose newest id is beyond `wal` (so not written by
    /// outboxd in effectively-once mode), with that id; for `outboxd check`. Looks at no more
    /// than `limit` streams.
    pub async fn foreign_streams(
        &mut self,
        patterns: &[String],
        wal: Lsn,
        limit: usize,
    ) -> Result<Vec<(String, String)>, SinkError> {
        let conn = self.connection().await?;
        let err = |e| classify("scanning Redis streams", e);
        let mut names: Vec<String> = Vec::new();
        for pattern in patterns {
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("TYPE")
                    .arg("stream")
                    .query_async(conn)
                    .await
                    .map_err(err)?;
                for name in batch {
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
                cursor = next;
                if cursor == 0 || names.len() >= limit {
                    break;
                }
            }
        }
        names.truncate(limit);
        let mut foreign = Vec::new();
        for name in names {
            let Some(top) = self.stream_top(&name).await? else {
                continue;
            };
            if id_ms(&top).is_none_or(|ms| ms > wal.get()) {
                foreign.push((name, top));
            }
        }
        Ok(foreign)
    }
}

/// The value of `name` in a field/value reply (a flat array in RESP2, a map in RESP3), as
/// text.
fn reply_field(reply: &Value, name: &[u8]) -> Option<String> {
    let text = |v: &Value| k_bytes(v).map(|b| String::from_utf8_lossy(b).into_owned());
    match reply {
        Value::Array(flat) => flat
            .chunks(2)
            .find(|kv| kv.len() == 2 && k_bytes(&kv[0]) == Some(name))
            .and_then(|kv| text(&kv[1])),
        Value::Map(map) => map
            .iter()
            .find(|(k, _)| k_bytes(k) == Some(name))
            .and_then(|(_, v)| text(v)),
        _ => None,
    }
}

fn k_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Why record `i` of a batch goes to the dead-letter stream, if it does: its own poison, or
/// the broker's refusal recorded in `rejected`.
fn poison_of<'a>(
    record: &'a Record,
    i: usize,
    rejected: &'a [(usize, Poison)],
) -> Option<&'a Poison> {
    record
        .poison
        .as_ref()
        .or_else(|| rejected.iter().find(|(j, _)| *j == i).map(|(_, p)| p))
}

/// The first part of a stream entry id (`<ms>-<seq>`): in effectively-once mode, a WAL
/// position.
fn id_ms(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

/// The entry id of an event in effectively-once mode: `<commit LSN>-<index>`.
pub fn entry_id(record: &Record) -> String {
    let p = record.event.position;
    format!("{}-{}", p.commit_lsn.get(), p.index)
}

/// What one run of the effectively-once script reported.
#[derive(Debug, Default)]
struct ScriptRound {
    /// `(entry, error)`: the first entry Redis refused for a reason other than its id.
    error: Option<(usize, String)>,
    /// Entries refused as not above their stream's top, with that top id.
    duplicates: Vec<(usize, String)>,
}

impl ScriptRound {
    fn parse(reply: &Value) -> Result<ScriptRound, SinkError> {
        let bad = || {
            SinkError::transient(
                "reading the effectively-once script's reply",
                format!("unexpected reply {reply:?}"),
            )
        };
        let Value::Array(parts) = reply else {
            return Err(bad());
        };
        let [Value::Int(processed), error, Value::Array(dups)] = parts.as_slice() else {
            return Err(bad());
        };
        let error = k_bytes(error).ok_or_else(bad)?;
        let mut round = ScriptRound::default();
        if !error.is_empty() {
            let at = usize::try_from(*processed).map_err(|_| bad())?;
            round.error = Some((at, String::from_utf8_lossy(error).into_owned()));
        }
        for pair in dups.chunks(2) {
            let [Value::Int(i), top] = pair else {
                return Err(bad());
            };
            let i = usize::try_from(*i).map_err(|_| bad())?;
            let top = String::from_utf8_lossy(k_bytes(top).ok_or_else(bad)?).into_owned();
            round.duplicates.push((i, top));
        }
        Ok(round)
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
    // A certificate Redis' client does not trust stays untrusted: say which setting to fix.
    let text = err.to_string();
    if text.contains("invalid peer certificate") {
        let what = if text.contains("UnknownIssuer") {
            "TLS to Redis: the server's certificate is not signed by sink.redis.ca_file (or, \
             without it, by a CA the system trusts)"
        } else if text.contains("not valid for name") || text.contains("NotValidForName") {
            "TLS to Redis: the server's certificate does not cover the host in sink.redis.url"
        } else {
            "TLS to Redis: the server's certificate is refused"
        };
        return SinkError::permanent(what, err);
    }
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
