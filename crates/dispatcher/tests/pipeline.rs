//! End-to-end tests of the pipeline with the real binaries: client → socket →
//! dispatcher → pipe → worker (payload in the segment) → back.

use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::{Duration, Instant};

use ipc_core::ErrorKind;
use nix::sys::signal::Signal;
use osps_client::ClientError;
use osps_testkit::{sha256_line, wait_for, zombies_of, Instance, PATIENCE};

const SMALL: &[&str] = osps_testkit::args!(2, 32, 8388608);

/// Deterministic bytes of varied length and content.
fn payload(seed: u64, max_len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let len = (x as usize >> 7) % max_len;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn remote_kind(e: ClientError) -> ErrorKind {
    match e {
        ClientError::Remote(r) => r.kind,
        other => panic!("expected a remote error, got {other}"),
    }
}

#[test]
fn hundred_clients_hundred_requests_each_all_correct() {
    let inst = Instance::start("hundred", SMALL);
    let handles: Vec<_> = (0..100u64)
        .map(|t| {
            let mut c = inst.client();
            thread::spawn(move || {
                for i in 0..100u64 {
                    let data = payload(t * 1000 + i, 4096);
                    match (t + i) % 4 {
                        0 => assert_eq!(c.call("echo", &[], &data).unwrap(), data),
                        1 => assert_eq!(
                            c.call("upper", &[], &data).unwrap(),
                            data.to_ascii_uppercase()
                        ),
                        2 => assert_eq!(c.call("sha256", &[], &data).unwrap(), sha256_line(&data)),
                        _ => assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let s = inst.status();
    assert_eq!(s.jobs_done, 10_000);
    assert_eq!(s.jobs_failed, 0);
    assert_eq!(s.segment.slots_in_use, 0, "every slot returned");
}

#[test]
fn pipelined_requests_on_one_connection_all_answered() {
    let inst = Instance::start("pipeline", SMALL);
    let mut c = inst.client();
    let inputs: Vec<Vec<u8>> = (0..300).map(|i| payload(i, 2000)).collect();
    let ids: Vec<u64> = inputs
        .iter()
        .map(|d| c.send("upper", &[], d).unwrap())
        .collect();
    // Collect in arrival order, then check each against its request.
    let mut got = std::collections::HashMap::new();
    for _ in 0..ids.len() {
        let r = c.recv().unwrap();
        got.insert(r.id, r.result.unwrap());
    }
    for (id, data) in ids.iter().zip(&inputs) {
        assert_eq!(got[id], data.to_ascii_uppercase());
    }
}

#[test]
fn eight_mib_sha256_matches() {
    let inst = Instance::start("sha8", SMALL);
    let data = payload(42, 1 << 20)
        .into_iter()
        .cycle()
        .take(8 << 20)
        .collect::<Vec<u8>>();
    assert_eq!(data.len(), 8 << 20);
    let mut c = inst.client();
    assert_eq!(c.call("sha256", &[], &data).unwrap(), sha256_line(&data));
    // And the same bytes come back intact through echo.
    assert!(c.call("echo", &[], &data).unwrap() == data);
}

#[test]
fn a_job_past_the_timeout_gets_a_timeout_while_others_are_served() {
    let inst = Instance::start(
        "timeout",
        osps_testkit::args!(2, 8, 65536, "--job-timeout-ms", "700"),
    );
    let mut slow = inst.client();
    let slow_job = thread::spawn(move || {
        let t = Instant::now();
        (slow.call("sleep", &["30000"], &[]), t.elapsed())
    });
    inst.wait_status("a worker picks up the slow job", |s| {
        s.workers.iter().any(|w| w.state == "busy")
    });
    let mut fast = inst.client();
    for i in 0..50u64 {
        let d = payload(i, 500);
        assert_eq!(fast.call("echo", &[], &d).unwrap(), d);
    }
    let (res, took) = slow_job.join().unwrap();
    assert_eq!(remote_kind(res.unwrap_err()), ErrorKind::Timeout);
    assert!(
        took < Duration::from_secs(20),
        "timeout answered after {took:?}"
    );
    // The hung worker was replaced and the pool serves again.
    inst.wait_status("the hung worker is replaced", |s| {
        s.workers.iter().map(|w| w.restarts).sum::<u64>() == 1
            && s.workers.iter().all(|w| w.state == "idle")
    });
    assert_eq!(fast.call("ping", &[], &[]).unwrap(), b"pong\n");
}

#[test]
fn sigkill_of_a_busy_worker_still_answers_and_respawns() {
    let inst = Instance::start("killworker", osps_testkit::args!(1, 8, 65536));
    let old_pid = inst.worker_pids()[0];
    let mut c = inst.client();
    let job = thread::spawn(move || c.call("sleep", &["800"], &[]));
    inst.wait_status("worker busy", |s| s.workers[0].state == "busy");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), Signal::SIGKILL).unwrap();
    // The job is retried once on the replacement, so the client gets the real answer.
    assert_eq!(job.join().unwrap().unwrap(), b"slept 800 ms\n");
    let s = inst.status();
    assert_ne!(s.workers[0].pid, old_pid, "a new worker serves");
    assert_eq!(s.workers[0].restarts, 1);
    assert!(
        zombies_of(&[inst.pid()]).is_empty(),
        "the dead worker was reaped"
    );
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
}

#[test]
fn crash_is_refused_without_fault_injection_and_retried_once_with_it() {
    let off = Instance::start("crashoff", SMALL);
    assert_eq!(
        remote_kind(off.client().call("crash", &[], &[]).unwrap_err()),
        ErrorKind::FaultInjectionDisabled
    );
    assert_eq!(
        off.status().workers.iter().map(|w| w.restarts).sum::<u64>(),
        0
    );

    let mut args = SMALL.to_vec();
    args.push("--allow-fault-injection");
    let on = Instance::start("crashon", &args);
    let mut c = on.client();
    assert_eq!(
        remote_kind(c.call("crash", &[], &[]).unwrap_err()),
        ErrorKind::WorkerCrashed
    );
    // Two attempts, two dead workers, both replaced; the service goes on.
    on.wait_status("two restarts", |s| {
        s.workers.iter().map(|w| w.restarts).sum::<u64>() == 2
    });
    assert_eq!(c.call("upper", &[], b"still here").unwrap(), b"STILL HERE");
    assert!(zombies_of(&[on.pid()]).is_empty());
}

#[test]
fn sigterm_drains_exits_zero_and_leaves_nothing() {
    let mut inst = Instance::start("sigterm", SMALL);
    let dispatcher = inst.pid();
    let workers = inst.worker_pids();
    let mut c = inst.client();
    assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    // A job in flight when SIGTERM arrives is finished, not dropped.
    let id = c.send("sleep", &["400"], &[]).unwrap();
    inst.wait_status("busy", |s| s.workers.iter().any(|w| w.state == "busy"));
    let t = Instant::now();
    inst.signal(Signal::SIGTERM);
    assert_eq!(c.wait(id).unwrap(), b"slept 400 ms\n");
    let status = inst
        .wait_exit(Duration::from_secs(10))
        .expect("dispatcher exits within 10 s");
    assert_eq!(status.code(), Some(0), "log:\n{}", inst.log());
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(zombies_of(&[dispatcher]).is_empty());
    for w in workers {
        assert!(
            osps_testkit::proc_info(w).is_none(),
            "worker {w} still exists"
        );
    }
    assert_eq!(inst.leftovers(), Vec::<String>::new());
    assert!(!inst.paths.lock_file().exists(), "lock file removed");
    assert!(inst.log().contains("dispatcher stopped"));
}

#[test]
fn a_second_dispatcher_is_refused_naming_the_first() {
    let inst = Instance::start("second", SMALL);
    let out = std::process::Command::new(osps_testkit::bin("osps-dispatcher"))
        .args(["--instance", inst.name(), "--runtime-dir"])
        .arg(inst.runtime_dir())
        .args(SMALL)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {}", inst.pid())),
        "message names the live pid: {err}"
    );
    // The first one is untouched.
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
    assert!(inst.paths.segment_path().exists());
}

#[test]
fn stale_segment_and_socket_of_a_dead_predecessor_are_replaced() {
    let inst = Instance::start_with("stale", SMALL, |paths| {
        paths.ensure_dir().unwrap();
        // Leave a segment and its record behind, as a crashed dispatcher would.
        let name = paths.new_segment_name().unwrap();
        paths
            .write_state(&ipc_core::paths::InstanceState {
                generation: 41,
                segments: vec![ipc_core::paths::RecordedSegment {
                    name: name.clone(),
                    owner: nix::unistd::geteuid().as_raw(),
                }],
            })
            .unwrap();
        let mut seg = ipc_core::Segment::create(&name, 4096, 41).unwrap();
        seg.disown();
        drop(std::os::unix::net::UnixListener::bind(paths.socket()).unwrap()); // a dead socket file
    });
    let s = inst.status();
    assert_eq!(
        s.segment.generation, 42,
        "rebuilt from the predecessor's generation"
    );
    assert_eq!(s.segment.size, 4096 + (32 << 20));
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
    assert!(inst
        .log()
        .contains("removed the segment of a dead predecessor"));
    assert!(inst
        .log()
        .contains("removed the socket of a dead predecessor"));
}

#[test]
fn a_thousand_open_connections_are_all_served() {
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if soft < 2200 {
        nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            hard.min(4096).max(soft),
            hard,
        )
        .unwrap();
    }
    let inst = Instance::start("thousand", SMALL);
    let mut clients: Vec<_> = (0..1000).map(|_| inst.client()).collect();
    assert!(inst.status().connections >= 1000);
    let ids: Vec<u64> = clients
        .iter_mut()
        .map(|c| c.send("ping", &[], &[]).unwrap())
        .collect();
    for (c, id) in clients.iter_mut().zip(ids) {
        assert_eq!(c.wait(id).unwrap(), b"pong\n");
    }
}

#[test]
fn tcp_on_loopback_serves_and_other_addresses_are_refused() {
    let mut args = SMALL.to_vec();
    args.extend(["--tcp", "127.0.0.1:0"]);
    let inst = Instance::start("tcp", &args);
    let addr = inst.status().tcp.expect("tcp address in status");
    let mut c = osps_client::Client::connect(&format!("tcp:{addr}").parse().unwrap()).unwrap();
    assert_eq!(c.call("upper", &[], b"over tcp").unwrap(), b"OVER TCP");

    // Not loopback: needs --tcp-allow-remote, and that needs a private token file.
    let dir = tempfile::tempdir().unwrap();
    let loose = dir.path().join("loose");
    std::fs::write(&loose, "0123456789abcdef0123").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (extra, why) in [
        (vec![], "not a loopback address"),
        (vec!["--tcp-allow-remote"], "needs --token-file"),
        (
            vec![
                "--tcp-allow-remote",
                "--token-file",
                loose.to_str().unwrap(),
            ],
            "chmod 600",
        ),
    ] {
        let out = std::process::Command::new(osps_testkit::bin("osps-dispatcher"))
            .args(["--instance", "tcp-refused", "--runtime-dir"])
            .arg(inst.runtime_dir())
            .args(["--tcp", "0.0.0.0:0"])
            .args(&extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{extra:?}: {stderr}"
        );
    }
}

/// A dispatcher (`SMALL` and `extra`, which must open a TCP port) whose TCP
/// clients need `token`. Returns it, the directory holding the token file
/// (`token`; keep it alive), and the address its TCP port is bound to.
fn with_token(
    tag: &str,
    token: &[u8],
    extra: &[&str],
) -> (Instance, tempfile::TempDir, std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    osps_testkit::write_token_file(&token_file, token);
    let mut args = SMALL.to_vec();
    args.extend_from_slice(extra);
    args.extend(["--token-file", token_file.to_str().unwrap()]);
    let inst = Instance::start(tag, &args);
    let addr = inst.status().tcp.expect("tcp address in status");
    (inst, dir, addr.parse().unwrap())
}

#[test]
fn a_remote_tcp_port_admits_only_clients_with_the_token() {
    let token = b"s3cret-token-for-the-remote-port-test";
    let remote = ["--tcp", "0.0.0.0:0", "--tcp-allow-remote"];
    let (inst, dir, addr) = with_token("tcp-token", token, &remote);
    let token_file = dir.path().join("token");
    let port = addr.port();
    let ep: ipc_core::Endpoint = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    // A Unix-socket client needs no token (its uid is checked instead).
    let mut local = inst.client();

    let mut good = osps_client::Client::connect_with_token(&ep, Some(token)).unwrap();
    assert_eq!(good.call("upper", &[], b"admitted").unwrap(), b"ADMITTED");
    let mut wrong = token.to_vec();
    wrong[5] ^= 1;
    for presented in [None, Some(&wrong[..]), Some(&token[..10])] {
        match osps_client::Client::connect_with_token(&ep, presented) {
            Err(osps_client::ClientError::Denied(line)) => {
                assert!(line.contains("token"), "{line}")
            }
            other => panic!("{presented:?} was not denied: {other:?}"),
        }
        assert_eq!(good.call("ping", &[], &[]).unwrap(), b"pong\n");
        assert_eq!(local.call("ping", &[], &[]).unwrap(), b"pong\n");
    }
    // The command-line client reads the token file, and is not retried when denied.
    let cli = |file: &std::path::Path| {
        std::process::Command::new(osps_testkit::bin("osps-client"))
            .args([
                "--connect",
                &format!("tcp:127.0.0.1:{port}"),
                "--token-file",
            ])
            .arg(file)
            .args(["run", "upper"])
            .output()
            .unwrap()
    };
    let out = cli(&token_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = dir.path().join("other");
    osps_testkit::write_token_file(&other, b"not-the-token-of-this-dispatcher");
    let started = std::time::Instant::now();
    let out = cli(&other);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("wrong token"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a denied client must not retry for its whole deadline (took {:?})",
        started.elapsed()
    );
}

#[test]
fn the_same_instance_name_in_two_runtime_directories_runs_twice_without_interference() {
    let name = osps_testkit::unique_instance("twodirs");
    let a = Instance::start_named(&name, SMALL);
    let b = Instance::start_named(&name, SMALL);
    assert_ne!(a.status().segment.name, b.status().segment.name);
    assert!(
        a.paths.segment_path().exists(),
        "starting B did not remove A's segment"
    );
    // A replaces a worker: the new one must work in A's segment, not B's.
    let victim = a.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    a.wait_status("replaced", |s| {
        s.workers
            .iter()
            .all(|w| w.state == "idle" && w.pid != victim)
    });
    for i in 0..20u64 {
        let d = payload(i, 3000);
        assert_eq!(a.client().call("sha256", &[], &d).unwrap(), sha256_line(&d));
        assert_eq!(
            b.client().call("upper", &[], &d).unwrap(),
            d.to_ascii_uppercase()
        );
    }
}

#[test]
fn at_shutdown_a_request_waiting_for_a_slot_is_answered_not_reset() {
    // Two slots' worth of arena: two long jobs take them, a third request
    // waits. (All three from one uid: let it hold the whole arena.)
    let mut inst = Instance::start(
        "slotwait",
        osps_testkit::args!(
            2,
            1,
            400000,
            "--drain-timeout-ms",
            "300",
            "--peer-arena-percent",
            "100"
        ),
    );
    let big = vec![b'x'; 400_000];
    let long: Vec<_> = (0..2)
        .map(|_| {
            let mut c = inst.client();
            let big = big.clone();
            thread::spawn(move || c.call("sleep", &["5000"], &big))
        })
        .collect();
    inst.wait_status("both slots taken", |s| s.segment.slots_in_use == 2);
    let mut c = inst.client();
    let waiting = {
        let big = big.clone();
        thread::spawn(move || c.call("sha256", &[], &big))
    };
    thread::sleep(Duration::from_millis(200)); // let it reach the wait for a slot
    assert_eq!(inst.status().segment.slots_in_use, 2);
    inst.signal(Signal::SIGTERM);
    assert_eq!(
        remote_kind(waiting.join().unwrap().unwrap_err()),
        ErrorKind::ShuttingDown
    );
    for h in long {
        // The drain deadline (300 ms) is shorter than the jobs: they are cut short, with an answer.
        assert_eq!(
            remote_kind(h.join().unwrap().unwrap_err()),
            ErrorKind::ShuttingDown
        );
    }
    let status = inst.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert_eq!(inst.leftovers(), Vec::<String>::new());
}

/// A dispatcher with one worker, kept busy by a 300 ms `sleep` (whose id is
/// returned), so the jobs sent next queue up and go to it as one batch.
fn one_busy_worker(tag: &str, extra: &[&str]) -> (Instance, osps_client::Client, u64) {
    let mut args = osps_testkit::args!(1, 8, 65536).to_vec();
    args.extend_from_slice(extra);
    let inst = Instance::start(tag, &args);
    let mut c = inst.client();
    let busy = c.send("sleep", &["300"], &[]).unwrap();
    inst.wait_status("busy", |s| s.workers[0].state == "busy");
    (inst, c, busy)
}

#[test]
fn jobs_batched_behind_a_crashing_job_are_requeued_without_losing_an_attempt() {
    let (inst, mut c, busy) = one_busy_worker("batch", &["--allow-fault-injection"]);
    let crash = c.send("crash", &[], &[]).unwrap();
    let uppers: Vec<(u64, Vec<u8>)> = (0..5u64)
        .map(|i| {
            let d = payload(i + 7, 500);
            (c.send("upper", &[], &d).unwrap(), d)
        })
        .collect();
    assert_eq!(c.wait(busy).unwrap(), b"slept 300 ms\n");
    // The crash kills two workers (first run and its one retry) ...
    assert_eq!(
        remote_kind(c.wait(crash).unwrap_err()),
        ErrorKind::WorkerCrashed
    );
    // ... and the jobs that waited behind it are run by the next worker, correctly.
    for (id, d) in uppers {
        assert_eq!(c.wait(id).unwrap(), d.to_ascii_uppercase());
    }
    let s = inst.status();
    assert_eq!(s.workers[0].restarts, 2);
    assert_eq!(s.jobs_failed, 1);
    // The uppers were batched behind the crash (then again behind nothing
    // once requeued, as the lone worker ran them one after another).
    assert!(s.jobs_sent_ahead >= 5, "{}", s.jobs_sent_ahead);
    assert!(zombies_of(&[inst.pid()]).is_empty());
}

#[test]
fn a_job_batched_before_a_crashing_one_gets_its_own_answer() {
    let (inst, mut c, busy) = one_busy_worker("blamecrash", &["--allow-fault-injection"]);
    let up = c.send("upper", &[], b"abc").unwrap();
    let crash = c.send("crash", &[], &[]).unwrap();
    c.wait(busy).unwrap();
    // The crash must be blamed on `crash`, not on the job answered before it.
    assert_eq!(c.wait(up).unwrap(), b"ABC");
    assert_eq!(
        remote_kind(c.wait(crash).unwrap_err()),
        ErrorKind::WorkerCrashed
    );
    // Its worker is replaced once reaped, after the answer.
    inst.wait_status("the crash's two attempts", |s| s.workers[0].restarts >= 2);
    assert_eq!(
        inst.status().workers[0].restarts,
        2,
        "the crash's two attempts, nothing more"
    );
}

#[test]
fn a_job_batched_before_a_hanging_one_gets_its_own_answer() {
    let (_inst, mut c, busy) = one_busy_worker("blamehang", &["--job-timeout-ms", "1000"]);
    let ping = c.send("ping", &[], &[]).unwrap();
    let slow = c.send("sleep", &["3000"], &[]).unwrap();
    c.wait(busy).unwrap();
    assert_eq!(
        c.wait(ping).unwrap(),
        b"pong\n",
        "answered, not timed out with the sleep behind it"
    );
    assert_eq!(remote_kind(c.wait(slow).unwrap_err()), ErrorKind::Timeout);
}

#[test]
fn large_requests_and_answers_cannot_wedge_a_worker_or_shutdown() {
    let mut inst = Instance::start(
        "bigframes",
        osps_testkit::args!(
            1,
            8,
            65536,
            "--job-timeout-ms",
            "2000",
            "--drain-timeout-ms",
            "1000"
        ),
    );
    let mut c = inst.client();
    // Unknown operations with 50 KB names: big job frames, and errors that echo them.
    let op = "x".repeat(50_000);
    let ids: Vec<u64> = (0..9).map(|_| c.send(&op, &[], &[]).unwrap()).collect();
    for id in ids {
        match c.wait(id) {
            Err(ClientError::Remote(e)) => {
                assert_eq!(e.kind, ErrorKind::UnknownOp);
                assert!(
                    e.message.len() <= 1100,
                    "error messages are capped: {} bytes",
                    e.message.len()
                );
            }
            other => panic!("request {id}: {other:?}"),
        }
    }
    inst.signal(Signal::SIGTERM);
    assert_eq!(
        inst.wait_exit(Duration::from_secs(20))
            .expect("exits")
            .code(),
        Some(0)
    );
}

#[test]
fn jobs_are_not_batched_while_a_worker_is_idle() {
    let inst = Instance::start("nobatch", osps_testkit::args!(4, 8, 65536));
    let mut c = inst.client();
    // Three jobs at a time for four workers: each goes to an idle worker,
    // none is queued behind another (bursts arrive together in one read).
    for round in 0..30u64 {
        let ids: Vec<(u64, Vec<u8>)> = (0..3)
            .map(|i| {
                let d = payload(round * 3 + i, 64);
                (c.send("upper", &[], &d).unwrap(), d)
            })
            .collect();
        for (id, d) in ids {
            assert_eq!(c.wait(id).unwrap(), d.to_ascii_uppercase());
        }
    }
    let s = inst.status();
    assert_eq!((s.jobs_done, s.jobs_sent_ahead), (90, 0));
}

#[test]
fn silent_or_denied_tcp_peers_do_not_lock_out_admitted_clients() {
    let token = b"a-token-for-the-lockout-test-0123";
    let (inst, _dir, addr) = with_token(
        "lockout",
        token,
        &["--max-connections", "8", "--tcp", "127.0.0.1:0"],
    );
    let ep: ipc_core::Endpoint = format!("tcp:{addr}").parse().unwrap();

    // More silent peers than the whole connection limit, and more than the
    // TCP handshake budget; and as many that fail the token.
    let silent: Vec<_> = (0..200)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    for _ in 0..20 {
        let _ = osps_client::Client::connect_with_token(&ep, Some(b"wrong-token-wrong-token"));
    }
    // Admitted clients on the Unix socket are still served, up to the limit.
    let mut locals: Vec<_> = (0..8).map(|_| inst.client()).collect();
    for c in &mut locals {
        assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    }
    drop(locals);
    // Once the silent peers are gone, a client with the token is admitted.
    drop(silent);
    let mut good = wait_for(PATIENCE, || {
        osps_client::Client::connect_with_token(&ep, Some(token)).ok()
    })
    .expect("the token client is admitted once the flood is gone");
    assert_eq!(good.call("upper", &[], b"in").unwrap(), b"IN");
}
