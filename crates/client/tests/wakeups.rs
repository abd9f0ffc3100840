//! A client waiting for its answer sleeps until the answer comes: it is not
//! woken when the server takes its request. (A thread blocked in `recv(2)`
//! on a Unix socket is woken each time its peer consumes bytes it sent, the
//! kernel's write-space wake-up; the client waits in `poll(2)` for `POLLIN`
//! instead, which that wake-up does not reach.) The server here is a
//! scripted one speaking the real protocol, so that it can take each
//! request only once the client is surely asleep.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use ipc_core::frame;
use ipc_core::proto::{self, HelloStatus, Outcome, Request, Response, PROTOCOL_VERSION};
use ipc_core::Endpoint;

const REQUESTS: u64 = 40;

/// This thread's voluntary context switches so far.
fn switches() -> u64 {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("voluntary_ctxt_switches:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Accepts one client, answers its hello, then for each request: waits
/// (the client is asleep by then), takes the request, waits again, answers.
fn serve(listener: UnixListener) {
    let (mut s, _) = listener.accept().unwrap();
    let mut hello = [0u8; proto::HELLO_LEN];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&proto::encode_hello(
        PROTOCOL_VERSION,
        HelloStatus::Accepted as u16,
    ))
    .unwrap();
    let mut scratch = Vec::new();
    let mut out = Vec::new();
    for _ in 0..REQUESTS {
        std::thread::sleep(Duration::from_millis(5));
        let req: Request = frame::read_frame(&mut s, &mut scratch, 1 << 16).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        out.clear();
        let resp = Response {
            id: req.id,
            outcome: Outcome::Ok,
            result_len: 5,
        };
        frame::encode(&resp, &mut out).unwrap();
        out.extend_from_slice(b"pong\n");
        s.write_all(&out).unwrap();
    }
}

#[test]
fn a_client_waiting_for_its_answer_is_not_woken_when_the_server_takes_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || serve(listener));
    let mut client = osps_client::Client::connect(&Endpoint::Unix(path)).unwrap();
    let before = switches();
    for _ in 0..REQUESTS {
        client.ping().unwrap();
    }
    let per_request = (switches() - before) as f64 / REQUESTS as f64;
    server.join().unwrap();
    // One sleep per request (until the answer) is the floor; a wake-up when
    // the server takes the request makes it two.
    assert!(
        per_request < 1.5,
        "{per_request:.2} voluntary context switches per request: the client is woken before its answer"
    );
}
