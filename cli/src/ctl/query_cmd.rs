//! `cloudtapctl query` and `cloudtapctl sessions`: SQL over captured traffic through
//! the query service (gRPC `QueryService.Execute`, falling back to `POST /v1/query`
//! when no gRPC connection can be made), rendered as a table, CSV, JSON or Arrow IPC.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use clap::Subcommand;

use cloudtap_proto::query::v1 as qpb;
use qpb::query_service_client::QueryServiceClient;

use super::{CallError, CtlResult, Ctx, Format, login, status_error, user_token, with_bearer};
use crate::http_client;

#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// Captured sessions you may read, newest first.
    List {
        /// Only sessions to this target.
        #[arg(long)]
        target: Option<String>,
        /// Only sessions opened by this identity.
        #[arg(long)]
        user: Option<String>,
        /// Only sessions opened in this last stretch (e.g. 1h, 30m, 2d) or after
        /// this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only open or closed sessions.
        #[arg(long, value_parser = ["open", "closed"])]
        status: Option<String>,
        /// At most this many sessions.
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
    /// One session: its summary, streams, HTTP exchanges and timeline.
    Show { session_id: String },
}

/// A finished query: its batches and whether the row limit cut them.
pub(super) struct Answer {
    schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub truncated: bool,
}

fn query_error(e: CallError) -> anyhow::Error {
    anyhow::anyhow!(e)
}

/// Runs `sql` over gRPC, or over HTTP when no gRPC connection can be made.
async fn run_once(ctx: &Ctx, token: &str, sql: &str, max_rows: u64) -> Result<Answer, CallError> {
    let channel = match super::channel_or_http(ctx, "query service").await {
        Ok(c) => c,
        Err(http) => return run_http(&http, token, sql, max_rows).await,
    };
    let mut client = QueryServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let req = qpb::ExecuteRequest {
        sql: sql.to_string(),
        max_rows,
    };
    let mut stream = client
        .execute(with_bearer(req, token))
        .await
        .map_err(query_status)?
        .into_inner();
    let mut ipc = Vec::new();
    let mut truncated = false;
    while let Some(msg) = stream.message().await.map_err(query_status)? {
        ipc.extend_from_slice(&msg.arrow_ipc);
        if let Some(s) = msg.summary {
            truncated = s.truncated;
        }
    }
    decode(&ipc, truncated)
}

/// The query service puts its error code before the message (`bad_sql: …`).
pub(super) fn query_status(s: tonic::Status) -> CallError {
    let mut e = status_error(s);
    if let Some((code, msg)) = e.message.split_once(": ")
        && !code.contains(' ')
    {
        e.code = code.to_string();
        e.message = msg.to_string();
    }
    e
}

async fn run_http(base: &str, token: &str, sql: &str, max_rows: u64) -> Result<Answer, CallError> {
    let body = serde_json::json!({"sql": sql, "max_rows": max_rows});
    let (status, bytes) = http_client::call_accepting(
        base,
        "POST",
        "/v1/query",
        Some(token),
        Some(body.to_string().into_bytes()),
        cloudtap_query::service::ARROW_STREAM,
    )
    .await
    .map_err(|e| CallError {
        code: "unavailable".into(),
        message: e.to_string(),
    })?;
    if status != 200 {
        return Err(http_refusal(status, &bytes));
    }
    // The HTTP answer says in a header whether it was cut; the Arrow body cannot.
    decode(&bytes, false)
}

/// A query or export service's HTTP refusal (`{"code", "error"}`), or the raw answer
/// when it is not one.
pub(super) fn http_refusal(status: u16, bytes: &[u8]) -> CallError {
    let err: cloudtap_query::service::HttpError =
        serde_json::from_slice(bytes).unwrap_or(cloudtap_query::service::HttpError {
            code: "error".into(),
            error: format!("HTTP {status}: {}", String::from_utf8_lossy(bytes)),
        });
    CallError {
        code: err.code,
        message: err.error,
    }
}

fn decode(ipc: &[u8], truncated: bool) -> Result<Answer, CallError> {
    let bad = |e: arrow::error::ArrowError| CallError {
        code: "bad_response".into(),
        message: format!("the query service sent unreadable Arrow data: {e}"),
    };
    let reader = StreamReader::try_new(std::io::Cursor::new(ipc), None).map_err(bad)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().map_err(bad)?;
    Ok(Answer {
        schema,
        batches,
        truncated,
    })
}

/// A spinner on stderr (a terminal only) while `fut` runs longer than a moment.
async fn with_spinner<T>(fut: impl std::future::Future<Output = T>) -> T {
    if !std::io::stderr().is_terminal() {
        return fut.await;
    }
    let started = Instant::now();
    let spin = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        let mut i = 0;
        loop {
            eprint!(
                "\r{} running query… {:.1}s",
                frames[i % frames.len()],
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
            i += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::pin!(fut);
    let out = tokio::select! {
        v = &mut fut => v,
        () = spin => unreachable!("the spinner never ends"),
    };
    if started.elapsed() >= Duration::from_millis(300) {
        eprint!("\r\x1b[2K");
    }
    out
}

/// Runs `sql` with the user's token, logging in once more if the cached token was
/// refused as expired.
/// Runs `sql` where the command reads: the bundle given with `--from-bundle`, else the
/// query service.
pub(super) async fn run(ctx: &Ctx, sql: &str, max_rows: u64) -> CtlResult<Answer> {
    run_on(ctx, sql, max_rows, ctx.from_bundle.is_some()).await
}

/// Runs `sql` on the bundle (`bundle`: `--from-bundle` must be set) or the query service.
pub(super) async fn run_on(ctx: &Ctx, sql: &str, max_rows: u64, bundle: bool) -> CtlResult<Answer> {
    if let Some(file) = ctx.from_bundle.as_ref().filter(|_| bundle) {
        // No server: the bundle, loaded once per command into a throw-away archive.
        let (_, engine) = ctx
            .bundle
            .get_or_try_init(|| super::bundle_cmd::bundle_engine(ctx, file))
            .await?;
        let reader = crate::bundle::import::local_reader();
        let out = engine.execute(&reader, sql, Some(max_rows)).await?;
        let (schema, batches, truncated) = cloudtap_query::service::collect(out).await?;
        return Ok(Answer {
            schema,
            batches,
            truncated,
        });
    }
    let token = user_token(ctx).await?;
    let first = with_spinner(run_once(ctx, &token, sql, max_rows)).await;
    match first {
        Err(e)
            if ctx.g.token.is_none()
                && e.code == "unauthenticated"
                && e.message.contains("expired") =>
        {
            let fresh = login(ctx, None).await?.token;
            with_spinner(run_once(ctx, &fresh, sql, max_rows))
                .await
                .map_err(query_error)
        }
        r => r.map_err(query_error),
    }
}

fn render(format: Format, a: &Answer) -> CtlResult<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        Format::Table => {
            let table = arrow::util::pretty::pretty_format_batches(&a.batches)?;
            if a.batches.iter().all(|b| b.num_rows() == 0) {
                let names: Vec<&str> = a
                    .schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect();
                writeln!(out, "(no rows; columns: {})", names.join(", "))?;
            } else {
                writeln!(out, "{table}")?;
            }
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            if a.batches.is_empty() {
                w.write(&RecordBatch::new_empty(a.schema.clone()))?;
            }
            for b in &a.batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
            let refs: Vec<&RecordBatch> = a.batches.iter().collect();
            w.write_batches(&refs)?;
            w.finish()?;
        }
        Format::Arrow => {
            let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &a.schema)?;
            for b in &a.batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(out)
}

fn rows(a: &Answer) -> usize {
    a.batches.iter().map(RecordBatch::num_rows).sum()
}

/// `cloudtapctl query`.
pub async fn query(ctx: &Ctx, sql: &str, file: Option<PathBuf>, max_rows: u64) -> CtlResult<()> {
    let format = ctx.format;
    if format == Format::Arrow && file.is_none() && std::io::stdout().is_terminal() {
        anyhow::bail!("-o arrow writes binary Arrow IPC: pass --file PATH or redirect stdout");
    }
    let answer = run(ctx, sql, max_rows).await?;
    let bytes = render(format, &answer)?;
    match &file {
        Some(path) => std::fs::write(path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(&bytes).and_then(|()| stdout.flush())
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                return Err(e.into());
            }
        }
    }
    if let Some(path) = &file {
        eprintln!("{} row(s) written to {}", rows(&answer), path.display());
    }
    if answer.truncated {
        eprintln!(
            "cloudtapctl: the answer was cut at {} rows; add a LIMIT, narrow the WHERE, or pass --max-rows",
            rows(&answer)
        );
    }
    Ok(())
}

/// `'…'` with quotes doubled: a string literal safe to put in SQL.
pub(super) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `--since 1h` or `--since 2026-11-25T10:00:00Z` as a SQL timestamp expression.
fn since_expr(since: &str) -> CtlResult<String> {
    if let Ok(d) = humantime::parse_duration(since) {
        let micros = d.as_micros();
        return Ok(format!("now() - INTERVAL '{micros} microseconds'"));
    }
    if humantime::parse_rfc3339_weak(since).is_ok() {
        return Ok(format!("CAST({} AS TIMESTAMP)", literal(since)));
    }
    anyhow::bail!(
        "--since {since:?} is neither a duration (1h, 30m, 2d) nor a time (2026-11-25T10:00:00Z)"
    )
}

pub(super) fn session_id(id: &str) -> CtlResult<String> {
    let u = uuid::Uuid::parse_str(id.trim()).with_context(|| {
        format!("{id:?} is not a session id (a UUID, as `sessions list` shows)")
    })?;
    Ok(u.hyphenated().to_string())
}

/// The SQL behind `sessions list`.
fn list_sql(
    target: Option<&str>,
    user: Option<&str>,
    since: Option<&str>,
    status: Option<&str>,
    limit: u64,
) -> CtlResult<String> {
    let mut conds = Vec::new();
    if let Some(t) = target {
        conds.push(format!("target = {}", literal(t)));
    }
    if let Some(u) = user {
        conds.push(format!("identity = {}", literal(u)));
    }
    if let Some(s) = since {
        conds.push(format!("opened_at >= {}", since_expr(s)?));
    }
    if let Some(s) = status {
        conds.push(format!("status = {}", literal(s)));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    Ok(format!(
        "SELECT session_id, identity, target, status, opened_at, closed_at, \
         bytes_up, bytes_down, streams, close_reason FROM sessions{filter} \
         ORDER BY opened_at DESC LIMIT {limit}"
    ))
}

/// `cloudtapctl sessions …`.
pub async fn sessions(ctx: &Ctx, cmd: SessionsCmd) -> CtlResult<()> {
    let format = ctx.format;
    match cmd {
        SessionsCmd::List {
            target,
            user,
            since,
            status,
            limit,
        } => {
            let sql = list_sql(
                target.as_deref(),
                user.as_deref(),
                since.as_deref(),
                status.as_deref(),
                limit,
            )?;
            let a = run(ctx, &sql, limit).await?;
            std::io::stdout().write_all(&render(format, &a)?)?;
            Ok(())
        }
        SessionsCmd::Show { session_id: raw } => {
            let id = literal(&session_id(&raw)?);
            let parts: [(&str, String); 4] = [
                (
                    "session",
                    format!(
                        "SELECT session_id, identity, target, upstream, edge, status, opened_at, closed_at, \
                         close_reason, close_detail, bytes_up, bytes_down, streams, frames, records \
                         FROM sessions WHERE session_id = {id}"
                    ),
                ),
                (
                    "streams",
                    format!(
                        "SELECT stream_id, protocol_hint, client_addr, upstream_addr, opened_at, closed_at, \
                         bytes_up, bytes_down, frames_up, frames_down, status, error \
                         FROM streams WHERE session_id = {id} ORDER BY stream_id"
                    ),
                ),
                (
                    "exchanges",
                    format!(
                        "SELECT start_ts, stream_id, method, authority, path, status, grpc_status, \
                         duration_ms, request_body_size, response_body_size \
                         FROM http_exchanges WHERE session_id = {id} ORDER BY start_ts, exchange_index"
                    ),
                ),
                (
                    "timeline",
                    format!(
                        "SELECT ts, seq, kind, stream_id, coalesce(reason, error, detail, action, code, '') AS detail \
                         FROM events WHERE session_id = {id} \
                         UNION ALL \
                         SELECT start_ts, seq, 'http_exchange', stream_id, concat(method, ' ', path, ' → ', CAST(status AS VARCHAR)) \
                         FROM http_exchanges WHERE session_id = {id} \
                         ORDER BY seq"
                    ),
                ),
            ];
            let mut found = false;
            let mut json = serde_json::Map::new();
            for (name, sql) in &parts {
                let a = run(ctx, sql, 10_000).await?;
                if *name == "session" {
                    found = rows(&a) > 0;
                    if !found {
                        anyhow::bail!(
                            "no session {raw} that you may read: check the id with `cloudtapctl sessions list`"
                        );
                    }
                }
                match format {
                    Format::Json => {
                        let mut buf = Vec::new();
                        let mut w = arrow::json::ArrayWriter::new(&mut buf);
                        let refs: Vec<&RecordBatch> = a.batches.iter().collect();
                        w.write_batches(&refs)?;
                        w.finish()?;
                        let v: serde_json::Value = if buf.is_empty() {
                            serde_json::Value::Array(vec![])
                        } else {
                            serde_json::from_slice(&buf)?
                        };
                        json.insert((*name).to_string(), v);
                    }
                    Format::Table => {
                        println!("{}", name.to_uppercase());
                        std::io::stdout().write_all(&render(Format::Table, &a)?)?;
                        println!();
                    }
                    Format::Csv | Format::Arrow => {
                        anyhow::bail!("`sessions show` prints a table or JSON (-o table|json)")
                    }
                }
            }
            if format == Format::Json && found {
                println!("{}", serde_json::Value::Object(json));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_sql_quotes_what_it_is_given() {
        let sql = list_sql(Some("pay'ments"), Some("alice"), None, Some("open"), 10).unwrap();
        assert!(sql.contains("target = 'pay''ments'"), "{sql}");
        assert!(sql.contains("identity = 'alice'"), "{sql}");
        assert!(sql.contains("status = 'open'"), "{sql}");
        assert!(sql.ends_with("LIMIT 10"), "{sql}");
    }

    #[test]
    fn since_takes_durations_and_times() {
        assert_eq!(
            since_expr("1h").unwrap(),
            "now() - INTERVAL '3600000000 microseconds'"
        );
        assert!(
            since_expr("2026-11-25T10:00:00Z")
                .unwrap()
                .contains("CAST(")
        );
        assert!(since_expr("yesterday").is_err());
    }

    #[test]
    fn session_ids_are_checked() {
        assert!(session_id("nope'; DROP").is_err());
        assert_eq!(
            session_id("01900000-0000-7000-8000-0000000000A1").unwrap(),
            "01900000-0000-7000-8000-0000000000a1"
        );
    }
}
