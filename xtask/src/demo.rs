//! `cargo xtask demo`: the watchdog starts the dispatcher and its workers on
//! a fresh instance; the demo serves requests, kills the dispatcher, kills a
//! worker, stops (SIGSTOP) the dispatcher, shows each recovery, then stops
//! everything in order and proves that nothing is left. Exits non-zero if
//! any step fails, so CI can run it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::{RetryPolicy, RetryingClient};
use osps_testkit::{wait_for, zombies_of, Instance, PATIENCE};

use crate::{build, print_tree, step};

fn signal(pid: u32, sig: Signal) -> Result<()> {
    kill(Pid::from_raw(pid as i32), sig).with_context(|| format!("signal {sig} to {pid}"))
}

/// Waits until a dispatcher other than `old` serves a ping; returns it and the time taken.
fn new_dispatcher(c: &mut RetryingClient, old: u32) -> Result<(u32, Duration)> {
    let t = Instant::now();
    let pid = wait_for(PATIENCE, || {
        let pid = c.status().ok()?.dispatcher_pid;
        (pid != old && c.call("ping", &[], &[]).ok()? == b"pong\n").then_some(pid)
    })
    .context("no new dispatcher served within the patience")?;
    Ok((pid, t.elapsed()))
}

pub fn run() -> Result<()> {
    step("building the binaries");
    build()?;

    step("starting osps-watchdog, which starts osps-dispatcher and 2 workers");
    let mut inst = Instance::supervised(
        "demo",
        &["--heartbeat-ms", "100", "--miss-limit", "3"],
        &[
            "--workers",
            "2",
            "--segment-mib",
            "64",
            "--max-payload",
            "16777216",
        ],
    );
    let watchdog = inst.pid();
    let status = inst.status();
    println!(
        "instance {}  watchdog pid {}  dispatcher pid {}",
        inst.name(),
        watchdog,
        status.dispatcher_pid
    );
    println!("socket   {}", status.socket);
    println!("segment  {}", status.segment.name);
    print_tree(watchdog);

    step("requests served (socket → dispatcher → pipe → worker, payload in the segment)");
    let mut c = RetryingClient::new(
        inst.endpoint(),
        RetryPolicy {
            deadline: PATIENCE,
            ..RetryPolicy::default()
        },
    );
    let show = |op: &str, input: &str, out: &[u8]| {
        println!(
            "  {op:<9} {:<30} → {:?}",
            format!("{input:?}"),
            String::from_utf8_lossy(out)
        )
    };
    show("ping", "", &c.call("ping", &[], b"")?);
    show(
        "upper",
        "Demande echange ping pong",
        &c.call("upper", &[], b"Demande echange ping pong")?,
    );
    show(
        "wc",
        "one two\nthree four five\n",
        &c.call("wc", &[], b"one two\nthree four five\n")?,
    );
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    println!(
        "  {:<9} {:<30} → {:?}",
        "sha256",
        "(8 MiB payload)",
        String::from_utf8_lossy(&c.call("sha256", &[], &big)?)
    );
    show("sleep 50", "", &c.call("sleep", &["50"], b"")?);
    match c.call("nope", &[], b"") {
        Err(e) => println!("  {:<9} {:<30} → error: {e}", "nope", "\"\""),
        Ok(_) => bail!("an unknown operation succeeded"),
    }

    step("the segment in /dev/shm and the socket");
    let seg_path = inst.paths.segment_path();
    let meta =
        std::fs::metadata(&seg_path).with_context(|| format!("{} missing", seg_path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    println!(
        "  {}  mode {:o}  owner uid {}  {} bytes",
        seg_path.display(),
        mode,
        meta.uid(),
        meta.len()
    );
    if mode != 0o600 || meta.uid() != nix::unistd::getuid().as_raw() {
        bail!(
            "segment mode {mode:o} / owner {} is not 0600 / us",
            meta.uid()
        );
    }
    let sock = std::fs::metadata(inst.paths.socket())?;
    println!(
        "  {}  mode {:o}",
        inst.paths.socket().display(),
        sock.permissions().mode() & 0o777
    );

    step("SIGKILL the dispatcher: the watchdog restarts it");
    let old = inst.dispatcher_pid();
    signal(old, Signal::SIGKILL)?;
    let (new, took) = new_dispatcher(&mut c, old)?;
    println!(
        "  killed dispatcher {old}; dispatcher {new} serves again after {} ms",
        took.as_millis()
    );
    show(
        "upper",
        "served by the new dispatcher",
        &c.call("upper", &[], b"served by the new dispatcher")?,
    );

    step("SIGKILL a worker: the dispatcher reaps and replaces it");
    let before = c.status()?;
    let victim = before.workers[0].pid;
    signal(victim, Signal::SIGKILL)?;
    let replaced = wait_for(PATIENCE, || {
        let w = &c.status().ok()?.workers[0];
        (w.pid != victim && w.pid != 0 && w.state == "idle").then_some(w.pid)
    })
    .context("worker not replaced")?;
    println!(
        "  killed worker {victim}; worker #0 is now pid {replaced} (restarts {})",
        c.status()?.workers[0].restarts
    );

    step("SIGSTOP the dispatcher: the watchdog sees the heartbeat missed 3 times, kills and restarts it");
    let stopped = c.status()?.dispatcher_pid;
    signal(stopped, Signal::SIGSTOP)?;
    let (new, took) = new_dispatcher(&mut c, stopped)?;
    let s = c.status()?;
    println!(
        "  stopped dispatcher {stopped}; dispatcher {new} serves again after {} ms",
        took.as_millis()
    );
    if let Some(w) = &s.watchdog {
        println!(
            "  status: watchdog pid {}, restarts {}, last cause: {}",
            w.pid, w.restarts, w.last_restart_cause
        );
    }
    print_tree(watchdog);

    step("ordered shutdown: SIGTERM to the watchdog");
    let dispatcher = s.dispatcher_pid;
    let workers: Vec<u32> = s.workers.iter().map(|w| w.pid).collect();
    signal(watchdog, Signal::SIGTERM)?;
    let exit = inst
        .wait_exit(Duration::from_secs(30))
        .context("the watchdog did not exit within 30 s")?;
    println!("  watchdog exited: {exit}");
    let log = inst.log();
    let wanted = [
        "SIGTERM received",
        "stopping the dispatcher",
        "shutting down",
        "worker stopped",
        "removing segment",
        "dispatcher stopped",
        "dispatcher exited",
        "watchdog stopped",
    ];
    let tail = log.rsplit_once("SIGTERM received").map_or("", |(_, t)| t);
    println!("  log: SIGTERM received");
    for line in tail
        .lines()
        .filter(|l| wanted.iter().any(|w| l.contains(w)))
    {
        println!("  log: {}", line.split_once("}: ").map_or(line, |(_, m)| m));
    }

    step("proof that nothing is left");
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        println!("  [{}] {what}", if ok { "ok" } else { "FAIL" });
        if !ok {
            failures.push(what);
        }
    };
    check(exit.success(), format!("watchdog exit status 0 ({exit})"));
    check(
        osps_testkit::proc_info(dispatcher).is_none(),
        format!("dispatcher {dispatcher} gone"),
    );
    for w in &workers {
        check(
            osps_testkit::proc_info(*w).is_none(),
            format!("worker {w} gone"),
        );
    }
    check(
        zombies_of(&[watchdog, dispatcher, std::process::id()]).is_empty(),
        "no zombie".into(),
    );
    let left = inst.leftovers();
    check(
        left.iter().all(|l| !l.starts_with("process")),
        format!("no process of the instance {left:?}"),
    );
    check(
        !seg_path.exists(),
        format!("no segment {}", seg_path.display()),
    );
    check(
        !inst.paths.socket().exists(),
        format!("no socket {}", inst.paths.socket().display()),
    );
    check(!inst.paths.lock_file().exists(), "no lock file".into());
    if !failures.is_empty() {
        bail!(
            "{} check(s) failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    println!("\ndemo OK");
    Ok(())
}
