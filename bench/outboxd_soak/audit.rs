//! The audit: every event the outbox table holds (what committed) against every entry the
//! three streams hold, read from their start.
//!
//! Counted, never assumed: events lost (committed, in no stream), duplicates (entries beyond
//! the first of an event), events out of order (a key's first deliveries not in commit order
//! within its stream), entries of no committed event, events in the wrong stream, and dead
//! letters. Commit order is `seq` order: one writer commits one transaction at a time.

use std::collections::HashMap;

use redis::aio::MultiplexedConnection;
use tokio_postgres::Client;

use crate::writer::TYPES;

/// What the audit found.
#[derive(Debug, Default, Clone)]
pub struct Audit {
    /// Events in the outbox table.
    pub committed: u64,
    /// Entries in the three streams.
    pub entries: u64,
    /// Committed events in no stream.
    pub lost: u64,
    /// The first few of them.
    pub lost_examples: Vec<u64>,
    /// Entries beyond the first of an event.
    pub duplicates: u64,
    /// First deliveries that came after a later event of the same key.
    pub out_of_order: u64,
    /// The first of them: (stream, key, seq, the later seq before it).
    pub out_of_order_example: Option<(String, String, u64, u64)>,
    /// Entries whose seq is no committed event, or that cannot be read.
    pub not_committed: u64,
    /// Events in a stream other than their aggregate type's.
    pub misrouted: u64,
    /// Entries of the dead-letter stream.
    pub dead_letters: u64,
}

impl Audit {
    /// Whether it found nothing wrong; duplicates count as wrong when `no_duplicates`.
    pub fn clean(&self, no_duplicates: bool) -> bool {
        self.lost == 0
            && self.out_of_order == 0
            && self.not_committed == 0
            && self.misrouted == 0
            && self.dead_letters == 0
            && (!no_duplicates || self.duplicates == 0)
    }
}

/// Reads the table and the streams and compares them.
pub async fn audit(db: &Client, redis: &mut MultiplexedConnection) -> Audit {
    // seq -> (type index, delivered count)
    let mut events: HashMap<u64, (usize, u32)> = HashMap::new();
    let rows = db
        .query(
            "SELECT (payload->>'seq')::bigint, aggregate_type FROM public.outbox",
            &[],
        )
        .await
        .expect("read the outbox table");
    for row in &rows {
        let seq = row.get::<_, i64>(0) as u64;
        let kind: &str = row.get(1);
        let t = TYPES.iter().position(|k| *k == kind).expect("a soak type");
        events.insert(seq, (t, 0));
    }
    drop(rows);
    let mut audit = Audit {
        committed: events.len() as u64,
        ..Audit::default()
    };
    for (t, kind) in TYPES.iter().enumerate() {
        let stream = format!("outbox.{kind}");
        let mut last_by_key: HashMap<String, u64> = HashMap::new();
        let mut start = "-".to_owned();
        loop {
            let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(10_000)
                .query_async(redis)
                .await
                .expect("XRANGE");
            let n = reply.len();
            for (entry_id, fields) in reply {
                start = format!("({entry_id}");
                audit.entries += 1;
                let (key, seq) = key_and_seq(&fields);
                let Some(seq) = seq else {
                    audit.not_committed += 1;
                    continue;
                };
                let Some((kind_of_seq, count)) = events.get_mut(&seq) else {
                    audit.not_committed += 1;
                    continue;
                };
                *count += 1;
                if *count > 1 {
                    audit.duplicates += 1;
                    continue;
                }
                if *kind_of_seq != t {
                    audit.misrouted += 1;
                }
                let key = key.unwrap_or_default();
                if let Some(prev) = last_by_key.insert(key.clone(), seq)
                    && prev > seq
                {
                    audit.out_of_order += 1;
                    audit
                        .out_of_order_example
                        .get_or_insert((stream.clone(), key, seq, prev));
                }
            }
            if n < 10_000 {
                break;
            }
        }
    }
    let mut lost: Vec<u64> = events
        .iter()
        .filter(|(_, (_, count))| *count == 0)
        .map(|(seq, _)| *seq)
        .collect();
    lost.sort_unstable();
    audit.lost = lost.len() as u64;
    audit.lost_examples = lost.into_iter().take(10).collect();
    audit.dead_letters = redis::cmd("XLEN")
        .arg("outboxd.dlq")
        .query_async(redis)
        .await
        .expect("XLEN");
    audit
}

/// An entry's `key` field and its payload's `seq`.
fn key_and_seq(fields: &[Vec<u8>]) -> (Option<String>, Option<u64>) {
    let (mut key, mut seq) = (None, None);
    for kv in fields.chunks(2) {
        let [name, value] = kv else { continue };
        match name.as_slice() {
            b"key" => key = Some(String::from_utf8_lossy(value).into_owned()),
            b"payload" => {
                seq = serde_json::from_slice::<serde_json::Value>(value)
                    .ok()
                    .and_then(|v| v["seq"].as_u64());
            }
            _ => {}
        }
    }
    (key, seq)
}

/// Entries in the three streams now.
pub async fn stream_entries(redis: &mut MultiplexedConnection) -> Option<u64> {
    let mut total = 0;
    for kind in TYPES {
        total += redis::cmd("XLEN")
            .arg(format!("outbox.{kind}"))
            .query_async::<u64>(redis)
            .await
            .ok()?;
    }
    Some(total)
}
