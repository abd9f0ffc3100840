//! The `osps-client` command against a real dispatcher.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use osps_testkit::{bin, Instance};

fn cli(inst: &Instance, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = osps_testkit::spawn_piped(
        Command::new(bin("osps-client"))
            .args([
                "--instance",
                inst.name(),
                "--retry-ms",
                "300",
                "--runtime-dir",
            ])
            .arg(inst.runtime_dir())
            .args(args),
    )
    .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

const ARGS: &[&str] = osps_testkit::args!(2, 16, 4194304);

/// Asserts that less than `secs` seconds passed since `started`.
fn assert_within(started: std::time::Instant, secs: u64) {
    assert!(
        started.elapsed() < std::time::Duration::from_secs(secs),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn run_ping_and_status_do_what_they_say() {
    let inst = Instance::start("cli", ARGS);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&input, &data).unwrap();

    let out = cli(
        &inst,
        &["run", "sha256", "--input", input.to_str().unwrap()],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, osps_testkit::sha256_line(&data));
    assert!(
        out.stderr.is_empty(),
        "no progress when stderr is not a terminal: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = cli(&inst, &["run", "upper", "--input", "-"], b"from stdin\n");
    assert_eq!(out.stdout, b"FROM STDIN\n");

    let output = dir.path().join("out.bin");
    let out = cli(
        &inst,
        &[
            "run",
            "echo",
            "-i",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ],
        b"",
    );
    assert!(out.status.success());
    assert!(std::fs::read(&output).unwrap() == data);

    let out = cli(&inst, &["run", "sleep", "5"], b"");
    assert_eq!(out.stdout, b"slept 5 ms\n");

    let out = cli(&inst, &["ping"], b"");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pong from unix:"));

    let out = cli(&inst, &["status"], b"");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&inst.paths.socket().display().to_string()),
        "{text}"
    );
    assert!(text.contains(&inst.paths.segment_name()), "{text}");
    assert!(
        text.contains(&format!("dispatcher  {}", inst.pid())),
        "{text}"
    );

    let out = cli(&inst, &["status", "--json"], b"");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dispatcher_pid"], inst.pid());
    assert!(v["jobs_done"].as_u64().unwrap() >= 5);
}

#[test]
fn errors_are_one_line_and_exit_non_zero() {
    let inst = Instance::start("clierr", ARGS);
    for (args, needle) in [
        (&["run", "nope"][..], "is not an operation"),
        (&["run", "crash"][..], "--allow-fault-injection"),
        (&["run", "sleep", "x"][..], "invalid input"),
        (
            &["run", "echo", "--input", "/nonexistent/file"][..],
            "/nonexistent/file",
        ),
        (
            &[
                "--connect",
                "unix:/nonexistent/osps.sock",
                "ping",
                "--timeout-ms",
                "300",
            ][..],
            "is the dispatcher running?",
        ),
    ] {
        let out = cli(&inst, args, b"");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("osps-client: ") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn an_instance_that_is_not_running_fails_at_once_instead_of_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let out = Command::new(bin("osps-client"))
        .args([
            "--instance",
            "not-running",
            "--retry-ms",
            "60000",
            "--runtime-dir",
        ])
        .arg(dir.path())
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the dispatcher running?"));
    // No lock file means no dispatcher and none restarting: no minute of retries.
    assert_within(t, 30);
}

#[test]
fn run_shows_progress_on_a_terminal() {
    // `script` (util-linux) gives the client a pseudo-terminal.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` is not installed, so no pseudo-terminal");
        return;
    }
    let inst = Instance::start("progress", ARGS);
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    let command = format!(
        "{} --instance {} --runtime-dir {} run echo --input {} --output {}",
        bin("osps-client").display(),
        inst.name(),
        inst.runtime_dir().display(),
        input.display(),
        output.display()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&output).unwrap(), data);
    let screen = String::from_utf8_lossy(&out.stdout);
    for needle in ["sending", "receiving", "MiB"] {
        assert!(
            screen.contains(needle),
            "no {needle:?} on the terminal: {screen:?}"
        );
    }
}

#[test]
fn ping_is_a_liveness_probe_of_the_whole_path_within_its_timeout() {
    let probe = |inst: &Instance| {
        let started = std::time::Instant::now();
        let out = cli(inst, &["ping", "--timeout", "700"], b"");
        (out.status.code(), started.elapsed(), out)
    };
    // Healthy: exit 0.
    let inst = Instance::start("probe", ARGS);
    assert_eq!(probe(&inst).0, Some(0));

    // A stopped dispatcher accepts connections but never answers: exit 1,
    // after about the timeout (not the 10 s handshake timeout).
    inst.signal(nix::sys::signal::Signal::SIGSTOP);
    let (code, took, out) = probe(&inst);
    inst.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(code, Some(1), "{out:?}");
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer from unix:"),
        "{out:?}"
    );

    // The dispatcher answers but no worker can start: still exit 1.
    let mut args = ARGS.to_vec();
    args.extend(["--worker-exe", "/bin/false"]);
    let no_workers = Instance::start_answering("probe-noworker", &args);
    assert!(
        no_workers.try_status().is_some(),
        "the dispatcher answers status"
    );
    let (code, _, out) = probe(&no_workers);
    assert_eq!(code, Some(1), "{out:?}");
}

#[test]
fn ping_gives_up_in_time_on_a_listener_whose_backlog_is_full() {
    // A wedged server's listening socket: nobody accepts, the queue is full,
    // so a blocking connect would wait forever.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wedged.sock");
    let listener =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&socket2::SockAddr::unix(&path).unwrap())
        .unwrap();
    listener.listen(0).unwrap();
    let mut queued = Vec::new();
    loop {
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        if s.connect(&socket2::SockAddr::unix(&path).unwrap()).is_err() {
            break; // EAGAIN: the backlog is full
        }
        queued.push(s);
        assert!(queued.len() < 1000, "the backlog never filled");
    }
    let started = std::time::Instant::now();
    let out = Command::new(bin("osps-client"))
        .args(["--connect", &format!("unix:{}", path.display())])
        .args(["ping", "--timeout", "500"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_within(started, 5);
}

#[test]
fn run_output_file_is_replaced_only_when_the_job_succeeds() {
    use std::os::unix::fs::PermissionsExt;
    let inst = Instance::start("cliout", ARGS);
    let dir = tempfile::tempdir().unwrap();
    let (fresh, kept) = (dir.path().join("fresh.txt"), dir.path().join("kept.txt"));
    std::fs::write(&kept, b"precious\n").unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o640)).unwrap();
    for (args, file) in [
        (&["run", "sleep", "x"][..], &fresh),
        (&["run", "nope"][..], &kept),
        (&["run", "sleep", "x"][..], &kept),
    ] {
        let mut args = args.to_vec();
        args.extend(["-o", file.to_str().unwrap()]);
        let out = cli(&inst, &args, b"");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
    assert!(!fresh.exists(), "a failed job leaves no file");
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        b"precious\n",
        "nor clobbers one"
    );

    let out = cli(
        &inst,
        &["run", "upper", "--input", "-", "-o", kept.to_str().unwrap()],
        b"replaced\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&kept).unwrap(), b"REPLACED\n");
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o640,
        "a replaced file keeps its mode"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["kept.txt"], "no temporary file left");
}

/// A reader of its stdout that goes away (`osps-client status --json |
/// head -1`) ends the client quietly with status 141, the status a shell
/// shows for a program SIGPIPE killed: no panic, no backtrace.
#[test]
fn a_reader_gone_away_ends_the_client_quietly() {
    let inst = Instance::start("cli-pipe", ARGS);
    for what in [
        &["status", "--json"][..],
        &["status"],
        &["status", "--watch", "--json"],
        &["status", "--watch"],
        &["metrics"],
        &["ping"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin("osps-client"))
            .args(["--instance", inst.name(), "--runtime-dir"])
            .arg(inst.runtime_dir())
            .args(what)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{what:?}: {err}");
        assert!(err.is_empty(), "{what:?}: {err}");
    }
    // `run` says so: its result was lost.
    let input = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(input.path(), b"a result to lose\n").unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin("osps-client"))
        .args(["--instance", inst.name(), "--runtime-dir"])
        .arg(inst.runtime_dir())
        .args(["run", "echo", "--input"])
        .arg(input.path())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write the result: Broken pipe"),
        "{err}"
    );
}
