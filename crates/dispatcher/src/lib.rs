//! The OSPS dispatcher (primary server): takes the instance lock, builds the
//! shared segment, starts the worker pool, accepts clients on a Unix socket
//! (and optionally TCP on loopback), schedules their jobs on idle workers,
//! answers `status` itself, and on SIGTERM/SIGINT shuts down in order.
//!
//! It runs on one thread (a current-thread tokio runtime): the segment handle
//! is not `Send`, and one thread is plenty to move descriptors around while
//! the workers do the work.

mod admission;
mod conn;
mod latency;
mod pool;
mod shared;
mod slots;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use ipc_core::{segment, InstanceLock, LockError, PathError, RuntimePaths, SegmentError};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::shared::Shared;
use crate::slots::RESULT_RESERVE;

const MIB: u64 = 1 << 20;
/// Delay before the segment is prefaulted: out of start-up, so out of recovery time.
const POPULATE_AFTER: Duration = Duration::from_millis(200);

/// Everything the dispatcher is told at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Instance name.
    pub instance: String,
    /// Base runtime directory (default: `$XDG_RUNTIME_DIR/osps` or `/tmp/osps-<uid>`).
    pub runtime_dir: Option<PathBuf>,
    /// Number of workers.
    pub workers: usize,
    /// Per-job timeout.
    pub job_timeout_ms: u64,
    /// How long shutdown waits for in-flight jobs.
    pub drain_timeout_ms: u64,
    /// Deadline for a client's hello.
    pub handshake_timeout_ms: u64,
    /// Deadline to receive the rest of a frame (and its payload) once its first byte came.
    pub frame_timeout_ms: u64,
    /// A connection with no request for this long is closed.
    pub idle_timeout_ms: u64,
    /// Clients admitted at once on the Unix socket; more are refused with a clear message.
    pub max_connections: usize,
    /// Clients admitted at once on the TCP listener (its own budget); `None`: as `max_connections`.
    pub max_tcp_connections: Option<usize>,
    /// A client that takes no byte of its replies for this long is dropped (a slow but steady reader never is).
    pub write_timeout_ms: u64,
    /// Share of the slot arena (percent) one connection may hold at once.
    pub conn_arena_percent: u64,
    /// Share of the slot arena (percent) one peer (uid, or TCP address) may hold at once in large slots.
    pub peer_arena_percent: u64,
    /// Requests one connection may have in flight (back-pressure beyond).
    pub max_in_flight: usize,
    /// Uids admitted on the Unix socket besides our own and root's (checked with SO_PEERCRED).
    pub allow_uids: Vec<u32>,
    /// Size of the slot arena in MiB.
    pub segment_mib: u64,
    /// The segment's backend: POSIX (`/dev/shm`) or System V (`ipcs -m`).
    pub backend: ipc_core::Backend,
    /// Largest payload accepted, in bytes.
    pub max_payload: u64,
    /// Largest request frame (header) accepted, in bytes.
    pub max_frame: usize,
    /// Also listen on this TCP address (loopback, unless `tcp_allow_remote`).
    pub tcp: Option<SocketAddr>,
    /// Allow a non-loopback `tcp` address (then `token_file` is required).
    pub tcp_allow_remote: bool,
    /// TCP clients must present the token in this file (mode 0600) in their hello.
    pub token_file: Option<PathBuf>,
    /// Allow the `crash` operation.
    pub allow_fault_injection: bool,
    /// The worker program.
    pub worker_exe: PathBuf,
    /// The watchdog that started us, if any: we stop (SIGTERM) when it dies.
    pub watchdog: Option<ipc_core::status::WatchdogStatus>,
    /// When that watchdog started (milliseconds since the Unix epoch).
    pub watchdog_started_unix_ms: Option<u64>,
}

impl Config {
    /// Defaults for `instance`, with the worker found beside this program.
    pub fn new(instance: &str) -> Config {
        Config {
            instance: instance.to_owned(),
            runtime_dir: None,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            job_timeout_ms: 30_000,
            drain_timeout_ms: 5_000,
            handshake_timeout_ms: 10_000,
            frame_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            max_connections: 1024,
            max_tcp_connections: None,
            write_timeout_ms: 10_000,
            conn_arena_percent: 25,
            peer_arena_percent: 75,
            max_in_flight: 128,
            allow_uids: Vec::new(),
            segment_mib: 256,
            backend: ipc_core::Backend::Posix,
            max_payload: 64 * MIB,
            max_frame: ipc_core::frame::DEFAULT_MAX_FRAME,
            tcp: None,
            tcp_allow_remote: false,
            token_file: None,
            allow_fault_injection: false,
            worker_exe: default_worker_exe(),
            watchdog: None,
            watchdog_started_unix_ms: None,
        }
    }
}

impl Config {
    /// The TCP listener's connection budget.
    pub fn tcp_connections(&self) -> usize {
        self.max_tcp_connections.unwrap_or(self.max_connections)
    }
}

/// `osps-worker` beside the running program, else from `PATH`.
pub fn default_worker_exe() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("osps-worker")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("osps-worker"))
}

/// Why the dispatcher could not run.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error(transparent)]
    Paths(#[from] PathError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Start(#[from] ipc_core::start::StartError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the dispatcher until SIGTERM or SIGINT; returns after an ordered shutdown.
pub fn run(config: Config) -> Result<(), DispatcherError> {
    check(&config)?;
    if let Some(w) = &config.watchdog {
        // Follow the watchdog: if it dies, stop in order (SIGTERM), so a
        // supervisor's death never leaves an unsupervised server behind.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(|e| {
            DispatcherError::Config(format!("cannot set the parent-death signal: {e}"))
        })?;
        let parent = nix::unistd::getppid().as_raw();
        if parent != w.pid as i32 {
            return Err(DispatcherError::Config(format!(
                "the watchdog (pid {}) that started this dispatcher is gone",
                w.pid
            )));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(config))
}

fn check(c: &Config) -> Result<(), DispatcherError> {
    let bad = |m: String| Err(DispatcherError::Config(m));
    if c.workers == 0 {
        return bad("--workers must be at least 1".into());
    }
    if c.max_connections == 0 || c.max_in_flight == 0 {
        return bad("--max-connections and --max-in-flight must be at least 1".into());
    }
    if c.job_timeout_ms == 0 {
        return bad("--job-timeout-ms must be at least 1".into());
    }
    match c.tcp {
        Some(addr) if !ipc_core::peer::is_loopback(addr.ip()) && !c.tcp_allow_remote => {
            return bad(format!("--tcp {addr} is not a loopback address; OSPS listens on loopback (127.0.0.0/8, ::1) unless given --tcp-allow-remote and --token-file"));
        }
        Some(addr) if !ipc_core::peer::is_loopback(addr.ip()) && c.token_file.is_none() => {
            return bad(format!("--tcp {addr} with --tcp-allow-remote needs --token-file: remote clients must present a token ({})", ipc_core::token::HOW_TO_MAKE));
        }
        None if c.tcp_allow_remote || c.token_file.is_some() => {
            return bad(
                "--tcp-allow-remote and --token-file apply to a TCP listener: add --tcp ADDR"
                    .into(),
            );
        }
        _ => {}
    }
    let arena = c
        .segment_mib
        .checked_mul(MIB)
        .filter(|a| (MIB..=1 << 40).contains(a));
    let Some(arena) = arena else {
        return bad(format!(
            "--segment-mib {} must be from 1 to 1048576",
            c.segment_mib
        ));
    };
    let max_slot = ipc_core::SlotAllocator::max_slot_for(arena);
    if c.max_payload
        .checked_add(RESULT_RESERVE)
        .is_none_or(|need| need > max_slot)
    {
        return bad(format!(
            "a payload of {} bytes needs a slot of {} bytes, but a {} MiB segment's largest slot is {} bytes; raise --segment-mib or lower --max-payload",
            c.max_payload,
            ipc_core::SlotAllocator::slot_len(c.max_payload.saturating_add(RESULT_RESERVE)),
            c.segment_mib,
            max_slot
        ));
    }
    Ok(())
}

/// Removes what this dispatcher created under the instance's names, however
/// `serve` ends (return, error or panic unwinding).
struct Cleanup {
    socket: PathBuf,
    segment: String,
    /// The state file naming the segment: gone with it.
    state: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        segment::unlink(&self.segment);
        let _ = std::fs::remove_file(&self.state);
    }
}

/// Raises the soft open-file limit to the hard one (each client costs an
/// fd) and returns the limit in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard))
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() =>
        {
            tracing::debug!("open-file limit raised from {soft} to {hard}");
            hard
        }
        Ok((soft, _)) => soft,
        Err(_) => u64::MAX,
    }
}

/// The listeners' budgets under the open-file limit, said at start when the
/// limit clamps what was asked.
fn budgets(config: &Config) -> Result<admission::Budgets, DispatcherError> {
    let limit = raise_fd_limit();
    let Some(b) = admission::Budgets::for_fd_limit(config, limit) else {
        return Err(DispatcherError::Config(format!(
            "the open-file limit ({limit}) is too low: {} descriptors are kept for the dispatcher, {} worker(s) and the watchdog's probe, and clients need a few more; raise it (ulimit -n) or lower --workers",
            admission::fd_reserve(config.workers),
            config.workers
        )));
    };
    let clamped = [
        (
            "--max-connections",
            config.max_connections,
            b.unix_connections,
        ),
        (
            "--max-tcp-connections",
            config.tcp_connections(),
            b.tcp_connections,
        ),
    ];
    for (flag, asked, got) in clamped {
        if got < asked && (flag == "--max-connections" || config.tcp.is_some()) {
            tracing::warn!(
                "{flag} {asked} clamped to {got}: the open-file limit is {limit}, and {} descriptors are kept for the dispatcher, its {} worker(s) and the watchdog's probe (raise it with ulimit -n or LimitNOFILE=)",
                b.fd_reserve,
                config.workers
            );
        }
    }
    Ok(b)
}

async fn serve(config: Config) -> Result<(), DispatcherError> {
    let tcp_token = match &config.token_file {
        Some(path) => Some(
            ipc_core::token::load(path)
                .map_err(|e| DispatcherError::Config(e.to_string()))?
                .into_boxed_slice(),
        ),
        None => None,
    };
    let paths = RuntimePaths::new(&config.instance, config.runtime_dir.as_deref())?;
    // Only a directory this start made is removed at stop.
    let made_dir = paths.ensure_dir()?;
    let budgets = budgets(&config)?;
    // Signals first, so a SIGTERM during start-up is not lost.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let lock = InstanceLock::acquire(&paths.lock_file())?;
    // We hold the lock: what the state file names belongs to a dead
    // predecessor. Its segment is removed only if ours, never opened.
    let before = ipc_core::start::clear_predecessor(&paths, &lock);
    for what in &before.removed {
        let (kind, name) = what.split_once(' ').unwrap_or((what, ""));
        tracing::warn!(%name, "removed the {kind} of a dead predecessor");
    }
    let socket_path = paths.socket();
    let generation = before.generation.saturating_add(1);
    let mut seg = ipc_core::start::create_segment(
        &paths,
        &lock,
        config.backend,
        (config.segment_mib * MIB) as usize,
        generation,
    )?;
    let seg_name = seg.name().to_owned();
    let cleanup = Cleanup {
        socket: socket_path.clone(),
        segment: seg_name.clone(),
        state: paths.state_file(),
    };
    // The name is unlinked by `cleanup`, before the lock is released; the
    // mapping itself may outlive it in tasks still being torn down.
    seg.disown();
    let max_payload = config.max_payload;
    let workers = config.workers;
    let dir = paths.clone();
    let shared = Shared::new(config, paths, seg, max_payload, tcp_token, budgets);

    let (stop_tx, stop_rx) = watch::channel(false);
    let drivers: Vec<_> = (0..workers)
        .map(|i| tokio::task::spawn_local(pool::drive(Rc::clone(&shared), i, stop_rx.clone())))
        .collect();

    let unix = bind_unix(&socket_path, !shared.config.allow_uids.is_empty())?;
    let tcp = match shared.config.tcp {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| DispatcherError::Listen {
                    what: format!("tcp {addr}"),
                    source,
                })?;
            let local = l.local_addr()?;
            *shared.tcp_addr.borrow_mut() = Some(local.to_string());
            Some(l)
        }
        None => None,
    };
    tracing::info!(
        instance = shared.paths.instance(),
        socket = %socket_path.display(),
        tcp = ?shared.tcp_addr.borrow(),
        tcp_token = shared.tcp_token.is_some(),
        segment = %seg_name,
        generation,
        workers,
        "dispatcher ready"
    );
    // Soon after we serve: map the whole segment so no request pays a page fault.
    shared
        .slots
        .segment()
        .populate_in_background(POPULATE_AFTER);

    let why = loop {
        tokio::select! {
            r = unix.accept() => match r {
                Ok((stream, _)) => {
                    // The kernel tells who is on the other end: admit only our
                    // own uid, root, and those allowed by --allow-uid; and
                    // know the watchdog that started us by its pid.
                    let cred = stream.peer_cred().ok();
                    let uid = cred.map(|c| c.uid());
                    let name = format!("unix uid {}", uid.map_or("?".into(), |u| u.to_string()));
                    let key = uid.map_or(admission::PeerKey::Unknown, admission::PeerKey::Uid);
                    // A uid admitted only by --allow-uid may hold half of
                    // the socket's connections: never all of the owner's.
                    let own = nix::unistd::getuid().as_raw();
                    let capped = uid.is_some_and(|u| u != own && u != 0);
                    let peer = conn::Peer { name, key, capped };
                    let watchdog = shared.config.watchdog.as_ref().map(|w| w.pid as i32);
                    let is_watchdog = watchdog.is_some() && cred.and_then(|c| c.pid()) == watchdog;
                    if uid.is_some_and(|u| u == nix::unistd::getuid().as_raw() || u == 0 || shared.config.allow_uids.contains(&u)) {
                        let via = if is_watchdog { conn::Via::Watchdog } else { conn::Via::Unix };
                        tokio::task::spawn_local(conn::accept(Rc::clone(&shared), stream, peer, via));
                    } else {
                        tokio::task::spawn_local(conn::refuse_uid(Rc::clone(&shared), stream, peer.name));
                    }
                }
                Err(e) => accept_error(e).await,
            },
            r = accept_tcp(tcp.as_ref()) => match r {
                Ok((stream, addr)) => {
                    conn::tune_tcp(&stream);
                    let via = conn::Via::Tcp { needs_token: shared.tcp_token.is_some() };
                    // With a token (remote clients), one address may hold
                    // half of the listener's connections. Without one (a
                    // loopback port), every local user is the same to us:
                    // no share can be told apart (see README, Limits).
                    let key = admission::PeerKey::Addr(addr.ip().to_canonical());
                    let peer = conn::Peer { name: addr.to_string(), key, capped: shared.tcp_token.is_some() };
                    tokio::task::spawn_local(conn::accept(Rc::clone(&shared), stream, peer, via));
                }
                Err(e) => accept_error(e).await,
            },
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
        }
    };

    // Ordered shutdown.
    tracing::info!("{why}: shutting down; no longer accepting connections");
    drop(unix);
    drop(tcp);
    let _ = std::fs::remove_file(&socket_path);
    shared.begin_draining();
    let drain = Duration::from_millis(shared.config.drain_timeout_ms);
    let in_flight = shared.in_flight();
    if in_flight > 0 {
        tracing::info!("waiting up to {drain:?} for {in_flight} in-flight job(s)");
    }
    let drained = tokio::select! {
        r = tokio::time::timeout(drain, drained(&shared)) => r.is_ok(),
        _ = sigterm.recv() => false,
        _ = sigint.recv() => false,
    };
    if !drained {
        tracing::warn!(
            "{} job(s) still in flight; abandoning them",
            shared.in_flight()
        );
    }
    for job in shared.take_queue() {
        pool::answer_err(
            &shared,
            job,
            ipc_core::ErrorKind::ShuttingDown,
            "the dispatcher shut down before the job ran".into(),
        );
    }
    tracing::info!("closing the workers' job pipes and reaping them");
    shared.workers_stopped.set(true);
    let _ = stop_tx.send(true);
    for d in drivers {
        let _ = d.await;
    }
    tracing::info!(
        jobs_done = shared.jobs_done.get(),
        jobs_failed = shared.jobs_failed.get(),
        "workers reaped; removing segment {seg_name} and socket"
    );
    drop(shared);
    drop(cleanup);
    drop(lock);
    if made_dir {
        dir.remove_dir_if_empty();
    }
    tracing::info!("dispatcher stopped");
    Ok(())
}

/// Resolves once no slot is on loan, i.e. every accepted job is answered.
async fn drained(shared: &Shared) {
    shared.slots.all_returned().await
}

/// Binds the Unix socket: mode 0600, or 0666 with `--allow-uid` (so the
/// allowed uids can connect at all; the directories decide who reaches it
/// and `SO_PEERCRED` who is admitted).
fn bind_unix(path: &std::path::Path, others: bool) -> Result<UnixListener, DispatcherError> {
    use std::os::unix::fs::PermissionsExt;
    let listen_err = |source| DispatcherError::Listen {
        what: path.display().to_string(),
        source,
    };
    let l = UnixListener::bind(path).map_err(listen_err)?;
    let mode = if others { 0o666 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(listen_err)?;
    Ok(l)
}

async fn accept_tcp(
    l: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Out of fds or similar: log and pause instead of spinning.
async fn accept_error(e: std::io::Error) {
    tracing::warn!("accept failed: {e}; pausing 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_mapped_loopback_address_is_loopback() {
        let with = |addr: &str| {
            let mut c = Config::new("t");
            c.tcp = Some(addr.parse().unwrap());
            check(&c)
        };
        for loopback in [
            "127.0.0.1:0",
            "127.0.0.2:0",
            "[::1]:0",
            "[::ffff:127.0.0.1]:0",
        ] {
            assert!(with(loopback).is_ok(), "{loopback}: {:?}", with(loopback));
        }
        for remote in ["10.0.0.1:0", "[::ffff:10.0.0.1]:0", "[2001:db8::1]:0"] {
            let err = with(remote).expect_err(remote).to_string();
            assert!(err.contains("not a loopback address"), "{remote}: {err}");
        }
    }
}
