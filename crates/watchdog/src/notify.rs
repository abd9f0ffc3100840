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
    ping_every: Option<Duration>,
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
        let ping_every = ping_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Some(Notifier {
            socket,
            addr,
            ping_every,
        })
    }

    /// How often to send `WATCHDOG=1`; `None` when not asked for.
    pub fn ping_every(&self) -> Option<Duration> {
        self.ping_every
    }

    /// Sends one notification (newline-separated `KEY=VALUE` lines). A failure
    /// is logged, never fatal: the service keeps serving without systemd's view.
    pub fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::warn!("cannot notify systemd ({message:?}): {e}");
        }
    }
}

/// The keep-alive period for `WATCHDOG_USEC` and `WATCHDOG_PID` as systemd
/// sets them, seen from process `me`: half of the timeout, as
/// `sd_watchdog_enabled(3)` advises; `None` when unset, zero, unreadable, or
/// meant for another process.
pub fn ping_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let for_us = pid.is_none_or(|p| p.parse::<u32>().ok() == Some(me));
    let usec = usec?.parse::<u64>().ok().filter(|&u| u > 0 && for_us)?;
    Some(Duration::from_micros(usec) / 2)
}

/// The variables systemd sets for the service itself; the dispatcher must not
/// inherit them (it would be taken for the service's main process).
pub const SERVICE_ONLY_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_at_half_the_timeout_and_only_for_this_process() {
        let half = Some(Duration::from_millis(5000));
        assert_eq!(ping_interval(Some("10000000"), None, 7), half);
        assert_eq!(ping_interval(Some("10000000"), Some("7"), 7), half);
        assert_eq!(ping_interval(Some("10000000"), Some("8"), 7), None);
        assert_eq!(ping_interval(Some("10000000"), Some("x"), 7), None);
        assert_eq!(ping_interval(Some("0"), None, 7), None);
        assert_eq!(ping_interval(Some("soon"), None, 7), None);
        assert_eq!(ping_interval(None, Some("7"), 7), None);
    }
}
