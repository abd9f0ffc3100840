//! One client connection: the handshake, then a reader that turns requests
//! into queued jobs (payload read straight into a segment slot) and a writer
//! that sends replies (result bytes straight from the slot) as they complete,
//! so a connection may pipeline many requests.

use std::rc::Rc;
use std::time::Duration;

use ipc_core::frame::{self, FrameError};
use ipc_core::proto::{
    self, ErrorKind, HelloStatus, Opening, Outcome, RemoteError, RequestRef, Response, HELLO_LEN,
    PROTOCOL_VERSION,
};
use ipc_core::token::MAX_TOKEN_LEN;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};
use tokio::sync::mpsc;

use crate::shared::{OpName, QueuedJob, Reply, Shared, RESULT_RESERVE};

/// Bytes a connection reads ahead (headers of pipelined requests).
const READ_BUFFER: usize = 4096;
/// How long a closing connection's leftover input is drained so the client
/// reads our last answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);

/// Takes an accepted connection: serves it, or refuses it when the
/// connection limit is reached.
/// `needs_token`: the peer must present the dispatcher's token (TCP with
/// `--token-file`).
pub async fn accept<S>(shared: Rc<Shared>, stream: S, peer: String, needs_token: bool)
where
    S: AsyncRead + AsyncWrite + 'static,
{
    if shared.connections.get() >= shared.config.max_connections {
        refuse(&shared, stream, &peer).await;
    } else {
        serve(shared, stream, peer, needs_token).await;
    }
}

/// Refuses a connection over the limit: reads its hello (briefly), answers
/// with the `Refused` status and one line saying why, and closes.
async fn refuse<S>(shared: &Shared, stream: S, peer: &str)
where
    S: AsyncRead + AsyncWrite,
{
    let limit = shared.config.max_connections;
    let line = format!("OSPS dispatcher is full: {limit} connections open (the limit, --max-connections); try again later");
    refuse_with(stream, peer, HelloStatus::Refused, &line).await;
}

/// Refuses a peer whose uid is not admitted (SO_PEERCRED).
pub async fn refuse_uid<S>(stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite,
{
    let line = format!(
        "OSPS dispatcher refuses {peer}: only its own user and root are admitted (see --allow-uid)"
    );
    refuse_with(stream, &peer, HelloStatus::Denied, &line).await;
}

async fn refuse_with<S>(stream: S, peer: &str, status: HelloStatus, line: &str)
where
    S: AsyncRead + AsyncWrite,
{
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
}

/// Logs at most once a second: a flood of bad peers must not flood the log.
fn log_rate_limited(log: impl FnOnce()) {
    let now = std::time::Instant::now();
    if LAST_NOISY_LOG.with(|t| {
        t.get()
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1))
    }) {
        LAST_NOISY_LOG.with(|t| t.set(Some(now)));
        log();
    }
}

/// Serves one accepted connection to its end.
async fn serve<S>(shared: Rc<Shared>, stream: S, peer: String, needs_token: bool)
where
    S: AsyncRead + AsyncWrite + 'static,
{
    shared.connections.set(shared.connections.get() + 1);
    let (rd, mut wr) = tokio::io::split(stream);
    // A small read buffer: a request's prefix and header arrive in one read
    // (large payloads bypass it, straight into their slot).
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUFFER, rd);
    let deadline = Duration::from_millis(shared.config.handshake_timeout_ms);
    let token = shared.tcp_token.as_deref().filter(|_| needs_token);
    match tokio::time::timeout(deadline, handshake(&mut rd, &mut wr, &peer, token)).await {
        Ok(Ok(())) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let writer = tokio::task::spawn_local(write_replies(Rc::clone(&shared), wr, rx));
            let closing = read_requests(&shared, &mut rd, tx).await;
            let _ = writer.await;
            if closing {
                linger(&mut rd).await;
            }
        }
        Ok(Err(reason)) => {
            log_rate_limited(
                || tracing::info!(%peer, "connection refused at handshake: {reason} (such refusals are logged at most once a second)"),
            );
            let _ = wr.shutdown().await;
            linger(&mut rd).await;
        }
        Err(_) => tracing::info!(%peer, "connection dropped: no handshake within {deadline:?}"),
    }
    shared.connections.set(shared.connections.get() - 1);
}

/// Reads the client's hello (and its token, if it sends one) and answers it.
/// On garbage, answers one line of text saying what this port expects. When
/// `token` is set, the client must present that token.
async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    peer: &str,
    token: Option<&[u8]>,
) -> Result<(), String>
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
                return Err(format!(
                    "not an OSPS client (first bytes {:?})",
                    String::from_utf8_lossy(&buf[..got])
                ));
            }
            Opening::TokenTooLong(len) => {
                return Err(refuse_hello(wr, HelloStatus::Denied, &format!("OSPS dispatcher refuses a token of {len} bytes: tokens are at most {MAX_TOKEN_LEN} bytes")).await);
            }
            Opening::Hello { version, token, .. } => break (version, token),
        };
        let n = rd
            .read(&mut buf[got..need])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("peer closed after {got} bytes of its opening"));
        }
        got += n;
    };
    if version != PROTOCOL_VERSION {
        let mut msg =
            proto::encode_hello(PROTOCOL_VERSION, HelloStatus::VersionUnsupported as u16).to_vec();
        msg.extend_from_slice(
            format!("OSPS dispatcher speaks protocol version {PROTOCOL_VERSION}, client asked for {version}; upgrade the client\n").as_bytes(),
        );
        let _ = wr.write_all(&msg).await;
        return Err(format!("protocol version {version} not supported"));
    }
    match (token, presented) {
        (Some(_), None) => {
            return Err(refuse_hello(wr, HelloStatus::Denied, "OSPS dispatcher: this TCP port needs a token; give the client the dispatcher's token file (osps-client --token-file FILE)").await);
        }
        (Some(expected), Some(p)) if !ipc_core::token::matches(expected, p) => {
            return Err(refuse_hello(
                wr,
                HelloStatus::Denied,
                "OSPS dispatcher refuses the connection: wrong token",
            )
            .await);
        }
        _ => {}
    }
    wr.write_all(&proto::encode_hello(
        PROTOCOL_VERSION,
        HelloStatus::Accepted as u16,
    ))
    .await
    .map_err(|e| e.to_string())?;
    tracing::debug!(%peer, "client connected");
    Ok(())
}

/// Answers a hello with `status` and `line`; returns `line` (the reason, for the log).
async fn refuse_hello<W: AsyncWrite + Unpin>(
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

/// Reads requests until the client leaves or misbehaves. Returns true when
/// the connection must close after the replies already queued (then the
/// client's leftover bytes are drained before closing).
async fn read_requests<R>(shared: &Rc<Shared>, rd: &mut R, tx: mpsc::UnboundedSender<Reply>) -> bool
where
    R: AsyncBufRead + Unpin,
{
    let idle = Duration::from_millis(shared.config.idle_timeout_ms);
    let frame_deadline = Duration::from_millis(shared.config.frame_timeout_ms);
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(shared.config.max_in_flight));
    let mut scratch = Vec::with_capacity(256);
    let inline = |req_id: u64, outcome: Outcome, bytes: Vec<u8>, permit| {
        let _ = tx.send(Reply::Inline {
            req_id,
            outcome,
            bytes,
            permit,
        });
    };
    let error = |kind: ErrorKind, message: String| Outcome::Err(RemoteError::new(kind, message));
    loop {
        // Wait for the next request (idle deadline), then for all of it (frame deadline).
        match tokio::time::timeout(idle, rd.fill_buf()).await {
            Err(_) => {
                tracing::info!("closing a connection idle for {idle:?}");
                return false;
            }
            Ok(Ok([])) => return false,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!("connection ended: {e}");
                return false;
            }
        }
        // Decoded in place: the request borrows its strings from `scratch`.
        let header = tokio::time::timeout(
            frame_deadline,
            frame::read_body_async(rd, &mut scratch, shared.config.max_frame),
        );
        let req: RequestRef<'_> = match header
            .await
            .unwrap_or(Err(FrameError::Stalled))
            .and_then(|()| frame::decode_body(&scratch))
        {
            Ok(r) => r,
            Err(FrameError::Closed) => return false,
            Err(FrameError::Stalled) => {
                tracing::info!(
                    "dropping a connection that stalled inside a request for {frame_deadline:?}"
                );
                return false;
            }
            Err(e @ (FrameError::TooLarge { .. } | FrameError::Corrupt(_))) => {
                tracing::info!("closing connection: {e}");
                inline(
                    0,
                    error(
                        ErrorKind::BadRequest,
                        format!("{e}; closing the connection"),
                    ),
                    Vec::new(),
                    None,
                );
                return true;
            }
            Err(e) => {
                tracing::debug!("connection ended: {e}");
                return false;
            }
        };
        // Every answer, even one the dispatcher makes itself, holds one of the
        // connection's in-flight permits until it is written: a client that
        // never reads cannot make the dispatcher queue replies without bound.
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        if req.payload_len > shared.max_payload {
            let msg = format!(
                "payload of {} bytes exceeds the limit of {} bytes; closing the connection",
                req.payload_len, shared.max_payload
            );
            inline(
                req.id,
                error(ErrorKind::TooLarge, msg),
                Vec::new(),
                Some(permit),
            );
            return true;
        }
        if req.op == proto::OP_STATUS && req.payload_len == 0 {
            let bytes = serde_json::to_vec(&shared.status()).expect("status serialises");
            inline(req.id, Outcome::Ok, bytes, Some(permit));
            continue;
        }
        // A slot, unless the request is refused; waiting for one ends if shutdown begins.
        let lease = match req.op {
            proto::OP_STATUS => None,
            _ => shared.lease(req.payload_len + RESULT_RESERVE).await,
        };
        let Some(lease) = lease else {
            // Skip the payload to stay in step with the stream, then refuse.
            // Under the same deadline as any payload: a refused one cannot be trickled forever.
            match tokio::time::timeout(frame_deadline, skip(rd, req.payload_len)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!("connection ended inside a payload: {e}");
                    return false;
                }
                Err(_) => {
                    tracing::info!("dropping a connection that stalled inside a request for {frame_deadline:?}");
                    return false;
                }
            }
            let outcome = if req.op == proto::OP_STATUS {
                error(ErrorKind::BadRequest, "status takes no payload".into())
            } else {
                error(
                    ErrorKind::ShuttingDown,
                    "the dispatcher is shutting down; retry later".into(),
                )
            };
            inline(req.id, outcome, Vec::new(), Some(permit));
            continue;
        };
        let buf = shared
            .segment
            .bytes_mut(lease.region())
            .expect("allocator regions lie in the arena");
        let payload = tokio::time::timeout(
            frame_deadline,
            frame::read_payload_async(rd, &mut buf[..req.payload_len as usize]),
        );
        if let Err(e) = payload.await.unwrap_or(Err(FrameError::Stalled)) {
            tracing::info!(
                id = req.id,
                "client left inside a {}-byte payload: {e}",
                req.payload_len
            );
            return false;
        }
        if shared.workers_stopped.get() {
            // The drain deadline passed while the payload arrived: no worker will take it.
            drop(lease);
            let outcome = error(
                ErrorKind::ShuttingDown,
                "the dispatcher is shutting down; retry later".into(),
            );
            inline(req.id, outcome, Vec::new(), Some(permit));
            continue;
        }
        let job = QueuedJob {
            job_id: shared.next_job_id(),
            req_id: req.id,
            op: OpName::new(req.op),
            args: req.args.iter().map(|a| a.to_string()).collect(),
            lease,
            input_len: req.payload_len,
            reply: tx.clone(),
            attempts: 0,
            permit,
            received: std::time::Instant::now(),
        };
        shared.enqueue(job, false);
    }
}

/// Reads and discards `len` bytes.
async fn skip<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Drains what the client still sends, briefly, so that closing does not
/// reset the connection before it has read our last answer.
async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    let _ = tokio::time::timeout(LINGER, skip_to_eof(rd)).await;
}

async fn skip_to_eof<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut buf = [0u8; 8192];
    let mut total = 0usize;
    while let Ok(n) = rd.read(&mut buf).await {
        total += n;
        if n == 0 || total > 64 << 20 {
            break;
        }
    }
}

/// Writes replies as they arrive, batching small ones into one write.
async fn write_replies<W>(shared: Rc<Shared>, mut wr: W, mut rx: mpsc::UnboundedReceiver<Reply>)
where
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(4096);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            let (req_id, outcome, bytes, lease) = match reply {
                Reply::Job {
                    req_id,
                    outcome,
                    result,
                    lease,
                    permit,
                } => {
                    let bytes = shared
                        .segment
                        .bytes(result)
                        .expect("result region checked by the pool");
                    (req_id, outcome, bytes, Some((lease, permit)))
                }
                Reply::Inline {
                    req_id,
                    outcome,
                    bytes,
                    permit: _held_until_written,
                } => {
                    let resp = Response {
                        id: req_id,
                        outcome,
                        result_len: bytes.len() as u64,
                    };
                    frame::encode(&resp, &mut out).expect("responses encode");
                    out.extend_from_slice(&bytes);
                    next = rx.try_recv().ok();
                    continue;
                }
            };
            let resp = Response {
                id: req_id,
                outcome,
                result_len: bytes.len() as u64,
            };
            frame::encode(&resp, &mut out).expect("responses encode");
            if bytes.len() <= 16 * 1024 {
                out.extend_from_slice(bytes);
            } else {
                // Large result: header, then the bytes straight from the slot.
                if wr.write_all(&out).await.is_err() || wr.write_all(bytes).await.is_err() {
                    return;
                }
                out.clear();
            }
            drop(lease);
            if out.len() < 64 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
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
