//! A real edge in-process for integration tests: the development PKI in a temp dir,
//! the segment-file log, listeners on 127.0.0.1:0, and helpers acting as a client.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cloudtap_edge::client::{ClientError, Tunnel};
use cloudtap_edge::config::{EdgeConfig, PolicyRule, TargetConfig};
use cloudtap_edge::pki::{self, DEV_ADMIN, DevPki};
use cloudtap_edge::token::SigningKey;
use cloudtap_edge::{EdgeParams, Listeners};
use cloudtap_proto::tunnel::v1 as pb;
use cloudtap_recorder::{EventLog, FileLog, FileLogConfig};
use cloudtap_schemas::{Body, PolicyDecision, Record};
use pb::tunnel_service_client::TunnelServiceClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct TestEdge {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
    pub log: Arc<dyn EventLog>,
    pub grpc: String,
    pub http: String,
    pub tunnel: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

/// A config with the given targets, `dev-admin` as admin and `alice` allowed on every
/// target but `forbidden`.
pub fn config(targets: &[(&str, String)]) -> EdgeConfig {
    let mut cfg = EdgeConfig::default();
    for (name, upstream) in targets {
        cfg.targets.push(TargetConfig {
            name: name.to_string(),
            upstream: upstream.clone(),
            tls: None,
            protocol: Default::default(),
            capture: None,
            http_rules: Vec::new(),
            on_log_backpressure: Default::default(),
        });
    }
    cfg.policy.admins.push(DEV_ADMIN.into());
    cfg.policy.rules.push(PolicyRule {
        identities: vec!["alice".into()],
        targets: targets
            .iter()
            .map(|t| t.0.to_string())
            .filter(|t| t != "forbidden")
            .collect(),
    });
    cfg
}

impl TestEdge {
    pub async fn start(cfg: EdgeConfig) -> TestEdge {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, cfg).await
    }

    /// Starts an edge on an existing data dir (restarts).
    pub async fn start_in(dir: tempfile::TempDir, cfg: EdgeConfig) -> TestEdge {
        let log = Arc::new(
            FileLog::open(FileLogConfig::new(dir.path().join("log")))
                .await
                .unwrap(),
        );
        Self::start_with_log(dir, cfg, log).await
    }

    /// Starts an edge that appends to `log` (e.g. a Kafka log).
    pub async fn start_with_log(
        dir: tempfile::TempDir,
        cfg: EdgeConfig,
        log: Arc<dyn EventLog>,
    ) -> TestEdge {
        // RUST_LOG=… shows the edge's (and yamux's) logs when debugging a test.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let pki = DevPki::new(dir.path());
        pki.ensure().unwrap();
        let seed = std::fs::read_to_string(pki.signing_key()).unwrap();
        let listeners = Listeners {
            grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tunnel: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let grpc = format!("http://{}", listeners.grpc.local_addr().unwrap());
        let http = format!("http://{}", listeners.http.local_addr().unwrap());
        let tunnel = listeners.tunnel.local_addr().unwrap().to_string();
        let params = EdgeParams {
            config: cfg,
            log: log.clone(),
            tls_cert: pki.server_cert(),
            tls_key: pki.server_key(),
            client_ca: pki.ca_cert(),
            signing_key: SigningKey::from_seed_hex(&seed).unwrap(),
        };
        let shutdown = CancellationToken::new();
        let s2 = shutdown.clone();
        let task = tokio::spawn(async move {
            cloudtap_edge::run(params, listeners, s2).await.unwrap();
        });
        let edge = TestEdge {
            dir,
            pki,
            log,
            grpc,
            http,
            tunnel,
            shutdown,
            task,
        };
        // Ready when the control plane answers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if TunnelServiceClient::connect(edge.grpc.clone())
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "edge did not start within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        edge
    }

    pub async fn stop(self) -> (tempfile::TempDir, Arc<dyn EventLog>) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("edge did not stop within 30 s")
            .unwrap();
        (self.dir, self.log)
    }

    pub fn admin_tls(&self) -> Arc<rustls::ClientConfig> {
        pki::client_config(
            &self.pki.ca_cert(),
            &self.pki.client_cert(),
            &self.pki.client_key(),
            false,
        )
        .unwrap()
    }

    /// A client certificate for `identity` from the edge's CA.
    pub fn tls_for(&self, identity: &str) -> Arc<rustls::ClientConfig> {
        let ca = pki::Ca::from_pem(
            &std::fs::read_to_string(self.pki.ca_cert()).unwrap(),
            &std::fs::read_to_string(self.pki.ca_key()).unwrap(),
        )
        .unwrap();
        tls_from(&ca, identity, &self.pki.ca_cert(), self.dir.path())
    }

    pub fn signing_key(&self) -> SigningKey {
        SigningKey::from_seed_hex(&std::fs::read_to_string(self.pki.signing_key()).unwrap())
            .unwrap()
    }

    pub async fn grpc(&self) -> TunnelServiceClient<tonic::transport::Channel> {
        TunnelServiceClient::connect(self.grpc.clone())
            .await
            .unwrap()
    }

    pub async fn login(&self, tls: &Arc<rustls::ClientConfig>) -> pb::TunnelHelloReply {
        cloudtap_edge::client::login(tls, &self.tunnel, vec![], 0)
            .await
            .unwrap()
    }

    pub async fn open(
        &self,
        token: &str,
        target: &str,
    ) -> Result<pb::OpenTunnelResponse, tonic::Status> {
        self.grpc()
            .await
            .open_tunnel(bearer(
                pb::OpenTunnelRequest {
                    target: target.into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Login + OpenTunnel + attach, as `tls`'s identity.
    pub async fn tunnel(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        target: &str,
    ) -> (Tunnel, pb::OpenTunnelResponse, String) {
        let user = self.login(tls).await;
        let open = self.open(&user.token, target).await.unwrap();
        let t = Tunnel::attach(tls, &open.tunnel_addr, &open.session_token, target)
            .await
            .unwrap();
        (t, open, user.token)
    }

    /// Waits until a record matching `f` is in the log (deadline 20 s).
    pub async fn wait_record(&self, what: &str, f: impl Fn(&Record) -> bool) -> Record {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = all_records(self.log.as_ref())
                .await
                .into_iter()
                .find(|r| f(r))
            {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited 20 s for a record: {what}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for a refusal record with `code`.
    pub async fn wait_refusal(&self, code: &str) -> PolicyDecision {
        let r = self
            .wait_record(
                &format!("policy_decision refused with code {code}"),
                |r| matches!(&r.body, Body::PolicyDecision(p) if !p.allowed && p.code == code),
            )
            .await;
        match r.body {
            Body::PolicyDecision(p) => p,
            _ => unreachable!(),
        }
    }
}

pub fn tls_from(
    ca: &pki::Ca,
    identity: &str,
    trust: &std::path::Path,
    dir: &std::path::Path,
) -> Arc<rustls::ClientConfig> {
    let issued = ca.issue_client(identity).unwrap();
    let n = uuid::Uuid::now_v7();
    let cert = dir.join(format!("{identity}-{n}.pem"));
    let key = dir.join(format!("{identity}-{n}.key"));
    std::fs::write(&cert, issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem).unwrap();
    pki::client_config(trust, &cert, &key, false).unwrap()
}

pub fn bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// Every record in the log, in log order.
pub async fn all_records(log: &dyn EventLog) -> Vec<Record> {
    use futures::StreamExt;
    let end = log.end().await.unwrap();
    cloudtap_recorder::read_to(log, end)
        .map(|e| e.unwrap().record)
        .collect()
        .await
}

pub fn refused(e: &ClientError) -> (&str, String) {
    match e {
        ClientError::Refused { code, message } => (code.as_str(), message.clone()),
        other => panic!("expected a refusal, got {other}"),
    }
}

/// A minimal HTTP/1.1 GET against `base` (`http://host:port`); the whole response.
pub fn http_get(base: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// An upstream on 127.0.0.1 that echoes every byte back.
pub async fn echo_upstream() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A TLS acceptor for a staging server: a certificate for `localhost` issued by `ca`.
pub fn staging_tls(ca: &pki::Ca) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    let issued = ca.issue_server(&["localhost"]).unwrap();
    let certs: Vec<_> =
        rustls_pki_types::CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}
