//! `cloudtapctl`: the engineer's side. Control calls go over gRPC first and fall back
//! to the HTTP API only when no gRPC connection could be established (never after a
//! request was sent), announcing the fallback on stderr.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint};

use cloudtap_edge::client::Tunnel;
use cloudtap_edge::pki::DevPki;
use cloudtap_proto::tunnel::v1 as pb;
use pb::tunnel_service_client::TunnelServiceClient;

use crate::{http_client, paths};

mod bundle_cmd;
mod query_cmd;
mod replay_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "cloudtapctl",
    version,
    about = "cloudtap client: tunnels, tokens and captured traffic"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Args)]
pub struct Global {
    /// gRPC control plane (default: endpoints.json in the data dir, else localhost:9090).
    #[arg(long, global = true, env = "CLOUDTAP_SERVER")]
    pub server: Option<String>,
    /// HTTP API, used when gRPC cannot be reached (default: endpoints.json, else http://localhost:8080).
    #[arg(long, global = true, env = "CLOUDTAP_HTTP_URL")]
    pub http_url: Option<String>,
    /// Tunnel port for `login` (default: endpoints.json, else localhost:7443).
    #[arg(long, global = true, env = "CLOUDTAP_TUNNEL_ADDR")]
    pub tunnel_addr: Option<String>,
    /// User token (default: the cached one, refreshed by logging in when needed).
    #[arg(long, global = true, env = "CLOUDTAP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Client certificate (default: <data dir>/pki/client.pem).
    #[arg(long, global = true, env = "CLOUDTAP_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (default: <data dir>/pki/client.key).
    #[arg(long, global = true, env = "CLOUDTAP_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA that signed the edge's certificate (default: <data dir>/pki/ca.pem).
    #[arg(long, global = true, env = "CLOUDTAP_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Development only: do not verify the edge's certificate.
    #[arg(long, global = true, env = "CLOUDTAP_INSECURE_SKIP_VERIFY")]
    pub insecure_skip_verify: bool,
    /// Data dir shared with cloudtapd.
    #[arg(long, global = true, env = "CLOUDTAP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Output format (default: table on a terminal, json otherwise); `query` also
    /// writes csv and arrow (Arrow IPC stream).
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Format>,
}

/// Every output format a command may be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
    Arrow,
}

/// The formats of commands that print records rather than query answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Open a tunnel to a target and forward a local port through it.
    Proxy {
        target: String,
        /// Local address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        local_addr: SocketAddr,
    },
    /// Close live tunnels by target name or session id.
    Close { selector: String },
    /// List the targets and whether you may reach them.
    ListTargets,
    /// The edge's health: ok, or degraded and why (e.g. the traffic log is not
    /// acknowledging appends). Exits 1 when degraded.
    Status,
    /// Get a user token for your client certificate's identity.
    Login {
        /// Token lifetime, e.g. 15m (default: the edge's).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Admin: issue or revoke tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Run SQL over captured traffic (tables: sessions, streams, events, frames,
    /// http_exchanges, and the view requests), e.g.
    /// `cloudtapctl query "SELECT path, status FROM requests WHERE status >= 500"`.
    Query {
        /// One SQL statement (read-only).
        sql: String,
        /// Query this incident bundle instead of a server (nothing else is needed).
        #[arg(long)]
        from_bundle: Option<PathBuf>,
        /// Write the answer to this file instead of stdout.
        #[arg(long)]
        file: Option<PathBuf>,
        /// At most this many rows (the server's limit wins when lower).
        #[arg(long, default_value_t = 10_000)]
        max_rows: u64,
    },
    /// Captured sessions: list them, or show one.
    Sessions {
        /// Read this incident bundle instead of a server.
        #[arg(long, global = true)]
        from_bundle: Option<PathBuf>,
        #[command(subcommand)]
        cmd: query_cmd::SessionsCmd,
    },
    /// Re-send a captured session through the edge and show what changed (exit 1
    /// when something did). Needs read rights on the session and access to the target.
    Replay(replay_cmd::ReplayArgs),
    /// Export sessions as one signed incident bundle (.tar.zst): Parquet slices of
    /// every table, events.jsonl, exchanges.har, capture.pcapng, a manifest and its
    /// signature. Built and signed by the server; needs read rights on the sessions.
    Export(bundle_cmd::ExportArgs),
    /// Incident bundles.
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCmd),
    /// Load a bundle into the local archive, so its sessions show in `sessions list`
    /// and queries (importing it again changes nothing).
    Import(bundle_cmd::ImportArgs),
    /// Print HTTP and gRPC exchanges as they happen (time, target, method, path,
    /// status, latency), for the sessions you may read.
    Tail {
        /// Only this session.
        #[arg(long)]
        session: Option<String>,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Issue a token for a subject.
    Issue {
        #[arg(long)]
        subject: String,
        /// Target the token is good for (repeatable; default any the policy allows).
        #[arg(long = "target")]
        targets: Vec<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Bind the token to this client certificate (hex SHA-256 of its DER).
        #[arg(long)]
        cert_sha256: Option<String>,
    },
    /// Revoke a token id; tunnels using it end within a minute.
    Revoke {
        token_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// An error that maps to exit code 2 and says what to do next.
pub type CtlResult<T> = anyhow::Result<T>;

struct Ctx {
    g: Global,
    data_dir: PathBuf,
    endpoints: Option<cloudtap_edge::Endpoints>,
    output: Output,
    format: Format,
    /// `--from-bundle`: queries read this bundle, not a server.
    from_bundle: Option<PathBuf>,
    /// The bundle's throw-away archive and engine, made on first use.
    bundle: tokio::sync::OnceCell<(tempfile::TempDir, Arc<cloudtap_query::QueryEngine>)>,
}

impl Ctx {
    fn new(g: Global) -> Self {
        let data_dir = paths::data_dir(g.data_dir.clone());
        let endpoints = paths::read_endpoints(&data_dir);
        let format = g.output.unwrap_or(if std::io::stdout().is_terminal() {
            Format::Table
        } else {
            Format::Json
        });
        // Commands other than `query` print JSON where csv or arrow was asked for.
        let output = match format {
            Format::Table => Output::Table,
            Format::Json | Format::Csv | Format::Arrow => Output::Json,
        };
        Self {
            g,
            data_dir,
            endpoints,
            output,
            format,
            from_bundle: None,
            bundle: tokio::sync::OnceCell::new(),
        }
    }

    /// Removes the temporary copy `--from-bundle` made, if any (before `exit`, which
    /// runs no destructors).
    fn remove_bundle_copy(&self) {
        if let Some((dir, _)) = self.bundle.get() {
            let _ = std::fs::remove_dir_all(dir.path());
        }
    }

    fn grpc_addr(&self) -> String {
        let raw = self
            .g
            .server
            .clone()
            .or_else(|| self.endpoints.as_ref().map(|e| e.grpc.to_string()))
            .unwrap_or_else(|| "localhost:9090".into());
        if raw.contains("://") {
            raw
        } else {
            format!("http://{raw}")
        }
    }

    fn http_url(&self) -> String {
        self.g
            .http_url
            .clone()
            .or_else(|| {
                self.endpoints
                    .as_ref()
                    .map(|e| format!("http://{}", e.http))
            })
            .unwrap_or_else(|| "http://localhost:8080".into())
    }

    fn tunnel_addr(&self) -> String {
        self.g
            .tunnel_addr
            .clone()
            .or_else(|| self.endpoints.as_ref().map(|e| e.tunnel.to_string()))
            .unwrap_or_else(|| "localhost:7443".into())
    }

    fn tls(&self) -> CtlResult<Arc<rustls::ClientConfig>> {
        let pki = DevPki::new(&self.data_dir);
        let ca = self.g.ca_cert.clone().unwrap_or_else(|| pki.ca_cert());
        let cert = self.g.tls_cert.clone().unwrap_or_else(|| pki.client_cert());
        let key = self.g.tls_key.clone().unwrap_or_else(|| pki.client_key());
        cloudtap_edge::pki::client_config(&ca, &cert, &key, self.g.insecure_skip_verify).with_context(|| {
            format!(
                "cannot load client credentials (CA {}, cert {}); pass --ca-cert/--tls-cert/--tls-key, or start `cloudtapd all` once to create development ones",
                ca.display(),
                cert.display()
            )
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct CachedToken {
    token: String,
    token_id: String,
    expires_unix: i64,
    identity: String,
    tunnel_addr: String,
}

/// The control plane, over whichever transport could be reached.
#[derive(Clone)]
enum Control {
    Grpc(TunnelServiceClient<Channel>, Channel),
    Http(String),
}

/// A control-plane refusal or failure, as the user should read it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub code: String,
    pub message: String,
}

async fn connect(ctx: &Ctx) -> Control {
    let addr = ctx.grpc_addr();
    let attempt = async {
        let ep = Endpoint::from_shared(addr.clone())?.connect_timeout(Duration::from_secs(3));
        ep.connect().await
    };
    match attempt.await {
        Ok(ch) => Control::Grpc(TunnelServiceClient::new(ch.clone()), ch),
        Err(e) => {
            let http = ctx.http_url();
            eprintln!(
                "cloudtapctl: gRPC control plane at {addr} unreachable ({e}); falling back to the HTTP API at {http}"
            );
            Control::Http(http)
        }
    }
}

/// A gRPC channel to `--server`, or, when none can be made, the HTTP API's base URL
/// (the fallback announced on stderr, naming `service`).
async fn channel_or_http(ctx: &Ctx, service: &str) -> Result<Channel, String> {
    let addr = ctx.grpc_addr();
    let channel = match Endpoint::from_shared(addr.clone()) {
        Ok(ep) => ep
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .ok(),
        Err(_) => None,
    };
    channel.ok_or_else(|| {
        let http = ctx.http_url();
        eprintln!(
            "cloudtapctl: gRPC {service} at {addr} unreachable; falling back to the HTTP API at {http}"
        );
        http
    })
}

fn status_error(s: tonic::Status) -> CallError {
    let code = s
        .metadata()
        .get("cloudtap-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(match s.code() {
            tonic::Code::Unavailable => "unavailable",
            _ => "error",
        })
        .to_string();
    CallError {
        code,
        message: s.message().to_string(),
    }
}

fn with_bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

impl Control {
    async fn http<B: Serialize, R: serde::de::DeserializeOwned>(
        base: &str,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&B>,
    ) -> Result<R, CallError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request serializes"));
        let (status, bytes) = http_client::call(base, method, path, Some(token), body)
            .await
            .map_err(|e| CallError {
                code: "unavailable".into(),
                message: e.to_string(),
            })?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&bytes).map_err(|e| CallError {
                code: "bad_response".into(),
                message: format!("unexpected HTTP API answer: {e}"),
            })
        } else {
            let err: cloudtap_edge::http::ApiError =
                serde_json::from_slice(&bytes).unwrap_or(cloudtap_edge::http::ApiError {
                    code: "error".into(),
                    error: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
                });
            Err(CallError {
                code: err.code,
                message: err.error,
            })
        }
    }

    async fn open_tunnel(
        &mut self,
        token: &str,
        target: &str,
        replay_of: &str,
    ) -> Result<pb::OpenTunnelResponse, CallError> {
        match self {
            Control::Grpc(c, _) => c
                .open_tunnel(with_bearer(
                    pb::OpenTunnelRequest {
                        target: target.into(),
                        replay_of: replay_of.into(),
                    },
                    token,
                ))
                .await
                .map(|r| r.into_inner())
                .map_err(status_error),
            Control::Http(base) => {
                let r: cloudtap_edge::http::OpenTunnelReply = Self::http(
                    base,
                    "POST",
                    "/v1/proxy",
                    token,
                    Some(&cloudtap_edge::http::OpenTunnelBody {
                        target: target.into(),
                        replay_of: replay_of.into(),
                    }),
                )
                .await?;
                Ok(pb::OpenTunnelResponse {
                    session_id: r.session_id,
                    tunnel_addr: r.tunnel_addr,
                    session_token: r.session_token,
                    expires_unix: r.expires_unix,
                    target: r.target,
                    identity: r.identity,
                    token_id: r.token_id,
                })
            }
        }
    }

    /// Hands a replay run's findings to the edge (`ReplayRecorder.Record`).
    async fn record_replay(
        &mut self,
        token: &str,
        report: cloudtap_edge::replays::ReplayReport,
    ) -> Result<cloudtap_edge::replays::Recorded, CallError> {
        match self {
            Control::Grpc(_, ch) => {
                use cloudtap_proto::replay::v1 as rpb;
                let mut c = rpb::replay_recorder_client::ReplayRecorderClient::new(ch.clone())
                    .max_encoding_message_size(64 << 20);
                let r = c
                    .record(with_bearer(rpb::RecordRequest::from(report), token))
                    .await
                    .map_err(status_error)?
                    .into_inner();
                Ok(r.into())
            }
            Control::Http(base) => {
                Self::http(base, "POST", "/v1/replays", token, Some(&report)).await
            }
        }
    }

    async fn renew(
        &mut self,
        session_token: &str,
        session_id: &str,
    ) -> Result<pb::RenewTokenResponse, CallError> {
        match self {
            Control::Grpc(c, _) => c
                .renew_token(with_bearer(
                    pb::RenewTokenRequest {
                        session_id: session_id.into(),
                    },
                    session_token,
                ))
                .await
                .map(|r| r.into_inner())
                .map_err(status_error),
            Control::Http(base) => {
                let r: cloudtap_edge::http::RenewReply = Self::http(
                    base,
                    "POST",
                    "/v1/renew",
                    session_token,
                    Some(&cloudtap_edge::http::RenewBody {
                        session_id: session_id.into(),
                    }),
                )
                .await?;
                Ok(pb::RenewTokenResponse {
                    session_token: r.session_token,
                    expires_unix: r.expires_unix,
                    token_id: r.token_id,
                })
            }
        }
    }

    async fn close(&mut self, token: &str, selector: &str) -> Result<Vec<String>, CallError> {
        match self {
            Control::Grpc(c, _) => c
                .close_tunnel(with_bearer(
                    pb::CloseTunnelRequest {
                        selector: selector.into(),
                    },
                    token,
                ))
                .await
                .map(|r| r.into_inner().session_ids)
                .map_err(status_error),
            Control::Http(base) => {
                let r: cloudtap_edge::http::CloseReply = Self::http(
                    base,
                    "POST",
                    "/v1/close",
                    token,
                    Some(&cloudtap_edge::http::CloseBody {
                        selector: selector.into(),
                    }),
                )
                .await?;
                Ok(r.session_ids)
            }
        }
    }

    /// Live events matching `filter` (gRPC only: the HTTP API's equivalent is the
    /// server-sent event stream `GET /v1/events`).
    async fn watch(
        &mut self,
        token: &str,
        filter: pb::WatchEventsRequest,
    ) -> Result<tonic::Streaming<pb::Event>, CallError> {
        match self {
            Control::Grpc(c, _) => c
                .watch_events(with_bearer(filter, token))
                .await
                .map(|r| r.into_inner())
                .map_err(status_error),
            Control::Http(base) => Err(CallError {
                code: "unavailable".into(),
                message: format!(
                    "live events need the gRPC control plane, which is unreachable; the HTTP API serves them as server-sent events at {base}/v1/events?kind=http_exchange"
                ),
            }),
        }
    }

    async fn list_targets(
        &mut self,
        token: &str,
    ) -> Result<Vec<cloudtap_edge::http::TargetInfo>, CallError> {
        match self {
            Control::Grpc(c, _) => c
                .list_targets(with_bearer(pb::ListTargetsRequest {}, token))
                .await
                .map(|r| {
                    r.into_inner()
                        .targets
                        .into_iter()
                        .map(cloudtap_edge::http::TargetInfo::from)
                        .collect()
                })
                .map_err(status_error),
            Control::Http(base) => {
                let r: cloudtap_edge::http::TargetsReply =
                    Self::http::<(), _>(base, "GET", "/v1/targets", token, None).await?;
                Ok(r.targets)
            }
        }
    }

    async fn issue(
        &mut self,
        token: &str,
        req: pb::IssueTokenRequest,
    ) -> Result<pb::IssueTokenResponse, CallError> {
        match self {
            Control::Grpc(c, _) => c
                .issue_token(with_bearer(req, token))
                .await
                .map(|r| r.into_inner())
                .map_err(status_error),
            Control::Http(base) => {
                let body = cloudtap_edge::http::IssueBody {
                    subject: req.subject,
                    targets: req.targets,
                    ttl_seconds: req.ttl_seconds,
                    cert_sha256: req.cert_sha256,
                    roles: req.roles,
                };
                let r: cloudtap_edge::http::IssueReply =
                    Self::http(base, "POST", "/v1/tokens", token, Some(&body)).await?;
                Ok(pb::IssueTokenResponse {
                    token: r.token,
                    token_id: r.token_id,
                    expires_unix: r.expires_unix,
                })
            }
        }
    }

    async fn revoke(
        &mut self,
        token: &str,
        token_id: &str,
        reason: &str,
    ) -> Result<pb::RevokeTokenResponse, CallError> {
        match self {
            Control::Grpc(c, _) => c
                .revoke_token(with_bearer(
                    pb::RevokeTokenRequest {
                        token_id: token_id.into(),
                        reason: reason.into(),
                    },
                    token,
                ))
                .await
                .map(|r| r.into_inner())
                .map_err(status_error),
            Control::Http(base) => {
                let body = cloudtap_edge::http::RevokeBody {
                    token_id: token_id.into(),
                    reason: reason.into(),
                };
                let r: cloudtap_edge::http::RevokeReply =
                    Self::http(base, "POST", "/v1/tokens/revoke", token, Some(&body)).await?;
                Ok(pb::RevokeTokenResponse {
                    token_id: r.token_id,
                    session_ids: r.session_ids,
                })
            }
        }
    }
}

/// Logs in over the tunnel port's mTLS and caches the token.
async fn login(ctx: &Ctx, ttl: Option<Duration>) -> CtlResult<CachedToken> {
    let tls = ctx.tls()?;
    let addr = ctx.tunnel_addr();
    let reply =
        cloudtap_edge::client::login(&tls, &addr, Vec::new(), ttl.map_or(0, |d| d.as_secs()))
            .await
            .map_err(|e| anyhow::anyhow!("login failed: {e}"))?;
    let cached = CachedToken {
        token: reply.token,
        token_id: reply.token_id,
        expires_unix: reply.expires_unix,
        identity: reply.identity,
        tunnel_addr: addr,
    };
    let path = paths::token_cache(&ctx.data_dir);
    // A token that cannot be cached still works for this command.
    if let Err(e) = write_secret(&path, &serde_json::to_vec(&cached)?) {
        eprintln!(
            "cloudtapctl: cannot cache the token in {} ({e}); the next command logs in again",
            path.display()
        );
    }
    Ok(cached)
}

fn write_secret(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Per process: two cloudtapctl logging in at once must not share a temporary file.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// The user token to use: `--token`, else a cached one with a minute left, else a
/// fresh login (so the quickstart keeps working after tokens expire).
async fn user_token(ctx: &Ctx) -> CtlResult<String> {
    if let Some(t) = &ctx.g.token {
        return Ok(t.clone());
    }
    let path = paths::token_cache(&ctx.data_dir);
    if let Some(c) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<CachedToken>(&b).ok())
        && c.expires_unix > cloudtap_edge::token::now_unix() + 60
    {
        return Ok(c.token);
    }
    Ok(login(ctx, None).await?.token)
}

/// Calls `f` with a user token; when a cached token was refused as expired or revoked,
/// logs in once more and retries (the refused call did nothing on the edge).
async fn with_token<T, F, Fut>(ctx: &Ctx, control: &Control, f: F) -> CtlResult<T>
where
    F: Fn(Control, String) -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let token = user_token(ctx).await?;
    match f(control.clone(), token).await {
        Err(e)
            if ctx.g.token.is_none()
                && (e.code == "token_expired" || e.code == "token_wrong_certificate") =>
        {
            let fresh = login(ctx, None).await?.token;
            f(control.clone(), fresh)
                .await
                .map_err(|e| anyhow::anyhow!(e))
        }
        r => r.map_err(|e| anyhow::anyhow!(e)),
    }
}

pub async fn main(cli: Cli) -> CtlResult<()> {
    let mut ctx = Ctx::new(cli.global);
    match cli.cmd {
        Cmd::Login { ttl } => {
            let t = login(&ctx, ttl).await?;
            match ctx.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"identity": t.identity, "token_id": t.token_id, "expires_unix": t.expires_unix})
                ),
                Output::Table => println!(
                    "logged in as {} (token {} valid for {}s, cached in {})",
                    t.identity,
                    t.token_id,
                    t.expires_unix - cloudtap_edge::token::now_unix(),
                    paths::token_cache(&ctx.data_dir).display()
                ),
            }
            Ok(())
        }
        Cmd::Status => {
            let url = ctx.http_url();
            let (code, body) = http_client::call(&url, "GET", "/healthz", None, None)
                .await
                .map_err(|e| anyhow::anyhow!("{e}; is cloudtapd running? pass --http-url"))?;
            let h: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                anyhow::anyhow!("the edge at {url} answered /healthz with {code} and no JSON: {e}")
            })?;
            match ctx.output {
                Output::Json => println!("{h}"),
                Output::Table => {
                    println!("status         {}", h["status"].as_str().unwrap_or("?"));
                    if h["status"] != "ok" {
                        println!("reason         {}", h["reason"].as_str().unwrap_or("?"));
                    }
                    println!("traffic log    {}", h["log"].as_str().unwrap_or("?"));
                    println!("open sessions  {}", h["open_sessions"]);
                }
            }
            if h["status"] != "ok" {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::ListTargets => {
            let c = connect(&ctx).await;
            let targets =
                with_token(&ctx, &c, |mut c, t| async move { c.list_targets(&t).await }).await?;
            match ctx.output {
                Output::Json => println!("{}", serde_json::to_string(&targets)?),
                Output::Table => {
                    println!(
                        "{:<24} {:<28} {:<8} {:<10} LIVE",
                        "TARGET", "UPSTREAM", "ALLOWED", "BACKPRES"
                    );
                    for t in targets {
                        let up = if t.upstream_tls {
                            format!("{} (tls)", t.upstream)
                        } else {
                            t.upstream
                        };
                        println!(
                            "{:<24} {:<28} {:<8} {:<10} {}",
                            t.name,
                            up,
                            if t.allowed { "yes" } else { "no" },
                            t.on_log_backpressure,
                            t.live_sessions
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Close { selector } => {
            let c = connect(&ctx).await;
            let sel = selector.clone();
            let ids = with_token(&ctx, &c, |mut c, t| {
                let sel = sel.clone();
                async move { c.close(&t, &sel).await }
            })
            .await?;
            match ctx.output {
                Output::Json => println!("{}", serde_json::json!({"closed": ids})),
                Output::Table => {
                    for id in ids {
                        println!("closing session {id}");
                    }
                }
            }
            Ok(())
        }
        Cmd::Token(TokenCmd::Issue {
            subject,
            targets,
            ttl,
            cert_sha256,
        }) => {
            let c = connect(&ctx).await;
            let req = pb::IssueTokenRequest {
                subject,
                targets,
                ttl_seconds: ttl.map_or(0, |d| d.as_secs()),
                cert_sha256: cert_sha256.unwrap_or_default(),
                roles: Vec::new(),
            };
            let r = with_token(&ctx, &c, |mut c, t| {
                let req = req.clone();
                async move { c.issue(&t, req).await }
            })
            .await?;
            match ctx.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"token": r.token, "token_id": r.token_id, "expires_unix": r.expires_unix})
                ),
                Output::Table => {
                    eprintln!(
                        "token {} expires at unix {}; it is a secret:",
                        r.token_id, r.expires_unix
                    );
                    println!("{}", r.token);
                }
            }
            Ok(())
        }
        Cmd::Token(TokenCmd::Revoke { token_id, reason }) => {
            let c = connect(&ctx).await;
            let r = with_token(&ctx, &c, |mut c, t| {
                let (id, reason) = (token_id.clone(), reason.clone());
                async move { c.revoke(&t, &id, &reason).await }
            })
            .await?;
            match ctx.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"token_id": r.token_id, "ending_sessions": r.session_ids})
                ),
                Output::Table => println!(
                    "revoked {}; ending {} live session(s)",
                    r.token_id,
                    r.session_ids.len()
                ),
            }
            Ok(())
        }
        Cmd::Proxy { target, local_addr } => proxy(&ctx, &target, local_addr).await,
        Cmd::Query {
            sql,
            from_bundle,
            file,
            max_rows,
        } => {
            ctx.from_bundle = from_bundle;
            query_cmd::query(&ctx, &sql, file, max_rows).await
        }
        Cmd::Sessions { from_bundle, cmd } => {
            ctx.from_bundle = from_bundle;
            query_cmd::sessions(&ctx, cmd).await
        }
        Cmd::Replay(args) => {
            ctx.from_bundle = args.from_bundle.clone();
            replay_cmd::replay(&ctx, args).await
        }
        Cmd::Export(args) => bundle_cmd::export(&ctx, args).await,
        Cmd::Bundle(bundle_cmd::BundleCmd::Verify { file, trust }) => {
            bundle_cmd::verify(&ctx, &file, &trust).await
        }
        Cmd::Import(args) => bundle_cmd::import_cmd(&ctx, args).await,
        Cmd::Tail { session, target } => {
            let control = connect(&ctx).await;
            let filter = pb::WatchEventsRequest {
                session_id: session.unwrap_or_default(),
                target: target.unwrap_or_default(),
                kinds: vec!["http_exchange".into()],
            };
            tokio::select! {
                r = follow_exchanges(&ctx, &control, filter, true) => r,
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
    }
}

/// Reasons after which reconnecting would be wrong: the user or policy ended it.
fn is_final(reason: &str) -> bool {
    matches!(
        reason,
        "user_close" | "revoked" | "policy" | "token_expired"
    )
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls the edge's `/healthz` every 2 s while a tunnel runs and says on stderr when it
/// turns degraded (e.g. the traffic log stopped acknowledging appends) and when it
/// recovers. An unreachable HTTP API is not reported: the tunnel says enough then.
async fn watch_health(url: String) {
    let mut degraded: Option<String> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Ok((_, body)) = http_client::call(&url, "GET", "/healthz", None, None).await else {
            continue;
        };
        let Ok(h) = serde_json::from_slice::<serde_json::Value>(&body) else {
            continue;
        };
        let now = (h["status"] != "ok").then(|| h["reason"].as_str().unwrap_or("").to_owned());
        match (&degraded, &now) {
            (None, Some(why)) => eprintln!(
                "cloudtapctl: the edge is degraded: {why}; forwarding continues under the route's on_log_backpressure"
            ),
            (Some(_), None) => eprintln!("cloudtapctl: the edge is healthy again"),
            _ => {}
        }
        degraded = now;
    }
}

/// Prints exchange events matching `filter` until the edge goes away. The edge ends
/// a watch when the token that opened it expires: then it subscribes again with a
/// fresh token (saying so on stderr, as exchanges in between are only in the log).
async fn follow_exchanges(
    ctx: &Ctx,
    control: &Control,
    filter: pb::WatchEventsRequest,
    announce: bool,
) -> CtlResult<()> {
    let mut first = true;
    loop {
        let mut stream = with_token(ctx, control, |mut c, t| {
            let filter = filter.clone();
            async move { c.watch(&t, filter).await }
        })
        .await?;
        if first && announce {
            eprintln!("cloudtapctl: following HTTP and gRPC exchanges; Ctrl-C to stop");
        } else if !first {
            eprintln!(
                "cloudtapctl: the event stream was renewed; exchanges in the gap are in the traffic log"
            );
        }
        first = false;
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    // Nobody reads our stdout any more (a closed pipe): stop quietly
                    // rather than fail the command (for `proxy`, the tunnel goes on).
                    if print_exchange(ctx.output, &ev).is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    anyhow::bail!("the edge went away: {}", s.message())
                }
                Err(_) => break,
            }
        }
    }
}

/// One exchange event on stdout: a JSON object per line, or a line of text.
fn print_exchange(output: Output, ev: &pb::Event) -> std::io::Result<()> {
    use std::io::Write;
    let Some(x) = &ev.exchange else {
        return Ok(());
    };
    let mut out = std::io::stdout().lock();
    if output == Output::Json {
        writeln!(out, "{}", cloudtap_edge::grpc::event_json(ev))?;
        return out.flush();
    }
    let when = std::time::UNIX_EPOCH + Duration::from_nanos(ev.ts_unix_nanos.max(0) as u64);
    let when = humantime::format_rfc3339_millis(when);
    let query = if x.query.is_empty() {
        String::new()
    } else {
        format!("?{}", x.query)
    };
    let what = match x.phase.as_str() {
        "message" => format!(
            "message {} ({} B)",
            x.message_index,
            x.request_bytes + x.response_bytes
        ),
        phase => {
            let status = if x.status == 0 {
                "-".to_owned()
            } else {
                x.status.to_string()
            };
            let grpc = if x.grpc_status.is_empty() {
                String::new()
            } else {
                format!(" grpc-status {}", x.grpc_status)
            };
            let latency = if x.duration_ms > 0.0 {
                format!(" {:.1} ms", x.duration_ms)
            } else {
                String::new()
            };
            let tag = match phase {
                "start" => " [stream started]",
                "end" => " [stream ended]",
                _ => "",
            };
            format!("{status}{grpc}{latency}{tag}")
        }
    };
    writeln!(
        out,
        "{when} {:<16} {:<7} {}{}{}  {what}",
        ev.target, x.method, x.authority, x.path, query
    )?;
    out.flush()
}

async fn proxy(ctx: &Ctx, target: &str, local_addr: SocketAddr) -> CtlResult<()> {
    let tls = ctx.tls()?;
    let listener = TcpListener::bind(local_addr).await.with_context(|| {
        format!("cannot listen on {local_addr}; pick another with --local-addr")
    })?;
    let local = listener.local_addr()?;
    let control = connect(ctx).await;
    let health = tokio::spawn(watch_health(ctx.http_url()));
    let _stop_health = AbortOnDrop(health);
    let mut backoff = Duration::from_millis(250);
    let mut announced = false;
    loop {
        let opened = with_token(ctx, &control, |mut c, t| async move {
            c.open_tunnel(&t, target, "").await
        })
        .await;
        let resp = match opened {
            Ok(r) => r,
            Err(e) if !announced => {
                return Err(e.context(format!("cannot open a tunnel to {target}")));
            }
            Err(e) => {
                eprintln!("cloudtapctl: reconnect failed: {e:#}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let mut tunnel =
            match Tunnel::attach(&tls, &resp.tunnel_addr, &resp.session_token, target).await {
                Ok(t) => t,
                Err(e) if !announced => {
                    return Err(anyhow::anyhow!("cannot attach to the tunnel: {e}"));
                }
                Err(e) => {
                    eprintln!("cloudtapctl: reattach failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
        backoff = Duration::from_millis(250);
        if announced {
            eprintln!(
                "cloudtapctl: tunnel re-established (session {}); still listening on {local}",
                resp.session_id
            );
        } else {
            match ctx.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"local_addr": local.to_string(), "target": target, "session_id": resp.session_id})
                ),
                Output::Table => {
                    println!(
                        "Forwarding {local} -> {target} (session {}, as {})",
                        resp.session_id, resp.identity
                    );
                    println!("Press Ctrl-C to close the tunnel.");
                }
            }
            announced = true;
        }
        let renew = renew_loop(
            ctx,
            resp.session_id.clone(),
            resp.session_token.clone(),
            resp.expires_unix,
        );
        tokio::pin!(renew);
        // The tunnel's own exchanges, as `tail --session` would print them.
        let shown = follow_exchanges(
            ctx,
            &control,
            pb::WatchEventsRequest {
                session_id: resp.session_id.clone(),
                target: String::new(),
                kinds: vec!["http_exchange".into()],
            },
            false,
        );
        tokio::pin!(shown);
        let mut showing = true;
        let outcome = loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (sock, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => { eprintln!("cloudtapctl: accept failed: {e}"); continue; }
                    };
                    forward(&tunnel, sock, peer);
                }
                r = &mut shown, if showing => {
                    showing = false;
                    if let Err(e) = r {
                        eprintln!("cloudtapctl: not showing exchanges: {e:#}");
                    }
                }
                _ = tunnel.closed() => break Outcome::Dropped,
                r = &mut renew => break Outcome::RenewRefused(r),
                _ = tokio::signal::ctrl_c() => break Outcome::Interrupted,
            }
        };
        match outcome {
            Outcome::Interrupted => {
                // Say why we leave, so the session is recorded as closed by the user.
                let _ = with_token(ctx, &control, |mut c, t| {
                    let id = resp.session_id.clone();
                    async move { c.close(&t, &id).await }
                })
                .await;
                tunnel.close();
                eprintln!("cloudtapctl: tunnel closed");
                return Ok(());
            }
            Outcome::RenewRefused(e) => {
                tunnel.close();
                anyhow::bail!(
                    "the edge refused to renew the session token, so the tunnel ended: {e}"
                );
            }
            Outcome::Dropped => {
                if let Some(n) = tunnel.notice()
                    && is_final(&n.reason)
                {
                    anyhow::bail!("the edge ended the tunnel: {} ({})", n.reason, n.detail);
                }
                let why = tunnel
                    .notice()
                    .map(|n| n.reason)
                    .unwrap_or_else(|| "connection lost".into());
                eprintln!("cloudtapctl: tunnel dropped ({why}); reconnecting, keeping {local}");
            }
        }
    }
}

enum Outcome {
    Dropped,
    RenewRefused(CallError),
    Interrupted,
}

/// Renews the session token at two thirds of its life; resolves only on refusal.
async fn renew_loop(
    ctx: &Ctx,
    session_id: String,
    mut token: String,
    mut expires: i64,
) -> CallError {
    let mut control = connect(ctx).await;
    loop {
        // Renew when a third of the token's life is left.
        let left = (expires - cloudtap_edge::token::now_unix()).max(0) as u64;
        tokio::time::sleep(Duration::from_secs((left * 2 / 3).max(1))).await;
        match control.renew(&token, &session_id).await {
            Ok(r) => {
                token = r.session_token;
                expires = r.expires_unix;
            }
            Err(e) if e.code == "unavailable" => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                control = connect(ctx).await;
            }
            Err(e) => return e,
        }
    }
}

/// One local connection ↔ one yamux stream.
fn forward(tunnel: &Tunnel, mut sock: TcpStream, peer: SocketAddr) {
    let _ = sock.set_nodelay(true);
    let opener = tunnel.opener();
    tokio::spawn(async move {
        match opener.open_stream(&peer.to_string()).await {
            Ok(mut s) => {
                // 64 KiB buffers: the edge records one frame per chunk it reads, so larger
                // writes mean fewer records; measured 168 → 230 MB/s (docs/benchmarks.md).
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut sock, &mut s, 64 << 10, 64 << 10)
                        .await;
            }
            // The local client sees the connection close; the reason goes to stderr.
            Err(e) => eprintln!("cloudtapctl: connection from {peer} refused: {e}"),
        }
    });
}
