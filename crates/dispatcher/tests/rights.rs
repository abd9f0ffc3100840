//! Rights hold under any umask: the instance directory is 0700, the socket,
//! the segment, the lock and state files 0600, owned by the dispatcher's user.
//! (A file of its own, one test alone: the umask is per process and this test
//! sets it to 000.)

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use osps_testkit::Instance;

#[test]
fn modes_are_set_explicitly_even_under_umask_000() {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let inst = Instance::start_with("umask", osps_testkit::args!(1, 8, 65536), |paths| {
        // The base directory is the operator's, used as it is: a safe one.
        let base = paths.dir().parent().unwrap();
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o700)).unwrap();
    });
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
    assert_eq!(mode(&inst.paths.state_file()), 0o600, "state file");
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
}
