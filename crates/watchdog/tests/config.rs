//! `osps-watchdog --config FILE`: the file reaches every dispatcher the
//! watchdog starts (restarts included); a file it cannot read, or one the
//! dispatcher refuses (checked once with `--check-config`), stops it at once
//! with one line naming the file, before any dispatcher starts.

use std::process::Command;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_testkit::{bin, run_to_exit, unique_instance, Instance};

#[test]
fn each_dispatcher_started_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("osps.toml");
    std::fs::write(
        &path,
        "segment_mib = 8\nmax_payload = 65536\n[pools.builtin]\nworkers = 3\n",
    )
    .unwrap();
    let inst = Instance::supervised("wcfg", &["--config", path.to_str().unwrap()], &[]);
    let st = inst.status();
    // Not the defaults (a worker per CPU, a 256 MiB segment): the file's.
    assert_eq!(st.workers.len(), 3, "{st:?}");
    assert!(st.segment.size < 64 << 20, "{st:?}");
    let first = inst.dispatcher_pid();
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let st = inst.wait_status("a restarted dispatcher with the file's 3 workers", |s| {
        s.dispatcher_pid != first && s.workers.len() == 3
    });
    assert!(
        st.watchdog.as_ref().is_some_and(|w| w.restarts >= 1),
        "{st:?}"
    );
}

/// Runs the watchdog with `--config path`; it must stop at once, having
/// started no dispatcher: returns its stderr.
fn refused(runtime: &std::path::Path, path: &std::path::Path) -> String {
    let instance = unique_instance("wcfgno");
    let out = run_to_exit(
        Command::new(bin("osps-watchdog"))
            .args(["--instance", &instance, "--runtime-dir"])
            .arg(runtime)
            .arg("--config")
            .arg(path),
        "the watchdog",
    );
    assert!(!out.status.success());
    // It stopped before starting anything: no dispatcher ever made a socket.
    let paths = ipc_core::RuntimePaths::new(&instance, Some(runtime)).unwrap();
    assert!(!paths.socket().exists() && !paths.lock_file().exists());
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_config_file_it_cannot_read_stops_the_watchdog_at_once() {
    let runtime = tempfile::tempdir().unwrap();
    let missing = runtime.path().join("osps.tmol");
    let err = refused(runtime.path(), &missing);
    let want = format!(
        "osps-watchdog: {}: cannot read the configuration file",
        missing.display()
    );
    assert!(err.starts_with(&want), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_config_file_the_dispatcher_refuses_stops_the_watchdog_at_once() {
    let runtime = tempfile::tempdir().unwrap();
    let path = runtime.path().join("osps.toml");
    std::fs::write(&path, "segment_mib = 8\nmax_paylod = 65536\n").unwrap();
    let err = refused(runtime.path(), &path);
    let want = format!(
        "osps-dispatcher: {}:2: unknown key \"max_paylod\" (did you mean \"max_payload\"?)",
        path.display()
    );
    assert_eq!(err.trim_end(), want);
}
