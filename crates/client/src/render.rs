//! The status report as people read it: a process table, then one line each
//! for the queue, latency, the segment and the endpoints.

use std::fmt::Write as _;

use ipc_core::status::{LatencyStatus, PoolStatus, SegmentStatus, StatusReport, WorkerStatus};

/// Renders `r` as the table `osps-client status` prints.
pub fn status_table(r: &StatusReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "OSPS instance \"{}\" · protocol v{} · {}\n",
        r.instance,
        r.protocol_version,
        serving(r)
    );
    table(&mut o, &process_rows(r), &ALIGN_RIGHT);
    if r.watchdog.is_none() {
        let _ = writeln!(o, "(no watchdog: this dispatcher was started directly)");
    }
    let _ = writeln!(
        o,
        "\nqueue    {} waiting · {} in flight · {} sent ahead to busy workers · {} connection(s)",
        r.queue_depth, r.in_flight, r.jobs_sent_ahead, r.connections
    );
    pool_lines(&mut o, &r.pools);
    latency_line(&mut o, &r.latency);
    // Each pool's own segment (a report of a dispatcher before per-pool
    // segments has only the one).
    let pools: Vec<_> = r
        .pools
        .iter()
        .filter_map(|p| Some((p.name.as_str(), p.segment.as_ref()?)))
        .collect();
    if pools.len() > 1 {
        for (name, s) in pools {
            segment_lines(&mut o, s, &format!(" (pool {name})"));
        }
    } else {
        segment_lines(&mut o, &r.segment, "");
    }
    let _ = writeln!(
        o,
        "socket   {}{}",
        r.socket,
        r.tcp
            .as_ref()
            .map_or(String::new(), |t| format!(" · tcp {t}"))
    );
    if let Some(rl) = &r.reload {
        let retiring = match rl.retiring_workers {
            0 => String::new(),
            n => format!(" · {n} old worker(s) finishing their jobs"),
        };
        let _ = writeln!(
            o,
            "reload   {} applied · {} refused{retiring} · last: {}",
            rl.applied, rl.refused, rl.last
        );
    }
    o
}

/// The columns of the process table.
const COLUMNS: [&str; 8] = [
    "ROLE",
    "PID",
    "STATE",
    "UPTIME",
    "RESTARTS",
    "DONE",
    "FAILED",
    "LAST RESTART CAUSE",
];
/// Which of them align right (the numbers).
const ALIGN_RIGHT: [bool; 8] = [false, true, false, true, true, true, true, false];

type Row = [String; 8];

/// The dispatcher's state as the table shows it.
fn serving(r: &StatusReport) -> &'static str {
    if r.shutting_down {
        "shutting down"
    } else {
        "serving"
    }
}

fn dash() -> String {
    "-".to_owned()
}

/// A restart cause, or a dash before the first.
fn cause(c: &str) -> String {
    if c.is_empty() {
        dash()
    } else {
        c.to_owned()
    }
}

/// The header, then one row per process: watchdog, dispatcher, workers
/// (under their pool's row, when the report has pools).
fn process_rows(r: &StatusReport) -> Vec<Row> {
    let mut rows = vec![COLUMNS.map(str::to_owned)];
    if let Some(w) = &r.watchdog {
        rows.push([
            "watchdog".into(),
            w.pid.to_string(),
            "running".into(),
            duration(w.uptime_ms),
            dash(),
            dash(),
            dash(),
            dash(),
        ]);
    }
    rows.push(dispatcher_row(r));
    if r.pools.len() <= 1 {
        // One pool: its workers under the dispatcher, as before pools.
        rows.extend(r.workers.iter().map(|w| worker_row(w, "  ")));
        return rows;
    }
    for p in &r.pools {
        rows.push(pool_row(p));
        let workers = r.workers.iter().filter(|w| w.pool == p.name);
        rows.extend(workers.map(|w| worker_row(w, "    ")));
    }
    rows
}

/// A pool's row: its kind, and what its workers did together.
fn pool_row(p: &PoolStatus) -> Row {
    [
        format!("  pool {}", p.name),
        dash(),
        p.kind.clone(),
        dash(),
        p.restarts.to_string(),
        p.jobs_done.to_string(),
        p.jobs_failed.to_string(),
        p.start_failure.as_deref().map_or_else(dash, cause),
    ]
}

/// One line per pool: its program, size, policy and operations.
fn pool_lines(o: &mut String, pools: &[PoolStatus]) {
    for (i, p) in pools.iter().enumerate() {
        let ops = if p.ops.is_empty() {
            "not known yet (no worker ready)".to_owned()
        } else {
            p.ops.join(", ")
        };
        let run_as = p.run_as.as_ref().map_or(String::new(), |r| {
            format!(" · as {} (uid {}, group {})", r.user, r.uid, r.group)
        });
        let _ = writeln!(
            o,
            "{}{}: {}{run_as} · {} worker(s) · {} queued · timeout {} · {} attempt(s) · results up to {}{} · ops {}",
            if i == 0 { "pools    " } else { "         " },
            p.name,
            p.program.join(" "),
            p.workers,
            p.queue_depth,
            duration(p.job_timeout_ms),
            p.max_attempts,
            bytes(p.max_result),
            memory_limit(p),
            ops
        );
    }
}

/// ` · memory limit 64 MiB (RLIMIT_DATA), N job(s) out of memory`, for a
/// pool with a memory limit; nothing for one without.
fn memory_limit(p: &PoolStatus) -> String {
    let Some(mib) = p.memory_limit_mib else {
        return String::new();
    };
    let by = p.memory_limit_by.as_deref().unwrap_or("?");
    format!(
        " · memory limit {mib} MiB ({by}), {} job(s) out of memory",
        p.out_of_memory
    )
}

fn dispatcher_row(r: &StatusReport) -> Row {
    let watchdog = r.watchdog.as_ref();
    [
        "dispatcher".into(),
        r.dispatcher_pid.to_string(),
        serving(r).into(),
        duration(r.uptime_ms),
        watchdog.map_or_else(dash, |w| w.restarts.to_string()),
        r.jobs_done.to_string(),
        r.jobs_failed.to_string(),
        watchdog.map_or_else(dash, |w| cause(&w.last_restart_cause)),
    ]
}

/// A worker's row, its role indented by `indent`; a worker without a
/// process (starting) has no pid or uptime.
fn worker_row(w: &WorkerStatus, indent: &str) -> Row {
    let running = w.pid != 0;
    [
        format!("{indent}worker {}", w.index),
        if running { w.pid.to_string() } else { dash() },
        w.state.to_string(),
        if running {
            duration(w.uptime_ms)
        } else {
            dash()
        },
        w.restarts.to_string(),
        w.jobs_done.to_string(),
        w.jobs_failed.to_string(),
        cause(&w.last_exit),
    ]
}

fn latency_line(o: &mut String, l: &LatencyStatus) {
    if l.count == 0 {
        let _ = writeln!(o, "latency  no jobs in the last {} s", l.window_s);
        return;
    }
    let _ = writeln!(
        o,
        "latency  last {} s, {} job(s): p50 {} · p90 {} · p99 {} · max {}",
        l.window_s,
        l.count,
        micros(l.p50_us),
        micros(l.p90_us),
        micros(l.p99_us),
        micros(l.max_us)
    );
}

fn segment_lines(o: &mut String, s: &SegmentStatus, pool: &str) {
    let _ = writeln!(
        o,
        "segment  {} {}{pool} · {} · mode {} · owner uid {} · {} attached · generation {}",
        s.backend,
        s.name,
        bytes(s.size),
        s.mode,
        s.owner_uid,
        s.attached,
        s.generation
    );
    let _ = writeln!(
        o,
        "         slots in use {} ({}) · max payload {} · see: {}",
        s.slots_in_use,
        bytes(s.slot_bytes_in_use),
        bytes(s.max_payload),
        s.see
    );
}

/// Appends `rows` as columns separated by two spaces; `right[i]` aligns column `i` right.
fn table<const N: usize>(o: &mut String, rows: &[[String; N]], right: &[bool; N]) {
    let mut width = [0usize; N];
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = width[i] - cell.chars().count();
            if i > 0 {
                line.push_str("  ");
            }
            if right[i] {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < N {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        let _ = writeln!(o, "{}", line.trim_end());
    }
}

/// `850ms`, `45s`, `2m14s`, `3h05m`, `2d04h`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `87 µs`, `1.2 ms`, `3.40 s`.
pub fn micros(us: u64) -> String {
    match us {
        0..1000 => format!("{us} µs"),
        1000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// `512 B`, `4 KiB`, `1.5 MiB`, `256 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let shown = format!("{v:.1}");
    let shown = shown.strip_suffix(".0").unwrap_or(&shown);
    format!("{shown} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_well() {
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(45_000), "45s");
        assert_eq!(duration(134_000), "2m14s");
        assert_eq!(duration(3 * 3_600_000 + 5 * 60_000), "3h05m");
        assert_eq!(duration(2 * 86_400_000 + 4 * 3_600_000), "2d04h");
        assert_eq!(micros(87), "87 µs");
        assert_eq!(micros(1_234), "1.2 ms");
        assert_eq!(micros(3_400_000), "3.40 s");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(4096), "4 KiB");
        assert_eq!(bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(bytes(256 << 20), "256 MiB");
        assert_eq!(bytes((256 << 20) + 4096), "256 MiB");
    }

    #[test]
    fn columns_line_up() {
        let mut o = String::new();
        let rows = [
            ["ROLE".to_owned(), "PID".to_owned(), "X".to_owned()],
            [
                "dispatcher".to_owned(),
                "7".to_owned(),
                "long cell".to_owned(),
            ],
        ];
        table(&mut o, &rows, &[false, true, false]);
        assert_eq!(o, "ROLE        PID  X\ndispatcher    7  long cell\n");
    }

    fn sample(watchdog: bool, latency: bool) -> StatusReport {
        let json = serde_json::json!({
            "instance": "demo", "protocol_version": 1, "dispatcher_pid": 4321,
            "uptime_ms": 134_000, "socket": "/run/osps/demo/demo.sock",
            "tcp": "127.0.0.1:7070",
            "segment": {"backend": "posix", "name": "/osps-1000-demo", "path": "/dev/shm/osps-1000-demo",
                "size": 268_439_552u64, "generation": 3, "slots_in_use": 2, "slot_bytes_in_use": 8192,
                "max_payload": 67_108_864u64, "mode": "0600", "owner_uid": 1000, "attached": 3,
                "see": "ls -l /dev/shm/osps-1000-demo"},
            "workers": [
                {"index": 0, "pid": 4400, "state": "busy", "jobs_done": 31, "restarts": 1,
                 "jobs_failed": 2, "uptime_ms": 45_000, "last_exit": "killed by signal 9 (SIGKILL): job timed out"},
                {"index": 1, "pid": 0, "state": "starting", "jobs_done": 0, "restarts": 0}
            ],
            "jobs_done": 37, "jobs_failed": 4, "queue_depth": 5, "in_flight": 7, "connections": 2,
            "shutting_down": !watchdog,
            "watchdog": if watchdog { serde_json::json!({"pid": 4300, "restarts": 2,
                "last_restart_cause": "crash: exit status 1", "uptime_ms": 3_700_000}) } else { serde_json::Value::Null },
            "jobs_sent_ahead": 9,
            "latency": if latency { serde_json::json!({"window_s": 60, "count": 12, "p50_us": 87,
                "p90_us": 1234, "p99_us": 3_400_000, "max_us": 3_500_000}) }
                else { serde_json::json!({"window_s": 60, "count": 0, "p50_us": 0, "p90_us": 0, "p99_us": 0, "max_us": 0}) },
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn reloads_are_the_last_line() {
        let mut r = sample(true, true);
        r.reload = Some(ipc_core::status::ReloadStatus {
            applied: 2,
            refused: 1,
            last: "reloaded /etc/osps.toml: pools replaced cmd; 1 old worker(s) stop once their jobs are answered".into(),
            retiring_workers: 1,
        });
        let got = status_table(&r);
        assert!(
            got.ends_with("\nreload   2 applied · 1 refused · 1 old worker(s) finishing their jobs · last: reloaded /etc/osps.toml: pools replaced cmd; 1 old worker(s) stop once their jobs are answered\n"),
            "{got}"
        );
    }

    #[test]
    fn the_status_table_reads_as_before() {
        let got = status_table(&sample(true, true));
        assert_eq!(got, "OSPS instance \"demo\" · protocol v1 · serving\n\nROLE         PID  STATE     UPTIME  RESTARTS  DONE  FAILED  LAST RESTART CAUSE\nwatchdog    4300  running    1h01m         -     -       -  -\ndispatcher  4321  serving    2m14s         2    37       4  crash: exit status 1\n  worker 0  4400  busy         45s         1    31       2  killed by signal 9 (SIGKILL): job timed out\n  worker 1     -  starting       -         0     0       0  -\n\nqueue    5 waiting · 7 in flight · 9 sent ahead to busy workers · 2 connection(s)\nlatency  last 60 s, 12 job(s): p50 87 µs · p90 1.2 ms · p99 3.40 s · max 3.50 s\nsegment  posix /osps-1000-demo · 256 MiB · mode 0600 · owner uid 1000 · 3 attached · generation 3\n         slots in use 2 (8 KiB) · max payload 64 MiB · see: ls -l /dev/shm/osps-1000-demo\nsocket   /run/osps/demo/demo.sock · tcp 127.0.0.1:7070\n");
        let got = status_table(&sample(false, false));
        assert_eq!(got, "OSPS instance \"demo\" · protocol v1 · shutting down\n\nROLE         PID  STATE          UPTIME  RESTARTS  DONE  FAILED  LAST RESTART CAUSE\ndispatcher  4321  shutting down   2m14s         -    37       4  -\n  worker 0  4400  busy              45s         1    31       2  killed by signal 9 (SIGKILL): job timed out\n  worker 1     -  starting            -         0     0       0  -\n(no watchdog: this dispatcher was started directly)\n\nqueue    5 waiting · 7 in flight · 9 sent ahead to busy workers · 2 connection(s)\nlatency  no jobs in the last 60 s\nsegment  posix /osps-1000-demo · 256 MiB · mode 0600 · owner uid 1000 · 3 attached · generation 3\n         slots in use 2 (8 KiB) · max payload 64 MiB · see: ls -l /dev/shm/osps-1000-demo\nsocket   /run/osps/demo/demo.sock · tcp 127.0.0.1:7070\n");
    }

    #[test]
    fn several_pools_group_their_workers_and_get_a_line_each() {
        let mut r = sample(true, true);
        r.workers[0].pool = "builtin".into();
        r.workers[1].pool = "gz".into();
        let pool = |name: &str, kind: &str, program: &[&str], ops: &[&str]| {
            serde_json::from_value::<PoolStatus>(serde_json::json!({
                "name": name, "kind": kind, "program": program, "ops": ops, "workers": 1,
                "jobs_done": 31, "jobs_failed": 2, "restarts": 1, "recycled": 0, "queue_depth": 5,
                "job_timeout_ms": 30_000, "max_attempts": 2, "max_result": 67_108_864u64,
                "start_failure": null,
            }))
            .unwrap()
        };
        r.pools = vec![
            pool(
                "builtin",
                "builtin",
                &["/usr/bin/osps-worker"],
                &["echo", "upper"],
            ),
            pool("gz", "exec", &["gzip", "-c"], &[]),
        ];
        r.pools[1].start_failure = Some("gzip: not found".into());
        r.pools[1].run_as = Some(ipc_core::status::RunAsStatus {
            user: "nobody".into(),
            uid: 65534,
            group: "nogroup".into(),
            gid: 65534,
        });
        for (p, name) in r.pools.iter_mut().zip(["/osps-a", "/osps-b"]) {
            p.segment = Some(SegmentStatus {
                name: name.into(),
                ..r.segment.clone()
            });
        }
        let got = status_table(&r);
        let want_rows = "dispatcher      4321  serving    2m14s         2    37       4  crash: exit status 1\n  pool builtin     -  builtin        -         1    31       2  -\n    worker 0    4400  busy         45s         1    31       2  killed by signal 9 (SIGKILL): job timed out\n  pool gz          -  exec           -         1    31       2  gzip: not found\n    worker 1       -  starting       -         0     0       0  -\n";
        assert!(got.contains(want_rows), "{got}");
        let want_lines = "pools    builtin: /usr/bin/osps-worker · 1 worker(s) · 5 queued · timeout 30s · 2 attempt(s) · results up to 64 MiB · ops echo, upper\n         gz: gzip -c · as nobody (uid 65534, group nogroup) · 1 worker(s) · 5 queued · timeout 30s · 2 attempt(s) · results up to 64 MiB · ops not known yet (no worker ready)\n";
        assert!(got.contains(want_lines), "{got}");
        for want in ["/osps-a (pool builtin) · ", "/osps-b (pool gz) · "] {
            assert!(got.contains(want), "{got}");
        }
        // A pool with a memory limit says so, and how, on its line.
        r.pools[1].memory_limit_mib = Some(64);
        r.pools[1].memory_limit_by = Some("RLIMIT_DATA".into());
        r.pools[1].out_of_memory = 3;
        let got = status_table(&r);
        let want = "         gz: gzip -c · as nobody (uid 65534, group nogroup) · 1 worker(s) · 5 queued · timeout 30s · 2 attempt(s) · results up to 64 MiB · memory limit 64 MiB (RLIMIT_DATA), 3 job(s) out of memory · ops not known yet (no worker ready)\n";
        assert!(got.contains(want), "{got}");
    }
}
