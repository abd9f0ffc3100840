//! The metrics: `osps-client metrics` and `--metrics-listen`'s `/metrics`
//! pass `promtool check metrics`; a scrape before and after jobs (ok, an
//! error, a crash, a timeout) and a refused connection sees each counter
//! and the latency histogram move by what happened; the HTTP listener
//! answers 404 and 405, bounds what a hostile client can hold, and refuses
//! a non-loopback address without `--metrics-listen-public`; the
//! watchdog's `OSPS_DISPATCHER_RESTARTS` is exported.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use osps_testkit::{
    bin, client_command, config_file, run_to_exit, unique_instance, wait_for, Instance, PATIENCE,
};

/// `promtool`: from `PATH`, or installed by `.ci/install-tools` when it is
/// missing and the tests run as root (a fresh machine); otherwise the
/// test fails saying how to install it.
fn promtool() -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = in_path("promtool") {
        return found;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/install-tools");
    assert!(
        nix::unistd::geteuid().is_root(),
        "promtool is missing: install Debian's prometheus package (as root: {} , or apt-get install --no-install-recommends prometheus)",
        script.display()
    );
    let status = Command::new("bash").arg(&script).status().unwrap();
    assert!(status.success(), "{} failed: {status}", script.display());
    in_path("promtool").expect("promtool installed by .ci/install-tools")
}

fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs `promtool check metrics` on `text`: it must find no problem.
fn promtool_check(text: &str, what: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {what}: {}: {said}\n{text}",
        out.status
    );
}

/// Where the dispatcher serves its metrics (from its log).
fn metrics_addr(inst: &Instance) -> SocketAddr {
    let prefix = "metrics served at http://";
    wait_for(PATIENCE, || {
        let log = inst.log();
        let rest = &log[log.find(prefix)? + prefix.len()..];
        rest[..rest.find("/metrics")?].parse().ok()
    })
    .unwrap_or_else(|| panic!("no metrics address in the log:\n{}", inst.log()))
}

/// An HTTP answer: status, head, body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` as is and reads the answer to the end (the server
/// closes after one).
fn http(addr: SocketAddr, request: &str) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn scrape(addr: SocketAddr) -> String {
    let a = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(a.status, 200, "{}\n{}", a.head, a.body);
    assert!(
        a.head
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        a.head
    );
    a.body
}

/// `osps-client metrics`'s output.
fn client_metrics(inst: &Instance) -> String {
    let out = client_command(inst.name(), inst.runtime_dir())
        .arg("metrics")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "osps-client metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The value of one series (`name{labels}`), which must be there.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}

fn jobs(outcome: &str) -> String {
    format!("osps_jobs_total{{pool=\"builtin\",outcome=\"{outcome}\"}}")
}

fn bucket(le: &str) -> String {
    format!("osps_job_duration_seconds_bucket{{pool=\"builtin\",le=\"{le}\"}}")
}

fn restarts(cause: &str) -> String {
    format!("osps_worker_restarts_total{{pool=\"builtin\",cause=\"{cause}\"}}")
}

const LATENCY_COUNT: &str = "osps_job_duration_seconds_count{pool=\"builtin\"}";
const LATENCY_SUM: &str = "osps_job_duration_seconds_sum{pool=\"builtin\"}";
const UNIX_ACCEPTED: &str = "osps_connections_accepted_total{listener=\"unix\"}";
const UNIX_OPEN: &str = "osps_connections_open{listener=\"unix\"}";
const IDLE: &str = "osps_workers{pool=\"builtin\",state=\"idle\"}";
const NOT_OSPS: &str = "osps_connections_refused_total{listener=\"unix\",reason=\"not_osps\"}";

#[test]
fn promtool_finds_no_problem_in_the_client_output_nor_in_the_scrape() {
    let inst = Instance::start(
        "mprom",
        &["--workers", "2", "--metrics-listen", "127.0.0.1:0"],
    );
    let mut c = inst.client();
    assert_eq!(c.call("upper", &[], b"ab").unwrap(), b"AB");
    assert!(c.call("sleep", &["x"], b"").is_err());
    let from_client = client_metrics(&inst);
    assert!(from_client.contains("# TYPE osps_jobs_total counter"));
    promtool_check(&from_client, "osps-client metrics");
    let scraped = scrape(metrics_addr(&inst));
    assert!(scraped.contains("# TYPE osps_job_duration_seconds histogram"));
    promtool_check(&scraped, "GET /metrics");
}

/// How much `series` moved from `before` to `after`.
fn moved(before: &str, after: &str, series: &str) -> f64 {
    value(after, series) - value(before, series)
}

#[test]
fn a_scrape_after_jobs_sees_each_counter_move_by_what_happened() {
    let inst = Instance::start(
        "mmove",
        &[
            "--workers",
            "1",
            "--job-timeout-ms",
            "1000",
            "--allow-fault-injection",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let addr = metrics_addr(&inst);
    let before = scrape(addr);
    let started = Instant::now();
    let mut c = inst.client();
    for _ in 0..3 {
        assert_eq!(c.call("echo", &[], b"hi").unwrap(), b"hi");
    }
    let kind = |r: Result<Vec<u8>, osps_client::ClientError>| match r {
        Err(osps_client::ClientError::Remote(e)) => e.kind,
        other => panic!("an error answer expected: {other:?}"),
    };
    use ipc_core::ErrorKind;
    assert_eq!(
        kind(c.call("sleep", &["soon"], b"")),
        ErrorKind::InvalidInput
    );
    // Dies on each of its 2 attempts: 2 restarts, 1 job given up.
    assert_eq!(kind(c.call("crash", &[], b"")), ErrorKind::WorkerCrashed);
    // Past the 1 s timeout: killed, replaced, answered `timeout`.
    assert_eq!(kind(c.call("sleep", &["20000"], b"")), ErrorKind::Timeout);
    let elapsed = started.elapsed().as_secs_f64();
    // A client that is not one: refused after its first bytes.
    let mut garbage = std::os::unix::net::UnixStream::connect(inst.paths.socket()).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    garbage.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = garbage.read_to_end(&mut Vec::new());
    // Settled: the refusal counted and its connection closed, the
    // timed-out worker's replacement up.
    drop(garbage);
    let after = wait_for(PATIENCE, || {
        let now = scrape(addr);
        let settled = moved(&before, &now, NOT_OSPS) == 1.0
            && value(&now, UNIX_OPEN) == 1.0
            && value(&now, IDLE) == 1.0;
        settled.then_some(now)
    })
    .unwrap_or_else(|| panic!("the counters did not move:\n{before}\n{}", scrape(addr)));
    let d = |series: &str| moved(&before, &after, series);
    assert_eq!(d(&jobs("ok")), 3.0);
    assert_eq!(d(&jobs("invalid_input")), 1.0);
    assert_eq!(d(&jobs("worker_crashed")), 1.0);
    assert_eq!(d(&jobs("timeout")), 1.0);
    assert_eq!(d(&jobs("internal_error")), 0.0);
    assert_eq!(d(&restarts("crashed")), 2.0);
    assert_eq!(d(&restarts("timeout")), 1.0);
    // The histogram counts the six jobs; the timed-out one took over 1 s.
    assert_eq!(d(LATENCY_COUNT), 6.0);
    assert_eq!(d(&bucket("+Inf")), 6.0);
    assert_eq!(d(&bucket("60")), 6.0);
    assert!(d(&bucket("0.5")) <= 5.0, "{after}");
    assert!(
        (1.0..=elapsed).contains(&d(LATENCY_SUM)),
        "sum moved {} in {elapsed} s",
        d(LATENCY_SUM)
    );
    // One client connection (held), one garbage one; the scrapes are not clients.
    assert_eq!(d(UNIX_ACCEPTED), 2.0);
    assert_eq!(value(&after, UNIX_OPEN), 1.0);
    assert_eq!(value(&after, "osps_jobs_queued{pool=\"builtin\"}"), 0.0);
    assert_eq!(
        value(&after, "osps_workers{pool=\"builtin\",state=\"busy\"}"),
        0.0
    );
    drop(c);
}

#[test]
fn the_http_listener_answers_404_and_405_and_bounds_what_a_client_holds() {
    let inst = Instance::start(
        "mhttp",
        &["--workers", "1", "--metrics-listen", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&inst);
    let not_found = http(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(not_found.status, 404, "{}", not_found.head);
    let nope = http(addr, "GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(nope.status, 404, "{}", nope.head);
    let post = http(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert_eq!(post.status, 405, "{}", post.head);
    assert!(post.head.contains("allow: get, head"), "{}", post.head);
    let head = http(addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    // A head over the size bound is refused, not buffered.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = s.write_all(huge.as_bytes());
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    // Silent connections up to the limit: the next is closed at once, the
    // job path does not notice, and the silent ones are closed in time.
    let silent: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let t0 = Instant::now();
    let closed = matches!(extra.read(&mut [0u8; 64]), Ok(0) | Err(_));
    assert!(
        closed && t0.elapsed() < Duration::from_secs(3),
        "the 17th connection was not closed at once"
    );
    assert_eq!(inst.client().call("upper", &[], b"ok").unwrap(), b"OK");
    let t0 = Instant::now();
    for mut s in silent {
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    }
    // 5 s to send a head, 10 s for the whole connection.
    assert!(t0.elapsed() < Duration::from_secs(12), "{:?}", t0.elapsed());
    assert!(scrape(addr).contains("osps_jobs_total"));
}

#[test]
fn a_non_loopback_metrics_address_needs_the_explicit_flag() {
    let runtime = tempfile::tempdir().unwrap();
    // Checked as a start checks them, starting nothing (a dispatcher that
    // started by mistake would leave its segment when killed here).
    let start = |extra: &[&str]| {
        let out = run_to_exit(
            Command::new(bin("osps-dispatcher"))
                .args(["--instance", &unique_instance("mpub"), "--runtime-dir"])
                .arg(runtime.path())
                .args(["--workers", "1", "--check-config"])
                .args(extra),
            "osps-dispatcher --check-config",
        );
        assert!(!out.status.success(), "accepted {extra:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:9477"] {
        let err = start(&["--metrics-listen", addr]);
        assert!(
            err.contains("is not a loopback address") && err.contains("--metrics-listen-public"),
            "{addr}: {err}"
        );
    }
    let err = start(&["--metrics-listen-public"]);
    assert!(err.contains("add --metrics-listen ADDR"), "{err}");
    // No pool may take the operation's name.
    let (_dir, pool) = config_file("[pools.cmd]\nexec = [\"cat\"]\nops = [\"metrics\"]\n");
    let err = start(&["--config", pool.to_str().unwrap()]);
    assert!(
        err.contains("\"metrics\" cannot be an operation's name"),
        "{err}"
    );
    // The file's key is refused with its line.
    let (_dir, path) = config_file("workers = 1\nmetrics_listen = \"0.0.0.0:0\"\n");
    let err = start(&["--config", path.to_str().unwrap()]);
    assert!(
        err.contains(":2:") && err.contains("metrics_listen"),
        "{err}"
    );
    // With the flag, the wildcard address serves (reached here on loopback).
    let inst = Instance::start(
        "mpubok",
        &[
            "--workers",
            "1",
            "--metrics-listen",
            "0.0.0.0:0",
            "--metrics-listen-public",
        ],
    );
    let port = metrics_addr(&inst).port();
    assert!(scrape(SocketAddr::from(([127, 0, 0, 1], port))).contains("osps_workers"));
}

#[test]
fn the_watchdogs_count_of_dispatcher_restarts_is_exported() {
    let env = [(
        "OSPS_DISPATCHER_RESTARTS",
        "crashed=3,hung=1,killed=x,bogus=7,,exited",
    )];
    let inst = Instance::start_env("mrestarts", &env, &["--workers", "1"]);
    let text = client_metrics(&inst);
    let restarts = |cause: &str| {
        value(
            &text,
            &format!("osps_dispatcher_restarts_total{{cause=\"{cause}\"}}"),
        )
    };
    assert_eq!(
        ["crashed", "hung", "killed", "exited"].map(restarts),
        [3.0, 1.0, 0.0, 0.0]
    );
    assert!(!text.contains("bogus"), "{text}");
    promtool_check(&text, "osps-client metrics with restarts");
}

/// A flood of scrapes (any local user can send one) does not take the
/// dispatcher's thread from the jobs: connections are accepted at most
/// every 10 ms, the rest wait in the kernel's backlog. (Unpaced, 8 threads
/// here had thousands answered a second and the dispatcher's thread busy.)
#[test]
fn a_flood_of_scrapes_is_paced() {
    let inst = Instance::start(
        "mflood",
        &["--workers", "1", "--metrics-listen", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&inst);
    let answered = std::sync::atomic::AtomicU64::new(0);
    let flood = Duration::from_secs(2);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let t0 = Instant::now();
                while t0.elapsed() < flood {
                    let Ok(mut c) = TcpStream::connect(addr) else {
                        continue;
                    };
                    let _ = c.set_read_timeout(Some(flood));
                    let _ = c.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n");
                    let mut got = Vec::new();
                    let _ = c.read_to_end(&mut got);
                    if got.starts_with(b"HTTP/1.1 404") {
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        assert_eq!(inst.client().call("upper", &[], b"ok").unwrap(), b"OK");
    });
    let n = answered.into_inner();
    assert!(n > 0, "scrapes are served");
    assert!(n <= 2 * 100 + 50, "{n} answers in {flood:?}: not paced");
    assert!(scrape(addr).contains("osps_jobs_total"));
}
