//! HTTP mirroring: what the edge understands of the HTTP it forwards.
//!
//! Each stream of a route that may carry HTTP gets a [`StreamCapture`], which decides
//! from the stream's first bytes whether it is HTTP/1.x (or opaque) and what its frames
//! keep (the capture level), and — for HTTP — a [`Mirror`]: a task of its own, fed
//! copies of the forwarded chunks through a bounded channel (`capture.mirror_queue`).
//! The forwarder waits on that channel only when it is full and the route says
//! `block`; on other routes a full channel ends mirroring for the stream and an event
//! says so. The task parses ([`http1`]), redacts ([`redact`]) and appends one
//! `http_exchange` record per exchange (or per server-sent event) to the session's
//! chain. Nothing here can alter or stall the forwarded bytes beyond that wait: a parse
//! failure stops the parser, turns off the stream's payload capture, and is recorded.

pub mod gate;
pub mod redact;
pub use cloudtap_parsers::{http1, http2};

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc;

use cloudtap_schemas::{
    Audit, Body, BodyCapture, Direction, ExchangePhase, Header, HttpExchange, now_unix_nanos,
};

use crate::config::{Backpressure, CaptureLevel, Protocol, TargetConfig};
use crate::session::Session;
use crate::tap::Tap;
use http1::{Event, Http1, RawBody, RawExchange, RawHead};
use http2::Http2;
use redact::Redactor;

/// What a stream turned out to carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), gRPC included.
    Http2,
    Opaque,
}

/// Per-stream capture decisions, shared by both directions' forwarders.
#[derive(Debug)]
pub struct StreamCapture {
    protocol: Protocol,
    level: Option<CaptureLevel>,
    decided: OnceLock<(Kind, CaptureLevel)>,
    /// Set when the mirror stops on a parse failure: frames keep no payload from then on.
    payload_off: AtomicBool,
}

const H2_PREFACE: &[u8] = http2::PREFACE;

/// Whether bytes start with an HTTP/2 SETTINGS frame on stream 0 (a server's preface).
fn h2_settings(b: &[u8]) -> bool {
    b.len() >= 9 && b[3] == 4 && b[4] & !1 == 0 && b[5..9] == [0, 0, 0, 0] && {
        let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        len % 6 == 0
    }
}

/// Whether a client's first bytes look like an HTTP/1.x request (or the start of one):
/// optional blank lines, then a method — any token of uppercase letters, so WebDAV's
/// `PROPFIND` counts — and a space. Misjudging HTTP as opaque would store it at `full`,
/// so anything that starts like a request line is HTTP.
fn looks_like_http1(b: &[u8]) -> bool {
    let mut i = 0;
    while i < b.len() && (b[i] == b'\r' || b[i] == b'\n') {
        i += 1;
    }
    let method = b[i..].iter().take_while(|c| c.is_ascii_uppercase()).count();
    match b.get(i + method) {
        Some(b' ') => (1..=20).contains(&method),
        // The chunk ends inside the method: decide on what there is.
        None => method > 0 && method <= 20,
        Some(_) => false,
    }
}

impl StreamCapture {
    pub fn new(target: &TargetConfig) -> Self {
        Self {
            protocol: target.protocol,
            level: target.capture,
            decided: OnceLock::new(),
            payload_off: AtomicBool::new(false),
        }
    }

    /// Decides on the stream's first chunk, from either side; later calls return the
    /// same answer. A server that speaks first makes the stream opaque — except when
    /// what it says is an HTTP/2 SETTINGS frame (an h2c server's preface, which h2
    /// servers send without waiting for the client's): then nothing is decided until
    /// the client speaks (`None`), and those chunks keep no payload.
    pub fn decide(&self, dir: Direction, first: &[u8]) -> Option<(Kind, CaptureLevel)> {
        if let Some(d) = self.decided.get() {
            return Some(*d);
        }
        if self.protocol == Protocol::Auto && dir == Direction::Down && h2_settings(first) {
            return None;
        }
        Some(*self.decided.get_or_init(|| {
            let kind = match self.protocol {
                Protocol::Tcp => Kind::Opaque,
                Protocol::Http1 => Kind::Http1,
                Protocol::Http2 => Kind::Http2,
                Protocol::Auto if dir == Direction::Down => Kind::Opaque,
                // At least "PRI " (a shorter chunk could as well be "PUT"/"POST").
                Protocol::Auto
                    if first.len() >= 4
                        && (first.starts_with(H2_PREFACE) || H2_PREFACE.starts_with(first)) =>
                {
                    Kind::Http2
                }
                Protocol::Auto if looks_like_http1(first) => Kind::Http1,
                Protocol::Auto => Kind::Opaque,
            };
            let level = self.level.unwrap_or(match kind {
                Kind::Opaque => CaptureLevel::Full,
                Kind::Http1 | Kind::Http2 => CaptureLevel::Exchanges,
            });
            (kind, level)
        }))
    }

    /// What was decided, if anything yet.
    pub fn decided(&self) -> Option<(Kind, CaptureLevel)> {
        self.decided.get().copied()
    }

    /// Whether frames of this stream carry their payload now.
    pub fn keeps_payload(&self) -> bool {
        matches!(self.decided.get(), Some((_, CaptureLevel::Full)))
            && !self.payload_off.load(Ordering::Acquire)
    }

    /// Whether the route can carry HTTP at all (a mirror is worth starting).
    pub fn may_be_http(target: &TargetConfig) -> bool {
        target.protocol != Protocol::Tcp
    }
}

/// One chunk as the mirror receives it.
struct Chunk {
    dir: Direction,
    bytes: Bytes,
    ts: i64,
}

/// The forwarders' side of a stream's mirror.
pub struct Mirror {
    tx: Option<mpsc::Sender<Chunk>>,
    mode: Backpressure,
    /// Set when a chunk could not be queued: the mirror stops at its next chunk.
    lost: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").field("mode", &self.mode).finish()
    }
}

/// Everything the mirror task needs to turn parsed exchanges into records.
pub struct Shaper {
    pub redactor: Arc<Redactor>,
    pub max_body: usize,
    pub metrics: Arc<crate::metrics::HttpMetrics>,
    pub otlp: Option<Arc<crate::otlp::Otlp>>,
}

impl Mirror {
    /// Starts the mirror task of one stream; `queue` is `capture.mirror_queue`.
    pub fn start(
        tap: Tap,
        session: Arc<Session>,
        capture: Arc<StreamCapture>,
        stream_id: u64,
        queue: usize,
        shaper: Shaper,
    ) -> Mirror {
        let (tx, rx) = mpsc::channel(queue);
        let lost = Arc::new(AtomicBool::new(false));
        let mode = session.backpressure;
        let task = tokio::spawn(run(
            rx,
            tap,
            session,
            capture,
            stream_id,
            shaper,
            lost.clone(),
        ));
        Mirror {
            tx: Some(tx),
            mode,
            lost,
            task,
        }
    }

    /// Hands the mirror a copy of a forwarded chunk. Waits only on a `block` route
    /// whose mirror queue is full.
    pub async fn feed(&self, dir: Direction, bytes: &Bytes) {
        let Some(tx) = &self.tx else { return };
        if self.lost.load(Ordering::Relaxed) {
            return;
        }
        let chunk = Chunk {
            dir,
            bytes: bytes.clone(),
            ts: now_unix_nanos(),
        };
        match self.mode {
            Backpressure::Block => {
                let _ = tx.send(chunk).await;
            }
            Backpressure::Drop | Backpressure::Strict => {
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(chunk) {
                    self.lost.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Ends the stream for the mirror and waits until its records are handed to the tap.
    pub async fn finish(mut self) {
        self.tx = None;
        let _ = (&mut self.task).await;
    }
}

async fn run(
    mut rx: mpsc::Receiver<Chunk>,
    tap: Tap,
    session: Arc<Session>,
    capture: Arc<StreamCapture>,
    stream_id: u64,
    shaper: Shaper,
    lost: Arc<AtomicBool>,
) {
    let mut parser: Option<Parser> = None;
    let mut events = Vec::new();
    let mut last_ts = 0;
    let mut stopped = false;
    // Server chunks that came before the stream was decided (an h2c server's SETTINGS).
    let mut early: Vec<Chunk> = Vec::new();
    while let Some(chunk) = rx.recv().await {
        last_ts = chunk.ts;
        if stopped {
            continue;
        }
        // The forwarders decide before they hand a chunk over; the mirror only reads.
        let Some((kind, level)) = capture.decided() else {
            // Bounded: a server that keeps talking before the client is not h2c.
            if early.len() < 64 {
                early.push(chunk);
            }
            continue;
        };
        if kind == Kind::Opaque {
            stopped = true;
            continue;
        }
        if lost.load(Ordering::Relaxed) {
            stopped = true;
            capture.payload_off.store(true, Ordering::Release);
            event(
                &tap,
                &session,
                "mirror_stopped",
                format!(
                    "stream {stream_id}: the HTTP mirror fell behind (capture.mirror_queue is full) and stopped; later exchanges of this stream are not recorded"
                ),
            )
            .await;
            continue;
        }
        let p = parser.get_or_insert_with(|| match kind {
            Kind::Http2 => Parser::H2(Http2::new(shaper.max_body)),
            _ => Parser::H1(Http1::new(shaper.max_body)),
        });
        if kind == Kind::Http2 {
            for c in early.drain(..) {
                p.feed(c.dir, &c.bytes, c.ts, &mut events);
            }
        }
        early.clear();
        p.feed(chunk.dir, &chunk.bytes, chunk.ts, &mut events);
        for e in events.drain(..) {
            emit(&tap, &session, &capture, stream_id, level, &shaper, e).await;
        }
        if p.is_done() {
            stopped = true;
        }
    }
    if let (Some(p), false) = (parser.as_mut(), stopped) {
        p.finish(last_ts.max(1), &mut events);
        let level = capture
            .decided
            .get()
            .map_or(CaptureLevel::Exchanges, |d| d.1);
        for e in events.drain(..) {
            emit(&tap, &session, &capture, stream_id, level, &shaper, e).await;
        }
    }
}

/// The parser of a stream's protocol.
enum Parser {
    H1(Http1),
    H2(Http2),
}

impl Parser {
    fn feed(&mut self, dir: Direction, bytes: &[u8], ts: i64, out: &mut Vec<Event>) {
        let dir = match dir {
            Direction::Up => cloudtap_parsers::Direction::Up,
            Direction::Down => cloudtap_parsers::Direction::Down,
        };
        match self {
            Parser::H1(p) => p.feed(dir, bytes, ts, out),
            Parser::H2(p) => p.feed(dir, bytes, ts, out),
        }
    }

    fn finish(&mut self, ts: i64, out: &mut Vec<Event>) {
        match self {
            Parser::H1(p) => p.finish(ts, out),
            Parser::H2(p) => p.finish(ts, out),
        }
    }

    fn is_done(&self) -> bool {
        match self {
            Parser::H1(p) => p.is_done(),
            Parser::H2(p) => p.is_done(),
        }
    }
}

async fn event(tap: &Tap, session: &Session, action: &str, detail: String) {
    let body = Body::Audit(Audit {
        actor: "mirror".into(),
        action: action.into(),
        detail,
    });
    let _ = tap
        .record(session.id, body, session.backpressure, &session.gaps)
        .await;
}

async fn emit(
    tap: &Tap,
    session: &Session,
    capture: &StreamCapture,
    stream_id: u64,
    level: CaptureLevel,
    shaper: &Shaper,
    e: Event,
) {
    let record = match e {
        Event::Exchange(x) => shaper.exchange(stream_id, level, ExchangePhase::Complete, &x),
        Event::StreamStart(x) => shaper.exchange(stream_id, level, ExchangePhase::Start, &x),
        Event::StreamEnd(x) => shaper.exchange(stream_id, level, ExchangePhase::End, &x),
        Event::StreamMessage {
            index,
            dir,
            grpc,
            message,
            body,
            ts,
        } => {
            let dir = match dir {
                cloudtap_parsers::Direction::Up => Direction::Up,
                cloudtap_parsers::Direction::Down => Direction::Down,
            };
            shaper.message(stream_id, level, (index, message), dir, grpc, &body, ts)
        }
        Event::Upgraded => return,
        Event::Stopped(reason) => {
            capture.payload_off.store(true, Ordering::Release);
            event(
                tap,
                session,
                "mirror_stopped",
                format!(
                    "stream {stream_id}: HTTP parsing stopped ({reason}); the stream is still forwarded, its frames carry no payload from here and its later exchanges are not recorded"
                ),
            )
            .await;
            return;
        }
    };
    shaper.metrics.observe(&session.target, &record);
    if let Some(o) = &shaper.otlp {
        let session_id = session.id.to_string();
        let cx = crate::otlp::SpanContext {
            session_id: &session_id,
            target: &session.target,
            identity: &session.identity,
        };
        if let Some(span) = crate::otlp::span_of(&record, &cx) {
            o.send(span);
        }
    }
    let _ = tap
        .record(
            session.id,
            Body::HttpExchange(Box::new(record)),
            session.backpressure,
            &session.gaps,
        )
        .await;
}

/// Splits a request target into (authority, path, query).
fn split_target(method: &str, target: &str) -> (Option<String>, String, String) {
    if method == "CONNECT" {
        return (Some(target.to_owned()), String::new(), String::new());
    }
    let (authority, rest) = match target.split_once("://") {
        Some((_, after)) => {
            let end = after.find(['/', '?']).unwrap_or(after.len());
            // Never keep `user:password@` from an absolute target.
            let host = after[..end].rsplit('@').next().unwrap_or("");
            (Some(host.to_owned()), &after[end..])
        }
        None => (None, target),
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, q),
        None => (rest, ""),
    };
    let path = if path.is_empty() { "/" } else { path };
    (authority, path.to_owned(), query.to_owned())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Shaper {
    fn headers(&self, level: CaptureLevel, head: Option<&RawHead>) -> Vec<Header> {
        if level == CaptureLevel::Metadata {
            return Vec::new();
        }
        head.map(|h| {
            h.headers
                .iter()
                .map(|(name, value)| Header {
                    name: name.clone(),
                    value: self.redactor.header_value(name, &lossy(value)),
                })
                .collect()
        })
        .unwrap_or_default()
    }

    pub fn exchange(
        &self,
        stream_id: u64,
        level: CaptureLevel,
        phase: ExchangePhase,
        x: &RawExchange,
    ) -> HttpExchange {
        let req = &x.request;
        let (abs_authority, path, query) = split_target(&req.method, &req.target);
        let path = self.redactor.path(&path);
        let authority = req
            .header("host")
            .map(lossy)
            .or(abs_authority)
            .unwrap_or_default();
        let resp = x.response.as_ref();
        let grpc = req
            .header("content-type")
            .is_some_and(|c| c.starts_with(b"application/grpc"));
        let (grpc_service, grpc_method) =
            match path.strip_prefix('/').and_then(|p| p.rsplit_once('/')) {
                Some((svc, method)) if grpc => (svc.to_owned(), method.to_owned()),
                _ => (String::new(), String::new()),
            };
        // gRPC's status is a trailer, or a header of a trailers-only response.
        let grpc_status = if grpc {
            x.trailers
                .iter()
                .chain(resp.map(|r| r.headers.as_slice()).unwrap_or_default())
                .find(|(n, _)| n == "grpc-status")
                .map(|(_, v)| lossy(v))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let mut response_headers = self.headers(level, resp);
        if level != CaptureLevel::Metadata {
            response_headers.extend(x.trailers.iter().map(|(name, value)| Header {
                name: name.clone(),
                value: self.redactor.header_value(name, &lossy(value)),
            }));
        }
        // `start` records carry the head only; the body follows as messages.
        let response_body = match phase {
            ExchangePhase::Start => BodyCapture::default(),
            _ => self.body(level, resp, &x.response_body, phase == ExchangePhase::End),
        };
        HttpExchange {
            stream_id,
            exchange_index: x.index,
            phase,
            message_index: 0,
            protocol: req.version.into(),
            method: req.method.clone(),
            authority: self.redactor.text(&authority).into_owned(),
            path,
            query: self.redactor.form(&query),
            status: resp.map_or(0, |r| u32::from(r.status)),
            grpc_service,
            grpc_method,
            grpc_status,
            start_unix_nanos: x.start_ts,
            end_unix_nanos: x.end_ts,
            request_headers: self.headers(level, Some(req)),
            response_headers,
            request_body: self.body(level, Some(req), &x.request_body, false),
            response_body,
            traceparent: req
                .header("traceparent")
                .map(lossy)
                .filter(|t| valid_traceparent(t))
                .unwrap_or_default(),
            capture: level.as_str().into(),
            redaction_version: self.redactor.version,
            note: self.redactor.text(&x.note).into_owned(),
        }
    }

    /// One message of a long-lived exchange: `(exchange, message)` index; a client's
    /// message goes in `request_body`, a server's in `response_body`.
    #[allow(clippy::too_many_arguments)]
    fn message(
        &self,
        stream_id: u64,
        level: CaptureLevel,
        (index, message): (u64, u64),
        dir: Direction,
        grpc: bool,
        raw: &RawBody,
        ts: i64,
    ) -> HttpExchange {
        let body = if grpc {
            BodyCapture {
                size: raw.size,
                sha256: raw.sha256(),
                note: if level == CaptureLevel::Metadata {
                    String::new()
                } else {
                    GRPC_NOT_STORED.into()
                },
                ..BodyCapture::default()
            }
        } else {
            let mut b = self.event(level, raw);
            if level != CaptureLevel::Metadata && b.content.is_none() && b.note.is_empty() {
                b.note = "event is not text; not stored".into();
            }
            b
        };
        let (request_body, response_body) = match dir {
            Direction::Up => (body, BodyCapture::default()),
            Direction::Down => (BodyCapture::default(), body),
        };
        HttpExchange {
            stream_id,
            exchange_index: index,
            phase: ExchangePhase::Message,
            message_index: message,
            protocol: if grpc { "HTTP/2" } else { "" }.into(),
            start_unix_nanos: ts,
            end_unix_nanos: ts,
            request_body,
            response_body,
            capture: level.as_str().into(),
            redaction_version: self.redactor.version,
            ..HttpExchange::default()
        }
    }

    /// One server-sent event: its `data:` lines are redacted as JSON when they parse as
    /// JSON, as text otherwise; other fields (`event:`, `id:`) as text.
    fn event(&self, level: CaptureLevel, raw: &RawBody) -> BodyCapture {
        let mut out = BodyCapture {
            size: raw.size,
            sha256: raw.sha256(),
            ..BodyCapture::default()
        };
        if level == CaptureLevel::Metadata {
            return out;
        }
        let Ok(text) = std::str::from_utf8(&raw.kept) else {
            out.note = "event is not UTF-8 text; not stored".into();
            return out;
        };
        if raw.cut() {
            out.note = format!("event larger than {} bytes; not stored", self.max_body);
            return out;
        }
        let lines: Vec<String> = text
            .lines()
            .map(|line| match line.split_once(':') {
                Some(("data", value)) => {
                    let v = value.strip_prefix(' ').unwrap_or(value);
                    let red = match serde_json::from_str::<serde_json::Value>(v) {
                        Ok(mut json) if v.trim_start().starts_with(['{', '[']) => {
                            self.redactor.json(&mut json);
                            json.to_string()
                        }
                        _ => self.redactor.text(v).into_owned(),
                    };
                    format!("data: {red}")
                }
                _ => self.redactor.text(line).into_owned(),
            })
            .collect();
        out.content = Some(lines.join("\n").into_bytes());
        out
    }

    /// A body as recorded: size and hash always; content only at `exchanges` or
    /// `full`, decoded and redacted, and only when it could be inspected.
    /// `sse_total`: the whole body of an event stream, whose events were recorded one
    /// by one — only its size and hash are kept.
    fn body(
        &self,
        level: CaptureLevel,
        head: Option<&RawHead>,
        raw: &RawBody,
        sse_total: bool,
    ) -> BodyCapture {
        let mut out = BodyCapture {
            size: raw.size,
            sha256: raw.sha256(),
            content: None,
            truncated: false,
            note: String::new(),
        };
        if raw.size == 0 || level == CaptureLevel::Metadata || sse_total {
            return out;
        }
        let header = |n: &str| {
            head.and_then(|h| h.header(n))
                .map(|v| lossy(v).trim().to_ascii_lowercase())
                .unwrap_or_default()
        };
        let encoding = header("content-encoding");
        let content_type = header("content-type");
        let cut = raw.cut();
        let (mut decoded, more) = match decode(&encoding, &raw.kept, self.max_body) {
            Ok(d) => d,
            Err(note) => {
                out.note = note;
                return out;
            }
        };
        let truncated = cut || more;
        if content_type.starts_with("multipart/") {
            out.note = "multipart bodies are not inspected; not stored".into();
            return out;
        }
        if content_type.starts_with("application/grpc") {
            out.note = GRPC_NOT_STORED.into();
            return out;
        }
        // Only what redaction understands is stored: JSON, forms, plain text and HTML
        // (and bodies without a content type, sniffed below). XML, protobuf
        // (`application/proto`, `…+proto`), binary and anything else keep size and hash.
        let inspectable = content_type.is_empty()
            || content_type.contains("json")
            || content_type.starts_with("application/x-www-form-urlencoded")
            || content_type.starts_with("text/plain")
            || content_type.starts_with("text/html")
            || content_type.starts_with("text/event-stream")
            || content_type.starts_with("text/csv");
        if !inspectable {
            let shown: String = content_type.chars().take(64).collect();
            out.note = format!("{shown} bodies are not inspected; not stored");
            return out;
        }
        let text = match std::str::from_utf8(&decoded) {
            Ok(_) => String::from_utf8(std::mem::take(&mut decoded)).expect("checked just above"),
            Err(e) if truncated && e.error_len().is_none() => {
                decoded.truncate(e.valid_up_to());
                String::from_utf8(decoded).expect("valid prefix")
            }
            Err(_) => {
                out.note = "binary body (not UTF-8 text); not stored".into();
                return out;
            }
        };
        let trimmed = text.trim_start();
        let redacted = if content_type.contains("json")
            || trimmed.starts_with('{')
            || trimmed.starts_with('[')
        {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(mut v) if !truncated => {
                    self.redactor.json(&mut v);
                    Some(v.to_string())
                }
                _ => self.redactor.json_text(&text),
            }
        } else if content_type.starts_with("application/x-www-form-urlencoded") {
            Some(self.redactor.form(&text))
        } else {
            Some(self.redactor.text(&text).into_owned())
        };
        match redacted {
            Some(r) => {
                out.content = Some(r.into_bytes());
                out.truncated = truncated;
                if truncated {
                    out.note = format!("only the first {} bytes are kept", self.max_body);
                }
            }
            None => {
                out.note =
                    "truncated JSON cannot be checked against redaction.json_paths; not stored"
                        .into()
            }
        }
        out
    }
}

const GRPC_NOT_STORED: &str = "gRPC messages (protobuf) are not inspected; not stored";

/// Decodes a body's kept bytes per its `content-encoding`, up to `max` bytes.
/// Returns the bytes and whether there was more; `Err` names why it cannot be read.
fn decode(encoding: &str, kept: &[u8], max: usize) -> Result<(Vec<u8>, bool), String> {
    fn read_max(mut r: impl Read, max: usize) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        // A body cut at the cap ends mid-stream: keep what decoded before the error.
        let _ = r.by_ref().take(max as u64 + 1).read_to_end(&mut out);
        let more = out.len() > max;
        out.truncate(max);
        (out, more)
    }
    match encoding {
        "" | "identity" => {
            let more = kept.len() > max;
            Ok((kept[..kept.len().min(max)].to_vec(), more))
        }
        "gzip" | "x-gzip" => Ok(read_max(flate2::read::GzDecoder::new(kept), max)),
        "deflate" => {
            // Servers send zlib-wrapped (RFC 9110) or, wrongly, raw deflate.
            let (z, more) = read_max(flate2::read::ZlibDecoder::new(kept), max);
            if z.is_empty() {
                Ok(read_max(flate2::read::DeflateDecoder::new(kept), max))
            } else {
                Ok((z, more))
            }
        }
        other => Err(format!(
            "content-encoding {other:?} cannot be inspected; body not stored"
        )),
    }
}

/// `version-traceid-parentid-flags`, lowercase hex (W3C Trace Context).
fn valid_traceparent(t: &str) -> bool {
    let parts: Vec<&str> = t.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One line for live watchers: `GET api.internal/users?id=1 → 200 (12.3 ms)`.
pub fn summary(x: &HttpExchange) -> String {
    let query = if x.query.is_empty() {
        String::new()
    } else {
        format!("?{}", x.query)
    };
    match x.phase {
        ExchangePhase::Message => format!(
            "stream {} exchange {} event {}",
            x.stream_id, x.exchange_index, x.message_index
        ),
        _ => {
            let status = if x.status == 0 {
                "no response".to_owned()
            } else {
                x.status.to_string()
            };
            let ms = if x.end_unix_nanos > 0 {
                format!(
                    " ({:.1} ms)",
                    (x.end_unix_nanos - x.start_unix_nanos) as f64 / 1e6
                )
            } else {
                String::new()
            };
            let phase = match x.phase {
                ExchangePhase::Start => " [stream started]",
                ExchangePhase::End => " [stream ended]",
                _ => "",
            };
            format!(
                "{} {}{}{} -> {}{}{}",
                x.method, x.authority, x.path, query, status, ms, phase
            )
        }
    }
}
