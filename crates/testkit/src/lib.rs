//! Test and demo support: start the real OSPS binaries on a unique instance in
//! a private runtime directory, under a guard that kills and reaps every
//! process and removes the segment and socket when dropped — even when an
//! assertion failed. Also the leftover checks: processes, zombies, segment,
//! socket.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use ipc_core::status::{StatusReport, WorkerState};
use ipc_core::{Endpoint, RuntimePaths};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use osps_client::Client;

/// Generous bound for anything that should take milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Path of a workspace binary (`osps-dispatcher`, ...), found beside the
/// running test or xtask executable in the cargo target directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "{name} not found near {}; build it first (`cargo build --workspace --bins`; `cargo test --workspace` does it)",
        exe.display()
    );
}

/// A name no other test of this run, nor any parallel run, uses.
pub fn unique_instance(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect();
    format!(
        "t{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        tag
    )
}

/// Makes this process the child subreaper, so workers orphaned by a killed
/// dispatcher become our children and we can reap them (PID 1 of a container
/// may not).
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = nix::sys::prctl::set_child_subreaper(true);
    });
}

/// A process seen in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    /// Its process group.
    pub pgid: u32,
    /// One-letter state (`R`, `S`, `Z`, ...).
    pub state: char,
    pub cmdline: String,
}

/// Reads `/proc/PID/stat` and `cmdline`.
pub fn proc_info(pid: u32) -> Option<Proc> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&raw)
        .replace('\0', " ")
        .trim()
        .to_owned();
    Some(Proc {
        pid,
        ppid,
        pgid,
        state,
        cmdline,
    })
}

/// Every process on the machine.
pub fn all_processes() -> Vec<Proc> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(proc_info)
        .collect()
}

/// Processes whose command line mentions `needle` (e.g. an instance or segment name).
/// Zombies have an empty command line: find them with [`zombies_of`].
pub fn processes_mentioning(needle: &str) -> Vec<Proc> {
    let me = std::process::id();
    all_processes()
        .into_iter()
        .filter(|p| p.pid != me && p.cmdline.contains(needle))
        .collect()
}

/// The live (not zombie) processes of process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    all_processes()
        .into_iter()
        .filter(|p| p.pgid == pgid && !matches!(p.state, 'Z' | 'X'))
        .map(|p| p.pid)
        .collect()
}

/// Waits (up to 5 s) until process group `pgid` has no live process; fails
/// the test, naming them, if some are left.
pub fn assert_group_gone(pgid: u32) {
    let left = wait_for(Duration::from_secs(5), || {
        group_members(pgid).is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "processes of group {pgid} are left: {:?}",
        group_members(pgid)
    );
}

/// The pid a timed-out command's message names after `prefix` (a test's
/// command prints its `$$` to stderr, which the `timeout` answer's tail
/// carries): `message` must start with `prefix`, then the pid.
pub fn pid_after(message: &str, prefix: &str) -> u32 {
    message
        .strip_prefix(prefix)
        .and_then(|rest| rest.parse().ok())
        .unwrap_or_else(|| panic!("{message:?} is not {prefix:?} then a pid"))
}

/// Kills process group `.0` when dropped: a test's guard for the processes
/// a command started, however the test ends.
#[derive(Debug)]
pub struct GroupGuard(pub u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Zombies (state `Z`) whose parent is one of `parents`.
pub fn zombies_of(parents: &[u32]) -> Vec<Proc> {
    all_processes()
        .into_iter()
        .filter(|p| p.state == 'Z' && parents.contains(&p.ppid))
        .collect()
}

/// Pool `pool`'s own segment in a status report.
pub fn pool_segment<'a>(st: &'a StatusReport, pool: &str) -> &'a ipc_core::status::SegmentStatus {
    st.pools
        .iter()
        .find(|p| p.name == pool)
        .and_then(|p| p.segment.as_ref())
        .unwrap_or_else(|| panic!("no pool {pool:?} with a segment in {st:?}"))
}

/// POSIX segments of this instance in `/dev/shm` (any generation's name).
pub fn instance_segments(paths: &RuntimePaths) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir("/dev/shm") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let name = format!("/{}", e.ok()?.file_name().to_str()?);
        paths
            .is_segment_name(&name)
            .then(|| PathBuf::from(format!("/dev/shm{name}")))
    })
    .collect()
}

/// What an instance left behind: processes, segment, socket, state and
/// lock files. Empty when clean.
pub fn leftovers(paths: &RuntimePaths) -> Vec<String> {
    let mut found = Vec::new();
    for p in processes_mentioning(&paths.segment_prefix()) {
        found.push(format!(
            "process {} ({}) state {}",
            p.pid, p.cmdline, p.state
        ));
    }
    for p in processes_mentioning(&format!("--instance {}", paths.instance())) {
        found.push(format!(
            "process {} ({}) state {}",
            p.pid, p.cmdline, p.state
        ));
    }
    for seg in instance_segments(paths) {
        found.push(format!("segment {}", seg.display()));
    }
    let mut sysv: Vec<String> = recorded_segments(paths)
        .into_iter()
        .filter(|n| n.starts_with(ipc_core::segment::SYSV_PREFIX))
        .collect();
    sysv.push(sysv_name(paths));
    sysv.dedup();
    for name in sysv.iter().filter(|n| ipc_core::segment::exists(n)) {
        found.push(format!(
            "System V segment key {} ({name})",
            ipc_core::segment::sysv_key(name)
        ));
    }
    for f in [paths.socket(), paths.state_file(), paths.cgroup_record()] {
        if f.exists() {
            found.push(format!("file {}", f.display()));
        }
    }
    // The directory of its workers' memory cgroups (`ipc_core::cgroup`).
    if let Ok(cgroups) = ipc_core::cgroup::Cgroups::find(paths) {
        if cgroups.base().exists() {
            found.push(format!("cgroup {}", cgroups.base().display()));
        }
    }
    found
}

/// Says why the memory-cgroup tests cannot run here (no place to make
/// memory cgroups: `why`), and whether they may be skipped: not where
/// `OSPS_TEST_REQUIRE_CGROUPS` is set (`.ci/run` sets it: its machine,
/// as root, has a writable memory controller), where a skip would hide a
/// regression.
pub fn skip_without_cgroups(why: &str) -> bool {
    assert!(
        std::env::var_os("OSPS_TEST_REQUIRE_CGROUPS").is_none(),
        "memory cgroups are required here (OSPS_TEST_REQUIRE_CGROUPS) but none can be made: {why}"
    );
    eprintln!("no memory cgroups here, only RLIMIT_DATA: {why}");
    true
}

/// Every segment the instance's state file names (one per pool), while
/// it exists: a live dispatcher's, or a dead one's.
pub fn recorded_segments(paths: &RuntimePaths) -> Vec<String> {
    match paths.read_state() {
        Ok(Some(st)) => st.segments.into_iter().map(|s| s.name).collect(),
        _ => Vec::new(),
    }
}

/// The name of an instance's (first pool's) segment when it runs with `--segment sysv`.
pub fn sysv_name(paths: &RuntimePaths) -> String {
    format!("{}{}", ipc_core::segment::SYSV_PREFIX, paths.segment_name())
}

/// Puts an executable copy of `from` at `to` (mode 0755) for a test to run,
/// perhaps as another uid. The copy is made by `install(1)`, not by this
/// process: a file this multi-threaded test process had open for writing
/// can be held open by a child another test thread forks at that moment,
/// until that child execs, and running it then fails with "text file busy".
pub fn install_exe(from: &Path, to: &Path) {
    let out = std::process::Command::new("install")
        .args(["-m", "0755"])
        .arg(from)
        .arg(to)
        .output()
        .expect("run install(1)");
    assert!(
        out.status.success(),
        "install {} {}: {}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a script (or any executable) at `path`, mode 0755, through
/// [`install_exe`] so that running it never meets "text file busy".
pub fn write_exe(path: &Path, contents: &[u8]) {
    let draft = path.with_extension("draft");
    std::fs::write(&draft, contents).unwrap();
    install_exe(&draft, path);
    std::fs::remove_file(&draft).unwrap();
}

/// Writes a token file as an operator would: mode 0600 from the start.
pub fn write_token_file(path: &Path, token: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(token))
        .expect("write the token file");
}

/// `len` bytes that do not compress (xorshift from a fixed seed: the same
/// bytes every time).
pub fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `text` as `osps.toml` in a fresh directory (removed when the
/// guard is dropped); returns both.
pub fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("osps.toml");
    std::fs::write(&path, text).expect("the configuration file written");
    // Whatever the umask: a file others can write is refused.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&path, private).expect("the configuration file's mode");
    (dir, path)
}

/// What the `sha256` operation answers for `bytes`, computed here: the hex
/// digest and a newline.
pub fn sha256_line(bytes: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut line: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    line.push('\n');
    line.into_bytes()
}

/// What the `wc` operation answers for `bytes`, computed here: "LINES WORDS BYTES\n".
pub fn wc_line(bytes: &[u8]) -> Vec<u8> {
    let lines = bytes.iter().filter(|&&b| b == b'\n').count();
    let words = bytes
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .count();
    format!("{lines} {words} {}\n", bytes.len()).into_bytes()
}

/// Polls `f` until it returns `Some` or `within` passes.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A dispatcher (and its workers) on a private instance.
#[derive(Debug)]
pub struct Instance {
    pub paths: RuntimePaths,
    dir: tempfile::TempDir,
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Instance {
    /// Starts `osps-dispatcher` with `args` (beyond instance and runtime dir)
    /// and waits until every worker is idle.
    pub fn start(tag: &str, args: &[&str]) -> Instance {
        Instance::start_with(tag, args, |_| {})
    }

    /// Like [`Instance::start`], running `before` on the paths first (e.g. to
    /// plant the leftovers of a crashed predecessor).
    pub fn start_with(tag: &str, args: &[&str], before: impl FnOnce(&RuntimePaths)) -> Instance {
        Instance::launch("osps-dispatcher", unique_instance(tag), args, before)
    }

    /// [`Instance::start`], with `env` added to the dispatcher's environment.
    pub fn start_env(tag: &str, env: &[(&str, &str)], args: &[&str]) -> Instance {
        let name = unique_instance(tag);
        Instance::launch_full(&[], "osps-dispatcher", name, args, env, true, |_| {})
    }

    /// Starts a dispatcher for exactly `instance` (in its own private
    /// runtime directory, like every instance here).
    pub fn start_named(instance: &str, args: &[&str]) -> Instance {
        Instance::launch("osps-dispatcher", instance.to_owned(), args, |_| {})
    }

    /// Starts `osps-watchdog` with `watchdog_args`, passing `dispatcher_args`
    /// to its dispatcher, and waits until the dispatcher's workers are idle.
    /// [`Instance::pid`] is then the watchdog's pid.
    pub fn supervised(tag: &str, watchdog_args: &[&str], dispatcher_args: &[&str]) -> Instance {
        let mut args = watchdog_args.to_vec();
        args.push("--");
        args.extend_from_slice(dispatcher_args);
        Instance::launch("osps-watchdog", unique_instance(tag), &args, |_| {})
    }

    /// [`Instance::supervised`], with `env` added to the watchdog's environment.
    pub fn supervised_env(
        tag: &str,
        env: &[(&str, &str)],
        watchdog_args: &[&str],
        dispatcher_args: &[&str],
    ) -> Instance {
        let mut args = watchdog_args.to_vec();
        args.push("--");
        args.extend_from_slice(dispatcher_args);
        Instance::launch_full(
            &[],
            "osps-watchdog",
            unique_instance(tag),
            &args,
            env,
            true,
            |_| {},
        )
    }

    /// [`Instance::supervised`], running `before` on the paths first (e.g.
    /// to hold the instance lock as a draining predecessor would).
    pub fn supervised_with(
        tag: &str,
        watchdog_args: &[&str],
        dispatcher_args: &[&str],
        before: impl FnOnce(&RuntimePaths),
    ) -> Instance {
        let mut args = watchdog_args.to_vec();
        args.push("--");
        args.extend_from_slice(dispatcher_args);
        Instance::launch("osps-watchdog", unique_instance(tag), &args, before)
    }

    fn launch(
        program: &str,
        name: String,
        args: &[&str],
        before: impl FnOnce(&RuntimePaths),
    ) -> Instance {
        Instance::launch_full(&[], program, name, args, &[], true, before)
    }

    /// Starts `osps-dispatcher` with `args` and waits only until it answers
    /// `status` (its workers may never come up).
    pub fn start_answering(tag: &str, args: &[&str]) -> Instance {
        Instance::launch_full(
            &[],
            "osps-dispatcher",
            unique_instance(tag),
            args,
            &[],
            false,
            |_| {},
        )
    }

    /// Like [`Instance::start`], run through `wrapper` (a command that execs
    /// the rest of its arguments, e.g. `["prlimit", "--nofile=64:64"]`), so
    /// that [`Instance::pid`] is still the dispatcher's.
    pub fn start_under(tag: &str, wrapper: &[&str], args: &[&str]) -> Instance {
        Instance::launch_full(
            wrapper,
            "osps-dispatcher",
            unique_instance(tag),
            args,
            &[],
            true,
            |_| {},
        )
    }

    fn launch_full(
        wrapper: &[&str],
        program: &str,
        name: String,
        args: &[&str],
        env: &[(&str, &str)],
        workers_idle: bool,
        before: impl FnOnce(&RuntimePaths),
    ) -> Instance {
        become_subreaper();
        let dir = tempfile::Builder::new()
            .prefix("osps-")
            .tempdir()
            .expect("temp dir");
        let paths = RuntimePaths::new(&name, Some(dir.path())).expect("paths");
        before(&paths);
        let log = dir.path().join("osps.log");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin(program));
                c
            }
            None => Command::new(bin(program)),
        };
        let child = cmd
            .arg("--instance")
            .arg(&name)
            .arg("--runtime-dir")
            .arg(dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let pid = child.id();
        let mut inst = Instance {
            paths,
            dir,
            child: Some(child),
            pid,
            log,
        };
        inst.wait_until(workers_idle);
        inst
    }

    /// Waits until the dispatcher answers and all its workers are idle.
    pub fn wait_ready(&mut self) {
        self.wait_until(true);
    }

    /// Waits until the dispatcher answers (and, with `workers_idle`, all its
    /// workers are idle).
    fn wait_until(&mut self, workers_idle: bool) {
        let ready = wait_for(PATIENCE, || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "dispatcher exited during start-up ({status}); log:\n{}",
                    self.log()
                );
            }
            let s = self.try_status()?;
            (!workers_idle || s.workers.iter().all(|w| w.state == WorkerState::Idle)).then_some(())
        });
        assert!(
            ready.is_some(),
            "dispatcher not ready within {PATIENCE:?}; log:\n{}",
            self.log()
        );
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        self.paths.instance()
    }

    /// The base runtime directory passed to `--runtime-dir`.
    pub fn runtime_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pid of the process started: the dispatcher, or the watchdog of a
    /// [`Instance::supervised`] instance.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The serving dispatcher's pid, from its status report.
    pub fn dispatcher_pid(&self) -> u32 {
        self.status().dispatcher_pid
    }

    /// The Unix endpoint.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.paths.socket())
    }

    /// A new connected client.
    pub fn client(&self) -> Client {
        let mut c = Client::connect(&self.endpoint())
            .unwrap_or_else(|e| panic!("connect: {e}; log:\n{}", self.log()));
        c.set_timeout(Some(PATIENCE * 3)).expect("timeout");
        c
    }

    /// A raw connection to the Unix socket, past the hello (accepted), with
    /// a read timeout: for tests that write frames and bytes by hand.
    pub fn raw_client(&self) -> std::os::unix::net::UnixStream {
        use ipc_core::proto::{self, PROTOCOL_VERSION};
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.paths.socket()).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        s.write_all(&proto::encode_hello(PROTOCOL_VERSION, 0))
            .expect("hello");
        let mut hello = [0u8; proto::HELLO_LEN];
        s.read_exact(&mut hello).expect("the server's hello");
        assert_eq!(proto::decode_hello(&hello), Some((PROTOCOL_VERSION, 0)));
        s
    }

    /// The status report, or `None` if the dispatcher does not answer.
    pub fn try_status(&self) -> Option<StatusReport> {
        let mut c = Client::connect(&self.endpoint()).ok()?;
        c.set_timeout(Some(Duration::from_secs(5))).ok()?;
        c.status().ok()
    }

    /// The status report.
    pub fn status(&self) -> StatusReport {
        self.try_status()
            .unwrap_or_else(|| panic!("no status; log:\n{}", self.log()))
    }

    /// Polls the status report until `pred` holds (for up to [`PATIENCE`])
    /// and returns that report; panics saying `what` was awaited, with the
    /// last report and the log.
    pub fn wait_status(&self, what: &str, pred: impl Fn(&StatusReport) -> bool) -> StatusReport {
        let mut last = None;
        wait_for(PATIENCE, || {
            let st = self.try_status()?;
            if pred(&st) {
                return Some(st);
            }
            last = Some(st);
            None
        })
        .unwrap_or_else(|| {
            panic!(
                "waited for: {what}; last status: {last:?}; log:\n{}",
                self.log()
            )
        })
    }

    /// Worker pids according to the status report.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.status().workers.iter().map(|w| w.pid).collect()
    }

    /// The log (stderr of everything started) so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` to the dispatcher.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid as i32), sig);
    }

    /// Waits for the dispatcher to exit (and reaps it).
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_for(within, || child.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Leftovers of this instance (processes, segment, socket, cgroups).
    pub fn leftovers(&self) -> Vec<String> {
        leftovers(&self.paths)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Everything else of the instance (a dispatcher orphaned by a killed
        // watchdog, workers): kill, then reap those that came back to us as
        // subreaper. Twice, in case a dying watchdog had just spawned one.
        for _ in 0..2 {
            let mut pids: Vec<u32> = processes_mentioning(&self.paths.segment_prefix())
                .iter()
                .map(|p| p.pid)
                .collect();
            pids.extend(
                processes_mentioning(&format!("--instance {}", self.paths.instance()))
                    .iter()
                    .map(|p| p.pid),
            );
            for &pid in &pids {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            for &pid in &pids {
                let _ = wait_for(Duration::from_secs(5), || {
                    match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
                        Ok(nix::sys::wait::WaitStatus::StillAlive) => None,
                        _ => Some(()),
                    }
                });
            }
        }
        // The workers' memory cgroups (of a dispatcher killed above).
        ipc_core::cgroup::remove_leftovers(&self.paths);
        // Every pool's segment the state file names (System V ones cannot
        // be found by listing /dev/shm), then any POSIX one of the instance.
        for name in recorded_segments(&self.paths) {
            ipc_core::segment::unlink(&name);
        }
        ipc_core::segment::unlink(&sysv_name(&self.paths));
        for seg in instance_segments(&self.paths) {
            let _ = fs::remove_file(seg);
        }
        let _ = fs::remove_file(self.paths.socket());
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.name(), self.log());
        }
    }
}

/// The dispatcher's usual sizing flags, in this order: `--workers W
/// --segment-mib M --max-payload P`, then any further arguments as given.
/// Expands to a `&[&str]` (usable in a `const`), so a test's arguments are
/// written once and read at a glance:
/// `osps_testkit::args!(2, 8, 65536, "--max-connections", "50")`; the
/// payload limit may also be a computed `&str` (`args!(1, 8, &big)`).
#[macro_export]
macro_rules! args {
    ($workers:literal, $mib:literal, $payload:literal $(, $extra:expr)* $(,)?) => {
        $crate::args!(@ $workers, $mib, stringify!($payload) $(, $extra)*)
    };
    (@ $workers:literal, $mib:literal, $payload:expr $(, $extra:expr)*) => {
        &[
            "--workers",
            stringify!($workers),
            "--segment-mib",
            stringify!($mib),
            "--max-payload",
            $payload
            $(, $extra)*
        ]
    };
    // A computed payload limit (a `&str`): `args!(1, 8, &big, ...)`.
    ($workers:literal, $mib:literal, $payload:expr $(, $extra:expr)* $(,)?) => {
        $crate::args!(@ $workers, $mib, $payload $(, $extra)*)
    };
}

/// `osps-client --instance NAME --runtime-dir DIR`, for a test to add its
/// own arguments to.
pub fn client_command(instance: &str, runtime_dir: &Path) -> Command {
    let mut cmd = Command::new(bin("osps-client"));
    cmd.args(["--instance", instance, "--runtime-dir"])
        .arg(runtime_dir);
    cmd
}

/// Spawns `cmd` with its stdin, stdout and stderr piped to the test.
pub fn spawn_piped(cmd: &mut Command) -> std::io::Result<Child> {
    spawn_capturing(cmd, Stdio::piped())
}

/// Spawns `cmd` with this stdin and its stdout and stderr piped to the test.
pub fn spawn_capturing(cmd: &mut Command, stdin: Stdio) -> std::io::Result<Child> {
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// A child process (a client, a program run as another uid, ...) killed and
/// reaped when dropped, even when an assertion failed. `None` once taken.
#[derive(Debug)]
pub struct Reaped(pub Option<Child>);

impl Reaped {
    /// Its pid (0 once taken).
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Waits for it to end and collects what it printed.
    pub fn output(mut self) -> std::process::Output {
        self.0.take().expect("running").wait_with_output().unwrap()
    }

    /// SIGTERM, then its exit code (within [`PATIENCE`]); killed if it does
    /// not end by then.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.0.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let status = wait_for(PATIENCE, || child.try_wait().ok().flatten());
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status.and_then(|s| s.code())
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` (stdin and stdout closed, stderr captured), which must end
/// by itself within [`PATIENCE`] (it is killed and reaped otherwise, and
/// the test fails saying `what` did not stop); returns what it printed and
/// its status.
pub fn run_to_exit(cmd: &mut Command, what: &str) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reaped(Some(child));
    let ended = wait_for(PATIENCE, || {
        child.0.as_mut().unwrap().try_wait().unwrap().map(|_| ())
    });
    assert!(ended.is_some(), "{what} did not stop");
    child.output()
}

/// The frame of a request header as a client writes it on a raw connection
/// (the `payload_len` payload bytes are the caller's to send after it).
pub fn request_header(id: u64, op: &str, args: &[&str], payload_len: u64) -> Vec<u8> {
    let req = ipc_core::proto::Request {
        id,
        op: op.into(),
        args: args.iter().copied().collect(),
        payload_len,
    };
    let mut buf = Vec::new();
    ipc_core::frame::encode(&req, &mut buf).unwrap();
    buf
}
