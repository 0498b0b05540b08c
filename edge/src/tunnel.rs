//! The tunnel port: TLS 1.3 with client certificates, one hello, then yamux.
//!
//! A connection either logs in (gets a user token for its certificate's identity and
//! ends) or attaches to a session opened over the control plane. An attached session
//! accepts yamux streams; each starts with a [`StreamHeader`], is answered with a
//! [`StreamReply`], and is then copied to and from the target's pinned upstream
//! address, every chunk handed to the tap before it is forwarded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cloudtap_proto::tunnel::v1::{
    StreamHeader, StreamReply, TunnelHello, TunnelHelloReply, TunnelNotice, tunnel_hello,
};
use cloudtap_schemas::{
    Body, CloseReason, Direction, Frame, SessionClosed, SessionOpened, StreamClosed, StreamOpened,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use crate::EdgeState;
use crate::config::{Backpressure, TargetConfig};
use crate::control::Refusal;
use crate::mirror::gate::{Denied, Gate, Verdict};
use crate::mirror::{Kind, Mirror, Shaper, StreamCapture};
use crate::mux::{self, MuxStream};
use crate::session::Session;
use crate::tap::ChainMeta;
use crate::token::TokenError;
use crate::wire::{read_msg, write_msg};

/// Size of one read from either side, and so the largest frame record. Larger chunks
/// mean fewer records (hash, encode, CRC, wakeups) per byte forwarded.
pub(crate) const CHUNK: usize = 64 * 1024;
/// Buffer of a stream's first read (most idle streams never need more).
const FIRST_READ: usize = 4 * 1024;

/// Accepts tunnel connections until `shutdown` fires.
pub async fn serve(
    state: Arc<EdgeState>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(r) = handle_conn(state.clone(), tcp, peer, acceptor, shutdown).await {
                tracing::info!(%peer, code = r.code, "tunnel connection refused: {}", r.message);
            }
        });
    }
}

async fn handle_conn(
    state: Arc<EdgeState>,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) -> Result<(), Refusal> {
    let deadline = state.cfg.limits.handshake_timeout();
    let handshake = async {
        let mut tls = acceptor.accept(tcp).await.map_err(|e| {
            // Certificates from another CA end here; rustls has already told the client.
            Refusal::new("tls_handshake", format!("TLS handshake failed: {e}"))
        })?;
        let der = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .ok_or_else(|| {
                Refusal::new("no_client_certificate", "a client certificate is required")
            })?;
        let hello: TunnelHello = read_msg(&mut tls)
            .await
            .map_err(|e| Refusal::new("bad_hello", format!("bad hello: {e}")))?;
        Ok::<_, Refusal>((tls, der, hello))
    };
    let (mut tls, der, hello) = match tokio::time::timeout(deadline, handshake).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(r)) => {
            // Certificates from another CA, plain TCP, garbage hellos: refused before an
            // identity is known, and recorded all the same.
            state
                .decision("tunnel_handshake", "", "", Err(&r), "", "")
                .await;
            return Err(r);
        }
        Err(_) => {
            let r = Refusal::new(
                "handshake_timeout",
                format!("no TLS handshake and hello from {peer} within {deadline:?}"),
            );
            state
                .decision("tunnel_handshake", "", "", Err(&r), "", "")
                .await;
            return Err(r);
        }
    };
    let fingerprint = crate::pki::cert_fingerprint(&der);
    let Some(identity) = crate::pki::identity_of(&der) else {
        let r = Refusal::new(
            "no_identity",
            "the client certificate names no identity (subject CN, SAN e-mail or URI)",
        );
        reply_refusal(&mut tls, &r).await;
        return Err(r);
    };
    match hello.kind {
        Some(tunnel_hello::Kind::Login(req)) => {
            let reply = match state
                .login(&identity, &fingerprint, req.targets, req.ttl_seconds)
                .await
            {
                Ok(issued) => TunnelHelloReply {
                    ok: true,
                    token: issued.token,
                    token_id: issued.token_id,
                    expires_unix: issued.expires_unix,
                    identity,
                    ..Default::default()
                },
                Err(r) => refusal_reply(&r),
            };
            let _ = write_msg(&mut tls, &reply).await;
            let _ = tls.shutdown().await;
            Ok(())
        }
        Some(tunnel_hello::Kind::SessionToken(token)) => {
            let session = match state.attach(&token, &identity, &fingerprint).await {
                Ok(s) => {
                    if let Some(t) = crate::pki::not_after(&der) {
                        s.cert_not_after.store(t, Ordering::Release);
                    }
                    s
                }
                Err(r) => {
                    reply_refusal(&mut tls, &r).await;
                    return Err(r);
                }
            };
            let ok = TunnelHelloReply {
                ok: true,
                identity,
                ..Default::default()
            };
            if write_msg(&mut tls, &ok).await.is_err() {
                state
                    .finish_session(
                        &session,
                        CloseReason::ClientGone,
                        "client left during attach",
                    )
                    .await;
                return Ok(());
            }
            tracing::info!(session_id = %session.id, target = %session.target, %peer, "tunnel attached");
            run_session(state, session, tls, shutdown).await;
            Ok(())
        }
        None => {
            let r = Refusal::new(
                "bad_hello",
                "hello names neither a login nor a session token",
            );
            reply_refusal(&mut tls, &r).await;
            Err(r)
        }
    }
}

fn refusal_reply(r: &Refusal) -> TunnelHelloReply {
    TunnelHelloReply {
        ok: false,
        code: r.code.into(),
        error: r.message.clone(),
        ..Default::default()
    }
}

async fn reply_refusal<S: AsyncWrite + Unpin>(s: &mut S, r: &Refusal) {
    let _ = write_msg(s, &refusal_reply(r)).await;
    let _ = s.shutdown().await;
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        Refusal::new(e.code(), e.to_string())
    }
}

/// Runs an attached session until it ends, then writes its closing record.
async fn run_session<S>(
    state: Arc<EdgeState>,
    session: Arc<Session>,
    tls: S,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = yamux::Connection::new(
        tls.compat(),
        mux::config(&state.cfg.limits),
        yamux::Mode::Server,
    );
    let (control, mut inbound, mut driver) =
        mux::spawn(conn, state.cfg.limits.max_streams_per_tunnel);
    let mut close = session.watch_close();
    let mut token = session.watch_token();
    let streams = tokio_util::task::TaskTracker::new();
    let end = CancellationToken::new();
    let mut next_stream_id: u64 = 0;
    let (reason, detail) = loop {
        // A close requested before this loop subscribed (e.g. racing the attach).
        if let Some(r) = close.borrow_and_update().clone() {
            break r;
        }
        let expires = token.borrow().1;
        let until_expiry = Duration::from_secs((expires - crate::token::now_unix()).max(0) as u64);
        tokio::select! {
            s = inbound.recv() => match s {
                Some(stream) => {
                    next_stream_id += 1;
                    streams.spawn(handle_stream(state.clone(), session.clone(), stream, next_stream_id, end.clone()));
                }
                None => break (CloseReason::ClientGone, "the client closed the tunnel".to_string()),
            },
            _ = close.changed() => {
                if let Some(r) = close.borrow().clone() { break r; }
            },
            _ = token.changed() => {},
            _ = tokio::time::sleep(until_expiry) => {
                break (CloseReason::TokenExpired, "the session token expired without renewal".to_string());
            }
            _ = shutdown.cancelled() => break (CloseReason::EdgeShutdown, "the edge is shutting down".to_string()),
        }
    };
    // Stop every stream, even those whose upstream never closes; each still writes
    // its stream_closed record before the session's.
    end.cancel();
    // Tell the client why, so it knows whether reconnecting makes sense, and let the
    // client close the connection: closing it from this side while the client's last
    // frames sit unread makes the kernel send RST, and the client would lose the notice.
    if !matches!(reason, CloseReason::ClientGone) {
        let notice = TunnelNotice {
            reason: reason.as_str().into(),
            detail: detail.clone(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if let Ok(mut s) = control.open_stream().await {
                let _ = write_msg(&mut s, &notice).await;
                let _ = s.shutdown().await;
            }
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut driver).await;
    }
    if !driver.is_finished() {
        control.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut driver).await;
        driver.abort();
    }
    streams.close();
    if tokio::time::timeout(Duration::from_secs(5), streams.wait())
        .await
        .is_err()
    {
        tracing::warn!(session_id = %session.id, "streams did not finish within 5 s of the session's end");
    }
    tracing::info!(session_id = %session.id, reason = %reason, "tunnel closed");
    state.finish_session(&session, reason, &detail).await;
}

async fn handle_stream(
    state: Arc<EdgeState>,
    session: Arc<Session>,
    mut stream: MuxStream,
    stream_id: u64,
    end: CancellationToken,
) {
    let mode = session.backpressure;
    let tap = &state.tap;
    let header: StreamHeader =
        match tokio::time::timeout(state.cfg.limits.handshake_timeout(), read_msg(&mut stream))
            .await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                stream_refused(
                    &state,
                    &session,
                    &mut stream,
                    stream_id,
                    "bad_stream_header",
                    format!("bad stream header: {e}"),
                )
                .await;
                return;
            }
            Err(_) => {
                stream_refused(
                    &state,
                    &session,
                    &mut stream,
                    stream_id,
                    "bad_stream_header",
                    "no stream header within the handshake timeout".into(),
                )
                .await;
                return;
            }
        };
    if header.target != session.target {
        let msg = format!(
            "this tunnel is for target {:?}; stream asked for {:?}: open a tunnel per target",
            session.target, header.target
        );
        stream_refused(
            &state,
            &session,
            &mut stream,
            stream_id,
            "wrong_target",
            msg,
        )
        .await;
        return;
    }
    let Some(target) = state.cfg.target(&session.target).cloned() else {
        stream_refused(
            &state,
            &session,
            &mut stream,
            stream_id,
            "unknown_target",
            format!("target {:?} is no longer configured", session.target),
        )
        .await;
        return;
    };
    let upstream = match dial(&state, &target).await {
        Ok(u) => u,
        Err(msg) => {
            stream_refused(
                &state,
                &session,
                &mut stream,
                stream_id,
                "upstream_unreachable",
                msg,
            )
            .await;
            return;
        }
    };
    let opened = Body::StreamOpened(StreamOpened {
        stream_id,
        target: target.name.clone(),
        protocol_hint: header.protocol_hint.clone(),
        client_addr: header.client_addr.clone(),
        upstream_addr: upstream.addr.to_string(),
    });
    if tap
        .record(session.id, opened, mode.at_least_block(), &session.gaps)
        .await
        .is_err()
    {
        return;
    }
    if write_msg(
        &mut stream,
        &StreamReply {
            ok: true,
            ..Default::default()
        },
    )
    .await
    .is_err()
    {
        return;
    }
    session.streams.fetch_add(1, Ordering::Relaxed);
    state.metrics.streams_total.fetch_add(1, Ordering::Relaxed);

    let capture = Arc::new(StreamCapture::new(&target));
    let ctx = StreamCtx {
        state: &state,
        session: &session,
        stream_id,
        activity: std::sync::Mutex::new(Instant::now()),
        end,
        capture: &capture,
        may_be_http: StreamCapture::may_be_http(&target),
        mirror: std::sync::OnceLock::new(),
    };
    let (cr, cw) = tokio::io::split(stream);
    let result = match upstream.io {
        Upstream::Plain(tcp) => {
            let (ur, uw) = tcp.into_split();
            pump_both(&ctx, cr, cw, ur, uw).await
        }
        Upstream::Tls(tls) => {
            let (ur, uw) = tokio::io::split(*tls);
            pump_both(&ctx, cr, cw, ur, uw).await
        }
    };
    let (up, down, error) = result;
    // The stream's exchange records go before its closing record.
    if let Some(m) = ctx.mirror.into_inner() {
        m.finish().await;
    }
    let closed = Body::StreamClosed(StreamClosed {
        stream_id,
        bytes_up: up,
        bytes_down: down,
        error,
    });
    let _ = tap
        .record(session.id, closed, mode.at_least_block(), &session.gaps)
        .await;
}

impl Backpressure {
    /// Lifecycle records are never dropped: a `drop` route still waits for them.
    fn at_least_block(self) -> Backpressure {
        match self {
            Backpressure::Drop => Backpressure::Block,
            m => m,
        }
    }
}

async fn stream_refused(
    state: &EdgeState,
    session: &Session,
    stream: &mut MuxStream,
    stream_id: u64,
    code: &'static str,
    message: String,
) {
    tracing::info!(session_id = %session.id, stream_id, code, "stream refused: {message}");
    let closed = Body::StreamClosed(StreamClosed {
        stream_id,
        error: format!("{code}: {message}"),
        ..Default::default()
    });
    let _ = state
        .tap
        .record(
            session.id,
            closed,
            session.backpressure.at_least_block(),
            &session.gaps,
        )
        .await;
    let _ = write_msg(
        stream,
        &StreamReply {
            ok: false,
            code: code.into(),
            error: message,
        },
    )
    .await;
    let _ = stream.shutdown().await;
}

enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

struct Dialed {
    addr: SocketAddr,
    io: Upstream,
}

/// Resolves the configured upstream (never anything the client sent), pins the first
/// address that accepts, and optionally originates TLS.
async fn dial(state: &EdgeState, target: &TargetConfig) -> Result<Dialed, String> {
    let timeout = state.cfg.limits.connect_timeout();
    let connect = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&target.upstream)
            .await
            .map_err(|e| format!("cannot resolve upstream {}: {e}", target.upstream))?
            .collect();
        let mut last = format!("upstream {} resolved to no address", target.upstream);
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok((addr, s)),
                Err(e) => last = format!("upstream {} ({addr}) refused: {e}", target.upstream),
            }
        }
        Err(last)
    };
    let (addr, tcp) = tokio::time::timeout(timeout, connect).await.map_err(|_| {
        format!(
            "upstream {} did not answer within {timeout:?}",
            target.upstream
        )
    })??;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &target.tls else {
        return Ok(Dialed {
            addr,
            io: Upstream::Plain(tcp),
        });
    };
    let connector = state
        .upstream_tls(target)
        .map_err(|e| format!("upstream TLS for {} is misconfigured: {e}", target.name))?;
    let host = tls.sni.clone().unwrap_or_else(|| {
        crate::config::parse_host_port(&target.upstream)
            .map(|h| h.0)
            .unwrap_or_default()
    });
    let name = rustls_pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("upstream server name {host:?} is invalid: {e}"))?;
    let stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| format!("upstream {} TLS handshake timed out", target.upstream))?
        .map_err(|e| format!("upstream {} TLS handshake failed: {e}", target.upstream))?;
    Ok(Dialed {
        addr,
        io: Upstream::Tls(Box::new(stream)),
    })
}

/// What both directions of one stream share.
struct StreamCtx<'a> {
    state: &'a EdgeState,
    session: &'a Arc<Session>,
    stream_id: u64,
    /// Last time a byte moved either way (for the idle timeout).
    activity: std::sync::Mutex<Instant>,
    /// Cancelled when the session ends.
    end: CancellationToken,
    /// What the stream carries and what its frames keep.
    capture: &'a Arc<StreamCapture>,
    /// Whether the route may carry HTTP (a mirror may be needed).
    may_be_http: bool,
    /// The HTTP mirror: started by the first chunk that is not opaque, so opaque
    /// streams never pay for a task.
    mirror: std::sync::OnceLock<Mirror>,
}

impl StreamCtx<'_> {
    fn mirror(&self) -> Option<&Mirror> {
        if !self.may_be_http {
            return None;
        }
        Some(self.mirror.get_or_init(|| {
            Mirror::start(
                self.state.tap.clone(),
                self.session.clone(),
                self.capture.clone(),
                self.stream_id,
                self.state.cfg.capture.mirror_queue,
                Shaper {
                    redactor: self.state.redactor.clone(),
                    max_body: self.state.cfg.capture.max_body_bytes,
                    metrics: self.state.metrics.http.clone(),
                    otlp: self.state.otlp.clone(),
                },
            )
        }))
    }
}

/// Copies both directions until both have ended; returns bytes up, bytes down and
/// the first error (empty when both ended cleanly).
async fn pump_both<CR, CW, UR, UW>(
    ctx: &StreamCtx<'_>,
    client_r: CR,
    client_w: CW,
    up_r: UR,
    up_w: UW,
) -> (u64, u64, String)
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    // Method and path rules: the client's bytes go through the gate; a denial reaches
    // the other direction's forwarder, which answers the client.
    let (gate, deny) = match ctx.state.cfg.target(&ctx.session.target) {
        Some(t) if !t.http_rules.is_empty() => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (
                Some((
                    Gate::new(t.http_rules.clone(), ctx.state.redactor.clone()),
                    tx,
                )),
                Some(rx),
            )
        }
        _ => (None, None),
    };
    let up = pump(ctx, Direction::Up, client_r, up_w, Gating::Up(gate));
    let down = pump(ctx, Direction::Down, up_r, client_w, Gating::Down(deny));
    let ((up_n, up_err), (down_n, down_err)) = tokio::join!(up, down);
    let error = [up_err, down_err]
        .into_iter()
        .flatten()
        .next()
        .unwrap_or_default();
    (up_n, down_n, error)
}

/// A forwarder's part in the inline method/path rules.
enum Gating {
    /// Client → upstream: the gate, and where to send a denial.
    Up(Option<(Gate, tokio::sync::oneshot::Sender<Denied>)>),
    /// Upstream → client: where a denial arrives, to answer the client with 403.
    Down(Option<tokio::sync::oneshot::Receiver<Denied>>),
}

async fn pump<R, W>(
    ctx: &StreamCtx<'_>,
    dir: Direction,
    mut r: R,
    mut w: W,
    mut gating: Gating,
) -> (u64, Option<String>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (state, session, activity, end) = (ctx.state, ctx.session, &ctx.activity, &ctx.end);
    let idle = state.cfg.limits.idle_timeout();
    let mut offset = 0u64;
    // Start small so an idle stream holds little memory; grow towards CHUNK while
    // reads keep filling the buffer (bulk transfers), as hyper does.
    let mut want = FIRST_READ;
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(want);
        // Wake at the idle deadline (or never) to see whether the stream went idle.
        let wake = idle.unwrap_or(Duration::from_secs(365 * 24 * 3600));
        let read = tokio::select! {
            r = tokio::time::timeout(wake, r.read_buf(&mut buf)) => match r {
                Ok(r) => r,
                Err(_) => {
                    if activity.lock().expect("activity lock").elapsed() >= wake {
                        let _ = w.shutdown().await;
                        return (offset, Some(format!("idle for {wake:?}")));
                    }
                    continue;
                }
            },
            // The session ended: stop even if the peer never closes its side.
            _ = end.cancelled() => {
                let _ = w.shutdown().await;
                return (offset, Some("the session ended".into()));
            }
            denied = async {
                match &mut gating {
                    Gating::Down(Some(rx)) => rx.await,
                    _ => std::future::pending().await,
                }
            } => {
                match denied {
                    Ok(d) => {
                        let _ = w.write_all(&forbidden(&d)).await;
                        let _ = w.shutdown().await;
                        return (offset, Some(format!("request refused: {}", d.reason)));
                    }
                    // The client side ended without a denial.
                    Err(_) => {
                        gating = Gating::Down(None);
                        continue;
                    }
                }
            }
        };
        let n = match read {
            Ok(0) => {
                // The upstream may have ended because a request was refused: the
                // client still gets its 403.
                if let Gating::Down(Some(rx)) = &mut gating
                    && let Ok(d) = rx.try_recv()
                {
                    let _ = w.write_all(&forbidden(&d)).await;
                    let _ = w.shutdown().await;
                    return (offset, Some(format!("request refused: {}", d.reason)));
                }
                let _ = w.shutdown().await;
                return (offset, None);
            }
            Ok(n) => n,
            Err(e) => {
                let _ = w.shutdown().await;
                return (
                    offset,
                    Some(format!("{} read failed: {e}", side(dir, true))),
                );
            }
        };
        if n >= want {
            want = (want * 2).min(CHUNK);
        }
        *activity.lock().expect("activity lock") = Instant::now();
        let chunk = buf.split_to(n).freeze();
        let kind = ctx.capture.decide(dir, &chunk).map(|d| d.0);
        let mut denied = None;
        let chunk = match &mut gating {
            Gating::Up(Some((gate, _))) => match kind {
                Some(Kind::Http1) => match gate.admit(&chunk) {
                    Verdict::Forward(b) => b,
                    Verdict::Deny(b, d) => {
                        denied = Some(d);
                        b
                    }
                },
                _ => {
                    denied = Some(Denied {
                        method: String::new(),
                        path: String::new(),
                        reason: "this route has http_rules, which need HTTP/1.x; this stream is not HTTP/1.x".into(),
                    });
                    Bytes::new()
                }
            },
            _ => chunk,
        };
        if !chunk.is_empty()
            && let Err(e) = forward(ctx, dir, kind, &chunk, offset, &mut w).await
        {
            return (offset, Some(e));
        }
        offset += chunk.len() as u64;
        if let Some(d) = denied {
            state.http_denied(session, &d).await;
            let reason = format!("request refused: {}", d.reason);
            // The other forwarder learns of the refusal before the upstream sees our
            // end of stream, so the EOF that follows cannot overtake the 403.
            if let Gating::Up(Some((_, tx))) = gating {
                let _ = tx.send(d);
            }
            let _ = w.shutdown().await;
            return (offset, Some(reason));
        }
    }
}

/// The 403 a denied request gets.
fn forbidden(d: &Denied) -> Vec<u8> {
    let body = serde_json::json!({"code": "http_rule_denied", "error": d.reason}).to_string();
    format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Records one chunk, hands it to the mirror and writes it on.
async fn forward<W: AsyncWrite + Unpin>(
    ctx: &StreamCtx<'_>,
    dir: Direction,
    kind: Option<Kind>,
    chunk: &Bytes,
    offset: u64,
    w: &mut W,
) -> Result<(), String> {
    let (state, session, stream_id, end) = (ctx.state, ctx.session, ctx.stream_id, &ctx.end);
    let n = chunk.len();
    {
        let frame = Body::Frame(Frame {
            stream_id,
            direction: dir,
            offset,
            length: n as u32,
            payload: ctx.capture.keeps_payload().then(|| chunk.to_vec()),
        });
        if let Err(e) = state
            .tap
            .record(session.id, frame, session.backpressure, &session.gaps)
            .await
        {
            // Without a log we cannot keep the capture promise: stop forwarding.
            session.request_close(CloseReason::EdgeShutdown, e.to_string());
            return Err(e.to_string());
        }
    }
    if kind != Some(Kind::Opaque)
        && let Some(m) = ctx.mirror()
    {
        // A `block` route waits for a full mirror queue, but never past the session.
        tokio::select! {
            _ = m.feed(dir, chunk) => {}
            _ = end.cancelled() => return Err("the session ended".into()),
        }
    }
    // A peer that stops reading must not hold the stream past the session's end.
    let written = tokio::select! {
        r = w.write_all(chunk) => r,
        _ = end.cancelled() => return Err("the session ended".into()),
    };
    if let Err(e) = written {
        return Err(format!("{} write failed: {e}", side(dir, false)));
    }
    match dir {
        Direction::Up => session.add_bytes(n as u64, 0),
        Direction::Down => session.add_bytes(0, n as u64),
    }
    state.metrics.add_bytes(dir, n as u64);
    Ok(())
}

fn side(dir: Direction, reading: bool) -> &'static str {
    match (dir, reading) {
        (Direction::Up, true) | (Direction::Down, false) => "client",
        _ => "upstream",
    }
}

impl EdgeState {
    /// Records a request the route's http_rules refused, on the session's chain.
    async fn http_denied(&self, session: &Session, d: &Denied) {
        self.metrics.refusals.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session_id = %session.id, target = %session.target, "http request refused: {}", d.reason);
        let body = Body::PolicyDecision(cloudtap_schemas::PolicyDecision {
            identity: session.identity.clone(),
            target: session.target.clone(),
            action: "http_request".into(),
            allowed: false,
            code: "http_rule_denied".into(),
            reason: d.reason.clone(),
            token_id: session.user_token_id.clone(),
            client_cert_sha256: session.cert_fingerprint.clone().unwrap_or_default(),
        });
        let _ = self
            .tap
            .record(session.id, body, Backpressure::Block, &session.gaps)
            .await;
    }

    /// Writes the session's closing record and forgets it. Idempotent per session.
    pub(crate) async fn finish_session(
        &self,
        session: &Session,
        reason: CloseReason,
        detail: &str,
    ) {
        if self.sessions.remove(&session.id).is_none() {
            return;
        }
        if session.attached.load(Ordering::Acquire) {
            let closed = Body::SessionClosed(SessionClosed {
                reason,
                detail: detail.to_string(),
                bytes_up: session.bytes_up.load(Ordering::Relaxed),
                bytes_down: session.bytes_down.load(Ordering::Relaxed),
                streams: session.streams.load(Ordering::Relaxed),
            });
            let _ = self
                .tap
                .record(session.id, closed, Backpressure::Block, &session.gaps)
                .await;
            let _ = self.tap.close_chain(session.id).await;
        }
    }

    /// Starts the session chain with its opening record.
    pub(crate) async fn start_session_chain(&self, session: &Session) -> Result<(), Refusal> {
        let unavailable = |e: crate::tap::TapError| Refusal::new("log_unavailable", e.to_string());
        self.tap
            .open_chain(
                session.id,
                None,
                session.gaps.clone(),
                ChainMeta {
                    session_id: Some(session.id),
                    target: session.target.clone(),
                    identity: session.identity.clone(),
                },
            )
            .await
            .map_err(unavailable)?;
        let upstream = self
            .cfg
            .target(&session.target)
            .map(|t| t.upstream.clone())
            .unwrap_or_default();
        let opened = Body::SessionOpened(SessionOpened {
            edge: self.name.clone(),
            edge_chain_id: self.edge_chain,
            identity: session.identity.clone(),
            target: session.target.clone(),
            upstream,
            client_cert_sha256: session.cert_fingerprint.clone().unwrap_or_default(),
            token_id: session.user_token_id.clone(),
            on_log_backpressure: session.backpressure.as_str().into(),
            replay_of: session.replay_of.clone(),
        });
        self.tap
            .record(session.id, opened, Backpressure::Strict, &session.gaps)
            .await
            .map_err(unavailable)
    }
}
