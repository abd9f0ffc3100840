//! Orphans: processes a job left behind once their parent died (a double
//! fork, or a command pool's command whose worker was killed from outside,
//! which is in a process group of its own). The dispatcher is the child
//! subreaper of its workers' trees (`PR_SET_CHILD_SUBREAPER`), so such
//! processes become its children; [`Orphans::sweep`] kills every child of
//! the dispatcher that is not one of its workers (with its process group,
//! unless that is a worker's or the dispatcher's own) and reaps those that
//! are dead. The drivers sweep after each worker is reaped, and a task
//! every second, so an orphan lives at most about a second and a zombie no
//! longer. A worker's own pid is registered before any `.await` follows its
//! spawn, so a sweep (on the same thread) never mistakes a new worker for
//! an orphan.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use ipc_core::children::{children_of, Child};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How often the sweep runs besides after a worker's end.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A killed orphan is waited for this many times, this long apart, before
/// it is left to the next sweep.
const REAP_TRIES: u32 = 10;
const REAP_PAUSE: Duration = Duration::from_millis(1);

/// The dispatcher's workers, and the sweep of every other child.
#[derive(Debug, Default)]
pub struct Orphans {
    /// Pids of the worker processes started and not yet reaped.
    workers: RefCell<BTreeSet<u32>>,
}

impl Orphans {
    /// Makes this process the child subreaper of its descendants; says why
    /// not in the log if it cannot (orphans then go to the watchdog, which
    /// sweeps them when the dispatcher exits).
    pub fn adopt() {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!("cannot become the child subreaper ({e}): what jobs leave behind is swept only when the dispatcher exits");
        }
    }

    /// A worker process was started (call before any `.await`).
    pub fn worker_started(&self, pid: u32) {
        self.workers.borrow_mut().insert(pid);
    }

    /// A worker process was reaped.
    pub fn worker_reaped(&self, pid: u32) {
        self.workers.borrow_mut().remove(&pid);
    }

    /// Kills every child that is not a worker and reaps the dead ones;
    /// returns how many it found.
    pub fn sweep(&self) -> usize {
        let me = std::process::id();
        let own_group = nix::unistd::getpgrp().as_raw() as u32;
        let workers = self.workers.borrow();
        let orphans: Vec<Child> = children_of(me)
            .into_iter()
            .filter(|c| !workers.contains(&c.pid))
            .collect();
        for c in &orphans {
            if !c.zombie {
                tracing::warn!(
                    pid = c.pid,
                    pgid = c.pgid,
                    "killing a process a job left behind"
                );
                let group = c.pgid != own_group && !workers.contains(&c.pgid);
                if group {
                    let _ = killpg(Pid::from_raw(c.pgid as i32), Signal::SIGKILL);
                }
                let _ = kill(Pid::from_raw(c.pid as i32), Signal::SIGKILL);
            }
            // SIGKILL takes effect at once but not synchronously: reaped
            // within a few milliseconds, else at a later sweep (never a
            // long wait on the dispatcher's thread).
            for _ in 0..REAP_TRIES {
                match waitpid(Pid::from_raw(c.pid as i32), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => std::thread::sleep(REAP_PAUSE),
                    Ok(_) => {
                        tracing::debug!(pid = c.pid, "reaped a process a job left behind");
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        orphans.len()
    }
}
