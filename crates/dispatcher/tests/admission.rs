//! Admission under attack: a connection that pins slots (never reads its
//! replies, or stalls inside large requests) holds only its share and others'
//! pings stay fast; a client that does not read is dropped and its slots
//! freed (and the log says whether it wrote past its share meanwhile), while
//! one that reads slowly but steadily gets its large reply whole; silent TCP handshakes cannot lock out a client with the token; a
//! flood on one listener does not refuse the other's clients; and a low
//! open-file limit clamps the connection budget so that a killed worker is
//! still replaced.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ipc_core::{proto, Endpoint};
use osps_client::{Client, ClientError};
use osps_testkit::{Instance, PATIENCE};

const MIB: u64 = 1 << 20;
/// The largest payload whose slot (with the 4096-byte result reserve) is 2 MiB:
/// four of them fill an 8 MiB arena exactly.
const BIG: u64 = 2 * MIB - 4096;

/// The bytes of a request header announcing `payload_len` bytes.
fn header(id: u64, op: &str, payload_len: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    ipc_core::frame::encode(
        &proto::Request {
            id,
            op: op.into(),
            args: vec![],
            payload_len,
        },
        &mut buf,
    )
    .unwrap();
    buf
}

/// Sends from another thread (the server may stop reading us: that is the
/// point); the socket is shut down at the end of the test, which ends it.
fn send_in_background(mut s: UnixStream, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = s.write_all(&bytes);
    })
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99).div_ceil(100) - 1]
}

#[test]
fn a_connection_that_pins_slots_holds_only_its_share_and_others_pings_stay_fast() {
    let big = BIG.to_string();
    let inst = Instance::start(
        "pin",
        &[
            "--workers",
            "2",
            "--segment-mib",
            "8",
            "--max-payload",
            &big,
            // Long deadlines: the caps alone must protect the others here.
            "--write-timeout-ms",
            "120000",
            "--frame-timeout-ms",
            "120000",
        ],
    );
    // One connection sends four large echoes and never reads a reply; three
    // more send the header of a large request and stall. All of the same uid
    // as the pinging client, as every local client is.
    let mut attackers = Vec::new();
    let mut threads = Vec::new();
    let reader = inst.raw_client();
    let mut echoes = Vec::new();
    for id in 1..=4 {
        echoes.extend(header(id, "echo", BIG));
        echoes.extend(std::iter::repeat_n(7u8, BIG as usize));
    }
    attackers.push(reader.try_clone().unwrap());
    threads.push(send_in_background(reader, echoes));
    for id in 1..=3 {
        let s = inst.raw_client();
        attackers.push(s.try_clone().unwrap());
        threads.push(send_in_background(s, header(id, "sha256", BIG)));
    }
    // The attack holds what it may: three large slots (6 MiB) or more.
    let mut watcher = inst.client();
    let pinned = osps_testkit::wait_for(PATIENCE, || {
        let st = watcher.status().ok()?;
        (st.segment.slot_bytes_in_use >= 6 * MIB).then_some(st.segment.slot_bytes_in_use)
    })
    .unwrap_or_else(|| panic!("the attack never pinned its slots; log:\n{}", inst.log()));
    std::thread::sleep(Duration::from_millis(200));

    let mut c = Client::connect(&inst.endpoint()).unwrap();
    c.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut took = Vec::new();
    for i in 0..100 {
        let t = Instant::now();
        match c.call("ping", &[], &[]) {
            Ok(pong) => assert_eq!(pong, b"pong\n"),
            Err(e) => panic!(
                "ping {i} failed while one uid pins {pinned} bytes: {e}; log:\n{}",
                inst.log()
            ),
        }
        took.push(t.elapsed());
    }
    let p99 = p99(took.clone());
    let max = took.iter().max().copied().unwrap_or_default();
    println!("100 pings under the attack ({pinned} slot bytes pinned): p99 {p99:?}, max {max:?}");
    // The bound is 100 ms; generous here for loaded CI machines.
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    let st = watcher.status().unwrap();
    assert!(
        st.segment.slot_bytes_in_use < 8 * MIB,
        "the attack took the whole arena: {:?}",
        st.segment
    );
    for s in attackers {
        let _ = s.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
    inst.wait_status("the attack's slots are back", |s| {
        s.segment.slots_in_use == 0
    });
}

#[test]
fn a_client_that_does_not_read_its_replies_is_dropped_and_its_slots_freed() {
    let big = BIG.to_string();
    let inst = Instance::start(
        "noread",
        &[
            "--workers",
            "1",
            "--segment-mib",
            "8",
            "--max-payload",
            &big,
            "--write-timeout-ms",
            "500",
        ],
    );
    let s = inst.raw_client();
    let mut bytes = Vec::new();
    for id in 1..=2 {
        bytes.extend(header(id, "echo", MIB));
        bytes.extend(std::iter::repeat_n(1u8, MIB as usize));
    }
    let keep = s.try_clone().unwrap();
    let sender = send_in_background(s, bytes);
    inst.wait_status("the replies are written (or dropped)", |st| {
        st.jobs_done >= 1
    });
    inst.wait_status("the slots of a client that does not read are freed", |st| {
        st.segment.slots_in_use == 0
    });
    assert!(
        inst.log().contains("took no byte of its replies"),
        "{}",
        inst.log()
    );
    // The connection is closed: after what the kernel buffered, end of stream.
    let mut keep = keep;
    keep.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut rest = Vec::new();
    let t = Instant::now();
    let _ = keep.read_to_end(&mut rest);
    assert!(t.elapsed() < PATIENCE, "not closed");
    assert!(
        (rest.len() as u64) < 2 * MIB,
        "both replies were written whole"
    );
    let _ = keep.shutdown(Shutdown::Both);
    let _ = sender.join();
    assert_eq!(inst.client().call("upper", &[], b"ok").unwrap(), b"OK");
}

#[test]
fn a_slow_reader_that_keeps_reading_gets_a_large_reply_whole() {
    // The write deadline is about progress: a client that reads a reply
    // slowly but steadily (piping to a slow consumer, a thin tunnel) is
    // served however long the whole reply takes.
    const LEN: usize = 8 << 20;
    const CHUNK: usize = 64 << 10;
    const PAUSE: Duration = Duration::from_millis(20);
    let deadline = Duration::from_millis(500);
    let inst = Instance::start(
        "slowread",
        &[
            "--workers",
            "1",
            "--segment-mib",
            "32",
            "--max-payload",
            &LEN.to_string(),
            "--write-timeout-ms",
            &deadline.as_millis().to_string(),
        ],
    );
    let mut s = inst.raw_client();
    let payload: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let mut bytes = header(1, "echo", LEN as u64);
    bytes.extend_from_slice(&payload);
    let sender = send_in_background(s.try_clone().unwrap(), bytes);
    let resp: proto::Response = ipc_core::frame::read_frame(&mut s, &mut Vec::new(), 4096)
        .unwrap_or_else(|e| panic!("no reply header: {e}; log:\n{}", inst.log()));
    assert_eq!(resp.id, 1);
    assert!(matches!(resp.outcome, proto::Outcome::Ok), "{resp:?}");
    assert_eq!(resp.result_len, LEN as u64);
    let t = Instant::now();
    let mut got = Vec::with_capacity(LEN);
    let mut chunk = vec![0u8; CHUNK];
    while got.len() < LEN {
        let n = CHUNK.min(LEN - got.len());
        s.read_exact(&mut chunk[..n]).unwrap_or_else(|e| {
            panic!(
                "the reply was cut after {} of {LEN} bytes ({:?} into it): {e}; log:\n{}",
                got.len(),
                t.elapsed(),
                inst.log()
            )
        });
        got.extend_from_slice(&chunk[..n]);
        std::thread::sleep(PAUSE);
    }
    let took = t.elapsed();
    println!("{LEN} bytes read at 64 KiB per 20 ms in {took:?} (write deadline {deadline:?})");
    assert!(took > 4 * deadline, "the reply took only {took:?}");
    assert!(got == payload, "the reply's bytes differ from the payload");
    sender.join().unwrap();
    // The connection goes on.
    s.write_all(&header(2, "ping", 0)).unwrap();
    let resp: proto::Response = ipc_core::frame::read_frame(&mut s, &mut Vec::new(), 4096)
        .unwrap_or_else(|e| panic!("the connection did not go on: {e}; log:\n{}", inst.log()));
    assert_eq!((resp.id, resp.result_len), (2, 5));
    let mut pong = [0u8; 5];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong\n");
    assert!(
        !inst.log().contains("dropping a connection"),
        "{}",
        inst.log()
    );
}

#[test]
fn a_client_that_writes_past_its_share_without_reading_is_dropped_and_the_log_says_why() {
    // The connection's share of an 8 MiB arena is 2 MiB: one large request.
    let big = BIG.to_string();
    let inst = Instance::start(
        "pastshare",
        &[
            "--workers",
            "1",
            "--segment-mib",
            "8",
            "--max-payload",
            &big,
            "--write-timeout-ms",
            "500",
        ],
    );
    // A client that writes two large echoes and reads nothing: the second
    // waits for the first's slot, which only its reply being written frees,
    // while the client, blocked writing the second's payload, does not read.
    let s = inst.raw_client();
    let mut bytes = Vec::new();
    for id in 1..=2 {
        bytes.extend(header(id, "echo", BIG));
        bytes.extend(std::iter::repeat_n(1u8, BIG as usize));
    }
    let keep = s.try_clone().unwrap();
    let sender = send_in_background(s, bytes);
    let dropped = osps_testkit::wait_for(PATIENCE, || {
        let log = inst.log();
        log.lines()
            .find(|l| l.contains("dropping a connection"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("not dropped; log:\n{}", inst.log()));
    println!("{dropped}");
    assert!(
        dropped.contains("own share of the arena")
            && dropped.contains("--conn-arena-percent")
            && dropped.contains("without reading its replies"),
        "the drop does not say the client wrote past its share without reading: {dropped}"
    );
    inst.wait_status("the slots are freed", |st| st.segment.slots_in_use == 0);
    let _ = keep.shutdown(Shutdown::Both);
    let _ = sender.join();
    // A client that sends one request and does not read its reply is
    // dropped for that alone (drops are logged at most once a second).
    std::thread::sleep(Duration::from_millis(1100));
    let s = inst.raw_client();
    let keep = s.try_clone().unwrap();
    let mut bytes = header(3, "echo", MIB);
    bytes.extend(std::iter::repeat_n(1u8, MIB as usize));
    let sender = send_in_background(s, bytes);
    let plain = osps_testkit::wait_for(PATIENCE, || {
        let log = inst.log();
        log.lines()
            .filter(|l| l.contains("dropping a connection"))
            .nth(1)
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("not dropped; log:\n{}", inst.log()));
    println!("{plain}");
    assert!(
        plain.contains("did not read its replies") && !plain.contains("--conn-arena-percent"),
        "{plain}"
    );
    inst.wait_status("the slots are freed", |st| st.segment.slots_in_use == 0);
    let _ = keep.shutdown(Shutdown::Both);
    let _ = sender.join();
}

/// The token file for a TCP instance and its bytes.
fn token(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let token = b"0123456789abcdef0123456789abcdef".to_vec();
    let path = dir.join("token");
    osps_testkit::write_token_file(&path, &token);
    (path, token)
}

#[test]
fn silent_tcp_handshakes_cannot_lock_out_a_client_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let (path, token) = token(dir.path());
    let inst = Instance::start(
        "silent",
        &[
            "--workers",
            "1",
            "--segment-mib",
            "8",
            "--max-payload",
            "65536",
            "--tcp",
            "127.0.0.1:0",
            "--token-file",
            path.to_str().unwrap(),
        ],
    );
    let addr: SocketAddr = inst.status().tcp.expect("tcp").parse().unwrap();
    // 250 connections that never say a word (the budget is 128), from the
    // client's own address, and 100 more from four others (past any
    // per-address share).
    let mut silent: Vec<TcpStream> = (0..250)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    for i in 0..100u8 {
        let from = std::net::Ipv4Addr::new(127, 0, 0, 2 + i % 4);
        silent.push(connect_from(from, addr).expect("connect from another loopback address"));
    }
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..3 {
        let t = Instant::now();
        let mut c =
            Client::connect_within(&Endpoint::Tcp(addr), Some(&token), Duration::from_secs(5))
                .unwrap_or_else(|e| {
                    panic!("round {round}: a client with the token was locked out: {e}")
                });
        assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
        let took = t.elapsed();
        println!("round {round}: admitted and answered in {took:?} behind 350 silent connections");
        assert!(took < Duration::from_secs(5));
        // More silent ones between rounds.
        let _more: Vec<TcpStream> = (0..50)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
    }
    drop(silent);
    assert!(inst.log().contains("evicted"), "{}", inst.log());
}

/// A TCP connection to `to` from the local address `from`.
fn connect_from(from: std::net::Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::from((from, 0)).into())?;
    s.connect(&to.into())?;
    Ok(s.into())
}

#[test]
fn a_flood_on_the_tcp_listener_does_not_refuse_unix_clients() {
    let inst = Instance::start(
        "flood",
        &[
            "--workers",
            "1",
            "--segment-mib",
            "8",
            "--max-payload",
            "65536",
            "--tcp",
            "127.0.0.1:0",
            "--max-connections",
            "20",
        ],
    );
    let addr: SocketAddr = inst.status().tcp.expect("tcp").parse().unwrap();
    // A flood of TCP clients (no token needed on this loopback port) to its limit.
    let flood: Vec<Client> = (0..20)
        .map(|_| Client::connect(&Endpoint::Tcp(addr)).expect("admitted"))
        .collect();
    match Client::connect(&Endpoint::Tcp(addr)) {
        Err(ClientError::Refused(line)) => {
            assert!(line.contains("--max-tcp-connections"), "{line}")
        }
        other => panic!("TCP over its budget not refused: {other:?}"),
    }
    // The Unix socket's clients are served: a budget of their own.
    let mut unix: Vec<Client> = (0..15)
        .map(|_| {
            Client::connect(&inst.endpoint())
                .unwrap_or_else(|e| panic!("a Unix client refused under a TCP flood: {e}"))
        })
        .collect();
    for c in &mut unix {
        assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    }
    drop(flood);
}

/// The budget the dispatcher said it clamped `--max-connections` to.
fn clamped_to(log: &str) -> Option<usize> {
    let line = log.lines().find(|l| l.contains("clamped to"))?;
    let rest = &line[line.find("clamped to ")? + "clamped to ".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn under_a_low_fd_limit_connections_are_clamped_and_a_killed_worker_is_replaced() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let inst = Instance::start_under(
        "fdlimit",
        &["prlimit", "--nofile=64:64"],
        &[
            "--workers",
            "2",
            "--segment-mib",
            "8",
            "--max-payload",
            "65536",
        ],
    );
    // Fill the budget (and try past it: refused, or held off).
    let mut clients = Vec::new();
    let mut failed_in_a_row = 0;
    for _ in 0..100 {
        match Client::connect_within(&inst.endpoint(), None, Duration::from_millis(500)) {
            Ok(c) => {
                clients.push(c);
                failed_in_a_row = 0;
            }
            Err(ClientError::Refused(_)) => {}
            Err(e) => {
                println!("over the limit: {e}");
                failed_in_a_row += 1;
                if failed_in_a_row == 3 {
                    break;
                }
            }
        }
    }
    println!("{} clients admitted under an fd limit of 64", clients.len());
    let before = clients[0].status().unwrap();
    let victim = before.workers[0].pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let replaced = osps_testkit::wait_for(PATIENCE, || {
        let st = clients[0].status().ok()?;
        let w = &st.workers[0];
        (w.pid != victim && w.pid != 0 && w.state == "idle").then_some(())
    });
    assert!(
        replaced.is_some(),
        "the killed worker was not replaced; log:\n{}",
        inst.log()
    );
    assert!(
        !inst.log().contains("Too many open files"),
        "{}",
        inst.log()
    );
    for c in &mut clients {
        assert_eq!(c.call("ping", &[], &[]).unwrap(), b"pong\n");
    }
    let log = inst.log();
    let limit = clamped_to(&log).unwrap_or_else(|| panic!("no clamp said at start:\n{log}"));
    assert!(
        log.contains("--max-connections 1024 clamped to") && log.contains("open-file limit is 64"),
        "{log}"
    );
    assert_eq!(clients.len(), limit, "admitted clients");
}
