//! The OSPS watchdog: starts the dispatcher as its child and keeps it alive.
//! It is the child subreaper: whatever a dead dispatcher started, directly or
//! not, is killed and reaped here before the next one starts
//! ([`descendants`]); it restarts the dispatcher when it exits (SIGCHLD) or hangs
//! (heartbeat misses), with backoff and an intensity limit; and on
//! SIGTERM/SIGINT it stops the dispatcher in order and exits 0.
//!
//! The decisions live in [`policy::Supervisor`], a pure state machine; this
//! module is the thin loop that does the I/O.

pub mod descendants;
pub mod heartbeat;
pub mod notify;
pub mod policy;

use std::cell::Cell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use ipc_core::RuntimePaths;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

pub use policy::{Action, Event, RestartPolicy, State, Supervisor};

/// How the watchdog is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub instance: String,
    pub runtime_dir: Option<PathBuf>,
    pub heartbeat: Duration,
    pub miss_limit: u32,
    pub start_timeout: Duration,
    /// How long an ordered stop may take before SIGKILL.
    pub stop_grace: Duration,
    pub policy: RestartPolicy,
    pub dispatcher_exe: PathBuf,
    /// Extra arguments for the dispatcher.
    pub dispatcher_args: Vec<String>,
}

/// `osps-dispatcher` beside the running program, else from `PATH`.
pub fn default_dispatcher_exe() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("osps-dispatcher")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("osps-dispatcher"))
}

/// Why the watchdog could not run.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error(transparent)]
    Paths(#[from] ipc_core::PathError),
    #[error("cannot become child subreaper: {0}")]
    Subreaper(nix::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the watchdog; returns its exit code (0 after a requested stop, 1 after giving up).
pub fn run(config: Config) -> Result<u8, WatchdogError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, supervise(config))
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit status {code}"),
        WaitStatus::Signaled(_, sig, core) => format!(
            "killed by {sig}{}",
            if core { " (core dumped)" } else { "" }
        ),
        other => format!("{other:?}"),
    }
}

async fn supervise(config: Config) -> Result<u8, WatchdogError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(WatchdogError::Subreaper)?;
    let paths = RuntimePaths::new(&config.instance, config.runtime_dir.as_deref())?;
    // Only a directory this watchdog made is removed when it exits.
    let made_dir = paths.ensure_dir()?;
    // Signal handlers before the first child, so no SIGCHLD or SIGTERM is lost.
    let mut sigchld = signal(SignalKind::child())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let watched = Rc::new(Cell::new(None));
    let (hb_tx, mut hb_rx) = mpsc::unbounded_channel();
    let settings = heartbeat::Settings {
        socket: paths.socket(),
        interval: config.heartbeat,
        miss_limit: config.miss_limit,
        start_timeout: config.start_timeout,
    };
    let hb = tokio::task::spawn_local(heartbeat::run(settings, Rc::clone(&watched), hb_tx));
    tracing::info!(instance = %config.instance, heartbeat_ms = config.heartbeat.as_millis() as u64, miss_limit = config.miss_limit, "watchdog started");
    // Run by systemd as Type=notify: tell it when we serve and stop, and ping
    // its watchdog from this loop (a wedged loop stops the pings).
    let notifier = notify::Notifier::from_env();
    let ping_every = notifier.as_ref().and_then(notify::Notifier::ping_every);
    let mut systemd_ping = ping_every.map(|every| {
        let mut i = tokio::time::interval(every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    if let Some(n) = &notifier {
        if let Some(every) = ping_every {
            tracing::info!("systemd watchdog enabled: WATCHDOG=1 every {every:?}");
        }
        n.send("STATUS=starting the dispatcher");
    }
    let mut told_ready = false;
    let started_ms = ipc_core::status::unix_ms();

    let mut sup = Supervisor::new(config.policy.clone());
    let mut pending: VecDeque<Action> = sup.start().into();
    let mut backoff_at: Option<tokio::time::Instant> = None;
    let mut grace_at: Option<tokio::time::Instant> = None;
    // While a previous dispatcher holds the instance lock: until when this
    // spawn waits for it (set at the spawn's first probe, cleared once it
    // spawns, so every spawn gets its own bounded wait), and the next probe.
    let mut lock_wait_until: Option<tokio::time::Instant> = None;
    let mut lock_poll_at: Option<tokio::time::Instant> = None;
    loop {
        while let Some(action) = pending.pop_front() {
            match action {
                Action::Spawn => {
                    // A previous dispatcher of this instance still holds the
                    // lock (draining after its own watchdog's stop): wait for
                    // it, up to the stop grace per spawn, instead of starting one
                    // that would only fail (and count as a crash).
                    if let Some(holder) = ipc_core::lock::holder(&paths.lock_file()) {
                        let now = tokio::time::Instant::now();
                        let until = *lock_wait_until.get_or_insert_with(|| {
                            tracing::info!("waiting for the previous dispatcher (pid {holder}) to finish (up to {:?})", config.stop_grace);
                            now + config.stop_grace
                        });
                        if now < until {
                            lock_poll_at = Some(now + LOCK_POLL);
                            continue;
                        }
                        tracing::warn!("the previous dispatcher (pid {holder}) still holds the instance lock after {:?}; starting anyway", config.stop_grace);
                    }
                    // This spawn's wait (if any) is over; the next one waits afresh.
                    lock_wait_until = None;
                    let event = match spawn(&config, &sup, started_ms) {
                        Ok(pid) => {
                            tracing::info!(pid, restarts = sup.restarts(), "dispatcher started");
                            watched.set(Some(pid));
                            Event::Spawned { pid }
                        }
                        Err(e) => {
                            tracing::error!("cannot start the dispatcher: {e}");
                            Event::SpawnFailed {
                                error: e.to_string(),
                            }
                        }
                    };
                    pending.extend(sup.handle(event, Instant::now()));
                }
                Action::Kill { pid } => {
                    tracing::warn!(pid, "killing the dispatcher (SIGKILL)");
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                Action::Terminate { pid } => {
                    tracing::info!(
                        pid,
                        "stopping the dispatcher (SIGTERM), grace {:?}",
                        config.stop_grace
                    );
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                    grace_at = Some(tokio::time::Instant::now() + config.stop_grace);
                }
                Action::ScheduleRestart { delay, cause } => {
                    watched.set(None);
                    if let Some(n) = &notifier {
                        n.send(&format!("STATUS=restarting the dispatcher ({cause})"));
                    }
                    tracing::warn!(
                        restart = sup.restarts(),
                        "dispatcher lost ({cause}); restarting in {} ms",
                        delay.as_millis()
                    );
                    backoff_at = Some(tokio::time::Instant::now() + delay);
                }
                Action::Exit { code, message } => {
                    watched.set(None);
                    if let Some(n) = &notifier {
                        n.send(&format!("STOPPING=1\nSTATUS={message}"));
                    }
                    hb.abort();
                    descendants::sweep(descendants::SWEEP_WITHIN).await;
                    remove_leftovers(&paths, made_dir);
                    if code == 0 {
                        tracing::info!("watchdog {message}");
                    } else {
                        tracing::error!("{message}");
                        eprintln!("osps-watchdog: {message}");
                    }
                    return Ok(code);
                }
            }
        }
        let event = tokio::select! {
            _ = sigchld.recv() => reap(&sup),
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); stopping(&notifier); Some(Event::StopRequested) }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); stopping(&notifier); Some(Event::StopRequested) }
            Some(beat) = hb_rx.recv() => match beat {
                heartbeat::Beat::Missed { pid, misses } if Some(pid) == sup.pid() => {
                    if misses == 0 {
                        tracing::warn!(pid, "dispatcher never answered within {:?} of its start: hung", config.start_timeout);
                    } else {
                        tracing::warn!(pid, misses, "dispatcher hung: {misses} heartbeats missed");
                    }
                    Some(Event::Hung { misses })
                }
                heartbeat::Beat::Serving { pid, workers } if Some(pid) == sup.pid() => {
                    tracing::info!(pid, workers, restarts = sup.restarts(), "ready: the dispatcher answers and {workers} worker(s) are up");
                    if let Some(n) = &notifier {
                        let status = format!("STATUS=serving: dispatcher pid {pid}, {workers} worker(s), {} restart(s)", sup.restarts());
                        n.send(&if told_ready { status } else { format!("READY=1\n{status}") });
                    }
                    told_ready = true;
                    None
                }
                _ => None,
            },
            _ = tick(systemd_ping.as_mut()) => {
                if let Some(n) = &notifier {
                    n.send("WATCHDOG=1");
                }
                None
            }
            _ = sleep_until(backoff_at) => { backoff_at = None; Some(Event::BackoffElapsed) }
            _ = sleep_until(lock_poll_at) => { lock_poll_at = None; pending.push_back(Action::Spawn); None }
            _ = sleep_until(grace_at) => {
                grace_at = None;
                tracing::warn!("the dispatcher did not stop within {:?}", config.stop_grace);
                Some(Event::GraceExpired)
            }
        };
        if let Some(Event::Exited { .. }) = event {
            // What the dead dispatcher started dies before anything else happens.
            descendants::sweep(descendants::SWEEP_WITHIN).await;
        }
        if let Some(event) = event {
            pending.extend(sup.handle(event, Instant::now()));
        }
    }
}

/// How often a watchdog waiting for a previous dispatcher probes its lock.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// At exit, whoever outlives the dispatcher clears what it could not (it
/// was SIGKILLed, or crashed before the watchdog gave up): its segment,
/// socket, state and lock files. Under the instance lock, so a live
/// dispatcher's objects are never touched.
fn remove_leftovers(paths: &RuntimePaths, made_dir: bool) {
    match ipc_core::start::remove_leftovers(paths, made_dir) {
        Ok(removed) => {
            for what in removed {
                tracing::warn!("removed the {what} the dead dispatcher left");
            }
        }
        Err(ipc_core::LockError::Held { pid, .. }) => {
            tracing::warn!("a dispatcher (pid {pid}) still holds the instance lock: its objects are left to it");
        }
        Err(e) => tracing::warn!("cannot clear the dead dispatcher's leftovers: {e}"),
    }
}

/// Tells systemd that the service is stopping (`STOPPING=1`).
fn stopping(notifier: &Option<notify::Notifier>) {
    if let Some(n) = notifier {
        n.send("STOPPING=1\nSTATUS=stopping the dispatcher in order");
    }
}

/// The next tick of `interval`, or never.
async fn tick(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reaps every child that has exited. The dispatcher's exit becomes an event;
/// anything else is an orphan (a worker of a dead dispatcher) handed to us as
/// subreaper, reaped and logged.
fn reap(sup: &Supervisor) -> Option<Event> {
    let mut event = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return event,
            Ok(status) => {
                let Some(pid) = status.pid() else {
                    return event;
                };
                let pid = pid.as_raw() as u32;
                let how = describe(status);
                if Some(pid) == sup.pid() {
                    tracing::info!(pid, "dispatcher exited: {how}");
                    event = Some(Event::Exited { pid, how });
                } else {
                    tracing::info!(pid, "reaped orphan: {how}");
                }
            }
        }
    }
}

/// Starts the dispatcher in its own process group (so a terminal's Ctrl-C
/// reaches only the watchdog, which stops it in order).
fn spawn(config: &Config, sup: &Supervisor, started_ms: u64) -> std::io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&config.dispatcher_exe);
    cmd.arg("--instance").arg(&config.instance);
    if let Some(dir) = &config.runtime_dir {
        cmd.arg("--runtime-dir").arg(dir);
    }
    // What the dispatcher learns about us (shown by `osps-client status`).
    let about_us = ipc_core::env::WatchdogEnv {
        pid: std::process::id(),
        restarts: sup.restarts(),
        last_restart_cause: sup.last_cause().unwrap_or("").to_owned(),
        started_unix_ms: Some(started_ms),
    };
    cmd.args(&config.dispatcher_args)
        .envs(about_us.vars())
        .env(
            ipc_core::env::LOG_FORMAT,
            ipc_core::logging::format().as_str(),
        )
        .stdin(Stdio::null())
        .process_group(0);
    for var in notify::SERVICE_ONLY_ENV {
        cmd.env_remove(var);
    }
    // The Child handle is dropped without waiting: children are reaped by `reap`.
    let child = cmd.spawn()?;
    Ok(child.id())
}
