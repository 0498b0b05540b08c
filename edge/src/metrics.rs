//! Prometheus metrics of the edge, rendered as text on `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cloudtap_schemas::{Direction, ExchangePhase, HttpExchange};

/// Upper bounds (seconds) of the request-duration histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// HTTP figures of one target.
#[derive(Debug, Default, Clone)]
struct TargetHttp {
    /// By (method, status class).
    requests: BTreeMap<(String, &'static str), u64>,
    request_bytes: u64,
    response_bytes: u64,
    /// By kind: `5xx`, `no_response`, `grpc`.
    errors: BTreeMap<&'static str, u64>,
    /// Cumulative counts per bucket, then +Inf (= count).
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

/// Per-target HTTP metrics, fed by the mirrors with each finished exchange.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    targets: Mutex<BTreeMap<String, TargetHttp>>,
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

impl HttpMetrics {
    /// Counts a finished exchange (`complete` or `end` records; not starts or messages).
    pub fn observe(&self, target: &str, x: &HttpExchange) {
        if !matches!(x.phase, ExchangePhase::Complete | ExchangePhase::End) {
            return;
        }
        // Labels stay bounded: unknown methods are OTHER.
        let method = METHODS
            .iter()
            .find(|m| x.method.eq_ignore_ascii_case(m))
            .map_or("OTHER", |m| m)
            .to_owned();
        let class = match x.status {
            0 => "none",
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let mut all = self.targets.lock().expect("metrics lock");
        let t = all.entry(target.to_owned()).or_default();
        *t.requests.entry((method, class)).or_default() += 1;
        t.request_bytes += x.request_body.size;
        t.response_bytes += x.response_body.size;
        let error = match (x.status, x.grpc_status.as_str()) {
            (0, _) => Some("no_response"),
            (500.., _) => Some("5xx"),
            (_, "" | "0") => None,
            _ => Some("grpc"),
        };
        if let Some(e) = error {
            *t.errors.entry(e).or_default() += 1;
        }
        if x.end_unix_nanos > 0 {
            let secs = (x.end_unix_nanos - x.start_unix_nanos).max(0) as f64 / 1e9;
            for (i, le) in BUCKETS.iter().enumerate() {
                if secs <= *le {
                    t.buckets[i] += 1;
                }
            }
            t.count += 1;
            t.sum_seconds += secs;
        }
    }

    fn render(&self, out: &mut String) {
        let all = self.targets.lock().expect("metrics lock").clone();
        let _ = writeln!(
            out,
            "# HELP cloudtap_http_requests_total HTTP and gRPC exchanges mirrored, by target, method and status class.\n# TYPE cloudtap_http_requests_total counter"
        );
        for (target, t) in &all {
            for ((method, class), n) in &t.requests {
                let _ = writeln!(
                    out,
                    "cloudtap_http_requests_total{{target=\"{target}\",method=\"{method}\",code=\"{class}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP cloudtap_http_body_bytes_total Body bytes of mirrored exchanges, by target and direction.\n# TYPE cloudtap_http_body_bytes_total counter"
        );
        for (target, t) in &all {
            let _ = writeln!(
                out,
                "cloudtap_http_body_bytes_total{{target=\"{target}\",direction=\"request\"}} {}\ncloudtap_http_body_bytes_total{{target=\"{target}\",direction=\"response\"}} {}",
                t.request_bytes, t.response_bytes
            );
        }
        let _ = writeln!(
            out,
            "# HELP cloudtap_http_errors_total Exchanges that failed: 5xx, no response, or a non-zero gRPC status.\n# TYPE cloudtap_http_errors_total counter"
        );
        for (target, t) in &all {
            for (kind, n) in &t.errors {
                let _ = writeln!(
                    out,
                    "cloudtap_http_errors_total{{target=\"{target}\",kind=\"{kind}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP cloudtap_http_request_duration_seconds From a request's first byte to its response's last, by target.\n# TYPE cloudtap_http_request_duration_seconds histogram"
        );
        for (target, t) in &all {
            for (le, n) in BUCKETS.iter().zip(t.buckets) {
                let _ = writeln!(
                    out,
                    "cloudtap_http_request_duration_seconds_bucket{{target=\"{target}\",le=\"{le}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "cloudtap_http_request_duration_seconds_bucket{{target=\"{target}\",le=\"+Inf\"}} {}\ncloudtap_http_request_duration_seconds_sum{{target=\"{target}\"}} {}\ncloudtap_http_request_duration_seconds_count{{target=\"{target}\"}} {}",
                t.count, t.sum_seconds, t.count
            );
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub sessions_total: AtomicU64,
    pub streams_total: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub refusals: AtomicU64,
    pub http: Arc<HttpMetrics>,
}

impl Metrics {
    pub fn add_bytes(&self, dir: Direction, n: u64) {
        match dir {
            Direction::Up => self.bytes_up.fetch_add(n, Ordering::Relaxed),
            Direction::Down => self.bytes_down.fetch_add(n, Ordering::Relaxed),
        };
    }
}

impl crate::EdgeState {
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let t = &self.tap.stats;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        metric(
            "cloudtap_tunnels_open",
            "gauge",
            "Live tunnel sessions on this edge.",
            &[("", self.sessions.len() as u64)],
        );
        metric(
            "cloudtap_sessions_total",
            "counter",
            "Sessions attached since start.",
            &[("", m.sessions_total.load(Ordering::Relaxed))],
        );
        metric(
            "cloudtap_streams_total",
            "counter",
            "Streams forwarded since start.",
            &[("", m.streams_total.load(Ordering::Relaxed))],
        );
        metric(
            "cloudtap_bytes_total",
            "counter",
            "Bytes forwarded, by direction (up = client to target).",
            &[
                ("{direction=\"up\"}", m.bytes_up.load(Ordering::Relaxed)),
                ("{direction=\"down\"}", m.bytes_down.load(Ordering::Relaxed)),
            ],
        );
        metric(
            "cloudtap_refusals_total",
            "counter",
            "Refused logins, tunnels, attaches and calls.",
            &[("", m.refusals.load(Ordering::Relaxed))],
        );
        metric(
            "cloudtap_log_records_total",
            "counter",
            "Records appended to the traffic log.",
            &[("", t.appended.load(Ordering::Relaxed))],
        );
        metric(
            "cloudtap_log_batches_total",
            "counter",
            "Group commits to the traffic log.",
            &[("", t.batches.load(Ordering::Relaxed))],
        );
        metric(
            "cloudtap_log_dropped_total",
            "counter",
            "Records not logged under on_log_backpressure = drop.",
            &[("", t.dropped.load(Ordering::Relaxed))],
        );
        metric(
            "cloudtap_log_healthy",
            "gauge",
            "1 while the traffic log accepts appends.",
            &[("", u64::from(!t.failed.load(Ordering::Acquire)))],
        );
        m.http.render(&mut out);
        if let Some(o) = &self.otlp {
            let _ = writeln!(
                out,
                "# HELP cloudtap_otlp_spans_total Exchange spans by outcome: exported to the collector, or dropped (queue full, collector failing).\n# TYPE cloudtap_otlp_spans_total counter\ncloudtap_otlp_spans_total{{outcome=\"exported\"}} {}\ncloudtap_otlp_spans_total{{outcome=\"dropped\"}} {}",
                o.exported.load(Ordering::Relaxed),
                o.dropped.load(Ordering::Relaxed)
            );
        }
        out
    }
}
