//! A memory limit per pool (`memory_limit_mib`): a job that allocates past
//! it is answered `out of memory` naming the limit (not retried), its worker
//! is replaced and the next job is served; the limit is the worker's own
//! `RLIMIT_DATA`, set before its program runs, so the shared segment (here
//! larger than the limit) does not count, and no other process (another
//! pool's worker, the dispatcher, this test) is limited. A Python worker
//! (`MemoryError`) and an exec pool's command are limited too; status shows
//! the limit; bad values are refused with the file's line.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ipc_core::proto::ErrorKind;
use osps_client::ClientError;
use osps_testkit::Instance;
use osps_testkit::{assert_group_gone, bin, config_file, noise, run_to_exit, unique_instance};

/// A dispatcher serving `config` (`GROWER` stands for the Python test
/// worker's path) with a 64 MiB segment (more than the limits used here),
/// fault injection on; the guard keeps the file.
fn start(tag: &str, config: &str, extra: &[&str]) -> (tempfile::TempDir, Instance) {
    start_by(Instance::start, tag, config, extra)
}

/// [`start`], the instance started by `how` (`Instance::start` waits for
/// every worker).
fn start_by(
    how: fn(&str, &[&str]) -> Instance,
    tag: &str,
    config: &str,
    extra: &[&str],
) -> (tempfile::TempDir, Instance) {
    let grower = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/grower.py");
    let config = config
        .replace("GROWER", grower.to_str().unwrap())
        .replace("OSPS_WORKER", bin("osps-worker").to_str().unwrap());
    let (dir, path) = config_file(&config);
    let mut args = vec![
        "--config",
        path.to_str().unwrap(),
        "--segment-mib",
        "64",
        "--max-payload",
        "4194304",
        "--allow-fault-injection",
    ];
    args.extend_from_slice(extra);
    (dir, how(tag, &args))
}

/// The `Max data size` soft limit of process `pid` (`/proc/PID/limits`).
fn max_data(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max data size"))
        .expect("a Max data size line");
    line.split_whitespace().nth(3).unwrap().to_owned()
}

/// The live worker of pool `pool` (one worker), once it is up.
fn worker_of(inst: &Instance, pool: &str) -> u32 {
    let st = inst.wait_status("the pool's worker up", |st| {
        st.workers
            .iter()
            .any(|w| w.pool == pool && w.pid != 0 && w.state == "idle")
    });
    st.workers.iter().find(|w| w.pool == pool).unwrap().pid
}

/// The call's error, which must be `out of memory` naming pool `pool`'s
/// limit of `mib` MiB (as a client shows it: kind, then message).
fn assert_out_of_memory(got: Result<Vec<u8>, ClientError>, pool: &str, mib: u64) -> String {
    let e = match got {
        Err(ClientError::Remote(e)) => e,
        other => panic!("want an out of memory error, got {other:?}"),
    };
    assert_eq!(e.kind, ErrorKind::OutOfMemory, "{e}");
    let want = format!(
        "out of memory: the job went past pool \"{pool}\"'s memory limit of {mib} MiB (RLIMIT_DATA)"
    );
    assert!(e.to_string().starts_with(&want), "{e}");
    e.message
}

#[test]
fn a_job_past_the_limit_is_answered_out_of_memory_and_the_next_is_served() {
    // A program pool running osps-worker (the Rust SDK) under a limit, and
    // one without.
    let (_dir, inst) = start(
        "memlimit",
        "[pools.builtin]\nenabled = false\n\n[pools.lim]\nprogram = [\"OSPS_WORKER\"]\nworkers = 1\nmemory_limit_mib = 32\n\n[pools.py]\nprogram = [\"python3\", \"GROWER\"]\nworkers = 1\n",
        &[],
    );
    let limited = worker_of(&inst, "lim");
    let other = worker_of(&inst, "py");
    // The limit is the worker's own, from its start; no one else has it.
    assert_eq!(max_data(limited), (32u64 << 20).to_string());
    let unlimited = max_data(std::process::id());
    assert_eq!(max_data(other), unlimited, "another pool's worker");
    assert_eq!(max_data(inst.dispatcher_pid()), unlimited, "the dispatcher");
    let pool = |st: &ipc_core::status::StatusReport, name: &str| {
        st.pools.iter().find(|p| p.name == name).unwrap().clone()
    };
    let st = inst.status();
    let b = pool(&st, "lim");
    assert_eq!(b.memory_limit_mib, Some(32));
    assert_eq!(b.memory_limit_by.as_deref(), Some("RLIMIT_DATA"));
    assert_eq!(pool(&st, "py").memory_limit_mib, None);
    // The shared segment, larger than the limit, is mapped all the same:
    // RLIMIT_DATA does not count shared mappings (RLIMIT_AS would).
    assert!(st.segment.size > 32 << 20, "{}", st.segment.size);
    let maps = std::fs::read_to_string(format!("/proc/{limited}/maps")).unwrap();
    let name = st.segment.name.trim_start_matches('/');
    assert!(maps.contains(name), "the worker maps {name}");

    let mut c = inst.client();
    // Under the limit: served, by the same worker.
    assert_eq!(c.call("alloc", &["8"], b"").unwrap(), b"allocated 8 MiB\n");
    assert_eq!(worker_of(&inst, "lim"), limited);
    // Past it: the clear error, at once (not retried).
    let message = assert_out_of_memory(c.call("alloc", &["64"], b""), "lim", 32);
    assert!(message.contains("memory allocation of"), "{message}");
    // The next job is served, right, by a replacement.
    let payload = noise(1 << 20);
    let got = c.call("upper", &[], &payload).unwrap();
    assert_eq!(got, payload.to_ascii_uppercase());
    let replacement = worker_of(&inst, "lim");
    assert_ne!(replacement, limited);
    assert_group_gone(limited);
    assert_eq!(max_data(replacement), (32u64 << 20).to_string());
    // Another pool's worker is untouched, and not limited: it keeps 40 MiB.
    let leaked = c.call("leak", &["40"], b"").unwrap();
    assert_eq!(leaked, other.to_string().into_bytes());
    assert_eq!(worker_of(&inst, "py"), other);
    let st = inst.status();
    let b = pool(&st, "lim");
    assert_eq!((b.out_of_memory, b.restarts, b.jobs_failed), (1, 1, 1));
    assert_eq!(pool(&st, "py").restarts, 0);
    // The worker's own words reached the log, forwarded.
    let log = inst.log();
    assert!(
        log.contains("memory allocation of 67108864 bytes failed"),
        "{log}"
    );
}

#[test]
fn the_flag_limits_the_builtin_pool() {
    let (_dir, inst) = start(
        "memlimitflag",
        "",
        &["--workers", "1", "--memory-limit-mib", "24"],
    );
    let first = worker_of(&inst, "builtin");
    assert_eq!(max_data(first), (24u64 << 20).to_string());
    let mut c = inst.client();
    assert_out_of_memory(c.call("alloc", &["32"], b""), "builtin", 24);
    assert_eq!(c.call("upper", &[], b"abc").unwrap(), b"ABC");
    assert_ne!(worker_of(&inst, "builtin"), first);
    let st = inst.status();
    assert_eq!(st.pools[0].memory_limit_mib, Some(24));
}

#[test]
fn a_python_worker_past_the_limit_is_out_of_memory_too() {
    let (_dir, inst) = start(
        "memlimitpy",
        "[pools.builtin]\nworkers = 1\n\n[pools.py]\nprogram = [\"python3\", \"GROWER\"]\nworkers = 1\nmemory_limit_mib = 48\n",
        &[],
    );
    let first = worker_of(&inst, "py");
    let mut c = inst.client();
    let message = assert_out_of_memory(c.call("leak", &["64"], b""), "py", 48);
    assert!(message.contains("MemoryError"), "{message}");
    // The next job: a new worker (`leak` answers its pid), under the limit.
    let pid: u32 = String::from_utf8(c.call("leak", &["1"], b"").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(pid, first);
    assert_group_gone(first);
    // The builtin pool has no limit.
    assert_eq!(c.call("upper", &[], b"abc").unwrap(), b"ABC");
}

#[test]
fn an_exec_pools_command_runs_under_the_limit() {
    let (_dir, inst) = start(
        "memlimitexec",
        "[pools.builtin]\nworkers = 1\n\n[pools.lim]\nexec = [\"sh\", \"-c\", \"ulimit -d\"]\nops = [\"limit\"]\nworkers = 1\nmemory_limit_mib = 64\n\n[pools.big]\nexec = [\"python3\", \"-c\", \"import sys; sys.stdout.write(str(len(b'x' * (int(sys.stdin.read()) << 20))))\"]\nops = [\"big\"]\nworkers = 1\nmemory_limit_mib = 64\n",
        &[],
    );
    let mut c = inst.client();
    // `ulimit -d` is in KiB.
    assert_eq!(c.call("limit", &[], b"").unwrap(), b"65536\n");
    // A command past the limit: out of memory, with its own words.
    assert_eq!(c.call("big", &[], b"1").unwrap(), b"1048576");
    let e = match c.call("big", &[], b"128") {
        Err(ClientError::Remote(e)) => e,
        other => panic!("want an out of memory error, got {other:?}"),
    };
    assert_eq!(e.kind, ErrorKind::OutOfMemory, "{e}");
    let want = "out of memory: the command went past the pool's memory limit of 64 MiB (RLIMIT_DATA); python3 exited with status 1; stderr: ";
    assert!(e.to_string().starts_with(want), "{e}");
    assert!(e.message.ends_with("MemoryError"), "{}", e.message);
    // The worker serves on.
    assert_eq!(c.call("big", &[], b"2").unwrap(), b"2097152");
    let st = inst.status();
    let big = st.pools.iter().find(|p| p.name == "big").unwrap();
    assert_eq!((big.out_of_memory, big.restarts), (1, 0));
}

#[test]
fn a_limit_too_small_for_the_program_is_named_as_why_it_cannot_start() {
    let (_dir, inst) = start_by(
        Instance::start_answering,
        "memlimitstart",
        "[pools.builtin]\nworkers = 1\n\n[pools.fat]\nprogram = [\"python3\", \"-c\", \"b'x' * (64 << 20)\"]\nworkers = 1\nmemory_limit_mib = 16\n",
        &[],
    );
    let st = inst.wait_status("the pool's start failure", |st| {
        st.pools.iter().any(|p| p.start_failure.is_some())
    });
    let why = st.pools[1].start_failure.clone().unwrap();
    let want = "it ran out of memory before it was ready (MemoryError): pool \"fat\"'s memory_limit_mib of 16 MiB is too small for it (exit status 1)";
    assert!(why.contains(want), "{why}");
    // The other pool serves.
    assert_eq!(inst.client().call("upper", &[], b"a").unwrap(), b"A");
}

/// Runs the dispatcher with `extra` flags; it must refuse to start:
/// returns its stderr.
fn refused(extra: &[&str]) -> String {
    let runtime = tempfile::tempdir().unwrap();
    let out = run_to_exit(
        Command::new(bin("osps-dispatcher"))
            .args(["--instance", &unique_instance("memno"), "--runtime-dir"])
            .arg(runtime.path())
            .args(extra),
        "the dispatcher, at start,",
    );
    assert!(!out.status.success(), "the dispatcher accepted {extra:?}");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_limit_of_zero_or_too_small_is_refused_with_the_line_and_why() {
    let cases: &[(&str, usize, &str)] = &[
        (
            "[pools.builtin]\nmemory_limit_mib = 0\n",
            2,
            "key \"pools.builtin.memory_limit_mib\": invalid value '0' for '--memory-limit-mib <MEMORY_LIMIT_MIB>': 0 MiB would leave a worker no memory at all",
        ),
        (
            "workers = 1\nmemory_limit_mib = 4\n",
            2,
            "key \"memory_limit_mib\": invalid value '4' for '--memory-limit-mib <MEMORY_LIMIT_MIB>': 4 MiB is too small for a worker to start",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nmemory_limit_mib = 0\n",
            4,
            "key \"pools.z.memory_limit_mib\": 0 MiB would leave a worker no memory at all",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nmemory_limit_mib = 15\n",
            4,
            "key \"pools.z.memory_limit_mib\": 15 MiB is too small",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nmemory_limit_mib = \"lots\"\n",
            4,
            "key \"pools.z.memory_limit_mib\": expected an integer",
        ),
    ];
    for (text, line, says) in cases {
        let (_dir, path) = config_file(text);
        let err = refused(&["--config", path.to_str().unwrap()]);
        let want = format!("osps-dispatcher: {}:{line}: {says}", path.display());
        assert!(
            err.starts_with(&want),
            "{text:?}: want {want:?}, got {err:?}"
        );
        assert_eq!(err.lines().count(), 1, "{text:?}: one line: {err:?}");
    }
    let err = refused(&["--memory-limit-mib", "0"]);
    assert!(
        err.contains("0 MiB would leave a worker no memory at all"),
        "{err}"
    );
}

/// A worker of a limited pool that floods its stderr, while the
/// dispatcher's stderr drains slowly, holds up only itself: another pool's
/// calls are answered at once (its stderr is forwarded on a thread of its
/// own, not on the event loop).
#[test]
fn a_limited_worker_flooding_its_stderr_holds_up_no_other_pool() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("stderr");
    let reader_pid = tmp.path().join("reader.pid");
    // Reads 4 KiB every 50 ms: a log pipe that drains slowly.
    let slow = "import sys, time\nf = open(sys.argv[1], 'rb', buffering=0)\nwhile f.read(4096):\n    time.sleep(0.05)\n";
    let script = format!(
        "mkfifo {fifo}; (python3 -c \"$0\" {fifo} & echo $! > {pid}); exec \"$@\" 2>{fifo}",
        fifo = fifo.display(),
        pid = reader_pid.display()
    );
    let wrapper = ["sh", "-c", &script, slow];
    let grower = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/grower.py");
    let (_dir, file) = config_file(&format!(
        "[pools.builtin]\nworkers = 1\n\n[pools.spew]\nprogram = [\"sh\", \"-c\", \"yes flooding-the-log-of-the-dispatcher >&2 & exec python3 {}\"]\nworkers = 1\nmemory_limit_mib = 64\n",
        grower.display()
    ));
    let args = [
        "--config",
        file.to_str().unwrap(),
        "--segment-mib",
        "8",
        "--max-payload",
        "65536",
    ];
    // The slow reader (a child of ours once its shell is gone): killed
    // and reaped however the test ends.
    struct Reader(std::path::PathBuf);
    impl Drop for Reader {
        fn drop(&mut self) {
            let Some(pid) = std::fs::read_to_string(&self.0)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            else {
                return;
            };
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
    let _reader = Reader(reader_pid.clone());
    let inst = Instance::start_under("ml-flood", &wrapper, &args);
    let mut c = inst.client();
    let began = Instant::now();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(c.call("upper", &[], b"quick").unwrap(), b"QUICK");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a call took {:?}",
            t.elapsed()
        );
    }
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    drop(c);
    drop(inst);
}
