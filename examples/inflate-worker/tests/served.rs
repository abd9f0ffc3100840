//! The example worker served by a real dispatcher (`--worker-exe`), called
//! over its socket with the client library: its operations' bytes, a typed
//! error for corrupt gzip, `ping` answered by the SDK, and a clean stop.

use std::io::Read;
use std::time::Duration;

use ipc_core::proto::ErrorKind;
use osps_testkit::Instance;

const WORKER: &str = env!("CARGO_BIN_EXE_inflate-worker");

fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn remote_kind(e: osps_client::ClientError) -> ErrorKind {
    match e {
        osps_client::ClientError::Remote(e) => e.kind,
        other => panic!("a typed error expected, got {other}"),
    }
}

fn serve(tag: &str) -> Instance {
    Instance::start(tag, &["--worker-exe", WORKER, "--workers", "2"])
}

#[test]
fn ping_works_against_a_dispatcher_whose_only_worker_is_the_example() {
    let inst = serve("inflate-ping");
    let mut c = inst.client();
    c.ping().unwrap();
    assert_eq!(c.call("ping", &[], b"ignored").unwrap(), b"pong\n");
    assert_eq!(
        remote_kind(c.call("ping", &["x"], b"").unwrap_err()),
        ErrorKind::InvalidInput
    );
    let st = inst.status();
    assert_eq!(st.workers.len(), 2);
    assert!(st.workers.iter().all(|w| w.restarts == 0), "{st:?}");
}

#[test]
fn gzip_and_gunzip_crc32_answer_the_right_bytes() {
    let inst = serve("inflate-ops");
    let mut c = inst.client();
    // Random data grows under gzip (by a few bytes), and fits in the slot.
    let data = osps_testkit::noise(1 << 20);
    let gz = c.call("gzip", &[], &data).unwrap();
    assert!(gz.len() > data.len(), "{} bytes", gz.len());
    assert_eq!(gunzip(&gz), data);
    // Text shrinks; a level is an argument.
    let text = b"the quick brown fox jumps over the lazy dog\n".repeat(1000);
    let gz9 = c.call("gzip", &["9"], &text).unwrap();
    assert!(gz9.len() < text.len() / 10);
    assert_eq!(gunzip(&gz9), text);
    // Decompression of untrusted input: length and CRC-32 of what is inside.
    let expected = |d: &[u8]| format!("{} {:08x}\n", d.len(), crc32fast::hash(d)).into_bytes();
    assert_eq!(c.call("gunzip_crc32", &[], &gz9).unwrap(), expected(&text));
    // Over 1 MiB: the dispatcher may hand it to the streaming operation while it arrives.
    assert_eq!(c.call("gunzip_crc32", &[], &gz).unwrap(), expected(&data));
    assert_eq!(
        c.call("gunzip_crc32", &[], &gzip_of(b"")).unwrap(),
        expected(b"")
    );
}

fn gzip_of(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn corrupt_or_truncated_gzip_and_bad_arguments_get_typed_errors() {
    let inst = serve("inflate-bad");
    let mut c = inst.client();
    let gz = gzip_of(&b"abc".repeat(5000));
    let mut flipped = gz.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    for bad in [&b"not gzip at all"[..], &gz[..gz.len() - 4], &flipped] {
        let e = c.call("gunzip_crc32", &[], bad).unwrap_err();
        let osps_client::ClientError::Remote(e) = e else {
            panic!("typed error expected, got {e}")
        };
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
        assert!(e.message.contains("not valid gzip"), "{e}");
    }
    assert_eq!(
        remote_kind(c.call("gzip", &["11"], b"x").unwrap_err()),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        remote_kind(c.call("gunzip_crc32", &["x"], b"").unwrap_err()),
        ErrorKind::InvalidInput
    );
    let e = c.call("sha256", &[], b"").unwrap_err();
    let osps_client::ClientError::Remote(e) = e else {
        panic!("typed error expected, got {e}")
    };
    assert_eq!(e.kind, ErrorKind::UnknownOp);
    assert!(
        e.message
            .ends_with("known: gunzip, gunzip_crc32, gzip, ping"),
        "{e}"
    );
    // Errors are answers, not crashes: the workers are the first ones still.
    let st = inst.status();
    assert!(st.workers.iter().all(|w| w.restarts == 0), "{st:?}");
    assert_eq!(c.call("gunzip_crc32", &[], &gz).unwrap()[..6], *b"15000 ");
}

#[test]
fn the_example_worker_stops_with_its_dispatcher_and_leaves_nothing() {
    let mut inst = serve("inflate-stop");
    let workers = inst.worker_pids();
    inst.client().ping().unwrap();
    inst.signal(nix::sys::signal::Signal::SIGTERM);
    let status = inst
        .wait_exit(Duration::from_secs(10))
        .expect("dispatcher exits");
    assert_eq!(status.code(), Some(0), "log:\n{}", inst.log());
    for w in workers {
        assert!(
            osps_testkit::proc_info(w).is_none(),
            "worker {w} still exists"
        );
    }
    assert_eq!(inst.leftovers(), Vec::<String>::new());
    assert!(
        inst.log().contains("worker stopped: exit status 0"),
        "log:\n{}",
        inst.log()
    );
}

#[test]
fn gunzip_answers_results_many_times_its_input_up_to_the_pools_limit() {
    let inst = Instance::start(
        "inflate-gunzip",
        &[
            "--worker-exe",
            WORKER,
            "--workers",
            "1",
            "--max-result-mib",
            "3",
        ],
    );
    let mut c = inst.client();
    // 2.5 MiB of text from a few KiB of gzip: the result grows through
    // areas of twice the size each time, until twice the last one (4 MiB)
    // passes the 3 MiB limit: then the worker asks for less (PROTOCOL
    // §13.14) and the job succeeds.
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog\n"
        .iter()
        .copied()
        .cycle()
        .take(5 << 19)
        .collect();
    let gz = gzip_of(&text);
    assert!(gz.len() < 40_000, "{}", gz.len());
    assert!(c.call("gunzip", &[], &gz).unwrap() == text);
    // A decompression bomb past the limit: a typed error, and the worker serves on.
    let bomb = gzip_of(&vec![0u8; 8 << 20]);
    let e = c.call("gunzip", &[], &bomb).unwrap_err();
    let osps_client::ClientError::Remote(e) = e else {
        panic!("typed error expected, got {e}")
    };
    assert_eq!(e.kind, ErrorKind::TooLarge, "{e}");
    assert!(e.message.contains("max_result_mib"), "{e}");
    // The connection stays open (only a payload over the limit closes it),
    // and the client library knows it.
    assert_eq!(c.call("gunzip", &[], &gzip_of(b"small")).unwrap(), b"small");
    let st = inst.status();
    assert!(st.workers.iter().all(|w| w.restarts == 0), "{st:?}");
}
