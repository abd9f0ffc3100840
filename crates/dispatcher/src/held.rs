//! Listening sockets handed to the dispatcher instead of bound by it: by
//! its watchdog, which binds them once and keeps them across dispatcher
//! restarts, or by systemd (`osps.socket`). See
//! [`ipc_core::activation`] for how they are passed and taken.
//!
//! A dispatcher given its sockets neither binds nor removes the socket file
//! (at its start or its stop): their holder does. What it checks: the Unix
//! socket is this instance's path (clients and the watchdog's heartbeat
//! find it there); a TCP socket passed obeys the same rule as `--tcp`
//! (loopback unless `--tcp-allow-remote`), and is served even when the
//! configuration file no longer names it, or names another address (a
//! restart-only change: the watchdog bound it), with a warning. A TCP
//! listener configured but not passed is bound as usual.

use ipc_core::activation::Passed;

use crate::listener::Listener;
use crate::shared::Shared;
use crate::{Config, DispatcherError};

/// The Unix socket's mode: 0600, or 0666 with `--allow-uid` (so the
/// allowed uids can connect at all; the directories decide who reaches it
/// and `SO_PEERCRED` who is admitted).
pub fn unix_mode(config: &Config) -> u32 {
    if config.allow_uids.is_empty() {
        0o600
    } else {
        0o666
    }
}

/// What `osps-dispatcher --listen-plan` prints for the watchdog, which binds
/// the sockets for the dispatchers it starts: `unix-mode 0600` and, with a
/// TCP listener, `tcp ADDR`; or `invalid REASON` for options a dispatcher
/// would refuse (then the watchdog binds nothing, and each dispatcher says
/// why it cannot start).
pub fn plan(config: &Config) -> String {
    if let Err(e) = config.validate() {
        return format!("invalid {}\n", e.message.replace('\n', " "));
    }
    let mut out = format!("unix-mode {:04o}\n", unix_mode(config));
    if let Some(addr) = config.tcp {
        out.push_str(&format!("tcp {addr}\n"));
    }
    out
}

/// Whether the watchdog that bound the socket passed to us is gone (killed:
/// its stop would have removed the socket and stopped us first). Then this
/// dispatcher, its last, removes the socket file at its stop, under the
/// instance lock, before a new watchdog can bind one there.
pub fn holder_died(config: &Config) -> bool {
    config
        .watchdog
        .as_ref()
        .is_some_and(|w| nix::unistd::getppid().as_raw() as u32 != w.pid)
}

fn refused(what: &str, why: String) -> DispatcherError {
    DispatcherError::Config(format!("the {what} passed to this dispatcher: {why}"))
}

/// The listeners from the sockets passed, checked (see the module's text).
pub async fn listeners(shared: &Shared, passed: Passed) -> Result<Vec<Listener>, DispatcherError> {
    use std::os::unix::fs::PermissionsExt;
    let want = shared.paths.socket();
    let at = passed.unix.local_addr()?;
    if at.as_pathname() != Some(want.as_path()) {
        return Err(refused(
            "Unix socket",
            format!(
                "it is bound to {at:?}, but this instance's socket is {} (set ListenStream= to it)",
                want.display()
            ),
        ));
    }
    let mode = std::fs::metadata(&want)
        .ok()
        .map(|m| m.permissions().mode() & 0o777);
    if let Some(mode) = mode.filter(|&m| m != unix_mode(&shared.config)) {
        tracing::warn!(
            "the socket passed has mode {mode:04o}, not {:04o} as this configuration gives it (SocketMode= in osps.socket; 0666 with --allow-uid)",
            unix_mode(&shared.config)
        );
    }
    passed.unix.set_nonblocking(true)?;
    let mut listeners = vec![Listener::Unix(tokio::net::UnixListener::from_std(
        passed.unix,
    )?)];
    match (passed.tcp, shared.config.tcp) {
        (Some(l), configured) => {
            let local = l.local_addr()?;
            let remote = !ipc_core::peer::is_loopback(local.ip());
            if remote && !(shared.config.tcp_allow_remote && shared.config.token_file.is_some()) {
                return Err(refused("TCP socket", format!("{local} is not a loopback address; OSPS listens on loopback unless given --tcp-allow-remote and --token-file")));
            }
            // The file changed since the watchdog bound it (a restart-only
            // option): refusing the socket would make every restart fail,
            // and the watchdog give up.
            match configured {
                None => tracing::warn!("serving the TCP socket passed, {local}; the configuration now has no TCP listener: restart the watchdog to close it"),
                Some(c) if c.port() != 0 && c != local => tracing::warn!("serving the TCP socket passed, {local}; the configuration now says {c}: restart the watchdog to move it"),
                Some(_) => {}
            }
            l.set_nonblocking(true)?;
            let _ = shared.tcp_addr.set(local.to_string());
            listeners.push(Listener::Tcp(tokio::net::TcpListener::from_std(l)?));
        }
        (None, Some(addr)) => {
            let (l, local) = Listener::bind_tcp(addr).await?;
            let _ = shared.tcp_addr.set(local.to_string());
            listeners.push(l);
        }
        (None, None) => {}
    }
    Ok(listeners)
}
