//! The worker run alone, as one would debug it: a segment made by the test,
//! job frames written to its stdin, result frames read from its stdout.

use std::io::Write;
use std::process::{Child, Command, Stdio};

use ipc_core::frame;
use ipc_core::proto::{ErrorKind, FromWorker, Job, JobDone, Outcome, ToWorker};
use ipc_core::{Region, Segment};

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(segment: &str, extra: &[&str]) -> Reaped {
    let child = Command::new(osps_testkit::bin("osps-worker"))
        .args(["--segment", segment])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Reaped(child)
}

/// A 1 MiB segment `/osps-test-TAG-<pid>` and a worker started on it, with
/// its stdout taken (the frames it writes).
fn worker_on_a_segment(tag: &str) -> (Segment, Reaped, std::process::ChildStdout) {
    let name = format!("/osps-test-{tag}-{}", std::process::id());
    let seg = Segment::create(&name, 1 << 20, 1).unwrap();
    let mut w = spawn(&name, &[]);
    let stdout = w.0.stdout.take().unwrap();
    (seg, w, stdout)
}

/// A job's first run, its whole input (`len` bytes) already in `slot`.
fn first_run(job_id: u64, op: &str, slot: Region, len: u64) -> Job<'_> {
    Job {
        job_id,
        op: op.into(),
        args: Default::default(),
        slot: slot.into(),
        input_len: len,
        ready: len,
        attempt: 1,
    }
}

#[test]
fn a_worker_fed_frames_by_hand_runs_jobs_in_place_and_exits_on_eof() {
    let (mut seg, mut w, mut stdout) = worker_on_a_segment("alone");
    let mut scratch = Vec::new();
    let ready: FromWorker = frame::read_frame(&mut stdout, &mut scratch, 4096).unwrap();
    assert!(
        matches!(ready, FromWorker::Ready { pid, version: 4, ref streams, .. } if pid == w.0.id() && streams == &["sha256", "wc"])
    );

    let slot = seg.check(8192, 8192).unwrap();
    seg.claim(slot).unwrap()[..11].copy_from_slice(b"hello world");
    let mut stdin = w.0.stdin.take().unwrap();
    let jobs = [
        first_run(1, "upper", slot, 11),
        first_run(2, "wc", slot, 11),
        first_run(3, "crash", slot, 0),
    ];
    let mut buf = Vec::new();
    for j in jobs {
        frame::encode(&ToWorker::Job(j), &mut buf).unwrap();
    }
    stdin.write_all(&buf).unwrap();

    let FromWorker::Done(d1) = frame::read_frame(&mut stdout, &mut scratch, 4096).unwrap() else {
        panic!("done expected")
    };
    assert_eq!(
        (d1.job_id, d1.outcome, d1.result_offset, d1.result_len),
        (1, Outcome::Ok, 0, 11)
    );
    assert_eq!(
        &seg.claim(slot).unwrap()[..11],
        b"HELLO WORLD",
        "transformed in place, in the shared segment"
    );

    let FromWorker::Done(d2) = frame::read_frame(&mut stdout, &mut scratch, 4096).unwrap() else {
        panic!("done expected")
    };
    assert_eq!(d2.job_id, 2);
    let r = seg
        .check(slot.offset() + d2.result_offset, d2.result_len)
        .unwrap();
    assert_eq!(&*seg.claim(r).unwrap(), b"0 2 11\n");
    assert_eq!(
        d2.result_offset, 11,
        "small results go after the input, leaving it intact"
    );

    let FromWorker::Done(d3) = frame::read_frame(&mut stdout, &mut scratch, 4096).unwrap() else {
        panic!("done expected")
    };
    assert!(
        matches!(d3.outcome, Outcome::Err(ref e) if e.kind == ErrorKind::FaultInjectionDisabled)
    );
    assert_eq!(
        seg.header()
            .jobs_done
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );

    drop(stdin); // EOF: the polite stop
    let status = w.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_worker_whose_parent_is_not_the_one_named_refuses_to_run() {
    let name = format!("/osps-test-orphan-{}", std::process::id());
    let _seg = Segment::create(&name, 1 << 16, 1).unwrap();
    let mut w = spawn(&name, &["--parent-pid", "1"]);
    let status = w.0.wait().unwrap();
    assert!(!status.success());
}

#[test]
fn a_worker_without_its_segment_fails_clearly() {
    let out = Command::new(osps_testkit::bin("osps-worker"))
        .args(["--segment", "/osps-test-does-not-exist"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open shared-memory segment"));
}

/// Writes one message to the worker's stdin.
fn send(stdin: &mut impl Write, msg: ToWorker) {
    let mut buf = Vec::new();
    frame::encode(&msg, &mut buf).unwrap();
    stdin.write_all(&buf).unwrap();
}

fn done(stdout: &mut impl std::io::Read) -> JobDone {
    let mut scratch = Vec::new();
    match frame::read_frame(stdout, &mut scratch, 4096).unwrap() {
        FromWorker::Done(d) => d,
        other => panic!("done expected, got {other:?}"),
    }
}

#[test]
fn a_streaming_job_reads_its_input_as_the_dispatcher_says_it_arrives() {
    let (mut seg, mut w, mut stdout) = worker_on_a_segment("stream");
    let mut stdin = w.0.stdin.take().unwrap();
    let mut scratch = Vec::new();
    let _ready: FromWorker = frame::read_frame(&mut stdout, &mut scratch, 4096).unwrap();
    let slot = seg.check(0, 256 << 10).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let job = |job_id, op: &'static str, args: Vec<String>, ready| {
        ToWorker::Job(Job {
            job_id,
            op: op.into(),
            args: args.into_iter().collect(),
            slot: slot.into(),
            input_len: data.len() as u64,
            ready,
            attempt: 1,
        })
    };
    // The bytes past `ready` are garbage when the job starts; they are
    // written, then announced, in three steps.
    seg.claim(slot).unwrap().fill(0xee);
    let cuts = [0usize, 70_000, 150_001, data.len()];
    seg.claim(slot).unwrap()[..cuts[1]].copy_from_slice(&data[..cuts[1]]);
    send(&mut stdin, job(1, "sha256", vec![], cuts[1] as u64));
    // News of another job (one answered already) is ignored.
    send(
        &mut stdin,
        ToWorker::More {
            job_id: 77,
            ready: 5,
        },
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    for pair in cuts[1..].windows(2) {
        let (from, to) = (pair[0], pair[1]);
        seg.claim(slot).unwrap()[from..to].copy_from_slice(&data[from..to]);
        send(
            &mut stdin,
            ToWorker::More {
                job_id: 1,
                ready: to as u64,
            },
        );
    }
    let d = done(&mut stdout);
    assert_eq!((d.job_id, &d.outcome), (1, &Outcome::Ok));
    let result = seg
        .check(slot.offset() + d.result_offset, d.result_len)
        .unwrap();
    assert_eq!(
        &*seg.claim(result).unwrap(),
        osps_testkit::sha256_line(&data)
    );

    // Abort: the input will not come; the job is answered with an error.
    send(&mut stdin, job(2, "wc", vec![], 10));
    send(&mut stdin, ToWorker::Abort { job_id: 2 });
    let d = done(&mut stdout);
    assert!(
        matches!(d.outcome, Outcome::Err(ref e) if e.kind == ErrorKind::BadRequest && e.message.contains("did not arrive")),
        "{d:?}"
    );

    // Bad arguments are answered at once, before the input is in; the news
    // that follows is ignored, and the next job runs.
    send(&mut stdin, job(3, "sha256", vec!["x".into()], 0));
    let d = done(&mut stdout);
    assert!(matches!(d.outcome, Outcome::Err(ref e) if e.kind == ErrorKind::InvalidInput));
    send(
        &mut stdin,
        ToWorker::More {
            job_id: 3,
            ready: data.len() as u64,
        },
    );
    send(&mut stdin, job(4, "wc", vec![], data.len() as u64));
    let d = done(&mut stdout);
    assert_eq!((d.job_id, &d.outcome), (4, &Outcome::Ok));

    // A whole (not streaming) operation sent early waits for all of its input.
    send(&mut stdin, job(5, "echo", vec![], 1000));
    send(
        &mut stdin,
        ToWorker::More {
            job_id: 5,
            ready: data.len() as u64,
        },
    );
    let d = done(&mut stdout);
    assert_eq!((d.outcome, d.result_len), (Outcome::Ok, data.len() as u64));

    // A new job while one's input is arriving breaks the protocol: that job
    // gets an internal error and the worker exits 1.
    send(&mut stdin, job(6, "sha256", vec![], 10));
    send(&mut stdin, job(7, "ping", vec![], 0));
    let d = done(&mut stdout);
    assert!(
        matches!(d.outcome, Outcome::Err(ref e) if e.kind == ErrorKind::Internal),
        "{d:?}"
    );
    let status = w.0.wait().unwrap();
    assert_eq!(status.code(), Some(1));
}
