//! Batches as one `MULTI` … `EXEC`: applied all at once or not at all; and `WAIT` for
//! replicas after them.
//!
//! How replies are read: an error while queueing aborts the transaction (transient codes
//! fail the batch for a retry; an error that concerns one entry dead-letters it and the batch
//! is sent again without it); an error from `EXEC` for one entry dead-letters that entry in a
//! second transaction; a dead-letter entry Redis refuses is a permanent error.

use outboxd_core::{Ledger, Poison, Record, SinkError};
use redis::aio::ConnectionLike;
use redis::{ServerError, Value};

use super::RedisSink;
use super::reply::{
    REFUSED_CODES, TRANSIENT_CODES, classify, dead_letter_refused, is_code, rejection, server_error,
};

/// What a transaction's replies said.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Executed; the entries that failed, with Redis' error.
    Executed(Vec<(usize, ServerError)>),
    /// Aborted while queueing; the entries whose queueing failed.
    Aborted(Vec<(usize, ServerError)>),
}

/// Reads the replies of `MULTI`, `entries` commands and `EXEC`.
///
/// A reply that does not fit (wrong count, an unexpected `EXEC` reply) is a transient error;
/// an error of `MULTI` or of `EXEC` itself is judged by its code.
pub(super) fn read_replies(replies: &[Value], entries: usize) -> Result<Outcome, SinkError> {
    if replies.len() != entries + 2 {
        return Err(SinkError::transient(
            "reading Redis replies",
            format!("expected {} replies, got {}", entries + 2, replies.len()),
        ));
    }
    let errors = |values: &[Value]| -> Vec<(usize, ServerError)> {
        values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v {
                Value::ServerError(e) => Some((i, e.clone())),
                _ => None,
            })
            .collect()
    };
    if let Value::ServerError(e) = &replies[0] {
        return Err(server_error("starting a Redis transaction (MULTI)", e));
    }
    let queue_errors = errors(&replies[1..=entries]);
    match &replies[entries + 1] {
        Value::Array(results) if queue_errors.is_empty() && results.len() == entries => {
            Ok(Outcome::Executed(errors(results)))
        }
        Value::ServerError(_) if !queue_errors.is_empty() => Ok(Outcome::Aborted(queue_errors)),
        Value::ServerError(e) => Err(server_error("committing a Redis transaction (EXEC)", e)),
        other => Err(SinkError::transient(
            "reading the EXEC reply",
            format!("unexpected reply {other:?}"),
        )),
    }
}

impl RedisSink {
    /// Runs `pipe` (`MULTI`, `entries` commands, `EXEC`) and reads its replies.
    pub(super) async fn transact(
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
        let outcome = read_replies(&replies, entries);
        if matches!(&outcome, Err(e) if e.is_transient()) {
            // Replies out of step with the commands: this connection cannot be trusted.
            self.conn = None;
        }
        outcome
    }

    /// `MULTI`, one `XADD` per entry, `EXEC`.
    pub(super) fn build(&self, pipe: &mut redis::Pipeline, entries: &[(&Record, Option<&Poison>)]) {
        pipe.clear();
        pipe.cmd("MULTI");
        for (record, poison) in entries {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(self.stream(record, *poison));
            if self.config.maxlen > 0 {
                cmd.arg("MAXLEN").arg("~").arg(self.config.maxlen);
            }
            cmd.arg("*");
            self.fields(&mut cmd, record, *poison);
            pipe.add_command(cmd);
        }
        pipe.cmd("EXEC");
    }

    pub(super) async fn wait_for_replicas(&mut self) -> Result<(), SinkError> {
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

    /// `MULTI`/`EXEC` batches with `*` ids (at-least-once).
    pub(super) async fn send_at_least_once(
        &mut self,
        ledger: &mut Ledger<'_>,
    ) -> Result<(), SinkError> {
        let batch = ledger.batch();
        let mut pipe = redis::pipe();
        // Each round either succeeds or rejects at least one more entry, so this ends.
        let executed_errors = loop {
            let entries: Vec<(&Record, Option<&Poison>)> = batch
                .iter()
                .enumerate()
                .map(|(i, r)| (r, ledger.poison(i)))
                .collect();
            self.build(&mut pipe, &entries);
            match self.transact(&pipe, entries.len()).await? {
                Outcome::Executed(errors) => break errors,
                Outcome::Aborted(errors) => {
                    for (i, err) in errors {
                        if ledger.poison(i).is_some() {
                            return Err(dead_letter_refused(&self.config.dead_letter, &err));
                        }
                        if is_code(&err, TRANSIENT_CODES) || is_code(&err, REFUSED_CODES) {
                            return Err(server_error("queueing a batch in Redis", &err));
                        }
                        ledger.reject(i, entry_rejection(&err));
                    }
                }
            }
        };

        // Entries Redis refused when executing: dead-letter them in a second transaction.
        let mut late = Vec::new();
        for (i, err) in executed_errors {
            if ledger.poison(i).is_some() {
                return Err(dead_letter_refused(&self.config.dead_letter, &err));
            }
            if is_code(&err, REFUSED_CODES) {
                return Err(server_error("adding a batch to Redis", &err));
            }
            ledger.reject(i, entry_rejection(&err));
            late.push(i);
        }
        if !late.is_empty() {
            let entries: Vec<(&Record, Option<&Poison>)> = late
                .iter()
                .map(|&i| (&batch[i], ledger.poison(i)))
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
        Ok(())
    }
}

/// An entry Redis refused alone.
fn entry_rejection(err: &ServerError) -> Poison {
    rejection(err.code(), err.details().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply as Redis sends it (RESP).
    fn resp(wire: &str) -> Value {
        redis::parse_redis_value(wire.as_bytes()).expect("a RESP reply")
    }

    fn codes(errors: &[(usize, ServerError)]) -> Vec<(usize, String)> {
        errors
            .iter()
            .map(|(i, e)| (*i, e.code().to_owned()))
            .collect()
    }

    #[test]
    fn an_executed_transaction_names_the_entries_redis_refused() {
        let replies = [
            resp("+OK\r\n"),
            resp("+QUEUED\r\n"),
            resp("+QUEUED\r\n"),
            resp("*2\r\n$3\r\n1-0\r\n-WRONGTYPE Operation against a key\r\n"),
        ];
        match read_replies(&replies, 2).unwrap() {
            Outcome::Executed(errors) => assert_eq!(codes(&errors), [(1, "WRONGTYPE".into())]),
            Outcome::Aborted(_) => panic!("executed"),
        }
    }

    #[test]
    fn a_transaction_aborted_while_queueing_names_the_entries_that_failed() {
        let replies = [
            resp("+OK\r\n"),
            resp("-NOPERM this user has no permissions to access the key\r\n"),
            resp("+QUEUED\r\n"),
            resp("-EXECABORT Transaction discarded because of previous errors.\r\n"),
        ];
        match read_replies(&replies, 2).unwrap() {
            Outcome::Aborted(errors) => {
                assert_eq!(codes(&errors), [(0, "NOPERM".into())]);
                // NOPERM refuses the stream, not the entry: the batch waits, loud.
                let e = server_error("queueing a batch in Redis", &errors[0].1);
                assert!(e.is_refusal(), "{e}");
            }
            Outcome::Executed(_) => panic!("aborted"),
        }
    }

    #[test]
    fn replies_out_of_step_or_a_failed_multi_fail_the_batch() {
        let short = [resp("+OK\r\n"), resp("+QUEUED\r\n")];
        assert!(read_replies(&short, 1).unwrap_err().is_transient());
        let busy = [
            resp("-LOADING Redis is loading the dataset in memory\r\n"),
            resp("+QUEUED\r\n"),
            resp("*1\r\n$3\r\n1-0\r\n"),
        ];
        assert!(read_replies(&busy, 1).unwrap_err().is_transient());
        let refused = [
            resp("-NOAUTH Authentication required.\r\n"),
            resp("-NOAUTH Authentication required.\r\n"),
            resp("-NOAUTH Authentication required.\r\n"),
        ];
        assert!(!read_replies(&refused, 1).unwrap_err().is_transient());
        let odd = [resp("+OK\r\n"), resp("+QUEUED\r\n"), resp(":1\r\n")];
        assert!(read_replies(&odd, 1).unwrap_err().is_transient());
    }
}
