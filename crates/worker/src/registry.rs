//! The SDK's front: [`Worker`], a builder of the operations a worker
//! serves, which then runs the worker protocol ([`Worker::run`]). The
//! operations are kept in a table, with `ping` (the health check, answered
//! for every worker) first.

use std::cell::RefCell;

use clap::{CommandFactory, FromArgMatches};
use ipc_core::proto::{ErrorKind, RemoteError, MAX_ARGS};

use crate::job::{expect_args, Call, Input, JobCtx, Output, Whole};
use crate::ops::{OpSpec, Run};
use crate::{Config, WorkerError};

/// A whole operation.
type WholeFn = dyn Fn(&mut JobCtx<'_>) -> Result<Output, RemoteError>;
/// A streaming operation, writing its result's bytes in the buffer given.
type StreamFn = dyn Fn(&Call<'_>, &mut dyn Input, &mut Vec<u8>) -> Result<(), RemoteError>;

/// How an operation runs.
pub(crate) enum Runner {
    Whole(Box<WholeFn>),
    Stream(Box<StreamFn>),
}

/// One operation the worker serves.
pub(crate) struct Op {
    pub(crate) name: String,
    /// Only served with `--allow-fault-injection`.
    pub(crate) fault_injection: bool,
    pub(crate) runner: Runner,
}

impl Op {
    pub(crate) fn streams(&self) -> bool {
        matches!(self.runner, Runner::Stream(_))
    }

    /// Runs it on a slot holding its whole input; `out` is scratch for a
    /// streaming operation's result.
    pub(crate) fn run_whole(
        &self,
        ctx: &mut JobCtx<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Output, RemoteError> {
        match &self.runner {
            Runner::Whole(f) => f(ctx),
            Runner::Stream(f) => {
                out.clear();
                f(&ctx.call(), &mut Whole(Some(ctx.input())), out)?;
                ctx.reply(out)
            }
        }
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op")
            .field("name", &self.name)
            .field("streams", &self.streams())
            .field("fault_injection", &self.fault_injection)
            .finish()
    }
}

/// A worker program: its name and the operations it serves. A few lines
/// make a worker binary:
///
/// ```no_run
/// use osps_worker::{expect_args, Worker};
///
/// fn main() -> std::process::ExitCode {
///     Worker::new("reverse-worker")
///         .op("reverse", |job| {
///             expect_args(job.args(), 0, "reverse")?;
///             let n = job.input().len();
///             job.input_mut().reverse();
///             job.in_place(n)
///         })
///         .streaming_op("count", |_call, input| {
///             let mut n = 0usize;
///             while let Some(chunk) = input.next_chunk()? {
///                 n += chunk.len();
///             }
///             Ok(format!("{n}\n"))
///         })
///         .run()
/// }
/// ```
///
/// [`Worker::run`] speaks the worker protocol (docs/PROTOCOL.md §13) on
/// stdin and stdout: it reads the arguments the dispatcher passes, opens
/// the segment, announces `Ready`, answers `ping` itself, runs each job's
/// operation on its slot, turns a returned error into a typed error for the
/// client and a panic into a crash of the worker (`worker crashed`, with
/// the panic's message, after the dispatcher's retry), and exits on EOF.
#[derive(Debug)]
pub struct Worker {
    name: &'static str,
    pub(crate) ops: Vec<Op>,
}

impl Worker {
    /// A worker called `name` (in `--help` and logs) serving only `ping`.
    pub fn new(name: &'static str) -> Worker {
        let ping = Op {
            name: "ping".into(),
            fault_injection: false,
            runner: Runner::Whole(Box::new(ping)),
        };
        Worker {
            name,
            ops: vec![ping],
        }
    }

    /// Adds a whole operation: it runs once all of the input is in the
    /// slot, and answers where its result lies ([`JobCtx::reply`] writes a
    /// result after the input, [`JobCtx::writer`] writes one as it is
    /// made, both growing past the slot as needed; [`JobCtx::in_place`]
    /// names a result made over the input).
    ///
    /// # Panics
    /// If `name` is taken (`ping` always is), empty, or `status`.
    pub fn op<F>(self, name: &str, f: F) -> Worker
    where
        F: Fn(&mut JobCtx<'_>) -> Result<Output, RemoteError> + 'static,
    {
        self.add(name, false, Runner::Whole(Box::new(f)))
    }

    /// Adds a streaming operation: it reads its input front to back
    /// ([`Input::next_chunk`]) and may start before all of it has arrived
    /// (the dispatcher sends large uploads early to such operations). Its
    /// result (any bytes, kept in the worker's memory while it is made) is
    /// written once all of the input is in, as [`JobCtx::reply`] does.
    ///
    /// # Panics
    /// As [`Worker::op`].
    pub fn streaming_op<F, R>(self, name: &str, f: F) -> Worker
    where
        F: Fn(&Call<'_>, &mut dyn Input) -> Result<R, RemoteError> + 'static,
        R: AsRef<[u8]>,
    {
        let run = move |call: &Call<'_>, input: &mut dyn Input, out: &mut Vec<u8>| {
            out.extend_from_slice(f(call, input)?.as_ref());
            Ok(())
        };
        self.add(name, false, Runner::Stream(Box::new(run)))
    }

    /// Adds the operations of a table (the builtin worker's [`crate::ops::OPS`]).
    pub fn ops(mut self, table: &[OpSpec]) -> Worker {
        for spec in table {
            let runner = match spec.run {
                Run::Whole(f) => Runner::Whole(Box::new(f)),
                Run::Stream(f) => Runner::Stream(Box::new(move |call, input, out| {
                    out.extend_from_slice(f(call, input)?.as_bytes());
                    Ok(())
                })),
            };
            self = self.add(spec.name, spec.fault_injection, runner);
        }
        self
    }

    fn add(mut self, name: &str, fault_injection: bool, runner: Runner) -> Worker {
        assert!(
            !name.is_empty() && !ipc_core::proto::DISPATCHER_OPS.contains(&name),
            "{name:?} cannot be an operation's name"
        );
        assert!(
            self.ops.iter().all(|o| o.name != name),
            "operation {name:?} is registered twice (ping is answered by the SDK)"
        );
        assert!(
            self.ops.len() <= MAX_ARGS, // ping is not listed
            "at most {MAX_ARGS} operations (Ready lists them in one frame)"
        );
        self.ops.push(Op {
            name: name.to_owned(),
            fault_injection,
            runner,
        });
        self
    }

    /// Parses the arguments the dispatcher passes (`--segment`,
    /// `--parent-pid`, `--allow-fault-injection`, `--log-format` or
    /// `OSPS_LOG_FORMAT`), starts logging to stderr and serves until stdin
    /// closes. Exits 0 then, 1 on an error (logged).
    pub fn run(self) -> std::process::ExitCode {
        let cmd = crate::Args::command().name(self.name).bin_name(self.name);
        let args = crate::Args::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit());
        crate::start(args, |config| self.serve(config))
    }

    /// Serves jobs on stdin and stdout until stdin closes (for a program
    /// that parses its own arguments; it should start logging first).
    pub fn serve(&self, config: &Config) -> Result<(), WorkerError> {
        install_panic_hook();
        crate::serve(self, config)
    }

    /// The operations that stream, as `Ready` lists them.
    pub(crate) fn streams(&self, allow_fault_injection: bool) -> Vec<String> {
        self.ops
            .iter()
            .filter(|o| o.streams() && (allow_fault_injection || !o.fault_injection))
            .map(|o| o.name.clone())
            .collect()
    }

    /// Every operation, as `Ready` lists them: not `ping` (every worker
    /// answers it), but those that inject faults (the worker answers them
    /// `FaultInjectionDisabled` when off).
    pub(crate) fn names(&self) -> Vec<String> {
        self.ops
            .iter()
            .filter(|o| o.name != ipc_core::proto::OP_PING)
            .map(|o| o.name.clone())
            .collect()
    }

    /// Finds an operation; the error lists what exists.
    pub(crate) fn lookup(
        &self,
        name: &str,
        allow_fault_injection: bool,
    ) -> Result<&Op, RemoteError> {
        match self.ops.iter().find(|o| o.name == name) {
            Some(op) if op.fault_injection && !allow_fault_injection => Err(RemoteError::new(
                ErrorKind::FaultInjectionDisabled,
                format!("{name:?} injects faults and is off; start the dispatcher with --allow-fault-injection to use it"),
            )),
            Some(op) => Ok(op),
            None => {
                let known: Vec<&str> = self.ops.iter().filter(|o| allow_fault_injection || !o.fault_injection).map(|o| o.name.as_str()).collect();
                Err(RemoteError::new(ErrorKind::UnknownOp, format!("{name:?} is not an operation; known: {}", known.join(", "))))
            }
        }
    }
}

/// The health check, answered by every worker.
fn ping(ctx: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    expect_args(ctx.args(), 0, "ping")?;
    ctx.reply(b"pong\n")
}

thread_local! {
    /// What the last panic said, and where (set by the hook, taken by [`panic_message`]).
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records each panic's message and place for [`panic_message`], then
/// does what the hook before did (print it to stderr).
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let place = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let text = format!("{}{place}", payload_text(info.payload()));
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(text));
            previous(info);
        }));
    });
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_owned()
    }
}

/// The message of a panic just caught, with its place when the hook saw it.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    LAST_PANIC
        .with(|p| p.borrow_mut().take())
        .unwrap_or_else(|| payload_text(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_worker() -> Worker {
        Worker::new("t")
            .op("rev", |job| {
                job.input_mut().reverse();
                job.in_place(job.input().len())
            })
            .streaming_op("len", |_call, input| {
                let mut n = 0;
                while let Some(c) = input.next_chunk()? {
                    n += c.len();
                }
                Ok(n.to_string())
            })
    }

    fn run(w: &Worker, op: &str, input: &[u8]) -> Result<Vec<u8>, RemoteError> {
        let mut slot = input.to_vec();
        slot.resize(input.len() + 64, 0);
        let mut ctx = JobCtx::new(&[], 1, &mut slot, input.len());
        let out = w.lookup(op, false)?.run_whole(&mut ctx, &mut Vec::new())?;
        Ok(slot[out.offset..out.offset + out.len].to_vec())
    }

    #[test]
    fn every_worker_answers_ping_and_lists_its_operations() {
        let w = user_worker();
        assert_eq!(run(&w, "ping", b"x").unwrap(), b"pong\n");
        assert_eq!(run(&w, "rev", b"abc").unwrap(), b"cba");
        assert_eq!(run(&w, "len", b"abcd").unwrap(), b"4");
        assert_eq!(w.streams(false), ["len"]);
        assert_eq!(w.names(), ["rev", "len"], "ping is not listed");
        let e = run(&w, "nope", b"").unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownOp);
        assert_eq!(
            e.message,
            "\"nope\" is not an operation; known: ping, rev, len"
        );
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn ping_cannot_be_registered() {
        let _ = Worker::new("t").op("ping", |job| job.in_place(0));
    }

    #[test]
    #[should_panic(expected = "cannot be an operation's name")]
    fn status_cannot_be_registered() {
        let _ = Worker::new("t").op("status", |job| job.in_place(0));
    }
}
