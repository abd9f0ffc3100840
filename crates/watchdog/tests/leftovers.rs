//! A watchdog that finds the instance lock held waits for the previous
//! dispatcher instead of counting its own dispatcher's "lock held" exits as
//! crashes; and a watchdog that outlives its dispatcher (it gave up, or had to
//! SIGKILL it at stop) clears what that dispatcher left: segment (POSIX and
//! System V), socket, state and lock files.

use std::time::{Duration, Instant};

use ipc_core::InstanceLock;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_testkit::{wait_for, Instance, PATIENCE};

const ARGS: &[&str] = osps_testkit::args!(1, 8, 65536);

#[test]
fn a_new_watchdog_waits_for_the_previous_dispatcher_to_release_the_lock() {
    let (tx, rx) = std::sync::mpsc::channel();
    let inst = Instance::supervised_with("lockwait", &["--heartbeat-ms", "100"], ARGS, |paths| {
        // A predecessor still draining: it holds the lock for 1.5 s more.
        paths.ensure_dir().unwrap();
        let lock = InstanceLock::acquire(&paths.lock_file()).unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            drop(lock);
            tx.send(Instant::now()).unwrap();
        });
    });
    let released = rx.recv_timeout(PATIENCE).expect("released");
    let s = inst.status();
    let w = s.watchdog.expect("supervised");
    assert_eq!(
        w.restarts,
        0,
        "waiting is not a crash; log:\n{}",
        inst.log()
    );
    let log = inst.log();
    let said = format!(
        "waiting for the previous dispatcher (pid {}) to finish",
        std::process::id()
    );
    assert_eq!(log.matches(&said).count(), 1, "said once; log:\n{log}");
    assert!(!log.contains("giving up"), "{log}");
    // The dispatcher that serves was started once the lock was free, not
    // before it (status tells how long it has been up; 100 ms of slack for
    // the clock's rounding and the status round trip).
    let up = Duration::from_millis(s.uptime_ms);
    let free = Instant::now().duration_since(released);
    assert!(
        up <= free + Duration::from_millis(100),
        "the dispatcher has been up {up:?}, the lock free only {free:?}; log:\n{log}"
    );
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
}

/// Whether the System V segment of this name is still in the kernel's table.
fn sysv_listed(name: &str) -> bool {
    let key = ipc_core::segment::sysv_key(name).to_string();
    std::fs::read_to_string("/proc/sysvipc/shm")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(key.as_str()))
}

/// Nothing of the instance is left: no segment of any name it used, no
/// socket, lock or state file, no process.
fn assert_nothing_left(inst: &Instance, names: &[String]) {
    for name in names {
        if name.starts_with(ipc_core::segment::SYSV_PREFIX) {
            assert!(!sysv_listed(name), "System V segment {name} left");
        } else {
            let path = ipc_core::segment::fs_path(name);
            assert!(!std::path::Path::new(&path).exists(), "{path} left");
        }
    }
    for f in [
        inst.paths.socket(),
        inst.paths.lock_file(),
        inst.paths.state_file(),
    ] {
        assert!(!f.exists(), "{} left", f.display());
    }
    assert_eq!(inst.leftovers(), Vec::<String>::new());
}

fn ten_sigkills_then_the_watchdog_gives_up_and_leaves_nothing(backend: &str) {
    let mut args = ARGS.to_vec();
    args.extend(["--segment", backend]);
    let mut inst = Instance::supervised(
        &format!("giveup{backend}"),
        &[
            "--heartbeat-ms",
            "100",
            "--max-restarts",
            "9",
            "--within",
            "120",
        ],
        &args,
    );
    let mut names = Vec::new();
    let mut last = 0;
    for kill_no in 1..=10 {
        let s = wait_for(PATIENCE, || {
            inst.try_status()
                .filter(|s| s.dispatcher_pid != last && s.workers.iter().all(|w| w.state == "idle"))
        })
        .unwrap_or_else(|| panic!("dispatcher {kill_no} never served; log:\n{}", inst.log()));
        let name = &s.segment.name;
        names.push(if backend == "sysv" && !name.starts_with("sysv:") {
            format!("sysv:{name}")
        } else {
            name.clone()
        });
        last = s.dispatcher_pid;
        kill(Pid::from_raw(last as i32), Signal::SIGKILL).unwrap();
    }
    let status = inst.wait_exit(PATIENCE).expect("the watchdog gives up");
    assert_eq!(status.code(), Some(1), "log:\n{}", inst.log());
    assert!(inst.log().contains("giving up"));
    assert_nothing_left(&inst, &names);
}

#[test]
fn ten_sigkills_then_the_watchdog_gives_up_and_leaves_nothing_posix() {
    ten_sigkills_then_the_watchdog_gives_up_and_leaves_nothing("posix");
}

#[test]
fn ten_sigkills_then_the_watchdog_gives_up_and_leaves_nothing_sysv() {
    ten_sigkills_then_the_watchdog_gives_up_and_leaves_nothing("sysv");
}

#[test]
fn a_dispatcher_killed_at_the_end_of_the_stop_grace_leaves_nothing() {
    let mut inst = Instance::supervised(
        "killedatstop",
        &["--heartbeat-ms", "100", "--stop-grace-ms", "300"],
        ARGS,
    );
    let s = inst.status();
    // Stopped, it cannot stop in order: the watchdog SIGKILLs it after the grace.
    kill(Pid::from_raw(s.dispatcher_pid as i32), Signal::SIGSTOP).unwrap();
    inst.signal(Signal::SIGTERM);
    let status = inst.wait_exit(PATIENCE).expect("the watchdog exits");
    assert_eq!(status.code(), Some(0), "log:\n{}", inst.log());
    assert!(inst.log().contains("did not stop within"));
    assert_nothing_left(&inst, &[s.segment.name]);
}

/// The wait for a previous dispatcher holding the lock applies to every
/// spawn, not once per watchdog: here the first spawn waits (a predecessor
/// draining), and a restart long after that first wait's bound finds the
/// lock held again (a lock file swapped in and held by the test, standing
/// for a predecessor still draining) and waits again instead of starting
/// dispatchers that fail "lock held" and count as crashes.
#[test]
fn every_restart_waits_for_a_held_lock_not_only_the_first_spawn() {
    const GRACE_MS: u64 = 4000;
    let grace = format!("{GRACE_MS}");
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    let inst = Instance::supervised_with(
        "lockwaitagain",
        &["--heartbeat-ms", "100", "--stop-grace-ms", &grace],
        ARGS,
        |paths| {
            paths.ensure_dir().unwrap();
            let lock = InstanceLock::acquire(&paths.lock_file()).unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                drop(lock);
                tx.send(()).unwrap();
            });
        },
    );
    rx.recv_timeout(PATIENCE).expect("released");
    let first = inst.status();
    // Past the first spawn's bound: a once-per-watchdog deadline has expired.
    let past = Duration::from_millis(GRACE_MS + 500);
    if let Some(rest) = past.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    // The lock file now names a lock we hold (the live dispatcher still
    // holds the old, unlinked one, until it dies).
    let path = inst.paths.lock_file();
    std::fs::remove_file(&path).unwrap();
    let held = InstanceLock::acquire(&path).unwrap();
    kill(Pid::from_raw(first.dispatcher_pid as i32), Signal::SIGKILL).unwrap();
    let said = format!(
        "waiting for the previous dispatcher (pid {}) to finish",
        std::process::id()
    );
    let waited = wait_for(PATIENCE, || {
        (inst.log().matches(&said).count() == 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(700));
    drop(held);
    assert!(
        waited.is_some(),
        "the restart did not wait; log:\n{}",
        inst.log()
    );
    let s = inst.wait_status("the restarted dispatcher serves", |s| {
        s.dispatcher_pid != first.dispatcher_pid && s.workers.iter().all(|w| w.state == "idle")
    });
    let log = inst.log();
    assert_eq!(
        s.watchdog.expect("supervised").restarts,
        1,
        "only the SIGKILL is a restart, not the wait; log:\n{log}"
    );
    assert!(!log.contains("starting anyway"), "{log}");
    assert!(
        !log.contains("already served by a live dispatcher"),
        "{log}"
    );
}
