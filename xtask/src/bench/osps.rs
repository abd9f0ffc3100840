//! The OSPS side of the bench: ping round trip (o1), small-request
//! throughput at 1, 8 and 64 clients (o2), 64 MiB echo and sha256 (o3),
//! dispatcher memory with 1,000 idle connections (o4), and recovery times
//! (o5) — all against real release binaries started by the test kit.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::Client;
use osps_testkit::{wait_for, Instance, PATIENCE};

use super::{load, Plan};
use crate::bench::report::Report;

fn connect(inst: &Instance) -> Result<Client> {
    Ok(Client::connect(&inst.endpoint())?)
}

/// The instance measured for o1–o3: default settings, 2 workers.
pub fn start() -> Instance {
    let inst = Instance::start("bench", &["--workers", "2"]);
    // Steady state: let the dispatcher finish prefaulting the segment
    // (it starts 200 ms after it is ready; workers map what they touch).
    std::thread::sleep(Duration::from_millis(1500));
    inst
}

/// o2: small-request (64 B echo) throughput with `conns` clients.
pub fn echo_rps(inst: &Instance, conns: usize, dur: Duration) -> Result<(f64, Vec<u64>)> {
    let ep = inst.endpoint();
    load(conns, dur, |_| {
        let mut cl = Client::connect(&ep)?;
        let msg = [1u8; 64];
        Ok(move || -> Result<()> {
            cl.call("echo", &[], &msg)?;
            Ok(())
        })
    })
}

/// o3: one 64 MiB echo and sha256 through OSPS, and sha256 in process on the
/// same bytes; bytes/s of each.
pub fn bulk(c: &mut Client, data: &[u8]) -> Result<(f64, f64, f64)> {
    let rate = |t: Instant| data.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back = c.call("echo", &[], data)?;
    let echo = rate(t);
    anyhow::ensure!(
        back.len() == data.len(),
        "echo returned {} bytes",
        back.len()
    );
    let t = Instant::now();
    let remote = c.call("sha256", &[], data)?;
    let sha = rate(t);
    let t = Instant::now();
    let local = osps_testkit::sha256_line(data);
    let inproc = rate(t);
    anyhow::ensure!(remote == local, "OSPS and in-process digests differ");
    Ok((echo, sha, inproc))
}

/// o4 and o5.
pub fn memory_and_recovery(plan: &Plan, r: &mut Report, step: &mut dyn FnMut(&str)) -> Result<()> {
    step("o4 dispatcher memory with 1,000 idle connections");
    let inst = Instance::start("benchrss", &["--workers", "2"]);
    // The dispatcher's own memory before (settled: prefaulting done), then
    // with the connections open, each having served one request (so what a
    // connection keeps after its first reply counts too).
    std::thread::sleep(Duration::from_millis(1000));
    r.rss_base_kib = rss_kib(inst.pid())? - status_kib(inst.pid(), "RssShmem:")?;
    let mut clients: Vec<Client> = (0..plan.idle_conns)
        .map(|_| connect(&inst))
        .collect::<Result<_>>()?;
    for c in &mut clients {
        c.ping()?;
    }
    std::thread::sleep(Duration::from_millis(300));
    r.idle_conns = clients.len();
    r.rss_kib = rss_kib(inst.pid())?;
    r.rss_anon_kib = status_kib(inst.pid(), "RssAnon:")?;
    r.rss_shmem_kib = status_kib(inst.pid(), "RssShmem:")?;
    drop(clients);
    drop(inst);

    step("o5 recovery: SIGKILL of the dispatcher under the watchdog");
    let inst = supervised_for_kills("benchrec");
    for _ in 0..plan.recovery_trials {
        std::thread::sleep(Duration::from_millis(300)); // past the backoff reset: each kill is a first crash
        let old = inst.dispatcher_pid();
        kill(Pid::from_raw(old as i32), Signal::SIGKILL)?;
        let t = Instant::now();
        // Any successful ping after the kill is served by the new dispatcher.
        wait_for(PATIENCE, || {
            Client::connect(&inst.endpoint()).ok()?.ping().ok()
        })
        .context("no recovery")?;
        r.recovery_dispatcher_ms
            .push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(inst);

    step("o5 recovery: SIGKILL of a busy worker");
    let inst = Instance::start(
        "benchwk",
        &[
            "--workers",
            "1",
            "--segment-mib",
            "16",
            "--max-payload",
            "1048576",
        ],
    );
    let mut status = connect(&inst)?;
    for _ in 0..plan.recovery_trials {
        let old = status.status()?.workers[0].pid;
        let mut job = connect(&inst)?;
        let id = job.send("sleep", &["30"], &[])?;
        wait_for(PATIENCE, || {
            (status.status().ok()?.workers[0].state == "busy").then_some(())
        })
        .context("worker busy")?;
        kill(Pid::from_raw(old as i32), Signal::SIGKILL)?;
        let t = Instant::now();
        // Serving again: a new worker has taken the retried job (or already answered it).
        wait_for(PATIENCE, || {
            let w = &status.status().ok()?.workers[0];
            // The pid is published once the replacement has said it is ready.
            (w.pid != old && w.pid != 0).then_some(())
        })
        .context("worker not replaced")?;
        r.recovery_worker_ms.push(t.elapsed().as_secs_f64() * 1e3);
        job.wait(id)?; // the retried job is answered
    }
    Ok(())
}

/// A watchdog whose dispatcher (2 workers, 64 MiB segment) the bench kills
/// again and again: it never gives up.
pub fn supervised_for_kills(tag: &str) -> Instance {
    Instance::supervised(
        tag,
        &[
            "--max-restarts",
            "10000",
            "--within",
            "1",
            "--backoff-reset-ms",
            "200",
        ],
        &[
            "--workers",
            "2",
            "--segment-mib",
            "64",
            "--max-payload",
            "16777216",
        ],
    )
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("{key} missing"))?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}
