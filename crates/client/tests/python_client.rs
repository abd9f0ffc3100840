//! Checks `docs/PROTOCOL.md` against the running system: the Python client
//! written from that document alone must pass its self test against a real
//! dispatcher.

use std::process::Command;

use osps_testkit::Instance;

#[test]
fn the_python_client_written_from_the_protocol_document_passes_its_selftest() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    osps_testkit::write_token_file(&token_file, b"python-selftest-token-0123456789");
    let inst = Instance::start(
        "python",
        osps_testkit::args!(
            2,
            16,
            4194304,
            "--tcp",
            "127.0.0.1:0",
            "--token-file",
            token_file.to_str().unwrap()
        ),
    );
    let tcp = inst.status().tcp.expect("the TCP address in the status");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/examples/osps_client.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg("--socket")
        .arg(inst.paths.socket())
        .arg("--selftest")
        .arg("--selftest-tcp")
        .arg(&tcp)
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .expect("python3 runs (the machine has Python 3)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("selftest ok"),
        "selftest failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The dispatcher kept serving throughout.
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
}

#[test]
fn the_python_client_shows_too_large_at_once_instead_of_a_broken_pipe() {
    let inst = Instance::start("pytoolarge", osps_testkit::args!(1, 16, 4194304));
    // More than the limit plus the ~64 MiB the server drains before closing:
    // a client that only writes meets a closed socket, not the answer.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.iso");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(70 << 20)
        .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/examples/osps_client.py"
    );
    let started = std::time::Instant::now();
    let out = Command::new("python3")
        .arg(script)
        .arg("--socket")
        .arg(inst.paths.socket())
        .arg("sha256")
        .stdin(std::fs::File::open(&big).unwrap())
        .output()
        .expect("python3 runs");
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("python: too large answered in {took:?}: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(
            "error: too large: payload of 73400320 bytes exceeds the limit of 4194304 bytes"
        ) && err.contains("--max-payload"),
        "{err}"
    );
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
}
