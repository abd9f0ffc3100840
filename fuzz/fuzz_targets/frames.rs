//! The frame decoders, fed a stream of arbitrary bytes as the dispatcher and
//! the worker read them: every message type, decoded in place. No input may
//! panic them, and no input may make them allocate more than a small multiple
//! of the frame cap in one go (a length field must not be trusted). Whatever
//! decodes must encode back to a frame that decodes to the same value, and
//! a decoded message's strings point into the frame.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};

use ipc_core::frame::{self, FrameError};
use ipc_core::proto::{FromWorker, Job, Request, Response, ToWorker};
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

/// Reads `data` as a stream of `$ty` frames: each message that decodes
/// (borrowing from the read buffer) encodes back to a frame that decodes to
/// the same value. (A macro: the decoded type borrows, with a lifetime that
/// differs per frame.)
macro_rules! round_trips {
    ($data:expr, $ty:ty) => {{
        let mut r: &[u8] = $data;
        let mut scratch = Vec::new();
        loop {
            match frame::read_frame::<$ty, _>(&mut r, &mut scratch, MAX_FRAME) {
                Ok(msg) => {
                    let mut buf = Vec::new();
                    frame::encode(&msg, &mut buf).unwrap();
                    let (back, used) = frame::try_decode::<$ty>(&buf, usize::MAX).unwrap().unwrap();
                    assert_eq!((back, used), (msg, buf.len()));
                }
                Err(FrameError::TooLarge { .. }) | Err(FrameError::Closed) => break,
                Err(FrameError::Truncated { .. }) | Err(FrameError::Corrupt(_)) => break,
                Err(e) => panic!("unexpected error from a byte slice: {e}"),
            }
            assert!(scratch.capacity() <= MAX_FRAME);
        }
    }};
}

/// Whether an operation and its arguments point into the frame.
fn borrows(op: &Cow<'_, str>, args: &[Cow<'_, str>]) -> bool {
    matches!(op, Cow::Borrowed(_)) && args.iter().all(|a| matches!(a, Cow::Borrowed(_)))
}

/// The messages with strings decode them in place, copying none.
fn borrowed(data: &[u8]) {
    let mut r = data;
    let mut scratch = Vec::new();
    while frame::read_body(&mut r, &mut scratch, MAX_FRAME).is_ok() {
        if let Ok(req) = frame::decode_body::<Request<'_>>(&scratch) {
            assert!(borrows(&req.op, &req.args), "{req:?}");
        }
        if let Ok(job) = frame::decode_body::<Job<'_>>(&scratch) {
            assert!(borrows(&job.op, &job.args), "{job:?}");
        }
        if let Ok(ToWorker::Job(job)) = frame::decode_body::<ToWorker<'_>>(&scratch) {
            assert!(borrows(&job.op, &job.args), "{job:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    LARGEST.store(0, Ordering::Relaxed);
    round_trips!(data, Request<'_>);
    round_trips!(data, Response);
    round_trips!(data, Job<'_>);
    round_trips!(data, ToWorker<'_>);
    round_trips!(data, FromWorker);
    borrowed(data);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest <= MAX_ALLOC, "one allocation of {largest} bytes for a {}-byte input", data.len());
});
