//! Where a replay run's findings are recorded (`cloudtap.replay.v1.ReplayService` and
//! `POST /v1/replays`). `cloudtapctl replay` runs the replay engine as the user, over a
//! session opened with `replay_of`; before it closes that session it hands its findings
//! here, and the edge appends them to a new chain, the run's own (DESIGN: "The traffic
//! log": exactly one writer per chain).

use std::sync::Arc;

use cloudtap_schemas::{Body, REPLAY_DIFF_KINDS, ReplayDiff};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::EdgeState;
use crate::config::Backpressure;
use crate::control::{Caller, Refusal};
use crate::tap::{ChainMeta, GapCounter};

/// Findings one run may record; past this the client says how many it left out.
pub const MAX_FINDINGS: usize = 20_000;
/// Longest text kept in a finding's `expected`, `actual` and `note`.
pub const MAX_FIELD: usize = 1024;

/// A run's findings, as the replayer sends them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayReport {
    pub source_session: String,
    pub replay_session: String,
    pub target: String,
    pub diffs: Vec<ReplayDiff>,
}

/// Where they went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub run_id: String,
    pub records: u64,
}

fn cut(s: &mut String) {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

impl EdgeState {
    /// Appends a replay run's findings to a new chain. The replay session must be a
    /// session of the caller's, still open on this edge, opened as a replay of
    /// `source_session`: so a run's findings are only ever about traffic its replayer
    /// sent.
    pub async fn record_replay(
        &self,
        caller: &Caller,
        mut report: ReplayReport,
    ) -> Result<Recorded, Refusal> {
        let claims = self
            .authenticate(caller, "record_replay", &report.target)
            .await?;
        let session = Uuid::parse_str(&report.replay_session)
            .ok()
            .and_then(|id| self.sessions.get(&id))
            .filter(|s| s.identity == claims.sub)
            .ok_or_else(|| {
                Refusal::new(
                    "unknown_session",
                    format!(
                        "replay session {:?} is not an open session of {:?} on this edge; record a run before closing its tunnel",
                        report.replay_session, claims.sub
                    ),
                )
            })?;
        if session.replay_of.is_empty() || session.replay_of != report.source_session {
            return Err(Refusal::new(
                "invalid_argument",
                format!(
                    "session {} was not opened as a replay of {:?}",
                    session.id, report.source_session
                ),
            ));
        }
        if report.diffs.len() > MAX_FINDINGS {
            return Err(Refusal::new(
                "invalid_argument",
                format!(
                    "{} findings; a run records at most {MAX_FINDINGS} (summarise the rest)",
                    report.diffs.len()
                ),
            ));
        }
        if let Some(d) = report
            .diffs
            .iter()
            .find(|d| !REPLAY_DIFF_KINDS.contains(&d.kind.as_str()))
        {
            return Err(Refusal::new(
                "invalid_argument",
                format!(
                    "a finding of kind {:?}; the kinds are {}",
                    d.kind,
                    REPLAY_DIFF_KINDS.join(", ")
                ),
            ));
        }
        let target = session.target.clone();
        for d in &mut report.diffs {
            // The run's own facts, whatever the client put there.
            d.source_session.clone_from(&session.replay_of);
            d.replay_session = session.id.hyphenated().to_string();
            d.target.clone_from(&target);
            self.redact_finding(d);
            cut(&mut d.expected);
            cut(&mut d.actual);
            cut(&mut d.note);
            cut(&mut d.field);
            cut(&mut d.path);
        }
        let run = Uuid::now_v7();
        let unavailable = |e: crate::tap::TapError| Refusal::new("log_unavailable", e.to_string());
        let gaps = Arc::new(GapCounter::default());
        self.tap
            .open_chain(
                run,
                None,
                gaps.clone(),
                ChainMeta {
                    session_id: None,
                    target: target.clone(),
                    identity: claims.sub.clone(),
                },
            )
            .await
            .map_err(unavailable)?;
        let n = report.diffs.len() as u64;
        let mut diffs = report.diffs.into_iter().peekable();
        while let Some(d) = diffs.next() {
            // The last one durable: the answer means the whole run is stored.
            let mode = if diffs.peek().is_none() {
                Backpressure::Strict
            } else {
                Backpressure::Block
            };
            self.tap
                .record(run, Body::ReplayDiff(Box::new(d)), mode, &gaps)
                .await
                .map_err(unavailable)?;
        }
        let _ = self.tap.close_chain(run).await;
        self.audit(
            &claims.sub,
            "replay",
            format!(
                "run {run}: {n} findings replaying {} as session {} to {target}",
                session.replay_of, session.id
            ),
        )
        .await;
        Ok(Recorded {
            run_id: run.hyphenated().to_string(),
            records: n,
        })
    }
}

impl EdgeState {
    /// The replayed side of a finding is a fresh answer, never redacted: apply the
    /// edge's rules to it before it is stored, as the mirror does to every exchange.
    /// A secret header, or a JSON field whose last key is secret, loses both values;
    /// patterns are removed from every text.
    fn redact_finding(&self, d: &mut ReplayDiff) {
        let r = &self.redactor;
        let last_key = d
            .field
            .rsplit(['.', '['])
            .next()
            .unwrap_or("")
            .trim_end_matches(']')
            .trim_matches('"');
        let secret = match d.kind.as_str() {
            "header" => r.header_is_secret(&d.field),
            "body" => d.field.starts_with('$') && r.field_is_secret(last_key),
            _ => false,
        };
        if secret {
            for v in [&mut d.expected, &mut d.actual] {
                if !v.is_empty() {
                    *v = crate::mirror::redact::REDACTED.to_owned();
                }
            }
        }
        for v in [
            &mut d.expected,
            &mut d.actual,
            &mut d.note,
            &mut d.path,
            &mut d.field,
        ] {
            if let std::borrow::Cow::Owned(clean) = r.text(v) {
                *v = clean;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_cut_on_a_char_boundary() {
        let mut s = "é".repeat(MAX_FIELD);
        cut(&mut s);
        assert!(s.len() <= MAX_FIELD + '…'.len_utf8());
        assert!(s.ends_with('…'));
        let mut short = "ok".to_string();
        cut(&mut short);
        assert_eq!(short, "ok");
    }
}
