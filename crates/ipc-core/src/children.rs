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

/// The children of process `parent` now: from the kernel's list of each
/// of its threads' children (`/proc/PID/task/TID/children`, a few small
/// reads), else, where the kernel does not keep it, from a scan of every
/// process's parent.
pub fn children_of(parent: u32) -> Vec<Child> {
    let pids = listed_children(parent).unwrap_or_else(|| scanned_children(parent));
    pids.into_iter().filter_map(|pid| child(pid, parent)).collect()
}

/// The pids the kernel lists as `parent`'s threads' children.
fn listed_children(parent: u32) -> Option<Vec<u32>> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{parent}/task")).ok()?.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).ok()?;
        pids.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    Some(pids)
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
