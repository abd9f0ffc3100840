//! Project automation, run as `cargo xtask <task>`: `demo` shows the whole
//! system (three pools, one of each kind) under its watchdog and proves a
//! clean shutdown; `chaos` kills and stops processes at random under load
//! and counts what was lost; `bench` measures OSPS against the kernel's
//! floors and its pools against each other.

mod bench;
mod chaos;
mod demo;
mod pools;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use osps_testkit::{all_processes, Proc};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().cloned().unwrap_or_default();
    match bench::helper(&task, &args[1.min(args.len())..]) {
        Ok(true) => return ExitCode::SUCCESS,
        Ok(false) => {}
        Err(e) => {
            eprintln!("xtask {task}: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let result = match task.as_str() {
        "demo" => demo::run(),
        "bench" => bench::Options::parse(&args[1..]).and_then(bench::run),
        "__bench-run" => bench::Options::parse(&args[1..]).and_then(bench::run_here),
        "chaos" => chaos::Options::parse(&args[1..]).and_then(chaos::run),
        _ => {
            eprintln!("usage: cargo xtask demo | chaos [--seconds N] [--clients N] [--seed N] [--builtin-only] | bench [--quick] [--json PATH] [--plot PATH.svg] [--only o8|o9|o10]");
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

/// Builds every binary of the workspace.
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

/// Prints a section title.
fn step(title: &str) {
    println!("\n== {title}");
}

/// `root` and its descendants, depth first, with their depth.
fn tree(root: u32) -> Vec<(usize, Proc)> {
    let procs = all_processes();
    let mut out = Vec::new();
    let mut stack = vec![(0, root)];
    while let Some((depth, pid)) = stack.pop() {
        if let Some(p) = procs.iter().find(|p| p.pid == pid) {
            out.push((depth, p.clone()));
            let mut kids: Vec<u32> = procs
                .iter()
                .filter(|c| c.ppid == pid)
                .map(|c| c.pid)
                .collect();
            kids.sort_unstable_by(|a, b| b.cmp(a));
            stack.extend(kids.into_iter().map(|k| (depth + 1, k)));
        }
    }
    out
}

/// Processes descending from this one (itself excluded), zombies included:
/// this process is the child subreaper (the test kit makes it one), so
/// whatever an instance started, down to a command pool's per-job
/// processes, ends up under it or under the watchdog once its parent is gone.
fn our_descendants() -> Vec<Proc> {
    tree(std::process::id())
        .into_iter()
        .filter(|(depth, _)| *depth > 0)
        .map(|(_, p)| p)
        .collect()
}

/// Prints a process tree, one line per process; a worker of `status` is
/// shown with its pool.
fn print_tree(root: u32, status: Option<&ipc_core::status::StatusReport>) -> usize {
    let t = tree(root);
    for (depth, p) in &t {
        let name = p
            .cmdline
            .split_whitespace()
            .next()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("");
        let branch = if *depth == 0 {
            String::new()
        } else {
            format!("{}└─ ", "   ".repeat(depth - 1))
        };
        let pool = status
            .and_then(|s| s.workers.iter().find(|w| w.pid == p.pid))
            .map_or(String::new(), |w| format!("  (pool {})", w.pool));
        println!("  {branch}{name} pid {} state {}{pool}", p.pid, p.state);
    }
    t.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process started below this one, even orphaned below a child that
    /// exited, is seen until it is gone.
    #[test]
    fn our_descendants_sees_a_grandchild_left_behind() {
        osps_testkit::become_subreaper();
        // `sh` starts `sleep` in the background and exits: the grandchild
        // is reparented to us (the subreaper), as a leaked per-job process would be.
        let out = Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .stdout(std::process::Stdio::piped())
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        struct Reap(u32);
        impl Drop for Reap {
            fn drop(&mut self) {
                let pid = nix::unistd::Pid::from_raw(self.0 as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
            }
        }
        let guard = Reap(pid);
        assert!(our_descendants().iter().any(|p| p.pid == pid));
        drop(guard);
        assert!(!our_descendants().iter().any(|p| p.pid == pid));
    }
}
