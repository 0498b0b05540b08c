//! A shop-like HTTP upstream and the helpers that record a session through it and
//! read replay findings: shared by the replay and bundle tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::*;

/// A small HTTP/1.1 keep-alive server. `version` 2 changes `$.price` of item 7 and
/// answers item 13 with 503 (same body). `/me` wants `authorization: Bearer s3cret`.
/// Counts the POSTs it got.
pub struct Upstream {
    pub addr: String,
    pub posts: Arc<AtomicUsize>,
}

pub fn upstream(version: u32) -> Upstream {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let posts = Arc::new(AtomicUsize::new(0));
    let counter = posts.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().map_while(Result::ok) {
            let counter = counter.clone();
            std::thread::spawn(move || serve(conn, version, &counter));
        }
    });
    Upstream { addr, posts }
}

pub fn serve(conn: TcpStream, version: u32, posts: &AtomicUsize) {
    let mut rd = BufReader::new(conn.try_clone().unwrap());
    let mut wr = conn;
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let (mut len, mut auth) = (0usize, String::new());
        loop {
            let mut h = String::new();
            if rd.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').unwrap();
            match n.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap(),
                "authorization" => auth = v.trim().to_owned(),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        rd.read_exact(&mut body).unwrap();
        let (status, json) = if method == "POST" {
            posts.fetch_add(1, Ordering::SeqCst);
            (201, r#"{"ok":true}"#.to_owned())
        } else if path == "/me" {
            if auth == "Bearer s3cret" {
                (200, r#"{"user":"alice"}"#.to_owned())
            } else {
                (
                    401,
                    r#"{"error":"unauthenticated","retry_token":"secret-xyz"}"#.to_owned(),
                )
            }
        } else if let Some(n) = path.strip_prefix("/items/") {
            let n: u64 = n.parse().unwrap_or(0);
            let price = if version == 2 && n == 7 { 71 } else { n * 10 };
            let status = if version == 2 && n == 13 { 503 } else { 200 };
            (
                status,
                format!(r#"{{"id":{n},"name":"item {n}","price":{price},"tags":["a","b"]}}"#),
            )
        } else {
            (200, format!(r#"{{"path":"{path}"}}"#))
        };
        // A Date that differs between any two answers.
        let date = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ndate: {date}\r\nx-request-id: {date}\r\ncontent-length: {}\r\n\r\n",
            json.len()
        );
        if wr.write_all(head.as_bytes()).is_err() || wr.write_all(json.as_bytes()).is_err() {
            return;
        }
    }
}

/// Runs `sql` until it returns `n` rows, for at most 20 s.
pub fn wait_rows(data: &std::path::Path, sql: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = run(cloudtapctl(data).args(["-o", "json", "query", sql]));
        assert_eq!(code, 0, "{sql}: {err}");
        let rows = ndjson(&out);
        if rows.len() == n {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "waited 20 s for {n} rows of {sql}; last: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends raw requests on one connection through the proxy and reads each answer.
pub fn requests(local: &str, reqs: &[String]) {
    let mut c = TcpStream::connect(local).unwrap();
    let mut rd = BufReader::new(c.try_clone().unwrap());
    for r in reqs {
        c.write_all(r.as_bytes()).unwrap();
        let mut len = 0;
        let mut line = String::new();
        rd.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1"), "{line:?}");
        loop {
            let mut h = String::new();
            rd.read_line(&mut h).unwrap();
            if h.trim_end().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        rd.read_exact(&mut body).unwrap();
    }
}

pub fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: shop\r\naccept: application/json\r\n\r\n")
}

/// The session `proxy` opened (its first JSON line has it).
pub fn record(data: &std::path::Path, target: &str, send: impl FnOnce(&str)) -> String {
    let (mut proxy, _, local, session) = start_proxy_session(data, target);
    send(&local);
    let _ = proxy.kill();
    let _ = proxy.wait();
    session
}

pub fn differences(report: &serde_json::Value) -> Vec<(String, String, String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            matches!(
                f["kind"].as_str().unwrap(),
                "status" | "header" | "body" | "bytes" | "grpc_status" | "grpc_message" | "failed"
            )
        })
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_owned(),
                f["kind"].as_str().unwrap().to_owned(),
                f["field"].as_str().unwrap().to_owned(),
                format!(
                    "{} -> {}",
                    f["expected"].as_str().unwrap(),
                    f["actual"].as_str().unwrap()
                ),
            )
        })
        .collect()
}

/// What version 2 of the upstream changes of items 1–40: one JSON field, one status.
pub fn v2_differences() -> Vec<(String, String, String, String)> {
    vec![
        (
            "/items/7".into(),
            "body".into(),
            "$.price".into(),
            "70 -> 71".into(),
        ),
        (
            "/items/13".into(),
            "status".into(),
            "status".into(),
            "200 -> 503".into(),
        ),
    ]
}

/// Records the replay issue's session through `target`: 50 mixed GETs (items, listings
/// with queries, a health check) on 5 connections. Returns the session id.
pub fn record_fifty_gets(data: &std::path::Path, target: &str) -> String {
    let all: Vec<String> = (1..=40)
        .map(|n| get(&format!("/items/{n}")))
        .chain((1..=9).map(|p| get(&format!("/items?page={p}&sort=price"))))
        .chain([get("/healthz")])
        .collect();
    record(data, target, |local| {
        for chunk in all.chunks(10) {
            requests(local, chunk);
        }
    })
}
