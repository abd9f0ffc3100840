//! The worker's two pipes: jobs and news on stdin, answers and asks on
//! stdout ([`Pipes`]), and what a running job reads of them ([`JobPipe`]:
//! news of its input as it arrives, and the answer to its `Grow`).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsFd;

use ipc_core::frame::{self, FrameError, DEFAULT_MAX_FRAME};
use ipc_core::proto::{ErrorKind, FromWorker, RemoteError, ToWorker, WireRegion};

use crate::growth::Dispatcher;
use crate::WorkerError;

/// The job pipe (stdin) and the result pipe (stdout), buffered by us.
pub(crate) struct Pipes {
    input: io::BufReader<std::fs::File>,
    output: io::BufWriter<std::fs::File>,
    out_buf: Vec<u8>,
    /// Bodies of `Job` frames that came while a job waited for room for its
    /// result: run next, in order.
    ahead: VecDeque<Vec<u8>>,
}

impl Pipes {
    pub(crate) fn open() -> io::Result<Pipes> {
        let fd = |f: std::os::fd::BorrowedFd<'_>| f.try_clone_to_owned().map(std::fs::File::from);
        Ok(Pipes {
            input: io::BufReader::with_capacity(64 * 1024, fd(io::stdin().as_fd())?),
            output: io::BufWriter::with_capacity(64 * 1024, fd(io::stdout().as_fd())?),
            out_buf: Vec::with_capacity(256),
            ahead: VecDeque::new(),
        })
    }

    /// Writes one message and flushes it: a result is answered at once, as
    /// holding it back while the next job runs would make a crash or a hang
    /// of that job look like this one's.
    pub(crate) fn send(&mut self, msg: &FromWorker) -> Result<(), WorkerError> {
        frame::write_frame(&mut self.output, msg, &mut self.out_buf)?;
        self.output.flush()?;
        Ok(())
    }

    /// The next message: a `Job` that came early first, else the next
    /// frame from the job pipe; `None` once it is closed.
    pub(crate) fn next<'s>(
        &mut self,
        scratch: &'s mut Vec<u8>,
    ) -> Result<Option<ToWorker<'s>>, WorkerError> {
        if let Some(body) = self.ahead.pop_front() {
            *scratch = body;
            return Ok(Some(frame::decode_body(scratch)?));
        }
        read_message(&mut self.input, scratch)
    }
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

/// The pipes as a running job sees them ([`Dispatcher`]).
pub(crate) struct JobPipe<'a> {
    pub(crate) pipes: &'a mut Pipes,
    pub(crate) scratch: &'a mut Vec<u8>,
    /// Set when the pipe failed or broke protocol: the worker exits after
    /// answering the job.
    pub(crate) broken: Option<WorkerError>,
}

impl JobPipe<'_> {
    /// Records why the pipe cannot go on, and the job's error.
    fn break_with(&mut self, e: WorkerError, why: String) -> RemoteError {
        self.broken = Some(e);
        RemoteError::new(ErrorKind::Internal, why)
    }

    /// The next frame from the job pipe, as [`News`]; its body stays in
    /// `scratch` (a `Job`'s, to keep).
    fn read(&mut self) -> Result<News, (WorkerError, String)> {
        let msg = frame::read_body(&mut self.pipes.input, self.scratch, DEFAULT_MAX_FRAME)
            .and_then(|()| frame::decode_body::<ToWorker<'_>>(self.scratch));
        Ok(match msg {
            Ok(ToWorker::Job(job)) => News::Job(job.job_id),
            Ok(ToWorker::More { job_id, ready }) => News::More { job_id, ready },
            Ok(ToWorker::Abort { job_id }) => News::Abort(job_id),
            Ok(ToWorker::Room { job_id, area }) => News::Room { job_id, area },
            Ok(ToWorker::NoRoom { job_id, message }) => News::NoRoom {
                job_id,
                message: message.into_owned(),
            },
            Err(e) => {
                let why = format!("job pipe failed during the job: {e}");
                return Err((e.into(), why));
            }
        })
    }
}

/// A frame read during a job, owning what it says.
enum News {
    Job(u64),
    More { job_id: u64, ready: u64 },
    Abort(u64),
    Room { job_id: u64, area: WireRegion },
    NoRoom { job_id: u64, message: String },
}

impl Dispatcher for JobPipe<'_> {
    fn more(&mut self, job_id: u64) -> Result<u64, RemoteError> {
        loop {
            let (e, why) = match self.read() {
                Ok(News::More { job_id: id, ready }) if id == job_id => return Ok(ready),
                Ok(News::Abort(id)) if id == job_id => {
                    return Err(RemoteError::new(
                        ErrorKind::BadRequest,
                        "the payload did not arrive in full (the client left or stalled)",
                    ))
                }
                Ok(News::More { .. } | News::Abort(_)) => continue, // an older job's
                Ok(News::Room { job_id: other, .. } | News::NoRoom { job_id: other, .. }) => (
                    WorkerError::UnaskedRoom { job: other },
                    "room for a result came unasked".to_owned(),
                ),
                Ok(News::Job(next)) => (
                    WorkerError::JobDuringInput {
                        running: job_id,
                        next,
                    },
                    "a new job came while the input was still arriving".to_owned(),
                ),
                Err(failed) => failed,
            };
            return Err(self.break_with(e, why));
        }
    }

    fn grow(&mut self, job_id: u64, len: u64) -> Result<WireRegion, RemoteError> {
        if let Err(e) = self.pipes.send(&FromWorker::Grow { job_id, len }) {
            let why = format!("cannot ask for room for the result: {e}");
            return Err(self.break_with(e, why));
        }
        tracing::debug!(job = job_id, len, "asked for room for the result");
        loop {
            let (e, why) = match self.read() {
                Ok(News::Room { job_id: id, area }) if id == job_id => return Ok(area),
                Ok(News::NoRoom {
                    job_id: id,
                    message,
                }) if id == job_id => return Err(RemoteError::new(ErrorKind::TooLarge, message)),
                Ok(News::Job(_)) => {
                    // Sent ahead: run after this one.
                    self.pipes.ahead.push_back(self.scratch.clone());
                    continue;
                }
                // The running job's input is all in by now: news of it, or
                // of an older job, changes nothing.
                Ok(News::More { .. } | News::Abort(_)) => continue,
                Ok(News::Room { job_id: other, .. } | News::NoRoom { job_id: other, .. }) => (
                    WorkerError::UnaskedRoom { job: other },
                    format!("room for job {other} came while job {job_id} waited for room"),
                ),
                Err(failed) => failed,
            };
            return Err(self.break_with(e, why));
        }
    }
}
