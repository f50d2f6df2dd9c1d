//! Arbitrary bytes as one pgoutput message, and as the content of each of outboxd's logical
//! decoding messages: every input decodes or is refused with an error, never a panic, and a
//! decoded row's values are slices of the input (no value is invented or read out of bounds).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use outboxd_postgres::decode::{self, Message};
use outboxd_postgres::message::{self, MessageKind};

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    match decode::decode(&bytes) {
        Ok(Message::Insert { values, .. }) => {
            let within = bytes.as_ptr_range();
            let mut total = 0;
            for value in values.iter().flatten() {
                total += value.len();
                if !value.is_empty() {
                    assert!(
                        within.contains(&value.as_ptr()),
                        "a value outside the message"
                    );
                    assert!(
                        value.as_ptr_range().end <= within.end,
                        "a value past the message"
                    );
                }
            }
            assert!(total <= bytes.len(), "values longer than the message");
        }
        Ok(Message::Relation(rel)) => {
            let names: usize = rel.columns.iter().map(|c| c.name.len() + 1).sum();
            assert!(names <= bytes.len(), "column names longer than the message");
        }
        Ok(_) | Err(_) => {}
    }
    let columns = message::event_columns();
    for kind in [
        MessageKind::Event,
        MessageKind::Backfill,
        MessageKind::Replay,
    ] {
        if let Ok(row) = message::decode(kind, data, &columns) {
            assert_eq!(row.values.len(), columns.len(), "one value per column");
        }
    }
});
