//! `cloudtapd`: parses flags and runs the chosen role.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cloudtap_cli::daemon::Cli::parse();
    cloudtap_cli::run_main("cloudtapd", "info", cloudtap_cli::daemon::main(cli))
}
