//! A replay run's outcome: what was sent, what differed, what was skipped or could
//! not be restored; as text for a person (colour on a terminal) or as JSON.

use std::fmt::Write;
use std::time::Duration;

use cloudtap_schemas::ReplayDiff;
use serde::Serialize;

use crate::kind;
use crate::plan::Plan;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub source_session: String,
    pub target: String,
    /// The session the re-sent traffic was recorded as, and the run's chain (empty on a
    /// dry run or before the edge recorded it).
    pub replay_session: String,
    pub run_id: String,
    pub http_requests: usize,
    pub streams: usize,
    /// Requests and streams with at least one difference.
    pub differing: usize,
    pub skipped: usize,
    pub not_restored: usize,
    pub elapsed_ms: f64,
    /// Requests and streams sent per second.
    pub rate: f64,
    /// Skipped, not restored, then the differences in recorded order.
    pub findings: Vec<ReplayDiff>,
}

impl Report {
    pub fn new(plan: &Plan, per_step: Vec<(usize, Vec<ReplayDiff>)>, elapsed: Duration) -> Self {
        let differing = per_step
            .iter()
            .filter(|(_, d)| d.iter().any(|d| kind::is_difference(&d.kind)))
            .count();
        let mut findings: Vec<ReplayDiff> = plan.notes.clone();
        findings.extend(per_step.into_iter().flat_map(|(_, d)| d));
        let sent = plan.steps.len();
        Report {
            http_requests: plan.http_requests(),
            streams: plan.streams(),
            differing,
            skipped: plan.skipped().count(),
            not_restored: plan.not_restored().count(),
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
            rate: if elapsed.is_zero() {
                0.0
            } else {
                sent as f64 / elapsed.as_secs_f64()
            },
            findings,
            ..Default::default()
        }
    }

    /// Adds the findings of HTTP/2 streams, compared after the run (one list per stream).
    pub fn add_streams(&mut self, per_stream: Vec<Vec<ReplayDiff>>) {
        for f in per_stream {
            if f.iter().any(|d| kind::is_difference(&d.kind)) {
                self.differing += 1;
            }
            self.findings.extend(f);
        }
    }

    /// The differences found (exit code 1 when there is any).
    pub fn differences(&self) -> impl Iterator<Item = &ReplayDiff> {
        self.findings
            .iter()
            .filter(|d| kind::is_difference(&d.kind))
    }

    /// The run's closing finding, recorded after the others.
    pub fn summary(&self) -> ReplayDiff {
        ReplayDiff {
            kind: kind::SUMMARY.into(),
            note: self.headline(),
            ..Default::default()
        }
    }

    fn headline(&self) -> String {
        format!(
            "sent {} HTTP requests and {} streams in {:.2} s ({:.0}/s); {} differ, {} skipped, {} not fully restored",
            self.http_requests,
            self.streams,
            self.elapsed_ms / 1e3,
            self.rate,
            self.differing,
            self.skipped,
            self.not_restored
        )
    }

    /// For a person. Texts from the target (quoted bodies, header values) have their
    /// control characters shown escaped, so an answer cannot drive the terminal.
    pub fn render_text(&self, colour: bool) -> String {
        let paint = |code: &str, s: &str| {
            if colour {
                format!("\x1b[{code}m{s}\x1b[0m")
            } else {
                s.to_owned()
            }
        };
        let mut out = String::new();
        let _ = write!(out, "replay of {} to {}", self.source_session, self.target);
        if !self.replay_session.is_empty() {
            let _ = write!(out, " as session {}", self.replay_session);
        }
        if !self.run_id.is_empty() {
            let _ = write!(out, " (run {})", self.run_id);
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", self.headline());
        let what = |d: &ReplayDiff| {
            if d.method.is_empty() {
                format!("stream {}", d.stream_id)
            } else {
                format!("{} {}", d.method, d.path)
            }
        };
        let differences: Vec<&ReplayDiff> = self.differences().collect();
        if differences.is_empty() {
            let _ = writeln!(out, "{}", paint("32", "no differences"));
        } else {
            let _ = writeln!(
                out,
                "{}",
                paint("31", &format!("differences ({}):", differences.len()))
            );
            for d in differences {
                let (expected, actual) = (printable(&d.expected), printable(&d.actual));
                let change = match (expected.is_empty(), actual.is_empty()) {
                    (false, false) => format!("{expected} → {actual}"),
                    (true, false) => format!("+ {actual}"),
                    (false, true) => format!("- {expected}"),
                    (true, true) => String::new(),
                };
                let note = if d.note.is_empty() || d.note == "changed" {
                    String::new()
                } else {
                    format!("  ({})", d.note)
                };
                let _ = writeln!(
                    out,
                    "  {}  {} {}: {}{}",
                    what(d),
                    d.kind,
                    paint("1", &d.field),
                    change,
                    note
                );
            }
        }
        for (k, title) in [
            (kind::SKIPPED, "skipped"),
            (kind::NOT_RESTORED, "not restored"),
        ] {
            let list: Vec<&ReplayDiff> = self.findings.iter().filter(|d| d.kind == k).collect();
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "{}",
                paint("33", &format!("{title} ({}):", list.len()))
            );
            for d in list {
                let _ = writeln!(out, "  {}  {}", what(d), d.note);
            }
        }
        out
    }
}

/// `s` with control characters escaped (`\u{1b}`), tabs and all else kept.
fn printable(s: &str) -> String {
    if !s.chars().any(|c| c.is_control() && c != '\t') {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_cannot_drive_the_terminal() {
        assert_eq!(super::printable("a\x1b[2Jb\n"), "a\\u{1b}[2Jb\\u{a}");
        assert_eq!(super::printable("plain"), "plain");
    }
}
