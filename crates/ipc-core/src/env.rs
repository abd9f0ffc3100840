//! The environment contract between the OSPS processes: every `OSPS_*`
//! variable one process sets (or a user sets) and another reads, named once
//! here so both sides agree.
//!
//! The watchdog tells the dispatcher it starts about itself through
//! [`WatchdogEnv`]; the dispatcher and the watchdog pass their log format on
//! to the processes they start ([`LOG_FORMAT`]); the others are read from
//! the user's environment as defaults of command-line options.

use crate::status::WatchdogStatus;

/// The supervising watchdog's pid (set by the watchdog for the dispatcher).
pub const WATCHDOG_PID: &str = "OSPS_WATCHDOG_PID";
/// How many times the watchdog restarted the dispatcher before this one.
pub const RESTARTS: &str = "OSPS_RESTARTS";
/// Why the last restart happened (empty before the first).
pub const LAST_RESTART_CAUSE: &str = "OSPS_LAST_RESTART_CAUSE";
/// When the watchdog started, in milliseconds since the Unix epoch.
pub const WATCHDOG_STARTED_MS: &str = "OSPS_WATCHDOG_STARTED_MS";
/// The watchdog's restarts of the dispatcher so far by cause, for metrics:
/// comma-separated `cause=count` pairs, causes among `crashed`, `hung`,
/// `killed`, `exited` (e.g. `crashed=3,hung=1`); unset before the first.
pub const DISPATCHER_RESTARTS: &str = "OSPS_DISPATCHER_RESTARTS";
/// The causes [`DISPATCHER_RESTARTS`] names, in the order it writes them.
pub const DISPATCHER_RESTART_CAUSES: [&str; 4] = ["crashed", "hung", "killed", "exited"];
/// `systemd` when the listening sockets the watchdog hands on are systemd's
/// (`ipc_core::activation`); unset when the watchdog bound them.
pub const SOCKET_HOLDER: &str = "OSPS_SOCKET_HOLDER";
/// The log format (`text` or `json`), passed on to child processes.
pub const LOG_FORMAT: &str = "OSPS_LOG_FORMAT";
/// The instance name (default of `--instance`).
pub const INSTANCE: &str = "OSPS_INSTANCE";
/// The base runtime directory (default of `--runtime-dir`).
pub const RUNTIME_DIR: &str = "OSPS_RUNTIME_DIR";
/// The client's token file (default of `osps-client --token-file`).
pub const TOKEN_FILE: &str = "OSPS_TOKEN_FILE";
/// A uid the client also trusts to serve (default of `osps-client --server-uid`).
pub const SERVER_UID: &str = "OSPS_SERVER_UID";
/// The segment a worker opens (set by the dispatcher for every worker; the
/// default of the worker's `--segment`).
pub const SEGMENT: &str = "OSPS_SEGMENT";
/// The dispatcher's pid, for a worker to die with (default of `--parent-pid`).
pub const PARENT_PID: &str = "OSPS_PARENT_PID";
/// The memory cgroup a worker runs in (`crate::cgroup`), set by its
/// launcher: where a command pool's worker reads the OOM kills of its
/// commands. Unset without a memory cgroup.
pub const MEMORY_CGROUP: &str = "OSPS_MEMORY_CGROUP";
/// `1` when the worker may serve fault-injection operations (default of
/// `--allow-fault-injection`).
pub const ALLOW_FAULT_INJECTION: &str = "OSPS_ALLOW_FAULT_INJECTION";

/// What the watchdog tells the dispatcher it starts, as environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchdogEnv {
    /// The watchdog's pid.
    pub pid: u32,
    /// Restarts before this dispatcher.
    pub restarts: u64,
    /// Why the last restart happened (empty before the first).
    pub last_restart_cause: String,
    /// When the watchdog started (milliseconds since the Unix epoch).
    pub started_unix_ms: Option<u64>,
}

impl WatchdogEnv {
    /// The variables to set on the dispatcher's command.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            (WATCHDOG_PID, self.pid.to_string()),
            (RESTARTS, self.restarts.to_string()),
            (LAST_RESTART_CAUSE, self.last_restart_cause.clone()),
        ];
        if let Some(ms) = self.started_unix_ms {
            vars.push((WATCHDOG_STARTED_MS, ms.to_string()));
        }
        vars
    }

    /// Reads them back through `get` (a variable's value, if set); `None`
    /// without a readable watchdog pid (not started by a watchdog). A
    /// missing or unreadable restart count is 0.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Option<WatchdogEnv> {
        let pid = get(WATCHDOG_PID)?.parse().ok()?;
        Some(WatchdogEnv {
            pid,
            restarts: get(RESTARTS).and_then(|r| r.parse().ok()).unwrap_or(0),
            last_restart_cause: get(LAST_RESTART_CAUSE).unwrap_or_default(),
            started_unix_ms: get(WATCHDOG_STARTED_MS).and_then(|t| t.parse().ok()),
        })
    }

    /// Reads them from this process's environment.
    pub fn from_env() -> Option<WatchdogEnv> {
        WatchdogEnv::from_lookup(|name| std::env::var(name).ok())
    }

    /// The watchdog as the status report shows it (uptime filled in later).
    pub fn status(&self) -> WatchdogStatus {
        WatchdogStatus {
            pid: self.pid,
            restarts: self.restarts,
            last_restart_cause: self.last_restart_cause.clone(),
            uptime_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&'static str, String)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_watchdog_environment_round_trips() {
        let cases = [
            WatchdogEnv {
                pid: 4242,
                restarts: 0,
                last_restart_cause: String::new(),
                started_unix_ms: Some(1_764_000_000_000),
            },
            WatchdogEnv {
                pid: 7,
                restarts: 3,
                last_restart_cause: "hang (3 heartbeats missed); killed by SIGKILL".into(),
                started_unix_ms: None,
            },
        ];
        for env in cases {
            assert_eq!(
                WatchdogEnv::from_lookup(lookup(&env.vars())),
                Some(env.clone())
            );
        }
    }

    #[test]
    fn reading_tolerates_what_a_user_may_have_set() {
        type Vars = &'static [(&'static str, &'static str)];
        let table: [(Vars, Option<(u32, u64)>); 4] = [
            (&[], None),
            (&[(WATCHDOG_PID, "x")], None),
            (&[(WATCHDOG_PID, "9")], Some((9, 0))),
            (&[(WATCHDOG_PID, "9"), (RESTARTS, "many")], Some((9, 0))),
        ];
        for (vars, want) in table {
            let vars: Vec<_> = vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
            let got = WatchdogEnv::from_lookup(lookup(&vars)).map(|e| (e.pid, e.restarts));
            assert_eq!(got, want, "{vars:?}");
        }
    }

    #[test]
    fn every_name_is_an_osps_variable_and_unique() {
        let names = [
            WATCHDOG_PID,
            RESTARTS,
            LAST_RESTART_CAUSE,
            WATCHDOG_STARTED_MS,
            LOG_FORMAT,
            INSTANCE,
            RUNTIME_DIR,
            TOKEN_FILE,
            SERVER_UID,
        ];
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        assert!(names.iter().all(|n| n.starts_with("OSPS_")));
    }
}
