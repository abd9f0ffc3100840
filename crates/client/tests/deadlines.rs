//! Which deadline is which: `--retry-ms` bounds reconnecting across
//! restarts only; an answer is awaited as long as the dispatcher's job
//! timeout allows, or as long as `run --timeout-ms` says; a lost connection
//! is still noticed and the request sent again.

use std::process::Output;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_testkit::Instance;

const ARGS: &[&str] = osps_testkit::args!(1, 16, 1048576);

fn cli(inst: &Instance, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = osps_testkit::client_command(inst.name(), inst.runtime_dir())
        .args(args)
        .output()
        .unwrap();
    (out, started.elapsed())
}

/// A running `osps-client`, killed and reaped if the test fails before it ends.
use osps_testkit::Reaped as Running;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_job_longer_than_the_retry_deadline_gets_its_answer() {
    let inst = Instance::start("longjob", ARGS);
    // Before: "Resource temporarily unavailable (os error 11)" after 1 s.
    let (out, took) = cli(&inst, &["--retry-ms", "1000", "run", "sleep", "3000"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"slept 3000 ms\n");
    assert!(took >= Duration::from_secs(3));
}

#[test]
fn a_job_past_the_job_timeout_prints_the_servers_timeout_error() {
    let mut args = ARGS.to_vec();
    args.extend(["--job-timeout-ms", "1500"]);
    let inst = Instance::start("jobtimeout", &args);
    let (out, took) = cli(&inst, &["--retry-ms", "500", "run", "sleep", "20000"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("osps-client: timeout: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(took >= Duration::from_millis(1500), "took {took:?}");
}

#[test]
fn run_timeout_ms_bounds_the_wait_for_the_answer() {
    let inst = Instance::start("runtimeout", ARGS);
    let (out, took) = cli(&inst, &["run", "sleep", "20000", "--timeout-ms", "700"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no answer from unix:") && err.contains("within 700 ms"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_connection_lost_while_waiting_is_noticed_and_the_request_sent_again() {
    let inst = Instance::supervised("lostwait", &["--heartbeat-ms", "100"], ARGS);
    let first = inst.dispatcher_pid();
    let child = Running(Some(
        osps_testkit::client_command(inst.name(), inst.runtime_dir())
            .args(["--retry-ms", "3000", "run", "sleep", "5000"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let started = Instant::now();
    // Past the retry deadline counted from the start: only reconnecting counts.
    inst.wait_status("the job runs", |s| s.in_flight == 1);
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(started.elapsed()));
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let out = child.output();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"slept 5000 ms\n");
    assert_ne!(inst.dispatcher_pid(), first, "served by the new dispatcher");
    assert!(started.elapsed() >= Duration::from_millis(8000));
}
