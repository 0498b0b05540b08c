//! `cloudtapctl`: parses flags and runs the command. Exit codes: 0 success, 1 the
//! command found what it exists to detect, 2 any other error.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = match cloudtap_cli::ctl::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLOUDTAP_LOG_LEVEL")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(cloudtap_cli::ctl::main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloudtapctl: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
