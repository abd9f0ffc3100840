//! How often a request is sent again, and when not at all. A fake server
//! (a Unix socket served by a thread of the test) accepts the hello, reads
//! each request whole, counts it, and then answers as the test says: not
//! at all (it closes, as a dispatcher killed during the job would), or with
//! part of a result.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::proto::{self, Outcome, Request, Response};
use osps_testkit::bin;

/// What the fake server does once it has read request number `n` (from 0).
type Answer = fn(n: usize, req: &Request, conn: &mut UnixStream);

struct FakeServer {
    path: PathBuf,
    requests: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl FakeServer {
    fn start(answer: Answer) -> FakeServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&requests);
        // The thread ends with the test process; the socket's directory is removed on drop.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut opening = [0u8; proto::HELLO_LEN];
                if conn.read_exact(&mut opening).is_err() {
                    continue;
                }
                let hello = proto::encode_hello(proto::PROTOCOL_VERSION, 0);
                if conn.write_all(&hello).is_err() {
                    continue;
                }
                let mut scratch = Vec::new();
                let Ok(req) = ipc_core::frame::read_frame::<Request, _>(
                    &mut conn,
                    &mut scratch,
                    ipc_core::frame::DEFAULT_MAX_FRAME,
                ) else {
                    continue; // no request on this connection
                };
                let mut payload = vec![0u8; req.payload_len as usize];
                if conn.read_exact(&mut payload).is_err() {
                    continue;
                }
                let n = count.fetch_add(1, Ordering::SeqCst);
                answer(n, &req, &mut conn);
            }
        });
        FakeServer {
            path,
            requests,
            _dir: dir,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn client(&self, args: &[&str], stdin: &[u8]) -> (Output, Duration) {
        let started = Instant::now();
        let mut child = osps_testkit::spawn_piped(
            Command::new(bin("osps-client"))
                .arg("--connect")
                .arg(format!("unix:{}", self.path.display()))
                .args(args),
        )
        .unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin);
        let out = child.wait_with_output().unwrap();
        (out, started.elapsed())
    }
}

fn reply(conn: &mut UnixStream, id: u64, announced: u64, bytes: &[u8]) {
    let mut out = Vec::new();
    let resp = Response {
        id,
        outcome: Outcome::Ok,
        result_len: announced,
    };
    ipc_core::frame::encode(&resp, &mut out).unwrap();
    out.extend_from_slice(bytes);
    let _ = conn.write_all(&out);
}

/// `/dev/stdout` is the pipe the test reads: the result is written in place.
const RUN_TO_STDOUT: &[&str] = &[
    "--retry-ms",
    "10000",
    "run",
    "echo",
    "--input",
    "-",
    "-o",
    "/dev/stdout",
];

#[test]
fn a_request_whose_answer_is_lost_each_time_is_sent_at_most_four_times() {
    // Closes after each request, as a dispatcher killed during each run would.
    let server = FakeServer::start(|_, _, _| {});
    let (out, took) = server.client(
        &["--retry-ms", "10000", "run", "echo", "--input", "-"],
        b"payload",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("gave up after {took:?}: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("sent the request 4 times without getting its answer"),
        "{err}"
    );
    // Before: sent again for as long as --retry-ms lasted (dozens of times).
    assert_eq!(server.requests(), 4, "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_result_partly_written_to_a_pipe_is_not_written_again() {
    // First: 10 of the 100 announced bytes, then the connection is lost;
    // afterwards: the whole result.
    let server = FakeServer::start(|n, req, conn| {
        let result: Vec<u8> = (b'a'..=b'z').cycle().take(100).collect();
        if n == 0 {
            reply(conn, req.id, 100, &result[..10]);
        } else {
            reply(conn, req.id, 100, &result);
        }
    });
    // `/dev/stdout` is the pipe the test reads: written in place.
    let (out, _) = server.client(RUN_TO_STDOUT, b"payload");
    let err = String::from_utf8_lossy(&out.stderr);
    // Before: exit 0 with the first 10 bytes twice (110 bytes).
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(out.stdout, b"abcdefghij", "{err}");
    assert!(
        err.contains("connection lost after 10 result bytes went to /dev/stdout; not retrying"),
        "{err}"
    );
    assert_eq!(server.requests(), 1, "not sent again");
}

#[test]
fn a_result_partly_written_is_reported_at_once_when_the_dispatcher_does_not_come_back() {
    // 10 of the 100 announced bytes, then the server is gone for good.
    let server = FakeServer::start(|_, req, conn| {
        let path = conn.local_addr().unwrap().as_pathname().unwrap().to_owned();
        std::fs::remove_file(path).unwrap();
        let result: Vec<u8> = (b'a'..=b'z').cycle().take(100).collect();
        reply(conn, req.id, 100, &result[..10]);
    });
    let (out, took) = server.client(RUN_TO_STDOUT, b"payload");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("connection lost after 10 result bytes went to /dev/stdout; not retrying"),
        "{err}"
    );
    // Before: it tried to reconnect for all of --retry-ms, then reported
    // the failed connect.
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
}
