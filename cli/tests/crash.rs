//! Crash safety with the real binary: SIGKILL cloudtapd mid-transfer, restart it, and
//! check the log: it opens, every record decodes, no (chain, seq) twice, every chain
//! verifies, the session is closed with reason `edge_restart`, and what the client
//! received is in the log — all of it under `strict`, all but a bounded tail under
//! `block`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cloudtap_edge::client::Tunnel;
use cloudtap_edge::pki::{DevPki, client_config};
use cloudtap_proto::tunnel::v1 as pb;
use cloudtap_recorder::{EventLog, FileLog, FileLogConfig};
use cloudtap_schemas::{Body, Direction, Record, verify_chain};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TAP_CAPACITY: usize = 64;
/// The edge's largest read, so the largest frame (edge/src/tunnel.rs).
const CHUNK: usize = 64 * 1024;

/// An upstream that streams deterministic bytes until the connection breaks.
fn firehose() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                use std::io::Write;
                let mut i: u64 = 0;
                loop {
                    let block: Vec<u8> =
                        (0..4096u64).map(|k| ((i * 4096 + k) % 251) as u8).collect();
                    if s.write_all(&block).is_err() {
                        return;
                    }
                    i += 1;
                }
            });
        }
    });
    addr
}

fn expected(len: usize) -> Vec<u8> {
    (0..len as u64).map(|k| (k % 251) as u8).collect()
}

async fn all_records(log: &FileLog) -> Vec<Record> {
    use futures::StreamExt;
    let end = log.end().await.unwrap();
    cloudtap_recorder::read_to(log, end)
        .map(|e| e.expect("every record in the recovered log decodes").record)
        .collect()
        .await
}

/// Runs the scenario; returns (bytes the client received, bytes of down frames logged).
async fn crash_mid_transfer(mode: &str) -> (Vec<u8>, Vec<u8>) {
    let data = tempfile::tempdir().unwrap();
    let cfg = data.path().join("edge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[limits]\ntap_capacity = {TAP_CAPACITY}\n\n[[targets]]\nname = \"hose\"\nupstream = \"{}\"\non_log_backpressure = \"{mode}\"\n\n[policy]\nadmins = [\"dev-admin\"]\n",
            firehose()
        ),
    )
    .unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    let d = Daemon::start("edge", data.path(), &["--config", cfg_arg]);
    let pki = DevPki::new(data.path());
    let tls: Arc<rustls::ClientConfig> =
        client_config(&pki.ca_cert(), &pki.client_cert(), &pki.client_key(), false).unwrap();
    let tunnel_addr = d.endpoints.tunnel.to_string();
    let user = cloudtap_edge::client::login(&tls, &tunnel_addr, vec![], 0)
        .await
        .unwrap();
    let mut grpc = pb::tunnel_service_client::TunnelServiceClient::connect(format!(
        "http://{}",
        d.endpoints.grpc
    ))
    .await
    .unwrap();
    let mut req = tonic::Request::new(pb::OpenTunnelRequest {
        target: "hose".into(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", user.token).parse().unwrap(),
    );
    let open = grpc.open_tunnel(req).await.unwrap().into_inner();
    let session: uuid::Uuid = open.session_id.parse().unwrap();
    let tunnel = Tunnel::attach(&tls, &open.tunnel_addr, &open.session_token, "hose")
        .await
        .unwrap();
    let mut s = tunnel.open_stream("crash-test").await.unwrap();
    s.write_all(b"go").await.unwrap();

    // Receive a good amount, then SIGKILL the edge and keep reading what was in flight.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < 8 << 20 {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    d.kill9();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    assert_eq!(
        got,
        expected(got.len()),
        "the client received the upstream's bytes"
    );
    drop(s);
    drop(tunnel);

    // Restart: the edge recovers the log and closes the session it left open.
    let d = Daemon::start("edge", data.path(), &["--config", cfg_arg]);
    d.stop();
    let log = FileLog::open(FileLogConfig::new(data.path().join("log")))
        .await
        .unwrap();
    let records = all_records(&log).await;
    let mut seen = HashSet::new();
    let mut chains: BTreeMap<uuid::Uuid, Vec<Record>> = BTreeMap::new();
    for r in records {
        assert!(
            seen.insert((r.chain_id, r.seq)),
            "duplicate record {} seq {}",
            r.chain_id,
            r.seq
        );
        chains.entry(r.chain_id).or_default().push(r);
    }
    for (id, mut chain) in chains.clone() {
        chain.sort_by_key(|r| r.seq);
        verify_chain(None, &chain).unwrap_or_else(|e| panic!("chain {id}: {e}"));
    }
    let chain = &chains[&session];
    match &chain.last().unwrap().body {
        Body::SessionClosed(c) => assert_eq!(c.reason.as_str(), "edge_restart"),
        other => panic!("session's last record is {other:?}"),
    }
    let mut logged = Vec::new();
    for r in chain {
        if let Body::Frame(f) = &r.body
            && f.direction == Direction::Down
        {
            assert_eq!(f.offset, logged.len() as u64);
            logged.extend_from_slice(f.payload.as_ref().unwrap());
        }
    }
    (got, logged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_keeps_every_byte_the_client_received_across_sigkill() {
    let (got, logged) = crash_mid_transfer("strict").await;
    eprintln!(
        "strict: client received {} bytes, log holds {}",
        got.len(),
        logged.len()
    );
    assert!(
        logged.len() >= got.len(),
        "strict lost {} bytes",
        got.len() - logged.len()
    );
    assert_eq!(&logged[..got.len()], &got[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_loses_at_most_the_documented_bound_across_sigkill() {
    let (got, logged) = crash_mid_transfer("block").await;
    // docs/log-format.md: the tap's buffer plus the group commit in flight, each at most
    // `tap_capacity` records of one chunk.
    let bound = 2 * TAP_CAPACITY * CHUNK;
    eprintln!(
        "block: client received {} bytes, log holds {}, bound {bound}",
        got.len(),
        logged.len()
    );
    let common = got.len().min(logged.len());
    assert_eq!(
        &logged[..common],
        &got[..common],
        "what is logged is what was forwarded"
    );
    assert!(
        got.len() - common <= bound,
        "block lost {} bytes, over the bound {bound}",
        got.len() - common
    );
}
