//! State shared by the dispatcher's tasks (one thread, so `Rc` and `Cell`):
//! the segment and its allocator, the job queue, counters. No borrow of a
//! `RefCell` here is ever held across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use ipc_core::alloc::AllocError;
use ipc_core::proto::{Outcome, PROTOCOL_VERSION};
use ipc_core::status::{SegmentStatus, StatusReport, WorkerStatus};
use ipc_core::{Region, RuntimePaths, Segment, Slot, SlotAllocator};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};

use crate::admission::{Budgets, Gate, Holder, PeerHoldings, SlotLimits, Wait};
use crate::latency::LatencyWindow;
use crate::Config;

/// Room kept after every payload for small results (digests, counts), so an
/// operation never has to overwrite its input to answer.
pub const RESULT_RESERVE: u64 = 4096;

/// Payloads from this size up, of an operation that streams, may go to an
/// idle worker as soon as their header is read: the worker starts on the
/// first bytes while the rest arrives (hashing overlaps the upload).
pub const STREAM_MIN: u64 = 1 << 20;

/// What a connection's writer sends back to its client.
#[derive(Debug)]
pub enum Reply {
    /// A job's answer; the result lies in the slot the lease holds.
    Job {
        req_id: u64,
        outcome: Outcome,
        result: Region,
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
    pub args: Vec<std::borrow::Cow<'static, str>>,
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

/// A job's hold on its slot.
#[derive(Debug)]
pub enum JobSlot {
    /// The payload is all in: the job alone holds the slot.
    Own(SlotLease),
    /// The payload may still be arriving: the connection reading it holds
    /// the slot too, so it is freed only once neither writes nor reads it.
    Streamed(Rc<Streamed>),
}

impl JobSlot {
    /// The slot's bytes in the arena.
    pub fn region(&self) -> Region {
        match self {
            JobSlot::Own(lease) => lease.region(),
            JobSlot::Streamed(s) => s.lease.region(),
        }
    }

    /// The payload's upload, unless it has arrived in full.
    pub fn upload(&self) -> Option<&Rc<Streamed>> {
        match self {
            JobSlot::Streamed(s) if s.upload.state() != UploadState::Complete => Some(s),
            _ => None,
        }
    }
}

/// A slot whose payload arrives while its job may already run.
#[derive(Debug)]
pub struct Streamed {
    pub lease: SlotLease,
    pub upload: Upload,
}

/// How far a payload has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadState {
    Arriving,
    Complete,
    /// The client left or stalled: the rest will never come.
    Failed,
}

/// What the worker running a streamed job must be told next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum News {
    /// `ready` bytes are in; `last` when that is all of them.
    More { ready: u64, last: bool },
    /// The payload will not arrive in full.
    Abort,
}

/// Progress of a payload being read into its slot, written by the
/// connection and read by the worker driver running its job.
#[derive(Debug)]
pub struct Upload {
    len: u64,
    ready: Cell<u64>,
    state: Cell<UploadState>,
    /// `ready` at the last wake-up of the driver.
    woken_at: Cell<u64>,
    /// Bytes between wake-ups: the worker hears of progress at most 64 times
    /// per payload (and every 256 KiB at most often).
    step: u64,
    progress: Notify,
}

impl Upload {
    pub fn new(len: u64) -> Self {
        Upload {
            len,
            ready: Cell::new(0),
            state: Cell::new(UploadState::Arriving),
            woken_at: Cell::new(0),
            step: (len / 64).max(256 << 10),
            progress: Notify::new(),
        }
    }

    pub fn state(&self) -> UploadState {
        self.state.get()
    }

    /// Bytes in the slot so far.
    pub fn ready(&self) -> u64 {
        self.ready.get()
    }

    /// Notes that `ready` bytes are in; wakes the driver every `step` bytes.
    pub fn advance(&self, ready: u64) {
        self.ready.set(ready);
        if ready >= self.woken_at.get() + self.step {
            self.woken_at.set(ready);
            self.progress.notify_one();
        }
    }

    /// Ends the upload: `complete` when all bytes are in, else failed.
    pub fn end(&self, complete: bool) {
        let state = if complete && self.ready.get() == self.len {
            UploadState::Complete
        } else {
            UploadState::Failed
        };
        self.state.set(state);
        self.progress.notify_one();
    }

    /// What a worker told of `told` bytes must hear now, if anything (asked
    /// on each wake-up, so progress is told at the pace of `advance`).
    pub fn news(&self, told: u64) -> Option<News> {
        match self.state.get() {
            UploadState::Failed => Some(News::Abort),
            UploadState::Complete => Some(News::More {
                ready: self.len,
                last: true,
            }),
            UploadState::Arriving if self.ready.get() > told => Some(News::More {
                ready: self.ready.get(),
                last: false,
            }),
            UploadState::Arriving => None,
        }
    }

    /// Waits for the next wake-up (a permit given while nobody waited is kept).
    pub async fn changed(&self) {
        self.progress.notified().await
    }
}

/// A slot on loan from the allocator; returned when dropped, wherever that is
/// (reply written, connection gone, job abandoned), so slots never leak.
/// Its bytes count against its connection's and its peer's caps meanwhile.
#[derive(Debug)]
pub struct SlotLease {
    shared: Rc<Shared>,
    slot: Option<Slot>,
    holder: Rc<Holder>,
}

impl SlotLease {
    /// The slot's bytes in the arena.
    pub fn region(&self) -> Region {
        self.slot.as_ref().expect("slot held until drop").region()
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let len = slot.region().len;
            self.holder.held.set(self.holder.held.get() - len);
            self.shared.peer_held.sub(&self.holder.peer, len);
            self.shared.alloc.borrow_mut().free(slot);
            self.shared.slot_freed.notify_waiters();
        }
    }
}

/// Everything the tasks share.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub paths: RuntimePaths,
    pub segment: Segment,
    pub max_payload: u64,
    alloc: RefCell<SlotAllocator>,
    /// Woken whenever a slot is released.
    pub slot_freed: Notify,
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
    /// Caps on the slot bytes a connection and a peer hold.
    pub slot_limits: SlotLimits,
    /// Slot bytes held per peer.
    peer_held: PeerHoldings,
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
        let alloc = SlotAllocator::new(segment.arena_len() as u64);
        let slot_limits = SlotLimits::new(
            segment.arena_len() as u64,
            SlotAllocator::slot_len(max_payload + RESULT_RESERVE),
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
            segment,
            max_payload,
            alloc: RefCell::new(alloc),
            slot_freed: Notify::new(),
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
            slot_limits,
            peer_held: PeerHoldings::default(),
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
        self.alloc.borrow().in_use()
    }

    /// Waits for a slot of `len` bytes for `holder`'s connection
    /// (back-pressure when the arena is full, or when the connection or its
    /// peer holds all its caps allow: then only this connection waits);
    /// `None` once shutdown has begun. `len` must not exceed the largest slot
    /// (the configuration check guarantees it for any payload up to
    /// `max_payload`).
    pub async fn lease(self: &Rc<Self>, len: u64, holder: &Rc<Holder>) -> Option<SlotLease> {
        let slot_len = SlotAllocator::slot_len(len);
        // Set while this waits: what stops it (told in the log if the
        // connection is dropped meanwhile).
        let mut waiting = None;
        loop {
            let freed = self.slot_freed.notified();
            if self.draining.get() {
                return None;
            }
            let blocked = self.slot_limits.blocked_by(
                slot_len,
                holder.held.get(),
                self.peer_held.get(&holder.peer),
                self.alloc.borrow().bytes_in_use(),
            );
            let why = match blocked {
                Some(why) => why,
                None => match self.alloc.borrow_mut().alloc(len) {
                    Ok(slot) => {
                        let got = slot.region().len;
                        holder.held.set(holder.held.get() + got);
                        self.peer_held.add(&holder.peer, got);
                        return Some(SlotLease {
                            shared: Rc::clone(self),
                            slot: Some(slot),
                            holder: Rc::clone(holder),
                        });
                    }
                    Err(AllocError::Exhausted { .. }) => Wait::Arena,
                    Err(e @ AllocError::TooLarge { .. }) => {
                        unreachable!("callers check sizes first: {e}")
                    }
                },
            };
            match &waiting {
                None => waiting = Some(holder.wait(why)),
                Some(w) => w.now(why),
            }
            freed.await;
        }
    }

    /// Begins shutdown: new jobs are refused, and requests waiting for a slot
    /// are woken to be refused too.
    pub fn begin_draining(&self) {
        self.draining.set(true);
        self.slot_freed.notify_waiters();
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
        let alloc = self.alloc.borrow();
        let header = self.segment.header();
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
                let (backend, path, see, mode, owner_uid, attached) = match self.segment.sysv_info()
                {
                    Some(i) => (
                        "sysv",
                        String::new(),
                        format!("ipcs -m -i {} (key 0x{:08x})", i.id, i.key),
                        format!("{:04o}", i.mode),
                        i.uid,
                        i.nattch as usize,
                    ),
                    None => {
                        use std::os::unix::fs::MetadataExt;
                        let path = ipc_core::segment::fs_path(self.segment.name());
                        let meta = std::fs::metadata(&path).ok();
                        let mode = meta
                            .as_ref()
                            .map_or("?".into(), |m| format!("{:04o}", m.mode() & 0o7777));
                        let uid = meta.as_ref().map_or(u32::MAX, |m| m.uid());
                        (
                            "posix",
                            path.clone(),
                            format!("ls -l {path}"),
                            mode,
                            uid,
                            attached_here,
                        )
                    }
                };
                SegmentStatus {
                    backend: backend.into(),
                    name: self.segment.name().to_owned(),
                    path,
                    see,
                    size: self.segment.len() as u64,
                    generation: header.generation.load(std::sync::atomic::Ordering::Relaxed),
                    slots_in_use: alloc.in_use(),
                    slot_bytes_in_use: alloc.bytes_in_use(),
                    max_payload: self.max_payload,
                    mode,
                    owner_uid,
                    attached,
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
            in_flight: alloc.in_use(),
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
