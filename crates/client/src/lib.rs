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
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ipc_core::frame::{self, FrameError, DEFAULT_MAX_FRAME};
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
    #[error("the dispatcher refused the connection: {0}")]
    Refused(String),
    /// The token file cannot be used.
    #[error(transparent)]
    Token(#[from] ipc_core::token::TokenError),
    /// The dispatcher does not admit this client (uid or token).
    #[error("the dispatcher denied the connection: {0}")]
    Denied(String),
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

impl ClientError {
    /// True for failures a new connection may cure: the dispatcher is gone,
    /// restarting, stopping, or did not answer in time. All of today's
    /// operations are idempotent, so such a request can be sent again.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Refused(_) => true,
            ClientError::Frame(e) => e.is_disconnect() || matches!(e, FrameError::Io(_)),
            ClientError::Remote(e) => e.kind == proto::ErrorKind::ShuttingDown,
            ClientError::Paths(_)
            | ClientError::NotOsps { .. }
            | ClientError::Protocol(_)
            | ClientError::Denied(_)
            | ClientError::Token(_) => false,
        }
    }
}

/// How a [`RetryingClient`] retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up when the next attempt would start after this long.
    pub deadline: Duration,
    /// First pause between attempts; doubled each time up to `max_delay`.
    pub first_delay: Duration,
    /// Longest pause between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(10),
            first_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(200),
        }
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
            retries: 0,
        }
    }

    /// Presents `token` in every hello (see [`Client::connect_with_token`]).
    pub fn with_token(mut self, token: Vec<u8>) -> Self {
        self.token = Some(token);
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
    /// reason a retry cannot cure, or the deadline passes. Each attempt's
    /// reads are bounded by the time left.
    pub fn run<T>(
        &mut self,
        mut attempt: impl FnMut(&mut Client) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let start = Instant::now();
        let mut delay = self.policy.first_delay;
        loop {
            let left = self
                .policy
                .deadline
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1));
            let result = match self.client.as_mut() {
                Some(c) => Ok(c),
                None => Client::connect_within(
                    &self.endpoint,
                    self.token.as_deref(),
                    left.min(HANDSHAKE_TIMEOUT),
                )
                .map(|c| self.client.insert(c)),
            }
            .and_then(|c| {
                c.set_timeout(Some(left))?;
                attempt(c)
            });
            match result {
                Ok(v) => return Ok(v),
                Err(e @ ClientError::Connect { .. })
                    if self.lock_file.as_ref().is_some_and(|l| !l.exists()) =>
                {
                    return Err(e);
                }
                Err(e) if e.is_retryable() => {
                    self.client = None;
                    if start.elapsed() + delay >= self.policy.deadline {
                        return Err(e);
                    }
                    self.retries += 1;
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(self.policy.max_delay);
                }
                Err(e) => {
                    if !matches!(e, ClientError::Remote(_)) {
                        self.client = None; // the connection's state is unknown
                    }
                    return Err(e);
                }
            }
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
}

/// A socket to a dispatcher.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
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
    /// Replies read while waiting for another id.
    early: HashMap<u64, Reply>,
}

/// How long `connect` waits for the server's hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Chunk size when streaming a payload from a reader (e.g. a file).
const STREAM_CHUNK: usize = 256 * 1024;

/// Copies up to `len` bytes from `r` to `w` in chunks of at most
/// [`STREAM_CHUNK`]; returns how many were copied (fewer only at end of input).
fn copy_chunked<R: Read + ?Sized, W: Write + ?Sized>(
    r: &mut R,
    w: &mut W,
    len: u64,
) -> io::Result<u64> {
    let mut buf = vec![0u8; (len as usize).clamp(1, STREAM_CHUNK)];
    let mut copied = 0u64;
    while copied < len {
        let want = buf.len().min((len - copied) as usize);
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        copied += n as u64;
    }
    Ok(copied)
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
        let name = endpoint.to_string();
        let connect_err = |source| ClientError::Connect {
            endpoint: name.clone(),
            source,
        };
        // A wedged server's full backlog makes connect itself wait: bounded too.
        let within = handshake_timeout.max(Duration::from_millis(1));
        let stream = match endpoint {
            Endpoint::Unix(p) => {
                let addr = socket2::SockAddr::unix(p).map_err(connect_err)?;
                let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
                    .map_err(connect_err)?;
                s.connect_timeout(&addr, within).map_err(connect_err)?;
                Stream::Unix(UnixStream::from(s))
            }
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, within).map_err(connect_err)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        let mut writer = stream.try_clone()?;
        let mut opening = Vec::with_capacity(proto::MAX_OPENING_LEN);
        proto::encode_opening(token, &mut opening).ok_or_else(|| {
            ClientError::Protocol(format!(
                "a token of {} bytes is longer than {MAX_TOKEN_LEN}",
                token.map_or(0, <[u8]>::len)
            ))
        })?;
        writer.write_all(&opening)?;
        // A stopped or wedged server accepts the connection but never answers.
        stream.set_read_timeout(Some(within))?;
        let mut reader = BufReader::with_capacity(64 * 1024, stream);
        let mut hello = [0u8; HELLO_LEN];
        let got = frame::fill(&mut reader, &mut hello)?;
        reader.get_ref().set_read_timeout(None)?;
        let Some((_version, status)) = (got == HELLO_LEN)
            .then(|| proto::decode_hello(&hello))
            .flatten()
        else {
            let mut rest = Vec::new();
            let _ = reader.take(512).read_to_end(&mut rest);
            let mut answer = hello[..got].to_vec();
            answer.extend_from_slice(&rest);
            return Err(ClientError::NotOsps {
                endpoint: name,
                answer: String::from_utf8_lossy(&answer).trim().to_owned(),
            });
        };
        let status = HelloStatus::from_u16(status);
        if status != Some(HelloStatus::Accepted) {
            let mut line = String::new();
            let _ = reader.take(1024).read_to_string(&mut line);
            let line = line.trim().to_owned();
            return Err(match status {
                Some(HelloStatus::Denied) => ClientError::Denied(line),
                _ => ClientError::Refused(line),
            });
        }
        Ok(Client {
            reader,
            writer,
            endpoint: name,
            next_id: 1,
            out: Vec::with_capacity(COALESCE + 256),
            scratch: Vec::with_capacity(256),
            early: HashMap::new(),
        })
    }

    /// The endpoint this client is connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Bounds how long a read waits for the server (None: forever).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<(), ClientError> {
        self.reader.get_ref().set_read_timeout(t)?;
        Ok(())
    }

    /// Sends a request without waiting for its reply; returns its id.
    pub fn send(&mut self, op: &str, args: &[&str], payload: &[u8]) -> Result<u64, ClientError> {
        let id = self.encode_header(op, args, payload.len() as u64)?;
        if payload.len() <= COALESCE {
            self.out.extend_from_slice(payload);
            self.writer.write_all(&self.out)?;
        } else {
            // Large payloads go out straight from the caller's buffer, in as
            // few system calls as the socket allows.
            self.writer.write_all(&self.out)?;
            self.writer.write_all(payload)?;
        }
        Ok(id)
    }

    /// Sends a request whose `len` payload bytes are read from `payload`
    /// (e.g. a file), without holding them all in memory.
    pub fn send_from<R: Read>(
        &mut self,
        op: &str,
        args: &[&str],
        len: u64,
        payload: R,
    ) -> Result<u64, ClientError> {
        let id = self.encode_header(op, args, len)?;
        self.writer.write_all(&self.out)?;
        let copied = copy_chunked(&mut payload.take(len), &mut self.writer, len)?;
        if copied != len {
            return Err(ClientError::Protocol(format!(
                "payload source gave {copied} of {len} bytes"
            )));
        }
        Ok(id)
    }

    /// Numbers a request and encodes its frame into `self.out`.
    fn encode_header(&mut self, op: &str, args: &[&str], len: u64) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            id,
            op: op.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
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
                return Ok(reply.result?);
            }
            if reply.id == 0 {
                // The server could not even read a request: it is about the connection.
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
        let resp = self.recv_header()?;
        if resp.id != id {
            return Err(ClientError::Protocol(format!(
                "reply to {} while waiting for {id}",
                resp.id
            )));
        }
        if let Outcome::Err(e) = resp.outcome {
            return Err(e.into());
        }
        on_result(resp.result_len);
        let copied = copy_chunked(&mut self.reader, output, resp.result_len)?;
        if copied < resp.result_len {
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
