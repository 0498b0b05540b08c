//! `cloudtapctl replay` against a live `cloudtapd all`: sessions recorded through
//! `cloudtapctl proxy` against upstream servers started here, replayed against them
//! or against a changed version, and the findings read back from `replay_diffs`.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::shop::*;
use common::*;

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

fn replay(data: &std::path::Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    let (code, out, err) = run(cloudtapctl(data).args(["-o", "json", "replay"]).args(args));
    let report = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?} {err}"));
    (code, report, err)
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

    let source = record_fifty_gets(data.path(), "v1");
    let sql = format!("SELECT path FROM http_exchanges WHERE session_id = '{source}'");
    wait_rows(data.path(), &sql, 50);

    let (code, report, err) = replay(data.path(), &[&source, "--target", "v2", "--speed", "max"]);
    assert_eq!(code, 1, "differences exit 1: {report} {err}");
    assert_eq!(report["http_requests"], 50, "{report}");
    assert_eq!(report["differing"], 2, "{report}");
    assert_eq!(differences(&report), v2_differences(), "{report}");
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

/// `POST path` with a JSON body and a bearer token: (status, body).
fn http_post(
    addr: &str,
    path: &str,
    token: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let json = out.split_once("\r\n\r\n").unwrap().1;
    // The body may be chunked: take the JSON between the first '{' and the last '}'.
    let json = &json[json.find('{').unwrap()..=json.rfind('}').unwrap()];
    (
        status,
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")),
    )
}

fn issue(data: &std::path::Path, subject: &str) -> String {
    let (code, out, err) =
        run(cloudtapctl(data).args(["-o", "json", "token", "issue", "--subject", subject]));
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn the_replay_service_runs_replays_for_automation_under_its_own_identity() {
    let data = tempfile::tempdir().unwrap();
    let (v1, v2) = (upstream(1), upstream(2));
    // The embedded default (its policy lets the replay service read and reach every
    // target), with two more targets.
    let d = Daemon::start(
        "all",
        data.path(),
        &[
            "--target",
            &format!("v1={}", v1.addr),
            "--target",
            &format!("v2={}", v2.addr),
        ],
    );
    let source = record(data.path(), "v1", |local| {
        requests(
            local,
            &(1..=20)
                .map(|n| get(&format!("/items/{n}")))
                .collect::<Vec<_>>(),
        )
    });
    wait_rows(
        data.path(),
        &format!("SELECT path FROM http_exchanges WHERE session_id = '{source}'"),
        20,
    );
    let http = d.endpoints.http.to_string();
    let admin = issue(data.path(), "dev-admin");

    let (status, report) = http_post(
        &http,
        "/v1/replay-runs",
        &admin,
        &serde_json::json!({"source_session": source, "target": "v2", "speed": "max"}),
    );
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["differing"], 2, "{report}");
    assert_eq!(differences(&report), v2_differences());
    // The re-sent traffic went through the edge as the service's own identity.
    let replay_session = report["replay_session"].as_str().unwrap();
    wait_rows(
        data.path(),
        &format!(
            "SELECT session_id FROM sessions WHERE session_id = '{replay_session}' \
             AND identity = 'cloudtap-replay' AND replay_of = '{source}'"
        ),
        1,
    );
    wait_rows(
        data.path(),
        &format!(
            "SELECT kind FROM replay_diffs WHERE chain_id = '{}' AND kind = 'summary'",
            report["run_id"].as_str().unwrap()
        ),
        1,
    );

    // Over gRPC, against the same version: no difference.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc = format!("http://{}", d.endpoints.grpc);
    let answer = rt.block_on(async {
        use cloudtap_proto::replay::v1 as rpb;
        let mut c = rpb::replay_service_client::ReplayServiceClient::connect(grpc)
            .await
            .unwrap();
        let mut req = tonic::Request::new(rpb::RunRequest {
            source_session: source.clone(),
            speed: "max".into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {admin}").parse().unwrap());
        c.run(req).await
    });
    let answer = answer.unwrap().into_inner();
    assert_eq!(answer.differing, 0, "{}", answer.report_json);
    assert!(!answer.run_id.is_empty());

    // A caller who may not read the session learns nothing about it; a forged token is
    // refused; bad input says what is wrong.
    let eve = issue(data.path(), "eve");
    let (status, v) = http_post(
        &http,
        "/v1/replay-runs",
        &eve,
        &serde_json::json!({"source_session": source}),
    );
    assert_eq!(
        (status, v["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let (status, _) = http_post(
        &http,
        "/v1/replay-runs",
        "forged",
        &serde_json::json!({"source_session": source}),
    );
    assert_eq!(status, 401);
    let (status, v) = http_post(
        &http,
        "/v1/replay-runs",
        &admin,
        &serde_json::json!({"source_session": source, "speed": "warp"}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("--speed"), "{v}");
    // Every run is an audit record.
    let audits = wait_rows(
        data.path(),
        "SELECT actor, detail FROM events WHERE kind = 'audit' AND action = 'replay_run' ORDER BY seq",
        3,
    );
    assert!(
        audits[2]["actor"] == "eve"
            && audits[2]["detail"]
                .as_str()
                .unwrap()
                .contains("allowed=false"),
        "{audits:?}"
    );
}

#[test]
fn the_replay_routes_are_documented_and_nothing_else() {
    assert_eq!(
        documented_routes("replay"),
        served_routes(cloudtap_cli::replay_role::HTTP_ROUTES)
    );
}

/// `cloudtapd replay` alone, beside an edge, sharing its log on the Kafka test broker.
#[test]
fn cloudtapd_replay_runs_alone_beside_an_edge() {
    let Some(brokers) = cloudtap_recorder::testenv::service(
        "CLOUDTAP_TEST_KAFKA",
        "cloudtapd_replay_runs_alone_beside_an_edge",
    ) else {
        return;
    };
    let log = cloudtap_recorder::testenv::kafka_url(
        &brokers,
        &format!("replay-node-{}", uuid::Uuid::now_v7()),
        1,
    );
    let data = tempfile::tempdir().unwrap();
    let (v1, v2) = (upstream(1), upstream(2));
    let cfg = data.path().join("cloudtap.toml");
    std::fs::write(
        &cfg,
        format!(
            "[policy]\nadmins = [\"dev-admin\"]\nauditors = [\"cloudtap-replay\"]\n\n\
             [[policy.rules]]\nidentities = [\"cloudtap-replay\"]\ntargets = [\"*\"]\n\n\
             [[targets]]\nname = \"v1\"\nupstream = \"{}\"\nprotocol = \"http1\"\n\n\
             [[targets]]\nname = \"v2\"\nupstream = \"{}\"\nprotocol = \"http1\"\n\n\
             [replay.headers]\nv2 = [\"Authorization: Bearer s3cret\"]\n",
            v1.addr, v2.addr
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let _edge = Daemon::start("edge", data.path(), &["--config", cfg, "--log", &log]);
    let source = record(data.path(), "v1", |local| {
        let mut reqs: Vec<String> = (1..=8).map(|n| get(&format!("/items/{n}"))).collect();
        reqs.push("GET /me HTTP/1.1\r\nhost: api\r\nauthorization: Bearer s3cret\r\n\r\n".into());
        requests(local, &reqs)
    });

    let mut node = cloudtapd()
        .args([
            "replay",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(["--config", cfg, "--log", &log, "--data-dir"])
        .arg(data.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(node.stdout.take().unwrap());
    let err = lines(node.stderr.take().unwrap());
    loop {
        let l = out
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let e: Vec<String> = err.try_iter().collect();
                panic!("cloudtapd replay did not say ready: {e:?}")
            });
        if l.starts_with("ready") {
            break;
        }
    }
    let eps: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.path().join("replay-endpoints.json")).unwrap())
            .unwrap();
    let http = eps["http"].as_str().unwrap().to_owned();
    let admin = issue(data.path(), "dev-admin");
    // The records reach the node through Kafka: wait until it sees all eight.
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let (status, report) = http_post(
            &http,
            "/v1/replay-runs",
            &admin,
            &serde_json::json!({"source_session": source, "target": "v2", "speed": "max"}),
        );
        if status == 200 && report["http_requests"] == 9 {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "no full replay within 30 s: {status} {report}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        differences(&report),
        vec![(
            "/items/7".into(),
            "body".into(),
            "$.price".into(),
            "70 -> 71".into()
        )],
        "{report}"
    );
    assert!(!report["run_id"].as_str().unwrap().is_empty());
    // The redacted credential came from [replay.headers] for v2: /me answered 200.
    assert_eq!(report["not_restored"], 0, "{report}");
    let _ = node.kill();
    let _ = node.wait();
}

/// A gRPC message frame: flag 0, big-endian length, the bytes.
fn grpc_frame(payload: &[u8]) -> bytes::Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.into()
}

/// An h2c gRPC-shaped upstream. `/shop.Items/Get` answers one message with the price
/// (70; 71 in version 2) and `grpc-status: 0` as a trailer; `/shop.Items/Check`
/// answers no message and status 0 (version 2: trailers-only NOT_FOUND).
fn grpc_upstream(version: u32) -> String {
    use axum::body::Body;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().to_string()).unwrap();
            let app = axum::Router::new().fallback(move |req: axum::extract::Request| async move {
                let path = req.uri().path().to_owned();
                let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                let ok = |msg: Option<bytes::Bytes>| {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let mut frames = Vec::new();
                    if let Some(m) = msg {
                        frames.push(Ok::<_, std::convert::Infallible>(Frame::data(m)));
                    }
                    frames.push(Ok(Frame::trailers(trailers)));
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(Body::new(StreamBody::new(futures::stream::iter(frames))))
                        .unwrap()
                };
                match (path.as_str(), version) {
                    ("/shop.Items/Get", v) => ok(Some(grpc_frame(if v == 2 {
                        b"price=71"
                    } else {
                        b"price=70"
                    }))),
                    ("/shop.Items/Check", 2) => http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "5")
                        .header("grpc-message", "not found")
                        .body(Body::empty())
                        .unwrap(),
                    _ => ok(None),
                }
            });
            axum::serve(l, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

#[test]
fn a_grpc_stream_captured_full_replays_and_compares_status_and_messages() {
    let data = tempfile::tempdir().unwrap();
    let (v1, v2) = (grpc_upstream(1), grpc_upstream(2));
    let cfg = data.path().join("cloudtap.toml");
    std::fs::write(
        &cfg,
        format!(
            "[policy]\nadmins = [\"dev-admin\"]\n\n\
             [[targets]]\nname = \"g1\"\nupstream = \"{v1}\"\nprotocol = \"http2\"\ncapture = \"full\"\n\n\
             [[targets]]\nname = \"g2\"\nupstream = \"{v2}\"\nprotocol = \"http2\"\ncapture = \"full\"\n"
        ),
    )
    .unwrap();
    let _d = Daemon::start("all", data.path(), &["--config", cfg.to_str().unwrap()]);
    let source = record(data.path(), "g1", |local| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            use http_body_util::{BodyExt, Full};
            let tcp = tokio::net::TcpStream::connect(local).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            for path in ["/shop.Items/Get", "/shop.Items/Check"] {
                let req = http::Request::post(format!("http://shop{path}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Full::new(grpc_frame(b"sku=7")))
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                resp.into_body().collect().await.unwrap();
            }
        });
    });
    let rows = wait_rows(
        data.path(),
        &format!(
            "SELECT grpc_method, grpc_status FROM http_exchanges WHERE session_id = '{source}' ORDER BY exchange_index"
        ),
        2,
    );
    assert_eq!(rows[1]["grpc_method"], "Check", "{rows:?}");

    // gRPC calls are POSTs: skipped without --allow-writes.
    let (code, report, _) = replay(data.path(), &[&source, "--speed", "max"]);
    assert_eq!((code, report["skipped"].as_u64()), (0, Some(1)), "{report}");

    let (code, same, err) = replay(data.path(), &[&source, "--speed", "max", "--allow-writes"]);
    assert_eq!(code, 0, "the same version: {same} {err}");
    assert_eq!(same["streams"], 1);

    let (code, report, err) = replay(
        data.path(),
        &[
            &source,
            "--target",
            "g2",
            "--speed",
            "max",
            "--allow-writes",
        ],
    );
    assert_eq!(code, 1, "{report} {err}");
    assert_eq!(report["differing"], 1, "one stream: {report}");
    let diffs = differences(&report);
    assert!(
        diffs.contains(&(
            "/shop.Items/Get".into(),
            "grpc_message".into(),
            "response body".into(),
            diffs[0].3.clone()
        )),
        "{diffs:?}"
    );
    assert!(
        diffs.contains(&(
            "/shop.Items/Check".into(),
            "grpc_status".into(),
            "grpc-status".into(),
            "0 -> 5".into()
        )),
        "{diffs:?}"
    );
    assert!(
        diffs.contains(&(
            "/shop.Items/Check".into(),
            "grpc_message".into(),
            "grpc-message".into(),
            " -> not found".into()
        )),
        "{diffs:?}"
    );
}

/// A replay that lasts longer than a session token (10 s here) renews it, as `proxy`
/// does, and keeps its tunnel.
#[test]
fn a_slow_replay_outlives_its_session_token() {
    let data = tempfile::tempdir().unwrap();
    let (addr, seen) = echo();
    let cfg = config(data.path(), &[("echo", &addr, "tcp")]);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text += "[tokens]\nsession_ttl_secs = 10\n";
    std::fs::write(&cfg, text).unwrap();
    let _d = Daemon::start("all", data.path(), &["--config", cfg.to_str().unwrap()]);
    let source = record(data.path(), "echo", |local| {
        let mut c = TcpStream::connect(local).unwrap();
        for (i, m) in [b"first\n".as_slice(), b"second\n".as_slice()]
            .iter()
            .enumerate()
        {
            c.write_all(m).unwrap();
            let mut back = vec![0; m.len()];
            c.read_exact(&mut back).unwrap();
            if i == 0 {
                std::thread::sleep(Duration::from_millis(1300));
            }
        }
    });
    wait_rows(
        data.path(),
        &format!("SELECT stream_id FROM streams WHERE session_id = '{source}'"),
        1,
    );
    // A tenth of the recorded pace: the second message goes 13 s in, past the token.
    let (code, report, err) = replay(data.path(), &[&source, "--allow-writes", "--speed", "0.1"]);
    assert_eq!(code, 0, "{report} {err}");
    assert_eq!(differences(&report), vec![]);
    let seen = seen.lock().unwrap();
    let replayed: Vec<u8> = seen[1].iter().flat_map(|(_, b)| b.clone()).collect();
    assert_eq!(replayed, b"first\nsecond\n");
}
