//! The replay role: `cloudtap.replay.v1.ReplayService/Run` and `POST /v1/replay-runs`,
//! on the edge's listeners in `cloudtapd all` or alone as `cloudtapd replay`. It runs
//! replays for automation under the service's own identity (a client certificate):
//! the caller must be able to read the source session, and so must the service
//! identity, which must also be allowed to reach the target — the edge checks that
//! when the service opens the replay's tunnel, as for anyone.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use cloudtap_edge::EdgeState;
use cloudtap_edge::replays::{Recorded, ReplayReport};
use cloudtap_proto::replay::v1 as rpb;
use cloudtap_proto::tunnel::v1 as pb;
use cloudtap_query::service::Access;
use cloudtap_query::{QueryEngine, QueryError, Reader};
use cloudtap_schemas::Record;
use serde::Deserialize;
use tonic::transport::Endpoint;

use crate::query_role::EdgeAccess;
use crate::replay_run::{self, Ask, Edge};

/// Where the service reaches an edge, and as whom.
#[derive(Clone)]
pub struct Identity {
    /// The edge's gRPC control plane (`http://host:port`) and tunnel port.
    pub edge_grpc: String,
    pub edge_tunnel: String,
    pub tls: Arc<rustls::ClientConfig>,
}

/// Runs replays; shared by the gRPC and HTTP endpoints.
pub struct Runner {
    engine: Arc<QueryEngine>,
    access: EdgeAccess,
    me: Identity,
    /// `[replay.headers]`: per target, set on every request unless the run sets them.
    headers: cloudtap_edge::config::ReplayHeaders,
    /// The service's user token and its expiry (unix seconds).
    token: tokio::sync::Mutex<Option<(String, i64)>>,
}

/// Why a run was refused or failed.
#[derive(Debug)]
pub struct RunError {
    pub code: &'static str,
    pub message: String,
}

impl RunError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn status(&self) -> (StatusCode, tonic::Code) {
        match self.code {
            "unauthenticated" => (StatusCode::UNAUTHORIZED, tonic::Code::Unauthenticated),
            "forbidden" => (StatusCode::FORBIDDEN, tonic::Code::PermissionDenied),
            "not_found" => (StatusCode::NOT_FOUND, tonic::Code::NotFound),
            "invalid_argument" => (StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument),
            _ => (StatusCode::BAD_GATEWAY, tonic::Code::Unavailable),
        }
    }
}

impl From<QueryError> for RunError {
    fn from(e: QueryError) -> Self {
        let code = match &e {
            QueryError::Unauthenticated(_) => "unauthenticated",
            QueryError::Forbidden(_) => "forbidden",
            _ => "failed",
        };
        RunError::new(code, e.to_string())
    }
}

impl Runner {
    pub fn new(engine: Arc<QueryEngine>, state: Arc<EdgeState>, me: Identity) -> Arc<Self> {
        Arc::new(Self {
            engine,
            headers: state.config().replay.headers.clone(),
            access: EdgeAccess(state),
            me,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The service's own token: a login over the tunnel port with its certificate,
    /// again once less than a minute of it is left.
    async fn token(&self) -> Result<String, RunError> {
        let mut t = self.token.lock().await;
        if let Some((tok, exp)) = &*t
            && *exp > cloudtap_edge::token::now_unix() + 60
        {
            return Ok(tok.clone());
        }
        let reply = cloudtap_edge::client::login(&self.me.tls, &self.me.edge_tunnel, vec![], 0)
            .await
            .map_err(|e| {
                RunError::new(
                    "failed",
                    format!("the replay service cannot log in at the edge: {e}"),
                )
            })?;
        if !reply.ok {
            return Err(RunError::new(
                "forbidden",
                format!(
                    "the edge refused the replay service's login: {}",
                    reply.error
                ),
            ));
        }
        *t = Some((reply.token.clone(), reply.expires_unix));
        Ok(reply.token)
    }

    async fn rows(
        &self,
        reader: &Reader,
        session: &str,
        sql: &str,
    ) -> Result<Vec<Record>, RunError> {
        rows(&self.engine, reader, session, sql).await
    }

    pub async fn run(
        &self,
        authorization: Option<&str>,
        req: RunBody,
    ) -> Result<cloudtap_replay::Report, RunError> {
        let caller = self.access.reader(authorization).await?;
        let id = uuid::Uuid::parse_str(req.source_session.trim())
            .map_err(|_| {
                RunError::new(
                    "invalid_argument",
                    format!("{:?} is not a session id (a UUID)", req.source_session),
                )
            })?
            .hyphenated()
            .to_string();
        let mut ask = Ask {
            target: req.target.filter(|t| !t.is_empty()),
            speed: req.speed.unwrap_or_default(),
            concurrency: req.concurrency.filter(|c| *c > 0).unwrap_or(8),
            only: req.only.unwrap_or_default(),
            headers: req.headers,
            ignore_headers: req.ignore_headers,
            allow_writes: req.allow_writes,
            dry_run: req.dry_run,
            timeout: Duration::from_millis(req.timeout_ms.filter(|t| *t > 0).unwrap_or(10_000)),
        };
        replay_run::options(&ask)
            .map_err(|e| RunError::new("invalid_argument", format!("{e:#}")))?;
        // The caller must be able to read the session: the same rule as `query`.
        let visible = self
            .rows(
                &caller,
                &id,
                &format!(
                    "SELECT * FROM events WHERE session_id = '{id}' AND kind = 'session_opened'"
                ),
            )
            .await?;
        self.access
            .0
            .audit(
                &caller.identity,
                "replay_run",
                format!(
                    "source={id} target={} allowed={}",
                    ask.target.as_deref().unwrap_or("(recorded)"),
                    !visible.is_empty()
                ),
            )
            .await;
        if visible.is_empty() {
            return Err(RunError::new(
                "not_found",
                format!("no session {id} that you may read"),
            ));
        }
        // Credentials from `[replay.headers]` for the target sent to, unless the run
        // gives its own.
        let target = match (&ask.target, &visible[0].body) {
            (Some(t), _) => t.clone(),
            (None, cloudtap_schemas::Body::SessionOpened(o)) => o.target.clone(),
            (None, _) => String::new(),
        };
        if let Some(configured) = self.headers.0.get(&target) {
            let given: Vec<String> = ask
                .headers
                .iter()
                .filter_map(|h| {
                    h.split_once(':')
                        .map(|(n, _)| n.trim().to_ascii_lowercase())
                })
                .collect();
            ask.headers.extend(
                configured
                    .iter()
                    .filter(|h| {
                        h.split_once(':')
                            .is_none_or(|(n, _)| !given.contains(&n.trim().to_ascii_lowercase()))
                    })
                    .cloned(),
            );
        }
        // The caller must also be allowed to reach the target: else the service would
        // send their recording where they may not (with its own credentials).
        let caller_auth = cloudtap_edge::control::Caller::from_authorization(authorization);
        self.access
            .0
            .may_reach(&caller_auth, &target)
            .await
            .map_err(|r| RunError::new("forbidden", r.message))?;
        let mut token = self.token().await?;
        let me = match self.access.reader(Some(&format!("Bearer {token}"))).await {
            // Revoked or otherwise refused: log in once more.
            Err(QueryError::Unauthenticated(_)) => {
                *self.token.lock().await = None;
                token = self.token().await?;
                self.access.reader(Some(&format!("Bearer {token}"))).await?
            }
            r => r?,
        };
        let mut records = Vec::new();
        for sql in replay_run::fetch_sql(&id) {
            records.extend(self.rows(&me, &id, &sql).await?);
        }
        if records.is_empty() {
            return Err(RunError::new(
                "forbidden",
                format!(
                    "the replay service's identity {:?} may not read session {id}; grant it read rights in [policy] (rules or auditors)",
                    me.identity
                ),
            ));
        }
        let edge = ServiceEdge {
            runner: self,
            engine: self.engine.clone(),
            reader: me,
        };
        let mut report = replay_run::replay(
            replay_run::Via::Edge(&edge),
            &id,
            &records,
            &ask,
            None,
            |line| tracing::info!(requested_by = %caller.identity, "{line}"),
        )
        .await
        .map_err(|e| {
            let refused = e.chain().any(|c| c.to_string().contains("policy"));
            RunError::new(
                if refused { "forbidden" } else { "failed" },
                format!("{e:#}"),
            )
        })?;
        // The caller sees the findings as they are stored: redacted.
        for d in &mut report.findings {
            self.access.0.redact_finding(d);
        }
        Ok(report)
    }
}

async fn rows(
    engine: &QueryEngine,
    reader: &Reader,
    session: &str,
    sql: &str,
) -> Result<Vec<Record>, RunError> {
    let out = engine.execute(reader, sql, None).await?;
    let (_, batches, truncated) = cloudtap_query::service::collect(out).await?;
    replay_run::records_of(session, &batches, truncated).map_err(|e| {
        let code = if truncated {
            "invalid_argument"
        } else {
            "failed"
        };
        RunError::new(code, format!("{e:#}"))
    })
}

/// The edge as the replay service reaches it: gRPC, with the service's token.
struct ServiceEdge<'a> {
    runner: &'a Runner,
    engine: Arc<QueryEngine>,
    reader: Reader,
}

impl ServiceEdge<'_> {
    async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        Endpoint::from_shared(self.runner.me.edge_grpc.clone())?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the edge's control plane at {}",
                    self.runner.me.edge_grpc
                )
            })
    }

    /// `msg` with the service's token, fetched again when it is running out (a run
    /// at `--speed 1` can outlast one).
    async fn req<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let token = self
            .runner
            .token()
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        Ok(bearer(msg, &token))
    }
}

fn bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

#[async_trait::async_trait]
impl Edge for ServiceEdge<'_> {
    async fn open_tunnel(
        &self,
        target: &str,
        replay_of: &str,
    ) -> anyhow::Result<pb::OpenTunnelResponse> {
        let mut c = pb::tunnel_service_client::TunnelServiceClient::new(self.channel().await?);
        Ok(c.open_tunnel(
            self.req(pb::OpenTunnelRequest {
                target: target.into(),
                replay_of: replay_of.into(),
            })
            .await?,
        )
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "the edge refused the replay's tunnel to {target}: {}",
                s.message()
            )
        })?
        .into_inner())
    }

    async fn record(&self, report: ReplayReport) -> anyhow::Result<Recorded> {
        let mut c = rpb::replay_recorder_client::ReplayRecorderClient::new(self.channel().await?)
            .max_encoding_message_size(64 << 20);
        let r = c
            .record(self.req(rpb::RecordRequest::from(report)).await?)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        Ok(r.into())
    }

    async fn close(&self, session_id: &str) {
        let req = self
            .req(pb::CloseTunnelRequest {
                selector: session_id.into(),
            })
            .await;
        if let (Ok(ch), Ok(req)) = (self.channel().await, req) {
            let mut c = pb::tunnel_service_client::TunnelServiceClient::new(ch);
            let _ = c.close_tunnel(req).await;
        }
    }

    async fn renew(&self, session_id: &str, session_token: &str) -> anyhow::Result<(String, i64)> {
        let mut c = pb::tunnel_service_client::TunnelServiceClient::new(self.channel().await?);
        let r = c
            .renew_token(bearer(
                pb::RenewTokenRequest {
                    session_id: session_id.into(),
                },
                session_token,
            ))
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        Ok((r.session_token, r.expires_unix))
    }

    fn tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        Ok(self.runner.me.tls.clone())
    }

    async fn session_records(&self, session: &str) -> anyhow::Result<Vec<Record>> {
        let mut out = Vec::new();
        for sql in &replay_run::fetch_sql(session)[..2] {
            out.extend(
                rows(&self.engine, &self.reader, session, sql)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?,
            );
        }
        Ok(out)
    }
}

/// A run as `POST /v1/replay-runs` takes it (the fields of `RunRequest`). Not `Debug`:
/// `headers` may hold credentials.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    pub source_session: String,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub speed: Option<String>,
    #[serde(default)]
    pub concurrency: Option<usize>,
    #[serde(default)]
    pub only: Option<String>,
    #[serde(default)]
    pub headers: Vec<String>,
    #[serde(default)]
    pub ignore_headers: Vec<String>,
    #[serde(default)]
    pub allow_writes: bool,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

struct Grpc(Arc<Runner>);

#[tonic::async_trait]
impl rpb::replay_service_server::ReplayService for Grpc {
    async fn run(
        &self,
        req: tonic::Request<rpb::RunRequest>,
    ) -> Result<tonic::Response<rpb::RunResponse>, tonic::Status> {
        let auth = cloudtap_query::service::authorization(&req);
        let r = req.into_inner();
        let body = RunBody {
            source_session: r.source_session,
            target: Some(r.target),
            speed: Some(r.speed),
            concurrency: Some(r.concurrency as usize),
            only: Some(r.only),
            headers: r.headers,
            ignore_headers: r.ignore_headers,
            allow_writes: r.allow_writes,
            dry_run: r.dry_run,
            timeout_ms: Some(u64::from(r.timeout_ms)),
        };
        match self.0.run(auth.as_deref(), body).await {
            Ok(report) => Ok(tonic::Response::new(rpb::RunResponse {
                run_id: report.run_id.clone(),
                replay_session: report.replay_session.clone(),
                differing: report.differing as u64,
                report_json: serde_json::to_string(&report).unwrap_or_default(),
            })),
            Err(e) => Err(tonic::Status::new(e.status().1, e.message)),
        }
    }
}

async fn run_http(
    State(r): State<Arc<Runner>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let fail = |e: RunError| {
        (
            e.status().0,
            Json(serde_json::json!({"code": e.code, "error": e.message})),
        )
            .into_response()
    };
    let body: RunBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return fail(RunError::new(
                "invalid_argument",
                format!("request body is not valid JSON for this call: {e}"),
            ));
        }
    };
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    match r.run(auth, body).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => fail(e),
    }
}

/// The HTTP routes the replay role serves.
pub const HTTP_ROUTES: &[(&str, &str)] = &[("POST", "/v1/replay-runs")];

/// `m` with the replay service's HTTP route and gRPC service added.
pub fn add(m: cloudtap_edge::Mounts, runner: Arc<Runner>) -> cloudtap_edge::Mounts {
    let http = axum::Router::new()
        .route("/v1/replay-runs", post(run_http))
        .with_state(runner.clone());
    let grpc = rpb::replay_service_server::ReplayServiceServer::new(Grpc(runner));
    cloudtap_edge::Mounts {
        http: Some(match m.http {
            Some(h) => h.merge(http),
            None => http,
        }),
        grpc: Some(match m.grpc {
            Some(r) => r.add_service(grpc),
            None => tonic::service::Routes::new(grpc),
        }),
    }
}

/// The service's client TLS: `[replay] cert/key`, else (no `[tls]`: the development
/// PKI) a certificate for `cloudtap-replay` issued by the development CA. `None` when
/// a configured deployment names none: then no replay service runs.
pub fn identity_tls(
    cfg: &cloudtap_edge::config::EdgeConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    for (target, headers) in &cfg.replay.headers.0 {
        for h in headers {
            cloudtap_replay::plan::parse_header(h)
                .with_context(|| format!("[replay.headers] {target}"))?;
        }
    }
    let pki = cloudtap_edge::pki::DevPki::new(data_dir);
    let ca = match &cfg.tls {
        Some(t) => t.client_ca.clone(),
        None => pki.ca_cert(),
    };
    let (cert, key) = match (&cfg.replay.cert, &cfg.replay.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) if cfg.tls.is_none() => pki
            .ensure_replay_identity()
            .context("cannot issue the replay service's development certificate")?,
        (None, None) => return Ok(None),
        _ => anyhow::bail!("[replay] needs both cert and key"),
    };
    Ok(Some(cloudtap_edge::pki::client_config(
        &ca, &cert, &key, false,
    )?))
}
