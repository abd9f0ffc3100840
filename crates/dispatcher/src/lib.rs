//! The OSPS dispatcher (primary server): takes the instance lock, builds the
//! shared segment, starts the worker pool, accepts clients on a Unix socket
//! (and optionally TCP on loopback), schedules their jobs on idle workers,
//! answers `status` itself, and on SIGTERM/SIGINT shuts down in order.
//!
//! It runs on one thread (a current-thread tokio runtime): the segment handle
//! is not `Send`, and one thread is plenty to move descriptors around while
//! the workers do the work.

mod admission;
mod cancel;
pub mod config_file;
mod conn;
mod driver;
mod handler;
mod handshake;
pub mod held;
mod latency;
mod listener;
mod metrics;
mod metrics_http;
mod orphans;
pub mod pools;
mod queue;
mod reload;
mod replies;
mod session;
mod shared;
mod slots;
mod stats;
mod status;
mod workers;
mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use ipc_core::{segment, Backend, InstanceLock, LockError, PathError, RuntimePaths, SegmentError};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::listener::Listener;
pub use crate::reload::{ConfigSource, ReadConfig};
use crate::shared::Shared;
use crate::slots::RESULT_RESERVE;

const MIB: u64 = 1 << 20;
/// Delay before the segment is prefaulted: out of start-up, so out of recovery time.
const POPULATE_AFTER: Duration = Duration::from_millis(200);

/// Everything the dispatcher is told at start. Its command-line flags are
/// these fields (`osps-dispatcher` flattens them next to the shared
/// `ipc_core::cli` flags), so each default is written once, here;
/// [`Config::default`] is what an empty command line gives.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Instance name (the shared `--instance` flag, `ipc_core::cli::InstanceArgs`).
    #[arg(skip = String::from(ipc_core::paths::DEFAULT_INSTANCE))]
    pub instance: String,
    /// Base runtime directory (the shared `--runtime-dir` flag; default: `$XDG_RUNTIME_DIR/osps` or `/tmp/osps-<uid>`).
    #[arg(skip)]
    pub runtime_dir: Option<PathBuf>,
    /// Number of workers [default: number of CPUs].
    #[arg(long, default_value_t = default_workers(), hide_default_value = true)]
    pub workers: usize,
    /// Per-job timeout in milliseconds; a worker past it gets SIGTERM, then SIGKILL after 1 s, and is replaced.
    #[arg(long, default_value_t = 30_000)]
    pub job_timeout_ms: u64,
    /// Runs of a job whose worker dies on it, at most: 2 retries it once, 1 never retries.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub max_attempts: u8,
    /// How long shutdown waits for in-flight jobs, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub drain_timeout_ms: u64,
    /// Deadline for a client's handshake, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Deadline to receive the rest of a request (header and payload) once it has begun, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub frame_timeout_ms: u64,
    /// Close a connection that sends no request for this many milliseconds.
    #[arg(long, default_value_t = 300_000)]
    pub idle_timeout_ms: u64,
    /// Clients served at once on the Unix socket; more are refused with a clear message. A uid admitted only by --allow-uid holds at most half. Clamped to what the open-file limit allows.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Clients served at once on the TCP listener, a budget of its own [default: --max-connections].
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_tcp_connections: Option<usize>,
    /// Drop a client that takes no byte of its replies for this many milliseconds (its slots are freed); a slow but steady reader is never dropped.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout_ms: u64,
    /// Percent of the slot arena one connection may hold at once (at least one largest request); beyond, only that connection waits.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub conn_arena_percent: u64,
    /// Percent of the slot arena one peer (a uid on the Unix socket, an address on TCP) may hold at once in large slots.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub peer_arena_percent: u64,
    /// Requests one connection may have in flight; beyond, the dispatcher stops reading it.
    #[arg(long, default_value_t = 128)]
    pub max_in_flight: usize,
    /// Also admit this uid on the Unix socket (repeatable); our own uid and root always are.
    #[arg(long = "allow-uid", value_name = "ALLOW_UID")]
    pub allow_uids: Vec<u32>,
    /// The shared segment's backend: posix (shm_open, under /dev/shm) or sysv (shmget, listed by ipcs -m).
    #[arg(
        long = "segment",
        value_name = "SEGMENT",
        default_value = "posix",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::PossibleValuesParser::new(Backend::ALL.map(Backend::as_str)),
            |name| name.parse::<Backend>().expect("one of the possible values"),
        ),
    )]
    pub backend: Backend,
    /// Size of the shared segment's slot arena, in MiB.
    #[arg(long, default_value_t = 256)]
    pub segment_mib: u64,
    /// Largest payload accepted, in bytes.
    #[arg(long, default_value_t = 64 * MIB)]
    pub max_payload: u64,
    /// Largest request header frame accepted, in bytes.
    #[arg(long, default_value_t = ipc_core::frame::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Also listen on this TCP address, e.g. 127.0.0.1:7070 (loopback unless --tcp-allow-remote).
    #[arg(long)]
    pub tcp: Option<SocketAddr>,
    /// Allow a non-loopback --tcp address; requires --token-file.
    #[arg(long)]
    pub tcp_allow_remote: bool,
    /// TCP clients must present the token in this file (mode 0600, owned by this user) in their hello.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve the metrics (Prometheus text format) over HTTP at /metrics on this address, e.g. 127.0.0.1:9477 (loopback unless --metrics-listen-public).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow a non-loopback --metrics-listen address: whoever reaches it reads the metrics (pool names, counts; no payloads).
    #[arg(long)]
    pub metrics_listen_public: bool,
    /// Enable the fault-injection operation `crash` (for tests and demos).
    #[arg(long)]
    pub allow_fault_injection: bool,
    /// The worker program [default: osps-worker beside this program, else from PATH].
    #[arg(long, default_value_os_t = default_worker_exe(), hide_default_value = true)]
    pub worker_exe: PathBuf,
    /// Largest result a job may return, in MiB (a worker asks for room past its slot) [default: the largest payload].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_result_mib: Option<u64>,
    /// Replace a worker once it has run this many jobs, between jobs: its replacement is started and ready first [default: never].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub recycle_after_jobs: Option<u64>,
    /// Replace a worker whose resident memory is above this many MiB after a job, between jobs, as for --recycle-after-jobs [default: never].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub recycle_above_rss_mib: Option<u64>,
    /// Limit each worker's memory to this many MiB, from its first instruction: RLIMIT_DATA (heap and private mappings), and where the dispatcher may make memory cgroups a cgroup per worker (all it and its children take; the shared segment's pages are not theirs); a job past it is answered `out of memory` and its worker replaced [default: no limit].
    #[arg(long, value_parser = ipc_core::memory::parse_limit_mib)]
    pub memory_limit_mib: Option<u64>,
    /// The pools of their own, from the configuration file (`[pools.NAME]`).
    #[arg(skip)]
    pub pools: Vec<pools::PoolSpec>,
    /// Whether the builtin pool (`--worker-exe`) runs: unless the file's
    /// `[pools.builtin]` says `enabled = false`.
    #[arg(skip = true)]
    pub builtin_pool: bool,
    /// Whom the builtin pool's workers run as (`[pools.builtin] user, group`).
    #[arg(skip)]
    pub builtin_run_as: Option<pools::RunAs>,
    /// The watchdog that started us, if any: we stop (SIGTERM) when it dies.
    #[arg(skip)]
    pub watchdog: Option<ipc_core::status::WatchdogStatus>,
    /// When that watchdog started (milliseconds since the Unix epoch).
    #[arg(skip)]
    pub watchdog_started_unix_ms: Option<u64>,
    /// Where SIGHUP and the `reload` request read the configuration
    /// again (`--config FILE`); `None`: they are refused.
    #[arg(skip)]
    pub reload_from: Option<ConfigSource>,
    /// The configuration file's text these options came from: saved, once
    /// applied, for a restart after a crash to fall back on
    /// (`RuntimePaths::applied_config`).
    #[arg(skip)]
    pub file_text: Option<std::sync::Arc<str>>,
}

/// The default number of workers: one per CPU (2 when that is unknown).
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Default for Config {
    /// What an empty command line gives: every flag's default, the default
    /// instance, the worker found beside this program.
    fn default() -> Config {
        let cmd =
            <Config as clap::Args>::augment_args(clap::Command::new("config")).no_binary_name(true);
        let matches = cmd
            .try_get_matches_from(std::iter::empty::<&str>())
            .expect("every flag of Config has a default");
        <Config as clap::FromArgMatches>::from_arg_matches(&matches)
            .expect("the defaults parse into a Config")
    }
}

impl Config {
    /// Defaults for `instance`, with the worker found beside this program.
    pub fn new(instance: &str) -> Config {
        Config {
            instance: instance.to_owned(),
            ..Config::default()
        }
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Flags::try_parse_from(std::iter::once("osps-dispatcher").chain(args.iter().copied()))
            .map(|f| f.config)
    }

    #[test]
    fn the_default_is_an_empty_command_line() {
        let c = Config::default();
        let numbers = [
            (c.job_timeout_ms, 30_000),
            (c.drain_timeout_ms, 5_000),
            (c.handshake_timeout_ms, 10_000),
            (c.frame_timeout_ms, 10_000),
            (c.idle_timeout_ms, 300_000),
            (c.max_connections as u64, 1024),
            (c.write_timeout_ms, 10_000),
            (c.conn_arena_percent, 25),
            (c.peer_arena_percent, 75),
            (c.max_in_flight as u64, 128),
            (c.segment_mib, 256),
            (c.max_payload, 64 << 20),
            (
                c.max_frame as u64,
                ipc_core::frame::DEFAULT_MAX_FRAME as u64,
            ),
        ];
        for (i, (got, want)) in numbers.into_iter().enumerate() {
            assert_eq!(got, want, "default #{i}");
        }
        assert_eq!(c.workers, default_workers());
        assert_eq!(c.worker_exe, default_worker_exe());
        assert_eq!(c.instance, ipc_core::paths::DEFAULT_INSTANCE);
        assert!(c.backend == Backend::Posix && !c.tcp_allow_remote && !c.allow_fault_injection);
        assert!(c.max_tcp_connections.is_none() && c.tcp.is_none() && c.token_file.is_none());
        assert!(c.allow_uids.is_empty() && c.watchdog.is_none());
        assert_eq!(Config::new("t").instance, "t");
    }

    #[test]
    fn flags_set_their_fields_and_ranges_are_checked() {
        let c = parse(&[
            "--segment",
            "sysv",
            "--workers",
            "3",
            "--allow-uid",
            "7",
            "--allow-uid",
            "8",
            "--max-tcp-connections",
            "9",
        ])
        .unwrap();
        assert_eq!(c.backend, Backend::SysV);
        assert_eq!(
            (c.workers, c.allow_uids, c.max_tcp_connections),
            (3, vec![7, 8], Some(9))
        );
        assert_eq!(
            parse(&["--segment", "posix"]).unwrap().backend,
            Backend::Posix
        );
        let refused = [
            &["--segment", "tmpfs"][..],
            &["--max-tcp-connections", "0"],
            &["--write-timeout-ms", "0"],
            &["--conn-arena-percent", "101"],
            &["--peer-arena-percent", "0"],
        ];
        for args in refused {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }
}

impl Config {
    /// The TCP listener's connection budget.
    pub fn tcp_connections(&self) -> usize {
        self.max_tcp_connections.unwrap_or(self.max_connections)
    }

    /// Every pool that runs, its values settled: the builtin pool first
    /// (unless disabled), with the top-level options; then the file's
    /// pools, each taking the top-level option for a key it does not set.
    pub fn pools(&self) -> Vec<pools::PoolConfig> {
        use pools::{PoolConfig, PoolKind, PoolSpec};
        let builtin = PoolSpec {
            name: pools::BUILTIN.into(),
            kind: PoolKind::Builtin,
            workers: None,
            job_timeout_ms: None,
            max_attempts: None,
            max_result_mib: None,
            recycle_after_jobs: None,
            recycle_above_rss_mib: None,
            segment_mib: None,
            backend: None,
            run_as: self.builtin_run_as.clone(),
            memory_limit_mib: None,
            env: Vec::new(),
            cwd: None,
            origin: "the command line and top-level options".into(),
        };
        // A pool's largest payload is what its segment's largest slot
        // holds, up to --max-payload; its largest result, unless set, too.
        let max_payload = |segment_mib: u64| {
            let largest = ipc_core::SlotAllocator::max_slot_for(segment_mib.saturating_mul(MIB));
            self.max_payload.min(largest.saturating_sub(RESULT_RESERVE))
        };
        self.builtin_pool
            .then_some(builtin)
            .into_iter()
            .chain(self.pools.iter().cloned())
            .map(|p| PoolConfig {
                workers: p.workers.unwrap_or(self.workers),
                job_timeout_ms: p.job_timeout_ms.unwrap_or(self.job_timeout_ms),
                max_attempts: p.max_attempts.unwrap_or(self.max_attempts),
                max_payload: max_payload(p.segment_mib.unwrap_or(self.segment_mib)),
                max_result: p.max_result_mib.or(self.max_result_mib).map_or(
                    max_payload(p.segment_mib.unwrap_or(self.segment_mib)),
                    |m| m.saturating_mul(MIB),
                ),
                recycle_after_jobs: p.recycle_after_jobs.or(self.recycle_after_jobs),
                recycle_above_rss_mib: p.recycle_above_rss_mib.or(self.recycle_above_rss_mib),
                segment_mib: p.segment_mib.unwrap_or(self.segment_mib),
                backend: p.backend.unwrap_or(if another_uid(&p) {
                    Backend::SysV
                } else {
                    self.backend
                }),
                run_as: p.run_as,
                memory_limit_mib: p.memory_limit_mib.or(self.memory_limit_mib),
                env: p.env,
                cwd: p.cwd,
                name: p.name,
                kind: p.kind,
                origin: p.origin,
            })
            .collect()
    }

    /// Workers of every pool.
    pub fn total_workers(&self) -> usize {
        self.pools().iter().map(|p| p.workers).sum()
    }
}

/// Whether a pool's workers run as another uid than the dispatcher's. Such
/// a pool's segment is System V unless it says otherwise (and it may not
/// say POSIX): its user owns the segment, and a POSIX segment's owner can
/// `ftruncate` it, after which the dispatcher's next access to it is a
/// SIGBUS that kills it. A System V segment's size cannot change.
fn another_uid(p: &pools::PoolSpec) -> bool {
    p.run_as
        .as_ref()
        .is_some_and(|r| r.uid != nix::unistd::geteuid().as_raw())
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
    run_with(config, None)
}

/// [`run`], serving the listening sockets `passed` (by the watchdog or
/// systemd: [`held`]) instead of binding its own.
pub fn run_with(
    config: Config,
    passed: Option<ipc_core::activation::Passed>,
) -> Result<(), DispatcherError> {
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
    // What jobs leave behind becomes ours, to kill and reap (`orphans.rs`).
    orphans::Orphans::adopt();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(config, passed))
}

/// A value the dispatcher refuses, and the option to blame: the flag's long
/// name without its dashes (`workers`, `tcp`), so that `osps-dispatcher
/// --config` can name the key and line of the file that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: &'static str,
    pub message: String,
}

impl Config {
    /// Checks what the flags' own parsers cannot: values in range and
    /// combinations that make sense. The same rules apply to flags and to a
    /// configuration file.
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |key: &'static str, message: String| Err(Invalid { key, message });
        if self.workers == 0 {
            return bad("workers", "--workers must be at least 1".into());
        }
        if self.max_connections == 0 || self.max_in_flight == 0 {
            let key = if self.max_connections == 0 {
                "max-connections"
            } else {
                "max-in-flight"
            };
            return bad(
                key,
                "--max-connections and --max-in-flight must be at least 1".into(),
            );
        }
        if self.job_timeout_ms == 0 {
            return bad(
                "job-timeout-ms",
                "--job-timeout-ms must be at least 1".into(),
            );
        }
        self.validate_tcp()?;
        metrics_http::validate(self)?;
        self.validate_sizes()?;
        self.validate_pools()
    }

    /// At least one pool; each one's largest result fits in a slot.
    fn validate_pools(&self) -> Result<(), Invalid> {
        let pools = self.pools();
        if pools.is_empty() {
            return Err(Invalid {
                key: "pools",
                message: "no pool runs: [pools.builtin] has enabled = false and no other [pools.NAME] is configured".into(),
            });
        }
        if pools.len() > ipc_core::paths::MAX_POOLS {
            return Err(Invalid {
                key: "pools",
                message: format!(
                    "{} pools: a dispatcher runs at most {}",
                    pools.len(),
                    ipc_core::paths::MAX_POOLS
                ),
            });
        }
        if let Some(p) = self
            .pools
            .iter()
            .find(|p| another_uid(p) && p.backend == Some(Backend::Posix))
        {
            return Err(Invalid {
                key: "segment",
                message: format!(
                    "pool \"{}\" ({}) runs as user \"{}\", another uid than the dispatcher's, so its segment is given to that user; a POSIX segment's owner can shrink it and crash the dispatcher: remove segment = \"posix\" (such a pool gets a System V segment)",
                    p.name,
                    p.origin,
                    p.run_as.as_ref().map_or("", |r| r.user.as_str())
                ),
            });
        }
        let max_slot = |p: &pools::PoolConfig| {
            ipc_core::SlotAllocator::max_slot_for(p.segment_mib.saturating_mul(MIB))
        };
        match pools.iter().find(|p| p.max_result > max_slot(p)) {
            Some(p) => Err(Invalid {
                key: "max-result-mib",
                message: format!(
                    "pool \"{}\" ({}): a result of up to {} MiB needs a slot its {} MiB segment cannot give (its largest is {} bytes); raise its segment_mib (--segment-mib) or lower max_result_mib",
                    p.name, p.origin, p.max_result >> 20, p.segment_mib, max_slot(p)
                ),
            }),
            None => Ok(()),
        }
    }

    fn validate_tcp(&self) -> Result<(), Invalid> {
        let bad = |key: &'static str, message: String| Err(Invalid { key, message });
        match self.tcp {
            Some(addr) if !ipc_core::peer::is_loopback(addr.ip()) && !self.tcp_allow_remote => {
                bad("tcp", format!("--tcp {addr} is not a loopback address; OSPS listens on loopback (127.0.0.0/8, ::1) unless given --tcp-allow-remote and --token-file"))
            }
            Some(addr) if !ipc_core::peer::is_loopback(addr.ip()) && self.token_file.is_none() => {
                bad("tcp-allow-remote", format!("--tcp {addr} with --tcp-allow-remote needs --token-file: remote clients must present a token ({})", ipc_core::token::HOW_TO_MAKE))
            }
            None if self.tcp_allow_remote || self.token_file.is_some() => bad(
                if self.tcp_allow_remote { "tcp-allow-remote" } else { "token-file" },
                "--tcp-allow-remote and --token-file apply to a TCP listener: add --tcp ADDR".into(),
            ),
            _ => Ok(()),
        }
    }

    fn validate_sizes(&self) -> Result<(), Invalid> {
        let arena = self
            .segment_mib
            .checked_mul(MIB)
            .filter(|a| (MIB..=1 << 40).contains(a));
        let Some(arena) = arena else {
            return Err(Invalid {
                key: "segment-mib",
                message: format!(
                    "--segment-mib {} must be from 1 to 1048576",
                    self.segment_mib
                ),
            });
        };
        let max_slot = ipc_core::SlotAllocator::max_slot_for(arena);
        if self
            .max_payload
            .checked_add(RESULT_RESERVE)
            .is_none_or(|need| need > max_slot)
        {
            return Err(Invalid {
                key: "max-payload",
                message: format!(
                    "a payload of {} bytes needs a slot of {} bytes, but a {} MiB segment's largest slot is {} bytes; raise --segment-mib or lower --max-payload",
                    self.max_payload,
                    ipc_core::SlotAllocator::slot_len(self.max_payload.saturating_add(RESULT_RESERVE)),
                    self.segment_mib,
                    max_slot
                ),
            });
        }
        Ok(())
    }
}

fn check(c: &Config) -> Result<(), DispatcherError> {
    c.validate().map_err(|e| DispatcherError::Config(e.message))
}

/// Removes what this dispatcher created under the instance's names, however
/// `serve` ends (return, error or panic unwinding).
struct Cleanup {
    /// `None` for a socket passed to us: its holder removes it.
    socket: Option<PathBuf>,
    /// One per pool (and, during a reload, the new pools' and those
    /// retiring): the state file's list, kept by `reload.rs`.
    segments: Rc<std::cell::RefCell<Vec<ipc_core::paths::RecordedSegment>>>,
    /// The state file naming the segments: gone with them.
    state: PathBuf,
    /// The configuration applied last (`RuntimePaths::applied_config`):
    /// kept for a restart after a crash or a failed start, removed at an
    /// ordered stop (set then).
    applied: Option<PathBuf>,
    /// The workers' memory cgroups: what is left of them (nothing, after
    /// an ordered stop) is killed and removed, and their directory.
    cgroups: Option<Rc<ipc_core::cgroup::Cgroups>>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
        for name in self.segments.borrow().iter().map(|s| &s.name) {
            if !segment::unlink(name) {
                // Its pool's user owns it, and may have renamed or removed it.
                tracing::warn!(segment = %name, "the segment was gone already at the stop (renamed or removed by its pool's user?)");
            }
        }
        let _ = std::fs::remove_file(&self.state);
        if let Some(applied) = &self.applied {
            let _ = std::fs::remove_file(applied);
        }
        if let Some(cgroups) = &self.cgroups {
            for what in cgroups.remove_all() {
                tracing::warn!("removed the {what}, left at the stop");
            }
        }
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
            admission::fd_reserve(config.total_workers()),
            config.total_workers()
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
                config.total_workers()
            );
        }
    }
    Ok(b)
}

/// What a running dispatcher holds, released in this order at the end.
struct Running {
    shared: Rc<Shared>,
    /// Removes the socket, the segment and the state file.
    cleanup: Cleanup,
    /// Shared with reloads, which make segments under it.
    lock: Rc<InstanceLock>,
    /// Set when this start made the instance directory (then removed at stop).
    made_dir: Option<RuntimePaths>,
}

/// Takes the lock, clears a dead predecessor's objects, and builds the
/// segment and the shared state. A socket passed to us (`held`) is kept.
fn start(config: Config, held: bool) -> Result<Running, DispatcherError> {
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
    let made_dir = paths.ensure_dir()?.then(|| paths.clone());
    let budgets = budgets(&config)?;
    let lock = InstanceLock::acquire(&paths.lock_file())?;
    // We hold the lock: what the state file names belongs to a dead
    // predecessor. Its segment is removed only if ours, never opened.
    let before = ipc_core::start::clear_predecessor(&paths, &lock, held);
    for what in &before.removed {
        let (kind, name) = what.split_once(' ').unwrap_or((what, ""));
        tracing::warn!(%name, "removed the {kind} of a dead predecessor");
    }
    // One segment per pool, each given to the uid its workers run as.
    let wanted: Vec<_> = config
        .pools()
        .iter()
        .map(|p| ipc_core::start::Wanted {
            backend: p.backend,
            arena_len: (p.segment_mib * MIB) as usize,
            owner: p.run_as.as_ref().map(|r| (r.uid, r.gid)),
        })
        .collect();
    let mut segments = ipc_core::start::create_segments(
        &paths,
        &lock,
        &wanted,
        before.generation.saturating_add(1),
    )?;
    let euid = nix::unistd::geteuid().as_raw();
    let recorded = segments
        .iter()
        .zip(&wanted)
        .map(|(s, w)| ipc_core::paths::RecordedSegment {
            name: s.name().to_owned(),
            owner: w.owner.map_or(euid, |(uid, _)| uid),
        })
        .collect();
    let cgroups = ipc_core::cgroup::Cgroups::find(&paths).map(Rc::new);
    let cleanup = Cleanup {
        socket: (!held).then(|| paths.socket()),
        segments: Rc::new(std::cell::RefCell::new(recorded)),
        state: paths.state_file(),
        applied: None,
        cgroups: cgroups.as_ref().ok().cloned(),
    };
    // The names are unlinked by `cleanup`, before the lock is released; the
    // mappings themselves may outlive them in tasks still being torn down.
    for seg in &mut segments {
        seg.disown();
    }
    Ok(Running {
        shared: Shared::new(config, paths, segments, tcp_token, budgets, cgroups),
        cleanup,
        lock: Rc::new(lock),
        made_dir,
    })
}

/// Binds the Unix socket, and the TCP port if configured; or serves the
/// sockets passed to us ([`held::listeners`]).
async fn listen(
    shared: &Shared,
    passed: Option<ipc_core::activation::Passed>,
) -> Result<Vec<Listener>, DispatcherError> {
    if let Some(passed) = passed {
        return held::listeners(shared, passed).await;
    }
    let mode = held::unix_mode(&shared.config);
    let mut listeners = vec![Listener::bind_unix(&shared.paths.socket(), mode)?];
    if let Some(addr) = shared.config.tcp {
        let (l, local) = Listener::bind_tcp(addr).await?;
        let _ = shared.tcp_addr.set(local.to_string());
        listeners.push(l);
    }
    Ok(listeners)
}

/// Starts every pool's drivers (kept by `reload.rs`, with what a reload
/// needs: the lock, the state file's segments, the stop); returns the
/// segments' generation.
fn start_pools(running: &Running, stop: watch::Receiver<bool>) -> u64 {
    let shared = &running.shared;
    let first = shared.pools.first();
    let generation = first
        .slots
        .segment()
        .header()
        .generation
        .load(std::sync::atomic::Ordering::Relaxed);
    let recorded = Rc::clone(&running.cleanup.segments);
    reload::begin(shared, Rc::clone(&running.lock), recorded, generation, stop);
    generation
}

async fn serve(
    config: Config,
    passed: Option<ipc_core::activation::Passed>,
) -> Result<(), DispatcherError> {
    // Signals first, so a SIGTERM during start-up is not lost.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // SIGHUP reloads the configuration (`reload.rs`); installed now, so an
    // early one does not end the process.
    let mut sighup = signal(SignalKind::hangup())?;
    let held = passed.is_some();
    let watchdogs = passed.as_ref().is_some_and(|p| p.from_watchdog);
    let running = start(config, held)?;
    let shared = &running.shared;
    let (stop_tx, stop_rx) = watch::channel(false);
    let generation = start_pools(&running, stop_rx);
    let sweeper = tokio::task::spawn_local(sweep_orphans(Rc::clone(shared)));
    if let Err(refused) = pools_ready(shared).await {
        let _ = stop_tx.send(true);
        reload::stop_all(shared).await;
        return Err(DispatcherError::Config(refused));
    }
    reload::save_applied(shared, &shared.config);
    let listeners = (
        listen(shared, passed).await?,
        metrics_http::start(shared).await?,
    );
    announce_ready(shared, held, generation);
    let why = loop {
        tokio::select! {
            () = listener::serve_next(&listeners.0, shared) => {}
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => reload::on_sighup(shared),
        }
    };
    tracing::info!("{why}: shutting down; no longer accepting connections");
    drop(listeners);
    if !held {
        let _ = std::fs::remove_file(shared.paths.socket());
    }
    drain(shared, &mut sigterm, &mut sigint).await;
    tracing::info!("closing the workers' job pipes and reaping them");
    shared.life.stop_workers();
    let _ = stop_tx.send(true);
    reload::stop_all(shared).await;
    sweeper.abort();
    shared.orphans.sweep();
    tracing::info!(
        jobs_done = shared.stats.jobs_done(),
        jobs_failed = shared.stats.jobs_failed(),
        "workers reaped; removing segments {} and socket",
        segment_names(shared)
    );
    let Running {
        shared,
        mut cleanup,
        lock,
        made_dir,
    } = running;
    if watchdogs && held::holder_died(&shared.config) {
        cleanup.socket = Some(shared.paths.socket());
    }
    cleanup.applied = Some(shared.paths.applied_config());
    drop(shared);
    drop(cleanup);
    drop(lock);
    if let Some(dir) = made_dir {
        dir.remove_dir_if_empty();
    }
    tracing::info!("dispatcher stopped");
    Ok(())
}

/// Says the dispatcher serves, and soon after maps the whole of each
/// segment so no request pays a page fault.
fn announce_ready(shared: &Shared, held: bool, generation: u64) {
    tracing::info!(
        instance = shared.paths.instance(),
        socket = %shared.paths.socket().display(),
        socket_passed = held,
        tcp = ?shared.tcp_addr.get(),
        tcp_token = shared.admission.tcp_token.is_some(),
        segments = %segment_names(shared),
        generation,
        pools = shared.pools.len(),
        workers = shared.config.total_workers(),
        "dispatcher ready"
    );
    for p in &shared.pools {
        p.slots.segment().populate_in_background(POPULATE_AFTER);
    }
}

/// Each pool's segment, `POOL=NAME`, for the log.
fn segment_names(shared: &Shared) -> String {
    let names: Vec<String> = shared
        .pools
        .iter()
        .map(|p| format!("{}={}", p.name(), p.slots.segment().name()))
        .collect();
    names.join(" ")
}

/// How long the dispatcher waits for its pools' first workers before it
/// listens: well under the watchdog's start timeout (10 s by default), so
/// a slow pool never makes the dispatcher look hung. A request for an
/// operation not known by then waits for the pools still starting.
const POOLS_READY_WAIT: Duration = Duration::from_secs(5);

/// Waits (up to [`POOLS_READY_WAIT`]) until each pool's operations are
/// known or its first start has failed, so requests are routed from the
/// first; refuses two pools that serve one operation.
async fn pools_ready(shared: &Shared) -> Result<(), String> {
    let wait = POOLS_READY_WAIT;
    let settled = async {
        for p in &shared.pools {
            p.settle().await;
        }
    };
    let _ = tokio::time::timeout(wait, settled).await;
    if let Some(conflict) = shared.pools.iter().find_map(|p| p.conflict()) {
        return Err(conflict);
    }
    for p in shared.pools.iter().filter(|p| p.ops().is_none()) {
        tracing::warn!(
            pool = p.name(),
            "the pool's first worker is not ready yet; listening all the same (a request for an operation not known yet waits for it)"
        );
    }
    Ok(())
}

/// Kills and reaps what jobs left behind, every second
/// (`orphans::SWEEP_EVERY`; the drivers also sweep after each worker's end).
async fn sweep_orphans(shared: Rc<Shared>) {
    let mut every = tokio::time::interval(orphans::SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        shared.orphans.sweep();
    }
}

/// Ordered shutdown's first half: refuses new jobs, waits up to the drain
/// deadline (or a second signal) for in-flight jobs, and answers what is
/// still queued.
async fn drain(
    shared: &Shared,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) {
    shared.begin_draining();
    let drain = Duration::from_millis(shared.config.drain_timeout_ms);
    let in_flight = shared.in_flight();
    if in_flight > 0 {
        tracing::info!("waiting up to {drain:?} for {in_flight} in-flight job(s)");
    }
    let drained = tokio::select! {
        r = tokio::time::timeout(drain, drained(shared)) => r.is_ok(),
        _ = sigterm.recv() => false,
        _ = sigint.recv() => false,
    };
    if !drained {
        tracing::warn!(
            "{} job(s) still in flight; abandoning them",
            shared.in_flight()
        );
    }
    for job in shared.pools.all().iter().flat_map(|p| p.queue.take_all()) {
        driver::answer_err(
            shared,
            job,
            ipc_core::ErrorKind::ShuttingDown,
            "the dispatcher shut down before the job ran".into(),
        );
    }
}

/// Resolves once no slot is on loan, i.e. every accepted job is answered.
async fn drained(shared: &Shared) {
    for p in shared.pools.all() {
        p.slots.all_returned().await;
    }
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
