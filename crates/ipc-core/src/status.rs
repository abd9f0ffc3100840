//! The status report the dispatcher answers to the `status` operation, as a
//! JSON object (so any language can read it; keys in `docs/PROTOCOL.md`).

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (0 if the clock is before it): the
/// clock of heartbeat stamps and of start times passed between processes.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the dispatcher reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Instance name.
    pub instance: String,
    /// Protocol version served.
    pub protocol_version: u16,
    /// Dispatcher pid.
    pub dispatcher_pid: u32,
    /// Milliseconds since the dispatcher started.
    pub uptime_ms: u64,
    /// The Unix socket path.
    pub socket: String,
    /// The TCP address, if any.
    pub tcp: Option<String>,
    /// The segment.
    pub segment: SegmentStatus,
    /// One entry per worker.
    pub workers: Vec<WorkerStatus>,
    /// Jobs answered successfully.
    pub jobs_done: u64,
    /// Jobs answered with an error.
    pub jobs_failed: u64,
    /// Jobs waiting for a worker.
    pub queue_depth: usize,
    /// Jobs accepted and not yet answered (queued or running).
    pub in_flight: usize,
    /// Client connections open.
    pub connections: usize,
    /// True once shutdown has begun.
    pub shutting_down: bool,
    /// The supervising watchdog, when there is one.
    pub watchdog: Option<WatchdogStatus>,
    /// Jobs written to a worker's pipe while it was still running another
    /// (batching: only when no worker is idle).
    #[serde(default)]
    pub jobs_sent_ahead: u64,
    /// How long jobs took over the last minute.
    #[serde(default)]
    pub latency: LatencyStatus,
    /// The pools, in the configuration's order (the builtin pool first
    /// when it runs); each worker of `workers` names its pool.
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
    /// Jobs their client cancelled (`cancel`), counted in neither
    /// `jobs_done` nor `jobs_failed`.
    #[serde(default)]
    pub jobs_cancelled: u64,
    /// Reloads of the configuration file (absent before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadStatus>,
}

/// The configuration reloads a dispatcher has been asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// Reloads applied.
    pub applied: u64,
    /// Reloads refused (the file did not parse or validate, a new pool
    /// could not start, or a change needs a restart).
    pub refused: u64,
    /// The last one's answer: its summary, or why it was refused.
    pub last: String,
    /// Workers of replaced or removed pools still finishing their jobs.
    pub retiring_workers: usize,
}

/// One pool: what it runs, what it serves, what its workers did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    /// `builtin`, `program` or `exec`.
    pub kind: String,
    /// The program its workers run (exec: the command run per job), with its arguments.
    pub program: Vec<String>,
    /// The operations it serves (empty until its first worker is ready).
    pub ops: Vec<String>,
    /// Workers configured.
    pub workers: usize,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    /// Workers replaced after they died, hung or broke protocol.
    pub restarts: u64,
    /// Workers replaced by policy, between jobs (`recycle_after_jobs`,
    /// `recycle_above_rss_mib`); not counted in `restarts`.
    pub recycled: u64,
    /// Of `recycled`, those replaced for their memory (`recycle_above_rss_mib`).
    #[serde(default)]
    pub recycled_above_rss: u64,
    pub queue_depth: usize,
    pub job_timeout_ms: u64,
    pub max_attempts: u8,
    /// The largest result a job may return, in bytes.
    pub max_result: u64,
    /// Its workers' memory limit in MiB (`memory_limit_mib`), if any.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// How the limit is enforced (`RLIMIT_DATA`), when there is one.
    #[serde(default)]
    pub memory_limit_by: Option<String>,
    /// Jobs answered `out of memory` (past the limit).
    #[serde(default)]
    pub out_of_memory: u64,
    /// Why its first worker could not start, while none has.
    pub start_failure: Option<String>,
    /// Its own segment: its workers map it and no other.
    #[serde(default)]
    pub segment: Option<SegmentStatus>,
    /// Whom its workers run as, when set (`user`, `group`); else the
    /// dispatcher's own uid.
    #[serde(default)]
    pub run_as: Option<RunAsStatus>,
}

/// Whom a pool's workers run as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAsStatus {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
}

/// Job latency percentiles over a recent window: from the moment a request
/// (header and payload) was read to the moment its answer was ready, queueing
/// included; failed jobs count too. Requests the dispatcher answers itself
/// (`status`, refusals) do not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyStatus {
    /// The window, in seconds (60).
    pub window_s: u64,
    /// Jobs answered in the window.
    pub count: u64,
    /// Median, in microseconds (0 when `count` is 0); percentiles are
    /// rounded up to their histogram bucket's top, at most 6.25% high.
    pub p50_us: u64,
    /// 90th percentile, in microseconds.
    pub p90_us: u64,
    /// 99th percentile, in microseconds.
    pub p99_us: u64,
    /// Slowest, in microseconds.
    pub max_us: u64,
}

/// What the watchdog told the dispatcher at its start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchdogStatus {
    /// The watchdog's pid.
    pub pid: u32,
    /// How many times the watchdog restarted the dispatcher before this one.
    pub restarts: u64,
    /// Why the last restart happened (empty before the first).
    pub last_restart_cause: String,
    /// Milliseconds since the watchdog started.
    #[serde(default)]
    pub uptime_ms: u64,
}

/// The segment as seen by its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentStatus {
    /// Backend (`posix`).
    pub backend: String,
    /// Name, e.g. `/osps-1000-default`.
    pub name: String,
    /// Where to see it, e.g. `/dev/shm/osps-1000-default`.
    pub path: String,
    /// Total size in bytes.
    pub size: u64,
    /// Generation (bumped each time a dispatcher rebuilds it).
    pub generation: u64,
    /// Jobs the workers ran to the end in this segment (any outcome, retries
    /// included), as counted by the workers in its header.
    #[serde(default)]
    pub jobs_run: u64,
    /// Slots allocated.
    pub slots_in_use: usize,
    /// Bytes allocated in slots.
    pub slot_bytes_in_use: u64,
    /// Largest payload accepted.
    pub max_payload: u64,
    /// Permission bits, octal (e.g. `0600`).
    pub mode: String,
    /// Owner's uid.
    pub owner_uid: u32,
    /// Processes that have it mapped (the dispatcher and its live workers).
    pub attached: usize,
    /// A command that shows it with the system's own tools.
    pub see: String,
}

/// One worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Pool index.
    pub index: usize,
    /// Current pid (0 while (re)starting).
    pub pid: u32,
    /// `starting`, `idle`, `busy` or `stopped`.
    pub state: WorkerState,
    /// Jobs this pool slot has completed successfully.
    pub jobs_done: u64,
    /// Times this worker was replaced after dying or timing out.
    pub restarts: u64,
    /// Jobs of this pool slot that ended in an error: answered with one by
    /// the worker, or lost with a worker that died or timed out on them.
    #[serde(default)]
    pub jobs_failed: u64,
    /// Milliseconds since the current process started (0 while starting).
    #[serde(default)]
    pub uptime_ms: u64,
    /// How the previous process of this slot ended, and why (empty before
    /// the first restart), e.g. `killed by signal 9 (SIGKILL): job timed out`.
    #[serde(default)]
    pub last_exit: String,
    /// The pool it belongs to.
    #[serde(default)]
    pub pool: String,
}

/// Where one worker of the pool stands, serialised as the lower-case string
/// the status report has always carried (`"starting"`, `"idle"`, `"busy"`,
/// `"stopped"`). `Copy`, so the dispatcher keeps it in a `Cell` and changes it
/// without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Its process is being started (or restarted); it takes no job yet.
    #[default]
    Starting,
    /// Up and waiting for a job.
    Idle,
    /// Running a job (maybe with more sent ahead).
    Busy,
    /// Ended for good: the dispatcher is shutting down.
    Stopped,
}

impl WorkerState {
    /// Every state, in the order a worker goes through them.
    pub const ALL: [WorkerState; 4] = [
        WorkerState::Starting,
        WorkerState::Idle,
        WorkerState::Busy,
        WorkerState::Stopped,
    ];

    /// The name in the status report.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Stopped => "stopped",
        }
    }

    /// Up: its process runs and has the segment mapped (idle or busy).
    pub fn is_up(self) -> bool {
        matches!(self, WorkerState::Idle | WorkerState::Busy)
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for WorkerState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for WorkerState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_states_serialise_as_the_strings_of_the_status_report() {
        let table = [
            (WorkerState::Starting, "\"starting\""),
            (WorkerState::Idle, "\"idle\""),
            (WorkerState::Busy, "\"busy\""),
            (WorkerState::Stopped, "\"stopped\""),
        ];
        for (state, json) in table {
            assert_eq!(serde_json::to_string(&state).unwrap(), json, "{state:?}");
            assert_eq!(serde_json::from_str::<WorkerState>(json).unwrap(), state);
            assert_eq!(format!("\"{state}\""), json);
            assert!(state == json.trim_matches('"'));
        }
        assert_eq!(WorkerState::ALL.len(), table.len());
        assert!(serde_json::from_str::<WorkerState>("\"Idle\"").is_err());
    }

    #[test]
    fn only_idle_and_busy_workers_are_up() {
        let up: Vec<_> = WorkerState::ALL.into_iter().filter(|s| s.is_up()).collect();
        assert_eq!(up, [WorkerState::Idle, WorkerState::Busy]);
    }

    #[test]
    fn a_worker_entry_reads_and_writes_the_same_json_as_before() {
        let json = r#"{"index":0,"pid":14526,"state":"idle","jobs_done":31,"restarts":0}"#;
        let w: WorkerStatus = serde_json::from_str(json).unwrap();
        assert_eq!(w.state, WorkerState::Idle);
        let back = serde_json::to_value(&w).unwrap();
        assert_eq!(back["state"], "idle");
    }
}
