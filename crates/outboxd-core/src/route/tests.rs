//! Unit tests of the module above.

use super::template::Part;
use super::*;
use crate::lsn::Lsn;

fn columns() -> Vec<String> {
    [
        "id",
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "payload",
        "headers",
        "created_at",
    ]
    .map(String::from)
    .to_vec()
}

fn row(values: [Option<&str>; 7]) -> Vec<Option<Bytes>> {
    values
        .iter()
        .map(|v| v.map(|s| Bytes::copy_from_slice(s.as_bytes())))
        .collect()
}

fn pos() -> Position {
    Position {
        commit_lsn: Lsn::new(0x1_0000_00A0),
        index: 3,
    }
}

fn standard_row() -> Vec<Option<Bytes>> {
    row([
        Some("0b6f1f3c-6d1c-4a8e-9a53-1f0f0e3c2a11"),
        Some("order"),
        Some("123"),
        Some("order.paid"),
        Some(r#"{"amount": 5}"#),
        Some(r#"{"traceparent": "00-ab", "schema_version": 2}"#),
        Some("2026-11-22 10:00:00+00"),
    ])
}

#[test]
fn parses_templates_with_escapes() {
    let t = Template::parse("a.{x}.{{lit}}-{y}").expect("parses");
    assert_eq!(t.columns().collect::<Vec<_>>(), ["x", "y"]);
    assert_eq!(
        t.parts,
        vec![
            Part::Text("a.".into()),
            Part::Column("x".into()),
            Part::Text(".{lit}-".into()),
            Part::Column("y".into()),
        ]
    );
    assert_eq!(
        Template::parse("a{b").unwrap_err(),
        TemplateError::Unclosed { at: 1 }
    );
    assert_eq!(
        Template::parse("a}b").unwrap_err(),
        TemplateError::Unmatched { at: 1 }
    );
    assert_eq!(
        Template::parse("{}").unwrap_err(),
        TemplateError::EmptyPlaceholder { at: 0 }
    );
    assert_eq!(
        Template::parse("{a{b}").unwrap_err(),
        TemplateError::Unclosed { at: 0 }
    );
}

#[test]
fn routes_the_standard_table() {
    let router = Router::bind(&RouteSpec::standard(), &columns()).expect("binds");
    let record = router.route(&standard_row(), pos(), 42);
    assert_eq!(record.poison, None);
    let e = record.event;
    assert_eq!(e.id, "0b6f1f3c-6d1c-4a8e-9a53-1f0f0e3c2a11");
    assert_eq!(e.topic, "outbox.order");
    assert_eq!(e.key, "123");
    assert_eq!(e.event_type, "order.paid");
    assert_eq!(e.payload, r#"{"amount": 5}"#);
    assert_eq!(
        e.headers.pairs,
        vec![
            ("schema_version".to_owned(), Bytes::from("2")),
            ("traceparent".to_owned(), Bytes::from("00-ab")),
        ]
    );
    assert_eq!(e.position, pos());
    assert_eq!(e.commit_time_micros, 42);
}

#[test]
fn unknown_columns_are_named_at_bind_time() {
    let mut spec = RouteSpec::standard();
    spec.topic = "outbox.{aggregatetype}".into();
    let err = Router::bind(&spec, &columns()).unwrap_err();
    assert!(
        matches!(err, RouteError::UnknownColumn { field: "topic", ref column, .. } if column == "aggregatetype")
    );
    assert!(err.to_string().contains("aggregate_type"), "{err}");

    let mut spec = RouteSpec::standard();
    spec.headers_column = "hdrs".into();
    assert!(matches!(
        Router::bind(&spec, &columns()),
        Err(RouteError::UnknownColumn {
            field: "headers_column",
            ..
        })
    ));
}

#[test]
fn null_and_empty_routed_fields_are_poison() {
    let router = Router::bind(&RouteSpec::standard(), &columns()).expect("binds");

    let mut values = standard_row();
    values[1] = None;
    let r = router.route(&values, pos(), 0);
    let poison = r.poison.expect("poison");
    assert_eq!(poison.kind, PoisonKind::NullField);
    assert!(poison.detail.contains("aggregate_type"), "{poison}");
    // Everything else is still carried to the dead letter.
    assert_eq!(r.event.key, "123");
    assert_eq!(r.event.payload, r#"{"amount": 5}"#);

    let mut values = standard_row();
    values[2] = Some(Bytes::new());
    let poison = router.route(&values, pos(), 0).poison.expect("poison");
    assert_eq!(poison.kind, PoisonKind::EmptyField);

    let mut values = standard_row();
    values[4] = None;
    let poison = router.route(&values, pos(), 0).poison.expect("poison");
    assert_eq!(poison.kind, PoisonKind::NullField);
    assert!(poison.detail.contains("payload"));
}

#[test]
fn headers_must_be_an_object() {
    let router = Router::bind(&RouteSpec::standard(), &columns()).expect("binds");
    let mut values = standard_row();
    values[5] = Some(Bytes::from_static(b"[1, 2]"));
    let r = router.route(&values, pos(), 0);
    assert_eq!(r.poison.expect("poison").kind, PoisonKind::InvalidHeaders);
    assert_eq!(r.event.headers.json, "[1, 2]");

    values[5] = None;
    let r = router.route(&values, pos(), 0);
    assert_eq!(r.poison, None);
    assert_eq!(r.event.headers, Headers::empty());
}

#[test]
fn other_table_shapes_route_by_configuration() {
    // The Debezium outbox shape.
    let columns: Vec<String> = ["id", "aggregatetype", "aggregateid", "type", "payload"]
        .map(String::from)
        .to_vec();
    let spec = RouteSpec {
        topic: "outbox.event.{aggregatetype}".into(),
        key: "{aggregateid}".into(),
        id_column: "id".into(),
        type_column: "type".into(),
        payload_column: "payload".into(),
        headers_column: String::new(),
        ..RouteSpec::standard()
    };
    let router = Router::bind(&spec, &columns).expect("binds");
    let values: Vec<Option<Bytes>> = ["e1", "customer", "7", "created", "{}"]
        .map(|s| Some(Bytes::from(s)))
        .to_vec();
    let e = router.route(&values, pos(), 0).event;
    assert_eq!(e.topic, "outbox.event.customer");
    assert_eq!(e.key, "7");

    // A table without id or key: ids come from the WAL position.
    let columns: Vec<String> = ["topic", "payload"].map(String::from).to_vec();
    let spec = RouteSpec {
        topic: "{topic}".into(),
        key: String::new(),
        id_column: String::new(),
        type_column: String::new(),
        payload_column: "payload".into(),
        headers_column: String::new(),
        ..RouteSpec::standard()
    };
    let router = Router::bind(&spec, &columns).expect("binds");
    let values = vec![Some(Bytes::from("jobs")), Some(Bytes::from("{}"))];
    let r = router.route(&values, pos(), 0);
    assert_eq!(r.poison, None);
    assert_eq!(r.event.id, "1/A0#3");
    assert_eq!(r.event.key, "");
}

#[test]
fn a_template_becomes_a_glob_of_the_names_it_can_produce() {
    let t = Template::parse("outbox.{aggregate_type}").unwrap();
    assert_eq!(t.glob(), "outbox.*");
    let t = Template::parse("a*b?[{x}]-{y}").unwrap();
    assert_eq!(t.glob(), "a\\*b\\?\\[*\\]-*");
    assert_eq!(Template::parse("fixed").unwrap().glob(), "fixed");
}

fn debezium_columns() -> Vec<String> {
    [
        "id",
        "aggregatetype",
        "aggregateid",
        "type",
        "payload",
        "note",
        "at",
    ]
    .map(String::from)
    .to_vec()
}

fn debezium_row(payload: Option<&str>) -> Vec<Option<Bytes>> {
    [
        Some("4d47e190-0402-4048-bc2c-89dd54343cdc"),
        Some("order"),
        Some("1"),
        Some("OrderCreated"),
        payload,
        None,
        Some("2019-05-03 13:31:34.484+00"),
    ]
    .iter()
    .map(|v| v.map(|s| Bytes::copy_from_slice(s.as_bytes())))
    .collect()
}

#[test]
fn the_debezium_preset_routes_as_the_event_router() {
    let router = Router::bind(&RouteSpec::debezium(false), &debezium_columns()).unwrap();
    let r = router.route(
        &debezium_row(Some(r#"{"id": 1, "s": "a\"b"}"#)),
        pos(),
        7_000,
    );
    assert_eq!(r.poison, None);
    assert_eq!(r.event.topic, "outbox.event.order");
    assert_eq!(r.event.key, "1");
    assert_eq!(r.event.id, "4d47e190-0402-4048-bc2c-89dd54343cdc");
    assert_eq!(r.event.event_type, "OrderCreated");
    assert_eq!(r.event.payload, r#""{\"id\": 1, \"s\": \"a\\\"b\"}""#);
    assert_eq!(r.event.timestamp_millis(), 7);
    assert_eq!(r.event.time_millis, None);

    let router = Router::bind(&RouteSpec::debezium(true), &debezium_columns()).unwrap();
    let r = router.route(&debezium_row(Some(r#"{"id": 1, "s": "a b"}"#)), pos(), 0);
    assert_eq!(r.event.payload, r#"{"id":1,"s":"a b"}"#);
    // Not JSON: kept, as a string.
    let r = router.route(&debezium_row(Some("plain text")), pos(), 0);
    assert_eq!(r.event.payload, r#""plain text""#);
}

#[test]
fn a_bytea_payload_is_forwarded_as_its_bytes() {
    let mut types = vec![2950, 1043, 1043, 1043, value::BYTEA_OID, 25, 1184];
    let spec = RouteSpec::debezium(false);
    let router = Router::bind_typed(&spec, &debezium_columns(), &types).unwrap();
    let r = router.route(&debezium_row(Some("\\x00ff5c22")), pos(), 0);
    assert_eq!(r.poison, None);
    assert_eq!(
        r.event.payload.as_ref(),
        [0x00, 0xff, 0x5c, 0x22],
        "raw, not a JSON string"
    );

    let r = router.route(&debezium_row(Some("\\x0")), pos(), 0);
    assert_eq!(r.poison.unwrap().kind, PoisonKind::InvalidPayload);

    // The same text in a text column is text.
    types[4] = 25;
    let router = Router::bind_typed(&RouteSpec::standard(), &columns(), &types).unwrap();
    let mut row = standard_row();
    row[4] = Some(Bytes::from_static(b"\\x00ff"));
    assert_eq!(router.route(&row, pos(), 0).event.payload, "\\x00ff");
}

#[test]
fn a_null_payload_is_a_tombstone_only_when_asked() {
    let mut spec = RouteSpec::debezium(false);
    let router = Router::bind(&spec, &debezium_columns()).unwrap();
    let r = router.route(&debezium_row(None), pos(), 0);
    assert_eq!(r.poison.unwrap().kind, PoisonKind::NullField);

    spec.tombstone_on_null = true;
    let router = Router::bind(&spec, &debezium_columns()).unwrap();
    let r = router.route(&debezium_row(None), pos(), 0);
    assert_eq!(r.poison, None);
    assert!(r.event.tombstone);
    assert!(r.event.payload.is_empty());
    // An empty payload is not a tombstone.
    let r = router.route(&debezium_row(Some("")), pos(), 0);
    assert!(!r.event.tombstone);
}

#[test]
fn route_headers_and_the_timestamp_come_from_columns() {
    let mut spec = RouteSpec::debezium(false);
    spec.attributes = vec![
        ("kind".into(), "{aggregatetype}/{type}".into()),
        ("note".into(), "{note}".into()),
        ("source".into(), "billing".into()),
    ];
    spec.timestamp = TimestampSource::Column("at".into());
    let router = Router::bind(&spec, &debezium_columns()).unwrap();
    let r = router.route(&debezium_row(Some("{}")), pos(), 0);
    assert_eq!(r.poison, None);
    assert_eq!(
        r.event.attributes,
        vec![
            ("kind".to_owned(), Bytes::from("order/OrderCreated")),
            ("source".to_owned(), Bytes::from("billing")),
        ],
        "a header over a NULL column is left out"
    );
    assert_eq!(r.event.time_millis, Some(1_556_890_294_484));
    assert_eq!(r.event.timestamp_millis(), 1_556_890_294_484);

    let mut row = debezium_row(Some("{}"));
    row[6] = Some(Bytes::from_static(b"infinity"));
    let poison = router.route(&row, pos(), 0).poison.unwrap();
    assert_eq!(poison.kind, PoisonKind::InvalidTimestamp);
    row[6] = None;
    let poison = router.route(&row, pos(), 0).poison.unwrap();
    assert_eq!(poison.kind, PoisonKind::NullField);
    assert!(poison.detail.contains("\"at\""), "{poison}");

    spec.timestamp = TimestampSource::Commit;
    let router = Router::bind(&spec, &debezium_columns()).unwrap();
    assert_eq!(
        router.route(&row, pos(), 5_000_999).event.time_millis,
        Some(5_000)
    );

    spec.attributes = vec![("x".into(), "{missing}".into())];
    let err = Router::bind(&spec, &debezium_columns()).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    spec.attributes = vec![("x".into(), "{open".into())];
    let err = Router::bind(&spec, &debezium_columns()).unwrap_err();
    assert!(err.to_string().starts_with("route.headers.x"), "{err}");
    spec.attributes = Vec::new();
    spec.timestamp = TimestampSource::Column("when".into());
    assert!(Router::bind(&spec, &debezium_columns()).is_err());
}
