//! State shared by the dispatcher's tasks (one thread, so `Rc` and `Cell`):
//! the segment and its slots, and the parts (queue, workers, stats,
//! admission, lifecycle) that each own their state. No borrow of a
//! `RefCell` here is ever held across an `.await`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use ipc_core::alloc::AllocError;
use ipc_core::{Region, RuntimePaths, Segment, Slot, SlotAllocator};
use tokio::sync::Notify;

use crate::admission::{Admission, Budgets, Holder, PeerHoldings, SlotLimits, Wait};
use crate::queue::JobQueue;
use crate::replies::Permit;
use crate::stats::Stats;
use crate::workers::WorkerTable;
use crate::Config;

/// Room kept after every payload for small results (digests, counts), so an
/// operation never has to overwrite its input to answer.
pub const RESULT_RESERVE: u64 = 4096;

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
    /// The connection's in-flight allowance, and the way to answer.
    pub reply: Permit,
    /// Runs so far that ended with the worker dying.
    pub attempts: u8,
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

/// Everything the tasks share: parts with one job each, each owning its
/// state behind its methods.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub paths: RuntimePaths,
    pub segment: Segment,
    pub max_payload: u64,
    alloc: RefCell<SlotAllocator>,
    /// Woken whenever a slot is released.
    pub slot_freed: Notify,
    /// Caps on the slot bytes a connection and a peer hold.
    pub slot_limits: SlotLimits,
    /// Slot bytes held per peer.
    peer_held: PeerHoldings,
    /// Jobs waiting for a worker.
    pub queue: JobQueue,
    /// What each worker is doing and has done.
    pub workers: WorkerTable,
    /// Jobs by outcome, latencies.
    pub stats: Stats,
    /// Who may connect, and how many at once.
    pub admission: Admission,
    /// Where shutdown has got to.
    pub life: Lifecycle,
    pub started: Instant,
    /// The TCP listener's address, once bound.
    pub tcp_addr: std::cell::OnceCell<String>,
}

/// Where shutdown has got to.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: Cell<bool>,
    workers_stopped: Cell<bool>,
}

impl Lifecycle {
    /// Whether shutdown has begun: new jobs are refused.
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Whether the workers were told to stop: nothing queued will run any more.
    pub fn workers_stopped(&self) -> bool {
        self.workers_stopped.get()
    }

    pub fn stop_workers(&self) {
        self.workers_stopped.set(true);
    }
}

impl Shared {
    pub fn new(
        config: Config,
        paths: RuntimePaths,
        segment: Segment,
        tcp_token: Option<Box<[u8]>>,
        budgets: Budgets,
    ) -> Rc<Self> {
        let max_payload = config.max_payload;
        let alloc = SlotAllocator::new(segment.arena_len() as u64);
        let slot_limits = SlotLimits::new(
            segment.arena_len() as u64,
            SlotAllocator::slot_len(max_payload + RESULT_RESERVE),
            config.conn_arena_percent,
            config.peer_arena_percent,
        );
        Rc::new(Shared {
            workers: WorkerTable::new(config.workers),
            admission: Admission::new(&budgets, tcp_token),
            config,
            paths,
            segment,
            max_payload,
            alloc: RefCell::new(alloc),
            slot_freed: Notify::new(),
            slot_limits,
            peer_held: PeerHoldings::default(),
            queue: JobQueue::default(),
            stats: Stats::default(),
            life: Lifecycle::default(),
            started: Instant::now(),
            tcp_addr: std::cell::OnceCell::new(),
        })
    }

    /// Slots on loan and the bytes they take.
    pub fn slot_usage(&self) -> (usize, u64) {
        let alloc = self.alloc.borrow();
        (alloc.in_use(), alloc.bytes_in_use())
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
            if self.life.draining() {
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
        self.life.draining.set(true);
        self.slot_freed.notify_waiters();
    }
}
