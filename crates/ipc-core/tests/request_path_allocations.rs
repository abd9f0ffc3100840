//! Allocations on the request path, counted: what the dispatcher does per
//! request (read a `Request` frame into its reused buffer and decode it in
//! place) and per job (encode a `ToWorker::Job` borrowing the queued job's
//! strings into its reused buffer), and what the worker does per job (decode
//! it in place). One test in its own binary: the counting allocator is global.

use std::alloc::System;
use std::borrow::Cow;

use ipc_core::frame::{self, DEFAULT_MAX_FRAME};
use ipc_core::proto::{Args, Job, Request, ToWorker};
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations (and reallocations) made while `f` runs.
fn allocations<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let region = stats_alloc::Region::new(GLOBAL);
    let out = f();
    let change = region.change();
    (out, change.allocations + change.reallocations)
}

/// A request's frame as a client sends it.
fn request_frame(op: &str, args: &[&str]) -> Vec<u8> {
    let req = Request {
        id: 300,
        op: op.into(),
        args: args.iter().copied().collect(),
        payload_len: 11,
    };
    let mut buf = Vec::new();
    frame::encode(&req, &mut buf).unwrap();
    buf
}

/// The job the dispatcher sends for a request, from the strings it keeps.
fn job<'a>(op: &'a str, args: &'a [Cow<'static, str>]) -> ToWorker<'a> {
    ToWorker::Job(Job {
        job_id: 7,
        op: op.into(),
        args: Args::Borrowed(args),
        slot: ipc_core::proto::WireRegion {
            offset: 0,
            len: 8192,
        },
        input_len: 11,
        ready: 11,
        attempt: 1,
    })
}

#[test]
fn the_request_path_allocates_only_for_arguments() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // (operation, arguments, allocations to decode the request and the job:
    // the argument list's vector when there are arguments, nothing else).
    let cases: &[(&str, &[&str], usize)] = &[
        ("ping", &[], 0),
        ("sha256", &[], 0),
        ("sleep", &["250"], 1),
        ("crash", &["1", "2", "3"], 1),
    ];
    assert_eq!(allocations(|| Vec::<u8>::with_capacity(1)).1, 1, "counts");
    let mut scratch = Vec::with_capacity(256);
    let mut out = Vec::with_capacity(256);
    for &(op, args, want) in cases {
        // The dispatcher: read the frame (async) and decode it in place.
        let wire = request_frame(op, args);
        let (got, n) = allocations(|| {
            rt.block_on(async {
                let mut r = &wire[..];
                frame::read_body_async(&mut r, &mut scratch, DEFAULT_MAX_FRAME).await
            })
            .unwrap();
            let req: Request<'_> = frame::decode_body(&scratch).unwrap();
            (req.op.len(), req.args.len())
        });
        assert_eq!(got, (op.len(), args.len()));
        assert_eq!(n, want, "{op} {args:?}: decoding the request");
        // The dispatcher: encode the job from the queued job's strings.
        let kept: Vec<Cow<'static, str>> = args.iter().map(|a| a.to_string().into()).collect();
        let ((), n) = allocations(|| {
            out.clear();
            frame::encode(&job(op, &kept), &mut out).unwrap();
        });
        assert_eq!(n, 0, "{op} {args:?}: encoding the job");
        // The worker: read the job frame (blocking) and decode it in place.
        let (got, n) = allocations(|| {
            frame::read_body(&mut &out[..], &mut scratch, DEFAULT_MAX_FRAME).unwrap();
            match frame::decode_body(&scratch).unwrap() {
                ToWorker::Job(job) => (job.op.len(), job.args.len()),
                other => panic!("{other:?}"),
            }
        });
        assert_eq!(got, (op.len(), args.len()));
        assert_eq!(n, want, "{op} {args:?}: decoding the job");
    }
}
