//! Control-plane semantics, shared by the gRPC service and the HTTP API so both behave
//! the same. Every refusal is a [`Refusal`] with a machine-readable code, mapped once to
//! a gRPC code and an HTTP status, and recorded as a policy decision.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cloudtap_proto::tunnel::v1 as pb;
use cloudtap_schemas::{Audit, Body, CloseReason, Control, ControlAction, PolicyDecision};
use uuid::Uuid;

use crate::EdgeState;
use crate::config::Backpressure;
use crate::session::Session;
use crate::token::{Claims, TokenError, TokenKind, now_unix};

/// A refused request: `code` is stable and machine-readable, `message` says what to do
/// next and never contains a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

/// How a refusal is reported on each API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Unauthenticated,
    PermissionDenied,
    NotFound,
    InvalidArgument,
    Unavailable,
    ResourceExhausted,
}

impl Refusal {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self.code {
            c if c.starts_with("token_") || c == "unauthenticated" => ErrorKind::Unauthenticated,
            "forbidden" | "not_admin" => ErrorKind::PermissionDenied,
            "unknown_target" | "unknown_session" => ErrorKind::NotFound,
            "too_many_tunnels" => ErrorKind::ResourceExhausted,
            "log_unavailable" | "log_disk_full" | "shutting_down" => ErrorKind::Unavailable,
            _ => ErrorKind::InvalidArgument,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self.kind() {
            ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        }
    }

    pub fn http_status(&self) -> http::StatusCode {
        match self.kind() {
            ErrorKind::Unauthenticated => http::StatusCode::UNAUTHORIZED,
            ErrorKind::PermissionDenied => http::StatusCode::FORBIDDEN,
            ErrorKind::NotFound => http::StatusCode::NOT_FOUND,
            ErrorKind::InvalidArgument => http::StatusCode::BAD_REQUEST,
            ErrorKind::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ResourceExhausted => http::StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        let mut s = tonic::Status::new(r.grpc_code(), r.message);
        if let Ok(v) = r.code.parse() {
            s.metadata_mut().insert("cloudtap-code", v);
        }
        s
    }
}

/// Who is calling: the bearer token, and the client certificate when the transport
/// carried one (always on the tunnel port; on the control plane only off loopback).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub bearer: Option<String>,
    pub cert_fingerprint: Option<String>,
}

impl Caller {
    /// The caller as an `authorization: Bearer …` header (gRPC metadata or HTTP) names it.
    pub fn from_authorization(header: Option<&str>) -> Self {
        Caller {
            bearer: header
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| t.trim().to_string()),
            cert_fingerprint: None,
        }
    }
}

/// What a caller may read of captured data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadGrant {
    pub identity: String,
    /// Every session and the edges' own records (admins and auditors).
    pub all: bool,
    /// Otherwise: sessions of these targets (`None`: of every target), and the
    /// caller's own sessions.
    pub targets: Option<Vec<String>>,
}

/// A token as handed out.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub token_id: String,
    pub expires_unix: i64,
}

impl EdgeState {
    /// Records an access decision on the edge's own chain.
    pub(crate) async fn decision(
        &self,
        action: &str,
        identity: &str,
        target: &str,
        result: Result<(), &Refusal>,
        token_id: &str,
        cert: &str,
    ) {
        let (allowed, code, reason) = match result {
            Ok(()) => (true, String::new(), String::new()),
            Err(r) => (false, r.code.to_string(), r.message.clone()),
        };
        if !allowed {
            self.metrics.refusals.fetch_add(1, Ordering::Relaxed);
        }
        self.edge_record(Body::PolicyDecision(PolicyDecision {
            identity: identity.into(),
            target: target.into(),
            action: action.into(),
            allowed,
            code,
            reason,
            token_id: token_id.into(),
            client_cert_sha256: cert.into(),
        }))
        .await;
    }

    /// What a control-plane caller may read of captured data (`query`, `sessions`,
    /// `export`): authenticates them (a refusal is recorded) and applies their policy
    /// and their token's target scope.
    pub async fn read_grant(&self, caller: &Caller, action: &str) -> Result<ReadGrant, Refusal> {
        let claims = self.authenticate(caller, action, "").await?;
        let scoped_token = !claims.targets.iter().any(|t| t == "*");
        let mut grant = ReadGrant {
            all: self.policy.reads_all(&claims.sub) && !scoped_token,
            targets: self.policy.readable_targets(&claims.sub),
            identity: claims.sub,
        };
        if scoped_token {
            // A token scoped to some targets reads only those, whoever holds it.
            grant.targets = Some(match grant.targets {
                None => claims.targets.clone(),
                Some(t) => t
                    .into_iter()
                    .filter(|x| claims.targets.contains(x))
                    .collect(),
            });
        }
        Ok(grant)
    }

    /// Appends an audit record on this process's own chain.
    pub async fn audit(&self, actor: &str, action: &str, detail: String) {
        self.edge_record(Body::Audit(Audit {
            actor: actor.into(),
            action: action.into(),
            detail,
        }))
        .await;
    }

    pub(crate) async fn edge_record(&self, body: Body) {
        if let Err(e) = self
            .tap
            .record(self.edge_chain, body, Backpressure::Block, &self.edge_gaps)
            .await
        {
            tracing::error!(error = %e, "could not record on the edge chain");
        }
    }

    /// Verifies a token's signature, expiry, kind, revocation and (when the transport
    /// shows a certificate) binding.
    pub(crate) fn check_token(
        &self,
        token: &str,
        kind: TokenKind,
        cert: Option<&str>,
    ) -> Result<Claims, TokenError> {
        let claims = self.verifier.verify(token, now_unix())?;
        if claims.kind != kind {
            return Err(TokenError::WrongKind {
                expected: kind,
                found: claims.kind,
            });
        }
        if self.is_revoked(&claims.jti)
            || claims.parent.as_deref().is_some_and(|p| self.is_revoked(p))
        {
            return Err(TokenError::Revoked { jti: claims.jti });
        }
        if let (Some(bound), Some(presented)) = (&claims.cnf, cert)
            && bound != presented
        {
            return Err(TokenError::WrongCertificate);
        }
        Ok(claims)
    }

    pub(crate) fn is_revoked(&self, jti: &str) -> bool {
        self.revoked
            .lock()
            .expect("revocations poisoned")
            .contains(jti)
    }

    /// Authenticates a control-plane caller with a user token; refusals are recorded.
    pub(crate) async fn authenticate(
        &self,
        caller: &Caller,
        action: &str,
        target: &str,
    ) -> Result<Claims, Refusal> {
        let result = match &caller.bearer {
            None => Err(Refusal::new(
                "unauthenticated",
                "no token given: run `cloudtapctl login` (or pass --token / CLOUDTAP_TOKEN)",
            )),
            Some(t) => self
                .check_token(t, TokenKind::User, caller.cert_fingerprint.as_deref())
                .map_err(Refusal::from),
        };
        if let Err(r) = &result {
            self.decision(
                action,
                "",
                target,
                Err(r),
                "",
                caller.cert_fingerprint.as_deref().unwrap_or(""),
            )
            .await;
        }
        result
    }

    fn sign(&self, mut claims: Claims, ttl: u64) -> Issued {
        let now = now_unix();
        claims.iat = now;
        claims.exp = now + ttl as i64;
        Issued {
            token: self.signer.sign(&claims),
            token_id: claims.jti.clone(),
            expires_unix: claims.exp,
        }
    }

    /// `cloudtapctl login`, over the tunnel port's mTLS: a user token for the
    /// certificate's identity.
    pub(crate) async fn login(
        &self,
        identity: &str,
        cert: &str,
        targets: Vec<String>,
        ttl_seconds: u64,
    ) -> Result<Issued, Refusal> {
        let ttl = if ttl_seconds == 0 {
            self.cfg.tokens.user_ttl_secs
        } else {
            ttl_seconds
        };
        if ttl > self.cfg.tokens.max_ttl_secs {
            let r = Refusal::new(
                "ttl_too_long",
                format!(
                    "a token may live at most {}s; ask for less",
                    self.cfg.tokens.max_ttl_secs
                ),
            );
            self.decision("login", identity, "", Err(&r), "", cert)
                .await;
            return Err(r);
        }
        let issued = self.sign(
            Claims {
                jti: Uuid::now_v7().to_string(),
                kind: TokenKind::User,
                sub: identity.into(),
                targets: if targets.is_empty() {
                    vec!["*".into()]
                } else {
                    targets
                },
                roles: if self.policy.is_admin(identity) {
                    vec!["admin".into()]
                } else {
                    vec![]
                },
                cnf: Some(cert.into()),
                sid: None,
                parent: None,
                iat: 0,
                exp: 0,
            },
            ttl,
        );
        self.decision("login", identity, "", Ok(()), &issued.token_id, cert)
            .await;
        Ok(issued)
    }

    /// Opens a session to `target`. `replay_of` names the session a replay re-sends;
    /// it is recorded on the new session as the replayer's statement (the replayer
    /// could only read that session's traffic through the query service, which scopes
    /// it; the edge does not look it up).
    pub async fn open_tunnel(
        &self,
        caller: &Caller,
        target: &str,
        replay_of: &str,
    ) -> Result<pb::OpenTunnelResponse, Refusal> {
        let replay_of = if replay_of.is_empty() {
            String::new()
        } else {
            Uuid::parse_str(replay_of)
                .map_err(|_| {
                    Refusal::new(
                        "invalid_argument",
                        format!("replay_of {replay_of:?} is not a session id (a UUID)"),
                    )
                })?
                .hyphenated()
                .to_string()
        };
        let claims = self.authenticate(caller, "open_tunnel", target).await?;
        let cert = claims.cnf.clone().unwrap_or_default();
        let check = || -> Result<Backpressure, Refusal> {
            if self.shutting_down.is_cancelled() {
                return Err(Refusal::new(
                    "shutting_down",
                    "the edge is shutting down; retry in a moment",
                ));
            }
            if let Some(why) = self.log.disk_low() {
                return Err(Refusal::new(
                    "log_disk_full",
                    format!(
                        "{why}; the edge takes no new sessions until space is freed (archive and retention free it, or give the log a bigger disk)"
                    ),
                ));
            }
            let t = self.cfg.target(target).ok_or_else(|| {
                Refusal::new(
                    "unknown_target",
                    format!("no target named {target:?}; run `cloudtapctl list-targets` to see what exists"),
                )
            })?;
            if !claims.allows_target(target) {
                return Err(TokenError::WrongTarget {
                    target: target.into(),
                }
                .into());
            }
            if !self.policy.allows(&claims.sub, target) {
                return Err(Refusal::new(
                    "forbidden",
                    format!(
                        "policy does not let {:?} reach {target:?}; ask an admin for access",
                        claims.sub
                    ),
                ));
            }
            Ok(t.on_log_backpressure)
        };
        // Either the session is registered (under the tunnel limit) or the refusal is
        // recorded; one decision record either way.
        let opened = check().and_then(|backpressure| {
            let session_id = Uuid::now_v7();
            let issued = self.session_token(&claims, session_id, target);
            let mut session = Session::new(
                session_id,
                target.into(),
                claims.sub.clone(),
                claims.cnf.clone(),
                claims.jti.clone(),
                backpressure,
                issued.token_id.clone(),
                issued.expires_unix,
            );
            session.replay_of = replay_of.clone();
            let session = Arc::new(session);
            if self
                .sessions
                .insert_below(session.clone(), self.cfg.limits.max_tunnels)
            {
                Ok((session, issued))
            } else {
                Err(Refusal::new(
                    "too_many_tunnels",
                    format!(
                        "this edge holds its maximum of {} tunnels; retry later",
                        self.cfg.limits.max_tunnels
                    ),
                ))
            }
        });
        self.decision(
            "open_tunnel",
            &claims.sub,
            target,
            opened.as_ref().map(|_| ()),
            &claims.jti,
            &cert,
        )
        .await;
        let (session, issued) = opened?;
        let session_id = session.id;
        // A session never attached is forgotten after the handshake window.
        let state = self.weak.clone();
        let grace = self.cfg.limits.handshake_timeout() * 6;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(state) = state.upgrade() {
                state.sessions.remove_if_unattached(&session.id);
            }
        });
        Ok(pb::OpenTunnelResponse {
            session_id: session_id.to_string(),
            tunnel_addr: self.tunnel_addr.clone(),
            session_token: issued.token,
            expires_unix: issued.expires_unix,
            target: target.into(),
            identity: claims.sub,
            token_id: issued.token_id,
        })
    }

    fn session_token(&self, user: &Claims, session_id: Uuid, target: &str) -> Issued {
        self.sign(
            Claims {
                jti: Uuid::now_v7().to_string(),
                kind: TokenKind::Session,
                sub: user.sub.clone(),
                targets: vec![target.into()],
                roles: vec![],
                cnf: user.cnf.clone(),
                sid: Some(session_id.to_string()),
                parent: Some(user.parent.clone().unwrap_or_else(|| user.jti.clone())),
                iat: 0,
                exp: 0,
            },
            self.cfg.tokens.session_ttl_secs,
        )
    }

    /// Tunnel port: checks a session token against the presented certificate.
    pub(crate) async fn attach(
        &self,
        token: &str,
        identity: &str,
        cert: &str,
    ) -> Result<Arc<Session>, Refusal> {
        let result = (|| {
            let claims = self.check_token(token, TokenKind::Session, Some(cert))?;
            if claims.cnf.is_none() {
                return Err(Refusal::new(
                    "token_unbound",
                    "this token is not bound to a client certificate, and tunnels need one: use a token from `cloudtapctl login`, or issue one with `token issue --cert-sha256 <sha256 of the certificate>`",
                ));
            }
            let id = claims.sid.as_deref().and_then(|s| Uuid::parse_str(s).ok());
            let session = match id.map(|id| self.sessions.claim(&id, identity)) {
                Some(Ok(s)) => s,
                Some(Err(crate::session::ClaimError::Taken)) => {
                    return Err(Refusal::new(
                        "forbidden",
                        "this session is already attached or belongs to someone else",
                    ));
                }
                _ => {
                    return Err(Refusal::new(
                        "unknown_session",
                        "the session is gone (closed, revoked or never attached in time); open a new tunnel",
                    ));
                }
            };
            Ok((claims, session))
        })();
        match result {
            Ok((claims, session)) => {
                self.decision(
                    "attach",
                    identity,
                    &session.target,
                    Ok(()),
                    &claims.jti,
                    cert,
                )
                .await;
                self.start_session_chain(&session).await?;
                self.metrics.sessions_total.fetch_add(1, Ordering::Relaxed);
                Ok(session)
            }
            Err(r) => {
                self.decision("attach", identity, "", Err(&r), "", cert)
                    .await;
                Err(r)
            }
        }
    }

    pub async fn renew(
        &self,
        caller: &Caller,
        session_id: &str,
    ) -> Result<pb::RenewTokenResponse, Refusal> {
        let result = (|| {
            let token = caller.bearer.as_deref().ok_or_else(|| {
                Refusal::new(
                    "unauthenticated",
                    "renewal needs the current session token as bearer",
                )
            })?;
            let claims = self.check_token(
                token,
                TokenKind::Session,
                caller.cert_fingerprint.as_deref(),
            )?;
            let session = Uuid::parse_str(session_id)
                .ok()
                .filter(|id| claims.sid.as_deref() == Some(&id.to_string()))
                .and_then(|id| self.sessions.get(&id))
                .ok_or_else(|| {
                    Refusal::new(
                        "unknown_session",
                        "no live session with that id for this token",
                    )
                })?;
            if now_unix() >= session.cert_not_after.load(Ordering::Acquire) {
                session.request_close(CloseReason::Policy, "the client certificate expired");
                return Err(Refusal::new(
                    "certificate_expired",
                    "your client certificate has expired; get a new one, then open a new tunnel",
                ));
            }
            if !self.policy.allows(&claims.sub, &session.target) {
                session.request_close(CloseReason::Policy, "policy no longer allows this target");
                return Err(Refusal::new(
                    "forbidden",
                    "policy no longer lets you reach this target",
                ));
            }
            let issued = self.session_token(&claims, session.id, &session.target);
            session.renewed(issued.token_id.clone(), issued.expires_unix);
            Ok((claims, session, issued))
        })();
        match result {
            Ok((claims, session, issued)) => {
                self.decision(
                    "renew",
                    &claims.sub,
                    &session.target,
                    Ok(()),
                    &claims.jti,
                    "",
                )
                .await;
                Ok(pb::RenewTokenResponse {
                    session_token: issued.token,
                    expires_unix: issued.expires_unix,
                    token_id: issued.token_id,
                })
            }
            Err(r) => {
                self.decision("renew", "", "", Err(&r), "", "").await;
                Err(r)
            }
        }
    }

    pub async fn close(
        &self,
        caller: &Caller,
        selector: &str,
    ) -> Result<pb::CloseTunnelResponse, Refusal> {
        let claims = self.authenticate(caller, "close", selector).await?;
        let admin = self.policy.is_admin(&claims.sub);
        let matching: Vec<Arc<Session>> = self
            .sessions
            .matching(selector)
            .into_iter()
            .filter(|s| admin || s.identity == claims.sub)
            .collect();
        if matching.is_empty() {
            return Err(Refusal::new(
                "unknown_session",
                format!(
                    "no live tunnel of yours matches {selector:?} (a target name or a session id)"
                ),
            ));
        }
        // The close travels as a control record per session on the log; every edge
        // (this one included) acts on it when it reads it back. Naming sessions, not
        // the selector, keeps a user's `close db` from touching others' tunnels.
        for s in &matching {
            self.edge_record(Body::Control(Control {
                action: ControlAction::Close,
                subject: s.id.to_string(),
                reason: CloseReason::UserClose.as_str().into(),
                actor: claims.sub.clone(),
            }))
            .await;
        }
        Ok(pb::CloseTunnelResponse {
            session_ids: matching.iter().map(|s| s.id.to_string()).collect(),
        })
    }

    pub async fn list_targets(&self, caller: &Caller) -> Result<pb::ListTargetsResponse, Refusal> {
        let claims = self.authenticate(caller, "list_targets", "").await?;
        let sessions = self.sessions.all();
        Ok(pb::ListTargetsResponse {
            targets: self
                .cfg
                .targets
                .iter()
                .map(|t| pb::Target {
                    name: t.name.clone(),
                    upstream: t.upstream.clone(),
                    upstream_tls: t.tls.is_some(),
                    allowed: self.policy.allows(&claims.sub, &t.name)
                        && claims.allows_target(&t.name),
                    on_log_backpressure: t.on_log_backpressure.as_str().into(),
                    live_sessions: sessions.iter().filter(|s| s.target == t.name).count() as u32,
                })
                .collect(),
        })
    }

    async fn require_admin(&self, caller: &Caller, action: &str) -> Result<Claims, Refusal> {
        let claims = self.authenticate(caller, action, "").await?;
        if !self.policy.is_admin(&claims.sub) {
            let r = Refusal::new(
                "not_admin",
                format!(
                    "{action} is an admin call and {:?} is not an admin",
                    claims.sub
                ),
            );
            self.decision(action, &claims.sub, "", Err(&r), &claims.jti, "")
                .await;
            return Err(r);
        }
        Ok(claims)
    }

    pub async fn issue_token(
        &self,
        caller: &Caller,
        req: pb::IssueTokenRequest,
    ) -> Result<pb::IssueTokenResponse, Refusal> {
        let admin = self.require_admin(caller, "issue_token").await?;
        let ttl = if req.ttl_seconds == 0 {
            self.cfg.tokens.user_ttl_secs
        } else {
            req.ttl_seconds
        };
        let cert = req.cert_sha256.trim().to_ascii_lowercase();
        let bad = if req.subject.is_empty() {
            Some(Refusal::new("bad_request", "a subject is required"))
        } else if ttl > self.cfg.tokens.max_ttl_secs {
            Some(Refusal::new(
                "ttl_too_long",
                format!("a token may live at most {}s", self.cfg.tokens.max_ttl_secs),
            ))
        } else if !cert.is_empty()
            && (cert.len() != 64 || !cert.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            Some(Refusal::new(
                "bad_request",
                "--cert-sha256 must be the 64 hex digits of the certificate's SHA-256",
            ))
        } else {
            None
        };
        if let Some(r) = bad {
            self.decision("issue_token", &admin.sub, "", Err(&r), &admin.jti, "")
                .await;
            return Err(r);
        }
        let issued = self.sign(
            Claims {
                jti: Uuid::now_v7().to_string(),
                kind: TokenKind::User,
                sub: req.subject.clone(),
                targets: if req.targets.is_empty() {
                    vec!["*".into()]
                } else {
                    req.targets
                },
                roles: req.roles,
                cnf: (!cert.is_empty()).then_some(cert),
                sid: None,
                parent: None,
                iat: 0,
                exp: 0,
            },
            ttl,
        );
        self.edge_record(Body::Audit(cloudtap_schemas::Audit {
            actor: admin.sub,
            action: "issue_token".into(),
            detail: format!(
                "subject={} token_id={} ttl={ttl}s",
                req.subject, issued.token_id
            ),
        }))
        .await;
        Ok(pb::IssueTokenResponse {
            token: issued.token,
            token_id: issued.token_id,
            expires_unix: issued.expires_unix,
        })
    }

    pub async fn revoke(
        &self,
        caller: &Caller,
        token_id: &str,
        reason: &str,
    ) -> Result<pb::RevokeTokenResponse, Refusal> {
        let admin = self.require_admin(caller, "revoke_token").await?;
        // Token ids are compared as strings everywhere: use the canonical form, so an
        // upper-case or hyphen-less spelling revokes the same token.
        let token_id = match Uuid::parse_str(token_id) {
            Ok(id) => id.to_string(),
            Err(_) => {
                let r = Refusal::new(
                    "bad_request",
                    format!("{token_id:?} is not a token id (a UUID)"),
                );
                self.decision("revoke_token", &admin.sub, "", Err(&r), &admin.jti, "")
                    .await;
                return Err(r);
            }
        };
        let token_id = token_id.as_str();
        let affected: Vec<String> = self
            .sessions
            .all()
            .iter()
            .filter(|s| s.uses_token(token_id))
            .map(|s| s.id.to_string())
            .collect();
        let control = Control {
            action: ControlAction::Revoke,
            subject: token_id.into(),
            reason: reason.into(),
            actor: admin.sub,
        };
        self.edge_record(Body::Control(control.clone())).await;
        // This edge refuses the token as soon as the call returns; the others (and this
        // one again, harmlessly) when they read the record back from the log.
        self.apply_control(&control);
        Ok(pb::RevokeTokenResponse {
            token_id: token_id.into(),
            session_ids: affected,
        })
    }

    /// Applies a control record read back from the log (from any edge).
    pub(crate) fn apply_control(&self, c: &Control) {
        match c.action {
            ControlAction::Revoke => {
                let subject = canonical_id(&c.subject);
                self.revoked
                    .lock()
                    .expect("revocations poisoned")
                    .insert(subject.clone());
                for s in self.sessions.all() {
                    if s.uses_token(&subject) {
                        self.end_session(
                            &s,
                            CloseReason::Revoked,
                            format!("token {subject} revoked by {}", c.actor),
                        );
                    }
                }
            }
            ControlAction::Close => {
                for s in self.sessions.matching(&c.subject) {
                    self.end_session(&s, CloseReason::UserClose, format!("closed by {}", c.actor));
                }
            }
        }
    }

    /// Ends a session: an attached one is told to close (its task writes the closing
    /// record); one never attached is simply forgotten, so it cannot attach later.
    fn end_session(&self, s: &Session, reason: CloseReason, detail: String) {
        s.request_close(reason, detail);
        self.sessions.remove_if_unattached(&s.id);
    }
}

/// A token id in the canonical UUID spelling (records from other writers may differ).
pub(crate) fn canonical_id(id: &str) -> String {
    Uuid::parse_str(id)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| id.to_string())
}
