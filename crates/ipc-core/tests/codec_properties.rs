//! Property tests of the wire: every message round-trips through a frame, and
//! no byte string makes a decoder panic or grow its buffer beyond the cap.

use ipc_core::frame::{self, FrameError};
use ipc_core::proto::{
    ErrorKind, FromWorker, Job, JobDone, Outcome, RemoteError, Request, Response, ToWorker,
    WireRegion,
};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::BadRequest),
        Just(ErrorKind::UnknownOp),
        Just(ErrorKind::TooLarge),
        Just(ErrorKind::Timeout),
        Just(ErrorKind::WorkerCrashed),
        Just(ErrorKind::FaultInjectionDisabled),
        Just(ErrorKind::ShuttingDown),
        Just(ErrorKind::InvalidInput),
        Just(ErrorKind::Internal),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Ok),
        (kind(), ".{0,80}").prop_map(|(k, m)| Outcome::Err(RemoteError::new(k, m)))
    ]
}

fn region() -> impl Strategy<Value = WireRegion> {
    (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| WireRegion { offset, len })
}

/// Encodes `msg` into `buf` and decodes it twice (the decoded message may
/// borrow from `buf` and `scratch`).
fn round_trip<'b, T>(msg: &T, buf: &'b mut Vec<u8>, scratch: &'b mut Vec<u8>)
where
    T: serde::Serialize + serde::Deserialize<'b> + PartialEq + std::fmt::Debug,
{
    frame::encode(msg, buf).unwrap();
    let buf: &'b [u8] = buf;
    let (back, used) = frame::try_decode::<T>(buf, usize::MAX).unwrap().unwrap();
    assert_eq!(&back, msg);
    assert_eq!(used, buf.len());
    let mut r = buf;
    let again: T = frame::read_frame(&mut r, scratch, usize::MAX).unwrap();
    assert_eq!(&again, msg);
}

/// [`round_trip`] with buffers of its own.
macro_rules! round_trip {
    ($msg:expr) => {
        round_trip(&$msg, &mut Vec::new(), &mut Vec::new())
    };
}

proptest! {
    #[test]
    fn requests_round_trip(
        id in any::<u64>(),
        op in ".{0,40}",
        args in prop::collection::vec(".{0,20}", 0..5),
        payload_len in any::<u64>(),
    ) {
        let req = Request { id, op: op.into(), args: args.into_iter().collect(), payload_len };
        round_trip!(req);
        // The dispatcher's borrowing decoder reads the same bytes.
        let mut buf = Vec::new();
        frame::encode(&req, &mut buf).unwrap();
        let r: Request<'_> = frame::decode_body(&buf[4..]).unwrap();
        prop_assert_eq!((r.id, &*r.op, r.payload_len), (req.id, &*req.op, req.payload_len));
        prop_assert_eq!(&*r.args, &*req.args);
    }

    #[test]
    fn responses_round_trip(id in any::<u64>(), outcome in outcome(), result_len in any::<u64>()) {
        round_trip!(Response { id, outcome, result_len });
    }

    #[test]
    fn jobs_and_answers_round_trip(
        job_id in any::<u64>(),
        op in ".{0,40}",
        args in prop::collection::vec(".{0,20}", 0..5),
        slot in region(),
        input_len in any::<u64>(),
        outcome in outcome(),
        off in any::<u64>(),
        len in any::<u64>(),
        pid in any::<u32>(),
        attempt in any::<u32>(),
    ) {
        let job = Job { job_id, op: op.into(), args: args.into_iter().collect(), slot, input_len, ready: off, attempt };
        round_trip!(job);
        let mut buf = Vec::new();
        frame::encode(&job, &mut buf).unwrap();
        let j: Job<'_> = frame::decode_body(&buf[4..]).unwrap();
        prop_assert_eq!((j.job_id, &*j.op, j.slot, j.input_len, j.ready, j.attempt), (job.job_id, &*job.op, job.slot, job.input_len, off, attempt));
        round_trip!(ToWorker::Job(job.clone()));
        round_trip!(ToWorker::More { job_id, ready: len });
        round_trip!(ToWorker::Abort { job_id });
        round_trip!(ToWorker::Room { job_id, area: slot });
        round_trip!(ToWorker::NoRoom { job_id, message: job.op.clone() });
        round_trip!(FromWorker::Grow { job_id, len });
        round_trip!(FromWorker::Done(JobDone { job_id, outcome, result_offset: off, result_len: len }));
        round_trip!(FromWorker::Ready { pid, version: 1, streams: vec!["sha256".into()], ops: vec!["sha256".into(), "echo".into()] });
    }

    #[test]
    fn no_byte_string_makes_the_decoders_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::try_decode::<Request>(&bytes, 1024);
        let _ = frame::try_decode::<Response>(&bytes, 1024);
        let _ = frame::try_decode::<FromWorker>(&bytes, 1024);
        let _ = frame::try_decode::<ToWorker>(&bytes, 1024);
        let _ = frame::decode_body::<ToWorker<'_>>(&bytes);
        let _ = frame::decode_body::<Request<'_>>(&bytes);
        let _ = frame::decode_body::<Job<'_>>(&bytes);
    }

    #[test]
    fn a_frame_never_grows_the_buffer_beyond_the_cap(
        len in any::<u32>(),
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let max = 1024;
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        let mut scratch = Vec::new();
        let r = frame::read_body(&mut &bytes[..], &mut scratch, max)
            .and_then(|()| frame::decode_body::<Request<'_>>(&scratch));
        prop_assert!(scratch.capacity() <= max, "buffer grew to {}", scratch.capacity());
        if len as usize > max {
            prop_assert!(matches!(r, Err(FrameError::TooLarge { .. })), "{:?}", r);
        }
    }
}
