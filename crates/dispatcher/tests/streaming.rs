//! Large payloads of streaming operations (`sha256`, `wc`) go to an idle
//! worker as soon as their header is read, and the worker reads the payload
//! as it arrives. These tests hold uploads half-way (raw sockets) to see it:
//! the answer is right, a client that leaves or stalls costs no worker, one
//! worker is always left for everyone else, a worker killed mid-upload is
//! replaced and the job retried (with nothing batched behind it), the job
//! timeout waits for the payload, and bad arguments are answered at once.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use ipc_core::frame;
use ipc_core::proto::{ErrorKind, Outcome, Response};
use ipc_core::status::StatusReport;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_testkit::{sha256_line, wc_line, Instance};

const TOTAL: usize = 4 << 20;
/// Sent before the upload is held: more than the streaming threshold's worth
/// of progress news, less than all.
const FIRST: usize = 1_500_000;

fn args(extra: &[&'static str]) -> Vec<&'static str> {
    let mut a = osps_testkit::args!(2, 32, 8388608).to_vec();
    a.extend_from_slice(extra);
    a
}

fn data() -> Vec<u8> {
    (0..TOTAL as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Starts a request on a raw connection and sends the first `first` bytes of `data`.
fn start_upload(inst: &Instance, op: &str, args: &[&str], data: &[u8], first: usize) -> UnixStream {
    let mut s = inst.raw_client();
    let buf = osps_testkit::request_header(1, op, args, data.len() as u64);
    s.write_all(&buf).unwrap();
    s.write_all(&data[..first]).unwrap();
    s
}

/// Reads one reply: its outcome and result bytes.
fn reply(s: &mut UnixStream) -> (Outcome, Vec<u8>) {
    let resp: Response = frame::read_frame(s, &mut Vec::new(), 4096).expect("a reply");
    let mut result = vec![0u8; resp.result_len as usize];
    s.read_exact(&mut result).unwrap();
    (resp.outcome, result)
}

fn busy_workers(st: &StatusReport) -> usize {
    st.workers.iter().filter(|w| w.state == "busy").count()
}

/// Waits until exactly `n` workers are busy and nothing is queued; returns that status.
/// A sha256 upload started (the first `FIRST` bytes sent) and running on a
/// worker: the data, the connection and that worker's pid.
fn sha256_upload_running(inst: &Instance) -> (Vec<u8>, UnixStream, u32) {
    let data = data();
    let s = start_upload(inst, "sha256", &[], &data, FIRST);
    let st = wait_busy(inst, 1);
    let victim = st.workers.iter().find(|w| w.state == "busy").unwrap().pid;
    (data, s, victim)
}

fn wait_busy(inst: &Instance, n: usize) -> StatusReport {
    inst.wait_status(&format!("{n} busy worker(s), none queued"), |st| {
        busy_workers(st) == n && st.queue_depth == 0
    })
}

fn wait_slots_free(inst: &Instance) {
    inst.wait_status("slots returned", |st| st.segment.slots_in_use == 0);
}

#[test]
fn a_large_sha256_or_wc_starts_before_its_payload_is_in_and_is_right() {
    // The job timeout is shorter than the upload is held: it counts from the
    // moment the payload is all in.
    let inst = Instance::start("stream-ok", &args(&["--job-timeout-ms", "1000"]));
    let data = data();
    for (op, expected) in [("sha256", sha256_line(&data)), ("wc", wc_line(&data))] {
        let mut s = start_upload(&inst, op, &[], &data, FIRST);
        // A worker runs the job while most of the payload has not been sent.
        wait_busy(&inst, 1);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        s.write_all(&data[FIRST..]).unwrap();
        let (outcome, result) = reply(&mut s);
        assert_eq!(outcome, Outcome::Ok, "{op}");
        assert_eq!(result, expected, "{op}");
    }
    wait_slots_free(&inst);
    let st = inst.status();
    assert_eq!((st.jobs_done, st.jobs_failed), (2, 0));
}

#[test]
fn a_client_that_leaves_or_stalls_mid_upload_costs_no_worker() {
    let inst = Instance::start("stream-gone", &args(&["--frame-timeout-ms", "1500"]));
    let pids = inst.worker_pids();
    let data = data();
    let left = start_upload(&inst, "sha256", &[], &data, FIRST);
    wait_busy(&inst, 1);
    drop(left);
    wait_busy(&inst, 0);
    let _stalled = start_upload(&inst, "sha256", &[], &data, FIRST);
    wait_busy(&inst, 1);
    // The frame deadline ends the upload; the worker is told and freed.
    wait_busy(&inst, 0);
    wait_slots_free(&inst);
    let st = inst.status();
    assert_eq!(inst.worker_pids(), pids, "no worker was replaced");
    assert!(st.workers.iter().all(|w| w.restarts == 0), "{st:?}");
    assert_eq!(st.jobs_failed, 2, "{st:?}");
    let log = inst.log();
    assert!(
        log.contains("client left inside a 4194304-byte payload"),
        "{log}"
    );
    let mut c = inst.client();
    assert_eq!(c.call("sha256", &[], &data).unwrap(), sha256_line(&data));
}

#[test]
fn one_worker_is_always_left_for_others_while_uploads_hold_workers() {
    let inst = Instance::start("stream-fair", &args(&[]));
    let data = data();
    let mut a = start_upload(&inst, "sha256", &[], &data, FIRST);
    wait_busy(&inst, 1);
    // A second large upload is not sent ahead: it would take the last idle worker.
    let mut b = start_upload(&inst, "sha256", &[], &data, FIRST);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let st = inst.status();
    assert_eq!(busy_workers(&st), 1, "{st:?}");
    // So a third client is served while both uploads are held.
    let mut c = inst.client();
    c.set_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    c.ping().expect("served while two uploads are held");
    for s in [&mut a, &mut b] {
        s.write_all(&data[FIRST..]).unwrap();
    }
    for s in [&mut a, &mut b] {
        assert_eq!(reply(s), (Outcome::Ok, sha256_line(&data)));
    }
    wait_slots_free(&inst);
}

#[test]
fn a_worker_killed_mid_upload_is_replaced_and_the_job_retried() {
    let inst = Instance::start("stream-kill", &args(&[]));
    let (data, mut s, victim) = sha256_upload_running(&inst);
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    inst.wait_status("the killed worker is replaced", |st| {
        st.workers.iter().map(|w| w.restarts).sum::<u64>() == 1
            && !st.workers.iter().any(|w| w.pid == victim)
    });
    // The retry runs on a worker while the payload is still held.
    wait_busy(&inst, 1);
    s.write_all(&data[FIRST..]).unwrap();
    assert_eq!(reply(&mut s), (Outcome::Ok, sha256_line(&data)));
    wait_slots_free(&inst);
}

#[test]
fn a_retried_streamed_job_gets_no_job_batched_behind_it() {
    let inst = Instance::start("stream-retry-busy", &args(&[]));
    let (data, mut s, victim) = sha256_upload_running(&inst);
    // The other worker busy, and a small job waiting: the one that takes the
    // retried job has no idle peer, the case where jobs are sent ahead.
    let mut sleeper = inst.client();
    let sleep = sleeper.send("sleep", &["4000"], b"").unwrap();
    wait_busy(&inst, 2);
    let mut pinger = inst.client();
    let ping = pinger.send("ping", &[], b"").unwrap();
    inst.wait_status("the ping waits", |st| st.queue_depth == 1);
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    inst.wait_status("the retry runs on the replacement", |st| {
        st.workers.iter().all(|w| w.pid != victim && w.pid != 0)
            && st.workers.iter().all(|w| w.state == "busy")
    });
    s.write_all(&data[FIRST..]).unwrap();
    let got = reply(&mut s);
    assert_eq!(got, (Outcome::Ok, sha256_line(&data)), "{}", inst.log());
    assert_eq!(pinger.wait(ping).unwrap(), b"pong\n");
    assert_eq!(sleeper.wait(sleep).unwrap(), b"slept 4000 ms\n");
    let st = inst.status();
    assert_eq!(
        st.workers.iter().map(|w| w.restarts).sum::<u64>(),
        1,
        "only the killed worker was replaced: {st:?}"
    );
    wait_slots_free(&inst);
}

#[test]
fn bad_arguments_are_answered_before_the_payload_is_in_and_the_connection_goes_on() {
    let inst = Instance::start("stream-badargs", &args(&[]));
    let data = data();
    let mut s = start_upload(&inst, "sha256", &["extra"], &data, FIRST);
    let (outcome, result) = reply(&mut s);
    assert!(
        matches!(outcome, Outcome::Err(ref e) if e.kind == ErrorKind::InvalidInput),
        "{outcome:?}"
    );
    assert!(result.is_empty());
    // The rest of the payload is still read (into its slot), then the next request runs.
    s.write_all(&data[FIRST..]).unwrap();
    let mut buf = osps_testkit::request_header(2, "upper", &[], 2);
    buf.extend_from_slice(b"ok");
    s.write_all(&buf).unwrap();
    assert_eq!(reply(&mut s), (Outcome::Ok, b"OK".to_vec()));
    wait_slots_free(&inst);
    assert!(inst.status().workers.iter().all(|w| w.restarts == 0));
}
