//! The children of a process, from `/proc`: how a child subreaper (the
//! dispatcher for its workers' trees, a command pool's worker for its
//! commands') finds the processes that were left to it.

/// A child process, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    pub pid: u32,
    /// Its process group.
    pub pgid: u32,
    /// Dead, not yet reaped.
    pub zombie: bool,
}

/// The children of process `parent` now: from the kernel's lists of the
/// children of its main thread and, when `parent` is this process, of the
/// calling thread (`/proc/PID/task/TID/children`: one or two small reads),
/// else, where the kernel keeps no such list, from a scan of every
/// process's parent. A child belongs to the thread that forked it, and
/// what is left to a child subreaper to the thread that forked its
/// ancestor: the OSPS processes that use this fork from their main thread.
pub fn children_of(parent: u32) -> Vec<Child> {
    let pids = listed_children(parent).unwrap_or_else(|| scanned_children(parent));
    pids.into_iter()
        .filter_map(|pid| child(pid, parent))
        .collect()
}

/// The pids the kernel lists as the children of `parent`'s main thread;
/// `None` if it keeps no such list (no `CONFIG_PROC_CHILDREN`).
fn listed_children(parent: u32) -> Option<Vec<u32>> {
    let read = |tid: u32| std::fs::read_to_string(format!("/proc/{parent}/task/{tid}/children"));
    let mut list = read(parent).ok()?;
    let me = nix::unistd::gettid().as_raw() as u32;
    if parent == std::process::id() && me != parent {
        list.push(' ');
        list.push_str(&read(me).unwrap_or_default());
    }
    Some(
        list.split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .collect(),
    )
}

/// Every process's pid, for a scan.
fn scanned_children(_parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// Process `pid`, if it is (still) a child of `parent`.
fn child(pid: u32, parent: u32) -> Option<Child> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may hold spaces: fields after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 2..].split(' ');
    let state = fields.next()?;
    let ppid: u32 = fields.next()?.parse().ok()?;
    let pgid: u32 = fields.next()?.parse().ok()?;
    (ppid == parent).then_some(Child {
        pid,
        pgid,
        zombie: state == "Z",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_are_found_by_their_parent() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let found = children_of(std::process::id());
        // The scan finds it too (where the kernel keeps no list).
        let scanned = scanned_children(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found.iter().any(|c| c.pid == child.id() && !c.zombie),
            "the sleep is our child: {found:?}"
        );
        assert!(scanned.contains(&child.id()));
    }
}
