//! Results larger than the slot: the result area a job writes in once its
//! slot is too small ([`Growth`]), and [`ResultWriter`], the `std::io::Write`
//! that writes a result of any size straight into the segment.
//!
//! A result starts in the slot, after the input. When it needs more room,
//! the SDK sends the dispatcher `Grow` (docs/PROTOCOL.md §13) and waits for
//! `Room`, a region of the segment that is the job's result area from then
//! on (what was written so far is copied there); `NoRoom` (the pool's
//! `max_result_mib`) makes the job's answer `too large`. In a [`JobCtx`]
//! made by [`JobCtx::new`] (a unit test, no dispatcher) the result grows in
//! a buffer of the context's own instead, without a limit.
//!
//! [`JobCtx`]: crate::JobCtx
//! [`JobCtx::new`]: crate::JobCtx::new

use std::io;

use ipc_core::proto::{ErrorKind, RemoteError, WireRegion};
use ipc_core::Claims;

use crate::job::Output;

/// The least a growing writer asks for.
const MIN_GROW: usize = 64 * 1024;

/// What a running job may ask of the dispatcher: more of its input (a
/// streaming job's, while it arrives) and room for its result.
pub(crate) trait Dispatcher {
    /// Waits until the dispatcher says more of job `job_id`'s input is in the
    /// slot, and returns how many bytes are there now; an error when the
    /// input will never arrive in full.
    fn more(&mut self, job_id: u64) -> Result<u64, RemoteError>;

    /// Asks for a result area of at least `len` bytes (`Grow`) and waits for
    /// the answer: the area (`Room`), an error of kind `TooLarge` with the
    /// dispatcher's message (`NoRoom`), or an `Internal` error when the pipe
    /// failed or broke protocol.
    fn grow(&mut self, job_id: u64, len: u64) -> Result<WireRegion, RemoteError>;
}

/// Where a result larger than the slot goes.
enum Areas<'a> {
    /// No dispatcher (a unit test): a buffer of the context's own.
    Local(Vec<u8>),
    /// A worker's job: regions of the segment the dispatcher gives.
    Segment {
        claims: Claims<'a>,
        dispatcher: &'a mut dyn Dispatcher,
        job_id: u64,
        /// The last area given (empty before the first).
        current: &'a mut [u8],
    },
}

/// A job's result areas: none until the result outgrows the slot.
pub(crate) struct Growth<'a> {
    areas: Areas<'a>,
    /// Areas given so far: 0 while the result is in the slot.
    grants: u32,
    /// The smallest length refused so far, and the dispatcher's message.
    ceiling: Option<(u64, RemoteError)>,
    /// Set once the result could not get the room it needed: the job's answer.
    refused: Option<RemoteError>,
}

impl std::fmt::Debug for Growth<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Growth")
            .field("grants", &self.grants)
            .field("area_len", &self.area_len())
            .field("refused", &self.refused)
            .finish()
    }
}

impl<'a> Growth<'a> {
    /// Growth into a buffer of its own (no dispatcher).
    pub(crate) fn local() -> Growth<'a> {
        Growth::with(Areas::Local(Vec::new()))
    }

    /// Growth into areas of the segment asked of `dispatcher`.
    pub(crate) fn segment(
        claims: Claims<'a>,
        dispatcher: &'a mut dyn Dispatcher,
        job_id: u64,
    ) -> Growth<'a> {
        Growth::with(Areas::Segment {
            claims,
            dispatcher,
            job_id,
            current: &mut [],
        })
    }

    fn with(areas: Areas<'a>) -> Growth<'a> {
        Growth {
            areas,
            grants: 0,
            ceiling: None,
            refused: None,
        }
    }

    /// How many areas were given (0: the result is in the slot).
    pub(crate) fn grants(&self) -> u32 {
        self.grants
    }

    /// Why the result could not grow, if it could not.
    pub(crate) fn refused(&self) -> Option<&RemoteError> {
        self.refused.as_ref()
    }

    /// The last area given.
    pub(crate) fn area(&self) -> &[u8] {
        match &self.areas {
            Areas::Local(buf) => buf,
            Areas::Segment { current, .. } => current,
        }
    }

    pub(crate) fn area_mut(&mut self) -> &mut [u8] {
        match &mut self.areas {
            Areas::Local(buf) => buf,
            Areas::Segment { current, .. } => current,
        }
    }

    fn area_len(&self) -> usize {
        self.area().len()
    }

    /// Makes the result area at least `needed` bytes long, asking for
    /// `want` (at least `needed`), and keeps the first `keep` bytes of the
    /// result: copied from the slot's free room `slot_free` while no area
    /// was given, else from the last area. A refusal of more than `needed`
    /// is remembered as a ceiling (the pool's limit is below it: no later
    /// ask reaches it) and the ask repeated halfway between `needed` and
    /// the ceiling; a refusal of what is needed is final.
    pub(crate) fn grow(
        &mut self,
        want: usize,
        needed: usize,
        keep: usize,
        slot_free: &[u8],
    ) -> Result<(), RemoteError> {
        if let Some(e) = &self.refused {
            return Err(e.clone());
        }
        let mut want = want.max(needed);
        loop {
            if let Some((ceiling, e)) = &self.ceiling {
                if needed as u64 >= *ceiling {
                    self.refused = Some(e.clone());
                    return Err(e.clone());
                }
                let ceiling = *ceiling as usize;
                want = want.min(needed + (ceiling - needed) / 2);
            }
            match self.ask(want, keep, slot_free) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind == ErrorKind::TooLarge => {
                    tracing::debug!(want, needed, "no room: {}", e.message);
                    self.ceiling = Some((want as u64, e));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One ask for an area of `want` bytes; the first `keep` bytes of the
    /// result are copied into it.
    fn ask(&mut self, want: usize, keep: usize, slot_free: &[u8]) -> Result<(), RemoteError> {
        let first = self.grants == 0;
        match &mut self.areas {
            Areas::Local(buf) => {
                if first {
                    buf.clear();
                    buf.extend_from_slice(&slot_free[..keep]);
                }
                buf.resize(want.max(buf.len()), 0);
            }
            Areas::Segment {
                claims,
                dispatcher,
                job_id,
                current,
            } => {
                let area = dispatcher.grow(*job_id, want as u64)?;
                let fresh = claim_area(claims, area, want)?;
                let from: &[u8] = if first { slot_free } else { current };
                fresh[..keep].copy_from_slice(&from[..keep]);
                *current = fresh;
            }
        }
        self.grants += 1;
        Ok(())
    }
}

/// The view of an area the dispatcher gave, checked: inside the arena,
/// disjoint from the job's other regions, and at least `want` bytes.
fn claim_area<'a>(
    claims: &mut Claims<'a>,
    area: WireRegion,
    want: usize,
) -> Result<&'a mut [u8], RemoteError> {
    let bad = |e: String| {
        RemoteError::new(
            ErrorKind::Internal,
            format!("bad result area from dispatcher: {e}"),
        )
    };
    if area.len < want as u64 {
        return Err(bad(format!("{} bytes given for {want} asked", area.len)));
    }
    let region = claims
        .check(area.offset, area.len)
        .map_err(|e| bad(e.to_string()))?;
    claims.claim(region).map_err(|e| bad(e.to_string()))
}

/// Writes a job's result straight into the segment: after the input in
/// the slot first, then, when that is full, in a result area about twice
/// as large asked of the dispatcher (what was written is copied there).
/// The operation returns [`ResultWriter::finish`]'s [`Output`].
///
/// Made by [`crate::JobCtx::writer`] or [`crate::JobCtx::input_and_writer`].
/// A write the dispatcher refuses room for (the pool's `max_result_mib`)
/// fails with an `io::Error` wrapping a `too large` [`RemoteError`]; the
/// job is then answered that error whatever the operation returns.
#[derive(Debug)]
pub struct ResultWriter<'c, 'a> {
    /// The slot after the input.
    free: &'c mut [u8],
    input_len: usize,
    growth: &'c mut Growth<'a>,
    /// Bytes written.
    len: usize,
}

impl<'c, 'a> ResultWriter<'c, 'a> {
    pub(crate) fn new(free: &'c mut [u8], input_len: usize, growth: &'c mut Growth<'a>) -> Self {
        ResultWriter {
            free,
            input_len,
            growth,
            len: 0,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The result written, as the operation returns it; the refusal if the
    /// dispatcher refused room for it.
    pub fn finish(self) -> Result<Output, RemoteError> {
        if let Some(e) = self.growth.refused() {
            return Err(e.clone());
        }
        let offset = if self.growth.grants() == 0 {
            self.input_len
        } else {
            0
        };
        Ok(Output::new(offset, self.len, self.growth.grants()))
    }

    fn target(&mut self) -> &mut [u8] {
        if self.growth.grants() == 0 {
            self.free
        } else {
            self.growth.area_mut()
        }
    }

    /// Room for at least `more` bytes past those written.
    fn grow(&mut self, more: usize) -> io::Result<()> {
        let capacity = if self.growth.grants() == 0 {
            self.free.len()
        } else {
            self.growth.area().len()
        };
        let needed = self.len.saturating_add(more);
        let want = needed.max(capacity.saturating_mul(2)).max(MIN_GROW);
        self.growth
            .grow(want, needed, self.len, self.free)
            .map_err(io::Error::other)
    }
}

impl io::Write for ResultWriter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.target().len() == self.len {
            self.grow(buf.len())?;
        }
        let len = self.len;
        let target = &mut self.target()[len..];
        let n = buf.len().min(target.len());
        target[..n].copy_from_slice(&buf[..n]);
        self.len += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The [`RemoteError`] an `io::Error` from a [`ResultWriter`] carries
/// (`too large`, or `internal` when the dispatcher could not be asked), or
/// `other`'s for any other error (one from the operation's own reading or
/// decoding): how an operation that copies through a writer tells the two
/// apart, e.g. `io_error(e, |e| invalid_input(format!("not valid gzip: {e}")))`.
pub fn io_error(e: io::Error, other: impl FnOnce(io::Error) -> RemoteError) -> RemoteError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RemoteError>())
    {
        Some(remote) => remote.clone(),
        None => other(e),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use ipc_core::Segment;

    use super::*;
    use crate::JobCtx;

    /// A dispatcher giving areas one after the other in the arena (a few
    /// bytes more than asked), refusing any over `limit`.
    struct Fake {
        next: u64,
        limit: u64,
        asks: Vec<u64>,
    }

    impl Dispatcher for Fake {
        fn more(&mut self, _job_id: u64) -> Result<u64, RemoteError> {
            unreachable!("the input is all in")
        }

        fn grow(&mut self, job_id: u64, len: u64) -> Result<WireRegion, RemoteError> {
            assert_eq!(job_id, 7);
            self.asks.push(len);
            if len > self.limit {
                return Err(RemoteError::new(
                    ErrorKind::TooLarge,
                    format!("a result of {len} bytes is over the pool's limit"),
                ));
            }
            let area = WireRegion {
                offset: self.next,
                len: len + 3,
            };
            self.next += len + 3;
            Ok(area)
        }
    }

    /// Runs `op` on a 1000-byte slot holding 900 input bytes, in a test
    /// segment, with a [`Fake`] dispatcher of `limit`; returns the answer,
    /// the result's bytes and the asks.
    fn run(
        tag: &str,
        limit: u64,
        op: impl FnOnce(&mut JobCtx<'_>) -> Result<Output, RemoteError>,
    ) -> (Result<Output, RemoteError>, Vec<u8>, Vec<u64>) {
        let name = format!("/osps-unit-growth-{}-{tag}", std::process::id());
        let mut seg = Segment::create(&name, 8 << 20, 1).unwrap();
        let mut claims = seg.claims();
        let slot = claims.claim(claims.check(0, 1000).unwrap()).unwrap();
        slot[..900].fill(b'i');
        let mut fake = Fake {
            next: 1000,
            limit,
            asks: Vec::new(),
        };
        let growth = Growth::segment(claims, &mut fake, 7);
        let mut ctx = JobCtx::with_growth(&[], 1, slot, 900, growth);
        let ran = op(&mut ctx);
        assert!(
            ctx.input().iter().all(|&b| b == b'i'),
            "the input is intact"
        );
        let settled = ctx.settle(ran);
        let bytes = match &settled {
            Ok(out) => ctx.result(out).unwrap().to_vec(),
            Err(_) => Vec::new(),
        };
        drop(ctx);
        (settled, bytes, fake.asks)
    }

    fn write_in_chunks(job: &mut JobCtx<'_>, data: &[u8]) -> Result<Output, RemoteError> {
        let mut w = job.writer();
        for chunk in data.chunks(7000) {
            w.write_all(chunk).map_err(|e| {
                io_error(e, |e| RemoteError::new(ErrorKind::Internal, e.to_string()))
            })?;
        }
        w.finish()
    }

    #[test]
    fn a_writer_fills_the_slot_then_grows_about_twofold_keeping_what_it_wrote() {
        let data = osps_testkit::noise(300_000);
        let (out, bytes, asks) = run("twofold", u64::MAX, |job| write_in_chunks(job, &data));
        let out = out.unwrap();
        assert!(out.in_area() && out.offset == 0 && out.len == data.len());
        assert!(bytes == data, "the result, across four areas");
        // 100 bytes fit after the input; then 64 KiB, and twice the last
        // area each time (the fake gives 3 bytes more than asked).
        assert_eq!(asks, [65536, 131_078, 262_162, 524_330]);
        // A small result stays after the input, asking nothing.
        let (out, bytes, asks) = run("small", u64::MAX, |job| write_in_chunks(job, b"abc"));
        assert_eq!(out.unwrap(), Output::new(900, 3, 0));
        assert_eq!((bytes, asks), (b"abc".to_vec(), vec![]));
    }

    #[test]
    fn near_the_limit_asks_shrink_below_the_refused_length_and_past_it_the_answer_is_too_large() {
        let data = osps_testkit::noise(200_000);
        let (out, bytes, asks) = run("near", 210_000, |job| write_in_chunks(job, &data));
        assert!(out.is_ok() && bytes == data, "{out:?}");
        // 262162 refused: halfway between what is needed and that, until given.
        assert_eq!(&asks[..3], [65536, 131_078, 262_162]);
        assert!(asks[3..].iter().all(|&a| a < 262_162), "{asks:?}");
        assert!(
            asks.iter().filter(|&&a| a > 210_000).count() <= 3,
            "{asks:?}"
        );

        let big = osps_testkit::noise(250_000);
        let (out, _, asks) = run("past", 210_000, |job| {
            // The operation sees the writer's error as an io::Error, and
            // may make any error of it: the answer is `too large`.
            let _ = write_in_chunks(job, &big);
            Err(crate::invalid_input("corrupt"))
        });
        let e = out.unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge);
        assert!(e.message.contains("over the pool's limit"), "{e}");
        assert!(asks.len() < 30, "{asks:?}");
    }

    #[test]
    fn a_reply_larger_than_the_free_room_asks_for_its_length_and_a_stale_output_is_refused() {
        let data = osps_testkit::noise(5000);
        let (out, bytes, asks) = run("reply", u64::MAX, |job| job.reply(&data));
        assert!(out.unwrap().in_area() && bytes == data);
        assert_eq!(asks, [5000]);
        let (out, _, _) = run("stale", u64::MAX, |job| {
            job.reply(&data)?;
            job.in_place(10)
        });
        assert_eq!(out.unwrap_err().kind, ErrorKind::Internal);
        let (out, _, asks) = run("refused", 100, |job| job.reply(&data));
        assert_eq!(out.unwrap_err().kind, ErrorKind::TooLarge);
        assert_eq!(asks, [5000], "a reply asks for what it needs, once");
    }

    #[test]
    fn without_a_dispatcher_the_result_grows_in_memory() {
        let data = osps_testkit::noise(100_000);
        let mut slot = b"input".to_vec();
        slot.resize(64, 0);
        let mut job = JobCtx::new(&[], 1, &mut slot, 5);
        let (input, mut w) = job.input_and_writer();
        assert_eq!(input, b"input");
        w.write_all(input).unwrap();
        w.write_all(&data).unwrap();
        let out = w.finish().unwrap();
        let result = job.result(&out).unwrap();
        assert_eq!((&result[..5], &result[5..]), (&b"input"[..], &data[..]));
    }
}
