//! Effectively-once delivery to Redis: entry ids are WAL positions,
//! `<commit LSN as a number>-<index in the transaction>`, so that Redis itself refuses a
//! replayed event, and that refusal, and only that one, counts as "already delivered".
//!
//! A batch with nothing for the dead-letter stream is one `MULTI`/`EXEC` with explicit ids;
//! any other batch goes through [`SCRIPT`], which adds the entries in order and stops at the
//! first one Redis refuses for another reason, so that it is dead-lettered before any later
//! dead-letter entry. A refusal proves delivery only if the stream's newest id can be one
//! outboxd wrote (not beyond the server's WAL); otherwise the stream has another writer, a
//! permanent error.

use outboxd_core::{Ledger, Lsn, Poison, PoisonKind, Record, SinkError};
use redis::Value;

use super::RedisSink;
use super::reply::{
    PERMANENT_CODES, ScriptRound, TRANSIENT_CODES, classify, is_code, rejection, reply_field,
    server_error,
};
use super::transaction::Outcome;
use crate::plugin::{CheckLevel, CheckLine, Preflight};

/// Adds a batch's entries in order (effectively-once mode).
///
/// `KEYS[i]`: the stream of entry `i`. `ARGV[1]`: `MAXLEN ~` value, `0` for none; then for
/// each entry: the number of field pairs, the entry id, the fields. Returns
/// `{processed, error, duplicates}`: `error` is empty when every entry was handled, else the
/// error of entry `processed` (0-based), which was not added and after which nothing was
/// tried; `duplicates` holds, for each entry refused as not above its stream's top, its index
/// and that stream's last generated id.
pub const SCRIPT: &str = r"
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

/// The entry id of an event in effectively-once mode: `<commit LSN>-<index>`.
pub fn entry_id(record: &Record) -> String {
    let p = record.event.position;
    format!("{}-{}", p.commit_lsn.get(), p.index)
}

/// The first part of a stream entry id (`<ms>-<seq>`): in effectively-once mode, a WAL
/// position.
pub(super) fn id_ms(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

impl RedisSink {
    /// Entry ids from the WAL position: see the module documentation.
    pub(super) async fn send_effectively_once(
        &mut self,
        ledger: &mut Ledger<'_>,
    ) -> Result<(), SinkError> {
        if ledger.any_dead_letter() {
            return self.send_scripted(ledger).await;
        }
        let batch = ledger.batch();
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
                    ledger.reject(i, rejection(&err));
                }
                return self.send_scripted(ledger).await;
            }
        };
        let mut tops: Vec<(String, String)> = Vec::new();
        for (i, err) in errors {
            if !err.to_string().contains(DUPLICATE_ID) {
                // Never retried: later entries of its stream are in, so a retry would be
                // refused as "already delivered". Dead-lettered, as in at-least-once mode.
                ledger.reject(i, rejection(&err));
                continue;
            }
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
            ledger.duplicate(i);
        }
        self.dead_letter_refused_entries(ledger).await
    }

    /// Writes the dead-letter entries of the records Redis refused when executing (nothing
    /// of the batch is in the dead-letter stream yet, so their ids are still above its top).
    async fn dead_letter_refused_entries(
        &mut self,
        ledger: &mut Ledger<'_>,
    ) -> Result<(), SinkError> {
        let batch = ledger.batch();
        let refused: Vec<(usize, Poison)> =
            ledger.rejections().map(|(i, p)| (i, p.clone())).collect();
        if refused.is_empty() {
            return Ok(());
        }
        let letters: Vec<Record> = refused
            .iter()
            .map(|(i, p)| Record::dead_letter(batch[*i].event.clone(), p.clone()))
            .collect();
        let mut written = Ledger::new(&letters);
        self.send_scripted(&mut written).await?;
        for &k in written.finish().duplicates() {
            ledger.duplicate(refused[k].0);
        }
        Ok(())
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

    /// Entry ids from the WAL position, through [`SCRIPT`].
    async fn send_scripted(&mut self, ledger: &mut Ledger<'_>) -> Result<(), SinkError> {
        let batch = ledger.batch();
        let mut start = 0;
        // Each round ends the batch or dead-letters one more entry, so this ends.
        while start < batch.len() {
            let round = self.script_round(batch, start, ledger).await?;
            for (i, top) in round.duplicates {
                self.check_top(&batch[start + i], &top)?;
                ledger.duplicate(start + i);
            }
            let Some((processed, error)) = round.error else {
                break;
            };
            let i = start + processed;
            let code = error.split_whitespace().next().unwrap_or("");
            if ledger.poison(i).is_some() {
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
            ledger.reject(
                i,
                Poison::new(
                    PoisonKind::Rejected,
                    format!("redis refused the entry: {error}"),
                ),
            );
            start = i;
        }
        Ok(())
    }

    /// Runs the script on `batch[start..]`.
    async fn script_round(
        &mut self,
        batch: &[Record],
        start: usize,
        ledger: &Ledger<'_>,
    ) -> Result<ScriptRound, SinkError> {
        let entries: Vec<(&Record, Option<&Poison>)> = batch[start..]
            .iter()
            .enumerate()
            .map(|(k, r)| (r, ledger.poison(start + k)))
            .collect();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(entries.len());
        self.script_args(&mut cmd, &entries);
        let reply = match self.query_script(&cmd).await? {
            Some(reply) => reply,
            None => {
                // The script is not in Redis' cache (a restart, SCRIPT FLUSH): send it whole.
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(SCRIPT).arg(entries.len());
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
            // The script takes each entry's pair count first: the fields depend on the
            // layout (renamed or left-out fields, route headers, the time, CloudEvents).
            let fields = self.entry(record, *poison);
            cmd.arg(fields.len()).arg(entry_id(record));
            for (name, value) in &fields {
                cmd.arg(*name).arg(value.as_ref());
            }
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

/// `outboxd check`, effectively-once: every stream outboxd may write (those the topic
/// template can name, and the dead-letter stream) must hold only ids that are WAL positions;
/// a newer id, such as the timestamp of an `XADD *` by another writer, would make Redis refuse
/// every event.
pub(super) async fn check_stream_ids(
    sink: &mut RedisSink,
    stream_prefix: &str,
    topic_glob: &str,
    ctx: &Preflight<'_>,
    wal: Lsn,
) -> Vec<CheckLine> {
    const LIMIT: usize = 1000;
    let patterns = vec![
        outboxd_core::glob_escape(ctx.dead_letter),
        format!("{}{topic_glob}", outboxd_core::glob_escape(stream_prefix)),
    ];
    let line = |level, message| CheckLine {
        level,
        subject: "stream ids",
        message,
    };
    match sink.foreign_streams(&patterns, wal, LIMIT).await {
        Ok(foreign) if foreign.is_empty() => vec![line(
            CheckLevel::Ok,
            format!(
                "effectively-once: every stream matching {} holds only WAL-position ids (at \
                 most {LIMIT} streams looked at)",
                patterns.join(" or ")
            ),
        )],
        Ok(foreign) => foreign
            .into_iter()
            .map(|(stream, top)| {
                line(
                    CheckLevel::Fail,
                    format!(
                        "stream {stream:?} has newest id {top}, beyond the server's WAL \
                         position {wal} ({}): another writer added it, and Redis would refuse \
                         every event outboxd writes there. With sink.delivery = \
                         \"effectively-once\" outboxd must be the stream's only writer: delete \
                         the stream or choose another sink.redis.stream_prefix",
                        wal.get()
                    ),
                )
            })
            .collect(),
        Err(e) => vec![line(
            CheckLevel::Warn,
            format!("could not look at the streams' ids: {e}"),
        )],
    }
}
