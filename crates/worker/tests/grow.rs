//! Results larger than the slot, seen from the dispatcher's side of the
//! pipes: a worker written with the SDK (`examples/growing-worker.rs`) run
//! on a segment made by the test, which plays the dispatcher: it answers
//! each `Grow` with `Room` (an area of the segment) or `NoRoom`.

mod common;

use common::{example, Bench};
use ipc_core::proto::{ErrorKind, FromWorker, Outcome, ToWorker, WireRegion};

fn start(tag: &str) -> Bench {
    let (b, ops) = Bench::start(tag, 8, &example("growing-worker"), &[]);
    assert_eq!(ops, ["repeat", "reply_repeat"], "ping is not listed");
    b
}

fn text(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i * 7 % 26) as u8).collect()
}

#[test]
fn a_result_larger_than_its_slot_is_written_in_the_room_given_and_a_job_sent_ahead_runs_after() {
    let mut b = start("grow-room");
    let input = text(1000);
    let slot = b.seg.check(0, 1000 + 4096).unwrap();
    b.job(1, "repeat", &["100"], slot, &input);
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
    b.job(2, "repeat", &["2"], slot2, b"ab");
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
    b.job(3, "reply_repeat", &["10"], slot, &input);
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

    assert_eq!(b.stop(), Some(0));
}

#[test]
fn no_room_makes_the_answer_too_large_with_the_dispatchers_message() {
    let mut b = start("grow-noroom");
    let input = text(1000);
    let slot = b.seg.check(0, 1000 + 4096).unwrap();
    b.job(1, "repeat", &["1000"], slot, &input);
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
    b.job(2, "repeat", &["1"], slot, b"x");
    assert_eq!(b.done().outcome, Outcome::Ok);
}

#[test]
fn room_that_was_not_asked_for_breaks_the_protocol() {
    let mut b = start("grow-unasked");
    b.send(&ToWorker::Room {
        job_id: 5,
        area: WireRegion { offset: 0, len: 10 },
    });
    assert_eq!(b.w.0.wait().unwrap().code(), Some(1));
}

#[test]
fn the_documented_ready_and_no_room_bytes() {
    // docs/PROTOCOL.md 13.13: the builtin worker's Ready (its pid set to 19227).
    let (b, ops) = Bench::start("grow-ready", 1, &osps_testkit::bin("osps-worker"), &[]);
    let ready = FromWorker::Ready {
        pid: 19227,
        version: 4,
        streams: vec!["sha256".into(), "wc".into()],
        ops,
    };
    let framed = |msg: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        msg(&mut out);
        out
    };
    let bytes = framed(&|out| ipc_core::frame::encode(&ready, out).unwrap());
    let documented = "3e 00 00 00 00 9b 96 01 04 02 06 73 68 61 32 35 36 02 77 63 \
        08 04 65 63 68 6f 05 75 70 70 65 72 06 73 68 61 32 35 36 02 77 63 \
        05 73 6c 65 65 70 05 63 72 61 73 68 05 73 70 61 77 6e 05 61 6c 6c 6f 63";
    assert_eq!(hex(&bytes), documented, "{ready:?}");
    // 13.14: NoRoom, and the Done naming a result in the area given.
    let no_room = ToWorker::NoRoom {
        job_id: 3,
        message: "result over max_result_mib".into(),
    };
    let bytes = framed(&|out| ipc_core::frame::encode(&no_room, out).unwrap());
    assert_eq!(
        hex(&bytes),
        "1d 00 00 00 04 03 1a 72 65 73 75 6c 74 20 6f 76 65 72 20 6d 61 78 5f 72 65 73 75 6c 74 5f 6d 69 62"
    );
    let done = FromWorker::Done(ipc_core::proto::JobDone {
        job_id: 3,
        outcome: Outcome::Ok,
        result_offset: 0,
        result_len: 100_000,
    });
    let bytes = framed(&|out| ipc_core::frame::encode(&done, out).unwrap());
    assert_eq!(hex(&bytes), "07 00 00 00 01 03 00 00 a0 8d 06");
    assert_eq!(b.stop(), Some(0));
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
