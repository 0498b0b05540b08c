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
use crate::mirror::redact::REDACTED;
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

impl From<ReplayReport> for cloudtap_proto::replay::v1::RecordRequest {
    fn from(r: ReplayReport) -> Self {
        Self {
            source_session: r.source_session,
            replay_session: r.replay_session,
            target: r.target,
            diffs: r.diffs.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<cloudtap_proto::replay::v1::RecordRequest> for ReplayReport {
    fn from(r: cloudtap_proto::replay::v1::RecordRequest) -> Self {
        Self {
            source_session: r.source_session,
            replay_session: r.replay_session,
            target: r.target,
            diffs: r.diffs.into_iter().map(Into::into).collect(),
        }
    }
}

/// Where they went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub run_id: String,
    pub records: u64,
}

impl From<cloudtap_proto::replay::v1::RecordResponse> for Recorded {
    fn from(r: cloudtap_proto::replay::v1::RecordResponse) -> Self {
        Self {
            run_id: r.run_id,
            records: r.records,
        }
    }
}

/// A finding's texts cut to [`MAX_FIELD`] (the edge does it again on receipt).
pub fn cut_fields(d: &mut ReplayDiff) {
    for s in [
        &mut d.expected,
        &mut d.actual,
        &mut d.note,
        &mut d.field,
        &mut d.path,
    ] {
        cut(s);
    }
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
            cut_fields(d);
        }
        let run = Uuid::now_v7();
        let unavailable = |e: crate::tap::TapError| Refusal::new("log_unavailable", e.to_string());
        let gaps = Arc::new(GapCounter::default());
        self.tap
            .open_chain(
                run,
                None,
                gaps.clone(),
                // No target: live, only admins and auditors see a run's findings (SQL
                // scopes them by both sessions, which a live watcher cannot check).
                ChainMeta {
                    session_id: None,
                    target: String::new(),
                    identity: claims.sub.clone(),
                },
            )
            .await
            .map_err(unavailable)?;
        let n = report.diffs.len() as u64;
        let mut diffs = report.diffs.into_iter().peekable();
        let mut appended = Ok(());
        while let Some(d) = diffs.next() {
            // The last one durable: the answer means the whole run is stored.
            let mode = if diffs.peek().is_none() {
                Backpressure::Strict
            } else {
                Backpressure::Block
            };
            appended = self
                .tap
                .record(run, Body::ReplayDiff(Box::new(d)), mode, &gaps)
                .await;
            if appended.is_err() {
                break;
            }
        }
        // Closed on every path, so the tap forgets the chain.
        let _ = self.tap.close_chain(run).await;
        appended.map_err(unavailable)?;
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
    /// edge's rules to it before it is stored (or shown by the replay service), as the
    /// mirror does to every exchange.
    ///
    /// - A secret header loses both values.
    /// - A JSON value is put back where its path says and run through the JSON rules
    ///   (secret keys anywhere on the path or inside the value, `json_paths`, patterns);
    ///   a value that no longer parses (cut to 1 KiB) is not kept.
    /// - Quotes of other bodies (`byte N`) are not kept: only JSON is understood well
    ///   enough to redact; the note keeps the offset and the sizes.
    /// - Patterns are removed from every text.
    pub fn redact_finding(&self, d: &mut ReplayDiff) {
        let r = &self.redactor;
        let header = matches!(d.kind.as_str(), "header" | "grpc_message")
            && !d.field.starts_with('$')
            && !d.field.contains(' ');
        if header && r.header_is_secret(&d.field) {
            for v in [&mut d.expected, &mut d.actual] {
                if !v.is_empty() {
                    *v = REDACTED.to_owned();
                }
            }
        } else if d.field.starts_with('$') {
            for v in [&mut d.expected, &mut d.actual] {
                if !v.is_empty() {
                    *v = redact_at(r, &d.field, v);
                }
            }
        } else if d.field.starts_with("byte ") {
            d.expected.clear();
            d.actual.clear();
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

    /// Whether the caller may open a tunnel to `target` (policy and token scope);
    /// refusals are records, as for `OpenTunnel`.
    pub async fn may_reach(&self, caller: &Caller, target: &str) -> Result<String, Refusal> {
        let claims = self.authenticate(caller, "replay_run", target).await?;
        if !claims.allows_target(target) || !self.policy.allows(&claims.sub, target) {
            return Err(Refusal::new(
                "forbidden",
                format!(
                    "policy does not let {:?} reach {target:?}, so it may not have it replayed there either",
                    claims.sub
                ),
            ));
        }
        Ok(claims.sub)
    }
}

/// Largest array index a finding's path may name and still be checked (and kept).
const MAX_INDEX: usize = 10_000;

/// One step of a JSON path as `diff` writes them: `.key`, `["key"]`, `[3]`.
enum Seg {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Option<Vec<Seg>> {
    let mut rest = path.strip_prefix('$')?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            out.push(Seg::Key(r[..end].to_owned()));
            rest = &r[end..];
        } else if rest.starts_with("[\"") {
            // A JSON string, then `]`.
            let mut de = serde_json::Deserializer::from_str(&rest[1..]).into_iter::<String>();
            let key = de.next()?.ok()?;
            let used = 1 + de.byte_offset();
            out.push(Seg::Key(key));
            rest = rest[used..].strip_prefix(']')?;
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let i: usize = r[..end].parse().ok()?;
            // The path comes from the client: no index worth a big allocation.
            if i > MAX_INDEX {
                return None;
            }
            out.push(Seg::Index(i));
            rest = &r[end + 1..];
        } else {
            return None;
        }
    }
    Some(out)
}

/// `text` (a JSON value found at `path`) as the JSON rules leave it.
fn redact_at(r: &crate::mirror::redact::Redactor, path: &str, text: &str) -> String {
    use serde_json::Value;
    let (Ok(value), Some(segs)) = (serde_json::from_str::<Value>(text), parse_path(path)) else {
        return "(not kept: cut, so not checked for secrets)".to_owned();
    };
    // Put it back where it was, run the rules over the whole, take it out again.
    let mut root = value;
    for seg in segs.iter().rev() {
        root = match seg {
            Seg::Key(k) => Value::Object([(k.clone(), root)].into_iter().collect()),
            Seg::Index(i) => {
                let mut items = vec![Value::Null; *i];
                items.push(root);
                Value::Array(items)
            }
        };
    }
    r.json(&mut root);
    // Absent when a secret higher up replaced the whole subtree.
    let found = segs.iter().try_fold(&root, |v, seg| match (seg, v) {
        (Seg::Key(k), Value::Object(m)) => m.get(k),
        (Seg::Index(i), Value::Array(a)) => a.get(*i),
        _ => None,
    });
    match found {
        Some(v) => v.to_string(),
        None => Value::String(REDACTED.into()).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_parse_as_diff_writes_them() {
        let segs = parse_path(r#"$.items[2]["a b"].price"#).unwrap();
        let shown: Vec<String> = segs
            .iter()
            .map(|s| match s {
                Seg::Key(k) => k.clone(),
                Seg::Index(i) => i.to_string(),
            })
            .collect();
        assert_eq!(shown, ["items", "2", "a b", "price"]);
        assert!(parse_path("byte 3").is_none());
        assert!(parse_path("$[x]").is_none());
    }

    #[test]
    fn secrets_in_replayed_values_are_removed_wherever_they_sit() {
        let r = crate::mirror::redact::Redactor::new(&Default::default()).unwrap();
        // A secret key on the path, inside the value, and a value past a secret key.
        assert_eq!(
            redact_at(&r, "$.user.password", r#""hunter2""#),
            r#""[REDACTED]""#
        );
        assert_eq!(
            redact_at(&r, "$.user", r#"{"name":"a","password":"hunter2"}"#),
            r#"{"name":"a","password":"[REDACTED]"}"#
        );
        assert_eq!(redact_at(&r, "$.items[1]", r#""x""#), r#""x""#);
        assert_eq!(
            redact_at(&r, "$.session_token[0]", r#""abc""#),
            r#""[REDACTED]""#
        );
        assert_eq!(redact_at(&r, "$.price", "71"), "71");
        assert!(redact_at(&r, "$.user", r#"{"password":"hun…"#).starts_with("(not kept"));
    }

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
