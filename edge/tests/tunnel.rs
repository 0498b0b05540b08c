//! The tunnel end to end in-process: real TLS, real yamux, a real TCP upstream, the
//! segment-file log.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cloudtap_schemas::{Body, Direction, verify_chain};
use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Deterministic pseudo-random bytes (xorshift), different per seed.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

type Hashes = Arc<Mutex<HashMap<u64, [u8; 32]>>>;

/// An upstream that, per connection, reads an 8-byte stream index, then concurrently
/// hashes everything the client sends and sends `len` bytes of its own.
async fn bulk_upstream(len: usize) -> (String, Hashes) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let received: Hashes = Arc::default();
    let rec = received.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let rec = rec.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut idx = [0u8; 8];
                r.read_exact(&mut idx).await.unwrap();
                let idx = u64::from_be_bytes(idx);
                let send = tokio::spawn(async move {
                    w.write_all(&data(1000 + idx, len)).await.unwrap();
                    w.shutdown().await.unwrap();
                });
                let mut h = Sha256::new();
                h.update(idx.to_be_bytes());
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = r.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                rec.lock().unwrap().insert(idx, h.finalize().into());
                send.await.unwrap();
            });
        }
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_over_eight_streams_is_byte_identical_and_fully_logged() {
    let streams: u64 = std::env::var("BULK_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    // 64 MiB each way in total by default.
    let per_stream: usize = std::env::var("BULK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8 << 20);
    let (upstream, received) = bulk_upstream(per_stream).await;
    let edge = TestEdge::start(config(&[("bulk", upstream)])).await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "bulk").await;

    let mut tasks = Vec::new();
    for i in 0..streams {
        let opener = tunnel.opener();
        tasks.push(tokio::spawn(async move {
            let s = opener.open_stream(&format!("test-{i}")).await.unwrap();
            let (mut r, mut w) = tokio::io::split(s);
            let mut up = i.to_be_bytes().to_vec();
            up.extend(data(i, per_stream - 8));
            let sent: [u8; 32] = Sha256::digest(&up).into();
            // Both halves in this one task: a yamux stream keeps one waker per direction
            // of its command channel, so halves polled from two tasks can lose a wakeup.
            let mut down = Vec::with_capacity(per_stream);
            let (w_res, r_res) = tokio::join!(
                async {
                    w.write_all(&up).await?;
                    w.shutdown().await
                },
                r.read_to_end(&mut down)
            );
            w_res.unwrap();
            r_res.unwrap();
            assert_eq!(down.len(), per_stream, "stream {i}: downstream length");
            assert_eq!(
                down,
                data(1000 + i, per_stream),
                "stream {i}: downstream bytes"
            );
            (i, sent, <[u8; 32]>::from(Sha256::digest(&down)))
        }));
    }
    let mut expected = HashMap::new();
    for t in tasks {
        let (i, sent, got_down) = t.await.unwrap();
        expected.insert(i, (sent, got_down));
    }
    // The upstream records its hash once it has read to EOF, which may be a moment
    // after the client finished.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while received.lock().unwrap().len() < streams as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "upstream did not see every stream end within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for (i, (sent, _)) in &expected {
        assert_eq!(
            received.lock().unwrap()[i],
            *sent,
            "stream {i}: upstream received other bytes"
        );
    }

    // Close, then check the log holds exactly those bytes, in a verified chain.
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    tunnel.close();
    edge.wait_record("session_closed", |r| {
        r.chain_id == session && matches!(r.body, Body::SessionClosed(_))
    })
    .await;
    let chain = edge.log.read_chain(session).await.unwrap();
    verify_chain(None, &chain).expect("session chain verifies");
    // Per yamux stream: which test stream it carried (the first 8 up bytes) and hashes.
    let mut up: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut down: HashMap<u64, Vec<u8>> = HashMap::new();
    for r in &chain {
        if let Body::Frame(f) = &r.body {
            let buf = match f.direction {
                Direction::Up => up.entry(f.stream_id).or_default(),
                Direction::Down => down.entry(f.stream_id).or_default(),
            };
            assert_eq!(buf.len() as u64, f.offset, "frame offsets are contiguous");
            buf.extend_from_slice(f.payload.as_ref().expect("full capture keeps payloads"));
        }
    }
    assert_eq!(up.len(), streams as usize);
    for (sid, bytes) in &up {
        let idx = u64::from_be_bytes(bytes[..8].try_into().unwrap());
        let (sent, got_down) = expected[&idx];
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(bytes)),
            sent,
            "logged up bytes of stream {idx}"
        );
        assert_eq!(
            <[u8; 32]>::from(Sha256::digest(&down[sid])),
            got_down,
            "logged down bytes of stream {idx}"
        );
    }
    let kinds: Vec<&str> = chain.iter().map(|r| r.kind()).collect();
    assert_eq!(kinds.first(), Some(&"session_opened"));
    assert_eq!(kinds.last(), Some(&"session_closed"));
    assert_eq!(
        kinds.iter().filter(|k| **k == "stream_opened").count(),
        streams as usize
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "stream_closed").count(),
        streams as usize
    );
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_get_clear_errors_and_records_never_crash() {
    use cloudtap_proto::tunnel::v1::StreamHeader;
    // An upstream address nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let edge = TestEdge::start(config(&[
        ("dead", dead_addr),
        ("other", "127.0.0.1:9".into()),
    ]))
    .await;
    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "dead").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    let opener = tunnel.opener();

    let e = opener.open_stream("c1").await.unwrap_err();
    let (code, msg) = refused(&e);
    assert_eq!(code, "upstream_unreachable");
    assert!(msg.contains("refused"), "{msg}");

    let e = opener
        .open_with_header(&StreamHeader {
            target: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let (code, msg) = refused(&e);
    assert_eq!(code, "wrong_target");
    assert!(msg.contains("open a tunnel per target"), "{msg}");

    // Oversized header: a length prefix far over the limit.
    let mut raw = opener.open_raw().await.unwrap();
    raw.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    let reply: cloudtap_proto::tunnel::v1::StreamReply =
        cloudtap_edge::wire::read_msg(&mut raw).await.unwrap();
    assert!(!reply.ok);
    assert_eq!(reply.code, "bad_stream_header");
    assert!(reply.error.contains("over the"), "{}", reply.error);

    // Malformed header: garbage protobuf.
    let mut raw = opener.open_raw().await.unwrap();
    raw.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let reply: cloudtap_proto::tunnel::v1::StreamReply =
        cloudtap_edge::wire::read_msg(&mut raw).await.unwrap();
    assert_eq!(reply.code, "bad_stream_header");

    // Each refusal is on the session's chain; the tunnel still works for more streams.
    for code in ["upstream_unreachable", "wrong_target", "bad_stream_header"] {
        edge.wait_record(code, |r| {
            r.chain_id == session
                && matches!(&r.body, Body::StreamClosed(c) if c.error.starts_with(code))
        })
        .await;
    }
    assert!(!tunnel.is_closed());
    assert_eq!(
        refused(&opener.open_stream("c2").await.unwrap_err()).0,
        "upstream_unreachable"
    );
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sessions_with_edge_shutdown_and_restart_closes_leftovers() {
    let (upstream, _) = bulk_upstream(16).await;
    let edge = TestEdge::start(config(&[("t", upstream)])).await;
    let (mut tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "t").await;
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    let (_dir, log) = edge.stop().await;
    tunnel.closed().await;
    assert_eq!(
        tunnel.notice().map(|n| n.reason).as_deref(),
        Some("edge_shutdown")
    );
    let chain = log.read_chain(session).await.unwrap();
    verify_chain(None, &chain).unwrap();
    match &chain.last().unwrap().body {
        Body::SessionClosed(c) => assert_eq!(c.reason.as_str(), "edge_shutdown"),
        other => panic!("last record is {other:?}"),
    }
}

/// A TLS echo server with a certificate for `localhost` from `ca`.
async fn tls_echo_upstream(ca: &cloudtap_edge::pki::Ca) -> String {
    let acceptor = staging_tls(ca);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    format!("localhost:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_originates_tls_to_https_upstreams_and_records_plaintext() {
    let staging_ca = cloudtap_edge::pki::generate_ca("staging CA").unwrap();
    let other_ca = cloudtap_edge::pki::generate_ca("some other CA").unwrap();
    let upstream = tls_echo_upstream(&staging_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let (good_ca, bad_ca) = (dir.path().join("staging.pem"), dir.path().join("other.pem"));
    std::fs::write(&good_ca, &staging_ca.cert_pem).unwrap();
    std::fs::write(&bad_ca, &other_ca.cert_pem).unwrap();
    let mut cfg = config(&[("https", upstream.clone()), ("https-wrong-ca", upstream)]);
    // An echo server answers a request with itself, which is not HTTP: opaque route,
    // so the frames keep the plaintext (tests/http.rs mirrors a real HTTPS server).
    cfg.targets[0].protocol = cloudtap_edge::config::Protocol::Tcp;
    cfg.targets[0].tls = Some(cloudtap_edge::config::UpstreamTls {
        sni: Some("localhost".into()),
        ca: Some(good_ca),
        insecure_skip_verify: false,
    });
    cfg.targets[1].tls = Some(cloudtap_edge::config::UpstreamTls {
        sni: None,
        ca: Some(bad_ca),
        insecure_skip_verify: false,
    });
    let edge = TestEdge::start(cfg).await;

    let (tunnel, open, _) = edge.tunnel(&edge.admin_tls(), "https").await;
    let mut s = tunnel.open_stream("t").await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"GET / HTTP/1.1\r\n\r\n");
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    edge.wait_record("plaintext frame", |r| {
        r.chain_id == session
            && matches!(&r.body, Body::Frame(f) if f.payload.as_deref() == Some(&b"GET / HTTP/1.1\r\n\r\n"[..]))
    })
    .await;

    let (tunnel, _, _) = edge.tunnel(&edge.admin_tls(), "https-wrong-ca").await;
    let e = tunnel.open_stream("t").await.unwrap_err();
    let (code, msg) = refused(&e);
    assert_eq!(code, "upstream_unreachable");
    assert!(msg.contains("TLS handshake failed"), "{msg}");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_written_and_the_tunnel_limit_is_enforced() {
    let (upstream, _) = bulk_upstream(16).await;
    let mut cfg = config(&[("t", upstream)]);
    cfg.limits.heartbeat_secs = 1;
    cfg.limits.max_tunnels = 1;
    let edge = TestEdge::start(cfg).await;
    edge.wait_record("a heartbeat", |r| matches!(r.body, Body::Heartbeat(_)))
        .await;
    let (_tunnel, _, token) = edge.tunnel(&edge.admin_tls(), "t").await;
    let e = edge.open(&token, "t").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message().contains("maximum of 1 tunnels"),
        "{}",
        e.message()
    );
    edge.wait_refusal("too_many_tunnels").await;
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_log_disk_refuses_new_sessions_and_healthz_says_why() {
    use cloudtap_recorder::{FileLog, FileLogConfig};
    let (upstream, _) = bulk_upstream(16).await;
    let dir = tempfile::tempdir().unwrap();
    // No filesystem has this much free: the edge must consider its disk full.
    let mut log_cfg = FileLogConfig::new(dir.path().join("log"));
    log_cfg.min_free_bytes = u64::MAX;
    let log = Arc::new(FileLog::open(log_cfg).await.unwrap());
    let edge = TestEdge::start_with_log(dir, config(&[("t", upstream)]), log).await;
    let user = edge.login(&edge.admin_tls()).await;
    let err = edge.open(&user.token, "t").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("free") && err.message().contains("no new sessions"),
        "{}",
        err.message()
    );
    let refusal = edge.wait_refusal("log_disk_full").await;
    assert_eq!(refusal.target, "t");
    let health = http_get(&edge.http, "/healthz");
    assert!(
        health.contains("degraded") && health.contains("log_min_free_mb"),
        "{health}"
    );
    edge.stop().await;
}
