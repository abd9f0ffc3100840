//! Command pools: `osps-worker` in exec mode serves its `--exec-op`
//! operations by running a command per job (docs/PROTOCOL.md §13, "Command
//! pools: the exec worker"):
//!
//! ```text
//! osps-worker --segment S --parent-pid P --exec-op gzip [--exec-op ...]
//!             [--pass-args] [--timeout-ms N] -- gzip -c
//! ```
//!
//! Per job: the command (an argv, never a shell; the job's arguments
//! appended only with `--pass-args`) runs in a process group of its own,
//! its stdin fed from the input in the slot (a thread, no whole copy), its
//! stdout written into the result as it comes ([`crate::ResultWriter`],
//! which grows past the slot), the last lines of its stderr kept for the
//! message. Exit 0 answers the result; a non-zero exit or a signal, the
//! error `command failed` with the status and stderr's tail. Past
//! `--timeout-ms` the group gets SIGTERM, then SIGKILL a second later, and
//! the job `timeout`. Whatever the end, once the command's main process has
//! exited its group is killed (what it left behind) and the process reaped;
//! the worker is the child subreaper of its commands, so what left the
//! group and lost its parent (`setsid`, a daemon) is killed and reaped too.
//! A SIGTERM to the worker (the dispatcher's backstop) kills the running
//! command's group before the worker dies of it.
//!
//! Not done: `PR_SET_PDEATHSIG` for the command (it must be set in the
//! child between fork and exec, which takes `unsafe`); a worker killed by
//! SIGKILL leaves its command an orphan, which the dispatcher (their child
//! subreaper) kills with its group and reaps.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use ipc_core::proto::{ErrorKind, RemoteError, DISPATCHER_OPS, MAX_ARGS, OP_PING};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::{invalid_input, JobCtx, Output, ResultWriter, Worker};

/// How long a command has between SIGTERM and SIGKILL after its timeout.
const GRACE: Duration = Duration::from_secs(1);
/// How long a wait on a command's pipes lasts before its state is looked
/// at again (ms): once its main process has exited, nothing on its pipes
/// for this long means a process outside its group holds them.
const TICK: u16 = 50;
/// Stderr bytes kept, and lines of them shown.
const TAIL_BYTES: usize = 4096;
const TAIL_LINES: usize = 20;
/// Longest message of a failed command (the SDK cuts at 1024).
const MAX_MESSAGE: usize = 1000;
/// Pipe buffers asked for (the kernel's default cap), for fewer wake-ups.
const PIPE_SIZE: i32 = 1 << 20;

/// The exec mode's options of `osps-worker`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ExecArgs {
    /// Exec mode: serve operation OP by running the command given after
    /// `--`, once per job (payload on its stdin, its stdout the result).
    /// Repeat for several names of the same command.
    #[arg(long = "exec-op", value_name = "OP")]
    pub(crate) ops: Vec<String>,
    /// Append the job's arguments to the command's (as separate arguments,
    /// never through a shell). Without it, a job with arguments is refused.
    #[arg(long, requires = "ops")]
    pub(crate) pass_args: bool,
    /// Kill a command running longer than this (SIGTERM to its process
    /// group, SIGKILL a second later) and answer the job `timeout`.
    #[arg(long, value_name = "MS", requires = "ops")]
    pub(crate) timeout_ms: Option<u64>,
    /// The command and its arguments (after `--`), run without a shell.
    #[arg(last = true, value_name = "COMMAND")]
    pub(crate) command: Vec<String>,
}

/// The arguments of `osps-worker`: a worker's, and the exec mode's.
#[derive(Debug, clap::Parser)]
#[command(
    name = "osps-worker",
    version,
    about = "The OSPS builtin worker: runs jobs read from stdin on a shared-memory segment, answering on stdout; with --exec-op, a command pool's worker running a command per job"
)]
struct BuiltinArgs {
    #[command(flatten)]
    worker: crate::Args,
    #[command(flatten)]
    exec: ExecArgs,
}

/// `osps-worker`'s `main`: the builtin operations, or in exec mode
/// (`--exec-op`) a command pool's.
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    let args = BuiltinArgs::parse();
    if args.exec.ops.is_empty() {
        if !args.exec.command.is_empty() {
            clap_error(
                "a command after `--` is run only in exec mode: name its operations with --exec-op",
            );
        }
        let worker = Worker::new("osps-worker").ops(crate::ops::OPS);
        return crate::start(args.worker, |config| worker.serve(config));
    }
    let exec = Exec::new(args.exec).unwrap_or_else(|e| clap_error(&e));
    // What a command leaves once its parent dies becomes ours, to kill.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!("cannot become the child subreaper ({e}): a command's detached processes are left to the dispatcher");
    }
    if let Err(e) = backstop::install() {
        clap_error(&format!(
            "cannot take SIGTERM (to kill a running command first): {e}"
        ));
    }
    let worker = exec.worker();
    crate::start(args.worker, |config| worker.serve(config))
}

fn clap_error(message: &str) -> ! {
    use clap::CommandFactory;
    BuiltinArgs::command()
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}

/// A command pool's command and how it runs.
#[derive(Debug)]
struct Exec {
    ops: Vec<String>,
    argv: Vec<String>,
    pass_args: bool,
    timeout: Option<Duration>,
    /// The OOM counts of the memory cgroup this worker runs in
    /// (`OSPS_MEMORY_CGROUP`, where the dispatcher made one for it).
    cgroup: Option<ipc_core::cgroup::OomEvents>,
}

impl Exec {
    /// Checks the exec mode's options.
    fn new(args: ExecArgs) -> Result<Exec, String> {
        if args.command.is_empty() {
            return Err("exec mode needs the command after `--` (e.g. -- gzip -c)".into());
        }
        for (i, op) in args.ops.iter().enumerate() {
            if op.is_empty() || op == OP_PING || DISPATCHER_OPS.contains(&op.as_str()) {
                return Err(format!("--exec-op {op:?}: not a name an operation can have (ping, status, metrics, cancel and reload are answered by OSPS)"));
            }
            if args.ops[..i].contains(op) {
                return Err(format!("--exec-op {op:?} is given twice"));
            }
        }
        if args.ops.len() > MAX_ARGS {
            return Err(format!("at most {MAX_ARGS} --exec-op"));
        }
        Ok(Exec {
            ops: args.ops,
            argv: args.command,
            pass_args: args.pass_args,
            timeout: args.timeout_ms.map(Duration::from_millis),
            cgroup: std::env::var_os(ipc_core::env::MEMORY_CGROUP)
                .and_then(|dir| ipc_core::cgroup::OomEvents::open(dir.as_ref())),
        })
    }

    /// The worker serving every `--exec-op` with the command.
    fn worker(self) -> Worker {
        let exec = Arc::new(self);
        exec.ops.iter().fold(Worker::new("osps-worker"), |w, op| {
            let exec = Arc::clone(&exec);
            w.op(op, move |job| exec.run(job))
        })
    }

    /// The command's name, in messages.
    fn program(&self) -> &str {
        &self.argv[0]
    }

    /// Runs one job's command, and answers its end.
    fn run(&self, job: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
        if !self.pass_args && !job.args().is_empty() {
            return Err(invalid_input(
                "this pool does not pass arguments (pass_args = false)",
            ));
        }
        // A client's argument is never an option of the command (`-o FILE`
        // would let it write where the pool's user may).
        if let Some(a) = job.args().iter().find(|a| a.starts_with('-')) {
            return Err(invalid_input(format!(
                "argument {:?} starts with '-': a command pool passes no options from clients",
                cut(a)
            )));
        }
        // Its memory cgroup's OOM counts so far.
        let oom_before = self.cgroup.as_ref().and_then(|oom| oom.start());
        let mut child = self.spawn(job.args())?;
        let group = Arc::new(Group::new(&child));
        let _running = backstop::Running::set(&group);
        let stdin = child.stdin.take().expect("piped");
        let pipes = (
            child.stdout.take().expect("piped"),
            child.stderr.take().expect("piped"),
        );
        let (input, mut out) = job.input_and_writer();
        let g: &Group = &group;
        let (pumped, tail, status) = std::thread::scope(|s| {
            s.spawn(move || feed(stdin, input, g));
            if let Some(timeout) = self.timeout {
                s.spawn(move || watch(g, timeout));
            }
            let waiter = s.spawn(move || reap(child, g));
            let (pumped, tail) = pump(pipes, &mut out, g);
            (pumped, tail, waiter.join())
        });
        let status = status
            .map_err(|_| internal("the thread reaping the command panicked"))?
            .map_err(|e| internal(&format!("cannot reap {}: {e}", self.program())))?;
        if group.lock().timed_out {
            let ms = self.timeout.unwrap_or_default().as_millis();
            let what = format!("{} ran past {ms} ms and was killed", self.program());
            return Err(RemoteError::new(ErrorKind::Timeout, with_tail(what, &tail)));
        }
        pumped?;
        if !status.success() {
            let what = format!("{} {}", self.program(), ended(status));
            let cgroup = self.cgroup.as_ref().zip(oom_before);
            if let Some(oom) = out_of_memory(&tail, cgroup) {
                let what = format!("{oom}; {what}");
                return Err(RemoteError::new(
                    ErrorKind::OutOfMemory,
                    with_tail(what, &tail),
                ));
            }
            return Err(RemoteError::new(
                ErrorKind::CommandFailed,
                with_tail(what, &tail),
            ));
        }
        out.finish()
    }

    /// Starts the command in a process group of its own, all three of its
    /// standard streams piped to us.
    fn spawn(&self, args: &[std::borrow::Cow<'_, str>]) -> Result<Child, RemoteError> {
        let mut cmd = Command::new(self.program());
        cmd.args(&self.argv[1..]);
        if self.pass_args {
            cmd.args(args.iter().map(|a| a.as_ref()));
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let child = cmd.spawn().map_err(|e| {
            RemoteError::new(
                ErrorKind::CommandFailed,
                format!("cannot start {}: {e}", self.program()),
            )
        })?;
        tracing::debug!(pid = child.id(), command = ?self.argv, "command started");
        Ok(child)
    }
}

/// The start of an `out of memory` message, when this worker runs under a
/// memory limit (its pool's `memory_limit_mib`) and a failed command went
/// past it: its stderr says an allocation failed (the `RLIMIT_DATA` the
/// launcher set, which the command inherited), or the kernel's OOM killer
/// ended a process in this worker's memory cgroup during the command, at
/// the cgroup's limit (not for memory that ran out elsewhere: the machine)
/// (`cgroup`: its OOM counts, and those before the command).
fn out_of_memory(
    tail: &Tail,
    cgroup: Option<(&ipc_core::cgroup::OomEvents, ipc_core::cgroup::OomCount)>,
) -> Option<String> {
    use ipc_core::memory::{is_allocation_failure, out_of_memory_message, Mechanism};
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let (limit, _) = getrlimit(Resource::RLIMIT_DATA).ok()?;
    if limit != RLIM_INFINITY && tail.text().lines().any(is_allocation_failure) {
        let mib = limit >> 20;
        return Some(out_of_memory_message(
            "the command",
            None,
            mib,
            Mechanism::RlimitData,
        ));
    }
    let (oom, before) = cgroup?;
    if oom.read()?.since(before)? != ipc_core::cgroup::OomKilled::AtItsLimit {
        // Memory ran out elsewhere (the machine): not past the limit.
        return None;
    }
    let mib = oom.limit()? >> 20;
    Some(out_of_memory_message(
        "the command",
        None,
        mib,
        oom.version().mechanism(),
    ))
}

fn internal(message: &str) -> RemoteError {
    RemoteError::new(ErrorKind::Internal, message)
}

/// How a command ended, for a message: "exited with status 3", "was
/// killed by signal SIGKILL".
fn ended(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("was killed by signal {s}"),
            Err(_) => format!("was killed by signal {sig}"),
        },
        _ => format!("ended: {status}"),
    }
}

/// `what`, then `; stderr: ` and as much of stderr's tail (its end) as
/// keeps the message under [`MAX_MESSAGE`] bytes.
fn with_tail(what: String, tail: &Tail) -> String {
    let text = tail.text();
    if text.is_empty() {
        return what;
    }
    let room = MAX_MESSAGE.saturating_sub(what.len() + 10);
    let mut start = text.len().saturating_sub(room);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("{what}; stderr: {}", &text[start..])
}

/// A running command's process group, and how its run is ending. The lock
/// is held while the group is signalled, and `exited` set under it before
/// the main process is reaped: the group's id (the main process's pid) is
/// never signalled once it may belong to another group.
#[derive(Debug)]
struct Group {
    pgid: Pid,
    state: Mutex<GroupState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    /// The main process has exited (and is reaped, or about to be).
    exited: bool,
    /// The timeout killed it.
    timed_out: bool,
}

impl Group {
    fn new(child: &Child) -> Group {
        Group {
            pgid: Pid::from_raw(child.id() as i32),
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `signal` to the group while its main process has not exited.
    fn signal(&self, signal: Signal) {
        let state = self.lock();
        if !state.exited {
            self.kill(signal);
        }
    }

    /// Sends `signal` to the group; the caller holds the lock.
    fn kill(&self, signal: Signal) {
        if let Err(e) = killpg(self.pgid, signal) {
            tracing::debug!(pgid = %self.pgid, "killpg {signal}: {e}");
        }
    }

    fn exited(&self) -> bool {
        self.lock().exited
    }
}

/// Waits for the command's main process to exit, kills what is left in its
/// group, then reaps it.
fn reap(mut child: Child, group: &Group) -> std::io::Result<ExitStatus> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    loop {
        // Not reaped yet (WNOWAIT): while it is a zombie its pid, the
        // group's id, cannot be reused.
        match waitid(
            Id::Pid(group.pgid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => tracing::warn!("waitid on the command: {e}"),
            Ok(_) => {}
        }
        break;
    }
    {
        let mut state = group.lock();
        group.kill(Signal::SIGKILL);
        state.exited = true;
        group.changed.notify_all();
    }
    kill_adopted(child.id());
    child.wait()
}

/// Kills and reaps what the command left to this worker, its child
/// subreaper: processes that left its process group (`setsid`, a daemon)
/// and whose parent is gone. Several rounds, since each death may leave
/// more; `command`, the command's own process, is reaped by the caller.
fn kill_adopted(command: u32) {
    use nix::sys::signal::kill;
    use nix::sys::wait::waitpid;
    let me = std::process::id();
    let own_group = nix::unistd::getpgrp().as_raw() as u32;
    for _ in 0..20 {
        let left: Vec<_> = ipc_core::children::children_of(me)
            .into_iter()
            .filter(|c| c.pid != command)
            .collect();
        if left.is_empty() {
            return;
        }
        for c in &left {
            tracing::warn!(pid = c.pid, "killing a process the command left behind");
            if c.pgid != own_group {
                let _ = killpg(Pid::from_raw(c.pgid as i32), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(c.pid as i32), Signal::SIGKILL);
            // Dead or dying: a short wait, on the reaper's thread.
            let _ = waitpid(Pid::from_raw(c.pid as i32), None);
        }
    }
}

/// The timeout: SIGTERM to the group, then SIGKILL after [`GRACE`].
fn watch(group: &Group, timeout: Duration) {
    let state = group.lock();
    let (mut state, _) = group
        .changed
        .wait_timeout_while(state, timeout, |s| !s.exited)
        .unwrap_or_else(|e| e.into_inner());
    if state.exited {
        return;
    }
    tracing::info!(pgid = %group.pgid, ?timeout, "command ran past its timeout; SIGTERM to its group");
    state.timed_out = true;
    group.kill(Signal::SIGTERM);
    let (state, _) = group
        .changed
        .wait_timeout_while(state, GRACE, |s| !s.exited)
        .unwrap_or_else(|e| e.into_inner());
    if !state.exited {
        tracing::info!(pgid = %group.pgid, "command still running after SIGTERM; SIGKILL to its group");
        group.kill(Signal::SIGKILL);
    }
}

/// Asks for larger pipe buffers (best effort).
fn widen(fd: &impl AsRawFd) {
    let _ = nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE),
    );
}

/// Writes the input to the command's stdin and closes it. Stops early when
/// the command closes its end (it read what it wanted) or its main process
/// has exited (a process outside its group may hold the pipe).
fn feed(mut stdin: ChildStdin, input: &[u8], group: &Group) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    widen(&stdin);
    let nonblocking = fcntl(stdin.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_ok();
    let mut rest = input;
    while !rest.is_empty() {
        match stdin.write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && nonblocking => {
                if group.exited() {
                    return;
                }
                let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::from(TICK));
            }
            Err(e) => {
                tracing::debug!("command's stdin: {e}");
                return;
            }
        }
    }
}

/// The end of the command's stderr.
#[derive(Debug, Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > 2 * TAIL_BYTES {
            self.0.drain(..self.0.len() - TAIL_BYTES);
        }
    }

    /// The last [`TAIL_LINES`] lines of the last [`TAIL_BYTES`] bytes, trimmed.
    fn text(&self) -> String {
        let bytes = &self.0[self.0.len().saturating_sub(TAIL_BYTES)..];
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text.trim_end().lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }
}

/// Reads the command's stdout into the result and its stderr into a
/// [`Tail`], until both close (or, once its main process has exited,
/// nothing comes on them for a tick: a process outside its group holds
/// them). A write the result cannot take (no room) kills the group; the
/// rest is read and dropped.
fn pump(
    (mut stdout, mut stderr): (ChildStdout, ChildStderr),
    out: &mut ResultWriter<'_, '_>,
    group: &Group,
) -> (Result<(), RemoteError>, Tail) {
    widen(&stdout);
    let (mut tail, mut written) = (Tail::default(), Ok(()));
    let mut open = [true, true];
    let mut buf = vec![0u8; 128 * 1024];
    while open.iter().any(|&o| o) {
        let ready = match ready_pipes(&stdout, &stderr, open) {
            Some(ready) => ready,
            None if group.exited() => break,
            None => continue,
        };
        for i in (0..2).filter(|&i| ready[i]) {
            let read = if i == 0 {
                stdout.read(&mut buf)
            } else {
                stderr.read(&mut buf)
            };
            match read {
                Ok(0) => open[i] = false,
                Ok(n) if i == 1 => tail.push(&buf[..n]),
                Ok(n) => {
                    if written.is_ok() {
                        written = out.write_all(&buf[..n]).map_err(|e| {
                            group.signal(Signal::SIGKILL);
                            crate::io_error(e, |e| internal(&format!("result: {e}")))
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("command's output: {e}");
                    open[i] = false;
                }
            }
        }
    }
    (written, tail)
}

/// Which of the open pipes (stdout, stderr) have something to read (or
/// are closed), waiting a tick at most; `None` if none within it.
fn ready_pipes(stdout: &ChildStdout, stderr: &ChildStderr, open: [bool; 2]) -> Option<[bool; 2]> {
    let fds = [stdout.as_fd(), stderr.as_fd()];
    let watched: Vec<usize> = (0..2).filter(|&i| open[i]).collect();
    let mut polled: Vec<PollFd<'_>> = watched
        .iter()
        .map(|&i| PollFd::new(fds[i], PollFlags::POLLIN))
        .collect();
    match poll(&mut polled, PollTimeout::from(TICK)) {
        Ok(0) => None,
        Err(nix::errno::Errno::EINTR) => Some([false; 2]),
        Err(e) => {
            tracing::warn!("poll on the command's output: {e}");
            Some(open)
        }
        Ok(_) => {
            let mut ready = [false; 2];
            for (p, &i) in polled.iter().zip(&watched) {
                ready[i] = p.revents().is_some_and(|r| !r.is_empty());
            }
            Some(ready)
        }
    }
}

/// The worker's SIGTERM (the dispatcher's backstop when a worker does not
/// stop): kill the running command's group first, then die of it.
mod backstop {
    use std::sync::{Arc, Mutex};

    use nix::sys::signal::Signal;

    use super::Group;

    /// The command running now, if any.
    static RUNNING: Mutex<Option<Arc<Group>>> = Mutex::new(None);

    /// Registers a running command for as long as it lives.
    pub(super) struct Running;

    impl Running {
        pub(super) fn set(group: &Arc<Group>) -> Running {
            *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(group));
            Running
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Starts the thread that takes SIGTERM (through `signal-hook`: a
    /// handler that only wakes that thread), kills the running command's
    /// group, and then dies of the signal as it would have without this.
    /// (No signal is blocked: a command starts with the mask it expects.)
    pub(super) fn install() -> std::io::Result<()> {
        use signal_hook::consts::SIGTERM;
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM])?;
        std::thread::Builder::new()
            .name("sigterm".into())
            .spawn(move || {
                if signals.forever().next().is_none() {
                    return;
                }
                if let Some(group) = RUNNING.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                    tracing::info!(pgid = %group.pgid, "SIGTERM: killing the running command's group");
                    group.signal(Signal::SIGKILL);
                }
                let _ = signal_hook::low_level::emulate_default_handler(SIGTERM);
                std::process::abort();
            })
            .map(drop)
    }
}
/// At most the first 64 bytes of `arg`, for a message.
fn cut(arg: &str) -> &str {
    let mut end = arg.len().min(64);
    while !arg.is_char_boundary(end) {
        end -= 1;
    }
    &arg[..end]
}
