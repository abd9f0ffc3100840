//! `osps-worker --contain-memory BYTES -- PROGRAM ARGS...`, the launcher of
//! a worker under a pool's memory limit: the program runs in its place (same
//! pid) with `RLIMIT_DATA` at BYTES, soft and hard (so it cannot raise it
//! without `CAP_SYS_RESOURCE`);
//! an allocation past it fails in the program; a bad command line or a
//! program that cannot run is refused with exit status 127 and one line.

use std::process::{Command, Output};

use osps_testkit::bin;

fn launch(args: &[&str]) -> Output {
    Command::new(bin("osps-worker"))
        .args(args)
        .output()
        .expect("osps-worker runs")
}

#[test]
fn the_program_runs_in_its_place_under_the_limit() {
    let script = "echo $$ $PPID; ulimit -d; ulimit -Hd";
    let out = launch(&["--contain-memory", "33554432", "--", "sh", "-c", script]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // `ulimit -d` is in KiB.
    assert_eq!(lines[1..], ["32768", "32768"], "{text}");
    // The shell is the launcher's process: its parent is this test.
    let ppid: u32 = lines[0].split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(ppid, std::process::id(), "{text}");
}

#[test]
fn an_allocation_past_the_limit_fails_in_the_program() {
    let out = launch(&[
        "--contain-memory",
        "33554432",
        "--",
        "python3",
        "-c",
        "b'x' * (64 << 20)",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().last(), Some("MemoryError"), "{err}");
}

#[test]
fn a_bad_command_line_or_program_is_refused_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--contain-memory"],
            "usage: osps-worker [--contain-memory BYTES]",
        ),
        (
            &["--contain-memory", "x", "--", "true"],
            "BYTES must be a positive integer",
        ),
        (
            &["--contain-memory", "0", "--", "true"],
            "BYTES must be a positive integer",
        ),
        (&["--contain-memory", "1048576", "true"], "usage:"),
        (
            &["--contain-memory", "1048576", "--", "/no/such/program"],
            "cannot run /no/such/program: No such file or directory",
        ),
    ];
    for (args, says) in cases {
        let out = launch(args);
        assert_eq!(out.status.code(), Some(127), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("osps-worker --contain-memory: "), "{err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// With `--contain-cgroup DIR` the launcher runs the program only once it
/// is inside the cgroup DIR (the dispatcher moves it there after its
/// start), and passes DIR on in `OSPS_MEMORY_CGROUP`; one never moved is
/// refused with a line that says so. As root where memory cgroups can be
/// made (cgroup v1 here), else skipped, saying why.
#[test]
fn the_program_runs_only_once_the_launcher_is_in_its_cgroup() {
    use std::process::Stdio;
    use std::time::Duration;
    let runtime = tempfile::tempdir().unwrap();
    let instance = osps_testkit::unique_instance("contain-cg");
    let paths = ipc_core::RuntimePaths::new(&instance, Some(runtime.path())).unwrap();
    std::fs::create_dir(paths.dir()).unwrap();
    let cgroups = match ipc_core::cgroup::Cgroups::find(&paths) {
        Ok(c) => c,
        Err(why) => {
            osps_testkit::skip_without_cgroups(&why);
            return;
        }
    };
    let cgroup = cgroups.worker(64 << 20).unwrap();
    let dir = cgroup.dir().to_str().unwrap().to_owned();
    let script = "echo \"$OSPS_MEMORY_CGROUP\"; grep -x $$ \"$OSPS_MEMORY_CGROUP/cgroup.procs\"";
    let child = Command::new(bin("osps-worker"))
        .args(["--contain-cgroup", &dir, "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(300));
    // Still the launcher, waiting: the program has not run.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "osps-worker");
    cgroup.enter(pid).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, format!("{dir}\n{pid}\n"));
    // Never moved: refused after its patience.
    let out = launch(&["--contain-cgroup", &dir, "--", "true"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("not moved into the cgroup"), "{err}");
    drop(cgroup);
    cgroups.remove_all();
    assert!(!cgroups.base().exists());
}
