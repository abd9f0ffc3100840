//! The OSPS client library: connect to a dispatcher (Unix socket or TCP),
//! call operations, pipeline several requests on one connection, and read
//! the status report. Blocking I/O: a client is one caller and one socket.
//!
//! ```no_run
//! let mut c = osps_client::Client::connect_instance("default", None)?;
//! let digest = c.call("sha256", &[], b"hello")?;
//! # Ok::<(), osps_client::ClientError>(())
//! ```

pub mod render;

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ipc_core::frame::{self, FrameError, DEFAULT_MAX_FRAME};
use ipc_core::peer::{self, PeerError, TrustedUids};
use ipc_core::proto::{self, HelloStatus, Outcome, RemoteError, Request, Response, HELLO_LEN};
use ipc_core::status::StatusReport;
use ipc_core::token::MAX_TOKEN_LEN;
use ipc_core::{Endpoint, PathError, RuntimePaths};

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {endpoint}: {source} (is the dispatcher running?)")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Paths(#[from] PathError),
    #[error("{endpoint} is not an OSPS dispatcher (it answered {answer:?})")]
    NotOsps { endpoint: String, answer: String },
    /// The server closed the connection without a word at the hello: it is
    /// busy with other handshakes, or restarting. Trying again may work.
    #[error("{endpoint} closed the connection without answering the hello (busy or restarting)")]
    ClosedAtHello { endpoint: String },
    /// The server is full (`--max-connections`); trying again may work.
    #[error("the dispatcher refused the connection: {0}")]
    Refused(String),
    /// The server speaks another protocol version: trying again will not help.
    #[error("the dispatcher does not speak our protocol version: {0}")]
    VersionUnsupported(String),
    /// The token file cannot be used.
    #[error(transparent)]
    Token(#[from] ipc_core::token::TokenError),
    /// The dispatcher does not admit this client (uid or token).
    #[error("the dispatcher denied the connection: {0}")]
    Denied(String),
    /// The server is not one this client trusts (its uid, or the directories
    /// leading to its socket): nothing was sent to it.
    #[error("refusing to talk to {endpoint}: {reason}")]
    Untrusted {
        endpoint: String,
        #[source]
        reason: PeerError,
    },
    /// The request went out whole [`MAX_SENDS`] times, and each time the
    /// connection was lost (or the server stopping) before its answer: it is
    /// not sent again, since each send may have run it.
    #[error("sent the request {sends} times without getting its answer; not sending it again, as it may have run each time (last: {last})")]
    Resent {
        sends: u32,
        #[source]
        last: Box<ClientError>,
    },
    /// No answer within the time the caller allowed (see [`RetryPolicy::overall`]).
    #[error("no answer from {endpoint} within {} ms", after.as_millis())]
    Timeout { endpoint: String, after: Duration },
    /// Writing the result where the caller wanted it failed (e.g. a closed
    /// pipe, a full disk): not the server's fault, so not retried.
    #[error("cannot write the result: {0}")]
    Output(#[source] io::Error),
    #[error("connection: {0}")]
    Frame(#[from] FrameError),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The server answered with an error.
    #[error("{0}")]
    Remote(#[from] RemoteError),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// I/O errors that mean the connection went away or did not answer in time,
/// as opposed to errors of the caller's own files.
fn is_transient_io(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::NotConnected
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
    )
}

impl ClientError {
    /// True for transient failures a new connection may cure: the
    /// connection was lost or refused, the dispatcher is restarting,
    /// stopping or full. A deterministic refusal (too large, bad request,
    /// unknown operation, denied, untrusted, not OSPS, ...) is never
    /// retried: it would get the same answer. Requests may run more than
    /// once when retried (at-least-once).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Refused(_)
            | ClientError::ClosedAtHello { .. } => true,
            ClientError::Io(e) => is_transient_io(e),
            ClientError::Frame(FrameError::Io(e)) => is_transient_io(e),
            ClientError::Frame(e) => e.is_disconnect(),
            ClientError::Remote(e) => e.kind == proto::ErrorKind::ShuttingDown,
            ClientError::Paths(_)
            | ClientError::NotOsps { .. }
            | ClientError::VersionUnsupported(_)
            | ClientError::Protocol(_)
            | ClientError::Denied(_)
            | ClientError::Untrusted { .. }
            | ClientError::Timeout { .. }
            | ClientError::Resent { .. }
            | ClientError::Output(_)
            | ClientError::Token(_) => false,
        }
    }

    /// A copy of a server's answer (`Remote` or `Refused`), kept to report
    /// if the call gives up later; other errors are not kept.
    fn clone_answer(&self) -> ClientError {
        match self {
            ClientError::Remote(e) => ClientError::Remote(e.clone()),
            ClientError::Refused(line) => ClientError::Refused(line.clone()),
            e => ClientError::Protocol(e.to_string()),
        }
    }

    /// True when a read or write gave up on its timeout.
    fn is_timeout(&self) -> bool {
        let kind = match self {
            ClientError::Io(e) | ClientError::Frame(FrameError::Io(e)) => e.kind(),
            _ => return false,
        };
        matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
    }

    /// A few words on why a connection attempt failed, for the waiting notice.
    fn short_reason(&self) -> String {
        match self {
            ClientError::Connect { source, .. } => source.kind().to_string(),
            e if e.is_timeout() => "no answer".to_owned(),
            ClientError::Io(e) | ClientError::Frame(FrameError::Io(e)) => e.kind().to_string(),
            ClientError::Frame(e) => e.to_string(),
            ClientError::ClosedAtHello { .. } => "closed without a word".to_owned(),
            ClientError::Refused(line) => line.clone(),
            e => e.to_string(),
        }
    }
}

/// How a [`RetryingClient`] retries, and how long it waits for answers.
///
/// Two deadlines, for two things: `deadline` bounds the time spent
/// (re)connecting and retrying when the dispatcher is gone, restarting, full
/// or stopping; once a request is sent, its answer is awaited as long as the
/// server takes (the server's job timeout ends a job that runs too long),
/// unless `overall` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up reconnecting when the next attempt would start after this
    /// long spent connecting and retrying (time spent waiting for an answer
    /// on an open connection does not count).
    pub deadline: Duration,
    /// First pause between attempts; doubled each time up to `max_delay`.
    pub first_delay: Duration,
    /// Longest pause between attempts.
    pub max_delay: Duration,
    /// When set, the whole call (connecting, retries and the wait for the
    /// answer) ends within this: a liveness probe, or a caller's own bound.
    /// `None`: an answer is awaited as long as the server takes.
    pub overall: Option<Duration>,
    /// For a local instance, how long a missing socket and lock file are
    /// taken for a dispatcher still starting (counted from the call's
    /// start) before the call fails at once: a client started just after
    /// its watchdog waits for the socket to appear.
    pub start_grace: Duration,
}

/// How many times in all a [`RetryingClient`] sends one request whose answer is lost
/// (the first send and at most 3 resends), whatever time is left: each such send
/// may run the job (see PROTOCOL.md, section 14).
pub const MAX_SENDS: u32 = 4;

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(10),
            first_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(200),
            overall: None,
            start_grace: Duration::from_secs(2),
        }
    }
}

/// What a [`RetryingClient`] is waiting for, given to its waiting notice
/// (see [`RetryingClient::on_waiting`]).
#[derive(Debug)]
pub struct Waiting<'a> {
    /// Where it tries to connect.
    pub endpoint: &'a Endpoint,
    /// The last failure.
    pub error: &'a ClientError,
    /// How long it has been trying.
    pub since: Duration,
    /// How long it will go on trying.
    pub left: Duration,
}

impl std::fmt::Display for Waiting<'_> {
    /// "waiting for the OSPS dispatcher at unix:/run/... (not answering:
    /// connection refused); retrying for 9 s more"
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "waiting for the OSPS dispatcher at {} (not answering: {}); retrying for {} s more",
            self.endpoint,
            self.error.short_reason(),
            self.left.as_secs_f64().ceil() as u64
        )
    }
}

/// How long a [`RetryingClient`] keeps retrying before its waiting notice.
pub const WAITING_NOTICE_AFTER: Duration = Duration::from_secs(1);

/// The callback of [`RetryingClient::on_waiting`].
struct Notice(Box<dyn FnMut(&Waiting<'_>) + Send>);

impl std::fmt::Debug for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notice(..)")
    }
}

/// A client that reconnects and retries idempotent requests, so a restart
/// of the dispatcher costs the caller only latency.
#[derive(Debug)]
pub struct RetryingClient {
    endpoint: Endpoint,
    policy: RetryPolicy,
    client: Option<Client>,
    /// The instance's lock file, when known: while it is absent no dispatcher
    /// runs or is being restarted (a crash leaves it; an ordered stop removes
    /// it), so waiting would be pointless.
    lock_file: Option<std::path::PathBuf>,
    /// Presented in each hello, when set.
    token: Option<Vec<u8>>,
    /// Who may serve us.
    trusted: TrustedUids,
    /// Called once per call when reconnecting lasts over [`WAITING_NOTICE_AFTER`].
    notice: Option<Notice>,
    /// Attempts that failed and were retried, since creation.
    pub retries: u64,
}

impl RetryingClient {
    /// A client for `endpoint`; it connects on first use.
    pub fn new(endpoint: Endpoint, policy: RetryPolicy) -> Self {
        RetryingClient {
            endpoint,
            policy,
            client: None,
            lock_file: None,
            token: None,
            trusted: TrustedUids::own(),
            notice: None,
            retries: 0,
        }
    }

    /// Presents `token` in every hello (see [`Client::connect_with_token`]).
    pub fn with_token(mut self, token: Vec<u8>) -> Self {
        self.token = Some(token);
        self
    }

    /// Also accepts a server run by `uid` (own uid and root always are).
    pub fn with_server_uid(mut self, uid: u32) -> Self {
        self.trusted = self.trusted.with(uid);
        self
    }

    /// Calls `notice` once per call when the dispatcher has not answered for
    /// [`WAITING_NOTICE_AFTER`] while reconnecting (e.g. to tell a person at
    /// a terminal what the wait is for; [`Waiting`] displays as one line).
    pub fn on_waiting(mut self, notice: impl FnMut(&Waiting<'_>) + Send + 'static) -> Self {
        self.notice = Some(Notice(Box::new(notice)));
        self
    }

    /// A client for the Unix socket of `instance`.
    pub fn for_instance(
        instance: &str,
        runtime_dir: Option<&Path>,
        policy: RetryPolicy,
    ) -> Result<Self, ClientError> {
        let paths = RuntimePaths::new(instance, runtime_dir)?;
        let mut c = RetryingClient::new(Endpoint::Unix(paths.socket()), policy);
        c.lock_file = Some(paths.lock_file());
        Ok(c)
    }

    /// The endpoint it connects to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Runs `attempt` on a connected client until it succeeds, fails for a
    /// reason a retry cannot cure, or the retry deadline passes (time spent
    /// in `attempt`, waiting for the server's answer, does not count). With
    /// [`RetryPolicy::overall`], reads are bounded by the time left to it.
    pub fn run<T>(
        &mut self,
        mut attempt: impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut run = RunState::new(&self.policy);
        loop {
            let e = match self.attempt_once(&mut run, &mut attempt) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            self.keep_connection_after(&e);
            self.retry_after(&mut run, e)?;
            self.retries += 1;
            std::thread::sleep(run.delay);
            run.delay = (run.delay * 2).min(self.policy.max_delay);
        }
    }

    /// Connects if needed (within what is left of the deadlines) and runs
    /// `attempt` once, counting the time spent answering and the sends.
    fn attempt_once<T>(
        &mut self,
        run: &mut RunState,
        attempt: &mut impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let now = Instant::now();
        let overall_left = run.overall_left(now);
        let connect_budget = self
            .policy
            .deadline
            .saturating_sub(run.reconnecting(now))
            .min(overall_left.unwrap_or(Duration::MAX))
            .min(HANDSHAKE_TIMEOUT)
            .max(MIN_WAIT);
        let c = match self.client.as_mut() {
            Some(c) => c,
            None => self.client.insert(Client::connect_trusting(
                &self.endpoint,
                self.token.as_deref(),
                connect_budget,
                &self.trusted,
            )?),
        };
        run.outage = None;
        let t = Instant::now();
        let before = c.sent_whole;
        let r = c.set_timeout(overall_left).and_then(|()| attempt(c));
        run.answering += t.elapsed();
        // A send counts when its answer was lost: a job that may
        // have run. An answer (`shutting down`: an ordered stop,
        // which ends with the lock file gone) does not count.
        if c.sent_whole > before && !matches!(r, Err(ClientError::Remote(_))) {
            run.sends += 1;
        }
        r
    }

    /// A connection is kept after a plain answer; not when its state is
    /// unknown, nor after `shutting down` (a resend goes to a new
    /// connection, to the next dispatcher if one comes).
    fn keep_connection_after(&mut self, e: &ClientError) {
        let plain_answer =
            matches!(e, ClientError::Remote(r) if r.kind != proto::ErrorKind::ShuttingDown);
        if !plain_answer || self.client.as_ref().is_none_or(|c| c.broken) {
            self.client = None;
        }
    }

    /// After a failed attempt: `Ok` to retry after `run.delay`, or the error
    /// to return (not retryable, no dispatcher coming, resent too often,
    /// out of time).
    fn retry_after(&mut self, run: &mut RunState, e: ClientError) -> Result<(), ClientError> {
        let now = Instant::now();
        if e.is_timeout() && run.ends.is_some_and(|end| now + MIN_WAIT >= end) {
            return Err(ClientError::Timeout {
                endpoint: self.endpoint.to_string(),
                after: self.policy.overall.unwrap_or_default(),
            });
        }
        // No lock file: no dispatcher runs, or one is still starting.
        let no_lock = matches!(e, ClientError::Connect { .. })
            && self.lock_file.as_ref().is_some_and(|l| !l.exists());
        let grace_left = self
            .policy
            .start_grace
            .saturating_sub(now.duration_since(run.start));
        let gone = no_lock && grace_left.is_zero();
        if gone || !e.is_retryable() {
            return Err(more_telling(e, run.last_answer.take()));
        }
        if matches!(e, ClientError::Remote(_) | ClientError::Refused(_)) {
            run.last_answer = Some(e.clone_answer());
        }
        if run.sends >= MAX_SENDS {
            return Err(ClientError::Resent {
                sends: run.sends,
                last: Box::new(e),
            });
        }
        let left = self
            .policy
            .deadline
            .saturating_sub(run.reconnecting(now))
            .min(
                run.ends
                    .map_or(Duration::MAX, |end| end.saturating_duration_since(now)),
            );
        if run.delay >= left {
            return Err(if e.is_timeout() {
                ClientError::Timeout {
                    endpoint: self.endpoint.to_string(),
                    after: self.policy.overall.unwrap_or_else(|| run.start.elapsed()),
                }
            } else {
                more_telling(e, run.last_answer.take())
            });
        }
        let left = if no_lock { left.min(grace_left) } else { left };
        self.notice_waiting(run, now, &e, left);
        Ok(())
    }

    /// Tells the `on_waiting` callback, once per call, that the dispatcher
    /// has not answered for [`WAITING_NOTICE_AFTER`].
    fn notice_waiting(
        &mut self,
        run: &mut RunState,
        now: Instant,
        e: &ClientError,
        left: Duration,
    ) {
        let since = now.duration_since(*run.outage.get_or_insert(now));
        if run.told || since < WAITING_NOTICE_AFTER {
            return;
        }
        if let Some(Notice(notice)) = self.notice.as_mut() {
            run.told = true;
            notice(&Waiting {
                endpoint: &self.endpoint,
                error: e,
                since,
                left,
            });
        }
    }

    /// [`Client::call`] with reconnection and retries.
    pub fn call(
        &mut self,
        op: &str,
        args: &[&str],
        payload: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        self.run(|c| c.call(op, args, payload))
    }

    /// [`Client::status`] with reconnection and retries.
    pub fn status(&mut self) -> Result<StatusReport, ClientError> {
        self.run(Client::status)
    }

    /// [`Client::metrics`] with reconnection and retries.
    pub fn metrics(&mut self) -> Result<String, ClientError> {
        self.run(Client::metrics)
    }
}

/// Connects to `endpoint` within `within`, and checks who serves it before
/// anything is sent: the directories leading to a Unix socket and the uid
/// listening on it, or the owner of a TCP connection's server side.
fn connect_verified(
    endpoint: &Endpoint,
    name: &str,
    within: Duration,
    trusted: &TrustedUids,
) -> Result<Stream, ClientError> {
    let connect_err = |source| ClientError::Connect {
        endpoint: name.to_owned(),
        source,
    };
    let untrusted = |reason| ClientError::Untrusted {
        endpoint: name.to_owned(),
        reason,
    };
    match endpoint {
        Endpoint::Unix(p) => {
            peer::check_socket_dirs(p, trusted).map_err(untrusted)?;
            let addr = socket2::SockAddr::unix(p).map_err(connect_err)?;
            let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
                .map_err(connect_err)?;
            s.connect_timeout(&addr, within).map_err(connect_err)?;
            let s = UnixStream::from(s);
            let uid = peer::unix_peer_uid(&s).map_err(|e| untrusted(e.into()))?;
            peer::check_uid(uid, trusted).map_err(untrusted)?;
            Ok(Sock::Unix(s).into())
        }
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect_timeout(a, within).map_err(connect_err)?;
            let (local, server) = (s.local_addr()?, s.peer_addr()?);
            let owner = peer::tcp_server_uid(local, server).map_err(|e| untrusted(e.into()))?;
            // Another host: only a secure tunnel can vouch for it.
            peer::check_tcp_server(owner, server, trusted).map_err(untrusted)?;
            s.set_nodelay(true)?;
            Ok(Sock::Tcp(s).into())
        }
    }
}

/// Closed without a word (the opening unread, so perhaps with a reset):
/// busy with other handshakes, or going away.
fn closed_at_hello(e: io::Error, name: &str) -> ClientError {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => ClientError::ClosedAtHello {
            endpoint: name.to_owned(),
        },
        _ => e.into(),
    }
}

/// Reads the server's hello (within the timeouts set on the stream, which
/// it then clears): `Ok` when accepted; otherwise what the server said, or
/// that it is not an OSPS server.
fn read_hello(reader: &mut BufReader<Stream>, name: &str) -> Result<(), ClientError> {
    let mut hello = [0u8; HELLO_LEN];
    let got = frame::fill(reader, &mut hello).map_err(|e| closed_at_hello(e, name))?;
    reader.get_ref().set_timeouts(None)?;
    if got == 0 {
        return Err(ClientError::ClosedAtHello {
            endpoint: name.to_owned(),
        });
    }
    let Some((_version, status)) = (got == HELLO_LEN)
        .then(|| proto::decode_hello(&hello))
        .flatten()
    else {
        let mut rest = Vec::new();
        let _ = reader.take(512).read_to_end(&mut rest);
        let mut answer = hello[..got].to_vec();
        answer.extend_from_slice(&rest);
        return Err(ClientError::NotOsps {
            endpoint: name.to_owned(),
            answer: String::from_utf8_lossy(&answer).trim().to_owned(),
        });
    };
    let status = HelloStatus::from_u16(status);
    if status == Some(HelloStatus::Accepted) {
        return Ok(());
    }
    let mut line = String::new();
    let _ = reader.take(1024).read_to_string(&mut line);
    let line = line.trim().to_owned();
    Err(match status {
        Some(HelloStatus::Denied) => ClientError::Denied(line),
        Some(HelloStatus::VersionUnsupported) => ClientError::VersionUnsupported(line),
        _ => ClientError::Refused(line),
    })
}

/// The shortest wait or budget [`RetryingClient::run`] uses.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Where one [`RetryingClient::run`] stands: its clock and what it has seen.
#[derive(Debug)]
struct RunState {
    start: Instant,
    /// When [`RetryPolicy::overall`] runs out.
    ends: Option<Instant>,
    /// Spent in attempts (waiting for answers), not reconnecting.
    answering: Duration,
    /// Since when connecting has failed, if it does.
    outage: Option<Instant>,
    /// The waiting notice was given.
    told: bool,
    /// The next backoff delay.
    delay: Duration,
    /// Attempts in which a request went out whole.
    sends: u32,
    /// The last answer the server gave (more telling, at the end, than a
    /// failed connect).
    last_answer: Option<ClientError>,
}

impl RunState {
    fn new(policy: &RetryPolicy) -> RunState {
        let start = Instant::now();
        RunState {
            start,
            ends: policy.overall.map(|d| start + d),
            answering: Duration::ZERO,
            outage: None,
            told: false,
            delay: policy.first_delay,
            sends: 0,
            last_answer: None,
        }
    }

    /// Time spent reconnecting so far (what the retry deadline counts).
    fn reconnecting(&self, now: Instant) -> Duration {
        now.duration_since(self.start)
            .saturating_sub(self.answering)
    }

    /// What is left of the overall time, if bounded (at least [`MIN_WAIT`]).
    fn overall_left(&self, now: Instant) -> Option<Duration> {
        self.ends
            .map(|e| e.saturating_duration_since(now).max(MIN_WAIT))
    }
}

/// The error to report when a call gives up with `e`: a failed connect
/// says less than what the server last answered (e.g. `shutting down`,
/// before its socket went away), so that answer is reported instead.
fn more_telling(e: ClientError, last_answer: Option<ClientError>) -> ClientError {
    match (e, last_answer) {
        (ClientError::Connect { .. } | ClientError::ClosedAtHello { .. }, Some(answer)) => answer,
        (e, _) => e,
    }
}

/// A socket to a dispatcher.
#[derive(Debug)]
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// A socket to a dispatcher, with the read timeout set on it (kept here
/// too: a read waits for the socket to turn readable first, bounded by it).
#[derive(Debug)]
struct Stream {
    sock: Sock,
    read_timeout: std::cell::Cell<Option<Duration>>,
}

impl From<Sock> for Stream {
    fn from(sock: Sock) -> Self {
        Stream {
            sock,
            read_timeout: std::cell::Cell::new(None),
        }
    }
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        let sock = match &self.sock {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        };
        Ok(Stream {
            sock,
            read_timeout: self.read_timeout.clone(),
        })
    }

    /// Bounds reads and writes (the option belongs to the socket, so it
    /// holds for every clone of it; the wait for readability before a read
    /// is bounded on this handle).
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.read_timeout.set(t);
        match &self.sock {
            Sock::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Sock::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        }
    }

    /// Writes what the socket takes now, without waiting (`WouldBlock` when
    /// it takes nothing); never raises SIGPIPE.
    fn send_now(&self, bytes: &[u8]) -> io::Result<usize> {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        let fd = self.as_fd().as_raw_fd();
        send(fd, bytes, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
    }

    /// Whether a read would not block (bytes, end of stream or an error wait).
    fn readable_now(&self) -> io::Result<bool> {
        self.wait_readable(Some(Duration::ZERO))
    }

    /// Waits until a read would not block, at most `timeout` (`None`: no
    /// bound); returns whether it would not.
    fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let timeout = match timeout {
            None => PollTimeout::NONE,
            // Rounded up: a short timeout must not become a busy loop.
            Some(t) => {
                PollTimeout::try_from(t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, timeout) {
                Ok(_) => return Ok(fds[0].revents().is_some_and(|r| !r.is_empty())),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.sock {
            Sock::Unix(s) => s.as_fd(),
            Sock::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    /// Waits for the socket to turn readable (`poll(2)` for `POLLIN`), then
    /// reads. A thread blocked in `recv(2)` on a Unix socket is woken each
    /// time the server takes bytes this socket sent (the kernel's
    /// write-space wake-up reaches every sleeper on the socket, whatever it
    /// waits for): a wasted wake-up, and a context switch, per request.
    /// `poll` waits for `POLLIN` only.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.wait_readable(self.read_timeout.get())? {
            return Err(io::ErrorKind::WouldBlock.into()); // as SO_RCVTIMEO says it
        }
        match &mut self.sock {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.sock {
            Sock::Unix(s) => s.write(buf),
            Sock::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One reply: its request id and the result bytes or the server's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The id of the request it answers.
    pub id: u64,
    /// The result bytes, or the typed error.
    pub result: Result<Vec<u8>, RemoteError>,
}

/// A connection to a dispatcher.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<Stream>,
    writer: Stream,
    endpoint: String,
    next_id: u64,
    out: Vec<u8>,
    scratch: Vec<u8>,
    /// Replies read while waiting for another id, or while sending.
    early: HashMap<u64, Reply>,
    /// The timeout set by [`Client::set_timeout`].
    timeout: Option<Duration>,
    /// The connection cannot be used any more (the server said it closes,
    /// or the byte stream is out of step).
    broken: bool,
    /// Requests sent whole on this connection (see [`MAX_SENDS`]).
    sent_whole: u64,
}

/// How long `connect` waits for the server's hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client whose write failed waits for the server's answer
/// saying why (e.g. `too large`) before reporting the write error itself.
const ANSWER_AFTER_WRITE_FAILURE: Duration = Duration::from_secs(1);

/// Chunk size when streaming a payload from a reader (e.g. a file); between
/// chunks, the client looks for an early answer (see [`Client::send`]).
const STREAM_CHUNK: usize = 256 * 1024;

/// Copies up to `len` bytes from `r` to `w` in chunks of at most
/// [`STREAM_CHUNK`]; returns how many were copied (fewer only at end of input).
fn copy_chunked<R: Read + ?Sized, W: Write + ?Sized>(
    r: &mut R,
    w: &mut W,
    len: u64,
) -> io::Result<u64> {
    for_each_chunk(r, len, |chunk| w.write_all(chunk)).map_err(|e| match e {
        Chunked::Read(e) | Chunked::Use(e) => e,
    })
}

/// Where [`for_each_chunk`] failed: reading its input, or in what it did
/// with a chunk.
enum Chunked<E> {
    Read(io::Error),
    Use(E),
}

/// Reads up to `len` bytes from `r` in chunks of at most [`STREAM_CHUNK`]
/// and hands each to `f`; returns how many were read (fewer only at end of
/// input).
fn for_each_chunk<R: Read + ?Sized, E>(
    r: &mut R,
    len: u64,
    mut f: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<u64, Chunked<E>> {
    let mut buf = vec![0u8; (len as usize).clamp(1, STREAM_CHUNK)];
    let mut copied = 0u64;
    while copied < len {
        let want = buf.len().min((len - copied) as usize);
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Chunked::Read(e)),
        };
        f(&buf[..n]).map_err(Chunked::Use)?;
        copied += n as u64;
    }
    Ok(copied)
}

/// The caller's output, remembering whether it failed (as opposed to the socket).
struct Output<'a, W> {
    inner: &'a mut W,
    failed: bool,
}

impl<W: Write> Write for Output<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|_| self.failed = true)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

/// Payloads up to this size are sent in the same write as their header.
const COALESCE: usize = 16 * 1024;

impl Client {
    /// Connects to the dispatcher of `instance` through its Unix socket.
    pub fn connect_instance(
        instance: &str,
        runtime_dir: Option<&Path>,
    ) -> Result<Client, ClientError> {
        let paths = RuntimePaths::new(instance, runtime_dir)?;
        Client::connect(&Endpoint::Unix(paths.socket()))
    }

    /// Connects to `endpoint` and performs the handshake.
    pub fn connect(endpoint: &Endpoint) -> Result<Client, ClientError> {
        Client::connect_with_token(endpoint, None)
    }

    /// Connects to `endpoint`, presenting `token` in the hello (needed on a
    /// TCP listener started with `--token-file`; see [`ipc_core::token::load`]).
    pub fn connect_with_token(
        endpoint: &Endpoint,
        token: Option<&[u8]>,
    ) -> Result<Client, ClientError> {
        Client::connect_within(endpoint, token, HANDSHAKE_TIMEOUT)
    }

    /// [`Client::connect_with_token`], waiting at most `handshake_timeout`
    /// for the server's hello (a stopped server accepts but never answers).
    pub fn connect_within(
        endpoint: &Endpoint,
        token: Option<&[u8]>,
        handshake_timeout: Duration,
    ) -> Result<Client, ClientError> {
        Client::connect_trusting(endpoint, token, handshake_timeout, &TrustedUids::own())
    }

    /// [`Client::connect_within`], accepting a server run by any uid of
    /// `trusted`. Every connection verifies its server before it sends
    /// anything: on a Unix socket, the directories leading to it
    /// ([`peer::check_socket_dirs`]) and the uid that listens
    /// (`SO_PEERCRED`); on TCP, the uid that owns the server's side of the
    /// connection when it is on this host ([`peer::tcp_server_uid`]; a
    /// loopback server whose owner cannot be found is refused).
    pub fn connect_trusting(
        endpoint: &Endpoint,
        token: Option<&[u8]>,
        handshake_timeout: Duration,
        trusted: &TrustedUids,
    ) -> Result<Client, ClientError> {
        let name = endpoint.to_string();
        // A wedged server's full backlog makes connect itself wait: bounded too.
        let within = handshake_timeout.max(Duration::from_millis(1));
        let stream = connect_verified(endpoint, &name, within, trusted)?;
        let mut writer = stream.try_clone()?;
        let mut opening = Vec::with_capacity(proto::MAX_OPENING_LEN);
        proto::encode_opening(token, &mut opening).ok_or_else(|| {
            ClientError::Protocol(format!(
                "a token of {} bytes is longer than {MAX_TOKEN_LEN}",
                token.map_or(0, <[u8]>::len)
            ))
        })?;
        writer
            .write_all(&opening)
            .map_err(|e| closed_at_hello(e, &name))?;
        // A stopped or wedged server accepts the connection but never answers.
        stream.set_timeouts(Some(within))?;
        let mut reader = BufReader::with_capacity(64 * 1024, stream);
        read_hello(&mut reader, &name)?;
        Ok(Client {
            reader,
            writer,
            endpoint: name,
            next_id: 1,
            out: Vec::with_capacity(COALESCE + 256),
            scratch: Vec::with_capacity(256),
            early: HashMap::new(),
            timeout: None,
            broken: false,
            sent_whole: 0,
        })
    }

    /// The endpoint this client is connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Bounds how long a read or a write waits for the server (None: forever).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<(), ClientError> {
        self.reader.get_ref().set_timeouts(t)?;
        self.timeout = t;
        Ok(())
    }

    /// False once the connection cannot carry more requests: the server
    /// answered that it closes it (`too large`, or an error about the
    /// connection), or a request could not be sent whole.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Sends a request without waiting for its reply; returns its id.
    ///
    /// While a large payload goes out, the client watches for answers: the
    /// server refuses an oversized payload from its header alone and then
    /// closes, so such an answer (or one about the connection, id 0) ends
    /// the sending and is returned as the error at once; other answers are
    /// kept for [`Client::recv`] and [`Client::wait`]. When a write fails
    /// because the server closed, its answer, if it sent one, is returned
    /// instead of the write error. While the server does not take more bytes
    /// (it may first need earlier replies of this connection to be read),
    /// the replies that arrive are read and kept, so `send`, `send`, `wait`,
    /// `wait` of large requests cannot stall against the server.
    pub fn send(&mut self, op: &str, args: &[&str], payload: &[u8]) -> Result<u64, ClientError> {
        let id = self.encode_header(op, args, payload.len() as u64)?;
        let mut out = std::mem::take(&mut self.out);
        let result = if payload.len() <= COALESCE {
            out.extend_from_slice(payload);
            self.write_watching(id, &out, false)
        } else {
            // Large payloads go out straight from the caller's buffer.
            self.write_watching(id, &out, false).and_then(|()| {
                payload
                    .chunks(STREAM_CHUNK)
                    .try_for_each(|chunk| self.write_watching(id, chunk, true))
            })
        };
        self.out = out;
        result?;
        self.sent_whole += 1;
        Ok(id)
    }

    /// Sends a request whose `len` payload bytes are read from `payload`
    /// (e.g. a file), without holding them all in memory; watches for an
    /// early answer as [`Client::send`] does.
    pub fn send_from<R: Read>(
        &mut self,
        op: &str,
        args: &[&str],
        len: u64,
        mut payload: R,
    ) -> Result<u64, ClientError> {
        let id = self.encode_header(op, args, len)?;
        let out = std::mem::take(&mut self.out);
        let sent = self.write_watching(id, &out, false);
        self.out = out;
        sent?;
        let copied = match for_each_chunk(&mut payload, len, |chunk| {
            self.write_watching(id, chunk, true)
        }) {
            Ok(copied) => copied,
            Err(Chunked::Read(e)) => {
                self.broken = true; // the request is cut short
                return Err(e.into());
            }
            Err(Chunked::Use(e)) => return Err(e),
        };
        if copied != len {
            self.broken = true;
            return Err(ClientError::Protocol(format!(
                "payload source gave {copied} of {len} bytes"
            )));
        }
        self.sent_whole += 1;
        Ok(id)
    }

    /// Writes `bytes` of request `id`, first (with `watch`: before payload
    /// chunks, not before a header) taking in any answer already there: an
    /// answer that ends the connection (`too large` for `id`, or id 0) is
    /// returned as the error. A failed write is explained by the server's
    /// answer when there is one.
    ///
    /// The socket is written without blocking: while the server does not
    /// read (it may wait for this connection's earlier replies to be read
    /// before it takes more of its requests), the client waits for the socket
    /// to be writable *or readable*, and takes in the replies that arrive
    /// (kept for [`Client::wait`]), so neither side waits for the other.
    /// A write the socket takes at once costs one system call, as a
    /// blocking one would.
    fn write_watching(&mut self, id: u64, bytes: &[u8], watch: bool) -> Result<(), ClientError> {
        while watch && (!self.reader.buffer().is_empty() || self.reader.get_ref().readable_now()?) {
            if let Some(e) = self.take_answer(id)? {
                return Err(e);
            }
        }
        let mut rest = bytes;
        // Times in a row the socket said it was writable and then took
        // nothing (it can, under memory pressure): back off, do not spin.
        let mut idle = 0u32;
        while !rest.is_empty() {
            match self.writer.send_now(rest) {
                Ok(0) => {
                    self.broken = true;
                    return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                }
                Ok(n) => {
                    rest = &rest[n..];
                    idle = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if idle > 0 {
                        std::thread::sleep(Duration::from_millis(u64::from(idle.min(10))));
                    }
                    idle += 1;
                    self.await_writable(id)?;
                }
                Err(e) if is_transient_io(&e) => {
                    self.broken = true;
                    return Err(self.answer_after_write_failure(id).unwrap_or(e.into()));
                }
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Waits until the socket takes more bytes of request `id`, reading the
    /// replies that arrive meanwhile (see [`Client::write_watching`]). Bounded
    /// by [`Client::set_timeout`] without progress either way.
    fn await_writable(&mut self, id: u64) -> Result<(), ClientError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            while !self.reader.buffer().is_empty() {
                if let Some(e) = self.take_answer(id)? {
                    return Err(e);
                }
            }
            let timeout = match self.timeout {
                None => PollTimeout::NONE,
                Some(t) => PollTimeout::try_from(t.max(Duration::from_millis(1)))
                    .unwrap_or(PollTimeout::MAX),
            };
            let fd = self.writer.as_fd();
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN | PollFlags::POLLOUT)];
            let ready = match poll(&mut fds, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    self.broken = true;
                    return Err(io::Error::from(e).into());
                }
            };
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if ready == 0 {
                self.broken = true; // a request is cut short
                return Err(io::Error::from(io::ErrorKind::TimedOut).into());
            }
            if revents.contains(PollFlags::POLLIN) {
                if let Some(e) = self.take_answer(id)? {
                    return Err(e);
                }
                continue;
            }
            // Writable, or an error or hang-up the next write reports.
            return Ok(());
        }
    }

    /// Reads one reply while request `id` is being sent: returns the error
    /// that ends the request and the connection, or keeps the reply for later.
    fn take_answer(&mut self, id: u64) -> Result<Option<ClientError>, ClientError> {
        let reply = self.recv_fresh().inspect_err(|_| self.broken = true)?;
        let fatal = match &reply.result {
            Err(e) if reply.id == 0 => Some(e.clone()),
            Err(e) if reply.id == id && closes(e) => Some(e.clone()),
            _ => None,
        };
        if let Some(e) = fatal {
            self.broken = true;
            return Ok(Some(ClientError::Remote(e)));
        }
        self.early.insert(reply.id, reply);
        Ok(None)
    }

    /// After a write failed because the server closed: its answer to `id`
    /// (or about the connection), if it sent one, within a second.
    fn answer_after_write_failure(&mut self, id: u64) -> Option<ClientError> {
        let _ = self
            .reader
            .get_ref()
            .set_timeouts(Some(ANSWER_AFTER_WRITE_FAILURE));
        let mut found = None;
        for _ in 0..1024 {
            match self.take_answer(id) {
                Ok(Some(e)) => {
                    found = Some(e);
                    break;
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
        if found.is_none() {
            if let Some(Reply { result: Err(e), .. }) = self.early.remove(&id) {
                found = Some(ClientError::Remote(e));
            }
        }
        let _ = self.reader.get_ref().set_timeouts(self.timeout);
        found
    }

    /// Numbers a request and encodes its frame into `self.out`.
    fn encode_header(&mut self, op: &str, args: &[&str], len: u64) -> Result<u64, ClientError> {
        if self.broken {
            return Err(FrameError::Closed.into());
        }
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            id,
            op: op.into(),
            args: args.iter().copied().collect(),
            payload_len: len,
        };
        self.out.clear();
        frame::encode(&req, &mut self.out)?;
        Ok(id)
    }

    /// Reads the next reply header; the caller must then consume `result_len` bytes.
    fn recv_header(&mut self) -> Result<Response, ClientError> {
        let resp: Response =
            frame::read_frame(&mut self.reader, &mut self.scratch, DEFAULT_MAX_FRAME)?;
        if !matches!(resp.outcome, Outcome::Ok) && resp.result_len != 0 {
            return Err(ClientError::Protocol(
                "an error reply announced result bytes".into(),
            ));
        }
        Ok(resp)
    }

    /// Receives the next reply, whatever its id.
    pub fn recv(&mut self) -> Result<Reply, ClientError> {
        if let Some(&id) = self.early.keys().next() {
            return Ok(self.early.remove(&id).expect("key present"));
        }
        self.recv_fresh()
    }

    fn recv_fresh(&mut self) -> Result<Reply, ClientError> {
        let resp = self.recv_header()?;
        let result = match resp.outcome {
            Outcome::Ok => {
                let mut bytes = vec![0u8; resp.result_len as usize];
                frame::read_payload(&mut self.reader, &mut bytes)?;
                Ok(bytes)
            }
            Outcome::Err(e) => Err(e),
        };
        Ok(Reply {
            id: resp.id,
            result,
        })
    }

    /// Waits for the reply to request `id` (keeping others for later).
    pub fn wait(&mut self, id: u64) -> Result<Vec<u8>, ClientError> {
        loop {
            let reply = match self.early.remove(&id) {
                Some(r) => r,
                None => self.recv_fresh()?,
            };
            if reply.id == id {
                if matches!(&reply.result, Err(e) if closes(e)) {
                    self.broken = true; // the server closes after it
                }
                return Ok(reply.result?);
            }
            if reply.id == 0 {
                // The server could not even read a request: it is about the connection.
                self.broken = true;
                return Err(reply.result.err().map_or_else(
                    || ClientError::Protocol("reply to id 0".into()),
                    ClientError::Remote,
                ));
            }
            self.early.insert(reply.id, reply);
        }
    }

    /// Calls `op` and returns its result bytes.
    pub fn call(
        &mut self,
        op: &str,
        args: &[&str],
        payload: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let id = self.send(op, args, payload)?;
        self.wait(id)
    }

    /// Sends a `cancel` of request `id` (one this client sent and has not
    /// received the reply of) without waiting; returns the cancel's own id.
    /// The dispatcher takes a queued job off its queue, or kills the
    /// worker running it (and starts another), and answers the request
    /// `Cancelled`. The request's reply always comes before the cancel's,
    /// whose result is `cancelled\n` when the request was answered
    /// `Cancelled`, `not found\n` when it was not pending (answered already,
    /// or answered otherwise while the cancel arrived). Only this
    /// connection can cancel its requests (PROTOCOL section 8).
    pub fn send_cancel(&mut self, id: u64) -> Result<u64, ClientError> {
        self.send(proto::OP_CANCEL, &[&id.to_string()], &[])
    }

    /// Cancels request `id` (see [`Client::send_cancel`]) and waits for the
    /// cancel's reply: `true` when the request was cancelled, `false` when
    /// it was not pending. Either way the request's own reply has arrived
    /// by then and is kept for [`Client::wait`] or [`Client::recv`]
    /// (`Cancelled`, when this returns `true`).
    pub fn cancel(&mut self, id: u64) -> Result<bool, ClientError> {
        let cancel = self.send_cancel(id)?;
        match self.wait(cancel)?.as_slice() {
            proto::CANCEL_DONE => Ok(true),
            proto::CANCEL_NOT_FOUND => Ok(false),
            other => Err(ClientError::Protocol(format!(
                "cancel answered {:?}",
                String::from_utf8_lossy(other)
            ))),
        }
    }

    /// A handle that can cancel request `id` from another thread (a Ctrl-C
    /// handler) while this client waits for its reply: use it only once
    /// the request is sent whole, and not while this client sends anything
    /// else (two writers would mix their bytes). The cancel's reply comes
    /// after the request's, so a client that waits for the request alone
    /// gets its `Cancelled` answer and may leave the other unread.
    pub fn canceller(&mut self, id: u64) -> Result<Canceller, ClientError> {
        self.encode_header(proto::OP_CANCEL, &[&id.to_string()], 0)?;
        Ok(Canceller {
            writer: self.writer.try_clone()?,
            frame: self.out.clone(),
        })
    }

    /// Calls `op` with a payload read from `input` and writes the result to
    /// `output` as it arrives; returns the result's length.
    pub fn call_streaming<R: Read, W: Write>(
        &mut self,
        op: &str,
        args: &[&str],
        len: u64,
        input: R,
        output: &mut W,
    ) -> Result<u64, ClientError> {
        self.call_streaming_observed(op, args, len, input, output, |_| {})
    }

    /// [`Client::call_streaming`], calling `on_result(result_len)` once the
    /// answer's header has come and before its bytes are copied (e.g. to
    /// size a progress bar).
    pub fn call_streaming_observed<R: Read, W: Write>(
        &mut self,
        op: &str,
        args: &[&str],
        len: u64,
        input: R,
        output: &mut W,
        on_result: impl FnOnce(u64),
    ) -> Result<u64, ClientError> {
        if !self.early.is_empty() {
            return Err(ClientError::Protocol(
                "call_streaming with replies pending".into(),
            ));
        }
        let id = self.send_from(op, args, len, input)?;
        self.recv_streaming(id, output, on_result)
    }

    /// Waits for the reply to request `id`, the only one this client waits
    /// for, and writes its result to `output` as it arrives (see
    /// [`Client::call_streaming_observed`], which is [`Client::send_from`]
    /// and this); returns the result's length.
    pub fn recv_streaming<W: Write>(
        &mut self,
        id: u64,
        output: &mut W,
        on_result: impl FnOnce(u64),
    ) -> Result<u64, ClientError> {
        if let Some(reply) = self.early.remove(&id) {
            // Answered while the payload was still going out.
            let bytes = reply.result?;
            on_result(bytes.len() as u64);
            output.write_all(&bytes)?;
            return Ok(bytes.len() as u64);
        }
        let resp = self.recv_header()?;
        if resp.id != id {
            self.broken = true;
            return Err(match resp.outcome {
                Outcome::Err(e) if resp.id == 0 => e.into(),
                _ => ClientError::Protocol(format!("reply to {} while waiting for {id}", resp.id)),
            });
        }
        if let Outcome::Err(e) = resp.outcome {
            if closes(&e) {
                self.broken = true;
            }
            return Err(e.into());
        }
        on_result(resp.result_len);
        let mut output = Output {
            inner: output,
            failed: false,
        };
        let copied = match copy_chunked(&mut self.reader, &mut output, resp.result_len) {
            Ok(n) => n,
            Err(e) => {
                self.broken = true;
                return Err(if output.failed {
                    ClientError::Output(e)
                } else {
                    e.into()
                });
            }
        };
        if copied < resp.result_len {
            self.broken = true;
            return Err(FrameError::Truncated {
                expected: resp.result_len as usize,
                got: copied as usize,
            }
            .into());
        }
        Ok(copied)
    }

    /// Asks the dispatcher for its status report.
    pub fn status(&mut self) -> Result<StatusReport, ClientError> {
        let bytes = self.call(proto::OP_STATUS, &[], &[])?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("status is not valid JSON: {e}")))
    }

    /// Asks the dispatcher for its metrics, in the Prometheus text
    /// exposition format (PROTOCOL.md, `metrics`).
    pub fn metrics(&mut self) -> Result<String, ClientError> {
        let bytes = self.call(proto::OP_METRICS, &[], &[])?;
        String::from_utf8(bytes)
            .map_err(|e| ClientError::Protocol(format!("metrics are not UTF-8: {e}")))
    }

    /// Round trip through a worker: succeeds when the whole path answers.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        let r = self.call("ping", &[], &[])?;
        if r == b"pong\n" {
            Ok(())
        } else {
            Err(ClientError::Protocol(format!(
                "ping answered {:?}",
                String::from_utf8_lossy(&r)
            )))
        }
    }
}

/// Cancels one request from another thread: see [`Client::canceller`].
#[derive(Debug)]
pub struct Canceller {
    writer: Stream,
    /// The whole `cancel` request.
    frame: Vec<u8>,
}

impl Canceller {
    /// Sends the cancel (at most once is useful), waiting at most
    /// `within` for the socket to take it.
    pub fn cancel(&self, within: Duration) -> Result<(), ClientError> {
        let end = Instant::now() + within;
        let mut rest = &self.frame[..];
        while !rest.is_empty() {
            match self.writer.send_now(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Whether the server closes the connection after this answer to a
/// request: a payload over its limit (`TooLarge`, ending with "closing the
/// connection", PROTOCOL §9), not a result over a pool's limit (`TooLarge`
/// too, and the connection stays open).
fn closes(e: &RemoteError) -> bool {
    e.kind == proto::ErrorKind::TooLarge && e.message.ends_with(CLOSING)
}

/// How the dispatcher's answers that close the connection end.
const CLOSING: &str = "; closing the connection";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried() {
        let io = |k: io::ErrorKind| ClientError::Io(k.into());
        let remote = |k| ClientError::Remote(RemoteError::new(k, "x"));
        for retried in [
            io(io::ErrorKind::BrokenPipe),
            io(io::ErrorKind::ConnectionReset),
            ClientError::Frame(FrameError::Closed),
            ClientError::Refused("full".into()),
            ClientError::ClosedAtHello {
                endpoint: "x".into(),
            },
            remote(proto::ErrorKind::ShuttingDown),
        ] {
            assert!(retried.is_retryable(), "{retried:?}");
        }
        for refused in [
            remote(proto::ErrorKind::TooLarge),
            remote(proto::ErrorKind::BadRequest),
            remote(proto::ErrorKind::UnknownOp),
            remote(proto::ErrorKind::InvalidInput),
            ClientError::Denied("no".into()),
            ClientError::VersionUnsupported("v2".into()),
            ClientError::NotOsps {
                endpoint: "x".into(),
                answer: "HTTP/1.1 200 OK".into(),
            },
            io(io::ErrorKind::NotFound),
            io(io::ErrorKind::PermissionDenied),
        ] {
            assert!(!refused.is_retryable(), "{refused:?}");
        }
    }
}
