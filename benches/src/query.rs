//! Generates a captured-traffic archive for the query benchmark: records appended to
//! an in-memory log and archived by the real recorder into Parquet under
//! `<dir>/archive`, the layout `cloudtapd all --data-dir <dir>` reads. Not a test.
//! `scripts/bench-query.sh` runs it, then times the queries (through cloudtap's HTTP
//! endpoint and DuckDB on the same files).
//!
//! Usage: `cloudtap-bench-query-gen --dir DIR [--gb N]`
//!
//! The capture: sessions of 50 identities to 8 targets. About a third are opaque
//! (database-like) sessions whose frames keep 1–4 KiB of mostly incompressible
//! payload, now and then with the word `needle` in it; the rest are HTTP sessions
//! whose frames keep no payload and which carry 20 exchanges each over 40 paths, with
//! log-normal-ish latencies and a few 5xx. The edge's chain holds a policy decision
//! per session, some of them refusals. It stops once the Parquet reaches `--gb`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use cloudtap_recorder::archive::{Recorder, RecorderSettings, read_markers};
use cloudtap_recorder::store::{LocalStore, ObjectStore};
use cloudtap_recorder::{EventLog, MemoryLog};
use cloudtap_schemas::*;

/// xorshift64*: fast, deterministic, good enough for synthetic traffic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const TARGETS: [&str; 8] = [
    "payments",
    "orders",
    "users",
    "search",
    "billing",
    "inventory",
    "db",
    "cache",
];

fn main() {
    let mut dir = PathBuf::new();
    let mut gb = 2.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(k) = args.next() {
        let v = args.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--dir" => dir = v.into(),
            "--gb" => gb = v.parse().expect("--gb N"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!dir.as_os_str().is_empty(), "--dir DIR is required");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(generate(dir, (gb * 1e9) as u64));
}

async fn archived_bytes(store: &dyn ObjectStore) -> (u64, u64, usize) {
    let markers = read_markers(store).await.unwrap();
    let bytes = markers.iter().flat_map(|m| &m.files).map(|f| f.bytes).sum();
    let rows = markers.iter().map(|m| m.records).sum();
    let files = markers.iter().map(|m| m.files.len()).sum();
    (bytes, rows, files)
}

async fn generate(dir: PathBuf, want_bytes: u64) {
    let archive = dir.join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&archive));
    let started = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let edge_chain = uuid::Uuid::now_v7();
    let mut edge = ChainWriter::new(edge_chain);
    let paths: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "/v1/{}/{}",
                ["charges", "orders", "users", "items"][i % 4],
                i
            )
        })
        .collect();
    let mut ts: i64 = 1_795_600_800 * 1_000_000_000;
    let mut sessions = 0u64;
    let mut sample_session = None;
    // The recorder resumes from its markers' log offsets, so one log serves every
    // batch (it holds the whole capture in memory: about the Parquet size).
    let log: Arc<dyn EventLog> = Arc::new(MemoryLog::new());
    loop {
        let mut batch = Vec::new();
        for _ in 0..500 {
            sessions += 1;
            let id = uuid::Uuid::now_v7();
            let identity = format!("user{:02}", rng.below(50));
            let opaque = rng.below(3) == 0;
            if opaque && sample_session.is_none() && sessions > 2000 {
                sample_session = Some(id);
            }
            let target = if opaque {
                TARGETS[6 + rng.below(2) as usize]
            } else {
                TARGETS[rng.below(6) as usize]
            };
            let allowed = rng.below(20) != 0;
            batch.push(edge.seal(
                ts,
                Body::PolicyDecision(PolicyDecision {
                    identity: identity.clone(),
                    target: target.into(),
                    action: "open_tunnel".into(),
                    allowed,
                    code: if allowed {
                        String::new()
                    } else {
                        "forbidden".into()
                    },
                    reason: String::new(),
                    token_id: String::new(),
                    client_cert_sha256: String::new(),
                }),
            ));
            let mut w = ChainWriter::new(id);
            ts += 1_000_000;
            batch.push(w.seal(
                ts,
                Body::SessionOpened(SessionOpened {
                    edge: "bench-edge".into(),
                    edge_chain_id: edge_chain,
                    identity,
                    target: target.into(),
                    upstream: format!("{target}.staging:443"),
                    client_cert_sha256: String::new(),
                    token_id: String::new(),
                    on_log_backpressure: "block".into(),
                    replay_of: String::new(),
                }),
            ));
            batch.push(w.seal(
                ts,
                Body::StreamOpened(StreamOpened {
                    stream_id: 1,
                    target: target.into(),
                    protocol_hint: if opaque { "postgres" } else { "http1" }.into(),
                    client_addr: "127.0.0.1:40000".into(),
                    upstream_addr: "10.0.0.1:443".into(),
                }),
            ));
            let (mut up, mut down) = (0u64, 0u64);
            if opaque {
                for i in 0..100u64 {
                    let len = 1024 + rng.below(3072) as usize;
                    let mut p = vec![0u8; len];
                    rng.fill(&mut p);
                    if rng.below(50) == 0 {
                        p[..6].copy_from_slice(b"needle");
                    }
                    let direction = if i % 2 == 0 {
                        Direction::Up
                    } else {
                        Direction::Down
                    };
                    let offset = if i % 2 == 0 { up } else { down };
                    match direction {
                        Direction::Up => up += len as u64,
                        Direction::Down => down += len as u64,
                    }
                    ts += 100_000;
                    batch.push(w.seal(
                        ts,
                        Body::Frame(Frame {
                            stream_id: 1,
                            direction,
                            offset,
                            length: len as u32,
                            payload: Some(p),
                        }),
                    ));
                }
            } else {
                for i in 0..20u64 {
                    let path = &paths[rng.below(paths.len() as u64) as usize];
                    let status = match rng.below(100) {
                        0..=1 => 503,
                        2..=3 => 500,
                        4..=9 => 404,
                        _ => 200,
                    };
                    // Mostly fast, with a long tail.
                    let ms = 2
                        + rng.below(20)
                        + if rng.below(20) == 0 {
                            rng.below(800)
                        } else {
                            0
                        };
                    for (direction, len) in [(Direction::Up, 300u64), (Direction::Down, 900u64)] {
                        let offset = if direction == Direction::Up { up } else { down };
                        match direction {
                            Direction::Up => up += len,
                            Direction::Down => down += len,
                        }
                        ts += 100_000;
                        batch.push(w.seal(
                            ts,
                            Body::Frame(Frame {
                                stream_id: 1,
                                direction,
                                offset,
                                length: len as u32,
                                payload: None,
                            }),
                        ));
                    }
                    let start = ts;
                    ts += 100_000;
                    batch.push(w.seal(
                        ts,
                        Body::HttpExchange(Box::new(HttpExchange {
                            stream_id: 1,
                            exchange_index: i,
                            protocol: "http/1.1".into(),
                            method: if i % 5 == 0 { "POST" } else { "GET" }.into(),
                            authority: format!("{target}.staging"),
                            path: path.clone(),
                            status,
                            start_unix_nanos: start,
                            end_unix_nanos: start + ms as i64 * 1_000_000,
                            request_headers: vec![Header {
                                name: "user-agent".into(),
                                value: "bench".into(),
                            }],
                            response_headers: vec![Header {
                                name: "content-type".into(),
                                value: "application/json".into(),
                            }],
                            capture: "exchanges".into(),
                            redaction_version: 1,
                            ..Default::default()
                        })),
                    ));
                }
            }
            ts += 1_000_000;
            batch.push(w.seal(
                ts,
                Body::StreamClosed(StreamClosed {
                    stream_id: 1,
                    bytes_up: up,
                    bytes_down: down,
                    error: String::new(),
                }),
            ));
            batch.push(w.seal(
                ts,
                Body::SessionClosed(SessionClosed {
                    reason: CloseReason::Normal,
                    detail: String::new(),
                    bytes_up: up,
                    bytes_down: down,
                    streams: 1,
                }),
            ));
        }
        for chunk in batch.chunks(4096) {
            log.append(chunk.to_vec()).await.unwrap();
        }
        Recorder::new(
            log.clone(),
            store.clone(),
            RecorderSettings {
                range_seconds: 3600,
                ..RecorderSettings::default()
            },
        )
        .drain(&CancellationToken::new())
        .await
        .unwrap();
        let (bytes, rows, files) = archived_bytes(store.as_ref()).await;
        eprintln!(
            "generated {sessions} sessions: {:.2} GB of Parquet in {files} files, {rows} records ({:.0} s)",
            bytes as f64 / 1e9,
            started.elapsed().as_secs_f64()
        );
        if bytes >= want_bytes {
            let sample = sample_session.expect("more than 2000 sessions");
            // For the bench script: one session to look up by id.
            std::fs::write(dir.join("sample_session"), sample.to_string()).unwrap();
            println!(
                "{{\"sessions\": {sessions}, \"parquet_bytes\": {bytes}, \"files\": {files}, \"records\": {rows}, \"sample_session\": \"{sample}\"}}"
            );
            return;
        }
    }
}
