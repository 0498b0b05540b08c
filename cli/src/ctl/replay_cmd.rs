//! `cloudtapctl replay`: rebuild a captured session through the query service (so
//! only sessions the user may read can be replayed, from the log tail or from Parquet
//! alike), re-send it through the edge as the user over a session opened with
//! `replay_of`, print what changed, and hand the findings to the edge, which appends
//! them to the run's own chain (`replay_diffs`). The run itself is
//! [`crate::replay_run`], shared with the replay service.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use cloudtap_edge::replays::{Recorded, ReplayReport};
use cloudtap_proto::tunnel::v1 as pb;
use cloudtap_replay::Progress;
use cloudtap_schemas::Record;

use super::query_cmd::{run_on, session_id};
use super::{Control, CtlResult, Ctx, Output, connect, with_token};
use crate::replay_run::{self, Ask, Edge, Via};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The session to replay (an id from `cloudtapctl sessions list`).
    session: String,
    /// Send to this target instead of the one the session reached.
    #[arg(long)]
    target: Option<String>,
    /// 1 keeps the recorded gaps, N replays N times faster, max sends as fast as
    /// --concurrency allows.
    #[arg(long, default_value = "1")]
    speed: String,
    /// Requests and streams in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Only what matches, e.g. 'method=GET path=/api/* status=5xx' (keys: method,
    /// path, status, kind=http|tcp, stream; `|` between alternatives).
    #[arg(long, default_value = "")]
    only: String,
    /// 'Name: value' set on every request; the only source of credentials that
    /// redaction removed (repeatable; CLOUDTAP_REPLAY_HEADERS holds them one per line).
    #[arg(
        long = "header",
        env = "CLOUDTAP_REPLAY_HEADERS",
        value_delimiter = '\n',
        hide_env_values = true
    )]
    headers: Vec<String>,
    /// A response header not to compare, on top of the defaults (Date, request and
    /// trace ids, …) (repeatable).
    #[arg(long = "ignore-header")]
    ignore_headers: Vec<String>,
    /// Also send requests that may write (anything but GET, HEAD, OPTIONS, TRACE) and
    /// opaque streams.
    #[arg(long)]
    allow_writes: bool,
    /// Say what would be sent, and send nothing.
    #[arg(long)]
    dry_run: bool,
    /// How long one request, or a stream's silence, may last.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Read the session from this incident bundle instead of the query service.
    #[arg(long)]
    pub(super) from_bundle: Option<std::path::PathBuf>,
    /// Send straight to HOST:PORT over plain TCP, with no edge (reproducing on a
    /// laptop); findings are then not recorded anywhere.
    #[arg(long, value_name = "HOST:PORT")]
    direct: Option<String>,
}

/// The session's records, read through the query service as the user: all of them
/// (`frames` too), or only events and exchanges.
async fn fetch(ctx: &Ctx, id: &str, frames: bool, bundle: bool) -> CtlResult<Vec<Record>> {
    let mut records = Vec::new();
    let sql = replay_run::fetch_sql(id);
    for sql in &sql[..if frames { 3 } else { 2 }] {
        let answer = run_on(ctx, sql, u64::MAX, bundle).await?;
        records.extend(replay_run::records_of(
            id,
            &answer.batches,
            answer.truncated,
        )?);
    }
    Ok(records)
}

/// The edge as the user reaches it: gRPC, else the HTTP API, logging in again when a
/// cached token is refused.
struct UserEdge<'a> {
    ctx: &'a Ctx,
    control: Control,
}

#[async_trait::async_trait]
impl Edge for UserEdge<'_> {
    async fn open_tunnel(
        &self,
        target: &str,
        replay_of: &str,
    ) -> anyhow::Result<pb::OpenTunnelResponse> {
        with_token(self.ctx, &self.control, |mut c, t| {
            let (target, id) = (target.to_owned(), replay_of.to_owned());
            async move { c.open_tunnel(&t, &target, &id).await }
        })
        .await
        .with_context(|| format!("cannot open a tunnel to {target} for the replay"))
    }

    async fn record(&self, report: ReplayReport) -> anyhow::Result<Recorded> {
        with_token(self.ctx, &self.control, |mut c, t| {
            let r = report.clone();
            async move { c.record_replay(&t, r).await }
        })
        .await
    }

    async fn close(&self, session_id: &str) {
        let _ = with_token(self.ctx, &self.control, |mut c, t| {
            let s = session_id.to_owned();
            async move { c.close(&t, &s).await }
        })
        .await;
    }

    async fn renew(&self, session_id: &str, session_token: &str) -> anyhow::Result<(String, i64)> {
        let r = self
            .control
            .clone()
            .renew(session_token, session_id)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok((r.session_token, r.expires_unix))
    }

    fn tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        self.ctx.tls()
    }

    async fn session_records(&self, session: &str) -> anyhow::Result<Vec<Record>> {
        // The replay's own session is on the server, even when the source came from a
        // bundle.
        fetch(self.ctx, session, false, false).await
    }
}

/// `[####      ] 12/50` on stderr.
struct Bar;

impl Progress for Bar {
    fn advance(&self, done: usize, total: usize) {
        let width = 30;
        let filled = done * width / total.max(1);
        eprint!(
            "\r[{}{}] {done}/{total}",
            "#".repeat(filled),
            " ".repeat(width - filled)
        );
        if done == total {
            eprint!("\r\x1b[2K");
        }
    }
}

pub async fn replay(ctx: &Ctx, a: ReplayArgs) -> CtlResult<()> {
    let id = session_id(&a.session)?;
    let ask = Ask {
        target: a.target,
        speed: a.speed,
        concurrency: a.concurrency,
        only: a.only,
        headers: a.headers,
        ignore_headers: a.ignore_headers,
        allow_writes: a.allow_writes,
        dry_run: a.dry_run,
        timeout: a.timeout,
    };
    // Bad flags fail before anything is read or opened.
    replay_run::options(&ask)?;
    if let Some(d) = &a.direct
        && d.parse::<std::net::SocketAddr>().is_err()
        && d.rsplit_once(':')
            .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        anyhow::bail!("--direct {d:?} is not HOST:PORT");
    }
    if a.direct.is_some() && ask.target.is_some() {
        anyhow::bail!("--target and --direct exclude each other: --direct names where to send");
    }
    let records = fetch(ctx, &id, true, ctx.from_bundle.is_some()).await?;
    let progress: Option<Arc<dyn Progress>> =
        std::io::stderr().is_terminal().then(|| Arc::new(Bar) as _);
    let announce = |line: String| eprintln!("cloudtapctl: {line}");
    let report = match &a.direct {
        Some(addr) => {
            replay_run::replay(Via::Direct(addr), &id, &records, &ask, progress, announce).await?
        }
        None => {
            let edge = UserEdge {
                ctx,
                control: connect(ctx).await,
            };
            replay_run::replay(Via::Edge(&edge), &id, &records, &ask, progress, announce).await?
        }
    };
    let mut out = std::io::stdout().lock();
    match ctx.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        Output::Table => {
            write!(
                out,
                "{}",
                report.render_text(std::io::stdout().is_terminal())
            )?;
            if ask.dry_run {
                writeln!(out, "dry run: nothing sent")?;
            }
        }
    }
    out.flush()?;
    if report.differences().next().is_some() {
        // exit() runs no destructors: remove the bundle's throw-away copy first.
        ctx.remove_bundle_copy();
        std::process::exit(1);
    }
    Ok(())
}
