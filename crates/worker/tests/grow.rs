//! Results larger than the slot, seen from the dispatcher's side of the
//! pipes: a worker written with the SDK (`examples/growing-worker.rs`) run
//! on a segment made by the test, which plays the dispatcher: it answers
//! each `Grow` with `Room` (an area of the segment) or `NoRoom`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use ipc_core::frame;
use ipc_core::proto::{ErrorKind, FromWorker, Job, JobDone, Outcome, ToWorker, WireRegion};
use ipc_core::{Region, Segment};

/// The example worker, built by `cargo test` beside the test binaries.
fn growing_worker() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .ancestors()
        .nth(2)
        .unwrap()
        .join("examples/growing-worker");
    assert!(
        path.is_file(),
        "{} not built: run `cargo test -p osps-worker` (it builds the examples)",
        path.display()
    );
    path
}

/// The worker, killed and reaped however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test's segment and worker, and the worker's pipes.
struct Bench {
    seg: Segment,
    w: Reaped,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
}

impl Bench {
    /// An 8 MiB segment `/osps-test-TAG-<pid>` and the worker on it, ready.
    fn start(tag: &str) -> Bench {
        let name = format!("/osps-test-{tag}-{}", std::process::id());
        let seg = Segment::create(&name, 8 << 20, 1).unwrap();
        let mut w = Reaped(
            Command::new(growing_worker())
                .args(["--segment", &name])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stdin = w.0.stdin.take();
        let stdout = w.0.stdout.take().unwrap();
        let mut b = Bench {
            seg,
            w,
            stdin,
            stdout,
        };
        match b.recv() {
            FromWorker::Ready { ops, .. } => assert_eq!(ops, ["repeat", "reply_repeat"]),
            other => panic!("ready expected, got {other:?}"),
        }
        b
    }

    fn send(&mut self, msg: &ToWorker<'_>) {
        let mut buf = Vec::new();
        frame::encode(msg, &mut buf).unwrap();
        self.stdin.as_mut().unwrap().write_all(&buf).unwrap();
    }

    fn recv(&mut self) -> FromWorker {
        let mut scratch = Vec::new();
        frame::read_frame(&mut self.stdout, &mut scratch, 4096).unwrap()
    }

    fn grow(&mut self, job: u64) -> u64 {
        match self.recv() {
            FromWorker::Grow { job_id, len } if job_id == job => len,
            other => panic!("grow for job {job} expected, got {other:?}"),
        }
    }

    fn done(&mut self) -> JobDone {
        match self.recv() {
            FromWorker::Done(d) => d,
            other => panic!("done expected, got {other:?}"),
        }
    }

    /// Puts `input` at the start of `slot` and sends job `job_id`.
    fn job(&mut self, job_id: u64, op: &str, n: usize, slot: Region, input: &[u8]) {
        self.seg.claim(slot).unwrap()[..input.len()].copy_from_slice(input);
        let args = [n.to_string()];
        self.send(&ToWorker::Job(Job {
            job_id,
            op: op.into(),
            args: args.iter().map(String::as_str).collect(),
            slot: slot.into(),
            input_len: input.len() as u64,
            ready: input.len() as u64,
            attempt: 1,
        }));
    }

    fn bytes(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let r = self.seg.check(offset, len).unwrap();
        self.seg.claim(r).unwrap().to_vec()
    }
}

fn text(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i * 7 % 26) as u8).collect()
}

#[test]
fn a_result_larger_than_its_slot_is_written_in_the_room_given_and_a_job_sent_ahead_runs_after() {
    let mut b = Bench::start("grow-room");
    let input = text(1000);
    let slot = b.seg.check(0, 1000 + 4096).unwrap();
    b.job(1, "repeat", 100, slot, &input);
    // 100 000 bytes wanted: the slot's 4096 free bytes, then 64 KiB, then twice that.
    assert_eq!(b.grow(1), 65536);
    let first = WireRegion {
        offset: 1 << 20,
        len: 65536,
    };
    b.send(&ToWorker::Room {
        job_id: 1,
        area: first,
    });
    assert_eq!(b.grow(1), 131_072);
    // Before the answer, a job sent ahead, and news of an older job.
    let slot2 = b.seg.check(16384, 8192).unwrap();
    b.job(2, "repeat", 2, slot2, b"ab");
    b.send(&ToWorker::More {
        job_id: 1,
        ready: 1000,
    });
    let last = WireRegion {
        offset: 2 << 20,
        len: 200_000,
    };
    b.send(&ToWorker::Room {
        job_id: 1,
        area: last,
    });
    let d = b.done();
    assert_eq!((d.job_id, &d.outcome), (1, &Outcome::Ok));
    // Relative to the last area given.
    assert_eq!((d.result_offset, d.result_len), (0, 100_000));
    assert!(b.bytes(last.offset, 100_000) == input.repeat(100));
    assert_eq!(b.bytes(0, 1000), input, "the input is left intact");
    // The job sent ahead runs next, in its slot.
    let d = b.done();
    assert_eq!((d.job_id, &d.outcome), (2, &Outcome::Ok));
    assert_eq!(b.bytes(16384 + d.result_offset, d.result_len), b"abab");

    // A reply larger than the free room asks for its length.
    b.job(3, "reply_repeat", 10, slot, &input);
    assert_eq!(b.grow(3), 10_000);
    b.send(&ToWorker::Room {
        job_id: 3,
        area: first,
    });
    let d = b.done();
    assert_eq!(
        (d.outcome, d.result_offset, d.result_len),
        (Outcome::Ok, 0, 10_000)
    );
    assert!(b.bytes(first.offset, 10_000) == input.repeat(10));

    drop(b.stdin.take());
    assert!(b.w.0.wait().unwrap().success());
}

#[test]
fn no_room_makes_the_answer_too_large_with_the_dispatchers_message() {
    let mut b = Bench::start("grow-noroom");
    let input = text(1000);
    let slot = b.seg.check(0, 1000 + 4096).unwrap();
    b.job(1, "repeat", 1000, slot, &input);
    let limit = "the result is over the pool's max_result_mib (1 MiB)";
    // Asks for less after a refusal of more than needed, then gives up.
    let mut asks = vec![b.grow(1)];
    let d = loop {
        b.send(&ToWorker::NoRoom {
            job_id: 1,
            message: limit.into(),
        });
        match b.recv() {
            FromWorker::Grow { job_id: 1, len } => asks.push(len),
            FromWorker::Done(d) => break d,
            other => panic!("{other:?}"),
        }
    };
    assert!(asks.len() < 20, "{asks:?}");
    assert!(asks.windows(2).all(|w| w[1] < w[0]), "{asks:?}");
    assert_eq!(
        d.outcome,
        Outcome::Err(ipc_core::RemoteError::new(ErrorKind::TooLarge, limit))
    );
    // The worker goes on serving.
    b.job(2, "repeat", 1, slot, b"x");
    assert_eq!(b.done().outcome, Outcome::Ok);
}

#[test]
fn room_that_was_not_asked_for_breaks_the_protocol() {
    let mut b = Bench::start("grow-unasked");
    b.send(&ToWorker::Room {
        job_id: 5,
        area: WireRegion { offset: 0, len: 10 },
    });
    assert_eq!(b.w.0.wait().unwrap().code(), Some(1));
}
