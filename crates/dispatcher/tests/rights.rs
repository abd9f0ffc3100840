//! Rights hold under any umask: the runtime directory is 0700, the socket and
//! the segment 0600, owned by the dispatcher's user. (A file of its own: the
//! umask is per process and this test sets it to 000.)

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use osps_testkit::Instance;

#[test]
fn modes_are_set_explicitly_even_under_umask_000() {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let inst = Instance::start(
        "umask",
        &[
            "--workers",
            "1",
            "--segment-mib",
            "8",
            "--max-payload",
            "65536",
        ],
    );
    nix::sys::stat::umask(old);
    let uid = nix::unistd::getuid().as_raw();
    let mode = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(m.uid(), uid, "{} owned by us", p.display());
        m.permissions().mode() & 0o777
    };
    assert_eq!(mode(inst.paths.dir()), 0o700, "runtime directory");
    assert_eq!(mode(&inst.paths.socket()), 0o600, "socket");
    assert_eq!(mode(&inst.paths.segment_path()), 0o600, "segment");
    assert_eq!(mode(&inst.paths.lock_file()), 0o600, "lock file");
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
}

/// `osps-client ping` run as `nobody` against `socket`: exit code and stderr.
/// The client is copied next to the socket first: the checkout itself may
/// sit where `nobody` cannot read.
fn ping_as_nobody(socket: &std::path::Path) -> (Option<i32>, String) {
    let client = socket.parent().unwrap().join("osps-client-for-nobody");
    std::fs::copy(osps_testkit::bin("osps-client"), &client).unwrap();
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&client)
        .arg("--connect")
        .arg(format!("unix:{}", socket.display()))
        .args(["ping", "--timeout-ms", "2000"])
        .output()
        .expect("setpriv runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn open_to_everyone(inst: &Instance) {
    // So that the kernel lets `nobody` reach the socket: what refuses it then is the peer-credential check.
    let socket = inst.paths.socket();
    for (p, m) in [
        (inst.runtime_dir(), 0o755),
        (inst.paths.dir(), 0o755),
        (socket.as_path(), 0o666),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
}

#[test]
fn an_unprivileged_uid_is_refused_by_its_peer_credentials() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: connecting as another uid needs root");
        return;
    }
    let args = [
        "--workers",
        "1",
        "--segment-mib",
        "8",
        "--max-payload",
        "65536",
    ];
    let inst = Instance::start("peercred", &args);
    open_to_everyone(&inst);
    let (code, err) = ping_as_nobody(&inst.paths.socket());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("denied") && err.contains("uid 65534") && err.contains("--allow-uid"),
        "{err}"
    );
    assert_eq!(
        inst.client().call("ping", &[], &[]).unwrap(),
        b"pong\n",
        "our own uid is served"
    );

    let mut allowed = args.to_vec();
    allowed.extend(["--allow-uid", "65534"]);
    let inst = Instance::start("peercredok", &allowed);
    open_to_everyone(&inst);
    let (code, err) = ping_as_nobody(&inst.paths.socket());
    assert_eq!(code, Some(0), "admitted with --allow-uid: {err}");
}
