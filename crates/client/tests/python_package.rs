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
fn venv_with_package(dir: &Path) -> PathBuf {
    let venv = dir.join("venv");
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        "python3 -m venv",
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

#[test]
fn the_python_package_passes_its_suite_against_python_workers() {
    let dir = tempfile::tempdir().unwrap();
    let python = venv_with_package(dir.path());
    let tests = python_dir().join("tests").canonicalize().unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let program = format!(
        "[{:?}, \"-m\", \"osps_test_workers\"",
        python.to_str().unwrap()
    );
    let (_cfg, config) = config_file(&format!(
        "[pools.builtin]\nenabled = false\n\n\
         [pools.py]\nprogram = {program}]\ncwd = {cwd:?}\nworkers = 4\nmax_attempts = 2\nsegment_mib = 16\n\n\
         [pools.big]\nprogram = {program}, \"big\"]\ncwd = {cwd:?}\nworkers = 1\n",
        cwd = tests.to_str().unwrap()
    ));
    let mut inst = Instance::supervised(
        "pypkg",
        &["--max-restarts", "20", "--within", "60"],
        &[
            "--config",
            config.to_str().unwrap(),
            "--segment-mib",
            "72",
            "--max-payload",
            "70000000",
        ],
    );
    let out = Command::new(&python)
        .args(["-m", "unittest", "-v", "test_osps"])
        .current_dir(&tests)
        .env("OSPS_TEST_INSTANCE", inst.name())
        .env("OSPS_TEST_RUNTIME_DIR", inst.runtime_dir())
        .env("OSPS_TEST_SCRATCH", &scratch)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("the venv's python runs");
    let report = String::from_utf8_lossy(&out.stderr);
    eprintln!("{report}");
    assert!(
        out.status.success() && report.contains("\nOK"),
        "the Python suite failed ({}):\n{}{report}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!report.contains("skipped"), "a test was skipped:\n{report}");
    // Stop: nothing left, and Python's resource tracker never spoke.
    inst.signal(Signal::SIGTERM);
    assert!(
        inst.wait_exit(Duration::from_secs(30)).is_some(),
        "the watchdog did not stop; log:\n{}",
        inst.log()
    );
    assert_eq!(inst.leftovers(), Vec::<String>::new());
    let log = inst.log();
    for word in ["resource_tracker", "leaked", "left behind"] {
        assert!(!log.contains(word), "{word:?} in the log:\n{log}");
    }
}
