//! o10: dispatcher SIGKILL → first request served, with the listening
//! socket held by the watchdog. A supervised instance (2 workers,
//! `--backoff-reset-ms 200`, each kill 300 ms after the last restart: a
//! first crash each time, no backoff); 4 clients open a new connection per
//! `ping` in a loop and never retry a connect: a refused connect (or no
//! socket file) is counted, not hidden. Per kill: the time from the
//! SIGKILL to the first `ping` answered on a connection opened after it;
//! connects made in that window and those refused (must be 0). A
//! connection the killed dispatcher had accepted ends in EOF: counted as
//! lost, and its `ping` sent again (at-least-once, as `RetryingClient` does).

use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use osps_client::{Client, ClientError};
use osps_testkit::{wait_for, Instance, PATIENCE};
use serde_json::{json, Value};

use super::Plan;
use crate::bench::report::{max, median, Report};

/// Clients connecting in a loop.
const CLIENTS: usize = 4;

/// o10's figures.
#[derive(Debug, Default)]
pub struct Held {
    /// Per kill: SIGKILL → first request served on a new connection (ms).
    pub served_ms: Vec<f64>,
    /// Connects made between a kill and that first answer.
    pub window_connects: u64,
    /// Connects refused (`ECONNREFUSED`), finding no socket (`ENOENT`), or
    /// failing otherwise, over the whole run (in the windows or not).
    pub refused: u64,
    pub no_such_file: u64,
    pub other: u64,
    /// Connections accepted by a dispatcher then killed (EOF; resent).
    pub lost: u64,
}

/// What the client threads share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Nanoseconds since `start` of the last kill (0: none yet).
    killed_at: AtomicU64,
    /// Nanoseconds since `start` of the first answer on a connection opened
    /// after the last kill (older than `killed_at`: none yet).
    first_served: AtomicU64,
    window_connects: AtomicU64,
    refused: AtomicU64,
    no_such_file: AtomicU64,
    other: AtomicU64,
    lost: AtomicU64,
}

fn bump(n: &AtomicU64) {
    n.fetch_add(1, Ordering::Relaxed);
}

fn client(inst: &Instance, s: &Shared, start: Instant) {
    let ns = || start.elapsed().as_nanos() as u64;
    while !s.stop.load(Ordering::Relaxed) {
        let opened = ns();
        let killed = s.killed_at.load(Ordering::Relaxed);
        let in_window = killed > 0 && s.first_served.load(Ordering::Relaxed) < killed;
        if in_window {
            bump(&s.window_connects);
        }
        let mut c = match Client::connect_within(&inst.endpoint(), None, PATIENCE) {
            Ok(c) => c,
            Err(ClientError::Connect { source, .. }) => {
                match source.kind() {
                    ErrorKind::ConnectionRefused => bump(&s.refused),
                    ErrorKind::NotFound => bump(&s.no_such_file),
                    _ => bump(&s.other),
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(ClientError::ClosedAtHello { .. }) => {
                bump(&s.lost);
                continue;
            }
            Err(_) => {
                bump(&s.other);
                continue;
            }
        };
        match c.ping() {
            Ok(()) => {
                // Only a connection opened after the latest kill (`killed`,
                // read before the connect, may be the one before, whose
                // dispatcher may have answered): the first such answer.
                let answered = ns();
                let latest = s.killed_at.load(Ordering::Relaxed);
                if latest > 0 && opened > latest {
                    let _ = s.first_served.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |first| (first < latest).then_some(answered),
                    );
                }
            }
            Err(_) => bump(&s.lost),
        }
    }
}

/// o10: fills `r.held`.
pub fn dispatcher_kill_served(plan: &Plan, r: &mut Report) -> Result<()> {
    let inst = super::osps::supervised_for_kills("benchheld");
    let s = Arc::new(Shared::default());
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..CLIENTS {
            let (inst, s) = (&inst, &s);
            scope.spawn(move || client(inst, s, start));
        }
        let result = kills(plan, &inst, &s, start, &mut r.held);
        s.stop.store(true, Ordering::Relaxed);
        result
    })?;
    let h = &mut r.held;
    h.window_connects = s.window_connects.load(Ordering::Relaxed);
    h.refused = s.refused.load(Ordering::Relaxed);
    h.no_such_file = s.no_such_file.load(Ordering::Relaxed);
    h.other = s.other.load(Ordering::Relaxed);
    h.lost = s.lost.load(Ordering::Relaxed);
    Ok(())
}

fn kills(plan: &Plan, inst: &Instance, s: &Shared, start: Instant, h: &mut Held) -> Result<()> {
    for _ in 0..plan.recovery_trials {
        std::thread::sleep(Duration::from_millis(300)); // past the backoff reset
        let old = inst.dispatcher_pid();
        // The time is taken once the kill is sent: a connection opened
        // before that may still be answered by the dispatcher killed.
        kill(Pid::from_raw(old as i32), Signal::SIGKILL)?;
        let at = start.elapsed().as_nanos() as u64;
        s.killed_at.store(at, Ordering::Relaxed);
        let served = wait_for(PATIENCE, || {
            let t = s.first_served.load(Ordering::Relaxed);
            (t > at).then_some(t)
        })
        .context("no request served after the kill")?;
        h.served_ms.push(served.saturating_sub(at) as f64 / 1e6);
        let new = wait_for(PATIENCE, || inst.try_status().map(|st| st.dispatcher_pid));
        ensure!(
            new.is_some_and(|p| p != old),
            "the dispatcher was not replaced"
        );
    }
    Ok(())
}

impl Report {
    /// o10's lines.
    pub fn held_table(&self, t: &mut String) {
        use std::fmt::Write;
        let h = &self.held;
        let _ = writeln!(
            t,
            "\n{:<60} {:>10} {:>8}",
            "dispatcher kill, socket held by the watchdog", "value", "target"
        );
        let rows = [
            (
                "o10 dispatcher SIGKILL → first request served, median (ms)",
                format!("{:.1}", median(&h.served_ms)),
                "< 100",
            ),
            (
                "o10 dispatcher SIGKILL → first request served, max (ms)",
                format!("{:.1}", max(&h.served_ms)),
                "",
            ),
            (
                "o10 connects in those windows (no retry)",
                h.window_connects.to_string(),
                "",
            ),
            (
                "o10 connections refused / no socket file / other",
                format!("{}/{}/{}", h.refused, h.no_such_file, h.other),
                "0/0/0",
            ),
            (
                "o10 connections lost (accepted, then EOF; resent)",
                h.lost.to_string(),
                "",
            ),
        ];
        for (what, value, target) in rows {
            let _ = writeln!(t, "{what:<60} {value:>10} {target:>8}");
        }
    }

    /// o10's JSON.
    pub fn held_json(&self) -> Value {
        let h = &self.held;
        json!({
            "median_ms": median(&h.served_ms), "max_ms": max(&h.served_ms), "trials_ms": h.served_ms,
            "window_connects": h.window_connects, "refused": h.refused, "no_such_file": h.no_such_file,
            "other_connect_errors": h.other, "lost_resent": h.lost, "clients": CLIENTS,
        })
    }
}
