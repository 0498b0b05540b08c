//! `cloudtapd`: runs the edge (and, in `all`, the built-in demo target) on the
//! embedded default or a configuration file.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use cloudtap_edge::config::{
    EdgeConfig, FsyncSetting, PolicyRule, TargetConfig, parse_target_flag,
};
use cloudtap_edge::pki::{DEV_ADMIN, DevPki, REPLAY_IDENTITY};
use cloudtap_edge::token::SigningKey;
use cloudtap_edge::{EdgeParams, Endpoints, Listeners, demo};
use cloudtap_recorder::FsyncPolicy;
use cloudtap_recorder::archive::{Recorder, RecorderSettings};
use cloudtap_recorder::store::{ObjectStore, open_store};

use crate::paths;

#[derive(Debug, Parser)]
#[command(
    name = "cloudtapd",
    version,
    about = "cloudtap server: the edge and its services"
)]
pub struct Cli {
    #[command(subcommand)]
    pub role: Role,
}

#[derive(Debug, Subcommand)]
pub enum Role {
    /// Everything in one process: the embedded default (local log, dev certificates,
    /// built-in demo-service target) unless a config says otherwise.
    All(ServerArgs),
    /// The edge alone: tunnel listener and control plane.
    Edge(ServerArgs),
    /// The recorder alone: reads the traffic log (as a member of the recorders'
    /// consumer group on Kafka) and writes the Parquet tables to the archive.
    Recorder(RecorderArgs),
    /// The query service alone: SQL (gRPC, Flight SQL, HTTP) over the archive and the
    /// log's unarchived tail, authenticated like the control plane.
    Query(QueryArgs),
    /// The replay service alone: runs replays for automation (gRPC ReplayService.Run,
    /// POST /v1/replay-runs) under its own identity, through an edge.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub node: QueryArgs,
    /// The edge's gRPC control plane (default: from <data dir>/endpoints.json).
    #[arg(long)]
    pub edge_grpc: Option<String>,
    /// The edge's tunnel port (default: from <data dir>/endpoints.json).
    #[arg(long)]
    pub edge_tunnel: Option<String>,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Data dir (default log and archive locations, development PKI).
    #[arg(long, env = "CLOUDTAP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file (its [policy], [tokens], [query] and [recorder]
    /// sections apply).
    #[arg(long, env = "CLOUDTAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC address: QueryService and Flight SQL (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9091")]
    pub grpc_addr: SocketAddr,
    /// HTTP address: POST /v1/query, /healthz, /metrics.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub http_addr: SocketAddr,
    /// Traffic log URL (default file://<data dir>/log). The node appends its audit
    /// records there, so a segment log must not be open in another process: use
    /// Kafka to run query nodes beside edges.
    #[arg(long, env = "CLOUDTAP_LOG")]
    pub log: Option<String>,
    /// Archive URL: file:///dir (default <data dir>/archive) or s3://bucket/prefix.
    #[arg(long, env = "CLOUDTAP_ARCHIVE")]
    pub archive: Option<String>,
}

#[derive(Debug, Args)]
pub struct RecorderArgs {
    /// Data dir (default log and archive locations).
    #[arg(long, env = "CLOUDTAP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file (its [recorder] section applies).
    #[arg(long, env = "CLOUDTAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Traffic log URL (default file://<data dir>/log). A segment log can be read by
    /// one process at a time: run the recorder inside `cloudtapd all`, or alone with
    /// --once after the edge has stopped.
    #[arg(long, env = "CLOUDTAP_LOG")]
    pub log: Option<String>,
    /// Archive URL: file:///dir (default <data dir>/archive) or s3://bucket/prefix.
    #[arg(long, env = "CLOUDTAP_ARCHIVE")]
    pub archive: Option<String>,
    /// Archive everything in the log now, then exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Data dir (log, certificates, endpoints.json).
    #[arg(long, env = "CLOUDTAP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file (see the README's configuration reference).
    #[arg(long, env = "CLOUDTAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC control plane address (port 0 picks a free port).
    #[arg(long, env = "CLOUDTAP_GRPC_ADDR", default_value = "127.0.0.1:9090")]
    pub grpc_addr: SocketAddr,
    /// HTTP API address.
    #[arg(long, env = "CLOUDTAP_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Tunnel listener address (TLS 1.3, client certificates required).
    #[arg(long, env = "CLOUDTAP_TUNNEL_ADDR", default_value = "127.0.0.1:7443")]
    pub tunnel_addr: SocketAddr,
    /// Extra target, NAME=HOST:PORT (repeatable).
    #[arg(long = "target", value_name = "NAME=HOST:PORT")]
    pub targets: Vec<String>,
    /// Traffic log URL (default file://<data dir>/log).
    #[arg(long, env = "CLOUDTAP_LOG")]
    pub log: Option<String>,
    /// fsync policy of the local log: group (default) or never (tmpfs/benchmarks).
    #[arg(long, value_parser = ["group", "never"])]
    pub log_fsync: Option<String>,
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    let (args, embedded) = match cli.role {
        Role::All(a) => (a, true),
        Role::Edge(a) => (a, false),
        Role::Recorder(a) => return recorder_main(a).await,
        Role::Query(a) => return node_main(a, None).await,
        Role::Replay(a) => {
            let edge = (a.edge_grpc, a.edge_tunnel);
            return node_main(a.node, Some(edge)).await;
        }
    };
    let data_dir = prepare_data_dir(args.data_dir.clone())?;
    let mut cfg = load_config(args.config.as_deref())?;
    for t in &args.targets {
        cfg.targets.push(parse_target_flag(t)?);
    }
    if let Some(f) = &args.log_fsync {
        cfg.log_fsync = if f == "never" {
            FsyncSetting::Never
        } else {
            FsyncSetting::Group
        };
    }

    let shutdown = CancellationToken::new();
    let mut demo_addr = None;
    if embedded {
        // The built-in target, on a loopback port of its own.
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        demo_addr = Some(addr);
        tokio::spawn(demo::serve(l, shutdown.clone()));
        if cfg.target(demo::DEMO_TARGET).is_none() {
            cfg.targets.push(TargetConfig {
                name: demo::DEMO_TARGET.into(),
                upstream: addr.to_string(),
                tls: None,
                protocol: Default::default(),
                capture: None,
                http_rules: Vec::new(),
                on_log_backpressure: Default::default(),
            });
        }
        if args.config.is_none() {
            // Embedded default: the development admin may reach every target; so may
            // the replay service, which also reads every session (for automation).
            cfg.policy.admins.push(DEV_ADMIN.into());
            cfg.policy.auditors.push(REPLAY_IDENTITY.into());
            cfg.policy.rules.push(PolicyRule {
                identities: vec![DEV_ADMIN.into(), REPLAY_IDENTITY.into()],
                targets: vec!["*".into()],
            });
        }
    }
    cfg.validate()?;

    let (cert, key, client_ca) = match &cfg.tls {
        Some(t) => (t.cert.clone(), t.key.clone(), t.client_ca.clone()),
        None => {
            let pki = DevPki::new(&data_dir);
            if pki.ensure()? {
                eprintln!(
                    "created development CA, certificates and token signing key in {}",
                    pki.dir.display()
                );
            }
            (pki.server_cert(), pki.server_key(), pki.ca_cert())
        }
    };
    let signing_key = signing_key(&cfg, &data_dir)?;
    let export_key = crate::query_role::export_key(&cfg, &data_dir, cfg.tls.is_none())?;
    if embedded && let Some(k) = &export_key {
        // The CLI on this machine trusts the bundles this server signs.
        paths::trust_export_key(&data_dir, &k.public_hex()).with_context(|| {
            format!(
                "cannot write the CLI's config {}",
                paths::cli_config(&data_dir).display()
            )
        })?;
    }

    let log = open_log(&cfg, args.log.as_deref(), &data_dir).await?;
    // In `all`, the recorder runs in this process on the same log.
    let recorder = if embedded {
        let (store, settings, url) = open_archive(&cfg, None, &data_dir).await?;
        Some((store, settings, url))
    } else {
        None
    };
    // In `all`, the query service reads the same archive and log, on the edge's
    // listeners.
    let query = match &recorder {
        Some((store, _, url)) => Some(crate::query_role::engine(
            &cfg,
            url,
            store.clone(),
            log.clone(),
        )?),
        None => None,
    };

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for {what}; is another cloudtapd running? pass --{what}-addr"))
    };
    let listeners = Listeners {
        grpc: bind(args.grpc_addr, "grpc").await?,
        http: bind(args.http_addr, "http").await?,
        tunnel: bind(args.tunnel_addr, "tunnel").await?,
    };
    let endpoints = Endpoints {
        grpc: listeners.grpc.local_addr()?,
        http: listeners.http.local_addr()?,
        tunnel: listeners.tunnel.local_addr()?,
        demo: demo_addr,
    };
    paths::write_endpoints(&data_dir, &endpoints).with_context(|| {
        format!(
            "cannot write {}",
            paths::endpoints_file(&data_dir).display()
        )
    })?;
    let loopback_only = [endpoints.grpc, endpoints.http, endpoints.tunnel]
        .iter()
        .all(|a| a.ip().is_loopback());
    let signals = shutdown_signal()?;
    println!(
        "cloudtapd {} ({})",
        env!("CARGO_PKG_VERSION"),
        if embedded { "all" } else { "edge" }
    );
    println!("  gRPC control  {}", endpoints.grpc);
    println!("  HTTP API      http://{}", endpoints.http);
    println!("  tunnel (mTLS) {}", endpoints.tunnel);
    if let Some(d) = demo_addr {
        println!("  demo-service  {d}");
    }
    println!("  traffic log   {}", log.describe());
    if let Some((store, _, _)) = &recorder {
        println!("  archive       {}", store.describe());
    }
    if query.is_some() {
        println!(
            "  query         SQL over gRPC, Flight SQL (grpc://{}) and POST http://{}/v1/query",
            endpoints.grpc, endpoints.http
        );
    }
    // In `all`, the replay service reaches this very edge.
    let replay_identity = match (&query, crate::replay_role::identity_tls(&cfg, &data_dir)?) {
        (Some(_), Some(tls)) => {
            println!(
                "  replay        gRPC ReplayService.Run and POST http://{}/v1/replay-runs",
                endpoints.http
            );
            Some(crate::replay_role::Identity {
                edge_grpc: format!("http://{}", endpoints.grpc),
                edge_tunnel: endpoints.tunnel.to_string(),
                tls,
            })
        }
        (Some(_), None) => {
            println!("  replay        off: set [replay] cert and key to give it an identity");
            None
        }
        _ => None,
    };
    println!("  data dir      {}", data_dir.display());
    if loopback_only {
        println!("  listening on loopback only (dev mode)");
    }
    println!(
        "ready: run `cloudtapctl proxy {}` in another shell",
        cfg.targets.first().map_or("<target>", |t| t.name.as_str())
    );

    let params = EdgeParams {
        config: cfg,
        log,
        tls_cert: cert,
        tls_key: key,
        client_ca,
        signing_key,
    };
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signals.await;
        eprintln!("cloudtapd: shutting down (draining tunnels, flushing the log)");
        stop.cancel();
    });
    let retention = params.config.log_retention();
    let recorder_task = recorder.map(|(store, settings, _)| {
        let rec = Recorder::new(params.log.clone(), store.clone(), settings.clone());
        tokio::spawn(retain_archived(
            params.log.clone(),
            rec.stats(),
            retention,
            shutdown.clone(),
        ));
        let stop = shutdown.clone();
        let log = params.log.clone();
        tokio::spawn(async move {
            // A failed recorder is started again (from its last commit marker) after a
            // pause, so archiving — and the log retention that depends on it — resumes.
            let stats = rec.stats();
            let mut rec = Some(rec);
            loop {
                let r = match rec.take() {
                    Some(r) => r,
                    None => Recorder::new(log.clone(), store.clone(), settings.clone())
                        .with_stats(stats.clone()),
                };
                match r.run(stop.clone()).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        tracing::error!(error = %e, "the recorder stopped; starting it again in 5 s");
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                            _ = stop.cancelled() => return Err(e),
                        }
                    }
                }
            }
        })
    });
    let edge = cloudtap_edge::run_with(params, listeners, shutdown.clone(), move |state| {
        let Some(engine) = query else {
            return cloudtap_edge::Mounts::default();
        };
        let q = crate::query_role::mounts(engine.clone(), state.clone(), export_key);
        match replay_identity {
            Some(me) => {
                crate::replay_role::add(q, crate::replay_role::Runner::new(engine, state, me))
            }
            None => q,
        }
    })
    .await;
    shutdown.cancel();
    if let Some(t) = recorder_task {
        match t.await {
            Ok(Err(e)) => eprintln!("cloudtapd: the recorder stopped: {e}"),
            Err(e) => eprintln!("cloudtapd: the recorder task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    edge?;
    Ok(())
}

/// Every minute, removes local-log segments the recorder has archived and the
/// retention policy lets go.
async fn retain_archived(
    log: std::sync::Arc<dyn cloudtap_recorder::EventLog>,
    stats: std::sync::Arc<cloudtap_recorder::archive::RecorderStats>,
    policy: cloudtap_recorder::Retention,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = shutdown.cancelled() => return,
        }
        let archived =
            cloudtap_recorder::Offsets(stats.archived_to.lock().expect("stats poisoned").clone());
        if let Err(e) = log.retain(&archived, policy).await {
            tracing::warn!(error = %e, "log retention failed; retrying in a minute");
        }
    }
}

fn prepare_data_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let data_dir = paths::data_dir(flag);
    check_data_dir(&data_dir)?;
    std::fs::create_dir_all(&data_dir).with_context(|| {
        format!(
            "cannot create the data dir {}; pass --data-dir",
            data_dir.display()
        )
    })?;
    Ok(data_dir)
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<EdgeConfig> {
    Ok(match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            EdgeConfig::from_toml(&text).with_context(|| format!("in {}", p.display()))?
        }
        None => EdgeConfig::default(),
    })
}

async fn open_log(
    cfg: &EdgeConfig,
    flag: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<dyn cloudtap_recorder::EventLog>> {
    // The flag (or CLOUDTAP_LOG) wins over the config file, as for --archive.
    let log_url = flag
        .map(str::to_owned)
        .or(cfg.log.clone())
        .unwrap_or_else(|| format!("file://{}", data_dir.join("log").display()));
    let fsync = match cfg.log_fsync {
        FsyncSetting::Never => FsyncPolicy::Never,
        FsyncSetting::Group => FsyncPolicy::Group {
            window: std::time::Duration::from_micros(cfg.log_group_commit_us),
        },
    };
    Ok(cloudtap_recorder::open_log(&log_url, fsync, cfg.log_min_free_mb * 1024 * 1024).await?)
}

async fn open_archive(
    cfg: &EdgeConfig,
    flag: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<(std::sync::Arc<dyn ObjectStore>, RecorderSettings, String)> {
    let url = flag
        .map(str::to_owned)
        .or(cfg.recorder.archive.clone())
        .unwrap_or_else(|| format!("file://{}", data_dir.join("archive").display()));
    let store = open_store(&url, &cfg.recorder.s3).await?;
    Ok((store, cfg.recorder.settings(), url))
}

/// The token signing key the configuration names, else the development one.
fn signing_key(cfg: &EdgeConfig, data_dir: &std::path::Path) -> anyhow::Result<SigningKey> {
    let path = cfg
        .tokens
        .signing_key
        .clone()
        .unwrap_or_else(|| DevPki::new(data_dir).signing_key());
    let seed = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the token signing key {}", path.display()))?;
    SigningKey::from_seed_hex(&seed).with_context(|| format!("in {}", path.display()))
}

/// `cloudtapd query`, or with `replay` = the edge's (gRPC, tunnel) addresses as given,
/// `cloudtapd replay`: a node with the edge's token checks and an audit chain of its
/// own, no tunnel port.
async fn node_main(
    args: QueryArgs,
    replay: Option<(Option<String>, Option<String>)>,
) -> anyhow::Result<()> {
    let role = if replay.is_some() { "replay" } else { "query" };
    let data_dir = prepare_data_dir(args.data_dir.clone())?;
    let mut cfg = load_config(args.config.as_deref())?;
    if args.config.is_none() {
        // Like the embedded default: the development admin reads everything, and so
        // does the replay service.
        cfg.policy.admins.push(DEV_ADMIN.into());
        cfg.policy.auditors.push(REPLAY_IDENTITY.into());
    }
    // The node's own chain (audits, heartbeats) is named apart from any edge's.
    cfg.name = format!("{}-{role}", cfg.name);
    cfg.validate()?;
    let pki = DevPki::new(&data_dir);
    let (cert, key, client_ca) = match &cfg.tls {
        Some(t) => (t.cert.clone(), t.key.clone(), t.client_ca.clone()),
        None => (pki.server_cert(), pki.server_key(), pki.ca_cert()),
    };
    let signing_key = signing_key(&cfg, &data_dir).context(
        "the query node checks tokens with the issuer's key: start `cloudtapd all` once to create the development one, or set [tokens] signing_key",
    )?;
    let export_key = crate::query_role::export_key(&cfg, &data_dir, cfg.tls.is_none())?;
    let log = open_log(&cfg, args.log.as_deref(), &data_dir).await?;
    let (store, _, url) = open_archive(&cfg, args.archive.as_deref(), &data_dir).await?;
    let engine = crate::query_role::engine(&cfg, &url, store.clone(), log.clone())?;
    let replay = match replay {
        None => None,
        Some((grpc, tunnel)) => {
            let known = paths::read_endpoints(&data_dir);
            let grpc = grpc
                .or_else(|| known.as_ref().map(|e| e.grpc.to_string()))
                .context(
                    "where is the edge? pass --edge-grpc (or start the edge with this --data-dir)",
                )?;
            let tunnel = tunnel
                .or_else(|| known.as_ref().map(|e| e.tunnel.to_string()))
                .context("where is the edge's tunnel port? pass --edge-tunnel")?;
            let tls = crate::replay_role::identity_tls(&cfg, &data_dir)?.context(
                "the replay service needs an identity: set [replay] cert and key (a client certificate the edge's CA issued)",
            )?;
            Some(crate::replay_role::Identity {
                edge_grpc: if grpc.contains("://") {
                    grpc
                } else {
                    format!("http://{grpc}")
                },
                edge_tunnel: tunnel,
                tls,
            })
        }
    };
    let grpc = TcpListener::bind(args.grpc_addr).await.with_context(|| {
        format!(
            "cannot listen on {} for gRPC; pass --grpc-addr",
            args.grpc_addr
        )
    })?;
    let http = TcpListener::bind(args.http_addr).await.with_context(|| {
        format!(
            "cannot listen on {} for HTTP; pass --http-addr",
            args.http_addr
        )
    })?;
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    let signals = shutdown_signal()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signals.await;
        eprintln!("cloudtapd {role}: shutting down");
        stop.cancel();
    });
    println!("cloudtapd {} ({role})", env!("CARGO_PKG_VERSION"));
    match &replay {
        None => {
            println!("  gRPC          {grpc_addr} (QueryService, Flight SQL)");
            println!("  HTTP API      http://{http_addr}/v1/query");
        }
        Some(me) => {
            println!("  gRPC          {grpc_addr} (ReplayService)");
            println!("  HTTP API      http://{http_addr}/v1/replay-runs");
            println!(
                "  edge          {} (tunnel {})",
                me.edge_grpc, me.edge_tunnel
            );
        }
    }
    println!("  traffic log   {}", log.describe());
    println!("  archive       {}", store.describe());
    // Written under its own name: the edge's endpoints.json stays the CLI's default.
    let file = data_dir.join(format!("{role}-endpoints.json"));
    std::fs::write(
        &file,
        serde_json::json!({"grpc": grpc_addr, "http": http_addr}).to_string(),
    )
    .with_context(|| format!("cannot write {}", file.display()))?;
    if replay.is_some() {
        println!("ready: POST http://{http_addr}/v1/replay-runs {{\"source_session\": …}}");
    } else {
        println!(
            "ready: `cloudtapctl --server {grpc_addr} --http-url http://{http_addr} query \"SELECT …\"`"
        );
    }
    let params = EdgeParams {
        config: cfg,
        log,
        tls_cert: cert,
        tls_key: key,
        client_ca,
        signing_key,
    };
    cloudtap_edge::run_node(params, grpc, http, shutdown, move |state| match replay {
        None => crate::query_role::mounts(engine, state, export_key),
        Some(me) => crate::replay_role::add(
            cloudtap_edge::Mounts::default(),
            crate::replay_role::Runner::new(engine, state, me),
        ),
    })
    .await?;
    Ok(())
}

async fn recorder_main(args: RecorderArgs) -> anyhow::Result<()> {
    let data_dir = prepare_data_dir(args.data_dir.clone())?;
    let cfg = load_config(args.config.as_deref())?;
    let log = open_log(&cfg, args.log.as_deref(), &data_dir).await?;
    let (store, settings, _) = open_archive(&cfg, args.archive.as_deref(), &data_dir).await?;
    let signals = shutdown_signal()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signals.await;
        eprintln!("cloudtapd recorder: shutting down (committing what is pending)");
        stop.cancel();
    });
    println!("cloudtapd {} (recorder)", env!("CARGO_PKG_VERSION"));
    println!("  traffic log   {}", log.describe());
    println!("  archive       {}", store.describe());
    let rec = Recorder::new(log.clone(), store, settings);
    if args.once {
        let started = std::time::Instant::now();
        let stats = rec.stats();
        let report = rec.drain(&shutdown).await?;
        let archived =
            cloudtap_recorder::Offsets(stats.archived_to.lock().expect("stats poisoned").clone());
        let removed = log.retain(&archived, cfg.log_retention()).await?;
        if removed > 0 {
            println!("log retention removed {removed} archived segments");
        }
        println!(
            "archived {} records in {} ranges ({} duplicates dropped) in {:.1} s",
            report.records,
            report.ranges,
            report.duplicates,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    println!("ready: archiving as the log grows (Ctrl-C to stop)");
    rec.run(shutdown).await?;
    Ok(())
}

/// Registers SIGINT and SIGTERM handlers now (so a signal that arrives right after
/// "ready" is not lost) and returns a future that resolves on the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Refuses a data dir path that is a file, before anything is written.
fn check_data_dir(p: &std::path::Path) -> anyhow::Result<()> {
    if p.is_file() {
        bail!("--data-dir {} is a file; give a directory", p.display());
    }
    Ok(())
}
