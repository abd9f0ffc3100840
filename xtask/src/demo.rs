//! `cargo xtask demo`: the watchdog starts the dispatcher and the workers of
//! three pools (the builtin `osps-worker`, the example SDK worker
//! `inflate-worker` as a program pool, `gzip -c` as a command pool) from a
//! configuration file, on a fresh instance; the demo calls an operation of
//! each pool and checks the bytes, kills the dispatcher, kills a worker of
//! each pool, stops (SIGSTOP) the dispatcher, shows each recovery, then
//! stops everything in order and proves that nothing is left (per-job
//! processes of the command pool included). Exits non-zero if any step
//! fails, so CI can run it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipc_core::segment::{self, SYSV_PREFIX};
use ipc_core::status::StatusReport;
use ipc_core::RuntimePaths;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::{RetryPolicy, RetryingClient};
use osps_testkit::{wait_for, zombies_of, Instance, PATIENCE};

use crate::pools::{self, ConfigFile, Rng, Sizes, EXEC_OP, PROGRAM_BIN};
use crate::{build, our_descendants, print_tree, step};

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

    step("the configuration file: three pools, one of each kind");
    let config = ConfigFile::write(pools::three_pools(
        &osps_testkit::bin(PROGRAM_BIN),
        Sizes {
            builtin: 2,
            program: 1,
            exec: 1,
        },
    ))?;
    println!("  {}:", config.path.display());
    for line in config.text.lines() {
        println!("  | {line}");
    }

    step("starting osps-watchdog --config FILE, which starts osps-dispatcher and the workers of every pool");
    let mut inst = Instance::supervised(
        "demo",
        &[
            "--heartbeat-ms",
            "100",
            "--miss-limit",
            "3",
            "--config",
            config.arg(),
        ],
        &["--segment-mib", "64", "--max-payload", "16777216"],
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
    for p in &status.pools {
        let seg = p.segment.as_ref().map_or("", |s| s.name.as_str());
        println!(
            "segment  {seg} (pool {}: its workers map this one alone)",
            p.name
        );
    }
    print_tree(watchdog, Some(&status));
    // Every segment name a dispatcher of the demo used: none may be left.
    let mut seen = segment_names(&status);

    step("requests served (socket → dispatcher → pipe → worker of the operation's pool, payload in the segment)");
    let mut c = RetryingClient::new(
        inst.endpoint(),
        RetryPolicy {
            deadline: PATIENCE,
            ..RetryPolicy::default()
        },
    );
    let show = |op: &str, input: &str, out: &[u8]| {
        println!(
            "  {op:<12} {:<30} → {:?}",
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
        "  {:<12} {:<30} → {:?}",
        "sha256",
        "(8 MiB payload)",
        String::from_utf8_lossy(&c.call("sha256", &[], &big)?)
    );
    show("sleep 50", "", &c.call("sleep", &["50"], b"")?);
    match c.call("nope", &[], b"") {
        Err(e) => println!("  {:<12} {:<30} → error: {e}", "nope", "\"\""),
        Ok(_) => bail!("an unknown operation succeeded"),
    }
    other_pools(&mut c)?;

    step("osps-client status: the workers grouped by pool");
    let status = c.status()?;
    for line in osps_client::render::status_table(&status).lines() {
        println!("  {line}");
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
    seen.extend(segment_names(&c.status()?));
    println!(
        "  killed dispatcher {old}; dispatcher {new} serves again after {} ms",
        took.as_millis()
    );
    show(
        "upper",
        "served by the new dispatcher",
        &c.call("upper", &[], b"served by the new dispatcher")?,
    );

    step("SIGKILL a worker of each pool: the dispatcher reaps and replaces it");
    for pool in c.status()?.pools.iter().map(|p| p.name.clone()) {
        kill_worker_of(&mut c, &pool)?;
    }

    step("SIGSTOP the dispatcher: the watchdog sees the heartbeat missed 3 times, kills and restarts it");
    let stopped = c.status()?.dispatcher_pid;
    signal(stopped, Signal::SIGSTOP)?;
    let (new, took) = new_dispatcher(&mut c, stopped)?;
    let s = c.status()?;
    seen.extend(segment_names(&s));
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
    print_tree(watchdog, Some(&s));

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
            format!("worker {w} ({}) gone", pool_of(&s, *w)),
        );
    }
    check(
        zombies_of(&[watchdog, dispatcher, std::process::id()]).is_empty(),
        "no zombie".into(),
    );
    let left = our_descendants();
    check(
        left.is_empty(),
        format!(
            "no process under the demo (the command pool's per-job processes included) {left:?}"
        ),
    );
    for (ok, what) in leftover_checks(&inst.paths, &seen) {
        check(ok, what);
    }
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

/// The pool of worker `pid` in `s`.
fn pool_of(s: &StatusReport, pid: u32) -> &str {
    s.workers
        .iter()
        .find(|w| w.pid == pid)
        .map_or("?", |w| w.pool.as_str())
}

/// Calls an operation of the program pool and of the command pool, and
/// checks their bytes.
fn other_pools(c: &mut RetryingClient) -> Result<()> {
    let mut rng = Rng(0x05b5_d3e0_0c0f_fee1);
    let data = rng.bytes(1 << 20);
    let gz = pools::gzip(&data);
    let crc = c.call("gunzip_crc32", &[], &gz)?;
    if crc != pools::crc_line(&data) {
        bail!("gunzip_crc32 answered {:?}", String::from_utf8_lossy(&crc));
    }
    println!(
        "  {:<12} {:<30} → {:?} (its length and CRC-32: right)",
        "gunzip_crc32",
        format!("({} B of gzip)", gz.len()),
        String::from_utf8_lossy(&crc)
    );
    // A result far larger than its input (and than the input's slot).
    let text: Vec<u8> = b"OSPS runs your own work. ".repeat(160 << 10);
    let small = pools::gzip(&text);
    if c.call("gunzip", &[], &small)? != text {
        bail!("gunzip did not give back the text");
    }
    println!(
        "  {:<12} {:<30} → {} B, the text inside (the result grew past the slot)",
        "gunzip",
        format!("({} B of gzip)", small.len()),
        text.len()
    );
    let out = c.call(EXEC_OP, &[], &data)?;
    pools::check_gzip(&data, &out)?;
    if out.len() <= data.len() {
        bail!("gzip of random data came back smaller ({} B)", out.len());
    }
    println!(
        "  {:<12} {:<30} → {} B of gzip, larger than its input; it gunzips to the input",
        EXEC_OP,
        format!("({} B of random data)", data.len()),
        out.len()
    );
    Ok(())
}

/// SIGKILLs a worker of `pool` and waits until the dispatcher has replaced it.
fn kill_worker_of(c: &mut RetryingClient, pool: &str) -> Result<()> {
    let before = c.status()?;
    let slot = before
        .workers
        .iter()
        .position(|w| w.pool == pool)
        .with_context(|| format!("pool {pool} has no worker"))?;
    let victim = before.workers[slot].pid;
    signal(victim, Signal::SIGKILL)?;
    let replaced = wait_for(PATIENCE, || {
        let w = c.status().ok()?.workers.get(slot)?.clone();
        (w.pid != victim && w.pid != 0 && w.state == "idle").then_some(w)
    })
    .with_context(|| format!("the worker of pool {pool} was not replaced"))?;
    println!(
        "  pool {pool:<9} killed worker {victim}; it is now pid {} (restarts {})",
        replaced.pid, replaced.restarts
    );
    Ok(())
}

/// Every pool's segment name in a status report.
fn segment_names(s: &ipc_core::status::StatusReport) -> Vec<String> {
    s.pools
        .iter()
        .filter_map(|p| Some(p.segment.as_ref()?.name.clone()))
        .collect()
}

/// What must be gone once the demo's instance stopped, each with whether it
/// is: the segment of every generation the demo saw (`seen`: under both
/// backends' forms, the POSIX file and the System V key), the socket, the
/// lock and state files, and anything else of the instance (processes,
/// segments of its name form: [`osps_testkit::leftovers`]).
fn leftover_checks(paths: &RuntimePaths, seen: &[String]) -> Vec<(bool, String)> {
    let mut checks = Vec::new();
    for name in seen {
        let bare = name.strip_prefix(SYSV_PREFIX).unwrap_or(name);
        let file = segment::fs_path(bare);
        checks.push((!Path::new(&file).exists(), format!("no segment {file}")));
        let sysv = format!("{SYSV_PREFIX}{bare}");
        checks.push((
            !segment::exists(&sysv),
            format!(
                "no System V segment key {:#x} ({bare})",
                segment::sysv_key(&sysv)
            ),
        ));
    }
    for (file, what) in [
        (paths.socket(), "socket"),
        (paths.lock_file(), "lock file"),
        (paths.state_file(), "state file"),
    ] {
        checks.push((!file.exists(), format!("no {what} {}", file.display())));
    }
    let left = osps_testkit::leftovers(paths);
    checks.push((
        left.is_empty(),
        format!("nothing else of the instance left {left:?}"),
    ));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The final check fails on a leaked segment of the last generation
    /// (not only the first one's), on the state file, and on a System V
    /// segment; it passes once they are gone.
    #[test]
    fn the_final_check_sees_what_the_last_generation_leaked() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = RuntimePaths::new("democheck", Some(tmp.path())).unwrap();
        paths.ensure_dir().unwrap();
        let first = paths.new_segment_name().unwrap();
        let last = paths.new_segment_name().unwrap();
        let last_sysv = format!("{SYSV_PREFIX}{}", paths.new_segment_name().unwrap());
        struct Unlink(Vec<String>);
        impl Drop for Unlink {
            fn drop(&mut self) {
                for n in &self.0 {
                    segment::unlink(n);
                }
            }
        }
        let _guard = Unlink(vec![last.clone(), last_sysv.clone()]);
        for name in [&last, &last_sysv] {
            ipc_core::Segment::create(name, 4096, 3).unwrap().disown();
        }
        paths
            .write_state(&ipc_core::paths::InstanceState {
                generation: 3,
                segments: vec![ipc_core::paths::RecordedSegment {
                    name: last.clone(),
                    owner: nix::unistd::geteuid().as_raw(),
                }],
            })
            .unwrap();
        let seen = [first.clone(), last.clone(), last_sysv.clone()];
        let failed: Vec<String> = leftover_checks(&paths, &seen)
            .into_iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, what)| what)
            .collect();
        let has = |s: &str| failed.iter().any(|f| f.contains(s));
        assert!(has(&segment::fs_path(&last)), "{failed:?}");
        assert!(has("no state file"), "{failed:?}");
        assert!(
            has(&format!("{:#x}", segment::sysv_key(&last_sysv))),
            "{failed:?}"
        );
        assert!(!has(&segment::fs_path(&first)), "{failed:?}");
        segment::unlink(&last);
        segment::unlink(&last_sysv);
        paths.remove_state();
        let failed: Vec<_> = leftover_checks(&paths, &seen)
            .into_iter()
            .filter(|(ok, _)| !ok)
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
    }
}
