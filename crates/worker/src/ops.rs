//! The operations a worker runs, in one table: adding an operation is adding
//! one function and one row to [`OPS`].
//!
//! An operation is one of two kinds ([`Run`]):
//! - **whole**: it sees its slot, the input at the start and free room after
//!   it, once all of the input is there. It either transforms the input in
//!   place (the result is the first bytes of the slot) or writes a small
//!   result after the input with [`JobCtx::reply`], which leaves the input
//!   intact so that a job retried after a worker crash sees the same bytes.
//!   In-place operations must be idempotent (`upper` is) for the same reason.
//! - **streaming**: it reads the input front to back, chunk by chunk, and
//!   answers a short result ([`Short`]). The dispatcher may send such a job
//!   while its payload is still arriving (the worker announces these
//!   operations in its `Ready` message), so hashing overlaps the upload.
//!
//! Both see which run of the job this is ([`Call::attempt`]): jobs are
//! delivered at least once, so an operation with effects outside its slot
//! can tell a retry after a worker crash (attempt 2) from a first run.

use std::borrow::Cow;

use ipc_core::proto::{ErrorKind, RemoteError};
use sha2::{Digest, Sha256};

/// Where the result lies in the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// Offset from the slot's start.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

/// What an operation is told about its job, besides its input.
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

/// What an operation works on.
#[derive(Debug)]
pub struct JobCtx<'a> {
    /// The job's arguments.
    pub args: &'a [Cow<'a, str>],
    /// See [`Call::attempt`].
    pub attempt: u32,
    /// The whole slot; the input is `slot[..input_len]`.
    pub slot: &'a mut [u8],
    /// Length of the input.
    pub input_len: usize,
}

impl JobCtx<'_> {
    /// The input bytes.
    pub fn input(&self) -> &[u8] {
        &self.slot[..self.input_len]
    }

    /// Writes `bytes` as the result: after the input when it fits there (the
    /// dispatcher reserves room for small results), else over the input.
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

    /// The arguments and attempt.
    pub fn call(&self) -> Call<'_> {
        Call {
            args: self.args,
            attempt: self.attempt,
        }
    }

    /// Checks that exactly `n` arguments were given.
    fn expect_args(&self, n: usize, usage: &str) -> Result<(), RemoteError> {
        expect_args(self.args, n, usage)
    }
}

/// Checks that exactly `n` arguments were given.
fn expect_args(args: &[Cow<'_, str>], n: usize, usage: &str) -> Result<(), RemoteError> {
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

/// Longest result of a streaming operation.
pub const SHORT_MAX: usize = 128;

/// A streaming operation's result: a few bytes, kept inline (no allocation).
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

impl std::fmt::Debug for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Short({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// How an operation runs.
#[derive(Debug, Clone, Copy)]
pub enum Run {
    /// On the whole input, in its slot.
    Whole(fn(&mut JobCtx<'_>) -> Result<Output, RemoteError>),
    /// On the input front to back, possibly while it arrives.
    Stream(fn(&Call<'_>, &mut dyn Input) -> Result<Short, RemoteError>),
}

/// One operation.
#[derive(Debug)]
pub struct OpSpec {
    /// Its name on the wire and on the command line.
    pub name: &'static str,
    /// Usage line, shown in errors.
    pub usage: &'static str,
    /// Only available when the dispatcher allows fault injection.
    pub fault_injection: bool,
    /// The implementation.
    pub run: Run,
}

impl OpSpec {
    /// Whether it reads its input front to back (and may start before all of it has arrived).
    pub fn streams(&self) -> bool {
        matches!(self.run, Run::Stream(_))
    }

    /// Runs it on a slot holding its whole input.
    pub fn run_whole(&self, ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
        match self.run {
            Run::Whole(f) => f(ctx),
            Run::Stream(f) => {
                let short = f(&ctx.call(), &mut Whole(Some(ctx.input())))?;
                ctx.reply(short.as_bytes())
            }
        }
    }
}

/// Every operation a worker knows.
pub const OPS: &[OpSpec] = &[
    OpSpec {
        name: "ping",
        usage: "ping",
        fault_injection: false,
        run: Run::Whole(ping),
    },
    OpSpec {
        name: "echo",
        usage: "echo (payload returned as is)",
        fault_injection: false,
        run: Run::Whole(echo),
    },
    OpSpec {
        name: "upper",
        usage: "upper (ASCII upper case)",
        fault_injection: false,
        run: Run::Whole(upper),
    },
    OpSpec {
        name: "sha256",
        usage: "sha256 (hex digest and newline)",
        fault_injection: false,
        run: Run::Stream(sha256),
    },
    OpSpec {
        name: "wc",
        usage: "wc (\"LINES WORDS BYTES\\n\")",
        fault_injection: false,
        run: Run::Stream(wc),
    },
    OpSpec {
        name: "sleep",
        usage: "sleep MS (at most 3600000)",
        fault_injection: false,
        run: Run::Whole(sleep),
    },
    OpSpec {
        name: "crash",
        usage: "crash [N] (aborts the worker on attempts up to N, all if no N; later attempts answer \"attempt K\\n\"; fault injection only)",
        fault_injection: true,
        run: Run::Whole(crash),
    },
    OpSpec {
        name: "spawn",
        usage: "spawn (starts two `sleep 1000`, one in the worker's process group, one in its own session, and answers \"group PID\\nsession PID\\n\"; fault injection only)",
        fault_injection: true,
        run: Run::Whole(spawn),
    },
];

/// Finds an operation; the error lists what exists.
pub fn lookup(name: &str, allow_fault_injection: bool) -> Result<&'static OpSpec, RemoteError> {
    match OPS.iter().find(|o| o.name == name) {
        Some(op) if op.fault_injection && !allow_fault_injection => Err(RemoteError::new(
            ErrorKind::FaultInjectionDisabled,
            format!("{name:?} injects faults and is off; start the dispatcher with --allow-fault-injection to use it"),
        )),
        Some(op) => Ok(op),
        None => {
            let known: Vec<&str> = OPS.iter().filter(|o| allow_fault_injection || !o.fault_injection).map(|o| o.name).collect();
            Err(RemoteError::new(ErrorKind::UnknownOp, format!("{name:?} is not an operation; known: {}", known.join(", "))))
        }
    }
}

fn ping(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    ctx.expect_args(0, "ping")?;
    ctx.reply(b"pong\n")
}

fn echo(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    ctx.expect_args(0, "echo")?;
    Ok(Output {
        offset: 0,
        len: ctx.input_len,
    })
}

fn upper(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    ctx.expect_args(0, "upper")?;
    let n = ctx.input_len;
    ctx.slot[..n].make_ascii_uppercase();
    Ok(Output { offset: 0, len: n })
}

fn sha256(call: &Call<'_>, input: &mut dyn Input) -> Result<Short, RemoteError> {
    expect_args(call.args, 0, "sha256")?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = input.next_chunk()? {
        hasher.update(chunk);
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [b'\n'; 65];
    for (i, b) in hasher.finalize().iter().enumerate() {
        hex[2 * i] = HEX[(b >> 4) as usize];
        hex[2 * i + 1] = HEX[(b & 15) as usize];
    }
    Ok(Short::new(&hex))
}

fn wc(call: &Call<'_>, input: &mut dyn Input) -> Result<Short, RemoteError> {
    expect_args(call.args, 0, "wc")?;
    let (mut lines, mut words, mut len) = (0usize, 0usize, 0usize);
    // Whether the byte before this chunk was inside a word: words may span chunks.
    let mut in_word = false;
    while let Some(chunk) = input.next_chunk()? {
        len += chunk.len();
        for &b in chunk {
            lines += usize::from(b == b'\n');
            let space = b.is_ascii_whitespace();
            words += usize::from(!space && !in_word);
            in_word = !space;
        }
    }
    let mut text = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut text[..]);
    let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{lines} {words} {len}\n"));
    let n = cursor.position() as usize;
    Ok(Short::new(&text[..n]))
}

fn sleep(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    ctx.expect_args(1, "sleep MS")?;
    let ms: u64 = ctx.args[0]
        .parse()
        .ok()
        .filter(|&ms| ms <= 3_600_000)
        .ok_or_else(|| {
            RemoteError::new(
                ErrorKind::InvalidInput,
                format!(
                    "sleep takes milliseconds from 0 to 3600000, got {:?}",
                    ctx.args[0]
                ),
            )
        })?;
    std::thread::sleep(std::time::Duration::from_millis(ms));
    ctx.reply(format!("slept {ms} ms\n").as_bytes())
}

fn crash(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    let usage = "crash [N]";
    let upto = match ctx.args {
        [] => None,
        [n] => Some(n.parse::<u32>().map_err(|_| {
            RemoteError::new(
                ErrorKind::InvalidInput,
                format!("crash takes the last attempt to crash on, got {n:?}; usage: {usage}"),
            )
        })?),
        more => {
            return Err(RemoteError::new(
                ErrorKind::InvalidInput,
                format!(
                    "expected at most 1 argument, got {}; usage: {usage}",
                    more.len()
                ),
            ))
        }
    };
    if upto.is_some_and(|n| ctx.attempt > n) {
        return ctx.reply(format!("attempt {}\n", ctx.attempt).as_bytes());
    }
    tracing::warn!(
        attempt = ctx.attempt,
        "crash operation: aborting on purpose (fault injection)"
    );
    std::process::abort()
}

/// Fault injection: a job that leaves processes behind, as a user's job
/// running a helper program might. One `sleep 1000` stays in the worker's
/// process group; the other leaves it (and the session) through
/// `setsid(1)`. The job does not wait for them (a thread reaps each if it
/// dies while the worker lives): they are for the watchdog's sweep and
/// the dispatcher's process-group kill to end. They get no descriptor of
/// the worker's (stdin, stdout and stderr are `/dev/null`), so the job and
/// result pipes stay the worker's alone.
fn spawn(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    use std::process::{Command, Stdio};
    ctx.expect_args(0, "spawn")?;
    let start = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(|mut child| {
                let pid = child.id();
                // Reaped if it dies while the worker lives (no zombie);
                // the worker does not wait for it otherwise.
                std::thread::spawn(move || child.wait());
                pid
            })
            .map_err(|e| {
                RemoteError::new(ErrorKind::Internal, format!("cannot start {program}: {e}"))
            })
    };
    let group = start("sleep", &["1000"])?;
    // Not a process group leader, so setsid(1) calls setsid() and execs in
    // place: the pid it had is the one `sleep` keeps.
    let session = start("setsid", &["sleep", "1000"])?;
    tracing::warn!(
        group,
        session,
        "spawn operation: left two processes behind on purpose (fault injection)"
    );
    ctx.reply(format!("group {group}\nsession {session}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(op: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>, RemoteError> {
        run_as(op, args, input, 1, false)
    }

    fn run_as(
        op: &str,
        args: &[&str],
        input: &[u8],
        attempt: u32,
        allow_fault_injection: bool,
    ) -> Result<Vec<u8>, RemoteError> {
        let args: Vec<Cow<'_, str>> = args.iter().map(|&a| a.into()).collect();
        let mut slot = vec![0u8; input.len() + 4096];
        slot[..input.len()].copy_from_slice(input);
        let spec = lookup(op, allow_fault_injection)?;
        let mut ctx = JobCtx {
            args: &args,
            attempt,
            slot: &mut slot,
            input_len: input.len(),
        };
        let out = spec.run_whole(&mut ctx)?;
        Ok(slot[out.offset..out.offset + out.len].to_vec())
    }

    #[test]
    fn operations_compute_what_they_say() {
        assert_eq!(run("ping", &[], b"").unwrap(), b"pong\n");
        assert_eq!(run("echo", &[], b"a\0b").unwrap(), b"a\0b");
        assert_eq!(
            run("upper", &[], b"abc, d\xc3\xa9!").unwrap(),
            b"ABC, D\xc3\xa9!"
        );
        assert_eq!(
            run("sha256", &[], b"abc").unwrap(),
            b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        );
        assert_eq!(
            run("wc", &[], b"one two\nthree\n\n  four").unwrap(),
            b"3 4 21\n"
        );
        assert_eq!(run("sleep", &["1"], b"").unwrap(), b"slept 1 ms\n");
    }

    #[test]
    fn small_results_leave_the_input_intact() {
        let mut slot = b"abc".to_vec();
        slot.resize(4096, 0);
        let mut ctx = JobCtx {
            args: &[],
            attempt: 1,
            slot: &mut slot,
            input_len: 3,
        };
        let out = lookup("sha256", false)
            .unwrap()
            .run_whole(&mut ctx)
            .unwrap();
        assert_eq!(out.offset, 3);
        assert_eq!(&slot[..3], b"abc");
    }

    /// Feeds an input in the chunks given.
    struct Chunked<'a>(std::collections::VecDeque<&'a [u8]>);

    impl Input for Chunked<'_> {
        fn next_chunk(&mut self) -> Result<Option<&[u8]>, RemoteError> {
            Ok(self.0.pop_front())
        }
    }

    #[test]
    fn streaming_operations_give_the_same_answer_whatever_the_chunks() {
        let text = b"one two\nthree\n\n  four five  six\tseven\n eight".repeat(7);
        let streaming: Vec<&OpSpec> = OPS.iter().filter(|o| o.streams()).collect();
        assert_eq!(
            streaming.iter().map(|o| o.name).collect::<Vec<_>>(),
            ["sha256", "wc"]
        );
        let call = Call {
            args: &[],
            attempt: 1,
        };
        for spec in streaming {
            let Run::Stream(f) = spec.run else {
                unreachable!()
            };
            let whole = run(spec.name, &[], &text).unwrap();
            // Every split into up to three pieces, empty ones included.
            for a in (0..=text.len()).step_by(3) {
                for b in (a..=text.len()).step_by(5) {
                    let pieces = [&text[..a], &text[a..b], &text[b..]];
                    let got = f(&call, &mut Chunked(pieces.into_iter().collect())).unwrap();
                    assert_eq!(
                        got.as_bytes(),
                        &whole[..],
                        "{} split at {a}, {b}",
                        spec.name
                    );
                }
            }
            // One byte at a time.
            let bytes = Chunked(text.chunks(1).collect());
            assert_eq!(f(&call, &mut { bytes }).unwrap().as_bytes(), &whole[..]);
        }
    }

    #[test]
    fn bad_requests_get_typed_errors() {
        assert_eq!(
            run("nope", &[], b"").unwrap_err().kind,
            ErrorKind::UnknownOp
        );
        for op in ["crash", "spawn"] {
            assert_eq!(
                run(op, &[], b"").unwrap_err().kind,
                ErrorKind::FaultInjectionDisabled,
                "{op}"
            );
        }
        assert_eq!(
            run("sleep", &[], b"").unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        assert_eq!(
            run("sleep", &["soon"], b"").unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        assert_eq!(
            run("ping", &["x"], b"").unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        assert!(lookup("crash", true).is_ok());
        assert_eq!(
            run_as("crash", &["soon"], b"", 2, true).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        assert_eq!(
            run_as("crash", &["1", "2"], b"", 2, true).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn crash_with_a_bound_answers_its_attempt_past_it() {
        // (Attempts up to the bound abort the process: see the dispatcher's tests.)
        assert_eq!(
            run_as("crash", &["1"], b"", 2, true).unwrap(),
            b"attempt 2\n"
        );
        assert_eq!(
            run_as("crash", &["0"], b"", 1, true).unwrap(),
            b"attempt 1\n"
        );
    }
}
