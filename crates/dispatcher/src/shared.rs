//! State shared by the dispatcher's tasks (one thread, so `Rc` and `Cell`):
//! the pools (each with its segment's slots, `slots.rs`, its queue and its
//! workers), and the parts (stats, admission, lifecycle) that each own
//! their state. No borrow of a
//! `RefCell` here is ever held across an `.await`.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use ipc_core::{RuntimePaths, Segment};

use crate::admission::{Admission, Budgets};
use crate::orphans::Orphans;
use crate::pools::{Pool, PoolSet, Routes, SlotCaps};
use crate::replies::Permit;
use crate::slots::JobSlot;
use crate::stats::Stats;
use crate::Config;

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
    /// Whether its client cancelled it, and the cancels waiting for its answer.
    pub ticket: std::rc::Rc<crate::cancel::Ticket>,
    /// Its pool's counters, where its outcome and latency are counted.
    pub metrics: Rc<crate::metrics::PoolMetrics>,
}

/// Everything the tasks share: parts with one job each, each owning its
/// state behind its methods.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub paths: RuntimePaths,
    /// The largest payload any pool takes (`--max-payload`): a request
    /// announcing more is refused and its connection closed.
    pub max_payload: u64,
    /// The pools: each one's segment, queue and workers (iterating gives
    /// those routed to; a reload changes them).
    pub pools: PoolSet,
    /// Which pool serves each operation.
    pub routes: Routes,
    /// The worker processes, and the sweep of what jobs leave behind.
    pub orphans: Orphans,
    next_job_id: Cell<u64>,
    /// Jobs by outcome, latencies.
    pub stats: Stats,
    /// Connections and refusals by listener, the dispatcher's restarts
    /// (the pools' counters are in each pool).
    pub metrics: crate::metrics::Metrics,
    /// Who may connect, and how many at once.
    pub admission: Admission,
    /// Where shutdown has got to.
    pub life: Lifecycle,
    /// Configuration reloads: what they need, and what they did.
    pub reloads: crate::reload::Reloads,
    pub started: Instant,
    /// The TCP listener's address, once bound.
    pub tcp_addr: std::cell::OnceCell<String>,
    /// Woken when a client cancels a job a driver holds (`cancel.rs`).
    pub cancels: tokio::sync::Notify,
    /// Where the workers of pools with a memory limit get a memory cgroup
    /// each (`ipc_core::cgroup`), or why they cannot (for the log).
    pub cgroups: Result<Rc<ipc_core::cgroup::Cgroups>, String>,
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
        segments: Vec<Segment>,
        tcp_token: Option<Box<[u8]>>,
        budgets: Budgets,
        cgroups: Result<Rc<ipc_core::cgroup::Cgroups>, String>,
    ) -> Rc<Self> {
        let max_payload = config.max_payload;
        let caps = SlotCaps {
            conn_percent: config.conn_arena_percent,
            peer_percent: config.peer_arena_percent,
        };
        let configs = config.pools();
        assert_eq!(configs.len(), segments.len(), "one segment per pool");
        let pools: Vec<Pool> = configs
            .into_iter()
            .zip(segments)
            .enumerate()
            .map(|(i, (p, seg))| Pool::new(p, i, seg, caps))
            .collect();
        let routes = Routes::default();
        let pools = PoolSet::new(pools);
        for pool in &pools {
            // An exec pool's operations are in the configuration (a
            // conflict is kept in the pool, and refused before serving).
            if let Some(ops) = pool.ops() {
                let _ = routes.learn(&pools, &pool, &ops);
            }
        }
        Rc::new(Shared {
            admission: Admission::new(&budgets, tcp_token),
            config,
            paths,
            max_payload,
            pools,
            routes,
            orphans: Orphans::default(),
            next_job_id: Cell::new(0),
            stats: Stats::default(),
            reloads: crate::reload::Reloads::default(),
            metrics: crate::metrics::Metrics::from_env(),
            life: Lifecycle::default(),
            started: Instant::now(),
            tcp_addr: std::cell::OnceCell::new(),
            cancels: tokio::sync::Notify::new(),
            cgroups,
        })
    }

    /// The version of the workers' memory cgroups, if the dispatcher
    /// makes them.
    pub fn cgroup_version(&self) -> Option<ipc_core::cgroup::Version> {
        self.cgroups.as_ref().ok().map(|c| c.version())
    }

    /// Numbers a new job (from 1).
    pub fn next_job_id(&self) -> u64 {
        let id = self.next_job_id.get() + 1;
        self.next_job_id.set(id);
        id
    }

    /// The pool that runs `op`: the one serving it, or for `ping` (which
    /// every worker answers) the pool with the most idle workers. `None`
    /// for an operation no pool serves.
    pub fn route(&self, op: &str) -> Option<Rc<Pool>> {
        if op == ipc_core::proto::OP_PING {
            // A pool with a live worker first, then the most idle
            // workers, then the shortest queue.
            return self.pools.with_active(|pools| {
                let best = pools.iter().max_by_key(|p| {
                    (
                        p.workers.running() > 0,
                        p.queue.idle_workers(),
                        std::cmp::Reverse(p.queue.len()),
                    )
                });
                best.cloned()
            });
        }
        self.routes.get(op).and_then(|i| self.pools.get(i))
    }

    /// [`Shared::route`], and for an operation not known while a pool's
    /// first worker is still starting, the same once the pools have
    /// settled (up to the time a worker has to be ready).
    pub async fn route_when_known(&self, op: &str) -> Option<Rc<Pool>> {
        if let Some(pool) = self.route(op) {
            return Some(pool);
        }
        if self.pools.iter().all(|p| p.settled()) {
            return None;
        }
        let settled = async {
            for p in &self.pools {
                p.settle().await;
            }
        };
        let _ = tokio::time::timeout(crate::driver::READY_TIMEOUT, settled).await;
        self.route(op)
    }

    /// The answer to an operation no pool serves: what exists (and which
    /// pools have not said yet).
    pub fn unknown_op(&self, op: &str) -> String {
        let mut known = self.routes.names();
        known.push(ipc_core::proto::OP_PING.into());
        known.sort();
        // The name as sent, cut: a long one must not make a long answer.
        let mut cut = op.len().min(64);
        while !op.is_char_boundary(cut) {
            cut -= 1;
        }
        let shown = if cut < op.len() {
            format!("{:?}... ({} bytes)", &op[..cut], op.len())
        } else {
            format!("{op:?}")
        };
        let mut message = format!("{shown} is not an operation; known: {}", known.join(", "));
        for p in self.pools.iter().filter(|p| p.ops().is_none()) {
            message.push_str(&format!(
                "; pool \"{}\" has no worker ready yet, and serves operations not known until one is",
                p.name()
            ));
        }
        message
    }

    /// Jobs waiting, in every pool.
    pub fn queued(&self) -> usize {
        self.pools.all().iter().map(|p| p.queue.len()).sum()
    }

    /// Slots on loan, in every pool: every accepted job holds one until
    /// its reply is written.
    pub fn in_flight(&self) -> usize {
        self.pools.all().iter().map(|p| p.slots.in_use()).sum()
    }

    /// Begins shutdown: new jobs are refused, and requests waiting for a slot
    /// are woken to be refused too.
    pub fn begin_draining(&self) {
        self.life.draining.set(true);
        for p in self.pools.all() {
            p.slots.close();
        }
    }
}
