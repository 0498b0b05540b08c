//! Record types. Field order here is the canonical encoding's order (see
//! `canonical.rs`); add fields only at the end of a body and bump `SCHEMA_VERSION`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One record of the traffic log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub chain_id: Uuid,
    pub seq: u64,
    pub ts_unix_nanos: i64,
    pub prev_hash: [u8; 32],
    pub record_hash: [u8; 32],
    pub schema_version: u32,
    pub body: Body,
}

impl Record {
    /// The record kind in snake_case, as used in events, filters and tables.
    pub fn kind(&self) -> &'static str {
        self.body.kind()
    }

    /// A copy with a frame's payload left out, made without copying the payload (frames
    /// carry up to 64 KiB; hashing and live events need everything but those bytes).
    pub fn without_payload(&self) -> Record {
        let body = match &self.body {
            Body::Frame(f) => Body::Frame(Frame {
                stream_id: f.stream_id,
                direction: f.direction,
                offset: f.offset,
                length: f.length,
                payload: None,
            }),
            other => other.clone(),
        };
        Record {
            chain_id: self.chain_id,
            seq: self.seq,
            ts_unix_nanos: self.ts_unix_nanos,
            prev_hash: self.prev_hash,
            record_hash: self.record_hash,
            schema_version: self.schema_version,
            body,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    SessionOpened(SessionOpened),
    SessionClosed(SessionClosed),
    StreamOpened(StreamOpened),
    StreamClosed(StreamClosed),
    Frame(Frame),
    Gap(Gap),
    PolicyDecision(PolicyDecision),
    Heartbeat(Heartbeat),
    Control(Control),
    Audit(Audit),
    /// Boxed: exchanges are large and rare next to frames.
    HttpExchange(Box<HttpExchange>),
    ReplayDiff(Box<ReplayDiff>),
}

impl Body {
    pub fn kind(&self) -> &'static str {
        match self {
            Body::SessionOpened(_) => "session_opened",
            Body::SessionClosed(_) => "session_closed",
            Body::StreamOpened(_) => "stream_opened",
            Body::StreamClosed(_) => "stream_closed",
            Body::Frame(_) => "frame",
            Body::Gap(_) => "gap",
            Body::PolicyDecision(_) => "policy_decision",
            Body::Heartbeat(_) => "heartbeat",
            Body::Control(_) => "control",
            Body::Audit(_) => "audit",
            Body::HttpExchange(_) => "http_exchange",
            Body::ReplayDiff(_) => "replay_diff",
        }
    }

    /// Stable tag of the body in the canonical encoding.
    pub(crate) fn tag(&self) -> u8 {
        match self {
            Body::SessionOpened(_) => 1,
            Body::SessionClosed(_) => 2,
            Body::StreamOpened(_) => 3,
            Body::StreamClosed(_) => 4,
            Body::Frame(_) => 5,
            Body::Gap(_) => 6,
            Body::PolicyDecision(_) => 7,
            Body::Heartbeat(_) => 8,
            Body::Control(_) => 9,
            Body::Audit(_) => 10,
            Body::HttpExchange(_) => 11,
            Body::ReplayDiff(_) => 12,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionOpened {
    /// Name of the edge that holds the session (its only writer).
    pub edge: String,
    /// The chain of the edge process that opened it (heartbeats live there).
    pub edge_chain_id: Uuid,
    pub identity: String,
    pub target: String,
    /// The upstream address the edge resolved and pinned.
    pub upstream: String,
    pub client_cert_sha256: String,
    pub token_id: String,
    pub on_log_backpressure: String,
    /// The session this one re-sends (`cloudtapctl replay`); empty otherwise. Schema 3.
    pub replay_of: String,
}

/// Why a session ended (DESIGN: "A tunnel, step by step").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    Normal,
    UserClose,
    ClientGone,
    TokenExpired,
    Revoked,
    Policy,
    UpstreamError,
    EdgeShutdown,
    EdgeRestart,
    EdgeLost,
}

impl CloseReason {
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Normal,
        CloseReason::UserClose,
        CloseReason::ClientGone,
        CloseReason::TokenExpired,
        CloseReason::Revoked,
        CloseReason::Policy,
        CloseReason::UpstreamError,
        CloseReason::EdgeShutdown,
        CloseReason::EdgeRestart,
        CloseReason::EdgeLost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::UserClose => "user_close",
            CloseReason::ClientGone => "client_gone",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Revoked => "revoked",
            CloseReason::Policy => "policy",
            CloseReason::UpstreamError => "upstream_error",
            CloseReason::EdgeShutdown => "edge_shutdown",
            CloseReason::EdgeRestart => "edge_restart",
            CloseReason::EdgeLost => "edge_lost",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClosed {
    pub reason: CloseReason,
    pub detail: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub streams: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamOpened {
    pub stream_id: u64,
    pub target: String,
    pub protocol_hint: String,
    pub client_addr: String,
    pub upstream_addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamClosed {
    pub stream_id: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Empty when the stream ended cleanly.
    pub error: String,
}

/// Direction of a frame: `Up` is client → target, `Down` is target → client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "up" => Some(Direction::Up),
            "down" => Some(Direction::Down),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream_id: u64,
    pub direction: Direction,
    /// Byte offset of this chunk within the stream's direction.
    pub offset: u64,
    pub length: u32,
    /// The bytes exactly as forwarded; `None` when the capture level keeps none.
    pub payload: Option<Vec<u8>>,
}

/// Records that were not written because the route's `on_log_backpressure` is `drop`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Gap {
    pub dropped_records: u64,
    pub dropped_bytes: u64,
    pub reason: String,
}

/// An access decision: every refusal is one, and so is every tunnel granted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyDecision {
    pub identity: String,
    pub target: String,
    /// What was asked: `login`, `open_tunnel`, `attach`, `renew`, `stream`, `issue_token`, …
    pub action: String,
    pub allowed: bool,
    /// Machine-readable code (`token_expired`, `revoked`, `forbidden`, …); empty when allowed.
    pub code: String,
    pub reason: String,
    pub token_id: String,
    pub client_cert_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Heartbeat {
    pub edge: String,
    pub open_sessions: u64,
}

/// A command every edge following the log obeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub action: ControlAction,
    /// Token id (revoke), or target name / session id (close).
    pub subject: String,
    pub reason: String,
    pub actor: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    Revoke,
    Close,
}

impl ControlAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlAction::Revoke => "revoke",
            ControlAction::Close => "close",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "revoke" => Some(ControlAction::Revoke),
            "close" => Some(ControlAction::Close),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Audit {
    pub actor: String,
    pub action: String,
    pub detail: String,
}

/// One HTTP request and its response as the edge's mirror understood them, already
/// redacted (DESIGN: "Capture levels and redaction"). A long-lived exchange (server-sent
/// events) is several records: `start` when the response head arrives, one `message`
/// per event, `end`; every other exchange is one `complete` record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpExchange {
    pub stream_id: u64,
    /// Position of the exchange on its stream, from 0 (pipelined requests in order).
    pub exchange_index: u64,
    pub phase: ExchangePhase,
    /// For `message`: its position within the exchange, from 0.
    pub message_index: u64,
    /// `HTTP/1.0`, `HTTP/1.1`.
    pub protocol: String,
    pub method: String,
    /// The `Host` header (HTTP/1) or `:authority` (HTTP/2).
    pub authority: String,
    /// Path without the query.
    pub path: String,
    /// The query string without `?`, redacted.
    pub query: String,
    /// Response status; 0 when no response came.
    pub status: u32,
    pub grpc_service: String,
    pub grpc_method: String,
    /// gRPC status code as text; empty when not gRPC or not known.
    pub grpc_status: String,
    /// When the request's first byte was seen.
    pub start_unix_nanos: i64,
    /// When the response's last byte (for `start`: its head; for `message`: that
    /// message) was seen; 0 when no response came.
    pub end_unix_nanos: i64,
    /// Empty at capture level `metadata`.
    pub request_headers: Vec<Header>,
    pub response_headers: Vec<Header>,
    pub request_body: BodyCapture,
    pub response_body: BodyCapture,
    /// The W3C `traceparent` request header, if any.
    pub traceparent: String,
    /// The capture level the record was made under: `full`, `exchanges`, `metadata`.
    pub capture: String,
    /// Version of the redaction rules applied (config `[redaction] version`).
    pub redaction_version: u32,
    /// What else the reader should know: no response, upgraded, parse stopped, ….
    pub note: String,
}

/// Which part of an exchange a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExchangePhase {
    /// Request and response, whole.
    #[default]
    Complete,
    /// A long-lived exchange's request and response head.
    Start,
    /// One message (server-sent event) of a long-lived exchange, in `response_body`.
    Message,
    /// The end of a long-lived exchange.
    End,
}

impl ExchangePhase {
    pub const ALL: [ExchangePhase; 4] = [
        ExchangePhase::Complete,
        ExchangePhase::Start,
        ExchangePhase::Message,
        ExchangePhase::End,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangePhase::Complete => "complete",
            ExchangePhase::Start => "start",
            ExchangePhase::Message => "message",
            ExchangePhase::End => "end",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// Lowercase.
    pub name: String,
    pub value: String,
}

/// A message body as captured: its size and hash always, its (decoded, redacted)
/// content when the capture level keeps bodies and the body could be inspected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BodyCapture {
    /// Bytes of the body as sent (after de-chunking, before content decoding).
    pub size: u64,
    /// SHA-256 of those bytes; empty when there was no body.
    pub sha256: Vec<u8>,
    /// The body, decoded (gzip, deflate) and redacted, at most the configured size.
    pub content: Option<Vec<u8>>,
    /// `content` holds only the first part of the body.
    pub truncated: bool,
    /// Why `content` is absent or partial ("binary body", "unknown content-encoding
    /// br", …); empty otherwise.
    pub note: String,
}

/// What redaction leaves in place of a value it removed (edge) and what a replay must
/// not take for the value (replay).
pub const REDACTED: &str = "[REDACTED]";

/// The kinds of [`ReplayDiff`] (`replay_diffs.kind`): differences, then notes.
pub const REPLAY_DIFF_KINDS: [&str; 10] = [
    "status",
    "header",
    "body",
    "bytes",
    "grpc_status",
    "grpc_message",
    "failed",
    "skipped",
    "not_restored",
    "summary",
];

/// One finding of a replay run, appended to the run's own chain: a difference between
/// the recorded and the replayed traffic, a request skipped or sent without what
/// redaction removed, or the run's closing summary.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayDiff {
    /// The session that was replayed.
    pub source_session: String,
    /// The session the re-sent traffic was recorded as.
    pub replay_session: String,
    pub target: String,
    /// The source stream, and the exchange on it, this finding is about.
    pub stream_id: u64,
    pub exchange_index: u64,
    /// The request (empty for opaque streams and the summary).
    pub method: String,
    pub path: String,
    /// `status`, `header`, `body`, `bytes`, `grpc_status`, `grpc_message`
    /// (differences), `failed` (no answer), `skipped`, `not_restored` or `summary`.
    pub kind: String,
    /// Where: a JSON path (`$.items[2].price`), a header name, a byte offset.
    pub field: String,
    /// What was recorded and what came back this time (each at most 1 KiB).
    pub expected: String,
    pub actual: String,
    pub note: String,
}
