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

use crate::admission::{Gate, Holder, PeerKey, Refusal, Wait};
use crate::shared::{OpName, QueuedJob, Reply, Shared};
use crate::slots::{JobSlot, Uploading, RESULT_RESERVE};

/// Bytes a connection reads ahead (headers of pipelined requests).
const READ_BUFFER: usize = 4096;
/// How long a closing connection's leftover input is drained so the client
/// reads our last answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The Unix socket (the peer's uid was checked already).
    Unix,
    /// TCP; `needs_token`: the peer must present the dispatcher's token.
    Tcp { needs_token: bool },
    /// The watchdog's heartbeat, on the Unix socket (`SO_PEERCRED` pid is the
    /// watchdog that started us): admitted outside every budget, so that no
    /// flood of clients can make a healthy dispatcher look hung.
    Watchdog,
}

impl Via {
    /// The listener's budgets; `None` for the watchdog, which has none.
    fn gate(self, shared: &Shared) -> Option<&Gate> {
        match self {
            Via::Unix => Some(&shared.unix_gate),
            Via::Tcp { .. } => Some(&shared.tcp_gate),
            Via::Watchdog => None,
        }
    }
}

/// Who is on the other end: a name for the log and a key for the budgets.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub key: PeerKey,
    /// Held to a share of its listener's connections (half): a uid admitted
    /// only by `--allow-uid`, or a TCP address on a listener that needs the
    /// token. The owner (our own uid, root) is not.
    pub capped: bool,
}

/// Counts one holder of a budget while alive.
struct Held<'a>(&'a std::cell::Cell<usize>);

impl<'a> Held<'a> {
    fn new(count: &'a std::cell::Cell<usize>) -> Self {
        count.set(count.get() + 1);
        Held(count)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Bytes of a reply the kernel may hold unsent on a TCP connection.
const TCP_NOTSENT_LOWAT: u32 = 128 << 10;

/// Sets up an accepted TCP connection: no Nagle delay (replies are written
/// whole), and at most [`TCP_NOTSENT_LOWAT`] bytes queued unsent
/// (`TCP_NOTSENT_LOWAT`), so that the socket turns writable again as soon
/// as the client takes some of a reply: without it, a send buffer grown to
/// a few MiB turns writable only once a third of it is free, and the write
/// deadline, which counts time without progress, would see a slow but
/// steady reader stall for seconds. (Bytes in flight are still bounded by
/// the congestion and receive windows only: no loss of throughput.)
pub fn tune_tcp(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(TCP_NOTSENT_LOWAT) {
        tracing::debug!("TCP_NOTSENT_LOWAT not set: {e}");
    }
}

/// Takes an accepted connection: serves it, or refuses it when its
/// listener's connection budget is spent.
pub async fn accept<S>(shared: Rc<Shared>, stream: S, peer: Peer, via: Via)
where
    S: AsyncRead + AsyncWrite + 'static,
{
    match via.gate(&shared) {
        Some(gate) => match gate.refuses(&peer.key, peer.capped) {
            Some(why) => refuse(&shared, stream, &peer, gate, why).await,
            None => serve(shared, stream, peer, via).await,
        },
        None => serve(shared, stream, peer, via).await,
    }
}

/// Refuses a connection over the limit: reads its hello (briefly), answers
/// with the `Refused` status and one line saying why, and closes.
async fn refuse<S>(shared: &Shared, stream: S, peer: &Peer, gate: &Gate, why: Refusal)
where
    S: AsyncRead + AsyncWrite,
{
    let line = refusal_line(gate, &peer.key, why);
    refuse_with(shared, stream, &peer.name, HelloStatus::Refused, &line).await;
}

/// The line a `Refused` hello carries.
fn refusal_line(gate: &Gate, peer: &PeerKey, why: Refusal) -> String {
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
    let line = format!(
        "OSPS dispatcher refuses {peer}: only its own user and root are admitted (see --allow-uid)"
    );
    refuse_with(&shared, stream, &peer, HelloStatus::Denied, &line).await;
}

async fn refuse_with<S>(shared: &Shared, stream: S, peer: &str, status: HelloStatus, line: &str)
where
    S: AsyncRead + AsyncWrite,
{
    if shared.refusing.get() >= shared.max_refusing {
        return; // a flood: close without a word rather than hold descriptors
    }
    let _held = Held::new(&shared.refusing);
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
fn log_denied(log: impl FnOnce()) {
    once_a_second(&LAST_DENIAL_LOG, log);
}

/// Logs at most once a second: a flood of bad peers must not flood the log.
fn log_rate_limited(log: impl FnOnce()) {
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

/// Why a handshake failed (`reason`, for the log) and how.
struct Failed {
    reason: String,
    how: Failure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Not an OSPS client, another version, or an oversized token: answered;
    /// its input is drained before closing so it reads the answer, not a reset.
    Answered,
    /// Missing or wrong token: `Denied` answered; the opening was read whole,
    /// so no draining. Logged at warn, on its own limiter.
    Denied,
    /// The peer left or the connection failed: nothing to answer.
    Gone,
}

/// Serves one accepted connection to its end.
async fn serve<S>(shared: Rc<Shared>, stream: S, peer: Peer, via: Via)
where
    S: AsyncRead + AsyncWrite + 'static,
{
    let gate = via.gate(&shared);
    let ticket = gate.map(|g| g.handshakes.enter(peer.key.clone()));
    let (rd, mut wr) = tokio::io::split(stream);
    // A small read buffer: a request's prefix and header arrive in one read
    // (large payloads bypass it, straight into their slot).
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUFFER, rd);
    let deadline = Duration::from_millis(shared.config.handshake_timeout_ms);
    let token = match via {
        Via::Tcp { needs_token: true } => shared.tcp_token.as_deref(),
        _ => None,
    };
    // Until admitted, a newer connection may evict this one (also while it
    // lingers after a refusal: every descriptor stays within a budget).
    let evicted = || async {
        match &ticket {
            Some(t) => t.evicted().await,
            None => std::future::pending().await,
        }
    };
    let opened = tokio::select! {
        r = tokio::time::timeout(deadline, handshake(&mut rd, &mut wr, token)) => r,
        () = evicted() => {
            log_rate_limited(
                || tracing::info!(peer = %peer.name, "evicted the oldest connection still silent in its handshake: the listener's handshake budget is full (such evictions are logged at most once a second)"),
            );
            return;
        }
    };
    let name = &peer.name;
    match opened {
        Ok(Ok(())) if gate.is_some_and(|g| g.refuses(&peer.key, peer.capped).is_some()) => {
            // Others were admitted while this one said hello.
            let gate = gate.expect("checked");
            let why = gate.refuses(&peer.key, peer.capped).expect("checked");
            let line = refusal_line(gate, &peer.key, why);
            refuse_hello(&mut wr, HelloStatus::Refused, &line).await;
            let _ = wr.shutdown().await;
            tokio::select! {
                () = linger(&mut rd) => {}
                () = evicted() => {}
            }
        }
        Ok(Ok(())) => {
            // Counted before the first await, so the limit holds exactly.
            let _admitted = gate.map(|g| g.admit(&peer.key, peer.capped));
            drop(ticket);
            let accepted = proto::encode_hello(PROTOCOL_VERSION, HelloStatus::Accepted as u16);
            if wr.write_all(&accepted).await.is_err() {
                return;
            }
            tracing::debug!(peer = %name, "client connected");
            let holder = Holder::new(peer.key);
            let (tx, rx) = mpsc::unbounded_channel();
            let mut writer = tokio::task::spawn_local(write_replies(
                Rc::clone(&shared),
                wr,
                rx,
                Rc::clone(&holder),
                name.clone(),
            ));
            tokio::select! {
                closing = read_requests(&shared, &mut rd, tx, &holder) => {
                    let _ = writer.await;
                    if closing {
                        linger(&mut rd).await;
                    }
                }
                // The writer ends first only when it gave up (the client left,
                // or took no reply bytes for the write deadline): stop
                // reading too, and close. What this connection still holds
                // is freed as its jobs end.
                _ = &mut writer => {}
            }
        }
        Ok(Err(Failed { reason, how })) => {
            if how == Failure::Denied {
                log_denied(
                    || tracing::warn!(peer = %name, "connection denied at handshake: {reason} (denials are logged at most once a second)"),
                );
            } else {
                log_rate_limited(
                    || tracing::info!(peer = %name, "connection refused at handshake: {reason} (such refusals are logged at most once a second)"),
                );
            }
            let _ = wr.shutdown().await;
            if how == Failure::Answered {
                tokio::select! {
                    () = linger(&mut rd) => {}
                    () = evicted() => {}
                }
            }
        }
        Err(_) => {
            tracing::info!(peer = %name, "connection dropped: no handshake within {deadline:?}")
        }
    }
}

/// Reads the client's opening (hello, and its token if it sends one) and
/// checks it; the caller answers an opening that passes (`Accepted`, or
/// `Refused` when the server is full). On garbage, answers one line of text
/// saying what this port expects. When `token` is set, the client must
/// present that token.
async fn handshake<R, W>(rd: &mut R, wr: &mut W, token: Option<&[u8]>) -> Result<(), Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let fail = |reason: String, how| Err(Failed { reason, how });
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
                );
            }
            Opening::TokenTooLong(len) => {
                let line = format!("OSPS dispatcher refuses a token of {len} bytes: tokens are at most {MAX_TOKEN_LEN} bytes");
                return fail(
                    refuse_hello(wr, HelloStatus::Denied, &line).await,
                    Failure::Answered,
                );
            }
            Opening::Hello { version, token, .. } => break (version, token),
        };
        match rd.read(&mut buf[got..need]).await {
            Ok(0) => {
                return fail(
                    format!("peer closed after {got} bytes of its opening"),
                    Failure::Gone,
                )
            }
            Ok(n) => got += n,
            Err(e) => return fail(e.to_string(), Failure::Gone),
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
        );
    }
    // A denied peer's opening has been read whole: close without draining.
    match (token, presented) {
        (Some(_), None) => {
            let line = "OSPS dispatcher: this TCP port needs a token; give the client the dispatcher's token file (osps-client --token-file FILE)";
            fail(
                refuse_hello(wr, HelloStatus::Denied, line).await,
                Failure::Denied,
            )
        }
        (Some(expected), Some(p)) if !ipc_core::token::matches(expected, p) => {
            let line = "OSPS dispatcher refuses the connection: wrong token";
            fail(
                refuse_hello(wr, HelloStatus::Denied, line).await,
                Failure::Denied,
            )
        }
        _ => Ok(()),
    }
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
async fn read_requests<R>(
    shared: &Rc<Shared>,
    rd: &mut R,
    tx: mpsc::UnboundedSender<Reply>,
    holder: &Rc<Holder>,
) -> bool
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
        let permit = match in_flight.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let _waiting = holder.wait(Wait::InFlight);
                in_flight
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed")
            }
        };
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
            _ => {
                let len = req.payload_len + RESULT_RESERVE;
                shared.slots.lease(len, holder).await
            }
        };
        let Some(mut lease) = lease else {
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
        let job = |lease, permit, received| QueuedJob {
            job_id: shared.next_job_id(),
            req_id: req.id,
            op: OpName::new(req.op),
            args: req.args.iter().map(|a| a.to_string()).collect(),
            lease,
            input_len: req.payload_len,
            reply: tx.clone(),
            attempts: 0,
            permit,
            received,
        };
        if shared.should_stream(req.op, req.payload_len) {
            // The job goes to an idle worker now and reads the payload as it
            // comes; the connection holds the slot until the upload ends (or
            // is dropped with it: then the job hears the payload never will).
            let (mut uploading, slot) = Uploading::start(lease, req.payload_len);
            let now = std::time::Instant::now();
            shared.enqueue(job(slot, permit, now), false);
            let payload = tokio::time::timeout(frame_deadline, uploading.read_from(rd));
            let read = payload.await.unwrap_or(Err(FrameError::Stalled));
            uploading.finish(read.is_ok());
            if let Err(e) = read {
                tracing::info!(
                    id = req.id,
                    "client left inside a {}-byte payload: {e}",
                    req.payload_len
                );
                return false;
            }
            continue;
        }
        let payload = tokio::time::timeout(
            frame_deadline,
            frame::read_payload_async(rd, &mut lease.bytes_mut()[..req.payload_len as usize]),
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
        shared.enqueue(
            job(JobSlot::Own(lease), permit, std::time::Instant::now()),
            false,
        );
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

/// Writes replies as they arrive, batching small ones into one write. The
/// write deadline is about progress: a client that takes no byte of its
/// replies for that long is dropped (this returns), and the slots of its
/// replies are freed; a slow reader that keeps taking bytes is served,
/// however long a large reply takes. Returns when every sender is gone, or
/// on that failure.
async fn write_replies<W>(
    shared: Rc<Shared>,
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    holder: Rc<Holder>,
    peer: String,
) where
    W: AsyncWrite + Unpin,
{
    let deadline = Duration::from_millis(shared.config.write_timeout_ms);
    let written = |end: Written| match end {
        Written::Done => true,
        Written::Gone(e) => {
            tracing::debug!(%peer, "connection ended while writing a reply: {e}");
            false
        }
        Written::Stalled => {
            let why = stall_cause(&shared, &holder, deadline);
            log_rate_limited(
                || tracing::info!(%peer, "dropping a connection: {why}; its slots are freed (logged at most once a second)"),
            );
            false
        }
    };
    let mut out = Vec::with_capacity(4096);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            let (req_id, outcome, result, lease) = match reply {
                Reply::Job {
                    req_id,
                    outcome,
                    result,
                    lease,
                    permit,
                } => (req_id, outcome, result, (lease, permit)),
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
            let bytes = lease.0.result(result);
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
                if !written(write_progressing(&mut wr, &out, deadline).await)
                    || !written(write_progressing(&mut wr, bytes, deadline).await)
                {
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
            if !written(write_progressing(&mut wr, &out, deadline).await) {
                return;
            }
            out.clear();
        }
    }
    let _ = tokio::time::timeout(deadline, async {
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
    })
    .await;
}

/// How writing a reply ended.
#[derive(Debug)]
enum Written {
    Done,
    /// The connection failed (the client left).
    Gone(std::io::Error),
    /// No byte could be written for the whole deadline.
    Stalled,
}

/// Writes all of `buf`, as fast as the client takes it: fails only when no
/// byte of it could be written for `deadline` (the deadline starts again
/// after each write that took some bytes), not when the whole takes longer.
/// The writer is the socket itself (nothing buffers in between), so there
/// is nothing to flush per reply; the writer flushes once when it ends.
async fn write_progressing<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut buf: &[u8],
    deadline: Duration,
) -> Written {
    while !buf.is_empty() {
        match tokio::time::timeout(deadline, wr.write(buf)).await {
            Ok(Ok(0)) => return Written::Gone(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Written::Gone(e),
            Err(_) => return Written::Stalled,
        }
    }
    Written::Done
}

/// Why a connection whose client took no reply bytes for `deadline` is
/// dropped, for the log: what its reader was waiting for meanwhile tells
/// whether the client is blocked writing a request the dispatcher will not
/// read until the client reads its replies (the client writes without
/// reading: PROTOCOL §10), or simply does not read.
fn stall_cause(shared: &Shared, holder: &Holder, deadline: Duration) -> String {
    let stalled =
        format!("its client took no byte of its replies for {deadline:?} (--write-timeout-ms)");
    let Some((wait, since)) = holder.waiting() else {
        return format!("{stalled}: it did not read its replies");
    };
    let waited = since.elapsed();
    let writes = "the client writes requests without reading its replies (a client must read replies while it writes: docs/PROTOCOL.md §10)";
    match wait {
        Wait::ConnCap => format!(
            "{stalled} while its next request waited {waited:.1?} for a slot over the connection's own share of the arena ({} bytes, --conn-arena-percent), which only writing its replies frees: {writes}",
            shared.slots.limits.conn
        ),
        Wait::InFlight => format!(
            "{stalled} while its next request waited {waited:.1?} behind {} unanswered requests (--max-in-flight), which only writing its replies frees: {writes}",
            shared.config.max_in_flight
        ),
        Wait::PeerCap => format!(
            "{stalled} while its next request waited {waited:.1?} for a slot (its peer holds its share of the arena, --peer-arena-percent): it did not read its replies"
        ),
        Wait::Arena => format!(
            "{stalled} while its next request waited {waited:.1?} for a slot (the arena is full): it did not read its replies"
        ),
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
