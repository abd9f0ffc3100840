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
pub mod held;
pub mod notify;
pub mod policy;
pub mod restarts;

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

use notify::NotifyState;

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
/// `held`: the listening sockets it holds for its dispatchers ([`held::Held::init`],
/// made before any thread).
pub fn run(config: Config, held: held::Held) -> Result<u8, WatchdogError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, supervise(config, held))
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

/// SIGHUP: the dispatcher reloads its configuration file (its own reading
/// of it, as `osps-client reload` asks).
fn forward_sighup(pid: u32) {
    tracing::info!(pid, "SIGHUP passed on to the dispatcher (reload)");
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
}

async fn supervise(config: Config, held: held::Held) -> Result<u8, WatchdogError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(WatchdogError::Subreaper)?;
    let paths = RuntimePaths::new(&config.instance, config.runtime_dir.as_deref())?;
    // Only a directory this watchdog made is removed when it exits.
    let made_dir = paths.ensure_dir()?;
    // Signal handlers before the first child, so no SIGCHLD or SIGTERM is lost.
    let mut inputs = Inputs::install(&config, &paths)?;
    tracing::info!(instance = %config.instance, heartbeat_ms = config.heartbeat.as_millis() as u64, miss_limit = config.miss_limit, "watchdog started");
    let mut w = Watchdog::new(config, paths, made_dir, Rc::clone(&inputs.watched));
    w.held = held;
    w.announce_start(&mut inputs);
    loop {
        if let Some((code, message)) = w.carry_out() {
            inputs.heartbeat.abort();
            return Ok(w.exit(code, &message).await);
        }
        let wake = inputs.next(&w.timers).await;
        if let Some(event) = w.on_wake(wake) {
            if let Event::Exited { .. } = event {
                // What the dead dispatcher started dies before anything else happens.
                descendants::sweep(descendants::SWEEP_WITHIN).await;
            }
            w.feed(event);
        }
    }
}

/// What the loop waits on: signals, the heartbeat task's reports, systemd's
/// keep-alive period. Kept apart from [`Watchdog`] so that waiting borrows
/// only these.
struct Inputs {
    sigchld: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
    /// SIGHUP: passed on to the dispatcher, which reloads its configuration.
    sighup: tokio::signal::unix::Signal,
    beats: mpsc::UnboundedReceiver<heartbeat::Beat>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// The dispatcher pid the heartbeat task watches.
    watched: Rc<Cell<Option<u32>>>,
    systemd_ping: Option<tokio::time::Interval>,
}

/// Why the loop woke up.
#[derive(Debug)]
enum Wake {
    Child,
    Stop(&'static str),
    Reload,
    Beat(heartbeat::Beat),
    SystemdPing,
    BackoffOver,
    LockPoll,
    GraceOver,
}

/// The deadlines the loop keeps, each `None` when not armed.
#[derive(Debug, Default)]
struct Timers {
    backoff_at: Option<tokio::time::Instant>,
    grace_at: Option<tokio::time::Instant>,
    /// While a previous dispatcher of this instance holds its lock: until when
    /// this spawn waits for it (set at the spawn's first probe, cleared once it
    /// spawns, so every spawn gets its own bounded wait), and the next probe.
    lock_wait_until: Option<tokio::time::Instant>,
    lock_poll_at: Option<tokio::time::Instant>,
}

impl Inputs {
    fn install(config: &Config, paths: &RuntimePaths) -> Result<Inputs, WatchdogError> {
        let sigchld = signal(SignalKind::child())?;
        let sigterm = signal(SignalKind::terminate())?;
        let sigint = signal(SignalKind::interrupt())?;
        let sighup = signal(SignalKind::hangup())?;
        let watched = Rc::new(Cell::new(None));
        let (tx, beats) = mpsc::unbounded_channel();
        let settings = heartbeat::Settings {
            socket: paths.socket(),
            interval: config.heartbeat,
            miss_limit: config.miss_limit,
            start_timeout: config.start_timeout,
        };
        let heartbeat = tokio::task::spawn_local(heartbeat::run(settings, Rc::clone(&watched), tx));
        Ok(Inputs {
            sigchld,
            sigterm,
            sigint,
            sighup,
            beats,
            heartbeat,
            watched,
            systemd_ping: None,
        })
    }

    /// Waits for the next thing to react to.
    async fn next(&mut self, timers: &Timers) -> Wake {
        tokio::select! {
            _ = self.sigchld.recv() => Wake::Child,
            _ = self.sigterm.recv() => Wake::Stop("SIGTERM"),
            _ = self.sigint.recv() => Wake::Stop("SIGINT"),
            _ = self.sighup.recv() => Wake::Reload,
            Some(beat) = self.beats.recv() => Wake::Beat(beat),
            _ = tick(self.systemd_ping.as_mut()) => Wake::SystemdPing,
            _ = sleep_until(timers.backoff_at) => Wake::BackoffOver,
            _ = sleep_until(timers.lock_poll_at) => Wake::LockPoll,
            _ = sleep_until(timers.grace_at) => Wake::GraceOver,
        }
    }
}

/// The watchdog's side of supervision: the pure [`Supervisor`] and what it
/// takes to carry out its actions.
struct Watchdog {
    config: Config,
    paths: RuntimePaths,
    made_dir: bool,
    sup: Supervisor,
    pending: VecDeque<Action>,
    timers: Timers,
    watched: Rc<Cell<Option<u32>>>,
    notifier: Option<notify::Notifier>,
    told_ready: bool,
    started_ms: u64,
    /// The dispatcher the heartbeat saw serving: SIGHUP is passed on only
    /// to it (one still starting may not handle SIGHUP yet); one that came
    /// before is passed on once it serves (`hup_pending`).
    serving: Option<u32>,
    hup_pending: bool,
    /// The listening sockets handed to each dispatcher.
    held: held::Held,
    /// Restarts so far by cause (`OSPS_DISPATCHER_RESTARTS`).
    restarts: restarts::Restarts,
}

impl Watchdog {
    fn new(
        config: Config,
        paths: RuntimePaths,
        made_dir: bool,
        watched: Rc<Cell<Option<u32>>>,
    ) -> Self {
        let mut sup = Supervisor::new(config.policy.clone());
        let pending = sup.start().into();
        Watchdog {
            config,
            paths,
            made_dir,
            sup,
            pending,
            timers: Timers::default(),
            watched,
            notifier: notify::Notifier::from_env(),
            told_ready: false,
            serving: None,
            hup_pending: false,
            started_ms: ipc_core::status::unix_ms(),
            held: held::Held::none(),
            restarts: restarts::Restarts::default(),
        }
    }

    /// Run by systemd as Type=notify: tell it when we serve and stop, and ping
    /// its watchdog from this loop (a wedged loop stops the pings).
    fn announce_start(&self, inputs: &mut Inputs) {
        let Some(n) = &self.notifier else { return };
        if let Some(every) = n.ping_every() {
            tracing::info!("systemd watchdog enabled: WATCHDOG=1 every {every:?}");
            let mut i = tokio::time::interval(every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            inputs.systemd_ping = Some(i);
        }
        n.send(&[NotifyState::Status("starting the dispatcher")]);
    }

    fn notify(&self, states: &[NotifyState<'_>]) {
        if let Some(n) = &self.notifier {
            n.send(states);
        }
    }

    /// Feeds an event to the supervisor and queues its actions.
    fn feed(&mut self, event: Event) {
        let actions = self.sup.handle(event, Instant::now());
        self.pending.extend(actions);
    }

    /// Carries out the queued actions up to an exit, which it returns (code
    /// and message) for [`Watchdog::exit`].
    fn carry_out(&mut self) -> Option<(u8, String)> {
        while let Some(action) = self.pending.pop_front() {
            match action {
                Action::Spawn => self.spawn_when_free(),
                Action::Kill { pid } => {
                    tracing::warn!(pid, "killing the dispatcher (SIGKILL)");
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                Action::Terminate { pid } => {
                    let grace = self.config.stop_grace;
                    tracing::info!(pid, "stopping the dispatcher (SIGTERM), grace {grace:?}");
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                    self.timers.grace_at = Some(tokio::time::Instant::now() + grace);
                }
                Action::ScheduleRestart { delay, cause } => self.schedule_restart(delay, &cause),
                Action::Exit { code, message } => return Some((code, message)),
            }
        }
        None
    }

    /// Spawns the dispatcher, unless a previous dispatcher of this instance
    /// still holds the lock (draining after its own watchdog's stop): then it
    /// waits for it, up to the stop grace per spawn, instead of starting one
    /// that would only fail (and count as a crash).
    fn spawn_when_free(&mut self) {
        if let Some(holder) = ipc_core::lock::holder(&self.paths.lock_file()) {
            let now = tokio::time::Instant::now();
            let grace = self.config.stop_grace;
            let until = *self.timers.lock_wait_until.get_or_insert_with(|| {
                tracing::info!("waiting for the previous dispatcher (pid {holder}) to finish (up to {grace:?})");
                now + grace
            });
            if now < until {
                self.timers.lock_poll_at = Some(now + LOCK_POLL);
                return;
            }
            tracing::warn!("the previous dispatcher (pid {holder}) still holds the instance lock after {grace:?}; starting anyway");
        }
        // This spawn's wait (if any) is over; the next one waits afresh.
        self.timers.lock_wait_until = None;
        self.held.ensure(&self.paths);
        let event = match spawn(self) {
            Ok(pid) => {
                tracing::info!(pid, restarts = self.sup.restarts(), "dispatcher started");
                self.watched.set(Some(pid));
                Event::Spawned { pid }
            }
            Err(e) => {
                tracing::error!("cannot start the dispatcher: {e}");
                Event::SpawnFailed {
                    error: e.to_string(),
                }
            }
        };
        self.feed(event);
    }

    fn schedule_restart(&mut self, delay: Duration, cause: &str) {
        self.watched.set(None);
        self.restarts.count(cause);
        let status = format!("restarting the dispatcher ({cause})");
        self.notify(&[NotifyState::Status(&status)]);
        tracing::warn!(
            restart = self.sup.restarts(),
            "dispatcher lost ({cause}); restarting in {} ms",
            delay.as_millis()
        );
        self.timers.backoff_at = Some(tokio::time::Instant::now() + delay);
    }

    /// Ends supervision: tells systemd, kills what is left, removes what the
    /// dispatcher could not; returns the exit code.
    async fn exit(&mut self, code: u8, message: &str) -> u8 {
        self.watched.set(None);
        self.notify(&[NotifyState::Stopping, NotifyState::Status(message)]);
        self.held.release();
        descendants::sweep(descendants::SWEEP_WITHIN).await;
        remove_leftovers(&self.paths, self.made_dir, self.held.from_systemd());
        if code == 0 {
            tracing::info!("watchdog {message}");
        } else {
            tracing::error!("{message}");
            eprintln!("osps-watchdog: {message}");
        }
        code
    }

    /// What a wake-up means for the supervisor, if anything.
    fn on_wake(&mut self, wake: Wake) -> Option<Event> {
        match wake {
            Wake::Child => reap(&self.sup),
            Wake::Stop(signal) => {
                tracing::info!("{signal} received");
                // New connections are refused from now on, not left waiting.
                self.held.release();
                self.notify(&[
                    NotifyState::Stopping,
                    NotifyState::Status("stopping the dispatcher in order"),
                ]);
                Some(Event::StopRequested)
            }
            Wake::Reload => {
                match self.sup.pid().filter(|&pid| self.serving == Some(pid)) {
                    Some(pid) => forward_sighup(pid),
                    None => {
                        tracing::info!("SIGHUP received: passed on once the dispatcher serves");
                        self.hup_pending = true;
                    }
                }
                None
            }
            Wake::Beat(beat) => self.on_beat(beat),
            Wake::SystemdPing => {
                self.notify(&[NotifyState::Watchdog]);
                None
            }
            Wake::BackoffOver => {
                self.timers.backoff_at = None;
                Some(Event::BackoffElapsed)
            }
            Wake::LockPoll => {
                self.timers.lock_poll_at = None;
                self.pending.push_back(Action::Spawn);
                None
            }
            Wake::GraceOver => {
                self.timers.grace_at = None;
                tracing::warn!(
                    "the dispatcher did not stop within {:?}",
                    self.config.stop_grace
                );
                Some(Event::GraceExpired)
            }
        }
    }

    /// A heartbeat report about the dispatcher we watch (stale ones are dropped).
    fn on_beat(&mut self, beat: heartbeat::Beat) -> Option<Event> {
        match beat {
            heartbeat::Beat::Missed { pid, misses } if Some(pid) == self.sup.pid() => {
                if misses == 0 {
                    tracing::warn!(
                        pid,
                        "dispatcher never answered within {:?} of its start: hung",
                        self.config.start_timeout
                    );
                } else {
                    tracing::warn!(pid, misses, "dispatcher hung: {misses} heartbeats missed");
                }
                Some(Event::Hung { misses })
            }
            heartbeat::Beat::Serving { pid, workers } if Some(pid) == self.sup.pid() => {
                let restarts = self.sup.restarts();
                tracing::info!(
                    pid,
                    workers,
                    restarts,
                    "ready: the dispatcher answers and {workers} worker(s) are up"
                );
                let status = format!(
                    "serving: dispatcher pid {pid}, {workers} worker(s), {restarts} restart(s)"
                );
                if self.told_ready {
                    self.notify(&[NotifyState::Status(&status)]);
                } else {
                    self.notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                }
                self.told_ready = true;
                self.serving = Some(pid);
                if std::mem::take(&mut self.hup_pending) {
                    forward_sighup(pid);
                }
                None
            }
            _ => None,
        }
    }
}

/// How often a watchdog waiting for a previous dispatcher probes its lock.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// At exit, whoever outlives the dispatcher clears what it could not (it
/// was SIGKILLed, or crashed before the watchdog gave up): its segment,
/// socket, state and lock files. Under the instance lock, so a live
/// dispatcher's objects are never touched.
fn remove_leftovers(paths: &RuntimePaths, made_dir: bool, keep_socket: bool) {
    match ipc_core::start::remove_leftovers(paths, made_dir, keep_socket) {
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
/// reaches only the watchdog, which stops it in order), handing it the
/// listening sockets held ([`held`]).
fn spawn(w: &Watchdog) -> std::io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let (config, sup, started_ms) = (&w.config, &w.sup, w.started_ms);
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
    if let Some(restarts) = w.restarts.value() {
        cmd.env(ipc_core::env::DISPATCHER_RESTARTS, restarts);
    }
    cmd.env_remove(ipc_core::activation::LISTEN_PID)
        .env_remove(ipc_core::activation::SOCKET_HOLDER)
        .envs(w.held.env());
    // The sockets are inheritable for this spawn only (one thread: no
    // other process starts meanwhile).
    w.held.inheritable(true);
    let child = cmd.spawn();
    w.held.inheritable(false);
    // The Child handle is dropped without waiting: children are reaped by `reap`.
    Ok(child?.id())
}
