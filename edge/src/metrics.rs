//! Prometheus metrics of the edge, rendered as text on `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use cloudtap_schemas::Direction;

#[derive(Debug, Default)]
pub struct Metrics {
    pub sessions_total: AtomicU64,
    pub streams_total: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub refusals: AtomicU64,
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
        out
    }
}
