//! The listening sockets the watchdog holds across dispatcher restarts:
//! SIGKILL the dispatcher 20 times while clients connect in a loop without
//! any retry of their own, and no connection is refused or finds no socket
//! file; the TCP listener is held too; and a watchdog started by socket
//! activation (`systemd-socket-activate`) serves the socket it is given.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::{Client, ClientError};
use osps_testkit::{wait_for, Instance, PATIENCE};

const DISPATCHER: &[&str] = osps_testkit::args!(2, 16, 1048576);
const CLIENTS: u64 = 6;
const KILLS: u32 = 20;

/// What the clients saw, counted across threads.
#[derive(Default)]
struct Counts {
    connects: AtomicU64,
    refused: AtomicU64,
    no_such_file: AtomicU64,
    other_connect: AtomicU64,
    /// Connections the killed dispatcher had accepted: EOF (at the hello or
    /// after the request), then the request is sent again.
    lost: AtomicU64,
    answered: AtomicU64,
}

impl Counts {
    fn add(n: &AtomicU64) {
        n.fetch_add(1, Ordering::Relaxed);
    }
    fn get(n: &AtomicU64) -> u64 {
        n.load(Ordering::Relaxed)
    }
}

/// One connection, no retry: a failed connect is counted by its errno.
fn connect(inst: &Instance, counts: &Counts) -> Option<Client> {
    Counts::add(&counts.connects);
    match Client::connect_within(&inst.endpoint(), None, PATIENCE) {
        Ok(mut c) => {
            c.set_timeout(Some(PATIENCE)).expect("timeout");
            Some(c)
        }
        Err(ClientError::Connect { source, .. }) => {
            match source.kind() {
                ErrorKind::ConnectionRefused => Counts::add(&counts.refused),
                ErrorKind::NotFound => Counts::add(&counts.no_such_file),
                _ => {
                    eprintln!("connect: {source}");
                    Counts::add(&counts.other_connect)
                }
            }
            None
        }
        Err(e @ ClientError::ClosedAtHello { .. }) => {
            // Accepted by the dispatcher just killed, closed before its hello.
            eprintln!("lost at the hello: {e}");
            Counts::add(&counts.lost);
            None
        }
        Err(e) => {
            eprintln!("connect: {e}");
            Counts::add(&counts.other_connect);
            None
        }
    }
}

/// A client thread: a new connection per request; a request whose
/// connection is lost is sent again on a new one (at-least-once, as
/// `RetryingClient` does); every answer checked.
fn client(inst: &Instance, t: u64, stop: &AtomicBool, counts: &Counts) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let data = format!("client {t} request {i} ").repeat(1 + (i % 20) as usize);
        loop {
            let Some(mut c) = connect(inst, counts) else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            match c.call("upper", &[], data.as_bytes()) {
                Ok(got) => {
                    assert_eq!(
                        got,
                        data.to_ascii_uppercase().into_bytes(),
                        "client {t} request {i}"
                    );
                    Counts::add(&counts.answered);
                    break;
                }
                Err(e) if e.is_retryable() => Counts::add(&counts.lost),
                Err(e) => panic!("client {t} request {i}: {e}"),
            }
        }
        i += 1;
    }
}

fn dispatcher_env(pid: u32, var: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{var}=")).map(str::to_owned))
}

/// Waits for a dispatcher other than `old` to answer; returns its pid.
fn next_dispatcher(inst: &Instance, old: u32) -> u32 {
    wait_for(PATIENCE, || {
        let pid = inst.try_status()?.dispatcher_pid;
        (pid != old).then_some(pid)
    })
    .unwrap_or_else(|| panic!("no new dispatcher after {old}; log:\n{}", inst.log()))
}

#[test]
fn twenty_sigkills_under_clients_that_never_retry_a_connect_refuse_nothing() {
    let inst = Instance::supervised(
        "held20",
        &[
            "--heartbeat-ms",
            "100",
            "--max-restarts",
            "100",
            "--within",
            "600",
            "--backoff-reset-ms",
            "100",
        ],
        DISPATCHER,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    thread::scope(|s| {
        for t in 0..CLIENTS {
            let (stop, counts, inst) = (&stop, &counts, &inst);
            s.spawn(move || client(inst, t, stop, counts));
        }
        let mut pid = inst.dispatcher_pid();
        let mut windows = Vec::new();
        for _ in 0..KILLS {
            // Let the clients run against this dispatcher, then kill it (up
            // longer than --backoff-reset-ms: each restart without backoff).
            let up = Instant::now();
            let before = Counts::get(&counts.answered);
            wait_for(PATIENCE, || {
                (Counts::get(&counts.answered) >= before + 20).then_some(())
            })
            .expect("the clients are served");
            thread::sleep(Duration::from_millis(300).saturating_sub(up.elapsed()));
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
            let killed = Instant::now();
            let served = Counts::get(&counts.answered);
            pid = next_dispatcher(&inst, pid);
            wait_for(PATIENCE, || {
                (Counts::get(&counts.answered) > served).then_some(())
            })
            .expect("served after the kill");
            windows.push(killed.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        windows.sort();
        eprintln!(
            "{KILLS} SIGKILLs: kill -> a client served again: median {:?}, max {:?}",
            windows[windows.len() / 2],
            windows[windows.len() - 1]
        );
    });
    let c = &counts;
    eprintln!(
        "connects {}, refused {}, no such file {}, other connect errors {}, lost (EOF, resent) {}, answered {}",
        Counts::get(&c.connects),
        Counts::get(&c.refused),
        Counts::get(&c.no_such_file),
        Counts::get(&c.other_connect),
        Counts::get(&c.lost),
        Counts::get(&c.answered)
    );
    assert_eq!(
        Counts::get(&c.refused),
        0,
        "connections refused; log:\n{}",
        inst.log()
    );
    assert_eq!(Counts::get(&c.no_such_file), 0, "no socket file");
    assert_eq!(Counts::get(&c.other_connect), 0, "other connect errors");
    // The last dispatcher's workers may still be starting (pid 0).
    let s = inst.wait_status("the last dispatcher's workers up", |s| {
        s.workers.iter().all(|w| w.pid != 0 && w.state.is_up())
    });
    let w = s.watchdog.expect("supervised");
    assert_eq!(w.restarts, u64::from(KILLS));
    assert_eq!(
        dispatcher_env(s.dispatcher_pid, "OSPS_DISPATCHER_RESTARTS").as_deref(),
        Some("killed=20"),
        "the restarts by cause, told to the dispatcher"
    );
    for w in &s.workers {
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            assert_eq!(dispatcher_env(w.pid, var), None, "{var} reached a worker");
        }
        // The listening sockets are close-on-exec in the dispatcher.
        let sockets: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", w.pid))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .collect();
        assert!(sockets.is_empty(), "worker {} holds {sockets:?}", w.pid);
    }
    assert!(inst.log().contains("holding the listening sockets"));
}

#[test]
fn the_tcp_listener_is_held_across_a_restart_and_the_socket_removed_at_the_stop() {
    let mut args = DISPATCHER.to_vec();
    args.extend(["--tcp", "127.0.0.1:0"]);
    let mut inst = Instance::supervised("heldtcp", &["--heartbeat-ms", "100"], &args);
    let first = inst.status();
    let tcp = first.tcp.clone().expect("a TCP listener");
    // (/proc shows the environment a process was started with: the
    // dispatcher's own still names the sockets; its workers' must not.)
    let worker = first.workers[0].pid;
    assert_eq!(dispatcher_env(worker, "LISTEN_FDNAMES"), None);
    kill(Pid::from_raw(first.dispatcher_pid as i32), Signal::SIGKILL).unwrap();
    let second = next_dispatcher(&inst, first.dispatcher_pid);
    assert_eq!(
        inst.status().tcp.as_deref(),
        Some(tcp.as_str()),
        "the same port, held"
    );
    let endpoint = ipc_core::Endpoint::Tcp(tcp.parse().unwrap());
    let mut c = Client::connect(&endpoint).expect("TCP connect");
    assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    drop(c);
    let socket = inst.paths.socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    inst.signal(Signal::SIGTERM);
    assert!(inst.wait_exit(PATIENCE).is_some_and(|s| s.success()));
    assert!(!socket.exists(), "the watchdog removes the socket it bound");
    assert!(osps_testkit::proc_info(second).is_none());
    assert!(
        std::net::TcpStream::connect(&tcp).is_err(),
        "the port is closed"
    );
}

/// `systemd-socket-activate` binds the socket and execs the watchdog with
/// `LISTEN_FDS=1`, `LISTEN_PID`, `LISTEN_FDNAMES=unix`, as systemd does
/// for `osps.socket`.
#[test]
fn a_socket_activated_watchdog_serves_the_socket_it_is_given_and_leaves_it() {
    let Ok(activate) = which("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate is not installed");
        return;
    };
    osps_testkit::become_subreaper();
    let dir = tempfile::Builder::new().prefix("osps-").tempdir().unwrap();
    let instance = osps_testkit::unique_instance("activated");
    let paths = ipc_core::RuntimePaths::new(&instance, Some(dir.path())).unwrap();
    paths.ensure_dir().unwrap();
    let socket = paths.socket();
    let log = dir.path().join("log");
    let mut child = Command::new(activate)
        .arg("--listen")
        .arg(&socket)
        .args(["--fdname=unix", "-E", "RUST_LOG=info"])
        .arg(osps_testkit::bin("osps-watchdog"))
        .args([
            "--instance",
            &instance,
            "--heartbeat-ms",
            "100",
            "--runtime-dir",
        ])
        .arg(dir.path())
        .arg("--")
        .args(DISPATCHER)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let guard = Reaper(child.id(), paths.clone());
    let endpoint = ipc_core::Endpoint::Unix(socket.clone());
    let status = |c: &mut Client| c.status().ok();
    // systemd-socket-activate starts the watchdog at this first connection,
    // which waits in the backlog until a dispatcher accepts it.
    let mut c = wait_for(PATIENCE, || {
        Client::connect_within(&endpoint, None, PATIENCE).ok()
    })
    .expect("systemd-socket-activate listens");
    let first = status(&mut c).expect("status").dispatcher_pid;
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let mut c = Client::connect_within(&endpoint, None, PATIENCE).expect("no retry needed");
    assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    let second = status(&mut c).expect("status").dispatcher_pid;
    assert_ne!(first, second);
    drop(c);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("listening sockets passed by systemd"),
        "{text}"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let exited = wait_for(PATIENCE, || child.try_wait().unwrap());
    assert!(
        exited.is_some_and(|s| s.success()),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(socket.exists(), "systemd's socket file is left to systemd");
    drop(guard);
}

#[test]
fn a_socket_activated_watchdog_refuses_a_socket_at_another_path() {
    let Ok(activate) = which("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate is not installed");
        return;
    };
    let dir = tempfile::Builder::new().prefix("osps-").tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere.sock");
    let mut child = Command::new(activate)
        .arg("--listen")
        .arg(&elsewhere)
        .arg("--fdname=unix")
        .arg(osps_testkit::bin("osps-watchdog"))
        .args(["--instance", "wrongpath", "--runtime-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = Reaper(
        child.id(),
        ipc_core::RuntimePaths::new("wrongpath", Some(dir.path())).unwrap(),
    );
    // systemd-socket-activate starts the program at the first connection.
    wait_for(PATIENCE, || {
        std::os::unix::net::UnixStream::connect(&elsewhere).ok()
    })
    .expect("systemd-socket-activate listens");
    let status = wait_for(PATIENCE, || child.try_wait().unwrap()).expect("the watchdog exits");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("set ListenStream="), "{err}");
    drop(guard);
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// Kills (and reaps) whatever of the activated instance is left: the
/// watchdog, its dispatcher and workers; removes its segments and socket.
struct Reaper(u32, ipc_core::RuntimePaths);

impl Drop for Reaper {
    fn drop(&mut self) {
        let mut pids = vec![self.0];
        pids.extend(
            osps_testkit::processes_mentioning(&format!("--instance {}", self.1.instance()))
                .iter()
                .map(|p| p.pid),
        );
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        for &pid in &pids {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
        }
        for seg in osps_testkit::instance_segments(&self.1) {
            let _ = std::fs::remove_file(seg);
        }
        let _ = std::fs::remove_file(self.1.socket());
    }
}

/// Kills the dispatcher and binds `port` on loopback before its successor
/// does (tried again with the next one if it won the race); returns the
/// listener and the killed dispatcher's pid.
fn kill_and_squat(inst: &Instance, port: u16) -> (std::net::TcpListener, u32) {
    for _ in 0..5 {
        let pid = inst.dispatcher_pid();
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return (l, pid);
            }
            thread::sleep(Duration::from_millis(1));
        }
        next_dispatcher(inst, pid);
    }
    panic!("the next dispatcher always bound the port first");
}

/// The metrics port is not held: while a dispatcher restarts, anyone on
/// the host (another uid too) may bind it. The next dispatcher then serves
/// the jobs anyway (it used to exit, and the watchdog to give up after
/// --max-restarts: the whole service down), and takes the port back once
/// it is free.
#[test]
fn a_metrics_port_taken_during_a_restart_does_not_stop_the_service() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let mut args = DISPATCHER.to_vec();
    args.extend(["--metrics-listen", &metrics]);
    let mut inst = Instance::supervised(
        "heldmet",
        &["--heartbeat-ms", "100", "--max-restarts", "20"],
        &args,
    );
    let (taken, first) = kill_and_squat(&inst, port);
    let second = next_dispatcher(&inst, first);
    let mut c = inst.client();
    assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    drop(c);
    assert!(
        wait_for(PATIENCE, || inst
            .log()
            .contains("cannot listen on")
            .then_some(()))
        .is_some(),
        "the dispatcher says the port is taken; log:\n{}",
        inst.log()
    );
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(inst.dispatcher_pid(), second, "no restart for it");
    drop(taken);
    let scraped = wait_for(PATIENCE, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.contains("osps_dispatcher_restarts_total")
            .then_some(())
    });
    assert!(
        scraped.is_some(),
        "metrics served again; log:\n{}",
        inst.log()
    );
    inst.signal(Signal::SIGTERM);
    assert!(inst.wait_exit(PATIENCE).is_some_and(|s| s.success()));
}

/// `tcp` is a restart-only option: a reload refuses to change it, but the
/// file may say otherwise when the dispatcher next restarts. The next
/// dispatcher serves the TCP socket the watchdog holds (it refused it and
/// exited, every restart alike, until the watchdog gave up: one crash
/// took the whole service down).
#[test]
fn a_tcp_listener_no_longer_in_the_file_is_served_after_a_restart() {
    let text = "workers = 1\nsegment_mib = 16\nmax_payload = 1048576\ntcp = \"127.0.0.1:0\"\n";
    let (_dir, path) = osps_testkit::config_file(text);
    let mut inst = Instance::supervised(
        "heldnotcp",
        &["--heartbeat-ms", "100", "--config", path.to_str().unwrap()],
        &[],
    );
    let first = inst.status();
    let tcp = first.tcp.clone().expect("a TCP listener");
    std::fs::write(&path, text.replace("tcp = \"127.0.0.1:0\"\n", "")).unwrap();
    kill(Pid::from_raw(first.dispatcher_pid as i32), Signal::SIGKILL).unwrap();
    next_dispatcher(&inst, first.dispatcher_pid);
    let endpoint = ipc_core::Endpoint::Tcp(tcp.parse().unwrap());
    let mut c = Client::connect(&endpoint).expect("TCP connect");
    assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    drop(c);
    assert!(inst
        .log()
        .contains("the configuration now has no TCP listener"));
    inst.signal(Signal::SIGTERM);
    assert!(inst.wait_exit(PATIENCE).is_some_and(|s| s.success()));
}
