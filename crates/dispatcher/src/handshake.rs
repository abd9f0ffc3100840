//! A connection's opening: the client's hello (and token), checked and
//! answered, and the refusals of peers that are not admitted or come when
//! the listener is full, each with one line saying why. Refusals and
//! garbage are logged at most once a second.

use std::rc::Rc;
use std::time::Duration;

use ipc_core::proto::{self, HelloStatus, Opening, HELLO_LEN, PROTOCOL_VERSION};
use ipc_core::token::MAX_TOKEN_LEN;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::admission::{Gate, PeerKey, Refusal};
use crate::conn::Peer;
use crate::metrics::{Listener, Refused};
use crate::shared::Shared;

/// How long a closing connection's leftover input is drained so the client
/// reads our last answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);

/// Refuses a connection over the limit: reads its hello (briefly), answers
/// with the `Refused` status and one line saying why, and closes.
pub async fn refuse<S>(shared: &Shared, stream: S, peer: &Peer, gate: &Gate, why: Refusal)
where
    S: AsyncRead + AsyncWrite,
{
    let line = refusal_line(gate, &peer.key, why);
    refuse_with(shared, stream, &peer.name, HelloStatus::Refused, &line).await;
}

/// The line a `Refused` hello carries.
pub fn refusal_line(gate: &Gate, peer: &PeerKey, why: Refusal) -> String {
    match why {
        Refusal::Full => format!(
            "OSPS dispatcher is full: {} connections open on this socket (the limit, {}); try again later",
            gate.max_connections, gate.flag
        ),
        Refusal::PeerShare if matches!(peer, PeerKey::Addr(_)) => format!(
            "OSPS dispatcher refuses another connection from {peer}: it holds {} connections on this port, its per-address share (half of the {} the port admits, {}); close some or try again later",
            gate.held_by(peer),
            gate.max_connections,
            gate.flag
        ),
        Refusal::PeerShare => format!(
            "OSPS dispatcher refuses another connection from {peer}: it holds {} connections on this socket, its per-user share (half of the {} the socket admits, {}; only the dispatcher's own user and root may hold more); close some or try again later",
            gate.held_by(peer),
            gate.max_connections,
            gate.flag
        ),
    }
}

/// Refuses a peer whose uid is not admitted (SO_PEERCRED).
pub async fn refuse_uid<S>(shared: Rc<Shared>, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite,
{
    shared.metrics.refused(Listener::Unix, Refused::Uid);
    let line = format!(
        "OSPS dispatcher refuses {peer}: only its own user and root are admitted (see --allow-uid)"
    );
    refuse_with(&shared, stream, &peer, HelloStatus::Denied, &line).await;
}

async fn refuse_with<S>(shared: &Shared, stream: S, peer: &str, status: HelloStatus, line: &str)
where
    S: AsyncRead + AsyncWrite,
{
    let Some(_held) = shared.admission.refusing() else {
        return; // a flood: close without a word rather than hold descriptors
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut hello = [0u8; HELLO_LEN];
    let _ = tokio::time::timeout(Duration::from_secs(1), rd.read_exact(&mut hello)).await;
    refuse_hello(&mut wr, status, line).await;
    let _ = wr.shutdown().await;
    log_rate_limited(|| tracing::warn!(%peer, "connection refused: {line}"));
    linger(&mut rd).await;
}

thread_local! {
    /// When a refusal or a garbage peer was last logged.
    static LAST_NOISY_LOG: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    /// When a token denial was last logged (apart, so garbage cannot hide them).
    static LAST_DENIAL_LOG: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Logs a failed token at most once a second.
pub fn log_denied(log: impl FnOnce()) {
    once_a_second(&LAST_DENIAL_LOG, log);
}

/// Logs at most once a second: a flood of bad peers must not flood the log.
pub fn log_rate_limited(log: impl FnOnce()) {
    once_a_second(&LAST_NOISY_LOG, log);
}

fn once_a_second(
    last: &'static std::thread::LocalKey<std::cell::Cell<Option<std::time::Instant>>>,
    log: impl FnOnce(),
) {
    let now = std::time::Instant::now();
    let due = last.with(|t| {
        t.get()
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
    });
    if due {
        last.with(|t| t.set(Some(now)));
        log();
    }
}

/// Why a handshake failed (`reason`, for the log) and how; `refused`
/// names it for the metrics (`None`: the peer left).
pub struct Failed {
    pub reason: String,
    pub how: Failure,
    pub refused: Option<Refused>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not an OSPS client, another version, or an oversized token: answered;
    /// its input is drained before closing so it reads the answer, not a reset.
    Answered,
    /// Missing or wrong token: `Denied` answered; the opening was read whole,
    /// so no draining. Logged at warn, on its own limiter.
    Denied,
    /// The peer left or the connection failed: nothing to answer.
    Gone,
}

/// Reads the client's opening (hello, and its token if it sends one) and
/// checks it; the caller answers an opening that passes (`Accepted`, or
/// `Refused` when the server is full). On garbage, answers one line of text
/// saying what this port expects. When `token` is set, the client must
/// present that token.
pub async fn handshake<R, W>(rd: &mut R, wr: &mut W, token: Option<&[u8]>) -> Result<(), Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Read no further than the opening needs: what follows is the first request.
    let mut buf = [0u8; proto::MAX_OPENING_LEN];
    let mut got = 0;
    let (version, presented) = loop {
        let need = match proto::parse_opening(&buf[..got]) {
            Opening::NeedMore(need) => need,
            Opening::NotOsps => {
                let _ = wr.write_all(garbage_reply(&buf[..got]).as_bytes()).await;
                let _ = wr.flush().await;
                let first = String::from_utf8_lossy(&buf[..got]).into_owned();
                return fail(
                    format!("not an OSPS client (first bytes {first:?})"),
                    Failure::Answered,
                    Some(Refused::NotOsps),
                );
            }
            Opening::TokenTooLong(len) => {
                let line = format!("OSPS dispatcher refuses a token of {len} bytes: tokens are at most {MAX_TOKEN_LEN} bytes");
                return fail(
                    refuse_hello(wr, HelloStatus::Denied, &line).await,
                    Failure::Answered,
                    Some(Refused::TokenTooLong),
                );
            }
            Opening::Hello { version, token, .. } => break (version, token),
        };
        match rd.read(&mut buf[got..need]).await {
            Ok(0) => {
                return fail(
                    format!("peer closed after {got} bytes of its opening"),
                    Failure::Gone,
                    None,
                )
            }
            Ok(n) => got += n,
            Err(e) => return fail(e.to_string(), Failure::Gone, None),
        }
    };
    if version != PROTOCOL_VERSION {
        let mut msg =
            proto::encode_hello(PROTOCOL_VERSION, HelloStatus::VersionUnsupported as u16).to_vec();
        msg.extend_from_slice(
            format!("OSPS dispatcher speaks protocol version {PROTOCOL_VERSION}, client asked for {version}; upgrade the client\n").as_bytes(),
        );
        let _ = wr.write_all(&msg).await;
        return fail(
            format!("protocol version {version} not supported"),
            Failure::Answered,
            Some(Refused::Version),
        );
    }
    // A denied peer's opening has been read whole: close without draining.
    match (token, presented) {
        (Some(_), None) => {
            let line = "OSPS dispatcher: this TCP port needs a token; give the client the dispatcher's token file (osps-client --token-file FILE)";
            fail(
                refuse_hello(wr, HelloStatus::Denied, line).await,
                Failure::Denied,
                Some(Refused::Token),
            )
        }
        (Some(expected), Some(p)) if !ipc_core::token::matches(expected, p) => {
            let line = "OSPS dispatcher refuses the connection: wrong token";
            fail(
                refuse_hello(wr, HelloStatus::Denied, line).await,
                Failure::Denied,
                Some(Refused::Token),
            )
        }
        _ => Ok(()),
    }
}

/// A failed handshake.
fn fail(reason: String, how: Failure, refused: Option<Refused>) -> Result<(), Failed> {
    Err(Failed {
        reason,
        how,
        refused,
    })
}

/// Answers a hello with `status` and `line`; returns `line` (the reason, for the log).
pub async fn refuse_hello<W: AsyncWrite + Unpin>(
    wr: &mut W,
    status: HelloStatus,
    line: &str,
) -> String {
    let mut msg = proto::encode_hello(PROTOCOL_VERSION, status as u16).to_vec();
    msg.extend_from_slice(line.as_bytes());
    msg.push(b'\n');
    let _ = wr.write_all(&msg).await;
    let _ = wr.flush().await;
    line.to_owned()
}

/// The one-line answer to a peer that does not speak OSPS.
fn garbage_reply(first: &[u8]) -> String {
    let line = format!(
        "OSPS job server: this socket speaks the binary OSPS protocol v{PROTOCOL_VERSION} (a connection starts with the 8 bytes \"OSPS\", version u16 LE, flags u16 LE; see docs/PROTOCOL.md); use osps-client\n"
    );
    let is_http = [
        "GET ", "POST", "HEAD", "PUT ", "DELE", "OPTI", "PATC", "CONN",
    ]
    .iter()
    .any(|m| first.starts_with(&m.as_bytes()[..first.len().min(m.len())]) && first.len() >= 3);
    if is_http {
        format!("HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{line}", line.len())
    } else {
        line
    }
}

/// Reads and discards `len` bytes.
pub async fn skip<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Drains what the client still sends, briefly, so that closing does not
/// reset the connection before it has read our last answer.
pub async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    let _ = tokio::time::timeout(LINGER, skip_to_eof(rd)).await;
}

async fn skip_to_eof<R: AsyncRead + Unpin>(rd: &mut R) {
    // On the heap, and only while lingering: a buffer on the stack here
    // would be part of every connection's task, idle or not.
    let mut buf = vec![0u8; 8192];
    let mut total = 0usize;
    while let Ok(n) = rd.read(&mut buf).await {
        total += n;
        if n == 0 || total > 64 << 20 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_replies_say_what_the_port_expects() {
        let text = garbage_reply(b"Demande echange ping pong\n");
        assert!(
            text.starts_with("OSPS job server")
                && text.ends_with('\n')
                && text.lines().count() == 1
        );
        let http = garbage_reply(b"GET / HTTP/1.1\r\n");
        assert!(http.starts_with("HTTP/1.0 400 Bad Request\r\n"));
        assert!(http.contains("binary OSPS protocol"));
    }
}
