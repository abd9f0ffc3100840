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

/// The children of process `parent` now.
pub fn children_of(parent: u32) -> Vec<Child> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
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
        })
        .collect()
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
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found.iter().any(|c| c.pid == child.id() && !c.zombie),
            "the sleep is our child: {found:?}"
        );
    }
}
