//! `osps-worker` in exec mode (a command pool's worker) run alone on a
//! segment made by the test, which plays the dispatcher (giving room for
//! results larger than their slot): each job runs the command with the
//! payload on its stdin and its stdout as the result; a failure, a
//! timeout, arguments and the worker's own SIGTERM are answered as
//! documented, and no process of a job is left after it.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::Bench;
use ipc_core::proto::{ErrorKind, Outcome};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_testkit::{assert_group_gone, group_members, GroupGuard};

fn start(tag: &str, args: &[&str]) -> Bench {
    let (b, ops) = Bench::start(tag, 16, &osps_testkit::bin("osps-worker"), args);
    let named: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--exec-op")
        .map(|w| w[1])
        .collect();
    assert_eq!(ops, named, "Ready lists the --exec-op names");
    b
}

fn error(outcome: Outcome) -> ipc_core::RemoteError {
    match outcome {
        Outcome::Err(e) => e,
        Outcome::Ok => panic!("an error expected"),
    }
}

#[test]
fn gzip_of_random_data_comes_back_larger_through_the_room_given_and_gunzips_to_the_input() {
    let mut b = start("exec-gzip", &["--exec-op", "gzip", "--", "gzip", "-c"]);
    let data = osps_testkit::noise(1 << 20);
    let slot = b.seg.check(0, data.len() as u64 + 4096).unwrap();
    b.job(1, "gzip", &[], slot, &data);
    let (d, area) = b.done_giving_room();
    assert_eq!(d.outcome, Outcome::Ok);
    assert!(d.result_len > data.len() as u64, "{d:?}");
    let area = area.expect("the result grew out of its slot");
    let gz = b.bytes(area.offset + d.result_offset, d.result_len);
    let mut back = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == data, "gunzip gives back the input");
    assert_eq!(b.bytes(0, 16), data[..16], "the input is left intact");
    // A small one fits after the input; ping is the SDK's.
    let (d, gz) = b.run(2, "gzip", &[], b"hello hello hello");
    assert_eq!((d.outcome, d.result_offset), (Outcome::Ok, 17));
    let mut back = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut back)
        .unwrap();
    assert_eq!(back, "hello hello hello");
    assert_eq!(b.run(3, "ping", &[], b"").1, b"pong\n");
    assert_eq!(b.stop(), Some(0));
}

#[test]
fn a_failing_command_is_answered_command_failed_with_its_status_and_stderr() {
    let script = "echo partial; echo oops >&2; exit 3";
    let mut b = start(
        "exec-fail",
        &["--exec-op", "fail", "--", "sh", "-c", script],
    );
    let (d, _) = b.run(1, "fail", &[], b"input");
    let e = error(d.outcome);
    assert_eq!(e.kind, ErrorKind::CommandFailed, "{e}");
    assert_eq!(e.message, "sh exited with status 3; stderr: oops");
    // Killed by a signal.
    drop(b);
    let mut b = start(
        "exec-signal",
        &["--exec-op", "die", "--", "sh", "-c", "kill -9 $$"],
    );
    let e = error(b.run(1, "die", &[], b"").0.outcome);
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::CommandFailed, "sh was killed by signal SIGKILL")
    );
    // A command that cannot start.
    drop(b);
    let missing = "/nonexistent/osps-test-program";
    let mut b = start("exec-missing", &["--exec-op", "x", "--", missing]);
    let e = error(b.run(1, "x", &[], b"").0.outcome);
    assert_eq!(e.kind, ErrorKind::CommandFailed);
    assert!(
        e.message.starts_with(&format!("cannot start {missing}: ")),
        "{e}"
    );
    assert_eq!(b.stop(), Some(0));
}

#[test]
fn a_command_past_its_timeout_is_killed_with_its_children_and_answered_timeout() {
    let script = "echo started $$ >&2; sleep 100 & sleep 100";
    let mut b = start(
        "exec-timeout",
        &[
            "--exec-op",
            "slow",
            "--timeout-ms",
            "500",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let began = Instant::now();
    let (d, _) = b.run(1, "slow", &[], b"");
    let took = began.elapsed();
    let e = error(d.outcome);
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    let pgid = osps_testkit::pid_after(
        &e.message,
        "sh ran past 500 ms and was killed; stderr: started ",
    );
    let _guard = GroupGuard(pgid);
    // SIGTERM ends it (sh and both sleeps): no need for the SIGKILL a second later.
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1400),
        "{took:?}"
    );
    assert_group_gone(pgid);
    assert_eq!(b.stop(), Some(0));
}

#[test]
fn what_a_command_leaves_behind_is_killed_when_it_exits() {
    // The background sleep holds stdout: without the group's kill the
    // result would not end for 100 s.
    let mut b = start(
        "exec-leftover",
        &["--exec-op", "bg", "--", "sh", "-c", "sleep 100 & echo $$"],
    );
    let began = Instant::now();
    let (d, out) = b.run(1, "bg", &[], b"");
    assert_eq!(d.outcome, Outcome::Ok);
    let pgid: u32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    let _guard = GroupGuard(pgid);
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_group_gone(pgid);
}

#[test]
fn arguments_are_refused_unless_the_pool_passes_them_and_never_go_through_a_shell() {
    let printf = ["sh", "-c", "printf '%s,' \"$@\"", "sh"];
    let mut b = start(
        "exec-noargs",
        &[&["--exec-op", "args", "--"][..], &printf].concat(),
    );
    let e = error(b.run(1, "args", &["a b", "c"], b"").0.outcome);
    assert_eq!(
        (e.kind, e.message.as_str()),
        (
            ErrorKind::InvalidInput,
            "this pool does not pass arguments (pass_args = false)"
        )
    );
    assert_eq!(
        b.run(2, "args", &[], b"").1,
        b",",
        "printf with no arguments"
    );
    drop(b);
    let mut b = start(
        "exec-args",
        &[&["--exec-op", "args", "--pass-args", "--"][..], &printf].concat(),
    );
    let (d, out) = b.run(1, "args", &["a b", "$HOME;c"], b"");
    assert_eq!(d.outcome, Outcome::Ok);
    assert_eq!(out, b"a b,$HOME;c,");
    // Never an option: `-o FILE` would make `sort` write a file.
    let e = error(b.run(2, "args", &["x", "-o/tmp/osps-no"], b"").0.outcome);
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    assert!(
        e.message.contains("\"-o/tmp/osps-no\" starts with '-'"),
        "{e}"
    );
    assert_eq!(b.run(3, "args", &["a-b"], b"").1, b"a-b,");
    drop(b);
    // The command starts with no signal blocked (the SIGTERM backstop blocks none).
    let mut b = start(
        "exec-mask",
        &[
            "--exec-op",
            "mask",
            "--",
            "grep",
            "^SigBlk",
            "/proc/self/status",
        ],
    );
    assert_eq!(b.run(1, "mask", &[], b"").1, b"SigBlk:\t0000000000000000\n");
}

#[test]
fn a_sigterm_to_the_worker_kills_the_running_command_group_first() {
    let mut b = start(
        "exec-sigterm",
        &[
            "--exec-op",
            "slow",
            "--",
            "sh",
            "-c",
            "sleep 100 & sleep 100",
        ],
    );
    let slot = b.seg.check(0, 4096).unwrap();
    b.job(1, "slow", &[], slot, b"");
    let worker = b.w.0.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    let sh = loop {
        let child = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            (osps_testkit::proc_info(pid as u32)?.ppid == worker as u32).then_some(pid)
        });
        if let Some(pid) = child.filter(|&p| group_members(p as u32).len() == 3) {
            break pid;
        }
        assert!(Instant::now() < deadline, "the command did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _guard = GroupGuard(sh as u32);
    kill(Pid::from_raw(worker), Signal::SIGTERM).unwrap();
    let status = b.w.0.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32), "{status:?}");
    assert_group_gone(sh as u32);
}

#[test]
fn what_a_command_detaches_from_its_group_is_killed_when_it_ends() {
    // A marker only this test's sleep carries.
    let marker = format!("8{}.75", std::process::id() % 100_000);
    let script =
        format!("setsid sleep {marker} </dev/null >/dev/null 2>&1 & sleep 0.2; echo started");
    let mut b = start(
        "exec-setsid",
        &["--exec-op", "detach", "--", "sh", "-c", &script],
    );
    let (d, out) = b.run(1, "detach", &[], b"");
    assert_eq!(
        (d.outcome, out.as_slice()),
        (Outcome::Ok, &b"started\n"[..])
    );
    // The detached sleep (its own session, its parent gone) was the
    // worker's to kill: the job left nothing.
    let sleeping = || {
        let mut found = osps_testkit::processes_mentioning(&marker);
        found.retain(|p| p.cmdline.starts_with("sleep "));
        found
    };
    let gone = osps_testkit::wait_for(Duration::from_secs(5), || {
        sleeping().is_empty().then_some(())
    });
    let left = sleeping();
    for p in &left {
        let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL);
    }
    assert!(gone.is_some(), "left running: {left:?}");
    assert_eq!(b.stop(), Some(0));
}
