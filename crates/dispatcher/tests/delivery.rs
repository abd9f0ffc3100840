//! Delivery is at least once: a job whose worker dies during it runs again on
//! a fresh worker, and the worker is told which run it is (the job frame's
//! `attempt`), so an operation can tell a retry from a first run.

use ipc_core::ErrorKind;
use osps_client::ClientError;
use osps_testkit::Instance;

const ARGS: &[&str] = osps_testkit::args!(2, 16, 1048576, "--allow-fault-injection");

#[test]
fn a_job_retried_after_its_worker_crashed_reaches_the_worker_as_attempt_2() {
    let inst = Instance::start("attempt", ARGS);
    let mut c = inst.client();
    // `crash 1` aborts its worker on attempt 1 and answers its attempt after.
    assert_eq!(c.call("crash", &["1"], &[]).unwrap(), b"attempt 2\n");
    inst.wait_status("one worker replaced", |s| {
        s.workers.iter().map(|w| w.restarts).sum::<u64>() == 1
    });
    // A first run is attempt 1.
    assert_eq!(c.call("crash", &["0"], &[]).unwrap(), b"attempt 1\n");
    // Crashing on both attempts: given up after the second, no third run.
    match c.call("crash", &["2"], &[]).unwrap_err() {
        ClientError::Remote(e) => assert_eq!(e.kind, ErrorKind::WorkerCrashed, "{e}"),
        other => panic!("expected worker crashed, got {other}"),
    }
    inst.wait_status("three workers replaced in all", |s| {
        s.workers.iter().map(|w| w.restarts).sum::<u64>() == 3
    });
}

#[test]
fn a_job_cut_off_by_a_dispatcher_kill_runs_again_on_the_next_one() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use osps_client::{RetryPolicy, RetryingClient};
    use osps_testkit::{wait_for, PATIENCE};
    use std::time::Duration;

    let inst = Instance::supervised("twice", &["--heartbeat-ms", "100"], ARGS);
    let first = inst.dispatcher_pid();
    let mut c = RetryingClient::new(
        inst.endpoint(),
        RetryPolicy {
            deadline: PATIENCE,
            ..RetryPolicy::default()
        },
    );
    let job = std::thread::spawn(move || {
        let r = c.call("sleep", &["1500"], &[]);
        (r, c.retries)
    });
    // Once the sleep runs on the first dispatcher, kill it.
    inst.wait_status("the sleep running", |s| {
        s.workers.iter().any(|w| w.state == "busy")
    });
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let (answer, retries) = job.join().unwrap();
    assert_eq!(answer.unwrap(), b"slept 1500 ms\n");
    assert!(retries >= 1, "the client resent the request");
    // The answer came from the second dispatcher, which ran the whole sleep
    // again: the job ran twice (at least once, not exactly once).
    let again = wait_for(Duration::from_secs(5), || {
        let s = inst.try_status()?;
        (s.dispatcher_pid != first && s.jobs_done >= 1).then_some(s)
    });
    assert!(again.is_some(), "log:\n{}", inst.log());
}
