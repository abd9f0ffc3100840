//! State shared by the dispatcher's tasks (one thread, so `Rc` and `Cell`):
//! the slot pool (`slots.rs`), the job queue, counters. No borrow of a
//! `RefCell` here is ever held across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use ipc_core::proto::{Outcome, PROTOCOL_VERSION};
use ipc_core::status::{SegmentStatus, StatusReport, WorkerStatus};
use ipc_core::{RuntimePaths, Segment};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};

use crate::admission::{Budgets, Gate};
use crate::latency::LatencyWindow;
use crate::slots::{JobSlot, SlotPool, STREAM_MIN};
use crate::Config;

/// What a connection's writer sends back to its client.
#[derive(Debug)]
pub enum Reply {
    /// A job's answer; the result is bytes `result` of the slot the lease holds.
    Job {
        req_id: u64,
        outcome: Outcome,
        result: std::ops::Range<usize>,
        lease: JobSlot,
        permit: OwnedSemaphorePermit,
    },
    /// An answer the dispatcher made itself (status, errors), bytes inline.
    /// With the request's in-flight permit, if it had one.
    Inline {
        req_id: u64,
        outcome: Outcome,
        bytes: Vec<u8>,
        permit: Option<OwnedSemaphorePermit>,
    },
}

/// An operation name, kept inline when short (every real one is): no
/// allocation per request.
#[derive(Debug, Clone)]
pub enum OpName {
    Inline { len: u8, bytes: [u8; 31] },
    Heap(String),
}

impl OpName {
    pub fn new(s: &str) -> Self {
        if s.len() <= 31 {
            let mut bytes = [0u8; 31];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            OpName::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            OpName::Heap(s.to_owned())
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            OpName::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).expect("built from a str")
            }
            OpName::Heap(s) => s,
        }
    }
}

impl std::fmt::Display for OpName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job waiting for, or running on, a worker.
#[derive(Debug)]
pub struct QueuedJob {
    pub job_id: u64,
    pub req_id: u64,
    pub op: OpName,
    pub args: Vec<String>,
    pub lease: JobSlot,
    pub input_len: u64,
    pub reply: mpsc::UnboundedSender<Reply>,
    /// Runs so far that ended with the worker dying.
    pub attempts: u8,
    /// The connection's in-flight allowance, returned when the reply is written.
    pub permit: OwnedSemaphorePermit,
    /// When the request (header and payload; only the header for a job
    /// sent while its payload arrives) had been read.
    pub received: Instant,
}

/// Everything the tasks share.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub paths: RuntimePaths,
    /// The segment's slots, their caps and leases.
    pub slots: Rc<SlotPool>,
    pub max_payload: u64,
    queue: RefCell<VecDeque<QueuedJob>>,
    job_ready: Notify,
    idle_workers: Cell<usize>,
    next_job_id: Cell<u64>,
    pub started: Instant,
    /// Set once shutdown begins: new jobs are refused.
    pub draining: Cell<bool>,
    /// Set once the workers are told to stop: nothing queued will run any more.
    pub workers_stopped: Cell<bool>,
    /// Each listener's admission budgets and counts.
    pub unix_gate: Gate,
    pub tcp_gate: Gate,
    /// Refusals being answered, and at most.
    pub refusing: Cell<usize>,
    pub max_refusing: usize,
    pub jobs_done: Cell<u64>,
    pub jobs_failed: Cell<u64>,
    /// Jobs sent to a worker behind another (batched).
    pub jobs_sent_ahead: Cell<u64>,
    pub workers: RefCell<Vec<WorkerStatus>>,
    /// Each worker's state, kept apart from `workers` so that changing it
    /// costs no allocation (it changes twice per job).
    worker_states: Vec<Cell<&'static str>>,
    pub tcp_addr: RefCell<Option<String>>,
    /// When each worker's current process started (`None` while starting).
    worker_started: Vec<Cell<Option<Instant>>>,
    /// Job latencies over the last minute.
    latency: RefCell<LatencyWindow>,
    /// The token TCP clients must present (from `--token-file`), if any.
    pub tcp_token: Option<Box<[u8]>>,
    /// Operations the workers read front to back (from their `Ready`).
    streaming_ops: RefCell<Vec<String>>,
}

impl Shared {
    pub fn new(
        config: Config,
        paths: RuntimePaths,
        segment: Segment,
        max_payload: u64,
        tcp_token: Option<Box<[u8]>>,
        budgets: Budgets,
    ) -> Rc<Self> {
        let slots = SlotPool::new(
            segment,
            max_payload,
            config.conn_arena_percent,
            config.peer_arena_percent,
        );
        let n_workers = config.workers;
        let workers = (0..n_workers)
            .map(|index| WorkerStatus {
                index,
                pid: 0,
                state: "starting".into(),
                jobs_done: 0,
                restarts: 0,
                jobs_failed: 0,
                uptime_ms: 0,
                last_exit: String::new(),
            })
            .collect();
        Rc::new(Shared {
            config,
            paths,
            slots,
            max_payload,
            queue: RefCell::new(VecDeque::new()),
            job_ready: Notify::new(),
            idle_workers: Cell::new(0),
            next_job_id: Cell::new(1),
            started: Instant::now(),
            draining: Cell::new(false),
            workers_stopped: Cell::new(false),
            unix_gate: Gate::new(
                "--max-connections",
                budgets.unix_connections,
                budgets.handshakes,
            ),
            tcp_gate: Gate::new(
                "--max-tcp-connections",
                budgets.tcp_connections,
                budgets.handshakes,
            ),
            refusing: Cell::new(0),
            max_refusing: budgets.refusing,
            jobs_done: Cell::new(0),
            jobs_failed: Cell::new(0),
            jobs_sent_ahead: Cell::new(0),
            worker_states: (0..n_workers).map(|_| Cell::new("starting")).collect(),
            workers: RefCell::new(workers),
            tcp_addr: RefCell::new(None),
            worker_started: (0..n_workers).map(|_| Cell::new(None)).collect(),
            latency: RefCell::new(LatencyWindow::new()),
            tcp_token,
            streaming_ops: RefCell::new(Vec::new()),
        })
    }

    /// Slots on loan: every accepted job holds one until its reply is written.
    pub fn in_flight(&self) -> usize {
        self.slots.in_use()
    }

    /// Begins shutdown: new jobs are refused, and requests waiting for a slot
    /// are woken to be refused too.
    pub fn begin_draining(&self) {
        self.draining.set(true);
        self.slots.close();
    }

    /// Numbers a new job.
    pub fn next_job_id(&self) -> u64 {
        let id = self.next_job_id.get();
        self.next_job_id.set(id + 1);
        id
    }

    /// Queues a job at the back (or, for a retry, at the front).
    pub fn enqueue(&self, job: QueuedJob, front: bool) {
        if front {
            self.queue.borrow_mut().push_front(job);
        } else {
            self.queue.borrow_mut().push_back(job);
        }
        self.job_ready.notify_one();
    }

    /// Waits for the next queued job; while waiting, this worker counts as idle.
    pub async fn next_job(&self) -> QueuedJob {
        struct Idle<'a>(&'a Cell<usize>);
        impl Drop for Idle<'_> {
            fn drop(&mut self) {
                self.0.set(self.0.get() - 1);
            }
        }
        self.idle_workers.set(self.idle_workers.get() + 1);
        let _idle = Idle(&self.idle_workers); // also when the wait is cancelled
        loop {
            let ready = self.job_ready.notified();
            if let Some(job) = self.queue.borrow_mut().pop_front() {
                return job;
            }
            ready.await;
        }
    }

    /// The next queued job, if there is one now.
    pub fn try_next_job(&self) -> Option<QueuedJob> {
        self.queue.borrow_mut().pop_front()
    }

    /// Records the operations a worker said it streams.
    pub fn set_streaming_ops(&self, ops: Vec<String>) {
        *self.streaming_ops.borrow_mut() = ops;
    }

    /// Whether a request should go to a worker as soon as its header is read,
    /// its payload following as it arrives. Only for large payloads of an
    /// operation that streams, and only when another worker stays idle and
    /// nothing waits: a job whose upload is slow holds its worker, and at
    /// least one worker is always left for everything else.
    pub fn should_stream(&self, op: &str, payload_len: u64) -> bool {
        payload_len >= STREAM_MIN
            && self.idle_workers.get() >= 2
            && self.queue.borrow().is_empty()
            && !self.draining.get()
            && self.streaming_ops.borrow().iter().any(|o| o == op)
    }

    /// Workers waiting for a job right now.
    pub fn idle_workers(&self) -> usize {
        self.idle_workers.get()
    }

    /// Removes every queued job (at shutdown, to answer them).
    pub fn take_queue(&self) -> Vec<QueuedJob> {
        self.queue.borrow_mut().drain(..).collect()
    }

    /// Notes that worker `index`'s process started (`Some(now)`) or ended (`None`).
    pub fn set_worker_started(&self, index: usize, at: Option<Instant>) {
        self.worker_started[index].set(at);
    }

    /// Records how long a job took, from its request to its answer.
    pub fn record_latency(&self, received: Instant) {
        let now = Instant::now();
        self.latency
            .borrow_mut()
            .record(now.saturating_duration_since(received), now);
    }

    /// Sets a worker's state.
    pub fn set_state(&self, index: usize, state: &'static str) {
        self.worker_states[index].set(state);
    }

    /// Updates one worker's status entry.
    pub fn set_worker(&self, index: usize, f: impl FnOnce(&mut WorkerStatus)) {
        f(&mut self.workers.borrow_mut()[index]);
    }

    /// Counts a job's outcome.
    pub fn count(&self, outcome: &Outcome) {
        let cell = if matches!(outcome, Outcome::Ok) {
            &self.jobs_done
        } else {
            &self.jobs_failed
        };
        cell.set(cell.get() + 1);
    }

    /// The report answered to `status`.
    pub fn status(&self) -> StatusReport {
        StatusReport {
            instance: self.paths.instance().to_owned(),
            protocol_version: PROTOCOL_VERSION,
            dispatcher_pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            socket: self.paths.socket().display().to_string(),
            tcp: self.tcp_addr.borrow().clone(),
            segment: {
                let attached_here = 1 + self
                    .worker_states
                    .iter()
                    .filter(|s| matches!(s.get(), "idle" | "busy"))
                    .count();
                SegmentStatus {
                    max_payload: self.max_payload,
                    ..self.slots.describe(attached_here)
                }
            },
            workers: self
                .workers
                .borrow()
                .iter()
                .zip(&self.worker_states)
                .zip(&self.worker_started)
                .map(|((w, state), started)| WorkerStatus {
                    state: state.get().to_owned(),
                    uptime_ms: started.get().map_or(0, |t| t.elapsed().as_millis() as u64),
                    ..w.clone()
                })
                .collect(),
            jobs_done: self.jobs_done.get(),
            jobs_failed: self.jobs_failed.get(),
            queue_depth: self.queue.borrow().len(),
            in_flight: self.slots.in_use(),
            connections: self.unix_gate.connections.get() + self.tcp_gate.connections.get(),
            shutting_down: self.draining.get(),
            watchdog: self.config.watchdog.clone().map(|mut w| {
                w.uptime_ms = self
                    .config
                    .watchdog_started_unix_ms
                    .map_or(0, |t| ipc_core::status::unix_ms().saturating_sub(t));
                w
            }),
            jobs_sent_ahead: self.jobs_sent_ahead.get(),
            latency: self.latency.borrow().report(Instant::now()),
        }
    }
}
