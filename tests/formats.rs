//! The formats consumers already read, end to end on real servers: Debezium's Outbox Event
//! Router (`[route] preset = "debezium"`) on Apache Kafka, taking over a Debezium slot,
//! `[route.headers]`, `[route] timestamp`, bytea payloads byte for byte, Kafka tombstones,
//! renamed Redis fields, and poison under each.
//!
//! The Event Router fixtures come from Debezium's documentation, "Outbox Event Router"
//! (documentation/modules/ROOT/pages/transformations/outbox-event-router.adoc in
//! github.com/debezium/debezium): the example outbox row and the Kafka message it documents
//! for it (topic `outbox.event.order`, key `1`, header `id=4d47e190-…`, the payload as an
//! escaped JSON string, or expanded with `table.expand.json.payload = true`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(all(feature = "kafka", feature = "redis"))] // both brokers are read here

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::apache_kafka::Kafka;
use support::kafka::*;
use support::*;

/// The documented example row: id, aggregatetype, aggregateid, type, payload.
const DOC_ID: &str = "4d47e190-0402-4048-bc2c-89dd54343cdc";
const DOC_PAYLOAD: &str = r#"{"id": 1, "lineItems": [{"id": 1, "item": "Debezium in Action", "status": "ENTERED", "quantity": 2, "totalPrice": 39.98}, {"id": 2, "item": "Debezium for Dummies", "status": "ENTERED", "quantity": 1, "totalPrice": 29.99}], "orderDate": "2019-01-31T12:13:01", "customerId": 123}"#;
/// The value the documentation shows for it with the defaults: the payload as a JSON string.
const DOC_VALUE: &str = r#""{\"id\": 1, \"lineItems\": [{\"id\": 1, \"item\": \"Debezium in Action\", \"status\": \"ENTERED\", \"quantity\": 2, \"totalPrice\": 39.98}, {\"id\": 2, \"item\": \"Debezium for Dummies\", \"status\": \"ENTERED\", \"quantity\": 1, \"totalPrice\": 29.99}], \"orderDate\": \"2019-01-31T12:13:01\", \"customerId\": 123}""#;
/// The expanded value the documentation shows (pretty-printed there; Kafka Connect's
/// JsonConverter writes it without whitespace).
const DOC_EXPANDED: &str = r#"{"id": 1, "lineItems": [{"id": 1, "item": "Debezium in Action", "status": "ENTERED", "quantity": 2, "totalPrice": 39.98}, {"id": 2, "item": "Debezium for Dummies", "status": "ENTERED", "quantity": 1, "totalPrice": 29.99}], "orderDate": "2019-01-31T12:13:01", "customerId": 123}"#;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A one-node Apache Kafka, and Postgres with outboxd configured for it (topics created by
/// outboxd), with `sink` as the `[sink]` lines.
async fn kafka_env(sink: &str) -> (Kafka, String, SinkEnv) {
    let kafka = Kafka::single();
    let brokers = kafka.brokers();
    let settings = KafkaSettings {
        sink: sink.into(),
        kafka: "create_topics = true".into(),
        ..KafkaSettings::default()
    };
    let env = SinkEnv::kafka(&brokers, &settings).await;
    (kafka, brokers, env)
}

/// Debezium's outbox table as its documentation gives it, a publication as Debezium creates
/// one, and a pgoutput slot named as Debezium names it.
async fn debezium_schema(db: &tokio_postgres::Client) {
    db.batch_execute(
        "CREATE TABLE outboxevent (
             id uuid NOT NULL PRIMARY KEY,
             aggregatetype varchar(255),
             aggregateid varchar(255) NOT NULL,
             type varchar(255) NOT NULL,
             payload jsonb);
         GRANT SELECT ON outboxevent TO outboxd;
         CREATE PUBLICATION dbz_publication FOR TABLE outboxevent;",
    )
    .await
    .unwrap();
    // Alone: a slot cannot be created in a transaction that has written.
    db.batch_execute("SELECT pg_create_logical_replication_slot('debezium', 'pgoutput')")
        .await
        .unwrap();
}

async fn insert_debezium(
    db: &tokio_postgres::Client,
    id: &str,
    aggregate: Option<&str>,
    payload: &str,
) {
    db.execute(
        "INSERT INTO outboxevent VALUES ($1::text::uuid, $2, '1', 'OrderCreated', $3::text::jsonb)",
        &[&id, &aggregate, &payload],
    )
    .await
    .unwrap();
}

const DEBEZIUM_ENV: [(&str, &str); 4] = [
    ("OUTBOXD_ROUTE__PRESET", "debezium"),
    ("OUTBOXD_POSTGRES__TABLE", "public.outboxevent"),
    ("OUTBOXD_POSTGRES__SLOT", "debezium"),
    ("OUTBOXD_POSTGRES__PUBLICATION", "dbz_publication"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debezium_preset_takes_over_its_slot_and_writes_what_the_event_router_documents() {
    let (_kafka, brokers, env) = kafka_env("").await;
    let db = env.db().await;
    debezium_schema(&db).await;

    // Debezium has read and confirmed three events (consumed here through its slot, as it
    // would); two more are committed but not yet read when it stops.
    for i in 0..3 {
        insert_debezium(
            &db,
            &format!("00000000-0000-0000-0000-00000000000{i}"),
            Some("order"),
            "{\"before\": true}",
        )
        .await;
    }
    db.execute(
        "SELECT count(*) FROM pg_logical_slot_get_binary_changes('debezium', NULL, NULL, \
         'proto_version', '1', 'publication_names', 'dbz_publication')",
        &[],
    )
    .await
    .unwrap();
    insert_debezium(
        &db,
        "00000000-0000-0000-0000-0000000000a1",
        Some("order"),
        "{\"after\": 1}",
    )
    .await;
    insert_debezium(
        &db,
        "00000000-0000-0000-0000-0000000000a2",
        Some("order"),
        "{\"after\": 2}",
    )
    .await;

    // outboxd on Debezium's slot and publication: `check` passes, `run` continues from where
    // Debezium confirmed.
    let out = env.command_with(&["check"], &DEBEZIUM_ENV);
    assert!(out.status.success(), "check: {}", output_text(&out));
    let mut outboxd = env.run_with(&DEBEZIUM_ENV);
    let before = now_ms();
    insert_debezium(&db, DOC_ID, Some("order"), DOC_PAYLOAD).await;
    let after = now_ms();
    // Poison under the preset: no aggregatetype, so no topic.
    insert_debezium(&db, "00000000-0000-0000-0000-0000000000d1", None, "{}").await;

    let read = read_topic(
        &brokers,
        "outbox.event.order",
        Duration::from_secs(60),
        |m| m.len() >= 3,
    )
    .await;
    let ids: Vec<&str> = read.iter().map(|m| m.header("id").unwrap()).collect();
    assert_eq!(
        ids,
        [
            "00000000-0000-0000-0000-0000000000a1",
            "00000000-0000-0000-0000-0000000000a2",
            DOC_ID
        ],
        "exactly the events Debezium had not confirmed, then the new one"
    );
    let doc = &read[2];
    assert_eq!(doc.key.as_deref(), Some("1"));
    assert_eq!(doc.headers, [("id".to_owned(), DOC_ID.to_owned())]);
    assert_eq!(doc.raw_value.as_deref(), Some(DOC_VALUE.as_bytes()));
    let ts = doc.timestamp.expect("a timestamp");
    assert!(
        (before - 1000..=after + 1000).contains(&ts),
        "the commit time, {ts} not within {before}..{after}"
    );

    let dlq = read_topic(&brokers, "outboxd.dlq", Duration::from_secs(30), |m| {
        !m.is_empty()
    })
    .await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("reason"), Some("null_field"));
    assert!(
        dlq[0].header("detail").unwrap().contains("aggregatetype"),
        "{:?}",
        dlq[0]
    );
    assert_eq!(
        dlq[0].header("id"),
        Some("00000000-0000-0000-0000-0000000000d1")
    );

    // table.expand.json.payload = true: the document itself, compact.
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
    let mut expanded_env = DEBEZIUM_ENV.to_vec();
    expanded_env.push(("OUTBOXD_ROUTE__EXPAND_JSON_PAYLOAD", "true"));
    let _outboxd = env.run_with(&expanded_env);
    insert_debezium(
        &db,
        "00000000-0000-0000-0000-0000000000e1",
        Some("order"),
        DOC_PAYLOAD,
    )
    .await;
    insert_debezium(
        &db,
        "00000000-0000-0000-0000-0000000000e2",
        Some("order"),
        "{\"note\": \"a \\\"quoted\\\" line\\nbreak\"}",
    )
    .await;
    let read = read_topic(
        &brokers,
        "outbox.event.order",
        Duration::from_secs(60),
        |m| m.len() >= 5,
    )
    .await;
    assert_eq!(read.len(), 5, "{read:?}");
    let expanded = String::from_utf8(read[3].raw_value.clone().unwrap()).unwrap();
    // The documented document, member order kept, without the whitespace (no string in it
    // holds ", " or ": ").
    let compact = DOC_EXPANDED.replace(": ", ":").replace(", ", ",");
    assert_eq!(expanded, compact);
    let parsed = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    assert_eq!(parsed(&expanded), parsed(DOC_EXPANDED));
    assert_eq!(read[4].value, r#"{"note":"a \"quoted\" line\nbreak"}"#);
    assert_eq!(
        read[4].headers.len(),
        1,
        "only the id header: {:?}",
        read[4].headers
    );
}

/// A table with a bytea payload, a topic and key column, a tenant and a time column.
async fn bytes_schema(db: &tokio_postgres::Client) {
    db.batch_execute(
        "CREATE TABLE blobs (
             id uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
             topic text NOT NULL,
             key text NOT NULL,
             payload bytea,
             tenant text,
             happened_at timestamptz);
         GRANT SELECT ON blobs TO outboxd;
         CREATE PUBLICATION blobs FOR TABLE blobs;",
    )
    .await
    .unwrap();
}

const BYTES_ENV: [(&str, &str); 13] = [
    ("OUTBOXD_POSTGRES__TABLE", "public.blobs"),
    ("OUTBOXD_POSTGRES__SLOT", "blobs"),
    ("OUTBOXD_POSTGRES__PUBLICATION", "blobs"),
    ("OUTBOXD_ROUTE__TOPIC", "{topic}"),
    ("OUTBOXD_ROUTE__KEY", "{key}"),
    ("OUTBOXD_ROUTE__TYPE_COLUMN", ""),
    ("OUTBOXD_ROUTE__HEADERS_COLUMN", ""),
    ("OUTBOXD_ROUTE__TIMESTAMP", "happened_at"),
    ("OUTBOXD_ROUTE__HEADERS__TENANT", "{tenant}"),
    ("OUTBOXD_ROUTE__HEADERS__SOURCE", "billing"),
    ("OUTBOXD_SINK__KAFKA__TOMBSTONE_ON_NULL", "true"),
    ("OUTBOXD_SINK__REDIS__FIELDS__PAYLOAD", "data"),
    ("OUTBOXD_SINK__REDIS__FIELDS__HEADERS", ""),
];

/// Every byte value, twice, with the ones text would mangle (NUL, `\`, invalid UTF-8).
fn all_bytes() -> Vec<u8> {
    (0..=255u8).chain((0..=255u8).rev()).collect()
}

async fn insert_blob(
    db: &tokio_postgres::Client,
    key: &str,
    payload: Option<&[u8]>,
    tenant: Option<&str>,
    happened_at: Option<&str>,
) {
    db.execute(
        "INSERT INTO blobs (topic, key, payload, tenant, happened_at) \
         VALUES ('blobs', $1, $2, $3, $4::text::timestamptz)",
        &[&key, &payload, &tenant, &happened_at],
    )
    .await
    .unwrap();
}

/// 2019-05-03 13:31:34.484 UTC, and the same instant in milliseconds.
const HAPPENED: &str = "2019-05-03 15:31:34.484+02";
const HAPPENED_MS: i64 = 1_556_890_294_484;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_carries_bytea_tombstones_route_headers_and_the_row_time() {
    let (_kafka, brokers, env) = kafka_env("").await;
    let db = env.db().await;
    bytes_schema(&db).await;
    let out = env.command_with(&["setup"], &BYTES_ENV);
    assert!(out.status.success(), "setup: {}", output_text(&out));
    let _outboxd = env.run_with(&BYTES_ENV);

    insert_blob(&db, "k1", Some(&all_bytes()), Some("acme"), Some(HAPPENED)).await;
    insert_blob(&db, "k1", None, Some("acme"), Some(HAPPENED)).await;
    insert_blob(&db, "k2", Some(b""), None, Some(HAPPENED)).await;
    // Poison: the timestamp column is NULL, or not a timestamp the route can read.
    insert_blob(&db, "k3", Some(b"x"), Some("acme"), None).await;

    let read = read_topic(&brokers, "blobs", Duration::from_secs(60), |m| m.len() >= 3).await;
    assert_eq!(read.len(), 3, "{read:?}");
    let bytes = &read[0];
    assert_eq!(
        bytes.raw_value.as_deref(),
        Some(&all_bytes()[..]),
        "bytea arrives byte for byte"
    );
    assert_eq!(bytes.key.as_deref(), Some("k1"));
    assert_eq!(bytes.timestamp, Some(HAPPENED_MS));
    let names: Vec<&str> = bytes.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["id", "type", "source", "tenant"]);
    assert_eq!(bytes.header("tenant"), Some("acme"));
    assert_eq!(bytes.header("source"), Some("billing"));

    let tombstone = &read[1];
    assert_eq!(tombstone.raw_value, None, "a NULL payload is a tombstone");
    assert_eq!(tombstone.key.as_deref(), Some("k1"));

    let empty = &read[2];
    assert_eq!(
        empty.raw_value.as_deref(),
        Some(&b""[..]),
        "an empty bytea is an empty value, not a tombstone"
    );
    assert_eq!(
        empty.header("tenant"),
        None,
        "a NULL tenant leaves the header out"
    );
    assert_eq!(empty.header("source"), Some("billing"));

    let dlq = read_topic(&brokers, "outboxd.dlq", Duration::from_secs(30), |m| {
        !m.is_empty()
    })
    .await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].header("reason"), Some("null_field"));
    assert!(
        dlq[0].header("detail").unwrap().contains("happened_at"),
        "{:?}",
        dlq[0]
    );
    assert_eq!(dlq[0].raw_value.as_deref(), Some(&b"x"[..]));
}

/// Every entry of `stream`, each field's value as bytes.
async fn read_raw(
    redis: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<Vec<(String, Vec<u8>)>> {
    let reply: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(redis)
        .await
        .unwrap();
    reply
        .into_iter()
        .map(|(_, flat)| {
            flat.chunks(2)
                .map(|kv| (String::from_utf8_lossy(&kv[0]).into_owned(), kv[1].clone()))
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_carries_bytea_renamed_fields_route_headers_and_the_row_time() {
    let env = Env::start().await;
    let db = env.db().await;
    bytes_schema(&db).await;
    let out = env.command_with(&["setup"], &BYTES_ENV);
    assert!(out.status.success(), "setup: {}", output_text(&out));
    let _outboxd = env.run_with(&BYTES_ENV);
    let mut redis = env.redis.connect().await;

    insert_blob(&db, "k1", Some(&all_bytes()), Some("acme"), Some(HAPPENED)).await;
    // Poison on Redis: a NULL payload (no tombstones in a stream), a time that is not one.
    insert_blob(&db, "k1", None, Some("acme"), Some(HAPPENED)).await;
    db.execute(
        "INSERT INTO blobs (topic, key, payload, happened_at) VALUES ('blobs', 'k2', 'y', 'infinity')",
        &[],
    )
    .await
    .unwrap();

    wait_stream_len(&redis, "outboxd.dlq", 2, Duration::from_secs(30)).await;
    let entries = read_raw(&mut redis, "blobs").await;
    assert_eq!(entries.len(), 1);
    let names: Vec<&str> = entries[0].iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["id", "type", "key", "data", "time", "source", "tenant"]
    );
    let field = |name: &str| {
        entries[0]
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        field("data"),
        Some(all_bytes()),
        "bytea arrives byte for byte"
    );
    assert_eq!(field("time"), Some(HAPPENED_MS.to_string().into_bytes()));
    assert_eq!(field("tenant"), Some(b"acme".to_vec()));

    // A replayed row goes through the bytea's text form: it arrives as the same bytes.
    let out = env.command_with(
        &[
            "replay",
            "--where",
            "payload IS NOT NULL AND tenant = 'acme'",
        ],
        &BYTES_ENV,
    );
    assert!(out.status.success(), "replay: {}", output_text(&out));
    wait_stream_len(&redis, "blobs", 2, Duration::from_secs(30)).await;
    let entries = read_raw(&mut redis, "blobs").await;
    let replayed = &entries[1];
    let data = replayed
        .iter()
        .find(|(n, _)| n == "data")
        .map(|(_, v)| v.clone());
    assert_eq!(
        data,
        Some(all_bytes()),
        "a replayed bytea arrives byte for byte"
    );

    let dlq = read_stream(&mut redis, "outboxd.dlq").await;
    assert_eq!(dlq[0].get("reason"), Some("null_field"));
    assert!(
        dlq[0].get("detail").unwrap().contains("payload"),
        "{:?}",
        dlq[0]
    );
    assert_eq!(dlq[1].get("reason"), Some("invalid_timestamp"));
    assert!(
        dlq[1].get("detail").unwrap().contains("infinity"),
        "{:?}",
        dlq[1]
    );
    assert_eq!(
        dlq[1].get("data"),
        Some("y"),
        "the dead letter keeps the payload"
    );
}

/// The records as the CloudEvents SDK for Python decodes them (tests/support/
/// cloudevents_decode.py): one JSON object per record.
fn decode_with_the_sdk(records: &[KafkaMessage], mode: &str) -> Vec<serde_json::Value> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let input: Vec<serde_json::Value> = records
        .iter()
        .map(|m| {
            serde_json::json!({
                "mode": mode,
                "headers": m.headers.iter().map(|(n, v)| (n.clone(), b64(v.as_bytes()))).collect::<Vec<_>>(),
                "key": m.key.as_ref().map(|k| b64(k.as_bytes())),
                "value": b64(m.raw_value.as_deref().unwrap_or_default()),
            })
        })
        .collect();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/cloudevents_decode.py"
    );
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(&serde_json::to_vec(&input).unwrap())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the CloudEvents SDK for Python (pip install cloudevents; scripts/test.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloudevents_sdk_decodes_both_modes_from_kafka() {
    let (_kafka, brokers, env) =
        kafka_env("envelope = \"cloudevents\"\nsource = \"/shop/orders\"").await;
    let db = env.db().await;
    let emit = |id: &'static str, event_type: &'static str, payload: &'static str| {
        let db = &db;
        async move {
            db.execute(
                "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) \
                 VALUES ($1::text::uuid, 'order', '42', $2, $3::text::jsonb, \
                         '{\"traceparent\": \"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"}')",
                &[&id, &event_type, &payload],
            )
            .await
            .unwrap();
        }
    };

    let mut outboxd = env.run();
    emit(
        "00000000-0000-0000-0000-0000000000b1",
        "order.paid",
        r#"{"amount": 42.50, "currency": "EUR"}"#,
    )
    .await;
    // Poison under CloudEvents: no type.
    emit("00000000-0000-0000-0000-0000000000b2", "", "{}").await;
    let binary = read_topic(&brokers, "outbox.order", Duration::from_secs(60), |m| {
        !m.is_empty()
    })
    .await;
    let dlq = read_topic(&brokers, "outboxd.dlq", Duration::from_secs(30), |m| {
        !m.is_empty()
    })
    .await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].header("reason"), Some("empty_field"));
    assert!(
        dlq[0]
            .header("detail")
            .unwrap()
            .contains("CloudEvents requires a type")
    );

    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
    let _outboxd = env.run_with(&[("OUTBOXD_SINK__ENVELOPE", "cloudevents-structured")]);
    emit(
        "00000000-0000-0000-0000-0000000000b3",
        "order.shipped",
        r#"{"carrier": "DHL"}"#,
    )
    .await;
    emit("00000000-0000-0000-0000-0000000000b4", "", "{}").await;
    let dlq = read_topic(&brokers, "outboxd.dlq", Duration::from_secs(30), |m| {
        m.len() >= 2
    })
    .await;
    assert_eq!(dlq.len(), 2, "poison in structured mode too: {dlq:?}");
    assert_eq!(
        dlq[1].header("id"),
        Some("00000000-0000-0000-0000-0000000000b4")
    );
    let all = read_topic(&brokers, "outbox.order", Duration::from_secs(60), |m| {
        m.len() >= 2
    })
    .await;
    assert_eq!(all.len(), 2, "{all:?}");

    // Binary mode: ce_ headers and content-type, the payload as the value.
    let m = &binary[0];
    assert_eq!(m.header("ce_specversion"), Some("1.0"));
    assert_eq!(m.header("content-type"), Some("application/json"));
    assert_eq!(
        m.header("id"),
        None,
        "the CloudEvents attributes replace outboxd's id and type headers"
    );
    assert_eq!(m.value, r#"{"amount": 42.50, "currency": "EUR"}"#);
    let decoded = decode_with_the_sdk(&binary, "binary");
    let e = &decoded[0];
    assert!(e.get("error").is_none(), "{e}");
    assert_eq!(
        e["attributes"]["id"],
        "00000000-0000-0000-0000-0000000000b1"
    );
    assert_eq!(e["attributes"]["source"], "/shop/orders");
    assert_eq!(e["attributes"]["type"], "order.paid");
    assert_eq!(e["attributes"]["specversion"], "1.0");
    assert_eq!(e["attributes"]["datacontenttype"], "application/json");
    assert_eq!(e["attributes"]["partitionkey"], "42");
    let time = m.header("ce_time").unwrap();
    assert!(
        e["attributes"]["time"]
            .as_str()
            .unwrap()
            .starts_with(&time[..19]),
        "{e}"
    );
    assert_eq!(
        e["data"],
        serde_json::json!({"amount": 42.5, "currency": "EUR"})
    );
    assert_eq!(
        m.header("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        "the row's trace context stays a header"
    );

    // Structured mode: one JSON document, application/cloudevents+json.
    let m = &all[1];
    assert_eq!(
        m.header("content-type"),
        Some("application/cloudevents+json; charset=UTF-8")
    );
    let decoded = decode_with_the_sdk(&all[1..], "structured");
    let e = &decoded[0];
    assert!(e.get("error").is_none(), "{e}");
    assert_eq!(
        e["attributes"]["id"],
        "00000000-0000-0000-0000-0000000000b3"
    );
    assert_eq!(e["attributes"]["type"], "order.shipped");
    assert_eq!(e["attributes"]["source"], "/shop/orders");
    assert_eq!(e["attributes"]["datacontenttype"], "application/json");
    assert_eq!(e["attributes"]["partitionkey"], "42");
    assert_eq!(e["data"], serde_json::json!({"carrier": "DHL"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_entries_carry_the_documented_cloudevents_mapping() {
    let env = Env::start().await;
    let db = env.db().await;
    let redis = env.redis.connect().await;
    let binary_env = [
        ("OUTBOXD_SINK__ENVELOPE", "cloudevents"),
        ("OUTBOXD_SINK__SOURCE", "/shop"),
    ];
    let mut outboxd = env.run_with(&binary_env);
    let emit = "SELECT outbox_emit('order', '42', 'order.paid', '{\"amount\": 1}')";
    db.execute(emit, &[]).await.unwrap();
    wait_stream_len(&redis, "outbox.order", 1, Duration::from_secs(30)).await;
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());

    let structured_env = [
        ("OUTBOXD_SINK__ENVELOPE", "cloudevents-structured"),
        ("OUTBOXD_SINK__SOURCE", "/shop"),
    ];
    let _outboxd = env.run_with(&structured_env);
    db.execute(emit, &[]).await.unwrap();
    let entries = wait_stream_len(&redis, "outbox.order", 2, Duration::from_secs(30)).await;

    let names: Vec<&str> = entries[0].fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "specversion",
            "id",
            "source",
            "type",
            "time",
            "datacontenttype",
            "partitionkey",
            "data",
            "headers"
        ]
    );
    assert_eq!(entries[0].get("source"), Some("/shop"));
    assert_eq!(entries[0].get("type"), Some("order.paid"));
    assert_eq!(entries[0].get("datacontenttype"), Some("application/json"));
    assert_eq!(entries[0].get("data"), Some(r#"{"amount": 1}"#));

    let names: Vec<&str> = entries[1].fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["cloudevent", "partitionkey", "headers"]);
    let document: serde_json::Value =
        serde_json::from_str(entries[1].get("cloudevent").unwrap()).unwrap();
    assert_eq!(document["specversion"], "1.0");
    assert_eq!(document["type"], "order.paid");
    assert_eq!(document["source"], "/shop");
    assert_eq!(document["data"], serde_json::json!({"amount": 1}));
    assert!(document["time"].as_str().unwrap().ends_with('Z'));

    // A sink without CloudEvents, or an event stream without types, is refused up front.
    let out = env.command_with(
        &["check"],
        &[
            ("OUTBOXD_SINK__ENVELOPE", "cloudevents"),
            ("OUTBOXD_ROUTE__TYPE_COLUMN", ""),
        ],
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("needs route.type_column"),
        "{}",
        output_text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_text_payloads_arrive_byte_for_byte() {
    let env = Env::start().await;
    let db = env.db().await;
    let redis = env.redis.connect().await;
    // json keeps the text as written (spacing, member order, a repeated key); text keeps
    // every character (quotes, backslashes, line breaks, tabs, non-ASCII).
    let json = "{\"z\":  1,\n \"a\": [1.50, 2e3], \"z\": \"twice\"}";
    let text = "line one\nline \"two\" \\ tab\there: é 漢字 🚀";
    for (kind, payload) in [("json", json), ("text", text)] {
        let table = format!("docs_{kind}");
        db.batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, payload {kind} NOT NULL);
             GRANT SELECT ON {table} TO outboxd;
             CREATE PUBLICATION {table} FOR TABLE {table};"
        ))
        .await
        .unwrap();
        let qualified = format!("public.{table}");
        let vars = [
            ("OUTBOXD_POSTGRES__TABLE", qualified.as_str()),
            ("OUTBOXD_POSTGRES__SLOT", table.as_str()),
            ("OUTBOXD_POSTGRES__PUBLICATION", table.as_str()),
            ("OUTBOXD_ROUTE__TOPIC", table.as_str()),
            ("OUTBOXD_ROUTE__KEY", ""),
            ("OUTBOXD_ROUTE__TYPE_COLUMN", ""),
            ("OUTBOXD_ROUTE__HEADERS_COLUMN", ""),
        ];
        let out = env.command_with(&["setup"], &vars);
        assert!(out.status.success(), "setup: {}", output_text(&out));
        let mut outboxd = env.run_with(&vars);
        db.execute(
            &format!("INSERT INTO {table} (payload) VALUES ($1::text::{kind})"),
            &[&payload],
        )
        .await
        .unwrap();
        let entries = wait_stream_len(&redis, &table, 1, Duration::from_secs(30)).await;
        assert_eq!(entries[0].get("payload"), Some(payload), "{kind}");
        outboxd.sigterm();
        assert!(outboxd.wait(Duration::from_secs(30)).success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_effectively_once_writes_every_layout() {
    let env = Env::start().await;
    let db = env.db().await;
    let redis = env.redis.connect().await;
    let mut vars = vec![
        ("OUTBOXD_SINK__DELIVERY", "effectively-once"),
        ("OUTBOXD_SINK__REDIS__MAX_EVENT_BYTES", "3000"),
        ("OUTBOXD_SINK__REDIS__FIELDS__PAYLOAD", "data"),
        ("OUTBOXD_SINK__REDIS__FIELDS__KEY", ""),
        ("OUTBOXD_ROUTE__HEADERS__SOURCE", "billing"),
        ("OUTBOXD_ROUTE__TIMESTAMP", "commit"),
    ];
    let mut outboxd = env.run_with(&vars);
    db.batch_execute(
        "SELECT outbox_emit('order', '1', 'order.paid', '{\"n\": 1}');
         SELECT outbox_emit('order', '1', 'order.paid', jsonb_build_object('pad', repeat('x', 5000)));",
    )
    .await
    .unwrap();
    let entries = wait_stream_len(&redis, "outbox.order", 1, Duration::from_secs(30)).await;
    let letters = wait_stream_len(&redis, "outboxd.dlq", 1, Duration::from_secs(30)).await;
    let names: Vec<&str> = entries[0].fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["id", "type", "data", "headers", "time", "source"]);
    assert_eq!(entries[0].get("data"), Some(r#"{"n": 1}"#));
    assert_eq!(letters[0].get("reason"), Some("too_large"));
    assert_eq!(letters[0].get("source"), Some("billing"));
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());

    vars.push(("OUTBOXD_SINK__ENVELOPE", "cloudevents-structured"));
    let _outboxd = env.run_with(&vars);
    db.batch_execute("SELECT outbox_emit('order', '1', 'order.shipped', '{\"n\": 2}')")
        .await
        .unwrap();
    let entries = wait_stream_len(&redis, "outbox.order", 2, Duration::from_secs(30)).await;
    let names: Vec<&str> = entries[1].fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["cloudevent", "partitionkey", "headers", "source"]);
    let document: serde_json::Value =
        serde_json::from_str(entries[1].get("cloudevent").unwrap()).unwrap();
    assert_eq!(document["type"], "order.shipped");
    assert_eq!(
        stream_len(&mut env.redis.connect().await, "outbox.order").await,
        2,
        "nothing written twice"
    );
}
