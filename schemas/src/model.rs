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
