//! The worker run alone, as one would debug it: a segment made by the test,
//! job frames written to its stdin, result frames read from its stdout.

use std::io::Write;
use std::process::{Child, Command, Stdio};

use ipc_core::frame;
use ipc_core::proto::{ErrorKind, FromWorker, Job, Outcome};
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

#[test]
fn a_worker_fed_frames_by_hand_runs_jobs_in_place_and_exits_on_eof() {
    let name = format!("/osps-test-alone-{}", std::process::id());
    let seg = Segment::create(&name, 1 << 20, 1).unwrap();
    let mut w = spawn(&name, &[]);
    let mut stdout = w.0.stdout.take().unwrap();
    let mut scratch = Vec::new();
    let ready: FromWorker = frame::read_frame(&mut stdout, &mut scratch, 4096).unwrap();
    assert!(matches!(ready, FromWorker::Ready { pid, version: 1 } if pid == w.0.id()));

    let slot = Region {
        offset: 8192,
        len: 8192,
    };
    seg.bytes_mut(slot).unwrap()[..11].copy_from_slice(b"hello world");
    let mut stdin = w.0.stdin.take().unwrap();
    let jobs = [
        Job {
            job_id: 1,
            op: "upper".into(),
            args: vec![],
            slot,
            input_len: 11,
        },
        Job {
            job_id: 2,
            op: "wc".into(),
            args: vec![],
            slot,
            input_len: 11,
        },
        Job {
            job_id: 3,
            op: "crash".into(),
            args: vec![],
            slot,
            input_len: 0,
        },
    ];
    let mut buf = Vec::new();
    for j in &jobs {
        frame::encode(j, &mut buf).unwrap();
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
        &seg.bytes(slot).unwrap()[..11],
        b"HELLO WORLD",
        "transformed in place, in the shared segment"
    );

    let FromWorker::Done(d2) = frame::read_frame(&mut stdout, &mut scratch, 4096).unwrap() else {
        panic!("done expected")
    };
    assert_eq!(d2.job_id, 2);
    let r = Region {
        offset: slot.offset + d2.result_offset,
        len: d2.result_len,
    };
    assert_eq!(seg.bytes(r).unwrap(), b"0 2 11\n");
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
