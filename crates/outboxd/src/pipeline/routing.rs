//! From the WAL's outbox rows and messages to records for the sink.
//!
//! The route is bound to the columns it reads: the table's, known at startup and again from
//! each Relation message (the table's shape may change while outboxd runs), or the fields of
//! table-less messages. A row is routed as it is; a message is first decoded into those
//! columns. A replayed row carries the [`REPLAY_HEADER`]; a message whose content cannot be
//! decoded becomes a dead-letter record (the stream goes on), identified by its WAL position.

use bytes::Bytes;
use outboxd_core::{
    Event, Headers, Poison, PoisonKind, Position, Record, RouteError, RouteSpec, Router,
};
use outboxd_postgres::message::{self, MessageKind};

/// The header that marks a replayed event (`outboxd replay`).
pub const REPLAY_HEADER: &str = "outboxd-replay";

/// The route, bound to the columns records are read from.
#[derive(Debug)]
pub(super) struct Routing<'a> {
    /// The configured route, bound again at each Relation.
    spec: &'a RouteSpec,
    /// `spec` bound to `columns`.
    router: Router,
    /// The columns `router` is bound to: messages are decoded into them.
    columns: Vec<String>,
}

impl<'a> Routing<'a> {
    /// `spec` bound to `columns` (and their type OIDs, where known): those known at startup,
    /// until the first Relation.
    pub(super) fn new(
        spec: &'a RouteSpec,
        columns: &[String],
        types: &[u32],
    ) -> Result<Self, RouteError> {
        Ok(Routing {
            spec,
            router: Router::bind_typed(spec, columns, types)?,
            columns: columns.to_vec(),
        })
    }

    /// The table's shape, from a Relation message: later rows and messages have `columns`.
    pub(super) fn rebind(&mut self, columns: Vec<String>, types: &[u32]) -> Result<(), RouteError> {
        self.router = Router::bind_typed(self.spec, &columns, types)?;
        self.columns = columns;
        Ok(())
    }

    /// An outbox row (values in column order, `None` for NULL) as a record.
    pub(super) fn row(
        &self,
        values: &[Option<Bytes>],
        position: Position,
        commit_time_micros: i64,
    ) -> Record {
        self.router.route(values, position, commit_time_micros)
    }

    /// One of outboxd's logical decoding messages as a record: its row routed (to the topic it
    /// names, if any), or, when it cannot be decoded, a dead letter.
    pub(super) fn message(
        &self,
        kind: MessageKind,
        content: Bytes,
        position: Position,
        commit_time_micros: i64,
    ) -> Record {
        match message::decode(kind, &content, &self.columns) {
            Ok(row) => {
                let mut record = self.router.route(&row.values, position, commit_time_micros);
                if let Some(topic) = row.topic {
                    record.event.topic = topic;
                }
                if kind == MessageKind::Replay {
                    record.event.headers.push_front(REPLAY_HEADER, "true");
                }
                record
            }
            Err(e) => invalid_message(content, position, commit_time_micros, &e),
        }
    }
}

/// The dead-letter record of a message whose content cannot be decoded: its content as the
/// payload, its WAL position as the id.
fn invalid_message(
    content: Bytes,
    position: Position,
    commit_time_micros: i64,
    error: &message::MessageError,
) -> Record {
    Record::dead_letter(
        Event {
            id: Bytes::from(position.to_string()),
            topic: String::new(),
            key: Bytes::new(),
            event_type: Bytes::new(),
            payload: content,
            headers: Headers::empty(),
            position,
            commit_time_micros,
            tombstone: false,
            time_millis: None,
            attributes: Vec::new(),
        },
        Poison::new(PoisonKind::InvalidMessage, error.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use outboxd_core::Lsn;

    use super::*;

    fn at(index: u32) -> Position {
        Position {
            commit_lsn: Lsn::new(0x100),
            index,
        }
    }

    fn table_columns() -> Vec<String> {
        [
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    #[test]
    fn a_replayed_row_keeps_its_route_and_is_marked() {
        let spec = RouteSpec::standard();
        let routing = Routing::new(&spec, &table_columns(), &[]).unwrap();
        let content = Bytes::from_static(
            br#"{"row": {"id": "e1", "aggregate_type": "order", "aggregate_id": "7", "event_type": "paid", "payload": "{}", "headers": null}}"#,
        );
        let record = routing.message(MessageKind::Replay, content, at(0), 1);
        assert_eq!(record.poison, None);
        assert_eq!(record.event.topic, "outbox.order");
        assert_eq!(record.event.id, "e1");
        assert_eq!(record.event.key, "7");
        assert_eq!(record.event.headers.pairs[0].0, REPLAY_HEADER);
    }

    #[test]
    fn a_replay_to_a_topic_of_its_own_goes_there() {
        let spec = RouteSpec::standard();
        let routing = Routing::new(&spec, &table_columns(), &[]).unwrap();
        let content = Bytes::from_static(
            br#"{"row": {"id": "e1", "aggregate_type": "order", "aggregate_id": "7", "payload": "{}"}, "topic": "repair"}"#,
        );
        let record = routing.message(MessageKind::Replay, content, at(0), 1);
        assert_eq!(record.event.topic, "repair");
    }

    #[test]
    fn a_message_that_cannot_be_decoded_is_dead_lettered_by_its_position() {
        let spec = RouteSpec::standard();
        let routing = Routing::new(&spec, &message::event_columns(), &[]).unwrap();
        let record = routing.message(
            MessageKind::Event,
            Bytes::from_static(b"not json"),
            at(3),
            1,
        );
        let poison = record.poison.expect("dead-lettered");
        assert_eq!(poison.kind, PoisonKind::InvalidMessage);
        assert_eq!(record.event.id, at(3).to_string());
        assert_eq!(record.event.payload, "not json");
    }

    #[test]
    fn a_relation_rebinds_the_route_and_a_shape_it_cannot_read_is_an_error() {
        let spec = RouteSpec::standard();
        let mut routing = Routing::new(&spec, &table_columns(), &[]).unwrap();
        let mut columns = table_columns();
        columns.swap(0, 4);
        routing.rebind(columns, &[]).unwrap();
        let values: Vec<Option<Bytes>> = ["{}", "order", "7", "paid", "e1", "{}"]
            .map(|v| Some(Bytes::from(v)))
            .to_vec();
        let record = routing.row(&values, at(0), 1);
        assert_eq!(
            (record.event.id.as_ref(), record.event.payload.as_ref()),
            (&b"e1"[..], &b"{}"[..])
        );
        assert!(routing.rebind(vec!["id".into()], &[]).is_err());
    }
}
