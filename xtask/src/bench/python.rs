//! o9: OSPS with Python workers against `concurrent.futures.ProcessPoolExecutor`
//! running the same Python functions (`python/benchjobs.py`), side by side
//! in one run: small calls (64 B, the input's length) and 16 MiB payloads
//! (their sha256 by `hashlib`, over a memoryview of the segment on the OSPS
//! side) per second at 1 and 8 concurrent callers, and 100 pending calls of
//! which one crashes its worker (`os._exit(1)`). Both sides use the same
//! number of worker processes and the machine's default `python3`; the
//! callers are threads of one Python process (`python/driver.py`), using
//! `osps.client` from `python/src` by `PYTHONPATH` (the package is pure
//! Python: no venv is made), as are the pool's workers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use osps_testkit::Instance;
use serde_json::Value;

use super::Plan;
use crate::bench::report::{PyCrash, Report};
use crate::pools::{toml_array, ConfigFile};

const JOBS: &str = include_str!("python/benchjobs.py");
const DRIVER: &str = include_str!("python/driver.py");

/// The interpreter of both sides: the machine's default.
pub const PYTHON: &str = "python3";

/// Worker processes on each side.
pub const WORKERS: usize = 2;

/// Pending calls of the crash trial.
pub const CRASH_CALLS: usize = 100;

/// `python/src` of this repository (the `osps` package).
fn package_src() -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/src");
    src.canonicalize()
        .with_context(|| format!("the Python package at {}", src.display()))
}

/// o9: runs the driver against a pool of Python workers; fills `r.py`.
pub fn python_vs_executor(plan: &Plan, r: &mut Report) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("osps-benchpy-").tempdir()?;
    std::fs::write(dir.path().join("benchjobs.py"), JOBS)?;
    std::fs::write(dir.path().join("driver.py"), DRIVER)?;
    let src = package_src()?;
    let src = src.to_str().context("a UTF-8 path")?;
    let cwd = dir.path().to_str().context("a UTF-8 path")?;
    let config = ConfigFile::write(format!(
        "[pools.builtin]\nenabled = false\n\n[pools.py]\nprogram = {}\ncwd = {cwd:?}\n\
         env = {{ PYTHONPATH = {src:?}, PYTHONDONTWRITEBYTECODE = \"1\" }}\n\
         workers = {WORKERS}\nmax_attempts = 3\n",
        toml_array(&[PYTHON, "-m", "benchjobs"])
    ))?;
    let inst = Instance::start("benchpy", &["--config", config.arg()]);
    std::thread::sleep(Duration::from_millis(1000)); // prefaulting done
    let out = Command::new(PYTHON)
        .arg(dir.path().join("driver.py"))
        .args(["--instance", inst.name(), "--runtime-dir"])
        .arg(inst.runtime_dir())
        .args(["--workers", &WORKERS.to_string()])
        .args(["--secs", &format!("{}", plan.py_secs)])
        .args(["--calls", &CRASH_CALLS.to_string()])
        .current_dir(dir.path())
        .env("PYTHONPATH", src)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "the Python bench failed ({}):\n{}\ndispatcher log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        inst.log()
    );
    let v: Value = serde_json::from_slice(&out.stdout).context("the driver's JSON")?;
    fill(&v, r)
}

/// The driver's figures into the report.
fn fill(v: &Value, r: &mut Report) -> Result<()> {
    let num = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_f64)
            .with_context(|| format!("{p} in the driver's JSON"))
    };
    for (i, case) in ["small_c1", "small_c8", "16mib_c1", "16mib_c8"]
        .iter()
        .enumerate()
    {
        r.py.rps[i] = [
            num(&format!("/{case}/osps"))?,
            num(&format!("/{case}/ppe"))?,
        ];
    }
    let crash = |side: &str| -> Result<PyCrash> {
        Ok(PyCrash {
            failed: num(&format!("/crash/{side}/failed"))? as u64,
            secs: num(&format!("/crash/{side}/secs"))?,
            error: v
                .pointer(&format!("/crash/{side}/crash_error"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        })
    };
    r.py.crash = [crash("osps")?, crash("ppe")?];
    r.py.calls = num("/crash/calls")? as u64;
    r.py.workers = num("/workers")? as u64;
    r.py.python = v["python"].as_str().unwrap_or("").to_owned();
    Ok(())
}
