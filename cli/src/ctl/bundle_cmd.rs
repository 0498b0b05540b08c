//! `cloudtapctl export`, `bundle verify`, `import`, and the local engine behind
//! `--from-bundle`.
//!
//! Export goes to the export service over gRPC (`ExportService.Export`), falling back to
//! `POST /v1/exports` when no gRPC connection can be made; the bundle is written to
//! `<file>.part` and renamed into place only once complete.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand};
use http_body_util::BodyExt;

use cloudtap_edge::token::VerifyingKey;
use cloudtap_proto::query::v1 as qpb;
use cloudtap_query::QueryEngine;
use cloudtap_recorder::store::S3Settings;
use qpb::export_service_client::ExportServiceClient;

use super::{CallError, CtlResult, Ctx, Output, login, status_error, user_token, with_bearer};
use crate::bundle::import::{Imported, import, local_archive};
use crate::bundle::{Bundle, BundleError, Verification};
use crate::{http_client, paths};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Sessions to export (ids from `cloudtapctl sessions list`); or select them with
    /// --since/--until/--where.
    sessions: Vec<String>,
    /// Sessions open at any time since this stretch ago (1h, 30m, 2d) or this time
    /// (RFC 3339, e.g. 2026-11-25T10:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// … and until this time (or this stretch ago).
    #[arg(long)]
    until: Option<String>,
    /// Sessions matching this SQL predicate over the `sessions` table's columns, e.g.
    /// "target = 'orders' AND identity = 'alice'".
    #[arg(long = "where")]
    predicate: Option<String>,
    /// Where to write the bundle (e.g. incident.tar.zst).
    #[arg(long)]
    file: PathBuf,
    /// Replace the file if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Check a bundle: every file against the manifest, every session's hash chain,
    /// and the signature against a trusted export key, each reported on its own.
    /// Exits 0 when all three hold, 1 otherwise (a corrupt or truncated file included).
    Verify {
        file: PathBuf,
        /// An export public key to trust (64 hex digits, or a file holding them);
        /// repeatable. Default: the keys in the CLI's config (<data dir>/cli/config.toml).
        #[arg(long)]
        trust: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    file: PathBuf,
    /// As for `bundle verify`.
    #[arg(long)]
    trust: Vec<String>,
    /// The archive directory to load into (default: the embedded default's,
    /// <data dir>/archive); local directories only.
    #[arg(long)]
    archive: Option<String>,
}

/// A time flag: a stretch back from now, or an RFC 3339 time; unix nanoseconds.
fn time_flag(flag: &str, v: &str) -> CtlResult<i64> {
    let t = if let Ok(d) = humantime::parse_duration(v) {
        SystemTime::now().checked_sub(d)
    } else if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        Some(t)
    } else {
        anyhow::bail!(
            "--{flag} {v:?} is neither a duration (1h, 30m, 2d) nor a time (2026-11-25T10:00:00Z)"
        );
    };
    t.and_then(crate::export_role::unix_nanos)
        .with_context(|| format!("--{flag} {v:?} is outside 1970 to 2262"))
}

/// `[####      ] 1.2 MiB / 3.4 MiB` on stderr.
fn progress(done: u64, total: u64) {
    let width = 30;
    let filled = (done.min(total) * width / total.max(1)) as usize;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprint!(
        "\r[{}{}] {:.1} / {:.1} MiB",
        "#".repeat(filled),
        " ".repeat(width as usize - filled),
        mib(done),
        mib(total)
    );
}

/// Where the download goes until it is complete: `FILE.<pid>.part`, removed unless
/// renamed into place.
struct Part {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
    total: u64,
    bar: bool,
    done: bool,
}

impl Part {
    fn create(target: &Path) -> CtlResult<Part> {
        let mut name = target.as_os_str().to_owned();
        name.push(format!(".{}.part", std::process::id()));
        let path = PathBuf::from(name);
        let file = std::fs::File::create_new(&path).with_context(|| {
            format!(
                "cannot create {} (left by an export that was killed? remove it)",
                path.display()
            )
        })?;
        Ok(Part {
            path,
            file,
            written: 0,
            total: 0,
            bar: std::io::stderr().is_terminal(),
            done: false,
        })
    }

    fn write(&mut self, data: &[u8]) -> CtlResult<()> {
        self.file
            .write_all(data)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.written += data.len() as u64;
        if self.bar {
            progress(self.written, self.total);
        }
        Ok(())
    }

    fn finish(mut self, target: &Path) -> CtlResult<u64> {
        if self.bar {
            eprint!("\r\x1b[2K");
        }
        if self.written != self.total {
            anyhow::bail!(
                "the export stopped after {} of {} bytes; run it again",
                self.written,
                self.total
            );
        }
        self.file.sync_all()?;
        std::fs::rename(&self.path, target)
            .with_context(|| format!("cannot move the bundle to {}", target.display()))?;
        self.done = true;
        Ok(self.written)
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One export attempt; `Err` carries the service's refusal.
async fn export_once(
    ctx: &Ctx,
    token: &str,
    req: &qpb::ExportRequest,
    file: &Path,
) -> Result<CtlResult<(u64, usize)>, CallError> {
    let channel = match super::channel_or_http(ctx, "export service").await {
        Ok(c) => c,
        Err(http) => return export_http(&http, token, req, file).await,
    };
    let mut client = ExportServiceClient::new(channel);
    let mut stream = client
        .export(with_bearer(req.clone(), token))
        .await
        .map_err(super::query_cmd::query_status)?
        .into_inner();
    let mut part = match Part::create(file) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let mut sessions = None;
    while let Some(msg) = stream.message().await.map_err(status_error)? {
        if let Some(h) = msg.header {
            part.total = h.bundle_bytes;
            sessions = Some(h.sessions.len());
        }
        if sessions.is_none() {
            return Err(CallError {
                code: "error".into(),
                message: "the export service sent data before its header; is the server a cloudtapd of this version?".into(),
            });
        }
        if let Err(e) = part.write(&msg.data) {
            return Ok(Err(e));
        }
    }
    let Some(sessions) = sessions else {
        return Err(CallError {
            code: "error".into(),
            message: "the export service ended its answer without sending anything; try again"
                .into(),
        });
    };
    Ok(part.finish(file).map(|n| (n, sessions)))
}

async fn export_http(
    base: &str,
    token: &str,
    req: &qpb::ExportRequest,
    file: &Path,
) -> Result<CtlResult<(u64, usize)>, CallError> {
    // Nanosecond RFC 3339, so the server reads back the same instants.
    let time = |ns: i64| {
        (ns != 0).then(|| {
            let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64);
            humantime::format_rfc3339_nanos(t).to_string()
        })
    };
    let body = crate::bundle::Selection {
        sessions: req.sessions.clone(),
        since: time(req.since_unix_nanos),
        until: time(req.until_unix_nanos),
        predicate: (!req.r#where.is_empty()).then(|| req.r#where.clone()),
    };
    let body = serde_json::to_string(&body).expect("the body serializes");
    let unavailable = |e: String| CallError {
        code: "unavailable".into(),
        message: e,
    };
    let resp = http_client::send(
        base,
        "POST",
        "/v1/exports",
        Some(token),
        Some(body.into_bytes()),
        "application/zstd",
    )
    .await
    .map_err(|e| unavailable(e.to_string()))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .to_bytes();
        return Err(super::query_cmd::http_refusal(status, &bytes));
    }
    let Some(total) = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    else {
        return Err(unavailable(
            "the export answer has no Content-Length, so a cut download could not be told from a whole one".into(),
        ));
    };
    let sessions = resp
        .headers()
        .get("x-cloudtap-sessions")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut part = match Part::create(file) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    part.total = total;
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| unavailable(format!("the download broke off: {e}")))?;
        if let Some(data) = frame.data_ref()
            && let Err(e) = part.write(data)
        {
            return Ok(Err(e));
        }
    }
    Ok(part.finish(file).map(|n| (n, sessions)))
}

pub async fn export(ctx: &Ctx, a: ExportArgs) -> CtlResult<()> {
    let mut sessions = Vec::new();
    for s in &a.sessions {
        sessions.push(super::query_cmd::session_id(s)?);
    }
    let req = qpb::ExportRequest {
        sessions,
        since_unix_nanos: a
            .since
            .as_deref()
            .map(|v| time_flag("since", v))
            .transpose()?
            .unwrap_or(0),
        until_unix_nanos: a
            .until
            .as_deref()
            .map(|v| time_flag("until", v))
            .transpose()?
            .unwrap_or(0),
        r#where: a.predicate.clone().unwrap_or_default(),
    };
    if req.sessions.is_empty()
        && req.since_unix_nanos == 0
        && req.until_unix_nanos == 0
        && req.r#where.is_empty()
    {
        anyhow::bail!("say which sessions to export: ids, or --since/--until/--where");
    }
    if a.file.exists() && !a.force {
        anyhow::bail!(
            "{} exists; pass --force to replace it, or choose another --file",
            a.file.display()
        );
    }
    let token = user_token(ctx).await?;
    let first = export_once(ctx, &token, &req, &a.file).await;
    let done = match first {
        Err(e)
            if ctx.g.token.is_none()
                && e.code == "unauthenticated"
                && e.message.contains("expired") =>
        {
            let fresh = login(ctx, None).await?.token;
            export_once(ctx, &fresh, &req, &a.file).await
        }
        r => r,
    };
    let (bytes, sessions) = done.map_err(|e| anyhow::anyhow!(e))??;
    let mut out = std::io::stdout().lock();
    match ctx.output {
        Output::Json => writeln!(
            out,
            "{}",
            serde_json::json!({"file": a.file, "bytes": bytes, "sessions": sessions})
        )?,
        Output::Table => writeln!(
            out,
            "wrote {} ({bytes} bytes{}); check it with `cloudtapctl bundle verify {}`",
            a.file.display(),
            if sessions == 0 {
                String::new()
            } else {
                format!(", {sessions} sessions")
            },
            a.file.display()
        )?,
    }
    Ok(())
}

/// The keys `--trust` names, else those in the CLI's config.
fn trusted(ctx: &Ctx, flags: &[String]) -> CtlResult<Vec<VerifyingKey>> {
    let texts: Vec<(String, String)> = if flags.is_empty() {
        paths::read_cli_config(&ctx.data_dir)?
            .bundle
            .trusted_export_keys
            .into_iter()
            .map(|k| {
                (
                    k.clone(),
                    format!(
                        "{} (trusted_export_keys)",
                        paths::cli_config(&ctx.data_dir).display()
                    ),
                )
            })
            .collect()
    } else {
        let mut v = Vec::new();
        for f in flags {
            let looks_hex = f.len() == 64 && f.bytes().all(|b| b.is_ascii_hexdigit());
            if looks_hex {
                v.push((f.clone(), "--trust".into()));
            } else {
                let text = std::fs::read_to_string(f).with_context(|| {
                    format!("--trust {f:?} is neither 64 hex digits nor a readable key file")
                })?;
                v.push((text.trim().to_string(), f.clone()));
            }
        }
        v
    };
    texts
        .into_iter()
        .map(|(k, from)| {
            VerifyingKey::from_hex(&k)
                .map_err(|e| anyhow::anyhow!("the export key from {from} is not usable: {e}"))
        })
        .collect()
}

fn render(out: &mut impl Write, file: &Path, v: &Verification) -> std::io::Result<()> {
    writeln!(out, "bundle {}", file.display())?;
    for (name, c) in [
        ("files", &v.files),
        ("chains", &v.chains),
        ("signature", &v.signature),
    ] {
        writeln!(
            out,
            "  {name:<10} {:<4}  {}",
            if c.ok { "ok" } else { "FAIL" },
            if c.ok { c.summary.as_str() } else { "" }
        )?;
        for p in &c.problems {
            writeln!(out, "               {p}")?;
        }
    }
    writeln!(
        out,
        "{}",
        if v.ok() {
            "verified"
        } else {
            "verification FAILED"
        }
    )
}

/// Exit 1 for a bundle that fails; 2 for anything else that goes wrong.
pub async fn verify(ctx: &Ctx, file: &Path, trust: &[String]) -> CtlResult<()> {
    let keys = trusted(ctx, trust)?;
    let bundle = match Bundle::open(file) {
        Ok(b) => b,
        Err(BundleError::Corrupt(msg)) => {
            eprintln!("cloudtapctl: {msg}");
            std::process::exit(1);
        }
        Err(e) => return Err(e.into()),
    };
    let v = bundle.verify(&keys);
    let mut out = std::io::stdout().lock();
    match ctx.output {
        Output::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "file": file, "ok": v.ok(),
                "files": v.files, "chains": v.chains, "signature": v.signature,
            }))?
        )?,
        Output::Table => render(&mut out, file, &v)?,
    }
    out.flush()?;
    if !v.ok() {
        std::process::exit(1);
    }
    Ok(())
}

/// Opens and checks a bundle for loading: files and chains must hold; so must the
/// signature when `need_signature`, else a failed one is only a warning.
fn checked(ctx: &Ctx, file: &Path, trust: &[String], need_signature: bool) -> CtlResult<Bundle> {
    let keys = trusted(ctx, trust)?;
    let bundle = Bundle::open(file)?;
    let v = bundle.verify(&keys);
    if !v.files.ok || !v.chains.ok {
        let mut problems = v.files.problems.clone();
        problems.extend(v.chains.problems.iter().cloned());
        anyhow::bail!(
            "{} does not verify ({}); `cloudtapctl bundle verify {}` says more",
            file.display(),
            problems.join("; "),
            file.display()
        );
    }
    if !v.signature.ok {
        let why = v.signature.problems.join("; ");
        if need_signature {
            anyhow::bail!(
                "{}: {why}; import only what a server you trust signed (--trust KEY)",
                file.display()
            );
        }
        eprintln!(
            "cloudtapctl: warning: {}: signature not checked against a trusted key ({why})",
            file.display()
        );
    }
    Ok(bundle)
}

pub async fn import_cmd(ctx: &Ctx, a: ImportArgs) -> CtlResult<()> {
    if a.archive
        .as_deref()
        .is_some_and(|u| u.contains("://") && !u.starts_with("file://"))
    {
        anyhow::bail!(
            "--archive takes a directory (or file://DIR); this build imports into local archives only"
        );
    }
    let bundle = checked(ctx, &a.file, &a.trust, true)?;
    let url = a
        .archive
        .clone()
        .unwrap_or_else(|| format!("file://{}", ctx.data_dir.join("archive").display()));
    let (store, engine) = local_archive(&url, &S3Settings::default()).await?;
    let done: Imported = import(&bundle, store.as_ref(), &engine, false).await?;
    let mut out = std::io::stdout().lock();
    match ctx.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&done)?)?,
        Output::Table => {
            if done.bundle_already_imported {
                writeln!(
                    out,
                    "{} was imported before: nothing changed",
                    a.file.display()
                )?;
            } else {
                writeln!(
                    out,
                    "imported {} sessions ({} rows in {} files) into {}",
                    done.sessions.len(),
                    done.rows,
                    done.files,
                    store.describe()
                )?;
                for s in &done.sessions {
                    writeln!(out, "  {s}")?;
                }
            }
            if !done.already_present.is_empty() {
                writeln!(
                    out,
                    "already in the archive, left as they are: {}",
                    done.already_present.join(", ")
                )?;
            }
        }
    }
    Ok(())
}

/// The engine over a bundle, for `--from-bundle`: the bundle loaded into a throw-away
/// archive in a temporary directory that lives as long as the command.
pub async fn bundle_engine(
    ctx: &Ctx,
    file: &Path,
) -> CtlResult<(tempfile::TempDir, Arc<QueryEngine>)> {
    let bundle = checked(ctx, file, &[], false)?;
    let dir = tempfile::tempdir().context("no temporary directory for the bundle")?;
    let url = dir.path().display().to_string();
    let (store, engine) = local_archive(&url, &S3Settings::default()).await?;
    import(&bundle, store.as_ref(), &engine, true).await?;
    Ok((dir, engine))
}
