//! `cargo xtask chaos [--seconds N] [--clients N] [--seed N] [--builtin-only]`:
//! clients send verifiable requests under the watchdog while the dispatcher
//! and workers are killed (SIGKILL) and stopped (SIGSTOP) at random. By
//! default the dispatcher runs three pools from a configuration file (the
//! builtin `osps-worker`, the example SDK worker `inflate-worker` as a
//! program pool, `gzip -c` as a command pool): the clients call operations
//! of every pool, and the faults hit workers of every pool. `--builtin-only`
//! runs the builtin pool alone, without a configuration file. At the end it
//! prints requests sent, answered correctly, failed (answered with an
//! error), answered wrongly and lost (never answered), zombies that outlived
//! a reap, and leaked objects (processes, the command pool's per-job ones
//! included, segments, sockets); it exits non-zero if anything was lost,
//! wrong or leaked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipc_core::status::StatusReport;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::{ClientError, RetryPolicy, RetryingClient};
use osps_testkit::{processes_mentioning, zombies_of, Instance};

use crate::pools::{self, ConfigFile, Rng, Sizes, EXEC_OP, PROGRAM_BIN};
use crate::{build, our_descendants, step};

/// Command-line options.
#[derive(Debug)]
pub struct Options {
    seconds: u64,
    clients: u64,
    seed: u64,
    /// The builtin pool alone (the run before pools existed).
    builtin_only: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            seconds: 20,
            clients: 8,
            seed: std::process::id() as u64,
            builtin_only: false,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--builtin-only" {
                o.builtin_only = true;
                continue;
            }
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            let n: u64 = value
                .parse()
                .with_context(|| format!("{flag} {value}: not a number"))?;
            match flag.as_str() {
                "--seconds" => o.seconds = n.max(1),
                "--clients" => o.clients = n.max(1),
                "--seed" => o.seed = n,
                _ => bail!("unknown option {flag}"),
            }
        }
        Ok(o)
    }
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    correct: AtomicU64,
    failed: AtomicU64,
    wrong: AtomicU64,
    lost: AtomicU64,
}

/// The answer a request must get.
enum Want {
    Bytes(Vec<u8>),
    /// gzip that decompresses to these bytes (gzip's output is its own).
    Gunzips(Vec<u8>),
}

impl Want {
    fn check(&self, got: &[u8]) -> Result<()> {
        match self {
            Want::Bytes(want) if got == want => Ok(()),
            Want::Bytes(want) => bail!(
                "{:?} instead of {:?}",
                String::from_utf8_lossy(&got[..got.len().min(80)]),
                String::from_utf8_lossy(&want[..want.len().min(80)])
            ),
            Want::Gunzips(input) => pools::check_gzip(input, got),
        }
    }
}

/// Up to 4 KiB of text, or of random bytes for the pools that compress.
fn data(rng: &mut Rng, random: bool) -> Vec<u8> {
    let len = rng.below(4096) as usize;
    if random && rng.below(2) == 0 {
        return rng.bytes(len);
    }
    (0..len)
        .map(|_| b"abcdefgh ijklm\nNOPQ"[rng.below(19) as usize])
        .collect()
}

/// One request and the answer it must get: an operation of the builtin
/// pool, or (with `three`) of any of the three pools.
fn request(rng: &mut Rng, three: bool) -> (&'static str, Vec<u8>, Want) {
    let pick = rng.below(if three { 8 } else { 5 });
    let data = data(rng, pick >= 5);
    match pick {
        0 => ("echo", data.clone(), Want::Bytes(data)),
        1 => (
            "upper",
            data.clone(),
            Want::Bytes(data.to_ascii_uppercase()),
        ),
        2 => {
            let want = osps_testkit::sha256_line(&data);
            ("sha256", data, Want::Bytes(want))
        }
        3 => {
            let want = osps_testkit::wc_line(&data);
            ("wc", data, Want::Bytes(want))
        }
        4 => ("ping", vec![], Want::Bytes(b"pong\n".to_vec())),
        5 | 6 => {
            let want = pools::crc_line(&data);
            ("gunzip_crc32", pools::gzip(&data), Want::Bytes(want))
        }
        _ => (EXEC_OP, data.clone(), Want::Gunzips(data)),
    }
}

fn client_loop(
    mut c: RetryingClient,
    seed: u64,
    three: bool,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let mut rng = Rng(seed | 1);
    while !stop.load(Ordering::Relaxed) {
        let (op, payload, want) = request(&mut rng, three);
        counts.sent.fetch_add(1, Ordering::Relaxed);
        match c.call(op, &[], &payload).map(|got| want.check(&got)) {
            Ok(Ok(())) => counts.correct.fetch_add(1, Ordering::Relaxed),
            Ok(Err(e)) => {
                eprintln!("WRONG ANSWER to {op} of {} bytes: {e:#}", payload.len());
                counts.wrong.fetch_add(1, Ordering::Relaxed)
            }
            // The service answered, with an error (e.g. a timeout after a worker was stopped).
            Err(ClientError::Remote(_)) => counts.failed.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("NO ANSWER to {op}: {e}");
                counts.lost.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// The instance under chaos, and its configuration file (none with
/// `--builtin-only`).
fn start(o: &Options) -> Result<(Instance, Option<ConfigFile>)> {
    let watchdog = [
        "--heartbeat-ms",
        "100",
        "--miss-limit",
        "3",
        "--max-restarts",
        "1000",
        "--within",
        "10",
    ];
    let sizes = [
        "--segment-mib",
        "32",
        "--max-payload",
        "1048576",
        "--job-timeout-ms",
        "1000",
    ];
    if o.builtin_only {
        let mut args = vec!["--workers", "2"];
        args.extend(sizes);
        return Ok((Instance::supervised("chaos", &watchdog, &args), None));
    }
    let config = ConfigFile::write(pools::three_pools(
        &osps_testkit::bin(PROGRAM_BIN),
        Sizes {
            builtin: 2,
            program: 2,
            exec: 2,
        },
        None,
    ))?;
    let mut args = watchdog.to_vec();
    args.extend(["--config", config.arg()]);
    Ok((Instance::supervised("chaos", &args, &sizes), Some(config)))
}

/// A fault to inflict: on the dispatcher, or on a worker of a pool picked
/// at random (then one of its workers), so that every pool is hit.
fn fault(rng: &mut Rng, s: &StatusReport) -> (String, u32, Signal) {
    let sig = if rng.below(2) == 0 {
        Signal::SIGKILL
    } else {
        Signal::SIGSTOP
    };
    let name = if sig == Signal::SIGKILL {
        "SIGKILL"
    } else {
        "SIGSTOP"
    };
    if rng.below(2) == 0 || s.pools.is_empty() {
        return (format!("{name} dispatcher"), s.dispatcher_pid, sig);
    }
    let pool = &s.pools[rng.below(s.pools.len() as u64) as usize].name;
    let workers: Vec<u32> = s
        .workers
        .iter()
        .filter(|w| &w.pool == pool)
        .map(|w| w.pid)
        .collect();
    let pid = match workers.len() {
        0 => 0,
        n => workers[rng.below(n as u64) as usize],
    };
    (format!("{name} worker ({pool})"), pid, sig)
}

pub fn run(o: Options) -> Result<()> {
    step("building the binaries");
    build()?;
    step(&format!(
        "chaos for {} s with {} clients (seed {})",
        o.seconds, o.clients, o.seed
    ));
    let (mut inst, config) = start(&o)?;
    let three = config.is_some();
    let first = inst.status();
    for p in &first.pools {
        println!(
            "  pool {:<9} {:<8} {} worker(s)  ops {}  program {}",
            p.name,
            p.kind,
            p.workers,
            p.ops.join(" "),
            p.program.join(" ")
        );
    }
    let watchdog = inst.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let clients: Vec<_> = (0..o.clients)
        .map(|i| {
            let c = RetryingClient::new(
                inst.endpoint(),
                RetryPolicy {
                    deadline: Duration::from_secs(30),
                    ..RetryPolicy::default()
                },
            );
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            let seed = o.seed.wrapping_mul(31).wrapping_add(i);
            thread::spawn(move || client_loop(c, seed, three, stop, counts))
        })
        .collect();

    let mut rng = Rng(o.seed | 1);
    let mut control = RetryingClient::new(
        inst.endpoint(),
        RetryPolicy {
            deadline: Duration::from_secs(30),
            ..RetryPolicy::default()
        },
    );
    let mut actions: HashMap<String, u64> = HashMap::new();
    let mut zombie_seen: HashMap<u32, Instant> = HashMap::new();
    let mut lasting_zombies = 0u64;
    let end = Instant::now() + Duration::from_secs(o.seconds);
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(300 + rng.below(700)));
        let s = control.status().context("the service never came back")?;
        let (name, pid, sig) = fault(&mut rng, &s);
        if pid != 0 && kill(Pid::from_raw(pid as i32), sig).is_ok() {
            *actions.entry(name).or_default() += 1;
        }
        // Zombies of ours that outlive a reap by more than a second.
        let parents: Vec<u32> = processes_mentioning(inst.name())
            .iter()
            .map(|p| p.pid)
            .chain([watchdog])
            .collect();
        let now = Instant::now();
        let current: Vec<u32> = zombies_of(&parents).iter().map(|p| p.pid).collect();
        zombie_seen.retain(|pid, _| current.contains(pid));
        for z in current {
            let first = *zombie_seen.entry(z).or_insert(now);
            if now - first > Duration::from_secs(1) {
                lasting_zombies += 1;
                zombie_seen.insert(z, now + Duration::from_secs(3600)); // count once
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
    }
    let final_status = control.status().context("service gone at the end")?;

    step("ordered shutdown");
    kill(Pid::from_raw(watchdog as i32), Signal::SIGTERM)?;
    let exit = inst
        .wait_exit(Duration::from_secs(30))
        .context("watchdog did not exit")?;
    thread::sleep(Duration::from_millis(200));
    let mut leaks = inst.leftovers();
    // What the instance started and the leftovers' patterns cannot name
    // (the program pool's workers run with their own argv, a command
    // pool's per-job processes with the command's): anything still under
    // us, the subreaper of all of it.
    leaks.extend(our_descendants().iter().map(|p| {
        format!(
            "process {} ({}) state {} under xtask",
            p.pid, p.cmdline, p.state
        )
    }));
    let zombies_at_end = zombies_of(&[watchdog, final_status.dispatcher_pid, std::process::id()]);

    step("results");
    let mut actions: Vec<_> = actions.into_iter().collect();
    actions.sort();
    for (name, n) in &actions {
        println!("  {name:<20} {n}");
    }
    let restarts = final_status.watchdog.as_ref().map_or(0, |w| w.restarts);
    println!("  dispatcher restarts  {restarts}");
    for p in &final_status.pools {
        println!(
            "  pool {:<15} {} done, {} failed, {} worker restarts (the last dispatcher's)",
            p.name, p.jobs_done, p.jobs_failed, p.restarts
        );
    }
    let (sent, correct, failed, wrong, lost) = (
        counts.sent.load(Ordering::Relaxed),
        counts.correct.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.wrong.load(Ordering::Relaxed),
        counts.lost.load(Ordering::Relaxed),
    );
    println!("  requests sent        {sent}");
    println!("  answered correctly   {correct}");
    println!("  failed (error reply) {failed}");
    println!("  answered wrongly     {wrong}");
    println!("  lost                 {lost}");
    println!(
        "  zombies > 1 s        {}",
        lasting_zombies + zombies_at_end.len() as u64
    );
    println!(
        "  leaked objects       {}{}",
        leaks.len(),
        if leaks.is_empty() {
            String::new()
        } else {
            format!(" {leaks:?}")
        }
    );
    println!("  watchdog exit        {exit}");
    drop(config);
    if lost > 0
        || wrong > 0
        || !leaks.is_empty()
        || lasting_zombies > 0
        || !zombies_at_end.is_empty()
        || !exit.success()
        || sent != correct + failed + wrong + lost
    {
        bail!("chaos found losses, wrong answers or leaks");
    }
    println!("\nchaos OK");
    Ok(())
}
