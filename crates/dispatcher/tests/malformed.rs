//! Malformed and hostile input: each case gets a clear answer where the
//! protocol can carry one, its connection is closed when it cannot go on, and
//! the dispatcher keeps serving everyone else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ipc_core::frame;
use ipc_core::proto::{self, ErrorKind, Outcome, Response, PROTOCOL_VERSION};
use osps_client::ClientError;
use osps_testkit::{Instance, PATIENCE};

const ARGS: &[&str] = osps_testkit::args!(2, 8, 1048576, "--handshake-timeout-ms", "1000");

fn raw(inst: &Instance) -> UnixStream {
    let s = UnixStream::connect(inst.paths.socket()).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

/// Everything the server sends until it closes.
fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the server closes the connection");
    out
}

fn read_response(s: &mut UnixStream) -> Response {
    frame::read_frame(s, &mut Vec::new(), 4096).expect("a response frame")
}

fn others_still_served(inst: &Instance) {
    let mut c = inst.client();
    assert_eq!(c.call("upper", &[], b"fine").unwrap(), b"FINE");
    assert_eq!(inst.status().segment.slots_in_use, 0);
}

#[test]
fn a_text_line_instead_of_the_handshake_gets_one_readable_line() {
    let inst = Instance::start("textline", ARGS);
    let mut keep = inst.client(); // a client connected throughout
    let mut s = raw(&inst);
    s.write_all(b"Demande echange ping pong\n").unwrap();
    let answer = String::from_utf8(read_all(&mut s)).unwrap();
    assert!(answer.starts_with("OSPS job server"), "{answer:?}");
    assert!(answer.contains("docs/PROTOCOL.md"));
    assert_eq!(answer.lines().count(), 1);
    assert_eq!(keep.call("ping", &[], &[]).unwrap(), b"pong\n");
    others_still_served(&inst);
}

#[test]
fn an_http_request_gets_an_http_400_explaining_the_port() {
    let inst = Instance::start("http", ARGS);
    let mut s = raw(&inst);
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let answer = String::from_utf8(read_all(&mut s)).unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 400 Bad Request\r\n"),
        "{answer:?}"
    );
    assert!(answer.contains("binary OSPS protocol"));
    others_still_served(&inst);
}

#[test]
fn random_bytes_are_refused_and_closed() {
    let inst = Instance::start("random", ARGS);
    let mut x = 0x1234_5678_9abc_def1u64;
    let junk: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    assert_ne!(junk[0], b'O');
    let mut s = raw(&inst);
    s.write_all(&junk).unwrap();
    let answer = String::from_utf8(read_all(&mut s)).unwrap();
    assert!(answer.starts_with("OSPS job server"), "{answer:?}");
    others_still_served(&inst);
}

#[test]
fn a_wrong_protocol_version_is_told_so() {
    let inst = Instance::start("version", ARGS);
    let mut s = raw(&inst);
    s.write_all(&proto::encode_hello(99, 0)).unwrap();
    let answer = read_all(&mut s);
    let hello: [u8; 8] = answer[..8].try_into().unwrap();
    assert_eq!(proto::decode_hello(&hello), Some((PROTOCOL_VERSION, 1)));
    let text = String::from_utf8_lossy(&answer[8..]);
    assert!(text.contains("version 1") && text.contains("99"), "{text}");
    others_still_served(&inst);
}

#[test]
fn a_silent_peer_is_dropped_after_the_handshake_deadline() {
    let inst = Instance::start("silent", ARGS);
    let mut s = raw(&inst);
    s.write_all(b"OSP").unwrap(); // a plausible start, then nothing
    let t = std::time::Instant::now();
    assert!(read_all(&mut s).is_empty());
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "dropped after {:?}",
        t.elapsed()
    );
    others_still_served(&inst);
}

#[test]
fn a_frame_longer_than_the_maximum_gets_bad_request_and_close() {
    let inst = Instance::start("oversize", ARGS);
    let mut s = inst.raw_client();
    s.write_all(&(10u32 << 20).to_le_bytes()).unwrap();
    let resp = read_response(&mut s);
    assert_eq!(resp.id, 0);
    match resp.outcome {
        Outcome::Err(e) => {
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains("exceeds the limit"), "{}", e.message);
        }
        Outcome::Ok => panic!("oversize frame accepted"),
    }
    assert!(read_all(&mut s).is_empty(), "closed after the error");
    others_still_served(&inst);
}

#[test]
fn a_corrupt_header_gets_bad_request_and_close() {
    let inst = Instance::start("corrupt", ARGS);
    let mut s = inst.raw_client();
    let body = [0x05u8, 0x03, 0xff, 0xfe, 0xfd]; // op string of invalid UTF-8
    s.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let resp = read_response(&mut s);
    assert!(
        matches!(resp.outcome, Outcome::Err(ref e) if e.kind == ErrorKind::BadRequest),
        "{resp:?}"
    );
    assert!(read_all(&mut s).is_empty());
    others_still_served(&inst);
}

#[test]
fn an_unknown_operation_is_a_typed_error_and_the_connection_goes_on() {
    let inst = Instance::start("unknownop", ARGS);
    let mut c = inst.client();
    match c.call("frobnicate", &[], b"x") {
        Err(ClientError::Remote(e)) => {
            assert_eq!(e.kind, ErrorKind::UnknownOp);
            assert!(
                e.message.contains("frobnicate") && e.message.contains("sha256"),
                "{}",
                e.message
            );
        }
        other => panic!("expected UnknownOp, got {other:?}"),
    }
    assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    others_still_served(&inst);
}

#[test]
fn a_payload_over_the_limit_is_refused_before_it_is_read() {
    let inst = Instance::start("toolarge", ARGS);
    let mut s = inst.raw_client();
    let buf = osps_testkit::request_header(7, "echo", &[], 1 << 30);
    s.write_all(&buf).unwrap();
    // No payload sent at all: the answer comes from the header alone.
    let resp = read_response(&mut s);
    assert_eq!(resp.id, 7);
    assert!(
        matches!(resp.outcome, Outcome::Err(ref e) if e.kind == ErrorKind::TooLarge),
        "{resp:?}"
    );
    drop(s);
    others_still_served(&inst);
}

#[test]
fn a_connection_closed_mid_payload_frees_its_slot() {
    let inst = Instance::start("midpayload", ARGS);
    let mut s = inst.raw_client();
    let mut buf = osps_testkit::request_header(1, "sha256", &[], 500_000);
    buf.extend_from_slice(&[b'x'; 10_000]);
    s.write_all(&buf).unwrap();
    inst.wait_status("slot taken while the payload arrives", |s| {
        s.segment.slots_in_use == 1
    });
    drop(s);
    inst.wait_status("slot returned", |s| s.segment.slots_in_use == 0);
    others_still_served(&inst);
    assert!(inst
        .log()
        .contains("client left inside a 500000-byte payload"));
}

#[test]
fn bad_arguments_are_invalid_input() {
    let inst = Instance::start("badargs", ARGS);
    let mut c = inst.client();
    for args in [&[][..], &["soon"][..], &["1", "2"][..]] {
        match c.call("sleep", args, &[]) {
            Err(ClientError::Remote(e)) => assert_eq!(e.kind, ErrorKind::InvalidInput),
            other => panic!("sleep {args:?}: {other:?}"),
        }
    }
    others_still_served(&inst);
}
