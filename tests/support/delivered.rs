//! What arrived, checked against what was written: the same rules for every broker.
//!
//! A test event's `seq` says which event it is (see [`super::events`]). The checks read what a
//! broker holds in its own order (a Redis stream from its start, a Kafka topic partition by
//! partition by offset) and insist on the guarantees: every event present, each key in one
//! shard (partition), the first delivery of each event in commit order per key. Duplicates
//! are counted: the caller bounds them (at-least-once) or wants none (effectively-once).

use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// One delivered test event, as a broker holds it.
pub trait Delivered {
    /// The `seq` of its payload.
    fn seq(&self) -> u64;
    /// Its key.
    fn key(&self) -> &str;
    /// The shard that holds it when the broker splits a topic (a Kafka partition); events of
    /// one key must stay in one.
    fn shard(&self) -> Option<i32> {
        None
    }
}

/// The last value named `name` among a message's headers (a dead letter's context comes after
/// the row's headers).
pub fn last_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Whether every seq of `expected` is among `delivered`.
pub fn has_all<D: Delivered>(delivered: &[D], expected: Range<u64>) -> bool {
    let seen: HashSet<u64> = delivered.iter().map(Delivered::seq).collect();
    expected.into_iter().all(|s| seen.contains(&s))
}

/// Checks that every seq of `expected` arrived, that each key stayed in one shard, and that
/// the first deliveries of each key are in commit (seq) order; returns how many deliveries
/// were duplicates.
pub fn check_complete_and_ordered<D: Delivered>(
    delivered: &[D],
    expected: impl IntoIterator<Item = u64>,
) -> u64 {
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut last_by_key: HashMap<&str, u64> = HashMap::new();
    let mut shard_of_key: HashMap<&str, Option<i32>> = HashMap::new();
    for d in delivered {
        let key = d.key();
        let shard = *shard_of_key.entry(key).or_insert(d.shard());
        assert_eq!(
            shard,
            d.shard(),
            "key {key} is in shards {shard:?} and {:?}",
            d.shard()
        );
        let seq = d.seq();
        let count = seen.entry(seq).or_default();
        *count += 1;
        if *count > 1 {
            continue;
        }
        if let Some(prev) = last_by_key.insert(key, seq) {
            assert!(
                prev < seq,
                "key {key}: event {seq} arrived after {prev} (first deliveries out of commit order)"
            );
        }
    }
    let missing: Vec<u64> = expected
        .into_iter()
        .filter(|s| !seen.contains_key(s))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events missing, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    seen.values().map(|&c| u64::from(c - 1)).sum()
}

/// Checks that `delivered` holds each seq of `expected` exactly once, in commit order per
/// key, and nothing else.
pub fn assert_each_once<D: Delivered>(delivered: &[D], expected: Range<u64>) {
    let duplicates = check_complete_and_ordered(delivered, expected.clone());
    assert_eq!(
        duplicates, 0,
        "duplicates where each event must arrive once"
    );
    assert_eq!(
        delivered.len() as u64,
        expected.end - expected.start,
        "more deliveries than events"
    );
}
