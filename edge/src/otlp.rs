//! OpenTelemetry export: one span per finished HTTP or gRPC exchange, sent over OTLP
//! (gRPC) to a collector, with the HTTP / RPC semantic-convention attributes. A request
//! that came with a W3C `traceparent` continues that trace (the span's parent is the
//! caller's span); others start a trace of their own.
//!
//! Spans are built from exchange *records*, after redaction: nothing reaches the
//! collector that the log would not hold. Export never slows forwarding: spans go
//! through a bounded queue (`telemetry.queue`) to one task that batches them; when the
//! queue is full, or the collector fails, spans are dropped and counted
//! (`cloudtap_otlp_spans_dropped_total`), never retried into memory without bound.
//!
//! The OTLP messages and client come from `opentelemetry-proto` (the OpenTelemetry
//! project's generated protobuf and tonic code); the batching is ours, so spans keep the
//! exchange's own start and end times and trace ids.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use tokio::sync::mpsc;

use cloudtap_schemas::{ExchangePhase, HttpExchange};

use crate::config::TelemetryConfig;

/// Spans sent per export request at most.
const BATCH: usize = 512;
/// How long a span waits for its batch to fill.
const FLUSH: Duration = Duration::from_secs(1);

/// The sending side; cheap to share.
#[derive(Debug)]
pub struct Otlp {
    tx: mpsc::Sender<Span>,
    pub exported: Arc<AtomicU64>,
    pub dropped: Arc<AtomicU64>,
}

/// What a span says besides the exchange itself.
pub struct SpanContext<'a> {
    pub session_id: &'a str,
    pub target: &'a str,
    pub identity: &'a str,
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
    }
}

fn s(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.into()))
}

fn i(key: &str, v: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v))
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source works");
    b
}

/// `(trace id, parent span id)` from a valid `traceparent`.
fn parent(traceparent: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let parts: Vec<&str> = traceparent.split('-').collect();
    match parts.as_slice() {
        [_, trace, span, _] => Some((hex::decode(trace).ok()?, hex::decode(span).ok()?)),
        _ => None,
    }
}

/// The span of a finished exchange (`complete` or `end` records); `None` otherwise.
pub fn span_of(x: &HttpExchange, cx: &SpanContext<'_>) -> Option<Span> {
    if !matches!(x.phase, ExchangePhase::Complete | ExchangePhase::End) {
        return None;
    }
    let (trace_id, parent_span_id) =
        parent(&x.traceparent).unwrap_or_else(|| (random::<16>().to_vec(), Vec::new()));
    let grpc = !x.grpc_method.is_empty();
    let (host, port) = match x.authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_owned(), p.parse::<i64>().ok()),
        _ => (x.authority.clone(), None),
    };
    let mut attributes = vec![
        s("http.request.method", &x.method),
        s("url.path", &x.path),
        s("server.address", host),
        s(
            "network.protocol.version",
            x.protocol.trim_start_matches("HTTP/"),
        ),
        i("http.request.body.size", x.request_body.size as i64),
        i("http.response.body.size", x.response_body.size as i64),
        s("cloudtap.session_id", cx.session_id),
        s("cloudtap.target", cx.target),
        s("cloudtap.identity", cx.identity),
        i("cloudtap.stream_id", x.stream_id as i64),
    ];
    if !x.query.is_empty() {
        attributes.push(s("url.query", &x.query));
    }
    if let Some(p) = port {
        attributes.push(i("server.port", p));
    }
    if x.status != 0 {
        attributes.push(i("http.response.status_code", i64::from(x.status)));
    }
    if grpc {
        attributes.push(s("rpc.system", "grpc"));
        attributes.push(s("rpc.service", &x.grpc_service));
        attributes.push(s("rpc.method", &x.grpc_method));
        if let Ok(code) = x.grpc_status.parse::<i64>() {
            attributes.push(i("rpc.grpc.status_code", code));
        }
    }
    if !x.note.is_empty() {
        attributes.push(s("cloudtap.note", &x.note));
    }
    // Semantic conventions for client spans: 4xx and 5xx are errors, and so is a
    // non-OK gRPC status or no response at all.
    let failed = x.status == 0
        || x.status >= 400
        || (grpc && !x.grpc_status.is_empty() && x.grpc_status != "0");
    let name = if grpc {
        format!("{}/{}", x.grpc_service, x.grpc_method)
    } else {
        x.method.clone()
    };
    Some(Span {
        trace_id,
        span_id: random::<8>().to_vec(),
        parent_span_id,
        name,
        kind: span::SpanKind::Client as i32,
        start_time_unix_nano: x.start_unix_nanos.max(0) as u64,
        end_time_unix_nano: x.end_unix_nanos.max(x.start_unix_nanos).max(0) as u64,
        attributes,
        status: Some(Status {
            message: String::new(),
            code: if failed {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
        }),
        ..Span::default()
    })
}

impl Otlp {
    /// Starts the export task towards `cfg.otlp_endpoint`.
    pub fn start(cfg: &TelemetryConfig, endpoint: String) -> Result<Otlp, String> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .map_err(|e| format!("telemetry.otlp_endpoint {endpoint:?} is not a URL: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        let (tx, rx) = mpsc::channel(cfg.queue);
        let exported = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(export(
            TraceServiceClient::new(channel),
            rx,
            cfg.service_name.clone(),
            endpoint,
            exported.clone(),
            dropped.clone(),
        ));
        Ok(Otlp {
            tx,
            exported,
            dropped,
        })
    }

    /// Queues a span; never waits.
    pub fn send(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn export(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    mut rx: mpsc::Receiver<Span>,
    service: String,
    endpoint: String,
    exported: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
) {
    let resource = Resource {
        attributes: vec![s("service.name", service)],
        ..Resource::default()
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    loop {
        // Wait for one span, then for the batch to fill or the flush interval.
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "cloudtap-edge".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    spans: std::mem::take(&mut batch),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        match client.export(request).await {
            Ok(_) => {
                exported.fetch_add(n, Ordering::Relaxed);
                if failing {
                    tracing::info!(%endpoint, "OTLP export works again");
                    failing = false;
                }
            }
            Err(e) => {
                dropped.fetch_add(n, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(%endpoint, code = ?e.code(), "OTLP export failed; spans are dropped until the collector answers");
                    failing = true;
                }
            }
        }
    }
}
