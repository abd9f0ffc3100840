//! Pools from a configuration file, served by a real dispatcher: the example
//! worker as a program pool next to others, routing by operation, an
//! unknown operation answered before its payload, `ping` with any pools, a
//! program pool's worker killed mid-job (retried, then a clear error) while
//! the other pools serve, and two pools serving one operation refused.
//! Command pools: each job runs the command (`osps-worker` in exec mode)
//! with the payload on its stdin and its stdout as the result, however
//! large; a failing command, one past its timeout with children of its own,
//! and arguments are answered as documented, and no process of a job is left.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use ipc_core::frame;
use ipc_core::proto::{ErrorKind, Outcome, RemoteError, Response};
use osps_testkit::{
    assert_group_gone, bin, config_file, run_to_exit, unique_instance, wait_for, GroupGuard,
    Instance,
};

const WORKER: &str = env!("CARGO_BIN_EXE_inflate-worker");

fn start(tag: &str, path: &Path) -> Instance {
    Instance::start(
        tag,
        &[
            "--config",
            path.to_str().unwrap(),
            "--segment-mib",
            "64",
            "--max-payload",
            "4194304",
        ],
    )
}

fn remote(e: osps_client::ClientError) -> RemoteError {
    match e {
        osps_client::ClientError::Remote(e) => e,
        other => panic!("a typed error expected, got {other}"),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn ping_works_when_the_only_pool_is_the_example_worker_and_unknown_ops_are_answered_first() {
    let (_dir, path) = config_file(&format!(
        "[pools.builtin]\nenabled = false\n\n[pools.inflate]\nprogram = [\"{WORKER}\"]\nworkers = 2\n"
    ));
    let inst = start("pool-ping", &path);
    let mut c = inst.client();
    c.ping().unwrap();
    let st = inst.status();
    assert_eq!(st.pools.len(), 1, "{st:?}");
    assert_eq!(
        (st.pools[0].name.as_str(), st.pools[0].kind.as_str()),
        ("inflate", "program")
    );
    assert!(
        st.pools[0].ops.iter().any(|o| o == "gunzip_crc32"),
        "{st:?}"
    );
    assert!(st.workers.iter().all(|w| w.pool == "inflate"), "{st:?}");
    // A builtin operation is not served here: the dispatcher says so, and
    // lists what is.
    let e = remote(c.call("upper", &[], b"ab").unwrap_err());
    assert_eq!(e.kind, ErrorKind::UnknownOp);
    assert!(
        e.message.contains("\"upper\" is not an operation; known: ")
            && e.message.contains("gunzip_crc32"),
        "{e:?}"
    );
    // Answered before its payload is read: a header announcing 1 MiB, and
    // no byte of it, gets its answer.
    let mut s = inst.raw_client();
    s.write_all(&osps_testkit::request_header(7, "nope", &[], 1 << 20))
        .unwrap();
    let resp: Response = frame::read_frame(&mut s, &mut Vec::new(), 4096).expect("a reply");
    assert_eq!(resp.id, 7);
    assert!(
        matches!(&resp.outcome, Outcome::Err(e) if e.kind == ErrorKind::UnknownOp),
        "{resp:?}"
    );
    // The payload is then skipped, and the connection serves on.
    s.write_all(&vec![0u8; 1 << 20]).unwrap();
    s.write_all(&osps_testkit::request_header(8, "ping", &[], 0))
        .unwrap();
    let resp: Response = frame::read_frame(&mut s, &mut Vec::new(), 4096).expect("a reply");
    assert!(matches!(resp.outcome, Outcome::Ok), "{resp:?}");
    let mut pong = vec![0u8; resp.result_len as usize];
    s.read_exact(&mut pong).unwrap();
    assert_eq!((resp.id, pong.as_slice()), (8, &b"pong\n"[..]));
}

/// The busy worker of pool `pool`, once one is.
fn busy_worker(inst: &Instance, pool: &str) -> u32 {
    let st = inst.wait_status("a busy worker", |st| {
        st.workers
            .iter()
            .any(|w| w.pool == pool && w.state == "busy")
    });
    st.workers
        .iter()
        .find(|w| w.pool == pool && w.state == "busy")
        .unwrap()
        .pid
}

#[test]
fn a_program_pools_worker_killed_mid_job_is_retried_then_a_clear_error_while_other_pools_serve() {
    // osps-worker as a program pool (its `sleep` makes a long job), next
    // to the example worker; no builtin pool.
    let (_dir, path) = config_file(&format!(
        "[pools.builtin]\nenabled = false\n\n[pools.slow]\nprogram = [\"{}\"]\nworkers = 1\nmax_attempts = 2\n\n[pools.inflate]\nprogram = [\"{WORKER}\"]\nworkers = 1\n",
        bin("osps-worker").display()
    ));
    let inst = start("pool-kill", &path);
    let endpoint = inst.endpoint();
    let call = std::thread::spawn(move || {
        let mut c = osps_client::Client::connect(&endpoint).unwrap();
        c.call("sleep", &["30000"], b"")
    });
    let mut killed = Vec::new();
    for _ in 0..2 {
        let pid = wait_for(Duration::from_secs(20), || {
            Some(busy_worker(&inst, "slow")).filter(|p| !killed.contains(p))
        })
        .expect("the job runs on a fresh worker");
        // The other pool serves meanwhile.
        let text = b"served while the other pool's worker dies".repeat(10);
        let answer = inst
            .client()
            .call("gunzip_crc32", &[], &gzip(&text))
            .unwrap();
        assert!(
            answer.starts_with(format!("{} ", text.len()).as_bytes()),
            "{answer:?}"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        killed.push(pid);
    }
    let e = remote(call.join().unwrap().unwrap_err());
    assert_eq!(e.kind, ErrorKind::WorkerCrashed, "{e:?}");
    assert!(e.message.contains("died on each of 2 attempts"), "{e:?}");
    let st = inst.wait_status("the slow pool restarted twice", |st| {
        st.pools.iter().any(|p| p.name == "slow" && p.restarts == 2)
            && st.workers.iter().all(|w| w.state == "idle")
    });
    let inflate = st.pools.iter().find(|p| p.name == "inflate").unwrap();
    assert_eq!((inflate.restarts, inflate.jobs_done), (0, 2), "{st:?}");
}

#[test]
fn two_program_pools_serving_one_operation_are_refused_at_start() {
    let (_dir, path) = config_file(&format!(
        "[pools.builtin]\nenabled = false\n\n[pools.a]\nprogram = [\"{WORKER}\"]\nworkers = 1\n\n[pools.b]\nprogram = [\"{WORKER}\"]\nworkers = 1\n"
    ));
    let runtime = tempfile::tempdir().unwrap();
    let instance = unique_instance("pool-twice");
    let out = run_to_exit(
        std::process::Command::new(bin("osps-dispatcher"))
            .args(["--instance", &instance, "--runtime-dir"])
            .arg(runtime.path())
            .args(["--config", path.to_str().unwrap()]),
        "the dispatcher, at start,",
    );
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let file = path.display().to_string();
    assert!(
        err.contains("serves operation \"gunzip\", which pool")
            && err.contains(&format!("({file}:4)"))
            && err.contains(&format!("({file}:8)")),
        "{err}"
    );
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("osps-dispatcher: invalid configuration: "),
        "{err}"
    );
    // Nothing left: no socket, no segment, no state file.
    let paths = ipc_core::RuntimePaths::new(&instance, Some(runtime.path())).unwrap();
    assert_eq!(osps_testkit::leftovers(&paths), Vec::<String>::new());
}

fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn three_pools_builtin_the_example_worker_and_a_command_each_answer_their_operations() {
    let (_dir, path) = config_file(&format!(
        "[pools.builtin]\nworkers = 1\n\n\
         [pools.inflate]\nprogram = [\"{WORKER}\"]\nworkers = 1\n\n\
         [pools.gz]\nexec = [\"gzip\", \"-c\"]\nops = [\"gzip_c\"]\nworkers = 2\n"
    ));
    let inst = start("cmd-three", &path);
    let mut c = inst.client();
    // 1 MiB of random data through the command pool: larger than it went in,
    // and gunzips to the input.
    let data = osps_testkit::noise(1 << 20);
    let gz = c.call("gzip_c", &[], &data).unwrap();
    assert!(gz.len() > data.len(), "{} bytes", gz.len());
    assert!(gunzip(&gz) == data);
    // The example worker's operation, and a builtin one.
    assert!(c.call("gunzip", &[], &gz).unwrap() == data);
    assert_eq!(c.call("upper", &[], b"abc").unwrap(), b"ABC");
    c.ping().unwrap();
    let st = inst.status();
    let gz_pool = st.pools.iter().find(|p| p.name == "gz").unwrap();
    assert_eq!(
        (gz_pool.kind.as_str(), &gz_pool.ops[..]),
        ("exec", &["gzip_c".to_owned()][..])
    );
    assert!(st.workers.iter().all(|w| w.restarts == 0), "{st:?}");
}

#[test]
fn a_failing_command_and_one_past_its_timeout_get_clear_errors_and_leave_nothing() {
    let (_dir, path) = config_file(
        "[pools.builtin]\nworkers = 1\n\n\
         [pools.fail]\nexec = [\"sh\", \"-c\", \"echo oops >&2; exit 3\"]\nops = [\"fail\"]\nworkers = 1\n\n\
         [pools.slow]\nexec = [\"sh\", \"-c\", \"echo started $$ >&2; sleep 100 & sleep 100\"]\nops = [\"slow\"]\nworkers = 1\njob_timeout_ms = 500\n\n\
         [pools.args]\nexec = [\"sh\", \"-c\", \"printf '%s,' \\\"$@\\\"\", \"sh\"]\nops = [\"args\"]\npass_args = true\nworkers = 1\n",
    );
    let inst = start("cmd-errors", &path);
    let mut c = inst.client();
    let e = remote(c.call("fail", &[], b"x").unwrap_err());
    assert_eq!(
        (e.kind, e.message.as_str()),
        (
            ErrorKind::CommandFailed,
            "sh exited with status 3; stderr: oops"
        )
    );
    let began = Instant::now();
    let e = remote(c.call("slow", &[], b"").unwrap_err());
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    let pgid = osps_testkit::pid_after(
        &e.message,
        "sh ran past 500 ms and was killed; stderr: started ",
    );
    let _guard = GroupGuard(pgid);
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert_group_gone(pgid);
    assert_eq!(c.call("args", &["a b", "c"], b"").unwrap(), b"a b,c,");
    // The command pools' workers answered all of it: none was replaced.
    let st = inst.status();
    assert!(st.workers.iter().all(|w| w.restarts == 0), "{st:?}");
}

#[test]
fn a_command_whose_worker_is_killed_from_outside_leaves_nothing_behind() {
    // A marker only this test's command carries; it ignores its stdin, so
    // the end of its input does not stop it.
    let marker = format!("9{}.5", std::process::id() % 100_000);
    let (_dir, path) = config_file(&format!(
        "[pools.builtin]\nworkers = 1\n\n[pools.stuck]\nexec = [\"sh\", \"-c\", \"sleep {marker} & sleep {marker}\"]\nops = [\"stuck\"]\nworkers = 1\nmax_attempts = 1\n"
    ));
    let inst = start("pool-orphans", &path);
    let endpoint = inst.endpoint();
    let call = std::thread::spawn(move || {
        let mut c = osps_client::Client::connect(&endpoint).unwrap();
        c.call("stuck", &[], b"")
    });
    let sleeps = |m: &str| {
        let mut found = osps_testkit::processes_mentioning(m);
        found.retain(|p| p.cmdline.starts_with("sleep "));
        found
    };
    let started = wait_for(Duration::from_secs(10), || {
        (sleeps(&marker).len() == 2).then_some(())
    });
    assert!(started.is_some(), "the command's two sleeps run");
    let sh = sleeps(&marker)[0].pgid;
    let _guard = GroupGuard(sh);
    let worker = busy_worker(&inst, "stuck");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let e = remote(call.join().unwrap().unwrap_err());
    assert_eq!(e.kind, ErrorKind::WorkerCrashed, "{e:?}");
    // The command's group (its own, out of the worker's) is swept: killed
    // and reaped by the dispatcher, long before the dispatcher ends.
    assert_group_gone(sh);
    let zombies = wait_for(Duration::from_secs(5), || {
        osps_testkit::zombies_of(&[inst.pid()])
            .is_empty()
            .then_some(())
    });
    assert!(
        zombies.is_some(),
        "{:?}",
        osps_testkit::zombies_of(&[inst.pid()])
    );
    assert_eq!(inst.client().call("upper", &[], b"on").unwrap(), b"ON");
}

#[test]
fn a_pool_runs_with_its_own_environment_and_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let place = std::fs::canonicalize(dir.path()).unwrap();
    let (_cfg, path) = config_file(&format!(
        "[pools.builtin]\nworkers = 1\n\n[pools.where]\nexec = [\"sh\", \"-c\", \"printf '%s %s' \\\"$GREETING\\\" \\\"$(pwd)\\\"\"]\nops = [\"where\"]\nworkers = 1\nenv = {{ GREETING = \"hello there\" }}\ncwd = \"{}\"\n",
        place.display()
    ));
    let inst = start("pool-envcwd", &path);
    let got = inst.client().call("where", &[], b"").unwrap();
    assert_eq!(
        String::from_utf8(got).unwrap(),
        format!("hello there {}", place.display())
    );
    // The builtin pool keeps the dispatcher's.
    assert_eq!(inst.client().call("upper", &[], b"x").unwrap(), b"X");
}
