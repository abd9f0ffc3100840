//! What the dispatcher counts for `status`: jobs by outcome, jobs sent
//! ahead to busy workers, and the last minute of job latencies.

use std::cell::{Cell, RefCell};
use std::time::Instant;

use ipc_core::proto::{ErrorKind, Outcome};
use ipc_core::status::LatencyStatus;

use crate::latency::LatencyWindow;

/// Counters and latencies.
#[derive(Debug)]
pub struct Stats {
    jobs_done: Cell<u64>,
    jobs_failed: Cell<u64>,
    /// Jobs their client cancelled (`cancel`): neither done nor failed.
    jobs_cancelled: Cell<u64>,
    /// Jobs sent to a worker behind another (batched).
    jobs_sent_ahead: Cell<u64>,
    latency: RefCell<LatencyWindow>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            jobs_done: Cell::new(0),
            jobs_failed: Cell::new(0),
            jobs_cancelled: Cell::new(0),
            jobs_sent_ahead: Cell::new(0),
            latency: RefCell::new(LatencyWindow::new()),
        }
    }
}

impl Stats {
    /// Counts a job's outcome and how long it took since `received`
    /// (returned; `None` for a cancelled job, whose time is its client's
    /// choice: not a latency).
    pub fn answered(&self, outcome: &Outcome, received: Instant) -> Option<std::time::Duration> {
        let cell = match outcome {
            Outcome::Ok => &self.jobs_done,
            Outcome::Err(e) if e.kind == ErrorKind::Cancelled => {
                self.jobs_cancelled.set(self.jobs_cancelled.get() + 1);
                return None;
            }
            Outcome::Err(_) => &self.jobs_failed,
        };
        cell.set(cell.get() + 1);
        let now = Instant::now();
        let took = now.saturating_duration_since(received);
        self.latency.borrow_mut().record(took, now);
        Some(took)
    }

    /// Counts a job sent to a busy worker behind another.
    pub fn sent_ahead(&self) {
        self.jobs_sent_ahead.set(self.jobs_sent_ahead.get() + 1);
    }

    pub fn jobs_done(&self) -> u64 {
        self.jobs_done.get()
    }

    pub fn jobs_failed(&self) -> u64 {
        self.jobs_failed.get()
    }

    /// Jobs answered `Cancelled` (the outcome `cancelled`).
    pub fn jobs_cancelled(&self) -> u64 {
        self.jobs_cancelled.get()
    }

    pub fn jobs_sent_ahead(&self) -> u64 {
        self.jobs_sent_ahead.get()
    }

    /// Job latency over the last minute.
    pub fn latency(&self) -> LatencyStatus {
        self.latency.borrow().report(Instant::now())
    }
}
