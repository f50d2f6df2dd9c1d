//! How the live scenario notes when each event arrives where it is read: a reader blocked on
//! the Redis stream outboxd writes to (XREAD), or pg_recvlogical's output (see
//! [`crate::reference`]). Both find the `seq` of each payload without parsing the JSON, so that
//! the reader stays light on a machine it shares with what it measures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::support::*;

/// When each event (by its payload's `seq`) was committed, or arrived.
pub type Times = Arc<Mutex<HashMap<u64, Instant>>>;

/// XREAD BLOCK from the end of the stream, noting when each event shows up.
pub async fn watch_redis(env: &Env, seen: Times, total: u64) -> tokio::task::JoinHandle<()> {
    let mut reader = env.redis.connect().await;
    let start_id: String = {
        let last: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XREVRANGE")
            .arg("outbox.order")
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut reader)
            .await
            .unwrap();
        last.first()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id.clone())
    };
    tokio::spawn(async move {
        let mut after = start_id;
        loop {
            let reply: redis::Value = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(100)
                .arg("COUNT")
                .arg(5000)
                .arg("STREAMS")
                .arg("outbox.order")
                .arg(&after)
                .query_async(&mut reader)
                .await
                .unwrap();
            let now = Instant::now();
            for (id, seq) in xread_seqs(&reply) {
                seen.lock().unwrap().insert(seq, now);
                after = id;
            }
            if seen.lock().unwrap().len() as u64 >= total {
                return;
            }
        }
    })
}

/// (entry id, payload seq) of an XREAD reply.
fn xread_seqs(reply: &redis::Value) -> Vec<(String, u64)> {
    use redis::Value;
    let mut out = Vec::new();
    let streams: Vec<&Value> = match reply {
        Value::Array(s) => s.iter().collect(),
        Value::Map(m) => m.iter().map(|(_, v)| v).collect(),
        _ => return out,
    };
    for stream in streams {
        let entries = match stream {
            Value::Array(pair) if pair.len() == 2 => &pair[1],
            other => other,
        };
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(Value::BulkString(id)), Some(Value::Array(fields))) =
                (parts.first(), parts.get(1))
            else {
                continue;
            };
            let mut seq = None;
            for kv in fields.chunks(2) {
                if let [Value::BulkString(k), Value::BulkString(v)] = kv
                    && k == b"payload"
                {
                    seq = payload_seq(v);
                }
            }
            if let Some(seq) = seq {
                out.push((String::from_utf8_lossy(id).into_owned(), seq));
            }
        }
    }
    out
}

/// The `seq` of a payload `{"seq": N, ...}`, without parsing the JSON (the reader must stay
/// light: it shares the machine with what it measures).
pub fn payload_seq(payload: &[u8]) -> Option<u64> {
    let at = payload.windows(6).position(|w| w == b"\"seq\":")? + 6;
    let digits = payload[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n * 10 + u64::from(d - b'0');
        any = true;
    }
    any.then_some(n)
}
