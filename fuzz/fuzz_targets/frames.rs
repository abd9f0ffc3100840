//! The frame decoders, fed a stream of arbitrary bytes as the dispatcher and
//! the worker read them: every message type, owned and borrowed. No input may
//! panic them, and no input may make them allocate more than a small multiple
//! of the frame cap in one go (a length field must not be trusted). Whatever
//! decodes must encode back to a frame that decodes to the same value.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipc_core::frame::{self, FrameError};
use ipc_core::proto::{FromWorker, Job, JobIn, Request, RequestRef, Response, ToWorker, ToWorkerIn};
use libfuzzer_sys::fuzz_target;

/// The cap the targets use (the dispatcher's default is 64 KiB).
const MAX_FRAME: usize = 4096;
/// The largest single allocation allowed while decoding one input.
const MAX_ALLOC: usize = 4 * MAX_FRAME;

/// Counts the largest allocation asked of the system allocator.
struct Watch;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only
// records sizes.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `System.alloc` with `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        // SAFETY: as for `dealloc`, and `new` is the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Watch = Watch;

fn owned<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut r = data;
    let mut scratch = Vec::new();
    loop {
        match frame::read_frame::<T, _>(&mut r, &mut scratch, MAX_FRAME) {
            Ok(msg) => {
                let mut buf = Vec::new();
                frame::encode(&msg, &mut buf).unwrap();
                let (back, used) = frame::try_decode::<T>(&buf, usize::MAX).unwrap().unwrap();
                assert_eq!((back, used), (msg, buf.len()));
            }
            Err(FrameError::TooLarge { .. }) | Err(FrameError::Closed) => return,
            Err(FrameError::Truncated { .. }) | Err(FrameError::Corrupt(_)) => return,
            Err(e) => panic!("unexpected error from a byte slice: {e}"),
        }
        assert!(scratch.capacity() <= MAX_FRAME);
    }
}

fn borrowed(data: &[u8]) {
    let mut r = data;
    let mut scratch = Vec::new();
    while frame::read_body(&mut r, &mut scratch, MAX_FRAME).is_ok() {
        if let Ok(req) = frame::decode_body::<RequestRef<'_>>(&scratch) {
            // Same bytes as the owned twin.
            let owned: Request = frame::decode_body(&scratch).expect("twin decodes too");
            assert_eq!((req.id, req.op, req.payload_len), (owned.id, owned.op.as_str(), owned.payload_len));
            assert!(req.args.iter().eq(owned.args.iter()));
        }
        if let Ok(job) = frame::decode_body::<JobIn<'_>>(&scratch) {
            let owned: Job = frame::decode_body(&scratch).expect("twin decodes too");
            assert_eq!((job.job_id, job.op, job.slot, job.ready), (owned.job_id, owned.op.as_str(), owned.slot, owned.ready));
        }
        if let Ok(msg) = frame::decode_body::<ToWorkerIn<'_>>(&scratch) {
            let owned: ToWorker = frame::decode_body(&scratch).expect("twin decodes too");
            match (msg, owned) {
                (ToWorkerIn::Job(j), ToWorker::Job(o)) => assert_eq!((j.job_id, j.op, j.ready, j.attempt), (o.job_id, o.op.as_str(), o.ready, o.attempt)),
                (ToWorkerIn::More { job_id, ready }, ToWorker::More { job_id: j, ready: r }) => assert_eq!((job_id, ready), (j, r)),
                (ToWorkerIn::Abort { job_id }, ToWorker::Abort { job_id: j }) => assert_eq!(job_id, j),
                (m, o) => panic!("twins disagree: {m:?} vs {o:?}"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    LARGEST.store(0, Ordering::Relaxed);
    owned::<Request>(data);
    owned::<Response>(data);
    owned::<Job>(data);
    owned::<ToWorker>(data);
    owned::<FromWorker>(data);
    borrowed(data);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest <= MAX_ALLOC, "one allocation of {largest} bytes for a {}-byte input", data.len());
});
