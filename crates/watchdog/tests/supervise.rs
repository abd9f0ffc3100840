//! The watchdog with the real binaries: crash and hang recovery under load,
//! giving up on a crash loop, ordered shutdown, and the watchdog's own death.
//! After each scenario: no zombie whose parent is one of ours.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use osps_client::{RetryPolicy, RetryingClient};
use osps_testkit::{proc_info, wait_for, zombies_of, Instance, PATIENCE};

const DISPATCHER: &[&str] = osps_testkit::args!(2, 16, 1048576);

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

fn retrying(inst: &Instance) -> RetryingClient {
    RetryingClient::new(
        inst.endpoint(),
        RetryPolicy {
            deadline: PATIENCE,
            ..RetryPolicy::default()
        },
    )
}

/// Time from now until a dispatcher other than `old` serves a ping.
fn time_to_new_server(inst: &Instance, old: u32) -> Duration {
    let t = Instant::now();
    let mut c = retrying(inst);
    wait_for(PATIENCE, || {
        let pid = c.status().ok()?.dispatcher_pid;
        (pid != old && c.call("ping", &[], &[]).ok()? == b"pong\n").then_some(())
    })
    .expect("a new dispatcher serves");
    t.elapsed()
}

fn assert_no_zombies(pids: &[u32]) {
    let z = zombies_of(pids);
    assert!(z.is_empty(), "zombies: {z:?}");
}

#[test]
fn sigkill_of_the_dispatcher_under_16_clients_loses_no_request() {
    let inst = Instance::supervised("killload", &["--heartbeat-ms", "100"], DISPATCHER);
    let watchdog = inst.pid();
    let old = inst.dispatcher_pid();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..16u64)
        .map(|t| {
            let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
            let mut c = retrying(&inst);
            thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let data = format!("client {t} request {i} ").repeat(1 + (i % 50) as usize);
                    let got = c
                        .call("upper", &[], data.as_bytes())
                        .unwrap_or_else(|e| panic!("client {t} request {i}: {e}"));
                    assert_eq!(
                        got,
                        data.to_ascii_uppercase().into_bytes(),
                        "client {t} request {i}"
                    );
                    answered.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                c.retries
            })
        })
        .collect();
    wait_for(PATIENCE, || {
        (answered.load(Ordering::Relaxed) > 500).then_some(())
    })
    .expect("load running");
    signal(old, Signal::SIGKILL);
    let recovery = time_to_new_server(&inst, old);
    let before = answered.load(Ordering::Relaxed);
    wait_for(PATIENCE, || {
        (answered.load(Ordering::Relaxed) > before + 500).then_some(())
    })
    .expect("load continues");
    stop.store(true, Ordering::Relaxed);
    let retries: u64 = clients
        .into_iter()
        .map(|h| h.join().expect("every request answered correctly"))
        .sum();
    eprintln!(
        "recovery after SIGKILL: {} ms from kill to first served request; {} requests answered, {retries} retried",
        recovery.as_millis(),
        answered.load(Ordering::Relaxed)
    );
    assert!(recovery < Duration::from_secs(10));
    let s = inst.status();
    assert_ne!(s.dispatcher_pid, old);
    let w = s.watchdog.expect("watchdog in status");
    assert_eq!((w.pid, w.restarts), (watchdog, 1));
    assert!(
        w.last_restart_cause.contains("SIGKILL"),
        "{}",
        w.last_restart_cause
    );
    assert!(proc_info(old).is_none(), "the killed dispatcher was reaped");
    assert_no_zombies(&[watchdog, s.dispatcher_pid]);
    assert!(
        inst.log().contains("reaped orphan"),
        "the old workers came back to the watchdog and were reaped"
    );
}

#[test]
fn a_stopped_dispatcher_is_detected_as_hung_and_replaced() {
    let (hb, misses) = (100u64, 3u64);
    let inst = Instance::supervised(
        "sigstop",
        &["--heartbeat-ms", "100", "--miss-limit", "3"],
        DISPATCHER,
    );
    let old = inst.dispatcher_pid();
    signal(old, Signal::SIGSTOP);
    let took = time_to_new_server(&inst, old);
    eprintln!(
        "SIGSTOP to a new dispatcher serving: {} ms (heartbeat {hb} ms x {misses})",
        took.as_millis()
    );
    // heartbeat x miss-limit, plus a generous margin for a loaded machine.
    assert!(
        took < Duration::from_millis(hb * misses) + Duration::from_secs(10),
        "{took:?}"
    );
    assert!(
        took >= Duration::from_millis(hb * (misses - 1)),
        "replaced before the misses could add up: {took:?}"
    );
    let s = inst.status();
    assert!(s.watchdog.unwrap().last_restart_cause.contains("hang"));
    assert!(
        proc_info(old).is_none(),
        "the stopped dispatcher was killed and reaped"
    );
    assert!(inst.log().contains("dispatcher hung"));
    assert_no_zombies(&[inst.pid(), s.dispatcher_pid]);
}

#[test]
fn a_dispatcher_that_dies_at_once_makes_the_watchdog_give_up() {
    osps_testkit::become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let instance = osps_testkit::unique_instance("crashloop");
    let mut child = Command::new(osps_testkit::bin("osps-watchdog"))
        .args([
            "--instance",
            &instance,
            "--max-restarts",
            "3",
            "--within",
            "30",
            "--runtime-dir",
        ])
        .arg(dir.path())
        .args(["--", "--workers", "0"]) // an invalid option: the dispatcher exits at once
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = wait_for(PATIENCE, || child.try_wait().unwrap());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the watchdog did not give up within {PATIENCE:?}");
    }
    let status = status.unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("osps-watchdog: "))
        .expect("one clear line");
    assert!(
        line.contains("giving up") && line.contains("more than 3 restarts"),
        "{line}"
    );
    assert_eq!(
        err.matches("dispatcher started").count(),
        4,
        "first start and 3 restarts:\n{err}"
    );
    assert!(
        err.contains("--workers must be at least 1"),
        "the dispatcher's own reason is visible:\n{err}"
    );
    // Every dispatcher it started is gone from /proc: reaped, not even a zombie.
    assert!(osps_testkit::processes_mentioning(&instance).is_empty());
    assert!(zombies_of(&[pid]).is_empty() && proc_info(pid).is_none());
}

/// A supervised instance with its watchdog's, dispatcher's and workers' pids.
fn supervised_pids(tag: &str) -> (Instance, u32, u32, Vec<u32>) {
    let inst = Instance::supervised(tag, &[], DISPATCHER);
    let (watchdog, dispatcher) = (inst.pid(), inst.dispatcher_pid());
    let workers = inst.worker_pids();
    (inst, watchdog, dispatcher, workers)
}

#[test]
fn sigterm_to_the_watchdog_stops_everything_in_order() {
    let (mut inst, watchdog, dispatcher, workers) = supervised_pids("wdterm");
    assert_eq!(retrying(&inst).call("ping", &[], &[]).unwrap(), b"pong\n");
    signal(watchdog, Signal::SIGTERM);
    let status = inst
        .wait_exit(Duration::from_secs(20))
        .expect("watchdog exits");
    assert_eq!(status.code(), Some(0), "{}", inst.log());
    // Gone from /proc altogether: reaped, not even zombies.
    for pid in workers.iter().chain([&dispatcher]) {
        assert!(proc_info(*pid).is_none(), "process {pid} left");
    }
    assert_eq!(inst.leftovers(), Vec::<String>::new());
    let log = inst.log();
    let order = [
        "stopping the dispatcher (SIGTERM)",
        "worker stopped",
        "dispatcher stopped",
        "dispatcher exited: exit status 0",
        "watchdog stopped",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|m| {
            log.find(m)
                .unwrap_or_else(|| panic!("{m:?} not logged:\n{log}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "shutdown out of order:\n{log}"
    );
}

#[test]
fn sigkill_of_the_watchdog_makes_the_dispatcher_stop_in_order() {
    // Chosen behaviour: the dispatcher follows its watchdog (PR_SET_PDEATHSIG
    // = SIGTERM) and shuts down in order, so no unsupervised server is left.
    let (mut inst, watchdog, dispatcher, workers) = supervised_pids("wdkill");
    signal(watchdog, Signal::SIGKILL);
    inst.wait_exit(PATIENCE).expect("watchdog reaped");
    // We are the subreaper, so the orphaned dispatcher is ours to reap: its status shows an ordered stop.
    let status = wait_for(PATIENCE, || {
        match waitpid(Pid::from_raw(dispatcher as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => None,
            other => Some(other),
        }
    })
    .expect("the dispatcher exits");
    assert_eq!(
        status,
        Ok(WaitStatus::Exited(Pid::from_raw(dispatcher as i32), 0)),
        "{}",
        inst.log()
    );
    // Reaped by the dispatcher: gone from /proc altogether, not even zombies.
    for w in workers {
        assert!(proc_info(w).is_none(), "worker {w} left");
    }
    assert_eq!(inst.leftovers(), Vec::<String>::new());
}
