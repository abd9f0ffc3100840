//! `cargo xtask bench [--quick] [--json PATH] [--plot PATH.svg] [--only o8|o9|o10]`: OSPS against
//! the kernel's floors, and its pools against each other (the same
//! operation built in and through a program pool; a command pool against
//! spawning the command directly; Python workers against Python's
//! `ProcessPoolExecutor`), side by side in one run, reported as
//! ratios (the machine is shared and noisy: only ratios hold). The outer command builds
//! the release binaries and re-runs itself from them, so both the floors and
//! OSPS are measured optimised.

mod floors;
mod held;
mod kill;
mod osps;
mod pools;
mod python;
mod report;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use osps_testkit::Instance;

pub use floors::helper;

/// Command-line options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub quick: bool,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// `--only o8`, `o9` or `o10`: run that part alone.
    pub only: Option<Only>,
}

/// The parts `--only` runs alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only {
    /// Worker kill → noticed.
    O8,
    /// Python workers against `ProcessPoolExecutor`.
    O9,
    /// Dispatcher kill → first request served, socket held.
    O10,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--json" => o.json = Some(it.next().context("--json needs a path")?.into()),
                "--plot" => o.plot = Some(it.next().context("--plot needs a path")?.into()),
                "--only" => match it.next().map(String::as_str) {
                    Some("o8") => o.only = Some(Only::O8),
                    Some("o9") => o.only = Some(Only::O9),
                    Some("o10") => o.only = Some(Only::O10),
                    other => {
                        bail!("--only takes o8, o9 or o10 (the parts run alone), not {other:?}")
                    }
                },
                _ => bail!("unknown option {a}"),
            }
        }
        Ok(o)
    }

    fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.quick {
            v.push("--quick".into());
        }
        if let Some(p) = &self.json {
            v.extend(["--json".into(), abs(p)]);
        }
        if let Some(p) = &self.plot {
            v.extend(["--plot".into(), abs(p)]);
        }
        match self.only {
            Some(Only::O8) => v.extend(["--only".into(), "o8".into()]),
            Some(Only::O9) => v.extend(["--only".into(), "o9".into()]),
            Some(Only::O10) => v.extend(["--only".into(), "o10".into()]),
            None => {}
        }
        v
    }
}

fn abs(p: &std::path::Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Sizes and counts of one run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub iters: usize,
    pub warmup: usize,
    pub load_secs: f64,
    pub stream: usize,
    pub recovery_trials: usize,
    pub idle_conns: usize,
    /// o7: jobs of the command pool, and direct spawns.
    pub spawn_jobs: usize,
    /// o8: worker kills under load (and half as many idle).
    pub kill_trials: usize,
    /// o9: seconds of each turn of each side (two turns per case).
    pub py_secs: f64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                iters: 3_000,
                warmup: 300,
                load_secs: 1.0,
                stream: 64 << 20,
                recovery_trials: 5,
                idle_conns: 1000,
                spawn_jobs: 100,
                kill_trials: 8,
                py_secs: 0.25,
            }
        } else {
            Plan {
                iters: 30_000,
                warmup: 2_000,
                load_secs: 4.0,
                stream: 64 << 20,
                recovery_trials: 20,
                idle_conns: 1000,
                spawn_jobs: 1000,
                kill_trials: 20,
                py_secs: 1.5,
            }
        }
    }
}

/// The outer command: build the release binaries, then run the bench from them.
pub fn run(o: Options) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building release binaries (cargo build --release --workspace --bins)");
    let status = std::process::Command::new(&cargo)
        .args(["build", "--release", "--workspace", "--bins"])
        .status()?;
    if !status.success() {
        bail!("release build failed");
    }
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(|d| d.parent())
        .context("target dir")?;
    let release = target.join("release").join("xtask");
    if cfg!(debug_assertions) || exe != release {
        let status = std::process::Command::new(&release)
            .arg("__bench-run")
            .args(o.to_args())
            .status()?;
        if !status.success() {
            bail!("bench failed ({status})");
        }
        return Ok(());
    }
    run_here(o)
}

/// Progress on stderr: a bar and the step's name.
struct Progress {
    total: usize,
    done: usize,
    started: Instant,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        let width = 30;
        let filled = width * (self.done - 1) / self.total;
        eprintln!(
            "[{}{}] {:>2}/{} {:>5.1}s  {what}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// The measurements, in the bench binary itself. Floors and OSPS are
/// interleaved (latency in rounds, throughput and bulk in alternating
/// halves) so that both see the same machine: only their ratios are compared.
pub fn run_here(o: Options) -> Result<()> {
    let plan = Plan::new(o.quick);
    let dir = tempfile::Builder::new().prefix("osps-bench-").tempdir()?;
    match o.only {
        Some(Only::O8) => return only_o8(&o, &plan),
        Some(Only::O9) => return only_o9(&o, &plan),
        Some(Only::O10) => return only_o10(&o, &plan),
        None => {}
    }
    let mut p = Progress {
        total: 15,
        done: 0,
        started: Instant::now(),
    };
    let mut r = report::Report {
        quick: o.quick,
        ..Default::default()
    };

    p.step("latency, interleaved, every process on one CPU: f1 UDS, f2 pipe, f3 chain floor, o1 OSPS ping (64 B)");
    {
        // Pinned (children inherit the affinity): on a 2-vCPU VM, whether a
        // chain of processes shares a core or wakes across cores swings
        // round trips between ~20 and ~100 µs from run to run. Pinned, the
        // floors and OSPS pay the same kind of switches and the ratio holds.
        let _pinned = Pinned::to_one_cpu()?;
        let lat_inst = Instance::start("benchlat", &["--workers", "1"]);
        std::thread::sleep(Duration::from_millis(1500)); // settle: prefaulting done
        let mut f1 = floors::uds_pinger(dir.path())?;
        let mut f2 = floors::pipe_pinger()?;
        let mut f3 = floors::chain_pinger(dir.path())?;
        let mut client = osps_client::Client::connect(&lat_inst.endpoint())?;
        let mut o1 = move || -> Result<()> { Ok(client.ping()?) };
        let mut series: [&mut dyn FnMut() -> Result<()>; 4] =
            [&mut *f1.once, &mut *f2.once, &mut *f3.once, &mut o1];
        let lat = interleave(&mut series, plan.iters, plan.warmup)?;
        [r.f1, r.f2, r.f3, r.o1] = lat.try_into().map_err(|_| anyhow::anyhow!("four series"))?;
    }
    p.step("starting OSPS (dispatcher, 2 workers) for throughput and bulk");
    let inst = osps::start();

    for (i, c) in [1, 8, 64].into_iter().enumerate() {
        p.step(&format!(
            "throughput with {c} connection(s): f4 raw UDS echo and o2 OSPS echo, alternating"
        ));
        let half = Duration::from_secs_f64(plan.load_secs / 2.0);
        let (mut f4, mut o2) = ((0.0, Vec::new()), (0.0, Vec::new()));
        for _ in 0..2 {
            let (rps, lat) = floors::uds_echo_rps(dir.path(), c, half)?;
            f4.0 += rps / 2.0;
            f4.1.extend(lat);
            let (rps, lat) = osps::echo_rps(&inst, c, half)?;
            o2.0 += rps / 2.0;
            o2.1.extend(lat);
        }
        (r.f4[i], r.o2[i]) = (f4, o2);
    }

    p.step("bulk, alternating: f5 raw UDS 64 MiB each way, o3 OSPS echo and sha256 of 64 MiB, in-process sha256");
    let data: Vec<u8> = (0..plan.stream).map(|i| (i % 251) as u8).collect();
    let mut c = osps_client::Client::connect(&inst.endpoint())?;
    for _ in 0..3 {
        r.f5 = r.f5.max(floors::uds_stream(dir.path(), plan.stream, true)?);
        r.f5_duplex = r
            .f5_duplex
            .max(floors::uds_stream(dir.path(), plan.stream, false)?);
        let (echo, sha, local) = osps::bulk(&mut c, &data)?;
        r.o3_echo = r.o3_echo.max(echo);
        r.o3_sha256 = r.o3_sha256.max(sha);
        r.sha256_inprocess = r.sha256_inprocess.max(local);
    }
    p.step("f6 memcpy 64 MiB");
    r.f6 = floors::memcpy(plan.stream);
    drop(c);
    drop(inst);

    osps::memory_and_recovery(&plan, &mut r, &mut |what: &str| p.step(what))?;

    p.step("o6 sha256 of 64 B and 1 MiB, interleaved, on one CPU: builtin pool vs program pool running the same osps-worker");
    pools::builtin_vs_program(&plan, &mut r)?;
    p.step(&format!(
        "o7 {} of {} B, interleaved: command pool job vs direct spawn (std::process::Command)",
        pools::COMMAND,
        pools::COMMAND_PAYLOAD
    ));
    pools::command_vs_spawn(&plan, &mut r)?;
    p.step(&format!("o8 worker kill → noticed (default segment, 2 workers): {} kills idle, {} under sha256 load", plan.kill_trials / 2, plan.kill_trials));
    kill::worker_kill_noticed(&plan, &mut r)?;
    p.step(O10_STEP);
    held::dispatcher_kill_served(&plan, &mut r)?;
    p.step(O9_STEP);
    python::python_vs_executor(&plan, &mut r)?;

    println!("{}", r.table());
    write_files(&o, &r)
}

/// `--only o8`: the o8 lines and their JSON alone.
fn only_o8(o: &Options, plan: &Plan) -> Result<()> {
    let mut r = report::Report {
        quick: o.quick,
        ..Default::default()
    };
    eprintln!(
        "o8 worker kill → noticed (default segment, 2 workers): {} kills idle, {} under sha256 load",
        plan.kill_trials / 2,
        plan.kill_trials
    );
    kill::worker_kill_noticed(plan, &mut r)?;
    let mut t = String::new();
    r.kill_table(&mut t);
    println!("{t}");
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&r.kill_json())?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// o10's progress line.
const O10_STEP: &str = "o10 dispatcher SIGKILL → first request served, socket held by the watchdog; 4 clients connecting in a loop, no connect retry";

/// `--only o10`: the o10 lines and their JSON alone.
fn only_o10(o: &Options, plan: &Plan) -> Result<()> {
    let mut r = report::Report {
        quick: o.quick,
        ..Default::default()
    };
    eprintln!("{O10_STEP}");
    held::dispatcher_kill_served(plan, &mut r)?;
    let mut t = String::new();
    r.held_table(&mut t);
    println!("{t}");
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&r.held_json())?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// o9's progress line.
const O9_STEP: &str = "o9 Python workers through OSPS vs ProcessPoolExecutor, same functions and python3: 64 B and 16 MiB calls/s at 1 and 8 callers, 100 pending calls with one crashing";

/// `--only o9`: the o9 lines and their JSON alone.
fn only_o9(o: &Options, plan: &Plan) -> Result<()> {
    let mut r = report::Report {
        quick: o.quick,
        ..Default::default()
    };
    eprintln!("{O9_STEP}");
    python::python_vs_executor(plan, &mut r)?;
    let mut t = String::new();
    r.python_table(&mut t);
    r.ratio_rows(&mut t, &r.python_ratios());
    println!("{t}");
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&r.python_json())?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn write_files(o: &Options, r: &report::Report) -> Result<()> {
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&r.json())?)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &o.plot {
        std::fs::write(path, r.svg())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Keeps this process (and the children it starts meanwhile) on one CPU
/// until dropped.
struct Pinned(nix::sched::CpuSet);

impl Pinned {
    fn to_one_cpu() -> Result<Pinned> {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        let before = sched_getaffinity(Pid::from_raw(0))?;
        let first = (0..CpuSet::count())
            .find(|&c| before.is_set(c).unwrap_or(false))
            .context("no CPU")?;
        let mut one = CpuSet::new();
        one.set(first)?;
        sched_setaffinity(Pid::from_raw(0), &one)?;
        Ok(Pinned(before))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

/// Latencies (ns) of each series, measured in rounds that take turns, after a warm-up.
fn interleave(
    series: &mut [&mut dyn FnMut() -> Result<()>],
    iters: usize,
    warmup: usize,
) -> Result<Vec<Vec<u64>>> {
    for s in series.iter_mut() {
        for _ in 0..warmup {
            s()?;
        }
    }
    const ROUNDS: usize = 20;
    let per = iters.div_ceil(ROUNDS);
    let mut out: Vec<Vec<u64>> = series
        .iter()
        .map(|_| Vec::with_capacity(per * ROUNDS))
        .collect();
    for _ in 0..ROUNDS {
        for (s, lat) in series.iter_mut().zip(out.iter_mut()) {
            for _ in 0..per {
                let t = Instant::now();
                s()?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
        }
    }
    Ok(out)
}

/// Runs `conns` client threads for `dur`, each doing `make(i)`'s request in
/// a loop; returns requests per second and every request's latency in ns.
pub fn load<F, R>(conns: usize, dur: Duration, make: F) -> Result<(f64, Vec<u64>)>
where
    F: Fn(usize) -> Result<R>,
    R: FnMut() -> Result<()> + Send + 'static,
{
    let mut requests: Vec<R> = (0..conns).map(&make).collect::<Result<_>>()?;
    let go = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = requests
        .drain(..)
        .map(|mut req| {
            let (go, stop, count, lat) = (
                Arc::clone(&go),
                Arc::clone(&stop),
                Arc::clone(&count),
                Arc::clone(&lat),
            );
            std::thread::spawn(move || -> Result<()> {
                while !go.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                let mut mine = Vec::with_capacity(1 << 16);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    req()?;
                    mine.push(t.elapsed().as_nanos() as u64);
                }
                count.fetch_add(mine.len() as u64, Ordering::Relaxed);
                lat.lock().expect("lock").extend(mine);
                Ok(())
            })
        })
        .collect();
    let t = Instant::now();
    go.store(true, Ordering::Release);
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    let secs = t.elapsed().as_secs_f64();
    let lat = Arc::try_unwrap(lat)
        .map_err(|_| anyhow::anyhow!("latencies still shared"))?
        .into_inner()
        .expect("lock");
    Ok((count.load(Ordering::Relaxed) as f64 / secs, lat))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_takes_o8_or_o9_and_passes_it_on() {
        let parse =
            |a: &[&str]| Options::parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        for (arg, only) in [("o8", Only::O8), ("o9", Only::O9), ("o10", Only::O10)] {
            let o = parse(&["--quick", "--only", arg]).unwrap();
            assert_eq!(o.only, Some(only));
            assert_eq!(o.to_args(), ["--quick", "--only", arg]);
        }
        assert!(parse(&["--only", "o7"]).is_err());
    }
}
