//! `osps-dispatcher --config FILE`: a file sets options, a flag overrides the
//! file, the shipped example file is accepted, and a file with a misspelt or
//! unsupported key, a wrong type or a conflict is refused at start with one
//! line naming the file, the line and the key.

use std::path::Path;
use std::process::Command;

use osps_client::ClientError;
use osps_testkit::{bin, config_file, run_to_exit, unique_instance, Instance};

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs the dispatcher with the file and `extra` flags; it must refuse to
/// start: returns its stderr.
fn refused(path: &Path, extra: &[&str]) -> String {
    let runtime = tempfile::tempdir().unwrap();
    let out = run_to_exit(
        Command::new(bin("osps-dispatcher"))
            .args(["--instance", &unique_instance("cfgno"), "--runtime-dir"])
            .arg(runtime.path())
            .args(["--config", arg(path)])
            .args(extra),
        "the dispatcher, at start,",
    );
    assert!(!out.status.success(), "the dispatcher accepted the file");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_file_sets_options_and_a_flag_overrides_the_file() {
    let (_dir, path) = config_file(
        "# sizes\nworkers = 3\nsegment_mib = 8\nmax_payload = 65536\ntcp = \"127.0.0.1:0\"\nallow_uid = []\n",
    );
    let inst = Instance::start("cfgset", &["--config", arg(&path)]);
    let st = inst.status();
    assert_eq!(st.workers.len(), 3, "{st:?}");
    assert!(st.tcp.is_some(), "tcp from the file: {st:?}");
    // max_payload from the file: one byte more is refused before it is read.
    match inst.client().call("echo", &[], &[0u8; 65537]) {
        Err(ClientError::Remote(e)) => assert_eq!(e.kind, ipc_core::ErrorKind::TooLarge),
        other => panic!("a payload over the file's max_payload: {other:?}"),
    }
    assert_eq!(inst.client().call("upper", &[], b"ab").unwrap(), b"AB");
    drop(inst);
    // The command line wins over the file; the file's other keys still apply.
    let inst = Instance::start(
        "cfgflag",
        &[
            "--config",
            arg(&path),
            "--workers",
            "1",
            "--max-payload=1000",
        ],
    );
    let st = inst.status();
    assert_eq!(st.workers.len(), 1, "{st:?}");
    assert!(st.tcp.is_some(), "{st:?}");
    assert!(inst.client().call("echo", &[], &[0u8; 1001]).is_err());
}

#[test]
fn the_builtin_pool_sets_the_number_of_workers() {
    let (_dir, path) =
        config_file("segment_mib = 8\nmax_payload = 65536\n\n[pools.builtin]\nworkers = 2\n");
    let inst = Instance::start("cfgpool", &["--config", arg(&path)]);
    assert_eq!(inst.status().workers.len(), 2);
}

#[test]
fn the_builtin_pool_sets_its_job_timeout_and_attempts() {
    let (_dir, path) = config_file(
        "segment_mib = 8\nmax_payload = 65536\n\n[pools.builtin]\nworkers = 1\njob_timeout_ms = 300\nmax_attempts = 1\n",
    );
    let inst = Instance::start(
        "cfgpolicy",
        &["--config", arg(&path), "--allow-fault-injection"],
    );
    // max_attempts = 1: a job whose worker dies is not run again.
    match inst.client().call("crash", &[], b"") {
        Err(ClientError::Remote(e)) => {
            assert_eq!(e.kind, ipc_core::ErrorKind::WorkerCrashed, "{e:?}");
            assert!(e.message.contains("on each of 1 attempts"), "{e:?}");
        }
        other => panic!("a crash with max_attempts 1: {other:?}"),
    }
    // job_timeout_ms = 300: a 5 s job times out; its worker gets SIGTERM
    // first (and, being an osps-worker, ends by it).
    let started = std::time::Instant::now();
    match inst.client().call("sleep", &["5000"], b"") {
        Err(ClientError::Remote(e)) => assert_eq!(e.kind, ipc_core::ErrorKind::Timeout),
        other => panic!("a 5 s job with a 300 ms timeout: {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    let st = inst.status();
    assert!(
        st.workers[0].last_exit.contains("SIGTERM")
            && st.workers[0].last_exit.contains("job timeout"),
        "{:?}",
        st.workers[0]
    );
}

#[test]
fn a_worker_that_does_not_end_on_sigterm_is_killed_after_the_grace() {
    let inst = Instance::start("termgrace", &["--workers", "1", "--job-timeout-ms", "300"]);
    let pid = inst.worker_pids()[0];
    let started = std::time::Instant::now();
    let client = std::thread::spawn({
        let mut c = inst.client();
        move || c.call("sleep", &["5000"], b"")
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    // Stopped, it cannot act on SIGTERM: only SIGKILL ends it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    match client.join().unwrap() {
        Err(ClientError::Remote(e)) => assert_eq!(e.kind, ipc_core::ErrorKind::Timeout),
        other => panic!("{other:?}"),
    }
    // SIGTERM at the 300 ms timeout, SIGKILL 1 s later: not at once.
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(1200),
        "answered after {took:?}"
    );
    let st = inst.status();
    assert!(
        st.workers[0].last_exit.contains("SIGKILL"),
        "{:?}",
        st.workers[0]
    );
}

#[test]
fn the_example_file_is_accepted() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/osps.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    assert!(
        text.contains("[pools.builtin]"),
        "the example shows the pool"
    );
    // Small sizes for a test, over the example's own (which are checked all the same).
    let inst = Instance::start(
        "cfgexample",
        &[
            "--config",
            arg(&example),
            "--workers",
            "1",
            "--segment-mib",
            "8",
            "--max-payload",
            "65536",
        ],
    );
    assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
    // Its command pool runs gzip: the answer is gzip's (magic 1f 8b).
    let gz = inst.client().call("gzip", &[], b"hello").unwrap();
    assert_eq!(gz[..2], [0x1f, 0x8b], "{gz:?}");
    let st = inst.status();
    let names: Vec<&str> = st.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["builtin", "compress"]);
}

#[test]
fn a_bad_file_is_refused_at_start_with_the_file_line_and_key() {
    let cases: &[(&str, usize, &str)] = &[
        (
            "workers = 2\njob_timout_ms = 5\n",
            2,
            "unknown key \"job_timout_ms\" (did you mean \"job_timeout_ms\"?)",
        ),
        (
            "\n\nworkers = \"4\"\n",
            3,
            "key \"workers\": expected an integer, found a string",
        ),
        (
            "workers = 2\n[pools.builtin]\nworkers = 3\n",
            3,
            "key \"pools.builtin.workers\": conflicts with \"workers\" at line 1",
        ),
        (
            "job_timeout_ms = 100\n[pools.builtin]\njob_timeout_ms = 200\n",
            3,
            "key \"pools.builtin.job_timeout_ms\": conflicts with \"job_timeout_ms\" at line 1",
        ),
        (
            "[pools.builtin]\nmax_attempts = 0\n",
            2,
            "key \"pools.builtin.max_attempts\": invalid value '0'",
        ),
        (
            "[pools.builtin]\nworkers = 2\nexec = [\"gzip\", \"-c\"]\n",
            3,
            "key \"pools.builtin.exec\": the builtin pool runs --worker-exe",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nenv = { OSPS_SEGMENT = \"/x\" }\n",
            4,
            "key \"pools.z.env\": \"OSPS_SEGMENT\" cannot be set here",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nenv = \"A=1\"\n",
            4,
            "key \"pools.z.env\": expected a table of strings",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\ncwd = \"/no/such/dir-osps\"\n",
            4,
            "key \"pools.z.cwd\": /no/such/dir-osps: No such file or directory",
        ),
        (
            "[pools.builtin]\nsegment_mb = 8\n",
            2,
            "unknown key \"pools.builtin.segment_mb\" (did you mean \"segment_mib\"?)",
        ),
        (
            "[pools.thumbs]\nworkers = 1\nprogram = [\"/bin/thumbs\"]\n",
            3,
            "key \"pools.thumbs.program\": /bin/thumbs: No such file or directory",
        ),
        (
            "[pools.z]\nexec = [\"no-such-command-osps\"]\nops = [\"z\"]\n",
            2,
            "key \"pools.z.exec\": no-such-command-osps: not found in PATH",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nworkers = \"2\"\n",
            4,
            "key \"pools.z.workers\": expected an integer, found a string",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nrecycle_after_jobs = 0\n",
            4,
            "key \"pools.z.recycle_after_jobs\": 0 is not in 1..=4294967295",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nrecycle_after_job = 5\n",
            4,
            "unknown key \"pools.z.recycle_after_job\" (did you mean \"recycle_after_jobs\"?)",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\n",
            1,
            "pool \"z\": an exec pool needs \"ops\"",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"-x\"]\n",
            3,
            "key \"pools.z.ops\": \"-x\" cannot be an operation's name",
        ),
        (
            "[pools.a]\nexec = [\"cat\"]\nops = [\"x\", \"y\"]\n[pools.b]\nexec = [\"cat\"]\nops = [\"y\"]\n",
            6,
            "key \"pools.b.ops\": operation \"y\" is served by pool \"a\" too (line 3); an operation is served by one pool",
        ),
        (
            "conn_arena_percent = 101\n",
            1,
            "key \"conn_arena_percent\": invalid value '101'",
        ),
        (
            "workers = 0\n",
            1,
            "key \"workers\": --workers must be at least 1",
        ),
        (
            "segment = \"tmpfs\"\n",
            1,
            "key \"segment\": invalid value 'tmpfs'",
        ),
        (
            "tcp = \"10.0.0.1:7000\"\n",
            1,
            "key \"tcp\": --tcp 10.0.0.1:7000 is not a loopback address",
        ),
        (
            "tcp_allow_remote = \"yes\"\n",
            1,
            "key \"tcp_allow_remote\": expected a boolean",
        ),
        (
            "instance = \"x\"\n",
            1,
            "key \"instance\" is not read from the file",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nuser = \"no-such-user-osps\"\n",
            4,
            "no user \"no-such-user-osps\" on this host",
        ),
        (
            "[pools.builtin]\ngroup = \"no-such-group-osps\"\n",
            2,
            "no group \"no-such-group-osps\" on this host",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nuser = 65534\n",
            4,
            "key \"pools.z.user\": expected a user name (a string), found an integer",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nsegment_mib = 0\n",
            4,
            "key \"pools.z.segment_mib\": 0 is not in 1..=1048576",
        ),
        (
            "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nsegment = \"tmpfs\"\n",
            4,
            "key \"pools.z.segment\": expected \"posix\" or \"sysv\"",
        ),
        // Not TOML: the parser's own words, on the line.
        ("segment_mib = 8\nworkers = \n", 2, ""),
    ];
    for (text, line, says) in cases {
        let (_dir, path) = config_file(text);
        let err = refused(&path, &[]);
        let want = format!("osps-dispatcher: {}:{line}: {says}", path.display());
        assert!(
            err.starts_with(&want),
            "{text:?}: want {want:?}, got {err:?}"
        );
        assert_eq!(err.lines().count(), 1, "{text:?}: one line: {err:?}");
    }
}

#[test]
fn a_value_a_flag_overrides_is_still_checked() {
    let (_dir, path) = config_file("workers = \"many\"\n");
    let err = refused(&path, &["--workers", "1"]);
    assert!(
        err.contains(":1: key \"workers\": expected an integer"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.toml");
    let err = refused(&path, &[]);
    assert!(
        err.starts_with(&format!("osps-dispatcher: {}: cannot read", path.display())),
        "{err}"
    );
}

#[test]
fn the_example_file_shows_every_key() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/osps.toml");
    let text = std::fs::read_to_string(example).unwrap();
    for a in dispatcher::config_file::config_args() {
        let key = a.get_long().unwrap().replace('-', "_");
        let shown = text.lines().any(|l| {
            l.trim_start_matches(['#', ' '])
                .starts_with(&format!("{key} ="))
        });
        assert!(shown, "contrib/osps.toml does not show the key {key:?}");
    }
}

/// A pool run as another user owns its segment. A POSIX segment's owner can
/// shrink it (`ftruncate`), and the dispatcher's next access to the lost
/// pages is a SIGBUS that kills it: such a pool gets a System V segment
/// (whose size no one can change), and asking for POSIX is refused. Root
/// only (another user needs it).
#[test]
fn a_pool_of_another_user_may_not_ask_for_a_posix_segment() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let text =
        "[pools.z]\nexec = [\"cat\"]\nops = [\"z\"]\nuser = \"nobody\"\nsegment = \"posix\"\n";
    let (_dir, path) = config_file(text);
    let err = refused(&path, &[]);
    assert!(
        err.contains("pool \"z\"")
            && err.contains("runs as user \"nobody\"")
            && err.contains("can shrink it and crash the dispatcher"),
        "{err}"
    );
    // Without the key it starts, with a System V segment given to nobody.
    let (_dir, path) = config_file(&text.replace("segment = \"posix\"\n", ""));
    let inst = Instance::start("cfgsysv", &["--config", arg(&path), "--segment", "posix"]);
    let st = inst.status();
    let seg = osps_testkit::pool_segment(&st, "z");
    assert_eq!(
        (seg.backend.as_str(), seg.owner_uid),
        ("sysv", 65534),
        "{seg:?}"
    );
    assert_eq!(osps_testkit::pool_segment(&st, "builtin").backend, "posix");
    assert_eq!(inst.client().call("z", &[], b"abc").unwrap(), b"abc");
}
