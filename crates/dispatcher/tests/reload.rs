//! Configuration reload (SIGHUP, `osps-client reload`): under load from 16
//! clients a reload gives a command pool another binary and resizes the
//! builtin pool (workers and segment) with no request failed, the new pids
//! and program in status, the old workers reaped and the old segments
//! gone; a file that does not parse, or validates wrong (two pools serving
//! one operation, a zero worker count), starts a pool that cannot start,
//! or changes a restart-only option, is refused with its reason and
//! nothing changes; another uid, or a TCP
//! client, is denied; a dispatcher without `--config` says it has no file;
//! SIGHUP to the watchdog reaches the dispatcher, and a job running on an
//! old worker is answered before that worker stops.

mod nobody;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc_core::proto::{ErrorKind, OP_RELOAD};
use ipc_core::status::StatusReport;
use nix::sys::signal::Signal;
use osps_client::ClientError;
use osps_testkit::{client_command, config_file, recorded_segments, wait_for, Instance};

/// The first configuration: the builtin pool (2 workers, 8 MiB) and a
/// command pool `shout` running `tr`.
const FIRST: &str = "max_payload = 65536\n\n[pools.builtin]\nworkers = 2\nsegment_mib = 8\n\n[pools.cmd]\nexec = [\"tr\", \"a-z\", \"A-Z\"]\nops = [\"shout\"]\nworkers = 2\nsegment_mib = 8\n";

/// The second: `shout` by another binary (awk), and the builtin pool
/// resized to 3 workers and a 16 MiB segment.
const SECOND: &str = "max_payload = 65536\n\n[pools.builtin]\nworkers = 3\nsegment_mib = 16\n\n[pools.cmd]\nexec = [\"awk\", \"{ print toupper($0) }\"]\nops = [\"shout\"]\nworkers = 2\nsegment_mib = 8\n";

fn start(tag: &str, text: &str) -> (tempfile::TempDir, PathBuf, Instance) {
    let (dir, path) = config_file(text);
    let inst = Instance::start(tag, &["--config", path.to_str().unwrap()]);
    (dir, path, inst)
}

/// `osps-client reload` against `inst`: exit code, stdout, stderr.
fn reload_cli(inst: &Instance) -> (Option<i32>, String, String) {
    let out = client_command(inst.name(), inst.runtime_dir())
        .arg("reload")
        .output()
        .expect("osps-client runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pool<'a>(st: &'a StatusReport, name: &str) -> &'a ipc_core::status::PoolStatus {
    st.pools
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pool {name} in {st:?}"))
}

fn pids(st: &StatusReport, name: &str) -> BTreeSet<u32> {
    st.workers
        .iter()
        .filter(|w| w.pool == name)
        .map(|w| w.pid)
        .collect()
}

/// Every segment name of the instance: in the state file and in /dev/shm.
fn segments(inst: &Instance) -> BTreeSet<String> {
    let mut all: BTreeSet<String> = recorded_segments(&inst.paths).into_iter().collect();
    all.extend(
        osps_testkit::instance_segments(&inst.paths)
            .iter()
            .map(|p| format!("/{}", p.file_name().unwrap().to_str().unwrap())),
    );
    all
}

/// 16 clients, each a loop of requests to both pools, each answer checked.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(inst: &Instance) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..16)
            .map(|t| {
                let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
                let endpoint = inst.endpoint();
                std::thread::spawn(move || {
                    let mut c = osps_client::Client::connect(&endpoint).expect("connects");
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let text = format!("client {t} request {i}\n");
                        let (op, want) = if i.is_multiple_of(2) {
                            ("shout", text.to_uppercase().into_bytes())
                        } else {
                            ("wc", osps_testkit::wc_line(text.as_bytes()))
                        };
                        match c.call(op, &[], text.as_bytes()) {
                            Ok(got) if got == want => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures
                                .lock()
                                .unwrap()
                                .push(format!("client {t} {op} #{i}: {other:?}")),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            done,
            failures,
            threads,
        }
    }

    /// Stops the clients; returns the requests answered right, and the failures.
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("a client thread");
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (self.done.load(Ordering::Relaxed), failures)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn wait_answered(load: &Load, more_than: u64) {
    let reached = wait_for(Duration::from_secs(30), || {
        (load.done.load(Ordering::Relaxed) > more_than).then_some(())
    });
    assert!(reached.is_some(), "the clients are not served");
}

#[test]
fn under_load_a_reload_replaces_a_program_and_resizes_a_pool_with_no_request_failed() {
    let (_dir, path, inst) = start("rl-load", FIRST);
    let before = inst.status();
    assert_eq!(pool(&before, "cmd").program, ["tr", "a-z", "A-Z"]);
    let (old_builtin, old_cmd) = (pids(&before, "builtin"), pids(&before, "cmd"));
    let old_segments = segments(&inst);
    assert_eq!(old_segments.len(), 2, "{old_segments:?}");

    let load = Load::start(&inst);
    wait_answered(&load, 500);
    std::fs::write(&path, SECOND).unwrap();
    let asked = std::time::Instant::now();
    let (code, out, err) = reload_cli(&inst);
    let took = asked.elapsed();
    assert_eq!(code, Some(0), "stdout {out} stderr {err}");
    assert!(out.contains("replaced builtin, cmd"), "{out}");
    let at_reload = load.done.load(Ordering::Relaxed);

    // Under the same load: the old workers are reaped, their segments
    // gone (from the state file and /dev/shm).
    let gone = wait_for(Duration::from_secs(20), || {
        let dead = old_builtin
            .iter()
            .chain(&old_cmd)
            .all(|&pid| osps_testkit::proc_info(pid).is_none());
        let now = segments(&inst);
        (dead && now.is_disjoint(&old_segments) && now.len() == 2).then_some(now)
    });
    assert!(
        gone.is_some(),
        "old workers or segments left: {:?}",
        (segments(&inst), &old_segments)
    );
    let retired = load.done.load(Ordering::Relaxed);
    wait_answered(&load, retired + 500);
    let (done, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    println!(
        "{done} requests answered right: {at_reload} before the reload (answered in {took:?}), {} until the old pools were gone, {} after",
        retired - at_reload,
        done - retired
    );

    // The new workers and program; the builtin pool resized.
    let after = inst.status();
    assert_eq!(
        pool(&after, "cmd").program,
        ["awk", "{ print toupper($0) }"]
    );
    let (new_builtin, new_cmd) = (pids(&after, "builtin"), pids(&after, "cmd"));
    assert_eq!((new_builtin.len(), new_cmd.len()), (3, 2), "{after:?}");
    assert!(new_builtin.is_disjoint(&old_builtin) && new_cmd.is_disjoint(&old_cmd));
    assert_eq!(pool(&after, "builtin").workers, 3);
    let size = |st: &StatusReport| osps_testkit::pool_segment(st, "builtin").size;
    assert!(
        size(&after) > size(&before) + (7 << 20),
        "{} -> {}",
        size(&before),
        size(&after)
    );
    let reload = after.reload.clone().expect("the reload in status");
    assert_eq!((reload.applied, reload.refused), (1, 0), "{reload:?}");
    assert_eq!(inst.status().reload.unwrap().retiring_workers, 0);
}

#[test]
fn a_broken_configuration_is_refused_with_its_reason_and_nothing_changes() {
    let (_dir, path, inst) = start("rl-broken", FIRST);
    let before = inst.status();
    let (old_pids, old_segments) = (inst.worker_pids(), segments(&inst));
    let unchanged = |what: &str| {
        let st = inst.status();
        assert_eq!(inst.worker_pids(), old_pids, "{what}: the workers changed");
        assert_eq!(pool(&st, "cmd").program, ["tr", "a-z", "A-Z"], "{what}");
        assert_eq!(
            segments(&inst),
            old_segments,
            "{what}: the segments changed"
        );
        assert_eq!(
            inst.client().call("shout", &[], b"still\n").unwrap(),
            b"STILL\n"
        );
    };
    let refused = [
        // A syntax error: named with its line.
        ("workers = 2\n[pools.cmd\n", "osps.toml:2"),
        // Two pools serving one operation (the builtin pool serves upper).
        (
            &FIRST.replace("ops = [\"shout\"]", "ops = [\"upper\"]")[..],
            "serves operation \"upper\", which pool \"builtin\"",
        ),
        // A value out of range.
        (
            &FIRST.replace("builtin]\nworkers = 2", "builtin]\nworkers = 0")[..],
            "workers",
        ),
        // A new pool whose program never says it is ready: its segment
        // and its workers go, the running pools stay.
        (
            &format!("{FIRST}\n[pools.bad]\nprogram = [\"true\"]\n")[..],
            "pool \"bad\"",
        ),
        // An option only a restart applies.
        (
            &format!("max_in_flight = 7\n{FIRST}")[..],
            "max_in_flight cannot change while the dispatcher runs",
        ),
        // The metrics' port too (a reload was accepted and did nothing).
        (
            &format!("metrics_listen = \"127.0.0.1:0\"\n{FIRST}")[..],
            "metrics_listen cannot change while the dispatcher runs",
        ),
    ];
    for (text, reason) in refused {
        std::fs::write(&path, text).unwrap();
        let (code, out, err) = reload_cli(&inst);
        assert_eq!(code, Some(1), "{text}: stdout {out} stderr {err}");
        assert!(
            err.contains("invalid input") && err.contains(reason),
            "{text}: {err}"
        );
        unchanged(text);
    }
    // SIGHUP to a dispatcher alone: refused the same way, logged.
    std::fs::write(&path, "[pools.cmd\n").unwrap();
    inst.signal(Signal::SIGHUP);
    let logged = wait_for(Duration::from_secs(10), || {
        (inst.log().matches("reload refused").count() >= 7).then_some(())
    });
    assert!(logged.is_some(), "{}", inst.log());
    unchanged("SIGHUP");
    let st = inst.status().reload.unwrap();
    assert_eq!((st.applied, st.refused), (0, 7), "{st:?}");
    assert!(st.last.starts_with("refused: "), "{st:?}");
    assert_eq!(inst.status().pools.len(), before.pools.len());
}

#[test]
fn sighup_to_the_watchdog_reloads_the_dispatcher() {
    let (_dir, path) = config_file(FIRST);
    let inst = Instance::supervised("rl-hup", &[], &["--config", path.to_str().unwrap()]);
    let old = pids(&inst.status(), "cmd");
    // A job running on an old worker when the reload comes.
    let endpoint = inst.endpoint();
    let sleeper = std::thread::spawn(move || {
        let mut c = osps_client::Client::connect(&endpoint).expect("connects");
        c.call("sleep", &["1500"], b"")
    });
    inst.wait_status("the sleep runs", |st| {
        st.workers
            .iter()
            .any(|w| w.state == ipc_core::status::WorkerState::Busy)
    });
    std::fs::write(&path, SECOND).unwrap();
    inst.signal(Signal::SIGHUP); // the watchdog
    let after = inst.wait_status("the reload applied", |st| {
        st.pools
            .iter()
            .any(|p| p.name == "cmd" && p.program[0] == "awk")
            && st.workers.iter().filter(|w| w.pool == "builtin").count() == 3
            && st.workers.iter().all(|w| w.pid != 0)
    });
    assert!(pids(&after, "cmd").is_disjoint(&old));
    assert_eq!(
        inst.client().call("shout", &[], b"hup\n").unwrap(),
        b"HUP\n"
    );
    // The old worker finishes its job before it stops.
    let retiring = after.reload.expect("the reload in status").retiring_workers;
    assert!(retiring >= 1, "{retiring}");
    assert_eq!(sleeper.join().unwrap().unwrap(), b"slept 1500 ms\n");
    inst.wait_status("the old workers stopped", |st| {
        st.reload.as_ref().is_some_and(|r| r.retiring_workers == 0)
    });
}

#[test]
fn without_a_configuration_file_or_over_tcp_a_reload_is_refused() {
    let inst = Instance::start(
        "rl-none",
        &[
            "--workers",
            "1",
            "--segment-mib",
            "8",
            "--max-payload",
            "65536",
            "--tcp",
            "127.0.0.1:0",
        ],
    );
    let said = |r: Result<Vec<u8>, ClientError>| match r {
        Err(ClientError::Remote(e)) => (e.kind, e.message),
        other => panic!("an error expected, got {other:?}"),
    };
    let (kind, message) = said(inst.client().call(OP_RELOAD, &[], b""));
    assert_eq!(kind, ErrorKind::InvalidInput);
    assert!(message.contains("started without --config"), "{message}");
    let (kind, message) = said(inst.client().call(OP_RELOAD, &[], b"payload"));
    assert_eq!(
        (kind, message.as_str()),
        (ErrorKind::BadRequest, "reload takes no payload")
    );
    let tcp = inst.status().tcp.expect("a TCP address");
    let endpoint = ipc_core::Endpoint::Tcp(tcp.parse().unwrap());
    let mut c = osps_client::Client::connect(&endpoint).expect("a TCP client connects");
    let (kind, message) = said(c.call(OP_RELOAD, &[], b""));
    assert_eq!(kind, ErrorKind::PermissionDenied, "{message}");
    assert!(message.contains("may not"), "{message}");
}

#[test]
fn another_uid_may_not_reload() {
    use std::os::unix::fs::PermissionsExt;
    if !nobody::root_or_skip("reloading as nobody") {
        return;
    }
    let (_dir, path) = config_file(FIRST);
    let uid = nobody::NOBODY.to_string();
    let inst = Instance::start(
        "rl-uid",
        &["--config", path.to_str().unwrap(), "--allow-uid", &uid],
    );
    for p in [inst.runtime_dir(), inst.paths.dir()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bin = tempfile::Builder::new()
        .prefix("osps-rl-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let client = nobody::copy_bin("osps-client", bin.path());
    let old = inst.worker_pids();
    std::fs::write(&path, SECOND).unwrap();
    let mut cmd = nobody::as_nobody(&client);
    cmd.arg("--connect")
        .arg(format!("unix:{}", inst.paths.socket().display()))
        .args(["--server-uid", "0", "reload"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // Killed and reaped even if an assertion fails first.
    let out = nobody::Proc(Some(cmd.spawn().expect("setpriv runs"))).output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("uid 65534 may not"),
        "{err}"
    );
    assert_eq!(inst.worker_pids(), old);
    assert!(inst.status().reload.is_none());
    // The owner may.
    let (code, out, err) = reload_cli(&inst);
    assert_eq!(code, Some(0), "{out} {err}");
}

/// A series of `osps-client metrics`' text, as a number.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// A replaced pool's counters go on in its successor (same name): a
/// reload is no counter reset, and a job its old worker answers after the
/// reload is counted.
#[test]
fn a_reload_keeps_the_counters_of_a_replaced_pool() {
    let (_dir, path, inst) = start("rl-metrics", FIRST);
    let ok = "osps_jobs_total{pool=\"builtin\",outcome=\"ok\"}";
    let count = "osps_job_duration_seconds_count{pool=\"builtin\"}";
    let mut c = inst.client();
    assert_eq!(c.call("upper", &[], b"a").unwrap(), b"A");
    let endpoint = inst.endpoint();
    let sleeper = std::thread::spawn(move || {
        let mut c = osps_client::Client::connect(&endpoint).expect("connects");
        c.call("sleep", &["1000"], b"")
    });
    inst.wait_status("the sleep runs", |st| {
        st.workers
            .iter()
            .any(|w| w.state == ipc_core::status::WorkerState::Busy)
    });
    std::fs::write(&path, SECOND).unwrap();
    let (code, out, err) = reload_cli(&inst);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(metric(&c.metrics().unwrap(), ok), 1.0, "kept at the reload");
    assert_eq!(sleeper.join().unwrap().unwrap(), b"slept 1000 ms\n");
    assert_eq!(c.call("upper", &[], b"b").unwrap(), b"B");
    let text = c.metrics().unwrap();
    assert_eq!(metric(&text, ok), 3.0, "{text}");
    assert_eq!(metric(&text, count), 3.0, "{text}");
}

/// The file names the programs the pools run as the dispatcher's user, and
/// a reload (or a restart) reads it again: a file another user could have
/// written (group- or world-writable, or owned by another uid) is refused,
/// at start and at a reload, and nothing changes.
#[test]
fn a_configuration_file_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path, inst) = start("rl-trust", FIRST);
    let old_pids = inst.worker_pids();
    std::fs::write(&path, SECOND).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, out, err) = reload_cli(&inst);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("writable by other users"), "{err}");
    assert_eq!(inst.worker_pids(), old_pids, "nothing changed");
    assert_eq!(pool(&inst.status(), "cmd").program[0], "tr");
    let check = std::process::Command::new(osps_testkit::bin("osps-dispatcher"))
        .args(["--check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!check.status.success(), "--check-config accepted it");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err) = reload_cli(&inst);
    assert_eq!(code, Some(0), "{out}{err}");
}

/// A file broken after the last reload (which refused it) does not stop the
/// service at the next crash: the dispatcher the watchdog restarts serves
/// with the configuration applied last (kept in the runtime directory), and
/// a reload of the file, fixed, applies it.
#[test]
fn after_a_refused_reload_a_crash_restarts_with_the_configuration_applied_last() {
    let (_dir, path) = config_file(FIRST);
    let inst = Instance::supervised("rl-crash", &[], &["--config", path.to_str().unwrap()]);
    let applied = inst.paths.applied_config();
    assert_eq!(std::fs::read_to_string(&applied).unwrap(), FIRST);
    std::fs::write(&path, SECOND).unwrap();
    let (code, _, said) = reload_cli(&inst);
    assert_eq!(code, Some(0), "{said}");
    assert_eq!(std::fs::read_to_string(&applied).unwrap(), SECOND);
    std::fs::write(&path, "max_payload = 65536\nworkers = \n").unwrap();
    let (code, _, said) = reload_cli(&inst);
    assert_eq!(code, Some(1), "the broken file is refused: {said}");
    let old = inst.dispatcher_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    let st = inst.wait_status("a new dispatcher serves", |st| {
        st.dispatcher_pid != old && st.workers.iter().all(|w| w.pid != 0)
    });
    // SECOND, the configuration applied last: awk, three builtin workers.
    assert_eq!(pool(&st, "cmd").program[0], "awk", "{st:?}");
    assert_eq!(st.workers.iter().filter(|w| w.pool == "builtin").count(), 3);
    assert_eq!(inst.client().call("shout", &[], b"up\n").unwrap(), b"UP\n");
    // Fixed, the file is read again: FIRST (tr) applies.
    std::fs::write(&path, FIRST).unwrap();
    let (code, _, said) = reload_cli(&inst);
    assert_eq!(code, Some(0), "{said}");
    let st = inst.wait_status("tr again", |st| pool(st, "cmd").program[0] == "tr");
    assert_eq!(st.workers.iter().filter(|w| w.pool == "builtin").count(), 2);
    assert_eq!(std::fs::read_to_string(&applied).unwrap(), FIRST);
}

/// A reload adds a pool and removes another: the new one's operation is
/// served at once, the removed one's is an unknown operation, its workers
/// are reaped and its segment is gone; the pool kept is not touched.
#[test]
fn a_reload_adds_a_pool_and_removes_another() {
    let (_dir, path, inst) = start("rl-addrm", FIRST);
    let before = inst.status();
    let (builtin, cmd) = (pids(&before, "builtin"), pids(&before, "cmd"));
    let cmd_segment = osps_testkit::pool_segment(&before, "cmd").name.clone();
    let third = FIRST.replace(
        "[pools.cmd]\nexec = [\"tr\", \"a-z\", \"A-Z\"]\nops = [\"shout\"]",
        "[pools.rot]\nexec = [\"tr\", \"a-z\", \"n-za-m\"]\nops = [\"rot13\"]",
    );
    std::fs::write(&path, third).unwrap();
    let (code, out, said) = reload_cli(&inst);
    assert_eq!(code, Some(0), "{said}");
    assert!(out.contains("rot"), "the summary names the new pool: {out}");
    assert_eq!(
        inst.client().call("rot13", &[], b"abc\n").unwrap(),
        b"nop\n"
    );
    match inst.client().call("shout", &[], b"x\n") {
        Err(ClientError::Remote(e)) => assert_eq!(e.kind, ErrorKind::UnknownOp, "{e:?}"),
        other => panic!("shout after its pool was removed: {other:?}"),
    }
    let after = inst.wait_status("the removed pool's workers are gone", |st| {
        st.reload.as_ref().is_some_and(|r| r.retiring_workers == 0)
    });
    assert!(after.pools.iter().all(|p| p.name != "cmd"), "{after:?}");
    assert!(pids(&after, "cmd").is_empty());
    assert_eq!(pids(&after, "builtin"), builtin, "the builtin pool is kept");
    for pid in cmd {
        wait_for(osps_testkit::PATIENCE, || {
            (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })
        .unwrap_or_else(|| panic!("worker {pid} of the removed pool is still there"));
    }
    wait_for(osps_testkit::PATIENCE, || {
        (!segments(&inst).contains(&cmd_segment)).then_some(())
    })
    .expect("the removed pool's segment is gone");
}
