//! `[otel] endpoint`: one span per event, commit to broker ack, exported over OTLP/HTTP to a
//! receiver this test runs (it decodes the protobuf requests with the OpenTelemetry
//! protocol's own types), a child of the trace named by the row's `traceparent`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink the events go through

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use prost::Message;
use support::*;

/// The spans received, with their resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver on a free port: `POST /v1/traces` with a protobuf body.
async fn receiver() -> (u16, Received) {
    let received: Received = Arc::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut spans = store.lock().unwrap();
                for resource_spans in request.resource_spans {
                    let service = resource_spans
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
                        .unwrap_or_default();
                    for scope in resource_spans.scope_spans {
                        for span in scope.spans {
                            spans.push((service.clone(), span));
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, received)
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_SPAN: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_a_span_from_commit_to_ack_under_the_rows_trace() {
    let (port, received) = receiver().await;
    let env = Env::new(
        Postgres::start(),
        &format!(
            "max_event_bytes = 4000\n\n[otel]\nendpoint = \"http://127.0.0.1:{port}\"\nservice_name = \"shop-outbox\"\n"
        ),
    )
    .await;
    env.setup();
    let mut outboxd = env.run();
    let db = env.db().await;
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let traced = db
        .query_one(
            &format!(
                "SELECT outbox_emit('order', '7', 'order.paid', '{{}}', \
                 '{{\"traceparent\": \"00-{TRACE_ID}-{PARENT_SPAN}-01\", \"tracestate\": \"shop=1\"}}')::text"
            ),
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    let untraced = db
        .query_one(
            "SELECT outbox_emit('order', '8', 'order.paid', '{}')::text",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    // Not sampled by the caller: no span.
    db.execute(
        &format!(
            "SELECT outbox_emit('order', '9', 'order.paid', '{{}}', \
             '{{\"traceparent\": \"00-{TRACE_ID}-{PARENT_SPAN}-00\"}}')"
        ),
        &[],
    )
    .await
    .unwrap();
    // Poison: over sink.redis.max_event_bytes.
    db.execute(
        "SELECT outbox_emit('order', '10', 'order.paid', jsonb_build_object('pad', repeat('x', 5000)))",
        &[],
    )
    .await
    .unwrap();
    let redis = env.redis.connect().await;
    wait_stream_len(&redis, "outbox.order", 3, Duration::from_secs(30)).await;
    wait_stream_len(&redis, "outboxd.dlq", 1, Duration::from_secs(30)).await;
    // A graceful stop exports what the batch processor holds.
    outboxd.sigterm();
    assert!(outboxd.wait(Duration::from_secs(30)).success());
    wait_until("3 spans", Duration::from_secs(30), || {
        let n = received.lock().unwrap().len();
        async move { n >= 3 }
    })
    .await;
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;

    let spans = received.lock().unwrap().clone();
    assert_eq!(spans.len(), 3, "one span per sampled event: {spans:#?}");
    let by_id = |id: &str| {
        spans
            .iter()
            .find(|(_, s)| attribute(s, "messaging.message.id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no span for {id}"))
    };

    let (service, span) = by_id(&traced);
    assert_eq!(service, "shop-outbox");
    assert_eq!(hex(&span.trace_id), TRACE_ID, "the row's trace");
    assert_eq!(
        hex(&span.parent_span_id),
        PARENT_SPAN,
        "a child of the row's span"
    );
    assert_eq!(span.trace_state, "shop=1");
    assert_eq!(span.name, "send outbox.order");
    assert_eq!(span.kind, SpanKind::Producer as i32);
    assert!(
        before - 1_000_000_000 <= span.start_time_unix_nano,
        "starts at the commit"
    );
    assert!(span.start_time_unix_nano <= span.end_time_unix_nano);
    assert!(span.end_time_unix_nano <= after, "ends at the ack");
    assert_eq!(
        attribute(span, "messaging.system").as_deref(),
        Some("redis")
    );
    assert_eq!(
        attribute(span, "messaging.destination.name").as_deref(),
        Some("outbox.order")
    );
    assert!(attribute(span, "outboxd.lsn").is_some());

    let (_, span) = by_id(&untraced);
    assert!(
        span.parent_span_id.is_empty(),
        "no traceparent: a trace of its own"
    );
    assert_ne!(hex(&span.trace_id), TRACE_ID);

    let (_, dead) = spans
        .iter()
        .find(|(_, s)| attribute(s, "outboxd.dead_letter.reason").is_some())
        .expect("the dead letter's span");
    assert_eq!(
        attribute(dead, "outboxd.dead_letter.reason").as_deref(),
        Some("too_large")
    );
    assert_eq!(dead.status.as_ref().unwrap().code, StatusCode::Error as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_spans_not_events() {
    let closed = free_port();
    let env = Env::new(
        Postgres::start(),
        &format!("\n[otel]\nendpoint = \"http://127.0.0.1:{closed}\"\n"),
    )
    .await;
    env.setup();
    let mut outboxd = env.run();
    let db = env.db().await;
    write_events(&db, 0, 200, 20, 5, 3).await;
    let redis = env.redis.connect().await;
    let entries = wait_stream_len(&redis, "outbox.order", 200, Duration::from_secs(30)).await;
    assert_each_once(&entries, 0..200);
    outboxd.sigterm();
    assert!(
        outboxd.wait(Duration::from_secs(30)).success(),
        "a clean stop"
    );
    let log = outboxd.log_text();
    assert!(
        log.contains("BatchSpanProcessor.ExportError"),
        "the lost spans are said in the log: {log}"
    );
}
