//! The listening sockets the watchdog holds for its dispatchers: bound once
//! (or given by systemd from `osps.socket`) and handed to each dispatcher it
//! starts, so a connection made while a dispatcher restarts waits in the
//! listen backlog ([`ipc_core::activation::BACKLOG`]) and is served by the
//! next one, never refused.
//!
//! The hand-over follows the systemd convention ([`ipc_core::activation`]):
//! the sockets sit at descriptors 3 (`unix`) and 4 (`tcp`), `FD_CLOEXEC`
//! except while a dispatcher is being spawned; the child gets `LISTEN_FDS`
//! and `LISTEN_FDNAMES`, and no `LISTEN_PID` (its pid is not known before it
//! runs: it takes the sockets as its own because its parent is us). At the
//! start, before any runtime or thread, descriptors 3 and 4 are reserved
//! (`/dev/null`), so binding later (at the first spawn, once no previous
//! dispatcher holds the instance lock) can put the sockets there with
//! `dup2` without touching a descriptor in use.
//!
//! What the watchdog binds, it binds with the checks the dispatcher makes:
//! the runtime directories (ownership, mode: `RuntimePaths::ensure_dir`,
//! done before), the instance lock held while a stale socket file is
//! removed and the new one bound (so a live dispatcher's socket is never
//! replaced), mode 0600 (0666 with `--allow-uid`), a TCP address only as
//! the dispatcher's own options give it (`osps-dispatcher --listen-plan`,
//! which reads its arguments and configuration file, and refuses what a
//! dispatcher would refuse). What it bound it removes when it stops;
//! systemd's sockets it only closes.

use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};
use std::path::{Path, PathBuf};

use ipc_core::activation::{self, Passed, BACKLOG, FIRST_FD, TCP_NAME, UNIX_NAME};
use ipc_core::{InstanceLock, RuntimePaths};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// What the dispatcher's options ask to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The Unix socket's mode.
    pub unix_mode: u32,
    /// The TCP address, if any (port 0: any free port, kept for every restart).
    pub tcp: Option<SocketAddr>,
}

impl Plan {
    /// Reads `osps-dispatcher --listen-plan`'s output: `None` when the
    /// dispatcher would refuse its options (`invalid ...`).
    pub fn parse(out: &str) -> Result<Option<Plan>, String> {
        let mut plan = Plan {
            unix_mode: 0o600,
            tcp: None,
        };
        for line in out.lines() {
            match line.split_once(' ') {
                Some(("invalid", _)) => return Ok(None),
                Some(("unix-mode", m)) => {
                    plan.unix_mode =
                        u32::from_str_radix(m.trim(), 8).map_err(|e| format!("{line:?}: {e}"))?;
                }
                Some(("tcp", a)) => {
                    plan.tcp = Some(a.trim().parse().map_err(|e| format!("{line:?}: {e}"))?)
                }
                _ => return Err(format!("unexpected line {line:?}")),
            }
        }
        Ok(Some(plan))
    }

    /// Asks the dispatcher program what it would listen on, with the
    /// arguments each dispatcher gets.
    pub fn ask(
        exe: &Path,
        place: (&str, Option<&Path>),
        args: &[String],
    ) -> Result<Option<Plan>, String> {
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--instance").arg(place.0);
        if let Some(dir) = place.1 {
            cmd.arg("--runtime-dir").arg(dir);
        }
        let out = cmd
            .arg("--listen-plan")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim_end().to_owned());
        }
        Plan::parse(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Why held sockets cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error(transparent)]
    Activation(#[from] activation::ActivationError),
    #[error("the Unix socket systemd passed is {got}, but this instance's socket is {want}: set ListenStream={want} in osps.socket (or --instance/OSPS_RUNTIME_DIR to match it)")]
    WrongPath { got: String, want: String },
    #[error("systemd passed a TCP socket but the dispatcher is given no TCP address (--tcp or tcp = in the configuration file)")]
    UnwantedTcp,
    #[error("cannot place descriptor {fd}: {source}")]
    Place { fd: RawFd, source: nix::Error },
    #[error("cannot bind {what}: {source}")]
    Bind {
        what: String,
        source: std::io::Error,
    },
}

/// The sockets held, at descriptors 3 and (with TCP) 4.
#[derive(Debug)]
pub struct Held {
    socket: PathBuf,
    plan: Option<Plan>,
    /// systemd's (`osps.socket`): never bound nor removed here.
    from_systemd: bool,
    /// The names of those held, in descriptor order from 3; empty: none yet.
    names: Vec<&'static str>,
}

/// Puts `fd` at `target` (replacing what is there) and closes it; `target` is `FD_CLOEXEC`.
fn install(fd: RawFd, target: RawFd) -> Result<(), HeldError> {
    let place = |source| HeldError::Place { fd: target, source };
    if fd != target {
        nix::unistd::dup2(fd, target).map_err(place)?;
        let _ = nix::unistd::close(fd);
    }
    fcntl(target, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(place)?;
    Ok(())
}

impl Held {
    /// Nothing held, nothing to hold (until replaced by [`Held::init`]'s).
    pub fn none() -> Held {
        Held {
            socket: PathBuf::new(),
            plan: None,
            from_systemd: false,
            names: Vec::new(),
        }
    }

    /// At the start, before any thread or runtime exists: takes the sockets
    /// systemd passed (checked against `paths` and `plan`), else reserves
    /// descriptors 3 and 4 for the sockets bound later ([`Held::ensure`]).
    pub fn init(paths: &RuntimePaths, plan: Option<Plan>) -> Result<Held, HeldError> {
        let mut held = Held {
            socket: paths.socket(),
            plan,
            from_systemd: false,
            names: Vec::new(),
        };
        match activation::take(None)? {
            Some(passed) => held.adopt(passed)?,
            None => {
                let null = std::fs::File::open("/dev/null").map_err(|source| HeldError::Bind {
                    what: "/dev/null".into(),
                    source,
                })?;
                let fd = null.into_raw_fd();
                for target in [FIRST_FD, FIRST_FD + 1] {
                    let place = |source| HeldError::Place { fd: target, source };
                    if target != fd {
                        nix::unistd::dup2(fd, target).map_err(place)?;
                    }
                    fcntl(target, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(place)?;
                }
                if fd > FIRST_FD + 1 {
                    let _ = nix::unistd::close(fd);
                }
            }
        }
        Ok(held)
    }

    fn adopt(&mut self, passed: Passed) -> Result<(), HeldError> {
        let at = passed.unix.local_addr().ok();
        let got = at.as_ref().and_then(|a| a.as_pathname());
        if got != Some(self.socket.as_path()) {
            return Err(HeldError::WrongPath {
                got: format!("{at:?}"),
                want: self.socket.display().to_string(),
            });
        }
        let wants_tcp = self.plan.as_ref().is_some_and(|p| p.tcp.is_some());
        if passed.tcp.is_some() && !wants_tcp {
            return Err(HeldError::UnwantedTcp);
        }
        // They sit at 3 and 4 in systemd's order: copy both away, then place.
        let mut fds = vec![(UNIX_NAME, passed.unix.into_raw_fd())];
        fds.extend(passed.tcp.map(|t| (TCP_NAME, t.into_raw_fd())));
        let mut copies = Vec::new();
        for (name, fd) in fds {
            let copy = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(16))
                .map_err(|source| HeldError::Place { fd, source })?;
            copies.push((name, copy));
        }
        for (i, (name, copy)) in copies.into_iter().enumerate() {
            install(copy, FIRST_FD + i as RawFd)?;
            self.names.push(name);
        }
        self.from_systemd = true;
        tracing::info!(socket = %self.socket.display(), fds = ?self.names, "listening sockets passed by systemd");
        Ok(())
    }

    /// Whether sockets are held.
    pub fn is_held(&self) -> bool {
        !self.names.is_empty()
    }

    /// Binds the sockets if none are held yet (once: they are kept for every
    /// later dispatcher). Under the instance lock; if a live dispatcher
    /// holds it, or the options are refused, nothing is bound (the
    /// dispatcher then binds its own, as run alone). Returns whether held.
    pub fn ensure(&mut self, paths: &RuntimePaths) -> bool {
        if self.is_held() {
            return true;
        }
        let Some(plan) = self.plan.clone() else {
            return false;
        };
        match self.bind(paths, &plan) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "not holding the listening sockets: {e}; the dispatcher binds its own"
                );
                false
            }
        }
    }

    fn bind(&mut self, paths: &RuntimePaths, plan: &Plan) -> Result<(), HeldError> {
        use socket2::{Domain, SockAddr, Socket, Type};
        use std::os::unix::fs::PermissionsExt;
        let err = |what: String| move |source| HeldError::Bind { what, source };
        if !paths.dir_is_ours() {
            return Err(HeldError::Bind {
                what: paths.dir().display().to_string(),
                source: std::io::Error::other("the instance directory is not ours alone"),
            });
        }
        let lock = InstanceLock::acquire(&paths.lock_file())
            .map_err(|e| err("the instance lock".into())(std::io::Error::other(e.to_string())))?;
        let path = self.socket.display().to_string();
        if std::fs::remove_file(&self.socket).is_ok() {
            tracing::warn!(socket = %path, "removed the socket a dead dispatcher left");
        }
        let unix = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(err(path.clone()))?;
        unix.bind(&SockAddr::unix(&self.socket).map_err(err(path.clone()))?)
            .map_err(err(path.clone()))?;
        std::fs::set_permissions(
            &self.socket,
            std::fs::Permissions::from_mode(plan.unix_mode),
        )
        .map_err(err(path.clone()))?;
        unix.listen(BACKLOG).map_err(err(path.clone()))?;
        let tcp = match plan.tcp {
            Some(addr) => {
                let what = format!("tcp {addr}");
                let t = Socket::new(Domain::for_address(addr), Type::STREAM, None)
                    .map_err(err(what.clone()))?;
                t.set_reuse_address(true).map_err(err(what.clone()))?;
                t.bind(&addr.into()).map_err(err(what.clone()))?;
                t.listen(BACKLOG).map_err(err(what.clone()))?;
                Some(t)
            }
            None => None,
        };
        drop(lock);
        install(unix.into_raw_fd(), FIRST_FD)?;
        self.names.push(UNIX_NAME);
        if let Some(t) = tcp {
            install(t.into_raw_fd(), FIRST_FD + 1)?;
            self.names.push(TCP_NAME);
        }
        tracing::info!(socket = %path, mode = format!("{:04o}", plan.unix_mode), tcp = ?plan.tcp, backlog = BACKLOG, "holding the listening sockets for every dispatcher");
        Ok(())
    }

    /// The variables a dispatcher is started with (none when nothing is held).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        if !self.is_held() {
            return Vec::new();
        }
        let mut vars = vec![
            (activation::LISTEN_FDS, self.names.len().to_string()),
            (activation::LISTEN_FDNAMES, self.names.join(":")),
        ];
        if self.from_systemd {
            vars.push((activation::SOCKET_HOLDER, "systemd".into()));
        }
        vars
    }

    /// Lets the next process spawned inherit the sockets (`yes`), or not.
    pub fn inheritable(&self, yes: bool) {
        let flag = if yes {
            FdFlag::empty()
        } else {
            FdFlag::FD_CLOEXEC
        };
        for i in 0..self.names.len() {
            let _ = fcntl(FIRST_FD + i as RawFd, FcntlArg::F_SETFD(flag));
        }
    }

    /// Stops holding them (the watchdog stops): removes the socket it bound
    /// (new connections are refused from now on) and closes them; systemd's
    /// stay with systemd.
    pub fn release(&mut self) {
        if !self.is_held() {
            return;
        }
        if !self.from_systemd {
            let _ = std::fs::remove_file(&self.socket);
        }
        for i in 0..self.names.len() {
            let _ = nix::unistd::close(FIRST_FD + i as RawFd);
        }
        self.names.clear();
        tracing::info!("listening sockets released");
    }

    /// Whether the socket file belongs to systemd (kept at exit).
    pub fn from_systemd(&self) -> bool {
        self.from_systemd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_read() {
        let p = Plan::parse("unix-mode 0666\ntcp 127.0.0.1:7070\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.unix_mode, 0o666);
        assert_eq!(p.tcp, Some("127.0.0.1:7070".parse().unwrap()));
        assert_eq!(Plan::parse("unix-mode 0600\n").unwrap().unwrap().tcp, None);
        assert_eq!(
            Plan::parse("invalid --workers must be at least 1\n").unwrap(),
            None
        );
        assert!(Plan::parse("unix-mode rw\n").is_err());
        assert!(Plan::parse("what\n").is_err());
    }
}
