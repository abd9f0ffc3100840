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
//! [`Worker::run`]; this module does the protocol. A result that outgrows
//! its slot is written in room asked of the dispatcher (`Grow`, answered
//! `Room` or `NoRoom`: [`JobCtx::reply`], [`ResultWriter`]). The builtin
//! worker's exec mode, a command pool's worker, is [`exec`]. An operation's error is
//! answered to the client as is; after a panic the worker answers the job
//! `worker crashed` with the panic's message and runs nothing more (the
//! dispatcher takes that answer as the worker's death, kills it, and runs
//! the job again on a fresh worker while `--max-attempts` allows).

pub mod exec;
mod footprint;
mod growth;
mod job;
pub mod ops;
mod pipe;
mod registry;

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use growth::{io_error, ResultWriter};
use growth::{Dispatcher, Growth};
use ipc_core::frame::FrameError;
pub use ipc_core::proto::{ErrorKind, RemoteError};
use ipc_core::proto::{FromWorker, Job, JobDone, Outcome, ToWorker, PIPE_VERSION};
use ipc_core::{Region, Segment, SegmentError};
pub use job::{expect_args, invalid_input, Call, Input, JobCtx, Output, Short, Whole, SHORT_MAX};
use pipe::{JobPipe, Pipes};
pub use registry::Worker;
use registry::{panic_message, Op, Runner};

/// Longest error message a worker sends back, in bytes.
const MAX_MESSAGE: usize = 1024;

/// The arguments the dispatcher starts a worker with.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    version,
    about = "An OSPS worker: runs jobs read from stdin on a shared-memory segment, answering on stdout"
)]
pub(crate) struct Args {
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

/// Starts logging to stderr as `args` say and serves until stdin closes.
/// Exits 0 then, 1 on an error (logged).
fn start(
    args: Args,
    serve: impl FnOnce(&Config) -> Result<(), WorkerError>,
) -> std::process::ExitCode {
    let _span = ipc_core::logging::init("worker", args.log.log_format);
    let config = Config {
        segment: args.segment,
        allow_fault_injection: args.allow_fault_injection,
        parent_pid: args.parent_pid,
    };
    match serve(&config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serves `worker`'s operations until stdin closes.
fn serve(worker: &Worker, config: &Config) -> Result<(), WorkerError> {
    if let Some(expected) = config.parent_pid {
        die_with_parent(expected)?;
    }
    let mut segment = open_segment(config)?;
    let mut footprint = footprint::Footprint::default();
    let mut pipes = Pipes::open()?;
    pipes.send(&FromWorker::Ready {
        pid: std::process::id(),
        version: PIPE_VERSION,
        streams: worker.streams(config.allow_fault_injection),
        ops: worker.names(),
    })?;
    // The segment is not mapped ahead of use: see `footprint`.
    tracing::debug!(segment = %config.segment, "worker ready");
    let (mut scratch, mut news_scratch) = (Vec::with_capacity(256), Vec::with_capacity(64));
    let mut runner = JobRunner {
        worker,
        allow_fault_injection: config.allow_fault_injection,
        out: Vec::with_capacity(256),
    };
    loop {
        // Decoded in place: the job borrows its strings from `scratch`.
        let job = match pipes.next(&mut scratch)? {
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
        let mut pipe = JobPipe {
            pipes: &mut pipes,
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
        // What the job may have touched of the segment: its slot, its result.
        let touched = job.slot.len.saturating_add(done.result_len);
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
            while let Ok(Some(_)) = pipes.next(&mut scratch) {}
            return Err(WorkerError::Crashed { job, message });
        }
        footprint.after_job(&segment, touched);
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

/// Bytes a streaming job's input is copied out in, while it arrives.
const CHUNK: usize = 128 * 1024;

/// A streaming job's input, copied out of the slot as it arrives: the
/// dispatcher is still writing the slot past `ready`, so no reference into
/// it is taken (see [`Segment::copy_out`]).
struct Arriving<'a> {
    segment: &'a mut Segment,
    arrivals: &'a mut dyn Dispatcher,
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
        arrivals: &mut dyn Dispatcher,
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
        arrivals: &mut dyn Dispatcher,
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
        // All of the input is in: the slot is this worker's alone until it
        // answers, and so are the result areas the dispatcher gives it.
        let mut claims = segment.claims();
        let slot = claims.claim(slot).expect("checked above");
        let growth = Growth::segment(claims, arrivals, job.job_id);
        let mut ctx = JobCtx::with_growth(&job.args, job.attempt, slot, input_len, growth);
        let ran = if streamed {
            ctx.reply(&self.out)
        } else {
            let out = &mut self.out;
            catch_unwind(AssertUnwindSafe(|| op.run_whole(&mut ctx, out)))
                .unwrap_or_else(|p| Err(panicked(&job.op, &*p)))
        };
        ctx.settle(ran)
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
    arrivals: &mut dyn Dispatcher,
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
