//! The OSPS worker SDK, and the builtin `osps-worker` built with it.
//!
//! A worker reads [`Job`]s as frames on stdin, runs each on its slot of the
//! shared segment in place, and answers a [`JobDone`] frame on stdout (the
//! worker protocol, docs/PROTOCOL.md §13). A job of a streaming operation
//! may come before its input has arrived in full: then `More` frames on
//! stdin say how far the input has come (or `Abort` that it never will), and
//! the operation reads it as it comes. Logs go to stderr. It exits cleanly
//! on EOF, which is how the dispatcher stops it, and dies with its
//! dispatcher (`PR_SET_PDEATHSIG`) as a backstop.
//!
//! A program becomes a worker with [`Worker`]: register operations, call
//! [`Worker::run`]; this module does the protocol. An operation's error is
//! answered to the client as is; after a panic the worker answers the job
//! `worker crashed` with the panic's message and runs nothing more (the
//! dispatcher takes that answer as the worker's death, kills it, and runs
//! the job again on a fresh worker while `--max-attempts` allows).

mod job;
pub mod ops;
mod registry;

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};

use ipc_core::frame::{self, FrameError, DEFAULT_MAX_FRAME};
pub use ipc_core::proto::{ErrorKind, RemoteError};
use ipc_core::proto::{FromWorker, Job, JobDone, Outcome, ToWorker, PIPE_VERSION};
use ipc_core::{Region, Segment, SegmentError};
pub use job::{expect_args, invalid_input, Call, Input, JobCtx, Output, Short, Whole, SHORT_MAX};
pub use registry::Worker;
use registry::{panic_message, Op, Runner};

/// Longest error message a worker sends back, in bytes.
const MAX_MESSAGE: usize = 1024;

/// The arguments the dispatcher starts a worker with.
#[derive(Debug, clap::Parser)]
#[command(
    version,
    about = "An OSPS worker: runs jobs read from stdin on a shared-memory segment, answering on stdout"
)]
struct Args {
    #[command(flatten)]
    log: ipc_core::cli::LogArgs,
    /// Name of the shared-memory segment to open, as the dispatcher gives it
    /// (e.g. /osps-1000-default-5e5ccee6-9f3a61c2d07b48e5; sysv: before it for System V).
    #[arg(long, env = ipc_core::env::SEGMENT)]
    segment: String,
    /// Serve the fault-injection operations (the builtin `crash` and `spawn`).
    #[arg(long, env = ipc_core::env::ALLOW_FAULT_INJECTION, value_parser = clap::builder::BoolishValueParser::new())]
    allow_fault_injection: bool,
    /// Exit when this process (the dispatcher) dies.
    #[arg(long, env = ipc_core::env::PARENT_PID)]
    parent_pid: Option<u32>,
}

/// How a worker is started.
#[derive(Debug, Clone)]
pub struct Config {
    /// The segment's name.
    pub segment: String,
    /// Serve the fault-injection operations (`crash`).
    pub allow_fault_injection: bool,
    /// The dispatcher's pid: the worker dies with it, and refuses to start if it is already gone.
    pub parent_pid: Option<u32>,
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("job pipe: {0}")]
    Frame(#[from] FrameError),
    #[error("stdout: {0}")]
    Io(#[from] io::Error),
    #[error("parent {expected} is gone (parent is now {actual}); exiting")]
    Orphaned { expected: u32, actual: i32 },
    #[error("cannot set the parent-death signal: {0}")]
    Prctl(nix::Error),
    #[error("the segment belongs to dispatcher {owner}, not to our parent {parent}; exiting")]
    ForeignSegment { owner: u32, parent: u32 },
    #[error("job {running}'s input was still arriving when job {next} came")]
    JobDuringInput { running: u64, next: u64 },
    #[error("the dispatcher sent room for job {job}'s result, which was not asked for")]
    UnaskedRoom { job: u64 },
    #[error("job {job}: {message}; the worker exits")]
    Crashed { job: u64, message: String },
}

/// Serves `worker`'s operations until stdin closes.
fn serve(worker: &Worker, config: &Config) -> Result<(), WorkerError> {
    if let Some(expected) = config.parent_pid {
        die_with_parent(expected)?;
    }
    let mut segment = open_segment(config)?;
    let mut pipes = Pipes::open()?;
    pipes.send(&FromWorker::Ready {
        pid: std::process::id(),
        version: PIPE_VERSION,
        streams: worker.streams(config.allow_fault_injection),
        ops: worker.names(),
    })?;
    // Soon after ready: map the whole segment so no job pays a page fault.
    segment.populate_in_background(std::time::Duration::from_millis(200));
    tracing::debug!(segment = %config.segment, "worker ready");
    let (mut scratch, mut news_scratch) = (Vec::with_capacity(256), Vec::with_capacity(64));
    let mut runner = JobRunner {
        worker,
        allow_fault_injection: config.allow_fault_injection,
        out: Vec::with_capacity(256),
    };
    loop {
        // Decoded in place: the job borrows its strings from `scratch`.
        let job = match read_message(&mut pipes.input, &mut scratch)? {
            Some(ToWorker::Job(job)) => job,
            // News of a job answered before its input was in (it failed early).
            Some(ToWorker::More { job_id, .. } | ToWorker::Abort { job_id }) => {
                tracing::trace!(job = job_id, "input news for an answered job; ignored");
                continue;
            }
            Some(ToWorker::Room { job_id, .. } | ToWorker::NoRoom { job_id, .. }) => {
                return Err(WorkerError::UnaskedRoom { job: job_id })
            }
            None => {
                tracing::debug!("job pipe closed; exiting");
                return Ok(());
            }
        };
        let mut pipe = Pipe {
            input: &mut pipes.input,
            scratch: &mut news_scratch,
            broken: None,
        };
        let done = runner.run_job(&mut segment, &job, &mut pipe);
        let broken = pipe.broken;
        segment.header().count_job();
        let crashed = match &done.outcome {
            Outcome::Err(e) if e.kind == ErrorKind::WorkerCrashed => Some(e.message.clone()),
            _ => None,
        };
        let job = done.job_id;
        pipes.send(&FromWorker::Done(done))?;
        if let Some(e) = broken {
            return Err(e);
        }
        if let Some(message) = crashed {
            // A panicked operation may have left the process in any state:
            // run nothing more. Frames still coming (news of a streamed
            // input) are read and dropped until the dispatcher, which takes
            // the answer as this worker's death, kills it or closes the pipe.
            while let Ok(Some(_)) = read_message(&mut pipes.input, &mut scratch) {}
            return Err(WorkerError::Crashed { job, message });
        }
    }
}

/// The job pipe (stdin) and the result pipe (stdout), buffered by us.
struct Pipes {
    input: io::BufReader<std::fs::File>,
    output: io::BufWriter<std::fs::File>,
    out_buf: Vec<u8>,
}

impl Pipes {
    fn open() -> io::Result<Pipes> {
        let fd = |f: std::os::fd::BorrowedFd<'_>| f.try_clone_to_owned().map(std::fs::File::from);
        Ok(Pipes {
            input: io::BufReader::with_capacity(64 * 1024, fd(io::stdin().as_fd())?),
            output: io::BufWriter::with_capacity(64 * 1024, fd(io::stdout().as_fd())?),
            out_buf: Vec::with_capacity(256),
        })
    }

    /// Writes one message and flushes it: a result is answered at once, as
    /// holding it back while the next job runs would make a crash or a hang
    /// of that job look like this one's.
    fn send(&mut self, msg: &FromWorker) -> Result<(), WorkerError> {
        frame::write_frame(&mut self.output, msg, &mut self.out_buf)?;
        self.output.flush()?;
        Ok(())
    }
}

/// Dies with the dispatcher (`PR_SET_PDEATHSIG`), and refuses to start if
/// it is already gone.
fn die_with_parent(expected: u32) -> Result<(), WorkerError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(WorkerError::Prctl)?;
    // The parent may have died before the line above: then we were reparented.
    let actual = nix::unistd::getppid().as_raw();
    if actual != expected as i32 {
        return Err(WorkerError::Orphaned { expected, actual });
    }
    Ok(())
}

/// Opens the segment, and checks it is our parent's (never work in another
/// dispatcher's segment).
fn open_segment(config: &Config) -> Result<Segment, WorkerError> {
    let segment = Segment::open(&config.segment)?;
    if let Some(parent) = config.parent_pid {
        let owner = segment
            .header()
            .owner_pid
            .load(std::sync::atomic::Ordering::Relaxed);
        if owner != parent {
            return Err(WorkerError::ForeignSegment { owner, parent });
        }
    }
    Ok(segment)
}

/// The next message from the job pipe; `None` once it is closed.
fn read_message<'s>(
    input: &mut impl io::Read,
    scratch: &'s mut Vec<u8>,
) -> Result<Option<ToWorker<'s>>, WorkerError> {
    match frame::read_body(input, scratch, DEFAULT_MAX_FRAME) {
        Ok(()) => Ok(Some(frame::decode_body(scratch)?)),
        Err(FrameError::Closed) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Where a job whose input is still arriving learns that more has come.
pub(crate) trait Arrivals {
    /// Waits until the dispatcher says more of job `job_id`'s input is in the
    /// slot, and returns how many bytes are there now; an error when the
    /// input will never arrive in full.
    fn more(&mut self, job_id: u64) -> Result<u64, RemoteError>;
}

/// [`Arrivals`] read from the job pipe.
struct Pipe<'a, R> {
    input: &'a mut R,
    scratch: &'a mut Vec<u8>,
    /// Set when the pipe failed or broke protocol: the worker exits after
    /// answering the job.
    broken: Option<WorkerError>,
}

impl<R: io::Read> Arrivals for Pipe<'_, R> {
    fn more(&mut self, job_id: u64) -> Result<u64, RemoteError> {
        loop {
            let msg = frame::read_body(self.input, self.scratch, DEFAULT_MAX_FRAME)
                .and_then(|()| frame::decode_body::<ToWorker<'_>>(self.scratch));
            let next = match msg {
                Ok(ToWorker::More { job_id: id, ready }) if id == job_id => return Ok(ready),
                Ok(ToWorker::Abort { job_id: id }) if id == job_id => {
                    return Err(RemoteError::new(
                        ErrorKind::BadRequest,
                        "the payload did not arrive in full (the client left or stalled)",
                    ))
                }
                Ok(ToWorker::More { .. } | ToWorker::Abort { .. }) => continue, // an older job's
                Ok(ToWorker::Room { job_id, .. } | ToWorker::NoRoom { job_id, .. }) => {
                    self.broken = Some(WorkerError::UnaskedRoom { job: job_id });
                    "room for a result came unasked".to_owned()
                }
                Ok(ToWorker::Job(next)) => {
                    self.broken = Some(WorkerError::JobDuringInput {
                        running: job_id,
                        next: next.job_id,
                    });
                    "a new job came while the input was still arriving".to_owned()
                }
                Err(e) => {
                    let why = format!("job pipe failed while the input was arriving: {e}");
                    self.broken = Some(e.into());
                    why
                }
            };
            return Err(RemoteError::new(ErrorKind::Internal, next));
        }
    }
}

/// Bytes a streaming job's input is copied out in, while it arrives.
const CHUNK: usize = 128 * 1024;

/// A streaming job's input, copied out of the slot as it arrives: the
/// dispatcher is still writing the slot past `ready`, so no reference into
/// it is taken (see [`Segment::copy_out`]).
struct Arriving<'a> {
    segment: &'a mut Segment,
    arrivals: &'a mut dyn Arrivals,
    job_id: u64,
    slot: Region,
    input_len: u64,
    /// Bytes handed to the operation.
    seen: u64,
    /// Bytes in the slot.
    ready: u64,
    /// Where the next chunk is copied to (allocated on first use).
    chunk: Vec<u8>,
}

impl Arriving<'_> {
    /// Waits for more of the input.
    fn wait(&mut self) -> Result<(), RemoteError> {
        let ready = self.arrivals.more(self.job_id)?;
        if ready < self.ready || ready > self.input_len {
            return Err(RemoteError::new(
                ErrorKind::Internal,
                format!(
                    "the dispatcher said {ready} input bytes were in, after {} of {}",
                    self.ready, self.input_len
                ),
            ));
        }
        self.ready = ready;
        Ok(())
    }

    /// Waits until all of the input is in.
    fn wait_all(&mut self) -> Result<(), RemoteError> {
        while self.ready < self.input_len {
            self.wait()?;
        }
        Ok(())
    }
}

impl Input for Arriving<'_> {
    fn next_chunk(&mut self) -> Result<Option<&[u8]>, RemoteError> {
        while self.seen == self.ready {
            if self.seen == self.input_len {
                return Ok(None);
            }
            self.wait()?;
        }
        self.chunk.resize(CHUNK, 0);
        // Only bytes the dispatcher said are in; those beyond `ready` are
        // still being written and are not touched.
        let n = self
            .segment
            .copy_out(self.slot, self.seen, self.ready, &mut self.chunk)
            .map_err(|e| RemoteError::new(ErrorKind::Internal, format!("bad slot: {e}")))?;
        self.seen += n as u64;
        Ok(Some(&self.chunk[..n]))
    }
}

/// Runs jobs: the operations, and scratch room for a streaming
/// operation's result.
struct JobRunner<'w> {
    worker: &'w Worker,
    allow_fault_injection: bool,
    out: Vec<u8>,
}

impl JobRunner<'_> {
    /// Runs one job on its slot and describes the result. A job whose
    /// input is still arriving (`ready < input_len`) learns of its progress
    /// from `arrivals`. A panic in the operation is answered
    /// `WorkerCrashed` (the caller then exits).
    fn run_job(
        &mut self,
        segment: &mut Segment,
        job: &Job<'_>,
        arrivals: &mut dyn Arrivals,
    ) -> JobDone {
        match self.run_checked(segment, job, arrivals) {
            Ok(out) => JobDone {
                job_id: job.job_id,
                outcome: Outcome::Ok,
                result_offset: out.offset as u64,
                result_len: out.len as u64,
            },
            Err(mut e) => {
                // Keep result frames small (a message may echo what the client sent).
                if e.message.len() > MAX_MESSAGE {
                    let mut cut = MAX_MESSAGE;
                    while !e.message.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    e.message.truncate(cut);
                    e.message.push('…');
                }
                if e.kind == ErrorKind::WorkerCrashed {
                    tracing::error!(job = job.job_id, op = %job.op, "{}", e.message);
                } else {
                    tracing::debug!(job = job.job_id, op = %job.op, error = %e, "job failed");
                }
                JobDone {
                    job_id: job.job_id,
                    outcome: Outcome::Err(e),
                    result_offset: 0,
                    result_len: 0,
                }
            }
        }
    }

    /// The steps of a job: check its frame, take in its input (running a
    /// streaming operation on it as it arrives), then claim the slot and
    /// answer in it.
    fn run_checked(
        &mut self,
        segment: &mut Segment,
        job: &Job<'_>,
        arrivals: &mut dyn Arrivals,
    ) -> Result<Output, RemoteError> {
        let op = self.worker.lookup(&job.op, self.allow_fault_injection)?;
        let slot = segment.check(job.slot.offset, job.slot.len).map_err(|e| {
            RemoteError::new(
                ErrorKind::Internal,
                format!("bad slot from dispatcher: {e}"),
            )
        })?;
        let input_len = usize::try_from(job.input_len)
            .ok()
            .filter(|&n| n as u64 <= slot.len() && job.ready <= job.input_len)
            .ok_or_else(|| RemoteError::new(ErrorKind::Internal, "input longer than its slot"))?;
        self.out.clear();
        let streamed = take_input(segment, slot, job, op, arrivals, &mut self.out)?;
        // All of the input is in: the slot is this worker's alone until it answers.
        let slot = segment.claim(slot).expect("checked above");
        let mut ctx = JobCtx::new(&job.args, job.attempt, slot, input_len);
        if streamed {
            return ctx.reply(&self.out);
        }
        let out = &mut self.out;
        catch_unwind(AssertUnwindSafe(|| op.run_whole(&mut ctx, out)))
            .unwrap_or_else(|p| Err(panicked(&job.op, &*p)))
    }
}

/// Waits until all of a job's input is in the slot. A streaming operation
/// whose input is still arriving runs meanwhile, on copies of what has come,
/// and its answer is left in `out`: then it returns true.
fn take_input(
    segment: &mut Segment,
    slot: Region,
    job: &Job<'_>,
    op: &Op,
    arrivals: &mut dyn Arrivals,
    out: &mut Vec<u8>,
) -> Result<bool, RemoteError> {
    let mut arriving = Arriving {
        segment,
        arrivals,
        job_id: job.job_id,
        slot,
        input_len: job.input_len,
        seen: 0,
        ready: job.ready,
        chunk: Vec::new(),
    };
    let streamed = match &op.runner {
        Runner::Stream(f) if arriving.ready < arriving.input_len => {
            let call = Call {
                args: &job.args,
                attempt: job.attempt,
            };
            catch_unwind(AssertUnwindSafe(|| f(&call, &mut arriving, out)))
                .unwrap_or_else(|p| Err(panicked(&job.op, &*p)))?;
            true
        }
        _ => false,
    };
    // An operation that answered without reading all of its input: the
    // reply goes in the slot only once nothing more is written there.
    arriving.wait_all()?;
    Ok(streamed)
}

/// The answer to a job whose operation panicked: the worker exits after it.
fn panicked(op: &str, payload: &(dyn std::any::Any + Send)) -> RemoteError {
    RemoteError::new(
        ErrorKind::WorkerCrashed,
        format!("operation {op:?} panicked: {}", panic_message(payload)),
    )
}
