//! The cloudtap edge: the tunnel listener (TLS 1.3 + client certificates, yamux),
//! tokens and policy, the tap into the traffic log, and the control plane (gRPC and
//! HTTP). `cloudtapd edge` and `cloudtapd all` compose it through [`run`].
//!
//! See `docs/ARCHITECTURE.md` for how the pieces fit; in short:
//!
//! - [`tunnel`] accepts connections, logs users in, attaches sessions, forwards streams;
//! - [`control`] holds the control-plane semantics; [`grpc`] and [`http`] expose them;
//! - [`tap`] is the single path to the log; it assigns seqs and hashes;
//! - at start the edge reads the log back once: revocations are re-applied and sessions
//!   an earlier run of this edge left open are closed with reason `edge_restart`; then it
//!   follows the log for control records (revoke, close) from any edge.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use cloudtap_recorder::{EventLog, Offsets};
use cloudtap_schemas::{Audit, Body, CloseReason, Heartbeat, Record, SessionClosed};

pub mod client;
pub mod config;
pub mod control;
pub mod demo;
pub mod grpc;
pub mod http;
mod metrics;
pub mod mirror;
pub mod mux;
pub mod otlp;
pub mod pki;
pub mod policy;
pub mod replays;
mod session;
pub mod tap;
pub mod token;
mod tunnel;
pub mod wire;

use crate::config::{Backpressure, EdgeConfig, TargetConfig};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::session::Sessions;
use crate::tap::{ChainMeta, GapCounter, Tap};
use crate::token::{SigningKey, VerifyingKey};

/// Everything the edge needs, resolved by the binary (files read, log opened).
pub struct EdgeParams {
    pub config: EdgeConfig,
    pub log: Arc<dyn EventLog>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    pub signing_key: SigningKey,
}

/// The three listeners, bound by the caller (port 0 is fine).
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    pub tunnel: TcpListener,
}

/// Shared state of a running edge.
pub struct EdgeState {
    pub(crate) cfg: EdgeConfig,
    pub(crate) name: String,
    pub(crate) edge_chain: Uuid,
    pub(crate) edge_gaps: Arc<GapCounter>,
    pub(crate) tap: Tap,
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) policy: Policy,
    pub(crate) signer: SigningKey,
    pub(crate) verifier: VerifyingKey,
    pub(crate) sessions: Sessions,
    pub(crate) revoked: Mutex<HashSet<String>>,
    pub(crate) tunnel_addr: String,
    pub(crate) metrics: Metrics,
    pub(crate) shutting_down: CancellationToken,
    /// Set while the control-record follower is not reading the log.
    pub(crate) follow_failed: std::sync::atomic::AtomicBool,
    pub(crate) weak: Weak<EdgeState>,
    upstream_tls: Mutex<HashMap<String, tokio_rustls::TlsConnector>>,
    /// The `[redaction]` rules, compiled once.
    pub(crate) redactor: Arc<mirror::redact::Redactor>,
    /// OTLP span export, when `[telemetry] otlp_endpoint` is set.
    pub(crate) otlp: Option<Arc<otlp::Otlp>>,
}

impl EdgeState {
    /// The configuration this edge (or node) runs with.
    pub fn config(&self) -> &EdgeConfig {
        &self.cfg
    }
}

impl EdgeState {
    /// TLS connector for a target's upstream, built once.
    pub(crate) fn upstream_tls(
        &self,
        t: &TargetConfig,
    ) -> Result<tokio_rustls::TlsConnector, String> {
        let mut cache = self.upstream_tls.lock().expect("tls cache poisoned");
        if let Some(c) = cache.get(&t.name) {
            return Ok(c.clone());
        }
        let tls = t.tls.clone().unwrap_or_default();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let cfg = if tls.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(pki::insecure_verifier(provider))
                .with_no_client_auth()
        } else {
            let ca = tls.ca.as_ref().ok_or("no CA configured")?;
            let mut roots = rustls::RootCertStore::empty();
            for c in pki::load_certs(ca).map_err(|e| e.to_string())? {
                roots.add(c).map_err(|e| e.to_string())?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        cache.insert(t.name.clone(), connector.clone());
        Ok(connector)
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// `(healthy, reason)` for `/healthz`.
    pub fn health(&self) -> (bool, String) {
        if self.tap.stats.failed.load(Ordering::Acquire) {
            return (
                false,
                format!(
                    "traffic log {} failed; see the edge's log",
                    self.log.describe()
                ),
            );
        }
        if let Some(why) = self.log.health() {
            return (false, format!("traffic log degraded: {why}"));
        }
        if self.follow_failed.load(Ordering::Acquire) {
            return (
                false,
                "not following the traffic log: revocations and closes may not apply; see the edge's log".into(),
            );
        }
        if self.shutting_down.is_cancelled() {
            return (false, "shutting down".into());
        }
        (true, "ok".into())
    }
}

/// Addresses the edge actually bound (written to `endpoints.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub tunnel: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demo: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(
        "the control plane must listen on loopback in this build ({0} is not): control-plane TLS off loopback is not implemented yet; bind it to 127.0.0.1 and expose only the tunnel port"
    )]
    ControlOffLoopback(SocketAddr),
    #[error("traffic log: {0}")]
    Log(#[from] cloudtap_recorder::LogError),
    #[error("[redaction]: {0}")]
    Redaction(#[from] mirror::redact::RuleError),
    #[error("[telemetry]: {0}")]
    Telemetry(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Services of other roles served on the edge's own control listeners (`cloudtapd
/// all`): built once the edge's state exists, since they authenticate through it.
#[derive(Default)]
pub struct Mounts {
    /// Routes merged into the HTTP API.
    pub http: Option<axum::Router>,
    /// gRPC services added beside the control plane.
    pub grpc: Option<tonic::service::Routes>,
}

impl std::fmt::Debug for Mounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounts")
            .field("http", &self.http.is_some())
            .field("grpc", &self.grpc.is_some())
            .finish()
    }
}

/// Runs the edge on the given listeners until `shutdown` fires, then drains: live
/// sessions end with reason `edge_shutdown`, the tap is flushed, and it returns.
pub async fn run(
    params: EdgeParams,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), EdgeError> {
    run_with(params, listeners, shutdown, |_| Mounts::default()).await
}

/// [`run`], with other roles' services mounted on the control listeners.
pub async fn run_with(
    params: EdgeParams,
    listeners: Listeners,
    shutdown: CancellationToken,
    mounts: impl FnOnce(Arc<EdgeState>) -> Mounts,
) -> Result<(), EdgeError> {
    let Listeners { grpc, http, tunnel } = listeners;
    run_inner(params, grpc, http, Some(tunnel), shutdown, mounts).await
}

/// Runs a node of another role (`cloudtapd query`) on the control plane's machinery
/// without being an edge: the same token checks and policy, revocations followed on
/// the log, its own chain for audit records and heartbeats, `/healthz` and
/// `/metrics` — and only the mounted services besides: no tunnel listener, no
/// `TunnelService`, no `/v1/proxy`. `params.config.name` names the node's chain.
pub async fn run_node(
    params: EdgeParams,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
    mounts: impl FnOnce(Arc<EdgeState>) -> Mounts,
) -> Result<(), EdgeError> {
    run_inner(params, grpc, http, None, shutdown, mounts).await
}

async fn run_inner(
    params: EdgeParams,
    grpc: TcpListener,
    http: TcpListener,
    tunnel: Option<TcpListener>,
    shutdown: CancellationToken,
    mounts: impl FnOnce(Arc<EdgeState>) -> Mounts,
) -> Result<(), EdgeError> {
    for l in [&grpc, &http] {
        let addr = l.local_addr()?;
        if !addr.ip().is_loopback() {
            return Err(EdgeError::ControlOffLoopback(addr));
        }
    }
    let server_tls = match &tunnel {
        Some(_) => Some(pki::tunnel_server_config(
            &params.tls_cert,
            &params.tls_key,
            &params.client_ca,
        )?),
        None => None,
    };
    let tunnel_local = match &tunnel {
        Some(t) => t.local_addr()?.to_string(),
        None => "none".to_string(),
    };
    let cfg = params.config;
    let redactor = Arc::new(mirror::redact::Redactor::new(&cfg.redaction)?);
    let otlp = match &cfg.telemetry.otlp_endpoint {
        Some(e) => Some(Arc::new(
            otlp::Otlp::start(&cfg.telemetry, e.clone()).map_err(EdgeError::Telemetry)?,
        )),
        None => None,
    };
    let (tap, tap_task) = Tap::start(params.log.clone(), cfg.limits.tap_capacity);
    let edge_chain = Uuid::now_v7();
    let state = Arc::new_cyclic(|weak| EdgeState {
        name: cfg.name.clone(),
        edge_chain,
        edge_gaps: Arc::default(),
        tap: tap.clone(),
        log: params.log.clone(),
        policy: Policy::new(cfg.policy.clone()),
        verifier: params.signing_key.verifying_key(),
        signer: params.signing_key,
        sessions: Sessions::default(),
        revoked: Mutex::default(),
        tunnel_addr: tunnel_local.clone(),
        metrics: Metrics::default(),
        shutting_down: CancellationToken::new(),
        follow_failed: Default::default(),
        weak: weak.clone(),
        upstream_tls: Mutex::default(),
        redactor,
        otlp,
        cfg,
    });
    tap.open_chain(
        edge_chain,
        None,
        state.edge_gaps.clone(),
        ChainMeta {
            session_id: None,
            target: String::new(),
            identity: state.name.clone(),
        },
    )
    .await
    .map_err(|_| cloudtap_recorder::LogError::Closed)?;
    let follow_from = recover(&state).await?;
    state
        .edge_record(Body::Audit(Audit {
            actor: state.name.clone(),
            action: "edge_started".into(),
            detail: format!("tunnel={tunnel_local} log={}", state.log.describe()),
        }))
        .await;

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(follow(state.clone(), follow_from, shutdown.clone()));
    tasks.spawn(heartbeat(state.clone(), shutdown.clone()));
    let is_edge = tunnel.is_some();
    let tunnel_task = match (tunnel, server_tls) {
        (Some(listener), Some(tls)) => Some(tokio::spawn(tunnel::serve(
            state.clone(),
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            shutdown.clone(),
        ))),
        _ => None,
    };
    let mounts = mounts(state.clone());
    tasks.spawn(grpc::serve(
        state.clone(),
        grpc,
        is_edge,
        mounts.grpc,
        shutdown.clone(),
    ));
    tasks.spawn(http::serve(
        state.clone(),
        http,
        is_edge,
        mounts.http,
        shutdown.clone(),
    ));

    shutdown.cancelled().await;
    state.shutting_down.cancel();
    tracing::info!(
        sessions = state.sessions.len(),
        "edge shutting down: draining tunnels"
    );
    // Sessions see the same token and end themselves; wait for their closing records.
    if let Some(t) = tunnel_task {
        let _ = t.await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let attached = |s: &Arc<session::Session>| s.attached.load(Ordering::Acquire);
    while state.sessions.all().iter().any(attached) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in state.sessions.all() {
        // Attached sessions that did not finish in time, and pending ones.
        state
            .finish_session(&s, CloseReason::EdgeShutdown, "the edge is shutting down")
            .await;
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await;
    if let Err(e) = state.tap.flush().await {
        tracing::error!(error = %e, "final flush of the traffic log failed");
    }
    drop(tap);
    drop(state);
    let _ = tokio::time::timeout(Duration::from_secs(5), tap_task).await;
    tracing::info!("edge stopped");
    Ok(())
}

/// Reads the log once: re-applies revocations and closes the sessions an earlier run
/// of this edge left open (reason `edge_restart`). Returns where following starts.
async fn recover(state: &Arc<EdgeState>) -> Result<Offsets, EdgeError> {
    let end = state.log.end().await?;
    let mut open: HashMap<Uuid, Record> = HashMap::new();
    let mut sub = cloudtap_recorder::read_to(state.log.as_ref(), end.clone());
    while let Some(entry) = sub.next().await {
        let entry = entry?;
        let r = entry.record;
        match &r.body {
            Body::SessionOpened(o) if o.edge == state.name => {
                open.insert(r.chain_id, r);
            }
            Body::SessionClosed(_) => {
                open.remove(&r.chain_id);
            }
            Body::Control(c) if c.action == cloudtap_schemas::ControlAction::Revoke => {
                state
                    .revoked
                    .lock()
                    .expect("revocations poisoned")
                    .insert(control::canonical_id(&c.subject));
            }
            _ => {
                if let Some(last) = open.get_mut(&r.chain_id) {
                    *last = r;
                }
            }
        }
    }
    for (chain, last) in open {
        tracing::info!(session_id = %chain, "closing session left open by an earlier run (edge_restart)");
        let gaps = Arc::new(GapCounter::default());
        if state
            .tap
            .open_chain(chain, Some(last), gaps.clone(), ChainMeta::default())
            .await
            .is_err()
        {
            break;
        }
        let closed = Body::SessionClosed(SessionClosed {
            reason: CloseReason::EdgeRestart,
            detail: "the edge restarted while the session was open".into(),
            bytes_up: 0,
            bytes_down: 0,
            streams: 0,
        });
        let _ = state
            .tap
            .record(chain, closed, Backpressure::Block, &gaps)
            .await;
        let _ = state.tap.close_chain(chain).await;
    }
    Ok(end)
}

/// Follows the log for control records from any edge.
/// Follows the log for control records from any edge. A failed subscription is
/// retried (after 1 s) from just after the last record applied; meanwhile `/healthz`
/// reports the edge degraded, since revocations and closes may not apply.
async fn follow(state: Arc<EdgeState>, from: Offsets, shutdown: CancellationToken) {
    let mut next = from;
    loop {
        let mut sub = state.log.subscribe_kinds(next.clone(), &["control"]);
        loop {
            let entry = tokio::select! {
                e = sub.next() => e,
                _ = shutdown.cancelled() => return,
            };
            match entry {
                Some(Ok(e)) => {
                    state.follow_failed.store(false, Ordering::Release);
                    next.advance(e.position);
                    if let Body::Control(c) = &e.record.body {
                        state.apply_control(c);
                    }
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "following the traffic log failed; retrying in 1 s");
                    break;
                }
                None => {
                    tracing::error!("the traffic log subscription ended; retrying in 1 s");
                    break;
                }
            }
        }
        state.follow_failed.store(true, Ordering::Release);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn heartbeat(state: Arc<EdgeState>, shutdown: CancellationToken) {
    let mut tick =
        tokio::time::interval(Duration::from_secs(state.cfg.limits.heartbeat_secs.max(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        state
            .edge_record(Body::Heartbeat(Heartbeat {
                edge: state.name.clone(),
                open_sessions: state.sessions.len() as u64,
            }))
            .await;
    }
}
