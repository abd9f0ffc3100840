//! Who is on the other end: before a client sends anything (a payload, a
//! token), it checks that the server is run by a uid it trusts. On a Unix
//! socket, the kernel says who listens (`SO_PEERCRED`) and the directories
//! leading to the socket must be safe; on loopback TCP, the owner of the
//! server's side of the connection is read from `/proc/net/tcp` or `tcp6`.

use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The uids a client accepts as its server: its own, root, and any it is told to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedUids {
    own: u32,
    extra: Vec<u32>,
}

impl TrustedUids {
    /// This process's uid and root.
    pub fn own() -> Self {
        TrustedUids {
            own: nix::unistd::getuid().as_raw(),
            extra: Vec::new(),
        }
    }

    /// Also trusts `uid` (a dispatcher run by another user, e.g. a system account).
    pub fn with(mut self, uid: u32) -> Self {
        if !self.contains(uid) {
            self.extra.push(uid);
        }
        self
    }

    /// Whether `uid` is trusted.
    pub fn contains(&self, uid: u32) -> bool {
        uid == 0 || uid == self.own || self.extra.contains(&uid)
    }

    /// Says who is trusted, for messages: "uid 1000 (us), root or uid 998".
    pub fn describe(&self) -> String {
        let mut s = format!("uid {} (us)", self.own);
        if self.own != 0 {
            s.push_str(", root");
        }
        for u in &self.extra {
            s.push_str(&format!(", uid {u}"));
        }
        s
    }
}

impl Default for TrustedUids {
    fn default() -> Self {
        TrustedUids::own()
    }
}

/// What is wrong with a server, or why it could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The process that listens runs as a uid not trusted.
    #[error("it is served by uid {uid}, not by {trusted}; if that user runs your dispatcher, accept it with --server-uid {uid} (or OSPS_SERVER_UID)")]
    ForeignServer { uid: u32, trusted: String },
    /// A directory on the way to the socket belongs to a uid not trusted.
    #[error("directory {} is owned by uid {uid}, not by {trusted}, so that user could put any socket there; remove it or choose another --runtime-dir (or, if that user runs your dispatcher, pass --server-uid {uid})", path.display())]
    ForeignDir {
        path: PathBuf,
        uid: u32,
        trusted: String,
    },
    /// A directory on the way to the socket can be written by other users.
    #[error("directory {} has mode {mode:04o}: other users may write in it and replace the socket; chmod go-w it (or use the sticky bit) or choose another --runtime-dir", path.display())]
    OpenDir { path: PathBuf, mode: u32 },
    /// No socket in `/proc/net/tcp{,6}` matched the connection.
    #[error("cannot tell which user serves this loopback port (no matching socket in /proc/net/tcp or tcp6)")]
    UnknownTcpOwner,
    /// Reading the credentials or the tables failed.
    #[error("cannot check the server: {0}")]
    Io(#[from] io::Error),
}

/// The uid of the process at the other end of a Unix stream socket (for a
/// client: the one that called `listen`).
pub fn unix_peer_uid<F: AsFd>(socket: &F) -> io::Result<u32> {
    let cred = nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    Ok(cred.uid())
}

/// Checks that a server at `uid` is trusted.
pub fn check_uid(uid: u32, trusted: &TrustedUids) -> Result<(), PeerError> {
    if trusted.contains(uid) {
        Ok(())
    } else {
        Err(PeerError::ForeignServer {
            uid,
            trusted: trusted.describe(),
        })
    }
}

/// Checks the directories that lead to `socket`: each one, from the
/// socket's own directory up to `/` (symbolic links resolved), must be owned
/// by a trusted uid, and none may be writable by group or others, except a
/// sticky directory above the socket's own (such as `/tmp`), where others
/// cannot rename what is not theirs. Otherwise another user could have put
/// the socket there, or could swap it. A directory that does not exist (yet)
/// is not checked: there is nothing to connect to either.
pub fn check_socket_dirs(socket: &Path, trusted: &TrustedUids) -> Result<(), PeerError> {
    let Some(parent) = socket.parent() else {
        return Ok(());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let dir = match fs::canonicalize(parent) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // The path as given, links included (whoever owns a link or the
    // directory holding it could point it elsewhere), then where it leads.
    let literal = std::path::absolute(parent)?;
    for d in literal.ancestors() {
        match fs::symlink_metadata(d) {
            Ok(m) if m.file_type().is_symlink() && !trusted.contains(m.uid()) => {
                return Err(PeerError::ForeignDir {
                    path: d.to_path_buf(),
                    uid: m.uid(),
                    trusted: trusted.describe(),
                })
            }
            Ok(m) if m.file_type().is_symlink() => {}
            Ok(_) => check_dir(d, false, trusted)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    for (depth, d) in dir.ancestors().enumerate() {
        check_dir(d, depth == 0, trusted)?;
    }
    Ok(())
}

/// Checks one directory on the way to a socket (`own`: the socket's own,
/// where even a sticky directory writable by others is refused).
fn check_dir(d: &Path, own: bool, trusted: &TrustedUids) -> Result<(), PeerError> {
    let meta = match fs::metadata(d) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !trusted.contains(meta.uid()) {
        return Err(PeerError::ForeignDir {
            path: d.to_path_buf(),
            uid: meta.uid(),
            trusted: trusted.describe(),
        });
    }
    let mode = meta.mode() & 0o7777;
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && (own || !sticky) {
        return Err(PeerError::OpenDir {
            path: d.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Whether `ip` is a loopback address, its IPv4-mapped IPv6 form
/// (`::ffff:127.0.0.1`) included.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Checks a TCP server at `server` whose side of the connection is owned by
/// `owner` ([`tcp_server_uid`]): a trusted uid passes; a loopback server
/// (in any form, see [`is_loopback`]) whose owner cannot be found is
/// refused; a server on another host cannot be checked this way, and passes.
pub fn check_tcp_server(
    owner: Option<u32>,
    server: SocketAddr,
    trusted: &TrustedUids,
) -> Result<(), PeerError> {
    match owner {
        Some(uid) => check_uid(uid, trusted),
        None if is_loopback(server.ip()) => Err(PeerError::UnknownTcpOwner),
        None => Ok(()),
    }
}

/// The uid owning the server's side of the TCP connection from `local` (our
/// end) to `peer` (the server's address), from `/proc/net/tcp` and
/// `/proc/net/tcp6`: the row whose local address is `peer` and whose remote
/// address is `local`. The kernel gives an accepted connection the owner of
/// its listening socket, even before the server calls `accept`. `None` when
/// no row matches (e.g. the server is on another host or network namespace).
pub fn tcp_server_uid(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match fs::read_to_string(table) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(uid) = find_tcp_owner(&text, local, peer) {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

/// Looks up, in the text of a `/proc/net/tcp{,6}` table, the uid of the
/// socket whose local address is `server` and remote address `client`.
pub fn find_tcp_owner(table: &str, client: SocketAddr, server: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        let (local, remote) = (parse_proc_addr(f[1])?, parse_proc_addr(f[2])?);
        (same_addr(local, server) && same_addr(remote, client))
            .then(|| f[7].parse().ok())
            .flatten()
    })
}

/// Equal addresses, an IPv4 one and its IPv4-mapped IPv6 form included.
fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

/// Parses `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the
/// kernel prints each 32-bit word of the address in host byte order.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = (0..addr.len() / 8)
        .map(|i| {
            addr.get(i * 8..i * 8 + 8)
                .and_then(|w| u32::from_str_radix(w, 16).ok())
                .map(u32::to_ne_bytes)
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_are_read_in_host_order() {
        // Rows as a little-endian kernel prints them.
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_proc_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().unwrap())
            );
            assert_eq!(
                parse_proc_addr("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().unwrap())
            );
            assert_eq!(
                parse_proc_addr("0000000000000000FFFF00000100007F:0050"),
                Some("[::ffff:127.0.0.1]:80".parse().unwrap())
            );
        }
        assert_eq!(parse_proc_addr("zz:1"), None);
    }

    #[test]
    fn the_servers_row_is_found_not_the_clients() {
        if !cfg!(target_endian = "little") {
            return;
        }
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1\n\
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 3 1 0000000000000000 20 4 30 10 -1\n";
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(find_tcp_owner(table, client, server), Some(1000));
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:8080".parse().unwrap();
        assert_eq!(find_tcp_owner(table, client, mapped), Some(1000));
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(find_tcp_owner(table, client, other), None);
    }

    #[test]
    fn a_mapped_loopback_server_of_unknown_owner_is_refused() {
        let own = TrustedUids::own();
        for addr in [
            "127.0.0.1:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:127.1.2.3]:80",
        ] {
            let server: SocketAddr = addr.parse().unwrap();
            assert!(is_loopback(server.ip()), "{addr}");
            assert!(
                matches!(
                    check_tcp_server(None, server, &own),
                    Err(PeerError::UnknownTcpOwner)
                ),
                "{addr}"
            );
        }
        let remote: SocketAddr = "[::ffff:192.0.2.1]:80".parse().unwrap();
        assert!(!is_loopback(remote.ip()));
        check_tcp_server(None, remote, &own).unwrap();
        let me = nix::unistd::getuid().as_raw();
        check_tcp_server(Some(me), "[::ffff:127.0.0.1]:80".parse().unwrap(), &own).unwrap();
    }

    #[test]
    fn our_own_connection_is_ours() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let uid = tcp_server_uid(s.local_addr().unwrap(), s.peer_addr().unwrap()).unwrap();
        assert_eq!(uid, Some(nix::unistd::getuid().as_raw()));
    }

    #[test]
    fn trusted_uids_are_ours_roots_and_the_accepted() {
        let t = TrustedUids::own().with(4242);
        assert!(t.contains(0) && t.contains(4242));
        assert!(t.contains(nix::unistd::getuid().as_raw()));
        assert!(!t.contains(4243) || nix::unistd::getuid().as_raw() == 4243);
    }

    #[test]
    fn open_or_foreign_directories_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let inst = dir.path().join("inst");
        fs::create_dir(&inst).unwrap();
        let sock = inst.join("x.sock");
        fs::set_permissions(&inst, fs::Permissions::from_mode(0o700)).unwrap();
        check_socket_dirs(&sock, &TrustedUids::own()).unwrap();
        fs::set_permissions(&inst, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            check_socket_dirs(&sock, &TrustedUids::own()),
            Err(PeerError::OpenDir { .. })
        ));
        // Sticky and world-writable is fine above the socket's own directory only.
        fs::set_permissions(&inst, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_socket_dirs(&sock, &TrustedUids::own()).is_err());
        fs::set_permissions(&inst, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        check_socket_dirs(&sock, &TrustedUids::own()).unwrap();
        // Through a link of ours: checked on both sides.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&inst, &link).unwrap();
        check_socket_dirs(&link.join("x.sock"), &TrustedUids::own()).unwrap();
        // A missing directory has nothing to check.
        check_socket_dirs(&dir.path().join("none/x.sock"), &TrustedUids::own()).unwrap();
    }
}
