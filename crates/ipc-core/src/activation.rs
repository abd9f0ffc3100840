//! Listening sockets passed to a process by the systemd convention
//! (`sd_listen_fds(3)`): descriptors from 3 on, `LISTEN_FDS=n`,
//! `LISTEN_PID=<the receiver's pid>`, `LISTEN_FDNAMES=name:name`. OSPS
//! names its sockets [`UNIX_NAME`] and [`TCP_NAME`].
//!
//! Two receivers: the watchdog, when systemd starts it from `osps.socket`
//! (`LISTEN_PID` must be its pid), and the dispatcher, to which the watchdog
//! hands the sockets it holds. The watchdog cannot learn its child's pid
//! before the child runs (setting a variable between `fork` and `exec` takes
//! `unsafe` code), so it leaves `LISTEN_PID` unset, and a dispatcher takes
//! an unset `LISTEN_PID` as its own only when its parent is the watchdog
//! named in its environment ([`take`]'s `parent`). Whatever the outcome the
//! variables are removed from the environment, so no process started later
//! (a worker) sees them, and each socket taken is `FD_CLOEXEC`.
//!
//! Descriptors are owned through the `listenfd` crate (which checks the
//! socket's type and family and sets `FD_CLOEXEC`): owning a descriptor by
//! its number takes `unsafe`, which OSPS keeps out of its own code.

use std::net::TcpListener;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;

use nix::sys::socket::{self, sockopt, AddressFamily, SockaddrLike, SockaddrStorage};

/// The receiver's pid (unset: see the module's text).
pub const LISTEN_PID: &str = "LISTEN_PID";
/// How many descriptors are passed, from [`FIRST_FD`] on.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// Their names, `:`-separated, in order.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// Set to `systemd` by the watchdog when the sockets it hands on are
/// systemd's (`osps.socket`): then no dispatcher ever removes the socket file.
pub const SOCKET_HOLDER: &str = crate::env::SOCKET_HOLDER;
/// A `listenfd` extension (another first descriptor); never honoured: removed.
const LISTEN_FDS_FIRST_FD: &str = "LISTEN_FDS_FIRST_FD";
/// The first descriptor passed (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: RawFd = 3;
/// The name of the Unix listener in `LISTEN_FDNAMES`.
pub const UNIX_NAME: &str = "unix";
/// The name of the TCP listener in `LISTEN_FDNAMES`.
pub const TCP_NAME: &str = "tcp";
/// The listen backlog of the sockets the watchdog binds: connections made
/// while no dispatcher accepts wait here (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default since Linux 5.4).
pub const BACKLOG: i32 = 4096;

/// The sockets passed: one Unix listener, at most one TCP listener.
#[derive(Debug)]
pub struct Passed {
    pub unix: UnixListener,
    pub tcp: Option<TcpListener>,
    /// Bound by the watchdog that started us (not systemd's): if that
    /// watchdog dies, the last dispatcher removes the socket file at its stop.
    pub from_watchdog: bool,
}

/// Why passed descriptors are refused.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("{LISTEN_FDS}={0:?}: OSPS takes one Unix socket and at most one TCP socket")]
    Count(String),
    #[error("descriptor {fd} ({what}): {why}")]
    Fd {
        fd: RawFd,
        what: String,
        why: String,
    },
    #[error("{0} sockets were passed but none is a Unix socket (name it \"{UNIX_NAME}\")")]
    NoUnix(usize),
    #[error("two {0} sockets were passed: OSPS takes one of each")]
    Twice(&'static str),
}

/// Whether descriptors announced with `listen_pid` are ours: it names our
/// pid, or it is unset and our parent is the watchdog that started us
/// (`parent_is_watchdog`).
pub fn is_ours(listen_pid: Option<&str>, pid: u32, parent_is_watchdog: bool) -> bool {
    match listen_pid {
        Some(p) => p.trim().parse::<u32>().ok() == Some(pid),
        None => parent_is_watchdog,
    }
}

/// Takes the sockets passed to this process, if any and if ours
/// ([`is_ours`]; `watchdog`: the pid of the watchdog that started us, if
/// any), and removes the variables from the environment in every case.
/// Call it before any thread is started (it changes the environment).
pub fn take(watchdog: Option<u32>) -> Result<Option<Passed>, ActivationError> {
    let get = |k: &str| std::env::var(k).ok();
    let (pid, count, names) = (get(LISTEN_PID), get(LISTEN_FDS), get(LISTEN_FDNAMES));
    let parent = nix::unistd::getppid().as_raw() as u32;
    let ours = is_ours(pid.as_deref(), std::process::id(), watchdog == Some(parent));
    let from_watchdog = pid.is_none() && get(SOCKET_HOLDER).as_deref() != Some("systemd");
    std::env::remove_var(LISTEN_FDNAMES);
    std::env::remove_var(LISTEN_FDS_FIRST_FD);
    std::env::remove_var(SOCKET_HOLDER);
    let Some(count) = count.filter(|_| ours) else {
        std::env::remove_var(LISTEN_PID);
        std::env::remove_var(LISTEN_FDS);
        return Ok(None);
    };
    let n = match count.trim().parse::<usize>() {
        Ok(0) => {
            std::env::remove_var(LISTEN_FDS);
            std::env::remove_var(LISTEN_PID);
            return Ok(None);
        }
        Ok(n @ 1..=2) => n,
        _ => return Err(ActivationError::Count(count)),
    };
    // Reads (and removes) LISTEN_FDS and LISTEN_PID; it agrees they are ours.
    let mut fds = listenfd::ListenFd::from_env();
    let names: Vec<&str> = names.as_deref().unwrap_or("").split(':').collect();
    let (mut unix, mut tcp) = (None, None);
    for i in 0..n {
        let name = names.get(i).copied().unwrap_or("");
        match take_one(&mut fds, i, name)? {
            Listener::Unix(l) if unix.is_none() => unix = Some(l),
            Listener::Tcp(l) if tcp.is_none() => tcp = Some(l),
            Listener::Unix(_) => return Err(ActivationError::Twice(UNIX_NAME)),
            Listener::Tcp(_) => return Err(ActivationError::Twice(TCP_NAME)),
        }
    }
    let unix = unix.ok_or(ActivationError::NoUnix(n))?;
    Ok(Some(Passed {
        unix,
        tcp,
        from_watchdog,
    }))
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// The `i`th descriptor: a listening stream socket of the family its name
/// says (`unix`, `tcp`); under another name (systemd's default is the
/// unit's name), of either family.
fn take_one(
    fds: &mut listenfd::ListenFd,
    i: usize,
    name: &str,
) -> Result<Listener, ActivationError> {
    let fd = FIRST_FD + i as RawFd;
    let bad = |why: String| ActivationError::Fd {
        fd,
        what: format!("{LISTEN_FDNAMES} name {name:?}"),
        why,
    };
    let family = socket::getsockname::<SockaddrStorage>(fd)
        .map_err(|e| bad(format!("not a socket: {e}")))?
        .family();
    let is_unix = family == Some(AddressFamily::Unix);
    let is_inet = matches!(family, Some(AddressFamily::Inet | AddressFamily::Inet6));
    match name {
        UNIX_NAME if !is_unix => return Err(bad(format!("a {family:?} socket, not a Unix one"))),
        TCP_NAME if !is_inet => return Err(bad(format!("a {family:?} socket, not a TCP one"))),
        _ if !is_unix && !is_inet => return Err(bad(format!("a {family:?} socket"))),
        _ => {}
    }
    let got = if is_unix {
        fds.take_unix_listener(i).map(|l| l.map(Listener::Unix))
    } else {
        fds.take_tcp_listener(i).map(|l| l.map(Listener::Tcp))
    };
    let listener = got
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("not passed".into()))?;
    let listening = match &listener {
        Listener::Unix(l) => socket::getsockopt(l, sockopt::AcceptConn),
        Listener::Tcp(l) => socket::getsockopt(l, sockopt::AcceptConn),
    };
    match listening {
        Ok(true) => Ok(listener),
        Ok(false) => Err(bad("a socket that is not listening".into())),
        Err(e) => Err(bad(format!("SO_ACCEPTCONN: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_ours_by_pid_or_from_the_watchdog_parent() {
        assert!(is_ours(Some("42"), 42, false));
        assert!(is_ours(Some(" 42\n"), 42, true));
        assert!(!is_ours(Some("41"), 42, true), "another process's");
        assert!(!is_ours(Some("x"), 42, true));
        assert!(is_ours(None, 42, true), "the watchdog's child");
        assert!(!is_ours(None, 42, false));
    }
}
