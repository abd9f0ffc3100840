//! The shipped systemd units, checked by systemd's own tool: the service's
//! sandbox rates an exposure of 3.0 or less in `systemd-analyze security`,
//! with and without the drop-in for pools that run as other users, and
//! `systemd-analyze verify` passes once the binaries are where the units
//! expect them (in a root directory the test builds, never in the host's
//! `/usr/local/bin`) and fails when they are not.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn contrib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd")
}

/// `systemd-analyze ARGS`, run in `dir`; panics with how to get it when it
/// is missing (Debian's `systemd` package, on every Debian system).
fn analyze(dir: &Path, args: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze: {e} (it comes with Debian's systemd package)"))
}

/// The figure of "→ Overall exposure level for osps.service: 1.2 OK".
fn exposure(out: &Output) -> f64 {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    let figure = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next());
    figure
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure in {line:?}"))
}

/// A root directory for `systemd-analyze --root`: systemd's own units (the
/// targets ours name), the watchdog at `/usr/local/bin`, `kill`, our units in
/// `/etc/systemd/system`, and the drop-in when `drop_in`.
fn root(drop_in: bool) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    let copied = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(copied.success(), "copying systemd's units");
    let bin = r.join("usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_osps-watchdog"),
        bin.join("osps-watchdog"),
    )
    .unwrap();
    // ExecReload's /bin/kill, where Debian has it (/bin is /usr/bin).
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
    std::fs::copy("/usr/bin/kill", r.join("usr/bin/kill")).unwrap();
    let units = r.join("etc/systemd/system");
    std::fs::create_dir_all(units.join("osps.service.d")).unwrap();
    for entry in std::fs::read_dir(contrib()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.ends_with(".service") || name.ends_with(".socket") {
            std::fs::copy(&path, units.join(&name)).unwrap();
        }
    }
    if drop_in {
        let conf = contrib().join("pools-as-users.conf");
        std::fs::copy(conf, units.join("osps.service.d/pools-as-users.conf")).unwrap();
    }
    root
}

#[test]
fn the_shipped_service_is_rated_an_exposure_of_3_or_less() {
    let unit = contrib().join("osps.service");
    let out = analyze(
        &contrib(),
        &["security", "--offline=yes", unit.to_str().unwrap()],
    );
    let level = exposure(&out);
    println!("osps.service: exposure {level}");
    assert!(
        level <= 3.0,
        "exposure {level} > 3.0:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The old unit was rated 8.5: the figure read is the one that moves.
    assert!(level > 0.0);
}

#[test]
fn with_the_drop_in_for_pools_as_other_users_the_exposure_stays_at_3_or_less() {
    let root = root(true);
    let r = root.path().to_str().unwrap();
    let out = analyze(
        root.path(),
        &["security", "--offline=yes", "--root", r, "osps.service"],
    );
    let level = exposure(&out);
    println!("osps.service with pools-as-users.conf: exposure {level}");
    let text = String::from_utf8_lossy(&out.stdout);
    // The drop-in took effect: the service runs as root with capabilities.
    assert!(text.contains("Service runs as root"), "{text}");
    assert!(level <= 3.0, "exposure {level} > 3.0:\n{text}");
}

#[test]
fn verify_passes_with_the_binaries_installed_and_fails_without() {
    for drop_in in [false, true] {
        let root = root(drop_in);
        let r = root.path().to_str().unwrap();
        let mut units = vec!["osps.service".to_owned()];
        if contrib().join("osps.socket").exists() {
            units.push("osps.socket".to_owned());
        }
        for unit in &units {
            let out = analyze(root.path(), &["verify", "--root", r, unit]);
            let said = String::from_utf8_lossy(&out.stderr);
            // verify only warns (exit 0) about a line it cannot parse: any
            // word from it is a defect too.
            assert!(
                out.status.success() && said.trim().is_empty(),
                "{unit} (drop-in: {drop_in}): {:?}\n{said}",
                out.status
            );
        }
        std::fs::remove_file(root.path().join("usr/local/bin/osps-watchdog")).unwrap();
        let out = analyze(root.path(), &["verify", "--root", r, "osps.service"]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "verify passed without the binary");
        assert!(said.contains("is not executable"), "{said}");
    }
}
