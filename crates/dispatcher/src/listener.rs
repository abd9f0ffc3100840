//! The listeners: the Unix socket and, when configured, a TCP port. Each
//! accepted connection is told apart (who is on the other end, through
//! which listener) and handed to [`conn::accept`] on a task of its own. A
//! new transport is one more [`Listener`] variant and its `identify`: the
//! connection code is generic over the stream.

use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::admission::PeerKey;
use crate::conn::{self, Peer, Via};
use crate::handshake::refuse_uid;
use crate::metrics::{self, counted};
use crate::shared::Shared;
use crate::DispatcherError;

/// One listening socket.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A connection just accepted.
enum Accepted {
    Unix(UnixStream),
    Tcp(TcpStream, SocketAddr),
}

impl Listener {
    /// Binds the Unix socket with `mode` ([`crate::held::unix_mode`]).
    pub fn bind_unix(path: &Path, mode: u32) -> Result<Listener, DispatcherError> {
        use std::os::unix::fs::PermissionsExt;
        let listen_err = |source| DispatcherError::Listen {
            what: path.display().to_string(),
            source,
        };
        let l = UnixListener::bind(path).map_err(listen_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(listen_err)?;
        Ok(Listener::Unix(l))
    }

    /// Binds a TCP port; returns it with the address it got.
    pub async fn bind_tcp(addr: SocketAddr) -> Result<(Listener, SocketAddr), DispatcherError> {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| DispatcherError::Listen {
                what: format!("tcp {addr}"),
                source,
            })?;
        let local = l.local_addr()?;
        Ok((Listener::Tcp(l), local))
    }

    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Listener::Unix(l) => Ok(Accepted::Unix(l.accept().await?.0)),
            Listener::Tcp(l) => {
                let (stream, addr) = l.accept().await?;
                Ok(Accepted::Tcp(stream, addr))
            }
        }
    }

    /// Accepts the next connection and starts serving it on its own task.
    /// Out of descriptors or the like: says so and pauses instead of spinning.
    pub async fn serve_next(&self, shared: &Rc<Shared>) {
        match self.accept().await {
            Ok(Accepted::Unix(stream)) => {
                let unix = metrics::Listener::Unix;
                match identify_unix(shared, &stream) {
                    Ok((peer, via)) => {
                        let conn = conn::accept(Rc::clone(shared), stream, peer, via);
                        spawn(counted(Rc::clone(shared), unix, conn));
                    }
                    Err(name) => {
                        let conn = refuse_uid(Rc::clone(shared), stream, name);
                        spawn(counted(Rc::clone(shared), unix, conn));
                    }
                }
            }
            Ok(Accepted::Tcp(stream, addr)) => {
                conn::tune_tcp(&stream);
                let (peer, via) = identify_tcp(shared, addr);
                let conn = conn::accept(Rc::clone(shared), stream, peer, via);
                spawn(counted(Rc::clone(shared), metrics::Listener::Tcp, conn));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn spawn(f: impl std::future::Future<Output = ()> + 'static) {
    tokio::task::spawn_local(f);
}

/// Who is on the Unix socket: the kernel tells (`SO_PEERCRED`). Admits only
/// our own uid, root, and those allowed by `--allow-uid` (else `Err`, with
/// the peer's name); knows the watchdog that started us by its pid.
fn identify_unix(shared: &Shared, stream: &UnixStream) -> Result<(Peer, Via), String> {
    let cred = stream.peer_cred().ok();
    let uid = cred.map(|c| c.uid());
    let name = format!("unix uid {}", uid.map_or("?".into(), |u| u.to_string()));
    let own = nix::unistd::getuid().as_raw();
    let admitted = uid.is_some_and(|u| u == own || u == 0 || shared.config.allow_uids.contains(&u));
    if !admitted {
        return Err(name);
    }
    let key = uid.map_or(PeerKey::Unknown, PeerKey::Uid);
    // A uid admitted only by --allow-uid may hold half of the socket's
    // connections: never all of the owner's.
    let capped = uid.is_some_and(|u| u != own && u != 0);
    let watchdog = shared.config.watchdog.as_ref().map(|w| w.pid as i32);
    let is_watchdog = watchdog.is_some() && cred.and_then(|c| c.pid()) == watchdog;
    let via = if is_watchdog {
        Via::Watchdog
    } else {
        Via::Unix
    };
    Ok((Peer { name, key, capped }, via))
}

/// Who is on a TCP connection: its address. With a token (remote clients),
/// one address may hold half of the listener's connections. Without one (a
/// loopback port), every local user is the same to us: no share can be
/// told apart (see README, Limits).
fn identify_tcp(shared: &Shared, addr: SocketAddr) -> (Peer, Via) {
    let token = shared.admission.tcp_token.is_some();
    let key = PeerKey::Addr(addr.ip().to_canonical());
    let peer = Peer {
        name: addr.to_string(),
        key,
        capped: token,
    };
    (peer, Via::Tcp { needs_token: token })
}

/// Serves the next connection of whichever listener has one.
pub async fn serve_next(listeners: &[Listener], shared: &Rc<Shared>) {
    match listeners {
        [one] => one.serve_next(shared).await,
        [a, b] => tokio::select! {
            () = a.serve_next(shared) => {}
            () = b.serve_next(shared) => {}
        },
        _ => unreachable!("one Unix socket, at most one TCP port"),
    }
}
