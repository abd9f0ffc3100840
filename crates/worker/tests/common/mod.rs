//! A test playing the dispatcher for one worker: a segment made by the
//! test, the worker started on it, frames written to its stdin and read
//! from its stdout; `Room` given from a simple bump of the arena.

#![allow(dead_code)] // each test file uses its part

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use ipc_core::frame;
use ipc_core::proto::{FromWorker, Job, JobDone, ToWorker, WireRegion};
use ipc_core::{Region, Segment};

/// An example worker of this crate, built by `cargo test` beside the test binaries.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.ancestors().nth(2).unwrap().join("examples").join(name);
    assert!(
        path.is_file(),
        "{} not built: run `cargo test -p osps-worker` (it builds the examples)",
        path.display()
    );
    path
}

/// The worker, killed and reaped however the test ends.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test's segment and worker, and the worker's pipes.
pub struct Bench {
    pub seg: Segment,
    pub w: Reaped,
    pub stdin: Option<ChildStdin>,
    pub stdout: ChildStdout,
    /// Where the next `Room` starts.
    pub next_room: u64,
}

impl Bench {
    /// A segment `/osps-test-TAG-<pid>` of `mib` MiB and `program` started
    /// on it with `args` (after `--segment`); its `Ready` is read and its
    /// operations returned.
    pub fn start(tag: &str, mib: usize, program: &Path, args: &[&str]) -> (Bench, Vec<String>) {
        let name = format!("/osps-test-{tag}-{}", std::process::id());
        let seg = Segment::create(&name, mib << 20, 1).unwrap();
        let mut w = Reaped(
            Command::new(program)
                .args(["--segment", &name])
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stdin = w.0.stdin.take();
        let stdout = w.0.stdout.take().unwrap();
        let arena = seg.arena_len() as u64;
        let mut b = Bench {
            seg,
            w,
            stdin,
            stdout,
            next_room: arena / 4,
        };
        match b.recv() {
            FromWorker::Ready { ops, version, .. } => {
                assert_eq!(version, 4);
                (b, ops)
            }
            other => panic!("ready expected, got {other:?}"),
        }
    }

    pub fn send(&mut self, msg: &ToWorker<'_>) {
        let mut buf = Vec::new();
        frame::encode(msg, &mut buf).unwrap();
        self.stdin.as_mut().unwrap().write_all(&buf).unwrap();
    }

    pub fn recv(&mut self) -> FromWorker {
        let mut scratch = Vec::new();
        frame::read_frame(&mut self.stdout, &mut scratch, 4096).unwrap()
    }

    pub fn grow(&mut self, job: u64) -> u64 {
        match self.recv() {
            FromWorker::Grow { job_id, len } if job_id == job => len,
            other => panic!("grow for job {job} expected, got {other:?}"),
        }
    }

    pub fn done(&mut self) -> JobDone {
        match self.recv() {
            FromWorker::Done(d) => d,
            other => panic!("done expected, got {other:?}"),
        }
    }

    /// Reads frames until the job's `Done`, giving each `Grow` the room
    /// asked from the arena's last three quarters; returns the `Done` and
    /// the last area given.
    pub fn done_giving_room(&mut self) -> (JobDone, Option<WireRegion>) {
        let mut last = None;
        loop {
            match self.recv() {
                FromWorker::Done(d) => return (d, last),
                FromWorker::Grow { job_id, len } => {
                    let area = WireRegion {
                        offset: self.next_room,
                        len,
                    };
                    self.next_room += len;
                    assert!(self.next_room <= self.seg.arena_len() as u64, "arena full");
                    last = Some(area);
                    self.send(&ToWorker::Room { job_id, area });
                }
                other => panic!("grow or done expected, got {other:?}"),
            }
        }
    }

    /// Puts `input` at the start of `slot` and sends job `job_id`.
    pub fn job(&mut self, job_id: u64, op: &str, args: &[&str], slot: Region, input: &[u8]) {
        self.seg.claim(slot).unwrap()[..input.len()].copy_from_slice(input);
        self.send(&ToWorker::Job(Job {
            job_id,
            op: op.into(),
            args: args.iter().copied().collect(),
            slot: slot.into(),
            input_len: input.len() as u64,
            ready: input.len() as u64,
            attempt: 1,
        }));
    }

    /// A job's input in a slot at the arena's start with 4 KiB free after it.
    pub fn run(
        &mut self,
        job_id: u64,
        op: &str,
        args: &[&str],
        input: &[u8],
    ) -> (JobDone, Vec<u8>) {
        let slot = self.seg.check(0, input.len() as u64 + 4096).unwrap();
        self.job(job_id, op, args, slot, input);
        let (d, area) = self.done_giving_room();
        let base = area.map_or(0, |a| a.offset);
        let bytes = self.bytes(base + d.result_offset, d.result_len);
        (d, bytes)
    }

    pub fn bytes(&mut self, offset: u64, len: u64) -> Vec<u8> {
        let r = self.seg.check(offset, len).unwrap();
        self.seg.claim(r).unwrap().to_vec()
    }

    /// Closes the job pipe and waits for the worker's exit code.
    pub fn stop(mut self) -> Option<i32> {
        drop(self.stdin.take());
        self.w.0.wait().unwrap().code()
    }
}
