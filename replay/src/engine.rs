//! Sends a [`Plan`] and compares every answer with the recording.
//!
//! `concurrency` workers take the steps in recorded order. At `--speed 1` (or N) each
//! step waits for its recorded start (divided by N) measured from the start of the
//! run, and an opaque stream's chunks keep their recorded gaps within the stream; at
//! `max` nothing waits. HTTP requests reuse one keep-alive connection per worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cloudtap_schemas::ReplayDiff;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::diff::{self, DiffOptions, Replayed};
use crate::plan::{Plan, Request, Step};
use crate::rebuild::OpaqueStream;
use crate::report::Report;
use crate::{ReplayError, kind};

/// A connection to the target: a tunnel stream in `cloudtapctl`, a socket in tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Opens connections to the target. `label` names what the connection replays
/// (`replay`, `replay of stream 3`); through the edge it becomes the stream's
/// `client_addr`, which is how a replayed HTTP/2 stream's mirrored exchanges are found.
#[async_trait::async_trait]
pub trait Dialer: Send + Sync + 'static {
    async fn dial(&self, label: &str) -> std::io::Result<Box<dyn Io>>;
}

/// How the connection that replays source stream N is labelled: this, then N.
pub const STREAM_LABEL: &str = "replay of stream ";

/// The label of the connection that replays source stream `id`.
pub fn stream_label(id: u64) -> String {
    format!("{STREAM_LABEL}{id}")
}

/// Told after each step.
pub trait Progress: Send + Sync {
    fn advance(&self, done: usize, total: usize);
}

/// Slowest and fastest `--speed N`.
pub const MIN_SPEED: f64 = 0.01;
pub const MAX_SPEED: f64 = 1e6;

/// `--speed`: the recorded pace divided by a factor, or as fast as possible.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    Times(f64),
    Max,
}

impl Speed {
    pub fn parse(s: &str) -> Result<Self, ReplayError> {
        if s == "max" {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(f) if (MIN_SPEED..=MAX_SPEED).contains(&f) => Ok(Speed::Times(f)),
            _ => Err(ReplayError::Speed(s.into())),
        }
    }

    /// When something recorded `offset_nanos` after the origin is due.
    fn due(self, start: Instant, offset_nanos: i64) -> Option<Instant> {
        match self {
            Speed::Max => None,
            Speed::Times(f) => {
                let secs = (offset_nanos.max(0) as f64 / 1e9) / f;
                // Bounded speeds and recorded offsets keep this finite; saturate anyway.
                Duration::try_from_secs_f64(secs)
                    .ok()
                    .and_then(|d| start.checked_add(d))
                    .or(Some(start + Duration::from_secs(365 * 24 * 3600)))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub speed: Speed,
    pub concurrency: usize,
    pub diff: DiffOptions,
    /// How long one request, or a stream's silence, may last.
    pub timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            speed: Speed::Times(1.0),
            concurrency: 8,
            diff: DiffOptions::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Largest answer body read for a comparison (and most bytes read back from a stream
/// beyond what was recorded).
pub const MAX_BODY: usize = 64 << 20;
/// How long opening one connection through the tunnel may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends the plan and returns the report: the plan's notes and every difference.
pub async fn run(
    plan: Arc<Plan>,
    dialer: Arc<dyn Dialer>,
    opts: RunOptions,
    progress: Option<Arc<dyn Progress>>,
) -> Report {
    let started = Instant::now();
    let lanes = Arc::new(lanes(&plan));
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let opts = Arc::new(opts);
    let workers = opts.concurrency.max(1).min(lanes.len().max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (plan, lanes, dialer, opts, next, done, progress) = (
            plan.clone(),
            lanes.clone(),
            dialer.clone(),
            opts.clone(),
            next.clone(),
            done.clone(),
            progress.clone(),
        );
        tasks.spawn(async move {
            let mut conn: Option<SendRequest<Full<Bytes>>> = None;
            let mut found: Vec<(usize, Vec<ReplayDiff>)> = Vec::new();
            let steps = std::iter::from_fn(|| lanes.get(next.fetch_add(1, Ordering::Relaxed)))
                .flatten()
                .copied();
            for i in steps {
                let step = &plan.steps[i];
                if let Some(due) = opts.speed.due(started, step.at() - plan.origin) {
                    tokio::time::sleep_until(due.into()).await;
                }
                let diffs = match step {
                    Step::Http { recorded, request } => {
                        match send(&mut conn, &*dialer, request, opts.timeout).await {
                            Ok(got) => diff::http(recorded, &got, &opts.diff),
                            Err(e) => vec![diff::finding(
                                recorded,
                                kind::FAILED,
                                "request",
                                recorded.status.to_string(),
                                String::new(),
                                &e,
                            )],
                        }
                    }
                    Step::Stream(s) => stream(s, &*dialer, &opts).await,
                };
                found.push((i, diffs));
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(p) = &progress {
                    p.advance(n, plan.steps.len());
                }
            }
            found
        });
    }
    let mut per_step: Vec<(usize, Vec<ReplayDiff>)> = Vec::with_capacity(plan.steps.len());
    while let Some(r) = tasks.join_next().await {
        per_step.extend(r.expect("a replay worker panicked"));
    }
    per_step.sort_by_key(|(i, _)| *i);
    Report::new(&plan, per_step, started.elapsed())
}

/// The order steps must keep: when the plan sends writes, a recorded connection's
/// requests go one after another on one worker (a POST, then the GET of what it
/// made); otherwise every step may run beside any other. Each lane is in recorded
/// order, and lanes are by their first step.
fn lanes(plan: &Plan) -> Vec<Vec<usize>> {
    let writes = plan.steps.iter().any(|s| match s {
        Step::Http { request, .. } => !crate::plan::safe(&request.method),
        Step::Stream(_) => false,
    });
    if !writes {
        return (0..plan.steps.len()).map(|i| vec![i]).collect();
    }
    let mut by_stream: std::collections::BTreeMap<u64, usize> = Default::default();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, s) in plan.steps.iter().enumerate() {
        match s {
            Step::Http { recorded, .. } => match by_stream.get(&recorded.stream_id) {
                Some(&lane) => out[lane].push(i),
                None => {
                    by_stream.insert(recorded.stream_id, out.len());
                    out.push(vec![i]);
                }
            },
            Step::Stream(_) => out.push(vec![i]),
        }
    }
    out
}

/// One request on the worker's connection, opening a new one when there is none (or
/// when a reused one turns out to be closed, for requests safe to send again).
async fn send(
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    dialer: &dyn Dialer,
    req: &Request,
    timeout: Duration,
) -> Result<Replayed, String> {
    for attempt in 0..2 {
        let reused = conn.as_ref().is_some_and(|c| !c.is_closed());
        if !reused {
            *conn = Some(handshake(dialer).await?);
        }
        let sender = conn.as_mut().expect("a connection was just made");
        let once = async {
            sender.ready().await.map_err(|e| e.to_string())?;
            let resp = sender
                .send_request(build(req)?)
                .await
                .map_err(|e| format!("sending the request failed: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the answer failed: {e}"))?
                .to_bytes();
            Ok::<_, String>(Replayed {
                status: parts.status.as_u16(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                body: body.to_vec(),
            })
        };
        match tokio::time::timeout(timeout, once).await {
            Ok(Ok(r)) => {
                if r.headers
                    .iter()
                    .any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("close"))
                {
                    *conn = None;
                }
                return Ok(r);
            }
            // A kept-alive connection the target closed meanwhile: one more try on a
            // fresh one, for requests that are safe to send twice.
            Ok(Err(_)) if attempt == 0 && reused && crate::plan::safe(&req.method) => {
                *conn = None;
            }
            Ok(Err(e)) => {
                *conn = None;
                return Err(e);
            }
            Err(_) => {
                *conn = None;
                return Err(format!("no answer within {timeout:?}"));
            }
        }
    }
    unreachable!("the loop returns on its second attempt")
}

async fn handshake(dialer: &dyn Dialer) -> Result<SendRequest<Full<Bytes>>, String> {
    let io = tokio::time::timeout(DIAL_TIMEOUT, dialer.dial("replay"))
        .await
        .map_err(|_| format!("no connection to the target within {DIAL_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot connect to the target: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn build(req: &Request) -> Result<http::Request<Full<Bytes>>, String> {
    let mut b = http::Request::builder()
        .method(req.method.as_str())
        .uri(req.uri.as_str());
    for (n, v) in &req.headers {
        b = b.header(n.as_str(), v.as_str());
    }
    b.body(Full::new(Bytes::from(req.body.clone())))
        .map_err(|e| format!("the recorded request cannot be rebuilt: {e}"))
}

/// Sends an opaque stream's recorded bytes with their gaps, reads what comes back,
/// and compares it with what was recorded.
async fn stream(s: &OpaqueStream, dialer: &dyn Dialer, opts: &RunOptions) -> Vec<ReplayDiff> {
    let failed = |note: String| {
        vec![ReplayDiff {
            stream_id: s.stream_id,
            kind: kind::FAILED.into(),
            field: "stream".into(),
            note,
            ..Default::default()
        }]
    };
    let io = match tokio::time::timeout(DIAL_TIMEOUT, dialer.dial(&stream_label(s.stream_id))).await
    {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return failed(format!("cannot connect to the target: {e}")),
        Err(_) => {
            return failed(format!(
                "no connection to the target within {DIAL_TIMEOUT:?}"
            ));
        }
    };
    let (mut rd, mut wr) = tokio::io::split(io);
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(false);
    let expected = s.down.len();
    let timeout = opts.timeout;
    // An HTTP/2 connection stays open after its last answer and its bytes never match
    // the recording's length: stop once the target has been silent for as long as it
    // took to answer in the recording, and a second.
    let h2 = !s.mirrored.is_empty();
    // As long as the target took to finish answering in the recording, and a second
    // more, within --timeout.
    let answer_wait = (Duration::from_nanos((s.last_down_at - s.last_up_at).max(0) as u64)
        + Duration::from_secs(1))
    .min(timeout);
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(expected);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let sent = *sent_rx.borrow_and_update();
            // Once everything was sent and the recorded answer is in, wait briefly for
            // anything more; otherwise as long as the target may take.
            let idle = if sent && got.len() >= expected && !h2 {
                Duration::from_millis(200)
            } else if sent && h2 {
                answer_wait
            } else {
                timeout
            };
            tokio::select! {
                r = tokio::time::timeout(idle, rd.read(&mut buf)) => match r {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        got.extend_from_slice(&buf[..n]);
                        if got.len() > expected + MAX_BODY {
                            break; // the comparison already knows they differ
                        }
                    }
                    Err(_) if sent => break,
                    Err(_) => {}
                },
                _ = sent_rx.changed() => {}
            }
        }
        got
    });
    let begun = Instant::now();
    let mut write_error = None;
    for (ts, chunk) in &s.up {
        if let Some(due) = opts.speed.due(begun, ts - s.opened_at) {
            tokio::time::sleep_until(due.into()).await;
        }
        match tokio::time::timeout(opts.timeout, wr.write_all(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                write_error = Some(e.to_string());
                break;
            }
            Err(_) => {
                write_error = Some(format!("it took no bytes for {:?}", opts.timeout));
                break;
            }
        }
    }
    let _ = sent_tx.send(true);
    let got = reader.await.unwrap_or_default();
    let _ = wr.shutdown().await;
    // HTTP/2 answers are compared afterwards, from what the edge mirrored of them.
    let mut out: Vec<ReplayDiff> = if h2 {
        Vec::new()
    } else {
        diff::bytes(s.stream_id, &s.down, &got)
            .into_iter()
            .collect()
    };
    if let Some(e) = write_error {
        out.extend(failed(format!("the target stopped reading: {e}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(method: &str, stream: u64) -> Step {
        Step::Http {
            recorded: Box::new(cloudtap_schemas::HttpExchange {
                stream_id: stream,
                method: method.into(),
                ..Default::default()
            }),
            request: crate::plan::Request {
                method: method.into(),
                uri: "/".into(),
                headers: Vec::new(),
                body: Vec::new(),
            },
        }
    }

    #[test]
    fn writes_keep_their_connection_order_and_reads_run_free() {
        let mut plan = Plan {
            steps: vec![step("GET", 1), step("GET", 2), step("GET", 1)],
            ..Default::default()
        };
        assert_eq!(lanes(&plan), vec![vec![0], vec![1], vec![2]]);
        plan.steps[1] = step("POST", 1);
        plan.steps.push(step("GET", 3));
        assert_eq!(lanes(&plan), vec![vec![0, 1, 2], vec![3]]);
    }

    #[test]
    fn speeds() {
        assert_eq!(Speed::parse("max").unwrap(), Speed::Max);
        assert_eq!(Speed::parse("2").unwrap(), Speed::Times(2.0));
        assert_eq!(Speed::parse("0.5").unwrap(), Speed::Times(0.5));
        for bad in ["0", "-1", "fast", "inf", "NaN", "1e-300", "1e300", "0.001"] {
            assert!(Speed::parse(bad).is_err(), "{bad}");
        }
        let t = Instant::now();
        assert_eq!(
            Speed::Times(2.0).due(t, 1_000_000_000),
            Some(t + Duration::from_millis(500))
        );
        assert_eq!(Speed::Max.due(t, 5), None);
    }
}
