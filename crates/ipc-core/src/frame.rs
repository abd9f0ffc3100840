//! Length-prefixed framing: a frame is a little-endian `u32` body length
//! followed by that many bytes of postcard. Sizes are capped, a clean EOF at
//! a frame boundary means the peer left, and corrupt bytes are told apart from
//! a truncated stream.
//!
//! Every reader comes in a blocking and an async flavour that share their
//! logic: what one `read` result means ([`on_read`]), and what a prefix, a
//! body or a payload of so many bytes amounts to (`check_*`) are decided
//! once, here; each flavour is only the loop that calls `read`.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
#[cfg(feature = "async")]
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;
/// Default cap on a frame's body (headers are small; payloads travel outside frames).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream cleanly between two frames.
    #[error("peer closed the connection")]
    Closed,
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated { expected: usize, got: usize },
    /// The length prefix announces more than the cap.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The body is not a valid message of the expected type.
    #[error("corrupt frame: {0}")]
    Corrupt(String),
    /// The peer began a frame and did not finish it within the deadline.
    #[error("the peer stalled inside a frame past the deadline")]
    Stalled,
    /// An I/O error other than end of stream.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// True when the peer simply went away (clean close or reset).
    pub fn is_disconnect(&self) -> bool {
        match self {
            FrameError::Closed | FrameError::Truncated { .. } => true,
            FrameError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// Appends one frame holding `msg` to `out`.
pub fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; PREFIX_LEN]);
    let mut out_vec = std::mem::take(out);
    out_vec = postcard::to_extend(msg, out_vec).map_err(|e| FrameError::Corrupt(e.to_string()))?;
    *out = out_vec;
    let body_len =
        u32::try_from(out.len() - start - PREFIX_LEN).map_err(|_| FrameError::TooLarge {
            len: out.len() - start,
            max: u32::MAX as usize,
        })?;
    out[start..start + PREFIX_LEN].copy_from_slice(&body_len.to_le_bytes());
    Ok(())
}

/// Reads the body length from a prefix and checks it against `max`.
pub fn body_len(prefix: [u8; PREFIX_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a whole body (the message may borrow from it); trailing bytes are corruption.
pub fn decode_body<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Corrupt(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Tries to decode one frame from the front of `buf` (the message may borrow
/// from it): `Ok(None)` when more bytes are needed, else the message and how
/// many bytes it took.
pub fn try_decode<'b, T: Deserialize<'b>>(
    buf: &'b [u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let len = body_len(*prefix, max)?;
    let Some(body) = buf.get(PREFIX_LEN..PREFIX_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, PREFIX_LEN + len)))
}

// The shared logic of the readers below: pure, no I/O.

/// What one `read` into a buffer being filled means: `Ok(true)` to read on
/// (`got` advanced, or an interrupted call to repeat), `Ok(false)` at end
/// of stream, or the error.
fn on_read(read: io::Result<usize>, got: &mut usize) -> io::Result<bool> {
    match read {
        Ok(0) => Ok(false),
        Ok(n) => {
            *got += n;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

/// What a prefix read of `got` bytes means: the body length, a clean close
/// (nothing read), or truncation.
fn check_prefix(got: usize, prefix: [u8; PREFIX_LEN], max: usize) -> Result<usize, FrameError> {
    match got {
        0 => Err(FrameError::Closed),
        PREFIX_LEN => body_len(prefix, max),
        got => Err(FrameError::Truncated {
            expected: PREFIX_LEN,
            got,
        }),
    }
}

/// `scratch` made ready for a body of `len` bytes (checked against the cap
/// already, so it never grows beyond it).
fn body_buf(scratch: &mut Vec<u8>, len: usize) -> &mut [u8] {
    scratch.clear();
    scratch.resize(len, 0);
    scratch
}

/// A body read of `got` of `len` bytes: short means truncated.
fn check_body(got: usize, len: usize) -> Result<(), FrameError> {
    if got < len {
        return Err(FrameError::Truncated {
            expected: PREFIX_LEN + len,
            got: PREFIX_LEN + got,
        });
    }
    Ok(())
}

/// A payload read of `got` of `len` bytes: short means truncated.
fn check_payload(got: usize, len: usize) -> Result<(), FrameError> {
    if got < len {
        return Err(FrameError::Truncated { expected: len, got });
    }
    Ok(())
}

// Blocking readers and writers.

/// Fills `buf` from `r`; `Ok(n < buf.len())` only at end of stream.
pub fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() && on_read(r.read(&mut buf[got..]), &mut got)? {}
    Ok(got)
}

/// Reads one frame's body into `scratch` from a blocking reader (for a
/// message that borrows from it: decode with [`decode_body`]).
pub fn read_body<R: Read>(r: &mut R, scratch: &mut Vec<u8>, max: usize) -> Result<(), FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let len = check_prefix(fill(r, &mut prefix)?, prefix, max)?;
    check_body(fill(r, body_buf(scratch, len))?, len)
}

/// Reads one frame from a blocking reader into `scratch` and decodes it (the
/// message may borrow from `scratch`).
pub fn read_frame<'s, T: Deserialize<'s>, R: Read>(
    r: &mut R,
    scratch: &'s mut Vec<u8>,
    max: usize,
) -> Result<T, FrameError> {
    read_body(r, scratch, max)?;
    decode_body(scratch)
}

/// Reads exactly `buf.len()` payload bytes from a blocking reader; a short
/// stream is [`FrameError::Truncated`].
pub fn read_payload<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    check_payload(fill(r, buf)?, buf.len())
}

/// Writes one frame to a blocking writer (through `scratch`, one write call).
pub fn write_frame<T: Serialize, W: Write>(
    w: &mut W,
    msg: &T,
    scratch: &mut Vec<u8>,
) -> Result<(), FrameError> {
    scratch.clear();
    encode(msg, scratch)?;
    w.write_all(scratch)?;
    Ok(())
}

// Async readers: the same steps, with `.await` on each read.

#[cfg(feature = "async")]
/// [`fill`] from an async reader.
async fn fill_async<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() && on_read(r.read(&mut buf[got..]).await, &mut got)? {}
    Ok(got)
}

#[cfg(feature = "async")]
/// Async twin of [`read_body`].
pub async fn read_body_async<R: AsyncRead + Unpin>(
    r: &mut R,
    scratch: &mut Vec<u8>,
    max: usize,
) -> Result<(), FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let len = check_prefix(fill_async(r, &mut prefix).await?, prefix, max)?;
    check_body(fill_async(r, body_buf(scratch, len)).await?, len)
}

#[cfg(feature = "async")]
/// Async twin of [`read_frame`].
pub async fn read_frame_async<'s, T: Deserialize<'s>, R: AsyncRead + Unpin>(
    r: &mut R,
    scratch: &'s mut Vec<u8>,
    max: usize,
) -> Result<T, FrameError> {
    read_body_async(r, scratch, max).await?;
    decode_body(scratch)
}

#[cfg(feature = "async")]
/// Async twin of [`read_payload`].
pub async fn read_payload_async<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), FrameError> {
    check_payload(fill_async(r, buf).await?, buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ErrorKind, Outcome, RemoteError, Request, Response};

    fn req(id: u64) -> Request<'static> {
        Request {
            id,
            op: "sha256".into(),
            args: vec!["a".into()].into(),
            payload_len: 42,
        }
    }

    #[test]
    fn round_trip_many_frames_in_one_buffer() {
        let mut buf = Vec::new();
        for id in [0, 1, 127, 128, u64::MAX] {
            encode(&req(id), &mut buf).unwrap();
        }
        let err = Response {
            id: 9,
            outcome: Outcome::Err(RemoteError::new(ErrorKind::Timeout, "slow")),
            result_len: 0,
        };
        encode(&err, &mut buf).unwrap();
        let mut r = &buf[..];
        let mut scratch = Vec::new();
        for id in [0, 1, 127, 128, u64::MAX] {
            assert_eq!(
                read_frame::<Request, _>(&mut r, &mut scratch, 1024).unwrap(),
                req(id)
            );
        }
        assert_eq!(
            read_frame::<Response, _>(&mut r, &mut scratch, 1024).unwrap(),
            err
        );
        assert!(matches!(
            read_frame::<Request, _>(&mut r, &mut scratch, 1024),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn truncated_input_is_reported_at_every_cut() {
        let mut buf = Vec::new();
        encode(&req(5), &mut buf).unwrap();
        for cut in 1..buf.len() {
            let mut r = &buf[..cut];
            let e = read_frame::<Request, _>(&mut r, &mut Vec::new(), 1024).unwrap_err();
            assert!(
                matches!(e, FrameError::Truncated { .. }),
                "cut {cut}: {e:?}"
            );
            assert!(matches!(try_decode::<Request>(&buf[..cut], 1024), Ok(None)));
        }
    }

    #[test]
    fn oversize_prefix_is_refused_before_reading_the_body() {
        let mut buf = (1_000_000u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        let e = read_frame::<Request, _>(&mut &buf[..], &mut Vec::new(), 1024).unwrap_err();
        assert!(matches!(
            e,
            FrameError::TooLarge {
                len: 1_000_000,
                max: 1024
            }
        ));
    }

    #[test]
    fn corrupt_bodies_are_not_truncation() {
        // A body of the right length that is not a Request (bad UTF-8 in op).
        let body = [1u8, 2, 0xff, 0xfe, 0, 0];
        let mut buf = (body.len() as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&body);
        let e = read_frame::<Request, _>(&mut &buf[..], &mut Vec::new(), 1024).unwrap_err();
        assert!(matches!(e, FrameError::Corrupt(_)), "{e:?}");
        // Trailing garbage inside the body is corruption too.
        let mut buf = Vec::new();
        encode(&req(1), &mut buf).unwrap();
        buf[0] += 1;
        buf.push(0);
        assert!(matches!(
            try_decode::<Request>(&buf, 1024),
            Err(FrameError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn async_reader_matches_sync_reader() {
        let mut buf = Vec::new();
        encode(&req(77), &mut buf).unwrap();
        buf.extend_from_slice(b"0123456789");
        let mut r = &buf[..];
        let mut scratch = Vec::new();
        let got: Request = read_frame_async(&mut r, &mut scratch, 1024).await.unwrap();
        assert_eq!(got, req(77));
        let mut payload = [0u8; 10];
        read_payload_async(&mut r, &mut payload).await.unwrap();
        assert_eq!(&payload, b"0123456789");
        let mut more = [0u8; 1];
        assert!(matches!(
            read_payload_async(&mut r, &mut more).await,
            Err(FrameError::Truncated { .. })
        ));
    }

    /// One read of a [`Script`]: bytes (handed out as far as the buffer
    /// takes them), or an error.
    #[derive(Clone, Copy)]
    enum Step {
        Bytes(&'static [u8]),
        Fail(io::ErrorKind),
    }

    /// A reader, blocking and async, that replays its steps, then ends.
    struct Script(std::collections::VecDeque<Step>);

    fn script(steps: &[Step]) -> Script {
        Script(steps.iter().copied().collect())
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.pop_front() {
                None => Ok(0),
                Some(Step::Fail(kind)) => Err(io::Error::new(kind, "scripted")),
                Some(Step::Bytes(bytes)) => {
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    if n < bytes.len() {
                        self.0.push_front(Step::Bytes(&bytes[n..]));
                    }
                    Ok(n)
                }
            }
        }
    }

    impl AsyncRead for Script {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let read = Read::read(&mut *self, buf.initialize_unfilled());
            std::task::Poll::Ready(read.map(|n| buf.advance(n)))
        }
    }

    /// What a read came to, in a form both flavours can be compared by.
    fn class<T: std::fmt::Debug>(r: &Result<T, FrameError>) -> String {
        match r {
            Ok(v) => format!("ok {v:?}"),
            Err(FrameError::Closed) => "closed".into(),
            Err(FrameError::Truncated { expected, got }) => format!("truncated {got}/{expected}"),
            Err(FrameError::TooLarge { len, max }) => format!("too large {len}/{max}"),
            Err(FrameError::Corrupt(_)) => "corrupt".into(),
            Err(FrameError::Stalled) => "stalled".into(),
            Err(FrameError::Io(e)) => format!("io {:?}", e.kind()),
        }
    }

    #[tokio::test]
    async fn both_flavours_classify_every_frame_alike() {
        use Step::{Bytes, Fail};
        // An 8-byte body: Request { id 7, op "ping", args [], payload_len 0 }.
        const FRAME: &[u8] = b"\x08\0\0\0\x07\x04ping\0\0";
        let ok = "ok 7";
        let cases: &[(&str, &[Step], &str)] = &[
            ("whole frame", &[Bytes(FRAME)], ok),
            (
                "byte by byte",
                &[
                    Bytes(&FRAME[..1]),
                    Bytes(&FRAME[1..5]),
                    Bytes(&FRAME[5..9]),
                    Bytes(&FRAME[9..]),
                ],
                ok,
            ),
            (
                "interrupted reads are repeated",
                &[
                    Fail(io::ErrorKind::Interrupted),
                    Bytes(&FRAME[..3]),
                    Fail(io::ErrorKind::Interrupted),
                    Bytes(&FRAME[3..]),
                ],
                ok,
            ),
            ("nothing: the peer left", &[], "closed"),
            ("cut in the prefix", &[Bytes(b"\x08\0")], "truncated 2/4"),
            ("cut in the body", &[Bytes(&FRAME[..8])], "truncated 8/12"),
            (
                "over the cap",
                &[Bytes(b"\x11\0\0\0"), Bytes(&[0; 17])],
                "too large 17/16",
            ),
            (
                "over the cap, body never sent",
                &[Bytes(b"\0\0\0\x80")],
                "too large 2147483648/16",
            ),
            (
                "not a request (bad utf-8)",
                &[Bytes(b"\x06\0\0\0\x01\x02\xff\xfe\0\0")],
                "corrupt",
            ),
            (
                "trailing bytes in the body",
                &[Bytes(b"\x09\0\0\0\x07\x04ping\0\0\0")],
                "corrupt",
            ),
            ("empty body", &[Bytes(b"\0\0\0\0")], "corrupt"),
            (
                "reset in the prefix",
                &[Bytes(b"\x08"), Fail(io::ErrorKind::ConnectionReset)],
                "io ConnectionReset",
            ),
            (
                "reset in the body",
                &[Bytes(&FRAME[..8]), Fail(io::ErrorKind::ConnectionReset)],
                "io ConnectionReset",
            ),
        ];
        for &(name, steps, want) in cases {
            let id = |r: Result<Request<'_>, FrameError>| class(&r.map(|req| req.id));
            let sync = id(read_frame(&mut script(steps), &mut Vec::new(), 16));
            let mut scratch = Vec::new();
            let of_async = id(read_frame_async(&mut script(steps), &mut scratch, 16).await);
            assert_eq!((name, sync.as_str()), (name, want));
            assert_eq!((name, of_async.as_str()), (name, want));
        }
    }

    #[tokio::test]
    async fn both_flavours_classify_every_payload_alike() {
        use Step::{Bytes, Fail};
        let cases: &[(&str, &[Step], usize, &str)] = &[
            ("all of it", &[Bytes(b"0123456789")], 10, "ok ()"),
            (
                "in pieces",
                &[Bytes(b"012"), Bytes(b"3456"), Bytes(b"789")],
                10,
                "ok ()",
            ),
            ("nothing expected", &[], 0, "ok ()"),
            (
                "interrupted, then all",
                &[Fail(io::ErrorKind::Interrupted), Bytes(b"0123456789")],
                10,
                "ok ()",
            ),
            (
                "the peer left early",
                &[Bytes(b"012")],
                10,
                "truncated 3/10",
            ),
            ("the peer left at once", &[], 10, "truncated 0/10"),
            (
                "a broken pipe",
                &[Bytes(b"01"), Fail(io::ErrorKind::BrokenPipe)],
                10,
                "io BrokenPipe",
            ),
        ];
        for &(name, steps, len, want) in cases {
            let mut buf = vec![0u8; len];
            let sync = class(&read_payload(&mut script(steps), &mut buf));
            let of_async = class(&read_payload_async(&mut script(steps), &mut buf).await);
            for (flavour, got) in [("sync", &sync), ("async", &of_async)] {
                assert_eq!((name, flavour, got.as_str()), (name, flavour, want));
            }
            if want == "ok ()" && len > 0 {
                assert_eq!(&buf, b"0123456789", "{name}");
            }
        }
    }
}
