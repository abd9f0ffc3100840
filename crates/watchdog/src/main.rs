//! `osps-watchdog`: starts `osps-dispatcher` and supervises it. Parses
//! arguments, starts logging, and runs the watchdog library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use watchdog::RestartPolicy;

/// Starts an OSPS dispatcher and keeps it alive: restarts it on crash or hang,
/// stops it in order on SIGTERM/SIGINT.
#[derive(Debug, Parser)]
#[command(
    name = "osps-watchdog",
    version,
    mut_arg("instance", |a| a.help("Instance name")),
    after_help = "Arguments after -- go to osps-dispatcher, e.g.: osps-watchdog --instance demo -- --workers 4"
)]
struct Args {
    #[command(flatten)]
    log: ipc_core::cli::LogArgs,
    #[command(flatten)]
    place: ipc_core::cli::InstanceArgs,
    /// Heartbeat period in milliseconds.
    #[arg(long, default_value_t = 200)]
    heartbeat_ms: u64,
    /// Consecutive missed heartbeats that make the dispatcher count as hung.
    #[arg(long, default_value_t = 3)]
    miss_limit: u32,
    /// A new dispatcher that has not answered within this many milliseconds is hung.
    #[arg(long, default_value_t = 10_000)]
    start_timeout_ms: u64,
    /// Milliseconds an ordered stop may take before the dispatcher is killed; also how long a
    /// new watchdog waits for a previous dispatcher still holding the instance lock.
    #[arg(long, default_value_t = 15_000)]
    stop_grace_ms: u64,
    /// At most this many restarts...
    #[arg(long, default_value_t = RestartPolicy::default().max_restarts)]
    max_restarts: u32,
    /// ...within this many seconds; one more failure and the watchdog gives up.
    #[arg(long, default_value_t = RestartPolicy::default().within.as_secs())]
    within: u64,
    /// A dispatcher that stayed up this many milliseconds resets the restart backoff.
    #[arg(long, default_value_t = RestartPolicy::default().stable_after.as_millis() as u64)]
    backoff_reset_ms: u64,
    /// The dispatcher's TOML configuration file, passed on to each dispatcher started (as an absolute path; checked readable here first).
    #[arg(long = "config", value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// The dispatcher program [default: osps-dispatcher beside this program, else from PATH].
    #[arg(long)]
    dispatcher_exe: Option<PathBuf>,
    /// Arguments passed to osps-dispatcher.
    #[arg(last = true)]
    dispatcher_args: Vec<String>,
}

/// The dispatcher's arguments: `--config FILE` (made absolute, and checked
/// readable now, so that a wrong path fails here at once rather than in
/// every dispatcher started), then those given after `--`.
fn dispatcher_args(config_file: Option<PathBuf>, rest: Vec<String>) -> Result<Vec<String>, String> {
    let Some(file) = config_file else {
        return Ok(rest);
    };
    if rest
        .iter()
        .any(|a| a == "--config" || a.starts_with("--config="))
    {
        return Err("--config is given both to the watchdog and after --: give it once".into());
    }
    let absolute = std::fs::canonicalize(&file)
        .and_then(|path| std::fs::read(&path).map(|_| path))
        .map_err(|e| {
            format!(
                "{}: cannot read the configuration file: {e}",
                file.display()
            )
        })?;
    let absolute = absolute.into_os_string().into_string().map_err(|p| {
        format!(
            "{}: the configuration file's path is not UTF-8",
            p.to_string_lossy()
        )
    })?;
    Ok(["--config".to_owned(), absolute]
        .into_iter()
        .chain(rest)
        .collect())
}

/// Runs the dispatcher once with `--check-config` and the arguments each
/// dispatcher will get: a file it refuses (a misspelt key, a wrong type)
/// stops the watchdog now with the dispatcher's own line, not after a
/// crash loop.
fn check_config(
    exe: &std::path::Path,
    (instance, runtime_dir): (&String, Option<&std::path::Path>),
    dispatcher_args: &[String],
) -> Result<(), String> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--instance").arg(instance);
    if let Some(dir) = runtime_dir {
        cmd.arg("--runtime-dir").arg(dir);
    }
    let out = cmd
        .arg("--check-config")
        .args(dispatcher_args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("osps-watchdog: cannot run {}: {e}", exe.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(String::from_utf8_lossy(&out.stderr).trim_end().to_owned())
}

/// What the dispatcher listens on, asked of it, and the sockets the
/// watchdog holds for it: systemd's, else descriptors reserved to bind
/// them at the first spawn. Before any thread starts.
fn hold(
    place: &ipc_core::cli::InstanceArgs,
    exe: &std::path::Path,
    dispatcher_args: &[String],
) -> Result<watchdog::held::Held, String> {
    let dir = place.runtime_dir.as_deref();
    let plan = watchdog::held::Plan::ask(exe, (&place.instance, dir), dispatcher_args)?;
    let paths = ipc_core::RuntimePaths::new(&place.instance, dir).map_err(|e| e.to_string())?;
    watchdog::held::Held::init(&paths, plan).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let has_config = args.config_file.is_some();
    let dispatcher_args = match dispatcher_args(args.config_file, args.dispatcher_args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("osps-watchdog: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _span = ipc_core::logging::init("watchdog", args.log.log_format);
    let policy = RestartPolicy {
        max_restarts: args.max_restarts,
        within: Duration::from_secs(args.within),
        stable_after: Duration::from_millis(args.backoff_reset_ms),
        ..Default::default()
    };
    let dispatcher_exe = args
        .dispatcher_exe
        .unwrap_or_else(watchdog::default_dispatcher_exe);
    if has_config {
        let place = (&args.place.instance, args.place.runtime_dir.as_deref());
        if let Err(e) = check_config(&dispatcher_exe, place, &dispatcher_args) {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let held = match hold(&args.place, &dispatcher_exe, &dispatcher_args) {
        Ok(held) => held,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("osps-watchdog: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = watchdog::Config {
        instance: args.place.instance,
        runtime_dir: args.place.runtime_dir,
        heartbeat: Duration::from_millis(args.heartbeat_ms.max(1)),
        miss_limit: args.miss_limit.max(1),
        start_timeout: Duration::from_millis(args.start_timeout_ms),
        stop_grace: Duration::from_millis(args.stop_grace_ms),
        policy,
        dispatcher_exe,
        dispatcher_args,
    };
    match watchdog::run(config, held) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("osps-watchdog: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_file_is_passed_on_as_an_absolute_path_first() {
        // Tests run in the package's directory: a readable file, named relatively.
        let relative = PathBuf::from("Cargo.toml");
        let absolute = std::fs::canonicalize(&relative).unwrap();
        let got = dispatcher_args(Some(relative), vec!["--workers".into(), "2".into()]).unwrap();
        assert_eq!(got[0], "--config");
        assert_eq!(std::path::Path::new(&got[1]), absolute);
        assert_eq!(got[2..], ["--workers", "2"]);
        assert_eq!(dispatcher_args(None, vec!["-x".into()]).unwrap(), ["-x"]);
        for twice in ["--config", "--config=/etc/osps.toml"] {
            let err = dispatcher_args(Some(absolute.clone()), vec![twice.into()]).unwrap_err();
            assert!(err.contains("give it once"), "{err}");
        }
    }
}
