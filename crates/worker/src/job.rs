//! What an operation sees of its job: [`JobCtx`] (a whole operation's slot,
//! input, arguments and attempt, and where it writes its result), [`Call`]
//! and [`Input`] (a streaming operation's arguments and its input, chunk by
//! chunk), and where its result lies ([`Output`]).

use std::borrow::Cow;

use ipc_core::proto::{ErrorKind, RemoteError};

use crate::growth::{Growth, ResultWriter};

/// Where the result lies: in the slot, or, once the result outgrew it, in
/// the last result area the dispatcher gave. Made by [`JobCtx::reply`],
/// [`JobCtx::in_place`] and [`ResultWriter::finish`]; read it with
/// [`JobCtx::result`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// Offset from the start of the slot, or of the last result area.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
    /// The area it is in: 0 for the slot, `k` for the `k`-th area given.
    area: u32,
}

impl Output {
    pub(crate) fn new(offset: usize, len: usize, area: u32) -> Output {
        Output { offset, len, area }
    }

    /// Whether the result lies in a result area given by the dispatcher
    /// (then [`Output::offset`] counts from that area's start).
    pub fn in_area(&self) -> bool {
        self.area > 0
    }
}

/// What a streaming operation is told about its job, besides its input.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The job's arguments.
    pub args: &'a [Cow<'a, str>],
    /// Which run of the job this is in the dispatcher: 1 the first time, 2
    /// when it runs again because its worker died during the first run. A
    /// client's resend (after it lost the dispatcher) arrives as a new job
    /// with attempt 1: an attempt of 1 does not prove a first delivery.
    pub attempt: u32,
}

impl<'a> Call<'a> {
    /// The job's arguments, as the client gave them.
    pub fn args(&self) -> &'a [Cow<'a, str>] {
        self.args
    }

    /// Which run of the job this is (see [`Call::attempt`]'s field).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// A whole operation's job: its slot in the shared segment (the input at
/// the start, free room after it), its arguments and its attempt, and
/// where its result goes.
///
/// A result is written after the input ([`JobCtx::reply`], or
/// [`JobCtx::writer`] as it is made), or made over it
/// ([`JobCtx::in_place`]). One that does not fit after the input grows: the
/// SDK asks the dispatcher for a larger result area in the segment and
/// writes there (up to the pool's `max_result_mib`; past it the job is
/// answered `too large`). The input stays intact, so a job retried after
/// its worker died sees the same bytes.
///
/// The slot and areas are the job's alone until the operation returns;
/// the SDK answers with the [`Output`] the operation returns, and touches
/// none of them after that.
#[derive(Debug)]
pub struct JobCtx<'a> {
    args: &'a [Cow<'a, str>],
    attempt: u32,
    slot: &'a mut [u8],
    input_len: usize,
    growth: Growth<'a>,
}

impl<'a> JobCtx<'a> {
    /// A job on `slot` whose first `input_len` bytes are the input, for
    /// unit tests of an operation (the SDK makes these itself). No
    /// dispatcher is there to give room: a result larger than the slot
    /// grows in a buffer of the context's own, without a limit; read it
    /// with [`JobCtx::result`].
    ///
    /// # Panics
    /// If `input_len` is longer than the slot.
    pub fn new(
        args: &'a [Cow<'a, str>],
        attempt: u32,
        slot: &'a mut [u8],
        input_len: usize,
    ) -> Self {
        Self::with_growth(args, attempt, slot, input_len, Growth::local())
    }

    pub(crate) fn with_growth(
        args: &'a [Cow<'a, str>],
        attempt: u32,
        slot: &'a mut [u8],
        input_len: usize,
        growth: Growth<'a>,
    ) -> Self {
        assert!(input_len <= slot.len(), "input longer than its slot");
        JobCtx {
            args,
            attempt,
            slot,
            input_len,
            growth,
        }
    }

    /// The job's arguments, as the client gave them.
    pub fn args(&self) -> &'a [Cow<'a, str>] {
        self.args
    }

    /// Which run of the job this is: 1, then 2, 3, ... (up to the pool's
    /// `max_attempts`) when it runs again because its worker died during
    /// an earlier run (see [`Call::attempt`]).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The input bytes.
    pub fn input(&self) -> &[u8] {
        &self.slot[..self.input_len]
    }

    /// The input bytes, to transform in place (then answer [`JobCtx::in_place`]).
    /// An in-place change must be idempotent: a retried job sees the bytes
    /// its first run left.
    pub fn input_mut(&mut self) -> &mut [u8] {
        &mut self.slot[..self.input_len]
    }

    /// The whole slot: the input, then room for the result.
    pub fn slot_mut(&mut self) -> &mut [u8] {
        self.slot
    }

    /// The arguments and attempt, as a streaming operation sees them.
    pub fn call(&self) -> Call<'a> {
        Call {
            args: self.args,
            attempt: self.attempt,
        }
    }

    /// The result is the first `len` bytes of the slot (the input
    /// transformed in place, or its first `len` bytes). Not after the
    /// result has grown out of the slot ([`JobCtx::reply`] or a writer
    /// asked for an area): the SDK then answers the job an internal error.
    pub fn in_place(&self, len: usize) -> Result<Output, RemoteError> {
        if len > self.slot.len() {
            return Err(RemoteError::new(
                ErrorKind::Internal,
                format!("result of {len} bytes exceeds the slot"),
            ));
        }
        Ok(Output::new(0, len, 0))
    }

    /// Writes `bytes` as the result: after the input when it fits there
    /// (the dispatcher reserves 4 KiB for small results), else in a result
    /// area of its length asked of the dispatcher (or in the last area
    /// given, if the result grew before and `bytes` fit there).
    pub fn reply(&mut self, bytes: &[u8]) -> Result<Output, RemoteError> {
        let len = bytes.len();
        if self.growth.grants() == 0 && self.slot.len() - self.input_len >= len {
            self.slot[self.input_len..self.input_len + len].copy_from_slice(bytes);
            return Ok(Output::new(self.input_len, len, 0));
        }
        if self.growth.grants() == 0 || self.growth.area().len() < len {
            self.growth.grow(len, len, 0, &[])?;
        }
        self.growth.area_mut()[..len].copy_from_slice(bytes);
        Ok(Output::new(0, len, self.growth.grants()))
    }

    /// A writer of the result, straight into the segment: after the input,
    /// growing into larger areas as needed (see [`ResultWriter`]). Return
    /// its [`ResultWriter::finish`].
    pub fn writer(&mut self) -> ResultWriter<'_, 'a> {
        self.input_and_writer().1
    }

    /// The input, and a writer of the result at the same time (to
    /// transform the one into the other as a stream: decompress, convert).
    pub fn input_and_writer(&mut self) -> (&[u8], ResultWriter<'_, 'a>) {
        let (input, free) = self.slot.split_at_mut(self.input_len);
        (
            input,
            ResultWriter::new(free, self.input_len, &mut self.growth),
        )
    }

    /// The bytes `out` names, if it names the current result (in the slot
    /// while the result never grew, else in the last area given): how a
    /// unit test reads an operation's result.
    pub fn result(&self, out: &Output) -> Option<&[u8]> {
        if out.area != self.growth.grants() {
            return None;
        }
        let within = if out.area == 0 {
            &self.slot[..]
        } else {
            self.growth.area()
        };
        within.get(out.offset..out.offset.checked_add(out.len)?)
    }

    /// The answer to the job from what its operation returned: a refusal
    /// of room wins (but for a panic), and an [`Output`] must name the
    /// current result.
    pub(crate) fn settle(&self, ran: Result<Output, RemoteError>) -> Result<Output, RemoteError> {
        match (&ran, self.growth.refused()) {
            (Err(e), _) if e.kind == ErrorKind::WorkerCrashed => return ran,
            (_, Some(refused)) => return Err(refused.clone()),
            _ => {}
        }
        let out = ran?;
        if self.result(&out).is_none() {
            return Err(RemoteError::new(
                ErrorKind::Internal,
                format!(
                    "the operation answered a result ({} bytes at {}) outside its current result area (a result named before it grew, or in place after it grew)",
                    out.len, out.offset
                ),
            ));
        }
        Ok(out)
    }
}

/// Checks that exactly `n` arguments were given; the error
/// (`invalid input`) quotes `usage`.
pub fn expect_args(args: &[Cow<'_, str>], n: usize, usage: &str) -> Result<(), RemoteError> {
    if args.len() == n {
        Ok(())
    } else {
        Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!(
                "expected {n} argument(s), got {}; usage: {usage}",
                args.len()
            ),
        ))
    }
}

/// An `invalid input` error: the operation cannot process what it was
/// given (bad arguments, corrupt input). The client gets it as is.
pub fn invalid_input(message: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorKind::InvalidInput, message)
}

/// The input of a streaming operation, front to back.
pub trait Input {
    /// The next piece of the input (waiting for it to arrive if need be), or
    /// `None` once all of it has been seen. An error means the input will
    /// never arrive in full; the operation should return it.
    fn next_chunk(&mut self) -> Result<Option<&[u8]>, RemoteError>;
}

/// A whole input already in memory, as one chunk.
#[derive(Debug)]
pub struct Whole<'a>(pub Option<&'a [u8]>);

impl Input for Whole<'_> {
    fn next_chunk(&mut self) -> Result<Option<&[u8]>, RemoteError> {
        Ok(self.0.take())
    }
}

/// Longest result of a [`Short`].
pub const SHORT_MAX: usize = 128;

/// A short result kept inline (no allocation), for streaming operations
/// that answer a few bytes (a digest, a count).
#[derive(Clone, Copy)]
pub struct Short {
    bytes: [u8; SHORT_MAX],
    len: usize,
}

impl Short {
    /// `bytes`, which must be at most [`SHORT_MAX`] long.
    pub fn new(bytes: &[u8]) -> Self {
        let mut s = Short {
            bytes: [0; SHORT_MAX],
            len: bytes.len(),
        };
        s.bytes[..bytes.len()].copy_from_slice(bytes);
        s
    }

    /// The result's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl AsRef<[u8]> for Short {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Short({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}
