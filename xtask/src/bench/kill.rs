//! o8: how soon a worker's death is noticed. A dispatcher with the default
//! segment (256 MiB) and 2 workers, `--max-attempts 1` (so a job whose
//! worker dies is answered `worker crashed` the moment the dispatcher
//! notices); one client's `sleep` holds a worker, and SIGKILL of that worker
//! is timed to the client's `worker crashed` answer. Idle (nothing else
//! runs), then under load: a few clients doing `sha256` of mixed sizes
//! (64 KiB … 4 MiB) on the other worker, and on the killed one before its
//! `sleep` came, as real load does. What the kernel does between the kill
//! and the worker's pipes closing (tearing down its memory map first) is
//! what this measures. Each kill is followed by the floor: SIGKILL of a
//! `sleep` to EOF on its stdout, on the same machine under the same load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ipc_core::proto::ErrorKind;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::{Client, ClientError};
use osps_testkit::{wait_for, Instance, PATIENCE};

use super::Plan;
use crate::bench::report::Report;

/// Load clients, and the sizes each cycles through.
const LOAD_CLIENTS: usize = 3;
const LOAD_SIZES: [usize; 4] = [64 << 10, 256 << 10, 1 << 20, 4 << 20];

/// Before each kill: time for the replacement of the last victim to settle
/// (to fill in its page tables, where workers do, and to serve load).
const SETTLE: Duration = Duration::from_millis(1000);

/// o8, idle then under load.
pub fn worker_kill_noticed(plan: &Plan, r: &mut Report) -> Result<()> {
    let inst = Instance::start("benchkill", &["--workers", "2", "--max-attempts", "1"]);
    let mut status = Client::connect(&inst.endpoint())?;
    let mut sleeper = Client::connect(&inst.endpoint())?;
    for _ in 0..plan.kill_trials / 2 {
        let (ms, kib) = trial(&mut status, &mut sleeper)?;
        r.o8_idle_ms.push(ms);
        r.o8_idle_mapped_kib.push(kib);
        r.o8_idle_floor_ms.push(floor()?);
    }
    let load = Load::start(&inst)?;
    for _ in 0..plan.kill_trials {
        let (ms, kib) = trial(&mut status, &mut sleeper)?;
        r.o8_load_ms.push(ms);
        r.o8_load_mapped_kib.push(kib);
        r.o8_load_floor_ms.push(floor()?);
    }
    r.o8_load_jobs = load.stop()?;
    Ok(())
}

/// One kill: returns kill → answered (ms), and how much of the segment the
/// killed worker had mapped just before (KiB, its `RssShmem`).
fn trial(status: &mut Client, sleeper: &mut Client) -> Result<(f64, u64)> {
    let pids: Vec<u32> = wait_for(PATIENCE, || {
        let s = status.status().ok()?;
        let up = s.workers.iter().all(|w| w.pid != 0 && w.state.is_up());
        up.then(|| s.workers.iter().map(|w| w.pid).collect())
    })
    .context("workers not up")?;
    std::thread::sleep(SETTLE);
    let id = sleeper.send("sleep", &["60000"], &[])?;
    // The worker running the sleep is the one asleep in the kernel's nanosleep.
    let victim = wait_for(PATIENCE, || {
        pids.iter().copied().find(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/wchan"))
                .is_ok_and(|w| w.contains("nanosleep"))
        })
    })
    .context("no worker runs the sleep")?;
    std::thread::sleep(Duration::from_millis(20));
    let mapped = shmem_kib(victim).unwrap_or(0);
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL)?;
    let t = Instant::now();
    let got = sleeper.wait(id);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    match got {
        Err(ClientError::Remote(e)) if e.kind == ErrorKind::WorkerCrashed => Ok((ms, mapped)),
        other => anyhow::bail!("the killed worker's job was answered {other:?}"),
    }
}

/// The floor: SIGKILL of a small process (`sleep`) to EOF on its stdout,
/// read here (ms): what the kernel and the scheduler take, without OSPS.
fn floor() -> Result<f64> {
    use std::io::Read;
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawning sleep")?;
    let mut out = child.stdout.take().context("piped")?;
    std::thread::sleep(Duration::from_millis(20));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL)?;
    let t = Instant::now();
    let n = out.read(&mut [0; 16])?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    child.wait()?;
    ensure!(n == 0, "sleep wrote to its stdout");
    Ok(ms)
}

/// The segment pages a process has mapped (`RssShmem`, KiB).
fn shmem_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("RssShmem:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Clients calling `sha256` of `LOAD_SIZES` in turn until stopped, each
/// answer checked.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Result<u64>>>,
}

impl Load {
    fn start(inst: &Instance) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..LOAD_CLIENTS {
            let mut c = Client::connect(&inst.endpoint())?;
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || -> Result<u64> {
                let jobs: Vec<(Vec<u8>, Vec<u8>)> = LOAD_SIZES
                    .iter()
                    .map(|&n| {
                        let data: Vec<u8> = (0..n).map(|k| ((k + i) % 251) as u8).collect();
                        let want = osps_testkit::sha256_line(&data);
                        (data, want)
                    })
                    .collect();
                let mut done = 0u64;
                // Each client starts at another size, so sizes mix.
                for (data, want) in jobs.iter().cycle().skip(i) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let got = c.call("sha256", &[], data)?;
                    ensure!(&got == want, "sha256 of {} B: a wrong answer", data.len());
                    done += 1;
                }
                Ok(done)
            }));
        }
        Ok(Load { stop, threads })
    }

    /// Stops the clients; returns how many calls they made.
    fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in std::mem::take(&mut self.threads) {
            total += t
                .join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        }
        Ok(total)
    }
}

impl Drop for Load {
    /// Clients left running (a trial failed) stop after their call.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
