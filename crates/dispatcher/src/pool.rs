//! The worker pool: one driver task per worker. A driver spawns its worker
//! (stdin = job pipe, stdout = result pipe, own process group), feeds it one
//! job at a time from the shared queue, enforces the per-job timeout, and on
//! a crash or hang kills the worker's process group, reaps it, answers or
//! retries the job, and spawns a replacement. The dispatcher never blocks on
//! a worker: every wait here is an `.await` with a bound.

use std::process::Stdio;
use std::rc::Rc;
use std::time::Duration;

use ipc_core::frame::{self, DEFAULT_MAX_FRAME};
use ipc_core::proto::{
    ErrorKind, FromWorker, Job, JobDone, Outcome, RemoteError, PROTOCOL_VERSION,
};
use ipc_core::Region;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;

use crate::shared::{QueuedJob, Reply, Shared};

/// How long a new worker has to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker has to exit after its stdin closes.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Failed starts in a row after which waiting jobs are answered with an error.
const GIVE_UP_JOBS_AFTER_FAILED_STARTS: u32 = 3;
/// Attempts per job: the first run plus one retry after a worker crash.
const MAX_ATTEMPTS: u8 = 2;

struct Worker {
    child: Child,
    pid: u32,
    /// `None` once closed (the polite stop).
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
}

/// How a worker's service ended.
enum End {
    /// Asked to stop while idle: its stdin is closed and it exits by itself.
    Stop,
    /// It died, hung or broke protocol: its process group is killed. A job it
    /// held is answered only once it is dead, so its slot cannot be reused
    /// while the worker could still write into it.
    Kill {
        why: String,
        unanswered: Option<(QueuedJob, ErrorKind, String)>,
    },
}

/// Drives pool slot `index` until `stop` turns true.
pub async fn drive(shared: Rc<Shared>, index: usize, mut stop: watch::Receiver<bool>) {
    let mut retry: Option<QueuedJob> = None;
    let mut failures_in_a_row = 0u32;
    while !*stop.borrow() {
        let mut worker = match spawn(&shared).await {
            Ok(w) => {
                failures_in_a_row = 0;
                w
            }
            Err(e) => {
                failures_in_a_row += 1;
                let delay = Duration::from_millis(50 << failures_in_a_row.min(6));
                tracing::error!(
                    worker = index,
                    "cannot start worker: {e}; retrying in {delay:?}"
                );
                if failures_in_a_row >= GIVE_UP_JOBS_AFTER_FAILED_STARTS {
                    // Jobs must not wait forever on a pool that cannot start:
                    // answer what is waiting, keep trying to start.
                    let msg = format!("no worker can be started ({e}); see the dispatcher's log");
                    for job in retry.take().into_iter().chain(shared.take_queue()) {
                        answer_err(&shared, job, ErrorKind::Internal, msg.clone());
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                continue;
            }
        };
        tracing::info!(worker = index, pid = worker.pid, "worker started");
        shared.set_worker(index, |w| {
            w.pid = worker.pid;
            w.state = "idle".into();
        });
        let end = serve(&shared, index, &mut worker, &mut retry, &mut stop).await;
        let status = finish(&mut worker, &end).await;
        shared.set_worker(index, |w| w.state = "stopped".into());
        match end {
            End::Stop => {
                tracing::info!(worker = index, pid = worker.pid, "worker stopped: {status}");
                break;
            }
            End::Kill { why, unanswered } => {
                tracing::warn!(
                    worker = index,
                    pid = worker.pid,
                    "worker ended ({why}): {status}; replacing it"
                );
                if let Some((job, kind, message)) = unanswered {
                    answer_err(&shared, job, kind, message);
                }
            }
        }
        shared.set_worker(index, |w| {
            w.restarts += 1;
            w.pid = 0;
            w.state = "starting".into();
        });
    }
    if let Some(job) = retry.take() {
        answer_err(
            &shared,
            job,
            ErrorKind::ShuttingDown,
            "the dispatcher stopped before the job could be retried".into(),
        );
    }
}

async fn spawn(shared: &Shared) -> Result<Worker, String> {
    let mut cmd = Command::new(&shared.config.worker_exe);
    cmd.arg("--segment")
        .arg(shared.segment.name())
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true);
    if shared.config.allow_fault_injection {
        cmd.arg("--allow-fault-injection");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", shared.config.worker_exe.display()))?;
    let pid = child.id().ok_or("worker exited at once")?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let mut worker = Worker {
        child,
        pid,
        stdin: Some(stdin),
        stdout,
    };
    let mut scratch = Vec::new();
    let hello = frame::read_frame_async::<FromWorker, _>(
        &mut worker.stdout,
        &mut scratch,
        DEFAULT_MAX_FRAME,
    );
    let failed = match tokio::time::timeout(READY_TIMEOUT, hello).await {
        Ok(Ok(FromWorker::Ready {
            version: PROTOCOL_VERSION,
            ..
        })) => return Ok(worker),
        Ok(Ok(other)) => format!("unexpected first message {other:?}"),
        Ok(Err(e)) => format!("no ready message: {e}"),
        Err(_) => format!("not ready within {READY_TIMEOUT:?}"),
    };
    let status = finish(
        &mut worker,
        &End::Kill {
            why: failed.clone(),
            unanswered: None,
        },
    )
    .await;
    Err(format!("worker {pid}: {failed} ({status})"))
}

/// Feeds jobs to a live worker until it must go.
async fn serve(
    shared: &Rc<Shared>,
    index: usize,
    w: &mut Worker,
    retry: &mut Option<QueuedJob>,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let timeout = Duration::from_millis(shared.config.job_timeout_ms);
    let mut out = Vec::with_capacity(256);
    let mut scratch = Vec::with_capacity(256);
    let kill = |why: String, unanswered| End::Kill { why, unanswered };
    loop {
        let mut job = match retry.take() {
            Some(job) => job,
            None => tokio::select! {
                job = shared.next_job() => job,
                status = w.child.wait() => return kill(format!("exited while idle: {}", describe(status)), None),
                _ = stop.wait_for(|s| *s) => return End::Stop,
            },
        };
        let region = job.lease.region();
        let msg = Job {
            job_id: job.job_id,
            op: job.op.clone(),
            args: job.args.clone(),
            slot: region,
            input_len: job.input_len,
        };
        out.clear();
        frame::encode(&msg, &mut out).expect("jobs encode");
        shared.set_worker(index, |s| s.state = "busy".into());
        let stdin = w.stdin.as_mut().expect("open while serving");
        let stdout = &mut w.stdout;
        let round_trip = async {
            stdin
                .write_all(&out)
                .await
                .map_err(|e| format!("job pipe: {e}"))?;
            frame::read_frame_async::<FromWorker, _>(stdout, &mut scratch, DEFAULT_MAX_FRAME)
                .await
                .map_err(|e| format!("result pipe: {e}"))
        };
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, round_trip) => r,
            // Stop arrives while busy only when the drain deadline has passed.
            _ = stop.wait_for(|s| *s) => {
                let msg = "the dispatcher is shutting down and the job did not finish within the drain deadline".to_owned();
                return kill("stopped during a job".into(), Some((job, ErrorKind::ShuttingDown, msg)));
            }
        };
        shared.set_worker(index, |s| s.state = "idle".into());
        match result {
            Ok(Ok(FromWorker::Done(done))) if done.job_id == job.job_id => {
                shared.set_worker(index, |s| s.jobs_done += 1);
                answer(shared, job, done, region);
            }
            Ok(Ok(other)) => {
                let msg = "the worker broke protocol; it was replaced".to_owned();
                return kill(
                    format!("protocol violation: {other:?}"),
                    Some((job, ErrorKind::Internal, msg)),
                );
            }
            Ok(Err(why)) => {
                job.attempts += 1;
                if job.attempts < MAX_ATTEMPTS {
                    tracing::warn!(worker = index, job = job.job_id, op = %job.op, "worker died during the job; retrying it once");
                    *retry = Some(job);
                    return kill(why, None);
                }
                let msg = format!(
                    "the worker running {:?} died on each of {} attempts; the job was given up",
                    job.op, job.attempts
                );
                return kill(why, Some((job, ErrorKind::WorkerCrashed, msg)));
            }
            Err(_) => {
                tracing::warn!(worker = index, job = job.job_id, op = %job.op, "job timed out after {timeout:?}");
                let msg = format!(
                    "the job ran longer than {timeout:?}; its worker was killed and replaced"
                );
                return kill("job timeout".into(), Some((job, ErrorKind::Timeout, msg)));
            }
        }
    }
}

/// Checks a worker's answer and sends the reply to the job's connection.
fn answer(shared: &Shared, job: QueuedJob, done: JobDone, slot: Region) {
    let in_slot = done
        .result_offset
        .checked_add(done.result_len)
        .is_some_and(|end| end <= slot.len);
    if !in_slot {
        answer_err(
            shared,
            job,
            ErrorKind::Internal,
            "the worker described a result outside its slot".into(),
        );
        return;
    }
    let result = Region {
        offset: slot.offset + done.result_offset,
        len: done.result_len,
    };
    send(shared, job, done.outcome, result);
}

/// Answers a job with an error.
pub fn answer_err(shared: &Shared, job: QueuedJob, kind: ErrorKind, message: String) {
    let empty = Region {
        offset: job.lease.region().offset,
        len: 0,
    };
    send(
        shared,
        job,
        Outcome::Err(RemoteError::new(kind, message)),
        empty,
    );
}

/// Counts the outcome and hands the reply, with the slot and permit, to the connection's writer.
fn send(shared: &Shared, job: QueuedJob, outcome: Outcome, result: Region) {
    shared.count(&outcome);
    let QueuedJob {
        req_id,
        lease,
        reply,
        permit,
        ..
    } = job;
    let _ = reply.send(Reply::Job {
        req_id,
        outcome,
        result,
        lease,
        permit,
    });
}

/// Ends a worker: on `Stop`, closes its stdin and waits a grace period; in
/// every other case (or when the grace runs out) kills its whole process
/// group. Always reaps it. Returns how it exited.
async fn finish(w: &mut Worker, end: &End) -> String {
    if matches!(end, End::Stop) {
        // Closing stdin is the polite stop: the worker sees EOF and exits 0.
        drop(w.stdin.take());
        if let Ok(status) = tokio::time::timeout(EXIT_GRACE, w.child.wait()).await {
            return describe(status);
        }
        tracing::warn!(
            pid = w.pid,
            "worker did not exit within {EXIT_GRACE:?} of EOF; killing it"
        );
    }
    let _ = killpg(Pid::from_raw(w.pid as i32), Signal::SIGKILL);
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
