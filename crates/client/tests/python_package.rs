//! The Python package (`python/`) against the real system: it is installed
//! with pip into a fresh venv of the machine's default `python3`, a
//! watchdog and dispatcher serve pools of Python workers written with its
//! SDK (`python/tests/osps_test_workers.py`), and its unittest suite
//! (`python/tests/test_osps.py`) runs against them: correct bytes, 100
//! concurrent clients, typed errors from exceptions, segfaults retried then
//! `worker crashed`, a 64 MiB payload hashed in place, a retrying client
//! across dispatcher kills. Then the instance stops: no segment left, and
//! no word from Python's resource tracker in the log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use osps_testkit::{config_file, Instance};

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python")
}

/// Runs `cmd`, panicking with its output unless it succeeds.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// A venv in `dir` with the package installed from a copy of `python/`
/// (so the build leaves nothing in the source tree); returns its python.
/// The venv is made by `python3`, or by `$OSPS_TEST_PYTHON` (e.g.
/// `python3.9`) to try another version.
fn venv_with_package(dir: &Path) -> PathBuf {
    let venv = dir.join("venv");
    let base = std::env::var("OSPS_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    run(
        Command::new(&base).arg("-m").arg("venv").arg(&venv),
        &format!("{base} -m venv"),
    );
    let copy = dir.join("src");
    run(
        Command::new("cp").arg("-r").arg(python_dir()).arg(&copy),
        "copy python/",
    );
    let python = venv.join("bin/python");
    // The package builds with its own standard-library backend: no index needed.
    run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--no-index", "--quiet"])
            .arg(&copy)
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        "pip install ./python",
    );
    python
}

/// The configuration of the Python pools: `py` (4 workers) and, with
/// `big`, `big` (1 worker, for the 64 MiB payload) and `untrusted` (the
/// example `python/examples/untrusted.py`).
fn pools(python: &Path, big: bool) -> (tempfile::TempDir, PathBuf) {
    let cwd = python_dir().join("tests").canonicalize().unwrap();
    let cwd = cwd.to_str().unwrap();
    let program = format!(
        "[{:?}, \"-m\", \"osps_test_workers\"",
        python.to_str().unwrap()
    );
    let mut text = format!(
        "[pools.builtin]\nenabled = false\n\n\
         [pools.py]\nprogram = {program}]\ncwd = {cwd:?}\nworkers = 4\nmax_attempts = 2\nsegment_mib = 16\n"
    );
    if big {
        text +=
            &format!("\n[pools.big]\nprogram = {program}, \"big\"]\ncwd = {cwd:?}\nworkers = 1\n");
        let examples = python_dir().join("examples").canonicalize().unwrap();
        text += &format!(
            "\n[pools.untrusted]\nprogram = [{:?}, \"-m\", \"untrusted\"]\ncwd = {:?}\nworkers = 1\n",
            python.to_str().unwrap(),
            examples.to_str().unwrap()
        );
    }
    config_file(&text)
}

/// Runs the Python tests named (or all) against `inst`; panics with the
/// report unless they all pass (none skipped).
fn run_suite(python: &Path, inst: &Instance, scratch: &Path, tests: &[&str]) {
    let token_file = scratch.join("token");
    let out = Command::new(python)
        .args(["-m", "unittest", "-v"])
        .args(if tests.is_empty() {
            &["test_osps"][..]
        } else {
            tests
        })
        .current_dir(python_dir().join("tests"))
        .env("OSPS_TEST_INSTANCE", inst.name())
        .env("OSPS_TEST_RUNTIME_DIR", inst.runtime_dir())
        .env("OSPS_TEST_SCRATCH", scratch)
        .env("OSPS_TEST_TOKEN_FILE", &token_file)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("the venv's python runs");
    let report = String::from_utf8_lossy(&out.stderr);
    eprintln!("{report}");
    assert!(
        out.status.success() && report.contains("\nOK") && !report.contains("skipped"),
        "the Python suite failed or skipped a test ({}):\n{}{report}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Stops `inst`: nothing may be left, and Python's resource tracker never spoke.
fn stop_clean(mut inst: Instance) {
    inst.signal(Signal::SIGTERM);
    assert!(
        inst.wait_exit(Duration::from_secs(30)).is_some(),
        "the instance did not stop; log:\n{}",
        inst.log()
    );
    assert_eq!(inst.leftovers(), Vec::<String>::new());
    let log = inst.log();
    for word in ["resource_tracker", "leaked", "left behind"] {
        assert!(!log.contains(word), "{word:?} in the log:\n{log}");
    }
}

#[test]
fn the_python_package_passes_its_suite_against_python_workers() {
    let dir = tempfile::tempdir().unwrap();
    let python = venv_with_package(dir.path());
    let (_cfg, config) = pools(&python, true);
    let token_file = dir.path().join("token");
    osps_testkit::write_token_file(&token_file, b"python-package-token-0123456789");
    let inst = Instance::supervised(
        "pypkg",
        &["--max-restarts", "20", "--within", "60"],
        &[
            "--config",
            config.to_str().unwrap(),
            "--segment-mib",
            "72",
            "--max-payload",
            "70000000",
            "--tcp",
            "127.0.0.1:0",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    run_suite(&python, &inst, dir.path(), &[]);
    stop_clean(inst);
}

#[test]
fn python_workers_serve_from_a_system_v_segment() {
    let dir = tempfile::tempdir().unwrap();
    let python = venv_with_package(dir.path());
    let (_cfg, config) = pools(&python, false);
    let inst = Instance::start(
        "pysysv",
        &[
            "--config",
            config.to_str().unwrap(),
            "--segment",
            "sysv",
            "--segment-mib",
            "16",
            "--max-payload",
            "4194304",
        ],
    );
    assert!(osps_testkit::pool_segment(&inst.status(), "py")
        .name
        .starts_with("sysv:"));
    run_suite(
        &python,
        &inst,
        dir.path(),
        &[
            "test_osps.CallTest.test_python_operations_answer_the_right_bytes",
            "test_osps.CallTest.test_a_result_larger_than_the_slot_grows_into_a_result_area",
            "test_osps.CallTest.test_an_exception_is_a_typed_error_naming_it",
        ],
    );
    stop_clean(inst);
}
