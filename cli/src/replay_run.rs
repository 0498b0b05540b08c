//! One replay through an edge, shared by `cloudtapctl replay` (as the user) and the
//! replay service (as its own identity): the SQL that reads a session's records, the
//! options, and the run itself — plan, tunnel with `replay_of`, send and compare,
//! record the findings, close.

use std::sync::Arc;
use std::time::Duration;

use cloudtap_edge::client::{StreamOpener, Tunnel};
use cloudtap_edge::replays::{MAX_FINDINGS, Recorded, ReplayReport, cut_fields};
use cloudtap_proto::tunnel::v1 as pb;
use cloudtap_replay::diff::{DEFAULT_IGNORED, DiffOptions};
use cloudtap_replay::plan::parse_header;
use cloudtap_replay::{
    Dialer, Filter, Io, Plan, PlanOptions, Progress, Recording, Report, RunOptions, Speed, mirrored,
};
use cloudtap_schemas::Record;

/// The queries that read a session's records: its events, its exchanges, and the
/// frames of streams that are not HTTP/1 (HTTP/1 is replayed from its exchanges;
/// HTTP/2 from its bytes, when they were captured).
pub fn fetch_sql(session: &str) -> [String; 3] {
    let lit = format!("'{}'", session.replace('\'', "''"));
    [
        format!("SELECT * FROM events WHERE session_id = {lit}"),
        format!("SELECT * FROM http_exchanges WHERE session_id = {lit}"),
        format!(
            "SELECT * FROM frames WHERE session_id = {lit} AND stream_id NOT IN \
             (SELECT stream_id FROM http_exchanges WHERE session_id = {lit} \
              AND protocol LIKE 'HTTP/1%' AND grpc_service IS NULL)"
        ),
    ]
}

/// The records in one answer to a [`fetch_sql`] query; an answer the row limit cut is
/// refused (a session replayed in part would be a lie).
pub fn records_of(
    session: &str,
    batches: &[arrow::array::RecordBatch],
    truncated: bool,
) -> anyhow::Result<Vec<Record>> {
    if truncated {
        anyhow::bail!(
            "session {session} has more records than the query service returns at once ([query] max_rows); raise it to replay this session"
        );
    }
    let mut records = Vec::new();
    for b in batches {
        records.extend(
            cloudtap_schemas::tables::records_from_batch(b).map_err(|e| {
                anyhow::anyhow!("the records of session {session} do not read back: {e}")
            })?,
        );
    }
    Ok(records)
}

/// What a replay was asked to do, as flags or as a `RunRequest` give it.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    pub target: Option<String>,
    pub speed: String,
    pub concurrency: usize,
    pub only: String,
    pub headers: Vec<String>,
    pub ignore_headers: Vec<String>,
    pub allow_writes: bool,
    pub dry_run: bool,
    pub timeout: Duration,
}

/// Checks and turns the ask into the engine's options; errors say what to fix.
pub fn options(a: &Ask) -> anyhow::Result<(PlanOptions, RunOptions)> {
    let speed = Speed::parse(if a.speed.is_empty() { "1" } else { &a.speed })?;
    let filter = Filter::parse(&a.only)?;
    let headers = a
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    if a.concurrency == 0 {
        anyhow::bail!("concurrency must be at least 1");
    }
    let mut ignored: Vec<String> = DEFAULT_IGNORED.iter().map(|h| h.to_string()).collect();
    ignored.extend(
        a.ignore_headers
            .iter()
            .map(|h| h.trim().to_ascii_lowercase()),
    );
    Ok((
        PlanOptions {
            filter,
            allow_writes: a.allow_writes,
            headers,
        },
        RunOptions {
            speed,
            concurrency: a.concurrency,
            diff: DiffOptions {
                ignored_headers: ignored,
            },
            timeout: a.timeout,
        },
    ))
}

/// The edge calls a replay makes, as whoever replays.
#[async_trait::async_trait]
pub trait Edge: Send + Sync {
    async fn open_tunnel(
        &self,
        target: &str,
        replay_of: &str,
    ) -> anyhow::Result<pb::OpenTunnelResponse>;
    async fn record(&self, report: ReplayReport) -> anyhow::Result<Recorded>;
    async fn close(&self, session_id: &str);
    /// A fresh session token for the replay's session: (token, expiry in unix seconds).
    async fn renew(&self, session_id: &str, session_token: &str) -> anyhow::Result<(String, i64)>;
    fn tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>>;
    /// A session's events and exchanges, as the replayer may read them.
    async fn session_records(&self, session: &str) -> anyhow::Result<Vec<Record>>;
}

/// How long the edge's mirror may take to record a replayed HTTP/2 stream's exchanges.
const MIRROR_WAIT: Duration = Duration::from_secs(10);

/// Streams through the replay's tunnel.
struct TunnelDialer(StreamOpener);

#[async_trait::async_trait]
impl Dialer for TunnelDialer {
    async fn dial(&self, label: &str) -> std::io::Result<Box<dyn Io>> {
        let s = self
            .0
            .open_stream(label)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Box::new(s))
    }
}

/// Renews the session token at two thirds of its life; returns only on refusal.
async fn keep_renewed(
    edge: &dyn Edge,
    session_id: &str,
    mut token: String,
    mut expires: i64,
) -> anyhow::Error {
    loop {
        let left = (expires - cloudtap_edge::token::now_unix()).max(0) as u64;
        tokio::time::sleep(Duration::from_secs((left * 2 / 3).max(1))).await;
        match edge.renew(session_id, &token).await {
            Ok((t, e)) => {
                token = t;
                expires = e;
            }
            Err(e) => return e,
        }
    }
}

/// Plain TCP connections to one address (`--direct`).
struct DirectDialer(String);

#[async_trait::async_trait]
impl Dialer for DirectDialer {
    async fn dial(&self, _label: &str) -> std::io::Result<Box<dyn Io>> {
        let s = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&self.0),
        )
        .await
        .map_err(|_| std::io::Error::other(format!("connecting to {} timed out", self.0)))??;
        s.set_nodelay(true)?;
        Ok(Box::new(s))
    }
}

/// Where a replay sends: through an edge (a tunnel opened with `replay_of`, findings
/// recorded on the edge), or straight to an address, with no edge at all.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    Edge(&'a dyn Edge),
    /// `HOST:PORT`, plain TCP.
    Direct(&'a str),
}

/// Replays the session `records` hold. `announce` hears what will be sent before
/// anything is. Through an edge, the findings are recorded before the tunnel closes; if
/// that fails, the error says so (with the counts; the report itself may hold
/// unredacted answers).
pub async fn replay(
    via: Via<'_>,
    source: &str,
    records: &[Record],
    ask: &Ask,
    progress: Option<Arc<dyn Progress>>,
    announce: impl Fn(String),
) -> anyhow::Result<Report> {
    let (plan_opts, run_opts) = options(ask)?;
    let recording = Recording::from_records(source, records)?;
    let target = ask
        .target
        .clone()
        .unwrap_or_else(|| recording.target.clone());
    let plan = Arc::new(Plan::new(&recording, &plan_opts));
    announce(format!(
        "replaying session {source} ({} to {}) to {target}: {} HTTP requests and {} streams to send, {} skipped, {} not fully restorable{}",
        recording.identity,
        recording.target,
        plan.http_requests(),
        plan.streams(),
        plan.skipped().count(),
        plan.not_restored().count(),
        if plan.filtered_out > 0 {
            format!(", {} left out by the filter", plan.filtered_out)
        } else {
            String::new()
        }
    ));
    if ask.dry_run {
        let mut report = Report::new(&plan, Vec::new(), Duration::ZERO);
        report.source_session = source.into();
        report.target = target;
        return Ok(report);
    }
    let edge = match via {
        Via::Edge(e) => e,
        Via::Direct(addr) => {
            let h2 = mirrored::expected(&plan);
            if h2 > 0 {
                announce(format!(
                    "--direct: the answers of {h2} HTTP/2 exchanges are not compared (that needs the edge's mirror); send through an edge to compare them"
                ));
            }
            announce(format!(
                "--direct: sending to {addr} with no edge; findings are not recorded"
            ));
            let progress = progress.filter(|_| plan.steps.len() > 1);
            let mut report = cloudtap_replay::run(
                plan.clone(),
                Arc::new(DirectDialer(addr.to_string())),
                run_opts,
                progress,
            )
            .await;
            report.source_session = source.into();
            report.target = addr.to_string();
            return Ok(report);
        }
    };
    let opened = edge.open_tunnel(&target, source).await?;
    let attached = match edge.tls() {
        Ok(tls) => Tunnel::attach(&tls, &opened.tunnel_addr, &opened.session_token, &target)
            .await
            .map_err(|e| anyhow::anyhow!("cannot attach to the replay's tunnel: {e}")),
        Err(e) => Err(e),
    };
    let tunnel = match attached {
        Ok(t) => t,
        Err(e) => {
            edge.close(&opened.session_id).await;
            return Err(e);
        }
    };
    let progress = progress.filter(|_| plan.steps.len() > 1);
    let diff_opts = run_opts.diff.clone();
    let run = cloudtap_replay::run(
        plan.clone(),
        Arc::new(TunnelDialer(tunnel.opener())),
        run_opts,
        progress,
    );
    // The session token is short-lived: renew it while the replay runs, as `proxy`
    // does, or a long replay (`--speed 1`) would lose its tunnel half way.
    let renewing = keep_renewed(
        edge,
        &opened.session_id,
        opened.session_token.clone(),
        opened.expires_unix,
    );
    tokio::pin!(renewing);
    let mut report = tokio::select! {
        r = run => r,
        e = &mut renewing => {
            edge.close(&opened.session_id).await;
            tunnel.close();
            return Err(e.context("the edge refused to renew the replay's session token, so the replay stopped"));
        }
    };
    // HTTP/2 streams are compared through what the edge mirrored of the replay, which
    // it appends as it parses: wait for it (bounded), then compare.
    let want = mirrored::expected(&plan);
    if want > 0 {
        let deadline = tokio::time::Instant::now() + MIRROR_WAIT;
        let mut records = Vec::new();
        loop {
            // A failed read is tried again until the deadline; then whatever was read
            // is compared (what is missing shows as `failed`).
            if let Ok(r) = edge.session_records(&opened.session_id).await {
                records = r;
            }
            if mirrored::seen(&records) >= want || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        report.add_streams(mirrored::compare(&plan, &records, &diff_opts));
    }
    report.source_session = source.into();
    report.target = target.clone();
    report.replay_session = opened.session_id.clone();

    // Recorded while the replay session is open: the edge checks it is this caller's
    // replay of this session.
    // Cut as the edge would (so a long report still fits one call), and when there are
    // more than a run may record, keep the differences before the notes.
    let (mut diffs, notes): (Vec<_>, Vec<_>) = report
        .findings
        .iter()
        .cloned()
        .partition(|d| cloudtap_replay::kind::is_difference(&d.kind));
    diffs.extend(notes);
    diffs.truncate(MAX_FINDINGS - 1);
    diffs.iter_mut().for_each(cut_fields);
    let mut summary = report.summary();
    if report.findings.len() >= MAX_FINDINGS {
        summary.note += &format!(
            "; only the first {} of {} findings recorded",
            MAX_FINDINGS - 1,
            report.findings.len()
        );
    }
    diffs.push(summary);
    let recorded = edge
        .record(ReplayReport {
            source_session: source.into(),
            replay_session: opened.session_id.clone(),
            target,
            diffs,
        })
        .await;
    edge.close(&opened.session_id).await;
    tunnel.close();
    let recorded = recorded.map_err(|e| {
        e.context(format!(
            "the replay ran ({} differing of {} sent), but the edge did not record its findings",
            report.differing,
            report.http_requests + report.streams
        ))
    })?;
    report.run_id = recorded.run_id;
    Ok(report)
}
