//! The systemd notification protocol, checked against a socket the test binds
//! and names in `NOTIFY_SOCKET`, as systemd would for a `Type=notify` unit:
//! `READY=1` once the dispatcher and a worker answer, `WATCHDOG=1` pings at
//! half of `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use osps_testkit::{Instance, PATIENCE};

const DISPATCHER: &[&str] = osps_testkit::args!(2, 16, 1048576);

/// The service manager's end: a datagram socket in a private directory.
struct Manager {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: String,
}

impl Manager {
    fn new() -> Manager {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Manager {
            socket,
            path: path.to_str().unwrap().to_owned(),
            _dir: dir,
        }
    }

    /// The next message, or `None` after `within`.
    fn next(&self, within: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        // A message is newline-separated lines; the last one's newline, if
        // sent, is not part of it (systemd reads it the same either way).
        let text = String::from_utf8_lossy(&buf[..n]);
        Some(text.strip_suffix('\n').unwrap_or(&text).to_owned())
    }

    /// Messages until one contains `what` (returned last), within `within`.
    fn until(&self, what: &str, within: Duration) -> Vec<String> {
        let end = Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(m) = self.next(end.saturating_duration_since(Instant::now())) {
            let done = m.lines().any(|l| l == what);
            seen.push(m);
            if done {
                return seen;
            }
        }
        panic!("no {what} within {within:?}; got {seen:?}");
    }
}

#[test]
fn ready_watchdog_pings_and_stopping_reach_the_notify_socket() {
    let manager = Manager::new();
    // WatchdogSec=0.4s: a ping every 200 ms.
    let mut inst = Instance::supervised_env(
        "notify",
        &[
            ("NOTIFY_SOCKET", &manager.path),
            ("WATCHDOG_USEC", "400000"),
        ],
        &["--heartbeat-ms", "100"],
        DISPATCHER,
    );
    let dispatcher = inst.dispatcher_pid();

    // Start: READY=1 comes with a status line naming the dispatcher that answered.
    let start = manager.until("READY=1", PATIENCE);
    let ready = start.last().unwrap();
    assert!(
        ready.contains(&format!(
            "STATUS=serving: dispatcher pid {dispatcher}, 2 worker(s)"
        )),
        "{ready:?}"
    );
    assert!(
        start.iter().filter(|m| m.contains("READY=1")).count() == 1,
        "{start:?}"
    );
    // The whole path serves at that point.
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
    // The dispatcher does not see systemd's variables (it is not the main process).
    let env = std::fs::read(format!("/proc/{dispatcher}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&env).contains("NOTIFY_SOCKET"),
        "the dispatcher inherited NOTIFY_SOCKET"
    );

    // Heartbeat: WATCHDOG=1 keeps coming while the service runs. (What
    // piled up meanwhile is read first; the period itself is unit-tested in
    // `notify.rs`.)
    while manager.next(Duration::from_millis(20)).is_some() {}
    let t0 = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        let m = manager
            .next(PATIENCE)
            .expect("WATCHDOG=1 pings keep coming");
        pings += usize::from(m == "WATCHDOG=1");
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(600),
        "5 pings at 200 ms intervals came in {:?}",
        t0.elapsed()
    );

    // Stop: STOPPING=1 on SIGTERM, then the watchdog exits 0.
    inst.signal(Signal::SIGTERM);
    let stop = manager.until("STOPPING=1", PATIENCE);
    assert!(stop.last().unwrap().contains("STATUS=stopping"), "{stop:?}");
    let status = inst.wait_exit(PATIENCE).expect("watchdog exits");
    assert!(status.success(), "{status}");
    assert!(inst.leftovers().is_empty(), "{:?}", inst.leftovers());
}

#[test]
fn no_pings_when_the_watchdog_setting_is_for_another_process() {
    let manager = Manager::new();
    let inst = Instance::supervised_env(
        "notify-other",
        &[
            ("NOTIFY_SOCKET", &manager.path),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
        &["--heartbeat-ms", "100"],
        DISPATCHER,
    );
    manager.until("READY=1", PATIENCE);
    // Over a second, at most the status lines: no keep-alive pings.
    let end = Instant::now() + Duration::from_secs(1);
    while let Some(m) = manager.next(end.saturating_duration_since(Instant::now())) {
        assert_ne!(m, "WATCHDOG=1");
    }
    drop(inst);
}
