//! `osps-dispatcher`: the primary server. Parses arguments, starts logging,
//! and runs the dispatcher library.

use clap::Parser;

/// Serves OSPS jobs to clients over a Unix socket, running them on a pool of workers.
#[derive(Debug, Parser)]
#[command(name = "osps-dispatcher", version)]
struct Args {
    #[command(flatten)]
    log: ipc_core::cli::LogArgs,
    #[command(flatten)]
    place: ipc_core::cli::InstanceArgs,
    /// Everything else: the flags are `dispatcher::Config`'s fields.
    #[command(flatten)]
    config: dispatcher::Config,
}

fn main() -> std::process::ExitCode {
    let Args { log, place, config } = Args::parse();
    let _span = ipc_core::logging::init("dispatcher", log.log_format);
    // What `osps-watchdog` passes in the environment when it starts us.
    let watchdog = ipc_core::env::WatchdogEnv::from_env();
    let config = dispatcher::Config {
        instance: place.instance,
        runtime_dir: place.runtime_dir,
        watchdog: watchdog.as_ref().map(ipc_core::env::WatchdogEnv::status),
        watchdog_started_unix_ms: watchdog.and_then(|w| w.started_unix_ms),
        ..config
    };
    match dispatcher::run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("osps-dispatcher: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
