//! Pipelined large requests: the client reads replies while it writes. The
//! dispatcher lets one connection hold a quarter of the slot arena, so it
//! takes a second large request only once the first one's reply has been
//! read; a client that only writes while it sends would never read that
//! reply, and the dispatcher's write deadline would drop it.

use std::time::Instant;

use osps_testkit::Instance;

#[test]
fn two_large_pipelined_requests_both_get_their_answers() {
    // 64 MiB arena: a connection may hold 16 MiB, less than two 10 MiB requests.
    let inst = Instance::start(
        "pipelined",
        osps_testkit::args!(2, 64, 16777216, "--write-timeout-ms", "2000"),
    );
    let a: Vec<u8> = (0..10u32 << 20).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..10u32 << 20).map(|i| (i % 241) as u8).collect();
    let mut c = inst.client();
    let started = Instant::now();
    // Before: ConnectionReset once the dispatcher gave up writing reply 1.
    let ia = c.send("echo", &[], &a).expect("send a");
    let ib = c.send("echo", &[], &b).expect("send b");
    assert!(c.wait(ia).expect("answer a") == a, "answer a");
    assert!(c.wait(ib).expect("answer b") == b, "answer b");
    eprintln!("two pipelined 10 MiB echoes in {:?}", started.elapsed());
    // The connection is still good.
    assert_eq!(c.call("echo", &[], b"after").unwrap(), b"after");
}
