//! Where a dispatcher listens: a Unix socket (default) or TCP on loopback.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// A dispatcher address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain stream socket.
    Unix(PathBuf),
    /// A TCP address (loopback unless the operator says otherwise).
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    /// Parses `unix:/path`, `tcp:127.0.0.1:7000`, a bare path, or a bare address.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(p.into()));
        }
        let addr = s.strip_prefix("tcp:").unwrap_or(s);
        if let Ok(a) = addr.parse::<SocketAddr>() {
            return Ok(Endpoint::Tcp(a));
        }
        if s.starts_with("tcp:") {
            return Err(format!(
                "{addr:?} is not a socket address like 127.0.0.1:7000"
            ));
        }
        if s.contains('/') {
            return Ok(Endpoint::Unix(s.into()));
        }
        Err(format!("{s:?} is neither unix:PATH nor tcp:ADDR:PORT"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds() {
        assert_eq!("unix:/a/b".parse(), Ok(Endpoint::Unix("/a/b".into())));
        assert_eq!("/a/b".parse(), Ok(Endpoint::Unix("/a/b".into())));
        assert_eq!(
            "tcp:127.0.0.1:9".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:9".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:9".parse(),
            Ok(Endpoint::Tcp("[::1]:9".parse().unwrap()))
        );
        assert!("tcp:nope".parse::<Endpoint>().is_err());
        assert!("nope".parse::<Endpoint>().is_err());
    }
}
