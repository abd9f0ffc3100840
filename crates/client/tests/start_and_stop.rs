//! The edges of a dispatcher's life as `osps-client` sees them: a client
//! started just before the dispatcher (as `osps-watchdog ... & osps-client
//! status` does) waits for it; a client whose job was cut off by an ordered
//! shutdown says so, in the server's words, when it gives up.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use osps_testkit::Instance;

const ARGS: &[&str] = osps_testkit::args!(1, 16, 1048576);

/// A running `osps-client`, killed and reaped if the test fails before it ends.
use osps_testkit::Reaped as Running;

fn spawn_client(instance: &str, runtime_dir: &std::path::Path, args: &[&str]) -> Running {
    let mut cmd = osps_testkit::client_command(instance, runtime_dir);
    let child = osps_testkit::spawn_capturing(cmd.args(args), Stdio::null()).unwrap();
    Running(Some(child))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_client_started_just_before_the_dispatcher_waits_for_it() {
    for args in [
        &["status", "--json"][..],
        &["ping", "--timeout", "20000"][..],
    ] {
        let mut client = None;
        // Nothing runs yet, and there is no socket or lock file: the client
        // starts first, the dispatcher a moment later (well inside the 2 s
        // start grace, even on a loaded machine).
        let inst = Instance::start_with("startwindow", ARGS, |paths| {
            let base = paths.dir().parent().unwrap();
            client = Some(spawn_client(paths.instance(), base, args));
            std::thread::sleep(Duration::from_millis(200));
        });
        // Before: "No such file or directory" at once.
        let out = client.unwrap().output();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        if args[0] == "status" {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["dispatcher_pid"], inst.pid());
        } else {
            assert!(text(&out.stdout).starts_with("pong from unix:"));
        }
    }
    // With nothing there at all, it still fails, after the short grace.
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = spawn_client("nothing", dir.path(), &["status"]).output();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(8), "{err}");
}

#[test]
fn a_job_cut_off_by_a_shutdown_reports_the_shutdown_not_the_missing_socket() {
    let mut args = ARGS.to_vec();
    args.extend(["--drain-timeout-ms", "300"]);
    let inst = Instance::start("cutoff", &args);
    let client = spawn_client(inst.name(), inst.runtime_dir(), &["run", "sleep", "20000"]);
    inst.wait_status("the job runs", |s| s.in_flight == 1);
    inst.signal(Signal::SIGTERM);
    let out = client.output();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Before: "cannot connect to unix:...: No such file or directory".
    assert!(
        err.starts_with("osps-client: shutting down: ") && err.contains("drain deadline"),
        "{err}"
    );
}
