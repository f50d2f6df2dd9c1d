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

/// The value of `name` in a field/value reply (a flat array in RESP2, a map in RESP3), as
/// text.
pub(super) fn reply_field(reply: &Value, name: &[u8]) -> Option<String> {
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

/// What one run of the effectively-once script reported.
#[derive(Debug, Default)]
pub(super) struct ScriptRound {
    /// `(entry, error)`: the first entry Redis refused for a reason other than its id.
    pub(super) error: Option<(usize, String)>,
    /// Entries refused as not above their stream's top, with that top id.
    pub(super) duplicates: Vec<(usize, String)>,
}

impl ScriptRound {
    pub(super) fn parse(reply: &Value) -> Result<ScriptRound, SinkError> {
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

pub(super) fn is_code(err: &ServerError, codes: &[&str]) -> bool {
    codes.contains(&err.code())
}

pub(super) fn rejection(err: &ServerError) -> Poison {
    Poison::new(
        PoisonKind::Rejected,
        format!(
            "redis refused the entry: {} {}",
            err.code(),
            err.details().unwrap_or_default()
        ),
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
    fn a_field_is_found_in_resp2_arrays_and_resp3_maps() {
        let flat = Value::Array(vec![
            bulk("length"),
            Value::Int(3),
            bulk("last-generated-id"),
            bulk("123-4"),
        ]);
        assert_eq!(
            reply_field(&flat, b"last-generated-id").as_deref(),
            Some("123-4")
        );
        assert_eq!(reply_field(&flat, b"missing"), None);
        let map = Value::Map(vec![(
            Value::SimpleString("last-generated-id".into()),
            bulk("5-0"),
        )]);
        assert_eq!(
            reply_field(&map, b"last-generated-id").as_deref(),
            Some("5-0")
        );
        assert_eq!(reply_field(&Value::Nil, b"last-generated-id"), None);
    }

    #[test]
    fn the_scripts_reply_says_where_it_stopped_and_what_was_already_there() {
        let done = Value::Array(vec![Value::Int(3), bulk(""), Value::Array(vec![])]);
        let round = ScriptRound::parse(&done).unwrap();
        assert!(round.error.is_none() && round.duplicates.is_empty());

        let stopped = Value::Array(vec![
            Value::Int(2),
            bulk("WRONGTYPE Operation against a key holding the wrong kind of value"),
            Value::Array(vec![
                Value::Int(0),
                bulk("100-0"),
                Value::Int(1),
                bulk("100-0"),
            ]),
        ]);
        let round = ScriptRound::parse(&stopped).unwrap();
        let (at, error) = round.error.unwrap();
        assert_eq!(at, 2);
        assert!(error.starts_with("WRONGTYPE"));
        assert_eq!(
            round.duplicates,
            [(0, "100-0".to_owned()), (1, "100-0".to_owned())]
        );
    }

    #[test]
    fn a_reply_of_another_shape_is_a_transient_error() {
        for reply in [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Int(-1), bulk("ERR x"), Value::Array(vec![])]),
            Value::Array(vec![
                Value::Int(1),
                bulk(""),
                Value::Array(vec![Value::Int(0)]),
            ]),
        ] {
            let err = ScriptRound::parse(&reply).unwrap_err();
            assert!(err.is_transient(), "{reply:?}: {err}");
        }
    }
}
