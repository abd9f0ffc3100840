//! `cargo xtask chaos [--seconds N] [--clients N] [--seed N]`: clients send
//! verifiable requests under the watchdog while the dispatcher and workers
//! are killed (SIGKILL) and stopped (SIGSTOP) at random. At the end it prints
//! requests sent, answered correctly, failed (answered with an error) and
//! lost (never answered, or answered wrongly), zombies that outlived a reap,
//! and leaked objects; it exits non-zero if anything was lost or leaked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::{ClientError, RetryPolicy, RetryingClient};
use osps_testkit::{processes_mentioning, zombies_of, Instance};

use crate::{build, step};

/// Command-line options.
#[derive(Debug)]
pub struct Options {
    seconds: u64,
    clients: u64,
    seed: u64,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            seconds: 20,
            clients: 8,
            seed: std::process::id() as u64,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
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

/// A small deterministic generator (xorshift), so a run can be replayed with --seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    correct: AtomicU64,
    failed: AtomicU64,
    lost: AtomicU64,
}

/// One request and the answer it must get.
fn request(rng: &mut Rng) -> (&'static str, Vec<String>, Vec<u8>, Vec<u8>) {
    let len = rng.below(4096) as usize;
    let data: Vec<u8> = (0..len)
        .map(|_| b"abcdefgh ijklm\nNOPQ"[rng.below(19) as usize])
        .collect();
    match rng.below(5) {
        0 => ("echo", vec![], data.clone(), data),
        1 => ("upper", vec![], data.clone(), data.to_ascii_uppercase()),
        2 => {
            let want = osps_testkit::sha256_line(&data);
            ("sha256", vec![], data, want)
        }
        3 => {
            let want = osps_testkit::wc_line(&data);
            ("wc", vec![], data, want)
        }
        _ => ("ping", vec![], vec![], b"pong\n".to_vec()),
    }
}

fn client_loop(mut c: RetryingClient, seed: u64, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let mut rng = Rng(seed | 1);
    while !stop.load(Ordering::Relaxed) {
        let (op, args, payload, want) = request(&mut rng);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        counts.sent.fetch_add(1, Ordering::Relaxed);
        match c.call(op, &args, &payload) {
            Ok(got) if got == want => counts.correct.fetch_add(1, Ordering::Relaxed),
            Ok(got) => {
                eprintln!(
                    "WRONG ANSWER to {op} of {} bytes: {:?}",
                    payload.len(),
                    String::from_utf8_lossy(&got)
                );
                counts.lost.fetch_add(1, Ordering::Relaxed)
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

pub fn run(o: Options) -> Result<()> {
    step("building the binaries");
    build()?;
    step(&format!(
        "chaos for {} s with {} clients (seed {})",
        o.seconds, o.clients, o.seed
    ));
    let mut inst = Instance::supervised(
        "chaos",
        &[
            "--heartbeat-ms",
            "100",
            "--miss-limit",
            "3",
            "--max-restarts",
            "1000",
            "--within",
            "10",
        ],
        &[
            "--workers",
            "2",
            "--segment-mib",
            "32",
            "--max-payload",
            "1048576",
            "--job-timeout-ms",
            "1000",
        ],
    );
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
            thread::spawn(move || client_loop(c, seed, stop, counts))
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
    let mut actions: HashMap<&str, u64> = HashMap::new();
    let mut zombie_seen: HashMap<u32, Instant> = HashMap::new();
    let mut lasting_zombies = 0u64;
    let end = Instant::now() + Duration::from_secs(o.seconds);
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(300 + rng.below(700)));
        let s = control.status().context("the service never came back")?;
        let (name, pid, sig) = match rng.below(4) {
            0 => ("SIGKILL dispatcher", s.dispatcher_pid, Signal::SIGKILL),
            1 => ("SIGSTOP dispatcher", s.dispatcher_pid, Signal::SIGSTOP),
            2 => (
                "SIGKILL worker",
                s.workers[rng.below(s.workers.len() as u64) as usize].pid,
                Signal::SIGKILL,
            ),
            _ => (
                "SIGSTOP worker",
                s.workers[rng.below(s.workers.len() as u64) as usize].pid,
                Signal::SIGSTOP,
            ),
        };
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
    let leaks = inst.leftovers();
    let zombies_at_end = zombies_of(&[watchdog, final_status.dispatcher_pid, std::process::id()]);

    step("results");
    let mut actions: Vec<_> = actions.into_iter().collect();
    actions.sort();
    for (name, n) in &actions {
        println!("  {name:<20} {n}");
    }
    let restarts = final_status.watchdog.as_ref().map_or(0, |w| w.restarts);
    println!("  dispatcher restarts  {restarts}");
    let (sent, correct, failed, lost) = (
        counts.sent.load(Ordering::Relaxed),
        counts.correct.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.lost.load(Ordering::Relaxed),
    );
    println!("  requests sent        {sent}");
    println!("  answered correctly   {correct}");
    println!("  failed (error reply) {failed}");
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
    if lost > 0
        || !leaks.is_empty()
        || lasting_zombies > 0
        || !zombies_at_end.is_empty()
        || !exit.success()
        || sent != correct + failed + lost
    {
        bail!("chaos found losses or leaks");
    }
    println!("\nchaos OK");
    Ok(())
}
