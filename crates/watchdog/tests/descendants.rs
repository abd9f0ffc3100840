//! Nothing started on OSPS's behalf outlives it. The workers here are a
//! wrapper (`--worker-exe`) that starts two children and then execs the real
//! `osps-worker`: one child stays in the worker's process group, the other
//! leaves it with `setsid` (a double fork). Both must be killed and reaped
//! when the dispatcher is killed (SIGKILL, supervised: the watchdog sweeps)
//! or stopped (the watchdog's SIGTERM; an unsupervised SIGTERM, where the
//! dispatcher kills what is left in each worker's process group), and when a
//! job times out (its worker's process group is killed).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipc_core::ErrorKind;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use osps_client::ClientError;
use osps_testkit::{wait_for, Instance, PATIENCE};

/// A process the wrapper started, identified by pid and start time (so a
/// reused pid is not mistaken for it).
#[derive(Debug, Clone)]
struct Kid {
    /// `group` (in the worker's process group) or `session` (its own session).
    kind: String,
    pid: u32,
    start: String,
}

/// Field 22 (start time) and field 3 (state) of `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(String, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = s[s.rfind(')')? + 2..].split(' ').collect();
    Some((rest.get(19)?.to_string(), rest[0].chars().next()?))
}

impl Kid {
    /// Its state, while it exists (a zombie is `Z`); `None` once reaped.
    fn state(&self) -> Option<char> {
        stat(self.pid)
            .filter(|(start, _)| *start == self.start)
            .map(|(_, state)| state)
    }

    /// Gone for good: reaped by whoever is its parent (us, when it was
    /// reparented to the test as subreaper: then we reap it here).
    fn reaped(&self) -> bool {
        if self.state() == Some('Z') {
            let _ = waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG));
        }
        self.state().is_none()
    }
}

/// The wrapper worker and the file where its children write their pids.
/// Dropping it kills and reaps every child still there.
struct LeavesChildren {
    _dir: tempfile::TempDir,
    wrapper: PathBuf,
    pidfile: PathBuf,
}

impl LeavesChildren {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("osps-kids-")
            .tempdir()
            .unwrap();
        let pidfile = dir.path().join("kids");
        let wrapper = dir.path().join("worker-with-children");
        let script = format!(
            "#!/bin/sh\n\
             sh -c 'echo \"group $$\" >> \"$0\"; exec sleep 1000' '{pids}' &\n\
             setsid sh -c 'echo \"session $$\" >> \"$0\"; exec sleep 1000' '{pids}' &\n\
             exec '{worker}' \"$@\"\n",
            pids = pidfile.display(),
            worker = osps_testkit::bin("osps-worker").display(),
        );
        osps_testkit::write_exe(&wrapper, script.as_bytes());
        LeavesChildren {
            _dir: dir,
            wrapper,
            pidfile,
        }
    }

    fn exe(&self) -> &str {
        self.wrapper.to_str().unwrap()
    }

    /// Every child recorded so far.
    fn kids(&self) -> Vec<Kid> {
        std::fs::read_to_string(&self.pidfile)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (kind, pid) = l.split_once(' ')?;
                let pid = pid.parse().ok()?;
                let (start, _) = stat(pid)?;
                Some(Kid {
                    kind: kind.into(),
                    pid,
                    start,
                })
            })
            .collect()
    }

    /// Waits until `n` children are recorded, all running.
    fn wait_kids(&self, n: usize) -> Vec<Kid> {
        wait_for(PATIENCE, || {
            let kids = self.kids();
            (kids.len() >= n && kids.iter().all(|k| k.state().is_some_and(|s| s != 'Z')))
                .then_some(kids)
        })
        .unwrap_or_else(|| panic!("{n} children expected, got {:?}", self.kids()))
    }
}

impl Drop for LeavesChildren {
    fn drop(&mut self) {
        for k in self.kids() {
            if k.state().is_some() {
                let _ = kill(Pid::from_raw(k.pid as i32), Signal::SIGKILL);
                let _ = wait_for(Duration::from_secs(5), || k.reaped().then_some(()));
            }
        }
    }
}

/// Waits until every kid in `kids` is reaped; returns how long it took.
fn wait_reaped(kids: &[Kid], inst: &Instance, what: &str) -> Duration {
    let t = Instant::now();
    let done = wait_for(PATIENCE, || kids.iter().all(Kid::reaped).then_some(()));
    let left: Vec<(&Kid, Option<char>)> = kids
        .iter()
        .filter(|k| k.state().is_some())
        .map(|k| (k, k.state()))
        .collect();
    assert!(
        done.is_some(),
        "{what}: still there after {PATIENCE:?}: {left:?}; log:\n{}",
        inst.log()
    );
    t.elapsed()
}

/// Workers that leave children behind, and the dispatcher arguments to run them.
fn children_and_args(extra: &[&'static str]) -> (LeavesChildren, Vec<String>) {
    let children = LeavesChildren::new();
    let args = dispatcher_args(&children, extra);
    (children, args)
}

fn dispatcher_args(kids: &LeavesChildren, extra: &[&'static str]) -> Vec<String> {
    let mut args: Vec<String> = osps_testkit::args!(2, 16, 1048576, "--worker-exe", kids.exe())
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn sigkill_of_a_supervised_dispatcher_kills_and_reaps_everything_its_workers_started() {
    let (children, args) = children_and_args(&[]);
    let inst = Instance::supervised("kidskill", &["--heartbeat-ms", "100"], &strs(&args));
    let kids = children.wait_kids(4);
    assert_eq!(kids.iter().filter(|k| k.kind == "session").count(), 2);
    let old = inst.dispatcher_pid();
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    let took = wait_reaped(&kids, &inst, "after the dispatcher's SIGKILL");
    eprintln!(
        "all 4 children of the killed dispatcher's workers reaped {took:?} after its SIGKILL"
    );
    // The next dispatcher serves, and its workers' children are new ones.
    inst.wait_status("a new dispatcher with idle workers", |s| {
        s.dispatcher_pid != old && s.workers.iter().all(|w| w.state == "idle")
    });
    assert!(
        inst.log().contains("killed a leftover of the dispatcher"),
        "{}",
        inst.log()
    );
}

#[test]
fn a_supervised_ordered_stop_leaves_no_process_behind() {
    let (children, args) = children_and_args(&[]);
    let mut inst = Instance::supervised("kidsstop", &[], &strs(&args));
    let kids = children.wait_kids(4);
    inst.signal(Signal::SIGTERM); // to the watchdog
    let status = inst.wait_exit(PATIENCE).expect("the watchdog exits");
    assert!(status.success(), "{status}; log:\n{}", inst.log());
    // Reaped by the watchdog before it exited (the test, as subreaper,
    // would otherwise have inherited them).
    let left: Vec<&Kid> = kids.iter().filter(|k| k.state().is_some()).collect();
    assert!(
        left.is_empty(),
        "left by the stopped watchdog: {left:?}; log:\n{}",
        inst.log()
    );
}

#[test]
fn an_unsupervised_sigterm_kills_what_the_workers_left_in_their_process_groups() {
    let (children, args) = children_and_args(&[]);
    let mut inst = Instance::start("kidsterm", &strs(&args));
    let kids = children.wait_kids(4);
    inst.signal(Signal::SIGTERM);
    let status = inst.wait_exit(PATIENCE).expect("the dispatcher exits");
    assert!(status.success(), "{status}; log:\n{}", inst.log());
    // Without a watchdog, what left the worker's process group (setsid) is
    // not covered: see the README. The guard kills it.
    let in_group: Vec<Kid> = kids.into_iter().filter(|k| k.kind == "group").collect();
    wait_reaped(&in_group, &inst, "after the dispatcher's ordered stop");
}

#[test]
fn a_job_timeout_kills_what_its_worker_left_in_its_process_group() {
    let (children, args) = children_and_args(&["--job-timeout-ms", "500"]);
    let inst = Instance::start("kidstimeout", &strs(&args));
    let kids = children.wait_kids(4);
    let mut c = inst.client();
    match c.call("sleep", &["20000"], &[]).unwrap_err() {
        ClientError::Remote(e) => assert_eq!(e.kind, ErrorKind::Timeout, "{e}"),
        other => panic!("expected a timeout, got {other}"),
    }
    let killed = inst
        .status()
        .workers
        .iter()
        .map(|w| w.restarts)
        .sum::<u64>();
    assert_eq!(killed, 1);
    // The timed-out worker's child in its group died with it: one of the two
    // `group` children is gone (the other worker's is still there).
    let group: Vec<Kid> = kids.into_iter().filter(|k| k.kind == "group").collect();
    let gone = wait_for(PATIENCE, || {
        let reaped = group.iter().filter(|k| k.reaped()).count();
        (reaped == 1).then_some(())
    });
    assert!(gone.is_some(), "{group:?}; log:\n{}", inst.log());
}

/// The processes a `spawn` job started (fault injection: one `sleep` in its
/// worker's process group, one in its own session), from its answer.
/// Dropping it kills and reaps any still there.
struct JobKids(Vec<Kid>);

impl JobKids {
    /// Runs `spawn` on `inst` and reads the pids it answers.
    fn spawn(inst: &Instance) -> JobKids {
        let out = inst
            .client()
            .call("spawn", &[], &[])
            .unwrap_or_else(|e| panic!("spawn: {e}; log:\n{}", inst.log()));
        let text = String::from_utf8(out).unwrap();
        let kids: Vec<Kid> = text
            .lines()
            .map(|l| {
                let (kind, pid) = l.split_once(' ').expect("KIND PID");
                let pid = pid.parse().expect("a pid");
                let (start, _) = stat(pid).unwrap_or_else(|| panic!("{l}: no such process"));
                Kid {
                    kind: kind.into(),
                    pid,
                    start,
                }
            })
            .collect();
        let kids = JobKids(kids);
        assert_eq!(
            kids.0.iter().map(|k| k.kind.as_str()).collect::<Vec<_>>(),
            ["group", "session"],
            "{text}"
        );
        // The second really left: setsid(1) made it a session (and group) leader.
        let session = &kids.0[1];
        let own = wait_for(PATIENCE, || {
            let s = std::fs::read_to_string(format!("/proc/{}/stat", session.pid)).ok()?;
            let f: Vec<&str> = s[s.rfind(')')? + 2..].split(' ').collect();
            (f[3] == session.pid.to_string()).then_some(())
        });
        assert!(own.is_some(), "{session:?} never got its own session");
        kids
    }

    fn of(&self, kind: &str) -> Vec<Kid> {
        self.0.iter().filter(|k| k.kind == kind).cloned().collect()
    }
}

impl Drop for JobKids {
    fn drop(&mut self) {
        for k in &self.0 {
            if k.state().is_some() {
                let _ = kill(Pid::from_raw(k.pid as i32), Signal::SIGKILL);
                let _ = wait_for(Duration::from_secs(5), || k.reaped().then_some(()));
            }
        }
    }
}

const SPAWN_ARGS: &[&str] = osps_testkit::args!(1, 8, 65536, "--allow-fault-injection");

#[test]
fn sigkill_of_a_supervised_dispatcher_kills_and_reaps_what_a_job_started() {
    let inst = Instance::supervised("jobkidskill", &["--heartbeat-ms", "100"], SPAWN_ARGS);
    let kids = JobKids::spawn(&inst);
    assert!(kids.0.iter().all(|k| k.state().is_some_and(|s| s != 'Z')));
    let old = inst.dispatcher_pid();
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    let took = wait_reaped(&kids.0, &inst, "after the dispatcher's SIGKILL");
    eprintln!("both processes a job started were reaped {took:?} after its dispatcher's SIGKILL");
    inst.wait_status("a new dispatcher with idle workers", |s| {
        s.dispatcher_pid != old && s.workers.iter().all(|w| w.state == "idle")
    });
}

#[test]
fn a_job_timeout_kills_what_an_earlier_job_left_in_its_workers_process_group() {
    let mut args = SPAWN_ARGS.to_vec();
    args.extend(["--job-timeout-ms", "500"]);
    let inst = Instance::start("jobkidstimeout", &args);
    let kids = JobKids::spawn(&inst);
    // The same (only) worker runs a job past the timeout: it is killed with
    // its whole process group.
    match inst.client().call("sleep", &["20000"], &[]).unwrap_err() {
        ClientError::Remote(e) => assert_eq!(e.kind, ErrorKind::Timeout, "{e}"),
        other => panic!("expected a timeout, got {other}"),
    }
    wait_reaped(&kids.of("group"), &inst, "after its worker's timeout");
    // Without a watchdog, what left the group is not covered (README); the
    // guard kills it.
}
