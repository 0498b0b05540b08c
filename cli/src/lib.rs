//! `cloudtapd` and `cloudtapctl`: flag parsing, configuration loading and composition
//! of the library crates. Logic lives in the libraries; this crate only wires it up.

pub mod bundle;
pub mod ctl;
pub mod daemon;
pub mod export_role;
mod http_client;
pub mod paths;
pub mod query_role;
pub mod replay_role;
pub mod replay_run;

/// The `main` both binaries share: logs to stderr at `default_level` (or
/// `CLOUDTAP_LOG_LEVEL`), runs `body` on a multi-threaded runtime, and maps an error to
/// exit code 2 with the error chain on stderr.
pub fn run_main<F>(name: &str, default_level: &str, body: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLOUDTAP_LOG_LEVEL")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(body) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
