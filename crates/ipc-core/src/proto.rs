//! The messages: client ⇄ dispatcher (over a socket) and dispatcher ⇄ worker
//! (over the worker's stdin/stdout pipes). All are postcard-encoded inside
//! length-prefixed frames (see [`crate::frame`] and `docs/PROTOCOL.md`).
//!
//! Payload bytes never travel inside these messages: on the socket they follow
//! a [`Request`] or [`Response`] frame; between processes they stay in the
//! shared segment, named by a [`WireRegion`].

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::segment::Region;

/// A slot as a `Job` frame names it: plain numbers, the same bytes on the
/// wire as ever (offset, then length, from the arena's start). A worker turns
/// it into a [`Region`] with [`crate::Segment::check`]; it grants nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRegion {
    /// Offset from the start of the arena.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl From<Region> for WireRegion {
    fn from(r: Region) -> WireRegion {
        WireRegion {
            offset: r.offset(),
            len: r.len(),
        }
    }
}

/// The four bytes that open every connection.
pub const MAGIC: [u8; 4] = *b"OSPS";
/// The client/dispatcher protocol version.
pub const PROTOCOL_VERSION: u16 = 1;
/// Length of the client's hello and of the server's answer to it.
pub const HELLO_LEN: usize = 8;
/// Version of the dispatcher ⇄ worker pipe protocol, in the worker's `Ready`
/// (2: `ToWorker` frames with `More`/`Abort`, and `Ready` lists streaming
/// operations; 3: a [`Job`] carries its `attempt`; 4: `Ready` lists every
/// operation, and a worker may ask for room for a result larger than its
/// slot with `Grow`, answered `Room` or `NoRoom`). Dispatcher and workers
/// agree on it; docs/PROTOCOL.md section 13 is the contract.
pub const PIPE_VERSION: u16 = 4;
/// The operation the dispatcher answers itself with a JSON [`crate::status::StatusReport`].
pub const OP_STATUS: &str = "status";
/// The operation the dispatcher answers itself with its metrics in the
/// Prometheus text exposition format (version 0.0.4, UTF-8).
pub const OP_METRICS: &str = "metrics";
/// The health check every worker answers (`pong\n`), whatever it serves.
pub const OP_PING: &str = "ping";
/// The operation the dispatcher answers itself by cancelling an earlier
/// request of the same connection: args `[ID]`, the request's id in decimal.
/// Answered [`CANCEL_DONE`] or [`CANCEL_NOT_FOUND`]; the cancelled request
/// is answered [`ErrorKind::Cancelled`] first (PROTOCOL section 8).
pub const OP_CANCEL: &str = "cancel";
/// The result of a `cancel` that cancelled the request: its answer, which
/// came first, is [`ErrorKind::Cancelled`].
pub const CANCEL_DONE: &[u8] = b"cancelled\n";
/// The result of a `cancel` that found no such request pending on the
/// connection (never sent, answered already, or answered otherwise while
/// the cancel arrived: its answer, which came first, says how).
pub const CANCEL_NOT_FOUND: &[u8] = b"not found\n";
/// The operation the dispatcher answers itself by re-reading its
/// configuration file and applying it rolling (no payload, no arguments;
/// only its own uid or root, on the Unix socket).
pub const OP_RELOAD: &str = "reload";
/// The operations the dispatcher answers itself: no pool, worker or SDK may
/// serve one of these names (it would never be reached).
pub const DISPATCHER_OPS: &[&str] = &[OP_STATUS, OP_METRICS, OP_CANCEL, OP_RELOAD];

/// Client hello flag: a token follows the hello (u16 LE length, then that
/// many bytes, at most [`crate::token::MAX_TOKEN_LEN`]). Needed on a TCP
/// listener started with `--token-file`.
pub const HELLO_FLAG_TOKEN: u16 = 1;

/// The server's verdict on a client's hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum HelloStatus {
    /// Go ahead: frames may follow.
    Accepted = 0,
    /// The client's protocol version is not served; a text line follows and the server closes.
    VersionUnsupported = 1,
    /// The server is full (connection limit); a text line says so and the
    /// server closes. Trying again later may succeed.
    Refused = 2,
    /// The peer is not admitted (its uid, or a missing or wrong token); a text
    /// line says why and the server closes. Trying again will not help.
    Denied = 3,
}

impl HelloStatus {
    /// Decodes the status field of a server hello.
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            0 => Some(Self::Accepted),
            1 => Some(Self::VersionUnsupported),
            2 => Some(Self::Refused),
            3 => Some(Self::Denied),
            _ => None,
        }
    }
}

/// Encodes the 8-byte hello: magic, version (u16 LE), then a u16 LE field
/// (flags, 0, from a client; a [`HelloStatus`] from the server).
pub fn encode_hello(version: u16, field: u16) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&version.to_le_bytes());
    out[6..8].copy_from_slice(&field.to_le_bytes());
    out
}

/// A decoded hello: `None` when the magic is wrong (not an OSPS peer).
pub fn decode_hello(bytes: &[u8; HELLO_LEN]) -> Option<(u16, u16)> {
    (bytes[..4] == MAGIC).then(|| {
        (
            u16::from_le_bytes([bytes[4], bytes[5]]),
            u16::from_le_bytes([bytes[6], bytes[7]]),
        )
    })
}

/// The most a client's opening can take: hello, token length, longest token.
pub const MAX_OPENING_LEN: usize = HELLO_LEN + 2 + crate::token::MAX_TOKEN_LEN;

/// What the first bytes a client sent amount to (see [`parse_opening`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening<'a> {
    /// Undecided: at least this many bytes in all are needed (never more
    /// than [`MAX_OPENING_LEN`]).
    NeedMore(usize),
    /// The bytes so far do not start with the magic: not an OSPS client.
    NotOsps,
    /// The token length field is over [`crate::token::MAX_TOKEN_LEN`].
    TokenTooLong(usize),
    /// A whole opening in the first `len` bytes. For a version other than
    /// [`PROTOCOL_VERSION`] it is the 8-byte hello alone (the flags of an
    /// unknown version mean nothing here) and `token` is `None`.
    Hello {
        /// The client's protocol version.
        version: u16,
        /// The client's flags.
        flags: u16,
        /// The token, when flag [`HELLO_FLAG_TOKEN`] is set.
        token: Option<&'a [u8]>,
        /// Bytes the opening took.
        len: usize,
    },
}

/// Decodes a client's opening from the bytes received so far: the hello,
/// then, with flag [`HELLO_FLAG_TOKEN`], a u16 LE length and the token.
/// Decides as early as it can: a byte off the magic is enough for
/// [`Opening::NotOsps`].
pub fn parse_opening(buf: &[u8]) -> Opening<'_> {
    let seen = buf.len().min(MAGIC.len());
    if buf[..seen] != MAGIC[..seen] {
        return Opening::NotOsps;
    }
    let Some(hello) = buf.first_chunk::<HELLO_LEN>() else {
        return Opening::NeedMore(HELLO_LEN);
    };
    let (version, flags) = decode_hello(hello).expect("magic checked");
    if version != PROTOCOL_VERSION || flags & HELLO_FLAG_TOKEN == 0 {
        return Opening::Hello {
            version,
            flags,
            token: None,
            len: HELLO_LEN,
        };
    }
    let Some(&[lo, hi]) = buf[HELLO_LEN..].first_chunk::<2>() else {
        return Opening::NeedMore(HELLO_LEN + 2);
    };
    let token_len = usize::from(u16::from_le_bytes([lo, hi]));
    if token_len > crate::token::MAX_TOKEN_LEN {
        return Opening::TokenTooLong(token_len);
    }
    let len = HELLO_LEN + 2 + token_len;
    match buf.get(HELLO_LEN + 2..len) {
        Some(token) => Opening::Hello {
            version,
            flags,
            token: Some(token),
            len,
        },
        None => Opening::NeedMore(len),
    }
}

/// Encodes a client's opening: the hello, and the token if there is one.
/// `None` when the token is longer than [`crate::token::MAX_TOKEN_LEN`].
pub fn encode_opening(token: Option<&[u8]>, out: &mut Vec<u8>) -> Option<()> {
    match token {
        None => out.extend_from_slice(&encode_hello(PROTOCOL_VERSION, 0)),
        Some(t) => {
            let len = u16::try_from(t.len())
                .ok()
                .filter(|&l| usize::from(l) <= crate::token::MAX_TOKEN_LEN)?;
            out.extend_from_slice(&encode_hello(PROTOCOL_VERSION, HELLO_FLAG_TOKEN));
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(t);
        }
    }
    Some(())
}

/// Most arguments a request or job may carry; a frame with more is corrupt.
/// (Today's operations take at most one; the cap keeps a small frame from
/// decoding into a large vector.)
pub const MAX_ARGS: usize = 64;

/// An operation's arguments, borrowed where they can be so that neither side
/// copies a string: decoded, a list of its own whose strings borrow from the
/// frame; encoded, a list the sender keeps (the dispatcher's queued job).
/// (Not a `Cow<'a, [Cow<'a, str>]>`: that type is invariant in `'a`.)
#[derive(Clone)]
pub enum Args<'a> {
    /// A list the sender keeps.
    Borrowed(&'a [Cow<'a, str>]),
    /// A list of its own.
    Owned(Vec<Cow<'a, str>>),
}

impl<'a> std::ops::Deref for Args<'a> {
    type Target = [Cow<'a, str>];
    fn deref(&self) -> &Self::Target {
        match self {
            Args::Borrowed(list) => list,
            Args::Owned(list) => list,
        }
    }
}

impl Default for Args<'_> {
    fn default() -> Self {
        Args::Owned(Vec::new())
    }
}

impl<'a> From<Vec<Cow<'a, str>>> for Args<'a> {
    fn from(list: Vec<Cow<'a, str>>) -> Self {
        Args::Owned(list)
    }
}

impl<'a> From<&'a [Cow<'a, str>]> for Args<'a> {
    fn from(list: &'a [Cow<'a, str>]) -> Self {
        Args::Borrowed(list)
    }
}

impl<'a, S: Into<Cow<'a, str>>> FromIterator<S> for Args<'a> {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        Args::Owned(iter.into_iter().map(Into::into).collect())
    }
}

impl PartialEq for Args<'_> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Args<'_> {}

impl std::fmt::Debug for Args<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// On the wire a list of strings, as a `Vec<String>` is.
impl Serialize for Args<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// One argument as decoded: borrowed from the frame when the decoder can
/// (postcard from a slice always can), else owned.
#[derive(Deserialize)]
#[serde(transparent)]
struct Arg<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'a> From<Arg<'a>> for Cow<'a, str> {
    fn from(arg: Arg<'a>) -> Self {
        arg.0
    }
}

/// Deserializes a list of at most [`MAX_ARGS`] elements as `T`s kept as
/// `U`s, refusing a longer one from its length field, before allocating.
fn bounded_seq<'de, D, T, U>(d: D) -> Result<Vec<U>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
    U: From<T>,
{
    struct Bounded<T, U>(std::marker::PhantomData<(T, U)>);
    impl<'de, T: Deserialize<'de>, U: From<T>> serde::de::Visitor<'de> for Bounded<T, U> {
        type Value = Vec<U>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_ARGS} arguments")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<U>, A::Error> {
            let declared = seq.size_hint().unwrap_or(0);
            if declared > MAX_ARGS {
                return Err(serde::de::Error::invalid_length(declared, &self));
            }
            let mut out = Vec::with_capacity(declared);
            while let Some(arg) = seq.next_element::<T>()? {
                if out.len() == MAX_ARGS {
                    return Err(serde::de::Error::invalid_length(MAX_ARGS + 1, &self));
                }
                out.push(U::from(arg));
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded(std::marker::PhantomData))
}

/// Deserializes [`Args`] (at most [`MAX_ARGS`]), borrowing each from the frame.
fn bounded_args<'de: 'a, 'a, D>(d: D) -> Result<Args<'a>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    bounded_seq::<D, Arg<'a>, Cow<'a, str>>(d).map(Args::Owned)
}

/// Deserializes a list of at most [`MAX_ARGS`] owned strings.
fn bounded_strings<'de, D>(d: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    bounded_seq::<D, String, String>(d)
}

/// A client's request; `payload_len` bytes of payload follow the frame.
/// Decoded, its strings borrow from the frame (the dispatcher's hot path: no
/// allocation unless there are arguments); encoded, from the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request<'a> {
    /// Chosen by the client; echoed in the response (pipelined replies may come in any order).
    pub id: u64,
    /// Operation name, e.g. `sha256`; `status` is answered by the dispatcher.
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    /// Operation arguments, e.g. `["250"]` for `sleep`.
    #[serde(borrow, deserialize_with = "bounded_args")]
    pub args: Args<'a>,
    /// Number of payload bytes that follow the frame.
    pub payload_len: u64,
}

/// The dispatcher's answer; `result_len` bytes of result follow the frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The id of the request answered (0 for an error about an unreadable request).
    pub id: u64,
    /// Success, or what went wrong.
    pub outcome: Outcome,
    /// Number of result bytes that follow the frame (0 on error).
    pub result_len: u64,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The result follows.
    Ok,
    /// The job failed; no result follows.
    Err(RemoteError),
}

/// A typed error with a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RemoteError {
    /// What kind of failure it is (stable, for programs).
    pub kind: ErrorKind,
    /// What happened and what to do (for people).
    pub message: String,
}

impl RemoteError {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The kinds of error a response can carry. The order is part of the wire
/// format: append new kinds at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request frame was malformed (over the size cap, undecodable), or
    /// `status` came with a payload. Bad operation arguments are `InvalidInput`.
    BadRequest,
    /// No such operation.
    UnknownOp,
    /// The payload exceeds the server's limit; the server closes the connection after this answer.
    TooLarge,
    /// The job exceeded the per-job timeout; its worker was killed and replaced.
    Timeout,
    /// The worker died while running the job, twice (the job is retried once).
    WorkerCrashed,
    /// A fault-injection operation was asked for but the dispatcher does not allow it.
    FaultInjectionDisabled,
    /// The server is shutting down and takes no new jobs.
    ShuttingDown,
    /// The operation could not process its input (e.g. an argument out of range).
    InvalidInput,
    /// A bug or an unexpected condition in the server.
    Internal,
    /// A command pool's command exited non-zero or was killed; the message
    /// gives how it ended and the last lines of its stderr.
    CommandFailed,
    /// The job went past its pool's memory limit (`memory_limit_mib`); the
    /// message names the limit. Its worker was replaced; the job is not retried.
    OutOfMemory,
    /// The client cancelled the request (`cancel`): it was taken off the
    /// queue, or its worker was killed and replaced; not retried.
    Cancelled,
    /// The peer may not ask this of the dispatcher (e.g. `reload` from
    /// another uid than the dispatcher's own or root, or over TCP). Index 12
    /// on the wire (after `Cancelled`, 11).
    PermissionDenied,
}

impl ErrorKind {
    /// A short stable name, as shown by the CLI.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad request",
            ErrorKind::UnknownOp => "unknown operation",
            ErrorKind::TooLarge => "too large",
            ErrorKind::Timeout => "timeout",
            ErrorKind::WorkerCrashed => "worker crashed",
            ErrorKind::FaultInjectionDisabled => "fault injection disabled",
            ErrorKind::ShuttingDown => "shutting down",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Internal => "internal error",
            ErrorKind::CommandFailed => "command failed",
            ErrorKind::OutOfMemory => "out of memory",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::PermissionDenied => "permission denied",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dispatcher → worker: run one job. The slot's ownership passes to the worker
/// with this message and comes back with the [`JobDone`] that names the job.
/// The dispatcher encodes it borrowing the queued job's strings; the worker
/// decodes it borrowing them from the frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job<'a> {
    /// Dispatcher-wide job number.
    pub job_id: u64,
    /// Operation name.
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    /// Operation arguments.
    #[serde(borrow, deserialize_with = "bounded_args")]
    pub args: Args<'a>,
    /// The slot: the input sits at its start, the result is written inside it.
    pub slot: WireRegion,
    /// Number of input bytes at the start of the slot.
    pub input_len: u64,
    /// Input bytes in the slot already. Less than `input_len` when the job is
    /// sent while its payload still arrives: [`ToWorker::More`] frames follow.
    pub ready: u64,
    /// Which run of this job it is in this dispatcher: 1 the first time, 2
    /// when it is run again because its worker died during the first run.
    /// (A client's resend after a lost connection is a new job: 1 again.)
    pub attempt: u32,
}

/// Dispatcher → worker messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker<'a> {
    /// Run a job.
    #[serde(borrow)]
    Job(Job<'a>),
    /// More of the running job's input has arrived: the first `ready` bytes
    /// of its slot are in place.
    More {
        /// The job whose input grew.
        job_id: u64,
        /// Input bytes in the slot now; `input_len` once all has arrived.
        ready: u64,
    },
    /// The running job's input will never arrive in full (the client left or
    /// stalled): stop and answer an error.
    Abort {
        /// The job to give up.
        job_id: u64,
    },
    /// The answer to a [`FromWorker::Grow`]: a region of at least the asked
    /// length, the job's result area from now on (the worker's until the
    /// job's `Done`, like the slot; earlier areas stay its own until then too).
    Room {
        /// The job that asked.
        job_id: u64,
        /// The new result area.
        area: WireRegion,
    },
    /// The answer to a [`FromWorker::Grow`] that asked for more than the
    /// pool allows: the worker answers the job [`ErrorKind::TooLarge`] with
    /// this message.
    NoRoom {
        /// The job that asked.
        job_id: u64,
        /// Why, for the client (names the limit).
        #[serde(borrow)]
        message: Cow<'a, str>,
    },
}

/// Worker → dispatcher messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// Sent once at start, after the segment is opened and checked.
    Ready {
        /// The worker's pid.
        pid: u32,
        /// The worker's pipe protocol version ([`PIPE_VERSION`]).
        version: u16,
        /// Operations that read their input front to back and so may be sent
        /// before their payload has arrived in full (then `More` frames follow).
        #[serde(deserialize_with = "bounded_strings")]
        streams: Vec<String>,
        /// Every operation the worker serves (those in `streams` included;
        /// not `ping`, which every worker answers). The dispatcher routes
        /// each operation to the pool whose workers list it.
        #[serde(deserialize_with = "bounded_strings")]
        ops: Vec<String>,
    },
    /// A job finished; the slot goes back to the dispatcher.
    Done(JobDone),
    /// The running job's result needs `len` bytes (more than its slot has
    /// room for): the dispatcher answers [`ToWorker::Room`] or
    /// [`ToWorker::NoRoom`]. At most one `Grow` is unanswered at a time.
    Grow {
        /// The running job.
        job_id: u64,
        /// The result area wanted, in bytes.
        len: u64,
    },
}

/// The end of a job: its outcome and where the result lies in the slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDone {
    /// The job this answers.
    pub job_id: u64,
    /// Success or error.
    pub outcome: Outcome,
    /// Offset of the result from the start of the slot.
    pub result_offset: u64,
    /// Length of the result.
    pub result_len: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_max_args_is_corrupt() {
        let req = |n| Request {
            id: 1,
            op: "echo".into(),
            args: vec![Cow::from(""); n].into(),
            payload_len: 0,
        };
        let mut buf = Vec::new();
        crate::frame::encode(&req(MAX_ARGS), &mut buf).unwrap();
        assert_eq!(
            crate::frame::decode_body::<Request>(&buf[4..]).unwrap(),
            req(MAX_ARGS)
        );
        buf.clear();
        crate::frame::encode(&req(MAX_ARGS + 1), &mut buf).unwrap();
        let e = crate::frame::decode_body::<Request>(&buf[4..]).unwrap_err();
        assert!(matches!(e, crate::frame::FrameError::Corrupt(_)), "{e}");
    }

    #[test]
    fn openings_are_decided_as_early_as_possible() {
        assert_eq!(parse_opening(b""), Opening::NeedMore(8));
        assert_eq!(parse_opening(b"OS"), Opening::NeedMore(8));
        assert_eq!(parse_opening(b"G"), Opening::NotOsps);
        assert_eq!(parse_opening(b"OSPX"), Opening::NotOsps);
        let plain = encode_hello(PROTOCOL_VERSION, 0);
        assert_eq!(
            parse_opening(&plain),
            Opening::Hello {
                version: 1,
                flags: 0,
                token: None,
                len: 8
            }
        );
        let mut with = Vec::new();
        encode_opening(Some(b"0123456789abcdef"), &mut with).unwrap();
        assert_eq!(parse_opening(&with[..8]), Opening::NeedMore(10));
        assert_eq!(parse_opening(&with[..9]), Opening::NeedMore(10));
        assert_eq!(parse_opening(&with[..20]), Opening::NeedMore(26));
        with.extend_from_slice(b"first frame");
        assert_eq!(
            parse_opening(&with),
            Opening::Hello {
                version: 1,
                flags: 1,
                token: Some(b"0123456789abcdef"),
                len: 26
            }
        );
        let mut long = encode_hello(PROTOCOL_VERSION, HELLO_FLAG_TOKEN).to_vec();
        long.extend_from_slice(&300u16.to_le_bytes());
        assert_eq!(parse_opening(&long), Opening::TokenTooLong(300));
        // Another version: the hello alone, whatever its flags.
        let v2 = encode_hello(2, HELLO_FLAG_TOKEN);
        assert_eq!(
            parse_opening(&v2),
            Opening::Hello {
                version: 2,
                flags: 1,
                token: None,
                len: 8
            }
        );
        assert!(encode_opening(Some(&[0; 257]), &mut Vec::new()).is_none());
    }

    #[test]
    fn hello_round_trips_and_rejects_wrong_magic() {
        let h = encode_hello(PROTOCOL_VERSION, 0);
        assert_eq!(&h, b"OSPS\x01\x00\x00\x00");
        assert_eq!(decode_hello(&h), Some((1, 0)));
        assert_eq!(decode_hello(b"GET / HT"), None);
    }

    #[test]
    fn error_kind_indices_are_stable() {
        // The wire carries the variant index: this pins the documented table.
        let kinds = [
            ErrorKind::BadRequest,
            ErrorKind::UnknownOp,
            ErrorKind::TooLarge,
            ErrorKind::Timeout,
            ErrorKind::WorkerCrashed,
            ErrorKind::FaultInjectionDisabled,
            ErrorKind::ShuttingDown,
            ErrorKind::InvalidInput,
            ErrorKind::Internal,
            ErrorKind::CommandFailed,
            ErrorKind::OutOfMemory,
            ErrorKind::Cancelled,
            ErrorKind::PermissionDenied,
        ];
        for (i, k) in kinds.iter().enumerate() {
            assert_eq!(postcard::to_stdvec(k).unwrap(), vec![i as u8]);
        }
    }

    /// Whether every string of a decoded message points into its frame.
    fn borrows(op: &[Cow<'_, str>], args: &[Cow<'_, str>]) -> bool {
        op.iter().chain(args).all(|s| matches!(s, Cow::Borrowed(_)))
    }

    #[test]
    fn decoded_messages_borrow_their_strings_from_the_frame() {
        fn job(args: Args<'_>) -> Job<'_> {
            Job {
                job_id: 9,
                op: "sleep".into(),
                args,
                slot: WireRegion {
                    offset: 4096,
                    len: 8192,
                },
                input_len: 3,
                ready: 2,
                attempt: 2,
            }
        }
        let kept = vec![Cow::from(String::from("5"))];
        // Encoded from a list the sender keeps, or from its own: same bytes.
        let bytes = postcard::to_stdvec(&ToWorker::Job(job(Args::Borrowed(&kept)))).unwrap();
        assert_eq!(
            bytes,
            postcard::to_stdvec(&ToWorker::Job(job(Args::Owned(kept.clone())))).unwrap()
        );
        let ToWorker::Job(back) = postcard::from_bytes(&bytes).unwrap() else {
            panic!("not a job")
        };
        assert!(
            borrows(std::slice::from_ref(&back.op), &back.args),
            "{back:?}"
        );
        assert_eq!(back, job(kept.into()));
        // The pinned bytes of section 13 of docs/PROTOCOL.md.
        assert_eq!(
            postcard::to_stdvec(&ToWorker::More {
                job_id: 1,
                ready: 300
            })
            .unwrap(),
            b"\x01\x01\xac\x02"
        );
        let req = Request {
            id: 300,
            op: "upper".into(),
            args: vec!["a".into(), "b".into()].into(),
            payload_len: 70_000,
        };
        let bytes = postcard::to_stdvec(&req).unwrap();
        let r: Request<'_> = postcard::from_bytes(&bytes).unwrap();
        assert!(borrows(std::slice::from_ref(&r.op), &r.args), "{r:?}");
        assert_eq!(r, req);
    }

    #[test]
    fn worker_pipe_examples_match_the_protocol_document() {
        let slot = WireRegion {
            offset: 0,
            len: 8192,
        };
        let job = |job_id, op: &'static str, attempt| {
            ToWorker::Job(Job {
                job_id,
                op: op.into(),
                args: vec![].into(),
                slot,
                input_len: 11,
                ready: 11,
                attempt,
            })
        };
        fn framed(msg: &impl Serialize) -> Vec<u8> {
            let mut out = Vec::new();
            crate::frame::encode(msg, &mut out).unwrap();
            out
        }
        assert_eq!(
            framed(&job(1, "upper", 1)),
            b"\x0f\0\0\0\x00\x01\x05upper\x00\x00\x80\x40\x0b\x0b\x01"
        );
        assert_eq!(
            framed(&job(2, "wc", 1)),
            b"\x0c\0\0\0\x00\x02\x02wc\x00\x00\x80\x40\x0b\x0b\x01"
        );
        // The same job run again after its worker died.
        assert_eq!(
            framed(&job(2, "wc", 2)),
            b"\x0c\0\0\0\x00\x02\x02wc\x00\x00\x80\x40\x0b\x0b\x02"
        );
        let ready = FromWorker::Ready {
            pid: 19227,
            version: PIPE_VERSION,
            streams: vec!["sha256".into(), "wc".into()],
            ops: vec!["upper".into(), "wc".into(), "sha256".into()],
        };
        assert_eq!(
            framed(&ready),
            b"\x21\0\0\0\x00\x9b\x96\x01\x04\x02\x06sha256\x02wc\x03\x05upper\x02wc\x06sha256"
        );
        // A result larger than the slot: 100000 bytes wanted, then the room given.
        assert_eq!(
            framed(&FromWorker::Grow {
                job_id: 3,
                len: 100_000
            }),
            b"\x05\0\0\0\x02\x03\xa0\x8d\x06"
        );
        let room = ToWorker::Room {
            job_id: 3,
            area: WireRegion {
                offset: 1 << 20,
                len: 131_072,
            },
        };
        assert_eq!(framed(&room), b"\x08\0\0\0\x03\x03\x80\x80\x40\x80\x80\x08");
    }

    #[test]
    fn request_encoding_matches_the_protocol_document() {
        let r = Request {
            id: 300,
            op: "sleep".into(),
            args: vec!["5".into()].into(),
            payload_len: 0,
        };
        // id 300 = varint ac 02; "sleep" = 05 + bytes; args = 01, 01 "5"; payload_len 00
        assert_eq!(
            postcard::to_stdvec(&r).unwrap(),
            b"\xac\x02\x05sleep\x01\x015\x00".to_vec()
        );
    }

    /// Section 12.8 of docs/PROTOCOL.md: request 4 (`sleep 60000`) cancelled
    /// by request 5; request 4's `Cancelled` answer comes first.
    #[test]
    fn cancel_example_matches_the_protocol_document() {
        fn framed(msg: &impl Serialize) -> Vec<u8> {
            let mut out = Vec::new();
            crate::frame::encode(msg, &mut out).unwrap();
            out
        }
        let sleep = Request {
            id: 4,
            op: "sleep".into(),
            args: vec!["60000".into()].into(),
            payload_len: 0,
        };
        assert_eq!(
            framed(&sleep),
            b"\x0f\0\0\0\x04\x05sleep\x01\x0560000\x00".to_vec()
        );
        let cancel = Request {
            id: 5,
            op: OP_CANCEL.into(),
            args: vec!["4".into()].into(),
            payload_len: 0,
        };
        assert_eq!(
            framed(&cancel),
            b"\x0c\0\0\0\x05\x06cancel\x01\x014\x00".to_vec()
        );
        let cancelled = Response {
            id: 4,
            outcome: Outcome::Err(RemoteError::new(
                ErrorKind::Cancelled,
                "cancelled by the client (request 5)",
            )),
            result_len: 0,
        };
        let mut want = b"\x28\0\0\0\x04\x01\x0b\x23".to_vec();
        want.extend_from_slice(b"cancelled by the client (request 5)\x00");
        assert_eq!(framed(&cancelled), want);
        let done = Response {
            id: 5,
            outcome: Outcome::Ok,
            result_len: CANCEL_DONE.len() as u64,
        };
        assert_eq!(framed(&done), b"\x03\0\0\0\x05\x00\x0a".to_vec());
        let message = b"\x63\x61\x6e\x63\x65\x6c\x6c\x65\x64\x20\x62\x79\x20\x74\x68\x65\x20\x63\x6c\x69\x65\x6e\x74\x20\x28\x72\x65\x71\x75\x65\x73\x74\x20\x35\x29";
        assert_eq!(&want[8..8 + 35], message);
        assert_eq!(CANCEL_DONE, b"\x63\x61\x6e\x63\x65\x6c\x6c\x65\x64\x0a");
        assert_eq!(
            CANCEL_NOT_FOUND,
            b"\x6e\x6f\x74\x20\x66\x6f\x75\x6e\x64\x0a"
        );
    }
}
