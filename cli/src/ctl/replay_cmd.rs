//! `cloudtapctl replay`: rebuild a captured session through the query service (so
//! only sessions the user may read can be replayed, from the log tail or from Parquet
//! alike), re-send it through the edge as the user over a session opened with
//! `replay_of`, print what changed, and hand the findings to the edge, which appends
//! them to the run's own chain (`replay_diffs`).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use cloudtap_edge::client::{StreamOpener, Tunnel};
use cloudtap_edge::replays::{MAX_FINDINGS, ReplayReport};
use cloudtap_replay::diff::{DEFAULT_IGNORED, DiffOptions};
use cloudtap_replay::plan::parse_header;
use cloudtap_replay::{
    Dialer, Filter, Io, Plan, PlanOptions, Progress, Recording, RunOptions, Speed,
};
use cloudtap_schemas::Record;

use super::query_cmd::{literal, run as run_sql, session_id};
use super::{CtlResult, Ctx, Output, connect, with_token};

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
    #[arg(long)]
    only: Option<String>,
    /// 'Name: value' set on every request; the only source of credentials that
    /// redaction removed (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// A response header not to compare, on top of the defaults (Date, request and
    /// trace ids, …) (repeatable).
    #[arg(long = "ignore-header")]
    ignore_headers: Vec<String>,
    /// Also send non-idempotent requests (POST, PUT, PATCH, DELETE) and opaque streams.
    #[arg(long)]
    allow_writes: bool,
    /// Say what would be sent, and send nothing.
    #[arg(long)]
    dry_run: bool,
    /// How long one request, or a stream's silence, may last.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
}

/// The session's records through the query service: its events, its exchanges, and
/// the frames of streams that are not HTTP (HTTP is replayed from its exchanges).
async fn fetch(ctx: &Ctx, id: &str) -> CtlResult<Vec<Record>> {
    let lit = literal(id);
    let queries = [
        format!("SELECT * FROM events WHERE session_id = {lit}"),
        format!("SELECT * FROM http_exchanges WHERE session_id = {lit}"),
        format!(
            "SELECT * FROM frames WHERE session_id = {lit} AND stream_id NOT IN \
             (SELECT stream_id FROM http_exchanges WHERE session_id = {lit})"
        ),
    ];
    let mut records = Vec::new();
    for sql in queries {
        let answer = run_sql(ctx, &sql, u64::MAX).await?;
        if answer.truncated {
            anyhow::bail!(
                "session {id} has more records than the query service returns at once ([query] max_rows); raise it to replay this session"
            );
        }
        for b in &answer.batches {
            records.extend(
                cloudtap_schemas::tables::records_from_batch(b)
                    .with_context(|| format!("the records of session {id} do not read back"))?,
            );
        }
    }
    Ok(records)
}

/// Streams through the replay's tunnel.
struct TunnelDialer(StreamOpener);

#[async_trait::async_trait]
impl Dialer for TunnelDialer {
    async fn dial(&self) -> std::io::Result<Box<dyn Io>> {
        let s = self
            .0
            .open_stream("replay")
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Box::new(s))
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
    let speed = Speed::parse(&a.speed)?;
    let filter = Filter::parse(a.only.as_deref().unwrap_or(""))?;
    let headers = a
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    if a.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    let records = fetch(ctx, &id).await?;
    let recording = Recording::from_records(&id, &records)?;
    let target = a.target.clone().unwrap_or_else(|| recording.target.clone());
    let plan = Arc::new(Plan::new(
        &recording,
        &PlanOptions {
            filter,
            allow_writes: a.allow_writes,
            headers,
        },
    ));
    eprintln!(
        "cloudtapctl: replaying session {id} ({} to {}) to {target}: {} HTTP requests and {} streams to send, {} skipped, {} not fully restorable{}",
        recording.identity,
        recording.target,
        plan.http_requests(),
        plan.streams(),
        plan.skipped().count(),
        plan.not_restored().count(),
        if plan.filtered_out > 0 {
            format!(", {} left out by --only", plan.filtered_out)
        } else {
            String::new()
        }
    );
    let mut diff = DiffOptions {
        ignored_headers: DEFAULT_IGNORED.iter().map(|h| h.to_string()).collect(),
    };
    diff.ignored_headers.extend(
        a.ignore_headers
            .iter()
            .map(|h| h.trim().to_ascii_lowercase()),
    );
    let opts = RunOptions {
        speed,
        concurrency: a.concurrency,
        diff,
        timeout: a.timeout,
    };
    if a.dry_run {
        let mut report = cloudtap_replay::Report::new(&plan, Vec::new(), Duration::ZERO);
        report.source_session = id;
        report.target = target;
        return print(ctx, &report, "dry run: nothing sent");
    }

    let control = connect(ctx).await;
    let opened = with_token(ctx, &control, |mut c, t| {
        let (target, id) = (target.clone(), id.clone());
        async move { c.open_tunnel(&t, &target, &id).await }
    })
    .await
    .with_context(|| format!("cannot open a tunnel to {target} for the replay"))?;
    let tunnel = Tunnel::attach(
        &ctx.tls()?,
        &opened.tunnel_addr,
        &opened.session_token,
        &target,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot attach to the replay's tunnel: {e}"))?;
    let progress: Option<Arc<dyn Progress>> =
        (std::io::stderr().is_terminal() && plan.steps.len() > 1).then(|| Arc::new(Bar) as _);
    let mut report = cloudtap_replay::run(
        plan.clone(),
        Arc::new(TunnelDialer(tunnel.opener())),
        opts,
        progress,
    )
    .await;
    report.source_session = id.clone();
    report.target = target.clone();
    report.replay_session = opened.session_id.clone();

    // Record the findings while the replay session is open (the edge checks it is
    // this user's replay of this session), then close it.
    let mut diffs = report.findings.clone();
    if diffs.len() >= MAX_FINDINGS {
        diffs.truncate(MAX_FINDINGS - 1);
    }
    let mut summary = report.summary();
    if report.findings.len() >= MAX_FINDINGS {
        summary.note += &format!(
            "; only the first {} of {} findings recorded",
            MAX_FINDINGS - 1,
            report.findings.len()
        );
    }
    diffs.push(summary);
    let recorded = with_token(ctx, &control, |mut c, t| {
        let r = ReplayReport {
            source_session: id.clone(),
            replay_session: opened.session_id.clone(),
            target: target.clone(),
            diffs: diffs.clone(),
        };
        async move { c.record_replay(&t, r).await }
    })
    .await;
    let _ = with_token(ctx, &control, |mut c, t| {
        let s = opened.session_id.clone();
        async move { c.close(&t, &s).await }
    })
    .await;
    tunnel.close();
    match recorded {
        Ok(r) => report.run_id = r.run_id,
        Err(e) => {
            print(ctx, &report, "")?;
            return Err(e.context("the replay ran, but the edge did not record its findings"));
        }
    }
    print(ctx, &report, "")
}

/// Prints the report; exits 1 when it holds differences.
fn print(ctx: &Ctx, report: &cloudtap_replay::Report, note: &str) -> CtlResult<()> {
    let mut out = std::io::stdout().lock();
    match ctx.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(report)?)?,
        Output::Table => {
            write!(
                out,
                "{}",
                report.render_text(std::io::stdout().is_terminal())
            )?;
            if !note.is_empty() {
                writeln!(out, "{note}")?;
            }
        }
    }
    out.flush()?;
    if report.differences().next().is_some() {
        std::process::exit(1);
    }
    Ok(())
}
