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
        &[
            "--workers",
            "2",
            "--segment-mib",
            "16",
            "--max-payload",
            "4194304",
            "--tcp",
            "127.0.0.1:0",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
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
