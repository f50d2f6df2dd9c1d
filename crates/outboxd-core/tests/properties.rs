//! Property tests: the checkpoint against a plain model of "confirm only what the broker
//! acknowledged", over random sequences of reads, commits, keepalives and acknowledgements;
//! and the route templates over random templates and row values.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use bytes::Bytes;
use outboxd_core::{Checkpoint, Lsn, Position, RouteSpec, Router, Template};
use proptest::prelude::*;

/// What the pipeline does to a checkpoint.
#[derive(Debug, Clone)]
enum Op {
    /// `n` records of a transaction read and handed to the sink, then its commit mark.
    Transaction(u8),
    /// A keepalive's WAL end, outside any transaction.
    Keepalive,
    /// The broker acknowledges up to `share` per 255 of what is in flight.
    Ack(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..6).prop_map(Op::Transaction),
        1 => Just(Op::Keepalive),
        3 => any::<u8>().prop_map(Op::Ack),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The confirmed position never goes back, never passes a mark with an unacknowledged
    /// record before it, and reaches the newest mark once everything is acknowledged.
    #[test]
    fn the_checkpoint_confirms_only_what_was_acknowledged(ops in proptest::collection::vec(op(), 1..80)) {
        let start = Lsn::new(1000);
        let mut cp = Checkpoint::new(start);
        let mut issued = 0u64;
        let mut acked = 0u64;
        let mut lsn = 1000u64;
        // Every mark: (records issued before it, its LSN).
        let mut marks: Vec<(u64, u64)> = Vec::new();
        let mut last_confirmed = start;
        for op in ops {
            match op {
                Op::Transaction(n) => {
                    for _ in 0..n {
                        prop_assert_eq!(cp.issue(), issued);
                        issued += 1;
                    }
                    lsn += 1 + u64::from(n) * 100;
                    marks.push((issued, lsn));
                    cp.mark(Lsn::new(lsn));
                }
                Op::Keepalive => {
                    lsn += 8;
                    marks.push((issued, lsn));
                    cp.mark(Lsn::new(lsn));
                }
                Op::Ack(share) => {
                    let in_flight = issued - acked;
                    acked += in_flight * u64::from(share) / 255;
                    cp.ack(acked);
                }
            }
            let confirmed = cp.confirmed();
            prop_assert!(confirmed >= last_confirmed, "went back: {} after {}", confirmed, last_confirmed);
            last_confirmed = confirmed;
            // The model: the newest mark whose records are all acknowledged.
            let expected = marks
                .iter()
                .filter(|(records, _)| *records <= acked)
                .map(|(_, l)| *l)
                .max()
                .unwrap_or(1000);
            prop_assert_eq!(confirmed, Lsn::new(expected));
            prop_assert_eq!(cp.in_flight(), issued - acked);
        }
        cp.ack(issued);
        prop_assert_eq!(cp.confirmed(), Lsn::new(lsn));
        prop_assert!(cp.is_settled());
    }

    /// Any text parses or is refused without a panic.
    #[test]
    fn any_text_parses_or_is_refused(text in ".{0,40}") {
        let _ = Template::parse(&text);
    }

    /// A template made of literal text (braces escaped) and placeholders renders the row's
    /// values in place, byte for byte.
    #[test]
    fn templates_render_their_columns_in_place(
        parts in proptest::collection::vec(
            prop_oneof![
                "[a-z.{}*?\\[\\]-]{1,6}".prop_map(|t| (false, t)),
                (0usize..3).prop_map(|i| (true, ["a", "b", "c"][i].to_owned())),
            ],
            1..8,
        ),
        values in proptest::collection::vec("[ -~é]{1,8}", 3),
    ) {
        let mut text = String::new();
        let mut expected = String::new();
        for (is_column, part) in &parts {
            if *is_column {
                text.push_str(&format!("{{{part}}}"));
                let i = ["a", "b", "c"].iter().position(|c| c == part).unwrap();
                expected.push_str(&values[i]);
            } else {
                text.push_str(&part.replace('{', "{{").replace('}', "}}"));
                expected.push_str(part);
            }
        }
        let template = Template::parse(&text).unwrap();
        let columns: Vec<&str> = parts.iter().filter(|(c, _)| *c).map(|(_, p)| p.as_str()).collect();
        prop_assert_eq!(template.columns().collect::<Vec<_>>(), columns);

        // Rendered through a route: the topic is the template over columns a, b, c.
        let spec = RouteSpec {
            topic: text.clone(),
            key: String::new(),
            id_column: String::new(),
            type_column: String::new(),
            payload_column: "a".into(),
            headers_column: String::new(),
            ..RouteSpec::standard()
        };
        let table: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let router = Router::bind(&spec, &table).unwrap();
        let row: Vec<Option<Bytes>> = values.iter().map(|v| Some(Bytes::from(v.clone()))).collect();
        let position = Position { commit_lsn: Lsn::new(1), index: 0 };
        let record = router.route(&row, position, 0);
        prop_assert_eq!(record.poison, None);
        prop_assert_eq!(record.event.topic, expected);
    }
}
