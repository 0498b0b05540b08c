//! `cloudtapctl`: parses flags and runs the command. Exit codes: 0 success, 1 the
//! command found what it exists to detect, 2 any other error (usage errors included).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = match cloudtap_cli::ctl::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    cloudtap_cli::run_main("cloudtapctl", "warn", cloudtap_cli::ctl::main(cli))
}
