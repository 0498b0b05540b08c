//! `cloudtapd`: parses flags and runs the chosen role.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cloudtap_cli::daemon::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLOUDTAP_LOG_LEVEL")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(cloudtap_cli::daemon::main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloudtapd: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
