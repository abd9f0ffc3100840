//! `osps-worker --contain-memory BYTES -- PROGRAM ARGS...`: the launcher
//! the dispatcher puts in front of a worker of a pool with a memory limit
//! (`memory_limit_mib`, [`ipc_core::memory`]). It lowers its own
//! `RLIMIT_DATA` (soft and hard, so the program cannot raise it again
//! without `CAP_SYS_RESOURCE`) to
//! BYTES and execs PROGRAM in its place: same pid, process group, pipes,
//! environment and working directory, and the limit in force from the
//! program's first instruction (and inherited by whatever it starts).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use ipc_core::memory::CONTAIN_FLAG;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// When the first argument is [`CONTAIN_FLAG`]: applies the limit and
/// execs the program (returning only if that fails, with the code to exit
/// with). `None`: an ordinary `osps-worker` command line.
pub fn launch_if_asked() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(CONTAIN_FLAG.as_ref()) {
        return None;
    }
    let rest: Vec<OsString> = args.collect();
    Some(match launch(&rest) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("osps-worker {CONTAIN_FLAG}: {e}");
            ExitCode::from(127)
        }
    })
}

/// `BYTES -- PROGRAM ARGS...`: limits, then execs (never returns on success).
fn launch(args: &[OsString]) -> Result<std::convert::Infallible, String> {
    let usage = format!("usage: osps-worker {CONTAIN_FLAG} BYTES -- PROGRAM [ARGS...]");
    let (bytes, program, rest) = match args {
        [bytes, dashes, program, rest @ ..] if dashes == "--" => (bytes, program, rest),
        _ => return Err(usage),
    };
    let bytes: u64 = bytes
        .to_str()
        .and_then(|b| b.parse().ok())
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("BYTES must be a positive integer, got {bytes:?}; {usage}"))?;
    limit_data(bytes)?;
    let e = std::process::Command::new(program).args(rest).exec();
    Err(format!("cannot run {}: {e}", program.to_string_lossy()))
}

/// Sets `RLIMIT_DATA` to `bytes` (or the hard limit, if that is lower).
fn limit_data(bytes: u64) -> Result<(), String> {
    let (_, hard) =
        getrlimit(Resource::RLIMIT_DATA).map_err(|e| format!("cannot read RLIMIT_DATA: {e}"))?;
    let limit = bytes.min(hard);
    setrlimit(Resource::RLIMIT_DATA, limit, limit)
        .map_err(|e| format!("cannot set RLIMIT_DATA to {limit} bytes: {e}"))
}
