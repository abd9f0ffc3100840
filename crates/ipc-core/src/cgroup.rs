//! Memory cgroups for the workers of pools with a memory limit
//! (`memory_limit_mib`): one cgroup per worker, so the kernel counts all
//! the memory the worker and whatever it starts take (heap, shared
//! anonymous mappings, tmpfs pages they write, page cache), which
//! `RLIMIT_DATA` alone does not, and OOM-kills inside that cgroup alone
//! when the limit is passed.
//!
//! Where: [`Cgroups::find`] looks, once at the dispatcher's start, for a
//! place this process may make cgroups with the memory controller:
//!
//! * **cgroup v2**: the parent of our own cgroup, when it was delegated to
//!   us (systemd marks a delegated cgroup with the extended attribute
//!   `trusted.delegate` or `user.delegate`) and has `memory` in its
//!   `cgroup.subtree_control`: the layout of a unit with `Delegate=memory`
//!   and `DelegateSubgroup=supervisor`, whose processes live in the leaf
//!   `supervisor` (cgroup v2 gives a cgroup's children a controller only
//!   when it has no processes of its own);
//! * **cgroup v1**: our own cgroup in the hierarchy the `memory` controller
//!   is mounted on, when we may write there (root, usually).
//!
//! Under it, an instance's worker cgroups live in
//! `osps-UID-INSTANCE-HASH/` ([`RuntimePaths::cgroup_name`]), each named
//! `DISPATCHERPID-N`; while that directory exists its path is kept in the
//! runtime directory ([`RuntimePaths::cgroup_record`]), so a next
//! dispatcher started in another cgroup still finds what a dead one left. A worker's cgroup is made before it is
//! started, with its limit (and the same limit on memory plus swap, so
//! swap is no way out); the dispatcher writes the new process's pid into
//! it, and the launcher (`osps-worker --contain-cgroup DIR`) waits until it
//! is inside before it runs the worker's program. When the worker is gone
//! its cgroup is emptied (what is left in it is killed) and removed; a
//! dispatcher that died leaves them to the next one of its instance, which
//! removes them first thing (it holds the instance's lock).
//!
//! No `unsafe` here: files are read and written with `std`, extended
//! attributes read with `rustix`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::memory::Mechanism;
use crate::RuntimePaths;

/// The cgroup version a place belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The mechanism a limit in such a cgroup is.
    pub fn mechanism(self) -> Mechanism {
        match self {
            Version::V1 => Mechanism::CgroupV1,
            Version::V2 => Mechanism::CgroupV2,
        }
    }

    /// The file holding a cgroup's memory limit.
    fn limit_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }

    /// The file holding a cgroup's OOM kill count (a line `oom_kill N`;
    /// v2's also counts, `oom N`, the times its own limit was hit).
    fn events_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        }
    }

    /// Of the cgroup directory `dir`, by the files it has.
    pub fn of(dir: &Path) -> Option<Version> {
        if dir.join("memory.oom_control").exists() {
            Some(Version::V1)
        } else if dir.join("memory.events").exists() {
            Some(Version::V2)
        } else {
            None
        }
    }
}

/// How long a worker cgroup's removal waits for what is left in it to die.
const EMPTY_PATIENCE: Duration = Duration::from_millis(200);

/// Where an instance's worker cgroups are made, and the count naming them.
#[derive(Debug)]
pub struct Cgroups {
    /// [`RuntimePaths::cgroup_name`] under the place found.
    base: PathBuf,
    version: Version,
    /// [`RuntimePaths::cgroup_record`].
    record: PathBuf,
    /// The next worker cgroup's number.
    next: std::sync::atomic::AtomicU64,
}

impl Cgroups {
    /// Finds where this process may make memory cgroups for the instance
    /// of `paths`. `Err`: why there is no such place, for the log (limits
    /// are then `RLIMIT_DATA` alone).
    pub fn find(paths: &RuntimePaths) -> Result<Cgroups, String> {
        let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
        let (own, mounts) = (read("/proc/self/cgroup")?, read("/proc/self/mountinfo")?);
        let (place, version) = place(&own, &mounts)?;
        Ok(Cgroups {
            base: place.join(paths.cgroup_name()),
            version,
            record: paths.cgroup_record(),
            next: 0.into(),
        })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The directory holding the instance's worker cgroups.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Makes a new worker's cgroup, limited to `bytes` of memory (and of
    /// memory plus swap).
    pub fn worker(&self, bytes: u64) -> Result<WorkerCgroup, String> {
        self.make_base()?;
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.base.join(format!("{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let mut cgroup = WorkerCgroup {
            dir,
            version: self.version,
            oom: None,
        };
        cgroup.limit(bytes)?;
        cgroup.oom = OomEvents::open(&cgroup.dir);
        Ok(cgroup)
    }

    /// The base directory, made if missing (for cgroup v2 with the memory
    /// controller given to its children), and its path recorded.
    fn make_base(&self) -> Result<(), String> {
        match std::fs::create_dir(&self.base) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(format!("cannot make {}: {e}", self.base.display())),
        }
        let path = self.base.as_os_str().as_encoded_bytes();
        crate::paths::write_private(&self.record, path)
            .map_err(|e| format!("cannot write {}: {e}", self.record.display()))?;
        if self.version == Version::V2 {
            write(&self.base.join("cgroup.subtree_control"), "+memory")?;
        }
        Ok(())
    }

    /// Kills what is in every worker cgroup of the instance and removes
    /// them, then the base: at the dispatcher's stop, and (through
    /// [`remove_leftovers`]) what a dead one left. Returns the worker
    /// cgroups it removed; says in the log what it could not remove.
    pub fn remove_all(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.base) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                match empty_and_remove(&entry.path(), self.version) {
                    Ok(()) => removed.push(format!("cgroup {}", entry.path().display())),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        match std::fs::remove_dir(&self.base) {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.record);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", self.base.display()),
        }
        removed
    }
}

/// Removes the worker cgroups a dead dispatcher of the instance of `paths`
/// left (and kills what is still in them), where this process would make
/// them and where the runtime directory records them; call it with the
/// instance's lock held, or once every process of the instance is gone.
/// Returns what it removed.
pub fn remove_leftovers(paths: &RuntimePaths) -> Vec<String> {
    let mut removed = Vec::new();
    if let Some(recorded) = recorded(paths) {
        removed.extend(recorded.remove_all());
    }
    if let Ok(here) = Cgroups::find(paths) {
        removed.extend(here.remove_all());
    }
    removed
}

/// The directory [`RuntimePaths::cgroup_record`] names, if it is a memory
/// cgroup with the instance's name, and the record a regular file of ours.
fn recorded(paths: &RuntimePaths) -> Option<Cgroups> {
    let base = paths.read_cgroup_record()?;
    let named = base.file_name().is_some_and(|n| *n == *paths.cgroup_name());
    let plain = base.is_absolute() && !base.components().any(|c| c.as_os_str() == "..");
    let version = Version::of(&base).filter(|_| named && plain)?;
    Some(Cgroups {
        base,
        version,
        record: paths.cgroup_record(),
        next: 0.into(),
    })
}

/// One worker's memory cgroup: emptied and removed when dropped.
#[derive(Debug)]
pub struct WorkerCgroup {
    dir: PathBuf,
    version: Version,
    /// Its OOM counts, opened once: read as each job starts.
    oom: Option<OomEvents>,
}

impl WorkerCgroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Moves process `pid` into it.
    pub fn enter(&self, pid: u32) -> Result<(), String> {
        enter(&self.dir, pid)
    }

    /// Its OOM counts as a job starts on it ([`OomEvents::start`]; zero
    /// where unreadable).
    pub fn oom_start(&self) -> OomCount {
        self.oom
            .as_ref()
            .and_then(OomEvents::start)
            .unwrap_or_default()
    }

    /// Its OOM counts now (zero where unreadable).
    pub fn oom_count(&self) -> OomCount {
        self.oom
            .as_ref()
            .and_then(OomEvents::read)
            .unwrap_or_default()
    }

    fn limit(&self, bytes: u64) -> Result<(), String> {
        write(
            &self.dir.join(self.version.limit_file()),
            &bytes.to_string(),
        )?;
        let swap = match self.version {
            Version::V1 => ("memory.memsw.limit_in_bytes", bytes.to_string()),
            Version::V2 => ("memory.swap.max", "0".to_owned()),
        };
        // Absent where the kernel accounts no swap: nothing to close then.
        match std::fs::write(self.dir.join(swap.0), swap.1) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(format!(
                "cannot write {}: {e}",
                self.dir.join(swap.0).display()
            )),
            _ => Ok(()),
        }
    }
}

impl Drop for WorkerCgroup {
    /// Removes it at once when it is empty (the worker reaped, what it left
    /// killed: the usual case); else kills what is in it and leaves the
    /// wait for them to a thread of its own, so the dispatcher's event
    /// loop never sleeps here.
    fn drop(&mut self) {
        if std::fs::remove_dir(&self.dir).is_ok() {
            return;
        }
        kill_all(&self.dir, self.version);
        let (dir, version) = (self.dir.clone(), self.version);
        let spawned = std::thread::Builder::new()
            .name("osps-cgroup-rm".into())
            .spawn(move || {
                if let Err(e) = empty_and_remove(&dir, version) {
                    tracing::warn!("{e} (removed at the stop, or by the next start)");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot remove the cgroup {}: {e}", self.dir.display());
        }
    }
}

/// The directory of the memory cgroup process `pid` is in: its cgroup in
/// the v1 hierarchy of the `memory` controller where there is one, else
/// its cgroup v2.
pub fn memory_cgroup_of(pid: u32) -> Option<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    match v1_memory_path(&own) {
        Some(rel) => mounted(&mounts, memory_v1, rel),
        None => {
            let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
            mounted(&mounts, |fs, _| fs == "cgroup2", rel)
        }
    }
}

/// Moves process `pid` into cgroup `dir` (the kernel may wait for an RCU
/// grace period: milliseconds, on a busy machine).
pub fn enter(dir: &Path, pid: u32) -> Result<(), String> {
    write(&dir.join("cgroup.procs"), &pid.to_string())
}

/// A cgroup's OOM counts at one time ([`OomEvents::read`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomCount {
    /// Processes of the cgroup the kernel's OOM killer ended, whatever ran
    /// out of memory: the cgroup, an enclosing one, or the machine.
    pub kills: u64,
    /// Times the cgroup's own limit was hit: v2's `oom` (reclaim failed at
    /// its `memory.max`); on v1, 1 if its usage reached its limit since
    /// [`OomEvents::start`] (its high-water mark), else 0 (or, without a
    /// readable mark, the kills: each taken for one at the limit).
    pub at_limit: u64,
}

/// Why a process of a cgroup was OOM-killed, between two [`OomCount`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomKilled {
    /// At the cgroup's own limit.
    AtItsLimit,
    /// Not at its limit, which it never reached meanwhile: memory ran out
    /// in an enclosing cgroup or on the machine.
    Elsewhere,
}

impl OomCount {
    /// Whether a process was OOM-killed since `before` (read by
    /// [`OomEvents::start`]), and why (`None`: none was). On v1 a kill
    /// elsewhere after the usage had reached the limit (and reclaim made
    /// room) is taken for one at the limit.
    pub fn since(self, before: OomCount) -> Option<OomKilled> {
        if self.kills <= before.kills {
            None
        } else if self.at_limit > before.at_limit {
            Some(OomKilled::AtItsLimit)
        } else {
            Some(OomKilled::Elsewhere)
        }
    }
}

/// A cgroup's OOM counts, from its files opened once: a reading is one
/// `pread` (two on v1), without allocation (it is read as each job starts).
#[derive(Debug)]
pub struct OomEvents {
    events: std::fs::File,
    version: Version,
    /// Its memory limit (bytes), read as it was opened (`None`: none).
    limit: Option<u64>,
    /// v1: its usage's high-water mark (of memory and swap where swap is
    /// accounted, else of memory), reset as each job starts, and its limit.
    mark: Option<(std::fs::File, u64)>,
}

/// How near its limit a v1 cgroup's high-water mark must be for the limit
/// to count as reached: a charge that fails is not recorded, and one of a
/// few pages at once may fail with less than that left.
const NEAR_THE_LIMIT: u64 = 256 << 10;

impl OomEvents {
    /// The counts of cgroup `dir`; `None` if it has no memory controller.
    pub fn open(dir: &Path) -> Option<OomEvents> {
        let version = Version::of(dir)?;
        let events = std::fs::File::open(dir.join(version.events_file())).ok()?;
        let mark = match version {
            Version::V2 => None,
            Version::V1 => ["memory.memsw.", "memory."]
                .iter()
                .find_map(|prefix| high_water_mark(dir, prefix)),
        };
        Some(OomEvents {
            events,
            version,
            limit: read_u64(&dir.join(version.limit_file())),
            mark,
        })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The cgroup's memory limit in bytes, as it was when opened (`None`:
    /// none, or unreadable).
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// The counts as a job starts: on v1 the high-water mark is reset first
    /// (to the usage now, where this process may write it), so that
    /// `at_limit` says whether the usage reached the limit during the job.
    pub fn start(&self) -> Option<OomCount> {
        use std::os::unix::fs::FileExt;
        let Some((mark, _)) = &self.mark else {
            return self.read();
        };
        let _ = mark.write_at(b"0", 0);
        // Whatever the usage now (at the limit, for a cgroup its page
        // cache fills), the job has not yet reached it.
        let now = self.read()?;
        Some(OomCount { at_limit: 0, ..now })
    }

    /// The counts now (the kernel writes each file afresh at offset 0). On
    /// v1 without a readable high-water mark, every kill counts as one at
    /// the limit.
    pub fn read(&self) -> Option<OomCount> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 512];
        let n = self.events.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = text.lines().find_map(|l| l.strip_prefix(name))?;
            line.trim().parse().ok()
        };
        let kills = field("oom_kill ")?;
        let at_limit = match (self.version, &self.mark) {
            (Version::V2, _) => field("oom ").unwrap_or(kills),
            (Version::V1, Some((mark, limit))) => match read_number(mark) {
                Some(high) => u64::from(high.saturating_add(NEAR_THE_LIMIT) >= *limit),
                None => kills,
            },
            (Version::V1, None) => kills,
        };
        Some(OomCount { kills, at_limit })
    }
}

/// v1's high-water mark of cgroup `dir` for `prefix` (`memory.memsw.` or
/// `memory.`), opened to be reset where this process may, and its limit.
fn high_water_mark(dir: &Path, prefix: &str) -> Option<(std::fs::File, u64)> {
    let path = dir.join(format!("{prefix}max_usage_in_bytes"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .or_else(|_| std::fs::File::open(&path))
        .ok()?;
    let limit = read_u64(&dir.join(format!("{prefix}limit_in_bytes")))?;
    Some((file, limit))
}

/// The number cgroup file `path` holds (`None`: unreadable, or `max`).
fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The number cgroup file `file` holds.
fn read_number(file: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 32];
    let n = file.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}

/// Waits until this process is in cgroup `dir` (its pid in
/// `cgroup.procs`), polling; `Err` after `patience`.
pub fn wait_until_inside(dir: &Path, patience: Duration) -> Result<(), String> {
    let me = std::process::id().to_string();
    let procs = dir.join("cgroup.procs");
    let began = Instant::now();
    // The move is usually done at once, but can take an RCU grace period
    // (ms): look again soon, then less and less often.
    let mut pause = Duration::from_micros(100);
    loop {
        let text = std::fs::read_to_string(&procs)
            .map_err(|e| format!("cannot read {}: {e}", procs.display()))?;
        if text.lines().any(|l| l.trim() == me) {
            return Ok(());
        }
        if began.elapsed() > patience {
            return Err(format!(
                "not moved into the cgroup {} within {patience:?}",
                dir.display()
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    }
}

/// Kills every process in cgroup `dir` and removes it, waiting up to
/// [`EMPTY_PATIENCE`] for them to be gone.
fn empty_and_remove(dir: &Path, version: Version) -> Result<(), String> {
    let began = Instant::now();
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if began.elapsed() > EMPTY_PATIENCE => {
                return Err(format!("cannot remove the cgroup {}: {e}", dir.display()))
            }
            Err(_) => {}
        }
        kill_all(dir, version);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGKILLs every process in cgroup `dir` (`cgroup.kill` where v2 has it,
/// from Linux 5.14; else, v1 included, each one its `cgroup.procs` lists:
/// [`kill_listed`]).
fn kill_all(dir: &Path, version: Version) {
    if version == Version::V2 && std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let procs = dir.join("cgroup.procs");
    let listed = || {
        std::fs::read_to_string(&procs)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .collect::<Vec<i32>>()
    };
    kill_listed(&listed(), listed);
}

/// SIGKILLs each of `pids` (read from a cgroup's list) that the list holds
/// still once a pidfd is open on it (`still_listed`, read after): a pid
/// whose process ended after the first reading and that the kernel gave to
/// a process elsewhere is not signalled, as a plain kill(2) by number would
/// (pids come round soon where `pid_max` is 32768). A pidfd names one
/// process for good; listed after it was opened, that process is in the
/// cgroup. Where no pidfd can be had (a kernel before 5.3, no fd left), a
/// pid still listed gets kill(2) by number, as before pidfds.
fn kill_listed(pids: &[i32], still_listed: impl FnOnce() -> Vec<i32>) {
    use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags};
    let mut opened = Vec::with_capacity(pids.len());
    let mut by_number = Vec::new();
    for &n in pids {
        let Some(pid) = Pid::from_raw(n) else {
            continue;
        };
        match pidfd_open(pid, PidfdFlags::empty()) {
            Ok(fd) => opened.push((n, fd)),
            Err(rustix::io::Errno::SRCH) => {} // gone already
            Err(_) => by_number.push(n),
        }
    }
    if opened.is_empty() && by_number.is_empty() {
        return;
    }
    let listed: std::collections::HashSet<i32> = still_listed().into_iter().collect();
    for (n, fd) in opened.iter().filter(|(n, _)| listed.contains(n)) {
        if let Err(e) = pidfd_send_signal(fd, rustix::process::Signal::KILL) {
            tracing::debug!("SIGKILL of pid {n} through its pidfd: {e}");
        }
    }
    for &n in by_number.iter().filter(|n| listed.contains(n)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(n),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text)
        .map_err(|e| format!("cannot write {text} to {}: {e}", path.display()))
}

/// The directory of the place to make memory cgroups in, from
/// `/proc/self/cgroup` (`own`) and `/proc/self/mountinfo` (`mounts`).
fn place(own: &str, mounts: &str) -> Result<(PathBuf, Version), String> {
    let mut why = Vec::new();
    if let Some(rel) = own.lines().find_map(|l| l.strip_prefix("0::")) {
        if let Some(dir) = mounted(mounts, |fs, _| fs == "cgroup2", rel) {
            match delegated_parent(&dir) {
                Ok(parent) => return Ok((parent, Version::V2)),
                Err(e) => why.push(e),
            }
        }
    }
    match v1_memory_path(own).and_then(|rel| mounted(mounts, memory_v1, rel)) {
        Some(dir) if writable(&dir) => return Ok((dir, Version::V1)),
        Some(dir) => why.push(format!(
            "cgroup v1: {} (our memory cgroup) is not ours to write",
            dir.display()
        )),
        None if why.is_empty() => why.push("no memory cgroup controller is mounted".into()),
        None => {}
    }
    Err(why.join("; "))
}

/// The path of the cgroup in the hierarchy of the v1 `memory` controller,
/// from a `/proc/PID/cgroup`.
fn v1_memory_path(own: &str) -> Option<&str> {
    own.lines().find_map(|l| {
        let mut fields = l.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    })
}

/// Whether a mount (file system type, super options) is the v1 hierarchy
/// of the `memory` controller.
fn memory_v1(fs: &str, opts: &str) -> bool {
    fs == "cgroup" && opts.split(',').any(|o| o == "memory")
}

/// The cgroup v2 directory holding ours, if it is delegated to us with the
/// memory controller given to its children; else why not.
fn delegated_parent(own: &Path) -> Result<PathBuf, String> {
    let parent = own
        .parent()
        .filter(|p| p.join("cgroup.subtree_control").exists())
        .ok_or_else(|| format!("cgroup v2: {} has no parent cgroup", own.display()))?;
    let controls =
        std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
    let mut wanting = Vec::new();
    if !delegated(parent) {
        wanting.push("is not delegated to us (no trusted.delegate or user.delegate attribute)");
    }
    if !controls.split_whitespace().any(|c| c == "memory") {
        wanting.push("has no memory in its cgroup.subtree_control");
    }
    if !writable(parent) {
        wanting.push("is not ours to write");
    }
    if wanting.is_empty() {
        return Ok(parent.to_owned());
    }
    Err(if delegated(own) {
        format!(
            "cgroup v2: our cgroup {} is delegated but holds our own processes, so it cannot give the memory controller to children (systemd: DelegateSubgroup=supervisor puts them in a leaf, and OSPS makes its workers' cgroups beside it)",
            own.display()
        )
    } else {
        format!(
            "cgroup v2: the parent {} of our cgroup {} {} (systemd: Delegate=memory and DelegateSubgroup=supervisor)",
            parent.display(),
            own.display(),
            wanting.join(", ")
        )
    })
}

/// Whether cgroup `dir` was delegated (systemd's extended attribute).
fn delegated(dir: &Path) -> bool {
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let mut value = [0u8; 8];
        rustix::fs::getxattr(dir, *name, &mut value[..]).is_ok_and(|n| &value[..n] == b"1")
    })
}

fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// The directory of cgroup `rel` (a path from `/proc/self/cgroup`) in the
/// hierarchy mounted with a file system type and super options `which`
/// takes (`/proc/self/mountinfo`'s lines).
fn mounted(mounts: &str, which: impl Fn(&str, &str) -> bool, rel: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let mut rest = after.split(' ');
        let (fs, _source, opts) = (rest.next()?, rest.next()?, rest.next()?);
        if !which(fs, opts) {
            return None;
        }
        let (root, point) = (fields.get(3)?, unescape(fields.get(4)?));
        // By components: the cgroup `/innerx` is not inside a mount of `/inner`.
        let inside = Path::new(rel).strip_prefix(root).ok()?;
        let climbs = inside
            .components()
            .any(|c| c == std::path::Component::ParentDir);
        (!climbs).then(|| Path::new(&point).join(inside))
    })
}

/// A mount point as mountinfo writes it (space, tab, newline and backslash
/// as octal escapes).
fn unescape(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `sleep` child, killed and reaped when dropped.
    struct Sleeper(std::process::Child);

    impl Sleeper {
        fn start() -> Sleeper {
            let child = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap();
            Sleeper(child)
        }

        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_record_is_trusted_only_naming_the_instances_cgroup_in_a_file_of_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = RuntimePaths::new("rec", Some(tmp.path())).unwrap();
        std::fs::create_dir(paths.dir()).unwrap();
        // A stand-in memory cgroup (v2's events file) with the instance's name.
        let base = tmp.path().join(paths.cgroup_name());
        let other = tmp.path().join("osps-0-someone-else");
        for dir in [&base, &other] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("memory.events"), "oom_kill 0\n").unwrap();
        }
        let record = |text: &std::ffi::OsStr| {
            crate::paths::write_private(&paths.cgroup_record(), text.as_encoded_bytes()).unwrap()
        };
        let found = |paths: &RuntimePaths| recorded(paths).map(|c| c.base);
        record(base.as_os_str());
        assert_eq!(found(&paths), Some(base.clone()));
        // Another name, a relative path, a `..`: not trusted.
        record(other.as_os_str());
        assert_eq!(found(&paths), None);
        record(std::ffi::OsStr::new(&paths.cgroup_name()));
        assert_eq!(found(&paths), None);
        let dotted = tmp.path().join("x/..").join(paths.cgroup_name());
        record(dotted.as_os_str());
        assert_eq!(found(&paths), None);
        // A link in the record's place, to a file naming it: not followed.
        let elsewhere = tmp.path().join("planted");
        std::fs::write(&elsewhere, base.as_os_str().as_encoded_bytes()).unwrap();
        std::fs::remove_file(paths.cgroup_record()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, paths.cgroup_record()).unwrap();
        assert_eq!(found(&paths), None);
        // A record another uid owns (as root: given to nobody).
        if nix::unistd::geteuid().is_root() {
            std::fs::remove_file(paths.cgroup_record()).unwrap();
            record(base.as_os_str());
            std::os::unix::fs::chown(paths.cgroup_record(), Some(65534), None).unwrap();
            assert_eq!(found(&paths), None);
        }
    }

    #[test]
    fn a_pid_no_longer_listed_once_its_pidfd_is_open_is_not_killed() {
        use std::os::unix::process::ExitStatusExt;
        let mut elsewhere = Sleeper::start();
        let mut inside = Sleeper::start();
        // Both read from the list; then only `inside` is still listed (the
        // other's number went to a process elsewhere, as after a reuse).
        let kept = inside.pid();
        kill_listed(&[elsewhere.pid(), inside.pid()], || vec![kept]);
        let status = inside.0.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status:?}");
        std::thread::sleep(Duration::from_millis(50));
        assert!(elsewhere.0.try_wait().unwrap().is_none(), "killed");
    }

    const MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
35 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
41 30 0:37 /inner /mnt/my\\040cgroups rw - cgroup cgroup rw,memory,pids
";

    #[test]
    fn the_memory_hierarchy_and_the_unified_one_are_found_in_mountinfo() {
        let v1 = memory_v1;
        assert_eq!(
            mounted(MOUNTS, v1, "/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/a/b"))
        );
        assert_eq!(
            mounted(MOUNTS, |fs, _| fs == "cgroup2", "/"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A mount of a subtree, its point with a space in it.
        let pids = |fs: &str, opts: &str| fs == "cgroup" && opts.contains("pids");
        assert_eq!(
            mounted(MOUNTS, pids, "/inner/x"),
            Some(PathBuf::from("/mnt/my cgroups/x"))
        );
        // A cgroup outside the mounted subtree, or climbing out of it.
        assert_eq!(mounted(MOUNTS, pids, "/other"), None);
        // One whose name only begins like the subtree's is outside it.
        assert_eq!(mounted(MOUNTS, pids, "/innerx/y"), None);
        assert_eq!(mounted(MOUNTS, v1, "/a/../../etc"), None);
    }

    #[test]
    fn oom_counts_are_read_from_either_version_and_tell_a_kill_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        assert!(OomEvents::open(dir.path()).is_none());
        write(
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        );
        write("memory.memsw.limit_in_bytes", "33554432\n");
        write("memory.memsw.max_usage_in_bytes", "1000000\n");
        let v1 = OomEvents::open(dir.path()).unwrap();
        let before = v1.start().unwrap();
        assert_eq!(
            before,
            OomCount {
                kills: 3,
                at_limit: 0
            }
        );
        // Killed, the usage below the limit: elsewhere.
        write(
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
        );
        write("memory.memsw.max_usage_in_bytes", "20000000\n");
        assert_eq!(v1.read().unwrap().since(before), Some(OomKilled::Elsewhere));
        // At the limit, or nearly (a charge of a few pages failed).
        let at = |v1: &OomEvents, before| v1.read().unwrap().since(before);
        write("memory.memsw.max_usage_in_bytes", "33554432\n");
        assert_eq!(at(&v1, before), Some(OomKilled::AtItsLimit));
        write("memory.memsw.max_usage_in_bytes", "33452032\n");
        assert_eq!(at(&v1, before), Some(OomKilled::AtItsLimit));
        // At the limit as the job starts (page cache filling the cgroup): a
        // kill then is still at the limit.
        let before = v1.start().unwrap();
        assert_eq!(before.at_limit, 0);
        // (The kernel resets the mark to the usage; a plain file takes the 0.)
        write("memory.memsw.max_usage_in_bytes", "33554432\n");
        let kills = |n| format!("oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n");
        write("memory.oom_control", &kills(5));
        assert_eq!(at(&v1, before), Some(OomKilled::AtItsLimit));
        // No high-water mark to read: every kill is taken for one at the limit.
        std::fs::remove_file(dir.path().join("memory.memsw.max_usage_in_bytes")).unwrap();
        let blind = OomEvents::open(dir.path()).unwrap();
        let before = blind.start().unwrap();
        write("memory.oom_control", &kills(6));
        assert_eq!(at(&blind, before), Some(OomKilled::AtItsLimit));
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(
            v2.path().join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        let events = OomEvents::open(v2.path()).unwrap();
        let before = events.start().unwrap();
        assert_eq!(
            before,
            OomCount {
                kills: 2,
                at_limit: 2
            }
        );
        let later = |kills, at_limit| OomCount { kills, at_limit };
        assert_eq!(later(3, 3).since(before), Some(OomKilled::AtItsLimit));
        assert_eq!(later(3, 2).since(before), Some(OomKilled::Elsewhere));
        assert_eq!(later(2, 5).since(before), None);
        std::fs::write(v2.path().join("memory.max"), "67108864\n").unwrap();
        let limit = |dir: &Path| OomEvents::open(dir)?.limit();
        assert_eq!(limit(v2.path()), Some(64 << 20));
        std::fs::write(v2.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(limit(v2.path()), None);
    }
}
