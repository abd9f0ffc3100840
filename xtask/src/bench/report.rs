//! The bench's results: the table on stdout, the JSON file (keys documented
//! in the README) and the SVG chart of latency distributions.

use std::fmt::Write as _;

use serde_json::{json, Value};

/// Every figure of one run.
#[derive(Debug, Default)]
pub struct Report {
    pub quick: bool,
    /// Latencies in ns.
    pub f1: Vec<u64>,
    pub f2: Vec<u64>,
    pub f3: Vec<u64>,
    /// (requests/s, latencies ns) at 1, 8, 64 connections.
    pub f4: [(f64, Vec<u64>); 3],
    /// Bytes/s: 64 MiB in, then 64 MiB back (the shape of an OSPS echo).
    pub f5: f64,
    /// Bytes/s: both directions at once.
    pub f5_duplex: f64,
    pub f6: f64,
    pub o1: Vec<u64>,
    pub o2: [(f64, Vec<u64>); 3],
    pub o3_echo: f64,
    pub o3_sha256: f64,
    pub sha256_inprocess: f64,
    pub rss_kib: u64,
    /// The dispatcher's own RSS (less the segment) before the idle connections.
    pub rss_base_kib: u64,
    /// How many idle connections `rss_kib` was measured with.
    pub idle_conns: usize,
    pub rss_anon_kib: u64,
    /// The part of the RSS that is the shared segment (mapped by every process).
    pub rss_shmem_kib: u64,
    pub recovery_dispatcher_ms: Vec<f64>,
    pub recovery_worker_ms: Vec<f64>,
    /// Latencies (ns) of `sha256` of 64 B and of 1 MiB: [builtin pool,
    /// program pool running the same osps-worker].
    pub o6_small: [Vec<u64>; 2],
    pub o6_large: [Vec<u64>; 2],
    /// Per-job times (ns) of `cat` of 1 KiB through a command pool, and
    /// spawned directly.
    pub o7_osps: Vec<u64>,
    pub o7_direct: Vec<u64>,
    /// o8: kill → `worker crashed` answered (ms), idle and under load, and
    /// the segment the killed worker had mapped just before (KiB).
    pub o8_idle_ms: Vec<f64>,
    pub o8_load_ms: Vec<f64>,
    pub o8_idle_mapped_kib: Vec<u64>,
    pub o8_load_mapped_kib: Vec<u64>,
    /// The floor after each kill: SIGKILL of a `sleep` → EOF on its pipe (ms).
    pub o8_idle_floor_ms: Vec<f64>,
    pub o8_load_floor_ms: Vec<f64>,
    /// Calls the load clients made meanwhile.
    pub o8_load_jobs: u64,
    /// o9: Python workers through OSPS against `ProcessPoolExecutor`.
    pub py: PyBench,
    /// o10: dispatcher SIGKILL → first request served, socket held.
    pub held: super::held::Held,
}

/// o9's figures.
#[derive(Debug, Default)]
pub struct PyBench {
    /// Calls per second, [OSPS, executor], of: 64 B at 1 and 8 callers,
    /// 16 MiB at 1 and 8 callers.
    pub rps: [[f64; 2]; 4],
    /// The crash trial, [OSPS, executor].
    pub crash: [PyCrash; 2],
    /// Pending calls of the crash trial.
    pub calls: u64,
    /// Worker processes on each side.
    pub workers: u64,
    /// The interpreter's version.
    pub python: String,
}

/// One side of o9's crash trial.
#[derive(Debug, Default, Clone)]
pub struct PyCrash {
    /// Calls that failed.
    pub failed: u64,
    /// From submitting the first call to the last answer.
    pub secs: f64,
    /// The error(s) the failed calls got (type names).
    pub error: String,
}

/// o9's cases, in `PyBench::rps` order: (JSON key, table label).
const PY_CASES: [(&str, &str); 4] = [
    ("small_c1", "64 B, 1 caller"),
    ("small_c8", "64 B, 8 callers"),
    ("16mib_c1", "16 MiB sha256, 1 caller"),
    ("16mib_c8", "16 MiB sha256, 8 callers"),
];

/// The `q` quantile of latencies (ns) in µs.
pub fn pct(v: &[u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let i = ((s.len() as f64 - 1.0) * q).round() as usize;
    s[i] as f64 / 1e3
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// Mean of latencies (ns) in µs.
fn mean_us(v: &[u64]) -> f64 {
    v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1e3
}

fn lat(v: &[u64]) -> Value {
    json!({ "p50": pct(v, 0.5), "p99": pct(v, 0.99), "p999": pct(v, 0.999), "count": v.len() })
}

const GB: f64 = 1e9;

impl Report {
    fn ratios(&self) -> Vec<(&'static str, f64, &'static str)> {
        let mut v = self.core_ratios().to_vec();
        v.extend(self.python_ratios());
        v
    }

    /// o9's ratios: OSPS over the executor, and failed calls of the crash trial.
    pub fn python_ratios(&self) -> [(&'static str, f64, &'static str); 6] {
        let x = |i: usize| self.py.rps[i][0] / self.py.rps[i][1];
        [
            ("python_small_c1_vs_executor", x(0), ">= 1"),
            ("python_small_c8_vs_executor", x(1), ">= 1"),
            ("python_16mib_c1_vs_executor", x(2), ">= 3"),
            ("python_16mib_c8_vs_executor", x(3), ">= 3"),
            (
                "python_crash_failed_osps",
                self.py.crash[0].failed as f64,
                "== 1",
            ),
            (
                "python_crash_failed_executor",
                self.py.crash[1].failed as f64,
                "info",
            ),
        ]
    }

    fn core_ratios(&self) -> [(&'static str, f64, &'static str); 8] {
        [
            (
                "ping_p50_vs_chain_floor",
                pct(&self.o1, 0.5) / pct(&self.f3, 0.5),
                "<= 1.2",
            ),
            (
                "ping_p99_vs_chain_floor",
                pct(&self.o1, 0.99) / pct(&self.f3, 0.99),
                "<= 2",
            ),
            (
                "throughput64_vs_echo_floor",
                self.o2[2].0 / self.f4[2].0,
                ">= 0.7",
            ),
            ("echo64mib_vs_uds_stream", self.o3_echo / self.f5, ">= 0.8"),
            (
                "sha256_vs_inprocess",
                self.sha256_inprocess / self.o3_sha256,
                "<= 1.3",
            ),
            (
                "sha256_64b_program_vs_builtin",
                pct(&self.o6_small[1], 0.5) / pct(&self.o6_small[0], 0.5),
                "<= 1.05",
            ),
            (
                "sha256_1mib_program_vs_builtin",
                pct(&self.o6_large[1], 0.5) / pct(&self.o6_large[0], 0.5),
                "<= 1.05",
            ),
            (
                "command_job_vs_direct_spawn",
                mean_us(&self.o7_osps) / mean_us(&self.o7_direct),
                "info",
            ),
        ]
    }

    fn met(&self, name: &str, value: f64) -> bool {
        match name {
            "ping_p50_vs_chain_floor" => value <= 1.2,
            "sha256_vs_inprocess" => value <= 1.3,
            "ping_p99_vs_chain_floor" => value <= 2.0,
            "throughput64_vs_echo_floor" => value >= 0.7,
            "echo64mib_vs_uds_stream" => value >= 0.8,
            "sha256_64b_program_vs_builtin" | "sha256_1mib_program_vs_builtin" => value <= 1.05,
            "python_small_c1_vs_executor" | "python_small_c8_vs_executor" => value >= 1.0,
            "python_16mib_c1_vs_executor" | "python_16mib_c8_vs_executor" => value >= 3.0,
            "python_crash_failed_osps" => value == 1.0,
            _ => false,
        }
    }

    /// The dispatcher's own resident memory: VmRSS less the shared segment,
    /// which is configured (`--segment-mib`), prefaulted, and shared by all processes.
    fn own_rss_mib(&self) -> f64 {
        self.rss_kib.saturating_sub(self.rss_shmem_kib) as f64 / 1024.0
    }

    /// What one idle connection (that has served a request) adds to the
    /// dispatcher's own RSS, in KiB.
    fn kib_per_conn(&self) -> f64 {
        let own = self.rss_kib.saturating_sub(self.rss_shmem_kib) as f64;
        (own - self.rss_base_kib as f64) / self.idle_conns.max(1) as f64
    }

    /// The table printed on stdout.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nOSPS bench ({} run; {} cores; figures in µs unless said)",
            if self.quick { "quick" } else { "full" },
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10} {:>10} {:>10}",
            "latency (round trip)", "p50", "p99", "p99.9"
        );
        for (name, v) in [
            ("f1 UDS ping-pong 64 B", &self.f1),
            ("f2 pipe ping-pong 64 B", &self.f2),
            ("f3 chain floor UDS+pipe+pipe+UDS 64 B", &self.f3),
            ("o1 OSPS ping (client→dispatcher→worker)", &self.o1),
        ] {
            let _ = writeln!(
                t,
                "{name:<44} {:>10.1} {:>10.1} {:>10.1}",
                pct(v, 0.5),
                pct(v, 0.99),
                pct(v, 0.999)
            );
        }
        let _ = writeln!(
            t,
            "\n{:<44} {:>10} {:>10} {:>10}",
            "throughput (requests/s)", "1 conn", "8 conns", "64 conns"
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.0} {:>10.0} {:>10.0}",
            "f4 raw UDS echo server 64 B", self.f4[0].0, self.f4[1].0, self.f4[2].0
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.0} {:>10.0} {:>10.0}",
            "o2 OSPS echo 64 B", self.o2[0].0, self.o2[1].0, self.o2[2].0
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1} {:>10.1} {:>10.1}",
            "o2 OSPS latency p50 under load (µs)",
            pct(&self.o2[0].1, 0.5),
            pct(&self.o2[1].1, 0.5),
            pct(&self.o2[2].1, 0.5)
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1} {:>10.1} {:>10.1}",
            "o2 OSPS latency p99 under load (µs)",
            pct(&self.o2[0].1, 0.99),
            pct(&self.o2[1].1, 0.99),
            pct(&self.o2[2].1, 0.99)
        );
        let _ = writeln!(t, "\n{:<44} {:>10}", "bulk (64 MiB)", "GB/s");
        for (name, v) in [
            ("f5 raw UDS, 64 MiB in then 64 MiB back", self.f5),
            ("f5 raw UDS, both ways at once (info)", self.f5_duplex),
            ("f6 memcpy", self.f6),
            ("o3 OSPS echo end to end", self.o3_echo),
            ("o3 OSPS sha256 end to end", self.o3_sha256),
            ("sha256 in process, same bytes", self.sha256_inprocess),
        ] {
            let _ = writeln!(t, "{name:<44} {:>10.2}", v / GB);
        }
        let _ = writeln!(
            t,
            "\n{:<44} {:>10} {:>10}",
            "memory and recovery", "value", "target"
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1} {:>10}",
            "o4 dispatcher own RSS, 1,000 idle conns (MiB)",
            self.own_rss_mib(),
            "<= 32"
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1} {:>10}",
            "o4 own RSS per idle connection (KiB)",
            self.kib_per_conn(),
            "<= 10.6"
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1}",
            "   VmRSS incl. the shared segment (MiB)",
            self.rss_kib as f64 / 1024.0
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1}",
            "   of which the shared segment (MiB)",
            self.rss_shmem_kib as f64 / 1024.0
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1} {:>10}",
            "o5 dispatcher kill → served, median (ms)",
            median(&self.recovery_dispatcher_ms),
            "< 100"
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1}",
            "o5 dispatcher kill → served, max (ms)",
            max(&self.recovery_dispatcher_ms)
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1} {:>10}",
            "o5 busy worker kill → replaced, median (ms)",
            median(&self.recovery_worker_ms),
            "< 20"
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.1}",
            "o5 busy worker kill → replaced, max (ms)",
            max(&self.recovery_worker_ms)
        );
        self.pools_table(&mut t);
        self.kill_table(&mut t);
        self.held_table(&mut t);
        self.python_table(&mut t);
        self.ratio_rows(&mut t, &self.ratios());
        t
    }

    /// The ratio rows, each judged against its target.
    pub fn ratio_rows(&self, t: &mut String, ratios: &[(&'static str, f64, &'static str)]) {
        let _ = writeln!(
            t,
            "\n{:<44} {:>10} {:>10} {:>6}",
            "ratios", "value", "target", "met"
        );
        for &(name, v, target) in ratios {
            let met = match target {
                "info" => "-",
                _ if self.met(name, v) => "yes",
                _ => "NO",
            };
            let _ = writeln!(t, "{name:<44} {v:>10.2} {target:>10} {met:>6}");
        }
    }

    /// o9: Python workers through OSPS and `ProcessPoolExecutor`.
    pub fn python_table(&self, t: &mut String) {
        let py = &self.py;
        let _ = writeln!(
            t,
            "\n{:<44} {:>10} {:>10} {:>10}",
            format!(
                "o9 Python {} ({} workers each), calls/s",
                py.python, py.workers
            ),
            "OSPS",
            "executor",
            "ratio"
        );
        for ((_, label), [osps, ppe]) in PY_CASES.iter().zip(py.rps) {
            let _ = writeln!(
                t,
                "{:<44} {osps:>10.1} {ppe:>10.1} {:>10.2}",
                format!("o9 {label}"),
                osps / ppe
            );
        }
        let _ = writeln!(
            t,
            "{:<44} {:>10} {:>10}",
            format!("o9 {} pending calls, 1 crashes: failed", py.calls),
            py.crash[0].failed,
            py.crash[1].failed
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10.2} {:>10.2}",
            "   all answered after (s)", py.crash[0].secs, py.crash[1].secs
        );
        let _ = writeln!(
            t,
            "{:<44} {:>10} {:>10}",
            "   error(s)", py.crash[0].error, py.crash[1].error
        );
    }

    /// o9's part of the JSON document.
    pub fn python_json(&self) -> Value {
        let py = &self.py;
        let mut o = serde_json::Map::new();
        for ((key, _), [osps, ppe]) in PY_CASES.iter().zip(py.rps) {
            o.insert(key.to_string(), json!({ "osps": osps, "executor": ppe }));
        }
        let crash = |c: &PyCrash| json!({ "failed": c.failed, "secs": c.secs, "error": c.error });
        o.insert(
            "crash".into(),
            json!({ "calls": py.calls, "osps": crash(&py.crash[0]), "executor": crash(&py.crash[1]) }),
        );
        o.insert("workers".into(), json!(py.workers));
        o.insert("python".into(), json!(py.python));
        let ratios: serde_json::Map<String, Value> = self
            .python_ratios()
            .iter()
            .map(|(k, v, _)| (k.to_string(), json!(v)))
            .collect();
        o.insert("ratios".into(), Value::Object(ratios));
        Value::Object(o)
    }

    /// o6 and o7: pools side by side.
    fn pools_table(&self, t: &mut String) {
        let _ = writeln!(
            t,
            "\n{:<44} {:>10} {:>10} {:>10}",
            "pools (µs per call, one client)", "p50", "p99", "mean"
        );
        for (name, v) in [
            ("o6 sha256 64 B, builtin pool", &self.o6_small[0]),
            (
                "o6 sha256 64 B, program pool (osps-worker)",
                &self.o6_small[1],
            ),
            ("o6 sha256 1 MiB, builtin pool", &self.o6_large[0]),
            (
                "o6 sha256 1 MiB, program pool (osps-worker)",
                &self.o6_large[1],
            ),
            ("o7 cat 1 KiB, command pool job via OSPS", &self.o7_osps),
            ("o7 cat 1 KiB, spawned directly (Command)", &self.o7_direct),
        ] {
            let _ = writeln!(
                t,
                "{name:<44} {:>10.1} {:>10.1} {:>10.1}",
                pct(v, 0.5),
                pct(v, 0.99),
                mean_us(v)
            );
        }
    }

    /// o8: worker kill → noticed.
    pub fn kill_table(&self, t: &mut String) {
        let _ = writeln!(
            t,
            "\n{:<44} {:>10} {:>10}",
            "worker kill (default segment, 2 workers)", "value", "target"
        );
        let mib = |v: &[u64]| median(&v.iter().map(|&k| k as f64 / 1024.0).collect::<Vec<_>>());
        for (what, ms, mapped, floor) in [
            (
                "idle",
                &self.o8_idle_ms,
                &self.o8_idle_mapped_kib,
                &self.o8_idle_floor_ms,
            ),
            (
                "under load",
                &self.o8_load_ms,
                &self.o8_load_mapped_kib,
                &self.o8_load_floor_ms,
            ),
        ] {
            let target = if what == "idle" { "" } else { "< 2" };
            let _ = writeln!(
                t,
                "{:<48} {:>6.2} {:>10}",
                format!("o8 worker kill → noticed {what}, median (ms)"),
                median(ms),
                target
            );
            let _ = writeln!(
                t,
                "{:<48} {:>6.2} {:>10}",
                format!("o8 worker kill → noticed {what}, max (ms)"),
                max(ms),
                target
            );
            let _ = writeln!(
                t,
                "{:<44} {:>10.1}",
                "   segment mapped by the victim, median (MiB)",
                mib(mapped)
            );
            let _ = writeln!(
                t,
                "{:<44} {:>10}",
                "   floor: `sleep` kill → EOF, median / max",
                format!("{:.2} / {:.2}", median(floor), max(floor))
            );
        }
    }

    /// o8's part of the JSON document.
    pub fn kill_json(&self) -> Value {
        let mib = |v: &[u64]| median(&v.iter().map(|&k| k as f64 / 1024.0).collect::<Vec<_>>());
        json!({
            "idle_median": median(&self.o8_idle_ms), "idle_max": max(&self.o8_idle_ms),
            "load_median": median(&self.o8_load_ms), "load_max": max(&self.o8_load_ms),
            "idle_trials": self.o8_idle_ms, "load_trials": self.o8_load_ms,
            "idle_victim_mapped_mib_median": mib(&self.o8_idle_mapped_kib),
            "load_victim_mapped_mib_median": mib(&self.o8_load_mapped_kib),
            "idle_victim_mapped_kib": self.o8_idle_mapped_kib, "load_victim_mapped_kib": self.o8_load_mapped_kib,
            "idle_floor_median": median(&self.o8_idle_floor_ms), "idle_floor_max": max(&self.o8_idle_floor_ms),
            "load_floor_median": median(&self.o8_load_floor_ms), "load_floor_max": max(&self.o8_load_floor_ms),
            "load_jobs": self.o8_load_jobs,
        })
    }

    /// The JSON document (`--json`).
    pub fn json(&self) -> Value {
        let ratios: serde_json::Map<String, Value> = self
            .ratios()
            .iter()
            .map(|(k, v, _)| (k.to_string(), json!(v)))
            .collect();
        json!({
            "quick": self.quick,
            "machine": { "cores": std::thread::available_parallelism().map_or(0, |n| n.get()), "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim() },
            "latency_us": { "uds_pingpong_f1": lat(&self.f1), "pipe_pingpong_f2": lat(&self.f2), "chain_floor_f3": lat(&self.f3), "osps_ping_o1": lat(&self.o1) },
            "throughput_rps": {
                "uds_echo_f4": { "c1": self.f4[0].0, "c8": self.f4[1].0, "c64": self.f4[2].0 },
                "osps_echo_o2": { "c1": self.o2[0].0, "c8": self.o2[1].0, "c64": self.o2[2].0 },
            },
            "latency_under_load_us": { "c1": lat(&self.o2[0].1), "c8": lat(&self.o2[1].1), "c64": lat(&self.o2[2].1) },
            "bulk_gbps": {
                "uds_stream_f5": self.f5 / GB, "uds_stream_duplex_f5": self.f5_duplex / GB, "memcpy_f6": self.f6 / GB,
                "osps_echo64mib_o3": self.o3_echo / GB, "osps_sha256_64mib_o3": self.o3_sha256 / GB, "sha256_inprocess": self.sha256_inprocess / GB,
            },
            "ratios": ratios,
            "rss_mib_1000_idle": self.own_rss_mib(),
            "rss_kib_per_idle_conn": self.kib_per_conn(),
            "vmrss_mib_1000_idle": self.rss_kib as f64 / 1024.0,
            "rss_shmem_mib_1000_idle": self.rss_shmem_kib as f64 / 1024.0,
            "rss_anon_mib_1000_idle": self.rss_anon_kib as f64 / 1024.0,
            "pools_us": {
                "sha256_64b_builtin_o6": lat(&self.o6_small[0]), "sha256_64b_program_o6": lat(&self.o6_small[1]),
                "sha256_1mib_builtin_o6": lat(&self.o6_large[0]), "sha256_1mib_program_o6": lat(&self.o6_large[1]),
                "command_job_o7": lat(&self.o7_osps), "direct_spawn_o7": lat(&self.o7_direct),
                "command_job_mean_o7": mean_us(&self.o7_osps), "direct_spawn_mean_o7": mean_us(&self.o7_direct),
            },
            "recovery_ms": {
                "dispatcher_median": median(&self.recovery_dispatcher_ms), "dispatcher_max": max(&self.recovery_dispatcher_ms),
                "worker_median": median(&self.recovery_worker_ms), "worker_max": max(&self.recovery_worker_ms),
                "dispatcher_trials": self.recovery_dispatcher_ms, "worker_trials": self.recovery_worker_ms,
            },
            "worker_kill_noticed_ms_o8": self.kill_json(),
            "dispatcher_kill_served_o10": self.held_json(),
            "python_vs_executor_o9": self.python_json(),
        })
    }

    /// Latency distributions (CDF, log time axis) of o1 against f1–f3.
    pub fn svg(&self) -> String {
        let (w, h, left, right, top, bottom) = (760.0, 420.0, 70.0, 20.0, 40.0, 50.0);
        let series = [
            ("f1 UDS ping-pong", &self.f1, "#1f77b4"),
            ("f2 pipe ping-pong", &self.f2, "#2ca02c"),
            ("f3 chain floor", &self.f3, "#ff7f0e"),
            ("o1 OSPS ping", &self.o1, "#d62728"),
        ];
        let all: Vec<f64> = series
            .iter()
            .flat_map(|(_, v, _)| [pct(v, 0.0), pct(v, 0.999)])
            .filter(|x| x.is_finite() && *x > 0.0)
            .collect();
        let lo = all
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .max(0.1)
            .log10()
            .floor();
        let hi = all
            .iter()
            .copied()
            .fold(0.0, f64::max)
            .log10()
            .ceil()
            .max(lo + 1.0);
        let x = |us: f64| left + (us.max(1e-3).log10() - lo) / (hi - lo) * (w - left - right);
        let y = |q: f64| top + (1.0 - q) * (h - top - bottom);
        let mut s = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(
            s,
            r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15">Round-trip latency distribution (64 B; cumulative fraction vs µs, log scale)</text>"#,
            left
        );
        let mut d = lo;
        while d <= hi {
            let xv = x(10f64.powf(d));
            let _ = write!(
                s,
                r##"<line x1="{xv}" y1="{top}" x2="{xv}" y2="{}" stroke="#ddd"/><text x="{xv}" y="{}" text-anchor="middle">{}</text>"##,
                h - bottom,
                h - bottom + 18.0,
                10f64.powf(d)
            );
            d += 1.0;
        }
        for q in [0.0, 0.5, 0.9, 1.0] {
            let yv = y(q);
            let _ = write!(
                s,
                r##"<line x1="{left}" y1="{yv}" x2="{}" y2="{yv}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{q}</text>"##,
                w - right,
                left - 6.0,
                yv + 4.0
            );
        }
        for (i, (name, v, color)) in series.iter().enumerate() {
            let mut sorted = v.to_vec();
            sorted.sort_unstable();
            let n = sorted.len().max(1);
            let step = (n / 400).max(1);
            let pts: Vec<String> = (0..n)
                .step_by(step)
                .chain([n - 1])
                .map(|k| {
                    format!(
                        "{:.1},{:.1}",
                        x(sorted.get(k).copied().unwrap_or(0) as f64 / 1e3),
                        y((k + 1) as f64 / n as f64)
                    )
                })
                .collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            let ly = top + 16.0 + 18.0 * i as f64;
            let _ = write!(
                s,
                r#"<rect x="{}" y="{}" width="14" height="4" fill="{color}"/><text x="{}" y="{}">{name} (p50 {:.1} µs)</text>"#,
                w - right - 230.0,
                ly - 4.0,
                w - right - 210.0,
                ly,
                pct(v, 0.5)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">µs</text></svg>"#,
            (left + w - right) / 2.0,
            h - 10.0
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_lines_are_reported_and_judged_as_ratios() {
        let mut r = Report {
            o6_small: [vec![20_000; 10], vec![20_800; 10]],
            o6_large: [vec![800_000; 10], vec![900_000; 10]],
            o7_osps: vec![1_200_000; 10],
            o7_direct: vec![1_000_000; 10],
            ..Default::default()
        };
        let t = r.table();
        let row = |name: &str| {
            t.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no row {name} in\n{t}"))
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(row("sha256_64b_program_vs_builtin"), "1.04 <= 1.05 yes");
        assert_eq!(row("sha256_1mib_program_vs_builtin"), "1.12 <= 1.05 NO");
        assert_eq!(row("command_job_vs_direct_spawn"), "1.20 info -");
        assert!(
            t.contains("o7 cat 1 KiB, spawned directly (Command)"),
            "{t}"
        );
        r.o7_direct = vec![600_000; 10];
        let j = r.json();
        assert_eq!(j["ratios"]["command_job_vs_direct_spawn"], json!(2.0));
        assert_eq!(j["pools_us"]["direct_spawn_mean_o7"], json!(600.0));
    }

    /// The values of table `t`'s row `name`, separated by one space.
    fn row_of(t: &str, name: &str) -> String {
        let l = t.lines().find(|l| l.starts_with(name));
        let l = l.unwrap_or_else(|| panic!("no row {name} in\n{t}"));
        l[name.len()..]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_worker_kill_lines_show_median_and_max_against_the_target() {
        let r = Report {
            o8_load_ms: vec![1.5, 0.5, 3.25, 1.0, 1.25],
            o8_load_mapped_kib: vec![2048, 4096, 1024],
            o8_idle_ms: vec![0.75],
            ..Default::default()
        };
        let t = r.table();
        let row = |name: &str| row_of(&t, name);
        assert_eq!(
            row("o8 worker kill → noticed under load, median (ms)"),
            "1.25 < 2"
        );
        assert_eq!(
            row("o8 worker kill → noticed under load, max (ms)"),
            "3.25 < 2"
        );
        assert_eq!(row("o8 worker kill → noticed idle, max (ms)"), "0.75");
        let j = &r.json()["worker_kill_noticed_ms_o8"];
        assert_eq!(
            (j["load_median"].clone(), j["load_max"].clone()),
            (json!(1.25), json!(3.25))
        );
        assert_eq!(j["load_victim_mapped_mib_median"], json!(2.0));
    }

    #[test]
    fn the_python_lines_judge_osps_against_the_executor() {
        let r = Report {
            py: PyBench {
                rps: [
                    [2000.0, 1000.0],
                    [900.0, 1000.0],
                    [30.0, 10.0],
                    [20.0, 10.0],
                ],
                crash: [
                    PyCrash {
                        failed: 1,
                        secs: 0.5,
                        error: "WorkerCrashedError".into(),
                    },
                    PyCrash {
                        failed: 90,
                        secs: 0.1,
                        error: "BrokenProcessPool".into(),
                    },
                ],
                calls: 100,
                workers: 2,
                python: "3.11.7".into(),
            },
            ..Default::default()
        };
        let t = r.table();
        let row = |name: &str| row_of(&t, name);
        assert_eq!(row("o9 64 B, 1 caller"), "2000.0 1000.0 2.00");
        assert_eq!(row("o9 100 pending calls, 1 crashes: failed"), "1 90");
        assert_eq!(row("python_small_c1_vs_executor"), "2.00 >= 1 yes");
        assert_eq!(row("python_small_c8_vs_executor"), "0.90 >= 1 NO");
        assert_eq!(row("python_16mib_c1_vs_executor"), "3.00 >= 3 yes");
        assert_eq!(row("python_16mib_c8_vs_executor"), "2.00 >= 3 NO");
        assert_eq!(row("python_crash_failed_osps"), "1.00 == 1 yes");
        assert_eq!(row("python_crash_failed_executor"), "90.00 info -");
        let j = &r.json()["python_vs_executor_o9"];
        assert_eq!(j["16mib_c8"]["executor"], json!(10.0));
        assert_eq!(j["crash"]["executor"]["failed"], json!(90));
        assert_eq!(j["ratios"]["python_16mib_c1_vs_executor"], json!(3.0));
        assert_eq!(r.json()["ratios"]["python_crash_failed_osps"], json!(1.0));
    }
}
