//! Pools: what each runs ([`PoolSpec`], from the flags and the
//! configuration file), and each one's running state ([`Pool`]: its queue,
//! its workers, the operations its workers serve, its segment's slots).
//! [`Routes`] maps every operation to the one pool that serves it.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;

use ipc_core::cgroup::Version;
use ipc_core::memory::Mechanism;
use ipc_core::status::{PoolStatus, RunAsStatus, SegmentStatus};
use ipc_core::Segment;
use tokio::sync::Notify;

use crate::queue::JobQueue;
use crate::slots::SlotPool;
use crate::workers::WorkerTable;

/// The builtin pool's name.
pub const BUILTIN: &str = "builtin";

/// What a pool's workers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolKind {
    /// `osps-worker` (`--worker-exe`): the operations built into OSPS.
    Builtin,
    /// A long-lived program speaking the worker protocol, which announces
    /// its operations in `Ready`.
    Program { argv: Vec<String> },
    /// A command run once per job (payload on stdin, stdout the result),
    /// under `osps-worker`'s exec mode, for the operations `ops`.
    Exec {
        argv: Vec<String>,
        ops: Vec<String>,
        pass_args: bool,
    },
}

impl PoolKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            PoolKind::Builtin => "builtin",
            PoolKind::Program { .. } => "program",
            PoolKind::Exec { .. } => "exec",
        }
    }
}

/// A pool as configured; `None` fields take the top-level option's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub kind: PoolKind,
    pub workers: Option<usize>,
    pub job_timeout_ms: Option<u64>,
    pub max_attempts: Option<u8>,
    pub max_result_mib: Option<u64>,
    pub recycle_after_jobs: Option<u64>,
    pub recycle_above_rss_mib: Option<u64>,
    /// Its segment's arena, in MiB.
    pub segment_mib: Option<u64>,
    /// Its segment's backend (`segment = "posix"` or `"sysv"`).
    pub backend: Option<ipc_core::Backend>,
    /// Whom its workers run as (`user`, `group`; `None`: the dispatcher's uid).
    pub run_as: Option<RunAs>,
    pub memory_limit_mib: Option<u64>,
    /// Variables added to its workers' environment.
    pub env: Vec<(String, String)>,
    /// Its workers' working directory (`None`: the dispatcher's).
    pub cwd: Option<std::path::PathBuf>,
    /// Where the pool was configured (`FILE:LINE`), for messages.
    pub origin: String,
}

/// A pool with every value settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    pub kind: PoolKind,
    pub workers: usize,
    pub job_timeout_ms: u64,
    pub max_attempts: u8,
    /// The largest payload it takes: `--max-payload`, or less if its
    /// segment's largest slot holds less.
    pub max_payload: u64,
    /// The largest result a job of the pool may return, in bytes.
    pub max_result: u64,
    /// Jobs after which a worker is replaced, between jobs (`None`: never).
    pub recycle_after_jobs: Option<u64>,
    /// Resident memory (MiB) above which a worker is replaced after a job,
    /// between jobs (`None`: never).
    pub recycle_above_rss_mib: Option<u64>,
    /// Its segment's arena, in MiB.
    pub segment_mib: u64,
    /// Its segment's backend.
    pub backend: ipc_core::Backend,
    /// Whom its workers run as (`None`: the dispatcher's uid).
    pub run_as: Option<RunAs>,
    /// Its workers' memory limit in MiB (`None`: none), enforced by
    /// [`PoolConfig::memory_limit_by`].
    pub memory_limit_mib: Option<u64>,
    /// Variables added to its workers' environment.
    pub env: Vec<(String, String)>,
    /// Its workers' working directory (`None`: the dispatcher's).
    pub cwd: Option<std::path::PathBuf>,
    pub origin: String,
}

/// Whom a pool's workers run as (`user`, `group`), resolved when the
/// configuration is read; its segment is given to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
    /// The user's home directory and shell (for its workers' `HOME`, `SHELL`).
    pub home: PathBuf,
    pub shell: PathBuf,
}

impl RunAs {
    /// Resolves `user` (its primary group unless `group` is given) and
    /// `group` by name. Another uid or gid than the dispatcher's own needs
    /// the dispatcher to run as root.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<RunAs, String> {
        use nix::unistd::{Gid, Group, Uid, User};
        let (euid, egid) = (Uid::effective(), Gid::effective());
        let u = match user {
            Some(name) => User::from_name(name)
                .map_err(|e| format!("cannot look up user \"{name}\": {e}"))?
                .ok_or_else(|| format!("no user \"{name}\" on this host"))?,
            None => User::from_uid(euid)
                .ok()
                .flatten()
                .ok_or_else(|| format!("no user name for uid {euid}"))?,
        };
        let g = match group {
            Some(name) => Group::from_name(name)
                .map_err(|e| format!("cannot look up group \"{name}\": {e}"))?
                .ok_or_else(|| format!("no group \"{name}\" on this host"))?,
            None => {
                let gid = if user.is_some() { u.gid } else { egid };
                Group::from_gid(gid)
                    .ok()
                    .flatten()
                    .ok_or_else(|| format!("no group name for gid {gid}"))?
            }
        };
        if !euid.is_root() && (u.uid != euid || g.gid != egid) {
            return Err(format!(
                "running workers as user \"{}\" (uid {}) and group \"{}\" (gid {}) needs the dispatcher to run as root; it runs as uid {euid}",
                u.name, u.uid, g.name, g.gid
            ));
        }
        Ok(RunAs {
            user: u.name,
            uid: u.uid.as_raw(),
            group: g.name,
            gid: g.gid.as_raw(),
            home: u.dir,
            shell: u.shell,
        })
    }

    pub fn status(&self) -> RunAsStatus {
        RunAsStatus {
            user: self.user.clone(),
            uid: self.uid,
            group: self.group.clone(),
            gid: self.gid,
        }
    }
}

impl PoolConfig {
    /// How its memory limit is enforced, if it has one, as status and the
    /// log say it: `RLIMIT_DATA` always, and first a memory cgroup per
    /// worker of version `cgroup`, where the dispatcher may make them.
    pub fn memory_limit_by(&self, cgroup: Option<Version>) -> Option<String> {
        self.memory_limit_mib.map(|_| match cgroup {
            Some(v) => format!("{}, {}", v.mechanism(), Mechanism::RlimitData),
            None => Mechanism::RlimitData.to_string(),
        })
    }

    /// The program the pool's workers run, as status shows it.
    pub fn program(&self, worker_exe: &std::path::Path) -> Vec<String> {
        match &self.kind {
            PoolKind::Builtin => vec![worker_exe.display().to_string()],
            PoolKind::Program { argv } | PoolKind::Exec { argv, .. } => argv.clone(),
        }
    }
}

/// Where `argv[0]` is, if it can be run: a path as given, else searched in `PATH`.
pub fn find_program(program: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return match std::fs::metadata(&p) {
            Err(e) => Err(format!("{program}: {e}")),
            Ok(_) if !runnable(&p) => Err(format!("{program}: not an executable file")),
            Ok(_) => Ok(p),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
        .ok_or_else(|| format!("{program}: not found in PATH"))
}

/// Whether `op` may name an operation of a pool: 1 to 64 bytes, no
/// leading `-`, not `ping` (every worker's) nor one the dispatcher answers
/// (`status`, `metrics`, `cancel`, `reload`).
pub fn valid_op(op: &str) -> bool {
    !op.is_empty()
        && op.len() <= 64
        && !op.starts_with('-')
        && op != ipc_core::proto::OP_PING
        && !ipc_core::proto::DISPATCHER_OPS.contains(&op)
}

/// One pool's running state.
#[derive(Debug)]
pub struct Pool {
    pub config: PoolConfig,
    /// Its id, never reused by another pool of this dispatcher (a reload's
    /// replacement of a pool is another pool): what [`Routes`] maps to.
    pub index: usize,
    /// Started by a reload and not routed to yet: its workers' `Ready`
    /// records its operations without touching the routes.
    staged: Cell<bool>,
    /// Replaced or removed by a reload: routed to no more, it runs what it
    /// holds, then its workers stop.
    retired: Cell<bool>,
    /// Its jobs waiting for one of its workers.
    pub queue: JobQueue,
    pub workers: WorkerTable,
    /// The operations its workers serve: from the configuration (exec), or
    /// from its first worker's `Ready`.
    ops: RefCell<Option<Vec<String>>>,
    /// Why its first worker could not start, if it could not.
    start_failure: RefCell<Option<String>>,
    /// Set when its workers serve an operation another pool serves.
    conflict: RefCell<Option<String>>,
    /// Woken when the pool settles (operations known, a first start
    /// failed, or a conflict).
    news: Notify,
    /// Jobs answered `out of memory`.
    out_of_memory: Cell<u64>,
    /// Its segment's slots, their caps and leases: its workers map this
    /// segment and no other.
    pub slots: Rc<SlotPool>,
    /// Its jobs by outcome, their latency, its restarts by cause (each
    /// queued job holds it too).
    pub metrics: Rc<crate::metrics::PoolMetrics>,
}

/// The percentages of a pool's arena one connection and one peer may hold.
#[derive(Debug, Clone, Copy)]
pub struct SlotCaps {
    pub conn_percent: u64,
    pub peer_percent: u64,
}

impl Pool {
    pub fn new(config: PoolConfig, index: usize, segment: Segment, caps: SlotCaps) -> Pool {
        let ops = match &config.kind {
            PoolKind::Exec { ops, .. } => Some(ops.clone()),
            _ => None,
        };
        let slots = SlotPool::new(
            segment,
            config.max_payload,
            caps.conn_percent,
            caps.peer_percent,
        );
        Pool {
            slots,
            workers: WorkerTable::new(config.workers),
            config,
            index,
            staged: Cell::new(false),
            retired: Cell::new(false),
            queue: JobQueue::default(),
            ops: RefCell::new(ops),
            start_failure: RefCell::new(None),
            conflict: RefCell::new(None),
            news: Notify::new(),
            out_of_memory: Cell::new(0),
            metrics: Rc::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Marks the pool started by a reload, not routed to yet.
    pub fn stage(&self) {
        self.staged.set(true);
    }

    /// Whether a reload replaced or removed it: a request routed to it
    /// before the switch is routed again.
    pub fn retired(&self) -> bool {
        self.retired.get()
    }

    /// Why its first start failed, if it did.
    pub fn start_failure(&self) -> Option<String> {
        self.start_failure.borrow().clone()
    }

    /// The operations, once known.
    pub fn ops(&self) -> Option<Vec<String>> {
        self.ops.borrow().clone()
    }

    /// Whether the pool has had a first answer: operations known, or a
    /// first start failed.
    pub fn settled(&self) -> bool {
        self.ops.borrow().is_some()
            || self.start_failure.borrow().is_some()
            || self.conflict.borrow().is_some()
    }

    /// Waits until the pool has settled (see [`Pool::settled`]).
    pub async fn settle(&self) {
        loop {
            let news = self.news.notified();
            if self.settled() {
                return;
            }
            news.await;
        }
    }

    /// Two pools serving one operation, if this one found it so.
    pub fn conflict(&self) -> Option<String> {
        self.conflict.borrow().clone()
    }

    /// A worker could not start.
    pub fn start_failed(&self, why: &str) {
        if self.ops.borrow().is_none() || (self.staged.get() && self.workers.running() == 0) {
            *self.start_failure.borrow_mut() = Some(why.to_owned());
            self.news.notify_waiters();
        }
    }

    /// Counts a job answered `out of memory`.
    pub fn ran_out_of_memory(&self) {
        self.out_of_memory.set(self.out_of_memory.get() + 1);
    }

    /// Its status; `cgroup`: the version of the workers' memory cgroups, if
    /// the dispatcher makes them.
    pub fn status(&self, worker_exe: &std::path::Path, cgroup: Option<Version>) -> PoolStatus {
        let workers = self.workers.report(&self.config.name);
        let sum = |f: fn(&ipc_core::status::WorkerStatus) -> u64| workers.iter().map(f).sum();
        PoolStatus {
            name: self.config.name.clone(),
            kind: self.config.kind.as_str().into(),
            program: self.config.program(worker_exe),
            ops: self.ops().unwrap_or_default(),
            workers: self.config.workers,
            jobs_done: sum(|w| w.jobs_done),
            jobs_failed: sum(|w| w.jobs_failed),
            restarts: sum(|w| w.restarts),
            recycled: self.workers.recycled(),
            recycled_above_rss: self.workers.recycled_for_memory(),
            queue_depth: self.queue.len(),
            job_timeout_ms: self.config.job_timeout_ms,
            max_attempts: self.config.max_attempts,
            max_result: self.config.max_result,
            memory_limit_mib: self.config.memory_limit_mib,
            memory_limit_by: self.config.memory_limit_by(cgroup),
            out_of_memory: self.out_of_memory.get(),
            start_failure: self.start_failure.borrow().clone(),
            segment: Some(self.segment_status()),
            run_as: self.config.run_as.as_ref().map(RunAs::status),
        }
    }

    /// Its segment, for status (mapped here and by its live workers).
    pub fn segment_status(&self) -> SegmentStatus {
        SegmentStatus {
            max_payload: self.config.max_payload,
            ..self.slots.describe(1 + self.workers.running())
        }
    }
}

/// Which pool serves each operation.
#[derive(Debug, Default)]
pub struct Routes(RefCell<BTreeMap<String, usize>>);

impl Routes {
    /// The pool serving `op`.
    pub fn get(&self, op: &str) -> Option<usize> {
        self.0.borrow().get(op).copied()
    }

    /// Every routed operation, in order.
    pub fn names(&self) -> Vec<String> {
        self.0.borrow().keys().cloned().collect()
    }

    /// Records what `pool` serves, from its first worker's `Ready` (or its
    /// configuration); a replacement must serve the same. Refuses an
    /// operation another pool serves.
    pub fn learn(&self, pools: &PoolSet, pool: &Pool, ops: &[String]) -> Result<(), String> {
        // Every worker answers ping: it is no pool's own.
        let mut sorted: Vec<String> = ops
            .iter()
            .filter(|o| *o != ipc_core::proto::OP_PING)
            .cloned()
            .collect();
        sorted.sort();
        sorted.dedup();
        if let Some(bad) = sorted.iter().find(|o| !valid_op(o)) {
            return Err(format!(
                "it announces {bad:?}, which cannot be an operation's name (1 to 64 bytes, no leading '-', not one the dispatcher answers: status, metrics, cancel, reload)"
            ));
        }
        if let Some(known) = pool.ops() {
            let mut known = known;
            known.sort();
            if known != sorted {
                return Err(format!(
                    "it serves {}, but the pool's first worker served {}; restart the dispatcher to change a pool's operations",
                    list(&sorted),
                    list(&known)
                ));
            }
            if self.0.borrow().values().any(|&p| p == pool.index) {
                return Ok(());
            }
        }
        if pool.staged.get() || pool.retired.get() {
            // Routed (or no more) by a reload's switch, which checks conflicts.
            *pool.ops.borrow_mut() = Some(sorted);
            pool.news.notify_waiters();
            return Ok(());
        }
        let routes = self.0.borrow();
        for op in &sorted {
            if let Some(&other) = routes.get(op).filter(|&&p| p != pool.index) {
                let other = pools.get(other).expect("a routed pool is in the set");
                let conflict = conflict(pool, &other, op);
                *pool.conflict.borrow_mut() = Some(conflict.clone());
                pool.news.notify_waiters();
                return Err(conflict);
            }
        }
        drop(routes);
        let mut routes = self.0.borrow_mut();
        for op in &sorted {
            routes.insert(op.clone(), pool.index);
        }
        *pool.ops.borrow_mut() = Some(sorted);
        *pool.start_failure.borrow_mut() = None;
        pool.news.notify_waiters();
        Ok(())
    }
}

/// Two pools serving one operation, said.
fn conflict(pool: &Pool, other: &Pool, op: &str) -> String {
    format!(
        "pool \"{}\" ({}) serves operation \"{op}\", which pool \"{}\" ({}) serves too; an operation is served by one pool",
        pool.name(),
        pool.config.origin,
        other.name(),
        other.config.origin
    )
}

impl Routes {
    /// The routes of `pools` (each with its operations known), or the
    /// first operation two of them serve: a reload's check before its switch.
    pub fn plan(pools: &[Rc<Pool>]) -> Result<BTreeMap<String, usize>, String> {
        let mut plan: BTreeMap<String, usize> = BTreeMap::new();
        for pool in pools {
            for op in pool.ops().unwrap_or_default() {
                if let Some(other) = plan
                    .get(&op)
                    .and_then(|&i| pools.iter().find(|p| p.index == i))
                {
                    return Err(conflict(pool, other, &op));
                }
                plan.insert(op, pool.index);
            }
        }
        Ok(plan)
    }

    /// Routes by `plan` from now on.
    pub fn replace(&self, plan: BTreeMap<String, usize>) {
        *self.0.borrow_mut() = plan;
    }
}

/// The pools: those routed to (`active`, in the configuration's order),
/// and those a reload replaced or removed, still finishing their jobs
/// (`retiring`). Iterating gives the active ones.
#[derive(Debug, Default)]
pub struct PoolSet {
    active: RefCell<Vec<Rc<Pool>>>,
    retiring: RefCell<Vec<Rc<Pool>>>,
    next_id: Cell<usize>,
}

impl PoolSet {
    pub fn new(pools: Vec<Pool>) -> PoolSet {
        let next_id = pools.iter().map(|p| p.index + 1).max().unwrap_or(0);
        PoolSet {
            active: RefCell::new(pools.into_iter().map(Rc::new).collect()),
            retiring: RefCell::new(Vec::new()),
            next_id: Cell::new(next_id),
        }
    }

    /// The active pools.
    pub fn iter(&self) -> std::vec::IntoIter<Rc<Pool>> {
        self.active.borrow().clone().into_iter()
    }

    /// `f` of the routed pools, borrowed (no copy of the list: for the
    /// request path).
    pub fn with_active<R>(&self, f: impl FnOnce(&[Rc<Pool>]) -> R) -> R {
        f(&self.active.borrow())
    }

    /// Active and retiring pools: every one that holds jobs.
    pub fn all(&self) -> Vec<Rc<Pool>> {
        let mut all = self.active.borrow().clone();
        all.extend(self.retiring.borrow().iter().cloned());
        all
    }

    /// The pool of id `index`, active or retiring.
    pub fn get(&self, index: usize) -> Option<Rc<Pool>> {
        let find = |v: &Vec<Rc<Pool>>| v.iter().find(|p| p.index == index).cloned();
        find(&self.active.borrow()).or_else(|| find(&self.retiring.borrow()))
    }

    /// The first active pool (the builtin one when it runs).
    pub fn first(&self) -> Rc<Pool> {
        Rc::clone(&self.active.borrow()[0])
    }

    /// Active pools.
    pub fn len(&self) -> usize {
        self.active.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.borrow().is_empty()
    }

    /// Retiring pools.
    pub fn retiring(&self) -> Vec<Rc<Pool>> {
        self.retiring.borrow().clone()
    }

    /// An id no pool of this dispatcher has had.
    pub fn next_id(&self) -> usize {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// A reload's switch: `active` are routed to from now on (their
    /// staging ends), `retired` finish what they hold.
    pub fn switch(&self, active: Vec<Rc<Pool>>, retired: Vec<Rc<Pool>>) {
        for p in &active {
            p.staged.set(false);
        }
        for p in &retired {
            p.retired.set(true);
        }
        *self.active.borrow_mut() = active;
        self.retiring.borrow_mut().extend(retired);
    }

    /// A retiring pool whose workers have stopped: forgotten.
    pub fn forget(&self, index: usize) {
        self.retiring.borrow_mut().retain(|p| p.index != index);
    }
}

impl IntoIterator for &PoolSet {
    type Item = Rc<Pool>;
    type IntoIter = std::vec::IntoIter<Rc<Pool>>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

fn list(ops: &[String]) -> String {
    format!("[{}]", ops.join(", "))
}
