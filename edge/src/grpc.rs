//! The gRPC control plane (`cloudtap.tunnel.v1.TunnelService`).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use cloudtap_proto::replay::v1 as rpb;
use cloudtap_proto::tunnel::v1 as pb;
use pb::tunnel_service_server::{TunnelService, TunnelServiceServer};
use rpb::replay_recorder_server::{ReplayRecorder, ReplayRecorderServer};

use crate::EdgeState;
use crate::control::{Caller, Refusal};
use crate::tap::LiveRecord;

pub struct Service {
    state: Arc<EdgeState>,
}

fn caller<T>(req: &Request<T>) -> Caller {
    Caller::from_authorization(
        req.metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
}

pub fn service(state: Arc<EdgeState>) -> TunnelServiceServer<Service> {
    TunnelServiceServer::new(Service { state })
}

/// `cloudtap.replay.v1.ReplayRecorder`: where replay runs record their findings.
pub fn replay_recorder(state: Arc<EdgeState>) -> ReplayRecorderServer<Recorder> {
    // A run's findings are at most MAX_FINDINGS of a few KiB each.
    ReplayRecorderServer::new(Recorder { state }).max_decoding_message_size(64 << 20)
}

pub struct Recorder {
    state: Arc<EdgeState>,
}

#[tonic::async_trait]
impl ReplayRecorder for Recorder {
    async fn record(
        &self,
        req: Request<rpb::RecordRequest>,
    ) -> Result<Response<rpb::RecordResponse>, Status> {
        let c = caller(&req);
        let done = self
            .state
            .record_replay(&c, req.into_inner().into())
            .await?;
        Ok(Response::new(rpb::RecordResponse {
            run_id: done.run_id,
            records: done.records,
        }))
    }
}

pub async fn serve(
    state: Arc<EdgeState>,
    listener: TcpListener,
    edge: bool,
    extra: Option<tonic::service::Routes>,
    shutdown: CancellationToken,
) {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut routes = extra.unwrap_or_default();
    if edge {
        routes = routes
            .add_service(replay_recorder(state.clone()))
            .add_service(service(state));
    }
    if let Err(e) = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "gRPC control plane stopped");
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl TunnelService for Service {
    async fn open_tunnel(
        &self,
        req: Request<pb::OpenTunnelRequest>,
    ) -> Result<Response<pb::OpenTunnelResponse>, Status> {
        let c = caller(&req);
        let r = req.into_inner();
        Ok(Response::new(
            self.state.open_tunnel(&c, &r.target, &r.replay_of).await?,
        ))
    }

    async fn renew_token(
        &self,
        req: Request<pb::RenewTokenRequest>,
    ) -> Result<Response<pb::RenewTokenResponse>, Status> {
        let c = caller(&req);
        Ok(Response::new(
            self.state.renew(&c, &req.into_inner().session_id).await?,
        ))
    }

    async fn close_tunnel(
        &self,
        req: Request<pb::CloseTunnelRequest>,
    ) -> Result<Response<pb::CloseTunnelResponse>, Status> {
        let c = caller(&req);
        Ok(Response::new(
            self.state.close(&c, &req.into_inner().selector).await?,
        ))
    }

    async fn list_targets(
        &self,
        req: Request<pb::ListTargetsRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        let c = caller(&req);
        Ok(Response::new(self.state.list_targets(&c).await?))
    }

    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let c = caller(&req);
        Ok(Response::new(
            self.state.issue_token(&c, req.into_inner()).await?,
        ))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let c = caller(&req);
        let r = req.into_inner();
        Ok(Response::new(
            self.state.revoke(&c, &r.token_id, &r.reason).await?,
        ))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let c = caller(&req);
        let mut rx = self.state.watch(&c, req.into_inner()).await?;
        let stream = async_stream(move |tx| async move {
            while let Some(ev) = rx.recv().await {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task (keeps the dependency list short: no async-stream crate).
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Event, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

impl EdgeState {
    /// Live events for a caller: authenticated, filtered, and scoped to what the caller
    /// may read (admins and auditors see everything, others the sessions of targets
    /// they may reach).
    pub async fn watch(
        &self,
        caller: &Caller,
        filter: pb::WatchEventsRequest,
    ) -> Result<tokio::sync::mpsc::Receiver<pb::Event>, Refusal> {
        let claims = self.authenticate(caller, "watch_events", "").await?;
        let subject = claims.sub.clone();
        // Reading live traffic is itself audited.
        self.edge_record(cloudtap_schemas::Body::Audit(cloudtap_schemas::Audit {
            actor: subject.clone(),
            action: "watch_events".into(),
            detail: format!(
                "session={:?} target={:?} kinds={:?}",
                filter.session_id, filter.target, filter.kinds
            ),
        }))
        .await;
        // The watch lives as long as the token that opened it.
        let expires =
            std::time::Duration::from_secs((claims.exp - crate::token::now_unix()).max(0) as u64);
        let token_ids = [
            claims.jti.clone(),
            claims.parent.clone().unwrap_or_default(),
        ];
        let weak = self.weak.clone();
        let shutting_down = self.shutting_down.clone();
        let admin = self.policy.reads_all(&subject);
        let mut live = self.tap.subscribe_live();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let policy = self.policy.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(expires);
            tokio::pin!(deadline);
            loop {
                let next = tokio::select! {
                    r = live.recv() => r,
                    // The watcher went away: stop, even if no event matches for hours.
                    _ = tx.closed() => return,
                    _ = &mut deadline => return,
                    // End the stream so the servers' graceful shutdown can finish.
                    _ = shutting_down.cancelled() => return,
                };
                let revoked = weak
                    .upgrade()
                    .is_none_or(|s| token_ids.iter().any(|t| !t.is_empty() && s.is_revoked(t)));
                if revoked {
                    return;
                }
                let rec = match next {
                    Ok(r) => r,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "a live watcher fell behind; events were skipped"
                        );
                        continue;
                    }
                    Err(_) => return,
                };
                let readable = admin
                    || (!rec.meta.target.is_empty()
                        && (rec.meta.identity == subject
                            || policy.allows(&subject, &rec.meta.target)));
                if readable && matches(&filter, &rec) && tx.send(to_event(&rec)).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

fn matches(f: &pb::WatchEventsRequest, r: &LiveRecord) -> bool {
    let kind = r.record.kind();
    let session_ok = f.session_id.is_empty()
        || r.meta
            .session_id
            .is_some_and(|s| s.to_string() == f.session_id);
    let target_ok = f.target.is_empty() || r.meta.target == f.target;
    let kind_ok = if f.kinds.is_empty() {
        kind != "frame"
    } else {
        f.kinds.iter().any(|k| k == kind)
    };
    session_ok && target_ok && kind_ok
}

/// One event as watchers see it, with a one-line summary.
pub fn to_event(r: &LiveRecord) -> pb::Event {
    use cloudtap_schemas::Body;
    let summary = match &r.record.body {
        Body::SessionOpened(o) => format!(
            "session opened by {} to {} ({})",
            o.identity, o.target, o.upstream
        ),
        Body::SessionClosed(c) => format!(
            "session closed: {} (up {} B, down {} B, {} streams)",
            c.reason, c.bytes_up, c.bytes_down, c.streams
        ),
        Body::StreamOpened(s) => format!(
            "stream {} opened from {} to {}",
            s.stream_id, s.client_addr, s.upstream_addr
        ),
        Body::StreamClosed(s) if s.error.is_empty() => format!(
            "stream {} closed (up {} B, down {} B)",
            s.stream_id, s.bytes_up, s.bytes_down
        ),
        Body::StreamClosed(s) => format!("stream {} closed: {}", s.stream_id, s.error),
        Body::Frame(f) => format!(
            "stream {} {} {} B at {}",
            f.stream_id,
            f.direction.as_str(),
            f.length,
            f.offset
        ),
        Body::Gap(g) => format!(
            "gap: {} records ({} B) not logged: {}",
            g.dropped_records, g.dropped_bytes, g.reason
        ),
        Body::PolicyDecision(p) if p.allowed => format!(
            "{} allowed for {:?} on {:?}",
            p.action, p.identity, p.target
        ),
        Body::PolicyDecision(p) => format!(
            "{} refused for {:?} on {:?}: {} ({})",
            p.action, p.identity, p.target, p.code, p.reason
        ),
        Body::Heartbeat(h) => format!(
            "heartbeat from {} ({} open sessions)",
            h.edge, h.open_sessions
        ),
        Body::Control(c) => format!("control {} {} by {}", c.action.as_str(), c.subject, c.actor),
        Body::Audit(a) => format!("{} by {}: {}", a.action, a.actor, a.detail),
        Body::HttpExchange(x) => crate::mirror::summary(x),
        Body::ReplayDiff(d) => format!(
            "replay of {}: {} {} {} {}",
            d.source_session, d.kind, d.method, d.path, d.field
        ),
    };
    pb::Event {
        kind: r.record.kind().into(),
        chain_id: r.record.chain_id.to_string(),
        seq: r.record.seq,
        ts_unix_nanos: r.record.ts_unix_nanos,
        session_id: r.meta.session_id.map(|s| s.to_string()).unwrap_or_default(),
        target: r.meta.target.clone(),
        identity: r.meta.identity.clone(),
        summary,
        exchange: match &r.record.body {
            Body::HttpExchange(x) => Some(exchange_summary(x)),
            _ => None,
        },
    }
}

/// What live views show of an exchange record.
pub fn exchange_summary(x: &cloudtap_schemas::HttpExchange) -> pb::ExchangeSummary {
    pb::ExchangeSummary {
        phase: x.phase.as_str().into(),
        stream_id: x.stream_id,
        exchange_index: x.exchange_index,
        message_index: x.message_index,
        protocol: x.protocol.clone(),
        method: x.method.clone(),
        authority: x.authority.clone(),
        path: x.path.clone(),
        query: x.query.clone(),
        status: x.status,
        duration_ms: if x.end_unix_nanos > 0 {
            (x.end_unix_nanos - x.start_unix_nanos) as f64 / 1e6
        } else {
            0.0
        },
        grpc_service: x.grpc_service.clone(),
        grpc_method: x.grpc_method.clone(),
        grpc_status: x.grpc_status.clone(),
        request_bytes: x.request_body.size,
        response_bytes: x.response_body.size,
        note: x.note.clone(),
    }
}

/// An event as one JSON object (the HTTP event stream and `cloudtapctl -o json`).
pub fn event_json(ev: &pb::Event) -> serde_json::Value {
    let mut v = serde_json::json!({
        "kind": ev.kind, "chain_id": ev.chain_id, "seq": ev.seq, "ts_unix_nanos": ev.ts_unix_nanos,
        "session_id": ev.session_id, "target": ev.target, "identity": ev.identity, "summary": ev.summary,
    });
    if let Some(x) = &ev.exchange {
        v["exchange"] = serde_json::json!({
            "phase": x.phase, "stream_id": x.stream_id, "exchange_index": x.exchange_index,
            "message_index": x.message_index, "protocol": x.protocol, "method": x.method,
            "authority": x.authority, "path": x.path, "query": x.query, "status": x.status,
            "duration_ms": x.duration_ms, "grpc_service": x.grpc_service,
            "grpc_method": x.grpc_method, "grpc_status": x.grpc_status,
            "request_bytes": x.request_bytes, "response_bytes": x.response_bytes, "note": x.note,
        });
    }
    v
}
