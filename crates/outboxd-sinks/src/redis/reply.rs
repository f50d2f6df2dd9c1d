//! Reading Redis: the replies of the effectively-once script and of `XINFO`, and what each
//! server error means for the batch (retry, stop, or dead-letter one entry).

use outboxd_core::{Poison, PoisonKind, SinkError};
use redis::{ErrorKind, RedisError, ServerError, Value};

/// Server error codes that pass: retry the batch.
pub(super) const TRANSIENT_CODES: &[&str] = &[
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
pub(super) const PERMANENT_CODES: &[&str] = &["NOAUTH", "WRONGPASS"];

/// Server error codes of a refused stream: the ACL does not let the user write the key.
pub(super) const REFUSED_CODES: &[&str] = &["NOPERM"];

fn k_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// What one run of the effectively-once script reported.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ScriptReply {
    /// The marker was not the one expected (another writer moved it): nothing was done.
    Moved(String),
    /// The script ran: it added entries `0..processed`; `error` is Redis' refusal of entry
    /// `processed`, if it stopped there; `written` is the marker now stored.
    Ran {
        processed: usize,
        error: Option<String>,
        written: String,
    },
}

impl ScriptReply {
    pub(super) fn parse(reply: &Value) -> Result<ScriptReply, SinkError> {
        let bad = || {
            SinkError::transient(
                "reading the effectively-once script's reply",
                format!("unexpected reply {reply:?}"),
            )
        };
        let text = |v: &Value| k_bytes(v).map(|b| String::from_utf8_lossy(b).into_owned());
        let Value::Array(parts) = reply else {
            return Err(bad());
        };
        match parts.as_slice() {
            [Value::Int(-1), current] => Ok(ScriptReply::Moved(text(current).ok_or_else(bad)?)),
            [Value::Int(processed), error, written] => {
                let error = text(error).ok_or_else(bad)?;
                Ok(ScriptReply::Ran {
                    processed: usize::try_from(*processed).map_err(|_| bad())?,
                    error: (!error.is_empty()).then_some(error),
                    written: text(written).ok_or_else(bad)?,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// The error an error reply's `text` (`CODE details`) means for the whole batch: transient
/// (retry), permanent (stop), a refusal of the stream (`NOPERM`: retried, loud); `None` when it
/// concerns the one entry (dead-letter it).
pub(super) fn server_text_error(what: &'static str, text: &str) -> Option<SinkError> {
    let code = text.split_whitespace().next().unwrap_or("");
    if TRANSIENT_CODES.contains(&code) {
        Some(SinkError::transient(what, text.to_owned()))
    } else if PERMANENT_CODES.contains(&code) {
        Some(SinkError::permanent(what, text.to_owned()))
    } else if REFUSED_CODES.contains(&code) {
        Some(refused_stream(text.to_owned()))
    } else {
        None
    }
}

/// A refusal of the stream (`NOPERM`), with Redis' words.
fn refused_stream(text: String) -> SinkError {
    SinkError::refused(
        "Redis refuses the stream: the ACL user may not write it (grant it the stream's keys, \
         e.g. ~outbox.* and the dead-letter stream)",
        text,
    )
}

pub(super) fn is_code(err: &ServerError, codes: &[&str]) -> bool {
    codes.contains(&err.code())
}

pub(super) fn rejection(code: &str, details: &str) -> Poison {
    Poison::new(
        PoisonKind::Rejected,
        format!("redis refused the entry: {code} {details}"),
    )
}

pub(super) fn dead_letter_refused(stream: &str, err: &ServerError) -> SinkError {
    SinkError::permanent(
        "the dead-letter stream refused an entry (check sink.dead_letter names a stream the \
         Redis user may write)",
        format!("stream {stream:?}: {err}"),
    )
}

pub(super) fn server_error(what: &'static str, err: &ServerError) -> SinkError {
    let source = format!("{err}");
    if is_code(err, PERMANENT_CODES) {
        SinkError::permanent(what, source)
    } else if is_code(err, REFUSED_CODES) {
        // Redis' own words (`NOPERM this user has no permissions ...`), as an operator greps.
        refused_stream(format!(
            "{} {}",
            err.code(),
            err.details().unwrap_or_default()
        ))
    } else {
        SinkError::transient(what, source)
    }
}

pub(super) fn classify(what: &'static str, err: RedisError) -> SinkError {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn the_scripts_reply_says_where_it_stopped_and_what_marker_is_stored() {
        let marker = r#"{"timeline":1,"commit_lsn":"0/16B3748","index":2}"#;
        let done = Value::Array(vec![Value::Int(3), bulk(""), bulk(marker)]);
        assert_eq!(
            ScriptReply::parse(&done).unwrap(),
            ScriptReply::Ran {
                processed: 3,
                error: None,
                written: marker.to_owned()
            }
        );
        let stopped = Value::Array(vec![
            Value::Int(2),
            bulk("WRONGTYPE Operation against a key holding the wrong kind of value"),
            bulk(marker),
        ]);
        let ScriptReply::Ran {
            processed, error, ..
        } = ScriptReply::parse(&stopped).unwrap()
        else {
            panic!("ran")
        };
        assert_eq!(processed, 2);
        assert!(error.unwrap().starts_with("WRONGTYPE"));
        let moved = Value::Array(vec![Value::Int(-1), bulk(marker)]);
        assert_eq!(
            ScriptReply::parse(&moved).unwrap(),
            ScriptReply::Moved(marker.to_owned())
        );
    }

    #[test]
    fn a_reply_of_another_shape_is_a_transient_error() {
        for reply in [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Int(-2), bulk("x")]),
            Value::Array(vec![Value::Int(1), bulk(""), Value::Int(0)]),
        ] {
            let err = ScriptReply::parse(&reply).unwrap_err();
            assert!(err.is_transient(), "{reply:?}: {err}");
        }
    }

    #[test]
    fn an_error_reply_is_for_the_batch_or_for_one_entry() {
        let what = "adding";
        assert!(
            server_text_error(what, "OOM command not allowed")
                .unwrap()
                .is_transient()
        );
        assert!(
            !server_text_error(what, "NOAUTH Authentication required")
                .unwrap()
                .is_transient()
        );
        let refused = server_text_error(what, "NOPERM this user has no permissions").unwrap();
        assert!(refused.is_refusal() && refused.is_transient());
        assert!(server_text_error(what, "WRONGTYPE Operation against a key").is_none());
    }
}
