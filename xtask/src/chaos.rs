//! `cargo xtask chaos [--seconds N] [--clients N] [--seed N] [--builtin-only]`:
//! clients send verifiable requests under the watchdog while the dispatcher
//! and workers are killed (SIGKILL) and stopped (SIGSTOP) at random, one
//! fault every 0.3–1 s of service (a restarted dispatcher serves that long
//! before the next, whatever its restart took). By
//! default the dispatcher runs three pools from a configuration file (the
//! builtin `osps-worker`, the example SDK worker `inflate-worker` as a
//! program pool, `gzip -c` as a command pool): the clients call operations
//! of every pool, and the faults hit workers of every pool. `--builtin-only`
//! runs the builtin pool alone, without a configuration file. At the end it
//! prints requests sent, answered correctly, failed (answered with an
//! error), answered wrongly and lost (never answered), zombies that outlived
//! a reap by more than a second (not counting those whose parent it has
//! stopped: a stopped process cannot reap), and leaked objects (processes, the command pool's per-job ones
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
    /// Correct answers from the builtin, program and command pools.
    by_pool: [AtomicU64; 3],
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
/// pool, or (with `three`) of any of the three pools; and the pool's index
/// (0 builtin, 1 program, 2 command).
fn request(rng: &mut Rng, three: bool) -> (&'static str, Vec<u8>, Want, usize) {
    let pick = rng.below(if three { 8 } else { 5 });
    let data = if pick == 6 {
        // Compressible, and up to 64 KiB: its gzip is small, so the answer
        // is larger than the slot (input plus 4 KiB): the result grows.
        let mut d = data(rng, false);
        d.resize(d.len() * 16, b'z');
        d
    } else {
        data(rng, pick >= 5)
    };
    let pool = match pick {
        0..=4 => 0,
        5 | 6 => 1,
        _ => 2,
    };
    let (op, payload, want) = match pick {
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
        5 => {
            let want = pools::crc_line(&data);
            ("gunzip_crc32", pools::gzip(&data), Want::Bytes(want))
        }
        6 => ("gunzip", pools::gzip(&data), Want::Bytes(data)),
        _ => (EXEC_OP, data.clone(), Want::Gunzips(data)),
    };
    (op, payload, want, pool)
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
        let (op, payload, want, pool) = request(&mut rng, three);
        counts.sent.fetch_add(1, Ordering::Relaxed);
        match c.call(op, &[], &payload).map(|got| want.check(&got)) {
            Ok(Ok(())) => {
                counts.by_pool[pool].fetch_add(1, Ordering::Relaxed);
                counts.correct.fetch_add(1, Ordering::Relaxed)
            }
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
    ))?;
    let mut args = watchdog.to_vec();
    args.extend(["--config", config.arg()]);
    Ok((Instance::supervised("chaos", &args, &sizes), Some(config)))
}

/// A fault to inflict: on the dispatcher, or on a worker of a pool picked
/// at random (then one of its workers), so that every pool is hit; for a
/// command pool, half of the time on the command one of its workers is
/// running, when one is.
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
    let pool = &s.pools[rng.below(s.pools.len() as u64) as usize];
    let (kind, pool) = (pool.kind.as_str(), &pool.name);
    let workers: Vec<u32> = s
        .workers
        .iter()
        .filter(|w| &w.pool == pool)
        .map(|w| w.pid)
        .collect();
    if kind == "exec" && rng.below(2) == 0 {
        // A command a worker of the pool is running, if any: its job ends
        // in `command failed` (killed) or `timeout` (stopped), and nothing
        // of its process group may be left.
        let commands: Vec<u32> = osps_testkit::all_processes()
            .iter()
            .filter(|p| workers.contains(&p.ppid) && p.state != 'Z')
            .map(|p| p.pid)
            .collect();
        if !commands.is_empty() {
            let pid = commands[rng.below(commands.len() as u64) as usize];
            return (format!("{name} command ({pool})"), pid, sig);
        }
    }
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
            "  pool {:<9} {:<8} {} worker(s)  timeout {} ms  ops {}  program {}",
            p.name,
            p.kind,
            p.workers,
            p.job_timeout_ms,
            p.ops.join(" "),
            p.program.join(" ")
        );
        let seg = p.segment.as_ref();
        println!(
            "                 as {}  {} segment of {} MiB  memory limit {}",
            p.run_as
                .as_ref()
                .map_or("the dispatcher's user", |r| r.user.as_str()),
            seg.map_or("?", |s| s.backend.as_str()),
            seg.map_or(0, |s| s.size >> 20),
            p.memory_limit_mib
                .map_or("none".into(), |m| format!("{m} MiB"))
        );
    }
    let watchdog = inst.pid();
    // System V segments have no file to find afterwards: any of ours made
    // during the run and still there after the stop is a leak.
    let sysv_before = sysv_segments_of_ours();
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
    let mut last_dispatcher = 0;
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(300 + rng.below(700)));
        let mut s = control.status().context("the service never came back")?;
        if s.dispatcher_pid != last_dispatcher {
            // A dispatcher new since the last fault (the status above
            // waited for it through its restart and the watchdog's
            // back-off): it serves 0.3–1 s before a fault too. Without
            // this, the fault came the moment it first answered, again and
            // again, and a request that each such dispatcher had taken was
            // lost by every one of them, more times than a client resends.
            thread::sleep(Duration::from_millis(300 + rng.below(700)));
            s = control.status().context("the service never came back")?;
            last_dispatcher = s.dispatcher_pid;
        }
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
        // A zombie whose parent chaos stopped (SIGSTOP) cannot be reaped
        // until the parent is continued or killed: that is the fault, not a leak.
        let current: Vec<u32> = zombies_of(&parents)
            .iter()
            .filter(|z| osps_testkit::proc_info(z.ppid).is_some_and(|p| p.state != 'T'))
            .map(|p| p.pid)
            .collect();
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
    leaks.extend(
        sysv_segments_of_ours()
            .difference(&sysv_before)
            .map(|id| format!("System V segment id {id}")),
    );
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
        println!("  {name:<26} {n}");
    }
    let restarts = final_status.watchdog.as_ref().map_or(0, |w| w.restarts);
    println!("  {:<26} {restarts}", "dispatcher restarts");
    for p in &final_status.pools {
        println!(
            "  pool {:<21} {} done, {} failed, {} worker restarts (the last dispatcher's)",
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
    println!("  {:<26} {sent}", "requests sent");
    let by_pool: Vec<u64> = counts
        .by_pool
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    println!(
        "  {:<26} {correct} (builtin {}, program {}, command {})",
        "answered correctly", by_pool[0], by_pool[1], by_pool[2]
    );
    println!("  {:<26} {failed}", "failed (error reply)");
    println!("  {:<26} {wrong}", "answered wrongly");
    println!("  {:<26} {lost}", "lost");
    println!(
        "  {:<26} {}",
        "zombies > 1 s",
        lasting_zombies + zombies_at_end.len() as u64
    );
    println!(
        "  {:<26} {}{}",
        "leaked objects",
        leaks.len(),
        if leaks.is_empty() {
            String::new()
        } else {
            format!(" {leaks:?}")
        }
    );
    println!("  {:<26} {exit}", "watchdog exit");
    drop(config);
    if lost > 0
        || wrong > 0
        || !leaks.is_empty()
        || lasting_zombies > 0
        || !zombies_at_end.is_empty()
        || !exit.success()
        || sent != correct + failed + wrong + lost
    {
        // The watchdog's and dispatchers' log, for whoever looks into it.
        let kept = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(format!("chaos-{}.log", o.seed));
        match std::fs::write(&kept, inst.log()) {
            Ok(()) => eprintln!("the instance's log: {}", kept.display()),
            Err(e) => eprintln!("cannot keep the instance's log in {}: {e}", kept.display()),
        }
        bail!("chaos found losses, wrong answers or leaks");
    }
    println!("\nchaos OK");
    Ok(())
}

/// The ids of the System V segments our uid created (`/proc/sysvipc/shm`:
/// key, shmid, perms, size, cpid, lpid, nattch, uid, gid, cuid, ...).
fn sysv_segments_of_ours() -> std::collections::HashSet<u64> {
    let euid = nix::unistd::geteuid().as_raw().to_string();
    let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(9) == Some(&euid.as_str())).then(|| f.get(1)?.parse().ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the real operation answers, computed here.
    fn answer(op: &str, payload: &[u8]) -> Vec<u8> {
        match op {
            "echo" => payload.to_vec(),
            "upper" => payload.to_ascii_uppercase(),
            "sha256" => osps_testkit::sha256_line(payload),
            "wc" => osps_testkit::wc_line(payload),
            "ping" => b"pong\n".to_vec(),
            "gunzip_crc32" => pools::crc_line(&pools::gunzip(payload).unwrap()),
            "gunzip" => pools::gunzip(payload).unwrap(),
            EXEC_OP => pools::gzip(payload),
            other => panic!("unexpected operation {other}"),
        }
    }

    #[test]
    fn three_pool_requests_reach_every_pool_and_their_checks_tell_right_from_wrong() {
        let mut rng = Rng(7);
        let mut pools_seen = [0; 3];
        let mut grown = 0;
        for _ in 0..400 {
            let (op, payload, want, pool) = request(&mut rng, true);
            pools_seen[pool] += 1;
            let right = answer(op, &payload);
            want.check(&right).unwrap();
            let mut wrong = right.clone();
            wrong.push(b'!');
            assert!(want.check(&wrong).is_err(), "{op}");
            if op == "gunzip" && right.len() > payload.len() + 4096 {
                grown += 1;
            }
        }
        assert!(pools_seen.iter().all(|&n| n > 40), "{pools_seen:?}");
        assert!(grown > 0, "no gunzip result larger than its slot");
        let mut rng = Rng(7);
        for _ in 0..100 {
            assert_eq!(request(&mut rng, false).3, 0);
        }
    }

    #[test]
    fn options_parse_the_builtin_only_switch_among_valued_flags() {
        let args: Vec<String> = ["--seconds", "3", "--builtin-only", "--clients", "2"]
            .map(String::from)
            .to_vec();
        let o = Options::parse(&args).unwrap();
        assert!(o.builtin_only);
        assert_eq!((o.seconds, o.clients), (3, 2));
        assert!(!Options::parse(&[]).unwrap().builtin_only);
        assert!(Options::parse(&["--pools".into(), "3".into()]).is_err());
    }
}
