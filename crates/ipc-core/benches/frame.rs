//! Criterion micro-benchmarks for the frame codec: `frame::encode`,
//! `frame::try_decode` and `frame::read_frame` on the client-facing messages
//! (`Request`, `Response` with `Outcome::Ok`, `Response` with an error) and
//! on the worker pipe's `ToWorker::Job`.
//!
//! Run with `cargo bench -p ipc-core --bench frame`.

use std::borrow::Cow;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipc_core::frame::{self, DEFAULT_MAX_FRAME};
use ipc_core::proto::WireRegion;
use ipc_core::proto::{Args, ErrorKind, Job, Outcome, RemoteError, Request, Response, ToWorker};

/// A typical request: one `sha256` of a 1 MiB payload, with one argument.
fn request() -> Request<'static> {
    Request {
        id: 12_345,
        op: "sha256".into(),
        args: vec!["hex".into()].into(),
        payload_len: 1 << 20,
    }
}

/// The job the dispatcher sends for [`request`], encoded from the strings it
/// keeps (borrowed) and decoded by the worker in place.
fn job<'a>(args: &'a [Cow<'static, str>]) -> ToWorker<'a> {
    ToWorker::Job(Job {
        job_id: 77,
        op: "sha256".into(),
        args: Args::Borrowed(args),
        slot: WireRegion {
            offset: 1 << 20,
            len: (1 << 20) + 4096,
        },
        input_len: 1 << 20,
        ready: 1 << 20,
        attempt: 1,
    })
}

/// A successful answer carrying a 32-byte result.
fn response_ok() -> Response {
    Response {
        id: 12_345,
        outcome: Outcome::Ok,
        result_len: 32,
    }
}

/// A failed answer with a short message.
fn response_err() -> Response {
    Response {
        id: 12_345,
        outcome: Outcome::Err(RemoteError::new(
            ErrorKind::Timeout,
            "job exceeded the 30000 ms timeout; its worker was replaced",
        )),
        result_len: 0,
    }
}

/// Benchmarks encode, `try_decode` and `read_frame` for one message, in a
/// group named `frame/{name}`; one element is one message. (A macro, not a
/// generic function: a decoded message borrows from the buffer it is read
/// from, a lifetime that differs in each iteration.)
macro_rules! bench_message {
    ($c:expr, $name:expr, $msg:expr, $ty:ty) => {{
        let msg: &$ty = $msg;
        // The encoded frame, decoded once up front so a broken codec fails
        // loudly instead of benchmarking an error path.
        let mut wire = Vec::new();
        frame::encode(msg, &mut wire).expect("encode");
        let (back, used) = frame::try_decode::<$ty>(&wire, DEFAULT_MAX_FRAME)
            .expect("decode")
            .expect("a whole frame");
        assert_eq!(&back, msg);
        assert_eq!(used, wire.len());

        let mut group = $c.benchmark_group(format!("frame/{}", $name));
        group.throughput(Throughput::Elements(1));

        let mut out = Vec::with_capacity(256);
        group.bench_function("encode", |b| {
            b.iter(|| {
                out.clear();
                frame::encode(black_box(msg), &mut out).expect("encode");
                black_box(out.len())
            })
        });

        group.bench_function("try_decode", |b| {
            b.iter(|| {
                let (msg, used) = frame::try_decode::<$ty>(black_box(&wire), DEFAULT_MAX_FRAME)
                    .expect("decode")
                    .expect("a whole frame");
                black_box(&msg);
                used
            })
        });

        let mut scratch = Vec::with_capacity(256);
        group.bench_function("read_frame", |b| {
            b.iter(|| {
                let mut r: &[u8] = black_box(&wire);
                let msg = frame::read_frame::<$ty, _>(&mut r, &mut scratch, DEFAULT_MAX_FRAME)
                    .expect("read");
                black_box(&msg);
            })
        });

        group.finish();
    }};
}

fn frame_benches(c: &mut Criterion) {
    bench_message!(c, "request", &request(), Request<'_>);
    bench_message!(c, "response_ok", &response_ok(), Response);
    bench_message!(c, "response_err", &response_err(), Response);
    let kept = [Cow::from(String::from("hex"))];
    bench_message!(c, "job", &job(&kept), ToWorker<'_>);
}

criterion_group!(benches, frame_benches);
criterion_main!(benches);
