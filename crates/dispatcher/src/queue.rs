//! The job queue the connections fill and the worker drivers empty, with
//! what scheduling needs to know: how many workers wait, and which
//! operations the workers read front to back (so may stream).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use tokio::sync::Notify;

use crate::shared::QueuedJob;

/// Payloads from this size up, of an operation that streams, may go to an
/// idle worker as soon as their header is read: the worker starts on the
/// first bytes while the rest arrives (hashing overlaps the upload).
pub const STREAM_MIN: u64 = 1 << 20;

/// Jobs waiting for a worker, oldest first.
#[derive(Debug, Default)]
pub struct JobQueue {
    jobs: RefCell<VecDeque<QueuedJob>>,
    job_ready: Notify,
    idle_workers: Cell<usize>,
    /// Operations the workers read front to back (from their `Ready`).
    streaming_ops: RefCell<Vec<String>>,
}

impl JobQueue {
    /// Queues a job at the back (or, for a retry, at the front).
    pub fn push(&self, job: QueuedJob, front: bool) {
        if front {
            self.jobs.borrow_mut().push_front(job);
        } else {
            self.jobs.borrow_mut().push_back(job);
        }
        self.job_ready.notify_one();
    }

    /// Waits for the next queued job; while waiting, the caller's worker
    /// counts as idle (also when the wait is cancelled).
    pub async fn next(&self) -> QueuedJob {
        struct Idle<'a>(&'a Cell<usize>);
        impl Drop for Idle<'_> {
            fn drop(&mut self) {
                self.0.set(self.0.get() - 1);
            }
        }
        self.idle_workers.set(self.idle_workers.get() + 1);
        let _idle = Idle(&self.idle_workers);
        loop {
            let ready = self.job_ready.notified();
            if let Some(job) = self.try_next() {
                return job;
            }
            ready.await;
        }
    }

    /// The next queued job, if there is one now.
    pub fn try_next(&self) -> Option<QueuedJob> {
        self.jobs.borrow_mut().pop_front()
    }

    /// Takes job `job_id` off the queue, if it waits there (a cancel).
    pub fn remove(&self, job_id: u64) -> Option<QueuedJob> {
        let mut jobs = self.jobs.borrow_mut();
        let at = jobs.iter().position(|j| j.job_id == job_id)?;
        jobs.remove(at)
    }

    /// Removes every queued job (to answer them).
    pub fn take_all(&self) -> Vec<QueuedJob> {
        self.jobs.borrow_mut().drain(..).collect()
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.jobs.borrow().len()
    }

    /// Workers waiting for a job right now.
    pub fn idle_workers(&self) -> usize {
        self.idle_workers.get()
    }

    /// Records the operations a worker said it streams.
    pub fn set_streaming_ops(&self, ops: Vec<String>) {
        *self.streaming_ops.borrow_mut() = ops;
    }

    /// Whether a request should go to a worker as soon as its header is
    /// read, its payload following as it arrives: only for large payloads
    /// of an operation that streams, and only when another worker stays
    /// idle and nothing waits (a job whose upload is slow holds its worker,
    /// and at least one worker is always left for everything else).
    pub fn should_stream(&self, op: &str, payload_len: u64) -> bool {
        payload_len >= STREAM_MIN
            && self.idle_workers.get() >= 2
            && self.jobs.borrow().is_empty()
            && self.streaming_ops.borrow().iter().any(|o| o == op)
    }
}
