//! `cloudtapctl replay` against a live `cloudtapd all`: sessions recorded through
//! `cloudtapctl proxy` against upstream servers started here, replayed against them
//! or against a changed version, and the findings read back from `replay_diffs`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A small HTTP/1.1 keep-alive server. `version` 2 changes `$.price` of item 7 and
/// answers item 13 with 503 (same body). `/me` wants `authorization: Bearer s3cret`.
/// Counts the POSTs it got.
struct Upstream {
    addr: String,
    posts: Arc<AtomicUsize>,
}

fn upstream(version: u32) -> Upstream {
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

fn serve(conn: TcpStream, version: u32, posts: &AtomicUsize) {
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

/// Per connection, each chunk the echo server read and when.
type Seen = Arc<Mutex<Vec<Vec<(Instant, Vec<u8>)>>>>;

/// A TCP echo server that notes when each chunk arrived, per connection.
fn echo() -> (String, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for mut conn in l.incoming().map_while(Result::ok) {
            let log = log.clone();
            std::thread::spawn(move || {
                let i = {
                    let mut l = log.lock().unwrap();
                    l.push(Vec::new());
                    l.len() - 1
                };
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            log.lock().unwrap()[i].push((Instant::now(), buf[..n].to_vec()));
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn config(dir: &std::path::Path, targets: &[(&str, &str, &str)]) -> std::path::PathBuf {
    let mut cfg = String::from("[policy]\nadmins = [\"dev-admin\"]\n\n");
    for (name, addr, protocol) in targets {
        cfg += &format!(
            "[[targets]]\nname = \"{name}\"\nupstream = \"{addr}\"\nprotocol = \"{protocol}\"\n\n"
        );
    }
    let p = dir.join("cloudtap.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn ndjson(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// Runs `sql` until it returns `n` rows, for at most 20 s.
fn wait_rows(data: &std::path::Path, sql: &str, n: usize) -> Vec<serde_json::Value> {
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
fn requests(local: &str, reqs: &[String]) {
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

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: shop\r\naccept: application/json\r\n\r\n")
}

/// The session `proxy` opened (its first JSON line has it).
fn record(data: &std::path::Path, target: &str, send: impl FnOnce(&str)) -> String {
    let mut proxy = cloudtapctl(data)
        .args(["-o", "json", "proxy", target])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(proxy.stdout.take().unwrap());
    let first: serde_json::Value = serde_json::from_str(&next(&out, "proxy's first line")).unwrap();
    let local = first["local_addr"].as_str().unwrap().to_owned();
    let session = first["session_id"].as_str().unwrap().to_owned();
    send(&local);
    let _ = proxy.kill();
    let _ = proxy.wait();
    session
}

fn replay(data: &std::path::Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    let (code, out, err) = run(cloudtapctl(data).args(["-o", "json", "replay"]).args(args));
    let report = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?} {err}"));
    (code, report, err)
}

fn differences(report: &serde_json::Value) -> Vec<(String, String, String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            matches!(
                f["kind"].as_str().unwrap(),
                "status" | "header" | "body" | "bytes" | "failed"
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

#[test]
fn a_replay_against_a_changed_version_names_exactly_what_changed() {
    let data = tempfile::tempdir().unwrap();
    let (v1, v2) = (upstream(1), upstream(2));
    let cfg = config(
        data.path(),
        &[("v1", &v1.addr, "http1"), ("v2", &v2.addr, "http1")],
    );
    let _d = Daemon::start("all", data.path(), &["--config", cfg.to_str().unwrap()]);

    // 50 mixed GETs: items, listings with queries, a health check; on 5 connections.
    let all: Vec<String> = (1..=40)
        .map(|n| get(&format!("/items/{n}")))
        .chain((1..=9).map(|p| get(&format!("/items?page={p}&sort=price"))))
        .chain([get("/healthz")])
        .collect();
    let source = record(data.path(), "v1", |local| {
        for chunk in all.chunks(10) {
            requests(local, chunk);
        }
    });
    let sql = format!("SELECT path FROM http_exchanges WHERE session_id = '{source}'");
    wait_rows(data.path(), &sql, 50);

    let (code, report, err) = replay(data.path(), &[&source, "--target", "v2", "--speed", "max"]);
    assert_eq!(code, 1, "differences exit 1: {report} {err}");
    assert_eq!(report["http_requests"], 50, "{report}");
    assert_eq!(report["differing"], 2, "{report}");
    assert_eq!(
        differences(&report),
        vec![
            (
                "/items/7".into(),
                "body".into(),
                "$.price".into(),
                "70 -> 71".into()
            ),
            (
                "/items/13".into(),
                "status".into(),
                "status".into(),
                "200 -> 503".into()
            ),
        ],
        "{report}"
    );
    assert!(
        err.contains("50 HTTP requests and 0 streams to send"),
        "{err}"
    );

    // The same target: Date and x-request-id differ on every answer, nothing else.
    let (code, same, err) = replay(
        data.path(),
        &[&source, "--speed", "max", "--concurrency", "3"],
    );
    assert_eq!(code, 0, "{same} {err}");
    assert_eq!(differences(&same), vec![], "{same}");

    // The findings are on the run's chain, queryable; the re-sent traffic is a session
    // of its own, marked as a replay of the source.
    let replay_session = report["replay_session"].as_str().unwrap();
    let rows = wait_rows(
        data.path(),
        &format!(
            "SELECT path, kind, field, expected, actual, source_session, chain_id FROM replay_diffs \
             WHERE replay_session = '{replay_session}' AND kind IN ('status', 'body') ORDER BY path"
        ),
        2,
    );
    assert_eq!(rows[0]["path"], "/items/13");
    assert_eq!(rows[1]["field"], "$.price");
    assert_eq!(rows[1]["source_session"], source.as_str());
    assert_eq!(rows[1]["chain_id"], report["run_id"]);
    wait_rows(
        data.path(),
        &format!(
            "SELECT session_id FROM sessions WHERE replay_of = '{source}' AND target = 'v2' \
             AND session_id = '{replay_session}'"
        ),
        1,
    );
    let summary = wait_rows(
        data.path(),
        &format!(
            "SELECT note FROM replay_diffs WHERE replay_session = '{replay_session}' AND kind = 'summary'"
        ),
        1,
    );
    assert!(
        summary[0]["note"].as_str().unwrap().contains("2 differ"),
        "{summary:?}"
    );

    // A dry run sends nothing and says what it would.
    let (code, dry, _) = replay(
        data.path(),
        &[&source, "--dry-run", "--only", "path=/items/1*"],
    );
    assert_eq!(code, 0);
    assert_eq!(dry["http_requests"], 11, "{dry}");
    // Bad input is refused with what to do next.
    let (code, _, err) =
        run(cloudtapctl(data.path()).args(["replay", &source, "--only", "colour=red"]));
    assert_eq!(code, 2);
    assert!(err.contains("unknown key"), "{err}");
    let (code, _, err) =
        run(cloudtapctl(data.path()).args(["replay", "01234567-89ab-7def-8123-456789abcdef"]));
    assert_eq!(code, 2);
    assert!(err.contains("may not read it"), "{err}");
}

#[test]
fn writes_are_sent_only_when_allowed_and_redacted_credentials_only_from_header() {
    let data = tempfile::tempdir().unwrap();
    let api = upstream(1);
    let cfg = config(data.path(), &[("api", &api.addr, "http1")]);
    let _d = Daemon::start("all", data.path(), &["--config", cfg.to_str().unwrap()]);
    let source = record(data.path(), "api", |local| {
        requests(
            local,
            &[
                "GET /me HTTP/1.1\r\nhost: api\r\nauthorization: Bearer s3cret\r\n\r\n".into(),
                "POST /orders HTTP/1.1\r\nhost: api\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"sku\":\"a\"}".into(),
            ],
        )
    });
    wait_rows(
        data.path(),
        &format!("SELECT path FROM http_exchanges WHERE session_id = '{source}'"),
        2,
    );
    assert_eq!(api.posts.load(Ordering::SeqCst), 1);

    // No --allow-writes, no --header: the POST is skipped and listed, the credential
    // is not invented, and the 401 shows.
    let (code, report, _) = replay(data.path(), &[&source, "--speed", "max"]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(api.posts.load(Ordering::SeqCst), 1, "nothing was written");
    let findings = report["findings"].as_array().unwrap();
    let of = |k: &str| {
        findings
            .iter()
            .filter(|f| f["kind"] == k)
            .collect::<Vec<_>>()
    };
    assert_eq!(of("skipped").len(), 1, "{report}");
    assert_eq!(of("skipped")[0]["method"], "POST");
    assert!(
        of("skipped")[0]["note"]
            .as_str()
            .unwrap()
            .contains("--allow-writes")
    );
    assert_eq!(of("not_restored").len(), 1, "{report}");
    assert_eq!(of("not_restored")[0]["field"], "authorization");
    let diffs = differences(&report);
    assert_eq!(
        diffs[0],
        (
            "/me".into(),
            "status".into(),
            "status".into(),
            "200 -> 401".into()
        ),
        "{report}"
    );
    assert!(
        diffs.iter().all(|d| d.0 == "/me"),
        "only /me differs: {diffs:?}"
    );
    assert_eq!(report["differing"], 1);
    let (_, text, _) =
        run(cloudtapctl(data.path()).args(["-o", "table", "replay", &source, "--speed", "max"]));
    assert!(text.contains("GET /me  status status: 200 → 401"), "{text}");
    assert!(
        text.contains("skipped (1):") && text.contains("POST /orders"),
        "{text}"
    );
    assert!(
        text.contains("not restored (1):") && text.contains("--header"),
        "{text}"
    );

    // With both: the POST is sent again and the credential restored.
    let (code, report, _) = replay(
        data.path(),
        &[
            &source,
            "--speed",
            "max",
            "--allow-writes",
            "--header",
            "Authorization: Bearer s3cret",
        ],
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(api.posts.load(Ordering::SeqCst), 2);
    assert_eq!(report["skipped"], 0);
    assert_eq!(report["not_restored"], 0);
}

#[test]
fn an_opaque_echo_session_replays_byte_identical_with_its_gaps() {
    let data = tempfile::tempdir().unwrap();
    let (addr, seen) = echo();
    let cfg = config(data.path(), &[("echo", &addr, "tcp")]);
    let _d = Daemon::start("all", data.path(), &["--config", cfg.to_str().unwrap()]);
    let messages: [&[u8]; 3] = [b"one\n", b"two two\n", b"three three three\n"];
    let gaps = [Duration::from_millis(300), Duration::from_millis(500)];
    let source = record(data.path(), "echo", |local| {
        let mut c = TcpStream::connect(local).unwrap();
        for (i, m) in messages.iter().enumerate() {
            c.write_all(m).unwrap();
            let mut back = vec![0; m.len()];
            c.read_exact(&mut back).unwrap();
            assert_eq!(&back, m);
            if let Some(g) = gaps.get(i) {
                std::thread::sleep(*g);
            }
        }
    });
    wait_rows(
        data.path(),
        &format!("SELECT stream_id FROM streams WHERE session_id = '{source}'"),
        1,
    );

    // Opaque streams are writes: skipped without --allow-writes.
    let (code, report, _) = replay(data.path(), &[&source]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["streams"], 0);
    assert_eq!(report["skipped"], 1);

    let (code, report, err) = replay(data.path(), &[&source, "--allow-writes", "--speed", "1"]);
    assert_eq!(code, 0, "byte-identical: {report} {err}");
    assert_eq!(report["streams"], 1);
    assert_eq!(differences(&report), vec![]);

    // The echo server saw the replay's chunks with the recorded gaps (±50 ms).
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "the recording's connection and the replay's");
    let chunks = &seen[1];
    let bytes: Vec<u8> = chunks.iter().flat_map(|(_, b)| b.clone()).collect();
    assert_eq!(bytes, messages.concat());
    assert_eq!(chunks.len(), 3, "{chunks:?}");
    for (i, want) in gaps.iter().enumerate() {
        let recorded = seen[0][i + 1].0 - seen[0][i].0;
        let replayed = chunks[i + 1].0 - chunks[i].0;
        let off = replayed.as_secs_f64() - recorded.as_secs_f64();
        assert!(
            off.abs() <= 0.05,
            "gap {i}: recorded {recorded:?} (client slept {want:?}), replayed {replayed:?}"
        );
    }
}
