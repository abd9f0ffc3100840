//! The systemd notification protocol (`sd_notify(3)`), spoken directly: one
//! datagram of `KEY=VALUE` lines to the Unix socket named by `NOTIFY_SOCKET`.
//! With it, `osps-watchdog` runs as a `Type=notify` service: `READY=1` once
//! the dispatcher answers and a worker is up, `STOPPING=1` when asked to
//! stop, `STATUS=...` lines a person can read in `systemctl status`, and
//! `WATCHDOG=1` pings when the unit sets `WatchdogSec=`, so systemd
//! supervises the supervisor.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go, from the environment systemd gives the service.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace)
    /// and, for keep-alive pings, `WATCHDOG_USEC` (honoured only when
    /// `WATCHDOG_PID` is unset or names this process). `None` when not run
    /// by systemd (no `NOTIFY_SOCKET`), or when it cannot be used (logged).
    pub fn from_env() -> Option<Notifier> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let name = name.to_string_lossy();
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abstract_name.as_bytes())
            }
            None => SocketAddr::from_pathname(&*name),
        };
        let socket = UnixDatagram::unbound();
        let (addr, socket) = match (addr, socket) {
            (Ok(a), Ok(s)) => (a, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("NOTIFY_SOCKET={name} cannot be used: {e}");
                return None;
            }
        };
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(Duration::from_micros);
        Some(Notifier {
            socket,
            addr,
            watchdog,
        })
    }

    /// How often to send `WATCHDOG=1`: half of `WatchdogSec`, as
    /// `sd_watchdog_enabled(3)` advises; `None` when not asked for.
    pub fn ping_every(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Sends one notification (newline-separated `KEY=VALUE` lines). A failure
    /// is logged, never fatal: the service keeps serving without systemd's view.
    pub fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::warn!("cannot notify systemd ({message:?}): {e}");
        }
    }
}

/// The variables systemd sets for the service itself; the dispatcher must not
/// inherit them (it would be taken for the service's main process).
pub const SERVICE_ONLY_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
];
