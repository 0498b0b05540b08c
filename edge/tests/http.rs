//! HTTP mirroring end to end: real HTTP clients and servers through a tunnel, the
//! exchange records they leave, redaction checked in every stored artifact (segment
//! files, Kafka records, Parquet), and garbage on an HTTP route forwarded untouched.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as AxBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use cloudtap_edge::config::{CaptureLevel, Protocol};
use cloudtap_recorder::archive::{Recorder, RecorderSettings};
use cloudtap_recorder::store::{LocalStore, ObjectStore};
use cloudtap_recorder::{EventLog, KafkaLog, KafkaLogConfig, testenv};
use cloudtap_schemas::{Body, ExchangePhase, HttpExchange, Record, encode_record, tables};
use common::*;

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// Secrets the staging API hands out in its responses.
const S_SET_COOKIE: &str = "sid=s04-7Hq2CookieFromServer";
const S_RESP_TOKEN: &str = "s07-RespTokenValue9911";
const S_GZ_KEY: &str = "s14-GzippedApiKey5521";
const S_GZ_JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzMTUtand0In0.s15-SignaturePartQ8vZ";

/// A staging API: JSON users, a login that sets a cookie and returns a token, a gzip
/// body, server-sent events, and `ok` for anything else.
async fn api_upstream() -> String {
    let app = axum::Router::new().fallback(|req: axum::extract::Request| async move {
        let path = req.uri().path().to_owned();
        let _ = axum::body::to_bytes(req.into_body(), 1 << 20).await;
        let resp = axum::response::Response::builder();
        match path.as_str() {
            p if p.starts_with("/users/") => resp
                .header("content-type", "application/json")
                .body(AxBody::from(format!(
                    r#"{{"id":"{}","name":"ann","role":"admin"}}"#,
                    &p[7..]
                ))),
            "/login" => resp
                .header("content-type", "application/json")
                .header("set-cookie", S_SET_COOKIE)
                .body(AxBody::from(format!(
                    r#"{{"token":"{S_RESP_TOKEN}","user":"ann"}}"#
                ))),
            "/gz" => resp
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(AxBody::from(gzip(
                    format!(r#"{{"api_key":"{S_GZ_KEY}","note":"jwt {S_GZ_JWT}","visible":"plain-gz-value"}}"#)
                        .as_bytes(),
                ))),
            "/events" => resp
                .header("content-type", "text/event-stream")
                .body(AxBody::from(
                    "data: one\n\nevent: tick\ndata: {\"token\":\"sse-secret\",\"n\":1}\n\n",
                )),
            _ => resp
                .status(if path == "/missing" { 404 } else { 200 })
                .body(AxBody::from("ok")),
        }
        .unwrap()
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

fn exchanges(records: &[Record], session: uuid::Uuid) -> Vec<HttpExchange> {
    records
        .iter()
        .filter(|r| r.chain_id == session)
        .filter_map(|r| match &r.body {
            Body::HttpExchange(x) => Some((**x).clone()),
            _ => None,
        })
        .collect()
}

fn header<'a>(x: &'a [cloudtap_schemas::Header], name: &str) -> Option<&'a str> {
    x.iter().find(|h| h.name == name).map(|h| h.value.as_str())
}

fn text(b: &cloudtap_schemas::BodyCapture) -> String {
    String::from_utf8(b.content.clone().unwrap_or_default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_http1_client_leaves_one_record_per_exchange() {
    let upstream = api_upstream().await;
    let edge = TestEdge::start(config(&[("api", upstream)])).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "api").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();

    // hyper's HTTP/1.1 client on one tunnel stream: one connection, kept alive.
    let stream = tunnel.open_stream("client").await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let requests: [(&str, &str, &str); 5] = [
        ("GET", "/users/7?x=1&access_token=q-secret-1", ""),
        (
            "POST",
            "/login",
            r#"{"user":"ann","password":"pw-secret-2"}"#,
        ),
        ("GET", "/gz", ""),
        ("GET", "/events", ""),
        ("GET", "/missing", ""),
    ];
    let mut statuses = Vec::new();
    for (method, uri, body) in requests {
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "api.internal")
            .header("content-type", "application/json")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        // The connection is reused: wait until it is idle again.
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        statuses.push(resp.status().as_u16());
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(statuses, [200, 200, 200, 200, 404]);
    // Per-target metrics count the same exchanges (the mirror runs beside the data
    // path, so give it a moment).
    let want = [
        r#"cloudtap_http_requests_total{target="api",method="GET",code="2xx"} 3"#,
        r#"cloudtap_http_requests_total{target="api",method="GET",code="4xx"} 1"#,
        r#"cloudtap_http_requests_total{target="api",method="POST",code="2xx"} 1"#,
        r#"cloudtap_http_request_duration_seconds_count{target="api"} 5"#,
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = http_get(&edge.http, "/metrics");
        if want.iter().all(|w| m.contains(w)) || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for w in want {
        assert!(metrics.contains(w), "{w} missing from:\n{metrics}");
    }
    assert!(
        metrics.contains(r#"cloudtap_http_body_bytes_total{target="api",direction="request"} 39"#),
        "{metrics}"
    );
    drop(sender);
    drop(tunnel);
    let (_dir, log) = edge.stop().await;
    let records = all_records(log.as_ref()).await;
    let xs = exchanges(&records, session);

    let complete: Vec<_> = xs
        .iter()
        .filter(|x| x.phase == ExchangePhase::Complete)
        .collect();
    assert_eq!(
        complete
            .iter()
            .map(|x| (
                x.exchange_index,
                x.method.as_str(),
                x.path.as_str(),
                x.status
            ))
            .collect::<Vec<_>>(),
        [
            (0, "GET", "/users/7", 200),
            (1, "POST", "/login", 200),
            (2, "GET", "/gz", 200),
            (4, "GET", "/missing", 404),
        ],
        "each exchange is recorded once, in order"
    );
    let users = complete[0];
    assert_eq!(users.query, "x=1&access_token=[REDACTED]");
    assert_eq!(users.authority, "api.internal");
    assert_eq!(users.protocol, "HTTP/1.1");
    assert_eq!(users.capture, "exchanges");
    assert_eq!(users.redaction_version, 1);
    assert_eq!(
        users.traceparent,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert!(users.end_unix_nanos > users.start_unix_nanos);
    assert_eq!(
        text(&users.response_body),
        r#"{"id":"7","name":"ann","role":"admin"}"#
    );
    assert_eq!(
        header(&users.response_headers, "content-type"),
        Some("application/json")
    );
    let login = complete[1];
    assert_eq!(
        text(&login.request_body),
        r#"{"password":"[REDACTED]","user":"ann"}"#
    );
    assert_eq!(login.request_body.size, 39);
    assert_eq!(login.request_body.sha256.len(), 32);
    assert_eq!(
        text(&login.response_body),
        r#"{"token":"[REDACTED]","user":"ann"}"#
    );
    assert_eq!(
        header(&login.response_headers, "set-cookie"),
        Some("[REDACTED]")
    );
    let gz = complete[2];
    assert!(
        text(&gz.response_body).contains("plain-gz-value"),
        "a gzip body is decoded: {:?}",
        gz.response_body
    );
    assert!(!text(&gz.response_body).contains(S_GZ_KEY));

    // Server-sent events: start, one record per event, end.
    let sse: Vec<_> = xs.iter().filter(|x| x.exchange_index == 3).collect();
    assert_eq!(
        sse.iter()
            .map(|x| (x.phase, text(&x.response_body)))
            .collect::<Vec<_>>(),
        [
            (ExchangePhase::Start, String::new()),
            (ExchangePhase::Message, "data: one".into()),
            (
                ExchangePhase::Message,
                "event: tick\ndata: {\"n\":1,\"token\":\"[REDACTED]\"}".into()
            ),
            (ExchangePhase::End, String::new()),
        ]
    );
    assert_eq!(sse[0].path, "/events");

    // `exchanges` keeps no payload in frames.
    assert!(
        records
            .iter()
            .any(|r| r.chain_id == session
                && matches!(&r.body, Body::Frame(f) if f.payload.is_none()))
    );
    assert!(
        !records
            .iter()
            .any(|r| r.chain_id == session
                && matches!(&r.body, Body::Frame(f) if f.payload.is_some()))
    );
}

/// An HTTPS server speaking just enough HTTP/1.1 (keep-alive, fixed responses).
async fn https_upstream(ca: &cloudtap_edge::pki::Ca) -> String {
    let acceptor = staging_tls(ca);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let body = br#"{"secure":true}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        tls.write_all(head.as_bytes()).await.unwrap();
                        tls.write_all(body).await.unwrap();
                    }
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    format!("localhost:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_target_is_mirrored_through_upstream_tls() {
    let ca = cloudtap_edge::pki::generate_ca("staging CA").unwrap();
    let upstream = https_upstream(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("staging.pem");
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    let mut cfg = config(&[("secure", upstream)]);
    cfg.targets[0].tls = Some(cloudtap_edge::config::UpstreamTls {
        sni: Some("localhost".into()),
        ca: Some(ca_path),
        insecure_skip_verify: false,
    });
    let edge = TestEdge::start(cfg).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "secure").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    let mut s = tunnel.open_stream("client").await.unwrap();
    for path in ["/a", "/b"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: secure.staging\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(br#"{"secure":true}"#) {
            let mut b = [0u8; 1024];
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "the stream ended early");
            got.extend_from_slice(&b[..n]);
        }
    }
    drop(s);
    drop(tunnel);
    let (_dir, log) = edge.stop().await;
    let xs = exchanges(&all_records(log.as_ref()).await, session);
    assert_eq!(
        xs.iter()
            .map(|x| (
                x.exchange_index,
                x.path.as_str(),
                x.status,
                text(&x.response_body)
            ))
            .collect::<Vec<_>>(),
        [
            (0, "/a", 200, r#"{"secure":true}"#.to_owned()),
            (1, "/b", 200, r#"{"secure":true}"#.to_owned()),
        ]
    );
    assert!(xs.iter().all(|x| x.authority == "secure.staging"));
}

/// The twenty seeded secrets: none may be found in any stored artifact.
const SECRETS: [&str; 20] = [
    "s01-BearerHeaderToken77",
    "s02-CookieSessionValue",
    "s03-ApiKeyHeaderValue",
    "s04-7Hq2CookieFromServer",
    "s05-JsonPasswordValue",
    "s06-NestedClientSecret",
    "s07-RespTokenValue9911",
    "4111111111111111",
    "s09.alice@example.com",
    "s10-FreeTextBearerTok",
    "5500 0000 0000 0004",
    "s12-QueryAccessToken",
    "s13.bob@example.org",
    "s14-GzippedApiKey5521",
    "s15-SignaturePartQ8vZ",
    "s16.carol@example.net",
    "s17-ForwardedBearerTk",
    "s18-SplitHeaderBearer",
    "s19-SplitJsonPassword",
    "s20-FormPasswordValue",
];
/// Values that are not secret and must survive, intact, in the exchange records.
const KEPT: [&str; 5] = [
    "plain-gz-value",
    "public-kind-header",
    "visible-json-field",
    "free text stays",
    "user=form-user",
];

/// Drives traffic seeded with the secrets through an edge on `log`, in HTTP/1 and
/// HTTP/2 headers, JSON fields, free text, a gzip body, a form, the query and path, and
/// split across two TCP writes.
async fn seeded_traffic(log: Arc<dyn EventLog>, otlp: Option<String>) -> uuid::Uuid {
    let upstream = api_upstream().await;
    let mut cfg = config(&[("api", upstream)]);
    cfg.telemetry.otlp_endpoint = otlp;
    let edge = TestEdge::start_with_log(tempfile::tempdir().unwrap(), cfg, log).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "api").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    let [
        s01,
        s02,
        s03,
        _s04,
        s05,
        s06,
        _s07,
        s08,
        s09,
        s10,
        s11,
        s12,
        s13,
        _s14,
        _s15,
        s16,
        s17,
        s18,
        s19,
        s20,
    ] = SECRETS;
    let json = format!(
        r#"{{"user":"ann","password":"{s05}","credentials":{{"client_secret":"{s06}"}},"cards":[{{"card_number":"{s08}"}}],"kept":"visible-json-field"}}"#
    );
    let free = format!("free text stays; mail {s09}; Bearer {s10}; card {s11}");
    let form = format!("user=form-user&password={s20}");
    let split_json = format!(r#"{{"password":"{s19}"}}"#);
    let mut s = tunnel.open_stream("client").await.unwrap();
    let mut writes: Vec<Vec<u8>> = vec![
        format!(
            "POST /login?access_token={s12}&email={} HTTP/1.1\r\nHost: api.internal\r\nAuthorization: Bearer {s01}\r\nX-Kind: public-kind-header\r\nX-Forwarded-Auth: Bearer {s17}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
            s13,
            json.len()
        )
        .into_bytes(),
        format!(
            "POST /notes/{s16} HTTP/1.1\r\nHost: api.internal\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{free}",
            free.len()
        )
        .into_bytes(),
        format!(
            "POST /form HTTP/1.1\r\nHost: api.internal\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        )
        .into_bytes(),
        b"GET /gz HTTP/1.1\r\nHost: api.internal\r\n\r\n".to_vec(),
    ];
    // A header and a JSON body, each split across two writes mid-secret.
    let split = format!(
        "POST /split HTTP/1.1\r\nHost: api.internal\r\nAuthorization: Bearer {s18}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{split_json}",
        split_json.len()
    );
    let cut1 = split.find(&s18[..8]).unwrap() + 4;
    let cut2 = split.find(&s19[..8]).unwrap() + 5;
    writes.push(split.as_bytes()[..cut1].to_vec());
    writes.push(split.as_bytes()[cut1..cut2].to_vec());
    writes.push(split.as_bytes()[cut2..].to_vec());
    for w in writes {
        s.write_all(&w).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut resp))
        .await
        .expect("the upstream closes after `Connection: close`")
        .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 5, "{resp}");
    drop(s);
    // And over HTTP/2: secrets in HPACK-encoded headers.
    let mut h2 = h2_client(&tunnel).await;
    let req = http::Request::builder()
        .method("GET")
        .uri("http://api.internal/users/2")
        .header("cookie", format!("session={s02}"))
        .header("x-api-key", s03)
        .body(Full::new(Bytes::new()))
        .unwrap();
    h2.ready().await.unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    drop(h2);
    drop(tunnel);
    edge.stop().await;
    session
}

/// Every stored form of `records` — the records encoded as the log stores them —
/// searched for every secret; and the kept values found.
fn assert_no_secret(where_: &str, records: &[Record], session: uuid::Uuid) {
    let encoded: Vec<Vec<u8>> = records.iter().map(encode_record).collect();
    for secret in SECRETS {
        for (r, e) in records.iter().zip(&encoded) {
            assert!(
                !e.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{where_}: secret {secret:?} found in {r:?}"
            );
        }
    }
    let xs = exchanges(records, session);
    assert_eq!(
        xs.len(),
        6,
        "{where_}: five HTTP/1 exchanges and one HTTP/2"
    );
    assert_eq!(xs.iter().filter(|x| x.protocol == "HTTP/2").count(), 1);
    let all: String = xs
        .iter()
        .map(|x| format!("{x:?}{}{}", text(&x.request_body), text(&x.response_body)))
        .collect();
    for kept in KEPT {
        assert!(
            all.contains(kept),
            "{where_}: {kept:?} is missing from the exchanges"
        );
    }
}

/// Every record in the Parquet archive of `log`, read back with the Parquet reader.
async fn archived(log: Arc<dyn EventLog>) -> Vec<Record> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path()));
    Recorder::new(log, store.clone(), RecorderSettings::default())
        .drain(&CancellationToken::new())
        .await
        .unwrap();
    let mut out = Vec::new();
    for table in ["frames", "events", "http_exchanges"] {
        for obj in store.list(&format!("{table}/")).await.unwrap() {
            let data = store.get(&obj.key).await.unwrap().unwrap();
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
                    .unwrap()
                    .build()
                    .unwrap();
            for b in reader {
                out.extend(tables::records_from_batch(&b.unwrap()).unwrap());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_secrets_are_in_no_segment_file_no_parquet_file_and_no_otlp_span() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(
        cloudtap_recorder::FileLog::open(cloudtap_recorder::FileLogConfig::new(
            dir.path().join("log"),
        ))
        .await
        .unwrap(),
    );
    let (endpoint, collector) = collector().await;
    let session = seeded_traffic(log.clone(), Some(endpoint)).await;
    // What the OTLP collector received: a span per exchange, no secret.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while spans(&collector).len() < 6 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(spans(&collector).len(), 6, "a span per exchange");
    let wire: Vec<u8> = collector
        .0
        .lock()
        .unwrap()
        .iter()
        .flat_map(prost::Message::encode_to_vec)
        .collect();
    for secret in SECRETS {
        assert!(
            !wire.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret {secret:?} reached the OTLP collector"
        );
    }
    // The segment files themselves, byte for byte.
    for entry in std::fs::read_dir(dir.path().join("log")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for secret in SECRETS {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "secret {secret:?} is in a segment file"
            );
        }
    }
    assert_no_secret("segment log", &all_records(log.as_ref()).await, session);
    assert_no_secret("parquet", &archived(log).await, session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_secrets_are_in_no_kafka_record() {
    let Some(broker) = testenv::service("CLOUDTAP_TEST_KAFKA", "kafka redaction") else {
        return;
    };
    let url = testenv::kafka_url(
        &broker,
        &format!("redaction-{}", uuid::Uuid::now_v7().simple()),
        1,
    );
    let log: Arc<dyn EventLog> = Arc::new(
        KafkaLog::open(KafkaLogConfig::from_url(&url).unwrap())
            .await
            .unwrap(),
    );
    let session = seeded_traffic(log.clone(), None).await;
    assert_no_secret("kafka", &all_records(log.as_ref()).await, session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_capture_keeps_no_headers_or_bodies() {
    let upstream = api_upstream().await;
    let mut cfg = config(&[("api", upstream)]);
    cfg.targets[0].capture = Some(CaptureLevel::Metadata);
    let edge = TestEdge::start(cfg).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "api").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    let mut s = tunnel.open_stream("client").await.unwrap();
    s.write_all(b"GET /users/1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    drop(tunnel);
    let (_dir, log) = edge.stop().await;
    let xs = exchanges(&all_records(log.as_ref()).await, session);
    assert_eq!(xs.len(), 1);
    let x = &xs[0];
    assert_eq!(
        (x.path.as_str(), x.status, x.capture.as_str()),
        ("/users/1", 200, "metadata")
    );
    assert!(x.request_headers.is_empty() && x.response_headers.is_empty());
    assert!(x.response_body.content.is_none());
    assert_eq!(x.response_body.size, 38);
}

/// Random bytes, truncated and oversized HTTP messages on an `http1` route to an echo
/// server: every byte comes back unchanged, nothing stalls, and an event says why the
/// stream's parsing stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_an_http_route_is_forwarded_unchanged() {
    let upstream = echo_upstream().await;
    let mut cfg = config(&[("h", upstream)]);
    cfg.targets[0].protocol = Protocol::Http1;
    cfg.targets[0].capture = Some(CaptureLevel::Full);
    let edge = TestEdge::start(cfg).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "h").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut oversized = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    oversized.extend(std::iter::repeat_n(b'a', 200_000));
    let cases: Vec<Vec<u8>> = vec![
        (0..50_000).map(|_| rand() as u8).collect(),
        b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly-part".to_vec(),
        b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n".to_vec(),
        oversized,
    ];
    for (i, case) in cases.iter().enumerate() {
        let s = tunnel.open_stream("client").await.unwrap();
        // Both halves in one task: yamux streams keep one parked writer waker, so a
        // reader in another task can starve the writer (see edge/src/mux.rs).
        let (mut r, mut w) = tokio::io::split(s);
        let write = async {
            for part in case.chunks(7_919) {
                w.write_all(part).await.unwrap();
            }
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let read = r.read_to_end(&mut back);
        let (_, got) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
                .await
                .unwrap_or_else(|_| panic!("case {i}: the stream stalled"));
        got.unwrap();
        assert_eq!(&back, case, "case {i}: the echoed bytes differ");
    }
    drop(tunnel);
    let (_dir, log) = edge.stop().await;
    let records = all_records(log.as_ref()).await;
    let events: Vec<String> = records
        .iter()
        .filter(|r| r.chain_id == session)
        .filter_map(|r| match &r.body {
            Body::Audit(a) if a.action == "mirror_stopped" => Some(a.detail.clone()),
            _ => None,
        })
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.contains("malformed") || e.contains("invalid")),
        "{events:?}"
    );
    // Each case stops its stream's parser (which side's bytes stop it first depends
    // on how fast the echo comes back; the parser's unit tests pin each reason).
    for stream in 1..=cases.len() {
        assert!(
            events
                .iter()
                .any(|e| e.starts_with(&format!("stream {stream}:"))),
            "stream {stream}: {events:?}"
        );
    }
    // The truncated request has no response: recorded as such.
    let xs = exchanges(&records, session);
    assert!(xs.iter().any(|x| x.path == "/x" && x.status == 0), "{xs:?}");
}

/// An HTTP/2 (prior knowledge) client connection over one tunnel stream.
async fn h2_client(
    tunnel: &cloudtap_edge::client::Tunnel,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tunnel.open_stream("client").await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_leaves_one_record_per_exchange() {
    let upstream = api_upstream().await;
    let edge = TestEdge::start(config(&[("api", upstream)])).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "api").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    let mut sender = h2_client(&tunnel).await;
    let mut statuses = Vec::new();
    for (method, path, body) in [
        ("GET", "/users/9?token=h2-query-secret", ""),
        (
            "POST",
            "/login",
            r#"{"password":"h2-body-secret","user":"bo"}"#,
        ),
        ("GET", "/gz", ""),
    ] {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://api.internal{path}"))
            .header("authorization", "Bearer h2-header-secret")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        statuses.push(resp.status().as_u16());
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(statuses, [200, 200, 200]);
    drop(sender);
    drop(tunnel);
    let (_dir, log) = edge.stop().await;
    let records = all_records(log.as_ref()).await;
    let xs = exchanges(&records, session);
    assert_eq!(
        xs.iter()
            .map(|x| (
                x.exchange_index,
                x.phase,
                x.method.as_str(),
                x.path.as_str(),
                x.status
            ))
            .collect::<Vec<_>>(),
        [
            (0, ExchangePhase::Complete, "GET", "/users/9", 200),
            (1, ExchangePhase::Complete, "POST", "/login", 200),
            (2, ExchangePhase::Complete, "GET", "/gz", 200),
        ]
    );
    assert!(
        xs.iter()
            .all(|x| x.protocol == "HTTP/2" && x.authority == "api.internal")
    );
    assert_eq!(xs[0].query, "token=[REDACTED]");
    assert_eq!(
        header(&xs[0].request_headers, "authorization"),
        Some("[REDACTED]")
    );
    assert_eq!(
        text(&xs[0].response_body),
        r#"{"id":"9","name":"ann","role":"admin"}"#
    );
    assert_eq!(
        text(&xs[1].request_body),
        r#"{"password":"[REDACTED]","user":"bo"}"#
    );
    assert!(text(&xs[2].response_body).contains("plain-gz-value"));
    for secret in ["h2-query-secret", "h2-body-secret", "h2-header-secret"] {
        assert!(
            !records.iter().any(|r| encode_record(r)
                .windows(secret.len())
                .any(|w| w == secret.as_bytes())),
            "{secret} was stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_grpc_unary_and_streaming_calls_are_recorded() {
    use cloudtap_proto::tunnel::v1 as pb;
    // The staging service: another edge's own gRPC API, with a heartbeat a second so
    // that `WatchEvents` streams.
    let mut staging_cfg = config(&[]);
    staging_cfg.limits.heartbeat_secs = 1;
    let staging = TestEdge::start(staging_cfg).await;
    let token = staging.login(&staging.admin_tls()).await.token;
    let staging_addr = staging.grpc.trim_start_matches("http://").to_owned();
    let edge = TestEdge::start(config(&[("grpc", staging_addr)])).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "grpc").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();

    // tonic over a tunnel stream.
    let opener = tunnel.opener();
    let channel = tonic::transport::Endpoint::from_static("http://staging.internal")
        .connect_with_connector(tower::service_fn(move |_| {
            let opener = opener.clone();
            async move {
                opener
                    .open_stream("grpc-client")
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap();
    let mut client = pb::tunnel_service_client::TunnelServiceClient::new(channel);
    let targets = client
        .list_targets(bearer(pb::ListTargetsRequest {}, &token))
        .await
        .unwrap();
    assert!(targets.into_inner().targets.is_empty());
    let refused = client
        .list_targets(tonic::Request::new(pb::ListTargetsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut events = client
        .watch_events(bearer(
            pb::WatchEventsRequest {
                kinds: vec!["heartbeat".into()],
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let e = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("a heartbeat within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(e.kind, "heartbeat");
    }
    drop(events); // the client cancels the call: RST_STREAM
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(client);
    drop(tunnel);
    let (_dir, log) = edge.stop().await;
    staging.stop().await;
    let xs = exchanges(&all_records(log.as_ref()).await, session);

    let unary: Vec<_> = xs
        .iter()
        .filter(|x| x.grpc_method == "ListTargets")
        .collect();
    assert_eq!(unary.len(), 2, "each unary call is one record: {xs:#?}");
    for x in &unary {
        assert_eq!(x.phase, ExchangePhase::Complete);
        assert_eq!(x.grpc_service, "cloudtap.tunnel.v1.TunnelService");
        assert_eq!(x.protocol, "HTTP/2");
        assert_eq!(x.status, 200);
        assert!(x.request_body.content.is_none());
        assert!(x.request_body.note.contains("gRPC"), "{:?}", x.request_body);
    }
    assert_eq!(unary[0].grpc_status, "0");
    assert_eq!(unary[1].grpc_status, "16");
    assert_eq!(
        header(&unary[0].request_headers, "authorization"),
        Some("[REDACTED]")
    );

    let watch: Vec<_> = xs.iter().filter(|x| x.exchange_index == 2).collect();
    let phases: Vec<_> = watch.iter().map(|x| x.phase).collect();
    assert_eq!(phases.first(), Some(&ExchangePhase::Start), "{watch:#?}");
    assert_eq!(phases.last(), Some(&ExchangePhase::End), "{watch:#?}");
    assert_eq!(watch[0].grpc_method, "WatchEvents");
    let messages: Vec<_> = watch
        .iter()
        .filter(|x| x.phase == ExchangePhase::Message)
        .collect();
    // The request, then at least the two heartbeats the client read.
    assert!(messages.len() >= 3, "{messages:#?}");
    assert!(messages[0].request_body.size > 0 && messages[0].response_body.size == 0);
    assert!(messages[1..].iter().all(|m| m.response_body.size > 0));
    assert!(
        watch.last().unwrap().note.contains("reset by the client"),
        "{:?}",
        watch.last().unwrap().note
    );
}

/// Reads one WebSocket frame from the server (unmasked): (opcode, payload).
async fn ws_frame(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await.unwrap();
            u64::from(u16::from_be_bytes(l))
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).await.unwrap();
            u64::from_be_bytes(l)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await.unwrap();
    (h[0] & 0x0f, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_stream_live_over_a_websocket_on_the_http_port() {
    let upstream = api_upstream().await;
    let edge = TestEdge::start(config(&[("api", upstream)])).await;
    let token = edge.login(&edge.admin_tls()).await.token;
    let addr = edge.http.trim_start_matches("http://").to_owned();
    let upgrade = |query: String| {
        format!(
            "GET /v1/events/ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    async fn head(s: &mut tokio::net::TcpStream) -> String {
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            got.push(b[0]);
        }
        String::from_utf8(got).unwrap()
    }
    // Without a token: refused before any upgrade.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(upgrade("kind=http_exchange".into()).as_bytes())
        .await
        .unwrap();
    assert!(head(&mut s).await.starts_with("HTTP/1.1 401"));

    let mut ws = tokio::net::TcpStream::connect(&addr).await.unwrap();
    ws.write_all(upgrade(format!("kind=http_exchange&access_token={token}")).as_bytes())
        .await
        .unwrap();
    let h = head(&mut ws).await;
    assert!(h.starts_with("HTTP/1.1 101"), "{h}");

    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "api").await;
    let mut s = tunnel.open_stream("client").await.unwrap();
    s.write_all(b"GET /users/5?password=ws-secret HTTP/1.1\r\nHost: api.internal\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let (opcode, payload) = tokio::time::timeout(Duration::from_secs(10), ws_frame(&mut ws))
        .await
        .expect("an event within 10 s");
    assert_eq!(opcode, 1, "a text message");
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["kind"], "http_exchange");
    assert_eq!(v["session_id"], open.session_id);
    assert_eq!(v["exchange"]["path"], "/users/5");
    assert_eq!(v["exchange"]["query"], "password=[REDACTED]");
    assert_eq!(v["exchange"]["status"], 200);
    drop(tunnel);
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_and_path_rules_refuse_requests_inline_with_403_and_a_record() {
    use cloudtap_edge::config::{HttpRule, RuleAction};
    let upstream = api_upstream().await;
    let mut cfg = config(&[("api", upstream)]);
    cfg.targets[0].http_rules = vec![
        HttpRule {
            action: RuleAction::Deny,
            methods: vec![],
            paths: vec!["/admin/**".into()],
        },
        HttpRule {
            action: RuleAction::Allow,
            methods: vec!["GET".into()],
            paths: vec!["/**".into()],
        },
    ];
    let edge = TestEdge::start(cfg).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "api").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    let mut answers = Vec::new();
    for second in [
        "DELETE /users/1 HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /users/../%61dmin/keys HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let mut s = tunnel.open_stream("client").await.unwrap();
        // An allowed request first, on the same keep-alive stream, then the refused one.
        s.write_all(b"GET /users/1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(br#""role":"admin"}"#) {
            let mut b = [0u8; 1024];
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&b[..n]);
        }
        s.write_all(second.as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("the stream ends after a refusal")
            .unwrap();
        answers.push(String::from_utf8(rest).unwrap());
    }
    assert!(
        answers[0].starts_with("HTTP/1.1 403 Forbidden"),
        "{}",
        answers[0]
    );
    assert!(
        answers[0].contains("DELETE /users/1 matches no allow rule"),
        "{}",
        answers[0]
    );
    assert!(
        answers[1].contains("GET /admin/keys is denied by http_rules[0]"),
        "{}",
        answers[1]
    );
    drop(tunnel);
    let (_dir, log) = edge.stop().await;
    let records = all_records(log.as_ref()).await;
    let refusals: Vec<String> = records
        .iter()
        .filter(|r| r.chain_id == session)
        .filter_map(|r| match &r.body {
            Body::PolicyDecision(p) if p.code == "http_rule_denied" && !p.allowed => {
                Some(p.reason.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    // The refused requests never reached the upstream: only the allowed ones are
    // exchanges.
    let xs = exchanges(&records, session);
    assert_eq!(xs.len(), 2, "{xs:#?}");
    assert!(xs.iter().all(|x| x.method == "GET" && x.path == "/users/1"));
}

/// A test OTLP collector: every export request it received.
#[derive(Default, Clone)]
struct Collector(
    Arc<
        std::sync::Mutex<
            Vec<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
        >,
    >,
);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Starts a collector on 127.0.0.1; its endpoint URL.
async fn collector() -> (String, Collector) {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let c = Collector::default();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let svc = TraceServiceServer::new(c.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    (url, c)
}

fn spans(c: &Collector) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
    c.0.lock()
        .unwrap()
        .iter()
        .flat_map(|r| r.resource_spans.iter())
        .flat_map(|r| r.scope_spans.iter())
        .flat_map(|s| s.spans.iter().cloned())
        .collect()
}

fn attr(s: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    s.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(v) => Some(v.clone()),
            Value::IntValue(v) => Some(v.to_string()),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_become_otlp_spans_that_continue_the_callers_trace_and_hold_no_secret() {
    let (endpoint, c) = collector().await;
    let upstream = api_upstream().await;
    let mut cfg = config(&[("api", upstream)]);
    cfg.telemetry.otlp_endpoint = Some(endpoint);
    let edge = TestEdge::start(cfg).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "api").await;
    let mut s = tunnel.open_stream("client").await.unwrap();
    s.write_all(
        b"GET /users/3?token=otlp-secret HTTP/1.1\r\nHost: api.internal:8443\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nAuthorization: Bearer otlp-header-secret\r\n\r\n\
          POST /login HTTP/1.1\r\nHost: api.internal\r\nContent-Type: application/json\r\nContent-Length: 27\r\nConnection: close\r\n\r\n{\"password\":\"otlp-pw-1234\"}",
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    drop(tunnel);
    // Spans leave in batches of up to a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while spans(&c).len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = spans(&c);
    assert_eq!(got.len(), 2, "{got:#?}");
    let get = got
        .iter()
        .find(|s| attr(s, "url.path").as_deref() == Some("/users/3"))
        .unwrap();
    assert_eq!(
        hex::encode(&get.trace_id),
        "0af7651916cd43dd8448eb211c80319c",
        "the caller's trace continues"
    );
    assert_eq!(hex::encode(&get.parent_span_id), "b7ad6b7169203331");
    assert_eq!(attr(get, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        attr(get, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(get, "server.address").as_deref(), Some("api.internal"));
    assert_eq!(attr(get, "server.port").as_deref(), Some("8443"));
    assert_eq!(attr(get, "url.query").as_deref(), Some("token=[REDACTED]"));
    assert_eq!(
        attr(get, "cloudtap.session_id").as_deref(),
        Some(open.session_id.as_str())
    );
    assert!(get.end_time_unix_nano > get.start_time_unix_nano);
    let post = got
        .iter()
        .find(|s| attr(s, "url.path").as_deref() == Some("/login"))
        .unwrap();
    assert_eq!(post.trace_id.len(), 16);
    assert!(
        post.parent_span_id.is_empty(),
        "no traceparent: a trace of its own"
    );
    // Nothing redaction removes reaches the collector.
    let wire: Vec<u8> =
        c.0.lock()
            .unwrap()
            .iter()
            .flat_map(prost::Message::encode_to_vec)
            .collect();
    for secret in ["otlp-secret", "otlp-header-secret", "otlp-pw-1234"] {
        assert!(
            !wire.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} reached the collector"
        );
    }
    // Counted once the collector's answer is back.
    let want = r#"cloudtap_otlp_spans_total{outcome="exported"} 2"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = http_get(&edge.http, "/metrics");
        if m.contains(want) || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(m.contains(want), "{m}");
    edge.stop().await;
}
