//! Nothing a dispatcher started outlives it: when the dispatcher has exited
//! (and when the watchdog stops), [`sweep`] kills and reaps every process
//! still descending from the watchdog — workers, and whatever their jobs
//! started — before the next dispatcher starts.
//!
//! The watchdog starts nothing but the dispatcher and is the child
//! subreaper, so once the dispatcher is gone every process it started,
//! directly or not, is either a child of the watchdog (an orphan reparented
//! to it) or below one. A child of ours cannot change parent, cannot set a
//! parent above us, and its pid cannot be reused until we reap it, so killing
//! our own children by pid is exact (no race with pid reuse). Killing them
//! hands their own children to us; the sweep repeats, one generation per
//! round, until the watchdog has no child left (bounded in time).
//!
//! This covers children that leave their process group or session (`setsid`,
//! double forks): reparenting follows ancestry, not sessions. It does not
//! cover processes that were never descendants (work handed to another
//! service, e.g. `systemd-run` or `at`), nor anything if the watchdog itself
//! is killed with SIGKILL; a cgroup per instance (systemd's
//! `KillMode=control-group`, or `cgroup.kill`) is the complete answer there.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How long a sweep may take before it gives up on what is left (a process
/// stuck in an uninterruptible sleep cannot die at once).
pub const SWEEP_WITHIN: Duration = Duration::from_secs(5);

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Processes sent SIGKILL.
    pub killed: usize,
    /// Processes reaped (killed here or exited on their own).
    pub reaped: usize,
    /// Children still there when the time ran out (none when all went well).
    pub left: Vec<u32>,
}

/// Kills every child of this process and reaps it, round after round as the
/// children of those killed are reparented here, until none is left or
/// `within` has passed.
pub async fn sweep(within: Duration) -> Swept {
    let me = std::process::id();
    let end = Instant::now() + within;
    let mut swept = Swept::default();
    let mut signalled = std::collections::HashSet::new();
    loop {
        let none_left = reap_exited(&mut swept);
        let live = live_children(me);
        if none_left && live.is_empty() {
            break;
        }
        for &pid in &live {
            // Still ours (unreaped), so the pid is still this process.
            if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() && signalled.insert(pid) {
                tracing::warn!(pid, cmd = %command(pid), "killed a leftover of the dispatcher");
                swept.killed += 1;
            }
        }
        if Instant::now() >= end {
            // Whatever has not been reaped yet (dying, zombie or not).
            swept.left = children(me).into_iter().map(|(pid, _)| pid).collect();
            if !swept.left.is_empty() {
                tracing::error!(left = ?swept.left, "processes of the dispatcher still there after {within:?}");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if swept.killed > 0 || swept.reaped > 0 {
        tracing::info!(
            killed = swept.killed,
            reaped = swept.reaped,
            "swept what the dispatcher left"
        );
    }
    swept
}

/// Reaps every exited child; `true` when we have no child at all.
fn reap_exited(swept: &mut Swept) -> bool {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(status) => {
                swept.reaped += 1;
                // Logged as the main loop logs an orphan it reaps: which of
                // the two collects a dying worker is a race.
                let pid = status.pid().map_or(0, |p| p.as_raw());
                tracing::info!(pid, "reaped orphan: {}", crate::describe(status));
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true, // ECHILD
        }
    }
}

/// Our children that have not exited yet (zombies are reaped, not killed).
fn live_children(me: u32) -> Vec<u32> {
    children(me)
        .into_iter()
        .filter(|&(_, state)| state != 'Z' && state != 'X')
        .map(|(pid, _)| pid)
        .collect()
}

/// Pid and state of every process whose parent is `parent`, from `/proc`.
fn children(parent: u32) -> Vec<(u32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (ppid, state) = parent_and_state(&stat)?;
            (ppid == parent).then_some((pid, state))
        })
        .collect()
}

/// The parent pid and state from a `/proc/PID/stat` line. The command name
/// is in parentheses and may hold anything: fields are read after the last `)`.
pub(crate) fn parent_and_state(stat: &str) -> Option<(u32, char)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// The command line of `pid`, for the log.
fn command(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_after_the_command_name() {
        assert_eq!(
            parent_and_state("4242 (sleep) S 17 4242 17 0 -1"),
            Some((17, 'S'))
        );
        // A name with spaces and parentheses cannot shift the fields.
        assert_eq!(
            parent_and_state("4242 (a) Z 3 (b) R 99 1) R 17 4242"),
            Some((17, 'R'))
        );
        assert_eq!(parent_and_state("4242 (cut"), None);
        assert_eq!(parent_and_state(""), None);
    }
}
