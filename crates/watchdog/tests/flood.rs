//! A flood does not starve the heartbeat: with both listeners full, a
//! dispatcher that stalls briefly (its heartbeat connection times out, so the
//! watchdog reconnects) is admitted at once and kept, not restarted.

use std::net::SocketAddr;
use std::time::Duration;

use ipc_core::Endpoint;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::{Client, ClientError};
use osps_testkit::Instance;

#[test]
fn a_supervised_dispatcher_under_a_connection_flood_keeps_its_heartbeat() {
    let inst = Instance::supervised(
        "hbflood",
        &["--heartbeat-ms", "200", "--miss-limit", "8"],
        osps_testkit::args!(
            1,
            8,
            65536,
            "--tcp",
            "127.0.0.1:0",
            "--max-connections",
            "10",
            "--max-tcp-connections",
            "10"
        ),
    );
    let st = inst.status();
    let pid = st.dispatcher_pid;
    let addr: SocketAddr = st.tcp.expect("tcp").parse().unwrap();
    // Both listeners full: every further client is refused.
    let mut unix: Vec<Client> = Vec::new();
    osps_testkit::wait_for(osps_testkit::PATIENCE, || {
        match Client::connect(&inst.endpoint()) {
            Ok(c) => unix.push(c),
            Err(ClientError::Refused(_)) => return Some(()),
            Err(e) => panic!("{e}"),
        }
        None
    })
    .expect("the Unix listener fills");
    let tcp: Vec<Client> = (0..10)
        .map(|_| Client::connect(&Endpoint::Tcp(addr)).expect("admitted"))
        .collect();
    assert!(matches!(
        Client::connect(&Endpoint::Tcp(addr)),
        Err(ClientError::Refused(_))
    ));
    // A stall longer than the heartbeat's interval: the watchdog drops its
    // connection and must connect again while the dispatcher is full.
    let signal = |sig| {
        if let Err(e) = kill(Pid::from_raw(pid as i32), sig) {
            panic!(
                "the dispatcher (pid {pid}) is gone ({e}): killed under the flood; log:\n{}",
                inst.log()
            );
        }
    };
    for _ in 0..3 {
        signal(Signal::SIGSTOP);
        std::thread::sleep(Duration::from_millis(300));
        signal(Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(1500));
    }
    let st = unix[0].status().unwrap_or_else(|e| {
        panic!(
            "the dispatcher was killed under the flood ({e}); log:\n{}",
            inst.log()
        )
    });
    assert_eq!(
        st.dispatcher_pid,
        pid,
        "the dispatcher was restarted under the flood; log:\n{}",
        inst.log()
    );
    assert_eq!(st.watchdog.expect("supervised").restarts, 0);
    assert!(!inst.log().contains("hung"), "{}", inst.log());
    drop(tcp);
}
