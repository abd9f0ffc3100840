//! `osps-dispatcher`: the primary server. Parses arguments, starts logging,
//! and runs the dispatcher library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Serves OSPS jobs to clients over a Unix socket, running them on a pool of workers.
#[derive(Debug, Parser)]
#[command(name = "osps-dispatcher", version)]
struct Args {
    /// Log lines: text for people, json (one object per line) for machines. Filter with RUST_LOG.
    #[arg(long, env = "OSPS_LOG_FORMAT", default_value = "text")]
    log_format: ipc_core::logging::LogFormat,
    /// Instance name: the socket, lock file and segment names contain it.
    #[arg(long, env = "OSPS_INSTANCE", default_value = "default")]
    instance: String,
    /// Base runtime directory [default: $XDG_RUNTIME_DIR/osps, else /tmp/osps-<uid>].
    #[arg(long, env = "OSPS_RUNTIME_DIR")]
    runtime_dir: Option<PathBuf>,
    /// Number of workers [default: number of CPUs].
    #[arg(long)]
    workers: Option<usize>,
    /// Per-job timeout in milliseconds; a worker past it is killed and replaced.
    #[arg(long, default_value_t = 30_000)]
    job_timeout_ms: u64,
    /// How long shutdown waits for in-flight jobs, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    drain_timeout_ms: u64,
    /// Deadline for a client's handshake, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Deadline to receive the rest of a request (header and payload) once it has begun, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    frame_timeout_ms: u64,
    /// Close a connection that sends no request for this many milliseconds.
    #[arg(long, default_value_t = 300_000)]
    idle_timeout_ms: u64,
    /// Clients served at once on the Unix socket; more are refused with a clear message. A uid admitted only by --allow-uid holds at most half. Clamped to what the open-file limit allows.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Clients served at once on the TCP listener, a budget of its own [default: --max-connections].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_tcp_connections: Option<u64>,
    /// Drop a client that takes no byte of its replies for this many milliseconds (its slots are freed); a slow but steady reader is never dropped.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    write_timeout_ms: u64,
    /// Percent of the slot arena one connection may hold at once (at least one largest request); beyond, only that connection waits.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=100))]
    conn_arena_percent: u64,
    /// Percent of the slot arena one peer (a uid on the Unix socket, an address on TCP) may hold at once in large slots.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..=100))]
    peer_arena_percent: u64,
    /// Requests one connection may have in flight; beyond, the dispatcher stops reading it.
    #[arg(long, default_value_t = 128)]
    max_in_flight: usize,
    /// Also admit this uid on the Unix socket (repeatable); our own uid and root always are.
    #[arg(long = "allow-uid")]
    allow_uid: Vec<u32>,
    /// The shared segment's backend: posix (shm_open, under /dev/shm) or sysv (shmget, listed by ipcs -m).
    #[arg(long, value_parser = ["posix", "sysv"], default_value = "posix")]
    segment: String,
    /// Size of the shared segment's slot arena, in MiB.
    #[arg(long, default_value_t = 256)]
    segment_mib: u64,
    /// Largest payload accepted, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_payload: u64,
    /// Largest request header frame accepted, in bytes.
    #[arg(long, default_value_t = ipc_core::frame::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Also listen on this TCP address, e.g. 127.0.0.1:7070 (loopback unless --tcp-allow-remote).
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// Allow a non-loopback --tcp address; requires --token-file.
    #[arg(long)]
    tcp_allow_remote: bool,
    /// TCP clients must present the token in this file (mode 0600, owned by this user) in their hello.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Enable the fault-injection operation `crash` (for tests and demos).
    #[arg(long)]
    allow_fault_injection: bool,
    /// The worker program [default: osps-worker beside this program, else from PATH].
    #[arg(long)]
    worker_exe: Option<PathBuf>,
}

/// What `osps-watchdog` passes in the environment when it starts us.
fn watchdog_from_env() -> Option<ipc_core::status::WatchdogStatus> {
    let pid = std::env::var("OSPS_WATCHDOG_PID").ok()?.parse().ok()?;
    Some(ipc_core::status::WatchdogStatus {
        pid,
        restarts: std::env::var("OSPS_RESTARTS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
        last_restart_cause: std::env::var("OSPS_LAST_RESTART_CAUSE").unwrap_or_default(),
        uptime_ms: 0,
    })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _span = ipc_core::logging::init("dispatcher", args.log_format);
    let mut config = dispatcher::Config::new(&args.instance);
    config.runtime_dir = args.runtime_dir;
    if let Some(n) = args.workers {
        config.workers = n;
    }
    config.job_timeout_ms = args.job_timeout_ms;
    config.drain_timeout_ms = args.drain_timeout_ms;
    config.handshake_timeout_ms = args.handshake_timeout_ms;
    config.frame_timeout_ms = args.frame_timeout_ms;
    config.idle_timeout_ms = args.idle_timeout_ms;
    config.max_connections = args.max_connections;
    config.max_tcp_connections = args.max_tcp_connections.map(|n| n as usize);
    config.write_timeout_ms = args.write_timeout_ms;
    config.conn_arena_percent = args.conn_arena_percent;
    config.peer_arena_percent = args.peer_arena_percent;
    config.max_in_flight = args.max_in_flight;
    config.allow_uids = args.allow_uid;
    config.segment_mib = args.segment_mib;
    config.backend = args.segment.parse().expect("clap checked the value");
    config.max_payload = args.max_payload;
    config.max_frame = args.max_frame;
    config.tcp = args.tcp;
    config.tcp_allow_remote = args.tcp_allow_remote;
    config.token_file = args.token_file;
    config.allow_fault_injection = args.allow_fault_injection;
    if let Some(exe) = args.worker_exe {
        config.worker_exe = exe;
    }
    config.watchdog = watchdog_from_env();
    config.watchdog_started_unix_ms = std::env::var("OSPS_WATCHDOG_STARTED_MS")
        .ok()
        .and_then(|t| t.parse().ok());
    match dispatcher::run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("osps-dispatcher: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
