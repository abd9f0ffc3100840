//! The worker pool: one driver task per pool place. A driver spawns its
//! worker (stdin = job pipe, stdout = result pipe, own process group) and
//! feeds it jobs from the queue, several at a time when the queue is deep
//! (one pipe write for a batch of job frames; the worker answers them in
//! order). What to send, when a job times out, what a death or an answer
//! means is decided by the worker's [`Session`]; this module does the I/O.
//! On a crash or hang it kills the worker's process group, reaps it,
//! answers or requeues its jobs (a dead worker's jobs given up are answered
//! before the reap, their slots freed after it), and spawns a replacement.
//! The dispatcher never blocks on a worker: every wait is a bounded
//! `.await`.

use std::process::Stdio;
use std::rc::Rc;
use std::time::Duration;

use ipc_core::cgroup::{OomCount, OomKilled};
use ipc_core::frame::{self, DEFAULT_MAX_FRAME};
use ipc_core::memory::Mechanism;
use ipc_core::proto::{
    Args, ErrorKind, FromWorker, Job, JobDone, Outcome, RemoteError, ToWorker, PIPE_VERSION,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::oneshot;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::pools::{Pool, PoolConfig, PoolKind};
use crate::replies::Body;
use crate::session::{Ahead, Answered, Ask, End, Session, SessionJob, ROOMS_PER_RESULT};
use crate::shared::{QueuedJob, Shared};
use crate::slots::{JobSlot, News, NoRoom, SlotLease, Streamed, UploadState, ROOM_WAIT};
use crate::workers::{WorkerEntry, WorkerState};

/// How long a new worker has to say it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker has to exit after its stdin closes.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Failed starts in a row after which waiting jobs are answered with an error.
const GIVE_UP_JOBS_AFTER_FAILED_STARTS: u32 = 3;
/// How long a worker whose job timed out has between SIGTERM and SIGKILL
/// (to log what it was doing).
const TERM_GRACE: Duration = Duration::from_secs(1);
/// An exec pool's worker times its command out itself (to answer with the
/// command's stderr); the dispatcher's timer is a backstop this much later.
const EXEC_BACKSTOP: Duration = Duration::from_secs(3);
/// How long a dead worker of a pool with a memory limit has to close its
/// stderr (so its last lines are read) before its death is judged.
const STDERR_GRACE: Duration = Duration::from_secs(1);
/// Longest stderr line forwarded whole (a longer one goes out in pieces).
const MAX_STDERR_LINE: u64 = 64 * 1024;

impl SessionJob for QueuedJob {
    fn id(&self) -> u64 {
        self.job_id
    }

    fn frame_size(&self) -> usize {
        64 + self.op.as_str().len() + self.args.iter().map(|a| a.len() + 8).sum::<usize>()
    }

    fn arriving(&self) -> bool {
        self.lease.upload().is_some()
    }

    fn attempts(&mut self) -> &mut u8 {
        &mut self.attempts
    }

    fn cancelled(&self) -> bool {
        self.ticket.cancelled()
    }
}

struct Worker {
    child: Child,
    pid: u32,
    /// `None` once closed (the polite stop).
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    /// A worker of a pool with a memory limit: its stderr's forwarder, which
    /// ends with the line that said an allocation failed, if one did.
    stderr: Option<oneshot::Receiver<Option<String>>>,
    /// A worker of a pool with a memory limit, where the dispatcher makes
    /// memory cgroups: its own (after `child`: emptied and removed once the
    /// child is dropped, reaped by then).
    cgroup: Option<ipc_core::cgroup::WorkerCgroup>,
    /// Its memory cgroup's OOM counts before its current jobs (read when a
    /// job starts on it idle): only a kill since then is why it died, not
    /// one of an earlier job's (a command pool's command, a child the
    /// worker started), after which it served on.
    oom_before: OomCount,
}

/// Whether a dead worker ran out of memory ([`Worker::out_of_memory`]).
enum OutOfMemory {
    /// No, as far as is known.
    No,
    /// Past its pool's limit: why (for the log and the answer), and how the
    /// limit was enforced.
    PastItsLimit(String, Mechanism),
    /// The kernel's OOM killer ended it, but not at its cgroup's limit:
    /// memory ran out on the machine (or in an enclosing cgroup). An
    /// ordinary death, for the job; why, for the log.
    Elsewhere(String),
}

impl Worker {
    /// Whether it ran out of memory, once dead: the line its stderr said an
    /// allocation failed with (`RLIMIT_DATA`), else an OOM kill in its
    /// memory cgroup since its current jobs started, at the cgroup's limit
    /// or not.
    async fn out_of_memory(&mut self) -> OutOfMemory {
        if let Some(said) = self.allocation_failure().await {
            let said = format!("it said: {said}");
            return OutOfMemory::PastItsLimit(said, Mechanism::RlimitData);
        }
        let Some(cgroup) = &self.cgroup else {
            return OutOfMemory::No;
        };
        let by = cgroup.version().mechanism();
        match cgroup.oom_count().since(self.oom_before) {
            None => OutOfMemory::No,
            Some(OomKilled::AtItsLimit) => {
                OutOfMemory::PastItsLimit(format!("the kernel's OOM killer ended it: {by}"), by)
            }
            Some(OomKilled::Elsewhere) => OutOfMemory::Elsewhere(format!(
                "the kernel's OOM killer ended it, not at its limit ({by}): memory ran out on the machine or in an enclosing cgroup"
            )),
        }
    }

    /// Notes its memory cgroup's OOM counts so far, as a job starts on it
    /// idle (a read of its cgroup file, and on v1 a reset of its usage's
    /// high-water mark; nothing without a cgroup).
    fn note_oom_kills(&mut self) {
        if let Some(cgroup) = &self.cgroup {
            self.oom_before = cgroup.oom_start();
        }
    }

    /// The line its stderr said an allocation failed with, once the stderr
    /// is closed (waiting at most [`STDERR_GRACE`]); `None` for a worker
    /// whose stderr is not read (no memory limit) or that said none.
    async fn allocation_failure(&mut self) -> Option<String> {
        let forwarder = self.stderr.take()?;
        match tokio::time::timeout(STDERR_GRACE, forwarder).await {
            Ok(Ok(said)) => said,
            _ => None,
        }
    }
}

/// Forwards a worker's stderr to ours line by line, unchanged (a worker's
/// log lines reach the log as when it writes there itself), on a thread of
/// its own: a slow reader of our stderr then holds up that worker (its
/// writes block), never the dispatcher's event loop. Resolves, at the
/// stderr's end, to the first line that said an allocation failed
/// ([`ipc_core::memory::is_allocation_failure`]).
fn forward_stderr(stderr: ChildStderr) -> std::io::Result<oneshot::Receiver<Option<String>>> {
    use std::io::{BufRead, Read, Write};
    use std::os::fd::AsRawFd;
    let fd = stderr.into_owned_fd()?;
    // Tokio made it non-blocking; this thread reads it blocking.
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::F_GETFL)?;
    let blocking = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::F_SETFL(blocking))?;
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("stderr".into())
        .spawn(move || {
            let mut reader = std::io::BufReader::new(std::fs::File::from(fd));
            let (mut line, mut failure) = (Vec::new(), None);
            loop {
                line.clear();
                match (&mut reader)
                    .take(MAX_STDERR_LINE)
                    .read_until(b'\n', &mut line)
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let _ = std::io::stderr().lock().write_all(&line);
                let text = String::from_utf8_lossy(&line);
                if failure.is_none() && ipc_core::memory::is_allocation_failure(&text) {
                    failure = Some(text.trim().to_owned());
                }
            }
            let _ = tx.send(failure);
        })?;
    Ok(rx)
}

/// Drives place `index` of pool `pool` until `stop` turns true.
pub async fn drive(
    shared: Rc<Shared>,
    pool: Rc<Pool>,
    index: usize,
    mut stop: watch::Receiver<bool>,
) {
    let p: &Pool = &pool;
    let entry = p.workers.get(index);
    log_memory_limit(&shared, p, index);
    let mut failures_in_a_row = 0u32;
    // A replacement started while its predecessor served (recycling).
    let mut next: Option<Spawning> = None;
    while !*stop.borrow() {
        let spawned = match next.take() {
            Some(started) => started.await,
            None => spawn(&shared, p).await,
        };
        let mut worker = match spawned {
            Ok(w) => w,
            Err(e) => {
                failures_in_a_row += 1;
                p.start_failed(&e);
                start_failed(&shared, p, index, failures_in_a_row, &e, &mut stop).await;
                continue;
            }
        };
        failures_in_a_row = 0;
        tracing::info!(
            pool = p.name(),
            worker = index,
            pid = worker.pid,
            "worker started"
        );
        entry.started(worker.pid);
        let mut driver = WorkerDriver {
            shared: &shared,
            pool: p,
            index,
            w: &mut worker,
            stop: &mut stop,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            recycle: Recycle::new(&p.config),
            dead: false,
        };
        let mut end = driver.serve().await;
        let (dead, mut recycle) = (driver.dead, driver.recycle);
        let (status, cause) =
            end_worker(&shared, entry, &mut worker, &mut end, dead, *stop.borrow()).await;
        if let Some(fresh) = recycled(p, index, worker.pid, &mut recycle, &status) {
            next = Some(Box::pin(std::future::ready(Ok(fresh))));
            continue;
        }
        // A replacement still starting (or ready) replaces it whatever its end.
        next = recycle.take();
        if settle(&shared, p, index, worker.pid, end, status, *stop.borrow()) {
            break;
        }
        if *stop.borrow() {
            // Killed at the end of shutdown, not replaced.
            entry.retired();
            break;
        }
        entry.restarting();
        p.metrics.restarted(cause);
        // Let the answers just given go out before the replacement's
        // start (a synchronous fork and exec) holds this thread.
        tokio::task::yield_now().await;
    }
    if let Some(started) = next {
        discard(&shared, started).await;
    }
}

/// The replacement of a worker that ended because it was due for
/// recycling (started and ready already), counted and logged.
fn recycled(
    p: &Pool,
    index: usize,
    pid: u32,
    recycle: &mut Recycle,
    status: &str,
) -> Option<Worker> {
    let fresh = if recycle.due {
        recycle.ready.take()?
    } else {
        return None;
    };
    tracing::info!(
        pool = p.name(),
        worker = index,
        pid,
        new_pid = fresh.pid,
        "worker recycled {}: {status}",
        recycle.cause.unwrap_or(RecycleCause::Jobs(recycle.jobs))
    );
    p.workers
        .get(index)
        .recycled(matches!(recycle.cause, Some(RecycleCause::Rss(_))));
    Some(fresh)
}

/// Says how a pool's memory limit is enforced, if it has one (once: for
/// its place 0).
fn log_memory_limit(shared: &Shared, pool: &Pool, index: usize) {
    let config = &pool.config;
    let (Some(mib), Some(by), 0) = (
        config.memory_limit_mib,
        config.memory_limit_by(shared.cgroup_version()),
        index,
    ) else {
        return;
    };
    match &shared.cgroups {
        Ok(cgroups) => tracing::info!(
            pool = pool.name(),
            "workers limited to {mib} MiB of memory each by {by}: a memory cgroup per worker under {} (all it and its children take; the shared segment's pages are the dispatcher's), and its heap and private mappings",
            cgroups.base().display()
        ),
        Err(why) => tracing::info!(
            pool = pool.name(),
            "workers limited to {mib} MiB of memory each by {by} (their heap and private mappings; the shared segment does not count); no memory cgroup: {why}"
        ),
    }
}

/// A worker being started (by [`spawn`]) while another serves.
type Spawning = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Worker, String>>>>;

/// Stops a replacement the driver no longer needs (the dispatcher stops).
async fn discard(shared: &Shared, started: Spawning) {
    if let Ok(mut w) = started.await {
        let status = finish(&mut w, &End::Stop).await;
        shared.orphans.worker_reaped(w.pid);
        shared.orphans.sweep();
        tracing::debug!(pid = w.pid, "unused replacement stopped: {status}");
    }
}

/// Recycling by job count (`recycle_after_jobs`) or by memory
/// (`recycle_above_rss_mib`): once its worker has answered that many jobs,
/// or is found above that resident size after a job, a replacement is
/// started while the worker serves on; once the replacement is ready,
/// nothing more is sent ahead, and at the next moment the worker holds no
/// job it is swapped for it.
struct Recycle {
    after: Option<u64>,
    /// Resident bytes above which the worker is replaced.
    above_rss: Option<u64>,
    /// Jobs the current worker answered.
    jobs: u64,
    /// Why a replacement was started, once one was.
    cause: Option<RecycleCause>,
    /// The replacement, while it starts.
    starting: Option<Spawning>,
    /// The replacement, ready.
    ready: Option<Worker>,
    /// Set when `serve` returned to swap the worker for `ready`.
    due: bool,
}

impl Recycle {
    fn new(config: &crate::pools::PoolConfig) -> Recycle {
        Recycle {
            after: config.recycle_after_jobs,
            above_rss: config.recycle_above_rss_mib.map(|m| m << 20),
            jobs: 0,
            cause: None,
            starting: None,
            ready: None,
            due: false,
        }
    }

    /// Counts a job worker `pid` answered; starts the replacement when it
    /// is time.
    fn answered(&mut self, shared: &Rc<Shared>, pool: usize, pid: u32) {
        self.jobs += 1;
        if self.starting.is_some() || self.ready.is_some() {
            return;
        }
        let rss = self
            .above_rss
            .and_then(|limit| Some(rss(pid)?).filter(|&r| r > limit));
        self.cause = match (self.after.is_some_and(|n| self.jobs >= n), rss) {
            (true, _) => Some(RecycleCause::Jobs(self.jobs)),
            (false, Some(bytes)) => Some(RecycleCause::Rss(bytes)),
            (false, None) => None,
        };
        if self.cause.is_some() {
            let shared = Rc::clone(shared);
            self.starting = Some(Box::pin(async move {
                let pool = shared.pools.get(pool).ok_or("its pool is gone")?;
                spawn(&shared, &pool).await
            }));
        }
    }

    /// The replacement started (or could not: the worker serves on, and
    /// another is tried after as many jobs again).
    fn started(&mut self, pool: &Pool, index: usize, started: Result<Worker, String>) {
        self.starting = None;
        match started {
            Ok(w) => self.ready = Some(w),
            Err(e) => {
                tracing::warn!(
                    pool = pool.name(),
                    worker = index,
                    "cannot start a worker to recycle this one (after {} jobs): {e}; it serves on",
                    self.jobs
                );
                self.jobs = 0;
            }
        }
    }

    /// The replacement, started or starting, if any.
    fn take(self) -> Option<Spawning> {
        match self.ready {
            Some(w) => Some(Box::pin(std::future::ready(Ok(w)))),
            None => self.starting,
        }
    }
}

/// Why a worker was recycled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecycleCause {
    /// It had answered this many jobs.
    Jobs(u64),
    /// Its resident memory was this many bytes, over the limit.
    Rss(u64),
}

impl std::fmt::Display for RecycleCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecycleCause::Jobs(n) => write!(f, "after {n} jobs"),
            RecycleCause::Rss(b) => {
                write!(f, "with {} MiB resident (recycle_above_rss_mib)", b >> 20)
            }
        }
    }
}

/// Resident bytes of process `pid` (`/proc/PID/statm`, in pages).
fn rss(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(pages * page as u64)
}

/// Waits for a replacement being started, if one is.
async fn replacement(starting: &mut Option<Spawning>) -> Result<Worker, String> {
    match starting {
        Some(started) => started.await,
        None => std::future::pending().await,
    }
}

/// A worker could not start (the `failures`th time in a row): says so, and
/// after a few, answers what waits rather than keep it waiting on a pool
/// that cannot start; then backs off.
async fn start_failed(
    shared: &Shared,
    pool: &Pool,
    index: usize,
    failures: u32,
    e: &str,
    stop: &mut watch::Receiver<bool>,
) {
    let delay = Duration::from_millis(50 << failures.min(6));
    tracing::error!(
        pool = pool.name(),
        worker = index,
        "cannot start worker: {e}; retrying in {delay:?}"
    );
    if failures >= GIVE_UP_JOBS_AFTER_FAILED_STARTS {
        let msg = format!(
            "no worker of pool \"{}\" can be started ({e}); see the dispatcher's log",
            pool.name()
        );
        for job in pool.queue.take_all() {
            answer_err(shared, job, ErrorKind::Internal, msg.clone());
        }
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// Ends a worker whose service ended `end` ([`finish`]), and what its
/// jobs left behind; returns how it exited, and the cause of its restart
/// ([`crate::metrics::restart_cause`], read before any answer is taken
/// out of `end`). A dead worker's (`dead`: its pipes said so) jobs given
/// up are answered first ([`answer_first`]); their slots are freed only
/// once it is reaped.
async fn end_worker(
    shared: &Shared,
    entry: &WorkerEntry,
    worker: &mut Worker,
    end: &mut End<QueuedJob>,
    dead: bool,
    stopping: bool,
) -> (String, ErrorKind) {
    let cause = crate::metrics::restart_cause(end);
    let answered_first = if dead {
        answer_first(shared, entry, end, stopping)
    } else {
        Vec::new()
    };
    let status = finish(worker, end).await;
    shared.orphans.worker_reaped(worker.pid);
    // What its jobs left behind (now ours): killed and reaped.
    shared.orphans.sweep();
    entry.ended();
    // Reaped: nothing can write into those slots any more.
    drop(answered_first);
    (status, cause)
}

/// Answers the jobs `end` gives up (a dead worker's) and counts them
/// against the worker (unless the dispatcher is `stopping`), keeping their
/// slots, which it returns: the answers carry no slot bytes, so the client
/// need not wait for the rest of the worker's exit and its reap, while the
/// slots must stay taken until the worker is reaped (one that closed its
/// pipes may live on and write into them).
fn answer_first(
    shared: &Shared,
    entry: &WorkerEntry,
    end: &mut End<QueuedJob>,
    stopping: bool,
) -> Vec<JobSlot> {
    let End::Kill { answer, .. } = end else {
        return Vec::new();
    };
    let mut slots = Vec::with_capacity(answer.len());
    for (job, kind, message) in answer.drain(..) {
        if !stopping && lost_with_its_worker(kind) {
            entry.failed(1);
        }
        let outcome = Outcome::Err(RemoteError::new(kind, message));
        reply(shared, job, outcome, |slot| {
            slots.push(slot);
            Body::Inline(Vec::new())
        });
    }
    slots
}

/// Whether a job answered `kind` as its worker ended counts as one the
/// worker lost (its place's `jobs_failed`): a job its client cancelled is
/// not.
fn lost_with_its_worker(kind: ErrorKind) -> bool {
    kind != ErrorKind::Cancelled
}

/// After a worker ended `status`: answers or requeues its jobs (those not
/// answered first) and records why. Returns true when the driver is done
/// (a polite stop).
fn settle(
    shared: &Shared,
    pool: &Pool,
    index: usize,
    pid: u32,
    end: End<QueuedJob>,
    status: String,
    stopping: bool,
) -> bool {
    let End::Kill {
        why,
        answer,
        requeue,
        ..
    } = end
    else {
        tracing::info!(
            pool = pool.name(),
            worker = index,
            pid,
            "worker stopped: {status}"
        );
        return true;
    };
    tracing::warn!(
        pool = pool.name(),
        worker = index,
        pid,
        "worker ended ({why}): {status}; replacing it"
    );
    if !stopping {
        let lost = answer
            .iter()
            .filter(|(_, kind, _)| lost_with_its_worker(*kind))
            .count() as u64;
        pool.workers
            .get(index)
            .lost(lost, format!("{status}: {why}"));
    }
    for (job, kind, message) in answer {
        answer_err(shared, job, kind, message);
    }
    if stopping {
        // Shutdown has taken the queue already: answer, do not requeue.
        for job in requeue {
            let msg = "the dispatcher is shutting down; retry later".into();
            answer_err(shared, job, ErrorKind::ShuttingDown, msg);
        }
    } else {
        // Back to the front of the queue, in their order; a dead run's
        // result areas are not the next run's.
        for mut job in requeue.into_iter().rev() {
            if job.ticket.cancelled() {
                // Cancelled while its worker died (a retry included).
                let message = job.ticket.message();
                answer_err(shared, job, ErrorKind::Cancelled, message);
                continue;
            }
            job.lease.clear_rooms();
            pool.queue.push(job, true);
        }
    }
    false
}

/// The command that starts one of `pool`'s workers (`cgroup`: the memory
/// cgroup made for it, if any).
fn command(shared: &Shared, pool: &Pool, cgroup: Option<&std::path::Path>) -> Command {
    let segment = pool.slots.segment().name();
    let parent = std::process::id().to_string();
    let fault = shared.config.allow_fault_injection;
    let osps_worker = |extra: &[&str]| {
        let mut cmd = Command::new(&shared.config.worker_exe);
        cmd.args(["--segment", segment, "--parent-pid", &parent]);
        if fault {
            cmd.arg("--allow-fault-injection");
        }
        cmd.args(extra);
        cmd
    };
    let mut cmd = match &pool.config.kind {
        PoolKind::Builtin => osps_worker(&[]),
        PoolKind::Program { argv } => {
            // The program's arguments stay its own: ours go in the environment.
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..])
                .env(ipc_core::env::SEGMENT, segment)
                .env(ipc_core::env::PARENT_PID, &parent);
            if fault {
                cmd.env(ipc_core::env::ALLOW_FAULT_INJECTION, "1");
            }
            cmd
        }
        PoolKind::Exec {
            argv,
            ops,
            pass_args,
        } => {
            let timeout = pool.config.job_timeout_ms.to_string();
            let named: Vec<String> = ops.iter().map(|op| format!("--exec-op={op}")).collect();
            let mut extra: Vec<&str> = vec!["--timeout-ms", &timeout];
            extra.extend(named.iter().map(String::as_str));
            if *pass_args {
                extra.push("--pass-args");
            }
            extra.push("--");
            extra.extend(argv.iter().map(String::as_str));
            osps_worker(&extra)
        }
    };
    let run_as = pool.config.run_as.as_ref();
    if pool.config.memory_limit_mib.is_some() || run_as.is_some() {
        cmd = contained(&shared.config.worker_exe, &pool.config, cgroup, &cmd);
    }
    if let Some(who) = run_as {
        own_environment(&mut cmd, who);
    }
    // The pool's own variables (the file refuses OSPS_* names).
    cmd.envs(pool.config.env.iter().map(|(k, v)| (k, v)));
    if let Some(dir) = &pool.config.cwd {
        cmd.current_dir(dir);
    }
    if let Some(who) = &pool.config.run_as {
        // As root, std also drops the supplementary groups (setgroups(0)).
        cmd.uid(who.uid).gid(who.gid);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(match pool.config.memory_limit_mib {
            // Read, to tell an allocation failure from another death.
            Some(_) => Stdio::piped(),
            None => Stdio::inherit(),
        })
        .env(
            ipc_core::env::LOG_FORMAT,
            ipc_core::logging::format().as_str(),
        )
        .kill_on_drop(true);
    if run_as.is_none() {
        // A group of its own, so its group can be killed with it (a
        // worker of another user gets a session of its own from the
        // launcher instead: a group leader could not start one).
        cmd.process_group(0);
    }
    cmd
}

/// What of the dispatcher's environment a worker of another user keeps
/// (besides every `LC_*`): locale, time zone, logging.
const KEPT_FOR_ANOTHER_USER: &[&str] = &["LANG", "LANGUAGE", "TZ", "RUST_LOG", "RUST_BACKTRACE"];

/// The `PATH` a worker of another user gets (the dispatcher's may name
/// its own user's directories).
const SAFE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Gives a worker of another user an environment of its own: none of the
/// dispatcher's (which may hold its user's secrets) but
/// [`KEPT_FOR_ANOTHER_USER`], a plain `PATH`, the user's `HOME`, `USER`,
/// `LOGNAME` and `SHELL`, and what `cmd` sets itself (`OSPS_*`).
fn own_environment(cmd: &mut Command, who: &crate::pools::RunAs) {
    let set: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> = cmd
        .as_std()
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
        .collect();
    let kept = std::env::vars_os().filter(|(k, _)| {
        k.to_str()
            .is_some_and(|k| KEPT_FOR_ANOTHER_USER.contains(&k) || k.starts_with("LC_"))
    });
    cmd.env_clear()
        .envs(kept)
        .env("PATH", SAFE_PATH)
        .env("HOME", &who.home)
        .env("USER", &who.user)
        .env("LOGNAME", &who.user)
        .env("SHELL", &who.shell);
    for (key, value) in set {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
}

/// `cmd` run through the launcher, `osps-worker [--contain-memory BYTES]
/// [--contain-cgroup DIR] [--contain-session] -- PROGRAM ARGS...`: for a
/// pool with a memory limit it sets its own `RLIMIT_DATA` (and waits to be
/// in its memory cgroup `cgroup`, where there is one), for a pool of another user it starts a
/// session of its own (no controlling terminal), sets no_new_privs and
/// closes what it inherited past stderr; then it execs the program (no code
/// runs between fork and exec here: all of this is the launcher's, done
/// before the program's first instruction). The environment `cmd` sets
/// goes with it.
fn contained(
    worker_exe: &std::path::Path,
    pool: &PoolConfig,
    cgroup: Option<&std::path::Path>,
    cmd: &Command,
) -> Command {
    let inner = cmd.as_std();
    let mut outer = Command::new(worker_exe);
    if let Some(mib) = pool.memory_limit_mib {
        outer
            .arg(ipc_core::memory::CONTAIN_FLAG)
            .arg((mib << 20).to_string());
    }
    if let Some(dir) = cgroup {
        outer.arg(ipc_core::memory::CGROUP_FLAG).arg(dir);
    }
    if pool.run_as.is_some() {
        outer.arg(ipc_core::memory::SESSION_FLAG);
    }
    outer
        .arg("--")
        .arg(inner.get_program())
        .args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(value) => outer.env(key, value),
            None => outer.env_remove(key),
        };
    }
    outer
}

/// Starts one of `pool`'s workers and waits for its `Ready`; the first
/// ready worker of a pool tells which operations it serves.
async fn spawn(shared: &Shared, pool: &Pool) -> Result<Worker, String> {
    // Its memory cgroup, where the dispatcher makes them: made (with the
    // limit) before it starts, entered right after (the launcher waits).
    let cgroup = match (pool.config.memory_limit_mib, &shared.cgroups) {
        (Some(mib), Ok(cgroups)) => Some(cgroups.worker(mib << 20)?),
        _ => None,
    };
    let dir = cgroup.as_ref().map(|c| c.dir());
    let mut child = command(shared, pool, dir).spawn().map_err(|e| {
        let program = pool.config.program(&shared.config.worker_exe);
        let mut said = format!("{}: {e}", program[0]);
        if let Some(who) = &pool.config.run_as {
            // It may be the directory, not the program, that user cannot reach.
            let cwd = pool.config.cwd.as_ref().map_or(String::new(), |d| {
                format!(" in {}", d.display())
            });
            said.push_str(&format!(
                " (run as user {} (uid {}){cwd}: the program, its directories and the working directory must be open to that user)",
                who.user, who.uid
            ));
        }
        said
    })?;
    let pid = child.id().ok_or("worker exited at once")?;
    // Before any `.await`: a sweep must never take it for an orphan.
    shared.orphans.worker_started(pid);
    let entered = match &cgroup {
        Some(c) => enter(c.dir().to_owned(), pid).await,
        None => Ok(()),
    };
    if let Err(e) = entered {
        let _ = child.start_kill();
        let status = describe(child.wait().await);
        shared.orphans.worker_reaped(pid);
        return Err(format!("worker {pid}: {e} ({status})"));
    }
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let stderr = match child.stderr.take().map(forward_stderr) {
        Some(Ok(rx)) => Some(rx),
        Some(Err(e)) => {
            tracing::warn!(pool = pool.name(), "cannot read worker {pid}'s stderr: {e}");
            None
        }
        None => None,
    };
    let mut worker = Worker {
        child,
        pid,
        stdin: Some(stdin),
        stdout,
        stderr,
        cgroup,
        oom_before: OomCount::default(),
    };
    let failed = match ready(&mut worker).await {
        Ok((streams, ops)) => match shared.routes.learn(&shared.pools, pool, &ops) {
            Ok(()) => {
                pool.queue.set_streaming_ops(streams);
                return Ok(worker);
            }
            Err(refused) => refused,
        },
        Err(failed) => failed,
    };
    Err(not_ready(shared, pool, worker, failed).await)
}

/// Ends a new worker that did not become ready (`failed`: why), and says
/// why its start failed.
async fn not_ready(shared: &Shared, pool: &Pool, mut worker: Worker, failed: String) -> String {
    let pid = worker.pid;
    let not_ready = End::Kill {
        why: failed.clone(),
        answer: vec![],
        requeue: vec![],
        term_first: false,
    };
    let status = finish(&mut worker, &not_ready).await;
    shared.orphans.worker_reaped(pid);
    shared.orphans.sweep();
    // Out of memory before it was ready: the limit, not the protocol, is why.
    let failed = match (worker.out_of_memory().await, pool.config.memory_limit_mib) {
        (OutOfMemory::PastItsLimit(said, _), Some(mib)) => format!(
            "it ran out of memory before it was ready ({said}): pool \"{}\"'s memory_limit_mib of {mib} MiB is too small for it",
            pool.name()
        ),
        (OutOfMemory::Elsewhere(said), _) => format!("{failed}: {said}"),
        _ => failed,
    };
    format!("worker {pid}: {failed} ({status})")
}

/// Moves new worker `pid` into its memory cgroup `dir`, on a
/// blocking thread: the kernel may wait for an RCU grace period there
/// (measured up to 16 ms), which must not hold up the event loop. The
/// launcher waits meanwhile.
async fn enter(dir: std::path::PathBuf, pid: u32) -> Result<(), String> {
    let moved = tokio::task::spawn_blocking(move || ipc_core::cgroup::enter(&dir, pid)).await;
    moved.unwrap_or_else(|e| Err(format!("moving it into its cgroup failed: {e}")))
}

/// Waits for a new worker's `Ready`; returns the operations it streams,
/// and all it serves.
async fn ready(worker: &mut Worker) -> Result<(Vec<String>, Vec<String>), String> {
    let mut scratch = Vec::new();
    let hello = frame::read_frame_async::<FromWorker, _>(
        &mut worker.stdout,
        &mut scratch,
        DEFAULT_MAX_FRAME,
    );
    Err(match tokio::time::timeout(READY_TIMEOUT, hello).await {
        Ok(Ok(FromWorker::Ready {
            version: PIPE_VERSION,
            streams,
            ops,
            ..
        })) => return Ok((streams, ops)),
        Ok(Ok(FromWorker::Ready { version, .. })) => format!(
            "it speaks worker pipe version {version}, this dispatcher {PIPE_VERSION} (a worker must speak pipe version {PIPE_VERSION}, docs/PROTOCOL.md section 13: osps-worker or an SDK worker from the same OSPS as osps-dispatcher)"
        ),
        Ok(Ok(other)) => format!("unexpected first message {other:?}"),
        Ok(Err(e)) => format!(
            "no ready message: {e} (a worker must speak pipe version {PIPE_VERSION}, docs/PROTOCOL.md section 13: osps-worker or an SDK worker from the same OSPS as osps-dispatcher)"
        ),
        Err(_) => format!("not ready within {READY_TIMEOUT:?}"),
    })
}

/// A `Grow`'s wait for room in the arena.
type RoomWait = std::pin::Pin<Box<dyn std::future::Future<Output = Result<SlotLease, NoRoom>>>>;

/// What woke a busy driver.
enum Woke {
    /// The room a `Grow` asked for, or why none.
    Room(Result<SlotLease, NoRoom>),
    /// Result bytes (or the end of the pipe).
    Read(std::io::Result<usize>),
    /// The running job's payload made progress, or the replacement being
    /// started (recycling) is ready or failed, or a client cancelled a job
    /// (this worker's, perhaps): nothing to read, look again.
    Upload,
    TimedOut,
    Stopped,
}

/// One live worker's service: its session and its pipes.
struct WorkerDriver<'a> {
    shared: &'a Rc<Shared>,
    pool: &'a Pool,
    index: usize,
    w: &'a mut Worker,
    stop: &'a mut watch::Receiver<bool>,
    /// The running job's deadline: one timer for the worker's life, moved
    /// on for each job. A timer registered anew for each job, earlier than
    /// every other the runtime holds (the job timeout is shorter than the
    /// idle timeout), makes the runtime wake its own event loop through its
    /// eventfd: a write(2) and an extra epoll_wait(2) per job. Moved later,
    /// a timer stays where it is in the wheel and costs no system call.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    recycle: Recycle,
    /// Its pipes said it died (EOF or an error on one): its jobs may be
    /// answered before it is reaped ([`answer_first`]).
    dead: bool,
}

impl WorkerDriver<'_> {
    fn entry(&self) -> &WorkerEntry {
        self.pool.workers.get(self.index)
    }

    /// Feeds jobs to the worker until it must go.
    async fn serve(&mut self) -> End<QueuedJob> {
        let config = &self.pool.config;
        let timeout = Duration::from_millis(config.job_timeout_ms);
        // An exec worker answers a timeout itself; ours is a backstop.
        let backstop = match config.kind {
            PoolKind::Exec { .. } => EXEC_BACKSTOP,
            _ => Duration::ZERO,
        };
        let mut s = Session::new(config.max_attempts, Instant::now().into_std())
            .limit_results(config.max_result);
        // The running job's upload, while the worker is told of its progress.
        let mut upload: Option<Rc<Streamed>> = None;
        let mut out = Vec::with_capacity(4096);
        let mut inbuf: Vec<u8> = Vec::with_capacity(4096);
        // The room a `Grow` waits for, while it waits.
        let mut room: Option<RoomWait> = None;
        loop {
            if s.is_idle() {
                let job = match self.next_job().await {
                    Ok(job) => job,
                    Err(died) => return died.map_or(End::Stop, |why| s.died(why, op_name)),
                };
                upload = job.lease.upload().cloned();
                s.start(job, Instant::now().into_std());
            }
            self.take_ahead(&mut s);
            if let Err(e) = self.write_jobs(&mut s, upload.as_deref(), &mut out).await {
                return self.died(s, format!("job pipe: {e}")).await;
            }
            if !s.arriving() {
                upload = None;
            }
            self.entry().set_state(WorkerState::Busy);
            if let Some(up) = &upload {
                match self.tell_news(&mut s, up, &mut out).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => return self.died(s, format!("job pipe: {e}")).await,
                }
            }
            if let Some(end) = s.cancelled(|job| job.ticket.message()) {
                return end;
            }
            let deadline = s.deadline(timeout + backstop).map(Instant::from_std);
            match self
                .wait(&mut inbuf, upload.as_deref(), &mut room, deadline)
                .await
            {
                Woke::Room(given) => {
                    room = None;
                    match self.give_room(&mut s, given, &mut out).await {
                        Ok(()) => continue,
                        Err(e) => return self.died(s, format!("job pipe: {e}")).await,
                    }
                }
                Woke::Read(Ok(0)) => return self.died(s, "result pipe closed".into()).await,
                Woke::Read(Err(e)) => return self.died(s, format!("result pipe: {e}")).await,
                Woke::Read(Ok(_)) => {}
                Woke::Upload => continue,
                Woke::TimedOut => {
                    let head = s.head().expect("a job runs");
                    tracing::warn!(pool = config.name, worker = self.index, job = head.job_id, op = %head.op, "job timed out after {timeout:?}");
                    return s.timed_out(timeout);
                }
                // Stop arrives while busy only when the drain deadline has passed.
                Woke::Stopped => return s.stopped(),
            }
            match self.take_answers(&mut s, &mut inbuf) {
                Ok(()) => {}
                Err(Failed::Broke(why)) => return s.broke(why),
                Err(Failed::Crashed(said)) => return s.crashed(said, op_name),
            }
            if let Err(e) = self.ask_room(&mut s, &mut room, &mut out).await {
                return self.died(s, format!("job pipe: {e}")).await;
            }
            if !s.arriving() {
                upload = None;
            }
        }
    }

    /// The worker died while it held jobs: if its pool has a memory limit
    /// and it said an allocation failed, or the OOM killer ended it at its
    /// memory cgroup's limit ([`Worker::out_of_memory`]), the running job
    /// went past the limit and is answered `out of memory` (not retried: it
    /// would fail again); otherwise an ordinary death ([`Session::died`]),
    /// an OOM kill for memory that ran out elsewhere (the machine) included.
    async fn died(&mut self, s: Session<QueuedJob>, why: String) -> End<QueuedJob> {
        self.dead = true;
        let config = &self.pool.config;
        let Some(mib) = config.memory_limit_mib else {
            return s.died(why, op_name);
        };
        let (said, by) = match self.w.out_of_memory().await {
            OutOfMemory::No => return s.died(why, op_name),
            OutOfMemory::Elsewhere(said) => return s.died(format!("{why}: {said}"), op_name),
            OutOfMemory::PastItsLimit(said, by) => (said, by),
        };
        if s.head().is_some() {
            self.pool.ran_out_of_memory();
        }
        let oom = ipc_core::memory::out_of_memory_message("the job", Some(&config.name), mib, by);
        let message = format!("{oom}; its worker was replaced ({said})");
        s.out_of_memory(format!("{why}: out of memory ({said})"), message)
    }

    /// Waits, idle, for the next job (noting its cgroup's OOM kills so far,
    /// as it takes one); `Err` ends the worker's service: it
    /// died (why), or stops (`None`: the dispatcher stops, or it is swapped
    /// for its ready replacement).
    async fn next_job(&mut self) -> Result<QueuedJob, Option<String>> {
        loop {
            if self.recycle.ready.is_some() {
                self.recycle.due = true;
                return Err(None);
            }
            self.entry().set_state(WorkerState::Idle);
            let started = tokio::select! {
                job = self.pool.queue.next() => {
                    self.w.note_oom_kills();
                    return Ok(job);
                }
                status = self.w.child.wait() => return Err(Some(format!("exited while idle: {}", describe(status)))),
                _ = self.stop.wait_for(|s| *s) => return Err(None),
                started = replacement(&mut self.recycle.starting) => started,
            };
            self.recycle.started(self.pool, self.index, started);
        }
    }

    /// After the worker's frames are read: starts waiting for the room a
    /// `Grow` asked for (or refuses it at once, past the pool's limit), and
    /// forgets a wait whose job was answered meanwhile.
    async fn ask_room(
        &mut self,
        s: &mut Session<QueuedJob>,
        room: &mut Option<RoomWait>,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let len = match s.pending_ask() {
            None => {
                *room = None;
                return Ok(());
            }
            Some(_) if room.is_some() => return Ok(()),
            Some(Ask::Wait(len)) => len,
            Some(Ask::OverLimit { len, limit }) => {
                let message = format!(
                    "a result of {len} bytes exceeds pool \"{}\"'s limit of {limit} bytes (max_result_mib)",
                    self.pool.name()
                );
                return self.refuse_room(s, message, out).await;
            }
            Some(Ask::TooMuchHeld { held, limit }) => {
                let message = format!(
                    "the job's result areas would hold {held} bytes, more than {ROOMS_PER_RESULT} times pool \"{}\"'s limit of {limit} bytes (max_result_mib)",
                    self.pool.name()
                );
                return self.refuse_room(s, message, out).await;
            }
        };
        let job = s.head().expect("a job runs");
        let (slots, holder) = (Rc::clone(&self.pool.slots), Rc::clone(job.lease.holder()));
        *room = Some(Box::pin(
            async move { slots.lease_room(len, &holder).await },
        ));
        Ok(())
    }

    /// Refuses the running job's ask for room, saying why.
    async fn refuse_room(
        &mut self,
        s: &mut Session<QueuedJob>,
        message: String,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let job_id = s.grow_answered(0).expect("a job runs").job_id;
        let msg = ToWorker::NoRoom {
            job_id,
            message: message.into(),
        };
        self.send(&msg, out).await
    }

    /// Gives the running job the room it waited for (`None`: the
    /// dispatcher is shutting down, and refuses).
    async fn give_room(
        &mut self,
        s: &mut Session<QueuedJob>,
        given: Result<SlotLease, NoRoom>,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let area = given.as_ref().map_or(0, |lease| lease.region().len());
        let asked = match s.pending_ask() {
            Some(Ask::Wait(len)) => len,
            _ => 0,
        };
        let Some(job) = s.grow_answered(area) else {
            return Ok(());
        };
        let job_id = job.job_id;
        let msg = match given {
            Ok(lease) => {
                let area = lease.region().into();
                job.lease.add_room(lease);
                ToWorker::Room { job_id, area }
            }
            Err(NoRoom::Closed) => ToWorker::NoRoom {
                job_id,
                message: "the dispatcher is shutting down".into(),
            },
            Err(NoRoom::Busy) => ToWorker::NoRoom {
                job_id,
                message: format!(
                    "no room in the shared segment for a result of {asked} bytes within {ROOM_WAIT:?} (other jobs and clients hold it); retry later"
                )
                .into(),
            },
        };
        self.send(&msg, out).await
    }

    /// Writes one frame to the worker.
    async fn send(&mut self, msg: &ToWorker<'_>, out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        frame::encode(msg, out).expect("frames to a worker encode");
        let stdin = self.w.stdin.as_mut().expect("open while serving");
        stdin.write_all(out).await
    }

    /// Takes more queued jobs for the same write, while the session allows.
    fn take_ahead(&self, s: &mut Session<QueuedJob>) {
        if self.recycle.ready.is_some() {
            // Its replacement waits: let it run dry, to be swapped.
            return;
        }
        let queue = &self.pool.queue;
        let mut ahead = 0;
        while s.may_send_ahead(queue.idle_workers()) {
            let Some(job) = queue.try_next() else {
                break;
            };
            if Session::ahead(ahead, &job) == Ahead::PutBack {
                queue.push(job, true);
                break;
            }
            ahead += job.frame_size();
            s.push_ahead(job);
            self.shared.stats.sent_ahead();
        }
    }

    /// Writes the frames of the jobs not yet in the pipe, in one write.
    async fn write_jobs(
        &mut self,
        s: &mut Session<QueuedJob>,
        upload: Option<&Streamed>,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        if s.unwritten().next().is_none() {
            return Ok(());
        }
        out.clear();
        // Only a job taken alone can be arriving: the running one. If its
        // payload came in meanwhile, there is nothing more to tell.
        let (ready, complete) = match upload {
            Some(up) => (
                up.upload.ready(),
                up.upload.state() == UploadState::Complete,
            ),
            _ => (0, true),
        };
        for job in s.unwritten() {
            let msg = ToWorker::Job(Job {
                job_id: job.job_id,
                op: job.op.as_str().into(),
                args: Args::Borrowed(&job.args),
                slot: job.lease.region().into(),
                input_len: job.input_len,
                ready: if job.arriving() { ready } else { job.input_len },
                // Runs that ended with the worker's death, plus this one.
                attempt: u32::from(job.attempts) + 1,
            });
            frame::encode(&msg, out).expect("jobs encode");
        }
        let stdin = self.w.stdin.as_mut().expect("open while serving");
        stdin.write_all(out).await?;
        s.written(complete);
        if !complete {
            s.tell(News::More { ready, last: false }, std::time::Instant::now());
        }
        Ok(())
    }

    /// Tells the worker of its payload's progress, if there is news;
    /// returns whether there was.
    async fn tell_news(
        &mut self,
        s: &mut Session<QueuedJob>,
        up: &Streamed,
        out: &mut Vec<u8>,
    ) -> std::io::Result<bool> {
        let Some(news) = s.told().and_then(|told| up.upload.news(told)) else {
            return Ok(false);
        };
        let job_id = s.head().expect("a job runs").job_id;
        let msg = match news {
            News::More { ready, .. } => ToWorker::More { job_id, ready },
            News::Abort => ToWorker::Abort { job_id },
        };
        self.send(&msg, out).await?;
        s.tell(news, std::time::Instant::now());
        Ok(true)
    }

    /// Waits for the worker's answer bytes, the upload's progress, the
    /// running job's deadline or the drain deadline; keeps a replacement
    /// being started (recycling) going, and records its start.
    async fn wait(
        &mut self,
        inbuf: &mut Vec<u8>,
        upload: Option<&Streamed>,
        room: &mut Option<RoomWait>,
        deadline: Option<Instant>,
    ) -> Woke {
        let room_given = async {
            match room {
                Some(r) => r.await,
                None => std::future::pending().await,
            }
        };
        let progress = async {
            match upload {
                Some(up) => up.upload.changed().await,
                None => std::future::pending().await,
            }
        };
        if let Some(at) = deadline {
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
        }
        let started = tokio::select! {
            r = self.w.stdout.read_buf(inbuf) => return Woke::Read(r),
            given = room_given => return Woke::Room(given),
            () = progress => return Woke::Upload,
            () = &mut self.timer, if deadline.is_some() => return Woke::TimedOut,
            _ = self.stop.wait_for(|s| *s) => return Woke::Stopped,
            // A job was cancelled: look whether it is this worker's.
            () = self.shared.cancels.notified() => return Woke::Upload,
            started = replacement(&mut self.recycle.starting) => started,
        };
        self.recycle.started(self.pool, self.index, started);
        Woke::Upload
    }

    /// Answers the jobs whose `JobDone` frames are whole in `inbuf`.
    fn take_answers(
        &mut self,
        s: &mut Session<QueuedJob>,
        inbuf: &mut Vec<u8>,
    ) -> Result<(), Failed> {
        let mut consumed = 0;
        let result = loop {
            let done = match frame::try_decode::<FromWorker>(&inbuf[consumed..], DEFAULT_MAX_FRAME)
            {
                Ok(Some((FromWorker::Done(done), n))) => {
                    consumed += n;
                    done
                }
                Ok(Some((FromWorker::Grow { job_id, len }, n))) => {
                    consumed += n;
                    match s.asked(job_id, len) {
                        Ok(()) => continue,
                        Err(why) => break Err(Failed::Broke(why)),
                    }
                }
                Ok(Some((other, _))) => {
                    break Err(Failed::Broke(format!("unexpected message {other:?}")))
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(Failed::Broke(format!("bad result frame: {e}"))),
            };
            match s.answered(done.job_id, &done.outcome, std::time::Instant::now()) {
                Answered::Job(job) => {
                    if matches!(&done.outcome, Outcome::Err(e) if e.kind == ErrorKind::OutOfMemory)
                    {
                        // An exec worker's command went past the limit.
                        self.pool.ran_out_of_memory();
                    }
                    let ok = answer(self.shared, job, done);
                    self.entry().answered(ok);
                    self.recycle
                        .answered(self.shared, self.pool.index, self.w.pid);
                }
                Answered::Crashed(said) => break Err(Failed::Crashed(said)),
                Answered::Broke(why) => break Err(Failed::Broke(why)),
                Answered::Unexpected => {
                    break Err(Failed::Broke(format!(
                        "unexpected message {:?}",
                        FromWorker::Done(done)
                    )))
                }
            }
        };
        inbuf.drain(..consumed);
        result
    }
}

/// Why a worker's answers end its service.
enum Failed {
    /// It broke protocol.
    Broke(String),
    /// It answered its running job `WorkerCrashed` (an operation panicked) and exits.
    Crashed(String),
}

fn op_name(job: &QueuedJob) -> String {
    job.op.as_str().to_owned()
}

/// Checks a worker's answer and sends the reply to the job's connection.
/// Returns whether the reply is a success.
fn answer(shared: &Shared, job: QueuedJob, done: JobDone) -> bool {
    let result = done
        .result_offset
        .checked_add(done.result_len)
        .filter(|&end| end <= job.lease.result_area().len())
        .map(|end| done.result_offset as usize..end as usize);
    let Some(result) = result else {
        let msg = "the worker described a result outside its slot (or its last room)".into();
        answer_err(shared, job, ErrorKind::Internal, msg);
        return false;
    };
    let ok = matches!(done.outcome, Outcome::Ok);
    send(shared, job, done.outcome, result);
    ok
}

/// Answers a job with an error.
pub fn answer_err(shared: &Shared, job: QueuedJob, kind: ErrorKind, message: String) {
    let outcome = Outcome::Err(RemoteError::new(kind, message));
    send(shared, job, outcome, 0..0);
}

/// Counts the outcome and hands the reply, with the slot (back from the
/// worker, and from the upload if it is over) and permit, to the
/// connection's writer.
fn send(shared: &Shared, job: QueuedJob, outcome: Outcome, result: std::ops::Range<usize>) {
    reply(shared, job, outcome, |slot| {
        let lease = slot.settle();
        Body::Slot { result, lease }
    });
}

/// Counts the outcome and hands the reply, with the permit, to the
/// connection's writer; `body` makes the reply's body of the job's slot
/// (settled: [`send`]), or keeps the slot elsewhere (a dead worker's job:
/// [`answer_first`]).
fn reply(shared: &Shared, job: QueuedJob, outcome: Outcome, body: impl FnOnce(JobSlot) -> Body) {
    let took = shared.stats.answered(&outcome, job.received);
    job.metrics.answered(&outcome, took);
    let body = body(job.lease);
    let ticket = job.ticket;
    let answered = ticket.answers_cancels(&outcome);
    job.reply.answer(job.req_id, outcome, body);
    // A cancel waiting for this answer goes after it.
    drop(answered);
}

/// Ends a worker: on `Stop`, closes its stdin and waits a grace period; in
/// every other case (or when the grace runs out) kills its whole process
/// group. Always reaps it, and kills what is left of its process group
/// (processes its jobs started and left behind). Returns how it exited.
async fn finish(w: &mut Worker, end: &End<QueuedJob>) -> String {
    if matches!(end, End::Stop) {
        // Closing stdin is the polite stop: the worker sees EOF and exits 0.
        drop(w.stdin.take());
        if let Ok(status) = tokio::time::timeout(EXIT_GRACE, w.child.wait()).await {
            // The group's id stays taken while it has members, so this
            // reaches only what the worker left in its group (ESRCH if none).
            let _ = killpg(Pid::from_raw(w.pid as i32), Signal::SIGKILL);
            return describe(status);
        }
        tracing::warn!(
            pid = w.pid,
            "worker did not exit within {EXIT_GRACE:?} of EOF; killing it"
        );
    }
    let group = Pid::from_raw(w.pid as i32);
    if matches!(
        end,
        End::Kill {
            term_first: true,
            ..
        }
    ) {
        // A hung job: SIGTERM first, so the worker (and what its job
        // started) may log what it was doing; SIGKILL after the grace.
        let _ = killpg(group, Signal::SIGTERM);
        if let Ok(status) = tokio::time::timeout(TERM_GRACE, w.child.wait()).await {
            let _ = killpg(group, Signal::SIGKILL); // what it left in its group
            return describe(status);
        }
    }
    let _ = killpg(group, Signal::SIGKILL);
    describe(w.child.wait().await)
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!(
                "killed by signal {sig} ({})",
                Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?")
            ),
            _ => s.to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}
