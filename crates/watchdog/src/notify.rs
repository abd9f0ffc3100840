//! The systemd notification protocol (`sd_notify(3)`), through the
//! `sd-notify` crate: one datagram of `KEY=VALUE` lines to the Unix socket
//! named by `NOTIFY_SOCKET`. With it, `osps-watchdog` runs as a `Type=notify`
//! service: `READY=1` once the dispatcher answers and a worker is up,
//! `STOPPING=1` when asked to stop, `STATUS=...` lines a person can read in
//! `systemctl status`, and `WATCHDOG=1` pings when the unit sets
//! `WatchdogSec=`, so systemd supervises the supervisor.
//!
//! The crate connects to `NOTIFY_SOCKET` as a path (what systemd gives);
//! an abstract-namespace name (`@...`) is not supported by it.

use std::time::Duration;

pub use sd_notify::NotifyState;

/// Where notifications go, from the environment systemd gives the service.
#[derive(Debug)]
pub struct Notifier {
    ping_every: Option<Duration>,
    /// A failure was logged at warn already (later ones at debug: a socket
    /// that cannot be used would otherwise fill the log at every ping).
    warned: std::cell::Cell<bool>,
}

impl Notifier {
    /// `None` when not run by systemd (no `NOTIFY_SOCKET`). Keep-alive pings
    /// are asked for by `WATCHDOG_USEC`, honoured only when `WATCHDOG_PID` is
    /// unset or names this process (`sd_notify::watchdog_enabled`).
    pub fn from_env() -> Option<Notifier> {
        std::env::var_os("NOTIFY_SOCKET")?;
        Some(Notifier {
            ping_every: ping_interval(sd_notify::watchdog_enabled()),
            warned: std::cell::Cell::new(false),
        })
    }

    /// How often to send `WATCHDOG=1`; `None` when not asked for.
    pub fn ping_every(&self) -> Option<Duration> {
        self.ping_every
    }

    /// Sends one notification. A failure is logged, never fatal: the service
    /// keeps serving without systemd's view.
    pub fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            if self.warned.replace(true) {
                tracing::debug!("cannot notify systemd ({states:?}): {e}");
            } else {
                tracing::warn!("cannot notify systemd ({states:?}): {e}; later failures are logged at debug level");
            }
        }
    }
}

/// The keep-alive period for systemd's watchdog `timeout`: half of it, as
/// `sd_watchdog_enabled(3)` advises; `None` when not asked for or zero.
pub fn ping_interval(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| !t.is_zero()).map(|t| t / 2)
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
    fn pings_at_half_the_timeout_and_never_for_a_zero_one() {
        let table = [
            (Some(Duration::from_secs(10)), Some(Duration::from_secs(5))),
            (
                Some(Duration::from_micros(400_000)),
                Some(Duration::from_millis(200)),
            ),
            (Some(Duration::ZERO), None),
            (None, None),
        ];
        for (timeout, want) in table {
            assert_eq!(ping_interval(timeout), want, "{timeout:?}");
        }
    }

    #[test]
    fn messages_are_the_protocol_lines() {
        let lines: Vec<String> = [
            NotifyState::Ready,
            NotifyState::Status("serving"),
            NotifyState::Watchdog,
            NotifyState::Stopping,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            lines,
            ["READY=1", "STATUS=serving", "WATCHDOG=1", "STOPPING=1"]
        );
    }
}
