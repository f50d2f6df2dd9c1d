//! One OpenTelemetry span per event, from its commit to the broker's acknowledgement,
//! exported over OTLP/HTTP (`[otel] endpoint`).
//!
//! The span is a child of the trace the event belongs to: its `traceparent` (and
//! `tracestate`) header, as the writing service put it in the row's headers. Events without
//! one start a trace of their own. The span's kind is `PRODUCER`, its name `send <topic>`, its
//! start the transaction's commit time and its end the moment the broker acknowledged it; a
//! dead-lettered event's span has an error status and the reason. Attributes follow
//! OpenTelemetry's messaging conventions (`messaging.system`, `messaging.destination.name`,
//! `messaging.message.id`, `messaging.operation.type`), plus the event's WAL position.
//!
//! Spans are handed to the SDK's batch processor, which exports them from a thread of its own
//! and drops them when its queue is full: tracing never holds back delivery, and a collector
//! that is down costs spans, not events. The parent's sampling decision is followed (a
//! `traceparent` whose flags say "not sampled" makes no span).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use outboxd_core::{Event, Poison};

/// The exporter: flush it with [`Exporter::shutdown`] before the process ends.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

/// Makes the spans; cheap to clone.
#[derive(Debug, Clone)]
pub struct Spans {
    tracer: SdkTracer,
    broker: &'static str,
}

/// The OTLP/HTTP URL of traces for `endpoint`: the collector's base URL
/// (`http://127.0.0.1:4318`) gets `/v1/traces`; a URL that already ends so is kept.
pub fn traces_url(endpoint: &str) -> String {
    let endpoint = endpoint.trim().trim_end_matches('/');
    if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/v1/traces")
    }
}

/// Starts exporting to the collector at `endpoint` (OTLP/HTTP, protobuf), as `service`.
pub fn start(
    endpoint: &str,
    service: &str,
    broker: &'static str,
) -> anyhow::Result<(Exporter, Spans)> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .build()
        .map_err(|e| anyhow::anyhow!("otel.endpoint = {endpoint:?}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer("outboxd");
    Ok((Exporter { provider }, Spans { tracer, broker }))
}

impl Exporter {
    /// Exports what is queued (waiting up to a few seconds for the collector) and stops.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(Duration::from_secs(2))
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }
}

impl Spans {
    /// The span of `event`, acknowledged at `acked` (dead-lettered when `poison` is set).
    pub fn record(&self, event: &Event, poison: Option<&Poison>, acked: SystemTime) {
        let parent = parent_context(event);
        let start = UNIX_EPOCH + Duration::from_micros(event.commit_time_micros.max(0) as u64);
        let mut attributes = vec![
            KeyValue::new("messaging.system", self.broker),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.destination.name", event.topic.clone()),
            KeyValue::new("messaging.message.id", lossy(&event.id)),
            KeyValue::new("outboxd.event_type", lossy(&event.event_type)),
            KeyValue::new("outboxd.lsn", event.position.commit_lsn.to_string()),
            KeyValue::new("outboxd.index", i64::from(event.position.index)),
        ];
        if let Some(p) = poison {
            attributes.push(KeyValue::new("outboxd.dead_letter.reason", p.kind.label()));
        }
        let mut span = self
            .tracer
            .span_builder(format!("send {}", event.topic))
            .with_kind(SpanKind::Producer)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        if let Some(p) = poison {
            use opentelemetry::trace::Span as _;
            span.set_status(Status::error(format!("dead-lettered: {p}")));
        }
        opentelemetry::trace::Span::end_with_timestamp(&mut span, acked);
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The remote parent named by the event's `traceparent` header (W3C Trace Context), or an
/// empty context when it has none or it is not valid.
fn parent_context(event: &Event) -> Context {
    let header = |name: &str| {
        event
            .headers
            .pairs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    let Some(parent) = header("traceparent").and_then(parse_traceparent) else {
        return Context::new();
    };
    let state = header("tracestate")
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let (trace_id, span_id, flags) = parent;
    Context::new().with_remote_span_context(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`; all-zero ids are not valid.
fn parse_traceparent(text: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let parts: Vec<&str> = text.trim().split('-').collect();
    let [version, trace, span, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || *version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    Some((trace_id, span_id, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_headers_are_read_as_w3c_says() {
        let (trace, span, flags) =
            parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(trace.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(span.to_string(), "b7ad6b7169203331");
        assert!(flags.is_sampled());
        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01",
            "",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_endpoint_is_the_collectors_base_url() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
