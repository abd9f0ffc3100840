//! Project automation, run as `cargo xtask <task>`: `demo` builds the
//! binaries, starts a dispatcher and its workers on a fresh instance, shows a
//! few calls, the segment and the process tree, then stops everything and
//! proves nothing is left.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use osps_testkit::{all_processes, zombies_of, Instance};

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "demo" => demo(),
        _ => {
            eprintln!("usage: cargo xtask demo");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--workspace", "--bins"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn demo() -> Result<()> {
    step("building the binaries");
    build()?;

    step("starting osps-dispatcher with 2 workers on a fresh instance");
    let mut inst = Instance::start(
        "demo",
        &[
            "--workers",
            "2",
            "--segment-mib",
            "64",
            "--max-payload",
            "16777216",
        ],
    );
    let status = inst.status();
    println!("instance {}  dispatcher pid {}", inst.name(), inst.pid());
    println!("socket   {}", status.socket);
    println!("segment  {}", status.segment.name);

    step("client calls (socket → dispatcher → pipe → worker, payload in the segment)");
    let mut c = inst.client();
    let show = |op: &str, input: &[u8], out: &[u8]| {
        println!(
            "  {op:<9} {:<30} → {:?}",
            format!("{:?}", String::from_utf8_lossy(input)),
            String::from_utf8_lossy(out)
        );
    };
    let r = c.call("ping", &[], b"")?;
    show("ping", b"", &r);
    let r = c.call("upper", &[], b"Demande echange ping pong")?;
    show("upper", b"Demande echange ping pong", &r);
    let r = c.call("wc", &[], b"one two\nthree four five\n")?;
    show("wc", b"one two\nthree four five\n", &r);
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    let r = c.call("sha256", &[], &big)?;
    println!(
        "  {:<9} {:<30} → {:?}",
        "sha256",
        "(8 MiB payload)",
        String::from_utf8_lossy(&r)
    );
    let r = c.call("sleep", &["50"], b"")?;
    show("sleep 50", b"", &r);
    match c.call("nope", &[], b"") {
        Err(e) => println!("  {:<9} {:<30} → error: {e}", "nope", "\"\""),
        Ok(_) => bail!("an unknown operation succeeded"),
    }
    let s = inst.status();
    println!(
        "  status: {} jobs done, {} failed, {} slots in use",
        s.jobs_done, s.jobs_failed, s.segment.slots_in_use
    );

    step("the segment in /dev/shm");
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

    step("the process tree");
    let procs = all_processes();
    let tree: Vec<_> = procs
        .iter()
        .filter(|p| p.pid == inst.pid() || p.ppid == inst.pid())
        .collect();
    for p in &tree {
        let indent = if p.pid == inst.pid() { "" } else { "  └─ " };
        println!("  {indent}{:>7} {} {}", p.pid, p.state, p.cmdline);
    }
    if tree.len() != 3 {
        bail!("expected the dispatcher and 2 workers, saw {}", tree.len());
    }

    step("ordered shutdown (SIGTERM to the dispatcher)");
    let workers: Vec<u32> = tree
        .iter()
        .filter(|p| p.pid != inst.pid())
        .map(|p| p.pid)
        .collect();
    let dispatcher = inst.pid();
    inst.signal(Signal::SIGTERM);
    let exit = inst
        .wait_exit(Duration::from_secs(15))
        .context("the dispatcher did not exit within 15 s")?;
    println!("  dispatcher exited: {exit}");
    for line in inst.log().lines().filter(|l| {
        l.contains("shutting down")
            || l.contains("worker stopped")
            || l.contains("removing")
            || l.contains("stopped")
    }) {
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
    check(exit.success(), format!("dispatcher exit status 0 ({exit})"));
    for w in &workers {
        check(
            osps_testkit::proc_info(*w).is_none(),
            format!("worker {w} gone"),
        );
    }
    check(
        zombies_of(&[dispatcher, std::process::id()]).is_empty(),
        "no zombie".into(),
    );
    let left = inst.leftovers();
    check(
        left.iter().all(|l| !l.starts_with("process")),
        "no process of the instance".into(),
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
