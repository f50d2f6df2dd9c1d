//! Effectively-once delivery to Redis: a marker per WAL history, moved with the entries in one
//! script, so that a replay is recognised and never written twice.
//!
//! The hash `offsets_key` (`outboxd.offsets`) holds, under the field of the events' WAL
//! history (`<system id>/<database>/<slot>`, [`WalOrigin::key`]), the marker of the last event
//! written: `{"timeline", "commit_lsn", "index"}`. A batch is one Lua script ([`SCRIPT`]),
//! which Redis runs with no other client in between:
//!
//! ```text
//! HGET marker ── not what this sink last read or wrote? ─▶ {-1, current}: someone else
//!      │                                                   wrote (a frozen outboxd woke up);
//!      ▼                                                   read it again, redo the batch
//! XADD each entry in order (ids `*`) ── refused? ─▶ HSET marker = the last entry added;
//!      │                                             {i, error, marker}: entry i was not
//!      ▼                                             added, nor anything after it
//! HSET marker = the batch's last entry; {n, "", marker}
//! ```
//!
//! Before the script, the events the marker covers are skipped as already delivered (a replay
//! after a crash or a Postgres restart), as far as [`WalOrigin::trust`] says the marker is
//! this server's history: a new cluster has another field; a restored server, or a standby
//! promoted without everything the marker covers, skips nothing it cannot prove (said once).
//! Since the marker moves in the same script as the entries, a batch interrupted anywhere (a
//! lost connection, a crash, an entry refused) leaves a marker that says exactly which of its
//! entries are in Redis.
//!
//! An entry Redis refuses alone is dead-lettered in the next round, in order; a dead-letter
//! entry Redis refuses is a permanent error; `OOM`, `LOADING` and the like fail the batch for
//! a retry (what the script added is then skipped by the marker), `NOPERM` is a refusal of the
//! stream (retried, loud).
//!
//! Entry ids are Redis' own (`*`): the streams may have other writers, and events of several
//! histories (two services on one Redis, or one service after a restore) may share a stream.

use outboxd_core::{Ledger, Marker, Poison, Record, SinkError, Trust, WalOrigin};
use redis::Value;

use super::RedisSink;
use super::reply::{ScriptReply, classify, rejection, server_text_error};
use crate::plugin::{CheckLevel, CheckLine};

/// Adds a batch's entries in order and moves its marker (effectively-once mode).
///
/// `KEYS[1]`: the hash of markers; `KEYS[1 + i]`: the stream of entry `i`. `ARGV[1]`: the
/// marker's field; `ARGV[2]`: the value this client expects there (`''`: none); `ARGV[3]`:
/// `MAXLEN ~` value, `0` for none; then for each entry: the marker after it, the number of
/// field pairs, the fields. Returns `{-1, current}` when the marker is not the expected one
/// (nothing done), else `{processed, error, marker}`: `error` is empty when every entry was
/// added, else Redis' error for entry `processed` (0-based), which was not added and after
/// which nothing was tried; `marker` is the marker now stored.
pub const SCRIPT: &str = r"
local field, expected, maxlen = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('HGET', KEYS[1], field)
if not current then current = '' end
if current ~= expected then return {-1, current} end
local written = expected
local a = 4
for i = 2, #KEYS do
  local marker = ARGV[a]
  local pairs_n = tonumber(ARGV[a + 1])
  local cmd = {'XADD', KEYS[i]}
  if maxlen ~= '0' then
    cmd[#cmd + 1] = 'MAXLEN'
    cmd[#cmd + 1] = '~'
    cmd[#cmd + 1] = maxlen
  end
  cmd[#cmd + 1] = '*'
  for j = a + 2, a + 1 + 2 * pairs_n do
    cmd[#cmd + 1] = ARGV[j]
  end
  a = a + 2 + 2 * pairs_n
  local r = redis.pcall(unpack(cmd))
  if type(r) == 'table' and r.err then
    if written ~= expected then redis.call('HSET', KEYS[1], field, written) end
    return {i - 2, r.err, written}
  end
  written = marker
end
if written ~= expected then redis.call('HSET', KEYS[1], field, written) end
return {#KEYS - 1, '', written}
";

/// What this sink knows of its history's marker: the value stored (compared by the script
/// before it writes), and the marker with how much of it this history trusts.
#[derive(Debug, Clone)]
pub(super) struct MarkerState {
    stored: String,
    known: Option<(Marker, Trust)>,
}

impl MarkerState {
    fn covers(&self, record: &Record) -> bool {
        self.known
            .as_ref()
            .is_some_and(|(m, trust)| m.covers(trust, record.event.position))
    }

    /// The state after this sink wrote `stored`, a marker of this history.
    fn written(stored: String) -> Self {
        let known = Marker::from_json(stored.as_bytes()).map(|m| (m, Trust::Whole));
        MarkerState { stored, known }
    }
}

impl RedisSink {
    fn origin(&self) -> Result<&WalOrigin, SinkError> {
        self.config.origin.as_ref().ok_or_else(|| {
            SinkError::permanent(
                "sending in effectively-once mode",
                "this Redis sink was built without the WAL history of a replication session \
                 (a probe); it may only answer pings",
            )
        })
    }

    /// Reads the marker of this history, and judges how far it can be trusted.
    async fn read_marker(&mut self) -> Result<MarkerState, SinkError> {
        let (key, field) = (self.config.offsets_key.clone(), self.origin()?.key());
        let conn = self.connection().await?;
        let stored: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg(&field)
            .query_async(conn)
            .await
            .map_err(|e| classify("reading the effectively-once marker (HGET)", e))?;
        let stored = stored.unwrap_or_default();
        let origin = self.origin()?;
        let known = Marker::from_json(stored.as_bytes()).map(|m| {
            let trust = origin.trust(&m);
            match &trust {
                Trust::Whole => {}
                Trust::Below(end) => tracing::warn!(
                    hash = %key,
                    %field,
                    marker = %stored,
                    "effectively-once: the marker was written on an earlier timeline, which \
                     ended at {end}; only events committed before that are skipped against it"
                ),
                Trust::Foreign(why) => tracing::warn!(
                    hash = %key,
                    %field,
                    marker = %stored,
                    "effectively-once: the marker is not of this server's WAL history ({why}); \
                     nothing is skipped against it, so events Redis already holds from before \
                     may be delivered again"
                ),
            }
            (m, trust)
        });
        if known.is_none() && !stored.is_empty() {
            tracing::warn!(
                hash = %key,
                %field,
                "effectively-once: the marker field holds something outboxd did not write; it \
                 is replaced at the next batch, and nothing is skipped against it"
            );
        }
        Ok(MarkerState { stored, known })
    }

    /// One batch, effectively once: see the module documentation.
    pub(super) async fn send_effectively_once(
        &mut self,
        ledger: &mut Ledger<'_>,
    ) -> Result<(), SinkError> {
        let state = match self.marker.take() {
            Some(state) => state,
            None => self.read_marker().await?,
        };
        let batch = ledger.batch();
        // Positions grow along the batch, so what the marker covers is a prefix.
        let first_new = batch
            .iter()
            .position(|r| !state.covers(r))
            .unwrap_or(batch.len());
        (0..first_new).for_each(|i| ledger.duplicate(i));
        let mut expected = state;
        let mut start = first_new;
        // Each round ends the batch or dead-letters one more entry, so this ends.
        while start < batch.len() {
            // On an error the script may have run: the marker is read again before the retry.
            let reply = self.script_round(ledger, start, &expected.stored).await?;
            let (processed, error, written) = match reply {
                ScriptReply::Moved(current) => {
                    return Err(SinkError::transient(
                        "adding a batch to Redis (effectively-once script)",
                        format!(
                            "the marker in {:?} was moved by another writer (another outboxd on \
                             this slot?) to {current:?}; reading it again",
                            self.config.offsets_key
                        ),
                    ));
                }
                ScriptReply::Ran {
                    processed,
                    error,
                    written,
                } => (processed, error, written),
            };
            expected = MarkerState::written(written);
            let Some(error) = error else {
                break;
            };
            let i = start + processed;
            if ledger.poison(i).is_some() {
                self.marker = Some(expected);
                return Err(SinkError::permanent(
                    "the dead-letter stream refused an entry (check sink.dead_letter names a \
                     stream the Redis user may write)",
                    format!("stream {:?}: {error}", self.config.dead_letter),
                ));
            }
            if let Some(e) =
                server_text_error("adding a batch to Redis (effectively-once script)", &error)
            {
                self.marker = Some(expected);
                return Err(e);
            }
            ledger.reject(i, rejection_text(&error));
            start = i;
        }
        self.marker = Some(expected);
        Ok(())
    }

    /// Runs the script on `batch[start..]`, expecting the marker `expected`.
    async fn script_round(
        &mut self,
        ledger: &Ledger<'_>,
        start: usize,
        expected: &str,
    ) -> Result<ScriptReply, SinkError> {
        let cmd = self.script_command(true, ledger, start, expected)?;
        if let Some(reply) = self.query_script(&cmd).await? {
            return ScriptReply::parse(&reply);
        }
        // The script is not in Redis' cache (a restart, SCRIPT FLUSH): send it whole.
        let cmd = self.script_command(false, ledger, start, expected)?;
        match self.query_script(&cmd).await? {
            Some(reply) => ScriptReply::parse(&reply),
            None => Err(SinkError::transient(
                "running the effectively-once script",
                "NOSCRIPT after EVAL",
            )),
        }
    }

    /// `EVALSHA` (`by_hash`) or `EVAL` of [`SCRIPT`] over `batch[start..]`.
    fn script_command(
        &self,
        by_hash: bool,
        ledger: &Ledger<'_>,
        start: usize,
        expected: &str,
    ) -> Result<redis::Cmd, SinkError> {
        let origin = self.origin()?;
        let entries = &ledger.batch()[start..];
        let mut cmd = if by_hash {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.script.get_hash());
            cmd
        } else {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(SCRIPT);
            cmd
        };
        cmd.arg(entries.len() + 1).arg(&self.config.offsets_key);
        for (k, record) in entries.iter().enumerate() {
            cmd.arg(self.stream(record, ledger.poison(start + k)));
        }
        cmd.arg(origin.key()).arg(expected).arg(self.config.maxlen);
        for (k, record) in entries.iter().enumerate() {
            let marker = Marker {
                position: record.event.position,
                timeline: origin.timeline,
            };
            // The script takes each entry's pair count: the fields depend on the layout
            // (renamed or left-out fields, route headers, the time, CloudEvents).
            let fields = self.entry(record, ledger.poison(start + k));
            cmd.arg(marker.to_json()).arg(fields.len());
            for (name, value) in &fields {
                cmd.arg(*name).arg(value.as_ref());
            }
        }
        Ok(cmd)
    }

    /// Sends a script command; `None` when Redis does not have the script cached. Any other
    /// failure forgets the marker, which the script may have moved.
    async fn query_script(&mut self, cmd: &redis::Cmd) -> Result<Option<Value>, SinkError> {
        let conn = self.connection().await?;
        let what = "running the effectively-once script";
        let result = cmd.query_async::<Value>(conn).await;
        match result {
            Ok(Value::ServerError(e)) if e.code() == "NOSCRIPT" => Ok(None),
            Err(e) if e.code() == Some("NOSCRIPT") => Ok(None),
            Ok(Value::ServerError(e)) => Err(server_text_error(what, &e.to_string())
                .unwrap_or_else(|| SinkError::transient(what, e.to_string()))),
            Ok(reply) => Ok(Some(reply)),
            Err(e) => {
                if e.code().is_none() {
                    // Not a server error: the connection cannot be trusted.
                    self.conn = None;
                }
                Err(classify(what, e))
            }
        }
    }
}

/// The poison of an entry Redis refused alone, from the script's error text.
fn rejection_text(error: &str) -> Poison {
    let (code, details) = error.split_once(' ').unwrap_or((error, ""));
    rejection(code, details)
}

/// `outboxd check`, effectively-once: the markers' hash can be read, and says how many WAL
/// histories have a marker there.
pub(super) async fn check_offsets(sink: &mut RedisSink, key: &str) -> CheckLine {
    let line = |level, message| CheckLine {
        level,
        subject: "offsets",
        message,
    };
    let conn = match sink.connection().await {
        Ok(c) => c,
        Err(e) => return line(CheckLevel::Warn, format!("cannot read {key:?}: {e}")),
    };
    let fields: Result<Vec<String>, _> = redis::cmd("HKEYS").arg(key).query_async(conn).await;
    match fields {
        Ok(fields) => line(
            CheckLevel::Ok,
            format!(
                "effectively-once: markers in hash {key:?} ({} WAL histories so far: {})",
                fields.len(),
                if fields.is_empty() {
                    "none yet".to_owned()
                } else {
                    fields.join(", ")
                }
            ),
        ),
        Err(e) if is_code_of(&e, "WRONGTYPE") => line(
            CheckLevel::Fail,
            format!(
                "{key:?} is not a hash: sink.redis.offsets_key must name a key outboxd may keep \
                 its markers in"
            ),
        ),
        Err(e) if is_code_of(&e, "NOPERM") => line(
            CheckLevel::Fail,
            format!("the Redis user may not read {key:?}: grant it the key (ACL ~{key})"),
        ),
        Err(e) => line(CheckLevel::Warn, format!("cannot read {key:?}: {e}")),
    }
}

fn is_code_of(e: &redis::RedisError, code: &str) -> bool {
    e.code() == Some(code)
}
