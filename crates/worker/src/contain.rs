//! `osps-worker [--contain-memory BYTES] [--contain-cgroup DIR]
//! [--contain-session] -- PROGRAM ARGS...`: the launcher the dispatcher puts in front of a worker of a
//! pool with a memory limit (`memory_limit_mib`, [`ipc_core::memory`]) or
//! a `user` of its own. With `--contain-memory` it lowers its own
//! `RLIMIT_DATA` (soft and hard, so the program cannot raise it again
//! without `CAP_SYS_RESOURCE`) to BYTES; with `--contain-cgroup` it waits
//! until the dispatcher has moved it into the memory cgroup DIR (made for
//! this worker, `ipc_core::cgroup`) and passes DIR on in
//! `OSPS_MEMORY_CGROUP`; with `--contain-session` it starts
//! a session of its own (no controlling terminal), sets
//! `PR_SET_NO_NEW_PRIVS` and marks every descriptor past stderr
//! close-on-exec. Then it execs PROGRAM in its place: same pid, pipes,
//! environment and working directory, and all of this in force from the
//! program's first instruction (and inherited by whatever it starts).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use ipc_core::memory::{CGROUP_FLAG, CONTAIN_FLAG, SESSION_FLAG};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// How long the launcher waits to be moved into its cgroup.
const CGROUP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// When the first argument is [`CONTAIN_FLAG`], [`CGROUP_FLAG`] or [`SESSION_FLAG`]:
/// contains itself and execs the program (returning only if that fails,
/// with the code to exit with). `None`: an ordinary `osps-worker` command
/// line.
pub fn launch_if_asked() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let first = args.first()?.to_str()?.to_owned();
    if ![CONTAIN_FLAG, CGROUP_FLAG, SESSION_FLAG].contains(&first.as_str()) {
        return None;
    }
    Some(match launch(&args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("osps-worker {first}: {e}");
            ExitCode::from(127)
        }
    })
}

/// `[--contain-memory BYTES] [--contain-cgroup DIR] [--contain-session]
/// -- PROGRAM ARGS...`: contains, then execs (never returns on success).
fn launch(args: &[OsString]) -> Result<std::convert::Infallible, String> {
    let usage = format!(
        "usage: osps-worker [{CONTAIN_FLAG} BYTES] [{CGROUP_FLAG} DIR] [{SESSION_FLAG}] -- PROGRAM [ARGS...]"
    );
    let (mut memory, mut cgroup, mut session, mut at) = (None, None, false, 0);
    loop {
        match args.get(at).and_then(|a| a.to_str()) {
            Some(CONTAIN_FLAG) => {
                let bytes = args.get(at + 1).ok_or_else(|| usage.clone())?;
                let parsed = bytes.to_str().and_then(|b| b.parse::<u64>().ok());
                memory = Some(parsed.filter(|&b| b > 0).ok_or_else(|| {
                    format!("BYTES must be a positive integer, got {bytes:?}; {usage}")
                })?);
                at += 2;
            }
            Some(CGROUP_FLAG) => {
                cgroup = Some(args.get(at + 1).ok_or_else(|| usage.clone())?);
                at += 2;
            }
            Some(SESSION_FLAG) => {
                session = true;
                at += 1;
            }
            Some("--") => break,
            _ => return Err(usage),
        }
    }
    let [program, rest @ ..] = &args[at + 1..] else {
        return Err(usage);
    };
    let mut cmd = std::process::Command::new(program);
    if let Some(dir) = cgroup {
        ipc_core::cgroup::wait_until_inside(std::path::Path::new(dir), CGROUP_PATIENCE)?;
        cmd.env(ipc_core::env::MEMORY_CGROUP, dir);
    }
    if let Some(bytes) = memory {
        limit_data(bytes)?;
    }
    if session {
        own_session()?;
    }
    let e = cmd.args(rest).exec();
    Err(format!("cannot run {}: {e}", program.to_string_lossy()))
}

/// A session of its own (so no controlling terminal), no new privileges,
/// and nothing inherited past stderr.
fn own_session() -> Result<(), String> {
    nix::unistd::setsid().map_err(|e| format!("cannot start a session of its own: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("cannot set no_new_privs: {e}"))?;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("cannot list /proc/self/fd: {e}"))?;
    let fds: Vec<i32> = fds
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // The directory's own descriptor is gone by now: EBADF is fine.
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    }
    Ok(())
}

/// Sets `RLIMIT_DATA` to `bytes` (or the hard limit, if that is lower).
fn limit_data(bytes: u64) -> Result<(), String> {
    let (_, hard) =
        getrlimit(Resource::RLIMIT_DATA).map_err(|e| format!("cannot read RLIMIT_DATA: {e}"))?;
    let limit = bytes.min(hard);
    setrlimit(Resource::RLIMIT_DATA, limit, limit)
        .map_err(|e| format!("cannot set RLIMIT_DATA to {limit} bytes: {e}"))
}
