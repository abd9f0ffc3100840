//! Delivery is at least once: a job whose worker dies during it runs again on
//! a fresh worker, and the worker is told which run it is (the job frame's
//! `attempt`), so an operation can tell a retry from a first run.

use ipc_core::ErrorKind;
use osps_client::ClientError;
use osps_testkit::Instance;

const ARGS: &[&str] = &[
    "--workers",
    "2",
    "--segment-mib",
    "16",
    "--max-payload",
    "1048576",
    "--allow-fault-injection",
];

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
