//! What a dead-letter entry says about the event it holds.
//!
//! Every broker writes the same context: the original event's id, key, type, topic, payload
//! and headers, why it could not be published (`reason`, a stable label, and `detail`, for
//! people), and where it sits in the WAL (`lsn` of its commit and `index` in the
//! transaction), so that an operator can find the row and publish it by hand once fixed.

use bytes::Bytes;
use outboxd_core::{Event, Poison};

/// The context fields of a dead-letter entry, in the order they are written.
pub fn context(event: &Event, poison: &Poison) -> [(&'static str, Bytes); 6] {
    [
        ("topic", Bytes::from(event.topic.clone())),
        ("reason", Bytes::from_static(poison.kind.label().as_bytes())),
        ("detail", Bytes::from(poison.detail.clone())),
        ("lsn", Bytes::from(event.position.commit_lsn.to_string())),
        ("index", Bytes::from(event.position.index.to_string())),
        (
            "commit_time_us",
            Bytes::from(event.commit_time_micros.to_string()),
        ),
    ]
}
