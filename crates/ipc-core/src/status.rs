//! The status report the dispatcher answers to the `status` operation, as a
//! JSON object (so any language can read it; keys in `docs/PROTOCOL.md`).

use serde::{Deserialize, Serialize};

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
    pub state: String,
    /// Jobs this pool slot has completed.
    pub jobs_done: u64,
    /// Times this worker was replaced after dying or timing out.
    pub restarts: u64,
}
