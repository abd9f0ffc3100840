//! Limits: connections beyond the maximum are refused with a clear message
//! while the others are served; a peer that stalls inside a request or stays
//! idle is dropped; everyone else is served throughout.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use osps_client::ClientError;
use osps_testkit::{Instance, PATIENCE};

/// Waits until the server closes `s`; returns how long it took.
fn closed_after(s: &mut UnixStream) -> Duration {
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    t.elapsed()
}

/// One worker, 8 MiB segment, 64 KiB payloads, then `extra` arguments.
fn one_worker(tag: &str, extra: &[&str]) -> Instance {
    Instance::start(tag, &[osps_testkit::args!(1, 8, 65536), extra].concat())
}

#[test]
fn connections_beyond_the_limit_are_refused_and_the_first_ones_still_served() {
    let limit = 50;
    let inst = Instance::start(
        "connlimit",
        osps_testkit::args!(2, 8, 65536, "--max-connections", "50"),
    );
    let mut first: Vec<_> = (0..limit).map(|_| inst.client()).collect();
    let mut refused = 0;
    for _ in 0..100 {
        match osps_client::Client::connect(&inst.endpoint()) {
            Err(ClientError::Refused(msg)) => {
                assert!(
                    msg.contains("full") && msg.contains("50 connections"),
                    "{msg}"
                );
                refused += 1;
            }
            other => panic!("connection over the limit not refused: {other:?}"),
        }
    }
    assert_eq!(refused, 100);
    for c in &mut first {
        assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    }
    // Room again once some leave.
    first.truncate(40);
    osps_testkit::wait_for(PATIENCE, || {
        osps_client::Client::connect(&inst.endpoint()).ok()
    })
    .expect("admitted again");
    let log = inst.log();
    assert!(
        log.matches("connection refused").count() < 100,
        "refusals are not logged one by one"
    );
}

/// A raw connection that sent a request announcing 1000 payload bytes and
/// then only 10 of them.
fn ten_of_1000_bytes(inst: &Instance, id: u64, op: &str) -> std::os::unix::net::UnixStream {
    let mut s = inst.raw_client();
    let mut buf = osps_testkit::request_header(id, op, &[], 1000);
    buf.extend_from_slice(&[1u8; 10]);
    s.write_all(&buf).unwrap();
    s
}

#[test]
fn a_peer_that_stalls_inside_a_request_is_dropped() {
    let inst = one_worker("stall", &["--frame-timeout-ms", "500"]);
    // Two bytes of a length prefix, then nothing.
    let mut header = inst.raw_client();
    header.write_all(&[9, 0]).unwrap();
    // A whole header announcing a payload, then only part of the payload.
    let mut payload = ten_of_1000_bytes(&inst, 1, "echo");
    // A payload the dispatcher refuses (status takes none) and skips, trickled then stalled.
    let mut refused = ten_of_1000_bytes(&inst, 2, "status");
    let mut c = inst.client();
    for s in [&mut header, &mut payload, &mut refused] {
        let took = closed_after(s);
        assert!(took < PATIENCE, "not dropped");
        assert_eq!(c.call("upper", &[], b"served").unwrap(), b"SERVED");
    }
    assert!(inst.log().contains("stalled"), "{}", inst.log());
    inst.wait_status("the stalled payload's slot is back", |s| {
        s.segment.slots_in_use == 0
    });
}

#[test]
fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let inst = one_worker("idle", &["--idle-timeout-ms", "600"]);
    let mut idle = inst.raw_client();
    let mut busy = inst.client();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        assert_eq!(busy.call("ping", &[], &[]).unwrap(), b"pong\n");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed_after(&mut idle) < PATIENCE);
    assert_eq!(
        busy.call("ping", &[], &[]).unwrap(),
        b"pong\n",
        "a connection in use stays open"
    );
    assert!(inst.log().contains("idle"));
}
