//! The builtin worker's operations, in one table ([`OPS`]), registered
//! with the SDK by `osps-worker`'s `main` ([`crate::Worker::ops`]); `ping`
//! is the SDK's own.
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

use ipc_core::proto::{ErrorKind, RemoteError};
use sha2::{Digest, Sha256};

use crate::job::{expect_args, Call, Input, JobCtx, Output, Short};

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
}

/// The builtin operations (besides `ping`, which every worker answers).
pub const OPS: &[OpSpec] = &[
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
    OpSpec {
        name: "alloc",
        usage: "alloc MIB (allocates MIB MiB of its own memory, touches every page, frees it and answers \"allocated MIB MiB\\n\"; past the pool's memory limit the worker dies of it; fault injection only)",
        fault_injection: true,
        run: Run::Whole(alloc),
    },
];

fn echo(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    expect_args(ctx.args(), 0, "echo")?;
    ctx.in_place(ctx.input().len())
}

fn upper(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    expect_args(ctx.args(), 0, "upper")?;
    ctx.input_mut().make_ascii_uppercase();
    ctx.in_place(ctx.input().len())
}

fn sha256(call: &Call<'_>, input: &mut dyn Input) -> Result<Short, RemoteError> {
    expect_args(call.args(), 0, "sha256")?;
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
    expect_args(call.args(), 0, "wc")?;
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
    expect_args(ctx.args(), 1, "sleep MS")?;
    let ms: u64 = ctx.args()[0]
        .parse()
        .ok()
        .filter(|&ms| ms <= 3_600_000)
        .ok_or_else(|| {
            RemoteError::new(
                ErrorKind::InvalidInput,
                format!(
                    "sleep takes milliseconds from 0 to 3600000, got {:?}",
                    ctx.args()[0]
                ),
            )
        })?;
    std::thread::sleep(std::time::Duration::from_millis(ms));
    ctx.reply(format!("slept {ms} ms\n").as_bytes())
}

fn crash(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    let usage = "crash [N]";
    let upto = match ctx.args() {
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
    if upto.is_some_and(|n| ctx.attempt() > n) {
        return ctx.reply(format!("attempt {}\n", ctx.attempt()).as_bytes());
    }
    tracing::warn!(
        attempt = ctx.attempt(),
        "crash operation: aborting on purpose (fault injection)"
    );
    std::process::abort()
}

/// Fault injection: a job that leaves processes behind, as a user's job
/// running a helper program might. One `sleep 1000` stays in the worker's
/// process group; the other leaves it (and the session) through
/// `setsid(1)`. The job does not wait for them (a thread reaps each if it
/// dies while the worker lives): they are for the dispatcher's
/// process-group kill and sweep of orphans (once the worker is gone) and
/// the watchdog's sweep to end. They get no descriptor of
/// the worker's (stdin, stdout and stderr are `/dev/null`), so the job and
/// result pipes stay the worker's alone.
fn spawn(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    use std::process::{Command, Stdio};
    expect_args(ctx.args(), 0, "spawn")?;
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

/// Fault injection: a job that takes `MIB` MiB of the worker's own memory
/// (not the segment's), every page written, so a pool's memory limit
/// (`memory_limit_mib`) can be shown at work: past it the allocation
/// fails and the worker aborts (`memory allocation of N bytes failed`).
fn alloc(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    let usage = "alloc MIB";
    expect_args(ctx.args(), 1, usage)?;
    let mib = ctx.args()[0]
        .parse::<usize>()
        .ok()
        .filter(|&m| m <= 1 << 20)
        .ok_or_else(|| {
            RemoteError::new(
                ErrorKind::InvalidInput,
                format!(
                    "alloc takes MiB from 0 to 1048576, got {:?}; usage: {usage}",
                    ctx.args()[0]
                ),
            )
        })?;
    let mut taken: Vec<u8> = Vec::with_capacity(mib << 20);
    taken.resize(mib << 20, 1);
    std::hint::black_box(&mut taken);
    drop(taken);
    ctx.reply(format!("allocated {mib} MiB\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Worker;
    use std::borrow::Cow;

    fn builtin() -> Worker {
        Worker::new("osps-worker").ops(OPS)
    }

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
        let worker = builtin();
        let spec = worker.lookup(op, allow_fault_injection)?;
        let mut ctx = JobCtx::new(&args, attempt, &mut slot, input.len());
        let out = spec.run_whole(&mut ctx, &mut Vec::new())?;
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
        let mut ctx = JobCtx::new(&[], 1, &mut slot, 3);
        let out = builtin()
            .lookup("sha256", false)
            .unwrap()
            .run_whole(&mut ctx, &mut Vec::new())
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
        assert!(builtin().lookup("crash", true).is_ok());
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
    fn alloc_is_fault_injection_and_answers_what_it_took() {
        assert_eq!(
            run("alloc", &["1"], b"").unwrap_err().kind,
            ErrorKind::FaultInjectionDisabled
        );
        assert_eq!(
            run_as("alloc", &["3"], b"", 1, true).unwrap(),
            b"allocated 3 MiB\n"
        );
        for bad in [&[][..], &["x"], &["1", "2"], &["1048577"]] {
            let e = run_as("alloc", bad, b"", 1, true).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{bad:?}");
        }
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
