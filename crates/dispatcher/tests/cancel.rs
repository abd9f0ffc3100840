//! The `cancel` request with the real binaries: a queued job is taken off
//! its queue, a running one has its worker killed and replaced; each is
//! answered `cancelled`, before the cancel's own answer; only the
//! connection that sent a request can cancel it; other clients' jobs go on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ipc_core::status::{StatusReport, WorkerState};
use ipc_core::ErrorKind;
use osps_client::{Client, ClientError, Reply};
use osps_testkit::{proc_info, sha256_line, wait_for, Instance, PATIENCE};

fn kind(r: Result<Vec<u8>, ClientError>) -> ErrorKind {
    match r {
        Err(ClientError::Remote(e)) => e.kind,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

fn reply_kind(r: &Reply) -> ErrorKind {
    match &r.result {
        Err(e) => e.kind,
        Ok(bytes) => panic!(
            "expected an error, got {:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

/// Waits until the worker of place `index` is busy; returns its pid.
fn busy(inst: &Instance, index: usize) -> u32 {
    let st = inst.wait_status("a busy worker", |s| {
        s.workers[index].state == WorkerState::Busy
    });
    st.workers[index].pid
}

/// Waits until place `index` runs a worker other than `old`, and `old`
/// is reaped (no longer the dispatcher's child, zombie or alive).
fn replaced(inst: &Instance, index: usize, old: u32) -> StatusReport {
    let st = inst.wait_status("a new worker", |s| {
        let w = &s.workers[index];
        w.pid != 0 && w.pid != old && w.state.is_up()
    });
    let dispatcher = inst.pid();
    let reaped = wait_for(PATIENCE, || {
        proc_info(old)
            .is_none_or(|p| p.ppid != dispatcher)
            .then_some(())
    });
    assert!(
        reaped.is_some(),
        "worker {old} not reaped: {:?}",
        proc_info(old)
    );
    st
}

/// The next `n` answers on a raw connection: id, error kind (`None`: ok)
/// and result bytes.
fn read_answers(
    raw: &mut std::os::unix::net::UnixStream,
    n: usize,
) -> Vec<(u64, Option<ErrorKind>, Vec<u8>)> {
    use ipc_core::proto::{Outcome, Response};
    use std::io::Read;
    let mut scratch = Vec::new();
    (0..n)
        .map(|_| {
            let r: Response = ipc_core::frame::read_frame(&mut *raw, &mut scratch, 65536).unwrap();
            let mut bytes = vec![0; r.result_len as usize];
            raw.read_exact(&mut bytes).unwrap();
            let kind = match r.outcome {
                Outcome::Ok => None,
                Outcome::Err(e) => Some(e.kind),
            };
            (r.id, kind, bytes)
        })
        .collect()
}

#[test]
fn queued_and_running_jobs_are_cancelled_only_by_their_connection() {
    let inst = Instance::start("cancel", osps_testkit::args!(1, 32, 8388608));
    let (mut a, mut b, mut stranger) = (inst.client(), inst.client(), inst.client());
    let long = a.send("sleep", &["60000"], &[]).unwrap();
    let old = busy(&inst, 0);
    let queued = a.send("echo", &[], b"mine").unwrap();
    let theirs = b.send("echo", &[], b"theirs").unwrap();
    inst.wait_status("two jobs queued", |s| s.queue_depth == 2);

    // Ids are per connection: another one finds nothing to cancel.
    assert!(!stranger.cancel(queued).unwrap());
    assert!(!stranger.cancel(long).unwrap());
    assert_eq!(inst.status().queue_depth, 2);

    // The queued job: off the queue; its answer comes before the cancel's.
    let cancel = a.send_cancel(queued).unwrap();
    let first = a.recv().unwrap();
    assert_eq!(
        (first.id, reply_kind(&first)),
        (queued, ErrorKind::Cancelled)
    );
    let second = a.recv().unwrap();
    assert_eq!(
        (second.id, second.result),
        (cancel, Ok(b"cancelled\n".to_vec()))
    );
    let st = inst.status();
    assert_eq!(st.queue_depth, 1, "the other client's job stays queued");
    assert_eq!(
        (st.workers[0].pid, st.workers[0].state),
        (old, WorkerState::Busy)
    );

    // The running job: its worker is killed and replaced.
    let t = Instant::now();
    assert!(a.cancel(long).unwrap());
    assert_eq!(kind(a.wait(long)), ErrorKind::Cancelled);
    eprintln!("running job cancelled and answered in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The other client's queued job runs on the replacement.
    assert_eq!(b.wait(theirs).unwrap(), b"theirs");
    let st = replaced(&inst, 0, old);
    assert_eq!((st.jobs_cancelled, st.jobs_failed), (2, 0), "{st:?}");
    assert!(
        st.workers[0].last_exit.contains("cancelled"),
        "{:?}",
        st.workers[0].last_exit
    );

    // Answered requests are not found; the connection goes on.
    let id = a.send("echo", &[], b"after").unwrap();
    assert_eq!(a.wait(id).unwrap(), b"after");
    assert!(!a.cancel(id).unwrap());
    assert!(!a.cancel(long).unwrap());
    assert!(!a.cancel(999).unwrap(), "never sent");
    assert_eq!(kind(a.call("cancel", &[], &[])), ErrorKind::InvalidInput);
    assert_eq!(kind(a.call("cancel", &["x"], &[])), ErrorKind::InvalidInput);
    assert_eq!(kind(a.call("cancel", &["1"], b"x")), ErrorKind::BadRequest);
    assert_eq!(a.call("echo", &[], b"still").unwrap(), b"still");
    assert_eq!(inst.status().jobs_cancelled, 2);
}

#[test]
fn cancelling_a_running_job_leaves_other_clients_alone() {
    let inst = Instance::start("cancelbusy", osps_testkit::args!(2, 32, 8388608));
    let mut a = inst.client();
    let long = a.send("sleep", &["60000"], &[]).unwrap();
    let st = inst.wait_status("the sleep running", |s| {
        s.workers.iter().any(|w| w.state == WorkerState::Busy)
    });
    let index = (0..2)
        .find(|&i| st.workers[i].state == WorkerState::Busy)
        .unwrap();
    let old = st.workers[index].pid;
    let stop = Arc::new(AtomicBool::new(false));
    // Other clients call all along, on the other worker (and the
    // replacement): every answer correct.
    let others: Vec<_> = (0..2)
        .map(|t| {
            let mut c = inst.client();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut calls = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let data = format!("client {t} call {calls}").into_bytes();
                    assert_eq!(c.call("sha256", &[], &data).unwrap(), sha256_line(&data));
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    assert!(a.cancel(long).unwrap());
    let took = t.elapsed();
    eprintln!("running job cancelled and answered in {took:?}");
    assert_eq!(kind(a.wait(long)), ErrorKind::Cancelled);
    let ended = inst.status();
    assert!(
        ended.workers[index].pid != old || ended.workers[index].state != WorkerState::Busy,
        "{ended:?}"
    );
    replaced(&inst, index, old);
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for h in others {
        assert!(h.join().expect("other client") > 0);
    }
    let st = inst.status();
    assert_eq!((st.jobs_cancelled, st.jobs_failed), (1, 0), "{st:?}");
    // The connection goes on after its job was cancelled.
    assert_eq!(a.call("echo", &[], b"x").unwrap(), b"x");
}

/// A cancel is read and acted on even when the connection has all its
/// places in flight taken (it waits only to write its own answer).
#[test]
fn a_connection_with_every_place_taken_can_still_cancel() {
    let inst = Instance::start(
        "cancelfull",
        osps_testkit::args!(1, 32, 8388608, "--max-in-flight", "2"),
    );
    let mut a: Client = inst.client();
    let long = a.send("sleep", &["60000"], &[]).unwrap();
    busy(&inst, 0);
    let queued = a.send("echo", &[], b"q").unwrap();
    inst.wait_status("one queued", |s| s.queue_depth == 1);
    assert!(a.cancel(long).unwrap());
    assert_eq!(kind(a.wait(long)), ErrorKind::Cancelled);
    assert_eq!(a.wait(queued).unwrap(), b"q");
}

/// A job sent ahead to a busy worker (batching) cannot be taken back out of
/// its pipe: it is answered `cancelled` when the worker reaches it, the
/// worker then killed and replaced; the job before it is answered as ever.
#[test]
fn a_job_sent_ahead_is_cancelled_when_its_worker_reaches_it() {
    use osps_testkit::request_header;
    use std::io::Write;
    let inst = Instance::start("cancelahead", osps_testkit::args!(1, 32, 8388608));
    let old = inst.status().workers[0].pid;
    let mut raw = inst.raw_client();
    // In one write: the worker takes the first sleep, and the second behind it.
    let mut both = request_header(1, "sleep", &["300"], 0);
    both.extend(request_header(2, "sleep", &["60000"], 0));
    raw.write_all(&both).unwrap();
    let st = inst.wait_status("a busy worker", |s| s.workers[0].state == WorkerState::Busy);
    assert_eq!(
        (st.jobs_sent_ahead, st.queue_depth),
        (1, 0),
        "the second sleep is in the worker's pipe"
    );
    let t = Instant::now();
    raw.write_all(&request_header(3, "cancel", &["2"], 0))
        .unwrap();
    let answers = read_answers(&mut raw, 3);
    assert_eq!(
        answers,
        [
            (1, None, b"slept 300 ms\n".to_vec()),
            (2, Some(ErrorKind::Cancelled), vec![]),
            (3, None, b"cancelled\n".to_vec()),
        ]
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    replaced(&inst, 0, old);
    assert_eq!(inst.client().call("echo", &[], b"x").unwrap(), b"x");
}

/// A job whose worker died, waiting to run again (attempt 2) while the
/// replacement starts, is taken off the queue by a cancel, and never runs
/// again. The pool's workers take a second to start, so the wait is long.
#[test]
fn a_job_waiting_to_be_retried_is_cancelled() {
    let worker = osps_testkit::bin("osps-worker");
    let slow = format!("sleep 1; exec {}", worker.display());
    let (_dir, config) = osps_testkit::config_file(&format!(
        "[pools.builtin]\nenabled = false\n\n[pools.slow]\nprogram = [\"sh\", \"-c\", {slow:?}]\nworkers = 1\n"
    ));
    let inst = Instance::start(
        "cancelretry",
        &[
            "--config",
            config.to_str().unwrap(),
            "--allow-fault-injection",
            "--segment-mib",
            "16",
            "--max-payload",
            "65536",
        ],
    );
    let mut a = inst.client();
    // Attempt 1 aborts its worker; attempt 2 would answer "attempt 2".
    let id = a.send("crash", &["1"], &[]).unwrap();
    inst.wait_status("the retry waiting for the replacement", |s| {
        s.queue_depth == 1 && s.workers[0].restarts == 1 && !s.workers[0].state.is_up()
    });
    assert!(a.cancel(id).unwrap());
    assert_eq!(kind(a.wait(id)), ErrorKind::Cancelled);
    let st = inst.wait_status("the replacement up", |s| s.workers[0].state.is_up());
    assert_eq!((st.queue_depth, st.jobs_cancelled, st.jobs_done), (0, 1, 0));
    assert_eq!(a.call("crash", &["0"], &[]).unwrap(), b"attempt 1\n");
    // The cancelled retry never ran: that call is the one job done.
    assert_eq!(inst.status().jobs_done, 1);
}

/// A job sent ahead to a worker that is being killed (its running job timed
/// out, and it ignores SIGTERM: a second until SIGKILL) is on its way back
/// to the queue: cancelled meanwhile, it is answered `cancelled` then, not
/// requeued.
#[test]
fn a_job_cancelled_while_its_worker_is_being_killed_is_not_requeued() {
    use osps_testkit::request_header;
    use std::io::Write;
    let worker = osps_testkit::bin("osps-worker");
    let deaf = format!("trap '' TERM; exec {}", worker.display());
    let (_dir, config) = osps_testkit::config_file(&format!(
        "[pools.builtin]\nenabled = false\n\n[pools.deaf]\nprogram = [\"sh\", \"-c\", {deaf:?}]\nworkers = 1\njob_timeout_ms = 300\n"
    ));
    let inst = Instance::start(
        "cancelkilling",
        &[
            "--config",
            config.to_str().unwrap(),
            "--segment-mib",
            "16",
            "--max-payload",
            "65536",
        ],
    );
    let mut raw = inst.raw_client();
    let mut both = request_header(1, "sleep", &["5000"], 0);
    both.extend(request_header(2, "echo", &[], 0));
    raw.write_all(&both).unwrap();
    let st = inst.wait_status("a busy worker", |s| s.workers[0].state == WorkerState::Busy);
    assert_eq!(st.jobs_sent_ahead, 1, "the echo is in the worker's pipe");
    wait_for(PATIENCE, || {
        inst.log().contains("job timed out").then_some(())
    })
    .expect("the sleep times out");
    // Within the second between SIGTERM (ignored) and SIGKILL.
    raw.write_all(&request_header(3, "cancel", &["2"], 0))
        .unwrap();
    let answers = read_answers(&mut raw, 3);
    assert_eq!(
        answers,
        [
            (1, Some(ErrorKind::Timeout), vec![]),
            (2, Some(ErrorKind::Cancelled), vec![]),
            (3, None, b"cancelled\n".to_vec()),
        ]
    );
    let st = inst.wait_status("the replacement up", |s| s.workers[0].state.is_up());
    assert_eq!((st.queue_depth, st.jobs_cancelled, st.jobs_done), (0, 1, 0));
    // Answered on its way back: the replacement never got it (and was not
    // killed for it).
    thread::sleep(Duration::from_millis(300));
    let st = inst.status();
    assert_eq!((st.workers[0].restarts, st.jobs_done), (1, 0), "{st:?}");
}
