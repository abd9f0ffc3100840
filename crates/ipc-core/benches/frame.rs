//! Criterion micro-benchmarks for the frame codec: `frame::encode`,
//! `frame::try_decode` and `frame::read_frame` on the client-facing messages
//! (`Request`, `Response` with `Outcome::Ok`, `Response` with an error).
//!
//! Run with `cargo bench -p ipc-core --bench frame`.

use std::fmt::Debug;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipc_core::frame::{self, DEFAULT_MAX_FRAME};
use ipc_core::proto::{ErrorKind, Outcome, RemoteError, Request, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A typical request: one `sha256` of a 1 MiB payload, with one argument.
fn request() -> Request {
    Request {
        id: 12_345,
        op: "sha256".into(),
        args: vec!["hex".into()],
        payload_len: 1 << 20,
    }
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
/// group named `frame/{name}`; one element is one message.
fn bench_message<T>(c: &mut Criterion, name: &str, msg: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    // The encoded frame, decoded once up front so a broken codec fails loudly
    // instead of benchmarking an error path.
    let mut wire = Vec::new();
    frame::encode(msg, &mut wire).expect("encode");
    let (back, used) = frame::try_decode::<T>(&wire, DEFAULT_MAX_FRAME)
        .expect("decode")
        .expect("a whole frame");
    assert_eq!(&back, msg);
    assert_eq!(used, wire.len());

    let mut group = c.benchmark_group(format!("frame/{name}"));
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
            frame::try_decode::<T>(black_box(&wire), DEFAULT_MAX_FRAME)
                .expect("decode")
                .expect("a whole frame")
        })
    });

    let mut scratch = Vec::with_capacity(256);
    group.bench_function("read_frame", |b| {
        b.iter(|| {
            let mut r: &[u8] = black_box(&wire);
            frame::read_frame::<T, _>(&mut r, &mut scratch, DEFAULT_MAX_FRAME).expect("read")
        })
    });

    group.finish();
}

fn frame_benches(c: &mut Criterion) {
    bench_message(c, "request", &request());
    bench_message(c, "response_ok", &response_ok());
    bench_message(c, "response_err", &response_err());
}

criterion_group!(benches, frame_benches);
criterion_main!(benches);
