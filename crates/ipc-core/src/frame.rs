//! Length-prefixed framing: a frame is a little-endian `u32` body length
//! followed by that many bytes of postcard. Sizes are capped, a clean EOF at
//! a frame boundary means the peer left, and corrupt bytes are told apart from
//! a truncated stream.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;
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
pub fn decode_body<'de, T: serde::Deserialize<'de>>(body: &'de [u8]) -> Result<T, FrameError> {
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

/// Tries to decode one frame from the front of `buf`: `Ok(None)` when more
/// bytes are needed, else the message and how many bytes it took.
pub fn try_decode<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.get(..PREFIX_LEN) else {
        return Ok(None);
    };
    let len = body_len(prefix.try_into().expect("4 bytes"), max)?;
    let Some(body) = buf.get(PREFIX_LEN..PREFIX_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, PREFIX_LEN + len)))
}

/// Fills `buf` from `r`; `Ok(n < buf.len())` only at end of stream.
pub fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame from a blocking reader, using `scratch` for the body.
pub fn read_frame<T: DeserializeOwned, R: Read>(
    r: &mut R,
    scratch: &mut Vec<u8>,
    max: usize,
) -> Result<T, FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let len = check_prefix(fill(r, &mut prefix)?, prefix, max)?;
    scratch.clear();
    scratch.resize(len, 0);
    check_body(fill(r, scratch)?, len)?;
    decode_body(scratch)
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

/// Reads one frame's body into `scratch` from a blocking reader (for a
/// message that borrows from it: decode with [`decode_body`]).
pub fn read_body<R: Read>(r: &mut R, scratch: &mut Vec<u8>, max: usize) -> Result<(), FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let len = check_prefix(fill(r, &mut prefix)?, prefix, max)?;
    scratch.clear();
    scratch.resize(len, 0);
    check_body(fill(r, scratch)?, len)
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

#[cfg(feature = "async")]
/// Async twin of [`fill`].
async fn fill_async<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(feature = "async")]
/// Reads one frame from an async reader, using `scratch` for the body.
pub async fn read_frame_async<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    scratch: &mut Vec<u8>,
    max: usize,
) -> Result<T, FrameError> {
    read_body_async(r, scratch, max).await?;
    decode_body(scratch)
}

#[cfg(feature = "async")]
/// Reads one frame's body into `scratch` (for a message that borrows from
/// it: decode with [`decode_body`]).
pub async fn read_body_async<R: AsyncRead + Unpin>(
    r: &mut R,
    scratch: &mut Vec<u8>,
    max: usize,
) -> Result<(), FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let len = check_prefix(fill_async(r, &mut prefix).await?, prefix, max)?;
    scratch.clear();
    scratch.resize(len, 0);
    check_body(fill_async(r, scratch).await?, len)
}

#[cfg(feature = "async")]
/// Reads exactly `buf.len()` payload bytes; a short stream is [`FrameError::Truncated`].
pub async fn read_payload_async<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), FrameError> {
    read_payload_observed(r, buf, |_| {}).await
}

#[cfg(feature = "async")]
/// [`read_payload_async`], calling `progress` with the bytes read so far after each read.
pub async fn read_payload_observed<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    mut progress: impl FnMut(usize),
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await? {
            0 => {
                return Err(FrameError::Truncated {
                    expected: buf.len(),
                    got,
                })
            }
            n => got += n,
        }
        progress(got);
    }
    Ok(())
}

/// Reads exactly `buf.len()` payload bytes from a blocking reader.
pub fn read_payload<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    let got = fill(r, buf)?;
    if got < buf.len() {
        return Err(FrameError::Truncated {
            expected: buf.len(),
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ErrorKind, Outcome, RemoteError, Request, Response};

    fn req(id: u64) -> Request {
        Request {
            id,
            op: "sha256".into(),
            args: vec!["a".into()],
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

    #[cfg(feature = "async")]
    #[tokio::test]
    async fn async_reader_matches_sync_reader() {
        let mut buf = Vec::new();
        encode(&req(77), &mut buf).unwrap();
        buf.extend_from_slice(b"0123456789");
        let mut r = &buf[..];
        let got: Request = read_frame_async(&mut r, &mut Vec::new(), 1024)
            .await
            .unwrap();
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
}
