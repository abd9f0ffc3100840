//! A pool's memory limit (`memory_limit_mib`): what the dispatcher and the
//! worker launcher agree on. The dispatcher starts a limited pool's worker
//! as `osps-worker --contain-memory BYTES -- PROGRAM ARGS...`
//! ([`CONTAIN_FLAG`]); the launcher lowers its own `RLIMIT_DATA` to BYTES
//! and execs the program, so the limit holds from the program's first
//! instruction (and for the commands an exec pool's worker runs).
//!
//! `RLIMIT_DATA` (Linux 4.7 and later) counts the heap (`brk`) and every
//! private writable mapping, and not shared mappings: the OSPS segment a
//! worker maps does not count against it, where it would count against
//! `RLIMIT_AS`. A worker past it fails to allocate: a Rust program prints
//! `memory allocation of N bytes failed` and aborts, a Python one raises
//! `MemoryError`, a C++ one throws `std::bad_alloc`
//! ([`is_allocation_failure`] knows these lines).
//!
//! Where the dispatcher may make memory cgroups (`crate::cgroup`), each
//! such worker also runs in a cgroup of its own with the same limit
//! (`--contain-cgroup DIR`): that one counts everything the worker and its
//! children take, shared mappings and tmpfs pages included, and the
//! kernel's OOM killer ends a process of that cgroup alone past it.

/// The launcher's flag for a memory limit (an `osps-worker` command line
/// that starts with it, or with [`SESSION_FLAG`], is the launcher's).
pub const CONTAIN_FLAG: &str = "--contain-memory";

/// The launcher's flag for a worker of another uid (a pool's `user`): a
/// session of its own (no controlling terminal: it cannot push input into
/// one with `TIOCSTI`), `PR_SET_NO_NEW_PRIVS` (no setuid program raises
/// its privileges) and no descriptor inherited past stdin, stdout and
/// stderr.
pub const SESSION_FLAG: &str = "--contain-session";

/// The launcher's flag for a worker cgroup (`crate::cgroup`): the
/// dispatcher moves the launcher into the cgroup DIR the flag names, the
/// launcher waits until it is inside, then runs the program with
/// [`crate::env::MEMORY_CGROUP`] set to DIR.
pub const CGROUP_FLAG: &str = "--contain-cgroup";

/// The smallest limit a pool takes, in MiB: an idle `osps-worker` has about
/// 3 MiB of data, with a thread 5, a Python worker 8.
pub const MIN_MIB: u64 = 16;
/// The largest limit a pool takes, in MiB (1 TiB).
pub const MAX_MIB: u64 = 1 << 20;

/// How a pool's memory limit is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `setrlimit(RLIMIT_DATA)` in the worker before it runs.
    RlimitData,
    /// A cgroup v1 of its own, with `memory.limit_in_bytes` (`crate::cgroup`).
    CgroupV1,
    /// A cgroup v2 of its own, with `memory.max` (`crate::cgroup`).
    CgroupV2,
}

impl Mechanism {
    /// As status and messages show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::RlimitData => "RLIMIT_DATA",
            Mechanism::CgroupV1 => "cgroup v1 memory.limit_in_bytes",
            Mechanism::CgroupV2 => "cgroup v2 memory.max",
        }
    }
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a `memory_limit_mib` value (flag or key): at least [`MIN_MIB`],
/// at most [`MAX_MIB`]; the refusal says why.
pub fn parse_limit_mib(text: &str) -> Result<u64, String> {
    let mib: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a whole number of MiB, got {text:?}"))?;
    match mib {
        0 => Err(format!(
            "0 MiB would leave a worker no memory at all; give at least {MIN_MIB} (or no limit: leave it out)"
        )),
        m if m < MIN_MIB => Err(format!(
            "{m} MiB is too small for a worker to start (its own code, thread stacks and buffers take a few MiB, a Python worker about 8); give at least {MIN_MIB}"
        )),
        m if m > MAX_MIB => Err(format!("{m} MiB is more than {MAX_MIB} (1 TiB)")),
        m => Ok(m),
    }
}

/// Whether a line a worker (or its command) wrote to stderr says an
/// allocation failed: Rust's `memory allocation of N bytes failed`,
/// Python's `MemoryError` (a traceback's last line), C++'s
/// `std::bad_alloc`.
pub fn is_allocation_failure(line: &str) -> bool {
    let line = line.trim();
    (line.starts_with("memory allocation of ") && line.ends_with(" bytes failed"))
        || line == "MemoryError"
        || line.starts_with("MemoryError:")
        || line.contains("std::bad_alloc")
}

/// The message of the error a job past its pool's limit gets, of kind
/// `OutOfMemory` (shown `out of memory: ` first, so the message does not
/// say it again); `who` went past it ("the job", "the command"), `pool`
/// is its name, when known.
pub fn out_of_memory_message(who: &str, pool: Option<&str>, mib: u64, by: Mechanism) -> String {
    let whose = pool.map_or("the pool's".to_owned(), |p| format!("pool \"{p}\"'s"));
    format!("{who} went past {whose} memory limit of {mib} MiB ({by})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_below_the_floor_or_zero_are_refused_with_a_reason() {
        assert_eq!(parse_limit_mib("64"), Ok(64));
        assert_eq!(parse_limit_mib("16"), Ok(16));
        assert!(parse_limit_mib("0")
            .unwrap_err()
            .contains("no memory at all"));
        assert!(parse_limit_mib("4").unwrap_err().contains("too small"));
        assert!(parse_limit_mib("x").is_err());
        assert!(parse_limit_mib(&(MAX_MIB + 1).to_string()).is_err());
    }

    #[test]
    fn allocation_failures_are_known_by_their_lines() {
        let yes = [
            "memory allocation of 1073741824 bytes failed",
            "MemoryError",
            "MemoryError: out of memory",
            "terminate called after throwing an instance of 'std::bad_alloc'",
        ];
        for line in yes {
            assert!(is_allocation_failure(line), "{line}");
        }
        let no = [
            "memory allocation",
            "Traceback (most recent call last):",
            "",
        ];
        for line in no {
            assert!(!is_allocation_failure(line), "{line}");
        }
    }

    #[test]
    fn the_message_names_the_limit_and_how() {
        assert_eq!(
            out_of_memory_message("the job", Some("p"), 64, Mechanism::RlimitData),
            "the job went past pool \"p\"'s memory limit of 64 MiB (RLIMIT_DATA)"
        );
        assert_eq!(
            out_of_memory_message("the command", None, 16, Mechanism::RlimitData),
            "the command went past the pool's memory limit of 16 MiB (RLIMIT_DATA)"
        );
    }
}
