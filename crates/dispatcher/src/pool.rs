//! The worker pool: one driver task per worker. A driver spawns its worker
//! (stdin = job pipe, stdout = result pipe, own process group) and feeds it
//! jobs from the shared queue, several at a time when the queue is deep (one
//! pipe write for a batch of job frames; the worker answers them in order).
//! It enforces the per-job timeout on the job the worker is running (the
//! oldest unanswered), and on a crash or hang kills the worker's process
//! group, reaps it, answers or requeues its jobs, and spawns a replacement.
//! The dispatcher never blocks on a worker: every wait is a bounded `.await`.

use std::collections::VecDeque;
use std::process::Stdio;
use std::rc::Rc;
use std::time::Duration;

use ipc_core::frame::{self, DEFAULT_MAX_FRAME};
use ipc_core::proto::{
    ErrorKind, FromWorker, JobDone, JobRef, Outcome, RemoteError, ToWorkerRef, PIPE_VERSION,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::shared::{QueuedJob, Reply, Shared};
use crate::slots::{News, Streamed, UploadState};

/// How long a new worker has to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker has to exit after its stdin closes.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Failed starts in a row after which waiting jobs are answered with an error.
const GIVE_UP_JOBS_AFTER_FAILED_STARTS: u32 = 3;
/// Attempts per job: the first run plus one retry after a worker crash.
const MAX_ATTEMPTS: u8 = 2;
/// Jobs one worker may have been sent and not yet answered. More than one
/// only when no worker is idle, so a long job holds back few others.
const MAX_BATCH: usize = 8;
/// Bytes of job frames sent ahead to a busy worker, at most (well under a pipe's capacity).
const MAX_BATCH_BYTES: usize = 4096;

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
    /// It died, hung or broke protocol: its process group is killed. Its jobs
    /// are answered or requeued only once it is dead, so no slot is reused
    /// while the worker could still write into it.
    Kill {
        why: String,
        answer: Vec<(QueuedJob, ErrorKind, String)>,
        requeue: Vec<QueuedJob>,
    },
}

/// Drives pool slot `index` until `stop` turns true.
pub async fn drive(shared: Rc<Shared>, index: usize, mut stop: watch::Receiver<bool>) {
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
                    for job in shared.take_queue() {
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
        shared.set_worker(index, |w| w.pid = worker.pid);
        shared.set_worker_started(index, Some(std::time::Instant::now()));
        shared.set_state(index, "idle");
        let end = serve(&shared, index, &mut worker, &mut stop).await;
        let status = finish(&mut worker, &end).await;
        shared.set_state(index, "stopped");
        shared.set_worker_started(index, None);
        match end {
            End::Stop => {
                tracing::info!(worker = index, pid = worker.pid, "worker stopped: {status}");
                break;
            }
            End::Kill {
                why,
                answer,
                requeue,
            } => {
                tracing::warn!(
                    worker = index,
                    pid = worker.pid,
                    "worker ended ({why}): {status}; replacing it"
                );
                let stopping = *stop.borrow();
                if !stopping {
                    let lost = answer.len() as u64;
                    shared.set_worker(index, |w| {
                        w.jobs_failed += lost;
                        w.last_exit = format!("{status}: {why}");
                    });
                }
                for (job, kind, message) in answer {
                    answer_err(&shared, job, kind, message);
                }
                if *stop.borrow() {
                    // Shutdown has taken the queue already: answer, do not requeue.
                    for job in requeue {
                        answer_err(
                            &shared,
                            job,
                            ErrorKind::ShuttingDown,
                            "the dispatcher is shutting down; retry later".into(),
                        );
                    }
                } else {
                    // Back to the front of the queue, in their order.
                    for job in requeue.into_iter().rev() {
                        shared.enqueue(job, true);
                    }
                }
            }
        }
        if *stop.borrow() {
            // Killed at the end of shutdown, not replaced.
            shared.set_worker(index, |w| w.pid = 0);
            break;
        }
        shared.set_worker(index, |w| {
            w.restarts += 1;
            w.pid = 0;
        });
        shared.set_state(index, "starting");
    }
}

async fn spawn(shared: &Shared) -> Result<Worker, String> {
    let mut cmd = Command::new(&shared.config.worker_exe);
    cmd.arg("--segment")
        .arg(shared.slots.segment().name())
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env(
            ipc_core::logging::ENV_LOG_FORMAT,
            ipc_core::logging::format().as_str(),
        )
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
            version: PIPE_VERSION,
            streams,
            ..
        })) => {
            shared.set_streaming_ops(streams);
            return Ok(worker);
        }
        Ok(Ok(FromWorker::Ready { version, .. })) => format!(
            "it speaks worker pipe version {version}, this dispatcher {PIPE_VERSION} (osps-worker must come from the same build as osps-dispatcher)"
        ),
        Ok(Ok(other)) => format!("unexpected first message {other:?}"),
        Ok(Err(e)) => format!(
            "no ready message: {e} (osps-worker must come from the same build as osps-dispatcher)"
        ),
        Err(_) => format!("not ready within {READY_TIMEOUT:?}"),
    };
    let status = finish(
        &mut worker,
        &End::Kill {
            why: failed.clone(),
            answer: vec![],
            requeue: vec![],
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
    stop: &mut watch::Receiver<bool>,
) -> End {
    let timeout = Duration::from_millis(shared.config.job_timeout_ms);
    // Jobs sent and not yet answered, oldest (the one running) first; the
    // first `written` of them are in the pipe.
    let mut sent: VecDeque<QueuedJob> = VecDeque::new();
    let mut written = 0usize;
    let mut head_since = Instant::now();
    // While the running job's payload is still arriving, from the moment the
    // job is taken until the worker has been told all of it is in (or that it
    // never will be): its upload, and how many bytes the worker was told are
    // in. Nothing is sent ahead meanwhile, and no timeout runs (the
    // connection's frame deadline bounds the upload); it starts once all is in.
    let mut arriving: Option<(Rc<Streamed>, u64)> = None;
    let mut out = Vec::with_capacity(4096);
    let mut inbuf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if sent.is_empty() {
            shared.set_state(index, "idle");
            let job = tokio::select! {
                job = shared.next_job() => job,
                status = w.child.wait() => return died(format!("exited while idle: {}", describe(status)), sent),
                _ = stop.wait_for(|s| *s) => return End::Stop,
            };
            head_since = Instant::now();
            arriving = job.lease.upload().map(|s| (Rc::clone(s), 0));
            sent.push_back(job);
        }
        // More in the same write while jobs wait and no other worker is idle,
        // small ones only: what is sent ahead must fit the pipe with room to
        // spare, so neither side can block writing while the other does.
        // Never behind or ahead of a job whose payload is arriving: the
        // worker reads that payload's news from its pipe until it is all in.
        let mut ahead = 0;
        while sent.len() < MAX_BATCH && shared.idle_workers() == 0 && arriving.is_none() {
            let Some(job) = shared.try_next_job() else {
                break;
            };
            let size =
                64 + job.op.as_str().len() + job.args.iter().map(|a| a.len() + 8).sum::<usize>();
            if ahead + size > MAX_BATCH_BYTES || job.lease.upload().is_some() {
                shared.enqueue(job, true);
                break;
            }
            ahead += size;
            sent.push_back(job);
            shared.jobs_sent_ahead.set(shared.jobs_sent_ahead.get() + 1);
        }
        if written < sent.len() {
            out.clear();
            for job in sent.range(written..) {
                // Only a job taken alone can be arriving: this one. If its
                // payload came in meanwhile, there is nothing more to tell.
                let ready = match arriving.take() {
                    Some((streamed, _)) => {
                        let ready = streamed.upload.ready();
                        if streamed.upload.state() != UploadState::Complete {
                            arriving = Some((streamed, ready));
                        }
                        ready
                    }
                    None => job.input_len,
                };
                let msg = ToWorkerRef::Job(JobRef {
                    job_id: job.job_id,
                    op: job.op.as_str(),
                    args: &job.args,
                    slot: job.lease.region().into(),
                    input_len: job.input_len,
                    ready,
                    // Runs that ended with the worker's death, plus this one.
                    attempt: u32::from(job.attempts) + 1,
                });
                frame::encode(&msg, &mut out).expect("jobs encode");
            }
            let stdin = w.stdin.as_mut().expect("open while serving");
            if let Err(e) = stdin.write_all(&out).await {
                return died(format!("job pipe: {e}"), sent);
            }
            written = sent.len();
        }
        shared.set_state(index, "busy");
        // Tell the worker of its payload's progress, if there is news.
        if let Some((streamed, told)) = &mut arriving {
            if let Some(news) = streamed.upload.news(*told) {
                let job_id = sent.front().expect("a job runs").job_id;
                let msg = match news {
                    News::More { ready, .. } => ToWorkerRef::More { job_id, ready },
                    News::Abort => ToWorkerRef::Abort { job_id },
                };
                out.clear();
                frame::encode(&msg, &mut out).expect("news encodes");
                let stdin = w.stdin.as_mut().expect("open while serving");
                if let Err(e) = stdin.write_all(&out).await {
                    return died(format!("job pipe: {e}"), sent);
                }
                match news {
                    News::More { ready, last: false } => *told = ready,
                    News::More { last: true, .. } | News::Abort => {
                        arriving = None;
                        head_since = Instant::now();
                    }
                }
                continue;
            }
        }
        let upload = arriving.as_ref().map(|(s, _)| Rc::clone(s));
        let read = tokio::select! {
            r = w.stdout.read_buf(&mut inbuf) => r,
            _ = async { upload.as_ref().expect("checked").upload.changed().await }, if upload.is_some() => continue,
            _ = tokio::time::sleep_until(head_since + timeout), if upload.is_none() => {
                let head = sent.pop_front().expect("a job runs");
                tracing::warn!(worker = index, job = head.job_id, op = %head.op, "job timed out after {timeout:?}");
                let msg = format!("the job ran longer than {timeout:?}; its worker was killed and replaced");
                return End::Kill { why: "job timeout".into(), answer: vec![(head, ErrorKind::Timeout, msg)], requeue: sent.into() };
            }
            // Stop arrives while busy only when the drain deadline has passed.
            _ = stop.wait_for(|s| *s) => {
                let msg = "the dispatcher is shutting down and the job did not finish within the drain deadline";
                let answer = sent.into_iter().map(|j| (j, ErrorKind::ShuttingDown, msg.to_owned())).collect();
                return End::Kill { why: "stopped during a job".into(), answer, requeue: vec![] };
            }
        };
        match read {
            Ok(0) => return died("result pipe closed".into(), sent),
            Err(e) => return died(format!("result pipe: {e}"), sent),
            Ok(_) => {}
        }
        let mut consumed = 0;
        loop {
            let msg = match frame::try_decode::<FromWorker>(&inbuf[consumed..], DEFAULT_MAX_FRAME) {
                Ok(Some((msg, n))) => {
                    consumed += n;
                    msg
                }
                Ok(None) => break,
                Err(e) => return broke(format!("bad result frame: {e}"), sent),
            };
            match msg {
                FromWorker::Done(done)
                    if arriving.is_some() && matches!(done.outcome, Outcome::Ok) =>
                {
                    // Success before the payload was all in: the result would be
                    // read from a slot the connection may still be writing.
                    return broke(
                        format!(
                            "job {} succeeded before its payload had arrived",
                            done.job_id
                        ),
                        sent,
                    );
                }
                FromWorker::Done(done) if sent.front().is_some_and(|j| j.job_id == done.job_id) => {
                    // An error may come early (bad arguments); the news still
                    // sent for that job is ignored by the worker.
                    arriving = None;
                    let job = sent.pop_front().expect("checked above");
                    written -= 1;
                    head_since = Instant::now();
                    let ok = answer(shared, job, done);
                    shared.set_worker(index, |s| {
                        if ok {
                            s.jobs_done += 1;
                        } else {
                            s.jobs_failed += 1;
                        }
                    });
                }
                other => return broke(format!("unexpected message {other:?}"), sent),
            }
        }
        inbuf.drain(..consumed);
    }
}

/// The worker died with `sent` jobs on it: the oldest was running and is
/// retried once (then answered `worker crashed`); the others had not started
/// and go back to the queue without counting an attempt.
fn died(why: String, mut sent: VecDeque<QueuedJob>) -> End {
    let Some(mut head) = sent.pop_front() else {
        return End::Kill {
            why,
            answer: vec![],
            requeue: vec![],
        };
    };
    head.attempts += 1;
    let mut requeue: Vec<QueuedJob> = Vec::new();
    let mut answer = Vec::new();
    if head.attempts < MAX_ATTEMPTS {
        tracing::warn!(job = head.job_id, op = %head.op, "worker died during the job; retrying it once");
        requeue.push(head);
    } else {
        let msg = format!(
            "the worker running {:?} died on each of {} attempts; the job was given up",
            head.op.as_str(),
            head.attempts
        );
        answer.push((head, ErrorKind::WorkerCrashed, msg));
    }
    requeue.extend(sent);
    End::Kill {
        why,
        answer,
        requeue,
    }
}

/// The worker broke protocol: its running job gets an internal error, the rest are requeued.
fn broke(why: String, mut sent: VecDeque<QueuedJob>) -> End {
    let answer = sent
        .pop_front()
        .map(|head| {
            (
                head,
                ErrorKind::Internal,
                "the worker broke protocol; it was replaced".to_owned(),
            )
        })
        .into_iter()
        .collect();
    End::Kill {
        why: format!("protocol violation: {why}"),
        answer,
        requeue: sent.into(),
    }
}

/// Checks a worker's answer and sends the reply to the job's connection.
/// Returns whether the reply is a success.
fn answer(shared: &Shared, job: QueuedJob, done: JobDone) -> bool {
    let slot_len = job.lease.region().len();
    let result = done
        .result_offset
        .checked_add(done.result_len)
        .filter(|&end| end <= slot_len)
        .map(|end| done.result_offset as usize..end as usize);
    let Some(result) = result else {
        answer_err(
            shared,
            job,
            ErrorKind::Internal,
            "the worker described a result outside its slot".into(),
        );
        return false;
    };
    let ok = matches!(done.outcome, Outcome::Ok);
    send(shared, job, done.outcome, result);
    ok
}

/// Answers a job with an error.
pub fn answer_err(shared: &Shared, job: QueuedJob, kind: ErrorKind, message: String) {
    send(
        shared,
        job,
        Outcome::Err(RemoteError::new(kind, message)),
        0..0,
    );
}

/// Counts the outcome and hands the reply, with the slot (back from the
/// worker, and from the upload if it is over) and permit, to the
/// connection's writer.
fn send(shared: &Shared, job: QueuedJob, outcome: Outcome, result: std::ops::Range<usize>) {
    shared.count(&outcome);
    shared.record_latency(job.received);
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
        lease: lease.settle(),
        permit,
    });
}

/// Ends a worker: on `Stop`, closes its stdin and waits a grace period; in
/// every other case (or when the grace runs out) kills its whole process
/// group. Always reaps it, and kills what is left of its process group
/// (processes its jobs started and left behind). Returns how it exited.
async fn finish(w: &mut Worker, end: &End) -> String {
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
