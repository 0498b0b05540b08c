//! A small capture with known contents, on a real segment log and a real local
//! archive: part of it archived by the recorder, the rest only in the log tail.
//!
//! | session | who → target | where | what |
//! | --- | --- | --- | --- |
//! | A `…a1` | alice → payments | archived, closed | HTTP: GET /v1/charges 200, POST /v1/refunds 503 |
//! | B `…b2` | bob → db | opened and 2 frames archived; 2 more frames and the close in the tail | opaque, payloads kept |
//! | C `…c3` | alice → payments | tail, closed | HTTP: GET /v1/charges/42 500 |
//! | D `…d4` | bob → db | opened before the archive cut, still open; a frame in the tail | opaque |
//!
//! The edge's own chain `…e0` has an `edge_started` audit (archived) and a refused
//! handshake for mallory (tail).

#![allow(dead_code)]

use std::sync::Arc;

use cloudtap_query::{QueryEngine, QuerySettings};
use cloudtap_recorder::EventLog;
use cloudtap_recorder::archive::{Recorder, RecorderSettings};
use cloudtap_recorder::store::{LocalStore, ObjectStore};
use cloudtap_schemas::{
    Audit, Body, BodyCapture, ChainWriter, CloseReason, Direction, Frame, Header, HttpExchange,
    PolicyDecision, Record, SessionClosed, SessionOpened, StreamClosed, StreamOpened,
};
use uuid::Uuid;

pub const BASE: i64 = 1_795_600_800 * 1_000_000_000; // 2026-11-25T10:00:00Z
pub const MS: i64 = 1_000_000;

pub fn id(tail: &str) -> Uuid {
    Uuid::parse_str(&format!("01900000-0000-7000-8000-0000000000{tail}")).unwrap()
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub log: Arc<dyn EventLog>,
    pub store: Arc<dyn ObjectStore>,
    pub engine: Arc<QueryEngine>,
}

struct Chain {
    w: ChainWriter,
}

impl Chain {
    fn new(tail: &str) -> Self {
        Self {
            w: ChainWriter::new(id(tail)),
        }
    }
    fn at(&mut self, ms: i64, body: Body) -> Record {
        self.w.seal(BASE + ms * MS, body)
    }
}

fn opened(identity: &str, target: &str) -> Body {
    Body::SessionOpened(SessionOpened {
        edge: "edge-1".into(),
        edge_chain_id: id("e0"),
        identity: identity.into(),
        target: target.into(),
        upstream: format!("{target}.staging:443"),
        client_cert_sha256: "ab".repeat(32),
        token_id: format!("tok-{identity}"),
        on_log_backpressure: "block".into(),
        replay_of: String::new(),
    })
}

fn stream(id: u64, target: &str, hint: &str) -> Body {
    Body::StreamOpened(StreamOpened {
        stream_id: id,
        target: target.into(),
        protocol_hint: hint.into(),
        client_addr: "127.0.0.1:50000".into(),
        upstream_addr: "10.0.0.7:443".into(),
    })
}

fn frame(stream: u64, dir: Direction, offset: u64, payload: Option<&[u8]>, len: u32) -> Body {
    Body::Frame(Frame {
        stream_id: stream,
        direction: dir,
        offset,
        length: len,
        payload: payload.map(<[u8]>::to_vec),
    })
}

fn exchange(
    stream: u64,
    index: u64,
    method: &str,
    path: &str,
    status: u32,
    start_ms: i64,
    body: &str,
) -> Body {
    Body::HttpExchange(Box::new(HttpExchange {
        stream_id: stream,
        exchange_index: index,
        protocol: "http/1.1".into(),
        method: method.into(),
        authority: "payments.staging".into(),
        path: path.into(),
        status,
        start_unix_nanos: BASE + start_ms * MS,
        end_unix_nanos: BASE + (start_ms + 12) * MS,
        request_headers: vec![
            Header {
                name: "content-type".into(),
                value: "application/json".into(),
            },
            Header {
                name: "authorization".into(),
                value: "[redacted]".into(),
            },
        ],
        response_headers: vec![Header {
            name: "content-type".into(),
            value: "application/json".into(),
        }],
        response_body: BodyCapture {
            size: body.len() as u64,
            sha256: vec![0; 32],
            content: Some(body.as_bytes().to_vec()),
            truncated: false,
            note: String::new(),
        },
        capture: "exchanges".into(),
        redaction_version: 1,
        ..Default::default()
    }))
}

fn closed(bytes_up: u64, bytes_down: u64, streams: u64) -> Body {
    Body::SessionClosed(SessionClosed {
        reason: CloseReason::Normal,
        detail: String::new(),
        bytes_up,
        bytes_down,
        streams,
    })
}

fn stream_closed(id: u64, up: u64, down: u64) -> Body {
    Body::StreamClosed(StreamClosed {
        stream_id: id,
        bytes_up: up,
        bytes_down: down,
        error: String::new(),
    })
}

/// Writes the capture, archives the first part, appends the rest.
pub async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let archive_dir = dir.path().join("archive");
    let log = cloudtap_recorder::open_log(
        log_dir.to_str().unwrap(),
        cloudtap_recorder::FsyncPolicy::Never,
        0,
    )
    .await
    .unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&archive_dir));

    let mut e = Chain::new("e0");
    let mut a = Chain::new("a1");
    let mut b = Chain::new("b2");
    let mut c = Chain::new("c3");
    let mut d = Chain::new("d4");

    // Archived part.
    let first = vec![
        e.at(
            0,
            Body::Audit(Audit {
                actor: "edge-1".into(),
                action: "edge_started".into(),
                detail: "tunnel=127.0.0.1:7443".into(),
            }),
        ),
        a.at(10, opened("alice", "payments")),
        a.at(11, stream(1, "payments", "http1")),
        a.at(12, frame(1, Direction::Up, 0, None, 120)),
        a.at(13, frame(1, Direction::Down, 0, None, 300)),
        a.at(
            14,
            exchange(1, 0, "GET", "/v1/charges", 200, 12, r#"{"charges":[]}"#),
        ),
        a.at(20, frame(1, Direction::Up, 120, None, 140)),
        a.at(21, frame(1, Direction::Down, 300, None, 90)),
        a.at(
            22,
            exchange(
                1,
                1,
                "POST",
                "/v1/refunds",
                503,
                20,
                r#"{"error":"unavailable"}"#,
            ),
        ),
        a.at(30, stream_closed(1, 260, 390)),
        a.at(31, closed(260, 390, 1)),
        b.at(40, opened("bob", "db")),
        b.at(41, stream(1, "db", "postgres")),
        b.at(42, frame(1, Direction::Up, 0, Some(b"SELECT 1;"), 9)),
        b.at(43, frame(1, Direction::Down, 0, Some(b"one row"), 7)),
        d.at(50, opened("bob", "db")),
        d.at(51, stream(7, "db", "postgres")),
    ];
    log.append(first).await.unwrap();
    Recorder::new(log.clone(), store.clone(), RecorderSettings::default())
        .drain(&tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    // The cut really is a seam: this much is in Parquet, the rest only in the log.
    let markers = cloudtap_recorder::archive::read_markers(store.as_ref())
        .await
        .unwrap();
    let archived = |table: &str| -> u64 {
        markers
            .iter()
            .flat_map(|m| &m.files)
            .filter(|f| f.table == table)
            .map(|f| f.rows)
            .sum()
    };
    assert_eq!(
        (
            archived("frames"),
            archived("http_exchanges"),
            archived("sessions")
        ),
        (6, 2, 1),
        "the archived part of the fixture"
    );

    // Tail: never archived.
    let rest = vec![
        b.at(
            60,
            frame(1, Direction::Up, 9, Some(b"SELECT needle FROM hay;"), 23),
        ),
        b.at(
            61,
            frame(
                1,
                Direction::Down,
                7,
                Some(b"\xff\xfe not utf-8 needle"),
                20,
            ),
        ),
        b.at(62, stream_closed(1, 32, 27)),
        b.at(63, closed(32, 27, 1)),
        c.at(70, opened("alice", "payments")),
        c.at(71, stream(1, "payments", "http1")),
        c.at(72, frame(1, Direction::Up, 0, None, 100)),
        c.at(73, frame(1, Direction::Down, 0, None, 50)),
        c.at(
            74,
            exchange(
                1,
                0,
                "GET",
                "/v1/charges/42",
                500,
                72,
                r#"{"error":"boom"}"#,
            ),
        ),
        c.at(75, stream_closed(1, 100, 50)),
        c.at(76, closed(100, 50, 1)),
        d.at(80, frame(7, Direction::Up, 0, Some(b"BEGIN;"), 6)),
        e.at(
            90,
            Body::PolicyDecision(PolicyDecision {
                identity: "mallory".into(),
                target: "payments".into(),
                action: "open_tunnel".into(),
                allowed: false,
                code: "forbidden".into(),
                reason: "no rule lets mallory reach payments".into(),
                token_id: String::new(),
                client_cert_sha256: String::new(),
            }),
        ),
    ];
    log.append(rest).await.unwrap();

    let files = cloudtap_query::engine::datafusion_store(
        archive_dir.to_str().unwrap(),
        &Default::default(),
    )
    .unwrap();
    let engine = Arc::new(
        QueryEngine::new(
            store.clone(),
            files,
            Some(log.clone()),
            QuerySettings::default(),
        )
        .unwrap(),
    );
    Fixture {
        dir,
        log,
        store,
        engine,
    }
}
