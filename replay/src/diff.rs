//! What changed between a recorded answer and the one a replay got.
//!
//! HTTP: the status; the response headers, except those that differ on every answer
//! ([`DEFAULT_IGNORED`], extended with `--ignore-header`); the body, compared
//! structurally when both sides are JSON (each field added, removed or changed, with
//! its path), else byte by byte. A value redaction replaced in the recording matches
//! anything. Opaque streams: the first differing offset and both lengths.

use std::io::Read;

use cloudtap_schemas::{BodyCapture, HttpExchange, ReplayDiff};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::kind;
use crate::plan::REDACTED;

/// Response headers that differ between any two answers and say nothing about
/// behaviour: times, request and trace ids, caching validators, per-connection and
/// length headers (the body comparison covers the length).
pub const DEFAULT_IGNORED: [&str; 22] = [
    "date",
    "age",
    "expires",
    "last-modified",
    "etag",
    "set-cookie",
    "server-timing",
    "x-request-id",
    "request-id",
    "x-correlation-id",
    "x-amzn-requestid",
    "x-amzn-trace-id",
    "x-b3-traceid",
    "traceparent",
    "tracestate",
    "cf-ray",
    "x-runtime",
    "x-response-time",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
];

/// Longest text a finding quotes from either side.
const QUOTE: usize = 256;

/// An answer as the replay received it.
#[derive(Debug, Clone, Default)]
pub struct Replayed {
    pub status: u16,
    /// Lowercase names, in order.
    pub headers: Vec<(String, String)>,
    /// As received: de-chunked, still content-encoded.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct DiffOptions {
    /// Lowercase header names not compared.
    pub ignored_headers: Vec<String>,
}

impl Default for DiffOptions {
    fn default() -> Self {
        Self {
            ignored_headers: DEFAULT_IGNORED.iter().map(|h| h.to_string()).collect(),
        }
    }
}

fn quote(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(QUOTE)]).into_owned();
    if b.len() > QUOTE { s + "…" } else { s }
}

/// A finding about recorded exchange `x`.
pub(crate) fn finding(
    x: &HttpExchange,
    kind: &str,
    field: &str,
    expected: String,
    actual: String,
    note: &str,
) -> ReplayDiff {
    ReplayDiff {
        stream_id: x.stream_id,
        exchange_index: x.exchange_index,
        method: x.method.clone(),
        path: x.path.clone(),
        kind: kind.into(),
        field: field.into(),
        expected,
        actual,
        note: note.into(),
        ..Default::default()
    }
}

/// Every difference between a recorded exchange's response and `got`.
pub fn http(x: &HttpExchange, got: &Replayed, opts: &DiffOptions) -> Vec<ReplayDiff> {
    let mut out = Vec::new();
    if x.status != u32::from(got.status) {
        out.push(finding(
            x,
            kind::STATUS,
            "status",
            if x.status == 0 {
                "no response".into()
            } else {
                x.status.to_string()
            },
            got.status.to_string(),
            "",
        ));
    }
    if x.capture == "metadata" {
        // Neither headers nor bodies were kept: the status is all there is.
        return out;
    }
    headers(x, &got.headers, opts, &mut out);
    body(x, got, &mut out);
    out
}

/// Every difference between a recorded exchange and the one the edge mirrored from
/// its replay (HTTP/2 and gRPC streams replayed from their bytes): status, gRPC status
/// and message, headers, and bodies — by content where both were stored, else by size
/// and hash (gRPC messages are never stored: protobuf cannot be redacted).
pub fn mirrored(x: &HttpExchange, got: &HttpExchange, opts: &DiffOptions) -> Vec<ReplayDiff> {
    let mut out = Vec::new();
    let grpc = !x.grpc_service.is_empty();
    if x.phase != cloudtap_schemas::ExchangePhase::Message {
        if x.status != got.status {
            out.push(finding(
                x,
                kind::STATUS,
                "status",
                x.status.to_string(),
                got.status.to_string(),
                "",
            ));
        }
        if x.grpc_status != got.grpc_status {
            out.push(finding(
                x,
                kind::GRPC_STATUS,
                "grpc-status",
                x.grpc_status.clone(),
                got.grpc_status.clone(),
                "",
            ));
        }
        if x.capture != "metadata" {
            let replayed: Vec<(String, String)> = got
                .response_headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect();
            let mut ignored = opts.clone();
            ignored.ignored_headers.push("grpc-status".into());
            headers(x, &replayed, &ignored, &mut out);
            for d in &mut out {
                if d.kind == kind::HEADER && d.field == "grpc-message" {
                    d.kind = kind::GRPC_MESSAGE.into();
                }
            }
        }
    }
    let (a, b) = (&x.response_body, &got.response_body);
    let field = if x.phase == cloudtap_schemas::ExchangePhase::Message {
        format!("message {}", x.message_index)
    } else {
        "response body".to_owned()
    };
    let k = if grpc || x.protocol == "HTTP/2" && x.phase == cloudtap_schemas::ExchangePhase::Message
    {
        kind::GRPC_MESSAGE
    } else {
        kind::BODY
    };
    match (&a.content, &b.content) {
        (Some(ca), Some(cb)) if !a.truncated && !b.truncated => {
            let sizes = format!("{} B → {} B", a.size, b.size);
            content(x, k, ca, cb, &sizes, &mut out);
        }
        _ if a.size != b.size || a.sha256 != b.sha256 => out.push(finding(
            x,
            k,
            &field,
            format!("{} B, sha256 {}", a.size, short_hex(&a.sha256)),
            format!("{} B, sha256 {}", b.size, short_hex(&b.sha256)),
            "the content differs (only sizes and hashes were stored)",
        )),
        _ => {}
    }
    out
}

fn joined(headers: &[(String, String)], name: &str) -> Option<String> {
    let v: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect();
    (!v.is_empty()).then(|| v.join(", "))
}

fn headers(
    x: &HttpExchange,
    got: &[(String, String)],
    opts: &DiffOptions,
    out: &mut Vec<ReplayDiff>,
) {
    let recorded: Vec<(String, String)> = x
        .response_headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
        .collect();
    let mut names: Vec<&str> = recorded
        .iter()
        .chain(got)
        .map(|(n, _)| n.as_str())
        .filter(|n| !opts.ignored_headers.iter().any(|i| i == n))
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let (a, b) = (joined(&recorded, name), joined(got, name));
        if b.as_deref().is_some_and(|v| v.contains(REDACTED)) && a.is_some() {
            // Both sides went through redaction (a mirrored replay): nothing to compare.
            continue;
        }
        if a.as_deref().is_some_and(|v| v.contains(REDACTED)) || a == b {
            continue;
        }
        let note = match (&a, &b) {
            (None, _) => "added",
            (_, None) => "removed",
            _ => "changed",
        };
        out.push(finding(
            x,
            kind::HEADER,
            name,
            a.unwrap_or_default(),
            b.unwrap_or_default(),
            note,
        ));
    }
}

/// The body decoded as the edge stores it (gzip and deflate undone); `None` for an
/// encoding this build cannot read.
fn decoded(got: &Replayed) -> Option<Vec<u8>> {
    let enc = joined(&got.headers, "content-encoding").unwrap_or_default();
    let mut out = Vec::new();
    match enc.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => return Some(got.body.clone()),
        // Bounded: a small compressed answer may inflate to anything.
        "gzip" | "x-gzip" => flate2::read::GzDecoder::new(&got.body[..])
            .take(crate::engine::MAX_BODY as u64)
            .read_to_end(&mut out)
            .ok()?,
        "deflate" => flate2::read::ZlibDecoder::new(&got.body[..])
            .take(crate::engine::MAX_BODY as u64)
            .read_to_end(&mut out)
            .ok()?,
        _ => return None,
    };
    Some(out)
}

fn body(x: &HttpExchange, got: &Replayed, out: &mut Vec<ReplayDiff>) {
    let rec: &BodyCapture = &x.response_body;
    let raw_same = !rec.sha256.is_empty() && rec.sha256 == Sha256::digest(&got.body).as_slice();
    if raw_same || (rec.size == 0 && got.body.is_empty()) {
        return;
    }
    let size_note = || format!("{} B → {} B", rec.size, got.body.len());
    let Some(stored) = &rec.content else {
        // Only size and hash were kept.
        out.push(finding(
            x,
            kind::BODY,
            "body",
            format!("{} B, sha256 {}", rec.size, short_hex(&rec.sha256)),
            format!(
                "{} B, sha256 {}",
                got.body.len(),
                short_hex(&Sha256::digest(&got.body))
            ),
            "the recorded body was not stored; its hash differs",
        ));
        return;
    };
    let Some(now) = decoded(got) else {
        out.push(finding(
            x,
            kind::BODY,
            "body",
            String::new(),
            String::new(),
            &format!(
                "the answer's content-encoding cannot be decoded here ({})",
                size_note()
            ),
        ));
        return;
    };
    if !rec.truncated {
        content(x, kind::BODY, stored, &now, &size_note(), out);
        return;
    }
    // Stored truncated: compare the stored part, and say the rest differs by hash.
    let compared = &now[..now.len().min(stored.len())];
    if contains_redacted(stored) {
        return; // as in `content`
    }
    match first_difference(stored, compared) {
        Some(at) => out.push(finding(
            x,
            kind::BODY,
            &format!("byte {at}"),
            quote(&stored[at..]),
            quote(&now[at.min(now.len())..]),
            &format!("bodies differ from byte {at} ({})", size_note()),
        )),
        None => out.push(finding(
            x,
            kind::BODY,
            &format!("byte {}", stored.len()),
            String::new(),
            String::new(),
            &format!(
                "the stored first {} B agree; the rest differs by hash ({})",
                stored.len(),
                size_note()
            ),
        )),
    }
}

/// Two whole bodies: structurally when both are JSON, else from the first differing
/// byte. A non-JSON recorded body with redacted parts cannot be compared byte by byte
/// (and its hash is of the unredacted original): nothing reliable to say about it.
fn content(
    x: &HttpExchange,
    k: &str,
    recorded: &[u8],
    now: &[u8],
    sizes: &str,
    out: &mut Vec<ReplayDiff>,
) {
    if let (Ok(a), Ok(b)) = (
        serde_json::from_slice::<Value>(recorded),
        serde_json::from_slice::<Value>(now),
    ) {
        let mut path = String::from("$");
        json(&a, &b, &mut path, &mut |path, exp, act, note| {
            out.push(finding(x, k, path, exp, act, note));
        });
    } else if !contains_redacted(recorded)
        && let Some(at) = first_difference(recorded, now)
    {
        out.push(finding(
            x,
            k,
            &format!("byte {at}"),
            quote(&recorded[at..]),
            quote(&now[at.min(now.len())..]),
            &format!("bodies differ from byte {at} ({sizes})"),
        ));
    }
}

fn contains_redacted(b: &[u8]) -> bool {
    crate::plan::contains(b, REDACTED.as_bytes())
}

fn short_hex(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

/// The first offset where `a` and `b` differ (a length difference counts).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > QUOTE {
        let mut end = QUOTE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s
    }
}

/// Structural JSON difference; `report(path, expected, actual, note)` per finding.
pub fn json(
    a: &Value,
    b: &Value,
    path: &mut String,
    report: &mut impl FnMut(&str, String, String, &str),
) {
    if let Value::String(s) = a
        && s.contains(REDACTED)
    {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let len = path.len();
                push_key(path, k);
                match y.get(k) {
                    Some(vb) => json(va, vb, path, report),
                    None => report(path, compact(va), String::new(), "removed"),
                }
                path.truncate(len);
            }
            for (k, vb) in y {
                if !x.contains_key(k) {
                    let len = path.len();
                    push_key(path, k);
                    report(path, String::new(), compact(vb), "added");
                    path.truncate(len);
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                match (x.get(i), y.get(i)) {
                    (Some(va), Some(vb)) => json(va, vb, path, report),
                    (Some(va), None) => report(path, compact(va), String::new(), "removed"),
                    (None, Some(vb)) => report(path, String::new(), compact(vb), "added"),
                    (None, None) => {}
                }
                path.truncate(len);
            }
        }
        _ if a != b => report(path, compact(a), compact(b), "changed"),
        _ => {}
    }
}

fn push_key(path: &mut String, k: &str) {
    if !k.is_empty() && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        path.push('.');
        path.push_str(k);
    } else {
        path.push_str(&format!("[{}]", Value::String(k.into())));
    }
}

/// An opaque stream's answer against the recorded one.
pub fn bytes(stream_id: u64, expected: &[u8], actual: &[u8]) -> Option<ReplayDiff> {
    let at = first_difference(expected, actual)?;
    Some(ReplayDiff {
        stream_id,
        kind: kind::BYTES.into(),
        field: format!("offset {at}"),
        expected: quote(&expected[at..]),
        actual: quote(&actual[at.min(actual.len())..]),
        note: format!(
            "the target's bytes differ from offset {at} (recorded {} B, got {} B)",
            expected.len(),
            actual.len()
        ),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtap_schemas::Header;

    fn recorded(status: u32, headers: &[(&str, &str)], body: &str) -> HttpExchange {
        HttpExchange {
            method: "GET".into(),
            path: "/items/1".into(),
            status,
            capture: "exchanges".into(),
            response_headers: headers
                .iter()
                .map(|(n, v)| Header {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            response_body: BodyCapture {
                size: body.len() as u64,
                sha256: Sha256::digest(body.as_bytes()).to_vec(),
                content: Some(body.as_bytes().to_vec()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn got(status: u16, headers: &[(&str, &str)], body: &str) -> Replayed {
        Replayed {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_same_answer_at_another_time_is_no_difference() {
        let x = recorded(
            200,
            &[("date", "Mon"), ("content-type", "application/json")],
            r#"{"a":1}"#,
        );
        let g = got(
            200,
            &[("date", "Tue"), ("content-type", "application/json")],
            r#"{"a": 1}"#,
        );
        assert_eq!(http(&x, &g, &DiffOptions::default()), vec![]);
    }

    #[test]
    fn json_fields_are_named_by_path() {
        let x = recorded(
            200,
            &[],
            r#"{"items":[{"price":1,"id":"a"}],"gone":true,"tok":"[REDACTED]"}"#,
        );
        let g = got(
            200,
            &[],
            r#"{"items":[{"price":2,"id":"a"}],"new":null,"tok":"s3cret"}"#,
        );
        let d = http(&x, &g, &DiffOptions::default());
        let got: Vec<_> = d
            .iter()
            .map(|d| (d.field.as_str(), d.note.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("$.gone", "removed"),
                ("$.items[0].price", "changed"),
                ("$.new", "added")
            ]
        );
        assert_eq!((d[1].expected.as_str(), d[1].actual.as_str()), ("1", "2"));
    }

    #[test]
    fn status_headers_and_text_bodies() {
        let x = recorded(200, &[("x-version", "1"), ("etag", "a")], "hello world");
        let g = got(
            503,
            &[("x-version", "2"), ("etag", "b"), ("retry-after", "1")],
            "hello there",
        );
        let d = http(&x, &g, &DiffOptions::default());
        let kinds: Vec<_> = d
            .iter()
            .map(|d| (d.kind.as_str(), d.field.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("status", "status"),
                ("header", "retry-after"),
                ("header", "x-version"),
                ("body", "byte 6")
            ]
        );
    }

    #[test]
    fn opaque_streams_report_the_first_differing_offset() {
        assert!(bytes(1, b"abc", b"abc").is_none());
        let d = bytes(1, b"abcdef", b"abXdef!").unwrap();
        assert_eq!(d.field, "offset 2");
        assert!(d.note.contains("recorded 6 B, got 7 B"));
        assert_eq!(bytes(1, b"ab", b"abc").unwrap().field, "offset 2");
    }

    #[test]
    fn gzip_answers_are_compared_decoded() {
        use std::io::Write;
        let x = recorded(200, &[], r#"{"a":1}"#);
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(br#"{"a":2}"#).unwrap();
        let g = Replayed {
            status: 200,
            headers: vec![("content-encoding".into(), "gzip".into())],
            body: e.finish().unwrap(),
        };
        let d = http(
            &x,
            &g,
            &DiffOptions {
                ignored_headers: vec!["content-encoding".into()],
            },
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].field, "$.a");
    }
}
