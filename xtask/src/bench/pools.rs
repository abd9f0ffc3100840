//! The pools side of the bench. o6: the same operation (`sha256`, of 64 B
//! and of 1 MiB) served by the builtin pool and by a program pool, both
//! running the same `osps-worker` binary (an SDK worker): what the program
//! pool's path costs over the builtin one's. o7: a command pool's per-job
//! cost (`cat` of 1 KiB through OSPS, one client, jobs one after another)
//! against spawning the same command directly from Rust
//! (`std::process::Command`, the payload written to its stdin, its stdout
//! read). Each pair is measured in interleaved rounds, in the same run.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use osps_client::Client;
use osps_testkit::Instance;

use super::{interleave, Pinned, Plan};
use crate::bench::report::Report;
use crate::pools::{toml_array, ConfigFile};

/// The command of o7 and its payload size.
pub const COMMAND: &str = "cat";
pub const COMMAND_PAYLOAD: usize = 1024;

/// Sizing both o6 instances share.
const SIZES: [&str; 4] = ["--segment-mib", "16", "--max-payload", "4194304"];

/// A configuration without the builtin pool, and `pool` instead.
fn only(pool: &str) -> Result<ConfigFile> {
    ConfigFile::write(format!(
        "[pools.builtin]\nenabled = false\n\n{pool}workers = 1\n"
    ))
}

/// Starts a dispatcher with `args` (then `SIZES`), settled.
fn start(tag: &str, args: &[&str]) -> Instance {
    let mut all = args.to_vec();
    all.extend(SIZES);
    let inst = Instance::start(tag, &all);
    std::thread::sleep(Duration::from_millis(1000)); // prefaulting done
    inst
}

/// A measured call of `op` on `payload`, checked against `want`.
fn caller(
    inst: &Instance,
    op: &'static str,
    payload: Vec<u8>,
    want: Vec<u8>,
) -> Result<impl FnMut() -> Result<()>> {
    let mut c = Client::connect(&inst.endpoint())?;
    Ok(move || -> Result<()> {
        let got = c.call(op, &[], &payload)?;
        ensure!(got == want, "{op}: a wrong answer");
        Ok(())
    })
}

/// o6: `sha256` of 64 B and of 1 MiB, builtin pool against program pool.
pub fn builtin_vs_program(plan: &Plan, r: &mut Report) -> Result<()> {
    // Pinned like o1 (children inherit it): both instances pay the same switches.
    let _pinned = Pinned::to_one_cpu()?;
    let worker = osps_testkit::bin("osps-worker");
    let builtin = start("benchbuiltin", &["--workers", "1"]);
    let config = only(&format!(
        "[pools.sdk]\nprogram = {}\n",
        toml_array(&[worker.display().to_string()])
    ))?;
    let program = start("benchprogram", &["--config", config.arg()]);
    let kinds: Vec<String> = program
        .status()
        .pools
        .iter()
        .map(|p| p.kind.clone())
        .collect();
    ensure!(
        kinds == ["program"],
        "the program instance runs pools {kinds:?}"
    );
    for (size, iters, out) in [
        (64, plan.iters / 2, &mut r.o6_small),
        (1 << 20, plan.iters / 30, &mut r.o6_large),
    ] {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let want = osps_testkit::sha256_line(&data);
        let mut a = caller(&builtin, "sha256", data.clone(), want.clone())?;
        let mut b = caller(&program, "sha256", data, want)?;
        let mut series: [&mut dyn FnMut() -> Result<()>; 2] = [&mut a, &mut b];
        let lat = interleave(&mut series, iters, (iters / 10).max(10))?;
        *out = lat.try_into().map_err(|_| anyhow::anyhow!("two series"))?;
    }
    Ok(())
}

/// One run of `cat` spawned directly: the payload on its stdin, its stdout read.
fn spawn_direct(payload: &[u8]) -> Result<()> {
    let mut child = Command::new(COMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {COMMAND}"))?;
    let mut stdin = child.stdin.take().context("piped")?;
    stdin.write_all(payload)?;
    drop(stdin);
    let mut out = Vec::with_capacity(payload.len());
    child
        .stdout
        .take()
        .context("piped")?
        .read_to_end(&mut out)?;
    ensure!(child.wait()?.success(), "{COMMAND} failed");
    ensure!(out == payload, "{COMMAND}: a wrong answer");
    Ok(())
}

/// o7: `cat` of 1 KiB through a command pool against the same spawned directly.
pub fn command_vs_spawn(plan: &Plan, r: &mut Report) -> Result<()> {
    let config = only(&format!(
        "[pools.cmd]\nexec = {}\nops = [{COMMAND:?}]\n",
        toml_array(&[COMMAND])
    ))?;
    let inst = start("benchexec", &["--config", config.arg()]);
    let payload: Vec<u8> = (0..COMMAND_PAYLOAD).map(|i| (i % 251) as u8).collect();
    let mut osps = caller(&inst, COMMAND, payload.clone(), payload.clone())?;
    let mut direct = move || spawn_direct(&payload);
    let mut series: [&mut dyn FnMut() -> Result<()>; 2] = [&mut osps, &mut direct];
    let lat = interleave(&mut series, plan.spawn_jobs, (plan.spawn_jobs / 10).max(10))?;
    [r.o7_osps, r.o7_direct] = lat.try_into().map_err(|_| anyhow::anyhow!("two series"))?;
    Ok(())
}
