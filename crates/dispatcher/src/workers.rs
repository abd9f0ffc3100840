//! The worker table: one entry per pool place, what `status` shows of it.
//! Drivers update their own entry; changing a worker's state costs no
//! allocation (it changes twice per job).

use std::cell::{Cell, RefCell};
use std::time::Instant;

pub use ipc_core::status::WorkerState;
use ipc_core::status::WorkerStatus;

/// One pool place (its current process, and what the places's processes did).
#[derive(Debug)]
pub struct WorkerEntry {
    pid: Cell<u32>,
    state: Cell<WorkerState>,
    /// When the current process started (`None` while starting).
    started: Cell<Option<Instant>>,
    jobs_done: Cell<u64>,
    jobs_failed: Cell<u64>,
    restarts: Cell<u64>,
    recycled: Cell<u64>,
    /// Of those, replaced for their memory.
    recycled_for_memory: Cell<u64>,
    last_exit: RefCell<String>,
}

impl WorkerEntry {
    fn new() -> Self {
        WorkerEntry {
            pid: Cell::new(0),
            state: Cell::new(WorkerState::Starting),
            started: Cell::new(None),
            jobs_done: Cell::new(0),
            jobs_failed: Cell::new(0),
            restarts: Cell::new(0),
            recycled: Cell::new(0),
            recycled_for_memory: Cell::new(0),
            last_exit: RefCell::new(String::new()),
        }
    }

    pub fn set_state(&self, state: WorkerState) {
        self.state.set(state);
    }

    pub fn state(&self) -> WorkerState {
        self.state.get()
    }

    /// A process started: it is idle.
    pub fn started(&self, pid: u32) {
        self.pid.set(pid);
        self.started.set(Some(Instant::now()));
        self.state.set(WorkerState::Idle);
    }

    /// The process ended.
    pub fn ended(&self) {
        self.state.set(WorkerState::Stopped);
        self.started.set(None);
    }

    /// The process ended `how`, losing `lost` jobs (besides those counted
    /// as they were answered: [`WorkerEntry::failed`]).
    pub fn lost(&self, lost: u64, how: String) {
        self.failed(lost);
        *self.last_exit.borrow_mut() = how;
    }

    /// `n` of its jobs were lost with it, answered before it was reaped.
    pub fn failed(&self, n: u64) {
        add(&self.jobs_failed, n);
    }

    /// A replacement is being started.
    pub fn restarting(&self) {
        add(&self.restarts, 1);
        self.pid.set(0);
        self.state.set(WorkerState::Starting);
    }

    /// Its process was replaced by policy, between jobs, by one already
    /// started and ready (`for_memory`: for `recycle_above_rss_mib`).
    pub fn recycled(&self, for_memory: bool) {
        add(&self.recycled, 1);
        if for_memory {
            add(&self.recycled_for_memory, 1);
        }
    }

    /// Not replaced (the dispatcher stops).
    pub fn retired(&self) {
        self.pid.set(0);
    }

    /// Counts a job its worker answered.
    pub fn answered(&self, ok: bool) {
        add(
            if ok {
                &self.jobs_done
            } else {
                &self.jobs_failed
            },
            1,
        );
    }

    fn report(&self, index: usize, pool: &str) -> WorkerStatus {
        WorkerStatus {
            index,
            pid: self.pid.get(),
            state: self.state.get(),
            jobs_done: self.jobs_done.get(),
            restarts: self.restarts.get(),
            jobs_failed: self.jobs_failed.get(),
            uptime_ms: self
                .started
                .get()
                .map_or(0, |t| t.elapsed().as_millis() as u64),
            last_exit: self.last_exit.borrow().clone(),
            pool: pool.to_owned(),
        }
    }
}

fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// Every pool place's entry.
#[derive(Debug)]
pub struct WorkerTable(Vec<WorkerEntry>);

impl WorkerTable {
    pub fn new(places: usize) -> Self {
        WorkerTable((0..places).map(|_| WorkerEntry::new()).collect())
    }

    pub fn get(&self, index: usize) -> &WorkerEntry {
        &self.0[index]
    }

    /// Workers with a live process that has said it is ready.
    pub fn running(&self) -> usize {
        self.0.iter().filter(|w| w.state().is_up()).count()
    }

    /// Workers replaced by policy, between jobs, in every place.
    pub fn recycled(&self) -> u64 {
        self.0.iter().map(|w| w.recycled.get()).sum()
    }

    /// Of those, the ones replaced for their memory.
    pub fn recycled_for_memory(&self) -> u64 {
        self.0.iter().map(|w| w.recycled_for_memory.get()).sum()
    }

    /// Each place's report; `pool` names the pool they belong to.
    pub fn report(&self, pool: &str) -> Vec<WorkerStatus> {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| w.report(i, pool))
            .collect()
    }
}
