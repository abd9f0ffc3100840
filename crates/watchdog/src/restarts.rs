//! The dispatcher's restarts counted by cause, told to each dispatcher
//! started in `OSPS_DISPATCHER_RESTARTS` ([`ipc_core::env::DISPATCHER_RESTARTS`]):
//! `crashed=3,hung=1`, the causes with a count in this order, for metrics.

// The causes, in the order they are written.
use ipc_core::env::DISPATCHER_RESTART_CAUSES as CAUSES;

/// The class of a restart, from the supervisor's own words for it
/// ([`crate::policy`]): `hang ...` is `hung`; `crash: killed by SIGKILL`
/// (or another signal that ends a process from outside) is `killed`; a
/// crash by another signal, or a failed start, `crashed`; `crash: exit
/// status N`, `exited`.
pub fn class(cause: &str) -> &'static str {
    const FROM_OUTSIDE: [&str; 4] = ["SIGKILL", "SIGTERM", "SIGINT", "SIGHUP"];
    if cause.starts_with("hang") {
        "hung"
    } else if cause.contains("exit status") {
        "exited"
    } else if FROM_OUTSIDE
        .iter()
        .any(|s| cause.contains(&format!("killed by {s}")))
    {
        "killed"
    } else {
        "crashed"
    }
}

/// Restarts so far by cause.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restarts([u64; 4]);

impl Restarts {
    /// Counts a restart for `cause` (the supervisor's words).
    pub fn count(&mut self, cause: &str) {
        let class = class(cause);
        if let Some(i) = CAUSES.iter().position(|&c| c == class) {
            self.0[i] += 1;
        }
    }

    /// The variable's value; `None` before the first restart.
    pub fn value(&self) -> Option<String> {
        let pairs: Vec<String> = CAUSES
            .iter()
            .zip(self.0)
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| format!("{c}={n}"))
            .collect();
        (!pairs.is_empty()).then(|| pairs.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_are_counted_by_cause_in_the_agreed_format() {
        let mut r = Restarts::default();
        assert_eq!(r.value(), None);
        for cause in [
            "crash: killed by SIGSEGV (core dumped)",
            "hang (3 heartbeats missed); killed by SIGKILL",
            "crash: killed by SIGKILL",
            "crash: killed by SIGKILL",
            "crash: exit status 1",
            "could not start: No such file or directory (os error 2)",
        ] {
            r.count(cause);
        }
        assert_eq!(r.value().unwrap(), "crashed=2,hung=1,killed=2,exited=1");
        let mut only = Restarts::default();
        only.count("hang (0 heartbeats missed); killed by SIGKILL");
        assert_eq!(only.value().unwrap(), "hung=1");
    }
}
