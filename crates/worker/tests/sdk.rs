//! The SDK's behaviour seen from outside: a worker written with it
//! (`examples/panicky-worker.rs`) run by hand on frames, and as a real
//! dispatcher's worker. A returned error is an answer; a panic is answered
//! `worker crashed` with its message, the worker exits, and the dispatcher
//! retries the job once on a fresh worker before giving it up.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use ipc_core::frame;
use ipc_core::proto::{ErrorKind, FromWorker, Job, Outcome, RemoteError, ToWorker};
use ipc_core::Segment;
use osps_testkit::Instance;

/// The example worker, built by `cargo test` beside the test binaries.
fn panicky() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .ancestors()
        .nth(2)
        .unwrap()
        .join("examples/panicky-worker");
    assert!(
        path.is_file(),
        "{} not built: run `cargo test -p osps-worker` (it builds the examples; or `cargo build -p osps-worker --examples`)",
        path.display()
    );
    path
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn remote(e: osps_client::ClientError) -> RemoteError {
    match e {
        osps_client::ClientError::Remote(e) => e,
        other => panic!("a typed error expected, got {other}"),
    }
}

#[test]
fn a_panic_is_answered_worker_crashed_with_its_message_and_the_worker_exits() {
    let name = format!("/osps-test-sdkpanic-{}", std::process::id());
    let mut seg = Segment::create(&name, 1 << 20, 1).unwrap();
    let mut w = Reaped(
        Command::new(panicky())
            .args(["--segment", &name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = w.0.stdout.take().unwrap();
    let mut scratch = Vec::new();
    let ready: FromWorker = frame::read_frame(&mut stdout, &mut scratch, 4096).unwrap();
    assert!(
        matches!(ready, FromWorker::Ready { version: 4, ref streams, .. } if streams == &["panic_streaming"]),
        "{ready:?}"
    );
    let slot = seg.check(0, 8192).unwrap();
    seg.claim(slot).unwrap().fill(0);
    let job = |job_id, op: &'static str| {
        ToWorker::Job(Job {
            job_id,
            op: op.into(),
            args: vec!["x".to_owned()].into_iter().collect(),
            slot: slot.into(),
            input_len: 0,
            ready: 0,
            attempt: 1,
        })
    };
    let mut buf = Vec::new();
    for (id, op) in [(1, "fail"), (2, "ping"), (3, "panic"), (4, "ping")] {
        frame::encode(&job(id, op), &mut buf).unwrap();
    }
    let mut stdin = w.0.stdin.take().unwrap();
    stdin.write_all(&buf).unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        match frame::read_frame(&mut stdout, &mut scratch, 4096).unwrap() {
            FromWorker::Done(d) => outcomes.push((d.job_id, d.outcome)),
            other => panic!("done expected, got {other:?}"),
        }
    }
    // It runs nothing more (job 4 is read and dropped) and exits when its
    // stdin ends, as the dispatcher would have killed it.
    drop(stdin);
    let rest = frame::read_frame::<FromWorker, _>(&mut stdout, &mut scratch, 4096);
    assert!(rest.is_err(), "nothing after the crash: {rest:?}");
    let err = |kind, message: &str| Outcome::Err(RemoteError::new(kind, message));
    assert_eq!(
        outcomes.len(),
        3,
        "the worker exits after the panic: {outcomes:?}"
    );
    assert_eq!(outcomes[0], (1, err(ErrorKind::InvalidInput, "nope")));
    assert_eq!(
        outcomes[1],
        (
            2,
            err(
                ErrorKind::InvalidInput,
                "expected 0 argument(s), got 1; usage: ping"
            )
        )
    );
    let Outcome::Err(ref e) = outcomes[2].1 else {
        panic!("{outcomes:?}")
    };
    assert_eq!(e.kind, ErrorKind::WorkerCrashed);
    assert!(
        e.message
            .starts_with("operation \"panic\" panicked: boom x at ")
            && e.message.contains("panicky-worker.rs:"),
        "{e}"
    );
    let status = w.0.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(w.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("boom x"), "{stderr}");
}

#[test]
fn served_by_a_dispatcher_a_panic_is_retried_once_then_answered_worker_crashed() {
    let exe = panicky();
    let inst = Instance::start(
        "sdk-panic",
        &["--worker-exe", exe.to_str().unwrap(), "--workers", "2"],
    );
    let mut c = inst.client();
    c.ping().unwrap();
    let e = remote(c.call("fail", &[], b"").unwrap_err());
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::InvalidInput, "nope")
    );
    let restarts = |inst: &Instance| {
        inst.status()
            .workers
            .iter()
            .map(|w| w.restarts)
            .sum::<u64>()
    };
    assert_eq!(restarts(&inst), 0, "an error is an answer, not a crash");

    let e = remote(c.call("panic", &["now"], b"").unwrap_err());
    assert_eq!(e.kind, ErrorKind::WorkerCrashed, "{e}");
    assert!(e.message.contains("died on each of 2 attempts"), "{e}");
    assert!(
        e.message
            .contains("the worker said: operation \"panic\" panicked: boom now at "),
        "{e}"
    );
    inst.wait_status("both crashed workers replaced", |st| {
        st.workers.iter().map(|w| w.restarts).sum::<u64>() == 2
    });

    // The retry runs on a fresh worker, with attempt 2.
    assert_eq!(c.call("panic_once", &[], b"").unwrap(), b"attempt 2\n");

    // A streaming operation that panics while its input arrives (2 MiB: sent
    // early to an idle worker) is a crash too.
    let e = remote(
        c.call("panic_streaming", &[], &vec![7u8; 2 << 20])
            .unwrap_err(),
    );
    assert_eq!(e.kind, ErrorKind::WorkerCrashed, "{e}");
    assert!(e.message.contains("past 1 MiB"), "{e}");
    assert_eq!(
        c.call("panic_streaming", &[], &[1u8; 1000]).unwrap(),
        b"1000"
    );
    c.ping().unwrap();
}
