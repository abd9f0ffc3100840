//! `osps-dispatcher`: the primary server. Parses arguments (and the
//! configuration file, if given), starts logging, and runs the dispatcher
//! library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use dispatcher::config_file;

/// Serves OSPS jobs to clients over a Unix socket, running them on a pool of workers.
#[derive(Debug, Parser)]
#[command(name = "osps-dispatcher", version)]
struct Args {
    #[command(flatten)]
    log: ipc_core::cli::LogArgs,
    #[command(flatten)]
    place: ipc_core::cli::InstanceArgs,
    /// Read options from this TOML file (keys: the flags' names with underscores, e.g. job_timeout_ms = 30000, and pools as [pools.NAME] tables); a flag given here overrides the file.
    #[arg(long = "config", value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Check the options (with the --config file's) and exit: status 0 if they would be accepted, else one line saying why.
    #[arg(long)]
    check_config: bool,
    /// For osps-watchdog: print what it is to bind for this dispatcher (`unix-mode MODE`, `tcp ADDR`; `invalid REASON`) and exit.
    #[arg(long, hide = true)]
    listen_plan: bool,
    /// Everything else: the flags are `dispatcher::Config`'s fields.
    #[command(flatten)]
    config: dispatcher::Config,
}

/// The arguments: the command line's, and the configuration file's for
/// what the command line does not set. A file it refuses ends the program
/// with one line naming the file, the line and the key; but a dispatcher
/// the watchdog restarts (after a crash or a hang) then serves with the
/// configuration applied last, and says so (the second value, to log).
fn parse() -> Result<(Args, Option<String>), config_file::FileError> {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Some(path) = args.config_file.clone() else {
        return Ok((args, None));
    };
    let read = with_file(&path, &matches);
    let refused = match &read {
        Err(e) => Some(e.to_string()),
        Ok(Err(e)) => Some(e.to_string().lines().next().unwrap_or("").to_owned()),
        Ok(Ok(a)) => a.config.validate().err().map(|e| e.message),
    };
    let (mut args, fell_back) = match refused.and_then(|why| applied_instead(&args, &matches, why))
    {
        Some((args, said)) => (args, Some(said)),
        None => match read? {
            Ok(args) => (args, None),
            Err(e) => e.exit(),
        },
    };
    // SIGHUP and `reload` read the file again, the same way.
    let reread = move || reread(&path, &matches);
    let source = dispatcher::ConfigSource::new(
        args.config_file.clone().unwrap_or_default(),
        std::sync::Arc::new(reread),
    );
    args.config.reload_from = Some(source);
    Ok((args, fell_back))
}

/// For a dispatcher the watchdog restarted (`OSPS_DISPATCHER_RESTARTS` is
/// set) whose configuration file is refused (`why`): the options with the
/// text the last dispatcher applied (`RuntimePaths::applied_config`) in
/// place of the file's, and what to log; `None` when there is no such text
/// or it is refused too. So a file broken since the last start or reload
/// (which a reload refused) does not stop the service at its next crash.
fn applied_instead(args: &Args, matches: &clap::ArgMatches, why: String) -> Option<(Args, String)> {
    std::env::var_os(ipc_core::env::DISPATCHER_RESTARTS)?;
    let place = &args.place;
    let paths =
        ipc_core::paths::RuntimePaths::new(&place.instance, place.runtime_dir.as_deref()).ok()?;
    if !paths.dir_is_ours() {
        return None;
    }
    let applied = paths.applied_config();
    let args = with_file(&applied, matches).ok()?.ok()?;
    args.config.validate().ok()?;
    let file = args.config_file.clone().unwrap_or_default();
    let said = format!(
        "the configuration file {} is refused ({}): serving with the configuration applied last instead (kept in {}); fix the file, then reload",
        file.display(),
        why.trim(),
        applied.display()
    );
    Some((args, said))
}

/// The arguments with the file's options for what the command line does
/// not set; `Ok(Err)` when they do not parse together.
fn with_file(
    path: &std::path::Path,
    matches: &clap::ArgMatches,
) -> Result<Result<Args, clap::Error>, config_file::FileError> {
    let from_file = config_file::read(path, matches)?;
    let mut argv: Vec<OsString> = std::env::args_os().take(1).collect();
    argv.extend(from_file.args.iter().cloned());
    argv.extend(std::env::args_os().skip(1));
    let mut args = match Args::try_parse_from(argv) {
        Ok(args) => args,
        Err(e) => return Ok(Err(e)),
    };
    args.config.pools = from_file.pools.clone();
    args.config.file_text = Some(from_file.text.as_str().into());
    args.config.builtin_pool = from_file.builtin;
    args.config.builtin_run_as = from_file.builtin_run_as.clone();
    if let Err(invalid) = args.config.validate() {
        if let Some(e) = from_file.locate(&invalid) {
            return Err(e);
        }
    }
    Ok(Ok(args))
}

/// A reload's reading of the file: the configuration as a start would
/// take it, or one line saying why not.
fn reread(
    path: &std::path::Path,
    matches: &clap::ArgMatches,
) -> Result<dispatcher::Config, String> {
    let args = match with_file(path, matches) {
        Err(e) => return Err(e.to_string()),
        Ok(Err(e)) => {
            let said = e.to_string();
            let first = said.lines().next().unwrap_or("the options do not parse");
            return Err(format!(
                "{}: {}",
                path.display(),
                first.trim_start_matches("error: ")
            ));
        }
        Ok(Ok(args)) => args,
    };
    args.config
        .validate()
        .map_err(|e| format!("invalid configuration: {}", e.message))?;
    Ok(dispatcher::Config {
        instance: args.place.instance,
        runtime_dir: args.place.runtime_dir,
        ..args.config
    })
}

fn main() -> ExitCode {
    let (
        Args {
            log,
            place,
            config,
            check_config,
            listen_plan,
            ..
        },
        fell_back,
    ) = match parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("osps-dispatcher: {e}");
            return ExitCode::FAILURE;
        }
    };
    if check_config {
        return match config.validate() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("osps-dispatcher: invalid configuration: {}", e.message);
                ExitCode::FAILURE
            }
        };
    }
    if listen_plan {
        print!("{}", dispatcher::held::plan(&config));
        return ExitCode::SUCCESS;
    }
    let _span = ipc_core::logging::init("dispatcher", log.log_format);
    if let Some(said) = fell_back {
        tracing::error!("{said}");
    }
    // What `osps-watchdog` passes in the environment when it starts us.
    let watchdog = ipc_core::env::WatchdogEnv::from_env();
    // Listening sockets it (or systemd) holds for us; taken before any
    // thread starts, and their variables gone from the environment.
    let passed = match ipc_core::activation::take(watchdog.as_ref().map(|w| w.pid)) {
        Ok(passed) => passed,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("osps-dispatcher: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = dispatcher::Config {
        instance: place.instance,
        runtime_dir: place.runtime_dir,
        watchdog: watchdog.as_ref().map(ipc_core::env::WatchdogEnv::status),
        watchdog_started_unix_ms: watchdog.and_then(|w| w.started_unix_ms),
        ..config
    };
    match dispatcher::run_with(config, passed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("osps-dispatcher: {e}");
            ExitCode::FAILURE
        }
    }
}
