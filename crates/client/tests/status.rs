//! `osps-client status` against a supervised instance: the JSON report names
//! real processes in the right tree, and its counters, latency and restart
//! columns move with what happens; the table shows the same.

use ipc_core::status::StatusReport;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_testkit::{proc_info, wait_for, Instance, PATIENCE};

fn status_cli(inst: &Instance, extra: &[&str]) -> String {
    let out = osps_testkit::client_command(inst.name(), inst.runtime_dir())
        .arg("status")
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(inst: &Instance) -> StatusReport {
    serde_json::from_str(&status_cli(inst, &["--json"])).expect("status --json parses")
}

/// The program name of `pid` (`/proc/PID/comm`).
fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn status_json_names_real_processes_and_its_counters_move() {
    let inst = Instance::supervised(
        "status",
        &["--heartbeat-ms", "100"],
        osps_testkit::args!(2, 16, 1048576),
    );
    let before = json(&inst);

    // The process tree, as the kernel sees it.
    let watchdog = before.watchdog.as_ref().expect("supervised");
    assert_eq!(watchdog.pid, inst.pid());
    assert_eq!(comm(watchdog.pid), "osps-watchdog");
    assert_eq!(comm(before.dispatcher_pid), "osps-dispatcher");
    assert_eq!(proc_info(before.dispatcher_pid).unwrap().ppid, watchdog.pid);
    assert_eq!(before.workers.len(), 2);
    for w in &before.workers {
        assert_eq!(comm(w.pid), "osps-worker", "{w:?}");
        assert_eq!(proc_info(w.pid).unwrap().ppid, before.dispatcher_pid);
        assert_eq!((w.state.as_str(), w.restarts), ("idle", 0), "{w:?}");
    }
    assert!(watchdog.uptime_ms >= before.uptime_ms, "{watchdog:?}");

    // 20 jobs that succeed and one that fails.
    let mut c = inst.client();
    for i in 0..20 {
        let text = format!("job {i}");
        assert_eq!(
            c.call("upper", &[], text.as_bytes()).unwrap(),
            text.to_uppercase().as_bytes()
        );
    }
    assert!(c.call("sleep", &["nope"], &[]).is_err());
    let after = json(&inst);
    assert_eq!(after.dispatcher_pid, before.dispatcher_pid);
    assert_eq!(after.jobs_done - before.jobs_done, 20);
    assert_eq!(after.jobs_failed - before.jobs_failed, 1);
    let per_worker: u64 = after.workers.iter().map(|w| w.jobs_done).sum();
    let failed_per_worker: u64 = after.workers.iter().map(|w| w.jobs_failed).sum();
    assert_eq!((per_worker, failed_per_worker), (after.jobs_done, 1));
    assert!(after.latency.count >= 21, "{:?}", after.latency);
    let l = &after.latency;
    assert!(
        0 < l.p50_us && l.p50_us <= l.p90_us && l.p90_us <= l.p99_us && l.p99_us <= l.max_us,
        "{l:?}"
    );
    assert!(after.uptime_ms > before.uptime_ms);

    // A worker killed: its slot shows a new real pid, a restart and why.
    let victim = after.workers[0].pid;
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let replaced = wait_for(PATIENCE, || {
        let s = json(&inst);
        let w = s.workers[0].clone();
        (w.pid != victim && w.pid != 0 && w.state == "idle").then_some(w)
    })
    .expect("worker 0 replaced");
    assert_eq!(comm(replaced.pid), "osps-worker");
    assert_eq!(replaced.restarts, 1);
    assert!(
        replaced.last_exit.contains("SIGKILL"),
        "{:?}",
        replaced.last_exit
    );

    // The table shows the same processes.
    let table = status_cli(&inst, &[]);
    for needle in [
        "ROLE".to_owned(),
        format!("watchdog    {}", watchdog.pid),
        format!("dispatcher  {}", before.dispatcher_pid),
        format!("  worker 0  {}", replaced.pid),
        "latency  last 60 s".to_owned(),
        "mode 0600".to_owned(),
    ] {
        assert!(table.contains(&needle), "no {needle:?} in:\n{table}");
    }
}

#[test]
fn status_watch_refreshes_until_stopped() {
    let inst = Instance::start("watch", osps_testkit::args!(1, 8, 65536));
    // Piped, with --json: one report per line, each a fresh one.
    let mut child = osps_testkit::client_command(inst.name(), inst.runtime_dir())
        .args(["status", "--watch", "--json", "--interval-ms", "100"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut uptimes = Vec::new();
    for _ in 0..3 {
        let line = lines.next().expect("a report").unwrap();
        let r: StatusReport = serde_json::from_str(&line).unwrap();
        uptimes.push(r.uptime_ms);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        uptimes.windows(2).all(|w| w[0] < w[1]),
        "reports not refreshed: {uptimes:?}"
    );
}
