//! `osps-watchdog`: will start and supervise the dispatcher (issue 3). Until
//! then it says so and exits non-zero, so nothing mistakes it for a supervisor.

use clap::Parser;

/// Supervises an OSPS dispatcher (not implemented yet).
#[derive(Debug, Parser)]
#[command(name = "osps-watchdog", version)]
struct Args {
    /// Instance name.
    #[arg(long, env = "OSPS_INSTANCE", default_value = "default")]
    instance: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    eprintln!(
        "osps-watchdog: supervision is not implemented yet (instance {:?}); run osps-dispatcher directly",
        args.instance
    );
    std::process::ExitCode::from(2)
}
