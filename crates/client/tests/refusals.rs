//! What is retried and what is not: a deterministic refusal (a payload over
//! the limit, garbage instead of a hello) is reported at once with the
//! server's own words; a transient one (a server that closes at the hello
//! without a word) is retried within the retry deadline.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use osps_client::{Client, ClientError, RetryPolicy, RetryingClient};
use osps_testkit::{bin, Instance};

const LIMIT: u64 = 4 << 20;

fn small_limit(tag: &str) -> Instance {
    Instance::start(tag, osps_testkit::args!(1, 16, &LIMIT.to_string()))
}

/// A file larger than the limit plus what the server drains before it
/// closes (about 64 MiB, section 9 of PROTOCOL.md): a client that only
/// writes meets a closed socket, not the answer. Sparse, so cheap.
fn oversized_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("big.iso");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(70 << 20)
        .unwrap();
    path
}

fn cli(inst: &Instance, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = osps_testkit::client_command(inst.name(), inst.runtime_dir())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out, started.elapsed())
}

#[test]
fn a_payload_over_the_limit_gets_the_servers_too_large_line_at_once_and_is_not_retried() {
    let inst = small_limit("toolarge");
    let dir = tempfile::tempdir().unwrap();
    let big = oversized_file(dir.path());
    // A retry deadline of 30 s: one retry of this refusal would show in the time.
    let (out, took) = cli(
        &inst,
        &[
            "--retry-ms",
            "30000",
            "run",
            "sha256",
            "--input",
            big.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("too large answered in {took:?}: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("too large")
            && err.contains(&format!("exceeds the limit of {LIMIT} bytes"))
            && err.contains("--max-payload"),
        "the server's line, with the limit and how to raise it: {err}"
    );
    // Within a second on a quiet machine; generous here (shared CPUs), and
    // far below both the 2 s the server drains and the retry deadline.
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
}

#[test]
fn the_library_returns_too_large_from_a_call_and_does_not_retry_it() {
    let inst = small_limit("toolargelib");
    let payload = vec![7u8; 70 << 20];
    let mut c = RetryingClient::new(
        inst.endpoint(),
        RetryPolicy {
            deadline: Duration::from_secs(30),
            ..RetryPolicy::default()
        },
    );
    let started = Instant::now();
    match c.call("echo", &[], &payload) {
        Err(ClientError::Remote(e)) => {
            assert_eq!(e.kind, ipc_core::ErrorKind::TooLarge, "{e}");
        }
        other => panic!("expected too large, got {other:?}"),
    }
    assert_eq!(c.retries, 0, "a deterministic refusal is not retried");
    assert!(started.elapsed() < Duration::from_secs(8));
    // The connection the server closed is not reused: the next call works.
    assert_eq!(c.call("echo", &[], b"small").unwrap(), b"small");

    // A plain Client, too, and pipelined requests before it keep their answers.
    let mut c = inst.client();
    let first = c.send("upper", &[], b"before").unwrap();
    match c.send("echo", &[], &payload) {
        Err(ClientError::Remote(e)) => assert_eq!(e.kind, ipc_core::ErrorKind::TooLarge),
        other => panic!("expected too large, got {other:?}"),
    }
    assert!(!c.is_usable());
    assert_eq!(c.wait(first).unwrap(), b"BEFORE");
}

/// A Unix socket in front of `inst` that closes its first `silent`
/// connections without a word (as a dispatcher whose handshake budget is
/// full does), then relays to the dispatcher.
struct Doorman {
    path: std::path::PathBuf,
    closed: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl Doorman {
    fn start(inst: &Instance, silent: usize) -> Doorman {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("door.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, target) = (Arc::clone(&closed), inst.paths.socket());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                if count.load(Ordering::SeqCst) < silent {
                    count.fetch_add(1, Ordering::SeqCst);
                    drop(conn);
                    continue;
                }
                let Ok(up) = UnixStream::connect(&target) else {
                    return;
                };
                relay(conn, up);
            }
        });
        Doorman {
            path,
            closed,
            _dir: dir,
        }
    }
}

fn relay(a: UnixStream, b: UnixStream) {
    let pipe = |mut from: UnixStream, mut to: UnixStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    };
    pipe(a.try_clone().unwrap(), b.try_clone().unwrap());
    pipe(b, a);
}

#[test]
fn a_server_that_closes_at_the_hello_without_a_word_is_retried() {
    let inst = small_limit("closedhello");
    let door = Doorman::start(&inst, 5);
    let mut child = osps_testkit::spawn_piped(
        Command::new(bin("osps-client"))
            .arg("--connect")
            .arg(format!("unix:{}", door.path.display()))
            .args(["--retry-ms", "20000", "run", "upper", "--input", "-"]),
    )
    .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through the door\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"THROUGH THE DOOR\n");
    assert_eq!(door.closed.load(Ordering::SeqCst), 5);

    // The library says the same: the error is transient.
    let door = Doorman::start(&inst, 1);
    match Client::connect(&ipc_core::Endpoint::Unix(door.path.clone())) {
        Err(e @ ClientError::ClosedAtHello { .. }) => assert!(e.is_retryable(), "{e}"),
        other => panic!("expected ClosedAtHello, got {other:?}"),
    }
}

#[test]
fn a_server_that_answers_garbage_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut hello = [0u8; 8];
            let _ = conn.read_exact(&mut hello);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let started = Instant::now();
    let out = Command::new(bin("osps-client"))
        .arg("--connect")
        .arg(format!("unix:{}", path.display()))
        .args(["--retry-ms", "30000", "run", "ping"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not an OSPS dispatcher") && err.contains("HTTP/1.1 200 OK"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "retried: {err}"
    );
}
