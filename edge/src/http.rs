//! The HTTP API: the control plane under `/v1/` (the seed's `/proxy`, `/close`,
//! `/targets` as aliases), `/healthz` and `/metrics`. `docs/api/openapi.yaml`
//! documents exactly [`ROUTES`]; a test checks both directions against a live edge.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use cloudtap_proto::tunnel::v1 as pb;

use crate::EdgeState;
use crate::control::{Caller, Refusal};

/// Every (method, path) this API serves.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/proxy"),
    ("POST", "/proxy"),
    ("POST", "/v1/renew"),
    ("POST", "/v1/close"),
    ("POST", "/close"),
    ("GET", "/v1/targets"),
    ("GET", "/targets"),
    ("POST", "/v1/tokens"),
    ("POST", "/v1/tokens/revoke"),
    ("POST", "/v1/replays"),
    ("GET", "/v1/events"),
    ("GET", "/v1/events/ws"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
];

pub fn router(state: Arc<EdgeState>) -> Router {
    Router::new()
        .route("/v1/proxy", post(open_tunnel))
        .route("/proxy", post(open_tunnel))
        .route("/v1/renew", post(renew))
        .route("/v1/close", post(close))
        .route("/close", post(close))
        .route("/v1/targets", get(targets))
        .route("/targets", get(targets))
        .route("/v1/tokens", post(issue))
        .route("/v1/tokens/revoke", post(revoke))
        .route(
            "/v1/replays",
            post(record_replay).layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
        )
        .route("/v1/events", get(events))
        .route("/v1/events/ws", get(events_ws))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// What a node of another role serves of this API: health and metrics only.
pub fn node_router(state: Arc<EdgeState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

pub async fn serve(
    state: Arc<EdgeState>,
    listener: TcpListener,
    edge: bool,
    extra: Option<Router>,
    shutdown: CancellationToken,
) {
    let own = if edge {
        router(state)
    } else {
        node_router(state)
    };
    let app = match extra {
        Some(extra) => own.merge(extra),
        None => own,
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "HTTP API stopped");
    }
}

/// Error body of every failed call.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub error: String,
}

struct ApiFailure(StatusCode, ApiError);

impl From<Refusal> for ApiFailure {
    fn from(r: Refusal) -> Self {
        ApiFailure(
            r.http_status(),
            ApiError {
                code: r.code.into(),
                error: r.message,
            },
        )
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> ApiFailure {
    ApiFailure(
        StatusCode::BAD_REQUEST,
        ApiError {
            code: "bad_request".into(),
            error: msg.into(),
        },
    )
}

async fn not_found() -> ApiFailure {
    ApiFailure(
        StatusCode::NOT_FOUND,
        ApiError {
            code: "not_found".into(),
            error: "no such API path; see docs/api/openapi.yaml".into(),
        },
    )
}

fn caller(headers: &HeaderMap) -> Caller {
    Caller::from_authorization(headers.get("authorization").and_then(|v| v.to_str().ok()))
}

/// A JSON body that reports a malformed request in the API's own error shape.
fn parse<T: serde::de::DeserializeOwned>(body: &axum::body::Bytes) -> Result<T, ApiFailure> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("request body is not valid JSON for this call: {e}")))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OpenTunnelBody {
    pub target: String,
    /// The session a replay re-sends (`cloudtapctl replay`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replay_of: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OpenTunnelReply {
    pub session_id: String,
    pub tunnel_addr: String,
    pub session_token: String,
    pub expires_unix: i64,
    pub target: String,
    pub identity: String,
    pub token_id: String,
}

impl From<pb::OpenTunnelResponse> for OpenTunnelReply {
    fn from(r: pb::OpenTunnelResponse) -> Self {
        Self {
            session_id: r.session_id,
            tunnel_addr: r.tunnel_addr,
            session_token: r.session_token,
            expires_unix: r.expires_unix,
            target: r.target,
            identity: r.identity,
            token_id: r.token_id,
        }
    }
}

async fn open_tunnel(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<OpenTunnelReply>, ApiFailure> {
    let b: OpenTunnelBody = parse(&body)?;
    Ok(Json(
        s.open_tunnel(&caller(&headers), &b.target, &b.replay_of)
            .await?
            .into(),
    ))
}

async fn record_replay(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<crate::replays::Recorded>, ApiFailure> {
    let b: crate::replays::ReplayReport = parse(&body)?;
    Ok(Json(s.record_replay(&caller(&headers), b).await?))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RenewBody {
    pub session_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RenewReply {
    pub session_token: String,
    pub expires_unix: i64,
    pub token_id: String,
}

async fn renew(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<RenewReply>, ApiFailure> {
    let b: RenewBody = parse(&body)?;
    let r = s.renew(&caller(&headers), &b.session_id).await?;
    Ok(Json(RenewReply {
        session_token: r.session_token,
        expires_unix: r.expires_unix,
        token_id: r.token_id,
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CloseBody {
    pub selector: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CloseReply {
    pub session_ids: Vec<String>,
}

async fn close(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<CloseReply>, ApiFailure> {
    let b: CloseBody = parse(&body)?;
    let r = s.close(&caller(&headers), &b.selector).await?;
    Ok(Json(CloseReply {
        session_ids: r.session_ids,
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    pub upstream: String,
    pub upstream_tls: bool,
    pub allowed: bool,
    pub on_log_backpressure: String,
    pub live_sessions: u32,
}

impl From<pb::Target> for TargetInfo {
    fn from(t: pb::Target) -> Self {
        Self {
            name: t.name,
            upstream: t.upstream,
            upstream_tls: t.upstream_tls,
            allowed: t.allowed,
            on_log_backpressure: t.on_log_backpressure,
            live_sessions: t.live_sessions,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TargetsReply {
    pub targets: Vec<TargetInfo>,
}

async fn targets(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
) -> Result<Json<TargetsReply>, ApiFailure> {
    let r = s.list_targets(&caller(&headers)).await?;
    Ok(Json(TargetsReply {
        targets: r.targets.into_iter().map(TargetInfo::from).collect(),
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IssueBody {
    pub subject: String,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub ttl_seconds: u64,
    #[serde(default)]
    pub cert_sha256: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IssueReply {
    pub token: String,
    pub token_id: String,
    pub expires_unix: i64,
}

async fn issue(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<IssueReply>, ApiFailure> {
    let b: IssueBody = parse(&body)?;
    let r = s
        .issue_token(
            &caller(&headers),
            pb::IssueTokenRequest {
                subject: b.subject,
                targets: b.targets,
                ttl_seconds: b.ttl_seconds,
                cert_sha256: b.cert_sha256,
                roles: b.roles,
            },
        )
        .await?;
    Ok(Json(IssueReply {
        token: r.token,
        token_id: r.token_id,
        expires_unix: r.expires_unix,
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RevokeBody {
    pub token_id: String,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RevokeReply {
    pub token_id: String,
    pub session_ids: Vec<String>,
}

async fn revoke(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<RevokeReply>, ApiFailure> {
    let b: RevokeBody = parse(&body)?;
    let r = s.revoke(&caller(&headers), &b.token_id, &b.reason).await?;
    Ok(Json(RevokeReply {
        token_id: r.token_id,
        session_ids: r.session_ids,
    }))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(default)]
    session: String,
    #[serde(default)]
    target: String,
    /// Comma-separated record kinds.
    #[serde(default)]
    kind: String,
}

/// Live events as server-sent events, one JSON object per event.
async fn events(
    State(s): State<Arc<EdgeState>>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiFailure> {
    let filter = pb::WatchEventsRequest {
        session_id: q.session,
        target: q.target,
        kinds: q
            .kind
            .split(',')
            .filter(|k| !k.is_empty())
            .map(String::from)
            .collect(),
    };
    let rx = s.watch(&caller(&headers), filter).await?;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let json = crate::grpc::event_json(&ev);
        Some((
            Ok::<_, Infallible>(
                SseEvent::default()
                    .event(ev.kind.clone())
                    .data(json.to_string()),
            ),
            rx,
        ))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Debug, Deserialize)]
struct WsQuery {
    #[serde(flatten)]
    filter: EventsQuery,
    /// Browsers cannot send an Authorization header with a WebSocket.
    #[serde(default)]
    access_token: String,
}

/// Live events over a WebSocket: one text message (an event as JSON) per event.
async fn events_ws(
    State(s): State<Arc<EdgeState>>,
    mut headers: HeaderMap,
    Query(q): Query<WsQuery>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Result<Response, ApiFailure> {
    use axum::extract::ws::{Message, Utf8Bytes};
    if !q.access_token.is_empty() && !headers.contains_key("authorization") {
        let v = format!("Bearer {}", q.access_token)
            .parse()
            .map_err(|_| Refusal::new("bad_token", "access_token is not a valid token"))?;
        headers.insert("authorization", v);
    }
    let filter = pb::WatchEventsRequest {
        session_id: q.filter.session,
        target: q.filter.target,
        kinds: q
            .filter
            .kind
            .split(',')
            .filter(|k| !k.is_empty())
            .map(String::from)
            .collect(),
    };
    // Authenticated and subscribed before the upgrade: a refusal is an HTTP answer.
    let mut rx = s.watch(&caller(&headers), filter).await?;
    Ok(ws.on_upgrade(move |mut socket| async move {
        let mut ping = tokio::time::interval(std::time::Duration::from_secs(15));
        ping.tick().await;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    let text = Utf8Bytes::from(crate::grpc::event_json(&ev).to_string());
                    if socket.send(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                _ = ping.tick() => {
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
                incoming = socket.recv() => match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
        let _ = socket.send(Message::Close(None)).await;
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub reason: String,
    pub log: String,
    pub open_sessions: usize,
}

async fn healthz(State(s): State<Arc<EdgeState>>) -> Response {
    let (ok, reason) = s.health();
    let body = Health {
        status: if ok { "ok" } else { "degraded" }.into(),
        reason,
        log: s.log.describe(),
        open_sessions: s.sessions.len(),
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(s): State<Arc<EdgeState>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.render_metrics(),
    )
        .into_response()
}
