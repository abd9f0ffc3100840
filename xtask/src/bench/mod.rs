//! `cargo xtask bench [--quick] [--json PATH] [--plot PATH.svg]`: OSPS against
//! the kernel's floors, side by side in one run, reported as ratios (the
//! machine is shared and noisy: only ratios hold). The outer command builds
//! the release binaries and re-runs itself from them, so both the floors and
//! OSPS are measured optimised.

mod floors;
mod osps;
mod report;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use floors::helper;

/// Command-line options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub quick: bool,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
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
            }
        } else {
            Plan {
                iters: 30_000,
                warmup: 2_000,
                load_secs: 4.0,
                stream: 64 << 20,
                recovery_trials: 20,
                idle_conns: 1000,
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

/// The measurements, in the bench binary itself.
pub fn run_here(o: Options) -> Result<()> {
    let plan = Plan::new(o.quick);
    let dir = tempfile::Builder::new().prefix("osps-bench-").tempdir()?;
    let mut p = Progress {
        total: 17,
        done: 0,
        started: Instant::now(),
    };
    let mut r = report::Report {
        quick: o.quick,
        ..Default::default()
    };

    p.step("f1 UDS ping-pong 64 B");
    r.f1 = floors::uds_rtt(dir.path(), plan.iters, plan.warmup)?;
    p.step("f2 pipe ping-pong 64 B");
    r.f2 = floors::pipe_rtt(plan.iters, plan.warmup)?;
    p.step("f3 chain UDS→middle→pipe→end→pipe→middle→UDS 64 B");
    r.f3 = floors::chain_rtt(dir.path(), plan.iters, plan.warmup)?;
    for (i, c) in [1, 8, 64].into_iter().enumerate() {
        p.step(&format!("f4 UDS echo server, {c} connection(s)"));
        r.f4[i] = floors::uds_echo_rps(dir.path(), c, Duration::from_secs_f64(plan.load_secs))?;
    }
    p.step("f5 UDS streaming 64 MiB each way (in turn, and full duplex)");
    let best = |in_turn| -> Result<f64> {
        let runs = (0..3).map(|_| floors::uds_stream(dir.path(), plan.stream, in_turn));
        Ok(runs
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .fold(0.0, f64::max))
    };
    r.f5 = best(true)?;
    r.f5_duplex = best(false)?;
    p.step("f6 memcpy 64 MiB");
    r.f6 = floors::memcpy(plan.stream);

    osps::measure(&plan, &mut r, &mut |what: &str| p.step(what))?;

    let table = r.table();
    println!("{table}");
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
