//! The status report as people read it: a process table, then one line each
//! for the queue, latency, the segment and the endpoints.

use std::fmt::Write as _;

use ipc_core::status::StatusReport;

/// Renders `r` as the table `osps-client status` prints.
pub fn status_table(r: &StatusReport) -> String {
    let mut o = String::new();
    let state = if r.shutting_down {
        "shutting down"
    } else {
        "serving"
    };
    let _ = writeln!(
        o,
        "OSPS instance \"{}\" · protocol v{} · {state}\n",
        r.instance, r.protocol_version
    );
    let dash = || "-".to_owned();
    let cause = |c: &str| {
        if c.is_empty() {
            dash()
        } else {
            c.to_owned()
        }
    };
    let mut rows = vec![[
        "ROLE",
        "PID",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "DONE",
        "FAILED",
        "LAST RESTART CAUSE",
    ]
    .map(str::to_owned)];
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
    rows.push([
        "dispatcher".into(),
        r.dispatcher_pid.to_string(),
        state.into(),
        duration(r.uptime_ms),
        r.watchdog
            .as_ref()
            .map_or_else(dash, |w| w.restarts.to_string()),
        r.jobs_done.to_string(),
        r.jobs_failed.to_string(),
        r.watchdog
            .as_ref()
            .map_or_else(dash, |w| cause(&w.last_restart_cause)),
    ]);
    for w in &r.workers {
        rows.push([
            format!("  worker {}", w.index),
            if w.pid == 0 {
                dash()
            } else {
                w.pid.to_string()
            },
            w.state.to_string(),
            if w.pid == 0 {
                dash()
            } else {
                duration(w.uptime_ms)
            },
            w.restarts.to_string(),
            w.jobs_done.to_string(),
            w.jobs_failed.to_string(),
            cause(&w.last_exit),
        ]);
    }
    table(
        &mut o,
        &rows,
        &[false, true, false, true, true, true, true, false],
    );
    if r.watchdog.is_none() {
        let _ = writeln!(o, "(no watchdog: this dispatcher was started directly)");
    }

    let _ = writeln!(
        o,
        "\nqueue    {} waiting · {} in flight · {} sent ahead to busy workers · {} connection(s)",
        r.queue_depth, r.in_flight, r.jobs_sent_ahead, r.connections
    );
    let l = &r.latency;
    if l.count == 0 {
        let _ = writeln!(o, "latency  no jobs in the last {} s", l.window_s);
    } else {
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
    let s = &r.segment;
    let _ = writeln!(
        o,
        "segment  {} {} · {} · mode {} · owner uid {} · {} attached · generation {}",
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
    let _ = writeln!(
        o,
        "socket   {}{}",
        r.socket,
        r.tcp
            .as_ref()
            .map_or(String::new(), |t| format!(" · tcp {t}"))
    );
    o
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
}
