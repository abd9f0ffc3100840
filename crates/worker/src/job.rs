//! What an operation sees of its job: [`JobCtx`] (a whole operation's slot,
//! input, arguments and attempt), [`Call`] and [`Input`] (a streaming
//! operation's arguments and its input, chunk by chunk), and where its result
//! lies ([`Output`]).

use std::borrow::Cow;

use ipc_core::proto::{ErrorKind, RemoteError};

/// Where the result lies in the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// Offset from the slot's start.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
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
/// the start, free room after it), its arguments and its attempt.
///
/// The slot is the job's alone until the operation returns; the SDK
/// answers with the [`Output`] the operation returns, and the slot is not
/// touched after that.
#[derive(Debug)]
pub struct JobCtx<'a> {
    args: &'a [Cow<'a, str>],
    attempt: u32,
    slot: &'a mut [u8],
    input_len: usize,
}

impl<'a> JobCtx<'a> {
    /// A job on `slot` whose first `input_len` bytes are the input (for
    /// unit tests of an operation: the SDK makes these itself).
    ///
    /// # Panics
    /// If `input_len` is longer than the slot.
    pub fn new(
        args: &'a [Cow<'a, str>],
        attempt: u32,
        slot: &'a mut [u8],
        input_len: usize,
    ) -> Self {
        assert!(input_len <= slot.len(), "input longer than its slot");
        JobCtx {
            args,
            attempt,
            slot,
            input_len,
        }
    }

    /// The job's arguments, as the client gave them.
    pub fn args(&self) -> &'a [Cow<'a, str>] {
        self.args
    }

    /// Which run of the job this is: 1, then 2, 3, ... (up to the
    /// dispatcher's `--max-attempts`) when it runs again because its worker
    /// died during an earlier run (see [`Call::attempt`]).
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
    /// transformed in place, or its first `len` bytes).
    pub fn in_place(&self, len: usize) -> Result<Output, RemoteError> {
        if len > self.slot.len() {
            return Err(RemoteError::new(
                ErrorKind::Internal,
                format!("result of {len} bytes exceeds the slot"),
            ));
        }
        Ok(Output { offset: 0, len })
    }

    /// Writes `bytes` as the result: after the input when it fits there (the
    /// dispatcher reserves 4 KiB for small results, and leaving the input
    /// intact lets a retried job see the same bytes), else over the input.
    pub fn reply(&mut self, bytes: &[u8]) -> Result<Output, RemoteError> {
        let offset = if self.slot.len() - self.input_len >= bytes.len() {
            self.input_len
        } else if bytes.len() <= self.slot.len() {
            0
        } else {
            return Err(RemoteError::new(
                ErrorKind::Internal,
                format!("result of {} bytes exceeds the slot", bytes.len()),
            ));
        };
        self.slot[offset..offset + bytes.len()].copy_from_slice(bytes);
        Ok(Output {
            offset,
            len: bytes.len(),
        })
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
