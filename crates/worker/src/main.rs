//! `osps-worker`: the secondary server. Started by the dispatcher with its
//! stdin and stdout as the job and result pipes; can be run alone for
//! debugging by feeding it frames.

use clap::Parser;

/// Runs OSPS jobs read from stdin on a shared-memory segment, answering on stdout.
#[derive(Debug, Parser)]
#[command(name = "osps-worker", version)]
struct Args {
    #[command(flatten)]
    log: ipc_core::cli::LogArgs,
    /// Name of the shared-memory segment to open, as the dispatcher gives it
    /// (e.g. /osps-1000-default-5e5ccee6-9f3a61c2d07b48e5; sysv: before it for System V).
    #[arg(long)]
    segment: String,
    /// Allow the fault-injection operations `crash` and `spawn`.
    #[arg(long)]
    allow_fault_injection: bool,
    /// Exit when this process (the dispatcher) dies.
    #[arg(long)]
    parent_pid: Option<u32>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _span = ipc_core::logging::init("worker", args.log.log_format);
    let config = worker::Config {
        segment: args.segment,
        allow_fault_injection: args.allow_fault_injection,
        parent_pid: args.parent_pid,
    };
    match worker::run(&config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
