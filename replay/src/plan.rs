//! What a replay will send, and what it will not (and why), decided before anything
//! is sent so the user sees it first.

use cloudtap_schemas::{ExchangePhase, HttpExchange, ReplayDiff};

use crate::ReplayError;
use crate::filter::Filter;
use crate::kind;
use crate::rebuild::{Item, OpaqueStream, Recording};

pub use cloudtap_schemas::REDACTED;

/// Headers never copied from a recording: per-connection ones, the length (the body
/// sent is what decides it) and the encoding (bodies are stored decoded).
const NOT_RESENT: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "content-encoding",
    "expect",
];

#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    pub filter: Filter,
    /// Send requests that may write (anything but GET, HEAD, OPTIONS, TRACE) and
    /// opaque streams too.
    pub allow_writes: bool,
    /// `--header`: (lowercase name, value), set on every request, and the only source
    /// of credentials redaction removed.
    pub headers: Vec<(String, String)>,
}

/// `Name: value` → (lowercase name, value).
pub fn parse_header(s: &str) -> Result<(String, String), ReplayError> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| ReplayError::Header("it has no ':'".into()))?;
    let name = name.trim();
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        // Not quoted: without a proper name, the text may be the credential itself.
        return Err(ReplayError::Header(format!(
            "the {} characters before the first ':' are not a header name",
            name.chars().count()
        )));
    }
    if value.contains(['\r', '\n']) {
        return Err(ReplayError::Header(format!(
            "the value of {name} holds a line break"
        )));
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_owned()))
}

/// A request as it will be sent.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub enum Step {
    Http {
        recorded: Box<HttpExchange>,
        request: Request,
    },
    Stream(OpaqueStream),
}

impl Step {
    pub fn at(&self) -> i64 {
        match self {
            Step::Http { recorded, .. } => recorded.start_unix_nanos,
            Step::Stream(s) => s.opened_at,
        }
    }
}

/// The steps to send, by start time, and the findings already known: what is skipped
/// and what could not be restored.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub notes: Vec<ReplayDiff>,
    /// Items the `--only` filter left out.
    pub filtered_out: usize,
    /// When the recording started (the origin of every step's time).
    pub origin: i64,
}

impl Plan {
    pub fn http_requests(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Http { .. }))
            .count()
    }

    pub fn streams(&self) -> usize {
        self.steps.len() - self.http_requests()
    }

    pub fn skipped(&self) -> impl Iterator<Item = &ReplayDiff> {
        self.notes.iter().filter(|n| n.kind == kind::SKIPPED)
    }

    pub fn not_restored(&self) -> impl Iterator<Item = &ReplayDiff> {
        self.notes.iter().filter(|n| n.kind == kind::NOT_RESTORED)
    }
}

fn note(
    x: Option<&HttpExchange>,
    stream: u64,
    kind: &str,
    field: &str,
    text: String,
) -> ReplayDiff {
    ReplayDiff {
        stream_id: x.map_or(stream, |x| x.stream_id),
        exchange_index: x.map_or(0, |x| x.exchange_index),
        method: x.map(|x| x.method.clone()).unwrap_or_default(),
        path: x.map(|x| x.path.clone()).unwrap_or_default(),
        kind: kind.into(),
        field: field.into(),
        note: text,
        ..Default::default()
    }
}

/// Methods that only read (RFC 9110 "safe"): the only ones sent without
/// `--allow-writes`.
pub fn safe(method: &str) -> bool {
    matches!(
        method.to_ascii_uppercase().as_str(),
        "GET" | "HEAD" | "OPTIONS" | "TRACE"
    )
}

/// Whether `needle` occurs in `hay`.
pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

impl Plan {
    pub fn new(rec: &Recording, opts: &PlanOptions) -> Plan {
        let mut plan = Plan {
            origin: rec.opened_at,
            ..Default::default()
        };
        for item in &rec.items {
            if !opts.filter.matches(item) {
                plan.filtered_out += 1;
                continue;
            }
            match item {
                Item::Http(x) => plan.http(x, opts),
                Item::Stream(s) => plan.stream(s, opts),
            }
        }
        plan
    }

    fn http(&mut self, x: &HttpExchange, opts: &PlanOptions) {
        let skip = |why: String| note(Some(x), 0, kind::SKIPPED, "", why);
        if !crate::rebuild::is_http1(x) {
            self.notes.push(note(
                Some(x),
                0,
                kind::NOT_RESTORED,
                "stream",
                format!(
                    "an HTTP/2{} exchange is replayed from its stream's bytes, which capture level {:?} does not keep; capture the route `full` to replay it",
                    if x.grpc_service.is_empty() { "" } else { " (gRPC)" },
                    x.capture
                ),
            ));
            return;
        }
        if x.phase == ExchangePhase::Start {
            self.notes.push(skip(
                "a long-lived (server-sent events) exchange is not replayed".into(),
            ));
            return;
        }
        if !opts.allow_writes && !safe(&x.method) {
            self.notes.push(skip(format!(
                "{} may change what the target holds (only GET, HEAD, OPTIONS and TRACE are sent without it); pass --allow-writes to send it",
                x.method
            )));
            return;
        }
        let body = &x.request_body;
        let content = match &body.content {
            _ if body.size == 0 => Vec::new(),
            None => {
                let why = if body.note.is_empty() {
                    format!("capture level {:?} keeps no bodies", x.capture)
                } else {
                    body.note.clone()
                };
                self.notes.push(note(
                    Some(x),
                    0,
                    kind::NOT_RESTORED,
                    "request body",
                    format!(
                        "the {} B request body was not stored ({why}); not sent",
                        body.size
                    ),
                ));
                return;
            }
            Some(_) if body.truncated => {
                self.notes.push(note(
                    Some(x),
                    0,
                    kind::NOT_RESTORED,
                    "request body",
                    format!(
                        "the request body ({} B) was stored truncated; not sent",
                        body.size
                    ),
                ));
                return;
            }
            Some(c) => c.clone(),
        };
        if contains(&content, REDACTED.as_bytes()) {
            self.notes.push(note(
                Some(x),
                0,
                kind::NOT_RESTORED,
                "request body",
                "fields of the request body were redacted at capture; sent with the redaction marker".into(),
            ));
        }
        if x.capture == "metadata" {
            self.notes.push(note(
                Some(x),
                0,
                kind::NOT_RESTORED,
                "request headers",
                "captured at level metadata: sent without the recorded headers".into(),
            ));
        }
        let mut headers = Vec::with_capacity(x.request_headers.len() + opts.headers.len());
        for h in &x.request_headers {
            let name = h.name.to_ascii_lowercase();
            if NOT_RESENT.contains(&name.as_str()) || opts.headers.iter().any(|(n, _)| *n == name) {
                continue;
            }
            if h.value.contains(REDACTED) {
                self.notes.push(note(
                    Some(x),
                    0,
                    kind::NOT_RESTORED,
                    &name,
                    format!("{name} was redacted at capture and is not sent; pass --header '{name}: …' to restore it"),
                ));
                continue;
            }
            headers.push((name, h.value.clone()));
        }
        headers.extend(opts.headers.iter().cloned());
        if !headers.iter().any(|(n, _)| n == "host") {
            headers.push(("host".into(), x.authority.clone()));
        }
        if x.query.contains(REDACTED) {
            self.notes.push(note(
                Some(x),
                0,
                kind::NOT_RESTORED,
                "query",
                "query parameters were redacted at capture; sent with the redaction marker".into(),
            ));
        }
        let uri = if x.query.is_empty() {
            x.path.clone()
        } else {
            format!("{}?{}", x.path, x.query)
        };
        self.steps.push(Step::Http {
            recorded: Box::new(x.clone()),
            request: Request {
                method: x.method.clone(),
                uri,
                headers,
                body: content,
            },
        });
    }

    fn stream(&mut self, s: &OpaqueStream, opts: &PlanOptions) {
        let mk = |k: &str, field: &str, why: String| note(None, s.stream_id, k, field, why);
        if s.missing_payload {
            self.notes.push(mk(
                kind::NOT_RESTORED,
                "payload",
                format!(
                    "stream {}: its bytes were not captured (the route's capture level keeps no payload, or parsing stopped keeping it); not sent",
                    s.stream_id
                ),
            ));
            return;
        }
        if let Some(hole) = &s.hole {
            self.notes.push(mk(
                kind::NOT_RESTORED,
                "payload",
                format!("stream {}: {hole}; not sent", s.stream_id),
            ));
            return;
        }
        let h2_reads_only = !s.mirrored.is_empty()
            && s.mirrored
                .iter()
                .all(|x| x.phase == ExchangePhase::Message || safe(&x.method));
        if !opts.allow_writes && !h2_reads_only {
            let what = if s.mirrored.is_empty() {
                format!(
                    "is opaque ({} B up): what it does cannot be known",
                    s.up_len
                )
            } else {
                let calls: Vec<String> = s
                    .mirrored
                    .iter()
                    .filter(|x| x.phase != ExchangePhase::Message)
                    .take(3)
                    .map(|x| format!("{} {}", x.method, x.path))
                    .collect();
                format!(
                    "is HTTP/2 with requests that may write ({})",
                    calls.join(", ")
                )
            };
            self.notes.push(mk(
                kind::SKIPPED,
                "",
                format!(
                    "stream {} {what}; pass --allow-writes to send it",
                    s.stream_id
                ),
            ));
            return;
        }
        if contains(&s.down, b"SCRAM-SHA") {
            self.notes.push(mk(
                kind::NOT_RESTORED,
                "handshake",
                format!(
                    "stream {}: a challenge-response handshake (SCRAM): the recorded client proof cannot answer a new challenge, so authentication will fail",
                    s.stream_id
                ),
            ));
        }
        self.steps.push(Step::Stream(s.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtap_schemas::{BodyCapture, Header};

    fn rec(items: Vec<Item>) -> Recording {
        Recording {
            session_id: "s".into(),
            identity: "a".into(),
            target: "t".into(),
            opened_at: 0,
            items,
        }
    }

    fn x(method: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Item {
        Item::Http(Box::new(HttpExchange {
            protocol: "HTTP/1.1".into(),
            method: method.into(),
            path: "/p".into(),
            authority: "svc".into(),
            request_headers: headers
                .iter()
                .map(|(n, v)| Header {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            request_body: BodyCapture {
                size: body.map_or(0, |b| b.len() as u64),
                content: body.map(<[u8]>::to_vec),
                ..Default::default()
            },
            capture: "exchanges".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn writes_are_skipped_unless_allowed() {
        let r = rec(vec![x("GET", &[], None), x("POST", &[], Some(b"{}"))]);
        let p = Plan::new(&r, &PlanOptions::default());
        assert_eq!(p.http_requests(), 1);
        let skipped: Vec<_> = p.skipped().collect();
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].method == "POST" && skipped[0].note.contains("--allow-writes"));
        let p = Plan::new(
            &r,
            &PlanOptions {
                allow_writes: true,
                ..Default::default()
            },
        );
        assert_eq!(p.http_requests(), 2);
        assert_eq!(p.skipped().count(), 0);
    }

    #[test]
    fn redacted_credentials_come_only_from_header_flags() {
        let r = rec(vec![x(
            "GET",
            &[
                ("authorization", REDACTED),
                ("accept", "*/*"),
                ("connection", "close"),
            ],
            None,
        )]);
        let p = Plan::new(&r, &PlanOptions::default());
        let Step::Http { request, .. } = &p.steps[0] else {
            panic!()
        };
        assert!(!request.headers.iter().any(|(n, _)| n == "authorization"));
        assert!(!request.headers.iter().any(|(n, _)| n == "connection"));
        assert!(request.headers.contains(&("host".into(), "svc".into())));
        let nr: Vec<_> = p.not_restored().collect();
        assert_eq!(nr[0].field, "authorization");
        let p = Plan::new(
            &r,
            &PlanOptions {
                headers: vec![parse_header("Authorization: Bearer t").unwrap()],
                ..Default::default()
            },
        );
        let Step::Http { request, .. } = &p.steps[0] else {
            panic!()
        };
        assert!(
            request
                .headers
                .contains(&("authorization".into(), "Bearer t".into()))
        );
        assert_eq!(p.not_restored().count(), 0);
    }

    #[test]
    fn bodies_not_stored_are_not_invented() {
        let mut item = x("PUT", &[], Some(b"abc"));
        if let Item::Http(x) = &mut item {
            x.request_body.truncated = true;
        }
        let opts = PlanOptions {
            allow_writes: true,
            ..Default::default()
        };
        let p = Plan::new(&rec(vec![item]), &opts);
        assert!(p.steps.is_empty());
        assert!(p.not_restored().next().unwrap().note.contains("truncated"));
    }

    #[test]
    fn http2_exchanges_without_their_bytes_are_listed_not_sent() {
        let mut item = x("GET", &[], None);
        if let Item::Http(x) = &mut item {
            x.protocol = "HTTP/2".into();
            x.grpc_service = "shop.Items".into();
        }
        let p = Plan::new(&rec(vec![item]), &PlanOptions::default());
        assert!(p.steps.is_empty());
        let n = p.not_restored().next().unwrap();
        assert!(
            n.note.contains("(gRPC)") && n.note.contains("`full`"),
            "{}",
            n.note
        );
    }

    #[test]
    fn header_flags_are_checked() {
        assert_eq!(
            parse_header(" X-Api-Key :  k ").unwrap(),
            ("x-api-key".into(), "k".into())
        );
        assert!(parse_header("novalue").is_err());
        assert!(parse_header("bad name: v").is_err());
        assert!(parse_header("a: b\r\nc: d").is_err());
        // The value may be a credential: errors never show it.
        for bad in [
            "Authorization Bearer s3cret",
            "x-key: s3cret\nmore",
            "Authorization Bearer s3cret:more",
        ] {
            let e = parse_header(bad).unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{e}");
        }
    }
}
