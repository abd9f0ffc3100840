//! The OSPS worker: reads [`Job`]s as frames on stdin, runs each on its slot
//! of the shared segment in place, and answers a [`JobDone`] frame on stdout.
//! Logs go to stderr. It exits cleanly on EOF, which is how the dispatcher
//! stops it, and dies with its dispatcher (`PR_SET_PDEATHSIG`) as a backstop.

pub mod ops;

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};

use ipc_core::frame::{self, FrameError, DEFAULT_MAX_FRAME};
use ipc_core::proto::{
    ErrorKind, FromWorker, JobDone, JobIn, Outcome, RemoteError, PROTOCOL_VERSION,
};
use ipc_core::{Segment, SegmentError};

/// Longest error message a worker sends back, in bytes.
const MAX_MESSAGE: usize = 1024;

/// How a worker is started.
#[derive(Debug, Clone)]
pub struct Config {
    /// The segment's name.
    pub segment: String,
    /// Allow the fault-injection operations (`crash`).
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
}

/// Runs the worker until its stdin closes.
pub fn run(config: &Config) -> Result<(), WorkerError> {
    if let Some(expected) = config.parent_pid {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(WorkerError::Prctl)?;
        // The parent may have died before the line above: then we were reparented.
        let actual = nix::unistd::getppid().as_raw();
        if actual != expected as i32 {
            return Err(WorkerError::Orphaned { expected, actual });
        }
    }
    let segment = Segment::open(&config.segment)?;
    if let Some(parent) = config.parent_pid {
        // Never work in another dispatcher's segment.
        let owner = segment
            .header()
            .owner_pid
            .load(std::sync::atomic::Ordering::Relaxed);
        if owner != parent {
            return Err(WorkerError::ForeignSegment { owner, parent });
        }
    }
    let mut input = io::BufReader::with_capacity(
        64 * 1024,
        std::fs::File::from(io::stdin().as_fd().try_clone_to_owned()?),
    );
    // Results go to fd 1 through our own buffer, flushed once no more jobs
    // are waiting in the input buffer: a batch of jobs gets one write(2).
    let mut output = io::BufWriter::with_capacity(
        64 * 1024,
        std::fs::File::from(io::stdout().as_fd().try_clone_to_owned()?),
    );
    let mut scratch = Vec::with_capacity(256);
    let mut out_buf = Vec::with_capacity(256);
    let ready = FromWorker::Ready {
        pid: std::process::id(),
        version: PROTOCOL_VERSION,
    };
    frame::write_frame(&mut output, &ready, &mut out_buf)?;
    output.flush()?;
    // Soon after ready: map the whole segment so no job pays a page fault.
    segment.populate_in_background(std::time::Duration::from_millis(200));
    tracing::debug!(segment = %config.segment, "worker ready");
    loop {
        // Decoded in place: the job borrows its strings from `scratch`.
        let job: JobIn<'_> = match frame::read_body(&mut input, &mut scratch, DEFAULT_MAX_FRAME)
            .and_then(|()| frame::decode_body(&scratch))
        {
            Ok(job) => job,
            Err(FrameError::Closed) => {
                tracing::debug!("job pipe closed; exiting");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let done = run_job(&segment, &job, config.allow_fault_injection);
        segment.header().count_job();
        frame::write_frame(&mut output, &FromWorker::Done(done), &mut out_buf)?;
        // Answer at once: holding a result back while the next job runs
        // would make a crash or a hang of that job look like this one's.
        output.flush()?;
    }
}

/// Runs one job on its slot and describes the result.
pub fn run_job(segment: &Segment, job: &JobIn<'_>, allow_fault_injection: bool) -> JobDone {
    let result = (|| {
        let spec = ops::lookup(job.op, allow_fault_injection)?;
        let slot = segment.bytes_mut(job.slot).map_err(|e| {
            RemoteError::new(
                ErrorKind::Internal,
                format!("bad slot from dispatcher: {e}"),
            )
        })?;
        let input_len = usize::try_from(job.input_len)
            .ok()
            .filter(|&n| n <= slot.len())
            .ok_or_else(|| RemoteError::new(ErrorKind::Internal, "input longer than its slot"))?;
        let mut ctx = ops::JobCtx {
            args: &job.args,
            slot,
            input_len,
        };
        catch_unwind(AssertUnwindSafe(|| (spec.run)(&mut ctx))).unwrap_or_else(|_| {
            Err(RemoteError::new(
                ErrorKind::Internal,
                format!("operation {:?} panicked (a bug in OSPS)", job.op),
            ))
        })
    })();
    match result {
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
            tracing::debug!(job = job.job_id, op = %job.op, error = %e, "job failed");
            JobDone {
                job_id: job.job_id,
                outcome: Outcome::Err(e),
                result_offset: 0,
                result_len: 0,
            }
        }
    }
}
